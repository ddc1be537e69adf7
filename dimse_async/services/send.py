"""Sending many files: the engine behind ``dimse-async send``.

Proposes only the presentation contexts the files need (each file's own transfer
syntax, plus uncompressed syntaxes for transcoding), spreads the files over one or
more associations and pipelines C-STOREs within each association's window.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pydicom

from ..acse import ContextSpec
from ..dataset_check import DataSetError, check_part10
from ..dimse import Status
from ..exceptions import AssociationError
from ..part10 import read_file_meta
from ..uids import ExplicitVRLittleEndian, ImplicitVRLittleEndian

if TYPE_CHECKING:
    from ..ae import AE

__all__ = ["SendReport", "SendResult", "collect_files", "plan_contexts", "send_files"]


_RETRIES = 3  # associations in a row that may end before one more file is answered


@dataclass(slots=True)
class SendResult:
    path: str
    size: int
    status: Status | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status is not None and self.status.category in ("success", "warning")


@dataclass(slots=True)
class FileInfo:
    path: str
    sop_class: str
    transfer_syntax: str
    size: int


@dataclass
class SendReport:
    results: list[SendResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> list[SendResult]:
        return [r for r in self.results if not r.ok]

    @property
    def bytes_sent(self) -> int:
        return sum(r.size for r in self.results if r.ok)


def collect_files(paths: Iterable[str], recurse: bool) -> list[str]:
    """Expand the command-line paths; directories need ``recurse``."""
    out: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            if not recurse:
                raise ValueError(f"{p} is a directory: use --recurse")
            for root, dirs, files in os.walk(p):
                dirs.sort()
                out.extend(os.path.join(root, f) for f in sorted(files))
        else:
            out.append(p)
    return out


def inspect_file(path: str, *, check: bool = False) -> FileInfo | SendResult:
    """What a file holds (SOP class, transfer syntax), or why it cannot be sent.

    With ``check`` a Part 10 file's data set is parsed to its end in its declared
    transfer syntax: a file that is not what it claims is reported, not sent (a peer
    would abort the association on it)."""
    try:
        with open(path, "rb") as fp:
            meta = read_file_meta(fp)
            size = os.fstat(fp.fileno()).st_size
            if meta is not None and check:
                try:
                    summary = check_part10(fp)
                except DataSetError as exc:
                    return SendResult(path, 0, error=f"not a valid data set in its transfer syntax: {exc}")
                if not summary.sop_class_uid or not summary.sop_instance_uid:
                    return SendResult(path, 0, error="the data set has no SOP Class or SOP Instance UID")
                return FileInfo(path, summary.sop_class_uid, meta.transfer_syntax, size)
        if meta is not None:
            return FileInfo(path, meta.sop_class_uid, meta.transfer_syntax, size)
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
        sop_class = str(ds.get("SOPClassUID", ""))
        if not sop_class:
            return SendResult(path, 0, error="not a DICOM instance (no SOP Class UID)")
        ts = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or ImplicitVRLittleEndian)
        return FileInfo(path, sop_class, ts, size)
    except Exception as exc:
        return SendResult(path, 0, error=f"cannot read: {exc}")


def plan_contexts(items: Iterable[FileInfo]) -> list[ContextSpec]:
    """One context per (SOP class, stored syntax), plus an uncompressed one per class."""
    pairs: dict[tuple[str, str], None] = {}
    classes: dict[str, None] = {}
    for it in items:
        pairs[(it.sop_class, it.transfer_syntax)] = None
        classes[it.sop_class] = None
    specs = [ContextSpec(c, [ts]) for c, ts in pairs]
    for c in classes:
        if (c, ExplicitVRLittleEndian) not in pairs or (c, ImplicitVRLittleEndian) not in pairs:
            specs.append(ContextSpec(c, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]))
    if len(specs) > 128:
        raise ValueError(
            f"the files need {len(specs)} presentation contexts, more than the 128 one association can carry"
        )
    return specs


async def send_files(
    ae: AE,
    host: str,
    port: int,
    called_ae: str,
    paths: list[str],
    *,
    associations: int = 1,
    window: int = 1,
    progress: Callable[[SendResult], None] | None = None,
    ssl: Any = None,
    server_hostname: str | None = None,
) -> SendReport:
    """C-STORE every file; never raises for a single instance, reports it instead."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    report = SendReport()
    items: list[FileInfo] = []
    for p in paths:
        got = await asyncio.to_thread(inspect_file, p, check=True)
        if isinstance(got, SendResult):
            report.results.append(got)
            if progress:
                progress(got)
        else:
            items.append(got)
    if not items:
        report.seconds = loop.time() - started
        return report
    specs = plan_contexts(items)
    queue: asyncio.Queue[FileInfo] = asyncio.Queue()
    for it in items:
        queue.put_nowait(it)

    def record(res: SendResult) -> None:
        report.results.append(res)
        if progress:
            progress(res)

    async def one_association() -> bool:
        """Send from the queue until it is empty (True) or the association ends (False)."""
        async with ae.associate(
            host, port, called_ae, contexts=specs, async_ops=(window, 1), ssl=ssl, server_hostname=server_hostname
        ) as assoc:

            async def worker() -> None:
                while not queue.empty() and assoc.is_established:
                    it = queue.get_nowait()
                    try:
                        status = await assoc.c_store(it.path)
                        record(SendResult(it.path, it.size, status=status))
                    except AssociationError as exc:
                        record(SendResult(it.path, it.size, error=str(exc)))
                    except (OSError, ValueError) as exc:
                        record(SendResult(it.path, it.size, error=f"{type(exc).__name__}: {exc}"))

            await asyncio.gather(*(worker() for _ in range(max(1, window))))
            return assoc.is_established

    async def sender() -> None:
        # A peer abort ends one association, not the batch: the rest goes on a new one,
        # until _RETRIES associations in a row answer nothing.
        idle = 0
        while not queue.empty():
            before = len(report.results)
            error = "association ended before a response"
            try:
                if await one_association():
                    return
            except AssociationError as exc:
                error = str(exc)
            idle = idle + 1 if len(report.results) == before else 0
            if idle >= _RETRIES:
                while not queue.empty():
                    it = queue.get_nowait()
                    record(SendResult(it.path, it.size, error=error))
                return

    await asyncio.gather(*(sender() for _ in range(max(1, associations))))
    report.seconds = loop.time() - started
    return report
