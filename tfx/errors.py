"""The two kinds of failure a user sees: bad input (exit 2) and a runtime failure (exit 1)."""


class TfxError(Exception):
    """A failure with a message meant for the user; the CLI prints it without a traceback."""

    exit_code = 1


class UsageError(TfxError):
    """Bad input: a malformed recipe, an unknown key or kind, a missing file. Exit code 2."""

    exit_code = 2


class RunError(TfxError):
    """The input was valid but the work failed: a corrupt checkpoint, a NaN loss. Exit code 1."""

    exit_code = 1
