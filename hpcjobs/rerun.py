"""Rerunning a chain from its failed stage (or a chosen one), without redoing finished work.

The rerun set is the start stage and every stage downstream of it. Each gets
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

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from . import catalog, config, plan as planning, render, status
from .errors import HpcjobsError
from .records import Attempt, ChainRecord
from .slurm import DONE_STATES, LIVE_STATES, Slurm
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


def rerun(record: ChainRecord, *, from_stage: Optional[str], overrides: Sequence[str],
          fresh: bool = False, slurm: Optional[Slurm] = None) -> Dict[str, str]:
    slurm = slurm or Slurm(record.slurm_conf)
    cs = status.collect([record], lambda conf: slurm)[0]
    start = choose_start(cs, from_stage)
    todo, cancel = prepare(cs, start)
    run_dir = Path(record.run_dir)

    overrides = list(overrides)
    finetunes = [n for n in todo if record.stage(n).kind == "finetune"]
    if fresh:
        overrides += [f"{n}.resume=never" for n in finetunes]
    recipe = catalog.Entry(record.recipe, Path(record.recipe_path), "", "file")
    composed = config.compose_saved(run_dir / "config.yaml", recipe, overrides)
    attempts = {st.name: st.current.n + (1 if st.name in todo else 0) for st in record.stages}
    the_plan = planning.build(composed, chain_id=record.chain_id, run_dir=run_dir, attempts=attempts)
    rendered = render.render(the_plan)
    stages = [st for st in rendered.stages if st.name in todo]

    # Nothing below may fail half-way without a record: write files, then the record, then submit.
    if fresh:
        for n in finetunes:
            ckpt = Path(the_plan.stage(n).cfg.checkpoints)
            if ckpt.exists():
                aside = ckpt.with_name(f"{ckpt.name}.before-attempt-{attempts[n]}")
                ckpt.rename(aside)
                print(f"--fresh: moved {ckpt} aside to {aside}")
    for st in stages:
        st.attempt_dir.mkdir(parents=True, exist_ok=True)
        st.files["config.yaml"] = rendered.files["config.yaml"]
        for fname, text in st.files.items():
            render.write_file(st.attempt_dir / fname, text, executable=fname == render.SCRIPT)
    render.write_file(run_dir / "config.yaml", rendered.files["config.yaml"])
    if cancel:
        slurm.cancel(cancel)
    note = f"rerun --from {start}" + (" --fresh" if fresh else "")
    for name in todo:
        record.stage(name).attempts.append(Attempt(attempts[name], overrides=overrides, note=note))
    record.submission = "submitting"
    record.error = None
    record.save()
    ids = submit_stages(record, stages, slurm)
    record.submission = "submitted"
    record.save()
    return ids
