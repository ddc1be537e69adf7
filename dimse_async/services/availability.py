"""Instance Availability Notification (PS3.4 Annex R), SCU and SCP helpers.

The SCU tells another AE (a RIS, a workflow manager) which instances of a study
are available, and where: an N-CREATE of the Instance Availability Notification SOP
Class with a new SOP Instance UID and the attributes of R.3.2.1.1 (Table R.3.2-1). The
SCP side is a plain ``@ae.on_n_create(sop_class=INSTANCE_AVAILABILITY)`` handler;
:func:`parse_notification` turns its data set into :class:`Availability`, each
instance's Instance Availability (0008,0056) kept (ONLINE, NEARLINE, OFFLINE or
UNAVAILABLE; PS3.3 C.4.23.1.1), and refuses one that is not a notification.
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

__all__ = [
    "AVAILABILITY_VALUES",
    "INSTANCE_AVAILABILITY",
    "Availability",
    "notification_dataset",
    "parse_notification",
    "send_notification",
]

#: Instance Availability Notification SOP Class (PS3.4 R.2).
INSTANCE_AVAILABILITY = "1.2.840.10008.5.1.4.33"
#: The defined terms of Instance Availability (0008,0056) (PS3.3 C.4.23.1.1).
AVAILABILITY_VALUES = ("ONLINE", "NEARLINE", "OFFLINE", "UNAVAILABLE")


@dataclass(slots=True)
class Availability:
    """One study's available instances: series UID -> [(SOP class, SOP instance)].

    ``availability`` is the Instance Availability of every instance but those in
    ``instance_availability`` (SOP Instance UID -> value), e.g. UNAVAILABLE for a few."""

    study_uid: str
    series: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    availability: str = "ONLINE"
    retrieve_ae: str = ""
    #: Referenced Performed Procedure Steps: (SOP class, SOP instance) pairs.
    procedure_steps: list[tuple[str, str]] = field(default_factory=list)
    #: The instances whose availability is not ``availability``.
    instance_availability: dict[str, str] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.series.values())

    def availability_of(self, sop_instance_uid: str) -> str:
        """The Instance Availability of one instance of the notification."""
        return self.instance_availability.get(sop_instance_uid, self.availability)


def notification_dataset(av: Availability) -> Dataset:
    """The N-CREATE attribute list (R.3.2.1.1, Table R.3.2-1). Raises ``ValueError``
    without a Retrieve AE Title (1/1 for each instance) or with an Instance Availability
    that is none of :data:`AVAILABILITY_VALUES`."""
    from pydicom.dataset import Dataset

    if not av.retrieve_ae:
        raise ValueError("an instance availability notification needs a Retrieve AE Title (PS3.4 Table R.3.2-1)")
    for value in {av.availability, *av.instance_availability.values()}:
        if value not in AVAILABILITY_VALUES:
            raise ValueError(f"Instance Availability {value!r} is none of {', '.join(AVAILABILITY_VALUES)}")
    ds = Dataset()
    steps = []
    for sop_class, sop_instance in av.procedure_steps:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        item.PerformedWorkitemCodeSequence = []  # 2/2: empty for an MPPS
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
            r.InstanceAvailability = av.availability_of(sop_instance)
            r.RetrieveAETitle = av.retrieve_ae
            refs.append(r)
        s.ReferencedSOPSequence = refs
        series_items.append(s)
    ds.ReferencedSeriesSequence = series_items
    return ds


def _text(item: Dataset, keyword: str, where: str) -> str:
    """The one text value of ``keyword`` in ``item`` (1/1 in Table R.3.2-1), else ``ValueError``."""
    value = item.get(keyword)
    if value is None or value == "":
        raise ValueError(f"no {keyword} ({where})")
    if not isinstance(value, str):
        raise ValueError(f"{keyword} is not one value ({where})")
    return str(value).strip()


def parse_notification(request: NRequest) -> Availability:
    """What a received notification says. Raises ``ValueError`` naming the fault when
    it is not one (Table R.3.2-1): no Study Instance UID or series, a series without
    its UID or instances, an instance without its UIDs, Retrieve AE Title or an
    Instance Availability of :data:`AVAILABILITY_VALUES` (the handler answers it
    0x0120 or 0x0106, say). Each instance's availability is kept: ``availability``
    is the most frequent one, the others are in ``instance_availability``."""
    ds = request.dataset
    if ds is None or not ds.get("StudyInstanceUID"):
        raise ValueError("no Study Instance UID")
    av = Availability(_text(ds, "StudyInstanceUID", "notification"))
    values: dict[str, str] = {}
    series = ds.get("ReferencedSeriesSequence")
    if not series:
        raise ValueError("no Referenced Series Sequence item")
    for s in series:
        series_uid = _text(s, "SeriesInstanceUID", "Referenced Series Sequence item")
        where = f"series {series_uid}"
        instances = s.get("ReferencedSOPSequence")
        if not instances:
            raise ValueError(f"no Referenced SOP Sequence item ({where})")
        refs = av.series.setdefault(series_uid, [])
        for r in instances:
            sop_instance = _text(r, "ReferencedSOPInstanceUID", where)
            refs.append((_text(r, "ReferencedSOPClassUID", where), sop_instance))
            value = _text(r, "InstanceAvailability", f"instance {sop_instance}").upper()
            if value not in AVAILABILITY_VALUES:
                raise ValueError(f"Instance Availability {value!r} is not a defined term (instance {sop_instance})")
            values[sop_instance] = value
            retrieve_ae = _text(r, "RetrieveAETitle", f"instance {sop_instance}")  # each instance's (1/1)
            av.retrieve_ae = av.retrieve_ae or retrieve_ae
    counts: dict[str, int] = {}
    for value in values.values():
        counts[value] = counts.get(value, 0) + 1
    av.availability = max(counts, key=lambda v: counts[v])
    av.instance_availability = {uid: value for uid, value in values.items() if value != av.availability}
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
