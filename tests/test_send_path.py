"""The sender's path: what a ``send`` imports, files read off the event loop and
checked before they are sent, large data sets streamed with bounded memory.

Peers are DCMTK storescp and our own SCP, on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import random
import struct
import subprocess
import sys
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from conftest import communicate, dcmtk, free_port, stop_process, wait_tcp
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

import dimse_async as da
from dimse_async.dataset_check import BudgetExceeded, DataSetError, check_dataset, check_dataset_bytes
from dimse_async.part10 import FileMeta, read_file_meta
from dimse_async.services import store_scu
from dimse_async.services.send import send_files

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
CT = get_testdata_file("CT_small.dcm")

#: Modules a sender does not need: decoding, the archive, the query/retrieve services,
#: structlog and what it loads (rich), compression codecs.
HEAVY = (
    "pydicom",
    "numpy",
    "structlog",
    "rich",
    "sqlite3",
    "dimse_async.archive",
    "dimse_async.services.qr",
    "dimse_async.services.normalized",
    "dimse_async.codec",
    "dimse_async.transcode",
)

_LOADED = """
import json, sys
{body}
heavy = {heavy!r}
print(json.dumps(sorted({{m for m in sys.modules for h in heavy if m == h or m.startswith(h + ".")}})))
"""


#: What an SCU run does not need either: the acceptor side (listening, admission, PROXY
#: protocol), worker processes, the health endpoint and the deployment options.
SERVER_SIDE = (
    "dimse_async.acceptor",
    "dimse_async.server",
    "dimse_async.proxy",
    "dimse_async.workers",
    "dimse_async.deploy",
    "dimse_async.health",
)


def loaded_heavy(body: str, heavy: tuple[str, ...] = HEAVY) -> tuple[list[str], str]:
    """Run ``body`` in a fresh interpreter; the heavy modules loaded afterwards (and stderr)."""
    code = _LOADED.format(body=body, heavy=heavy)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=60)
    assert res.returncode == 0, res.stderr
    last = res.stdout.strip().splitlines()[-1]
    return json.loads(last), res.stdout + res.stderr


def distinct_cts(directory: Path, n: int) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    ds = pydicom.dcmread(CT)
    out = []
    for i in range(n):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = directory / f"ct{i}.dcm"
        ds.save_as(path)
        out.append(path)
    return out


@contextlib.contextmanager
def storescp(out: Path, *options: str) -> Iterator[int]:
    port = free_port()
    out.mkdir(parents=True, exist_ok=True)
    log = out.parent / f"{out.name}-storescp.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [dcmtk("storescp"), *options, "-aet", "STORESCP", "-od", str(out), "-pdu", "131072", "+B", "-dhl",
             str(port)],
            stdout=sink, stderr=subprocess.STDOUT, env=DCMTK_ENV, start_new_session=True,
        )  # fmt: skip
    try:
        wait_tcp(proc, port, log)
        yield port
    finally:
        stop_process(proc)


# --------------------------------------------------------------------------- start-up: lazy imports


def test_importing_the_package_loads_nothing_heavy() -> None:
    got, text = loaded_heavy("import dimse_async")
    assert got == [], text


def test_the_public_names_still_resolve() -> None:
    """Lazily loaded, but every name in __all__ is there (and the heavy ones load on use)."""
    got, text = loaded_heavy(
        "import dimse_async\nnames = [getattr(dimse_async, n) for n in dimse_async.__all__]\n"
        "assert dimse_async.QR_MODEL_NAMES and len(dimse_async.STORAGE_SOP_CLASSES) > 100"
    )
    assert "dimse_async.services.qr" in got, text  # (pydicom: at the first data set)


def test_version_loads_nothing_heavy() -> None:
    got, text = loaded_heavy(
        "from dimse_async.cli import main\ntry:\n    main(['--version'])\nexcept SystemExit as e:\n    assert e.code == 0"
    )
    assert got == [], text


def test_version_loads_neither_asyncio_nor_the_protocol() -> None:
    """``--version`` (alone or after a command) only builds a parser: no event loop, no
    protocol modules, nothing of the package beyond the command line itself."""
    for argv in (["--version"], ["send", "--version"]):
        got, text = loaded_heavy(
            f"from dimse_async.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit as e:\n"
            "    assert e.code == 0",
            ("asyncio", "uvloop", "ssl", "dataclasses", *(f"dimse_async.{m}" for m in ("pdu", "acse", "ae", "log"))),
        )
        assert "dimse-async " in text and got == [], (argv, text)


async def test_send_of_a_file_loads_nothing_heavy(tmp_path: Path) -> None:
    """A whole ``send`` run (one instance, to storescp, INFO logging off as by default)
    needs neither pydicom nor structlog nor the Q/R services."""
    (path,) = distinct_cts(tmp_path / "in", 1)
    with storescp(tmp_path / "out") as port:
        body = (
            "from dimse_async.cli import main\n"
            f"code = main(['send', {HOST!r}, '{port}', {str(path)!r}, '--aec', 'STORESCP'])\n"
            "assert code == 0, code\n"
            "import gc\n"
            "frozen = gc.get_freeze_count()\n"
            "assert frozen > 10_000, frozen  # the imported modules are out of the collector's sight"
        )
        got, text = await asyncio.to_thread(loaded_heavy, body, HEAVY + SERVER_SIDE)
        assert "sent 1/1 instances" in text, text
    assert got == [], text
    assert len(list((tmp_path / "out").iterdir())) == 1


#: Classes a sender loads but never makes, prints or compares (a rejection, an abort,
#: the acceptor's indications, user identity and extended negotiation, an SCP's
#: performing): their generated methods are never compiled (``lazy_dataclass``).
NEVER_MADE_BY_A_SENDER = (
    "pdu.AssociateRJ",
    "pdu.Abort",
    "pdu_items.UserIdentityRQ",
    "pdu_items.UserIdentityAC",
    "pdu_items.RoleSelection",
    "pdu_items.SOPClassExtended",
    "fsm_outputs.PeerAbort",
    "fsm_outputs.ProviderAbort",
    "fsm_outputs.AssociateIndication",
    "fsm_outputs.Refused",
    "session.Perform",
    "session.Respond",
)


async def test_a_send_compiles_no_method_of_the_classes_it_does_not_use(tmp_path: Path) -> None:
    """A one-instance ``send`` (in a fresh interpreter) leaves the ``__init__``,
    ``__repr__`` and ``__eq__`` of :data:`NEVER_MADE_BY_A_SENDER` as the stand-ins
    ``lazy_dataclass`` put there, and made ``__init__`` only for what it used."""
    (path,) = distinct_cts(tmp_path / "in", 1)
    with storescp(tmp_path / "out") as port:
        body = (
            "import importlib, sys\n"
            "from dimse_async.cli import main\n"
            f"code = main(['send', {HOST!r}, '{port}', {str(path)!r}, '--aec', 'STORESCP'])\n"
            "assert code == 0, code\n"
            "def made(name, method):\n"
            "    module, cls = name.split('.')\n"
            "    fn = vars(getattr(importlib.import_module('dimse_async.' + module), cls))[method]\n"
            "    return not getattr(fn, 'stand_in', False)\n"
            f"for name in {NEVER_MADE_BY_A_SENDER!r}:\n"
            "    assert not any(made(name, m) for m in ('__init__', '__repr__', '__eq__')), name\n"
            "assert made('pdu.AssociateRQ', '__init__') and not made('pdu.AssociateRQ', '__eq__')\n"
            "print('checked')"
        )
        got, text = await asyncio.to_thread(loaded_heavy, body, HEAVY + SERVER_SIDE)
    assert "sent 1/1 instances" in text and "checked" in text, text
    assert got == [], text


#: What a plain TCP send does not need either (imported where they are used): TLS, the
#: receiving side's file writer, the SCP services (loaded by the first request received),
#: json (a logged line needing quoting, JSON output), ctypes (the allocator tuning of the
#: receiving commands). ``ssl`` is not among them: asyncio and uvloop import it themselves.
NOT_FOR_A_SENDER = (
    "dimse_async.tls",
    "dimse_async.filewriter",
    "dimse_async.services.storage",
    "dimse_async.services.verification",
    "dimse_async.services.scp",
    "json",
    "ctypes",
)

#: Runs ``python -m dimse_async`` as the process itself; at exit writes the modules
#: loaded to the file named first in argv (an exit handler: they still run at the end).
_AS_PROCESS = """
import atexit, runpy, sys
out, sys.argv = sys.argv[1], ["dimse-async", *sys.argv[2:]]
def written():
    with open(out, "w") as f:
        f.write("\\n".join(sorted(sys.modules)))
atexit.register(written)
runpy.run_module("dimse_async", run_name="__main__", alter_sys=True)
"""


async def test_a_send_process_loads_no_tls_and_ends_cleanly(tmp_path: Path) -> None:
    """``python -m dimse_async send`` of one instance to storescp, as its own process,
    without TLS: none of :data:`NOT_FOR_A_SENDER` (nor the heavy or server-side modules)
    is loaded; the process ends at once (``cli.process.exit_now``) yet its exit handlers
    run and its output is all there."""
    (path,) = distinct_cts(tmp_path / "in", 1)
    modules = tmp_path / "modules.txt"
    with storescp(tmp_path / "out") as port:
        argv = [sys.executable, "-c", _AS_PROCESS, str(modules), "send", HOST, str(port), str(path), "--aec", "STORESCP"]
        res = await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True, env=ENV, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("sent 1/1 instances"), res.stdout
    loaded = set(modules.read_text().split())
    assert "dimse_async.services.send" in loaded and "ssl" in loaded  # (asyncio's own import)
    assert not {m for m in loaded for h in (*NOT_FOR_A_SENDER, *HEAVY, *SERVER_SIDE) if m == h or m.startswith(h + ".")}
    assert len(list((tmp_path / "out").iterdir())) == 1


async def test_send_of_a_file_without_meta_loads_pydicom_when_needed(tmp_path: Path) -> None:
    """The counterpart: a file with no Part 10 header can only be read by pydicom, which is
    then loaded (and the file sent)."""
    (full,) = distinct_cts(tmp_path / "in", 1)
    data = full.read_bytes()
    meta = read_file_meta(io.BytesIO(data))
    assert meta is not None and meta.transfer_syntax == ExplicitVRLittleEndian
    bare = tmp_path / "bare.dcm"
    bare.write_bytes(data[meta.dataset_offset :])  # the data set alone, no preamble or meta
    assert read_file_meta(io.BytesIO(bare.read_bytes())) is None
    with storescp(tmp_path / "out") as port:
        body = (
            "from dimse_async.cli import main\n"
            f"code = main(['send', {HOST!r}, '{port}', {str(bare)!r}, '--aec', 'STORESCP'])\n"
            "assert code == 0, code"
        )
        got, text = await asyncio.to_thread(loaded_heavy, body)
    assert "pydicom" in got, text


# --------------------------------------------------------------------------- the structural check


def _variants(data: bytes, rng: random.Random) -> Iterator[bytes]:
    yield data
    for cut in (len(data) // 2, len(data) - 1, len(data) - 7, 9):
        yield data[:cut]
    for _ in range(8):
        b = bytearray(data)
        if b:
            for _ in range(rng.randrange(1, 4)):
                b[rng.randrange(len(b))] = rng.randrange(256)
        yield bytes(b)


#: Top-level tags whose raw values both walks keep (short and long VRs, a sequence, pixel data).
_KEEP = frozenset({0x00080005, 0x00080016, 0x00080020, 0x00100010, 0x00200013, 0x00082112, 0x7FE00010})


def _corpus_part10() -> Iterator[tuple[str, bytes, FileMeta]]:
    """(name, bytes, file meta) of each of pydicom's test files that has a file meta."""
    for name in get_testdata_files():
        try:
            data = Path(name).read_bytes()
        except OSError:
            continue
        meta = read_file_meta(io.BytesIO(data))
        if meta is not None:
            yield name, data, meta


def test_in_memory_check_agrees_with_the_file_walk() -> None:
    """check_dataset_bytes (the sender's fast walk) accepts and refuses exactly what
    check_dataset does, with the same UIDs, element counts and kept values, over pydicom's corpus in
    every syntax it has, truncated and with random bytes changed."""
    rng = random.Random(20261202)
    compared = refused = 0
    for name, data, meta in _corpus_part10():
        for variant in _variants(data[meta.dataset_offset :], rng):
            outcomes = []
            ts = meta.transfer_syntax
            for walk in (
                lambda v=variant, ts=ts: check_dataset(io.BytesIO(v), ts, keep=_KEEP),
                lambda v=variant, ts=ts: check_dataset_bytes(v, ts, keep=_KEEP),
            ):
                try:
                    s = walk()
                    outcomes.append((s.sop_class_uid, s.sop_instance_uid, s.elements, s.kept))
                except DataSetError:
                    outcomes.append(None)
            assert outcomes[0] == outcomes[1], (name, meta.transfer_syntax)
            compared += 1
            refused += outcomes[0] is None
    assert compared > 1000 and 100 < refused < compared


def _outcome(data: bytes, syntax: str, limits: dict[str, int]) -> object:
    try:
        s = check_dataset_bytes(data, syntax, _KEEP, **limits)  # type: ignore[arg-type]
    except (DataSetError, BudgetExceeded) as exc:
        return type(exc).__name__, str(exc)
    return s.sop_class_uid, s.sop_instance_uid, s.elements, s.kept


def test_runs_of_plain_elements_walk_as_the_general_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """The short loop for runs of plain elements (explicit VR) gives the same result or the
    same error, word for word, as the general step alone: pydicom's corpus, truncated, with
    bytes changed anywhere and among the first headers, and with budgets and element
    limits that the walk reaches."""
    from dimse_async.dataset_check import _BufferWalker

    rng = random.Random(20261203)
    compared = refused = 0
    for name, data, meta in _corpus_part10():
        if meta.transfer_syntax == "1.2.840.10008.1.2":
            continue
        dataset = data[meta.dataset_offset :]
        variants = list(_variants(dataset, rng))
        for _ in range(6):  # changes among the headers at the start (tags, VRs, lengths)
            b = bytearray(dataset)
            if b:
                for _ in range(rng.randrange(1, 3)):
                    b[rng.randrange(min(len(b), 600))] = rng.choice((0, 0xFF, 0xFE, rng.randrange(256)))
            variants.append(bytes(b))
        for variant in variants:
            for limits in ({}, {"budget": 40}, {"max_elements": 30}, {"max_elements": 100_000}):
                got = []
                for runs in (True, False):
                    monkeypatch.setattr(_BufferWalker, "runs", runs)
                    got.append(_outcome(variant, meta.transfer_syntax, limits))
                assert got[0] == got[1], (name, limits)
                compared += 1
                refused += isinstance(got[0], tuple) and len(got[0]) == 2
    assert compared > 1000 and 100 < refused < compared


def test_file_meta_from_bytes_agrees_with_read_file_meta() -> None:
    """A file's meta parsed from its bytes in memory (a small file read whole) is what
    reading it from the file gives: pydicom's corpus, truncated, and a meta longer than
    the first read and than 64 KiB."""
    from dimse_async.part10 import encode_file_meta, file_meta_from_bytes

    samples = []
    for name in get_testdata_files():
        with contextlib.suppress(OSError):
            data = Path(name).read_bytes()
            samples += [data, data[:200], data[:131], data[:4300]]
    base = encode_file_meta("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", "1.2.840.10008.1.2.1")
    for extra in (5000, 70000):  # a private meta element (0002,0100) OB of that many bytes
        long_meta = base + struct.pack("<HH2sHI", 2, 0x0100, b"OB", 0, extra) + bytes(extra)
        samples += [long_meta + b"\x08\x00\x16\x00UI\x02\x0012", long_meta]
    assert len(samples) > 100
    for data in samples:
        assert file_meta_from_bytes(data) == read_file_meta(io.BytesIO(data))


def test_prepare_file_reads_a_small_file_whole_as_it_reads_a_larger_one(tmp_path: Path) -> None:
    """prepare_file of a small file (one read, its meta parsed from memory) gives what the
    path for larger files gives: the same UIDs, offsets and data set, or the same error."""
    rng = random.Random(7)
    names = [n for n in get_testdata_files() if n.endswith(".dcm")][:60]
    for i, name in enumerate(names):
        data = Path(name).read_bytes()
        for j, variant in enumerate([data, data[: len(data) // 2], data[:100], bytes(_changed(data, rng))]):
            path = tmp_path / f"{i}_{j}.dcm"
            path.write_bytes(variant)
            outcomes = []
            for small, read_whole in ((True, 1 << 30), (False, 1 << 30)):
                try:
                    if small:
                        got = store_scu.prepare_file(str(path), check=True, read_whole=read_whole)
                    else:
                        got = store_scu._prepare_open(str(path), True, read_whole)
                    outcomes.append(got)
                except ValueError as exc:
                    outcomes.append(str(exc))
            assert outcomes[0] == outcomes[1], name


def _changed(data: bytes, rng: random.Random) -> bytearray:
    b = bytearray(data)
    for _ in range(3):
        b[rng.randrange(len(b))] = rng.randrange(256)
    return b


# --------------------------------------------------------------------------- reads off the loop


class _Opens:
    """Which threads opened files under a directory (an audit hook: sys.addaudithook)."""

    def __init__(self, directory: Path):
        self.directory = str(directory)
        self.threads: set[int] = set()
        self.active = True
        sys.addaudithook(self._hook)

    def _hook(self, event: str, args: tuple[object, ...]) -> None:
        if self.active and event == "open" and isinstance(args[0], str) and args[0].startswith(self.directory):
            self.threads.add(threading.get_ident())


async def test_send_reads_files_in_worker_threads_only(tmp_path: Path) -> None:
    """No file of the batch is opened on the event loop's thread: small ones, a large
    one (streamed) and one sent through ``Association.c_store(path)``."""
    small = distinct_cts(tmp_path / "in", 3)
    big = big_file(tmp_path / "in" / "big.dcm", 6 << 20)
    opens = _Opens(tmp_path / "in")
    try:
        with storescp(tmp_path / "out") as port:
            report = await send_files(da.AE("SENDER"), HOST, port, "STORESCP", [str(p) for p in [*small, big]])
            assert not report.failed, report.failed
            ae = da.AE("SENDER")
            ae.add_requested_context(pydicom.dcmread(CT).SOPClassUID, [ExplicitVRLittleEndian])
            async with ae.associate(HOST, port, "STORESCP") as assoc:
                assert (await assoc.c_store(small[0])).is_success
    finally:
        opens.active = False
    assert opens.threads and threading.get_ident() not in opens.threads


async def test_a_file_whose_meta_names_another_sop_class_is_reported_not_sent(tmp_path: Path) -> None:
    """The contexts are planned from the file meta: a file whose meta says MR Image
    Storage around a CT data set is reported with both classes named (PS3.10 7.1), not
    as a missing presentation context, and the consistent file beside it is sent."""
    good, odd = distinct_cts(tmp_path / "in", 2)
    ds = pydicom.dcmread(odd)
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"  # MR Image Storage
    ds.save_as(odd)  # (enforce_file_format would set the meta from the data set)
    with storescp(tmp_path / "out") as port:
        report = await send_files(da.AE("SENDER"), HOST, port, "STORESCP", [str(good), str(odd)])
    assert [r.path for r in report.results if r.ok] == [str(good)]
    (failed,) = report.failed
    assert failed.error == "the file meta's SOP class (MR Image Storage) is not the data set's (CT Image Storage)", failed
    assert len(list((tmp_path / "out").iterdir())) == 1


# --------------------------------------------------------------------------- large instances


def big_file(path: Path, pixel_bytes: int) -> Path:
    """A CT instance with ``pixel_bytes`` of random pixel data (explicit VR little endian)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = pydicom.dcmread(CT)
    side = int((pixel_bytes // 2) ** 0.5)
    ds.Rows = ds.Columns = side
    ds.PixelData = random.Random(7).randbytes(side * side * 2)
    ds["PixelData"].VR = "OW"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


async def test_a_large_instance_is_streamed_with_bounded_memory(tmp_path: Path) -> None:
    """A 40 MB instance goes to storescp byte for byte while the sender holds a few MB
    at most (read-ahead, one write batch, the transport's buffer): never the whole file."""
    path = big_file(tmp_path / "in" / "big.dcm", 40 << 20)
    assert path.stat().st_size > 8 * store_scu.READ_WHOLE
    with storescp(tmp_path / "out") as port:
        ae = da.AE("SENDER")
        ae.add_requested_context(pydicom.dcmread(CT).SOPClassUID, [ExplicitVRLittleEndian])
        async with ae.associate(HOST, port, "STORESCP") as assoc:
            tracemalloc.start()
            try:
                status = await assoc.c_store(path)
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
        assert status.is_success
    assert peak < 16 << 20, f"peak {peak / 1e6:.1f} MB while sending {path.stat().st_size / 1e6:.0f} MB"
    (got,) = list((tmp_path / "out").iterdir())
    sent, received = path.read_bytes(), got.read_bytes()
    meta = read_file_meta(io.BytesIO(sent))
    assert meta is not None
    assert received.endswith(sent[meta.dataset_offset :])


async def test_large_data_sets_go_out_unjoined_and_arrive_intact(tmp_path: Path) -> None:
    """``dimse-async send`` (uvloop) hands the PDU headers and the file's bytes to the
    transport as a list (one writev per ~1 MiB, no join) for data sets read whole (3 MB)
    and streamed (9 MB): storescp receives every data set byte for byte."""
    paths = [big_file(tmp_path / "in" / "whole.dcm", 3 << 20), big_file(tmp_path / "in" / "streamed.dcm", 9 << 20)]
    assert paths[0].stat().st_size < store_scu.READ_WHOLE < paths[1].stat().st_size
    with storescp(tmp_path / "out") as port:
        code, text, err = await communicate(
            (sys.executable, "-m", "dimse_async", "send", HOST, str(port), str(tmp_path / "in"), "-r",
             "--aec", "STORESCP"),
            env=ENV,
        )  # fmt: skip
    assert code == 0 and "sent 2/2" in text, text + err
    received = {pydicom.dcmread(f).SOPInstanceUID: f.read_bytes() for f in (tmp_path / "out").iterdir()}
    for path in paths:
        sent = path.read_bytes()
        meta = read_file_meta(io.BytesIO(sent))
        assert meta is not None
        assert received[meta.sop_instance_uid].endswith(sent[meta.dataset_offset :]), path.name


async def test_a_file_truncated_while_it_is_sent_aborts_the_association(tmp_path: Path) -> None:
    """A streamed file that ends early cannot become a whole message: the association is
    aborted (PS3.8 Annex E) instead of sending a short data set, and the call raises."""
    path = big_file(tmp_path / "in" / "big.dcm", 24 << 20)
    prepared = await asyncio.to_thread(store_scu.prepare_file, str(path))
    assert prepared is not None and prepared.dataset is None
    os.truncate(path, path.stat().st_size - (12 << 20))
    with storescp(tmp_path / "out", "-v") as port:
        ae = da.AE("SENDER")
        ae.add_requested_context(prepared.sop_class, [ExplicitVRLittleEndian])
        async with ae.associate(HOST, port, "STORESCP") as assoc:
            with pytest.raises((da.AssociationError, ValueError, OSError)) as raised:
                await assoc.c_store(prepared)
            await asyncio.wait_for(assoc.wait_closed(), 10)
        assert "early" in str(raised.value) or isinstance(raised.value, da.AssociationAborted), raised.value
        log = tmp_path / "out-storescp.log"
        deadline = asyncio.get_running_loop().time() + 10
        while "Abort" not in log.read_text(errors="replace") and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        assert "Abort" in log.read_text(errors="replace")
    # storescp may keep what arrived before the abort, but never a whole instance
    assert all(p.stat().st_size < prepared.length for p in (tmp_path / "out").iterdir())


async def test_send_command_pipelines_to_our_scp(tmp_path: Path) -> None:
    """``dimse-async send --window 4`` to ``dimse-async store-scp``: every file arrives."""
    files = distinct_cts(tmp_path / "in", 12)
    port = free_port()
    out = tmp_path / "out"
    log = tmp_path / "scp.log"
    with log.open("wb") as sink:
        scp = subprocess.Popen(
            [sys.executable, "-m", "dimse_async", "store-scp", "--port", str(port), "--out", str(out),
             "--log-level", "WARNING"],
            stdout=sink, stderr=subprocess.STDOUT, env=ENV, start_new_session=True,
        )  # fmt: skip
    try:
        wait_tcp(scp, port, log)
        code, text, err = await communicate(
            (sys.executable, "-m", "dimse_async", "send", HOST, str(port), str(tmp_path / "in"), "-r", "--window", "4"),
            env=ENV,
        )
        assert code == 0, text + err
        assert "sent 12/12" in text
    finally:
        stop_process(scp)
    assert len(list(out.glob("*.dcm"))) == len(files)


async def test_the_file_stream_gives_back_the_file_however_it_is_read() -> None:
    """The streamed source returns the file's bytes (plus the deflate pad) in order for
    any mix of read sizes, prefetches (reading ahead or not) and read-ahead given back
    (``shed``, as while a peer does not read), comes up short on a truncated file, and
    always closes its file, also with a read still in flight."""
    rng = random.Random(20261202)
    for trial in range(60):
        size = rng.randrange(1, 3 << 20)
        data = rng.randbytes(size)
        pad = size % 2 == 1 and rng.random() < 0.3
        body = data[: rng.randrange(size)] if rng.random() < 0.15 else data
        prepared = store_scu.PreparedFile("f", "1.2", "1.2.3", ExplicitVRLittleEndian, size, 0, size + pad, None, pad)
        stream = store_scu._FileStream(io.BytesIO(body), prepared)
        got, left, short = [], prepared.length, False
        prefetching = rng.random() < 0.7
        while left:
            n = min(left, rng.choice([1, 7, 4096, 130_000, 1 << 20, 3 << 20]))
            if prefetching and rng.random() < 0.5:
                await stream.prefetch(n + rng.randrange(2 << 20), rng.random() < 0.7)
            if rng.random() < 0.2:
                await stream.shed()
                assert stream._buffered == 0 and stream._pending is None
            piece = stream.read(n)
            if len(piece) != n:
                short = True
                break
            got.append(bytes(piece))
            left -= n
            if rng.random() < 0.02:
                break  # abandoned midway
        await stream.close()
        assert stream.fp.closed, trial
        if len(body) < size:
            assert short or left, trial
        elif not left:
            assert b"".join(got) == data + (b"\x00" if pad else b""), trial
