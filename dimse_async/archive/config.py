"""``dimse-async serve`` configuration: a TOML file with sane defaults.

Example::

    ae_title = "ARCHIVE"
    port = 11112
    storage_dir = "/var/lib/dicom"
    worklist_dir = "/var/lib/worklist"        # optional
    allowed_calling_aes = ["CT1", "VIEWER"]   # optional; absent = any
    require_called_ae = false
    duplicates = "keep"                       # or "replace": an instance already stored
    fsync = true                              # flush files and index before answering success
    storage_classes = ["1.2.3.4"]             # extra storage SOP classes to accept

    [known_aes]                               # C-MOVE destinations
    VIEWER = { host = "10.0.0.5", port = 104 }
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..acse import validate_ae_title
from ..part10 import valid_uid

__all__ = ["ServeConfig", "load_config"]


@dataclass
class ServeConfig:
    ae_title: str = "DIMSE_ASYNC"
    host: str = "0.0.0.0"
    port: int = 11112
    storage_dir: str = "dicom-archive"
    worklist_dir: str | None = None
    require_called_ae: bool = False
    allowed_calling_aes: list[str] | None = None
    max_associations: int = 1000
    max_ops: int = 16
    known_aes: dict[str, tuple[str, int]] = field(default_factory=dict)
    #: An instance already stored: "keep" it (default) or "replace" it with a valid new one.
    duplicates: str = "keep"
    #: Flush each stored file and the index to the disk before answering success.
    fsync: bool = True
    #: Storage SOP classes to accept beyond those of PS3.4 Annex B (private ones, say).
    storage_classes: list[str] = field(default_factory=list)


def _known(raw: Any) -> dict[str, tuple[str, int]]:
    if not isinstance(raw, dict):
        raise ValueError("known_aes must be a table of AE title = { host = ..., port = ... }")
    out = {}
    for title, entry in raw.items():
        title = validate_ae_title(title, "known_aes title")
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("host"), str)
            or not isinstance(entry.get("port"), int)
        ):
            raise ValueError(f"known_aes.{title} needs host (string) and port (integer)")
        out[title] = (entry["host"], entry["port"])
    return out


def load_config(path: str | Path | None) -> ServeConfig:
    """Read ``path`` (or return the defaults); unknown keys and bad values are errors."""
    config = ServeConfig()
    if path is None:
        return config
    with open(path, "rb") as f:
        raw = tomllib.load(f)
    names = {f.name for f in fields(ServeConfig)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ValueError(f"{path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    for key, value in raw.items():
        if key == "known_aes":
            value = _known(value)
        elif key == "ae_title":
            value = validate_ae_title(value)
        elif key == "allowed_calling_aes":
            if not isinstance(value, list):
                raise ValueError("allowed_calling_aes must be a list of AE titles")
            value = [validate_ae_title(v, "allowed calling AE title") for v in value]
        elif key in ("port", "max_associations", "max_ops") and not isinstance(value, int):
            raise ValueError(f"{key} must be an integer")
        elif key == "duplicates" and value not in ("keep", "replace"):
            raise ValueError('duplicates must be "keep" or "replace"')
        elif key in ("fsync", "require_called_ae") and not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false")
        elif key == "storage_classes" and not (
            isinstance(value, list) and all(isinstance(v, str) and valid_uid(v) for v in value)
        ):
            raise ValueError("storage_classes must be a list of SOP Class UIDs")
        setattr(config, key, value)
    return config
