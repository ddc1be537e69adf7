"""examples/aiohttp_app.py, run for real: ``python examples/aiohttp_app.py`` in a subprocess.

The app embeds a dimse_async Verification SCP in an aiohttp application's lifespan.
These tests start it on free ports, echo it with our SCU and with DCMTK's echoscu while
asking ``GET /stats`` at the same time, and stop it with SIGTERM, which must shut both
servers down cleanly (exit status 0) and let open associations finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import dcmtk, free_port

from dimse_async import AE, Verification

HOST = "127.0.0.1"
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "aiohttp_app.py"
AET = "EXAMPLE_SCP"
STARTUP_TIMEOUT = 20.0


class App:
    """The example app running as a subprocess, with its ports and log."""

    def __init__(self, proc: asyncio.subprocess.Process, http_port: int, dicom_port: int, log: Path):
        self.proc, self.http_port, self.dicom_port, self.log = proc, http_port, dicom_port, log
        self.signalled = False

    def sigterm(self) -> None:
        # Once only: aiohttp treats a second SIGTERM during shutdown as "exit now" (status 1).
        if not self.signalled and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            self.signalled = True

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    async def wait_listening(self) -> None:
        """Bounded retries until both ports accept connections (or the app dies)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STARTUP_TIMEOUT
        pending = {self.dicom_port, self.http_port}
        while pending:
            if self.proc.returncode is not None:
                pytest.fail(f"the app exited with {self.proc.returncode} during startup:\n{self.output()}")
            if loop.time() > deadline:
                pytest.fail(f"ports {sorted(pending)} not listening after {STARTUP_TIMEOUT} s:\n{self.output()}")
            for port in list(pending):
                try:
                    _, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), 1)
                except (OSError, TimeoutError):
                    continue
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
                pending.discard(port)
            if pending:
                await asyncio.sleep(0.1)

    async def stats(self, http: aiohttp.ClientSession) -> dict[str, Any]:
        async with http.get(f"http://{HOST}:{self.http_port}/stats") as response:
            assert response.status == 200, await response.text()
            assert response.content_type == "application/json"
            return await response.json()

    async def wait_stats(
        self, http: aiohttp.ClientSession, predicate: Callable[[dict[str, Any]], bool], timeout: float = 5.0
    ) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            stats = await self.stats(http)
            if predicate(stats):
                return stats
            if loop.time() > deadline:
                pytest.fail(f"stats never matched within {timeout} s: {stats}")
            await asyncio.sleep(0.05)

    async def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM, wait (bounded), SIGKILL if it hangs; returns the exit status."""
        if self.proc.returncode is None:
            self.sigterm()
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
                pytest.fail(f"the app ignored SIGTERM for {timeout} s and was killed:\n{self.output()}")
        assert self.proc.returncode is not None
        return self.proc.returncode


@contextlib.asynccontextmanager
async def running_app(tmp_path: Path, *, grace: float = 5.0) -> AsyncIterator[App]:
    http_port = free_port()
    dicom_port = free_port()
    while dicom_port == http_port:
        dicom_port = free_port()
    log = tmp_path / "app.log"
    env = {**os.environ, "DICOM_AET": AET, "SHUTDOWN_GRACE": str(grace), "LOG_LEVEL": "INFO"}
    with log.open("wb") as sink:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(EXAMPLE),
            str(http_port),
            str(dicom_port),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=sink,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
        )
    app = App(proc, http_port, dicom_port, log)
    try:
        await app.wait_listening()
        yield app
    finally:
        if proc.returncode is None:
            proc.kill()
            await asyncio.wait_for(proc.wait(), 10)


def scu(ae_title: str = "EXAMPLE_TEST") -> AE:
    ae = AE(ae_title, connect_timeout=5, acse_timeout=5, dimse_timeout=5, network_timeout=None)
    ae.add_requested_context(Verification)
    return ae


def client_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))


@pytest.mark.interop
async def test_example_app_answers_c_echo_and_http_concurrently(tmp_path: Path) -> None:
    echoscu = dcmtk("echoscu")
    async with running_app(tmp_path) as app:
        async with client_session() as http:
            idle = await app.wait_stats(http, lambda s: s["open_associations"] == 0)  # startup probes are gone
            assert idle["echoes"] == 0 and idle["dicom_port"] == app.dicom_port and idle["ae_title"] == AET

            # Our SCU: a C-ECHO and GET /stats at the same time, on one event loop.
            async with scu("EXAMPLE_TEST").associate(HOST, app.dicom_port, called_ae=AET) as assoc:
                status, during = await asyncio.wait_for(asyncio.gather(assoc.c_echo(), app.stats(http)), 10)
                assert int(status) == 0x0000
                assert during["open_associations"] == 1
                assert during["echoes"] in (0, 1)
                after = await app.stats(http)
                assert (after["echoes"], after["open_associations"], after["last_calling_ae"]) == (1, 1, "EXAMPLE_TEST")
            await app.wait_stats(http, lambda s: s["open_associations"] == 0)

            # DCMTK's echoscu, an independent implementation, while we ask for stats again.
            proc = await asyncio.create_subprocess_exec(
                echoscu,
                "-aet",
                "DCMTK_ECHOSCU",
                "-aec",
                AET,
                "-to",
                "5",
                "-ta",
                "5",
                "-td",
                "5",
                HOST,
                str(app.dicom_port),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            try:
                (out, _), during = await asyncio.wait_for(asyncio.gather(proc.communicate(), app.stats(http)), 20)
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            assert proc.returncode == 0, out.decode(errors="replace")
            assert during["echoes"] in (1, 2)
            final = await app.wait_stats(http, lambda s: s["open_associations"] == 0)
            assert (final["echoes"], final["last_calling_ae"]) == (2, "DCMTK_ECHOSCU")

        assert await app.terminate() == 0, app.output()
    log = app.output()
    assert "DICOM server closed" in log, log
    assert "Traceback" not in log, log


async def test_sigterm_lets_an_open_association_finish(tmp_path: Path) -> None:
    grace = 20.0
    loop = asyncio.get_running_loop()
    async with running_app(tmp_path, grace=grace) as app:
        assoc = await asyncio.wait_for(scu().associate(HOST, app.dicom_port, called_ae=AET), 5)
        try:
            app.sigterm()

            # The DICOM server stops listening ...
            async def refused() -> bool:
                try:
                    _, writer = await asyncio.open_connection(HOST, app.dicom_port)
                except OSError:
                    return True
                writer.close()
                return False

            deadline = loop.time() + 10
            while not await refused():
                assert loop.time() < deadline, f"still accepting connections after SIGTERM:\n{app.output()}"
                await asyncio.sleep(0.05)
            assert app.proc.returncode is None, app.output()

            # ... but the association already open still works during the grace period.
            assert int(await asyncio.wait_for(assoc.c_echo(), 5)) == 0x0000
        finally:
            if assoc.is_established:
                await asyncio.wait_for(assoc.release(), 5)
        released = loop.time()
        # Once it is released the app exits at once, not at the end of the grace period.
        assert await app.terminate(timeout=grace / 2) == 0, app.output()
        assert loop.time() - released < grace / 2
    assert "Traceback" not in app.output(), app.output()


def test_ports_come_from_argv_or_environment() -> None:
    spec = importlib.util.spec_from_file_location("aiohttp_app_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = example  # dataclasses resolve annotations through sys.modules
    try:
        spec.loader.exec_module(example)
    finally:
        del sys.modules[spec.name]

    env = {"HTTP_PORT": "8001", "DICOM_PORT": "11001", "DICOM_AET": "ENV_AET", "HOST": "127.0.0.2"}
    from_env = example.settings_from([], env)
    assert (from_env.http_port, from_env.dicom_port, from_env.ae_title, from_env.host) == (
        8001,
        11001,
        "ENV_AET",
        "127.0.0.2",
    )
    from_argv = example.settings_from(["9001", "12001"], env)
    assert (from_argv.http_port, from_argv.dicom_port) == (9001, 12001)
    defaults = example.settings_from([], {})
    assert (defaults.http_port, defaults.dicom_port) == (8080, 11112)
    with pytest.raises(SystemExit):
        example.settings_from(["not-a-port"], {})
