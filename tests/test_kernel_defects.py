"""Issue 11: the kernel defects found in review and the "less work" changes, on every backend.

Each test here failed on the code before the fix (the failure it guards against is named in its
docstring); the comparisons are against the float64 reference or against an independent
computation, never against hard-coded numbers.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from caad_kernels import contrastive_kd_loss, fused_linear_contrastive_kd_loss
from caad_kernels import fused_linear as fused_module
from caad_kernels.backends import load_backend
from caad_kernels.fused_linear import default_chunk_size
from caad_kernels.reference import contrastive_kd_loss_reference, fused_linear_contrastive_kd_loss_reference
from caad_kernels.validation import HostChecks

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

BACKENDS = ["torch", "cpp", "triton"]


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    try:
        load_backend(request.param)
    except Exception as error:
        pytest.skip(f"backend {request.param!r} unavailable here: {error}")
    return request.param


def logits_inputs(seed=0, vocab=37, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(2, 3, vocab, generator=g) * 3).to(dtype).requires_grad_(True)
    teacher = (torch.randn(2, 3, vocab + 4, generator=g) * 3).to(dtype)
    negative = (teacher.float() + torch.randn(2, 3, vocab + 4, generator=g)).to(dtype)
    labels = torch.randint(0, vocab, (2, 3), generator=g)
    labels[0, 1] = -100
    return student, teacher, negative, labels


def fused_inputs(lead=(2, 9), hidden=16, vocab=53, dtype=torch.float32, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    inputs = dict(
        student_hidden=rand(*lead, hidden).requires_grad_(True),
        student_weight=rand(vocab, hidden, scale=0.5).requires_grad_(True),
        teacher_hidden=rand(*lead, hidden + 8),
        teacher_weight=rand(vocab + 7, hidden + 8, scale=0.5),
        teacher_negative_hidden=rand(*lead, hidden + 8),
        labels=torch.randint(0, vocab, lead, generator=g),
    )
    inputs["labels"].view(-1)[[0, 5]] = -100
    if bias:
        inputs["student_bias"] = rand(vocab).requires_grad_(True)
        inputs["teacher_bias"] = rand(vocab + 7)
    return inputs


def student_params(inputs):
    return [inputs[k] for k in ("student_hidden", "student_weight", "student_bias") if k in inputs]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


# ---------------------------------------------------------------------------------------------
# 1. out-of-range labels are reported by every backend (even with check_finite=False)


@pytest.mark.parametrize("bad", [37, -1, 1000])
def test_out_of_range_labels_raise_on_every_backend(backend, bad):
    """Before: triton masked the load and returned a finite loss; torch on CUDA hit a device assert."""
    student, teacher, negative, labels = logits_inputs()
    labels[1, 2] = bad
    with pytest.raises(ValueError, match=rf"labels must be in \[0, 37\).*found {bad} at row 5"):
        contrastive_kd_loss(student, teacher, negative, labels, backend=backend, check_finite=False, ce_weight=0.5)
    inputs = fused_inputs()
    inputs["labels"][1, 3] = bad + 16 if bad >= 37 else bad
    with pytest.raises(ValueError, match=r"labels must be in \[0, 53\)"):
        fused_linear_contrastive_kd_loss(**inputs, backend=backend, ce_weight=0.5)


# ---------------------------------------------------------------------------------------------
# 2. the fused backward scales in float32; fp16 stays correct under large loss scales


def test_fp16_grad_scaler_scale_and_large_num_items(backend):
    """Before: grad_output=65536 cast to fp16 made every gradient inf, and at num_items_in_batch=1e5 the fp16
    logit gradient computed at unit scale underflowed (4.5e-2 relative error)."""
    inputs = fused_inputs(lead=(48,), hidden=32, vocab=300, dtype=torch.float16, seed=1)
    options = dict(alpha=2.0, temperature=2.0, kd_weight=0.7, ce_weight=0.3, num_items_in_batch=1e5)
    loss = fused_linear_contrastive_kd_loss(**inputs, backend=backend, chunk_size=16, **options)
    grads = torch.autograd.grad(loss * 65536.0, student_params(inputs))
    ref = fused_linear_contrastive_kd_loss_reference(**inputs, compute_dtype=torch.float64, **options)[0]
    ref_grads = torch.autograd.grad(ref, student_params(inputs))
    for grad, ref_grad in zip(grads, ref_grads):
        assert grad.dtype == torch.float16 and torch.isfinite(grad).all()
        # fp16 logits (rounded to 2^-11) and fp16 GEMMs against float64 ones
        assert relative_error(grad.double() / 65536.0, ref_grad) < 1e-2


def test_bf16_upstream_gradient_is_not_rounded_to_bf16(backend):
    """Before: (0.7 * loss).backward() scaled the bf16 gradients by bf16(0.7) = 0.69921875 (a 0.1% bias)."""
    inputs = fused_inputs(lead=(64,), hidden=32, vocab=300, dtype=torch.bfloat16, seed=2)
    options = dict(alpha=2.0, temperature=2.0, kd_weight=0.7, ce_weight=0.3, chunk_size=16)
    loss = fused_linear_contrastive_kd_loss(**inputs, backend=backend, **options)
    params = student_params(inputs)[:2]  # thousands of entries each: the rounding noise averages out
    unit = torch.autograd.grad(loss, params, retain_graph=True)
    scaled = torch.autograd.grad(0.7 * loss, params)
    for g1, g07 in zip(unit, scaled):
        g1, g07 = g1.double(), g07.double()
        ratio = float((g07 * g1).sum() / (g1 * g1).sum())  # least-squares scale between the two
        assert abs(ratio / 0.7 - 1.0) < 3e-4


# ---------------------------------------------------------------------------------------------
# 3. the fused op respects torch.no_grad()


def test_fused_op_does_no_gradient_work_without_grad(backend, monkeypatch):
    """Before: under torch.no_grad() the op still ran the two gradient GEMMs and kept a [V, H] buffer."""
    calls = []
    original = fused_module._add_weight_grad
    monkeypatch.setattr(fused_module, "_add_weight_grad", lambda *args: (calls.append(1), original(*args)))
    inputs = fused_inputs(seed=3)
    with torch.no_grad():
        no_grad = fused_linear_contrastive_kd_loss(**inputs, backend=backend, alpha=2.0, chunk_size=8)
    assert calls == [] and not no_grad.requires_grad
    detached = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    fused_linear_contrastive_kd_loss(**detached, backend=backend, alpha=2.0, chunk_size=8)
    assert calls == []
    with_grad = fused_linear_contrastive_kd_loss(**inputs, backend=backend, alpha=2.0, chunk_size=8)
    assert calls and with_grad.requires_grad
    torch.testing.assert_close(no_grad, with_grad.detach(), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# 4. +inf, and -inf in the negative path: a clear error, or NaN for that row, the same on every backend


@pytest.mark.parametrize(
    "tensor,value,name",
    [
        ("student", float("inf"), "student_logits holds NaN or \\+inf"),
        ("teacher", float("inf"), "teacher_logits holds NaN or \\+inf"),
        ("negative", float("inf"), "teacher_negative_logits holds NaN or \\+inf"),
        ("negative", float("-inf"), "or -inf where teacher_logits is finite"),
        ("student", float("nan"), "student_logits holds NaN"),
    ],
)
def test_infinities_are_defined_the_same_on_every_backend(backend, tensor, value, name):
    """Before: cpp and triton returned NaN, torch 0, and check_finite=True let it through."""
    student, teacher, negative, labels = logits_inputs(seed=4)
    tensors = dict(student=student.detach().clone(), teacher=teacher.clone(), negative=negative.clone())
    tensors[tensor][1, 0, 5] = value
    s = tensors["student"].requires_grad_(True)
    options = dict(alpha=2.0, temperature=2.0, beta=0.5, ce_weight=0.3, backend=backend)
    with pytest.raises(ValueError, match=rf"{name}.*\(first at row 3 "):
        contrastive_kd_loss(s, tensors["teacher"], tensors["negative"], labels, **options)
    rows = contrastive_kd_loss(s, tensors["teacher"], tensors["negative"], labels, check_finite=False,
                               reduction="none", **options)
    (grad,) = torch.autograd.grad(rows.sum(), s)
    assert torch.isnan(rows[1, 0]) and torch.isnan(grad[1, 0]).all()
    others = torch.ones_like(labels, dtype=torch.bool)
    others[1, 0] = False
    assert torch.isfinite(rows[others]).all() and torch.isfinite(grad[others]).all()
    clean = contrastive_kd_loss(student, teacher, negative, labels, reduction="none", **options)
    torch.testing.assert_close(rows[others], clean[others], rtol=0, atol=0)


def test_negative_infinity_in_both_teacher_paths_is_a_mask(backend):
    """-inf at the same place in both teacher paths is a masked token (finite loss), not an error."""
    student, teacher, negative, labels = logits_inputs(seed=5)
    teacher[..., 7:11] = float("-inf")
    negative[..., 7:11] = float("-inf")
    out = contrastive_kd_loss(student, teacher, negative, labels, alpha=2.0, beta=0.5, backend=backend)
    ref = contrastive_kd_loss_reference(student, teacher, negative, labels, alpha=2.0, beta=0.5,
                                        compute_dtype=torch.float64)[0]
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# 5. no NaN gradient where student and teacher both mask a token


@pytest.mark.parametrize("beta", [0.5, 1.0])
def test_tokens_masked_in_student_and_teacher(backend, beta):
    """Before: the torch backend gave NaN gradients for reverse KL and the mixture (0 * (-inf - -inf)).

    The masked columns carry no probability on either side, so the loss and the other columns' gradient
    equal those of the same rows with the masked columns removed, and their own gradient is 0.
    """
    student, teacher, negative, labels = logits_inputs(seed=6)
    keep = torch.ones(37, dtype=torch.bool)
    keep[[3, 4, 20]] = False
    with torch.no_grad():
        student[..., ~keep] = float("-inf")
    teacher = teacher[..., :37].clone()
    negative = negative[..., :37].clone()
    teacher[..., ~keep] = float("-inf")
    negative[..., ~keep] = float("-inf")
    labels = torch.where(labels == -100, labels, labels.clamp(min=5, max=19))
    options = dict(alpha=1.0, temperature=2.0, beta=beta, ce_weight=0.3, backend=backend)
    out = contrastive_kd_loss(student, teacher, negative, labels, **options)
    (grad,) = torch.autograd.grad(out, student)
    narrow = student.detach()[..., keep].requires_grad_(True)
    narrow_labels = torch.where(labels == -100, labels, labels - 2)  # columns 3 and 4 removed before them
    expected = contrastive_kd_loss(narrow, teacher[..., keep], negative[..., keep], narrow_labels, **options)
    (expected_grad,) = torch.autograd.grad(expected, narrow)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad[..., keep], expected_grad, rtol=1e-5, atol=1e-7)
    assert torch.all(grad[..., ~keep] == 0)


# ---------------------------------------------------------------------------------------------
# 6. double backward is refused with a clear error; 7. retain_graph works for the fused op


def test_double_backward_is_a_clear_error(backend):
    """Before: the torch backend's Hessian-vector product was silently 30% off; cpp/triton gave a generic error."""
    student, teacher, negative, labels = logits_inputs(seed=7)
    loss = contrastive_kd_loss(student, teacher, negative, labels, alpha=2.0, ce_weight=0.3, backend=backend)
    (grad,) = torch.autograd.grad(loss, student, create_graph=True)
    (plain,) = torch.autograd.grad(
        contrastive_kd_loss(student, teacher, negative, labels, alpha=2.0, ce_weight=0.3, backend=backend), student)
    torch.testing.assert_close(grad, plain, rtol=0, atol=0)  # first order under create_graph is unchanged
    with pytest.raises(RuntimeError, match="contrastive_kd_loss: double backward is not supported"):
        torch.autograd.grad((grad * torch.randn_like(grad)).sum(), student)
    inputs = fused_inputs(seed=7)
    loss = fused_linear_contrastive_kd_loss(**inputs, alpha=2.0, backend=backend)
    (grad,) = torch.autograd.grad(loss, inputs["student_hidden"], create_graph=True)
    with pytest.raises(RuntimeError, match="fused_linear_contrastive_kd_loss: double backward is not supported"):
        torch.autograd.grad(grad.sum(), inputs["student_hidden"])


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_backward_twice_with_retain_graph(backend, reduction):
    """Before: the second backward crashed with 'cannot unpack non-iterable NoneType'."""
    inputs = fused_inputs(seed=8)
    loss = fused_linear_contrastive_kd_loss(**inputs, alpha=2.0, ce_weight=0.3, backend=backend, chunk_size=8,
                                            reduction=reduction).sum()
    first = torch.autograd.grad(loss, student_params(inputs), retain_graph=True)
    second = torch.autograd.grad(loss, student_params(inputs))
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# 8. bad input names the argument


@pytest.mark.parametrize("value", [torch.tensor(-3.0), torch.tensor(float("nan"))])
def test_num_items_tensor_must_not_be_negative(backend, value):
    """Before: a tensor num_items_in_batch of -3 gave a negative loss (0 is defined: tests/test_custom_ops.py)."""
    student, teacher, negative, labels = logits_inputs(seed=9)
    with pytest.raises(ValueError, match="num_items_in_batch must be >= 0"):
        contrastive_kd_loss(student, teacher, negative, labels, backend=backend, num_items_in_batch=value)
    with pytest.raises(ValueError, match="num_items_in_batch must be >= 0"):
        fused_linear_contrastive_kd_loss(**fused_inputs(seed=9), backend=backend, num_items_in_batch=value)


@pytest.mark.parametrize("value", [0, torch.tensor(0), torch.tensor(0.0)])
def test_num_items_zero_gives_zero_loss_and_gradients(backend, value):
    """Before: a tensor num_items_in_batch of 0 gave NaN. No item in the accumulated batch: loss 0, gradients 0."""
    student, teacher, negative, labels = logits_inputs(seed=9)
    options = dict(alpha=2.0, temperature=2.0, kd_weight=0.7, ce_weight=0.3, backend=backend, num_items_in_batch=value)
    loss = contrastive_kd_loss(student, teacher, negative, labels, **options)
    (grad,) = torch.autograd.grad(loss, student)
    inputs = fused_inputs(seed=9)
    fused = fused_linear_contrastive_kd_loss(**inputs, chunk_size=8, **options)
    fused_grads = torch.autograd.grad(fused, student_params(inputs))
    assert float(loss.detach()) == 0.0 and float(fused.detach()) == 0.0
    for g in (grad, *fused_grads):
        assert torch.isfinite(g).all() and torch.count_nonzero(g) == 0
    # the same inputs with one item do give a loss (so the zeros above come from the denominator)
    one_item = contrastive_kd_loss(student, teacher, negative, labels, **dict(options, num_items_in_batch=1))
    assert float(one_item.detach()) > 0


@pytest.mark.parametrize(
    "name,where,match",
    [
        ("student_weight", (7, 0), "student logits are not finite: student_hidden, student_weight"),
        ("teacher_weight", (7, 0), "teacher logits are not finite: teacher_hidden, teacher_weight"),
    ],
)
def test_nan_in_a_weight_is_found_with_check_finite(backend, name, where, match):
    """Before: NaN in student_weight / teacher_weight passed check_finite=True (only the hidden states were read)."""
    inputs = fused_inputs(seed=12)
    with torch.no_grad():
        inputs[name][where] = float("nan")
    with pytest.raises(ValueError, match=match):
        fused_linear_contrastive_kd_loss(**inputs, backend=backend, alpha=2.0, check_finite=True, chunk_size=8)
    loss = fused_linear_contrastive_kd_loss(**inputs, backend=backend, alpha=2.0, chunk_size=8)
    assert torch.isnan(loss)


@pytest.mark.parametrize(
    "name,dtype,match",
    [
        ("student_bias", torch.float64, r"student_bias must have the dtype of student_weight \(torch.float32\)"),
        ("teacher_bias", torch.bfloat16, r"teacher_bias must have the dtype of teacher_weight"),
        ("teacher_negative_hidden", torch.float64, "teacher_negative_hidden must have the dtype of teacher_hidden"),
    ],
)
def test_fused_dtype_mismatch_names_the_argument(name, dtype, match):
    """Before: a student_bias dtype mismatch surfaced as addmm's message."""
    inputs = fused_inputs(seed=10)
    inputs[name] = inputs[name].detach().to(dtype)
    with pytest.raises(TypeError, match=match):
        fused_linear_contrastive_kd_loss(**inputs)


# ---------------------------------------------------------------------------------------------
# less work: one teacher GEMM, compaction, one host sync, no teacher kept, reproducible chunks


def record_gemm_rows(monkeypatch):
    """Rows that go through each weight's GEMM, keyed by the weight's hidden size."""
    rows: dict[int, int] = {}
    original = fused_module._linear_into

    def counting(hidden, weight, bias):
        rows[weight.shape[1]] = rows.get(weight.shape[1], 0) + hidden.shape[0]
        return original(hidden, weight, bias)

    monkeypatch.setattr(fused_module, "_linear_into", counting)
    return rows


@pytest.mark.parametrize("per_row_alpha", [False, True])
def test_one_teacher_gemm_and_ignored_rows_skip_the_gemms(backend, monkeypatch, per_row_alpha):
    inputs = fused_inputs(seed=11)  # 18 rows, 2 ignored
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False  # 3 more
    alpha = torch.rand(2, 9, generator=torch.Generator().manual_seed(0)) * 2 if per_row_alpha else 2.0
    rows = record_gemm_rows(monkeypatch)
    out = fused_linear_contrastive_kd_loss(**inputs, mask=mask, alpha=alpha, temperature=2.0, ce_weight=0.3,
                                           backend=backend, chunk_size=4)
    assert rows == {16: 13, 24: 13}  # 13 valid rows; the teacher: one GEMM on h_hat, not two
    ref = fused_linear_contrastive_kd_loss_reference(**inputs, mask=mask, alpha=alpha, temperature=2.0,
                                                     ce_weight=0.3, compute_dtype=torch.float64)[0]
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    rows.clear()
    fused_linear_contrastive_kd_loss(**inputs, mask=mask, alpha=alpha, plausibility=0.1, backend=backend,
                                     chunk_size=4)
    assert rows == {16: 13, 24: 26}  # the cutoff needs z_pos itself: both teacher paths


def test_one_teacher_gemm_is_more_accurate_in_bf16():
    """``z_hat`` of a chunk from one bf16 GEMM on ``h_hat`` (formed in fp32) against the two bf16 GEMMs the op
    used before (and still uses with the cutoff): at alpha = 2 their rounding is amplified by ``1 + 2 alpha``."""
    g = torch.Generator().manual_seed(12)
    h_pos = torch.randn(256, 64, generator=g).bfloat16()
    h_neg = (h_pos.float() + 0.5 * torch.randn(256, 64, generator=g)).bfloat16()
    weight = (torch.randn(1024, 64, generator=g) * 0.5).bfloat16()
    exact = (h_pos.double() + 2.0 * (h_pos.double() - h_neg.double())) @ weight.double().T

    def chunk_z_hat(one_gemm: bool) -> torch.Tensor:
        rows = fused_module._Rows(h_s=h_pos, w_s=weight, b_s=None, h_t=h_pos, h_n=h_neg, w_t=weight, b_t=None,
                                  labels=None, alpha=2.0, one_gemm=one_gemm)
        z_pos, z_neg = fused_module._teacher_logits(rows, 0, 256)
        if z_neg is None:
            return z_pos.double()
        return z_pos.double() + 2.0 * (z_pos.double() - z_neg.double())  # what the row kernels form in fp32

    one, two = ((chunk_z_hat(flag) - exact).abs().max() for flag in (True, False))
    assert one < 0.5 * two


def test_large_teacher_offsets_keep_fp32_precision(backend):
    """``z_pos + alpha (z_pos - z_neg)``: before, ``(1 + alpha) z_pos - alpha z_neg`` at logits near 3000 gave a
    6e-5 relative error on the loss (rounding of 9000 in fp32); now it is below 1e-6."""
    g = torch.Generator().manual_seed(13)
    teacher = 3000 + torch.randn(8, 300, generator=g) * 3
    negative = teacher + torch.randn(8, 300, generator=g)
    student = torch.randn(8, 300, generator=g) * 3
    options = dict(alpha=2.0, temperature=2.0, reduction="none")
    out = contrastive_kd_loss(student, teacher, negative, backend=backend, **options)
    ref = contrastive_kd_loss_reference(student, teacher, negative, compute_dtype=torch.float64, **options)[0]
    assert float(((out.double() - ref) / ref).abs().max()) < 5e-6


def test_one_host_sync_per_call(backend, monkeypatch):
    reads = []
    original = HostChecks.read
    monkeypatch.setattr(HostChecks, "read", lambda self: (reads.append(bool(self)), original(self))[1])
    inputs = fused_inputs(seed=14)
    fused_linear_contrastive_kd_loss(**inputs, backend=backend, alpha=2.0, ce_weight=0.3,
                                     num_items_in_batch=torch.tensor(20.0)).backward()
    assert reads == [True]  # the valid rows, the labels' range and num_items_in_batch in one read
    reads.clear()
    no_labels = dict(inputs, labels=None)
    fused_linear_contrastive_kd_loss(**no_labels, backend=backend, alpha=2.0).backward()
    assert reads == [False]  # nothing data-dependent: no synchronisation at all
    reads.clear()
    student, teacher, negative, labels = logits_inputs(seed=14)
    contrastive_kd_loss(student, teacher, negative, labels, backend=backend, ce_weight=0.3).backward()
    assert reads == [True]


def test_teacher_tensors_are_not_kept_for_backward(backend):
    """Before: the eager path kept the teacher's hidden states and weight (under ZeRO-3 the gathered weight)
    until backward. The teacher tensors live in numpy arrays here, so a weak reference to the array tells
    whether anything (a view, a saved tensor) still holds the storage."""
    inputs = fused_inputs(seed=15)

    def step():
        arrays = {k: inputs[k].numpy().copy() for k in ("teacher_hidden", "teacher_weight", "teacher_negative_hidden")}
        refs = [weakref.ref(a) for a in arrays.values()]
        teacher = {k: torch.from_numpy(a) for k, a in arrays.items()}
        del arrays
        loss = fused_linear_contrastive_kd_loss(**{**inputs, **teacher}, backend=backend, alpha=2.0, ce_weight=0.3)
        return loss, refs

    loss, refs = step()
    gc.collect()
    assert all(ref() is None for ref in refs)
    loss.backward()
    assert torch.isfinite(inputs["student_hidden"].grad).all()


def test_chunk_size_depends_on_shape_dtype_and_device_only(monkeypatch):
    """Before: on CUDA it followed the free memory, which differs across ranks and steps."""

    def no_free_memory_query(*args, **kwargs):
        raise AssertionError("default_chunk_size must not consult the free memory")

    monkeypatch.setattr(torch.cuda, "mem_get_info", no_free_memory_query)
    cuda = torch.device("cuda")
    assert default_chunk_size(8192, 128256, 4096, cuda, 2) == 1024
    assert default_chunk_size(8192, 152064, 3584, cuda, 2) == 512
    assert default_chunk_size(8192, 128256, 4096, cuda, 4) == 512
    assert default_chunk_size(8192, 32000, 4096, cuda, 2) == 4096
    assert default_chunk_size(100, 32000, 4096, cuda, 2) == 100
    assert default_chunk_size(8192, 32000, 256, torch.device("cpu"), 4) == 128
