"""``caad experiment``: arms x seeds over the CAAD methods on one corpus, with intervals, tables and plots.

- :mod:`~caad.experiment.config`: the YAML config and its arms (:func:`load_experiment_config`);
- :mod:`~caad.experiment.harness`: the run (:func:`run_experiment`): shared corpus, per-seed teacher,
  every arm's training and evaluation, resumable;
- :mod:`~caad.experiment.store`: the folder, finished units, refusal to overwrite;
- :mod:`~caad.experiment.report`: ``results.json``, ``results.md``, plots;
- :mod:`~caad.experiment.alpha_method`: CAAD with an alpha schedule or adaptive alpha on the trainer;
- :mod:`~caad.experiment.side_by_side`: the small table that closes the demo;
- :mod:`~caad.experiment.cli`: ``add_parser(subparsers)`` / ``main(args)`` for the ``caad`` command.

Import the submodules directly; this package imports nothing heavy.
"""
