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
from ..dimse import Status
from ..exceptions import AssociationError
from ..part10 import read_file_meta
from ..uids import ExplicitVRLittleEndian, ImplicitVRLittleEndian

if TYPE_CHECKING:
    from ..ae import AE

__all__ = ["SendReport", "SendResult", "collect_files", "plan_contexts", "send_files"]


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


def inspect_file(path: str) -> FileInfo | SendResult:
    try:
        with open(path, "rb") as fp:
            meta = read_file_meta(fp)
            size = os.fstat(fp.fileno()).st_size
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
        got = inspect_file(p)
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

    async def one_association() -> None:
        if queue.empty():
            return
        try:
            async with ae.associate(
                host, port, called_ae, contexts=specs, async_ops=(window, 1), ssl=ssl, server_hostname=server_hostname
            ) as assoc:

                async def worker() -> None:
                    while not queue.empty():
                        it = queue.get_nowait()
                        if not assoc.is_established:
                            record(SendResult(it.path, it.size, error=assoc.end_reason or "association lost"))
                            continue
                        try:
                            status = await assoc.c_store(it.path)
                            record(SendResult(it.path, it.size, status=status))
                        except AssociationError as exc:
                            record(SendResult(it.path, it.size, error=str(exc)))
                        except (OSError, ValueError) as exc:
                            record(SendResult(it.path, it.size, error=f"{type(exc).__name__}: {exc}"))

                await asyncio.gather(*(worker() for _ in range(max(1, window))))
        except AssociationError as exc:
            while not queue.empty():
                it = queue.get_nowait()
                record(SendResult(it.path, it.size, error=str(exc)))

    await asyncio.gather(*(one_association() for _ in range(max(1, associations))))
    report.seconds = loop.time() - started
    return report
