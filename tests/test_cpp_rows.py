"""The C++ CPU row kernels (backend "cpp") against the torch backend and the float64 reference.

Row-level checks call ``forward_rows``/``backward_rows`` directly: ``kd``, ``ce`` and the ``stats``
columns are compared per row; gradients against ``torch_rows.backward_rows`` with the same
coefficients and against autograd through the materialising float64 reference of
``sum(coef_kd * kd) + sum(coef_ce * ce)``. Rows whose label is ``ignore_index`` are skipped by the
kernels (stats 0), so stats are compared on valid rows only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from caad_kernels import contrastive_kd_loss
from caad_kernels.backends import torch_rows
from caad_kernels.options import KDOptions
from caad_kernels.reference import contrastive_kd_loss_reference
from caad_kernels.rows import as_rows


@pytest.fixture(scope="module")
def cpp():
    """The ``cpp_rows`` module with its extension built (skips the file where it cannot be built)."""
    from caad_kernels.backends import cpp_rows

    try:
        cpp_rows.load_extension()
    except RuntimeError as error:
        pytest.skip(f"the C++ extension cannot be built here: {error}")
    return cpp_rows


def make_inputs(
    shape: tuple[int, int] = (2, 3),
    vocab: int = 1001,
    teacher_vocab: int | None = None,
    dtype: torch.dtype = torch.float32,
    negative: bool = True,
    labels: bool = True,
    scale: float = 3.0,
    ignore_index: int = -100,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Student ``[*shape, V]``, teacher and negative ``[*shape, V_t]``, labels ``[*shape]`` with ignored rows."""
    gen = torch.Generator().manual_seed(seed)
    width = teacher_vocab or vocab
    student = (torch.randn(*shape, vocab, generator=gen) * scale).to(dtype)
    teacher = (torch.randn(*shape, width, generator=gen) * scale).to(dtype)
    neg = (torch.randn(*shape, width, generator=gen) * scale).to(dtype) if negative else None
    y = None
    if labels:
        y = torch.randint(0, vocab, shape, generator=gen)
        flat = y.view(-1)
        flat[1 :: 3] = ignore_index  # every third row ignored
    return student, teacher, neg, y


def run_rows(module, student, teacher, negative, labels, opts: KDOptions, coef_seed: int = 1, grad=None):
    """``(kd, ce, stats, grad)`` of one backend's row kernels; coefficients are random, 0 on ignored rows."""
    params = opts.row_params(student.shape[-1], negative is not None, labels is not None)
    s_rows, t_rows = as_rows(student), as_rows(teacher)
    n_rows = as_rows(negative) if params.has_negative else None
    flat_labels = None if labels is None else labels.reshape(-1).contiguous()
    kd, ce, stats, _ = module.forward_rows(s_rows, t_rows, n_rows, flat_labels, params)
    coef_kd, coef_ce = row_coefficients(s_rows.rows, flat_labels, opts, coef_seed)
    if grad is None:
        grad = torch.empty(s_rows.rows, student.shape[-1], dtype=student.dtype)
    module.backward_rows(s_rows, t_rows, n_rows, flat_labels, stats, coef_kd, coef_ce, params, grad)
    return kd, ce, stats, grad


def row_coefficients(rows: int, labels: torch.Tensor | None, opts: KDOptions, seed: int):
    gen = torch.Generator().manual_seed(seed)
    coef_kd = torch.rand(rows, generator=gen)
    coef_ce = torch.rand(rows, generator=gen) if labels is not None else torch.zeros(rows)
    if labels is not None:
        valid = (labels != opts.ignore_index).float()
        coef_kd, coef_ce = coef_kd * valid, coef_ce * valid
    return coef_kd, coef_ce


def reference_rows(student, teacher, negative, labels, opts: KDOptions, coef_seed: int = 1):
    """float64 ``(kd, ce, lse_a, lse_b, lse_s, grad)`` per row from the materialising reference."""
    s64 = student.detach().double().requires_grad_(True)
    t64 = teacher.double()
    n64 = None if negative is None else negative.double()
    options = {**opts.__dict__, "reduction": "none", "temperature_scaling": False, "kd_weight": 1.0,
               "ce_weight": 0.0, "backend": "torch"}
    _, kd, ce = contrastive_kd_loss_reference(s64, t64, n64, labels, compute_dtype=torch.float64, **options)
    kd, ce = kd.reshape(-1), ce.reshape(-1)
    coef_kd, coef_ce = row_coefficients(kd.numel(), None if labels is None else labels.reshape(-1), opts, coef_seed)
    (coef_kd.double() * kd).sum().add((coef_ce.double() * ce).sum()).backward()
    vocab = student.shape[-1]
    from caad_kernels.reference import contrastive_teacher_logits

    z_hat = contrastive_teacher_logits(t64[..., :vocab], None if n64 is None else n64[..., :vocab], opts.alpha,
                                       opts.plausibility)
    tau = opts.temperature
    lse = [torch.logsumexp(x, dim=-1).reshape(-1) for x in (z_hat / tau, s64.detach() / tau, s64.detach())]
    return kd.detach(), ce.detach(), *lse, s64.grad.reshape(-1, vocab)


def valid_rows(labels: torch.Tensor | None, rows: int, ignore_index: int = -100) -> torch.Tensor:
    return torch.ones(rows, dtype=torch.bool) if labels is None else labels.reshape(-1) != ignore_index


def check_against_reference(cpp_out, ref, labels, ignore_index=-100, rtol=1e-5, atol=2e-5, grad_atol=2e-6):
    kd, ce, stats, grad = cpp_out
    ref_kd, ref_ce, lse_a, lse_b, lse_s, ref_grad = ref
    valid = valid_rows(labels, kd.numel(), ignore_index)
    torch.testing.assert_close(kd.double(), ref_kd, rtol=rtol, atol=atol)
    torch.testing.assert_close(ce.double(), ref_ce, rtol=rtol, atol=atol)
    for col, expected in enumerate((lse_a, lse_b, lse_s)):
        torch.testing.assert_close(stats[valid, col].double(), expected[valid], rtol=rtol, atol=atol)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=grad_atol)
    assert torch.all(grad[~valid] == 0)


def check_against_torch(cpp_out, torch_out, labels, ignore_index=-100, atol=2e-5, grad_atol=1e-6):
    """Both sides sum in float32 in different orders; reverse KL's ``log q - log p - KL`` cancels, hence
    the gradient's ``rtol`` (the reference checks are the tighter ones)."""
    valid = valid_rows(labels, cpp_out[0].numel(), ignore_index)
    for got, want in zip(cpp_out[:2], torch_out[:2]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=atol)
    torch.testing.assert_close(cpp_out[2][valid], torch_out[2][valid], rtol=1e-5, atol=atol)
    torch.testing.assert_close(cpp_out[3].float(), torch_out[3].float(), rtol=5e-5, atol=grad_atol)


OPTION_GRID = [
    (beta, alpha, temperature, plausibility)
    for beta in (0.0, 0.5, 1.0)
    for alpha in (0.0, 1.0, 2.0)
    for temperature in (0.5, 1.0, 2.0)
    for plausibility in (0.0, 0.1)
    if not (beta == 1.0 and plausibility > 0)
]


@pytest.mark.parametrize("beta,alpha,temperature,plausibility", OPTION_GRID)
def test_rows_match_torch_and_reference_over_options(cpp, beta, alpha, temperature, plausibility):
    student, teacher, negative, labels = make_inputs((2, 3), 1001, seed=int(10 * beta + 3 * alpha + temperature))
    opts = KDOptions(alpha=alpha, temperature=temperature, beta=beta, plausibility=plausibility)
    out = run_rows(cpp, student, teacher, negative, labels, opts)
    check_against_torch(out, run_rows(torch_rows, student, teacher, negative, labels, opts), labels)
    check_against_reference(out, reference_rows(student, teacher, negative, labels, opts), labels)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("negative,labels", [(False, False), (True, False), (False, True)])
def test_without_negative_or_labels(cpp, beta, negative, labels):
    student, teacher, neg, y = make_inputs((3, 2), 300, negative=negative, labels=labels)
    opts = KDOptions(alpha=2.0, temperature=2.0, beta=beta)
    out = run_rows(cpp, student, teacher, neg, y, opts)
    check_against_reference(out, reference_rows(student, teacher, neg, y, opts), y)


@pytest.mark.parametrize("vocab", [1, 37, 1001, 2048, 5003])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_odd_vocab_sizes(cpp, vocab, beta):
    student, teacher, negative, labels = make_inputs((2, 2), vocab, seed=vocab)
    opts = KDOptions(alpha=1.0, temperature=2.0, beta=beta, plausibility=0.0 if beta == 1.0 else 0.1)
    out = run_rows(cpp, student, teacher, negative, labels, opts)
    check_against_reference(out, reference_rows(student, teacher, negative, labels, opts), labels)


@pytest.mark.parametrize("threads", [1, 4])
@pytest.mark.parametrize("beta,plausibility", [(0.0, 0.0), (0.0, 0.1), (0.5, 0.1), (1.0, 0.0)])
def test_one_row_and_vocabulary_split(cpp, threads, beta, plausibility):
    """A single long row: with 4 threads it is split into column segments whose states are merged."""
    student, teacher, negative, labels = make_inputs((1, 1), 20000, labels=True, seed=7)
    labels.fill_(123)
    opts = KDOptions(alpha=2.0, temperature=2.0, beta=beta, plausibility=plausibility)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = run_rows(cpp, student, teacher, negative, labels, opts)
    finally:
        torch.set_num_threads(previous)
    check_against_reference(out, reference_rows(student, teacher, negative, labels, opts), labels,
                            rtol=2e-5, atol=5e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_half_precision_inputs(cpp, dtype, beta):
    student, teacher, negative, labels = make_inputs((2, 3), 1001, dtype=dtype, seed=3)
    opts = KDOptions(alpha=2.0, temperature=2.0, beta=beta)
    out = run_rows(cpp, student, teacher, negative, labels, opts)
    assert out[3].dtype == dtype
    # same low-precision inputs, float32 sums on both sides: only the gradient's rounding differs
    check_against_torch(out, run_rows(torch_rows, student, teacher, negative, labels, opts), labels,
                        atol=5e-5, grad_atol=2e-3)
    check_against_reference(out, reference_rows(student, teacher, negative, labels, opts), labels,
                            rtol=1e-4, atol=1e-4, grad_atol=2e-3)


def test_mixed_dtypes_teacher_float32_student_bfloat16(cpp):
    student, teacher, negative, labels = make_inputs((2, 3), 700, seed=5)
    student = student.bfloat16()
    negative = negative.half()
    opts = KDOptions(alpha=1.0, temperature=2.0, beta=0.0)
    out = run_rows(cpp, student, teacher, negative, labels, opts)
    check_against_reference(out, reference_rows(student, teacher, negative, labels, opts), labels,
                            rtol=1e-4, atol=1e-4, grad_atol=2e-3)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_strided_views_and_wider_teacher(cpp, beta):
    """``x[:, :-1]`` views (non-contiguous 3-D) and a teacher wider than the student, read in place."""
    base_s, base_t, base_n, base_y = make_inputs((3, 5), 513, teacher_vocab=540, seed=11)
    student, teacher, negative, labels = base_s[:, :-1], base_t[:, :-1], base_n[:, :-1], base_y[:, :-1]
    assert not student.is_contiguous() and as_rows(student).data.data_ptr() == student.data_ptr()
    opts = KDOptions(alpha=1.0, temperature=0.5, beta=beta)
    out = run_rows(cpp, student, teacher, negative, labels, opts)
    check_against_torch(out, run_rows(torch_rows, student, teacher, negative, labels, opts), labels)
    check_against_reference(out, reference_rows(student, teacher, negative, labels, opts), labels)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_extreme_logits(cpp, beta):
    student, teacher, negative, labels = make_inputs((2, 3), 300, scale=1.0, seed=13)
    gen = torch.Generator().manual_seed(0)
    for x in (student, teacher, negative):
        x.copy_(torch.where(torch.rand(x.shape, generator=gen) < 0.5, 1e4, -1e4) + x)
    opts = KDOptions(alpha=1.0, temperature=2.0, beta=beta)
    out = run_rows(cpp, student, teacher, negative, labels, opts)
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[3]).all()
    check_against_torch(out, run_rows(torch_rows, student, teacher, negative, labels, opts), labels,
                        atol=1e-2, grad_atol=1e-4)
    # z_hat = 2 z_pos - z_neg ~ 3e4 is rounded to float32 (0.002) before the softmax, on every
    # float32 backend: a relative 1e-4 of a divergence of ~5e3 is what that rounding allows.
    check_against_reference(out, reference_rows(student, teacher, negative, labels, opts), labels,
                            rtol=1e-4, atol=1e-2, grad_atol=5e-2)


@pytest.mark.parametrize("beta,plausibility", [(0.0, 0.0), (0.0, 0.1), (0.5, 0.0), (0.5, 0.1)])
def test_negative_infinity_in_positive_teacher(cpp, beta, plausibility):
    """``z_pos = -inf`` tokens have p = 0 whatever ``z_neg`` says: finite loss, no NaN anywhere."""
    student, teacher, negative, labels = make_inputs((2, 3), 2100, seed=17)
    teacher[..., ::7] = float("-inf")
    teacher[0, 0, :2100 - 5] = float("-inf")  # a row with only five finite tokens (tiles all -inf)
    opts = KDOptions(alpha=2.0, temperature=1.0, beta=beta, plausibility=plausibility)
    out = run_rows(cpp, student, teacher, negative, labels, opts)
    for tensor in out:
        assert not torch.isnan(tensor).any()
    check_against_reference(out, reference_rows(student, teacher, negative, labels, opts), labels)


def test_reverse_kl_with_negative_infinity_is_infinite_not_nan(cpp):
    student, teacher, negative, labels = make_inputs((1, 2), 50, labels=False)
    teacher[..., 3] = float("-inf")
    kd, _, _, _ = run_rows(cpp, student, teacher, negative, labels, KDOptions(alpha=1.0, beta=1.0))
    assert torch.isposinf(kd).all()


def test_custom_ignore_index(cpp):
    student, teacher, negative, labels = make_inputs((2, 4), 257, ignore_index=7)
    labels[labels == 7] = 8
    labels.view(-1)[1::3] = 7
    opts = KDOptions(alpha=1.0, temperature=2.0, ignore_index=7)
    out = run_rows(cpp, student, teacher, negative, labels, opts)
    assert torch.all(out[0][labels.view(-1) == 7] == 0) and torch.all(out[1][labels.view(-1) == 7] == 0)
    check_against_reference(out, reference_rows(student, teacher, negative, labels, opts), labels, ignore_index=7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_grad_may_alias_the_student(cpp, dtype, beta):
    student, teacher, negative, labels = make_inputs((2, 3), 4500, dtype=dtype, seed=19)
    opts = KDOptions(alpha=1.0, temperature=2.0, beta=beta)
    expected = run_rows(cpp, student, teacher, negative, labels, opts)[3]
    aliased = student.clone()
    run_rows(cpp, aliased, teacher, negative, labels, opts, grad=aliased.view(-1, aliased.shape[-1]))
    torch.testing.assert_close(aliased.view(-1, aliased.shape[-1]), expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_generic_kernels_match_the_vectorised_ones(cpp, dtype):
    """Both compiled kernel sets (baseline ISA and AVX2) give the same results to rounding."""
    ext = cpp.load_extension()
    student, teacher, negative, labels = make_inputs((2, 3), 3000, dtype=dtype, seed=23)
    results = {}
    for isa in ("generic", "auto"):
        ext.set_isa(isa)
        try:
            results[isa] = [run(cpp, student, teacher, negative, labels, KDOptions(alpha=2.0, temperature=2.0,
                                                                                  beta=beta))
                            for beta in (0.0, 0.5, 1.0) for run in (run_rows, run_fused)]
        finally:
            ext.set_isa("auto")
    for generic, best in zip(results["generic"], results["auto"]):
        for got, want in zip(generic, best):
            torch.testing.assert_close(got.float(), want.float(), rtol=1e-5 if dtype == torch.float32 else 1e-2,
                                       atol=1e-5)


def test_build_failure_is_a_clear_error_and_auto_falls_back(cpp, monkeypatch):
    from torch.utils import cpp_extension

    from caad_kernels import backends

    monkeypatch.setattr(cpp, "_module", None)
    monkeypatch.setattr(cpp, "_failure", None)
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
    with pytest.raises(RuntimeError, match="could not build the C\\+\\+ CPU kernels.*ninja"):
        cpp.load_extension()
    with pytest.raises(RuntimeError, match="ninja"):  # remembered, not retried
        cpp.load_extension()
    monkeypatch.setattr(backends, "_warned_cpp_fallback", False)
    with pytest.warns(RuntimeWarning, match="falling back"):
        assert backends.resolve_backend("auto", torch.device("cpu"), torch.float32) is torch_rows


def test_empty_rows(cpp):
    student, teacher, negative, _ = make_inputs((2, 3), 10, labels=False)
    kd, ce, stats, grad = run_rows(cpp, student[:, :0], teacher[:, :0], negative[:, :0], None,
                                   KDOptions(alpha=1.0))
    assert kd.shape == (0,) and stats.shape == (0, 5) and grad.shape == (0, 10)


def test_rejects_float64_and_bad_labels(cpp):
    student, teacher, negative, labels = make_inputs((1, 2), 10)
    with pytest.raises(TypeError, match="float64"):
        run_rows(cpp, student.double(), teacher, negative, labels, KDOptions())
    labels.view(-1)[0] = 10  # out of range: flagged (bit 8), NaN for that row, never read
    kd, ce, stats, grad = run_rows(cpp, student, teacher, negative, labels, KDOptions())
    params = KDOptions().row_params(10, True, True)
    flags = cpp.forward_rows(as_rows(student), as_rows(teacher), as_rows(negative), labels.reshape(-1), params)[3]
    assert flags.tolist() == [8, 0]
    assert torch.isnan(kd[0]) and torch.isnan(ce[0]) and torch.isnan(grad[0]).all()
    assert torch.isfinite(kd[1]) and torch.isfinite(grad[1]).all()


@pytest.mark.parametrize(
    "options",
    [
        dict(alpha=2.0, temperature=2.0, kd_weight=0.7, ce_weight=0.3),  # CAAD's published setting
        dict(alpha=1.0, temperature=1.0, beta=0.5, plausibility=0.1, reduction="sum"),
        dict(alpha=0.5, temperature=0.5, beta=1.0, ce_weight=1.0, temperature_scaling=False, reduction="none"),
    ],
)
def test_public_op_matches_reference(cpp, options):
    student, teacher, negative, labels = make_inputs((2, 5), 777, teacher_vocab=800, seed=29)
    student = student[:, 1:].clone().requires_grad_(True)
    teacher, negative, labels = teacher[:, 1:], negative[:, 1:], labels[:, 1:]
    loss = contrastive_kd_loss(student, teacher, negative, labels, backend="cpp", **options)
    s64 = student.detach().double().requires_grad_(True)
    ref, _, _ = contrastive_kd_loss_reference(s64, teacher.double(), negative.double(), labels,
                                              compute_dtype=torch.float64, **options)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    upstream = torch.randn(loss.shape, dtype=torch.float64)
    loss.backward(upstream.float())
    ref.backward(upstream)
    torch.testing.assert_close(student.grad.double(), s64.grad, rtol=1e-5, atol=1e-6)


def test_second_process_reuses_the_cached_build(cpp):
    """A fresh interpreter loads the cached binary: no object file or library is rewritten."""
    cpp.load_extension()
    build_dir = cpp.build_directory()
    artefacts = {p: p.stat().st_mtime_ns for p in build_dir.iterdir() if p.suffix in (".o", ".so")}
    assert any(p.suffix == ".o" for p in artefacts) and any(p.suffix == ".so" for p in artefacts)
    code = "from caad_kernels.backends import cpp_rows; print(cpp_rows.load_extension().__file__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900,
                          env=dict(os.environ), cwd=str(Path(__file__).resolve().parent.parent))
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip().splitlines()[-1]).parent == build_dir
    after = {p: p.stat().st_mtime_ns for p in build_dir.iterdir() if p.suffix in (".o", ".so")}
    assert after == artefacts


# ---------------------------------------------------------------------------------------------
# loss_and_grad_rows: the fused forward + gradient pass


def run_fused(module, student, teacher, negative, labels, opts: KDOptions, coef_seed: int = 1, grad=None):
    """``(kd, ce, stats, grad)`` of ``loss_and_grad_rows`` with the coefficients of :func:`run_rows`."""
    params = opts.row_params(student.shape[-1], negative is not None, labels is not None)
    s_rows, t_rows = as_rows(student), as_rows(teacher)
    n_rows = as_rows(negative) if params.has_negative else None
    flat_labels = None if labels is None else labels.reshape(-1).contiguous()
    coef_kd, coef_ce = row_coefficients(s_rows.rows, flat_labels, opts, coef_seed)
    if grad is None:
        grad = torch.full((s_rows.rows, student.shape[-1]), float("nan"), dtype=student.dtype)
    kd, ce, stats, _ = module.loss_and_grad_rows(s_rows, t_rows, n_rows, flat_labels, coef_kd, coef_ce, params,
                                                 grad)
    return kd, ce, stats, grad


def check_fused_against_two_pass(fused, two_pass, labels, ignore_index=-100, grad_rtol=5e-5, grad_atol=1e-6):
    """Same forward code on both sides: ``kd``, ``ce`` and ``stats`` agree exactly; the gradients differ by
    the fused pass's log-probabilities (from the row's maxima and sums, not the rounded lse), which matter
    most where reverse KL's ``log q - log p - KL`` cancels, hence the ``rtol`` (the reference checks are
    the tighter ones)."""
    valid = valid_rows(labels, fused[0].numel(), ignore_index)
    torch.testing.assert_close(fused[0], two_pass[0], rtol=0, atol=0)
    torch.testing.assert_close(fused[1], two_pass[1], rtol=0, atol=0)
    torch.testing.assert_close(fused[2][valid], two_pass[2][valid], rtol=0, atol=0)
    assert fused[3].dtype == two_pass[3].dtype
    torch.testing.assert_close(fused[3].float(), two_pass[3].float(), rtol=grad_rtol, atol=grad_atol)
    assert torch.all(fused[3][~valid] == 0)


FUSED_GRID = [
    (beta, temperature, plausibility)
    for beta in (0.0, 0.5, 1.0)
    for temperature in (0.5, 1.0, 2.0)
    for plausibility in (0.0, 0.1)
    if not (beta == 1.0 and plausibility > 0)
]


@pytest.mark.parametrize("negative,labels", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("beta,temperature,plausibility", FUSED_GRID)
def test_loss_and_grad_matches_forward_backward_and_reference(cpp, beta, temperature, plausibility, negative,
                                                              labels):
    student, teacher, neg, y = make_inputs((2, 3), 1001, negative=negative, labels=labels,
                                           seed=int(10 * beta + 3 * temperature + 100 * plausibility))
    opts = KDOptions(alpha=2.0, temperature=temperature, beta=beta, plausibility=plausibility)
    fused = run_fused(cpp, student, teacher, neg, y, opts)
    check_fused_against_two_pass(fused, run_rows(cpp, student, teacher, neg, y, opts), y)
    # reverse KL at tau = 0.5 has KL(q||p) ~ 80 here, known to ~1e-6 relative in float32 sums (on every
    # float32 backend): its gradient q (log q - log p - KL) inherits that absolute error
    grad_atol = 5e-5 if beta == 1.0 and temperature == 0.5 else 2e-6
    check_against_reference(fused, reference_rows(student, teacher, neg, y, opts), y, grad_atol=grad_atol)


@pytest.mark.parametrize("vocab", [1, 37, 2049, 5003])
@pytest.mark.parametrize("beta,plausibility", [(0.0, 0.1), (0.5, 0.1), (1.0, 0.0)])
def test_loss_and_grad_odd_vocab_sizes(cpp, vocab, beta, plausibility):
    """Vocabularies that are not a multiple of the 2048-column tile (and shorter than one tile)."""
    student, teacher, negative, labels = make_inputs((2, 2), vocab, seed=vocab + 1)
    opts = KDOptions(alpha=1.0, temperature=2.0, beta=beta, plausibility=plausibility)
    fused = run_fused(cpp, student, teacher, negative, labels, opts)
    check_fused_against_two_pass(fused, run_rows(cpp, student, teacher, negative, labels, opts), labels)
    check_against_reference(fused, reference_rows(student, teacher, negative, labels, opts), labels)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("beta,plausibility", [(0.0, 0.0), (0.5, 0.1), (1.0, 0.0)])
def test_loss_and_grad_dtypes_and_aliasing(cpp, dtype, beta, plausibility):
    """``grad`` is the student tensor itself (as in the fused-linear op): same result as a separate buffer."""
    student, teacher, negative, labels = make_inputs((2, 3), 4500, dtype=dtype, seed=31)
    opts = KDOptions(alpha=2.0, temperature=2.0, beta=beta, plausibility=plausibility)
    separate = run_fused(cpp, student, teacher, negative, labels, opts)
    assert separate[3].dtype == dtype
    aliased = student.clone()
    out = run_fused(cpp, aliased, teacher, negative, labels, opts, grad=aliased.view(-1, aliased.shape[-1]))
    assert out[3].data_ptr() == aliased.data_ptr()
    for got, want in zip(out, separate):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    low = dtype != torch.float32
    check_fused_against_two_pass(separate, run_rows(cpp, student, teacher, negative, labels, opts), labels,
                                 grad_rtol=1e-2 if low else 1e-5, grad_atol=2e-3 if low else 1e-6)
    check_against_reference(separate, reference_rows(student, teacher, negative, labels, opts), labels,
                            rtol=1e-4 if low else 1e-5, atol=1e-4 if low else 2e-5, grad_atol=2e-3 if low else 2e-6)


@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("beta,plausibility", [(0.0, 0.0), (0.0, 0.1), (0.5, 0.1), (1.0, 0.0)])
def test_loss_and_grad_split_rows_with_aliasing(cpp, rows, beta, plausibility):
    """Fewer rows than threads: rows are split into column segments, and the gradient (written over the
    student) is only written once every segment of the row has been read and merged."""
    student, teacher, negative, labels = make_inputs((1, rows), 20001, labels=True, seed=37)
    labels.fill_(123)
    opts = KDOptions(alpha=2.0, temperature=2.0, beta=beta, plausibility=plausibility)
    previous = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        aliased = student.clone()
        fused = run_fused(cpp, aliased, teacher, negative, labels, opts, grad=aliased.view(-1, aliased.shape[-1]))
        two_pass = run_rows(cpp, student, teacher, negative, labels, opts)
        torch.set_num_threads(1)
        single = run_fused(cpp, student, teacher, negative, labels, opts)  # one unit per row, no split
    finally:
        torch.set_num_threads(previous)
    check_fused_against_two_pass(fused, two_pass, labels, grad_atol=2e-6)
    for got, want in zip(fused, single):
        torch.testing.assert_close(got, want, rtol=2e-5, atol=5e-6)
    check_against_reference(fused, reference_rows(student, teacher, negative, labels, opts), labels,
                            rtol=2e-5, atol=5e-5)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_loss_and_grad_extreme_logits(cpp, beta):
    """Logits near +-1e4: log p, log q from the row's maxima and sums stay accurate (no rounded lse)."""
    student, teacher, negative, labels = make_inputs((2, 3), 300, scale=1.0, seed=13)
    gen = torch.Generator().manual_seed(0)
    for x in (student, teacher, negative):
        x.copy_(torch.where(torch.rand(x.shape, generator=gen) < 0.5, 1e4, -1e4) + x)
    opts = KDOptions(alpha=1.0, temperature=2.0, beta=beta)
    fused = run_fused(cpp, student, teacher, negative, labels, opts)
    assert torch.isfinite(fused[0]).all() and torch.isfinite(fused[3]).all()
    check_against_reference(fused, reference_rows(student, teacher, negative, labels, opts), labels,
                            rtol=1e-4, atol=1e-2, grad_atol=5e-2)


@pytest.mark.parametrize("beta,temperature", [(0.0, 1.0), (0.0, 2.0), (0.5, 1.0), (0.5, 2.0)])
def test_loss_and_grad_precise_log_probabilities(cpp, beta, temperature):
    """Large, offset logits: the fused pass forms log p = (a - m_a) - log S_a (and likewise log q) instead
    of a - lse_a with lse_a rounded to float32, and stays within 1e-6 of the float64 gradient. The negative
    path stays near the positive one (as in real use), so z_hat = z_pos + alpha (z_pos - z_neg) is formed
    to the precision of z_pos."""
    student, teacher, negative, labels = make_inputs((2, 3), 1001, scale=30.0, seed=43)
    student += 500.0
    teacher += 300.0
    negative = teacher + torch.randn(teacher.shape, generator=torch.Generator().manual_seed(1))
    opts = KDOptions(alpha=2.0, temperature=temperature, beta=beta)
    fused = run_fused(cpp, student, teacher, negative, labels, opts)
    ref = reference_rows(student, teacher, negative, labels, opts)
    torch.testing.assert_close(fused[3].double(), ref[-1], rtol=0, atol=1e-6)


def test_loss_and_grad_empty_rows_and_bad_grad(cpp):
    student, teacher, negative, labels = make_inputs((2, 3), 10)
    kd, ce, stats, grad = run_fused(cpp, student[:, :0], teacher[:, :0], negative[:, :0], None, KDOptions(alpha=1.0))
    assert kd.shape == (0,) and stats.shape == (0, 5) and grad.shape == (0, 10)
    with pytest.raises(RuntimeError, match="grad must be"):
        run_fused(cpp, student, teacher, negative, labels, KDOptions(), grad=torch.empty(6, 10, dtype=torch.bfloat16))


def test_fused_linear_uses_loss_and_grad_rows(cpp):
    """The fused-linear op takes the one-pass path with this backend and matches the logits-level op."""
    from caad_kernels import fused_linear_contrastive_kd_loss

    assert hasattr(cpp, "loss_and_grad_rows")
    gen = torch.Generator().manual_seed(41)
    h_s = torch.randn(2, 5, 16, generator=gen).requires_grad_(True)
    w_s = torch.randn(300, 16, generator=gen).requires_grad_(True)
    h_t, h_n = torch.randn(2, 5, 12, generator=gen), torch.randn(2, 5, 12, generator=gen)
    w_t = torch.randn(310, 12, generator=gen)
    y = torch.randint(0, 300, (2, 5), generator=gen)
    y[0, 1] = -100
    options = dict(alpha=2.0, temperature=2.0, beta=0.5, plausibility=0.1, kd_weight=0.7, ce_weight=0.3)
    loss = fused_linear_contrastive_kd_loss(h_s, w_s, h_t, w_t, h_n, y, chunk_size=3, backend="cpp", **options)
    loss.backward()
    h_s2, w_s2 = h_s.detach().clone().requires_grad_(True), w_s.detach().clone().requires_grad_(True)
    ref = contrastive_kd_loss(h_s2 @ w_s2.T, h_t @ w_t[:300].T, h_n @ w_t[:300].T, y, backend="torch", **options)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h_s.grad, h_s2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w_s.grad, w_s2.grad, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# per-row alpha, logit scales and softcaps, row flags, padded gradient rows, the build announcement


def rows_with_options(module, student, teacher, negative, labels, opts: KDOptions, alpha_rows, fused: bool,
                      grad=None):
    """``(kd, ce, stats, flags, grad)`` of one backend with ``alpha_rows`` (and random coefficients)."""
    params = opts.row_params(student.shape[-1], negative is not None, labels is not None)
    views = (as_rows(student), as_rows(teacher), as_rows(negative) if params.has_negative else None)
    flat = None if labels is None else labels.reshape(-1).contiguous()
    coef_kd, coef_ce = row_coefficients(views[0].rows, flat, opts, 3)
    if grad is None:
        grad = torch.full((views[0].rows, student.shape[-1]), float("nan"), dtype=student.dtype)
    if fused:
        out = module.loss_and_grad_rows(*views, flat, coef_kd, coef_ce, params, grad, alpha_rows=alpha_rows)
    else:
        out = module.forward_rows(*views, flat, params, alpha_rows=alpha_rows)
        module.backward_rows(*views, flat, out[2], coef_kd, coef_ce, params, grad, alpha_rows=alpha_rows)
    return (*out, grad)


TRANSFORMS = [
    dict(student_softcap=4.0, teacher_softcap=3.0),
    dict(student_logit_scale=0.5, teacher_logit_scale=1.7, teacher_softcap=6.0, plausibility=0.1),
    dict(student_logit_scale=2.0, beta=0.5, student_softcap=10.0),
    dict(beta=1.0, teacher_softcap=5.0, temperature=0.5),
]


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("shape,vocab,threads", [((2, 3), 1001, 2), ((1, 2), 20001, 4)])
def test_options_match_the_torch_rows(cpp, transform, fused, shape, vocab, threads):
    """Per-row alpha and the transforms, whole rows and rows split into column segments, against torch_rows."""
    student, teacher, negative, labels = make_inputs(shape, vocab, seed=vocab + len(transform))
    negative = teacher + torch.randn(teacher.shape, generator=torch.Generator().manual_seed(2))
    alpha_rows = torch.rand(labels.numel(), generator=torch.Generator().manual_seed(3)) * 3
    opts = KDOptions(**{"alpha": 1.0, "temperature": 2.0, **transform})
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = rows_with_options(cpp, student, teacher, negative, labels, opts, alpha_rows, fused)
    finally:
        torch.set_num_threads(previous)
    want = rows_with_options(torch_rows, student, teacher, negative, labels, opts, alpha_rows, False)
    valid = valid_rows(labels, labels.numel())
    for index, (a, b) in enumerate(zip(got, want)):
        a, b = (a[valid], b[valid]) if index in (2, 4) else (a, b)
        torch.testing.assert_close(a.double(), b.double(), rtol=5e-5, atol=2e-5 if index < 4 else 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_generic_and_avx2_softcap_agree(cpp, dtype):
    """The vectorised tanh of both compiled kernel sets."""
    ext = cpp.load_extension()
    student, teacher, negative, labels = make_inputs((2, 3), 3000, dtype=dtype, seed=47)
    opts = KDOptions(alpha=2.0, temperature=2.0, beta=0.5, student_softcap=5.0, teacher_softcap=4.0)
    results = {}
    for isa in ("generic", "auto"):
        ext.set_isa(isa)
        try:
            results[isa] = rows_with_options(cpp, student, teacher, negative, labels, opts, None, True)
        finally:
            ext.set_isa("auto")
    for got, want in zip(results["generic"], results["auto"]):
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-5 if dtype == torch.float32 else 1e-2,
                                   atol=1e-5, equal_nan=True)


def test_row_flags_and_ignored_rows_never_read(cpp):
    """NaN/+inf per path (and -inf in z_neg where z_pos is finite) flag their row with NaN results; an ignored row
    full of NaN is not read at all."""
    student, teacher, negative, labels = make_inputs((2, 3), 300, seed=53)
    labels.view(-1)[:] = torch.tensor([1, -100, 2, 3, 4, 5])
    student[0, 0, 7] = float("inf")
    teacher[0, 2, 9] = float("nan")
    negative[1, 0, 11] = float("-inf")
    negative[1, 1, 12] = float("inf")
    student[0, 1] = float("nan")  # the ignored row
    opts = KDOptions(alpha=2.0, temperature=2.0)
    for fused in (False, True):
        kd, ce, stats, flags, grad = rows_with_options(cpp, student, teacher, negative, labels, opts, None, fused)
        assert flags.tolist() == [1, 0, 2, 4, 4, 0]
        bad = flags != 0
        assert torch.isnan(kd[bad]).all() and torch.isnan(ce[bad]).all() and torch.isnan(grad[bad]).any()
        assert kd[1] == 0 and ce[1] == 0 and torch.all(grad[1] == 0)
        assert torch.isfinite(kd[5]) and torch.isfinite(grad[5]).all()


@pytest.mark.parametrize("threads", [1, 4])
def test_gradient_rows_may_be_padded(cpp, threads):
    """The fused-linear op hands ``grad`` (its chunk logits) with a row stride rounded up to 16 elements."""
    student, teacher, negative, labels = make_inputs((1, 3), 5003, seed=59)
    opts = KDOptions(alpha=2.0, temperature=2.0, beta=0.5)
    padded = torch.full((3, 5008), 7.0)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        expected = rows_with_options(cpp, student, teacher, negative, labels, opts, None, True)[4]
        for fused in (False, True):
            padded.fill_(7.0)
            rows_with_options(cpp, student, teacher, negative, labels, opts, None, fused, grad=padded[:, :5003])
            torch.testing.assert_close(padded[:, :5003], expected, rtol=1e-6, atol=1e-9)
            assert torch.all(padded[:, 5003:] == 7.0)  # the padding is never written
    finally:
        torch.set_num_threads(previous)


def test_first_build_is_announced_once(cpp, tmp_path, capsys, monkeypatch):
    """The ~20-60 s first compile says what it does and where the cache is, once, and not for a cached build."""
    monkeypatch.setattr(cpp, "_announced", False)
    (tmp_path / "cached").mkdir()
    (tmp_path / "cached" / "ext.so").write_bytes(b"")
    cpp._announce_build(tmp_path / "cached")
    assert capsys.readouterr().err == ""
    cpp._announce_build(tmp_path)
    cpp._announce_build(tmp_path)
    err = capsys.readouterr().err
    assert err.count("compiling the C++ CPU kernels") == 1 and str(tmp_path) in err and "CAAD_KERNELS_CACHE" in err


def test_two_checkouts_of_the_same_sources_build_in_different_directories(cpp, tmp_path, monkeypatch):
    """Before: the cache key hashed the sources' contents only, so two checkouts (a clone and the repository, an
    installed package and a clone) shared one build directory while their build commands differed (source path,
    ``-I``), and ninja rebuilt, in turn, under a process that was loading the library."""
    copy = tmp_path / "csrc"
    shutil.copytree(cpp.source_directory(), copy)
    key = cpp.build_key()
    monkeypatch.setattr(cpp, "source_directory", lambda: copy)
    copy_key = cpp.build_key()
    assert copy_key != key
    monkeypatch.setattr(cpp, "source_directory", lambda: tmp_path / "csrc" / ".." / "csrc")
    assert cpp.build_key() == copy_key  # the same directory, however it is spelled, keeps its key
