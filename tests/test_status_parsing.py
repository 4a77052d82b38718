"""Pure parts of status: which node a multi-node stage failed on, and which source a state comes from."""

from __future__ import annotations

import json

from hpcjobs.errors import SlurmError
from hpcjobs.records import Attempt, ChainRecord, StageRecord
from hpcjobs.slurm import AcctInfo, QueueInfo, gres_gpus, parse_job_id
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


class _JustFinished:
    """A 2-node job seconds after it ended (seen on the devcluster): slurmctld still has it with
    its whole allocation; accounting already says COMPLETED but lists one node."""

    def __init__(self, conf=None):
        pass

    def squeue(self, ids):
        return {"7": QueueInfo("7", "c.first", "COMPLETED", "None", "0:04", "node[1-2]", "2026-11-23T10:00:05")}

    def sacct(self, ids, *, starttime):
        return {"7": [AcctInfo("7", "c.first", "COMPLETED", 0, 0, "00:00:04", "node1",
                               "2026-11-23T10:00:05", "2026-11-23T10:00:09")]}


def test_a_finished_jobs_nodes_come_from_slurmctld_while_it_remembers(tmp_path):
    rec, _ = _record(tmp_path)
    (st,) = collect([rec], _JustFinished)
    s = st.stages[0]
    assert (s.state, s.source, s.exit_code, s.nodes) == ("COMPLETED", "sacct", 0, "node[1-2]")


# ---- the failing rank: its exception line and exit code (what `status` shows above the log tail)

from hpcjobs import display  # noqa: E402
from hpcjobs.status import _current_run, diagnose, error_line, rank_exit  # noqa: E402

# A 2-node DeepSpeed launch (one `hpcjobs.launch node` per node under srun --kill-on-bad-exit=1)
# whose rank 1 on node2 raises; node1's launcher is then terminated by srun. Taken from a real run
# on the devcluster, with the rank on node1 also reporting what it saw of its peer (gloo).
DS_TWO_NODES = """\
hpcjobs: chain c-20261202-123319-a445 stage finetune attempt 1 job 11 on node1 (nodes: node[1-2]), restart 0
hpcjobs: world size 2 on 2 node(s), master node1:20011
hpcjobs: node node1 (node rank 0): /venv/bin/python -u -m deepspeed.launcher.runner --no_ssh --node_rank=0 --hostfile=/runs/c/hostfile --master_addr=node1 --master_port=20011 --module hpcjobs.train.finetune
hpcjobs: node node2 (node rank 1): /venv/bin/python -u -m deepspeed.launcher.runner --no_ssh --node_rank=1 --hostfile=/runs/c/hostfile --master_addr=node1 --master_port=20011 --module hpcjobs.train.finetune
[2026-12-02 12:33:24,845] [INFO] [runner.py:618:main] cmd = /venv/bin/python -u -m deepspeed.launcher.launch --world_info=eyJub2RlMSI6IFswXSwgIm5vZGUyIjogWzBdfQ== --master_addr=node1 --master_port=20011 --node_rank=1 --module --enable_each_rank_log=None --log_level=info hpcjobs.train.finetune
[2026-12-02 12:33:28,833] [INFO] [launch.py:158:main] nnodes=2, num_local_procs=1, node_rank=1
[2026-12-02 12:33:28,835] [INFO] [launch.py:245:main] process 8014 spawned with command: ['/venv/bin/python', '-u', '-m', 'hpcjobs.train.finetune', '--local_rank=0']
[hpcjobs.finetune] rank=1 world_size=2 local_rank=0 node_rank=1 hostname=node2 pid=8014 device=cpu
[2026-12-02 12:33:28,913] [INFO] [launch.py:245:main] process 8015 spawned with command: ['/venv/bin/python', '-u', '-m', 'hpcjobs.train.finetune', '--local_rank=0']
[hpcjobs.finetune] rank=0 world_size=2 local_rank=0 node_rank=0 hostname=node1 pid=8015 device=cpu
Traceback (most recent call last):
  File "/venv/lib/python3.11/site-packages/hpcjobs/train/finetune.py", line 549, in main
    return run(cfg, device, info, preempt, progress)
  File "/venv/lib/python3.11/site-packages/hpcjobs/train/data.py", line 88, in load
    raise ValueError("boom")
ValueError: boom
[2026-12-02 12:33:30,838] [INFO] [launch.py:253:sigkill_handler] Killing subprocess 8014
[2026-12-02 12:33:30,838] [ERROR] [launch.py:259:sigkill_handler] ['/venv/bin/python', '-u', '-m', 'hpcjobs.train.finetune', '--local_rank=0'] exits with return code = 1
srun: error: node2: task 1: Exited with exit code 1
srun: launch/slurm: _step_signal: Terminating StepId=11.0
Traceback (most recent call last):
  File "/venv/lib/python3.11/site-packages/torch/distributed/distributed_c10d.py", line 2288, in all_reduce
    work = group.allreduce([tensor], opts)
RuntimeError: [../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [10.0.0.2]:43243
slurmstepd-node1: error: *** STEP 11.0 ON node1 CANCELLED AT 2026-12-02T12:33:33 ***
[2026-12-02 12:33:33,466] [INFO] [launch.py:253:sigkill_handler] Killing subprocess 8015
[2026-12-02 12:33:33,479] [INFO] [launch.py:262:sigkill_handler] Main process received SIGTERM, exiting
srun: error: node1: task 0: Terminated
srun: Force Terminated StepId=11.0
"""


def test_deepspeed_two_nodes_the_rank_that_died_first(tmp_path):
    log = _log(tmp_path, DS_TWO_NODES)
    assert diagnose(log, failed_nodes(log)) == ("ValueError: boom", 1, None)
    assert failed_nodes(log) == ["node2"]


def test_a_peer_that_reports_first_does_not_hide_the_cause():
    # node1's rank noticed the closed connection before node2's traceback reached the log.
    lines = ["RuntimeError: [../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer",
             "Traceback (most recent call last):", '  File "x.py", line 1, in <module>',
             "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
             "torch.distributed.DistBackendError: NCCL communicator was aborted on rank 0"]
    assert error_line(lines) == "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert error_line(lines[:1]) == lines[0]                     # only the symptom: better than nothing


def test_chained_labelled_and_launcher_exceptions():
    lines = ["[rank1]: Traceback (most recent call last):", '[rank1]:   File "d.py", line 3, in load',
             "[rank1]: KeyError: 'Doctor'", "[rank1]: ",
             "[rank1]: During handling of the above exception, another exception occurred:",
             "[rank1]: Traceback (most recent call last):", '[rank1]:   File "d.py", line 5, in load',
             "[rank1]: ValueError: column 'Doctor' is missing",
             "Traceback (most recent call last):",
             "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ",
             "subprocess.CalledProcessError: Command '['python']' returned non-zero exit status 1."]
    assert error_line(lines) == "ValueError: column 'Doctor' is missing"
    assert error_line(["ValueError: KeyError: x"]) == "ValueError: KeyError: x"   # not a label
    assert error_line(["[hpcjobs.finetune] error: the launcher started 3 ranks but this job was planned for 2",
                       "srun: error: node1: task 0: Exited with exit code 2"]) == \
        "[hpcjobs.finetune] error: the launcher started 3 ranks but this job was planned for 2"
    assert error_line(["srun: error: node2: task 1: Exited with exit code 1", "Exception ignored in: <f>",
                       "slurmstepd: error: *** STEP 3.0 ON node1 CANCELLED ***", "about to fail"]) is None


def test_exit_codes_from_each_launcher():
    elastic = """\
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
hpcjobs.train.finetune FAILED
------------------------------------------------------------
Failures:
[1]:
  time      : 2026-12-02_12:40:01
  host      : node2
  rank      : 2 (local_rank: 1)
  exitcode  : -15 (pid: 4242)
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-12-02_12:40:00
  host      : node2
  rank      : 1 (local_rank: 0)
  exitcode  : 3 (pid: 4241)
  error_file: <N/A>
============================================================
srun: error: node2: task 1: Exited with exit code 1""".splitlines()
    assert rank_exit(elastic, ["node2"]) == (3, None)
    killed = ["[ERROR] [launch.py:259:sigkill_handler] ['python', '-u'] exits with return code = -9",
              "srun: error: node2: task 1: Exited with exit code 247"]
    assert rank_exit(killed, ["node2"]) == (137, 9)
    srun_only = ["srun: error: node1: task 0: Exited with exit code 1",
                 "srun: error: node2: task 1: Exited with exit code 7", "srun: error: node3: task 2: Terminated"]
    assert rank_exit(srun_only, ["node2"]) == (7, None)
    assert rank_exit(srun_only, []) == (1, None)
    assert rank_exit(["about to fail"], []) == (None, None)


def test_a_requeued_job_is_diagnosed_from_its_latest_run(tmp_path):
    text = ("hpcjobs: chain c stage finetune attempt 1 job 9 on node1 (nodes: node1), restart 0\n"
            "ValueError: from the first run\n"
            "hpcjobs: chain c stage finetune attempt 1 job 9 on node1 (nodes: node1), restart 1\n"
            "[ERROR] [launch.py:259:sigkill_handler] [...] exits with return code = 2\n"
            "OSError: [Errno 28] No space left on device\n")
    assert _current_run(text)[1:] == ["[ERROR] [launch.py:259:sigkill_handler] [...] exits with return code = 2",
                                      "OSError: [Errno 28] No space left on device"]
    assert diagnose(_log(tmp_path, text), []) == ("OSError: [Errno 28] No space left on device", 2, None)


class _PeerTerminated:
    """Accounting for a 2-node stage that ended the way the DeepSpeed run above did: FAILED, 15."""

    def __init__(self, conf=None):
        pass

    def squeue(self, ids):
        return {}

    def sacct(self, ids, *, starttime):
        return {"11": [AcctInfo("11", "c1.finetune", "FAILED", 15, 0, "00:00:14", "node[1-2]",
                                "2026-11-23T10:00:01", "2026-11-23T10:00:15")]}


def test_status_shows_the_failing_ranks_error_and_exit_code(tmp_path, capsys):
    rec = ChainRecord("c1", "c", "r", "r.yaml", "local", None, str(tmp_path), "2026-11-23T10:00:00Z", [],
                      [StageRecord("finetune", "finetune", [], [Attempt(1, job_id="11")])], submission="submitted")
    adir = rec.attempt_dir("finetune", 1)
    adir.mkdir(parents=True)
    (adir / "slurm-11.out").write_text(DS_TWO_NODES)
    (cs,) = collect([rec], _PeerTerminated)
    s = cs.stages[0]
    assert (s.state, s.exit_code, s.failed_nodes) == ("FAILED", 15, ["node2"])
    data = cs.to_json()["stages"][0]
    assert (data["error_line"], data["rank_exit_code"], data["rank_signal"]) == ("ValueError: boom", 1, None)
    display.chain_status(cs)
    out = capsys.readouterr().out.splitlines()
    row = next(line for line in out if line.startswith("finetune "))
    assert row.split()[:7] == ["finetune", "11", "1", "FAILED", "00:00:14", "node[1-2]", "1"]
    head = next(i for i, line in enumerate(out) if line.startswith("finetune FAILED"))
    assert "exit code 1 (the failing rank's; the job's: 15)" in out[head]
    assert "a task failed on node2" in out[head]
    assert out[head + 1] == "  error: ValueError: boom"                    # above the tail
    assert out[head + 2].startswith("  | ")
