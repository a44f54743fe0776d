"""The device CA: files and permissions, certificate contents, roles, revocation and CRLs, refusals."""

from __future__ import annotations

import ipaddress
import json
import re
import stat
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from edgeshield import transport
from edgeshield.cli._pki import app as pki_app
from edgeshield.errors import (
    AlreadyRevokedError,
    EdgeShieldError,
    IntegrityError,
    InvalidArgumentError,
    KeyFileError,
    OutputExistsError,
    PassphraseError,
    PathNotFoundError,
    UnknownCertificateError,
)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def load_crl(ca: Path) -> x509.CertificateRevocationList:
    return x509.load_pem_x509_crl((ca / "crl.pem").read_bytes())


def crl_number(crl: x509.CertificateRevocationList) -> int:
    return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


@pytest.fixture
def ca(tmp_path: Path) -> Path:
    transport.init_ca(tmp_path / "ca")
    return tmp_path / "ca"


# --- init -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", ["ecdsa-p256", "ed25519"])
def test_init_creates_ca_files_with_permissions(tmp_path: Path, algorithm: str) -> None:
    d = tmp_path / "nested" / "ca"
    info = transport.init_ca(d, algorithm=algorithm, name="Plant 7 CA", days=30)
    assert mode(d) == 0o700 and mode(d / "issued") == 0o700
    assert mode(d / "ca.key") == 0o600
    assert b"-----BEGIN PRIVATE KEY-----" in (d / "ca.key").read_bytes()
    cert = load_cert(d / "ca.crt")
    assert cert.subject == cert.issuer
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Plant 7 CA"
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign and not ku.value.digital_signature
    cert.verify_directly_issued_by(cert)
    assert timedelta(days=29) < cert.not_valid_after_utc - datetime.now(UTC) <= timedelta(days=30)
    assert info.algorithm == algorithm and info.serial == cert.serial_number and not info.encrypted
    # An empty CRL, signed, numbered and with a nextUpdate about a week out.
    crl = load_crl(d)
    assert len(crl) == 0 and crl.issuer == cert.subject
    assert crl.is_signature_valid(cert.public_key())  # type: ignore[arg-type]
    assert crl_number(crl) == 1
    assert crl.next_update_utc is not None
    assert timedelta(days=6) < crl.next_update_utc - datetime.now(UTC) <= timedelta(days=7)
    index = json.loads((d / "index.json").read_text())
    assert index["certificates"] == [] and index["crl"]["number"] == 1
    assert transport.list_certs(d) == []


def test_init_refuses_to_overwrite_a_ca(ca: Path) -> None:
    before = {p.name: p.read_bytes() for p in ca.iterdir() if p.is_file()}
    for algorithm in ("ecdsa-p256", "ed25519"):
        with pytest.raises(OutputExistsError):
            transport.init_ca(ca, algorithm=algorithm)
    assert {p.name: p.read_bytes() for p in ca.iterdir() if p.is_file()} == before


def test_init_tightens_an_existing_empty_directory(tmp_path: Path) -> None:
    d = tmp_path / "ca"
    d.mkdir(mode=0o755)
    transport.init_ca(d)
    assert mode(d) == 0o700


@pytest.mark.parametrize(
    "kwargs",
    [{"algorithm": "rsa"}, {"algorithm": "ECDSA-P256"}, {"days": 0}, {"days": -1}, {"days": True}, {"name": ""},
     {"name": "x" * 65}, {"name": "bad\nname"}],
)
def test_init_rejects_bad_arguments(tmp_path: Path, kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidArgumentError):
        transport.init_ca(tmp_path / "ca", **kwargs)  # type: ignore[arg-type]
    assert not (tmp_path / "ca").exists()


def test_passphrase_encrypted_ca_key(tmp_path: Path) -> None:
    d = tmp_path / "ca"
    info = transport.init_ca(d, passphrase=b"correct horse")
    assert info.encrypted
    assert b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in (d / "ca.key").read_bytes()
    with pytest.raises(PassphraseError, match="encrypted"):
        transport.issue(d, name="alice", role="operator")
    with pytest.raises(PassphraseError, match="wrong passphrase"):
        transport.issue(d, name="alice", role="operator", passphrase=b"wrong")
    assert transport.list_certs(d) == []
    issued = transport.issue(d, name="alice", role="operator", passphrase=b"correct horse")
    index_before = (d / "index.json").read_bytes()
    with pytest.raises(PassphraseError):  # a failed revocation changes nothing
        transport.revoke(d, issued.serial)
    assert (d / "index.json").read_bytes() == index_before
    transport.revoke(d, issued.serial, passphrase=b"correct horse")
    assert issued.serial in {r.serial_number for r in load_crl(d)}


def test_a_ca_key_that_does_not_match_the_certificate_is_refused(ca: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    transport.init_ca(other)
    (ca / "ca.key").write_bytes((other / "ca.key").read_bytes())
    with pytest.raises(KeyFileError, match="does not belong"):
        transport.issue(ca, name="alice", role="operator")


def test_operations_need_a_ca_directory(tmp_path: Path) -> None:
    with pytest.raises(PathNotFoundError):
        transport.list_certs(tmp_path / "missing")
    with pytest.raises(PathNotFoundError, match="not a CA directory"):
        transport.issue(tmp_path, name="alice", role="operator")


def test_a_corrupt_index_is_an_integrity_error(ca: Path) -> None:
    (ca / "index.json").write_text("{not json")
    with pytest.raises(IntegrityError):
        transport.list_certs(ca)
    (ca / "index.json").write_text(json.dumps({"format": "edgeshield-ca-index", "version": 1, "crl": None,
                                               "certificates": [{"serial": "zz"}]}))
    with pytest.raises(IntegrityError, match="malformed"):
        transport.list_certs(ca)


# --- issue ------------------------------------------------------------------------------------------------------
def test_issue_client_certificate_contents(ca: Path) -> None:
    issued = transport.issue(ca, name="alice", role="operator", days=30)
    assert issued.cert_path == ca / "issued" / "alice.crt" and issued.key_path == ca / "issued" / "alice.key"
    assert mode(issued.key_path) == 0o600 and mode(issued.cert_path) == 0o644
    key = serialization.load_pem_private_key(issued.key_path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    ca_cert, cert = load_cert(ca / "ca.crt"), load_cert(issued.cert_path)
    cert.verify_directly_issued_by(ca_cert)
    assert cert.serial_number == issued.serial and cert.serial_number.bit_length() > 64
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "alice"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == "operator"
    role_ext = cert.extensions.get_extension_for_oid(transport.ROLE_OID)
    assert not role_ext.critical
    assert role_ext.value.value == b"\x0c\x08operator"  # DER UTF8String
    assert transport.read_role(cert) == "operator"
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not (ku.key_cert_sign or ku.crl_sign or ku.key_encipherment)
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert timedelta(days=29) < cert.not_valid_after_utc - datetime.now(UTC) <= timedelta(days=30)
    info = issued.info
    assert (info.name, info.role, info.kind, info.status()) == ("alice", "operator", "client", "valid")
    assert info.not_after == cert.not_valid_after_utc and info.not_before == cert.not_valid_before_utc
    assert transport.list_certs(ca) == [info]


def test_issue_server_certificate_with_sans(ca: Path) -> None:
    issued = transport.issue(ca, name="edge-01", role="server", server=True,
                             sans=["localhost", "Edge-01.Plant.example", "127.0.0.1", "::1", "localhost"])
    cert = load_cert(issued.cert_path)
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH
    ]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "edge-01.plant.example"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1"),
                                                        ipaddress.ip_address("::1")]
    assert issued.info.kind == "server"
    assert issued.info.sans == ("localhost", "edge-01.plant.example", "127.0.0.1", "::1")


def test_server_needs_sans_and_clients_take_none(ca: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="needs at least one SAN"):
        transport.issue(ca, name="edge", role="server", server=True)
    with pytest.raises(InvalidArgumentError, match="only for server"):
        transport.issue(ca, name="alice", role="operator", sans=["localhost"])
    assert transport.list_certs(ca) == []


@pytest.mark.parametrize("san", ["", "a..b", "-bad.example", "bad-.example", "*.example.com", "under_score.example",
                                 "1.2.3", "fe80::1%eth0", "é.example", "x" * 64 + ".example", "trailing."])
def test_bad_sans_are_refused(ca: Path, san: str) -> None:
    with pytest.raises(InvalidArgumentError):
        transport.issue(ca, name="edge", role="server", server=True, sans=[san])


@pytest.mark.parametrize("name", ["", ".hidden", "-x", "_x", "a/b", "../ca", "a b", "x" * 65, "ünïcode", "a\n"])
def test_bad_names_are_refused(ca: Path, name: str) -> None:
    with pytest.raises(InvalidArgumentError, match="invalid name"):
        transport.issue(ca, name=name, role="operator")
    assert transport.list_certs(ca) == []


@pytest.mark.parametrize("role", ["", "Admin", "1admin", "-admin", "a" * 33, "ad min", "adm\u0131n", "admin\n"])
def test_bad_roles_are_refused(ca: Path, role: str) -> None:
    with pytest.raises(InvalidArgumentError, match="invalid role"):
        transport.issue(ca, name="alice", role=role)


def test_any_valid_role_identifier_is_issued(ca: Path) -> None:
    issued = transport.issue(ca, name="cam-7", role="camera_feed-2")
    assert transport.read_role(load_cert(issued.cert_path)) == "camera_feed-2"
    assert set(transport.KNOWN_ROLES) == {"admin", "operator", "auditor", "client"}


def test_duplicate_active_names_are_refused_until_revoked(ca: Path) -> None:
    first = transport.issue(ca, name="alice", role="operator")
    first_pem = first.cert_path.read_bytes()
    with pytest.raises(OutputExistsError, match="revoke it first"):
        transport.issue(ca, name="alice", role="admin")
    assert first.cert_path.read_bytes() == first_pem
    transport.revoke(ca, first.serial)
    second = transport.issue(ca, name="alice", role="admin")
    assert second.serial != first.serial and second.cert_path.read_bytes() != first_pem
    assert transport.read_role(load_cert(second.cert_path)) == "admin"
    assert [(c.name, c.status()) for c in transport.list_certs(ca)] == [("alice", "revoked"), ("alice", "valid")]


def test_stray_files_without_an_index_entry_are_not_overwritten(ca: Path) -> None:
    (ca / "issued" / "ghost.crt").write_text("someone else's")
    with pytest.raises(OutputExistsError):
        transport.issue(ca, name="ghost", role="client")
    assert (ca / "issued" / "ghost.crt").read_text() == "someone else's"


def test_validity_overrides_issue_an_expired_certificate(ca: Path) -> None:
    now = datetime.now(UTC)
    issued = transport.issue(ca, name="old", role="client", not_before=now - timedelta(days=10),
                             not_after=now - timedelta(days=1))
    cert = load_cert(issued.cert_path)
    assert cert.not_valid_after_utc < now
    assert issued.info.status() == "expired"
    # An expired certificate is no longer active: the name may be issued again (rotation).
    assert transport.issue(ca, name="old", role="client").info.status() == "valid"


def test_bad_validity_overrides_are_refused(ca: Path) -> None:
    now = datetime.now(UTC)
    with pytest.raises(InvalidArgumentError, match="timezone"):
        transport.issue(ca, name="a", role="client", not_before=datetime(2020, 1, 1))  # noqa: DTZ001 - naive on purpose
    with pytest.raises(InvalidArgumentError, match="before it starts"):
        transport.issue(ca, name="a", role="client", not_before=now, not_after=now - timedelta(seconds=5))
    with pytest.raises(InvalidArgumentError, match="outlive the CA"):
        transport.issue(ca, name="a", role="client", days=3651)
    with pytest.raises(InvalidArgumentError):
        transport.issue(ca, name="a", role="client", days=0)


def test_encrypted_issued_key(ca: Path) -> None:
    issued = transport.issue(ca, name="alice", role="operator", key_passphrase=b"pw")
    assert issued.encrypted and b"ENCRYPTED PRIVATE KEY" in issued.key_path.read_bytes()
    serialization.load_pem_private_key(issued.key_path.read_bytes(), password=b"pw")


def test_concurrent_issues_all_reach_the_index(ca: Path) -> None:
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            transport.issue(ca, name=f"dev-{i}", role="client")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert sorted(c.name for c in transport.list_certs(ca)) == [f"dev-{i}" for i in range(8)]


# --- roles and identities -----------------------------------------------------------------------------------------
def _self_signed(subject: list[x509.NameAttribute], extra: list[x509.ExtensionType] | None = None) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    b = (x509.CertificateBuilder().subject_name(x509.Name(subject)).issuer_name(x509.Name(subject))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now).not_valid_after(now + timedelta(days=1)))
    for ext in extra or []:
        b = b.add_extension(ext, critical=False)
    return b.sign(key, hashes.SHA256())


def test_read_role_prefers_the_extension_and_falls_back_to_ou() -> None:
    cn = x509.NameAttribute(NameOID.COMMON_NAME, "x")
    ou = x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "auditor")
    ext = x509.UnrecognizedExtension(transport.ROLE_OID, transport.encode_role("admin"))
    assert transport.read_role(_self_signed([cn, ou])) == "auditor"
    assert transport.read_role(_self_signed([cn, ou], [ext])) == "admin"
    assert transport.read_role(_self_signed([cn])) is None
    bad_ou = x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Not A Role")
    assert transport.read_role(_self_signed([cn, bad_ou])) is None
    # A present but malformed extension means no role, never a fallback to the OU.
    for raw in (b"", b"\x0c\x06admin", b"\x0c\x05admin\x00", b"\x13\x05admin", b"\x0c\x05Admin", b"\x0c\x06admin!"):
        broken = x509.UnrecognizedExtension(transport.ROLE_OID, raw)
        assert transport.read_role(_self_signed([cn, ou], [broken])) is None


def test_identity_from_der(ca: Path) -> None:
    issued = transport.issue(ca, name="alice", role="operator")
    der = load_cert(issued.cert_path).public_bytes(serialization.Encoding.DER)
    ident = transport.identity_from_der(der)
    assert ident == transport.Identity("alice", "operator", issued.serial, issued.info.fingerprint_sha256)
    with pytest.raises(InvalidArgumentError):
        transport.identity_from_der(b"not a certificate")
    no_cn = _self_signed([x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "admin")])
    with pytest.raises(InvalidArgumentError, match="common name"):
        transport.identity_from_der(no_cn.public_bytes(serialization.Encoding.DER))


# --- revocation and CRLs ------------------------------------------------------------------------------------------
def test_revoke_publishes_a_crl_with_every_revoked_serial(ca: Path) -> None:
    ca_cert = load_cert(ca / "ca.crt")
    alice = transport.issue(ca, name="alice", role="operator")
    bob = transport.issue(ca, name="bob", role="admin")
    carol = transport.issue(ca, name="carol", role="auditor")
    crl1 = load_crl(ca)
    revoked = transport.revoke(ca, alice.serial, reason="key-compromise")
    assert revoked.status() == "revoked" and revoked.revocation_reason == "key-compromise"
    crl2 = load_crl(ca)
    transport.revoke(ca, hex(bob.serial))  # the CLI's 0x form works too
    crl3 = load_crl(ca)
    assert [crl_number(c) for c in (crl1, crl2, crl3)] == [1, 2, 3]
    assert crl1.last_update_utc < crl2.last_update_utc < crl3.last_update_utc
    for crl in (crl2, crl3):
        assert crl.is_signature_valid(ca_cert.public_key())  # type: ignore[arg-type]
        assert crl.next_update_utc is not None and crl.next_update_utc > datetime.now(UTC) + timedelta(days=6)
    assert {r.serial_number for r in crl3} == {alice.serial, bob.serial}
    entry = crl3.get_revoked_certificate_by_serial_number(alice.serial)
    assert entry is not None
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == x509.ReasonFlags.key_compromise
    assert crl3.get_revoked_certificate_by_serial_number(carol.serial) is None
    status = {c.name: c.status() for c in transport.list_certs(ca)}
    assert status == {"alice": "revoked", "bob": "revoked", "carol": "valid"}
    _, info = transport.load_crl(ca / "crl.pem", ca_cert)
    assert info.number == 3 and info.revoked == {alice.serial, bob.serial}


def test_revoke_refusals(ca: Path) -> None:
    alice = transport.issue(ca, name="alice", role="operator")
    with pytest.raises(InvalidArgumentError, match="no certificate"):
        transport.revoke(ca, alice.serial + 1)
    with pytest.raises(InvalidArgumentError, match="reason"):
        transport.revoke(ca, alice.serial, reason="because")
    with pytest.raises(InvalidArgumentError):
        transport.revoke(ca, "12abc")
    transport.revoke(ca, alice.serial)
    with pytest.raises(InvalidArgumentError, match="already revoked"):
        transport.revoke(ca, alice.serial)
    assert crl_number(load_crl(ca)) == 2


def test_revoke_by_name_revokes_the_one_active_certificate(ca: Path) -> None:
    old = transport.issue(ca, name="alice", role="operator")
    transport.revoke(ca, old.serial)
    new = transport.issue(ca, name="alice", role="operator")  # re-issued: the name now has a revoked and a valid one
    transport.issue(ca, name="bob", role="client")
    revoked = transport.revoke(ca, name="alice", reason="key-compromise")
    assert revoked.serial == new.serial and revoked.revocation_reason == "key-compromise"
    assert {r.serial_number for r in load_crl(ca)} == {old.serial, new.serial}
    assert {c.name: c.status() for c in transport.list_certs(ca)}["bob"] == "valid"


def test_revoke_by_name_refusals(ca: Path) -> None:
    alice = transport.issue(ca, name="alice", role="operator")
    now = datetime.now(UTC)
    transport.issue(ca, name="gone", role="client", not_before=now - timedelta(days=9),
                    not_after=now - timedelta(days=1))
    crl_before = crl_number(load_crl(ca))
    with pytest.raises(UnknownCertificateError, match="no certificate named 'carol'"):
        transport.revoke(ca, name="carol")
    with pytest.raises(UnknownCertificateError, match="expired"):  # an expired one is revoked by --serial, if at all
        transport.revoke(ca, name="gone")
    with pytest.raises(InvalidArgumentError, match="exactly one"):
        transport.revoke(ca, alice.serial, name="alice")
    with pytest.raises(InvalidArgumentError, match="exactly one"):
        transport.revoke(ca)
    with pytest.raises(InvalidArgumentError, match="invalid name"):
        transport.revoke(ca, name="../alice")
    transport.revoke(ca, name="alice")
    with pytest.raises(AlreadyRevokedError, match="already revoked"):
        transport.revoke(ca, name="alice")
    assert crl_number(load_crl(ca)) == crl_before + 1  # only the one real revocation published a CRL


def test_revoke_by_an_ambiguous_name_is_refused(ca: Path) -> None:
    alice = transport.issue(ca, name="alice", role="operator")
    index = json.loads((ca / "index.json").read_text())
    twin = dict(index["certificates"][0], serial=f"{alice.serial + 1:x}")  # an index edited by hand
    index["certificates"].append(twin)
    (ca / "index.json").write_text(json.dumps(index))
    with pytest.raises(UnknownCertificateError, match=r"2 valid certificates are named 'alice'.*--serial"):
        transport.revoke(ca, name="alice")
    assert transport.revoke(ca, alice.serial).status() == "revoked"


def test_update_crl_renews_dates_and_number(ca: Path) -> None:
    alice = transport.issue(ca, name="alice", role="operator")
    transport.revoke(ca, alice.serial)
    before = load_crl(ca)
    info = transport.update_crl(ca, days=2)
    after = load_crl(ca)
    assert info.number == crl_number(after) == crl_number(before) + 1
    assert after.last_update_utc > before.last_update_utc
    assert after.next_update_utc is not None
    assert timedelta(days=1) < after.next_update_utc - datetime.now(UTC) <= timedelta(days=2)
    assert {r.serial_number for r in after} == {alice.serial}


def test_load_crl_refuses_a_crl_from_another_ca(ca: Path, tmp_path: Path) -> None:
    transport.init_ca(tmp_path / "other")
    with pytest.raises(IntegrityError, match="not a CRL signed by"):
        transport.load_crl(tmp_path / "other" / "crl.pem", load_cert(ca / "ca.crt"))


# --- validators (properties) --------------------------------------------------------------------------------------
_ROLE_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_ALPHABET = st.sampled_from("abczAZ09_-./ \n\u0131\u212a\u00e9:0x")


@given(st.text(_ALPHABET, max_size=40) | st.text(max_size=40))
def test_role_validator_accepts_exactly_the_identifier_grammar(text: str) -> None:
    if _ROLE_RE.fullmatch(text) and text.isascii():
        assert transport.validate_role(text) == text
        assert transport.decode_role(transport.encode_role(text)) == text
    else:
        with pytest.raises(InvalidArgumentError):
            transport.validate_role(text)


@given(st.from_regex(_ROLE_RE, fullmatch=True).filter(str.isascii))
def test_every_valid_role_round_trips_through_der(role: str) -> None:
    der = transport.encode_role(role)
    assert der[0] == 0x0C and der[1] == len(role)
    assert transport.decode_role(der) == role


@given(st.text(_ALPHABET, max_size=70) | st.text(max_size=70))
def test_name_validator_accepts_exactly_safe_file_names(text: str) -> None:
    if _NAME_RE.fullmatch(text) and text.isascii():
        assert transport.validate_name(text) == text
        assert "/" not in text and text not in (".", "..")
    else:
        with pytest.raises(InvalidArgumentError):
            transport.validate_name(text)


@given(st.integers(min_value=1, max_value=2**159 - 1))
def test_serials_parse_in_decimal_and_hex(n: int) -> None:
    assert transport.parse_serial(str(n)) == n
    assert transport.parse_serial(hex(n)) == n
    assert transport.parse_serial("0X" + format(n, "X")) == n
    assert transport.parse_serial(n) == n


@given(st.text(max_size=50))
def test_serial_parser_rejects_anything_else(text: str) -> None:
    if re.fullmatch(r"[0-9]+|0[xX][0-9a-fA-F]+", text) and text.isascii():
        value = int(text, 0) if text[:2].lower() == "0x" else int(text, 10)
        if 0 < value < 2**159:
            assert transport.parse_serial(text) == value
            return
    with pytest.raises(InvalidArgumentError):
        transport.parse_serial(text)


@pytest.mark.parametrize("bad", ["", "0", "0x", "0x0", "-5", "+5", " 5", "5 ", "1_000", "0x1_0", "\u0661\u0662",
                                 "0b101", "1e3", str(2**159), hex(2**159), True, 0, -1])
def test_serial_parser_edge_cases(bad: object) -> None:
    with pytest.raises(InvalidArgumentError):
        transport.parse_serial(bad)  # type: ignore[arg-type]


# --- CLI ----------------------------------------------------------------------------------------------------------
def test_cli_init_issue_list_revoke_crl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    d = tmp_path / "ca"
    monkeypatch.setenv("CA_PW", "s3cret")
    r = runner.invoke(pki_app, ["init", str(d), "--algorithm", "ed25519", "--passphrase-env", "CA_PW", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["algorithm"] == "ed25519" and json.loads(r.stdout)["encrypted"] is True
    r = runner.invoke(pki_app, ["issue", str(d), "--name", "edge", "--role", "server", "--server", "--san",
                                "localhost", "--san", "127.0.0.1", "--passphrase-env", "CA_PW", "--json"])
    assert r.exit_code == 0, r.output
    server = json.loads(r.stdout)
    assert server["kind"] == "server" and server["sans"] == ["localhost", "127.0.0.1"]
    r = runner.invoke(pki_app, ["issue", str(d), "--name", "alice", "--role", "operator", "--days", "10",
                                "--passphrase-env", "CA_PW"])
    assert r.exit_code == 0 and "alice" in r.stdout, r.output
    r = runner.invoke(pki_app, ["list", str(d), "--json"])
    certs = json.loads(r.stdout)["certificates"]
    assert [(c["name"], c["role"], c["status"]) for c in certs] == [("edge", "server", "valid"),
                                                                     ("alice", "operator", "valid")]
    alice_serial = certs[1]["serial"]
    assert alice_serial.startswith("0x")
    r = runner.invoke(pki_app, ["revoke", str(d), "--serial", alice_serial, "--reason", "superseded",
                                "--passphrase-env", "CA_PW", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["status"] == "revoked"
    r = runner.invoke(pki_app, ["revoke", str(d), "--serial", str(int(alice_serial, 16)), "--passphrase-env",
                                "CA_PW"])
    assert isinstance(r.exception, InvalidArgumentError)  # already revoked; the decimal form parsed
    r = runner.invoke(pki_app, ["crl", str(d), "--passphrase-env", "CA_PW", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["crl_number"] == 3, r.output
    r = runner.invoke(pki_app, ["list", str(d)])
    assert r.exit_code == 0 and "revoked" in r.stdout and "alice" in r.stdout


def test_cli_revoke_by_name(ca: Path) -> None:
    runner = CliRunner()
    alice = transport.issue(ca, name="alice", role="operator")
    r = runner.invoke(pki_app, ["revoke", str(ca), "--name", "alice", "--reason", "superseded", "--json"])
    assert r.exit_code == 0, r.output
    shown = json.loads(r.stdout)
    assert shown["serial"] == hex(alice.serial) and shown["status"] == "revoked"
    for args, error in ((["--name", "alice"], AlreadyRevokedError), (["--name", "nobody"], UnknownCertificateError),
                        (["--name", "alice", "--serial", hex(alice.serial)], InvalidArgumentError),
                        ([], InvalidArgumentError)):
        r = runner.invoke(pki_app, ["revoke", str(ca), *args])
        assert isinstance(r.exception, error) and r.exception.exit_code == 2, (args, r.exception)


@pytest.mark.parametrize(
    "args",
    [["issue", "{d}", "--name", "a/b", "--role", "client"],
     ["issue", "{d}", "--name", "a", "--role", "Client"],
     ["issue", "{d}", "--name", "a", "--role", "client", "--san", "localhost"],
     ["revoke", "{d}", "--serial", "nope"],
     ["init", "{d}"],
     ["list", "{d}/missing"]],
)
def test_cli_failures_are_typed_errors(ca: Path, args: list[str]) -> None:
    r = CliRunner().invoke(pki_app, [a.format(d=ca) for a in args])
    assert isinstance(r.exception, EdgeShieldError), (r.exception, r.output)
    assert r.exception.exit_code == 2
