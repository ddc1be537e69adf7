"""``dimse-async serve`` as an operator drives it: signals and configuration errors, on
real processes (DCMTK peers)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import dcmtk, free_port, stop_process

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def serve(tmp_path: Path, port: int, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
    log = tmp_path / f"serve-{port}.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dimse_async", "serve", "--port", str(port), "--aet", "ARCHIVE", "--storage-dir",
             str(tmp_path / "archive"), *args],
            stdout=sink, stderr=subprocess.STDOUT, env=ENV, start_new_session=True,
        )  # fmt: skip
    return proc, log


def wait_line(proc: subprocess.Popen[bytes], log: Path, needle: str, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = log.read_text(errors="replace")
        if needle in text:
            return text
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"no {needle!r} (exit {proc.returncode}):\n{text[-3000:]}")
        time.sleep(0.02)


def echo(port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run([dcmtk("echoscu"), "-aec", "ARCHIVE", "127.0.0.1", str(port)], capture_output=True,
                          text=True, timeout=30)  # fmt: skip


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_is_logged_and_serve_goes_on(tmp_path: Path, workers: int) -> None:
    """SIGHUP (a closed terminal: to the whole process group; or an operator asking for a
    reload) leaves ``serve`` serving, one worker or several, with a warning that the
    configuration is read at start only; SIGTERM then drains and exits 0. (Before: Python's
    default action, killed at once without draining, exit -1.)"""
    port = free_port()
    proc, log = serve(tmp_path, port, "--workers", str(workers))
    try:
        wait_line(proc, log, f"listening on 127.0.0.1:{port}")
        os.killpg(proc.pid, signal.SIGHUP)
        text = wait_line(proc, log, "SIGHUP ignored", timeout=10)
        expected = 1 if workers == 1 else workers + 1  # and the supervising parent
        deadline = time.monotonic() + 10
        while text.count("SIGHUP ignored") < expected and time.monotonic() < deadline:
            time.sleep(0.02)
            text = log.read_text(errors="replace")
        assert text.count("SIGHUP ignored") == expected, text[-3000:]
        assert echo(port).returncode == 0, text[-2000:]
        assert proc.poll() is None
    finally:
        code = stop_process(proc)
    text = log.read_text(errors="replace")
    assert code == 0, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
