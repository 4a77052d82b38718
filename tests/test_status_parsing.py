"""Pure parts of status: which node a multi-node stage failed on, from srun's messages."""

from __future__ import annotations

from hpcjobs.slurm import gres_gpus, parse_job_id
from hpcjobs.status import failed_nodes


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
