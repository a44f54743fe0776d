"""What this device really has — TEEs, TPM, Secure Boot, IMA, hardware RNG, network exposure — with the evidence.

Everything is read from files under a root directory (``/`` on a device, a fake tree in tests): sysfs, procfs,
efivarfs and /dev nodes, plus one read-only ``TPM2_GetCapability`` sent to the TPM device when it is a character
device this process may open (TPM 2.0 exposes neither manufacturer nor firmware version in sysfs). Each finding is
``present``, ``absent`` or ``unknown``; ``unknown`` is an answer, given whenever the evidence is missing, unreadable,
malformed or does not decide. The probe reports; it does not attest: root on the device can fake every file it reads.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import re
import select
import stat
import struct
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from edgeshield.errors import InvalidArgumentError, PathNotFoundError

__all__ = [
    "FEATURES",
    "Evidence",
    "Finding",
    "ListeningSocket",
    "ProbeReport",
    "SocketOwner",
    "Status",
    "parse_proc_net_line",
    "parse_tpm_properties",
    "probe",
    "query_tpm",
]

Status = Literal["present", "absent", "unknown"]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
FEATURES = ("sgx", "tdx", "sev", "trustzone", "tpm", "secure_boot", "ima", "hwrng", "listening")

_MAX_READ = 16 << 20  # /proc/net/tcp of a busy server or cpuinfo of a large machine fits; nothing reads unbounded
_TPM_TIMEOUT_S = 5.0
_EFI_GLOBAL = "8be4df61-93ca-11d2-aa0d-00e098032b8c"  # EFI_GLOBAL_VARIABLE: SecureBoot, SetupMode, ...
_IFNAME = re.compile(r"[A-Za-z0-9_.:@-]{1,15}")  # IFNAMSIZ - 1; no '/' or whitespace


# --- the report ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Evidence:
    """One thing read: ``source`` (a path inside the root, or a path and what in it) and what it showed."""

    source: str
    observed: str

    def to_dict(self) -> dict[str, str]:
        return {"source": self.source, "observed": self.observed}


@dataclass(frozen=True)
class Finding:
    """A feature's status, why, what was read, and its details (JSON values: None where not known)."""

    status: Status
    reason: str
    evidence: tuple[Evidence, ...]
    detail: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        clash = {"status", "reason", "evidence"} & set(self.detail)
        if clash:
            raise ValueError(f"detail keys {sorted(clash)} would hide the finding's own fields")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status, "reason": self.reason,
                               "evidence": [e.to_dict() for e in self.evidence]}
        out.update((k, _jsonable(v)) for k, v in self.detail.items())
        return out


@dataclass(frozen=True)
class SocketOwner:
    pid: int
    name: str | None  # /proc/PID/comm; None when unreadable

    def to_dict(self) -> dict[str, Any]:
        return {"pid": self.pid, "name": self.name}


@dataclass(frozen=True)
class ListeningSocket:
    """A listening TCP or bound, unconnected UDP socket; ``exposed`` is None when the evidence does not decide."""

    protocol: Literal["tcp", "tcp6", "udp", "udp6"]
    address: str
    port: int
    inode: int
    uid: int
    exposed: bool | None
    why: str
    interface: str | None
    owners: tuple[SocketOwner, ...] | None  # None: no process showed the inode (or /proc/PID/fd was unreadable)

    def to_dict(self) -> dict[str, Any]:
        return {"protocol": self.protocol, "address": self.address, "port": self.port, "inode": self.inode,
                "uid": self.uid, "exposed": self.exposed, "why": self.why, "interface": self.interface,
                "processes": None if self.owners is None else [o.to_dict() for o in self.owners]}


@dataclass(frozen=True)
class ProbeReport:
    """What :func:`probe` found under ``root``: one :class:`Finding` per feature."""

    root: str
    sgx: Finding
    tdx: Finding
    sev: Finding
    trustzone: Finding
    tpm: Finding
    secure_boot: Finding
    ima: Finding
    hwrng: Finding
    listening: Finding

    def features(self) -> tuple[tuple[str, Finding], ...]:
        return tuple((name, getattr(self, name)) for name in FEATURES)

    def to_dict(self) -> dict[str, Any]:
        """The figures contract: one key per feature, each ``{status, reason, evidence, <detail>...}``."""
        return {name: finding.to_dict() for name, finding in self.features()}


def _jsonable(value: Any) -> Any:
    if isinstance(value, (ListeningSocket, SocketOwner, Evidence)):
        return value.to_dict()
    if isinstance(value, (tuple, list, frozenset, set)):
        items = sorted(value) if isinstance(value, (frozenset, set)) else value
        return [_jsonable(v) for v in items]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def _finding(status: Status, reason: str, evidence: Iterable[Evidence], **detail: Any) -> Finding:
    return Finding(status, reason, tuple(evidence), MappingProxyType(detail))


# --- reading the root ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Read:
    data: bytes | None  # None: missing, unreadable or not a regular file
    missing: bool
    why: str  # what happened, for the evidence line

    def text(self) -> str | None:
        return None if self.data is None else self.data.decode("utf-8", errors="replace")


def _oserror(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


class _Root:
    """Paths inside the probed root; every read is bounded, never follows into a FIFO, and never raises."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, inner: str) -> Path:
        return self.root / inner.lstrip("/")

    def read(self, inner: str, limit: int = _MAX_READ) -> _Read:
        p = self.path(inner)
        try:
            st = p.stat()
        except FileNotFoundError:
            return _Read(None, True, "missing")
        except OSError as exc:
            return _Read(None, False, f"unreadable: {_oserror(exc)}")
        if not stat.S_ISREG(st.st_mode):
            return _Read(None, False, "unreadable: not a regular file")
        try:  # O_NONBLOCK: a FIFO swapped in after the stat cannot hang the probe
            fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            return _Read(None, False, f"unreadable: {_oserror(exc)}")
        try:
            chunks: list[bytes] = []
            total = 0
            while total <= limit:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
        except OSError as exc:
            return _Read(None, False, f"unreadable: {_oserror(exc)}")
        finally:
            os.close(fd)
        if total > limit:
            return _Read(None, False, f"unreadable: larger than {limit} bytes")
        return _Read(b"".join(chunks), False, "read")

    def node(self, inner: str) -> tuple[bool | None, str]:
        """Whether a /dev node exists (None: cannot tell) and what it is."""
        try:
            st = self.path(inner).stat()
        except FileNotFoundError:
            return False, "missing"
        except OSError as exc:
            return None, f"cannot stat: {_oserror(exc)}"
        if stat.S_ISCHR(st.st_mode):
            return True, f"character device {os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
        if stat.S_ISREG(st.st_mode):
            return True, "exists (a regular file, not a device node: a copied or fake tree)"
        return True, "exists (not a character device)"

    def listdir(self, inner: str) -> tuple[list[str] | None, str]:
        try:
            return sorted(os.listdir(self.path(inner))), "listed"
        except FileNotFoundError:
            return None, "missing"
        except OSError as exc:
            return None, f"unreadable: {_oserror(exc)}"

    def char_device(self, inner: str) -> str | None:
        """``MAJOR:MINOR`` of a character device node (following links), else None."""
        try:
            st = self.path(inner).stat()
        except OSError:
            return None
        return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}" if stat.S_ISCHR(st.st_mode) else None


def _first_line(r: _Read) -> str | None:
    text = r.text()
    return None if text is None else text.strip().split("\n", 1)[0].strip()


def _observed(r: _Read) -> str:
    line = _first_line(r)
    if line is None:
        return r.why
    return repr(line[:120]) if line else "empty"


@dataclass(frozen=True)
class _Cpu:
    flags: frozenset[str] | None  # None: /proc/cpuinfo unreadable or without a flags line
    evidence: Evidence

    def has(self, *names: str) -> list[str]:
        return sorted(n for n in names if self.flags is not None and n in self.flags)

    def show(self, *names: str) -> Evidence:
        if self.flags is None:
            return self.evidence
        found = self.has(*names)
        return Evidence("/proc/cpuinfo flags", ", ".join(found) + " set" if found else "none of " + ", ".join(names))


def _cpu(root: _Root) -> _Cpu:
    """The union of every ``flags`` (x86) and ``Features`` (Arm) line of /proc/cpuinfo."""
    r = root.read("/proc/cpuinfo")
    text = r.text()
    if text is None:
        return _Cpu(None, Evidence("/proc/cpuinfo", r.why))
    flags: set[str] = set()
    seen = False
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            seen = True
            flags.update(value.split())
    if not seen:
        return _Cpu(None, Evidence("/proc/cpuinfo", "no flags or Features line"))
    return _Cpu(frozenset(flags), Evidence("/proc/cpuinfo", f"{len(flags)} cpu flags"))


def _dev_listable(root: _Root, ev: list[Evidence]) -> list[str] | None:
    names, why = root.listdir("/dev")
    if names is None:
        ev.append(Evidence("/dev", why))
    return names


# --- TEEs ---------------------------------------------------------------------------------------------------------
def _sgx(root: _Root, cpu: _Cpu) -> Finding:
    ev = [cpu.show("sgx", "sgx_lc")]
    devices = []
    for node in ("/dev/sgx_enclave", "/dev/sgx/enclave", "/dev/isgx"):  # in-kernel (5.11+), DCAP and legacy drivers
        exists, why = root.node(node)
        if exists or node == "/dev/sgx_enclave":
            ev.append(Evidence(node, why))
        if exists:
            devices.append(node)
    provision, why = root.node("/dev/sgx_provision")
    if provision:
        ev.append(Evidence("/dev/sgx_provision", why))
    dev = _dev_listable(root, ev)
    flc = None if cpu.flags is None else "sgx_lc" in cpu.flags
    detail = {"enclave_devices": devices, "flexible_launch_control": flc, "provisioning_device": provision}
    if devices:
        return _finding("present", f"enclave device {devices[0]} exists", ev, **detail)
    if dev is None or cpu.flags is None:
        return _finding("unknown", "no enclave device found, but /dev or /proc/cpuinfo could not be read", ev, **detail)
    if "sgx" in cpu.flags:
        return _finding("unknown", "the CPU reports sgx but no enclave device is visible (driver not loaded, no "
                        "flexible launch control, or the device is hidden from this environment)", ev, **detail)
    return _finding("absent", "no sgx cpu flag and no enclave device", ev, **detail)


def _tdx(root: _Root, cpu: _Cpu) -> Finding:
    ev = [cpu.show("tdx_guest")]
    exists, why = root.node("/dev/tdx_guest")
    ev.append(Evidence("/dev/tdx_guest", why))
    dev = _dev_listable(root, ev)
    flag = None if cpu.flags is None else "tdx_guest" in cpu.flags
    detail = {"guest_device": bool(exists), "cpu_flag": flag}
    if exists:
        return _finding("present", "running as a TDX guest: /dev/tdx_guest exists", ev, **detail)
    if flag:
        return _finding("present", "running as a TDX guest (tdx_guest cpu flag); no /dev/tdx_guest for "
                        "attestation reports", ev, **detail)
    if dev is None or exists is None or cpu.flags is None:
        return _finding("unknown", "/dev or /proc/cpuinfo could not be read", ev, **detail)
    return _finding("absent", "no tdx_guest cpu flag and no /dev/tdx_guest", ev, **detail)


def _module_bool(root: _Root, inner: str, ev: list[Evidence]) -> bool | None:
    r = root.read(inner)
    ev.append(Evidence(inner, _observed(r)))
    return {"Y": True, "1": True, "N": False, "0": False}.get(_first_line(r) or "")


def _sev(root: _Root, cpu: _Cpu) -> Finding:
    ev = [cpu.show("sev", "sev_es", "sev_snp")]
    guest, why_guest = root.node("/dev/sev-guest")
    host, why_host = root.node("/dev/sev")
    ev += [Evidence("/dev/sev-guest", why_guest), Evidence("/dev/sev", why_host)]
    dev = _dev_listable(root, ev)
    params_dir = "/sys/module/kvm_amd/parameters"
    loaded = root.path("/sys/module/kvm_amd").is_dir()
    params = {p: _module_bool(root, f"{params_dir}/{p}", ev) for p in ("sev", "sev_es", "sev_snp")} if loaded else {}
    if not loaded:
        ev.append(Evidence("/sys/module/kvm_amd", "missing (kvm_amd not loaded)"))
    flags = cpu.has("sev", "sev_es", "sev_snp")
    if guest:
        return _finding("present", "running as an SEV-SNP guest: /dev/sev-guest exists", ev, role="guest", snp=True,
                        kvm_amd=params, cpu_flags=flags)
    if host or any(params.values()):
        why = "/dev/sev exists" if host else "kvm_amd enables " + ", ".join(p for p, v in params.items() if v)
        return _finding("present", f"SEV host: {why}", ev, role="host", snp=params.get("sev_snp"), kvm_amd=params,
                        cpu_flags=flags)
    detail = {"role": None, "snp": None, "kvm_amd": params, "cpu_flags": flags}
    if dev is None or guest is None or host is None or cpu.flags is None:
        return _finding("unknown", "no SEV device found, but /dev or /proc/cpuinfo could not be read", ev, **detail)
    if params and all(v is False for v in params.values()):
        return _finding("absent", "kvm_amd is loaded with SEV disabled; no SEV device", ev, **detail)
    if flags:
        return _finding("unknown", "the CPU reports " + ", ".join(flags) + " but neither /dev/sev, /dev/sev-guest "
                        "nor kvm_amd shows SEV in use", ev, **detail)
    return _finding("absent", "no SEV cpu flag, device or kvm_amd parameter", ev, **detail)


def _trustzone(root: _Root) -> Finding:
    ev: list[Evidence] = []
    dev = _dev_listable(root, ev)
    nodes = [n for n in (dev or []) if re.fullmatch(r"tee(priv)?[0-9]+", n)]
    implementations: dict[str, str | None] = {}
    for n in nodes:
        ev.append(Evidence(f"/dev/{n}", root.node(f"/dev/{n}")[1]))
        if n.startswith("teepriv"):
            continue
        link = f"/sys/class/tee/{n}/device/driver"
        try:
            implementations[n] = os.path.basename(os.readlink(root.path(link)))
            ev.append(Evidence(link, f"-> {implementations[n]}"))
        except OSError as exc:
            implementations[n] = None
            ev.append(Evidence(link, "missing" if isinstance(exc, FileNotFoundError) else _oserror(exc)))
    dt = "/sys/firmware/devicetree/base/firmware/optee/compatible"
    compat = root.read(dt)
    if not compat.missing:
        ev.append(Evidence(dt, _observed(compat).replace("\\x00", "")))
    detail = {"devices": [f"/dev/{n}" for n in nodes], "implementation": implementations,
              "devicetree_optee": not compat.missing}
    if nodes:
        return _finding("present", f"TEE driver interface /dev/{nodes[0]} exists", ev, **detail)
    if dev is None:
        return _finding("unknown", "/dev could not be listed", ev, **detail)
    ev.append(Evidence("/dev/tee*, /dev/teepriv*", "none"))
    if not compat.missing:
        return _finding("unknown", "the devicetree describes OP-TEE but no /dev/tee* exists (driver not loaded, "
                        "or the device is hidden from this environment)", ev, **detail)
    return _finding("absent", "no /dev/tee* or /dev/teepriv* and no OP-TEE devicetree node", ev, **detail)


# --- TPM ----------------------------------------------------------------------------------------------------------
# TPM2_GetCapability(TPM_CAP_TPM_PROPERTIES, TPM_PT_FIXED, up to 127 properties), no sessions: a read-only command.
_GETCAP_FIXED = struct.pack(">HIIIII", 0x8001, 22, 0x0000017A, 0x00000006, 0x100, 127)
_PT_FAMILY, _PT_REVISION, _PT_MANUFACTURER = 0x100, 0x102, 0x105
_PT_VENDOR = (0x106, 0x107, 0x108, 0x109)
_PT_FW1, _PT_FW2 = 0x10B, 0x10C
_VENDORS = {  # the TCG TPM Vendor ID registry's best-known entries
    "AMD": "AMD", "ATML": "Atmel", "BRCM": "Broadcom", "CSCO": "Cisco", "GOOG": "Google", "HPE": "HPE",
    "IBM": "IBM", "IFX": "Infineon", "INTC": "Intel", "LEN": "Lenovo", "MSFT": "Microsoft", "NSM": "National Semi",
    "NTC": "Nuvoton", "NTZ": "Nationz", "QCOM": "Qualcomm", "ROCC": "Fuzhou Rockchip", "SMSC": "SMSC",
    "SMSN": "Samsung", "SNS": "Sinosun", "STM": "STMicroelectronics", "TXN": "Texas Instruments", "WEC": "Winbond",
}


def parse_tpm_properties(response: bytes) -> dict[int, int]:
    """The TPM_PT_* → value pairs of a GetCapability(TPM_PROPERTIES) response; ValueError if malformed or an error."""
    if len(response) < 10:
        raise ValueError(f"TPM response of {len(response)} bytes, shorter than its 10-byte header")
    _tag, size, rc = struct.unpack(">HII", response[:10])
    if size != len(response):
        raise ValueError(f"TPM response declares {size} bytes, {len(response)} received")
    if rc != 0:
        raise ValueError(f"TPM returned response code 0x{rc:08x}")
    if size < 19:
        raise ValueError("TPM response too short for capability data")
    capability, count = struct.unpack(">II", response[11:19])
    if capability != 6:
        raise ValueError(f"TPM answered capability {capability}, not TPM_PROPERTIES (6)")
    if 19 + 8 * count > size:
        raise ValueError(f"TPM response lists {count} properties but holds {(size - 19) // 8}")
    return dict(struct.iter_unpack(">II", response[19:19 + 8 * count]))


def _ascii4(value: int) -> str:
    return value.to_bytes(4, "big").decode("ascii", errors="replace").replace("\x00", "").strip()


def _tpm_details(props: Mapping[int, int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if _PT_FAMILY in props:
        out["family"] = _ascii4(props[_PT_FAMILY])
    if _PT_REVISION in props:
        out["spec_revision"] = f"{props[_PT_REVISION] // 100}.{props[_PT_REVISION] % 100:02d}"
    if _PT_MANUFACTURER in props:
        code = _ascii4(props[_PT_MANUFACTURER])
        out["manufacturer"] = code
        out["manufacturer_name"] = _VENDORS.get(code)
    vendor = "".join(_ascii4(props[p]) for p in _PT_VENDOR if p in props)
    if vendor:
        out["vendor_string"] = vendor
    if _PT_FW1 in props:
        fw1, fw2 = props[_PT_FW1], props.get(_PT_FW2, 0)
        out["firmware_version"] = f"{fw1 >> 16}.{fw1 & 0xFFFF}.{fw2 >> 16}.{fw2 & 0xFFFF}"  # the common four-part form
        out["firmware_raw"] = f"0x{fw1:08x} 0x{fw2:08x}"  # TPM_PT_FIRMWARE_VERSION_1 and _2
    return out


def _device_transact(path: Path, command: bytes, timeout: float = _TPM_TIMEOUT_S) -> bytes:
    """Send one command to a TPM character device and read its response, waiting at most ``timeout`` seconds."""
    fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        os.write(fd, command)
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        if not poller.poll(int(timeout * 1000)):
            raise TimeoutError(f"no TPM response within {timeout:g} s")
        return os.read(fd, 4096)
    finally:
        os.close(fd)


def query_tpm(transact: Callable[[bytes], bytes]) -> dict[str, Any]:
    """Manufacturer, vendor string, firmware version and spec revision from a TPM 2.0 (``transact`` sends one
    command, returns the response)."""
    return _tpm_details(parse_tpm_properties(transact(_GETCAP_FIXED)))


def _tpm(root: _Root) -> Finding:
    ev: list[Evidence] = []
    dev = _dev_listable(root, ev)
    nodes = {n: root.node(f"/dev/{n}") for n in ("tpm0", "tpmrm0")}
    for n, (_exists, why) in nodes.items():
        ev.append(Evidence(f"/dev/{n}", why))
    chips, why = root.listdir("/sys/class/tpm")
    ev.append(Evidence("/sys/class/tpm", ", ".join(chips) if chips else ("empty" if chips == [] else why)))
    version: str | None = None
    detail: dict[str, Any] = {"devices": [f"/dev/{n}" for n, (e, _) in nodes.items() if e]}
    if chips and "tpm0" in chips:
        major = root.read("/sys/class/tpm/tpm0/tpm_version_major")  # kernel 5.6+: "1" or "2"
        if not major.missing:
            ev.append(Evidence("/sys/class/tpm/tpm0/tpm_version_major", _observed(major)))
            version = {"2": "2.0", "1": "1.2"}.get(_first_line(major) or "")
        for caps_path in ("/sys/class/tpm/tpm0/caps", "/sys/class/tpm/tpm0/device/caps"):  # TPM 1.2 only
            caps = root.read(caps_path)
            text = caps.text()
            if caps.missing:
                continue
            ev.append(Evidence(caps_path, "read" if text is not None else caps.why))
            version = version or "1.2"
            for key, pattern in (("manufacturer", r"Manufacturer:\s*(0x[0-9a-fA-F]+)"),
                                 ("firmware_version", r"Firmware version:\s*([0-9.]+)")):
                m = re.search(pattern, text or "")
                if m:
                    detail[key] = m.group(1)
            if "manufacturer" in detail:
                detail["manufacturer_name"] = _VENDORS.get(_ascii4(int(detail["manufacturer"], 16)))
            break
        desc = root.read("/sys/class/tpm/tpm0/device/description")  # the ACPI/PnP description, where there is one
        if not desc.missing:
            ev.append(Evidence("/sys/class/tpm/tpm0/device/description", _observed(desc)))
            detail["description"] = _first_line(desc)
    if version is None and nodes["tpmrm0"][0]:
        version = "2.0"  # the kernel's resource manager exists for TPM 2.0 only
    for n in ("tpmrm0", "tpm0"):
        if not nodes[n][0] or version == "1.2":
            continue
        source = f"/dev/{n} TPM2_GetCapability"
        number = root.char_device(f"/dev/{n}")
        if number is None:
            ev.append(Evidence(source, "not queried: not a character device"))
            continue
        # write only to a node the kernel's sysfs names as this TPM (a copied tree's link could point anywhere)
        sysdev = f"/sys/class/{n.rstrip('0123456789')}/{n}/dev"
        claimed = _first_line(root.read(sysdev))
        if claimed != number:
            ev.append(Evidence(source, f"not queried: device {number} is not the {claimed or 'missing'} that "
                                       f"{sysdev} names"))
            continue
        try:
            found = query_tpm(functools.partial(_device_transact, root.path(f"/dev/{n}")))
        except (OSError, ValueError) as exc:
            reason = _oserror(exc) if isinstance(exc, OSError) and not isinstance(exc, TimeoutError) else str(exc)
            ev.append(Evidence(source, f"failed: {reason}"))
            continue
        ev.append(Evidence(source, "TPM_PT_FIXED properties read"))
        detail.update(found)
        version = "2.0" if found.get("family") == "2.0" else version
        break
    detail.setdefault("manufacturer", None)
    detail.setdefault("firmware_version", None)
    detail["version"] = version
    if detail["devices"] or chips:
        what = f"TPM {version}" if version else "a TPM of unknown version"
        tail = "" if version != "1.2" else " (EdgeShield's sealing and attestation need TPM 2.0)"
        return _finding("present", f"{what}: " + ", ".join(detail["devices"] or ["/sys/class/tpm/tpm0"]) + tail,
                        ev, **detail)
    sysfs_known = chips is not None or (why == "missing" and root.path("/sys/class").is_dir())
    if dev is None or not sysfs_known or any(e is None for e, _ in nodes.values()):
        return _finding("unknown", "no TPM found, but /dev or /sys/class/tpm could not be read", ev, **detail)
    return _finding("absent", "no /dev/tpm0, /dev/tpmrm0 or /sys/class/tpm entry", ev, **detail)


# --- Secure Boot --------------------------------------------------------------------------------------------------
def _efi_variable(root: _Root, name: str, ev: list[Evidence]) -> tuple[int | None, str]:
    """The one-byte value of an EFI global variable (efivarfs: 4-byte attributes, then the value; the legacy
    /sys/firmware/efi/vars interface: a ``data`` file with the value alone). None with the reason if unusable."""
    path = f"/sys/firmware/efi/efivars/{name}-{_EFI_GLOBAL}"
    r = root.read(path)
    header = 4
    if r.missing:
        legacy = f"/sys/firmware/efi/vars/{name}-{_EFI_GLOBAL}/data"
        lr = root.read(legacy)
        if lr.missing:
            ev.append(Evidence(path, "missing"))
            return None, "missing"
        path, r, header = legacy, lr, 0
    if r.data is None:
        ev.append(Evidence(path, r.why))
        return None, f"{path} {r.why}"
    if len(r.data) != header + 1:
        ev.append(Evidence(path, f"{len(r.data)} bytes, expected {header + 1}"
                                 + (" (4-byte attributes, then the value)" if header else "")))
        return None, f"{path} is malformed ({len(r.data)} bytes)"
    value = r.data[header]
    attrs = f"attributes 0x{int.from_bytes(r.data[:4], 'little'):08x}, " if header else ""
    ev.append(Evidence(path, f"{attrs}value {value}"))
    if value not in (0, 1):
        return None, f"{path} holds {value}, neither 0 nor 1"
    return value, "read"


def _secure_boot(root: _Root) -> Finding:
    ev: list[Evidence] = []
    firmware, why = root.listdir("/sys/firmware")
    if firmware is None or not firmware:
        ev.append(Evidence("/sys/firmware", why if firmware is None else "empty"))
        return _finding("unknown", "/sys/firmware is missing or empty (sysfs not mounted, or masked as in a "
                        "container)", ev, state=None)
    if "efi" not in firmware:
        ev.append(Evidence("/sys/firmware/efi", "missing"))
        return _finding("absent", "not booted through UEFI: no /sys/firmware/efi", ev, state="not_uefi")
    variables, why = root.listdir("/sys/firmware/efi/efivars")
    legacy, _ = root.listdir("/sys/firmware/efi/vars")
    if not variables and not legacy:
        ev.append(Evidence("/sys/firmware/efi/efivars", why if variables is None else "empty (efivarfs not mounted)"))
        return _finding("unknown", "UEFI boot, but no EFI variables are readable", ev, state=None)
    secure, why_sb = _efi_variable(root, "SecureBoot", ev)
    setup, why_setup = _efi_variable(root, "SetupMode", ev)
    if why_sb == "missing":
        return _finding("absent", "UEFI firmware without a SecureBoot variable: it does not support Secure Boot",
                        ev, state="unsupported")
    if secure is None:
        return _finding("unknown", f"SecureBoot variable unusable: {why_sb}", ev, state=None)
    if secure == 1:
        if setup == 1:
            return _finding("unknown", "inconsistent: SecureBoot=1 while SetupMode=1", ev, state=None)
        return _finding("present", "Secure Boot is enabled (SecureBoot=1)", ev, state="enabled")
    if setup == 1:
        return _finding("absent", "Secure Boot is off and the firmware is in setup mode (no platform key enrolled)",
                        ev, state="setup_mode")
    if setup is None and why_setup != "missing":
        return _finding("absent", f"Secure Boot is disabled (SecureBoot=0); SetupMode unusable: {why_setup}", ev,
                        state="disabled")
    return _finding("absent", "Secure Boot is disabled (SecureBoot=0)", ev, state="disabled")


# --- IMA ----------------------------------------------------------------------------------------------------------
def _ima(root: _Root) -> Finding:
    ev: list[Evidence] = []
    sec, why = root.listdir("/sys/kernel/security")
    detail: dict[str, Any] = {"measurements": None, "violations": None, "policy_rules": None, "appraise": None}
    if not sec:
        ev.append(Evidence("/sys/kernel/security", why if sec is None else "empty (securityfs not mounted)"))
        return _finding("unknown", "securityfs is not readable at /sys/kernel/security", ev, **detail)
    lsm = root.read("/sys/kernel/security/lsm")
    if not lsm.missing:
        ev.append(Evidence("/sys/kernel/security/lsm", _observed(lsm)))
    if "ima" not in sec:
        ev.append(Evidence("/sys/kernel/security/ima", "missing"))
        return _finding("absent", "securityfs is mounted but has no ima directory: IMA is not enabled", ev, **detail)
    for key, name in (("measurements", "runtime_measurements_count"), ("violations", "violations")):
        r = root.read(f"/sys/kernel/security/ima/{name}")
        ev.append(Evidence(f"/sys/kernel/security/ima/{name}", _observed(r)))
        line = _first_line(r)
        detail[key] = int(line) if line is not None and line.isdigit() else None
    policy = root.read("/sys/kernel/security/ima/policy")  # readable only with CONFIG_IMA_READ_POLICY, as root
    text = policy.text()
    if text is None:
        ev.append(Evidence("/sys/kernel/security/ima/policy", policy.why))
    else:
        rules = [ln.split() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        detail["policy_rules"] = len(rules)
        detail["appraise"] = any(r[0] == "appraise" for r in rules)
        ev.append(Evidence("/sys/kernel/security/ima/policy", f"{len(rules)} rules"))
    count = detail["measurements"]
    if count is None:
        reason = "IMA is enabled (/sys/kernel/security/ima exists); its measurement count is not readable"
    elif count <= 1:
        reason = "IMA is enabled but has measured only the boot aggregate: no measurement policy seems active"
    else:
        reason = f"IMA is enabled with {count} measurements"
    return _finding("present", reason, ev, **detail)


# --- hardware RNG -------------------------------------------------------------------------------------------------
def _hwrng(root: _Root, cpu: _Cpu) -> Finding:
    ev = [cpu.show("rdrand", "rdseed", "rng")]  # rng: Arm's RNDR (FEAT_RNG)
    ev.append(Evidence("/dev/hwrng", root.node("/dev/hwrng")[1]))
    current = root.read("/sys/class/misc/hw_random/rng_current")
    ev.append(Evidence("/sys/class/misc/hw_random/rng_current", _observed(current)))
    available = root.read("/sys/class/misc/hw_random/rng_available")
    if not available.missing:
        ev.append(Evidence("/sys/class/misc/hw_random/rng_available", _observed(available)))
    source = _first_line(current)
    flags = cpu.has("rdrand", "rdseed", "rng")
    detail = {"source": source if source and source != "none" else None, "cpu_flags": flags,
              "available": (_first_line(available) or "").split() if available.data is not None else None}
    if detail["source"] or flags:
        parts = ([f"hw_random source {source}"] if detail["source"] else []) + ([", ".join(flags)] if flags else [])
        return _finding("present", " and ".join(parts), ev, **detail)
    cur_known = source == "none" or (current.missing and root.path("/sys/class/misc").is_dir())
    if cur_known and cpu.flags is not None:
        return _finding("absent", "no hw_random source bound and no rdrand/rdseed/rng cpu flag", ev, **detail)
    return _finding("unknown", "no hardware RNG found, but /sys/class/misc or /proc/cpuinfo could not be read",
                    ev, **detail)


# --- network exposure ---------------------------------------------------------------------------------------------
_TCP_LISTEN, _UDP_UNCONNECTED = 0x0A, 0x07
_HEX = re.compile(r"[0-9A-Fa-f]+")


@dataclass(frozen=True)
class _RawSocket:
    local: IPAddress
    local_port: int
    remote: IPAddress
    remote_port: int
    state: int
    uid: int
    inode: int


def _hex_address(text: str, v6: bool) -> tuple[IPAddress, int]:
    addr, sep, port = text.partition(":")
    if not sep or len(addr) != (32 if v6 else 8) or len(port) != 4 or not (_HEX.fullmatch(addr)
                                                                            and _HEX.fullmatch(port)):
        raise ValueError(f"bad address {text[:60]!r}")
    # the kernel prints each 32-bit word of the network-order address as a host-order integer
    raw = b"".join(int(addr[i:i + 8], 16).to_bytes(4, sys.byteorder) for i in range(0, len(addr), 8))
    ip: IPAddress = ipaddress.IPv6Address(raw) if v6 else ipaddress.IPv4Address(raw)
    return ip, int(port, 16)


def parse_proc_net_line(line: str, *, v6: bool) -> _RawSocket:
    """One socket line of /proc/net/{tcp,udp}[6]; ValueError naming what is wrong for anything else."""
    fields = line.split()
    if len(fields) < 10:
        raise ValueError(f"{len(fields)} fields, expected at least 10")
    if not re.fullmatch(r"[0-9]+:", fields[0]):
        raise ValueError(f"bad slot {fields[0][:20]!r}")
    local, lport = _hex_address(fields[1], v6)
    remote, rport = _hex_address(fields[2], v6)
    if len(fields[3]) != 2 or not _HEX.fullmatch(fields[3]):
        raise ValueError(f"bad state {fields[3][:20]!r}")
    if not (fields[7].isascii() and fields[7].isdigit() and fields[9].isascii() and fields[9].isdigit()):
        raise ValueError(f"bad uid or inode {fields[7][:20]!r} {fields[9][:20]!r}")
    return _RawSocket(local, lport, remote, rport, int(fields[3], 16), int(fields[7]), int(fields[9]))


def _interfaces(root: _Root, ev: list[Evidence]) -> tuple[dict[IPAddress, str] | None, list[str] | None]:
    """Local address → interface: IPv6 from /proc/net/if_inet6, IPv4 from the LOCAL entries of /proc/net/fib_trie
    matched to the longest /proc/net/route prefix (no ``ip`` needed). None if either half is unreadable."""
    names, why = root.listdir("/sys/class/net")
    ev.append(Evidence("/sys/class/net", ", ".join(names) if names else why if names is None else "empty"))
    table: dict[IPAddress, str] = {}
    ok = True
    v6 = root.read("/proc/net/if_inet6")
    if v6.data is None:
        ev.append(Evidence("/proc/net/if_inet6", v6.why + (" (no IPv6 in this kernel)" if v6.missing else "")))
        ok = ok and v6.missing
    else:
        bad = 0
        for line in (v6.text() or "").splitlines():
            f = line.split()
            if len(f) == 6 and len(f[0]) == 32 and _HEX.fullmatch(f[0]):  # %pi6: network order, no colons
                table[ipaddress.IPv6Address(bytes.fromhex(f[0]))] = f[5]
            elif line.strip():
                bad += 1
        tail = f", {bad} malformed lines" if bad else ""
        ev.append(Evidence("/proc/net/if_inet6", f"{len(table)} addresses{tail}"))
        ok = ok and not bad
    trie, route = root.read("/proc/net/fib_trie"), root.read("/proc/net/route")
    if trie.data is None or route.data is None:
        ev.append(Evidence("/proc/net/fib_trie" if trie.data is None else "/proc/net/route",
                           (trie if trie.data is None else route).why))
        return None, names
    routes: list[tuple[int, int, str]] = []  # (destination, mask, interface), host-order words as the kernel prints
    for line in (route.text() or "").splitlines()[1:]:
        f = line.split()
        if len(f) >= 8 and all(len(x) == 8 and _HEX.fullmatch(x) for x in (f[1], f[7])):
            dest, mask = (int.from_bytes(int(x, 16).to_bytes(4, sys.byteorder), "big") for x in (f[1], f[7]))
            if mask:
                routes.append((dest, mask, f[0]))
    local4: list[ipaddress.IPv4Address] = []
    last: str | None = None
    for line in (trie.text() or "").splitlines():
        m = re.match(r"^\s*[|+]-- ([0-9.]+)", line)
        if m:
            last = m.group(1)
        elif last and re.match(r"^\s*/32 host LOCAL", line):
            try:
                local4.append(ipaddress.IPv4Address(last))
            except ValueError:
                ok = False
    unmatched = 0
    for addr in dict.fromkeys(local4):
        best = max(((mask, ifname) for dest, mask, ifname in routes if int(addr) & mask == dest), default=None)
        if best is not None:
            table[addr] = best[1]
        elif not addr.is_loopback:
            unmatched += 1
    tail = f", {unmatched} on no route" if unmatched else ""
    ev.append(Evidence("/proc/net/fib_trie + /proc/net/route", f"{len(set(local4))} local IPv4 addresses{tail}"))
    return (table if ok else None), names


def _owners(root: _Root, inodes: set[int], ev: list[Evidence]) -> dict[int, list[SocketOwner]]:
    """Processes whose /proc/PID/fd shows ``socket:[INODE]`` for each wanted inode."""
    found: dict[int, list[SocketOwner]] = {}
    pids, why = root.listdir("/proc")
    if pids is None:
        ev.append(Evidence("/proc/*/fd", why))
        return found
    scanned = unreadable = 0
    for pid in (p for p in pids if p.isdigit()):
        fd_dir = root.path(f"/proc/{pid}/fd")
        try:
            fds = os.listdir(fd_dir)
        except FileNotFoundError:
            continue  # exited meanwhile
        except OSError:
            unreadable += 1
            continue
        scanned += 1
        hits: set[int] = set()
        for fd in fds:
            try:
                target = os.readlink(fd_dir / fd)
            except OSError:
                continue
            m = re.fullmatch(r"socket:\[([0-9]+)\]", target)
            if m and int(m.group(1)) in inodes:
                hits.add(int(m.group(1)))
        if hits:
            name = _first_line(root.read(f"/proc/{pid}/comm"))
            for inode in hits:
                found.setdefault(inode, []).append(SocketOwner(int(pid), name))
    ev.append(Evidence("/proc/*/fd", f"{scanned} processes scanned" + (
        f", {unreadable} unreadable (their sockets show no process)" if unreadable else "")))
    return found


def _exposure(addr: IPAddress, table: Mapping[IPAddress, str] | None,
              management: frozenset[str]) -> tuple[bool | None, str, str | None]:
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if addr.is_unspecified:
        return True, "wildcard address: every interface, present and future", None
    if addr.is_loopback:
        return False, "loopback", "lo"
    iface = None if table is None else table.get(addr)
    if iface is None:
        if management and table is None:
            return None, "the address's interface could not be read (management interfaces configured)", None
        return True, "not loopback" + ("" if table is None else "; on no known interface"), None
    if iface in management:
        return False, f"on management interface {iface}", iface
    return True, f"on {iface}" + (", not a management interface" if management else ""), iface


def _listening(root: _Root, management: frozenset[str]) -> Finding:
    ev: list[Evidence] = []
    raws: list[tuple[Literal["tcp", "tcp6", "udp", "udp6"], _RawSocket]] = []
    incomplete = []
    files: tuple[Literal["tcp", "tcp6", "udp", "udp6"], ...] = ("tcp", "tcp6", "udp", "udp6")
    for proto in files:
        path = f"/proc/net/{proto}"
        r = root.read(path)
        if r.data is None:
            if r.missing and proto.endswith("6") and root.read(path[:-1]).data is not None:
                ev.append(Evidence(path, "missing (no IPv6 in this kernel): no sockets"))
                continue
            ev.append(Evidence(path, r.why))
            incomplete.append(f"{path} {r.why}")
            continue
        lines = (r.text() or "").splitlines()
        bad: list[str] = []
        kept = 0
        for number, line in enumerate(lines[1:], start=2):
            if not line.strip():
                continue
            try:
                s = parse_proc_net_line(line, v6=proto.endswith("6"))
            except ValueError as exc:
                bad.append(f"line {number}: {exc}")
                continue
            tcp = proto.startswith("tcp")
            if (tcp and s.state == _TCP_LISTEN) or (not tcp and s.state == _UDP_UNCONNECTED and s.remote_port == 0):
                raws.append((proto, s))
                kept += 1
        if not lines or not lines[0].lstrip().startswith("sl"):
            bad.insert(0, "no header line")
        what = "listening" if proto.startswith("tcp") else "bound, unconnected"
        ev.append(Evidence(path, f"{kept} {what}" + (f"; {len(bad)} malformed ({bad[0]})" if bad else "")))
        if bad:
            incomplete.append(f"{path} has {len(bad)} malformed lines")
    table, ifnames = _interfaces(root, ev)
    for name in sorted(management):
        if ifnames is not None and name not in ifnames:
            ev.append(Evidence(f"/sys/class/net/{name}", "missing: the management interface does not exist"))
    owners = _owners(root, {s.inode for _, s in raws}, ev)
    sockets = []
    for proto, s in raws:
        verdict, why, iface = _exposure(s.local, table, management)
        found = owners.get(s.inode)
        sockets.append(ListeningSocket(proto, str(s.local), s.local_port, s.inode, s.uid, verdict, why, iface,
                                       None if found is None else tuple(sorted(found, key=lambda o: o.pid))))
    sockets.sort(key=lambda x: (x.protocol, x.port, x.address))
    exposed = [s for s in sockets if s.exposed]
    detail = {"sockets": sockets, "exposed": len(exposed), "management_interfaces": sorted(management)}
    if exposed:
        shown = ", ".join(f"{s.protocol} {s.address}:{s.port}" for s in exposed[:3])
        more = f" and {len(exposed) - 3} more" if len(exposed) > 3 else ""
        return _finding("present", f"{len(exposed)} socket(s) exposed beyond loopback and the management "
                        f"interfaces: {shown}{more}", ev, **detail)
    undecided = [s for s in sockets if s.exposed is None]
    if incomplete or undecided:
        parts = incomplete + ([f"{len(undecided)} socket(s) on an interface that could not be determined"]
                              if undecided else [])
        return _finding("unknown", "no exposed socket found, but " + "; ".join(parts), ev, **detail)
    return _finding("absent", f"{len(sockets)} socket(s), all on loopback or a management interface", ev, **detail)


# --- entry point --------------------------------------------------------------------------------------------------
def probe(root: str | os.PathLike[str] = "/", management_interfaces: Iterable[str] = ()) -> ProbeReport:
    """Probe the system under ``root``; sockets on ``management_interfaces`` (names like ``eth1``) do not count as
    exposed. Never raises for what it finds: unreadable or malformed evidence makes a feature ``unknown``."""
    base = Path(root)
    if not base.exists():
        raise PathNotFoundError(f"probe root not found: {base}")
    if not base.is_dir():
        raise InvalidArgumentError(f"probe root is not a directory: {base}")
    names = tuple(management_interfaces)
    for name in names:
        if not _IFNAME.fullmatch(name):
            raise InvalidArgumentError(f"not an interface name: {name!r}")
    r = _Root(base)
    cpu = _cpu(r)
    return ProbeReport(root=str(base), sgx=_sgx(r, cpu), tdx=_tdx(r, cpu), sev=_sev(r, cpu), trustzone=_trustzone(r),
                       tpm=_tpm(r), secure_boot=_secure_boot(r), ima=_ima(r), hwrng=_hwrng(r, cpu),
                       listening=_listening(r, frozenset(names)))
