"""SALAD: sample-efficient alignment with active selection and cross-modal distillation (arXiv 2510.13632).

The text-speech understanding gap (text accuracy minus speech accuracy on the same questions) comes from
forgetting (Stage I: cross-modal distillation from the text teacher, :mod:`caad.methods.crossmodal`) and
cross-modal misalignment (Stage II: spend the synthesis budget where the student on speech disagrees most
with the teacher on text). SALAD is not a new loss: every training is one run of the cross-modal method on
the shared trainer; what is new is the loop around it (:mod:`~caad.methods.salad.rounds`).

Modules: :mod:`~caad.methods.salad.config` (the ``salad`` section), :mod:`~caad.methods.salad.prepare` (the
built-in set, teacher and student), :mod:`~caad.methods.salad.embed` (the pool's embeddings),
:mod:`~caad.methods.salad.kmeans` (k-means in torch), :mod:`~caad.methods.salad.misalignment` (probe
measures, pluggable metrics: KL, JS, accuracy gap), :mod:`~caad.methods.salad.selection` (budgets, active
and random plans), :mod:`~caad.methods.salad.measures` (speech/text accuracy, gap, per voice, intervals),
:mod:`~caad.methods.salad.rounds` (the loop), :mod:`~caad.methods.salad.report` (report.json, plots).
Command: ``caad salad --config configs/salad.yaml`` (:mod:`caad.commands.salad`).
"""

from caad.methods.salad.config import SaladConfig, load_salad_config
from caad.methods.salad.kmeans import KMeansResult, kmeans
from caad.methods.salad.misalignment import METRICS, cluster_scores, probe_items, register_metric
from caad.methods.salad.rounds import SaladRun, run_salad
from caad.methods.salad.selection import Budget, plan_active, plan_random, rank_clusters

__all__ = [
    "METRICS",
    "Budget",
    "KMeansResult",
    "SaladConfig",
    "SaladRun",
    "cluster_scores",
    "kmeans",
    "load_salad_config",
    "plan_active",
    "plan_random",
    "probe_items",
    "rank_clusters",
    "register_metric",
    "run_salad",
]
