"""``dimse-async check``: against DCMTK storescp and against ``dimse-async serve``; its
JSON report and monitoring exit codes (0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import communicate, dcmtk, free_port, stop_process, wait_tcp

pytestmark = [pytest.mark.interop, pytest.mark.timeout(90)]

HOST = "127.0.0.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
UNKNOWN_SOP = "1.2.826.0.1.3680043.9.9999.1"
_SCRIPT = Path(sys.executable).with_name("dimse-async")
CLI: list[str] = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "dimse_async"]
ENV = {**os.environ, "TCP_NODELAY": "1"}


@contextlib.contextmanager
def listening(argv: list[str], port: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=ENV, start_new_session=True)
    try:
        wait_tcp(proc, port, log)
        yield proc
    finally:
        stop_process(proc)


async def check(*args: str) -> tuple[int, dict[str, Any]]:
    code, out, err = await communicate((*CLI, "check", *args, "--json", "--timeout", "10"), timeout=30)
    try:
        report = json.loads(out)
    except json.JSONDecodeError:
        pytest.fail(f"check printed no JSON (exit {code}):\n{out}\n{err}")
    assert report["exit_code"] == code
    return code, report


def assert_timed(report: dict[str, Any], *phases: str) -> None:
    for phase in (*phases, "total"):
        value = report["timings_ms"][phase]
        assert isinstance(value, float) and 0 <= value < 10_000, (phase, report["timings_ms"])


async def test_check_storescp(tmp_path: Path):
    port = free_port()
    (tmp_path / "in").mkdir()
    argv = [dcmtk("storescp"), "--aetitle", "STORESCP", "-od", str(tmp_path / "in"), str(port)]
    with listening(argv, port, tmp_path / "storescp.log"):
        code, report = await check(HOST, str(port), "--aec", "STORESCP", "--sop", "CTImageStorage")
        assert code == 0 and report["status"] == "OK", report
        assert [c["abstract_syntax"] for c in report["contexts"]] == ["1.2.840.10008.1.1", CT]
        assert all(c["accepted"] and c["result"] == "acceptance" and c["transfer_syntax"] for c in report["contexts"])
        assert report["echo"] == {"status": 0, "category": "success"}
        assert report["association"]["accepted"] and report["association"]["peer_implementation_version"].startswith(
            "OFFIS_DCMTK"
        )
        assert_timed(report, "connect", "associate", "echo", "release")

        # A SOP class storescp does not support: WARNING, with the context's reason.
        code, report = await check(HOST, str(port), "--aec", "STORESCP", "--sop", CT, "--sop", UNKNOWN_SOP)
        assert code == 1 and report["status"] == "WARNING", report
        rejected = [c for c in report["contexts"] if not c["accepted"]]
        assert [(c["abstract_syntax"], c["result"]) for c in rejected] == [
            (UNKNOWN_SOP, "abstract-syntax-not-supported")
        ]
        assert report["echo"]["status"] == 0

        # The plain-text form for monitoring plugins.
        code, out, _ = await communicate((*CLI, "check", HOST, str(port), "--aec", "STORESCP"), timeout=30)
        assert code == 0 and out.startswith("DICOM OK - STORESCP@127.0.0.1:") and "| connect=" in out, out


async def test_check_serve_and_failures(tmp_path: Path):
    port = free_port()
    argv = [
        *CLI,
        "serve",
        "--host",
        HOST,
        "--port",
        str(port),
        "--aet",
        "ARCHIVE",
        "--storage-dir",
        str(tmp_path / "a"),
    ]
    with listening(argv, port, tmp_path / "serve.log"):
        code, report = await check(
            HOST,
            str(port),
            "--aec",
            "ARCHIVE",
            "--sop",
            "CTImageStorage",
            "--sop",
            "StudyRootQueryRetrieveInformationModelFind",
        )
        assert code == 0, report
        assert len(report["contexts"]) == 3 and all(c["accepted"] for c in report["contexts"])
        assert report["association"]["peer_implementation_class_uid"]
        assert_timed(report, "connect", "associate", "echo", "release")

    # Our verification SCP told to require its own AE title: rejected, CRITICAL, with the reason.
    port = free_port()
    argv = [*CLI, "echo-scp", "--host", HOST, "--port", str(port), "--aet", "VERIFY", "--require-called-ae"]
    with listening(argv, port, tmp_path / "echo-scp.log"):
        code, report = await check(HOST, str(port), "--aec", "WRONG")
        assert code == 2 and report["status"] == "CRITICAL", report
        assert report["association"]["reject"]["reason"] == 7
        assert "called-AE-title-not-recognized" in report["association"]["reject"]["text"]
        assert report["echo"] is None and report["timings_ms"]["echo"] is None

    # Nobody listening: CRITICAL with the error; bad arguments: UNKNOWN.
    code, report = await check(HOST, str(free_port()), "--aec", "NOBODY")
    assert code == 2 and "cannot connect" in report["error"], report
    code, _, _ = await communicate((*CLI, "check", HOST, "not-a-port"), timeout=30)
    assert code == 3
    code, _, _ = await communicate((*CLI, "check", HOST, "104", "--sop", "NoSuchSOPClass"), timeout=30)
    assert code == 3
