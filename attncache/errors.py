"""The exceptions of user-facing errors: the CLI prints their message on one line, without a traceback."""

from __future__ import annotations

import re
from collections.abc import Callable


class AttncacheError(Exception):
    """Bad input or an unusable cache. The message names the file, sample or option at fault.

    Options are named by their Python names in backticks: a config's fields (`batch_size`; a nested config's as
    `teacher.weights`) or a function's keyword arguments (`recipe`). Each front end spells them its own way:
    `str()` keeps the Python names, the CLI prints its flags (`--batch-size`, `--weights`)."""

    OPTION = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)`")

    @property
    def options(self) -> list[str]:
        """The options the message names, in order."""
        return self.OPTION.findall(str(self))

    def spelled(self, spell: Callable[[str], str | None]) -> str:
        """The message with each option it names as `spell(name)` writes it (as it is where that is None)."""
        return self.OPTION.sub(lambda m: spell(m[1]) or m[0], str(self))


class ConfigError(AttncacheError):
    """An option the library refuses before any work: a bad value, a missing or conflicting option, an `out` that
    is not this run's to write."""


class CacheFormatError(AttncacheError):
    """A cache (possibly from another lab) violates the format spec or fails an integrity check."""


class DiskFullError(AttncacheError):
    """A filesystem has too little room: a write failed with ENOSPC or EDQUOT (its temporary file is removed), or
    a check before the work found too little free space. Free some (or choose another place) and run again."""


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C or SIGTERM at a step boundary, after saving a checkpoint: re-run to resume.
    (A KeyboardInterrupt, so that code catching Exception does not swallow it.)"""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum, self.message = signum, message
