"""A 2-node DeepSpeed launch failing on one rank, on the real devcluster: `status` names that
rank's exception and exit code (not the SIGTERM srun then sends node1), and piped output keeps
the long chain id, reason and paths whole.

The stage is a command stage that starts one DeepSpeed launcher per node the way the finetune
template does (`srun --kill-on-bad-exit=1 python -m hpcjobs.launch node -- ...`), running a tiny
module instead of training, so it takes seconds rather than minutes.
"""

from __future__ import annotations

import pytest

from conftest import wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.train]   # train: the ranks run under DeepSpeed's launcher

NAME = "a-chain-name-long-enough-to-overflow-eighty-columns-of-a-termina"   # 64 characters
FAILING = "rank_one_on_the_second_node_raises_a_value_error"

RANK = """\
import os, time
rank = int(os.environ["RANK"])
print(f"rank={rank} hostname={os.uname().nodename} pid={os.getpid()}", flush=True)
if rank == 1:
    time.sleep(1)
    raise ValueError("boom on rank 1")
time.sleep(120)
"""

RECIPE = f"""\
recipe:
  description: a 2-node DeepSpeed launch whose rank 1 on node2 raises (tests)
pipeline:
  {FAILING}: {{kind: command}}
  after_it: {{kind: command, after: [{FAILING}]}}
{FAILING}:
  nodes: 2
  command: |
    printf 'node1 slots=1\\nnode2 slots=1\\n' > "$HPCJOBS_ATTEMPT_DIR/hostfile"
    export PYTHONPATH=@MODDIR@
    srun --nodes=2 --ntasks-per-node=1 --kill-on-bad-exit=1 "\\${{PYTHON_CMD[@]}}" -m hpcjobs.launch node -- \\
      --hostfile="$HPCJOBS_ATTEMPT_DIR/hostfile" --master_addr=node1 \\
      --master_port=$(( 20000 + SLURM_JOB_ID % 20000 )) --module boom_rank
after_it:
  command: |
    true
"""


def test_two_node_rank_failure_is_diagnosed(devcluster, hpcjobs, tmp_path):
    (tmp_path / "boom_rank.py").write_text(RANK)
    recipe = tmp_path / "ds-boom.yaml"
    recipe.write_text(RECIPE.replace("@MODDIR@", str(tmp_path)))
    sub = hpcjobs.json("submit", recipe, "--profile", "local", "--name", NAME)
    try:
        final = wait_for(lambda: (s := hpcjobs.json("status", sub["chain"]))["stages"][1]["blocked_by"] and s,
                         timeout=120, interval=1, what="the failed stage and the blocked one")
        failed = final["stages"][0]
        assert failed["state"] == "FAILED", failed
        assert failed["failed_nodes"] == ["node2"]
        assert failed["error_line"] == "ValueError: boom on rank 1"
        assert failed["rank_exit_code"] == 1 and failed["rank_signal"] is None

        out = hpcjobs("status", sub["chain"]).stdout          # captured: a pipe, not a terminal
        assert "…" not in out
        lines = out.splitlines()
        assert lines[0].split()[:3] == ["chain", sub["chain"], "FAILED"]
        assert f"run directory {sub['run_dir']}" in lines
        row = next(line for line in lines if line.startswith(f"{FAILING} "))
        assert row.split()[6] == "1"                            # the rank's exit code, not 15
        blocked = next(line for line in lines if line.startswith("after_it "))
        assert blocked.endswith(f"blocked: upstream {FAILING} failed (DependencyNeverSatisfied)")
        head = next(i for i, line in enumerate(lines) if line.startswith(f"{FAILING} FAILED"))
        assert "exit code 1" in lines[head] and "a task failed on node2" in lines[head]
        assert lines[head].endswith(f"; log {failed['log']}")
        assert lines[head + 1] == "  error: ValueError: boom on rank 1"

        listed = hpcjobs("list").stdout
        assert any(line.split()[:2] == [sub["chain"], "FAILED"] for line in listed.splitlines()), listed
    finally:
        hpcjobs("cancel", sub["chain"], check=False)
