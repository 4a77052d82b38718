"""Finding cluster profiles and recipes: shipped ones, then the user's own.

Profiles live in ``cluster_profiles/`` (shipped) and ``<user config>/profiles/``;
recipes in ``recipes/`` and ``<user config>/recipes/``. A user profile with a
shipped profile's name is layered on top of it (so it can change just the
account); a user recipe with a shipped recipe's name replaces it.
A path to a YAML file works wherever a name does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import yaml

from . import paths
from .errors import ConfigError
from .userfiles import read_text


@dataclass(frozen=True)
class Entry:
    name: str
    path: Path
    description: str
    origin: str  # "shipped" or "user"


def _describe(path: Path, key: Optional[str]) -> str:
    try:  # only a description: a file that cannot be read is reported when it is loaded (yamlfile)
        data = yaml.safe_load(read_text(path, "file")) or {}
    except (ConfigError, yaml.YAMLError, RecursionError):  # RecursionError: [[[[... nested thousands deep
        return "(unreadable)"
    if key:
        data = (data.get(key) if isinstance(data, dict) else None) or {}
    return str(data.get("description", "")) if isinstance(data, dict) else ""


def _scan(directory: Path, origin: str, desc_key: Optional[str]) -> Dict[str, Entry]:
    if not directory.is_dir():
        return {}
    return {
        p.stem: Entry(p.stem, p, _describe(p, desc_key), origin)
        for p in sorted(directory.glob("*.yaml"))
    }


def profiles() -> Dict[str, List[Entry]]:
    """Profile name -> files to layer, shipped first."""
    found: Dict[str, List[Entry]] = {}
    for origin, directory in (("shipped", paths.shipped("cluster_profiles")),
                              ("user", paths.user_config_dir() / "profiles")):
        for name, entry in _scan(directory, origin, None).items():
            found.setdefault(name, []).append(entry)
    return found


def recipes() -> Dict[str, Entry]:
    found = _scan(paths.shipped("recipes"), "shipped", "recipe")
    found.update(_scan(paths.user_config_dir() / "recipes", "user", "recipe"))
    return found


def _looks_like_path(ref: str) -> bool:
    return "/" in ref or ref.endswith((".yaml", ".yml"))


def find_profile(ref: str) -> List[Entry]:
    if _looks_like_path(ref):
        path = Path(ref).expanduser()
        if not path.is_file():
            raise ConfigError(f"profile file {ref} does not exist")
        return [Entry(path.stem, path.resolve(), _describe(path, None), "file")]
    known = profiles()
    if ref not in known:
        raise ConfigError(
            f"unknown profile {ref!r}; known profiles: {', '.join(sorted(known)) or '(none)'}",
            hint=f"add your own as {paths.user_config_dir() / 'profiles' / (ref + '.yaml')}, "
                 "or pass a path to a profile file",
        )
    return known[ref]


def find_recipe(ref: str) -> Entry:
    if _looks_like_path(ref):
        path = Path(ref).expanduser()
        if not path.is_file():
            raise ConfigError(f"recipe file {ref} does not exist")
        return Entry(path.stem, path.resolve(), _describe(path, "recipe"), "file")
    known = recipes()
    if ref not in known:
        raise ConfigError(
            f"unknown recipe {ref!r}; known recipes: {', '.join(sorted(known)) or '(none)'}",
            hint="`hpcjobs recipes` lists them; a path to a recipe YAML file also works",
        )
    return known[ref]
