"""Bad input at the boundary: files the user names, the run root, YAML tricks, Slurm's own syntax.

Each case ends as one ``error:`` line naming the file or key, exit code 2, no
traceback and nothing queued (issue 7, classes 5, 7 and 8).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import CLI, FIXTURES, REPO, wait_chain

THREE = FIXTURES / "three-stage.yaml"
FINETUNE = FIXTURES / "finetune-only.yaml"


def refused(proc, *needles, code=2):
    """The one-error-line contract: exit code, the needles, no traceback, no internal error."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == code, out
    for needle in needles:
        assert needle in proc.stderr, proc.stderr
    assert "Traceback" not in out, out
    assert "internal error" not in out, out


def slurm_jobs_named(devcluster, prefix):
    out = subprocess.run(["squeue", "--noheader", "--states=all", "--format=%i %j"],
                         env={**os.environ, **devcluster.env()}, capture_output=True, text=True,
                         check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.split()[1].startswith(prefix)]


def finetune_args(tmp_path):
    """finetune-only.yaml with its two inputs set (render stops at the first file problem)."""
    return [FINETUNE, f"finetune.model={tmp_path}", f"data.path={tmp_path / 'd.parquet'}"]


# ------------------------------------------------------------------ files the user names

BAD_TEXT = {
    "binary": (b"node1 slots=2\n\x00\x01\x02", "is not a text file"),
    "latin1": (b"node1 slots=2\n# caf\xe9\n", "is not UTF-8 text"),
}


@pytest.mark.parametrize("kind", sorted(BAD_TEXT))
def test_bad_hostfile(hpcjobs, tmp_path, kind):
    data, needle = BAD_TEXT[kind]
    hostfile = tmp_path / "hostfile"
    hostfile.write_bytes(data)
    proc = hpcjobs("render", *finetune_args(tmp_path), "--profile", "local", "--hostfile", hostfile, check=False)
    refused(proc, "finetune.hostfile", str(hostfile), needle, "nothing was submitted")


@pytest.mark.parametrize("kind", sorted(BAD_TEXT))
def test_bad_deepspeed_json(hpcjobs, tmp_path, kind):
    data, needle = BAD_TEXT[kind]
    ds = tmp_path / "ds.json"
    ds.write_bytes(data.replace(b"node1 slots=2", b'{"train_batch_size": 2}'))
    proc = hpcjobs("render", *finetune_args(tmp_path), "--profile", "local",
                   f"finetune.deepspeed_config={ds}", check=False)
    refused(proc, "finetune.deepspeed_config", str(ds), needle)


@pytest.mark.parametrize("kind", sorted(BAD_TEXT))
def test_bad_config_file(hpcjobs, tmp_path, kind):
    data, needle = BAD_TEXT[kind]
    cfg = tmp_path / "my.yaml"
    cfg.write_bytes(data.replace(b"node1 slots=2", b"run: {nodes: 1}"))
    proc = hpcjobs("render", THREE, "--config", cfg, check=False)
    refused(proc, f"error: {cfg}", needle, "nothing was submitted")


def test_special_files_are_not_read(hpcjobs, tmp_path):
    """/dev/zero would be read forever, a FIFO would block: both refused unread."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path in ("/dev/zero", fifo):
        proc = hpcjobs("render", *finetune_args(tmp_path), "--profile", "local", "--hostfile", path,
                       check=False, timeout=30)
        refused(proc, f"finetune.hostfile: {path}: hostfile is not a regular file")


def _evaluate_recipe(tmp_path):
    recipe = tmp_path / "evalonly.yaml"
    recipe.write_text(
        "recipe: {description: evaluate only (tests)}\n"
        "pipeline:\n  evaluate: {kind: evaluate}\n"
        f"data: {{path: {tmp_path / 'd.parquet'}, columns: [a], template: '{{a}}'}}\n"
        f"evaluate: {{base: {tmp_path}, merged: {tmp_path}}}\n")
    return recipe


PROMPTS = {
    "binary": (b"hello\n\x00world\n", "prompts file is not a text file"),
    "latin1": (b"caf\xe9\n", "prompts file is not UTF-8 text"),
    "blank": (b"  \n\n", "prompts file has no prompts"),
}


@pytest.mark.parametrize("kind", sorted(PROMPTS))
def test_bad_prompts_file_render_warns(hpcjobs, tmp_path, kind):
    data, needle = PROMPTS[kind]
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(data)
    proc = hpcjobs("render", _evaluate_recipe(tmp_path), f"evaluate.prompts={prompts}")
    assert f"warning: command line: evaluate.prompts: {prompts}" in proc.stderr and needle in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.cluster
@pytest.mark.parametrize("kind", sorted(PROMPTS))
def test_bad_prompts_file_submit_refuses(devcluster, hpcjobs, tmp_path, kind):
    data, needle = PROMPTS[kind]
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(data)
    name = f"badprompts-{kind}-{secrets.token_hex(3)}"
    proc = hpcjobs("submit", _evaluate_recipe(tmp_path), "--name", name, f"evaluate.prompts={prompts}",
                   check=False)
    refused(proc, f"error: command line: evaluate.prompts: {prompts}", needle, "nothing was submitted")
    assert not slurm_jobs_named(devcluster, name)


# ------------------------------------------------------------------ the run root and --out

def _runs(hpcjobs_home):
    root = Path(hpcjobs_home) / "runs"
    return set(root.iterdir()) if root.exists() else set()


@pytest.fixture
def a_file(tmp_path):
    f = tmp_path / "a-file"
    f.write_text("not a directory\n")
    return f


def _bad_roots(a_file):
    return {
        "file": (a_file, f"{a_file} is a file"),
        "under-file": (a_file / "runs", f"{a_file} is a file"),
        "proc": (Path("/proc/hpcjobs-runs"), "is on /proc"),
        "sys": (Path("/sys/hpcjobs-runs"), "is on /sys"),
        "dev": (Path("/dev/hpcjobs-runs"), "is under /dev"),
    }


@pytest.mark.parametrize("case", ["file", "under-file", "proc", "sys", "dev"])
def test_unusable_run_root_render_warns(hpcjobs, a_file, case):
    root, needle = _bad_roots(a_file)[case]
    proc = hpcjobs("render", THREE, f"run.root={root}")
    assert "warning: command line: run.root:" in proc.stderr and needle in proc.stderr, proc.stderr
    assert "`hpcjobs submit` refuses this" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.cluster
@pytest.mark.parametrize("case", ["file", "under-file", "proc", "sys", "dev"])
def test_unusable_run_root_submit_refuses(devcluster, hpcjobs, hpcjobs_home, a_file, case):
    root, needle = _bad_roots(a_file)[case]
    before = _runs(hpcjobs_home)
    name = f"badroot-{case}-{secrets.token_hex(3)}"
    proc = hpcjobs("submit", THREE, "--name", name, f"run.root={root}", check=False)
    refused(proc, "error: command line: run.root:", needle, "nothing was submitted")
    assert not slurm_jobs_named(devcluster, name)
    assert _runs(hpcjobs_home) == before
    assert a_file.read_text() == "not a directory\n"


def test_run_root_from_a_config_file_names_file_and_line(hpcjobs, tmp_path, a_file):
    cfg = tmp_path / "my.yaml"
    cfg.write_text(f"# runs go here\nrun:\n  root: {a_file}\n")
    proc = hpcjobs("render", THREE, "--config", cfg)
    assert f"warning: {cfg}:3: run.root: {a_file} is a file" in proc.stderr, proc.stderr


@pytest.mark.parametrize("root, needle", [
    ('/tmp/a"b c', "has both a double quote and a space"),
    ("/tmp/a\\b", "has a backslash"),
    ("/tmp/a\nb", "line break"),
])
def test_run_root_sbatch_cannot_take_is_refused_by_render_too(hpcjobs, tmp_path, root, needle):
    proc = hpcjobs("render", THREE, f"run.root={root}", check=False)
    refused(proc, "error: command line: run.root:", needle, "nothing was submitted")
    cfg = tmp_path / "my.yaml"
    cfg.write_text("run:\n  root: " + json.dumps(root) + "\n")
    proc = hpcjobs("render", THREE, "--config", cfg, check=False)
    refused(proc, f"error: {cfg}:2: run.root:", needle)


class Unprivileged:
    """Runs hpcjobs as user nobody when the tests run as root (root ignores permission bits)."""

    def __init__(self):
        self.base = Path(tempfile.mkdtemp(prefix="hpcjobs-boundary-", dir="/tmp"))
        self.base.chmod(0o755)
        for d in ("config", "state", "runs"):
            (self.base / d).mkdir()
            (self.base / d).chmod(0o777)
        (self.base / "config" / "config.yaml").write_text(f"run:\n  root: {self.base / 'runs'}\n")
        (self.base / "config" / "config.yaml").chmod(0o644)
        self.root = os.geteuid() == 0
        self.env = {**os.environ, "HPCJOBS_CONFIG_DIR": str(self.base / "config"),
                    "HPCJOBS_STATE_DIR": str(self.base / "state"), "HOME": str(self.base),
                    "PYTHONDONTWRITEBYTECODE": "1"}

    def __call__(self, *args, timeout=120):
        prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if self.root else []
        return subprocess.run([*prefix, sys.executable, "-m", "hpcjobs", *map(str, args)], capture_output=True,
                              text=True, cwd=REPO, timeout=timeout, env=self.env)

    def readonly_dir(self, name="ro"):
        d = self.base / name
        d.mkdir()
        d.chmod(0o555)
        return d

    def cleanup(self):
        for p in self.base.rglob("*"):
            if p.is_dir() and not p.is_symlink():
                p.chmod(0o755)
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture
def unprivileged():
    if os.geteuid() == 0 and not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: cannot test permission bits")
    u = Unprivileged()
    yield u
    u.cleanup()


def test_read_only_run_root(unprivileged):
    ro = unprivileged.readonly_dir()
    proc = unprivileged("render", THREE, f"run.root={ro / 'runs'}")
    assert proc.returncode == 0, proc.stderr
    assert f"warning: command line: run.root: {ro}: permission denied" in proc.stderr, proc.stderr
    # submit refuses in the same check, before it asks Slurm anything.
    proc = unprivileged("submit", THREE, "--name", "readonly", f"run.root={ro / 'runs'}")
    refused(proc, f"error: command line: run.root: {ro}: permission denied", "nothing was submitted")
    assert list(ro.iterdir()) == []


def test_render_out_read_only_or_unreadable(unprivileged, tmp_path):
    ro = unprivileged.readonly_dir()
    proc = unprivileged("render", THREE, "--out", ro / "out")
    refused(proc, f"error: --out: {ro}: permission denied", "nothing was submitted")
    proc = unprivileged("render", THREE, "--out", ro)
    refused(proc, f"error: --out: {ro}: permission denied")
    assert list(ro.iterdir()) == []
    secret = unprivileged.base / "secret.yaml"
    secret.write_text("run: {nodes: 1}\n")
    secret.chmod(0o000)
    proc = unprivileged("render", THREE, "--config", secret)  # click's own check (is readable) comes first
    refused(proc, str(secret), "not readable")
    proc = unprivileged("render", FINETUNE, f"finetune.model={unprivileged.base}",
                        f"data.path={unprivileged.base / 'd.parquet'}", f"finetune.deepspeed_config={secret}")
    refused(proc, f"finetune.deepspeed_config: {secret}: cannot read DeepSpeed config: Permission denied")


def test_render_out_in_the_way(hpcjobs, tmp_path, a_file):
    proc = hpcjobs("render", THREE, "--out", a_file, check=False)
    refused(proc, "--out", str(a_file), "is a file")
    proc = hpcjobs("render", THREE, "--out", a_file / "sub", check=False)
    refused(proc, f"error: --out: {a_file} is a file, so {a_file / 'sub'} cannot be created")
    proc = hpcjobs("render", THREE, "--out", "/proc/hpcjobs-out", check=False)
    refused(proc, "error: --out: /proc/hpcjobs-out is on /proc")
    assert a_file.read_text() == "not a directory\n"


def test_os_error_escaping_a_command_is_one_line(hpcjobs, tmp_path):
    """The last-resort handler: a file in the way inside --out is found only when writing."""
    out = tmp_path / "out"
    (out / "submit.sh").mkdir(parents=True)
    proc = hpcjobs("render", THREE, "--out", out, check=False)
    refused(proc, f"error: {out / 'submit.sh'}: Is a directory")
    assert proc.stderr.count("error:") == 1
    debug = CLI({**os.environ, "HPCJOBS_DEBUG": "1"})("render", THREE, "--out", out, check=False)
    assert debug.returncode == 2 and "Traceback" in debug.stderr and "IsADirectoryError" in debug.stderr


def test_internal_error_is_one_line_unless_debug(monkeypatch, capsys):
    from hpcjobs import cli

    def boom(*a, **kw):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli.cli, "main", boom)
    monkeypatch.delenv("HPCJOBS_DEBUG", raising=False)
    with pytest.raises(SystemExit) as ei:
        cli.main(["status"])
    assert ei.value.code == cli.INTERNAL_ERROR == 70
    err = capsys.readouterr().err
    assert err.startswith("error: internal error: RuntimeError: a bug\n") and "please report" in err
    assert "Traceback" not in err
    monkeypatch.setenv("HPCJOBS_DEBUG", "1")
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["status"])


# ------------------------------------------------------------------ option ranges

@pytest.mark.parametrize("value", ["-1", "0", "0.0001", "0.49", "nan", "inf"])
def test_watch_interval_has_a_floor(hpcjobs, value):
    proc = hpcjobs("watch", "no-such-chain", f"--interval={value}", check=False, timeout=30)
    refused(proc, "--interval", "must be between 0.5 and 86400 seconds")
    assert "no chain" not in proc.stderr  # refused before it looked for anything


@pytest.mark.parametrize("option, value", [("--lines", "0"), ("--lines", "-5"), ("--attempt", "0")])
def test_logs_counts_are_positive(hpcjobs, option, value):
    proc = hpcjobs("logs", "no-such-chain", f"{option}={value}", check=False)
    refused(proc, option, f"{value} is not in the range x>=1")


# ------------------------------------------------------------------ YAML safety

def _read_yaml(text: str):
    from hpcjobs import yamlfile
    from hpcjobs.errors import ConfigError

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.yaml"
        path.write_text(text)
        try:
            return yamlfile.read(path, what="config"), None, str(path)
        except ConfigError as e:
            return None, e, str(path)


KEYS = st.from_regex(r"k[a-z0-9_]{0,5}", fullmatch=True)
SCALARS = st.one_of(st.integers(-1000, 1000), st.text(alphabet="abc xyz:#-", max_size=8))
TREES = st.recursive(SCALARS, lambda kids: st.dictionaries(KEYS, kids, min_size=1, max_size=4), max_leaves=25)
DOCS = st.dictionaries(KEYS, TREES, min_size=1, max_size=4)


def _mappings(tree, path=()):
    yield path, tree
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _mappings(v, path + (k,))


def _emit(tree, dup=None):
    """Block YAML for ``tree``; ``dup=(path, key, position)`` repeats ``key`` in the mapping at ``path``.

    Returns (text, line of the repeated key, line of its first occurrence).
    """
    lines: list = []
    found = {}

    def emit(node, indent, path):
        items = list(node.items())
        for i, (k, v) in enumerate(items):
            if path == (dup or (None,))[0] and k == dup[1]:
                found["first"] = len(lines) + 1
            if isinstance(v, dict):
                lines.append(" " * indent + f"{k}:")
                emit(v, indent + 2, path + (k,))
            else:
                lines.append(" " * indent + f"{k}: {json.dumps(v)}")
            if dup and path == dup[0] and i == max(dup[2], items.index((dup[1], node[dup[1]]))):
                found["dup"] = len(lines) + 1
                lines.append(" " * indent + f"{dup[1]}: 0")

    emit(tree, 0, ())
    return "\n".join(lines) + "\n", found.get("dup"), found.get("first")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=DOCS)
def test_yaml_without_duplicates_loads_as_written(doc):
    text, _, _ = _emit(doc)
    loaded, err, _ = _read_yaml(text)
    assert err is None, (text, err)
    assert loaded[0] == doc


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=DOCS, data=st.data())
def test_yaml_duplicate_key_refused_at_its_line(doc, data):
    path, mapping = data.draw(st.sampled_from(list(_mappings(doc))))
    key = data.draw(st.sampled_from(sorted(mapping)))
    position = data.draw(st.integers(0, len(mapping) - 1))
    text, dup_line, first_line = _emit(doc, (path, key, position))
    _, err, source = _read_yaml(text)
    assert err is not None, text
    dotted = ".".join(path + (key,))
    assert str(err).startswith(f"{source}:{dup_line}: {dotted}: duplicate key (first on line {first_line})"), \
        (text, str(err))
    assert err.line == dup_line


def test_duplicate_key_through_the_cli(hpcjobs, tmp_path):
    cfg = tmp_path / "my.yaml"
    cfg.write_text("run:\n  nodes: 1\nfirst:\n  nodes: 2\n  time: '10'\n  nodes: 1\n")
    proc = hpcjobs("render", THREE, "--config", cfg, check=False)
    refused(proc, f"error: {cfg}:6: first.nodes: duplicate key (first on line 4)", "nothing was submitted")


def _bomb(levels=9, width=10):
    lines = ["a0: &a0 [" + ", ".join(["lol"] * width) + "]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def _merge_bomb(levels=40):
    lines = ["m0: &m0 {x: 1, y: 2}"]
    for i in range(1, levels):
        lines.append(f"m{i}: &m{i} {{<<: [*m{i - 1}, *m{i - 1}], k{i}: 1}}")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("text, line, needle", [
    (_bomb(), 5, "aliases expand the document past 100000 values"),
    (_merge_bomb(), 14, "aliases expand the document past 100000 values"),
    ("a: &a [1, *a]\n", 1, "alias *a is inside the value it names"),
    ("a: &a\n  b: *a\n", 2, "alias *a is inside the value it names"),
    ("a: " + "[" * 500 + "]" * 500 + "\n", 1, "nested more than 64 deep"),
    ("run: {nodes: 1}\n---\nrun: {nodes: 2}\n", 2, "a second YAML document starts here"),
    ("first:\n  1: x\n", 2, "first: key 1 is read as an integer, and keys must be strings; quote it: '1'"),
    ("yes: 1\n", 1, "key yes is read as a boolean"),
    ("run:\n  null: 1\n", 2, "key null is read as null"),
    ("run:\n  ? [a, b]\n  : 1\n", 2, "run: a list or mapping cannot be a key"),
    ("run: {nodes: !!int two}\n", 1, "!!int 'two' is not a valid !!int value"),
    ("run:\n  nodes: \x07\n", 2, "character #x0007 is not allowed"),
    ("run: *nope\n", 1, "found undefined alias 'nope'"),
])
def test_yaml_tricks_are_refused_with_the_line(hpcjobs, tmp_path, text, line, needle):
    cfg = tmp_path / "trick.yaml"
    cfg.write_text(text)
    proc = hpcjobs("render", THREE, "--config", cfg, check=False, timeout=30)
    refused(proc, f"error: {cfg}:{line}: ", needle, "nothing was submitted")


def test_alias_bomb_as_recipe_and_profile(hpcjobs, tmp_path):
    bomb = _bomb()
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(THREE.read_text() + bomb)
    proc = hpcjobs("render", recipe, check=False, timeout=30)
    assert proc.returncode == 2 and "alias bomb" in proc.stderr and "Traceback" not in proc.stderr
    profile = tmp_path / "prof.yaml"
    profile.write_text("description: bomb\nsbatch:\n" + "".join("  " + ln + "\n" for ln in bomb.splitlines()))
    proc = hpcjobs("render", THREE, "--profile", profile, check=False, timeout=30)
    assert proc.returncode == 2 and f"{profile}:" in proc.stderr and "alias bomb" in proc.stderr


def test_harmless_aliases_and_merge_keys_still_work(hpcjobs, tmp_path):
    cfg = tmp_path / "my.yaml"
    cfg.write_text("first: &f {nodes: 1, time: '10'}\nsecond:\n  <<: *f\n  time: '20'\n")
    proc = hpcjobs("render", THREE, "--config", cfg, "--json")
    stages = {s["name"]: s for s in json.loads(proc.stdout)["stages"]}
    assert stages["second"]["sbatch"]["time"] == "20" and stages["second"]["nodes"] == 1


# ------------------------------------------------------------------ Slurm's filename patterns

def test_percent_in_run_root_is_escaped_for_sbatch(hpcjobs, tmp_path):
    root = tmp_path / "runs%j%x%u%%"
    out = json.loads(hpcjobs("render", THREE, f"run.root={root}", "--json").stdout)
    for stage in out["stages"]:
        attempt = Path(stage["script"]).parent
        assert stage["sbatch"]["output"] == str(attempt).replace("%", "%%") + "/slurm-%j.out"
        assert f'#SBATCH --output={str(attempt).replace("%", "%%")}/slurm-%j.out' in stage["files"]["job.sbatch"]


@pytest.mark.cluster
def test_percent_in_run_root_runs_and_logs(devcluster, hpcjobs, tmp_path):
    """sbatch expands %j/%x/%u/%% in --output; the run root's own % must reach the job as itself."""
    recipe = tmp_path / "one.yaml"
    recipe.write_text("recipe: {description: one command stage (tests)}\n"
                      "pipeline:\n  only: {kind: command}\n"
                      "only:\n  command: |\n    echo \"percent-ok in $HPCJOBS_RUN_DIR\"\n")
    root = tmp_path / "runs %j-%x-%u-%% 100%"
    sub = hpcjobs.json("submit", recipe, "--name", "percent", f"run.root={root}")
    assert sub["run_dir"].startswith(str(root) + "/")
    final = wait_chain(hpcjobs, sub["chain"], timeout=120)
    assert final["state"] == "COMPLETED", final
    job = sub["jobs"]["only"]
    log = Path(sub["run_dir"]) / "stages" / "only" / "attempt-1" / f"slurm-{job}.out"
    assert log.is_file(), sorted(str(p) for p in tmp_path.rglob("*"))
    shown = hpcjobs("logs", sub["chain"], "only").stdout
    assert f"percent-ok in {sub['run_dir']}" in shown
