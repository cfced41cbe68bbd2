"""The effective ``lm_head`` weight and bias of a model, for the fused-linear loss.

The fused op takes the ``[V, H]`` weight and runs the GEMM itself, so whatever the model's
``lm_head`` module adds in its ``forward`` must be folded into the weight, or refused:

- ``torch.nn.Linear``: its ``weight`` and ``bias`` as they are.
- PEFT LoRA ``Linear`` (``peft.tuners.lora.Linear``) with active, unmerged adapters:
  ``W + sum_a scaling_a * B_a @ A_a`` (and ``b + scaling_a * bias(B_a)`` with ``lora_bias``), a
  differentiable ``[V, H]`` tensor, so the adapters get their gradients through the fused op's
  weight gradient. Exactly the module's output only when the adapters' dropout is the identity:
  with ``lora_dropout > 0`` in training mode the module drops input features *per token*, which
  no single weight reproduces, so it raises. DoRA and other LoRA variants, ``fan_in_fan_out`` and
  per-batch adapter names also raise. Merged or disabled adapters: the base layer's weight.
- PEFT ``ModulesToSaveWrapper`` (``modules_to_save=["lm_head"]``): the active copy.
- A DTensor weight (FSDP2) is gathered with ``full_tensor()`` (differentiable: its gradient is
  reduce-scattered back to the shards by autograd).
- A DeepSpeed ZeRO-3 partitioned weight raises: the fused form would read a 0-element shard.

Anything else (a quantized layer, a custom head) raises a ``TypeError`` naming the module type.
"""

from __future__ import annotations

from typing import Any

import torch


def _is_lora_linear(module: torch.nn.Module) -> bool:
    return hasattr(module, "base_layer") and hasattr(module, "lora_A") and hasattr(module, "lora_B")


def _is_modules_to_save(module: torch.nn.Module) -> bool:
    return hasattr(module, "modules_to_save") and hasattr(module, "original_module")


def _full(tensor: torch.Tensor | None) -> torch.Tensor | None:
    if tensor is None:
        return None
    if hasattr(tensor, "full_tensor") and callable(tensor.full_tensor):  # torch.distributed.tensor.DTensor
        return tensor.full_tensor()
    status = getattr(tensor, "ds_status", None)  # a DeepSpeed ZeRO-3 parameter
    if status is not None and getattr(status, "name", str(status)) != "AVAILABLE":
        raise ValueError(
            f"the lm_head weight is partitioned by DeepSpeed ZeRO-3 (ds_status {status}): the fused-linear loss "
            "would read a shard; use the logits form (fused=False) or ZeRO stage 0-2"
        )
    return tensor


def _linear(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not isinstance(module, torch.nn.Linear):
        raise TypeError(
            f"the fused-linear loss needs the lm_head to be a torch.nn.Linear (or a PEFT LoRA / modules_to_save "
            f"wrapper of one), got {type(module).__module__}.{type(module).__name__}; use the logits form "
            "(fused=False)"
        )
    return _full(module.weight), _full(module.bias)


def _lora_weight(module: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight, bias = _linear(module.base_layer)
    if module.disable_adapters or module.merged:
        return weight, bias
    if getattr(module, "fan_in_fan_out", False):
        raise ValueError("LoRA on the lm_head with fan_in_fan_out=True is not supported by the fused-linear loss")
    variants = getattr(module, "lora_variant", {}) or {}
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        if name in variants or (getattr(module, "use_dora", {}) or {}).get(name, False):
            raise ValueError(
                f"LoRA adapter {name!r} on the lm_head is a variant (DoRA or similar): the fused-linear loss folds "
                "only plain LoRA into the weight; use the logits form (fused=False)"
            )
        dropout = module.lora_dropout[name]
        if module.training and not isinstance(dropout, torch.nn.Identity) and getattr(dropout, "p", 0.0) > 0:
            raise ValueError(
                f"LoRA adapter {name!r} on the lm_head has lora_dropout={dropout.p}: dropout on the adapter's "
                "input acts per token and cannot be folded into one weight, so the fused-linear loss would train "
                "a different model; use lora_dropout=0 for the lm_head, keep the lm_head out of target_modules, "
                "or use the logits form (fused=False)"
            )
        lora_a, lora_b, scaling = module.lora_A[name], module.lora_B[name], module.scaling[name]
        delta = (lora_b.weight @ lora_a.weight.to(lora_b.weight.dtype)) * scaling
        weight = weight + delta.to(weight.dtype)
        if getattr(lora_b, "bias", None) is not None:
            lora_bias = (lora_b.bias * scaling).to(weight.dtype)
            bias = lora_bias if bias is None else bias + lora_bias
    return weight, bias


def output_projection(head: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight [V, H], bias [V] or None)`` with ``head(x) == x @ weight.T + bias`` (see the module docstring).

    The returned tensors carry autograd history to the parameters that produce them (the LoRA
    factors for a LoRA head), so a loss on them trains what the module would train.
    """
    if head is None:
        raise ValueError("the model has no output embeddings (get_output_embeddings() returned None)")
    if _is_modules_to_save(head):
        if getattr(head, "disable_adapters", False) or not head.active_adapters:
            return output_projection(head.original_module)
        active = [name for name in head.active_adapters if name in head.modules_to_save]
        if len(active) != 1:
            raise ValueError(f"the lm_head modules_to_save wrapper has {len(active)} active copies, expected 1")
        return output_projection(head.modules_to_save[active[0]])
    if _is_lora_linear(head):
        return _lora_weight(head)
    return _linear(head)
