"""Dataset loading, text templating and the deterministic train/test/eval split.

Two layers:

* :func:`hpcjobs.datacheck.check_dataset` uses only pyarrow and the standard
  library, so the login node can validate a dataset before anything is
  submitted (parquet: schema and row count from the footer metadata only;
  jsonl/json/csv: the first record or the header line).
* :func:`load_splits` (and the functions it is built from) runs inside jobs and
  returns ``datasets.Dataset`` objects. ``datasets`` is imported lazily.

The split reproduces the reference workflow::

    split = ds.train_test_split(test_size=0.2, seed=42)        # 80 / 20
    rest = split["test"].train_test_split(test_size=0.5, seed=42)
    train, test, eval = split["train"], rest["train"], rest["test"]

i.e. 80/10/10 for ``split=[0.8, 0.1, 0.1]``: the first half of the held-out
20 % is the *test* split (used by ``evaluate``), the second half the *eval*
split (used for in-training evaluation when ``train.eval_steps`` is set).
Tables are read into memory with pyarrow (no ``datasets`` cache files, so
nothing is written next to the data or under ``HF_HOME`` by the ranks).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from hpcjobs.datacheck import (_check_readable, _json_records, _missing, _missing_error, detect_format,
                               iter_jsonl, template_fields)
from hpcjobs.errors import HpcjobsError

if TYPE_CHECKING:  # pragma: no cover
    import datasets
    import pyarrow

TEXT_FIELD = "text"
DEFAULT_SPLIT = (0.8, 0.1, 0.1)
DEFAULT_SEED = 42

# ----------------------------------------------------------------------------
# full path (inside jobs)
# ----------------------------------------------------------------------------


def read_table(path: str | os.PathLike) -> "pyarrow.Table":
    """Read the whole dataset into a pyarrow Table (errors name the file)."""
    p = _check_readable(path)
    fmt = detect_format(p)
    import pyarrow as pa

    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            return pq.read_table(p)
        if fmt == "csv":
            import pyarrow.csv as pacsv

            # every column as string: a Doctor answer that looks numeric stays text
            with open(p, encoding="utf-8", newline="") as f:
                header = next(csv.reader(f), None)
            if not header:
                return pa.table({})
            convert = pacsv.ConvertOptions(column_types={h: pa.string() for h in header})
            return pacsv.read_csv(p, convert_options=convert)
        if fmt == "jsonl":
            return _table_from_records(_read_jsonl(p))
        # json
        with open(p, encoding="utf-8") as f:
            text = f.read()
        if not text.strip():
            return pa.table({})
        try:
            doc = json.loads(text)
        except json.JSONDecodeError:
            return _table_from_records(_read_jsonl(p))
        return _table_from_records(_json_records(doc, p))
    except HpcjobsError:
        raise
    except Exception as e:
        raise HpcjobsError(f"{p}: cannot read {fmt} dataset: {e}") from None


def _read_jsonl(p: Path) -> list[dict]:
    return list(iter_jsonl(p))


def _table_from_records(records: list[dict]) -> "pyarrow.Table":
    import pyarrow as pa

    if not records:
        return pa.table({})
    names: list[str] = []
    for r in records:
        for k in r:
            if k not in names:
                names.append(k)
    return pa.table({k: [r.get(k) for r in records] for k in names})


def load_table(path: str | os.PathLike, columns: Sequence[str]) -> "datasets.Dataset":
    """Load ``path`` as an in-memory ``datasets.Dataset``; check columns and rows."""
    p = Path(path)
    table = read_table(p)
    if table.num_rows == 0:
        raise HpcjobsError(f"{p}: dataset is empty (no rows)")
    missing = _missing(columns, table.column_names)
    if missing:
        raise _missing_error(p, missing, table.column_names)
    import datasets

    return datasets.Dataset(table)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value != value:  # NaN from pandas-written files
        return ""
    return str(value).strip()


def format_record(template: str, record: dict[str, Any]) -> str:
    """Fill ``template`` from one record; None/NaN become empty strings."""
    return template.format(**{k: _cell(v) for k, v in record.items()})


def build_text(
    ds: "datasets.Dataset",
    template: str,
    *,
    text_field: str = TEXT_FIELD,
    source: str | os.PathLike | None = None,
) -> "datasets.Dataset":
    """Return a dataset with the single column ``text_field`` built from ``template``."""
    names = template_fields(template)
    missing = _missing(names, ds.column_names)
    if missing:
        raise _missing_error(Path(source or "<dataset>"), missing, ds.column_names)

    def fmt(batch: dict[str, list]) -> dict[str, list]:
        n = len(next(iter(batch.values())))
        return {text_field: [format_record(template, {k: batch[k][i] for k in names}) for i in range(n)]}

    return ds.map(fmt, batched=True, remove_columns=ds.column_names, desc=None)


def _normalise_split(split: Sequence[float]) -> tuple[float, float]:
    """(held-out fraction, eval fraction of the held-out part) from [train, test, eval]."""
    if len(split) != 3:
        raise HpcjobsError(f"data.split must be [train, test, eval] fractions, got {list(split)!r}")
    train, test, ev = (float(x) for x in split)
    if min(train, test, ev) < 0 or train <= 0 or test + ev <= 0:
        raise HpcjobsError(f"data.split must have train > 0 and test + eval > 0, got {list(split)!r}")
    total = train + test + ev
    # rounded so that [0.8, 0.1, 0.1] gives exactly 0.2 and 0.5, like the reference
    held_out = round((test + ev) / total, 12)
    eval_part = round(ev / (test + ev), 12)
    return held_out, eval_part


def split_dataset(
    ds: "datasets.Dataset",
    split: Sequence[float] = DEFAULT_SPLIT,
    seed: int = DEFAULT_SEED,
) -> "datasets.DatasetDict":
    """Deterministic train/test/eval split (see module docstring)."""
    import datasets

    held_out, eval_part = _normalise_split(split)
    if len(ds) < 3:
        raise HpcjobsError(f"dataset has {len(ds)} row(s); at least 3 are needed for a train/test/eval split")
    first = ds.train_test_split(test_size=held_out, seed=seed)
    rest = first["test"]
    if eval_part <= 0:
        test, ev = rest, rest.select([])
    elif eval_part >= 1:
        test, ev = rest.select([]), rest
    elif len(rest) < 2:
        test, ev = rest, rest.select([])
    else:
        second = rest.train_test_split(test_size=eval_part, seed=seed)
        test, ev = second["train"], second["test"]
    return datasets.DatasetDict({"train": first["train"], "test": test, "eval": ev})


def load_splits(data_cfg: dict[str, Any]) -> "datasets.DatasetDict":
    """From the ``data`` block of train.json: load, template, split.

    Keys: ``path`` (required), ``columns`` (required columns; default: the
    template's fields), ``template`` (default: the columns joined as
    ``"{col}: {value}"``), ``split`` (default [0.8, 0.1, 0.1]), ``seed``
    (default 42), ``text_field`` (default ``text``).
    """
    if not data_cfg.get("path"):
        raise HpcjobsError("train config: data.path is not set")
    path = data_cfg["path"]
    template = data_cfg.get("template")
    columns = list(data_cfg.get("columns") or [])
    if template is None:
        if not columns:
            raise HpcjobsError("train config: data.template or data.columns must be set")
        template = " ".join(f"{c}: {{{c}}}" for c in columns)
    needed = columns + [c for c in template_fields(template) if c not in columns]
    ds = load_table(path, needed)
    ds = build_text(ds, template, text_field=data_cfg.get("text_field", TEXT_FIELD), source=path)
    return split_dataset(ds, data_cfg.get("split", DEFAULT_SPLIT), int(data_cfg.get("seed", DEFAULT_SEED)))
