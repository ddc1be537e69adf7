"""An application's handlers that misbehave, seen by a real peer (pynetdicom).

A handler whose await is cancelled by something else than the association (a pool or
a task of the application's own shut down under it), a C-GET / C-MOVE handler that is
no async generator, and statuses a service cannot answer with (a pending status as the
final one, a final status yielded as a match): each request gets its service's failure
status (PS3.7 Annex C, PS3.4 C.4) and an ERROR line naming the fault, and the
association goes on serving the next request.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from conftest import communicate, dcmtk
from normalized_helpers import park
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE as PynetdicomAE
from pynetdicom import build_role, evt
from pynetdicom.pdu_primitives import (
    SOPClassCommonExtendedNegotiation,
    SOPClassExtendedNegotiation,
    UserIdentityNegotiation,
)

import dimse_async as da

pytestmark = pytest.mark.timeout(60)

HOST = "127.0.0.1"
VERIFICATION = "1.2.840.10008.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
STUDY_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_GET = "1.2.840.10008.5.1.4.1.2.2.3"
COMMITMENT = "1.2.840.10008.1.20.1"  # Storage Commitment Push Model: N-ACTION
COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"
# The peer's ACSE, DIMSE and idle (network) timeouts: a request left unanswered shows as
# no status. Only a bound for a defect: every answer expected here comes at once, so a
# short one only fails a passing run on a loaded machine (pynetdicom's idle timer aborts
# the association when the requestor thread is descheduled that long between requests).
PEER_TIMEOUT = 20


@pytest.fixture
def logged(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    logger = logging.getLogger("dimse_async")
    logger.addHandler(caplog.handler)  # (it does not propagate to root)
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)


def ct_instance() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "P1"
    ds.Modality = "CT"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def query(level: str = "STUDY") -> Dataset:
    q = Dataset()
    q.QueryRetrieveLevel = level
    q.PatientID = ""
    q.StudyInstanceUID = ""
    return q


@contextlib.asynccontextmanager
async def serving(ae: da.AE) -> AsyncIterator[int]:
    server = await ae.start_server(HOST, 0)
    try:
        yield server.port
    finally:
        server.close()
        await asyncio.wait_for(server.wait_closed(grace=2), 10)


def scp(**handlers: Callable[..., Any]) -> da.AE:
    """Our SCP with ``handlers`` by service name (``c_echo`` ... ``n_action``)."""
    # A destination that is known (else 0xA801 before any handler runs) and never reached.
    ae = da.AE("SCP", known_aes={"NOWHERE": (HOST, 9)})
    for sop_class in (VERIFICATION, CT, STUDY_FIND, STUDY_GET, STUDY_MOVE, COMMITMENT):
        ae.add_supported_context(sop_class, scu_role=True, scp_role=sop_class == CT)
    for service, handler in handlers.items():
        if service == "n_action":
            ae.on_n_action(handler, sop_class=COMMITMENT)
        else:
            ae.set_handler(service, handler)
    return ae


def pynetdicom_session(port: int, operations: list[str]) -> list[tuple[list[int | None], bool]]:
    """One pynetdicom association running ``operations`` ("echo", "store", "find",
    "get", "move", "action") in turn: per operation the statuses received (``None``: none, the
    peer timed out) and whether the association still stood after it."""
    ae = PynetdicomAE("PYNETDICOM")
    ae.dimse_timeout = ae.acse_timeout = ae.network_timeout = PEER_TIMEOUT
    for sop_class in (VERIFICATION, CT, STUDY_FIND, STUDY_GET, STUDY_MOVE, COMMITMENT):
        ae.add_requested_context(sop_class)
    assoc = ae.associate(
        HOST,
        port,
        ae_title="SCP",
        ext_neg=[build_role(CT, scu_role=True, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, lambda event: 0x0000)],
    )
    assert assoc.is_established
    out: list[tuple[list[int | None], bool]] = []
    try:
        for operation in operations:
            statuses: list[int | None] = []
            park(assoc)  # else its reactor may take our response off the queue (see park)
            if operation == "echo":
                statuses.append(assoc.send_c_echo().get("Status"))
            elif operation == "store":
                statuses.append(assoc.send_c_store(ct_instance()).get("Status"))
            elif operation == "find":
                statuses += [s.get("Status") for s, _ in assoc.send_c_find(query(), STUDY_FIND)]
            elif operation == "get":
                statuses += [s.get("Status") for s, _ in assoc.send_c_get(query(), STUDY_GET)]
            elif operation == "move":
                statuses += [s.get("Status") for s, _ in assoc.send_c_move(query(), "NOWHERE", STUDY_MOVE)]
            elif operation == "action":
                request = Dataset()
                request.TransactionUID = generate_uid()
                status, _reply = assoc.send_n_action(request, 1, COMMITMENT, COMMITMENT_INSTANCE)
                statuses.append(status.get("Status"))
            out.append((statuses, assoc.is_established))
            if not assoc.is_established:
                break
    finally:
        if assoc.is_established:
            assoc.release()
        else:
            assoc.abort()
    return out


async def cancelled_elsewhere() -> None:
    """What a handler sees when something it awaits is cancelled by another party (a
    connection pool closed under it): CancelledError, its own task not cancelled."""
    waiting = asyncio.get_running_loop().create_future()
    waiting.cancel()
    await waiting


async def test_a_handler_whose_await_is_cancelled_elsewhere_answers_a_failure(
    logged: pytest.LogCaptureFixture,
) -> None:
    """Each service's failure status at once (C-ECHO 0x0211, C-STORE, C-FIND, C-GET and
    C-MOVE 0xC000), an ERROR line, and the association goes on; before, no response
    went out at all and the peer waited for its DIMSE timeout."""

    async def unary(request: Any) -> None:
        await cancelled_elsewhere()

    async def matches(request: Any) -> AsyncIterator[Dataset]:
        await cancelled_elsewhere()
        yield query()

    ae = scp(c_echo=unary, c_store=unary, c_find=matches, c_get=matches, c_move=matches)
    async with serving(ae) as port:
        results = await asyncio.to_thread(pynetdicom_session, port, ["echo", "store", "find", "get", "move", "echo"])
    assert results == [
        ([0x0211], True),
        ([0xC000], True),
        ([0xC000], True),
        ([0xC000], True),
        ([0xC000], True),
        ([0x0211], True),
    ]
    failed = [r.getMessage() for r in logged.records if r.levelno == logging.ERROR and "cancelled" in r.getMessage()]
    assert len(failed) == 6, logged.text


async def test_retrieve_handlers_that_are_no_async_generators_answer_a_failure(
    logged: pytest.LogCaptureFixture,
) -> None:
    """A C-GET handler returning a list, a C-MOVE handler raising as it is called:
    0xC000 each with an ERROR line naming it, and the association goes on (before: an
    "internal error" A-ABORT, after or instead of the response)."""

    def listing(request: Any) -> list[Dataset]:
        return [ct_instance()]

    def broken(request: Any) -> Any:
        raise RuntimeError("no archive configured")

    ae = scp(c_get=listing, c_move=broken)
    async with serving(ae) as port:
        results = await asyncio.to_thread(pynetdicom_session, port, ["get", "move", "echo"])
    assert results == [([0xC000], True), ([0xC000], True), ([0x0000], True)]
    text = logged.text
    assert "internal error" not in text
    assert "C-GET handler failed" in text and "C-MOVE handler failed" in text and "no archive configured" in text


async def test_statuses_a_service_cannot_answer_with_are_refused_as_failures(
    logged: pytest.LogCaptureFixture,
) -> None:
    """A pending status (0xFF00) returned for C-ECHO or C-STORE, or raised as the final
    status of a C-FIND, would leave the peer waiting for a final response that never
    comes (PS3.7 §9.1.2.1.6: pending only while matches follow); a final status
    (Success) or no identifier yielded as a C-FIND match would end the operation at
    the peer before its final response (PS3.4 C.4.1.1.4). Each is answered with the
    service's failure status and logged."""

    async def pending(request: Any) -> int:
        return 0xFF00

    finds = iter(["raise-pending", "yield-success", "yield-none"])

    async def find(request: Any) -> AsyncIterator[Any]:
        kind = next(finds)
        if kind == "raise-pending":
            raise da.StatusError(0xFF00)
        match = query()
        match.PatientID = "P1"
        yield match
        yield (0x0000, match) if kind == "yield-success" else None

    ae = scp(c_echo=pending, c_store=pending, c_find=find)
    async with serving(ae) as port:
        results = await asyncio.to_thread(pynetdicom_session, port, ["echo", "store", "find", "find", "find", "echo"])
    assert results == [
        ([0xC000], True),
        ([0xC000], True),
        ([0xC000], True),
        ([0xFF00, 0xC000], True),
        ([0xFF00, 0xC000], True),
        ([0xC000], True),
    ]
    errors = [r.getMessage() for r in logged.records if r.levelno == logging.ERROR]
    assert len(errors) == 6, logged.text


async def test_replies_pydicom_cannot_encode_are_the_handlers_failure_in_one_log_line(
    logged: pytest.LogCaptureFixture,
) -> None:
    """A value the handler set that pydicom cannot write (a text in US): an N-ACTION
    reply is answered 0x0110 Processing Failure, a C-FIND match 0xC000, a C-GET
    instance a failed sub-operation (0xA702); the association goes on and the log has
    one line about it, without the traceback pydicom puts into its message (before,
    the N-ACTION aborted the association as an internal error)."""

    def unwritable() -> Dataset:
        ds = ct_instance()
        ds.add_new(0x00280010, "US", "not a number")  # Rows
        return ds

    async def action(request: Any) -> Dataset:
        return unwritable()

    async def matches(request: Any) -> AsyncIterator[Dataset]:
        yield unwritable()

    ae = scp(n_action=action, c_find=matches, c_get=matches)
    async with serving(ae) as port:
        results = await asyncio.to_thread(pynetdicom_session, port, ["action", "find", "get", "echo"])
    assert results == [([0x0110], True), ([0xC000], True), ([0xA702], True), ([0x0000], True)]
    text = logged.text
    assert "Traceback" not in text and "internal error" not in text, text
    assert "N-ACTION handler failed" in text and "C-FIND handler failed" in text and "sub-operation failed" in text


async def test_an_async_association_hook_that_raises_is_logged_as_a_plain_one(
    logged: pytest.LogCaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    """DCMTK echoscu against our SCP whose ``async`` hooks raise: an ERROR line per hook,
    as for a plain hook; before, asyncio's "Task exception was never retrieved" and a
    traceback, and nothing of ours."""
    ae = scp()

    @ae.on_association("accepted")
    async def accepted(assoc: da.Association) -> None:
        raise RuntimeError("hook of the application failed")

    @ae.on_association("released")
    async def released(assoc: da.Association) -> None:
        await asyncio.sleep(0)
        raise RuntimeError("hook of the application failed")

    async with serving(ae) as port:
        code, out, err = await communicate((dcmtk("echoscu"), "-aec", "SCP", HOST, str(port)), timeout=20)
        assert code == 0, out + err
        for _ in range(100):
            if sum("association hook failed" in r.getMessage() for r in logged.records) >= 2:
                break
            await asyncio.sleep(0.01)
    gc.collect()  # a task whose exception nobody took reports it when collected
    await asyncio.sleep(0)
    hooks = [r.getMessage() for r in logged.records if "association hook failed" in r.getMessage()]
    assert len(hooks) == 2 and all("hook of the application failed" in h for h in hooks), logged.text
    assert "never retrieved" not in caplog.text


async def test_an_authenticator_whose_await_is_cancelled_elsewhere_rejects_the_association(
    logged: pytest.LogCaptureFixture,
) -> None:
    """A user identity check (PS3.7 D.3.3.7) that fails that way is a refusal as any
    failure of it: A-ASSOCIATE-RJ at once and a warning; before, nothing answered the
    A-ASSOCIATE-RQ and the peer aborted at its ACSE timeout."""
    ae = scp()

    @ae.on_user_identity
    async def check(identity: da.UserIdentityRQ, assoc: da.Association) -> tuple[bool, bytes | None]:
        await cancelled_elsewhere()
        return True, None

    def associate(port: int) -> list[str]:
        """The PDUs pynetdicom received (its own verdict can say aborted for a quick
        A-ASSOCIATE-RJ on a loaded machine: see test_interop_echo.pynetdicom_session)."""
        peer = PynetdicomAE("PYNETDICOM")
        peer.acse_timeout = PEER_TIMEOUT
        peer.add_requested_context(VERIFICATION)
        identity = UserIdentityNegotiation()
        identity.user_identity_type = 1
        identity.primary_field = b"alice"
        received: list[str] = []
        assoc = peer.associate(
            HOST, port, ae_title="SCP", ext_neg=[identity],
            evt_handlers=[(evt.EVT_PDU_RECV, lambda event: received.append(type(event.pdu).__name__))],
        )  # fmt: skip
        if assoc.is_established:
            assoc.release()
        elif assoc.is_alive():
            assoc.abort()
        return received

    async with serving(ae) as port:
        assert await asyncio.to_thread(associate, port) == ["A_ASSOCIATE_RJ"]
    assert "user identity check failed" in logged.text


@pytest.mark.parametrize("fault", ["raises", "returns str"])
async def test_extended_negotiation_callbacks_that_fail_decline_their_items(
    logged: pytest.LogCaptureFixture, fault: str
) -> None:
    """SOP class extended and common extended negotiation callbacks (PS3.7 D.3.3.5,
    D.3.3.6) that raise, or return a str where bytes are due: the item is declined (no
    reply sub-item), an ERROR line says why, and the association is accepted; before,
    an "internal error" A-ABORT answered the A-ASSOCIATE-RQ."""
    ae = scp()

    @ae.on_extended_negotiation
    def extended(sop_class: str, info: bytes) -> Any:
        if fault == "raises":
            raise RuntimeError("callback of the application failed")
        return "\x01"  # not bytes

    @ae.on_common_extended_negotiation
    def common(item: Any) -> bool:
        raise RuntimeError("callback of the application failed")

    def associate(port: int) -> tuple[bool, list[Any], int | None]:
        peer = PynetdicomAE("PYNETDICOM")
        peer.acse_timeout = peer.dimse_timeout = PEER_TIMEOUT
        for sop_class in (VERIFICATION, STUDY_FIND, CT):
            peer.add_requested_context(sop_class)
        ext = SOPClassExtendedNegotiation()
        ext.sop_class_uid = STUDY_FIND
        ext.service_class_application_information = b"\x01"
        common = SOPClassCommonExtendedNegotiation()
        common.sop_class_uid = CT
        common.service_class_uid = "1.2.840.10008.4.2"
        assoc = peer.associate(HOST, port, ae_title="SCP", ext_neg=[ext, common])
        if not assoc.is_established:
            return False, [], None
        replies = [i for i in assoc.acceptor.user_information if isinstance(i, SOPClassExtendedNegotiation)]
        park(assoc)
        status = assoc.send_c_echo().get("Status")
        assoc.release()
        return True, replies, status

    async with serving(ae) as port:
        established, replies, status = await asyncio.to_thread(associate, port)
    assert (established, replies, status) == (True, [], 0x0000)
    assert "internal error" not in logged.text
    assert "extended negotiation callback" in logged.text
    assert "common extended negotiation callback failed" in logged.text


async def test_retrieve_items_that_are_neither_paths_nor_datasets_fail_their_sub_operations(
    logged: pytest.LogCaptureFixture,
) -> None:
    """A C-GET handler yielding an int and ``None`` among its instances: those
    sub-operations fail (0xA702 when none succeeded, 0xB000 beside a stored one, PS3.4
    C.4.3.1.4), each with a warning, and the association goes on; before, an
    "internal error" A-ABORT."""
    gets = iter([[5, None], [ct_instance(), 5]])

    async def items(request: Any) -> AsyncIterator[Any]:
        for item in next(gets):
            yield item

    ae = scp(c_get=items)
    async with serving(ae) as port:
        results = await asyncio.to_thread(pynetdicom_session, port, ["get", "get", "echo"])
    assert results == [([0xFF00, 0xA702], True), ([0xFF00, 0xB000], True), ([0x0000], True)]
    assert "internal error" not in logged.text
    assert "sub-operation failed" in logged.text


async def test_move_items_that_cannot_be_inspected_fail_without_ending_the_association(
    logged: pytest.LogCaptureFixture,
) -> None:
    """A C-MOVE handler yielding an int, ``None`` and a Dataset without SOP Class UID:
    each sub-operation fails (no sub-association is made for none to send), the C-MOVE
    ends 0xA702 and the association goes on;
    before, inspecting them for the destination's contexts raised and the association
    was aborted as an internal error."""
    no_class = ct_instance()
    del no_class.SOPClassUID

    async def items(request: Any) -> AsyncIterator[Any]:
        for item in (5, None, no_class):
            yield item

    ae = scp(c_move=items)
    async with serving(ae) as port:
        results = await asyncio.to_thread(pynetdicom_session, port, ["move", "echo"])
    assert results == [([0xFF00, 0xFF00, 0xA702], True), ([0x0000], True)]  # a pending response per failed one
    assert "internal error" not in logged.text
    assert "sub-operation not possible" in logged.text
