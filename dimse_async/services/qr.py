"""Query/Retrieve (PS3.4 Annex C) and Modality Worklist (Annex K): C-FIND, C-GET,
C-MOVE and C-CANCEL (PS3.7 §9.1.2-9.1.5, §9.3.2-9.3.4), SCU and SCP.

SCU: :func:`c_find`, :func:`c_get` and :func:`c_move` return a :class:`Responses`
async iterator. Leaving the loop early (``break``, an exception, task cancellation)
sends C-CANCEL and drains the final response in the background; ``status`` holds the
final status afterwards.

SCP: handlers are ``async def`` generators. A C-FIND handler yields matching
identifiers; a C-GET / C-MOVE handler yields what to send (file paths or
``Dataset``s), sent as sub-operations by :mod:`.retrieve_scp`. A C-CANCEL from the
peer stops the handler at its next yield and the final status is Cancel (0xFE00).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from ..acse import PresentationContext
from ..codec import decode_identifier, encode_dataset
from ..dataset_check import TooManyItems
from ..dimse import Command, CommandField, Message, affected_mismatch
from ..exceptions import AssociationError, DIMSEFailure
from ..inflate import InflationLimit
from ..interface import DIMSEProvider, ResponseStream, StoreHandler
from ..lazy_dataclass import dataclass
from ..session import Operation
from ..status import PENDING_CODES, Code, Status, response_status
from .requests import Request
from .scp import (
    StatusError,
    brief_error,
    decode_received,
    decode_received_async,
    failure_status,
    off_loop,
    own_cancellation,
    response,
)

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

__all__ = [
    "MODELS",
    "Matches",
    "Progress",
    "QueryRequest",
    "Responses",
    "RetrieveRequest",
    "StatusError",
    "StoredFile",
    "Unavailable",
    "c_find",
    "c_get",
    "c_move",
    "close_handler",
    "decode_identifier",
    "model_uid",
    "scp_c_find",
]

#: Information models by short name and operation (PS3.4 C.6, K.6).
MODELS: dict[str, dict[str, str]] = {
    "patient": {
        "find": "1.2.840.10008.5.1.4.1.2.1.1",
        "move": "1.2.840.10008.5.1.4.1.2.1.2",
        "get": "1.2.840.10008.5.1.4.1.2.1.3",
    },
    "study": {
        "find": "1.2.840.10008.5.1.4.1.2.2.1",
        "move": "1.2.840.10008.5.1.4.1.2.2.2",
        "get": "1.2.840.10008.5.1.4.1.2.2.3",
    },
    "patient-study": {
        "find": "1.2.840.10008.5.1.4.1.2.3.1",
        "move": "1.2.840.10008.5.1.4.1.2.3.2",
        "get": "1.2.840.10008.5.1.4.1.2.3.3",
    },
    "worklist": {"find": "1.2.840.10008.5.1.4.31"},
}

PENDING = (Code.PENDING, Code.PENDING_WARNING)
T = TypeVar("T")


def model_uid(model: str, operation: str) -> str:
    """The SOP class UID of ``model`` (short name or UID) for ``operation``."""
    if model in MODELS:
        try:
            return MODELS[model][operation]
        except KeyError:
            raise ValueError(f"the {model} model has no {operation.upper()} SOP class") from None
    return model


@dataclass(frozen=True, slots=True)
class Unavailable:
    """What a C-GET / C-MOVE handler yields for a matching instance it cannot send (its
    file gone or changed): a failed sub-operation, the UID in the Failed SOP Instance
    UID List (PS3.4 C.4.2.3.1, C.4.3.3.1), ``reason`` logged; nothing is sent."""

    sop_instance_uid: str
    reason: str


@dataclass(frozen=True, slots=True)
class Matches:
    """What a C-GET / C-MOVE handler may yield first: how many items follow (the
    Number of Remaining Sub-operations of the first pending response, PS3.4 C.4.2.3.1,
    C.4.3.3.1) and, for a C-MOVE, the (SOP Class UID, Transfer Syntax UID) pairs among
    them (the contexts proposed to the destination). With it the items are sent as the
    handler yields them, never collected into a list first; without it (or, for a
    C-MOVE, without ``kinds``) they are collected, counted and inspected first."""

    count: int
    kinds: tuple[tuple[str, str], ...] | None = None


class StoredFile(str):
    """A file path a C-GET / C-MOVE handler yields, with the SOP Instance UID its index
    knows: a sub-operation that fails because the file went away still names the
    instance in the Failed SOP Instance UID List (PS3.4 C.4.2.3.1, C.4.3.3.1)."""

    __slots__ = ("sop_instance_uid",)
    sop_instance_uid: str

    def __new__(cls, path: str, sop_instance_uid: str = "") -> StoredFile:
        self = super().__new__(cls, path)
        self.sop_instance_uid = sop_instance_uid
        return self

    def __reduce__(self) -> tuple[type[StoredFile], tuple[str, str]]:  # pickled for a worker process
        return StoredFile, (str(self), self.sop_instance_uid)


@dataclass(slots=True)
class Progress:
    """Sub-operation counters of a C-GET / C-MOVE response (PS3.7 §9.3.3.2, §9.3.4.2).

    ``failed_instances``: the identifier's Failed SOP Instance UID List (PS3.4
    C.4.2.3.1, C.4.3.3.1); empty, with a warning logged once per operation, when the
    peer's identifier is malformed or past the limits (the counters are kept)."""

    status: Status
    remaining: int | None = None
    completed: int | None = None
    failed: int | None = None
    warning: int | None = None
    failed_instances: list[str] = field(default_factory=list)


class Responses(Generic[T]):
    """The results of one C-FIND / C-GET / C-MOVE: an async iterator and an async
    context manager; ``status`` holds the final status once the operation is over.

    Leave early the documented way, ``async with assoc.c_find(q) as responses:``, or
    with ``await responses.aclose()``: C-CANCEL goes out at once and the final
    response is awaited, so ``status`` is set (PS3.7 §9.3.2.3). A loop left with
    ``break`` over an iterator nobody else holds cancels as soon as it is dropped.

    A response naming another Affected SOP Class UID than ``request``'s (PS3.7
    §9.3.2.2, §9.3.3.2, §9.3.4.2: "U(=)") answers for another information model:
    :class:`~dimse_async.exceptions.DIMSEFailure` naming both, nothing of it handed on.
    """

    def __init__(
        self,
        stream: ResponseStream,
        convert: Callable[[Message], T | None],
        *,
        on_start: Callable[[], None] | None = None,
        on_end: Callable[[], None] | None = None,
        transfer_syntax: str = "",
        request: Command | None = None,
    ):
        self._stream = stream
        self._request = request
        #: The context's: a large or deflated identifier is converted in a worker thread.
        self._syntax = transfer_syntax
        self._iter: AsyncIterator[Message] | None = None
        self._convert = convert
        self._on_start, self._on_end = on_start, on_end
        self._ended = False
        #: The final status (``None`` until the operation is over).
        self.status: Status | None = None
        #: C-GET / C-MOVE: the final :class:`Progress`.
        self.result: Progress | None = None

    def __aiter__(self) -> Responses[T]:
        return self

    async def __anext__(self) -> T:
        while True:
            if self._iter is None:
                if self._on_start is not None:
                    self._on_start()
                self._iter = self._stream.__aiter__()
            try:
                msg = await self._iter.__anext__()
            except asyncio.CancelledError:
                raise  # not over: aclose (or leaving ``async with``) still sends C-CANCEL
            except BaseException:
                self._end()
                raise
            if (mismatch := self._foreign(msg)) is not None:
                if msg is self._stream.final:
                    self._end()
                raise DIMSEFailure(f"{msg.command.name} {mismatch}")
            if off_loop(msg.dataset, self._syntax):  # one peer's huge reply holds up no other association
                item = await asyncio.to_thread(self._convert, msg)
            else:
                item = self._convert(msg)
            if msg is self._stream.final:
                if isinstance(item, Progress):
                    self.result = item
                self._end()
            if item is not None:
                return item
            if self._ended:
                raise StopAsyncIteration

    def _foreign(self, msg: Message) -> str | None:
        """Why ``msg`` answers for another SOP class than the request's, or ``None``."""
        return None if self._request is None else affected_mismatch(self._request, msg.command)

    def _end(self) -> None:
        if self._ended:
            return
        self._ended = True
        final = self._stream.final
        if final is not None and self._foreign(final) is not None:
            # Over, but its status and counters are not this operation's.
            self.status = Status(Code.CANNOT_UNDERSTAND, "the final response names another SOP class")
        elif final is not None:
            cmd = final.command  # Offending Element (0000,0901), if any, in ``attributes``
            self.status = response_status(cmd.status, cmd.error_comment, cmd.offending_element)
            if self.result is None:  # left early (C-CANCEL): the final counters all the same
                item = self._convert(final)
                if isinstance(item, Progress):
                    self.result = item
        elif self.status is None:
            self.status = Status(Code.CANNOT_UNDERSTAND, "no final response: the association ended")
        if self._on_end is not None:
            self._on_end()

    async def aclose(self) -> None:
        """Stop: C-CANCEL if the operation is still running, then its final response."""
        if self._ended:
            return
        try:
            if self._iter is not None:
                await self._stream.aclose()
                final = self._stream.final
                # A large final's counters are taken in a worker thread, as __anext__ takes them.
                if final is not None and self.result is None and off_loop(final.dataset, self._syntax):
                    item = None if self._foreign(final) else await asyncio.to_thread(self._convert, final)
                    if isinstance(item, Progress):
                        self.result = item
        finally:
            if self._iter is None:
                self._ended = True
                self.status = Status(Code.CANCEL, "not started")
            self._end()

    async def __aenter__(self) -> Responses[T]:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


# ---------------------------------------------------------------------------
# SCU
# ---------------------------------------------------------------------------


def c_find(
    assoc: DIMSEProvider, query: Dataset, model: str = "study", *, priority: int = 0, timeout: float | None = None
) -> Responses[Dataset]:
    """C-FIND: yields each pending identifier as a ``Dataset``; ``status`` at the end.

    Each identifier is walked to its end first (as received ones are by the SCP): a
    malformed one raises :class:`~dimse_async.exceptions.DIMSEFailure` naming the
    fault; inside ``async with`` the rest is then cancelled (PS3.7 §9.3.2.3). So does
    a Pending response without an identifier: a pending C-FIND-RSP carries the match
    (PS3.7 §9.1.2.1, PS3.4 C.4.1.1.3.2; it was skipped, a match lost unsaid). A
    final response's data set (none belongs there) is ignored with a warning."""
    sop_class = model_uid(model, "find")
    ctx = assoc.context_for(sop_class)
    cmd = Command(CommandField.C_FIND_RQ, affected_sop_class_uid=sop_class, priority=priority)
    stream = assoc.request_stream(ctx, cmd, encode_dataset(query, ctx.transfer_syntax), timeout)

    pending = 0
    warned: Message | None = None

    def convert(msg: Message) -> Dataset | None:
        nonlocal pending, warned
        if msg.command.status in PENDING:
            pending += 1
            if msg.dataset is None:
                assoc.log.warning("C-FIND pending response without an identifier", response=pending)
                raise DIMSEFailure(f"C-FIND response {pending}: pending without an identifier (PS3.7 9.1.2.1)")
            try:
                return decode_received(msg.dataset, ctx.transfer_syntax)
            except TooManyItems as exc:
                assoc.log.warning("C-FIND response identifier refused", error=str(exc))
                raise DIMSEFailure(
                    f"C-FIND response {pending}: identifier refused: {exc} (MAX_IDENTIFIER_ITEMS)"
                ) from exc
            except Exception as exc:  # not handed on: pydicom would fail later, or never
                raise DIMSEFailure(f"C-FIND response {pending}: identifier malformed: {exc}") from exc
        if msg.dataset is not None and msg is not warned:  # (once: the final may be converted again)
            warned = msg
            status = msg.command.status
            assoc.log.warning("C-FIND final response carries a data set; ignored", status=f"0x{status or 0:04X}")
        return None

    return Responses(stream, convert, transfer_syntax=ctx.transfer_syntax, request=cmd)


#: Failed SOP Instance UIDs a C-GET / C-MOVE response's identifier may list (PS3.4
#: C.4.2.3.1, C.4.3.3.1): about 100 bytes each as Python strings. A longer list (one
#: 64 MiB value split into millions of UIDs) is dropped, the counters kept.
MAX_FAILED_UIDS = 100_000
_FAILED_LIST = 0x00080058


def _failed_uids(data: bytes, syntax: str) -> list[str]:
    """The Failed SOP Instance UID List of a received C-GET / C-MOVE identifier, walked
    to its end first as every received data set is (:func:`.scp.decode_received`);
    :class:`~dimse_async.dataset_check.DataSetError` (a ``ValueError``) naming the fault."""
    ident = decode_received(data, syntax)
    if _FAILED_LIST not in ident:
        return []
    raw = getattr(ident.get_item(_FAILED_LIST), "value", None)  # counted before pydicom splits it
    if isinstance(raw, bytes) and raw.count(b"\\") >= MAX_FAILED_UIDS:
        raise ValueError(f"more than {MAX_FAILED_UIDS} UIDs in the Failed SOP Instance UID List (MAX_FAILED_UIDS)")
    value = ident[_FAILED_LIST].value
    if not value:
        return []
    return [str(value)] if isinstance(value, str) else [str(v) for v in value]


def _progress(msg: Message, ctx: PresentationContext, refused: Callable[[Message, Exception], None]) -> Progress:
    """The :class:`Progress` a C-GET / C-MOVE response reports. Its identifier (the
    Failed SOP Instance UID List) is walked and bounded as C-FIND matches are: a
    malformed one, one past :data:`.scp.MAX_IDENTIFIER_ITEMS` sequence items or
    :data:`MAX_FAILED_UIDS` UIDs leaves ``failed_instances`` empty and calls
    ``refused`` (a warning log line); the status and counters, which say what
    happened, are kept (PS3.7 §9.3.3.2, §9.3.4.2)."""
    cmd = msg.command
    failed_list: list[str] = []
    if msg.dataset:
        try:
            failed_list = _failed_uids(msg.dataset, ctx.transfer_syntax)
        except Exception as exc:  # the counters still say what happened
            refused(msg, exc)
    status = response_status(cmd.status, cmd.error_comment, cmd.offending_element)
    return Progress(status, cmd.remaining, cmd.completed, cmd.failed, cmd.warning, failed_list)


def _retrieve(
    assoc: DIMSEProvider,
    op: CommandField,
    query: Dataset,
    model: str,
    priority: int,
    destination: str | None,
    store: StoreHandler | None = None,
    timeout: float | None = None,
) -> Responses[Progress]:
    sop_class = model_uid(model, "get" if op == CommandField.C_GET_RQ else "move")
    ctx = assoc.context_for(sop_class)
    cmd = Command(op, affected_sop_class_uid=sop_class, priority=priority, move_destination=destination)
    stream = assoc.request_stream(ctx, cmd, encode_dataset(query, ctx.transfer_syntax), timeout)

    responses = refusals = 0

    def refused(msg: Message, exc: Exception) -> None:
        nonlocal refusals
        refusals += 1
        if refusals == 1:  # once per operation: a peer cannot flood the log with them
            assoc.log.warning(
                f"{msg.command.name} identifier refused: its Failed SOP Instance UID List is dropped",
                response=responses,
                error=str(exc)[:200],
            )

    def convert(msg: Message) -> Progress:
        nonlocal responses
        responses += 1
        return _progress(msg, ctx, refused)

    previous: list[StoreHandler | None] = []

    def start() -> None:
        previous.append(assoc.store_handler)
        assoc.store_handler = store

    def end() -> None:
        assoc.store_handler = previous[0]

    if store is None:
        return Responses(stream, convert, transfer_syntax=ctx.transfer_syntax, request=cmd)
    return Responses(stream, convert, on_start=start, on_end=end, transfer_syntax=ctx.transfer_syntax, request=cmd)


def c_get(
    assoc: DIMSEProvider,
    query: Dataset,
    model: str = "study",
    *,
    priority: int = 0,
    store: StoreHandler | None = None,
    timeout: float | None = None,
) -> Responses[Progress]:
    """C-GET: yields :class:`Progress`; the instances arrive as C-STORE sub-operations on
    this association (we must have the SCP role for their storage classes) and go to
    ``store`` if given, else to the AE's C-STORE handler."""
    return _retrieve(assoc, CommandField.C_GET_RQ, query, model, priority, None, store, timeout)


def c_move(
    assoc: DIMSEProvider,
    query: Dataset,
    destination: str,
    model: str = "study",
    *,
    priority: int = 0,
    timeout: float | None = None,
) -> Responses[Progress]:
    """C-MOVE to ``destination`` (an AE title the peer knows): yields :class:`Progress`."""
    return _retrieve(assoc, CommandField.C_MOVE_RQ, query, model, priority, destination, timeout=timeout)


# ---------------------------------------------------------------------------
# SCP
# ---------------------------------------------------------------------------


class QueryRequest(Request):
    """A C-FIND / C-GET / C-MOVE request as seen by its handler."""

    __slots__ = ("cancel_seen", "identifier", "operation")

    def __init__(self, assoc: DIMSEProvider, operation: Operation, identifier: Dataset):
        super().__init__(assoc, operation.message)
        self.operation = operation
        self.identifier = identifier
        #: The handler read :attr:`cancelled` as true (or called :meth:`cancel`): if it
        #: ends now, it may have stopped early, so the final status is Cancel.
        self.cancel_seen = False

    @property
    def model(self) -> str:
        """The information model's SOP class UID."""
        return self.command.affected_sop_class_uid or ""

    @property
    def level(self) -> str:
        return str(self.identifier.get("QueryRetrieveLevel", ""))

    @property
    def cancelled(self) -> bool:
        """Whether the peer sent C-CANCEL for this request."""
        if self.operation.cancelled:
            self.cancel_seen = True
        return self.operation.cancelled

    def cancel(self) -> None:
        self.operation.cancelled = self.cancel_seen = True


class RetrieveRequest(QueryRequest):
    __slots__ = ()

    @property
    def move_destination(self) -> str | None:
        return self.command.move_destination


#: A C-FIND / C-GET / C-MOVE handler: an async generator over the request.
QueryHandler = Callable[[Any], Any]


async def decode_request(assoc: DIMSEProvider, op: Operation, cls: type[QueryRequest]) -> QueryRequest | Status:
    """The request with its identifier, or the failure status to answer: 0xA900 for an
    identifier that cannot be decoded, 0xC000 for keys in a character set we do not
    know (:func:`charset_refusal`), and 0xA900 for a request without an identifier
    (Data Set Type 0101H: the Identifier of a C-FIND, C-GET or C-MOVE request is
    mandatory, PS3.7 §9.1.2.1, §9.1.3.1, §9.1.4.1; a worklist C-FIND answered every item)."""
    if op.message.dataset is None:
        assoc.log.warning("identifier refused", command=op.command.name, error="no identifier")
        return Status(Code.DATASET_DOES_NOT_MATCH_SOP_CLASS, "Identifier missing")
    data, syntax = op.message.dataset, op.context.transfer_syntax
    try:
        identifier = await decode_received_async(data, syntax)
    except InflationLimit as exc:
        assoc.log.warning("identifier refused", command=op.command.name, error=str(exc))
        return Status(Code.DATASET_DOES_NOT_MATCH_SOP_CLASS, "Identifier refused: inflates past the limit")
    except TooManyItems as exc:
        assoc.log.warning("identifier refused", command=op.command.name, error=str(exc))
        return Status(Code.DATASET_DOES_NOT_MATCH_SOP_CLASS, f"Identifier refused: {exc}")
    except Exception as exc:
        assoc.log.warning("cannot decode identifier", command=op.command.name, error=repr(exc))
        return Status(Code.DATASET_DOES_NOT_MATCH_SOP_CLASS, "Identifier does not match SOP class")
    refusal = charset_refusal(identifier)
    if refusal is not None:
        assoc.log.warning("identifier refused", command=op.command.name, error=refusal.error_comment)
        return refusal
    return cls(assoc, op, identifier)


_SPECIFIC_CHARACTER_SET = 0x00080005
#: VRs whose values are characters (PS3.5 §6.2), and UN (bytes of anything).
_TEXT_VRS = frozenset(
    ["AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UN", "UR", "UT"]
)


def charset_refusal(identifier: Dataset) -> Status | None:
    """An identifier whose Specific Character Set names a repertoire we do not know
    (PS3.3 C.12.1.1.2; an empty first value is the default one, PS3.5 §6.1.2.5.3):
    PS3.4 C.2.2.2 leaves matching then to the SCP. Keys in the default repertoire
    alone (ASCII, no escape sequence) are matched as such: the unknown term is removed
    from ``identifier``, so they are read without it. A key with any other byte
    cannot be read as the peer meant it, and matching it as Latin-1 (pydicom's
    fallback) would answer Success with wrong matches or none: 0xC000 Unable to
    process, with (0008,0005) and that key as Offending Element (PS3.4 C.4.1.1.4,
    C.4.2.1.5, C.4.3.1.4). ``None``: nothing to refuse."""
    from pydicom.charset import python_encoding

    elem = identifier.get_item(_SPECIFIC_CHARACTER_SET)
    if elem is None:
        return None
    value = elem.value
    if isinstance(value, bytes | bytearray):
        terms = bytes(value).decode("latin-1").split("\\")
    elif isinstance(value, str):
        terms = value.split("\\")
    elif value is None:
        return None
    else:
        terms = [str(v) for v in value]
    for i, term in enumerate(t.strip(" \x00") for t in terms):
        if term not in python_encoding or (not term and i):
            break
    else:
        return None
    offending = _non_default_text(identifier)
    if offending is None:
        del identifier[_SPECIFIC_CHARACTER_SET]  # every key in the default repertoire
        return None
    comment = f"Specific Character Set {term!r} not supported"[:64]
    return Status(Code.CANNOT_UNDERSTAND, comment, attributes=[_SPECIFIC_CHARACTER_SET, offending])


def _non_default_text(ds: Dataset) -> int | None:
    """The first text element of ``ds`` (items included) with a byte outside the
    default repertoire (not ASCII, or ESC), as received; ``None`` when there is none."""
    from pydicom.datadict import dictionary_VR

    for tag in list(ds.keys()):
        if tag == _SPECIFIC_CHARACTER_SET:
            continue
        raw = ds.get_item(tag)
        vr = raw.VR if raw is not None else None
        if not vr:
            try:
                vr = dictionary_VR(tag)
            except KeyError:
                vr = "UN"
        if vr == "SQ":
            for item in ds[tag].value or ():
                found = _non_default_text(item)
                if found is not None:
                    return found
            continue
        if vr not in _TEXT_VRS or raw is None:
            continue
        value = raw.value
        if isinstance(value, str):
            value = value.encode("utf-8")
        if isinstance(value, bytes | bytearray) and (not value.isascii() or b"\x1b" in value):
            return int(tag)
    return None


async def respond(
    assoc: DIMSEProvider,
    op: Operation,
    status: Status,
    identifier: Dataset | None = None,
    counters: tuple[int | None, int, int, int] | None = None,
) -> None:
    """Send one C-FIND / C-GET / C-MOVE response; ``counters`` are the sub-operation
    counts (remaining, completed, failed, warning; PS3.7 §9.3.3.2, §9.3.4.2)."""
    rsp = response(op.command, status)
    if counters is not None:
        rsp.remaining, rsp.completed, rsp.failed, rsp.warning = counters
    payload = None
    if identifier is not None:
        try:
            payload = encode_dataset(identifier, op.context.transfer_syntax)
        except Exception as exc:  # (pydicom raises OSError for a value it cannot write: no lack of resources)
            raise ValueError(f"identifier cannot be encoded: {brief_error(exc)}") from exc
    await assoc.send(op.context.id, rsp, payload)


def unsupported(op: Operation) -> Status:
    """0x0122 for an operation no handler serves."""
    return Status(Code.SOP_CLASS_NOT_SUPPORTED, f"{op.command.name[:-3]} not supported")


async def scp_c_find(assoc: DIMSEProvider, op: Operation, handler: QueryHandler | None = None) -> None:
    """Run the C-FIND handler: a pending response per yielded identifier (PS3.4 C.4.1)."""
    request = await decode_request(assoc, op, QueryRequest)
    if isinstance(request, Status) or handler is None:
        await respond(assoc, op, request if isinstance(request, Status) else unsupported(op))
        return
    try:
        status = await _find_responses(assoc, op, request, handler(request))
    except AssociationError:
        raise
    except asyncio.CancelledError as exc:
        if own_cancellation():
            raise
        status = failure_status(CommandField.C_FIND_RQ, exc, assoc)
    except Exception as exc:
        status = failure_status(CommandField.C_FIND_RQ, exc, assoc)
    await respond(assoc, op, status)


async def _find_responses(assoc: DIMSEProvider, op: Operation, request: QueryRequest, agen: Any) -> Status:
    """Send a pending response per match; after a C-CANCEL stop at the next match.

    Cancel (0xFE00, "matching terminated due to cancel", PS3.4 C.4.1.1.4) only when
    matching was cut short: a match was left unsent, or the handler ended after it saw
    ``request.cancelled``. A C-CANCEL read after the last match went out changes
    nothing: every match was sent, the final status is Success (PS3.7 §9.3.2.3).

    A match is a ``Dataset``, or ``(0xFF00 or 0xFF01, Dataset)``: anything else (no
    identifier, a final status such as Success, which would end the operation at the
    peer before its final response) is the handler's failure (``ValueError``)."""
    from pydicom.dataset import Dataset  # (loaded already: the request's identifier was decoded)

    try:
        async for item in agen:
            if op.cancelled:
                return Status(Code.CANCEL)  # this match is left unsent
            code, ident = item if isinstance(item, tuple) and len(item) == 2 else (Code.PENDING, item)
            if code not in PENDING_CODES or not isinstance(ident, Dataset):
                raise ValueError(f"a match must be a Dataset or (0xFF00 or 0xFF01, Dataset), not {_brief(item)}")
            await respond(assoc, op, Status(code), ident)
            await asyncio.sleep(0)  # let the loop read a C-CANCEL that may have arrived
    finally:
        await close_handler(agen)
    return Status(Code.CANCEL if request.cancel_seen else Code.SUCCESS)


def _brief(item: object) -> str:
    if isinstance(item, tuple):
        return "(" + ", ".join(f"0x{v:04X}" if isinstance(v, int) else type(v).__name__ for v in item) + ")"
    return type(item).__name__


async def close_handler(agen: Any) -> None:
    """Close what a Q/R handler returned: its async generator; a coroutine (an ``async
    def`` without ``yield``) is closed unawaited; anything else is left alone."""
    aclose = getattr(agen, "aclose", None)
    if aclose is not None:
        await aclose()
    elif asyncio.iscoroutine(agen):
        agen.close()
