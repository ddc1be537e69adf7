"""What the archive's records of its instances are used for, checked against ``serve``
(in this process, on loopback) with our SCU as the peer:

- a stored file cut at an element boundary parses as a complete data set: the size the
  index recorded when it was stored tells it apart. C-FIND says UNAVAILABLE for it at the
  IMAGE level (Instance Availability, PS3.3 C.4.23.1.1), a C-GET fails its sub-operation,
  and a re-index keeps the record and names the file instead of indexing the cut file;
- a re-index from scratch gives a study and a series the attributes of their first
  instance stored (file modification time), as the live archive did, whatever order the
  directory walk meets the files in;
- a performed procedure step is found by any study it was scheduled for (PS3.4 F.7.2);
- storage commitment: a second N-ACTION with the Transaction UID of a transaction still in
  progress is refused, so that the Transaction UID has one report (PS3.4 J.3.2, J.3.3).
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from normalized_helpers import HOST, make_instances, running_serve, store
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

import dimse_async as da
from dimse_async.archive.index import Archive
from dimse_async.archive.mpps import MPPS, MPPSStore, mpps_create_dataset, mpps_final_dataset
from dimse_async.services.commitment import STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE, request_dataset
from dimse_async.services.normalized import NRequest
from dimse_async.services.qr import MODELS

WAIT = 30.0
PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010) in little endian


def _query(level: str, **keys: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for key, value in keys.items():
        setattr(ds, key, value)
    return ds


async def _availability(port: int, study: str, series: str) -> dict[str, str]:
    """SOP Instance UID -> Instance Availability of the series' instances, by C-FIND."""
    scu = da.AE("FINDSCU")
    scu.add_requested_context(MODELS["study"]["find"])
    query = _query("IMAGE", StudyInstanceUID=study, SeriesInstanceUID=series, SOPInstanceUID="",
                   InstanceAvailability="")  # fmt: skip
    async with scu.associate(HOST, port, "ARCHIVE") as assoc:
        found = [m async for m in assoc.c_find(query, "study")]
    return {str(m.SOPInstanceUID): str(m.InstanceAvailability) for m in found}


async def test_a_file_cut_at_an_element_boundary_is_unavailable_and_not_reindexed(
    tmp_path: Path, index: str | None, logged: pytest.LogCaptureFixture
) -> None:
    """Three instances stored; one file is then cut just before its Pixel Data element
    (what is left is a complete data set to any parser). C-FIND (IMAGE level) says
    UNAVAILABLE for it, ONLINE for the others; the re-index leaves it out with a warning
    naming the file, keeping the record of the size stored; a C-GET of the study sends
    the two intact instances and fails the cut one (0xB000, its UID in the Failed SOP
    Instance UID List)."""
    files = make_instances(tmp_path / "in", 3)
    first = pydicom.dcmread(files[0][0])
    study, series = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)
    uids = [uid for _p, _c, uid in files]
    async with running_serve(tmp_path / "archive", index=index) as serve:
        await store(serve.port, [p for p, _c, _i in files])
        assert await _availability(serve.port, study, series) == dict.fromkeys(uids, "ONLINE")
        cut = serve.archive.path_for(uids[0])
        data = cut.read_bytes()
        os.truncate(cut, data.rindex(PIXEL_DATA_TAG))
        assert "PixelData" not in pydicom.dcmread(cut)  # parses as complete
        assert await _availability(serve.port, study, series) == {uids[0]: "UNAVAILABLE", uids[1]: "ONLINE", uids[2]: "ONLINE"}

        added, skipped, gone = await serve.archive.reindex()
        assert (added, skipped, gone) == (0, 1, 0)
        (line,) = [r.getMessage() for r in logged.records if "shorter than when stored" in r.getMessage()]
        assert str(cut) in line and f"stored_size={len(data)}" in line
        assert await _availability(serve.port, study, series) == {uids[0]: "UNAVAILABLE", uids[1]: "ONLINE", uids[2]: "ONLINE"}

        scu = da.AE("GETSCU")
        scu.add_requested_context(MODELS["study"]["get"])
        scu.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian], scu_role=False, scp_role=True)
        received: list[str] = []

        async def sink(request: Any) -> int:
            received.append(request.sop_instance_uid)
            return 0

        async with scu.associate(HOST, serve.port, "ARCHIVE") as assoc:
            responses = assoc.c_get(_query("STUDY", StudyInstanceUID=study), store=sink)
            progress = [p async for p in responses]
    assert sorted(received) == sorted(uids[1:])
    assert int(responses.status) == 0xB000
    assert (progress[-1].completed, progress[-1].failed) == (2, 1)
    assert progress[-1].failed_instances == [uids[0]]


def _walk_order(root: Path) -> list[Path]:
    """The directories under ``root`` in the order the re-index's walk visits them."""
    order = []
    for dirpath, dirnames, _files in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        order.append(Path(dirpath))
    return order


async def test_reindex_from_scratch_keeps_the_attributes_of_the_first_instance_stored(tmp_path: Path) -> None:
    """Two instances of one study and series, their descriptions differing, stored one
    after the other: the archive answers with the first one's (first stored wins). The
    index is then lost and rebuilt from the files, the walk meeting the second one's file
    first: the study and the series still have the first one's descriptions."""
    root = tmp_path / "archive"
    a_uid, b_uid = generate_uid(), generate_uid()
    while a_uid[-4:] == b_uid[-4:]:  # (in directories of their own)
        b_uid = generate_uid()
    probe = Archive(root)
    try:
        paths = {uid: probe.path_for(uid) for uid in (a_uid, b_uid)}
    finally:
        probe.close()
    for path in paths.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    # The directories exist before the files, so the walk's order is known now: the
    # instance whose file it meets first is stored second.
    order = _walk_order(root)
    second, first = sorted((a_uid, b_uid), key=lambda uid: order.index(paths[uid].parent))
    sources = make_instances(tmp_path / "in", 2)
    for (path, _c, _i), uid, words in ((sources[0], first, "FIRST"), (sources[1], second, "SECOND")):
        ds = pydicom.dcmread(path)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.StudyDescription = f"{words} STUDY"
        ds.SeriesDescription = f"{words} SERIES"
        ds.save_as(path, enforce_file_format=True)
    query = _query("SERIES", StudyInstanceUID=str(ds.StudyInstanceUID), StudyDescription="", SeriesDescription="",
                   SeriesInstanceUID="")  # fmt: skip
    async with running_serve(root) as serve:
        await store(serve.port, [sources[0][0]])
        await store(serve.port, [sources[1][0]])
        (live,) = await serve.archive.find(MODELS["study"]["find"], query)
    assert (live.StudyDescription, live.SeriesDescription) == ("FIRST STUDY", "FIRST SERIES")
    now = time.time()
    os.utime(paths[first], (now - 10, now - 10))  # (stored in that order; no tie on a coarse clock)
    os.utime(paths[second], (now, now))
    for leftover in root.glob("index.sqlite*"):
        leftover.unlink()
    rebuilt = Archive(root)
    try:
        assert await rebuilt.reindex() == (2, 0, 0)
        (again,) = await rebuilt.find(MODELS["study"]["find"], query)
    finally:
        rebuilt.close()
    assert (again.StudyDescription, again.SeriesDescription) == ("FIRST STUDY", "FIRST SERIES")


async def test_a_step_of_several_studies_is_found_by_each(tmp_path: Path) -> None:
    """An MPPS N-CREATE whose Scheduled Step Attributes Sequence names two studies (two
    requested procedures done in one step); the images go in the second study. The step
    is found by either study, and the second study's instance availability notification
    references it (PS3.4 R.3.4.1.1); steps kept before every study was listed are found
    the same once the file is opened again."""
    files = make_instances(tmp_path / "in", 1)
    image = pydicom.dcmread(files[0][0])
    one, two = generate_uid(), str(image.StudyInstanceUID)
    create = mpps_create_dataset("PAT1", "Test^Patient", one, "CT", "PPS1", "CT1")
    also = Dataset()
    also.StudyInstanceUID = two
    also.ReferencedStudySequence = []
    also.AccessionNumber = "A2"
    create.ScheduledStepAttributesSequence.append(also)
    root = tmp_path / "archive"
    async with running_serve(root, ian_destinations=["RIS"], ian_delay=3600.0, known_aes={"RIS": (HOST, 9)}) as serve:
        await store(serve.port, [files[0][0]])
        ae = da.AE("MODALITY", dimse_timeout=WAIT)
        ae.add_requested_context(MPPS)
        async with ae.associate(HOST, serve.port, "ARCHIVE") as assoc:
            created = await assoc.n_create(MPPS, None, create)
            assert created.is_success
            uid = created.sop_instance_uid
            ended = await assoc.n_set(MPPS, uid, mpps_final_dataset(series_uids=[str(image.SeriesInstanceUID)]))
            assert ended.is_success
        steps = serve.extras.mpps
        assert steps is not None and serve.extras.availability is not None
        assert [s.SOPInstanceUID for s in await steps.find(study_uid=one)] == [uid]
        assert [s.SOPInstanceUID for s in await steps.find(study_uid=two)] == [uid]
        notified = await serve.extras.availability.availability(two)
        assert notified.procedure_steps == [(MPPS, uid)]
    with sqlite3.connect(root / "mpps.sqlite") as db:  # as a file kept before the list existed
        db.execute("DELETE FROM mpps_studies")
        db.execute("PRAGMA user_version = 0")
    db.close()
    reopened = MPPSStore(root)
    try:
        assert [s.SOPInstanceUID for s in await reopened.find(study_uid=two)] == [uid]
    finally:
        reopened.close()


async def test_a_transaction_uid_in_progress_is_refused_and_reported_once(
    tmp_path: Path, logged: pytest.LogCaptureFixture
) -> None:
    """Storage commitment, the report on a new association, two ``serve`` processes'
    worth of SCPs on one index (as ``--workers 2``): while the report of a transaction
    is under way (the requester has not answered it yet), an N-ACTION with the same
    Transaction UID is refused 0x0115 (a failure: J.3.2.1.3, the SCP does not process
    it) with a warning line, by the SCP that took it and by the other one alike; the
    requester gets one report for the Transaction UID, the first request's, not also one
    failing it 0x0131 (in either order). Once reported, the Transaction UID used again
    is answered by a report failing it 0x0131, by either SCP."""
    reports: list[Dataset] = []
    entered, release = asyncio.Event(), asyncio.Event()
    ours = da.AE("OUR_SCU", dimse_timeout=WAIT)
    ours.add_supported_context(STORAGE_COMMITMENT, scp_role=True)
    ours.add_requested_context(STORAGE_COMMITMENT)

    @ours.on_n_event_report(sop_class=STORAGE_COMMITMENT)
    async def on_report(request: NRequest) -> None:
        assert request.dataset is not None
        reports.append(request.dataset)
        entered.set()
        await release.wait()

    transaction = generate_uid()
    info = request_dataset(transaction, [(CTImageStorage, generate_uid())])
    root = tmp_path / "archive"

    async def action(port: int) -> Any:
        async with ours.associate(HOST, port, "ARCHIVE") as assoc:
            return (await assoc.n_action(STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE, 1, info)).status

    async with await ours.start_server(HOST, 0) as listener:
        settings: dict[str, Any] = {"commitment_same_association": False, "known_aes": {"OUR_SCU": (HOST, listener.port)}}
        async with running_serve(root, **settings) as serve, running_serve(root, **settings) as other:
            assert serve.extras.commitment is not None and other.extras.commitment is not None
            first = await action(serve.port)
            await asyncio.wait_for(entered.wait(), WAIT)  # its report is on its way
            again = await action(serve.port)
            elsewhere = await action(other.port)
            release.set()
            await serve.extras.commitment.wait_idle(WAIT)
            assert [str(r.TransactionUID) for r in reports] == [transaction]
            reused = await action(other.port)
            await other.extras.commitment.wait_idle(WAIT)
    assert first.is_success and reused.is_success
    for status in (again, elsewhere):
        assert int(status) == 0x0115 and "Transaction UID in use" in str(status.error_comment), status
    assert [str(r.TransactionUID) for r in reports] == [transaction] * 2
    assert [[int(f.FailureReason) for f in r.FailedSOPSequence] for r in reports] == [[0x0112], [0x0131]]
    lines = [r.getMessage() for r in logged.records if "Transaction UID is in use" in r.getMessage()]
    assert len(lines) == 2 and all(transaction in line and "OUR_SCU" in line for line in lines)
