"""The PostgreSQL index with a real server (the ``postgresql`` fixture): migrations run
once when nodes start at once, a duplicate instance arriving at two nodes at once is
settled by the duplicate policy, ``serve --index`` errors; the SQLite index made
before the ``schema_version`` table keeps its rows; and a test run killed outright
leaves no cluster running. (The archive and C-FIND tests run
against both back ends through the ``index`` fixture.)"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import select
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pydicom
import pytest
from conftest import PG_BIN, _as_pg_user, free_port
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dimse_async import AE
from dimse_async.archive.backend import migrations, split_statements
from dimse_async.archive.config import ServeConfig
from dimse_async.archive.index import Archive
from dimse_async.archive.serve import archive_ae
from dimse_async.services.qr import MODELS

CT = get_testdata_file("CT_small.dcm")
CT_CLASS = "1.2.840.10008.5.1.4.1.1.2"


async def test_nodes_starting_at_once_migrate_once(postgresql, tmp_path: Path) -> None:
    dsn = postgresql.new_database()
    archives = [Archive(tmp_path / f"node{i}", index=dsn) for i in range(4)]
    try:
        assert await asyncio.gather(*(a.count() for a in archives)) == [0, 0, 0, 0]
    finally:
        for archive in archives:
            archive.close()
    expected = "".join(f"{v}|{name}\n" for v, name, _sql in migrations("postgresql"))
    assert postgresql.psql("SELECT version, name FROM schema_version ORDER BY version", dsn=dsn) == expected
    # Started again: nothing left to apply.
    again = Archive(tmp_path / "node0", index=dsn)
    try:
        assert await again.count() == 0
    finally:
        again.close()
    assert postgresql.psql("SELECT count(*) FROM schema_version", dsn=dsn) == f"{len(migrations('postgresql'))}\n"


async def test_sqlite_index_from_before_schema_versions_keeps_its_rows(tmp_path: Path) -> None:
    """An index.sqlite of the layout of migration 0001 marked the old way (user_version
    2) is adopted as version 1, not rebuilt."""
    root = tmp_path / "arch"
    root.mkdir()
    with contextlib.closing(sqlite3.connect(root / "index.sqlite")) as db:
        for statement in split_statements(migrations("sqlite")[0][2]):
            db.execute(statement)
        db.execute(
            "INSERT INTO instances VALUES ('1.2.3', '1.2', '1.2.840.10008.5.1.4.1.1.2', '', '/x.dcm', 1, 1.0, '{}')"
        )
        db.execute("PRAGMA user_version = 2")
        db.commit()
    archive = Archive(root)
    try:
        assert await archive.count() == 1
    finally:
        archive.close()
    with contextlib.closing(sqlite3.connect(root / "index.sqlite")) as db:
        versions = db.execute("SELECT version FROM schema_version ORDER BY version").fetchall()
        assert versions == [(v,) for v, _name, _sql in migrations("sqlite")]  # 1 adopted, the later ones applied


@contextlib.asynccontextmanager
async def node(root: Path, dsn: str) -> AsyncIterator[tuple[Archive, int]]:
    """One ``serve`` node (in this process) on the shared storage and database."""
    config = ServeConfig(ae_title="ARCHIVE", storage_dir=str(root), index=dsn)
    archive = Archive(root, retrieve_ae_title="ARCHIVE", index=dsn)
    ae = archive_ae(config)
    archive.install(ae)
    try:
        async with await ae.start_server("127.0.0.1", 0) as server:
            yield archive, server.port
    finally:
        archive.close()


def versions(tmp: Path, uid: str, count: int) -> list[Path]:
    """``count`` data sets under one SOP Instance UID, differing in their Study Description."""
    out = []
    for i in range(count):
        ds = pydicom.dcmread(CT)
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.StudyDescription = f"version {i}"
        path = tmp / f"{uid}-{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(path)
    return out


@pytest.mark.parametrize("same", [True, False], ids=["same-data", "different-data"])
async def test_duplicate_at_two_nodes_at_once(postgresql, tmp_path: Path, same: bool) -> None:
    """Two nodes on one storage directory and one database each receive the same SOP
    Instance UIDs at the same moment (eight of them): per UID one file and one row, and
    the answers follow the ``keep`` policy (identical data: both success; different
    data: one success, the other 0xA900, and the stored file is the successful one).
    Each node then finds and retrieves what the other stored."""
    dsn = postgresql.new_database()
    root = tmp_path / "shared"
    uids = [generate_uid() for _ in range(8)]
    sent = {uid: versions(tmp_path, uid, 1 if same else 2) for uid in uids}
    scu = AE("SCU", acse_timeout=30, dimse_timeout=60)
    scu.add_requested_context(CT_CLASS, [ExplicitVRLittleEndian])
    scu.add_requested_context(MODELS["study"]["find"])
    async with node(root, dsn) as (archive_a, port_a), node(root, dsn) as (_archive_b, port_b):
        async with (
            scu.associate("127.0.0.1", port_a, "ARCHIVE", async_ops=(8, 1)) as a,
            scu.associate("127.0.0.1", port_b, "ARCHIVE", async_ops=(8, 1)) as b,
        ):
            jobs = []
            for uid in uids:
                jobs.append(a.c_store(sent[uid][0]))
                jobs.append(b.c_store(sent[uid][-1]))
            statuses = await asyncio.gather(*jobs)
        assert await archive_a.count() == len(uids)
    for n, uid in enumerate(uids):
        at_a, at_b = statuses[2 * n], statuses[2 * n + 1]
        codes = sorted((int(at_a), int(at_b)))
        assert codes == ([0, 0] if same else [0, 0xA900]), (uid, at_a, at_b)
        stored = [p for p in root.rglob(f"{uid}.dcm") if ".incoming" not in p.parts]
        assert len(stored) == 1
        winner = sent[uid][0] if at_a.is_success else sent[uid][-1]
        assert pydicom.dcmread(stored[0]).StudyDescription == pydicom.dcmread(winner).StudyDescription
        assert postgresql.psql(f"SELECT path FROM instances WHERE sop_uid = '{uid}'", dsn=dsn) == f"{stored[0]}\n"
    assert not list(root.rglob("*.old")) and not [p for p in root.rglob("*.partial")]


def serve_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dimse_async", "serve", "--port", "0", "--storage-dir", str(tmp_path / "a"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=os.getcwd()),
    )


def test_serve_index_errors_are_one_line_without_the_password(tmp_path: Path) -> None:
    done = serve_cli(tmp_path, "--index", f"postgresql://archive:s3cret@127.0.0.1:{free_port()}/archive")
    assert done.returncode == 3, done
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert "postgresql://archive:***@127.0.0.1" in done.stderr and "s3cret" not in done.stderr
    done = serve_cli(tmp_path, "--index", "mysql://x/y")
    assert done.returncode == 2 and "postgresql://" in done.stderr, done


_HOLD = """
import time


def test_hold(postgresql):
    print("CLUSTER", postgresql.data, flush=True)
    time.sleep(300)
"""


def _postgres_for(data: Path) -> list[psutil.Process]:
    """The PostgreSQL server processes running on the cluster in ``data`` (``-D data``)."""
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            argv = proc.info["cmdline"] or []
            if proc.info["name"] == "postgres" and ("-D", str(data)) in itertools.pairwise(argv):
                found.append(proc)
    return found


def _cluster_line(output: bytes) -> Path | None:
    """The data directory the held test printed, once its whole line is there."""
    for line in output.decode(errors="replace").splitlines(keepends=True):
        match = re.fullmatch(r"CLUSTER (/\S+/dimse-async-pg-[^/\s]+/data)\n", line)
        if match:
            return Path(match[1])
    return None


def test_cluster_does_not_outlive_a_killed_test_run(tmp_path: Path) -> None:
    """pytest killed with SIGKILL (no fixture teardown): its cluster is stopped and removed anyway."""
    hold = tmp_path / "test_hold.py"
    hold.write_text(_HOLD)
    tests = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests), str(tests.parent)])}
    run = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-s", "-p", "conftest", "-p", "no:cacheprovider", str(hold)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    data: Path | None = None
    try:
        assert run.stdout is not None
        os.set_blocking(run.stdout.fileno(), False)
        output = b""
        deadline = time.monotonic() + 120
        while data is None and time.monotonic() < deadline and run.poll() is None:
            select.select([run.stdout], [], [], 0.5)
            output += run.stdout.read() or b""
            data = _cluster_line(output)
        assert data is not None, output.decode(errors="replace")
        assert _postgres_for(data), "the cluster should be running"
        run.kill()  # SIGKILL: no teardown runs in pytest
        run.wait(10)
        deadline = time.monotonic() + 30
        while (_postgres_for(data) or data.parent.exists()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _postgres_for(data), "the cluster outlived the killed test run"
        assert not data.parent.exists()
    finally:
        if run.poll() is None:
            run.kill()
            run.wait(10)
        if data is not None and _postgres_for(data):  # leaked: stop it here
            subprocess.run(
                _as_pg_user([str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "-t", "30", "stop"]),
                capture_output=True, timeout=60, check=False,
            )  # fmt: skip
            shutil.rmtree(data.parent, ignore_errors=True)  # /tmp/dimse-async-pg-*, as matched above
