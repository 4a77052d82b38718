"""Where hpcjobs finds its shipped files and the user's own, and keeps its local state."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import HpcjobsError

_PKG = Path(__file__).resolve().parent


def shipped(name: str) -> Path:
    """A shipped data directory: ``templates``, ``cluster_profiles`` or ``recipes``.

    In a wheel they live inside the package (``hpcjobs/_shipped/``); in a source
    checkout or an editable install they are at the repository root.
    """
    for candidate in (_PKG / "_shipped" / name, _PKG.parent / name):
        if candidate.is_dir():
            return candidate
    raise HpcjobsError(f"hpcjobs installation is incomplete: no {name}/ directory found near {_PKG}")


def user_config_dir() -> Path:
    """The user's own profiles/, recipes/, templates/ and config.yaml.

    ``$HPCJOBS_CONFIG_DIR``, else ``$XDG_CONFIG_HOME/hpcjobs`` (``~/.config/hpcjobs``).
    """
    if os.environ.get("HPCJOBS_CONFIG_DIR"):
        return Path(os.environ["HPCJOBS_CONFIG_DIR"]).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or "~/.config"
    return Path(base).expanduser() / "hpcjobs"


def state_dir() -> Path:
    """Local, rebuildable state (the chain index). Never the source of truth.

    ``$HPCJOBS_STATE_DIR``, else ``$XDG_STATE_HOME/hpcjobs`` (``~/.local/state/hpcjobs``).
    """
    if os.environ.get("HPCJOBS_STATE_DIR"):
        return Path(os.environ["HPCJOBS_STATE_DIR"]).expanduser()
    base = os.environ.get("XDG_STATE_HOME") or "~/.local/state"
    return Path(base).expanduser() / "hpcjobs"


def python_env_id(prefix: str | None = None) -> str:
    """A short id of a Python environment (its ``sys.prefix``). Compiled DeepSpeed ops are kept
    per environment: ninja rebuilds an op whenever the compile command differs, and two
    virtual environments sharing one build directory rebuild it for each other, minutes each."""
    import hashlib
    import sys

    return hashlib.sha1((prefix or sys.prefix).encode()).hexdigest()[:8]


def cache_dir() -> Path:
    """Persistent caches (compiled DeepSpeed ops). ``$XDG_CACHE_HOME/hpcjobs`` (``~/.cache/hpcjobs``)."""
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "hpcjobs"
