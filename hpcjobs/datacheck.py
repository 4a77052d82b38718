"""Checking a dataset on the login node, before anything is submitted.

pyarrow and the standard library only (no torch, transformers or datasets):
parquet is checked from its footer metadata (schema, row count), jsonl/json/csv
from the first record or the header line. ``hpcjobs.train.data`` builds on
these helpers inside the jobs.
"""

from __future__ import annotations

import csv
import json
import os
import string
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from hpcjobs.errors import HpcjobsError

#: suffix -> format name
FORMATS = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
}


# ----------------------------------------------------------------------------
# helpers shared by the light and the full path
# ----------------------------------------------------------------------------


def detect_format(path: str | os.PathLike) -> str:
    """Return ``parquet``, ``jsonl``, ``json`` or ``csv`` from the file suffix."""
    p = Path(path)
    fmt = FORMATS.get(p.suffix.lower())
    if fmt is None:
        raise HpcjobsError(
            f"{p}: unsupported dataset format {p.suffix or '(no suffix)'!r}",
            hint="use one of " + ", ".join(sorted(FORMATS)),
        )
    return fmt


def _check_readable(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise HpcjobsError(f"{p}: dataset not found")
    if p.is_dir():
        raise HpcjobsError(f"{p}: dataset path is a directory, expected a file")
    if not os.access(p, os.R_OK):
        raise HpcjobsError(f"{p}: dataset is not readable (permission denied)")
    return p


def template_fields(template: str) -> list[str]:
    """Names used by a ``str.format`` template, in order of first use.

    Raises HpcjobsError for positional (``{}``/``{0}``) or malformed fields.
    """
    names: list[str] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise HpcjobsError(f"invalid text template {template!r}: {e}") from None
    for _, field, _, _ in parsed:
        if field is None:
            continue
        # "{a.b}" / "{a[0]}" -> base name "a"
        base = field.split(".", 1)[0].split("[", 1)[0]
        if base == "" or base.isdigit():
            raise HpcjobsError(
                f"invalid text template {template!r}: positional field {{{field}}}",
                hint="name the columns, e.g. 'Patient: {Patient}'",
            )
        if base not in names:
            names.append(base)
    return names


def _missing(required: Iterable[str], found: Sequence[str]) -> list[str]:
    have = set(found)
    return [c for c in required if c not in have]


def _missing_error(path: Path, missing: list[str], found: Sequence[str]) -> HpcjobsError:
    return HpcjobsError(
        f"{path}: missing column(s) {', '.join(repr(c) for c in missing)}; "
        f"found: {', '.join(repr(c) for c in found) or '(none)'}",
        hint="fix data.columns / data.template in the recipe, or the dataset",
    )


# ----------------------------------------------------------------------------
# light check (login node): pyarrow + stdlib only
# ----------------------------------------------------------------------------


def check_dataset(path: str | os.PathLike, columns: Sequence[str]) -> dict[str, Any]:
    """Validate a dataset cheaply, without reading it whole.

    Returns ``{"path", "format", "columns", "rows"}``; ``rows`` is exact for
    parquet (footer metadata) and ``None`` for the text formats (only the first
    record / header is read, which is enough to say the file is non-empty).
    Raises :class:`HpcjobsError` naming the file for: a missing/unreadable file,
    an unknown suffix, an unparseable file, an empty file, missing columns.
    """
    p = _check_readable(path)
    fmt = detect_format(p)
    rows: int | None
    try:
        if fmt == "parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise HpcjobsError(
                    f"{p}: checking a parquet dataset needs pyarrow", hint="pip install pyarrow"
                ) from None
            meta = pq.read_metadata(p)
            found = list(meta.schema.to_arrow_schema().names)
            rows = int(meta.num_rows)
        elif fmt == "jsonl":
            found, rows = _first_jsonl_record(p)
        elif fmt == "json":
            found, rows = _first_json_record(p)
        else:  # csv
            found, rows = _csv_header(p)
    except HpcjobsError:
        raise
    except Exception as e:  # pyarrow.ArrowInvalid, OSError, UnicodeDecodeError, ...
        raise HpcjobsError(f"{p}: cannot read {fmt} dataset: {e}") from None
    if rows == 0 or not found:
        raise HpcjobsError(f"{p}: dataset is empty (no rows)")
    missing = _missing(columns, found)
    if missing:
        raise _missing_error(p, missing, found)
    return {"path": str(p), "format": fmt, "columns": found, "rows": rows}


def iter_jsonl(p: Path) -> Iterator[dict]:
    """The records of a JSON-lines file, one object per non-blank line; errors name file:line."""
    with open(p, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise HpcjobsError(f"{p}:{lineno}: invalid JSON line: {e}") from None
            if not isinstance(rec, dict):
                raise HpcjobsError(f"{p}:{lineno}: expected a JSON object per line, got {type(rec).__name__}")
            yield rec


def _first_jsonl_record(p: Path) -> tuple[list[str], int | None]:
    for rec in iter_jsonl(p):
        return list(rec), None
    return [], 0


def _first_json_record(p: Path) -> tuple[list[str], int | None]:
    # A JSON document is parsed whole (json has no streaming in the stdlib);
    # files that are really JSON lines are accepted too.
    with open(p, encoding="utf-8") as f:
        text = f.read()
    if not text.strip():
        return [], 0
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        return _first_jsonl_record(p)
    records = _json_records(doc, p)
    if not records:
        return [], 0
    return list(records[0]), len(records)


def _json_records(doc: Any, p: Path) -> list[dict]:
    if isinstance(doc, dict):
        # {"data": [...]} (a single list value) or a columnar {"col": [..], ...}
        lists = [v for v in doc.values() if isinstance(v, list)]
        if len(doc) == 1 and lists and all(isinstance(r, dict) for r in lists[0]):
            doc = lists[0]
        elif doc and len(lists) == len(doc):
            n = len(lists[0])
            if any(len(v) != n for v in lists):
                raise HpcjobsError(f"{p}: columnar JSON with columns of different lengths")
            return [{k: doc[k][i] for k in doc} for i in range(n)]
        else:
            return [doc]
    if not isinstance(doc, list) or not all(isinstance(r, dict) for r in doc):
        raise HpcjobsError(f"{p}: expected a JSON array of objects (or JSON lines)")
    return doc


def _csv_header(p: Path) -> tuple[list[str], int | None]:
    with open(p, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header:
            return [], 0
        for row in reader:
            if any(cell.strip() for cell in row):
                return [h.strip() for h in header], None
    return [h.strip() for h in header], 0


def column_values(path: str | os.PathLike, column: str) -> Iterator[tuple[int, Any]]:
    """``(row, value)`` of one column, rows 1-based in file order (as the jobs number them):
    for checking the values of a small file on the login node (the caller bounds its size)."""
    p = Path(path)
    fmt = detect_format(p)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        for i, v in enumerate(pq.read_table(p, columns=[column]).column(column).to_pylist(), 1):
            yield i, v
    elif fmt == "jsonl":
        for i, rec in enumerate(iter_jsonl(p), 1):
            yield i, rec.get(column)
    elif fmt == "json":
        with open(p, encoding="utf-8") as f:
            text = f.read()
        try:
            records = _json_records(json.loads(text), p)
        except json.JSONDecodeError:
            records = list(iter_jsonl(p))
        for i, rec in enumerate(records, 1):
            yield i, rec.get(column)
    else:
        with open(p, encoding="utf-8", newline="") as f:
            rows = (r for r in csv.DictReader(f, skipinitialspace=True) if any((v or "").strip() for v in r.values()))
            for i, rec in enumerate(rows, 1):
                yield i, rec.get(column)
