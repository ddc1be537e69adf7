"""TLS interop with DCMTK (built with OpenSSL): ``echoscu``/``storescu +tls`` against our
SCP and our SCU/CLI against ``storescp +tls``, mutual TLS included (PS3.15 B.9)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import communicate, dcmtk, free_port, stop_process, wait_tcp
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from test_tls import Certs, make_certs

import dimse_async as da
from dimse_async import tls

pytestmark = [pytest.mark.interop, pytest.mark.timeout(90)]

HOST = "127.0.0.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
_SCRIPT = Path(sys.executable).with_name("dimse-async")
CLI: list[str] = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "dimse_async"]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


def make_instances(folder: Path, count: int) -> list[Path]:
    """Small CT Image Storage instances (Part 10, explicit VR little endian)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    study, series = generate_uid(), generate_uid()
    for i in range(count):
        ds = Dataset()
        ds.SOPClassUID = CT
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.PatientID, ds.PatientName, ds.Modality, ds.InstanceNumber = "TLS1", "Secure^Sam", "CT", i + 1
        ds.Rows = ds.Columns = 8
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.PixelData = bytes(range(128))
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CT
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"ct{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def tls_client_args(certs: Certs, *, with_cert: bool = True) -> list[str]:
    """DCMTK client options: our client certificate (or anonymous) and the CA."""
    own = ["+tls", str(certs.client_key), str(certs.client_cert)] if with_cert else ["+tla"]
    return [*own, "-pw", "+cf", str(certs.ca)]


@contextlib.contextmanager
def process(argv: list[str], port: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=DCMTK_ENV, start_new_session=True)
    try:
        wait_tcp(proc, port, log)
        yield proc
    finally:
        stop_process(proc)


@contextlib.contextmanager
def storescp_tls(certs: Certs, workdir: Path) -> Iterator[tuple[int, Path, Path]]:
    """DCMTK ``storescp +tls`` requiring a client certificate signed by our CA."""
    port, out, log = free_port(), workdir / "storescp-in", workdir / "storescp.log"
    out.mkdir()
    argv = [
        dcmtk("storescp"), "-v", "--aetitle", "STORESCP", "-od", str(out),
        "+tls", str(certs.server_key), str(certs.server_cert), "-pw", "+cf", str(certs.ca), "-rc", str(port),
    ]  # fmt: skip
    with process(argv, port, log):
        yield port, out, log


def our_scp(seen: list[da.Request]) -> da.AE:
    ae = da.AE("OUR_TLS", network_timeout=20)
    ae.add_supported_context(da.Verification)
    ae.add_supported_context(CT)

    @ae.on_c_echo
    async def echo(request: da.Request) -> int:
        seen.append(request)
        return 0

    @ae.on_c_store
    async def store(request: da.Request) -> int:
        seen.append(request)
        return 0

    return ae


async def test_echoscu_mutual_tls_to_our_scp(certs: Certs):
    seen: list[da.Request] = []
    ctx = tls.server_context(
        str(certs.server_cert), str(certs.server_key), cafile=str(certs.ca), require_client_cert=True
    )
    async with await our_scp(seen).start_server(HOST, 0, ssl=ctx) as server:
        argv = (dcmtk("echoscu"), "-v", "-aec", "OUR_TLS", *tls_client_args(certs), HOST, str(server.port))
        code, out, _ = await communicate(argv, env=DCMTK_ENV, merge_stderr=True)
        assert code == 0, out
        assert "Received Echo Response (Success)" in out
        # Without a client certificate our SCP refuses the handshake.
        argv = (dcmtk("echoscu"), "-aec", "OUR_TLS", *tls_client_args(certs, with_cert=False), HOST, str(server.port))
        code, out, _ = await communicate(argv, env=DCMTK_ENV, merge_stderr=True)
        assert code != 0, out
    assert len(seen) == 1
    assert seen[0].assoc.tls is not None
    assert seen[0].assoc.tls.peer_subject == "CN=CT1,OU=CT,O=Radiology"
    assert seen[0].assoc.peer_ae == "ECHOSCU"


async def test_storescu_tls_to_our_store_scp_cli(certs: Certs, tmp_path: Path):
    files = make_instances(tmp_path / "send", 5)
    port, out = free_port(), tmp_path / "in"
    argv = [
        *CLI, "store-scp", "--host", HOST, "--port", str(port), "--out", str(out), "--aet", "OUR_TLS",
        "--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key), "--tls-ca", str(certs.ca),
        "--tls-require-client-cert",
    ]  # fmt: skip
    with process(argv, port, tmp_path / "scp.log"):
        send = (dcmtk("storescu"), "-aec", "OUR_TLS", *tls_client_args(certs), HOST, str(port), *map(str, files))
        code, text, _ = await communicate(send, env=DCMTK_ENV, merge_stderr=True)
        assert code == 0, text
    stored = sorted(p.name for p in out.rglob("*.dcm"))
    assert len(stored) == 5, (stored, (tmp_path / "scp.log").read_text())
    log = (tmp_path / "scp.log").read_text()
    assert "CN=CT1,OU=CT,O=Radiology" in log  # the client subject is in the association's log line


async def test_our_scu_mutual_tls_to_storescp(certs: Certs, tmp_path: Path):
    files = make_instances(tmp_path / "send", 3)
    with storescp_tls(certs, tmp_path) as (port, received, _log):
        ae = da.AE("OUR_SCU", connect_timeout=10, acse_timeout=10, dimse_timeout=10)
        ae.add_requested_context(da.Verification)
        ae.add_requested_context(CT, [ExplicitVRLittleEndian])
        ctx = tls.client_context(str(certs.ca), certfile=str(certs.client_cert), keyfile=str(certs.client_key))
        async with ae.associate(HOST, port, "STORESCP", ssl=ctx) as assoc:
            assert assoc.tls is not None and assoc.tls.version in ("TLSv1.2", "TLSv1.3")
            assert (await assoc.c_echo()).is_success
            for path in files:
                assert (await assoc.c_store(path)).is_success
        assert len(list(received.iterdir())) == 3
        # storescp -rc: an SCU without a client certificate does not get an association.
        with pytest.raises((da.ConnectionFailed, da.AssociationAborted)):
            async with ae.associate(HOST, port, "STORESCP", ssl=tls.client_context(str(certs.ca))) as assoc:
                await assoc.c_echo()


async def test_cli_echo_send_and_check_over_tls_to_storescp(certs: Certs, tmp_path: Path):
    files = make_instances(tmp_path / "send", 4)
    client = ["--tls-ca", str(certs.ca), "--tls-cert", str(certs.client_cert), "--tls-key", str(certs.client_key)]
    with storescp_tls(certs, tmp_path) as (port, received, _log):
        code, out, err = await communicate((*CLI, "echo", HOST, str(port), "--aec", "STORESCP", *client))
        assert code == 0, out + err
        code, out, err = await communicate(
            (*CLI, "send", HOST, str(port), *map(str, files), "--aec", "STORESCP", *client)
        )
        assert code == 0, out + err
        assert len(list(received.iterdir())) == 4
        code, out, err = await communicate((*CLI, "check", HOST, str(port), "--aec", "STORESCP", "--json", *client))
        report = json.loads(out)
        assert code == 0 and report["tls"]["version"] in ("TLSv1.2", "TLSv1.3"), out + err
        assert report["tls"]["server_subject"] and report["timings_ms"]["connect"] is not None
        # A server we cannot verify: connection error (exit 3), not a hang.
        code, out, err = await communicate(
            (*CLI, "echo", HOST, str(port), "--aec", "STORESCP", "--tls-ca", str(certs.other_ca))
        )
        assert code == 3 and "certificate verify failed" in err, out + err


async def test_serve_tls_from_its_toml_file(certs: Certs, tmp_path: Path):
    """``serve`` configured for mutual TLS by its TOML file: DCMTK echoscu and our
    ``check`` get through with client certificates; a client without one does not."""
    port = free_port()
    config = tmp_path / "serve.toml"
    config.write_text(
        f"""
ae_title = "ARCHIVE"
host = "{HOST}"
port = {port}
storage_dir = "{tmp_path / "archive"}"
tls_cert = "{certs.server_cert}"
tls_key = "{certs.server_key}"
tls_ca = "{certs.ca}"
tls_require_client_cert = true
tls_handshake_timeout = 5
"""
    )
    with process([*CLI, "serve", "--config", str(config)], port, tmp_path / "serve.log"):
        argv = (dcmtk("echoscu"), "-aec", "ARCHIVE", *tls_client_args(certs), HOST, str(port))
        code, out, _ = await communicate(argv, env=DCMTK_ENV, merge_stderr=True)
        assert code == 0, out
        client = ["--tls-ca", str(certs.ca), "--tls-cert", str(certs.client_cert), "--tls-key", str(certs.client_key)]
        code, out, err = await communicate((*CLI, "check", HOST, str(port), "--aec", "ARCHIVE", "--json", *client))
        assert code == 0 and json.loads(out)["tls"]["version"].startswith("TLSv1."), out + err
        code, out, err = await communicate(
            (*CLI, "check", HOST, str(port), "--aec", "ARCHIVE", "--json", "--tls-ca", str(certs.ca))
        )
        assert code == 2 and json.loads(out)["association"]["accepted"] is False, out + err
    log = (tmp_path / "serve.log").read_text()
    assert "(TLS)" in log and "TLS handshake failed" in log


async def test_expired_stranger_and_plain_clients_are_refused_and_logged(certs: Certs, tmp_path: Path):
    """Our SCP requiring client certificates, against DCMTK echoscu with an expired
    certificate from our CA, one from another CA, and no TLS at all: each is refused at
    the handshake at once (no association, no hang), with a warning naming why (for the
    client without TLS: that it was not TLS); a good client right after is served."""
    import datetime
    import logging

    import trustme

    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=2)
    ca = trustme.CA()
    server = ca.issue_cert("localhost", HOST)
    expired = ca.issue_cert(
        "old.example.org", common_name="OLD", not_before=past - datetime.timedelta(days=30), not_after=past
    )
    files = {}
    for name, blob in (("ca", ca.cert_pem), ("server", server.cert_chain_pems[0]), ("server-key", server.private_key_pem),
                       ("expired", expired.cert_chain_pems[0]), ("expired-key", expired.private_key_pem)):  # fmt: skip
        files[name] = tmp_path / f"{name}.pem"
        blob.write_to_path(files[name])
    good = ca.issue_cert("ct1.example.org", common_name="CT1")
    good.cert_chain_pems[0].write_to_path(tmp_path / "good.pem")
    good.private_key_pem.write_to_path(tmp_path / "good-key.pem")
    ctx = tls.server_context(
        str(files["server"]), str(files["server-key"]), cafile=str(files["ca"]), require_client_cert=True
    )
    seen: list[da.Request] = []
    warnings: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:
                warnings.append(record.getMessage())

    handler = Capture()
    logging.getLogger("dimse_async").addHandler(handler)
    try:
        async with await our_scp(seen).start_server(HOST, 0, ssl=ctx, ssl_handshake_timeout=5) as scp:
            base = (dcmtk("echoscu"), "-aec", "OUR_TLS", "-to", "10", "-ta", "10", "-td", "10")
            tail = (HOST, str(scp.port))
            clients = {
                "expired": ("+tls", str(files["expired-key"]), str(files["expired"]), "-pw", "+cf", str(files["ca"])),
                "stranger": ("+tls", str(certs.other_client_key), str(certs.other_client_cert), "-pw", "+cf", str(files["ca"])),
                "plain": (),
            }  # fmt: skip
            for name, options in clients.items():
                code, out, _ = await communicate((*base, *options, *tail), env=DCMTK_ENV, merge_stderr=True, timeout=10)
                assert code != 0, (name, out)
            good = ("+tls", str(tmp_path / "good-key.pem"), str(tmp_path / "good.pem"), "-pw", "+cf", str(files["ca"]))
            code, out, _ = await communicate((*base, *good, *tail), env=DCMTK_ENV, merge_stderr=True)
            assert code == 0, out
    finally:
        logging.getLogger("dimse_async").removeHandler(handler)
    assert (
        len(seen) == 1
        and seen[0].assoc.tls is not None
        and (seen[0].assoc.tls.peer_subject or "").startswith("CN=CT1,")
    )
    refusals = [w for w in warnings if w.startswith("connection refused")]
    assert len(refusals) == 3, warnings
    assert "certificate has expired" in refusals[0], refusals[0]
    assert "unable to get local issuer certificate" in refusals[1], refusals[1]
    assert "WRONG_VERSION_NUMBER (not TLS: a client without TLS on this TLS port?)" in refusals[2], refusals[2]
