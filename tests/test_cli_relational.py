"""``dimse-async find | get | move --relational``: relational queries and retrieval
proposed (SOP class extended negotiation, PS3.4 C.5.1.1.1, C.5.2.1.1, C.5.3.1.1), so a
request naming a level's keys without the unique keys of the levels above it (an IMAGE
C-GET by SOP Instance UID alone) is served by an SCP that holds to the hierarchy
otherwise (C.4.1.2.2.1, C.4.2.2.1, C.4.3.2.1): ``serve`` with ``relational_retrieve =
false``, and a pynetdicom C-GET SCP that grants relational retrieval. Without the option
the same requests are refused 0xA900 (exit 1); a peer that does not grant it is named on
stderr. The commands run in this process (their ``run`` coroutines)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from normalized_helpers import HOST, make_instances, running_serve, store
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage

import dimse_async as da
from dimse_async.cli import _parser
from dimse_async.cli import find as find_cli
from dimse_async.cli import get as get_cli
from dimse_async.cli import move as move_cli
from dimse_async.cli.common import CLIError
from dimse_async.cli.query import build_query
from dimse_async.services.qr import MODELS

pytestmark = pytest.mark.timeout(60)

COMMANDS = {"find": find_cli, "get": get_cli, "move": move_cli}


async def cli(command: str, port: int, *args: str, called: str = "ARCHIVE", calling: str = "OURS") -> int:
    """``dimse-async COMMAND 127.0.0.1 PORT --aec CALLED --aet CALLING ARGS``: its exit code."""
    parsed = _parser(command).parse_args([command, HOST, str(port), "--aec", called, "--aet", calling, *args])
    return int(await COMMANDS[command].run(parsed))


async def test_relational_find_get_and_move_against_a_strict_serve(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``serve`` with relational_retrieve = false: a SERIES C-FIND without the Study
    Instance UID, an IMAGE C-GET by SOP Instance UID alone and a SERIES C-MOVE by Series
    Instance UID alone are refused 0xA900 without ``--relational`` (exit 1) and served
    with it (exit 0: the match printed, the instance written, the instance moved)."""
    (path, _c, sop_uid), = make_instances(tmp_path / "in", 1, patient_id="PAT1")
    series_uid = str(pydicom.dcmread(path).SeriesInstanceUID)
    dest = da.AE("DEST")
    dest.add_supported_context(CTImageStorage)
    dest.on_c_store(da.DirectoryStore(tmp_path / "moved"))
    dest_server = await dest.start_server(HOST, 0)
    find = ["--level", "SERIES", "-k", "SeriesInstanceUID", "-k", "Modality=CT"]
    get = ["--level", "IMAGE", "-k", f"SOPInstanceUID={sop_uid}", "--out"]
    move = ["--level", "SERIES", "-k", f"SeriesInstanceUID={series_uid}", "--dest", "DEST"]
    try:
        async with running_serve(
            tmp_path / "archive", relational_retrieve=False, known_aes={"DEST": (HOST, dest_server.port)}
        ) as serve:
            await store(serve.port, [path])
            hierarchical = [
                await cli("find", serve.port, *find),
                await cli("get", serve.port, *get, str(tmp_path / "got-h")),
                await cli("move", serve.port, *move),
            ]
            refused = capsys.readouterr()
            moved_before = list((tmp_path / "moved").glob("*.dcm"))
            relational = [
                await cli("find", serve.port, *find, "--relational-query"),
                await cli("get", serve.port, *get, str(tmp_path / "got-r"), "--relational"),
                await cli("move", serve.port, *move, "--relational-retrieval"),
            ]
            served = capsys.readouterr()
    finally:
        dest_server.close()
        await dest_server.wait_closed(2)
    assert hierarchical == [1, 1, 1], refused.err
    assert refused.out == ""
    assert refused.err.count("0xA900") == 3, refused.err
    assert not list((tmp_path / "got-h").glob("*.dcm")) and not moved_before
    assert relational == [0, 0, 0], served.err
    assert served.err == ""
    assert served.out.count(f"SeriesInstanceUID={series_uid}") == 1, served.out
    assert [p.name for p in (tmp_path / "got-r").glob("*.dcm")] == [f"{sop_uid}.dcm"]
    assert [p.name for p in (tmp_path / "moved").glob("*.dcm")] == [f"{sop_uid}.dcm"]


@pytest.fixture
def pynetdicom_get_scp(tmp_path: Path) -> Iterator[tuple[int, list[tuple[str, bool]], Path]]:
    """A pynetdicom Study Root C-GET SCP holding one CT instance: relational retrieval is
    granted unless the calling AE title is NOREL; a request without a Study Instance UID
    is refused 0xA900 where it was not granted. Yields its port, the (calling AE title,
    relational granted) of each C-GET, and the instance's file."""
    from pynetdicom import AE as PynetAE  # type: ignore[import-untyped]
    from pynetdicom import evt

    (path, _c, _u), = make_instances(tmp_path / "scp", 1, patient_id="PAT1")
    get_uid = MODELS["study"]["get"]
    granted: dict[int, bool] = {}
    seen: list[tuple[str, bool]] = []
    lock = threading.Lock()

    def on_extended(event: Any) -> dict[str, bytes]:
        grant = event.assoc.requestor.ae_title != "NOREL" and event.app_info.get(get_uid, b"")[:1] == b"\x01"
        with lock:
            granted[id(event.assoc)] = grant
        return {get_uid: b"\x01"} if grant else {}

    def on_get(event: Any) -> Iterator[Any]:
        with lock:
            relational = granted.get(id(event.assoc), False)
            seen.append((event.assoc.requestor.ae_title, relational))
        if "StudyInstanceUID" not in event.identifier and not relational:
            yield 1
            status = Dataset()
            status.Status = 0xA900
            status.ErrorComment = "StudyInstanceUID missing"
            yield status, None
            return
        yield 1
        yield 0xFF00, pydicom.dcmread(path)

    scp = PynetAE(ae_title="PYGET")
    scp.add_supported_context(get_uid)
    scp.add_supported_context(CTImageStorage, scu_role=False, scp_role=True)
    handlers = [(evt.EVT_C_GET, on_get), (evt.EVT_SOP_EXTENDED, on_extended)]
    server = scp.start_server((HOST, 0), block=False, evt_handlers=handlers)
    try:
        yield server.server_address[1], seen, path
    finally:
        server.shutdown()


async def test_relational_get_against_pynetdicom(
    pynetdicom_get_scp: tuple[int, list[tuple[str, bool]], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A pynetdicom SCP that grants relational retrieval serves an IMAGE C-GET by SOP
    Instance UID alone proposed with ``--relational``; one that does not grant it (and
    refuses the request 0xA900) is named on stderr."""
    port, seen, path = pynetdicom_get_scp
    sop_uid = str(pydicom.dcmread(path).SOPInstanceUID)
    get = ["--level", "IMAGE", "-k", f"SOPInstanceUID={sop_uid}", "--relational", "--out"]
    granted = await cli("get", port, *get, str(tmp_path / "granted"), called="PYGET")
    served = capsys.readouterr()
    refused = await cli("get", port, *get, str(tmp_path / "refused"), called="PYGET", calling="NOREL")
    denied = capsys.readouterr()
    assert granted == 0, served.err
    assert served.err == ""
    assert [p.name for p in (tmp_path / "granted").glob("*.dcm")] == [f"{sop_uid}.dcm"]
    assert refused == 1
    assert f"PYGET@{HOST}:{port}: relational retrieval not granted by the peer" in denied.err, denied.err
    assert not list((tmp_path / "refused").glob("*.dcm"))
    assert seen == [("OURS", True), ("NOREL", False)]


def test_relational_is_no_worklist_option() -> None:
    """``find -W --relational``: relational queries belong to the Q/R models (PS3.4 C.5.1.1)."""
    args = _parser("find").parse_args(["find", HOST, "104", "-W", "--relational"])
    with pytest.raises(CLIError, match="not the worklist"):
        build_query(args, "find")
