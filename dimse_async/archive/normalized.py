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
from ..services.storage import STORAGE_SOP_CLASSES
from .commitment import CommitmentSCP
from .db import instance_availability
from .mpps import MPPS, MPPSStore

__all__ = [
    "INSTANCE_AVAILABILITY",
    "MAX_NOTIFIED_INSTANCES",
    "MPPS",
    "STORAGE_COMMITMENT",
    "AvailabilityNotifier",
    "Extras",
    "install_normalized",
    "split_availability",
]


#: Instances one notification lists at most: a receiver bounds the sequence items of a
#: request (ours: ``MAX_N_REQUEST_ITEMS``, 20,000), so a study of 30,000 images in one
#: N-CREATE would be refused, and sent again, for ever.
MAX_NOTIFIED_INSTANCES = 5_000


def split_availability(av: Availability, max_instances: int) -> list[Availability]:
    """``av`` as notifications of at most ``max_instances`` instances each (PS3.4 R.3.2.1.2:
    an SCU may notify any set of instances): whole series together while they fit, a
    larger series over several; each part references the procedure steps of ``av``."""
    parts: list[Availability] = []
    current: dict[str, list[tuple[str, str]]] = {}
    count = 0
    for series_uid, instances in av.series.items():
        for start in range(0, max(len(instances), 1), max_instances):
            chunk = instances[start : start + max_instances]
            if count and count + len(chunk) > max_instances:
                parts.append(_part(av, current))
                current, count = {}, 0
            current.setdefault(series_uid, []).extend(chunk)
            count += len(chunk)
    if current or not parts:
        parts.append(_part(av, current))
    return parts


def _part(av: Availability, series: dict[str, list[tuple[str, str]]]) -> Availability:
    uids = {uid for instances in series.values() for _c, uid in instances}
    return Availability(
        av.study_uid,
        series,
        av.availability,
        av.retrieve_ae,
        list(av.procedure_steps),
        {uid: value for uid, value in av.instance_availability.items() if uid in uids},
    )


class AvailabilityNotifier:
    """Sends an Instance Availability Notification (R.3) to each destination AE when a
    study is complete - no new instance for ``delay`` seconds - or on demand
    (:meth:`notify`). Destinations are AE titles from ``known_aes``.

    Every instance the index holds in the study is listed: ONLINE when its file is
    there at the size it was stored at, UNAVAILABLE when it is gone or cut short (a
    retrieve would fail it; PS3.3 C.4.23.1.1), the archive's AE title to retrieve
    from. With ``mpps`` (the MPPS SCP's store) the notification references the
    performed procedure steps of the study whose Performed Series Sequence names one
    of its series (R.3.4.1.1: the relationship to the PPS)."""

    def __init__(
        self,
        archive: Any,
        ae: Any,
        destinations: list[str],
        delay: float = 60.0,
        *,
        retries: int = 3,
        retry_interval: float = 5.0,
        mpps: MPPSStore | None = None,
        max_instances: int = MAX_NOTIFIED_INSTANCES,
    ):
        self.archive = archive
        self.ae = ae
        self.mpps = mpps
        #: Instances one N-CREATE lists at most; a larger study goes in several (R.3.2.1.2).
        self.max_instances = max_instances
        self.destinations = destinations
        self.delay = delay
        #: A notification that fails is sent again ``retries`` times, ``retry_interval``
        #: seconds apart (times the attempt), each destination on its own.
        self.retries = retries
        self.retry_interval = retry_interval
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
        """What the study's notification says (see the class)."""

        def rows() -> Any:
            return (
                self.archive.connection()
                .execute(
                    "SELECT i.series_uid, i.sop_class, i.sop_uid, i.path, i.size FROM instances i JOIN series s "
                    "ON i.series_uid = s.series_uid WHERE s.study_uid = ? ORDER BY i.series_uid, i.sop_uid",
                    (study_uid,),
                )
                .fetchall()
            )

        found = await self.archive.in_index_thread(rows)

        def unavailable() -> dict[str, str]:  # a stat per instance, off the event loop
            availability = ((sop_uid, instance_availability(path, size)) for _se, _c, sop_uid, path, size in found)
            return {sop_uid: value for sop_uid, value in availability if value != "ONLINE"}

        av = Availability(
            study_uid,
            group_instances((series, sop_class, sop_uid) for series, sop_class, sop_uid, _p, _s in found),
            retrieve_ae=self.ae.ae_title,
            instance_availability=await asyncio.to_thread(unavailable),
        )
        if self.mpps is not None and av.series:
            for step in await self.mpps.find(study_uid=study_uid):
                performed = {
                    str(item.get("SeriesInstanceUID") or "") for item in step.get("PerformedSeriesSequence") or []
                }
                if performed & av.series.keys():
                    av.procedure_steps.append((MPPS, str(step.SOPInstanceUID)))
        return av

    async def notify(self, study_uid: str) -> list[tuple[str, str]]:
        """Send the study's notification to every destination now (at once, each retried
        on its own): [(destination, outcome)]."""
        av = await self.availability(study_uid)
        outcomes = await asyncio.gather(*(self._notify_one(dest, av) for dest in self.destinations))
        return list(zip(self.destinations, outcomes, strict=True))

    async def _notify_one(self, dest: str, av: Availability) -> str:
        where = self.ae.known_aes.get(dest)
        if where is None:
            outcome = "not in known_aes"
        elif not av.count:
            outcome = "no instances"
        else:
            parts = split_availability(av, self.max_instances)
            outcomes = [await self._send(dest, where, part) for part in parts]
            failed = [o for o in outcomes if not o.startswith("sent")]
            outcome = failed[0] if failed else outcomes[0] if len(parts) == 1 else f"sent ({len(parts)} notifications)"
        (self.log.info if outcome.startswith("sent") else self.log.warning)(
            "instance availability notification",
            study_uid=av.study_uid,
            destination=dest,
            instances=av.count,
            outcome=outcome,
        )
        self.sent.append((av.study_uid, dest, outcome))
        del self.sent[:-1000]
        return outcome

    async def _send(self, dest: str, where: tuple[str, int], av: Availability) -> str:
        """Send, retried: "sent" (with the attempt when not the first) or "failed: ..."."""
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(self.retry_interval * attempt)
            try:
                await send_notification(self.ae, where[0], where[1], dest, av)
            except Exception as exc:
                if attempt == self.retries:
                    return f"failed: {exc}"
                self.log.warning(
                    "instance availability notification attempt failed",
                    study_uid=av.study_uid,
                    destination=dest,
                    attempt=attempt + 1,
                    error=str(exc)[:200],
                )
            else:
                return "sent" + (f" (attempt {attempt + 1})" if attempt else "")
        raise AssertionError("unreachable")  # pragma: no cover

    async def close(self, timeout: float = 10.0) -> None:
        """Shutdown: studies not yet due are not announced (one line says how many);
        notifications under way get ``timeout`` seconds, then are abandoned (logged)."""
        if self._timers:
            self.log.warning(
                "instance availability notifications not sent at shutdown: studies still receiving",
                studies=len(self._timers),
            )
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)
        left = list(self._tasks)
        for task in left:
            task.cancel()
        if left:
            self.log.warning("instance availability notifications abandoned at shutdown", notifications=len(left))
            await asyncio.wait(left, timeout=timeout)


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
            storage_classes=[*STORAGE_SOP_CLASSES, *config.storage_classes],
        )
        extras.commitment.install(ae)
    if config.mpps:
        extras.mpps = MPPSStore(archive.root)
        extras.mpps.install(ae)
    if config.ian_destinations:
        extras.availability = AvailabilityNotifier(
            archive,
            ae,
            list(config.ian_destinations),
            config.ian_delay,
            retries=config.ian_retries,
            retry_interval=config.ian_retry_interval,
            mpps=extras.mpps,
        )
        extras.availability.install(ae)
    return extras
