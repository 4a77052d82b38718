#!/usr/bin/env python3
"""How `hpcjobs list` scales with history: 1,000 chains of which 10 are live, against 10 live
chains alone. Records are written directly (no jobs run): live chains have job ids Slurm does
not know (UNKNOWN, so asked every time), finished ones a stage marker with exit code 0 (final
once accounting answered, then served from the cache). Most of the history is older than the
default window (7 days), as on a cluster used for months.

    python bench/bench_list.py [--runs 10] [--chains 1000] [--live 10]

Needs the devcluster up (`hpcjobs devcluster up`): the Slurm calls are real. Times the
in-process `list` path (hpcjobs.status.history + JSON), median of --runs after one warm-up
run that fills the cache. Goal: ratio <= 1.5.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _write(state: Path, runs: Path, n: int, live: int) -> None:
    os.environ["HPCJOBS_STATE_DIR"] = str(state)
    from hpcjobs import records
    from hpcjobs.records import Attempt, ChainRecord, StageRecord

    now = dt.datetime.now(dt.timezone.utc)
    for i in range(n):
        is_live = i >= n - live
        age = dt.timedelta(minutes=5) if is_live or i >= n - 3 * live else dt.timedelta(days=30 + i // 10)
        created = (now - age).strftime("%Y-%m-%dT%H:%M:%SZ")
        chain_id = f"bench-{i:05d}"
        run_dir = runs / chain_id
        stages = []
        for k, name in enumerate(("convert", "finetune", "merge", "evaluate")):
            job = str(900000 + i * 4 + k)
            stages.append(StageRecord(name, "command", [stages[-1].name] if stages else [], [Attempt(1, job_id=job)]))
            adir = run_dir / "stages" / name / "attempt-1"
            adir.mkdir(parents=True)
            if not is_live:
                (adir / "marker.json").write_text(json.dumps({"job_id": job, "exit_code": 0, "host": "node1",
                                                              "time": created}))
        rec = ChainRecord(chain_id, "bench", "llama2-lora", "/r/llama2-lora.yaml", "local", None, str(run_dir),
                          created, [], stages, submission="submitted")
        rec.save()
        records.index_add(rec)


def _time_list(runs: int) -> float:
    from hpcjobs import status

    def once():
        hist = status.history()
        json.dumps([cs.to_json() for cs in hist.statuses])
        return hist

    once()   # warm-up: fills the cache
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        once()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--chains", type=int, default=1000)
    ap.add_argument("--live", type=int, default=10)
    args = ap.parse_args()
    os.environ.setdefault("HPCJOBS_DEVCLUSTER", str(REPO / ".devcluster"))   # as tests/conftest.py
    from hpcjobs.devcluster import DevCluster

    os.environ.update(DevCluster().env())
    results = {}
    for n in (args.live, args.chains):
        with tempfile.TemporaryDirectory(prefix="hpcjobs-bench-list-") as tmp:
            state, runs = Path(tmp) / "state", Path(tmp) / "runs"
            state.mkdir()
            runs.mkdir()
            _write(state, runs, n, args.live)
            results[n] = _time_list(args.runs)
    small, big = results[args.live], results[args.chains]
    print(f"| chains (live) | `list`, median of {args.runs} |")
    print("|---|---|")
    print(f"| {args.live} ({args.live}) | {small * 1000:.0f} ms |")
    print(f"| {args.chains} ({args.live}) | {big * 1000:.0f} ms |")
    print(f"\nratio {big / small:.2f}x (goal <= 1.5x)")
    return 0 if big / small <= 1.5 else 1


if __name__ == "__main__":
    sys.exit(main())
