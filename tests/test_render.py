"""Rendered scripts: expected content for `local` and `a800`, valid bash, values always quoted.

Golden files live in tests/golden/; machine-specific paths are replaced by
placeholders before comparing. Regenerate with HPCJOBS_UPDATE_GOLDEN=1 after an
intended change, and read the diff.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FIXTURES, REPO

from hpcjobs import config, paths, plan, render

GOLDEN = Path(__file__).resolve().parent / "golden"
NOW = dt.datetime(2026, 11, 23, 12, 0, 0, tzinfo=dt.timezone.utc)


def _render(profile, overrides, run_dir, **kw):
    c = config.compose("llama2-lora", profile, overrides=overrides, **kw)
    p = plan.build(c, chain_id="llama2-lora-20261123-120000-abcd", run_dir=run_dir, now=NOW)
    return render.render(p)


def _normalize(text: str, run_dir: Path) -> str:
    for real, placeholder in ((str(run_dir), "{RUN_DIR}"), (sys.executable, "{PYTHON}"),
                              (str(paths.cache_dir()), "{CACHE}"), (str(REPO), "{REPO}"),
                              (os.environ["HPCJOBS_DEVCLUSTER"], "{DEVCLUSTER}"),
                              (f"/torch_extensions/{paths.python_env_id()}", "/torch_extensions/{PYENV}")):
        text = text.replace(real, placeholder)
    return text


CASES = {
    "a800": ("a800", ["model.source=/public/llama/llama-2-7b", "data.path=/public/data/dialogues.parquet",
                      "finetune.lr=2e-4"], {"cli": {"run.nodes": 2}, "cli_text": ["--nodes 2"]}),
    "local": ("local", ["model.source=/tmp/demo/llama-2-tiny", "data.path=/tmp/demo/dialogues.parquet"],
              {"cli": {"run.nodes": 2}, "cli_text": ["--nodes 2"]}),
    "local-include": ("local", ["model.source=/tmp/demo/llama-2-tiny", "data.path=/tmp/demo/dialogues.parquet"],
                      {"launch": {"include": "node1:0,1@node2:0"}, "cli_text": ["--include node1:0,1@node2:0"]}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_rendered_scripts_match_golden(case, tmp_path):
    profile, overrides, kw = CASES[case]
    run_dir = tmp_path / "run"
    rendered = _render(profile, overrides, run_dir, **kw)
    got = {}
    for st in rendered.stages:
        for name, text in st.files.items():
            if name in ("job.sbatch", "ds_config.json", "train.json") or case == "a800":
                got[f"{st.name}.{name}"] = _normalize(text, run_dir)
    update = os.environ.get("HPCJOBS_UPDATE_GOLDEN")
    for key, text in got.items():
        golden = GOLDEN / case / key
        if update:
            golden.parent.mkdir(parents=True, exist_ok=True)
            golden.write_text(text)
        assert golden.exists(), f"missing golden {golden} (HPCJOBS_UPDATE_GOLDEN=1 writes it)"
        assert text == golden.read_text(), f"{key} differs from {golden}"


def test_a800_finetune_reads_like_a_hand_written_one(tmp_path):
    profile, overrides, kw = CASES["a800"]
    rendered = _render(profile, overrides, tmp_path / "run", **kw)
    ft = next(s for s in rendered.stages if s.name == "finetune")
    script = ft.script
    assert script.startswith("#!/bin/bash\n# hpcjobs")
    assert "# recipe: llama2-lora" in script and "# profile: a800" in script
    assert "# overrides: --nodes 2 model.source=" in script and "finetune.lr=2e-4" in script
    for line in ("#SBATCH --partition=ai", "#SBATCH --nodes=2", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --ntasks-per-node=1", "#SBATCH --cpus-per-task=56", "#SBATCH --signal=B:USR2@300",
                 "module load CUDA/12.2", "export NCCL_IB_HCA=mlx5", "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1",
                 'scontrol show hostnames "$SLURM_JOB_NODELIST"', "--ntasks-per-node=1",
                 'export MASTER_PORT=$(( 20000 + SLURM_JOB_ID % 20000 ))'):
        assert line in script, line
    ds = json.loads(ft.files["ds_config.json"])
    assert ds["train_batch_size"] == 256 and ds["zero_optimization"]["stage"] == 2
    train = json.loads(ft.files["train.json"])
    assert train["world_size"] == 16 and train["train"]["learning_rate"] == 2e-4
    assert train["train"]["precision"] == "bf16" and train["device"] == "cuda"


def test_every_script_is_valid_bash(tmp_path):
    for case, (profile, overrides, kw) in CASES.items():
        rendered = _render(profile, overrides, tmp_path / case, **kw)
        for st in rendered.stages:
            proc = subprocess.run(["bash", "-n"], input=st.script, text=True, capture_output=True)
            assert proc.returncode == 0, f"{case}/{st.name}: {proc.stderr}"


HOSTILE = "a'b \"c\" $(touch PWNED) `touch PWNED2` ; rm -rf nothing & $HOME \\ *"


def test_hostile_values_stay_values(tmp_path, monkeypatch):
    """A value with quotes, $(), backticks, ; and globs reaches the job as exactly that string."""
    work = tmp_path / "work"
    work.mkdir()
    prof = tmp_path / "hostile.yaml"
    prof.write_text(json.dumps({"name": "hostile", "accelerator": "cpu", "gpus_per_node": 0,
                                "cpus_per_node": 1, "env": {"WEIRD": HOSTILE}, "python": sys.executable}))
    recipe = tmp_path / "r.yaml"
    recipe.write_text('pipeline:\n  only: {kind: command}\nonly:\n  command: printf "%s" "$WEIRD" > value\n')
    c = config.compose(str(recipe), str(prof))
    run_dir = tmp_path / "run dir with space; $(touch PWNED3)"
    p = plan.build(c, chain_id="hostile", run_dir=run_dir)
    rendered = render.render(p)
    render.write_tree(rendered, run_dir)
    st = rendered.stages[0]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
    proc = subprocess.run(["bash", str(st.script_path)], cwd=work, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (work / "value").read_text() == HOSTILE
    assert not list(work.glob("PWNED*")) and not list(tmp_path.glob("PWNED*"))
    marker = json.loads((st.attempt_dir / "marker.json").read_text())
    assert marker["exit_code"] == 0 and marker["stage"] == "only"


def test_render_out_writes_a_run_directory(hpcjobs, tmp_path):
    out = tmp_path / "myrun"
    proc = hpcjobs("render", "llama2-lora", "--nodes", "2", "--profile", "a800", "--out", out,
                   "model.source=/m", "data.path=/d.parquet")
    assert "submit.sh" in proc.stdout
    for stage in ("convert", "finetune", "merge", "evaluate"):
        assert (out / "stages" / stage / "attempt-1" / "job.sbatch").is_file()
    assert (out / "config.yaml").is_file()
    submit_sh = (out / "submit.sh").read_text()
    assert "--dependency=afterok:${JOB_convert}" in submit_sh
    assert not (out / "chain.json").exists()  # rendering is not submitting
    subprocess.run(["bash", "-n", str(out / "submit.sh")], check=True)


def test_files_respect_umask(tmp_path):
    old = os.umask(0o077)
    try:
        profile, overrides, kw = CASES["local"]
        rendered = _render(profile, overrides, tmp_path / "run", **kw)
        for path in render.write_tree(rendered, tmp_path / "run"):
            assert path.stat().st_mode & 0o077 == 0, path
    finally:
        os.umask(old)


def test_render_touches_no_slurm_command(hpcjobs, tmp_path):
    """render works with no Slurm commands on PATH at all."""
    env = dict(os.environ, PATH=str(Path(sys.executable).parent) + ":/usr/bin:/bin")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for cmd in ("sbatch", "squeue", "sacct", "scontrol", "sinfo", "scancel"):
        tool = bindir / cmd
        tool.write_text(f"#!/bin/sh\necho {cmd} was called >> {tmp_path}/called\nexit 1\n")
        tool.chmod(0o755)
    env["PATH"] = f"{bindir}:{env['PATH']}"
    from conftest import CLI

    CLI(env)("render", "llama2-lora", "--profile", "a800", "model.source=/m", "data.path=/d")
    assert not (tmp_path / "called").exists()


def test_three_stage_recipe_renders(hpcjobs):
    proc = hpcjobs("render", FIXTURES / "three-stage.yaml", "--profile", "local")
    assert proc.stdout.count("#!/bin/bash") == 3
