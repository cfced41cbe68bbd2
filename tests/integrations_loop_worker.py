"""One optimizer step of the own-loop recipe of ``docs/integrations.md``, run as written; saves its gradients.

Run in-process (one process, ``ddp_student`` is the student itself) by the tests, or under
``torchrun --nproc_per_node 2`` (gloo DDP)::

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/integrations_loop_worker.py OUT

The 8 examples of ``integrations_ddp_worker.dataset()`` are split into contiguous, equal shares
per rank, micro-batches of 2. Writes ``OUT/rank{r}.pt``: ``{"grads": {name: tensor}, "params":
{name: tensor}}`` (the gradients the optimizer stepped with, the parameters after the step).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import integrations_ddp_worker as ddp_worker  # noqa: E402

DOC = Path(__file__).resolve().parent.parent / "docs" / "integrations.md"
MARKER = "forward_through("
MICRO_BATCH = 2
#: the options the recipe passes to the loss (checked against its text by the tests)
LOSS_OPTIONS = {"temperature": 2.0, "kd_weight": 0.7, "ce_weight": 0.3}


def recipe() -> str:
    """The python block of docs/integrations.md that calls ``forward_through``."""
    blocks = [b for b in re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S) if MARKER in b]
    assert len(blocks) == 1, f"expected one recipe calling {MARKER} in {DOC}, found {len(blocks)}"
    return blocks[0]


def stack(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}


def run(out_dir: str | None, student: torch.nn.Module, teacher: torch.nn.Module, lr: float = 1e-2) -> dict:
    """Run the recipe for one optimizer step on this rank's share; returns (and saves) grads and new params."""
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    examples = ddp_worker.dataset()
    share = len(examples) // world
    mine = examples[rank * share:(rank + 1) * share]
    micro_batches = [stack(mine[i:i + MICRO_BATCH]) for i in range(0, len(mine), MICRO_BATCH)]
    ddp_student = student
    if world > 1:
        ddp_student = torch.nn.parallel.DistributedDataParallel(student)
    params = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    optimizer = torch.optim.SGD([p for _, p in params], lr=lr)
    saved: dict = {}

    def capture(opt, args, kwargs):
        saved["grads"] = {n: p.grad.detach().clone() for n, p in params if p.grad is not None}

    optimizer.register_step_pre_hook(capture)
    namespace = {"student": student, "ddp_student": ddp_student, "teacher": teacher, "optimizer": optimizer,
                 "steps": [micro_batches]}
    exec(compile(recipe(), "docs/integrations.md (own loop)", "exec"), namespace)
    saved["params"] = {n: p.detach().clone() for n, p in params}
    if out_dir is not None:
        torch.save(saved, Path(out_dir) / f"rank{rank}.pt")
    return saved


if __name__ == "__main__":
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    try:
        Path(sys.argv[1]).mkdir(parents=True, exist_ok=True)
        run(sys.argv[1], *ddp_worker.models())
    finally:
        torch.distributed.destroy_process_group()
