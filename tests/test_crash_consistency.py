"""Crash consistency of ``dimse-async serve``: SIGKILL under concurrent load, restart on
the same storage, and nothing acknowledged is lost, nothing partial is presented.

Three senders at once, each on its own association: two DCMTK storescu (half of the
pydicom corpus each, in every transfer syntax it holds: little and big endian, deflate,
JPEG, JPEG-LS, JPEG 2000, RLE) and pynetdicom (all of it, in reverse order, so most
instances arrive twice and concurrently). ``serve`` is killed with SIGKILL at a random
moment, restarted, and after every restart:

- every instance a sender got Success for (PS3.4 B.2.3) is found by C-FIND;
- the index and the files agree: each indexed file exists at its indexed size and
  parses to its end, each ``.dcm`` file is indexed, no spool (``.partial``) is left.

At the end every instance is retrieved by C-GET (every stored transfer syntax
proposed) and arrives byte for byte as the archive stored it, element for element as
it was sent. CI: 2 kills (a few seconds); ``DIMSE_ASYNC_LONG=1``: 12 kills.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
import sys
import time
from pathlib import Path

import pydicom
import pytest
from conftest import acknowledged, dcmtk, stop_process
from pydicom.dataset import Dataset
from test_integrity import (
    DCMTK_ENV,
    HOST,
    SERVE_AE,
    dataset_bytes,
    pydicom_corpus,
    same_dataset,
    start_serve_process,
)

from dimse_async import AE
from dimse_async.dataset_check import check_part10
from dimse_async.services.qr import MODELS

pytestmark = [pytest.mark.interop, pytest.mark.timeout(300)]

EXPLICIT_LE, IMPLICIT_LE = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"
#: storescu proposes uncompressed syntaxes (its default): it converts what it can and
#: fails the compressed files, which pynetdicom sends as they are.
STORESCU = (dcmtk("storescu"), "-v")
LONG = os.environ.get("DIMSE_ASYNC_LONG") == "1"
KILLS = 12 if LONG else 2

#: pynetdicom as a sender in its own process (killed with the test if it hangs): one
#: association, each file sent as it is on disk; prints "OK <path>" per Success. Its
#: timeouts (argv[2]) are short while serve is killed: it notices the end only by them.
PYNETDICOM_SENDER = """
import sys
import pydicom
from pynetdicom import AE, _config
_config.STORE_SEND_CHUNKED_DATASET = True
port, timeout, paths = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3:]
ae = AE(ae_title="PYNETDICOM")
ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
pairs = sorted({(str(m.SOPClassUID), str(m.file_meta.TransferSyntaxUID))
                for m in (pydicom.dcmread(p, stop_before_pixels=True) for p in paths)})
for sop_class, syntax in pairs[:128]:
    ae.add_requested_context(sop_class, [syntax])
assoc = ae.associate("127.0.0.1", port, ae_title="ARCHIVE")
for path in paths if assoc.is_established else ():
    try:
        status = assoc.send_c_store(path)
    except Exception as exc:
        print("ERROR", path, exc, flush=True)
        break
    if status and status.Status == 0:
        print("OK", path, flush=True)
    if not assoc.is_established:
        break
if assoc.is_established:
    assoc.release()
"""


async def run_sender(argv: tuple[str, ...], out: Path) -> None:
    """One sender to its end (it ends when serve dies); its output appended to ``out``."""
    with out.open("ab") as sink:
        proc = await asyncio.create_subprocess_exec(*argv, stdout=sink, stderr=sink, env=DCMTK_ENV)
        try:
            await asyncio.wait_for(proc.wait(), 60)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


def acknowledged_paths(logs: Path) -> set[str]:
    done: set[str] = set()
    for out in logs.glob("storescu-*.out"):
        done |= acknowledged(out.read_text(errors="replace"))
    for out in logs.glob("pynetdicom-*.out"):
        done |= {line[3:].strip() for line in out.read_text(errors="replace").splitlines() if line.startswith("OK ")}
    return done


def senders(port: int, todo: list[str], logs: Path, round_: int) -> list[asyncio.Future[None]]:
    half = len(todo) // 2
    storescu = (*STORESCU, "-nh", "-to", "5", "-ta", "5", "-td", "5", "-aec", SERVE_AE, HOST, str(port))
    return [
        asyncio.ensure_future(run_sender((*storescu, *todo[:half]), logs / f"storescu-{round_}a.out")),
        asyncio.ensure_future(run_sender((*storescu, *todo[half:]), logs / f"storescu-{round_}b.out")),
        asyncio.ensure_future(
            run_sender(
                (sys.executable, "-c", PYNETDICOM_SENDER, str(port), "1", *reversed(todo)),
                logs / f"pynetdicom-{round_}.out",
            )
        ),
    ]


def index_and_files_agree(root: Path) -> set[str]:
    """The SOP Instance UIDs indexed, after checking the index against the files (serve
    started, so re-indexed, and no store under way)."""
    with sqlite3.connect(f"file:{root / 'index.sqlite'}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT sop_uid, path, size FROM instances").fetchall()
    for uid, path, size in rows:
        assert os.path.exists(path), f"index row without its file: {uid}"
        assert os.path.getsize(path) == size, f"{uid}: file size {os.path.getsize(path)}, indexed {size}"
        with open(path, "rb") as fp:
            check_part10(fp)  # complete: parses to its end
    files = {str(p) for p in root.rglob("*.dcm") if ".incoming" not in p.parts}
    assert files == {row[1] for row in rows}, f"files not indexed: {sorted(files - {row[1] for row in rows})[:3]}"
    assert not list(root.rglob("*.partial")), list(root.rglob("*.partial"))
    return {row[0] for row in rows}


def retriever() -> AE:
    ae = AE("CHECKER", acse_timeout=10, dimse_timeout=30, network_timeout=None)
    ae.add_requested_context(MODELS["study"]["find"])
    ae.add_requested_context(MODELS["study"]["get"])
    return ae


_UNIQUE = {"STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID", "IMAGE": "SOPInstanceUID"}


def query(level: str, **keys: str) -> Dataset:
    """A Study Root identifier: ``keys`` and the level's unique key (PS3.4 C.6.2.1)."""
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for key, value in {_UNIQUE[level]: "", **keys}.items():
        setattr(ds, key, value)
    return ds


async def c_find(assoc, identifier: Dataset, key: str) -> list[str]:  # type: ignore[no-untyped-def]
    responses = assoc.c_find(identifier)
    values = [str(d.get(key, "")) async for d in responses]
    assert responses.status == 0, (identifier, responses.status)
    return values


async def found_by_c_find(port: int) -> set[str]:
    """Every SOP Instance UID C-FIND finds, study by study and series by series."""
    found: set[str] = set()
    async with retriever().associate(HOST, port, SERVE_AE) as assoc:
        for study in await c_find(assoc, query("STUDY"), "StudyInstanceUID"):
            for series in await c_find(assoc, query("SERIES", StudyInstanceUID=study), "SeriesInstanceUID"):
                image = query("IMAGE", StudyInstanceUID=study, SeriesInstanceUID=series)
                found.update(await c_find(assoc, image, "SOPInstanceUID"))
    return found


async def test_kill_9_under_concurrent_senders_loses_and_presents_nothing_wrong(tmp_path: Path) -> None:
    seed = int(time.time())
    rng = random.Random(seed)
    src = tmp_path / "src"
    src.mkdir()
    corpus = pydicom_corpus(src)
    if not LONG:  # two instances of each transfer syntax
        per_syntax: dict[str, list[str]] = {}
        for uid, (ts, _path) in sorted(corpus.items()):
            per_syntax.setdefault(ts, []).append(uid)
        corpus = {uid: corpus[uid] for uids in per_syntax.values() for uid in uids[:2]}
    uid_of = {str(path): uid for uid, (_ts, path) in corpus.items()}
    paths = list(uid_of)
    root = tmp_path / "arch"
    config = tmp_path / "serve.toml"
    config.write_text(f'ae_title = "{SERVE_AE}"\nhost = "{HOST}"\nport = 0\nstorage_dir = "{root}"\n')
    log = tmp_path / "serve.log"
    logs = tmp_path / "senders"
    logs.mkdir()
    killed_mid_ingest = 0
    for round_ in range(KILLS + 1):
        proc, port = start_serve_process(config, log)
        try:
            acked = acknowledged_paths(logs)
            found = await found_by_c_find(port)
            lost = {uid_of[p] for p in acked} - found
            assert not lost, f"seed {seed}, round {round_}: acknowledged, not found: {sorted(lost)[:3]}"
            assert index_and_files_agree(root) == found, f"seed {seed}, round {round_}"
            todo = [p for p in paths if p not in acked]
            if round_ == KILLS:
                break  # serve stays up for the last check
            running = senders(port, todo, logs, round_)
            # Kill once the first files are in, at most half-way (however fast this machine is).
            target = len(list(root.rglob("*.dcm"))) + rng.randint(1, max(1, len(todo) // 2))
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and len(list(root.rglob("*.dcm"))) < target:
                await asyncio.sleep(0.01)
            killed_mid_ingest += not all(s.done() for s in running)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
            await asyncio.gather(*running)
        finally:
            if round_ < KILLS:
                stop_process(proc)
    try:
        assert killed_mid_ingest >= 1, f"seed {seed}: no kill happened during ingest"
        if todo:  # what no sender got a Success for yet, to its end: storescu takes the
            # files whose meta names another instance (pynetdicom puts that UID in the
            # command: 0xA900), pynetdicom the compressed ones
            await asyncio.gather(
                run_sender((*STORESCU, "-nh", "-aec", SERVE_AE, HOST, str(port), *todo), logs / "storescu-last.out"),
                run_sender(
                    (sys.executable, "-c", PYNETDICOM_SENDER, str(port), "20", *todo), logs / "pynetdicom-last.out"
                ),
            )
        acked = acknowledged_paths(logs)
        assert {uid_of[p] for p in acked} == set(corpus), (
            f"not acknowledged: {set(corpus) - {uid_of[p] for p in acked}}"
        )
        assert await found_by_c_find(port) == set(corpus)
        received = await retrieved_by_c_get(port, corpus, tmp_path / "got")
    finally:
        assert stop_process(proc) == 0
    assert set(received) == index_and_files_agree(root) == set(corpus)
    with sqlite3.connect(f"file:{root / 'index.sqlite'}?mode=ro", uri=True) as db:
        path_of = dict(db.execute("SELECT sop_uid, path FROM instances").fetchall())
    for uid, got in received.items():
        as_stored = dataset_bytes(Path(path_of[uid]))
        assert dataset_bytes(got) == as_stored, f"seed {seed}: {uid} retrieved other than stored"
        syntax, sent = corpus[uid]
        if as_stored[0] == syntax:
            assert same_dataset(got, sent), f"seed {seed}: {uid} not as sent"
        else:  # storescu sent it in another syntax (big endian as little endian)
            assert same_but_pixels(got, sent), f"seed {seed}: {uid} not as sent"
    text = log.read_text(errors="replace")
    assert "Traceback" not in text and "internal error" not in text and "handler failed" not in text, text[-3000:]


def same_but_pixels(got: Path, sent: Path) -> bool:
    """Element by element but for Pixel Data: a sender that converted the byte order did
    it its way (DCMTK swaps OW of 32-bit RT Dose pixels as 16-bit words); what the
    archive stored is checked byte for byte instead."""

    def rest(path: Path) -> dict[int, object]:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        return {int(e.tag): e.value for e in ds if e.tag.element and e.tag != 0xFFFCFFFC}

    return rest(got) == rest(sent)


async def retrieved_by_c_get(port: int, corpus: dict[str, tuple[str, Path]], out: Path) -> dict[str, Path]:
    """C-GET of each study, every transfer syntax an instance may be stored in proposed
    for its SOP class: the instances as received, by SOP Instance UID."""
    out.mkdir()
    ae = retriever()
    pairs = set()
    for _ts, path in corpus.values():
        meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
        sop_class = str(meta.MediaStorageSOPClassUID)
        # what a sender may have sent it in: as it is, or converted by storescu
        pairs |= {(sop_class, str(meta.TransferSyntaxUID)), (sop_class, EXPLICIT_LE), (sop_class, IMPLICIT_LE)}
    assert len(pairs) <= 126, len(pairs)
    for sop_class, syntax in sorted(pairs):
        ae.add_requested_context(sop_class, [syntax], scu_role=False, scp_role=True)
    received: dict[str, Path] = {}

    async def keep(request) -> int:  # type: ignore[no-untyped-def]
        uid = request.sop_instance_uid
        received[uid] = Path(await request.save(out / f"{uid}.dcm"))
        return 0

    async with ae.associate(HOST, port, SERVE_AE) as assoc:
        for study in await c_find(assoc, query("STUDY"), "StudyInstanceUID"):
            responses = assoc.c_get(query("STUDY", StudyInstanceUID=study), store=keep)
            progress = [p async for p in responses]
            assert responses.status == 0, (study, responses.status, progress[-1:])
    return received
