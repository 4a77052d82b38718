"""``hpcjobs report``: one self-contained HTML file about a chain, running or finished.

:mod:`.collect` gathers a plain data model (records, accounting, the attempts' files);
:mod:`.html` renders it with ``report.html.j2`` and the vendored uPlot. Login-node code:
standard library, Jinja2 and PyYAML only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..records import ChainRecord

FILE = "report.html"


def write(record: ChainRecord, out: Optional[Path] = None) -> Path:
    """Write the report of ``record`` to ``out`` (default ``<run dir>/report.html``); its path.

    The file gets the user's umask, like everything hpcjobs writes in a run directory."""
    from ..render import write_file
    from . import collect, html

    out = Path(out) if out is not None else Path(record.run_dir) / FILE
    if out.is_dir():
        out = out / FILE
    report = collect.collect(record)
    text = html.render(report, out.absolute().parent)
    # written whole under another name, then renamed: a browser never sees half a report
    tmp = out.with_name(f".{out.name}.tmp")
    write_file(tmp, text)
    tmp.replace(out)
    return out
