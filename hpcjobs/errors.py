"""Errors a user can act on. The CLI prints these without a traceback."""

from __future__ import annotations


class HpcjobsError(Exception):
    """Base class: something the user can fix; printed as ``error: <message>``."""

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class ConfigError(HpcjobsError):
    """Bad configuration. Names the key and where it came from (file and line when known)."""

    def __init__(
        self,
        message: str,
        *,
        key: str | None = None,
        source: str | None = None,
        line: int | None = None,
        hint: str | None = None,
    ):
        where = ""
        if source:
            where = f"{source}:{line}: " if line else f"{source}: "
        what = f"{key}: " if key else ""
        super().__init__(f"{where}{what}{message}", hint=hint)
        self.key = key
        self.source = source
        self.line = line


class SlurmError(HpcjobsError):
    """A Slurm command failed; carries the command and its stderr."""
