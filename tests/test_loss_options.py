"""The loss options added for other model families and adaptive alpha, on every backend and both ops.

``student_logit_scale``/``teacher_logit_scale`` (Cohere, Granite), ``student_softcap``/``teacher_softcap``
(Gemma-2), ``mask`` (KD-only masking) and a per-row ``alpha`` tensor, each against the float64
materialising reference of :mod:`caad_kernels.reference` (which applies them literally), fp32 tight
and bf16 loose, plus checks that do not go through the reference at all.
"""

from __future__ import annotations

import pytest
import torch

from caad_kernels import (
    ContrastiveKDLoss,
    FusedLinearContrastiveKDLoss,
    contrastive_kd_loss,
    fused_linear_contrastive_kd_loss,
)
from caad_kernels.backends import load_backend
from caad_kernels.reference import contrastive_kd_loss_reference, fused_linear_contrastive_kd_loss_reference

# the triton interpreter warns about the inf - inf lanes that tl.where then discards
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

BACKENDS = ["torch", "cpp", "triton"]


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    try:
        load_backend(request.param)
    except Exception as error:
        pytest.skip(f"backend {request.param!r} unavailable here: {error}")
    return request.param


def logits_inputs(batch=2, seq=3, vocab=37, teacher_vocab=41, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(batch, seq + 1, vocab, generator=g) * 4).to(dtype)[:, :-1].requires_grad_(True)
    teacher = (torch.randn(batch, seq, teacher_vocab, generator=g) * 4).to(dtype)
    negative = (teacher.float() + torch.randn(batch, seq, teacher_vocab, generator=g) * 2).to(dtype)
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[0, 1] = -100
    mask = torch.ones(batch, seq, dtype=torch.bool)
    mask.view(-1)[[2, -3]] = False
    alpha = torch.rand(batch, seq, generator=g) * 3
    alpha.view(-1)[-2] = 0.0
    return student, teacher, negative, labels, mask, alpha


def compare_logits_op(backend, student, teacher, negative, labels, atol, rtol, grad_atol, **options):
    out = contrastive_kd_loss(student, teacher, negative, labels, backend=backend, **options)
    ref = contrastive_kd_loss_reference(student, teacher, negative, labels, compute_dtype=torch.float64, **options)[0]
    upstream = torch.linspace(0.5, 1.5, out.numel()).reshape(out.shape)
    (grad,) = torch.autograd.grad(out, student, upstream)
    (ref_grad,) = torch.autograd.grad(ref, student, upstream.double())
    assert grad.dtype == student.dtype
    torch.testing.assert_close(out.double(), ref.detach(), atol=atol, rtol=rtol)
    torch.testing.assert_close(grad.double(), ref_grad.double(), atol=grad_atol, rtol=rtol)
    return out, grad


OPTION_CASES = {
    "student_softcap": dict(student_softcap=5.0),
    "teacher_softcap": dict(teacher_softcap=4.0),
    "both_softcaps_and_scales": dict(student_softcap=6.0, teacher_softcap=3.0, student_logit_scale=0.7,
                                     teacher_logit_scale=1.6),
    "scales": dict(student_logit_scale=0.25, teacher_logit_scale=2.0),
    "per_row_alpha": dict(alpha="rows"),
    "per_row_alpha_softcap_cutoff": dict(alpha="rows", teacher_softcap=5.0, plausibility=0.1),
    "mask": dict(mask="rows"),
    "mask_without_labels": dict(mask="rows", labels=None, ce_weight=0.0),
    "everything": dict(alpha="rows", mask="rows", student_softcap=8.0, teacher_softcap=6.0, teacher_logit_scale=0.5),
}


def resolve_case(case, labels, mask, alpha):
    options = dict(OPTION_CASES[case])
    use_labels = options.pop("labels", labels)
    if options.get("alpha") == "rows":
        options["alpha"] = alpha
    if options.get("mask") == "rows":
        options["mask"] = mask
    return use_labels, options


# each case under one divergence (they cycle), the common ones under all three
CASE_BETAS = [(case, beta) for i, case in enumerate(OPTION_CASES) for beta in (
    (0.0, 0.5, 1.0) if case in ("both_softcaps_and_scales", "per_row_alpha") else ((0.0, 0.5, 1.0)[i % 3],))]


@pytest.mark.parametrize("case,beta", CASE_BETAS)
def test_logits_op_options_fp32(backend, case, beta):
    student, teacher, negative, labels, mask, alpha = logits_inputs(seed=len(case))
    use_labels, options = resolve_case(case, labels, mask, alpha)
    if beta == 1.0 and options.get("plausibility"):
        options["plausibility"] = 0.0  # infinite by definition
    options = {"alpha": 2.0, "temperature": 2.0, "kd_weight": 0.7, "ce_weight": 0.3, **options, "beta": beta}
    compare_logits_op(backend, student, teacher, negative, use_labels, 2e-5, 1e-5, 2e-6, **options)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_logits_op_options_reductions(backend, reduction):
    student, teacher, negative, labels, mask, alpha = logits_inputs(seed=3)
    compare_logits_op(backend, student, teacher, negative, labels, 2e-5, 1e-5, 2e-6, alpha=alpha, mask=mask,
                      temperature=1.5, beta=0.5, student_softcap=7.0, teacher_softcap=5.0, ce_weight=0.4,
                      reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_logits_op_options_half_precision(backend, dtype):
    student, teacher, negative, labels, mask, alpha = logits_inputs(vocab=300, teacher_vocab=300, dtype=dtype,
                                                                    seed=4)
    # the reference sees the same rounded inputs: accumulation order and the gradient's rounding differ
    compare_logits_op(backend, student, teacher, negative, labels, 2e-4, 2e-3, 3e-3, alpha=alpha, mask=mask,
                      temperature=2.0, student_softcap=8.0, teacher_softcap=6.0, teacher_logit_scale=0.8,
                      kd_weight=0.7, ce_weight=0.3)


@pytest.mark.parametrize("vocab", [1, 2, 4099])
def test_logits_op_options_odd_vocab(backend, vocab):
    student, teacher, negative, labels, mask, alpha = logits_inputs(batch=1, seq=3, vocab=vocab,
                                                                    teacher_vocab=vocab + 2, seed=5)
    labels = labels.clamp(max=vocab - 1)
    labels[0, 1] = -100
    compare_logits_op(backend, student, teacher, negative, labels, 2e-5, 1e-5, 2e-6, alpha=alpha, mask=mask,
                      temperature=0.7, beta=0.5, student_softcap=3.0, teacher_softcap=2.0, ce_weight=1.0)


def test_transforms_are_what_they_say(backend):
    """Without the reference: a scale equals pre-scaled logits, and a softcap equals pre-capped logits."""
    student, teacher, negative, labels, _, _ = logits_inputs(seed=6)
    options = dict(alpha=2.0, temperature=2.0, ce_weight=0.3, backend=backend)
    scaled = contrastive_kd_loss(student, teacher, negative, labels, teacher_logit_scale=1.7, student_logit_scale=0.6,
                                 **options)
    s2 = (student.detach() * 0.6).requires_grad_(True)
    prescaled = contrastive_kd_loss(s2, teacher * 1.7, negative * 1.7, labels, **options)
    torch.testing.assert_close(scaled, prescaled, rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(scaled, student)
    (grad2,) = torch.autograd.grad(prescaled, s2)
    torch.testing.assert_close(grad, 0.6 * grad2, rtol=1e-5, atol=1e-7)

    capped = contrastive_kd_loss(student, teacher, negative, labels, teacher_softcap=3.0, **options)
    precapped = contrastive_kd_loss(student, 3.0 * torch.tanh(teacher / 3.0), 3.0 * torch.tanh(negative / 3.0),
                                    labels, **options)
    torch.testing.assert_close(capped, precapped, rtol=1e-5, atol=1e-6)


def test_softcap_keeps_masked_tokens_masked(backend):
    """``-inf`` stays ``-inf`` through a softcap: a masked teacher token keeps zero probability."""
    student, teacher, negative, labels, _, _ = logits_inputs(seed=7)
    teacher[..., 3:6] = float("-inf")
    negative[..., 3:6] = float("-inf")
    options = dict(alpha=1.0, temperature=2.0, beta=0.5, teacher_softcap=4.0, student_softcap=5.0, ce_weight=0.3)
    out, grad = compare_logits_op(backend, student, teacher, negative, labels, 2e-5, 1e-5, 2e-6, **options)
    assert torch.isfinite(out) and torch.isfinite(grad).all()


def test_per_row_alpha_constant_equals_scalar_alpha(backend):
    student, teacher, negative, labels, _, _ = logits_inputs(seed=8)
    options = dict(temperature=2.0, beta=0.5, kd_weight=0.7, ce_weight=0.3, backend=backend)
    scalar = contrastive_kd_loss(student, teacher, negative, labels, alpha=1.5, **options)
    rows = contrastive_kd_loss(student, teacher, negative, labels, alpha=torch.full(labels.shape, 1.5), **options)
    torch.testing.assert_close(rows, scalar, rtol=1e-6, atol=1e-7)
    # a row with alpha 0 is plain KD against z_pos for that row
    alpha = torch.zeros(labels.shape)
    plain = contrastive_kd_loss(student, teacher, None, labels, alpha=0.0, **options)
    torch.testing.assert_close(contrastive_kd_loss(student, teacher, negative, labels, alpha=alpha, **options), plain,
                               rtol=1e-6, atol=1e-7)


def test_mask_drops_rows_like_ignore_index(backend):
    student, teacher, negative, labels, mask, _ = logits_inputs(seed=9)
    options = dict(alpha=2.0, temperature=2.0, kd_weight=0.7, ce_weight=0.3, backend=backend)
    masked = contrastive_kd_loss(student, teacher, negative, labels, mask=mask, **options)
    as_labels = contrastive_kd_loss(student, teacher, negative, labels.masked_fill(~mask, -100), **options)
    torch.testing.assert_close(masked, as_labels, rtol=0, atol=0)
    (grad,) = torch.autograd.grad(masked, student)
    assert torch.all(grad[~mask] == 0)
    nothing = contrastive_kd_loss(student, teacher, negative, None, mask=torch.zeros_like(mask), alpha=2.0,
                                  backend=backend)
    (grad,) = torch.autograd.grad(nothing, student)
    assert nothing.item() == 0.0 and torch.all(grad == 0)


def test_modules_take_mask_and_alpha(backend):
    student, teacher, negative, labels, mask, alpha = logits_inputs(seed=10)
    module = ContrastiveKDLoss(alpha=2.0, temperature=2.0, ce_weight=0.3, student_softcap=5.0, backend=backend)
    got = module(student, teacher, negative, labels, mask=mask, alpha=alpha)
    want = contrastive_kd_loss(student, teacher, negative, labels, mask=mask, alpha=alpha, temperature=2.0,
                               ce_weight=0.3, student_softcap=5.0, backend=backend)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert "student_softcap=5.0" in repr(module)


# ---------------------------------------------------------------------------------------------
# the fused-linear op


def fused_inputs(lead=(2, 11), hidden_s=16, hidden_t=24, vocab=53, teacher_vocab=60, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    inputs = dict(
        student_hidden=rand(*lead, hidden_s).requires_grad_(True),
        student_weight=rand(vocab, hidden_s, scale=0.5).requires_grad_(True),
        teacher_hidden=rand(*lead, hidden_t),
        teacher_weight=rand(teacher_vocab, hidden_t, scale=0.5),
        teacher_negative_hidden=rand(*lead, hidden_t),
        labels=torch.randint(0, vocab, lead, generator=g),
        student_bias=rand(vocab).requires_grad_(True),
        teacher_bias=rand(teacher_vocab),
    )
    inputs["labels"].view(-1)[:2] = -100
    mask = torch.rand(lead, generator=g) > 0.3
    alpha = torch.rand(lead, generator=g) * 3
    return inputs, mask, alpha


def student_params(inputs):
    return [inputs["student_hidden"], inputs["student_weight"], inputs["student_bias"]]


def compare_fused(backend, inputs, atol, rtol, grad_atol, **options):
    out = fused_linear_contrastive_kd_loss(**inputs, backend=backend, **options)
    ref_options = {k: v for k, v in options.items() if k not in ("chunk_size", "accum_dtype")}
    ref = fused_linear_contrastive_kd_loss_reference(**inputs, compute_dtype=torch.float64, **ref_options)[0]
    upstream = torch.linspace(0.5, 1.5, out.numel()).reshape(out.shape)
    grads = torch.autograd.grad(out, student_params(inputs), upstream)
    ref_grads = torch.autograd.grad(ref, student_params(inputs), upstream.double())
    torch.testing.assert_close(out.double(), ref.detach(), atol=atol, rtol=rtol)
    for grad, ref_grad in zip(grads, ref_grads):
        assert grad.dtype == inputs["student_hidden"].dtype
        torch.testing.assert_close(grad.double(), ref_grad.double(), atol=grad_atol, rtol=rtol)


FUSED_CASES = {
    # one teacher GEMM (no cutoff, no teacher softcap), per-row alpha, student transforms
    "one_gemm_per_row_alpha": dict(alpha="rows", student_softcap=4.0, student_logit_scale=0.8,
                                   teacher_logit_scale=1.3),
    # two teacher paths (the teacher softcap is not linear), per-row alpha, mask
    "two_paths_teacher_softcap": dict(alpha="rows", mask="rows", teacher_softcap=3.0, beta=0.5),
    "cutoff_mask_no_labels": dict(mask="rows", labels=None, ce_weight=0.0, plausibility=0.1, alpha=1.0),
    "reverse_kl_everything": dict(alpha="rows", mask="rows", beta=1.0, student_softcap=5.0, teacher_softcap=4.0,
                                  reduction="sum"),
    "reduction_none": dict(alpha="rows", mask="rows", student_softcap=5.0, reduction="none"),
}


@pytest.mark.parametrize("case", list(FUSED_CASES))
def test_fused_op_options_fp32(backend, case):
    inputs, mask, alpha = fused_inputs(seed=len(case))
    options = dict(FUSED_CASES[case])
    if "labels" in options:
        inputs["labels"] = options.pop("labels")
    if options.get("alpha") == "rows":
        options["alpha"] = alpha
    if options.get("mask") == "rows":
        options["mask"] = mask
    options = {"temperature": 2.0, "kd_weight": 0.7, "ce_weight": 0.3, "alpha": 2.0, **options}
    compare_fused(backend, inputs, 2e-5, 1e-4, 2e-5, chunk_size=8, **options)


def test_fused_op_options_bf16(backend):
    inputs, mask, alpha = fused_inputs(lead=(40,), hidden_s=32, hidden_t=32, vocab=300, teacher_vocab=300,
                                       dtype=torch.bfloat16, seed=3)
    # bf16 GEMMs against float64 ones: loose, as for the plain op
    compare_fused(backend, inputs, 3e-2, 3e-2, 3e-3, chunk_size=16, alpha=alpha, mask=mask, temperature=2.0,
                  kd_weight=0.7, ce_weight=0.3, student_softcap=10.0, teacher_logit_scale=0.9)


def test_fused_module_takes_mask_and_alpha():
    inputs, mask, alpha = fused_inputs(seed=4)
    module = FusedLinearContrastiveKDLoss(alpha=2.0, temperature=2.0, ce_weight=0.3, teacher_softcap=4.0,
                                          chunk_size=8)
    got = module(**inputs, mask=mask, alpha=alpha)
    want = fused_linear_contrastive_kd_loss(**inputs, mask=mask, alpha=alpha, temperature=2.0, ce_weight=0.3,
                                            teacher_softcap=4.0, chunk_size=8)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize(
    "overrides,error,match",
    [
        (dict(mask=torch.ones(2, 3)), TypeError, "mask must be a bool tensor"),
        (dict(mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, "mask must have the leading shape"),
        (dict(alpha=torch.ones(6)), ValueError, "alpha as a tensor must have the leading shape"),
        (dict(alpha=torch.ones(2, 3, dtype=torch.long)), TypeError, "alpha as a tensor must be floating"),
        (dict(alpha=torch.tensor([[1.0, 1.0, 1.0], [-0.5, 1.0, 1.0]])), ValueError, "finite values >= 0"),
        (dict(alpha=torch.tensor([[1.0, 1.0, 1.0], [float("nan"), 1.0, 1.0]])), ValueError, "finite values >= 0"),
        (dict(student_logit_scale=0.0), ValueError, "student_logit_scale must be > 0"),
        (dict(teacher_logit_scale=float("inf")), ValueError, "teacher_logit_scale must be finite"),
        (dict(student_softcap=-1.0), ValueError, "student_softcap must be None"),
        (dict(teacher_softcap="3"), TypeError, "teacher_softcap must be a real number"),
    ],
)
def test_option_errors_name_the_argument(overrides, error, match):
    student, teacher, negative, labels, _, _ = logits_inputs(seed=11)
    with pytest.raises(error, match=match):
        contrastive_kd_loss(student, teacher, negative, labels, backend="torch", **overrides)
    inputs, _, _ = fused_inputs(lead=(2, 3), seed=11)
    with pytest.raises(error, match=match):
        fused_linear_contrastive_kd_loss(**inputs, **overrides)


def test_float64_gradcheck_with_the_new_options():
    """The torch backend in float64 against finite differences, through softcaps, scales, mask and per-row alpha."""
    g = torch.Generator().manual_seed(12)
    student = torch.randn(2, 3, 11, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 3, 13, generator=g, dtype=torch.float64)
    negative = torch.randn(2, 3, 13, generator=g, dtype=torch.float64)
    labels = torch.tensor([[1, -100, 3], [4, 5, 10]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    alpha = torch.rand(2, 3, generator=g, dtype=torch.float64) * 2

    def fn(s):
        return contrastive_kd_loss(s, teacher, negative, labels, alpha=alpha, mask=mask, temperature=1.7, beta=0.5,
                                   kd_weight=0.7, ce_weight=0.3, reduction="none", backend="torch",
                                   student_softcap=2.5, student_logit_scale=1.3, teacher_softcap=3.0)

    assert torch.autograd.gradcheck(fn, (student,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("reduction,plausibility", [("mean", 0.0), ("none", 0.2)])
def test_fused_float64_gradcheck(reduction, plausibility):
    """The fused op's gradient plumbing (compaction, one teacher GEMM or two paths, per-row alpha, the student's
    softcap, the forward-computed or recomputed gradients) against finite differences, in float64."""
    g = torch.Generator().manual_seed(13)
    h_s = torch.randn(2, 4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w_s = (torch.randn(7, 3, generator=g, dtype=torch.float64) * 0.5).requires_grad_(True)
    b_s = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)
    h_t, h_n = (torch.randn(2, 4, 5, generator=g, dtype=torch.float64) for _ in range(2))
    w_t = torch.randn(9, 5, generator=g, dtype=torch.float64) * 0.5
    labels = torch.tensor([[1, -100, 3, 4], [5, 6, 0, 2]])
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    alpha = torch.rand(2, 4, generator=g, dtype=torch.float64) * 2

    def fn(hidden, weight, bias):
        return fused_linear_contrastive_kd_loss(
            hidden, weight, h_t, w_t, h_n, labels, student_bias=bias, alpha=alpha, mask=mask, temperature=1.5,
            beta=0.5, plausibility=plausibility, kd_weight=0.7, ce_weight=0.3, reduction=reduction,
            student_softcap=3.0, chunk_size=3, backend="torch")

    assert torch.autograd.gradcheck(fn, (h_s, w_s, b_s), eps=1e-6, atol=1e-7)
