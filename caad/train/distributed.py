"""Process group and DeepSpeed setup: one process with no launcher, or many under ``deepspeed``/``torchrun``.

- Without a launcher (no ``RANK`` in the environment) a 1-rank process group is created here:
  ``MASTER_ADDR=127.0.0.1`` and a free ``MASTER_PORT``.
- On a machine without CUDA, ``DS_ACCELERATOR=cpu`` is set (unless already set) and the gloo
  backend is used; with CUDA, nccl. The training code is the same.
- DeepSpeed's CPU accelerator compiles a shared-memory collective op (``deepspeed_shm_comm``) with
  ninja the first time its communication backend starts: several minutes on a small CPU machine,
  for collectives that gloo does too. :func:`init_distributed` marks that op unavailable (unless
  ``CAAD_DS_SHM_COMM=1``), so DeepSpeed falls back to plain ``torch.distributed`` on gloo.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "DistInfo",
    "all_reduce_max",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "find_free_port",
    "init_distributed",
    "shutdown_distributed",
]

#: Environment variables :func:`init_distributed` set itself (no launcher); removed again at shutdown.
_OWN_ENV: list[str] = []


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def find_free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _prepare_deepspeed_env() -> None:
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed.ops

    if os.environ.get("DS_ACCELERATOR") == "cpu" and os.environ.get("CAAD_DS_SHM_COMM") != "1":
        # Only read by deepspeed.comm.torch.build_shm_op: None there means plain torch.distributed.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed() -> DistInfo:
    """Initialise (once) the process group DeepSpeed uses; returns rank, world size and device."""
    _prepare_deepspeed_env()
    import deepspeed
    import torch.distributed as dist

    if "RANK" not in os.environ and not dist.is_initialized():
        own = {
            "RANK": "0",
            "WORLD_SIZE": "1",
            "LOCAL_RANK": "0",
            "MASTER_ADDR": os.environ.get("MASTER_ADDR", "127.0.0.1"),
            "MASTER_PORT": os.environ.get("MASTER_PORT", str(find_free_port())),
        }
        _OWN_ENV[:] = [name for name in own if name not in os.environ]
        os.environ.update(own)
    use_cuda = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def all_reduce_sum(value: float | int | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Sum of ``value`` over all ranks (float64 tensor on ``device``)."""
    import torch.distributed as dist

    tensor = torch.as_tensor(value, dtype=torch.float64, device=device).clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(value: float | int | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Maximum of ``value`` over all ranks (float64 tensor on ``device``)."""
    import torch.distributed as dist

    tensor = torch.as_tensor(value, dtype=torch.float64, device=device).clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def broadcast_object(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (picklable; no-op without a process group)."""
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def shutdown_distributed(wait: bool = True) -> None:
    """Destroy the process group (call once, at the end of a command); ``wait``: barrier first.

    Without it a rank can exit while gloo's threads still serve the group, and rank 0 (which hosts
    the rendezvous store) can leave before the others have finished with it: the other ranks then
    abort (``terminate called without an active exception``). ``wait=False`` after an error (the
    other ranks may never reach a barrier). A later :func:`init_distributed` in the same process
    starts a fresh group (the variables set here for a launcher-less run are removed).
    """
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            if wait:
                barrier()
        finally:
            import deepspeed.comm

            # DeepSpeed's own wrapper also drops the groups it cached (a later group starts clean)
            deepspeed.comm.destroy_process_group()
    for name in _OWN_ENV:
        os.environ.pop(name, None)
    _OWN_ENV.clear()
