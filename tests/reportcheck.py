"""Opening an `hpcjobs report` page in a real headless Chromium (Debian's `chromium` package).

:func:`open_page` loads a file with Chromium once (``--dump-dom`` and ``--screenshot``)
and returns the DOM after its scripts ran, what the page wrote to the console, and every
network request it made. Requests are seen by pointing ``--proxy-server`` at a local socket
that records each connection (``<-loopback>`` sends even localhost through it); Chromium's
own background calls to Google's update, time and account services (which no flag turns
off entirely) are told apart by their exact host names. Console output is read from
``--enable-logging=stderr`` (``CONSOLE`` lines; a report page logs nothing, so any line counts).
"""

from __future__ import annotations

import html as htmlmod
import json
import re
import shutil
import socket
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

#: hosts Chromium itself calls in the background (component and extension updates, network time, sign-in)
CHROMIUM_OWN = {"clients2.google.com", "update.googleapis.com", "accounts.google.com", "redirector.gvt1.com",
                "clients2.googleusercontent.com", "edgedl.me.gvt1.com", "optimizationguide-pa.googleapis.com",
                "safebrowsingohttpgateway.googleapis.com", "content-autofill.googleapis.com"}

FLAGS = ["--no-sandbox", "--headless=new", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-default-apps", "--disable-extensions",
         "--enable-logging=stderr", "--v=0", "--hide-scrollbars"]


@dataclass
class Opened:
    dom: str
    console: List[str]
    requests: List[str]       # "METHOD target" of each request the page made
    screenshot: Path


class _Recorder:
    """A listening socket that records the first line of every connection and closes it."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.lines: List[str] = []
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    data = conn.recv(4096)
                except OSError:
                    data = b""
                self.lines.append(data.split(b"\r\n", 1)[0].decode("latin-1"))

    def close(self):
        self.sock.close()
        self.thread.join(timeout=5)


def _host(request_line: str) -> str:
    parts = request_line.split()
    if len(parts) < 2:
        return ""
    target = parts[1]
    if parts[0] == "CONNECT":
        return target.rsplit(":", 1)[0]
    m = re.match(r"^\w+://([^/:]+)", target)
    return m.group(1) if m else ""


def open_page(page: Path, out_dir: Path, *, screenshot: bool = True, timeout: int = 120) -> Opened:
    exe = shutil.which("chromium")
    assert exe, "chromium is not installed (scripts/install-system-deps.sh installs it)"
    out_dir.mkdir(parents=True, exist_ok=True)
    rec = _Recorder()
    shot = out_dir / "report.png"
    args = FLAGS + [f"--user-data-dir={out_dir / 'chromium-profile'}", f"--proxy-server=http://127.0.0.1:{rec.port}",
                    "--proxy-bypass-list=<-loopback>", "--dump-dom"]
    if screenshot:    # one launch does both: the DOM on stdout, the picture in a file
        args += ["--window-size=1280,2400", f"--screenshot={shot}"]
    try:
        proc = subprocess.run([exe, *args, Path(page).absolute().as_uri()], capture_output=True, text=True,
                              timeout=timeout)
    finally:
        rec.close()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not screenshot or shot.is_file(), proc.stderr[-3000:]
    console = [line for line in proc.stderr.splitlines() if re.search(r":CONSOLE[:(]", line)]
    requests = [line for line in rec.lines if _host(line) not in CHROMIUM_OWN]
    return Opened(proc.stdout, console, requests, shot)


def external_refs(text: str) -> List[str]:
    """src/href/url() values of a page that would reach the network."""
    refs = re.findall(r"""(?:src|href)\s*=\s*["']?((?:https?:)?//[^"' >]+)""", text, re.I)
    refs += re.findall(r"""url\(\s*["']?((?:https?:)?//[^"')]+)""", text, re.I)
    return refs


def timeline_bars(dom: str) -> Dict[str, str]:
    """attempt ("stage/n") -> its state, one per bar of the report's timeline."""
    return dict(re.findall(r'<div class="tl-bar" data-attempt="([^"]+)" data-state="([^"]+)"', dom))


def drawn_points(dom: str, chart_id: str) -> Dict[str, int]:
    """"metric/attempt" -> points the page's script drew in a chart."""
    m = re.search(r'<div[^>]*\bid="' + re.escape(chart_id) + r'"[^>]*>', dom)
    assert m, f"no chart {chart_id} in the page"
    d = re.search(r'data-drawn="([^"]*)"', m.group(0))
    assert d, f"chart {chart_id} was not drawn: {m.group(0)}"
    return json.loads(htmlmod.unescape(d.group(1)))


def logged_steps(progress_jsonl: Path, metric: str = "loss") -> int:
    """Distinct global steps an attempt logged ``metric`` at."""
    steps = set()
    for line in Path(progress_jsonl).read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if isinstance(r, dict) and "event" not in r and metric in r:
            steps.add(r["step"])
    return len(steps)


def check_report(page: Path, out_dir: Path) -> Opened:
    """Open a report: under 2 MB, nothing external, no console output, no request; its DOM."""
    text = Path(page).read_text()
    assert Path(page).stat().st_size < 2 * 1024 * 1024, Path(page).stat().st_size
    assert external_refs(text) == []
    opened = open_page(page, out_dir)
    assert opened.console == [], opened.console
    assert opened.requests == [], opened.requests
    assert opened.screenshot.stat().st_size > 10_000
    # every link is relative and leads to a file
    for href in re.findall(r'href="([^"]+)"', text):
        assert not href.startswith("/") and ":" not in href.split("/")[0], href
        from urllib.parse import unquote

        assert (Path(page).parent / unquote(htmlmod.unescape(href))).exists(), href
    return opened
