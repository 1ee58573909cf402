"""Errors a user can cause. The CLI turns them into one line on stderr and an exit code."""


class XalError(Exception):
    """A user mistake or bad input: reported as one line, exit code 2, no traceback."""

    exit_code = 2


class PoolError(XalError):
    """A path that is not a pool, an unknown format version, or inconsistent arrays."""
