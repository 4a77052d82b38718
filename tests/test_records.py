"""chain.json that is damaged, from another hpcjobs version, or moved; and output that is piped.

Most tests write records by hand and need no Slurm: a record whose stages have no job
ids (and whose submission is "submitted") makes `status`/`list` call neither squeue nor sacct.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import FIXTURES, CLI, wait_for
from hpcjobs import records
from hpcjobs.records import Attempt, ChainRecord, DamagedRecord, StageRecord

LONG_NAME = "a-chain-name-long-enough-to-overflow-eighty-columns-of-a-termina"   # 64 characters


@pytest.fixture
def state(tmp_path, monkeypatch):
    """A private state dir (index) and runs root, for in-process tests and for CLI subprocesses."""
    st = tmp_path / "state"
    runs = tmp_path / "runs"
    st.mkdir()
    runs.mkdir()
    monkeypatch.setenv("HPCJOBS_STATE_DIR", str(st))
    return {"state": st, "runs": runs, "cli": CLI(env={**os.environ, "HPCJOBS_STATE_DIR": str(st)})}


def make(runs: Path, chain_id: str, *, name: str = "c", created: str = "2026-11-23T10:00:00Z",
         job_id=None, index: bool = True) -> ChainRecord:
    run_dir = runs / chain_id
    run_dir.mkdir(parents=True)
    rec = ChainRecord(chain_id, name, "three-stage", "/r/three-stage.yaml", "local", None, str(run_dir), created,
                      ["x=1"], [StageRecord("first", "command", [], [Attempt(1, job_id=job_id)]),
                                StageRecord("second", "command", ["first"], [Attempt(1)])],
                      submission="submitted")
    rec.save()
    if index:
        records.index_add(rec)
    return rec


def rewrite(rec: ChainRecord, change) -> Path:
    """Apply ``change`` to the record's JSON and write it back by hand (as an editor would);
    a ``change`` that returns a list replaces the whole record with that list."""
    path = Path(rec.run_dir) / "chain.json"
    data = json.loads(path.read_text())
    new = change(data)
    path.write_text(json.dumps(new if isinstance(new, list) else data))
    return path


# ---------------------------------------------------------------- forward compatibility

def test_unknown_fields_are_kept_at_every_level(state):
    rec = make(state["runs"], "c-1")

    def add(d):
        d["retention"] = {"days": 30}
        d["stages"][1]["gpu_hours"] = 1.5
        d["stages"][0]["attempts"][0]["exit_reason"] = "oom"
    path = rewrite(rec, add)
    loaded = ChainRecord.load(Path(rec.run_dir))
    assert loaded.stage("second").after == ["first"] and loaded.overrides == ["x=1"]
    loaded.stage("first").current.note = "edited"
    loaded.save()
    saved = json.loads(path.read_text())
    assert saved["retention"] == {"days": 30}
    assert saved["stages"][1]["gpu_hours"] == 1.5
    assert saved["stages"][0]["attempts"][0]["exit_reason"] == "oom"
    assert saved["stages"][0]["attempts"][0]["note"] == "edited"
    assert "extra" not in saved and "extra" not in saved["stages"][0]          # no internal field leaks
    assert ChainRecord.load(Path(rec.run_dir)).to_dict() == saved               # stable round trip


def test_missing_optional_fields_get_their_defaults(state):
    rec = make(state["runs"], "c-2")

    def strip(d):
        for k in ("name", "recipe_path", "slurm_conf", "overrides", "error", "version", "run_dir"):
            del d[k]
        del d["stages"][0]["after"]
        for k in ("job_id", "submitted", "overrides", "note"):
            del d["stages"][0]["attempts"][0][k]
    rewrite(rec, strip)
    loaded = ChainRecord.load(Path(rec.run_dir))
    assert (loaded.name, loaded.recipe_path, loaded.slurm_conf, loaded.overrides, loaded.error, loaded.version) == \
        ("c-2", "", None, [], None, records.VERSION)
    assert loaded.run_dir == rec.run_dir
    att = loaded.stage("first").current
    assert (att.n, att.job_id, att.submitted, att.overrides, att.note) == (1, None, None, [], "")
    assert loaded.stage("first").after == []


@pytest.mark.parametrize("change, problem", [
    (lambda d: d.__delitem__("chain_id"), "chain_id: required field is missing"),
    (lambda d: d.__delitem__("stages"), "stages: required field is missing"),
    (lambda d: d.update(stages={"first": {}}), "stages: expected a list, got an object"),
    (lambda d: d["stages"][0]["attempts"][0].update(n="1"), "stages[0].attempts[0].n: expected an integer, got a string '1'"),
    (lambda d: d["stages"][0]["attempts"][0].update(n=True), "stages[0].attempts[0].n: expected an integer"),
    (lambda d: d["stages"][1]["attempts"][0].update(job_id=12), "stages[1].attempts[0].job_id: expected a string or null, got an integer"),
    (lambda d: d["stages"][1]["attempts"][0].update(job_id="12;x"), "stages[1].attempts[0].job_id: '12;x' is not a Slurm job id"),
    (lambda d: d["stages"][1].update(attempts=[]), "stages[1].attempts: the list is empty"),
    (lambda d: d["stages"][1].__delitem__("kind"), "stages[1].kind: required field is missing"),
    (lambda d: d["stages"][1].update(after=["nosuch"]), "stages[1].after: 'nosuch' is not an earlier stage"),
    (lambda d: d["stages"][0].update(name="second"), "stages[1].name: stage 'second' appears twice"),
    (lambda d: d.update(created="yesterday"), "created: 'yesterday' is not a UTC time"),
    (lambda d: d.update(overrides="x=1"), "overrides: expected a list, got a string"),
    (lambda d: d.update(name=None), "name: expected a string, got null"),
    (lambda d: d.update(version="1"), "version: expected an integer, got a string '1'"),
    (lambda d: [d], "expected a JSON object, got a list"),
])
def test_damaged_records_name_the_file_and_the_field(state, change, problem):
    rec = make(state["runs"], "c-3")
    path = rewrite(rec, change)
    with pytest.raises(DamagedRecord) as e:
        ChainRecord.load(Path(rec.run_dir))
    assert str(e.value).startswith(f"{path}: damaged chain record: ")
    assert problem in str(e.value)


def test_unreadable_files_are_damaged_not_crashes(state):
    rec = make(state["runs"], "c-4")
    path = Path(rec.run_dir) / "chain.json"
    cases = {b"": "empty file", b"{\"chain_id\": ": "not valid JSON", b"\xff\xfe\x00garbage": "not UTF-8 text"}
    for content, problem in cases.items():
        path.write_bytes(content)
        with pytest.raises(DamagedRecord, match=problem):
            ChainRecord.load(Path(rec.run_dir))
    path.unlink()
    path.mkdir()
    with pytest.raises(DamagedRecord, match="it is a directory, not a file"):
        ChainRecord.load(Path(rec.run_dir))
    path.rmdir()
    path.symlink_to(Path(rec.run_dir) / "gone.json")
    with pytest.raises(DamagedRecord, match="cannot be read"):
        ChainRecord.load(Path(rec.run_dir))


def test_a_newer_record_version_is_reported_not_guessed(state):
    rec = make(state["runs"], "c-5")
    path = rewrite(rec, lambda d: d.update(version=2))
    with pytest.raises(DamagedRecord) as e:
        ChainRecord.load(Path(rec.run_dir))
    assert str(e.value) == f"{path}: unsupported chain record: version 2; this hpcjobs reads version 1"


# ---------------------------------------------------------------- moved run directories

def test_a_moved_run_directory_is_found_at_its_new_place(state, tmp_path):
    rec = make(state["runs"], "c-6")
    old = Path(rec.run_dir)
    new_root = tmp_path / "elsewhere"
    new_root.mkdir()
    new = new_root / "c-6"
    shutil.move(str(old), str(new))
    loaded = ChainRecord.load(new)
    assert loaded.run_dir == str(new)
    assert loaded.attempt_dir("first", 1) == new / "stages" / "first" / "attempt-1"
    assert json.loads((new / "chain.json").read_text())["run_dir"] == str(old)   # reading writes nothing
    # The index still points at the old place: the chain is gone from it until a scan or a path finds it.
    assert "c-6" not in records.indexed()
    assert [r.chain_id for r in records.scan(new_root)] == ["c-6"]
    assert records.indexed()["c-6"] == new
    assert records.find("c-6").run_dir == str(new)


def test_finding_a_moved_chain_by_path_fixes_the_index(state, tmp_path):
    rec = make(state["runs"], "c-7")
    new = tmp_path / "moved-c-7"
    shutil.move(rec.run_dir, str(new))
    os.chdir(tmp_path)
    assert records.find("moved-c-7").run_dir == str(new)      # a relative path works and is made absolute
    assert records.indexed()["c-7"] == new
    assert records.find("c-7").run_dir == str(new)


# ---------------------------------------------------------------- the index

def test_the_index_survives_junk(state):
    good = make(state["runs"], "good-1")
    dangling = make(state["runs"], "gone-1")
    shutil.rmtree(dangling.run_dir)                                      # entry left pointing at nothing
    idx = records.index_dir()
    (idx / "broken").symlink_to(state["runs"] / "never-existed")        # broken symlink
    (idx / "stray-file").write_text("not a link")                        # not a symlink
    (idx / "stray-dir").mkdir()
    dir_rec = make(state["runs"], "dir-1")
    (Path(dir_rec.run_dir) / "chain.json").unlink()
    (Path(dir_rec.run_dir) / "chain.json").mkdir()                        # chain.json that is a directory
    list_rec = make(state["runs"], "list-1")
    rewrite(list_rec, lambda d: [d])                                      # JSON, but a list
    bin_rec = make(state["runs"], "bin-1")
    (Path(bin_rec.run_dir) / "chain.json").write_bytes(b"\x80\x81\x82")   # not UTF-8

    assert set(records.indexed()) == {"good-1", "dir-1", "list-1", "bin-1"}
    good_ones, damaged = records.load_all()
    assert [r.chain_id for r in good_ones] == ["good-1"]
    assert sorted(e.path.parent.name for e in damaged) == ["bin-1", "dir-1", "list-1"]
    assert [r.chain_id for r in records.all_records()] == ["good-1"]
    assert records.find("good").chain_id == "good-1"                      # unique prefix among the index
    assert records.find(good.run_dir).chain_id == "good-1"
    with pytest.raises(DamagedRecord, match="expected a JSON object, got a list"):
        records.find("list-1")
    with pytest.raises(DamagedRecord, match="it is a directory"):
        records.find(dir_rec.run_dir)
    with pytest.raises(records.HpcjobsError, match="no chain 'gone-1'"):
        records.find("gone-1")
    scanned_damaged = []
    assert [r.chain_id for r in records.scan(state["runs"], damaged=scanned_damaged)] == ["good-1"]
    assert sorted(e.path.parent.name for e in scanned_damaged) == ["bin-1", "dir-1", "list-1"]


# ---------------------------------------------------------------- through the CLI

def _no_traceback(proc):
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr


def test_list_shows_the_good_chains_and_names_the_damaged_ones(state):
    make(state["runs"], "old-1", created="2026-11-20T10:00:00Z")
    make(state["runs"], "new-1", created="2026-11-22T10:00:00Z")
    bad = make(state["runs"], "bad-1", created="2026-11-21T10:00:00Z")
    bad_path = rewrite(bad, lambda d: d.update(stages={"first": {}}))
    worse = make(state["runs"], "worse-1")
    (Path(worse.run_dir) / "chain.json").write_bytes(b"\x00\xff not json")
    hpcjobs = state["cli"]

    proc = hpcjobs("list")
    _no_traceback(proc)
    assert proc.returncode == 0
    assert "old-1" in proc.stdout and "new-1" in proc.stdout
    assert "bad-1" not in proc.stdout and "worse-1" not in proc.stdout
    warnings = proc.stderr.splitlines()
    assert f"warning: {bad_path}: damaged chain record: stages: expected a list, got an object" in warnings
    assert any(w.startswith(f"warning: {Path(worse.run_dir) / 'chain.json'}: damaged chain record: not UTF-8")
               for w in warnings), warnings

    as_json = hpcjobs("list", "--json")
    assert [c["chain"] for c in json.loads(as_json.stdout)] == ["old-1", "new-1"]
    assert "bad-1" in as_json.stderr


def test_status_of_a_damaged_chain_is_one_error_line(state):
    good = make(state["runs"], "fine-1", created="2026-11-20T10:00:00Z")
    bad = make(state["runs"], "bad-2", created="2026-11-21T10:00:00Z")
    path = rewrite(bad, lambda d: d["stages"][0]["attempts"][0].update(n="1"))
    hpcjobs = state["cli"]
    for ref in ("bad-2", bad.run_dir):
        proc = hpcjobs("status", ref, check=False)
        assert proc.returncode == 1
        _no_traceback(proc)
        assert proc.stderr.splitlines() == [
            f"error: {path}: damaged chain record: stages[0].attempts[0].n: expected an integer, got a string '1'"]
        assert proc.stdout == ""
    # Without CHAIN: the latest usable chain, with a warning naming the damaged one.
    proc = hpcjobs("status", "--json")
    assert json.loads(proc.stdout)["chain"] == good.chain_id
    assert proc.stderr.startswith(f"warning: {path}: damaged chain record:")


def test_moved_run_directory_through_the_cli(state, tmp_path):
    rec = make(state["runs"], "moved-1")
    new_root = tmp_path / "new-runs"
    new_root.mkdir()
    shutil.move(rec.run_dir, str(new_root / "moved-1"))
    hpcjobs = state["cli"]
    assert "moved-1" not in hpcjobs("list").stdout                       # the index points at the old place
    proc = hpcjobs("list", "--scan", new_root)
    assert "moved-1" in proc.stdout
    st = hpcjobs.json("status", "moved-1")
    assert st["run_dir"] == str(new_root / "moved-1")


# ---------------------------------------------------------------- piped output keeps every value whole

def test_piped_list_and_status_keep_long_values_whole(state):
    chain_id = f"{LONG_NAME}-20261202-094112-beef"
    rec = make(state["runs"] / ("deep/" * 6), chain_id, name=LONG_NAME)
    hpcjobs = state["cli"]
    env_narrow = {**os.environ, "HPCJOBS_STATE_DIR": str(state["state"]), "COLUMNS": "60"}
    for cli in (hpcjobs, CLI(env=env_narrow)):           # a $COLUMNS meant for a terminal changes nothing
        out = cli("list").stdout
        assert "…" not in out
        row = next(line for line in out.splitlines() if line.startswith(chain_id))
        assert row.split()[:3] == [chain_id, "PENDING", "three-stage"]
        out = cli("status", LONG_NAME).stdout
        assert "…" not in out
        lines = out.splitlines()
        assert lines[0].split()[:2] == ["chain", chain_id]
        assert lines[1] == f"run directory {rec.run_dir}"              # one line, not wrapped
        assert len(lines[1]) > 150


def test_on_a_terminal_long_values_fold_instead_of_being_cut(state):
    chain_id = f"{LONG_NAME}-20261202-094112-cafe"
    make(state["runs"], chain_id, name=LONG_NAME)
    env = {**os.environ, "HPCJOBS_STATE_DIR": str(state["state"]), "FORCE_COLOR": "1", "COLUMNS": "60",
           "TTY_COMPATIBLE": "1"}
    out = CLI(env=env)("list").stdout
    assert "\x1b[" in out                                                 # rich thought it was a terminal
    assert "…" not in out
    assert max(len(line) for line in _plain(out).splitlines()) <= 60
    first_column = "".join(line.split()[0] for line in _plain(out).splitlines()[1:] if line.strip())
    assert chain_id in first_column


def _plain(text):
    import re
    return re.sub(r"\x1b\[[0-9;]*m", "", text)
