#!/usr/bin/env python3
"""pynetdicom's own benchmark scenarios, run side by side with pynetdicom and DCMTK.

pynetdicom's benchmark script times C-STORE of its 39 KB CT instance in these cases,
which this script reproduces with the same kind of instance (pydicom's CT_small.dcm,
a fresh SOP Instance UID per file, explicit VR little endian, read from disk):

* ``one``: 1000 instances over 1 association;
* ``each``: 1 instance over each of 1000 sequential associations;
* ``ten``: 10 simultaneous associations x 1000 instances each.

Receivers (fed by DCMTK ``storescu``): ``dimse-async store-scp`` (ours), DCMTK
``storescp`` (``--fork`` for ``ten``) and the pynetdicom SCP of ``pynetdicom_scp.py``.
Senders (into DCMTK ``storescp``): our SCU (the library, one process for the whole
scenario), pynetdicom's SCU (likewise) and ``storescu`` (one process per association:
DCMTK has no other way to open one association per file). Our SCU is also run
against our SCP. Every process is fresh per run; the receiver must end up with every
instance. ``--quick`` scales the counts down (200; 100; 10 x 100).

    python benchmarks/bench_scenarios.py            # full (~10 min on 2 CPUs)
    python benchmarks/bench_scenarios.py --quick    # ~2 min

Prints a markdown table (wall s, instances/s, receiver CPU, sender CPU) and the ratios
of ours against pynetdicom and DCMTK; writes benchmarks/results/scenarios.json.
Not a test: it asserts nothing about speed; exit 1 if a run failed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_store as bs  # noqa: E402  (receivers, process helpers, workload generator)

SCU_DRIVER = """
import asyncio, os, sys, time, json, resource
scenario, host, port, directory, associations = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
files = sorted(os.path.join(directory, f) for f in os.listdir(directory))
t0 = time.perf_counter()
{body}
elapsed = time.perf_counter() - t0
print(json.dumps({{"elapsed": elapsed, "ok": ok, "total": len(files)}}))
"""

#: Our SCU: the library as an application would use it (one process per scenario).
OURS_BODY = """
import dimse_async as da
from dimse_async.services.send import send_files
from dimse_async.uids import ExplicitVRLittleEndian

CT = "1.2.840.10008.5.1.4.1.1.2"

async def each():
    ae = da.AE("BENCH_SCU")
    ae.add_requested_context(CT, [ExplicitVRLittleEndian])
    ok = 0
    for path in files:
        async with ae.associate(host, port, "BENCH_SCP") as assoc:
            ok += (await assoc.c_store(path)).is_success
    return ok

async def batches():
    parts = [files[i::associations] for i in range(associations)]
    reports = await asyncio.gather(*(send_files(da.AE("BENCH_SCU"), host, port, "BENCH_SCP", p) for p in parts))
    return sum(len(r.results) - len(r.failed) for r in reports)

ok = da.run(each() if scenario == "each" else batches())
"""

#: pynetdicom's SCU: what its benchmark does, sending the files by path.
PYNETDICOM_BODY = """
import logging, threading
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage
logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
ExplicitVRLittleEndian = "1.2.840.10008.1.2.1"

def new_ae():
    ae = AE(ae_title="BENCH_SCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.maximum_pdu_size = 262144
    return ae

def batch(part, counts):
    assoc = new_ae().associate(host, port, ae_title="BENCH_SCP")
    n = 0
    if assoc.is_established:
        for path in part:
            status = assoc.send_c_store(path)
            n += bool(status) and status.Status == 0
        assoc.release()
    counts.append(n)

ok = 0
if scenario == "each":
    ae = new_ae()
    for path in files:
        assoc = ae.associate(host, port, ae_title="BENCH_SCP")
        if assoc.is_established:
            status = assoc.send_c_store(path)
            ok += bool(status) and status.Status == 0
            assoc.release()
else:
    counts = []
    threads = [threading.Thread(target=batch, args=(files[i::associations], counts)) for i in range(associations)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ok = sum(counts)
"""

SCENARIOS = {
    # name: (description, instances per association, associations, simultaneous)
    "one": "N instances over 1 association",
    "each": "1 instance over each of N sequential associations",
    "ten": "10 simultaneous associations x N instances",
}


@dataclass
class Result:
    scenario: str
    sender: str
    receiver: str
    instances: int
    ok: bool = False
    error: str | None = None
    wall_s: float | None = None
    sender_cpu_s: float | None = None
    receiver_cpu_s: float | None = None
    receiver_peak_rss_mb: float | None = None

    @property
    def rate(self) -> float | None:
        return self.instances / self.wall_s if self.ok and self.wall_s else None


def _storescp(port: int, out: Path, fork: bool) -> list[str]:
    argv = bs._storescp(port, out, None)
    return [argv[0], "--fork", *argv[1:]] if fork else argv


def _receiver_argv(key: str, port: int, out: Path, scenario: str) -> tuple[list[str], dict[str, str]]:
    if key == "storescp":
        return _storescp(port, out, scenario == "ten"), bs._dcmtk_env()
    rc = bs.RECEIVERS[key]
    return rc.build(port, out, None), rc.env()


def _children_cpu() -> float:
    u = resource.getrusage(resource.RUSAGE_CHILDREN)
    return u.ru_utime + u.ru_stime


def _tree_cpu(pid: int) -> float:
    """CPU of a process, its reaped children (storescp --fork) and its live ones, from /proc."""
    total = 0.0
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        total = sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return total
    try:
        import psutil

        for child in psutil.Process(pid).children(recursive=True):
            t = child.cpu_times()
            total += t.user + t.system
    except Exception:
        pass
    return total


def _storescu(port: int, files: list[str]) -> list[str]:
    return [bs.STORESCU, "-aet", bs.SCU_AET, "-aec", bs.SCP_AET, "-pdu", bs.DCMTK_MAX_PDU, bs.HOST, str(port), *files]


def _send(sender: str, scenario: str, port: int, src: Path, n_assoc: int, timeout: float) -> tuple[int, float]:
    """Run the sender to completion: (instances acknowledged, its CPU seconds)."""
    files = sorted(str(p) for p in src.iterdir())
    before = _children_cpu()
    if sender == "storescu":
        if scenario == "each":
            ok = 0
            for f in files:
                res = subprocess.run(_storescu(port, [f]), env=bs._dcmtk_env(), capture_output=True, timeout=timeout)
                ok += res.returncode == 0
        else:
            parts = [files[i::n_assoc] for i in range(n_assoc)]
            procs = [
                subprocess.Popen(_storescu(port, p), env=bs._dcmtk_env(), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
                for p in parts
            ]  # fmt: skip
            ok = sum(len(p) for p, proc in zip(parts, procs) if proc.wait(timeout) == 0)
        return ok, _children_cpu() - before
    body = OURS_BODY if sender == "ours" else PYNETDICOM_BODY
    res = subprocess.run(
        [sys.executable, "-c", SCU_DRIVER.format(body=body), scenario, bs.HOST, str(port), str(src), str(n_assoc)],
        env=bs._py_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if res.returncode != 0:
        raise bs.BenchFailure(f"{sender} SCU exited {res.returncode}: {res.stderr[-600:]}")
    return int(json.loads(res.stdout.strip().splitlines()[-1])["ok"]), _children_cpu() - before


def measure(scenario: str, sender: str, receiver: str, src: Path, count: int, n_assoc: int, scratch: Path,
            timeout: float) -> Result:  # fmt: skip
    result = Result(scenario, sender, receiver, count)
    work = Path(tempfile.mkdtemp(prefix=f"{scenario}-{sender}-{receiver}-", dir=scratch))
    out = work / "received"
    out.mkdir()
    port = bs.free_port()
    argv, env = _receiver_argv(receiver, port, out, scenario)
    proc = None
    try:
        with open(work / "receiver.log", "wb") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work)
        bs.wait_listening(proc, port, bs.READY_TIMEOUT, receiver)
        cpu0 = _tree_cpu(proc.pid)
        t0 = time.perf_counter()
        acked, send_cpu = _send(sender, scenario, port, src, n_assoc, timeout)
        result.wall_s = time.perf_counter() - t0
        result.sender_cpu_s = send_cpu
        deadline = time.monotonic() + bs.FILES_TIMEOUT
        stored: dict[str, int] = {}
        while time.monotonic() < deadline:
            stored, _ = bs.stored_uids(out)
            if len(stored) >= count:
                break
            time.sleep(0.05)
        result.receiver_cpu_s = _tree_cpu(proc.pid) - cpu0
        result.receiver_peak_rss_mb = bs.proc_status(proc.pid).get("peak_rss_mb")
        if acked != count or len(stored) != count:
            raise bs.BenchFailure(f"{acked} acknowledged, {len(stored)} stored of {count}")
        result.ok = True
    except (bs.BenchFailure, subprocess.SubprocessError, OSError, ValueError) as exc:
        result.error = str(exc)
    finally:
        bs.stop(proc)
        shutil.rmtree(work, ignore_errors=True)
    return result


#: (sender, receiver) in the order they run and print: storescu into the three SCPs,
#: then our SCU and pynetdicom's into storescp (storescu -> storescp is the first
#: part's), then ours into ours.
COMBOS = [
    ("storescu", "ours"),
    ("storescu", "storescp"),
    ("storescu", "pynetdicom"),
    ("ours", "storescp"),
    ("pynetdicom", "storescp"),
    ("ours", "ours"),
]


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(results: list[Result]) -> str:
    lines = [
        "| scenario | sender | receiver | instances | wall s | inst/s | receiver CPU s | sender CPU s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if not r.ok:
            lines.append(f"| {r.scenario} | {r.sender} | {r.receiver} | {r.instances} | FAILED: {r.error} | | | |")
            continue
        lines.append(
            f"| {r.scenario} | {r.sender} | {r.receiver} | {r.instances} | {r.wall_s:.2f} | {_fmt(r.rate, '.0f')} "
            f"| {_fmt(r.receiver_cpu_s, '.2f')} | {_fmt(r.sender_cpu_s, '.2f')} |"
        )
    return "\n".join(lines)


def ratios(results: list[Result]) -> list[dict[str, Any]]:
    best: dict[tuple[str, str, str], Result] = {}
    for r in results:
        k = (r.scenario, r.sender, r.receiver)
        if r.ok and (k not in best or (r.wall_s or 0) < (best[k].wall_s or 0)):
            best[k] = r
    out = []
    for scenario in SCENARIOS:
        for label, a, b in (
            ("our SCP vs storescp (storescu sends)", ("storescu", "ours"), ("storescu", "storescp")),
            ("our SCP vs pynetdicom SCP (storescu sends)", ("storescu", "ours"), ("storescu", "pynetdicom")),
            ("our SCU vs pynetdicom SCU (into storescp)", ("ours", "storescp"), ("pynetdicom", "storescp")),
            ("our SCU vs storescu (into storescp)", ("ours", "storescp"), ("storescu", "storescp")),
            ("ours -> ours vs storescu -> storescp", ("ours", "ours"), ("storescu", "storescp")),
        ):
            ra, rb = best.get((scenario, *a)), best.get((scenario, *b))
            if ra and rb and ra.wall_s and rb.wall_s:
                out.append({"scenario": scenario, "comparison": label, "ratio": rb.wall_s / ra.wall_s,
                            "cpu_ratio_receiver": (rb.receiver_cpu_s or 0) / ra.receiver_cpu_s
                            if ra.receiver_cpu_s else None})  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="pynetdicom's benchmark scenarios (see benchmarks/README.md)")
    p.add_argument("--quick", action="store_true", help="200 / 100 / 10 x 100 instances")
    p.add_argument("--scenarios", default="one,each,ten", help="comma list of: " + ", ".join(SCENARIOS))
    p.add_argument("--repeat", type=int, default=1, help="runs per combination (all are printed; ratios use the best)")
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--json", default=str(bs.RESULTS_DIR / "scenarios.json"))
    p.add_argument("--tmpdir")
    args = p.parse_args(argv)
    for tool in (bs.STORESCU, bs.STORESCP):
        if not os.access(tool, os.X_OK):
            print(f"{tool} not found: apt-get install dcmtk", file=sys.stderr)
            return 2
    sizes = {"one": (200 if args.quick else 1000, 1), "each": (100 if args.quick else 1000, 1),
             "ten": (10 * (100 if args.quick else 1000), 10)}  # fmt: skip
    wanted = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    results: list[Result] = []
    with bs.scratch_dir(args.tmpdir, keep=False) as scratch:
        bs._warm_up()
        inputs: dict[int, Path] = {}
        for scenario in wanted:
            count, n_assoc = sizes[scenario]
            if count not in inputs:
                print(f"generating {count} instances ...", file=sys.stderr, flush=True)
                inputs[count] = bs.make_small(scratch / f"input-{count}", count).directory
            for rnd in range(args.repeat):
                for sender, receiver in COMBOS:
                    r = measure(scenario, sender, receiver, inputs[count], count, n_assoc, scratch, args.timeout)
                    results.append(r)
                    state = f"{r.wall_s:.2f} s, {r.rate:.0f} inst/s" if r.ok and r.rate else f"FAILED: {r.error}"
                    print(f"[{scenario} round {rnd + 1}] {sender} -> {receiver}: {state}", file=sys.stderr, flush=True)
    print(table(results))
    rs = ratios(results)
    print()
    print("| scenario | comparison | ratio (inst/s, ours over theirs) | receiver CPU ratio (theirs / ours) |")
    print("|---|---|---|---|")
    for r in rs:
        cpu = "-" if r["cpu_ratio_receiver"] is None else f"{r['cpu_ratio_receiver']:.2f}x"
        print(f"| {r['scenario']} | {r['comparison']} | {r['ratio']:.2f}x | {cpu} |")
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps({"environment": bs.environment(), "quick": args.quick,
                    "results": [{**asdict(r), "inst_per_s": r.rate} for r in results], "ratios": rs}, indent=2)
        + "\n"
    )  # fmt: skip
    print(f"\nresults written to {path}")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
