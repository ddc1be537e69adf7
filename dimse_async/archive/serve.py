"""``dimse-async serve``: the archive AE (storage, Q/R, worklist) wired to the index."""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import functools
import os
import shutil
import sqlite3
import threading

from .. import AE, Server, Verification, uids
from ..deploy import Deployment, serve_until_signalled, server_ssl, startup_step
from ..health import HealthServer
from ..log import get_logger
from ..services.qr import MODELS
from ..services.spool import remove_leftovers
from ..services.storage import STORAGE_SOP_CLASSES
from ..workers import WorkerInfo, run_workers, worker_info
from .config import ADMISSION_KEYS, ServeConfig, check_setting, load_config
from .index import Archive, Worklist, relational_queries
from .mpps import MPPS_RETRIEVE
from .normalized import MPPS, STORAGE_COMMITMENT, install_normalized

__all__ = ["archive_ae", "serve", "supervise"]


#: Free bytes below which a failed index is put down to a full file system.
FULL_BELOW = 1 << 20


def store_failure(what: str, exc: BaseException, storage_dir: str) -> str:
    """The one line for a database (the index, the MPPS store) that failed at start, with
    the likely reason when the storage directory's file system is full (SQLite then
    says only "disk I/O error" or "database or disk is full")."""
    line = f"{what}: {exc}"
    try:
        free = shutil.disk_usage(storage_dir).free
    except OSError:
        return line
    if free < FULL_BELOW:
        line += f" (no space left: the file system of {storage_dir} has {free} bytes free)"
    return line


#: What the event loop's thread imports at the first connection and association:
#: imported by :func:`preload` at once (a few ms; later they would wait for the rest).
FIRST_USE = (
    "dimse_async.acceptor",
    "dimse_async.services.verification",
    "dimse_async.services.storage",
    "encodings.idna",
)

#: What the first C-STORE, C-FIND, C-GET/C-MOVE and N-request import, besides pydicom
#: (and numpy with it): loaded by :func:`preload` on a thread once the port listens.
PRELOADED = (
    "pydicom",
    "pydicom.filereader",
    "pydicom.filewriter",
    "dimse_async.codec",
    "dimse_async.services.qr",
    "dimse_async.services.retrieve_scp",
    "dimse_async.services.normalized",
    "dimse_async.archive.matching",
    "dimse_async.archive.query",
)


def _import_all(locked: threading.Event) -> None:
    """Import :data:`PRELOADED` holding the interpreter's import lock: another thread's
    first import of any module meanwhile waits for the end (as when it imported pydicom
    itself) instead of entering a package this thread is initializing, which fails both
    ("partially initialized module"). ``locked`` is set once the lock is held."""
    import _imp
    import importlib

    _imp.acquire_lock()
    locked.set()
    try:
        for name in PRELOADED:
            importlib.import_module(name)
    finally:
        _imp.release_lock()
        uids.pydicom_loading = False


def preload(ae: AE) -> asyncio.Future[None]:
    """Import :data:`PRELOADED` on a thread (~0.3-0.5 s, pydicom's import), started once
    the port listens and the re-index is over, before associations are admitted:
    start-up stays fast, and the first requests do not import pydicom on the event
    loop, which would stall every association meanwhile. Until it is done, C-STORE, Q/R
    and DIMSE-N requests wait for it without blocking the loop (``AE.preloading``), and
    log lines do not look up UID names. The thread takes the import lock while the loop
    waits for it (microseconds): no thread is inside an import then, so none can hold
    a module the preload needs (no deadlock)."""
    import importlib

    for name in FIRST_USE:
        importlib.import_module(name)
    loop = asyncio.get_running_loop()
    uids.pydicom_loading = True
    locked = threading.Event()
    result: concurrent.futures.Future[None] = concurrent.futures.Future()

    def run() -> None:
        try:
            _import_all(locked)
        except BaseException as exc:  # reported below; the first request meets it again
            result.set_exception(exc)
        else:
            result.set_result(None)

    threading.Thread(target=run, name="dimse-preload", daemon=True).start()
    locked.wait(5.0)
    preloading = asyncio.wrap_future(result, loop=loop)

    def done(future: asyncio.Future[None]) -> None:
        if not future.cancelled() and future.exception() is not None:
            get_logger().warning("preloading modules failed", error=str(future.exception()))

    preloading.add_done_callback(done)
    ae.preloading = preloading
    return preloading


def spool_dir(config: ServeConfig) -> str:
    """Where stores in progress are spooled (``.incoming-<pid>-<n>.partial``)."""
    return os.path.join(config.storage_dir, ".incoming")


def archive_ae(config: ServeConfig) -> AE:
    """The ``serve`` AE: verification, all storage classes (SCP and, for C-GET, SCU
    role), Q/R FIND/GET/MOVE in every model and modality worklist."""
    ae = AE(
        config.ae_title,
        require_called_ae=config.require_called_ae,
        allowed_calling_aes=config.allowed_calling_aes,
        max_associations=config.max_associations,
        max_ops_performed=config.max_ops,
        max_ops_invoked=config.max_ops,
        spool_dir=spool_dir(config),
        known_aes=config.known_aes,
        max_move_associations=config.max_move_associations,
        allowed_peer_addresses=config.allowed_peer_addresses,
        network_timeout=config.idle_timeout,
        keepalive_idle=config.keepalive_idle,
        keepalive_interval=config.keepalive_interval,
        keepalive_count=config.keepalive_count,
        max_per_address=config.max_per_address,
        max_per_calling_ae=config.max_per_calling_ae,
        max_pending=config.max_pending,
        max_pending_per_address=config.max_pending_per_address,
        busy_pending_timeout=config.busy_pending_timeout,
        ipv6_prefix=config.ipv6_prefix,
        pdu_timeout=config.pdu_timeout,
        max_request_dataset=config.max_request_dataset,
        max_buffered_output=config.max_buffered_output,
        abort_artim_timeout=config.abort_artim_timeout,
        refusal_log_burst=config.refusal_log_burst,
        refusal_log_interval=config.refusal_log_interval,
        log_operations=config.log_operations,
    )
    ae.add_supported_context(Verification)
    for sop_class in dict.fromkeys([*STORAGE_SOP_CLASSES, *config.storage_classes]):
        ae.add_supported_context(sop_class, config.transfer_syntaxes, scp_role=True)
    for model in MODELS.values():
        for uid in model.values():
            ae.add_supported_context(uid)
    ae.on_extended_negotiation(relational_queries)
    if config.storage_commitment:
        ae.add_supported_context(STORAGE_COMMITMENT)
    if config.mpps:
        ae.add_supported_context(MPPS)
        ae.add_supported_context(MPPS_RETRIEVE)
    return ae


def _worklist(config: ServeConfig) -> Worklist | None:
    """The modality worklist of ``worklist_dir``, within the query budget of every C-FIND."""
    if not config.worklist_dir:
        return None
    return Worklist(config.worklist_dir, max_matches=config.query_max_matches, time_budget=config.query_time_budget)


def apply_args(config: ServeConfig, args: argparse.Namespace) -> None:
    """Command line flags override the configuration file."""
    for arg, key in (
        ("host", "host"),
        ("port", "port"),
        ("aet", "ae_title"),
        ("storage_dir", "storage_dir"),
        ("worklist_dir", "worklist_dir"),
        ("query_max_matches", "query_max_matches"),
        ("query_time_budget", "query_time_budget"),
        ("commitment_max_references", "commitment_max_references"),
        ("retrieve_max_instances", "retrieve_max_instances"),
        ("min_free_space", "min_free_space"),
        ("tls_cert", "tls_cert"),
        ("tls_key", "tls_key"),
        ("tls_ca", "tls_ca"),
        ("tls_handshake_timeout", "tls_handshake_timeout"),
        ("trusted_proxy", "trusted_proxies"),
        ("allowed_peer", "allowed_peer_addresses"),
        ("keepalive_idle", "keepalive_idle"),
        ("keepalive_interval", "keepalive_interval"),
        ("keepalive_count", "keepalive_count"),
        ("idle_timeout", "idle_timeout"),
        ("http_host", "http_host"),
        ("http_port", "http_port"),
        ("drain_grace", "drain_grace"),
        ("drain_delay", "drain_delay"),
        ("max_associations", "max_associations"),
        *((name, name) for name in ADMISSION_KEYS),
        ("workers", "workers"),
        ("paused_wait", "paused_wait"),
    ):
        if getattr(args, arg, None) is not None:
            setattr(config, key, getattr(args, arg))
    if getattr(args, "index", None) is not None:
        config.index = check_setting("index", args.index)
    if getattr(args, "durable", None) is not None:
        config.fsync = args.durable
    if getattr(args, "tls_require_client_cert", False):
        config.tls_require_client_cert = True
    if getattr(args, "proxy_protocol", False):
        config.proxy_protocol = True
    if getattr(args, "log_ops", False):
        config.log_operations = True


def share_limits(config: ServeConfig, info: WorkerInfo) -> None:
    """A worker's part of the limits set for the whole set of workers: associations,
    connections not yet associated, and response bytes queued for peers."""
    config.max_associations = info.share(config.max_associations)
    config.max_pending = info.share(config.max_pending)
    config.max_buffered_output = info.share(config.max_buffered_output)


def deployment(config: ServeConfig) -> Deployment:
    return Deployment(
        ssl=server_ssl(config.tls_cert, config.tls_key, config.tls_ca, config.tls_require_client_cert),
        handshake_timeout=config.tls_handshake_timeout,
        proxy_protocol=config.proxy_protocol,
        trusted_proxies=tuple(config.trusted_proxies),
        http_host=config.http_host,
        http_port=config.http_port,
        drain_grace=config.drain_grace,
        drain_delay=config.drain_delay,
        paused_wait=config.paused_wait,
    )


def supervise(args: argparse.Namespace, argv: list[str]) -> int | None:
    """With ``workers`` > 1: reserve the port, re-index once (association requests
    meanwhile are rejected-transient), then run and supervise the worker processes
    (:mod:`dimse_async.workers`) and return their exit code; ``None`` for one process."""
    try:
        config = load_config(args.config)
        apply_args(config, args)
        deployment(config)
    except (OSError, ValueError) as exc:
        from ..cli.common import EXIT_USAGE, CLIError

        raise CLIError(str(exc), EXIT_USAGE) from None
    if config.workers <= 1:
        args.loaded_config = config  # read once: a FIFO (``--config <(...)``) reads once
        return None
    startup_step("opening the index")
    dep = deployment(config)
    archive = Archive(
        config.storage_dir,
        duplicates=config.duplicates,
        fsync=config.fsync,
        shared=True,
        index=config.index,
        min_free_space=config.min_free_space,
    )

    async def reindex() -> None:
        added, skipped, gone = await archive.reindex()
        get_logger().info("archive re-indexed", added=added, skipped=skipped, gone=gone)

    async def hold(port: int) -> Server:
        """While re-indexing: listen on the workers' port, rejecting (transient)."""
        return await archive_ae(config).start_server(
            config.host,
            port,
            ssl=dep.ssl,
            ssl_handshake_timeout=dep.handshake_timeout,
            proxy_protocol=dep.proxy_protocol,
            trusted_proxies=dep.trusted_proxies,
            reuse_port=True,
            paused=True,
            paused_wait=dep.paused_wait,
        )

    grace = config.drain_grace + config.drain_delay + 15
    http = (config.http_host, config.http_port) if config.http_port is not None else None
    try:  # the archive stays open for /healthz's probe (storage full, index unavailable)
        return run_workers(
            argv,
            config.workers,
            config.host,
            config.port,
            grace=grace,
            prepare=reindex,
            hold=hold,
            http=http,
            check=archive.probe if http is not None else None,
            leftovers=functools.partial(remove_leftovers, spool_dir(config)),
        )
    finally:
        archive.close()


async def serve(args: argparse.Namespace) -> int:
    """Run ``dimse-async serve`` until SIGTERM/SIGINT (then drain); the exit code.

    Before the (possibly long) re-index, the configuration is checked (errors name the
    file), the storage directory must be writable and the port is bound and listening:
    each failure is one line and its exit code (:class:`~dimse_async.cli.common.CLIError`,
    :class:`~dimse_async.exceptions.ListenError`, exit 7). An association request arriving while
    the archive is re-indexed waits up to ``paused_wait`` (5) s, then is answered A-ASSOCIATE-RJ
    rejected-transient (temporary congestion); ``/healthz`` says unready; then
    associations are admitted and the "listening on" line is printed.
    """
    from ..cli.common import EXIT_CONNECT, EXIT_USAGE, CLIError, writable_dir

    try:
        config = getattr(args, "loaded_config", None) or load_config(args.config)
        apply_args(config, args)
        dep = deployment(config)
    except (OSError, ValueError) as exc:
        raise CLIError(str(exc), EXIT_USAGE) from None
    info = worker_info()
    if info is not None:  # one of several workers: the parent's port, a share of the limits
        config.port = info.port
        share_limits(config, info)
        dep.reuse_port = True
        dep.http_port = info.http_port(dep.http_port)
        dep.collect_metrics = info.metrics
    if getattr(args, "require_called_ae", False):
        config.require_called_ae = True
    await asyncio.to_thread(writable_dir, config.storage_dir, "storage directory")
    if config.worklist_dir is not None and not await asyncio.to_thread(os.path.isdir, config.worklist_dir):
        raise CLIError(f"worklist directory {config.worklist_dir!r} does not exist", EXIT_USAGE)
    startup_step("opening the index")  # a signal meanwhile (early_signals): stop here, exit 0
    archive = Archive(
        config.storage_dir,
        duplicates=config.duplicates,
        fsync=config.fsync,
        retrieve_ae_title=config.ae_title,
        shared=info is not None,
        index=config.index,
        query_max_matches=config.query_max_matches,
        query_time_budget=config.query_time_budget,
        retrieve_max_instances=config.retrieve_max_instances,
        min_free_space=config.min_free_space,
    )
    archive.relational_retrieve = config.relational_retrieve
    ae = archive_ae(config)
    archive.install(ae, _worklist(config))
    try:
        extras = install_normalized(ae, archive, config)
    except sqlite3.Error as exc:
        what = f"MPPS store {os.path.join(config.storage_dir, 'mpps.sqlite')}"
        raise CLIError(store_failure(what, exc, config.storage_dir), EXIT_CONNECT) from None
    if config.host in ("", "0.0.0.0", "::") and not (config.allowed_calling_aes or config.allowed_peer_addresses):
        get_logger().warning(
            "listening on all interfaces and accepting any calling AE title; "
            "restrict with host, allowed_calling_aes or allowed_peer_addresses",
            host=config.host or "*",
        )
    counts = {"added": 0, "skipped": 0, "gone": 0, "total": 0}

    async def reindex() -> None:
        """Bring the index up to date with the storage directory (the port is bound
        already: association requests meanwhile get A-ASSOCIATE-RJ rejected-transient)."""
        try:
            counts["added"], counts["skipped"], counts["gone"] = await archive.reindex()
            counts["total"] = await archive.count()
        except archive.backend.errors as exc:
            raise CLIError(
                store_failure(f"index {archive.backend.description}", exc, config.storage_dir), EXIT_CONNECT
            ) from None
        preload(ae)  # after the re-index: its thread's import of pydicom is over

    async def count() -> None:  # a worker: the parent re-indexed already
        try:
            counts["total"] = await archive.count()
        except archive.backend.errors as exc:
            raise CLIError(
                store_failure(f"index {archive.backend.description}", exc, config.storage_dir), EXIT_CONNECT
            ) from None
        preload(ae)

    def announce(server: Server, health: HealthServer | None) -> None:
        print(
            f"{config.ae_title} listening on {config.host}:{server.port}"
            + (" (TLS)" if dep.ssl else "")
            + (" (PROXY protocol)" if dep.proxy_protocol else "")
            + f"; archive {config.storage_dir}: "
            f"{counts['total']} instances ({counts['added']} indexed now, {counts['skipped']} not indexed, "
            f"{counts['gone']} gone)" + (f"; worklist {config.worklist_dir}" if config.worklist_dir else ""),
            flush=True,
        )
        if health is not None:
            print(f"health and metrics on port {health.port}: /healthz, /metrics", flush=True)

    try:
        await serve_until_signalled(
            ae,
            config.host,
            config.port,
            dep,
            announce,
            prepare=reindex if info is None else count,
            check=archive.probe,
        )
    finally:
        await extras.close()
        archive.close()
    return 0
