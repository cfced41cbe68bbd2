"""Correctness before speed: every implementation is checked against one reference first.

The reference is the naive materialising loss of :mod:`caad_kernels.reference`, evaluated in
row chunks (``reduction="sum"`` per chunk, divided by the global denominator) so that it fits in
memory at any benchmark shape, in float64 on the CPU and float32 on CUDA. An implementation
agrees when its loss and every gradient match the reference within the tolerance of the input
dtype; two implementations that both agree with it agree with each other within twice that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from bench.cases import LossConfig
from bench.inputs import BenchInputs
from caad_kernels.reference import contrastive_kd_loss_reference


@dataclass
class Outcome:
    """A loss and (for ``fwd+bwd``) the gradients by input name."""

    loss: torch.Tensor
    grads: dict[str, torch.Tensor]


@dataclass(frozen=True)
class Tolerance:
    """``|loss - ref| <= loss_rtol * |ref| + loss_atol``; ``||g - g_ref|| <= grad_rtol * ||g_ref||``."""

    loss_rtol: float
    loss_atol: float
    grad_rtol: float


TOLERANCES = {
    torch.float32: Tolerance(1e-4, 1e-6, 1e-4),
    torch.float16: Tolerance(5e-3, 1e-4, 1e-2),
    # bf16 logits (and bf16 GEMM outputs and weight-gradient sums in the fused op) keep 8 bits
    torch.bfloat16: Tolerance(1e-2, 1e-3, 3e-2),
}


class DisagreementError(AssertionError):
    """An implementation's loss or gradients differ from the reference beyond the tolerance."""


def reference_dtype(device: torch.device) -> torch.dtype:
    return torch.float64 if device.type == "cpu" else torch.float32


def reference_chunk_rows(vocab: int, device: torch.device, dtype: torch.dtype) -> int:
    """Rows per reference chunk: about 16 ``[rows x V]`` temporaries within 0.5 GiB (CPU) / 4 GiB (CUDA)."""
    budget = (4 << 30) if device.type == "cuda" else (512 << 20)
    per_row = 16 * vocab * torch.finfo(dtype).bits // 8
    return max(1, budget // per_row)


def reference_outcome(op: str, config: LossConfig, inputs: BenchInputs) -> Outcome:
    """The reference loss and student gradients, computed chunk by chunk."""
    leaves = inputs.grad_leaves()
    device = next(iter(leaves.values())).device
    dtype = reference_dtype(device)
    labels = inputs.labels
    rows = inputs.student.shape[0] if op == "logits" else inputs.hidden_s.shape[0]
    vocab = inputs.student.shape[-1] if op == "logits" else inputs.weight_s.shape[0]
    valid = rows if labels is None else int((labels != config.options()["ignore_index"]).sum())
    denominator = float(max(valid, 1))
    options = dict(config.options(), reduction="sum")
    chunk = reference_chunk_rows(vocab, device, dtype)

    weight_s = weight_t = grad_w = None
    if op == "fused":
        weight_s = inputs.weight_s.detach().to(dtype).requires_grad_(True)
        weight_t = inputs.weight_t.detach()[:vocab].to(dtype)
    total = torch.zeros((), dtype=dtype, device=device)
    grad_rows = []
    for start in range(0, rows, chunk):
        stop = min(start + chunk, rows)
        part_labels = None if labels is None else labels[start:stop]
        if op == "logits":
            student = inputs.student.detach()[start:stop].to(dtype).requires_grad_(True)
            teacher = inputs.teacher[start:stop, :vocab].to(dtype)
            negative = None if inputs.negative is None else inputs.negative[start:stop, :vocab].to(dtype)
            leaf = student
        else:
            leaf = inputs.hidden_s.detach()[start:stop].to(dtype).requires_grad_(True)
            student = leaf @ weight_s.T
            with torch.no_grad():
                teacher = inputs.hidden_t[start:stop].to(dtype) @ weight_t.T
                negative = (
                    None if inputs.hidden_n is None else inputs.hidden_n[start:stop].to(dtype) @ weight_t.T
                )
        loss, _, _ = contrastive_kd_loss_reference(
            student, teacher, negative, part_labels, compute_dtype=dtype, **options
        )
        (loss / denominator).backward()
        total += loss.detach()
        grad_rows.append(leaf.grad)
    if op == "fused":
        grad_w = weight_s.grad
    grads = (
        {"student": torch.cat(grad_rows)}
        if op == "logits"
        else {"hidden_s": torch.cat(grad_rows), "weight_s": grad_w}
    )
    return Outcome(total / denominator, grads)


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """``||value - reference||_2 / ||reference||_2`` in the reference's precision (inf if not finite)."""
    value = value.to(reference.dtype)
    if not torch.isfinite(value).all():
        return math.inf
    norm = torch.linalg.vector_norm(reference).item()
    diff = torch.linalg.vector_norm(value - reference).item()
    return diff / norm if norm > 0 else diff


def check_agreement(outcome: Outcome, reference: Outcome, input_dtype: torch.dtype) -> dict[str, float]:
    """Raise :class:`DisagreementError` unless ``outcome`` matches ``reference``; return the errors."""
    tol = TOLERANCES[input_dtype]
    loss = float(outcome.loss.detach().double().item())
    ref_loss = float(reference.loss.item())
    errors: dict[str, float] = {"loss_abs_error": abs(loss - ref_loss)}
    problems = []
    if not math.isfinite(loss) or abs(loss - ref_loss) > tol.loss_rtol * abs(ref_loss) + tol.loss_atol:
        problems.append(
            f"loss {loss!r} vs reference {ref_loss!r} (rtol {tol.loss_rtol}, atol {tol.loss_atol})"
        )
    for name, grad in outcome.grads.items():
        if grad is None:
            problems.append(f"no gradient for {name}")
            continue
        ref_grad = reference.grads[name]
        if grad.shape != ref_grad.shape:
            problems.append(
                f"gradient of {name} has shape {tuple(grad.shape)}, expected {tuple(ref_grad.shape)}"
            )
            continue
        error = relative_error(grad, ref_grad)
        errors[f"grad_{name}_rel_error"] = error
        if not error <= tol.grad_rtol:
            problems.append(f"gradient of {name}: relative L2 error {error:.3g} > {tol.grad_rtol}")
    if problems:
        raise DisagreementError("disagrees with the chunked reference: " + "; ".join(problems))
    return errors
