"""The command line on bad input and in its defaults: every error is one line on
stderr with its own exit code and no traceback; ports are validated; ``serve`` binds
before it indexes; configuration errors name the file; the SCU and SCP commands work
together with no AE-title options; ``--version`` everywhere.

Every command runs as a real process (``python -m dimse_async``) on 127.0.0.1; every
wait is bounded and every process started here is stopped here.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import free_port, stop_process
from pydicom.data import get_testdata_file

import dimse_async

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "dimse_async"]
HOST = "127.0.0.1"
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


def cli(*args: str, timeout: float = 30.0, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, env=env or ENV, check=False, cwd=ROOT
    )


def one_line_error(done: subprocess.CompletedProcess[str], code: int) -> str:
    """Assert exit ``code`` and exactly one line on stderr (no traceback); that line."""
    lines = done.stderr.strip().splitlines()
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr and "Future exception" not in done.stderr
    return lines[0]


@contextmanager
def running(
    *args: str, env: dict[str, str] | None = None, ready: str = "listening"
) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """A long-running command, yielded once it printed ``ready``: (process, that line)."""
    proc = subprocess.Popen(
        [*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env or ENV, cwd=ROOT,
        start_new_session=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 30
        line = ""
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if ready in line or not line:
                break
        assert ready in line, (line, proc.poll(), proc.stderr.read() if proc.poll() is not None else "")  # type: ignore[union-attr]
        yield proc, line
    finally:
        stop_process(proc)  # type: ignore[arg-type]


@contextmanager
def occupied_port() -> Iterator[int]:
    """A port something else is listening on."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        s.listen()
        yield s.getsockname()[1]


# --------------------------------------------------------------------------- version


@pytest.mark.parametrize("args", [["--version"], ["echo", "--version"], ["serve", "--version"], ["find", "--version"]])
def test_version(args: list[str]) -> None:
    done = cli(*args)
    assert done.returncode == 0, done
    assert done.stdout.strip() == f"dimse-async {dimse_async.__version__}"


# --------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["echo", HOST, "-1"], "invalid port -1: must be 0..65535"),
        (["echo", HOST, "70000"], "invalid port 70000: must be 0..65535"),
        (["echo", HOST, "http"], "invalid port 'http'"),
        (["echo-scp", "--port", "70000"], "invalid port 70000"),
        (["store-scp", "--port", "-1"], "invalid port -1"),
        (["serve", "--port", "65536"], "invalid port 65536"),
        (["echo", HOST, "104", "--log-level", "FOO"], "invalid log level 'FOO'"),
        (["serve", "--log-level", "LOUD"], "invalid log level 'LOUD'"),
        (["echo", HOST, "104", "--repeat", "0"], "--repeat: 0 must be at least 1"),
        (["echo", HOST, "104", "--timeout", "0"], "positive number of seconds"),
        (["echo", HOST, "104", "--aec", "A_TITLE_LONGER_THAN_16"], "longer than 16 characters"),
        (["send", HOST, "104", "x.dcm", "--window", "0"], "--window: 0 must be at least 1"),
        (["move", HOST, "104", "-k", "PatientID=1"], "--dest"),
        (["find", HOST, "104", "--model", "nonsense"], "invalid choice"),
        (["nonsense"], "invalid choice"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(args: list[str], expected: str) -> None:
    line = one_line_error(cli(*args), 2)
    assert expected in line, line
    assert line.startswith("dimse-async")


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("NoSuchKeyword=1", "unknown attribute keyword 'NoSuchKeyword'"),
        ("PatientName[0].PatientID=1", "is not a sequence"),
        ("Rows=big", "not valid for VR US"),
        ("=3", "cannot parse query key"),
        ("0010,zz10=3", "cannot parse query key"),
    ],
)
def test_bad_query_keys(key: str, expected: str) -> None:
    line = one_line_error(cli("find", HOST, str(free_port()), "-k", key), 2)
    assert expected in line, line


def test_worklist_needs_no_level_but_a_query_does() -> None:
    line = one_line_error(cli("find", HOST, str(free_port()), "-k", "QueryRetrieveLevel=", "-k", "PatientID=1"), 2)
    assert "no QueryRetrieveLevel" in line


# --------------------------------------------------------------------------- peers that fail


@pytest.mark.parametrize("command", ["echo", "find", "get", "move"])
def test_connection_refused_is_exit_3(command: str, tmp_path: Path) -> None:
    port = free_port()
    extra = {"get": ["--out", str(tmp_path)], "move": ["--dest", "X"]}.get(command, [])
    line = one_line_error(cli(command, HOST, str(port), *extra), 3)
    assert f"{HOST}:{port}" in line and "Connection refused" in line, line


def test_timeout_is_one_line_exit_5_without_unretrieved_future() -> None:
    """A peer that accepts TCP but never answers the A-ASSOCIATE-RQ."""
    with occupied_port() as port:
        done = cli("echo", HOST, str(port), "--timeout", "0.5", "--log-level", "INFO")
    assert done.returncode == 5, done
    assert "Future exception was never retrieved" not in done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("dimse-async")]
    assert len(errors) == 1 and "timeout" in errors[0], done.stderr


def test_timeout_at_default_log_level_prints_only_the_error() -> None:
    with occupied_port() as port:
        line = one_line_error(cli("echo", HOST, str(port), "--timeout", "0.5"), 5)
    assert "no A-ASSOCIATE response within 0.5 s" in line


def test_rejected_is_exit_4(tmp_path: Path) -> None:
    port = free_port()
    with running("echo-scp", "--host", HOST, "--port", str(port), "--aet", "STRICT", "--require-called-ae"):
        line = one_line_error(cli("echo", HOST, str(port), "--aec", "WRONG"), 4)
    assert "called-AE-title-not-recognized" in line


# --------------------------------------------------------------------------- listening


@pytest.mark.parametrize("command", ["echo-scp", "store-scp", "serve"])
def test_port_in_use_is_one_line_exit_7(command: str, tmp_path: Path) -> None:
    storage = tmp_path / "archive"
    extra = {"store-scp": ["--out", str(tmp_path / "in")], "serve": ["--storage-dir", str(storage)]}.get(command, [])
    with occupied_port() as port:
        line = one_line_error(cli(command, "--host", HOST, "--port", str(port), *extra), 7)
    assert f"cannot listen on {HOST}:{port}" in line and "in use" in line, line
    if command == "serve":
        # bound before indexing: a server that cannot listen never built an index
        assert not (storage / "index.sqlite").exists()


# --------------------------------------------------------------------------- configuration and directories


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ("host = 5\n", "host must be a non-empty string, not 5"),
        ("port = 70000\n", "port must be an integer 0..65535"),
        ('port = "11112"\n', "port must be an integer"),
        ("require_called_ae = 1\n", "require_called_ae must be true or false"),
        ("ae_title = 7\n", "ae_title must be a string"),
        ('ae_title = "THIS_TITLE_IS_TOO_LONG"\n', "longer than 16 characters"),
        ("allowed_calling_aes = [1]\n", "allowed_calling_aes must be a list"),
        ("colour = 'blue'\n", "unknown setting(s) colour"),
        ("port = \n", "invalid TOML"),
        ('[known_aes]\nVIEWER = { host = "h", port = -2 }\n', "known_aes.VIEWER.port must be an integer 0..65535"),
    ],
)
def test_serve_config_errors_name_the_file(toml: str, expected: str, tmp_path: Path) -> None:
    config = tmp_path / "serve.toml"
    config.write_text(toml)
    line = one_line_error(cli("serve", "--config", str(config), "--storage-dir", str(tmp_path / "a")), 2)
    assert str(config) in line and expected in line, line


def test_serve_missing_config_names_the_file(tmp_path: Path) -> None:
    line = one_line_error(cli("serve", "--config", str(tmp_path / "absent.toml")), 2)
    assert str(tmp_path / "absent.toml") in line and "No such file" in line, line


def unwritable(tmp_path: Path) -> Path:
    """A directory path that cannot be created (its parent is a file; we may be root,
    so mode bits would not stop us)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    return blocker / "dir"


@pytest.mark.parametrize("command", ["serve", "store-scp", "get"])
def test_unwritable_directory_is_one_line_exit_7(command: str, tmp_path: Path) -> None:
    target = unwritable(tmp_path)
    args = {
        "serve": ["serve", "--port", "0", "--storage-dir", str(target)],
        "store-scp": ["store-scp", "--port", "0", "--out", str(target)],
        "get": ["get", HOST, str(free_port()), "--out", str(target), "-k", "PatientID=1"],
    }[command]
    line = one_line_error(cli(*args), 7)
    assert str(target) in line and "not writable" in line, line


def test_serve_default_storage_dir_is_per_user_data_dir(tmp_path: Path) -> None:
    env = {**ENV, "XDG_DATA_HOME": str(tmp_path / "data")}
    with running("serve", "--host", HOST, "--port", "0", env=env) as (_proc, line):
        assert f"archive {tmp_path / 'data' / 'dimse-async' / 'archive'}:" in line, line
    assert (tmp_path / "data" / "dimse-async" / "archive" / "index.sqlite").exists()


# --------------------------------------------------------------------------- defaults that fit together


def test_echo_to_echo_scp_with_default_titles() -> None:
    port = free_port()
    with running("echo-scp", "--host", HOST, "--port", str(port)):
        done = cli("echo", HOST, str(port), "--repeat", "2")
    assert done.returncode == 0, done
    assert done.stdout.strip() == f"C-ECHO to ANY-SCP@{HOST}:{port}: success (2 times)"
    assert done.stderr == ""


def test_send_to_store_scp_with_default_titles(tmp_path: Path) -> None:
    port = free_port()
    out = tmp_path / "in"
    source = get_testdata_file("CT_small.dcm")
    with running("store-scp", "--host", HOST, "--port", str(port), "--out", str(out)):
        done = cli("send", HOST, str(port), str(source))
        assert done.returncode == 0, done
        assert done.stdout.startswith("sent 1/1 instances"), done
        assert done.stderr == ""
        assert len(list(out.glob("*.dcm"))) == 1


def test_log_json_lines_are_all_json() -> None:
    port = free_port()
    with running("echo-scp", "--host", HOST, "--port", str(port)):
        done = cli("echo", HOST, str(port), "--log-level", "DEBUG", "--log-json")
    assert done.returncode == 0, done
    records = [json.loads(line) for line in done.stderr.splitlines()]
    assert any(r["event"] == "association closed" and r["ops"] == "C-ECHO:1" for r in records)
