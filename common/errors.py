"""Errors a user can fix, and how every command reports them (docs/architecture.md: bad input and failure).

A *user error* is bad input, not a bug: a dataset file that does not parse, a rating scale that
does not fit, a damaged or missing checkpoint, a config key that does not exist, a full disk.
Its message is one line and names the file (and the row, where there is one). Every
user-facing command runs its ``main`` inside ``user_errors_exit()``, which prints such an error
as ``error: …`` and exits with status 2; anything else is a bug and keeps its traceback.

This module sits at the bottom of the import order (``common`` → data → models → eval → grpo), so
every package raises the same types:

- ``UserError``: the base; ``DataError`` (a dataset file or row), ``CheckpointError`` (a model
  or checkpoint folder; ``RankAgreedError`` when every rank of a distributed run raises it alike
  and rank 0 alone reports it, ``Stopped`` on SIGTERM); ``common.config.ConfigError`` and
  ``data.images.BadImageError`` are user errors too.
- ``OSError`` (missing file, permission denied, no space left on device) is the user's
  environment, not a bug: it is reported the same way, with the file it names.

Set ``GRPO_TRACEBACK=1`` to see the traceback of a user error as well.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

EXIT_USER_ERROR = 2  # what argparse uses for a bad command line
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


class UserError(Exception):
    """Bad input or a broken environment, reported as one line without a traceback."""


class DataError(UserError, ValueError):
    """A dataset file or row that cannot be used; the message names the file (and row)."""


class CheckpointError(UserError, ValueError):
    """A model or checkpoint folder that is missing, incomplete or damaged; names the file."""


class RankAgreedError(CheckpointError):
    """Raised alike by every rank of a distributed run (a save they agreed had failed): rank 0
    alone prints it, so the log holds one line, not one per rank."""


class Stopped(RankAgreedError):
    """A rank of a distributed run was told to stop (SIGTERM): torchrun stops every rank when one
    fails, a cluster stops a job it preempts. Rank 0 alone reports it."""


def one_line(text: object) -> str:
    """``text`` with every run of white space (new lines included) collapsed to one space."""
    return " ".join(str(text).split())


def describe(error: BaseException) -> str:
    """The one-line message printed for a user error."""
    if isinstance(error, OSError) and not isinstance(error, UserError) and error.strerror:
        where = f": {error.filename}" if error.filename is not None else ""
        return one_line(f"{error.strerror}{where}")
    return one_line(error) or type(error).__name__


def is_user_error(error: BaseException) -> bool:
    return isinstance(error, (UserError, OSError))


@contextlib.contextmanager
def user_errors_exit() -> Iterator[None]:
    """Run a command's body: user errors become ``error: …`` and exit 2, Ctrl-C exits 130."""
    try:
        yield
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except Exception as e:  # noqa: BLE001 — re-raised below unless it is a user error
        if not is_user_error(e) or os.environ.get("GRPO_TRACEBACK"):
            raise
        if isinstance(e, RankAgreedError) and os.environ.get("RANK", "0") != "0":
            raise SystemExit(EXIT_USER_ERROR) from None
        print(f"error: {describe(e)}", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR) from None
