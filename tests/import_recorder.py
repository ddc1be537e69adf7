"""Run ``python -m dimse_async ARGS`` recording, in the file named by $IMPORT_LOG, the
thread that first looks up each module ("<thread> <module>" lines), and each import
statement of pydicom or numpy that a thread runs while another thread imports it, a wait
for that import ("<thread> <module> (waits)"). At the first lookup
of pydicom it also tries a TCP connection to 127.0.0.1:$PROBE_PORT and records whether
the server was listening then ("listening <bool>")."""

from __future__ import annotations

import builtins
import os
import runpy
import socket
import sys
import threading
from typing import Any

_log = open(os.environ["IMPORT_LOG"], "w", buffering=1)  # noqa: SIM115 - open for the life of the process
_port = int(os.environ.get("PROBE_PORT", "0"))


_importer: list[threading.Thread] = []  # the thread that imports pydicom


class _Recorder:
    @staticmethod
    def find_spec(name: str, path: Any = None, target: Any = None) -> None:
        _log.write(f"{threading.current_thread().name} {name}\n")
        if name == "pydicom":
            _importer.append(threading.current_thread())
        if name == "pydicom" and _port:
            with socket.socket() as s:
                s.settimeout(2)
                _log.write(f"listening {s.connect_ex(('127.0.0.1', _port)) == 0}\n")


_import = builtins.__import__


def _recording_import(name: str, *args: Any, **kwargs: Any) -> Any:
    thread = threading.current_thread()
    if name.startswith(("pydicom", "numpy")) and _importer and thread is not _importer[0]:
        module = sys.modules.get(name)
        if module is None or getattr(getattr(module, "__spec__", None), "_initializing", False):
            _log.write(f"{thread.name} {name} (waits)\n")
    return _import(name, *args, **kwargs)


builtins.__import__ = _recording_import
sys.meta_path.insert(0, _Recorder)
sys.argv = ["dimse_async", *sys.argv[1:]]
runpy.run_module("dimse_async", run_name="__main__", alter_sys=True)
