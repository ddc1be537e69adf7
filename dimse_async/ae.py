"""The application entity: configuration, handlers, ``associate()`` and ``start_server()``."""

from __future__ import annotations

import asyncio
import functools
import socket
import ssl as ssl_module
from collections.abc import Awaitable, Callable, Iterable
from ssl import SSLContext
from typing import TYPE_CHECKING, Any

from .acse import AcceptorPolicy, ContextSpec, Negotiated, build_request, negotiate, validate_ae_title
from .budget import OutputBudget
from .dimse import CommandField, Message
from .exceptions import AssociationTimeout, ConnectionFailed
from .handlers import HandlerRegistry, Service
from .interface import DIMSEProvider, ServiceHandler, Settings, SinkFactory
from .keepalive import set_nodelay
from .log import get_logger
from .operations import Association
from .pdu import (
    AssociateAC,
    AssociateRJ,
    AssociateRQ,
    PresentationReason,
    RejectResult,
    RejectSource,
    SOPClassCommonExtended,
    SOPClassExtended,
    UserIdentityRQ,
    UserReason,
)
from .session import Operation
from .uids import DEFAULT_TRANSFER_SYNTAXES, STORE_TRANSFER_SYNTAXES

if TYPE_CHECKING:  # the acceptor side is loaded when a server starts, not by an SCU
    from .proxy import Network
    from .server import Server
    from .services.storage import CStoreService
    from .services.verification import EchoService

__all__ = ["AE", "TRANSFER_SYNTAX_PRESETS", "Service"]

#: The DIMSE-N requests (PS3.7 §10.1), served by services.normalized.
_N_REQUESTS = tuple(f for f in CommandField if f.name.startswith("N_") and f.name.endswith("_RQ"))


#: Named transfer syntax lists for ``add_requested_context`` / ``add_supported_context``:
#: ``"default"`` explicit then implicit VR little endian (PS3.5 A.2, A.1);
#: ``"uncompressed"`` also deflated and big endian (PS3.5 A.5, A.3, retired but still sent);
#: ``"as-received"`` (storage) those plus the JPEG, JPEG-LS, JPEG 2000, HTJ2K and RLE syntaxes,
#: so instances are stored as the sender has them, without transcoding (PS3.5 A.4).
TRANSFER_SYNTAX_PRESETS: dict[str, list[str]] = {
    "default": list(DEFAULT_TRANSFER_SYNTAXES),
    "uncompressed": [
        "1.2.840.10008.1.2.1",
        "1.2.840.10008.1.2",
        "1.2.840.10008.1.2.1.99",
        "1.2.840.10008.1.2.2",
    ],
    "as-received": list(STORE_TRANSFER_SYNTAXES),
}

_log = get_logger()


def _address_in(address: str, allowed: tuple[Network, ...]) -> bool:
    from .proxy import address_in

    return address_in(address, allowed)


def _syntaxes(transfer_syntaxes: Iterable[str] | str | None) -> list[str]:
    """A list of transfer syntax UIDs from a list, a preset name or ``None`` (default)."""
    if transfer_syntaxes is None:
        return list(DEFAULT_TRANSFER_SYNTAXES)
    if isinstance(transfer_syntaxes, str):
        if transfer_syntaxes in TRANSFER_SYNTAX_PRESETS:
            return list(TRANSFER_SYNTAX_PRESETS[transfer_syntaxes])
        if transfer_syntaxes[:1].isdigit():
            return [transfer_syntaxes]
        raise ValueError(
            f"unknown transfer syntax preset {transfer_syntaxes!r}; one of {', '.join(TRANSFER_SYNTAX_PRESETS)}"
        )
    out = [str(t) for t in transfer_syntaxes]
    if not out:
        raise ValueError("no transfer syntaxes given")
    return out


_C_STORE_RQ = CommandField.C_STORE_RQ  # per instance: a global, not read from the enum class each time (slow on 3.11)


class _SCPServices:
    """An AE's built-in SCP services, C-ECHO (PS3.4 Annex A) and C-STORE (Annex B), and
    the C-STORE spool. Made when an association first needs one: their modules (and the
    spool and file writer) are not imported by a sender, which receives no request."""

    __slots__ = ("echo", "make_spool", "store")

    echo: EchoService
    store: CStoreService
    make_spool: Callable[..., Any]

    def __init__(self, handlers: dict[CommandField, Any]) -> None:
        from .services.storage import CStoreService, make_spool
        from .services.verification import EchoService

        self.echo = EchoService(functools.partial(handlers.get, CommandField.C_ECHO_RQ))
        self.store = CStoreService(functools.partial(handlers.get, CommandField.C_STORE_RQ))
        self.make_spool = make_spool


class _FirstRequest:
    """The C-ECHO or C-STORE entry of an association's dispatch table while the AE's
    :class:`_SCPServices` are not loaded yet: the first request loads them, and the
    service takes this entry's place in ``table`` (its own ``start`` then called
    directly, no step through this object per request)."""

    __slots__ = ("_ae", "_name", "_loaded", "table")

    def __init__(self, ae: AE, name: str) -> None:
        self._ae, self._name = ae, name
        self._loaded: EchoService | CStoreService | None = None
        #: The dispatch table holding this entry (set by ``AE._dispatch``).
        self.table: dict[int, Any] | None = None

    def _service(self) -> EchoService | CStoreService:
        loaded = self._loaded
        if loaded is None:  # the first request: kept for the next ones
            services = self._ae._scp_services()
            loaded = self._loaded = services.echo if self._name == "echo" else services.store
            if self.table is not None:
                self.table[CommandField.C_ECHO_RQ if self._name == "echo" else _C_STORE_RQ] = loaded
        return loaded

    def __call__(self, assoc: DIMSEProvider, op: Operation) -> Awaitable[None]:
        return self._service()(assoc, op)

    def start(self, assoc: DIMSEProvider, op: Operation, done: asyncio.Future[None]) -> bool:
        return self._service().start(assoc, op, done)


class AE(HandlerRegistry):
    """A DICOM application entity (PS3.7 §7).

    >>> ae = AE("MY_AE")
    >>> ae.add_requested_context(Verification)
    >>> async with ae.associate("127.0.0.1", 11112, called_ae="PEER") as assoc:
    ...     status = await assoc.c_echo()

    Timeouts are in seconds (``None`` waits forever): ``connect_timeout`` for TCP (and TLS),
    ``acse_timeout`` for A-ASSOCIATE / A-RELEASE answers (a release is bounded by
    ``artim_timeout`` without one, and waits for our outstanding requests at most as
    long without a ``dimse_timeout``), ``dimse_timeout`` for a DIMSE response,
    ``network_timeout`` for an idle association, ``artim_timeout`` for the ARTIM timer
    (PS3.8 §9.1.5), ``abort_artim_timeout`` for ARTIM after we sent an A-ABORT (only
    the peer's close is awaited; never above ``artim_timeout``).
    """

    #: Received data sets larger than this go to a temporary file in ``spool_dir``.
    spool_threshold: int
    spool_dir: str | None
    #: C-MOVE destinations: AE title -> (host, port).
    known_aes: dict[str, tuple[str, int]]
    #: C-STORE sub-operations kept in flight per C-MOVE (if the destination agrees).
    move_concurrency: int
    #: C-MOVE sub-associations open at once to one destination, over all C-MOVEs;
    #: more C-MOVEs to it wait their turn (``None``: no limit).
    max_move_associations: int | None
    #: Acceptor: only peers at these addresses / CIDR blocks may associate (the real
    #: client address when the PROXY protocol is on); others get A-ASSOCIATE-RJ.
    allowed_peer_addresses: tuple[Network, ...] | None
    #: TCP keepalive (both roles): probe after ``keepalive_idle`` s of silence, every
    #: ``keepalive_interval`` s, give up after ``keepalive_count`` probes. ``None``: off.
    keepalive: tuple[float, float, int] | None
    #: Requestor: release an association that has had no DIMSE traffic for this many
    #: seconds (before a NAT or firewall forgets the connection).
    idle_release: float | None
    #: Receives association and DIMSE events (e.g. :class:`dimse_async.metrics.Metrics`).
    observer: Any
    #: Acceptor admission (PS3.8 §9.3.4 rejected-transient, local-limit-exceeded past
    #: a cap): associations per peer address and per calling AE title; connections
    #: that have not sent their A-ASSOCIATE-RQ, in all and per address (more are
    #: dropped at once); descriptors kept back for answering A-ASSOCIATE-RJ.
    max_per_address: int
    max_per_calling_ae: int
    max_pending: int
    max_pending_per_address: int
    #: Once half of ``max_pending`` or more is taken, a connection that has waited this
    #: many seconds for its A-ASSOCIATE-RQ (TLS handshake and PROXY header included) is
    #: dropped to make room, oldest first (``None``: only the usual timeouts apply).
    busy_pending_timeout: float | None
    #: The per-address limits count an IPv6 client under its /``ipv6_prefix`` network
    #: (default 64: one site's, RFC 6177; 128: exact addresses); IPv4 under its address.
    ipv6_prefix: int
    #: Acceptor: warnings about connections refused, rejected or dropped before they
    #: became associations (bad AE titles, limits, PROXY garbage, failed TLS handshakes,
    #: ARTIM, an authenticator that raised ...): per kind and client address, the first ``refusal_log_burst`` in each
    #: ``refusal_log_interval`` seconds are logged, the rest counted into one line.
    refusal_log_burst: int
    refusal_log_interval: float
    fd_reserve: int
    #: A PDU that has started arriving must be complete within this many seconds,
    #: however slowly it drips in (``None``: no limit).
    pdu_timeout: float | None
    #: Largest request data set (a C-FIND/C-GET/C-MOVE identifier) accepted; a larger
    #: one is refused with 0xA700 (out of resources) without being kept in memory.
    max_request_dataset: int
    #: Bytes queued for peers, summed over all associations of this AE: past it,
    #: responses and the write batches of data sets (C-GET sub-operations) to peers
    #: that do not read wait (``dimse_async.budget``). ``None``:
    #: only the per-association bound (~4 MiB).
    max_buffered_output: int | None
    output_budget: OutputBudget
    #: Log each successful operation (UID, status, bytes, ms) at INFO instead of DEBUG.
    log_operations: bool
    requested_contexts: list[ContextSpec]
    supported_contexts: dict[str, ContextSpec]
    #: Pending storage commitment transactions (a CommitmentTracker, made on first use).
    commitments: Any

    def __init__(
        self,
        ae_title: str = "DIMSE_ASYNC",
        *,
        max_pdu: int = 262_144,
        connect_timeout: float | None = 30.0,
        acse_timeout: float | None = 30.0,
        dimse_timeout: float | None = 60.0,
        network_timeout: float | None = 300.0,
        artim_timeout: float = 30.0,
        abort_artim_timeout: float = 5.0,
        max_associations: int = 1000,
        require_called_ae: bool = True,
        allowed_calling_aes: Iterable[str] | None = None,
        max_ops_invoked: int = 16,
        max_ops_performed: int = 16,
        spool_threshold: int = 4 << 20,
        spool_dir: str | None = None,
        known_aes: dict[str, tuple[str, int]] | None = None,
        move_concurrency: int = 4,
        max_move_associations: int | None = 8,
        allowed_peer_addresses: Iterable[str] | None = None,
        keepalive_idle: float | None = None,
        keepalive_interval: float = 10.0,
        keepalive_count: int = 5,
        idle_release: float | None = None,
        max_per_address: int = 256,
        max_per_calling_ae: int = 256,
        max_pending: int = 1024,
        max_pending_per_address: int = 256,
        busy_pending_timeout: float | None = 5.0,
        ipv6_prefix: int = 64,
        refusal_log_burst: int = 5,
        refusal_log_interval: float = 10.0,
        fd_reserve: int = 64,
        pdu_timeout: float | None = 60.0,
        max_request_dataset: int = 1 << 20,
        max_buffered_output: int | None = 64 << 20,
        log_operations: bool = False,
    ):
        super().__init__()
        self.ae_title = validate_ae_title(ae_title)
        if not 0 <= max_pdu <= 0xFFFFFFFF or 0 < max_pdu < 1024:
            raise ValueError(f"max_pdu {max_pdu} must be 0 (unlimited) or at least 1024")
        self.max_pdu = max_pdu
        self.connect_timeout = connect_timeout
        self.acse_timeout = acse_timeout
        self.dimse_timeout = dimse_timeout
        self.network_timeout = network_timeout
        self.artim_timeout = artim_timeout
        self.abort_artim_timeout = abort_artim_timeout
        self.max_associations = max_associations
        self.require_called_ae = require_called_ae
        self.allowed_calling_aes = (
            None if allowed_calling_aes is None else frozenset(validate_ae_title(t) for t in allowed_calling_aes)
        )
        self.max_ops_invoked = max_ops_invoked
        self.max_ops_performed = max_ops_performed
        self.spool_threshold = spool_threshold
        self.spool_dir = spool_dir
        self.known_aes = dict(known_aes or {})
        self.move_concurrency = move_concurrency
        if max_move_associations is not None and max_move_associations < 1:
            raise ValueError(f"max_move_associations {max_move_associations!r} must be at least 1 (or None)")
        self.max_move_associations = max_move_associations
        if allowed_peer_addresses is not None:
            from .proxy import networks

            self.allowed_peer_addresses = networks(allowed_peer_addresses)
        else:
            self.allowed_peer_addresses = None
        self.keepalive = None if keepalive_idle is None else (keepalive_idle, keepalive_interval, keepalive_count)
        self.idle_release = idle_release
        self.observer = None
        self.max_per_address = max_per_address
        self.max_per_calling_ae = max_per_calling_ae
        self.max_pending = max_pending
        self.max_pending_per_address = max_pending_per_address
        if busy_pending_timeout is not None and not busy_pending_timeout > 0:
            raise ValueError(f"busy_pending_timeout {busy_pending_timeout!r} must be positive (or None)")
        self.busy_pending_timeout = busy_pending_timeout
        if isinstance(ipv6_prefix, bool) or not isinstance(ipv6_prefix, int) or not 1 <= ipv6_prefix <= 128:
            raise ValueError(f"ipv6_prefix {ipv6_prefix!r} must be a prefix length from 1 to 128")
        self.ipv6_prefix = ipv6_prefix
        if refusal_log_burst < 1 or not refusal_log_interval > 0:
            raise ValueError("refusal_log_burst must be at least 1 and refusal_log_interval positive")
        self.refusal_log_burst = refusal_log_burst
        self.refusal_log_interval = refusal_log_interval
        self.fd_reserve = fd_reserve
        self.pdu_timeout = pdu_timeout
        self.max_request_dataset = max_request_dataset
        self.max_buffered_output = max_buffered_output
        self.output_budget = OutputBudget(max_buffered_output)
        self.log_operations = log_operations
        self.requested_contexts = []
        self.supported_contexts = {}
        self.commitments = None
        self._scp: _SCPServices | None = None
        self._policy: tuple[tuple[Any, ...], AcceptorPolicy] | None = None  # see _acceptor_policy
        #: Modules (pydicom ...) being imported off the loop, e.g. by ``serve`` once it
        #: listens: Q/R and DIMSE-N requests wait for it (awaiting, the loop keeps
        #: serving) instead of importing them on the loop. ``None``: nothing to wait for.
        self.preloading: asyncio.Future[None] | None = None

    async def _preloaded(self) -> None:
        """Until :attr:`preloading` is done (its failure is its owner's to report)."""
        preloading = self.preloading
        if preloading is not None and not preloading.done():
            await asyncio.wait((preloading,))

    # ------------------------------------------------------------ contexts

    def add_requested_context(
        self,
        abstract_syntax: str,
        transfer_syntaxes: Iterable[str] | str | None = None,
        *,
        scu_role: bool | None = None,
        scp_role: bool | None = None,
    ) -> None:
        """Propose ``abstract_syntax`` when we request associations (PS3.8 §9.3.2.2).

        ``transfer_syntaxes``: UIDs, or a preset name from :data:`TRANSFER_SYNTAX_PRESETS`
        (``"default"``: explicit and implicit VR little endian, used when omitted;
        ``"uncompressed"``; ``"as-received"``). ``scp_role=True`` proposes the SCP role
        (e.g. storage classes for C-GET sub-operations, PS3.7 D.3.3.4).
        """
        self.requested_contexts.append(
            ContextSpec(str(abstract_syntax), _syntaxes(transfer_syntaxes), scu_role, scp_role)
        )

    def add_supported_context(
        self,
        abstract_syntax: str,
        transfer_syntaxes: Iterable[str] | str | None = None,
        *,
        scu_role: bool | None = None,
        scp_role: bool | None = None,
    ) -> None:
        """Accept ``abstract_syntax`` as acceptor; ``transfer_syntaxes`` in our preference
        order (the acceptor's order decides, PS3.8 §9.3.3.2).

        ``transfer_syntaxes`` is a list of UIDs or a preset name from
        :data:`TRANSFER_SYNTAX_PRESETS`:

        - omitted or ``"default"``: explicit and implicit VR little endian only;
          compressed instances are then refused a context, or sent transcoded;
        - ``"uncompressed"``: also deflated and explicit big endian;
        - ``"as-received"``: every syntax a storage SCP can keep as the sender has it
          (uncompressed first, then JPEG, JPEG-LS, JPEG 2000, HTJ2K, RLE); use this for
          storage SCPs that must not make senders transcode.

        ``scu_role``/``scp_role`` answer a requestor's role selection proposal: by default
        it may act as SCU but not SCP (set ``scp_role=True`` to allow e.g. C-GET sub-ops).
        """
        self.supported_contexts[str(abstract_syntax)] = ContextSpec(
            str(abstract_syntax), _syntaxes(transfer_syntaxes), scu_role, scp_role
        )

    # ------------------------------------------------------------ what associations get

    def _dispatch(self) -> dict[int, ServiceHandler]:
        """Command field -> service: the services read the registered handler at call time.

        The query/retrieve and DIMSE-N services (and pydicom, which they need) are
        loaded when their first request arrives."""
        handlers = self._handlers
        routes: list[Any] = []  # the C-MOVE route, made on the first C-MOVE

        # C-ECHO and C-STORE may run a request as callbacks, without a task (``start``).
        # Their modules load with the first such request (a sender gets none): until then
        # an association gets stand-ins, afterwards the services themselves.
        scp = self._scp
        echo: ServiceHandler = scp.echo if scp is not None else _FirstRequest(self, "echo")
        store: ServiceHandler = scp.store if scp is not None else _FirstRequest(self, "store")

        async def find(assoc: DIMSEProvider, op: Operation) -> None:
            await self._preloaded()
            from .services import qr

            await qr.scp_c_find(assoc, op, handlers.get(CommandField.C_FIND_RQ))

        async def get(assoc: DIMSEProvider, op: Operation) -> None:
            await self._preloaded()
            from .services import retrieve_scp

            await retrieve_scp.scp_c_get(assoc, op, handlers.get(CommandField.C_GET_RQ))

        async def move(assoc: DIMSEProvider, op: Operation) -> None:
            await self._preloaded()
            from .services import retrieve_scp

            if not routes:
                routes.append(
                    retrieve_scp.MoveRoute(
                        self.known_aes, self.associate, self.move_concurrency, self.max_move_associations
                    )
                )
            await retrieve_scp.scp_c_move(assoc, op, handlers.get(CommandField.C_MOVE_RQ), routes[0])

        async def n_service(assoc: DIMSEProvider, op: Any) -> None:
            await self._preloaded()
            from .services import normalized

            cmd = op.command
            sop_class = cmd.affected_sop_class_uid or cmd.requested_sop_class_uid or ""
            handler = self.n_handler(cmd.command_field, sop_class)
            # Handlers for other N-services of the class: the class is served, this operation is not.
            served = handler is None and any(self.has_n_handler(field, sop_class) for field in _N_REQUESTS)
            await normalized.scp_n_service(assoc, op, handler, class_served=served)

        table: dict[int, ServiceHandler] = {
            **{field: n_service for field in _N_REQUESTS},
            CommandField.C_ECHO_RQ: echo,
            CommandField.C_STORE_RQ: store,
            CommandField.C_FIND_RQ: find,
            CommandField.C_GET_RQ: get,
            CommandField.C_MOVE_RQ: move,
        }
        for entry in (echo, store):
            if type(entry) is _FirstRequest:
                entry.table = table
        return table

    def _scp_services(self) -> _SCPServices:
        """The C-ECHO and C-STORE services and the C-STORE spool, loaded on first use."""
        if self._scp is None:
            self._scp = _SCPServices(self._handlers)
        return self._scp

    def _sinks(self) -> dict[int, SinkFactory]:
        def spool(assoc: DIMSEProvider, msg: Message) -> Any:
            return (self._scp or self._scp_services()).make_spool(
                assoc,
                msg,
                threshold=self.spool_threshold,
                directory=self.spool_dir,
                store=self._handlers.get(_C_STORE_RQ),
            )

        return {CommandField.C_STORE_RQ: spool}

    def _settings(self, server: Server | None = None) -> Settings:
        return Settings(
            ae_title=self.ae_title,
            max_pdu=self.max_pdu,
            acse_timeout=self.acse_timeout,
            dimse_timeout=self.dimse_timeout,
            network_timeout=self.network_timeout,
            artim_timeout=self.artim_timeout,
            abort_artim_timeout=self.abort_artim_timeout,
            dispatch=self._dispatch(),
            sinks=self._sinks(),
            judge=functools.partial(self._judge, server),
            judge_now=functools.partial(self._judge_now, server),
            hook=self._fire,
            hooks=self._hooks,
            on_open=server.track if server is not None else None,
            on_close=server.untrack if server is not None else None,
            limit_warning=server.allow_warning if server is not None else None,
            keepalive=self.keepalive,
            idle_release=self.idle_release,
            observer=self.observer,
            pdu_timeout=self.pdu_timeout,
            max_request_dataset=self.max_request_dataset,
            output_budget=self.output_budget,
            log_operations=self.log_operations,
            decode_rq=server.negotiations.decode_rq if server is not None else None,
        )

    async def _judge(
        self, server: Server | None, assoc: Association, rq: AssociateRQ
    ) -> tuple[AssociateAC | AssociateRJ, Negotiated | None]:
        """Acceptor: admission (``max_associations``), user identity, then negotiation."""
        if server is not None and server.paused:  # starting up: wait a little for it
            assoc.log.info("association request waiting: server starting", wait=server.paused_wait)
            await server.wait_open()
        refused = self._admission(server, assoc)
        if refused is not None:
            return refused, None
        ok, response = True, None
        identity = rq.user_info.identity_rq
        if identity is not None and self._authenticator is not None:
            try:
                verdict: Any = self._authenticator(identity, assoc)
                if hasattr(verdict, "__await__"):  # an async def's; a plain def's result is the verdict
                    verdict = await asyncio.wait_for(verdict, self.acse_timeout)
                ok, response = verdict
            except (Exception, asyncio.CancelledError) as exc:  # the hook failed: a refusal, say why (limited per address)
                task = asyncio.current_task()
                if isinstance(exc, asyncio.CancelledError) and (task is None or task.cancelling()):
                    raise  # the association itself ends (the peer went away, the server stops)
                if server is None or server.allow_warning("user identity check failed", assoc.peer[0]):
                    assoc.log.warning("user identity check failed", error=repr(exc))
                ok, response = False, None
        return negotiate(rq, self._acceptor_policy(), identity_ok=ok, identity_response=response)

    def _judge_now(
        self, server: Server | None, assoc: Association, rq: AssociateRQ
    ) -> tuple[AssociateAC | AssociateRJ, Negotiated | None] | None:
        """:meth:`_judge` without a task, when nothing in it would await: ``None`` while
        the server is paused or when a user identity goes to the authenticator."""
        if (server is not None and server.paused) or (
            rq.user_info.identity_rq is not None and self._authenticator is not None
        ):
            return None
        refused = self._admission(server, assoc)
        if refused is not None:
            return refused, None
        if server is None:
            return negotiate(rq, self._acceptor_policy())
        return server.negotiations.negotiate(rq, self._acceptor_policy())

    def _admission(self, server: Server | None, assoc: Association) -> AssociateRJ | None:
        """The A-ASSOCIATE-RJ for a request the server or the address policy turns away."""
        refusal = server.admit(assoc) if server is not None else None  # the slot is held from here on
        if refusal is not None:
            paused = server is not None and server.paused
            event = "association refused: " + ("not open yet" if paused else "local limit")
            assoc.warn_refusal(event, event, reason=refusal)
            why = PresentationReason.TEMPORARY_CONGESTION if paused else PresentationReason.LOCAL_LIMIT_EXCEEDED
            return AssociateRJ(RejectResult.TRANSIENT, RejectSource.PRESENTATION, why)
        if self.allowed_peer_addresses is not None and not _address_in(assoc.peer[0], self.allowed_peer_addresses):
            assoc.warn_refusal("peer address not allowed", "peer address not allowed", address=assoc.peer[0])
            return AssociateRJ(RejectResult.PERMANENT, RejectSource.USER, UserReason.NO_REASON_GIVEN)
        return None

    def _acceptor_policy(self) -> AcceptorPolicy:
        """The policy for the request being judged: the one made for the last request
        while every setting it holds is still equal (the AE's attributes may be changed
        between associations, so they are compared each time; one tuple instead of a
        new dataclass of nine fields per association). The negotiation callbacks are
        the AE's wrappers, which call the application's current ones."""
        now = (
            self.ae_title,
            self.supported_contexts,
            self.max_pdu,
            self.require_called_ae,
            self.allowed_calling_aes,
            self.max_ops_performed,
            self.max_ops_invoked,
            self._extended_reply if self._on_extended is not None else None,
            self._common_extended_ok if self._on_common_extended is not None else None,
        )
        kept = self._policy
        if kept is not None and kept[0] == now:
            return kept[1]
        policy = AcceptorPolicy(*now)
        self._policy = (now, policy)
        return policy

    def _extended_reply(self, sop_class: str, info: bytes) -> bytes | None:
        """The application's SOP class extended negotiation reply (PS3.7 D.3.3.5): a
        callback that raises or returns no bytes is logged and its item declined (no
        reply sub-item), never the association's end."""
        assert self._on_extended is not None
        try:
            reply = self._on_extended(sop_class, info)
        except Exception as exc:
            _log.error("extended negotiation callback failed", sop_class=sop_class, error=repr(exc))
            return None
        if reply is not None and not isinstance(reply, (bytes, bytearray)):
            _log.error("extended negotiation callback returned no bytes", sop_class=sop_class, result=repr(reply)[:100])
            return None
        return None if reply is None else bytes(reply)

    def _common_extended_ok(self, item: SOPClassCommonExtended) -> bool:
        """The application's verdict on a common extended negotiation item (PS3.7 D.3.3.6);
        a callback that raises is logged and the item not acknowledged."""
        assert self._on_common_extended is not None
        try:
            return bool(self._on_common_extended(item))
        except Exception as exc:
            _log.error("common extended negotiation callback failed", sop_class=item.sop_class_uid, error=repr(exc))
            return False

    # ------------------------------------------------------------ requestor

    def associate(
        self,
        host: str,
        port: int,
        called_ae: str = "ANY-SCP",
        *,
        contexts: Iterable[ContextSpec] | None = None,
        async_ops: tuple[int, int] | None = None,
        identity: UserIdentityRQ | None = None,
        extended: Iterable[SOPClassExtended] = (),
        common_extended: Iterable[SOPClassCommonExtended] = (),
        ssl: SSLContext | None = None,
        server_hostname: str | None = None,
        local_address: tuple[str, int] | None = None,
        proxy_header: bytes | None = None,
        timeout: float | None = None,
    ) -> _Associating:
        """Request an association. Use as ``async with`` (released on exit) or ``await``.

        ``async_ops=(invoked, performed)`` proposes an asynchronous operations window
        (default: this AE's ``max_ops_invoked``/``max_ops_performed``; ``(1, 1)`` proposes none).
        ``ssl``: a client context (see :func:`dimse_async.tls.client_context`); the server
        certificate is checked against ``server_hostname`` (default ``host``); the
        handshake counts towards ``connect_timeout``. ``local_address``: ``(host, port)``
        to connect from (multi-homed hosts; port 0 picks one). ``proxy_header``: bytes
        sent before anything else, e.g. :func:`dimse_async.proxy.encode_v2` to reach an
        acceptor that expects the PROXY protocol (health checks). ``timeout`` bounds, in
        seconds, each of the TCP connect (with the handshake) and the wait for the
        A-ASSOCIATE answer for this call (default: the AE's ``connect_timeout`` and
        ``acse_timeout``).

        Raises :class:`ConnectionFailed` (TCP connect failed), :class:`AssociationRejected`
        (A-ASSOCIATE-RJ), :class:`AssociationAborted` (A-ABORT or connection lost while
        negotiating), :class:`AssociationTimeout`, and :class:`InvalidAETitle` (a
        ``ValueError``) for a called AE title that is not valid (PS3.5 §6.2).
        """
        called = validate_ae_title(called_ae, "called AE title")
        specs = list(contexts if contexts is not None else self.requested_contexts)
        if not specs:
            raise ValueError("no presentation contexts to propose: call add_requested_context() first")
        ops = async_ops if async_ops is not None else (self.max_ops_invoked, self.max_ops_performed)
        rq = build_request(
            called,
            self.ae_title,
            specs,
            max_pdu=self.max_pdu,
            async_ops=ops,
            extended=extended,
            common_extended=common_extended,
            identity=identity,
        )
        return _Associating(self, host, port, rq, ssl, server_hostname, local_address, proxy_header, timeout)

    async def request_commitment(
        self,
        host: str,
        port: int,
        called_ae: str,
        references: Iterable[tuple[str, str]],
        *,
        timeout: float = 60.0,
        hold: float = 5.0,
        **kwargs: Any,
    ) -> Any:
        """Storage commitment (PS3.4 Annex J): ask ``called_ae`` to commit ``references``
        ((SOP class, SOP instance) pairs) and return its
        :class:`~dimse_async.services.commitment.CommitmentResult` once the N-EVENT-REPORT
        arrives, on the requesting association (held up to ``hold`` s) or on one the SCP
        opens to this AE (listen with the commitment class supported, ``scp_role=True``).
        Raises ``CommitmentTimeout`` after ``timeout`` s, ``CommitmentFailed`` on refusal."""
        from .services.commitment import request_commitment

        return await request_commitment(self, host, port, called_ae, references, timeout=timeout, hold=hold, **kwargs)

    # ------------------------------------------------------------ acceptor

    async def start_server(
        self,
        host: str = "0.0.0.0",
        port: int = 11112,
        *,
        backlog: int = 512,
        ssl: SSLContext | None = None,
        ssl_handshake_timeout: float = 10.0,
        proxy_protocol: bool = False,
        trusted_proxies: Iterable[str] = ("127.0.0.1", "::1"),
        proxy_header_timeout: float = 10.0,
        reuse_port: bool = False,
        paused: bool = False,
        paused_wait: float = 5.0,
    ) -> Server:
        """Listen for associations; returns at once with a running :class:`Server`.

        ``ssl``: a server context (see :func:`dimse_async.tls.server_context`); each
        client gets ``ssl_handshake_timeout`` seconds for its handshake, on its own.
        ``proxy_protocol``: every connection starts with a PROXY v1/v2 header, accepted
        only from ``trusted_proxies`` (addresses or CIDR blocks); associations then see
        the client's address from the header. ``reuse_port``: set ``SO_REUSEPORT`` so
        several processes listen on one port and the kernel spreads connections among
        them (``--workers N``). ``paused``: bind and listen now but admit no association
        until :meth:`Server.open` (for start-up work such as indexing): a request waits up
        to ``paused_wait`` seconds (``server.paused_wait``) for it, then gets A-ASSOCIATE-RJ
        rejected-transient (temporary congestion); the server reports unready meanwhile.
        """
        from .acceptor import AcceptOptions, Acceptor
        from .proxy import networks
        from .server import Server

        if not self.supported_contexts:
            raise ValueError("no supported presentation contexts: call add_supported_context() first")
        server = Server(self)
        server.paused, server.paused_wait = paused, paused_wait
        settings = self._settings(server)
        loop = asyncio.get_running_loop()

        def make_association() -> Association:
            return Association(settings, requestor=False, ae=self)

        if ssl is not None or proxy_protocol:
            options = AcceptOptions(
                ssl=ssl,
                handshake_timeout=ssl_handshake_timeout,
                trusted_proxies=networks(trusted_proxies) if proxy_protocol else None,
                header_timeout=proxy_header_timeout,
            )
            acceptor = Acceptor(server, options, make_association)
            server.attach(await acceptor.start(host, port, backlog, reuse_port=reuse_port))
            return server
        server.attach(
            await loop.create_server(
                make_association, host, port, backlog=backlog, reuse_address=True, reuse_port=reuse_port or None
            )
        )
        return server


class _Associating:
    """The pending result of :meth:`AE.associate`: awaitable and an async context manager."""

    def __init__(
        self,
        ae: AE,
        host: str,
        port: int,
        rq: AssociateRQ,
        ssl: SSLContext | None = None,
        server_hostname: str | None = None,
        local_address: tuple[str, int] | None = None,
        proxy_header: bytes | None = None,
        timeout: float | None = None,
    ):
        self._ae, self._host, self._port, self._rq = ae, host, port, rq
        self._proxy_header = proxy_header
        self._ssl, self._server_hostname, self._local_address = ssl, server_hostname, local_address
        self._assoc: Association | None = None
        self._connect_timeout = ae.connect_timeout if timeout is None else timeout
        self._acse_timeout = ae.acse_timeout if timeout is None else timeout

    async def _open(self) -> Association:
        ae = self._ae
        loop = asyncio.get_running_loop()
        assoc = Association(ae._settings(), requestor=True, ae=ae)
        assoc.request_association(self._rq)
        tls: dict[str, Any] = {"local_addr": self._local_address} if self._local_address else {}
        if self._ssl is not None:
            tls.update(ssl=self._ssl, server_hostname=self._server_hostname or self._host)
            if self._connect_timeout is not None:
                tls["ssl_handshake_timeout"] = self._connect_timeout
        started = loop.time()
        try:
            await asyncio.wait_for(self._connect(loop, assoc, tls), self._connect_timeout)
        except TimeoutError:
            what = "TCP connect and TLS handshake with" if self._ssl is not None else "TCP connect to"
            raise AssociationTimeout(
                f"{what} {self._host}:{self._port} timed out after {self._connect_timeout} s"
            ) from None
        except ssl_module.SSLError as exc:
            why = (
                f"certificate verify failed: {getattr(exc, 'verify_message', '')}"
                if getattr(exc, "verify_message", None)
                else exc.reason
            )
            raise ConnectionFailed(f"TLS handshake with {self._host}:{self._port} failed: {why or exc}") from exc
        except ConnectionError as exc:
            why = exc.strerror or str(exc) or "connection closed by the peer"  # a reset carries no text
            if self._ssl is not None and not isinstance(exc, ConnectionRefusedError):
                # Connected, then closed or reset during the handshake: a plain DICOM port
                # answers a ClientHello (PDU type 16H to it) with A-ABORT or a reset.
                raise ConnectionFailed(
                    f"TLS handshake with {self._host}:{self._port} failed: {why} (does the peer speak TLS?)"
                ) from exc
            raise ConnectionFailed(f"cannot connect to {self._host}:{self._port}: {why}") from exc
        except OSError as exc:
            raise ConnectionFailed(f"cannot connect to {self._host}:{self._port}: {exc.strerror or exc}") from exc
        assoc.timings["connect"] = loop.time() - started
        try:
            await assoc.wait_established(self._acse_timeout)
        except asyncio.CancelledError:
            assoc.abort("cancelled while negotiating")  # no half-open association left behind
            raise
        assoc.timings["associate"] = loop.time() - started - assoc.timings["connect"]
        return assoc

    async def _connect(self, loop: asyncio.AbstractEventLoop, assoc: Association, kwargs: dict[str, Any]) -> None:
        if self._proxy_header is None:
            await loop.create_connection(lambda: assoc, self._host, self._port, **kwargs)
            return
        # The header goes first, in the clear, before any TLS handshake.
        infos = await loop.getaddrinfo(self._host, self._port, type=socket.SOCK_STREAM)
        family, _, _, _, address = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            local = kwargs.pop("local_addr", None)
            if local is not None:
                sock.bind(local)
            await loop.sock_connect(sock, address)
            set_nodelay(sock)  # the loop sets it only on the sockets it makes itself
            await loop.sock_sendall(sock, self._proxy_header)
            await loop.create_connection(lambda: assoc, sock=sock, **kwargs)
        except BaseException:
            sock.close()
            raise

    def __await__(self) -> Any:
        return self._open().__await__()

    async def __aenter__(self) -> Association:
        self._assoc = await self._open()
        return self._assoc

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        assoc = self._assoc
        if assoc is None:
            return
        if exc_type is not None and issubclass(exc_type, (asyncio.CancelledError, KeyboardInterrupt)):
            assoc.abort("cancelled")
            return
        if assoc.is_established:
            await assoc.release()
        elif not assoc.is_closed:
            assoc.abort("leaving the association context")
