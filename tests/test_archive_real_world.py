"""The archive and data as real devices make it: UIDs with leading zeros, empty
Patient IDs, Japanese names in their component groups, study attributes that
differ between instances; and hierarchical retrieves that lack keys (PS3.4 C.4.2.2.1)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pydicom
import pytest
from normalized_helpers import HOST, park, running_serve
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

import dimse_async as da
from dimse_async.services.qr import MODELS

pytestmark = [pytest.mark.timeout(90), pytest.mark.filterwarnings("ignore:Invalid value for VR UI")]

CT = get_testdata_file("CT_small.dcm")
CT_CLASS = "1.2.840.10008.5.1.4.1.1.2"


def identifier(**keys: Any) -> Dataset:
    ds = Dataset()
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def ct(sop: str | None = None, study: str | None = None, series: str | None = None, **attrs: Any) -> Dataset:
    """CT_small with the given UIDs (new ones otherwise) and attributes."""
    ds = pydicom.dcmread(CT)
    ds.SOPInstanceUID = sop or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = series or generate_uid()
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return ds


class Pynet:
    """A pynetdicom requestor on one association (storage, Q/R FIND and GET of both
    models, CT storage as SCP for C-GET), used from a worker thread."""

    def __init__(self, port: int, relational: bool = False):
        from pynetdicom import AE as PynetAE  # type: ignore[import-untyped]
        from pynetdicom import build_role, evt
        from pynetdicom.pdu_primitives import SOPClassExtendedNegotiation  # type: ignore[import-untyped]

        self.received: list[Dataset] = []
        ae = PynetAE(ae_title="PYNET")
        ae.add_requested_context(CT_CLASS, [ExplicitVRLittleEndian])
        for model in ("study", "patient"):
            for op in ("find", "get", "move"):
                ae.add_requested_context(MODELS[model][op])
        extended = []
        if relational:
            for model in ("study", "patient"):
                for op in ("get", "move"):
                    item = SOPClassExtendedNegotiation()
                    item.sop_class_uid = MODELS[model][op]
                    item.service_class_application_information = b"\x01"
                    extended.append(item)

        def on_store(event: Any) -> int:
            self.received.append(event.dataset)
            return 0

        self.assoc = ae.associate(
            HOST, port, ae_title="ARCHIVE", ext_neg=[build_role(CT_CLASS, scu_role=True, scp_role=True), *extended],
            evt_handlers=[(evt.EVT_C_STORE, on_store)],
        )  # fmt: skip
        assert self.assoc.is_established

    def store(self, ds: Dataset) -> int:
        park(self.assoc)
        return int(self.assoc.send_c_store(ds).Status)

    def find(self, query: Dataset, model: str = "study") -> tuple[int, list[Dataset]]:
        park(self.assoc)
        responses = list(self.assoc.send_c_find(query, MODELS[model]["find"]))
        return int(responses[-1][0].Status), [
            ds for status, ds in responses if ds is not None and status.Status in (0xFF00, 0xFF01)
        ]

    def get(self, query: Dataset, model: str = "study") -> tuple[int, list[int]]:
        """C-GET: the final status and its Offending Element."""
        park(self.assoc)
        final = list(self.assoc.send_c_get(query, MODELS[model]["get"]))[-1][0]
        offending = final.get("OffendingElement")
        tags = (
            []
            if offending is None
            else [int(t) for t in offending]
            if isinstance(offending, list)
            else [int(offending)]
        )
        return int(final.Status), tags

    def close(self) -> None:
        self.assoc.release()


# --------------------------------------------------------------------------- UIDs with leading zeros


async def test_uids_with_leading_zero_components_are_stored_found_and_retrieved(
    tmp_path: Path, logged: pytest.LogCaptureFixture
) -> None:
    """SOP Instance, Study and Series UIDs with a component "04" (forbidden by PS3.5
    9.1, made by real modalities; stored by DCMTK storescp and Orthanc): stored with one
    warning line naming the UIDs, then found by them (C-FIND at every level of the
    Study Root) and retrieved by C-GET (pynetdicom)."""
    sop, study, series = "1.2.826.0.1.3680043.04.5", "1.2.826.0.1.3680043.04.6.01", "1.2.826.0.1.3680043.04.7"
    async with running_serve(tmp_path / "arch") as serve:

        def scenario() -> None:
            peer = Pynet(serve.port)
            try:
                assert peer.store(ct(sop, study, series)) == 0
                status, found = peer.find(identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID=study))
                assert (status, [str(d.StudyInstanceUID) for d in found]) == (0, [study])
                query = identifier(QueryRetrieveLevel="IMAGE", StudyInstanceUID=study, SeriesInstanceUID=series,
                                   SOPInstanceUID=sop)  # fmt: skip
                status, found = peer.find(query)
                assert (status, [str(d.SOPInstanceUID) for d in found]) == (0, [sop])
                assert peer.get(query) == (0, [])
                assert [str(d.SOPInstanceUID) for d in peer.received] == [sop]
            finally:
                peer.close()

        await asyncio.to_thread(scenario)
    warned = [r.getMessage() for r in logged.records if "not conformant" in r.getMessage()]
    assert len(warned) == 1 and all(uid in warned[0] for uid in (sop, study, series)), warned


UNSAFE = [
    ("sop", "1.2.3.04.*", 0xC000),
    ("sop", "1.2..3", 0xC000),
    ("sop", "1.2.3a", 0xC000),
    ("sop", "../1.2.3", 0xC000),
    ("sop", "1." + "2" * 64, 0xC000),
    ("study", "1.2/3", 0xA900),
    ("study", "1.2.3.", 0xA900),
    ("series", "1.2.3 4", 0xA900),
    ("series", "1." + "2" * 64, 0xA900),
]


async def test_unsafe_uids_are_still_refused(tmp_path: Path) -> None:
    """What is no UID at all (wild cards, empty components, letters, separators, over
    64 characters) is refused: 0xC000 for the command's SOP Instance UID, 0xA900 for a
    Study or Series UID of the data set; nothing is stored or findable."""
    async with running_serve(tmp_path / "arch") as serve:
        ae = da.AE("OURS")
        ae.add_requested_context(CT_CLASS, [ExplicitVRLittleEndian])
        got = []
        async with ae.associate(HOST, serve.port, "ARCHIVE") as assoc:
            for where, uid, _status in UNSAFE:
                ds = ct(**{where: uid}) if where != "sop" else ct()
                if where == "sop":
                    ds.SOPInstanceUID = uid
                got.append(int(await assoc.c_store(ds)))
        assert got == [status for _w, _u, status in UNSAFE]
        query = identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID="")
        assert await serve.archive.find(MODELS["study"]["find"], query) == []
        assert not list((tmp_path / "arch").rglob("*.dcm"))


# --------------------------------------------------------------------------- re-index: the reason named


async def test_reindex_names_why_a_readable_file_is_not_indexed(
    tmp_path: Path, index: str | None, logged: pytest.LogCaptureFixture
) -> None:
    """At start-up (re-index), a file whose series the index holds under another study,
    and one without a Series Instance UID, are left out with a warning naming the true
    reason, not "unreadable"; a file that does not parse is still called unreadable."""
    from dimse_async.archive.index import Archive

    root = tmp_path / "arch"
    series, shared = generate_uid(), generate_uid()
    first = ct(study=generate_uid(), series=series)
    conflicting = ct(study=generate_uid(), series=series)
    placeless = ct()
    del placeless.SeriesInstanceUID
    for name, ds in (("a", first), ("b", conflicting), ("c", placeless)):
        (root / name).mkdir(parents=True)
        ds.save_as(root / name / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
    (root / "d").mkdir()
    (root / "d" / f"{shared}.dcm").write_bytes((root / "a" / f"{first.SOPInstanceUID}.dcm").read_bytes()[:1000])
    arch = Archive(root, index=index)
    try:
        added, skipped, _gone = await arch.reindex()
    finally:
        arch.close()
    assert (added, skipped) == (1, 3)
    lines = {r.getMessage().split(" path=")[0]: r.getMessage() for r in logged.records if "path=" in r.getMessage()}
    assert sorted(lines) == [
        "archive: re-index: file not indexed: conflicts with the stored hierarchy",
        "archive: re-index: file not indexed: no place in the Q/R hierarchy",
        "archive: skipping unreadable file",
    ], lines
    conflict = lines["archive: re-index: file not indexed: conflicts with the stored hierarchy"]
    assert "Series Instance UID is in another study" in conflict


# --------------------------------------------------------------------------- hierarchical retrieve

STUDY_UID_TAG, SERIES_UID_TAG, PATIENT_ID_TAG = 0x0020000D, 0x0020000E, 0x00100020


async def test_retrieve_without_upper_unique_keys_is_refused_unless_relational_retrieval_was_negotiated(
    tmp_path: Path,
) -> None:
    """PS3.4 C.4.2.2.1 / C.4.3.2.1: a hierarchical C-GET names the unique key of every
    level above its own. Without them: 0xA900 with the missing key as Offending
    Element. With relational retrieval negotiated (SOP Class Extended Negotiation,
    C.5.3.1.1) the same requests retrieve the instance. ``relational_retrieve = false``
    (the strict hierarchy; the default serves them, see the next test)."""
    ds = ct(PatientID="P1")
    sop, study, series = str(ds.SOPInstanceUID), str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
    requests = [
        ("study", identifier(QueryRetrieveLevel="SERIES", SeriesInstanceUID=series), [STUDY_UID_TAG]),
        ("study", identifier(QueryRetrieveLevel="IMAGE", SOPInstanceUID=sop), [STUDY_UID_TAG]),
        ("study", identifier(QueryRetrieveLevel="IMAGE", StudyInstanceUID=study, SOPInstanceUID=sop), [SERIES_UID_TAG]),
        ("patient", identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID=study), [PATIENT_ID_TAG]),
        ("patient", identifier(QueryRetrieveLevel="SERIES", PatientID="P1", SeriesInstanceUID=series), [STUDY_UID_TAG]),
    ]
    complete = [
        ("study", identifier(QueryRetrieveLevel="IMAGE", StudyInstanceUID=study, SeriesInstanceUID=series,
                             SOPInstanceUID=sop)),
        ("patient", identifier(QueryRetrieveLevel="SERIES", PatientID="P1", StudyInstanceUID=study,
                               SeriesInstanceUID=series)),
    ]  # fmt: skip
    async with running_serve(tmp_path / "arch", relational_retrieve=False) as serve:

        def scenario() -> None:
            hierarchical = Pynet(serve.port)
            try:
                assert hierarchical.store(ds) == 0
                got = [hierarchical.get(query, model) for model, query, _tags in requests]
                assert got == [(0xA900, tags) for _m, _q, tags in requests]
                assert not hierarchical.received
                assert [hierarchical.get(query, model) for model, query in complete] == [(0, [])] * 2
                assert len(hierarchical.received) == 2
            finally:
                hierarchical.close()
            relational = Pynet(serve.port, relational=True)
            try:
                assert [relational.get(query, model) for model, query, _t in requests] == [(0, [])] * len(requests)
                assert [str(d.SOPInstanceUID) for d in relational.received] == [sop] * len(requests)
            finally:
                relational.close()

        await asyncio.to_thread(scenario)


async def test_retrieve_without_upper_unique_keys_is_served_by_default(tmp_path: Path) -> None:
    """By default (``relational_retrieve = true``, as Orthanc and dcm4chee-arc) a retrieve
    lacking an upper level's unique key is served by the keys it names: DCMTK ``getscu``
    in its default Patient Root model by Study Instance UID alone, pynetdicom at IMAGE
    level by SOP Instance UID alone, neither negotiating relational retrieval."""
    ds = ct(PatientID="P7")
    sop, study = str(ds.SOPInstanceUID), str(ds.StudyInstanceUID)
    async with running_serve(tmp_path / "arch") as serve:

        def scenario() -> None:
            peer = Pynet(serve.port)
            try:
                assert peer.store(ds) == 0
                image = identifier(QueryRetrieveLevel="IMAGE", SOPInstanceUID=sop)
                assert peer.get(image, "study") == (0, [])
                assert [str(d.SOPInstanceUID) for d in peer.received] == [sop]
            finally:
                peer.close()

        await asyncio.to_thread(scenario)
        out = tmp_path / "got"
        out.mkdir()
        args = ["/usr/bin/getscu", "-aec", "ARCHIVE", "-od", str(out), "-k", "QueryRetrieveLevel=STUDY",
                "-k", f"StudyInstanceUID={study}", HOST, str(serve.port)]  # fmt: skip
        proc = await asyncio.create_subprocess_exec(
            *args, env={**os.environ, "TCP_NODELAY": "1"}, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        try:
            text, _ = await asyncio.wait_for(proc.communicate(), 60)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.returncode == 0, text.decode(errors="replace")
        got = list(out.iterdir())
        assert len(got) == 1 and str(pydicom.dcmread(got[0]).SOPInstanceUID) == sop, text.decode(errors="replace")


# --------------------------------------------------------------------------- patients without an ID


async def test_instances_without_patient_id_are_navigable_in_the_patient_root(tmp_path: Path) -> None:
    """Patient ID is Type 2: instances with an empty or absent one are found at every
    level of the Patient Root model and retrieved, their patient's unique key being the
    empty Patient ID a PATIENT level C-FIND answers for them; a patient with an ID is not
    among them. (Hierarchical: the Patient ID key is sent, without a value.)"""
    empty, absent, other = ct(PatientID="", PatientName="Anon^One"), ct(PatientName="Anon^Two"), ct(PatientID="P1")
    del absent.PatientID
    async with running_serve(tmp_path / "arch") as serve:

        def scenario() -> None:
            peer = Pynet(serve.port)
            try:
                assert [peer.store(ds) for ds in (empty, absent, other)] == [0, 0, 0]
                status, patients = peer.find(identifier(QueryRetrieveLevel="PATIENT", PatientID="", PatientName=""),
                                             "patient")  # fmt: skip
                assert status == 0
                assert sorted((str(p.PatientID), str(p.PatientName)) for p in patients) == [
                    ("", "Anon^One"), ("", "Anon^Two"), ("P1", "CompressedSamples^CT1")]  # fmt: skip
                no_id = identifier(QueryRetrieveLevel="STUDY", PatientID="", StudyInstanceUID="")
                status, studies = peer.find(no_id, "patient")
                want = sorted([str(empty.StudyInstanceUID), str(absent.StudyInstanceUID)])
                assert (status, sorted(str(s.StudyInstanceUID) for s in studies)) == (0, want)
                for ds in (empty, absent):
                    series = identifier(QueryRetrieveLevel="SERIES", PatientID="", StudyInstanceUID=ds.StudyInstanceUID,
                                        SeriesInstanceUID="")  # fmt: skip
                    status, found = peer.find(series, "patient")
                    assert (status, [str(s.SeriesInstanceUID) for s in found]) == (0, [str(ds.SeriesInstanceUID)])
                    image = identifier(QueryRetrieveLevel="IMAGE", PatientID="", StudyInstanceUID=ds.StudyInstanceUID,
                                       SeriesInstanceUID=ds.SeriesInstanceUID, SOPInstanceUID=ds.SOPInstanceUID)  # fmt: skip
                    status, found = peer.find(image, "patient")
                    assert (status, [str(s.SOPInstanceUID) for s in found]) == (0, [str(ds.SOPInstanceUID)])
                    assert peer.get(image, "patient") == (0, [])
                    study = identifier(QueryRetrieveLevel="STUDY", PatientID="", StudyInstanceUID=ds.StudyInstanceUID)
                    assert peer.get(study, "patient") == (0, [])
                # The patient with an ID is not the patient without one.
                wrong = identifier(QueryRetrieveLevel="STUDY", PatientID="", StudyInstanceUID=other.StudyInstanceUID)
                assert peer.get(wrong, "patient") == (0, [])
                assert sorted(str(d.SOPInstanceUID) for d in peer.received) == sorted(
                    [str(empty.SOPInstanceUID)] * 2 + [str(absent.SOPInstanceUID)] * 2)  # fmt: skip
            finally:
                peer.close()

        await asyncio.to_thread(scenario)


# --------------------------------------------------------------------------- Person Name component groups

_SINGLE_IR87 = b"ISO 2022 IR 87  "  # the two-value form's length: patched in place


def charset_instances(directory: Path) -> list[Path]:
    """pydicom's Japanese (ISO 2022 IR 87 with and without ISO 2022 IR 13) and Chinese
    (ISO_IR 192) names, and one named ``=山田^花子`` (no alphabetic group) whose Specific
    Character Set is ``ISO 2022 IR 87`` alone, as some devices write it."""
    from pydicom.data import get_charset_files

    files = {Path(f).name: f for f in get_charset_files()}
    out = []
    for name, patient in (("chrH31.dcm", "J31"), ("chrH32.dcm", "J32"), ("chrX1.dcm", "X1"), ("chrH31.dcm", "H1")):
        ds = pydicom.dcmread(files[name])
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.PatientID = generate_uid(), generate_uid(), patient
        if patient == "H1":
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.PatientName = "=山田^花子"
        path = directory / f"{patient}.dcm"
        ds.save_as(path, enforce_file_format=True)
        if patient == "H1":
            data = path.read_bytes()
            assert data.count(b"\\ISO 2022 IR 87 ") == 1
            path.write_bytes(data.replace(b"\\ISO 2022 IR 87 ", _SINGLE_IR87))
        out.append(path)
    return out


def jis(text: str) -> str:
    """``text`` as ISO 2022 IR 87 bytes (escape sequences, 7 bits), for a DCMTK argument."""
    return text.encode("iso2022_jp").decode("ascii")


async def test_person_name_keys_match_by_component_group_in_real_character_sets(
    tmp_path: Path,
) -> None:
    """Names stored in ISO 2022 IR 87 (with ISO 2022 IR 13 too, or alone) and ISO_IR 192,
    queried by DCMTK findscu in those character sets (PS3.5 6.2.1.1 component groups,
    PS3.4 C.2.2.2.1): a key of the ideographic group only (``=山田^太郎``, ``*=山田*``)
    matches that group; a one-group key of ideographic characters (``山田*``) matches
    the ideographic group (an alphabetic group holds none). An instance and a query
    whose Specific Character Set is ``ISO 2022 IR 87`` alone (its alphabetic group
    empty) are read with the default repertoire first: stored, indexed, matched."""
    from conftest import acknowledged, communicate, dcmtk

    src = tmp_path / "src"
    src.mkdir()
    files = charset_instances(src)
    async with running_serve(tmp_path / "arch") as serve:
        code, out, _ = await communicate(
            (dcmtk("storescu"), "-v", "-aec", "ARCHIVE", HOST, str(serve.port), *map(str, files)), merge_stderr=True
        )
        assert code == 0 and len(acknowledged(out)) == 4, out

        async def find(charset: str, key: str) -> list[str]:
            code, out, _ = await communicate(
                (dcmtk("findscu"), "-v", "-S", "-aec", "ARCHIVE", "-k", "QueryRetrieveLevel=STUDY", "-k",
                 "StudyInstanceUID", "-k", "PatientID", "-k", f"SpecificCharacterSet={charset}", "-k",
                 f"PatientName={key}", HOST, str(serve.port)),
                merge_stderr=True,
            )  # fmt: skip
            assert code == 0 and "Final Find Response (Success)" in out, out
            return sorted(
                line.split("[")[1].split("]")[0].strip() for line in out.splitlines() if "(0010,0020) LO [" in line
            )

        assert await find("ISO 2022 IR 87", jis("=山田^太郎")) == ["J31", "J32"]
        assert await find("\\ISO 2022 IR 87", jis("*=山田*")) == ["H1", "J31", "J32"]
        assert await find("ISO 2022 IR 87", jis("=山田^花子")) == ["H1"]
        assert await find("ISO_IR 192", "=山田^太郎") == ["J31", "J32"]
        assert await find("ISO_IR 192", "=王^小東") == ["X1"]
        assert await find("ISO_IR 192", "山田*") == ["H1", "J31", "J32"]
        assert await find("ISO_IR 192", "Yamada*") == ["J31"]


# --------------------------------------------------------------------------- study attributes that disagree


async def test_attributes_of_the_first_instance_stored_are_kept_and_supplemented(
    tmp_path: Path, index: str | None
) -> None:
    """Two instances of one study, series and patient that disagree (Study Description,
    Series Description, Patient's Name): the first stored names them, the later one
    changes nothing it disagrees on but adds what the first lacked (Accession Number),
    found by it; a query for the later values finds nothing (as dcm4chee-arc's default
    SUPPLEMENT policy and Orthanc). A study whose only instance is stored again
    (``duplicates = "replace"``) takes its new values."""
    study, series = generate_uid(), generate_uid()
    first = ct(study=study, series=series, PatientID="P9", PatientName="Doe^First", StudyDescription="First",
               AccessionNumber="", SeriesDescription="Axial")  # fmt: skip
    second = ct(study=study, series=series, PatientID="P9", PatientName="Doe^Second", StudyDescription="Second",
                AccessionNumber="ACC2", SeriesDescription="Coronal")  # fmt: skip
    alone = ct(PatientID="P8", StudyDescription="Before", AccessionNumber="A8")
    again = pydicom.dcmread(CT)
    again.update(alone)
    again.StudyDescription = "After"
    study_root = MODELS["study"]["find"]
    async with running_serve(tmp_path / "arch", index=index, duplicates="replace") as serve:
        ae = da.AE("OURS")
        ae.add_requested_context(CT_CLASS, [ExplicitVRLittleEndian])
        async with ae.associate(HOST, serve.port, "ARCHIVE") as assoc:
            assert [int(await assoc.c_store(ds)) for ds in (first, second, alone, again)] == [0, 0, 0, 0]
        found = await serve.archive.find(
            study_root,
            identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID=study, StudyDescription="", AccessionNumber="",
                       PatientName=""),
        )  # fmt: skip
        assert [(str(d.StudyDescription), str(d.AccessionNumber), str(d.PatientName)) for d in found] == [
            ("First", "ACC2", "Doe^First")
        ]
        by_accession = identifier(QueryRetrieveLevel="STUDY", AccessionNumber="ACC2", StudyInstanceUID="")
        assert [str(d.StudyInstanceUID) for d in await serve.archive.find(study_root, by_accession)] == [study]
        later = identifier(QueryRetrieveLevel="STUDY", StudyDescription="Second", StudyInstanceUID="")
        assert await serve.archive.find(study_root, later) == []
        named = identifier(QueryRetrieveLevel="PATIENT", PatientName="Doe^Second", PatientID="")
        assert await serve.archive.find(MODELS["patient"]["find"], named) == []
        series_found = await serve.archive.find(
            study_root,
            identifier(QueryRetrieveLevel="SERIES", StudyInstanceUID=study, SeriesInstanceUID="", SeriesDescription=""),
        )
        assert [str(d.SeriesDescription) for d in series_found] == ["Axial"]
        replaced = identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID=alone.StudyInstanceUID, StudyDescription="")
        assert [str(d.StudyDescription) for d in await serve.archive.find(study_root, replaced)] == ["After"]


async def test_worklist_items_and_queries_in_iso_2022_ir_87_alone(tmp_path: Path) -> None:
    """A worklist item and a worklist C-FIND (DCMTK findscu -W) whose Specific Character
    Set is ``ISO 2022 IR 87`` alone, the name in its ideographic group only: the item is
    read and matched by that group (it was a 0xC000 for the query)."""
    from conftest import communicate, dcmtk
    from pydicom.dataset import FileMetaDataset
    from pydicom.sequence import Sequence

    from dimse_async.archive.index import Worklist

    wl = tmp_path / "wl"
    wl.mkdir()
    item = Dataset()
    item.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    item.PatientName, item.PatientID, item.AccessionNumber = "=山田^太郎", "W1", "ACC1"
    step = Dataset()
    step.Modality, step.ScheduledStationAETitle = "CT", "CT1"
    item.ScheduledProcedureStepSequence = Sequence([step])
    item.file_meta = FileMetaDataset()
    item.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    item.save_as(wl / "item.wl", enforce_file_format=False)
    data = (wl / "item.wl").read_bytes()
    (wl / "item.wl").write_bytes(data.replace(b"\\ISO 2022 IR 87 ", _SINGLE_IR87))
    async with running_serve(tmp_path / "arch", worklist=Worklist(wl)) as serve:
        code, out, _ = await communicate(
            (dcmtk("findscu"), "-v", "-W", "-aec", "ARCHIVE", "-k", "SpecificCharacterSet=ISO 2022 IR 87", "-k",
             f"PatientName={jis('=山田^太郎')}", "-k", "PatientID", "-k", "ScheduledProcedureStepSequence[0].Modality=CT",
             HOST, str(serve.port)),
            merge_stderr=True,
        )  # fmt: skip
    assert code == 0 and "Final Find Response (Success)" in out, out
    assert [line for line in out.splitlines() if "(0010,0020) LO [W1" in line], out
