"""``serve``'s normalized services: storage commitment SCP (Annex J), MPPS SCP
(Annex F) and Instance Availability Notification SCU (Annex R), from the config."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from ..dimse import CommandField
from ..log import get_logger
from ..services.availability import INSTANCE_AVAILABILITY, Availability, group_instances, send_notification
from ..services.commitment import STORAGE_COMMITMENT
from .commitment import CommitmentSCP
from .mpps import MPPS, MPPSStore

__all__ = [
    "INSTANCE_AVAILABILITY",
    "MPPS",
    "STORAGE_COMMITMENT",
    "AvailabilityNotifier",
    "Extras",
    "install_normalized",
]


class AvailabilityNotifier:
    """Sends an Instance Availability Notification (R.3) to each destination AE when a
    study is complete - no new instance for ``delay`` seconds - or on demand
    (:meth:`notify`). Destinations are AE titles from ``known_aes``."""

    def __init__(self, archive: Any, ae: Any, destinations: list[str], delay: float = 60.0):
        self.archive = archive
        self.ae = ae
        self.destinations = destinations
        self.delay = delay
        self.log = get_logger("availability")
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        #: (study UID, destination, outcome) of every notification, newest last (bounded).
        self.sent: list[tuple[str, str, str]] = []

    def install(self, ae: Any) -> None:
        """Wrap the archive's C-STORE handler: each stored instance restarts its study's timer."""
        store = ae.handler_for(CommandField.C_STORE_RQ)
        if store is None:
            return

        async def on_c_store(request: Any) -> Any:
            status = await store(request)
            if status is None or int(status) == 0 or 0xB000 <= int(status) <= 0xBFFF:
                self.stored(request.sop_instance_uid)
            return status

        ae.on_c_store(on_c_store)

    def stored(self, sop_instance_uid: str) -> None:
        task = asyncio.ensure_future(self._restart(sop_instance_uid))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _restart(self, sop_instance_uid: str) -> None:
        def study() -> Any:
            return (
                self.archive.connection()
                .execute(
                    "SELECT s.study_uid FROM instances i JOIN series s ON i.series_uid = s.series_uid WHERE i.sop_uid = ?",
                    (sop_instance_uid,),
                )
                .fetchone()
            )

        row = await self.archive.in_index_thread(study)
        if row is None:
            return
        uid = row[0]
        old = self._timers.pop(uid, None)
        if old is not None:
            old.cancel()
        loop = asyncio.get_running_loop()
        self._timers[uid] = loop.call_later(self.delay, self._due, uid)

    def _due(self, study_uid: str) -> None:
        self._timers.pop(study_uid, None)
        task = asyncio.ensure_future(self.notify(study_uid))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def availability(self, study_uid: str) -> Availability:
        def rows() -> Any:
            return (
                self.archive.connection()
                .execute(
                    "SELECT i.series_uid, i.sop_class, i.sop_uid FROM instances i JOIN series s "
                    "ON i.series_uid = s.series_uid WHERE s.study_uid = ? ORDER BY i.series_uid, i.sop_uid",
                    (study_uid,),
                )
                .fetchall()
            )

        return Availability(
            study_uid, group_instances(await self.archive.in_index_thread(rows)), retrieve_ae=self.ae.ae_title
        )

    async def notify(self, study_uid: str) -> list[tuple[str, str]]:
        """Send the study's notification to every destination now: [(destination, outcome)]."""
        av = await self.availability(study_uid)
        out = []
        for dest in self.destinations:
            where = self.ae.known_aes.get(dest)
            if where is None:
                outcome = "not in known_aes"
            elif not av.count:
                outcome = "no instances"
            else:
                try:
                    await send_notification(self.ae, where[0], where[1], dest, av)
                    outcome = "sent"
                except Exception as exc:
                    outcome = f"failed: {exc}"
            (self.log.info if outcome == "sent" else self.log.warning)(
                "instance availability notification",
                study_uid=study_uid,
                destination=dest,
                instances=av.count,
                outcome=outcome,
            )
            out.append((dest, outcome))
            self.sent.append((study_uid, dest, outcome))
            del self.sent[:-1000]
        return out

    async def close(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=10)


class Extras:
    """What :func:`install_normalized` set up, for shutdown and inspection."""

    def __init__(self) -> None:
        self.commitment: CommitmentSCP | None = None
        self.mpps: MPPSStore | None = None
        self.availability: AvailabilityNotifier | None = None

    async def close(self) -> None:
        if self.commitment is not None:
            await self.commitment.close(10)
        if self.availability is not None:
            await self.availability.close()
        if self.mpps is not None:
            with contextlib.suppress(Exception):
                self.mpps.close()


def install_normalized(ae: Any, archive: Any, config: Any) -> Extras:
    """Register the commitment, MPPS and IAN behaviour ``config`` asks for (after ``archive.install``)."""
    extras = Extras()
    if config.storage_commitment:
        extras.commitment = CommitmentSCP(
            archive,
            ae,
            same_association=config.commitment_same_association,
            retries=config.commitment_retries,
            retry_interval=config.commitment_retry_interval,
            max_references=config.commitment_max_references,
            max_transactions=config.commitment_max_transactions,
            max_per_association=config.commitment_max_per_association,
        )
        extras.commitment.install(ae)
    if config.mpps:
        extras.mpps = MPPSStore(archive.root)
        extras.mpps.install(ae)
    if config.ian_destinations:
        extras.availability = AvailabilityNotifier(archive, ae, list(config.ian_destinations), config.ian_delay)
        extras.availability.install(ae)
    return extras
