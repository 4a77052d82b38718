#!/usr/bin/env python3
"""How fast the login-node commands are. Prints a Markdown table (median of N runs).

    python bench/bench_login_path.py            # --help, render, plan+render in-process
    python bench/bench_login_path.py --status   # also `status`/`list` against the devcluster

Wall times of whole commands include the Python interpreter's start (about 20 ms
here); "in-process" rows time the library call alone. Numbers depend on the
machine: compare runs on the same one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

RENDER = ["render", "llama2-lora", "--profile", "a800", "--nodes", "2",
          "model.source=/m", "data.path=/d.parquet"]


def _median(fn, n):
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), min(times)


def _cli(*args):
    subprocess.run([sys.executable, "-m", "hpcjobs", *args], check=True, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=10, help="runs per measurement")
    parser.add_argument("--status", action="store_true", help="also time status/list on the devcluster")
    args = parser.parse_args()
    home = tempfile.mkdtemp(prefix="hpcjobs-bench-")
    os.environ.setdefault("HPCJOBS_CONFIG_DIR", f"{home}/config")
    os.environ.setdefault("HPCJOBS_STATE_DIR", f"{home}/state")

    rows = []
    rows.append(("`hpcjobs --help`", *_median(lambda: _cli("--help"), args.n)))
    rows.append(("`hpcjobs render llama2-lora --nodes 2 --profile a800`", *_median(lambda: _cli(*RENDER), args.n)))

    from hpcjobs import config, plan, render

    def in_process():
        c = config.compose("llama2-lora", "a800", overrides=["model.source=/m", "data.path=/d"],
                           cli={"run.nodes": 2})
        render.render(plan.build(c))

    in_process()
    rows.append(("compose + plan + render, in-process (4 stages)", *_median(in_process, args.n * 5)))

    if args.status:
        from hpcjobs import records, status

        recs = records.all_records()
        if recs:
            stages = sum(len(r.stages) for r in recs)
            rows.append((f"status refresh, in-process ({len(recs)} chains, {stages} stages: 1 squeue + 1 sacct)",
                         *_median(lambda: status.collect(recs), args.n)))
            rows.append(("`hpcjobs list`", *_median(lambda: _cli("list"), args.n)))

    print(f"| what | median | best |\n|---|---|---|")
    for what, med, best in rows:
        print(f"| {what} | {med * 1000:.0f} ms | {best * 1000:.0f} ms |")


if __name__ == "__main__":
    main()
