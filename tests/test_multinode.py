"""Two ``serve`` nodes sharing one storage directory and one PostgreSQL index, behind a
real HAProxy (TCP mode, PROXY protocol v2, health checks by ``dimse-async check``):

- storescu through HAProxy lands on both nodes; findscu and getscu through HAProxy
  reach every instance whichever node stored it;
- one node is killed (SIGKILL) in the middle of an ingest: the sender runs again
  with what was not acknowledged, HAProxy sends it to the surviving node, and every
  instance ever acknowledged is findable, retrievable and intact on disk;
- the health check marks the dead node down.

The example configuration in ``examples/scale-out/`` is checked too.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from conftest import acknowledged, communicate, dcmtk, free_port, stop_process, wait_tcp
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from test_integrity import same_dataset

from dimse_async.archive.config import load_config

pytestmark = [pytest.mark.interop, pytest.mark.timeout(300)]

HAPROXY = "/usr/sbin/haproxy"
HOST = "127.0.0.1"
CT = get_testdata_file("CT_small.dcm")
EXAMPLES = Path(__file__).parent.parent / "examples" / "scale-out"
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
LISTENING = re.compile(r"listening on [\d.]+:(\d+)")


class Node:
    """One ``serve`` process (PROXY protocol from 127.0.0.1) with its log."""

    def __init__(self, tmp: Path, name: str, root: Path, dsn: str):
        self.name = name
        self.port = free_port()
        self.log = tmp / f"{name}.log"
        self.out = tmp / f"{name}.stdout"
        config = tmp / f"{name}.toml"
        config.write_text(
            f'ae_title = "ARCHIVE"\nhost = "{HOST}"\nport = {self.port}\nstorage_dir = "{root}"\n'
            f'index = "{dsn}"\nproxy_protocol = true\ntrusted_proxies = ["{HOST}"]\n'
        )
        env = dict(os.environ, PYTHONPATH=os.getcwd())
        with self.out.open("wb") as out, self.log.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dimse_async", "serve", "--config", str(config), "--log-level", "DEBUG"],
                stdout=out, stderr=err, env=env, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + 90
        while not LISTENING.search(self.out.read_text(errors="replace")):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                stop_process(self.proc)
                pytest.fail(f"{name} did not start:\n{self.log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.05)

    def associations(self, calling_ae: str) -> int:
        """Associations accepted from ``calling_ae`` so far (DEBUG lines, written as each is
        accepted: INFO has one line per association, when it ends, and the node that holds
        an association still open is looked for here)."""
        text = self.log.read_text(errors="replace")
        return len(re.findall(rf"association accepted.*peer_ae={calling_ae}\b", text))


def haproxy_config(tmp: Path, front: int, nodes: list[Node]) -> tuple[Path, Path]:
    """HAProxy in TCP mode with PROXY v2 to each node, ``dimse-async check`` as health check."""
    check = tmp / "dimse-check.sh"
    check.write_text(
        "#!/bin/sh\n"
        f"export PYTHONPATH={os.getcwd()}\n"
        f'exec {sys.executable} -m dimse_async check "$3" "$4" --aec ARCHIVE --proxy-protocol --timeout 3\n'
    )
    check.chmod(0o755)
    sock = tmp / "haproxy.sock"
    servers = "\n".join(
        f"    server {n.name} {HOST}:{n.port} send-proxy-v2 check inter 10s fastinter 1s downinter 1s fall 2 rise 1"
        for n in nodes
    )
    cfg = tmp / "haproxy.cfg"
    cfg.write_text(
        f"""
global
    maxconn 200
    external-check
    insecure-fork-wanted
    stats socket {sock} mode 600 level admin
defaults
    mode tcp
    # an external check is stopped after min(connect, inter): a Python process per check
    # needs a few seconds on a busy machine, and two stopped checks mark a healthy node
    # down (both down: HAProxy closes the client's connection at once). Hence inter 10s
    # while a node is up, the check every second once one failed or the node is down.
    timeout connect 10s
    timeout client 60s
    timeout server 60s
    timeout check 10s
    retries 3
    option redispatch
frontend dicom
    bind {HOST}:{front}
    default_backend archive
backend archive
    balance roundrobin
    option external-check
    external-check command {check}
{servers}
"""
    )
    return cfg, sock


def server_states(sock: Path) -> dict[str, tuple[str, str]]:
    """(status, check status) of each backend server, from HAProxy's stats socket."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(sock))
        s.sendall(b"show stat\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    lines = data.decode().splitlines()
    header = lines[0].lstrip("# ").split(",")
    out = {}
    for line in lines[1:]:
        row = dict(zip(header, line.split(",")))
        if row.get("pxname") == "archive" and row.get("svname") not in ("BACKEND", None):
            out[row["svname"]] = (row["status"], row["check_status"])
    return out


def wait_until(condition, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.1)
    pytest.fail(f"no {what} after {timeout} s")


@contextlib.contextmanager
def haproxy(cfg: Path, front: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    if shutil.which(HAPROXY) is None:
        pytest.fail(f"{HAPROXY} not found: install HAProxy (apt-get install -y haproxy)")
    with log.open("wb") as out:
        proc = subprocess.Popen([HAPROXY, "-f", str(cfg), "-db"], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    try:
        wait_tcp(proc, front, log)
        yield proc
    finally:
        stop_process(proc)


def instances(tmp: Path, count: int, study: str, series: str, start: int) -> list[Path]:
    out = []
    for i in range(count):
        ds = pydicom.dcmread(CT)
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.InstanceNumber = start + i + 1
        path = tmp / f"ct{start + i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(path)
    return out


def uid_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


async def storescu(port: int, calling: str, paths: list[Path]) -> str:
    _code, out, _ = await communicate(
        (dcmtk("storescu"), "-v", "-aet", calling, "-aec", "ARCHIVE", "-to", "10", "-ta", "10", "-td", "10",
         HOST, str(port), *map(str, paths)),
        env=DCMTK_ENV, merge_stderr=True, timeout=120,
    )  # fmt: skip
    return out


async def find_instances(port: int, tmp: Path, study: str, series: str) -> set[str]:
    out = tmp / f"find-{time.monotonic_ns()}"
    out.mkdir()
    _code, text, _ = await communicate(
        (dcmtk("findscu"), "-v", "-S", "-aec", "ARCHIVE", "-X", "-od", str(out), "-k", "QueryRetrieveLevel=IMAGE",
         "-k", f"StudyInstanceUID={study}", "-k", f"SeriesInstanceUID={series}", "-k", "SOPInstanceUID",
         HOST, str(port)),
        env=DCMTK_ENV, merge_stderr=True,
    )  # fmt: skip
    assert "Received Final Find Response (Success)" in text, text
    return {str(pydicom.dcmread(p).SOPInstanceUID) for p in out.glob("rsp*.dcm")}


async def get_series(port: int, out: Path, study: str, series: str) -> dict[str, Path]:
    out.mkdir()
    code, text, _ = await communicate(
        (dcmtk("getscu"), "-v", "-S", "-aec", "ARCHIVE", "-od", str(out), "-k", "QueryRetrieveLevel=SERIES",
         "-k", f"StudyInstanceUID={study}", "-k", f"SeriesInstanceUID={series}", HOST, str(port)),
        env=DCMTK_ENV, merge_stderr=True, timeout=120,
    )  # fmt: skip
    assert code == 0, text
    return {uid_of(p): p for p in out.iterdir()}


def stored_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*.dcm") if ".incoming" not in p.parts]


async def test_two_nodes_behind_haproxy_share_the_archive_and_survive_a_kill(postgresql, tmp_path: Path) -> None:
    seed = int(time.time())
    rng = random.Random(seed)
    dsn = postgresql.new_database()
    root = tmp_path / "shared"
    src = tmp_path / "src"
    src.mkdir()
    study, series = generate_uid(), generate_uid()
    first = instances(src, 20, study, series, 0)
    batch = instances(src, 90, study, series, 20)
    uids = {str(p): uid_of(p) for p in first + batch}
    nodes = [Node(tmp_path, "node1", root, dsn), Node(tmp_path, "node2", root, dsn)]
    front = free_port()
    cfg, sock = haproxy_config(tmp_path, front, nodes)
    try:
        with haproxy(cfg, front, tmp_path / "haproxy.log"):
            # dimse-async check, run by HAProxy, finds both nodes up.
            wait_until(
                lambda: all(s == ("UP", "PROCOK") for s in server_states(sock).values()) and len(server_states(sock)) == 2,
                "successful health checks",
            )

            # Four senders through HAProxy: round robin spreads them over both nodes.
            for i in range(4):
                out = await storescu(front, "MODALITY", first[5 * i : 5 * i + 5])
                assert acknowledged(out) == set(map(str, first[5 * i : 5 * i + 5])), out
            assert all(n.associations("MODALITY") >= 1 for n in nodes), [n.associations("MODALITY") for n in nodes]

            # Either node finds everything (two queries: one per node).
            for _ in range(2):
                assert await find_instances(front, tmp_path, study, series) == {uids[str(p)] for p in first}
            assert all(n.associations("FINDSCU") == 1 for n in nodes)
            got = await get_series(front, tmp_path / "got1", study, series)
            assert set(got) == {uids[str(p)] for p in first}
            assert all(same_dataset(got[uids[str(p)]], p) for p in first)

            # kill -9 the node receiving a batch, after a random number of its files landed.
            before = len(stored_files(root))
            sender = asyncio.ensure_future(storescu(front, "KILLTEST", batch))
            target = before + rng.randint(3, len(batch) // 3)
            deadline = time.monotonic() + 60
            while not sender.done() and len(stored_files(root)) < target and time.monotonic() < deadline:
                await asyncio.sleep(0.02)  # each look walks the archive: not so often that it slows the ingest
            assert not sender.done(), f"seed {seed}: the batch ended before the kill"
            (victim,) = [n for n in nodes if n.associations("KILLTEST")]
            os.kill(victim.proc.pid, signal.SIGKILL)
            victim.proc.wait(10)
            acked = acknowledged(await sender)
            assert len(acked) < len(batch), f"seed {seed}: nothing was left to resend"

            # The sender retries what was not acknowledged: HAProxy takes it to the other node.
            survivor = next(n for n in nodes if n is not victim)
            out = await storescu(front, "RETRY", [p for p in batch if str(p) not in acked])
            acked |= acknowledged(out)
            assert acked == set(map(str, batch)), f"seed {seed}: {out[-2000:]}"
            assert survivor.associations("RETRY") == 1 and victim.associations("RETRY") == 0

            # Nothing acknowledged is lost: found, retrieved, intact on disk.
            everything = {uids[str(p)] for p in first + batch}
            assert await find_instances(front, tmp_path, study, series) == everything, f"seed {seed}"
            on_disk = {p.stem: p for p in stored_files(root)}
            for path in first + batch:
                assert same_dataset(on_disk[uids[str(path)]], path), f"seed {seed}: {path.name} differs on disk"
            got = await get_series(front, tmp_path / "got2", study, series)
            assert set(got) == everything
            assert all(same_dataset(got[uids[str(p)]], p) for p in first + batch)
            assert postgresql.psql("SELECT count(*) FROM instances", dsn=dsn) == f"{len(everything)}\n"

            # The health check marks the dead node down.
            wait_until(lambda: server_states(sock)[victim.name][0] == "DOWN", "dead node marked down", 60)
            assert server_states(sock)[survivor.name][0].startswith("UP")
    finally:
        for n in nodes:
            stop_process(n.proc)


def test_example_configuration_is_valid(tmp_path: Path) -> None:
    """examples/scale-out: HAProxy accepts the configuration; both nodes' TOML files load
    and point at one PostgreSQL index, one storage directory, with the PROXY protocol."""
    if shutil.which(HAPROXY) is None:
        pytest.fail(f"{HAPROXY} not found: install HAProxy (apt-get install -y haproxy)")
    text = (EXAMPLES / "haproxy.cfg").read_text()
    cfg = tmp_path / "haproxy.cfg"
    # The check command and stats socket paths exist only on a deployed machine.
    cfg.write_text(
        text.replace("/etc/haproxy/dimse-check.sh", str(EXAMPLES / "dimse-check.sh")).replace(
            "/run/haproxy/admin.sock", str(tmp_path / "admin.sock")
        )
    )
    done = subprocess.run([HAPROXY, "-c", "-f", str(cfg)], capture_output=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "send-proxy-v2" in text and "option external-check" in text
    assert "dimse-async check" in (EXAMPLES / "dimse-check.sh").read_text()
    configs = [load_config(EXAMPLES / f"node{i}.toml") for i in (1, 2)]
    assert len({c.index for c in configs}) == 1 and configs[0].index.startswith("postgresql://")
    assert len({c.storage_dir for c in configs}) == 1
    assert all(c.proxy_protocol for c in configs)
