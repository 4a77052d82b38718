"""Rerunning a chain from its failed stage (or a chosen one), without redoing finished work.

The rerun set is the start stage and every stage downstream of it (and an upstream stage of
those that failed, was cancelled or still waits). Each gets
a new attempt (its own directory, script, log and overrides); stages outside
the set are left alone and must have COMPLETED, which is checked from
accounting or the stage's marker rather than trusted: on Slurm 22.05 an
``afterok`` on a job slurmctld has already forgotten counts as satisfied even
if that job failed. New jobs therefore depend only on each other, never on an
old job id.

Jobs of the rerun set that are still queued (typically blocked for ever by
``DependencyNeverSatisfied`` behind the failed stage) are cancelled and
replaced by the new attempts, so nothing is left pending.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from . import catalog, config, preflight, plan as planning, records, render, status
from . import stages as stage_kinds
from .errors import HpcjobsError
from .memplan import report as memory
from .records import Attempt, ChainRecord
from .slurm import DONE_STATES, FAILED_STATES, LIVE_STATES, Slurm
from .submit import submit_stages


def rerun_set(record: ChainRecord, start: str) -> List[str]:
    """``start`` and every stage downstream of it, in pipeline order."""
    chosen = {start}
    for st in record.stages:  # pipeline order: upstream stages come first
        if any(a in chosen for a in st.after):
            chosen.add(st.name)
    return [st.name for st in record.stages if st.name in chosen]


def choose_start(cs: status.ChainStatus, from_stage: Optional[str]) -> str:
    names = [s.name for s in cs.stages]
    if from_stage is not None:
        if from_stage not in names:
            raise HpcjobsError(f"chain {cs.record.chain_id} has no stage {from_stage!r} "
                               f"(stages: {', '.join(names)})")
        return from_stage
    for s in cs.stages:
        if s.state not in DONE_STATES and not s.blocked_by and s.state not in LIVE_STATES:
            return s.name
    live = [s.name for s in cs.stages if s.state in LIVE_STATES and not s.blocked_by]
    if live:
        raise HpcjobsError(f"nothing has failed: {', '.join(live)} still "
                           f"{'runs' if len(live) == 1 else 'run'} or waits",
                           hint="pass --from STAGE to rerun a stage anyway")
    raise HpcjobsError(f"every stage of {cs.record.chain_id} completed; nothing to rerun",
                       hint="pass --from STAGE to run a stage and everything after it again")


def prepare(cs: status.ChainStatus, start: str) -> Tuple[List[str], List[str]]:
    """The stages to rerun, and the job ids of theirs that must be cancelled first."""
    record = cs.record
    by_name = {s.name: s for s in cs.stages}
    todo = rerun_set(record, start)
    # Side-by-side stages (llama2-lora's convert and prepare): an upstream stage of the rerun set
    # that failed or was cancelled on its own, or still waits, runs again too; else the two
    # could only be rerun each waiting for the other.
    while True:
        extra = {up for name in todo for up in record.stage(name).after
                 if up not in todo and (by_name[up].state in FAILED_STATES or by_name[up].state == "PENDING")}
        if not extra:
            break
        todo = [st.name for st in record.stages if st.name in extra or st.name in todo]
    for name in todo:
        for up in record.stage(name).after:
            if up in todo:
                continue
            s = by_name[up]
            if s.state not in DONE_STATES:
                raise HpcjobsError(
                    f"cannot rerun {start}: its upstream stage {up} is {s.state}"
                    + (" (Slurm and the marker do not say it completed)" if s.state == "UNKNOWN" else ""),
                    hint=f"rerun --from {up}")
    cancel: List[str] = []
    for name in todo:
        s = by_name[name]
        if s.state in LIVE_STATES and s.job_id:
            if s.state != "PENDING":
                raise HpcjobsError(f"stage {name} is {s.state} (job {s.job_id}); cancel the chain or wait "
                                   "before rerunning it")
            cancel.append(s.job_id)
    return todo, cancel


@dataclass
class RerunPlan:
    """What a rerun would do, before it does it (``rerun --dry-run`` prints this)."""

    start: str
    stages: List[str]                       # the stages that run again, in order
    cancel: List[str]                       # queued job ids of theirs that are replaced
    changes: List[Tuple[str, Any, Any]]     # resolved keys whose value changes: (key, old, new)
    rendered: render.RenderedChain
    attempts: Dict[str, int]
    composed: config.Composed
    job_ids: Dict[str, str] = field(default_factory=dict)   # once submitted


def _flat(data: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(data, dict) and data:
        out: Dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): data}


def config_changes(old_yaml: str, new_yaml: str) -> List[Tuple[str, Any, Any]]:
    """Resolved keys whose values differ between two config.yaml texts."""
    old, new = _flat(yaml.safe_load(old_yaml) or {}), _flat(yaml.safe_load(new_yaml) or {})
    moved_from, moved_to = old.get("run.dir"), new.get("run.dir")
    if isinstance(moved_from, str) and isinstance(moved_to, str) and moved_from != moved_to:
        # The run directory was moved: paths inside it moved with it, and are not changes.
        def relocate(v: Any) -> Any:
            if isinstance(v, str) and (v == moved_from or v.startswith(moved_from + "/")):
                return moved_to + v[len(moved_from):]
            return v
        old = {k: relocate(v) for k, v in old.items()}
    return [(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def _fresh(record: ChainRecord, name: str, cfg: Any) -> Tuple[List[str], List[str]]:
    """``--fresh`` for one stage: its kind's overrides, and (given its settings) what to move aside."""
    kind = stage_kinds.find(record.stage(name).kind)
    if kind is None or not kind.can_resume:
        return [], []
    return kind.fresh(name, cfg)


def plan_rerun(record: ChainRecord, *, from_stage: Optional[str], overrides: Sequence[str],
               fresh: bool = False, slurm: Slurm, force: bool = False) -> RerunPlan:
    """Re-plan the chain with ``overrides`` and check it exactly as ``submit`` does. No side effects.

    The chain's layers (``layers.yaml``) are merged again with the new overrides on
    top, so every ``${...}`` link follows a changed value; then the same checks as
    a submission run (schema, plan, input files, the partition) for the stages that
    will run. A change to a stage that is not rerun is refused: its outputs would
    no longer match the recorded configuration.
    """
    cs = status.collect([record], lambda conf: slurm)[0]
    start = choose_start(cs, from_stage)
    todo, cancel = prepare(cs, start)
    run_dir = Path(record.run_dir)
    # --fresh is this attempt's business only: not kept for later reruns.
    extra = [o for n in todo for o in _fresh(record, n, None)[0]] if fresh else []
    recipe = catalog.Entry(record.recipe, Path(record.recipe_path), "", "file")
    if (run_dir / config.LAYERS_FILE).is_file():
        composed = config.compose_snapshot(run_dir / config.LAYERS_FILE, recipe, overrides, extra,
                                           source="command line")
    else:  # a chain submitted before layers.yaml existed
        composed = config.compose_saved(run_dir / "config.yaml", recipe, overrides, extra)
    attempts = {st.name: st.current.n + (1 if st.name in todo else 0) for st in record.stages}
    the_plan = planning.build(composed, chain_id=record.chain_id, run_dir=run_dir, attempts=attempts)
    preflight.check_inputs(the_plan, composed, only=set(todo))
    memory.check_memory(the_plan, force=force, only=set(todo), warn=lambda m: print(m, file=sys.stderr))
    preflight.check_cluster(the_plan, composed, slurm, only=set(todo))
    rendered = render.render(the_plan)

    try:
        old_text = (run_dir / "config.yaml").read_text()
    except OSError:
        old_text = ""
    changes = config_changes(old_text, rendered.files["config.yaml"]) if old_text else []
    stage_names = {st.name for st in record.stages}
    for key, old, new in changes:
        section = key.split(".")[0]
        if section in stage_names and section not in todo and key.split(".")[-1] != "resume":
            raise config.ConfigError(
                f"would change from {old!r} to {new!r}, but stage {section} is not rerun "
                f"(it completed with the old value)", key=key, source="command line",
                hint=f"rerun --from {section} to run it again with the new value")
    return RerunPlan(start, todo, cancel, changes, rendered, attempts, composed)


def rerun(record: ChainRecord, *, from_stage: Optional[str], overrides: Sequence[str],
          fresh: bool = False, slurm: Optional[Slurm] = None, dry_run: bool = False,
          force: bool = False) -> RerunPlan:
    slurm = slurm or Slurm(record.slurm_conf)
    rp = plan_rerun(record, from_stage=from_stage, overrides=overrides, fresh=fresh, slurm=slurm, force=force)
    if dry_run:
        return rp
    run_dir = Path(record.run_dir)
    rendered, todo, attempts = rp.rendered, rp.stages, rp.attempts
    stages = [st for st in rendered.stages if st.name in todo]

    # Nothing below may fail half-way without a record: write files, then the record, then submit.
    if fresh:
        for n in todo:
            for ckpt_dir in _fresh(record, n, rendered.plan.stage(n).cfg)[1]:
                ckpt = Path(ckpt_dir)
                if not ckpt.exists():
                    continue
                aside = ckpt.with_name(f"{ckpt.name}.before-attempt-{attempts[n]}")
                ckpt.rename(aside)
                print(f"--fresh: moved {ckpt} aside to {aside}")
    for st in stages:
        st.attempt_dir.mkdir(parents=True, exist_ok=True)
        st.files["config.yaml"] = rendered.files["config.yaml"]
        for fname, text in st.files.items():
            render.write_file(st.attempt_dir / fname, text, executable=fname == render.SCRIPT)
    # The new overrides become part of the chain's layers: a later rerun keeps them.
    if overrides:
        rp.composed.layers[-1].source = f"rerun {records.utcnow()} (command line)"
    render.write_file(run_dir / config.LAYERS_FILE, config.snapshot(rp.composed))
    render.write_file(run_dir / "config.yaml", rendered.files["config.yaml"])
    if rp.cancel:
        slurm.cancel(rp.cancel)
    note = f"rerun --from {rp.start}" + (" --fresh" if fresh else "")
    for name in todo:
        record.stage(name).attempts.append(Attempt(attempts[name], overrides=list(overrides), note=note,
                                                   forced=rendered.plan.stage(name).extra.get("forced")))
    record.submission = "submitting"
    record.error = None
    record.save()
    ids = submit_stages(record, stages, slurm)
    record.submission = "submitted"
    record.save()
    rp.job_ids = ids
    return rp
