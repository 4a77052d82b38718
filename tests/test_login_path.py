"""The login-node path stays light: no torch, deepspeed, transformers, peft, trl or datasets."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest


HEAVY = ("torch", "deepspeed", "transformers", "peft", "trl", "datasets", "accelerate")


def _imported(*args):
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "hpcjobs", *map(str, args)],
                          capture_output=True, text=True, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {m.group(1).split(".")[0] for m in re.finditer(r"\|\s+(\S+)$", proc.stderr, re.M)}


@pytest.mark.parametrize("args", [
    ["--help"],
    ["submit", "--help"],
    ["profiles"],
    ["render", "llama2-lora", "--profile", "a800", "--nodes", "2", "model.source=/m", "data.path=/d"],
    ["kinds"],
    ["run", os.path.join(os.path.dirname(__file__), "fixtures", "scripts", "hf_trainer.py"), "--profile", "a800",
     "--nodes", "2", "--launcher", "accelerate", "--deepspeed", "zero3", "--hf-trainer", "--dry-run"],
])
def test_commands_import_nothing_heavy(args):
    mods = _imported(*args)
    assert "hpcjobs" in mods and "click" in mods
    assert not mods & set(HEAVY), mods & set(HEAVY)


@pytest.mark.cluster
def test_submit_and_status_import_nothing_heavy(devcluster, hpcjobs, demo_assets):
    mods = _imported("submit", "llama2-lora", "--profile", "local", "--nodes", "2", "--name", "light",
                     "--config", demo_assets / "demo.yaml", "--json")
    assert "pyarrow" in mods                      # the dataset check reads parquet metadata
    assert not mods & set(HEAVY), mods & set(HEAVY)
    for args in (["status", "light"], ["list"], ["status", "light", "--json"]):
        mods = _imported(*args)
        assert not mods & set(HEAVY), (args, mods & set(HEAVY))
    hpcjobs("cancel", "light")
