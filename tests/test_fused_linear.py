"""``fused_linear_contrastive_kd_loss`` against the materialising reference, and its memory contract."""

from __future__ import annotations

import pytest
import torch

from caad_kernels import FusedLinearContrastiveKDLoss, fused_linear_contrastive_kd_loss
from caad_kernels.backends import load_backend
from caad_kernels.fused_linear import default_chunk_size
from caad_kernels.profiling import cpu_peak_measurable, measure_peak_memory
from caad_kernels.reference import fused_linear_contrastive_kd_loss_reference

# the triton interpreter warns about the inf - inf lanes that tl.where then discards
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

# "torch": PyTorch GEMMs with the C++ elementwise kernels when built; "cpp"/"triton": those kernels explicitly
BACKENDS = ["torch", "cpp", "triton"]


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    if request.param != "torch":
        try:
            load_backend(request.param)
        except Exception as error:
            pytest.skip(f"backend {request.param!r} unavailable here: {error}")
    return request.param


def make_inputs(lead=(2, 19), hidden_s=16, hidden_t=24, vocab=53, teacher_vocab=60, dtype=torch.float32,
                bias=True, seed=0):
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
    )
    inputs["labels"].view(-1)[:3] = -100
    if bias:
        inputs["student_bias"] = rand(vocab).requires_grad_(True)
        inputs["teacher_bias"] = rand(teacher_vocab)
    return inputs


def student_params(inputs):
    return [inputs[k] for k in ("student_hidden", "student_weight", "student_bias") if k in inputs]


def run_both(backend, inputs, grad_output=None, **options):
    out = fused_linear_contrastive_kd_loss(**inputs, backend=backend, **options)
    ref_options = {k: v for k, v in options.items() if k not in ("chunk_size", "accum_dtype")}
    ref = fused_linear_contrastive_kd_loss_reference(**inputs, compute_dtype=torch.float64, **ref_options)[0]
    if grad_output is None:
        grad_output = torch.ones_like(out)
    grads = torch.autograd.grad(out, student_params(inputs), grad_output)
    ref_grads = torch.autograd.grad(ref, student_params(inputs), grad_output.double())
    return out, ref, grads, ref_grads


def assert_all_close(out, ref, grads, ref_grads, atol, rtol, grad_atol=None):
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad.double(), ref_grad.double(), atol=grad_atol or atol, rtol=rtol)


@pytest.mark.parametrize(
    "options",
    [
        dict(alpha=2.0, temperature=2.0, kd_weight=0.7, ce_weight=0.3),
        dict(alpha=0.0, temperature=1.0),
        dict(alpha=1.0, temperature=0.5, beta=0.5, plausibility=0.1, kd_weight=1.0, ce_weight=1.0),
        dict(alpha=2.0, temperature=2.0, beta=1.0, temperature_scaling=False),
        dict(alpha=1.0, temperature=2.0, beta=0.5, kd_weight=0.0, ce_weight=1.0),
        dict(alpha=2.0, temperature=1.0, plausibility=0.1, reduction="sum"),
    ],
)
def test_matches_reference(backend, options):
    inputs = make_inputs()
    # 38 rows in chunks of 16: the last chunk is partial
    out, ref, grads, ref_grads = run_both(backend, inputs, grad_output=torch.tensor(1.7), chunk_size=16, **options)
    assert_all_close(out, ref, grads, ref_grads, atol=1e-5, rtol=1e-4)


def test_components_and_reduction_none_recompute_in_backward(backend):
    """``reduction="none"``: backward recomputes the chunks with per-row upstream gradients of all three outputs."""
    inputs = make_inputs(seed=1)
    options = dict(alpha=2.0, temperature=2.0, kd_weight=0.7, ce_weight=0.3, reduction="none", chunk_size=8)
    out = fused_linear_contrastive_kd_loss(**inputs, backend=backend, return_components=True, **options)
    ref = fused_linear_contrastive_kd_loss_reference(
        **inputs, compute_dtype=torch.float64, **{k: v for k, v in options.items() if k != "chunk_size"}
    )
    g = torch.Generator().manual_seed(5)
    weights = [torch.randn(out.loss.shape, generator=g) for _ in range(3)]
    total = sum((w * t).sum() for w, t in zip(weights, out))
    ref_total = sum((w.double() * t).sum() for w, t in zip(weights, ref))
    grads = torch.autograd.grad(total, student_params(inputs))
    ref_grads = torch.autograd.grad(ref_total, student_params(inputs))
    for got, want in zip(out, ref):
        torch.testing.assert_close(got.double(), want.double(), atol=1e-5, rtol=1e-4)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want.double(), atol=1e-5, rtol=1e-4)


def test_scalar_reduction_components_gradients(backend):
    """With a scalar reduction nothing of the teacher is kept: a gradient through ``kd_loss``/``ce_loss`` works
    when it is proportional to ``loss`` (here ``ce_weight=0``) and raises a clear error otherwise."""
    inputs = make_inputs(seed=1)
    options = dict(alpha=2.0, temperature=2.0, kd_weight=0.7, ce_weight=0.0, chunk_size=8)
    out = fused_linear_contrastive_kd_loss(**inputs, backend=backend, return_components=True, **options)
    ref = fused_linear_contrastive_kd_loss_reference(**inputs, compute_dtype=torch.float64,
                                                     **{k: v for k, v in options.items() if k != "chunk_size"})
    grads = torch.autograd.grad(2.0 * out.kd_loss + 0.5 * out.loss, student_params(inputs))
    ref_grads = torch.autograd.grad(2.0 * ref[1] + 0.5 * ref[0], student_params(inputs))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want.double(), atol=1e-5, rtol=1e-4)
    out = fused_linear_contrastive_kd_loss(**inputs, backend=backend, return_components=True,
                                           **dict(options, ce_weight=0.3))
    with pytest.raises(RuntimeError, match="kd_loss and ce_loss separately"):
        torch.autograd.grad(out.kd_loss + out.ce_loss, student_params(inputs))


def test_components_returned_but_only_loss_differentiated(backend):
    inputs = make_inputs(seed=10)
    options = dict(alpha=2.0, temperature=2.0, kd_weight=0.7, ce_weight=0.3, chunk_size=8)
    out = fused_linear_contrastive_kd_loss(**inputs, backend=backend, return_components=True, **options)
    grads = torch.autograd.grad(out.loss, student_params(inputs))  # the gradients computed in forward
    _, _, expected, _ = run_both(backend, inputs, **options)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)


def test_num_items_in_batch_and_no_bias_no_negative(backend):
    inputs = make_inputs(bias=False, seed=2)
    inputs["teacher_negative_hidden"] = None
    out, ref, grads, ref_grads = run_both(backend, inputs, num_items_in_batch=50, alpha=2.0, chunk_size=7)
    assert_all_close(out, ref, grads, ref_grads, atol=1e-5, rtol=1e-4)


def test_single_row_and_odd_vocab(backend):
    inputs = make_inputs(lead=(1,), vocab=1, teacher_vocab=5, seed=3)
    inputs["labels"] = torch.tensor([0])
    out, ref, grads, ref_grads = run_both(backend, inputs, alpha=1.0, ce_weight=0.5)
    assert_all_close(out, ref, grads, ref_grads, atol=1e-6, rtol=1e-5)
    inputs = make_inputs(lead=(1,), vocab=1001, teacher_vocab=1003, seed=3)
    inputs["labels"] = torch.tensor([17])
    out, ref, grads, ref_grads = run_both(backend, inputs, alpha=1.0, beta=0.5, ce_weight=0.5)
    assert_all_close(out, ref, grads, ref_grads, atol=1e-5, rtol=1e-4)


def test_all_rows_ignored(backend):
    inputs = make_inputs(seed=4)
    inputs["labels"] = torch.full_like(inputs["labels"], -100)
    out = fused_linear_contrastive_kd_loss(**inputs, backend=backend, alpha=2.0, ce_weight=0.3, chunk_size=16)
    grads = torch.autograd.grad(out, student_params(inputs))
    assert out.item() == 0.0
    for grad in grads:
        assert torch.all(grad == 0)


def test_bf16_loose_and_fp32_weight_accumulation(backend):
    inputs = make_inputs(dtype=torch.bfloat16, lead=(64,), hidden_s=32, hidden_t=32, vocab=300, teacher_vocab=300,
                         seed=6)
    options = dict(alpha=2.0, temperature=2.0, kd_weight=0.7, ce_weight=0.3, chunk_size=4)
    out, ref, grads, ref_grads = run_both(backend, inputs, **options)  # float32 accumulation by default
    assert all(grad.dtype == torch.bfloat16 for grad in grads)
    # the reference computes the bf16 GEMMs in float64, the op in bf16 with fp32 accumulation
    assert_all_close(out, ref, grads, ref_grads, atol=2e-2, rtol=2e-2, grad_atol=3e-3)
    # summing 16 chunk contributions in float32 is closer to the exact weight gradient than in bf16
    _, _, bf16_grads, _ = run_both(backend, inputs, accum_dtype=torch.bfloat16, **options)
    fp32_error = (grads[1].double() - ref_grads[1]).abs().sum()
    bf16_error = (bf16_grads[1].double() - ref_grads[1]).abs().sum()
    assert fp32_error < bf16_error


def test_module_matches_function_and_teacher_gets_no_gradient():
    inputs = make_inputs(seed=7)
    inputs["teacher_weight"].requires_grad_(True)
    module = FusedLinearContrastiveKDLoss(alpha=2.0, temperature=2.0, kd_weight=0.7, ce_weight=0.3, chunk_size=8)
    loss = module(**inputs)
    expected = fused_linear_contrastive_kd_loss(**inputs, alpha=2.0, temperature=2.0, kd_weight=0.7,
                                                ce_weight=0.3, chunk_size=8)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert inputs["teacher_weight"].grad is None
    assert inputs["student_weight"].grad is not None


def test_default_chunk_size_is_bounded():
    for rows, vocab in [(1, 10), (100, 50), (8192, 128256), (5, 2_000_000)]:
        chunk = default_chunk_size(rows, vocab, 4096, torch.device("cpu"), 4)
        assert 1 <= chunk <= rows
        assert chunk & (chunk - 1) == 0 or chunk == rows


@pytest.mark.parametrize(
    "overrides,error,match",
    [
        (dict(student_hidden=torch.randn(2, 19, 15)), ValueError, "student_hidden must end in"),
        (dict(teacher_hidden=torch.randn(2, 19, 16)), ValueError, "teacher_hidden must end in"),
        (dict(teacher_weight=torch.randn(40, 24)), ValueError, "smaller than the student"),
        (dict(teacher_hidden=torch.randn(2, 18, 24)), ValueError, "teacher_hidden must have the leading shape"),
        (dict(teacher_negative_hidden=torch.randn(2, 19, 23)), ValueError, "teacher_negative_hidden must have"),
        (dict(student_bias=torch.randn(52)), ValueError, r"student_bias must have shape \(53,\)"),
        # the hidden states may differ from the weight (the GEMM runs in the weight's dtype), its bias may not
        (dict(student_weight=torch.randn(53, 16, dtype=torch.float64)), TypeError,
         r"student_bias must have the dtype of student_weight \(torch.float64\)"),
        (dict(labels=torch.zeros(2, 19)), TypeError, "labels must be an integer"),
        (dict(chunk_size=0), ValueError, "chunk_size must be a positive int"),
        (dict(temperature=0.0), ValueError, "temperature must be > 0"),
        (dict(student_weight=torch.randn(53)), ValueError, r"must be \[vocab, hidden\]"),
    ],
)
def test_bad_input_errors(overrides, error, match):
    inputs = make_inputs(seed=8)
    options = {k: overrides.pop(k) for k in list(overrides) if k in ("chunk_size", "temperature")}
    inputs.update(overrides)
    with pytest.raises(error, match=match):
        fused_linear_contrastive_kd_loss(**inputs, **options)


@pytest.mark.parametrize(
    "backend,name,where,match",
    [
        ("torch", "teacher_hidden", (1, 4, 0), "teacher logits are not finite: teacher_hidden"),
        ("triton", "teacher_hidden", (1, 4, 0), "teacher logits are not finite: teacher_hidden"),
        ("cpp", "student_hidden", (1, 4, 0), "student logits are not finite: student_hidden"),
        ("cpp", "student_weight", (7, 0), "student logits are not finite: student_hidden, student_weight"),
        ("cpp", "teacher_weight", (7, 0), "teacher logits are not finite: teacher_hidden, teacher_weight"),
        ("cpp", "student_bias", (7,), "student_weight or student_bias"),
    ],
    indirect=["backend"],
)
def test_nan_check_is_opt_in(backend, name, where, match):
    """NaN anywhere that feeds a valid row's logits (hidden states, weights, biases) is found by the kernels:
    a ValueError naming the arguments with ``check_finite=True``, a NaN loss and NaN gradients without."""
    inputs = make_inputs(seed=9)
    with torch.no_grad():
        inputs[name][where] = float("nan")
    with pytest.raises(ValueError, match=match):
        fused_linear_contrastive_kd_loss(**inputs, backend=backend, alpha=2.0, check_finite=True, chunk_size=16)
    loss = fused_linear_contrastive_kd_loss(**inputs, backend=backend, alpha=2.0, chunk_size=16)
    assert torch.isnan(loss)
    assert torch.isnan(torch.autograd.grad(loss, inputs["student_hidden"])[0]).any()


def test_nan_in_ignored_rows_is_never_read(backend):
    """Ignored rows never reach a GEMM: NaN in their hidden states changes nothing."""
    inputs = make_inputs(seed=9)
    clean = fused_linear_contrastive_kd_loss(**inputs, backend=backend, alpha=2.0, ce_weight=0.3, chunk_size=16)
    with torch.no_grad():
        inputs["teacher_hidden"][0, 0] = float("nan")  # row 0 is ignored (label -100)
        inputs["student_hidden"][0, 1] = float("nan")
    dirty = fused_linear_contrastive_kd_loss(**inputs, backend=backend, alpha=2.0, ce_weight=0.3, chunk_size=16,
                                             check_finite=True)
    torch.testing.assert_close(dirty, clean, rtol=0, atol=0)
    (grad,) = torch.autograd.grad(dirty, inputs["student_hidden"])
    assert torch.all(grad[0, :3] == 0) and torch.isfinite(grad).all()


@pytest.mark.skipif(not cpu_peak_measurable(), reason="needs Linux /proc/self/clear_refs to measure CPU peak memory")
def test_memory_contract_on_cpu():
    """Peak memory grows with N only as O(N x H), and stays far below the materialising reference."""
    vocab, hidden = 32768, 256

    def peak(rows, fn):
        g = torch.Generator().manual_seed(rows)
        inputs = dict(
            student_hidden=torch.randn(rows, hidden, generator=g).requires_grad_(True),
            student_weight=(torch.randn(vocab, hidden, generator=g) * 0.05).requires_grad_(True),
            teacher_hidden=torch.randn(rows, hidden, generator=g),
            teacher_weight=torch.randn(vocab, hidden, generator=g) * 0.05,
            teacher_negative_hidden=torch.randn(rows, hidden, generator=g),
            labels=torch.randint(0, vocab, (rows,), generator=g),
        )

        def step():
            loss = fn(**inputs, alpha=2.0, temperature=2.0, kd_weight=0.7, ce_weight=0.3)
            loss = loss[0] if isinstance(loss, tuple) else loss
            loss.backward()

        return measure_peak_memory(step)[1]

    peak(256, fused_linear_contrastive_kd_loss)  # warm-up: thread pools and one-time buffers are not the op's
    fused = {rows: peak(rows, fused_linear_contrastive_kd_loss) for rows in (1024, 4096)}
    reference = peak(4096, fused_linear_contrastive_kd_loss_reference)
    growth_allowed = 8 * (4096 - 1024) * hidden * 4  # a few [N x H] float32 buffers
    one_logits_growth = (4096 - 1024) * vocab * 4  # what a single extra [N x V] float32 tensor would add
    report = f"fused peaks {fused}, reference peak {reference} (bytes)"
    assert fused[4096] - fused[1024] < growth_allowed < one_logits_growth, report
    assert fused[4096] < reference / 4, report


# ---------------------------------------------------------------------------------------------
# dtypes: torch.autocast, and hidden states whose dtype differs from the weight's


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


def bf16_reference(inputs, **options):
    """The float64 reference on the inputs rounded to bfloat16 (what a bf16 GEMM reads), gradients included."""
    rounded = {k: v.detach().bfloat16().requires_grad_(v.requires_grad) if v.is_floating_point() else v
               for k, v in inputs.items()}
    ref = fused_linear_contrastive_kd_loss_reference(**rounded, compute_dtype=torch.float64, **options)[0]
    return ref, torch.autograd.grad(ref, student_params(rounded))


@pytest.mark.parametrize("device_type_autocast", [True, False])
def test_autocast_bf16_runs_the_gemms_in_bf16(device_type_autocast):
    """Before: ``torch.mm(..., out=grad_h)`` raised 'Expected out tensor to have dtype c10::BFloat16' under autocast.
    Under ``torch.autocast("cpu", bfloat16)`` the GEMMs run in bf16 (as for an ``nn.Linear``) and the gradients come
    back in float32, the inputs' dtype (the weight gradient is summed in float32, never rounded to bf16)."""
    inputs = make_inputs(seed=21)
    options = dict(alpha=2.0, temperature=2.0, kd_weight=0.7, ce_weight=0.3)
    context = torch.autocast("cpu", dtype=torch.bfloat16) if device_type_autocast else torch.autocast("cpu",
                                                                                                       enabled=False)
    with context:
        loss = fused_linear_contrastive_kd_loss(**inputs, chunk_size=8, **options)
    grads = torch.autograd.grad(loss, student_params(inputs))
    assert loss.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    if device_type_autocast:
        ref, ref_grads = bf16_reference(inputs, **options)
        torch.testing.assert_close(loss.double(), ref.detach(), rtol=2e-3, atol=2e-3)
        for grad, ref_grad in zip(grads, ref_grads):
            assert relative_error(grad, ref_grad) < 2e-2
    else:
        ref = fused_linear_contrastive_kd_loss_reference(**inputs, compute_dtype=torch.float64, **options)[0]
        torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)


def test_fp32_hidden_states_with_a_bf16_weight():
    """Before: a TypeError. Now the GEMM runs in the weight's dtype (bf16); each gradient comes back in its input's
    dtype (float32 hidden states, bf16 weight and bias), close to the reference on the bf16-rounded hidden states."""
    inputs = make_inputs(seed=22)
    for name in ("student_weight", "student_bias", "teacher_weight", "teacher_bias"):
        inputs[name] = inputs[name].detach().bfloat16().requires_grad_(inputs[name].requires_grad)
    options = dict(alpha=2.0, temperature=2.0, kd_weight=0.7, ce_weight=0.3)
    loss = fused_linear_contrastive_kd_loss(**inputs, chunk_size=8, **options)
    grads = torch.autograd.grad(loss, student_params(inputs))
    assert [g.dtype for g in grads] == [torch.float32, torch.bfloat16, torch.bfloat16]
    ref, ref_grads = bf16_reference(inputs, **options)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=2e-3, atol=2e-3)
    for grad, ref_grad in zip(grads, ref_grads):
        assert relative_error(grad, ref_grad) < 2e-2


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compact_false_runs_every_row_and_gives_the_same_result(monkeypatch, reduction):
    """``compact=False`` (no host synchronisation on CUDA): ignored and masked rows go through the GEMMs, the row
    kernels skip them, and the loss and gradients are those of the compacted call."""
    from caad_kernels import fused_linear as fused_module

    inputs = make_inputs(seed=23)
    mask = torch.ones(2, 19, dtype=torch.bool)
    mask[1, 10:] = False
    gemm_rows = []
    original = fused_module._linear_into
    monkeypatch.setattr(fused_module, "_linear_into",
                        lambda h, w, b: (gemm_rows.append(h.shape[0]), original(h, w, b))[1])
    results = []
    for compact in (True, False):
        gemm_rows.clear()
        loss = fused_linear_contrastive_kd_loss(**inputs, mask=mask, alpha=2.0, ce_weight=0.3, chunk_size=8,
                                                reduction=reduction, compact=compact)
        grads = torch.autograd.grad(loss.sum(), student_params(inputs))
        results.append((loss, grads, sum(gemm_rows)))
    (loss, grads, rows), (loss_all, grads_all, rows_all) = results
    factor = 2 if reduction == "none" else 1  # "none" runs the chunks again in backward
    assert rows == factor * 2 * (38 - 3 - 9) and rows_all == factor * 2 * 38  # student + one teacher GEMM
    torch.testing.assert_close(loss_all, loss, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads_all, grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
