"""The ``dimse-async`` command line (also ``python -m dimse_async``).

Errors are one line on stderr with an exit code per kind of failure
(:data:`~dimse_async.cli.common.EXIT_CODES`), no traceback. ``find``, ``get``,
``move``, ``check`` and ``commit`` live in their own modules (``add_parser(subparsers)``
and a ``run``).

Start-up is part of every run: only the command being run is set up and only what it
uses is imported (a ``send`` loads neither pydicom nor structlog unless a file needs
decoding or a line is logged); ``--help`` without a command loads every command.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.machinery
import os
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

from .. import __version__, early_signals, run
from . import options, process
from .common import (
    EXIT_CODES,
    EXIT_OK,
    EXIT_STATUS,
    EXIT_USAGE,
    Parser,
    add_log_ops,
    ae_title,
    association_errors,
    check_bindable,
    log_level,
    non_negative_int,
    port,
    positive_float,
    positive_int,
    report,
    writable_dir,
)
from .progress import progress_bar

if TYPE_CHECKING:
    from .. import AE
    from ..deploy import Deployment
    from ..services.send import SendResult
    from ..workers import WorkerInfo

__all__ = ["console", "main"]

#: Commands in their own modules: ``add_parser(subparsers)`` and ``async run(args)``.
MODULES = ("find", "get", "move")
#: Commands with their own ``add_parser(subparsers)`` and a synchronous entry point.
OWN_PARSER = ("check", "commit")


def _module(name: str) -> ModuleType:
    return importlib.import_module(f".{name}", __package__)


LOOPBACK = "127.0.0.1"  # listen on loopback unless told otherwise (--host)


def warn_if_exposed(host: str, *, policy: bool) -> None:
    """Say loudly when an SCP listens on every interface and accepts any calling AE."""
    if host in ("", "0.0.0.0", "::") and not policy:
        from ..log import get_logger

        get_logger().warning(
            "listening on all interfaces and accepting any calling AE title; restrict with --host or --allowed-peer",
            host=host or "*",
        )


_ae_title = ae_title


def _sop_class(value: str) -> str:
    from ..part10 import valid_uid

    if not valid_uid(value):
        raise argparse.ArgumentTypeError(f"not a UID: {value!r}")
    return value


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", type=log_level, default="ERROR", help="DEBUG, INFO, WARNING or ERROR (default)")
    p.add_argument("--log-json", action="store_true", help="log as JSON lines")
    add_log_ops(p)


def _scp_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--require-called-ae",
        action="store_true",
        help="reject associations not called by our AE title (default: accept any called AE title)",
    )
    p.add_argument("--any-called-ae", action="store_true", help=argparse.SUPPRESS)  # the default now
    p.add_argument("--log-level", type=log_level, default="INFO", help="DEBUG, INFO (default), WARNING or ERROR")
    p.add_argument("--log-json", action="store_true", help="log as JSON lines")
    add_log_ops(p)


def _parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command line; with ``command``, only that command's arguments are set up."""
    epilog = "exit codes: " + "; ".join(f"{code} {text}" for code, text in EXIT_CODES.items())
    parser = Parser(prog="dimse-async", description="asyncio DICOM networking tools", epilog=epilog)
    parser.add_argument("--version", action="version", version=f"dimse-async {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, build in _BUILDERS.items():
        if command is None or name == command:
            build(sub)
    for name, cmd in sub.choices.items():
        cmd.epilog = epilog if name != "check" else cmd.epilog
        cmd.add_argument("--version", action="version", version=f"dimse-async {__version__}")
    return parser


def _add_echo(sub: Any) -> None:
    echo = sub.add_parser("echo", help="C-ECHO (verification) SCU")
    echo.add_argument("host")
    echo.add_argument("port", type=port)
    echo.add_argument("--aet", type=_ae_title, default="DIMSE_ASYNC", help="our (calling) AE title")
    echo.add_argument("--aec", type=_ae_title, default="ANY-SCP", help="the peer's (called) AE title")
    echo.add_argument("--repeat", type=positive_int, default=1, help="number of C-ECHOs on the association")
    echo.add_argument("--timeout", type=positive_float, default=30.0, help="connect/ACSE/DIMSE timeout in seconds")
    _common(echo)
    options.add_client_connection(echo)


def _add_echo_scp(sub: Any) -> None:
    scp = sub.add_parser("echo-scp", help="verification SCP")
    scp.add_argument("--host", default=LOOPBACK, help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    scp.add_argument("--port", type=port, default=11112)
    scp.add_argument("--aet", type=_ae_title, default="DIMSE_ASYNC", help="our AE title")
    scp.add_argument("--max-associations", type=positive_int, default=1000)
    _scp_common(scp)
    _server_options(scp)


def _add_serve(sub: Any) -> None:
    serve = sub.add_parser("serve", help="the archive: storage, query/retrieve and worklist SCP")
    serve.add_argument("--config", help="TOML configuration file (see dimse_async/archive/config.py)")
    serve.add_argument("--host", help="address to listen on (config: host, default 127.0.0.1)")
    serve.add_argument("--port", type=port, help="port (config: port, default 11112)")
    serve.add_argument("--aet", type=_ae_title, help="our AE title (config: ae_title)")
    serve.add_argument(
        "--storage-dir", help="archive directory (config: storage_dir, default ~/.local/share/dimse-async/archive)"
    )
    serve.add_argument("--worklist-dir", help="directory of worklist files (config: worklist_dir)")
    serve.add_argument(
        "--query-max-matches",
        type=positive_int,
        metavar="N",
        help="a C-FIND stops with 0xA700 past N matches (config: query_max_matches, default 50000)",
    )
    serve.add_argument(
        "--query-time-budget",
        type=float,
        metavar="S",
        help="... or past S seconds (config: query_time_budget, default 60)",
    )
    serve.add_argument(
        "--commitment-max-references",
        type=positive_int,
        metavar="N",
        help="a storage commitment request with more than N references is refused 0x0213 "
        "(config: commitment_max_references, default 10000)",
    )
    serve.add_argument(
        "--retrieve-max-instances",
        type=positive_int,
        metavar="N",
        help="a C-GET / C-MOVE matching more than N instances is refused 0xA702 "
        "(config: retrieve_max_instances, default 100000)",
    )
    serve.add_argument(
        "--min-free-space",
        type=non_negative_int,
        metavar="BYTES",
        help="below this many bytes free in the storage, stores are refused 0xA700 and /healthz is 503 "
        "(config: min_free_space, default 1048576; 0: off)",
    )
    serve.add_argument(
        "--max-associations", type=positive_int, help="associations at once (config: max_associations)"
    )
    serve.add_argument("--workers", type=positive_int, help="worker processes sharing the port (config: workers, default 1)")
    serve.add_argument(
        "--paused-wait",
        type=positive_float,
        metavar="S",
        help="while the archive is re-indexed at start-up, an association request waits up to S seconds, "
        "then is rejected-transient (config: paused_wait, default 5)",
    )
    serve.add_argument(
        "--index",
        metavar="URL",
        help="index database: postgresql://user@host/db, shared by several nodes (config: index; default SQLite in the storage directory)",
    )
    serve.add_argument(
        "--durable",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fsync each file and its directory before answering success (config: durable, default on)",
    )
    _scp_common(serve)
    _server_options(serve)


def _add_store_scp(sub: Any) -> None:
    store = sub.add_parser("store-scp", help="storage SCP writing Part 10 files")
    store.add_argument("--host", default=LOOPBACK, help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    store.add_argument("--port", type=port, default=11112)
    store.add_argument("--out", default="dicom-in", help="directory for received files (default ./dicom-in)")
    store.add_argument("--aet", type=_ae_title, default="DIMSE_ASYNC", help="our AE title")
    store.add_argument("--max-associations", type=positive_int, default=1000)
    store.add_argument("--window", type=positive_int, default=16, help="concurrent operations per association")
    store.add_argument(
        "--sop-class",
        type=_sop_class,
        action="append",
        default=[],
        metavar="UID",
        help="also accept this storage SOP class (repeatable; every PS3.4 Annex B class is accepted already)",
    )
    store.add_argument("--workers", type=positive_int, default=1, help="worker processes sharing the port (default 1)")
    store.add_argument(
        "--durable",
        action="store_true",
        help="fsync each file and its directory before answering success (group commit across stores)",
    )
    store.add_argument(
        "--min-free-space",
        type=non_negative_int,
        default=1 << 20,
        metavar="BYTES",
        help="below this many bytes free in --out's file system (or with it read-only), stores are refused "
        "0xA700 and /healthz is 503 (default 1048576; 0: read-only only)",
    )
    _scp_common(store)
    _server_options(store)


def _add_send(sub: Any) -> None:
    send = sub.add_parser("send", help="C-STORE files to a storage SCP")
    send.add_argument("host")
    send.add_argument("port", type=port)
    send.add_argument("paths", nargs="+", metavar="PATH")
    send.add_argument("--recurse", "-r", action="store_true", help="descend into directories")
    send.add_argument("--aet", type=_ae_title, default="DIMSE_ASYNC", help="our (calling) AE title")
    send.add_argument("--aec", type=_ae_title, default="ANY-SCP", help="the peer's (called) AE title")
    send.add_argument("--associations", type=positive_int, default=1, help="parallel associations")
    send.add_argument("--window", type=positive_int, default=1, help="C-STOREs in flight per association")
    send.add_argument("--timeout", type=positive_float, default=60.0, help="connect/ACSE/DIMSE timeout in seconds")
    _common(send)
    options.add_client_connection(send)
    send.add_argument(
        "--idle-release", type=float, metavar="S", help="release an association idle for S seconds (NAT friendly)"
    )


def _add_module(name: str) -> Callable[[Any], None]:
    def build(sub: Any) -> None:
        _module(name).add_parser(sub)

    return build


#: Every command, in the order ``--help`` lists them.
_BUILDERS: dict[str, Callable[[Any], None]] = {
    "echo": _add_echo,
    "echo-scp": _add_echo_scp,
    "serve": _add_serve,
    "store-scp": _add_store_scp,
    "send": _add_send,
    **{name: _add_module(name) for name in (*OWN_PARSER, *MODULES)},
}


def prefix_length(text: str) -> int:
    """An IPv6 prefix length, 1 to 128 (``--ipv6-prefix``)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 128:
        raise argparse.ArgumentTypeError(f"{text!r} is not a prefix length from 1 to 128")
    return value


#: Admission control and bounded input and time (AE settings; serve: the same keys in TOML).
ADMISSION: tuple[tuple[str, Callable[[str], Any], str], ...] = (
    ("max_per_address", int, "associations from one client address (default 256)"),
    ("max_per_calling_ae", int, "associations from one calling AE title (default 256)"),
    ("max_pending", int, "connections that have not sent an A-ASSOCIATE-RQ yet (default 1024)"),
    ("max_pending_per_address", int, "such connections from one address (default 256)"),
    (
        "busy_pending_timeout",
        positive_float,
        "seconds such a connection may wait once half of max_pending is taken, then dropped, oldest first (default 5)",
    ),
    (
        "ipv6_prefix",
        prefix_length,
        "per-address limits count an IPv6 client by this prefix length (default 64; 128: exact)",
    ),
    ("pdu_timeout", float, "seconds a started PDU gets to arrive whole, however slowly (default 60)"),
    ("max_request_dataset", int, "largest identifier in bytes; larger is refused 0xA700 (default 1 MiB)"),
    ("max_buffered_output", int, "bytes queued for peers not reading (responses, C-GET data sets), all workers together (default 64 MiB)"),
    ("abort_artim_timeout", float, "seconds a peer gets to close the connection after our A-ABORT (default 5)"),
    (
        "refusal_log_burst",
        positive_int,
        "warnings about refused connections logged in full per kind and client address in each interval (default 5)",
    ),
    ("refusal_log_interval", positive_float, "... that interval in seconds; the rest are counted into one line (default 10)"),
)


def _add_admission(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("admission control (over a cap: A-ASSOCIATE-RJ transient, local limit exceeded)")
    for name, kind, what in ADMISSION:
        g.add_argument("--" + name.replace("_", "-"), type=kind, metavar="S" if kind in (float, positive_float) else "N", help=what)


def _server_options(p: argparse.ArgumentParser) -> None:
    options.add_server_tls(p)
    options.add_keepalive(p)
    options.add_deployment(p)
    _add_admission(p)


def _server_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """AE settings from the keepalive and deployment flags (absent ones: defaults)."""
    get = args.__dict__.get
    kw = options.keepalive_kwargs(get("keepalive_idle"), get("keepalive_interval"), get("keepalive_count"))
    if get("idle_timeout") is not None:
        kw["network_timeout"] = get("idle_timeout")
    if get("allowed_peer"):
        kw["allowed_peer_addresses"] = get("allowed_peer")
    for name, _, _ in ADMISSION:
        if get(name) is not None:
            kw[name] = get(name)
    if get("log_ops"):
        kw["log_operations"] = True
    return kw


async def _echo(args: argparse.Namespace) -> int:
    from .. import AE, Verification

    ae = AE(
        args.aet,
        **options.client_kwargs(args),
    )
    ae.add_requested_context(Verification)
    where = f"{args.aec}@{args.host}:{args.port}"
    connection = options.associate_kwargs(args)

    async def echo() -> int:
        async with ae.associate(args.host, args.port, args.aec, async_ops=(1, 1), **connection) as assoc:
            for i in range(args.repeat):
                status = await assoc.c_echo()
                if not status.is_success:
                    print(f"dimse-async echo: C-ECHO {i + 1} to {where}: {status}", file=sys.stderr)
                    return EXIT_STATUS
        return EXIT_OK

    if await association_errors(where, echo) != EXIT_OK:
        return EXIT_STATUS
    print(f"C-ECHO to {where}: success" + (f" ({args.repeat} times)" if args.repeat > 1 else ""))
    return EXIT_OK


def _deployment(args: argparse.Namespace, command: str) -> Deployment | None:
    try:
        return options.deployment_from_args(args)
    except (OSError, ValueError) as exc:
        print(f"dimse-async {command}: {exc}", file=sys.stderr)
        return None


async def _serve_verification(args: argparse.Namespace) -> int:
    from .. import AE, Verification
    from ..deploy import serve_until_signalled

    dep = _deployment(args, "echo-scp")
    if dep is None:
        return EXIT_USAGE
    check_bindable(args.host, args.port)
    ae = AE(
        args.aet,
        require_called_ae=args.require_called_ae,
        max_associations=args.max_associations,
        **_server_kwargs(args),
    )
    ae.add_supported_context(Verification)
    warn_if_exposed(args.host, policy=bool(getattr(args, "allowed_peer", None)))
    await serve_until_signalled(
        ae,
        args.host,
        args.port,
        dep,
        options.announce(f"{args.aet} listening on {args.host}:{{port}} (verification)"),
    )
    return EXIT_OK


#: ``store-scp`` writes a data set larger than this to disk as it arrives (the writes
#: overlap the transfer, so little is left to write once the last fragment is in);
#: smaller ones are written in one job once complete.
STREAM_TO_DISK_ABOVE = 512 << 10


def storage_ae(args: argparse.Namespace) -> AE:
    """An AE accepting verification and every storage SOP class in the usual syntaxes."""
    from .. import AE, Verification
    from ..services.storage import STORAGE_SOP_CLASSES, STORE_TRANSFER_SYNTAXES

    ae = AE(
        args.aet,
        require_called_ae=bool(getattr(args, "require_called_ae", False)),
        max_associations=args.max_associations,
        max_ops_performed=args.window,
        spool_dir=os.path.join(args.out, ".incoming"),
        spool_threshold=STREAM_TO_DISK_ABOVE,
        **_server_kwargs(args),
    )
    ae.add_supported_context(Verification)
    for sop_class in dict.fromkeys([*STORAGE_SOP_CLASSES, *(getattr(args, "sop_class", None) or [])]):
        ae.add_supported_context(sop_class, STORE_TRANSFER_SYNTAXES)
    return ae


def remove_earlier_leftovers(out: str) -> None:
    """``store-scp`` starting (before any worker): remove the spool files of an earlier
    run that died mid-store (kill -9, power loss); a running process's stay."""
    from ..log import get_logger
    from ..services.spool import remove_leftovers

    removed = remove_leftovers(os.path.join(out, ".incoming"))
    if removed:
        get_logger().warning("removed unfinished stores of an earlier run", files=removed)


def _share_limits(args: argparse.Namespace, info: WorkerInfo) -> None:
    """A worker's part of the limits set for the whole set of workers (defaults as in ``AE``)."""
    args.max_associations = info.share(args.max_associations)
    args.max_pending = info.share(1024 if args.max_pending is None else args.max_pending)
    args.max_buffered_output = info.share((64 << 20) if args.max_buffered_output is None else args.max_buffered_output)


async def _store_scp(args: argparse.Namespace) -> int:
    import asyncio

    from ..deploy import serve_until_signalled
    from ..services.storage import DirectoryStore
    from ..workers import worker_info

    dep = _deployment(args, "store-scp")
    if dep is None:
        return EXIT_USAGE
    info = worker_info()
    if info is not None:  # one of --workers N: the parent's port, a share of the limits
        args.port = info.port
        _share_limits(args, info)
        dep.reuse_port = True
        dep.http_port = info.http_port(dep.http_port)
        dep.collect_metrics = info.metrics
    await asyncio.to_thread(writable_dir, args.out, "output directory")
    if info is None:  # workers share the parent's port (SO_REUSEPORT)
        check_bindable(args.host, args.port)
        await asyncio.to_thread(remove_earlier_leftovers, args.out)
    ae = storage_ae(args)
    store = DirectoryStore(args.out, durable=args.durable, min_free_space=args.min_free_space)
    ae.on_c_store(store)
    warn_if_exposed(args.host, policy=bool(getattr(args, "allowed_peer", None)))
    await serve_until_signalled(
        ae,
        args.host,
        args.port,
        dep,
        options.announce(f"{args.aet} listening on {args.host}:{{port}}, storing into {args.out}"),
        check=store.space.probe if store.space is not None else None,
    )
    print(f"stored {store.stored} instances", flush=True)
    return EXIT_OK


async def _send(args: argparse.Namespace) -> int:
    from .. import AE
    from ..services.send import collect_files, send_files

    process.freeze_imports()
    try:
        paths = collect_files(args.paths, args.recurse)
    except ValueError as exc:
        print(f"dimse-async send: {exc}", file=sys.stderr)
        return EXIT_USAGE
    connection = options.associate_kwargs(args)
    ae = AE(
        args.aet,
        **options.client_kwargs(args),
    )
    with progress_bar("sending", total=len(paths), unit="instances") as bar:

        def progress(res: SendResult) -> None:
            bar.advance(1, res.size if res.ok else 0)

        try:
            report = await send_files(
                ae,
                args.host,
                args.port,
                args.aec,
                paths,
                associations=args.associations,
                window=args.window,
                progress=progress,
                **connection,
            )
        except ValueError as exc:
            print(f"dimse-async send: {exc}", file=sys.stderr)
            return EXIT_USAGE
    failed = report.failed
    ok = len(report.results) - len(failed)
    mb = report.bytes_sent / 1e6
    print(
        f"sent {ok}/{len(report.results)} instances, {mb:.1f} MB in {report.seconds:.2f} s "
        f"({ok / max(report.seconds, 1e-6):.1f} instances/s, {mb / max(report.seconds, 1e-6):.1f} MB/s)"
        + (f", {len(failed)} failed" if failed else "")
    )
    for res in failed:
        print(f"FAILED {res.path}: {res.error or res.status}", file=sys.stderr)
    return EXIT_STATUS if failed else EXIT_OK


def _command(argv: list[str]) -> str | None:
    """The command named on the command line (the first argument), if it is one
    ("" for a lone ``--version``: no command needs setting up)."""
    if argv == ["--version"]:
        return ""
    return argv[0] if argv and argv[0] in _BUILDERS else None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    process.tune_gc()  # before parsing: checking AE titles imports the protocol's modules
    try:
        args = _parser(_command(argv)).parse_args(argv)
    except SystemExit as exc:
        if exc.code == EXIT_USAGE and "check" in argv:
            return int(_module("check").UNKNOWN)  # monitoring convention: bad arguments are UNKNOWN
        raise
    if args.command != "send":  # a sender receives only short responses (and saves importing ctypes)
        process.tune_allocator()
    process.freeze_imports()
    process.quiet_pydicom()
    level = args.log_level
    if getattr(args, "log_ops", False) and level in ("WARNING", "ERROR", "CRITICAL"):
        level = "INFO"  # --log-ops asks for the INFO lines
    from ..log import configure_logging

    configure_logging(level, json=args.log_json)
    process.lean_log_records()
    try:
        early_signals.check("starting")
        return _dispatch(args, argv)
    except early_signals.StoppedAtStart as exc:
        return _stopped_at_start(exc)
    except (Exception, KeyboardInterrupt) as exc:
        return report(f"dimse-async {args.command}", exc, args.log_level)


def _stopped_at_start(exc: early_signals.StoppedAtStart) -> int:
    """A server command signalled to stop while starting (:mod:`~dimse_async.early_signals`):
    one line, exit 0 (a stop asked for, as a drain after start-up)."""
    from ..log import get_logger

    get_logger().warning("stopped during start-up", signal=exc.signal.name, before=exc.step)
    return EXIT_OK


#: Commands whose process ends at once when they return (:func:`process.exit_now`):
#: clients that leave no file or database open for the interpreter's teardown to close.
QUICK_EXIT = ("echo", "send")


def console() -> int:
    """The ``dimse-async`` program (and ``python -m dimse_async``): :func:`main` on the
    process's arguments; a :data:`QUICK_EXIT` command's process then ends at once. A
    server command records SIGTERM / SIGINT / SIGHUP from here on
    (:mod:`~dimse_async.early_signals`; ``python -m dimse_async`` before its imports)."""
    early_signals.catch_for(sys.argv[1:])
    code = main()
    if _command(sys.argv[1:]) in QUICK_EXIT:
        return process.exit_now(code)
    return code


def _dispatch(args: argparse.Namespace, argv: list[str]) -> int:
    if args.command in MODULES:
        return int(run(_module(args.command).run(args)))
    if args.command == "echo":
        return run(_echo(args))
    if args.command == "echo-scp":
        return run(_serve_verification(args))
    if args.command == "serve":
        from ..archive.serve import serve, supervise
        from ..workers import worker_info

        if worker_info() is None:
            code = supervise(args, argv)
            if code is not None:
                return code
        return run(serve(args))
    if args.command == "store-scp":
        from ..workers import worker_info

        if args.workers > 1 and worker_info() is None:
            import functools

            from ..services.spool import remove_leftovers
            from ..space import StorageSpace
            from ..workers import run_workers

            dep = _deployment(args, "store-scp")
            if dep is None:
                return EXIT_USAGE
            grace = dep.drain_grace + dep.drain_delay + 15
            http = (dep.http_host, dep.http_port) if dep.http_port is not None else None
            remove_earlier_leftovers(args.out)
            leftovers = functools.partial(remove_leftovers, os.path.join(args.out, ".incoming"))
            space = StorageSpace(args.out, args.min_free_space)  # /healthz: the workers' storage
            check = space.probe if http is not None else None
            return run_workers(
                argv, args.workers, args.host, args.port, grace=grace, http=http, check=check, leftovers=leftovers
            )
        return run(_store_scp(args))
    if args.command == "send":
        return run(_send(args))
    if args.command == "check":
        return int(_module("check").run(args))
    if args.command == "commit":
        return int(_module("commit").main(args))
    return EXIT_USAGE  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
