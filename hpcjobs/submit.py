"""Submitting a rendered chain: the only module that creates Slurm jobs.

Order of events, chosen so that nothing is lost whatever happens:

1. the run directory (scripts, configs) and the record are written first;
2. each stage is submitted **held** (``sbatch --hold``) with ``afterok`` on its
   upstream job ids, and the record is rewritten after every ``sbatch``;
3. only when every stage is submitted and recorded are the jobs released.

If an ``sbatch`` fails, or the submitter is interrupted (Ctrl-C, SIGTERM), the
jobs already submitted are cancelled and the record says what happened. If the
submitter is killed outright (SIGKILL) its jobs stay held, so none runs without
a record; ``hpcjobs status`` shows them and ``hpcjobs cancel`` removes them.
Jobs carry ``<chain id>.<stage>`` as their name, which also finds a job whose
id was never written down.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional

from . import records, render
from .errors import HpcjobsError, SlurmError
from .records import Attempt, ChainRecord, StageRecord
from .render import RenderedChain, RenderedStage
from .slurm import Slurm


class _Interrupted(BaseException):
    pass


@contextmanager
def _sigterm_as_exception() -> Iterator[None]:
    def handler(signum, frame):
        raise _Interrupted(f"interrupted by signal {signum}")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def new_record(rendered: RenderedChain) -> ChainRecord:
    plan = rendered.plan
    return ChainRecord(
        chain_id=plan.chain_id, name=str(plan.chain.run.name), recipe=plan.recipe,
        recipe_path=str(plan.recipe_path), profile=plan.profile,
        slurm_conf=plan.chain.profile.slurm_conf, run_dir=str(plan.run_dir), created=plan.created,
        overrides=list(plan.overrides),
        stages=[StageRecord(st.name, st.kind, list(st.after),
                            [Attempt(st.attempt, overrides=list(plan.overrides),
                                     forced=plan.stage(st.name).extra.get("forced"))])
                for st in rendered.stages],
    )


def submit_stages(record: ChainRecord, stages: List[RenderedStage], slurm: Slurm,
                  upstream_ids: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Submit ``stages`` (in order, held), record each job id, then release them all.

    ``upstream_ids`` holds job ids of stages outside ``stages`` that these depend
    on (a rerun depends on completed stages only, so usually none). On failure
    every job submitted here is cancelled and the error re-raised.
    """
    ids: Dict[str, str] = dict(upstream_ids or {})
    submitted: List[str] = []
    try:
        with _sigterm_as_exception():
            for st in stages:
                deps = [ids[a] for a in st.after if a in ids]
                job_id = slurm.sbatch(st.script_path, dependency=deps, hold=True)
                submitted.append(job_id)
                ids[st.name] = job_id
                attempt = record.stage(st.name).current
                attempt.job_id, attempt.submitted = job_id, records.utcnow()
                record.save()
            slurm.release(submitted)
    except BaseException as e:
        cleanup = ""
        if submitted:
            try:
                slurm.cancel(submitted)
                cleanup = f"; cancelled the {len(submitted)} job(s) already submitted ({', '.join(submitted)})"
            except SlurmError as ce:
                cleanup = f"; could not cancel {', '.join(submitted)}: {ce}"
        failed_at = stages[len(submitted)].name if len(submitted) < len(stages) else "release"
        record.submission = "failed"
        record.error = f"submission failed at {failed_at}: {e}{cleanup}"
        record.save()
        if isinstance(e, (KeyboardInterrupt, _Interrupted)):
            raise HpcjobsError(f"interrupted while submitting chain {record.chain_id}{cleanup}") from None
        if isinstance(e, HpcjobsError):
            raise SlurmError(f"{record.error}", hint=f"the record is kept in {record.run_dir}") from None
        raise
    return {k: v for k, v in ids.items() if k in {s.name for s in stages}}


def submit(rendered: RenderedChain, slurm: Slurm) -> ChainRecord:
    """Write the run directory and the record, then submit every stage."""
    run_dir = rendered.plan.run_dir
    if (run_dir / records.RECORD).exists():
        raise HpcjobsError(f"{run_dir} already holds a chain; refusing to overwrite it")
    render.write_tree(rendered, run_dir)
    record = new_record(rendered)
    record.save()
    records.index_add(record)
    submit_stages(record, rendered.stages, slurm)
    record.submission = "submitted"
    record.save()
    return record
