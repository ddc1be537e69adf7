"""The storage SOP class table (``dimse_async.sop_classes``) and what it spares a server's start-up."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import dcmtk, free_port, stop_process, wait_tcp

from dimse_async.sop_classes import STORAGE_SOP_CLASSES, registry_storage_classes


def test_the_table_is_what_pydicoms_registry_names_storage_classes() -> None:
    """PS3.4 Annex B (retired ones included): the table may not drift from the installed
    pydicom's UID registry (a newer pydicom with new classes makes this fail: regenerate)."""
    assert registry_storage_classes() == STORAGE_SOP_CLASSES
    assert len(set(STORAGE_SOP_CLASSES)) == len(STORAGE_SOP_CLASSES) > 150


def test_store_scp_answers_a_c_echo_without_loading_pydicom(tmp_path: Path) -> None:
    """``store-scp`` listens, accepts DCMTK's echoscu and shuts down without importing
    pydicom (nor numpy): its storage classes come from the table."""
    port = free_port()
    log = tmp_path / "store-scp.log"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-X", "importtime", "-m", "dimse_async", "store-scp", "--port", str(port),
             "--out", str(tmp_path / "out")],
            stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    try:
        wait_tcp(proc, port, log)
        echo = subprocess.run([dcmtk("echoscu"), "-aec", "ANY-SCP", "127.0.0.1", str(port)], capture_output=True,
                              timeout=30)  # fmt: skip
        assert echo.returncode == 0, echo
    finally:
        assert stop_process(proc) == 0
    text = log.read_text(errors="replace")
    imported = [line.rsplit("|", 1)[1].strip() for line in text.splitlines() if line.startswith("import time:")]
    assert "dimse_async.sop_classes" in imported, text[-2000:]
    assert not [m for m in imported if m.split(".")[0] in ("pydicom", "numpy")], text[-2000:]
