"""A sparse top-k teacher in both ops, against the float64 reference of its tail-bucket convention and,
with ``k = V``, against the dense loss itself."""

from __future__ import annotations

import pytest
import torch

from caad_kernels import contrastive_kd_loss, fused_linear_contrastive_kd_loss
from caad_kernels import fused_linear as fused_module
from caad_kernels.reference import (
    contrastive_kd_loss_reference,
    contrastive_teacher_logits,
    fused_linear_topk_kd_loss_reference,
    softcap,
    topk_kd_loss_reference,
)
from caad_kernels.topk import TAIL_FLOOR
from caad_kernels.topk_offline import fused_linear_teacher_topk_logprobs, teacher_topk_logprobs

VOCAB = 29


def teacher_topk(logits: torch.Tensor, k: int, temperature: float, seed: int, pad: int = 0):
    """The top ``k`` of ``log_softmax(logits / tau)`` in a shuffled slot order, plus ``pad`` empty (-inf) slots."""
    g = torch.Generator().manual_seed(seed)
    logprobs = torch.log_softmax(logits.double() / temperature, dim=-1)
    values, indices = logprobs.topk(k, dim=-1)
    order = torch.argsort(torch.rand(values.shape, generator=g), dim=-1)
    values, indices = values.gather(-1, order), indices.gather(-1, order)
    if pad:
        values = torch.cat([values, torch.full((*values.shape[:-1], pad), float("-inf"), dtype=values.dtype)], -1)
        indices = torch.cat([indices, torch.full((*indices.shape[:-1], pad), -1)], -1)  # never read
    return indices, values.float()


def logits_case(seed: int, k: int, temperature: float, pad: int = 0):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(2, 6, VOCAB, generator=g) * 2).requires_grad_(True)
    teacher = torch.randn(2, 6, VOCAB, generator=g) * 3
    labels = torch.randint(0, VOCAB, (2, 6), generator=g)
    labels[0, 2] = -100
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4] = False
    return student, teacher, labels, mask, teacher_topk(teacher, k, temperature, seed, pad)


def assert_matches(out, ref, grads, ref_grads):
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad.double(), ref_grad.double(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("k,pad", [(5, 0), (5, 2), (VOCAB, 0)])
def test_logits_op_topk_matches_reference(beta, k, pad):
    student, _, labels, mask, (indices, logprobs) = logits_case(seed=k + pad, k=k, temperature=2.0, pad=pad)
    options = dict(temperature=2.0, beta=beta, kd_weight=0.7, ce_weight=0.3, mask=mask)
    out = contrastive_kd_loss(student, None, None, labels, teacher_topk_indices=indices,
                              teacher_topk_logprobs=logprobs, **options)
    ref = topk_kd_loss_reference(student, indices, logprobs, labels, **options)[0]
    assert torch.isfinite(out)
    assert_matches(out, ref, torch.autograd.grad(out, student), torch.autograd.grad(ref, student))


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_fused_op_topk_matches_reference_without_a_teacher_gemm(beta, monkeypatch):
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 6, 12, generator=g).requires_grad_(True)
    weight = (torch.randn(VOCAB, 12, generator=g) * 0.5).requires_grad_(True)
    bias = torch.randn(VOCAB, generator=g).requires_grad_(True)
    labels = torch.randint(0, VOCAB, (2, 6), generator=g)
    labels[0, :2] = -100
    indices, logprobs = teacher_topk(torch.randn(2, 6, VOCAB, generator=g) * 3, 7, 2.0, seed=3, pad=1)
    gemm_rows = []
    original = fused_module._linear_into
    monkeypatch.setattr(fused_module, "_linear_into",
                        lambda h, w, b: (gemm_rows.append(h.shape[0]), original(h, w, b))[1])
    options = dict(temperature=2.0, beta=beta, kd_weight=0.7, ce_weight=0.3, student_logit_scale=0.8,
                   student_softcap=5.0, num_items_in_batch=torch.tensor(13))
    out = fused_linear_contrastive_kd_loss(hidden, weight, None, None, None, labels, student_bias=bias, chunk_size=4,
                                           teacher_topk_indices=indices, teacher_topk_logprobs=logprobs, **options)
    assert sum(gemm_rows) == 10  # the 10 valid rows, student GEMMs only
    ref = fused_linear_topk_kd_loss_reference(hidden, weight, indices, logprobs, labels, student_bias=bias,
                                              **options)[0]
    params = (hidden, weight, bias)
    assert_matches(out, ref, torch.autograd.grad(out, params), torch.autograd.grad(ref, params))


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_all_v_slots_is_the_dense_loss(beta):
    """``k = V`` (shuffled slots): the tail is empty and the loss is the dense one, in both ops."""
    student, teacher, labels, mask, (indices, logprobs) = logits_case(seed=5, k=VOCAB, temperature=2.0)
    options = dict(temperature=2.0, beta=beta, ce_weight=0.3, mask=mask)
    topk = contrastive_kd_loss(student, None, None, labels, teacher_topk_indices=indices,
                               teacher_topk_logprobs=logprobs, **options)
    dense = contrastive_kd_loss_reference(student, teacher, None, labels, compute_dtype=torch.float64, **options)[0]
    assert_matches(topk, dense, torch.autograd.grad(topk, student), torch.autograd.grad(dense, student))


def test_reverse_kl_is_finite_when_the_top_k_carry_all_the_mass():
    """Before: a teacher filled with -inf outside its top k gave inf at beta=1. With the top-k input the tail mass
    is floored at TAIL_FLOOR: a large, finite value (the reference's, floor included)."""
    student, teacher, labels, _, _ = logits_case(seed=6, k=4, temperature=1.0)
    filled = teacher.clone()
    top = teacher.topk(4, dim=-1).indices
    filled[torch.ones_like(filled, dtype=torch.bool).scatter(-1, top, False)] = float("-inf")
    dense = contrastive_kd_loss(student, filled, None, labels, beta=1.0)
    assert torch.isinf(dense)  # the dense -inf fill: infinite by definition
    indices, logprobs = teacher_topk(filled, 4, 1.0, seed=6)  # their probabilities sum to 1
    out = contrastive_kd_loss(student, None, None, labels, beta=1.0, teacher_topk_indices=indices,
                              teacher_topk_logprobs=logprobs)
    ref = topk_kd_loss_reference(student, indices, logprobs, labels, beta=1.0, tail_floor=TAIL_FLOOR)[0]
    assert torch.isfinite(out) and float(out.detach()) > 1.0
    assert_matches(out, ref, torch.autograd.grad(out, student), torch.autograd.grad(ref, student))


@pytest.mark.parametrize(
    "change,match",
    [
        ("index_out_of_range", r"teacher_topk_indices / teacher_topk_logprobs are malformed.*row 0"),
        ("repeated_index", r"teacher_topk_indices / teacher_topk_logprobs are malformed"),
        ("logits_not_logprobs", r"teacher_topk_indices / teacher_topk_logprobs are malformed"),
        ("nan", "teacher_topk_logprobs holds NaN"),
    ],
)
def test_malformed_topk_rows_raise_in_both_ops(change, match):
    student, teacher, labels, _, (indices, logprobs) = logits_case(seed=7, k=5, temperature=1.0)
    indices, logprobs = indices.clone(), logprobs.clone()
    if change == "index_out_of_range":
        indices[0, 0, 1] = VOCAB
    elif change == "repeated_index":
        indices[1, 3, 2] = indices[1, 3, 0]
    elif change == "logits_not_logprobs":
        logprobs = teacher.topk(5, dim=-1).values  # raw logits: their exponentials sum far past 1
    else:
        logprobs[1, 1, 0] = float("nan")
    topk = dict(teacher_topk_indices=indices, teacher_topk_logprobs=logprobs)
    with pytest.raises(ValueError, match=match):
        contrastive_kd_loss(student, None, None, labels, **topk)
    hidden, weight = torch.randn(2, 6, 8), torch.randn(VOCAB, 8)
    with pytest.raises(ValueError, match=match):
        fused_linear_contrastive_kd_loss(hidden, weight, None, None, None, labels, check_finite=change == "nan", **topk)


@pytest.mark.parametrize(
    "options,match",
    [
        (dict(teacher_negative_logits=torch.zeros(2, 6, VOCAB)), "compute the contrastive teacher's top-k offline"),
        (dict(plausibility=0.1), "apply the cutoff before taking the top k"),
        (dict(teacher_softcap=30.0), "teacher_logit_scale / teacher_softcap apply to teacher logits"),
        (dict(teacher_logits=torch.zeros(2, 6, VOCAB)), "not both"),
        (dict(teacher_topk_logprobs=None), "must be given together"),
        (dict(teacher_topk_indices=torch.zeros(2, 6, 4, dtype=torch.long)), "same shape"),
        (dict(teacher_topk_indices=torch.zeros(2, 6, 5)), "must be an integer tensor"),
    ],
)
def test_topk_combinations_that_are_refused(options, match):
    student, _, labels, _, (indices, logprobs) = logits_case(seed=8, k=5, temperature=1.0)
    arguments = dict(teacher_logits=None, teacher_negative_logits=None, teacher_topk_indices=indices,
                     teacher_topk_logprobs=logprobs)
    arguments.update(options)
    with pytest.raises((ValueError, TypeError), match=match):
        contrastive_kd_loss(student, labels=labels, **arguments)


# ---------------------------------------------------------------------------------------------
# the teacher's side: writing the top k offline (caad_kernels.topk_offline)

OFFLINE = dict(alpha=2.0, temperature=2.0, plausibility=0.05, teacher_logit_scale=0.8, teacher_softcap=6.0)


def reference_teacher_logprobs(z_pos, z_neg, vocab, *, alpha, temperature, plausibility, teacher_logit_scale,
                               teacher_softcap):
    """float64 ``log_softmax(z_hat / tau)`` of the reference's contrastive teacher (docs/math.md)."""
    def transform(z):
        return None if z is None else softcap(z[..., :vocab].double(), teacher_logit_scale, teacher_softcap)

    alpha = alpha.double() if isinstance(alpha, torch.Tensor) else alpha
    z_hat = contrastive_teacher_logits(transform(z_pos), transform(z_neg), alpha, plausibility)
    return torch.log_softmax(z_hat / temperature, dim=-1)


def offline_case(seed):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(2, 6, VOCAB + 3, generator=g) * 3
    negative = teacher + torch.randn(2, 6, VOCAB + 3, generator=g)
    return teacher, negative


@pytest.mark.parametrize("per_row_alpha", [False, True])
def test_offline_topk_is_the_top_of_the_reference_teacher(per_row_alpha):
    teacher, negative = offline_case(seed=9)
    options = dict(OFFLINE)
    if per_row_alpha:
        options["alpha"] = torch.rand(2, 6, generator=torch.Generator().manual_seed(9)) * 3
    indices, logprobs = teacher_topk_logprobs(teacher, 6, negative, vocab_size=VOCAB, chunk_rows=5, **options)
    assert indices.shape == logprobs.shape == (2, 6, 6)
    assert indices.dtype == torch.int64 and logprobs.dtype == torch.float32
    ref = reference_teacher_logprobs(teacher, negative, VOCAB, **options)
    torch.testing.assert_close(logprobs.double(), ref.topk(6, dim=-1).values, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ref.gather(-1, indices), logprobs.double(), rtol=1e-5, atol=1e-5)
    assert (logprobs == float("-inf")).any()  # the cutoff leaves some rows with fewer than 6 tokens: empty slots
    assert bool((indices < VOCAB).all())


@pytest.mark.parametrize("beta,plausibility", [(0.0, 0.05), (0.5, 0.05), (1.0, 0.0)])
def test_offline_topk_with_every_slot_trains_like_the_dense_teacher(beta, plausibility):
    """Written offline with ``k = V`` and used by the loss, the contrastive teacher is the dense one (cut tokens
    are empty slots; their tail mass is floored at TAIL_FLOOR, a difference below 1e-4)."""
    teacher, negative = offline_case(seed=10)
    student, _, labels, mask, _ = logits_case(seed=10, k=3, temperature=2.0)
    options = dict(OFFLINE, plausibility=plausibility)
    indices, logprobs = teacher_topk_logprobs(teacher, VOCAB, negative, vocab_size=VOCAB, **options)
    loss_options = dict(temperature=2.0, beta=beta, ce_weight=0.3, mask=mask)
    out = contrastive_kd_loss(student, None, None, labels, teacher_topk_indices=indices,
                              teacher_topk_logprobs=logprobs, **loss_options)
    dense = contrastive_kd_loss_reference(student, teacher, negative, labels, compute_dtype=torch.float64,
                                          **dict(options, **loss_options))[0]
    torch.testing.assert_close(out.double(), dense.detach(), rtol=1e-4, atol=1e-4)
    (grad,), (dense_grad,) = torch.autograd.grad(out, student), torch.autograd.grad(dense, student)
    torch.testing.assert_close(grad.double(), dense_grad.double(), rtol=1e-3, atol=1e-5)


def test_fused_offline_topk_equals_the_logits_form():
    g = torch.Generator().manual_seed(11)
    hidden, negative = torch.randn(3, 5, 8, generator=g), torch.randn(3, 5, 8, generator=g)
    weight, bias = torch.randn(VOCAB + 3, 8, generator=g), torch.randn(VOCAB + 3, generator=g)
    fused = fused_linear_teacher_topk_logprobs(hidden, weight, 7, negative, teacher_bias=bias, vocab_size=VOCAB,
                                               chunk_rows=4, **OFFLINE)
    ref = reference_teacher_logprobs(hidden.double() @ weight.double().T + bias.double(),
                                     negative.double() @ weight.double().T + bias.double(), VOCAB, **OFFLINE)
    torch.testing.assert_close(fused[1].double(), ref.topk(7, dim=-1).values, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ref.gather(-1, fused[0]), fused[1].double(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(k=0), ValueError, r"k must be an int in \[1, 29\]"),
        (dict(k=VOCAB + 1), ValueError, r"k must be an int in \[1, 29\]"),
        (dict(vocab_size=VOCAB + 4), ValueError, "vocab_size must be an int in"),
        (dict(plausibility=1.5), ValueError, "plausibility must be in"),
        (dict(teacher_negative_logits=torch.zeros(2, 6, 5)), ValueError, "teacher_negative_logits must be"),
        (dict(teacher_logits=torch.zeros(2, 6, VOCAB + 3, dtype=torch.long)), TypeError, "floating-point"),
    ],
)
def test_offline_topk_bad_arguments(change, error, match):
    teacher, negative = offline_case(seed=12)
    arguments = dict(teacher_logits=teacher, k=4, teacher_negative_logits=negative, vocab_size=VOCAB)
    arguments.update(change)
    with pytest.raises(error, match=match):
        teacher_topk_logprobs(**arguments)
