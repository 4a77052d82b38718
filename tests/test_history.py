"""`hpcjobs list` stays fast as history grows: final chains come from a cache in the state
directory (invalidated when chain.json changes), recent chains show by default, and Slurm is
asked only about unfinished chains, with one squeue and one sacct call whose window starts at
the oldest of them. Calls are counted by wrapping hpcjobs.slurm.Slurm in-process, against the
real devcluster."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import wait_chain, wait_for

pytestmark = pytest.mark.cluster


def _recipe(path: Path, command: str) -> Path:
    path.write_text("recipe: {description: history test}\n"
                    "pipeline:\n  only: {kind: command}\n"
                    f"only:\n  command: {json.dumps(command)}\n")
    return path


@pytest.fixture
def slurm_calls(monkeypatch):
    """Every Slurm command run in this process: (argv[0], argv)."""
    from hpcjobs.slurm import Slurm

    calls = []
    real = Slurm.run

    def counted(self, args, *a, **kw):
        calls.append((args[0], list(args)))
        return real(self, args, *a, **kw)

    monkeypatch.setattr(Slurm, "run", counted)
    return calls


def _opt(argv, name):
    return next(a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}="))


def test_final_chains_are_cached_and_slurm_is_asked_about_live_ones_only(devcluster, hpcjobs, tmp_path,
                                                                         slurm_calls):
    from hpcjobs import records, status

    done = hpcjobs.json("submit", _recipe(tmp_path / "quick.yaml", "true"), "--name", "hist-done")
    assert wait_chain(hpcjobs, done["chain"], timeout=120)["state"] == "COMPLETED"
    live = hpcjobs.json("submit", _recipe(tmp_path / "slow.yaml", "sleep 300"), "--name", "hist-live")
    try:
        first = status.history(show_all=True)
        by_id = {cs.record.chain_id: cs for cs in first.statuses}
        assert by_id[done["chain"]].state == "COMPLETED"
        assert records.final_get(done["chain"], done["run_dir"]) is not None       # now cached
        assert records.final_get(live["chain"], live["run_dir"]) is None           # unfinished: never

        slurm_calls.clear()
        second = status.history(show_all=True)
        names = sorted(c[0] for c in slurm_calls)
        assert names == ["sacct", "squeue"], slurm_calls                           # one of each
        by_id = {cs.record.chain_id: cs for cs in second.statuses}
        assert by_id[done["chain"]].state == "COMPLETED"                          # from the cache
        assert [s.state for s in by_id[done["chain"]].stages] == ["COMPLETED"]
        assert done["chain"] not in second.collected and live["chain"] in second.collected
        sacct = next(argv for name, argv in slurm_calls if name == "sacct")
        jobs = _opt(sacct, "jobs").split(",")
        assert done["jobs"]["only"] not in jobs and live["jobs"]["only"] in jobs
        # the window starts at the oldest unfinished chain, not at the oldest chain
        oldest_live = min(by_id[c].record.created for c in second.collected)
        assert _opt(sacct, "starttime") == status._local_time(oldest_live)

        # chain.json changes (a rerun, a cancel, a hand edit): the entry no longer counts
        rec = Path(done["run_dir"]) / "chain.json"
        st = rec.stat()
        os.utime(rec, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
        assert records.final_get(done["chain"], done["run_dir"]) is None
        slurm_calls.clear()
        third = status.history(show_all=True)
        assert done["chain"] in third.collected
        sacct = next(argv for name, argv in slurm_calls if name == "sacct")
        assert done["jobs"]["only"] in _opt(sacct, "jobs").split(",")
        assert records.final_get(done["chain"], done["run_dir"]) is not None       # cached again

        # a damaged cache entry is ignored (the cache is never the source of truth)
        (records.final_dir() / f"{done['chain']}.json").write_text("{not json")
        again = {cs.record.chain_id: cs for cs in status.history(show_all=True).statuses}
        assert again[done["chain"]].state == "COMPLETED"

        # recent by default: a final chain older than the window is hidden, a live one never
        later = status.history(since="2999-01-01T00:00:00Z")
        shown = {cs.record.chain_id for cs in later.statuses}
        assert done["chain"] not in shown and live["chain"] in shown and later.hidden >= 1

        listed = [c["chain"] for c in hpcjobs.json("list")]                         # default: last 7 days
        assert done["chain"] in listed and live["chain"] in listed
        assert done["chain"] in [c["chain"] for c in hpcjobs.json("list", "--all")]
        assert done["chain"] not in [c["chain"] for c in hpcjobs.json("list", "--since", "2999-01-01")]
        assert done["chain"] in [c["chain"] for c in hpcjobs.json("list", "--since", "1d")]
        bad = hpcjobs("list", "--since", "yesterday", check=False)
        assert bad.returncode == 2 and "--since" in bad.stderr
    finally:
        hpcjobs("cancel", live["chain"], check=False)
    wait_for(lambda: hpcjobs.json("status", live["chain"])["state"] == "CANCELLED", timeout=60,
             what="the live chain to be cancelled")
