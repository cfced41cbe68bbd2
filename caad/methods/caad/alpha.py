"""Alpha beyond a constant: schedules over training and a per-token adaptive alpha.

The CAAD paper names its sensitivity to ``alpha`` as a limitation and an adaptive alpha as future
work. Two extensions, both feeding the fused loss's ``alpha`` (a float, or a per-row tensor that
``caad_kernels`` accepts on every backend):

**Schedules** (:func:`scheduled_alpha`), a float per optimizer step, from ``alpha_start`` to
``alpha`` (the configured value):

- ``constant``: ``alpha`` at every step (the paper);
- ``warmup``: a linear ramp from ``alpha_start`` to ``alpha`` over the first ``warmup_steps`` optimizer
  steps, then ``alpha`` (plain KD first, the contrast once the student has learnt the basics);
- ``cosine``: a half-cosine from ``alpha_start`` at step 0 to ``alpha`` at the last step (with
  ``alpha_start > alpha`` it decays).

**Adaptive alpha** (:func:`adaptive_alpha`), one value per target token: the contrast is spent where
the audio changes the teacher's prediction. Per row ``i`` the Jensen-Shannon divergence between the
teacher's positive and negative next-token distributions (nats, in ``[0, ln 2]``)::

    js_i = 0.5 KL(p_i || m_i) + 0.5 KL(n_i || m_i),  m_i = (p_i + n_i) / 2,
    p_i = softmax(z_pos_i / tau),  n_i = softmax(z_neg_i / tau)

and then ``alpha_i = clip(scale * js_i, 0, alpha_max)`` (``normalize="none"``), or
``alpha_i = clip(alpha * js_i / mean_j(js_j), 0, alpha_max)`` (``normalize="mean"``: the same mean
contrast as the constant ``alpha`` before clipping, redistributed over the tokens by how much the
audio matters there; rows of a batch whose JS is all 0 get ``alpha``). A token the audio does not
change (``js_i = 0``) is distilled as plain KD.

Memory: :func:`js_rows` never builds a ``[N x V]`` tensor. It takes the teacher's final hidden states
of both paths (``[N, H]``, what the fused loss takes) and the ``lm_head`` weight, and computes the
logits ``chunk_rows`` rows at a time: at most ``chunk_rows x V`` logits per path are alive, like the
fused-linear loss. The price is compute: the teacher's two ``lm_head`` GEMMs run once more (``2 N V H``
multiply-adds, the same as the loss's own teacher GEMMs); the fused kernels do not return per-row
teacher statistics, so the JS cannot ride along with the loss's chunk loop today. Everything is
under ``no_grad`` (alpha is a function of the teacher only: no gradient flows into it).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

__all__ = [
    "ALPHA_SCHEDULES",
    "ADAPTIVE_NORMALIZATIONS",
    "adaptive_alpha",
    "alpha_from_js",
    "js_rows",
    "scheduled_alpha",
]

ALPHA_SCHEDULES: tuple[str, ...] = ("constant", "warmup", "cosine")
ADAPTIVE_NORMALIZATIONS: tuple[str, ...] = ("none", "mean")
#: Default rows per chunk of :func:`js_rows` (at most this many x V logits per path at once).
DEFAULT_CHUNK_ROWS = 1024


def _check_number(value: object, name: str, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < minimum:
        raise ValueError(f"{name} must be a finite number >= {minimum:g}, got {value!r}")
    return float(value)


def _check_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def scheduled_alpha(
    alpha: float,
    step: int,
    total_steps: int,
    schedule: str = "constant",
    *,
    warmup_steps: int = 0,
    alpha_start: float = 0.0,
) -> float:
    """The alpha of optimizer step ``step`` (0-based) of ``total_steps`` under ``schedule`` (module docstring).

    Args:
        alpha: the target alpha (``>= 0``): every step's under ``constant``, the end value otherwise.
        step: the 0-based optimizer step, ``0 <= step < total_steps`` (later steps get the end value).
        total_steps: optimizer steps of the run (``>= 1``).
        schedule: one of :data:`ALPHA_SCHEDULES`.
        warmup_steps: ``warmup``: steps of the linear ramp (``>= 1``); ignored by the others.
        alpha_start: the value at step 0 of ``warmup`` and ``cosine`` (``>= 0``).

    Returns:
        A Python float ``>= 0``.
    """
    alpha = _check_number(alpha, "alpha")
    alpha_start = _check_number(alpha_start, "alpha_start")
    step = _check_int(step, "step", 0)
    total_steps = _check_int(total_steps, "total_steps", 1)
    if schedule not in ALPHA_SCHEDULES:
        raise ValueError(f"schedule must be one of {ALPHA_SCHEDULES}, got {schedule!r}")
    if schedule == "constant":
        return alpha
    if schedule == "warmup":
        warmup_steps = _check_int(warmup_steps, "warmup_steps", 1)
        if step >= warmup_steps:
            return alpha
        return alpha_start + (alpha - alpha_start) * step / warmup_steps
    if total_steps == 1 or step >= total_steps - 1:
        return alpha
    progress = step / (total_steps - 1)
    return alpha_start + (alpha - alpha_start) * 0.5 * (1.0 - math.cos(math.pi * progress))


def _logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    vocab: int,
    logit_scale: float,
    softcap: float | None,
) -> torch.Tensor:
    z = hidden.float() @ weight[:vocab].float().T
    if bias is not None:
        z = z + bias[:vocab].float()
    if logit_scale != 1.0:
        z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def _plogp_ratio(log_a: torch.Tensor, log_m: torch.Tensor) -> torch.Tensor:
    """``sum_v a_v (log a_v - log m_v)`` per row, with ``0 log 0 = 0`` (never ``0 * (-inf)``)."""
    zero = torch.zeros((), dtype=log_a.dtype, device=log_a.device)
    return torch.where(log_a > -math.inf, log_a.exp() * (log_a - log_m), zero).sum(-1)


@torch.no_grad()
def js_rows(
    positive_hidden: torch.Tensor,
    negative_hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    vocab_size: int | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> torch.Tensor:
    """Per-row Jensen-Shannon divergence between the teacher's positive and negative paths.

    Args:
        positive_hidden, negative_hidden: ``[N, H]`` final hidden states of the teacher on the two
            paths at the same target rows (any float dtype; computed in float32).
        weight: ``[V_t, H]`` the teacher's ``lm_head`` weight; bias: optional ``[V_t]``.
        vocab_size: use only the first ``vocab_size`` columns (the student's vocabulary, as the loss
            does); default all ``V_t``.
        temperature: ``tau > 0``: the distributions are ``softmax(z / tau)`` (the loss's temperature).
        logit_scale, softcap: applied to the logits before the temperature, as the kernels do.
        chunk_rows: rows per chunk: at most ``chunk_rows x V`` logits per path are alive.

    Returns:
        float32 ``[N]`` on the hidden states' device, each in ``[0, ln 2]`` (nats).
    """
    if positive_hidden.dim() != 2 or positive_hidden.shape != negative_hidden.shape:
        raise ValueError(
            "positive_hidden and negative_hidden must both be [N, H] with the same shape, got "
            f"{tuple(positive_hidden.shape)} and {tuple(negative_hidden.shape)}"
        )
    if weight.dim() != 2 or weight.shape[1] != positive_hidden.shape[1]:
        raise ValueError(f"weight must be [V, H={positive_hidden.shape[1]}], got {tuple(weight.shape)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"bias must be [V={weight.shape[0]}], got {tuple(bias.shape)}")
    vocab = weight.shape[0] if vocab_size is None else _check_int(vocab_size, "vocab_size", 1)
    if vocab > weight.shape[0]:
        raise ValueError(f"vocab_size ({vocab}) exceeds the weight's rows ({weight.shape[0]})")
    tau = _check_number(temperature, "temperature")
    if tau == 0:
        raise ValueError("temperature must be > 0, got 0")
    if softcap is not None and _check_number(softcap, "softcap") == 0:
        raise ValueError("softcap must be > 0 (or None), got 0")
    chunk_rows = _check_int(chunk_rows, "chunk_rows", 1)
    rows = positive_hidden.shape[0]
    out = torch.empty(rows, dtype=torch.float32, device=positive_hidden.device)
    log_half = math.log(0.5)
    for start in range(0, rows, chunk_rows):
        stop = min(rows, start + chunk_rows)
        log_p = torch.log_softmax(
            _logits(positive_hidden[start:stop], weight, bias, vocab, logit_scale, softcap) / tau, dim=-1
        )
        log_n = torch.log_softmax(
            _logits(negative_hidden[start:stop], weight, bias, vocab, logit_scale, softcap) / tau, dim=-1
        )
        log_m = torch.logaddexp(log_p, log_n) + log_half
        js = 0.5 * _plogp_ratio(log_p, log_m) + 0.5 * _plogp_ratio(log_n, log_m)
        out[start:stop] = js.clamp(0.0, math.log(2.0))  # rounding only; NaN inputs stay NaN
        del log_p, log_n, log_m, js
    return out


def alpha_from_js(
    js: torch.Tensor,
    alpha_max: float,
    *,
    normalize: Literal["none", "mean"] = "mean",
    alpha: float = 2.0,
    scale: float | None = None,
) -> torch.Tensor:
    """Per-row alpha from per-row JS values (module docstring), clipped to ``[0, alpha_max]``.

    Args:
        js: float ``[N]`` (``>= 0``), e.g. from :func:`js_rows`.
        alpha_max: the upper clip (``>= 0``).
        normalize: ``"mean"``: ``alpha * js / mean(js)``; ``"none"``: ``scale * js``.
        alpha: the mean alpha under ``"mean"``.
        scale: the factor under ``"none"`` (default ``alpha_max / ln 2``: JS at its maximum gives
            ``alpha_max``).

    Returns:
        float32 ``[N]`` on ``js``'s device.
    """
    alpha_max = _check_number(alpha_max, "alpha_max")
    if normalize not in ADAPTIVE_NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {ADAPTIVE_NORMALIZATIONS}, got {normalize!r}")
    if js.dim() != 1:
        raise ValueError(f"js must be [N], got {tuple(js.shape)}")
    js = js.float()
    if normalize == "mean":
        alpha = _check_number(alpha, "alpha")
        mean = js.mean() if js.numel() else js.new_zeros(())
        if float(mean) > 0:
            values = js * (alpha / mean)
        else:
            values = torch.full_like(js, alpha)
    else:
        factor = alpha_max / math.log(2.0) if scale is None else _check_number(scale, "scale")
        values = js * factor
    return values.clamp(0.0, alpha_max)


def adaptive_alpha(
    positive_hidden: torch.Tensor,
    negative_hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    alpha_max: float,
    normalize: Literal["none", "mean"] = "mean",
    alpha: float = 2.0,
    scale: float | None = None,
    vocab_size: int | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> torch.Tensor:
    """The per-row alpha ``[N]`` (float32) for the fused loss: :func:`js_rows` then :func:`alpha_from_js`.

    Pass the same ``temperature`` as the loss so that the JS measures the distributions the student
    is distilled towards (arguments as in those two functions).
    """
    js = js_rows(
        positive_hidden,
        negative_hidden,
        weight,
        bias,
        vocab_size=vocab_size,
        temperature=temperature,
        logit_scale=logit_scale,
        softcap=softcap,
        chunk_rows=chunk_rows,
    )
    return alpha_from_js(js, alpha_max, normalize=normalize, alpha=alpha, scale=scale)
