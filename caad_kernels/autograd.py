"""Shared autograd helpers of the two ops."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch._C import _functions


def once_differentiable(op_name: str) -> Callable[[Callable], Callable]:
    """Like ``torch.autograd.function.once_differentiable``, with an error that names the op.

    The wrapped ``backward`` runs without building a graph. When it runs under ``create_graph=True``
    its outputs are tied to a node that raises a RuntimeError naming the op only if something
    differentiates them again (double backward, Hessian-vector products): first-order use under
    ``create_graph`` works. The tie goes through the saved tensors that have a history (so the
    second differentiation finds the error node on its way to the inputs).
    """
    message = (
        f"{op_name}: double backward is not supported (its backward is computed in closed form by the "
        "kernels and is not itself differentiable); differentiate the loss once, without create_graph=True "
        "through it, or use the naive caad_kernels.reference for higher-order derivatives"
    ).encode()

    def decorate(backward: Callable) -> Callable:
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            with torch.no_grad():
                outputs = backward(ctx, *grads)
            if not torch.is_grad_enabled():  # no create_graph: nothing will differentiate these
                return outputs
            # under create_graph the gradients depend on the inputs even when the incoming gradients are
            # constants, so they are always tied to the error node (torch's decorator checks only the latter)
            err_fn = _functions.DelayedError(message, len(outputs))
            # a zero that depends on the op's inputs (saved tensors with a history: the student logits, or
            # the fused op's one-element anchors), so that differentiating the outputs again reaches err_fn
            anchors = [t for t in ctx.saved_tensors if t is not None and t.requires_grad and t.numel()]
            tie = sum(t.reshape(-1)[0] for t in anchors) * 0 if anchors else None

            def fake_requires_grad(value):
                if value is not None:
                    value = value.detach()
                    if tie is None:
                        value.requires_grad = True
                    else:
                        value = value + tie.to(value.dtype)
                return value

            return err_fn(*[fake_requires_grad(v) for v in outputs])

        return wrapper

    return decorate
