"""Pure parts of status: which node a multi-node stage failed on, and which source a state comes from."""

from __future__ import annotations

import json

from hpcjobs.errors import SlurmError
from hpcjobs.records import Attempt, ChainRecord, StageRecord
from hpcjobs.slurm import AcctInfo, gres_gpus, parse_job_id
from hpcjobs.status import collect, failed_nodes


def _log(tmp_path, text):
    p = tmp_path / "slurm-1.out"
    p.write_text(text)
    return str(p)


def test_the_killed_task_is_the_cause_not_its_peers(tmp_path):
    log = _log(tmp_path, "training...\n"
                         "srun: error: node1: task 0: Exited with exit code 1\n"
                         "srun: error: node2: task 1: Exited with exit code 247\n"
                         "srun: error: node3: task 2: Terminated\n")
    assert failed_nodes(log) == ["node2"]


def test_node_failure_is_named(tmp_path):
    log = _log(tmp_path, "srun: error: node1: task 0: Exited with exit code 1\n"
                         "srun: launch/slurm: _step_signal: Terminating StepId=32.0\n"
                         "srun: error: Node failure on node2\n")
    assert failed_nodes(log) == ["node2"]


def test_plain_failures_when_no_cause_is_visible(tmp_path):
    log = _log(tmp_path, "srun: error: gpu07: tasks 0-7: Exited with exit code 1\n")
    assert failed_nodes(log) == ["gpu07"]
    assert failed_nodes(_log(tmp_path, "all fine\n")) == []
    assert failed_nodes(None) == []


def test_sbatch_and_sinfo_parsing():
    assert parse_job_id("1234\n") == "1234" and parse_job_id("77;cluster2") == "77"
    assert gres_gpus("gpu:4") == 4 and gres_gpus("gpu:a800:8(S:0-1)") == 8 and gres_gpus("(null)") == 0
    assert gres_gpus("gpu:2,shard:8") == 2


# ---- accounting lagging behind a slurmctld that went down (what test_faults b exercises for real)

class _CtldDown:
    """squeue fails (slurmctld down); accounting still has the job's submit record only."""

    def __init__(self, conf=None):
        pass

    def squeue(self, ids):
        raise SlurmError("slurm_load_jobs error: Unable to contact slurm controller")

    def sacct(self, ids, *, starttime):
        return {"7": [AcctInfo("7", "c.first", "PENDING", None, None, "00:00:00", "None assigned", "Unknown", "Unknown")]}


def _record(tmp_path):
    rec = ChainRecord("c1", "c", "r", "r.yaml", "local", None, str(tmp_path), "2026-11-23T10:00:00Z", [],
                      [StageRecord("first", "command", [], [Attempt(1, job_id="7")])], submission="submitted")
    adir = rec.attempt_dir("first", 1)
    adir.mkdir(parents=True)
    return rec, adir


def _started(adir, job_id="7", restarts=0):
    (adir / "started.json").write_text(json.dumps({"job_id": job_id, "stage": "first", "attempt": 1, "host": "node1",
                                                   "time": "2026-11-23T10:00:05Z", "restarts": restarts,
                                                   "exit_code": None}))


def test_started_marker_overrides_lagging_accounting(tmp_path):
    rec, adir = _record(tmp_path)
    _started(adir)
    (st,) = collect([rec], _CtldDown)
    s = st.stages[0]
    assert (s.state, s.source, s.nodes, s.start) == ("RUNNING", "marker", "node1", "2026-11-23T10:00:05Z")
    assert st.state == "RUNNING" and "squeue unavailable" in st.warnings[0]


def test_stale_or_foreign_started_marker_is_ignored(tmp_path):
    rec, adir = _record(tmp_path)
    assert collect([rec], _CtldDown)[0].stages[0].state == "PENDING"     # no marker: accounting's word
    _started(adir, job_id="6")                                           # an older job's marker
    assert collect([rec], _CtldDown)[0].stages[0].state == "PENDING"
    _started(adir, restarts=1)                                           # a run accounting has not seen
    assert collect([rec], _CtldDown)[0].stages[0].state == "PENDING"
