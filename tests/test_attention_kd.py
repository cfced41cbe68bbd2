"""The attention-map divergence (``caad_kernels.attention_kd``), its row-kernel column limit and the q/k capture.

- The row kernels' ``col_limit`` (every backend): a row with limit ``L`` must give exactly what the
  same row cut to its first ``L`` columns gives (checked against the float64 torch rows on the cut
  rows), limits ``<= 0`` ignore the row, and an absent limit changes nothing.
- The op against the materialising float64 reference (:mod:`caad_kernels.attention_reference`):
  values and gradients to the student's queries and keys, causal and not, odd lengths, padding on
  either side and in the middle, heads mapped and averaged, GQA on both sides, every backend;
  fp32 tight, bf16 loose.
- Memory grows as O(T) (the reference as O(T^2)), measured on the CPU.
- The capture helper against a Hugging Face model's own attention probabilities
  (``output_attentions=True`` with eager attention), and gradients through it into ``q_proj``/``k_proj``
  against autograd through those probabilities.
"""

from __future__ import annotations

import os

import pytest
import torch

from caad_kernels.attention_kd import AttentionKDLoss, attention_kd_loss, head_plan
from caad_kernels.attention_reference import attention_kd_loss_reference, attention_probabilities
from caad_kernels.backends import load_backend, torch_rows
from caad_kernels.options import KDOptions
from caad_kernels.profiling import cpu_peak_measurable, measure_peak_memory
from caad_kernels.rows import as_rows


def backend_or_skip(name: str):
    try:
        return load_backend(name)
    except Exception as error:  # no compiler / no triton here
        pytest.skip(f"backend {name!r} unavailable: {error}")


BACKENDS = ["torch", "cpp", "triton"]


@pytest.fixture(autouse=True)
def one_thread():
    """The shapes here are tiny: one intra-op thread avoids waking a second one per GEMM on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
# the row-kernel contract: col_limit
# --------------------------------------------------------------------------------------------


def limit_inputs(rows: int, vocab: int, seed: int = 0, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(seed)
    s, t, n = ((torch.randn(rows, vocab, generator=gen) * 3).to(dtype) for _ in range(3))
    return s, t, n


def truncated_reference(s, t, n, labels, limits, opts: KDOptions, coef_kd, coef_ce):
    """Per row ``(kd, ce, grad)`` of the row cut to its limit, by the float64 torch rows (no limit)."""
    out = []
    for r in range(s.shape[0]):
        width = min(max(int(limits[r]), 0), s.shape[1])
        if width == 0 or (labels is not None and int(labels[r]) == opts.ignore_index):
            out.append(None)
            continue
        params = opts.row_params(width, n is not None, labels is not None)
        cut = [None if x is None else as_rows(x[r : r + 1, :width].double().contiguous()) for x in (s, t, n)]
        y = None if labels is None else labels[r : r + 1]
        kd, ce, stats, _ = torch_rows.forward_rows(cut[0], cut[1], cut[2], y, params)
        grad = torch.empty(1, width, dtype=torch.float64)
        torch_rows.backward_rows(cut[0], cut[1], cut[2], y, stats, coef_kd[r : r + 1].double(),
                                 coef_ce[r : r + 1].double(), params, grad)
        out.append((kd[0], ce[0], grad[0]))
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta, plausibility, negative, labels", [
    (0.0, 0.0, True, True), (1.0, 0.0, False, True), (0.5, 0.1, True, False), (0.0, 0.2, False, False),
])
def test_col_limit_equals_cut_rows(backend, beta, plausibility, negative, labels):
    module = backend_or_skip(backend)
    rows, vocab = 9, 37
    s, t, n = limit_inputs(rows, vocab)
    n = n if negative else None
    limits = torch.tensor([1, 5, 37, 0, 40, 17, -3, 36, 20], dtype=torch.int32)
    y = torch.tensor([0, 4, 30, 3, 1, 16, 2, 10, -100]) if labels else None
    opts = KDOptions(alpha=1.0, beta=beta, temperature=2.0, plausibility=plausibility, student_softcap=5.0,
                     teacher_logit_scale=0.7)
    params = opts.row_params(vocab, negative, labels)
    gen = torch.Generator().manual_seed(1)
    coef_kd, coef_ce = torch.rand(rows, generator=gen), torch.rand(rows, generator=gen)
    views = (as_rows(s), as_rows(t), None if n is None else as_rows(n))
    kd, ce, stats, flags = module.forward_rows(*views, y, params, col_limit=limits)
    grad = torch.full((rows, vocab), float("nan"))
    module.backward_rows(*views, y, stats, coef_kd, coef_ce, params, grad, col_limit=limits.long())
    expected = truncated_reference(s, t, n, y, limits, opts, coef_kd, coef_ce)
    assert (flags == 0).all()
    for r, ref in enumerate(expected):
        if ref is None:  # no column, or an ignored label: nothing, zero gradient
            assert kd[r] == 0 and ce[r] == 0 and (grad[r] == 0).all(), r
            continue
        width = ref[2].numel()
        torch.testing.assert_close(kd[r].double(), ref[0], atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(ce[r].double(), ref[1], atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(grad[r, :width].double(), ref[2], atol=2e-6, rtol=1e-5)
        assert (grad[r, width:] == 0).all(), r
    if hasattr(module, "loss_and_grad_rows"):
        fused = torch.full((rows, vocab), float("nan"))
        out = module.loss_and_grad_rows(*views, y, coef_kd, coef_ce, params, fused, col_limit=limits)
        torch.testing.assert_close(out[0], kd, atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(fused, grad, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_col_limit_never_reads_hidden_columns_and_flags_labels_past_it(backend):
    module = backend_or_skip(backend)
    s, t, n = limit_inputs(4, 40)
    limits = torch.tensor([10, 20, 30, 40])
    for x in (s, t, n):
        for r in range(4):
            x[r, int(limits[r]):] = float("nan")  # past the limit: never read, so no flag and no NaN
    y = torch.tensor([3, 25, 5, 39])  # row 1's label is past its limit
    opts = KDOptions(alpha=0.5)
    kd, ce, _, flags = module.forward_rows(as_rows(s), as_rows(t), as_rows(n), y, opts.row_params(40, True, True),
                                           col_limit=limits)
    assert flags.tolist() == [0, 8, 0, 0]
    assert torch.isfinite(kd[[0, 2, 3]]).all() and torch.isfinite(ce[[0, 2, 3]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_absent_col_limit_changes_nothing(backend):
    module = backend_or_skip(backend)
    s, t, n = limit_inputs(6, 50, seed=3)
    y = torch.tensor([1, -100, 7, 49, 0, 3])
    params = KDOptions(alpha=1.0, temperature=2.0).row_params(50, True, True)
    views = (as_rows(s), as_rows(t), as_rows(n))
    plain = module.forward_rows(*views, y, params)
    full = module.forward_rows(*views, y, params, col_limit=torch.full((6,), 50))
    for a, b in zip(plain, full):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_cpp_col_limit_with_rows_split_into_segments(monkeypatch):
    """Few rows: the C++ kernels split each row over threads; segments past the limit read nothing."""
    module = backend_or_skip("cpp")
    torch.set_num_threads(2)  # one row, two threads: the row is split into column segments
    s, t, n = limit_inputs(1, 12000, seed=5, dtype=torch.bfloat16)
    opts = KDOptions(alpha=1.0, beta=0.3, plausibility=0.05)
    limits = torch.tensor([5000])
    coef = torch.ones(1)
    grad = torch.full((1, 12000), float("nan"), dtype=torch.bfloat16)
    out = module.loss_and_grad_rows(as_rows(s), as_rows(t), as_rows(n), None, coef, coef,
                                    opts.row_params(12000, True, False), grad, col_limit=limits)
    ref = truncated_reference(s, t, n, None, limits, opts, coef, coef)[0]
    torch.testing.assert_close(out[0][0].double(), ref[0], atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(grad[0, :5000].double(), ref[2], atol=1e-3, rtol=2e-2)
    assert (grad[0, 5000:] == 0).all()


# --------------------------------------------------------------------------------------------
# the op against the materialising reference
# --------------------------------------------------------------------------------------------


def attention_inputs(batch=2, heads_s=4, kv_s=2, heads_t=8, kv_t=4, seq=33, dim_s=8, dim_t=16,
                     dtype=torch.float32, teacher_dtype=None, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def make(*shape, dt):
        return (torch.randn(*shape, generator=gen) * 1.5).to(dt)

    q_s = make(batch, heads_s, seq, dim_s, dt=dtype).requires_grad_()
    k_s = make(batch, kv_s, seq, dim_s, dt=dtype).requires_grad_()
    q_t = make(batch, heads_t, seq, dim_t, dt=teacher_dtype or dtype)
    k_t = make(batch, kv_t, seq, dim_t, dt=teacher_dtype or dtype)
    return q_s, k_s, q_t, k_t


def padding_mask(kind: str, batch: int, seq: int) -> torch.Tensor | None:
    if kind == "none":
        return None
    mask = torch.ones(batch, seq, dtype=torch.bool)
    if kind == "right":
        mask[0, max(1, seq - 4):] = False
    elif kind == "left":
        mask[-1, : min(3, seq - 1)] = False
    elif kind == "holes":  # padding in the middle and a whole sequence of padding
        mask[0, 1::3] = False
        mask[-1] = False
    return mask


def compare(q_s, k_s, q_t, k_t, mask, *, loss_tol, grad_tol, **options):
    """Our loss and gradients against the float64 reference on the same (rounded) inputs."""
    loss = attention_kd_loss(q_s, k_s, q_t, k_t, mask, **options)
    grads = torch.autograd.grad(loss, (q_s, k_s))
    q64, k64 = (x.detach().double().requires_grad_() for x in (q_s, k_s))
    ref_options = {k: v for k, v in options.items() if k not in ("backend", "chunk_size")}
    ref = attention_kd_loss_reference(q64, k64, q_t.double(), k_t.double(), mask, **ref_options)
    ref_grads = torch.autograd.grad(ref, (q64, k64))
    assert loss.dtype == (torch.float64 if q_s.dtype == torch.float64 else torch.float32)
    assert abs(loss.item() - ref.item()) <= loss_tol * max(abs(ref.item()), 1e-3), (loss.item(), ref.item())
    for name, g, r, x in zip(("query", "key"), grads, ref_grads, (q_s, k_s)):
        assert g.dtype == x.dtype and g.shape == x.shape
        error = (g.double() - r).norm() / max(r.norm().item(), 1e-12)
        assert error <= grad_tol, (name, error.item())
    return loss, grads


CASES = [
    # (description, input kwargs, mask kind, op options)
    ("causal GQA averaged heads", dict(), "none", dict()),
    ("padding right", dict(), "right", dict()),
    ("padding left, head map", dict(), "left", dict(teacher_heads=[0, 3, 5, 7])),
    ("holes, uneven averaged groups", dict(), "holes", dict(teacher_heads=[[0], [1, 2, 3], [4, 6], [7, 5, 1]])),
    ("equal heads, no GQA, T=7", dict(heads_s=3, kv_s=3, heads_t=3, kv_t=1, seq=7), "none", dict()),
    ("T=1", dict(seq=1), "none", dict()),
    ("not causal, padding", dict(), "left", dict(causal=False)),
    ("mixture, tau 2, softcaps", dict(), "right",
     dict(beta=0.5, temperature=2.0, student_softcap=3.0, teacher_softcap=4.0, student_scale=0.5)),
    ("reverse KL, head map", dict(), "none", dict(beta=1.0, teacher_heads=[1, 1, 6, 0], teacher_scale=0.2)),
    ("sum", dict(seq=13), "left", dict(reduction="sum")),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("description, inputs, mask_kind, options", CASES, ids=[c[0] for c in CASES])
def test_matches_reference_fp32(backend, description, inputs, mask_kind, options):
    backend_or_skip(backend)
    if backend == "triton" and description not in ("holes, uneven averaged groups", "T=1"):
        pytest.skip("the Triton interpreter is slow: a subset of the cases")
    q_s, k_s, q_t, k_t = attention_inputs(**inputs)
    mask = padding_mask(mask_kind, q_s.shape[0], q_s.shape[2])
    compare(q_s, k_s, q_t, k_t, mask, loss_tol=1e-5, grad_tol=2e-5, backend=backend, chunk_size=8, **options)


@pytest.mark.parametrize("description, inputs, mask_kind, options", CASES[:4] + CASES[7:8], ids=[
    c[0] for c in CASES[:4] + CASES[7:8]])
def test_matches_reference_fp64_exactly(description, inputs, mask_kind, options):
    q_s, k_s, q_t, k_t = attention_inputs(dtype=torch.float64, **inputs)
    mask = padding_mask(mask_kind, q_s.shape[0], q_s.shape[2])
    compare(q_s, k_s, q_t, k_t, mask, loss_tol=1e-12, grad_tol=1e-11, chunk_size=5, **options)


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
@pytest.mark.parametrize("teacher_dtype, mask_kind, seq, options", [
    (torch.float32, "left", 20, {}),
    (torch.bfloat16, "holes", 19, dict(teacher_heads=[0, 3, 5, 7])),
], ids=["fp32-teacher", "bf16-teacher-head-map"])
def test_bf16_student(backend, teacher_dtype, mask_kind, seq, options):
    backend_or_skip(backend)
    q_s, k_s, q_t, k_t = attention_inputs(seq=seq, dtype=torch.bfloat16, teacher_dtype=teacher_dtype)
    mask = padding_mask(mask_kind, 2, seq)
    compare(q_s, k_s, q_t, k_t, mask, loss_tol=2e-2, grad_tol=4e-2, backend=backend, chunk_size=16,
            beta=0.5 if backend == "triton" else 0.0, **options)


def test_default_chunk_and_chunk_sizes_agree():
    q_s, k_s, q_t, k_t = attention_inputs(seq=21)
    losses = []
    for chunk in (None, 1, 7, 64):
        loss = attention_kd_loss(q_s, k_s, q_t, k_t, chunk_size=chunk, backend="cpp" if chunk == 7 else "torch")
        losses.append((loss.item(), *torch.autograd.grad(loss, (q_s, k_s))))
    for other in losses[1:]:
        assert abs(other[0] - losses[0][0]) < 1e-5
        torch.testing.assert_close(other[1], losses[0][1], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(other[2], losses[0][2], atol=1e-5, rtol=1e-4)


def test_reduction_none_per_row_and_its_gradient():
    q_s, k_s, q_t, k_t = attention_inputs(seq=11, dtype=torch.float64)
    mask = padding_mask("left", 2, 11)
    per_row = attention_kd_loss(q_s, k_s, q_t, k_t, mask, reduction="none", chunk_size=4)
    upstream = torch.randn(per_row.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    grads = torch.autograd.grad((per_row * upstream).sum(), (q_s, k_s))
    q64, k64 = (x.detach().requires_grad_() for x in (q_s, k_s))
    ref = attention_kd_loss_reference(q64, k64, q_t, k_t, mask, reduction="none")
    ref_grads = torch.autograd.grad((ref * upstream).sum(), (q64, k64))
    assert per_row.shape == (2, 4, 11)
    assert (per_row[1, :, :3] == 0).all()
    torch.testing.assert_close(per_row, ref, atol=1e-12, rtol=1e-10)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-12, rtol=1e-10)


def test_identical_maps_give_zero_and_teacher_gets_no_gradient():
    q_s, k_s, _, _ = attention_inputs(seq=9)
    q_t = q_s.detach().clone().requires_grad_()
    k_t = k_s.detach().clone().requires_grad_()
    loss = attention_kd_loss(q_s, k_s, q_t, k_t, teacher_heads=[0, 1, 2, 3])
    loss.backward()
    assert abs(loss.item()) < 1e-6
    assert q_t.grad is None and k_t.grad is None
    assert q_s.grad.abs().max() < 1e-5


def test_no_grad_and_module_form():
    q_s, k_s, q_t, k_t = attention_inputs(seq=10)
    with torch.no_grad():
        value = attention_kd_loss(q_s, k_s, q_t, k_t)
    assert value.grad_fn is None
    module = AttentionKDLoss(beta=0.5, chunk_size=3)
    assert "beta=0.5" in repr(module)
    torch.testing.assert_close(module(q_s, k_s, q_t, k_t), attention_kd_loss(q_s, k_s, q_t, k_t, beta=0.5))


def test_head_plan_documents_what_is_averaged():
    assert head_plan(None, 4, 4).index is None and not head_plan(None, 4, 4).averaged
    assert head_plan(None, 2, 6).groups == ((0, 1, 2), (3, 4, 5))
    assert head_plan([2, 0], 2, 3).index == (2, 0)
    assert head_plan([[0, 2], 1], 2, 3).groups == ((0, 2), (1,))


@pytest.mark.parametrize("change, error, match", [
    (dict(teacher_heads=[0, 1, 2]), ValueError, "one entry per student head"),
    (dict(teacher_heads=[0, 1, 2, 8]), ValueError, r"teacher head indices in \[0, 8\)"),
    (dict(teacher_heads=[0, [], 1, 2]), ValueError, "non-empty"),
    (dict(reduction="max"), ValueError, "reduction"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(backend="gpu"), ValueError, "backend"),
])
def test_bad_options(change, error, match):
    q_s, k_s, q_t, k_t = attention_inputs(seq=5)
    with pytest.raises(error, match=match):
        attention_kd_loss(q_s, k_s, q_t, k_t, **change)


def test_bad_inputs():
    q_s, k_s, q_t, k_t = attention_inputs(seq=5)
    with pytest.raises(ValueError, match=r"multiple of student_key's 3"):
        attention_kd_loss(q_s, torch.randn(2, 3, 5, 8), q_t, k_t)
    with pytest.raises(ValueError, match="share batch and T"):
        attention_kd_loss(q_s, k_s, q_t[:, :, :4], k_t[:, :, :4])
    with pytest.raises(ValueError, match=r"attention_mask must be \[batch, T\]"):
        attention_kd_loss(q_s, k_s, q_t, k_t, torch.ones(2, 6, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool or integer"):
        attention_kd_loss(q_s, k_s, q_t, k_t, torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"\[batch, heads, T, head_dim\]"):
        attention_kd_loss(q_s[0], k_s, q_t, k_t)
    with pytest.raises(ValueError, match="teacher_heads is required"):
        attention_kd_loss(q_s, k_s, q_t[:, :6], k_t[:, :2])


# --------------------------------------------------------------------------------------------
# memory: O(T), not O(T^2)
# --------------------------------------------------------------------------------------------


def peak_mib(fn, seq: int) -> float:
    q_s, k_s, q_t, k_t = attention_inputs(batch=1, heads_s=4, kv_s=4, heads_t=4, kv_t=4, seq=seq, dim_s=32,
                                          dim_t=32)

    def step():
        fn(q_s, k_s, q_t, k_t).backward()

    step()  # warm-up (lazy initialisation, the extension)
    q_s.grad = k_s.grad = None
    return measure_peak_memory(step)[1] / 2**20


@pytest.mark.skipif(not cpu_peak_measurable(), reason="CPU peak memory needs Linux /proc/self/clear_refs")
def test_memory_grows_linearly_not_quadratically():
    def ours(*args):
        return attention_kd_loss(*args, chunk_size=256, backend="auto")  # chunk x T logits: O(T)

    short, long = 512, 1024
    ours_short, ours_long = peak_mib(ours, short), peak_mib(ours, long)
    ref_short, ref_long = peak_mib(attention_kd_loss_reference, short), peak_mib(attention_kd_loss_reference, long)
    # doubling T: about x2 for O(T) (plus a constant), x4 for the materialised [B, H, T, T] maps
    assert ours_long / max(ours_short, 0.25) < 2.6, (ours_short, ours_long)
    assert ref_long / ref_short > 3.3, (ref_short, ref_long)
    assert ours_long < ref_long / 8, (ours_long, ref_long)


ON_CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"


@pytest.mark.skipif(not ON_CUDA, reason="compiled Triton kernels: needs CUDA with TRITON_INTERPRET unset")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_triton_against_the_reference_and_memory(dtype):
    """On a GPU (``pytest tests/test_attention_kd.py -k cuda``): the compiled column-limit kernels at an odd
    length past one tile, padding on both sides, GQA and averaged heads; then the peak memory at T=8192."""
    device = torch.device("cuda")
    q_s, k_s, q_t, k_t = (x.detach().to(device) for x in attention_inputs(seq=1000, dtype=dtype))
    q_s.requires_grad_()
    k_s.requires_grad_()
    mask = padding_mask("left", 2, 1000).to(device)
    mask[0, 990:] = False
    loose = dtype == torch.bfloat16
    compare(q_s, k_s, q_t, k_t, mask, loss_tol=2e-2 if loose else 1e-5, grad_tol=4e-2 if loose else 5e-5,
            backend="triton")

    big = attention_inputs(batch=1, heads_s=16, kv_s=4, heads_t=32, kv_t=8, seq=8192, dim_s=64, dim_t=128,
                           dtype=torch.bfloat16)
    q_s, k_s, q_t, k_t = (x.detach().to(device) for x in big)
    q_s.requires_grad_()
    k_s.requires_grad_()
    _, peak = measure_peak_memory(lambda: attention_kd_loss(q_s, k_s, q_t, k_t, backend="triton").backward(), device)
    maps = (16 + 32) * 8192 * 8192 * 2  # the bf16 maps a materialising version holds at least once
    assert peak < maps / 4, (peak, maps)


# --------------------------------------------------------------------------------------------
# capturing post-RoPE queries and keys from Hugging Face models
# --------------------------------------------------------------------------------------------


def tiny_lm(arch: str, heads: int, kv_heads: int, hidden: int, seed: int, layers: int = 2, **extra):
    """A tiny random Llama, Qwen2 or GPT-2 (GPT-2 has no GQA: ``kv_heads`` must equal ``heads``), eager attention."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    if arch == "gpt2":
        assert kv_heads == heads
        config = transformers.GPT2Config(vocab_size=61, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=64,
                                         bos_token_id=0, eos_token_id=0, attn_pdrop=0.0, resid_pdrop=0.0,
                                         embd_pdrop=0.0, **extra)  # no dropout: the maps are deterministic
        model_cls = transformers.GPT2LMHeadModel
    else:
        config_cls = transformers.LlamaConfig if arch == "llama" else transformers.Qwen2Config
        model_cls = transformers.LlamaForCausalLM if arch == "llama" else transformers.Qwen2ForCausalLM
        config = config_cls(vocab_size=61, hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                            max_position_embeddings=64, **extra)
    config._attn_implementation = "eager"
    return model_cls(config)


def q_and_k_weights(model, layer: int) -> list[torch.Tensor]:
    """The weights that make the queries and keys of ``layer`` (GPT-2: the fused ``c_attn``)."""
    if hasattr(model, "transformer"):  # GPT-2
        return [model.transformer.h[layer].attn.c_attn.weight]
    attn = model.model.layers[layer].self_attn
    return [attn.q_proj.weight, attn.k_proj.weight]


def earlier_weight(model) -> torch.Tensor:
    """A weight of layer 0's MLP: reached only through the later layers' inputs."""
    if hasattr(model, "transformer"):
        return model.transformer.h[0].mlp.c_fc.weight
    return model.model.layers[0].mlp.up_proj.weight


@pytest.mark.parametrize("arch, kv_heads, extra", [
    ("llama", 2, {}),
    ("qwen2", 2, {}),
    ("llama", 2, dict(rope_theta=50.0)),  # a short wavelength: RoPE visibly changes the maps
    ("gpt2", 4, {}),
    ("gpt2", 4, dict(scale_attn_by_inverse_layer_idx=True)),  # the layer's own scaling is captured
])
def test_capture_matches_the_models_attention_probabilities(arch, kv_heads, extra):
    from transformers.modeling_utils import AttentionInterface

    from caad_kernels.attention_capture import capture_attention

    model = tiny_lm(arch, heads=4, kv_heads=kv_heads, hidden=32, seed=0, **extra).eval()
    ids = torch.randint(0, 61, (2, 11), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    before = dict(AttentionInterface._global_mapping)
    with torch.no_grad():
        reference = model(ids, attention_mask=mask, output_attentions=True)
        for implementation in ("eager", "sdpa"):
            model.set_attn_implementation(implementation)
            plain = model(ids, attention_mask=mask).logits
            with capture_attention(model) as captured:
                logits = model(ids, attention_mask=mask).logits
            assert torch.equal(logits, plain)  # the capture does not change the computation
            assert sorted(captured) == [0, 1]
            valid = mask.bool()
            visible = valid[:, None, :, None] & valid[:, None, None, :]
            for layer in (0, 1):
                c = captured[layer]
                assert c.query.shape == (2, 4, 11, 8) and c.key.shape == (2, kv_heads, 11, 8)
                scale = 8**-0.5 / (layer + 1 if extra.get("scale_attn_by_inverse_layer_idx") else 1)
                assert c.scaling == pytest.approx(scale) and c.softcap is None
                probs = attention_probabilities(c.query, c.key, c.scaling, mask)
                diff = (probs - reference.attentions[layer]).masked_fill(~visible, 0)
                assert diff.abs().max() < 1e-6
    assert AttentionInterface._global_mapping == before  # restored


@pytest.mark.parametrize("student_arch, teacher_arch", [("qwen2", "llama"), ("gpt2", "qwen2")])
def test_capture_gradients_reach_q_and_k_projections(student_arch, teacher_arch):
    """Our op on captured q/k vs autograd through the model's materialised eager attention probabilities."""
    from caad_kernels.attention_capture import capture_attention

    student = tiny_lm(student_arch, heads=4, kv_heads=4 if student_arch == "gpt2" else 2, hidden=32, seed=1)
    teacher = tiny_lm(teacher_arch, heads=8, kv_heads=4, hidden=64, seed=2, layers=3).eval()
    ids = torch.randint(0, 61, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, 7:] = 0
    with capture_attention(teacher, layers=[2]) as t_caps, capture_attention(student, layers=[1]) as s_caps:
        with torch.no_grad():
            t_out = teacher(ids, attention_mask=mask, output_attentions=True)
        s_out = student(ids, attention_mask=mask, output_attentions=True)
    s, t = s_caps[1], t_caps[2]
    loss = attention_kd_loss(s.query, s.key, t.query, t.key, mask, student_scale=s.scaling, teacher_scale=t.scaling)
    weights = [*q_and_k_weights(student, 1), earlier_weight(student)]
    ours = torch.autograd.grad(loss, weights, retain_graph=True)
    # the same divergence from the probabilities the models materialise (teacher heads averaged in pairs)
    valid = mask.bool()
    p_t = t_out.attentions[2].double().view(2, 4, 2, 10, 10).mean(2)
    p_s = s_out.attentions[1].double()
    visible = (valid[:, None, :, None] & valid[:, None, None, :]).expand_as(p_s)
    terms = torch.where(visible, p_t * (p_t.clamp_min(1e-30).log() - p_s.clamp_min(1e-30).log()), 0.0)
    reference = terms.sum(-1).masked_fill(~valid[:, None, :], 0).sum() / (valid.sum() * 4)
    expected = torch.autograd.grad(reference, weights)
    assert abs(loss.item() - reference.item()) < 1e-5 * max(1.0, reference.item())
    for g, r in zip(ours, expected):
        assert r.abs().max() > 0
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-4)


def test_capture_errors():
    from caad_kernels.attention_capture import capture_attention

    model = tiny_lm("llama", heads=2, kv_heads=2, hidden=16, seed=0)
    with pytest.raises(ValueError, match=r"layers \[5\] are not attention layers"):
        with capture_attention(model, layers=[5]):
            pass
    with capture_attention(model, layers=[0]) as captured:
        with pytest.raises(RuntimeError, match="already being captured"):
            with capture_attention(model, layers=[0, 1]):
                pass
    with pytest.raises(KeyError, match="no forward pass ran"):
        captured[0]
    with pytest.raises(ValueError, match="no attention module"):
        with capture_attention(torch.nn.Linear(2, 2)):
            pass
    upcast = tiny_lm("gpt2", heads=2, kv_heads=2, hidden=16, seed=0, reorder_and_upcast_attn=True)
    with pytest.raises(ValueError, match="reorder_and_upcast_attn"):
        with capture_attention(upcast):
            pass
    upcast.set_attn_implementation("sdpa")  # dispatched: capturable
    with capture_attention(upcast) as captured:
        upcast(torch.tensor([[1, 2, 3]]))
    assert sorted(captured) == [0, 1]
