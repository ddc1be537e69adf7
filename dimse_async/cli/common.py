"""Shared pieces of the command line: exit codes, argument types, one-line errors.

Every command reports an error as one line on stderr and exits with a code that says
what kind of failure it was (:data:`EXIT_CODES`); no traceback unless ``--log-level
DEBUG``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:  # imported where used: building a parser loads none of the package
    from pathlib import Path

__all__ = [
    "EXIT_ABORTED",
    "EXIT_CODES",
    "EXIT_CONNECT",
    "EXIT_LOCAL",
    "EXIT_OK",
    "EXIT_REJECTED",
    "EXIT_STATUS",
    "EXIT_TIMEOUT",
    "EXIT_USAGE",
    "CLIError",
    "Parser",
    "add_log_ops",
    "add_logging",
    "add_scu",
    "ae_title",
    "association_errors",
    "check_bindable",
    "log_level",
    "non_negative_int",
    "port",
    "positive_float",
    "positive_int",
    "report",
    "writable_dir",
]

# Exit codes: one per kind of failure, so scripts can tell them apart.
EXIT_OK = 0
EXIT_STATUS = 1  # the peer answered with a failure status (or some operations failed)
EXIT_USAGE = 2  # bad arguments or configuration
EXIT_CONNECT = 3  # cannot connect to the peer
EXIT_REJECTED = 4  # association rejected
EXIT_TIMEOUT = 5  # a timeout expired
EXIT_ABORTED = 6  # association aborted, or no accepted presentation context
EXIT_LOCAL = 7  # a local resource: port in use, directory not writable
EXIT_INTERRUPTED = 130

EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_STATUS: "the peer answered with a failure or warning status",
    EXIT_USAGE: "bad arguments or configuration",
    EXIT_CONNECT: "cannot connect to the peer",
    EXIT_REJECTED: "association rejected (reason printed)",
    EXIT_TIMEOUT: "timeout",
    EXIT_ABORTED: "association aborted, or the peer accepted no suitable presentation context",
    EXIT_LOCAL: "local resource: port in use, directory not writable",
}


class CLIError(Exception):
    """An error the command line reports as one line with exit code ``code``."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


class Parser(argparse.ArgumentParser):
    """``argparse`` with one-line errors (``dimse-async echo: error: ...``) and exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def port(value: str) -> int:
    """A TCP port, 0..65535 (0: any free port, for servers)."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {value!r}: not a number") from None
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {number}: must be 0..65535")
    return number


def _int_at_least(value: str, minimum: int, words: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {value!r}") from None
    if number < minimum:
        raise argparse.ArgumentTypeError(f"{number} must be {words}")
    return number


def non_negative_int(value: str) -> int:
    return _int_at_least(value, 0, "0 or more")


def positive_int(value: str) -> int:
    return _int_at_least(value, 1, "at least 1")


def positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {value!r}") from None
    if not number > 0 or number == float("inf"):
        raise argparse.ArgumentTypeError(f"{value} must be a positive number of seconds")
    return number


def ae_title(value: str) -> str:
    from ..acse import validate_ae_title

    try:
        return validate_ae_title(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def log_level(value: str) -> str:
    if value.upper() not in LEVELS:
        raise argparse.ArgumentTypeError(f"invalid log level {value!r}: one of {', '.join(LEVELS)}")
    return value.upper()


def add_logging(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--log-level", type=log_level, default=default, help=f"{', '.join(LEVELS)} (default {default})")
    p.add_argument("--log-json", action="store_true", help="log as JSON lines on stderr")
    add_log_ops(p)


def add_log_ops(p: argparse.ArgumentParser) -> None:
    """``--log-ops``: one INFO line per successful operation (``AE(log_operations=True)``);
    raises the log level to INFO if it was higher."""
    p.add_argument(
        "--log-ops",
        action="store_true",
        help="log each successful operation at INFO: SOP class/instance UID, status, bytes, ms",
    )


DEFAULT_AET = "DIMSE_ASYNC"
DEFAULT_AEC = "ANY-SCP"


def add_scu(p: argparse.ArgumentParser, timeout: float = 30.0) -> None:
    """Peer address, AE titles and timeout of an SCU command."""
    p.add_argument("host", help="the peer's host name or address")
    p.add_argument("port", type=port, help="the peer's port")
    p.add_argument("--aet", type=ae_title, default=DEFAULT_AET, help=f"our (calling) AE title (default {DEFAULT_AET})")
    p.add_argument(
        "--aec",
        type=ae_title,
        default=DEFAULT_AEC,
        help=f"the peer's (called) AE title (default {DEFAULT_AEC}; our SCPs accept any)",
    )
    p.add_argument(
        "--timeout",
        type=positive_float,
        default=timeout,
        help=f"connect/ACSE/DIMSE timeout in seconds (default {timeout:g})",
    )


async def association_errors(what: str, body: Callable[[], Awaitable[int]]) -> int:
    """Run an SCU ``body``; association failures become one line (prefixed with ``what``,
    the peer) and their exit code."""
    from ..exceptions import (
        AssociationAborted,
        AssociationError,
        AssociationRejected,
        AssociationTimeout,
        ConnectionFailed,
        DIMSEFailure,
        NoAcceptedContext,
    )

    try:
        return await body()
    except ConnectionFailed as exc:
        raise CLIError(f"{what}: {exc}", EXIT_CONNECT) from None
    except AssociationRejected as exc:
        raise CLIError(f"{what}: {exc}", EXIT_REJECTED) from None
    except AssociationTimeout as exc:
        raise CLIError(f"{what}: timeout: {exc}", EXIT_TIMEOUT) from None
    except NoAcceptedContext as exc:
        raise CLIError(f"{what}: {exc}", EXIT_ABORTED) from None
    except DIMSEFailure as exc:  # a malformed or refused reply: the association itself was fine
        raise CLIError(f"{what}: {exc}", EXIT_STATUS) from None
    except (AssociationAborted, AssociationError) as exc:
        raise CLIError(f"{what}: association aborted: {exc}", EXIT_ABORTED) from None


def check_bindable(host: str, port_number: int) -> None:
    """Fail early, as one line (exit 7), when ``host:port`` cannot be bound (in use,
    privileged, no such address), before slow start-up work such as indexing. Bound
    with SO_REUSEADDR like the server itself, so TIME_WAIT leftovers do not count."""
    if port_number == 0:
        return
    import socket

    try:
        infos = socket.getaddrinfo(host or None, port_number, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise CLIError(f"cannot listen on {host}:{port_number}: {exc.strerror or exc}", EXIT_LOCAL) from None
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                raise CLIError(
                    f"cannot listen on {host}:{port_number}: {(exc.strerror or str(exc)).lower()}", EXIT_LOCAL
                ) from None


def writable_dir(path: str | os.PathLike[str], what: str = "directory") -> Path:
    """Create ``path`` if needed and prove we can write there (root ignores mode bits,
    so try it); :class:`CLIError` (exit 7) otherwise."""
    import tempfile
    from pathlib import Path

    directory = Path(path)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise CLIError(f"{what} {str(directory)!r} is not writable: {exc.strerror or exc}", EXIT_LOCAL) from None
    return directory


def report(prog: str, exc: BaseException, level: str) -> int:
    """Print ``exc`` as one line (a traceback too at DEBUG); its exit code."""
    if isinstance(exc, CLIError):
        print(f"{prog}: {exc}", file=sys.stderr)
        return exc.code
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(exc, OSError):
        print(f"{prog}: {exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""), file=sys.stderr)
        return EXIT_LOCAL
    if level == "DEBUG":
        import logging

        logging.getLogger("dimse_async").exception("internal error")
    print(f"{prog}: internal error: {exc!r}", file=sys.stderr)
    return 70  # EX_SOFTWARE
