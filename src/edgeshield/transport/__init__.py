"""Device PKI and mutual TLS 1.3 for the edge inference server.

``init_ca``/``issue``/``revoke`` keep a small CA in one directory; every certificate names a device or user (CN) and
carries its role (``ROLE_OID`` extension, and OU). ``server_context``/``client_context`` build the TLS 1.3-only
contexts, the server's requiring a client certificate and checking the CA's CRL; ``reload_crl`` takes a newer CRL
without a restart. After a handshake, ``peer_identity(sock)`` says who connected (and refuses a revoked peer that
resumed a session from before its revocation).

Oblivious HTTP (RFC 9458, the ``ohttp`` extra; docs/ohttp.md): ``OhttpClient`` / ``ohttp_predict`` send
end-to-end encrypted requests through a relay (``_relay``, ``edgeshield relay``); ``KeyConfig``, ``KeyPair``,
``encapsulate_request`` and ``decapsulate_request`` are the message layer underneath.
"""

from __future__ import annotations

from edgeshield.transport._ohttp import (
    KeyConfig,
    KeyPair,
    OhttpError,
    OhttpIdentityError,
    OhttpKeyConfigError,
    OhttpMalformedError,
    OhttpReplayError,
    OhttpSuiteError,
    OhttpUnknownKeyError,
    ReplayGuard,
    decapsulate_request,
    encapsulate_request,
)
from edgeshield.transport._ohttp_client import OhttpAnswer, OhttpClient, OhttpRefusedError, ohttp_predict
from edgeshield.transport._pki import (
    ALGORITHMS,
    CRL_DAYS,
    KNOWN_ROLES,
    REVOCATION_REASONS,
    ROLE_OID,
    CaInfo,
    CertInfo,
    CrlInfo,
    Identity,
    IssuedCert,
    decode_role,
    encode_role,
    identity_from_der,
    init_ca,
    issue,
    list_certs,
    load_crl,
    parse_san,
    parse_serial,
    read_ca,
    read_role,
    revoke,
    update_crl,
    validate_name,
    validate_role,
)
from edgeshield.transport._relay import Relay, RelayConfig, Seen, predict_through, running_relay
from edgeshield.transport._tls import (
    client_context,
    loaded_crl,
    peer_identity,
    reload_crl,
    revoked_serials,
    server_context,
)

__all__ = [
    "ALGORITHMS",
    "CRL_DAYS",
    "KNOWN_ROLES",
    "REVOCATION_REASONS",
    "ROLE_OID",
    "CaInfo",
    "CertInfo",
    "CrlInfo",
    "Identity",
    "IssuedCert",
    "KeyConfig",
    "KeyPair",
    "OhttpAnswer",
    "OhttpClient",
    "OhttpError",
    "OhttpIdentityError",
    "OhttpKeyConfigError",
    "OhttpMalformedError",
    "OhttpRefusedError",
    "OhttpReplayError",
    "OhttpSuiteError",
    "OhttpUnknownKeyError",
    "Relay",
    "RelayConfig",
    "ReplayGuard",
    "Seen",
    "client_context",
    "decapsulate_request",
    "decode_role",
    "encapsulate_request",
    "encode_role",
    "identity_from_der",
    "init_ca",
    "issue",
    "list_certs",
    "load_crl",
    "loaded_crl",
    "ohttp_predict",
    "parse_san",
    "parse_serial",
    "peer_identity",
    "predict_through",
    "read_ca",
    "read_role",
    "reload_crl",
    "revoke",
    "revoked_serials",
    "running_relay",
    "server_context",
    "update_crl",
    "validate_name",
    "validate_role",
]
