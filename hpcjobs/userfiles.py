"""Reading a file the user named (a hostfile, a DeepSpeed config, a YAML layer, a prompts file).

One place for the errors: a missing file, a directory, a device or pipe, a
binary file, text that is not UTF-8, a file too large to be a configuration or
an unreadable file each become a :class:`ConfigError` naming the path.
Stdlib only (the job side reads hostfiles through it too).
"""

from __future__ import annotations

import os
import stat

from .errors import ConfigError

#: Larger than any hostfile, config or prompts file; a bigger one is a mistake
#: (a dataset or a checkpoint passed in the wrong place) and is refused unread.
MAX_BYTES = 64 * 1024 * 1024


def read_text(path: "str | os.PathLike[str]", what: str) -> str:
    """The file's text; ``what`` says what the file is ("hostfile", "DeepSpeed config", ...).

    Line ends are read as ``\\n`` (universal newlines, like text-mode ``open()``);
    a byte order mark is kept (readers that refuse it say so). Only regular files are read (never
    ``/dev/zero`` or a FIFO, which would never end or block).
    """
    name = os.fspath(path)
    try:
        st = os.stat(name)  # before open(): opening a FIFO blocks until someone writes to it
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{what} is not a regular file (a device, pipe or socket)", source=name)
        with open(name, "rb") as fh:
            data = fh.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{what} not found", source=name) from None
    except IsADirectoryError:
        raise ConfigError(f"{what} is a directory, expected a file", source=name) from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what}: {exc.strerror or exc}", source=name) from None
    if len(data) > MAX_BYTES:
        raise ConfigError(f"{what} is larger than {MAX_BYTES // (1024 * 1024)} MiB; is it the right file?",
                          source=name)
    if b"\0" in data:
        at = data.index(b"\0")
        raise ConfigError(f"{what} is not a text file (a NUL byte at byte {at}: binary data?)", source=name)
    try:
        # Universal newlines, as text-mode open() reads (and DeepSpeed reads a hostfile).
        return data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{what} is not UTF-8 text ({exc.reason} at byte {exc.start})",
                          source=name, line=line) from None
