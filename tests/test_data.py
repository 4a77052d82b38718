"""hpcjobs.train.data: loading, column checks, templating, the 80/10/10 split."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from hpcjobs import datacheck

from hpcjobs.errors import HpcjobsError
from hpcjobs.train import data as D

# check_dataset needs only the stdlib (+ pyarrow for parquet); loading and
# splitting need the train extra's `datasets`.
needs_pyarrow = pytest.mark.skipif(importlib.util.find_spec("pyarrow") is None, reason="needs pyarrow")
needs_datasets = pytest.mark.skipif(importlib.util.find_spec("datasets") is None, reason="needs datasets")

COLS = ["Description", "Patient", "Doctor"]
TEMPLATE = "Description: {Description} Patient: {Patient} Doctor: {Doctor}"


def _rows(n):
    return [{"Description": f"d{i}", "Patient": f"p{i}", "Doctor": f"doc{i}"} for i in range(n)]


def _write(path, rows, fmt):
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "csv":
        import csv

        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return path


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "json", "csv"])
@needs_pyarrow
def test_check_dataset_formats(tmp_path, fmt):
    p = _write(tmp_path / f"d.{fmt}", _rows(10), fmt)
    info = datacheck.check_dataset(p, COLS)
    assert info["format"] == fmt
    assert info["columns"] == COLS
    assert info["rows"] == (10 if fmt in ("parquet", "json") else None)


@needs_pyarrow
def test_check_dataset_is_light(tmp_path):
    """check_dataset must not pull in torch/transformers/datasets (login node)."""
    p = _write(tmp_path / "d.parquet", _rows(5), "parquet")
    code = (
        "import sys; from hpcjobs.datacheck import check_dataset; "
        f"check_dataset({str(p)!r}, {COLS!r}); "
        "bad=[m for m in ('torch','transformers','datasets','trl','peft','deepspeed') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "csv"])
@needs_pyarrow
@needs_datasets
def test_missing_column_message(tmp_path, fmt):
    rows = [{"Description": "d", "Patient": "p"}]
    p = _write(tmp_path / f"d.{fmt}", rows, fmt)
    with pytest.raises(HpcjobsError) as ei:
        datacheck.check_dataset(p, COLS)
    msg = str(ei.value)
    assert str(p) in msg and "'Doctor'" in msg and "found: 'Description', 'Patient'" in msg
    with pytest.raises(HpcjobsError) as ei:
        D.load_table(p, COLS)
    assert str(p) in str(ei.value) and "'Doctor'" in str(ei.value)


@needs_pyarrow
@needs_datasets
def test_empty_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    empty_pq = tmp_path / "e.parquet"
    pq.write_table(pa.table({c: pa.array([], pa.string()) for c in COLS}), empty_pq)
    (tmp_path / "e.jsonl").write_text("\n\n")
    (tmp_path / "e.csv").write_text("Description,Patient,Doctor\n")
    (tmp_path / "z.csv").write_text("")
    (tmp_path / "e.json").write_text("[]")
    for name in ("e.parquet", "e.jsonl", "e.csv", "z.csv", "e.json"):
        p = tmp_path / name
        with pytest.raises(HpcjobsError, match="empty") as ei:
            datacheck.check_dataset(p, COLS)
        assert str(p) in str(ei.value)
        with pytest.raises(HpcjobsError, match="empty"):
            D.load_table(p, COLS)


@needs_pyarrow
@needs_datasets
def test_unreadable_paths(tmp_path):
    with pytest.raises(HpcjobsError, match="not found") as ei:
        datacheck.check_dataset(tmp_path / "nope.parquet", COLS)
    assert "nope.parquet" in str(ei.value)
    with pytest.raises(HpcjobsError, match="directory"):
        datacheck.check_dataset(tmp_path, COLS)
    with pytest.raises(HpcjobsError, match="unsupported dataset format"):
        datacheck.check_dataset(_write(tmp_path / "d.txt", _rows(1), "jsonl"), COLS)
    garbage = tmp_path / "bad.parquet"
    garbage.write_bytes(b"this is not parquet")
    with pytest.raises(HpcjobsError, match="cannot read parquet") as ei:
        datacheck.check_dataset(garbage, COLS)
    assert str(garbage) in str(ei.value)
    with pytest.raises(HpcjobsError, match="cannot read parquet"):
        D.load_table(garbage, COLS)
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"Description": "x"\n')
    with pytest.raises(HpcjobsError, match=r"bad.jsonl:1: invalid JSON"):
        datacheck.check_dataset(bad_jsonl, COLS)
    if os.geteuid() != 0:
        locked = _write(tmp_path / "locked.parquet", _rows(3), "parquet")
        locked.chmod(0)
        try:
            with pytest.raises(HpcjobsError, match="not readable"):
                datacheck.check_dataset(locked, COLS)
        finally:
            locked.chmod(0o644)


def test_template_fields():
    assert D.template_fields(TEMPLATE) == COLS
    assert D.template_fields("{a} {{literal}} {b} {a}") == ["a", "b"]
    with pytest.raises(HpcjobsError, match="positional"):
        D.template_fields("{} and {0}")
    with pytest.raises(HpcjobsError, match="invalid text template"):
        D.template_fields("{unclosed")


@needs_datasets
def test_build_text_and_nulls(tmp_path):
    rows = _rows(3)
    rows[1]["Doctor"] = None
    p = _write(tmp_path / "d.jsonl", rows, "jsonl")
    ds = D.build_text(D.load_table(p, COLS), TEMPLATE)
    assert ds.column_names == ["text"]
    assert ds[0]["text"] == "Description: d0 Patient: p0 Doctor: doc0"
    assert ds[1]["text"] == "Description: d1 Patient: p1 Doctor: "
    with pytest.raises(HpcjobsError, match="'Answer'"):
        D.build_text(D.load_table(p, COLS), "Q: {Patient} A: {Answer}", source=p)


@needs_pyarrow
@needs_datasets
def test_split_sizes_match_reference_and_are_deterministic(tmp_path):
    p = _write(tmp_path / "d.parquet", _rows(1000), "parquet")
    cfg = {"path": str(p), "columns": COLS, "template": TEMPLATE, "split": [0.8, 0.1, 0.1], "seed": 42}
    a = D.load_splits(cfg)
    b = D.load_splits(cfg)
    assert {k: len(v) for k, v in a.items()} == {"train": 800, "test": 100, "eval": 100}
    for k in ("train", "test", "eval"):
        assert list(a[k]["text"]) == list(b[k]["text"])
    # disjoint and complete
    all_texts = list(a["train"]["text"]) + list(a["test"]["text"]) + list(a["eval"]["text"])
    assert len(set(all_texts)) == 1000
    # identical to the hand-written reference workflow
    ds = D.build_text(D.load_table(p, COLS), TEMPLATE)
    ref = ds.train_test_split(test_size=0.2, seed=42)
    ref_rest = ref["test"].train_test_split(test_size=0.5, seed=42)
    assert list(a["train"]["text"]) == list(ref["train"]["text"])
    assert list(a["test"]["text"]) == list(ref_rest["train"]["text"])
    assert list(a["eval"]["text"]) == list(ref_rest["test"]["text"])
    # another seed gives another split
    c = D.load_splits({**cfg, "seed": 7})
    assert list(c["test"]["text"]) != list(a["test"]["text"])


@needs_datasets
def test_split_small_and_odd_sizes(tmp_path):
    p = _write(tmp_path / "d.csv", _rows(25), "csv")
    s = D.load_splits({"path": str(p), "columns": COLS, "template": TEMPLATE})
    assert sum(len(v) for v in s.values()) == 25
    assert len(s["train"]) == 20 and len(s["test"]) + len(s["eval"]) == 5
    with pytest.raises(HpcjobsError, match="split"):
        D.load_splits({"path": str(p), "columns": COLS, "template": TEMPLATE, "split": [0.9, 0.1]})
    tiny = _write(tmp_path / "t.jsonl", _rows(2), "jsonl")
    with pytest.raises(HpcjobsError, match="at least 3"):
        D.load_splits({"path": str(tiny), "columns": COLS, "template": TEMPLATE})
