"""Test set-up: an isolated hpcjobs config/state per session, and the real devcluster.

The devcluster lives in ``$HPCJOBS_DEVCLUSTER`` (default ``<repo>/.devcluster``);
the session starts it if it is not up and stops it at the end only if it
started it. Tests marked ``cluster`` use it; nothing here mocks Slurm.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"

os.environ.setdefault("HPCJOBS_DEVCLUSTER", str(REPO / ".devcluster"))


@pytest.fixture(scope="session")
def hpcjobs_home(tmp_path_factory):
    """HPCJOBS_CONFIG_DIR / HPCJOBS_STATE_DIR for the session, runs under a temp root."""
    home = tmp_path_factory.mktemp("hpcjobs-home")
    (home / "config").mkdir()
    (home / "state").mkdir()
    runs = home / "runs"
    (home / "config" / "config.yaml").write_text(f"run:\n  root: {runs}\n")
    os.environ["HPCJOBS_CONFIG_DIR"] = str(home / "config")
    os.environ["HPCJOBS_STATE_DIR"] = str(home / "state")
    os.environ.pop("HPCJOBS_PROFILE", None)
    return home


@pytest.fixture(autouse=True)
def _isolated(hpcjobs_home):
    yield


@pytest.fixture(scope="session")
def devcluster(hpcjobs_home):
    from hpcjobs.devcluster import DevCluster

    dc = DevCluster()
    was_up = dc.status().get("ready")
    dc.up()
    yield dc
    if not was_up and not os.environ.get("HPCJOBS_KEEP_DEVCLUSTER"):
        dc.down()


class CLI:
    """Runs the real `hpcjobs` command (python -m hpcjobs) in a subprocess."""

    def __init__(self, env=None):
        self.env = env

    def __call__(self, *args, check=True, timeout=120, input=None):
        proc = subprocess.run([sys.executable, "-m", "hpcjobs", *map(str, args)], capture_output=True,
                              text=True, timeout=timeout, env=self.env or dict(os.environ), input=input)
        if check and proc.returncode != 0:
            raise AssertionError(f"hpcjobs {' '.join(map(str, args))} failed ({proc.returncode}):\n"
                                 f"{proc.stdout}\n{proc.stderr}")
        return proc

    def json(self, *args, **kw):
        return json.loads(self(*args, "--json", **kw).stdout)


@pytest.fixture
def hpcjobs():
    return CLI()


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory, hpcjobs_home):
    """The tiny Meta checkpoint, dialogue parquet, prompts and demo.yaml (`hpcjobs demo-assets`)."""
    out = tmp_path_factory.mktemp("demo")
    CLI()("demo-assets", out)
    return out


def wait_for(predicate, timeout=120, interval=0.5, what="condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")


def chain_state(cli, chain):
    return cli.json("status", chain)


def wait_chain(cli, chain, done=("COMPLETED", "FAILED", "CANCELLED", "SUBMIT_FAILED"), timeout=600):
    return wait_for(lambda: (s := chain_state(cli, chain))["state"] in done and s, timeout=timeout,
                    interval=1, what=f"chain {chain} to reach one of {done}")


def pytest_sessionfinish(session, exitstatus):
    """In CI (``HPCJOBS_FAIL_ON_SKIP=1``, set by .ci/run) a skipped test is a failure:
    a test that skips does not run, so what it checks would go unchecked."""
    if not os.environ.get("HPCJOBS_FAIL_ON_SKIP"):
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if skipped and session.exitstatus == 0:
        reporter.write_line(f"HPCJOBS_FAIL_ON_SKIP: {len(skipped)} test(s) skipped; install what they need "
                            "instead", red=True)
        for rep in skipped:
            reporter.write_line(f"  skipped: {rep.nodeid}")
        session.exitstatus = 1
