"""Device PKI and mutual TLS 1.3 for the edge inference server.

``init_ca``/``issue``/``revoke`` keep a small CA in one directory; every certificate names a device or user (CN) and
carries its role (``ROLE_OID`` extension, and OU). ``server_context``/``client_context`` build the TLS 1.3-only
contexts, the server's requiring a client certificate and checking the CA's CRL; ``reload_crl`` takes a newer CRL
without a restart. After a handshake, ``peer_identity(sock)`` says who connected (and refuses a revoked peer that
resumed a session from before its revocation).
"""

from __future__ import annotations

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
    "client_context",
    "decode_role",
    "encode_role",
    "identity_from_der",
    "init_ca",
    "issue",
    "list_certs",
    "load_crl",
    "loaded_crl",
    "parse_san",
    "parse_serial",
    "peer_identity",
    "read_ca",
    "read_role",
    "reload_crl",
    "revoke",
    "revoked_serials",
    "server_context",
    "update_crl",
    "validate_name",
    "validate_role",
]
