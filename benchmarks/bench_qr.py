"""Query/Retrieve benchmark: C-FIND latency and C-MOVE throughput of ``dimse-async serve``
against DCMTK ``dcmqrscp`` and pynetdicom's ``qrscp`` app, on the same data.

    python benchmarks/bench_qr.py            # 100,000-instance index (1,000 patients)
    python benchmarks/bench_qr.py --quick    # 10,000 instances, fewer repeats

What one run does (everything on 127.0.0.1, every process stopped at the end):

1. Writes a synthetic archive: PATIENTS x 2 studies x 5 series x 10 instances of a tiny
   CT-like template (8x8 pixels) whose UIDs and keys are patched in the template's
   bytes, plus a "move study" of MOVE_INSTANCES copies of pydicom's CT_small.dcm
   (~39 KB each) with new UIDs. Indexes it in-process with ``Archive.reindex()``.
2. Starts ``dimse-async serve`` on that archive and times five C-FIND queries (study
   level by PatientID, by PatientName prefix wildcard, by StudyDate range; series level
   within a study; image level within a series) over one persistent association of our
   SCU, then the same queries with ``/usr/bin/findscu`` spawned once per query.
3. Loads a comparison subset (the first COMPARE_PATIENTS patients plus the move study,
   by default 3,000 + 1,000 instances) into ``/usr/bin/dcmqrscp`` and pynetdicom's
   ``qrscp`` via C-STORE (``/usr/bin/storescu``), serves the same subset with a second
   ``serve`` (unless it is the whole archive), and runs the same queries against all.
   The subset is small because dcmqrscp (DCMTK 3.6.7) cannot hold more: its index file
   has 8,032-byte records and refuses to seek beyond 32 MiB ("DB ALERT: attempt to seek
   beyond 33554432 bytes"), i.e. about 4,170 instances per storage area, and it caps
   the studies per storage area at 500. Each insert also scans the whole index, so
   loading is quadratic (8,100 instances took 9 minutes).
4. C-MOVEs the move study from each server to ``/usr/bin/storescp`` and reports
   instances/s and MB/s.

Results: a table on stdout and ``benchmarks/results/qr-latest.json``. No timing is
asserted anywhere. pynetdicom's qrscp needs SQLAlchemy (``pip install sqlalchemy``);
without it that comparison is skipped.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import importlib.util
import io
import json
import math
import os
import platform
import pstats
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

import dimse_async
from dimse_async import AE
from dimse_async.archive.index import Archive
from dimse_async.log import configure_logging
from dimse_async.services.qr import MODELS

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "qr-latest.json"

FINDSCU = "/usr/bin/findscu"
STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
DCMQRSCP = "/usr/bin/dcmqrscp"
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
STUDY_FIND = MODELS["study"]["find"]
STUDY_MOVE = MODELS["study"]["move"]
# Our own test UID root (pydicom's) + a bench-specific arc; every component has a fixed
# width without leading zeros, so the patched files all have the same length.
UID_ROOT = "1.2.826.0.1.3680043.8.498.77"
STUDIES_PER_PATIENT = 2
SERIES_PER_STUDY = 5
INSTANCES_PER_SERIES = 10
BASE_DATE = dt.date(2010, 1, 1)

SCU_AET = "BENCH_SCU"
DEST_AET = "BENCH_DEST"


# ---------------------------------------------------------------------------
# synthetic data
# ---------------------------------------------------------------------------


def patient_name(p: int) -> str:
    return f"PAT{p:04d}^TEST"


def patient_id(p: int) -> str:
    return f"PID{p:05d}"


def study_uid(p: int, s: int) -> str:
    return f"{UID_ROOT}.1.1{p:05d}.1{s}"


def series_uid(p: int, s: int, e: int) -> str:
    return f"{UID_ROOT}.2.1{p:05d}.1{s}.1{e}"


def sop_uid(p: int, s: int, e: int, i: int) -> str:
    return f"{UID_ROOT}.3.1{p:05d}.1{s}.1{e}.1{i:02d}"


def study_date(p: int, s: int) -> str:
    return (BASE_DATE + dt.timedelta(days=p * STUDIES_PER_PATIENT + s)).strftime("%Y%m%d")


def _template_dataset(p: int, s: int, e: int, i: int) -> Dataset:
    """A small CT-like instance (8x8 pixels) with the per-file keys of (p, s, e, i)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE
    meta.MediaStorageSOPInstanceUID = sop_uid(p, s, e, i)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "BENCH_QR"
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.InstanceCreationDate = "20240101"
    ds.InstanceCreationTime = "120000"
    ds.SOPClassUID = CT_IMAGE
    ds.SOPInstanceUID = sop_uid(p, s, e, i)
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = study_date(p, s)
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = "101500"
    ds.AccessionNumber = f"A{p:05d}{s:02d}"
    ds.Modality = "CT"
    ds.Manufacturer = "BENCHMARK SYNTHETIC"
    ds.InstitutionName = "DIMSE ASYNC BENCH HOSPITAL"
    ds.ReferringPhysicianName = "REFERRING^DOCTOR"
    ds.StationName = "CTSTATION01"
    ds.StudyDescription = "CT CHEST ABDOMEN PELVIS W CONTRAST"
    ds.SeriesDescription = "AXIAL 5MM SOFT TISSUE"
    ds.ManufacturerModelName = "SYNTHETIC CT 3000"
    ds.OperatorsName = "OPERATOR^ONE"
    ds.PerformingPhysicianName = "PERFORMING^PHYSICIAN"
    ds.AdmittingDiagnosesDescription = "ROUTINE FOLLOW UP"
    ds.ProtocolName = "CHEST ABDOMEN PELVIS ROUTINE"
    ds.DeviceSerialNumber = "SN-000123456"
    ds.ContrastBolusAgent = "IODINATED CONTRAST 100ML"
    ds.ImageComments = "SYNTHETIC IMAGE FOR THE DIMSE-ASYNC QUERY/RETRIEVE BENCHMARK; NOT A REAL PATIENT."
    ds.RequestedProcedureDescription = "CT CHEST ABDOMEN PELVIS WITH IV CONTRAST"
    ds.PatientName = patient_name(p)
    ds.PatientID = patient_id(p)
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "O"
    ds.PatientAge = "064Y"
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = "5.0"
    ds.KVP = "120"
    ds.DataCollectionDiameter = "500.0"
    ds.SoftwareVersions = "1.0"
    ds.ReconstructionDiameter = "350.0"
    ds.GantryDetectorTilt = "0.0"
    ds.TableHeight = "150.0"
    ds.RotationDirection = "CW"
    ds.ExposureTime = "500"
    ds.XRayTubeCurrent = "200"
    ds.Exposure = "100"
    ds.ConvolutionKernel = "STANDARD"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study_uid(p, s)
    ds.SeriesInstanceUID = series_uid(p, s, e)
    ds.StudyID = f"S{s}"
    ds.SeriesNumber = str(e + 1)
    ds.AcquisitionNumber = "1"
    ds.InstanceNumber = f"{i + 1:02d}"
    ds.ImagePositionPatient = ["-175.0", "-175.0", "-100.0"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = f"{UID_ROOT}.9.1"
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = "-100.0"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = 8
    ds.Columns = 8
    ds.PixelSpacing = ["0.683594", "0.683594"]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.PixelData = bytes(range(128))
    return ds


class Template:
    """The encoded template and where each per-file value sits in it.

    The fields are located by their exact Explicit VR Little Endian element header and
    value, so a patch can never land anywhere else; all values have fixed widths.
    """

    # keyword -> (group, element, VR, function of (p, s, e, i) -> str)
    FIELDS: tuple[tuple[str, int, int, str, Callable[[int, int, int, int], str]], ...] = (
        ("MediaStorageSOPInstanceUID", 0x0002, 0x0003, "UI", lambda p, s, e, i: sop_uid(p, s, e, i)),
        ("SOPInstanceUID", 0x0008, 0x0018, "UI", lambda p, s, e, i: sop_uid(p, s, e, i)),
        ("StudyDate", 0x0008, 0x0020, "DA", lambda p, s, e, i: study_date(p, s)),
        ("SeriesDate", 0x0008, 0x0021, "DA", lambda p, s, e, i: study_date(p, s)),
        ("AcquisitionDate", 0x0008, 0x0022, "DA", lambda p, s, e, i: study_date(p, s)),
        ("ContentDate", 0x0008, 0x0023, "DA", lambda p, s, e, i: study_date(p, s)),
        ("AccessionNumber", 0x0008, 0x0050, "SH", lambda p, s, e, i: f"A{p:05d}{s:02d}"),
        ("PatientName", 0x0010, 0x0010, "PN", lambda p, s, e, i: patient_name(p)),
        ("PatientID", 0x0010, 0x0020, "LO", lambda p, s, e, i: patient_id(p)),
        ("StudyInstanceUID", 0x0020, 0x000D, "UI", lambda p, s, e, i: study_uid(p, s)),
        ("SeriesInstanceUID", 0x0020, 0x000E, "UI", lambda p, s, e, i: series_uid(p, s, e)),
        ("StudyID", 0x0020, 0x0010, "SH", lambda p, s, e, i: f"S{s}"),
        ("SeriesNumber", 0x0020, 0x0011, "IS", lambda p, s, e, i: str(e + 1)),
        ("InstanceNumber", 0x0020, 0x0013, "IS", lambda p, s, e, i: f"{i + 1:02d}"),
    )

    def __init__(self) -> None:
        buf = io.BytesIO()
        ds = _template_dataset(0, 0, 0, 0)
        ds.save_as(buf, enforce_file_format=True)
        self.data = bytes(buf.getvalue())
        self.slots: list[tuple[int, int, Callable[[int, int, int, int], bytes]]] = []
        for _keyword, group, elem, vr, fn in self.FIELDS:
            value = self._encode(vr, fn(0, 0, 0, 0))
            header = (
                group.to_bytes(2, "little")
                + elem.to_bytes(2, "little")
                + vr.encode()
                + len(value).to_bytes(2, "little")
            )
            at = self.data.find(header + value)
            if at < 0 or self.data.find(header + value, at + 1) >= 0:
                raise RuntimeError(f"template: cannot locate ({group:04X},{elem:04X}) uniquely")
            self.slots.append((at + len(header), len(value), self._encoder(vr, fn)))

    @staticmethod
    def _encode(vr: str, text: str) -> bytes:
        raw = text.encode("ascii")
        if len(raw) % 2:
            raw += b"\0" if vr == "UI" else b" "
        return raw

    def _encoder(self, vr: str, fn: Callable[[int, int, int, int], str]) -> Callable[[int, int, int, int], bytes]:
        return lambda p, s, e, i: self._encode(vr, fn(p, s, e, i))

    def instance(self, p: int, s: int, e: int, i: int) -> bytes:
        out = bytearray(self.data)
        for offset, length, enc in self.slots:
            value = enc(p, s, e, i)
            if len(value) != length:
                raise ValueError(f"value width changed at offset {offset}: {value!r}")
            out[offset : offset + length] = value
        return bytes(out)


def write_tiny_archive(root: Path, patients: int) -> tuple[int, int]:
    """PATIENTS x 2 x 5 x 10 instances under root/tiny/<patient>/; returns (files, bytes)."""
    tpl = Template()
    # sanity: a patched instance must read back with the patched values
    check = pydicom.dcmread(io.BytesIO(tpl.instance(7, 1, 3, 9)))
    assert check.SOPInstanceUID == sop_uid(7, 1, 3, 9) and check.PatientName == patient_name(7)
    assert check.file_meta.MediaStorageSOPInstanceUID == sop_uid(7, 1, 3, 9)
    files = nbytes = 0
    for p in range(patients):
        pdir = root / "tiny" / f"{p:05d}"
        pdir.mkdir(parents=True, exist_ok=True)
        for s in range(STUDIES_PER_PATIENT):
            for e in range(SERIES_PER_STUDY):
                for i in range(INSTANCES_PER_SERIES):
                    data = tpl.instance(p, s, e, i)
                    with open(pdir / f"{s}{e}{i:02d}.dcm", "wb") as f:
                        f.write(data)
                    files += 1
                    nbytes += len(data)
    return files, nbytes


MOVE_PATIENT_ID = "MOVE00001"
MOVE_STUDY_UID = f"{UID_ROOT}.5.1"


def write_move_study(root: Path, count: int) -> tuple[int, int]:
    """``count`` copies of CT_small.dcm in one study (4 series) under root/move/."""
    src = get_testdata_file("CT_small.dcm")
    assert src is not None
    ds = pydicom.dcmread(src)
    out = root / "move"
    out.mkdir(parents=True, exist_ok=True)
    ds.PatientID = MOVE_PATIENT_ID
    ds.PatientName = "MOVE^STUDY"
    ds.StudyInstanceUID = MOVE_STUDY_UID
    ds.StudyDate = "20240101"
    ds.AccessionNumber = "MOVE1"
    nbytes = 0
    for n in range(count):
        series = n % 4
        ds.SeriesInstanceUID = f"{UID_ROOT}.6.1{series}"
        ds.SeriesNumber = series + 1
        ds.InstanceNumber = n + 1
        uid = f"{UID_ROOT}.7.1{n:05d}"
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        path = out / f"{n:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        nbytes += path.stat().st_size
    return count, nbytes


# ---------------------------------------------------------------------------
# queries
# ---------------------------------------------------------------------------


@dataclass
class Query:
    name: str
    what: str
    keys: list[tuple[str, str]]  # (keyword, value) in the order findscu gets them
    expected: int

    def dataset(self) -> Dataset:
        ds = Dataset()
        for keyword, value in self.keys:
            setattr(ds, keyword, value)
        return ds

    def findscu_keys(self) -> list[str]:
        out = []
        for keyword, value in self.keys:
            out += ["-k", f"{keyword}={value}" if value else keyword]
        return out


MIN_COMPARE_PATIENTS = 20


def build_queries() -> list[Query]:
    """Five queries whose answers are the same on the full archive and on any subset of
    at least MIN_COMPARE_PATIENTS patients (they only touch patients 10..19)."""
    p = 12
    prefix = f"PAT{p // 10:03d}"  # PAT001* -> patients 10..19
    lo_study, hi_study = 20, 29  # study indexes (p * 2 + s) 20..29 -> patients 10..14
    lo = (BASE_DATE + dt.timedelta(days=lo_study)).strftime("%Y%m%d")
    hi = (BASE_DATE + dt.timedelta(days=hi_study)).strftime("%Y%m%d")
    study_keys = [
        ("StudyDate", ""),
        ("StudyTime", ""),
        ("AccessionNumber", ""),
        ("PatientName", ""),
        ("PatientID", ""),
        ("StudyID", ""),
        ("StudyDescription", ""),
        ("StudyInstanceUID", ""),
    ]

    def study(**over: str) -> list[tuple[str, str]]:
        return [("QueryRetrieveLevel", "STUDY")] + [(k, over.get(k, v)) for k, v in study_keys]

    return [
        Query("study_by_patient_id", f"STUDY, PatientID={patient_id(p)}", study(PatientID=patient_id(p)), 2),
        Query(
            "study_by_name_prefix",
            f"STUDY, PatientName={prefix}*",
            study(PatientName=f"{prefix}*"),
            10 * STUDIES_PER_PATIENT,
        ),
        Query("study_by_date_range", f"STUDY, StudyDate={lo}-{hi}", study(StudyDate=f"{lo}-{hi}"), 10),
        Query(
            "series_in_study",
            "SERIES, StudyInstanceUID=<one study>",
            [
                ("QueryRetrieveLevel", "SERIES"),
                ("StudyInstanceUID", study_uid(p, 1)),
                ("SeriesInstanceUID", ""),
                ("Modality", ""),
                ("SeriesNumber", ""),
                ("SeriesDescription", ""),
            ],
            SERIES_PER_STUDY,
        ),
        Query(
            "image_in_series",
            "IMAGE, Study+SeriesInstanceUID=<one series>",
            [
                ("QueryRetrieveLevel", "IMAGE"),
                ("StudyInstanceUID", study_uid(p, 1)),
                ("SeriesInstanceUID", series_uid(p, 1, 2)),
                ("SOPInstanceUID", ""),
                ("SOPClassUID", ""),
                ("InstanceNumber", ""),
            ],
            INSTANCES_PER_SERIES,
        ),
    ]


def stats(samples: list[float]) -> dict[str, Any]:
    """Milliseconds: median, p95 (nearest rank), min, mean."""
    if not samples:
        return {"n": 0}
    xs = sorted(samples)
    n = len(xs)
    med = xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2
    p95 = xs[max(0, math.ceil(0.95 * n) - 1)]
    return {
        "n": n,
        "median_ms": round(med * 1e3, 3),
        "p95_ms": round(p95 * 1e3, 3),
        "min_ms": round(xs[0] * 1e3, 3),
        "mean_ms": round(sum(xs) / n * 1e3, 3),
    }


# ---------------------------------------------------------------------------
# processes
# ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """A server subprocess with its output in a log file; always stopped by ``stop``."""

    def __init__(
        self, name: str, argv: list[str], log: Path, *, env: dict[str, str] | None = None, cwd: Path | None = None
    ):
        self.name, self.argv, self.log_path = name, argv, log
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        self.started = time.perf_counter()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_port(self, port: int, timeout: float = 60.0) -> float:
        """Wait until ``port`` accepts connections; returns seconds since start."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{self.log_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return time.perf_counter() - self.started
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not listen on {port} within {timeout} s")

    def wait_text(self, text: str, timeout: float = 600.0) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log_text():
                return time.perf_counter() - self.started
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{self.log_text()[-2000:]}")
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not print {text!r} within {timeout} s")

    def _children(self) -> list[Any]:
        try:
            import psutil
        except ImportError:  # without psutil only the process itself is stopped
            return []
        try:
            return list(psutil.Process(self.popen.pid).children(recursive=True))
        except psutil.Error:
            return []

    def stop(self, timeout: float = 15.0) -> None:
        children = self._children() if self.popen.poll() is None else []
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        for child in children:  # e.g. dcmqrscp's per-association processes
            try:
                child.terminate()
                child.wait(timeout)
            except Exception:
                try:
                    child.kill()
                except Exception:
                    pass
        if not self._log.closed:
            self._log.close()


@contextmanager
def running(stack: ExitStack, proc: Proc) -> Iterator[Proc]:
    """Stop ``proc`` when the block ends (and, as a backstop, when ``stack`` closes)."""
    stack.callback(proc.stop)
    try:
        yield proc
    finally:
        proc.stop()


def start_serve(work: Path, name: str, root: Path, port: int, dest_port: int, profile: Path | None = None) -> Proc:
    cfg = work / f"{name}.toml"
    cfg.write_text(
        f'ae_title = "DIMSE_ASYNC"\nhost = "127.0.0.1"\nport = {port}\nstorage_dir = "{root}"\n'
        f"require_called_ae = false\n\n[known_aes]\n"
        f'{DEST_AET} = {{ host = "127.0.0.1", port = {dest_port} }}\n'
    )
    argv = [sys.executable]
    if profile is not None:
        argv += ["-m", "cProfile", "-o", str(profile)]
    argv += ["-m", "dimse_async", "serve", "--config", str(cfg), "--log-level", "WARNING"]
    return Proc(name, argv, work / f"{name}.log")


def start_dcmqrscp(work: Path, port: int, dest_port: int) -> Proc:
    storage = work / "dcmqrscp-db"
    storage.mkdir()
    cfg = work / "dcmqrscp.cfg"
    cfg.write_text(
        f"NetworkTCPPort  = {port}\nMaxPDUSize      = 131072\nMaxAssociations = 16\n\n"
        f"HostTable BEGIN\ndest = ({DEST_AET}, 127.0.0.1, {dest_port})\nHostTable END\n\n"
        "VendorTable BEGIN\nVendorTable END\n\n"
        # (max studies, max bytes per study): well above what we load
        # (max studies, max bytes per study): 500 is dcmqrscp's upper limit for studies
        f"AETable BEGIN\nDCMQRSCP {storage} RW (500, 1024mb) ANY\nAETable END\n"
    )
    # Default (fork per association) mode: --single-process segfaults in DCMTK 3.6.7
    # when the first association ends.
    argv = [DCMQRSCP, "-c", str(cfg), str(port)]
    return Proc("dcmqrscp", argv, work / "dcmqrscp.log", env=DCMTK_ENV)


def start_pynetdicom(work: Path, port: int, dest_port: int) -> Proc:
    base = work / "pynetdicom-qrscp"
    base.mkdir()
    cfg = base / "qrscp.ini"
    cfg.write_text(
        "[DEFAULT]\n  ae_title: PYNETDICOM\n"
        f"  port: {port}\n  max_pdu: 262144\n  acse_timeout: 60\n  dimse_timeout: 120\n  network_timeout: 120\n"
        "  bind_address: 127.0.0.1\n"
        f"  instance_location: {base / 'instances'}\n  database_location: {base / 'instances.sqlite'}\n"
        "  log_identifier: False\n\n"
        f"[{DEST_AET}]\n  address: 127.0.0.1\n  port: {dest_port}\n"
    )
    argv = [sys.executable, "-m", "pynetdicom", "qrscp", "-q", "-c", str(cfg)]
    return Proc("pynetdicom-qrscp", argv, work / "pynetdicom-qrscp.log", cwd=base)


def start_storescp(work: Path, port: int, out: Path) -> Proc:
    out.mkdir()
    argv = [STORESCP, "-aet", DEST_AET, "--max-pdu", "131072", "-od", str(out), str(port)]
    return Proc("storescp", argv, work / "storescp.log", env=DCMTK_ENV)


def load_with_storescu(port: int, aec: str, dirs: list[Path], expect: int, log: Path) -> dict[str, Any]:
    """C-STORE ``dirs`` into a server with /usr/bin/storescu (one association)."""
    argv = [STORESCU, "-aet", SCU_AET, "-aec", aec, "+sd", "+r", "-nh", "127.0.0.1", str(port), *map(str, dirs)]
    t0 = time.perf_counter()
    with open(log, "wb") as f:
        proc = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, env=DCMTK_ENV, check=False, timeout=3600)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"storescu into {aec} failed ({proc.returncode}), see {log}")
    return {"instances": expect, "seconds": round(seconds, 2), "instances_per_s": round(expect / seconds, 1)}


# ---------------------------------------------------------------------------
# measurements
# ---------------------------------------------------------------------------


def scu_ae() -> AE:
    ae = AE(SCU_AET, dimse_timeout=600.0, acse_timeout=60.0, network_timeout=None)
    ae.add_requested_context(STUDY_FIND)
    ae.add_requested_context(STUDY_MOVE)
    return ae


async def _find_suite(port: int, aec: str, queries: list[Query], repeats: int, warmup: int) -> dict[str, Any]:
    ae = scu_ae()
    times: dict[str, list[float]] = {q.name: [] for q in queries}
    counts: dict[str, int] = {}
    statuses: dict[str, str] = {}
    datasets = {q.name: q.dataset() for q in queries}
    async with ae.associate("127.0.0.1", port, aec, async_ops=(1, 1)) as assoc:
        for r in range(warmup + repeats):
            for q in queries:  # round robin, so drift hits every query alike
                t0 = time.perf_counter()
                responses = assoc.c_find(datasets[q.name], "study")
                n = 0
                async for _ in responses:
                    n += 1
                elapsed = time.perf_counter() - t0
                if r >= warmup:
                    times[q.name].append(elapsed)
                counts[q.name] = n
                statuses[q.name] = f"0x{int(responses.status or 0):04X}"
    out = {}
    for q in queries:
        out[q.name] = {**stats(times[q.name]), "results": counts[q.name], "status": statuses[q.name]}
        if counts[q.name] != q.expected:
            out[q.name]["mismatch"] = f"expected {q.expected} results, got {counts[q.name]}"
    return out


def find_suite(port: int, aec: str, queries: list[Query], repeats: int, warmup: int = 3) -> dict[str, Any]:
    return dimse_async.run(_find_suite(port, aec, queries, repeats, warmup))


def findscu_suite(port: int, aec: str, queries: list[Query], repeats: int) -> dict[str, Any]:
    """The queries with /usr/bin/findscu, one process (and association) per query."""
    out = {}
    for q in queries:
        argv = [FINDSCU, "-v", "-S", "-aet", SCU_AET, "-aec", aec, "127.0.0.1", str(port), *q.findscu_keys()]
        times = []
        results = -1
        for r in range(repeats + 1):
            t0 = time.perf_counter()
            proc = subprocess.run(argv, capture_output=True, env=DCMTK_ENV, check=False, timeout=300)
            elapsed = time.perf_counter() - t0
            if proc.returncode != 0:
                raise RuntimeError(f"findscu {q.name} -> {aec} failed: {proc.stderr.decode(errors='replace')[-800:]}")
            text = (proc.stdout + proc.stderr).decode(errors="replace")
            results = sum(1 for line in text.splitlines() if "Find Response:" in line and "(Pending)" in line)
            if r:  # the first run warms the page cache and the server
                times.append(elapsed)
        out[q.name] = {**stats(times), "results": results}
        if results != q.expected:
            out[q.name]["mismatch"] = f"expected {q.expected} results, got {results}"
    return out


def clear_dir(path: Path) -> None:
    for child in path.iterdir():
        child.unlink()


def count_files(path: Path) -> int:
    return sum(1 for _ in path.iterdir())


async def _move_suite(port: int, aec: str, repeats: int, dest_dir: Path, count: int, nbytes: int) -> dict[str, Any]:
    ae = scu_ae()
    runs = []
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = MOVE_STUDY_UID
    async with ae.associate("127.0.0.1", port, aec, async_ops=(1, 1)) as assoc:
        for _ in range(repeats):
            clear_dir(dest_dir)
            t0 = time.perf_counter()
            responses = assoc.c_move(query, DEST_AET, "study")
            async for _progress in responses:
                pass
            seconds = time.perf_counter() - t0
            result = responses.result
            received = count_files(dest_dir)
            runs.append(
                {
                    "seconds": round(seconds, 3),
                    "instances_per_s": round(count / seconds, 1),
                    "mb_per_s": round(nbytes / seconds / 1e6, 2),
                    "status": f"0x{int(responses.status or 0):04X}",
                    "completed": result.completed if result else None,
                    "failed": result.failed if result else None,
                    "received_files": received,
                }
            )
    best = min(runs, key=lambda r: r["seconds"])
    med = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]
    summary = {
        "instances": count,
        "mb": round(nbytes / 1e6, 2),
        "median_seconds": med["seconds"],
        "median_instances_per_s": med["instances_per_s"],
        "median_mb_per_s": med["mb_per_s"],
        "best_instances_per_s": best["instances_per_s"],
        "runs": runs,
    }
    bad = [r for r in runs if r["received_files"] != count or r["status"] != "0x0000"]
    if bad:
        summary["problem"] = f"{len(bad)} run(s) incomplete: {bad[0]}"
    return summary


def move_suite(port: int, aec: str, repeats: int, dest_dir: Path, count: int, nbytes: int) -> dict[str, Any]:
    return dimse_async.run(_move_suite(port, aec, repeats, dest_dir, count, nbytes))


def reindex(root: Path) -> dict[str, Any]:
    async def go() -> tuple[tuple[int, int, int], int]:
        archive = Archive(root)
        try:
            result = await archive.reindex()
            return result, await archive.count()
        finally:
            archive.close()

    t0 = time.perf_counter()
    (added, skipped, gone), total = dimse_async.run(go())
    seconds = time.perf_counter() - t0
    return {
        "instances": total,
        "added": added,
        "skipped": skipped,
        "gone": gone,
        "seconds": round(seconds, 2),
        "instances_per_s": round(added / seconds, 1) if seconds else None,
    }


def archive_find_inprocess(root: Path, queries: list[Query], repeats: int) -> dict[str, Any]:
    """``Archive.find()`` alone (SQL + matching, no network): the database share of a C-FIND."""

    async def go() -> dict[str, Any]:
        archive = Archive(root)
        try:
            out = {}
            for q in queries:
                ds = q.dataset()
                await archive.find(STUDY_FIND, ds)  # warm
                times = []
                n = 0
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    n = len(await archive.find(STUDY_FIND, ds))
                    times.append(time.perf_counter() - t0)
                out[q.name] = {**stats(times), "results": n}
            return out
        finally:
            archive.close()

    return dimse_async.run(go())


def profile_archive_queries(root: Path, queries: list[Query], repeats: int, top: int) -> str:
    """cProfile of the query path on the archive's worker thread (which cProfile on the
    serve process does not see), run synchronously here."""
    archive = Archive(root)
    prof = cProfile.Profile()
    try:
        query = getattr(archive, "_query", None)
        if query is None:
            return "(Archive._query not available)"
        for q in queries:
            query("study", q.dataset())
        prof.enable()
        for _ in range(repeats):
            for q in queries:
                query("study", q.dataset())
        prof.disable()
    finally:
        archive.close()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(top)
    return buf.getvalue()


def profile_text(path: Path, top: int) -> str:
    buf = io.StringIO()
    pstats.Stats(str(path), stream=buf).sort_stats("tottime").print_stats(top)
    return buf.getvalue()


# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------


def fmt(cell: dict[str, Any] | None) -> str:
    if not cell or "median_ms" not in cell:
        return "-"
    flag = " !" if "mismatch" in cell else ""
    return f"{cell['median_ms']:.2f} / {cell['p95_ms']:.2f}{flag}"


def print_table(title: str, columns: dict[str, dict[str, Any]], queries: list[Query]) -> None:
    names = list(columns)
    width = max(22, *(len(n) + 2 for n in names))
    print(f"\n{title}  (median / p95 ms; '!' = unexpected result count)")
    print(f"{'query':<24}{'hits':>5}  " + "".join(f"{n:>{width}}" for n in names))
    for q in queries:
        cells = "".join(f"{fmt(columns[n].get(q.name)):>{width}}" for n in names)
        print(f"{q.name:<24}{q.expected:>5}  {cells}")


def ratio(a: float | None, b: float | None) -> float | None:
    if not a or not b:
        return None
    return round(b / a, 2)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="10,000 instances (100 patients), fewer repeats")
    ap.add_argument(
        "--patients", type=int, help="patients in the main archive (x100 instances; default 1000, quick 100)"
    )
    ap.add_argument(
        "--compare-patients",
        type=int,
        help="patients in the subset loaded into the comparison servers (default 30 = 3,000 instances; "
        "dcmqrscp holds at most ~4,170 instances in all)",
    )
    ap.add_argument(
        "--repeats", type=int, help="timed repeats per query over the persistent association (50; quick 20)"
    )
    ap.add_argument("--findscu-repeats", type=int, help="findscu runs per query (20; quick 5)")
    ap.add_argument("--move-instances", type=int, help="instances in the moved study (1000; quick 500)")
    ap.add_argument("--move-repeats", type=int, help="C-MOVEs per server (3; quick 2)")
    ap.add_argument("--no-dcmqrscp", action="store_true", help="skip the DCMTK dcmqrscp comparison")
    ap.add_argument("--no-pynetdicom", action="store_true", help="skip the pynetdicom qrscp comparison")
    ap.add_argument(
        "--profile", action="store_true", help="also cProfile serve and the archive query path (diagnostic)"
    )
    ap.add_argument("--workdir", help="where to put the data (default: a temporary directory, removed afterwards)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--output", default=str(RESULTS), help=f"JSON results (default {RESULTS.relative_to(HERE.parent)})")
    args = ap.parse_args(argv)

    patients = args.patients or (100 if args.quick else 1000)
    compare_patients = min(args.compare_patients or 30, patients)
    repeats = args.repeats or (20 if args.quick else 50)
    findscu_repeats = args.findscu_repeats or (5 if args.quick else 20)
    move_instances = args.move_instances or (500 if args.quick else 1000)
    move_repeats = args.move_repeats or (2 if args.quick else 3)
    if compare_patients < MIN_COMPARE_PATIENTS:
        ap.error(f"--compare-patients must be at least {MIN_COMPARE_PATIENTS} (the queries touch patients 10..19)")
    for tool in (FINDSCU, STORESCU, STORESCP) + (() if args.no_dcmqrscp else (DCMQRSCP,)):
        if not os.access(tool, os.X_OK):
            ap.error(f"{tool} not found (apt-get install dcmtk)")
    use_pynetdicom = not args.no_pynetdicom
    skipped: dict[str, str] = {}
    if use_pynetdicom and importlib.util.find_spec("sqlalchemy") is None:
        use_pynetdicom = False
        skipped["pynetdicom-qrscp"] = "SQLAlchemy not installed (pip install sqlalchemy)"

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-qr-"))
    work.mkdir(parents=True, exist_ok=True)
    queries = build_queries()
    configure_logging("WARNING")  # our SCU in this process: no per-PDU debug lines

    def on_sigterm(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)  # unwinds, so every server started is stopped

    signal.signal(signal.SIGTERM, on_sigterm)
    t_start = time.perf_counter()
    results: dict[str, Any] = {
        "benchmark": "qr",
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "mode": "quick" if args.quick else "full",
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "pydicom": pydicom.__version__,
            "dimse_async": dimse_async.__version__,
            "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        },
        "queries": {q.name: {"what": q.what, "expected_results": q.expected} for q in queries},
        "skipped": skipped,
    }
    try:
        import pynetdicom

        results["machine"]["pynetdicom"] = pynetdicom.__version__
    except ImportError:  # pragma: no cover
        pass

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    main_root = work / "archive-main"
    cmp_root = work / "archive-compare" if compare_patients < patients else main_root
    find: dict[str, dict[str, Any]] = {}
    findscu: dict[str, dict[str, Any]] = {}
    moves: dict[str, dict[str, Any]] = {}
    loads: dict[str, dict[str, Any]] = {}
    try:
        # -- data ---------------------------------------------------------------
        t0 = time.perf_counter()
        files, nbytes = write_tiny_archive(main_root, patients)
        gen_s = time.perf_counter() - t0
        say(f"wrote {files} tiny instances ({nbytes / files:.0f} B each) in {gen_s:.1f} s")
        t0 = time.perf_counter()
        move_count, move_bytes = write_move_study(main_root, move_instances)
        say(
            f"wrote move study: {move_count} x CT_small ({move_bytes / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f} s"
        )
        results["dataset"] = {
            "patients": patients,
            "studies": patients * STUDIES_PER_PATIENT + 1,
            "series": patients * STUDIES_PER_PATIENT * SERIES_PER_STUDY + 4,
            "tiny_instances": files,
            "tiny_instance_bytes": nbytes // files,
            "move_instances": move_count,
            "move_bytes": move_bytes,
            "generate_seconds": round(gen_s, 2),
            "compare_patients": compare_patients,
            "compare_instances": compare_patients * 100 + move_count,
        }
        say("indexing the main archive with Archive.reindex() ...")
        results["index_main"] = reindex(main_root)
        say(f"indexed: {results['index_main']}")
        if cmp_root != main_root:
            for p in range(compare_patients):
                src = main_root / "tiny" / f"{p:05d}"
                dst = cmp_root / "tiny" / f"{p:05d}"
                dst.mkdir(parents=True)
                for f in src.iterdir():
                    os.link(f, dst / f.name)
            shutil.copytree(main_root / "move", cmp_root / "move", copy_function=os.link)
            results["index_compare"] = reindex(cmp_root)
            say(f"indexed comparison subset: {results['index_compare']}")
        load_dirs = [main_root / "tiny" / f"{p:05d}" for p in range(compare_patients)] + [main_root / "move"]
        compare_total = compare_patients * 100 + move_count

        with ExitStack() as stack:
            dest_port = free_port()
            dest_dir = work / "dest"
            dest = start_storescp(work, dest_port, dest_dir)
            stack.callback(dest.stop)
            dest.wait_port(dest_port)

            # -- ours, main archive ---------------------------------------------------
            port = free_port()
            prof_path = work / "serve.prof" if args.profile else None
            label_main = f"serve {patients * 100 // 1000}k"
            with running(stack, start_serve(work, "serve-main", main_root, port, dest_port, prof_path)) as serve:
                startup = serve.wait_text("listening on")
                results["serve_main_startup_seconds"] = round(startup, 2)
                say(f"serve (main, {files + move_count} instances) listening after {startup:.1f} s; C-FIND x{repeats}")
                find[label_main] = find_suite(port, "DIMSE_ASYNC", queries, repeats)
                say("findscu against serve (main)")
                findscu[label_main] = findscu_suite(port, "DIMSE_ASYNC", queries, findscu_repeats)
                if cmp_root == main_root:
                    say("C-MOVE from serve")
                    moves["serve"] = move_suite(port, "DIMSE_ASYNC", move_repeats, dest_dir, move_count, move_bytes)
            results["archive_find_inprocess_main"] = archive_find_inprocess(main_root, queries, repeats)
            if prof_path is not None and prof_path.exists():
                results["profile_serve"] = profile_text(prof_path, 30)
                results["profile_archive_query"] = profile_archive_queries(main_root, queries, 20, 30)

            # -- ours, comparison subset -------------------------------------------------
            label_cmp = f"serve {compare_total / 1000:.1f}k"
            if cmp_root != main_root:
                port = free_port()
                prof_cmp = work / "serve-compare.prof" if args.profile else None
                with running(stack, start_serve(work, "serve-compare", cmp_root, port, dest_port, prof_cmp)) as serve:
                    serve.wait_text("listening on")
                    say(f"serve (subset, {compare_total} instances): C-FIND x{repeats}")
                    find[label_cmp] = find_suite(port, "DIMSE_ASYNC", queries, repeats)
                    findscu[label_cmp] = findscu_suite(port, "DIMSE_ASYNC", queries, max(5, findscu_repeats // 2))
                    say("C-MOVE from serve")
                    moves["serve"] = move_suite(port, "DIMSE_ASYNC", move_repeats, dest_dir, move_count, move_bytes)
                results["archive_find_inprocess_compare"] = archive_find_inprocess(cmp_root, queries, repeats)
                if prof_cmp is not None and prof_cmp.exists():
                    results["profile_serve_compare"] = profile_text(prof_cmp, 30)
            else:
                label_cmp = label_main

            # -- dcmqrscp ---------------------------------------------------------------------
            if not args.no_dcmqrscp:
                port = free_port()
                with running(stack, start_dcmqrscp(work, port, dest_port)) as proc:
                    proc.wait_port(port)
                    say(f"loading {compare_total} instances into dcmqrscp with storescu ...")
                    loads["dcmqrscp"] = load_with_storescu(
                        port, "DCMQRSCP", load_dirs, compare_total, work / "load-dcmqrscp.log"
                    )
                    alerts = proc.log_text().count("DB ALERT")
                    if alerts:
                        loads["dcmqrscp"]["db_alerts"] = alerts
                        say(f"WARNING: dcmqrscp logged {alerts} 'DB ALERT' lines: its index is over its limit")
                    say(f"loaded: {loads['dcmqrscp']}; C-FIND x{repeats}")
                    label = f"dcmqrscp {compare_total / 1000:.1f}k"
                    find[label] = find_suite(port, "DCMQRSCP", queries, repeats)
                    findscu[label] = findscu_suite(port, "DCMQRSCP", queries, max(5, findscu_repeats // 2))
                    say("C-MOVE from dcmqrscp")
                    moves["dcmqrscp"] = move_suite(port, "DCMQRSCP", move_repeats, dest_dir, move_count, move_bytes)

            # -- pynetdicom qrscp -------------------------------------------------------------
            if use_pynetdicom:
                port = free_port()
                with running(stack, start_pynetdicom(work, port, dest_port)) as proc:
                    proc.wait_port(port)
                    say(f"loading {compare_total} instances into pynetdicom qrscp with storescu ...")
                    loads["pynetdicom-qrscp"] = load_with_storescu(
                        port, "PYNETDICOM", load_dirs, compare_total, work / "load-pynetdicom.log"
                    )
                    say(f"loaded: {loads['pynetdicom-qrscp']}; C-FIND x{repeats}")
                    label = f"pynetdicom {compare_total / 1000:.1f}k"
                    # ~100x slower than the others: fewer repeats, or it alone would take many minutes
                    find[label] = find_suite(port, "PYNETDICOM", queries, min(repeats, 10), warmup=1)
                    findscu[label] = findscu_suite(port, "PYNETDICOM", queries, 3)
                    say("C-MOVE from pynetdicom qrscp")
                    moves["pynetdicom-qrscp"] = move_suite(
                        port, "PYNETDICOM", min(move_repeats, 2), dest_dir, move_count, move_bytes
                    )
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
        elif args.keep or args.workdir:
            print(f"work directory kept: {work}")

    results.update(find=find, findscu=findscu, load=loads, move=moves)

    # -- ratios: >1 means ours is faster ----------------------------------------------------------
    ratios: dict[str, Any] = {}
    for other in find:
        if other.startswith("serve"):
            continue
        ratios[f"c_find median: {other} / {label_cmp}"] = {
            q.name: ratio(find[label_cmp][q.name].get("median_ms"), find[other][q.name].get("median_ms"))
            for q in queries
        }
    for other in moves:
        if other == "serve":
            continue
        ratios[f"c_move instances/s: serve / {other}"] = ratio(
            moves[other]["median_instances_per_s"], moves["serve"]["median_instances_per_s"]
        )
    results["ratios"] = ratios
    results["total_seconds"] = round(time.perf_counter() - t_start, 1)
    results["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]

    # -- report ---------------------------------------------------------------------------------------
    print(f"\n=== Query/Retrieve benchmark ({results['mode']}; {results['total_seconds']} s) ===")
    ds_info = results["dataset"]
    print(
        f"data: {ds_info['tiny_instances']} tiny instances ({ds_info['tiny_instance_bytes']} B) in "
        f"{ds_info['patients']} patients / {ds_info['studies'] - 1} studies / {ds_info['series'] - 4} series, "
        f"+ move study {ds_info['move_instances']} x CT_small ({ds_info['move_bytes'] / 1e6:.1f} MB)"
    )
    for key in ("index_main", "index_compare"):
        if key in results:
            r = results[key]
            print(f"Archive.reindex() {key[6:]}: {r['added']} files in {r['seconds']} s ({r['instances_per_s']} /s)")
    print(f"serve startup on the indexed main archive: {results['serve_main_startup_seconds']} s")
    m = results["machine"]
    print(f"load average at start {m['loadavg_at_start']}, at end {m['loadavg_at_end']} (2 cores shared)")
    for name, r in loads.items():
        print(f"load into {name} via storescu: {r['instances']} in {r['seconds']} s ({r['instances_per_s']} /s)")
    print_table("C-FIND, our SCU, one persistent association", find, queries)
    odd = {(name, c["results"]) for name, col in find.items() for c in col.values() if "mismatch" in c}
    if odd:
        print("  unexpected result counts (server, hits):", sorted(odd)[:6])
    inproc = {"Archive.find main": results["archive_find_inprocess_main"]}
    if "archive_find_inprocess_compare" in results:
        inproc["Archive.find subset"] = results["archive_find_inprocess_compare"]
    print_table("Archive.find() in-process (no network)", inproc, queries)
    print_table("C-FIND, /usr/bin/findscu, one process per query", findscu, queries)
    print("\nC-MOVE of the move study to storescp (median of runs)")
    for name, r in moves.items():
        extra = f"  PROBLEM: {r['problem']}" if "problem" in r else ""
        print(
            f"  {name:<18} {r['instances']} inst, {r['mb']} MB: {r['median_seconds']:.2f} s  "
            f"{r['median_instances_per_s']:8.1f} inst/s  {r['median_mb_per_s']:6.2f} MB/s{extra}"
        )
    print("\nratios (>1: ours faster)")
    for key, value in ratios.items():
        print(f"  {key}: {value}")
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    if "profile_serve" in results:
        print("\n--- cProfile: serve process (event loop thread), by tottime ---")
        print(results["profile_serve"])
        if "profile_serve_compare" in results:
            print("--- cProfile: serve on the subset (C-FIND + C-MOVE), by tottime ---")
            print(results["profile_serve_compare"])
        print("--- cProfile: Archive._query (database thread work), by cumulative ---")
        print(results["profile_archive_query"])

    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
