"""The memory planner decides before submission: `auto` values, the verdict in render/submit,
the refusal of a stage that cannot fit, and `--force` (recorded in the chain).

The search is checked on hand-checkable cases: capacities put between the predicted peaks of two
neighbouring setups, so the expected pick follows from the order alone.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess

import pytest

from hpcjobs import config, plan
from hpcjobs.errors import ConfigError
from hpcjobs.memplan import report, search
from hpcjobs.memplan.estimate import GiB, TrainSetup, plan_memory
from hpcjobs.memplan.params import model_shape
from hpcjobs.memplan.search import Limits

LLAMA2_7B_PARAMS = {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05,
                    "vocab_size": 32000}
AUTO4 = ["finetune.micro_batch_size=auto", "finetune.zero_stage=auto", "finetune.gradient_checkpointing=auto",
         "finetune.offload_optimizer=auto"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A Meta Llama-2-7B directory (the real params.json, empty weights) and a tiny dialogue parquet."""
    from tinymodels import make_dialogue_parquet

    d = tmp_path_factory.mktemp("memauto")
    model = d / "llama-2-7b"
    model.mkdir()
    (model / "params.json").write_text(json.dumps({**LLAMA2_7B_PARAMS, "vocab_size": -1}))
    (model / "consolidated.00.pth").write_bytes(b"")
    (model / "tokenizer.model").write_bytes(b"")
    return model, make_dialogue_parquet(d / "d.parquet", n=8)


def _setup(**kw) -> TrainSetup:
    shape = model_shape(LLAMA2_7B_PARAMS)
    base = dict(shape=shape, world_size=8, ranks_per_node=8, micro_batch=4, seq_len=512, precision="bf16",
                zero_stage=0, gradient_checkpointing=False, lora_r=None)   # a full finetune
    base.update(kw)
    return TrainSetup(**base)


def _peak(t: TrainSetup, **values) -> int:
    return plan_memory(search.with_values(t, values)).gpu_peak


# ---------------------------------------------------------------- the search, by hand

def test_full_finetune_7b_zero0_does_not_fit_an_a100():
    """16 bytes of model states per parameter (+ 4 of fp32 gradients) unpartitioned: 20 x 6.74e9."""
    t = _setup()
    p = plan_memory(t)
    states = p.gpu["weights"] + p.gpu["gradients"] + p.gpu["optimizer states"]
    assert states == pytest.approx(20 * 6_738_415_616, rel=1e-6)
    assert p.gpu_peak > 40 * GiB
    picks = search.nearest(t, Limits(40 * GiB, 4 * GiB))
    assert picks, "some setup fits 8 A100s"
    for pk in picks:   # every suggestion fits with the margin, and changes something
        assert pk.plan.gpu_peak + 4 * GiB <= 40 * GiB and pk.values
    # a smaller micro batch or checkpointing cannot shrink 125 GiB of model states: ZeRO must change
    assert all("zero_stage" in pk.values for pk in picks)


def test_everything_fits_gives_the_fastest_setup():
    pick = search.search(_setup(), search.KEYS, Limits(None))
    assert pick.values == {"gradient_checkpointing": False, "zero_stage": 1, "offload_optimizer": "none",
                           "micro_batch_size": search.MAX_MICRO_BATCH}
    assert pick.rejected == []


def test_zero_ladder_order_two_plus_offload_before_three():
    """ZeRO-1 -> 2 -> 2 + offload -> 3 -> 3 + offload, whatever each needs: the first that fits wins."""
    t = _setup(micro_batch=1)
    free = ["zero_stage", "offload_optimizer"]
    peaks = {rung: _peak(t, zero_stage=rung[0], offload_optimizer=rung[1]) for rung in search.LADDER}
    # 6.74e9 parameters over 8 ranks: ZeRO-2 + offload keeps only the 16-bit weights (2 bytes each) on
    # the GPU, less than ZeRO-1/2 keep; ZeRO-3 + offload the least of all
    assert peaks[(2, "cpu")] < min(peaks[(1, "none")], peaks[(2, "none")])
    assert peaks[(3, "cpu")] == min(peaks.values())
    for cap in sorted(set(peaks.values())):    # at each rung's own peak: the first rung in order that fits
        expected = next(rung for rung in search.LADDER if peaks[rung] <= cap)
        pick = search.search(t, free, Limits(cap))
        assert (pick.values["zero_stage"], pick.values["offload_optimizer"]) == expected, cap
    both = max(peaks[(2, "cpu")], peaks[(3, "none")])   # ZeRO-2 + offload and ZeRO-3 both fit
    pick = search.search(t, free, Limits(both))
    assert pick.values == {"zero_stage": 2, "offload_optimizer": "cpu"}
    assert [r.split(",")[0] for r in pick.rejected] == ["ZeRO-1", "ZeRO-2"]
    assert search.search(t, free, Limits(peaks[(3, "cpu")] - 1)) is None
    # zero_stage alone (offload fixed at none): 1 -> 2 -> 3
    assert search.search(t, ["zero_stage"], Limits(peaks[(1, "none")])).values == {"zero_stage": 1}
    assert search.search(t, ["zero_stage"], Limits(peaks[(3, "none")])).values == {
        "zero_stage": 1 if peaks[(1, "none")] <= peaks[(3, "none")] else
        2 if peaks[(2, "none")] <= peaks[(3, "none")] else 3}


def test_no_checkpointing_before_checkpointing():
    t = _setup(zero_stage=3, micro_batch=8)
    off, on = _peak(t, gradient_checkpointing=False), _peak(t, gradient_checkpointing=True)
    assert off > on
    assert search.search(t, ["gradient_checkpointing"], Limits(off)).values == {"gradient_checkpointing": False}
    assert search.search(t, ["gradient_checkpointing"], Limits(off - 1)).values == {"gradient_checkpointing": True}
    # checkpointing is the outer loop: off with ZeRO-3 + offload comes before on with ZeRO-1
    both = ["gradient_checkpointing", "zero_stage", "offload_optimizer"]
    z3off = _peak(t, gradient_checkpointing=False, zero_stage=3, offload_optimizer="cpu")
    pick = search.search(t, both, Limits(z3off))
    assert pick.values == {"gradient_checkpointing": False, "zero_stage": 3, "offload_optimizer": "cpu"}


def test_the_largest_micro_batch_that_fits_with_the_margin():
    t = _setup(zero_stage=3)
    p8, p16 = _peak(t, micro_batch_size=8), _peak(t, micro_batch_size=16)
    margin = 2 * GiB
    pick = search.search(t, ["micro_batch_size"], Limits(p16 + margin - 1, margin))
    assert pick.values == {"micro_batch_size": 8} and pick.plan.gpu_peak == p8
    assert search.search(t, ["micro_batch_size"], Limits(p16 + margin, margin)).values == {"micro_batch_size": 16}
    # host memory counts too: ZeRO-2 + offload puts 16 bytes per parameter in the node's memory (4 ranks
    # x a quarter each), more than the 4 x 2 bytes the ranks load the checkpoint with
    t2 = _setup(micro_batch=1, world_size=4, ranks_per_node=4)
    z2off = plan_memory(search.with_values(t2, {"zero_stage": 2, "offload_optimizer": "cpu"}))
    z3 = plan_memory(search.with_values(t2, {"zero_stage": 3, "offload_optimizer": "none"}))
    assert z3.host_peak < z2off.host_peak and z2off.gpu_peak < z3.gpu_peak
    pick = search.search(t2, ["zero_stage", "offload_optimizer"], Limits(z3.gpu_peak, 0, z2off.host_peak - 1))
    assert pick.values == {"zero_stage": 3, "offload_optimizer": "none"}


# ---------------------------------------------------------------- auto through plan/render

def _build(profile, *overrides, nodes=1):
    c = config.compose("llama2-lora", profile, overrides=list(overrides), cli={"run.nodes": nodes},
                       cli_text=[f"--nodes {nodes}"])
    return plan.build(c, chain_id="memauto")


def test_auto_picks_and_the_rendered_files_agree(hpcjobs, inputs, tmp_path):
    model, data = inputs
    out = tmp_path / "run"
    proc = hpcjobs("render", "llama2-lora", "--profile", "a100", "--nodes", "2", "--out", out,
                   f"model.source={model}", f"data.path={data}", *AUTO4, "finetune.max_seq_length=2048")
    adir = out / "stages" / "finetune" / "attempt-1"
    ds = json.loads((adir / "ds_config.json").read_text())
    train = json.loads((adir / "train.json").read_text())["train"]
    mem = json.loads((adir / "memory_plan.json").read_text())
    chosen = mem["auto"]["chosen"]
    # the same search, by hand: the 7B LoRA setup of this chain on 40 GiB with a 4 GiB margin
    p = _build("a100", f"model.source={model}", f"data.path={data}", "finetune.max_seq_length=2048", nodes=2)
    sp = p.stage("finetune")
    shape, _ = report.load_shape(p.chain, "finetune", sp.cfg.model)
    t = report.train_setup(p.chain, sp.cfg, shape, world=16, nodes=2, ds=None)
    expected = search.search(t, search.KEYS, Limits(40 * GiB, 4 * GiB, 1000 * GiB))
    assert chosen == expected.values
    assert ds["train_micro_batch_size_per_gpu"] == train["micro_batch_size"] == chosen["micro_batch_size"]
    assert ds["train_batch_size"] == chosen["micro_batch_size"] * 1 * 16
    assert ds["zero_optimization"]["stage"] == chosen["zero_stage"] == mem["setup"]["zero_stage"]
    assert ("offload_optimizer" in ds["zero_optimization"]) == (chosen["offload_optimizer"] == "cpu")
    assert train["gradient_checkpointing"] is chosen["gradient_checkpointing"]
    assert mem["setup"]["micro_batch"] == chosen["micro_batch_size"]
    assert mem["gpu"]["peak"] + mem["auto"]["margin"] <= 40 * GiB and mem["auto"]["margin"] == 4 * GiB
    # the verdict and the choice are printed; config.yaml records the chosen values
    assert "memory finetune: GPU peak per rank:" in proc.stdout and "of 40.00 GiB: fits" in proc.stdout
    assert f"auto chose gradient_checkpointing={str(chosen['gradient_checkpointing']).lower()}" in proc.stdout
    assert "margin 4.00 GiB" in proc.stdout
    assert f"micro_batch_size: {chosen['micro_batch_size']}" in (out / "config.yaml").read_text()


def test_render_json_has_the_verdict_and_margin_setting(hpcjobs, inputs):
    model, data = inputs
    j = hpcjobs.json("render", "llama2-lora", "--profile", "a800", "--nodes", "2", f"model.source={model}",
                     f"data.path={data}", "finetune.micro_batch_size=auto", "profile.gpu_mem_margin=30G")
    (m,) = j["memory"]
    assert m["stage"] == "finetune" and m["gpu"]["fits"] is True and m["auto"]["margin"] == 30 * GiB
    assert m["gpu"]["peak"] + 30 * GiB <= 80 * GiB
    ft = next(s for s in j["stages"] if s["name"] == "finetune")
    assert json.loads(ft["files"]["memory_plan.json"]) == m
    assert json.loads(ft["files"]["ds_config.json"])["train_micro_batch_size_per_gpu"] == \
        m["auto"]["chosen"]["micro_batch_size"]


def test_auto_errors_name_the_key(inputs, tmp_path, hpcjobs_home):
    model, data = inputs
    with pytest.raises(ConfigError) as e:    # no gpu_mem
        _build("a100", f"model.source={model}", f"data.path={data}", "profile.gpu_mem=null",
               "finetune.zero_stage=auto")
    assert e.value.key == "finetune.zero_stage" and "set profile.gpu_mem" in str(e.value)
    with pytest.raises(ConfigError) as e:    # no model configuration to read
        _build("a100", f"model.source={tmp_path}", f"data.path={data}", "finetune.micro_batch_size=auto")
    assert e.value.key == "finetune.micro_batch_size" and "model's configuration" in str(e.value)
    with pytest.raises(ConfigError) as e:
        _build("a100", f"model.source={model}", f"data.path={data}", "finetune.micro_batch_size=abc")
    assert e.value.key == "finetune.micro_batch_size" and "expects an integer, got 'abc'" in str(e.value)
    with pytest.raises(ConfigError) as e:
        _build("a100", f"model.source={model}", f"data.path={data}", "finetune.gradient_checkpointing=maybe")
    assert e.value.key == "finetune.gradient_checkpointing" and "expects true or false" in str(e.value)
    p = _build("a100", f"model.source={model}", f"data.path={data}", "finetune.micro_batch_size=8",
               "finetune.gradient_checkpointing=no", "finetune.zero_stage=3")
    s = p.stage("finetune").cfg
    assert (s.micro_batch_size, s.gradient_checkpointing, s.zero_stage) == (8, False, 3)


def test_a_cpu_profile_refuses_nothing(inputs):
    """The devcluster's fake GPUs have a stand-in gpu_mem: the verdict is shown, never enforced."""
    model, data = inputs
    p = _build("local", f"model.source={model}", f"data.path={data}")
    (sm,) = report.plan_chain(p)
    assert sm.gpu_fits is False and not sm.refused
    assert any("not enforced" in n for n in sm.notes)


# ---------------------------------------------------------------- submit: refusal and --force

def _jobs_named(devcluster, prefix):
    """{job id: state} of the Slurm jobs whose name starts with ``prefix``."""
    out = subprocess.run(["squeue", "--noheader", "--states=all", "--format=%i %j %T"],
                         env={**os.environ, **devcluster.env()}, capture_output=True, text=True, check=True).stdout
    return {f[0]: f[2] for f in (line.split() for line in out.splitlines()) if f[1].startswith(prefix)}


# 7B LoRA at ZeRO-0, 16 x 512 tokens a rank without checkpointing: 34 GiB of activations alone
REFUSED = ["finetune.zero_stage=0", "finetune.gradient_checkpointing=false", "finetune.micro_batch_size=16",
           "finetune.max_seq_length=512"]


def test_submit_refuses_a_full_7b_finetune_at_zero0_on_a100(hpcjobs, inputs, hpcjobs_home):
    """The issue's check; nothing contacts Slurm before the refusal (the a100 profile has no cluster here)."""
    model, data = inputs
    proc = hpcjobs("submit", "llama2-lora", "--profile", "a100", "--name", "memrefused", f"model.source={model}",
                   f"data.path={data}", "finetune.lora.enabled=false", "finetune.zero_stage=0", check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stderr
    assert "6,738,415,616 trainable (full finetune)" in err and "ZeRO-0" in err
    # the breakdown, by hand: 2 bytes of weights, 2 + 4 of gradients, 12 of optimizer states per parameter
    gib = 6_738_415_616 / 2**30
    for row, n in (("weights", 2), ("gradients", 6), ("optimizer states", 12)):
        assert any(line.split()[-1] == "GiB" and f"{n * gib:.2f} GiB" in line for line in err.splitlines()
                   if line.startswith(row)), (row, err)
    assert "error: stage finetune is predicted not to fit: GPU peak" in err and "> 40.00 GiB" in err
    assert "DOES NOT FIT, short by" in err
    assert "setups predicted to fit: finetune.zero_stage=1 (GPU" in err and "--force" in err
    assert "nothing was submitted" in err
    assert not (hpcjobs_home / "runs").exists() or not list((hpcjobs_home / "runs").glob("memrefused-*"))


@pytest.mark.cluster
def test_force_submits_and_is_recorded(devcluster, hpcjobs, inputs, hpcjobs_home):
    """The a100 profile pointed at the devcluster; the job waits for a start time an hour away, and is
    cancelled: nothing runs. The recipe is the finetune stage alone, so that it can be rerun by itself."""
    from conftest import FIXTURES

    model, data = inputs
    to_devcluster = [f"profile.slurm_conf={devcluster.slurm_conf}", "profile.partition=debug",
                     "profile.gpu_type=null", "profile.gpus_per_node=4", "profile.cpus_per_node=2",
                     "profile.mem_per_node=null", "profile.sbatch.begin=now+1hour"]
    args = [FIXTURES / "finetune-only.yaml", "--profile", "a100", "--name", "memforced", f"finetune.model={model}",
            f"data.path={data}", *REFUSED, *to_devcluster]
    before = _jobs_named(devcluster, "memforced")      # an earlier session's, cancelled
    assert hpcjobs("submit", *args, check=False).returncode == 2
    assert _jobs_named(devcluster, "memforced") == before
    proc = hpcjobs("submit", *args, "--force", "--json", check=False)
    assert proc.returncode == 0, proc.stderr
    sub = json.loads(proc.stdout)
    try:
        assert "warning: stage finetune: --force: predicted not to fit: GPU peak" in proc.stderr
        assert sub["memory"][0]["gpu"]["fits"] is False
        rec = json.loads((hpcjobs_home / "runs" / sub["chain"] / "chain.json").read_text())
        forced = {s["name"]: s["attempts"][-1]["forced"] for s in rec["stages"]}
        assert forced["finetune"].startswith("--force: predicted not to fit: GPU peak")
        adir = hpcjobs_home / "runs" / sub["chain"] / "stages" / "finetune" / "attempt-1"
        assert json.loads((adir / "memory_plan.json").read_text())["gpu"]["fits"] is False
        st = hpcjobs.json("status", sub["chain"])
        assert st["forced"] == {"finetune": forced["finetune"]}
        assert "forced: finetune attempt 1: --force: predicted not to fit" in \
            hpcjobs("status", sub["chain"]).stdout
    finally:
        hpcjobs("cancel", sub["chain"])
    assert set(_jobs_named(devcluster, sub["chain"]).values()) <= {"CANCELLED"}

    # rerun re-plans like submit: refused, then forced (and recorded on the new attempt)
    proc = hpcjobs("rerun", sub["chain"], "--from", "finetune", check=False)
    assert proc.returncode == 2 and "error: stage finetune is predicted not to fit" in proc.stderr, proc.stderr
    try:
        rr = hpcjobs.json("rerun", sub["chain"], "--from", "finetune", "--force")
        assert list(rr["jobs"]) == ["finetune"]
        rec = json.loads((hpcjobs_home / "runs" / sub["chain"] / "chain.json").read_text())
        ft = next(s for s in rec["stages"] if s["name"] == "finetune")
        assert [a["n"] for a in ft["attempts"]] == [1, 2] and ft["attempts"][1]["forced"] == forced["finetune"]
    finally:
        hpcjobs("cancel", sub["chain"])
    assert set(_jobs_named(devcluster, sub["chain"]).values()) <= {"CANCELLED"}
