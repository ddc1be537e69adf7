"""``dimse-async find | get | move`` against DCMTK ``dcmqrscp`` and ``dimse-async serve``,
each compared with what DCMTK ``findscu`` / ``getscu`` / ``movescu`` return for the
same keys from the same peer (same ``-P``/``-S``/``-W`` and ``-k`` arguments).

The peers and the corpus are the fixtures of ``test_interop_qr`` (3 patients x 2 studies
x 2 series x 3 instances, one Latin-1 patient name; worklist files made by dump2dcm).
C-MOVE destinations are real processes: ``dimse-async store-scp`` for our ``move``,
``movescu``'s own storage SCP for DCMTK.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
import test_interop_qr as qr
from conftest import stop_process
from pydicom.dataset import Dataset
from test_interop_qr import (
    DCMQRSCP_UNSUPPORTED,
    HOST,
    MOVESCU_AE,
    OUR_AE,
    SERVE_AE,
    WORKLIST_QUERIES,
    Corpus,
    Peer,
    Serve,
    WorklistData,
    build_queries,
    check_instances,
    check_worklist,
    final_status,
    findscu_argv,
    findscu_responses,
    getscu_final,
    norm,
    received_dir,
    run_sync,
)

# The peers and the corpus: test_interop_qr's module fixtures, instantiated for this module.
corpus, dcmqrscp, qr_ports, serve, worklist = qr.corpus, qr.dcmqrscp, qr.qr_ports, qr.serve, qr.worklist

pytestmark = [pytest.mark.interop, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "dimse_async"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}

FIND_QUERIES = ["patient-name-wildcard", "study-date-range", "series-uid-list", "image-in-series", "patient-root-image"]


def ours(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=60, env=ENV, cwd=cwd or ROOT, check=False
    )


def view(ds: Dataset) -> dict[str, object]:
    """A comparable form of an identifier: keyword -> normalised value (sequence items too)."""
    out: dict[str, object] = {}
    for elem in ds:
        if elem.tag.group == 0x0002 or elem.keyword == "SpecificCharacterSet":
            continue
        if elem.VR == "SQ":
            out[elem.keyword] = [view(item) for item in elem.value]
        else:
            out[elem.keyword] = norm(elem.value, elem.keyword)
    return out


def json_identifiers(stdout: str) -> list[Dataset]:
    return [Dataset.from_json(json.loads(line)) for line in stdout.splitlines()]


def same_answers(mine: Sequence[Dataset], theirs: Sequence[Dataset], what: str) -> None:
    a = sorted(json.dumps(view(d), sort_keys=True) for d in mine)
    b = sorted(json.dumps(view(d), sort_keys=True) for d in theirs)
    assert a, f"{what}: the query must match something"
    assert a == b, f"{what}: dimse-async find\n{a}\nfindscu\n{b}"


def peer_of(request: pytest.FixtureRequest, name: str) -> tuple[int, str]:
    if name == "serve":
        server: Serve = request.getfixturevalue("serve")
        return server.port, SERVE_AE
    peer: Peer = request.getfixturevalue("dcmqrscp")
    return peer.port, peer.ae_title


# --------------------------------------------------------------------------- find


@pytest.mark.parametrize("peer", ["serve", "dcmqrscp"])
@pytest.mark.parametrize("name", FIND_QUERIES)
def test_find_matches_findscu(
    name: str, peer: str, corpus: Corpus, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    port, called = peer_of(request, peer)
    query = build_queries(corpus)[name]
    if peer == "dcmqrscp":
        query = query.without(DCMQRSCP_UNSUPPORTED)
    args = query.findscu_args()
    done = run_sync(*findscu_argv(port, called, args, tmp_path / "rsp"))
    assert done.returncode == 0 and final_status(done) == "Success", done
    theirs = findscu_responses(tmp_path / "rsp")
    mine = ours("find", HOST, str(port), "--aec", called, *args, "--json")
    assert mine.returncode == 0, mine
    assert mine.stderr == "", mine.stderr
    got = json_identifiers(mine.stdout)
    same_answers(got, theirs, f"{name} on {peer}")
    expected = query.expected(corpus)
    assert len(got) == len(expected)


def test_find_text_output_one_line_per_identifier(serve: Serve, corpus: Corpus) -> None:
    mine = ours(
        "find",
        HOST,
        str(serve.port),
        "--aec",
        SERVE_AE,
        "-P",
        "--level",
        "PATIENT",
        "-k",
        "PatientID",
        "-k",
        "PatientName",
    )
    assert mine.returncode == 0, mine
    lines = mine.stdout.splitlines()
    assert len(lines) == 3
    assert any("PatientName=MÜLLER^CLARA" in line for line in lines), lines
    assert all("QueryRetrieveLevel=PATIENT  " in line for line in lines), lines


@pytest.mark.parametrize("name", ["modality", "date-range"])
def test_worklist_find_matches_findscu(name: str, serve: Serve, worklist: WorklistData, tmp_path: Path) -> None:
    query = WORKLIST_QUERIES[name]
    args = query.findscu_args()
    done = run_sync(*findscu_argv(serve.port, SERVE_AE, args, tmp_path / "rsp"))
    assert done.returncode == 0 and final_status(done) == "Success", done
    mine = ours("find", HOST, str(serve.port), "--aec", SERVE_AE, *args, "--json")
    assert mine.returncode == 0, mine
    got = json_identifiers(mine.stdout)
    check_worklist(got, query, worklist, "dimse-async find -W")
    same_answers(got, findscu_responses(tmp_path / "rsp"), f"worklist {name}")


def test_find_failure_status_is_exit_1(serve: Serve, tmp_path: Path) -> None:
    """Study root has no PATIENT level: findscu and we both see the failure."""
    args = ["-S", "-k", "QueryRetrieveLevel=PATIENT", "-k", "PatientID"]
    done = run_sync(*findscu_argv(serve.port, SERVE_AE, args, tmp_path / "rsp"))
    assert final_status(done) == "Error: DataSetDoesNotMatchSOPClass", done
    mine = ours("find", HOST, str(serve.port), "--aec", SERVE_AE, *args)
    assert mine.returncode == 1, mine
    assert mine.stdout == ""
    lines = mine.stderr.strip().splitlines()
    assert len(lines) == 1 and "0xA900" in lines[0], mine.stderr


# --------------------------------------------------------------------------- get


def get_keys(corpus: Corpus, level: str) -> tuple[list[str], set[str]]:
    series = corpus.select("SERIES", PatientID="PAT003")[1]
    keys = ["-k", f"QueryRetrieveLevel={level}", "-k", "PatientID=PAT003",
            "-k", f"StudyInstanceUID={series['StudyInstanceUID']}"]  # fmt: skip
    if level == "STUDY":
        return keys, {e["SOPInstanceUID"] for e in corpus.select("IMAGE", StudyInstanceUID=series["StudyInstanceUID"])}
    keys += ["-k", f"SeriesInstanceUID={series['SeriesInstanceUID']}"]
    return keys, {e["SOPInstanceUID"] for e in corpus.select("IMAGE", SeriesInstanceUID=series["SeriesInstanceUID"])}


@pytest.mark.parametrize("peer", ["serve", "dcmqrscp"])
@pytest.mark.parametrize("level", ["STUDY", "SERIES"])
def test_get_matches_getscu(
    level: str, peer: str, corpus: Corpus, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    port, called = peer_of(request, peer)
    keys, uids = get_keys(corpus, level)
    keys = ["-P", *keys]
    theirs_dir, mine_dir = tmp_path / "getscu", tmp_path / "mine"
    theirs_dir.mkdir()
    done = run_sync(
        "/usr/bin/getscu", "-v", "-to", "10", "-ta", "10", "-td", "20", "-aec", called, *keys, "+B",
        "-od", str(theirs_dir), HOST, str(port),
    )  # fmt: skip
    assert done.returncode == 0, done
    status, counts = getscu_final(done)
    assert (status, counts["Completed"], counts["Failed"]) == ("Success", len(uids), 0), done
    mine = ours("get", HOST, str(port), "--aec", called, *keys, "--out", str(mine_dir))
    assert mine.returncode == 0, mine
    assert mine.stderr == ""
    got = received_dir(mine_dir)
    assert set(got) == set(received_dir(theirs_dir)) == uids
    check_instances(corpus, got, uids, f"dimse-async get from {peer}")
    assert not list(mine_dir.glob(".incoming/*"))


# --------------------------------------------------------------------------- move


@contextmanager
def store_scp(title: str, port: int, out: Path) -> Iterator[subprocess.Popen[str]]:
    """``dimse-async store-scp`` as the C-MOVE destination."""
    proc = subprocess.Popen(
        [*CLI, "store-scp", "--host", HOST, "--port", str(port), "--aet", title, "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, start_new_session=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 30
        line = ""
        while time.monotonic() < deadline and "listening" not in line:
            line = proc.stdout.readline()
            if not line:
                break
        assert "listening" in line, proc.stderr.read() if proc.poll() is not None else line  # type: ignore[union-attr]
        yield proc
    finally:
        stop_process(proc)  # type: ignore[arg-type]


@pytest.mark.parametrize("peer", ["serve", "dcmqrscp"])
def test_move_matches_movescu(
    peer: str, corpus: Corpus, qr_ports: dict[str, int], request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """The same keys and destination title: movescu receives with its own SCP; we run
    ``store-scp`` under that title on that port. Both get the same instances, intact."""
    port, called = peer_of(request, peer)
    # the destination each peer knows: serve -> MOVESCU, dcmqrscp -> OURS
    dest, dest_port = (MOVESCU_AE, qr_ports["movescu"]) if peer == "serve" else (OUR_AE, qr_ports["ours"])
    study = corpus.select("STUDY", PatientID="PAT002")[0]["StudyInstanceUID"]
    uids = {e["SOPInstanceUID"] for e in corpus.select("IMAGE", StudyInstanceUID=study)}
    keys = ["-S", "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}"]
    theirs_dir, mine_dir = tmp_path / "movescu", tmp_path / "mine"
    theirs_dir.mkdir()
    done = run_sync(
        "/usr/bin/movescu", "-v", "-to", "10", "-ta", "10", "-td", "20", "-aet", dest, "-aec", called,
        "-aem", dest, "+P", str(dest_port), "+xa", "+B", *keys, HOST, str(port), cwd=theirs_dir,
    )  # fmt: skip
    assert done.returncode == 0 and final_status(done) == "Success", done
    with store_scp(dest, dest_port, mine_dir):
        mine = ours("move", HOST, str(port), "--aec", called, "--aet", dest, "--dest", dest, *keys)
    assert mine.returncode == 0, mine
    assert mine.stderr == ""
    got = received_dir(mine_dir)
    assert set(got) == set(received_dir(theirs_dir)) == uids
    check_instances(corpus, got, uids, f"dimse-async move from {peer}")


def test_move_unknown_destination_is_exit_1(serve: Serve) -> None:
    mine = ours("move", HOST, str(serve.port), "--aec", SERVE_AE, "--dest", "NOBODY", "-P",
                "-k", "QueryRetrieveLevel=PATIENT", "-k", "PatientID=PAT001")  # fmt: skip
    assert mine.returncode == 1, mine
    lines = mine.stderr.strip().splitlines()
    assert len(lines) == 1 and "0xA801" in lines[0], mine.stderr
