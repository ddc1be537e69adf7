"""Handlers written as plain functions, as an application coming from pynetdicom writes
them: a plain ``def`` returning its outcome serves C-ECHO, C-STORE and DIMSE-N requests
(called on the event loop); a handler of the wrong kind for its service (a plain
generator function, an async generator returning an outcome, a coroutine where matches
are yielded) is refused at registration with a ``TypeError`` naming it and the service,
instead of a failure status for every request (PS3.7 §9.1, §10.1)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from normalized_helpers import park
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE as PynetdicomAE

import dimse_async as da

pytestmark = pytest.mark.timeout(60)

HOST = "127.0.0.1"
VERIFICATION = "1.2.840.10008.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
STUDY_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
COMMITMENT = "1.2.840.10008.1.20.1"
COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"


def find_generator(request: Any) -> Iterator[Dataset]:
    yield Dataset()


async def echo_generator(request: Any) -> AsyncIterator[int]:
    yield 0


async def get_coroutine(request: Any) -> list[Dataset]:
    return []


def action_generator(request: Any) -> Iterator[int]:
    yield 0


@pytest.mark.parametrize(
    ("register", "words"),
    [
        (lambda ae: ae.on_c_find(find_generator), ["C-FIND handler", "find_generator", "plain generator function"]),
        (lambda ae: ae.set_handler("c_find", find_generator), ["C-FIND handler", "find_generator"]),
        (lambda ae: ae.on_c_echo(echo_generator), ["C-ECHO handler", "echo_generator", "async generator"]),
        (lambda ae: ae.on_c_get(get_coroutine), ["C-GET handler", "get_coroutine", "without yield"]),
        (lambda ae: ae.on_n_action(sop_class=COMMITMENT)(action_generator), ["N-ACTION handler", "action_generator"]),
        (lambda ae: ae.on_n_action(action_generator), ["N-ACTION handler", "action_generator"]),
        (lambda ae: ae.set_handler("c_store", 5), ["C-STORE handler", "not callable"]),
    ],
    ids=["find-gen", "find-gen-set", "echo-agen", "get-coro", "action-gen-class", "action-gen", "store-int"],
)
def test_a_handler_of_the_wrong_kind_is_refused_at_registration(register: Any, words: list[str]) -> None:
    ae = da.AE("SCP")
    with pytest.raises(TypeError) as raised:
        register(ae)
    assert all(w in str(raised.value) for w in words), str(raised.value)


def test_handlers_of_the_right_kind_are_registered() -> None:
    """A lambda returning a coroutine, a plain def, a callable object, async generators."""
    ae = da.AE("SCP")

    async def echo(request: Any) -> None:
        return None

    class Finder:
        async def __call__(self, request: Any) -> AsyncIterator[Dataset]:
            yield Dataset()

    ae.on_c_echo(lambda request: echo(request))
    ae.on_c_store(lambda request: 0)
    ae.on_c_find(Finder())
    ae.set_handler("c_get", lambda request: Finder()(request))


def pynetdicom_session(port: int) -> list[int | None]:
    """C-ECHO, C-STORE and N-ACTION from pynetdicom: the statuses received."""
    peer = PynetdicomAE("PYNETDICOM")
    peer.acse_timeout = peer.dimse_timeout = peer.network_timeout = 10
    for sop_class in (VERIFICATION, CT, COMMITMENT):
        peer.add_requested_context(sop_class)
    assoc = peer.associate(HOST, port, ae_title="SCP")
    assert assoc.is_established
    statuses: list[int | None] = []
    try:
        park(assoc)
        statuses.append(assoc.send_c_echo().get("Status"))
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = CT, generate_uid()
        ds.PatientID = "P1"
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        park(assoc)
        statuses.append(assoc.send_c_store(ds).get("Status"))
        request = Dataset()
        request.TransactionUID = generate_uid()
        park(assoc)
        status, reply = assoc.send_n_action(request, 1, COMMITMENT, COMMITMENT_INSTANCE)
        statuses.append(status.get("Status"))
        statuses.append(None if reply is None else reply.get("TransactionUID") == request.TransactionUID)
    finally:
        assoc.release()
    return statuses


async def test_plain_def_handlers_answer_with_their_outcome() -> None:
    """Before, each was awaited: 0x0211 for the C-ECHO, 0xC000 for the C-STORE, 0x0110
    for the N-ACTION, and an ERROR line each."""
    ae = da.AE("SCP")
    for sop_class in (VERIFICATION, CT, COMMITMENT):
        ae.add_supported_context(sop_class)
    seen: list[str] = []

    def echo(request: Any) -> int:
        seen.append("echo")
        return 0x0000

    def store(request: da.StoreRequest) -> int:
        seen.append(str(request.sop_instance_uid))
        return 0xB007  # Warning: data set does not match SOP class (PS3.4 B.2.3)

    def action(request: Any) -> Dataset:
        reply = Dataset()
        reply.TransactionUID = request.dataset.TransactionUID
        return reply

    ae.on_c_echo(echo)
    ae.on_c_store(store)
    ae.on_n_action(action, sop_class=COMMITMENT)
    server = await ae.start_server(HOST, 0)
    try:
        statuses = await asyncio.to_thread(pynetdicom_session, server.port)
    finally:
        server.close()
        await asyncio.wait_for(server.wait_closed(grace=2), 10)
    assert statuses == [0x0000, 0xB007, 0x0000, True]
    assert seen[0] == "echo" and len(seen) == 2
