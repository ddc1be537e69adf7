"""The association users hold: the adapter plus the DIMSE-C operations (PS3.7 §9.1).

:class:`Association` adds ``c_echo``, ``c_store``, ``c_find``, ``c_get`` and ``c_move``
on top of :class:`~dimse_async.association.AssociationProtocol`; each is a thin call
into its service class module, which uses only the adapter's public interface.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .association import AssociationProtocol
from .interface import StoreHandler
from .services.store_scu import PreparedFile, c_store
from .status import Status

if TYPE_CHECKING:  # loaded when first used: they need pydicom, a C-STORE or C-ECHO does not
    from pydicom.dataset import Dataset

    from .services import qr
    from .services.commitment import CommitmentResult
    from .services.normalized import NResult

__all__ = ["Association"]


class Association(AssociationProtocol):
    """A DICOM association, requestor or acceptor side.

    Users get one from ``AE.associate()`` (requestor) or in SCP handlers as
    ``request.assoc`` (acceptor). DIMSE operations: :meth:`c_echo`, :meth:`c_store`,
    :meth:`c_find`, :meth:`c_get`, :meth:`c_move`; the life cycle: :meth:`release`,
    :meth:`abort`, :meth:`wait_closed`.
    """

    async def c_echo(self, *, timeout: float | None = None) -> Status:
        """C-ECHO (PS3.7 §9.1.5, PS3.4 Annex A): returns the response status."""
        from .services import verification  # (loaded by the first C-ECHO: a send does without it)

        return await verification.c_echo(self, timeout=timeout)

    async def c_store(
        self,
        source: Dataset | str | os.PathLike[str] | PreparedFile,
        *,
        priority: int = 0,
        move_originator: tuple[str, int] | None = None,
        timeout: float | None = None,
    ) -> Status:
        """C-STORE one instance (PS3.7 §9.1.1): a pydicom ``Dataset`` or a Part 10 file path
        (or a :class:`~dimse_async.services.store_scu.PreparedFile`).

        A file in an accepted transfer syntax is streamed from disk without decoding.
        Pipelines with other calls up to the negotiated window, e.g.
        ``await asyncio.gather(*(assoc.c_store(p) for p in paths))``.
        """
        return await c_store(self, source, priority=priority, move_originator=move_originator, timeout=timeout)

    def c_find(
        self, query: Dataset, model: str = "study", *, priority: int = 0, timeout: float | None = None
    ) -> qr.Responses[Dataset]:
        """C-FIND (PS3.4 C.4.1, K.4): ``async with assoc.c_find(query) as responses:``
        then ``async for identifier in responses``.

        ``model``: "patient", "study", "patient-study", "worklist" or a SOP class UID.
        Leaving the ``async with`` block early sends C-CANCEL; ``.status`` holds the final status.
        ``timeout``: seconds to wait for each response (default: the AE's ``dimse_timeout``);
        expiry aborts the association (:class:`AssociationTimeout`).
        """
        from .services import qr

        return qr.c_find(self, query, model, priority=priority, timeout=timeout)

    def c_get(
        self,
        query: Dataset,
        model: str = "study",
        *,
        priority: int = 0,
        store: StoreHandler | None = None,
        timeout: float | None = None,
    ) -> qr.Responses[qr.Progress]:
        """C-GET (PS3.4 C.4.3): yields :class:`~dimse_async.services.qr.Progress`.

        Instances arrive as C-STORE sub-operations on this association (propose the
        storage classes with ``scp_role=True``) and go to ``store`` or the C-STORE handler.
        """
        from .services import qr

        return qr.c_get(self, query, model, priority=priority, store=store, timeout=timeout)

    def c_move(
        self, query: Dataset, destination: str, model: str = "study", *, priority: int = 0, timeout: float | None = None
    ) -> qr.Responses[qr.Progress]:
        """C-MOVE (PS3.4 C.4.2) to the AE titled ``destination``: yields progress
        (``timeout``: per response, as for :meth:`c_find`)."""
        from .services import qr

        return qr.c_move(self, query, destination, model, priority=priority, timeout=timeout)

    # ------------------------------------------------------------ DIMSE-N (PS3.7 §10.1)

    async def n_event_report(
        self,
        sop_class: str,
        sop_instance: str,
        event_type_id: int,
        event_information: Dataset | None = None,
        *,
        timeout: float | None = None,
    ) -> NResult:
        """N-EVENT-REPORT (PS3.7 §10.1.1), sent as the SCP of ``sop_class``."""
        from .services import normalized

        return await normalized.n_event_report(
            self, sop_class, sop_instance, event_type_id, event_information, timeout=timeout
        )

    async def n_get(
        self, sop_class: str, sop_instance: str, attributes: list[int] | None = None, *, timeout: float | None = None
    ) -> NResult:
        """N-GET (PS3.7 §10.1.2): ``result.dataset`` holds the attributes asked for (tags as ints)."""
        from .services import normalized

        return await normalized.n_get(self, sop_class, sop_instance, attributes, timeout=timeout)

    async def n_set(
        self, sop_class: str, sop_instance: str, modifications: Dataset, *, timeout: float | None = None
    ) -> NResult:
        """N-SET (PS3.7 §10.1.3) with a modification list."""
        from .services import normalized

        return await normalized.n_set(self, sop_class, sop_instance, modifications, timeout=timeout)

    async def n_action(
        self,
        sop_class: str,
        sop_instance: str,
        action_type_id: int,
        action_information: Dataset | None = None,
        *,
        timeout: float | None = None,
    ) -> NResult:
        """N-ACTION (PS3.7 §10.1.4); ``result.dataset`` is the action reply, if any."""
        from .services import normalized

        return await normalized.n_action(
            self, sop_class, sop_instance, action_type_id, action_information, timeout=timeout
        )

    async def n_create(
        self,
        sop_class: str,
        sop_instance: str | None = None,
        attributes: Dataset | None = None,
        *,
        timeout: float | None = None,
    ) -> NResult:
        """N-CREATE (PS3.7 §10.1.5); ``result.sop_instance_uid`` is the instance created."""
        from .services import normalized

        return await normalized.n_create(self, sop_class, sop_instance, attributes, timeout=timeout)

    async def n_delete(self, sop_class: str, sop_instance: str, *, timeout: float | None = None) -> NResult:
        """N-DELETE (PS3.7 §10.1.6)."""
        from .services import normalized

        return await normalized.n_delete(self, sop_class, sop_instance, timeout=timeout)

    async def request_commitment(self, references: list[tuple[str, str]], *, timeout: float = 60.0) -> CommitmentResult:
        """Storage commitment on this association (PS3.4 J.3.2): N-ACTION, then wait up to
        ``timeout`` s for the report, here or on a new association to our AE."""
        from .services.commitment import request_commitment_on

        return await request_commitment_on(self, references, timeout=timeout)
