"""C-ECHO and association negotiation against real, independent DICOM implementations.

Peers: DCMTK (``/usr/bin/echoscu``, ``storescp``, ``storescu``, ``findscu``) as subprocesses,
pynetdicom in this process (it runs on its own threads, so its blocking calls go through
``asyncio.to_thread`` while our event loop keeps serving), and our own ``dimse-async``
command line as a subprocess. No mocks. Everything is on 127.0.0.1, every wait is bounded
and every process started here is stopped here.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import communicate, dcmtk, free_port
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE as PynetdicomAE
from pynetdicom import build_role, evt
from pynetdicom.pdu_primitives import (
    AsynchronousOperationsWindowNegotiation,
    SOPClassCommonExtendedNegotiation,
    SOPClassExtendedNegotiation,
    UserIdentityNegotiation,
)

import dimse_async as da
from dimse_async.acse import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from dimse_async.pdu import SOPClassCommonExtended, SOPClassExtended, UserIdentityRQ

pytestmark = [pytest.mark.interop, pytest.mark.timeout(60)]

VERIFICATION = str(da.Verification)
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
STORAGE_SERVICE_CLASS = "1.2.840.10008.4.2"
HOST = "127.0.0.1"
WAIT = 15.0  # upper bound for any single wait on a peer

# DCMTK reads TCP_NODELAY from the environment; without it small PDUs meet Nagle's delay.
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
_SCRIPT = Path(sys.executable).with_name("dimse-async")
CLI: list[str] = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "dimse_async"]


# --------------------------------------------------------------------------- helpers


@dataclass
class Completed:
    argv: Sequence[str]
    returncode: int
    stdout: str
    stderr: str

    @property
    def text(self) -> str:
        return self.stdout + self.stderr

    def __str__(self) -> str:
        return f"{' '.join(self.argv)} -> exit {self.returncode}\n--- stdout\n{self.stdout}--- stderr\n{self.stderr}"


async def run(*argv: str, env: dict[str, str] | None = None, timeout: float = 30.0) -> Completed:
    """Run a peer to completion without blocking the event loop (our SCP keeps serving)."""
    code, out, err = await communicate(argv, env=env, timeout=timeout)
    return Completed(argv, code, out, err)


async def echoscu(port: int, *options: str) -> Completed:
    """``/usr/bin/echoscu -v`` with bounded DCMTK timeouts."""
    return await run(
        dcmtk("echoscu"), "-v", "-to", "10", "-ta", "10", "-td", "10", *options, HOST, str(port), env=DCMTK_ENV
    )


@contextlib.asynccontextmanager
async def serving(ae: da.AE) -> AsyncIterator[da.Server]:
    """Our SCP on a free loopback port, closed (with its associations) on exit."""
    server = await ae.start_server(HOST, 0)
    try:
        yield server
    finally:
        server.close()
        await asyncio.wait_for(server.wait_closed(grace=5), 15)


class Events:
    """Records our AE's association events, with bounded waits for them."""

    def __init__(self, ae: da.AE):
        self.seen: dict[str, list[da.Association]] = {}
        for event in ("requested", "accepted", "rejected", "released", "aborted"):
            self.seen[event] = []
            ae.on_association(event)(self.seen[event].append)

    async def wait(self, event: str, count: int = 1, timeout: float = 5.0) -> list[da.Association]:
        deadline = time.monotonic() + timeout
        while len(self.seen[event]) < count:
            if time.monotonic() > deadline:
                pytest.fail(f"expected {count} {event!r} association event(s) within {timeout} s, got {self.seen}")
            await asyncio.sleep(0.01)
        return self.seen[event]


def verification_scp(title: str = "OUR_SCP", **kwargs: Any) -> tuple[da.AE, list[da.Request]]:
    """Our verification SCP and the list of C-ECHO requests its handler saw."""
    ae = da.AE(title, **kwargs)
    ae.add_supported_context(da.Verification)
    requests: list[da.Request] = []

    @ae.on_c_echo
    async def echo(request: da.Request) -> int:
        requests.append(request)
        return 0x0000

    return ae, requests


@dataclass
class Peer:
    """A peer process listening on ``port``, its output going to ``log``."""

    port: int
    log: Path
    proc: subprocess.Popen[bytes]

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_output(self, needle: str, count: int = 1, timeout: float = 5.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.output()
            if text.count(needle) >= count:
                return text
            if time.monotonic() > deadline:
                pytest.fail(f"expected {count}x {needle!r} in the peer's output within {timeout} s:\n{text}")
            time.sleep(0.02)


def _stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    assert proc.returncode is not None
    return proc.returncode


def _wait_listening(proc: subprocess.Popen[bytes], port: int, log: Path, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args} exited with {proc.returncode} before listening:\n{log.read_text()}")
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                pytest.fail(f"{proc.args} is not listening on {HOST}:{port} after {timeout} s:\n{log.read_text()}")
            time.sleep(0.05)


@contextlib.contextmanager
def listening_process(argv: Sequence[str], port: int, log: Path, env: dict[str, str]) -> Iterator[Peer]:
    """Start a server process, wait until it accepts connections, always stop it."""
    with log.open("wb") as sink:
        proc = subprocess.Popen(list(argv), stdout=sink, stderr=subprocess.STDOUT, env=env)
    try:
        _wait_listening(proc, port, log)
        yield Peer(port, log, proc)
    finally:
        _stop(proc)


@contextlib.contextmanager
def storescp_process(workdir: Path, *options: str) -> Iterator[Peer]:
    port = free_port()
    received = workdir / f"storescp-{port}"
    received.mkdir()
    argv = [dcmtk("storescp"), "-v", *options, "--aetitle", "STORESCP", "-od", str(received), str(port)]
    with listening_process(argv, port, workdir / f"storescp-{port}.log", DCMTK_ENV) as peer:
        yield peer


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[Peer]:
    """DCMTK storescp (it answers C-ECHO too) on a free loopback port."""
    with storescp_process(tmp_path) as peer:
        yield peer


@pytest.fixture
def pynetdicom_scp() -> Iterator[Callable[..., int]]:
    """Start pynetdicom verification SCPs in this process; returns their ports; shut down after."""
    servers: list[Any] = []

    def start(
        handlers: Sequence[tuple[Any, Callable[..., Any]]] = (),
        *,
        title: str = "PYNETDICOM",
        scu_role: bool | None = None,
        scp_role: bool | None = None,
        require_called_aet: bool = False,
    ) -> int:
        ae = PynetdicomAE(title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        ae.require_called_aet = require_called_aet
        ae.add_supported_context(VERIFICATION, scu_role=scu_role, scp_role=scp_role)
        port = free_port()
        servers.append(ae.start_server((HOST, port), block=False, evt_handlers=list(handlers)))
        return port

    try:
        yield start
    finally:
        for server in servers:
            server.shutdown()


def pynetdicom_session(
    port: int,
    *,
    called: str = "OUR_SCP",
    calling: str = "PYNETDICOM_SCU",
    ext_neg: Sequence[Any] = (),
    contexts: Sequence[str] = (VERIFICATION,),
    echo: bool = True,
) -> dict[str, Any]:
    """Blocking: associate with pynetdicom, optionally C-ECHO, release; return what it saw."""
    ae = PynetdicomAE(calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    for uid in contexts:
        ae.add_requested_context(uid)
    received: list[Any] = []  # the PDUs pynetdicom's reader thread decoded
    assoc = ae.associate(
        HOST, port, ae_title=called, ext_neg=list(ext_neg) or None,
        evt_handlers=[(evt.EVT_PDU_RECV, lambda event: received.append(event.pdu))],
    )  # fmt: skip
    seen: dict[str, Any] = {
        "established": assoc.is_established,
        "rejected": assoc.is_rejected,
        "aborted": assoc.is_aborted,
        "received": [type(pdu).__name__ for pdu in received],
    }
    try:
        # The A-ASSOCIATE-RJ as decoded off the wire. pynetdicom's own verdict can miss
        # it: when its reader thread takes the reply and closes the socket before the
        # requesting thread checks that the connection is up (a quick reply, a loaded
        # machine), it reports the association as aborted.
        rj = [pdu for pdu in received if type(pdu).__name__ == "A_ASSOCIATE_RJ"]
        if rj:
            seen["reject"] = (rj[0].result, rj[0].source, rj[0].reason_diagnostic)
        if assoc.is_established:
            acceptor = assoc.acceptor
            identity = acceptor.user_identity
            seen.update(
                implementation_class_uid=acceptor.implementation_class_uid,
                implementation_version_name=acceptor.implementation_version_name,
                extended=dict(acceptor.sop_class_extended),
                identity=None if identity is None else identity.server_response,
                async_ops=acceptor.asynchronous_operations,
                roles={uid: (r.scu_role, r.scp_role) for uid, r in acceptor.role_selection.items()},
                accepted=[(c.abstract_syntax, c.as_scu, c.as_scp) for c in assoc.accepted_contexts],
                rejected=[(c.abstract_syntax, c.result) for c in assoc.rejected_contexts],
            )
            if echo:
                status = assoc.send_c_echo()
                seen["echo_status"] = None if "Status" not in status else int(status.Status)
            assoc.release()
    finally:
        if assoc.is_alive():
            assoc.abort()
    return seen


def user_identity(kind: int, primary: bytes, secondary: bytes | None = None) -> UserIdentityNegotiation:
    item = UserIdentityNegotiation()
    item.user_identity_type = kind
    item.primary_field = primary
    if secondary is not None:
        item.secondary_field = secondary
    item.positive_response_requested = True
    return item


def write_ct_file(path: Path) -> Path:
    """A minimal Part 10 CT image file for storescu (it only needs something to propose)."""
    ds = Dataset()
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.PatientName = "Interop^Test"
    ds.PatientID = "INTEROP"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


# ------------------------------------------------------------ 1. DCMTK echoscu -> our SCP


async def test_echoscu_to_our_scp_succeeds():
    ae, requests = verification_scp()
    events = Events(ae)
    async with serving(ae) as server:
        result = await echoscu(server.port, "-aec", "OUR_SCP")
        assert result.returncode == 0, result
        assert "Received Echo Response (Success)" in result.text, result

        (assoc,) = await events.wait("released")
    assert len(requests) == 1
    assert assoc.peer_ae == "ECHOSCU"
    assert assoc.negotiated is not None
    assert (assoc.negotiated.peer_implementation_version or "").startswith("OFFIS_DCMTK")
    # echoscu proposes only implicit VR little endian unless told otherwise
    assert [(c.abstract_syntax, c.transfer_syntax) for c in assoc.accepted_contexts] == [
        (VERIFICATION, ImplicitVRLittleEndian)
    ]
    assert (assoc.negotiated.max_ops_invoked, assoc.negotiated.max_ops_performed) == (1, 1)
    assert events.seen["aborted"] == [] and events.seen["rejected"] == []


@pytest.mark.parametrize("log_operations", [False, True])
async def test_echo_success_answered_without_a_command_is_sent_and_counted_as_with_one(monkeypatch, log_operations):
    """Without a C-ECHO handler, the Success goes out from its encoded bytes alone
    (``answer_encoded``: no ``Command`` made) when nobody looks at the command: no
    DEBUG, no observer, operations not logged at INFO. With ``log_operations`` it takes
    ``answer`` with the ``Command``. Either way echoscu's 3 requests get the general
    encoder's bytes for the response, and the operations are counted, none unfinished.
    An acceptor that only answers makes no send lock and no window of requests it would
    invoke (made when first needed)."""
    from dimse_async.dimse import Command, encode_command, encode_pdata
    from dimse_async.messaging import DIMSEMessaging

    ae = da.AE("OUR_SCP", log_operations=log_operations)
    ae.add_supported_context(da.Verification)
    events = Events(ae)
    sent: list[bytes] = []

    @ae.on_association("accepted")
    def spy(assoc: Any) -> None:
        send_pdata = assoc.fsm.send_pdata
        assoc.fsm.send_pdata = lambda data: sent.append(bytes(data)) or send_pdata(data)

    answered = []
    answer = DIMSEMessaging.answer
    monkeypatch.setattr(DIMSEMessaging, "answer", lambda self, *a: answered.append(a) or answer(self, *a))
    async with serving(ae) as server:
        result = await echoscu(server.port, "-aec", "OUR_SCP", "--repeat", "3")
        assert result.returncode == 0, result
        assert result.text.count("Received Echo Response (Success)") == 3, result
        (assoc,) = await events.wait("released")
    assert len(answered) == (3 if log_operations else 0)
    context = assoc.context_for(VERIFICATION, as_scp=True).id
    assert len(sent) == 3
    for mid, pdu in enumerate(sent, 1):  # echoscu numbers its requests 1, 2, 3
        rsp = Command(0x8030, message_id_being_responded_to=mid, affected_sop_class_uid=VERIFICATION, status=0)
        assert pdu == encode_pdata(context, encode_command(rsp), True, 0)
    assert assoc.oplog.operations == {"C-ECHO": 3} and assoc.oplog.summary(0.0)["ops"] == "C-ECHO:3"
    assert "unfinished" not in assoc.oplog.summary(0.0)
    assert assoc._send_lock is None and assoc._window is None


async def test_echoscu_reads_our_association_ac():
    """echoscu's debug dump of our A-ASSOCIATE-AC: implementation identity and max PDU."""
    ae, _ = verification_scp(max_pdu=65536)
    async with serving(ae) as server:
        result = await echoscu(server.port, "-d", "-aec", "OUR_SCP")
    assert result.returncode == 0, result
    assert f"Their Implementation Class UID:    {IMPLEMENTATION_CLASS_UID}" in result.text, result
    assert f"Their Implementation Version Name: {IMPLEMENTATION_VERSION_NAME}" in result.text, result
    assert "Their Max PDU Receive Size:  65536" in result.text, result
    assert "Responding Application Name: OUR_SCP" in result.text, result


async def test_echoscu_repeat_runs_on_one_association():
    ae, requests = verification_scp()
    events = Events(ae)
    async with serving(ae) as server:
        result = await echoscu(server.port, "-aec", "OUR_SCP", "--repeat", "5")
        assert result.returncode == 0, result
        assert result.text.count("Received Echo Response (Success)") == 5, result
        await events.wait("released")
    assert len(requests) == 5
    assert len(events.seen["accepted"]) == 1
    assert {r.assoc for r in requests} == set(events.seen["accepted"])


async def test_echoscu_many_contexts_and_transfer_syntaxes():
    """128 presentation contexts (ids 1..255), each proposing 38 transfer syntaxes."""
    ae, requests = verification_scp()
    events = Events(ae)
    async with serving(ae) as server:
        result = await echoscu(server.port, "-aec", "OUR_SCP", "--propose-pc", "128", "--propose-ts", "38")
        assert result.returncode == 0, result
        (assoc,) = await events.wait("released")
    contexts = assoc.accepted_contexts
    assert [c.id for c in contexts] == list(range(1, 256, 2))
    # our preference order picks explicit VR little endian from the 38 offered
    assert {c.transfer_syntax for c in contexts} == {ExplicitVRLittleEndian}
    assert len(requests) == 1


async def test_echoscu_small_max_pdu_and_abort():
    ae, requests = verification_scp()
    events = Events(ae)
    async with serving(ae) as server:
        result = await echoscu(server.port, "-aec", "OUR_SCP", "--max-pdu", "4096", "--abort")
        assert result.returncode == 0, result
        assert "Aborting Association" in result.text, result
        (assoc,) = await events.wait("aborted")
    assert assoc.negotiated is not None and assoc.negotiated.peer_max_pdu == 4096
    assert "abort" in (assoc.end_reason or "")
    assert events.seen["released"] == []
    assert len(requests) == 1


async def test_echoscu_wrong_called_ae_is_rejected():
    ae, requests = verification_scp()
    events = Events(ae)
    async with serving(ae) as server:
        result = await echoscu(server.port, "-aec", "WRONG")
        await events.wait("rejected")
    assert result.returncode != 0, result
    assert "Association Rejected" in result.text, result
    assert "Rejected Permanent" in result.text, result
    assert "Called AE Title Not Recognized" in result.text, result
    assert requests == [] and events.seen["accepted"] == []


async def test_echoscu_any_called_ae_when_not_required():
    ae, requests = verification_scp(require_called_ae=False)
    async with serving(ae) as server:
        result = await echoscu(server.port, "-aec", "WHATEVER")
    assert result.returncode == 0, result
    assert len(requests) == 1


async def test_echoscu_calling_ae_allow_list():
    ae, requests = verification_scp(allowed_calling_aes=["GOOD_SCU"])
    async with serving(ae) as server:
        allowed = await echoscu(server.port, "-aec", "OUR_SCP", "-aet", "GOOD_SCU")
        refused = await echoscu(server.port, "-aec", "OUR_SCP", "-aet", "EVIL_SCU")
    assert allowed.returncode == 0, allowed
    assert refused.returncode != 0, refused
    assert "Association Rejected" in refused.text, refused
    assert "Calling AE Title Not Recognized" in refused.text, refused
    assert [r.assoc.peer_ae for r in requests] == ["GOOD_SCU"]


#: AE titles the AE VR allows (PS3.5 §6.2) that few peers use: punctuation, 16 characters.
ODD_TITLES = ["~!#$%&'()*+,-./:", "X" * 16, ";<=>?@[]^_`{|}"]


@pytest.mark.parametrize("title", ODD_TITLES)
async def test_echoscu_odd_but_valid_titles_are_accepted(title: str):
    """As calling title (matched exactly by an allow list) and as called title."""
    ae, requests = verification_scp("A~B C!", allowed_calling_aes=[title])
    async with serving(ae) as server:
        result = await echoscu(server.port, "-aec", "A~B C!", "-aet", title)
    assert result.returncode == 0, result
    assert [r.assoc.peer_ae for r in requests] == [title]
    ae, requests = verification_scp(title)
    async with serving(ae) as server:
        result = await echoscu(server.port, "-aec", title)
    assert result.returncode == 0, result


@pytest.mark.parametrize("title", ["BAD\tTAB", "BACK\\SLASH"])
async def test_echoscu_calling_title_the_ae_vr_forbids_is_rejected(title: str):
    """DCMTK sends such a title as given; we answer calling-AE-title-not-recognized."""
    ae, requests = verification_scp(require_called_ae=False)
    async with serving(ae) as server:
        result = await echoscu(server.port, "-aet", title)
    assert result.returncode != 0, result
    assert "Calling AE Title Not Recognized" in result.text, result
    assert requests == []


@pytest.mark.parametrize("title", ODD_TITLES)
async def test_pynetdicom_odd_but_valid_titles_are_accepted(title: str):
    ae, requests = verification_scp(title, allowed_calling_aes=[title])
    async with serving(ae) as server:
        seen = await asyncio.to_thread(pynetdicom_session, server.port, called=title, calling=title)
    assert seen["established"] and seen["echo_status"] == 0x0000, seen
    assert [r.assoc.peer_ae for r in requests] == [title]


async def test_echoscu_rejected_when_over_max_associations():
    """max_associations=1 while pynetdicom holds one: echoscu gets rejected-transient."""
    ae, _ = verification_scp(max_associations=1)
    events = Events(ae)

    def hold() -> Any:
        holder_ae = PynetdicomAE("HOLDER")
        holder_ae.acse_timeout = holder_ae.dimse_timeout = holder_ae.network_timeout = 10
        holder_ae.add_requested_context(VERIFICATION)
        return holder_ae.associate(HOST, server.port, ae_title="OUR_SCP")

    async with serving(ae) as server:
        holder = await asyncio.to_thread(hold)
        try:
            assert holder.is_established
            over = await echoscu(server.port, "-aec", "OUR_SCP")
        finally:
            if holder.is_established:
                await asyncio.to_thread(holder.release)
            if holder.is_alive():
                await asyncio.to_thread(holder.abort)
        await events.wait("released")
        again = await echoscu(server.port, "-aec", "OUR_SCP")
    assert over.returncode != 0, over
    assert "Rejected Transient" in over.text, over
    assert "Local Limit Exceeded" in over.text, over
    assert again.returncode == 0, again


async def test_findscu_reads_our_rejected_contexts():
    """All of findscu's contexts are unsupported: DCMTK must parse our per-context results."""
    ae, _ = verification_scp()
    events = Events(ae)
    async with serving(ae) as server:
        result = await run(
            dcmtk("findscu"), "-v", "-to", "10", "-ta", "10", "-S", "-aec", "OUR_SCP",
            "-k", "QueryRetrieveLevel=STUDY", HOST, str(server.port), env=DCMTK_ENV,
        )  # fmt: skip
        (assoc,) = await events.wait("accepted")
        await asyncio.wait_for(assoc.wait_closed(), WAIT)
    assert result.returncode != 0, result
    assert "No Acceptable Presentation Contexts" in result.text, result
    assert assoc.accepted_contexts == []
    assert assoc.rejected_contexts and {c.result for c in assoc.rejected_contexts} == {3}  # abstract syntax


@pytest.mark.parametrize("server_response", [None, b"ignored for passwords"])
async def test_storescu_user_identity_positive_response(tmp_path: Path, server_response: bytes | None):
    """DCMTK ``storescu --user --password --pos-response`` needs our User Identity AC sub-item.

    PS3.15 B.4: when a positive response is requested the acceptor returns the sub-item;
    PS3.7 D.3.3.7.2: for username/passcode its server response is zero length.
    """
    ae = da.AE("OUR_SCP")
    ae.add_supported_context(da.Verification)
    ae.add_supported_context(CT_IMAGE_STORAGE)
    events = Events(ae)
    identities: list[UserIdentityRQ] = []

    @ae.on_user_identity
    async def check(identity: UserIdentityRQ, assoc: da.Association) -> tuple[bool, bytes | None]:
        identities.append(identity)
        return (identity.primary == b"alice" and identity.secondary == b"s3cret", server_response)

    ct = write_ct_file(tmp_path / "ct.dcm")
    storescu = dcmtk("storescu")
    common = ["-v", "-to", "10", "-ta", "10", "-td", "10", "-aec", "OUR_SCP", "-usr", "alice", "-rsp"]
    async with serving(ae) as server:
        good = await run(storescu, *common, "-pwd", "s3cret", HOST, str(server.port), str(ct), env=DCMTK_ENV)
        bad = await run(storescu, *common, "-pwd", "guess", HOST, str(server.port), str(ct), env=DCMTK_ENV)
        (accepted,) = await events.wait("accepted")
        await events.wait("rejected")
    # The association is what is under test here, not the C-STORE that follows it.
    assert "Association Accepted" in good.text, good
    assert "User Identity Negotiation failed" not in good.text, good
    assert "Association Rejected" in bad.text, bad
    assert [(i.type, i.primary, i.secondary, i.positive_response_requested) for i in identities] == [
        (2, b"alice", b"s3cret", True),
        (2, b"alice", b"guess", True),
    ]
    assert accepted.negotiated is not None and accepted.negotiated.identity_response == b""


# ------------------------------------------------------------ 2. our SCU -> DCMTK storescp


async def test_c_echo_to_storescp(storescp: Peer):
    ae = da.AE("OUR_SCU")
    ae.add_requested_context(da.Verification)
    async with ae.associate(HOST, storescp.port, "STORESCP") as assoc:
        status = await assoc.c_echo()
        assert status.is_success
        neg = assoc.negotiated
        assert neg is not None
        assert (neg.peer_implementation_version or "").startswith("OFFIS_DCMTK")
        # we proposed a 16/16 window; DCMTK does not negotiate one, so it is synchronous
        assert (neg.max_ops_invoked, neg.max_ops_performed) == (1, 1)
        # five concurrent callers are serialised by the window of one, all succeed
        statuses = await asyncio.wait_for(asyncio.gather(*(assoc.c_echo() for _ in range(5))), WAIT)
        assert all(s.is_success for s in statuses)
    storescp.wait_output("Received Echo Request", count=6)
    assert assoc.is_closed and assoc.end_reason is None


async def test_c_echo_to_storescp_with_small_max_pdu(tmp_path: Path):
    with storescp_process(tmp_path, "--max-pdu", "4096") as peer:
        ae = da.AE("OUR_SCU", max_pdu=4096)
        ae.add_requested_context(da.Verification)
        async with ae.associate(HOST, peer.port, "STORESCP", async_ops=(1, 1)) as assoc:
            assert assoc.negotiated is not None and assoc.negotiated.peer_max_pdu == 4096
            assert (await assoc.c_echo()).is_success


async def test_storescp_declines_extended_negotiation_and_identity(storescp: Peer):
    """DCMTK's storescp does not answer role, extended or identity items; we see the defaults."""
    ae = da.AE("OUR_SCU")
    ae.add_requested_context(da.Verification, scu_role=True, scp_role=True)
    async with ae.associate(
        HOST,
        storescp.port,
        "STORESCP",
        identity=UserIdentityRQ(2, b"alice", b"s3cret", True),
        extended=[SOPClassExtended(VERIFICATION, b"\x01")],
    ) as assoc:
        neg = assoc.negotiated
        assert neg is not None
        assert neg.extended == {} and neg.identity_response is None
        (ctx,) = assoc.accepted_contexts
        assert (ctx.as_scu, ctx.as_scp) == (True, False)
        assert (await assoc.c_echo()).is_success


# ------------------------------------------------------------ 3. our SCU -> pynetdicom SCP


async def test_c_echo_to_pynetdicom(pynetdicom_scp: Callable[..., int]):
    callers: list[str] = []

    def on_echo(event: Any) -> int:
        callers.append(event.assoc.requestor.ae_title)
        return 0x0000

    port = pynetdicom_scp([(evt.EVT_C_ECHO, on_echo)])
    ae = da.AE("OUR_SCU")
    ae.add_requested_context(da.Verification)
    async with ae.associate(HOST, port, "PYNETDICOM") as assoc:
        assert (await assoc.c_echo()).is_success
        statuses = await asyncio.wait_for(asyncio.gather(*(assoc.c_echo() for _ in range(4))), WAIT)
        assert all(s.is_success for s in statuses)
        neg = assoc.negotiated
        assert neg is not None
        assert (neg.peer_implementation_version or "").startswith("PYNETDICOM")
        # no EVT_ASYNC_OPS handler: pynetdicom does not answer the window, so it is 1/1
        assert (neg.max_ops_invoked, neg.max_ops_performed) == (1, 1)
    assert callers == ["OUR_SCU"] * 5


async def test_negotiation_with_pynetdicom_scp(pynetdicom_scp: Callable[..., int]):
    """Async ops window, role selection, SOP class (common) extended and user identity (JWT)."""
    seen: dict[str, Any] = {}

    def on_user_id(event: Any) -> tuple[bool, bytes | None]:
        requested = event.assoc.requestor.user_identity
        seen["identity"] = (event.user_id_type, event.primary_field, requested.positive_response_requested)
        return event.primary_field == b"header.payload.sig", b"server-token"

    def on_extended(event: Any) -> dict[str, bytes]:
        seen["extended"] = dict(event.app_info)
        return {uid: info[::-1] for uid, info in event.app_info.items()}

    def on_common(event: Any) -> dict[str, Any]:
        seen["common"] = {
            uid: (item.service_class_uid, list(item.related_general_sop_class_identification))
            for uid, item in event.items.items()
        }
        return event.items

    def on_async_ops(event: Any) -> tuple[int, int]:
        seen["async_ops"] = (event.nr_invoked, event.nr_performed)
        return 1, 1

    def on_echo(event: Any) -> int:
        return 0x0000

    port = pynetdicom_scp(
        [
            (evt.EVT_USER_ID, on_user_id),
            (evt.EVT_SOP_EXTENDED, on_extended),
            (evt.EVT_SOP_COMMON, on_common),
            (evt.EVT_ASYNC_OPS, on_async_ops),
            (evt.EVT_C_ECHO, on_echo),
        ],
        scu_role=True,
        scp_role=True,
    )
    ae = da.AE("OUR_SCU")
    ae.add_requested_context(da.Verification, scu_role=True, scp_role=True)
    async with ae.associate(
        HOST,
        port,
        "PYNETDICOM",
        async_ops=(8, 4),
        identity=UserIdentityRQ(5, b"header.payload.sig", b"", True),
        extended=[SOPClassExtended(VERIFICATION, b"\x01\x02\x03")],
        common_extended=[SOPClassCommonExtended("1.2.3.4.5.6", STORAGE_SERVICE_CLASS, [CT_IMAGE_STORAGE])],
    ) as assoc:
        neg = assoc.negotiated
        assert neg is not None
        assert neg.identity_response == b"server-token"
        assert neg.extended == {VERIFICATION: b"\x03\x02\x01"}
        # pynetdicom always answers the window with 1/1 (it is synchronous)
        assert (neg.max_ops_invoked, neg.max_ops_performed) == (1, 1)
        (ctx,) = assoc.accepted_contexts
        assert (ctx.as_scu, ctx.as_scp) == (True, True)
        assert (await assoc.c_echo()).is_success
    assert seen == {
        "identity": (5, b"header.payload.sig", True),
        "extended": {VERIFICATION: b"\x01\x02\x03"},
        "common": {"1.2.3.4.5.6": (STORAGE_SERVICE_CLASS, [CT_IMAGE_STORAGE])},
        "async_ops": (8, 4),
    }


async def test_pynetdicom_scp_without_role_support_keeps_default_roles(pynetdicom_scp: Callable[..., int]):
    port = pynetdicom_scp()  # no roles configured: pynetdicom sends no role selection reply
    ae = da.AE("OUR_SCU")
    ae.add_requested_context(da.Verification, scu_role=True, scp_role=True)
    async with ae.associate(HOST, port, "PYNETDICOM") as assoc:
        (ctx,) = assoc.accepted_contexts
        assert (ctx.as_scu, ctx.as_scp) == (True, False)
        assert (await assoc.c_echo()).is_success


async def test_pynetdicom_scp_rejects_bad_identity(pynetdicom_scp: Callable[..., int]):
    port = pynetdicom_scp([(evt.EVT_USER_ID, lambda event: (event.secondary_field == b"s3cret", None))])
    ae = da.AE("OUR_SCU")
    ae.add_requested_context(da.Verification)
    with pytest.raises(da.AssociationRejected) as info:
        await ae.associate(HOST, port, "PYNETDICOM", identity=UserIdentityRQ(2, b"alice", b"guess", True))
    # pynetdicom's choice for a failed identity: rejected-transient, ACSE, no reason given
    assert (info.value.result, info.value.source, info.value.reason) == (2, 2, 1)
    async with ae.associate(HOST, port, "PYNETDICOM", identity=UserIdentityRQ(2, b"alice", b"s3cret")) as assoc:
        assert (await assoc.c_echo()).is_success


async def test_pynetdicom_scp_rejects_wrong_called_ae(pynetdicom_scp: Callable[..., int]):
    port = pynetdicom_scp(title="PYNETDICOM", require_called_aet=True)
    ae = da.AE("OUR_SCU")
    ae.add_requested_context(da.Verification)
    with pytest.raises(da.AssociationRejected) as info:
        await ae.associate(HOST, port, "WRONG")
    assert (info.value.result, info.value.source, info.value.reason) == (1, 1, 7)
    assert "called-AE-title-not-recognized" in str(info.value)


# ------------------------------------------------------------ 4. pynetdicom SCU -> our SCP


async def test_pynetdicom_echo_to_our_scp():
    ae, requests = verification_scp()
    async with serving(ae) as server:
        seen = await asyncio.to_thread(pynetdicom_session, server.port)
    assert seen["established"], seen
    assert seen["echo_status"] == 0x0000
    assert seen["implementation_class_uid"] == IMPLEMENTATION_CLASS_UID
    assert seen["implementation_version_name"] == IMPLEMENTATION_VERSION_NAME
    assert [r.assoc.peer_ae for r in requests] == ["PYNETDICOM_SCU"]


async def test_pynetdicom_sees_our_handler_status():
    ae = da.AE("OUR_SCP")
    ae.add_supported_context(da.Verification)

    @ae.on_c_echo
    async def refuse(request: da.Request) -> int:
        return 0x0211  # unrecognised operation

    async with serving(ae) as server:
        seen = await asyncio.to_thread(pynetdicom_session, server.port)
    assert seen["echo_status"] == 0x0211


async def test_pynetdicom_full_negotiation_with_our_scp():
    ae = da.AE("OUR_SCP", max_ops_invoked=2, max_ops_performed=4)
    ae.add_supported_context(da.Verification, scp_role=True)
    events = Events(ae)
    identities: list[UserIdentityRQ] = []
    extended: list[tuple[str, bytes]] = []
    common: list[SOPClassCommonExtended] = []

    @ae.on_user_identity
    async def check(identity: UserIdentityRQ, assoc: da.Association) -> tuple[bool, bytes | None]:
        identities.append(identity)
        await asyncio.sleep(0)  # a real authenticator awaits something
        return identity.primary == b"alice" and identity.secondary == b"s3cret", b"welcome"

    @ae.on_extended_negotiation
    def reply_extended(sop_class: str, info: bytes) -> bytes | None:
        extended.append((sop_class, info))
        return b"\x07" + info

    @ae.on_common_extended_negotiation
    def accept_common(item: SOPClassCommonExtended) -> bool:
        common.append(item)
        return True

    ext = SOPClassExtendedNegotiation()
    ext.sop_class_uid = VERIFICATION
    ext.service_class_application_information = b"\x01\x02"
    com = SOPClassCommonExtendedNegotiation()
    com.sop_class_uid = CT_IMAGE_STORAGE
    com.service_class_uid = STORAGE_SERVICE_CLASS
    com.related_general_sop_class_identification = ["1.2.840.10008.5.1.4.1.1.2.1"]
    window = AsynchronousOperationsWindowNegotiation()
    window.maximum_number_operations_invoked = 5
    window.maximum_number_operations_performed = 3
    items = [
        build_role(VERIFICATION, scu_role=True, scp_role=True),
        user_identity(2, b"alice", b"s3cret"),
        ext,
        com,
        window,
    ]

    async with serving(ae) as server:
        seen = await asyncio.to_thread(pynetdicom_session, server.port, ext_neg=items)
        (assoc,) = await events.wait("released")

    # what pynetdicom saw in our A-ASSOCIATE-AC
    assert seen["established"], seen
    assert seen["echo_status"] == 0x0000
    assert seen["roles"] == {VERIFICATION: (True, True)}
    assert seen["accepted"] == [(VERIFICATION, True, True)]
    assert seen["extended"] == {VERIFICATION: b"\x07\x01\x02"}
    # positive response requested: the sub-item is there, empty for username+passcode
    assert seen["identity"] == b""
    # requestor may invoke min(5, our performed 4), perform min(3, our invoked 2)
    assert seen["async_ops"] == (4, 2)

    # what our side negotiated
    neg = assoc.negotiated
    assert neg is not None
    assert (neg.max_ops_invoked, neg.max_ops_performed) == (2, 4)
    assert neg.extended == {VERIFICATION: b"\x07\x01\x02"}
    assert neg.common_extended == [
        SOPClassCommonExtended(CT_IMAGE_STORAGE, STORAGE_SERVICE_CLASS, ["1.2.840.10008.5.1.4.1.1.2.1"])
    ]
    assert neg.common_extended == common
    assert neg.identity == UserIdentityRQ(2, b"alice", b"s3cret", True) and identities == [neg.identity]
    assert extended == [(VERIFICATION, b"\x01\x02")]
    (ctx,) = assoc.accepted_contexts
    assert (ctx.as_scu, ctx.as_scp) == (True, True)
    assert (neg.peer_implementation_version or "").startswith("PYNETDICOM")


async def test_pynetdicom_jwt_identity_gets_our_server_response():
    ae, _ = verification_scp()

    @ae.on_user_identity
    async def check(identity: UserIdentityRQ, assoc: da.Association) -> tuple[bool, bytes | None]:
        return identity.type == 5 and identity.primary == b"a.b.c", b"server-jwt"

    async with serving(ae) as server:
        seen = await asyncio.to_thread(pynetdicom_session, server.port, ext_neg=[user_identity(5, b"a.b.c")])
    assert seen["established"], seen
    assert seen["identity"] == b"server-jwt"
    assert seen["echo_status"] == 0x0000


async def test_pynetdicom_wrong_password_is_rejected():
    ae, requests = verification_scp()
    events = Events(ae)

    @ae.on_user_identity
    async def check(identity: UserIdentityRQ, assoc: da.Association) -> tuple[bool, bytes | None]:
        return identity.secondary == b"s3cret", b"welcome"

    async with serving(ae) as server:
        seen = await asyncio.to_thread(pynetdicom_session, server.port, ext_neg=[user_identity(2, b"alice", b"guess")])
        (assoc,) = await events.wait("rejected")
    assert not seen["established"], seen
    assert seen["received"] == ["A_ASSOCIATE_RJ"], seen  # the only PDU it got: no A-ABORT
    assert seen["reject"] == (1, 1, 1)  # rejected-permanent, service-user, no-reason-given
    assert requests == []
    assert "rejected" in (assoc.end_reason or "")


async def test_pynetdicom_declined_extended_negotiation():
    """No reply to SOP class extended negotiation, common extended item refused."""
    ae, _ = verification_scp()
    ae.on_extended_negotiation(lambda sop_class, info: None)
    ae.on_common_extended_negotiation(lambda item: False)
    events = Events(ae)
    ext = SOPClassExtendedNegotiation()
    ext.sop_class_uid = VERIFICATION
    ext.service_class_application_information = b"\x01"
    com = SOPClassCommonExtendedNegotiation()
    com.sop_class_uid = CT_IMAGE_STORAGE
    com.service_class_uid = STORAGE_SERVICE_CLASS
    async with serving(ae) as server:
        seen = await asyncio.to_thread(pynetdicom_session, server.port, ext_neg=[ext, com])
        (assoc,) = await events.wait("accepted")
    assert seen["established"] and seen["extended"] == {}, seen
    assert assoc.negotiated is not None
    assert assoc.negotiated.extended == {} and assoc.negotiated.common_extended == []


async def test_pynetdicom_role_selection_limited_by_our_policy():
    ae, _ = verification_scp()  # default: the requestor may be SCU, not SCP
    async with serving(ae) as server:
        both = await asyncio.to_thread(
            pynetdicom_session, server.port, ext_neg=[build_role(VERIFICATION, scu_role=True, scp_role=True)],
            contexts=(VERIFICATION, CT_IMAGE_STORAGE),
        )  # fmt: skip
        scp_only = await asyncio.to_thread(
            pynetdicom_session, server.port, ext_neg=[build_role(VERIFICATION, scu_role=False, scp_role=True)]
        )
    assert both["established"], both
    assert both["roles"] == {VERIFICATION: (True, False)}
    assert both["accepted"] == [(VERIFICATION, True, False)]
    assert both["rejected"] == [(CT_IMAGE_STORAGE, 0x03)]  # abstract syntax not supported
    assert both["echo_status"] == 0x0000
    # the only role it asked for is refused: the context is rejected, pynetdicom gives up
    assert not scp_only["established"] and scp_only["aborted"], scp_only


# ------------------------------------------------------------ 5. the command line


async def test_cli_echo_to_storescp(storescp: Peer):
    result = await run(*CLI, "echo", HOST, str(storescp.port), "--aec", "STORESCP", "--repeat", "3", "--timeout", "10")
    assert result.returncode == 0, result
    assert "success" in result.stdout, result
    storescp.wait_output("Received Echo Request", count=3)


async def test_cli_echo_to_closed_port():
    port = free_port()  # nothing listens there
    result = await run(*CLI, "echo", HOST, str(port), "--timeout", "10")
    assert result.returncode == 3, result
    assert f"{HOST}:{port}" in result.stderr, result
    assert "Traceback" not in result.text, result


async def test_cli_echo_rejected_by_our_scp():
    ae, requests = verification_scp()
    async with serving(ae) as server:
        result = await run(*CLI, "echo", HOST, str(server.port), "--aec", "WRONG", "--timeout", "10")
    assert result.returncode == 4, result
    assert "called-AE-title-not-recognized" in result.stderr, result
    assert "Traceback" not in result.text, result
    assert requests == []


async def test_cli_echo_failure_status_from_pynetdicom(pynetdicom_scp: Callable[..., int]):
    port = pynetdicom_scp([(evt.EVT_C_ECHO, lambda event: 0x0211)])
    result = await run(*CLI, "echo", HOST, str(port), "--aec", "PYNETDICOM", "--timeout", "10")
    assert result.returncode == 1, result
    assert "Traceback" not in result.text, result


async def test_echoscu_to_cli_echo_scp(tmp_path: Path):
    port = free_port()
    argv = [*CLI, "echo-scp", "--host", HOST, "--port", str(port), "--aet", "CLI_SCP", "--require-called-ae"]
    with listening_process(argv, port, tmp_path / "echo-scp.log", {**os.environ, "PYTHONUNBUFFERED": "1"}) as peer:
        ok = await echoscu(port, "-aec", "CLI_SCP", "--repeat", "2")
        wrong = await echoscu(port, "-aec", "WRONG")
        assert peer.proc.poll() is None, peer.output()
    assert ok.returncode == 0, ok
    assert ok.text.count("Received Echo Response (Success)") == 2, ok
    assert wrong.returncode != 0, wrong
    assert "Called AE Title Not Recognized" in wrong.text, wrong
    # SIGTERM is a clean shutdown
    assert peer.proc.returncode == 0, peer.output()
    assert "listening" in peer.output()
