"""Process-wide settings the command line applies before a command runs: the
allocator, the garbage collector, pydicom's warnings and what a log record looks up. A library never changes these
(it is a guest in its application's process); the ``dimse-async`` process is ours.
"""

from __future__ import annotations

import importlib.machinery
import logging
import os
import sys
import threading
from types import ModuleType
from typing import Any

__all__ = ["exit_now", "freeze_imports", "lean_log_records", "quiet_pydicom", "tune_allocator", "tune_gc"]


def tune_allocator() -> None:
    """Keep glibc from mapping and unmapping every large short-lived buffer.

    Received PDUs and spooled fragments are 100 KB - 4 MB objects freed soon after;
    with glibc's defaults each one is a fresh mmap, and page faults then cost about as
    much as the network work. Applied by the CLI only (a process-wide setting), and a
    no-op where glibc's mallopt is not available. Not by ``send``: it receives only
    short responses, and glibc's adaptive threshold serves its reads as well (30 x 2.1
    MB to storescp: the same wall and CPU time without it).
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 64 << 20)
        libc.mallopt(m_trim_threshold, 256 << 20)
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass


def _quiet_config(module: ModuleType) -> None:
    module.settings.reading_validation_mode = module.IGNORE


class _QuietPydicom:
    """Applies :func:`_quiet_config` to ``pydicom.config`` as soon as it is imported,
    so that a command that never decodes a data set need not import pydicom."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name != "pydicom.config":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        loader = spec.loader if spec is not None else None
        if spec is None or loader is None or not hasattr(loader, "exec_module"):
            return spec
        run_module = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run_module(module)
            _quiet_config(module)

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def tune_gc() -> None:
    """Collect young objects every 100,000 allocations instead of 700.

    With the default, the objects of a short association outlive a few young
    collections, get promoted and trigger full collections that walk every object of
    every open association: the cost of a new association grew with the number open
    (+70% with 10,000 idle). Objects now die young before a collection sees them.
    Applied by the CLI only (a process-wide setting).
    """
    import gc

    gc.set_threshold(100_000, 50, 100)
    freeze_imports()


def freeze_imports() -> None:
    """Move the objects that exist now (modules, classes, functions: made by imports,
    alive until the process ends) out of the collector's sight (:func:`gc.freeze`).

    Full collections, and the one at interpreter exit, then skip them: that last one
    alone was ~15-30 ms of a one-instance ``send``. Called once the command's modules
    are imported (again by commands that import more).
    """
    import gc

    gc.freeze()


def quiet_pydicom() -> None:
    """Received data sets are kept as sent: pydicom's value-validation warnings would
    print to stderr for every odd value a peer sends, so the CLI turns them off (now,
    or when pydicom is first imported)."""
    config = sys.modules.get("pydicom.config")
    if config is not None:
        _quiet_config(config)
    elif not any(isinstance(f, _QuietPydicom) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietPydicom())


def lean_log_records() -> None:
    """Log records without thread and process names and ids: our formatter writes none
    of them (a worker's lines carry ``worker`` and ``pid`` fields of their own), and
    looking them up is a good part of making each record (one per association)."""
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


def exit_now(code: int) -> int:
    """End the ``dimse-async`` process with ``code`` once its command (a client run that
    leaves no file or database open) has returned, without tearing the interpreter down.

    The exit handlers still run (logging's flush among them) and stdout and stderr are
    flushed; what is skipped is freeing every module and object one by one, which the
    process's end does at once: ~5 ms of a one-instance ``send``. Only when no other
    thread is alive (the interpreter would wait for it) and the streams flush cleanly;
    otherwise ``code`` is returned for the usual exit (``sys.exit``).
    """
    import atexit

    if threading.active_count() > 1:
        return code
    atexit._run_exitfuncs()
    try:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
    except (OSError, ValueError):  # a closed pipe or stream: let the interpreter report it
        return code
    os._exit(code)
