"""KD losses with torchtune's call convention, on our kernels; torchtune itself is not needed.

Drop-in for ``torchtune.modules.loss.ForwardKLLoss`` and ``ForwardKLWithChunkedOutputLoss``, as
torchtune's knowledge-distillation recipes call them::

    kd_loss_fn = ForwardKLWithChunkedOutputLoss(num_output_chunks=8, ignore_index=-100)
    kd_loss = kd_loss_fn(student_logit_chunks, teacher_logit_chunks, labels)   # lists of [B, T/k, V]
    loss = (1 - kd_ratio) * class_loss + kd_ratio * kd_loss

torchtune's conventions, kept: no temperature and no ``temperature ** 2``; rows whose label is
``ignore_index`` contribute nothing; the sum over rows is divided by the number of valid rows
(``normalize=True``) and an all-ignored batch gives 0. Chunks are processed one at a time (no
concatenation into a ``[B, T, V]`` tensor and no fp32 upcast of a chunk: every sum is in fp32 in
the kernels), and the student gradient comes back in the chunks' dtype.

The value: torchtune's "forward KL" is ``-sum_v p_v log q_v``, the cross-entropy of the student
under the teacher, i.e. ``KL(p || q) + H(p)``. The gradient with respect to the student is the
same as the KL's; the value differs by the teacher's entropy. ``include_teacher_entropy=True``
(default, so that logged values match torchtune's) adds ``H(p)``, computed in an extra pass over
the teacher logits without gradients; ``False`` returns the KL itself (0 when the student matches
the teacher) and skips that pass.

Beyond torchtune: ``temperature`` (with ``temperature_scaling``) and a contrastive teacher
(``teacher_negative_logits`` and ``alpha`` in ``forward``); with a temperature other than 1 the
entropy term is that of ``softmax(z / temperature)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from caad_kernels import contrastive_kd_loss
from caad_kernels.options import KDOptions

_ENTROPY_ROWS = 1024  # rows per block of the teacher-entropy pass: bounds its fp32 temporaries


def teacher_entropy_sum(teacher_logits: torch.Tensor, mask: torch.Tensor, vocab: int, temperature: float,
                        teacher_negative_logits: torch.Tensor | None = None, alpha: float = 0.0) -> torch.Tensor:
    """``sum over rows with mask of H(softmax(z / temperature))`` over the first ``vocab`` columns, in fp32.

    ``z`` is the teacher's logits or, with ``teacher_negative_logits``, the contrastive
    ``z_pos + alpha (z_pos - z_neg)``. Processed ``1024`` rows at a time.
    """
    flat = teacher_logits.reshape(-1, teacher_logits.shape[-1])[:, :vocab]
    negative = None
    if teacher_negative_logits is not None and alpha != 0:
        negative = teacher_negative_logits.reshape(-1, teacher_negative_logits.shape[-1])[:, :vocab]
    rows = mask.reshape(-1)
    total = torch.zeros((), dtype=torch.float32, device=teacher_logits.device)
    with torch.no_grad():
        for start in range(0, flat.shape[0], _ENTROPY_ROWS):
            stop = start + _ENTROPY_ROWS
            z = flat[start:stop].float()
            if negative is not None:
                z = z + alpha * (z - negative[start:stop].float())
            log_p = torch.log_softmax(z / temperature, dim=-1)
            # 0 * log 0 is 0 (masked tokens), never NaN
            plogp = torch.where(log_p > float("-inf"), log_p.exp() * log_p, torch.zeros((), device=z.device))
            total = total - (plogp.sum(dim=-1) * rows[start:stop]).sum()
    return total


class ForwardKLLoss(torch.nn.Module):
    """torchtune's ``ForwardKLLoss``: ``forward(student_logits, teacher_logits, labels, normalize=True)``.

    Args:
        ignore_index: label value of rows that contribute nothing.
        include_teacher_entropy: add the teacher's entropy so the value equals torchtune's (module docstring).
        temperature, temperature_scaling, alpha, backend: our options (torchtune has none of
            them: the defaults reproduce it); ``alpha`` is used only when ``forward`` gets
            ``teacher_negative_logits``.

    ``forward``: ``student_logits [N, V]`` (or any ``[..., V]``), ``teacher_logits [..., V_t]``
    with ``V_t >= V``, ``labels`` with the student's leading shape (or its flattened ``[N]``);
    returns a float32 scalar.
    """

    def __init__(self, ignore_index: int = -100, *, include_teacher_entropy: bool = True, temperature: float = 1.0,
                 temperature_scaling: bool = False, alpha: float = 1.0, backend: str = "auto") -> None:
        super().__init__()
        if not isinstance(include_teacher_entropy, bool):
            raise TypeError(f"include_teacher_entropy must be a bool, got {type(include_teacher_entropy).__name__}")
        self.options = KDOptions(alpha=alpha, temperature=temperature, temperature_scaling=temperature_scaling,
                                 ignore_index=ignore_index, backend=backend)
        self.ignore_index = ignore_index
        self.include_teacher_entropy = include_teacher_entropy

    def row_sum(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                teacher_negative_logits: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sum of the per-row losses over valid rows, number of valid rows)`` for one chunk."""
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
        lead = student_logits.shape[:-1]
        if labels.shape != lead:
            if labels.numel() != lead.numel():
                raise ValueError(
                    f"labels must have the student's leading shape {tuple(lead)} (or be its flattened "
                    f"[{lead.numel()}]), got {tuple(labels.shape)}"
                )
            labels = labels.reshape(lead)
        mask = labels != self.ignore_index
        opts = self.options
        total = contrastive_kd_loss(
            student_logits, teacher_logits, teacher_negative_logits, None, alpha=opts.alpha,
            temperature=opts.temperature, temperature_scaling=opts.temperature_scaling, reduction="sum",
            backend=opts.backend, mask=mask,
        )
        if self.include_teacher_entropy:
            entropy = teacher_entropy_sum(teacher_logits, mask, student_logits.shape[-1], opts.temperature,
                                          teacher_negative_logits, float(opts.alpha))
            total = total + entropy * opts.kd_scale
        return total, mask.sum()

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                normalize: bool = True, *, teacher_negative_logits: torch.Tensor | None = None) -> torch.Tensor:
        total, count = self.row_sum(student_logits, teacher_logits, labels, teacher_negative_logits)
        if not normalize:
            return total
        return total / count.clamp(min=1).to(total.dtype)


class ForwardKLWithChunkedOutputLoss(torch.nn.Module):
    """torchtune's ``ForwardKLWithChunkedOutputLoss(num_output_chunks=8, ignore_index=-100)``.

    ``forward(student_logits, teacher_logits, labels)``: lists of chunks ``[B, T_k, V]`` (the
    model's output split along the sequence, as torchtune's chunked output gives them) and labels
    ``[B, T]``; the labels are split to the chunks' own lengths. Returns the sum over all valid
    rows divided by their number (0 when there is none). Keyword options as
    :class:`ForwardKLLoss`; ``forward`` also takes ``teacher_negative_logits`` (a list of chunks).
    """

    def __init__(self, num_output_chunks: int = 8, ignore_index: int = -100, **options: object) -> None:
        super().__init__()
        if isinstance(num_output_chunks, bool) or not isinstance(num_output_chunks, int) or num_output_chunks < 1:
            raise ValueError(f"num_output_chunks must be a positive int, got {num_output_chunks!r}")
        self.num_output_chunks = num_output_chunks
        self.ignore_index = ignore_index
        self.fkl_loss = ForwardKLLoss(ignore_index, **options)

    def forward(self, student_logits: Sequence[torch.Tensor], teacher_logits: Sequence[torch.Tensor],
                labels: torch.Tensor, *,
                teacher_negative_logits: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        if isinstance(student_logits, torch.Tensor) or isinstance(teacher_logits, torch.Tensor):
            raise TypeError("student_logits and teacher_logits must be lists of chunks (use ForwardKLLoss for tensors)")
        if len(student_logits) != len(teacher_logits) or len(student_logits) == 0:
            raise ValueError(
                f"student_logits and teacher_logits must be non-empty lists of the same length, got "
                f"{len(student_logits)} and {len(teacher_logits)}"
            )
        if teacher_negative_logits is not None and len(teacher_negative_logits) != len(student_logits):
            raise ValueError(
                f"teacher_negative_logits must have {len(student_logits)} chunks, got {len(teacher_negative_logits)}"
            )
        lengths = [chunk.shape[1] if chunk.dim() >= 3 else None for chunk in student_logits]
        if None in lengths or labels.dim() != 2 or sum(lengths) != labels.shape[1]:
            raise ValueError(
                f"each chunk must be [B, T_k, V] with the T_k summing to labels' T ({tuple(labels.shape)}), got "
                f"{[tuple(chunk.shape) for chunk in student_logits]}"
            )
        label_chunks = labels.split(lengths, dim=1)
        negatives = teacher_negative_logits or [None] * len(student_logits)
        total, count = None, None
        for student, teacher, negative, chunk_labels in zip(student_logits, teacher_logits, negatives, label_chunks):
            chunk_total, chunk_count = self.fkl_loss.row_sum(student, teacher, chunk_labels, negative)
            total = chunk_total if total is None else total + chunk_total
            count = chunk_count if count is None else count + chunk_count
        return total / count.clamp(min=1).to(total.dtype)


__all__ = ["ForwardKLLoss", "ForwardKLWithChunkedOutputLoss", "teacher_entropy_sum"]
