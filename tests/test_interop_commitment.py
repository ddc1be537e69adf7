"""Storage commitment against Orthanc (1.10, from Debian) in both directions.

1. Our SCU asks Orthanc (an SCP since 1.6): Orthanc answers the N-ACTION and sends the
   report on a separate association to our AE, which accepts it with role selection
   and matches it by Transaction UID while the requesting association is still held.
2. Orthanc as SCU asks ``serve`` (REST ``/modalities/{id}/storage-commitment`` and a
   ``/modalities/{id}/store`` with ``"StorageCommitment": true``); ``serve`` reports
   back to Orthanc's DICOM port from ``[known_aes]``; Orthanc's REST API shows the
   result, failures with their reasons included.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, kill_process, wait_tcp
from normalized_helpers import HOST, make_instances, running_serve, store
from pydicom.uid import generate_uid

import dimse_async as da
from dimse_async.services.commitment import STORAGE_COMMITMENT

ORTHANC = "/usr/sbin/Orthanc"
WAIT = 60.0


@dataclass
class Orthanc:
    dicom_port: int
    http_port: int
    log: Path

    def request(self, path: str, body: Any = None) -> Any:
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        req = urllib.request.Request(f"http://{HOST}:{self.http_port}{path}", data=data)
        with urllib.request.urlopen(req, timeout=20) as rsp:
            raw = rsp.read()
        return json.loads(raw) if rsp.headers.get_content_type() == "application/json" else raw

    async def call(self, path: str, body: Any = None) -> Any:
        return await asyncio.to_thread(self.request, path, body)


@contextlib.contextmanager
def orthanc(tmp_path: Path, modalities: dict[str, list[Any]]) -> Iterator[Orthanc]:
    """Orthanc with a throw-away configuration: loopback only, the given DicomModalities."""
    if not os.access(ORTHANC, os.X_OK):
        pytest.fail(f"{ORTHANC} not found: install Orthanc (apt-get install -y orthanc)")
    dicom_port, http_port = free_port(), free_port()
    while http_port == dicom_port:
        http_port = free_port()
    storage = tmp_path / "orthanc-db"
    config = {
        "Name": "dimse-async-commitment",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "Plugins": [],
        "LuaScripts": [],
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "OrthancExplorerEnabled": False,
        "WebDavEnabled": False,
        "DicomServerEnabled": True,
        "DicomAet": "ORTHANC",
        "DicomPort": dicom_port,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowStore": False,
        "DicomCheckModalityHost": True,
        "DicomModalities": modalities,
        "StorageCommitmentReportsSize": 100,
        "ConcurrentJobs": 1,
        "SaveJobs": False,
        "DicomScuTimeout": 10,
    }
    config_file = tmp_path / "orthanc.json"
    config_file.write_text(json.dumps(config, indent=2))
    log = tmp_path / "orthanc.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [ORTHANC, "--verbose", str(config_file)], stdout=sink, stderr=subprocess.STDOUT, cwd=tmp_path
        )
    peer = Orthanc(dicom_port, http_port, log)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                pytest.fail(f"Orthanc exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
            try:
                peer.request("/system")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    pytest.fail(f"Orthanc's HTTP port did not answer within 30 s:\n{log.read_text(errors='replace')}")
                time.sleep(0.1)
        wait_tcp(proc, dicom_port, log)
        yield peer
    finally:
        kill_process(proc)  # its storage is thrown away: no graceful shutdown to wait for


async def test_our_scu_orthanc_scp_report_on_separate_association(tmp_path: Path) -> None:
    files = make_instances(tmp_path / "in", 3)
    ours = da.AE("OUR_SCU", dimse_timeout=WAIT)
    ours.add_supported_context(STORAGE_COMMITMENT, scp_role=True)
    async with await ours.start_server(HOST, 0) as listener:
        with orthanc(tmp_path, {"ours": ["OUR_SCU", HOST, listener.port]}) as peer:
            await store(peer.dicom_port, [p for p, _c, _i in files], called="ORTHANC", calling="OUR_SCU")
            refs = [(c, i) for _p, c, i in files]
            unknown = (refs[0][0], generate_uid())
            # Held open as long as we wait: the report still comes on Orthanc's own association.
            result = await asyncio.wait_for(
                ours.request_commitment(HOST, peer.dicom_port, "ORTHANC", [*refs, unknown], timeout=WAIT, hold=WAIT),
                WAIT + 5,
            )
    assert not result.same_association and result.calling_ae == "ORTHANC"
    assert sorted(result.committed) == sorted(refs)
    assert result.failed == [(*unknown, 0x0112)]


async def _orthanc_report(peer: Orthanc, transaction: str) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT
    while True:
        report = await peer.call(f"/storage-commitment/{transaction}")
        if report.get("Status") != "Pending" or time.monotonic() > deadline:
            return report
        await asyncio.sleep(0.1)


async def test_orthanc_scu_to_serve(tmp_path: Path) -> None:
    files = make_instances(tmp_path / "in", 3)
    orthanc_port = free_port()
    # The report always on a new association to Orthanc's DICOM port (from known_aes).
    async with running_serve(
        tmp_path / "archive", known_aes={"ORTHANC": (HOST, orthanc_port)}, commitment_same_association=False
    ) as serve:
        await store(serve.port, [p for p, _c, _i in files[:2]])
        with orthanc(tmp_path, {"archive": ["ARCHIVE", HOST, serve.port]}) as peer:
            serve.ae.known_aes["ORTHANC"] = (HOST, peer.dicom_port)
            # 1. A commitment request for what serve holds, and for what it does not.
            refs = [{"SOPClassUID": c, "SOPInstanceUID": i} for _p, c, i in files]
            answer = await peer.call("/modalities/archive/storage-commitment", {"DicomInstances": refs})
            transaction = answer["ID"]
            report = await _orthanc_report(peer, transaction)
            assert report["Status"] == "Failure", report
            assert report["RemoteAET"] == "ARCHIVE"
            assert sorted(s["SOPInstanceUID"] for s in report["Success"]) == sorted(i for _p, _c, i in files[:2])
            ((failure,),) = [report["Failures"]]
            assert failure["SOPInstanceUID"] == files[2][2] and failure["FailureReason"] == 0x0112
            await serve.extras.commitment.wait_idle()
            result, how = serve.extras.commitment.results[transaction]
            assert how == "new association" and len(result.committed) == 2
            # 2. Orthanc stores an instance into serve and asks for commitment in the same job.
            uploaded = await peer.call("/instances", files[2][0].read_bytes())
            job = await peer.call(
                "/modalities/archive/store",
                {"Resources": [uploaded["ID"]], "StorageCommitment": True, "Synchronous": True},
            )
            assert job.get("FailedInstancesCount", 0) == 0, job
            deadline = time.monotonic() + WAIT
            while time.monotonic() < deadline and len(serve.extras.commitment.results) < 2:
                await asyncio.sleep(0.1)
            transaction2 = list(serve.extras.commitment.results)[-1]
            assert transaction2 != transaction
            report2 = await _orthanc_report(peer, transaction2)
            assert report2["Status"] == "Success", report2
            assert [s["SOPInstanceUID"] for s in report2["Success"]] == [files[2][2]]
