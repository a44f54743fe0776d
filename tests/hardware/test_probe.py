"""The hardware probe against fake sysfs/procfs/dev trees (every status of every feature, malformed and unreadable
evidence), a real software TPM answering GetCapability, and once against this machine."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from edgeshield.cli import app
from edgeshield.errors import InvalidArgumentError, PathNotFoundError
from edgeshield.hardware._probe import (
    FEATURES,
    parse_proc_net_line,
    parse_tpm_properties,
    probe,
    query_tpm,
)

EFI = "8be4df61-93ca-11d2-aa0d-00e098032b8c"
TCP_HEADER = ("  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n")
TCP6_HEADER = ("  sl  local_address                         remote_address                        st tx_queue "
               "rx_queue tr tm->when retrnsmt   uid  timeout inode\n")
ANY4 = "0.0.0.0"  # noqa: S104 - the wildcard address the probe must report
BASE_FLAGS = "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr sse sse2 ht syscall nx lm"


# --- building fake trees ------------------------------------------------------------------------------------------
def hex_address(ip: str, port: int) -> str:
    """How the kernel prints an address in /proc/net/{tcp,udp}[6]: each network-order 32-bit word as a host int."""
    packed = ipaddress.ip_address(ip).packed
    words = "".join(f"{int.from_bytes(packed[i:i + 4], sys.byteorder):08X}" for i in range(0, len(packed), 4))
    return f"{words}:{port:04X}"


def net_line(slot: int, local: tuple[str, int], remote: tuple[str, int], state: int, uid: int, inode: int) -> str:
    return (f"{slot:4d}: {hex_address(*local)} {hex_address(*remote)} {state:02X} 00000000:00000000 00:00000000 "
            f"00000000 {uid:5d}        0 {inode} 1 0000000000000000 100 0 0 10 0\n")


class Tree:
    """A fake root: a small Linux machine without any security hardware, to which each test adds evidence."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.file("/proc/cpuinfo", f"processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: {BASE_FLAGS}\n\n"
                                   f"processor\t: 1\nflags\t\t: {BASE_FLAGS}\n")
        for d in ("/dev", "/sys/class/net/lo", "/sys/class/net/eth0", "/sys/class/net/eth1", "/sys/class/misc",
                  "/sys/firmware/acpi", "/sys/module", "/proc/1/fd"):
            self.dir(d)
        self.file("/dev/null", "")
        self.file("/sys/kernel/security/lsm", "capability,landlock,yama,apparmor\n")
        self.file("/proc/net/tcp", TCP_HEADER)
        self.file("/proc/net/tcp6", TCP6_HEADER)
        self.file("/proc/net/udp", TCP_HEADER)
        self.file("/proc/net/udp6", TCP6_HEADER)
        self.file("/proc/net/if_inet6", "00000000000000000000000000000001 01 80 10 80       lo\n"
                                        "fe800000000000000000000000000010 03 40 20 80     eth1\n")
        self.file("/proc/net/route", "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\t"
                  "Window\tIRTT\n"
                  f"eth0\t00000000\t{self.h4('10.0.0.1')}\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"
                  f"eth0\t{self.h4('10.0.0.0')}\t00000000\t0001\t0\t0\t0\t{self.h4('255.255.255.0')}\t0\t0\t0\n"
                  f"eth1\t{self.h4('192.168.10.0')}\t00000000\t0001\t0\t0\t0\t{self.h4('255.255.255.0')}\t0\t0\t0\n")
        self.file("/proc/net/fib_trie", "Main:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 0.0.0.0\n        /0 universe UNICAST\n"
                  "     +-- 10.0.0.0/24 2 0 2\n        |-- 10.0.0.7\n           /32 host LOCAL\n"
                  "     +-- 127.0.0.0/8 2 0 2\n        |-- 127.0.0.1\n           /32 host LOCAL\n"
                  "     +-- 192.168.10.0/24 2 0 2\n        |-- 192.168.10.5\n           /32 host LOCAL\n"
                  "        |-- 192.168.10.255\n           /32 link BROADCAST\n")
        self.file("/proc/1/comm", "init\n")

    @staticmethod
    def h4(ip: str) -> str:
        return f"{int.from_bytes(ipaddress.IPv4Address(ip).packed, sys.byteorder):08X}"

    def path(self, inner: str) -> Path:
        return self.root / inner.lstrip("/")

    def file(self, inner: str, content: str | bytes) -> Path:
        p = self.path(inner)
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.is_symlink():
            p.unlink()
        elif p.is_dir():
            p.rmdir()
        p.write_bytes(content.encode() if isinstance(content, str) else content)
        return p

    def dir(self, inner: str) -> None:
        self.path(inner).mkdir(parents=True, exist_ok=True)

    def node(self, inner: str) -> None:
        self.file(inner, "")  # a stand-in for a device node: tests cannot mknod

    def unreadable(self, inner: str) -> None:
        """Make ``inner`` unreadable even for root (tests may run as root, so no chmod): a symlink loop."""
        p = self.path(inner)
        if p.is_dir():
            import shutil

            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
        p.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(p.name, p)  # ELOOP on open and stat

    def flags(self, *extra: str) -> None:
        line = " ".join((BASE_FLAGS, *extra))
        self.file("/proc/cpuinfo", f"processor\t: 0\nflags\t\t: {line}\n\nprocessor\t: 1\nflags\t\t: {line}\n")

    def efivar(self, name: str, value: bytes, attrs: int = 0x6) -> None:
        self.file(f"/sys/firmware/efi/efivars/{name}-{EFI}", struct.pack("<I", attrs) + value)

    def listen(self, proto: str, ip: str, port: int, inode: int, *, state: int | None = None,
               remote: tuple[str, int] | None = None, pid: int | None = None) -> None:
        v6 = proto.endswith("6")
        state = state if state is not None else (0x0A if proto.startswith("tcp") else 0x07)
        remote = remote or (("::" if v6 else ANY4), 0)
        p = self.path(f"/proc/net/{proto}")
        lines = p.read_text().splitlines(keepends=True)
        p.write_text("".join(lines) + net_line(len(lines) - 1, (ip, port), remote, state, 1000, inode))
        if pid is not None:
            fd_dir = self.path(f"/proc/{pid}/fd")
            fd_dir.mkdir(parents=True, exist_ok=True)
            os.symlink(f"socket:[{inode}]", fd_dir / str(len(os.listdir(fd_dir)) + 3))  # dangling, like procfs
            self.file(f"/proc/{pid}/comm", f"server-{pid}\n")


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    return Tree(tmp_path / "root")


def finding(tree: Tree, name: str, **kw: Any) -> dict[str, Any]:
    report = probe(tree.root, **kw)
    d = report.to_dict()
    assert set(d) == set(FEATURES)
    out: dict[str, Any] = d[name]
    assert out["status"] in ("present", "absent", "unknown")
    assert out["evidence"] and all(set(e) == {"source", "observed"} for e in out["evidence"])
    return out


def sources(f: dict[str, Any]) -> dict[str, str]:
    return {e["source"]: e["observed"] for e in f["evidence"]}


def test_the_bare_tree_has_nothing(tree: Tree) -> None:
    d = probe(tree.root).to_dict()
    assert {k: v["status"] for k, v in d.items()} == {
        "sgx": "absent", "tdx": "absent", "sev": "absent", "trustzone": "absent", "tpm": "absent",
        "secure_boot": "absent", "ima": "absent", "hwrng": "absent", "listening": "absent"}
    assert d["secure_boot"]["state"] == "not_uefi"
    json.dumps(d)  # JSON all the way down


# --- SGX, TDX, SEV, OP-TEE ----------------------------------------------------------------------------------------
def test_sgx(tree: Tree) -> None:
    tree.flags("sgx")
    f = finding(tree, "sgx")
    assert f["status"] == "unknown" and "no enclave device" in f["reason"]  # the CPU alone proves no usable SGX
    tree.flags("sgx", "sgx_lc")
    tree.node("/dev/sgx_enclave")
    tree.node("/dev/sgx_provision")
    f = finding(tree, "sgx")
    assert f["status"] == "present"
    assert f["enclave_devices"] == ["/dev/sgx_enclave"] and f["flexible_launch_control"] is True
    assert f["provisioning_device"] is True
    assert "sgx, sgx_lc set" in sources(f)["/proc/cpuinfo flags"]
    assert "regular file" in sources(f)["/dev/sgx_enclave"]  # says what the node really is


def test_sgx_unknown_when_cpuinfo_is_unreadable_or_flagless(tree: Tree) -> None:
    tree.unreadable("/proc/cpuinfo")
    f = finding(tree, "sgx")
    assert f["status"] == "unknown" and f["flexible_launch_control"] is None
    assert "unreadable" in sources(f)["/proc/cpuinfo"]
    tree.file("/proc/cpuinfo", "processor : 0\nmodel name : something\n")
    f = finding(tree, "sgx")
    assert f["status"] == "unknown" and sources(f)["/proc/cpuinfo"] == "no flags or Features line"


def test_tdx(tree: Tree) -> None:
    tree.flags("tdx_guest")
    f = finding(tree, "tdx")
    assert f["status"] == "present" and f["cpu_flag"] is True and f["guest_device"] is False
    tree.node("/dev/tdx_guest")
    assert finding(tree, "tdx")["guest_device"] is True
    tree.flags()
    tree.path("/dev/tdx_guest").unlink()
    tree.unreadable("/proc/cpuinfo")
    assert finding(tree, "tdx")["status"] == "unknown"


def test_sev_guest_and_host(tree: Tree) -> None:
    tree.node("/dev/sev-guest")
    f = finding(tree, "sev")
    assert (f["status"], f["role"], f["snp"]) == ("present", "guest", True)
    tree.path("/dev/sev-guest").unlink()
    tree.flags("sev", "sev_es", "sev_snp")
    f = finding(tree, "sev")
    assert f["status"] == "unknown" and f["cpu_flags"] == ["sev", "sev_es", "sev_snp"]  # capability, not use
    tree.file("/sys/module/kvm_amd/parameters/sev", "Y\n")
    tree.file("/sys/module/kvm_amd/parameters/sev_es", "1\n")
    tree.file("/sys/module/kvm_amd/parameters/sev_snp", "N\n")
    f = finding(tree, "sev")
    assert (f["status"], f["role"], f["snp"]) == ("present", "host", False)
    assert f["kvm_amd"] == {"sev": True, "sev_es": True, "sev_snp": False}
    for p in ("sev", "sev_es", "sev_snp"):
        tree.file(f"/sys/module/kvm_amd/parameters/{p}", "N\n")
    f = finding(tree, "sev")
    assert f["status"] == "absent" and "disabled" in f["reason"]
    tree.file("/sys/module/kvm_amd/parameters/sev", "maybe\n")  # malformed: not counted either way
    tree.unreadable("/sys/module/kvm_amd/parameters/sev_es")
    f = finding(tree, "sev")
    assert f["kvm_amd"]["sev"] is None and f["kvm_amd"]["sev_es"] is None and f["status"] == "unknown"
    assert "unreadable" in sources(f)["/sys/module/kvm_amd/parameters/sev_es"]
    tree.node("/dev/sev")
    assert finding(tree, "sev")["role"] == "host"


def test_trustzone(tree: Tree) -> None:
    tree.file("/sys/firmware/devicetree/base/firmware/optee/compatible", b"linaro,optee-tz\x00")
    f = finding(tree, "trustzone")
    assert f["status"] == "unknown" and f["devicetree_optee"] is True
    tree.node("/dev/tee0")
    tree.node("/dev/teepriv0")
    tree.dir("/sys/bus/platform/drivers/optee")
    tree.dir("/sys/class/tee/tee0/device")
    os.symlink("../../../../bus/platform/drivers/optee", tree.path("/sys/class/tee/tee0/device/driver"))
    f = finding(tree, "trustzone")
    assert f["status"] == "present" and f["devices"] == ["/dev/tee0", "/dev/teepriv0"]
    assert f["implementation"] == {"tee0": "optee"}
    assert sources(f)["/sys/firmware/devicetree/base/firmware/optee/compatible"] == "'linaro,optee-tz'"


def test_an_unlistable_dev_makes_device_features_unknown(tree: Tree) -> None:
    import shutil

    shutil.rmtree(tree.path("/dev"))
    tree.file("/dev", "not a directory")
    report = probe(tree.root)
    for name in ("sgx", "tdx", "sev", "trustzone", "tpm"):
        assert getattr(report, name).status == "unknown", name


# --- TPM ----------------------------------------------------------------------------------------------------------
def test_tpm2_from_sysfs_and_nodes(tree: Tree) -> None:
    tree.node("/dev/tpm0")
    tree.node("/dev/tpmrm0")
    tree.file("/sys/class/tpm/tpm0/tpm_version_major", "2\n")
    tree.file("/sys/class/tpm/tpm0/device/description", "TPM 2.0 Device\n")
    f = finding(tree, "tpm")
    assert f["status"] == "present" and f["version"] == "2.0"
    assert f["devices"] == ["/dev/tpm0", "/dev/tpmrm0"] and f["description"] == "TPM 2.0 Device"
    assert f["manufacturer"] is None and f["firmware_version"] is None  # not in a TPM 2.0's sysfs; not queried here
    assert sources(f)["/dev/tpmrm0 TPM2_GetCapability"] == "not queried: not a character device"


def test_tpm2_by_resource_manager_alone(tree: Tree) -> None:
    tree.node("/dev/tpmrm0")
    f = finding(tree, "tpm")
    assert f["status"] == "present" and f["version"] == "2.0"


def test_tpm12_caps(tree: Tree) -> None:
    tree.node("/dev/tpm0")
    tree.file("/sys/class/tpm/tpm0/device/caps", "Manufacturer: 0x49465800\nTCG version: 1.2\n"
                                                 "Firmware version: 6.40\n")
    f = finding(tree, "tpm")
    assert (f["status"], f["version"], f["manufacturer"], f["manufacturer_name"], f["firmware_version"]) == (
        "present", "1.2", "0x49465800", "Infineon", "6.40")
    assert "need TPM 2.0" in f["reason"]


def test_tpm_unknown_and_unreadable_sysfs(tree: Tree) -> None:
    tree.dir("/sys/class/tpm/tpm0")
    tree.unreadable("/sys/class/tpm/tpm0/tpm_version_major")
    f = finding(tree, "tpm")
    assert f["status"] == "present" and f["version"] is None  # a TPM is there; its version is not shown
    assert "unreadable" in sources(f)["/sys/class/tpm/tpm0/tpm_version_major"]
    tree.unreadable("/sys/class/tpm")
    f = finding(tree, "tpm")
    assert f["status"] == "unknown" and "unreadable" in sources(f)["/sys/class/tpm"]


def test_tpm_query_writes_only_to_the_node_sysfs_names(tree: Tree) -> None:
    """A character device that is not a TPM: /dev/null stands in, and is queried only when sysfs names its number."""
    null = os.stat("/dev/null").st_rdev
    number = f"{os.major(null)}:{os.minor(null)}"
    tree.dir("/dev")
    os.symlink("/dev/null", tree.path("/dev/tpmrm0"))
    f = finding(tree, "tpm")
    assert f["status"] == "present" and f["manufacturer"] is None
    assert f"not queried: device {number} is not the missing" in sources(f)["/dev/tpmrm0 TPM2_GetCapability"]
    tree.file("/sys/class/tpmrm/tpmrm0/dev", f"{number}\n")
    f = finding(tree, "tpm")  # written, polled, read: an empty answer is not a TPM's
    assert sources(f)["/dev/tpmrm0 TPM2_GetCapability"] == (
        "failed: TPM response of 0 bytes, shorter than its 10-byte header")
    assert (f["status"], f["version"], f["manufacturer"]) == ("present", "2.0", None)


def _tcp_transact(port: int):  # type: ignore[no-untyped-def]
    def transact(command: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(command)
            head = b""
            while len(head) < 10:
                chunk = s.recv(10 - len(head))
                assert chunk
                head += chunk
            size = struct.unpack(">I", head[2:6])[0]
            body = b""
            while len(body) < size - 10:
                chunk = s.recv(size - 10 - len(body))
                assert chunk
                body += chunk
            return head + body

    return transact


def test_get_capability_against_a_real_software_tpm(swtpm) -> None:  # type: ignore[no-untyped-def]
    """The same bytes the probe writes to /dev/tpmrm0, answered by swtpm (manufacturer 'IBM', TPM 2.0)."""
    found = query_tpm(_tcp_transact(swtpm.port))
    assert found["family"] == "2.0"
    assert found["manufacturer"] == "IBM" and found["manufacturer_name"] == "IBM"
    assert found["firmware_version"].count(".") == 3 and found["spec_revision"].startswith("1.")
    assert found["vendor_string"]  # swtpm's "SW   TPM"


def _response(props: list[tuple[int, int]], *, rc: int = 0, cap: int = 6, count: int | None = None) -> bytes:
    body = b"\x00" + struct.pack(">II", cap, len(props) if count is None else count)
    body += b"".join(struct.pack(">II", k, v) for k, v in props)
    return struct.pack(">HII", 0x8001, 10 + len(body), rc) + body


def test_tpm_response_parser_refuses_malformed_answers() -> None:
    good = _response([(0x105, int.from_bytes(b"IFX\x00", "big")), (0x10B, 0x0007003F), (0x10C, 0x00041234)])
    assert parse_tpm_properties(good)[0x105] == int.from_bytes(b"IFX\x00", "big")
    assert query_tpm(lambda _cmd: good)["firmware_version"] == "7.63.4.4660"
    assert query_tpm(lambda _cmd: good)["firmware_raw"] == "0x0007003f 0x00041234"
    for bad, why in ((good[:7], "shorter"), (good[:-3], "declares"), (_response([], rc=0x101), "0x00000101"),
                     (_response([], cap=5), "capability"), (_response([(1, 2)], count=9), "lists 9")):
        with pytest.raises(ValueError, match=why):
            parse_tpm_properties(bad)


@given(st.binary(max_size=64))
def test_tpm_response_parser_never_fails_otherwise(data: bytes) -> None:
    with contextlib.suppress(ValueError):
        parse_tpm_properties(data)


# --- Secure Boot --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("secure", "setup", "status", "state"), [
    (1, 0, "present", "enabled"), (0, 0, "absent", "disabled"), (0, 1, "absent", "setup_mode"),
    (1, 1, "unknown", None), (1, None, "present", "enabled"),
])
def test_secure_boot_states(tree: Tree, secure: int, setup: int | None, status: str, state: str | None) -> None:
    tree.efivar("SecureBoot", bytes([secure]))
    if setup is not None:
        tree.efivar("SetupMode", bytes([setup]))
    f = finding(tree, "secure_boot")
    assert (f["status"], f["state"]) == (status, state)
    assert f"attributes 0x00000006, value {secure}" in sources(f)[f"/sys/firmware/efi/efivars/SecureBoot-{EFI}"]


def test_secure_boot_unsupported_not_uefi_and_legacy_vars(tree: Tree) -> None:
    f = finding(tree, "secure_boot")
    assert (f["status"], f["state"]) == ("absent", "not_uefi")
    tree.efivar("BootOrder", b"\x00\x00")
    f = finding(tree, "secure_boot")
    assert (f["status"], f["state"]) == ("absent", "unsupported")
    tree.path(f"/sys/firmware/efi/efivars/BootOrder-{EFI}").unlink()
    tree.file(f"/sys/firmware/efi/vars/SecureBoot-{EFI}/data", b"\x01")  # the pre-efivarfs interface: no header
    assert finding(tree, "secure_boot")["state"] == "enabled"


@pytest.mark.parametrize(("content", "needle"), [
    (b"\x06\x00\x00", "3 bytes, expected 5"),  # truncated inside the attribute header
    (b"\x06\x00\x00\x00", "4 bytes, expected 5"),  # attributes without the value
    (b"\x06\x00\x00\x00\x01\x00", "6 bytes, expected 5"),
    (b"\x06\x00\x00\x00\x02", "value 2"),
    (None, "unreadable"),
])
def test_secure_boot_malformed_variable_is_unknown(tree: Tree, content: bytes | None, needle: str) -> None:
    path = f"/sys/firmware/efi/efivars/SecureBoot-{EFI}"
    if content is None:
        tree.dir("/sys/firmware/efi/efivars")
        tree.unreadable(path)
    else:
        tree.file(path, content)
    f = finding(tree, "secure_boot")
    assert (f["status"], f["state"]) == ("unknown", None)
    assert needle in sources(f)[path]


def test_secure_boot_unknown_without_variables_or_firmware_dir(tree: Tree) -> None:
    tree.dir("/sys/firmware/efi/efivars")
    f = finding(tree, "secure_boot")
    assert f["status"] == "unknown" and "efivarfs not mounted" in sources(f)["/sys/firmware/efi/efivars"]
    import shutil

    shutil.rmtree(tree.path("/sys/firmware"))
    tree.dir("/sys/firmware")  # what a container's masked /sys/firmware looks like
    f = finding(tree, "secure_boot")
    assert f["status"] == "unknown" and "masked" in f["reason"]


# --- IMA, hwrng ---------------------------------------------------------------------------------------------------
def test_ima(tree: Tree) -> None:
    ima = "/sys/kernel/security/ima"
    tree.file(f"{ima}/runtime_measurements_count", "1\n")
    tree.file(f"{ima}/violations", "0\n")
    f = finding(tree, "ima")
    assert f["status"] == "present" and f["measurements"] == 1 and "only the boot aggregate" in f["reason"]
    assert f["policy_rules"] is None and "missing" in sources(f)[f"{ima}/policy"]
    tree.file(f"{ima}/runtime_measurements_count", "1234\n")
    tree.file(f"{ima}/policy", "# comment\nmeasure func=BPRM_CHECK\nappraise func=MODULE_CHECK appraise_type=imasig\n")
    f = finding(tree, "ima")
    assert (f["measurements"], f["violations"], f["policy_rules"], f["appraise"]) == (1234, 0, 2, True)
    tree.file(f"{ima}/runtime_measurements_count", "garbage\n")
    tree.unreadable(f"{ima}/violations")
    f = finding(tree, "ima")
    assert f["status"] == "present" and f["measurements"] is None and f["violations"] is None


def test_ima_absent_and_unknown(tree: Tree) -> None:
    f = finding(tree, "ima")
    assert f["status"] == "absent" and "capability,landlock" in sources(f)["/sys/kernel/security/lsm"]
    tree.path("/sys/kernel/security/lsm").unlink()
    f = finding(tree, "ima")
    assert f["status"] == "unknown" and "securityfs not mounted" in sources(f)["/sys/kernel/security"]


def test_hwrng(tree: Tree) -> None:
    tree.node("/dev/hwrng")
    tree.file("/sys/class/misc/hw_random/rng_current", "none\n")
    f = finding(tree, "hwrng")
    assert f["status"] == "absent" and f["source"] is None  # the node exists whenever the core is built in
    tree.file("/sys/class/misc/hw_random/rng_current", "tpm-rng-0\n")
    tree.file("/sys/class/misc/hw_random/rng_available", "tpm-rng-0 none\n")
    f = finding(tree, "hwrng")
    assert (f["status"], f["source"], f["available"]) == ("present", "tpm-rng-0", ["tpm-rng-0", "none"])
    tree.file("/sys/class/misc/hw_random/rng_current", "none\n")
    tree.flags("rdrand", "rdseed")
    f = finding(tree, "hwrng")
    assert f["status"] == "present" and f["cpu_flags"] == ["rdrand", "rdseed"]
    tree.file("/proc/cpuinfo", "processor\t: 0\nFeatures\t: fp asimd aes rng\n")  # arm64: RNDR
    assert finding(tree, "hwrng")["cpu_flags"] == ["rng"]
    tree.unreadable("/proc/cpuinfo")
    assert finding(tree, "hwrng")["status"] == "unknown"


# --- listening sockets --------------------------------------------------------------------------------------------
def by_port(f: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {s["port"]: s for s in f["sockets"]}


def test_listening_exposure(tree: Tree) -> None:
    tree.listen("tcp", "127.0.0.1", 8080, 101)
    tree.listen("tcp", "10.0.0.7", 5000, 99, state=0x01, remote=("10.0.0.9", 40000))  # established: not listening
    tree.listen("tcp6", "::ffff:127.0.0.1", 8081, 102)
    tree.listen("udp", "127.0.0.53", 53, 103)
    tree.listen("udp", "10.0.0.7", 41000, 104, state=0x01, remote=("10.0.0.1", 53))  # a connected UDP client
    f = finding(tree, "listening")
    assert f["status"] == "absent" and set(by_port(f)) == {8080, 8081, 53}
    assert all(s["why"] == "loopback" and s["exposed"] is False for s in f["sockets"])

    tree.listen("tcp", ANY4, 8443, 201, pid=4242)
    tree.listen("tcp", "192.168.10.5", 22, 202, pid=1)
    tree.listen("tcp6", "fe80::10", 9100, 203)
    tree.listen("udp6", "::", 5353, 204)
    f = finding(tree, "listening")
    ports = by_port(f)
    assert f["status"] == "present" and f["exposed"] == 4
    assert ports[8443]["exposed"] is True and "wildcard" in ports[8443]["why"]
    assert ports[8443]["processes"] == [{"pid": 4242, "name": "server-4242"}] and ports[8080]["processes"] is None
    assert (ports[22]["interface"], ports[22]["why"]) == ("eth1", "on eth1")
    assert ports[9100]["interface"] == "eth1" and ports[5353]["protocol"] == "udp6"

    f = finding(tree, "listening", management_interfaces=("eth1",))  # the management network: not exposure
    ports = by_port(f)
    assert ports[22]["exposed"] is False and ports[22]["why"] == "on management interface eth1"
    assert ports[9100]["exposed"] is False
    assert ports[8443]["exposed"] is True  # a wildcard socket is on every interface, management or not
    assert f["status"] == "present" and f["exposed"] == 2 and f["management_interfaces"] == ["eth1"]


def test_only_management_sockets_are_absent(tree: Tree) -> None:
    tree.listen("tcp", "192.168.10.5", 22, 202)
    tree.listen("tcp", "10.0.0.7", 8443, 203)
    assert finding(tree, "listening")["status"] == "present"
    assert finding(tree, "listening", management_interfaces=["eth1"])["status"] == "present"
    assert by_port(finding(tree, "listening", management_interfaces=["eth1"]))[8443]["why"] == (
        "on eth0, not a management interface")
    assert finding(tree, "listening", management_interfaces=["eth0", "eth1"])["status"] == "absent"
    f = finding(tree, "listening", management_interfaces=["eth0", "eth1", "wlan7"])
    assert "missing" in sources(f)["/sys/class/net/wlan7"]


def test_an_address_on_no_interface_is_exposed_and_an_unreadable_map_is_unknown(tree: Tree) -> None:
    tree.listen("tcp", "203.0.113.9", 80, 301)  # IP_FREEBIND or an address the tables do not show
    f = finding(tree, "listening", management_interfaces=["eth1"])
    assert by_port(f)[80]["exposed"] is True and "no known interface" in by_port(f)[80]["why"]
    tree.unreadable("/proc/net/fib_trie")
    f = finding(tree, "listening", management_interfaces=["eth1"])
    assert by_port(f)[80]["exposed"] is None and f["status"] == "unknown"
    assert "unreadable" in sources(f)["/proc/net/fib_trie"]
    assert finding(tree, "listening")["status"] == "present"  # with no management interface, not loopback suffices


def test_garbage_lines_and_unreadable_files(tree: Tree) -> None:
    tree.listen("tcp", "127.0.0.1", 8080, 101)
    p = tree.path("/proc/net/tcp")
    p.write_text(p.read_text() + "   7: ZZZZZZZZ:0050 00000000:0000 0A 0 0 0 0 0 55\n\x00\xff garbage\n"
                 "   8: 0100007F:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000 x 0 y\n")
    f = finding(tree, "listening")
    assert f["status"] == "unknown" and "malformed" in f["reason"]
    assert "3 malformed (line 3: bad address" in sources(f)["/proc/net/tcp"]
    assert set(by_port(f)) == {8080}  # the good line still counts
    tree.listen("tcp", ANY4, 443, 102)
    assert finding(tree, "listening")["status"] == "present"  # what can be read still shows the exposure

    fresh = Tree(tree.root.parent / "other")
    fresh.unreadable("/proc/net/udp")
    f = finding(fresh, "listening")
    assert f["status"] == "unknown" and "unreadable" in sources(f)["/proc/net/udp"]
    fresh.file("/proc/net/udp", TCP_HEADER)
    fresh.path("/proc/net/tcp6").unlink()
    fresh.path("/proc/net/udp6").unlink()
    f = finding(fresh, "listening")
    assert f["status"] == "absent" and "no IPv6" in sources(f)["/proc/net/tcp6"]
    fresh.path("/proc/net/tcp").unlink()
    assert finding(fresh, "listening")["status"] == "unknown"


# --- parsers, property-tested -------------------------------------------------------------------------------------
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
ports = st.integers(0, 65535)


@given(v6=st.booleans(), data=st.data(), state=st.integers(0, 255), uid=st.integers(0, 2**32 - 1),
       inode=st.integers(0, 2**63))
def test_proc_net_line_round_trip(v6: bool, data: st.DataObject, state: int, uid: int, inode: int) -> None:
    addr = ipv6 if v6 else ipv4
    local, remote = (data.draw(addr), data.draw(ports)), (data.draw(addr), data.draw(ports))
    s = parse_proc_net_line(net_line(data.draw(st.integers(0, 9999)), local, remote, state, uid, inode), v6=v6)
    assert (s.local, s.local_port, s.remote, s.remote_port) == (
        ipaddress.ip_address(local[0]), local[1], ipaddress.ip_address(remote[0]), remote[1])
    assert (s.state, s.uid, s.inode) == (state, uid, inode)


@given(st.text(max_size=200), st.booleans())
def test_proc_net_line_parser_only_ever_raises_value_error(line: str, v6: bool) -> None:
    with contextlib.suppress(ValueError):
        parse_proc_net_line(line, v6=v6)


@given(st.lists(st.one_of(st.text(max_size=120), st.binary(max_size=120).map(lambda b: b.decode("latin-1"))),
                max_size=8))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_probe_survives_garbage_in_every_file(lines: list[str]) -> None:
    """Every file of a full tree replaced by garbage: a report, never a crash."""
    with tempfile.TemporaryDirectory() as tmp:
        t = Tree(Path(tmp) / "root")
        t.node("/dev/tpmrm0")
        t.efivar("SecureBoot", b"\x01")
        t.file("/sys/kernel/security/ima/runtime_measurements_count", "1")
        t.file("/sys/class/misc/hw_random/rng_current", "x")
        t.file("/sys/module/kvm_amd/parameters/sev", "Y")
        t.file("/sys/class/tpm/tpm0/tpm_version_major", "2")
        text = "\n".join(lines)
        for p in Path(t.root).rglob("*"):
            if p.is_file() and not p.is_symlink() and p.stat().st_size:
                p.write_bytes(text.encode("utf-8", errors="surrogateescape"))
        report = probe(t.root, management_interfaces=["eth1"])
        d = report.to_dict()
        assert all(d[k]["status"] in ("present", "absent", "unknown") for k in FEATURES)
        json.dumps(d)


# --- the real machine, the library's errors and the CLI -----------------------------------------------------------
def test_the_real_machine_and_its_own_sockets() -> None:
    with socket.socket() as wild, socket.socket() as local:
        wild.bind((ANY4, 0))
        wild.listen()
        local.bind(("127.0.0.1", 0))
        local.listen()
        wild_port, local_port = wild.getsockname()[1], local.getsockname()[1]
        report = probe("/")
    d = report.to_dict()
    assert set(d) == set(FEATURES)
    for name in FEATURES:
        assert d[name]["status"] in ("present", "absent", "unknown") and d[name]["evidence"], name
    ports = {(s["address"], s["port"]): s for s in d["listening"]["sockets"]}
    mine = ports[(ANY4, wild_port)]
    assert mine["exposed"] is True and d["listening"]["status"] == "present"
    assert ports[("127.0.0.1", local_port)]["exposed"] is False
    if mine["processes"] is not None:  # readable for our own process, whoever we run as
        assert os.getpid() in [p["pid"] for p in mine["processes"]]


def test_probe_refuses_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(PathNotFoundError):
        probe(tmp_path / "nope")
    (tmp_path / "f").write_text("x")
    with pytest.raises(InvalidArgumentError, match="not a directory"):
        probe(tmp_path / "f")
    with pytest.raises(InvalidArgumentError, match="interface name"):
        probe(tmp_path, management_interfaces=["eth0/../x"])


def test_cli_json_and_table(tree: Tree) -> None:
    tree.listen("tcp", ANY4, 8443, 201, pid=4242)
    tree.efivar("SecureBoot", b"\x01")
    tree.efivar("SetupMode", b"\x00")
    r = CliRunner().invoke(app, ["probe", "--json", "--root", str(tree.root), "--management-interface", "eth1"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert set(d) == set(FEATURES) and d["secure_boot"]["state"] == "enabled"
    assert d["listening"]["management_interfaces"] == ["eth1"]
    r = CliRunner().invoke(app, ["probe", "--root", str(tree.root)], terminal_width=100)
    assert r.exit_code == 0, r.output
    for word in (*FEATURES, "8443", "server-4242", "wildcard"):
        assert word in r.stdout, word


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    for argv, code in ((["--root", str(tmp_path / "nope")], 2), (["--management-interface", "a b"], 2)):
        proc = subprocess.run([sys.executable, "-m", "edgeshield", "probe", *argv], capture_output=True, text=True,
                              timeout=120, check=False)
        assert proc.returncode == code, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("edgeshield: error: ") and "Traceback" not in proc.stderr


def test_cli_json_on_the_real_machine() -> None:
    proc = subprocess.run([sys.executable, "-m", "edgeshield", "probe", "--json"], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    assert set(d) == set(FEATURES)
    assert all({"status", "reason", "evidence"} <= set(v) for v in d.values())
