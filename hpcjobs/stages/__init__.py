"""The registry of stage kinds. A kind is one module here; the core looks kinds up by name.

Adding a kind: write ``hpcjobs/stages/<kind>.py`` (a :class:`StageKind` subclass,
its settings dataclass), ``templates/<kind>.sbatch.j2`` and its tests, and add
the module to ``_BUILTIN`` below. Nothing else in the core changes.
"""

from __future__ import annotations

import importlib
from typing import Dict, Optional, Tuple

from .base import PlanContext, StageKind

_BUILTIN = ("command", "convert", "prepare", "finetune", "merge", "evaluate", "script", "commcheck", "tokenizer", "pretrain", "grpo")
_REGISTRY: Dict[str, StageKind] = {}


def register(kind: StageKind) -> StageKind:
    _REGISTRY[kind.name] = kind
    return kind


def _load() -> None:
    if not _REGISTRY:
        for module in _BUILTIN:
            importlib.import_module(f"{__name__}.{module}")


def get(name: str) -> StageKind:
    _load()
    return _REGISTRY[name]


def find(name: str) -> Optional[StageKind]:
    """The kind, or None for a name no kind has (a record written by another hpcjobs version)."""
    _load()
    return _REGISTRY.get(name)


def names() -> Tuple[str, ...]:
    _load()
    return tuple(_REGISTRY)


__all__ = ["PlanContext", "StageKind", "find", "get", "names", "register"]
