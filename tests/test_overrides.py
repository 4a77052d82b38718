"""Command-line overrides: typed by the schema, ``${...}`` resolved against the whole tree,
and reruns re-planned from the chain's layers and checked like a submission.

The property tests generate keys and values and require one of two outcomes: a clean
refusal (a ConfigError naming the key) or a rendering whose scripts pass ``bash -n``
and whose JSON files are strict JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import FIXTURES, wait_chain

from hpcjobs import config, plan, render
from hpcjobs.errors import ConfigError, HpcjobsError

BASE = ["model.source=/models/llama-2-7b", "data.path=/data/d.parquet"]


def _render(*overrides, recipe="llama2-lora", profile="a800"):
    composed = config.compose(recipe, profile, overrides=[*BASE, *overrides] if recipe == "llama2-lora"
                              else list(overrides))
    p = plan.build(composed)
    return composed, p, render.render(p)


def _strict_json(text):
    def no_constants(name):
        raise ValueError(f"not JSON: {name}")
    return json.loads(text, parse_constant=no_constants)


def _check_rendered(rendered):
    for st_ in rendered.stages:
        for name, text in st_.files.items():
            if name.endswith(".json"):
                _strict_json(text)
        proc = subprocess.run(["bash", "-n"], input=st_.script, text=True, capture_output=True)
        assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------- typed values

@pytest.mark.parametrize("value", [
    "Q: {question} A: {answer}",   # the README's example: ': ' is not YAML here
    "/data/run #1/x.parquet",       # ' #' is not a comment
    "a: b",
    "yes",                          # not a boolean
    "{Foo}",                        # not a mapping
    "[not, a, list]",
    "  padded  ",
    "null",                         # profile.env values are plain strings
    "3.0",
])
def test_a_string_key_gets_exactly_the_typed_text(hpcjobs_home, value):
    _, p, _ = _render(f"profile.env.MYVAR={value}")
    assert p.chain.profile.env["MYVAR"] == value


def test_readme_template_example(hpcjobs_home):
    _, p, rendered = _render("data.template=Q: {question} A: {answer}", "data.columns=[question,answer]")
    assert p.chain.data.template == "Q: {question} A: {answer}"
    assert p.chain.data.columns == ["question", "answer"]
    train = _strict_json(next(st for st in rendered.stages if st.name == "finetune").files["train.json"])
    assert train["data"]["template"] == "Q: {question} A: {answer}"


def test_run_name_yes_is_a_name(hpcjobs_home):
    _, p, _ = _render("run.name=yes")
    assert p.chain_id.startswith("yes-")


def test_numbers_lists_and_null_follow_the_schema(hpcjobs_home):
    _, p, _ = _render("finetune.lr=2e-4", "finetune.micro_batch_size=8", "data.split=[0.5, 0.25, 0.25]",
                      "finetune.lora.target_modules=[q_proj, yes]", "finetune.eval_steps=50",
                      "finetune.gradient_checkpointing=false")
    ft = p.stage("finetune").cfg
    assert ft.lr == 2e-4 and ft.micro_batch_size == 8 and ft.eval_steps == 50
    assert ft.gradient_checkpointing is False
    assert p.chain.data.split == [0.5, 0.25, 0.25]
    assert ft.lora.target_modules == ["q_proj", "yes"]        # list of names: items stay text
    _, p, _ = _render("finetune.eval_steps=50", "finetune.eval_steps=null")
    assert p.stage("finetune").cfg.eval_steps is None


@pytest.mark.parametrize("override, key, needle", [
    ("finetune.micro_batch_size=1e20", "finetune.micro_batch_size", "expects an integer, got '1e20'"),
    ("finetune.lr=fast", "finetune.lr", "expects a number"),
    ("finetune.packing=1x", "finetune.packing", "expects true or false, got '1x'"),
    ("data.columns=question", "data.columns", "expects a list"),
    ("data.columns=[a, b", "data.columns", "is not a valid list"),
    ("finetune.nope=1", "finetune.nope", "unknown key"),
])
def test_values_of_the_wrong_type_name_the_key(hpcjobs_home, override, key, needle):
    with pytest.raises(ConfigError) as e:
        _render(override)
    assert e.value.key == key and needle in str(e.value), str(e.value)


# ---------------------------------------------------------------- ${...} on the command line

def test_cross_references_resolve_against_the_whole_tree(hpcjobs_home):
    _, p, _ = _render("finetune.max_seq_length=256", "evaluate.max_seq_length=${finetune.max_seq_length}",
                      "finetune.output=${run.dir}/adapter2")
    assert p.stage("evaluate").cfg.max_seq_length == 256
    assert p.stage("finetune").cfg.output == str(p.run_dir / "adapter2")
    assert p.stage("merge").cfg.adapter == str(p.run_dir / "adapter2")     # the recipe's link follows


def test_setting_a_key_whose_default_points_at_a_missing_value(hpcjobs_home):
    """convert.input's default is ${model.source}; giving convert.input without model.source
    must work (the section check must not resolve the default while the layers merge)."""
    composed = config.compose("llama2-lora", "a800", overrides=["convert.input=/models/llama-2-7b",
                                                                  "data.path=/data/d.parquet"])
    with pytest.raises(ConfigError) as e:
        plan.build(composed)
    assert "model.source" in str(e.value) and "required" in str(e.value)


@pytest.mark.parametrize("override, key, needle", [
    ("finetune.output=${nonexistent}", "finetune.output", "not found"),
    ("evaluate.max_seq_length=${evaluate.max_seq_length}", "evaluate.max_seq_length", "Recursive"),
    ("data.path=${oc.env:HPCJOBS_TEST_UNSET_VARIABLE}", "data.path", "HPCJOBS_TEST_UNSET_VARIABLE"),
    ("data.path=${nosuchresolver:x}", "data.path", "unknown resolver"),
    ("data.path=${run.dir", "data.path", "not a valid ${...} interpolation"),
    ("evaluate.max_seq_length=${finetune.output}", "evaluate.max_seq_length", ""),
])
def test_bad_interpolations_are_clean_errors_naming_the_key(hpcjobs_home, override, key, needle):
    os.environ.pop("HPCJOBS_TEST_UNSET_VARIABLE", None)
    with pytest.raises(ConfigError) as e:
        _render(override)
    assert e.value.key == key, str(e.value)
    assert e.value.source == "command line" and needle in str(e.value), str(e.value)


@pytest.mark.parametrize("override", [
    "data.template=Q: {question} A: {answer}",
    "finetune.output=${nonexistent}",
    "data.path=${oc.env:HPCJOBS_TEST_UNSET_VARIABLE}",
    "data.path=${run.dir",
    "evaluate.max_seq_length=${evaluate.max_seq_length}",
])
def test_cli_never_prints_a_traceback(hpcjobs, override):
    proc = hpcjobs("render", "llama2-lora", "--profile", "a800", *BASE, override, check=False)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode in (0, 2), proc.stderr
    if proc.returncode == 2:
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and override.split("=")[0] in errors[0], proc.stderr


# ---------------------------------------------------------------- generated overrides

def _schema_keys():
    composed = config.compose("llama2-lora", "a800", overrides=BASE)
    from omegaconf import OmegaConf
    flat = []

    def walk(node, prefix):
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            flat.append(prefix.rstrip("."))
    walk(OmegaConf.to_container(composed.cfg, resolve=False), "")
    return [k for k in flat if not k.startswith(("pipeline", "recipe")) and k not in ("run.id", "run.dir")]


SCHEMA_KEYS = _schema_keys()
_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40)
_values = st.one_of(
    _text,
    st.integers(-10**25, 10**25).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["true", "false", "yes", "no", "null", "~", "[]", "{}", "[1, 2]", "[a, b]", "{a: 1}",
                     "${run.dir}/x", "${finetune.max_seq_length}", "${", "${}", "$(id)", "';rm -rf /'",
                     "a\nb", "%j", "\\", "\"", "-1", "0", "1e-3", "nan", "inf"]),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.one_of(st.sampled_from(SCHEMA_KEYS),
                     st.from_regex(r"\A[a-z]{1,8}(\.[a-z_]{1,8}){0,2}\Z")),
       value=_values)
def test_generated_overrides_refuse_cleanly_or_render_valid_files(hpcjobs_home, key, value):
    try:
        _, _, rendered = _render(f"{key}={value}")
    except HpcjobsError as e:
        assert str(e).strip(), "an error must say something"
        return
    _check_rendered(rendered)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=60)
       .filter(lambda v: "${" not in v and v.strip() not in config._NULL))
def test_generated_strings_arrive_unchanged(hpcjobs_home, value):
    _, p, rendered = _render(f"profile.env.MYVAR={value}")
    assert p.chain.profile.env["MYVAR"] == value
    _check_rendered(rendered)


# ---------------------------------------------------------------- reruns, on the devcluster

def _hf_dir(path: Path, marker: str) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (path / "marker").write_text(marker + "\n")
    return path


def _queued(devcluster, prefix):
    out = subprocess.run(["squeue", "--noheader", "--format=%i %j"], env={**os.environ, **devcluster.env()},
                         capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.split()[1].startswith(prefix)]


@pytest.mark.cluster
@pytest.mark.train
def test_rerun_is_checked_like_submit_and_follows_links(devcluster, hpcjobs, tmp_path):
    a, b = _hf_dir(tmp_path / "model-a", "A"), _hf_dir(tmp_path / "model-b", "B")
    sub = hpcjobs.json("submit", FIXTURES / "convert-check.yaml", "--profile", "local", "--name", "relink",
                       f"model.source={a}")
    final = wait_chain(hpcjobs, sub["chain"], timeout=300)
    states = {s["name"]: s["state"] for s in final["stages"]}
    assert states == {"convert": "COMPLETED", "check": "FAILED"}, final
    record_before = Path(sub["run_dir"], "chain.json").read_text()

    # Bad overrides: refused before anything is queued, and the record is untouched.
    bad = [
        (["data.path=/nonexistent"], "unknown key"),                       # this recipe has no data section
        ([f"model.source={tmp_path / 'not-there'}", "--from", "convert"], "is not a directory"),
        (["check.nodes=5"], "asks for 5 nodes but partition debug has 2"),
        (["check.time=forever"], "is not a Slurm time"),
        (["check.command=${nonexistent}"], "not found"),
        ([f"model.source={b}"], "stage convert is not rerun"),              # a completed stage would change
    ]
    for args, needle in bad:
        proc = hpcjobs("rerun", sub["chain"], *args, check=False)
        assert proc.returncode == 2 and needle in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr and "nothing was submitted" in proc.stderr
        assert _queued(devcluster, sub["chain"]) == []
        assert Path(sub["run_dir"], "chain.json").read_text() == record_before

    # --dry-run shows the change through the ${model.source} link and submits nothing.
    dry = hpcjobs.json("rerun", sub["chain"], "--from", "convert", "--dry-run", f"model.source={b}")
    changed = {c["key"]: (c["old"], c["new"]) for c in dry["changes"]}
    assert changed["model.source"] == (str(a), str(b))
    assert changed["convert.input"] == (str(a), str(b))               # the link followed
    assert dry["jobs"] == {} and _queued(devcluster, sub["chain"]) == []

    rr = hpcjobs.json("rerun", sub["chain"], "--from", "convert", f"model.source={b}")
    assert list(rr["jobs"]) == ["convert", "check"]
    final = wait_chain(hpcjobs, sub["chain"], timeout=300)
    assert final["state"] == "COMPLETED", final
    script = Path(sub["run_dir"], "stages/convert/attempt-2/job.sbatch").read_text()
    assert f"--input {b}" in script
    assert Path(sub["run_dir"], "hf-model/marker").read_text() == "B\n"   # convert ran on the new input

    # A later rerun keeps the earlier rerun's override (it is part of the chain's layers now).
    dry = hpcjobs.json("rerun", sub["chain"], "--from", "check", "--dry-run")
    assert dry["changes"] == []
    layers = Path(sub["run_dir"], "layers.yaml").read_text()
    assert f"source: {b}" in layers and "rerun " in layers


def test_changes_ignore_a_moved_run_directory():
    from hpcjobs.rerun import config_changes
    old = "run: {dir: /old/c1}\nconvert: {output: /old/c1/hf-model, input: /m/a}\n"
    new = "run: {dir: /new/c1}\nconvert: {output: /new/c1/hf-model, input: /m/b}\n"
    assert config_changes(old, new) == [("convert.input", "/m/a", "/m/b")]
