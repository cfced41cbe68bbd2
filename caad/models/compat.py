"""The few places where supported transformers versions (``>=5.20,<6``, see ``pyproject.toml``) differ.

- The KV cache argument of model forwards is ``cache`` from 5.24 on (``past_key_values`` warns there
  with a ``FutureWarning`` and goes away in 5.40); before 5.24 it is ``past_key_values``. Outputs carry
  the cache as ``.cache`` from 5.24 on (``.past_key_values`` logs a deprecation) and ``.past_key_values``
  before. :func:`cache_kwargs` and :func:`output_cache` pick the name the installed version uses.
- Activation checkpointing is ``activation_checkpointing_enable`` from 5.23 on
  (``gradient_checkpointing_enable`` warns there) and ``gradient_checkpointing_enable`` before:
  :func:`enable_activation_checkpointing`.

The floor 5.20 is where ``PreTrainedConfig``'s dataclass-style ``__post_init__`` and
``transformers.configuration_utils.SubConfigSpec`` (used by the composite's config) first appear.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["cache_kwargs", "enable_activation_checkpointing", "output_cache"]


@functools.lru_cache(maxsize=256)
def _cache_name(function: Callable[..., Any]) -> str:
    parameters = inspect.signature(function).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def cache_kwargs(module: nn.Module, cache: Any) -> dict[str, Any]:
    """``{name: cache}`` with the KV-cache argument name that ``module.forward`` takes (``{}`` for ``None``)."""
    if cache is None:
        return {}
    forward = type(module).forward
    return {_cache_name(forward): cache}


def output_cache(output: Any) -> Any:
    """The KV cache of a model output (``.cache`` or ``.past_key_values``, whichever the version has)."""
    dataclass_fields = getattr(output, "__dataclass_fields__", {})
    if "cache" in dataclass_fields:
        return output.cache
    return getattr(output, "past_key_values", None)


def enable_activation_checkpointing(model: nn.Module, use_reentrant: bool = False, **kwargs: Any) -> None:
    """Activation (gradient) checkpointing in a ``PreTrainedModel``'s layers, non-reentrant by default.

    ``kwargs`` (e.g. ``every_n_layers``) go to the model's method.
    """
    checkpoint_kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs, **kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs, **kwargs)
