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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from omegaconf import DictConfig, OmegaConf
from omegaconf import errors as oc_errors

from . import catalog, paths, schema, yamlfile
from .errors import ConfigError

def _hpcjobs_resolver(what: str) -> str:
    """``${hpcjobs:python}``, ``${hpcjobs:devcluster_conf}``, ``${hpcjobs:cache_dir}`` in profiles."""
    if what == "python":
        return sys.executable
    if what == "devcluster_conf":
        from .devcluster import DevCluster  # stdlib-only module

        return str(DevCluster().slurm_conf)
    if what == "cache_dir":
        return str(paths.cache_dir())
    raise ValueError(f"unknown ${{hpcjobs:{what}}}; known: python, devcluster_conf, cache_dir")


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


def parse_override(item: str) -> Tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not KEY=VALUE", source="command line",
                          hint="e.g. finetune.lr=2e-4 finetune.zero_stage=3")
    key, _, _ = item.partition("=")
    key = key.strip()
    if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$", key):
        raise ConfigError(f"override {item!r}: {key!r} is not a dotted key", source="command line")
    if key in _SET_BY_HPCJOBS or key.startswith("pipeline"):
        raise ConfigError("this is set by hpcjobs or the recipe and cannot be overridden",
                          key=key, source="command line",
                          hint="to change the pipeline, copy the recipe file and pass its path")
    value = OmegaConf.from_dotlist([item])
    return key, OmegaConf.select(value, key)


def overrides_layer(items: Sequence[str], source: str = "command line") -> Layer:
    cfg = OmegaConf.create()
    for item in items:
        key, value = parse_override(item)
        OmegaConf.update(cfg, key, value, force_add=True)
    return Layer(source, None, OmegaConf.to_container(cfg))  # type: ignore[arg-type]


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
        if not isinstance(entry, dict) or entry.get("kind") not in schema.STAGE_KINDS:
            raise ConfigError(f"stage kind must be one of {', '.join(schema.STAGE_KINDS)}",
                              key=f"pipeline.{name}.kind", source=src, line=line)
        for up in entry.get("after") or []:
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


def _merge(cfg: DictConfig, layer: Layer) -> DictConfig:
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
    except oc_errors.ValidationError as e:
        key = e.full_key or str(e.key)
        src, line = layer.where(key)
        msg = str(e.msg).splitlines()[0] if e.msg else "wrong type"
        raise ConfigError(msg, key=key, source=src, line=line) from None
    except oc_errors.OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        src, line = layer.where(key or "")
        raise ConfigError(str(getattr(e, "msg", e)).splitlines()[0], key=key, source=src, line=line) from None


def finetune_stage(kinds: Dict[str, str], option: str) -> str:
    """The pipeline's finetune stage, which ``--hostfile``/``--include``/``--exclude`` apply to."""
    names = [n for n, k in kinds.items() if k == "finetune"]
    if len(names) != 1:
        raise ConfigError(f"{option} applies to the recipe's finetune stage, and this recipe has "
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
            cli[f"{finetune_stage(kinds, '--' + option)}.{option}"] = value

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
        if not f.is_file():
            raise ConfigError(f"config file {f} does not exist")
        data, lines = yamlfile.read(f, what="config")
        layers.append(Layer("config file", f, data, lines))

    if cli:
        tmp = OmegaConf.create()
        for key, value in cli.items():
            OmegaConf.update(tmp, key, value, force_add=True)
        layers.append(Layer("command line", None, OmegaConf.to_container(tmp)))  # type: ignore[arg-type]
    if overrides:
        layers.append(overrides_layer(overrides))
    return _merge_layers(kinds, layers, recipe, list(cli_text) + list(overrides))


def compose_saved(saved: Path, recipe: catalog.Entry, overrides: Sequence[str] = ()) -> Composed:
    """A chain's saved, resolved configuration (``<run dir>/config.yaml``) plus new overrides.

    Reruns start from here, so a stage runs again with exactly what it ran with
    before, changed only by what the user now overrides.
    """
    data, lines = yamlfile.read(saved, what="chain config")
    layer = Layer("chain config", saved, data, lines)
    kinds = read_pipeline(data, layer)
    layers = [layer] + ([overrides_layer(overrides)] if overrides else [])
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
    if not cfg.run.name:
        cfg.run.name = cfg.recipe.name
    return Composed(cfg, layers, origin, recipe, str(cfg.profile.name), overrides_text)


def resolve(composed: Composed) -> Any:
    """Resolve interpolations; returns the typed ``Chain`` object (dataclasses)."""
    try:
        return OmegaConf.to_object(composed.cfg)
    except oc_errors.MissingMandatoryValue as e:
        key = e.full_key
        raise composed.error(key, "a value is required here and none was given",
                             hint=f"set it on the command line ({key}=...) or in a --config file") from None
    except oc_errors.InterpolationKeyError as e:
        key = e.full_key
        raise composed.error(key, f"{str(e.msg).splitlines()[0]}") from None
    except oc_errors.OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or ""
        raise composed.error(key, str(getattr(e, "msg", e)).splitlines()[0]) from None


def check_name(name: str, *, key: str = "run.name") -> str:
    if not NAME_RE.match(name):
        raise ConfigError(
            f"{name!r} is not a valid name: use letters, digits, '.', '_' and '-' "
            "(at most 64, starting with a letter or digit)", key=key)
    return name
