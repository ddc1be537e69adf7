"""``--workers N``: several processes on one port (SO_REUSEPORT), supervised; one SQLite
(or PostgreSQL) index shared by several writer processes; a duplicate arriving at two
workers at once."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from conftest import stop_process
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dimse_async import AE, Verification
from dimse_async.services.qr import MODELS

CT = get_testdata_file("CT_small.dcm")
CT_CLASS = "1.2.840.10008.5.1.4.1.1.2"
ANNOUNCE = re.compile(r"listening on [\d.]+:(\d+)\b.*\((\d+) workers, pids ([\d,]+)\)")


class Workers:
    """A ``dimse-async <command> --workers N`` process with its stdout and stderr in files."""

    def __init__(self, tmp: Path, *args: str, level: str = "INFO"):
        self.out, self.err = tmp / "stdout", tmp / "stderr"
        env = dict(os.environ, PYTHONPATH=os.getcwd())
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dimse_async", *args, "--log-level", level], stdout=out, stderr=err, env=env
            )
        match = self.wait_for(lambda: ANNOUNCE.search(self.out.read_text()), "announce")
        self.port = int(match.group(1))
        self.pids = [int(p) for p in match.group(3).split(",")]

    def log(self) -> str:
        return self.err.read_text(errors="replace")

    def wait_for(self, condition, what: str, timeout: float = 90.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = condition()
            if result:
                return result
            if self.proc.poll() is not None:
                pytest.fail(f"exited with {self.proc.returncode} waiting for {what}:\n{self.log()[-3000:]}")
            time.sleep(0.05)
        pytest.fail(f"no {what} after {timeout} s:\n{self.log()[-3000:]}")

    def worker_of(self, peer_port: int) -> int | None:
        """The worker whose log says it accepted the association from ``peer_port``
        (a DEBUG line: INFO has one line per association, when it ends)."""
        m = re.search(rf"association accepted .*peer=127\.0\.0\.1:{peer_port} .*worker=(\d+) pid=", self.log())
        return int(m.group(1)) if m else None

    def closed(self) -> list[tuple[int, int]]:
        """(worker, pid) of every association logged as ended so far (its INFO line is
        written once the peer has closed the connection, so a peer may be done before)."""
        return [(int(w), int(p)) for w, p in re.findall(r"association closed .* worker=(\d+) pid=(\d+)", self.log())]

    def stop(self) -> int:
        return stop_process(self.proc, timeout=60)


def echoscu(port: int) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["/usr/bin/echoscu", "-to", "10", "127.0.0.1", str(port)], capture_output=True, timeout=30)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_serve_workers_share_the_port_restart_and_drain(tmp_path):
    from conftest import free_port

    http_port = free_port()
    server = Workers(
        tmp_path, "serve", "--workers", "2", "--port", "0", "--storage-dir", str(tmp_path / "a"),
        "--http-port", str(http_port),
    )  # fmt: skip
    try:
        # /healthz (the parent's) is 503 while the index cannot be read, 200 again after.
        server.wait_for(lambda: f"health and metrics on port {http_port}" in server.out.read_text(), "HTTP port")
        assert _healthz(http_port) == 200
        (tmp_path / "a" / "index.sqlite").rename(tmp_path / "index.away")
        assert _healthz(http_port) == 503
        (tmp_path / "index.away").rename(tmp_path / "a" / "index.sqlite")
        assert _healthz(http_port) == 200
        assert len(server.pids) == 2 and len(set(server.pids)) == 2
        # Both workers take associations: the kernel spreads connections over the two.
        served: set[int] = set()
        for n in range(1, 61):
            assert echoscu(server.port).returncode == 0
            logged = server.wait_for(lambda n=n: len(server.closed()) >= n and server.closed(), "association lines")
            served = {pid for _, pid in logged}
            if served == set(server.pids):
                break
        assert served == set(server.pids), server.log()[-2000:]

        # kill -9 one worker: the other serves meanwhile, the parent starts a new one.
        victim, other = server.pids
        os.kill(victim, signal.SIGKILL)
        # Gone means reaped by the parent: a killed process's main thread can be a zombie
        # while its other threads still exit, holding its listening socket open; a
        # connection queued on it then is reset when they are done.
        server.wait_for(lambda: re.search(rf"worker died; restarting worker=1 pid={victim}", server.log()), "restart")
        assert not alive(victim)
        before = len(server.closed())
        for _ in range(3):
            assert echoscu(server.port).returncode == 0
        server.wait_for(lambda: len(server.closed()) >= before + 3, "the three associations logged")
        new = server.wait_for(
            lambda: re.search(r"worker listening worker=1 pid=(\d+)", server.log().split("worker died")[-1]),
            "new worker",
        )
        new_pid = int(new.group(1))
        assert new_pid != victim and alive(new_pid) and alive(other)
        assert echoscu(server.port).returncode == 0

        # SIGTERM: forwarded, every worker drains, the parent exits 0.
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(60) == 0, server.log()[-3000:]
        log = server.log()
        assert log.count("drained") >= 2
        assert not alive(new_pid) and not alive(other)
    finally:
        server.stop()


def test_store_scp_workers_count_and_failed_start(tmp_path):
    """store-scp --workers 2 stores from DCMTK and sums the workers' counts; a set that
    cannot start (port taken) exits non-zero instead of restarting forever."""
    (tmp_path / "one").mkdir()
    server = Workers(tmp_path / "one", "store-scp", "--any-called-ae", "--workers", "2", "--port", "0", "--out", str(tmp_path / "in"))
    try:
        for _ in range(4):
            done = subprocess.run(
                ["/usr/bin/storescu", "-to", "10", "127.0.0.1", str(server.port), CT], capture_output=True, timeout=30
            )
            assert done.returncode == 0, done.stderr
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(60) == 0
        assert "stored 4 instances" in server.out.read_text()
    finally:
        server.stop()
    with __import__("socket").socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "dimse_async", "store-scp", "--workers", "2", "--port", str(port)],
            capture_output=True,
            timeout=60,
            cwd=tmp_path,
            env=dict(os.environ, PYTHONPATH=os.getcwd()),
        )
        assert done.returncode != 0 and b"cannot listen" in done.stderr


def _scu() -> AE:
    scu = AE("SCU", acse_timeout=30, dimse_timeout=60)
    scu.add_requested_context(Verification)
    scu.add_requested_context(CT_CLASS, [ExplicitVRLittleEndian])
    scu.add_requested_context(MODELS["study"]["find"])
    return scu


async def _one_on_each_worker(server: Workers, scu: AE) -> list:
    """Open associations until one is held on each of the two workers; release the rest."""
    held: dict[int, object] = {}
    spare = []
    for _ in range(40):
        assoc = await scu.associate("127.0.0.1", server.port, "ANY-SCP")
        local_port = assoc.transport.get_extra_info("sockname")[1]
        worker = await asyncio.to_thread(server.wait_for, lambda p=local_port: server.worker_of(p), "log line", 30)
        if worker in held:
            spare.append(assoc)
        else:
            held[worker] = assoc
        if len(held) == 2:
            break
    for assoc in spare:
        await assoc.release()
    assert len(held) == 2, "connections never reached both workers"
    return [held[1], held[2]]


@pytest.mark.parametrize("same", [True, False], ids=["same-data", "different-data"])
async def test_duplicate_at_two_workers_at_once(tmp_path, same, index, request):
    """The same SOP Instance UID stored through two workers concurrently: one copy on
    disk and in the index; both answered by the ``keep`` policy (identical data: both
    success; different data: one success, the other 0xA900). With the SQLite index
    and with a PostgreSQL one."""
    uid = generate_uid()
    files = []
    for i in range(2):
        ds = pydicom.dcmread(CT)
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        if not same:
            ds.StudyDescription = f"version {i}"
        path = tmp_path / f"v{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    storage = tmp_path / "archive"
    extra = ("--index", index) if index else ()
    server = Workers(
        tmp_path, "serve", "--workers", "2", "--port", "0", "--storage-dir", str(storage), *extra, level="DEBUG"
    )  # DEBUG: the worker of an open association is found from its "association accepted" line
    try:
        scu = _scu()
        a1, a2 = await _one_on_each_worker(server, scu)
        statuses = await asyncio.gather(a1.c_store(files[0]), a2.c_store(files[1]))
        codes = sorted(int(s) for s in statuses)
        assert codes == ([0, 0] if same else [0, 0xA900]), statuses
        await asyncio.gather(a1.release(), a2.release())
        stored = [p for p in storage.rglob("*.dcm")]
        assert len(stored) == 1
        if not same:  # the copy kept is the one answered success
            winner = files[0] if statuses[0].is_success else files[1]
            assert pydicom.dcmread(stored[0]).StudyDescription == pydicom.dcmread(winner).StudyDescription
        if index is None:
            with sqlite3.connect(storage / "index.sqlite") as db:
                rows = db.execute("SELECT sop_uid, path FROM instances").fetchall()
            assert rows == [(uid, str(stored[0]))]
        else:
            rows = request.getfixturevalue("postgresql").psql("SELECT sop_uid, path FROM instances", dsn=index)
            assert rows == f"{uid}|{stored[0]}\n"
    finally:
        assert server.stop() == 0


def _scrape(port: int) -> dict:
    import urllib.request

    from test_metrics import samples

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as rsp:
        assert rsp.status == 200
        return samples(rsp.read().decode())


def _healthz(port: int) -> int:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as rsp:
            return int(rsp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def _send_concurrently(port: int, batches: list[list[Path]]) -> None:
    """One DCMTK storescu per batch, all at once (several connections, so the kernel
    spreads them over the workers)."""
    argv = ["/usr/bin/storescu", "-to", "20", "-ta", "20", "-td", "30", "127.0.0.1", str(port)]
    procs = [
        subprocess.Popen([*argv, *map(str, batch)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for batch in batches
    ]
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out.decode(errors="replace")


def test_metrics_of_all_workers_summed_on_one_http_port(tmp_path):
    """store-scp --workers 2 --http-port P: several concurrent senders reach both workers;
    /metrics on P (served by the parent from prometheus_client's multiprocess files)
    counts exactly the instances sent, whichever worker took them; a worker killed with
    SIGKILL keeps its counts in the total and its restart adds to them; the files'
    directory is removed when the set stops."""
    from conftest import free_port
    from test_interop_tls import make_instances
    from test_metrics import value

    http_port = free_port()
    files = make_instances(tmp_path / "send", 48)
    (tmp_path / "run").mkdir()
    server = Workers(
        tmp_path / "run", "store-scp", "--workers", "2", "--port", "0", "--out", str(tmp_path / "in"),
        "--http-port", str(http_port),
    )  # fmt: skip
    try:
        server.wait_for(lambda: f"health and metrics on port {http_port}" in server.out.read_text(), "HTTP port")
        assert _healthz(http_port) == 200
        directories = set()
        for pid in server.pids:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            directories |= {e.split(b"=", 1)[1].decode() for e in environ if e.startswith(b"PROMETHEUS_MULTIPROC_DIR=")}
        assert len(directories) == 1, directories  # one directory, shared by the workers
        metrics_dir = Path(directories.pop())
        sent = associations = 0
        for rounds in range(1, 6):  # until both workers took some (the kernel hashes connections)
            batch = files[(rounds - 1) * 8 : rounds * 8]
            _send_concurrently(server.port, [batch[i::4] for i in range(4)])
            sent, associations = sent + len(batch), associations + 4
            logged = server.wait_for(lambda n=associations: len(server.closed()) >= n and server.closed(), "lines")
            took = {worker for worker, _ in logged}
            if took == {1, 2}:
                break
        assert took == {1, 2}, f"connections never reached both workers: {took}"

        def settled() -> dict | None:
            m = _scrape(http_port)
            closed = value(m, "dicom_associations_total", role="scp", outcome="released", reason="")
            return m if closed == associations and value(m, "dicom_associations_open", role="scp") == 0 else None

        m = server.wait_for(settled, "settled metrics", timeout=30)
        assert value(m, "dicom_operations_total", role="scp", service="C-STORE", status="success") == sent
        assert value(m, "dicom_operation_seconds_count", role="scp", service="C-STORE") == sent
        assert value(m, "dicom_bytes_received_total", role="scp") > sum(f.stat().st_size for f in files[:sent]) / 2
        assert {p.stem.split("_")[-1] for p in metrics_dir.glob("counter_*.db")} == {str(p) for p in server.pids}

        # SIGKILL one worker: its counts stay in the total; the restarted one adds to them
        victim = server.pids[0]
        os.kill(victim, signal.SIGKILL)
        server.wait_for(lambda: "worker died; restarting" in server.log(), "restart")
        server.wait_for(lambda: server.log().count("worker listening") >= 3, "restarted worker listening")
        m = _scrape(http_port)
        assert value(m, "dicom_operations_total", role="scp", service="C-STORE", status="success") == sent
        more = files[40:48]
        _send_concurrently(server.port, [more[i::4] for i in range(4)])
        sent, associations = sent + len(more), associations + 4
        m = server.wait_for(settled, "settled metrics after the restart", timeout=30)
        assert value(m, "dicom_operations_total", role="scp", service="C-STORE", status="success") == sent
        assert value(m, "dicom_associations_open", role="scp") == 0
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(60) == 0, server.log()[-3000:]
    finally:
        server.stop()
    assert not metrics_dir.exists()


@pytest.mark.parametrize("command", ["store-scp", "serve"])
async def test_a_worker_killed_mid_store_leaves_no_spool_file_behind(tmp_path, command):
    """kill -9 a worker while it spools a large instance: once the parent has reaped it,
    its ``.partial`` spool file is gone (before: there until the whole server restarted);
    the spool files of the other worker's stores in progress stay and those stores
    complete; an instance stored before is untouched."""
    from rawpeer import RawPeer, ct_dataset, pdata, response_status, rq_bytes, store_rq

    out = tmp_path / "a"
    where = ["--out", str(out)] if command == "store-scp" else ["--storage-dir", str(out)]
    server = Workers(tmp_path, command, "--workers", "2", "--port", "0", *where)
    incoming = out / ".incoming"
    peers: list[RawPeer] = []

    def spools() -> dict[int, list[Path]]:
        found: dict[int, list[Path]] = {}
        for path in incoming.glob(".incoming-*.partial") if incoming.is_dir() else ():
            found.setdefault(int(path.name.split("-")[1]), []).append(path)
        return found

    try:
        scu = AE("SCU", acse_timeout=30, dimse_timeout=30)
        scu.add_requested_context(CT_CLASS, [ExplicitVRLittleEndian])
        finished = tmp_path / "finished.dcm"
        ds = pydicom.dcmread(CT)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(finished, enforce_file_format=True)
        async with scu.associate("127.0.0.1", server.port, "ANY-SCP") as assoc:
            assert int(await assoc.c_store(finished)) == 0
        (stored,) = [p for p in out.rglob("*") if p.is_file() and ds.SOPInstanceUID in p.name]
        stored_bytes = stored.read_bytes()

        big = ct_dataset()  # 8 MiB of pixel data: past serve's spool threshold (4 MiB) too
        big.Rows, big.Columns, big.BitsAllocated, big.BitsStored, big.HighBit = 2048, 2048, 16, 16, 15
        big.SamplesPerPixel, big.PhotometricInterpretation, big.PixelRepresentation = 1, "MONOCHROME2", 0
        big.PixelData = bytes(2048 * 2048 * 2)
        held = 6 << 20
        sent: dict[RawPeer, tuple[bytes, bytes]] = {}
        for _ in range(12):  # until both workers spool a store in progress (the kernel picks)
            peer = await RawPeer.connect(server.port)
            peers.append(peer)
            big.SOPInstanceUID = generate_uid()
            cmd, data = sent[peer] = store_rq(big)
            await peer.associate(rq_bytes(called="ANY-SCP", max_pdu=16384))
            await peer.send(pdata(3, cmd, command=True))
            for offset in range(0, held, 16000):
                await peer.send(pdata(3, data[offset : min(offset + 16000, held)], command=False, last=False))
            opened = len(peers)
            server.wait_for(lambda: sum(map(len, spools().values())) >= opened, "a spool file per store")  # noqa: B023
            if len(spools()) == 2:
                break
        assert len(spools()) == 2, server.log()[-3000:]
        victim, survivor = sorted(spools())
        survivors, victims = sorted(spools()[survivor]), len(spools()[victim])
        os.kill(victim, signal.SIGKILL)
        # The parent removes them once it reaped the worker, before it says it restarts it.
        server.wait_for(lambda: re.search(rf"worker died; restarting .*pid={victim}", server.log()), "the restart")
        assert victim not in spools() and sorted(spools()[survivor]) == survivors
        assert re.search(rf"removed a dead worker's unfinished stores .*pid={victim} files={victims}\b", server.log())
        assert stored.read_bytes() == stored_bytes
        # The other worker's stores in progress complete.
        completed = 0
        for peer in peers:
            if peer.writer.is_closing() or peer.reader.at_eof():
                continue
            data = sent[peer][1]
            try:
                for offset in range(held, len(data), 16000):
                    end = min(offset + 16000, len(data))
                    await peer.send(pdata(3, data[offset:end], command=False, last=end == len(data)))
            except (ConnectionError, TimeoutError):
                continue  # one of the dead worker's
            reply = await peer.read_pdu(30)
            if reply is not None:
                assert response_status(reply) == (0x8001, 0), reply[:64]
                completed += 1
        assert completed == len(survivors)
        server.wait_for(lambda: not spools(), "the completed stores' spool files placed")
        assert len([p for p in out.rglob("*.dcm") if ".incoming" not in p.parts]) == 1 + completed
    finally:
        for peer in peers:
            await peer.close()
        server.stop()


def test_store_scp_removes_an_earlier_runs_spool_files_at_start(tmp_path):
    """store-scp starting removes the spool files of a process that is gone (an earlier
    run killed mid-store); those of a running process (its pid alive, or the file
    locked by a writer) stay."""
    import fcntl

    from conftest import free_port

    incoming = tmp_path / "in" / ".incoming"
    incoming.mkdir(parents=True)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = incoming / f".incoming-{gone.pid}-0.partial"
    live = incoming / f".incoming-{os.getpid()}-0.partial"
    held = incoming / f".incoming-{gone.pid}-1.partial"
    for path in (dead, live, held):
        path.write_bytes(b"\0" * 1000)
    with open(held, "rb") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        out = tmp_path / "stdout"
        with open(out, "wb") as stdout:
            proc = subprocess.Popen(
                [sys.executable, "-m", "dimse_async", "store-scp", "--port", str(free_port()),
                 "--out", str(tmp_path / "in")],
                stdout=stdout, stderr=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=os.getcwd()),
            )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while "listening on" not in out.read_text() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert "listening on" in out.read_text()
            assert not dead.exists() and live.exists() and held.exists()
        finally:
            stop_process(proc)
        assert proc.stderr is not None and b"removed unfinished stores of an earlier run files=1" in proc.stderr.read()
