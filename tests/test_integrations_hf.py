"""The Hugging Face Trainer integration against references built from the models' own logits.

The reference of every check is computed from ``model(...).logits`` (which carry the models' own
logit scale / softcap and LoRA adapters) with a float64 divergence written in
``integrations_helpers``; the DDP test compares 2-process gloo gradients with a 1-process run of
the same global batch and with that reference.
"""

from __future__ import annotations

import os
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import integrations_ddp_worker as worker  # noqa: E402
from integrations_helpers import IGNORE, batch, causal_lm, kl_rows  # noqa: E402

from caad_kernels.integrations import forward_through, logit_transform, output_projection  # noqa: E402
from caad_kernels.integrations.model_config import LogitTransform  # noqa: E402

TESTS = Path(__file__).resolve().parent


def _trainer(student, teacher, tmp_path, **kwargs):
    from transformers import TrainingArguments

    from caad_kernels.integrations.hf import ContrastiveKDTrainer

    precision = kwargs.pop("precision", {})
    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], **precision)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ContrastiveKDTrainer(model=student, teacher_model=teacher, args=args, **kwargs)


def reference_loss(student, teacher, inputs, *, alpha=1.0, temperature=1.0, kd_weight=1.0, ce_weight=0.0,
                   temperature_scaling=True, negative=None, num_items=None):
    """From full logits: ``(kd_weight * sum KL * tau^2 + ce_weight * sum CE) / (valid shifted labels or num_items)``."""
    model_inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    s = student(**model_inputs).logits[:, :-1]
    with torch.no_grad():
        z = teacher(**model_inputs).logits[:, :-1]
        if negative is not None:
            z = z + alpha * (z - teacher(**negative).logits[:, :-1])
    labels = inputs["labels"][:, 1:]
    valid = labels != IGNORE
    kd = kl_rows(s, z[..., : s.shape[-1]], 0.0, temperature)[valid].sum()
    if temperature_scaling:
        kd = kd * temperature**2
    ce = torch.nn.functional.cross_entropy(s[valid].double(), labels[valid], reduction="sum")
    denominator = valid.sum() if num_items is None else num_items
    return (kd_weight * kd + ce_weight * ce) / denominator


def _grads(loss, params):
    return torch.autograd.grad(loss, params)


def _assert_grads_close(ours, ref, rel=1e-5):
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=rel * float(b.abs().max().clamp(min=1e-30)))


# ---- config transforms -----------------------------------------------------------------------------------------


def test_logit_transform_read_from_configs():
    import transformers

    assert logit_transform(transformers.LlamaConfig()) == LogitTransform(1.0, None)
    assert logit_transform(transformers.CohereConfig(logit_scale=0.125)) == LogitTransform(0.125, None)
    assert logit_transform(transformers.GraniteConfig(logits_scaling=8.0)) == LogitTransform(0.125, None)
    assert logit_transform(transformers.Gemma2Config(final_logit_softcapping=30.0)) == LogitTransform(1.0, 30.0)
    assert logit_transform(transformers.Gemma3TextConfig()) == LogitTransform(1.0, None)
    hyperclova = types.SimpleNamespace(model_type="hyperclovax", logits_scaling=2.0)
    assert logit_transform(hyperclova) == LogitTransform(2.0, None)
    multimodal = types.SimpleNamespace(get_text_config=lambda: types.SimpleNamespace(final_logit_softcapping=5.0))
    assert logit_transform(multimodal) == LogitTransform(1.0, 5.0)
    with pytest.raises(ValueError, match="logit_scale must be > 0"):
        logit_transform(types.SimpleNamespace(logit_scale=0.0))
    with pytest.raises(ValueError, match="final_logit_softcapping must be a finite number"):
        logit_transform(types.SimpleNamespace(final_logit_softcapping="30"))


# ---- the trainer's loss against the models' logits --------------------------------------------------------------

CONFIG_TRANSFORMS = {
    "llama": {},
    "cohere": {"logit_scale": 0.5},
    "granite": {"logits_scaling": 4.0},
    "gemma2": {"final_logit_softcapping": 5.0},
}


@pytest.mark.parametrize("kind", sorted(CONFIG_TRANSFORMS))
def test_fused_trainer_loss_matches_model_logits(kind, tmp_path):
    """The fused form applies each model's config transform exactly as its forward does."""
    student = causal_lm(kind, seed=0, hidden=16, **CONFIG_TRANSFORMS[kind])
    teacher = causal_lm(kind, seed=1, hidden=24, **CONFIG_TRANSFORMS[kind])
    options = {"temperature": 2.0, "kd_weight": 0.7, "ce_weight": 0.3}
    trainer = _trainer(student, teacher, tmp_path, loss_options=options)
    inputs = batch(2, 7, seed=1)
    params = [p for p in student.parameters() if p.requires_grad]
    ours = trainer.compute_loss(trainer.model, dict(inputs), num_items_in_batch=torch.tensor(9))
    ref = reference_loss(student, teacher, inputs, num_items=9, **options)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-7)
    _assert_grads_close(_grads(ours, params), _grads(ref, params))


def test_scale_and_softcap_are_not_ignored(tmp_path):
    """Without the config transform the loss would differ: the check above can fail."""
    student = causal_lm("gemma2", seed=0, hidden=16, final_logit_softcapping=2.0)
    teacher = causal_lm("gemma2", seed=1, hidden=24, final_logit_softcapping=2.0)
    inputs = batch(2, 7, seed=1)
    read = _trainer(student, teacher, tmp_path).compute_loss(student, dict(inputs))
    overridden = _trainer(student, teacher, tmp_path, loss_options={"student_softcap": None, "teacher_softcap": None})
    assert abs(read.item() - overridden.compute_loss(student, dict(inputs)).item()) > 1e-2
    torch.testing.assert_close(read.double(), reference_loss(student, teacher, inputs).detach(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("fused", [True, False])
def test_contrastive_teacher_through_negative_inputs(fused, tmp_path):
    student, teacher = worker.models()
    options = {"alpha": 2.0, "temperature": 2.0, "kd_weight": 0.7, "ce_weight": 0.3}
    trainer = _trainer(student, teacher, tmp_path, loss_options=options, fused=fused,
                       negative_inputs=worker.negative_inputs)
    inputs = batch(3, 7, seed=4)
    params = [p for p in student.parameters() if p.requires_grad]
    ours = trainer.compute_loss(trainer.model, dict(inputs))
    ref = reference_loss(student, teacher, inputs, negative=worker.negative_inputs(inputs), **options)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-7)
    _assert_grads_close(_grads(ours, params), _grads(ref, params))


def test_negative_path_with_another_layout_raises(tmp_path):
    student, teacher = worker.models()
    trainer = _trainer(student, teacher, tmp_path,
                       negative_inputs=lambda b: {"input_ids": b["input_ids"][:, 1:]})
    with pytest.raises(ValueError, match="positive path's \\[B, T\\] layout"):
        trainer.compute_loss(trainer.model, dict(batch(2, 7)))


def test_no_valid_token_in_the_global_batch_gives_zero(tmp_path):
    student, teacher = worker.models()
    trainer = _trainer(student, teacher, tmp_path)
    inputs = batch(2, 7)
    inputs["labels"][:] = IGNORE
    loss = trainer.compute_loss(trainer.model, dict(inputs), num_items_in_batch=torch.tensor(0))
    assert loss.item() == 0.0
    loss.backward()
    assert all(torch.count_nonzero(p.grad) == 0 for p in student.parameters() if p.grad is not None)


def test_bad_options_raise_before_training(tmp_path):
    student, teacher = worker.models()
    with pytest.raises(ValueError, match="unknown keys \\['temprature'\\]"):
        _trainer(student, teacher, tmp_path, loss_options={"temprature": 2.0})
    with pytest.raises(ValueError, match="must be 'mean'"):
        _trainer(student, teacher, tmp_path, loss_options={"reduction": "sum"})
    with pytest.raises(ValueError, match="temperature must be > 0"):
        _trainer(student, teacher, tmp_path, loss_options={"temperature": 0.0})
    with pytest.raises(ValueError, match="compute_loss_func"):
        _trainer(student, teacher, tmp_path, compute_loss_func=lambda *a, **k: 0)
    with pytest.raises(TypeError, match="teacher_model must be a torch.nn.Module"):
        _trainer(student, "teacher", tmp_path)


def test_autocast_bf16_runs_close_to_fp32(tmp_path):
    """bf16 mixed precision (accelerate's CPU autocast): the backbones run under autocast, the loss in bf16."""
    student, teacher = worker.models()
    inputs = batch(2, 7, seed=2)
    fp32 = _trainer(student, teacher, tmp_path).compute_loss(student, dict(inputs))
    bf16_trainer = _trainer(student, teacher, tmp_path, precision={"bf16": True})
    assert bf16_trainer.accelerator.mixed_precision == "bf16"
    loss = bf16_trainer.compute_loss(bf16_trainer.model, dict(inputs))
    assert loss.item() != fp32.item()  # it did run in bf16
    loss.backward()
    torch.testing.assert_close(loss.double(), fp32.detach().double(), rtol=3e-2, atol=1e-3)
    assert student.lm_head.weight.grad.dtype == torch.float32
    assert all(torch.isfinite(p.grad).all() for p in student.parameters())


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    from transformers import TrainingArguments

    from caad_kernels.integrations.hf import ContrastiveKDTrainer

    inputs = batch(2, 7, seed=6)
    grads = []
    for checkpointing in (False, True):
        student, teacher = worker.models()
        args = TrainingArguments(output_dir=str(tmp_path / str(checkpointing)), use_cpu=True, report_to=[],
                                 gradient_checkpointing=checkpointing)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = ContrastiveKDTrainer(model=student, teacher_model=teacher, args=args)
            if checkpointing:  # what Trainer.train() does before the first step
                student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            student.train()
            trainer.compute_loss(trainer.model, dict(inputs)).backward()
        assert student.model.gradient_checkpointing is checkpointing
        grads.append([p.grad for p in student.parameters()])
    _assert_grads_close(grads[1], grads[0])


# ---- PEFT LoRA on the lm_head -----------------------------------------------------------------------------------


def _lora_student(dropout=0.0, **extra):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], lora_dropout=dropout,
                             init_lora_weights=False, **extra)  # nonzero B: the adapter changes the logits
    return peft.get_peft_model(causal_lm("llama", seed=0, hidden=16), config)


def test_lora_on_lm_head_is_folded_into_the_fused_weight(tmp_path):
    student = _lora_student()
    teacher = causal_lm("llama", seed=1, hidden=24)
    trainer = _trainer(student, teacher, tmp_path, loss_options={"temperature": 2.0})
    inputs = batch(2, 7, seed=5)
    params = [p for p in student.parameters() if p.requires_grad]
    assert any("lm_head.lora_B" in n for n, p in student.named_parameters() if p.requires_grad)
    ours = trainer.compute_loss(trainer.model, dict(inputs))
    ref = reference_loss(student, teacher, inputs, temperature=2.0)
    with student.disable_adapter():
        without_adapter = reference_loss(student, teacher, inputs, temperature=2.0)
    assert abs(ref.item() - without_adapter.item()) > 1e-2  # the adapter matters, so ignoring it would fail
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-7)
    _assert_grads_close(_grads(ours, params), _grads(ref, params))


def test_lora_on_lm_head_with_dropout_raises_a_clear_error(tmp_path):
    student = _lora_student(dropout=0.1)
    trainer = _trainer(student, causal_lm("llama", seed=1, hidden=24), tmp_path)
    student.train()
    with pytest.raises(ValueError, match="lora_dropout=0.1"):
        trainer.compute_loss(trainer.model, dict(batch(2, 7)))
    # the logits form runs the module itself, dropout included
    logits_trainer = _trainer(student, causal_lm("llama", seed=1, hidden=24), tmp_path, fused=False)
    assert torch.isfinite(logits_trainer.compute_loss(logits_trainer.model, dict(batch(2, 7))))


def test_output_projection_of_plain_and_modules_to_save_heads():
    peft = pytest.importorskip("peft")
    model = causal_lm("llama", seed=0, hidden=16)
    weight, bias = output_projection(model.lm_head)
    assert weight is model.lm_head.weight and bias is None
    saved = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    head = saved.get_base_model().get_output_embeddings()
    active = head.modules_to_save[head.active_adapters[0]]
    assert output_projection(head)[0] is active.weight
    with pytest.raises(TypeError, match="torch.nn.Linear"):
        output_projection(torch.nn.Embedding(4, 4))


# ---- forward redirection ----------------------------------------------------------------------------------------


class _Wrapper(torch.nn.Module):
    def __init__(self, module, call=True):
        super().__init__()
        self.module, self.call, self.calls = module, call, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.module(*args, **kwargs) if self.call else None


def test_forward_through_runs_inside_the_wrapper_and_restores_forward():
    inner = torch.nn.Linear(2, 2)
    wrapper = _Wrapper(inner)
    assert forward_through(wrapper, inner, lambda x: x * 3, torch.ones(1)).item() == 3.0
    assert wrapper.calls == 1 and "forward" not in inner.__dict__
    patched = lambda x: x  # noqa: E731 - an instance forward (as accelerate's autocast wrapper) is kept
    inner.forward = patched
    with pytest.raises(KeyError):
        forward_through(wrapper, inner, lambda x: {}["missing"], torch.ones(1))
    assert inner.__dict__["forward"] is patched
    with pytest.raises(RuntimeError, match="did not call"):
        forward_through(_Wrapper(inner, call=False), inner, lambda x: x, torch.ones(1))
    assert inner.__dict__["forward"] is patched


def test_importing_the_library_imports_no_framework():
    code = ("import sys, caad_kernels, caad_kernels.integrations, caad_kernels.integrations.torchtune, "
            "caad_kernels.integrations.trl; "
            "print(sorted(m for m in ('transformers', 'trl', 'peft', 'accelerate', 'torchtune') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---- gradient accumulation and DDP --------------------------------------------------------------------------------


def _reference_step_grads():
    """The gradient of one optimizer step over the worker's 8 examples: mean over all their valid tokens."""
    student, teacher = worker.models()
    rows = worker.dataset()
    inputs = {key: torch.stack([row[key] for row in rows]) for key in rows[0]}
    loss = reference_loss(student, teacher, inputs, negative=worker.negative_inputs(inputs), **worker.LOSS_OPTIONS)
    loss.backward()
    return {n: p.grad for n, p in student.named_parameters()}


def _load(path):
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("per_device,accumulation", [(8, 1), (2, 4)])
def test_one_process_step_matches_the_global_mean(per_device, accumulation, tmp_path):
    logs = worker.run(str(tmp_path), per_device, accumulation)
    grads = _load(tmp_path / "rank0.pt")["grads"]
    reference = _reference_step_grads()
    assert set(grads) == set(reference)
    _assert_grads_close([grads[n] for n in reference], list(reference.values()))
    step = next(log for log in logs if "kd_loss" in log)  # the logged components add up to the logged loss
    total = worker.LOSS_OPTIONS["kd_weight"] * step["kd_loss"] + worker.LOSS_OPTIONS["ce_weight"] * step["ce_loss"]
    assert step["loss"] == pytest.approx(total, rel=1e-4)


def test_evaluate_reports_the_distillation_loss(tmp_path):
    from transformers import TrainingArguments

    from caad_kernels.integrations.hf import ContrastiveKDTrainer

    student, teacher = worker.models()
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_eval_batch_size=8,
                             disable_tqdm=True)
    trainer = ContrastiveKDTrainer(model=student, teacher_model=teacher, args=args, eval_dataset=worker.dataset(),
                                   loss_options=worker.LOSS_OPTIONS, negative_inputs=worker.negative_inputs)
    rows = worker.dataset()
    inputs = {key: torch.stack([row[key] for row in rows]) for key in rows[0]}
    with torch.no_grad():
        ref = reference_loss(student, teacher, inputs, negative=worker.negative_inputs(inputs), **worker.LOSS_OPTIONS)
    assert trainer.evaluate()["eval_loss"] == pytest.approx(ref.item(), rel=1e-5)


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(tmp_path):
    """2-process gloo DDP, 2 per device x 2 accumulation steps vs 1 process, 4 x 2: the same 8 examples."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS.parent)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(TESTS / "integrations_ddp_worker.py"), str(tmp_path / "ddp"), "2", "2"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    worker.run(str(tmp_path / "single"), 4, 2)
    rank0, rank1 = _load(tmp_path / "ddp" / "rank0.pt"), _load(tmp_path / "ddp" / "rank1.pt")
    single = _load(tmp_path / "single" / "rank0.pt")
    for name, grad in rank0["grads"].items():
        assert torch.equal(grad, rank1["grads"][name]), name  # all-reduced: identical on both ranks
        assert torch.equal(rank0["params"][name], rank1["params"][name]), name  # and the ranks stay in sync
    names = sorted(single["grads"])
    assert sorted(rank0["grads"]) == names
    _assert_grads_close([rank0["grads"][n] for n in names], [single["grads"][n] for n in names])
    reference = _reference_step_grads()
    _assert_grads_close([rank0["grads"][n] for n in names], [reference[n] for n in names])

