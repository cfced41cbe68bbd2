"""Run a function *as* a wrapped module's forward, so the wrapper (DDP, FSDP, DeepSpeed) sees a forward.

A data-parallel wrapper does its bookkeeping in its own ``forward``: DDP prepares the reducer
that all-reduces the gradients in backward, FSDP unshards the parameters (and registers the hooks
that reshard and reduce-scatter in backward), DeepSpeed gathers ZeRO-3 partitions. A loss that
calls into the inner model directly, e.g. ``unwrap_model(model).model(input_ids)`` followed by a
fused-linear loss on ``lm_head.weight``, skips all of that: under DDP the gradients are then
never all-reduced and the ranks' parameters drift apart silently.

:func:`forward_through` calls ``wrapper(*args, **kwargs)`` with ``module.forward`` replaced for
that one call by ``fn``, so ``fn`` runs inside the wrapper's forward, with everything the wrapper
sets up around it (the technique of PyTorch Lightning's and TRL's ``_ForwardRedirection``). The
replacement is removed as soon as ``fn`` starts (so ``fn`` may call the real ``module.forward``)
and in any case before :func:`forward_through` returns or raises. When the model is not wrapped,
pass the model as both ``wrapper`` and ``module``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def forward_through(wrapper: torch.nn.Module, module: torch.nn.Module, fn: Callable[..., T], *args: Any,
                    **kwargs: Any) -> T:
    """``fn(*args, **kwargs)``, run as ``module``'s forward inside ``wrapper(...)``; returns what ``fn`` returns.

    Args:
        wrapper: the outermost module (``DistributedDataParallel``, FSDP, a DeepSpeed engine, or
            ``module`` itself); it must call ``module`` exactly once in its forward.
        module: the module the wrapper wraps (``accelerator.unwrap_model(wrapper)``).
        fn: any callable; its arguments pass through the wrapper (which may move tensors to the
            device or cast them, as it would for the model's own inputs).

    Raises:
        RuntimeError: the wrapper did not call ``module`` (so ``fn`` never ran).
    """
    had_instance_forward = "forward" in module.__dict__
    saved_forward = module.__dict__.get("forward")
    calls = []

    def restore() -> None:
        if had_instance_forward:
            module.forward = saved_forward
        else:
            module.__dict__.pop("forward", None)

    def redirected(*inner_args: Any, **inner_kwargs: Any) -> Any:
        restore()
        calls.append(True)
        return fn(*inner_args, **inner_kwargs)

    module.forward = redirected
    try:
        output = wrapper(*args, **kwargs)
    finally:
        restore()
    if not calls:
        raise RuntimeError(
            f"{type(wrapper).__name__} did not call {type(module).__name__}.forward: pass the module it wraps "
            "(accelerator.unwrap_model(wrapper)) as `module`"
        )
    return output
