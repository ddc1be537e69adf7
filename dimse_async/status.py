"""DIMSE status codes and their categories (PS3.7 Annex C; PS3.4 per service class). Pure."""

from __future__ import annotations

from collections.abc import Iterable
from enum import IntEnum, StrEnum

__all__ = [
    "ATTRIBUTE_LIST_CODES",
    "PENDING_CODES",
    "Code",
    "Status",
    "StatusCategory",
    "offending_element_allowed",
    "response_status",
]


class StatusCategory(StrEnum):
    """The category of a status code (PS3.7 C.1). Compares equal to its lower-case name."""

    SUCCESS = "success"
    PENDING = "pending"
    CANCEL = "cancel"
    WARNING = "warning"
    FAILURE = "failure"


class Code(IntEnum):
    """Status codes this library sends or interprets (PS3.7 Annex C, PS3.4 B.2.3, C.4)."""

    SUCCESS = 0x0000
    PENDING = 0xFF00
    PENDING_WARNING = 0xFF01
    CANCEL = 0xFE00
    # warnings
    ATTRIBUTE_LIST_ERROR = 0x0107
    COERCION_OF_DATA_ELEMENTS = 0xB000  # C-STORE; also "sub-operations with failures" (C-GET/C-MOVE)
    SUBOPERATIONS_WARNING = 0xB000
    ELEMENTS_DISCARDED = 0xB006
    DATASET_DOES_NOT_MATCH_SOP_CLASS_WARNING = 0xB007
    # failures
    PROCESSING_FAILURE = 0x0110
    NO_SUCH_SOP_CLASS = 0x0118
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    NOT_AUTHORIZED = 0x0124
    UNRECOGNIZED_OPERATION = 0x0211
    OUT_OF_RESOURCES = 0xA700
    OUT_OF_RESOURCES_MATCHES = 0xA701
    OUT_OF_RESOURCES_SUBOPERATIONS = 0xA702
    MOVE_DESTINATION_UNKNOWN = 0xA801
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900  # "identifier does not match SOP class" in Q/R
    CANNOT_UNDERSTAND = 0xC000


_WARNING_CODES = frozenset({0x0001, 0x0107, 0x0116})

#: The codes of a pending (non-final) response.
PENDING_CODES = frozenset({Code.PENDING, Code.PENDING_WARNING})

#: The DIMSE-N statuses whose response names the attributes concerned in Attribute
#: Identifier List (0000,1005) (PS3.7 Annex C): 0x0105 No Such Attribute, 0x0106 Invalid
#: Attribute Value, 0x0107 Attribute List Error, 0x0116 Attribute Value Out of Range,
#: 0x0120 Missing Attribute, 0x0121 Missing Attribute Value.
ATTRIBUTE_LIST_CODES = frozenset({0x0105, 0x0106, 0x0107, 0x0116, 0x0120, 0x0121})

#: C-STORE warnings whose response may name Offending Element (0000,0901) (PS3.4
#: Table B.2-1): B000 Coercion of Data Elements, B006 Elements Discarded, B007 Data
#: Set does not match SOP Class. (B000 of a C-GET / C-MOVE has counters instead.)
_STORE_WARNINGS_WITH_OFFENDING = frozenset({0xB000, 0xB006, 0xB007})


def offending_element_allowed(code: int, store: bool = False) -> bool:
    """Whether a DIMSE-C response of status ``code`` may carry Offending Element
    (0000,0901): the A9xx (Data Set / Identifier does not match SOP Class) and Cxxx
    (Cannot understand / Unable to process) failures of C-STORE, C-FIND, C-GET and
    C-MOVE (PS3.4 Tables B.2-1, C.4-1, C.4-2, C.4-3), and ``store``'s warnings B000,
    B006 and B007. Never 0xA7xx, 0xA801, 0x0122 (Error Comment only)."""
    return 0xA900 <= code <= 0xA9FF or 0xC000 <= code <= 0xCFFF or (store and code in _STORE_WARNINGS_WITH_OFFENDING)


class Status(int):
    """A DIMSE status code with its optional error comment (PS3.7 Annex C) and the
    tags (ints, ``0xGGGGEEEE``) of the attributes it is about.

    A DIMSE-N SCP handler returns e.g. ``Status(0x0120, "PatientID is required",
    attributes=[0x00100020])``: for the codes in :data:`ATTRIBUTE_LIST_CODES` the
    response carries them as Attribute Identifier List (0000,1005); an N-response
    received with that field has them here (empty when it has none). A DIMSE-C
    handler's ``Status(0xA900, "...", attributes=[0x00080052])`` names them in
    Offending Element (0000,0901) where the status allows it
    (:func:`offending_element_allowed`); a C-response received with it has them here.
    """

    SUCCESS = Code.SUCCESS
    PENDING = Code.PENDING
    PENDING_WARNING = Code.PENDING_WARNING
    CANCEL = Code.CANCEL

    error_comment: str | None
    attributes: tuple[int, ...] = ()
    #: Error ID (0000,0903): the code a service class gives one failure (PS3.7 Annex C;
    #: e.g. 0xA710 for an MPPS that may no longer be updated, PS3.4 Table F.7.2-2).
    error_id: int | None = None

    def __new__(
        cls, code: int, error_comment: str | None = None, attributes: Iterable[int] = (), error_id: int | None = None
    ) -> Status:
        obj = super().__new__(cls, code)
        obj.error_comment = error_comment
        if attributes:
            obj.attributes = tuple(int(tag) for tag in attributes)
        if error_id is not None:
            obj.error_id = error_id
        return obj

    @property
    def category(self) -> StatusCategory:
        code = int(self)
        if code == 0x0000:
            return StatusCategory.SUCCESS
        if code in (0xFF00, 0xFF01):
            return StatusCategory.PENDING
        if code == 0xFE00:
            return StatusCategory.CANCEL
        if code in _WARNING_CODES or 0xB000 <= code <= 0xBFFF:
            return StatusCategory.WARNING
        return StatusCategory.FAILURE

    @property
    def is_success(self) -> bool:
        return self == 0

    @property
    def is_pending(self) -> bool:
        return self.category is StatusCategory.PENDING

    @property
    def is_failure(self) -> bool:
        return self.category is StatusCategory.FAILURE

    def __repr__(self) -> str:
        extra = f", {self.error_comment!r}" if self.error_comment else ""
        if self.error_id is not None:
            extra += f", error_id=0x{self.error_id:04X}"
        if self.attributes:
            extra += ", attributes=[" + ", ".join(f"({t >> 16:04X},{t & 0xFFFF:04X})" for t in self.attributes) + "]"
        return f"Status(0x{int(self):04X} {self.category.value}{extra})"

    __str__ = __repr__


def response_status(
    status: int | None,
    error_comment: str | None = None,
    attributes: Iterable[int] | None = None,
    error_id: int | None = None,
) -> Status:
    """The status a received response carries (with its error comment, Attribute
    Identifier List or Offending Element, and Error ID, if any); a response without
    one is a failure (0xC000)."""
    if status is None:
        return Status(Code.CANNOT_UNDERSTAND, "response has no status")
    return Status(status, error_comment, attributes or (), error_id)
