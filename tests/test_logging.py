"""Logging as a library: silent until the application opts in, routed through stdlib
``logging`` under ``dimse_async``; one INFO line per association and per failed
operation; DEBUG lines per successful operation; ``configure_logging`` leaves the
host's structlog and root logger alone and captures warnings as structured lines.

Each scenario runs in a fresh interpreter (the host application), so nothing the test
process configured leaks in; the association is real (our SCU and SCP on loopback, and
DCMTK ``echoscu``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import dcmtk, free_port, stop_process

ROOT = Path(__file__).resolve().parent.parent


def run_host(code: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
        check=False,
    )


# A small DICOM exchange used by the host apps: an SCP storing into memory (one
# instance refused with 0xA700) and an SCU echoing and storing two instances.
EXCHANGE = """
import asyncio
import dimse_async as da
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid, ExplicitVRLittleEndian

CT = "1.2.840.10008.5.1.4.1.1.2"

def instance(uid):
    ds = Dataset()
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = uid
    ds.PatientName = "LOG^TEST"
    ds.file_meta = Dataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds

async def exchange():
    scp = da.AE("LOGSCP")
    scp.add_supported_context(da.Verification)
    scp.add_supported_context(CT)

    @scp.on_c_store
    async def store(request):
        return 0xA700 if request.sop_instance_uid.endswith(".9") else 0x0000

    server = await scp.start_server("127.0.0.1", 0)
    scu = da.AE("LOGSCU")
    scu.add_requested_context(da.Verification)
    scu.add_requested_context(CT)
    async with scu.associate("127.0.0.1", server.port, "LOGSCP") as assoc:
        await assoc.c_echo()
        await assoc.c_store(instance("1.2.3.4.1"))
        await assoc.c_store(instance("1.2.3.4.9"))
    server.close()
    await server.wait_closed(grace=5)
"""


def test_host_app_with_stdlib_logging_gets_the_lines_and_stdout_stays_empty(tmp_path: Path) -> None:
    """A host application with its own ``logging.config.dictConfig`` (as uvicorn or
    gunicorn have) receives our lines through its handler; nothing goes to stdout."""
    log_file = tmp_path / "app.log"
    code = f"""
        import logging, logging.config
        logging.config.dictConfig({{
            "version": 1,
            "formatters": {{"app": {{"format": "APP %(levelname)s %(name)s %(message)s"}}}},
            "handlers": {{"file": {{"class": "logging.FileHandler", "filename": {str(log_file)!r},
                                    "formatter": "app"}}}},
            "root": {{"level": "DEBUG", "handlers": ["file"]}},
        }})
        {textwrap.indent(EXCHANGE, "        ").strip()}
        asyncio.run(exchange())
    """
    done = run_host(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert done.stderr == ""
    lines = log_file.read_text().splitlines()
    ours = [line for line in lines if " dimse_async" in line]
    assert ours, lines
    assert all(line.startswith("APP ") for line in lines)
    # One short INFO line per association, when it ends: who, contexts, what was done, how long.
    association_info = [
        line for line in ours if line.startswith("APP INFO") and " association " in line and "sop_instance=" not in line
    ]
    closed = [line for line in association_info if "association closed" in line]
    assert len(closed) == 2 and len(association_info) == 2, association_info  # requestor and acceptor side
    assert all(len(line) < 300 for line in closed), closed
    requestor_close = next(line for line in closed if "local_ae=LOGSCU" in line)
    acceptor_close = next(line for line in closed if "local_ae=LOGSCP" in line)
    for line in (requestor_close, acceptor_close):
        for field in ("ops=C-ECHO:1,C-STORE:2", "failed=1", "contexts=2/2", "rx_bytes=", "tx_bytes=", "duration_ms="):
            assert field in line, line
        assert "reason=" not in line, line  # released: no reason
    assert "peer_ae=LOGSCP" in requestor_close and "peer_ae=LOGSCU" in acceptor_close
    # Establishment is DEBUG only, as are the negotiation details.
    established = [line for line in ours if "association accepted" in line]
    assert len(established) == 2 and all(line.startswith("APP DEBUG") for line in established), established
    # The failed C-STORE: one INFO line on each side with the UID and status.
    failed = [line for line in ours if line.startswith("APP INFO") and "C-STORE failure" in line]
    assert len(failed) == 2, ours
    assert all("sop_instance=1.2.3.4.9" in line and "status=0xA700" in line for line in failed)
    # The successful one at DEBUG: UID, status, bytes, milliseconds.
    done_lines = [line for line in ours if line.startswith("APP DEBUG") and "C-STORE done" in line]
    assert len(done_lines) == 2, ours
    for line in done_lines:
        assert "sop_instance=1.2.3.4.1" in line and "status=0x0000" in line
        assert " bytes=" in line and " ms=" in line
    # Negotiation details are DEBUG only.
    assert any(line.startswith("APP DEBUG") and "negotiated" in line and "accepted=" in line for line in ours)


def test_host_app_at_info_sees_no_debug_lines(tmp_path: Path) -> None:
    code = f"""
        import logging
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", filename={str(tmp_path / "a.log")!r})
        {textwrap.indent(EXCHANGE, "        ").strip()}
        asyncio.run(exchange())
    """
    done = run_host(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == ""
    lines = (tmp_path / "a.log").read_text().splitlines()
    assert lines and not any(line.startswith("DEBUG") for line in lines)
    assert sum("association closed" in line for line in lines) == 2
    assert not any("association accepted" in line for line in lines)


def test_unconfigured_library_is_silent() -> None:
    """No logging configured at all: not a byte on stdout or stderr, even for the
    failed operation (no last-resort handler output) or a refused connection."""
    code = f"""
        {textwrap.indent(EXCHANGE, "        ").strip()}
        async def refused():
            ae = da.AE("X")
            ae.add_requested_context(da.Verification)
            try:
                await ae.associate("127.0.0.1", {free_port()}, "NOBODY")
            except da.ConnectionFailed:
                pass
        asyncio.run(exchange())
        asyncio.run(refused())
    """
    done = run_host(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert done.stderr == ""


def test_host_structlog_configuration_is_left_alone() -> None:
    """Importing, logging and even ``configure_logging`` never change the host's
    structlog configuration; the host's own structlog lines still go where it said."""
    code = """
        import io, logging, structlog, sys
        buf = io.StringIO()
        structlog.configure(processors=[structlog.processors.KeyValueRenderer()],
                            logger_factory=structlog.PrintLoggerFactory(file=buf))
        before = structlog.get_config()
        import dimse_async
        from dimse_async.log import configure_logging, get_logger
        get_logger(assoc="1").info("library line")
        configure_logging("DEBUG", stream=sys.stderr)
        get_logger(assoc="1").info("library line after configure")
        assert structlog.get_config() == before, (structlog.get_config(), before)
        structlog.get_logger().info("host line")
        assert "host line" in buf.getvalue() and "library" not in buf.getvalue(), buf.getvalue()
        assert logging.getLogger().handlers == []
    """
    done = run_host(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert "library line after configure" in done.stderr
    assert "library line " not in done.stderr.replace("library line after configure", "")


def test_configure_logging_json_captures_warnings_as_structured_lines() -> None:
    """With ``configure_logging(json=True)`` every stderr line is one JSON object: our
    events with their fields, Python warnings and pydicom's log included."""
    code = """
        import logging, warnings
        from dimse_async.log import configure_logging, get_logger
        configure_logging("INFO", json=True)
        get_logger(assoc="7").info("hello", peer="127.0.0.1:1")
        warnings.warn("a warning from somewhere")
        logging.getLogger("pydicom").warning("pydicom says\\nsomething")
        from pydicom.dataset import Dataset
        ds = Dataset()
        ds.PatientName = "X"
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            ds.Manufacturer = "x" * 70          # pydicom warns: value too long for LO
    """
    done = run_host(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    records = [json.loads(line) for line in done.stderr.splitlines()]
    assert records[0]["event"] == "hello" and records[0]["assoc"] == "7" and records[0]["level"] == "info"
    assert any(r.get("logger") == "py.warnings" and "a warning from somewhere" in r["event"] for r in records)
    assert any(r.get("logger") == "pydicom" and "pydicom says" in r["event"] for r in records)
    assert len(records) >= 3


@pytest.mark.parametrize("as_json", [False, True], ids=["console", "json"])
def test_another_librarys_logged_exception_is_one_line_and_ours_keeps_its_traceback(as_json: bool) -> None:
    """pydicom logs each pixel decoder plugin that failed with its traceback (a C-GET
    of an instance it cannot decode, which we answer and log ourselves): one line with
    ``error=Type: message``; an exception logged by our own logger keeps its traceback."""
    code = f"""
        import logging
        from dimse_async.log import configure_logging
        configure_logging("INFO", json={as_json})
        try:
            raise RuntimeError("libjpeg error code '-1038'\\nreturned from Decode()")
        except RuntimeError:
            logging.getLogger("pydicom.pixels.decoders.base").exception("plugin failed")
        import sys; sys.stderr.write("--ours--\\n")
        try:
            raise ValueError("ours")
        except ValueError:
            logging.getLogger("dimse_async.test").exception("our bug")
    """
    done = run_host(code)
    assert done.returncode == 0, done.stderr
    foreign, ours = done.stderr.split("--ours--\n")
    assert "Traceback" not in foreign and foreign.count("\n") == 1, foreign
    assert "plugin failed" in foreign and "RuntimeError: libjpeg error code '-1038' returned" in foreign
    assert "Traceback" in ours


def test_asyncpgs_retry_lines_are_one_line_each_and_rate_limited() -> None:
    """asyncpg's pool logs a warning with the connection error's traceback on each try
    to reconnect while PostgreSQL is down: through configure_logging it is one line
    (``error=Type: message``), once a minute, the next one saying how many were held back."""
    code = """
        import logging
        from dimse_async.log import configure_logging, RepeatFilter
        handler = configure_logging("INFO")
        pool = logging.getLogger("asyncpg.pool")
        for _ in range(20):
            try:
                raise ConnectionRefusedError(111, "Connection refused")
            except OSError:
                pool.warning("Failed to restore the pool connection floor; retrying", exc_info=True)
        (repeats,) = [f for f in handler.filters if isinstance(f, RepeatFilter)]
        repeats.repeats.clock = lambda: 1e12  # a minute and more later
        pool.warning("Failed to restore the pool connection floor; retrying")
    """
    done = run_host(code)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert "Traceback" not in done.stderr and len(lines) == 2, done.stderr
    assert "logger=asyncpg.pool" in lines[0] and "ConnectionRefusedError: [Errno 111] Connection refused" in lines[0]
    assert "suppressed=19" in lines[1]


def test_repeats_lets_a_burst_through_per_interval_and_counts_the_rest() -> None:
    from dimse_async.log import Repeats

    now = [0.0]
    r = Repeats(10.0, burst=2, max_keys=2, clock=lambda: now[0])
    assert [r.allow("a") for _ in range(5)] == [0, 0, None, None, None]
    assert r.allow("b") == 0
    now[0] = 10.0
    assert r.allow("a") == 3 and r.allow("a") == 0 and r.allow("a") is None
    assert r.allow("c") == 0  # a third key: the table starts afresh, bounded


def test_echoscu_against_embedded_scp_logs_to_the_app_handler(tmp_path: Path) -> None:
    """DCMTK ``echoscu`` as the peer of an SCP embedded in a host app that logs to a
    file: the acceptor's lines arrive there, stdout stays empty."""
    port = free_port()
    log_file = tmp_path / "scp.log"
    code = f"""
        import asyncio, logging, subprocess
        logging.basicConfig(level=logging.INFO, filename={str(log_file)!r}, format="%(name)s %(message)s")
        import dimse_async as da

        async def main():
            ae = da.AE("EMBEDDED")
            ae.add_supported_context(da.Verification)
            server = await ae.start_server("127.0.0.1", {port})
            proc = await asyncio.create_subprocess_exec({dcmtk("echoscu")!r}, "-aec", "EMBEDDED",
                "127.0.0.1", "{port}", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            assert await asyncio.wait_for(proc.wait(), 30) == 0
            server.close()
            await server.wait_closed(grace=5)

        asyncio.run(main())
    """
    done = run_host(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == ""
    text = log_file.read_text()
    (line,) = [line for line in text.splitlines() if line.startswith("dimse_async association closed")]
    assert "ops=C-ECHO:1" in line and "peer_ae=ECHOSCU" in line and "contexts=1/1" in line, line


# Every kind of operation, with log_operations on both sides: C-ECHO, C-STORE, C-FIND,
# C-GET (its C-STORE sub-operation), C-MOVE (to the SCP itself) and N-ACTION.
ALL_OPERATIONS = """
import asyncio, json, logging, logging.config, sys

records = []

class Collect(logging.Handler):
    def emit(self, record):
        records.append({"level": record.levelname, "name": record.name, **getattr(record, "dimse_async", {})})

logging.config.dictConfig({
    "version": 1,
    "handlers": {"mine": {"()": Collect}},
    "root": {"level": "INFO", "handlers": ["mine"]},
})

import dimse_async as da
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid, ExplicitVRLittleEndian

CT = "1.2.840.10008.5.1.4.1.1.2"
FIND, GET, MOVE = (da.QR_MODELS["study"][op] for op in ("find", "get", "move"))
ACTION_CLASS = "1.2.840.10008.1.20.1"

def instance(uid):
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CT, uid
    ds.StudyInstanceUID, ds.PatientID = "1.2.3", "OPS"
    ds.file_meta = Dataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds

async def main():
    scp = da.AE("OPSSCP", log_operations=True, require_called_ae=False)
    for uid in (da.Verification, CT, FIND, GET, MOVE, ACTION_CLASS):
        scp.add_supported_context(uid, scp_role=uid == CT)
    scp.add_requested_context(CT)

    @scp.on_c_store
    async def store(request):
        return 0x0000

    @scp.on_c_find
    async def find(request):
        yield instance("1.2.3.4.7")

    @scp.on_c_get
    async def get(request):
        yield instance("1.2.3.4.8")

    @scp.on_c_move
    async def move(request):
        yield instance("1.2.3.4.9")

    @scp.on_n_action(sop_class=ACTION_CLASS)
    async def action(request):
        return None

    async def received(request):
        return 0x0000

    server = await scp.start_server("127.0.0.1", 0)
    scp.known_aes["OPSSCP"] = ("127.0.0.1", server.port)
    scu = da.AE("OPSSCU", log_operations=True)
    for uid in (da.Verification, FIND, GET, MOVE, ACTION_CLASS):
        scu.add_requested_context(uid)
    scu.add_requested_context(CT, scp_role=True)
    query = Dataset()
    query.QueryRetrieveLevel, query.StudyInstanceUID = "STUDY", "1.2.3"
    async with scu.associate("127.0.0.1", server.port, "OPSSCP") as assoc:
        await assoc.c_echo()
        await assoc.c_store(instance("1.2.3.4.1"))
        async with assoc.c_find(query, model="study") as responses:
            async for _ in responses:
                pass
        async for _ in assoc.c_get(query, model="study", store=received):
            pass
        async for _ in assoc.c_move(query, "OPSSCP", model="study"):
            pass
        ds = Dataset()
        ds.TransactionUID = generate_uid()
        await assoc.n_action(ACTION_CLASS, "1.2.840.10008.1.20.1.1", 1, ds)
    server.close()
    await server.wait_closed(grace=5)

asyncio.run(main())
sys.stderr.write(json.dumps(records))
"""


def test_log_operations_puts_one_info_line_per_successful_operation_in_the_host_handler() -> None:
    """``AE(log_operations=True)``: each successful C-ECHO/STORE/FIND/GET/MOVE and N-ACTION
    is one INFO record in the host's stdlib handler, carrying UID, status, bytes and ms
    (on both sides); nothing reaches stdout."""
    done = run_host(ALL_OPERATIONS)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    records = json.loads(done.stderr)
    ops = [r for r in records if r.get("event", "").endswith(" done")]
    assert ops and all(r["level"] == "INFO" and r["name"].startswith("dimse_async") for r in ops), ops
    for record in ops:
        for field in ("status", "bytes", "ms", "role", "sop_class", "local_ae"):
            assert field in record, record
        assert record["status"] == "0x0000" and isinstance(record["ms"], float), record
    seen = {(r["event"], r["role"]) for r in ops}
    for name in ("C-ECHO", "C-STORE", "C-FIND", "C-GET", "C-MOVE", "N-ACTION"):
        assert {(f"{name} done", "scu"), (f"{name} done", "scp")} <= seen, (name, seen)
    stores = [r for r in ops if r["event"] == "C-STORE done"]
    # ours, the C-GET sub-operation and the C-MOVE sub-operation, each seen from both sides
    assert {r["sop_instance"] for r in stores} == {"1.2.3.4.1", "1.2.3.4.8", "1.2.3.4.9"}, stores
    assert all(r["bytes"] > 0 for r in stores), stores
    action = [r for r in ops if r["event"] == "N-ACTION done"]
    assert all(r["sop_instance"] == "1.2.840.10008.1.20.1.1" and r["bytes"] > 0 for r in action), action
    finds = [r for r in ops if r["event"] == "C-FIND done"]
    assert all(r["sop_class"] == "1.2.840.10008.5.1.4.1.2.2.1" and r["bytes"] > 0 for r in finds), finds


def test_without_log_operations_success_lines_stay_at_debug() -> None:
    done = run_host(ALL_OPERATIONS.replace("log_operations=True", "log_operations=False"))
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    records = json.loads(done.stderr)
    assert records and not any(r.get("event", "").endswith(" done") for r in records), records


def test_cli_log_ops_flag_and_toml_key(tmp_path: Path) -> None:
    """``--log-ops`` (and ``log_operations = true`` for ``serve``): the success lines on
    stderr at INFO; stdout keeps only the command's own output."""
    from pydicom.data import get_testdata_file

    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    port = free_port()
    config = tmp_path / "serve.toml"
    config.write_text(f'port = {port}\nstorage_dir = "{tmp_path / "archive"}"\nlog_operations = true\n')
    serve = subprocess.Popen(
        [sys.executable, "-m", "dimse_async", "serve", "--config", str(config), "--log-json"],
        stdout=subprocess.PIPE, stderr=(tmp_path / "serve.err").open("wb"), env=env, start_new_session=True,
    )  # fmt: skip
    try:
        assert serve.stdout is not None
        assert "listening on" in serve.stdout.readline().decode()
        ct = get_testdata_file("CT_small.dcm")
        sent = subprocess.run(
            [sys.executable, "-m", "dimse_async", "send", "127.0.0.1", str(port), ct, "--log-ops", "--log-json"],
            capture_output=True, text=True, env=env, timeout=60, check=False,
        )  # fmt: skip
        assert sent.returncode == 0, sent
        assert sent.stdout.startswith("sent 1/1 instances") and len(sent.stdout.splitlines()) == 1, sent.stdout
        lines = [json.loads(line) for line in sent.stderr.splitlines()]
        store = [r for r in lines if r["event"] == "C-STORE done"]
        assert len(store) == 1 and store[0]["level"] == "info", lines
        assert store[0]["sop_instance"] == "1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322"
        assert store[0]["bytes"] > 0 and store[0]["status"] == "0x0000" and "ms" in store[0]
        quiet = subprocess.run(
            [sys.executable, "-m", "dimse_async", "send", "127.0.0.1", str(port), ct, "--log-json"],
            capture_output=True, text=True, env=env, timeout=60, check=False,
        )  # fmt: skip
        assert quiet.returncode == 0 and quiet.stderr == "", quiet
    finally:
        stop_process(serve)  # type: ignore[arg-type]
    logged = [json.loads(line) for line in (tmp_path / "serve.err").read_text().splitlines()]
    served = [r for r in logged if r["event"] == "C-STORE done"]
    assert len(served) == 2 and all(r["level"] == "info" and r["role"] == "scp" for r in served), logged


# ---------------------------------------------------------------- rendering, in process

_TEXTS = [
    "",
    " ",
    "BENCH",
    "127.0.0.1:40000",
    "a=b",
    'say "hi"',
    "tab\there",
    "new\nline",
    "\x00",
    "\x1f",
    "\x7f",
    "\x85",  # NEL: C1
    "\x9f",
    "\xa0",  # no-break space: unprintable to Python, not quoted by the pattern
    "\u2028",  # line separator: likewise
    "\u200b",
    "caf\xe9",
    "\U0001f600",
    "x" * 80,
]


def _expected_pair(key: str, value: str) -> str:
    from dimse_async.log import _QUOTED

    return f"{key}={value}" if value and _QUOTED.search(value) is None else f"{key}={json.dumps(value)}"


@pytest.mark.parametrize("value", _TEXTS)
def test_a_string_field_is_quoted_exactly_when_the_pattern_finds_a_character(value: str) -> None:
    """The check without the pattern (printable strings) decides as the pattern does:
    judged fresh and then from the kept judgement."""
    from dimse_async import log

    log._PLAIN.clear()
    assert log._pairs({"k": value}) == _expected_pair("k", value)
    assert log._pairs({"k": value}) == _expected_pair("k", value)  # the kept judgement


def test_string_fields_quoted_as_the_pattern_says_for_any_text() -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from dimse_async import log

    @settings(max_examples=300, deadline=None)
    @given(st.text(max_size=12))
    def check(value: str) -> None:
        log._PLAIN.pop(value, None)
        assert log._pairs({"k": value, "n": 3}) == _expected_pair("k", value) + " n=3"

    check()


def test_formatter_writes_a_records_message_with_and_without_arguments() -> None:
    import logging

    from dimse_async.log import StructuredFormatter

    fmt = StructuredFormatter()
    for msg, args, text in [("plain  ", (), "plain"), ("x %s y", (7,), "x 7 y"), (ValueError("bad"), (), "bad")]:
        record = logging.LogRecord("dimse_async", logging.INFO, "", 0, msg, args, None)
        assert fmt.format(record).endswith(f"[info   ] {text}")


def test_operation_summary_fields() -> None:
    """The "association closed" line's fields: operations by kind (sorted, ``none``),
    ``contexts`` first when given."""
    from dimse_async.oplog import OperationLog

    ops = OperationLog(10.0)
    ops.bytes_received, ops.bytes_sent = 5, 6
    assert ops.summary(10.0125) == {"ops": "none", "failed": 0, "rx_bytes": 5, "tx_bytes": 6, "duration_ms": 12}
    ops.operations["C-STORE"] = 3
    assert list(ops.summary(11.0, "2/3").items()) == [
        ("contexts", "2/3"),
        ("ops", "C-STORE:3"),
        ("failed", 0),
        ("rx_bytes", 5),
        ("tx_bytes", 6),
        ("duration_ms", 1000),
    ]
    ops.operations["C-ECHO"] = 1
    assert ops.summary(11.0)["ops"] == "C-ECHO:1,C-STORE:3"


def test_closing_text_is_what_the_logger_makes_of_the_fields() -> None:
    """``OperationLog.closing``'s text is ``log._pairs`` of its fields, in every shape it
    makes one for (one kind, none, several, without contexts); none when a string would
    be quoted (an unknown command's name, odd contexts) or operations are unfinished."""
    from dimse_async import log
    from dimse_async.oplog import OperationLog

    ops = OperationLog(10.0)
    ops.bytes_received, ops.bytes_sent, ops.failed_operations = 5, 1 << 40, 2
    plain_ops = [{}, {"C-ECHO": 1}, {"C-STORE": 3, "C-ECHO": 1}]
    plain_contexts = [None, "1/1", "12/128"]
    made = []
    for operations in [*plain_ops, {"command 0x1234": 1}, {"C-FIND": 1, 'a"b': 2}]:
        ops.operations = dict(operations)
        for contexts in [*plain_contexts, "1 of 2", ""]:
            fields, text = ops.closing(10.4567, contexts)
            assert fields == ops.summary(10.4567, contexts)
            if text is not None:
                assert text == log._pairs(fields)
                made.append((operations, contexts))
    assert made == [(o, c) for o in plain_ops for c in plain_contexts]
    ops.operations = {"C-ECHO": 1}
    ops.received(10.0, _echo_request(), None, False)  # under way: the line names it unfinished
    fields, text = ops.closing(11.0, "1/1")
    assert text is None and fields["unfinished"] == "C-ECHO:1"


def _echo_request() -> object:
    from dimse_async.dimse import Command, CommandField, Message

    return Message(1, Command(CommandField.C_ECHO_RQ, message_id=7, affected_sop_class_uid="1.2.840.10008.1.1"))


def test_bound_fields_keep_their_order_and_a_field_bound_again_its_new_value() -> None:
    import io
    import logging

    from dimse_async.log import configure_logging, get_logger

    stream = io.StringIO()
    handler = configure_logging("INFO", stream=stream, capture_warnings=False)
    try:
        log = get_logger("bindtest", assoc="1f").bind(peer="127.0.0.1:4", local_ae="A").bind(peer_ae="B", local_ae="C")
        log.info("done", n=2)
        log.bind(x="y").info("again")
        log.debug("not at INFO")
    finally:
        logging.getLogger("dimse_async").removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert [line.split("] ", 1)[1] for line in lines] == [
        "done assoc=1f peer=127.0.0.1:4 local_ae=C peer_ae=B n=2",
        "again assoc=1f peer=127.0.0.1:4 local_ae=C peer_ae=B x=y",
    ]


@pytest.fixture
def console_log() -> Iterator[Any]:
    """``configure_logging("INFO")`` to a ``StringIO`` in this process; the test process's
    own configuration (conftest's) restored afterwards."""
    import io
    import logging

    from dimse_async import log

    ours = logging.getLogger("dimse_async")
    before = (list(ours.handlers), ours.level, ours.propagate, list(log._installed), log._direct)
    stream = io.StringIO()
    handler = log.configure_logging("INFO", stream=stream, capture_warnings=False)
    try:
        yield stream, handler
    finally:
        ours.handlers[:] = before[0]
        ours.setLevel(before[1])
        ours.propagate = before[2]
        log._installed[:] = before[3]
        log._direct = before[4]


def _log_lines() -> None:
    from dimse_async.log import get_logger

    bound = get_logger(assoc="1f").bind(peer="127.0.0.1:4", local_ae="A", peer_ae="B C")
    bound.info("association closed", contexts="1/1", ops="C-ECHO:1", failed=0, rx_bytes=317)
    bound.warning("bad  ", why='a "quoted" = reason', n=None)
    get_logger().error("plain")
    bound.debug("not at INFO")


def _texts(stream: Any) -> list[str]:
    return [line.split(" ", 1)[1] for line in stream.getvalue().splitlines()]


def test_configure_loggings_handler_alone_writes_our_lines_without_log_records(
    console_log: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the handler ``configure_logging`` installed is the only one that would see
    our lines, they are written without a ``LogRecord`` (and its handling); the text is
    what the record would have made. A filter on the logger (here one that passes all)
    gets the records made and handled as usual, with the same text."""
    import logging

    stream, _handler = console_log
    made = []
    init = logging.LogRecord.__init__

    def counting(self: logging.LogRecord, *args: Any, **kwargs: Any) -> None:
        made.append(args[1] if len(args) > 1 else None)
        init(self, *args, **kwargs)

    monkeypatch.setattr(logging.LogRecord, "__init__", counting)
    _log_lines()
    direct = _texts(stream)
    assert made == []
    stream.seek(0)
    stream.truncate()
    seen: list[logging.LogRecord] = []
    logger = logging.getLogger("dimse_async")
    def keep(record: logging.LogRecord) -> bool:
        seen.append(record)
        return True

    logger.addFilter(keep)
    try:
        _log_lines()
    finally:
        logger.removeFilter(keep)
    assert len(made) == 3 and len(seen) == 3
    assert _texts(stream) == direct == [
        "[info   ] association closed assoc=1f peer=127.0.0.1:4 local_ae=A peer_ae=\"B C\" contexts=1/1 "
        "ops=C-ECHO:1 failed=0 rx_bytes=317",
        '[warning] bad   assoc=1f peer=127.0.0.1:4 local_ae=A peer_ae="B C" why="a \\"quoted\\" = reason" n=None',
        "[error  ] plain",
    ]


@pytest.mark.parametrize("change", ["handler", "propagate", "formatter", "factory", "level", "handler filter", "json"])
def test_what_a_host_adds_gets_our_records(console_log: Any, change: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Anything that could see a record besides ``configure_logging``'s handler (another
    handler on our logger or above it, a formatter or filter of the host's on our
    handler, a record factory) gets every record; the level of our handler still holds."""
    import logging

    from dimse_async.log import configure_logging

    stream, handler = console_log
    logger = logging.getLogger("dimse_async")
    got: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            got.append(record)

    if change == "handler":
        logger.addHandler(Keep())
    elif change == "propagate":
        root_handler = Keep()
        logging.getLogger().addHandler(root_handler)
        monkeypatch.setattr(logger, "propagate", True)
    elif change == "formatter":
        handler.setFormatter(logging.Formatter("HOST %(levelname)s %(message)s"))
    elif change == "factory":
        factory = logging.getLogRecordFactory()

        def tagging(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = factory(*args, **kwargs)
            got.append(record)
            return record

        logging.setLogRecordFactory(tagging)
    elif change == "level":
        handler.setLevel(logging.ERROR)
    elif change == "handler filter":
        handler.addFilter(lambda record: got.append(record) or True)
    elif change == "json":
        handler = configure_logging("INFO", stream=stream, json=True, capture_warnings=False)
    try:
        _log_lines()
    finally:
        if change == "propagate":
            logging.getLogger().removeHandler(root_handler)
        elif change == "factory":
            logging.setLogRecordFactory(factory)
    lines = stream.getvalue().splitlines()
    if change == "formatter":
        assert lines[0].startswith("HOST INFO association closed assoc=1f") and len(lines) == 3
    elif change == "level":
        assert _texts(stream) == ["[error  ] plain"]
    elif change == "json":
        assert [json.loads(line)["event"] for line in lines] == ["association closed", "bad  ", "plain"]
    else:
        assert len(got) == 3 and len(lines) == 3
        assert got[0].getMessage().startswith("association closed assoc=1f")
        assert got[0].dimse_async["event"] == "association closed"  # type: ignore[attr-defined]


def test_a_line_that_cannot_be_written_goes_to_the_handlers_error_handling(
    console_log: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import logging

    _stream, handler = console_log

    class Broken:
        def write(self, text: str) -> int:
            raise OSError("disk full")

        def flush(self) -> None:
            pass

    failed: list[logging.LogRecord] = []
    handler.setStream(Broken())
    monkeypatch.setattr(handler, "handleError", failed.append)
    _log_lines()
    assert [r.getMessage().split(" ", 1)[0] for r in failed] == ["association", "bad", "plain"]


async def test_an_abort_mid_c_get_shows_the_get_as_unfinished_on_the_closed_line() -> None:
    """pynetdicom asks for a C-GET of 40 instances, stores them slowly and aborts after
    the first pending C-GET-RSP (PS3.7 9.1.3). The SCP's "association closed" line counts
    the finished C-STORE sub-operations under ``ops`` and the C-GET (with a C-STORE still
    under way, if any) under ``unfinished``, not as if the C-GET never was; a released
    association's line has no ``unfinished``."""
    import asyncio
    import logging
    import time

    from pydicom.dataset import Dataset
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE as PynetAE  # type: ignore[import-untyped]
    from pynetdicom import build_role, evt

    import dimse_async as da

    ct, get_model = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.2.2.3"

    def instance(i: int) -> Dataset:
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID, ds.PatientName = ct, f"1.2.3.4.{i}", "GET^ABORT"
        ds.file_meta = Dataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        return ds

    scp = da.AE("GETSCP")
    scp.add_supported_context(get_model)
    scp.add_supported_context(ct, [ExplicitVRLittleEndian], scp_role=True)

    @scp.on_c_get
    async def get(request: Any) -> Any:
        for i in range(40 if request.identifier.StudyInstanceUID == "1.2.3" else 3):
            yield instance(i)

    def retrieve(port: int, abort: bool) -> int:
        query = Dataset()
        query.QueryRetrieveLevel, query.StudyInstanceUID = "STUDY", "1.2.3" if abort else "1.2.4"
        ae = PynetAE(ae_title="GETSCU")
        ae.add_requested_context(get_model)
        ae.add_requested_context(ct, ExplicitVRLittleEndian)
        stored: list[int] = []

        def on_store(event: Any) -> int:  # a slow C-STORE SCP: the C-GET is under way a while
            stored.append(1)
            if abort:
                time.sleep(0.02)
            return 0x0000

        assoc = ae.associate(
            "127.0.0.1", port, ae_title="GETSCP", ext_neg=[build_role(ct, scp_role=True)],
            evt_handlers=[(evt.EVT_C_STORE, on_store)],
        )  # fmt: skip
        assert assoc.is_established
        try:
            for status, _ in assoc.send_c_get(query, get_model):
                if abort and status and status.Status == 0xFF00:
                    break
        finally:
            assoc.abort() if abort else assoc.release()
        return len(stored)

    class Closed(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.INFO)
            self.lines: list[dict[str, Any]] = []

        def emit(self, record: logging.LogRecord) -> None:
            fields = dict(getattr(record, "dimse_async", {}))
            if record.getMessage().startswith("association closed"):
                self.lines.append(fields)

    logger = logging.getLogger("dimse_async")
    handler, level = Closed(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        async with await scp.start_server("127.0.0.1", 0) as server:
            for abort in (True, False):
                stored = await asyncio.to_thread(retrieve, server.port, abort)
                deadline = time.monotonic() + 10
                while server.associations or len(handler.lines) < (1 if abort else 2):
                    assert time.monotonic() < deadline, handler.lines
                    await asyncio.sleep(0.01)
                assert (stored < 40) if abort else stored == 3
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    aborted, released = handler.lines
    assert aborted["ops"].startswith("C-STORE:") and "C-GET" not in aborted["ops"], aborted
    assert aborted["unfinished"] in ("C-GET:1", "C-GET:1,C-STORE:1"), aborted
    assert "aborted" in aborted["reason"], aborted
    assert released["ops"] == "C-GET:1,C-STORE:3" and "unfinished" not in released, released


@pytest.mark.parametrize("level", ["INFO", "DEBUG"])
async def test_association_lines_carry_their_bound_fields_in_order(console_log: Any, level: str) -> None:
    """Every line of an association carries its fields as they became known, in order:
    ``assoc``, then (acceptor) ``peer``, ``local_ae`` at the connection and ``peer_ae``,
    ``called_ae`` at the A-ASSOCIATE-RQ; (requestor) ``peer_ae``, ``local_ae`` at the
    request and ``peer`` at the connection. The logger is made when the first line is
    logged (INFO: the closing line; DEBUG: the first bytes, before the request), so
    fields bound before and after that both reach the lines. An application's logger
    set on the association is the one written to."""
    import asyncio
    import logging
    import re

    import dimse_async as da

    stream, handler = console_log
    if level == "DEBUG":
        logging.getLogger("dimse_async").setLevel(logging.DEBUG)
        handler.setLevel(logging.DEBUG)
    scp = da.AE("FIELDS_SCP")
    scp.add_supported_context(da.Verification)
    scu = da.AE("FIELDS_SCU")
    scu.add_requested_context(da.Verification)
    async with await scp.start_server("127.0.0.1", 0) as server:
        scp_port = server.port
        async with scu.associate("127.0.0.1", scp_port, called_ae="FIELDS_SCP") as assoc:
            await assoc.c_echo()
            port = assoc.transport.get_extra_info("sockname")[1]
        for _ in range(500):  # the acceptor's closing line follows the release (bounded wait)
            if stream.getvalue().count("association closed") >= 2:
                break
            await asyncio.sleep(0.01)
    lines = stream.getvalue().splitlines()

    def keys(line: str) -> list[str]:
        return re.findall(r" (\w+)=", line)

    def closed(local_ae: str) -> str:
        return next(line for line in lines if "association closed" in line and f"local_ae={local_ae}" in line)

    acceptor, requestor = closed("FIELDS_SCP"), closed("FIELDS_SCU")
    assert keys(acceptor)[:6] == ["assoc", "peer", "local_ae", "peer_ae", "called_ae", "contexts"], acceptor
    assert f"peer=127.0.0.1:{port} local_ae=FIELDS_SCP peer_ae=FIELDS_SCU called_ae=FIELDS_SCP " in acceptor
    assert keys(requestor)[:5] == ["assoc", "peer_ae", "local_ae", "peer", "contexts"], requestor
    assert f"peer_ae=FIELDS_SCP local_ae=FIELDS_SCU peer=127.0.0.1:{scp_port} " in requestor
    acceptor_id = acceptor.split(" assoc=", 1)[1].split(" ", 1)[0]
    mine = [line for line in lines if f" assoc={acceptor_id} " in line]
    if level == "DEBUG":  # lines before the request carry what was known then, later ones all
        first = mine[0]
        assert "bytes received" in first and keys(first)[:3] == ["assoc", "peer", "local_ae"], first
        assert "peer_ae=" not in first
        accepted = next(line for line in mine if "association accepted" in line)
        assert keys(accepted)[:5] == ["assoc", "peer", "local_ae", "peer_ae", "called_ae"], accepted
    else:
        assert mine == [acceptor]

    # An application's own logger, set on the association before its first line.
    got: list[dict[str, Any]] = []

    class Spy:
        def __init__(self, fields: dict[str, Any]) -> None:
            self.fields = fields

        def bind(self, **fields: Any) -> Spy:
            return Spy({**self.fields, **fields})

        def __getattr__(self, level: str) -> Any:
            return lambda event, **fields: got.append({"event": event, **self.fields, **fields})

    @scp.on_association("requested")
    def own_logger(acceptor_assoc: Any) -> None:
        acceptor_assoc.log = Spy({"app": 1})

    async with await scp.start_server("127.0.0.1", 0) as server:
        async with scu.associate("127.0.0.1", server.port, called_ae="FIELDS_SCP") as assoc:
            await assoc.c_echo()
        for _ in range(500):
            if any(event["event"] == "association closed" for event in got):
                break
            await asyncio.sleep(0.01)
    closing = next(event for event in got if event["event"] == "association closed")
    assert list(closing)[:3] == ["event", "app", "contexts"] and closing["ops"] == "C-ECHO:1"


def test_log_info_writes_what_info_with_the_fields_writes(console_log: Any) -> None:
    """``log_info(logger, event, fields)`` is ``logger.info(event, **fields)``: the same
    text written directly, the same record when the record path is taken (a filter on
    the logger), a bound field given again in its place; another logger gets ``info``."""
    import logging

    from dimse_async import log
    from dimse_async.log import get_logger, log_info

    stream, _handler = console_log
    bound = get_logger(assoc="1f").bind(peer="127.0.0.1:4", local_ae="A")
    fields = {"contexts": "1/1", "ops": "C-ECHO:1", "failed": 0, "local_ae": "B", "why": "a b"}
    seen: list[logging.LogRecord] = []

    def run(call: Any) -> tuple[list[str], Any]:
        stream.seek(0)
        stream.truncate()
        seen.clear()
        call()
        logger = logging.getLogger("dimse_async")
        logger.addFilter(keep)
        try:
            call()
        finally:
            logger.removeFilter(keep)
        return _texts(stream), [(r.getMessage(), r.dimse_async) for r in seen]  # type: ignore[attr-defined]

    def keep(record: logging.LogRecord) -> bool:
        seen.append(record)
        return True

    expected = run(lambda: bound.info("association closed", **fields))
    assert expected[0][0] == '[info   ] association closed assoc=1f peer=127.0.0.1:4 local_ae=B contexts=1/1 ops=C-ECHO:1 failed=0 why="a b"'
    assert run(lambda: log_info(bound, "association closed", fields)) == expected
    # The fields' text made by the caller (OperationLog.closing): the same line and record.
    assert run(lambda: log_info(bound, "association closed", fields, "contexts=1/1 ops=C-ECHO:1 failed=0 why=\"a b\"")) == expected
    fields_ = {k: v for k, v in fields.items() if k != "local_ae"}
    expected_ = run(lambda: bound.info("association closed", **fields_))
    assert run(lambda: log_info(bound, "association closed", fields_, log._pairs(fields_))) == expected_
    assert fields == {"contexts": "1/1", "ops": "C-ECHO:1", "failed": 0, "local_ae": "B", "why": "a b"}
    got: list[tuple[str, dict[str, Any]]] = []

    class Other:
        def info(self, event: str, **kw: Any) -> None:
            got.append((event, kw))

    log_info(Other(), "association closed", fields)
    assert got == [("association closed", fields)]
