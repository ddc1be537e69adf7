"""C-GET and C-MOVE SCP (PS3.4 C.4.2, C.4.3): the handler's instances go out as
C-STORE sub-operations, on this association (C-GET) or on a second one to the move
destination (C-MOVE), with pending responses counting them and a final status from
the counters (C.4.2.1.5, C.4.3.1.4). A C-CANCEL stops the sub-operations: the final
response is Cancel with the remaining count.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import field
from typing import Any

from pydicom.dataset import Dataset

from ..acse import ContextSpec
from ..contexts import MAX_CONTEXTS, FileInfo, inspect_file, plan_contexts
from ..exceptions import AssociationError, ConnectionFailed, DIMSEFailure, NoAcceptedContext
from ..interface import DIMSEProvider
from ..lazy_dataclass import dataclass
from ..part10 import read_file_meta
from ..session import Operation
from ..status import Code, Status, StatusCategory
from ..uids import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from .qr import (
    Matches,
    QueryHandler,
    QueryRequest,
    RetrieveRequest,
    StoredFile,
    Unavailable,
    close_handler,
    decode_request,
    respond,
    unsupported,
)
from .scp import brief_error, failure_status, own_cancellation
from .store_scu import c_store

__all__ = ["MoveRoute", "scp_c_get", "scp_c_move"]


@dataclass(slots=True)
class MoveRoute:
    """How a C-MOVE SCP reaches destinations: AE title -> (host, port), and a way to associate.

    ``per_destination``: sub-associations open at once to one destination (host, port),
    over every C-MOVE through this route; a C-MOVE past it waits for one to end before
    it associates (a C-CANCEL ends the wait), so requestors cannot make the SCP flood a
    destination with associations (``None``: no limit). The bound is this route's (one
    process: with ``serve --workers N``, each worker's). While a C-MOVE waits, a Pending
    response every :data:`SLOT_PENDING_INTERVAL` seconds tells its requestor it goes on."""

    known_aes: Mapping[str, tuple[str, int]]
    associate: Callable[..., Awaitable[Any]]
    concurrency: int = 4
    per_destination: int | None = 8
    slots: dict[tuple[str, int], asyncio.Semaphore] = field(default_factory=dict)

    def slot(self, address: tuple[str, int]) -> asyncio.Semaphore | None:
        """The semaphore bounding sub-associations to ``address`` (``None``: unbounded)."""
        if self.per_destination is None:
            return None
        if address not in self.slots:
            self.slots[address] = asyncio.Semaphore(self.per_destination)
        return self.slots[address]


def _item_uid(item: Any) -> str:
    if isinstance(item, Unavailable | StoredFile):
        return item.sop_instance_uid
    if isinstance(item, Dataset):
        return str(item.get("SOPInstanceUID", ""))
    try:
        with open(os.fspath(item), "rb") as fp:
            meta = read_file_meta(fp)
        return meta.sop_instance_uid if meta else ""
    except (OSError, TypeError, ValueError):  # (a handler's item that is no path: a failed sub-operation)
        return ""


def _final_status(cancelled: bool, remaining: int, completed: int, failed: int, warning: int) -> Status:
    """The final C-GET / C-MOVE status from the counters (PS3.4 C.4.2.1.5, C.4.3.1.4).
    ``cancelled``: a C-CANCEL stopped sub-operations (not yet started, ``remaining``, or
    interrupted under way, counted failed): Cancel (C.4.2.3.1)."""
    if cancelled:
        return Status(Code.CANCEL)
    if failed and not completed and not warning:
        return Status(Code.OUT_OF_RESOURCES_SUBOPERATIONS, "Unable to perform sub-operations")
    if failed or warning:
        return Status(Code.SUBOPERATIONS_WARNING, "Sub-operations complete, one or more failures or warnings")
    return Status(Code.SUCCESS)


class _Items:
    """The items of a C-GET / C-MOVE taken one at a time by the sub-operation workers:
    a list, or the handler's generator itself (announced by :class:`Matches`)."""

    def __init__(self, items: list[Any] | AsyncIterator[Any], total: int):
        self.total = total
        self._list = list(reversed(items)) if isinstance(items, list) else None
        self._iter = items if not isinstance(items, list) else None
        self._lock = asyncio.Lock()
        self.ended = False
        #: What the handler raised while yielding (the items not sent stay remaining).
        self.error: BaseException | None = None

    async def next(self) -> tuple[bool, Any]:
        """(True, the next item), or (False, None) when there are no more."""
        if self._list is not None:
            return (True, self._list.pop()) if self._list else (False, None)
        async with self._lock:  # one generator step at a time
            if self.ended or self._iter is None:
                return False, None
            try:
                return True, await anext(self._iter)
            except StopAsyncIteration:
                self.ended = True
            except AssociationError:
                raise
            except asyncio.CancelledError as exc:
                if own_cancellation():
                    raise
                self.ended = True
                self.error = exc
            except Exception as exc:
                self.ended = True
                self.error = exc
            return False, None

    async def rest(self) -> list[Any]:
        """Every item not taken yet."""
        out: list[Any] = []
        while True:
            more, item = await self.next()
            if not more:
                return out
            out.append(item)


async def _run_suboperations(
    assoc: DIMSEProvider,
    op: Operation,
    items: list[Any] | _Items,
    store: Callable[[Any], Awaitable[Status]],
    concurrency: int = 1,
    interrupt: Callable[[], None] | None = None,
) -> None:
    """C-STORE every item with ``store``, answering pending responses with the four
    counters, then the final response (PS3.4 C.4.2.3 / C.4.3.3).

    A server shutting down (``op.on_stop``, once its grace period is over) gets the
    final response at once instead of an association aborted without one:
    ``interrupt()`` ends the sub-operations under way (their responses no longer
    awaited), no other starts, and every sub-operation not completed is counted failed
    and listed in the Failed SOP Instance UID List - Warning 0xB000, or 0xA702 Refused:
    Out of Resources - Unable to perform sub-operations when none completed (PS3.4
    C.4.2.3.1, C.4.3.3.1: the final response once no sub-operation remains; as DCMTK's
    dcmqrscp fails every remaining sub-operation when it cannot go on). Cancel (0xFE00)
    is for the requestor's C-CANCEL only."""
    source = items if isinstance(items, _Items) else _Items(items, len(items))
    total = source.total
    completed = failed = warning = 0
    failed_uids: list[str] = []
    interrupted = False  # a sub-operation under way was cut short by the C-CANCEL
    logged: dict[str, int] = {}
    stopping = False  # the server is shutting down (op.on_stop)
    answered: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def stop() -> None:
        nonlocal stopping
        if not stopping and not answered.done():
            stopping = True
            assoc.log.warning("server shutting down: ending the retrieve with its final response", sub_operations=total)
            if interrupt is not None:
                interrupt()
        await asyncio.shield(answered)

    def warn(event: str, **fields: Any) -> None:
        """A failed sub-operation's warning: the first SUBOP_LOG_BURST of each kind per
        C-GET / C-MOVE in full, the rest counted into one line at the end (a study of
        100,000 instances for a peer that takes none is not 100,000 lines)."""
        logged[event] = logged.get(event, 0) + 1
        if logged[event] <= SUBOP_LOG_BURST:
            assoc.log.warning(event, **fields)

    async def worker() -> None:
        nonlocal completed, failed, warning, interrupted
        while not op.cancelled and not stopping and assoc.is_established:
            more, item = await source.next()
            if not more:
                return
            try:
                if isinstance(item, Unavailable):
                    warn("sub-operation not possible", sop_instance=item.sop_instance_uid, error=item.reason)
                    category = StatusCategory.FAILURE
                else:
                    category = (await store(item)).category
            except NoAcceptedContext as exc:
                warn("sub-operation not possible", error=str(exc))
                category = StatusCategory.FAILURE
            except AssociationError as exc:
                if not assoc.is_established and not assoc.peer_released:
                    raise
                # The C-MOVE sub-association ended (the destination aborted), or the C-GET
                # peer released with our C-STORE unanswered: this and every later
                # sub-operation fail, and the final response still goes out.
                warn("sub-operation failed: sub-association ended", error=str(exc))
                category = StatusCategory.FAILURE
                interrupted = interrupted or op.cancelled
            except Exception as exc:
                where = (
                    {"sop_instance": item.sop_instance_uid, "path": str(item)} if isinstance(item, StoredFile) else {}
                )
                warn("sub-operation failed", **where, error=brief_error(exc))
                category = StatusCategory.FAILURE
            if category is StatusCategory.SUCCESS:
                completed += 1
            elif category is StatusCategory.WARNING:
                warning += 1
            else:
                failed += 1
                failed_uids.append(await asyncio.to_thread(_item_uid, item))
            remaining = max(total - completed - failed - warning, 0)  # more than counted: stored meanwhile
            if remaining and not op.cancelled and not stopping and not assoc.peer_released:
                # The association's send lock keeps concurrent workers' responses whole and in order.
                await respond(assoc, op, Status(Code.PENDING), None, (remaining, completed, failed, warning))

    op.on_stop = stop
    try:
        try:
            await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, total or 1)))))
        finally:
            for event, count in logged.items():
                if count > SUBOP_LOG_BURST:
                    assoc.log.warning(f"{event}: more not logged", more=count - SUBOP_LOG_BURST)
        remaining = max(total - completed - failed - warning, 0)
        # A server shutting down, or a peer that asked to release (no further sub-operation
        # can be answered on its association, PS3.8 Sta8): those not performed failed.
        shutdown = (stopping or assoc.peer_released) and not op.cancelled
        if shutdown:  # not performed: failed (the final response has no Remaining, C.4.2.3.1)
            rest = await source.rest()
            failed_uids += await asyncio.to_thread(lambda: [_item_uid(i) for i in rest])
            failed += max(remaining, len(rest))
            remaining = 0
        status = _final_status(op.cancelled and (remaining > 0 or interrupted), remaining, completed, failed, warning)
        if shutdown:
            why = "Server shutting down" if stopping else "Peer released"
            status = Status(int(status), f"{why}: sub-operations not done failed")
        elif source.error is not None and not op.cancelled:  # the handler failed part way
            status = failure_status(op.command.command_field, source.error, assoc)
        final_ident = None
        if failed_uids:
            final_ident = Dataset()
            final_ident.FailedSOPInstanceUIDList = [u for u in failed_uids if u] or [""]
        # Remaining is only meaningful in pending and cancel responses (PS3.7 §9.3.3.2).
        counters = (remaining if int(status) == Code.CANCEL else None, completed, failed, warning)
        await respond(assoc, op, status, final_ident, counters)
    finally:
        op.on_stop = None
        if not answered.done():
            answered.set_result(None)


async def _scp_retrieve(
    assoc: DIMSEProvider,
    op: Operation,
    handler: QueryHandler | None,
    perform: Callable[[QueryRequest, list[Any] | _Items, Matches | None], Awaitable[None]],
    check: Callable[[], Status | None] = lambda: None,
) -> None:
    """Shared C-GET / C-MOVE SCP flow: decode, refuse early, then ``perform`` the
    sub-operations: on the handler's items as it yields them when it announced them
    with :class:`Matches` first, else on the items collected first."""
    request = await decode_request(assoc, op, RetrieveRequest)
    if isinstance(request, Status) or handler is None:
        await respond(assoc, op, request if isinstance(request, Status) else unsupported(op))
        return
    refusal = check()
    if refusal is not None:
        await respond(assoc, op, refusal)
        return
    agen: Any = None
    try:
        try:
            agen = handler(request)
            first = await anext(agen, _NONE)
            matches = first if isinstance(first, Matches) else None
            items: list[Any] | _Items
            if matches is not None:
                items = _Items(agen, matches.count)
            else:
                items = [] if first is _NONE else [first]
                if items and not request.cancelled:
                    async for item in agen:
                        items.append(item)
                        if request.cancelled:
                            break
        except AssociationError:
            raise
        except (Exception, asyncio.CancelledError) as exc:
            if isinstance(exc, asyncio.CancelledError) and own_cancellation():
                raise
            if isinstance(exc, TypeError) and agen is not None and not hasattr(agen, "__anext__"):
                exc = TypeError(f"the handler returned {type(agen).__name__}, not an async generator")
            await respond(assoc, op, failure_status(op.command.command_field, exc, assoc))
            return
        await perform(request, items, matches)
    finally:
        await close_handler(agen)


_NONE = object()

#: Warnings logged in full per kind of failed sub-operation and C-GET / C-MOVE.
SUBOP_LOG_BURST = 5

#: Seconds between the Pending responses of a C-MOVE waiting for a place among its
#: destination's sub-associations (PS3.4 C.4.2.1.5): requestors that time out a silent
#: C-MOVE (Orthanc's DicomScuTimeout is 10 s, pynetdicom's DIMSE timeout 30 s) keep waiting.
SLOT_PENDING_INTERVAL = 5.0

#: Seconds the C-STORE sub-operations under way when a C-MOVE is cancelled get to be
#: answered before the sub-association is aborted (PS3.4 C.4.2.3).
CANCEL_GRACE = 2.0


async def scp_c_get(assoc: DIMSEProvider, op: Operation, handler: QueryHandler | None = None) -> None:
    """C-GET SCP: the handler's instances go back as C-STORE sub-operations on this
    association (PS3.4 C.4.3)."""

    async def store(item: Any) -> Status:
        return await c_store(assoc, item)

    def interrupt() -> None:  # the sub-operations' responses are no longer awaited
        assoc.fail_requests(DIMSEFailure("C-STORE sub-operation not answered: server shutting down"))

    async def perform(request: QueryRequest, items: list[Any] | _Items, _matches: Matches | None) -> None:
        await _run_suboperations(assoc, op, items, store, interrupt=interrupt)

    await _scp_retrieve(assoc, op, handler, perform)


async def scp_c_move(
    assoc: DIMSEProvider, op: Operation, handler: QueryHandler | None = None, route: MoveRoute | None = None
) -> None:
    """C-MOVE SCP: look up the destination, open a second association, C-STORE the
    handler's instances with the move originator fields set (PS3.4 C.4.2)."""
    dest_title = (op.command.move_destination or "").strip()
    destination = route.known_aes.get(dest_title) if route is not None else None

    def check() -> Status | None:
        if destination is None:
            assoc.log.warning("unknown move destination", destination=dest_title)
            return Status(Code.MOVE_DESTINATION_UNKNOWN, f"Move destination unknown: {dest_title}"[:64])
        return None

    async def perform(request: QueryRequest, items: list[Any] | _Items, matches: Matches | None) -> None:
        assert destination is not None and route is not None
        if isinstance(items, _Items) and (matches is None or matches.kinds is None):
            items = await items.rest()  # no kinds announced: the files are inspected first
        if not (items.total if isinstance(items, _Items) else items):
            await respond(assoc, op, Status(Code.SUCCESS), None, (None, 0, 0, 0))
            return
        kinds = matches.kinds if isinstance(items, _Items) and matches is not None else None
        await _move(assoc, op, items, dest_title, destination, route, kinds)

    await _scp_retrieve(assoc, op, handler, perform, check)


async def _move(
    assoc: DIMSEProvider,
    op: Operation,
    items: list[Any] | _Items,
    title: str,
    address: tuple[str, int],
    route: MoveRoute,
    kinds: tuple[tuple[str, str], ...] | None = None,
) -> None:
    if kinds is not None:  # announced by the handler (Matches): nothing is read ahead
        inspected: list[FileInfo | str] = [FileInfo("", c, ts, 0) for c, ts in kinds]
    else:
        listed = items if isinstance(items, list) else await items.rest()
        items = listed
        inspected = await asyncio.to_thread(lambda: [_inspect(i) for i in listed if not isinstance(i, Unavailable)])
    specs = _move_contexts(assoc, [x for x in inspected if isinstance(x, FileInfo)])
    if not specs:  # nothing that can be sent (the handler's items): no sub-association

        async def unsendable(item: Any) -> Status:
            raise NoAcceptedContext("neither a readable DICOM file nor a Dataset with its SOP Class UID")

        await _run_suboperations(assoc, op, items, unsendable)
        return
    originator = (assoc.peer_ae, op.command.message_id or 0)
    slot = route.slot(address)
    total = items.total if isinstance(items, _Items) else len(items)

    async def waiting() -> None:  # nothing started yet: every sub-operation remains (C.4.2.1.5)
        await respond(assoc, op, Status(Code.PENDING), None, (total, 0, 0, 0))

    answered: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    try:
        try:
            sub = await _associate_unless_cancelled(op, route, address, title, specs, slot, waiting, answered)
        except AssociationError as exc:
            rest = items if isinstance(items, list) else await items.rest()
            await _unreachable(assoc, op, rest, title, address, exc)
            return
    finally:
        if not answered.done():  # the final response of a server shutting down is out
            answered.set_result(None)
    if sub is None:  # C-CANCEL while the sub-association was being set up: nothing sent
        await respond(assoc, op, Status(Code.CANCEL), None, (total, 0, 0, 0))
        return
    try:
        await _send_moved(assoc, op, items, route, sub, originator)
    finally:
        if slot is not None:
            slot.release()


async def _send_moved(
    assoc: DIMSEProvider, op: Operation, items: list[Any] | _Items, route: MoveRoute, sub: Any, originator: Any
) -> None:
    """The C-STORE sub-operations of a C-MOVE on its sub-association ``sub``, then its end."""
    loop = asyncio.get_running_loop()
    stop: list[asyncio.TimerHandle] = []

    def cancelled() -> None:
        # C-CANCEL (PS3.4 C.4.2.3): the sub-operations under way get CANCEL_GRACE seconds
        # to be answered; a destination that does not answer them (slow, not reading)
        # does not hold the Cancel response for the DIMSE timeout: its association is aborted.
        stop.append(loop.call_later(CANCEL_GRACE, sub.abort, "C-MOVE cancelled; the destination did not answer"))

    op.on_cancel = cancelled
    completed = False
    try:

        async def store(item: Any) -> Status:
            status: Status = await sub.c_store(item, move_originator=originator)
            return status

        def interrupt() -> None:  # the destination's answers are no longer awaited
            sub.abort("server shutting down")

        await _run_suboperations(assoc, op, items, store, concurrency=route.concurrency, interrupt=interrupt)
        completed = True
    finally:
        op.on_cancel = None
        for handle in stop:
            handle.cancel()
        if completed and sub.is_established:
            await sub.release()
        else:  # the requestor's association ended (or the move failed) mid-way: no waiting for the destination
            sub.abort("move sub-association ended" if completed else "C-MOVE ended before its sub-operations")


async def _associate_unless_cancelled(
    op: Operation,
    route: MoveRoute,
    address: tuple[str, int],
    title: str,
    specs: list[ContextSpec],
    slot: asyncio.Semaphore | None = None,
    waiting: Callable[[], Awaitable[None]] | None = None,
    answered: asyncio.Future[None] | None = None,
) -> Any:
    """The C-MOVE sub-association, or ``None`` when the peer sends C-CANCEL before it is
    established (PS3.4 C.4.2.3: the SCP stops, Cancel): a destination slow to answer
    (up to the ACSE timeout) does not hold the cancel; the half-open association is aborted.
    With ``slot``, one of the destination's places is taken first (waiting for it is
    cancelled the same way; meanwhile ``waiting()`` sends a Pending response every
    :data:`SLOT_PENDING_INTERVAL` seconds) and kept with the association (the caller
    releases it); it is given back when no association is returned. A server shutting
    down (``op.on_stop``) ends the wait too: :class:`AssociationError`, the move failing
    as for an unreachable destination; ``answered`` is set once that response is out."""
    if op.cancelled:
        return None
    queued = [False]  # waiting for a place

    async def associate() -> Any:
        if slot is not None:
            queued[0] = slot.locked()
            try:
                await slot.acquire()
            finally:
                queued[0] = False
        try:
            return await route.associate(
                address[0], address[1], title, contexts=specs, async_ops=(route.concurrency, 1)
            )
        except BaseException:
            if slot is not None:
                slot.release()
            raise

    connecting = asyncio.ensure_future(associate())

    def cancel() -> None:
        connecting.cancel()  # nothing when already done

    stopping = [False]

    async def stop() -> None:  # the server shuts down: no destination to wait for
        stopping[0] = True
        connecting.cancel()
        if answered is not None:
            await asyncio.shield(answered)

    op.on_cancel = cancel
    op.on_stop = stop
    try:
        while not connecting.done():  # not cancelled by a response in flight: it runs here
            await asyncio.wait((connecting,), timeout=SLOT_PENDING_INTERVAL)
            if queued[0] and waiting is not None and not op.cancelled:
                await waiting()
        return connecting.result()
    except asyncio.CancelledError:
        if connecting.done() and not connecting.cancelled() and connecting.exception() is None:
            connecting.result().abort("C-MOVE ended while its sub-association was set up")
            if slot is not None:  # made just as the wait was cancelled: not used
                slot.release()
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise  # this task itself is cancelled (the association ended)
        if stopping[0] and not op.cancelled:
            raise ConnectionFailed("server shutting down") from None
        if not op.cancelled:
            raise
        return None
    finally:
        op.on_cancel = None
        op.on_stop = None
        if not connecting.done():
            connecting.cancel()


async def _unreachable(
    assoc: DIMSEProvider, op: Operation, items: list[Any], title: str, address: tuple[str, int], exc: Exception
) -> None:
    """The destination is known but no association to it could be made (refused,
    rejected, no answer): every sub-operation failed, 0xA702 Refused: Out of Resources -
    Unable to perform sub-operations, with the counters and the Failed SOP Instance UID
    List (PS3.4 C.4.2.1.5, C.4.2.3.1; as DCMTK's dcmqrscp). 0xA801 (Move Destination
    unknown) is only for a title not configured at all."""
    uids = await asyncio.to_thread(lambda: [_item_uid(i) for i in items])
    assoc.log.warning(
        "cannot reach move destination; every sub-operation failed",
        destination=title,
        address=f"{address[0]}:{address[1]}",
        failed=len(items),
        error=str(exc)[:200],
    )
    ident = Dataset()
    ident.FailedSOPInstanceUIDList = [u for u in uids if u] or [""]
    status = Status(Code.OUT_OF_RESOURCES_SUBOPERATIONS, f"Cannot reach {title}: {exc}"[:64])
    await respond(assoc, op, status, ident, (None, 0, len(items), 0))


def _move_contexts(assoc: DIMSEProvider, infos: list[FileInfo]) -> list[ContextSpec]:
    """The presentation contexts proposed to a C-MOVE destination: one per (SOP class,
    stored transfer syntax) plus an uncompressed one per class (:func:`plan_contexts`).
    When that is more than one association carries (128, PS3.8 §9.3.2.2), one context
    per SOP class offering its stored syntaxes and the uncompressed ones (the
    destination picks one; the other instances are transcoded where they can be), for
    the first 128 classes: instances of further classes fail, each logged (no accepted
    presentation context), instead of the whole C-MOVE."""
    try:
        return plan_contexts(infos)
    except ValueError as exc:
        assoc.log.warning("C-MOVE needs too many presentation contexts; one per SOP class", error=str(exc))
    by_class: dict[str, dict[str, None]] = {}
    for info in infos:
        by_class.setdefault(info.sop_class, {})[info.transfer_syntax] = None
    specs = [
        ContextSpec(sop_class, list(dict.fromkeys([*syntaxes, ExplicitVRLittleEndian, ImplicitVRLittleEndian])))
        for sop_class, syntaxes in by_class.items()
    ]
    return specs[:MAX_CONTEXTS]


def _inspect(item: Any) -> FileInfo | str:
    """What a C-MOVE sub-operation sends (for the destination's contexts), or why it
    cannot be sent (a handler's item that is neither a path nor a Dataset with its SOP
    Class UID: that sub-operation fails). Blocking."""
    if isinstance(item, Dataset):
        return _dataset_item(item) if "SOPClassUID" in item else "the data set has no SOP Class UID"
    try:
        return inspect_file(os.fspath(item))
    except (TypeError, ValueError):
        return f"neither a path nor a Dataset: {type(item).__name__}"


def _dataset_item(ds: Dataset) -> FileInfo:
    meta = getattr(ds, "file_meta", None)
    ts = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    return FileInfo("", str(ds.SOPClassUID), ts or ExplicitVRLittleEndian, 0)
