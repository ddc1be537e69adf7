"""SIGTERM, SIGINT and SIGHUP of a server command (``serve``, ``store-scp``,
``echo-scp``) from its first line of code on, before its event loop's handlers exist.

Python's defaults kill the process at once (SIGTERM, SIGHUP: exit -15, -1, no log
line) or raise ``KeyboardInterrupt`` wherever it is (SIGINT). A supervisor, a test
or an operator may signal a server that is still starting: reading its
configuration, opening its index, binding its port. :func:`catch` records the signal
instead; start-up then stops cleanly at its next step (:func:`check`: a log line,
exit 0), and :func:`~dimse_async.deploy.serve_until_signalled` acts on one recorded
before its own handlers took over. Standard library only, so that it can be
installed before the rest of the package is imported; it is installed by the
process's entry points only (``python -m dimse_async``, the ``dimse-async``
script), never by a library import or an in-process :func:`~dimse_async.cli.main`.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence
from types import FrameType

__all__ = [
    "SERVER_COMMANDS",
    "StoppedAtStart",
    "catch",
    "catch_for",
    "check",
    "hangups",
    "installed",
    "requested",
    "reset",
]

#: The commands that run until signalled (the others: the default actions).
SERVER_COMMANDS = ("serve", "store-scp", "echo-scp")

_STOPPING = (signal.SIGTERM, signal.SIGINT)
_HANGUP: signal.Signals | None = getattr(signal, "SIGHUP", None)

_requested: list[signal.Signals] = []  # the first stop signal received
_hangups: list[int] = [0]  # SIGHUPs received, not yet logged
_installed: list[bool] = [False]


class StoppedAtStart(Exception):
    """A stop signal came while the command was starting: it ends cleanly (exit 0)."""

    def __init__(self, sig: signal.Signals, step: str):
        super().__init__(f"{sig.name} during start-up ({step})")
        self.signal = sig
        self.step = step


def _on_stop(signum: int, _frame: FrameType | None) -> None:
    if not _requested:
        _requested.append(signal.Signals(signum))


def _on_hangup(_signum: int, _frame: FrameType | None) -> None:
    _hangups[0] += 1


def catch() -> None:
    """Record SIGTERM / SIGINT (and count SIGHUP) from now on instead of Python's
    default actions (main thread only; again after an event loop removed its handlers)."""
    for sig in _STOPPING:
        signal.signal(sig, _on_stop)
    if _HANGUP is not None:
        signal.signal(_HANGUP, _on_hangup)
    _installed[0] = True


def catch_for(argv: Sequence[str]) -> None:
    """:func:`catch` when ``argv`` (the process's arguments) runs a server command."""
    if argv and argv[0] in SERVER_COMMANDS:
        catch()


def installed() -> bool:
    """Whether :func:`catch` was called in this process."""
    return _installed[0]


def requested() -> signal.Signals | None:
    """The stop signal received during start-up, if any."""
    return _requested[0] if _requested else None


def check(step: str) -> None:
    """Raise :class:`StoppedAtStart` when a stop signal was received (start-up goes on
    to ``step`` otherwise)."""
    if _requested:
        raise StoppedAtStart(_requested[0], step)


def hangups() -> int:
    """SIGHUPs received since the last call (each to be logged as ignored)."""
    count, _hangups[0] = _hangups[0], 0
    return count


def reset() -> None:
    """Forget what was received (a process that goes on after handling it)."""
    _requested.clear()
    _hangups[0] = 0
