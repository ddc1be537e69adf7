"""Room on a storage directory's file system, for ``serve`` and ``store-scp`` alike.

Below ``min_free_space`` bytes available (``statvfs`` ``f_bavail``), or on a file
system mounted read-only (ext4 ``errors=remount-ro`` after I/O errors), every C-STORE
is refused 0xA700 Out of Resources (PS3.4 B.2.3) before its data set is checked or
written, and ``/healthz`` answers 503 with the reason, so a load balancer sends studies
elsewhere; both recover by themselves once room is made. The refusal is decided when
the request's command arrives (a C-STORE handler's ``space``, see
``services.storage.make_spool``): its data set is then dropped as it arrives, never
spooled, and the answer follows its last fragment.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from .log import Repeats
from .status import Status

__all__ = ["DEFAULT_MIN_FREE_SPACE", "StorageSpace", "log_store_refusal"]

#: ``min_free_space`` of ``serve`` and ``store-scp`` unless set (0: no minimum).
DEFAULT_MIN_FREE_SPACE = 1 << 20

#: Free space well above the minimum (this many bytes more) is looked at again after a
#: second; nearer the minimum, at every store (one ``statvfs``), so a store is refused
#: as soon as the minimum is crossed and admitted again as soon as room is made.
_SPACE_MARGIN = 256 << 20
_SPACE_RECHECK = 1.0

#: "C-STORE out of resources" lines: while a disk is full or the index is down every
#: store is refused for the same reason; the first 5 of a reason per 10 s are logged,
#: the rest counted into the next line logged (``suppressed=N``). Each refusal still
#: has its operation line (INFO with ``log_operations``) and its status to the peer.
_refusal_lines = Repeats(10.0, burst=5)


def log_store_refusal(request: Any, error: str) -> None:
    """The (rate-limited) error line of a C-STORE refused 0xA700 for ``error``
    (``request``: a :class:`~dimse_async.services.storage.StoreRequest`)."""
    _log_refusal(request.assoc.log, request.sop_instance_uid, error)


def _log_refusal(log: Any, sop_instance_uid: str | None, error: str) -> None:
    error = error.replace("\n", " ")[:200]
    suppressed = _refusal_lines.allow(error)
    if suppressed is not None:
        extra = {"suppressed": suppressed} if suppressed else {}
        log.error("C-STORE out of resources", sop_instance=sop_instance_uid, error=error, **extra)


class StorageSpace:
    """The file system of ``root``: whether stores into it can succeed."""

    def __init__(self, root: str | os.PathLike[str], min_free_space: int = DEFAULT_MIN_FREE_SPACE):
        self.root = root
        #: Bytes the file system must keep available; 0: only read-only is reported.
        self.min_free_space = min_free_space
        self._ok_until = 0.0

    def problem(self) -> tuple[str, str] | None:
        """Why every store would be refused for the storage itself, or ``None``: its file
        system read-only or below :attr:`min_free_space`: (the reason for ``/healthz``
        and the log, the short one for the status's comment). Cheap: one ``statvfs`` at
        most, none within a second of having seen it writable with plenty of room."""
        now = time.monotonic()
        if now < self._ok_until:
            return None
        try:
            st = os.statvfs(self.root)
        except OSError:  # cannot tell: the store itself will say
            return None
        if st.f_flag & os.ST_RDONLY:
            return f"storage {self.root} read-only", "storage read-only"
        minimum = self.min_free_space
        free = st.f_bavail * st.f_frsize
        if free < minimum:
            return f"storage {self.root} full: {free} bytes free, minimum {minimum}", "storage full"
        if free - minimum >= _SPACE_MARGIN:
            self._ok_until = now + _SPACE_RECHECK
        return None

    async def probe(self, timeout: float = 5.0) -> str | None:
        """:meth:`problem`'s reason for ``/healthz`` (``None``: stores can succeed), in a
        thread: a hung file system (NFS) answers "unavailable" after ``timeout``."""
        try:
            problem = await asyncio.wait_for(asyncio.to_thread(self.problem), timeout)
        except TimeoutError:
            return f"storage {self.root} unavailable: no answer within {timeout:g} s"
        return None if problem is None else problem[0]

    def refusal(self, request: Any) -> Status | None:
        """0xA700 (logged) for a store while :meth:`problem` says so, else ``None``."""
        return self.command_refusal(request.assoc.log, request.sop_instance_uid)

    def command_refusal(self, log: Any, sop_instance_uid: str | None) -> Status | None:
        """:meth:`refusal` for a C-STORE whose command set alone has arrived (``log``:
        its association's logger), so its data set is never written."""
        problem = self.problem()
        if problem is None:
            return None
        _log_refusal(log, sop_instance_uid, problem[0])
        return Status(0xA700, f"Out of resources: {problem[1]}")
