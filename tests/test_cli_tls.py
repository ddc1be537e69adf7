"""``find``, ``get`` and ``move`` share ``send``/``echo``'s connection options (TLS,
keepalive, idle timeout): run for real against ``dimse-async serve --tls-cert``, with
certificates from ``trustme`` (as in ``test_tls``).

- ``send --tls-ca`` stores a study; ``find --tls-ca`` finds it (and DCMTK ``findscu``
  without TLS gets nothing from the TLS port); ``get`` retrieves it over TLS with
  keepalive flags; ``move`` over TLS has ``serve`` send it to a ``store-scp``;
- a client that cannot verify the server (another CA, a wrong server name) fails with
  one line and the connection exit code; an unreadable CA file is a usage error.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest
from conftest import dcmtk, free_port, stop_process, wait_tcp
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from test_tls import Certs, make_certs

pytestmark = [pytest.mark.interop, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
CLI = [sys.executable, "-m", "dimse_async"]
LISTENING = re.compile(r"listening on [\d.]+:(\d+) \(TLS\)")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


def ours(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=ENV, timeout=timeout, check=False)


@contextmanager
def serve_tls(tmp_path: Path, certs: Certs, known: dict[str, int]) -> Iterator[int]:
    config = tmp_path / "serve.toml"
    lines = ['ae_title = "TLSARCHIVE"', "", "[known_aes]"]
    lines += [f'{title} = {{ host = "{HOST}", port = {port} }}' for title, port in known.items()]
    config.write_text("\n".join(lines) + "\n")
    out, err = tmp_path / "serve.out", tmp_path / "serve.err"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = subprocess.Popen(
            [*CLI, "serve", "--config", str(config), "--host", HOST, "--port", "0",
             "--storage-dir", str(tmp_path / "archive"),
             "--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key)],
            stdout=stdout, stderr=stderr, env=ENV, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        match = None
        while time.monotonic() < deadline and match is None:
            assert proc.poll() is None, err.read_text()
            match = LISTENING.search(out.read_text())
            time.sleep(0.05)
        assert match, f"serve --tls did not start: {err.read_text()}"
        yield int(match[1])
    finally:
        assert stop_process(proc) == 0, err.read_text()


def make_study(directory: Path, patient_id: str, count: int = 2) -> tuple[str, set[str]]:
    directory.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    uids = set()
    for i in range(count):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.PatientID, ds.PatientName = patient_id, f"TLS^{patient_id}"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(directory / f"{i}.dcm")
        uids.add(str(ds.SOPInstanceUID))
    return study, uids


def test_find_get_move_over_tls_against_serve(tmp_path: Path, certs: Certs) -> None:
    study, uids = make_study(tmp_path / "study", "TLS1")
    dest_port = free_port()
    with serve_tls(tmp_path, certs, {"TLSDEST": dest_port}) as port:
        tls = ["--tls-ca", str(certs.ca)]
        sent = ours("send", HOST, str(port), str(tmp_path / "study"), "-r", *tls)
        assert sent.returncode == 0, sent

        # find over TLS, with the keepalive and idle options every SCU command shares
        found = ours("find", HOST, str(port), *tls, "--keepalive-idle", "5", "--idle-timeout", "30",
                     "-S", "-k", "PatientID=TLS1", "-k", "StudyInstanceUID", "--json")  # fmt: skip
        assert found.returncode == 0, found
        identifiers = [pydicom.Dataset.from_json(json.loads(line)) for line in found.stdout.splitlines()]
        assert [str(d.StudyInstanceUID) for d in identifiers] == [study]

        # the TLS port does not answer a plain DICOM client
        plain = subprocess.run(
            [dcmtk("findscu"), "-S", "-to", "5", "-ta", "5", "-aec", "TLSARCHIVE",
             "-k", "QueryRetrieveLevel=STUDY", "-k", "PatientID=TLS1", HOST, str(port)],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert plain.returncode != 0, plain

        # get over TLS writes the instances
        got = ours("get", HOST, str(port), *tls, "--keepalive-idle", "5", "-S", "--level", "STUDY",
                   "-k", f"StudyInstanceUID={study}", "--out", str(tmp_path / "got"))  # fmt: skip
        assert got.returncode == 0, got
        assert {p.stem for p in (tmp_path / "got").glob("*.dcm")} == uids

        # move over TLS: serve sends to a plain store-scp it knows as TLSDEST
        received = tmp_path / "moved"
        log = tmp_path / "store-scp.log"
        with log.open("wb") as sink:
            dest = subprocess.Popen(
                [*CLI, "store-scp", "--port", str(dest_port), "--aet", "TLSDEST", "--out", str(received)],
                stdout=sink, stderr=subprocess.STDOUT, env=ENV, start_new_session=True,
            )  # fmt: skip
        try:
            wait_tcp(dest, dest_port, log)
            moved = ours("move", HOST, str(port), *tls, "--dest", "TLSDEST", "-S", "--level", "STUDY",
                         "-k", f"StudyInstanceUID={study}")  # fmt: skip
            assert moved.returncode == 0, moved
        finally:
            assert stop_process(dest) == 0, log.read_text()
        assert {p.stem for p in received.rglob("*.dcm")} == uids

        # a server we cannot verify: one line, exit 3 (cannot connect) for each command
        for command in ("find", "get", "move"):
            extra = ["--dest", "TLSDEST"] if command == "move" else []
            extra += ["--out", str(tmp_path / "never")] if command == "get" else []
            refused = ours(command, HOST, str(port), "--tls-ca", str(certs.other_ca), "-S", "--level", "STUDY",
                           "-k", f"StudyInstanceUID={study}", *extra)  # fmt: skip
            assert refused.returncode == 3, refused
            assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
            assert refused.stdout == "", refused.stdout
        wrong_name = ours("find", HOST, str(port), *tls, "--tls-server-name", "pacs.example.org",
                          "-S", "-k", "PatientID=TLS1")  # fmt: skip
        assert wrong_name.returncode == 3, wrong_name


def test_unreadable_tls_file_is_a_usage_error(tmp_path: Path) -> None:
    for command in ("find", "get", "move"):
        extra = ["--dest", "X"] if command == "move" else []
        done = ours(command, HOST, "11112", "--tls-ca", str(tmp_path / "missing.pem"), "-S", "--level", "STUDY",
                    "-k", "StudyInstanceUID=1.2.3", "--out" if command == "get" else "--aet",
                    str(tmp_path / "out") if command == "get" else "ME", *extra)  # fmt: skip
        assert done.returncode == 2, done
        assert done.stderr.startswith(f"dimse-async {command}: TLS:"), done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
