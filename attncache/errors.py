"""One exception type for user-facing errors: the CLI prints its message on one line, without a traceback."""


class AttncacheError(Exception):
    """Bad input or an unusable cache. The message names the file, sample or field at fault."""


class CacheFormatError(AttncacheError):
    """A cache (possibly from another lab) violates the format spec or fails an integrity check."""
