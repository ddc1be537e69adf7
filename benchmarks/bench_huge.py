#!/usr/bin/env python3
"""One huge instance (default 2 GiB) over one association: MB/s and receiver memory.

A Secondary Capture Part 10 file with ``--size`` bytes of pixel data (Explicit VR
Little Endian) is written to a temporary directory, then sent, each in a fresh pair of
processes on 127.0.0.1:

* DCMTK ``storescu`` -> ``dimse-async store-scp`` (and ``--durable``);
* DCMTK ``storescu`` -> DCMTK ``storescp -pdu 131072 +B -dhl``;
* ``dimse-async send`` -> ``dimse-async store-scp``.

Reported: wall time of the sender, MB/s, the receiver's CPU seconds, and its RSS
growth (peak ``VmHWM`` minus the RSS when it started listening). The received file
is checked (size). Not a test: nothing is asserted about speed.

Every run starts with no dirty pages: the source file is fsynced once written, and
``sync`` runs before each transfer. Without that the first run received while the
kernel wrote back the 2 GiB source (its writes slowed, the write-back's CPU taken
from the two processes) and a run after ``--durable`` (whose fsync had cleaned the
page cache) did not: the order, not the receiver, decided much of the difference.
``--rounds N`` repeats the runs, the order reversed every other round, and prints
the median of each.

    python benchmarks/bench_huge.py                  # 2 GiB
    python benchmarks/bench_huge.py --size 256M      # quicker
    python benchmarks/bench_huge.py --only ours,storescp --rounds 3
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_store as bs  # the sibling benchmark's process helpers

SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def _elem(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\x00" if vr == b"UI" else b" "
    if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT"):
        return struct.pack("<HH2sHI", group, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def make_huge(path: Path, size: int) -> str:
    """A Secondary Capture file with ``size`` bytes of 16-bit pixel data; its UID."""
    from pydicom.uid import generate_uid

    uid = generate_uid()
    meta_body = b"".join(
        [
            _elem(2, 0x0001, b"OB", b"\x00\x01"),
            _elem(2, 0x0002, b"UI", SC_CLASS.encode()),
            _elem(2, 0x0003, b"UI", uid.encode()),
            _elem(2, 0x0010, b"UI", EXPLICIT_LE.encode()),
            _elem(2, 0x0012, b"UI", b"1.2.3.4"),
        ]
    )
    cols = 32768  # rows stay <= 65535 up to 4 GiB
    rows = size // (cols * 2)
    size = rows * cols * 2
    head = b"".join(
        [
            _elem(8, 0x0016, b"UI", SC_CLASS.encode()),
            _elem(8, 0x0018, b"UI", uid.encode()),
            _elem(8, 0x0064, b"CS", b"WSD"),
            _elem(0x10, 0x0010, b"PN", b"HUGE^TEST"),
            _elem(0x20, 0x000D, b"UI", generate_uid().encode()),
            _elem(0x20, 0x000E, b"UI", generate_uid().encode()),
            _elem(0x28, 0x0002, b"US", struct.pack("<H", 1)),
            _elem(0x28, 0x0004, b"CS", b"MONOCHROME2"),
            _elem(0x28, 0x0010, b"US", struct.pack("<H", rows)),
            _elem(0x28, 0x0011, b"US", struct.pack("<H", cols)),
            _elem(0x28, 0x0100, b"US", struct.pack("<H", 16)),
            _elem(0x28, 0x0101, b"US", struct.pack("<H", 16)),
            _elem(0x28, 0x0102, b"US", struct.pack("<H", 15)),
            _elem(0x28, 0x0103, b"US", struct.pack("<H", 0)),
            struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, size),
        ]
    )
    block = random.Random(1).randbytes(1 << 20)
    with open(path, "wb") as f:
        f.write(bytes(128) + b"DICM" + _elem(2, 0, b"UL", struct.pack("<I", len(meta_body))) + meta_body + head)
        left = size
        while left:
            n = min(left, len(block))
            f.write(block[:n])
            left -= n
        f.flush()
        os.fsync(f.fileno())  # its write-back is not charged to the first run
    return uid


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run(receiver: list[str], r_env: dict[str, str], sender: list[str], s_env: dict[str, str], port: int) -> dict:
    os.sync()  # no run pays for the write-back of an earlier one's file
    proc = subprocess.Popen(receiver, env=r_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        bs.wait_listening(proc, port, bs.READY_TIMEOUT, receiver[0])
        base_rss = rss_mb(proc.pid)
        before = bs.proc_status(proc.pid)
        t0 = time.perf_counter()
        code = subprocess.run(sender, env=s_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=900)
        wall = time.perf_counter() - t0
        time.sleep(0.2)
        after = bs.proc_status(proc.pid)
        return {
            "ok": code.returncode == 0,
            "wall_s": wall,
            "cpu_s": after.get("cpu_s", 0.0) - before.get("cpu_s", 0.0),
            "rss_growth_mb": after.get("peak_rss_mb", 0.0) - base_rss,
        }
    finally:
        bs.stop(proc)


def one_run(name: str, src: Path, work: Path, total: int) -> tuple[str, dict]:
    """One transfer of ``src/huge.dcm`` in a fresh pair of processes; its label and result."""
    ours = bs._dimse_async_cmd()
    out = work / f"out-{name}"
    out.mkdir()
    try:
        port = bs.free_port()
        storescu = [bs.STORESCU, "-aec", bs.SCP_AET, "-pdu", bs.DCMTK_MAX_PDU, "-R", bs.HOST, str(port)]
        storescu.append(str(src / "huge.dcm"))
        scp = [*ours, "store-scp", "--host", bs.HOST, "--port", str(port), "--out", str(out)]
        scp += ["--aet", bs.SCP_AET, "--log-level", "WARNING"]
        if name == "ours":
            res = run(scp, bs._py_env(), storescu, bs._dcmtk_env(), port)
            label = "storescu -> dimse-async store-scp"
        elif name == "durable":
            res = run([*scp, "--durable"], bs._py_env(), storescu, bs._dcmtk_env(), port)
            label = "storescu -> dimse-async store-scp --durable"
        elif name == "storescp":
            res = run(bs._storescp(port, out, None), bs._dcmtk_env(), storescu, bs._dcmtk_env(), port)
            label = "storescu -> DCMTK storescp"
        else:
            sender = [*ours, "send", bs.HOST, str(port), str(src), "-r", "--aec", bs.SCP_AET, "--log-level", "WARNING"]
            res = run(scp, bs._py_env(), sender, bs._py_env(), port)
            label = "dimse-async send -> dimse-async store-scp"
        received = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        res["ok"] = res["ok"] and received >= total - 4096
        return label, res
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="2G", help="pixel data bytes (suffix K, M, G: binary)")
    parser.add_argument("--tmpdir", help="where the file and the received copies go")
    parser.add_argument("--only", default="ours,durable,storescp,send", help="which runs")
    parser.add_argument("--rounds", type=int, default=1, help="repeat, reversing the order every other round")
    args = parser.parse_args()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    size = int(args.size[:-1]) * mult[args.size[-1].upper()] if args.size[-1].isalpha() else int(args.size)
    work = Path(tempfile.mkdtemp(prefix="bench_huge_", dir=args.tmpdir))
    try:
        src = work / "src"
        src.mkdir()
        t0 = time.perf_counter()
        make_huge(src / "huge.dcm", size)
        total = (src / "huge.dcm").stat().st_size
        print(f"wrote {total / 1e6:.0f} MB in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        names = args.only.split(",")
        results: dict[str, list[dict]] = {}
        for rnd in range(args.rounds):
            for name in names if rnd % 2 == 0 else names[::-1]:
                label, res = one_run(name, src, work, total)
                results.setdefault(label, []).append(res)
                print(f"round {rnd + 1}: {label} {res}", file=sys.stderr)
        print(f"\n{total / 2**30:.2f} GiB instance ({total / 1e6:.0f} MB), one association, 127.0.0.1")
        if args.rounds > 1:
            print(f"median of {args.rounds} rounds, the order reversed every other round; MB/s of each round in order")
        print("\n| sender -> receiver | wall s | MB/s | receiver CPU s | receiver RSS growth MiB | ok |")
        print("|---|---|---|---|---|---|")
        for label, runs in results.items():
            wall = statistics.median(r["wall_s"] for r in runs)
            rates = " (" + " / ".join(f"{total / 1e6 / r['wall_s']:.0f}" for r in runs) + ")" if len(runs) > 1 else ""
            growth = [r["rss_growth_mb"] for r in runs]
            print(
                f"| {label} | {wall:.2f} | {total / 1e6 / wall:.0f}{rates} "
                f"| {statistics.median(r['cpu_s'] for r in runs):.2f} "
                f"| {statistics.median(growth):.1f}{f' (max {max(growth):.1f})' if len(runs) > 1 else ''} "
                f"| {'yes' if all(r['ok'] for r in runs) else 'NO'} |"
            )
        return 0 if all(r["ok"] for runs in results.values() for r in runs) else 1
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(work)


if __name__ == "__main__":
    sys.exit(main())
