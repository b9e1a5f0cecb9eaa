"""Errors a person can act on: each carries a one-line message that says what to fix."""


class MoeshareError(Exception):
    """Base of every error the CLI prints as one line instead of a traceback."""


class CheckpointError(MoeshareError):
    """A checkpoint directory or file that cannot be read or written as asked."""


def one_line(error: BaseException) -> str:
    """An error whole, its type first, on one line (every run of whitespace one space)."""
    return " ".join(f"{type(error).__name__}: {error}".split())


def summary(error: BaseException, limit: int = 200) -> str:
    """An unforeseen error as one short line: its type and the first line of its message."""
    return (f"{type(error).__name__}: {error}".splitlines() or [""])[0][:limit]
