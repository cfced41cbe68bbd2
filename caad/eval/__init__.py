"""Evaluation: Dynamic-SUPERB-style scoring and the MCR-BENCH-style linguistic-bias shift.

- :mod:`caad.eval.normalize`: English answer normalisation (:func:`normalize_text`);
- :mod:`caad.eval.scoring`: the contiguous-words match (:func:`is_correct`), accuracies, the shift;
- :mod:`caad.eval.generation`: batched greedy and contrastive decoding for a :class:`~caad.models.SpeechLM`;
- :mod:`caad.eval.runner`: :func:`run_eval` (a checkpoint on a manifest, result files) and
  :func:`markdown_table` (one row per model/decoding), used by ``caad eval`` and ``caad run``.
"""

from caad.eval.generation import (
    contrastive_generate_ids,
    contrastive_logits,
    decode_ids,
    generate_ids,
    hinted_instruction,
)
from caad.eval.normalize import normalize_text, normalized_words, number_to_words
from caad.eval.runner import (
    check_outputs_free,
    decoding_label,
    evaluate_rows,
    markdown_table,
    result_paths,
    run_eval,
    score_records,
)
from caad.eval.scoring import (
    BiasItem,
    ScoredItem,
    accuracy_metrics,
    bias_metrics,
    contains_words,
    follows_hint,
    is_correct,
)

__all__ = [
    "BiasItem",
    "ScoredItem",
    "accuracy_metrics",
    "bias_metrics",
    "check_outputs_free",
    "contains_words",
    "contrastive_generate_ids",
    "contrastive_logits",
    "decode_ids",
    "decoding_label",
    "evaluate_rows",
    "follows_hint",
    "generate_ids",
    "hinted_instruction",
    "is_correct",
    "markdown_table",
    "normalize_text",
    "normalized_words",
    "number_to_words",
    "result_paths",
    "run_eval",
    "score_records",
]
