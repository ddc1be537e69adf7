"""The normalized services of the real ``dimse-async serve`` process, configured by its
TOML file: storage commitment asked by the ``dimse-async commit`` CLI (report on a new
association to the CLI's listening port), MPPS from a pynetdicom SCU, the step then
listed from the archive's MPPS store; bad config values refused at start."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import communicate, free_port, stop_process, wait_tcp
from normalized_helpers import HOST, make_instances, park, store
from pydicom.uid import generate_uid
from pynetdicom import AE as PynetdicomAE

from dimse_async.archive.mpps import MPPS, MPPSStore, mpps_create_dataset, mpps_final_dataset

WAIT = 30.0
ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def _mpps(port: int) -> list[int]:
    ae = PynetdicomAE("MODALITY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(MPPS)
    assoc = ae.associate(HOST, port, ae_title="ARCHIVE")
    assert assoc.is_established
    uid = "1.2.826.0.1.3680043.10.1.42"
    try:
        park(assoc)
        created = assoc.send_n_create(
            mpps_create_dataset("P9", "X^Y", generate_uid(), "DX", "S9", "STATION1"), MPPS, uid
        )[0]
        end = mpps_final_dataset("DISCONTINUED")
        park(assoc)
        ended = assoc.send_n_set(end, MPPS, uid)[0]
        park(assoc)
        again = assoc.send_n_set(end, MPPS, uid)[0]
    finally:
        assoc.release()
    return [int(created.Status), int(ended.Status), int(again.Status)]


async def test_serve_process_commitment_cli_and_mpps(tmp_path: Path) -> None:
    port, listen = free_port(), free_port()
    storage = tmp_path / "archive"
    config = tmp_path / "serve.toml"
    config.write_text(
        f'ae_title = "ARCHIVE"\nport = {port}\nstorage_dir = "{storage}"\nfsync = false\n'
        "storage_commitment = true\ncommitment_same_association = false\n"
        "commitment_retries = 1\ncommitment_retry_interval = 0.2\nmpps = true\n"
        f'[known_aes]\nCLI_SCU = {{ host = "{HOST}", port = {listen} }}\n'
    )
    log = tmp_path / "serve.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dimse_async", "serve", "--config", str(config), "--log-level", "INFO"],
            stdout=sink, stderr=subprocess.STDOUT, env=ENV, start_new_session=True,
        )  # fmt: skip
    try:
        await asyncio.to_thread(wait_tcp, proc, port, log)
        files = make_instances(tmp_path / "in", 2)
        await store(port, [p for p, _c, _i in files])
        code, out, err = await communicate(
            (sys.executable, "-m", "dimse_async", "commit", HOST, str(port), *(str(p) for p, _c, _i in files),
             "--aet", "CLI_SCU", "--aec", "ARCHIVE", "--listen-port", str(listen), "--timeout", "20", "--json"),
            env=ENV, timeout=WAIT,
        )  # fmt: skip
        assert code == 0, err
        doc = json.loads(out)
        assert doc["outcome"] == "committed" and len(doc["committed"]) == 2 and not doc["same_association"]
        statuses = await asyncio.wait_for(asyncio.to_thread(_mpps, port), WAIT)
        assert statuses == [0x0000, 0x0000, 0x0110]
        # The performed step, as the archive's MPPS store lists it.
        listing = MPPSStore(storage)
        try:
            (step,) = await listing.find(status="DISCONTINUED")
        finally:
            listing.close()
        assert step.SOPInstanceUID == "1.2.826.0.1.3680043.10.1.42" and step.Modality == "DX"
    finally:
        assert stop_process(proc) == 0, log.read_text(errors="replace")
    text = log.read_text(errors="replace")
    assert "storage commitment " in text and f"transaction_uid={doc['transaction_uid']}" in text
    assert "MPPS created" in text and "MPPS updated" in text


async def test_serve_refuses_bad_normalized_settings(tmp_path: Path) -> None:
    for line, message in (
        ("ian_destinations = 'RIS'", "ian_destinations must be a list"),
        ("commitment_retries = 'many'", "commitment_retries must be of type int"),
        ("mpps = 1", "mpps must be of type bool"),
    ):
        config = tmp_path / "bad.toml"
        config.write_text(f'storage_dir = "{tmp_path / "a"}"\n{line}\n')
        code, _out, err = await communicate(
            (sys.executable, "-m", "dimse_async", "serve", "--config", str(config)), env=ENV, timeout=WAIT
        )
        assert code == 2 and message in err, (line, err)
