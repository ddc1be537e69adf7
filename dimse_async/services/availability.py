"""Instance Availability Notification (PS3.4 Annex R), SCU and SCP helpers.

The SCU tells another AE (a RIS, a workflow manager) which instances of a study
are available, and where: an N-CREATE of the Instance Availability Notification SOP
Class with a new SOP Instance UID and the attributes of R.3.1 (Table R.3-1). The
SCP side is a plain ``@ae.on_n_create(sop_class=INSTANCE_AVAILABILITY)`` handler;
:func:`parse_notification` turns its data set into :class:`Availability`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import field
from typing import TYPE_CHECKING, Any

from ..acse import ContextSpec
from ..exceptions import DIMSEFailure
from ..lazy_dataclass import dataclass
from ..uids import DEFAULT_TRANSFER_SYNTAXES
from .normalized import NRequest, NResult

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

__all__ = ["INSTANCE_AVAILABILITY", "Availability", "notification_dataset", "parse_notification", "send_notification"]

#: Instance Availability Notification SOP Class (PS3.4 R.2).
INSTANCE_AVAILABILITY = "1.2.840.10008.5.1.4.33"


@dataclass(slots=True)
class Availability:
    """One study's available instances: series UID -> [(SOP class, SOP instance)]."""

    study_uid: str
    series: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    availability: str = "ONLINE"
    retrieve_ae: str = ""
    #: Referenced Performed Procedure Steps: (SOP class, SOP instance) pairs.
    procedure_steps: list[tuple[str, str]] = field(default_factory=list)

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.series.values())


def notification_dataset(av: Availability) -> Dataset:
    """The N-CREATE attribute list (R.3.1, Table R.3-1)."""
    from pydicom.dataset import Dataset

    ds = Dataset()
    steps = []
    for sop_class, sop_instance in av.procedure_steps:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        steps.append(item)
    ds.ReferencedPerformedProcedureStepSequence = steps
    ds.StudyInstanceUID = av.study_uid
    series_items = []
    for series_uid, instances in av.series.items():
        s = Dataset()
        s.SeriesInstanceUID = series_uid
        refs = []
        for sop_class, sop_instance in instances:
            r = Dataset()
            r.ReferencedSOPClassUID = sop_class
            r.ReferencedSOPInstanceUID = sop_instance
            r.InstanceAvailability = av.availability
            if av.retrieve_ae:
                r.RetrieveAETitle = av.retrieve_ae
            refs.append(r)
        s.ReferencedSOPSequence = refs
        series_items.append(s)
    ds.ReferencedSeriesSequence = series_items
    return ds


def parse_notification(request: NRequest) -> Availability:
    """What a received notification says (raises ``ValueError`` if it is not one)."""
    ds = request.dataset
    if ds is None or not ds.get("StudyInstanceUID"):
        raise ValueError("no Study Instance UID")
    av = Availability(str(ds.StudyInstanceUID))
    for s in ds.get("ReferencedSeriesSequence") or []:
        refs = av.series.setdefault(str(s.get("SeriesInstanceUID", "")), [])
        for r in s.get("ReferencedSOPSequence") or []:
            refs.append((str(r.get("ReferencedSOPClassUID", "")), str(r.get("ReferencedSOPInstanceUID", ""))))
            av.availability = str(r.get("InstanceAvailability") or av.availability)
            av.retrieve_ae = str(r.get("RetrieveAETitle") or av.retrieve_ae)
    for item in ds.get("ReferencedPerformedProcedureStepSequence") or []:
        av.procedure_steps.append(
            (str(item.get("ReferencedSOPClassUID", "")), str(item.get("ReferencedSOPInstanceUID", "")))
        )
    return av


async def send_notification(
    ae: Any, host: str, port: int, called_ae: str, availability: Availability, **associate_kwargs: Any
) -> NResult:
    """N-CREATE one notification on a new association; raises ``DIMSEFailure`` on a failure status."""
    from pydicom.uid import generate_uid

    contexts = [ContextSpec(INSTANCE_AVAILABILITY, list(DEFAULT_TRANSFER_SYNTAXES))]
    async with ae.associate(host, port, called_ae, contexts=contexts, **associate_kwargs) as assoc:
        result: NResult = await assoc.n_create(
            INSTANCE_AVAILABILITY, generate_uid(), notification_dataset(availability)
        )
    if result.status.is_failure:
        raise DIMSEFailure(f"instance availability notification refused: {result.status!r}")
    return result


def group_instances(rows: Iterable[tuple[str, str, str]]) -> dict[str, list[tuple[str, str]]]:
    """(series UID, SOP class, SOP instance) rows by series."""
    out: dict[str, list[tuple[str, str]]] = {}
    for series_uid, sop_class, sop_instance in rows:
        out.setdefault(series_uid, []).append((sop_class, sop_instance))
    return out
