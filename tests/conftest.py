"""Shared fixtures: quiet structured logs, loopback servers, free ports."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from dimse_async.log import configure_logging

configure_logging("WARNING", capture_warnings=False)

DCMTK = "/usr/bin"


_PORTS = random.Random(os.getpid() ^ time.time_ns())
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port that is free now, below the kernel's ephemeral range (32768+ on Linux), so
    that no client connection's source port takes it before the test's server binds it;
    never the same port twice in one run, so two servers started together cannot collide."""
    for _ in range(200):
        port = _PORTS.randrange(20000, 32000)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError("no free port between 20000 and 32000")


def dcmtk(tool: str) -> str:
    """Path of a DCMTK tool; DCMTK is a required test dependency (README, .ci/run)."""
    path = f"{DCMTK}/{tool}"
    if shutil.which(path) is None:
        pytest.fail(f"{path} not found: install DCMTK (apt-get install -y dcmtk)")
    return path


@pytest.fixture
def port() -> int:
    return free_port()


async def communicate(
    argv: tuple[str, ...],
    *,
    env: dict[str, str] | None = None,
    cwd: object = None,
    timeout: float = 30.0,
    merge_stderr: bool = False,
) -> tuple[int, str, str]:
    """Run a peer to completion without blocking the event loop (in-process SCPs keep
    serving); bounded by ``timeout``, killed if it overruns. Returns (code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT if merge_stderr else asyncio.subprocess.PIPE,
        env=env,
        cwd=cwd,  # type: ignore[arg-type]
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        pytest.fail(f"{' '.join(argv)} did not finish within {timeout} s")
    finally:
        if proc.returncode is None:
            proc.kill()
            await asyncio.wait_for(proc.wait(), 5)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace"), (err or b"").decode(errors="replace")


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
    """SIGTERM, wait, SIGKILL if it lingers; then end children left in its process group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # only exists if it was started in its own session
    return proc.returncode


def wait_tcp(proc: subprocess.Popen[bytes], port: int, log: Path, timeout: float = 60.0) -> None:
    """Until something accepts TCP connections on 127.0.0.1:``port`` (bounded; fails if
    the process dies, showing its log)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args} exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    pytest.fail(f"{proc.args} not listening on port {port} after {timeout} s")
