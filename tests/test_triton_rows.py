"""The Triton row kernels against the chunked torch backend and the float64 reference.

Runs on the CPU under ``TRITON_INTERPRET=1`` (set by the root ``conftest.py`` on machines without
CUDA) with small shapes and small tiles (``block_v=32`` for V = 37, the automatic 128 for V = 1000), so that rows
span several tiles, the last one partial, and the online-softmax rescaling is exercised.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("the triton backend needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from caad_kernels import contrastive_kd_loss
from caad_kernels.backends import torch_rows, triton_rows
from caad_kernels.options import KDOptions, RowParams
from caad_kernels.reference import contrastive_kd_loss_reference
from caad_kernels.rows import as_rows

# numpy warns about the inf - inf lanes that tl.where then discards
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
BLOCK = 32


def make_inputs(
    batch: int = 2,
    seq: int = 2,
    vocab: int = 37,
    teacher_vocab: int = 41,
    dtype: torch.dtype = torch.float32,
    scale: float = 3.0,
    seed: int = 0,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student as the non-contiguous slice ``[:, :-1]``; a wider, contiguous teacher; one ignored row."""
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(batch, seq + 1, vocab, generator=g) * scale).to(dtype)[:, :-1]
    teacher = (torch.randn(batch, seq, teacher_vocab, generator=g) * scale).to(dtype)
    negative = (teacher.float() + torch.randn(batch, seq, teacher_vocab, generator=g)).to(dtype)
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels.view(-1)[min(1, labels.numel() - 1)] = ignore_index
    return student.to(DEVICE), teacher.to(DEVICE), negative.to(DEVICE), labels.to(DEVICE)


def make_coefs(
    labels: torch.Tensor | None, rows: int, ignore_index: int, seed: int = 1
) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    coef_kd = torch.rand(rows, generator=g) + 0.5
    coef_ce = torch.rand(rows, generator=g) + 0.5
    if labels is None:
        coef_ce.zero_()
    else:
        valid = (labels.reshape(-1) != ignore_index).float().cpu()
        coef_kd, coef_ce = coef_kd * valid, coef_ce * valid
    return coef_kd.to(DEVICE), coef_ce.to(DEVICE)


def row_params(
    opts: KDOptions, vocab: int, negative: torch.Tensor | None, labels: torch.Tensor | None
) -> RowParams:
    return opts.row_params(vocab, negative is not None, labels is not None)


def row_args(student, teacher, negative, labels, params):
    flat = None if labels is None else labels.reshape(-1).to(torch.int64).contiguous()
    return as_rows(student), as_rows(teacher), as_rows(negative) if params.has_negative else None, flat


def reference_rows(student, teacher, negative, labels, coef_kd, coef_ce, opts: KDOptions):
    """float64 per-row ``(kd, ce)`` (raw divergence) and the gradient of ``sum(c_kd kd + c_ce ce)``."""
    s = student.detach().double().requires_grad_(True)
    options = dict(opts.__dict__, reduction="none", temperature_scaling=False, backend="torch")
    _, kd, ce = contrastive_kd_loss_reference(
        s, teacher.double(), None if negative is None else negative.double(), labels,
        compute_dtype=torch.float64, **options,
    )  # fmt: skip
    kd, ce = kd.reshape(-1), ce.reshape(-1)
    objective = (coef_kd.double() * kd).sum() + (coef_ce.double() * ce).sum()
    (grad,) = torch.autograd.grad(objective, s)
    return kd.detach(), ce.detach(), grad.reshape(-1, student.shape[-1])


def run_backend(module, student, teacher, negative, labels, coef_kd, coef_ce, params, **kw):
    """``(kd, ce, stats, grad)`` from ``forward_rows`` then ``backward_rows`` of ``module``."""
    args = row_args(student, teacher, negative, labels, params)
    kd, ce, stats, _ = module.forward_rows(*args, params, **kw)
    grad = torch.empty(
        student.shape[:-1].numel(), student.shape[-1], dtype=student.dtype, device=student.device
    )
    module.backward_rows(*args, stats, coef_kd, coef_ce, params, grad, **kw)
    return kd, ce, stats, grad


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float) -> None:
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), atol=atol, rtol=rtol)


def check_all(
    student, teacher, negative, labels, opts: KDOptions, atol=1e-5, rtol=1e-5, grad_atol=None, **kw
):
    """Forward, backward and the one-launch form against torch_rows and the float64 reference."""
    vocab = student.shape[-1]
    params = row_params(opts, vocab, negative, labels)
    rows = student.shape[:-1].numel()
    coef_kd, coef_ce = make_coefs(labels, rows, opts.ignore_index)
    kd, ce, stats, grad = run_backend(
        triton_rows, student, teacher, negative, labels, coef_kd, coef_ce, params, **kw
    )
    t_kd, t_ce, t_stats, t_grad = run_backend(
        torch_rows, student, teacher, negative, labels, coef_kd, coef_ce, params
    )
    r_kd, r_ce, r_grad = reference_rows(student, teacher, negative, labels, coef_kd, coef_ce, opts)
    grad_atol = atol if grad_atol is None else grad_atol
    for name, value in (("kd", kd), ("ce", ce), ("stats", stats), ("grad", grad)):
        assert torch.isfinite(value).all(), f"{name} is not finite: {value}"
    assert kd.dtype == ce.dtype == stats.dtype == torch.float32 and grad.dtype == student.dtype
    assert_close(kd, r_kd, atol, rtol)
    assert_close(ce, r_ce, atol, rtol)
    assert_close(kd, t_kd, atol, rtol)
    assert_close(ce, t_ce, atol, rtol)
    # stats are unspecified on ignored rows (triton never reads those rows and writes zeros)
    valid = torch.ones(rows, dtype=torch.bool) if labels is None else labels.reshape(-1).cpu() != opts.ignore_index
    assert_close(stats[valid], t_stats[valid], atol, rtol)
    assert_close(grad, r_grad, grad_atol, rtol)
    assert_close(grad, t_grad.to(grad.dtype), grad_atol, rtol)

    # forward and backward in one launch: the same loss; the gradient may differ by rounding
    # (it uses max and log-sum apart where backward_rows has only their sum, lse)
    args = row_args(student, teacher, negative, labels, params)
    fused_grad = torch.empty_like(grad)
    f_kd, f_ce, f_stats, _ = triton_rows.loss_and_grad_rows(*args, coef_kd, coef_ce, params, fused_grad, **kw)
    assert_close(f_kd, kd, 0, 0)
    assert_close(f_ce, ce, 0, 0)
    assert_close(f_stats, stats, 0, 0)
    assert_close(fused_grad, r_grad, grad_atol, rtol)
    assert_close(fused_grad, grad, grad_atol, rtol)
    return kd, ce, stats, grad


# divergence/cutoff x (alpha, negative) x labels; tau alternates so each divergence sees both
DIVERGENCES = [(0.0, 0.0), (0.0, 0.1), (0.5, 0.0), (0.5, 0.1), (1.0, 0.0)]
NEGATIVE_MODES = ["contrastive", "alpha0", "none"]
GRID = [
    (beta, cutoff, mode, has_labels, 0.5 if (i + j) % 2 else 2.0)
    for (beta, cutoff), (i, mode), (j, has_labels) in itertools.product(
        DIVERGENCES, enumerate(NEGATIVE_MODES), enumerate([True, False])
    )
]


@pytest.mark.parametrize(
    "seed,beta,plausibility,mode,has_labels,tau", [(i, *case) for i, case in enumerate(GRID)]
)
def test_grid_fp32(seed, beta, plausibility, mode, has_labels, tau):
    student, teacher, negative, labels = make_inputs(seed=100 + seed)
    opts = KDOptions(
        alpha=0.0 if mode == "alpha0" else 2.0, temperature=tau, beta=beta, plausibility=plausibility
    )
    check_all(
        student, teacher, None if mode == "none" else negative, labels if has_labels else None, opts,
        block_v=BLOCK,
    )  # fmt: skip


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_vocab_1000_default_tiles(beta):
    """V = 1000 with the automatic tile (128 under the interpreter): 8 tiles, the last partial."""
    student, teacher, negative, labels = make_inputs(batch=1, seq=2, vocab=1000, teacher_vocab=1003, seed=3)
    check_all(
        student, teacher, negative, labels, KDOptions(alpha=2.0, temperature=2.0, beta=beta, plausibility=0.1)
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_half_precision(dtype, beta):
    """Half inputs: exact fp32 math on the rounded values; the gradient is rounded to ``dtype``."""
    student, teacher, negative, labels = make_inputs(dtype=dtype, seed=4)
    _, _, _, grad = check_all(
        student, teacher, negative, labels, KDOptions(alpha=2.0, temperature=2.0, beta=beta),
        atol=1e-4, rtol=1e-4, grad_atol=2e-2, block_v=BLOCK,
    )  # fmt: skip
    assert grad.dtype == dtype


def test_float64_inputs_computed_in_float32():
    student, teacher, negative, labels = make_inputs(dtype=torch.float64, seed=5)
    check_all(
        student, teacher, negative, labels, KDOptions(alpha=2.0, temperature=0.5, beta=0.5), block_v=BLOCK
    )


def test_vocab_1():
    student, teacher, negative, labels = make_inputs(vocab=1, teacher_vocab=3, seed=6)
    labels = torch.where(labels == -100, labels, torch.zeros_like(labels))
    for beta in (0.0, 0.5, 1.0):
        kd, ce, _, grad = check_all(student, teacher, negative, labels, KDOptions(alpha=2.0, beta=beta))
        assert kd.abs().max() < 1e-6 and ce.abs().max() < 1e-6 and grad.abs().max() < 1e-6


def test_single_row_one_dimensional():
    g = torch.Generator().manual_seed(7)
    student, teacher, negative = (torch.randn(37, generator=g).to(DEVICE) * 2 for _ in range(3))
    labels = torch.tensor(5, device=DEVICE)
    check_all(
        student, teacher, negative, labels, KDOptions(alpha=1.0, temperature=2.0, beta=0.5), block_v=BLOCK
    )


def test_strided_teacher_and_contiguous_student():
    """Views folded differently: the teacher sliced ``[:, 1:]`` (2-D rows), the student contiguous."""
    student, teacher, negative, labels = make_inputs(seed=8)
    teacher = torch.cat([teacher[:, :1], teacher], dim=1)[:, 1:]
    negative = torch.cat([negative[:, :1], negative], dim=1)[:, 1:]
    assert not teacher.is_contiguous()
    check_all(
        student.contiguous(), teacher, negative, labels, KDOptions(alpha=2.0, temperature=2.0), block_v=BLOCK
    )


@pytest.mark.parametrize("beta,plausibility", [(0.0, 0.0), (0.5, 0.1), (1.0, 0.0)])
def test_extreme_logits(beta, plausibility):
    """Logits of +/-1e4 with the maxima in the last tiles, so the running maxima jump by 2e4.

    float32 holds ``lse ~ 5000`` to ``ulp = 5e-4``, which bounds what any float32 backend can match
    against the float64 reference (the torch backend's gradient is off by the same amount).
    """
    g = torch.Generator().manual_seed(9)
    shape = (2, 3, 37)
    student = (torch.randint(0, 2, shape, generator=g) * 2 - 1).float() * 1e4
    teacher = (torch.randint(0, 2, shape, generator=g) * 2 - 1).float() * 1e4
    # integer offsets keep z_hat exact in float32, so the float64 reference sees the same numbers
    negative = teacher + torch.randint(-3, 4, shape, generator=g).float()
    student[..., :32] = -1e4
    teacher[..., :32] = -1e4
    student[:, :, 36], teacher[:, :, 35] = 1e4, 1e4
    labels = torch.randint(0, 37, shape[:2], generator=g)
    opts = KDOptions(alpha=2.0, temperature=2.0, beta=beta, plausibility=plausibility)
    check_all(
        student.to(DEVICE), teacher.to(DEVICE), negative.to(DEVICE), labels.to(DEVICE), opts,
        atol=1e-3, rtol=1e-4, block_v=BLOCK,
    )  # fmt: skip


def with_neg_inf(teacher: torch.Tensor, negative: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``-inf`` at the same places in both paths: a whole first tile of row 0, scattered elsewhere."""
    teacher, negative = teacher.clone(), negative.clone()
    mask = torch.zeros(teacher.shape, dtype=torch.bool)
    mask[0, 0, :BLOCK] = True
    mask[1, 1, ::3] = True
    mask[0, 1, 36] = True
    teacher[mask], negative[mask] = float("-inf"), float("-inf")
    return teacher, negative


@pytest.mark.parametrize("beta,plausibility", [(0.0, 0.0), (0.0, 0.1), (0.5, 0.0), (0.5, 0.1)])
def test_neg_inf_teacher(beta, plausibility):
    student, teacher, negative, labels = make_inputs(seed=10)
    teacher, negative = with_neg_inf(teacher, negative)
    opts = KDOptions(alpha=2.0, temperature=2.0, beta=beta, plausibility=plausibility)
    check_all(student, teacher, negative, labels, opts, block_v=BLOCK)


def test_neg_inf_teacher_reverse_kl_is_infinite():
    """Reverse KL is infinite where the teacher gives 0 probability and the student does not."""
    student, teacher, negative, labels = make_inputs(seed=11)
    teacher, negative = with_neg_inf(teacher, negative)
    labels = torch.zeros_like(labels)
    params = row_params(KDOptions(alpha=2.0, temperature=2.0, beta=1.0), 37, negative, labels)
    args = row_args(student, teacher, negative, labels, params)
    kd, ce, stats, _ = triton_rows.forward_rows(*args, params, block_v=BLOCK)
    t_kd, t_ce, t_stats, _ = torch_rows.forward_rows(*args, params)
    assert torch.isinf(kd).tolist() == [True, True, False, True]
    assert_close(kd, t_kd, 1e-5, 1e-5)
    assert_close(ce, t_ce, 1e-5, 1e-5)
    assert_close(stats, t_stats, 1e-5, 1e-5)


def test_custom_ignore_index_inside_vocabulary():
    """``ignore_index=5`` is also a real token id: such rows must still be ignored."""
    student, teacher, negative, labels = make_inputs(seed=12, ignore_index=5)
    labels.view(-1)[3] = 5
    kd, ce, _, grad = check_all(
        student,
        teacher,
        negative,
        labels,
        KDOptions(alpha=2.0, temperature=0.5, ignore_index=5),
        block_v=BLOCK,
    )
    ignored = labels.reshape(-1) == 5
    assert ignored.sum() == 2
    assert (kd[ignored] == 0).all() and (ce[ignored] == 0).all() and (grad[ignored] == 0).all()


def test_all_rows_ignored_with_infinite_kd():
    """Ignored rows give exact zeros even when their divergence would be infinite or NaN."""
    student, teacher, negative, labels = make_inputs(seed=13)
    teacher, negative = with_neg_inf(teacher, negative)
    teacher[1, 0] = float("-inf")  # a row with no finite teacher logit at all
    negative[1, 0] = float("-inf")
    labels = torch.full_like(labels, -100)
    for beta in (0.0, 0.5, 1.0):
        params = row_params(KDOptions(alpha=2.0, beta=beta), 37, negative, labels)
        args = row_args(student, teacher, negative, labels, params)
        coef_kd, coef_ce = make_coefs(labels, 4, -100)
        grad = torch.full((4, 37), float("nan"), device=DEVICE)
        kd, ce, _, _ = triton_rows.loss_and_grad_rows(*args, coef_kd, coef_ce, params, grad, block_v=BLOCK)
        assert (kd == 0).all() and (ce == 0).all() and (grad == 0).all()
        grad.fill_(float("nan"))
        triton_rows.backward_rows(*args, torch.zeros(4, 5, device=DEVICE), coef_kd, coef_ce, params, grad)
        assert (grad == 0).all()


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_grad_may_alias_student(beta):
    """The fused-linear op overwrites its chunk logits with their gradient in place."""
    student, teacher, negative, labels = make_inputs(seed=14)
    student = student.contiguous()
    opts = KDOptions(alpha=2.0, temperature=2.0, beta=beta, plausibility=0.1 if beta < 1 else 0.0)
    params = row_params(opts, 37, negative, labels)
    coef_kd, coef_ce = make_coefs(labels, 4, -100)
    expected = run_backend(
        triton_rows, student, teacher, negative, labels, coef_kd, coef_ce, params, block_v=BLOCK
    )
    args = row_args(student, teacher, negative, labels, params)
    fused_grad = torch.empty(4, 37, device=DEVICE)
    fused = triton_rows.loss_and_grad_rows(*args, coef_kd, coef_ce, params, fused_grad, block_v=BLOCK)

    in_place = student.clone()
    args = row_args(in_place, teacher, negative, labels, params)
    kd, ce, stats, _ = triton_rows.loss_and_grad_rows(
        *args, coef_kd, coef_ce, params, in_place.view(-1, 37), block_v=BLOCK
    )
    for got, want in zip((kd, ce, stats, in_place.view(-1, 37)), (*fused[:3], fused_grad)):
        assert_close(got, want, 0, 0)

    in_place = student.clone()
    args = row_args(in_place, teacher, negative, labels, params)
    triton_rows.backward_rows(
        *args, expected[2], coef_kd, coef_ce, params, in_place.view(-1, 37), block_v=BLOCK
    )
    assert_close(in_place.view(-1, 37), expected[3], 0, 0)


def test_zero_rows():
    student = torch.zeros(0, 7, device=DEVICE)
    params = row_params(KDOptions(), 7, None, None)
    kd, ce, stats, flags = triton_rows.forward_rows(as_rows(student), as_rows(student), None, None, params)
    assert kd.shape == (0,) and ce.shape == (0,) and stats.shape == (0, 5) and flags.shape == (0,)


@pytest.mark.parametrize(
    "options",
    [
        dict(alpha=2.0, temperature=2.0, kd_weight=0.7, ce_weight=0.3),
        dict(alpha=1.0, temperature=0.5, beta=0.5, plausibility=0.1, ce_weight=1.0, reduction="sum"),
        dict(alpha=0.0, beta=1.0, temperature_scaling=False, ce_weight=0.5, reduction="none", ignore_index=3),
    ],
)
def test_public_op(options):
    """``contrastive_kd_loss(backend="triton")`` end to end: loss, components and student gradient."""
    student, teacher, negative, labels = make_inputs(
        batch=2, seq=3, seed=15, ignore_index=options.get("ignore_index", -100)
    )
    student = student.detach().requires_grad_(True)
    out = contrastive_kd_loss(
        student, teacher, negative, labels, backend="triton", return_components=True, **options
    )
    ref = contrastive_kd_loss_reference(
        student, teacher, negative, labels, compute_dtype=torch.float64, **options
    )
    for got, want in zip(out, ref):
        assert_close(got, want, 1e-5, 1e-5)
    weights = torch.rand(out.loss.shape, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    (grad,) = torch.autograd.grad((out.loss * weights).sum(), student)
    (ref_grad,) = torch.autograd.grad((ref[0] * weights.double()).sum(), student)
    assert grad.dtype == student.dtype and grad.shape == student.shape
    assert_close(grad, ref_grad, 1e-5, 1e-5)


def test_launch_config(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cuda = torch.device("cuda")
    assert triton_rows.launch_config(128256, cuda) == (4096, 16)
    assert triton_rows.launch_config(1500, cuda) == (2048, 8)
    assert triton_rows.launch_config(37, cuda) == (64, 4)
    assert triton_rows.launch_config(1, cuda) == (16, 4)
    assert triton_rows.launch_config(128256, cuda, element_size=4) == (2048, 8)  # fp32: the same 16-byte vectors
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_rows.launch_config(128256, torch.device("cpu")) == (128, 4)
    with pytest.raises(ValueError, match="power of two"):
        triton_rows.launch_config(100, cuda, block_v=48)


# ---------------------------------------------------------------------------------------------
# per-row alpha, scales and softcaps, row flags, early exit, padded gradient rows, production tiles


def options_rows(module, student, teacher, negative, labels, opts: KDOptions, alpha_rows, fused, grad=None, **kw):
    """``(kd, ce, stats, flags, grad)`` of one backend, with ``alpha_rows`` and the coefficients of make_coefs."""
    params = row_params(opts, student.shape[-1], negative, labels)
    args = row_args(student, teacher, negative, labels, params)
    rows = student.shape[:-1].numel()
    coef_kd, coef_ce = make_coefs(labels, rows, opts.ignore_index)
    if grad is None:
        grad = torch.full((rows, student.shape[-1]), float("nan"), dtype=student.dtype, device=DEVICE)
    if fused:
        out = module.loss_and_grad_rows(*args, coef_kd, coef_ce, params, grad, alpha_rows=alpha_rows, **kw)
    else:
        out = module.forward_rows(*args, params, alpha_rows=alpha_rows, **kw)
        module.backward_rows(*args, out[2], coef_kd, coef_ce, params, grad, alpha_rows=alpha_rows, **kw)
    return (*out, grad)


def compare_to_torch_rows(student, teacher, negative, labels, opts, alpha_rows, fused, atol=2e-5, **kw):
    got = options_rows(triton_rows, student, teacher, negative, labels, opts, alpha_rows, fused, **kw)
    want = options_rows(torch_rows, student, teacher, negative, labels, opts, alpha_rows, False)
    valid = labels.reshape(-1).cpu() != opts.ignore_index
    for index, (a, b) in enumerate(zip(got, want)):
        a, b = (a[valid], b[valid]) if index == 2 else (a, b)
        assert_close(a, b.to(a.dtype), atol if index != 4 else 1e-6, 1e-5)
    return got


OPTION_CASES = [
    dict(alpha=1.0, student_softcap=4.0, teacher_softcap=3.0),
    dict(alpha=1.0, student_logit_scale=0.5, teacher_logit_scale=1.7, teacher_softcap=6.0, plausibility=0.1),
    dict(alpha=1.0, beta=0.5, student_logit_scale=2.0, student_softcap=10.0, temperature=1.0),
    dict(alpha=1.0, beta=1.0, teacher_softcap=5.0, temperature=0.5),
]


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("options", OPTION_CASES)
def test_options_and_per_row_alpha(options, fused):
    student, teacher, negative, labels = make_inputs(seed=200 + len(options))
    alpha_rows = torch.rand(4, generator=torch.Generator().manual_seed(1)) * 3
    opts = KDOptions(**{"temperature": 2.0, **options})
    compare_to_torch_rows(student, teacher, negative, labels, opts, alpha_rows.to(DEVICE), fused, block_v=BLOCK)


@pytest.mark.parametrize("vocab", [4096, 5000, 8195])
def test_production_tile_size(vocab):
    """The CUDA tile (4096 columns) forced under the interpreter: full unmasked tiles and the masked tail."""
    student, teacher, negative, labels = make_inputs(batch=1, seq=3, vocab=vocab, teacher_vocab=vocab + 5,
                                                     seed=vocab)
    alpha_rows = torch.tensor([0.5, 2.0, 1.0], device=DEVICE)
    opts = KDOptions(temperature=2.0, beta=0.5, plausibility=0.05, student_softcap=8.0, teacher_softcap=6.0)
    compare_to_torch_rows(student, teacher, negative, labels, opts, alpha_rows, True, block_v=4096)
    # and the public op at that tile, against the float64 reference
    opts_kw = dict(alpha=2.0, temperature=2.0, kd_weight=0.7, ce_weight=0.3)
    params = row_params(KDOptions(**opts_kw), vocab, negative, labels)
    args = row_args(student, teacher, negative, labels, params)
    kd, ce, _, _ = triton_rows.forward_rows(*args, params, block_v=4096)
    coef_kd, coef_ce = make_coefs(labels, 3, -100)
    r_kd, r_ce, _ = reference_rows(student, teacher, negative, labels, coef_kd, coef_ce, KDOptions(**opts_kw))
    assert_close(kd, r_kd, 1e-5, 1e-5)
    assert_close(ce, r_ce, 1e-5, 1e-5)


def test_row_flags_and_ignored_rows_are_never_read():
    """NaN/+inf per path (and -inf in z_neg where z_pos is finite) flag their row with NaN results, the same as
    torch_rows; an ignored row full of NaN is never read (zeros, flag 0)."""
    student, teacher, negative, labels = make_inputs(batch=2, seq=3, seed=17)
    student, teacher, negative = student.contiguous(), teacher.clone(), negative.clone()
    labels = torch.tensor([[1, -100, 2], [3, 4, 5]], device=DEVICE)
    student[0, 0, 7] = float("inf")
    teacher[0, 2, 9] = float("nan")
    negative[1, 0, 11] = float("-inf")
    negative[1, 1, 12] = float("inf")
    student[0, 1] = float("nan")  # the ignored row
    opts = KDOptions(alpha=2.0, temperature=2.0)
    for fused in (False, True):
        kd, ce, _, flags, grad = options_rows(triton_rows, student, teacher, negative, labels, opts, None, fused,
                                              block_v=BLOCK)
        t_out = options_rows(torch_rows, student, teacher, negative, labels, opts, None, False)
        assert flags.tolist() == t_out[3].tolist() == [1, 0, 2, 4, 4, 0]
        bad = flags != 0
        assert torch.isnan(kd[bad]).all() and torch.isnan(ce[bad]).all() and torch.isnan(grad[bad]).any()
        assert kd[1] == 0 and ce[1] == 0 and torch.all(grad[1] == 0)
        assert torch.isfinite(grad[5]).all()
        assert_close(kd[5], t_out[0][5], 1e-5, 1e-5)


def test_gradient_rows_may_be_padded():
    """The fused-linear op hands ``grad`` (its chunk logits) with a row stride rounded up to 16 elements."""
    student, teacher, negative, labels = make_inputs(seed=19)
    opts = KDOptions(alpha=2.0, temperature=2.0, beta=0.5)
    expected = options_rows(triton_rows, student, teacher, negative, labels, opts, None, True, block_v=BLOCK)[4]
    padded = torch.full((4, 48), 7.0, device=DEVICE)
    for fused in (False, True):
        padded.fill_(7.0)
        options_rows(triton_rows, student, teacher, negative, labels, opts, None, fused, grad=padded[:, :37],
                     block_v=BLOCK)
        assert_close(padded[:, :37], expected, 1e-6, 1e-6)
        assert torch.all(padded[:, 37:] == 7.0)
