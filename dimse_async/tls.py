"""TLS for DICOM associations (PS3.15 Annex B.9, BCP 195 secure transport connection profile).

:func:`server_context` and :func:`client_context` build :class:`ssl.SSLContext` objects
with BCP 195 defaults (RFC 9325): TLS 1.2 or later, forward-secret AEAD cipher suites
only, no compression, no renegotiation. Pass them to ``AE.start_server(ssl=...)`` and
``AE.associate(ssl=...)``. :func:`session_info` describes an established connection,
including the peer certificate's subject (``Association.tls``).
"""

from __future__ import annotations

import ssl
from dataclasses import field
from typing import Any

from .lazy_dataclass import dataclass

__all__ = [
    "TLSInfo",
    "client_context",
    "handshake_error",
    "harden",
    "server_context",
    "session_info",
    "subject_text",
]

# TLS 1.2 suites allowed by BCP 195 (RFC 9325 §4.2): ECDHE/DHE key exchange with AES-GCM or
# ChaCha20-Poly1305. TLS 1.3 suites are all AEAD and stay at OpenSSL's defaults.
BCP195_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL:!MD5:!DSS:!SHA1"


def harden(ctx: ssl.SSLContext) -> ssl.SSLContext:
    """Apply the BCP 195 profile to ``ctx`` in place (PS3.15 B.9): TLS 1.2+, AEAD suites."""
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(BCP195_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    return ctx


def server_context(
    certfile: str,
    keyfile: str | None = None,
    *,
    cafile: str | None = None,
    require_client_cert: bool = False,
    password: str | None = None,
) -> ssl.SSLContext:
    """An acceptor's context: our certificate chain (PEM) and key.

    With ``cafile``, client certificates signed by those CAs are verified when offered;
    ``require_client_cert`` refuses clients without one (mutual TLS).
    """
    ctx = harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    ctx.load_cert_chain(certfile, keyfile, password)
    if cafile is not None:
        ctx.load_verify_locations(cafile)
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    elif require_client_cert:
        raise ValueError("require_client_cert needs a CA file to verify client certificates against")
    return ctx


def client_context(
    cafile: str | None = None,
    *,
    certfile: str | None = None,
    keyfile: str | None = None,
    verify: bool = True,
    check_hostname: bool = True,
    password: str | None = None,
) -> ssl.SSLContext:
    """A requestor's context: verify the server against ``cafile`` (default: the system
    store); ``certfile``/``keyfile`` present our certificate (mutual TLS).

    ``verify=False`` encrypts without authenticating the server (testing only).
    """
    ctx = harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    if verify:
        if cafile is not None:
            ctx.load_verify_locations(cafile)
        else:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
        ctx.check_hostname = check_hostname
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if certfile is not None:
        ctx.load_cert_chain(certfile, keyfile, password)
    return ctx


_SHORT = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "stateOrProvinceName": "ST",
    "localityName": "L",
    "domainComponent": "DC",
    "emailAddress": "emailAddress",
    "serialNumber": "serialNumber",
}


def subject_text(name: Any) -> str:
    """A certificate name from :meth:`ssl.SSLSocket.getpeercert` as ``CN=...,O=...``
    (most specific first, as RFC 4514 writes it)."""
    parts = []
    for rdn in reversed(name or ()):
        parts.append("+".join(f"{_SHORT.get(key, key)}={_escape(value)}" for key, value in rdn))
    return ",".join(parts)


def _escape(value: str) -> str:
    out = "".join("\\" + ch if ch in ',+"\\<>;=' else ch for ch in value)
    if out.startswith(("#", " ")):
        out = "\\" + out
    if out.endswith(" "):
        out = out[:-1] + "\\ "
    return out


@dataclass(frozen=True)
class TLSInfo:
    """An established TLS connection: protocol version, cipher suite, and the peer's
    verified certificate (``None`` when it offered none or it was not verified)."""

    version: str
    cipher: str
    peer_certificate: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def peer_subject(self) -> str | None:
        """The verified peer certificate's subject, e.g. ``CN=ct1.example.org,O=Hospital``."""
        return subject_text(self.peer_certificate.get("subject")) if self.peer_certificate else None

    @property
    def peer_issuer(self) -> str | None:
        return subject_text(self.peer_certificate.get("issuer")) if self.peer_certificate else None


def session_info(transport: Any) -> TLSInfo | None:
    """What a transport's TLS session negotiated, or ``None`` for plain TCP."""
    obj = transport.get_extra_info("ssl_object") if transport is not None else None
    if obj is None:
        return None
    cipher = obj.cipher()
    return TLSInfo(obj.version() or "", cipher[0] if cipher else "", obj.getpeercert() or None)


#: OpenSSL's reasons for a first record that is not TLS at all.
_NOT_TLS = {
    "WRONG_VERSION_NUMBER": "not TLS: a client without TLS on this TLS port?",
    "UNKNOWN_PROTOCOL": "not TLS: a client without TLS on this TLS port?",
    "HTTP_REQUEST": "an HTTP request",
    "HTTPS_PROXY_REQUEST": "an HTTP proxy request",
}


def handshake_error(exc: BaseException) -> str:
    """Why an acceptor's TLS handshake failed, for its log line (PS3.15 B.9): the
    certificate check that failed, OpenSSL's reason (with what the bytes were when they
    were not TLS: a DICOM client without TLS sends an A-ASSOCIATE-RQ, read as a bad
    record version), or the connection's end."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or str(exc)
        hint = _NOT_TLS.get(exc.reason or "")
        return f"{reason} ({hint})" if hint else reason
    return str(exc) or type(exc).__name__
