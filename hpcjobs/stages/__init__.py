"""The registry of stage kinds. A kind is one module here; the core looks kinds up by name.

Adding a kind: write ``hpcjobs/stages/<kind>.py`` (a :class:`StageKind` subclass,
its settings dataclass), ``templates/<kind>.sbatch.j2`` and its tests, and add
the module to ``_BUILTIN`` below. Nothing else in the core changes.
"""

from __future__ import annotations

import importlib
from typing import Dict, Optional, Tuple

from .base import PlanContext, StageKind

_BUILTIN = ("command", "convert", "prepare", "finetune", "merge", "evaluate", "script", "commcheck",
            "tokenizer", "pretrain", "grpo")
_REGISTRY: Dict[str, StageKind] = {}
_loaded = False


def register(kind: StageKind) -> StageKind:
    _REGISTRY[kind.name] = kind
    return kind


def _load() -> None:
    # A flag, not "is the registry empty": importing one kind module directly (a test, a
    # job-side import) registers that kind alone, and the others must still be loaded.
    global _loaded
    if not _loaded:
        for module in _BUILTIN:
            importlib.import_module(f"{__name__}.{module}")
        _loaded = True


def get(name: str) -> StageKind:
    _load()
    return _REGISTRY[name]


def find(name: str) -> Optional[StageKind]:
    """The kind, or None for a name no kind has (a record written by another hpcjobs version)."""
    _load()
    return _REGISTRY.get(name)


def names() -> Tuple[str, ...]:
    """Every kind, built-in ones in their listed order (whatever order they were imported in)."""
    _load()
    return tuple(sorted(_REGISTRY, key=lambda n: _BUILTIN.index(n) if n in _BUILTIN else len(_BUILTIN)))


__all__ = ["PlanContext", "StageKind", "find", "get", "names", "register"]
