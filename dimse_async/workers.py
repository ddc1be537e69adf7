"""``--workers N``: N processes accepting on one port, supervised by the parent.

One Python process uses one core. With ``--workers N`` the command starts N copies of
itself as worker processes; each listens on the same port with ``SO_REUSEPORT`` and
the kernel spreads incoming connections among them. The parent binds the port once
(without listening) to reserve it and to resolve port 0, then only supervises:

- a worker that dies (crash, ``kill -9``) is started again after a back-off
  (0.5 s doubling up to 30 s; reset once a worker has run for 30 s); one that fails
  before it ever listened stops the whole set (a configuration or bind error). Once it
  is reaped, the spool files of the stores it was receiving (``.incoming-<pid>-*.partial``,
  ``flock``-ed while written) are removed: the other workers' are never touched;
- SIGTERM / SIGINT are forwarded to every worker, which drains as a single process
  does (:func:`dimse_async.deploy.serve_until_signalled`); workers still running after
  the drain time are killed. The exit code is 0 when every worker exited cleanly;
- workers inherit stderr, so there is one log stream; every line a worker writes
  carries ``worker=<i> pid=<pid>``. Their stdout lines come through the parent, which
  announces the port once all are listening;
- limits are divided: each worker admits ``max(1, max_associations // N)``
  associations and ``max(1, max_pending // N)`` connections not yet associated
  (per-client caps apply in each worker);
- metrics are aggregated: with an HTTP port the parent serves ``/healthz`` (200 while
  at least one worker listens and no stop was asked) and ``/metrics``, the sum over all
  workers. The workers keep their metrics in prometheus_client's multiprocess files in
  a temporary directory the parent creates (``PROMETHEUS_MULTIPROC_DIR``) and removes
  at exit; a dead worker's counters stay in the totals, its live gauges are dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from . import early_signals
from .exceptions import ListenError
from .lazy_dataclass import dataclass
from .log import get_logger, set_process_fields

__all__ = ["WorkerInfo", "run_workers", "worker_info"]

_ENV_WORKER = "DIMSE_ASYNC_WORKER"  # "<i>/<n>" in a worker process
_ENV_PORT = "DIMSE_ASYNC_WORKER_PORT"  # the port the parent reserved
_ENV_METRICS = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's multiprocess mode
_LISTENING = re.compile(r"listening on ")
_STORED = re.compile(r"^stored (\d+) instances$")

BACKOFF_START = 0.5
BACKOFF_MAX = 30.0
STABLE_AFTER = 30.0  # seconds of running after which a worker's back-off starts afresh


@dataclass(frozen=True)
class WorkerInfo:
    """This process's place in a ``--workers N`` set."""

    index: int  # 1 .. count
    count: int
    port: int
    #: The parent serves the summed metrics: this worker collects into the shared files.
    metrics: bool = False

    def share(self, total: int) -> int:
        """This worker's part of a limit set for the whole set (at least 1)."""
        return max(1, total // self.count)

    def http_port(self, port: int | None) -> int | None:
        """No HTTP port of its own: the parent serves ``/healthz`` and ``/metrics``."""
        return None


def worker_info() -> WorkerInfo | None:
    """The :class:`WorkerInfo` when this process is a worker (else ``None``); the first
    call also tags every log line with ``worker`` and ``pid`` and arranges for the
    worker to get SIGTERM if the parent dies."""
    raw = os.environ.get(_ENV_WORKER)
    if not raw:
        return None
    index, _, count = raw.partition("/")
    info = WorkerInfo(int(index), int(count), int(os.environ[_ENV_PORT]), metrics=bool(os.environ.get(_ENV_METRICS)))
    set_process_fields(worker=info.index, pid=os.getpid())
    _die_with_parent()
    return info


def _die_with_parent() -> None:
    """Linux ``prctl(PR_SET_PDEATHSIG, SIGTERM)``: no orphaned workers."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass


def _reserve(host: str, port: int) -> socket.socket:
    """Bind (not listen) ``host:port`` with ``SO_REUSEPORT``: holds the port for the
    workers and resolves port 0 to a real one."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


class _Supervisor:
    def __init__(
        self,
        argv: Sequence[str],
        count: int,
        port: int,
        grace: float,
        http: tuple[str, int] | None = None,
        check: Callable[[], Awaitable[str | None]] | None = None,
        leftovers: Callable[[int], int] | None = None,
    ):
        self.argv = list(argv)
        self.http = http
        self.check = check
        self.leftovers = leftovers
        self.metrics_dir: str | None = None
        self.metrics: Any = None
        self.health: Any = None
        self.count = count
        self.port = port
        self.grace = grace
        self.log = get_logger()
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self.ready: set[int] = set()
        self.announced = False
        self.stopping = asyncio.Event()
        #: The signal forwarded to the workers (also sent to one started after it came).
        self.stop_signal = signal.SIGTERM
        self.failed = False
        self.exit_codes: dict[int, int] = {}
        self.stored = 0
        self.stored_seen = False
        #: Answers on the port while ``prepare`` runs (closed once every worker listens).
        self.placeholder: Any = None

    async def _pump(self, index: int, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            stored = _STORED.match(line)
            if stored:
                self.stored += int(stored.group(1))
                self.stored_seen = True
            elif _LISTENING.search(line):
                self.log.info("worker listening", worker=index, pid=proc.pid)
                self.ready.add(index)
                if not self.announced and len(self.ready) == self.count:
                    self.announced = True
                    self._release_placeholder()
                    pids = ",".join(str(p.pid) for _, p in sorted(self.procs.items()))
                    print(f"{line} ({self.count} workers, pids {pids})", flush=True)
                    if self.health is not None:
                        print(f"health and metrics on port {self.health.port}: /healthz, /metrics", flush=True)
            else:
                print(f"worker {index}: {line}", flush=True)

    async def _run_one(self, index: int) -> None:
        backoff = BACKOFF_START
        loop = asyncio.get_running_loop()
        while True:
            env = dict(os.environ, **{_ENV_WORKER: f"{index}/{self.count}", _ENV_PORT: str(self.port)})
            env.pop(_ENV_METRICS, None)
            if self.metrics_dir is not None:
                env[_ENV_METRICS] = self.metrics_dir
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "dimse_async", *self.argv, stdout=asyncio.subprocess.PIPE, env=env
            )
            self.procs[index] = proc
            self.log.info("worker started", worker=index, pid=proc.pid)
            if self.stopping.is_set():  # the stop came while it was being started: it stops too
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(self.stop_signal)
            started = loop.time()
            pump = asyncio.ensure_future(self._pump(index, proc))
            rc = await proc.wait()
            if self.metrics is not None:
                self.metrics.process_dead(proc.pid)
            await self._remove_leftovers(index, proc.pid)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(pump, 5)
            was_ready = index in self.ready
            self.ready.discard(index)
            if self.stopping.is_set():
                self.exit_codes[index] = rc
                self.log.info("worker exited", worker=index, pid=proc.pid, exit_code=rc)
                return
            if not was_ready and not self.announced:
                self.log.error("worker failed to start; stopping", worker=index, pid=proc.pid, exit_code=rc)
                self.failed = True
                self.stopping.set()
                return
            if loop.time() - started >= STABLE_AFTER:
                backoff = BACKOFF_START
            self.log.warning("worker died; restarting", worker=index, pid=proc.pid, exit_code=rc, delay=backoff)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), backoff)
            if self.stopping.is_set():
                self.exit_codes[index] = rc
                return
            backoff = min(backoff * 2, BACKOFF_MAX)

    async def _remove_leftovers(self, index: int, pid: int) -> None:
        """A worker is gone (reaped): remove what its stores in progress left behind."""
        if self.leftovers is None:
            return
        try:
            removed = await asyncio.to_thread(self.leftovers, pid)
        except Exception as exc:  # never let the clean-up stop the supervision
            self.log.warning("could not remove a dead worker's unfinished stores", worker=index, pid=pid, error=repr(exc))
            return
        if removed:
            self.log.warning("removed a dead worker's unfinished stores", worker=index, pid=pid, files=removed)

    def _forward(self, sig: int) -> None:
        if not self.stopping.is_set():
            self.log.warning("stopping workers", signal=signal.Signals(sig).name)
            self.stop_signal = signal.Signals(sig)
        self.stopping.set()
        for proc in self.procs.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)

    async def _prepare(
        self, prepare: Callable[[], Awaitable[None]], hold: Callable[[int], Awaitable[Any]] | None
    ) -> bool:
        """Run ``prepare`` (e.g. re-index) while ``hold`` (if given) answers on the port;
        ``False`` if a signal came first."""
        self.placeholder = await hold(self.port) if hold is not None else None
        self.log.debug("listening; preparing before starting workers", port=self.port)
        work = asyncio.ensure_future(prepare())
        stopped = asyncio.ensure_future(self.stopping.wait())
        await asyncio.wait([work, stopped], return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if not work.done():
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work
            self.log.warning("stopped before starting workers")
            self._release_placeholder()
            return False
        work.result()
        return True

    def _release_placeholder(self) -> None:
        if self.placeholder is not None:
            self.placeholder.close()
            self.placeholder = None

    async def run(
        self,
        prepare: Callable[[], Awaitable[None]] | None = None,
        hold: Callable[[int], Awaitable[Any]] | None = None,
    ) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._forward, sig)
        if hasattr(signal, "SIGHUP"):  # ignored, as by the workers (deploy.hangup): a terminal's reaches them all
            loop.add_signal_handler(
                signal.SIGHUP,
                self.log.warning,
                "SIGHUP ignored: the configuration is read at start only; restart to apply a new one (SIGTERM drains)",
            )
        early = early_signals.requested()  # before these handlers, since the process began
        if early is not None:
            self._forward(early)
        for _ in range(early_signals.hangups()):
            self.log.warning(
                "SIGHUP ignored: the configuration is read at start only; restart to apply a new one (SIGTERM drains)"
            )
        if self.http is not None:
            await self._serve_http(*self.http)
        try:
            return await self._run(prepare, hold)
        finally:
            if self.health is not None:
                self.health.close()
                await self.health.wait_closed()
            if self.metrics_dir is not None:
                shutil.rmtree(self.metrics_dir, ignore_errors=True)

    async def _serve_http(self, host: str, port: int) -> None:
        """``/healthz`` and the summed ``/metrics`` of the workers on the one HTTP port."""
        from .health import HealthServer

        self.metrics_dir = tempfile.mkdtemp(prefix="dimse-async-metrics-")
        try:
            from .metrics import MultiProcessMetrics

            self.metrics = MultiProcessMetrics(self.metrics_dir)
        except ImportError as exc:  # pragma: no cover - depends on the installation
            self.log.warning("metrics disabled", error=str(exc))
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
            self.metrics_dir = None

        def ready() -> bool:
            return bool(self.ready) and not self.stopping.is_set()

        self.health = await HealthServer(ready, self.metrics, self.check).start(host, port)

    async def _run(
        self,
        prepare: Callable[[], Awaitable[None]] | None,
        hold: Callable[[int], Awaitable[Any]] | None,
    ) -> int:
        if self.stopping.is_set():  # signalled while starting: nothing started yet
            self.log.warning("stopped during start-up", signal=self.stop_signal.name, before="starting workers")
            return 0
        if prepare is not None:
            try:
                if not await self._prepare(prepare, hold):
                    return 0
            except BaseException:
                self._release_placeholder()
                raise
        tasks = [asyncio.ensure_future(self._run_one(i)) for i in range(1, self.count + 1)]
        await self.stopping.wait()
        self._release_placeholder()
        if self.failed:  # stop the others of a set that cannot start
            self._forward(signal.SIGTERM)
        _done, pending = await asyncio.wait(tasks, timeout=self.grace)
        if pending:
            for index, proc in self.procs.items():
                if proc.returncode is None:
                    self.log.error("worker still running after the drain time; killing", worker=index, pid=proc.pid)
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
            await asyncio.wait(pending, timeout=10)
        if self.stored_seen:
            print(f"stored {self.stored} instances", flush=True)
        if self.failed or pending:
            return 1
        # A worker stopped by the forwarded signal before it set up its handler is clean too.
        clean = (0, -signal.SIGTERM, -signal.SIGINT)
        return 0 if all(rc in clean for rc in self.exit_codes.values()) else 1


def run_workers(
    argv: Sequence[str],
    count: int,
    host: str,
    port: int,
    *,
    grace: float,
    prepare: Callable[[], Awaitable[None]] | None = None,
    hold: Callable[[int], Awaitable[Any]] | None = None,
    http: tuple[str, int] | None = None,
    check: Callable[[], Awaitable[str | None]] | None = None,
    leftovers: Callable[[int], int] | None = None,
) -> int:
    """Run the command ``argv`` (``dimse-async`` arguments) as ``count`` supervised
    workers sharing ``host:port``; returns when all have stopped (after SIGTERM/SIGINT
    or a failed start). ``grace``: how long stopping workers get before being killed.

    The port is reserved first: one that cannot be bound raises
    :class:`~dimse_async.exceptions.ListenError` before anything else happens. Then
    ``prepare()`` runs (e.g. re-indexing an archive) while ``hold(port)`` - a server
    listening on the port with ``SO_REUSEPORT``, paused - answers association requests
    rejected-transient; it is closed once every worker listens. ``http``: (host, port)
    where the parent serves ``/healthz`` and the workers' summed ``/metrics``; ``check``
    (the archive's index probe) makes ``/healthz`` 503 while it fails. ``leftovers(pid)``
    runs (in a thread) once a worker is gone, before it is started again: it removes
    what the dead worker's stores in progress left (its spool files) and says how many."""
    try:
        reserved = _reserve(host, port)
    except OSError as exc:
        raise ListenError(host, port, exc) from None
    try:
        actual = int(reserved.getsockname()[1])
        return asyncio.run(_Supervisor(argv, count, actual, grace, http, check, leftovers).run(prepare, hold))
    finally:
        reserved.close()
        if early_signals.installed():  # the loop's handlers are gone: a late signal is recorded
            early_signals.catch()
