"""A software TPM 2.0 (Debian's ``swtpm``) on free loopback ports, for tests, the demo and development.

``SoftwareTPM`` owns one ``swtpm socket --tpm2`` process in its own process group and a private 0700 work
directory (TPM state, its local CA, snapshots). ``restart()`` is a reboot: the permanent state (seeds, persistent
objects, NV, counters) survives and the PCRs reset. ``snapshot()``/``restore()`` copy the state directory, which is
what an attacker with the disk does to roll a TPM back; only a software TPM can be rolled back this way.

It proves code paths, not hardware security: its state is a plain file readable by root.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType

from edgeshield.errors import EdgeShieldError, MissingDependencyError

__all__ = ["SoftwareTPM", "SoftwareTPMError", "live_instances", "live_processes"]

_START_TIMEOUT_S = 10.0
_STOP_TIMEOUT_S = 5.0
_SETUP_TIMEOUT_S = 60.0
_CMD_SHUTDOWN = 0x03  # swtpm control channel: save volatile state and exit

# Every swtpm process this interpreter started and has not reaped yet: the test fixtures check it is empty.
_LIVE: dict[int, subprocess.Popen[bytes]] = {}
_RUNNING: set[SoftwareTPM] = set()  # instances between start() and stop()
_LIVE_LOCK = threading.Lock()


class SoftwareTPMError(EdgeShieldError):
    """The software TPM could not be set up, started or stopped."""


def live_processes() -> list[int]:
    """Process ids of the swtpm processes started here that are still running (empty when all were stopped)."""
    with _LIVE_LOCK:
        return [pid for pid, proc in _LIVE.items() if proc.poll() is None]


@atexit.register
def _stop_all() -> None:  # an interpreter exiting with a TPM still running (a crashed test) leaves no swtpm behind
    for tpm in live_instances():
        with contextlib.suppress(Exception):
            tpm.close()


def live_instances() -> list[SoftwareTPM]:
    """The SoftwareTPM objects started and not stopped yet."""
    with _LIVE_LOCK:
        return list(_RUNNING)


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise MissingDependencyError(f"{name} not found: install Debian's swtpm and swtpm-tools (make installs them)")
    return path


def _free_port_pair() -> tuple[int, int]:
    """Two free adjacent loopback ports (P, P+1): tpm2-tss's swtpm TCTI expects the control channel at P+1."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
                # Both released here; swtpm binds them a moment later (a race another process could win: start()
                # retries with a fresh pair when swtpm cannot bind).
                return port, port + 1
    raise SoftwareTPMError("no two adjacent free ports on 127.0.0.1")


def _wait_listening(port: int, proc: subprocess.Popen[bytes], deadline: float) -> bool:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
        time.sleep(0.02)
    return False


class SoftwareTPM:
    """One swtpm TPM 2.0 on 127.0.0.1; a context manager (start on enter; stop and delete its files on exit).

    ``state_dir`` keeps the TPM's state somewhere the caller chooses (kept on exit); by default it lives in the
    private work directory. ``with_ek_cert`` manufactures the TPM first with ``swtpm_setup``: RSA and ECC
    endorsement keys, their certificates and a platform certificate, signed by a local CA (``swtpm_localca``) in
    ``ca_dir`` (shared between instances when given, so several TPMs can chain to one CA; else private).
    """

    def __init__(
        self, state_dir: Path | None = None, *, with_ek_cert: bool = False, ca_dir: Path | None = None
    ) -> None:
        self._work = Path(tempfile.mkdtemp(prefix="edgeshield-swtpm-"))  # mkdtemp: 0700
        self.state_dir = Path(state_dir) if state_dir is not None else self._work / "state"
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.with_ek_cert = with_ek_cert
        self.ca_dir = Path(ca_dir) if ca_dir is not None else self._work / "ca"
        self.ek_cert_dir = self._work / "ek-certs"
        self.port = 0
        self.ctrl_port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._snapshots = 0
        self._closed = False
        if with_ek_cert and not (self.state_dir / "tpm2-00.permall").exists():
            self._manufacture()

    # --- life cycle ------------------------------------------------------------------------------------------
    @property
    def tcti(self) -> str:
        """The TCTI string tpm2-pytss connects with (``swtpm:``; ``mssim:`` does not work with swtpm's framing)."""
        if self._proc is None:
            raise SoftwareTPMError("the software TPM is not running")
        return f"swtpm:host=127.0.0.1,port={self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        if self._closed:
            raise SoftwareTPMError("this software TPM was closed")
        if self.running:
            return
        binary = _binary("swtpm")
        last = ""
        for _ in range(5):
            port, ctrl = _free_port_pair()
            errlog = self._work / "swtpm.stderr"
            cmd = [
                binary, "socket", "--tpm2",
                "--tpmstate", f"dir={self.state_dir},mode=0600",
                "--server", f"type=tcp,port={port},bindaddr=127.0.0.1",
                "--ctrl", f"type=tcp,port={ctrl},bindaddr=127.0.0.1",
                "--flags", "not-need-init,startup-clear",
            ]  # fmt: skip
            with open(errlog, "wb") as err:  # a file, not a pipe: a chatty swtpm can never block on a full pipe
                proc = subprocess.Popen(
                    cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True
                )
            with _LIVE_LOCK:
                _LIVE[proc.pid] = proc
            deadline = time.monotonic() + _START_TIMEOUT_S
            if _wait_listening(port, proc, deadline) and _wait_listening(ctrl, proc, deadline):
                self._proc, self.port, self.ctrl_port = proc, port, ctrl
                with _LIVE_LOCK:
                    _RUNNING.add(self)
                return
            self._reap(proc)
            last = errlog.read_text(errors="replace")
            if "bind" not in last.lower() and "address already in use" not in last.lower():
                break  # not a port race: retrying will not help
        raise SoftwareTPMError(f"swtpm did not start: {last.strip() or 'no output'}")

    def stop(self) -> None:
        """Shut the TPM down cleanly (its state saved), then make sure no process of its group is left."""
        proc, self._proc = self._proc, None
        with _LIVE_LOCK:
            _RUNNING.discard(self)
        if proc is None:
            return
        if proc.poll() is None:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.ctrl_port), timeout=2.0) as s,
            ):
                s.settimeout(2.0)
                s.sendall(struct.pack(">I", _CMD_SHUTDOWN))
                s.recv(4)
        self._reap(proc)

    def restart(self) -> None:
        """A reboot: same permanent state, PCRs reset to their power-on values, new ports (``tcti`` changes)."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop and delete the work directory (and the state, unless the caller chose ``state_dir``)."""
        self.stop()
        self._closed = True
        shutil.rmtree(self._work, ignore_errors=True)  # holds the state too, unless the caller chose state_dir

    def __enter__(self) -> SoftwareTPM:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __del__(self) -> None:  # a last resort: never leave a swtpm behind a crashed test
        with contextlib.suppress(Exception):
            if self._proc is not None:
                self._reap(self._proc)

    @staticmethod
    def _reap(proc: subprocess.Popen[bytes]) -> None:
        """Wait for ``proc`` a moment, then SIGTERM and SIGKILL its whole process group."""
        try:
            try:
                proc.wait(timeout=_STOP_TIMEOUT_S if proc.poll() is None else 0.1)
            except subprocess.TimeoutExpired:
                for sig in (signal.SIGTERM, signal.SIGKILL):
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(proc.pid, sig)
                    try:
                        proc.wait(timeout=_STOP_TIMEOUT_S)
                        break
                    except subprocess.TimeoutExpired:
                        continue
            # Anything else left in its group (swtpm forks nothing, but be sure).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        finally:
            with _LIVE_LOCK:
                if proc.poll() is not None:
                    _LIVE.pop(proc.pid, None)

    # --- rollback attacks --------------------------------------------------------------------------------------
    def snapshot(self) -> Path:
        """Copy the TPM's permanent state now (seeds, persistent objects, NV, clock and counters) and return it.

        Taken while running, it holds what swtpm last wrote (the permanent state is written on every change);
        volatile state (loaded transient objects, PCR values) is not part of it.
        """
        self._snapshots += 1
        snap = self._work / "snapshots" / f"{self._snapshots:04d}"
        snap.parent.mkdir(mode=0o700, exist_ok=True)
        shutil.copytree(self.state_dir, snap, ignore=shutil.ignore_patterns(".lock"))
        return snap

    def restore(self, snap: Path) -> None:
        """Put an earlier snapshot back and reboot into it (a TPM rolled back to an older state)."""
        was_running = self._proc is not None
        self.stop()
        for item in self.state_dir.iterdir():
            if item.is_dir():
                shutil.rmtree(item)
            elif item.name != ".lock":
                item.unlink()
        for item in Path(snap).iterdir():
            shutil.copy2(item, self.state_dir / item.name)
        if was_running:
            self.start()

    # --- endorsement certificates ------------------------------------------------------------------------------
    def _manufacture(self) -> None:
        setup = _binary("swtpm_setup")
        localca = _binary("swtpm_localca")
        self.ca_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.ek_cert_dir.mkdir(mode=0o700, exist_ok=True)
        conf = self._work / "setup"
        conf.mkdir(mode=0o700, exist_ok=True)
        ca = self.ca_dir
        (conf / "localca.conf").write_text(
            f"statedir = {ca}\nsigningkey = {ca}/signkey.pem\nissuercert = {ca}/issuercert.pem\n"
            f"certserial = {ca}/certserial\n"
        )
        (conf / "localca.options").write_text(
            "--platform-manufacturer EdgeShield\n--platform-version 2.1\n--platform-model swtpm\n"
        )
        (conf / "swtpm_setup.conf").write_text(
            f"create_certs_tool = {localca}\ncreate_certs_tool_config = {conf}/localca.conf\n"
            f"create_certs_tool_options = {conf}/localca.options\nactive_pcr_banks = sha256\n"
        )
        cmd = [
            setup, "--tpm2", "--tpmstate", str(self.state_dir), "--create-ek-cert", "--create-platform-cert",
            "--config", str(conf / "swtpm_setup.conf"), "--write-ek-cert-files", str(self.ek_cert_dir),
            "--logfile", str(self._work / "swtpm_setup.log"),
        ]  # fmt: skip
        try:
            done = subprocess.run(
                cmd, check=False, capture_output=True, timeout=_SETUP_TIMEOUT_S, start_new_session=True
            )
        except subprocess.TimeoutExpired as exc:
            raise SoftwareTPMError(f"swtpm_setup took longer than {_SETUP_TIMEOUT_S:.0f} s") from exc
        if done.returncode != 0:
            logfile = self._work / "swtpm_setup.log"
            log = logfile.read_text(errors="replace") if logfile.exists() else done.stderr.decode(errors="replace")
            raise SoftwareTPMError(f"swtpm_setup failed: {log.strip()[-800:]}")

    def ek_ca_certs(self) -> list[Path]:
        """The local CA's certificates (root first, then the issuer that signed the EK certificates), to enrol."""
        if not self.with_ek_cert:
            raise SoftwareTPMError("this software TPM was made without EK certificates (with_ek_cert=False)")
        return [self.ca_dir / "swtpm-localca-rootca-cert.pem", self.ca_dir / "issuercert.pem"]

    def ek_certs(self) -> list[Path]:
        """The EK certificates (DER) swtpm_setup wrote: ``ek-rsa2048.crt`` and ``ek-secp384r1.crt``."""
        if not self.with_ek_cert:
            raise SoftwareTPMError("this software TPM was made without EK certificates (with_ek_cert=False)")
        return sorted(self.ek_cert_dir.glob("*.crt"))
