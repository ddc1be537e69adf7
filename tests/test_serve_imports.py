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


def _serve(storage: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with log.open("wb") as sink:
        return subprocess.Popen(
            [sys.executable, "-X", "importtime", "-m", "dimse_async", "serve", "--port", str(port), "--aet", "ARCHIVE",
             "--storage-dir", str(storage)],
            stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip


def _echo(port: int) -> None:
    echo = subprocess.run([dcmtk("echoscu"), "-aec", "ARCHIVE", "127.0.0.1", str(port)], capture_output=True,
                          timeout=30)  # fmt: skip
    assert echo.returncode == 0, echo


def _heavy(text: str) -> list[str]:
    """The pydicom and numpy modules a ``-X importtime`` log says were imported."""
    imported = [line.rsplit("|", 1)[1].strip() for line in text.splitlines() if line.startswith("import time:")]
    assert "dimse_async.archive.index" in imported, text[-2000:]
    return [m for m in imported if m.split(".")[0] in ("pydicom", "numpy")]


def test_serve_answers_a_c_echo_without_loading_pydicom(tmp_path: Path) -> None:
    """An empty archive: C-ECHO (DCMTK echoscu) without pydicom; then a C-STORE (storescu)
    loads it and is stored. Started again on that archive (indexed already): C-ECHO and
    shutdown without pydicom."""
    (sent,) = make_instances(tmp_path / "in", 1)
    storage, port = tmp_path / "archive", free_port()
    log = tmp_path / "serve-empty.log"
    proc = _serve(storage, port, log)
    try:
        wait_tcp(proc, port, log)
        _echo(port)
        before_store = log.read_text(errors="replace")
        store = subprocess.run([dcmtk("storescu"), "-v", "-aec", "ARCHIVE", "127.0.0.1", str(port), str(sent)],
                               capture_output=True, text=True, timeout=30)  # fmt: skip
        assert acknowledged(store.stdout + store.stderr) == {str(sent)}, store
    finally:
        assert stop_process(proc) == 0
    assert not _heavy(before_store), before_store[-2000:]
    assert "pydicom" in _heavy(log.read_text(errors="replace"))  # at the first data set

    log = tmp_path / "serve-indexed.log"
    proc = _serve(storage, port, log)
    try:
        wait_tcp(proc, port, log)
        _echo(port)
    finally:
        assert stop_process(proc) == 0
    text = log.read_text(errors="replace")
    assert "1 instances (0 indexed now" in text, text[-2000:]
    assert not _heavy(text), text[-2000:]
