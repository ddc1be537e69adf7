"""The public API: what a handler or an application needs is importable from
``dimse_async``; transfer syntax presets; typed errors; per-call timeouts (against a
peer that accepts TCP and never answers, and against DCMTK ``storescp``)."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from pydicom.dataset import Dataset

import dimse_async as da

HOST = "127.0.0.1"


def test_everything_an_app_needs_is_exported() -> None:
    for name in da.__all__:
        assert getattr(da, name) is not None, name
    assert da.StoreRequest.__name__ == "StoreRequest"
    assert "1.2.840.10008.5.1.4.1.1.2" in da.STORAGE_SOP_CLASSES  # CT Image Storage
    assert da.STORE_TRANSFER_SYNTAXES[:2] == ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]
    assert da.QR_MODEL_NAMES == ("patient", "study", "patient-study", "worklist")
    assert da.QR_MODELS["study"]["find"] == "1.2.840.10008.5.1.4.1.2.2.1"
    assert callable(da.configure_logging)
    assert issubclass(da.InvalidAETitle, ValueError)
    assert issubclass(da.PoolClosed, da.AssociationError)


@pytest.mark.parametrize(
    ("preset", "expected"),
    [
        (None, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]),
        ("default", ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]),
        ("uncompressed", ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2"]),
        ("as-received", da.STORE_TRANSFER_SYNTAXES),
        ("1.2.840.10008.1.2.4.50", ["1.2.840.10008.1.2.4.50"]),
        (["1.2.840.10008.1.2"], ["1.2.840.10008.1.2"]),
    ],
)
def test_transfer_syntax_presets(preset: object, expected: list[str]) -> None:
    ae = da.AE("PRESETS")
    ae.add_supported_context(da.Verification, preset)  # type: ignore[arg-type]
    ae.add_requested_context(da.Verification, preset)  # type: ignore[arg-type]
    assert ae.supported_contexts[da.Verification].transfer_syntaxes == list(expected)
    assert ae.requested_contexts[0].transfer_syntaxes == list(expected)


@pytest.mark.parametrize("bad", ["compressed", []])
def test_unknown_preset_or_empty_list_is_a_value_error(bad: object) -> None:
    with pytest.raises(ValueError, match=r"preset|no transfer syntaxes"):
        da.AE("X").add_supported_context(da.Verification, bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("title", ["", "A" * 17, "BACK\\SLASH", "TAB\tX"])
def test_invalid_ae_titles_raise_the_typed_error(title: str) -> None:
    with pytest.raises(da.InvalidAETitle):
        da.AE(title)
    ae = da.AE("OK")
    ae.add_requested_context(da.Verification)
    with pytest.raises(da.InvalidAETitle):
        ae.associate(HOST, 104, title)


async def test_associate_timeout_per_call_overrides_the_ae() -> None:
    """A peer that accepts TCP and never answers: the per-call timeout decides."""
    ae = da.AE("SCU", acse_timeout=30)
    ae.add_requested_context(da.Verification)
    with socket.socket() as silent:
        silent.bind((HOST, 0))
        silent.listen()
        started = time.monotonic()
        with pytest.raises(da.AssociationTimeout, match=r"0\.3 s"):
            await ae.associate(HOST, silent.getsockname()[1], "SILENT", timeout=0.3)
        assert time.monotonic() - started < 5


async def test_dimse_call_timeout_per_call_overrides_the_ae() -> None:
    """An SCP whose C-ECHO handler takes 10 s: ``c_echo(timeout=0.3)`` gives up after
    0.3 s although the AE allows 30 s, and the association is aborted (PS3.7 does not
    let a request be abandoned otherwise)."""
    scp = da.AE("SLOW")
    scp.add_supported_context(da.Verification)

    @scp.on_c_echo
    async def slow(request):  # type: ignore[no-untyped-def]
        await asyncio.sleep(10)
        return 0

    server = await scp.start_server(HOST, 0)
    async with server:
        ae = da.AE("SCU", dimse_timeout=30)
        ae.add_requested_context(da.Verification)
        assoc = await ae.associate(HOST, server.port, "SLOW", timeout=10)
        started = time.monotonic()
        with pytest.raises(da.AssociationTimeout, match=r"0\.3 s"):
            await assoc.c_echo(timeout=0.3)
        assert time.monotonic() - started < 5
        await asyncio.wait_for(assoc.wait_closed(), 10)


async def test_c_find_timeout_per_call_overrides_the_ae() -> None:
    """A C-FIND SCP that sends nothing for 10 s: ``c_find(timeout=0.3)`` gives up after
    0.3 s (the AE allows 30 s) with AssociationTimeout; the association is aborted."""
    scp = da.AE("SLOWFIND")
    scp.add_supported_context(da.QR_MODELS["study"]["find"])

    @scp.on_c_find
    async def slow(request):  # type: ignore[no-untyped-def]
        await asyncio.sleep(10)
        yield request.identifier

    server = await scp.start_server(HOST, 0)
    async with server:
        ae = da.AE("SCU", dimse_timeout=30)
        ae.add_requested_context(da.QR_MODELS["study"]["find"])
        assoc = await ae.associate(HOST, server.port, "SLOWFIND", timeout=10)
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = ""
        started = time.monotonic()
        with pytest.raises(da.AssociationTimeout):
            async with assoc.c_find(query, timeout=0.3) as responses:
                async for _ in responses:
                    pass
        assert time.monotonic() - started < 5
        await asyncio.wait_for(assoc.wait_closed(), 10)
