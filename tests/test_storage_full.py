"""``serve`` with its storage full (below ``min_free_space``) or read-only: every C-STORE
is refused 0xA700 "storage full" ("storage read-only") before anything is written, and ``/healthz`` answers 503
``storage ... full`` (the parent's too with ``--workers N``), so a load balancer sends
studies to another node; once room is made both recover without a restart."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pydicom
import pytest
from conftest import free_port, stop_process, wait_tcp
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dimse_async import AE

pytestmark = pytest.mark.timeout(120)

CT = get_testdata_file("CT_small.dcm")
CT_CLASS = "1.2.840.10008.5.1.4.1.1.2"
MiB = 1 << 20


def healthz(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as rsp:
            return int(rsp.status), rsp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def instance(tmp: Path) -> tuple[Path, str]:
    ds = pydicom.dcmread(CT)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    path = tmp / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, str(ds.SOPInstanceUID)


async def store(port: int, path: Path) -> tuple[int, str]:
    scu = AE("SCU", acse_timeout=30, dimse_timeout=30)
    scu.add_requested_context(CT_CLASS, [ExplicitVRLittleEndian])
    async with scu.associate("127.0.0.1", port, "ARCHIVE") as assoc:
        status = await assoc.c_store(path)
        return int(status), status.error_comment or ""


def large_instance(tmp: Path, size: int) -> tuple[Path, str]:
    """A CT of about ``size`` bytes of pixel data (past any spool threshold)."""
    ds = pydicom.dcmread(CT)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns = size // 1024, 512
    ds.PixelData = b"\1" * (ds.Rows * ds.Columns * 2)
    path = tmp / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, str(ds.SOPInstanceUID)


def bytes_written(pid: int) -> int:
    """Bytes process ``pid`` passed to write(2) and its kin so far (files, sockets, pipes)."""
    text = Path(f"/proc/{pid}/io").read_text()
    return int(re.search(r"^wchar: (\d+)$", text, re.M).group(1))  # type: ignore[union-attr]


def stored(storage: Path, uid: str) -> bool:
    return any(".incoming" not in p.parts for p in storage.rglob(f"{uid}.dcm"))


def launch(tmp: Path, command: str, *args: str) -> tuple[subprocess.Popen[bytes], int, int, Path]:
    """``dimse-async <command> --aet ARCHIVE`` with ``args``, /healthz on its own port."""
    port, http = free_port(), free_port()
    log = tmp / f"{command}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dimse_async", command, "--aet", "ARCHIVE", "--port", str(port),
             "--http-port", str(http), *args],
            stdout=out, stderr=subprocess.STDOUT, env={"PYTHONPATH": str(Path.cwd()), "PATH": "/usr/bin:/bin"},
        )  # fmt: skip
    wait_tcp(proc, port, log)
    deadline = time.monotonic() + 60
    while f"port {http}: /healthz" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.02)
    return proc, port, http, log


def serve(tmp: Path, storage: Path, *extra: str) -> tuple[subprocess.Popen[bytes], int, int, Path]:
    return launch(tmp, "serve", "--storage-dir", str(storage), *extra)


def store_scp(tmp: Path, out: Path, *extra: str) -> tuple[subprocess.Popen[bytes], int, int, Path]:
    """``dimse-async store-scp`` (no index) into ``out``."""
    return launch(tmp, "store-scp", "--out", str(out), *extra)


@pytest.mark.parametrize("command", ["serve", "store-scp"])
async def test_a_full_storage_is_unhealthy_and_refuses_stores_until_room_is_made(tmp_path: Path, command: str) -> None:
    """``serve`` and ``store-scp`` alike: a 6 MiB file system, 2 MiB to keep free: filled
    to ~1 MiB free, /healthz says 503 ``storage ... full`` and a C-STORE (39 KB, which would
    fit) is refused 0xA700 with nothing stored and a log line; the filler removed, both
    recover by themselves."""
    from test_integrity import small_tmpfs

    with small_tmpfs(tmp_path / "fs", "6m") as fs:
        storage = fs / "archive"
        start = serve if command == "serve" else store_scp
        proc, port, http, log = start(tmp_path, storage, "--min-free-space", str(2 * MiB))
        try:
            path, uid = instance(tmp_path)
            assert await store(port, path) == (0, "") and stored(storage, uid)
            assert healthz(http) == (200, "ok\n")

            with open(fs / "filler", "wb") as filler:  # until ~1 MiB is left
                while shutil.disk_usage(fs).free > MiB + 64 * 1024:
                    filler.write(b"\0" * 64 * 1024)
                    filler.flush()
                    os.fsync(filler.fileno())
            code, body = healthz(http)
            assert code == 503 and re.match(
                rf"storage {re.escape(str(storage))} full: \d+ bytes free, minimum {2 * MiB}\n", body
            ), body
            path, uid = instance(tmp_path)
            assert await store(port, path) == (0xA700, "Out of resources: storage full")
            assert not stored(storage, uid) and not list(storage.rglob("*.partial"))
            # A data set past the spool threshold (serve's 4 MiB, store-scp's 512 KiB) is
            # refused at its command: its fragments are dropped as they arrive, not
            # written anywhere (the refusal used to wait for the spool file, which filled
            # the disk and was then deleted), and the answer comes after the last one.
            big, big_uid = large_instance(tmp_path, 5 * MiB)
            before = bytes_written(proc.pid)
            assert await store(port, big) == (0xA700, "Out of resources: storage full")
            assert bytes_written(proc.pid) - before < 64 * 1024  # the response and a log line
            assert not stored(storage, big_uid) and not list(storage.rglob("*.partial"))

            (fs / "filler").unlink()
            assert healthz(http) == (200, "ok\n")
            assert await store(port, path) == (0, "") and stored(storage, uid)
        finally:
            stop_process(proc, timeout=30)
        text = log.read_text()
        assert "C-STORE out of resources" in text and f"storage {storage} full" in text, text
        assert "Traceback" not in text


@pytest.mark.parametrize("command", ["serve", "store-scp"])
async def test_workers_parent_healthz_says_storage_full(tmp_path: Path, command: str) -> None:
    """``serve`` and ``store-scp`` alike with ``--workers 2``: with more free space asked
    for than the disk has, the parent's /healthz is 503 ``storage ... full`` and the
    workers refuse stores 0xA700."""
    storage = tmp_path / "archive"
    storage.mkdir()
    beyond = shutil.disk_usage(storage).free + (1 << 40)
    start = serve if command == "serve" else store_scp
    proc, port, http, _log = start(tmp_path, storage, "--workers", "2", "--min-free-space", str(beyond))
    try:
        code, body = healthz(http)
        assert code == 503 and body.startswith(f"storage {storage} full: ") and f"minimum {beyond}" in body, body
        path, uid = instance(tmp_path)
        assert await store(port, path) == (0xA700, "Out of resources: storage full")
        assert not stored(storage, uid)
    finally:
        stop_process(proc, timeout=30)


def test_a_read_only_storage_is_reported(tmp_path: Path) -> None:
    """The storage's file system remounted read-only (as ext4 does after I/O errors with
    ``errors=remount-ro``): the archive says so (its stores are then refused 0xA700
    "storage read-only" and /healthz is 503 with the reason), and no more once writable.
    (A file system with the index open for writing cannot be remounted read-only by
    hand, so the archive is closed first: the check reads the file system, not the index.)"""
    from test_integrity import remount, small_tmpfs

    from dimse_async.archive.index import Archive

    with small_tmpfs(tmp_path / "fs", "4m") as fs:
        archive = Archive(fs / "archive", min_free_space=0)
        try:
            assert archive.storage_problem() is None
        finally:
            archive.close()
        remount(fs, "ro")
        try:
            assert archive.storage_problem() == (f"storage {fs / 'archive'} read-only", "storage read-only")
        finally:
            remount(fs, "rw")
        assert archive.storage_problem() is None


def test_store_scp_keeps_1_mib_free_unless_told(tmp_path: Path) -> None:
    from dimse_async.cli import _parser

    args = _parser("store-scp").parse_args(["store-scp"])
    assert args.min_free_space == 1 << 20
    assert _parser("store-scp").parse_args(["store-scp", "--min-free-space", "0"]).min_free_space == 0
