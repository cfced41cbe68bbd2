"""Alpha schedules and the per-token adaptive alpha (caad.methods.caad.alpha) against independent references."""

from __future__ import annotations

import math

import pytest
import torch

from caad.methods.caad import alpha as alpha_module
from caad.methods.caad.alpha import adaptive_alpha, alpha_from_js, js_rows, scheduled_alpha
from caad_kernels import fused_linear_contrastive_kd_loss


def _js_reference(z_pos: torch.Tensor, z_neg: torch.Tensor, tau: float) -> torch.Tensor:
    """Plain float64 JS per row from full distributions."""
    p = torch.softmax(z_pos.double() / tau, -1)
    n = torch.softmax(z_neg.double() / tau, -1)
    m = (p + n) / 2
    kl = lambda a: (a * (a.log() - m.log())).sum(-1)  # noqa: E731 - all entries are > 0 here
    return (0.5 * kl(p) + 0.5 * kl(n)).float()


# ---- schedules ------------------------------------------------------------------------------------------


def test_constant_schedule_is_alpha_at_every_step():
    assert [scheduled_alpha(2.0, s, 10) for s in range(10)] == [2.0] * 10


def test_warmup_schedule_ramps_linearly_then_holds():
    values = [scheduled_alpha(2.0, s, 10, "warmup", warmup_steps=4, alpha_start=0.0) for s in range(10)]
    assert values == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0])
    assert scheduled_alpha(2.0, 1, 10, "warmup", warmup_steps=2, alpha_start=1.0) == pytest.approx(1.5)


def test_cosine_schedule_runs_from_start_to_alpha():
    total = 11
    values = [scheduled_alpha(4.0, s, total, "cosine", alpha_start=1.0) for s in range(total)]
    expected = [1.0 + 3.0 * 0.5 * (1 - math.cos(math.pi * s / (total - 1))) for s in range(total)]
    assert values == pytest.approx(expected)
    assert values[0] == pytest.approx(1.0) and values[-1] == pytest.approx(4.0) and values[5] == pytest.approx(2.5)
    decay = [scheduled_alpha(0.0, s, 5, "cosine", alpha_start=2.0) for s in range(5)]
    assert decay[0] == 2.0 and decay[-1] == 0.0 and all(a >= b for a, b in zip(decay, decay[1:]))
    assert scheduled_alpha(3.0, 0, 1, "cosine") == 3.0  # a one-step run ends where it starts: alpha


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"schedule": "linear"}, "schedule must be one of"),
        ({"schedule": "warmup", "warmup_steps": 0}, "warmup_steps"),
        ({"alpha": -1.0}, "alpha must be"),
        ({"alpha_start": float("nan")}, "alpha_start"),
        ({"total_steps": 0}, "total_steps"),
        ({"step": -1}, "step"),
    ],
)
def test_schedule_rejects_bad_arguments(kwargs, match):
    args = {"alpha": 2.0, "step": 0, "total_steps": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        scheduled_alpha(**args)


# ---- JS per row -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_rows", [1, 3, 64])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_js_rows_matches_full_distributions(chunk_rows, tau):
    g = torch.Generator().manual_seed(0)
    rows, hidden, vocab = 10, 8, 37
    h_pos, h_neg = torch.randn(rows, hidden, generator=g), torch.randn(rows, hidden, generator=g)
    weight, bias = torch.randn(vocab, hidden, generator=g), torch.randn(vocab, generator=g)
    got = js_rows(h_pos, h_neg, weight, bias, temperature=tau, chunk_rows=chunk_rows)
    want = _js_reference(h_pos @ weight.T + bias, h_neg @ weight.T + bias, tau)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert got.dtype == torch.float32 and got.shape == (rows,)


def test_js_rows_drops_teacher_columns_past_the_student_vocabulary_and_handles_bf16():
    g = torch.Generator().manual_seed(1)
    h_pos, h_neg = torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g)
    weight = torch.randn(20, 6, generator=g)
    got = js_rows(h_pos.bfloat16(), h_neg.bfloat16(), weight.bfloat16(), vocab_size=13)
    want = _js_reference(h_pos.bfloat16().float() @ weight[:13].bfloat16().float().T,
                         h_neg.bfloat16().float() @ weight[:13].bfloat16().float().T, 1.0)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_js_rows_is_zero_for_identical_paths_and_near_ln2_for_disjoint_ones():
    weight = torch.eye(4) * 60.0
    same = torch.tensor([[1.0, 0, 0, 0], [0, 0, 1.0, 0]])
    assert torch.all(js_rows(same, same, weight) == 0)
    other = torch.tensor([[0, 1.0, 0, 0], [0, 0, 0, 1.0]])
    torch.testing.assert_close(js_rows(same, other, weight), torch.full((2,), math.log(2)), rtol=0, atol=1e-6)
    # extreme logits underflow to exact zeros: 0 log 0 must count as 0, never NaN
    huge = js_rows(same * 1e3, other * 1e3, weight)
    assert torch.isfinite(huge).all() and torch.allclose(huge, torch.full((2,), math.log(2)))


def test_js_rows_never_materialises_more_than_a_chunk(monkeypatch):
    seen = []
    original = alpha_module._logits

    def spy(hidden, *args):
        out = original(hidden, *args)
        seen.append(tuple(out.shape))
        return out

    monkeypatch.setattr(alpha_module, "_logits", spy)
    js_rows(torch.randn(50, 4), torch.randn(50, 4), torch.randn(9, 4), chunk_rows=16)
    assert seen and max(shape[0] for shape in seen) == 16 and sum(shape[0] for shape in seen) == 100


def test_js_rows_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        js_rows(torch.randn(3, 4), torch.randn(2, 4), torch.randn(5, 4))
    with pytest.raises(ValueError, match="weight must be"):
        js_rows(torch.randn(3, 4), torch.randn(3, 4), torch.randn(5, 3))
    with pytest.raises(ValueError, match="vocab_size"):
        js_rows(torch.randn(3, 4), torch.randn(3, 4), torch.randn(5, 4), vocab_size=6)


# ---- alpha from JS --------------------------------------------------------------------------------------


def test_alpha_from_js_mean_normalisation_keeps_the_mean_and_clips():
    js = torch.tensor([0.0, 0.1, 0.2, 0.3])
    alpha = alpha_from_js(js, alpha_max=10.0, normalize="mean", alpha=2.0)
    torch.testing.assert_close(alpha, torch.tensor([0.0, 4 / 3, 8 / 3, 4.0]))
    assert float(alpha.mean()) == pytest.approx(2.0)
    torch.testing.assert_close(alpha_from_js(js, alpha_max=3.0, alpha=2.0), torch.tensor([0.0, 4 / 3, 8 / 3, 3.0]))
    # a batch where the audio changes nothing gets the plain alpha everywhere
    torch.testing.assert_close(alpha_from_js(torch.zeros(3), alpha_max=5.0, alpha=2.0), torch.full((3,), 2.0))


def test_alpha_from_js_scaled_form():
    js = torch.tensor([0.0, math.log(2) / 2, math.log(2)])
    torch.testing.assert_close(alpha_from_js(js, alpha_max=4.0, normalize="none"), torch.tensor([0.0, 2.0, 4.0]))
    torch.testing.assert_close(alpha_from_js(js, alpha_max=1.0, normalize="none", scale=1.0),
                               torch.tensor([0.0, math.log(2) / 2, math.log(2)]))
    with pytest.raises(ValueError, match="normalize"):
        alpha_from_js(js, alpha_max=1.0, normalize="max")  # type: ignore[arg-type]


# ---- into the fused loss --------------------------------------------------------------------------------


def test_adaptive_alpha_in_the_fused_loss_matches_the_naive_per_row_formula():
    g = torch.Generator().manual_seed(3)
    rows, hs, ht, vocab, tau = 12, 6, 7, 29, 2.0
    h_s = torch.randn(rows, hs, generator=g, requires_grad=True)
    w_s = torch.randn(vocab, hs, generator=g)
    h_pos, h_neg = torch.randn(rows, ht, generator=g), torch.randn(rows, ht, generator=g)
    w_t = torch.randn(vocab + 3, ht, generator=g)
    labels = torch.randint(0, vocab, (rows,), generator=g)
    alpha = adaptive_alpha(h_pos, h_neg, w_t, alpha_max=3.0, alpha=1.5, vocab_size=vocab, temperature=tau)
    assert alpha.shape == (rows,) and float(alpha.max()) <= 3.0 and float(alpha.min()) >= 0.0
    loss = fused_linear_contrastive_kd_loss(h_s, w_s, h_pos, w_t, h_neg, labels, alpha=alpha, temperature=tau,
                                            kd_weight=1.0, ce_weight=0.0, backend="torch")
    z_pos, z_neg = h_pos @ w_t[:vocab].T, h_neg @ w_t[:vocab].T
    z_hat = z_pos + alpha[:, None] * (z_pos - z_neg)
    p = torch.log_softmax(z_hat.double() / tau, -1)
    q = torch.log_softmax((h_s @ w_s.T).double() / tau, -1)
    want = (p.exp() * (p - q)).sum(-1).mean() * tau**2
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
