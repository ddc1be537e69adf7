"""The archive's C-service failure answers (PS3.7 Annex C; PS3.4 Tables B.2-1, C.4-1,
C.4-2, C.4-3): each refusal carries its Error Comment (0000,0902) and, where the
status allows one and the fault is known, the Offending Element (0000,0901), as a
pynetdicom SCU reads them and as our SCU hands them on (``Status.attributes``)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pydicom
import pytest
from conftest import free_port
from normalized_helpers import HOST, make_instances, park, running_serve, store
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

import dimse_async as da
from dimse_async.services.qr import MODELS

pytestmark = pytest.mark.timeout(60)

QR_LEVEL, STUDY_UID, SERIES_UID, SOP_INSTANCE = 0x00080052, 0x0020000D, 0x0020000E, 0x00080018
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def identifier(**keys: Any) -> Dataset:
    ds = Dataset()
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def tags(value: Any) -> list[int]:
    """An Offending Element value as pynetdicom hands it over (one tag, or a list)."""
    if value is None:
        return []
    return [int(t) for t in value] if isinstance(value, list | pydicom.multival.MultiValue) else [int(value)]


def pynetdicom_requests(port: int, requests: list[tuple[str, Dataset]]) -> list[tuple[int, str, list[int]]]:
    """Each (operation, identifier) sent by pynetdicom on one association: the final
    response's (status, Error Comment, Offending Element); a C-FIND's matches are
    counted into the comment (``"<n> matches"``) when it succeeds."""
    from pynetdicom import AE as PynetAE  # type: ignore[import-untyped]

    scu = PynetAE(ae_title="PYNET")
    for op in ("find", "move", "get"):
        scu.add_requested_context(MODELS["study"][op])
    scu.add_requested_context(MODELS["patient"]["find"])
    scu.add_requested_context(MODELS["worklist"]["find"])
    assoc = scu.associate(HOST, port, ae_title="ARCHIVE")
    assert assoc.is_established
    out = []
    try:
        for op, query in requests:
            park(assoc)
            if op in ("find", "worklist"):
                responses = list(assoc.send_c_find(query, MODELS["study" if op == "find" else "worklist"]["find"]))
            elif op == "move":
                responses = list(assoc.send_c_move(query, "DEST", MODELS["study"]["move"]))
            else:
                responses = list(assoc.send_c_get(query, MODELS["study"]["get"]))
            status = responses[-1][0]
            comment = str(status.get("ErrorComment", ""))
            if op in ("find", "worklist") and status.Status == 0:
                comment = f"{len(responses) - 1} matches"
            out.append((int(status.Status), comment, tags(status.get("OffendingElement"))))
    finally:
        assoc.release()
    return out


def with_level_as(vr: str, value: Any) -> Dataset:
    """A STUDY identifier whose Query/Retrieve Level (0008,0052) is sent with ``vr``."""
    ds = identifier(StudyInstanceUID="1.2.3")
    ds.add_new(QR_LEVEL, vr, value)
    return ds


async def test_query_and_retrieve_refusals_name_the_offending_element(tmp_path: Path) -> None:
    """A C-FIND without a Query/Retrieve Level, a SERIES C-FIND without the study's
    UID, a C-MOVE and a C-GET without the unique key of their level, one at a level
    the model lacks, and levels sent as a sequence or a number: 0xA900 Identifier does not match SOP Class, each with its Error
    Comment and the key at fault as Offending Element (PS3.4 C.4.1.1.4, C.4.2.1.5,
    C.4.3.1.4; dcm4che names (0008,0052) the same way)."""
    known = {"DEST": (HOST, free_port())}  # never reached: refused before
    async with running_serve(tmp_path / "archive", known_aes=known) as serve:
        got = await asyncio.to_thread(
            pynetdicom_requests,
            serve.port,
            [
                ("find", identifier(PatientID="X", StudyInstanceUID="")),
                ("find", identifier(QueryRetrieveLevel="SERIES", SeriesInstanceUID="")),
                ("move", identifier(QueryRetrieveLevel="STUDY", PatientID="X")),
                ("get", identifier(QueryRetrieveLevel="SERIES", StudyInstanceUID="1.2.3")),
                ("find", identifier(QueryRetrieveLevel="PATIENT", PatientID="X")),
                ("find", with_level_as("SQ", Sequence([identifier(PatientID="X")]))),
                ("move", with_level_as("US", 1)),
            ],
        )
        assert got == [
            (0xA900, "Query/Retrieve Level missing", [QR_LEVEL]),
            (0xA900, "SERIES query needs one StudyInstanceUID (no relational queries)", [STUDY_UID]),
            (0xA900, "StudyInstanceUID is required at STUDY level", [STUDY_UID]),
            (0xA900, "SeriesInstanceUID is required at SERIES level", [SERIES_UID]),
            (0xA900, "Query level 'PATIENT' not valid for this model", [QR_LEVEL]),
            (0xA900, "Query/Retrieve Level sent as SQ, not CS", [QR_LEVEL]),
            (0xA900, "Query/Retrieve Level sent as US, not CS", [QR_LEVEL]),
        ]

        ae = da.AE("OURS")
        ae.add_requested_context(MODELS["study"]["find"])
        async with ae.associate(HOST, serve.port, "ARCHIVE") as assoc:
            async with assoc.c_find(identifier(QueryRetrieveLevel="IMAGE", StudyInstanceUID="1.2"), "study") as rsp:
                assert [m async for m in rsp] == []
        status = rsp.status
        assert status is not None and int(status) == 0xA900 and status.attributes == (SERIES_UID,), repr(status)


def mismatched_file(tmp: Path) -> tuple[Path, str]:
    """A Part 10 file whose file meta names another SOP Instance UID than its data set:
    an SCU sending it by its meta puts that UID in Affected SOP Instance UID."""
    path, _cls, _uid = make_instances(tmp, 1)[0]
    ds = pydicom.dcmread(path)
    other = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = other
    ds.save_as(path, enforce_file_format=False)
    return path, other


def bad_vr_file(tmp: Path) -> Path:
    """A Part 10 file whose Patient's Name (0010,0010) has the VR bytes 00H 00H."""
    path, _cls, _uid = make_instances(tmp, 1)[0]
    data = path.read_bytes()
    at = data.index(b"\x10\x00\x10\x00PN")
    path.write_bytes(data[: at + 4] + b"\x00\x00" + data[at + 6 :])
    return path


async def test_store_refusals_name_the_offending_element(tmp_path: Path) -> None:
    """A C-STORE whose Affected SOP Instance UID is not the data set's (0008,0018):
    0xA900 Data Set does not match SOP Class with (0008,0018) as Offending Element;
    one whose data set has an element with an invalid VR: 0xC000 Cannot understand
    with that element (PS3.4 Table B.2-1), to pynetdicom; nothing stored."""
    from pynetdicom import AE as PynetAE

    mismatched, _other = mismatched_file(tmp_path / "in")
    bad_vr = bad_vr_file(tmp_path / "bad")
    async with running_serve(tmp_path / "archive") as serve:

        def pynet_store(path: Path) -> tuple[int, str, list[int]]:
            from pynetdicom import _config

            scu = PynetAE(ae_title="PYNET")
            scu.add_requested_context(CT_IMAGE_STORAGE, pydicom.uid.ExplicitVRLittleEndian)
            assoc = scu.associate(HOST, serve.port, ae_title="ARCHIVE")
            assert assoc.is_established
            chunked, _config.STORE_SEND_CHUNKED_DATASET = _config.STORE_SEND_CHUNKED_DATASET, True
            try:
                park(assoc)
                status = assoc.send_c_store(path)  # streamed from the file, by its file meta's UIDs
            finally:
                _config.STORE_SEND_CHUNKED_DATASET = chunked
                assoc.release()
            return int(status.Status), str(status.get("ErrorComment", "")), tags(status.get("OffendingElement"))

        assert await asyncio.to_thread(pynet_store, mismatched) == (
            0xA900,
            "Data set SOP Instance UID differs from the command's",
            [SOP_INSTANCE],
        )
        status, comment, offending = await asyncio.to_thread(pynet_store, bad_vr)
        assert (status, offending) == (0xC000, [0x00100010]) and comment.startswith("Cannot understand: invalid VR")
        assert await serve.archive.count() == 0


async def test_our_scu_hands_on_the_offending_element_of_a_c_store_response(tmp_path: Path) -> None:
    """A pynetdicom Storage SCP answering 0xC000 with an Offending Element and an Error
    Comment: our C-STORE's status carries both (``attributes``, ``error_comment``)."""
    from pynetdicom import AE as PynetAE
    from pynetdicom import evt

    def refuse(event: Any) -> Dataset:
        status = Dataset()
        status.Status = 0xC001
        status.ErrorComment = "PatientName garbled"
        status.OffendingElement = [0x00100010, 0x00100020]
        return status

    path, sop_class, _uid = make_instances(tmp_path / "in", 1)[0]
    scp = PynetAE(ae_title="PYNETSCP")
    scp.add_supported_context(sop_class, pydicom.uid.ExplicitVRLittleEndian)
    port = free_port()
    server = scp.start_server((HOST, port), block=False, evt_handlers=[(evt.EVT_C_STORE, refuse)])
    try:
        ae = da.AE("OURS")
        ae.add_requested_context(sop_class)
        async with ae.associate(HOST, port, "PYNETSCP") as assoc:
            status = await assoc.c_store(path)
    finally:
        await asyncio.to_thread(server.shutdown)
    assert int(status) == 0xC001 and status.error_comment == "PatientName garbled", repr(status)
    assert status.attributes == (0x00100010, 0x00100020), repr(status)


@pytest.mark.filterwarnings("ignore:Found unknown escape sequence")  # pynetdicom logging its request
async def test_a_query_in_a_character_set_we_do_not_know_is_refused(tmp_path: Path) -> None:
    """A C-FIND whose Specific Character Set names no repertoire we know (PS3.3
    C.12.1.1.2; PS3.4 C.2.2.2 leaves matching then to the SCP): keys with bytes outside
    the default repertoire cannot be read as the peer meant them: 0xC000 Unable to
    process with (0008,0005) and the key as Offending Element and the term in the Error
    Comment, for the Q/R and worklist models alike (they used to be matched as Latin-1
    and answered Success). Keys in the default repertoire alone are matched as such;
    the known repertoires, and an empty first value (the default one, PS3.5
    §6.1.2.5.3), are matched as before."""
    path, _cls, _uid = make_instances(tmp_path / "in", 1, patient_id="PAT1")[0]
    ds = pydicom.dcmread(path)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "Müller^Hans"
    ds.save_as(path)

    def query(charset: str | None, name: bytes = b"M*") -> Dataset:
        q = identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID="")
        if charset is not None:
            q.add_new(0x00080005, "CS", charset)
        q.add_new(0x00100010, "PN", name)  # the bytes as they go out
        return q

    async with running_serve(tmp_path / "archive") as serve:
        await store(serve.port, [path])
        with pytest.warns(UserWarning, match="Unknown encoding"):  # pydicom's, encoding pynetdicom's requests
            got = await asyncio.to_thread(
                pynetdicom_requests,
                serve.port,
                [
                    ("find", query("ISO_IR 999", b"M\xfcller*")),
                    ("find", query("ISO_IR 100\\ISO 2022 IR 999", b"M\x1b$BF|\x1b(B*")),
                    ("worklist", query("ISO_IR 999", b"M\xfc*")),
                    ("find", query("ISO_IR 999", b"M*")),
                    ("find", query("ISO_IR 100", b"M\xfcller*")),
                    ("find", query("\\ISO 2022 IR 87")),
                    ("find", query(None)),
                ],
            )
    refused = [0x00080005, 0x00100010]
    assert got == [
        (0xC000, "Specific Character Set 'ISO_IR 999' not supported", refused),
        (0xC000, "Specific Character Set 'ISO 2022 IR 999' not supported", refused),
        (0xC000, "Specific Character Set 'ISO_IR 999' not supported", refused),
        (0, "1 matches", []),
        (0, "1 matches", []),
        (0, "1 matches", []),
        (0, "1 matches", []),
    ]


def worklist_dir(directory: Path) -> Path:
    """One worklist item of patient PAT1, a CT step."""
    directory.mkdir(parents=True)
    item = identifier(PatientName="Work^List", PatientID="PAT1", AccessionNumber="ACC1")
    item.ScheduledProcedureStepSequence = Sequence([identifier(Modality="CT", ScheduledStationAETitle="CT1")])
    item.file_meta = pydicom.dataset.FileMetaDataset()
    item.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    item.save_as(directory / "item.wl", enforce_file_format=False)
    return directory


@pytest.mark.filterwarnings("ignore:Invalid value for VR")  # pydicom's, encoding pynetdicom's requests
async def test_keys_of_the_wrong_kind_of_vr_are_refused_and_timezone_is_no_key(tmp_path: Path) -> None:
    """A C-FIND key sent with a VR of another kind than its attribute's (a sequence for
    Patient ID, binary for Study Date; in a worklist step item, binary for Modality)
    names nothing stored: 0xA900 with the key as Offending Element, no longer Success
    with no matches. Timezone Offset From UTC (0008,0201) says in which timezone the
    date and time keys are (PS3.4 C.4.1.1.3.1), it is no key: the query matches as
    without it (it used to match nothing) and the response has none of it. A DA, TM
    or DT key that is neither a value nor a range of them (C.2.2.2.5) is refused
    0xA900 naming it (it used to match nothing, or anything when nothing was stored)."""
    from dimse_async.archive.index import Worklist

    path, _cls, _uid = make_instances(tmp_path / "in", 1, patient_id="PAT1")[0]

    def study(**keys: Any) -> Dataset:
        return identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID="", **keys)

    def raw(ds: Dataset, tag: int, vr: str, value: Any) -> Dataset:
        ds.add_new(tag, vr, value)
        return ds

    def step(modality: Any, vr: str) -> Dataset:
        q = identifier(PatientID="PAT1")
        q.ScheduledProcedureStepSequence = Sequence([raw(Dataset(), 0x00080060, vr, modality)])
        return q

    def step_time(time: str) -> Dataset:
        q = identifier(PatientID="PAT1")
        q.ScheduledProcedureStepSequence = Sequence([identifier(ScheduledProcedureStepStartTime=time)])
        return q

    item = identifier(ReferencedSOPInstanceUID="1.2.3")
    worklist = Worklist(worklist_dir(tmp_path / "wl"))
    async with running_serve(tmp_path / "archive", worklist=worklist) as serve:
        await store(serve.port, [path])
        got = await asyncio.to_thread(
            pynetdicom_requests,
            serve.port,
            [
                ("find", raw(study(), 0x00100020, "SQ", Sequence([item]))),
                ("find", raw(study(), 0x00080020, "US", 7)),
                ("worklist", step(1, "US")),
                ("worklist", step("CT", "CS")),
                ("find", study(PatientID="PAT1", TimezoneOffsetFromUTC="+0100")),
                ("worklist", raw(step("CT", "CS"), 0x00080201, "SH", "-0500")),
                ("find", study(StudyDate="2020-13-45x")),
                ("find", study(StudyDate="20200101\\2020011")),
                ("worklist", step_time("25")),
                ("find", study(StudyDate="2019-", StudyTime="0800-1800")),
            ],
        )
        ae = da.AE("OURS")
        ae.add_requested_context(MODELS["study"]["find"])
        async with ae.associate(HOST, serve.port, "ARCHIVE") as assoc:
            matches = [m async for m in assoc.c_find(study(PatientID="PAT1", TimezoneOffsetFromUTC="+0100"), "study")]
        assert len(matches) == 1 and "TimezoneOffsetFromUTC" not in matches[0], matches
    assert got == [
        (0xA900, "PatientID sent as SQ, not LO", [0x00100020]),
        (0xA900, "StudyDate sent as US, not DA", [0x00080020]),
        (0xA900, "Modality sent as US, not CS", [0x00080060]),
        (0, "1 matches", []),
        (0, "1 matches", []),
        (0, "1 matches", []),
        (0xA900, "StudyDate '2020-13-45x': not a DA value or range", [0x00080020]),
        (0xA900, "StudyDate '2020011': not a DA value or range", [0x00080020]),
        (0xA900, "ScheduledProcedureStepStartTime '25': not a TM value or range", [0x00400003]),
        (0, "1 matches", []),
    ]
