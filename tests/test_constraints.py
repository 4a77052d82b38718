"""Every choice is a closed set and every number has a range, checked at compose time.

Values the jobs would only trip over on the cluster (an unknown scheduler, a
negative ``--signal`` time, ``NaN`` in ``train.json``, a ``--mem`` Slurm cannot
parse, a user DeepSpeed JSON with ``"stage": "two"``) are refused by
``hpcjobs render``/``submit`` with the key and where its value came from.

* the examples of issue 7 (class 4) through the real CLI;
* properties over every constrained key of the schema (walking the dataclass
  metadata): out-of-set/out-of-range values are refused naming that key, and
  in-range values render into JSON that is JSON and scripts that are bash;
* the constraint helpers themselves, ``sbatch --mem`` against Slurm's own parser
  (``libslurmfull``'s ``str_to_mbytes``, when the library is installed);
* marked ``train``: the sets written down in schema.py against transformers, PEFT
  and the job-side modules, and the DeepSpeed JSON type checks against DeepSpeed.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import math
import os
import string
import subprocess
import tempfile
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from hpcjobs import config, constraints, dsconfig, plan, render, schema
from hpcjobs.constraints import Choice, Number, SlurmMem, TextTemplate
from hpcjobs.errors import ConfigError

RECIPE = "llama2-lora"
KINDS = {"convert": "convert", "prepare": "prepare", "finetune": "finetune", "merge": "merge",
         "evaluate": "evaluate"}
LOCAL = ["--profile", "local", "model.source=/models/llama-2-7b", "data.path=/data/d.parquet"]
INPUTS = ["model.source=/models/llama-2-7b", "data.path=/data/d.parquet"]

PROPERTY = settings(max_examples=int(os.environ.get("HPCJOBS_PROPERTY_EXAMPLES", "30")), deadline=None,
                    database=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                          HealthCheck.too_slow])


# --------------------------------------------------------------------------- the schema's constrained keys

def _sections():
    for section, cls in schema.top_level_schema(KINDS).items():
        if isinstance(cls, type) and dataclasses.is_dataclass(cls):
            yield section, cls


def _keys():
    """(key, python type, constraint) for every key of the llama2-lora tree that has one."""
    out = []
    for section, cls in _sections():
        for key, _f, tp, c in constraints.declared(cls, f"{section}."):
            if isinstance(c, constraints.AutoOr):  # `auto` (tests/test_memplan_auto.py) or a typed value
                tp, c = c.base, c.inner
            if c is not None:
                out.append((key, _base_type(tp), c))
    return out


def _base_type(tp):
    tp = constraints._unwrap_optional(tp)
    if typing.get_origin(tp) in (list, typing.List):
        return list
    return tp


CONSTRAINED = _keys()
KEYS = [k for k, _, _ in CONSTRAINED]
BY_KEY = {k: (t, c) for k, t, c in CONSTRAINED}


def test_the_walk_finds_the_keys_of_the_issue():
    for key in ["finetune.scheduler", "finetune.optim", "finetune.lora.bias", "convert.dtype",
                "convert.llama_version", "evaluate.max_new_tokens", "finetune.eval_steps",
                "finetune.save_total_limit", "finetune.epochs", "profile.signal_grace", "finetune.lr",
                "finetune.micro_batch_size", "finetune.mem", "profile.mem_per_node", "profile.max_requeues",
                "data.template", "merge.dtype", "finetune.precision", "profile.precision"]:
        assert key in BY_KEY, key


def test_every_number_in_the_schema_has_a_range():
    """Any int or float key (or list of floats) of any section carries a constraint."""
    from hpcjobs import stages
    classes = [schema.RunCfg, schema.ProfileCfg, schema.DataCfg, *(stages.get(k).settings for k in stages.names())]
    unconstrained = []
    for cls in classes:
        for key, _f, tp, c in constraints.declared(cls, f"{cls.__name__}."):
            base = constraints._unwrap_optional(tp)
            item = typing.get_args(base)[0] if typing.get_origin(base) in (list, typing.List) else base
            if item in (int, float) and c is None:
                unconstrained.append(key)
    assert not unconstrained


def test_auto_is_a_member_of_its_sets():
    assert "auto" in BY_KEY["finetune.precision"][1].values
    assert "auto" in BY_KEY["convert.dtype"][1].values and "auto" in BY_KEY["merge.dtype"][1].values


def test_defaults_are_inside_their_constraints():
    for section, cls in _sections():
        obj = cls()
        for key, value, c in constraints._walk(obj, f"{section}."):
            if c is not None and value is not None and value != "???":
                assert c.problem(value) is None, (key, value)


# --------------------------------------------------------------------------- the issue's examples, real CLI

def _ds(tmp_path, text, name="ds.json"):
    p = tmp_path / name
    p.write_text(text)
    return p


CASES = [
    ("finetune.scheduler=bogus", "finetune.scheduler", "must be one of linear, cosine,"),
    ("finetune.scheduler=cosine_with_min_lr", "finetune.scheduler", "needs lr_scheduler_kwargs"),
    ("finetune.scheduler=reduce_lr_on_plateau", "finetune.scheduler", "without evaluation"),
    ("finetune.optim=bogus", "finetune.optim", "got 'bogus'"),
    ("finetune.lora.bias=bogus", "finetune.lora.bias", "must be none, all or lora_only, got 'bogus'"),
    ("convert.dtype=int8", "convert.dtype", "must be auto, float32, float16 or bfloat16, got 'int8'"),
    ("merge.dtype=fp8", "merge.dtype", "got 'fp8'"),
    ("convert.llama_version=99", "convert.llama_version", "must be 1 or 2, got 99"),
    ("evaluate.max_new_tokens=-5", "evaluate.max_new_tokens", "must be at least 1, got -5"),
    ("finetune.eval_steps=0", "finetune.eval_steps", "must be at least 1, got 0"),
    ("finetune.save_total_limit=-3", "finetune.save_total_limit", "must be at least 0, got -3"),
    ("finetune.epochs=-2", "finetune.epochs", "must be a finite number > 0, got -2.0"),
    ("profile.signal_grace=-5", "profile.signal_grace", "must be between 1 and 65535, got -5"),
    ("finetune.lr=nan", "finetune.lr", "must be a finite number > 0, got nan"),
    ("finetune.lr=inf", "finetune.lr", "got inf"),
    ("finetune.max_grad_norm=-inf", "finetune.max_grad_norm", "got -inf"),
    ("finetune.micro_batch_size=1e20", "finetune.micro_batch_size", "1e20"),
    ("finetune.micro_batch_size=100000000000000000000", "finetune.micro_batch_size",
     "must be between 1 and 65536, got 100000000000000000000"),
    ("finetune.mem=12 GB", "finetune.mem", "'12 GB' is not a Slurm memory size (e.g. 64G, 500M, 0)"),
    ("profile.mem_per_node=1.5T", "profile.mem_per_node", "'1.5T' is not a Slurm memory size"),
    ("profile.max_requeues=-1", "profile.max_requeues", "must be at least 0, got -1"),
    ("profile.precision=fp8", "profile.precision", "must be bf16, fp16 or fp32, got 'fp8'"),
    ("finetune.precision=half", "finetune.precision", "must be auto, bf16, fp16 or fp32, got 'half'"),
    ("finetune.zero_stage=4", "finetune.zero_stage", "must be 0, 1, 2 or 3, got 4"),
    ("finetune.resume=sometimes", "finetune.resume", "must be auto or never, got 'sometimes'"),
    ("finetune.lora.dropout=1.0", "finetune.lora.dropout", "must be a finite number in [0, 1), got 1.0"),
    ("finetune.seed=4294967296", "finetune.seed", "must be between 0 and 4294967295"),
    ("finetune.max_steps=0", "finetune.max_steps", "must be a positive step count or -1 (use epochs), got 0"),
    ("data.split=[0.8,.nan,0.1]", "data.split", "each item must be between 0 and 1, got [0.8, nan, 0.1]"),
    ("data.template=Q: {q.text}", "data.template", "{q.text} uses attribute or index access"),
    ("data.template=Q: {q[0]}", "data.template", "{q[0]} uses attribute or index access"),
    ("data.template=Q: {} A: {}", "data.template", "{} is a positional field"),
    ("data.template=Q: {0}", "data.template", "{0} is a positional field"),
    ("data.template=Q: {q!r}", "data.template", "{q!r} has a conversion"),
    ("data.template=Q: {q:d}", "data.template", "{q:d} has a format spec"),
    ("data.template=Q: {q", "data.template", "is not a valid template"),
]


@pytest.mark.parametrize("override, key, needle", CASES, ids=[c[0] for c in CASES])
def test_refused_through_the_cli(hpcjobs, override, key, needle):
    proc = hpcjobs("render", RECIPE, *LOCAL, override, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"error: command line: {key}: " in proc.stderr, proc.stderr
    assert needle in proc.stderr, proc.stderr
    assert "nothing was submitted" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_signal_grace_was_rendered_negative_before(hpcjobs):
    """The in-range value still renders as Slurm's --signal; the out-of-range one never reaches it."""
    ok = hpcjobs("render", RECIPE, *LOCAL, "profile.signal_grace=20")
    assert "#SBATCH --signal=B:USR2@20" in ok.stdout
    bad = hpcjobs("render", RECIPE, *LOCAL, "profile.signal_grace=-5", check=False)
    assert "USR2@-5" not in bad.stdout + bad.stderr


def test_a_file_value_names_file_and_line(hpcjobs, tmp_path):
    cfg = tmp_path / "mine.yaml"
    cfg.write_text("finetune:\n  lr: 2.0e-4\n  scheduler: bogus\n")
    proc = hpcjobs("render", RECIPE, *LOCAL, "--config", cfg, check=False)
    assert proc.returncode == 2
    assert f"{cfg}:3: finetune.scheduler: must be one of" in proc.stderr, proc.stderr


def test_an_interpolated_value_names_where_it_comes_from(hpcjobs, tmp_path):
    # the recipe wires prepare.max_seq_length (a stage before finetune) to ${finetune.max_seq_length}
    proc = hpcjobs("render", RECIPE, *LOCAL, "finetune.max_seq_length=0", check=False)
    assert proc.returncode == 2
    assert "command line: prepare.max_seq_length (= finetune.max_seq_length): must be at least 1, got 0" \
        in proc.stderr, proc.stderr


DS_CASES = [
    ('{\n  "zero_optimization": {\n    "stage": "two"\n  }\n}\n', ":3: zero_optimization.stage: "
     'must be 0, 1, 2 or 3 (a JSON integer), got "two"'),
    ('{"zero_optimization": {"stage": 2.0}}', 'zero_optimization.stage: must be 0, 1, 2 or 3 (a JSON integer), got 2.0'),
    ('{"bf16": {"enabled": "yes"}}', 'bf16.enabled: must be true, false or "auto", got "yes"'),
    ('{"fp16": {"enabled": 1}}', 'fp16.enabled: must be true, false or "auto", got 1'),
    ('{"bf16": true}', 'bf16: must be a JSON object like {"enabled": true}, got true'),
    ('{"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "gpu"}}}',
     'zero_optimization.offload_optimizer.device: must be none, cpu or nvme, got "gpu"'),
    ('{"train_micro_batch_size_per_gpu": "16"}', "train_micro_batch_size_per_gpu: must be a positive integer"),
    ('{"gradient_clipping": "0.3"}', 'gradient_clipping: must be a number >= 0 or "auto", got "0.3"'),
    # the profile (local) trains in fp32: a config that turns bf16 on contradicts it
    ('{"bf16": {"enabled": true}}', "bf16.enabled is true but finetune.precision (auto: profile.precision "
     "of profile local) is fp32"),
    ('{"gradient_clipping": 1.0}', "gradient_clipping is 1.0 but finetune.max_grad_norm is 0.3"),
]


@pytest.mark.parametrize("text, needle", DS_CASES, ids=[f"ds{i}" for i in range(len(DS_CASES))])
def test_user_deepspeed_config_types_and_precision(hpcjobs, tmp_path, text, needle):
    ds = _ds(tmp_path, text)
    proc = hpcjobs("render", RECIPE, *LOCAL, f"finetune.deepspeed_config={ds}", check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"command line: finetune.deepspeed_config: {ds}" in proc.stderr, proc.stderr
    assert needle in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_user_deepspeed_config_that_agrees_is_used(hpcjobs, tmp_path):
    ds = _ds(tmp_path, '{"train_micro_batch_size_per_gpu": "auto", "gradient_clipping": 0.3,\n'
                       ' "bf16": {"enabled": false}, "fp16": {"enabled": "auto"},\n'
                       ' "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}')
    proc = hpcjobs("render", RECIPE, *LOCAL, f"finetune.deepspeed_config={ds}")
    assert '"stage": 3' in proc.stdout
    # the same file with the a800 profile (bf16) contradicts it
    proc = hpcjobs("render", RECIPE, "--profile", "a800", *INPUTS, f"finetune.deepspeed_config={ds}",
                   check=False)
    assert proc.returncode == 2 and "bf16.enabled is false but finetune.precision" in proc.stderr, proc.stderr


# --------------------------------------------------------------------------- in-process helpers

def _compose(values, profile="a800"):
    """Compose llama2-lora with ``values`` ({dotted key: value}) in a --config file; return (composed, file)."""
    tree: dict = {}
    for key, value in values.items():
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    fd, path = tempfile.mkstemp(suffix=".yaml", prefix="constraints-")
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(tree, f)
    try:
        return config.compose(RECIPE, profile, config_files=[path], overrides=INPUTS), path
    finally:
        os.unlink(path)


def _strict_json(text):
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


def _check_rendered(rendered, tmp_dir):
    scripts = []
    files = {f"run/{k}": v for k, v in rendered.files.items()}
    for st_ in rendered.stages:
        files.update({f"{st_.name}/{k}": v for k, v in st_.files.items()})
    for name, text in files.items():
        if name.endswith(".json"):
            _strict_json(text)
        if name.endswith((".sbatch", ".sh")):
            p = Path(tmp_dir) / name.replace("/", "__")
            p.write_text(text)
            scripts.append(str(p))
    assert scripts
    proc = subprocess.run(["bash", "-c", 'for f; do bash -n "$f" || { echo "$f"; exit 1; }; done', "_", *scripts],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --------------------------------------------------------------------------- strategies

_NAME = st.from_regex(r"\A[A-Za-z_][A-Za-z0-9_]{0,9}\Z")


def _bounds(c: Number, tp):
    lo = c.ge if c.ge is not None else c.gt
    hi = c.le if c.le is not None else c.lt
    return lo, hi


def bad_values(key):
    tp, c = BY_KEY[key]
    if isinstance(c, Choice):
        refused = [v for v, _ in c.unsupported]
        if tp is int:
            return st.integers(-10 ** 6, 10 ** 6).filter(lambda v: v not in c.values)
        bad = st.one_of(_NAME, st.sampled_from(refused or ["bogus"])).filter(lambda v: v not in c.values)
        return bad.map(lambda v: [v]) if tp is list else bad   # a list of choices (finetune.report_to)
    if isinstance(c, Number):
        lo, hi = _bounds(c, tp)
        if tp is int:
            sides = []
            if lo is not None:
                sides.append(st.integers(-10 ** 20, int(lo) - (1 if c.ge is not None else 0)))
            if hi is not None:
                sides.append(st.integers(int(hi) + (1 if c.le is not None else 0), 10 ** 20))
            return st.one_of(*sides).filter(lambda v: v not in c.also)
        floats = [st.sampled_from([math.nan, math.inf, -math.inf])]
        if lo is not None:
            floats.append(st.floats(max_value=lo, exclude_max=c.ge is not None, allow_nan=False,
                                    allow_infinity=False))
        if hi is not None:
            floats.append(st.floats(min_value=hi, exclude_min=c.le is not None, allow_nan=False,
                                    allow_infinity=False))
        bad = st.one_of(*floats)
        if tp is list:  # data.split: one bad item among good ones
            good = st.floats(0, 1)
            return st.tuples(st.lists(good, min_size=3, max_size=3), st.integers(0, 2), bad).map(
                lambda t: [t[2] if i == t[1] else v for i, v in enumerate(t[0])])
        return bad
    if isinstance(c, SlurmMem):
        mem_like = st.builds(lambda n, u: f"{n}{u}", st.integers(-5, 10 ** 6),
                             st.sampled_from([" GB", "GiB", "X", "P", ".5G", "e3", "KBB", "gb ", "", "M M"]))
        text = st.text(alphabet=string.ascii_letters + string.digits + " .-+", max_size=8)
        return st.one_of(mem_like, text).filter(lambda v: c.problem(v) is not None)
    if isinstance(c, TextTemplate):
        broken = st.builds(lambda a, n, s: f"{a}{{{n}{s}}}", st.sampled_from(["", "Q: ", "x "]), _NAME,
                           st.sampled_from([".x", "[0]", "!r", "!s", ":d", ":>10", "{", ":{w}"]))
        return st.one_of(broken, st.sampled_from(["{}", "{0}", "A {1} B", "x}", "{x", "}{", "{ {a}"])).filter(
            lambda v: c.problem(v) is not None)
    raise AssertionError(f"no strategy for {key}: {c!r}")


# Keys whose in-range values interact with others for this recipe on a800 (8 GPUs per node):
# counts are kept small (the plan enumerates nodes and slots), GPUs within the node.
_CAPS = {"run.nodes": 16, "profile.gpus_per_node": 16, "profile.train_gpus_per_node": 8,
         "convert.nodes": 16, "finetune.nodes": 16, "merge.nodes": 16, "evaluate.nodes": 16,
         "convert.gpus_per_node": 8, "finetune.gpus_per_node": 8, "merge.gpus_per_node": 8,
         "evaluate.gpus_per_node": 8, "profile.cpus_per_node": 4096}


def good_values(key):
    tp, c = BY_KEY[key]
    if isinstance(c, Choice):
        if tp is list:   # a list of choices (finetune.report_to)
            return st.lists(st.sampled_from(c.values), max_size=3, unique=True)
        return st.sampled_from(c.values)
    if isinstance(c, Number):
        lo, hi = _bounds(c, tp)
        if tp is int:
            lo_i = int(lo) + (0 if c.ge is not None else 1) if lo is not None else -10 ** 6
            hi_i = int(hi) - (0 if c.le is not None else 1) if hi is not None else lo_i + 10 ** 9
            hi_i = min(hi_i, _CAPS.get(key, hi_i))
            return st.one_of(st.integers(lo_i, hi_i), *([st.sampled_from(c.also)] if c.also else []))
        fl = st.floats(min_value=lo, max_value=hi if hi is not None else (lo or 0) + 1e6,
                       exclude_min=c.gt is not None, exclude_max=c.lt is not None,
                       allow_nan=False, allow_infinity=False)
        if tp is list:
            return st.lists(fl, min_size=3, max_size=3)
        return fl
    if isinstance(c, SlurmMem):
        return st.from_regex(r"\A[0-9]{1,7}([KMGTkmgt][Bb]?)?\Z")
    if isinstance(c, TextTemplate):
        literal = st.text(alphabet=string.ascii_letters + " :-\n", max_size=8).map(lambda s: s + "{{")
        part = st.one_of(_NAME.map(lambda n: f"{{{n}}}"), literal.map(lambda s: s + "}}"))
        return st.lists(part, min_size=1, max_size=4).map("".join)
    raise AssertionError(f"no strategy for {key}: {c!r}")


def _fix_up(values):
    """In-range values that are still refused together (the plan's cross-field checks)."""
    v = dict(values)
    gpus = v.get("profile.gpus_per_node", 8)
    if gpus == 0:
        v["profile.gpus_per_node"] = gpus = 1
    for key in [k for k in v if k.endswith("gpus_per_node") and k != "profile.gpus_per_node"]:
        if v.get(key) is not None:
            v[key] = min(v[key], gpus)
    if v.get("finetune.gpus_per_node") == 0:
        v["finetune.gpus_per_node"] = 1
    if v.get("finetune.scheduler") in schema.SCHEDULERS_NEEDING_EVAL and not v.get("finetune.eval_steps"):
        v["finetune.eval_steps"] = 10
    if "none" in (v.get("finetune.report_to") or []):
        v["finetune.report_to"] = ["none"]
    if v.get("finetune.offload_param") == "cpu":
        v["finetune.zero_stage"] = 3
    if v.get("finetune.offload_optimizer") == "cpu" and v.get("finetune.zero_stage") == 0:
        v["finetune.zero_stage"] = 1
    for key in ("prepare.task", "finetune.task", "evaluate.task"):
        if key in v:   # another task needs its own settings and data (tests/test_tasks.py)
            v[key] = "causal-lm"
    for a, b in (("prepare.prompt", "prepare.response"), ("prepare.response", "prepare.prompt")):
        if v.get(a) is not None and v.get(b) is None:
            v[b] = "{Doctor}"   # set together; a column of the recipe's data
    if v.get("profile.accelerator") == "cpu":
        precision = v.get("finetune.precision", "auto")
        if precision == "fp16" or (precision == "auto" and v.get("profile.precision") == "fp16"):
            v["finetune.precision"] = "fp32"
    return v


# --------------------------------------------------------------------------- properties

@pytest.mark.parametrize("key", KEYS)
def test_each_key_refuses_its_boundary(key):
    """The first value past each bound (or outside the set) is refused, naming the key and the file line."""
    tp, c = BY_KEY[key]
    if isinstance(c, Choice):
        value = "not-a-choice" if tp is not int else max(c.values) + 1
        value = [value] if tp is list else value
    elif isinstance(c, Number):
        lo, hi = _bounds(c, tp)
        if lo is not None:
            value = (lo - 1 if tp is int else lo - 1e-9) if c.ge is not None else lo
        else:
            value = hi + 1 if c.le is not None else hi
        value = [0.5, value, 0.1] if tp is list else value
    elif isinstance(c, SlurmMem):
        value = "64 GB"
    else:
        value = "{0}"
    composed, path = _compose({key: value})
    with pytest.raises(ConfigError) as e:
        plan.build(composed, chain_id="boundary")
    # a key another one copies (prepare.max_seq_length: ${finetune.max_seq_length}) may be named
    # through the copy that is checked first: "prepare.max_seq_length (= finetune.max_seq_length)"
    assert e.value.key == key or e.value.key.endswith(f"(= {key})"), str(e.value)
    assert f"{path}:" in str(e.value)


@PROPERTY
@given(data=st.data())
def test_out_of_range_values_are_refused_naming_the_key(data):
    key = data.draw(st.sampled_from(KEYS), label="key")
    value = data.draw(bad_values(key), label="value")
    composed, path = _compose({key: value})
    with pytest.raises(ConfigError) as e:
        plan.build(composed, chain_id="bad")
    # A stage that links to the key (prepare.max_seq_length = ${finetune.max_seq_length})
    # may be checked first; the error then names both, the set key last.
    assert e.value.key == key or e.value.key.endswith(f"(= {key})"), str(e.value)
    assert str(e.value).startswith(f"{path}:"), str(e.value)


@PROPERTY
@given(data=st.data())
def test_in_range_values_render_json_and_bash(data, tmp_path):
    chosen = data.draw(st.lists(st.sampled_from(KEYS), min_size=1, max_size=12, unique=True), label="keys")
    values = _fix_up({key: data.draw(good_values(key), label=key) for key in chosen})
    composed, _ = _compose(values)
    try:
        built = plan.build(composed, chain_id="good")
    except ConfigError as e:  # pragma: no cover - the message says which value
        raise AssertionError(f"in-range values refused: {e}\n{values}") from None
    _check_rendered(render.render(built), tmp_path)


def test_defaults_render_json_and_bash(tmp_path):
    composed, _ = _compose({})
    _check_rendered(render.render(plan.build(composed, chain_id="defaults")), tmp_path)


# --------------------------------------------------------------------------- the helpers

def test_number_messages():
    assert Number(ge=1).problem(0) == "must be at least 1, got 0"
    assert Number(gt=0).problem(math.nan) == "must be a finite number > 0, got nan"
    assert Number(ge=1, le=65536).problem(10 ** 20) == "must be between 1 and 65536, got 100000000000000000000"
    assert Number(ge=0, lt=1).problem(1.0) == "must be a finite number in [0, 1), got 1.0"
    assert Number(ge=1, also=(-1,)).problem(0) == "must be at least 1 or -1, got 0"
    assert Number(ge=1, also=(-1,)).problem(-1) is None
    assert Number(ge=0).problem(True) is not None
    assert Number(ge=0, le=1).problem([0.5, 0.5]) is None


def test_choice_compares_types():
    c = Choice((0, 1, 2, 3))
    assert c.problem(2) is None
    assert c.problem(2.0) == "must be 0, 1, 2 or 3, got 2.0"
    assert c.problem(True) is not None
    assert Choice(("none", "cpu")).problem("gpu") == "must be none or cpu, got 'gpu'"


def test_every_float_must_be_finite_even_without_a_constraint():
    @dataclasses.dataclass
    class Inner:
        x: float = 1.0
        xs: typing.List[float] = dataclasses.field(default_factory=lambda: [1.0, math.inf])

    assert list(constraints.problems(Inner())) == [("xs", "must be a finite number, got [1.0, inf]")]


@given(st.text(alphabet=string.printable, max_size=30))
@settings(max_examples=300, deadline=None, database=None)
def test_an_accepted_template_formats_with_string_cells(template):
    """Whatever TextTemplate accepts, ``template.format(**row)`` (what the job does) fills."""
    assume(TextTemplate().problem(template) is None)
    names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    out = template.format(**{n: "cell" for n in names})
    assert isinstance(out, str)


def _libslurm():
    for path in ("/usr/lib/x86_64-linux-gnu/slurm-wlm/libslurmfull.so", "/usr/lib64/slurm/libslurmfull.so",
                 "/usr/lib/slurm/libslurmfull.so"):
        if Path(path).exists():
            lib = ctypes.CDLL(path)
            fn = lib.str_to_mbytes
            fn.restype, fn.argtypes = ctypes.c_uint64, [ctypes.c_char_p]
            return fn
    pytest.skip("libslurmfull.so not found")


@given(st.from_regex(r"\A[ +-]?[0-9]{0,12}(\.[0-9])?[KkMmGgTtPpBbe ]{0,3}[0-9]?\Z"))
@settings(max_examples=400, deadline=None, database=None)
def test_slurm_mem_accepts_only_what_slurm_parses(value):
    """Differential: every size we accept, Slurm's own str_to_mbytes (sbatch --mem) parses."""
    fn = _libslurm()
    no_val64 = 0xFFFFFFFFFFFFFFFE
    ours = SlurmMem().problem(value) is None
    if ours:
        assert fn(value.encode()) != no_val64, value


def test_slurm_mem_examples():
    ok = ["0", "64G", "500M", "1T", "1000G", "512", "64GB", "2048k"]
    bad = ["", "12 GB", "1.5G", "-5", "+5", " 5", "5 ", "1P", "G", "0x10", "1e3", "64GiB", "99999999999999999999T"]
    assert [v for v in ok if SlurmMem().problem(v)] == []
    assert [v for v in bad if SlurmMem().problem(v) is None] == []


# --------------------------------------------------------------------------- the sets, against the real packages

@pytest.mark.train
def test_scheduler_and_optimizer_lists_match_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.training_args import OptimizerNames

    assert list(schema.SCHEDULER_TYPES) == [e.value for e in transformers.SchedulerType], transformers.__version__
    assert list(schema.OPTIMIZER_NAMES) == [e.value for e in OptimizerNames], transformers.__version__


@pytest.mark.train
def test_every_offered_scheduler_builds():
    """What finetune.scheduler offers, the Trainer's get_scheduler builds without lr_scheduler_kwargs;
    what it refuses, it cannot."""
    torch = pytest.importorskip("torch")
    from transformers import get_scheduler

    def build(name):
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.AdamW([p], lr=1e-3)
        sched = get_scheduler(name, opt, num_warmup_steps=2, num_training_steps=10)
        for _ in range(3):
            opt.step()
            sched.step(1.0) if name in schema.SCHEDULERS_NEEDING_EVAL else sched.step()

    for name in schema.SCHEDULERS:
        build(name)
    for name in schema.SCHEDULERS_UNSUPPORTED:
        with pytest.raises((ValueError, TypeError)):
            build(name)


@pytest.mark.train
def test_dtypes_versions_and_lora_bias_match_the_job_side():
    from hpcjobs.train import convert, merge
    peft = pytest.importorskip("peft")

    assert set(schema.DTYPES) == set(convert.DTYPES)
    assert set(schema.DTYPES) == {"auto", *merge.DTYPES}
    assert set(schema.LLAMA_VERSIONS) == set(convert.CONTEXT_LENGTH) == set(convert.DEFAULT_NORM_EPS)
    bias = typing.get_type_hints(peft.LoraConfig)["bias"]
    assert set(schema.LORA_BIAS) == set(typing.get_args(bias))


# DeepSpeed coerces what it reads; the HF integration reads the raw JSON. A value hpcjobs
# accepts must mean the same to both: DeepSpeed parses it to itself.
_STAGES = st.one_of(st.integers(-1, 5), st.sampled_from(["2", "two", 2.0, True, None]))
_ENABLED = st.sampled_from([True, False, "auto", "yes", "no", 1, 0, "true", None])
_DEVICES = st.sampled_from(["none", "cpu", "nvme", "gpu", "CPU", 1, None])
_CLIPS = st.one_of(st.floats(0, 5, allow_nan=False), st.sampled_from([-1.0, "1.0", True, "auto", 0]))


@pytest.mark.train
@given(stage=_STAGES, enabled=_ENABLED, device=_DEVICES, clip=_CLIPS)
@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
def test_deepspeed_reads_what_we_accept_as_written(stage, enabled, device, clip):
    ds_config = pytest.importorskip("deepspeed.runtime.config")
    zero = {} if stage is None else {"stage": stage}
    if device is not None:
        zero["offload_optimizer"] = {"device": device}
    cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": zero,
           "bf16": {} if enabled is None else {"enabled": enabled}, "gradient_clipping": clip}
    try:
        dsconfig.check_user_ds_types(cfg, source="ds.json")
        ours = None
    except ConfigError as e:
        ours = e.key
    try:
        parsed = ds_config.DeepSpeedConfig(json.loads(json.dumps(cfg)))
        device_seen = getattr(parsed.zero_config.offload_optimizer, "device", "none")  # None: no offload
        seen = {"zero_optimization.stage": parsed.zero_optimization_stage,
                "bf16.enabled": parsed.bfloat16_config.enabled,
                "zero_optimization.offload_optimizer.device": getattr(device_seen, "value", device_seen),
                "gradient_clipping": parsed.gradient_clipping}
    except Exception:  # DeepSpeed refuses the config
        seen = None
    raw = {"zero_optimization.stage": stage if stage is not None else 0,
           "bf16.enabled": enabled if enabled is not None else False,
           "zero_optimization.offload_optimizer.device": device,
           "gradient_clipping": clip}
    if ours is None:
        assert seen is not None, cfg
        for key, value in raw.items():
            if value == "auto" or value is None:
                continue  # filled in by the HF integration / absent
            assert type(seen[key]) is type(value) and seen[key] == value, (key, value, seen[key])
    else:
        # refused: DeepSpeed refuses it too, or reads something else than the JSON says (the HF
        # integration reads the JSON). gradient_clipping DeepSpeed does not check at all
        # (get_scalar_param): a string reaches the engine's `gradient_clipping() > 0.0`, a
        # negative norm flips the gradients' sign, and true is a norm of 1.
        value = raw[ours]
        not_a_norm = isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0
        justified = (seen is None or type(seen[ours]) is not type(value) or seen[ours] != value
                     or (ours == "gradient_clipping" and not_a_norm))
        assert justified, (ours, value, seen)
