"""One optimizer step of ``ContrastiveKDTrainer`` on a fixed 8-example dataset; saves the gradients it stepped with.

Run in-process (one process) by the tests, or under ``torchrun --nproc_per_node 2`` (gloo DDP)::

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/integrations_ddp_worker.py OUT PER_DEVICE GA

Writes ``OUT/rank{r}.pt``: ``{"grads": {name: tensor}, "params": {name: tensor}}`` (the gradients
at ``on_pre_optimizer_step`` of the first step, the parameters after it); ``run`` returns the
trainer's log history.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from integrations_helpers import PAD, batch, causal_lm  # noqa: E402

EXAMPLES = 8
LENGTH = 7
LOSS_OPTIONS = {"alpha": 1.0, "temperature": 2.0, "kd_weight": 0.7, "ce_weight": 0.3}


def dataset() -> list[dict[str, torch.Tensor]]:
    """8 examples of 7 tokens; example ``i`` has its first ``1 + i % 6`` labels ignored (unequal counts)."""
    rows = batch(EXAMPLES, LENGTH, seed=11, ignored_prefix=tuple(1 + i % 6 for i in range(EXAMPLES)))
    return [{key: value[i] for key, value in rows.items()} for i in range(EXAMPLES)]


def negative_inputs(inputs):
    """The teacher's negative path: the first two tokens hidden behind the pad token, same layout."""
    ids = inputs["input_ids"].clone()
    ids[:, :2] = PAD
    return {"input_ids": ids, "attention_mask": inputs["attention_mask"]}


def models():
    return causal_lm("llama", seed=0, hidden=16), causal_lm("llama", seed=1, hidden=24)


def run(out_dir: str, per_device: int, accumulation: int, fused: bool = True) -> list[dict]:
    from transformers import TrainerCallback, TrainingArguments

    from caad_kernels.integrations.hf import ContrastiveKDTrainer

    out = Path(out_dir)
    saved = {}

    class Capture(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if "grads" not in saved:
                saved["grads"] = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}

    student, teacher = models()
    args = TrainingArguments(
        output_dir=str(out / "trainer"), use_cpu=True, report_to=[], per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=1e-2, max_grad_norm=0.0,
        save_strategy="no", logging_steps=1, ddp_find_unused_parameters=False,
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None, dataloader_drop_last=False, seed=0,
        disable_tqdm=True,
    )
    trainer = ContrastiveKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=dataset(),
                                   loss_options=LOSS_OPTIONS, fused=fused, negative_inputs=negative_inputs,
                                   callbacks=[Capture()])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    saved["params"] = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    torch.save(saved, out / f"rank{trainer.args.process_index}.pt")
    return trainer.state.log_history


if __name__ == "__main__":
    torch.set_num_threads(1)
    run(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), fused=sys.argv[4] != "logits" if len(sys.argv) > 4 else True)
