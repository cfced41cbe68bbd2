"""TRL adapters: our losses equal TRL's stock losses (alpha=0, no tau^2), in and out of its trainers."""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # GKDTrainer lives in trl.experimental
pytest.importorskip("trl")
pytest.importorskip("datasets")

from integrations_helpers import IGNORE, VOCAB, batch, causal_lm, tokenizer  # noqa: E402

from caad_kernels.integrations.trl import chunked_divergence_loss, generalized_jsd_loss, use_caad_loss  # noqa: E402


def _gkd():
    from trl.experimental.gkd import GKDTrainer

    return GKDTrainer


def _distillation_module():
    import trl.trainer.distillation_trainer as module

    return module


def _grads(loss, tensors):
    return torch.autograd.grad(loss, tensors, allow_unused=True)


def _count_calls(monkeypatch, name):
    """Count the calls of ``caad_kernels.integrations.trl.<name>`` (so an equality cannot come from TRL's own loss)."""
    import caad_kernels.integrations.trl as adapter

    calls = []
    original = getattr(adapter, name)

    def counted(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(adapter, name, counted)
    return calls


def _assert_close_all(ours, ref, rtol=1e-4, atol=1e-5):
    """Gradients agree to ``atol`` relative to the largest entry (both are float32 computations)."""
    for a, b in zip(ours, ref):
        if a is None or b is None:
            assert a is None and b is None
            continue
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol * float(b.abs().max().clamp(min=1e-30)))


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("reduction,with_labels,num_items",
                         [("batchmean", True, None), ("batchmean", False, None), ("sum", True, None),
                          ("mean", True, None), ("mean", False, None), ("batchmean", True, 23)])
def test_generalized_jsd_loss_equals_trl(beta, temperature, reduction, with_labels, num_items):
    stock = _gkd().generalized_jsd_loss
    g = torch.Generator().manual_seed(0)
    student = (4 * torch.randn(3, 5, 97, generator=g)).requires_grad_()
    teacher = 4 * torch.randn(3, 5, 97, generator=g)
    labels = torch.randint(0, 97, (3, 5), generator=g)
    labels[0, :2] = IGNORE
    labels[2, 4] = IGNORE
    kwargs = dict(labels=labels if with_labels else None, beta=beta, temperature=temperature, reduction=reduction,
                  num_items_in_batch=num_items)
    ours = generalized_jsd_loss(student, teacher, **kwargs)
    ref = stock(student, teacher, **kwargs)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)
    _assert_close_all(_grads(ours, [student]), _grads(ref, [student]))


def test_generalized_jsd_loss_rejects_per_element_reduction():
    with pytest.raises(ValueError, match="per-vocabulary"):
        generalized_jsd_loss(torch.randn(2, 8), torch.randn(2, 8), reduction="none")


@pytest.fixture(scope="module")
def gkd_trainer(tmp_path_factory):
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig

    args = GKDConfig(output_dir=str(tmp_path_factory.mktemp("gkd")), use_cpu=True, report_to=[], lmbda=0.0,
                     beta=0.5, per_device_train_batch_size=2, max_length=16, disable_dropout=True)
    dataset = Dataset.from_list([{"messages": [{"role": "user", "content": "t1 t2"},
                                               {"role": "assistant", "content": "t3"}]}] * 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _gkd()(model=causal_lm("llama", seed=0, hidden=16), teacher_model=causal_lm("llama", seed=1, hidden=24),
                      args=args, processing_class=tokenizer(), train_dataset=dataset)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("num_items", [None, 9])
def test_gkd_trainer_loss_and_gradients_equal_stock(gkd_trainer, beta, num_items, monkeypatch):
    calls = _count_calls(monkeypatch, "contrastive_kd_loss")
    stock_trainer = gkd_trainer
    ours_trainer = use_caad_loss(copy.copy(stock_trainer))
    assert "generalized_jsd_loss" not in stock_trainer.__dict__  # the stock instance is untouched
    stock_trainer.beta = ours_trainer.beta = beta
    inputs = batch(2, 7, seed=3)
    params = [p for p in stock_trainer.model.parameters() if p.requires_grad]
    ref = stock_trainer.compute_loss(stock_trainer.model, dict(inputs), num_items_in_batch=num_items)
    assert not calls
    ours = ours_trainer.compute_loss(ours_trainer.model, dict(inputs), num_items_in_batch=num_items)
    assert calls == ["contrastive_kd_loss"]
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)
    _assert_close_all(_grads(ours, params), _grads(ref, params))


def test_gkd_loss_temperature_option(gkd_trainer):
    ours_trainer = use_caad_loss(copy.copy(gkd_trainer), temperature=2.0)
    g = torch.Generator().manual_seed(5)
    student, teacher = torch.randn(2, 4, 31, generator=g), torch.randn(2, 4, 31, generator=g)
    stock = _gkd().generalized_jsd_loss(student, teacher, beta=0.5, temperature=2.0)
    torch.testing.assert_close(ours_trainer.generalized_jsd_loss(student, teacher, beta=0.5), stock, rtol=1e-5,
                               atol=1e-7)


def _distillation_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"prompt_ids": torch.randint(0, 60, (2, 3), generator=g), "prompt_mask": torch.ones(2, 3, dtype=torch.long),
            "completion_ids": torch.randint(0, 60, (2, 4), generator=g),
            "completion_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])}


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_chunked_divergence_loss_equals_trl(beta):
    stock = _distillation_module()._chunked_divergence_loss
    g = torch.Generator().manual_seed(1)
    h_s = torch.randn(2, 5, 12, generator=g, requires_grad=True)
    h_t = torch.randn(2, 5, 20, generator=g)
    w_s = (torch.randn(VOCAB, 12, generator=g) * 2).requires_grad_()
    w_t = torch.randn(VOCAB, 20, generator=g) * 2
    b_s = torch.randn(VOCAB, generator=g, requires_grad=True)
    b_t = torch.randn(VOCAB, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    kwargs = dict(student_lm_head_bias=b_s, teacher_lm_head_bias=b_t, student_logit_scale=0.5,
                  teacher_logit_scale=1.5, student_final_logit_softcapping=4.0, teacher_final_logit_softcapping=6.0,
                  temperature=2.0)
    for num_items in (None, 11):
        loss, entropy, n_valid = chunked_divergence_loss(h_s, h_t, w_s, w_t, mask, beta, num_items, **kwargs,
                                                         log_entropy=True)
        ref_loss, ref_entropy, ref_n = stock(h_s, h_t, w_s, w_t, mask, beta, num_items, **kwargs)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(entropy, ref_entropy.to(entropy.dtype), rtol=1e-5, atol=1e-5)
        assert int(n_valid) == int(ref_n) == 8
        _assert_close_all(_grads(loss, [h_s, w_s, b_s]), _grads(ref_loss, [h_s, w_s, b_s]))
    _, entropy, _ = chunked_divergence_loss(h_s, h_t, w_s, w_t, mask, beta)
    assert torch.isnan(entropy)  # not computed unless asked for


def test_zero_items_give_a_zero_loss_and_zero_gradients():
    """``num_items_in_batch = 0`` (no completion token in the accumulated batch): 0 where TRL gives NaN."""
    g = torch.Generator().manual_seed(2)
    student = torch.randn(2, 5, VOCAB, generator=g, requires_grad=True)
    labels = torch.full((2, 5), IGNORE)
    loss = generalized_jsd_loss(student, torch.randn(2, 5, VOCAB, generator=g), labels, num_items_in_batch=0)
    (grad,) = torch.autograd.grad(loss, student)
    assert float(loss.detach()) == 0.0 and torch.count_nonzero(grad) == 0
    h_s = torch.randn(2, 5, 12, generator=g, requires_grad=True)
    w_s = torch.randn(VOCAB, 12, generator=g, requires_grad=True)
    loss, _, n_valid = chunked_divergence_loss(h_s, torch.randn(2, 5, 20, generator=g), w_s,
                                               torch.randn(VOCAB, 20, generator=g), torch.zeros(2, 5), 0.5,
                                               torch.tensor(0))
    grads = torch.autograd.grad(loss, [h_s, w_s])
    assert float(loss.detach()) == 0.0 and int(n_valid) == 0 and all(torch.count_nonzero(x) == 0 for x in grads)


@pytest.fixture(scope="module")
def distillation_trainer(tmp_path_factory):
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    tok = tokenizer()
    tok.padding_side = "left"
    args = DistillationConfig(output_dir=str(tmp_path_factory.mktemp("distil")), use_cpu=True, report_to=[],
                              per_device_train_batch_size=2, max_completion_length=4, beta=0.5, temperature=2.0)
    # scale and softcap read from the configs by TRL and passed to the loss: Granite divides its logits by
    # logits_scaling, Gemma-2 soft-caps them
    student = causal_lm("granite", seed=0, hidden=16, logits_scaling=4.0)
    teacher = causal_lm("gemma2", seed=1, hidden=24, final_logit_softcapping=5.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DistillationTrainer(model=student, teacher_model=teacher, args=args, processing_class=tok,
                                   train_dataset=Dataset.from_list([{"prompt": "t1 t2"}] * 4))


def test_distillation_trainer_loss_and_gradients_equal_stock(distillation_trainer, monkeypatch):
    calls = _count_calls(monkeypatch, "fused_linear_contrastive_kd_loss")
    module = _distillation_module()
    stock_function = module._chunked_divergence_loss
    stock_trainer = distillation_trainer
    ours_trainer = use_caad_loss(copy.copy(stock_trainer), log_entropy=True)
    params = [p for p in stock_trainer.model.parameters() if p.requires_grad]
    inputs = _distillation_inputs()
    for num_items in (None, torch.tensor(7.0)):
        calls.clear()
        ref = stock_trainer._compute_loss(stock_trainer.model, dict(inputs), num_items)
        assert not calls
        ours = ours_trainer._compute_loss(ours_trainer.model, dict(inputs), num_items)
        assert calls == ["fused_linear_contrastive_kd_loss"] * 2  # the loss, and the entropy (log_entropy=True)
        assert module._chunked_divergence_loss is stock_function  # restored after the call
        torch.testing.assert_close(ours[0], ref[0], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(ours[1], ref[1].to(ours[1].dtype), rtol=1e-5, atol=1e-4)
        assert int(ours[2]) == int(ref[2])
        _assert_close_all(_grads(ours[0], params), _grads(ref[0], params))


def test_use_caad_loss_rejects_other_trainers_and_options(gkd_trainer, distillation_trainer):
    with pytest.raises(TypeError, match="GKDTrainer or DistillationTrainer"):
        use_caad_loss(object())
    with pytest.raises(ValueError, match="DistillationConfig.temperature"):
        use_caad_loss(copy.copy(distillation_trainer), temperature=2.0)
    with pytest.raises(ValueError, match="apply to DistillationTrainer"):
        use_caad_loss(copy.copy(gkd_trainer), chunk_size=8)
