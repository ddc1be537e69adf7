"""The DIMSE half of an association: what the adapter does with the session's outputs.

:class:`DIMSEMessaging` is a base of :class:`~dimse_async.association.AssociationProtocol`.
It feeds received PDVs to the :class:`~dimse_async.session.Session` and acts on what
comes back (sinks from the AE's factories, services from its dispatch table run as
tasks, responses handed to waiting requests, reading paused and resumed), and sends
messages: fragmented for the peer, batched into ~1 MiB writes, whole under one lock,
waiting for the transport to drain. It implements most of
:class:`~dimse_async.interface.DIMSEProvider`.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any

from .acse import Negotiated, PresentationContext
from .dimse import (
    Command,
    DataFragment,
    DatasetSink,
    DIMSEError,
    Message,
    encode_command,
    encode_pdata,
    fragment,
    fragment_parts,
    fragment_stream_parts,
)
from .exceptions import AssociationAborted, AssociationError, AssociationTimeout, DIMSEFailure
from .fsm import Output, PDataIndication, State, UpperLayer
from .interface import Payload, ResponseWaiter, Settings, StoreHandler
from .oplog import OperationLog
from .pdu import AbortReason, encode_pdata_header
from .session import (
    CancelRequested,
    Operation,
    PauseReading,
    Perform,
    Respond,
    ResponseArrived,
    ResumeReading,
    Session,
    SessionEvent,
    StreamStarted,
)
from .status import Code, Status
from .streams import MessageStream, ResponseQueue

if TYPE_CHECKING:
    from .filewriter import FileWriter

__all__ = ["DIMSEMessaging"]

# States looked up once (on Python 3.11 reading an enum member from its class is slow):
_CAN_SEND = (State.Sta6, State.Sta8)  # established, or the peer asked to release
_ENDED = (State.Sta1, State.Sta13)  # aborted or closed
_ESTABLISHED = State.Sta6
WRITE_BATCH = 1 << 20  # hand up to this many bytes of PDUs to the transport at once
HIGH_WATER = 4 * WRITE_BATCH  # a transport holding more pauses its senders
#: A streamed data set whose transport has not drained within this many seconds gives
#: back what it read ahead (a peer that reads drains sooner; one that does not holds
#: only what its transport holds).
SHED_AFTER = 0.05
JOIN_BELOW = 64 << 10  # a message smaller than this is joined into one buffer (one write)
#: Requests the peer sent beyond the negotiated window (PS3.7 D.3.3.3) held back while
#: reading goes on because requests of ours await their responses (a C-GET's C-STORE
#: sub-operations); past either bound reading pauses. Their data sets (identifiers in
#: memory, C-STOREs spooled) are bounded by bytes: at most this much, plus the request
#: that crossed it.
MAX_HELD_AWAITING = 8
MAX_HELD_BYTES_AWAITING = 1 << 20
#: The session of every association not negotiated yet, shared: with no accepted context
#: it is only read (idle, no operation, no request); P-DATA reaches a session only once
#: the association is established, with a session of its own.
_UNNEGOTIATED = Session(())


def _not_after_release(command: Command) -> AssociationAborted:
    """What a request of ours gets once the peer asked to release (Sta8): no P-DATA can
    follow its A-RELEASE-RQ (PS3.8 Table 9-10), so no response could come."""
    return AssociationAborted(f"the peer released the association: {command.name} not sent (no response could come)")


class DIMSEMessaging:
    """Sending and receiving DIMSE messages over an established association."""

    # Provided by the adapter (association.py).
    settings: Settings
    loop: asyncio.AbstractEventLoop
    fsm: UpperLayer
    transport: asyncio.Transport | None
    negotiated: Negotiated | None
    log: Any
    peer_ae: str
    _debug: bool
    _closed: asyncio.Future[None]
    _end_reason: str | None
    _last_dimse: float
    _last_rx: float
    _last_tx: float
    _timer: asyncio.TimerHandle | None
    _timer_at: float
    requestor: bool

    @property
    def is_established(self) -> bool:
        raise NotImplementedError

    @property
    def peer_released(self) -> bool:
        raise NotImplementedError

    async def release(self, timeout: float | None = None) -> None:
        raise NotImplementedError

    def abort(self, reason: str = "aborted by local user") -> None:
        raise NotImplementedError

    def _run(self, outputs: list[Output]) -> None:
        raise NotImplementedError

    def _init_messaging(self) -> None:
        self.session = _UNNEGOTIATED  # until the association is negotiated (see _set_negotiated)
        #: A C-STORE handler that takes precedence over the AE's (a C-GET's sub-operations).
        self.store_handler: StoreHandler | None = None
        self.oplog = OperationLog(self.loop.time(), info=self.settings.log_operations)
        self._send_lock: asyncio.Lock | None = None  # made when first needed: see _lock
        self._sending = 0  # sends holding or waiting for the lock (none: a small message goes at once)
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._pause_reasons: set[str] = set()
        # The window of requests we may invoke (PS3.7 D.3.3.3): made when first needed
        # (see _invoke_window), one unless negotiated otherwise (see _set_negotiated).
        self._window: asyncio.Semaphore | None = None
        self._waiters: dict[int, ResponseQueue] = {}
        self._finished_ops: deque[Operation] = deque()  # finished inline, next held-back ones to start
        self._tasks: set[asyncio.Future[Any]] = set()  # tasks, and operations run as callbacks
        self._sink: DatasetSink | None = None
        self._writer: FileWriter | None = None
        #: When the message still arriving began (see :meth:`_message_deadline`), and
        #: which one it is (the assembler's ``current``; 0: none).
        self._message_start: float | None = None
        self._message_mark = 0
        self._last_request = 0.0  # when a request of the peer's last arrived (sub_operation_progress)
        # The future handed to a service's ``start`` and the operation it was handed for
        # while that runs (see _start_inline): made once, kept while operations finish
        # within their ``start``.
        self._spare_done: asyncio.Future[None] | None = None
        self._spare_for: Operation | None = None

    @property
    def writer(self) -> FileWriter:
        """This association's file writer (its jobs in order, in a shared thread; made on first use)."""
        if self._writer is None:
            from .filewriter import FileWriter  # file work is the receiving side's: a sender never loads it

            self._writer = FileWriter(self.loop)
        return self._writer

    def _close_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()

    @property
    def bytes_received(self) -> int:
        return self.oplog.bytes_received

    @property
    def bytes_sent(self) -> int:
        return self.oplog.bytes_sent

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._last_tx = self.loop.time()
        self._report_output()
        self._wake_drain()

    # ------------------------------------------------------------ the output budget

    def buffered_output(self) -> int:
        """Bytes the transport holds that the peer has not taken yet."""
        transport = self.transport
        return transport.get_write_buffer_size() if transport is not None and not transport.is_closing() else 0

    def _report_output(self, size: int | None = None) -> None:
        budget = self.settings.output_budget
        if budget is not None:
            budget.report(self, self.buffered_output() if size is None else size)

    async def _within_output_budget(self, shed: Callable[[], Awaitable[None]] | None = None) -> None:
        """While the server-wide output budget is exceeded, a response (or the next
        write batch of a data set) goes out only once this peer has taken everything
        queued for it: a peer that does not read holds its producers, one that reads is
        served, a message at a time. ``shed``: called before waiting (a streamed data
        set gives back what it read ahead)."""
        budget, transport = self.settings.output_budget, self.transport
        if budget is None or transport is None:
            return
        tight = False
        while budget.over(self.loop.time()) and self.buffered_output() > 0:
            if not tight:
                tight = True
                self.log.debug("output budget exceeded: waiting for the peer to read", queued=budget.total)
                transport.set_write_buffer_limits(high=0, low=0)  # paused until fully drained
                if shed is not None:
                    await shed()
            if self._write_paused:
                await self._drain()
            else:  # pragma: no cover - a transport that did not pause at once
                await asyncio.sleep(0.05)
                self._check_can_send()
        if tight and not transport.is_closing():
            transport.set_write_buffer_limits(high=HIGH_WATER)

    def _may_read_ahead(self) -> bool:
        """Whether a streamed data set should read past its next write batch: not when
        that batch will fill the transport, nor while the output budget is exceeded."""
        if self._write_paused or self.buffered_output() + WRITE_BATCH >= HIGH_WATER:
            return False
        budget = self.settings.output_budget
        return budget is None or not budget.over(self.loop.time())

    async def _between_batches(self, shed: Callable[[], Awaitable[None]] | None, timeout: float | None) -> None:
        """After a write batch of a data set: wait for the transport to drain and for
        the output budget (the data set's read-ahead given back when that takes long)."""
        if self._write_paused and shed is not None and self.transport is not None:
            if self._drain_waiter is None:
                self._drain_waiter = self.loop.create_future()
            done, _ = await asyncio.wait((self._drain_waiter,), timeout=SHED_AFTER)
            if not done:
                await shed()
        await self._drain(timeout)
        self._check_can_send()
        if self.settings.output_budget is not None:
            await self._within_output_budget(shed)

    def _wake_drain(self) -> None:
        """Let a send waiting for the transport to drain go on (it then finds out
        whether the association still stands)."""
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    @property
    def accepted_contexts(self) -> list[PresentationContext]:
        return self.negotiated.accepted if self.negotiated else []

    @property
    def rejected_contexts(self) -> list[PresentationContext]:
        return [c for c in self.negotiated.contexts if not c.accepted] if self.negotiated else []

    def pause_reading(self, reason: str) -> None:
        """Stop reading the socket until every reason to pause is gone (backpressure)."""
        if not self._pause_reasons and self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()
        self._pause_reasons.add(reason)
        self.fsm.reading_paused = True  # a PDU stalled meanwhile is not the peer's fault

    @property
    def reading_paused_by(self) -> frozenset[str]:
        """Why reading is paused now (e.g. ``"window"``, ``"disk"``); empty while reading."""
        return frozenset(self._pause_reasons)

    def resume_reading(self, reason: str) -> None:
        if reason not in self._pause_reasons:
            return
        self._pause_reasons.discard(reason)
        self.fsm.reading_paused = bool(self._pause_reasons)
        if not self._pause_reasons and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        """Run ``coro`` as a task of this association: cancelled when it ends; an
        unexpected exception aborts the association."""
        task: asyncio.Task[Any] = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Future[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None and not isinstance(exc, AssociationError):
            self.log.error("internal error in association task", error=repr(exc))
            self.abort(f"internal error: {exc!r}")

    def context_for(self, abstract_syntax: str, *, as_scp: bool = False) -> PresentationContext:
        """The first accepted context for ``abstract_syntax`` where we may take the role."""
        return self.session.context_for(abstract_syntax, as_scp=as_scp)

    def context(self, context_id: int) -> PresentationContext:
        return self.session.context(context_id)

    def _check_can_send(self) -> None:
        if self.fsm.state not in _CAN_SEND:
            raise AssociationAborted(self._end_reason or f"association not established ({self.fsm.state.name})")

    def _check_can_send_now(self, command: Command) -> None:
        """As :meth:`_check_can_send`, and once the peer has asked to release (Sta8) only
        responses go out: no P-DATA can follow its A-RELEASE-RQ (PS3.8 Table 9-10), so a
        request of ours that waited for the send lock meanwhile could never be answered.
        Nor a C-CANCEL-RQ: what it asks for is the cancelled operation's final response
        (PS3.7 §9.3.2.3), which cannot come either. The message is dropped with
        one line naming it; its sender gets :class:`AssociationAborted`."""
        self._check_can_send()
        if self.fsm.state is not _ESTABLISHED and not command.command_field & 0x8000:
            self.log.info("request not sent: the peer released the association", command=command.name)
            raise _not_after_release(command)

    async def _drain(self, timeout: float | None = None) -> None:
        """Until the transport takes more: a peer that reads none of it for ``timeout``
        seconds (a request's DIMSE timeout) is aborted, :class:`AssociationTimeout`."""
        if self._write_paused and self.transport is not None and not self.transport.is_closing():
            if self._drain_waiter is None:  # one waiter for every send waiting
                self._drain_waiter = self.loop.create_future()
            if timeout is None:
                await asyncio.shield(self._drain_waiter)
            elif not (await asyncio.wait((self._drain_waiter,), timeout=timeout))[0]:
                reason = f"the peer read none of our data for {timeout} s"
                self.abort(reason)
                raise AssociationTimeout(reason)
            self._check_can_send()  # the connection may have gone while we waited

    async def send(
        self, context_id: int, command: Command, dataset: Payload | None = None, *, timeout: float | None = None
    ) -> None:
        """Send one DIMSE message, fragmented for the peer's maximum PDU length.

        ``dataset`` is bytes, or a payload with ``length`` and ``read(n)`` streamed in
        PDU-sized pieces (a file). The send lock keeps messages whole; small ones go
        out in one write, large ones in ~1 MiB writes that wait for the transport to drain.
        ``timeout``: a peer that reads nothing of it for that long is aborted (a request's
        DIMSE timeout; ``None``: the network idle timeout applies).
        """
        if dataset is None:
            if not self._sending and self._send_now(context_id, command):
                if self._write_paused:
                    self._mark_sent(command)
                    await self._drain(timeout)
                return
        else:
            command.data_set_type = 0x0000
            # A small data set in memory goes with its command in one write, as a message
            # without one does (the locked path would join them into one write too).
            if (
                isinstance(dataset, bytes)
                and len(dataset) < JOIN_BELOW
                and not self._sending
                and self._send_now(context_id, command, dataset)
            ):
                if self._write_paused:
                    self._mark_sent(command)
                    await self._drain(timeout)
                return
        cmd = encode_command(command)
        max_pdu = self.negotiated.peer_max_pdu if self.negotiated else 0
        self._sending += 1
        try:
            await self._send_locked(context_id, command, cmd, dataset, max_pdu, timeout)
        finally:
            self._sending -= 1

    def _send_now(
        self, context_id: int, command: Command, dataset: bytes | None = None, encoded: bytes | None = None
    ) -> bool:
        """Send a message without a data set, or with a small one in memory, at once,
        when no other send is under way or waiting (so nothing can come between): one
        write, no lock, no task switch. ``False`` when a response must wait for the
        output budget (the caller then takes the locked path). ``encoded``: the command
        set already encoded (:func:`~dimse_async.dimse.encode_response_fields`)."""
        if self.fsm.state is not _ESTABLISHED:  # (the check inlined: the call only to raise)
            self._check_can_send_now(command)
        budget = self.settings.output_budget
        if (
            budget is not None
            and command.command_field & 0x8000
            and budget.limit is not None
            and budget.total > budget.limit  # (what over() checks first: no call while under the limit)
            and budget.over(self.loop.time())
            and self.buffered_output() > 0
        ):
            return False
        max_pdu = self.negotiated.peer_max_pdu if self.negotiated else 0
        pdu = encode_pdata(context_id, encode_command(command) if encoded is None else encoded, True, max_pdu)
        if dataset is not None:
            n = len(dataset)
            if 0 < n <= (max_pdu or 1 << 22) - 6:  # one PDU, the usual case
                pdu = b"".join((pdu, encode_pdata_header(n, context_id, 2), dataset))
            else:
                parts: list[bytes | memoryview] = [pdu]
                for header, chunk in fragment_parts(context_id, dataset, False, max_pdu):
                    parts += (header, chunk)
                pdu = b"".join(parts)
        self._last_dimse = now = self.loop.time()
        self.oplog.sent(now, command, dataset, self, self._debug)
        self._run(self.fsm.send_pdata(pdu))
        if budget is not None:
            size = self.buffered_output()
            if size or budget.total:  # (with nothing queued anywhere, a report of 0 changes nothing)
                budget.report(self, size)
        if self._debug or self.settings.observer is not None:
            self._message_sent(context_id, command, dataset=dataset is not None)
        return True

    def _message_sent(self, context_id: int, command: Command, *, dataset: bool) -> None:
        """A whole message has gone to the transport: debug line and observer."""
        if self._debug:
            self.log.debug("message sent", command=command.name, context=context_id, dataset=dataset)
        if self.settings.observer is not None:
            self.settings.observer.message_sent(self, command)

    async def _send_locked(
        self,
        context_id: int,
        command: Command,
        cmd: bytes,
        dataset: Payload | None,
        max_pdu: int,
        timeout: float | None = None,
    ) -> None:
        async with self._lock():
            self._check_can_send_now(command)
            if command.command_field & 0x8000:  # a response: within the server-wide budget
                await self._within_output_budget()
            self.oplog.sent(self.loop.time(), command, dataset, self, self._debug)
            batch: list[bytes | memoryview] = list(fragment(context_id, cmd, True, max_pdu))
            size = sum(map(len, batch))
            unjoined = False
            if dataset is not None:
                # A source with ``prefetch`` (a file read in a worker thread) is asked to
                # have the next write batch in memory before the PDUs are cut from it.
                # Headers and value slices are handed to the transport as they are (one
                # writev) when the bytes cannot change under it (``bytes``, or a source
                # marked ``immutable``), else joined once per write.
                prefetch = shed = None
                unjoined = type(dataset) is bytes or getattr(dataset, "immutable", False)
                parts: Iterator[tuple[bytes, bytes | memoryview]]
                if isinstance(dataset, (bytes, bytearray, memoryview)):
                    parts = fragment_parts(context_id, dataset, False, max_pdu)
                else:
                    parts = fragment_stream_parts(context_id, dataset, max_pdu)
                    prefetch = getattr(dataset, "prefetch", None)
                    shed = getattr(dataset, "shed", None)
                ahead = WRITE_BATCH + (max_pdu or 1 << 22)
                started = False
                try:
                    if prefetch is not None:
                        await prefetch(ahead, self._may_read_ahead())
                    for header, chunk in parts:
                        batch += (header, chunk)
                        size += len(header) + len(chunk)
                        if size >= WRITE_BATCH:
                            self._run(self.fsm.send_pdata(batch if unjoined else b"".join(batch)))
                            self._report_output()
                            started, batch, size = True, [], 0
                            del header, chunk  # not kept (with the piece it is a slice of) while waiting
                            await self._between_batches(shed, timeout)
                            if prefetch is not None:
                                await prefetch(ahead, self._may_read_ahead())
                except BaseException as exc:
                    if started:  # the peer can never see this message whole (PS3.8 Annex E)
                        self.abort(f"sending {command.name} failed midway: {exc!r}")
                    raise
            if started and not command.command_field & 0x8000:
                self._answered_early(command)
            if batch:
                if unjoined and size >= JOIN_BELOW:  # a large tail: written as the pieces it is
                    self._run(self.fsm.send_pdata(batch))
                else:  # a small message: one buffer, one write
                    self._run(self.fsm.send_pdata(b"".join(batch) if len(batch) > 1 else bytes(batch[0])))
                self._report_output()
            self._last_dimse = self.loop.time()
            self._message_sent(context_id, command, dataset=dataset is not None)
            if self._write_paused:
                self._mark_sent(command)
            await self._drain(timeout)

    def sub_operation_progress(self) -> float:
        """When the peer last got on with a request of its own (a C-GET's C-STORE
        sub-operation): its command set or its last streamed bytes arrived; now while we
        perform one (our time, not the peer's)."""
        session = self.session
        if not session.idle:
            return self.loop.time()
        if session.streaming and self._last_rx > self._last_request:
            return self._last_rx
        return self._last_request

    def _answered_early(self, command: Command) -> None:
        """Before the last write of a request sent in several: a response to it already
        here came before the peer could have had the whole data set (see :meth:`request`)."""
        waiter = self._waiters.get(command.message_id or 0)
        if waiter is not None and waiter.waiting:
            waiter.early = True

    async def request(
        self,
        context: PresentationContext,
        command: Command,
        dataset: Payload | None = None,
        timeout: float | None = None,
    ) -> Message:
        """Send a request and await its single response (within the async ops window).

        A response other than a failure that arrived before the request's data set was
        all sent cannot be about it (a C-STORE-RSP Success for an instance the peer had
        not received whole, PS3.7 §9.1.1.1): :class:`DIMSEFailure`, its status disregarded."""
        timeout = self.settings.dimse_timeout if timeout is None else timeout
        window = self._invoke_window()
        await window.acquire()
        abandoned = False
        try:
            waiter = self.begin_request(context, command, multi=False)
            try:
                await self.send(context.id, command, dataset, timeout=timeout)
                waiter.sent = True
                rsp = await waiter.get(timeout)
            except asyncio.CancelledError:
                abandoned = waiter.sent and self.fsm.state in _CAN_SEND
                if abandoned:
                    self._abandon(waiter, window, timeout)
                raise
            finally:
                if not abandoned:
                    self.end_request(waiter)
        finally:
            if not abandoned:
                window.release()
        status = rsp.command.status
        if waiter.early and status is not None and not Status(status).is_failure:
            self.log.warning("response before the request's data set was all sent", command=command.name, status=f"0x{status:04X}")
            raise DIMSEFailure(
                f"{rsp.command.name} 0x{status:04X} arrived before our {command.name} data set was all sent "
                "(its status disregarded)"
            )
        return rsp

    def _abandon(self, waiter: ResponseQueue, window: asyncio.Semaphore, timeout: float | None) -> None:
        """A request whose caller stopped awaiting it (its task cancelled) once it went
        out: the peer still answers it (PS3.7 §9.1), so its message id stays expected
        and the response is dropped when it comes (not a protocol violation), its place
        in the window of operations we invoke is held until then (PS3.7 D.3.3.3), and a
        release waits for it. No response within ``timeout`` aborts, as for a request
        still awaited."""
        timer = None if timeout is None else self.loop.call_later(timeout, self._abandoned_timeout, waiter, timeout)

        def answered(_done: asyncio.Future[None]) -> None:
            if timer is not None:
                timer.cancel()
            self.end_request(waiter)
            window.release()

        waiter.done.add_done_callback(answered)
        if self._debug:
            self.log.debug("request no longer awaited: its response will be dropped", message_id=waiter.message_id)

    def _abandoned_timeout(self, waiter: ResponseQueue, timeout: float) -> None:
        if not waiter.done.done():
            self.abort(f"no {waiter.name} response within {timeout} s")

    def _mark_sent(self, command: Command) -> None:
        """``command`` went to the transport whole: a request's waiter learns it (before
        a wait for the transport to drain, which its caller may cancel)."""
        if not command.command_field & 0x8000:
            waiter = self._waiters.get(command.message_id or 0)
            if waiter is not None:
                waiter.sent = True

    def request_stream(
        self,
        context: PresentationContext,
        command: Command,
        dataset: Payload | None = None,
        timeout: float | None = None,
    ) -> MessageStream:
        """Send a multi-response request (C-FIND/C-GET/C-MOVE); iterate its responses,
        waiting at most ``timeout`` (default: the AE's ``dimse_timeout``) for each."""
        return MessageStream(self, context, command, dataset, timeout)

    @property
    def dimse_timeout(self) -> float | None:
        """Default seconds to wait for each response (the AE's ``dimse_timeout``)."""
        return self.settings.dimse_timeout

    async def acquire_window(self) -> None:
        """Wait for a free slot in the window of operations we may invoke (PS3.7 D.3.3.3)."""
        await self._invoke_window().acquire()

    def release_window(self) -> None:
        self._invoke_window().release()

    def _invoke_window(self) -> asyncio.Semaphore:
        """The window of requests we may invoke (an acceptor that only answers never makes it)."""
        window = self._window
        if window is None:
            window = self._window = asyncio.Semaphore(1)
        return window

    def _lock(self) -> asyncio.Lock:
        """The lock a message being sent holds (made by the first send that waits for it)."""
        lock = self._send_lock
        if lock is None:
            lock = self._send_lock = asyncio.Lock()
        return lock

    def begin_request(self, context: PresentationContext, command: Command, *, multi: bool) -> ResponseQueue:
        """Give ``command`` a message id and a queue for its responses (not sent yet).
        Not once the peer has asked to release (Sta8): no P-DATA can follow its
        A-RELEASE-RQ (PS3.8 Table 9-10), so a request sent now could never be answered
        (a C-GET's next C-STORE sub-operation fails at once instead of waiting for the
        DIMSE timeout)."""
        state = self.fsm.state
        if state is not _ESTABLISHED:
            self._check_can_send()
            raise _not_after_release(command)
        if "window" in self._pause_reasons and not self._held_past_budget():
            self.resume_reading("window")  # its response must be read (see _on_session_event)
        mid = self.session.start_request(context, command, multi=multi)
        waiter = self._waiters[mid] = ResponseQueue(self, mid, command.name)
        return waiter

    def fail_requests(self, exc: BaseException) -> None:
        """Stop waiting for the responses to our requests (each waiter raises ``exc``;
        a request still being sent is sent whole first): a server shutting down ends a
        C-GET whose requestor does not answer its C-STORE sub-operations."""
        for waiter in list(self._waiters.values()):
            waiter.fail(exc)

    def end_request(self, waiter: ResponseWaiter) -> None:
        """Forget the request: later responses to it are ignored."""
        queue = self._waiters.pop(waiter.message_id, None)
        if queue is not None:
            queue.resume()  # its responses no longer wait for anyone
        self.session.forget_request(waiter.message_id)

    def _on_pdata(self, out: PDataIndication) -> None:
        if self.fsm.state in _ENDED:
            return  # aborted earlier in this batch of PDUs: the data is ignored (AA-6)
        pdvs = out.pdu.pdvs
        sink = self._sink
        events = None
        if sink is not None and len(pdvs) == 1:
            pdv = pdvs[0]
            events = self.session.stream(pdv)
            if events is not None:  # a streamed data set's fragment: straight to its sink, no event
                sink.write(pdv.data)
                if not pdv.is_last:
                    return
                self._sink = None
        if events is None:
            try:
                events = self.session.receive(pdvs)
            except DIMSEError as exc:
                self._dimse_violation(exc)
                return
        for event in events:
            self._on_session_event(event)
        # The DIMSE deadline watch: a message that began in this PDU is noted with the
        # time of the read that brought it (no clock read, no call); the timer wakes at
        # least every dimse_timeout (see _idle_deadline) and then at its deadline.
        current = self.session.assembler.current
        if current != self._message_mark:
            self._message_mark = current
            self._message_start = self._last_rx if current else None
        if not current:  # between messages: a buffer the reader kept for the rest of one goes (PDUReader.hold)
            reader = self.fsm.reader
            if reader.end and reader.end == reader.start:
                reader.let_go()

    def _dimse_violation(self, exc: DIMSEError) -> None:
        """A-ABORT (service-provider source, the reason the violation calls for) with one
        warning naming it, and the message it cut when one was arriving: a command whose
        Command Data Set Type announced a data set that never came before the next
        command set (PS3.7 §9.3, E.1; PS3.8 Annex E) is named with that value."""
        error = str(exc)
        awaited = self.session.receiving
        if awaited is not None:
            cmd = awaited.command
            mid = cmd.message_id or cmd.message_id_being_responded_to
            error += f"; receiving {cmd.name} (message id {mid}, Command Data Set Type 0x{cmd.data_set_type:04X})"
        self.log.warning("DIMSE protocol violation", error=error)
        reason = AbortReason(exc.reason)
        self._run(self.fsm.provider_abort(f"DIMSE protocol violation: {error}", reason, now=self.loop.time()))

    def _received(self, msg: Message) -> None:
        """A complete request or response arrived: accounting and observers."""
        now = self._last_dimse = self.loop.time()
        self.oplog.received(now, msg, self, self._debug)
        if self.settings.observer is not None:
            self.settings.observer.message_received(self, msg.command)

    def note_error(self, kind: str) -> None:
        """Count a local failure of ``kind`` (e.g. "spool", "storage") for metrics."""
        if self.settings.observer is not None:
            self.settings.observer.error(kind)

    def _on_session_event(self, event: SessionEvent) -> None:
        # The per-message events first: a data set fragment, a request to perform, a
        # response, a data set streamed (by type identity: the session's own classes).
        if type(event) is Perform:
            op = event.operation
            self._received(op.message)
            self._last_request = self._last_dimse
            if self._debug:
                self.log.debug("message received", command=op.command.name, context=op.context.id)
            if not self._start_inline(op):
                self.spawn(self._perform(op))
        elif type(event) is StreamStarted:
            message = event.message
            self._last_request = self._last_rx  # (its command set came with the read just made)
            self._sink = message.sink = self.settings.sinks[message.command.command_field](self, message)
        elif isinstance(event, DataFragment):
            if self._sink is not None:
                self._sink.write(event.data)
                if event.last:
                    self._sink = None
        elif isinstance(event, ResponseArrived):
            self._received(event.message)
            waiter = self._waiters.get(event.message_id)
            if waiter is not None:
                waiter.put(event.message, event.final)
        elif isinstance(event, Respond):
            if event.request is not None and event.request.sink is not None:
                event.request.sink.discard()  # refused or cancelled before it started
            self._respond(event.context_id, event.command)
        elif isinstance(event, PauseReading):
            # Not when the held-back requests already ran (answered inline); nor, for a few,
            # while requests of ours await responses (a C-GET's C-STORE sub-operations:
            # unread, they would hold the operation, and so every held-back one, for good).
            if self.session.held and (not self._waiters or self._held_past_budget()):
                self.pause_reading("window")
        elif isinstance(event, ResumeReading):
            self.resume_reading("window")
        elif isinstance(event, CancelRequested):
            if self._debug:
                self.log.debug("C-CANCEL received", message_id=event.operation.message_id)
            if event.operation.on_cancel is not None:
                event.operation.on_cancel()

    def _held_past_budget(self) -> bool:
        """The peer's requests held back are past what we read on for (see
        :data:`MAX_HELD_AWAITING`)."""
        session = self.session
        return session.held > MAX_HELD_AWAITING or session.held_bytes > MAX_HELD_BYTES_AWAITING

    def _start_inline(self, op: Operation) -> bool:
        """Let a service with a ``start(assoc, op, done)`` run ``op`` as callbacks
        instead of a task (the usual C-STORE into a directory: one file job, then the
        response); it then ends with :meth:`answer`. ``False``: it did not take it.

        ``done`` is the association's spare future: an operation answered before its
        ``start`` returns (an instance written on the loop) leaves it pending, for the
        next one; one that outlives ``start`` (work in the writer thread) keeps it, in
        the association's tasks (cancelled when it ends, awaited before a release), and
        the next operation gets a new one."""
        start = getattr(self.settings.dispatch.get(op.message.command.command_field), "start", None)
        if start is None:
            return False
        done = self._spare_done
        if done is None:
            done = self._spare_done = self.loop.create_future()
        self._spare_for = op  # (cleared by _finished_inline when op is answered within start)
        if not start(self, op, done):
            self._spare_for = None
            return False
        if self._spare_for is op:  # still under way: the future is its own now
            self._spare_for = self._spare_done = None
            self._tasks.add(done)
        return True

    def answer(
        self, op: Operation, command: Command, done: asyncio.Future[None], encoded: bytes | None = None
    ) -> None:
        """Send the final response of ``op`` run as callbacks (see :meth:`_start_inline`),
        at once when nothing else is being sent, else behind the sends under way; then
        the operation is finished (the next held-back request may start). Nothing is
        sent once ``done`` is done: the association ended meanwhile. ``encoded``:
        ``command`` already encoded, for the usual case (sent at once)."""
        if done.done():
            return
        if not self._sending and not self._write_paused:
            try:
                sent = self._send_now(op.context.id, command, None, encoded)
            except AssociationError:
                sent = True  # gone: nobody to answer
            if sent:
                self._finished_inline(op, done)
                return
        task = self.spawn(self.send(op.context.id, command))
        task.add_done_callback(lambda _task: self._finished_inline(op, done))

    def answer_encoded(self, op: Operation, done: asyncio.Future[None], encoded: bytes) -> bool:
        """:meth:`answer` with the final Success response of ``op`` (no error comment)
        already encoded, without its :class:`Command` when nobody would look at one: sent
        at once (nothing else being sent, no output budget exceeded), no DEBUG lines,
        no observer, operations not logged at INFO. ``True``: sent, or nothing to send
        (the association ended); ``False``: nothing done, the caller makes the response
        and calls :meth:`answer`."""
        if done.done():
            return True
        if self._sending or self._write_paused or self._debug or self.settings.observer is not None or self.oplog.info:
            return False
        if self.fsm.state not in _CAN_SEND:  # gone: nobody to answer (as answer() finds)
            self._finished_inline(op, done)
            return True
        budget = self.settings.output_budget
        if (
            budget is not None
            and budget.limit is not None
            and budget.total > budget.limit
            and budget.over(self.loop.time())
            and self.buffered_output() > 0
        ):
            return False
        self._last_dimse = self.loop.time()
        self.oplog.succeeded(op.message.command)
        max_pdu = self.negotiated.peer_max_pdu if self.negotiated else 0
        self._run(self.fsm.send_pdata(encode_pdata(op.context.id, encoded, True, max_pdu)))
        if budget is not None:
            size = self.buffered_output()
            if size or budget.total:  # (as _send_now reports)
                budget.report(self, size)
        self._finished_inline(op, done)
        return True

    def _finished_inline(self, op: Operation, done: asyncio.Future[None]) -> None:
        if op is self._spare_for and done is self._spare_done:
            self._spare_for = None  # answered within its start: the spare stays pending, for the next one
        else:
            self._tasks.discard(done)
            if not done.done():
                done.set_result(None)
        sink = op.message.sink
        if sink is not None:
            sink.discard()
        if self._closed.done():
            return
        # A held-back request started here may finish inline too: loop, never recurse
        # (a peer can pack thousands of requests beyond the window into one PDU).
        finished = self._finished_ops
        if finished:
            finished.append(op)
            return  # an outer call is taking them in turn
        events = self.session.finished(op)
        if not events:
            return  # the usual case: nothing held back starts
        finished.append(op)  # (so that one finishing meanwhile is taken below, in turn)
        for event in events:
            self._on_session_event(event)
        finished.popleft()
        while finished:
            for event in self.session.finished(self._finished_ops[0]):
                self._on_session_event(event)
            self._finished_ops.popleft()

    def _respond(self, context_id: int, command: Command) -> None:
        """Send a response the session decided: at once when nothing else is being
        sent, else in a task behind the sends under way."""
        if not self._sending and not self._write_paused:
            try:
                if self._send_now(context_id, command):
                    return
            except AssociationError:
                return  # the association is gone: nobody to answer
        self.spawn(self.send(context_id, command))

    async def _perform(self, op: Operation) -> None:
        """Run the service for one received request; then let the next held-back one start."""
        try:
            cmd = op.command
            service = self.settings.dispatch.get(cmd.command_field)
            if service is None:
                self.log.warning("unsupported DIMSE request", command=cmd.name)
                rsp = Command(cmd.command_field | 0x8000, message_id_being_responded_to=cmd.message_id)
                rsp.affected_sop_class_uid, rsp.status = cmd.affected_sop_class_uid, Code.UNRECOGNIZED_OPERATION
                await self.send(op.context.id, rsp)
            else:
                await service(self, op)
        finally:
            sink = op.message.sink
            if sink is not None:
                sink.discard()
            if not self._closed.done():
                for event in self.session.finished(op):
                    self._on_session_event(event)

    send_message = send

    # ------------------------------------------------------------ idle timers
    # Not in the sans-I/O core: they weigh local work (handlers running, responses
    # awaited, a transport that cannot drain), which only the adapter sees. The
    # adapter's single timer (association._schedule) wakes them.

    def _idle_deadline(self) -> float | None:
        """When the adapter's timer must wake: :meth:`_network_deadline`, and between
        messages, once negotiated, ``dimse_timeout`` from now at the latest: a message is
        noted as it begins without a look at the timer (see :meth:`_on_pdata`), and a
        wake within ``dimse_timeout`` of its start then schedules its deadline. (A
        ``dimse_timeout`` of 0 or less is judged at the next wake.)"""
        deadline = self._network_deadline()
        if self._message_start is None and self.negotiated is not None:
            timeout = self.settings.dimse_timeout
            if timeout is not None and timeout > 0:
                sweep = self.loop.time() + timeout
                if deadline is None or sweep < deadline:
                    return sweep
        return deadline

    def _network_deadline(self) -> float | None:
        """Network idle timeout: when the association counts as silent (``network_timeout``),
        or the DIMSE deadline of a message still arriving, whichever comes first."""
        message = self._message_deadline() if self._message_start is not None else None
        timeout = self.settings.network_timeout
        if timeout is None or self.negotiated is None:
            return message
        rx, tx = self._last_rx, self._last_tx
        idle = (rx if rx > tx else tx) + timeout
        return idle if message is None or idle < message else message

    def _message_deadline(self) -> float | None:
        """A message whose command announced a data set (or whose command set came in
        part) must complete within ``dimse_timeout`` of its start; one streamed to a sink
        (a C-STORE, any size) within ``dimse_timeout`` of its last bytes. Past it: A-ABORT,
        as pynetdicom's ``dimse_timeout`` and DCMTK's ``-td`` (PS3.7 §7.5.2, PS3.8 §9.3.8
        give no status for it). Time we did not read (paused) does not count."""
        start, timeout = self._message_start, self.settings.dimse_timeout
        if start is None or timeout is None:
            return None
        if self.session.streaming and self._last_rx > start:
            start = self._last_rx
        return start + timeout

    def _check_message(self, now: float) -> bool:
        """Abort when the message arriving is past its DIMSE deadline; ``True`` if so."""
        deadline = self._message_deadline()
        if deadline is None or now < deadline or self._closed.done():
            return False
        if self._pause_reasons:  # we stopped reading, not the peer: not its fault
            self._message_start = now
            return False
        msg = self.session.receiving
        what = f"{msg.command.name} data set" if msg is not None else "command set"
        timeout = self.settings.dimse_timeout
        if self.session.streaming:
            reason = f"DIMSE timeout: nothing more of the {what} for {timeout} s"
        elif msg is not None and not self.session.assembler.received:
            # (pynetdicom announces one for an empty Dataset() and sends none: PS3.7 E.1)
            reason = (
                f"DIMSE timeout: the {what} not complete within {timeout} s: none of it came "
                f"(its Command Data Set Type 0x{msg.command.data_set_type:04X} announced one)"
            )
        else:
            reason = f"DIMSE timeout: the {what} not complete within {timeout} s"
        self._message_start = None  # once
        self.log.warning("message incomplete: aborting", reason=reason)
        self.abort(reason)
        return True

    def _check_idle(self, now: float) -> None:
        if self._message_start is not None and self._check_message(now):
            return
        deadline = self._network_deadline()
        if deadline is None or now < deadline or self._closed.done():
            return
        # Handlers blocked on a peer that neither sends nor reads are not local work.
        if self._write_paused or (not self._tasks and not self._waiters):
            self.abort(f"network idle timeout ({self.settings.network_timeout} s)")
            return
        self._last_rx = now  # busy locally: not idle

    def _idle_release_deadline(self) -> float | None:
        """Requestor with ``AE(idle_release=...)``: release after that long without DIMSE traffic."""
        delay = self.settings.idle_release
        if delay is None or not self.requestor or self.negotiated is None:
            return None
        return self._last_dimse + delay

    def _check_idle_release(self, now: float) -> None:
        deadline = self._idle_release_deadline()
        if deadline is None or now < deadline or self._closed.done() or not self.is_established:
            return
        if self._waiters:
            self._last_dimse = now
            return
        self.log.info("releasing idle association", idle_release=self.settings.idle_release)
        self._last_dimse = float("inf")  # once
        self.spawn(self.release())
