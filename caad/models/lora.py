"""LoRA adapters (through ``peft``, an optional dependency: ``pip install 'caad[lora]'``) on a speech LM.

- :func:`apply_lora` injects LoRA layers in place into the named linear modules of one sub-module
  (the composite's ``language_model`` by default), freezes that sub-module's base weights and
  leaves the adapters trainable. The wrapped model stays a plain ``PreTrainedModel`` (no
  ``PeftModel`` wrapper), so every :class:`~caad.models.interface.SpeechLM` call works unchanged.
- ``lm_head`` under LoRA: the fused-linear loss reads :attr:`SpeechLM.lm_head_weight`, which is
  :func:`effective_weight`: ``W + sum_a scaling_a * B_a @ A_a`` built differentiably from the adapter
  (gradients reach ``A`` and ``B``; the cost is one ``[V, H]`` tensor, the size of the weight, never
  ``[N, V]``). Adapters that a weight cannot express raise ``NotImplementedError`` there: DoRA, a LoRA
  bias, or dropout > 0 on ``lm_head`` while training (dropout acts on the input of the low-rank branch).
- :func:`merged_state_dict` merges the adapters into the base weights under the plain model's keys,
  which is what :meth:`SpeechLM.save_pretrained` writes: a saved checkpoint loads without ``peft``.

Detection is by structure (a module with ``base_layer`` and ``lora_A``), so nothing here imports
``peft`` unless adapters are added.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "DEFAULT_LORA_TARGETS",
    "apply_lora",
    "effective_weight",
    "has_lora",
    "is_lora_layer",
    "merged_state_dict",
]

#: Attention projections of Llama/Qwen/Mistral-style LMs.
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def is_lora_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a ``peft`` LoRA layer (it has ``base_layer`` and ``lora_A``)."""
    return hasattr(module, "base_layer") and isinstance(getattr(module, "lora_A", None), nn.ModuleDict)


def has_lora(model: nn.Module) -> bool:
    """Whether any sub-module of ``model`` is a LoRA layer."""
    return any(is_lora_layer(m) for m in model.modules())


def _active_adapters(layer: nn.Module) -> list[str]:
    if getattr(layer, "disable_adapters", False) or getattr(layer, "merged", False):
        return []  # disabled: the base weight alone; merged: the base weight already holds the deltas
    active = getattr(layer, "active_adapters", None) or getattr(layer, "active_adapter", [])
    if isinstance(active, str):
        active = [active]
    return [name for name in active if name in layer.lora_A]


def _check_expressible(layer: nn.Module, name: str) -> None:
    if getattr(layer, "use_dora", {}).get(name, False):
        raise NotImplementedError(f"LoRA adapter {name!r} uses DoRA, which a merged weight cannot express here")
    if getattr(layer, "lora_bias", {}).get(name, False) or getattr(layer.lora_B[name], "bias", None) is not None:
        raise NotImplementedError(f"LoRA adapter {name!r} has a bias; use bias-free LoRA on lm_head")
    dropout = layer.lora_dropout[name] if name in getattr(layer, "lora_dropout", {}) else None
    if layer.training and isinstance(dropout, nn.Dropout) and dropout.p > 0:
        raise NotImplementedError(
            f"LoRA adapter {name!r} on lm_head has dropout {dropout.p} in training; the fused loss needs a "
            "weight, which cannot express input dropout: use lora_dropout=0 for lm_head"
        )


def _delta(layer: nn.Module, name: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    delta = (b.float() @ a.float()) * float(layer.scaling[name])
    return delta.T if getattr(layer, "fan_in_fan_out", False) else delta


def effective_weight(layer: nn.Module) -> torch.Tensor:
    """The weight a LoRA ``Linear`` layer computes with: base + the active adapters' deltas (differentiable).

    ``[out, in]`` in the base weight's dtype. See the module docstring for what raises.
    """
    base = layer.base_layer.weight
    weight = base
    for name in _active_adapters(layer):
        _check_expressible(layer, name)
        delta = _delta(layer, name, layer.lora_A[name].weight, layer.lora_B[name].weight)
        weight = weight + delta.to(base.dtype)
    return weight


def merged_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """``state_dict`` (default: ``model.state_dict()``) with every LoRA layer merged into its base weight.

    Keys come out as in the model without adapters (``...q_proj.weight``, not ``...base_layer.weight``),
    adapter tensors are dropped. Works on a gathered ZeRO-3 state dict with the same keys.
    """
    source = model.state_dict() if state_dict is None else state_dict
    out = dict(source)
    for prefix, layer in model.named_modules():
        if not is_lora_layer(layer):
            continue
        base_prefix = f"{prefix}.base_layer."
        for key in [k for k in source if k.startswith(base_prefix)]:
            out[f"{prefix}.{key[len(base_prefix) :]}"] = out.pop(key)
        weight_key = f"{prefix}.weight"
        weight = out[weight_key]
        for name in _active_adapters(layer):
            a = source[f"{prefix}.lora_A.{name}.weight"]
            b = source[f"{prefix}.lora_B.{name}.weight"]
            weight = (weight.float() + _delta(layer, name, a, b)).to(weight.dtype)
        out[weight_key] = weight.detach()
        adapter_prefixes = tuple(
            f"{prefix}.{part}."
            for part in (
                "lora_A",
                "lora_B",
                "lora_embedding_A",
                "lora_embedding_B",
                "lora_magnitude_vector",
                "lora_dropout",
            )
        )
        for key in [k for k in out if k.startswith(adapter_prefixes)]:
            del out[key]
    return out


def apply_lora(
    model: nn.Module,
    *,
    r: int = 16,
    alpha: float = 32.0,
    dropout: float = 0.0,
    target_modules: Sequence[str] = DEFAULT_LORA_TARGETS,
    scope: str = "language_model",
) -> int:
    """Inject LoRA into the ``target_modules`` (last name parts, e.g. ``q_proj``, ``lm_head``) under ``scope``.

    The base weights under ``scope`` are frozen, the adapters trainable (``B`` starts at 0, so the
    model computes exactly what it did). Returns the number of adapted modules; ``ValueError`` when
    none matches, ``ImportError`` naming the install line without ``peft``.
    """
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"LoRA r must be a positive int, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise ValueError(f"LoRA alpha must be a positive number, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
    names = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    if not names or not all(isinstance(n, str) and re.fullmatch(r"[A-Za-z_][\w]*", n) for n in names):
        raise ValueError(f"LoRA target_modules must be module names like 'q_proj', got {target_modules!r}")
    if not isinstance(getattr(model, scope, None), nn.Module):
        raise ValueError(f"the model has no sub-module {scope!r} to put LoRA into")
    if "lm_head" in names and getattr(getattr(model, scope).config, "tie_word_embeddings", False):
        raise ValueError("LoRA on lm_head of an LM with tied input/output embeddings is not supported")
    try:
        import peft
    except ImportError as error:
        raise ImportError("LoRA needs the peft package: pip install 'caad[lora]' (or pip install peft)") from error
    pattern = rf"{re.escape(scope)}\.(?:.*\.)?(?:{'|'.join(map(re.escape, names))})"
    matched = [n for n, _ in model.named_modules() if re.fullmatch(pattern, n)]
    if not matched:
        raise ValueError(f"no module under {scope!r} is named one of {names}")
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=float(dropout), target_modules=pattern, bias="none")
    before = {id(p): p.requires_grad for p in model.parameters()}
    peft.inject_adapter_in_model(config, model)  # it freezes everything but the adapters
    scope_prefix = f"{scope}."
    for name, parameter in model.named_parameters():
        if ".lora_" in name:
            parameter.requires_grad_(True)
        elif name.startswith(scope_prefix):
            parameter.requires_grad_(False)
        else:  # outside the scope, as it was
            parameter.requires_grad_(before.get(id(parameter), parameter.requires_grad))
    return len(matched)
