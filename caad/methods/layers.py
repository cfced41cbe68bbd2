"""Layer maps, intermediate hidden states and learned projections for layer-wise distillation.

Conventions:

- Layer ``l`` (1-based, ``1 <= l <= L``) of a model is the output of its ``l``-th transformer block in
  the language model's decoder (before the final norm); ``L`` is the number of blocks. Audio-encoder
  layers are not counted.
- A :class:`LayerMap` is a tuple of ``(student layer, teacher layer)`` pairs: the student's layer is
  pulled towards the teacher's. :meth:`LayerMap.uniform` maps every student layer ``j`` to teacher
  layer ``round(j * L_t / L_s)`` (TinyBERT's ``g(m) = m * N / M``; the last onto the last); a
  configured map is checked against both depths (:meth:`LayerMap.check`).
- :class:`LayerProjections` holds one learned ``Linear(H_s, H_t)`` per pair whose widths differ
  (``projection: "auto"``), per every pair (``"linear"``), or none (``"none"``: widths must match, else
  a ``ValueError`` names the pair). The projections map the student's states into the teacher's width;
  they train with the student (a method's ``extra_modules``) and are not part of the saved student.
- :func:`hidden_state_loss`: per row ``mean_d (P h_s - h_t)^2`` (``"mse"``) or ``1 - cos(P h_s, h_t)``
  (``"cosine"``), summed over rows (the caller divides by its item count).
- :func:`capture_layers` records the outputs of chosen blocks during one forward (forward hooks on the
  blocks, removed on exit), so any Hugging Face decoder and any :class:`caad.models.SpeechLM` work
  without a model-specific forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from caad.models import IGNORE_INDEX

__all__ = [
    "HIDDEN_LOSSES",
    "PROJECTIONS",
    "LayerMap",
    "LayerProjections",
    "answer_rows",
    "capture_layers",
    "decoder_layers",
    "hidden_state_loss",
    "projection_name",
]

HIDDEN_LOSSES = ("mse", "cosine")
PROJECTIONS = ("auto", "linear", "none")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of the language model inside ``model`` (a :class:`caad.models.SpeechLM`, a
    Hugging Face causal LM or its decoder), found through ``get_decoder()``; a ``ValueError`` if none."""
    module: Any = getattr(model, "model", model) if hasattr(model, "lm_head_weight") else model
    for _ in range(5):
        layers = getattr(module, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return layers
        get_decoder = getattr(module, "get_decoder", None)
        if get_decoder is None:
            break
        inner = get_decoder()
        if inner is module or inner is None:
            break
        module = inner
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__} (no get_decoder().layers)")


@dataclass(frozen=True)
class LayerMap:
    """``pairs``: ``(student layer, teacher layer)``, 1-based (module docstring)."""

    pairs: tuple[tuple[int, int], ...]

    @classmethod
    def uniform(cls, student_layers: int, teacher_layers: int) -> LayerMap:
        """Every student layer ``j`` onto teacher layer ``round(j * L_t / L_s)`` (at least 1)."""
        for name, value in (("student_layers", student_layers), ("teacher_layers", teacher_layers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        return cls(tuple((j, max(1, round(j * teacher_layers / student_layers))) for j in range(1, student_layers + 1)))

    @classmethod
    def from_config(
        cls, pairs: Sequence[Sequence[int]] | None, student_layers: int, teacher_layers: int, key: str = "layer_map"
    ) -> LayerMap:
        """The configured pairs (``[[student, teacher], ...]``), or :meth:`uniform` when empty; checked."""
        if not pairs:
            return cls.uniform(student_layers, teacher_layers)
        out = []
        for index, pair in enumerate(pairs):
            if (
                not isinstance(pair, (list, tuple))
                or len(pair) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair)
            ):
                raise ValueError(f"{key}[{index}] must be a pair [student layer, teacher layer] of ints, got {pair!r}")
            out.append((int(pair[0]), int(pair[1])))
        return cls(tuple(out)).check(student_layers, teacher_layers, key)

    def check(self, student_layers: int, teacher_layers: int, key: str = "layer_map") -> LayerMap:
        """``self`` if every layer exists and no student layer is mapped twice; a ``ValueError`` naming
        ``key`` and the layer otherwise."""
        if not self.pairs:
            raise ValueError(f"{key} is empty")
        seen: set[int] = set()
        for index, (student, teacher) in enumerate(self.pairs):
            if not 1 <= student <= student_layers:
                raise ValueError(
                    f"{key}[{index}]: unknown student layer {student}; the student has layers 1..{student_layers}"
                )
            if not 1 <= teacher <= teacher_layers:
                raise ValueError(
                    f"{key}[{index}]: unknown teacher layer {teacher}; the teacher has layers 1..{teacher_layers}"
                )
            if student in seen:
                raise ValueError(f"{key}[{index}]: student layer {student} is mapped twice")
            seen.add(student)
        return self

    @property
    def student_layers(self) -> list[int]:
        return [s for s, _ in self.pairs]

    @property
    def teacher_layers(self) -> list[int]:
        return sorted({t for _, t in self.pairs})


def projection_name(student_layer: int, teacher_layer: int) -> str:
    """The key of a pair's projection in :class:`LayerProjections` (``"s2_t4"``)."""
    return f"s{student_layer}_t{teacher_layer}"


class LayerProjections(nn.Module):
    """The learned projections of a :class:`LayerMap` (module docstring): ``proj[name]`` maps ``[..., H_s]``
    to ``[..., H_t]``; pairs without one pass the student's states through unchanged.

    ``init``: ``"identity"`` starts square projections at the identity (and non-square ones at a
    truncated identity, ``W[i, i] = 1``), so training starts from the plain hidden-state loss;
    ``"default"`` keeps ``nn.Linear``'s initialisation. ``seed`` makes the initialisation reproducible
    without touching the global RNG.
    """

    def __init__(
        self,
        layer_map: LayerMap,
        student_width: int,
        teacher_width: int,
        projection: Literal["auto", "linear", "none"] = "auto",
        *,
        init: Literal["identity", "default"] = "identity",
        seed: int = 0,
        key: str = "projection",
    ) -> None:
        super().__init__()
        if projection not in PROJECTIONS:
            raise ValueError(f"{key} must be one of {PROJECTIONS}, got {projection!r}")
        if init not in ("identity", "default"):
            raise ValueError(f"init must be 'identity' or 'default', got {init!r}")
        if projection == "none" and student_width != teacher_width:
            s, t = layer_map.pairs[0]
            raise ValueError(
                f"{key} is 'none' but the student's hidden states ({student_width} wide, layer {s}) and the "
                f"teacher's ({teacher_width} wide, layer {t}) differ in width; use projection 'auto' or 'linear'"
            )
        self.layer_map = layer_map
        self.student_width, self.teacher_width = student_width, teacher_width
        want = projection == "linear" or (projection == "auto" and student_width != teacher_width)
        self.proj = nn.ModuleDict()
        if want:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                for student, teacher in layer_map.pairs:
                    linear = nn.Linear(student_width, teacher_width)
                    if init == "identity":
                        with torch.no_grad():
                            linear.weight.zero_()
                            linear.weight.fill_diagonal_(1.0)
                            linear.bias.zero_()
                    self.proj[projection_name(student, teacher)] = linear

    def forward(self, student_layer: int, teacher_layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` ``[..., H_s]`` of ``student_layer`` projected for ``teacher_layer`` (``[..., H_t]``)."""
        name = projection_name(student_layer, teacher_layer)
        if name in self.proj:
            layer = self.proj[name]
            return layer(hidden.to(layer.weight.dtype))
        if (student_layer, teacher_layer) not in self.layer_map.pairs:
            raise KeyError(f"({student_layer}, {teacher_layer}) is not a pair of the layer map")
        return hidden


def hidden_state_loss(
    student: torch.Tensor, teacher: torch.Tensor, kind: Literal["mse", "cosine"] = "mse"
) -> torch.Tensor:
    """Sum over rows of the per-row loss between ``[N, H]`` projected student and teacher states (fp32).

    ``"mse"``: ``mean_d (s - t)^2`` per row; ``"cosine"``: ``1 - cos(s, t)`` per row. The teacher gets
    no gradient.
    """
    if kind not in HIDDEN_LOSSES:
        raise ValueError(f"kind must be one of {HIDDEN_LOSSES}, got {kind!r}")
    if student.shape != teacher.shape:
        raise ValueError(
            f"student states {tuple(student.shape)} and teacher states {tuple(teacher.shape)} differ in shape"
        )
    s, t = student.float(), teacher.detach().float()
    if kind == "mse":
        return (s - t).pow(2).mean(dim=-1).sum()
    return (1.0 - nn.functional.cosine_similarity(s, t, dim=-1, eps=1e-8)).sum()


def answer_rows(hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[N, H]`` the rows of ``hidden`` ``[B, T, H]`` at the positions that predict answer tokens
    (``labels[:, 1:] != -100``), packed row-major: the same rows as the target hidden states."""
    mask = labels[:, 1:].to(hidden.device) != IGNORE_INDEX
    return hidden[:, :-1][mask]


@contextlib.contextmanager
def capture_layers(model: nn.Module, layers: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Record the ``[B, T, H]`` output of each block in ``layers`` (1-based) while the block runs.

    Yields a dict filled during the forward inside the block (``{layer: hidden}``); the hooks are
    removed on exit. A ``ValueError`` names a layer the model does not have.
    """
    blocks = decoder_layers(model)
    captured: dict[int, torch.Tensor] = {}
    handles = []
    try:
        for layer in sorted(set(layers)):
            if not 1 <= layer <= len(blocks):
                raise ValueError(f"layer {layer} does not exist: the model has layers 1..{len(blocks)}")

            def hook(module: nn.Module, args: Any, output: Any, layer: int = layer) -> None:
                captured[layer] = output[0] if isinstance(output, (tuple, list)) else output

            handles.append(blocks[layer - 1].register_forward_hook(hook))
        yield captured
    finally:
        for handle in handles:
            handle.remove()
