"""Reading a file the user named (a hostfile, a DeepSpeed config, a YAML layer).

One place for the errors: a missing file, a directory, text that is not UTF-8
or an unreadable file each become a :class:`ConfigError` naming the path.
"""

from __future__ import annotations

import os

from .errors import ConfigError


def read_text(path: "str | os.PathLike[str]", what: str) -> str:
    """The file's text; ``what`` says what the file is ("hostfile", "DeepSpeed config", ...)."""
    name = os.fspath(path)
    try:
        with open(name, encoding="utf-8") as fh:
            return fh.read()
    except FileNotFoundError:
        raise ConfigError(f"{what} not found", source=name) from None
    except IsADirectoryError:
        raise ConfigError(f"{what} is a directory, expected a file", source=name) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} is not UTF-8 text ({exc.reason} at byte {exc.start})", source=name) from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what}: {exc.strerror}", source=name) from None
