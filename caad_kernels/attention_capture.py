"""Capture the post-RoPE queries and keys of Hugging Face attention layers, for :mod:`caad_kernels.attention_kd`.

Hugging Face decoders (Llama, Qwen2, Mistral, Gemma, ... in transformers >= 4.48) compute the
queries and keys, apply RoPE (and any q/k norm) and then call the attention function registered
under ``config._attn_implementation`` in ``transformers.modeling_utils.ALL_ATTENTION_FUNCTIONS``
(``"eager"`` falls back to the modelling file's own ``eager_attention_forward``). Those are exactly
the tensors the attention maps are made of, so :func:`capture_attention` wraps that dispatch:

- for the duration of the ``with`` block, each implementation used by the selected layers
  (``"sdpa"``, ``"eager"``, ``"flash_attention_2"``, ...) is replaced in the interface's global
  mapping by a wrapper that records ``(query, key)`` of modules that are being captured and then
  calls the original function unchanged (so outputs are bit-identical and other models in the
  process are unaffected: modules that are not captured go straight through). Nothing is changed
  in the model or its config (no new ``attn_implementation`` name reaches mask creation or a
  saved checkpoint). The mapping is restored when the last capture exits (re-entrant, so a
  teacher and a student can be captured at the same time);
- the recorded tensors are the live ones: ``query`` ``[B, H, T, d]`` and ``key``
  ``[B, H_kv, T, d]`` (before ``repeat_kv``, so GQA keeps ``H_kv`` key heads), in the model's
  dtype, with their autograd history, so a loss on the student's captures back-propagates into
  its ``q_proj``/``k_proj`` (and RoPE inputs, norms, earlier layers). Also recorded: the
  ``scaling`` and ``softcap`` the layer passes, and its ``sliding_window`` (the attention-map
  divergence covers full causal attention; a sliding-window layer should not be distilled with it).

Usage (the teacher under ``no_grad``, the student with gradients)::

    with capture_attention(teacher, layers=[2, 5]) as t, capture_attention(student, layers=[1, 2]) as s:
        with torch.no_grad():
            teacher(input_ids, attention_mask=mask)
        student_out = student(input_ids, attention_mask=mask)
    loss = attention_kd_loss(s[1].query, s[1].key, t[2].query, t[2].key, mask,
                             student_scale=s[1].scaling, teacher_scale=t[2].scaling)

Caveats: run without a KV cache (``use_cache=False``; with a cache the keys include the past);
when a layer runs twice inside the block the last call wins; gradient checkpointing must be the
non-reentrant kind (``gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})``),
since reentrant checkpointing runs the forward under ``no_grad`` and the captured tensors would carry no
history. Layers are the modules that have ``layer_idx`` and ``config`` and either ``num_key_value_groups``
(Llama, Qwen2, Mistral, ...) or ``is_causal = True`` (GPT-2's ``GPT2Attention``; its cross-attention
modules are skipped): the decoder self-attention of those architectures. GPT-2 has no RoPE (absolute
position embeddings are added to the input), so its captured queries and keys are the projections
themselves; its ``reorder_and_upcast_attn`` option computes eager attention without the dispatch
and is refused with a clear error. Pass the language model itself (not a
composite that also holds an audio encoder with its own numbered layers) when indices would clash.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch

_CAPTURE_ATTRIBUTE = "_caad_attention_capture"
_lock = threading.Lock()
_installed: dict[str, tuple[object, int]] = {}  # implementation -> (original function or None, users)


@dataclass
class CapturedAttention:
    """What one attention layer saw in its last forward inside :func:`capture_attention`.

    ``query``: ``[B, H, T, d]`` post-RoPE; ``key``: ``[B, H_kv, T, d]`` post-RoPE (not repeated for
    GQA); ``scaling``: the score scale the layer used (``None`` when it passed none: ``1/sqrt(d)``);
    ``softcap``: the score softcap it passed, else ``None``; ``sliding_window``: its window, else
    ``None``; ``layer_idx``: the layer.
    """

    query: torch.Tensor
    key: torch.Tensor
    scaling: float | None
    softcap: float | None
    sliding_window: int | None
    layer_idx: int


class AttentionCaptures(Mapping):
    """``layer_idx -> CapturedAttention``, filled by the forward passes inside the ``with`` block."""

    def __init__(self, layers: list[int]) -> None:
        self.layers = layers
        self._data: dict[int, CapturedAttention] = {}

    def __getitem__(self, layer: int) -> CapturedAttention:
        if layer not in self._data:
            if layer not in self.layers:
                raise KeyError(f"layer {layer} is not captured here (captured layers: {self.layers})")
            raise KeyError(
                f"layer {layer} has not been captured: no forward pass ran inside the capture_attention block, or the "
                "model's attention does not dispatch through transformers' ALL_ATTENTION_FUNCTIONS"
            )
        return self._data[layer]

    def __iter__(self) -> Iterator[int]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def record(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, kwargs: dict) -> None:
        window = kwargs.get("sliding_window")
        self._data[int(module.layer_idx)] = CapturedAttention(
            query=query,
            key=key,
            scaling=None if kwargs.get("scaling") is None else float(kwargs["scaling"]),
            softcap=None if kwargs.get("softcap") is None else float(kwargs["softcap"]),
            sliding_window=None if window is None else int(window),
            layer_idx=int(module.layer_idx),
        )


def attention_layers(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """The self-attention modules of ``model`` by ``layer_idx`` (see the module docstring for which)."""
    found: dict[int, torch.nn.Module] = {}
    for name, module in model.named_modules():
        if not (hasattr(module, "layer_idx") and hasattr(module, "config")):
            continue
        if getattr(module, "is_cross_attention", False):
            continue  # GPT-2 style cross-attention (keys from an encoder): not a self-attention map
        if not (hasattr(module, "num_key_value_groups") or getattr(module, "is_causal", None) is True):
            continue
        index = module.layer_idx
        if not isinstance(index, int):
            continue
        if index in found:
            raise ValueError(f"two attention modules of the model have layer_idx {index} (the second is {name!r}): "
                             "pass the language model whose layers should be captured")
        found[index] = module
    return found


def _module_eager(module: torch.nn.Module) -> Callable:
    """The modelling file's own ``eager_attention_forward`` (what transformers falls back to for "eager")."""
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        raise RuntimeError(f"capture_attention: {type(module).__name__}'s module has no eager_attention_forward to "
                           "fall back to for attn_implementation='eager'")
    return fn


def _wrapper(original: Callable | None) -> Callable:
    def capture_then_attend(module, query, key, value, attention_mask, *args, **kwargs):
        sink = getattr(module, _CAPTURE_ATTRIBUTE, None)
        if sink is not None:
            sink.record(module, query, key, kwargs)
        fn = original if original is not None else _module_eager(module)
        return fn(module, query, key, value, attention_mask, *args, **kwargs)

    capture_then_attend.caad_capture_wrapper = True
    return capture_then_attend


def _install(implementations: Iterable[str]) -> None:
    from transformers.modeling_utils import AttentionInterface

    mapping = AttentionInterface._global_mapping
    with _lock:
        for name in implementations:
            if name in _installed:
                original, users = _installed[name]
                _installed[name] = (original, users + 1)
                continue
            original = mapping.get(name)
            _installed[name] = (original, 1)
            mapping[name] = _wrapper(original)


def _uninstall(implementations: Iterable[str]) -> None:
    from transformers.modeling_utils import AttentionInterface

    mapping = AttentionInterface._global_mapping
    with _lock:
        for name in implementations:
            original, users = _installed[name]
            if users > 1:
                _installed[name] = (original, users - 1)
                continue
            del _installed[name]
            if original is None:
                mapping.pop(name, None)
            else:
                mapping[name] = original


@contextmanager
def capture_attention(model: torch.nn.Module, layers: Iterable[int] | None = None) -> Iterator[AttentionCaptures]:
    """Record the post-RoPE queries and keys of ``layers`` (default: all) of ``model`` during the block.

    Yields an :class:`AttentionCaptures` (``layer_idx -> CapturedAttention``) that the forward
    passes inside the block fill; the tensors stay usable after the block. Raises ValueError for a
    layer index the model does not have.
    """
    modules = attention_layers(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no attention module with layer_idx, config and "
                         "num_key_value_groups (a Hugging Face decoder's self-attention) to capture")
    wanted = sorted(modules) if layers is None else [int(i) for i in layers]
    missing = [i for i in wanted if i not in modules]
    if missing:
        raise ValueError(f"layers {missing} are not attention layers of {type(model).__name__} (it has "
                         f"{min(modules)}..{max(modules)})")
    captures = AttentionCaptures(wanted)
    chosen = [modules[i] for i in wanted]
    busy = [i for i, module in zip(wanted, chosen) if getattr(module, _CAPTURE_ATTRIBUTE, None) is not None]
    if busy:
        raise RuntimeError(f"layers {busy} are already being captured by an enclosing capture_attention block")
    upcast = [i for i, module in zip(wanted, chosen)
              if getattr(module, "reorder_and_upcast_attn", False)
              and (module.config._attn_implementation or "eager") == "eager"]
    if upcast:
        raise ValueError(f"layers {upcast} use reorder_and_upcast_attn with eager attention, which bypasses "
                         "transformers' attention dispatch, so their queries and keys cannot be captured: set "
                         "config.reorder_and_upcast_attn=False or use attn_implementation='sdpa'")
    names = sorted({m.config._attn_implementation or "eager" for m in chosen})
    _install(names)
    try:
        for module in chosen:
            setattr(module, _CAPTURE_ATTRIBUTE, captures)
        yield captures
    finally:
        for module in chosen:
            if hasattr(module, _CAPTURE_ATTRIBUTE):
                delattr(module, _CAPTURE_ATTRIBUTE)
        _uninstall(names)
