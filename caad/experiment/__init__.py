"""``caad experiment``: arms x seeds with intervals, tables and plots; the config's ``suite`` picks the study.

Suite ``caad`` (the CAAD methods on one corpus):

- :mod:`~caad.experiment.config`: the YAML config and its arms (:func:`load_experiment_config`);
- :mod:`~caad.experiment.harness`: the run (:func:`run_experiment`): shared corpus, per-seed teacher,
  every arm's training and evaluation, resumable;
- :mod:`~caad.experiment.store`: the folder, finished units, refusal to overwrite;
- :mod:`~caad.experiment.report`: ``results.json``, ``results.md``, plots;
- :mod:`~caad.experiment.alpha_method`: CAAD with an alpha schedule or adaptive alpha on the trainer;
- :mod:`~caad.experiment.side_by_side`: the small table that closes the demo;
- :mod:`~caad.experiment.cli`: ``add_parser(subparsers)`` / ``main(args)`` for the ``caad`` command.

Suite ``spoken_qa`` (the text-teacher methods' ablations on the built-in spoken-QA set: forgetting, modality gap):

- :mod:`~caad.experiment.spoken_qa_config`: its config, arms (``crossmodal``, ``sourcewise``, ``layerwise``
  students; ``text_teacher`` and ``pre_distillation`` references) and their dependencies;
- :mod:`~caad.experiment.spoken_qa`: the run (shared set and models, ``--setup-only``, every arm x seed);
- :mod:`~caad.experiment.spoken_qa_report`: its ``results.json``, ``results.md`` and plot.

Import the submodules directly; this package imports nothing heavy.
"""
