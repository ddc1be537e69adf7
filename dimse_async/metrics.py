"""Prometheus metrics for associations and DIMSE operations (optional: ``prometheus-client``).

>>> metrics = Metrics()            # its own CollectorRegistry unless one is given
>>> metrics.install(ae)            # the AE reports to it (any number of AEs may share one)
>>> metrics.exposition()           # text format for a /metrics endpoint

``prometheus_client`` is imported only when a :class:`Metrics` is created; install the
``metrics`` extra (``pip install dimse_async[metrics]``).

Families (``role`` is ``scp`` for associations we accepted, ``scu`` for those we requested):

- ``dicom_associations_total{role,outcome,reason}``: ended associations; outcome
  ``released``, ``aborted``, ``rejected`` (``reason`` per PS3.8 Table 9-21) or ``failed``
  (the connection ended before negotiation completed: also a TCP probe, a connection
  closed without a byte, on a plain or a TLS port);
- ``dicom_associations_open{role}``: associations (and connections negotiating) now;
- ``dicom_connections_refused_total{reason}``: connections dropped before DICOM started
  (``proxy``: PROXY header from an untrusted address or bad; ``tls``: TLS handshake
  failure; ``pending``: over ``max_pending`` / ``max_pending_per_address``; ``busy``:
  dropped after ``busy_pending_timeout`` on a busy server);
- ``dicom_operations_total{role,service,status}``: completed DIMSE operations by service
  (``C-STORE`` ...) and status category (``success``, ``warning``, ``failure``, ``cancel``,
  PS3.7 Annex C); ``role`` is ours in the operation (``scp``: we performed it);
- ``dicom_operation_seconds{role,service}``: request-to-final-response latency histogram;
- ``dicom_bytes_received_total{role}``, ``dicom_bytes_sent_total{role}``: DICOM bytes
  (PDUs, after TLS decryption), added at each DIMSE message, when an association ends
  and, for live associations, at each scrape;
- ``dicom_errors_total{kind}``: ``spool`` (a data set could not be written to its spool),
  ``storage`` (a C-STORE handler failed to save), ``index`` (stored but not indexed).

Several processes (``--workers N``): with ``PROMETHEUS_MULTIPROC_DIR`` set in their
environment, prometheus_client keeps every value in files there (its multiprocess
mode; the open-associations gauge sums the live processes), and
:class:`MultiProcessMetrics` - in the supervising parent - exposes the sum.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .ae import AE
    from .dimse import Command
    from .operations import Association

__all__ = ["CONTENT_TYPE", "Metrics", "MultiProcessMetrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
_PENDING = (0xFF00, 0xFF01)
_CANCEL_RQ = 0x0FFF


def _role(assoc: Association) -> str:
    return "scu" if assoc.requestor else "scp"


def _service(command: Command) -> str:
    name = command.name
    for suffix in ("-RQ", "-RSP"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _category(code: int) -> str:
    from .dimse import Status

    return Status(code).category


class Metrics:
    """Counters, gauges and histograms fed by every AE it is installed on."""

    def __init__(self, registry: Any = None):
        try:
            from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        except ImportError as exc:  # pragma: no cover - depends on the installation
            raise ImportError("metrics need prometheus-client: pip install 'dimse_async[metrics]'") from exc
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.associations = Counter(
            "dicom_associations", "Ended associations by outcome", ["role", "outcome", "reason"], registry=r
        )
        self.open = Gauge(
            "dicom_associations_open", "Open associations", ["role"], registry=r, multiprocess_mode="livesum"
        )
        self.refused = Counter(
            "dicom_connections_refused", "Connections dropped before DICOM started", ["reason"], registry=r
        )
        self.operations = Counter(
            "dicom_operations", "Completed DIMSE operations", ["role", "service", "status"], registry=r
        )
        self.latency = Histogram(
            "dicom_operation_seconds",
            "DIMSE request to final response",
            ["role", "service"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.errors = Counter("dicom_errors", "Spool, storage and index errors", ["kind"], registry=r)
        self.bytes_received = Counter("dicom_bytes_received", "DICOM bytes received", ["role"], registry=r)
        self.bytes_sent = Counter("dicom_bytes_sent", "DICOM bytes sent", ["role"], registry=r)
        for role in ("scp", "scu"):
            self.bytes_received.labels(role)
            self.bytes_sent.labels(role)
        # Live associations -> [bytes received, bytes sent] already counted.
        self._live: dict[Association, list[int]] = {}
        # (association, role that performs, message id) -> (service, start time)
        self._started: dict[tuple[int, str, int], tuple[str, float]] = {}

    def install(self, ae: AE) -> Metrics:
        """Make ``ae`` report here; returns ``self``."""
        ae.observer = self
        return self

    def exposition(self) -> bytes:
        """The Prometheus text exposition of everything registered."""
        from prometheus_client import generate_latest

        for assoc in list(self._live):
            self._count_bytes(assoc)
        return generate_latest(self.registry)

    def _count_bytes(self, assoc: Association) -> None:
        """Add what ``assoc`` received and sent since it was last counted."""
        counted = self._live.get(assoc)
        if counted is None:
            return
        rx, tx = assoc.oplog.bytes_received, assoc.oplog.bytes_sent
        role = _role(assoc)
        if rx > counted[0]:
            self.bytes_received.labels(role).inc(rx - counted[0])
            counted[0] = rx
        if tx > counted[1]:
            self.bytes_sent.labels(role).inc(tx - counted[1])
            counted[1] = tx

    # ------------------------------------------------------------ observer interface

    def association_started(self, assoc: Association) -> None:
        self._live[assoc] = [0, 0]
        self.open.labels(_role(assoc)).inc()

    def association_ended(self, assoc: Association) -> None:
        if assoc not in self._live:
            return
        self._count_bytes(assoc)
        del self._live[assoc]
        role = _role(assoc)
        self.open.labels(role).dec()
        reason = assoc.end_reason or ""
        if assoc.negotiated is not None:
            outcome, why = ("released", "") if not reason else ("aborted", "")
        elif reason.startswith("rejected"):
            outcome, why = "rejected", reason.rsplit("reason ", 1)[-1]
        else:
            outcome, why = "failed", ""
        self.associations.labels(role, outcome, why).inc()
        key = id(assoc)
        for k in [k for k in self._started if k[0] == key]:
            del self._started[k]

    def connection_probed(self) -> None:
        """A connection to a TLS port closed before its handshake began (a TCP probe):
        ``outcome="failed"``, as a probe of a plain port (a connection that ended before
        negotiation)."""
        self.associations.labels("scp", "failed", "").inc()

    def connection_refused(self, why: str) -> None:
        low = why.lower()
        if "tls" in low:
            reason = "tls"
        elif why == "pending limit":
            reason = "pending"
        elif why == "busy pending timeout" or "a-associate-rq within" in low:
            reason = "busy"
        else:
            reason = "proxy"
        self.refused.labels(reason).inc()

    def error(self, kind: str) -> None:
        self.errors.labels(kind).inc()

    def message_sent(self, assoc: Association, command: Command) -> None:
        self._message(assoc, command, sent=True)

    def message_received(self, assoc: Association, command: Command) -> None:
        self._message(assoc, command, sent=False)

    def _message(self, assoc: Association, command: Command, *, sent: bool) -> None:
        self._count_bytes(assoc)
        field = command.command_field
        if field == _CANCEL_RQ:
            return
        now = assoc.loop.time()
        if command.is_response:
            if command.status in _PENDING:
                return
            # A final response we send ends an operation we performed (our role: SCP);
            # one we receive ends an operation we invoked (SCU).
            key = (id(assoc), "ours" if sent else "theirs", command.message_id_being_responded_to or 0)
            started = self._started.pop(key, None)
            if started is None:
                return
            service, t0 = started
            role = "scp" if sent else "scu"
            self.operations.labels(role, service, _category(command.status or 0)).inc()
            self.latency.labels(role, service).observe(now - t0)
        else:
            # A request we receive is ours to perform; a request we send, theirs.
            key = (id(assoc), "ours" if not sent else "theirs", command.message_id or 0)
            self._started[key] = (_service(command), now)


class MultiProcessMetrics:
    """The sum of every process writing to ``path`` (prometheus_client's multiprocess
    mode): what the supervisor of ``--workers N`` serves on ``/metrics``."""

    def __init__(self, path: str):
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        self.path = path
        self.registry = CollectorRegistry()
        MultiProcessCollector(self.registry, path=path)  # type: ignore[no-untyped-call]

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    def process_dead(self, pid: int) -> None:
        """Drop a dead process's live-gauge files (its counters stay in the totals)."""
        from prometheus_client.multiprocess import mark_process_dead

        mark_process_dead(pid, self.path)  # type: ignore[no-untyped-call]
