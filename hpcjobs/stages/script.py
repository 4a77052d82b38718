"""``script``: your own training script on N nodes, under the launcher you already use.

``script: train.py`` (or ``module: pkg.mod``) with ``args:`` as a list, started by
``deepspeed``, ``torchrun``, ``accelerate`` or ``srun`` (:mod:`hpcjobs.launchers`,
one launcher per node through ``srun --ntasks-per-node=1``; for ``srun`` one task
per rank). On the login node:

* the script is read and copied into the attempt directory (``code/``), with its
  SHA-256 in the script's header, so a later edit of your file does not change
  what a requeue or rerun of this attempt runs (a rerun copies the file anew);
* who runs where is settled like the built-in finetune (:mod:`hpcjobs.placement`);
* the batch numbers are settled (:mod:`hpcjobs.scriptbatch`): from ``batch:``, the
  well-known flags in ``args`` (``--per_device_train_batch_size``, ...) and your
  DeepSpeed JSON; the JSON the job uses (``ds_config.json``) has ``train_batch_size``,
  ``train_micro_batch_size_per_gpu`` and ``gradient_accumulation_steps`` concrete and
  consistent with the world size, so DeepSpeed's batch assertion cannot fail in the job;
* for ``accelerate``, the accelerate YAML the job uses (``accelerate.yaml``) is made
  from yours (:func:`hpcjobs.launchers.accelerate_yaml`).

Time limits: ``HPCJOBS_PREEMPT_FILE`` names the flag file the job touches at Slurm's
SIGUSR2 warning (which also reaches every rank); a script that saves a checkpoint
and exits 75 is requeued (``hpcjobs.train.callbacks.HpcjobsCallback`` does this for
HF Trainer scripts, and records each rank's measured memory in memory_measured.json).

Curves: ``HPCJOBS_TENSORBOARD_DIR`` is ``<run dir>/tensorboard/<stage>/attempt-<n>``, the
finetune stage's layout, and ``TENSORBOARD_LOGGING_DIR`` (what the HF Trainer's TensorBoard
integration reads) defaults to it, so ``report_to="tensorboard"`` lands there.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from .. import dsconfig, launchers, scriptbatch, yamlfile
from ..constraints import choice, number
from ..errors import ConfigError
from ..placement import place_ranks
from ..schema import StageCfg
from ..userfiles import read_text
from . import register
from .base import PlanContext, StageKind, time_limit_signal, to_json

DS_PRESETS = ("zero1", "zero2", "zero3")


@dataclass
class BatchCfg:
    micro_batch_size: Optional[int] = number(None, ge=1, le=65536)
    """Per-rank micro batch; None: from the script's flags or the DeepSpeed JSON."""
    grad_accum: Optional[int] = number(None, ge=1)
    global_batch_size: Optional[int] = number(None, ge=1)
    """micro × accumulation × world size, checked (or used to derive the missing one)."""


@dataclass
class ScriptStage(StageCfg):
    script: Optional[str] = None
    """Your training script (a .py file); copied into the attempt directory at submission."""
    module: Optional[str] = None
    """Or a module to run with ``python -m`` (importable in the jobs' environment)."""
    args: List[str] = field(default_factory=list)
    """The script's arguments, a list; each item reaches it as one argument."""
    launcher: str = choice(*launchers.LAUNCHERS, default="torchrun")
    """deepspeed, torchrun, accelerate or srun (one task per rank, torch.distributed variables set)."""
    deepspeed: Optional[str] = None
    """A DeepSpeed JSON, or zero1/zero2/zero3; the job gets a resolved copy (ds_config.json).
    Also taken from a ``--deepspeed FILE`` in args, which then points at the resolved copy."""
    accelerate_config: Optional[str] = None
    """Your accelerate YAML (launcher accelerate); the job's is made from it."""
    hf_trainer: bool = False
    """An HF Trainer/TRL script: it takes --local_rank, and "auto" values in the DeepSpeed
    JSON are left for the Trainer to fill."""
    batch: BatchCfg = field(default_factory=BatchCfg)
    workdir: Optional[str] = None
    """Directory the script runs in (relative paths in args resolve there); None: where
    hpcjobs was run."""
    env: Dict[str, str] = field(default_factory=dict)
    """Environment for every rank on every node, on top of the profile's."""
    output: str = "${run.dir}/output"
    """A directory for the script's results; later stages can refer to it."""
    hostfile: Optional[str] = None
    """DeepSpeed hostfile (``host slots=N``): the job runs on exactly these hosts."""
    include: str = ""
    """DeepSpeed --include spec; launchers other than deepspeed take whole nodes only."""
    exclude: str = ""
    """DeepSpeed --exclude spec; launchers other than deepspeed take whole nodes only."""


def _flag_index(args: List[str], flag: str) -> Optional[int]:
    for i, a in enumerate(args):
        if a == flag or a.startswith(flag + "="):
            return i
    return None


def _replace_flag(args: List[str], flag: str, value: str) -> List[str]:
    """``--flag X`` / ``--flag=X`` -> the same flag with ``value``."""
    out = list(args)
    i = _flag_index(out, flag)
    if i is None:
        return out
    if out[i] == flag and i + 1 < len(out):
        out[i + 1] = value
    else:
        out[i] = f"{flag}={value}"
    return out


def _preset(name: str, precision: str, hf: bool) -> Dict[str, Any]:
    stage = int(name[-1])
    ds: Dict[str, Any] = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
                          "gradient_accumulation_steps": "auto", "zero_optimization": {"stage": stage}}
    if hf:
        ds["gradient_clipping"] = "auto"
        ds["bf16"] = {"enabled": "auto"}
        ds["fp16"] = {"enabled": "auto"}
    else:
        ds["bf16"] = {"enabled": precision == "bf16"}
        ds["fp16"] = {"enabled": precision == "fp16"}
    return ds


class Script(StageKind):
    name = "script"
    summary = "your own training script under deepspeed, torchrun, accelerate or srun"
    settings = ScriptStage
    path_keys = ("script", "output", "hostfile", "accelerate_config", "workdir")
    input_dirs = ()
    multi_node = True
    launch_options = True
    can_resume = False      # the script resumes itself (see HpcjobsCallback / resume_checkpoint)

    def default_gpus(self, profile):
        return profile.train_gpus_per_node or profile.gpus_per_node

    # ---- planning

    def plan(self, ctx: PlanContext):
        s: ScriptStage = ctx.sp.cfg
        sp, name = ctx.sp, ctx.sp.name
        if bool(s.script) == bool(s.module):
            raise ctx.error("script", "give exactly one of script (a .py file) or module (pkg.mod)"
                            + (f"; both are set (module {s.module})" if s.script else ""))
        if s.module and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", s.module):
            raise ctx.error("module", f"{s.module!r} is not a dotted module name")
        for k in s.env:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(k)):
                raise ctx.error(f"env.{k}", "not a valid environment variable name")
        if s.accelerate_config and s.launcher != "accelerate":
            raise ctx.error("accelerate_config", f"is for the accelerate launcher (launcher is {s.launcher})")
        if s.launcher != "deepspeed":
            for key in ("include", "exclude"):
                spec = getattr(s, key)
                if spec and ":" in spec:
                    raise ctx.error(key, f"{spec!r} picks GPUs within a node, which only the deepspeed launcher "
                                    f"can do (launcher is {s.launcher})",
                                    hint="name whole nodes (node1@node2), or use launcher deepspeed")
        nodelist, exclude_nodes = place_ranks(ctx.composed, ctx.chain, sp)
        if s.launcher != "deepspeed":
            if sp.pool and len(set(sp.pool.values())) > 1:
                raise ctx.error("hostfile", f"hosts have different slots ({sp.pool}); only the deepspeed "
                                f"launcher runs an uneven number of ranks per node (launcher is {s.launcher})")
            sp.ds_filter = None   # whole nodes: Slurm's --nodelist/--exclude already say it
            sp.world_size = sp.nodes * sp.gpus_per_node
        self._plan_code(ctx)
        self._plan_batch(ctx)
        return nodelist, exclude_nodes

    def _plan_code(self, ctx: PlanContext) -> None:
        s: ScriptStage = ctx.sp.cfg
        sp = ctx.sp
        workdir = s.workdir or os.getcwd()
        sp.extra["workdir"] = workdir
        if s.module:
            sp.extra["program"] = ["-m", s.module]
            return
        try:
            text = read_text(s.script, "script")
        except ConfigError as e:
            raise ctx.error("script", e.message) from None
        code = f"code/{Path(s.script).name}"
        sp.extra["code"] = {code: text}
        sp.extra["sha256"] = hashlib.sha256(text.encode()).hexdigest()
        sp.extra["program"] = [str(sp.attempt_dir / code)]

    def _plan_batch(self, ctx: PlanContext) -> None:
        s: ScriptStage = ctx.sp.cfg
        sp, p = ctx.sp, ctx.chain.profile
        workdir = sp.extra["workdir"]
        args = list(s.args)
        try:
            found = scriptbatch.read_script_args(args, cwd=workdir)
        except ConfigError as e:
            raise ctx.error("args", e.message) from None
        ds_source = ds_json = None
        ds_key = "deepspeed"
        arg_ds = found.get("deepspeed")
        if s.deepspeed and arg_ds is not None:
            raise ctx.error("deepspeed", f"is set and args also give --deepspeed {arg_ds.value}; use one")
        ds_ref = s.deepspeed or (str(arg_ds.value) if arg_ds is not None else None)
        if arg_ds is not None:
            ds_key = "args"
        accel_user = None
        if s.launcher == "accelerate":
            if s.accelerate_config:
                try:
                    accel_user, _ = yamlfile.read(Path(s.accelerate_config), what="accelerate config")
                except ConfigError as e:
                    raise ctx.error("accelerate_config", e.message) from None
                uses_ds, accel_json = launchers.accelerate_uses_deepspeed(accel_user)
                if accel_json and not ds_ref:
                    ds_ref = accel_json if os.path.isabs(accel_json) else \
                        str(Path(s.accelerate_config).parent / accel_json)
                    ds_key = "accelerate_config"
                elif uses_ds and not ds_ref:
                    ds_ref = "zero2"
                    ds_key = "accelerate_config"
        if ds_ref in DS_PRESETS:
            ds_json, ds_source = _preset(ds_ref, p.precision, s.hf_trainer), f"preset {ds_ref}"
        elif ds_ref:
            path = ds_ref if os.path.isabs(ds_ref) else os.path.join(workdir, ds_ref)
            try:
                ds_json = dsconfig.load_user_ds_config(path)
            except ConfigError as e:
                raise ctx.error(ds_key, e.message) from None
            ds_source = path
        ds_path = str(sp.attempt_dir / "ds_config.json")
        try:
            if s.launcher == "accelerate":
                precision = {"bf16": "bf16", "fp16": "fp16"}.get(p.precision, "no")
                accel, notes = launchers.accelerate_yaml(
                    accel_user, num_machines=sp.nodes, num_processes=sp.world_size,
                    deepspeed_config=ds_path if ds_json is not None else None,
                    mixed_precision=None if accel_user and "mixed_precision" in accel_user else precision,
                    source=s.accelerate_config or "accelerate config")
                if ds_json is not None:
                    ds_json = scriptbatch.merge_ds_updates(ds_json, notes.ds_updates,
                                                           updates_source=s.accelerate_config or "accelerate",
                                                           ds_source=ds_source or "ds.json")
                sp.extra["accelerate"] = accel
                sp.extra["accelerate_notes"] = list(notes.messages)
            declared = {k: getattr(s.batch, k) for k in ("micro_batch_size", "grad_accum", "global_batch_size")}
            res = scriptbatch.resolve_batch(declared=declared, from_args=found, ds_json=ds_json,
                                            world_size=sp.world_size, hf_script=s.hf_trainer,
                                            declared_source=f"{sp.name}.batch", ds_source=ds_source or "ds.json")
            if s.launcher == "accelerate" and res.ds_json is not None:
                launchers.check_ds_json_for_accelerate(res.ds_json, source=ds_source or "ds.json")
        except ConfigError as e:
            key = "accelerate_config" if s.launcher == "accelerate" and s.accelerate_config and \
                "accelerate" in e.message.lower() else ("batch" if "batch" in e.message else ds_key)
            raise ctx.error(key, e.message, hint=e.hint) from None
        sp.ds_config = res.ds_json
        sp.extra["batch"] = {"numbers": res.numbers._asdict() if res.numbers else None,
                             "provenance": res.provenance}
        if res.ds_json is not None:
            if arg_ds is not None:
                args = _replace_flag(args, "--deepspeed", ds_path)
            elif s.hf_trainer and s.launcher == "deepspeed":
                args += ["--deepspeed", ds_path]
        sp.extra["args"] = args + list(res.script_args)

    def sbatch(self, ctx: PlanContext):
        return time_limit_signal(ctx)

    # ---- files

    def files(self, plan, sp):
        s: ScriptStage = sp.cfg
        files: Dict[str, str] = dict(sp.extra.get("code", {}))
        if sp.ds_config is not None:
            files["ds_config.json"] = to_json(sp.ds_config)
        if "accelerate" in sp.extra:
            files["accelerate.yaml"] = launchers.dump_yaml(sp.extra["accelerate"])
        if sp.pool is not None:
            files["hostfile.requested"] = "".join(f"{h} slots={n}\n" for h, n in sp.pool.items())
        spec = launchers.LaunchSpec(
            launcher=s.launcher, program=sp.extra["program"], args=sp.extra["args"],
            nnodes=sp.nodes, nproc_per_node=sp.gpus_per_node, world_size=sp.world_size,
            allocation=str(sp.attempt_dir / "allocation"),
            hostfile=str(sp.attempt_dir / "hostfile") if s.launcher == "deepspeed" else None,
            ds_filter=tuple(sp.ds_filter) if sp.ds_filter else None,
            deepspeed_config=str(sp.attempt_dir / "ds_config.json") if sp.ds_config is not None else None,
            accelerate_config=str(sp.attempt_dir / "accelerate.yaml") if "accelerate" in sp.extra else None,
            no_local_rank=not s.hf_trainer, env={str(k): str(v) for k, v in s.env.items()})
        try:
            spec.validate()
        except ConfigError as e:
            raise ConfigError(f"{sp.name}: {e.message}") from None
        files["launch.json"] = spec.to_json()
        return files

    def template_vars(self, plan, sp):
        s: ScriptStage = sp.cfg
        prog = sp.extra["program"]
        shown = " ".join(shlex.quote(a) for a in [*(["-m", s.module] if s.module else [s.script]),
                                                  *sp.extra["args"]])
        batch = sp.extra.get("batch") or {}
        return {"launcher": s.launcher, "workdir": sp.extra["workdir"], "program_line": shown,
                "sha256": sp.extra.get("sha256"), "program": prog, "batch": batch,
                "accelerate_notes": sp.extra.get("accelerate_notes", [])}

    def progress(self, attempt_dir, log):
        from .. import progress as progress_mod

        reader = getattr(progress_mod, "for_attempt", None)
        if reader is None:
            return progress_mod.read(attempt_dir / "progress.jsonl")
        return reader(attempt_dir, log)


register(Script())
