"""The process-wide settings of the command line (cli/process.py) and the library's
promise not to change them: importing ``dimse_async`` leaves the collector, the import
system and pydicom's configuration as the application set them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import gc, json, sys
before = (gc.get_threshold(), len(sys.meta_path), gc.get_freeze_count())
{setup}
import pydicom.config as c
print(json.dumps({{
    "before": before,
    "after": (gc.get_threshold(), len(sys.meta_path), gc.get_freeze_count()),
    "validation": c.settings.reading_validation_mode == c.IGNORE,
    "pydicom_first": {pydicom_first},
}}))
"""


def probe(setup: str, pydicom_first: str = "False") -> dict[str, object]:
    code = PROBE.format(setup=setup, pydicom_first=pydicom_first)
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stderr == ""
    return dict(json.loads(out.stdout))


def test_importing_the_library_changes_no_process_setting() -> None:
    got = probe("import dimse_async, dimse_async.ae, dimse_async.services.storage")
    assert got["after"] == got["before"]
    assert got["validation"] is False


def test_cli_settings_apply_to_pydicom_imported_later() -> None:
    got = probe("from dimse_async.cli import process; process.tune_gc(); process.quiet_pydicom()")
    threshold, finders, frozen = got["after"]  # type: ignore[misc]
    assert threshold == [100_000, 50, 100]
    assert frozen > 0
    assert got["validation"] is True
    assert finders == got["before"][1]  # type: ignore[index]  # the one-shot finder removed itself


def test_cli_settings_apply_to_pydicom_imported_before() -> None:
    got = probe("import pydicom.config\nfrom dimse_async.cli import process; process.quiet_pydicom()")
    assert got["validation"] is True
    assert got["after"][1] == got["before"][1]  # type: ignore[index]  # no finder needed


def test_tune_allocator_is_harmless_to_call_twice() -> None:
    got = probe("from dimse_async.cli import process; process.tune_allocator(); process.tune_allocator()")
    assert got["after"][0] == got["before"][0]  # type: ignore[index]


def test_cli_log_records_skip_thread_and_process_lookups() -> None:
    code = (
        "import logging; from dimse_async.cli import process; import dimse_async\n"
        "assert logging.logThreads and logging.logProcesses\n"
        "process.lean_log_records()\n"
        "r = logging.getLogger('x').makeRecord('x', logging.INFO, '', 0, 'm', (), None)\n"
        "print(r.thread, r.process, r.processName)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["None", "None", "None"]


EXIT_PROBE = """
import atexit, sys, threading, time
atexit.register(lambda: print("exit handler ran"))
from dimse_async.cli import process
if {thread}:
    threading.Thread(target=time.sleep, args=(0.2,)).start()
print("returned", process.exit_now(5), end="")
"""


def test_exit_now_runs_exit_handlers_flushes_and_ends_with_the_code() -> None:
    out = subprocess.run(
        [sys.executable, "-c", EXIT_PROBE.format(thread=False)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert (out.returncode, out.stdout, out.stderr) == (5, "exit handler ran\n", "")


def test_exit_now_leaves_a_process_with_other_threads_to_the_interpreter() -> None:
    """The interpreter waits for a non-daemon thread at exit; exit_now returns the code instead."""
    out = subprocess.run(
        [sys.executable, "-c", EXIT_PROBE.format(thread=True)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert (out.returncode, out.stdout, out.stderr) == (0, "returned 5exit handler ran\n", "")
