"""Distillation methods on the shared trainer (:mod:`caad.train`), by name.

Each method is a module or small package that reads like its paper's algorithm: a config section
(its ``config_class``, a :class:`caad.config.TrainerConfig` subclass declared in the method's own
module or in :mod:`caad.config`, read from the top-level key ``section``), a batch builder and a loss
step, implementing :class:`caad.train.Method`. ``caad train --method NAME`` and :func:`caad.train.train` find it here::

    from caad.methods import get_method
    method = get_method("caad")(config.stage2)

Built-in methods are listed in :data:`BUILTIN` as ``name -> "module:Class"`` and imported on first
use (so that ``caad --help`` stays fast); add a line there for a new built-in method, or call
:func:`register_method` on a class from anywhere.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from caad.train.method import Method

__all__ = ["BUILTIN", "available_methods", "get_method", "method_sections", "register_method"]

#: Built-in methods: registry name -> "module:Class".
BUILTIN: dict[str, str] = {
    "caad": "caad.methods.caad.method:CAADMethod",
    "caad_alpha": "caad.experiment.alpha_method:AlphaCAADMethod",
    "caad_topk": "caad.methods.caad_topk.method:CAADTopKMethod",
    "crossmodal": "caad.methods.crossmodal.method:CrossModalMethod",
    "sourcewise": "caad.methods.sourcewise.method:SourceWiseMethod",
    "layerwise": "caad.methods.layerwise.method:LayerWiseMethod",
    "tinywave": "caad.methods.tinywave.method:TinyWaveMethod",
}

_REGISTRY: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Register a :class:`~caad.train.Method` subclass under ``cls.name`` (usable as a class decorator)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _REGISTRY[cls.name] = cls
    return cls


def available_methods() -> list[str]:
    """The names of every registered and built-in method, sorted."""
    return sorted(set(_REGISTRY) | set(BUILTIN))


def get_method(name: str) -> type[Method]:
    """The method class registered as ``name``; a ``ValueError`` listing the known names otherwise."""
    if name not in _REGISTRY and name in BUILTIN:
        module, _, attribute = BUILTIN[name].partition(":")
        cls = getattr(importlib.import_module(module), attribute)
        _REGISTRY.setdefault(name, cls)
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(available_methods())}")
    return _REGISTRY[name]


def method_sections(names: Iterable[str] | None = None) -> dict[str, type]:
    """``section -> config class`` of the registered and built-in methods whose section is in ``names``
    (all when ``None``); imports those methods.

    Methods that share a section (e.g. a CAAD variant reading ``stage2``) keep the first one's class
    (built-ins first) when one class derives from the other; unrelated classes are a ``ValueError``.
    A method that fails to import is skipped, unless a section of ``names`` is then not found: the
    import error is raised, so that a broken method module is not reported as an unknown key.
    """
    wanted = None if names is None else set(names)
    out: dict[str, type] = {}
    errors: list[tuple[str, Exception]] = []
    for name in [*BUILTIN, *(n for n in available_methods() if n not in BUILTIN)]:
        try:
            cls = get_method(name)
        except Exception as error:  # a method module that does not import
            errors.append((name, error))
            continue
        if not cls.section or (wanted is not None and cls.section not in wanted):
            continue
        known = out.setdefault(cls.section, cls.config_class)
        if not (issubclass(cls.config_class, known) or issubclass(known, cls.config_class)):
            raise ValueError(
                f"methods declare the config section {cls.section!r} with unrelated classes: "
                f"{known.__name__} and {cls.config_class.__name__}"
            )
    if errors and (wanted is None or not wanted <= set(out)):
        name, error = errors[0]
        raise ImportError(f"method {name!r} ({BUILTIN.get(name, name)}) could not be imported: {error}") from error
    return out
