"""A real Flower deployment: a SuperLink and SuperNodes as processes, over TLS from EdgeShield's PKI.

What Flower 1.42 offers, and how it is used here:

* TLS: the SuperLink serves its Fleet, Control and Runtime APIs on one HTTPS port (``--ssl-certfile``,
  ``--ssl-keyfile``; ``--ssl-ca-certfile`` is what its own ServerApp runner verifies it with). SuperNodes verify the
  SuperLink with ``--root-certificates``. It is server-authenticated TLS: SuperNodes present no certificate.
* SuperNode authentication: ``--enable-supernode-auth`` on the SuperLink, an EC private key (OpenSSH format) on each
  SuperNode (``--auth-supernode-private-key``) that signs a timestamp on every Fleet request, and the node's public
  key registered beforehand through the Control API (``flwr supernode register``). An unregistered key cannot
  activate. Here a node's key is the key of its EdgeShield PKI client certificate, and the server registers only
  certificates that chain to the CA, are in their validity window, carry the node role and are not on the CRL.
* No package is fetched at run time: ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1`` and
  ``--disable-runtime-dependency-installation``; telemetry and Flower's update check are switched off; ``FLWR_HOME``
  points at a private directory per process, never ``~/.flwr``.

The app (``_deploy_app``) is the simulation's: the ServerApp runs ``_sim``'s job (EdgeShield's strategy: validation
at the door, robust aggregation, central DP with ε per round, the ledger, ``fl.update_rejected`` events) for the
:class:`~edgeshield.fl.FLConfig` carried in the run config, on the allowed nodes only; every SuperNode runs
``fl._client.make_client_app()`` on its own data file. :func:`deploy_config` builds and checks that FLConfig before
any process starts; :meth:`RunOutcome.fl_result` turns the run's output into the :class:`~edgeshield.fl.FLResult`
that ``fl._export.protect_result`` turns into a bundle.

Processes are started in their own session and tracked with their descendants (Flower starts a SuperExec, which
starts ``flwr-serverapp``/``flwr-clientapp``); ``stop()`` (and leaving a ``with`` block, however it is left) ends all
of them, by pid, escalating from SIGTERM to SIGKILL.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from edgeshield._io import atomic_write_bytes
from edgeshield.errors import (
    CertificateError,
    CertificateRevokedError,
    ConnectionFailedError,
    CrlError,
    InvalidArgumentError,
    KeyFileError,
    MissingDependencyError,
)
from edgeshield.fl._deploy_app import PARAMS_FILE, RESULT_FILE, DeploymentError

if TYPE_CHECKING:
    from edgeshield.fl._config import FLConfig
    from edgeshield.fl._sim import FLResult

__all__ = [
    "DeploymentError", "LocalFederation", "NodeRefusedError", "NodeSpec", "RunOutcome", "SuperLink", "SuperNode",
    "check_deploy_config", "deploy_config", "node_public_key", "run_federation", "write_app", "write_node_auth_key",
]

SERVER_ROLE = "fl-server"
NODE_ROLE = "fl-client"
CONNECTION = "edgeshield"  # the SuperLink connection name in the private FLWR_HOME's config.toml
DEFAULT_HOST = "127.0.0.1"
FAB_PACKAGE = "edgeshield_fab"
# Flower's SuperNode exit code when it cannot connect (TLS failure, refused activation, retries exhausted).
SUPERNODE_CONNECT_EXIT = 305
_NIST_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
# How often to ask for a run's status before the ServerApp's result appears (then every half second).
_STATUS_POLL = 2.0


class NodeRefusedError(ConnectionFailedError):
    """A SuperNode could not join: it did not trust the SuperLink's certificate, or its key was not registered."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason  # "tls" | "auth" | "connect"


# --- environment and executables ----------------------------------------------------------------------------------
def flower_env(flwr_home: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment every Flower process gets: a private FLWR_HOME, no runtime installs, no phoning home."""
    env = dict(os.environ if base is None else base)
    bindir = str(Path(sys.executable).parent)  # Flower starts flower-superexec, flwr-serverapp... by name
    env.update({
        "FLWR_HOME": str(flwr_home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        # the SuperExec looks for a ServerApp/ClientApp to start every second by default: each message waits for it
        "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2",
        "PYTHONUNBUFFERED": "1",
        "PATH": bindir + os.pathsep + env.get("PATH", ""),
    })
    return env


def flower_executable(name: str) -> str:
    """A Flower console script, preferably the one beside this interpreter."""
    here = Path(sys.executable).parent / name
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    found = shutil.which(name)
    if found is None:
        raise MissingDependencyError(f"{name} not found: the deployment needs Flower: pip install 'edgeshield[fl]'")
    return found


def free_port(host: str = DEFAULT_HOST) -> int:
    """A TCP port that was free a moment ago (callers retry if someone takes it first)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.chmod(0o700)
    return path


# --- PKI binding ----------------------------------------------------------------------------------------------------
def node_public_key(cert_path: str | os.PathLike[str], ca_cert_path: str | os.PathLike[str], *,
                    crl_path: str | os.PathLike[str] | None = None, role: str | None = NODE_ROLE,
                    now: datetime | None = None) -> bytes:
    """The OpenSSH public key Flower registers for a SuperNode, from the node's PKI certificate, after checking
    that the CA issued it, it is valid now, it is for clientAuth with ``role`` (None: any), and, with a CRL, that
    it is not revoked."""
    from edgeshield.transport import load_crl, read_role
    from edgeshield.transport._pki import load_certificate

    ca = load_certificate(ca_cert_path)
    cert = load_certificate(cert_path)
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError) as exc:
        raise CertificateError(f"{cert_path} was not issued by the CA in {ca_cert_path}") from exc
    except Exception as exc:  # cryptography.exceptions.InvalidSignature
        raise CertificateError(f"{cert_path} does not carry a valid signature of {ca_cert_path}") from exc
    now = now or datetime.now(UTC)
    if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
        raise CertificateError(f"{cert_path} is not valid now (valid {cert.not_valid_before_utc.isoformat()} to "
                               f"{cert.not_valid_after_utc.isoformat()})")
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound as exc:
        raise CertificateError(f"{cert_path} has no extended key usage: not a client certificate") from exc
    if ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        raise CertificateError(f"{cert_path} is not a client certificate (no clientAuth)")
    if role is not None and read_role(cert) != role:
        raise CertificateError(f"{cert_path} has role {read_role(cert)!r}, not {role!r}")
    if crl_path is not None:
        _crl, info = load_crl(crl_path, ca)
        if now >= info.next_update:
            raise CrlError(f"{crl_path} expired at {info.next_update.isoformat()}: refresh it (edgeshield pki crl)")
        if cert.serial_number in info.revoked:
            raise CertificateRevokedError(f"{cert_path} (serial 0x{cert.serial_number:x}) is revoked")
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, _NIST_CURVES):
        raise CertificateError(f"{cert_path} does not hold a NIST-curve EC key (Flower's node auth needs one)")
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)


def write_node_auth_key(key_path: str | os.PathLike[str], dest: str | os.PathLike[str], *,
                        passphrase: bytes | None = None) -> Path:
    """Write the node's PKI private key as the unencrypted OpenSSH key Flower's SuperNode reads (0600).

    Flower reads it without a passphrase, so it exists in clear on disk while the SuperNode runs; ``SuperNode``
    writes it in its private (0700) work directory and deletes it when it stops."""
    from edgeshield.transport._pki import load_private_key

    key = load_private_key(key_path, passphrase, what="node key")
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, _NIST_CURVES):
        raise KeyFileError(f"{key_path} is not a NIST-curve EC key (Flower's node auth needs one)")
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                             serialization.NoEncryption())
    out = Path(dest)
    atomic_write_bytes(out, data, mode=0o600)
    return out


# --- processes ------------------------------------------------------------------------------------------------------
class FlowerProcess:
    """One Flower process and everything it starts, logged to a file, ended by pid."""

    def __init__(self, argv: Sequence[str], *, env: Mapping[str, str], log_path: Path, cwd: Path) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, env=dict(env),
            cwd=cwd, start_new_session=True,
        )
        self._known: dict[int, Any] = {}
        self.refresh()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def refresh(self) -> None:
        """Remember the descendants now alive (Flower detaches some: they must be known before their parent ends)."""
        import psutil

        try:
            root = psutil.Process(self.pid)
            found = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        for p in found:
            self._known.setdefault(p.pid, p)

    def processes(self) -> list[Any]:
        """The tracked processes that are still running (psutil checks the start time, so a reused pid is not ours)."""
        import psutil

        alive = []
        for p in self._known.values():
            with contextlib.suppress(psutil.Error):
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
        return alive

    def log_text(self, limit: int = 64 * 1024) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(max(0, self.log_path.stat().st_size - limit))
                return fh.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    def wait(self, timeout: float) -> int | None:
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM the process (Flower shuts down cleanly on it), then its descendants, then SIGKILL what is left."""
        import psutil

        self.refresh()
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            self.wait(grace)
        for sig, wait in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 2.0)):
            rest = self.processes()
            if not rest:
                break
            for p in rest:
                with contextlib.suppress(psutil.Error):
                    p.send_signal(sig)
            psutil.wait_procs(rest, timeout=wait)
        if self.popen.poll() is None:
            self.popen.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=2.0)
        if not self._log.closed:
            self._log.close()


def _bind_failed(log: str) -> bool:
    return "address already in use" in log.lower() or "error while attempting to bind" in log.lower()


# --- the SuperLink --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunOutcome:
    """A finished run: its status and, when it completed, what the ServerApp wrote."""

    run_id: int
    status: str
    result: dict[str, Any] | None
    params_path: Path | None
    seconds: float
    out_dir: Path | None = None

    @property
    def completed(self) -> bool:
        return self.status == "finished:completed"

    def fl_result(self) -> FLResult:
        """The run as a :class:`~edgeshield.fl.FLResult` (history, final parameters, config), ready for
        ``fl._export.to_onnx`` / ``protect_result`` like a simulation result."""
        from edgeshield.fl._deploy_app import load_result

        if self.out_dir is None:
            raise DeploymentError(f"run {self.run_id} left no output directory")
        return load_result(self.out_dir)


@dataclass
class SuperLink:
    """``flower-superlink`` on ``host:port`` with TLS (and SuperNode authentication unless ``node_auth=False``).

    ``workdir`` holds its FLWR_HOME (0700), its log and the generated app. Use it as a context manager."""

    workdir: Path
    ca_cert: Path
    cert: Path
    key: Path
    host: str = DEFAULT_HOST
    port: int | None = None
    node_auth: bool = True
    startup_timeout: float = 30.0
    process: FlowerProcess | None = field(default=None, init=False)
    address: str = field(default="", init=False)

    def __post_init__(self) -> None:
        self.workdir = _private_dir(Path(self.workdir))
        for p in (self.ca_cert, self.cert, self.key):
            if not Path(p).is_file():
                raise InvalidArgumentError(f"no such file: {p}")
        self.home = _private_dir(self.workdir / "flwr-home")
        self.env = flower_env(self.home)
        self._control: _Control | None = None

    def __enter__(self) -> SuperLink:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        port = self.port or free_port(self.host)
        for attempt in range(3):
            port = self.port or (port if attempt == 0 else free_port(self.host))
            argv = [flower_executable("flower-superlink"),
                    "--ssl-ca-certfile", str(Path(self.ca_cert).resolve()),
                    "--ssl-certfile", str(Path(self.cert).resolve()),
                    "--ssl-keyfile", str(Path(self.key).resolve()),
                    "--host", self.host, "--port", str(port),
                    "--disable-runtime-dependency-installation"]
            if self.node_auth:
                argv.append("--enable-supernode-auth")
            self.process = FlowerProcess(argv, env=self.env, log_path=self.workdir / "superlink.log", cwd=self.workdir)
            try:
                self._wait_ready(port)
            except DeploymentError:
                log = self.process.log_text()
                self.process.stop()
                if self.port is None and _bind_failed(log) and attempt < 2:
                    continue
                raise
            break
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.address = f"{host}:{port}"
        self._write_connection()

    def _wait_ready(self, port: int) -> None:
        """Until the HTTPS health endpoint answers, verified against the CA."""
        import httpx

        if self.process is None:
            raise DeploymentError("flower-superlink is not started")
        context = ssl.create_default_context(cafile=str(self.ca_cert))
        connect_host = "127.0.0.1" if self.host in ("0.0.0.0", "") else ("::1" if self.host == "::" else self.host)  # noqa: S104
        url_host = f"[{connect_host}]" if ":" in connect_host else connect_host
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if not self.process.alive():
                raise DeploymentError(f"flower-superlink exited at start (status {self.process.popen.returncode}): "
                                      f"{_last_error(self.process.log_text())}")
            try:
                r = httpx.get(f"https://{url_host}:{port}/health", verify=context, timeout=2.0)
                if r.status_code == 200:
                    self.process.refresh()
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise DeploymentError(f"flower-superlink did not come up on port {port} within {self.startup_timeout:.0f} s")

    def _write_connection(self) -> None:
        toml = (f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                f"address = {json.dumps(self.address)}\n"
                f"root-certificates = {json.dumps(str(Path(self.ca_cert).resolve()))}\n")
        atomic_write_bytes(self.home / "config.toml", toml.encode(), mode=0o600)

    def control(self) -> _Control:
        """A client for this SuperLink's Control API (HTTPS, verified against the CA)."""
        if self._control is None:
            self._control = _Control(self.address, self.ca_cert)
        return self._control

    def register(self, public_key: bytes, name: str) -> int:
        """Register a SuperNode's OpenSSH public key (what ``flwr supernode register`` does); returns its node id."""
        return self.control().register(public_key, name)

    def register_certificate(self, cert: str | os.PathLike[str], *, name: str,
                             crl: str | os.PathLike[str] | None = None, role: str | None = NODE_ROLE) -> int:
        """Register the key of a node's PKI certificate, once the certificate checks out (``node_public_key``)."""
        return self.register(node_public_key(cert, self.ca_cert, crl_path=crl, role=role), name)

    def nodes(self) -> list[dict[str, Any]]:
        """The registered SuperNodes: ``node-id`` and ``status`` (registered, online, offline, unregistered)."""
        return self.control().nodes()

    def wait_online(self, node_ids: Sequence[int], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        want = {int(n) for n in node_ids}
        while True:
            self._check_alive()
            online = {int(n["node-id"]) for n in self.nodes() if n.get("status") == "online"}
            if want <= online:
                return
            if time.monotonic() >= deadline:
                missing = " ".join(str(n) for n in sorted(want - online))
                raise DeploymentError(f"SuperNodes {missing} did not come online within {timeout:.0f} s")
            time.sleep(0.5)

    def _check_alive(self) -> None:
        if self.process is None or not self.process.alive():
            log = self.process.log_text() if self.process else ""
            raise DeploymentError(f"flower-superlink is not running: {_last_error(log)}")
        self.process.refresh()

    def submit(self, app_dir: Path, run_config: Mapping[str, str | int | float]) -> int:
        """Build the FAB from ``app_dir`` and start a run with ``run_config`` overrides (``flwr run``); its id."""
        return self.control().start_run(Path(app_dir), run_config)

    def run_status(self, run_id: int) -> str:
        """``status:sub-status`` as ``flwr list`` shows it, e.g. ``running`` or ``finished:completed``."""
        return self.control().run_status(run_id)

    def wait_run(self, run_id: int, out_dir: Path, timeout: float) -> RunOutcome:
        """Until the run finishes (or ``timeout``); the ServerApp's result file ends the wait early."""
        start = last_poll = time.monotonic()
        status = "unknown"
        result_path = out_dir / RESULT_FILE
        while True:
            self._check_alive()
            now = time.monotonic()
            if now - last_poll >= (0.5 if result_path.is_file() else _STATUS_POLL):
                status, last_poll = self.run_status(run_id), now
                if status.startswith("finished"):
                    break
            if now - start > timeout:
                raise DeploymentError(f"run {run_id} did not finish within {timeout:.0f} s (status {status})")
            time.sleep(0.25)
        result = json.loads(result_path.read_text()) if result_path.is_file() else None
        params = out_dir / PARAMS_FILE
        return RunOutcome(run_id, status, result, params if params.is_file() else None, time.monotonic() - start,
                          out_dir)

    def stop(self) -> None:
        try:
            if self._control is not None:
                self._control.close()
                self._control = None
        finally:
            if self.process is not None:
                self.process.stop()


class _Control:
    """Flower's Control API over HTTPS, in this process: what the ``flwr`` CLI sends, without starting a Python
    process per call (seconds each on a small machine)."""

    def __init__(self, address: str, ca_cert: Path, timeout: float = 30.0) -> None:
        from flwr.supercore.control import ControlHttpClient

        self.client = ControlHttpClient(f"https://{address}", verify=ssl.create_default_context(cafile=str(ca_cert)),
                                        timeout=timeout)

    def close(self) -> None:
        self.client.close()

    @contextlib.contextmanager
    def _call(self, what: str) -> Iterator[None]:
        import httpx

        try:
            yield
        except httpx.HTTPStatusError as exc:
            raise DeploymentError(f"the SuperLink refused {what}: HTTP {exc.response.status_code} "
                                  f"{exc.response.text[:200]}") from exc
        except httpx.HTTPError as exc:
            raise DeploymentError(f"could not reach the SuperLink's Control API for {what}: {exc}") from exc

    def register(self, public_key: bytes, name: str) -> int:
        from flwr.proto.control_pb2 import RegisterNodeRequest
        from flwr.supercore.primitives.asymmetric import public_key_to_bytes

        key = serialization.load_ssh_public_key(public_key)
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise InvalidArgumentError("a SuperNode key must be an EC public key")
        with self._call(f"registering node {name}"):
            res = self.client.RegisterNode(RegisterNodeRequest(public_key=public_key_to_bytes(key), name=name))
        if not res.node_id:
            raise DeploymentError(f"the SuperLink did not register node {name}")
        return int(res.node_id)

    def nodes(self) -> list[dict[str, Any]]:
        from flwr.proto.control_pb2 import ListNodesRequest

        with self._call("listing nodes"):
            res = self.client.ListNodes(ListNodesRequest())
        return [{"node-id": int(n.node_id), "status": str(n.status)} for n in res.nodes_info]

    def start_run(self, app_dir: Path, run_config: Mapping[str, str | int | float]) -> int:
        import hashlib

        from flwr.cli.build import build_fab_from_disk
        from flwr.common.serde import fab_to_proto, user_config_to_proto
        from flwr.proto.control_pb2 import StartRunRequest
        from flwr.supercore.fab import Fab

        fab_bytes = build_fab_from_disk(app_dir)
        fab = Fab(hashlib.sha256(fab_bytes).hexdigest(), fab_bytes, {})
        request = StartRunRequest(fab=fab_to_proto(fab), override_config=user_config_to_proto(dict(run_config)),
                                  federation="")
        with self._call("starting the run"):
            res = self.client.StartRun(request)
        if not res.HasField("run_id"):
            raise DeploymentError("the SuperLink did not start the run")
        return int(res.run_id)

    def run_status(self, run_id: int) -> str:
        from flwr.proto.control_pb2 import ListRunsRequest

        with self._call(f"reading run {run_id}"):
            res = self.client.ListRuns(ListRunsRequest(run_id=run_id))
        run = res.run_dict.get(run_id)
        if run is None:
            return "unknown"
        return f"{run.status.status}:{run.status.sub_status}" if run.status.sub_status else str(run.status.status)


# --- a SuperNode ----------------------------------------------------------------------------------------------------
@dataclass
class SuperNode:
    """``flower-supernode`` connecting to ``superlink`` (host:port), verifying it against ``ca_cert``, signing its
    requests with the EC key of its PKI certificate (``key``; None: no node auth), runtime API on a free port.

    ``node_config`` is what the ClientApp reads (``data``, ``ledger-dir``, ``epsilon-budget``; see ``_deploy_app``);
    without a ``ledger-dir`` the node's local-DP ledger lives in ``workdir/ledger``."""

    workdir: Path
    superlink: str
    ca_cert: Path
    key: Path | None
    node_config: Mapping[str, str | int | float] = field(default_factory=dict)
    passphrase: bytes | None = None
    max_wait: float = 15.0
    max_retries: int = 3
    process: FlowerProcess | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.workdir = _private_dir(Path(self.workdir))
        self.home = _private_dir(self.workdir / "flwr-home")
        self.env = flower_env(self.home)
        self._auth_key: Path | None = None
        if "ledger-dir" not in self.node_config:
            self.node_config = {**self.node_config, "ledger-dir": str(_private_dir(self.workdir / "ledger").resolve())}

    def __enter__(self) -> SuperNode:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start the SuperNode (without waiting: ``LocalFederation``/``wait_online`` see it come online)."""
        if self.key is not None and self._auth_key is None:
            self._auth_key = write_node_auth_key(self.key, self.workdir / "node-auth.key", passphrase=self.passphrase)
        argv = [flower_executable("flower-supernode"),
                "--superlink", self.superlink,
                "--root-certificates", str(Path(self.ca_cert).resolve()),
                "--port", str(free_port()),
                "--max-retries", str(self.max_retries), "--max-wait-time", str(self.max_wait)]
        if self._auth_key is not None:
            argv += ["--auth-supernode-private-key", str(self._auth_key)]
        if self.node_config:
            argv += ["--node-config", " ".join(f"{k}={_toml_value(v)}" for k, v in self.node_config.items())]
        if self.process is not None:
            self.process.stop()
        self.process = FlowerProcess(argv, env=self.env, log_path=self.workdir / "supernode.log", cwd=self.workdir)

    def bind_failed(self) -> bool:
        """Whether it exited because its runtime port was taken meanwhile (then ``start`` again picks another)."""
        return self.process is not None and not self.process.alive() and _bind_failed(self.process.log_text())

    def alive(self) -> bool:
        return self.process is not None and self.process.alive()

    def wait_exit(self, timeout: float) -> int | None:
        """The SuperNode's exit status once it exits, or None if still running after ``timeout``."""
        return None if self.process is None else self.process.wait(timeout)

    def refusal(self) -> NodeRefusedError | None:
        """Why the SuperLink did not let this node in, read from its log once it has exited (None: it has not)."""
        if self.process is None or self.process.alive() or self.process.popen.returncode == 0:
            return None
        return refusal_from_log(self.process.log_text(), self.process.popen.returncode)

    def stop(self) -> None:
        try:
            if self.process is not None:
                self.process.stop()
        finally:
            if self._auth_key is not None:
                with contextlib.suppress(FileNotFoundError):
                    self._auth_key.unlink()


def refusal_from_log(log: str, returncode: int | None) -> NodeRefusedError:
    if "CERTIFICATE_VERIFY_FAILED" in log or "SSL/TLS handshake error" in log:
        return NodeRefusedError("the SuperLink's certificate did not verify against this node's CA certificate",
                                "tls")
    if "Failed to activate SuperNode" in log or "[code: 2004]" in log:
        return NodeRefusedError("the SuperLink refused this node's key: it is not registered there", "auth")
    return NodeRefusedError(f"the SuperNode could not connect (exit status {returncode}): {_last_error(log)}",
                            "connect")


def _last_error(log: str) -> str:
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", ln).strip() for ln in log.splitlines()]
    errors = [ln for ln in lines if ln.startswith(("ERROR", "Failed", "[code")) or "Error" in ln]
    pick = errors[-1] if errors else (next((ln for ln in reversed(lines) if ln), "no output"))
    return pick[:300]


def _toml_value(v: str | int | float) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(v)  # a TOML basic string


def _toml(values: Mapping[str, str | int | float]) -> str:
    return "".join(f"{k} = {_toml_value(v)}\n" for k, v in values.items())


# --- the app --------------------------------------------------------------------------------------------------------
APP_CONFIG_DEFAULTS: dict[str, str | int | float] = {
    "fl-config": "", "allowed-nodes": "", "out-dir": "", "eval-data": "", "root-data": "", "round-timeout": 120.0,
    "ledger": "", "epsilon-budget": 0.0,
}
#: without a config file, today's deployment defaults on the FLConfig (the rest: FLConfig's own defaults)
DEFAULT_ROUNDS, DEFAULT_LOCAL_EPOCHS, DEFAULT_LR = 2, 2, 0.5


def deploy_config(path: str | os.PathLike[str] | None = None, *, nodes: int, rounds: int | None = None,
                  local_epochs: int | None = None, lr: float | None = None) -> FLConfig:
    """The FLConfig a deployment runs for ``nodes`` registered SuperNodes, checked before anything starts.

    From the TOML at ``path`` (as ``fl simulate`` reads it: top level or an ``[fl]`` table), else the deployment
    defaults; ``rounds``/``local_epochs``/``lr`` override either. The population is the registered nodes:
    ``clients`` is set to ``nodes`` (a file naming another number is refused) and ``clients_per_round`` defaults to
    all of them. Malformed values and unsupported combinations are one-line ``InvalidArgumentError``s."""
    from edgeshield.fl._config import FLConfig, read_config_table

    data: dict[str, Any]
    if path is None:
        data = {"rounds": DEFAULT_ROUNDS, "local_epochs": DEFAULT_LOCAL_EPOCHS, "lr": DEFAULT_LR}
    else:
        data = read_config_table(path)
    for key, value in (("rounds", rounds), ("local_epochs", local_epochs), ("lr", lr)):
        if value is not None:
            data[key] = value
    given = data.get("clients", nodes)
    if given != nodes or isinstance(given, bool):
        raise InvalidArgumentError(f"fl config: clients: {given!r}, but the deployment trains on the {nodes} "
                                   "registered nodes (leave clients out, or give one --node-cert per client)")
    data["clients"] = nodes
    data.setdefault("clients_per_round", nodes)
    return check_deploy_config(FLConfig.from_dict(data))


def check_deploy_config(cfg: FLConfig) -> FLConfig:
    """``cfg`` if a deployment can run it (what ``fl simulate`` accepts, less secure aggregation), else the reason."""
    from edgeshield.fl._config import UnsupportedCombinationError, check_combination
    from edgeshield.fl._sim import effective_noise_multiplier
    from edgeshield.fl._strategy import build_aggregation

    if cfg.secagg or cfg.dp.mode == "distributed":
        raise UnsupportedCombinationError(
            "secure aggregation / distributed DP on a deployment: EdgeShield runs SecAgg+ in simulation only; use "
            "central or local DP here")
    check_combination(cfg)
    build_aggregation(cfg, effective_noise_multiplier(cfg))  # the DP parameters checked before Flower starts
    return cfg


def run_config(cfg: FLConfig, node_ids: Sequence[int], out_dir: Path, *, eval_data: Path | None = None,
               root_data: Path | None = None, round_timeout: float = 120.0, ledger: Path | None = None,
               epsilon_budget: float | None = None) -> dict[str, str | int | float]:
    """The run config the ServerApp reads (``_deploy_app``), paths made absolute."""
    if ledger is not None and (epsilon_budget is None or cfg.dp.mode != "central"):
        raise InvalidArgumentError("a server ledger (--ledger) needs central DP and an --epsilon-budget")

    def path(p: Path | None) -> str:
        return str(Path(p).resolve()) if p is not None else ""

    return {"fl-config": json.dumps(cfg.to_dict()), "allowed-nodes": " ".join(map(str, node_ids)),
            "out-dir": path(out_dir), "eval-data": path(eval_data), "root-data": path(root_data),
            "round-timeout": float(round_timeout), "ledger": path(ledger),
            "epsilon-budget": float(epsilon_budget or 0.0)}


def write_app(directory: Path) -> Path:
    """Write the Flower app project (``flwr run`` builds the FAB from it): a stub naming EdgeShield's apps."""
    directory = _private_dir(Path(directory))
    pkg = _private_dir(directory / FAB_PACKAGE)
    pyproject = (
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n\n'
        '[project]\nname = "edgeshield-fl"\nversion = "1.0.0"\n'
        'description = "EdgeShield federated digits (the code is the installed edgeshield.fl)"\n'
        'license = "Apache-2.0"\ndependencies = []\n\n'
        '[tool.flwr.app]\npublisher = "edgeshield"\n\n'
        f'[tool.flwr.app.components]\nserverapp = "{FAB_PACKAGE}.apps:server_app"\n'
        f'clientapp = "{FAB_PACKAGE}.apps:client_app"\n\n'
        f"[tool.flwr.app.config]\n{_toml(APP_CONFIG_DEFAULTS)}"
    )
    atomic_write_bytes(directory / "pyproject.toml", pyproject.encode())
    atomic_write_bytes(pkg / "__init__.py", b'"""EdgeShield federated app stub."""\n')
    atomic_write_bytes(pkg / "apps.py", (
        b'"""The ServerApp and ClientApp come from the installed EdgeShield (edgeshield.fl._deploy_app)."""\n\n'
        b"from edgeshield.fl._deploy_app import build_client_app, build_server_app\n\n"
        b"server_app = build_server_app()\nclient_app = build_client_app()\n"))
    return directory


# --- all in one: a local federation ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class NodeSpec:
    """A SuperNode to start: its PKI certificate and key, its local data (.npz; None: a digits partition), the
    privacy budget it agrees to spend under local DP, and (evaluation only) the attack a compromised node plays."""

    name: str
    cert: Path
    key: Path
    data: Path | None = None
    epsilon_budget: float | None = None
    attack: str | None = None

    def node_config(self, data: Path) -> dict[str, str | int | float]:
        out: dict[str, str | int | float] = {"data": str(Path(data).resolve())}
        if self.epsilon_budget is not None:
            out["epsilon-budget"] = float(self.epsilon_budget)
        if self.attack:
            from edgeshield.fl._attacks import parse_attack

            parse_attack(self.attack)
            out["attack"] = self.attack
        return out


class LocalFederation:
    """A SuperLink and one SuperNode per ``nodes`` on one host (TLS, node auth), as a context manager; ``train``
    runs an FLConfig on them with EdgeShield's strategy. Leaving the block stops every process, whatever happened
    inside it."""

    def __init__(self, workdir: str | os.PathLike[str], *, ca_cert: Path, server_cert: Path, server_key: Path,
                 nodes: Sequence[NodeSpec], crl: Path | None = None, eval_data: Path | None = None,
                 online_timeout: float = 60.0) -> None:
        if not nodes:
            raise InvalidArgumentError("a federation needs at least one node")
        self.work = _private_dir(Path(workdir))
        self.ca_cert, self.server_cert, self.server_key = Path(ca_cert), Path(server_cert), Path(server_key)
        self.specs, self.crl, self.eval_data, self.online_timeout = list(nodes), crl, eval_data, online_timeout
        self.node_ids: list[int] = []
        self.nodes: list[SuperNode] = []
        self._stack = contextlib.ExitStack()
        self.link: SuperLink | None = None

    def __enter__(self) -> LocalFederation:
        try:
            self._start()
        except BaseException:
            self._stop_nodes()
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop_nodes()
        self._stack.close()

    def _stop_nodes(self) -> None:
        """Stop the SuperNodes side by side (each takes a second or two to deregister) before the SuperLink."""
        from concurrent.futures import ThreadPoolExecutor

        if self.nodes:
            with ThreadPoolExecutor(max_workers=len(self.nodes)) as pool:
                list(pool.map(lambda n: n.stop(), self.nodes))

    def _start(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from edgeshield.fl._deploy_app import write_digits_partitions

        # Each node trains on a local file; reading .npz spares every ClientApp process a scikit-learn import.
        parts: list[Path] = []
        if self.eval_data is None or any(n.data is None for n in self.specs):
            parts, eval_set = write_digits_partitions(self.work / "data", len(self.specs))
            self.eval_data = self.eval_data or eval_set
        link = self._stack.enter_context(SuperLink(self.work / "superlink", self.ca_cert, self.server_cert,
                                                   self.server_key))
        self.link = link
        with ThreadPoolExecutor(max_workers=len(self.specs)) as pool:  # each `flwr supernode register` is a process
            self.node_ids = list(pool.map(lambda n: link.register_certificate(n.cert, name=n.name, crl=self.crl),
                                          self.specs))
        for i, n in enumerate(self.specs):
            data = n.data if n.data is not None else parts[i]
            self.nodes.append(self._stack.enter_context(
                SuperNode(self.work / n.name, link.address, self.ca_cert, n.key,
                          node_config=n.node_config(data))))
        self._wait_online()

    def _wait_online(self) -> None:
        """Until every node is online; a node that lost its port race is restarted, one that exited is an error."""
        link = self.link
        if link is None:
            raise DeploymentError("the federation has no SuperLink")
        deadline = time.monotonic() + self.online_timeout
        restarts = 0
        while True:
            for n in self.nodes:
                if n.alive():
                    continue
                if n.bind_failed() and restarts < 3:
                    restarts += 1
                    n.start()
                    continue
                refusal = n.refusal()
                raise refusal or DeploymentError(f"SuperNode in {n.workdir} exited")
            online = {int(x["node-id"]) for x in link.nodes() if x.get("status") == "online"}
            if set(self.node_ids) <= online:
                return
            if time.monotonic() >= deadline:
                raise DeploymentError(f"the SuperNodes did not come online within {self.online_timeout:.0f} s")
            time.sleep(0.3)

    def processes(self) -> list[Any]:
        """Every process this federation started that is still running."""
        procs = [self.link.process] if self.link and self.link.process else []
        procs += [n.process for n in self.nodes if n.process is not None]
        return [p for fp in procs for p in fp.processes()]

    def train(self, config: FLConfig | None = None, *, timeout: float = 120.0, out_dir: Path | None = None,
              root_data: Path | None = None, ledger: Path | None = None,
              epsilon_budget: float | None = None) -> RunOutcome:
        """Submit the EdgeShield app with ``config`` (None: :func:`deploy_config`'s defaults) on the registered
        nodes and wait for the result; each round may take ``timeout`` seconds (the run, one more)."""
        if self.link is None:
            raise DeploymentError("the federation is not started")
        cfg = check_deploy_config(config) if config is not None else deploy_config(nodes=len(self.node_ids))
        if cfg.clients != len(self.node_ids):
            raise InvalidArgumentError(f"fl config: clients: {cfg.clients}, but the federation has "
                                       f"{len(self.node_ids)} nodes")
        out = Path(out_dir) if out_dir is not None else self.work / "out"
        app = write_app(self.work / "app")
        run_id = self.link.submit(app, run_config(cfg, self.node_ids, out, eval_data=self.eval_data,
                                                  root_data=root_data, round_timeout=timeout, ledger=ledger,
                                                  epsilon_budget=epsilon_budget))
        outcome = self.link.wait_run(run_id, out, timeout * (cfg.rounds + 1))
        return _finished(outcome, self.link)


def _finished(outcome: RunOutcome, link: SuperLink) -> RunOutcome:
    """``outcome`` if the run completed; else a DeploymentError with the ServerApp's reason (or the SuperLink's)."""
    if outcome.completed and outcome.result is not None and "error" not in outcome.result:
        return outcome
    why = (outcome.result or {}).get("error") or (_last_error(link.process.log_text()) if link.process else "")
    raise DeploymentError(f"run {outcome.run_id} ended {outcome.status}: {why}")


def run_federation(workdir: str | os.PathLike[str], *, ca_cert: Path, server_cert: Path, server_key: Path,
                   nodes: Sequence[NodeSpec], config: FLConfig | None = None, crl: Path | None = None,
                   timeout: float = 120.0, out_dir: Path | None = None,
                   eval_data: Path | None = None) -> RunOutcome:
    """Start a local federation, run ``config`` on it, stop everything; returns the finished run
    (``RunOutcome.result`` holds accuracy, ε and rejections per round, ``fl_result()`` the FLResult)."""
    with LocalFederation(workdir, ca_cert=ca_cert, server_cert=server_cert, server_key=server_key, nodes=nodes,
                         crl=crl, eval_data=eval_data) as fed:
        return fed.train(config, timeout=timeout, out_dir=out_dir)


@contextlib.contextmanager
def temporary_workdir(prefix: str = "edgeshield-fl-") -> Iterator[Path]:
    """A private (0700) temp directory, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix=prefix) as d:
        yield _private_dir(Path(d))
