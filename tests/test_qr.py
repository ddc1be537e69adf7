"""C-FIND / C-GET / C-MOVE / C-CANCEL between our SCU and our SCP."""

from __future__ import annotations

import asyncio

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dimse_async import AE, AssociationAborted, AssociationTimeout, Verification
from dimse_async.services.qr import MODELS
from dimse_async.services.storage import STORAGE_SOP_CLASSES, STORE_TRANSFER_SYNTAXES, DirectoryStore

CT = get_testdata_file("CT_small.dcm")
CT_CLASS = "1.2.840.10008.5.1.4.1.1.2"


def study_query(**keys) -> Dataset:
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.PatientID = ""
    q.StudyInstanceUID = ""
    for k, v in keys.items():
        setattr(q, k, v)
    return q


def qr_scp(**kw) -> AE:
    ae = AE("QRSCP", **kw)
    ae.add_supported_context(Verification)
    for model in MODELS.values():
        for uid in model.values():
            ae.add_supported_context(uid)
    for uid in STORAGE_SOP_CLASSES:
        ae.add_supported_context(uid, STORE_TRANSFER_SYNTAXES, scp_role=True)
    return ae


def qr_scu(*, get_storage: bool = False, **kw) -> AE:
    ae = AE("QRSCU", **kw)
    ae.add_requested_context(Verification)
    for model in MODELS.values():
        for uid in model.values():
            ae.add_requested_context(uid)
    if get_storage:
        ae.add_requested_context(CT_CLASS, [ExplicitVRLittleEndian], scu_role=False, scp_role=True)
    return ae


def make_studies(tmp_path, n: int) -> list[str]:
    paths = []
    base = pydicom.dcmread(CT)
    for i in range(n):
        base.StudyInstanceUID = generate_uid()
        base.SeriesInstanceUID = generate_uid()
        base.SOPInstanceUID = generate_uid()
        base.PatientID = f"P{i:03d}"
        path = tmp_path / f"{i}.dcm"
        base.save_as(path, enforce_file_format=True)
        paths.append(str(path))
    return paths


async def test_find_yields_matches_and_final_status():
    ae = qr_scp()

    @ae.on_c_find
    async def find(request):
        assert request.level == "STUDY"
        for i in range(3):
            ds = Dataset()
            ds.QueryRetrieveLevel = "STUDY"
            ds.PatientID = f"{request.identifier.PatientID}{i}"
            ds.StudyInstanceUID = f"1.2.3.{i}"
            yield ds

    async with await ae.start_server("127.0.0.1", 0) as server:
        async with qr_scu().associate("127.0.0.1", server.port, "QRSCP") as assoc:
            responses = assoc.c_find(study_query(PatientID="X"))
            found = [ds async for ds in responses]
    assert [d.PatientID for d in found] == ["X0", "X1", "X2"]
    assert responses.status == 0x0000


async def test_breaking_out_of_find_sends_cancel_and_drains():
    ae = qr_scp()
    yielded = 0
    cancelled = asyncio.Event()

    @ae.on_c_find
    async def find(request):
        nonlocal yielded
        try:
            for i in range(1000):
                ds = Dataset()
                ds.PatientID = str(i)
                yielded += 1
                yield ds
                await asyncio.sleep(0.005)
        finally:
            if request.cancelled:
                cancelled.set()

    async with await ae.start_server("127.0.0.1", 0) as server:
        async with qr_scu().associate("127.0.0.1", server.port, "QRSCP") as assoc:
            responses = assoc.c_find(study_query())
            async with responses:
                async for ds in responses:
                    if ds.PatientID == "2":
                        break
            await asyncio.wait_for(cancelled.wait(), 5)
            for _ in range(200):
                if responses.status is not None:
                    break
                await asyncio.sleep(0.01)
            assert responses.status == 0xFE00
            # The association is still usable after the cancel.
            assert (await assoc.c_echo()).is_success
    assert yielded < 100


async def test_find_handler_error_is_failure_status():
    ae = qr_scp()

    @ae.on_c_find
    async def find(request):
        yield Dataset()
        raise RuntimeError("database down")

    async with await ae.start_server("127.0.0.1", 0) as server:
        async with qr_scu().associate("127.0.0.1", server.port, "QRSCP") as assoc:
            responses = assoc.c_find(study_query())
            got = [d async for d in responses]
            assert assoc.is_established
    assert len(got) == 1
    assert responses.status.category == "failure" and "database down" in responses.status.error_comment


async def test_get_runs_store_suboperations_on_same_association(tmp_path):
    paths = make_studies(tmp_path, 3)
    ae = qr_scp()

    @ae.on_c_get
    async def get(request):
        for p in paths:
            yield p

    received = []

    async def sink(request):
        received.append(request.sop_instance_uid)

    async with await ae.start_server("127.0.0.1", 0) as server:
        async with qr_scu(get_storage=True).associate("127.0.0.1", server.port, "QRSCP") as assoc:
            responses = assoc.c_get(study_query(StudyInstanceUID="1.2.3"), store=sink)
            progress = [p async for p in responses]
    assert responses.status == 0x0000
    assert [p.remaining for p in progress[:-1]] == [2, 1]
    final = progress[-1]
    assert (final.completed, final.failed, final.warning) == (3, 0, 0)
    assert sorted(received) == sorted(pydicom.dcmread(p).SOPInstanceUID for p in paths)


async def test_get_without_scp_role_reports_failures(tmp_path):
    paths = make_studies(tmp_path, 2)
    ae = qr_scp()

    @ae.on_c_get
    async def get(request):
        for p in paths:
            yield p

    async with await ae.start_server("127.0.0.1", 0) as server:
        async with qr_scu(get_storage=False).associate("127.0.0.1", server.port, "QRSCP") as assoc:
            responses = assoc.c_get(study_query())
            progress = [p async for p in responses]
    assert int(responses.status) == 0xA702
    assert progress[-1].failed == 2
    assert sorted(progress[-1].failed_instances) == sorted(pydicom.dcmread(p).SOPInstanceUID for p in paths)


async def test_move_to_known_destination_with_originator(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    paths = make_studies(src, 4)
    dest_dir = tmp_path / "dest"
    originators = []

    dest = AE("DEST")
    for uid in STORAGE_SOP_CLASSES:
        dest.add_supported_context(uid, STORE_TRANSFER_SYNTAXES)
    store = DirectoryStore(dest_dir)

    @dest.on_c_store
    async def on_store(request):
        originators.append(request.move_originator)
        return await store(request)

    async with await dest.start_server("127.0.0.1", 0) as dest_server:
        ae = qr_scp(known_aes={"DEST": ("127.0.0.1", dest_server.port)})

        @ae.on_c_move
        async def move(request):
            assert request.move_destination == "DEST"
            for p in paths:
                yield p

        async with await ae.start_server("127.0.0.1", 0) as server:
            async with qr_scu().associate("127.0.0.1", server.port, "QRSCP") as assoc:
                responses = assoc.c_move(study_query(), "DEST")
                progress = [p async for p in responses]
                unknown = assoc.c_move(study_query(), "NOWHERE")
                assert [p async for p in unknown][-1].status == 0xA801
    assert responses.status == 0x0000
    assert progress[-1].completed == 4
    assert len(list(dest_dir.glob("*.dcm"))) == 4
    assert set(originators) == {("QRSCU", originators[0][1])}


@pytest.mark.parametrize("model", ["patient", "study", "patient-study", "worklist"])
async def test_every_model_reaches_the_find_handler(model):
    ae = qr_scp()
    seen = []

    @ae.on_c_find
    async def find(request):
        seen.append(request.model)
        return
        yield

    async with await ae.start_server("127.0.0.1", 0) as server:
        async with qr_scu().associate("127.0.0.1", server.port, "QRSCP") as assoc:
            responses = assoc.c_find(study_query(), model=model)
            assert [d async for d in responses] == []
    assert seen == [MODELS[model]["find"]]
    assert responses.status == 0


async def test_cancel_stops_get_suboperations(tmp_path):
    paths = make_studies(tmp_path, 30)
    ae = qr_scp()

    @ae.on_c_get
    async def get(request):
        for p in paths:
            yield p

    received = []

    async def slow_sink(request):
        received.append(request.sop_instance_uid)
        await asyncio.sleep(0.02)

    async with await ae.start_server("127.0.0.1", 0) as server:
        async with qr_scu(get_storage=True).associate("127.0.0.1", server.port, "QRSCP") as assoc:
            responses = assoc.c_get(study_query(StudyInstanceUID="1.2.3"), store=slow_sink)
            async with responses:
                async for progress in responses:
                    if progress.completed and progress.completed >= 2:
                        break
            assert responses.status == 0xFE00
            assert (await assoc.c_echo()).is_success
    assert 2 <= len(received) < 30


def endless_find(ae: AE, cancelled: asyncio.Event, *, delay: float = 0.005):
    """A C-FIND handler that matches forever until cancelled."""

    @ae.on_c_find
    async def find(request):
        try:
            for i in range(100_000):
                ds = Dataset()
                ds.PatientID = str(i)
                yield ds
                await asyncio.sleep(delay)
        finally:
            if request.cancelled:
                cancelled.set()


async def test_async_with_block_left_early_has_the_final_status_at_once():
    """The documented way: leaving ``async with`` sends C-CANCEL and waits for the final
    response, so ``status`` is set without polling."""
    ae = qr_scp()
    cancelled = asyncio.Event()
    endless_find(ae, cancelled)
    async with await ae.start_server("127.0.0.1", 0) as server:
        async with qr_scu().associate("127.0.0.1", server.port, "QRSCP") as assoc:
            async with assoc.c_find(study_query()) as responses:
                async for _ds in responses:
                    break
            assert responses.status == 0xFE00
            assert cancelled.is_set()


async def test_break_out_of_a_loop_nobody_holds_cancels_promptly():
    """``async for ds in assoc.c_find(q): break`` with no reference kept: C-CANCEL goes
    out as soon as the loop drops the iterator, not whenever the garbage collector runs."""
    import gc

    ae = qr_scp()
    cancelled = asyncio.Event()
    endless_find(ae, cancelled)
    async with await ae.start_server("127.0.0.1", 0) as server:
        async with qr_scu().associate("127.0.0.1", server.port, "QRSCP") as assoc:
            gc.disable()  # only reference counting may free the iterator
            try:
                async for _ds in assoc.c_find(study_query()):
                    break
                await asyncio.wait_for(cancelled.wait(), 5)
            finally:
                gc.enable()
            assert (await assoc.c_echo()).is_success


async def test_status_is_set_when_the_association_ends_mid_find():
    ae = qr_scp()
    cancelled = asyncio.Event()
    endless_find(ae, cancelled, delay=0.02)
    async with await ae.start_server("127.0.0.1", 0) as server:
        assoc = await qr_scu().associate("127.0.0.1", server.port, "QRSCP")
        responses = assoc.c_find(study_query())
        with pytest.raises(AssociationAborted):
            async for _ds in responses:
                (server_assoc,) = server.associations
                server_assoc.abort("test")
        assert responses.status is not None and responses.status.is_failure
        await responses.aclose()  # nothing left to cancel: returns at once
        await assoc.wait_closed()


async def test_find_response_timeout_is_association_timeout():
    """One timeout rule: no response within dimse_timeout raises AssociationTimeout and
    aborts, for C-FIND as for every other operation."""
    ae = qr_scp()
    gate = asyncio.Event()

    @ae.on_c_find
    async def find(request):
        await gate.wait()
        yield Dataset()

    async with await ae.start_server("127.0.0.1", 0) as server:
        assoc = await qr_scu(dimse_timeout=0.3).associate("127.0.0.1", server.port, "QRSCP")
        with pytest.raises(AssociationTimeout):
            async for _ds in assoc.c_find(study_query()):
                pass
        await asyncio.wait_for(assoc.wait_closed(), 5)
        assert "no C-FIND-RQ response" in (assoc.end_reason or "")
        gate.set()


async def test_handler_returning_a_non_status_answers_failure_and_keeps_the_association():
    ae = qr_scp()

    @ae.on_c_echo
    async def echo(request):
        return "fine"  # not a status

    async with await ae.start_server("127.0.0.1", 0) as server:
        async with qr_scu().associate("127.0.0.1", server.port, "QRSCP") as assoc:
            status = await assoc.c_echo()
            assert status == 0xC000 and "not a status" in status.error_comment
            assert assoc.is_established


async def test_status_error_is_honoured_by_c_store():
    from dimse_async import StatusError

    ae = qr_scp()

    @ae.on_c_store
    async def store(request):
        raise StatusError(0xA711, "quota exceeded")

    async with await ae.start_server("127.0.0.1", 0) as server:
        scu = qr_scu()
        scu.add_requested_context(CT_CLASS, [ExplicitVRLittleEndian])
        async with scu.associate("127.0.0.1", server.port, "QRSCP") as assoc:
            status = await assoc.c_store(CT)
    assert status == 0xA711 and status.error_comment == "quota exceeded"


def find_then_wait_for_cancel(ae: AE, matches: int, *, then: str) -> None:
    """A C-FIND handler: ``matches`` matches, then it waits (bounded) until the peer's
    C-CANCEL has been read, then ``then``: "end" (no more matches), "look" (reads
    ``request.cancelled`` and stops) or "more" (yields one more match)."""

    @ae.on_c_find
    async def find(request):
        for i in range(matches):
            ds = Dataset()
            ds.PatientID = str(i)
            yield ds
        for _ in range(500):  # the operation's flag, not request.cancelled: nothing observed
            if request.operation.cancelled:
                break
            await asyncio.sleep(0.01)
        assert request.operation.cancelled, "the C-CANCEL never arrived"
        if then == "look" and request.cancelled:
            return
        if then == "more":
            yield Dataset()


@pytest.mark.parametrize(("then", "expected"), [("end", 0x0000), ("look", 0xFE00), ("more", 0xFE00)])
async def test_cancel_read_after_the_last_match_went_out(then: str, expected: int) -> None:
    """A C-CANCEL that arrives once every match has been sent leaves the final status
    Success: matching was not terminated. Cancel when a match was left unsent or the
    handler stopped on seeing the cancel."""
    ae = qr_scp()
    find_then_wait_for_cancel(ae, 2, then=then)
    async with await ae.start_server("127.0.0.1", 0) as server:
        async with qr_scu().associate("127.0.0.1", server.port, "QRSCP") as assoc:
            async with assoc.c_find(study_query()) as responses:
                async for _ds in responses:
                    break
            assert responses.status is not None
            assert int(responses.status) == expected, hex(int(responses.status))
            assert (await assoc.c_echo()).is_success
