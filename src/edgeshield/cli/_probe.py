"""`edgeshield probe`: what this device really has (TEEs, TPM, Secure Boot, IMA, RNG, exposure), with evidence."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.text import Text

from edgeshield.cli._common import JsonOpt, console, emit_json
from edgeshield.cli._tables import table

_STYLE = {"present": "green", "absent": "yellow", "unknown": "magenta"}


def _value(v: Any) -> str:
    if v is None:
        return "unknown"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (list, tuple)):
        return ", ".join(map(_value, v)) if v else "none"
    if isinstance(v, dict):
        return ", ".join(f"{k}={_value(x)}" for k, x in v.items()) if v else "none"
    return str(v)


def _detail(name: str, detail: dict[str, Any]) -> str:
    if name == "listening":
        sockets = detail.get("sockets") or []
        mgmt = detail.get("management_interfaces") or []
        return f"{detail.get('exposed', 0)} of {len(sockets)} exposed" + (f"; management: {', '.join(mgmt)}"
                                                                          if mgmt else "")
    return "\n".join(f"{k}: {_value(v)}" for k, v in detail.items())


def probe(
    as_json: JsonOpt = False,
    root: Annotated[Path, typer.Option("--root", metavar="DIR",
                                       help="Probe the system tree under DIR instead of / (a copied or fake tree).")]
    = Path("/"),
    management_interface: Annotated[
        list[str] | None,
        typer.Option("--management-interface", metavar="IF",
                     help="A management interface (e.g. eth1): sockets bound only to it are not counted as exposed. "
                          "Repeatable."),
    ] = None,
    address: Annotated[
        str | None,
        typer.Option("--address", metavar="HOST:PORT",
                     help="The serving address: report whether it sits on a WireGuard interface or is covered by "
                          "IPsec policies (from `ip addr`, `ip link`, `ip xfrm`; on this live system, not --root)."),
    ] = None,
) -> None:
    """Report TEEs (SGX, TDX, SEV, OP-TEE), TPM, Secure Boot, IMA, hardware RNG and listening sockets, each
    present, absent or unknown with the evidence read; it reports, it does not attest."""
    from edgeshield.hardware._netprobe import probe_network_layer
    from edgeshield.hardware._probe import probe as run_probe

    network = probe_network_layer(address) if address is not None else None
    report = run_probe(root, management_interface or ())
    data = report.to_dict()
    features = list(report.features())
    if network is not None:
        data["network_layer"] = network.to_dict()
        features.append(("network_layer", network.to_finding()))
    if as_json:
        emit_json(data)
        return
    t = table(f"hardware probe of {report.root}", ("feature", "status", "detail", "evidence"), whole=("status",))
    for name, finding in features:
        d = data[name]
        shown = {k: v for k, v in d.items() if k not in ("status", "reason", "evidence")
                 and (finding.status != "absent" or v not in (None, [], {}, False))}  # JSON has them all
        detail = _detail(name, shown)
        evidence = "\n".join(f"{e.source}: {e.observed}" for e in finding.evidence)
        t.add_row(Text(name), Text(finding.status, style=_STYLE[finding.status]),
                  Text(f"{finding.reason}\n{detail}".strip()), Text(evidence))
    console.print(t)
    sockets = data["listening"]["sockets"]
    if sockets:
        s = table("listening sockets", ("proto", "address", "port", "exposed", "process", "why"),
                  whole=("proto", "port"))
        for sock in sockets:
            procs = sock["processes"]
            who = "unknown" if procs is None else ", ".join(f"{p['name'] or '?'} ({p['pid']})" for p in procs)
            s.add_row(*(Text(c) for c in (sock["protocol"], sock["address"], str(sock["port"]),
                                          _value(sock["exposed"]), who, sock["why"])))
        console.print(s)
