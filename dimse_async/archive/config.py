"""``dimse-async serve`` configuration: a TOML file with sane defaults.

Example::

    ae_title = "ARCHIVE"
    port = 11112
    storage_dir = "/var/lib/dicom"            # default: ~/.local/share/dimse-async/archive
    worklist_dir = "/var/lib/worklist"        # optional
    allowed_calling_aes = ["CT1", "VIEWER"]   # optional; absent = any
    require_called_ae = false
    duplicates = "keep"                       # or "replace": an instance already stored
    durable = true                            # fsync files, directory and index before answering
                                              #   success (group commit; alias: fsync)
    workers = 2                               # processes sharing the port (SO_REUSEPORT; docs/scale-out.md)
    paused_wait = 5                           # while re-indexing at start-up, a request waits this
                                              #   long, then is rejected-transient
    index = "postgresql://archive@db.example/archive"  # optional; absent = SQLite in storage_dir
    log_operations = true                     # one INFO line per successful operation (else DEBUG)
    storage_classes = ["1.2.3.4"]             # extra storage SOP classes to accept
    transfer_syntaxes = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]  # accepted for storage, in this order

    # Deployment (docs/deployment.md); all optional:
    tls_cert = "/etc/dicom/server.pem"        # enables TLS (PS3.15 B.9, BCP 195)
    tls_key = "/etc/dicom/server.key"
    tls_ca = "/etc/dicom/clients-ca.pem"      # verify client certificates
    tls_require_client_cert = true            # mutual TLS
    tls_handshake_timeout = 10
    proxy_protocol = true                     # PROXY v1/v2 header from a load balancer
    trusted_proxies = ["10.0.0.0/8"]          # only these may send one
    allowed_peer_addresses = ["10.1.2.0/24"]  # client addresses allowed to associate
    keepalive_idle = 60                       # TCP keepalive: probe after 60 s idle,
    keepalive_interval = 10                   #   every 10 s,
    keepalive_count = 5                       #   give up after 5
    idle_timeout = 300                        # abort an association silent this long

    # Admission control and bounded input (README, "Hostile clients"); the defaults:
    max_associations = 1000                   # associations at once
    max_per_address = 256                     # ... from one client address
    max_per_calling_ae = 256                  # ... from one calling AE title
    max_pending = 1024                        # connections without an A-ASSOCIATE-RQ yet
    max_pending_per_address = 256             # ... from one address
    busy_pending_timeout = 5                  # once half of max_pending is taken, drop those waiting longer
    ipv6_prefix = 64                          # per-address limits count IPv6 clients by /64 (128: exact)
    pdu_timeout = 60                          # a started PDU must be whole within 60 s
    max_request_dataset = 1048576             # largest C-FIND/GET/MOVE identifier (bytes)
    max_buffered_output = 67108864            # response bytes queued for peers, all associations (and workers)
    abort_artim_timeout = 5                   # after our A-ABORT, seconds for the peer to close
    refusal_log_burst = 5                     # warnings about refused connections: 5 in full
    refusal_log_interval = 10                 #   per kind and address every 10 s, the rest counted
    query_max_matches = 50000                 # a C-FIND (archive or worklist) stops with 0xA700
    query_time_budget = 60                    #   past this many matches or seconds
    retrieve_max_instances = 100000           # a C-GET / C-MOVE of more is refused 0xA702
    relational_retrieve = true                # a C-GET / C-MOVE without the unique keys of the
                                              #   levels above is served by the keys it names;
                                              #   false: refused 0xA900 unless relational
                                              #   retrieval was negotiated (strict hierarchy)
    max_move_associations = 8                 # C-MOVE sub-associations open at once to one
                                              #   destination; more C-MOVEs wait their turn
                                              #   (Pending every 5 s); per worker process
    min_free_space = 1048576                  # bytes; below it stores are refused 0xA700 and
                                              #   /healthz is 503 "storage ... full" (0: off)
    http_host = "0.0.0.0"                     # /healthz and /metrics
    http_port = 8080
    drain_grace = 30                          # on SIGTERM: running associations get 30 s
    drain_delay = 5                           # unready (and rejecting) 5 s before closing the port

    # Storage commitment (PS3.4 Annex J), MPPS (Annex F), availability (Annex R):
    storage_commitment = true                 # act as Storage Commitment Push Model SCP
    commitment_same_association = true        # report on the request's association if still open
    commitment_retries = 3                    # else on a new one to known_aes[requester], retried
    commitment_retry_interval = 5
    commitment_max_references = 10000         # a larger N-ACTION is refused 0x0213 (resource limitation)
    commitment_max_transactions = 64          # transactions in flight (N-ACTION to report); past it,
    commitment_max_per_association = 8        #   or past this many from one association: 0x0213
    mpps = true                               # act as MPPS SCP (N-CREATE / N-SET)
    ian_destinations = ["RIS"]                # send Instance Availability Notifications (known_aes)
    ian_delay = 60                            # a study is complete after 60 s without new instances
    ian_retries = 3                           # a notification that failed is sent again, 5, 10, 15 s
    ian_retry_interval = 5                    #   later (each destination on its own)

    [known_aes]                               # C-MOVE destinations, commitment and IAN peers
    VIEWER = { host = "10.0.0.5", port = 104 }
    RIS = { host = "10.0.0.9", port = 104 }   # each of ian_destinations must be here
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import field, fields
from pathlib import Path
from typing import Any

from ..acse import validate_ae_title
from ..lazy_dataclass import dataclass
from ..part10 import valid_uid
from ..proxy import networks
from ..services.storage import STORE_TRANSFER_SYNTAXES

__all__ = ["ADMISSION_KEYS", "ServeConfig", "check_setting", "default_storage_dir", "load_config"]


def default_storage_dir() -> str:
    """``$XDG_DATA_HOME/dimse-async/archive`` (``~/.local/share/dimse-async/archive``):
    a per-user data directory, not wherever the server happens to be started."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "dimse-async", "archive")


@dataclass
class ServeConfig:
    ae_title: str = "DIMSE_ASYNC"
    host: str = "127.0.0.1"  # loopback unless configured: see README, "Defaults"
    port: int = 11112
    storage_dir: str = field(default_factory=default_storage_dir)
    worklist_dir: str | None = None
    require_called_ae: bool = False
    allowed_calling_aes: list[str] | None = None
    max_associations: int = 1000
    max_ops: int = 16
    known_aes: dict[str, tuple[str, int]] = field(default_factory=dict)
    #: An instance already stored: "keep" it (default) or "replace" it with a valid new one.
    duplicates: str = "keep"
    #: Flush each stored file, its directory entry and the index to the disk before
    #: answering success (TOML ``durable``, or its older name ``fsync``). Directory
    #: flushes are shared by concurrent stores (group commit).
    fsync: bool = True
    #: Storage SOP classes to accept beyond those of PS3.4 Annex B (private ones, say).
    storage_classes: list[str] = field(default_factory=list)
    #: Transfer syntaxes accepted for storage, in order of preference (the first one the
    #: peer proposes wins; on C-GET contexts the retrieving peer's order wins instead).
    transfer_syntaxes: list[str] = field(default_factory=lambda: list(STORE_TRANSFER_SYNTAXES))
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    tls_require_client_cert: bool = False
    tls_handshake_timeout: float = 10.0
    proxy_protocol: bool = False
    trusted_proxies: list[str] = field(default_factory=lambda: ["127.0.0.1", "::1"])
    allowed_peer_addresses: list[str] | None = None
    keepalive_idle: float | None = None
    keepalive_interval: float = 10.0
    keepalive_count: int = 5
    idle_timeout: float | None = 300.0
    http_host: str = "127.0.0.1"
    http_port: int | None = None
    drain_grace: float = 30.0
    drain_delay: float = 0.0
    storage_commitment: bool = True
    commitment_same_association: bool = True
    commitment_retries: int = 3
    commitment_retry_interval: float = 5.0
    #: References one storage commitment N-ACTION may carry; past it the request is
    #: refused 0x0213 (resource limitation), nothing checked.
    commitment_max_references: int = 10_000
    #: Storage commitment transactions in flight (from the N-ACTION until the report went
    #: out or failed for good), in all and requested on one association; past either,
    #: an N-ACTION is refused 0x0213 (resource limitation), to be asked again later.
    commitment_max_transactions: int = 64
    commitment_max_per_association: int = 8
    mpps: bool = True
    ian_destinations: list[str] = field(default_factory=list)
    ian_delay: float = 60.0
    #: A notification that failed (destination down, refused) is sent again this many
    #: times, ``ian_retry_interval`` seconds apart (times the attempt).
    ian_retries: int = 3
    ian_retry_interval: float = 5.0
    #: Admission control and bounded input (see ``AE``): caps per client address and
    #: calling AE, on connections not yet associated, the PDU progress timeout and the
    #: largest identifier.
    max_per_address: int = 256
    max_per_calling_ae: int = 256
    max_pending: int = 1024
    max_pending_per_address: int = 256
    #: Once half of ``max_pending`` or more is taken, connections that have waited this
    #: long for their A-ASSOCIATE-RQ are dropped, oldest first, to make room.
    busy_pending_timeout: float = 5.0
    #: The per-address limits count an IPv6 client under its /``ipv6_prefix`` network.
    ipv6_prefix: int = 64
    pdu_timeout: float | None = 60.0
    max_request_dataset: int = 1 << 20
    #: Bytes queued for peers that have not read them (responses, C-GET sub-operations'
    #: data sets), over all associations (of all workers: each gets
    #: ``max_buffered_output // workers``); past it, peers that do not read get nothing more.
    max_buffered_output: int = 64 << 20
    #: After our A-ABORT, seconds the peer gets to close the connection (ARTIM, PS3.8 §9.1.5).
    abort_artim_timeout: float = 5.0
    #: Warnings about connections refused or rejected: the first ``refusal_log_burst``
    #: per kind and client address in each ``refusal_log_interval`` seconds in full.
    refusal_log_burst: int = 5
    refusal_log_interval: float = 10.0
    #: Every C-FIND the archive runs (Q/R and worklist) stops with 0xA700 (out of
    #: resources, logged) past this many matches or seconds.
    query_max_matches: int = 50_000
    query_time_budget: float = 60.0
    #: A C-GET / C-MOVE matching more instances is refused with 0xA702 (Refused: Out
    #: of Resources - Unable to perform sub-operations, PS3.4 C.4.2.1.5, C.4.3.1.3).
    retrieve_max_instances: int = 100_000
    #: A hierarchical C-GET / C-MOVE names the unique key of every level above its own
    #: (PS3.4 C.4.2.2.1, C.4.3.2.1), else it is refused 0xA900 naming the missing key,
    #: unless the requestor negotiated relational retrieval (C.5.2.1.1, C.5.3.1.1).
    #: ``True`` (the default) serves such requests anyway, as Orthanc and dcm4chee-arc do:
    #: many SCUs send them without negotiating relational retrieval (DCMTK ``getscu`` /
    #: ``movescu`` in their default Patient Root model by Study Instance UID alone, an
    #: IMAGE level retrieve by SOP Instance UIDs alone). ``False``: the strict hierarchy.
    relational_retrieve: bool = True
    #: C-MOVE sub-associations open at once to one destination (per process: with
    #: ``workers`` N, each worker's, N times this in all), over all C-MOVEs: more C-MOVEs
    #: to it wait their turn, sent a Pending response every 5 s (a C-CANCEL ends the
    #: wait), so requestors cannot make the archive flood a destination with associations.
    max_move_associations: int = 8
    #: Bytes the storage directory's file system must keep available: below it every
    #: C-STORE is refused 0xA700 ("storage full", PS3.4 B.2.3) and ``/healthz`` answers
    #: 503 ``storage ... full`` (a load balancer sends studies elsewhere); both recover
    #: by themselves once room is made. 0: stores fail only when a write does.
    min_free_space: int = 1 << 20
    #: Worker processes sharing the port (SO_REUSEPORT), supervised by the parent;
    #: each admits max_associations // workers associations.
    workers: int = 1
    #: While the archive is re-indexed at start-up (the port already bound), an
    #: association request waits this many seconds, then is rejected-transient.
    paused_wait: float = 5.0
    #: The index database: absent for ``index.sqlite`` in ``storage_dir``, or a
    #: ``postgresql://`` URL shared by several nodes (docs/scale-out.md).
    index: str | None = None
    #: One INFO line per successful operation (UID, status, bytes, ms); else at DEBUG.
    log_operations: bool = False


#: Settings that are also ``serve`` command line flags (``--max-per-address`` ...).
ADMISSION_KEYS = (
    "max_per_address",
    "max_per_calling_ae",
    "max_pending",
    "max_pending_per_address",
    "busy_pending_timeout",
    "ipv6_prefix",
    "pdu_timeout",
    "max_request_dataset",
    "max_buffered_output",
    "abort_artim_timeout",
    "refusal_log_burst",
    "refusal_log_interval",
)

_TYPES: dict[str, tuple[type, ...]] = {
    "max_per_address": (int,),
    "max_per_calling_ae": (int,),
    "max_pending": (int,),
    "max_pending_per_address": (int,),
    "ipv6_prefix": (int,),
    "busy_pending_timeout": (int, float),
    "pdu_timeout": (int, float),
    "max_request_dataset": (int,),
    "max_buffered_output": (int,),
    "abort_artim_timeout": (int, float),
    "refusal_log_burst": (int,),
    "refusal_log_interval": (int, float),
    "paused_wait": (int, float),
    "query_max_matches": (int,),
    "query_time_budget": (int, float),
    "tls_cert": (str,),
    "tls_key": (str,),
    "tls_ca": (str,),
    "tls_require_client_cert": (bool,),
    "tls_handshake_timeout": (int, float),
    "proxy_protocol": (bool,),
    "keepalive_idle": (int, float),
    "keepalive_interval": (int, float),
    "keepalive_count": (int,),
    "idle_timeout": (int, float),
    "http_host": (str,),
    "http_port": (int,),
    "drain_grace": (int, float),
    "drain_delay": (int, float),
    "require_called_ae": (bool,),
    "host": (str,),
    "storage_dir": (str,),
    "worklist_dir": (str,),
    "storage_commitment": (bool,),
    "commitment_same_association": (bool,),
    "commitment_retries": (int,),
    "commitment_retry_interval": (int, float),
    "mpps": (bool,),
    "ian_delay": (int, float),
    "ian_retries": (int,),
    "ian_retry_interval": (int, float),
    "log_operations": (bool,),
    "relational_retrieve": (bool,),
}


def _port(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 65535:
        raise ValueError(f"{what} must be an integer 0..65535, not {value!r}")
    return value


def _known(raw: Any) -> dict[str, tuple[str, int]]:
    if not isinstance(raw, dict):
        raise ValueError("known_aes must be a table of AE title = { host = ..., port = ... }")
    out = {}
    for title, entry in raw.items():
        title = validate_ae_title(title, "known_aes title")
        if not isinstance(entry, dict) or not isinstance(entry.get("host"), str) or "port" not in entry:
            raise ValueError(f"known_aes.{title} needs host (string) and port (integer)")
        out[title] = (entry["host"], _port(entry["port"], f"known_aes.{title}.port"))
    return out


def _check(key: str, value: Any) -> Any:
    """``value`` for setting ``key`` checked against its type; ``ValueError`` otherwise."""
    if key == "known_aes":
        return _known(value)
    if key == "ae_title":
        if not isinstance(value, str):
            raise ValueError(f"ae_title must be a string, not {value!r}")
        return validate_ae_title(value)
    if key == "allowed_calling_aes":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError("allowed_calling_aes must be a list of AE titles (strings)")
        return [validate_ae_title(v, "allowed calling AE title") for v in value]
    if key == "port":
        return _port(value, "port")
    if key in (
        "max_associations",
        "max_ops",
        "commitment_max_references",
        "commitment_max_transactions",
        "commitment_max_per_association",
        "retrieve_max_instances",
        "max_move_associations",
        "refusal_log_burst",
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{key} must be a positive integer, not {value!r}")
        return value
    if key in ("busy_pending_timeout", "refusal_log_interval"):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
            raise ValueError(f"{key} must be a positive number of seconds, not {value!r}")
        return value
    if key == "min_free_space":
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"min_free_space must be a number of bytes (0 or more), not {value!r}")
        return value
    if key == "ipv6_prefix":
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 128:
            raise ValueError(f"ipv6_prefix must be a prefix length from 1 to 128, not {value!r}")
        return value
    if key in ("host", "storage_dir", "worklist_dir"):
        if not isinstance(value, str) or not value:
            raise ValueError(f"{key} must be a non-empty string, not {value!r}")
        return value
    if key in ("fsync", "require_called_ae"):
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, not {value!r}")
        return value
    if key == "duplicates":
        if value not in ("keep", "replace"):
            raise ValueError(f'duplicates must be "keep" or "replace", not {value!r}')
        return value
    if key == "ian_destinations":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError("ian_destinations must be a list of AE titles (from known_aes)")
        return [validate_ae_title(v, "IAN destination") for v in value]
    if key == "workers":
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"workers must be an integer of at least 1, not {value!r}")
        return value
    if key == "index":
        if not (isinstance(value, str) and value.startswith(("postgresql://", "postgres://"))):
            raise ValueError("index must be a postgresql:// URL (absent: SQLite in storage_dir)")
        return value
    if key == "transfer_syntaxes":
        if not (isinstance(value, list) and value and all(isinstance(v, str) and valid_uid(v) for v in value)):
            raise ValueError("transfer_syntaxes must be a non-empty list of transfer syntax UIDs")
        return value
    if key == "storage_classes":
        if not (isinstance(value, list) and all(isinstance(v, str) and valid_uid(v) for v in value)):
            raise ValueError("storage_classes must be a list of SOP Class UIDs")
        return value
    if key in ("trusted_proxies", "allowed_peer_addresses"):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{key} must be a list of addresses or CIDR blocks")
        networks(value)  # raises on a bad entry
        return value
    if key == "http_port":
        return _port(value, key)
    if key in _TYPES:
        if not isinstance(value, _TYPES[key]) or (type(value) is bool and bool not in _TYPES[key]):
            raise ValueError(f"{key} must be of type {' or '.join(t.__name__ for t in _TYPES[key])}, not {value!r}")
        return value
    raise ValueError(f"unknown setting {key}")  # pragma: no cover - filtered before


def check_setting(key: str, value: Any) -> Any:
    """``value`` for setting ``key`` (from the command line), checked as in a file."""
    return _check(key, value)


def load_config(path: str | Path | None) -> ServeConfig:
    """Read ``path`` (or return the defaults). An unreadable file, invalid TOML, an
    unknown key or a value of the wrong type is a ``ValueError`` naming the file."""
    config = ServeConfig()
    if path is None:
        return config
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as exc:
        raise ValueError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: invalid TOML: {exc}") from None
    if "durable" in raw:  # the setting's name; "fsync" is the older one
        if "fsync" in raw and raw["fsync"] != raw["durable"]:
            raise ValueError(f"{path}: durable and fsync are the same setting and disagree")
        raw["fsync"] = raw.pop("durable")
    names = {f.name for f in fields(ServeConfig)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ValueError(f"{path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    for key, value in raw.items():
        try:
            setattr(config, key, _check(key, value))
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
    unknown_destinations = [title for title in config.ian_destinations if title not in config.known_aes]
    if unknown_destinations:
        # Else every study's notification to it would fail, one warning each, for ever.
        raise ValueError(
            f"{path}: ian_destinations {', '.join(unknown_destinations)} not in known_aes (no address to send to)"
        )
    return config
