"""C-FIND / C-MOVE / C-GET identifiers the archive cannot answer truthfully (PS3.4
C.2.2.2, C.4.1.1.3.1, C.4.2.1.4.1): a sequence key of several items, a numeric or age
string key that is none, a key of a level below the request's. Each is refused 0xA900
Identifier does not match SOP Class naming the key (Offending Element, C.4.1.1.4)
rather than answered Success with matches that mean nothing. pynetdicom is the SCU
against the ``serve`` AE."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pydicom
import pytest
from conftest import free_port
from normalized_helpers import make_instances, running_serve, store
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from test_archive_status import identifier, pynetdicom_requests, worklist_dir

pytestmark = [pytest.mark.timeout(60), pytest.mark.filterwarnings("ignore:Invalid value for VR")]

SERIES_NUMBER, INSTANCE_NUMBER, PATIENT_SIZE, PATIENT_AGE = 0x00200011, 0x00200013, 0x00101020, 0x00101010
SERIES_UID, SOP_INSTANCE = 0x0020000E, 0x00080018


def raw(ds: Dataset, tag: int, vr: str, value: bytes) -> Dataset:
    """``ds`` with an element of undecoded bytes (sent as they are, never validated)."""
    ds[Tag(tag)] = RawDataElement(Tag(tag), vr, len(value), value, 0, True, True)  # type: ignore[assignment]
    return ds


def study(**keys: Any) -> Dataset:
    return identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID="", **keys)


def series(study_uid: str, **keys: Any) -> Dataset:
    return identifier(QueryRetrieveLevel="SERIES", StudyInstanceUID=study_uid, SeriesInstanceUID="", **keys)


def referenced(*uids: str) -> Sequence:
    return Sequence([identifier(ReferencedSOPInstanceUID=uid) for uid in uids])


async def test_find_keys_that_cannot_be_matched_truthfully_are_refused(tmp_path: Path) -> None:
    """A sequence key of two items (C.2.2.2.6: a single item; it was "any of them"),
    IS, DS and AS keys that are no numbers or ages (they matched nothing, or an
    unknown Required value, and said Success), and a key of a level below the query's
    (InstanceNumber in a STUDY query: it was matched against one instance of the study,
    so InstanceNumber 2 found the study and 1 did not). One item, an empty item, a zero
    length lower key and valid numbers still match. A UI key with ``*`` or ``?`` (no
    wild cards in UI, C.2.2.2.4) matched nothing; it is refused too."""
    paths = make_instances(tmp_path / "in", 2, patient_id="PAT1")
    study_uid = str(pydicom.dcmread(paths[0][0]).StudyInstanceUID)
    with_items = study(PatientID="PAT1")
    with_items.ReferencedStudySequence = referenced("1.2", "1.3")
    one_item = study(PatientID="PAT1")
    one_item.ReferencedStudySequence = Sequence([Dataset()])
    nested = identifier(PatientID="PAT1")
    nested.ScheduledProcedureStepSequence = Sequence([Dataset()])
    nested.ScheduledProcedureStepSequence[0].ScheduledProtocolCodeSequence = Sequence([Dataset(), Dataset()])
    from dimse_async.archive.index import Worklist

    worklist = Worklist(worklist_dir(tmp_path / "wl"))
    async with running_serve(tmp_path / "archive", worklist=worklist) as serve:
        await store(serve.port, [p for p, _c, _u in paths])
        got = await asyncio.to_thread(
            pynetdicom_requests,
            serve.port,
            [
                ("find", with_items),
                ("worklist", nested),
                ("find", raw(series(study_uid), SERIES_NUMBER, "IS", b"abc ")),
                ("find", raw(series(study_uid), SERIES_NUMBER, "IS", b"1\\1.5 ")),
                ("find", raw(study(), PATIENT_SIZE, "DS", b"1.5x")),
                ("find", raw(study(), PATIENT_AGE, "AS", b"40 ")),
                ("find", study(InstanceNumber="1")),
                ("find", study(InstanceNumber="2")),
                ("find", raw(series(study_uid), SOP_INSTANCE, "UI", b"1.2.3\x00")),
                ("find", one_item),
                ("find", raw(series(study_uid), SERIES_NUMBER, "IS", b"+1 \\ 2")),
                ("find", raw(study(), PATIENT_SIZE, "DS", b" 1.5e0\\.5")),
                ("find", study(PatientID="PAT1", InstanceNumber="", SOPInstanceUID="*")),
                ("find", identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID="*")),
                ("find", identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID="1.2.3\\1.2.?")),
            ],
        )
    assert got == [
        (0xA900, "ReferencedStudySequence: 2 items, a sequence key has one", [0x00081110]),
        (0xA900, "ScheduledProtocolCodeSequence: 2 items, a sequence key has one", [0x00400008]),
        (0xA900, "SeriesNumber 'abc': not a value of VR IS", [SERIES_NUMBER]),
        (0xA900, "SeriesNumber '1.5': not a value of VR IS", [SERIES_NUMBER]),
        (0xA900, "PatientSize '1.5x': not a value of VR DS", [PATIENT_SIZE]),
        (0xA900, "PatientAge '40': not a value of VR AS", [PATIENT_AGE]),
        (0xA900, "InstanceNumber is of the IMAGE level, below STUDY", [INSTANCE_NUMBER]),
        (0xA900, "InstanceNumber is of the IMAGE level, below STUDY", [INSTANCE_NUMBER]),
        (0xA900, "SOPInstanceUID is of the IMAGE level, below SERIES", [SOP_INSTANCE]),
        (0, "1 matches", []),
        (0, "1 matches", []),
        (0, "0 matches", []),  # valid, but no instance has a Patient's Size
        (0, "1 matches", []),
        (0xA900, "StudyInstanceUID '*': no wild cards in UI", [0x0020000D]),
        (0xA900, "StudyInstanceUID '1.2.?': no wild cards in UI", [0x0020000D]),
    ]


async def test_lower_level_keys_are_returned_zero_length(tmp_path: Path) -> None:
    """A zero-length key of a level below the query's is returned zero-length, not
    one instance's value (two instances, InstanceNumber 1 and 2: a STUDY has neither)."""
    paths = make_instances(tmp_path / "in", 2, patient_id="PAT1")
    import dimse_async as da
    from dimse_async.services.qr import MODELS

    async with running_serve(tmp_path / "archive") as serve:
        await store(serve.port, [p for p, _c, _u in paths])
        ae = da.AE("OURS")
        ae.add_requested_context(MODELS["study"]["find"])
        async with ae.associate("127.0.0.1", serve.port, "ARCHIVE") as assoc:
            found = [m async for m in assoc.c_find(study(InstanceNumber="", Rows=None), "study")]
    assert len(found) == 1
    assert found[0]["InstanceNumber"].value is None and found[0]["Rows"].value is None, found[0]


async def test_retrieve_with_a_unique_key_below_its_level_is_refused(tmp_path: Path) -> None:
    """A STUDY C-MOVE or C-GET also naming a Series Instance UID: the keys allowed are
    those of the retrieve level and above (PS3.4 C.4.2.1.4.1, C.4.3.1.3.1); it used to
    narrow the study to that series and answer Success. A zero-length one is ignored."""
    paths = make_instances(tmp_path / "in", 1, patient_id="PAT1")
    ds = pydicom.dcmread(paths[0][0])
    study_uid, series_uid = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)

    def retrieve(series: str) -> Dataset:
        return identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID=study_uid, SeriesInstanceUID=series)

    known = {"DEST": ("127.0.0.1", free_port())}  # never reached: refused before
    async with running_serve(tmp_path / "archive", known_aes=known) as serve:
        await store(serve.port, [p for p, _c, _u in paths])
        got = await asyncio.to_thread(
            pynetdicom_requests, serve.port, [("move", retrieve(series_uid)), ("get", retrieve(series_uid))]
        )
    below = (0xA900, "SeriesInstanceUID is of the SERIES level, below STUDY", [SERIES_UID])
    assert got == [below, below]


async def test_study_date_keys_of_reduced_precision_or_the_acr_nema_form_match(tmp_path: Path) -> None:
    """A Study Date key of a year or a month (a period, C.2.2.2.1, as the matcher takes
    it) or in the ACR-NEMA form ``YYYY.MM.DD``, and ranges open on one side (C.2.2.2.5):
    the index no longer narrows by the key's text as if it were a full date (``2020``
    found nothing dated 20200315, though the matcher would have matched it), nor by
    the two ends of a list holding a range (``20200315\\20190101-20191231``)."""
    (path, _c, _u), = make_instances(tmp_path / "in", 1, patient_id="PAT1")
    ds = pydicom.dcmread(path)
    ds.StudyDate = "20200315"
    ds.save_as(path)
    dates = ["2020", "202003", "2020.03.15", "20200315", "-20200315", "20200315-", "20200316-", "-20200314", "2019"]
    dates += ["20200315\\20190101-20191231", "20190101-20191231\\20200315", "20190101-20191231\\20210101"]
    async with running_serve(tmp_path / "archive") as serve:
        await store(serve.port, [path])
        got = await asyncio.to_thread(pynetdicom_requests, serve.port, [("find", study(StudyDate=d)) for d in dates])
    assert [comment for _s, comment, _t in got] == [f"{n} matches" for n in (1, 1, 1, 1, 1, 1, 0, 0, 0, 1, 1, 0)]


async def test_request_without_an_identifier_is_refused(tmp_path: Path) -> None:
    """A C-FIND-RQ announcing no data set (Data Set Type 0101H; the Identifier is
    mandatory, PS3.7 §9.1.2.1): 0xA900 "Identifier missing", for the worklist too (it
    answered every item as if all keys were universal)."""
    from rawpeer import RawPeer, command_bytes, pdata, response_status

    from dimse_async.acse import ContextSpec, build_request
    from dimse_async.archive.index import Worklist
    from dimse_async.dimse import Command, CommandField
    from dimse_async.services.qr import MODELS

    worklist = Worklist(worklist_dir(tmp_path / "wl"))
    models = [MODELS["worklist"]["find"], MODELS["study"]["find"]]
    rq = build_request("ARCHIVE", "RAW", [ContextSpec(m, ["1.2.840.10008.1.2"]) for m in models], max_pdu=65536).encode()
    got = []
    async with running_serve(tmp_path / "archive", worklist=worklist) as serve:
        peer = await RawPeer.connect(serve.port)
        try:
            await peer.associate(rq)
            for ctx, model in zip((1, 3), models, strict=True):
                cmd = Command(CommandField.C_FIND_RQ, message_id=ctx, affected_sop_class_uid=model, priority=0)
                await peer.send(pdata(ctx, command_bytes(cmd), command=True))
                while True:  # the responses' statuses up to the final one
                    pdu = await peer.read_pdu()
                    assert pdu is not None and pdu[0] == 0x04, pdu
                    if pdu[11] & 0x01:  # a command set (not a match's data set)
                        got.append(response_status(pdu))
                        if got[-1][1] not in (0xFF00, 0xFF01):
                            break
            await peer.release()
        finally:
            await peer.close()
    assert got == [(0x8020, 0xA900), (0x8020, 0xA900)]


async def test_retrieve_ae_title_and_instance_availability_are_keys_too(tmp_path: Path) -> None:
    """Retrieve AE Title and Instance Availability (PS3.4 C.4.1.1.3.2) with a value
    match where the instances are (this AE, ONLINE): they matched nothing, no candidate
    had them; a zero-length Instance Availability is returned ONLINE."""
    (path, _c, _u), = make_instances(tmp_path / "in", 1, patient_id="PAT1")
    import dimse_async as da
    from dimse_async.services.qr import MODELS

    keys = [
        {"RetrieveAETitle": "ARCHIVE"}, {"RetrieveAETitle": "ELSEWHERE"},
        {"InstanceAvailability": "ONLINE"}, {"InstanceAvailability": "OFFLINE"},
    ]  # fmt: skip
    async with running_serve(tmp_path / "archive") as serve:
        await store(serve.port, [path])
        got = await asyncio.to_thread(pynetdicom_requests, serve.port, [("find", study(**k)) for k in keys])
        ae = da.AE("OURS")
        ae.add_requested_context(MODELS["study"]["find"])
        async with ae.associate("127.0.0.1", serve.port, "ARCHIVE") as assoc:
            found = [m async for m in assoc.c_find(study(InstanceAvailability=""), "study")]
    assert [comment for _s, comment, _t in got] == ["1 matches", "0 matches", "1 matches", "0 matches"]
    assert [m.InstanceAvailability for m in found] == ["ONLINE"]


def test_reversed_ranges_are_no_keys() -> None:
    """A DA, TM or DT range is ``<a> - <b>`` with ``a`` not after ``b`` (PS3.4
    C.2.2.2.5); periods of reduced precision compare start of the lower with end of the
    upper, DT readings in UTC when both carry an offset."""
    from dimse_async.archive.date_ranges import key_problem

    assert [key_problem(k, "DA") for k in ("20200101-20201231", "2020-2020", "2020-202001", "20201231-20200101")] == [
        None, None, None, "lower end after upper end",
    ]  # fmt: skip
    assert [key_problem(k, "TM") for k in ("0800-1700", "10-1030", "1030-1029", "230000-010000")] == [
        None, None, "range crosses midnight", "range crosses midnight",
    ]  # fmt: skip
    dt = ("20200101120000+0500-20200101080000+0000", "20200101120000-20200101080000", "2021-2020", "2020-")
    assert [key_problem(k, "DT") for k in dt] == [None, "lower end after upper end", "lower end after upper end", None]
    assert key_problem("2020-13", "DA") == "not a DA value or range"


async def test_reversed_date_and_time_ranges_are_refused(tmp_path: Path) -> None:
    """A Study Date range whose lower end is after its upper end, and a Study Time
    range crossing midnight (PS3.4 C.2.2.2.5: not supported), matched nothing and
    answered Success: refused 0xA900 naming the key. The same ranges the right way
    round still match."""
    (path, _c, _u), = make_instances(tmp_path / "in", 1, patient_id="PAT1")
    ds = pydicom.dcmread(path)
    ds.StudyDate, ds.StudyTime = "20200315", "233000"
    ds.save_as(path)
    keys = [
        {"StudyDate": "20201231-20200101"}, {"StudyTime": "230000-010000"}, {"StudyDate": "20200101-20201231"},
        {"StudyTime": "230000-235959"}, {"StudyDate": "20190101-20191231\\20201231-20200101"},
    ]  # fmt: skip
    async with running_serve(tmp_path / "archive") as serve:
        await store(serve.port, [path])
        got = await asyncio.to_thread(pynetdicom_requests, serve.port, [("find", study(**k)) for k in keys])
    study_date, study_time = [0x00080020], [0x00080030]
    assert got == [
        (0xA900, "StudyDate '20201231-20200101': lower end after upper end", study_date),
        (0xA900, "StudyTime '230000-010000': range crosses midnight", study_time),
        (0, "1 matches", []),
        (0, "1 matches", []),
        (0xA900, "StudyDate '20201231-20200101': lower end after upper end", study_date),
    ]


async def test_sequence_keys_of_several_items_deep_down_are_refused(tmp_path: Path) -> None:
    """A sequence key of two items nested ten sequences deep (past the depth the keys'
    values are checked to), or inside a private sequence (whose keys are taken as
    they are): the matcher refused it with SequenceKeyError, answered 0xC000 "Unable
    to process" with an ERROR line; it is refused 0xA900 naming it, as one at the top."""
    (path, _c, _u), = make_instances(tmp_path / "in", 1, patient_id="PAT1")
    deep = study(PatientID="PAT1")
    inner = deep
    for _ in range(10):
        inner.ReferencedStudySequence = Sequence([Dataset()])
        inner = inner.ReferencedStudySequence[0]
    inner.ReferencedSeriesSequence = referenced("1.2", "1.3")
    private = study(PatientID="PAT1")
    private.private_block(0x0009, "DIMSE_ASYNC TEST", create=True).add_new(0x01, "SQ", Sequence([Dataset()]))
    private[0x00091001].value[0].ReferencedStudySequence = referenced("1.2", "1.3")
    async with running_serve(tmp_path / "archive") as serve:
        await store(serve.port, [path])
        got = await asyncio.to_thread(pynetdicom_requests, serve.port, [("find", deep), ("find", private)])
    assert got == [
        (0xA900, "ReferencedSeriesSequence: 2 items, a sequence key has one", [0x00081115]),
        (0xA900, "ReferencedStudySequence: 2 items, a sequence key has one", [0x00081110]),
    ]
