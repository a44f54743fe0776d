"""Mutual TLS 1.3 over real sockets on 127.0.0.1: who gets in, who does not, and CRL reloads on a live context."""

from __future__ import annotations

import contextlib
import queue
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from edgeshield import transport
from edgeshield.errors import (
    EdgeShieldError,
    IntegrityError,
    InvalidArgumentError,
    KeyFileError,
    PassphraseError,
)

TIMEOUT = 10.0
PAYLOAD_PREFIX = b"hello "


@dataclass
class ServerOutcome:
    ok: bool
    identity: transport.Identity | None = None
    reused: bool = False
    error: BaseException | None = None


@dataclass
class ClientOutcome:
    data: bytes | None
    error: BaseException | None = None
    session: ssl.SSLSession | None = None
    reused: bool = False

    @property
    def ok(self) -> bool:
        return bool(self.data) and self.data.startswith(PAYLOAD_PREFIX)  # type: ignore[union-attr]


class TlsServer:
    """A plain ssl socket server in a thread: one connection at a time, each handshake's outcome queued."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.outcomes: queue.Queue[ServerOutcome] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                raw, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            raw.settimeout(TIMEOUT)
            try:
                with self.context.wrap_socket(raw, server_side=True) as tls:
                    try:
                        identity = transport.peer_identity(tls)
                    except EdgeShieldError as exc:  # refused after the handshake (a revoked, resumed session)
                        self.outcomes.put(ServerOutcome(False, reused=tls.session_reused, error=exc))
                        continue
                    tls.sendall(PAYLOAD_PREFIX + f"{identity.name}:{identity.role}".encode())
                    self.outcomes.put(ServerOutcome(True, identity, tls.session_reused))
                    with contextlib.suppress(OSError):
                        tls.recv(1)  # wait for the client to finish
            except (ssl.SSLError, OSError) as exc:
                self.outcomes.put(ServerOutcome(False, error=exc))
            finally:
                raw.close()

    def next_outcome(self) -> ServerOutcome:
        return self.outcomes.get(timeout=TIMEOUT)

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
        self._thread.join(timeout=TIMEOUT)
        assert not self._thread.is_alive()


def connect(ctx: ssl.SSLContext, port: int, *, host: str = "127.0.0.1",
            session: ssl.SSLSession | None = None) -> ClientOutcome:
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname=host, session=session) as tls:
                # In TLS 1.3 the server judges the client certificate after the client's side of the handshake is
                # done, so a refusal shows up on the first read.
                data = tls.recv(1024)
                return ClientOutcome(data, session=tls.session, reused=tls.session_reused)
        except (ssl.SSLError, OSError) as exc:
            return ClientOutcome(None, exc)


Serve = Callable[..., "TlsServer"]


@dataclass
class Pki:
    ca: Path
    server: transport.IssuedCert
    alice: transport.IssuedCert
    other_ca: Path
    mallory: transport.IssuedCert

    def client(self, who: transport.IssuedCert, *, ca: Path | None = None) -> ssl.SSLContext:
        return transport.client_context(ca or self.ca, who.cert_path, who.key_path)


@pytest.fixture(params=["ecdsa-p256", "ed25519"])
def pki(request: pytest.FixtureRequest, tmp_path: Path) -> Pki:
    ca, other = tmp_path / "ca", tmp_path / "other-ca"
    transport.init_ca(ca, algorithm=request.param)
    transport.init_ca(other, algorithm=request.param)
    server = transport.issue(ca, name="edge", role="server", server=True, sans=["localhost", "127.0.0.1", "::1"])
    alice = transport.issue(ca, name="alice", role="operator")
    mallory = transport.issue(other, name="mallory", role="admin")
    return Pki(ca, server, alice, other, mallory)


@pytest.fixture
def serve(pki: Pki) -> Iterator[Serve]:
    servers: list[TlsServer] = []

    def start(ctx: ssl.SSLContext | None = None) -> TlsServer:
        s = TlsServer(ctx or transport.server_context(pki.ca, pki.server.cert_path, pki.server.key_path))
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.close()


def expect_refused(server: TlsServer, client: ClientOutcome, server_says: str) -> ServerOutcome:
    assert not client.ok, client
    outcome = server.next_outcome()
    assert not outcome.ok, outcome
    assert server_says.lower() in str(outcome.error).lower(), outcome.error
    return outcome


# --- contexts -----------------------------------------------------------------------------------------------------
def test_contexts_are_tls13_only_mutual_and_crl_checked(pki: Pki) -> None:
    s = transport.server_context(pki.ca, pki.server.cert_path, pki.server.key_path)
    c = pki.client(pki.alice)
    for ctx in (s, c):
        assert ctx.minimum_version == ctx.maximum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        assert ctx.options & ssl.OP_NO_COMPRESSION
        assert ctx.verify_flags & ssl.VERIFY_X509_STRICT
    assert s.verify_flags & ssl.VERIFY_CRL_CHECK_LEAF
    assert not s.options & ssl.OP_NO_TICKET and s.num_tickets > 0  # resumption stays possible
    assert c.check_hostname


def test_server_context_needs_a_crl_when_given_a_ca_file(pki: Pki) -> None:
    with pytest.raises(InvalidArgumentError, match="CRL"):
        transport.server_context(pki.ca / "ca.crt", pki.server.cert_path, pki.server.key_path)
    ctx = transport.server_context(pki.ca / "ca.crt", pki.server.cert_path, pki.server.key_path,
                                   crl=pki.ca / "crl.pem")
    assert ctx.verify_flags & ssl.VERIFY_CRL_CHECK_LEAF
    with pytest.raises(IntegrityError):  # a CRL from another CA
        transport.server_context(pki.ca / "ca.crt", pki.server.cert_path, pki.server.key_path,
                                 crl=pki.other_ca / "crl.pem")


def test_key_loading_errors_are_typed(pki: Pki, tmp_path: Path) -> None:
    locked = transport.issue(pki.ca, name="edge2", role="server", server=True, sans=["localhost"],
                             key_passphrase=b"pw")
    with pytest.raises(PassphraseError, match="encrypted"):  # never an interactive prompt
        transport.server_context(pki.ca, locked.cert_path, locked.key_path)
    with pytest.raises(PassphraseError, match="wrong"):
        transport.server_context(pki.ca, locked.cert_path, locked.key_path, passphrase=b"nope")
    with pytest.raises(KeyFileError, match="does not belong"):
        transport.client_context(pki.ca, pki.alice.cert_path, pki.server.key_path)
    with pytest.raises(InvalidArgumentError, match="not a PEM certificate"):
        transport.client_context(pki.ca, pki.ca / "index.json", pki.alice.key_path)


# --- who gets in --------------------------------------------------------------------------------------------------
def test_good_client_handshakes_and_the_server_knows_who_it_is(pki: Pki, serve: Serve) -> None:
    server = serve()
    client = connect(pki.client(pki.alice), server.port)
    assert client.ok and client.data == b"hello alice:operator", client
    outcome = server.next_outcome()
    assert outcome.ok and outcome.identity is not None
    assert outcome.identity.name == "alice" and outcome.identity.role == "operator"
    assert outcome.identity.serial == pki.alice.serial
    assert outcome.identity.fingerprint_sha256 == pki.alice.info.fingerprint_sha256


def test_encrypted_server_key_with_its_passphrase(pki: Pki, serve: Serve) -> None:
    locked = transport.issue(pki.ca, name="edge2", role="server", server=True, sans=["127.0.0.1"],
                             key_passphrase=b"pw")
    server = serve(transport.server_context(pki.ca, locked.cert_path, locked.key_path, passphrase=b"pw"))
    assert connect(pki.client(pki.alice), server.port).ok
    assert server.next_outcome().ok


def test_session_resumption_works(pki: Pki, serve: Serve) -> None:
    server = serve()
    ctx = pki.client(pki.alice)
    first = connect(ctx, server.port)
    assert first.ok and not first.reused and first.session is not None
    assert server.next_outcome().ok
    second = connect(ctx, server.port, session=first.session)
    assert second.ok and second.reused
    outcome = server.next_outcome()
    assert outcome.ok and outcome.reused and outcome.identity is not None and outcome.identity.name == "alice"


# --- who does not: the negative matrix ----------------------------------------------------------------------------
def test_no_client_certificate_is_refused(pki: Pki, serve: Serve) -> None:
    server = serve()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(cafile=str(pki.ca / "ca.crt"))
    expect_refused(server, connect(ctx, server.port), "peer did not return a certificate")


def test_client_certificate_from_another_ca_is_refused(pki: Pki, serve: Serve) -> None:
    server = serve()
    # mallory trusts our server's CA, so only the server's check of mallory's certificate can stop her.
    ctx = transport.client_context(pki.ca, pki.mallory.cert_path, pki.mallory.key_path)
    expect_refused(server, connect(ctx, server.port), "unable to get local issuer certificate")


def test_expired_client_certificate_is_refused(pki: Pki, serve: Serve) -> None:
    now = datetime.now(UTC)
    old = transport.issue(pki.ca, name="old", role="operator", not_before=now - timedelta(days=30),
                          not_after=now - timedelta(days=1))
    server = serve()
    expect_refused(server, connect(pki.client(old), server.port), "certificate has expired")


def test_not_yet_valid_client_certificate_is_refused(pki: Pki, serve: Serve) -> None:
    now = datetime.now(UTC)
    early = transport.issue(pki.ca, name="early", role="operator", not_before=now + timedelta(days=1),
                            not_after=now + timedelta(days=30))
    server = serve()
    expect_refused(server, connect(pki.client(early), server.port), "certificate is not yet valid")


def test_server_certificate_used_as_client_certificate_is_refused(pki: Pki, serve: Serve) -> None:
    server = serve()
    ctx = pki.client(pki.server)
    expect_refused(server, connect(ctx, server.port), "unsuitable certificate purpose")


def test_tls12_client_is_refused(pki: Pki, serve: Serve) -> None:
    server = serve()
    ctx = pki.client(pki.alice)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    client = connect(ctx, server.port)
    assert isinstance(client.error, ssl.SSLError), client
    expect_refused(server, client, "unsupported protocol")


def test_client_refuses_a_server_for_another_host(pki: Pki, serve: Serve) -> None:
    server = serve()
    client = connect(pki.client(pki.alice), server.port, host="edge.other.example")
    assert isinstance(client.error, ssl.SSLCertVerificationError) and "Hostname mismatch" in str(client.error)
    expect_refused(server, client, "alert")


def test_client_refuses_a_server_from_another_ca(pki: Pki, serve: Serve) -> None:
    imposter = transport.issue(pki.other_ca, name="edge", role="server", server=True, sans=["127.0.0.1"])
    server = serve(transport.server_context(pki.other_ca, imposter.cert_path, imposter.key_path))
    client = connect(pki.client(pki.alice), server.port)
    assert isinstance(client.error, ssl.SSLCertVerificationError), client
    expect_refused(server, client, "unknown ca")


# --- revocation and CRL reloads -----------------------------------------------------------------------------------
def test_revoked_client_is_refused_after_an_in_place_reload(pki: Pki, serve: Serve) -> None:
    ctx = transport.server_context(pki.ca, pki.server.cert_path, pki.server.key_path)
    server = serve(ctx)
    alice = pki.client(pki.alice)
    bob_cert = transport.issue(pki.ca, name="bob", role="admin")
    bob = pki.client(bob_cert)
    assert connect(alice, server.port).ok and server.next_outcome().ok

    transport.revoke(pki.ca, pki.alice.serial)
    # The live context still holds the old CRL: revocation takes effect only when the server reloads.
    assert connect(alice, server.port).ok and server.next_outcome().ok

    info = transport.reload_crl(ctx, pki.ca / "crl.pem")
    assert info.number == 2 and transport.revoked_serials(ctx) == {pki.alice.serial}
    expect_refused(server, connect(alice, server.port), "certificate revoked")
    assert connect(bob, server.port).ok and server.next_outcome().ok  # others are unaffected

    # A second revocation, a third CRL: the store now holds three CRLs and OpenSSL uses the newest.
    transport.revoke(pki.ca, bob_cert.serial)
    assert transport.reload_crl(ctx, pki.ca / "crl.pem").number == 3
    expect_refused(server, connect(bob, server.port), "certificate revoked")
    expect_refused(server, connect(alice, server.port), "certificate revoked")
    # Reloading the same CRL again is a no-op.
    assert transport.reload_crl(ctx, pki.ca / "crl.pem").number == 3


def test_revoked_client_cannot_resume_a_session_from_before(pki: Pki, serve: Serve) -> None:
    ctx = transport.server_context(pki.ca, pki.server.cert_path, pki.server.key_path)
    server = serve(ctx)
    alice = pki.client(pki.alice)
    first = connect(alice, server.port)
    assert first.ok and server.next_outcome().ok
    transport.revoke(pki.ca, pki.alice.serial)
    transport.reload_crl(ctx, pki.ca / "crl.pem")
    # TLS itself lets the ticket resume (OpenSSL does not re-verify a resumed session) ...
    resumed = connect(alice, server.port, session=first.session)
    assert not resumed.ok
    outcome = server.next_outcome()
    # ... so peer_identity checks the serial against the reloaded CRL and refuses it.
    assert not outcome.ok and outcome.reused and "revoked" in str(outcome.error)

    # A freshly built context has new ticket keys: the old ticket falls back to a full, CRL-checked handshake.
    fresh = serve(transport.server_context(pki.ca, pki.server.cert_path, pki.server.key_path))
    expect_refused(fresh, connect(alice, fresh.port, session=first.session), "certificate revoked")


def _signed_crl(ca: Path, *, number: int, last_update: datetime, next_update: datetime) -> bytes:
    key = serialization.load_pem_private_key((ca / "ca.key").read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate((ca / "ca.crt").read_bytes())
    crl = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject).last_update(last_update)
           .next_update(next_update).add_extension(x509.CRLNumber(number), critical=False)
           .sign(key, None if ca_cert.signature_hash_algorithm is None else hashes.SHA256()))  # type: ignore[arg-type]
    return crl.public_bytes(serialization.Encoding.PEM)


def test_reload_refuses_rollbacks_foreign_and_stale_crls(pki: Pki, tmp_path: Path) -> None:
    ctx = transport.server_context(pki.ca, pki.server.cert_path, pki.server.key_path)
    old_crl = (pki.ca / "crl.pem").read_bytes()
    transport.revoke(pki.ca, pki.alice.serial)
    transport.reload_crl(ctx, pki.ca / "crl.pem")
    rollback = tmp_path / "old.pem"
    rollback.write_bytes(old_crl)
    with pytest.raises(IntegrityError, match="not newer"):
        transport.reload_crl(ctx, rollback)
    with pytest.raises(IntegrityError, match="not a CRL signed by"):
        transport.reload_crl(ctx, pki.other_ca / "crl.pem")
    now = datetime.now(UTC)
    expired = tmp_path / "expired.pem"
    expired.write_bytes(_signed_crl(pki.ca, number=99, last_update=now - timedelta(days=9),
                                    next_update=now - timedelta(days=2)))
    with pytest.raises(IntegrityError, match="expired"):
        transport.reload_crl(ctx, expired)
    with pytest.raises(InvalidArgumentError, match="not a PEM CRL"):
        transport.reload_crl(ctx, pki.ca / "ca.crt")
    assert transport.revoked_serials(ctx) == {pki.alice.serial}


def test_expired_crl_stops_the_server_from_starting(pki: Pki, tmp_path: Path) -> None:
    now = datetime.now(UTC)
    stale = tmp_path / "stale.pem"
    stale.write_bytes(_signed_crl(pki.ca, number=5, last_update=now - timedelta(days=9),
                                  next_update=now - timedelta(days=2)))
    with pytest.raises(IntegrityError, match="expired"):
        transport.server_context(pki.ca, pki.server.cert_path, pki.server.key_path, crl=stale)


def test_a_certificate_smuggled_into_the_crl_file_is_not_trusted(pki: Pki, serve: Serve) -> None:
    ctx = transport.server_context(pki.ca, pki.server.cert_path, pki.server.key_path)
    server = serve(ctx)
    transport.update_crl(pki.ca)
    crl = pki.ca / "crl.pem"
    crl.write_bytes(crl.read_bytes() + (pki.other_ca / "ca.crt").read_bytes())
    transport.reload_crl(ctx, crl)
    ders = ctx.get_ca_certs(binary_form=True)
    assert len(ders) == 1  # only our CA, not the one appended to the CRL file
    mallory = transport.client_context(pki.ca, pki.mallory.cert_path, pki.mallory.key_path)
    expect_refused(server, connect(mallory, server.port), "unable to get local issuer certificate")
