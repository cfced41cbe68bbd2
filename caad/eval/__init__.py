"""Evaluation: Dynamic-SUPERB-style scoring, MCR-BENCH text-condition metrics with confidence intervals.

- :mod:`caad.eval.normalize`: English answer normalisation (:func:`normalize_text`);
- :mod:`caad.eval.scoring`: answer matching that cannot be gamed (:func:`score_answer`,
  :func:`is_correct`: the label named, no other candidate, not negated), :func:`follows_context`;
- :mod:`caad.eval.metrics`: accuracy per condition, task and category, normalised accuracy, text
  influence rate, shift, flip rates, modal robustness, each with a bootstrap interval over items and
  seeds (:func:`summarize`);
- :mod:`caad.eval.generation`: batched greedy and contrastive decoding for a :class:`~caad.models.SpeechLM`;
- :mod:`caad.eval.runner`: :func:`run_eval` (a checkpoint on a manifest, result files written as it
  goes) and :func:`markdown_table` (one row per model/decoding), used by ``caad eval`` and ``caad run``.
"""

from caad.eval.generation import (
    contrastive_generate_ids,
    contrastive_logits,
    decode_ids,
    generate_ids,
    hinted_instruction,
)
from caad.eval.metrics import CONDITIONS, MIN_MEANINGFUL_ITEMS, TEXT_CONDITIONS, summarize
from caad.eval.normalize import normalize_text, normalized_words, number_to_words
from caad.eval.runner import (
    check_outputs_free,
    decoding_label,
    default_run_name,
    evaluate_rows,
    expand_conditions,
    markdown_table,
    result_paths,
    row_candidates,
    run_eval,
    score_records,
    task_labels,
)
from caad.eval.scoring import (
    AnswerScore,
    ScoredItem,
    accuracy_metrics,
    contains_words,
    follows_context,
    follows_hint,
    is_correct,
    named_candidates,
    score_answer,
)
from caad.eval.speech_lm import (
    ClozePair,
    SpeechContinuation,
    build_cloze_pairs,
    cloze_accuracy,
    compare_to_teacher,
    continuation_perplexity,
    evaluate_unit_lm,
    speech_continuations,
)

__all__ = [
    "CONDITIONS",
    "MIN_MEANINGFUL_ITEMS",
    "TEXT_CONDITIONS",
    "AnswerScore",
    "ScoredItem",
    "accuracy_metrics",
    "check_outputs_free",
    "contains_words",
    "contrastive_generate_ids",
    "contrastive_logits",
    "decode_ids",
    "decoding_label",
    "default_run_name",
    "evaluate_rows",
    "expand_conditions",
    "follows_context",
    "follows_hint",
    "generate_ids",
    "hinted_instruction",
    "is_correct",
    "markdown_table",
    "named_candidates",
    "normalize_text",
    "normalized_words",
    "number_to_words",
    "result_paths",
    "row_candidates",
    "run_eval",
    "score_answer",
    "score_records",
    "summarize",
    "task_labels",
]
# unit-LM measures (TinyWave: normalised perplexity, spoken StoryCloze-style): caad.eval.speech_lm
__all__ += [
    "ClozePair",
    "SpeechContinuation",
    "build_cloze_pairs",
    "cloze_accuracy",
    "compare_to_teacher",
    "continuation_perplexity",
    "evaluate_unit_lm",
    "speech_continuations",
]
