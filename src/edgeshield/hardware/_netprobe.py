"""Network-layer protection of a serving address: does it sit on a WireGuard interface, or do IPsec policies cover it?

IPsec and WireGuard are the operating system's; EdgeShield does not implement them, it reports them. The evidence
is what ``ip`` prints: ``ip -j addr`` (which interface holds the address), ``ip -d -j link`` (an interface of kind
``wireguard``), and ``ip xfrm policy`` / ``ip xfrm state`` (IPsec policies whose selectors cover the address, with
an ESP or AH template, and the SAs installed). ``ip xfrm`` has no JSON output, so its text is parsed; only the
header lines of a state are read, never the key lines that ``ip xfrm state`` prints.

Each answer is ``present``, ``absent`` or ``unknown``; ``unknown`` carries why (``ip`` missing, ``ip xfrm`` not
permitted, output malformed, a timeout) and is never a guess. What it does not check: WireGuard's peers and allowed
IPs (``wg show`` needs the ``wg`` tool and root), IKE daemons, and whether a route sends the clients' traffic through
the interface (it answers for the address the server binds).
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from edgeshield.errors import InvalidArgumentError
from edgeshield.hardware._probe import Evidence, Finding, Status

__all__ = [
    "CommandResult",
    "NetworkLayer",
    "XfrmPolicy",
    "XfrmState",
    "XfrmTemplate",
    "parse_address",
    "parse_ip_addr",
    "parse_ip_link_kinds",
    "parse_xfrm_policies",
    "parse_xfrm_states",
    "probe_network_layer",
    "summarize",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_TIMEOUT_S = 5.0
_MAX_OUTPUT = 4 << 20
_PROTECTING = ("esp", "ah")


@dataclass(frozen=True)
class CommandResult:
    """What one ``ip`` invocation returned; ``error`` says why it could not run at all (then rc is None)."""

    rc: int | None
    stdout: str
    stderr: str
    error: str | None = None


Runner = Callable[[Sequence[str]], CommandResult]


def _run(argv: Sequence[str], timeout_s: float = _TIMEOUT_S) -> CommandResult:
    try:
        proc = subprocess.run(list(argv), capture_output=True, timeout=timeout_s, check=False)
    except FileNotFoundError:
        return CommandResult(None, "", "", f"`{argv[0]}` is not installed")
    except PermissionError as exc:
        return CommandResult(None, "", "", f"`{argv[0]}` cannot be run: {exc.strerror or exc}")
    except subprocess.TimeoutExpired:
        return CommandResult(None, "", "", f"`{' '.join(argv)}` did not answer within {timeout_s:g} s")
    except OSError as exc:
        return CommandResult(None, "", "", f"`{argv[0]}` cannot be run: {exc.strerror or exc}")
    return CommandResult(proc.returncode, proc.stdout[:_MAX_OUTPUT].decode("utf-8", "replace"),
                         proc.stderr[:4096].decode("utf-8", "replace"))


# --- parsed records -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class XfrmTemplate:
    """One ``tmpl`` of a policy: the transform it requires (``esp``, ``ah``, ``comp``), its mode and endpoints."""

    proto: str
    mode: str
    src: str | None
    dst: str | None
    optional: bool  # ``level use``: IPsec if an SA exists, clear text otherwise

    def to_dict(self) -> dict[str, Any]:
        return {"proto": self.proto, "mode": self.mode, "src": self.src, "dst": self.dst, "optional": self.optional}


@dataclass(frozen=True)
class XfrmPolicy:
    """One ``ip xfrm policy`` entry (socket policies are skipped): selector, direction, action and templates."""

    src: IPNetwork
    dst: IPNetwork
    direction: str  # in, out, fwd
    action: str  # allow, block
    upper: str  # "" or the selector's protocol/port restriction as printed, e.g. "proto tcp dport 8443"
    templates: tuple[XfrmTemplate, ...]

    @property
    def requires_ipsec(self) -> bool:
        return self.action == "allow" and any(t.proto in _PROTECTING and not t.optional for t in self.templates)

    def to_dict(self) -> dict[str, Any]:
        return {"src": str(self.src), "dst": str(self.dst), "dir": self.direction, "action": self.action,
                "upper": self.upper, "templates": [t.to_dict() for t in self.templates]}


@dataclass(frozen=True)
class XfrmState:
    """One installed SA, from the header lines of ``ip xfrm state`` (its keys are never read)."""

    src: str
    dst: str
    proto: str
    spi: str
    mode: str

    def to_dict(self) -> dict[str, Any]:
        return {"src": self.src, "dst": self.dst, "proto": self.proto, "spi": self.spi, "mode": self.mode}


@dataclass(frozen=True)
class NetworkLayer:
    """The verdict for one serving address: WireGuard and IPsec each present/absent/unknown, and overall."""

    address: str
    port: int | None
    interfaces: tuple[str, ...]
    wireguard: Status
    ipsec: Status
    reason: str
    evidence: tuple[Evidence, ...]
    policies: tuple[XfrmPolicy, ...] = ()  # those covering the address
    states: tuple[XfrmState, ...] = ()  # those whose endpoints involve the address or the policies' tunnels
    notes: tuple[str, ...] = field(default=())

    @property
    def status(self) -> Status:
        if "present" in (self.wireguard, self.ipsec):
            return "present"
        return "unknown" if "unknown" in (self.wireguard, self.ipsec) else "absent"

    def to_finding(self) -> Finding:
        return Finding(self.status, self.reason, self.evidence, MappingProxyType(self.detail()))

    def detail(self) -> dict[str, Any]:
        return {"address": self.address, "port": self.port, "interfaces": list(self.interfaces),
                "wireguard": self.wireguard, "ipsec": self.ipsec,
                "ipsec_policies": [p.to_dict() for p in self.policies],
                "ipsec_states": [s.to_dict() for s in self.states], "notes": list(self.notes)}

    def to_dict(self) -> dict[str, Any]:
        return self.to_finding().to_dict()


# --- parsers (pure: text in, records out; ValueError on what they cannot read) -------------------------------------
def parse_address(text: str) -> tuple[str, int | None]:
    """``HOST``, ``HOST:PORT``, ``[V6]:PORT`` or a bare IPv6 address -> (host, port or None)."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise InvalidArgumentError(f"not HOST:PORT: {text!r}")
        port_text = rest[1:] or None
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, None
    port = None
    if port_text is not None:
        if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
            raise InvalidArgumentError(f"not a port: {port_text!r}")
        port = int(port_text)
    if not host:
        raise InvalidArgumentError(f"no host in {text!r}")
    return host, port


def parse_ip_addr(text: str) -> dict[str, list[IPAddress]]:
    """``ip -j addr`` -> interface name -> its addresses."""
    data = json.loads(text)
    if not isinstance(data, list):
        raise ValueError("ip -j addr: not a JSON list")
    out: dict[str, list[IPAddress]] = {}
    for link in data:
        if not isinstance(link, dict) or not isinstance(link.get("ifname"), str):
            raise ValueError("ip -j addr: an entry without ifname")
        addrs = out.setdefault(link["ifname"], [])
        for a in link.get("addr_info") or []:
            if isinstance(a, dict) and isinstance(a.get("local"), str):
                addrs.append(ipaddress.ip_address(a["local"].split("%")[0]))
    return out


def parse_ip_link_kinds(text: str) -> dict[str, str | None]:
    """``ip -d -j link`` -> interface name -> its ``linkinfo.info_kind`` (``wireguard``, ``veth``...; None: none)."""
    data = json.loads(text)
    if not isinstance(data, list):
        raise ValueError("ip -d -j link: not a JSON list")
    out: dict[str, str | None] = {}
    for link in data:
        if not isinstance(link, dict) or not isinstance(link.get("ifname"), str):
            raise ValueError("ip -d -j link: an entry without ifname")
        info = link.get("linkinfo")
        kind = info.get("info_kind") if isinstance(info, dict) else None
        out[link["ifname"]] = kind if isinstance(kind, str) else None
    return out


def _blocks(text: str) -> list[list[str]]:
    """Entries of ``ip xfrm`` text: a line starting in column 0 opens one, indented lines continue it."""
    blocks: list[list[str]] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        if not line[0].isspace():
            blocks.append([line.strip()])
        elif blocks:
            blocks[-1].append(line.strip())
        else:
            raise ValueError(f"ip xfrm: continuation line before any entry: {line.strip()[:60]!r}")
    return blocks


def _words(line: str) -> dict[str, str]:
    w = line.split()
    return {w[i]: w[i + 1] for i in range(len(w) - 1)}


def _entry_head(block: list[str], what: str) -> list[str]:
    """The words of an ``ip xfrm`` entry's first line, which must read ``src A dst B ...``."""
    head = block[0].split()
    if len(head) < 4 or head[0] != "src" or head[2] != "dst":
        raise ValueError(f"ip xfrm {what}: unexpected entry {block[0][:80]!r}")
    return head


def parse_xfrm_policies(text: str) -> list[XfrmPolicy]:
    """``ip xfrm policy`` (text) -> its address-selector policies; per-socket policies are left out."""
    policies = []
    for block in _blocks(text):
        head = _entry_head(block, "policy")
        src, dst = ipaddress.ip_network(head[1], strict=False), ipaddress.ip_network(head[3], strict=False)
        upper = " ".join(head[4:])
        direction = action = ""
        templates: list[XfrmTemplate] = []
        tmpl: dict[str, str] | None = None
        for line in block[1:]:
            w = _words(line)
            if line.startswith("socket "):
                direction = "socket"
            elif line.startswith("dir "):
                direction = w["dir"]
                action = w.get("action", "allow")
            elif line.startswith("tmpl "):
                tmpl = w
            elif line.startswith("proto ") and tmpl is not None:
                templates.append(XfrmTemplate(w.get("proto", "?"), w.get("mode", "transport"),
                                              tmpl.get("src"), tmpl.get("dst"), w.get("level") == "use"))
                tmpl = None
            elif line.startswith("level ") and templates:  # iproute2 prints "level use" on its own line
                last = templates[-1]
                templates[-1] = XfrmTemplate(last.proto, last.mode, last.src, last.dst, w.get("level") == "use")
        if direction == "socket":
            continue
        if direction not in ("in", "out", "fwd"):
            raise ValueError(f"ip xfrm policy: no direction in {block[0][:80]!r}")
        policies.append(XfrmPolicy(src, dst, direction, action, upper, tuple(templates)))
    return policies


_STATE_LINE = re.compile(r"^proto (\S+) spi (0x[0-9a-fA-F]+)\b.*?\bmode (\S+)")


def parse_xfrm_states(text: str) -> list[XfrmState]:
    """``ip xfrm state`` (text) -> its SAs, from each entry's first two lines only (the key lines are skipped)."""
    states = []
    for block in _blocks(text):
        head = _entry_head(block, "state")
        m = _STATE_LINE.match(block[1]) if len(block) > 1 else None
        if m is None:
            raise ValueError(f"ip xfrm state: no proto/spi/mode line after {block[0][:80]!r}")
        states.append(XfrmState(head[1], head[3], m.group(1), m.group(2), m.group(3)))
    return states


# --- the verdicts -------------------------------------------------------------------------------------------------
def _resolve(host: str, ev: list[Evidence]) -> IPAddress:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise InvalidArgumentError(f"cannot resolve {host!r}: {exc}") from exc
    addr = ipaddress.ip_address(str(infos[0][4][0]).split("%")[0])
    ev.append(Evidence(f"getaddrinfo({host})", f"{addr} (the first of {len(infos)})"))
    return addr


def _wireguard(addr: IPAddress, ifaces: dict[str, list[IPAddress]], kinds: dict[str, str | None],
               holders: list[str]) -> tuple[Status, str]:
    wg = sorted(n for n, k in kinds.items() if k == "wireguard")
    if addr.is_unspecified:
        exposed = sorted(n for n, a in ifaces.items() if a and n != "lo" and kinds.get(n) != "wireguard"
                         and not all(x.is_loopback for x in a))
        if wg and not exposed:
            return "present", f"wildcard address, and every non-loopback interface is WireGuard ({', '.join(wg)})"
        return "absent", ("wildcard address: reachable on non-WireGuard interface(s) " + ", ".join(exposed)
                          if exposed else "wildcard address and no WireGuard interface")
    on_wg = [n for n in holders if kinds.get(n) == "wireguard"]
    if on_wg:
        return "present", f"{addr} is on WireGuard interface {', '.join(on_wg)}"
    where = f"on {', '.join(holders)} (kind {', '.join(str(kinds.get(n) or 'none') for n in holders)})"
    return "absent", f"{addr} is {where}" + (f"; WireGuard interfaces here: {', '.join(wg)}" if wg else
                                              "; no WireGuard interface on this host")


def _covers(net: IPNetwork, addr: IPAddress) -> bool:
    return net.version == addr.version and (addr in net or (addr.is_unspecified and net.prefixlen == 0))


def _port_ok(policy: XfrmPolicy, field_name: str, port: int | None) -> bool:
    """False when the selector names a port (``sport``/``dport``) other than the server's."""
    words = policy.upper.split()
    if port is None or field_name not in words:
        return True
    i = words.index(field_name)
    return i + 1 < len(words) and words[i + 1] in (str(port), "0")


def _ipsec(addr: IPAddress, port: int | None, policies: list[XfrmPolicy],
           states: list[XfrmState]) -> tuple[Status, str, list[XfrmPolicy], list[XfrmState], list[str]]:
    notes: list[str] = []
    # the server's own port is the source port of what it sends (dir out) and the destination of what it gets (in)
    out = [p for p in policies if p.direction == "out" and _covers(p.src, addr) and _port_ok(p, "sport", port)]
    inc = [p for p in policies if p.direction == "in" and _covers(p.dst, addr) and _port_ok(p, "dport", port)]
    covering = out + inc
    out_req, in_req = [p for p in out if p.requires_ipsec], [p for p in inc if p.requires_ipsec]
    for p in covering:
        if p.upper:
            notes.append(f"policy {p.src} -> {p.dst} dir {p.direction} applies only to {p.upper}")
        if p.action == "allow" and p.templates and not p.requires_ipsec:
            notes.append(f"policy {p.src} -> {p.dst} dir {p.direction} has only optional templates (level use): "
                         "clear text when no SA exists")
        if p.action == "block":
            notes.append(f"policy {p.src} -> {p.dst} dir {p.direction} blocks that traffic")
    endpoints = {str(addr)} | {t.src for p in covering for t in p.templates if t.src} | {
        t.dst for p in covering for t in p.templates if t.dst}
    sas = [s for s in states if s.src in endpoints or s.dst in endpoints]
    if not policies:
        return "absent", "no IPsec policy on this host (ip xfrm policy is empty)", [], sas, notes
    if not out_req and not in_req:
        return "absent", f"no IPsec policy requiring ESP/AH covers {addr} ({len(policies)} policies read)", \
            covering, sas, notes
    if not out_req or not in_req:
        missing = "inbound (dir in)" if not in_req else "outbound (dir out)"
        return "absent", (f"IPsec policies cover {addr} one way only: no {missing} policy requires ESP/AH, so that "
                          "direction may travel in clear text"), covering, sas, notes
    peers = sorted({str(p.dst) for p in out_req} | {str(p.src) for p in in_req})
    scope = "every peer" if any(n.endswith("/0") for n in peers) else f"peers in {', '.join(peers)} only"
    sa_text = (f"{len(sas)} SA(s) installed" if sas else
               "no SA installed yet: an IKE daemon negotiates one on demand; until then that traffic is held, "
               "not sent in clear")
    if port is None and any(p.upper for p in out_req + in_req):
        notes.append("a covering policy is restricted to a protocol or port: give HOST:PORT to check the server's")
    return "present", f"IPsec policies require ESP/AH both ways for {addr} with {scope}; {sa_text}", covering, sas, \
        notes


def probe_network_layer(address: str, *, ip: Sequence[str] = ("ip",), run: Runner | None = None) -> NetworkLayer:
    """Whether ``address`` (``HOST`` or ``HOST:PORT``) sits on a WireGuard interface or is covered by IPsec policies
    on this host, from ``ip``'s own output. ``ip`` is the command prefix (e.g. ``("ip", "-n", "NETNS")``); ``run``
    replaces the subprocess call (tests feed recorded output through it). Never raises for what it reads."""
    host, port = parse_address(address)
    runner: Runner = run or _run
    ev: list[Evidence] = []
    addr = _resolve(host, ev)
    prefix = list(ip)
    cmd = " ".join(prefix)

    def call(*args: str) -> tuple[str | None, str]:
        r = runner([*prefix, *args])
        src = f"{cmd} {' '.join(args)}"
        if r.error is not None:
            ev.append(Evidence(src, r.error))
            return None, r.error
        if r.rc != 0:
            why = (r.stderr.strip().splitlines() or [f"exit status {r.rc}"])[-1][:200]
            ev.append(Evidence(src, f"failed: {why}"))
            return None, f"`{src}` failed: {why}"
        return r.stdout, ""

    # WireGuard: which interface holds the address, and its kind
    wg: Status
    holders: list[str] = []
    addr_text, why_addr = call("-j", "addr")
    link_text, why_link = call("-d", "-j", "link")
    if addr_text is None or link_text is None:
        wg, wg_why = "unknown", why_addr or why_link
    else:
        try:
            ifaces, kinds = parse_ip_addr(addr_text), parse_ip_link_kinds(link_text)
        except ValueError as exc:  # json.JSONDecodeError and ip_address errors are ValueErrors
            wg, wg_why = "unknown", f"could not parse ip's JSON: {exc}"
            ev.append(Evidence(f"{cmd} -j addr / -d -j link", wg_why))
        else:
            holders = sorted(n for n, a in ifaces.items() if addr in a or (
                isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped in a))
            if not holders and addr.is_loopback and "lo" in ifaces:
                holders = ["lo"]  # all of 127.0.0.0/8 is local on lo, whatever addr_info lists
            ev.append(Evidence(f"{cmd} -j addr", f"{len(ifaces)} interfaces; {addr} on "
                               f"{', '.join(holders) or ('every interface' if addr.is_unspecified else 'none')}"))
            kinds_seen = ", ".join(f"{n}={k or 'none'}" for n, k in sorted(kinds.items()))
            ev.append(Evidence(f"{cmd} -d -j link", f"kinds: {kinds_seen}"))
            if not holders and not addr.is_unspecified:
                wg, wg_why = "unknown", f"{addr} is on no interface of this host: the server cannot bind it here"
            else:
                wg, wg_why = _wireguard(addr, ifaces, kinds, holders)
    # IPsec: policies covering the address, and the SAs
    ipsec: Status
    covering: list[XfrmPolicy] = []
    sas: list[XfrmState] = []
    notes: list[str] = []
    pol_text, why_pol = call("xfrm", "policy")
    st_text, why_st = call("xfrm", "state")
    if pol_text is None or st_text is None:
        ipsec, ipsec_why = "unknown", why_pol or why_st
    else:
        try:
            policies, states = parse_xfrm_policies(pol_text), parse_xfrm_states(st_text)
        except (ValueError, KeyError) as exc:
            ipsec, ipsec_why = "unknown", f"could not parse ip xfrm output: {exc}"
            ev.append(Evidence(f"{cmd} xfrm policy / state", ipsec_why))
        else:
            ev.append(Evidence(f"{cmd} xfrm policy", f"{len(policies)} policies"))
            ev.append(Evidence(f"{cmd} xfrm state", f"{len(states)} SAs (keys not read)"))
            ipsec, ipsec_why, covering, sas, notes = _ipsec(addr, port, policies, states)
    if addr.is_loopback:
        notes.insert(0, "loopback: traffic to this address never leaves the host")
    reason = f"WireGuard: {wg} ({wg_why}); IPsec: {ipsec} ({ipsec_why})"
    return NetworkLayer(str(addr), port, tuple(holders), wg, ipsec, reason, tuple(ev), tuple(covering), tuple(sas),
                        tuple(notes))


def summarize(layer: NetworkLayer) -> str:
    """One line for reports: the address and both verdicts."""
    where = f"{layer.address}" + (f":{layer.port}" if layer.port is not None else "")
    return f"{where}: WireGuard {layer.wireguard}, IPsec {layer.ipsec}"
