"""Storage Commitment Push Model (PS3.4 Annex J), SCU and SCP building blocks.

SCU: :func:`request_commitment` sends the N-ACTION (Request Storage Commitment,
Action Type ID 1, J.3.2) and resolves when the N-EVENT-REPORT with the result arrives
(J.3.3) - on the same association while we hold it open, or on a new association the
SCP opens back to our AE (which must then listen, accepting the Storage Commitment
Push Model class with ``scp_role=True`` so the peer may take the SCP role; a peer that
proposes no role selection for it, as many archives do although PS3.4 J.2.1 asks for
it, is taken too, with a warning naming it). Reports
are matched by Transaction UID in the AE's :class:`CommitmentTracker`; the pending
transaction survives the requesting association's release. A report arriving after
the caller gave up (timed out or cancelled) is acknowledged, logged and kept in
``tracker.late``. Each report is held to the references requested (:func:`reconcile`):
one it leaves out counts as failed, never as committed.

SCP: :func:`commitment_request` parses an N-ACTION; :func:`send_report` delivers the
result on a given association, or on a new one with retries (used by ``serve``).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import field
from typing import TYPE_CHECKING, Any

from ..acse import ContextSpec
from ..exceptions import AssociationError, DIMSEFailure
from ..lazy_dataclass import dataclass
from ..log import get_logger
from ..part10 import plausible_uid
from ..ratelimit import WarningLimiter
from ..status import Status
from ..uids import DEFAULT_TRANSFER_SYNTAXES, StorageCommitmentPushModel
from .normalized import NCode, NRequest

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

__all__ = [
    "STORAGE_COMMITMENT",
    "STORAGE_COMMITMENT_INSTANCE",
    "CommitmentFailed",
    "CommitmentResult",
    "CommitmentTimeout",
    "CommitmentTracker",
    "FailureReason",
    "commitment_request",
    "reconcile",
    "references_from_files",
    "report_dataset",
    "request_commitment",
    "request_commitment_on",
    "send_report",
]

#: Storage Commitment Push Model SOP Class and its well-known instance (PS3.4 J.3, PS3.6 A).
STORAGE_COMMITMENT = StorageCommitmentPushModel
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"
ACTION_REQUEST = 1  # Request Storage Commitment (J.3.2.1.1)
EVENT_SUCCESS = 1  # Storage Commitment Request Successful (J.3.3.1.1)
EVENT_FAILURES = 2  # Storage Commitment Request Complete - Failures Exist


class FailureReason:
    """Failure Reason (0008,1197) values (PS3.4 J.3.3.1.1.1 / C.14.1.1)."""

    PROCESSING_FAILURE = 0x0110
    NO_SUCH_OBJECT_INSTANCE = 0x0112
    RESOURCE_LIMITATION = 0x0213
    REFERENCED_SOP_CLASS_NOT_SUPPORTED = 0x0122
    CLASS_INSTANCE_CONFLICT = 0x0119
    DUPLICATE_TRANSACTION_UID = 0x0131


Reference = tuple[str, str]  # (SOP Class UID, SOP Instance UID)


@dataclass(slots=True)
class CommitmentResult:
    """The outcome of one transaction: what the SCP committed and what it did not (with reasons)."""

    transaction_uid: str
    committed: list[Reference] = field(default_factory=list)
    failed: list[tuple[str, str, int]] = field(default_factory=list)  # class, instance, reason
    retrieve_ae: str | None = None
    #: The report came on the requesting association (else on one the SCP opened).
    same_association: bool = False
    calling_ae: str = ""

    @property
    def success(self) -> bool:
        return not self.failed

    def as_dict(self) -> dict[str, Any]:
        return {
            "transaction_uid": self.transaction_uid,
            "success": self.success,
            "committed": [{"sop_class": c, "sop_instance": i} for c, i in self.committed],
            "failed": [{"sop_class": c, "sop_instance": i, "reason": f"0x{r:04X}"} for c, i, r in self.failed],
            "retrieve_ae": self.retrieve_ae,
            "same_association": self.same_association,
            "reported_by": self.calling_ae,
        }


class CommitmentTimeout(AssociationError):
    """No N-EVENT-REPORT for the transaction within the timeout (it is remembered as late)."""

    def __init__(self, transaction_uid: str, timeout: float):
        self.transaction_uid = transaction_uid
        super().__init__(f"no storage commitment report for {transaction_uid} within {timeout} s")


class CommitmentFailed(DIMSEFailure):
    """The SCP refused the N-ACTION (its status says why)."""

    def __init__(self, status: Status, transaction_uid: str):
        self.status = status
        self.transaction_uid = transaction_uid
        super().__init__(f"storage commitment request refused: {status!r}")


def _references(seq: Any) -> list[Reference]:
    return [(str(item.get("ReferencedSOPClassUID", "")), str(item.get("ReferencedSOPInstanceUID", ""))) for item in seq]


# Named in Attribute Identifier List (0000,1005) of a 0x0120 / 0x0121 response (PS3.7 Annex C).
_TRANSACTION_UID = 0x00081195
_REFERENCED_SOP_SEQUENCE = 0x00081199


def parse_report(request: NRequest) -> CommitmentResult | Status:
    """The result an N-EVENT-REPORT carries (J.3.3.1.1), or the status refusing it."""
    if request.event_type_id not in (EVENT_SUCCESS, EVENT_FAILURES):
        return Status(NCode.NO_SUCH_EVENT_TYPE, f"no event type {request.event_type_id} in storage commitment")
    ds = request.dataset
    if ds is None or not ds.get("TransactionUID"):
        return Status(NCode.MISSING_ATTRIBUTE, "no Transaction UID in the event information", [_TRANSACTION_UID])
    try:
        committed = _references(ds.get("ReferencedSOPSequence") or [])
        failed = [
            (
                str(i.get("ReferencedSOPClassUID", "")),
                str(i.get("ReferencedSOPInstanceUID", "")),
                int(i.get("FailureReason", 0x0110)),
            )
            for i in ds.get("FailedSOPSequence") or []
        ]
    except (TypeError, ValueError, AttributeError):
        return Status(NCode.INVALID_ARGUMENT_VALUE, "malformed referenced or failed SOP sequence")
    return CommitmentResult(
        str(ds.TransactionUID),
        committed,
        failed,
        str(ds.get("RetrieveAETitle") or "") or None,
        calling_ae=request.calling_ae,
    )


class CommitmentTracker:
    """The AE's pending storage commitment transactions, by Transaction UID.

    Registered as the AE's N-EVENT-REPORT handler for the commitment class. ``late``
    keeps the last ``keep_late`` reports that came after their requester stopped
    waiting; ``on_late`` (if set) is called with each. Reports refused (malformed, or
    for a transaction never requested) are logged a few per peer AE title and minute,
    the rest counted in a summary line: a peer flooding them floods no log.
    """

    def __init__(self, keep_late: int = 256):
        self.pending: dict[str, tuple[asyncio.Future[CommitmentResult], int]] = {}
        #: The references each transaction asked for (pending or expired), to hold its report to.
        self._asked: dict[str, list[Reference]] = {}
        self._expired: OrderedDict[str, float] = OrderedDict()
        self.late: OrderedDict[str, CommitmentResult] = OrderedDict()
        self.keep_late = keep_late
        self.on_late: Callable[[CommitmentResult], Any] | None = None
        self.log = get_logger("commitment")
        self._warnings = WarningLimiter(self._suppressed, interval=60.0, burst=5)

    def _suppressed(self, kind: str, peer_ae: str, count: int, seconds: float) -> None:
        self.log.warning(f"{kind}: {count} similar suppressed", peer_ae=peer_ae, seconds=round(seconds))

    def expect(
        self, transaction_uid: str, association_id: int, references: Iterable[Reference] | None = None
    ) -> asyncio.Future[CommitmentResult]:
        """Wait for the report of ``transaction_uid``; with ``references`` (those
        requested) the report is held to them (:func:`reconcile`)."""
        fut: asyncio.Future[CommitmentResult] = asyncio.get_running_loop().create_future()
        self.pending[transaction_uid] = (fut, association_id)
        if references is not None:
            self._asked[transaction_uid] = list(references)
        return fut

    def expire(self, transaction_uid: str) -> None:
        """Stop waiting: a report that still comes is acknowledged and kept as late."""
        self.pending.pop(transaction_uid, None)
        self._expired[transaction_uid] = time.time()
        while len(self._expired) > 4 * self.keep_late:
            self._asked.pop(self._expired.popitem(last=False)[0], None)

    def forget(self, transaction_uid: str) -> None:
        self.pending.pop(transaction_uid, None)
        self._asked.pop(transaction_uid, None)

    def _reconciled(self, result: CommitmentResult, peer_ae: str) -> CommitmentResult:
        asked = self._asked.pop(result.transaction_uid, None)
        if asked is None:
            return result
        problems = reconcile(result, asked)
        if problems and self._warnings.allow("storage commitment report inconsistent", peer_ae):
            self.log.warning(
                "storage commitment report inconsistent with the request",
                transaction_uid=result.transaction_uid,
                peer_ae=peer_ae,
                **problems,
            )
        return result

    async def on_report(self, request: NRequest) -> Any:
        """N-EVENT-REPORT handler (J.3.3): match the Transaction UID, wake the requester."""
        if request.sop_instance_uid != STORAGE_COMMITMENT_INSTANCE:
            return Status(NCode.NO_SUCH_SOP_INSTANCE, "not the storage commitment well-known instance")
        result = parse_report(request)
        if isinstance(result, Status):
            if self._warnings.allow("storage commitment report refused", request.calling_ae):
                self.log.warning("storage commitment report refused", status=repr(result), peer_ae=request.calling_ae)
            return result
        uid = result.transaction_uid
        entry = self.pending.pop(uid, None)
        if entry is not None or uid in self._expired:
            result = self._reconciled(result, request.calling_ae)
        if entry is not None:
            fut, assoc_id = entry
            result.same_association = assoc_id == id(request.assoc)
            if not fut.done():
                fut.set_result(result)
            return None
        if uid in self._expired:
            del self._expired[uid]
            self.late[uid] = result
            while len(self.late) > self.keep_late:
                self.late.popitem(last=False)
            self.log.warning(
                "late storage commitment report",
                transaction_uid=uid,
                committed=len(result.committed),
                failed=len(result.failed),
                peer_ae=request.calling_ae,
            )
            if self.on_late is not None:
                self.on_late(result)
            return None
        if self._warnings.allow("storage commitment report for an unknown transaction", request.calling_ae):
            self.log.warning(
                "storage commitment report for an unknown transaction", transaction_uid=uid, peer_ae=request.calling_ae
            )
        return Status(NCode.PROCESSING_FAILURE, f"no pending transaction {uid}"[:64])


def reconcile(result: CommitmentResult, asked: Iterable[Reference]) -> dict[str, int]:
    """Hold a report to the references requested (PS3.4 J.3.3: each of them is in the
    report, committed or failed): a reference the report leaves out fails with 0x0110
    (processing failure), one reported both committed and failed is failed, one never
    requested is dropped. ``result`` is changed in place; returns the count of each
    kind of inconsistency found (``{}``: none)."""
    wanted = dict.fromkeys(asked)
    failed_refs = {(c, i) for c, i, _r in result.failed}
    committed = [ref for ref in result.committed if ref in wanted and ref not in failed_refs]
    failed = [(c, i, r) for c, i, r in result.failed if (c, i) in wanted]
    reported = set(committed) | failed_refs
    missing = [ref for ref in wanted if ref not in reported]
    problems = {
        "omitted": len(missing),
        "committed_and_failed": len(set(result.committed) & failed_refs),
        "not_requested": len({*result.committed, *failed_refs} - set(wanted)),
    }
    result.committed = committed
    result.failed = failed + [(c, i, FailureReason.PROCESSING_FAILURE) for c, i in missing]
    return {kind: count for kind, count in problems.items() if count}


def request_dataset(transaction_uid: str, references: Iterable[Reference]) -> Dataset:
    """The N-ACTION information (J.3.2.1.1): Transaction UID and Referenced SOP Sequence."""
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.TransactionUID = transaction_uid
    items = []
    for sop_class, sop_instance in references:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        items.append(item)
    ds.ReferencedSOPSequence = items
    return ds


def references_from_files(paths: Iterable[str]) -> list[tuple[str, Reference]]:
    """(path, (SOP class, SOP instance)) of Part 10 files, read from their headers."""
    import pydicom

    out = []
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"])
        meta = getattr(ds, "file_meta", None)
        sop_class = ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta else None)
        sop_instance = ds.get("SOPInstanceUID") or (meta.get("MediaStorageSOPInstanceUID") if meta else None)
        if not sop_class or not sop_instance:
            raise ValueError(f"{path}: no SOP Class / SOP Instance UID")
        out.append((path, (str(sop_class), str(sop_instance))))
    return out


def tracker_of(ae: Any) -> CommitmentTracker:
    """The AE's tracker, created and registered as its commitment N-EVENT-REPORT handler on first use."""
    tracker = getattr(ae, "commitments", None)
    if tracker is None:
        tracker = ae.commitments = CommitmentTracker()
    if not ae.has_n_handler(0x0100, STORAGE_COMMITMENT):  # a catch-all handler does not count
        ae.on_n_event_report(tracker.on_report, sop_class=STORAGE_COMMITMENT)
    return tracker


async def request_commitment_on(
    assoc: Any, references: Iterable[Reference], *, timeout: float = 60.0, transaction_uid: str | None = None
) -> CommitmentResult:
    """Request commitment on an open association and wait up to ``timeout`` s for the
    report (on it or on a new one); raises :class:`CommitmentTimeout` or :class:`CommitmentFailed`."""
    from pydicom.uid import generate_uid

    tracker = tracker_of(assoc.ae)
    uid = transaction_uid or generate_uid()
    references = list(references)
    fut = tracker.expect(uid, id(assoc), references)
    try:
        rsp = await assoc.n_action(
            STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE, ACTION_REQUEST, request_dataset(uid, references)
        )
    except BaseException:
        tracker.forget(uid)
        raise
    if not rsp.status.is_success and rsp.status.is_failure:
        tracker.forget(uid)
        raise CommitmentFailed(rsp.status, uid)
    try:
        return await asyncio.wait_for(asyncio.shield(fut), timeout)
    except TimeoutError:
        tracker.expire(uid)
        raise CommitmentTimeout(uid, timeout) from None
    except asyncio.CancelledError:
        tracker.expire(uid)  # nobody waits now: a report that comes is kept as late
        raise


async def request_commitment(
    ae: Any,
    host: str,
    port: int,
    called_ae: str,
    references: Iterable[Reference],
    *,
    timeout: float = 60.0,
    hold: float = 5.0,
    transaction_uid: str | None = None,
    **associate_kwargs: Any,
) -> CommitmentResult:
    """Associate, send the commitment request, keep the association up to ``hold`` s for
    a report on it, release, and wait for the report (on a new association the SCP
    opens to ``ae``) until ``timeout`` s after the request. Raises
    :class:`CommitmentTimeout` (the transaction is then remembered as late) or
    :class:`CommitmentFailed`; connection errors as :meth:`AE.associate`."""
    from pydicom.uid import generate_uid

    tracker = tracker_of(ae)
    refs = list(references)
    uid = transaction_uid or generate_uid()
    contexts = [ContextSpec(STORAGE_COMMITMENT, list(DEFAULT_TRANSFER_SYNTAXES))]
    loop = asyncio.get_running_loop()
    start = loop.time()
    async with ae.associate(host, port, called_ae, contexts=contexts, **associate_kwargs) as assoc:
        fut = tracker.expect(uid, id(assoc), refs)
        try:
            rsp = await assoc.n_action(
                STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE, ACTION_REQUEST, request_dataset(uid, refs)
            )
        except BaseException:
            tracker.forget(uid)
            raise
        if rsp.status.is_failure:
            tracker.forget(uid)
            raise CommitmentFailed(rsp.status, uid)
        try:
            await asyncio.wait([fut], timeout=max(0.0, min(hold, timeout - (loop.time() - start))))
        except asyncio.CancelledError:
            tracker.expire(uid)
            raise
        # Released here; the transaction stays pending for a report on a new association.
    try:
        return await asyncio.wait_for(asyncio.shield(fut), max(0.0, timeout - (loop.time() - start)))
    except TimeoutError:
        tracker.expire(uid)
        raise CommitmentTimeout(uid, timeout) from None
    except asyncio.CancelledError:
        tracker.expire(uid)  # nobody waits now: a report that comes is kept as late
        raise


# ---------------------------------------------------------------------------
# SCP
# ---------------------------------------------------------------------------


@dataclass(slots=True)
class CommitmentRequest:
    """A received N-ACTION Request Storage Commitment (J.3.2.1.1)."""

    transaction_uid: str
    references: list[Reference]
    storage_media_file_set_uid: str | None = None


def commitment_request(request: NRequest) -> CommitmentRequest | Status:
    """Parse an N-ACTION for the commitment class, or the status refusing it (J.3.2.1.2)."""
    from pydicom.dataset import Dataset

    if request.action_type_id != ACTION_REQUEST:
        return Status(NCode.NO_SUCH_ACTION_TYPE, f"no action type {request.action_type_id} in storage commitment")
    if request.sop_instance_uid != STORAGE_COMMITMENT_INSTANCE:
        return Status(NCode.NO_SUCH_SOP_INSTANCE, "not the storage commitment well-known instance")
    ds = request.dataset
    # Table J.3-1: both are 1/1. Absent: 0x0120; present without a value: 0x0121 (PS3.4 §5.4.2.1).
    if ds is None or "TransactionUID" not in ds:
        return Status(NCode.MISSING_ATTRIBUTE, "no Transaction UID (0008,1195)", [_TRANSACTION_UID])
    if not ds.TransactionUID:
        return Status(NCode.MISSING_ATTRIBUTE_VALUE, "Transaction UID (0008,1195) is empty", [_TRANSACTION_UID])
    transaction_uid = ds.TransactionUID
    if not isinstance(transaction_uid, str) or not plausible_uid(transaction_uid):
        # PS3.7 §10.1.4.1.10: 0x0115 Invalid Argument Value; the report would carry it back.
        return Status(NCode.INVALID_ARGUMENT_VALUE, "Transaction UID (0008,1195) is not a UID")
    if "ReferencedSOPSequence" not in ds:
        return Status(NCode.MISSING_ATTRIBUTE, "no Referenced SOP Sequence (0008,1199)", [_REFERENCED_SOP_SEQUENCE])
    seq = ds.ReferencedSOPSequence
    if not seq:
        comment = "Referenced SOP Sequence (0008,1199) is empty"
        return Status(NCode.MISSING_ATTRIBUTE_VALUE, comment, [_REFERENCED_SOP_SEQUENCE])
    if ds["ReferencedSOPSequence"].VR != "SQ" or not all(isinstance(item, Dataset) for item in seq):
        return Status(NCode.INVALID_ARGUMENT_VALUE, "Referenced SOP Sequence (0008,1199) is not a sequence")
    if any(
        not isinstance(item.get(keyword) or "", str)
        for item in seq
        for keyword in ("ReferencedSOPClassUID", "ReferencedSOPInstanceUID")
    ):  # several values, a number, a sequence: not one UID to commit or report
        return Status(NCode.INVALID_ARGUMENT_VALUE, "a reference's SOP class or instance is not one UID")
    refs = _references(seq)
    if any(not c or not i for c, i in refs):
        return Status(NCode.MISSING_ATTRIBUTE_VALUE, "a reference without SOP class or instance UID")
    bad = next((n for n, (c, i) in enumerate(refs, 1) if not (plausible_uid(c) and plausible_uid(i))), None)
    if bad is not None:
        # The report would carry it back as it came (letters, 65+ characters): 0x0115
        # Invalid Argument Value, as for the Transaction UID (PS3.7 §10.1.4.1.10).
        return Status(NCode.INVALID_ARGUMENT_VALUE, f"reference {bad}: its SOP class or instance UID is not a UID")
    return CommitmentRequest(str(transaction_uid), refs, str(ds.get("StorageMediaFileSetUID") or "") or None)


def report_dataset(result: CommitmentResult) -> tuple[int, Dataset]:
    """Event Type ID and Event Information of the report (J.3.3.1.1)."""
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.TransactionUID = result.transaction_uid
    if result.retrieve_ae:
        ds.RetrieveAETitle = result.retrieve_ae
    if result.committed:
        ds.ReferencedSOPSequence = [_item(sop_class, sop_instance) for sop_class, sop_instance in result.committed]
    if result.failed:
        items = []
        for sop_class, sop_instance, reason in result.failed:
            item = _item(sop_class, sop_instance)
            item.FailureReason = reason
            items.append(item)
        ds.FailedSOPSequence = items
    return (EVENT_FAILURES if result.failed else EVENT_SUCCESS), ds


def _item(sop_class: str, sop_instance: str) -> Dataset:
    from pydicom.dataset import Dataset

    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    return item


async def send_report(
    ae: Any,
    result: CommitmentResult,
    *,
    assoc: Any = None,
    destination: tuple[str, int] | None = None,
    called_ae: str = "",
    retries: int = 3,
    retry_interval: float = 5.0,
    on_retry: Callable[[int, Exception], Any] | None = None,
) -> str:
    """Deliver the report: on ``assoc`` if it is still established, else on a new
    association to ``destination`` (proposing the SCP role), retried ``retries`` times.
    Returns how it went ("same association", "new association"); raises the last error.
    ``on_retry(attempt, error)`` is called after each failed attempt on a new association."""
    event_type, info = report_dataset(result)
    if assoc is not None and assoc.is_established:
        try:
            rsp = await assoc.n_event_report(STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE, event_type, info)
            if rsp.status.is_failure:
                raise DIMSEFailure(f"report answered {rsp.status!r}")
            return "same association"
        except (AssociationError, DIMSEFailure, OSError):
            if destination is None:
                raise
    if destination is None:
        raise AssociationError(f"{called_ae or 'the requester'} is not in known_aes: no way to send the report")
    contexts = [ContextSpec(STORAGE_COMMITMENT, list(DEFAULT_TRANSFER_SYNTAXES), scu_role=False, scp_role=True)]
    last: Exception | None = None
    for attempt in range(retries + 1):
        if attempt:
            await asyncio.sleep(retry_interval * attempt)
        try:
            async with ae.associate(destination[0], destination[1], called_ae, contexts=contexts) as out:
                rsp = await out.n_event_report(STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE, event_type, info)
            if rsp.status.is_failure:
                raise DIMSEFailure(f"report answered {rsp.status!r}")
            return "new association" + (f" (attempt {attempt + 1})" if attempt else "")
        except (AssociationError, DIMSEFailure, OSError) as exc:
            last = exc
            if on_retry is not None:
                on_retry(attempt + 1, exc)
    assert last is not None
    raise last
