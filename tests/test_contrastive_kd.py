"""Every backend of ``contrastive_kd_loss`` against the materialising float64 reference."""

from __future__ import annotations

import itertools

import pytest
import torch

from caad_kernels import ContrastiveKDLoss, contrastive_kd_loss
from caad_kernels.backends import load_backend
from caad_kernels.reference import contrastive_kd_loss_reference

# the triton interpreter warns about the inf - inf lanes that tl.where then discards
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

BACKENDS = ["torch", "triton", "cpp"]


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    try:
        load_backend(request.param)
    except Exception as error:  # triton not installed, or no compiler for the C++ kernels
        pytest.skip(f"backend {request.param!r} unavailable here: {error}")
    return request.param


def make_inputs(
    batch=2, seq=3, vocab=37, teacher_vocab=41, dtype=torch.float32, scale=3.0, seed=0, ignore_index=-100
):
    """Student as a non-contiguous slice ``[:, :-1]`` of a longer sequence, like shifted LM logits."""
    g = torch.Generator().manual_seed(seed)
    student_full = torch.randn(batch, seq + 1, vocab, generator=g) * scale
    student = student_full.to(dtype)[:, :-1].detach().requires_grad_(True)
    teacher = (torch.randn(batch, seq, teacher_vocab, generator=g) * scale).to(dtype)
    negative = (teacher.float() + torch.randn(batch, seq, teacher_vocab, generator=g)).to(dtype)
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[0, 1] = ignore_index
    return student, teacher, negative, labels


def run_both(backend, student, teacher, negative, labels, grad_output=None, ref_dtype=torch.float64, **options):
    """Loss and student gradient from ``backend`` and from the reference."""
    out = contrastive_kd_loss(student, teacher, negative, labels, backend=backend, **options)
    ref = contrastive_kd_loss_reference(student, teacher, negative, labels, compute_dtype=ref_dtype, **options)[0]
    if grad_output is None:
        grad_output = torch.ones_like(out)
    (grad,) = torch.autograd.grad(out, student, grad_output)
    (ref_grad,) = torch.autograd.grad(ref, student, grad_output.to(ref.dtype))
    return out, ref, grad, ref_grad


def assert_close(actual, expected, atol, rtol):
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol)


DIVERGENCE_GRID = [
    (alpha, tau, beta, cutoff)
    for alpha, tau, beta, cutoff in itertools.product([0.0, 1.0, 2.0], [0.5, 1.0, 2.0], [0.0, 0.5, 1.0], [0.0, 0.1])
    if not (beta == 1.0 and cutoff > 0)
]


@pytest.mark.parametrize("alpha,temperature,beta,plausibility", DIVERGENCE_GRID)
def test_matches_reference_over_options(backend, alpha, temperature, beta, plausibility):
    student, teacher, negative, labels = make_inputs()
    options = dict(alpha=alpha, temperature=temperature, beta=beta, plausibility=plausibility,
                   kd_weight=0.7, ce_weight=0.3)
    out, ref, grad, ref_grad = run_both(backend, student, teacher, negative, labels, **options)
    assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert_close(grad, ref_grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("temperature_scaling", [True, False])
def test_reductions_and_grad_output(backend, reduction, temperature_scaling):
    student, teacher, negative, labels = make_inputs(seed=1)
    options = dict(alpha=2.0, temperature=2.0, kd_weight=0.7, ce_weight=0.3, reduction=reduction,
                   temperature_scaling=temperature_scaling)
    grad_output = torch.randn(labels.shape) if reduction == "none" else torch.tensor(0.37)
    out, ref, grad, ref_grad = run_both(backend, student, teacher, negative, labels, grad_output, **options)
    assert out.shape == ref.shape
    assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert_close(grad, ref_grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("num_items", [7, torch.tensor(11.0)])
def test_num_items_in_batch(backend, num_items):
    student, teacher, negative, labels = make_inputs(seed=2)
    options = dict(alpha=1.0, kd_weight=0.5, ce_weight=0.5, num_items_in_batch=num_items)
    out, ref, grad, ref_grad = run_both(backend, student, teacher, negative, labels, **options)
    assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert_close(grad, ref_grad, atol=1e-6, rtol=1e-5)
    # the denominator really is num_items, not the 5 valid rows
    sum_loss = contrastive_kd_loss(student, teacher, negative, labels, backend=backend, alpha=1.0,
                                   kd_weight=0.5, ce_weight=0.5, reduction="sum")
    assert_close(out, sum_loss / float(num_items), atol=1e-6, rtol=1e-6)


def test_components_and_their_gradients(backend):
    student, teacher, negative, labels = make_inputs(seed=3)
    options = dict(alpha=2.0, temperature=2.0, kd_weight=0.7, ce_weight=0.3)
    out = contrastive_kd_loss(student, teacher, negative, labels, backend=backend, return_components=True,
                              **options)
    ref = contrastive_kd_loss_reference(student, teacher, negative, labels, compute_dtype=torch.float64, **options)
    for got, expected in zip(out, ref):
        assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert_close(out.loss, 0.7 * out.kd_loss + 0.3 * out.ce_loss, atol=1e-6, rtol=1e-6)
    # a gradient that flows through all three outputs at once
    weights = (0.5, 2.0, -1.5)
    (grad,) = torch.autograd.grad(sum(w * t for w, t in zip(weights, out)), student)
    (ref_grad,) = torch.autograd.grad(sum(w * t for w, t in zip(weights, ref)), student)
    assert_close(grad, ref_grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_half_precision_loose(backend, dtype, beta):
    student, teacher, negative, labels = make_inputs(vocab=300, teacher_vocab=300, dtype=dtype, seed=4)
    options = dict(alpha=2.0, temperature=2.0, beta=beta, kd_weight=0.7, ce_weight=0.3)
    out, ref, grad, ref_grad = run_both(backend, student, teacher, negative, labels, **options)
    assert grad.dtype == dtype
    assert out.dtype == torch.float32
    # the reference sees the same rounded inputs, so only accumulation and the final cast differ
    assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert_close(grad, ref_grad, atol=2e-3, rtol=2e-2)


@pytest.mark.parametrize("vocab", [1, 2, 1000, 4099])
def test_vocab_sizes_not_multiple_of_blocks(backend, vocab):
    student, teacher, negative, labels = make_inputs(batch=1, seq=2, vocab=vocab, teacher_vocab=vocab + 3, seed=5)
    options = dict(alpha=1.0, temperature=1.5, beta=0.5, kd_weight=1.0, ce_weight=1.0)
    out, ref, grad, ref_grad = run_both(backend, student, teacher, negative, labels, **options)
    assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert_close(grad, ref_grad, atol=1e-6, rtol=1e-5)


def test_one_row_two_dimensional_and_no_labels(backend):
    g = torch.Generator().manual_seed(6)
    student = torch.randn(1, 50, generator=g).requires_grad_(True)
    teacher, negative = torch.randn(1, 50, generator=g), torch.randn(1, 50, generator=g)
    out, ref, grad, ref_grad = run_both(backend, student, teacher, negative, None, alpha=2.0, temperature=2.0)
    assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert_close(grad, ref_grad, atol=1e-6, rtol=1e-5)


def test_without_negative_is_plain_kd(backend):
    student, teacher, negative, labels = make_inputs(seed=7)
    plain = contrastive_kd_loss(student, teacher, None, labels, backend=backend, alpha=2.0)
    alpha_zero = contrastive_kd_loss(student, teacher, negative, labels, backend=backend, alpha=0.0)
    ref = contrastive_kd_loss_reference(student, teacher, None, labels, compute_dtype=torch.float64)[0]
    assert_close(plain, ref, atol=1e-5, rtol=1e-5)
    assert_close(alpha_zero, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored(backend, reduction):
    student, teacher, negative, _ = make_inputs(seed=8)
    labels = torch.full(student.shape[:-1], 7, dtype=torch.long)
    out = contrastive_kd_loss(student, teacher, negative, labels, backend=backend, ignore_index=7,
                              kd_weight=0.7, ce_weight=0.3, reduction=reduction)
    (grad,) = torch.autograd.grad(out.sum(), student)
    assert torch.all(out == 0)
    assert torch.all(grad == 0)
    assert not torch.isnan(grad).any()


def test_custom_ignore_index(backend):
    student, teacher, negative, labels = make_inputs(seed=9, ignore_index=3)
    labels[labels == 3] = 4
    labels[1, 2] = 3
    options = dict(alpha=2.0, kd_weight=0.7, ce_weight=0.3, ignore_index=3)
    out, ref, grad, ref_grad = run_both(backend, student, teacher, negative, labels, **options)
    assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert_close(grad, ref_grad, atol=1e-6, rtol=1e-5)
    assert torch.all(grad[1, 2] == 0)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_extreme_logits(backend, beta):
    student, teacher, negative, labels = make_inputs(seed=10)
    with torch.no_grad():
        student[0, 0, :5] = 1e4
        student[1, 1, :3] = -1e4
        teacher[0, 0, 3:9] = 1e4
        negative[0, 0, 3:9] = -1e4
        teacher[1, 2, 10:20] = -1e4
    options = dict(alpha=2.0, temperature=2.0, beta=beta, kd_weight=0.7, ce_weight=0.3)
    out, ref, grad, ref_grad = run_both(backend, student, teacher, negative, labels, **options)
    assert torch.isfinite(out) and torch.isfinite(grad).all()
    # a float32 log-normaliser near 2.5e4 has a spacing of 2e-3, which bounds how well
    # p = exp(a - lse_a) can be recovered: about 3e-3 relative on the largest entries
    assert_close(out, ref, atol=1e-3, rtol=1e-5)
    assert_close(grad, ref_grad, atol=3e-4, rtol=1e-3)


@pytest.mark.parametrize("beta,plausibility", [(0.0, 0.0), (0.5, 0.0), (0.0, 0.2), (0.5, 0.2)])
def test_negative_infinity_in_teacher(backend, beta, plausibility):
    student, teacher, negative, labels = make_inputs(seed=11)
    teacher[..., 5:9] = float("-inf")  # masked tokens, shared by both teacher paths
    negative[..., 5:9] = float("-inf")
    options = dict(alpha=2.0, temperature=2.0, beta=beta, plausibility=plausibility, kd_weight=0.7, ce_weight=0.3)
    out, ref, grad, ref_grad = run_both(backend, student, teacher, negative, labels, **options)
    assert torch.isfinite(out) and torch.isfinite(grad).all()
    assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert_close(grad, ref_grad, atol=1e-6, rtol=1e-5)


def test_plausibility_cutoff_changes_the_loss(backend):
    student, teacher, negative, labels = make_inputs(seed=12)
    off = contrastive_kd_loss(student, teacher, negative, labels, backend=backend, alpha=1.0)
    on = contrastive_kd_loss(student, teacher, negative, labels, backend=backend, alpha=1.0, plausibility=0.1)
    assert not torch.isclose(off, on)


def test_module_matches_function(backend):
    student, teacher, negative, labels = make_inputs(seed=13)
    module = ContrastiveKDLoss(alpha=2.0, temperature=2.0, kd_weight=0.7, ce_weight=0.3, backend=backend,
                               return_components=True)
    out = module(student, teacher, negative, labels)
    expected = contrastive_kd_loss(student, teacher, negative, labels, alpha=2.0, temperature=2.0, kd_weight=0.7,
                                   ce_weight=0.3, backend=backend, return_components=True)
    for got, want in zip(out, expected):
        torch.testing.assert_close(got, want)
    assert "alpha=2.0" in repr(module)


def test_teacher_gets_no_gradient():
    student, teacher, negative, labels = make_inputs(seed=14)
    teacher.requires_grad_(True)
    loss = contrastive_kd_loss(student, teacher, negative, labels, backend="torch")
    loss.backward()
    assert teacher.grad is None and student.grad is not None


def test_float64_gradcheck_torch_backend():
    g = torch.Generator().manual_seed(15)
    student = torch.randn(2, 3, 11, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 3, 13, generator=g, dtype=torch.float64)
    negative = torch.randn(2, 3, 13, generator=g, dtype=torch.float64)
    labels = torch.tensor([[1, -100, 3], [4, 5, 10]])
    for beta, plausibility in [(0.0, 0.0), (1.0, 0.0), (0.5, 0.3)]:
        def fn(s, beta=beta, plausibility=plausibility):
            return contrastive_kd_loss(s, teacher, negative, labels, alpha=1.5, temperature=1.7, beta=beta,
                                       plausibility=plausibility, kd_weight=0.7, ce_weight=0.3,
                                       reduction="none", backend="torch")

        assert torch.autograd.gradcheck(fn, (student,), eps=1e-6, atol=1e-7)


def _call(**overrides):
    student, teacher, negative, labels = make_inputs(seed=16)
    args = dict(student_logits=student, teacher_logits=teacher, teacher_negative_logits=negative, labels=labels)
    args.update(overrides)
    return contrastive_kd_loss(
        args.pop("student_logits"), args.pop("teacher_logits"), args.pop("teacher_negative_logits"),
        args.pop("labels"), backend=args.pop("backend", "torch"), **args,
    )


@pytest.mark.parametrize(
    "overrides,error,match",
    [
        (dict(teacher_logits=torch.randn(2, 4, 41)), ValueError, "teacher_logits must have the leading shape"),
        (dict(teacher_logits=torch.randn(2, 3, 30)), ValueError, "smaller than the student"),
        (dict(teacher_negative_logits=torch.randn(2, 3, 40)), ValueError, "teacher_negative_logits must have"),
        (dict(student_logits=torch.ones(2, 3, 37, dtype=torch.long)), TypeError, "student_logits must be a floating"),
        (dict(labels=torch.zeros(2, 3)), TypeError, "labels must be an integer"),
        (dict(labels=torch.zeros(2, 4, dtype=torch.long)), ValueError, "labels must have the leading shape"),
        (dict(labels=torch.full((2, 3), 99)), ValueError, r"labels must be in \[0, 37\)"),
        (dict(labels=None, ce_weight=0.5), ValueError, "labels are required"),
        (dict(temperature=0.0), ValueError, "temperature must be > 0"),
        (dict(temperature=-1.0), ValueError, "temperature must be > 0"),
        (dict(alpha=-0.5), ValueError, "alpha must be >= 0"),
        (dict(beta=1.5), ValueError, r"beta must be in \[0, 1\]"),
        (dict(plausibility=1.0), ValueError, r"plausibility must be in \[0, 1\)"),
        (dict(plausibility=0.1, beta=1.0), ValueError, "reverse KL"),
        (dict(backend="cuda"), ValueError, "backend must be one of"),
        (dict(reduction="avg"), ValueError, "reduction must be one of"),
        (dict(num_items_in_batch=-1), ValueError, "num_items_in_batch must be >= 0"),
        (dict(num_items_in_batch=4, reduction="sum"), ValueError, "only used with reduction='mean'"),
        (dict(alpha="2"), TypeError, "alpha must be a real number"),
        (dict(student_logits=[[1.0]]), TypeError, "student_logits must be a torch.Tensor"),
    ],
)
def test_bad_input_errors(overrides, error, match):
    with pytest.raises(error, match=match):
        _call(**overrides)


@pytest.mark.parametrize("which", ["student_logits", "teacher_logits", "teacher_negative_logits"])
def test_nan_is_reported_by_name(which):
    student, teacher, negative, labels = make_inputs(seed=17)
    tensors = dict(student_logits=student.detach().clone(), teacher_logits=teacher, teacher_negative_logits=negative)
    tensors[which][0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=f"{which} holds NaN or \\+inf"):
        _call(**tensors)
    # opting out skips the check: no error is raised (what the NaN does downstream is undefined)
    _call(**tensors, check_finite=False)
