"""Shared fixtures: quiet structured logs, loopback servers, free ports."""

from __future__ import annotations

import shutil
import socket

import pytest

from dimse_async.log import configure_logging

configure_logging("WARNING")

DCMTK = "/usr/bin"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dcmtk(tool: str) -> str:
    """Path of a DCMTK tool; DCMTK is a required test dependency (README, .ci/run)."""
    path = f"{DCMTK}/{tool}"
    if shutil.which(path) is None:
        pytest.fail(f"{path} not found: install DCMTK (apt-get install -y dcmtk)")
    return path


@pytest.fixture
def port() -> int:
    return free_port()
