"""Small helpers every layer shares: one-line errors, "did you mean", atomic file writes."""

from __future__ import annotations

import difflib
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO

__all__ = [
    "EXIT_ARTIFACTS",
    "EXIT_STORAGE",
    "EXIT_USAGE",
    "atomic_path",
    "atomic_write",
    "check_choice",
    "did_you_mean",
    "one_line",
    "unknown_option_message",
]

#: Exit status of a command or worker that rejected its input: the supervisor does not restart it.
EXIT_USAGE = 2
#: Exit status of a worker that lost its database past the retry window (EX_TEMPFAIL): the supervisor
#: restarts it with backoff.
EXIT_STORAGE = 75
#: Exit status of a worker whose artifact store refused checkpoints several times in a row (EX_IOERR):
#: not restarted either, since a read-only or full store needs an operator first.
EXIT_ARTIFACTS = 74


def one_line(text: object, limit: int | None = None) -> str:
    """``text`` with its white space (newlines included) folded, cut to ``limit`` characters."""
    folded = " ".join(str(text).split())
    return folded if limit is None else folded[:limit]


def did_you_mean(value: object, valid: Sequence[object]) -> str | None:
    """The valid choice closest to ``value``, if any is close."""
    close = difflib.get_close_matches(str(value), [str(v) for v in valid], n=1)
    return close[0] if close else None


def unknown_option_message(kind: str, value: object, valid: Sequence[object]) -> str:
    """One line naming a bad choice, the closest valid one, and all of them."""
    close = did_you_mean(value, valid)
    hint = f" Did you mean {close!r}?" if close else ""
    return f"unknown {kind} {value!r}.{hint} Valid: {', '.join(map(str, valid))}"


def check_choice(what: str, value: str, valid: Sequence[str]) -> None:
    """Raise a one-line ``ValueError`` unless ``value`` is one of ``valid``."""
    if value not in valid:
        close = did_you_mean(value, valid)
        hint = f"; did you mean {close!r}?" if close else ""
        raise ValueError(f"{what} must be one of {', '.join(valid)}, got {value!r}{hint}")


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; moved onto ``path`` whole when the block ends
    without an error, removed otherwise. A reader (or a crash) never sees half a file, and an existing
    file is replaced only by a whole one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], object]) -> Path:
    """Write ``path`` through ``write(file)``, atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as file:
            write(file)
    return Path(path)
