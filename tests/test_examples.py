"""examples/fastapi_app.py and examples/ai_gateway.py, run for real under uvicorn
against ``dimse-async serve`` (a process) loaded by DCMTK ``storescu``.

- FastAPI: C-ECHO, C-FIND and C-MOVE through the app's association pool; the moved
  instances arrive at the SCP the app's lifespan started; one association serves all
  three requests; SIGTERM shuts everything down with exit status 0, and the library
  prints nothing into uvicorn's output.
- AI gateway: DCMTK ``storescu`` sends a study to the gateway; on release the gateway
  analyses the pixels with numpy, sends a derived Secondary Capture back to the
  sender's archive (``serve``) and has ``serve`` confirm it by storage commitment (the
  report says committed; ``serve`` logs the transaction); asking the archive to commit
  an instance it does not hold reports failure 0x0112. DCMTK ``findscu`` finds the
  result in the archive and ``getscu`` retrieves it; its pixels are checked against the
  same analysis done here.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from conftest import dcmtk, free_port, stop_process, wait_tcp
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

pytestmark = [pytest.mark.interop, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
ARCHIVE_AE = "ARCHIVE"
LISTENING = re.compile(r"listening on [\d.]+:(\d+);")


def make_study(directory: Path, patient_id: str, count: int = 3) -> tuple[str, list[Path]]:
    """``count`` CT instances of one new study (CT_small.dcm with new UIDs and pixels)."""
    directory.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    paths = []
    rng = np.random.default_rng(7)
    for i in range(count):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.PatientID = patient_id
        ds.PatientName = f"EXAMPLE^{patient_id}"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        pixels = ds.pixel_array.astype(np.int16) + rng.integers(0, 50, ds.pixel_array.shape, dtype=np.int16)
        ds.PixelData = pixels.tobytes()
        path = directory / f"{i}.dcm"
        ds.save_as(path)
        paths.append(path)
    return study, paths


@contextmanager
def serve_process(tmp_path: Path, known: dict[str, int]) -> Iterator[int]:
    """``dimse-async serve`` with ``known`` C-MOVE destinations; yields its port."""
    config = tmp_path / "serve.toml"
    lines = [
        f'ae_title = "{ARCHIVE_AE}"',
        f'host = "{HOST}"',
        "port = 0",
        f"storage_dir = {json.dumps(str(tmp_path / 'archive'))}",
        "",
        "[known_aes]",
    ]
    lines += [f'{title} = {{ host = "{HOST}", port = {port} }}' for title, port in known.items()]
    config.write_text("\n".join(lines) + "\n")
    out = tmp_path / "serve.stdout"
    with out.open("wb") as stdout, (tmp_path / "serve.log").open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dimse_async", "serve", "--config", str(config)],
            stdout=stdout, stderr=stderr, env=ENV, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            match = LISTENING.search(out.read_text())
            if match:
                break
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            time.sleep(0.05)
        assert match, "serve did not start"
        yield int(match[1])
    finally:
        assert stop_process(proc) == 0, (tmp_path / "serve.log").read_text()


def storescu(port: int, called: str, paths: list[Path], calling: str = "STORESCU") -> None:
    done = subprocess.run(
        [dcmtk("storescu"), "-to", "10", "-ta", "10", "-td", "20", "-aet", calling, "-aec", called,
         HOST, str(port), *map(str, paths)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done


@contextmanager
def uvicorn(app: str, env: dict[str, str], log: Path, dicom_port: int) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """``python -m uvicorn --app-dir examples APP``; yields (process, base URL)."""
    http_port = free_port()
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", str(ROOT / "examples"), app,
             "--host", HOST, "--port", str(http_port)],
            stdout=sink, stderr=subprocess.STDOUT, env={**ENV, **env}, cwd=log.parent, start_new_session=True,
        )  # fmt: skip
    try:
        wait_tcp(proc, http_port, log)
        wait_tcp(proc, dicom_port, log)
        yield proc, f"http://{HOST}:{http_port}"
    finally:
        stop_process(proc)


# --------------------------------------------------------------------------- FastAPI


def test_fastapi_app_echo_find_move_through_the_pool(tmp_path: Path) -> None:
    dicom_port = free_port()
    study, paths = make_study(tmp_path / "study", "FASTAPI1")
    with serve_process(tmp_path, {"FASTAPI": dicom_port}) as archive_port:
        storescu(archive_port, ARCHIVE_AE, paths)
        env = {
            "PACS_HOST": HOST, "PACS_PORT": str(archive_port), "PACS_AET": ARCHIVE_AE, "OUR_AET": "FASTAPI",
            "DICOM_PORT": str(dicom_port), "STORE_DIR": str(tmp_path / "received"),
        }  # fmt: skip
        log = tmp_path / "uvicorn.log"
        with (
            uvicorn("fastapi_app:app", env, log, dicom_port) as (proc, url),
            httpx.Client(base_url=url, timeout=30) as http,
        ):
            assert http.get("/echo").json() == {"status": "0x0000"}
            found = http.get("/studies", params={"PatientID": "FASTAPI1"})
            assert found.status_code == 200, found.text
            studies = [pydicom.Dataset.from_json(item) for item in found.json()]
            assert [s.StudyInstanceUID for s in studies] == [study]
            assert str(studies[0].PatientName) == "EXAMPLE^FASTAPI1"
            assert http.get("/studies", params={"PatientID": "NOBODY"}).json() == []
            assert http.get("/studies", params={"Colour": "blue"}).status_code == 400
            moved = http.post(f"/studies/{study}/move")
            assert moved.status_code == 200, moved.text
            assert moved.json() == {"status": "0x0000", "completed": 3, "failed": 0, "warning": 0}
            sent = {str(pydicom.dcmread(p).SOPInstanceUID) for p in paths}
            assert set(http.get("/received").json()) == sent
            assert {p.stem for p in (tmp_path / "received").glob("*.dcm")} == sent
            # unknown destination: the PACS refuses, the app says so
            assert http.post(f"/studies/{study}/move", params={"destination": "NOWHERE"}).status_code == 502
            pool = http.get("/pool").json()
            assert (pool["opened"], pool["reused"]) == (1, 4), pool  # five PACS requests, one association
            proc.send_signal(signal.SIGTERM)
            # uvicorn shuts down gracefully, then re-raises the signal it caught
            assert proc.wait(20) in (0, -signal.SIGTERM)
        output = log.read_text()
        assert "Application shutdown complete" in output
        assert "dimse_async" not in output and "association" not in output, output


# --------------------------------------------------------------------------- AI gateway


def expected_mask(paths: list[Path]) -> np.ndarray:
    """The gateway's analysis, done independently: the mean image of the series, and the
    pixels above its mean + 1 SD as 255."""
    stack = np.stack([pydicom.dcmread(p).pixel_array.astype(np.float64) for p in paths])
    mean = stack.mean(axis=0)
    return np.where(mean > mean.mean() + mean.std(), 255, 0).astype(np.uint8)


def test_ai_gateway_sends_a_derived_secondary_capture_back_to_the_archive(tmp_path: Path) -> None:
    gateway_port = free_port()
    study, paths = make_study(tmp_path / "study", "AI1")
    with serve_process(tmp_path, {}) as archive_port:
        env = {
            "GATEWAY_AET": "AI_GATEWAY", "DICOM_PORT": str(gateway_port),
            "ARCHIVES": json.dumps({"MODALITY": [HOST, archive_port, ARCHIVE_AE]}),
        }  # fmt: skip
        log = tmp_path / "uvicorn.log"
        with (
            uvicorn("ai_gateway:app", env, log, gateway_port) as (proc, url),
            httpx.Client(base_url=url, timeout=30) as http,
        ):
            storescu(gateway_port, "AI_GATEWAY", paths, calling="MODALITY")
            deadline = time.monotonic() + 30
            results: list[dict] = []
            while time.monotonic() < deadline and not results:
                results = http.get("/results").json()
                time.sleep(0.1)
            assert len(results) == 1, results
            result = results[0]
            assert result["study"] == study and result["instances"] == 3 and result["status"] == "0x0000", result
            # the archive committed the derived result (storage commitment report)
            commitment = result["commitment"]
            assert commitment["success"] is True, commitment
            assert commitment["committed"] == [
                {"sop_class": pydicom.uid.SecondaryCaptureImageStorage, "sop_instance": result["derived"]}
            ], commitment
            assert commitment["failed"] == [] and commitment["retrieve_ae"] == ARCHIVE_AE, commitment
            # failure path: an instance the archive does not hold is reported failed (0x0112)
            missing = generate_uid()
            asked = http.post("/commitment", json={
                "sender": "MODALITY",
                "references": [[pydicom.uid.SecondaryCaptureImageStorage, result["derived"]],
                               [pydicom.uid.CTImageStorage, missing]],
            })  # fmt: skip
            assert asked.status_code == 200, asked.text
            report = asked.json()
            assert report["success"] is False, report
            assert report["committed"] == [commitment["committed"][0]], report
            assert report["failed"] == [
                {"sop_class": pydicom.uid.CTImageStorage, "sop_instance": missing, "reason": "0x0112"}
            ], report
            assert http.post("/commitment", json={"sender": "NOBODY", "references": []}).status_code == 400
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) in (0, -signal.SIGTERM), log.read_text()
        assert "Application shutdown complete" in log.read_text()
        serve_log = (tmp_path / "serve.log").read_text()
        assert re.search(r"storage commitment .*requester=AI_GATEWAY .*committed=1 failed=0", serve_log), serve_log
        assert re.search(r"storage commitment .*committed=1 failed=1 reasons=0x0112", serve_log), serve_log
        # DCMTK finds the new series in the archive and retrieves it
        rsp = tmp_path / "rsp"
        rsp.mkdir()
        done = subprocess.run(
            [dcmtk("findscu"), "-S", "-aec", ARCHIVE_AE, "-k", "QueryRetrieveLevel=SERIES",
             "-k", f"StudyInstanceUID={study}", "-k", "SeriesInstanceUID", "-k", "Modality", "-k", "SeriesDescription",
             "-X", "-od", str(rsp), HOST, str(archive_port)],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done
        series = {str(d.Modality): d for d in map(pydicom.dcmread, sorted(rsp.glob("rsp*.dcm")))}
        assert set(series) == {"OT"}, series  # the archive got only the derived series
        assert "mask" in str(series["OT"].SeriesDescription).lower()
        got = tmp_path / "got"
        got.mkdir()
        done = subprocess.run(
            [dcmtk("getscu"), "-S", "-aec", ARCHIVE_AE, "-k", "QueryRetrieveLevel=SERIES",
             "-k", f"StudyInstanceUID={study}", "-k", f"SeriesInstanceUID={series['OT'].SeriesInstanceUID}",
             "-od", str(got), HOST, str(archive_port)],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done
    files = list(got.iterdir())
    assert len(files) == 1
    sc = pydicom.dcmread(files[0])
    assert sc.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
    assert sc.StudyInstanceUID == study and sc.PatientID == "AI1"
    assert sc.ImageType[0] == "DERIVED"
    assert len(sc.SourceImageSequence) == 3
    assert np.array_equal(sc.pixel_array, expected_mask(paths))
