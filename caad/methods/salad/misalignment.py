"""Misalignment between the text teacher on text and the student on speech: per-item probe measures and
pluggable per-cluster metrics.

Per probe item (a spoken row with its text query and answer), teacher-forced on ``prompt + answer + end``:
the teacher reads the text query, the student hears the spoken query (its ``s2t`` sequence); their answer
rows line up (:mod:`caad.methods.crossmodal.batch`). With ``p = softmax(z_teacher / T)`` (teacher columns
past the student's vocabulary dropped, as the distillation loss does) and ``q = softmax(z_student / T)``:

- ``kl``: mean over the item's answer rows of ``KL(p || q)``;
- ``js``: mean over its answer rows of the Jensen-Shannon divergence ``(KL(p||m) + KL(q||m)) / 2``, ``m = (p+q)/2``
  (symmetric, bounded by ``log 2``);
- ``teacher_correct`` / ``student_correct``: every answer row's argmax (over the tokenizer's ids) is the
  answer token: under teacher forcing this is exactly "greedy decoding returns the answer".

A cluster's metric (:data:`METRICS`, higher = more misaligned) aggregates its items' records: ``kl`` and
``js`` their means, ``acc_gap`` the teacher's text accuracy minus the student's speech accuracy. Add one
with :func:`register_metric`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from caad.data.audio import load_audio
from caad.data.manifest import ManifestRow
from caad.methods.crossmodal.batch import answer_ids, reference_answer, text_query
from caad.models import IGNORE_INDEX, SAMPLING_RATE, SpeechLM
from caad.models.text_lm import build_text_batch

__all__ = ["METRICS", "cluster_scores", "probe_items", "register_metric"]

ItemRecord = Mapping[str, Any]


def _mean(records: Sequence[ItemRecord], key: str) -> float:
    return float(sum(float(r[key]) for r in records) / len(records))


def _acc_gap(records: Sequence[ItemRecord]) -> float:
    return _mean(records, "teacher_correct") - _mean(records, "student_correct")


#: name -> aggregate of a cluster's probe records (higher = more misaligned).
METRICS: dict[str, Callable[[Sequence[ItemRecord]], float]] = {
    "kl": lambda records: _mean(records, "kl"),
    "js": lambda records: _mean(records, "js"),
    "acc_gap": _acc_gap,
}


def register_metric(name: str, function: Callable[[Sequence[ItemRecord]], float]) -> None:
    """Add a misalignment metric (an arm of that name then selects by it)."""
    if not name or name == "random" or name in METRICS:
        raise ValueError(f"metric name {name!r} is empty, reserved or taken")
    METRICS[name] = function


def _per_row_counts(labels: torch.Tensor) -> list[int]:
    return (labels[:, 1:] != IGNORE_INDEX).sum(1).tolist()


@torch.no_grad()
def probe_items(
    teacher: Any,
    teacher_tokenizer: Any,
    student: SpeechLM,
    rows: Sequence[ManifestRow],
    *,
    temperature: float = 1.0,
    batch_size: int = 8,
) -> list[dict[str, Any]]:
    """One record per row: ``{"id", "group", "voice", "kl", "js", "teacher_correct", "student_correct"}``."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    was_training = student.training
    student.eval()
    usable = len(student.tokenizer)
    vocab = student.vocab_size
    device = next(teacher.parameters()).device
    out: list[dict[str, Any]] = []
    try:
        for start in range(0, len(rows), batch_size):
            chunk = list(rows[start : start + batch_size])
            audio = [load_audio(row.audio_path, SAMPLING_RATE) for row in chunk]
            answers = [reference_answer(row) for row in chunk]
            text = build_text_batch(teacher_tokenizer, [text_query(row) for row in chunk], answers).to(device)
            speech = student.build_inputs(audio, [row.instruction for row in chunk], answers).to(student.device)
            if not torch.equal(answer_ids(text.labels).cpu(), answer_ids(speech.labels).cpu()):
                raise ValueError("the teacher and the student tokenize the answers differently (no shared vocabulary)")
            t_logits = (
                teacher(input_ids=text.input_ids, attention_mask=text.attention_mask, position_ids=text.position_ids)
                .logits[:, :-1][text.labels[:, 1:] != IGNORE_INDEX][:, :vocab]
                .float()
            )
            s_logits = student.logits(speech)[:, :-1][speech.labels[:, 1:] != IGNORE_INDEX].float().to(t_logits.device)
            labels = answer_ids(text.labels)
            log_p = torch.log_softmax(t_logits / temperature, -1)
            log_q = torch.log_softmax(s_logits / temperature, -1)
            p, q = log_p.exp(), log_q.exp()
            kl = (p * (log_p - log_q)).sum(-1)
            log_m = torch.log((p + q) / 2).clamp_min(-1e30)
            js = 0.5 * ((p * (log_p - log_m)).sum(-1) + (q * (log_q - log_m)).sum(-1))
            t_right = t_logits[:, :usable].argmax(-1) == labels
            s_right = s_logits[:, :usable].argmax(-1) == labels
            begin = 0
            for row, count in zip(chunk, _per_row_counts(text.labels)):
                span = slice(begin, begin + count)
                begin += count
                out.append(
                    {
                        "id": row.id,
                        "group": row.group,
                        "voice": row.metadata.get("voice"),
                        "kl": float(kl[span].mean()),
                        "js": float(js[span].mean()),
                        "teacher_correct": bool(t_right[span].all()),
                        "student_correct": bool(s_right[span].all()),
                    }
                )
    finally:
        student.train(was_training)
    return out


def cluster_scores(
    records: Sequence[ItemRecord], clusters: Sequence[int], num_clusters: int
) -> dict[str, list[float | None]]:
    """Every metric of :data:`METRICS` per cluster (``None`` for a cluster without probe records).

    ``clusters[i]`` is the cluster of ``records[i]``.
    """
    if len(records) != len(clusters):
        raise ValueError(f"records has {len(records)} entries but clusters {len(clusters)}")
    by_cluster: list[list[ItemRecord]] = [[] for _ in range(num_clusters)]
    for record, cluster in zip(records, clusters):
        by_cluster[int(cluster)].append(record)
    return {
        name: [function(members) if members else None for members in by_cluster] for name, function in METRICS.items()
    }
