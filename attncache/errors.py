"""One exception type for user-facing errors: the CLI prints its message on one line, without a traceback."""


class AttncacheError(Exception):
    """Bad input or an unusable cache. The message names the file, sample or field at fault."""


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
