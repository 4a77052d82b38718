"""Layered configuration with provenance.

Layers, lowest first (later ones win):

1. package defaults  (:mod:`hpcjobs.schema`)
2. cluster profile   (``cluster_profiles/NAME.yaml``, then the user's profile of that name)
3. recipe            (``recipes/NAME.yaml``)
4. the user's config (``<user config dir>/config.yaml`` if present, then each ``--config FILE``)
5. command line      (``--nodes``/``--name``/... and ``KEY=VALUE`` overrides)

OmegaConf merges each layer into the typed schema and rejects unknown keys and
values of the wrong type; we turn its exceptions into :class:`ConfigError`
naming the key, the layer and (for files) the line. The last layer to set each
key is remembered, so later checks (:mod:`hpcjobs.plan`) can say where a bad
value came from.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf import errors as oc_errors

from . import catalog, paths, schema, stages, yamlfile
from .errors import ConfigError

def _hpcjobs_resolver(what: str) -> str:
    """``${hpcjobs:python}``, ``${hpcjobs:devcluster_conf}``, ``${hpcjobs:cache_dir}``,
    ``${hpcjobs:python_env}`` (a short id of this Python environment) in profiles."""
    if what == "python":
        return sys.executable
    if what == "devcluster_conf":
        from .devcluster import DevCluster  # stdlib-only module

        return str(DevCluster().slurm_conf)
    if what == "cache_dir":
        return str(paths.cache_dir())
    if what == "python_env":
        return paths.python_env_id()
    raise ValueError(f"unknown ${{hpcjobs:{what}}}; known: python, devcluster_conf, cache_dir, python_env")


if not OmegaConf.has_resolver("hpcjobs"):
    OmegaConf.register_resolver("hpcjobs", _hpcjobs_resolver)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SET_BY_HPCJOBS = ("run.id", "run.dir")


@dataclass
class Layer:
    source: str                      # e.g. "recipe llama2-lora"
    path: Optional[Path]             # the file, if the layer is one
    data: Dict[str, Any]
    lines: Dict[str, int] = field(default_factory=dict)

    def where(self, key: str) -> Tuple[str, Optional[int]]:
        src = f"{self.source} ({self.path})" if self.path else self.source
        k = key
        while k:
            if k in self.lines:
                return (str(self.path) if self.path else src), self.lines[k]
            k = k.rpartition(".")[0]
        return (str(self.path) if self.path else src), None


def _leaf_keys(data: Any, prefix: str = "") -> List[str]:
    if isinstance(data, dict):
        out: List[str] = []
        for k, v in data.items():
            out += _leaf_keys(v, f"{prefix}{k}.") if isinstance(v, dict) and v else [f"{prefix}{k}"]
        return out
    return [prefix.rstrip(".")]


def _prefixed(data: Dict[str, Any], lines: Dict[str, int], prefix: str):
    return {prefix: data}, {f"{prefix}.{k}": v for k, v in lines.items()}


def key_type(kinds: Dict[str, str], key: str) -> Optional[Tuple[Any, bool]]:
    """The schema type of a dotted key and whether it may be None; None if the key is unknown.

    Walks the same dataclasses OmegaConf merges into, so the command line parses a
    value exactly as the key it sets is declared.
    """
    node: Any = schema.top_level_schema(kinds)
    optional = False
    for part in key.split("."):
        node, optional = _unwrap_optional(node)
        if isinstance(node, dict):  # the top level
            node = node.get(part)
        elif dataclasses.is_dataclass(node):
            hints = typing.get_type_hints(node)
            node = hints.get(part)
        elif typing.get_origin(node) in (dict, Dict):
            node = typing.get_args(node)[1]
        else:
            return None
        if node is None:
            return None
    node, optional = _unwrap_optional(node)
    return node, optional


def _unwrap_optional(tp: Any) -> Tuple[Any, bool]:
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else Any), True
    return tp, False


_NULL = ("null", "~", "none", "None", "NULL")


def parse_value(key: str, raw: str, kinds: Dict[str, str], source: str = "command line") -> Any:
    """A command-line value as the schema declares its key.

    A string-typed key gets exactly the string the user typed (no YAML: ``#``,
    ``: ``, ``{x}`` and ``yes`` stay text). ``${...}`` is kept for OmegaConf to
    resolve against the whole tree. Numbers and booleans go to OmegaConf's typed
    nodes as text, which convert and reject them with the key named. Lists and
    mappings are parsed as YAML flow values (``[a, b]``, ``{k: v}``). ``null``
    unsets an optional key. An unknown key passes through as text, and the merge
    reports it with a suggestion.
    """
    found = key_type(kinds, key)
    if found is None:
        return raw
    tp, optional = found
    container = typing.get_origin(tp) in (list, List, dict, Dict) or dataclasses.is_dataclass(tp)
    if "${" in raw and not (container and raw.lstrip().startswith(("[", "{"))):
        return raw  # an interpolation (for a list: of a whole list); OmegaConf resolves it
    if optional and raw.strip() in _NULL:
        return None
    origin = typing.get_origin(tp)
    if tp in (int, float, bool, str) or tp is Any or (isinstance(tp, type) and issubclass(tp, str)):
        return raw
    if origin in (list, List, dict, Dict) or dataclasses.is_dataclass(tp):
        args = typing.get_args(tp)
        # Items of a list/mapping of strings stay text ([q_proj, yes] is two names);
        # other items (e.g. data.split's floats) are YAML scalars.
        loader = yaml.BaseLoader if args and args[-1] is str else yaml.SafeLoader
        try:
            value = yaml.load(raw, Loader=loader)
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"{raw!r} is not a valid {'list' if origin in (list, List) else 'mapping'} "
                              f"({problem})", key=key, source=source,
                              hint='quote items holding ${...} or ": ", e.g. [--out, "${run.dir}/x"]'
                              if "${" in raw or ": " in raw else
                              "e.g. [a, b] for a list, {k: v} for a mapping; quote the whole "
                              "KEY=VALUE for your shell") from None
        if origin in (list, List) and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            raise ConfigError(f"expects a list, got {raw!r}", key=key, source=source,
                              hint=f"{key}=[{raw}]")
        return _stringify(value, tp)
    return raw


def _stringify(value: Any, tp: Any) -> Any:
    """List/dict items of string type stay the text typed (``[yes, 1.0]`` -> ``['yes', '1.0']``)."""
    args = typing.get_args(tp)
    item = args[-1] if args else None
    if item is str:
        if isinstance(value, list):
            return [v if isinstance(v, str) or v is None else _yaml_text(v) for v in value]
        if isinstance(value, dict):
            return {k: v if isinstance(v, str) or v is None else _yaml_text(v) for k, v in value.items()}
    return value


def _yaml_text(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def parse_override(item: str, kinds: Optional[Dict[str, str]] = None,
                   source: str = "command line") -> Tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not KEY=VALUE", source=source,
                          hint="e.g. finetune.lr=2e-4 finetune.zero_stage=3")
    key, _, raw = item.partition("=")
    key = key.strip()
    if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$", key):
        raise ConfigError(f"override {item!r}: {key!r} is not a dotted key", source=source)
    if key in _SET_BY_HPCJOBS or key == "pipeline" or key.startswith("pipeline."):
        raise ConfigError("this is set by hpcjobs or the recipe and cannot be overridden",
                          key=key, source=source,
                          hint="to change the pipeline, copy the recipe file and pass its path")
    return key, parse_value(key, raw, kinds or {}, source)


def overrides_layer(items: Sequence[str], kinds: Dict[str, str], source: str = "command line") -> Layer:
    data: Dict[str, Any] = {}
    for item in items:
        key, value = parse_override(item, kinds, source)
        _set_dotted(data, key, value, source)
    return Layer(source, None, data)


def _set_dotted(data: Dict[str, Any], key: str, value: Any, source: str) -> None:
    """Plain-dict assignment: OmegaConf.update would parse or resolve the value."""
    node = data
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{'.'.join(parts[:i + 1])} is set to a value and also used as a section",
                              key=key, source=source)
        node = nxt
    node[parts[-1]] = value


# ---------------------------------------------------------------- pipeline

def read_pipeline(data: Dict[str, Any], layer: Layer) -> Dict[str, str]:
    """Validate the recipe's pipeline; returns stage name -> kind, in order."""
    pipeline = data.get("pipeline")
    if not isinstance(pipeline, dict) or not pipeline:
        src, line = layer.where("pipeline")
        raise ConfigError("a recipe needs a 'pipeline' mapping of stage name -> {kind, after}",
                          key="pipeline", source=src, line=line)
    kinds: Dict[str, str] = {}
    for name, entry in pipeline.items():
        src, line = layer.where(f"pipeline.{name}")
        if not isinstance(name, str) or not re.match(r"^[a-z][a-z0-9_]*$", name):
            raise ConfigError("stage names are lower-case letters, digits and '_'",
                              key=f"pipeline.{name}", source=src, line=line)
        if name in schema.RESERVED:
            raise ConfigError(f"{name!r} is a reserved section name", key=f"pipeline.{name}",
                              source=src, line=line)
        if not isinstance(entry, dict) or entry.get("kind") not in stages.names():
            raise ConfigError(f"stage kind must be one of {', '.join(stages.names())}",
                              key=f"pipeline.{name}.kind", source=src, line=line)
        after = entry.get("after") or []
        if not isinstance(after, list) or not all(isinstance(a, str) for a in after):
            raise ConfigError(f"'after' must be a list of stage names, got {after!r}",
                              key=f"pipeline.{name}.after", source=src, line=line)
        for up in after:
            if up not in kinds:
                raise ConfigError(
                    f"'after: {up}' must name an earlier stage (earlier: {', '.join(kinds) or 'none'})",
                    key=f"pipeline.{name}.after", source=src, line=line)
        kinds[name] = entry["kind"]
    return kinds


# ---------------------------------------------------------------- composing

@dataclass
class Composed:
    """A merged, not yet resolved configuration and where each key came from."""

    cfg: DictConfig
    layers: List[Layer]
    origin: Dict[str, Layer]
    recipe: catalog.Entry
    profile: str
    overrides: List[str]
    kinds: Dict[str, str] = field(default_factory=dict)

    def where(self, key: str) -> Tuple[str, Optional[int]]:
        k = key
        while k:
            if k in self.origin:
                return self.origin[k].where(key)
            k = k.rpartition(".")[0]
        return "package defaults (hpcjobs/schema.py)", None

    def source_key(self, key: str, _depth: int = 0) -> str:
        """The key a value really comes from, following plain ``${other.key}`` interpolations."""
        node = OmegaConf.to_container(self.cfg, resolve=False)
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        m = re.fullmatch(r"\$\{([A-Za-z0-9_.]+)\}", node) if isinstance(node, str) else None
        if m and _depth < 10:
            return self.source_key(m.group(1), _depth + 1)
        return key

    def error(self, key: str, message: str, hint: Optional[str] = None) -> ConfigError:
        real = self.source_key(key)
        src, line = self.where(real)
        shown = key if real == key else f"{key} (= {real})"
        return ConfigError(message, key=shown, source=src, line=line, hint=hint)


def _schema_for(kinds: Dict[str, str]) -> DictConfig:
    fields = [(name, typ, dataclasses.field(default_factory=typ) if isinstance(typ, type) else
               dataclasses.field(default_factory=dict))
              for name, typ in schema.top_level_schema(kinds).items()]
    chain_cls = dataclasses.make_dataclass("Chain", fields)
    return OmegaConf.structured(chain_cls)


def _check_sections(cfg: DictConfig, layer: Layer) -> None:
    """A section (``finetune:``, ``run:``, ``profile.env``, ...) given a plain value or a list
    is named here: OmegaConf's own error for it carries no key."""
    def walk(node: Any, data: Any, prefix: str) -> None:
        if not isinstance(data, dict):
            return
        for k, v in data.items():
            key = f"{prefix}{k}"
            # the node itself, unresolved: node.get() would resolve a ${...} default that points
            # at a value a later layer is still to give (MissingMandatoryValue)
            child = node._get_node(k) if isinstance(node, DictConfig) and k in node else None
            if isinstance(child, DictConfig):
                if v is not None and not isinstance(v, dict):
                    src, line = layer.where(key)
                    raise ConfigError(f"is a section (key: value lines), got {type(v).__name__} {v!r}",
                                      key=key, source=src, line=line)
                walk(child, v, key + ".")
            elif isinstance(child, ListConfig) and v is not None and not isinstance(v, (list, str)):
                src, line = layer.where(key)
                raise ConfigError(f"expects a list, got {v!r}", key=key, source=src, line=line)

    walk(cfg, layer.data, "")


def _merge(cfg: DictConfig, layer: Layer) -> DictConfig:
    _check_sections(cfg, layer)
    try:
        return OmegaConf.merge(cfg, layer.data)  # type: ignore[return-value]
    except oc_errors.ConfigKeyError as e:
        key = e.full_key or str(e.key)
        parent = key.rpartition(".")[0]
        node = OmegaConf.select(cfg, parent) if parent else cfg
        known = list(node.keys()) if isinstance(node, DictConfig) else []
        close = difflib.get_close_matches(str(e.key), [str(k) for k in known], n=1)
        src, line = layer.where(key)
        hint = f"did you mean {parent + '.' if parent else ''}{close[0]}?" if close else (
            f"known keys here: {', '.join(map(str, known))}" if known else None)
        raise ConfigError("unknown key", key=key, source=src, line=line, hint=hint) from None
    except oc_errors.GrammarParseError as e:
        key = e.full_key or str(e.key)
        src, line = layer.where(key)
        raise ConfigError("not a valid ${...} interpolation (unclosed or malformed)", key=key, source=src,
                          line=line) from None
    except oc_errors.ValidationError as e:
        key = e.full_key or str(e.key)
        src, line = layer.where(key)
        msg = _type_message(str(e.msg).splitlines()[0]) if e.msg else "wrong type"
        raise ConfigError(msg, key=key, source=src, line=line) from None
    except oc_errors.OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        src, line = layer.where(key or "")
        raise ConfigError(str(getattr(e, "msg", e)).splitlines()[0], key=key, source=src, line=line) from None
    except (TypeError, ValueError) as e:  # OmegaConf lets some type mismatches through as these
        src = str(layer.path) if layer.path else layer.source
        raise ConfigError(f"a value has the wrong type: {e}", source=src) from None


_TYPE_NAMES = {"Integer": "an integer", "Float": "a number", "Boolean": "true or false", "String": "text"}


def _type_message(msg: str) -> str:
    """OmegaConf's "Value 'x' of type 'str' could not be converted to Integer" -> "expects an integer, got 'x'"."""
    m = re.match(r"Value '(.*)' of type '\w+' could not be converted to (\w+)", msg)
    if m and m.group(2) in _TYPE_NAMES:
        return f"expects {_TYPE_NAMES[m.group(2)]}, got '{m.group(1)}'"
    m = re.match(r"Value '(.*)' is not a valid bool", msg)   # OmegaConf words a bad boolean this way
    if m:
        return f"expects true or false, got '{m.group(1)}'"
    return msg


def launch_stage(kinds: Dict[str, str], option: str) -> str:
    """The pipeline's one stage that launches ranks; ``--hostfile``/``--include``/``--exclude`` apply to it."""
    names = [n for n, k in kinds.items() if stages.get(k).launch_options]
    if len(names) != 1:
        raise ConfigError(f"{option} applies to the recipe's multi-node training stage, and this recipe has "
                          f"{'none' if not names else 'several: ' + ', '.join(names)}",
                          hint="set <stage>.hostfile / .include / .exclude as KEY=VALUE instead")
    return names[0]


def compose(recipe_ref: str, profile_ref: str, *, config_files: Sequence[str] = (),
            overrides: Sequence[str] = (), cli: Optional[Dict[str, Any]] = None,
            launch: Optional[Dict[str, Optional[str]]] = None, cli_text: Sequence[str] = ()) -> Composed:
    """Load and merge every layer.

    ``cli`` holds dotted keys set by dedicated options (``run.nodes`` from --nodes, ...);
    ``launch`` the --hostfile/--include/--exclude values for the finetune stage.
    ``cli_text`` is how those options were written, for the scripts' headers.
    """
    recipe = catalog.find_recipe(recipe_ref)
    recipe_data, recipe_lines = yamlfile.read(recipe.path, what="recipe")
    recipe_layer = Layer(f"recipe {recipe.name}", recipe.path, recipe_data, recipe_lines)
    kinds = read_pipeline(recipe_data, recipe_layer)
    cli = dict(cli or {})
    for option, value in (launch or {}).items():
        if value is not None:
            cli[f"{launch_stage(kinds, '--' + option)}.{option}"] = value

    layers: List[Layer] = []
    for entry in catalog.find_profile(profile_ref):
        data, lines = yamlfile.read(entry.path, what="profile")
        data.setdefault("name", entry.name)
        data, lines = _prefixed(data, lines, "profile")
        layers.append(Layer(f"{entry.origin} profile {entry.name}", entry.path, data, lines))
    recipe_data.setdefault("recipe", {}).setdefault("name", recipe.name)
    layers.append(recipe_layer)

    user_files = []
    default_user = paths.user_config_dir() / "config.yaml"
    if default_user.is_file():
        user_files.append(default_user)
    user_files += [Path(f).expanduser() for f in config_files]
    for f in user_files:
        if not f.exists():
            raise ConfigError("config file does not exist", source=str(f))
        data, lines = yamlfile.read(f, what="config")
        layers.append(Layer("config file", f, data, lines))

    if cli:
        data: Dict[str, Any] = {}
        for key, value in cli.items():
            _set_dotted(data, key, value, "command line")
        layers.append(Layer("command line", None, data))
    if overrides:
        layers.append(overrides_layer(overrides, kinds))
    return _merge_layers(kinds, layers, recipe, list(cli_text) + list(overrides))


# ---------------------------------------------------------------- the layers a chain was made from
#
# A chain keeps its layers, unresolved, in <run dir>/layers.yaml. A rerun merges
# them again with its own overrides on top, so every ${...} link (convert.input
# <- model.source, ...) follows a changed value, and errors still name the file
# and line a value came from. It is a snapshot: editing the recipe or a --config
# file after submission does not change what a rerun runs.

LAYERS_FILE = "layers.yaml"


def snapshot(composed: Composed) -> str:
    """The layers of ``composed`` as YAML (``layers.yaml``)."""
    doc = {"version": 1, "recipe": composed.recipe.name, "recipe_path": str(composed.recipe.path),
           "layers": [{"source": layer.source, "path": str(layer.path) if layer.path else None,
                       "lines": dict(layer.lines), "data": layer.data} for layer in composed.layers]}
    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)


def compose_snapshot(path: Path, recipe: catalog.Entry, overrides: Sequence[str] = (),
                     extra: Sequence[str] = (), source: str = "rerun") -> Composed:
    """A chain's saved layers (``layers.yaml``) plus new overrides, merged and checked as at submission.

    ``overrides`` are the user's (recorded, and kept by later reruns once the rerun
    is submitted); ``extra`` are hpcjobs's own for this rerun only (``--fresh``).
    """
    data, _ = yamlfile.read(path, what="chain layers")
    try:
        layers = [Layer(str(entry["source"]), Path(entry["path"]) if entry.get("path") else None,
                        dict(entry.get("data") or {}), {str(k): int(v) for k, v in (entry.get("lines") or {}).items()})
                  for entry in data["layers"]]
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ConfigError(f"damaged chain layers file ({type(e).__name__}: {e})", source=str(path)) from None
    recipe_layer = next((lay for lay in layers if lay.source.startswith("recipe")), None)
    if recipe_layer is None:
        raise ConfigError("damaged chain layers file: no recipe layer", source=str(path))
    kinds = read_pipeline(recipe_layer.data, recipe_layer)
    if overrides:
        layers.append(overrides_layer(overrides, kinds, source=source))
    composed = _merge_layers(kinds, layers, recipe, list(overrides))
    if extra:
        composed = _merge_layers(kinds, layers + [overrides_layer(extra, kinds, source="hpcjobs")],
                                 recipe, list(overrides))
        composed.layers = layers  # the transient layer is not part of the chain's history
    return composed


def compose_saved(saved: Path, recipe: catalog.Entry, overrides: Sequence[str] = (),
                  extra: Sequence[str] = ()) -> Composed:
    """A chain from before layers.yaml: its saved, resolved configuration plus new overrides.

    Its ${...} links were resolved at submission, so a changed value does not
    reach the keys that were linked to it.
    """
    data, lines = yamlfile.read(saved, what="chain config")
    layer = Layer("chain config", saved, data, lines)
    kinds = read_pipeline(data, layer)
    layers = [layer] + ([overrides_layer(list(overrides) + list(extra), kinds, source="rerun")]
                        if overrides or extra else [])
    return _merge_layers(kinds, layers, recipe, list(overrides))


def _merge_layers(kinds: Dict[str, str], layers: List[Layer], recipe: catalog.Entry,
                  overrides_text: List[str]) -> Composed:
    cfg = _schema_for(kinds)
    origin: Dict[str, Layer] = {}
    for layer in layers:
        cfg = _merge(cfg, layer)
        for key in _leaf_keys(layer.data):
            origin[key] = layer
    OmegaConf.set_readonly(cfg, False)
    composed = Composed(cfg, layers, origin, recipe, "", overrides_text, kinds)
    _check_interpolations(composed)
    if not cfg.run.name:
        cfg.run.name = cfg.recipe.name
    composed.profile = str(cfg.profile.name)
    return composed


def _check_interpolations(composed: Composed) -> None:
    """Resolve every ``${...}`` once, so a bad one is an error naming its key and layer.

    ``run.id`` and ``run.dir`` are not known yet (they resolve to None here); the
    real resolution in :func:`resolve` repeats this with them set.
    """
    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{prefix}{i}.")
        elif isinstance(node, str) and "${" in node:
            key = prefix.rstrip(".")
            try:
                OmegaConf.select(composed.cfg, key, throw_on_resolution_failure=True, throw_on_missing=False)
            except oc_errors.InterpolationToMissingValueError:
                return  # reported by resolve() as the missing key itself
            except oc_errors.OmegaConfBaseException as e:
                raise interpolation_error(composed, key, node, e) from None

    walk(OmegaConf.to_container(composed.cfg, resolve=False), "")


def interpolation_error(composed: Composed, key: str, text: str, e: Exception) -> ConfigError:
    if isinstance(e, oc_errors.GrammarParseError):
        msg = f"{text!r} is not a valid ${{...}} interpolation"
    elif isinstance(e, oc_errors.UnsupportedInterpolationType):
        msg = f"{text!r}: unknown resolver (known: oc.env, oc.select, hpcjobs, ...)"
    elif isinstance(e, oc_errors.InterpolationKeyError):
        msg = f"{text!r}: {str(e.msg).splitlines()[0]}"
    else:
        detail = str(getattr(e, "msg", e)).splitlines()[0]
        detail = re.sub(r"^\w+ raised while resolving interpolation: ", "", detail)
        msg = f"{text!r}: {detail}"
    # The key named is the one holding the ${...}, wherever it points.
    src, line = composed.where(key)
    return ConfigError(msg, key=key, source=src, line=line)


def resolve(composed: Composed) -> Any:
    """Resolve interpolations; returns the typed ``Chain`` object (dataclasses)."""
    try:
        return OmegaConf.to_object(composed.cfg)
    except oc_errors.MissingMandatoryValue as e:
        key = e.full_key
        raise composed.error(key, "a value is required here and none was given",
                             hint=f"set it on the command line ({key}=...) or in a --config file") from None
    except (oc_errors.InterpolationResolutionError, oc_errors.GrammarParseError) as e:
        key = e.full_key or ""
        raw = OmegaConf.select(OmegaConf.create(OmegaConf.to_container(composed.cfg, resolve=False)), key,
                               throw_on_resolution_failure=False) if key else None
        raise interpolation_error(composed, key, str(raw), e) from None
    except oc_errors.OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or ""
        raise composed.error(key, str(getattr(e, "msg", e)).splitlines()[0]) from None


def check_name(name: str, *, key: str = "run.name") -> str:
    if not NAME_RE.match(name):
        raise ConfigError(
            f"{name!r} is not a valid name: use letters, digits, '.', '_' and '-' "
            "(at most 64, starting with a letter or digit)", key=key)
    return name
