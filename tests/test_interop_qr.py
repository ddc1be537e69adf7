"""Query/Retrieve and Modality Worklist against real, independent peers: no mocks.

Data: 3 patients x 2 studies x 2 series x 3 instances written with pydicom from
CT_small.dcm / MR_small.dcm with new UIDs and distinct names, IDs, study dates,
accession numbers and modalities (one patient's name is Latin-1, ISO_IR 100).
Every expectation is computed from what pydicom reads back from those files, with
plain Python predicates, never with :mod:`dimse_async.archive.matching`.

1. ``dimse-async serve`` as a process (TOML config), loaded by DCMTK ``storescu``:
   ``findscu`` (patient and study root, every level, wild cards, date ranges, UID
   lists), ``movescu`` (its own storage SCP as the destination; data sets arrive byte
   for byte), ``getscu``, a pynetdicom SCU (C-FIND, C-GET with SCP role, C-MOVE to a
   pynetdicom storage SCP); and the re-index on restart with corrupt, new and deleted
   files.
2. Our SCU against Orthanc: C-FIND in both roots at every level, C-MOVE to our
   storage SCP, C-GET with the storage SCP role.
3. Our SCU against DCMTK ``dcmqrscp``: C-FIND, C-MOVE, C-GET.
4. Worklist: our SCU against ``wlmscpfs`` (files made by ``dump2dcm``), and
   ``findscu -W`` gets identical answers from ``wlmscpfs`` and from ``serve`` with
   the same files.
5. C-CANCEL: our SCU leaves a C-FIND early against real peers (a relay records the
   wire, which decides the precise outcome), and pynetdicom cancels a C-FIND on our
   SCP whose handler yields slowly.

Everything is on 127.0.0.1; every wait is bounded; every process started here is
stopped here.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import copy
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest
from conftest import communicate, dcmtk, free_port, kill_process, stop_process, wait_tcp
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.multival import MultiValue
from pydicom.uid import generate_uid
from pynetdicom import AE as PynetdicomAE
from pynetdicom import build_role, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    MRImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

import dimse_async as da
from dimse_async.part10 import read_file_meta
from dimse_async.services.qr import MODELS
from dimse_async.services.storage import STORAGE_SOP_CLASSES, STORE_TRANSFER_SYNTAXES, DirectoryStore

pytestmark = [pytest.mark.interop, pytest.mark.timeout(120)]

HOST = "127.0.0.1"
WAIT = 30.0  # upper bound for any single wait on a peer
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}  # DCMTK reads it; no Nagle delays on loopback
CLI = [sys.executable, "-m", "dimse_async"]
ORTHANC = "/usr/sbin/Orthanc"

CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
EXPLICIT_LE = "1.2.840.10008.1.2.1"

SERVE_AE = "ARCHIVE"
OUR_AE = "OURS"  # our SCU, and our storage SCP as a C-MOVE destination
MOVESCU_AE = "MOVESCU"
PYNET_DEST_AE = "PYNET_DEST"
WLM_AE = "WLM"  # wlmscpfs: the AE title is the worklist sub-directory

C_FIND_RQ, C_FIND_RSP, C_CANCEL_RQ = 0x0020, 0x8020, 0x0FFF


# --------------------------------------------------------------------------- data

PATIENTS = (
    ("ADAMS^ALICE", "PAT001", "19700101", "F"),
    ("BAKER^BOB", "PAT002", "19800202", "M"),
    ("MÜLLER^CLARA", "PAT003", "19900303", "F"),  # Latin-1: Specific Character Set matters
)
UNIQUE = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID", "IMAGE": "SOPInstanceUID"}
LEVEL_KEYS = {
    "PATIENT": ("PatientName", "PatientID", "PatientBirthDate", "PatientSex"),
    "STUDY": ("StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "StudyID", "StudyDescription"),
    "SERIES": ("SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription"),
    "IMAGE": ("SOPInstanceUID", "SOPClassUID", "InstanceNumber", "Rows", "Columns"),
}
ORDER = ("PATIENT", "STUDY", "SERIES", "IMAGE")
SET_VALUED = frozenset({"ModalitiesInStudy"})  # value order is not significant


def norm(value: Any, keyword: str = "") -> str:
    """A comparable text form of an attribute value: padding stripped, IS as integers,
    multiple values joined with ``\\`` (sorted where order is not significant)."""
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        parts = [norm(v) for v in value]
        return "\\".join(sorted(parts) if keyword in SET_VALUED else parts)
    if isinstance(value, int):
        return str(int(value))
    return str(value).strip(" \x00")


@dataclass
class Corpus:
    root: Path
    files: dict[str, Path]  # SOP Instance UID -> file
    datasets: dict[str, Dataset]  # SOP Instance UID -> data set as pydicom reads it back
    levels: dict[str, dict[str, dict[str, str]]] = field(default_factory=dict)  # level -> unique key -> view

    def entities(self, level: str) -> list[dict[str, str]]:
        return [self.levels[level][k] for k in sorted(self.levels[level])]

    def select(self, level: str, **equal: str) -> list[dict[str, str]]:
        return [e for e in self.entities(level) if all(e[k] == v for k, v in equal.items())]

    def dataset_bytes(self, sop_uid: str) -> bytes:
        return _dataset_bytes(self.files[sop_uid])


def _dataset_bytes(path: Path) -> bytes:
    """The data set of a Part 10 file, as it is encoded in the file."""
    with path.open("rb") as fp:
        meta = read_file_meta(fp)
        assert meta is not None, f"{path} has no file meta"
        fp.seek(meta.dataset_offset)
        return fp.read()


def _views(datasets: Sequence[Dataset]) -> dict[str, dict[str, dict[str, str]]]:
    """Per level, the attributes of each entity (with its parents' attributes) and the
    counts a Q/R SCP may compute (PS3.4 C.3.4)."""
    levels: dict[str, dict[str, dict[str, str]]] = {level: {} for level in ORDER}
    for ds in datasets:
        view: dict[str, str] = {}
        for level in ORDER:
            view = {**view, **{k: norm(ds.get(k), k) for k in LEVEL_KEYS[level]}}
            levels[level].setdefault(view[UNIQUE[level]], view)
    images = levels["IMAGE"].values()
    for pid, patient in levels["PATIENT"].items():
        patient["NumberOfPatientRelatedStudies"] = str(sum(s["PatientID"] == pid for s in levels["STUDY"].values()))
        patient["NumberOfPatientRelatedInstances"] = str(sum(i["PatientID"] == pid for i in images))
    for uid, study in levels["STUDY"].items():
        series = [s for s in levels["SERIES"].values() if s["StudyInstanceUID"] == uid]
        study["ModalitiesInStudy"] = "\\".join(sorted({s["Modality"] for s in series}))
        study["NumberOfStudyRelatedSeries"] = str(len(series))
        study["NumberOfStudyRelatedInstances"] = str(sum(i["StudyInstanceUID"] == uid for i in images))
    for uid, series_view in levels["SERIES"].items():
        series_view["NumberOfSeriesRelatedInstances"] = str(sum(i["SeriesInstanceUID"] == uid for i in images))
    return levels


def make_corpus(root: Path) -> Corpus:
    """3 patients x 2 studies x 2 series x 3 instances; study 1 of each patient has an MR series."""
    root.mkdir(parents=True, exist_ok=True)
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    mr = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    files: dict[str, Path] = {}
    for p, (name, pid, birth, sex) in enumerate(PATIENTS):
        for s in range(2):
            study_uid = generate_uid()
            for se in range(2):
                base = mr if (s == 1 and se == 0) else ct
                series_uid = generate_uid()
                for i in range(3):
                    ds = copy.deepcopy(base)
                    ds.SpecificCharacterSet = "ISO_IR 100"
                    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = name, pid, birth, sex
                    ds.StudyInstanceUID = study_uid
                    ds.StudyDate = f"2021{p + 1:02d}{10 + 5 * s:02d}"  # 20210110 ... 20210315
                    ds.StudyTime = f"{8 + s:02d}{15 * p:02d}00"
                    ds.AccessionNumber = f"ACC{p}{s}"
                    ds.StudyID = f"S{p}{s}"
                    ds.StudyDescription = f"Study {p}.{s}"
                    ds.SeriesInstanceUID = series_uid
                    ds.SeriesNumber = se + 1
                    ds.SeriesDescription = f"{base.Modality} series {se + 1}"
                    ds.SOPInstanceUID = generate_uid()
                    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
                    ds.InstanceNumber = i + 1
                    # DCMTK drops Data Set Trailing Padding when it sends a file (PS3.10 §7.2
                    # allows it); without it every hop can be checked byte for byte.
                    del ds.DataSetTrailingPadding
                    path = root / f"p{p}-st{s}-se{se}-{i}.dcm"
                    ds.save_as(path, enforce_file_format=True)
                    files[ds.SOPInstanceUID] = path
    datasets = {uid: pydicom.dcmread(path) for uid, path in files.items()}
    corpus = Corpus(root, files, datasets, _views(list(datasets.values())))
    counts = {level: len(corpus.levels[level]) for level in ORDER}
    assert counts == {"PATIENT": 3, "STUDY": 6, "SERIES": 12, "IMAGE": 36}, counts
    return corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    return make_corpus(tmp_path_factory.mktemp("qr-data") / "dicom")


# --------------------------------------------------------------------------- queries


@dataclass
class Query:
    """A C-FIND request and, independently, which entities it must return."""

    model: str  # "patient" or "study"
    level: str
    keys: dict[str, str]  # keyword -> key value ("" asks for the value)
    where: Callable[[dict[str, str]], bool]

    def dataset(self, charset: str | None = None) -> Dataset:
        ds = Dataset()
        if charset:
            ds.SpecificCharacterSet = charset
        ds.QueryRetrieveLevel = self.level
        for keyword, value in self.keys.items():
            setattr(ds, keyword, value)
        return ds

    def without(self, keywords: frozenset[str]) -> Query:
        """The same query without the return keys ``keywords``."""
        assert all(self.keys.get(k) == "" for k in keywords & set(self.keys)), "only return keys can go"
        return Query(self.model, self.level, {k: v for k, v in self.keys.items() if k not in keywords}, self.where)

    def findscu_args(self) -> list[str]:
        args = ["-P" if self.model == "patient" else "-S", "-k", f"QueryRetrieveLevel={self.level}"]
        for keyword, value in self.keys.items():
            args += ["-k", f"{keyword}={value}" if value else keyword]
        return args

    def expected(self, corpus: Corpus) -> dict[str, dict[str, str]]:
        unique = UNIQUE[self.level]
        return {e[unique]: {k: e[k] for k in self.keys} for e in corpus.entities(self.level) if self.where(e)}


def build_queries(c: Corpus) -> dict[str, Query]:
    bob_studies = c.select("STUDY", PatientID="PAT002")
    clara_mr_study = c.select("STUDY", PatientID="PAT003", AccessionNumber="ACC21")[0]
    alice_series = c.select("SERIES", PatientID="PAT001")[0]
    clara_series = c.select("SERIES", PatientID="PAT003")[-1]
    two_images = [i["SOPInstanceUID"] for i in c.select("IMAGE", SeriesInstanceUID=alice_series["SeriesInstanceUID"])][
        :2
    ]
    bob_uids = {s["StudyInstanceUID"] for s in bob_studies}
    patient_keys = {"PatientName": "", "PatientID": "", "PatientBirthDate": "", "PatientSex": ""}
    return {
        "patient-all": Query(
            "patient", "PATIENT",
            {**patient_keys, "NumberOfPatientRelatedStudies": "", "NumberOfPatientRelatedInstances": ""},
            lambda e: True,
        ),
        "patient-name-wildcard": Query(
            "patient", "PATIENT", {**patient_keys, "PatientName": "M*"}, lambda e: e["PatientName"].startswith("M")
        ),
        "patient-root-study": Query(
            "patient", "STUDY",
            {"PatientID": "PAT002", "StudyInstanceUID": "", "StudyDate": "", "StudyTime": "", "AccessionNumber": "",
             "StudyID": "", "StudyDescription": ""},
            lambda e: e["PatientID"] == "PAT002",
        ),
        "study-date-range": Query(
            "study", "STUDY",
            {"StudyDate": "20210112-20210310", "PatientName": "", "PatientID": "", "StudyInstanceUID": "",
             "AccessionNumber": "", "ModalitiesInStudy": "", "NumberOfStudyRelatedSeries": "",
             "NumberOfStudyRelatedInstances": ""},
            lambda e: "20210112" <= e["StudyDate"] <= "20210310",
        ),
        "study-open-date-range": Query(
            "study", "STUDY", {"StudyDate": "20210301-", "StudyInstanceUID": "", "PatientID": ""},
            lambda e: e["StudyDate"] >= "20210301",
        ),
        "study-accession-wildcard": Query(
            "study", "STUDY", {"AccessionNumber": "ACC1?", "StudyInstanceUID": "", "PatientID": "", "StudyDate": ""},
            lambda e: e["AccessionNumber"].startswith("ACC1") and len(e["AccessionNumber"]) == 5,
        ),
        "study-name-wildcard": Query(
            "study", "STUDY", {"PatientName": "*^B*", "StudyInstanceUID": "", "PatientID": ""},
            lambda e: e["PatientName"].split("^")[1].startswith("B"),
        ),
        "series-uid-list": Query(
            "study", "SERIES",
            {"StudyInstanceUID": "\\".join(sorted(bob_uids)), "SeriesInstanceUID": "", "Modality": "",
             "SeriesNumber": "", "SeriesDescription": "", "NumberOfSeriesRelatedInstances": ""},
            lambda e: e["StudyInstanceUID"] in bob_uids,
        ),
        "series-modality": Query(
            "study", "SERIES",
            {"StudyInstanceUID": clara_mr_study["StudyInstanceUID"], "Modality": "MR", "SeriesInstanceUID": "",
             "SeriesNumber": ""},
            lambda e: e["StudyInstanceUID"] == clara_mr_study["StudyInstanceUID"] and e["Modality"] == "MR",
        ),
        "image-in-series": Query(
            "study", "IMAGE",
            {"StudyInstanceUID": alice_series["StudyInstanceUID"], "SeriesInstanceUID": alice_series["SeriesInstanceUID"],
             "SOPInstanceUID": "", "SOPClassUID": "", "InstanceNumber": ""},
            lambda e: e["SeriesInstanceUID"] == alice_series["SeriesInstanceUID"],
        ),
        "image-uid-list": Query(
            "study", "IMAGE",
            {"StudyInstanceUID": alice_series["StudyInstanceUID"], "SeriesInstanceUID": alice_series["SeriesInstanceUID"],
             "SOPInstanceUID": "\\".join(two_images), "InstanceNumber": ""},
            lambda e: e["SOPInstanceUID"] in two_images,
        ),
        "patient-root-series": Query(
            "patient", "SERIES",
            {"PatientID": "PAT003", "StudyInstanceUID": clara_series["StudyInstanceUID"], "SeriesInstanceUID": "",
             "Modality": ""},
            lambda e: e["StudyInstanceUID"] == clara_series["StudyInstanceUID"],
        ),
        "patient-root-image": Query(
            "patient", "IMAGE",
            {"PatientID": "PAT003", "StudyInstanceUID": clara_series["StudyInstanceUID"],
             "SeriesInstanceUID": clara_series["SeriesInstanceUID"], "SOPInstanceUID": "", "InstanceNumber": "",
             "SOPClassUID": ""},
            lambda e: e["SeriesInstanceUID"] == clara_series["SeriesInstanceUID"],
        ),
    }  # fmt: skip


QUERY_NAMES = [
    "patient-all",
    "patient-name-wildcard",
    "patient-root-study",
    "study-date-range",
    "study-open-date-range",
    "study-accession-wildcard",
    "study-name-wildcard",
    "series-uid-list",
    "series-modality",
    "image-in-series",
    "image-uid-list",
    "patient-root-series",
    "patient-root-image",
]


# --------------------------------------------------------------------------- checking identifiers

_TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UT", "PN", "UC"})


def undeclared_8bit(ds: Dataset) -> list[str]:
    """Text elements holding characters outside ASCII while no Specific Character Set
    says what they are (PS3.5 §6.1.2.5.3: without it, only the default repertoire applies).

    Raw values are checked byte by byte; values already decoded (pynetdicom hands
    them over that way) by their characters, as pydicom can only have produced
    non-ASCII text from 8-bit bytes.
    """
    charset = ds.get_item(0x00080005)
    if charset is not None:
        value = charset.value
        text = value.decode("ascii", "replace") if isinstance(value, bytes) else norm(value)
        if text.strip(" \\") not in ("", "ISO_IR 6"):
            return []
    bad = []
    tags = list(ds.keys())  # the tags: iterating the data set itself would convert the raw values
    for tag in tags:
        elem = ds.get_item(tag)
        vr = elem.VR
        if vr is None:
            try:
                vr = pydicom.datadict.dictionary_VR(tag)
            except KeyError:
                continue
        if vr not in _TEXT_VRS:
            continue
        value = elem.value
        raw = value if isinstance(value, bytes) else norm(value).encode("utf-8")
        if any(b > 0x7F for b in raw):  # UTF-8 of a non-ASCII character has such bytes too
            bad.append(pydicom.datadict.keyword_for_tag(tag) or str(tag))
    return bad


def check_identifiers(
    got: Sequence[Dataset],
    query: Query,
    corpus: Corpus,
    peer: str,
    *,
    allowed_extra: frozenset[str] = frozenset(),
    retrieve_ae: str | None = None,
) -> None:
    """The responses are exactly the expected entities, every requested key valued as
    pydicom reads it from the files, nothing returned twice, nothing unrequested; with
    ``retrieve_ae`` each carries that Retrieve AE Title (PS3.4 C.4.1.1.3.2)."""
    if retrieve_ae is not None:
        allowed_extra = allowed_extra | {"RetrieveAETitle"}
    expected = query.expected(corpus)
    assert expected, "the query must match something, or it proves little"
    unique = UNIQUE[query.level]
    seen: dict[str, dict[str, str]] = {}
    for n, ds in enumerate(got):
        where = f"{peer}, response {n + 1}"
        bad = undeclared_8bit(ds)
        assert not bad, f"{where}: 8-bit text in {bad} but no Specific Character Set\n{ds}"
        assert norm(ds.get("QueryRetrieveLevel")) == query.level, f"{where}: level {ds.get('QueryRetrieveLevel')!r}"
        keywords = {elem.keyword for elem in ds}
        missing = set(query.keys) - keywords
        assert not missing, f"{where}: requested keys {sorted(missing)} missing\n{ds}"
        extra = keywords - set(query.keys) - {"QueryRetrieveLevel", "SpecificCharacterSet"} - allowed_extra
        if retrieve_ae is not None:
            assert norm(ds.get("RetrieveAETitle")) == retrieve_ae, f"{where}: Retrieve AE Title\n{ds}"
        assert not extra, f"{where}: attributes {sorted(extra)} were not requested\n{ds}"
        row = {k: norm(ds.get(k), k) for k in query.keys}
        assert row[unique] not in seen, f"{where}: {unique} {row[unique]} returned twice"
        seen[row[unique]] = row
    assert sorted(seen) == sorted(expected), f"{peer}: {len(seen)} entities returned, {len(expected)} expected"
    for uid, row in seen.items():
        assert row == expected[uid], f"{peer}: {unique} {uid}\n got      {row}\n expected {expected[uid]}"


def dataset_differences(want: Dataset, got: Dataset) -> list[str]:
    """Tags whose values differ, recursively. Not compared: group lengths (retired,
    PS3.5 §7.2) and Data Set Trailing Padding (which a sender may drop, PS3.10 §7.2):
    DCMTK drops or recomputes both when it re-encodes a file it sends."""
    out = []
    tags = {t for t in [*want.keys(), *got.keys()] if t.element != 0x0000 and t != 0xFFFCFFFC}
    for tag in sorted(tags):
        if tag not in want or tag not in got:
            out.append(f"{tag} {'missing' if tag in want else 'unexpected'}")
            continue
        a, b = want[tag], got[tag]
        if a.VR == "SQ" and b.VR == "SQ" and len(a.value) == len(b.value):
            for n, (x, y) in enumerate(zip(a.value, b.value)):
                out += [f"{tag}[{n}]{d}" for d in dataset_differences(x, y)]
        elif a.value != b.value and not (a.VR == "SQ" or b.VR == "SQ"):
            out.append(f"{tag} {a.value!r:.60} != {b.value!r:.60}")
        elif a.VR == "SQ" or b.VR == "SQ":
            out.append(f"{tag} sequence differs")
    return out


def check_instances(corpus: Corpus, received: dict[str, tuple[str, bytes]], uids: set[str], peer: str) -> None:
    """Every expected instance arrived once: its data set byte for byte as in the
    generated file when it came in the file's transfer syntax, element by element
    otherwise."""
    assert uids, "nothing to retrieve proves little"
    assert set(received) == uids, f"{peer}: {len(received)} instances arrived, {len(uids)} expected"
    for uid, (syntax, data) in received.items():
        if syntax == corpus.datasets[uid].file_meta.TransferSyntaxUID:
            assert data == corpus.dataset_bytes(uid), f"{peer}: {uid} arrived with other bytes"
            continue
        got = read_dataset(DicomBytesIO(data), syntax == "1.2.840.10008.1.2", True)
        differ = dataset_differences(corpus.datasets[uid], got)
        assert not differ, f"{peer}: {uid} arrived ({syntax}) with other values: {differ}"


def received_file(path: Path) -> tuple[str, str, bytes]:
    """(SOP Instance UID, transfer syntax, data set bytes) of a Part 10 file a peer wrote."""
    with path.open("rb") as fp:
        meta = read_file_meta(fp)
        assert meta is not None, f"{path} has no file meta"
        fp.seek(meta.dataset_offset)
        return meta.sop_instance_uid, meta.transfer_syntax, fp.read()


def received_dir(directory: Path) -> dict[str, tuple[str, bytes]]:
    out: dict[str, tuple[str, bytes]] = {}
    for path in sorted(p for p in directory.iterdir() if p.is_file()):
        uid, syntax, data = received_file(path)
        assert uid not in out, f"{uid} written twice"
        out[uid] = (syntax, data)
    return out


# --------------------------------------------------------------------------- processes


@dataclass
class Completed:
    argv: Sequence[str]
    returncode: int
    output: str

    def __str__(self) -> str:
        return f"{' '.join(self.argv)} -> exit {self.returncode}\n{self.output}"


async def run(*argv: str, cwd: Path | None = None, timeout: float = WAIT) -> Completed:
    """Run a program to completion without blocking the event loop (our SCPs keep serving)."""
    code, out, _ = await communicate(argv, env=DCMTK_ENV, cwd=cwd, timeout=timeout, merge_stderr=True)
    return Completed(argv, code, out)


def run_sync(*argv: str, cwd: Path | None = None, timeout: float = WAIT) -> Completed:
    try:
        done = subprocess.run(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=cwd, env=DCMTK_ENV, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{' '.join(argv)} did not finish within {timeout} s")
    return Completed(argv, done.returncode, done.stdout.decode(errors="replace"))


def start_process(argv: Sequence[str], log: Path, *, cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """Start a peer in its own process group (dcmqrscp and wlmscpfs fork per association)."""
    with log.open("ab") as sink:
        return subprocess.Popen(
            list(argv), stdout=sink, stderr=subprocess.STDOUT, cwd=cwd, env=DCMTK_ENV, start_new_session=True
        )


def in_thread(fn: Callable[[], Awaitable[Any]], timeout: float = 2 * WAIT) -> Any:
    """Run ``fn()`` on a fresh event loop in a worker thread (for module fixtures)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(fn())).result(timeout)


_FINAL = re.compile(r"Received Final (?:Find|Move) Response \(([^)]*)\)")
_GET_RSP = re.compile(r"Received C-GET Response \(([^)]*)\)")
_GET_COUNTS = re.compile(r"Number of (Remaining|Completed|Failed|Warning) Suboperations\s*: (\d+)")


def final_status(done: Completed) -> str:
    """What findscu or movescu (run with -v) reported as the final response status."""
    found = _FINAL.findall(done.output)
    assert len(found) == 1, f"expected one final response\n{done}"
    return found[0]


def getscu_final(done: Completed) -> tuple[str, dict[str, int]]:
    """getscu (-v): the last C-GET response's status (all others pending) and its counters."""
    statuses = _GET_RSP.findall(done.output)
    assert statuses and all(s == "Pending" for s in statuses[:-1]), f"C-GET responses {statuses}\n{done}"
    report = done.output.rpartition("Final status report")[2]
    return statuses[-1], {k: int(v) for k, v in _GET_COUNTS.findall(report)}


def findscu_argv(port: int, called: str, args: Sequence[str], out: Path) -> list[str]:
    """findscu writing each response identifier to ``out`` (-X: rsp0001.dcm, ...)."""
    out.mkdir(parents=True, exist_ok=True)
    return [dcmtk("findscu"), "-v", "-to", "10", "-ta", "10", "-td", "20", "-aet", "FINDSCU", "-aec", called,
            *args, "-X", "-od", str(out), HOST, str(port)]  # fmt: skip


def findscu_responses(out: Path) -> list[Dataset]:
    return [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


# --------------------------------------------------------------------------- dimse-async serve

SERVE_LINE = re.compile(
    r"(?P<ae>\S+) listening on (?P<host>[\d.]+):(?P<port>\d+); archive (?P<dir>.+?): (?P<total>\d+) instances "
    r"\((?P<added>\d+) indexed now, (?P<skipped>\d+) not indexed, (?P<gone>\d+) gone\)"
    r"(?:; worklist (?P<worklist>.+))?$",
    re.M,
)


@dataclass
class Serve:
    proc: subprocess.Popen[bytes]
    port: int
    storage: Path
    log: Path
    startup: dict[str, str]

    def counts(self) -> tuple[int, int, int, int]:
        s = self.startup
        return int(s["total"]), int(s["added"]), int(s["skipped"]), int(s["gone"])

    def stored_files(self) -> list[Path]:
        return sorted(p for p in self.storage.rglob("*.dcm") if ".incoming" not in p.parts)

    def as_stored(self) -> dict[str, Path]:
        """SOP Instance UID -> the file serve keeps (storescu re-encodes what it sends)."""
        out = {}
        for path in self.stored_files():
            with path.open("rb") as fp:
                meta = read_file_meta(fp)
            if meta is not None:
                out[meta.sop_instance_uid] = path
        return out


def write_serve_config(path: Path, storage: Path, known: dict[str, int], worklist: Path | None = None) -> Path:
    lines = [
        f'ae_title = "{SERVE_AE}"',
        f'host = "{HOST}"',
        "port = 0",
        f"storage_dir = {json.dumps(str(storage))}",
        "require_called_ae = true",
    ]
    if worklist is not None:
        lines.append(f"worklist_dir = {json.dumps(str(worklist))}")
    lines.append("")
    lines.append("[known_aes]")
    lines += [f'{title} = {{ host = "{HOST}", port = {port} }}' for title, port in known.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def start_serve(config: Path, log: Path, timeout: float = WAIT) -> Serve:
    """``python -m dimse_async serve --config``; returns once its startup line is printed."""
    out = log.with_suffix(".stdout")
    with out.open("wb") as stdout, log.open("ab") as stderr:
        proc = subprocess.Popen(
            [*CLI, "serve", "--config", str(config), "--log-level", "INFO"],
            stdout=stdout, stderr=stderr, start_new_session=True,
        )  # fmt: skip
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            match = SERVE_LINE.search(out.read_text(errors="replace"))
            if match:
                storage = Path(match["dir"])
                return Serve(proc, int(match["port"]), storage, log, match.groupdict())
            if proc.poll() is not None:
                break
            time.sleep(0.05)
    except BaseException:
        stop_process(proc)
        raise
    stop_process(proc)
    pytest.fail(
        f"serve did not start (exit {proc.returncode}):\n{out.read_text(errors='replace')}\n{log.read_text(errors='replace')}"
    )


def storescu_load(port: int, called: str, paths: Sequence[Path]) -> Completed:
    done = run_sync(
        dcmtk("storescu"), "-nh", "-R", "+sd", "+r", "-to", "10", "-ta", "10", "-td", "20",
        "-aet", "STORESCU", "-aec", called, HOST, str(port), *map(str, paths),
        timeout=2 * WAIT,
    )  # fmt: skip
    assert done.returncode == 0, done
    return done


@pytest.fixture(scope="module")
def qr_ports() -> dict[str, int]:
    """Ports of the C-MOVE destinations, known before the peers' configurations are written."""
    return {"movescu": free_port(), "pynet_dest": free_port(), "ours": free_port()}


# --------------------------------------------------------------------------- worklist data

# (patient name, patient ID, accession, modality, station AE, start date, start time)
WORKLIST_ITEMS = (
    ("WORK^ANNA", "WPID1", "WACC1", "CT", "CT_STATION", "20220301", "083000"),
    ("WORK^BERT", "WPID2", "WACC2", "MR", "MR_STATION", "20220302", "093000"),
    ("GRÜN^CARL", "WPID3", "WACC3", "CT", "CT_STATION", "20220303", "103000"),
    ("WORK^DORA", "WPID4", "WACC4", "MR", "MR_STATION", "20220304", "113000"),
    ("WORK^EMIL", "WPID5", "WACC5", "CT", "CT2_STATION", "20220305", "123000"),
    ("WORK^FINN", "WPID6", "WACC6", "US", "US_STATION", "20220306", "133000"),
)
SPS = "ScheduledProcedureStepSequence"


def _worklist_dump(n: int, item: tuple[str, ...]) -> str:
    name, pid, accession, modality, station, date, tm = item
    return f"""\
(0008,0005) CS [ISO_IR 100]
(0008,0050) SH [{accession}]
(0010,0010) PN [{name}]
(0010,0020) LO [{pid}]
(0010,0030) DA [1960010{n}]
(0010,0040) CS [O]
(0020,000d) UI [1.2.826.0.1.3680043.2.1143.99.{n}]
(0032,1032) PN [REQUESTING^{n}]
(0032,1060) LO [Procedure {n}]
(0040,0100) SQ
(fffe,e000) -
(0008,0060) CS [{modality}]
(0040,0001) AE [{station}]
(0040,0002) DA [{date}]
(0040,0003) TM [{tm}]
(0040,0006) PN [PERFORMING^{n}]
(0040,0007) LO [Step {n}]
(0040,0009) SH [SPS{n}]
(0040,0010) SH [STATION{n}]
(fffe,e00d) -
(fffe,e0dd) -
(0040,1001) SH [RP{n}]
(0040,1003) SH [LOW]
"""


@dataclass
class WorklistData:
    root: Path  # wlmscpfs -dfp: one sub-directory per AE title
    directory: Path  # root / WLM: the .wl files and the lockfile wlmscpfs needs
    items: list[Dataset]

    def views(self) -> list[dict[str, str]]:
        out = []
        for ds in self.items:
            view = {e.keyword: norm(e.value, e.keyword) for e in ds if e.VR != "SQ" and e.tag.group != 2}
            view.update({e.keyword: norm(e.value) for e in ds[SPS].value[0]})
            out.append(view)
        return out


@pytest.fixture(scope="module")
def worklist(tmp_path_factory: pytest.TempPathFactory) -> WorklistData:
    """Worklist files made by DCMTK dump2dcm from text dumps, in wlmscpfs's layout."""
    root = tmp_path_factory.mktemp("worklist")
    directory = root / WLM_AE
    directory.mkdir()
    (directory / "lockfile").touch()
    dumps = root / "dumps"
    dumps.mkdir()
    for n, item in enumerate(WORKLIST_ITEMS, 1):
        dump = dumps / f"item{n}.dump"
        dump.write_text(_worklist_dump(n, item), encoding="latin-1")
        done = run_sync(dcmtk("dump2dcm"), "+te", str(dump), str(directory / f"item{n}.wl"))
        assert done.returncode == 0, done
    items = [pydicom.dcmread(p, force=True) for p in sorted(directory.glob("*.wl"))]
    assert len(items) == len(WORKLIST_ITEMS)
    assert str(items[2].PatientName) == "GRÜN^CARL"  # dump2dcm kept the Latin-1 bytes
    return WorklistData(root, directory, items)


@dataclass
class WorklistQuery:
    keys: dict[str, str]  # top-level keys
    sps: dict[str, str]  # Scheduled Procedure Step Sequence item keys
    where: Callable[[dict[str, str]], bool]

    def dataset(self) -> Dataset:
        ds = Dataset()
        for keyword, value in self.keys.items():
            setattr(ds, keyword, value)
        item = Dataset()
        for keyword, value in self.sps.items():
            setattr(item, keyword, value)
        setattr(ds, SPS, [item])
        return ds

    def findscu_args(self) -> list[str]:
        args = ["-W"]
        for keyword, value in self.keys.items():
            args += ["-k", f"{keyword}={value}" if value else keyword]
        for keyword, value in self.sps.items():
            args += ["-k", f"{SPS}[0].{keyword}={value}" if value else f"{SPS}[0].{keyword}"]
        return args


WORKLIST_QUERIES = {
    "modality": WorklistQuery(
        {"PatientName": "", "PatientID": "", "AccessionNumber": ""},
        {"Modality": "CT", "ScheduledStationAETitle": "", "ScheduledProcedureStepStartDate": "",
         "ScheduledProcedureStepStartTime": ""},
        lambda v: v["Modality"] == "CT",
    ),
    "station": WorklistQuery(
        {"PatientName": "", "AccessionNumber": ""},
        {"ScheduledStationAETitle": "MR_STATION", "Modality": "", "ScheduledProcedureStepStartDate": ""},
        lambda v: v["ScheduledStationAETitle"] == "MR_STATION",
    ),
    "date-range": WorklistQuery(
        {"PatientName": "", "StudyInstanceUID": "", "AccessionNumber": ""},
        {"ScheduledProcedureStepStartDate": "20220302-20220304", "Modality": "", "ScheduledStationAETitle": ""},
        lambda v: "20220302" <= v["ScheduledProcedureStepStartDate"] <= "20220304",
    ),
    "modality-station-date": WorklistQuery(
        {"PatientName": "", "PatientID": "", "AccessionNumber": ""},
        {"Modality": "CT", "ScheduledStationAETitle": "CT_STATION", "ScheduledProcedureStepStartDate": "20220302-",
         "ScheduledProcedureStepID": ""},
        lambda v: v["Modality"] == "CT" and v["ScheduledStationAETitle"] == "CT_STATION"
        and v["ScheduledProcedureStepStartDate"] >= "20220302",
    ),
    "name-wildcard": WorklistQuery(
        {"PatientName": "GR*", "PatientID": "", "AccessionNumber": ""},
        {"Modality": "", "ScheduledProcedureStepID": ""},
        lambda v: v["PatientName"].startswith("GR"),
    ),
}  # fmt: skip


def check_worklist(got: Sequence[Dataset], query: WorklistQuery, data: WorklistData, peer: str) -> None:
    expected = {v["AccessionNumber"]: v for v in data.views() if query.where(v)}
    assert expected, "the query must match something"
    seen = set()
    for n, ds in enumerate(got):
        where = f"{peer}, response {n + 1}"
        bad = undeclared_8bit(ds)
        assert not bad, f"{where}: 8-bit text in {bad} but no Specific Character Set"
        accession = norm(ds.get("AccessionNumber"))
        assert accession in expected and accession not in seen, f"{where}: unexpected item {accession}\n{ds}"
        seen.add(accession)
        want = expected[accession]
        keywords = {e.keyword for e in ds} - {"SpecificCharacterSet"}
        assert keywords == {*query.keys, SPS}, f"{where}: attributes {sorted(keywords)}"
        for keyword in query.keys:
            assert norm(ds.get(keyword)) == want[keyword], f"{where}: {keyword} {ds.get(keyword)!r}"
        items = ds[SPS].value
        assert len(items) == 1, f"{where}: {len(items)} scheduled steps"
        assert {e.keyword for e in items[0]} == set(query.sps), f"{where}: step keys {items[0]}"
        for keyword in query.sps:
            assert norm(items[0].get(keyword)) == want[keyword], f"{where}: {keyword} {items[0].get(keyword)!r}"
    assert seen == set(expected), f"{peer}: items {sorted(seen)}, expected {sorted(expected)}"


# --------------------------------------------------------------------------- peers as fixtures


@pytest.fixture(scope="module")
def serve(
    tmp_path_factory: pytest.TempPathFactory, corpus: Corpus, worklist: WorklistData, qr_ports: dict[str, int]
) -> Iterator[Serve]:
    """``dimse-async serve`` with the corpus loaded by storescu and the worklist files."""
    work = tmp_path_factory.mktemp("serve")
    config = write_serve_config(
        work / "serve.toml",
        work / "archive",
        {MOVESCU_AE: qr_ports["movescu"], PYNET_DEST_AE: qr_ports["pynet_dest"]},
        worklist.directory,
    )
    server = start_serve(config, work / "serve.log")
    try:
        assert server.counts() == (0, 0, 0, 0)
        assert server.startup["worklist"] == str(worklist.directory)
        storescu_load(server.port, SERVE_AE, [corpus.root])
        stored = server.as_stored()
        assert set(stored) == set(corpus.files)
        for uid, path in stored.items():  # serve keeps exactly what storescu sent
            assert received_file(path)[1:] == (EXPLICIT_LE, corpus.dataset_bytes(uid)), path
        yield server
    finally:
        assert stop_process(server.proc) == 0, server.log.read_text(errors="replace")


@dataclass
class Peer:
    """A Q/R SCP process: where it listens and what it is called."""

    proc: subprocess.Popen[bytes]
    port: int
    ae_title: str
    log: Path
    http_port: int | None = None


#: Relational queries asked for in study root C-FIND (PS3.4 C.5.1.1.1 extended negotiation).
RELATIONAL = [da.pdu.SOPClassExtended(MODELS["study"]["find"], b"\x01")]


def our_scu(*, retrieve_classes: Sequence[str] = ()) -> da.AE:
    """Our SCU: verification, FIND/MOVE/GET of patient and study root, worklist; the
    storage SCP role for ``retrieve_classes`` (C-GET)."""
    ae = da.AE(OUR_AE, connect_timeout=WAIT, acse_timeout=WAIT, dimse_timeout=WAIT)
    ae.add_requested_context(da.Verification)
    for model in ("patient", "study"):
        for uid in MODELS[model].values():
            ae.add_requested_context(uid)
    ae.add_requested_context(MODELS["worklist"]["find"])
    for uid in retrieve_classes:
        ae.add_requested_context(uid, scu_role=False, scp_role=True)
    return ae


async def store_corpus(port: int, called: str, paths: Sequence[Path]) -> list[da.Status]:
    ae = da.AE(OUR_AE, connect_timeout=WAIT, acse_timeout=WAIT, dimse_timeout=WAIT)
    ae.add_requested_context(CT_STORAGE, [EXPLICIT_LE])
    ae.add_requested_context(MR_STORAGE, [EXPLICIT_LE])
    async with ae.associate(HOST, port, called) as assoc:
        return list(await asyncio.gather(*(assoc.c_store(p) for p in paths)))


def _http_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=2) as rsp:
        return json.loads(rsp.read())


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory, corpus: Corpus, qr_ports: dict[str, int]) -> Iterator[Peer]:
    """Orthanc on loopback with OURS as a known modality, loaded with our C-STORE SCU."""
    if not os.path.exists(ORTHANC):
        pytest.fail(f"{ORTHANC} not found: install Orthanc (apt-get install -y orthanc)")
    work = tmp_path_factory.mktemp("orthanc")
    dicom_port, http_port = free_port(), free_port()
    config = {
        "Name": "dimse-async-interop",
        "StorageDirectory": str(work / "storage"),
        "IndexDirectory": str(work / "index"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False,
        "DicomModalities": {OUR_AE: [OUR_AE, HOST, qr_ports["ours"]]},
        "Plugins": [],
        "HttpsVerifyPeers": False,
    }
    (work / "orthanc.json").write_text(json.dumps(config))
    log = work / "orthanc.log"
    proc = start_process([ORTHANC, str(work / "orthanc.json")], log, cwd=work)
    try:
        deadline = time.monotonic() + WAIT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"Orthanc exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
            try:
                system = _http_json(f"http://{HOST}:{http_port}/system")
                break
            except (OSError, urllib.error.URLError, ValueError):
                if time.monotonic() > deadline:
                    pytest.fail(f"Orthanc HTTP not up after {WAIT} s:\n{log.read_text(errors='replace')}")
                time.sleep(0.1)
        assert system["DicomAet"] == "ORTHANC" and system["DicomPort"] == dicom_port
        wait_tcp(proc, dicom_port, log)
        statuses = in_thread(lambda: store_corpus(dicom_port, "ORTHANC", list(corpus.files.values())))
        assert [int(s) for s in statuses] == [0] * len(corpus.files)
        stats = _http_json(f"http://{HOST}:{http_port}/statistics")
        assert (stats["CountPatients"], stats["CountStudies"], stats["CountInstances"]) == (3, 6, 36)
        yield Peer(proc, dicom_port, "ORTHANC", log, http_port)
    finally:
        kill_process(proc)  # its storage is thrown away: no graceful shutdown to wait for


DCMQRSCP_AE = "DCMQRSCP"


@pytest.fixture(scope="module")
def dcmqrscp(tmp_path_factory: pytest.TempPathFactory, corpus: Corpus, qr_ports: dict[str, int]) -> Iterator[Peer]:
    """DCMTK dcmqrscp (forking; its -s mode crashes after one association in 3.6.7) with
    one RW storage area and OURS in its host table, loaded with our C-STORE SCU."""
    work = tmp_path_factory.mktemp("dcmqrscp")
    db = work / "db"
    db.mkdir()
    port = free_port()
    (work / "dcmqrscp.cfg").write_text(
        f"""\
NetworkTCPPort  = {port}
MaxPDUSize      = 16384
MaxAssociations = 16

HostTable BEGIN
ours = ({OUR_AE}, {HOST}, {qr_ports["ours"]})
HostTable END

VendorTable BEGIN
VendorTable END

AETable BEGIN
{DCMQRSCP_AE} {db} RW (20, 1024mb) ANY
AETable END
"""
    )
    log = work / "dcmqrscp.log"
    proc = start_process([dcmtk("dcmqrscp"), "-v", "-dhl", "-c", str(work / "dcmqrscp.cfg"), str(port)], log, cwd=work)
    try:
        wait_tcp(proc, port, log)
        statuses = in_thread(lambda: store_corpus(port, DCMQRSCP_AE, list(corpus.files.values())))
        assert [int(s) for s in statuses] == [0] * len(corpus.files)
        assert len(list(db.glob("*.dcm"))) == len(corpus.files)
        yield Peer(proc, port, DCMQRSCP_AE, log)
    finally:
        stop_process(proc)


@pytest.fixture(scope="module")
def wlmscpfs(tmp_path_factory: pytest.TempPathFactory, worklist: WorklistData) -> Iterator[Peer]:
    """DCMTK wlmscpfs on the worklist files; -csk returns their Specific Character Set."""
    work = tmp_path_factory.mktemp("wlmscpfs")
    port = free_port()
    log = work / "wlmscpfs.log"
    proc = start_process([dcmtk("wlmscpfs"), "-v", "-dhl", "-csk", "-dfp", str(worklist.root), str(port)], log)
    try:
        wait_tcp(proc, port, log)
        yield Peer(proc, port, WLM_AE, log)
    finally:
        stop_process(proc)


# --------------------------------------------------------------------------- wire tap


@dataclass
class WireCommand:
    seq: int  # order in which the relay saw the commands, both directions
    sender: str  # "scu" (us) or "peer"
    command: int
    message_id: int | None
    responding_to: int | None
    status: int | None


class WireTap:
    """A TCP relay in front of a peer that records every DIMSE command set on the wire.

    A command is recorded before its bytes are passed on, so the order in ``commands``
    is causal: whatever we sent in reaction to a response comes after it.
    """

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.commands: list[WireCommand] = []
        self._seq = itertools.count()
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> WireTap:
        self._server = await asyncio.start_server(self._relay, HOST, 0)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        await asyncio.wait_for(self._server.wait_closed(), 10)

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(HOST, self.target_port), WAIT)
        self._writers += [writer, up_writer]
        await asyncio.gather(self._pump(reader, up_writer, "scu"), self._pump(up_reader, writer, "peer"))

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, sender: str) -> None:
        buffer, fragments = bytearray(), bytearray()
        try:
            while data := await src.read(65536):
                buffer += data
                self._parse(buffer, fragments, sender)
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            dst.close()

    def _parse(self, buffer: bytearray, fragments: bytearray, sender: str) -> None:
        while len(buffer) >= 6:
            length = int.from_bytes(buffer[2:6], "big")
            if len(buffer) < 6 + length:
                return
            pdu_type, body = buffer[0], bytes(buffer[6 : 6 + length])
            del buffer[: 6 + length]
            if pdu_type != 0x04:  # only P-DATA-TF carries commands
                continue
            i = 0
            while i + 6 <= len(body):
                item_length = int.from_bytes(body[i : i + 4], "big")
                header, value = body[i + 5], body[i + 6 : i + 4 + item_length]
                i += 4 + item_length
                if not header & 0x01:  # a data set fragment
                    continue
                fragments += value
                if header & 0x02:  # last fragment of the command set
                    self.commands.append(self._decode(bytes(fragments), sender))
                    fragments.clear()

    def _decode(self, data: bytes, sender: str) -> WireCommand:
        cmd = read_dataset(DicomBytesIO(data), True, True)  # command sets are implicit VR little endian

        def get(element: int) -> int | None:
            elem = cmd.get((0x0000, element))
            return None if elem is None or elem.value is None else int(elem.value)

        return WireCommand(next(self._seq), sender, get(0x0100) or 0, get(0x0110), get(0x0120), get(0x0900))


# --------------------------------------------------------------------------- our SCPs in process


@contextlib.asynccontextmanager
async def our_store_scp(out: Path, port: int) -> AsyncIterator[list[tuple[str, str, tuple[str, int] | None]]]:
    """Our storage SCP titled OURS: files into ``out``; yields (calling AE, SOP instance,
    move originator) per C-STORE."""
    ae = da.AE(OUR_AE, dimse_timeout=WAIT)
    for uid in STORAGE_SOP_CLASSES:
        ae.add_supported_context(uid, STORE_TRANSFER_SYNTAXES)
    store = DirectoryStore(out)
    calls: list[tuple[str, str, tuple[str, int] | None]] = []

    @ae.on_c_store
    async def on_store(request: Any) -> Any:
        calls.append((request.assoc.peer_ae, request.sop_instance_uid, request.move_originator))
        return await store(request)

    server = await ae.start_server(HOST, port)
    try:
        yield calls
    finally:
        server.close()
        await server.wait_closed(grace=5)


def store_sink(received: dict[str, tuple[str, bytes]]) -> Callable[[Any], Awaitable[int]]:
    """A ``c_get(store=...)`` callback keeping (transfer syntax, data set bytes) per instance."""

    async def sink(request: Any) -> int:
        with request.open() as fp:
            meta = read_file_meta(fp)
            assert meta is not None
            fp.seek(meta.dataset_offset)
            data = fp.read()
        assert request.sop_instance_uid not in received, f"{request.sop_instance_uid} sent twice"
        received[request.sop_instance_uid] = (meta.transfer_syntax, data)
        return 0x0000

    return sink


def retrieve_query(level: str, **keys: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def check_progress(progress: Sequence[Any], total: int, peer: str) -> None:
    """Pending responses count down, the final one is success with every sub-operation completed."""
    assert progress, f"{peer}: no responses"
    final = progress[-1]
    assert int(final.status) == 0x0000, f"{peer}: final {final}"
    assert (final.completed, final.failed or 0, final.warning or 0) == (total, 0, 0), f"{peer}: final {final}"
    pending = progress[:-1]
    assert all(int(p.status) == 0xFF00 for p in pending), f"{peer}: {pending}"
    remaining = [p.remaining for p in pending if p.remaining is not None]
    assert remaining == sorted(remaining, reverse=True) and all(r < total for r in remaining), f"{peer}: {remaining}"


# =========================================================================== 1. dimse-async serve


@pytest.mark.parametrize("name", QUERY_NAMES)
def test_findscu_against_serve(name: str, serve: Serve, corpus: Corpus, tmp_path: Path) -> None:
    query = build_queries(corpus)[name]
    done = run_sync(*findscu_argv(serve.port, SERVE_AE, query.findscu_args(), tmp_path / "rsp"))
    assert done.returncode == 0, done
    assert final_status(done) == "Success", done
    check_identifiers(findscu_responses(tmp_path / "rsp"), query, corpus, "serve via findscu", retrieve_ae=SERVE_AE)


def test_findscu_level_not_in_model_fails_on_serve(serve: Serve, tmp_path: Path) -> None:
    """Study root has no PATIENT level (PS3.4 C.6.2): a failure status, no matches."""
    args = ["-S", "-k", "QueryRetrieveLevel=PATIENT", "-k", "PatientID", "-k", "PatientName"]
    done = run_sync(*findscu_argv(serve.port, SERVE_AE, args, tmp_path / "rsp"))
    assert final_status(done) == "Error: DataSetDoesNotMatchSOPClass", done  # DCMTK's name for 0xA900
    assert findscu_responses(tmp_path / "rsp") == []


@pytest.mark.parametrize("what", ["patient", "study-uid-list"])
def test_movescu_from_serve(what: str, serve: Serve, corpus: Corpus, qr_ports: dict[str, int], tmp_path: Path) -> None:
    """movescu receives on its own storage SCP (+P), bit-preserving (+B): the data sets
    arrive byte for byte as storescu gave them to serve."""
    if what == "patient":
        keys = ["-P", "-k", "QueryRetrieveLevel=PATIENT", "-k", "PatientID=PAT002"]
        uids = {e["SOPInstanceUID"] for e in corpus.select("IMAGE", PatientID="PAT002")}
    else:
        studies = [corpus.select("STUDY", PatientID=pid)[0]["StudyInstanceUID"] for pid in ("PAT001", "PAT003")]
        keys = ["-S", "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID=" + "\\".join(studies)]
        uids = {e["SOPInstanceUID"] for e in corpus.entities("IMAGE") if e["StudyInstanceUID"] in studies}
    out = tmp_path / "moved"
    out.mkdir()
    # With +B, movescu 3.6.7 ignores -od and writes into its working directory.
    done = run_sync(
        dcmtk("movescu"), "-v", "-to", "10", "-ta", "10", "-td", "20", "-aet", "MOVESCU", "-aec", SERVE_AE,
        "-aem", MOVESCU_AE, "+P", str(qr_ports["movescu"]), "+xa", "+B", *keys, HOST, str(serve.port),
        cwd=out,
    )  # fmt: skip
    assert done.returncode == 0, done
    assert final_status(done) == "Success", done
    assert done.output.count("Received Store Request") == len(uids), done
    check_instances(corpus, received_dir(out), uids, "movescu")


def test_movescu_unknown_destination_fails_on_serve(serve: Serve, corpus: Corpus, tmp_path: Path) -> None:
    done = run_sync(
        dcmtk("movescu"), "-v", "-to", "10", "-ta", "10", "-td", "20", "-aec", SERVE_AE, "-aem", "NOBODY",
        "-P", "-k", "QueryRetrieveLevel=PATIENT", "-k", "PatientID=PAT001", HOST, str(serve.port),
        cwd=tmp_path,
    )  # fmt: skip
    assert final_status(done) == "Refused: MoveDestinationUnknown", done  # 0xA801
    assert "Received Store Request" not in done.output


@pytest.mark.parametrize("level", ["SERIES", "IMAGE", "STUDY"])
def test_getscu_from_serve(level: str, serve: Serve, corpus: Corpus, tmp_path: Path) -> None:
    series = corpus.select("SERIES", PatientID="PAT003")[0]
    images = corpus.select("IMAGE", SeriesInstanceUID=series["SeriesInstanceUID"])
    keys = ["-k", f"QueryRetrieveLevel={level}", "-k", f"StudyInstanceUID={series['StudyInstanceUID']}"]
    if level == "STUDY":
        uids = {e["SOPInstanceUID"] for e in corpus.select("IMAGE", StudyInstanceUID=series["StudyInstanceUID"])}
    else:
        keys += ["-k", f"SeriesInstanceUID={series['SeriesInstanceUID']}"]
        uids = {e["SOPInstanceUID"] for e in images}
    if level == "IMAGE":
        keys += ["-k", f"SOPInstanceUID={images[1]['SOPInstanceUID']}"]
        uids = {images[1]["SOPInstanceUID"]}
    out = tmp_path / "got"
    out.mkdir()
    done = run_sync(
        dcmtk("getscu"), "-v", "-to", "10", "-ta", "10", "-td", "20", "-aec", SERVE_AE, "-S", *keys, "+B",
        "-od", str(out), HOST, str(serve.port),
    )  # fmt: skip
    assert done.returncode == 0, done
    status, counts = getscu_final(done)
    assert (status, counts["Completed"], counts["Failed"], counts["Warning"]) == ("Success", len(uids), 0, 0), done
    check_instances(corpus, received_dir(out), uids, "getscu")


@contextlib.contextmanager
def pynetdicom_store_scp(port: int) -> Iterator[dict[str, tuple[str, bytes]]]:
    """A pynetdicom storage SCP (PYNET_DEST) keeping each data set as it came off the wire."""
    received: dict[str, tuple[str, bytes]] = {}

    def on_store(event: Any) -> int:
        received[str(event.request.AffectedSOPInstanceUID)] = (
            str(event.context.transfer_syntax),
            bytes(event.request.DataSet.getvalue()),
        )
        return 0x0000

    ae = PynetdicomAE(ae_title=PYNET_DEST_AE)
    for uid in (CTImageStorage, MRImageStorage):
        ae.add_supported_context(uid, [EXPLICIT_LE, "1.2.840.10008.1.2"])
    server = ae.start_server((HOST, port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        yield received
    finally:
        server.shutdown()


def test_pynetdicom_scu_against_serve(serve: Serve, corpus: Corpus, qr_ports: dict[str, int]) -> None:
    """pynetdicom: C-FIND (study root), C-GET with the storage SCP role negotiated
    (build_role) and C-MOVE to a pynetdicom storage SCP, all on one association."""
    queries = build_queries(corpus)
    ae = PynetdicomAE(ae_title="PYNETSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = WAIT
    for uid in (StudyRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelGet,
                StudyRootQueryRetrieveInformationModelMove, CTImageStorage, MRImageStorage):  # fmt: skip
        ae.add_requested_context(uid, [EXPLICIT_LE])
    got: dict[str, tuple[str, bytes]] = {}

    def on_store(event: Any) -> int:
        got[str(event.request.AffectedSOPInstanceUID)] = (
            str(event.context.transfer_syntax),
            bytes(event.request.DataSet.getvalue()),
        )
        return 0x0000

    roles = [build_role(CTImageStorage, scp_role=True), build_role(MRImageStorage, scp_role=True)]
    with pynetdicom_store_scp(qr_ports["pynet_dest"]) as moved:
        assoc = ae.associate(
            HOST, serve.port, ae_title=SERVE_AE, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store)]
        )
        assert assoc.is_established
        try:
            for name in ("study-date-range", "study-name-wildcard", "series-uid-list", "image-uid-list"):
                query = queries[name]
                statuses, found = [], []
                for status, identifier in assoc.send_c_find(
                    query.dataset(), StudyRootQueryRetrieveInformationModelFind
                ):
                    statuses.append(int(status.Status))
                    if status.Status in (0xFF00, 0xFF01):
                        found.append(identifier)
                assert statuses[-1] == 0x0000 and statuses.count(0xFF00) == len(statuses) - 1, statuses
                check_identifiers(found, query, corpus, f"serve via pynetdicom ({name})", retrieve_ae=SERVE_AE)

            study = corpus.select("STUDY", PatientID="PAT003")[1]["StudyInstanceUID"]
            get_rsp = list(
                assoc.send_c_get(
                    retrieve_query("STUDY", StudyInstanceUID=study), StudyRootQueryRetrieveInformationModelGet
                )
            )
            final = get_rsp[-1][0]
            assert final.Status == 0x0000 and final.NumberOfCompletedSuboperations == 6, final
            assert final.NumberOfFailedSuboperations == 0 and final.NumberOfWarningSuboperations == 0
            check_instances(
                corpus,
                got,
                {e["SOPInstanceUID"] for e in corpus.select("IMAGE", StudyInstanceUID=study)},
                "pynetdicom C-GET",
            )

            series = corpus.select("SERIES", PatientID="PAT001")[2]
            query = retrieve_query(
                "SERIES", StudyInstanceUID=series["StudyInstanceUID"], SeriesInstanceUID=series["SeriesInstanceUID"]
            )
            move_rsp = list(assoc.send_c_move(query, PYNET_DEST_AE, StudyRootQueryRetrieveInformationModelMove))
            final = move_rsp[-1][0]
            assert final.Status == 0x0000 and final.NumberOfCompletedSuboperations == 3, final
            uids = {e["SOPInstanceUID"] for e in corpus.select("IMAGE", SeriesInstanceUID=series["SeriesInstanceUID"])}
            check_instances(corpus, moved, uids, "pynetdicom storage SCP (C-MOVE)")
        finally:
            assoc.release()


def test_serve_reindexes_on_restart(corpus: Corpus, tmp_path: Path) -> None:
    """Stop serve, delete one file, drop a truncated file, a non-DICOM file and a valid
    new file into the archive, restart: the startup line counts them, the new instance
    is found and retrievable, the deleted one is gone, the corrupt ones never crash it."""
    config = write_serve_config(tmp_path / "serve.toml", tmp_path / "archive", {})
    alice = sorted(corpus.files[e["SOPInstanceUID"]] for e in corpus.select("IMAGE", PatientID="PAT001"))
    first = start_serve(config, tmp_path / "serve1.log")
    try:
        assert first.counts() == (0, 0, 0, 0)
        storescu_load(first.port, SERVE_AE, alice)
    finally:
        assert stop_process(first.proc) == 0, first.log.read_text(errors="replace")
    stored = first.stored_files()
    assert len(stored) == len(alice) == 12

    gone_uid = received_file(stored[0])[0]
    stored[0].unlink()
    dropped = first.storage / "dropped"
    dropped.mkdir()
    (dropped / "truncated.dcm").write_bytes(alice[1].read_bytes()[:1000])  # ends inside the data set header
    (dropped / "garbage.dcm").write_bytes(b"this is not a DICOM file\n" * 40)
    new_uid = corpus.select("IMAGE", PatientID="PAT002")[0]["SOPInstanceUID"]
    shutil.copyfile(corpus.files[new_uid], dropped / "new.dcm")

    second = start_serve(config, tmp_path / "serve2.log")
    try:
        assert second.counts() == (12, 1, 2, 1), second.startup  # total, added, skipped, gone
        log = second.log.read_text(errors="replace")
        assert "truncated.dcm" in log and "garbage.dcm" in log, log

        patients = Query("patient", "PATIENT", {"PatientID": "", "NumberOfPatientRelatedInstances": ""}, lambda e: True)
        done = run_sync(*findscu_argv(second.port, SERVE_AE, patients.findscu_args(), tmp_path / "patients"))
        assert final_status(done) == "Success", done
        found = {
            norm(d.PatientID): norm(d.NumberOfPatientRelatedInstances) for d in findscu_responses(tmp_path / "patients")
        }
        assert found == {"PAT001": "11", "PAT002": "1"}

        for uid, count in ((new_uid, 1), (gone_uid, 0)):
            (image,) = corpus.select("IMAGE", SOPInstanceUID=uid)
            args = ["-S", "-k", "QueryRetrieveLevel=IMAGE", "-k", f"SOPInstanceUID={uid}", "-k", "PatientID",
                    "-k", f"StudyInstanceUID={image['StudyInstanceUID']}",
                    "-k", f"SeriesInstanceUID={image['SeriesInstanceUID']}"]  # fmt: skip
            done = run_sync(*findscu_argv(second.port, SERVE_AE, args, tmp_path / f"image-{count}"))
            assert final_status(done) == "Success", done
            assert [norm(d.SOPInstanceUID) for d in findscu_responses(tmp_path / f"image-{count}")] == [uid] * count

        new = corpus.levels["IMAGE"][new_uid]
        out = tmp_path / "got"
        out.mkdir()
        done = run_sync(
            dcmtk("getscu"), "-v", "-aec", SERVE_AE, "-S", "-k", "QueryRetrieveLevel=IMAGE",
            "-k", f"StudyInstanceUID={new['StudyInstanceUID']}", "-k", f"SeriesInstanceUID={new['SeriesInstanceUID']}",
            "-k", f"SOPInstanceUID={new_uid}", "+B", "-od", str(out), HOST, str(second.port),
        )  # fmt: skip
        assert getscu_final(done) == ("Success", {"Remaining": 0, "Completed": 1, "Failed": 0, "Warning": 0}), done
        check_instances(corpus, received_dir(out), {new_uid}, "getscu after re-index")
        assert second.proc.poll() is None
    finally:
        assert stop_process(second.proc) == 0, second.log.read_text(errors="replace")

    # The corrupt files stay where they are: skipped again, nothing else changes.
    third = start_serve(config, tmp_path / "serve3.log")
    try:
        assert third.counts() == (12, 0, 2, 0), third.startup
    finally:
        assert stop_process(third.proc) == 0


# =========================================================================== 2. Orthanc


@pytest.mark.parametrize("name", QUERY_NAMES)
async def test_find_against_orthanc(name: str, orthanc: Peer, corpus: Corpus) -> None:
    query = build_queries(corpus)[name]
    async with our_scu().associate(HOST, orthanc.port, orthanc.ae_title) as assoc:
        responses = assoc.c_find(query.dataset(), model=query.model)
        got = [ds async for ds in responses]
    assert responses.status == 0x0000, responses.status
    check_identifiers(got, query, corpus, "Orthanc", allowed_extra=frozenset({"RetrieveAETitle"}))


async def move_to_us(peer: Peer, query: Dataset, model: str, port: int, out: Path) -> tuple[Any, list[Any], list[Any]]:
    """C-MOVE from ``peer`` to our storage SCP (OURS): (responses, progress, store calls)."""
    async with our_store_scp(out, port) as calls:
        async with our_scu().associate(HOST, peer.port, peer.ae_title) as assoc:
            responses = assoc.c_move(query, OUR_AE, model=model)
            progress = [p async for p in responses]
    return responses, progress, calls


async def get_from(peer: Peer, query: Dataset, model: str) -> tuple[Any, list[Any], dict[str, tuple[str, bytes]]]:
    received: dict[str, tuple[str, bytes]] = {}
    async with our_scu(retrieve_classes=(CT_STORAGE, MR_STORAGE)).associate(HOST, peer.port, peer.ae_title) as assoc:
        roles = {c.abstract_syntax: (c.as_scu, c.as_scp) for c in assoc.accepted_contexts}
        assert roles[CT_STORAGE] == roles[MR_STORAGE] == (False, True), roles
        responses = assoc.c_get(query, model=model, store=store_sink(received))
        progress = [p async for p in responses]
    return responses, progress, received


async def test_move_from_orthanc(orthanc: Peer, corpus: Corpus, qr_ports: dict[str, int], tmp_path: Path) -> None:
    uids = {e["SOPInstanceUID"] for e in corpus.select("IMAGE", PatientID="PAT003")}
    responses, progress, calls = await move_to_us(
        orthanc, retrieve_query("PATIENT", PatientID="PAT003"), "patient", qr_ports["ours"], tmp_path / "in"
    )
    assert responses.status == 0x0000
    check_progress(progress, len(uids), "Orthanc C-MOVE")
    assert {c[0] for c in calls} == {"ORTHANC"}, calls
    check_instances(corpus, received_dir(tmp_path / "in"), uids, "Orthanc C-MOVE")


async def test_get_from_orthanc(orthanc: Peer, corpus: Corpus) -> None:
    study = corpus.select("SERIES", PatientID="PAT002", Modality="MR")[0]["StudyInstanceUID"]  # CT and MR
    responses, progress, received = await get_from(orthanc, retrieve_query("STUDY", StudyInstanceUID=study), "study")
    uids = {e["SOPInstanceUID"] for e in corpus.select("IMAGE", StudyInstanceUID=study)}
    assert responses.status == 0x0000
    check_progress(progress, len(uids), "Orthanc C-GET")
    check_instances(corpus, received, uids, "Orthanc C-GET")


# =========================================================================== 3. dcmqrscp

# dcmqrscp answers only the keys its index holds and leaves the others out, as an SCP
# may for optional keys (PS3.4 C.3.4, C.4.1.1.3.2); seen with 3.6.7:
DCMQRSCP_UNSUPPORTED = frozenset({
    "NumberOfPatientRelatedStudies", "NumberOfPatientRelatedInstances", "ModalitiesInStudy",
    "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances", "SeriesDescription",
    "NumberOfSeriesRelatedInstances", "SOPClassUID",
})  # fmt: skip


@pytest.mark.parametrize("name", QUERY_NAMES)
async def test_find_against_dcmqrscp(name: str, dcmqrscp: Peer, corpus: Corpus) -> None:
    query = build_queries(corpus)[name].without(DCMQRSCP_UNSUPPORTED)
    async with our_scu().associate(HOST, dcmqrscp.port, dcmqrscp.ae_title) as assoc:
        # dcmqrscp converts answers to the request's character set (+Cr, its default).
        responses = assoc.c_find(query.dataset(charset="ISO_IR 100"), model=query.model)
        got = [ds async for ds in responses]
    assert responses.status == 0x0000, responses.status
    check_identifiers(got, query, corpus, "dcmqrscp", allowed_extra=frozenset({"RetrieveAETitle"}))


async def test_move_from_dcmqrscp(dcmqrscp: Peer, corpus: Corpus, qr_ports: dict[str, int], tmp_path: Path) -> None:
    study = corpus.select("STUDY", PatientID="PAT001")[1]["StudyInstanceUID"]
    uids = {e["SOPInstanceUID"] for e in corpus.select("IMAGE", StudyInstanceUID=study)}
    responses, progress, calls = await move_to_us(
        dcmqrscp, retrieve_query("STUDY", StudyInstanceUID=study), "study", qr_ports["ours"], tmp_path / "in"
    )
    assert responses.status == 0x0000
    check_progress(progress, len(uids), "dcmqrscp C-MOVE")
    assert {c[0] for c in calls} == {DCMQRSCP_AE}, calls
    check_instances(corpus, received_dir(tmp_path / "in"), uids, "dcmqrscp C-MOVE")


async def test_get_from_dcmqrscp(dcmqrscp: Peer, corpus: Corpus) -> None:
    series = corpus.select("SERIES", PatientID="PAT003")[1]
    query = retrieve_query(
        "SERIES",
        PatientID="PAT003",
        StudyInstanceUID=series["StudyInstanceUID"],
        SeriesInstanceUID=series["SeriesInstanceUID"],
    )
    responses, progress, received = await get_from(dcmqrscp, query, "patient")
    uids = {e["SOPInstanceUID"] for e in corpus.select("IMAGE", SeriesInstanceUID=series["SeriesInstanceUID"])}
    assert responses.status == 0x0000
    check_progress(progress, len(uids), "dcmqrscp C-GET")
    check_instances(corpus, received, uids, "dcmqrscp C-GET")


# =========================================================================== 4. worklist


@pytest.mark.parametrize("name", list(WORKLIST_QUERIES))
async def test_worklist_find_against_wlmscpfs(name: str, wlmscpfs: Peer, worklist: WorklistData) -> None:
    query = WORKLIST_QUERIES[name]
    async with our_scu().associate(HOST, wlmscpfs.port, wlmscpfs.ae_title) as assoc:
        responses = assoc.c_find(query.dataset(), model="worklist")
        got = [ds async for ds in responses]
    assert responses.status == 0x0000, responses.status
    check_worklist(got, query, worklist, "wlmscpfs")


@pytest.mark.parametrize("name", list(WORKLIST_QUERIES))
def test_findscu_worklist_same_answers_from_wlmscpfs_and_serve(
    name: str, wlmscpfs: Peer, serve: Serve, worklist: WorklistData, tmp_path: Path
) -> None:
    query = WORKLIST_QUERIES[name]
    answers = {}
    for peer, port, called in (("wlmscpfs", wlmscpfs.port, WLM_AE), ("serve", serve.port, SERVE_AE)):
        out = tmp_path / peer
        done = run_sync(*findscu_argv(port, called, query.findscu_args(), out))
        assert done.returncode == 0 and final_status(done) == "Success", done
        found = findscu_responses(out)
        check_worklist([copy.deepcopy(d) for d in found], query, worklist, f"{peer} via findscu -W")
        answers[peer] = sorted(found, key=lambda d: norm(d.AccessionNumber))
    assert len(answers["serve"]) == len(answers["wlmscpfs"])
    for ours, theirs in zip(answers["serve"], answers["wlmscpfs"]):
        assert ours == theirs, f"serve:\n{ours}\nwlmscpfs:\n{theirs}"


# =========================================================================== 5. C-CANCEL

CANCEL_PEERS = ["serve", "dcmqrscp", "orthanc", "wlmscpfs-slow"]


@pytest.mark.parametrize("peer_name", CANCEL_PEERS)
async def test_our_scu_cancels_find_mid_stream(
    peer_name: str, request: pytest.FixtureRequest, corpus: Corpus, worklist: WorklistData, tmp_path: Path
) -> None:
    """We leave the C-FIND after the first match: C-CANCEL goes out, the rest is drained,
    and ``status`` is the peer's final status. The relay's record decides which outcome
    is the right one: Cancel (0xFE00) if the peer stopped early, Success only if it had
    already sent every match before it could read the C-CANCEL.

    Seen on loopback: serve reads the C-CANCEL between responses (usually Cancel, Success
    if all had gone); Orthanc stops after the first (Cancel); dcmqrscp goes either way, and
    under load may answer Cancel after sending every match (it read the C-CANCEL before its
    final response, which the tap's order shows); slowed
    wlmscpfs always cancels, after the second match."""
    proc = None
    if peer_name == "wlmscpfs-slow":
        # One response per second (--sleep-during): the C-CANCEL surely arrives in time.
        port = free_port()
        log = tmp_path / "wlmscpfs.log"
        argv = [dcmtk("wlmscpfs"), "-v", "-dhl", "--sleep-during", "1", "-dfp", str(worklist.root), str(port)]
        proc = start_process(argv, log)
        wait_tcp(proc, port, log)
        peer = Peer(proc, port, WLM_AE, log)
        query = WorklistQuery({"AccessionNumber": ""}, {"Modality": ""}, bool).dataset()
        model, total = "worklist", len(WORKLIST_ITEMS)
    else:
        fixture = request.getfixturevalue(peer_name)
        peer = fixture if isinstance(fixture, Peer) else Peer(fixture.proc, fixture.port, SERVE_AE, fixture.log)
        query = retrieve_query("IMAGE", StudyInstanceUID="", SeriesInstanceUID="", SOPInstanceUID="")
        model, total = "study", len(corpus.files)
    try:
        async with WireTap(peer.port) as tap:
            async with our_scu().associate(HOST, tap.port, peer.ae_title, extended=RELATIONAL) as assoc:
                responses = assoc.c_find(query, model=model)
                first = None
                async with responses:
                    async for ds in responses:
                        first = ds
                        break
                assert first is not None
                deadline = time.monotonic() + 15
                while responses.status is None and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
                assert responses.status is not None, "the final response was never drained"
                assert (await assoc.c_echo()).is_success  # the association carries on
    finally:
        if proc is not None:
            stop_process(proc)

    commands = tap.commands
    finds = [c for c in commands if c.command == C_FIND_RQ]
    assert len(finds) == 1 and finds[0].sender == "scu"
    mid = finds[0].message_id
    cancels = [c for c in commands if c.command == C_CANCEL_RQ]
    assert len(cancels) == 1 and cancels[0].sender == "scu" and cancels[0].responding_to == mid, cancels
    answers = [c for c in commands if c.command == C_FIND_RSP and c.responding_to == mid]
    pending = [c for c in answers if c.status in (0xFF00, 0xFF01)]
    finals = [c for c in answers if c.status not in (0xFF00, 0xFF01)]
    assert len(finals) == 1 and finals[0] is answers[-1], answers
    assert pending and cancels[0].seq > pending[0].seq  # we cancelled in reaction to the first match
    final = finals[0].status
    assert int(responses.status) == final
    if final == 0xFE00 and len(pending) == total:
        # Every match went out, then the C-CANCEL was read before the final response:
        # Cancel is the peer's to choose then (PS3.4 C.4.1.3.1; dcmqrscp does, under
        # load); serve answers Success once nothing was left unsent.
        assert peer_name != "serve", "serve: Cancel after all its matches"
        assert cancels[0].seq < finals[0].seq, f"{peer_name}: Cancel for a C-CANCEL sent after the final response"
    elif final == 0xFE00:
        assert len(pending) < total
    else:
        assert final == 0x0000, f"{peer_name}: final status {final:#06x}"
        assert len(pending) == total, f"{peer_name}: Success after {len(pending)} of {total} matches"
    if peer_name == "wlmscpfs-slow":
        assert final == 0xFE00, "one response per second leaves time to cancel"


async def test_leaving_async_with_waits_for_the_cancel(serve: Serve) -> None:
    async with our_scu().associate(HOST, serve.port, SERVE_AE, extended=RELATIONAL) as assoc:
        responses = assoc.c_find(retrieve_query("IMAGE", SOPInstanceUID="", StudyInstanceUID=""), model="study")
        async with responses:
            async for _ds in responses:
                break
        status_on_leaving = responses.status
        deadline = time.monotonic() + 10  # let the background drain end before we release
        while responses.status is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert responses.status is not None
    assert status_on_leaving is not None, "the cancel had not finished when the `async with` block was left"
    assert int(status_on_leaving) in (0x0000, 0xFE00)


def pynetdicom_find_then_cancel(port: int) -> list[int]:
    """pynetdicom SCU: C-FIND, and a C-CANCEL right after the first pending response."""
    ae = PynetdicomAE(ae_title="PYNETSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = WAIT
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind, [EXPLICIT_LE])
    assoc = ae.associate(HOST, port, ae_title="QRSCP")
    assert assoc.is_established
    statuses: list[int] = []
    try:
        query = retrieve_query("STUDY", PatientID="", StudyInstanceUID="")
        for status, _identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind, msg_id=7):
            statuses.append(int(status.Status))
            if len(statuses) == 1:
                assoc.send_c_cancel(7, query_model=StudyRootQueryRetrieveInformationModelFind)
    finally:
        assoc.release()
    return statuses


async def test_pynetdicom_cancels_find_on_our_scp() -> None:
    ae = da.AE("QRSCP")
    ae.add_supported_context(MODELS["study"]["find"])
    yielded = 0
    ended = asyncio.Event()
    seen_cancel: list[bool] = []

    @ae.on_c_find
    async def find(request: Any) -> AsyncIterator[Dataset]:
        nonlocal yielded
        try:
            for i in range(200):  # 10 s if nobody cancels
                yielded += 1
                yield retrieve_query(
                    "STUDY", PatientID=f"P{i:03d}", StudyInstanceUID=f"1.2.826.0.1.3680043.2.1143.7.{i}"
                )
                await asyncio.sleep(0.05)
        finally:
            seen_cancel.append(request.cancelled)
            ended.set()

    async with await ae.start_server(HOST, 0) as server:
        statuses = await asyncio.wait_for(asyncio.to_thread(pynetdicom_find_then_cancel, server.port), WAIT)
        await asyncio.wait_for(ended.wait(), 10)
    assert statuses[-1] == 0xFE00, [hex(s) for s in statuses]
    assert statuses[:-1] == [0xFF00] * (len(statuses) - 1) and 1 <= len(statuses) - 1 <= 5, statuses
    assert seen_cancel == [True]
    assert yielded <= 5, f"the handler went on to yield {yielded} matches"
