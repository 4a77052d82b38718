"""Render a checked plan into job scripts and config files. Pure: returns text, writes nothing.

Templates are Jinja files in ``templates/`` (the user's ``<config dir>/templates``
first, so a site can override one). Every ``{{ value }}`` is quoted for the
shell by the environment's ``finalize`` hook, so a value can never become
shell code; text that *is* shell code by design (a profile's setup lines, a
command stage's body, the ``#SBATCH`` lines built here) is marked with the
``raw`` filter, and a list becomes quoted words with the ``words`` filter.
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import jinja2
from omegaconf import OmegaConf

from . import __version__, config, paths, stages
from .errors import ConfigError, HpcjobsError
from .plan import ChainPlan, StagePlan

SCRIPT = "job.sbatch"


class Raw(str):
    """Shell text that is inserted as written (never a user *value*)."""


def _finalize(value: Any) -> str:
    if isinstance(value, Raw):
        return value
    if value is None:
        raise HpcjobsError("template bug: a None value reached a shell line")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)  # a number is a single safe shell word
    return shlex.quote(str(value))


def _words(values: Any) -> Raw:
    return Raw(" ".join(shlex.quote(str(v)) for v in values))


def _comment(value: Any) -> Raw:
    # A newline in a comment would end it and start a command.
    return Raw(" ".join(str(value).splitlines()))


def sbatch_directive(key: str, value: Optional[str]) -> str:
    """``#SBATCH --key=value``; sbatch reads these lines itself, honouring double quotes."""
    if value is not None and any(c in value for c in "\n\r\0"):
        raise ConfigError(f"sbatch option --{key} has a line break in its value")
    if value == "":
        return f"#SBATCH --{key}"
    if any(c.isspace() or c in "\"'" for c in value):
        if '"' in value:
            raise ConfigError(f"sbatch option --{key}: value {value!r} cannot contain both spaces and quotes")
        value = f'"{value}"'
    return f"#SBATCH --{key}={value}"


def environment() -> jinja2.Environment:
    search = [str(paths.user_config_dir() / "templates"), str(paths.shipped("templates"))]
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(search),
        undefined=jinja2.StrictUndefined,
        finalize=_finalize,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )
    env.filters["raw"] = Raw
    env.filters["words"] = _words
    env.filters["comment"] = _comment
    return env


@dataclass
class RenderedStage:
    name: str
    kind: str
    after: List[str]
    attempt: int
    attempt_dir: Path
    files: Dict[str, str] = field(default_factory=dict)  # file name in attempt_dir -> content

    @property
    def script(self) -> str:
        return self.files[SCRIPT]

    @property
    def script_path(self) -> Path:
        return self.attempt_dir / SCRIPT


@dataclass
class RenderedChain:
    plan: ChainPlan
    stages: List[RenderedStage]
    files: Dict[str, str]  # run-dir-level files: config.yaml, submit.sh


def render_stage(plan: ChainPlan, sp: StagePlan, env: Optional[jinja2.Environment] = None) -> RenderedStage:
    env = env or environment()
    kind = stages.get(sp.kind)
    files = kind.files(plan, sp)
    chain = plan.chain
    header = [
        f"hpcjobs {__version__}: chain {plan.chain_id}, stage {sp.index}/{len(plan.stages)} "
        f"{sp.name} ({sp.kind}), attempt {sp.attempt}",
        f"recipe: {plan.recipe} ({plan.recipe_path})",
        f"profile: {plan.profile}",
        f"overrides: {' '.join(plan.overrides) if plan.overrides else '(none)'}",
        f"runs after: {', '.join(sp.after)} (afterok; job ids are given at submission)" if sp.after
        else "runs after: nothing (first stage)",
        f"rendered {plan.created} by `hpcjobs render`/`hpcjobs submit`; edit the recipe, not this file",
    ]
    directives = [sbatch_directive(k, v) for k, v in sp.sbatch.items() if v is not None]
    try:
        template = env.get_template(kind.template)
    except jinja2.TemplateNotFound as e:
        raise HpcjobsError(f"no template {e.name} for stage kind {sp.kind!r}") from None
    try:
        text = template.render(
            plan=plan, stage=sp, s=sp.cfg, profile=chain.profile, run=chain.run,
            header=header, directives=directives, files=files, **kind.template_vars(plan, sp),
        )
    except jinja2.UndefinedError as e:
        raise HpcjobsError(f"template {kind.template}: {e.message}") from None
    files = {SCRIPT: text, **files}
    return RenderedStage(sp.name, sp.kind, sp.after, sp.attempt, sp.attempt_dir, files)


def _submit_sh(plan: ChainPlan, stages: List[RenderedStage]) -> str:
    """A plain-shell equivalent of `hpcjobs submit` for this rendering (no hold/release, no record)."""
    lines = [
        "#!/bin/bash",
        f"# Submit chain {plan.chain_id} by hand, in order, each stage after its upstream stages.",
        "# `hpcjobs submit` does the same and also records the chain and cleans up on failure.",
        "set -euo pipefail",
    ]
    conf = plan.chain.profile.slurm_conf
    if conf:
        lines.append(f"export SLURM_CONF={shlex.quote(conf)}")
    for st in stages:
        deps = ":".join(f"${{JOB_{a}}}" for a in st.after)
        dep = f" --dependency=afterok:{deps}" if deps else ""
        lines.append(f"JOB_{st.name}=$(sbatch --parsable{dep} {shlex.quote(str(st.script_path))})")
        lines.append(f'echo "{st.name}: $JOB_{st.name}"')
    return "\n".join(lines) + "\n"


def render(plan: ChainPlan) -> RenderedChain:
    env = environment()
    stages = [render_stage(plan, sp, env) for sp in plan.stages]
    files = {
        "config.yaml": OmegaConf.to_yaml(OmegaConf.structured(plan.chain)),
        "submit.sh": _submit_sh(plan, stages),
    }
    if plan.layers:
        files[config.LAYERS_FILE] = plan.layers
    return RenderedChain(plan, stages, files)


def write_tree(rendered: RenderedChain, run_dir: Path) -> List[Path]:
    """Write the run directory: chain-level files and each stage's attempt directory.

    Directories and files get the user's umask (no chmod here); only the
    scripts get the execute bit the umask allows.
    """
    written: List[Path] = []
    run_dir.mkdir(parents=True, exist_ok=True)
    for name, text in rendered.files.items():
        written.append(write_file(run_dir / name, text, executable=name.endswith(".sh")))
    for st in rendered.stages:
        st.attempt_dir.mkdir(parents=True, exist_ok=True)
        for name, text in st.files.items():
            written.append(write_file(st.attempt_dir / name, text, executable=name == SCRIPT))
    return written


def write_file(path: Path, text: str, *, executable: bool = False) -> Path:
    mode = 0o777 if executable else 0o666  # open() applies the umask
    path.parent.mkdir(parents=True, exist_ok=True)  # a kind's files may sit in subdirectories (code/)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path
