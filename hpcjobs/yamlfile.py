"""Reading YAML files with line numbers for every key, so errors can say file:line.

OmegaConf forgets where a value came from; PyYAML's composer keeps the marks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Tuple

import yaml

from .errors import ConfigError
from .userfiles import read_text


def key_lines(node: yaml.Node, prefix: str = "") -> Dict[str, int]:
    """Map every dotted key of a composed YAML mapping to its 1-based line."""
    lines: Dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            lines[key] = key_node.start_mark.line + 1
            lines.update(key_lines(value_node, key + "."))
    return lines


def read(path: Path, *, what: str) -> Tuple[Dict[str, Any], Dict[str, int]]:
    """Parse a YAML mapping file; returns (data, dotted-key -> line).

    ``what`` names the file's role in error messages ("profile", "recipe", ...).
    """
    text = read_text(path, f"{what} file")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.load(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        line = e.problem_mark.line + 1 if e.problem_mark else None
        raise ConfigError(f"invalid YAML: {e.problem}", source=str(path), line=line) from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError(f"a {what} file must be a YAML mapping (key: value), not a {type(data).__name__}",
                          source=str(path), line=1)
    return data, key_lines(node)
