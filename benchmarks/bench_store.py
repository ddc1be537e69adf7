#!/usr/bin/env python3
"""C-STORE ingest benchmark: instances/s and MB/s over one association.

Measures dimse_async's storage SCP (``dimse-async store-scp``) and SCU
(``dimse-async send``) against DCMTK (``/usr/bin/storescu``, ``/usr/bin/storescp``)
and a pynetdicom storage SCP (``benchmarks/pynetdicom_scp.py``), on two workloads:

* ``small``: 1000 copies of pydicom's ``CT_small.dcm`` (~39 KB) with fresh SOP Instance UIDs;
* ``large``: 100 CT images of 1024x1024 16-bit random pixels (~2.1 MB each);

both Explicit VR Little Endian Part 10 files in a temporary directory.

Every measurement starts a fresh receiver process and a fresh sender process on
127.0.0.1, times the sender from just before its start to its exit (wall time, nothing
subtracted), checks that the receiver wrote exactly the expected instances, reads the
receiver's peak RSS (``VmHWM``) and CPU time, then stops it. See benchmarks/README.md.

    python benchmarks/bench_store.py            # full run, ~1000 + ~100 instances
    python benchmarks/bench_store.py --quick    # 200 small / 20 large
    python benchmarks/bench_store.py --repeat 3 # best of 3

Not a test: it asserts nothing about speed. It exits 1 if a run failed (sender error,
or the receiver did not store every instance), 0 otherwise. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
DCMTK_MAX_PDU = "131072"  # the largest both storescu and storescp accept
OUR_AE_PDU = 262_144  # dimse_async's AE default max receive PDU; the pynetdicom SCP gets the same
SCP_AET = "BENCH_SCP"
SCU_AET = "BENCH_SCU"
HOST = "127.0.0.1"

READY_TIMEOUT = 20.0  # seconds for a receiver to start listening
FILES_TIMEOUT = 10.0  # seconds for the last files to appear after the sender exits
STOP_TIMEOUT = 10.0  # seconds between SIGTERM and SIGKILL

# DCMTK logger configuration used for storescu: everything INFO and above goes to a file
# (not the console), with wall-clock timestamps, so the association time can be read
# from "Requesting Association" .. "Releasing Association". Buffered: no flush per line.
DCMTK_LOG_CFG = """\
log4cplus.rootLogger = INFO, file
log4cplus.appender.file = log4cplus::FileAppender
log4cplus.appender.file.File = {path}
log4cplus.appender.file.Append = false
log4cplus.appender.file.ImmediateFlush = false
log4cplus.appender.file.layout = log4cplus::PatternLayout
log4cplus.appender.file.layout.ConversionPattern = %D{{%s.%q}} %m%n
"""


class BenchFailure(Exception):
    """A run that did not do what it should (non-zero exit, missing files, no listener)."""


# ---------------------------------------------------------------------------
# workloads
# ---------------------------------------------------------------------------


@dataclass
class Workload:
    name: str
    directory: Path
    count: int
    total_bytes: int
    uids: set[str]

    @property
    def mean_kb(self) -> float:
        return self.total_bytes / self.count / 1e3


def _template() -> Any:
    import pydicom
    from pydicom.data import get_testdata_file

    return pydicom.dcmread(get_testdata_file("CT_small.dcm"))


def _save(ds: Any, path: Path, uid: str) -> None:
    from pydicom.uid import ExplicitVRLittleEndian

    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)


def make_small(directory: Path, count: int) -> Workload:
    """``count`` copies of CT_small.dcm (~39 KB), each with a fresh SOP Instance UID."""
    from pydicom.uid import generate_uid

    directory.mkdir(parents=True, exist_ok=True)
    ds = _template()
    series = generate_uid()
    ds.SeriesInstanceUID = series
    uids: set[str] = set()
    total = 0
    for i in range(count):
        uid = generate_uid()
        ds.InstanceNumber = i + 1
        path = directory / f"small_{i:05d}.dcm"
        _save(ds, path, uid)
        uids.add(uid)
        total += path.stat().st_size
    return Workload("small", directory, count, total, uids)


def make_large(directory: Path, count: int, seed: int = 20240607) -> Workload:
    """``count`` 1024x1024 16-bit CT images (~2.1 MB) with random-ish pixel data."""
    from pydicom.uid import generate_uid

    directory.mkdir(parents=True, exist_ok=True)
    ds = _template()
    for kw in ("SmallestImagePixelValue", "LargestImagePixelValue"):
        if kw in ds:
            delattr(ds, kw)
    ds.Rows = ds.Columns = 1024
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.SeriesInstanceUID = generate_uid()
    n_bytes = 1024 * 1024 * 2
    base = random.Random(seed).randbytes(n_bytes + 64 * 1024)
    uids: set[str] = set()
    total = 0
    for i in range(count):
        shift = (i * 4099) % (64 * 1024) & ~1  # a different window of the random bytes per image
        ds.PixelData = base[shift : shift + n_bytes]
        ds["PixelData"].VR = "OW"
        ds.InstanceNumber = i + 1
        uid = generate_uid()
        path = directory / f"large_{i:05d}.dcm"
        _save(ds, path, uid)
        uids.add(uid)
        total += path.stat().st_size
    return Workload("large", directory, count, total, uids)


def make_huge(directory: Path, mib: int) -> Workload:
    """One CT instance whose pixel data is ``mib`` MiB (2048: a 2 GiB instance), written
    in pieces: the file is never in memory, here or in the sender."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import generate_uid

    directory.mkdir(parents=True, exist_ok=True)
    ds = _template()
    for kw in ("SmallestImagePixelValue", "LargestImagePixelValue", "PixelData"):
        if kw in ds:
            delattr(ds, kw)
    n_bytes = mib << 20
    side = int((n_bytes // 2) ** 0.5)
    rows, n_bytes = n_bytes // 2 // side, (n_bytes // 2 // side) * side * 2
    ds.Rows, ds.Columns = rows, side
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    uid = generate_uid()
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    head = DicomBytesIO()
    head.is_little_endian, head.is_implicit_VR = True, False
    head.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(head, ds.file_meta, enforce_standard=True)
    write_dataset(head, ds)
    path = directory / "huge_00000.dcm"
    block = random.Random(20261202).randbytes(4 << 20)
    with open(path, "wb") as f:
        f.write(head.getvalue())
        f.write(b"\xe0\x7f\x10\x00OW\x00\x00" + n_bytes.to_bytes(4, "little"))
        left = n_bytes
        while left:
            f.write(block[: min(left, len(block))])
            left -= min(left, len(block))
    return Workload("huge", directory, 1, path.stat().st_size, {uid})


# ---------------------------------------------------------------------------
# the programs
# ---------------------------------------------------------------------------


def _dimse_async_cmd() -> list[str]:
    """``python -m dimse_async`` of this interpreter: the same entry for every tree
    measured (``PYTHONPATH`` picks the tree; an installed console script may name an
    entry point an older tree lacks)."""
    return [sys.executable, "-m", "dimse_async"]


def _dcmtk_env() -> dict[str, str]:
    # Debian's DCMTK leaves Nagle on unless TCP_NODELAY is set: ~40 ms per message otherwise.
    return {**os.environ, "TCP_NODELAY": "1"}


def _py_env() -> dict[str, str]:
    env = dict(os.environ)
    # PYTHONDONTWRITEBYTECODE would make every run compile the package from source (an
    # installed package has its .pyc files): the warm-up writes them, the runs use them.
    for var in (
        "PYTHONDEVMODE",
        "PYTHONASYNCIODEBUG",
        "PYTHONTRACEMALLOC",
        "PYTHONPROFILEIMPORTTIME",
        "PYTHONDONTWRITEBYTECODE",
    ):
        env.pop(var, None)
    return env


@dataclass
class Receiver:
    key: str
    label: str
    build: Callable[[int, Path, Path | None], list[str]]  # (port, out dir, profile file) -> argv
    env: Callable[[], dict[str, str]]


@dataclass
class Sender:
    key: str
    label: str
    build: Callable[[int, Path, Path, Path | None], list[str]]  # (port, input dir, work dir, profile) -> argv
    env: Callable[[], dict[str, str]]
    reported: Callable[[Path], float | None]  # work dir -> the sender's own time for the transfer
    reported_what: str


# cProfile with a CPU clock (process_time: all threads of the process), so that time
# spent waiting for the network or for other processes on a busy machine is not counted.
_PROFILE_MAIN = """\
import cProfile, sys, time
from dimse_async.cli import main
out = sys.argv.pop(1)
prof = cProfile.Profile(time.process_time)
prof.enable()
try:
    code = main(sys.argv[1:])
finally:
    prof.disable()
    prof.dump_stats(out)
sys.exit(code)
"""


def _profiled(module_argv: list[str], prof: Path | None) -> list[str]:
    if prof is None:
        return _dimse_async_cmd() + module_argv
    return [sys.executable, "-c", _PROFILE_MAIN, str(prof), *module_argv]


def _ours_scp(port: int, out: Path, prof: Path | None) -> list[str]:
    return _profiled(
        [
            "store-scp",
            "--host",
            HOST,
            "--port",
            str(port),
            "--out",
            str(out),
            "--aet",
            SCP_AET,
            "--log-level",
            "WARNING",
        ],
        prof,
    )


def _ours_durable_scp(port: int, out: Path, prof: Path | None) -> list[str]:
    # Each file and its directory entry fsynced before the success status (group commit).
    return [*_ours_scp(port, out, prof), "--durable"]


def _storescp(port: int, out: Path, prof: Path | None) -> list[str]:
    # Single process (the default). +B: bit-preserving, the data set is written to the
    # file as it arrives, nothing parsed or re-encoded (its fastest mode); -dhl: no
    # reverse DNS lookup of the peer; -pdu: the largest max receive PDU it allows.
    return [STORESCP, "-aet", SCP_AET, "-od", str(out), "-pdu", DCMTK_MAX_PDU, "+B", "-dhl", str(port)]


def _pynetdicom_scp(port: int, out: Path, prof: Path | None) -> list[str]:
    return [
        sys.executable,
        str(HERE / "pynetdicom_scp.py"),
        "--host",
        HOST,
        "--port",
        str(port),
        "--out",
        str(out),
        "--aet",
        SCP_AET,
        "--max-pdu",
        str(OUR_AE_PDU),
    ]


def _storescu(port: int, src: Path, work: Path, prof: Path | None) -> list[str]:
    cfg = work / "storescu-log.cfg"
    cfg.write_text(DCMTK_LOG_CFG.format(path=work / "storescu.log"))
    # -R: propose only the contexts the files need (one per SOP class/transfer syntax);
    # +sd +r: scan the directory recursively; -pdu: its largest max receive PDU.
    return [
        STORESCU,
        "-lc",
        str(cfg),
        "-aet",
        SCU_AET,
        "-aec",
        SCP_AET,
        "-pdu",
        DCMTK_MAX_PDU,
        "-R",
        "+sd",
        "+r",
        HOST,
        str(port),
        str(src),
    ]


def _storescu_reported(work: Path) -> float | None:
    """Seconds from "Requesting Association" to "Releasing Association" in storescu's log."""
    try:
        text = (work / "storescu.log").read_text(errors="replace")
    except OSError:
        return None
    start = end = None
    for line in text.splitlines():
        stamp, _, msg = line.partition(" ")
        if msg.startswith("Requesting Association") and start is None:
            start = float(stamp)
        elif msg.startswith("Releasing Association"):
            end = float(stamp)
    return end - start if start is not None and end is not None else None


def _send(window: int) -> Callable[[int, Path, Path, Path | None], list[str]]:
    def build(port: int, src: Path, work: Path, prof: Path | None) -> list[str]:
        return _profiled(
            [
                "send",
                HOST,
                str(port),
                str(src),
                "-r",
                "--aet",
                SCU_AET,
                "--aec",
                SCP_AET,
                "--window",
                str(window),
                "--log-level",
                "WARNING",
            ],
            prof,
        )

    return build


_SENT_RE = re.compile(r"sent (\d+)/(\d+) instances, [0-9.]+ MB in ([0-9.]+) s")


def _send_reported(work: Path) -> float | None:
    m = _SENT_RE.search((work / "sender.out").read_text(errors="replace"))
    return float(m.group(3)) if m else None


RECEIVERS = {
    "ours": Receiver("ours", "dimse-async store-scp", _ours_scp, _py_env),
    "ours-durable": Receiver("ours-durable", "store-scp --durable", _ours_durable_scp, _py_env),
    "storescp": Receiver("storescp", "DCMTK storescp", _storescp, _dcmtk_env),
    "pynetdicom": Receiver("pynetdicom", "pynetdicom SCP", _pynetdicom_scp, _py_env),
}
SENDERS = {
    "storescu": Sender(
        "storescu", "DCMTK storescu", _storescu, _dcmtk_env, _storescu_reported, "log: request..release"
    ),
    "send-w1": Sender("send-w1", "dimse-async send -w1", _send(1), _py_env, _send_reported, "its own report"),
    "send-w16": Sender("send-w16", "dimse-async send -w16", _send(16), _py_env, _send_reported, "its own report"),
}
#: (sender, receiver), in the order they run and are printed.
COMBOS: list[tuple[str, str]] = [
    ("storescu", "ours"),
    ("storescu", "ours-durable"),
    ("storescu", "storescp"),
    ("storescu", "pynetdicom"),
    ("send-w1", "ours"),
    ("send-w16", "ours"),
    ("send-w1", "storescp"),
    ("send-w16", "storescp"),
]


# ---------------------------------------------------------------------------
# processes
# ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    """True if some socket is in LISTEN on ``port`` (from /proc/net/tcp*, no connection made)."""
    found_table = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                found_table = True
                for line in f:
                    parts = line.split()
                    if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                        return True
        except OSError:
            continue
    if found_table:
        return False
    with socket.socket() as s:  # no /proc: fall back to connecting
        s.settimeout(0.2)
        return s.connect_ex((HOST, port)) == 0


def wait_listening(proc: subprocess.Popen[bytes], port: int, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchFailure(f"{what} exited with {proc.returncode} before listening on port {port}")
        if _listening(port):
            return
        time.sleep(0.01)
    raise BenchFailure(f"{what} not listening on port {port} after {timeout:.0f} s")


def proc_status(pid: int) -> dict[str, float]:
    """Peak and current RSS (VmHWM, VmRSS; MB) and CPU seconds (user + system) of a live process."""
    out: dict[str, float] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                out["peak_rss_mb"] = int(line.split()[1]) / 1024
            elif line.startswith("VmRSS:"):
                out["rss_mb"] = int(line.split()[1]) / 1024
    with contextlib.suppress(OSError, IndexError, ValueError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        ticks = os.sysconf("SC_CLK_TCK")
        out["user_s"], out["sys_s"] = int(fields[11]) / ticks, int(fields[12]) / ticks
        out["cpu_s"] = out["user_s"] + out["sys_s"]
    return out


def machine_busy_s() -> float | None:
    """CPU seconds all processes on the machine have used since boot (/proc/stat, idle excluded)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal [guest guest_nice: already in user]
    busy = sum(fields[:8]) - fields[3] - fields[4]
    return busy / os.sysconf("SC_CLK_TCK")


def wait_idle(max_wait: float, max_busy_cores: float, window: float = 0.5) -> tuple[float, float | None]:
    """Wait (at most ``max_wait`` s) until the machine used under ``max_busy_cores`` CPUs
    over the last ``window`` s. Returns (seconds waited, busy cores in the last window)."""
    start = time.monotonic()
    busy: float | None = None
    while True:
        a = machine_busy_s()
        time.sleep(window)
        b = machine_busy_s()
        if a is None or b is None:
            return time.monotonic() - start, None
        busy = (b - a) / window
        if busy < max_busy_cores or time.monotonic() - start >= max_wait:
            return time.monotonic() - start, busy


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def stop(proc: subprocess.Popen[bytes] | None, timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; always reaps."""
    if proc is None or proc.returncode is not None:
        return
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def run_timed(argv: list[str], env: dict[str, str], cwd: Path, timeout: float) -> tuple[float, int, Any]:
    """Run ``argv`` to completion: (wall seconds start..exit, exit code, rusage of the child)."""
    with open(cwd / "sender.out", "wb") as out, open(cwd / "sender.err", "wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env, cwd=cwd)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
            elapsed = time.perf_counter() - t0
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return elapsed, proc.returncode, usage


def stored_uids(out: Path) -> tuple[dict[str, int], list[str]]:
    """SOP Instance UID -> size of each finished file under ``out``; also unexpected names.

    Skips hidden entries (our spool directory ``.incoming``) and ``*.partial`` files.
    File names: ``<uid>.dcm`` (ours, pynetdicom) or ``XX.<uid>`` (storescp, modality prefix).
    """
    found: dict[str, int] = {}
    odd: list[str] = []
    for root, dirs, files in os.walk(out):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if name.startswith(".") or name.endswith(".partial"):
                continue
            uid = name[:-4] if name.endswith(".dcm") else name
            uid = re.sub(r"^[A-Za-z]{2}\.", "", uid)
            if re.fullmatch(r"[0-9.]+", uid):
                found[uid] = os.path.getsize(os.path.join(root, name))
            else:
                odd.append(name)
    return found, odd


def _tail(path: Path, n: int = 600) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-n:].decode(errors="replace").strip()


# ---------------------------------------------------------------------------
# one measurement
# ---------------------------------------------------------------------------


@dataclass
class Run:
    sender: str
    receiver: str
    workload: str
    count: int
    total_bytes: int
    ok: bool = False
    error: str | None = None
    wall_s: float | None = None
    reported_s: float | None = None
    sender_exit: int | None = None
    sender_cpu_s: float | None = None
    sender_peak_rss_mb: float | None = None
    receiver_peak_rss_mb: float | None = None
    receiver_cpu_s: float | None = None  # CPU used from "listening" to "all files present"
    receiver_user_s: float | None = None  # the same, split into user and system (kernel) time
    receiver_sys_s: float | None = None
    receiver_rss_growth_mb: float | None = None  # peak RSS over the run minus RSS when it listened
    stored: int | None = None
    profiled: bool = False
    load_before: float | None = None  # 1-minute load average when the run started (other work on the machine)
    #: CPU seconds used on the machine during the sender's run by everything except
    #: sender and receiver (other processes, kernel threads, steal): the interference.
    other_cpu_s: float | None = None
    #: Busy CPUs on the machine just before the run, and how long we waited for it to calm down.
    busy_cores_before: float | None = None
    idle_wait_s: float | None = None
    commands: dict[str, str] = field(default_factory=dict)

    @property
    def inst_per_s(self) -> float | None:
        return self.count / self.wall_s if self.ok and self.wall_s else None

    @property
    def mb_per_s(self) -> float | None:
        return self.total_bytes / 1e6 / self.wall_s if self.ok and self.wall_s else None

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["inst_per_s"] = self.inst_per_s
        d["mb_per_s"] = self.mb_per_s
        d["reported_inst_per_s"] = self.count / self.reported_s if self.ok and self.reported_s else None
        d["reported_mb_per_s"] = self.total_bytes / 1e6 / self.reported_s if self.ok and self.reported_s else None
        return d


def measure(
    sender: Sender, receiver: Receiver, wl: Workload, scratch: Path, timeout: float, profile_dir: Path | None
) -> Run:
    run = Run(sender.key, receiver.key, wl.name, wl.count, wl.total_bytes)
    work = Path(tempfile.mkdtemp(prefix=f"{sender.key}-{receiver.key}-{wl.name}-", dir=scratch))
    out = work / "received"
    out.mkdir()
    recv_prof = send_prof = None
    if profile_dir is not None:
        stem = f"{sender.key}_to_{receiver.key}_{wl.name}"
        if receiver.key.startswith("ours"):
            recv_prof = profile_dir / f"{stem}.scp.prof"
        if sender.key.startswith("send"):
            send_prof = profile_dir / f"{stem}.scu.prof"
        run.profiled = recv_prof is not None or send_prof is not None
    run.load_before = load_average()
    port = free_port()
    recv: subprocess.Popen[bytes] | None = None
    try:
        recv_argv = receiver.build(port, out, recv_prof)
        send_argv = sender.build(port, wl.directory, work, send_prof)
        run.commands = {"receiver": " ".join(recv_argv), "sender": " ".join(send_argv)}
        with open(work / "receiver.out", "wb") as rout, open(work / "receiver.err", "wb") as rerr:
            recv = subprocess.Popen(
                recv_argv,
                stdin=subprocess.DEVNULL,
                stdout=rout,
                stderr=rerr,
                env=receiver.env(),
                cwd=work,
                start_new_session=True,  # a Ctrl-C in the terminal reaches us, not it: we stop it
            )
        wait_listening(recv, port, READY_TIMEOUT, receiver.label)
        ready = proc_status(recv.pid)
        cpu_ready = ready.get("cpu_s", 0.0)

        busy_before = machine_busy_s()
        wall, code, usage = run_timed(send_argv, sender.env(), work, timeout)
        busy_after = machine_busy_s()
        run.wall_s = wall
        run.sender_exit = code
        run.sender_cpu_s = usage.ru_utime + usage.ru_stime
        run.sender_peak_rss_mb = usage.ru_maxrss / 1024
        run.reported_s = sender.reported(work)

        # The receivers answer each C-STORE after writing the file, so everything should
        # be there; allow a moment for slow file systems anyway (bounded).
        deadline = time.monotonic() + FILES_TIMEOUT
        while True:
            found, odd = stored_uids(out)
            if len(found) >= wl.count or time.monotonic() > deadline or recv.poll() is not None:
                break
            time.sleep(0.02)
        status = proc_status(recv.pid)
        run.receiver_peak_rss_mb = status.get("peak_rss_mb")
        if run.receiver_peak_rss_mb is not None and "rss_mb" in ready:
            run.receiver_rss_growth_mb = run.receiver_peak_rss_mb - ready["rss_mb"]
        if "cpu_s" in status:
            run.receiver_cpu_s = status["cpu_s"] - cpu_ready
            run.receiver_user_s = status["user_s"] - ready.get("user_s", 0.0)
            run.receiver_sys_s = status["sys_s"] - ready.get("sys_s", 0.0)
        if busy_before is not None and busy_after is not None:
            run.other_cpu_s = max(0.0, busy_after - busy_before - run.sender_cpu_s - (run.receiver_cpu_s or 0.0))
        run.stored = len(found)

        problems = []
        if code != 0:
            problems.append(f"sender exited with {code}: {_tail(work / 'sender.err') or _tail(work / 'sender.out')}")
        missing = wl.uids - found.keys()
        extra = found.keys() - wl.uids
        if missing:
            problems.append(f"receiver stored {len(found)} of {wl.count} instances ({len(missing)} missing)")
        if extra or odd:
            problems.append(f"unexpected files in the output: {sorted(extra)[:3] + odd[:3]}")
        stored_bytes = sum(found.values())
        # Each file holds at least the data set (only the file meta may differ in size).
        if not missing and stored_bytes < 0.95 * wl.total_bytes:
            problems.append(f"receiver wrote only {stored_bytes} bytes for {wl.total_bytes} sent")
        if recv.poll() is not None:
            problems.append(f"receiver exited with {recv.returncode}: {_tail(work / 'receiver.err')}")
        if problems:
            raise BenchFailure("; ".join(problems))
        run.ok = True
    except BenchFailure as exc:
        run.error = str(exc)
    finally:
        stop(recv)
        shutil.rmtree(work, ignore_errors=True)
    return run


# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def best_runs(runs: list[Run]) -> dict[tuple[str, str, str], Run]:
    """Per (workload, sender, receiver): the successful run with the lowest wall time."""
    best: dict[tuple[str, str, str], Run] = {}
    for r in runs:
        k = (r.workload, r.sender, r.receiver)
        cur = best.get(k)
        if cur is None or (r.ok and (not cur.ok or (r.wall_s or 1e99) < (cur.wall_s or 1e99))):
            best[k] = r
    return best


def compute_ratios(
    best: dict[tuple[str, str, str], Run], runs: list[Run], workloads: list[str]
) -> list[dict[str, Any]]:
    """Instances/s of A over B (same N, so the inverse ratio of wall times).

    Also, less sensitive to other load on the machine: the same ratio on the senders'
    own times, and the CPU-time ratio of the side being compared (receiver CPU for
    SCP comparisons, sender CPU for SCU ones; lowest over the repeats).
    """
    specs = [
        ("our SCP vs DCMTK storescp (sender storescu)", ("storescu", "ours"), ("storescu", "storescp"),
         "receiver", {"small": 1.0, "large": 1.0}),
        ("our SCP --durable vs our SCP (sender storescu)", ("storescu", "ours-durable"), ("storescu", "ours"),
         "receiver", {}),
        ("our SCP --durable vs DCMTK storescp (sender storescu)", ("storescu", "ours-durable"),
         ("storescu", "storescp"), "receiver", {}),
        ("our SCP vs pynetdicom SCP (sender storescu)", ("storescu", "ours"), ("storescu", "pynetdicom"),
         "receiver", {"small": 4.0, "large": 4.0}),
        ("our SCU window 16 vs window 1 (-> our SCP)", ("send-w16", "ours"), ("send-w1", "ours"), None, {}),
        ("our SCU window 16 vs window 1 (-> storescp)", ("send-w16", "storescp"), ("send-w1", "storescp"), None, {}),
        ("our SCU w16 vs DCMTK storescu (-> our SCP)", ("send-w16", "ours"), ("storescu", "ours"), "sender", {}),
        ("our SCU w1 vs DCMTK storescu (-> storescp)", ("send-w1", "storescp"), ("storescu", "storescp"),
         "sender", {"small": 1.0, "large": 1.0}),
        ("our SCU + SCP (w16) vs DCMTK storescu + storescp", ("send-w16", "ours"), ("storescu", "storescp"),
         "both", {"small": 2.5, "large": 2.5}),
    ]  # fmt: skip

    def min_cpu(wl: str, key: tuple[str, str], side: str) -> float | None:
        vals = []
        for r in runs:
            if r.ok and r.workload == wl and (r.sender, r.receiver) == key:
                parts = {"receiver": [r.receiver_cpu_s], "sender": [r.sender_cpu_s]}.get(
                    side, [r.receiver_cpu_s, r.sender_cpu_s]
                )
                if all(p is not None for p in parts):
                    vals.append(sum(p for p in parts if p is not None))
        return min(vals) if vals else None

    out = []
    for wl in workloads:
        for label, a_key, b_key, cpu_side, targets in specs:
            a, b = best.get((wl, *a_key)), best.get((wl, *b_key))
            if a is None or b is None:
                continue
            ratio = b.wall_s / a.wall_s if a.ok and b.ok and a.wall_s and b.wall_s else None
            rep = None
            if a.ok and b.ok and a.reported_s and b.reported_s:
                rep = b.reported_s / a.reported_s
            cpu = None
            if cpu_side is not None:
                ca, cb = min_cpu(wl, a_key, cpu_side), min_cpu(wl, b_key, cpu_side)
                cpu = cb / ca if ca and cb else None
            target = targets.get(wl)
            out.append(
                {
                    "workload": wl,
                    "comparison": label,
                    "a": ">".join(a_key),
                    "b": ">".join(b_key),
                    "ratio": ratio,
                    "ratio_reported_time": rep,
                    "cpu_side": cpu_side,
                    "cpu_ratio": cpu,
                    "target": target,
                    "meets_target": None if target is None or ratio is None else ratio >= target,
                }
            )
    return out


def format_table(best: dict[tuple[str, str, str], Run], wls: dict[str, Workload], repeat: int) -> str:
    lines = []
    head = (
        f"{'sender':<22} {'receiver':<22} {'wall s':>7} {'inst/s':>8} {'MB/s':>7} | "
        f"{'own s':>6} {'inst/s':>8} {'MB/s':>7} | {'recv RSS':>8} {'+RSS':>7} {'recv CPU':>8} {'user/sys':>9} "
        f"{'send CPU':>8} {'send RSS':>8} {'other':>6}"
    )
    for wl in wls.values():
        lines.append("")
        lines.append(
            f"== {wl.name}: {wl.count} instances x {wl.mean_kb:,.1f} KB = {wl.total_bytes / 1e6:,.1f} MB, "
            f"one association, best of {repeat} =="
        )
        lines.append(head)
        lines.append("-" * len(head))
        for s_key, r_key in COMBOS:
            r = best.get((wl.name, s_key, r_key))
            if r is None:
                continue
            name = f"{SENDERS[s_key].label:<22} {RECEIVERS[r_key].label:<22}"
            if not r.ok:
                lines.append(f"{name} FAILED: {r.error}")
                continue
            rep_inst = r.count / r.reported_s if r.reported_s else None
            rep_mb = r.total_bytes / 1e6 / r.reported_s if r.reported_s else None
            lines.append(
                f"{name} {r.wall_s:7.3f} {r.inst_per_s:8.1f} {r.mb_per_s:7.1f} | "
                f"{_fmt(r.reported_s, '6.3f')} {_fmt(rep_inst, '8.1f')} {_fmt(rep_mb, '7.1f')} | "
                f"{_fmt(r.receiver_peak_rss_mb, '6.1f')}MB {_fmt(r.receiver_rss_growth_mb, '5.1f')}MB "
                f"{_fmt(r.receiver_cpu_s, '7.2f')}s "
                f"{_fmt(r.receiver_user_s, '4.2f')}/{_fmt(r.receiver_sys_s, '4.2f')} "
                f"{_fmt(r.sender_cpu_s, '7.2f')}s {_fmt(r.sender_peak_rss_mb, '6.1f')}MB {_fmt(r.other_cpu_s, '5.2f')}s"
                + ("  (profiled)" if r.profiled else "")
            )
    lines.append("")
    lines.append(
        "wall s: sender process start to exit, nothing subtracted; own s: the sender's own time for the transfer "
        "(dimse-async send: its report; storescu: 'Requesting Association'..'Releasing Association' in its log). "
        "recv RSS: receiver peak RSS; +RSS: its growth over the run (peak minus RSS when it listened). "
        "recv CPU: receiver user+sys CPU from listening to done (user/sys: the split). other: CPU used meanwhile by every other "
        "process on the machine (interference; best of N picks the lowest wall time). "
        "MB = 10^6 bytes of Part 10 files."
    )
    return "\n".join(lines)


def format_ratios(ratios: list[dict[str, Any]]) -> str:
    lines = [
        "",
        "== ratios: instances/s of A over B on wall time; [own]: on the senders' own times; "
        "cpu: B's CPU time over A's for the compared side ==",
    ]
    for r in ratios:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        rep = "" if r["ratio_reported_time"] is None else f"[{r['ratio_reported_time']:.2f}x]"
        cpu = "" if r["cpu_ratio"] is None else f"cpu {r['cpu_ratio']:.2f}x"
        tgt = ""
        if r["target"] is not None:
            verdict = "n/a" if r["meets_target"] is None else ("MET" if r["meets_target"] else "MISSED")
            tgt = f"target >= {r['target']:.1f}x: {verdict}"
        lines.append(f"{r['workload']:<6} {r['comparison']:<50} {ratio:>7} {rep:<9} {cpu:<11} {tgt}".rstrip())
    return "\n".join(lines)


def _version(argv: list[str]) -> str:
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "?"
    text = (res.stdout or res.stderr).strip().splitlines()
    return text[0] if text else "?"


def environment() -> dict[str, Any]:
    import pydicom
    import pynetdicom

    import dimse_async

    try:
        import uvloop

        uv = uvloop.__version__
    except ImportError:
        uv = None
    return {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": platform.node(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "dimse_async": getattr(dimse_async, "__version__", "?"),
        "pydicom": pydicom.__version__,
        "pynetdicom": pynetdicom.__version__,
        "uvloop": uv,
        "dcmtk": _version([STORESCU, "--version"]),
    }


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def scratch_dir(base: str | None, keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="bench_store_", dir=base))
    try:
        yield path
    finally:
        if keep:
            print(f"kept {path}", file=sys.stderr)
        else:
            shutil.rmtree(path, ignore_errors=True)


def _warm_up() -> None:
    """Load the Python programs once (page cache, .pyc) so the first measured run is not penalised."""
    for argv in (
        [*_dimse_async_cmd(), "--help"],
        [sys.executable, "-c", "import dimse_async.cli, dimse_async.ae, dimse_async.services.send"],
        [sys.executable, "-c", "import pynetdicom"],
    ):
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_py_env(), check=False)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="C-STORE ingest benchmark (see benchmarks/README.md)")
    p.add_argument("--quick", action="store_true", help="200 small / 20 large instances (smoke run)")
    p.add_argument("--small", type=int, help="number of ~39 KB instances (default 1000, --quick 200)")
    p.add_argument("--large", type=int, help="number of ~2 MB instances (default 100, --quick 20)")
    p.add_argument("--repeat", type=int, default=1, help="runs per combination; the best (lowest wall time) counts")
    p.add_argument("--workloads", default="small,large", help="comma list of: small, large, huge")
    p.add_argument(
        "--huge",
        action="store_true",
        help="add the 'huge' workload: one instance of --huge-mib MiB (slow: ~2 GiB written per run)",
    )
    p.add_argument("--huge-mib", type=int, default=2048, help="size of the huge instance's pixel data (default 2048)")
    p.add_argument(
        "--only",
        help="comma list of combinations to run, as SENDER>RECEIVER (senders: "
        + ", ".join(SENDERS)
        + "; receivers: "
        + ", ".join(RECEIVERS)
        + ")",
    )
    p.add_argument("--no-warmup", action="store_true", help="skip the unmeasured warm-up transfer per workload")
    p.add_argument(
        "--wait-idle",
        type=float,
        default=30.0,
        metavar="S",
        help="before each run wait up to S seconds for the machine to be idle (see --idle-cores); 0: don't",
    )
    p.add_argument(
        "--idle-cores",
        type=float,
        default=0.3,
        help="'idle' means fewer than this many CPUs busy over half a second (default 0.3)",
    )
    p.add_argument("--timeout", type=float, default=300.0, help="seconds one sender may take before it is killed")
    p.add_argument("--json", default=str(RESULTS_DIR / "latest.json"), help="where to write the results")
    p.add_argument("--tmpdir", help="where to put the generated files and received files (default: system temp)")
    p.add_argument("--keep", action="store_true", help="keep the generated input files")
    p.add_argument(
        "--profile",
        action="store_true",
        help="run our SCP and SCU under cProfile; .prof files go next to --json (timings are then not comparable)",
    )
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    args.small = args.small if args.small is not None else (200 if args.quick else 1000)
    args.large = args.large if args.large is not None else (20 if args.quick else 100)
    args.workload_names = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if args.huge and "huge" not in args.workload_names:
        args.workload_names.append("huge")
    for w in args.workload_names:
        if w not in ("small", "large", "huge"):
            p.error(f"unknown workload {w!r}")
    combos = COMBOS
    if args.only:
        wanted = [tuple(c.strip().split(">", 1)) for c in args.only.split(",") if c.strip()]
        for c in wanted:
            if len(c) != 2 or c[0] not in SENDERS or c[1] not in RECEIVERS:
                p.error(f"bad combination {'>'.join(c)!r}: use SENDER>RECEIVER")
        combos = [c for c in COMBOS if c in wanted] + [c for c in wanted if c not in COMBOS]  # type: ignore[misc]
    args.combos = combos
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for tool in (STORESCU, STORESCP):
        if not os.access(tool, os.X_OK):
            print(f"{tool} not found: apt-get install dcmtk", file=sys.stderr)
            return 2
    json_path = Path(args.json)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    profile_dir = json_path.parent / "profiles" if args.profile else None
    if profile_dir is not None:
        profile_dir.mkdir(parents=True, exist_ok=True)

    runs: list[Run] = []
    started = time.monotonic()
    with scratch_dir(args.tmpdir, args.keep) as scratch:
        print(f"generating workloads in {scratch} ...", file=sys.stderr, flush=True)
        wls: dict[str, Workload] = {}
        t0 = time.monotonic()
        if "small" in args.workload_names:
            wls["small"] = make_small(scratch / "input-small", args.small)
        if "large" in args.workload_names:
            wls["large"] = make_large(scratch / "input-large", args.large)
        if "huge" in args.workload_names:
            wls["huge"] = make_huge(scratch / "input-huge", args.huge_mib)
        for wl in wls.values():
            print(
                f"  {wl.name}: {wl.count} files, {wl.total_bytes / 1e6:.1f} MB ({wl.mean_kb:.1f} KB each)",
                file=sys.stderr,
            )
        print(f"  done in {time.monotonic() - t0:.1f} s", file=sys.stderr, flush=True)
        _warm_up()
        if not args.no_warmup:
            # One unmeasured transfer per workload (DCMTK to DCMTK, the quickest): the
            # first files written on a freshly booted VM cost several times more (the
            # kernel touches new memory for page cache and inodes); later runs reuse it.
            for wl in wls.values():
                w = measure(SENDERS["storescu"], RECEIVERS["storescp"], wl, scratch, args.timeout, None)
                outcome = f"{w.wall_s:.3f} s" if w.ok else f"FAILED: {w.error}"
                print(
                    f"warm-up {wl.name}: {outcome}",
                    file=sys.stderr,
                    flush=True,
                )
        total = args.repeat * len(wls) * len(args.combos)
        i = 0
        # Interleaved: every combination once per round, so drift hits all of them alike.
        for rnd in range(args.repeat):
            for wl in wls.values():
                for s_key, r_key in args.combos:
                    i += 1
                    sender, receiver = SENDERS[s_key], RECEIVERS[r_key]
                    waited, busy = (0.0, None)
                    if args.wait_idle > 0:
                        waited, busy = wait_idle(args.wait_idle, args.idle_cores)
                    run = measure(sender, receiver, wl, scratch, args.timeout, profile_dir)
                    run.idle_wait_s, run.busy_cores_before = round(waited, 2), busy
                    runs.append(run)
                    what = f"[{i}/{total}] round {rnd + 1} {wl.name:<5} {sender.label:<22} -> {receiver.label:<22}"
                    calm = "" if busy is None else f"  [busy before: {busy:.2f} CPUs, waited {waited:.1f} s]"
                    if run.ok:
                        print(
                            f"{what} {run.wall_s:7.3f} s {run.inst_per_s:8.1f} inst/s {run.mb_per_s:7.1f} MB/s"
                            f"  other CPU {_fmt(run.other_cpu_s, '.2f')} s{calm}",
                            file=sys.stderr,
                            flush=True,
                        )
                    else:
                        print(f"{what} FAILED: {run.error}{calm}", file=sys.stderr, flush=True)

    best = best_runs(runs)
    ratios = compute_ratios(best, runs, list(wls))
    report = format_table(best, wls, args.repeat) + "\n" + format_ratios(ratios)
    print(report)
    result = {
        "environment": environment(),
        "settings": {
            "repeat": args.repeat,
            "quick": args.quick,
            "small": args.small,
            "large": args.large,
            "combinations": [">".join(c) for c in args.combos],
            "profiled": args.profile,
            "elapsed_s": round(time.monotonic() - started, 1),
        },
        "workloads": {
            w.name: {"count": w.count, "total_bytes": w.total_bytes, "mean_bytes": w.total_bytes / w.count}
            for w in wls.values()
        },
        "best": [best[k].as_dict() for k in best],
        "ratios": ratios,
        "runs": [r.as_dict() for r in runs],
    }
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nresults written to {json_path}")
    if profile_dir is not None:
        print(f"profiles in {profile_dir} (python -m pstats FILE)")
    return 0 if all(r.ok for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
