"""``dimse-async serve`` listens without loading pydicom (nor numpy): an empty or an
already indexed archive needs neither at start; the first data set loads them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import acknowledged, dcmtk, free_port, stop_process, wait_tcp
from pydicom.datadict import dictionary_VR, tag_for_keyword
from test_interop_tls import make_instances

from dimse_async.archive.schema import INDEX_TAGS, KEPT_TAG_VR, LEVEL_KEYS

ROOT = Path(__file__).resolve().parent.parent


def test_the_kept_attributes_table_is_pydicoms_dictionary() -> None:
    """PS3.6 Table 6-1: the index's tag and VR of each kept attribute are pydicom's."""
    keywords = [k for keys in LEVEL_KEYS.values() for k in keys]
    assert sorted(KEPT_TAG_VR) == sorted(keywords)
    assert {k: (tag_for_keyword(k), dictionary_VR(tag_for_keyword(k) or 0)) for k in keywords} == KEPT_TAG_VR
    assert {tag_for_keyword(k) for k in keywords} | {0x00080005} <= INDEX_TAGS


def _serve(storage: Path, port: int, imports: Path, log: Path) -> subprocess.Popen[bytes]:
    """``serve`` run by ``import_recorder.py``: which thread imported what, in ``imports``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "IMPORT_LOG": str(imports), "PROBE_PORT": str(port)}
    with log.open("wb") as sink:
        return subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "import_recorder.py"), "serve", "--port", str(port), "--aet",
             "ARCHIVE", "--storage-dir", str(storage), "--log-level", "DEBUG", "--log-ops"],
            stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip


def _echo(port: int) -> None:
    echo = subprocess.run([dcmtk("echoscu"), "-aec", "ARCHIVE", "127.0.0.1", str(port)], capture_output=True,
                          timeout=30)  # fmt: skip
    assert echo.returncode == 0, echo


def _on_the_loop(imports: str) -> list[str]:
    """The pydicom and numpy modules, and the archive's matching, that the main thread
    (the event loop's) imported, and the waits of a thread for another's pydicom import."""
    heavy = ("pydicom", "numpy", "dimse_async.archive.matching")
    return [
        line
        for line in imports.splitlines()
        if line.endswith("(waits)") or (line.startswith("MainThread ") and line.split()[1].startswith(heavy))
    ]


def test_serve_listens_before_loading_pydicom_and_loads_it_off_the_event_loop(tmp_path: Path) -> None:
    """An empty archive: ``serve`` listens before importing pydicom (nor numpy), then imports
    it on one thread; a C-STORE (DCMTK storescu) and a C-FIND (findscu) sent together as
    soon as the port listens are answered without the event loop importing pydicom (an
    import there stalls every association for ~0.3-0.5 s) and without a second thread
    importing it meanwhile (logging at DEBUG, every operation logged); asyncpg (PostgreSQL's client) is never imported. Started again on that archive (indexed already): the same,
    with a C-ECHO."""
    (sent,) = make_instances(tmp_path / "in", 1)
    storage, port = tmp_path / "archive", free_port()
    imports, log = tmp_path / "imports-empty", tmp_path / "serve-empty.log"
    proc = _serve(storage, port, imports, log)
    try:
        wait_tcp(proc, port, log)
        peers = [
            subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for argv in (
                [dcmtk("storescu"), "-v", "-aec", "ARCHIVE", "127.0.0.1", str(port), str(sent)],
                [dcmtk("findscu"), "-v", "-S", "-aec", "ARCHIVE", "-k", "QueryRetrieveLevel=STUDY", "-k",
                 "StudyInstanceUID", "127.0.0.1", str(port)],
            )
        ]  # fmt: skip
        (store, _), (find, _) = (peer.communicate(timeout=30) for peer in peers)
        assert acknowledged(store) == {str(sent)}, store
        assert peers[1].returncode == 0 and "Received Final Find Response (Success)" in find, find  # 0 or 1 match
    finally:
        assert stop_process(proc) == 0
    text = imports.read_text()
    assert "listening True" in text and "listening False" not in text, text[-2000:]
    assert not _on_the_loop(text), _on_the_loop(text)
    assert not [line for line in text.splitlines() if line.split()[-1].startswith("asyncpg")]  # an SQLite index

    imports, log = tmp_path / "imports-indexed", tmp_path / "serve-indexed.log"
    proc = _serve(storage, port, imports, log)
    try:
        wait_tcp(proc, port, log)
        _echo(port)
    finally:
        assert stop_process(proc) == 0
    assert "1 instances (0 indexed now" in log.read_text(errors="replace"), log.read_text(errors="replace")[-2000:]
    text = imports.read_text()
    assert "listening True" in text and not _on_the_loop(text), text[-2000:]
