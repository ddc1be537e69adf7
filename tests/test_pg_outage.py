"""``serve`` with its PostgreSQL index stopped and started again (a cluster of its
own: the session's is shared by other tests): stores and queries are answered 0xA700
at once while the index is away, ``/healthz`` says so (a load balancer sends clients
to another node), and all of it comes back without restarting ``serve``. Meanwhile the
log has one line per refusal at most (the first few), never the PostgreSQL client
library's traceback."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pydicom
from conftest import PG_BIN, PostgreSQLServer, _as_pg_user, free_port, stop_process, wait_tcp
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dimse_async import AE
from dimse_async.services.qr import MODELS

CT = get_testdata_file("CT_small.dcm")
CT_CLASS = "1.2.840.10008.5.1.4.1.1.2"


def instance(tmp: Path) -> tuple[Path, str]:
    ds = pydicom.dcmread(CT)
    uid = generate_uid()
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    path = tmp / f"{uid}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, uid


def healthz(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as rsp:
            return int(rsp.status), rsp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def store_and_find(port: int, path: Path, uid: str) -> tuple[int, int, int]:
    """The C-STORE status, then a C-FIND of its study: the status and the matches."""
    scu = AE("SCU", acse_timeout=30, dimse_timeout=30)
    scu.add_requested_context(CT_CLASS, [ExplicitVRLittleEndian])
    scu.add_requested_context(MODELS["study"]["find"])
    query = pydicom.Dataset()
    query.QueryRetrieveLevel = "IMAGE"
    query.SOPInstanceUID = uid
    query.StudyInstanceUID = pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID
    query.SeriesInstanceUID = pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID
    async with scu.associate("127.0.0.1", port, "ARCHIVE") as assoc:
        stored = int(await assoc.c_store(path))
        async with assoc.c_find(query) as responses:
            matches = [m async for m in responses]
        assert responses.status is not None
        return stored, int(responses.status), len(matches)


async def test_postgresql_stopped_and_started_again(tmp_path: Path) -> None:
    base = Path(tempfile.mkdtemp(prefix="dimse-async-pg-outage-"))
    pg = PostgreSQLServer(base)
    proc = None
    try:
        dsn = pg.new_database()
        port, http = free_port(), free_port()
        log = tmp_path / "serve.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "dimse_async", "serve", "--aet", "ARCHIVE", "--port", str(port),
                 "--storage-dir", str(tmp_path / "a"), "--index", dsn, "--http-port", str(http)],
                stdout=out, stderr=subprocess.STDOUT, env={"PYTHONPATH": str(Path.cwd()), "PATH": "/usr/bin:/bin"},
            )  # fmt: skip
        wait_tcp(proc, port, log)
        path, uid = instance(tmp_path)
        assert await store_and_find(port, path, uid) == (0, 0, 1)
        assert healthz(http)[0] == 200

        pg.stop()
        path, uid = instance(tmp_path)
        started = time.monotonic()
        stored, found, _matches = await store_and_find(port, path, uid)
        assert (stored, found) == (0xA700, 0xA700) and time.monotonic() - started < 15
        code, body = healthz(http)
        assert code == 503 and "index" in body, (code, body)
        assert not [p for p in (tmp_path / "a").rglob(f"{uid}.dcm") if ".incoming" not in p.parts]
        for _ in range(7):  # every refused store: one line at most, no client library traceback
            path, uid = instance(tmp_path)
            assert (await store_and_find(port, path, uid))[0] == 0xA700
        text = log.read_text()
        assert "Traceback" not in text and 'File "' not in text, text[-3000:]
        assert text.count("C-STORE out of resources") <= 5, text[-3000:]
        assert text.count("connection floor") <= 1, text[-3000:]

        restart = subprocess.run(
            _as_pg_user([str(PG_BIN / "pg_ctl"), "-D", str(pg.data), "-l", str(pg.log), "-w", "-t", "60", "-o",
                         f"-p {pg.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={base} -c fsync=off",
                         "start"]),
            capture_output=True, timeout=90,
        )  # fmt: skip
        assert restart.returncode == 0, restart.stderr
        assert healthz(http)[0] == 200
        path, uid = instance(tmp_path)
        assert await store_and_find(port, path, uid) == (0, 0, 1)
    finally:
        if proc is not None:
            stop_process(proc, timeout=30)
        pg.stop()
        shutil.rmtree(base, ignore_errors=True)
