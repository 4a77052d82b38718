"""Reading YAML files with line numbers for every key, so errors can say file:line.

OmegaConf forgets where a value came from; PyYAML's composer keeps the marks.
The one YAML reader for files (profiles, recipes, ``--config`` files, a chain's
saved config). It composes the node graph once, checks it, and constructs the
data from that same graph; refused, with the line:

* a key given twice in one mapping (YAML loaders silently keep the last);
* a mapping key that is not a string (``1:``, ``yes:``, ``null:``, a list);
* more than one document in a file (``---`` starting another);
* aliases that expand past :data:`MAX_NODES` values (a "billion laughs" bomb
  makes OmegaConf copy every expansion), a recursive alias, nesting deeper than
  :data:`MAX_DEPTH`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Set, Tuple

import yaml

from .errors import ConfigError
from .userfiles import read_text

#: Values (scalars, lists and mappings) a document may have with every alias
#: expanded; the shipped recipe has a few hundred.
MAX_NODES = 100_000
#: Nesting depth, aliases expanded.
MAX_DEPTH = 64

_STR_TAG = "tag:yaml.org,2002:str"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_TAG_WORDS = {"int": "an integer", "float": "a number", "bool": "a boolean", "null": "null",
              "timestamp": "a date", "binary": "binary data"}


class _Refused(Exception):
    """Raised inside the loader; turned into a ConfigError naming the file."""

    def __init__(self, message: str, mark: Optional[yaml.Mark], key: Optional[str] = None):
        super().__init__(message)
        self.message, self.mark, self.key = message, mark, key


class _Loader(yaml.SafeLoader):
    """A SafeLoader whose composer counts what aliases expand to, and refuses bombs and cycles.

    Composing itself shares an anchored node between its aliases (linear in the
    text); the expanded size is what every later consumer (OmegaConf, the key
    walk) pays, so it is what is bounded.
    """

    def __init__(self, text: str):
        super().__init__(text)
        self._expanded = 0                      # values so far, aliases expanded
        self._depth = 0                         # current nesting, aliases expanded
        self._open: Set[str] = set()            # anchors whose value is still being composed
        self._sizes: Dict[int, Tuple[int, int]] = {}  # id(node) -> (expanded values, expanded depth)

    def _measure(self, node: yaml.Node) -> Tuple[int, int]:
        known = self._sizes.get(id(node))
        if known is not None:
            return known
        size, depth = 1, 1
        if isinstance(node, yaml.SequenceNode):
            children: List[yaml.Node] = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = []
        for child in children:
            s, d = self._measure(child)
            size += s
            depth = max(depth, d + 1)
            if size > MAX_NODES:
                break
        self._sizes[id(node)] = (size, depth)
        return size, depth

    def _grow(self, size: int, depth: int, mark: yaml.Mark, via_alias: bool) -> None:
        self._expanded += size
        if self._expanded > MAX_NODES:
            raise _Refused(f"aliases expand the document past {MAX_NODES} values (an alias bomb?); "
                           "refusing to load it" if via_alias else
                           f"the document has more than {MAX_NODES} values; refusing to load it", mark)
        if self._depth + depth > MAX_DEPTH:
            raise _Refused(f"values nested more than {MAX_DEPTH} deep"
                           + (" (through aliases)" if via_alias else ""), mark)

    def compose_node(self, parent, index):  # type: ignore[override]
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            if event.anchor in self._open:
                raise _Refused(f"alias *{event.anchor} is inside the value it names (a recursive alias)",
                               event.start_mark)
            node = super().compose_node(parent, index)
            self._grow(*self._measure(node), event.start_mark, via_alias=True)
            return node
        event = self.peek_event()
        self._grow(1, 1, event.start_mark, via_alias=False)
        if event.anchor is not None:
            self._open.add(event.anchor)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1
            self._open.discard(event.anchor)

    def construct_object(self, node, deep=False):  # type: ignore[override]
        try:
            return super().construct_object(node, deep)
        except (ValueError, TypeError, KeyError, AttributeError):  # an explicit tag that does not fit: !!int x
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            raise _Refused(f"{tag} {node.value!r} is not a valid {tag} value", node.start_mark) from None


def _key_problems(node: yaml.Node, path: str, seen: Set[int], out: List[_Refused]) -> None:
    """Duplicate and non-string mapping keys, each distinct node once (aliases are shared)."""
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for i, child in enumerate(node.value):
            _key_problems(child, f"{path}[{i}]", seen, out)
        return
    if not isinstance(node, yaml.MappingNode):
        return
    first: Dict[str, int] = {}
    for key_node, value_node in node.value:
        line = key_node.start_mark.line + 1
        if isinstance(key_node, yaml.ScalarNode) and key_node.tag == _MERGE_TAG:
            _key_problems(value_node, path, seen, out)
            continue
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag != _STR_TAG:
            if isinstance(key_node, yaml.ScalarNode):
                kind = key_node.tag.rpartition(":")[2]
                shown = key_node.value or "(empty)"
                msg = (f"key {shown} is read as {_TAG_WORDS.get(kind, kind)}, and keys must be strings; "
                       f"quote it: '{key_node.value}'")
            else:
                msg = "a list or mapping cannot be a key; keys must be strings"
            out.append(_Refused(msg, key_node.start_mark, key=path or None))
            continue
        key = key_node.value
        dotted = f"{path}.{key}" if path else key
        if key in first:
            out.append(_Refused(f"duplicate key (first on line {first[key]}); a key may appear once "
                                "in a mapping", key_node.start_mark, key=dotted))
        else:
            first[key] = line
        _key_problems(value_node, dotted, seen, out)


def _compose(text: str) -> Tuple[Optional[yaml.Node], _Loader]:
    loader = _Loader(text)
    loader.get_event()  # StreamStartEvent
    if loader.check_event(yaml.StreamEndEvent):
        return None, loader
    node = loader.compose_document()
    if not loader.check_event(yaml.StreamEndEvent):
        raise _Refused("a second YAML document starts here ('---'); the file must hold one",
                       loader.peek_event().start_mark)
    return node, loader


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
    source = str(path)
    loader: Optional[_Loader] = None
    try:
        node, loader = _compose(text)
        if node is None:
            return {}, {}
        problems: List[_Refused] = []
        _key_problems(node, "", set(), problems)
        if problems:
            raise min(problems, key=lambda p: (p.mark.line, p.mark.column) if p.mark else (0, 0))
        data = loader.construct_document(node)
    except _Refused as e:
        raise ConfigError(e.message, key=e.key, source=source,
                          line=e.mark.line + 1 if e.mark else None) from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        context = e.context or ""
        if context and e.context_mark and e.problem_mark and e.context_mark.line != e.problem_mark.line:
            context += f" (line {e.context_mark.line + 1})"
        problem = "; ".join(p for p in (context, e.problem) if p) or "syntax error"
        raise ConfigError(f"invalid YAML: {problem}", source=source, line=line) from None
    except yaml.reader.ReaderError as e:  # a control character; NUL is refused before
        line = text.count("\n", 0, e.position) + 1
        raise ConfigError(f"invalid YAML: character #x{e.character:04x} is not allowed in YAML text",
                          source=source, line=line) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"invalid YAML: {e}", source=source) from None
    finally:
        if loader is not None:
            loader.dispose()
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError(f"a {what} file must be a YAML mapping (key: value), not a {type(data).__name__}",
                          source=str(path), line=1)
    return data, key_lines(node)
