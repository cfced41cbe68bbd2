"""The recipes of docs/integrations.md run as written (on tiny offline models) and give the values they promise."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import integrations_ddp_worker as ddp_worker  # noqa: E402
import integrations_loop_worker as loop_worker  # noqa: E402
from integrations_helpers import IGNORE, batch, causal_lm, tokenizer  # noqa: E402

DOC = Path(__file__).resolve().parent.parent / "docs" / "integrations.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
KINDS = {
    "hf": "ContrastiveKDTrainer(",
    "gkd": "GKDTrainer(",
    "distillation": "DistillationTrainer(",
    "liger": "loss = fused_linear_contrastive_kd_loss(",
    "torchtune": "ForwardKLWithChunkedOutputLoss(",
    "loop": "forward_through(",
}


def _kind(code: str) -> str:
    kinds = [kind for kind, marker in KINDS.items() if marker in code]
    assert len(kinds) == 1, code
    return kinds[0]


def test_every_recipe_is_covered():
    assert sorted(_kind(code) for code in BLOCKS) == sorted(KINDS)


def _chat_tokenizer():
    tok = tokenizer()
    tok.chat_template = ("{% for m in messages %}{{ m['content'] }}{% if not loop.last %} {% endif %}{% endfor %}"
                         "{% if add_generation_prompt %} {% endif %}")
    return tok


def _namespace(kind: str, tmp_path: Path) -> dict:
    common = dict(output_dir=str(tmp_path / kind), use_cpu=True, report_to=[], max_steps=1,
                  per_device_train_batch_size=2, save_strategy="no", disable_tqdm=True)
    ns: dict = {"student": causal_lm("llama", seed=0, hidden=16), "teacher": causal_lm("llama", seed=1, hidden=24),
                "tokenizer": _chat_tokenizer()}
    if kind == "hf":
        from transformers import TrainingArguments

        rows = batch(4, 7, seed=3)
        ns.update(training_args=TrainingArguments(**common),
                  train_dataset=[{k: v[i] for k, v in rows.items()} for i in range(4)])
    elif kind == "gkd":
        from datasets import Dataset
        from trl.experimental.gkd import GKDConfig

        ns.update(gkd_config=GKDConfig(**common, lmbda=0.0, max_length=16),
                  chat_dataset=Dataset.from_list([{"messages": [{"role": "user", "content": "t1 t2"},
                                                                {"role": "assistant", "content": f"t{i} t4"}]}
                                                  for i in range(4)]))
    elif kind == "distillation":
        from datasets import Dataset
        from trl import DistillationConfig

        ns["tokenizer"].padding_side = "left"
        ns.update(distillation_config=DistillationConfig(**common, max_completion_length=4),
                  prompt_dataset=Dataset.from_list([{"prompt": f"t1 t{i}"} for i in range(4)]))
    elif kind == "liger":
        g = torch.Generator().manual_seed(0)
        labels = torch.randint(0, 50, (20,), generator=g)
        labels[:5] = IGNORE
        ns.update(student_input=torch.randn(20, 16, generator=g, requires_grad=True),
                  student_weight=torch.randn(50, 16, generator=g, requires_grad=True),
                  teacher_input=torch.randn(20, 24, generator=g), teacher_weight=torch.randn(50, 24, generator=g),
                  labels=labels, beta=0.5, tau=2.0)
    elif kind == "torchtune":
        g = torch.Generator().manual_seed(1)
        student = torch.randn(2, 8, 40, generator=g, requires_grad=True)
        labels = torch.randint(0, 40, (2, 8), generator=g)
        labels[:, :3] = IGNORE
        ns.update(student_logit_chunks=list(student.chunk(4, dim=1)),
                  teacher_logit_chunks=list(torch.randn(2, 8, 40, generator=g).chunk(4, dim=1)), labels=labels,
                  kd_ratio=0.5, class_loss=torch.zeros(()), student_logits_full=student)
    return ns


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_recipe_runs(index, tmp_path):
    code = BLOCKS[index]
    kind = _kind(code)
    if kind == "loop":
        return _check_own_loop_recipe(code)
    if kind in ("gkd", "distillation"):
        pytest.importorskip("trl")
    ns = _namespace(kind, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(code, f"docs/integrations.md block {index}", "exec"), ns)
    if kind in ("hf", "gkd", "distillation"):
        assert ns["trainer"].state.global_step == 1
    if kind == "gkd":
        assert "use_caad_loss" in ns["trainer"].generalized_jsd_loss.__qualname__
    if kind == "liger":
        liger = pytest.importorskip("liger_kernel.chunked_loss")
        ref = liger.LigerFusedLinearJSDLoss(weight_hard_loss=0.3, weight_soft_loss=0.7, beta=0.5, temperature=2.0,
                                            compiled=False)(ns["student_input"], ns["student_weight"],
                                                            ns["teacher_input"], ns["teacher_weight"], ns["labels"])
        torch.testing.assert_close(ns["loss"], ref, rtol=1e-5, atol=1e-6)
    if kind == "torchtune":
        from test_integrations_torchtune import torchtune_chunked

        ref = torchtune_chunked(ns["student_logit_chunks"], ns["teacher_logit_chunks"], ns["labels"])
        torch.testing.assert_close(ns["kd_loss"].double(), ref.detach(), rtol=1e-5, atol=1e-5)
        assert ns["student_logits_full"].grad is not None


# ---- the own-loop recipe (DDP, accumulation, LoRA on the lm_head) -------------------------------------------------


def _loop_reference_grads(student, teacher):
    """The gradient of the float64 loss from the models' own logits over all 8 examples (the global mean)."""
    from test_integrations_hf import reference_loss

    params = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    inputs = loop_worker.stack(ddp_worker.dataset())
    loss = reference_loss(student, teacher, inputs, **loop_worker.LOSS_OPTIONS)
    return dict(zip([n for n, _ in params], torch.autograd.grad(loss, [p for _, p in params])))


def _assert_grads_match(grads, reference):
    assert sorted(grads) == sorted(reference)
    for name, ref in reference.items():
        scale = float(ref.abs().max().clamp(min=1e-30))
        torch.testing.assert_close(grads[name].double(), ref.double(), rtol=1e-4, atol=1e-5 * scale, msg=name)


def _check_own_loop_recipe(code):
    """One process, 4 micro-batches of 2, LoRA on q_proj and the lm_head: the gradient of the global mean."""
    peft = pytest.importorskip("peft")
    options = ", ".join(f"{k}={v}" for k, v in loop_worker.LOSS_OPTIONS.items())
    assert options in code  # the reference below uses the recipe's options
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], lora_dropout=0.0,
                             init_lora_weights=False)  # nonzero B: the adapter changes the logits
    student = peft.get_peft_model(causal_lm("llama", seed=0, hidden=16), config)
    teacher = causal_lm("llama", seed=1, hidden=24)
    reference = _loop_reference_grads(student, teacher)
    assert any("lm_head.lora_B" in name for name in reference)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        saved = loop_worker.run(None, student, teacher)
    _assert_grads_match(saved["grads"], reference)


@pytest.mark.slow
def test_own_loop_recipe_under_two_process_ddp(tmp_path):
    """The recipe as written under 2-process gloo DDP (2 micro-batches of 2 per rank): identical all-reduced
    gradients on both ranks, parameters in sync after the step, equal to the global mean over the 8 examples."""
    import os
    import subprocess
    import sys

    tests = Path(__file__).resolve().parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tests.parent)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(tests / "integrations_loop_worker.py"), str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for name, grad in rank0["grads"].items():
        assert torch.equal(grad, rank1["grads"][name]), name
        assert torch.equal(rank0["params"][name], rank1["params"][name]), name
    _assert_grads_match(rank0["grads"], _loop_reference_grads(*ddp_worker.models()))
