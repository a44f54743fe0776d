"""Network-layer protection of the serving address: ``ip`` output recorded on this machine and WireGuard / xfrm
output in the exact format iproute2 6.1 prints, every verdict and every "unknown" path, a real run against this
machine's ``ip``, and (as root) real IPsec policies in a throw-away network namespace."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator, Sequence

import pytest
from typer.testing import CliRunner

from edgeshield.cli import app
from edgeshield.errors import InvalidArgumentError
from edgeshield.hardware._netprobe import (
    CommandResult,
    parse_address,
    parse_ip_addr,
    parse_ip_link_kinds,
    parse_xfrm_policies,
    parse_xfrm_states,
    probe_network_layer,
)

# `ip -j addr` and `ip -d -j link` as printed on the development VM (iproute2 6.1), trimmed to lo and eth0
HOST_ADDR = json.dumps([
    {"ifindex": 1, "ifname": "lo", "flags": ["LOOPBACK", "UP", "LOWER_UP"], "mtu": 65536, "qdisc": "noqueue",
     "operstate": "UNKNOWN", "group": "default", "txqlen": 1000, "link_type": "loopback",
     "address": "00:00:00:00:00:00", "broadcast": "00:00:00:00:00:00",
     "addr_info": [{"family": "inet", "local": "127.0.0.1", "prefixlen": 8, "scope": "host", "label": "lo",
                    "valid_life_time": 4294967295, "preferred_life_time": 4294967295},
                   {"family": "inet6", "local": "::1", "prefixlen": 128, "scope": "host",
                    "valid_life_time": 4294967295, "preferred_life_time": 4294967295}]},
    {"ifindex": 2, "ifname": "ifb0", "flags": ["BROADCAST", "NOARP"], "mtu": 1500, "qdisc": "noop",
     "operstate": "DOWN", "group": "default", "txqlen": 32, "link_type": "ether", "address": "d2:2c:9b:f9:1b:61",
     "broadcast": "ff:ff:ff:ff:ff:ff", "addr_info": []},
    {"ifindex": 4, "ifname": "eth0", "flags": ["BROADCAST", "MULTICAST", "UP", "LOWER_UP"], "mtu": 1400,
     "qdisc": "pfifo_fast", "operstate": "UP", "group": "default", "txqlen": 1000, "link_type": "ether",
     "address": "02:fc:00:00:00:01", "broadcast": "ff:ff:ff:ff:ff:ff",
     "addr_info": [{"family": "inet", "local": "192.0.2.2", "prefixlen": 24, "broadcast": "192.0.2.255",
                    "scope": "global", "label": "eth0", "valid_life_time": 4294967295,
                    "preferred_life_time": 4294967295},
                   {"family": "inet6", "local": "fd00::2", "prefixlen": 64, "scope": "global", "nodad": True,
                    "valid_life_time": 4294967295, "preferred_life_time": 4294967295},
                   {"family": "inet6", "local": "fe80::fc:ff:fe00:1", "prefixlen": 64, "scope": "link",
                    "valid_life_time": 4294967295, "preferred_life_time": 4294967295}]},
], separators=(",", ":"))
HOST_LINK = json.dumps([
    {"ifindex": 1, "ifname": "lo", "flags": ["LOOPBACK", "UP", "LOWER_UP"], "mtu": 65536, "qdisc": "noqueue",
     "operstate": "UNKNOWN", "linkmode": "DEFAULT", "group": "default", "txqlen": 1000, "link_type": "loopback",
     "address": "00:00:00:00:00:00", "broadcast": "00:00:00:00:00:00", "promiscuity": 0, "allmulti": 0,
     "min_mtu": 0, "max_mtu": 0, "inet6_addr_gen_mode": "eui64", "num_tx_queues": 1, "num_rx_queues": 1,
     "gso_max_size": 65536, "gso_max_segs": 65535, "tso_max_size": 524280, "tso_max_segs": 65535,
     "gro_max_size": 65536},
    {"ifindex": 2, "ifname": "ifb0", "flags": ["BROADCAST", "NOARP"], "mtu": 1500, "qdisc": "noop",
     "operstate": "DOWN", "linkmode": "DEFAULT", "group": "default", "txqlen": 32, "link_type": "ether",
     "address": "d2:2c:9b:f9:1b:61", "broadcast": "ff:ff:ff:ff:ff:ff", "promiscuity": 0, "allmulti": 0,
     "min_mtu": 0, "max_mtu": 0, "linkinfo": {"info_kind": "ifb"}, "inet6_addr_gen_mode": "eui64",
     "num_tx_queues": 1, "num_rx_queues": 1, "gso_max_size": 65536, "gso_max_segs": 65535, "tso_max_size": 524280,
     "tso_max_segs": 65535, "gro_max_size": 65536},
    {"ifindex": 4, "ifname": "eth0", "flags": ["BROADCAST", "MULTICAST", "UP", "LOWER_UP"], "mtu": 1400,
     "qdisc": "pfifo_fast", "operstate": "UP", "linkmode": "DEFAULT", "group": "default", "txqlen": 1000,
     "link_type": "ether", "address": "02:fc:00:00:00:01", "broadcast": "ff:ff:ff:ff:ff:ff", "promiscuity": 0,
     "allmulti": 0, "min_mtu": 68, "max_mtu": 65535, "inet6_addr_gen_mode": "eui64", "num_tx_queues": 1,
     "num_rx_queues": 1, "gso_max_size": 65536, "gso_max_segs": 65535, "tso_max_size": 65536, "tso_max_segs": 65535,
     "gro_max_size": 65536, "parentbus": "virtio", "parentdev": "virtio2"},
], separators=(",", ":"))

# A WireGuard interface as iproute2 prints it (this kernel has no wireguard module, so it is constructed)
WG_ADDR_ENTRY = {"ifindex": 5, "ifname": "wg0", "flags": ["POINTOPOINT", "NOARP", "UP", "LOWER_UP"], "mtu": 1420,
                 "qdisc": "noqueue", "operstate": "UNKNOWN", "group": "default", "txqlen": 1000, "link_type": "none",
                 "addr_info": [{"family": "inet", "local": "10.66.0.1", "prefixlen": 24, "scope": "global",
                                "label": "wg0", "valid_life_time": 4294967295,
                                "preferred_life_time": 4294967295}]}
WG_LINK_ENTRY = {"ifindex": 5, "ifname": "wg0", "flags": ["POINTOPOINT", "NOARP", "UP", "LOWER_UP"], "mtu": 1420,
                 "qdisc": "noqueue", "operstate": "UNKNOWN", "linkmode": "DEFAULT", "group": "default",
                 "txqlen": 1000, "link_type": "none", "promiscuity": 0, "allmulti": 0, "min_mtu": 0,
                 "max_mtu": 2147483552, "linkinfo": {"info_kind": "wireguard"}, "inet6_addr_gen_mode": "none",
                 "num_tx_queues": 1, "num_rx_queues": 1, "gso_max_size": 65536, "gso_max_segs": 65535,
                 "tso_max_size": 65536, "tso_max_segs": 65535, "gro_max_size": 65536}
WG_ADDR = json.dumps([*json.loads(HOST_ADDR), WG_ADDR_ENTRY])
WG_LINK = json.dumps([*json.loads(HOST_LINK), WG_LINK_ENTRY])

# `ip xfrm policy` as printed in a namespace on this machine (the policies below were really installed)
POLICIES_BOTH_WAYS = """\
src 192.0.2.0/24 dst 192.0.2.0/24 
\tdir in priority 0 ptype main 
\ttmpl src 0.0.0.0 dst 0.0.0.0
\t\tproto esp reqid 0 mode transport
src 192.0.2.0/24 dst 192.0.2.0/24 
\tdir out priority 0 ptype main 
\ttmpl src 0.0.0.0 dst 0.0.0.0
\t\tproto esp reqid 0 mode transport
"""  # noqa: W291 - iproute2 ends these lines with a space
POLICIES_MIXED = """\
src 10.9.5.0/24 dst 10.9.0.1/32 
\tdir in priority 0 ptype main 
\ttmpl src 10.9.5.1 dst 10.9.0.1
\t\tproto ah reqid 0 mode tunnel
src 0.0.0.0/0 dst 10.9.0.1/32 proto tcp dport 8443 
\tdir in action block priority 0 ptype main 
src 10.9.0.0/24 dst 0.0.0.0/0 
\tdir out priority 0 ptype main 
\ttmpl src 0.0.0.0 dst 0.0.0.0
\t\tproto esp reqid 0 mode transport
\t\tlevel use 
src 0.0.0.0/0 dst 0.0.0.0/0 
\tsocket in priority 0 ptype main 
"""  # noqa: W291
# `ip xfrm state` in iproute2's format (this kernel has no ESP algorithms to install one); the keys are dummies
KEY_HEX = "0x0102030405060708090a0b0c0d0e0f10"
STATES = f"""\
src 192.0.2.2 dst 192.0.2.7
\tproto esp spi 0x00001000 reqid 1 mode transport
\treplay-window 0 
\tauth-trunc hmac(sha256) {KEY_HEX}{KEY_HEX[2:]} 128
\tenc cbc(aes) {KEY_HEX}
\tanti-replay context: seq 0x0, oseq 0x0, bitmap 0x00000000
\tsel src 0.0.0.0/0 dst 0.0.0.0/0 
src 192.0.2.7 dst 192.0.2.2
\tproto esp spi 0x00001001 reqid 1 mode transport
\treplay-window 32 flag af-unspec
\taead rfc4106(gcm(aes)) {KEY_HEX}01020304 128
\tsel src 0.0.0.0/0 dst 0.0.0.0/0 
"""  # noqa: W291


def recorded(outputs: dict[str, CommandResult | str]):  # type: ignore[no-untyped-def]
    """A runner answering each ``ip`` sub-command with recorded output (a string: exit status 0)."""
    calls: list[list[str]] = []

    def run(argv: Sequence[str]) -> CommandResult:
        calls.append(list(argv))
        key = " ".join(argv[1:])
        out = outputs[key]
        return CommandResult(0, out, "") if isinstance(out, str) else out

    run.calls = calls  # type: ignore[attr-defined]
    return run


def host(**over: CommandResult | str):  # type: ignore[no-untyped-def]
    base: dict[str, CommandResult | str] = {"-j addr": HOST_ADDR, "-d -j link": HOST_LINK, "xfrm policy": "",
                                            "xfrm state": ""}
    return recorded({**base, **{k.replace("_", " "): v for k, v in over.items()}})


# --- parsers ------------------------------------------------------------------------------------------------------
def test_parses_this_machines_ip_json() -> None:
    addrs = parse_ip_addr(HOST_ADDR)
    assert [str(a) for a in addrs["eth0"]] == ["192.0.2.2", "fd00::2", "fe80::fc:ff:fe00:1"]
    assert addrs["ifb0"] == []
    assert parse_ip_link_kinds(HOST_LINK) == {"lo": None, "ifb0": "ifb", "eth0": None}
    assert parse_ip_link_kinds(WG_LINK)["wg0"] == "wireguard"


def test_parses_xfrm_policies_and_states_without_reading_keys() -> None:
    policies = parse_xfrm_policies(POLICIES_MIXED)
    assert [(str(p.src), str(p.dst), p.direction, p.action) for p in policies] == [
        ("10.9.5.0/24", "10.9.0.1/32", "in", "allow"), ("0.0.0.0/0", "10.9.0.1/32", "in", "block"),
        ("10.9.0.0/24", "0.0.0.0/0", "out", "allow")]  # the socket policy is left out
    assert policies[0].templates[0].proto == "ah" and policies[0].requires_ipsec
    assert policies[1].upper == "proto tcp dport 8443" and not policies[1].requires_ipsec
    assert policies[2].templates[0].optional and not policies[2].requires_ipsec  # level use
    states = parse_xfrm_states(STATES)
    assert [(s.src, s.dst, s.spi) for s in states] == [("192.0.2.2", "192.0.2.7", "0x00001000"),
                                                        ("192.0.2.7", "192.0.2.2", "0x00001001")]
    assert KEY_HEX[2:] not in json.dumps([s.to_dict() for s in states])


@pytest.mark.parametrize("bad", ["not json", "{}", '[{"no": "ifname"}]'])
def test_malformed_ip_json_is_refused_by_the_parser(bad: str) -> None:
    with pytest.raises(ValueError, match=r"JSON|ifname|Expecting"):
        parse_ip_addr(bad)


@pytest.mark.parametrize("text", ["\tdir out\n", "garbage line\n", "src 1.2.3.4/32 dst 0.0.0.0/0\n"])
def test_malformed_xfrm_text_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="ip xfrm"):
        parse_xfrm_policies(text)


def test_addresses() -> None:
    assert parse_address("127.0.0.1:8443") == ("127.0.0.1", 8443)
    assert parse_address("[::1]:443") == ("::1", 443)
    assert parse_address("fd00::2") == ("fd00::2", None)
    assert parse_address("edge") == ("edge", None)
    for bad in ("127.0.0.1:http", ":80", "[::1", "1.2.3.4:70000"):
        with pytest.raises(InvalidArgumentError):
            parse_address(bad)


# --- verdicts from recorded output ----------------------------------------------------------------------------------
def test_plain_ethernet_address_has_no_network_layer_protection() -> None:
    r = probe_network_layer("192.0.2.2:8443", run=host())
    assert (r.wireguard, r.ipsec, r.status) == ("absent", "absent", "absent")
    assert r.interfaces == ("eth0",) and "no WireGuard interface" in r.reason


def test_address_on_a_wireguard_interface() -> None:
    r = probe_network_layer("10.66.0.1:8443", run=host(**{"-j_addr": WG_ADDR, "-d_-j_link": WG_LINK}))
    assert (r.wireguard, r.status) == ("present", "present") and r.interfaces == ("wg0",)
    # the same host, serving on eth0: WireGuard exists but does not carry this address
    r = probe_network_layer("192.0.2.2", run=host(**{"-j_addr": WG_ADDR, "-d_-j_link": WG_LINK}))
    assert r.wireguard == "absent" and "wg0" in r.reason
    # a wildcard is reachable on eth0 too
    r = probe_network_layer("0.0.0.0:8443", run=host(**{"-j_addr": WG_ADDR, "-d_-j_link": WG_LINK}))
    assert r.wireguard == "absent" and "eth0" in r.reason


def test_ipsec_both_ways_is_present_with_its_sas() -> None:
    r = probe_network_layer("192.0.2.2:8443", run=host(xfrm_policy=POLICIES_BOTH_WAYS, xfrm_state=STATES))
    assert (r.ipsec, r.status) == ("present", "present")
    assert len(r.policies) == 2 and len(r.states) == 2 and "peers in 192.0.2.0/24 only" in r.reason
    assert KEY_HEX[2:] not in json.dumps(r.to_dict())  # the report never carries SA keys
    # no SA yet: still required (held until IKE negotiates), and said so
    r = probe_network_layer("192.0.2.2", run=host(xfrm_policy=POLICIES_BOTH_WAYS))
    assert r.ipsec == "present" and "no SA installed yet" in r.reason
    # another address is not covered by those selectors
    r = probe_network_layer("10.66.0.1", run=host(**{"-j_addr": WG_ADDR, "-d_-j_link": WG_LINK},
                                                 xfrm_policy=POLICIES_BOTH_WAYS))
    assert r.ipsec == "absent" and r.wireguard == "present"


def test_one_way_optional_or_blocking_policies_are_not_protection() -> None:
    inbound_only = "".join(POLICIES_BOTH_WAYS.splitlines(keepends=True)[:4])
    assert "dir in" in inbound_only and "dir out" not in inbound_only
    r = probe_network_layer("192.0.2.2", run=host(xfrm_policy=inbound_only))
    assert r.ipsec == "absent" and "one way only" in r.reason
    mixed = POLICIES_MIXED.replace("10.9.0.1", "192.0.2.2").replace("10.9.0.0/24", "192.0.2.0/24")
    r = probe_network_layer("192.0.2.2:8443", run=host(xfrm_policy=mixed))
    assert r.ipsec == "absent"
    assert any("level use" in n for n in r.notes) and any("blocks" in n for n in r.notes)


def test_a_selector_for_another_port_does_not_cover_the_server() -> None:
    both = POLICIES_BOTH_WAYS.replace("192.0.2.0/24 dst 192.0.2.0/24 \n\tdir in",
                                      "192.0.2.0/24 dst 192.0.2.0/24 proto tcp dport 22 \n\tdir in")
    assert "dport 22" in both
    assert probe_network_layer("192.0.2.2:8443", run=host(xfrm_policy=both)).ipsec == "absent"
    assert probe_network_layer("192.0.2.2:22", run=host(xfrm_policy=both)).ipsec == "present"
    unported = probe_network_layer("192.0.2.2", run=host(xfrm_policy=both))
    assert unported.ipsec == "present" and any("give HOST:PORT" in n for n in unported.notes)


@pytest.mark.parametrize(("over", "needle"), [
    ({"xfrm_policy": CommandResult(2, "", "RTNETLINK answers: Operation not permitted\n")}, "Operation not permitted"),
    ({"xfrm_state": CommandResult(None, "", "", "`ip xfrm state` did not answer within 5 s")}, "did not answer"),
    ({"xfrm_policy": "src what dst\n\tdir out\n"}, "could not parse"),
])
def test_ipsec_unknown_says_why(over: dict[str, CommandResult | str], needle: str) -> None:
    r = probe_network_layer("192.0.2.2", run=host(**over))
    assert r.ipsec == "unknown" and needle in r.reason and r.wireguard == "absent"
    assert r.status == "unknown"


def test_wireguard_unknown_says_why() -> None:
    r = probe_network_layer("192.0.2.2", run=host(**{"-j_addr": "[{broken"}))
    assert r.wireguard == "unknown" and "could not parse" in r.reason
    r = probe_network_layer("198.51.100.9", run=host())
    assert r.wireguard == "unknown" and "on no interface" in r.reason


def test_missing_ip_command_is_unknown_not_a_guess(tmp_path: os.PathLike[str]) -> None:
    r = probe_network_layer("127.0.0.1:8443", ip=(os.path.join(tmp_path, "no-such-ip"),))
    assert (r.wireguard, r.ipsec, r.status) == ("unknown", "unknown", "unknown")
    assert "is not installed" in r.reason


# --- this machine, for real -----------------------------------------------------------------------------------------
def test_this_machine_loopback() -> None:
    r = probe_network_layer("127.0.0.1:8443")
    if shutil.which("ip") is None:
        assert r.status == "unknown"
        return
    assert r.wireguard in ("absent", "present") and r.interfaces == ("lo",)
    assert r.ipsec in ("absent", "present", "unknown")  # unknown where ip xfrm is not permitted (not root)
    if r.ipsec == "unknown":
        assert "failed" in r.reason
    assert any(e.source == "ip -j addr" for e in r.evidence)


@pytest.fixture
def netns() -> Iterator[str]:
    if shutil.which("ip") is None or os.geteuid() != 0:
        pytest.skip("needs root and iproute2 to make a network namespace")
    name = f"es-np-{uuid.uuid4().hex[:8]}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, check=False)  # noqa: S607
    if made.returncode != 0:
        pytest.skip(f"ip netns add not permitted here: {made.stderr.decode(errors='replace').strip()}")
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)  # noqa: S607


def _ns(name: str, *args: str) -> None:
    done = subprocess.run(["ip", "-n", name, *args], check=False, capture_output=True, timeout=10)  # noqa: S607
    if done.returncode != 0:
        pytest.skip(f"ip {' '.join(args[:3])} not permitted here: {done.stderr.decode(errors='replace').strip()}")


def test_real_ipsec_policies_in_a_namespace(netns: str) -> None:
    _ns(netns, "link", "set", "lo", "up")
    _ns(netns, "addr", "add", "10.77.0.1/32", "dev", "lo")
    ip = ("ip", "-n", netns)
    r = probe_network_layer("10.77.0.1:8443", ip=ip)
    assert (r.wireguard, r.ipsec) == ("absent", "absent") and r.interfaces == ("lo",)
    for direction, src, dst in (("out", "10.77.0.1/32", "10.78.0.0/16"), ("in", "10.78.0.0/16", "10.77.0.1/32")):
        _ns(netns, "xfrm", "policy", "add", "src", src, "dst", dst, "dir", direction, "tmpl", "proto", "esp",
            "mode", "transport")
        r = probe_network_layer("10.77.0.1:8443", ip=ip)
        assert r.ipsec == ("absent" if direction == "out" else "present"), r.reason
    assert "peers in 10.78.0.0/16 only" in r.reason and "no SA installed yet" in r.reason
    assert probe_network_layer("127.0.0.1", ip=ip).ipsec == "absent"  # selectors do not cover loopback


# --- the CLI ------------------------------------------------------------------------------------------------------
def test_probe_cli_reports_the_address() -> None:
    result = CliRunner().invoke(app, ["probe", "--json", "--address", "127.0.0.1:8443"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["network_layer"]["address"] == "127.0.0.1" and data["network_layer"]["port"] == 8443
    assert data["network_layer"]["status"] in ("present", "absent", "unknown")
    result = CliRunner().invoke(app, ["probe", "--address", "127.0.0.1:http"])
    assert result.exit_code != 0


# --- the compliance evidence ----------------------------------------------------------------------------------------
def test_network_exposure_check_carries_the_network_layer_as_evidence() -> None:
    import socket

    from edgeshield.compliance._checks import CHECKS, CheckContext, run_check
    from edgeshield.compliance._deployment import Deployment

    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
        r = run_check(CHECKS["network_exposure"], CheckContext(Deployment(port=port)))
    assert r.status == "pass", r.reason
    ev = next(e for e in r.evidence if e.kind == "network_layer")
    assert ev.data["address"] == "127.0.0.1" and ev.data["port"] == port
    assert ev.data["wireguard"] in ("present", "absent", "unknown")
    assert f"network layer 127.0.0.1:{port}: WireGuard" in r.reason
