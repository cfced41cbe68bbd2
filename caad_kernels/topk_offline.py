"""The teacher's side of offline distillation: its top-k (contrastive) log-probabilities per token.

Offline distillation runs the teacher once over a dataset, stores ``k`` (index, log-probability)
pairs per token, and trains the student from them later without the teacher in memory (the loss
side: ``teacher_topk_indices`` / ``teacher_topk_logprobs`` of both ops, :mod:`caad_kernels.topk`).
These functions produce exactly what the loss side expects:

    z       = softcap(teacher_logit_scale * logits)          per path, columns past vocab_size dropped
    z_hat   = z_pos + alpha * (z_pos - z_neg)                 (z_pos alone without a negative path)
    z_hat_v = -inf where z_pos_v < max(z_pos) + log(plausibility)       (plausibility > 0)
    logprobs, indices = topk(log_softmax(z_hat / temperature), k)

so a student trained on them with the same ``temperature`` (and no teacher options: they are
already applied) sees the teacher of ``contrastive_kd_loss`` restricted to its top k, the rest of
the mass in the tail bucket. Tokens removed by the cutoff have log-probability ``-inf``: when
fewer than ``k`` tokens survive, the last slots are ``-inf`` (empty slots, never read by the loss).

Rows are processed in chunks (float32 temporaries of ``chunk_rows x V`` per path); the fused form
takes the teacher's final hidden states and ``lm_head`` weight, so no ``[tokens x V]`` logits exist
at any time. Nothing here needs gradients (run under ``torch.no_grad()`` internally). Outputs:
int64 indices and float32 log-probabilities, ``[..., k]``, on the inputs' device, sorted by
decreasing log-probability.
"""

from __future__ import annotations

import math

import torch

from caad_kernels.options import KDOptions

CHUNK_ELEMENTS = 1 << 22  # float32 logits per path per chunk (16 MiB)


def _options(alpha, temperature, plausibility, teacher_logit_scale, teacher_softcap) -> KDOptions:
    """The shared option checks of the losses (same errors, same names)."""
    return KDOptions(alpha=alpha, temperature=temperature, plausibility=plausibility,
                     teacher_logit_scale=teacher_logit_scale, teacher_softcap=teacher_softcap)


def _check_k(k: object, vocab: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab:
        raise ValueError(f"k must be an int in [1, {vocab}] (the vocabulary), got {k!r}")


def _check_vocab(vocab_size: object, teacher_vocab: int, name: str) -> int:
    if vocab_size is None:
        return teacher_vocab
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not 1 <= vocab_size <= teacher_vocab:
        raise ValueError(f"vocab_size must be an int in [1, {teacher_vocab}] (the vocabulary of {name}), "
                         f"got {vocab_size!r}")
    return vocab_size


def _chunk_rows(chunk_rows: object, vocab: int) -> int:
    if chunk_rows is None:
        return max(1, CHUNK_ELEMENTS // vocab)
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive int or None, got {chunk_rows!r}")
    return chunk_rows


def _flat_alpha(opts: KDOptions, lead: torch.Size, device: torch.device) -> torch.Tensor | float:
    if not opts.per_row_alpha:
        return float(opts.alpha)
    alpha = opts.alpha
    if alpha.shape != lead or alpha.device != device:
        raise ValueError(f"alpha as a tensor must have the leading shape {tuple(lead)} on {device}, got "
                         f"{tuple(alpha.shape)} on {alpha.device}")
    return alpha.reshape(-1).float()


def _topk_of_chunk(z_pos: torch.Tensor, z_neg: torch.Tensor | None, alpha: torch.Tensor | float, opts: KDOptions,
                   k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(indices, logprobs)`` of one chunk of float32 ``[rows, V]`` logits (transforms not yet applied)."""

    def transform(z: torch.Tensor) -> torch.Tensor:
        if opts.teacher_logit_scale != 1.0:
            z = z * opts.teacher_logit_scale
        if opts.teacher_softcap is not None:
            z = torch.where(torch.isneginf(z), z, opts.teacher_softcap * torch.tanh(z / opts.teacher_softcap))
        return z

    z_pos = transform(z_pos)
    z_hat = z_pos
    if z_neg is not None:
        a = alpha.unsqueeze(1) if isinstance(alpha, torch.Tensor) else alpha
        z_hat = torch.where(torch.isneginf(z_pos), z_pos, z_pos + a * (z_pos - transform(z_neg)))
    if opts.plausibility > 0:
        cutoff = z_pos.amax(dim=-1, keepdim=True) + math.log(opts.plausibility)
        z_hat = z_hat.masked_fill(z_pos < cutoff, float("-inf"))
    logprobs = torch.log_softmax(z_hat / opts.temperature, dim=-1)
    values, indices = logprobs.topk(k, dim=-1)
    return indices, values


@torch.no_grad()
def teacher_topk_logprobs(
    teacher_logits: torch.Tensor,
    k: int,
    teacher_negative_logits: torch.Tensor | None = None,
    *,
    alpha: float | torch.Tensor = 1.0,
    temperature: float = 1.0,
    plausibility: float = 0.0,
    teacher_logit_scale: float = 1.0,
    teacher_softcap: float | None = None,
    vocab_size: int | None = None,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The top ``k`` of the (contrastive) teacher's ``log_softmax(z_hat / temperature)``, from logits.

    Args:
        teacher_logits: ``[..., V_t]`` logits of the positive (audio-aware) path, any float dtype.
        k: slots per token, ``1 <= k <= vocab_size``.
        teacher_negative_logits: ``[..., V_t]`` of the negative (text-only) path, or ``None``.
        alpha, temperature, plausibility, teacher_logit_scale, teacher_softcap: as in
            ``contrastive_kd_loss`` (``alpha`` a float or a tensor of the leading shape).
        vocab_size: the student's vocabulary ``V <= V_t``; teacher columns past it are dropped
            before the softmax, as the losses do. Default: ``V_t``.
        chunk_rows: rows per chunk (default: about 4M logits per chunk).

    Returns:
        ``(indices, logprobs)``: int64 and float32 ``[..., k]`` (module docstring).
    """
    if not isinstance(teacher_logits, torch.Tensor) or not teacher_logits.is_floating_point():
        raise TypeError("teacher_logits must be a floating-point torch.Tensor [..., V]")
    if teacher_logits.dim() < 1:
        raise ValueError("teacher_logits must be [..., V], got a scalar")
    if teacher_negative_logits is not None and (
            not isinstance(teacher_negative_logits, torch.Tensor)
            or teacher_negative_logits.shape != teacher_logits.shape
            or teacher_negative_logits.device != teacher_logits.device):
        raise ValueError(f"teacher_negative_logits must be a tensor of the shape of teacher_logits "
                         f"{tuple(teacher_logits.shape)} on {teacher_logits.device}")
    opts = _options(alpha, temperature, plausibility, teacher_logit_scale, teacher_softcap)
    vocab = _check_vocab(vocab_size, teacher_logits.shape[-1], "teacher_logits")
    _check_k(k, vocab)
    lead = teacher_logits.shape[:-1]
    alpha_rows = _flat_alpha(opts, lead, teacher_logits.device)
    z_pos_all = teacher_logits.reshape(-1, teacher_logits.shape[-1])
    z_neg_all = None if teacher_negative_logits is None else teacher_negative_logits.reshape(z_pos_all.shape)
    rows = z_pos_all.shape[0]
    indices = torch.empty(rows, k, dtype=torch.int64, device=teacher_logits.device)
    logprobs = torch.empty(rows, k, dtype=torch.float32, device=teacher_logits.device)
    step = _chunk_rows(chunk_rows, vocab)
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        z_pos = z_pos_all[start:stop, :vocab].float()
        z_neg = None if z_neg_all is None else z_neg_all[start:stop, :vocab].float()
        alpha_chunk = alpha_rows[start:stop] if isinstance(alpha_rows, torch.Tensor) else alpha_rows
        indices[start:stop], logprobs[start:stop] = _topk_of_chunk(z_pos, z_neg, alpha_chunk, opts, k)
    return indices.reshape(*lead, k), logprobs.reshape(*lead, k)


@torch.no_grad()
def fused_linear_teacher_topk_logprobs(
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    k: int,
    teacher_negative_hidden: torch.Tensor | None = None,
    *,
    teacher_bias: torch.Tensor | None = None,
    alpha: float | torch.Tensor = 1.0,
    temperature: float = 1.0,
    plausibility: float = 0.0,
    teacher_logit_scale: float = 1.0,
    teacher_softcap: float | None = None,
    vocab_size: int | None = None,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`teacher_topk_logprobs` of ``teacher_hidden @ teacher_weight.T + teacher_bias``, chunk by chunk.

    Args:
        teacher_hidden: ``[..., H]`` final hidden states of the positive path.
        teacher_weight: ``[V_t, H]`` ``lm_head`` weight (its rows past ``vocab_size`` are never used);
            each chunk's GEMM runs in the weight's dtype (the hidden states are cast to it) and is
            read back in float32.
        teacher_negative_hidden: ``[..., H]`` of the negative path, or ``None``.
        teacher_bias: optional ``[V_t]``.
        The rest: as in :func:`teacher_topk_logprobs`.
    """
    for name, tensor in (("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight)):
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise TypeError(f"{name} must be a floating-point torch.Tensor")
    if teacher_weight.dim() != 2 or teacher_hidden.dim() < 1 or teacher_hidden.shape[-1] != teacher_weight.shape[1]:
        raise ValueError(f"teacher_weight must be [V, H] and teacher_hidden [..., H] with the same H, got "
                         f"{tuple(teacher_weight.shape)} and {tuple(teacher_hidden.shape)}")
    negative = teacher_negative_hidden
    if negative is not None and (not isinstance(negative, torch.Tensor) or negative.shape != teacher_hidden.shape):
        raise ValueError(f"teacher_negative_hidden must have the shape of teacher_hidden {tuple(teacher_hidden.shape)}")
    if teacher_bias is not None and (not isinstance(teacher_bias, torch.Tensor)
                                     or teacher_bias.shape != (teacher_weight.shape[0],)):
        raise ValueError(f"teacher_bias must be a tensor of shape ({teacher_weight.shape[0]},)")
    for name, tensor in (("teacher_weight", teacher_weight), ("teacher_negative_hidden", teacher_negative_hidden),
                         ("teacher_bias", teacher_bias)):
        if tensor is not None and tensor.device != teacher_hidden.device:
            raise ValueError(f"{name} must be on {teacher_hidden.device} like teacher_hidden, got {tensor.device}")
    opts = _options(alpha, temperature, plausibility, teacher_logit_scale, teacher_softcap)
    vocab = _check_vocab(vocab_size, teacher_weight.shape[0], "teacher_weight")
    _check_k(k, vocab)
    lead = teacher_hidden.shape[:-1]
    alpha_rows = _flat_alpha(opts, lead, teacher_hidden.device)
    weight = teacher_weight[:vocab]
    bias = None if teacher_bias is None else teacher_bias[:vocab].to(weight.dtype)
    h_pos_all = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    h_neg_all = None if teacher_negative_hidden is None else teacher_negative_hidden.reshape(h_pos_all.shape)
    rows = h_pos_all.shape[0]
    indices = torch.empty(rows, k, dtype=torch.int64, device=teacher_hidden.device)
    logprobs = torch.empty(rows, k, dtype=torch.float32, device=teacher_hidden.device)

    def logits(h: torch.Tensor) -> torch.Tensor:
        h = h.to(weight.dtype)
        out = h @ weight.T if bias is None else torch.addmm(bias, h, weight.T)
        return out.float()

    step = _chunk_rows(chunk_rows, vocab)
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        z_pos = logits(h_pos_all[start:stop])
        z_neg = None if h_neg_all is None else logits(h_neg_all[start:stop])
        alpha_chunk = alpha_rows[start:stop] if isinstance(alpha_rows, torch.Tensor) else alpha_rows
        indices[start:stop], logprobs[start:stop] = _topk_of_chunk(z_pos, z_neg, alpha_chunk, opts, k)
    return indices.reshape(*lead, k), logprobs.reshape(*lead, k)
