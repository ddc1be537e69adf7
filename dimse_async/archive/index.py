"""A small archive: received files on disk plus an index (SQLite, or PostgreSQL
shared by several nodes), served by
C-STORE, C-FIND, C-GET and C-MOVE handlers (PS3.4 Annex B, C) and an optional
modality worklist (Annex K) from a directory of worklist files.

The index holds one row per patient, study, series and instance with the
attributes PS3.4 C.6 lists as keys; a query is narrowed in SQL by its exact UID
/ ID / date keys and then matched in full with :mod:`.matching`. All database work
runs on worker threads, so the event loop never waits on the database.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from typing import TYPE_CHECKING, Any

from ..dimse import Status
from ..services.qr import MODELS, QueryRequest, StatusError
from .db import (
    DUPLICATE_POLICIES,
)
from .ingest import IngestMixin
from .query import QueryMixin
from .schema import (
    LEVEL_KEYS,
    IndexingError,
    relational_queries,
)
from .worklist import Worklist

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from ..ae import AE
    from ..services.storage import StoreRequest
    from ..space import StorageSpace

__all__ = ["DUPLICATE_POLICIES", "LEVEL_KEYS", "Archive", "IndexingError", "Worklist", "relational_queries"]


class Archive(IngestMixin, QueryMixin):
    """Files under ``root`` and their index (``root/index.sqlite``, or PostgreSQL: ``index``)."""

    def install(self, ae: AE, worklist: Worklist | None = None) -> None:
        """Register this archive's handlers (and a worklist's, if given) on ``ae``."""
        worklist_uid = MODELS["worklist"]["find"]

        async def on_c_find(request: QueryRequest) -> AsyncIterator[Dataset]:
            if request.model == worklist_uid:
                if worklist is None:
                    raise StatusError(Status(0x0122, "Modality worklist not configured"))
                source = worklist.on_c_find(request)
            else:
                source = self.on_c_find(request)
            async for ds in source:
                yield ds

        ae.on_c_store(_StoreHandler(self, ae))
        ae.on_c_find(on_c_find)
        ae.on_c_get(self.on_retrieve)
        ae.on_c_move(self.on_retrieve)


class _StoreHandler:
    """The archive's C-STORE handler as registered: :meth:`Archive.on_c_store`, with the
    storage's :class:`~dimse_async.space.StorageSpace` as ``space``, so a store is
    refused for a full or read-only storage when its command arrives and its data set
    is never spooled (``services.storage.make_spool``). While the AE's modules are
    preloaded (``AE.preloading``), a store waits for them: its index thread would
    otherwise import pydicom beside the preloading thread."""

    __slots__ = ("_archive", "_ae")

    def __init__(self, archive: Archive, ae: AE):
        self._archive, self._ae = archive, ae

    def __call__(self, request: StoreRequest) -> Coroutine[Any, Any, Status]:
        preloading = self._ae.preloading
        if preloading is not None and not preloading.done():
            return self._after(preloading, request)
        return self._archive.on_c_store(request)

    async def _after(self, preloading: asyncio.Future[None], request: StoreRequest) -> Status:
        await asyncio.wait((preloading,))
        return await self._archive.on_c_store(request)

    @property
    def space(self) -> StorageSpace:
        return self._archive.storage_space
