"""8 concurrent DCMTK storescu into one receiver: ``store-scp --workers 2`` vs
``--workers 1`` vs DCMTK ``storescp --fork -pdu 131072 +B -dhl``.

Reports wall time, throughput and the receiver's CPU seconds per instance (the parent
and all its worker or forked processes, reaped ones included). Standalone: measures,
asserts nothing. ``python benchmarks/bench_workers.py [--senders 8] [--files 100]``.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_files(base: Path, senders: int, per_sender: int) -> list[Path]:
    src = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    dirs = []
    for s in range(senders):
        d = base / f"s{s}"
        d.mkdir()
        for i in range(per_sender):
            uid = generate_uid()
            src.SOPInstanceUID = uid
            src.file_meta.MediaStorageSOPInstanceUID = uid
            src.save_as(d / f"{i}.dcm", enforce_file_format=True)
        dirs.append(d)
    return dirs


def wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listening on {port}")


def receiver_cpu(proc: psutil.Process) -> float:
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


def run(name: str, command: list[str], port: int, dirs: list[Path]) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    recv = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        wait_port(port)
        time.sleep(3)  # every worker listening (the parent reserves the port first)
        ps = psutil.Process(recv.pid)
        cpu0 = receiver_cpu(ps)
        start = time.monotonic()
        senders = [
            subprocess.Popen(
                ["/usr/bin/storescu", "-aec", "ANY-SCP", "+sd", "-pdu", "131072", "127.0.0.1", str(port), str(d)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for d in dirs
        ]
        codes = [s.wait(600) for s in senders]
        seconds = time.monotonic() - start
        time.sleep(0.5)  # forked storescp children finish and are reaped
        cpu = receiver_cpu(ps) - cpu0
    finally:
        recv.terminate()
        try:
            recv.wait(60)
        except subprocess.TimeoutExpired:
            recv.kill()
            recv.wait()
    n = sum(len(list(d.iterdir())) for d in dirs)
    size = sum(f.stat().st_size for d in dirs for f in d.iterdir())
    return {
        "name": name,  # type: ignore[dict-item]
        "ok": all(c == 0 for c in codes),  # type: ignore[dict-item]
        "seconds": seconds,
        "instances/s": n / seconds,
        "MB/s": size / seconds / 1e6,
        "cpu ms/instance": cpu / n * 1000,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--senders", type=int, default=8)
    ap.add_argument("--files", type=int, default=100, help="instances per sender")
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        dirs = make_files(base, args.senders, args.files)
        for name, make in (
            ("store-scp --workers 1", lambda port, out: ["--workers", "1"]),
            ("store-scp --workers 2", lambda port, out: ["--workers", "2"]),
        ):
            port = free_port()
            out = base / name.replace(" ", "_")
            cmd = [sys.executable, "-m", "dimse_async", "store-scp", "--any-called-ae", "--port", str(port)]
            cmd += ["--out", str(out), "--log-level", "WARNING", *make(port, out)]
            results.append(run(name, cmd, port, dirs))
        port = free_port()
        out = base / "storescp"
        out.mkdir()
        cmd = ["/usr/bin/storescp", "--fork", "-pdu", "131072", "+B", "-dhl", "-od", str(out), str(port)]
        results.append(run("storescp --fork", cmd, port, dirs))
    cpus = os.cpu_count()
    print(f"{args.senders} concurrent storescu x {args.files} instances (~39 KB each); {cpus} CPUs shared with senders")
    print(f"{'receiver':<24}{'ok':>4}{'seconds':>9}{'inst/s':>9}{'MB/s':>8}{'CPU ms/inst':>13}")
    for r in results:
        print(
            f"{r['name']:<24}{'yes' if r['ok'] else 'NO':>4}{r['seconds']:>9.2f}{r['instances/s']:>9.1f}"
            f"{r['MB/s']:>8.1f}{r['cpu ms/instance']:>13.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
