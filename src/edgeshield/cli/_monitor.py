"""`edgeshield monitor …`: see what the security monitor sees and holds, lift its responses, check rule files.

``status``, ``lift`` (and its aliases ``unblock``, ``unthrottle``, ``undeny``, ``release``) and ``reload`` are
clients of the server's admin API over mutual TLS (an admin certificate). ``status --db`` and ``lift --db`` read
or change the monitor's database directly, for when the server is down (a lift made that way takes effect when the
server next starts). ``revocations`` exports the pending revocation requests for the CA host, and ``rules check``
/ ``rules show`` work offline on a rule file.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.text import Text

from edgeshield.cli._client import TimeoutOpt, _call, _Server, _server
from edgeshield.cli._common import JsonOpt, PassphraseEnvOpt, console, emit_json
from edgeshield.cli._tables import table
from edgeshield.errors import InvalidArgumentError

app = typer.Typer(help="The security monitor: alerts, blocks and denials, their reversal, rule files.",
                  no_args_is_help=True)
rules_app = typer.Typer(help="Check and show monitor rule files (offline).", no_args_is_help=True)
app.add_typer(rules_app, name="rules")

UrlOpt = Annotated[str | None, typer.Option("--url", help="Server URL, e.g. https://127.0.0.1:8443")]
CertOpt = Annotated[Path | None, typer.Option("--cert", help="An admin's client certificate.")]
KeyOpt = Annotated[Path | None, typer.Option("--key", help="Its private key.")]
OptCaOpt = Annotated[Path | None, typer.Option("--ca", help="CA certificate (ca.crt) the server's chains to.")]
DbOpt = Annotated[Path | None, typer.Option("--db", help="Read (or change) the monitor database directly "
                                                         "instead of asking the server.")]


def _remote(url: str | None, ca: Path | None, cert: Path | None, key: Path | None, passphrase_env: str | None,
            timeout: float) -> _Server:
    if url is None or ca is None or cert is None or key is None:
        missing = [n for n, v in (("--url", url), ("--ca", ca), ("--cert", cert), ("--key", key)) if v is None]
        raise InvalidArgumentError(f"give {', '.join(missing)} (an admin certificate for the server's admin API), "
                                   "or --db to use the monitor database directly")
    return _server(url, ca, cert, key, passphrase_env, timeout)


def _when(ts: float | None) -> str:
    if ts is None:
        return "until lifted"
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds")


# --- status ---
@app.command("status")
def status(
    url: UrlOpt = None,
    cert: CertOpt = None,
    key: KeyOpt = None,
    ca: OptCaOpt = None,
    db: DbOpt = None,
    timeout: TimeoutOpt = 10.0,
    passphrase_env: PassphraseEnvOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Alerts, responses in force and pending revocation requests (from the server, or --db)."""
    if db is not None:
        from edgeshield.monitor._store import MonitorStore

        with MonitorStore(db, create=False) as store:
            body: dict[str, Any] = {
                "enabled": True, "source": str(db),
                "alerts": list(reversed(store.recent_alerts(50))),
                "responses": [r.to_dict() for r in store.active_responses(time.time())],
                "pending_revocations": store.pending_revocations()}
    else:
        server = _remote(url, ca, cert, key, passphrase_env, timeout)
        body = _call(server, "GET", "/v1/admin/monitor").json()
    if as_json:
        emit_json(body)
        return
    if not body.get("enabled"):
        console.print("the server runs without a security monitor")
        return
    _print_status(body)


def _print_status(body: dict[str, Any]) -> None:
    alerts = table(f"alerts ({len(body.get('alerts') or [])}, newest first)", ["time", "severity", "rule", "key",
                                                                               "output"], whole=["time"])
    for a in (body.get("alerts") or [])[:30]:
        alerts.add_row(_when(a["ts"]), a["severity"], a["rule"], Text(a["key"]), Text(a["output"]))
    console.print(alerts)
    responses = table("responses in force", ["action", "target", "rule", "since", "until"], whole=["target"])
    for r in body.get("responses") or []:
        responses.add_row(r["action"], Text(r["target"]), r["rule"], _when(r["since"]), _when(r["until"]))
    console.print(responses)
    pending = table("revocation requests for the CA host", ["serial", "identity", "rule", "since"],
                    whole=["serial"])
    for p in body.get("pending_revocations") or []:
        pending.add_row(p["serial"], Text(p["identity"]), p["rule"], _when(p["since"]))
    console.print(pending)
    counters = body.get("counters")
    if counters:
        console.print(Text(", ".join(f"{k} {v}" for k, v in counters.items())))


# --- lifting ---
def _lift(action: str, target: str, url: str | None, ca: Path | None, cert: Path | None, key: Path | None,
          db: Path | None, timeout: float, passphrase_env: str | None, as_json: bool) -> None:
    from edgeshield.monitor._responses import check_target

    target = check_target(action, target)
    if db is not None:
        from edgeshield.monitor._store import MonitorStore

        with MonitorStore(db, create=False) as store:
            now = time.time()
            lifted = store.lift_response(action, target, "cli", now)
            if action == "deny_cert":
                lifted = store.cancel_revocation(target.removeprefix("serial:"), "cli", now) or lifted
        note = " (in the database: a running server keeps it until it restarts)" if lifted else ""
    else:
        server = _remote(url, ca, cert, key, passphrase_env, timeout)
        lifted = bool(_call(server, "POST", "/v1/admin/monitor/lift",
                            json={"action": action, "target": target}).json().get("lifted"))
        note = ""
    if as_json:
        emit_json({"action": action, "target": target, "lifted": lifted})
    else:
        console.print(Text(f"{action} on {target}: " + ("lifted" + note if lifted else "none in force")))


def _target(kind: str, value: str) -> str:
    return value if ":" in value and value.split(":", 1)[0] in ("identity", "address", "serial", "file") \
        else f"{kind}:{value}"


@app.command("lift")
def lift(
    action: Annotated[str, typer.Argument(help="block, throttle, deny_cert or quarantine.")],
    target: Annotated[str, typer.Argument(help="identity:NAME, address:IP, serial:HEX or file:ROLE.")],
    url: UrlOpt = None, cert: CertOpt = None, key: KeyOpt = None, ca: OptCaOpt = None, db: DbOpt = None,
    timeout: TimeoutOpt = 10.0, passphrase_env: PassphraseEnvOpt = None, as_json: JsonOpt = False,
) -> None:
    """Lift one response the monitor put in force (audited as monitor.lifted, naming you)."""
    _lift(action, target, url, ca, cert, key, db, timeout, passphrase_env, as_json)


@app.command("unblock")
def unblock(
    target: Annotated[str, typer.Argument(help="identity:NAME or address:IP (a bare name means identity:NAME).")],
    url: UrlOpt = None, cert: CertOpt = None, key: KeyOpt = None, ca: OptCaOpt = None, db: DbOpt = None,
    timeout: TimeoutOpt = 10.0, passphrase_env: PassphraseEnvOpt = None, as_json: JsonOpt = False,
) -> None:
    """Lift a block (an identity's also resets its extraction state)."""
    _lift("block", _target("identity", target), url, ca, cert, key, db, timeout, passphrase_env, as_json)


@app.command("unthrottle")
def unthrottle(
    target: Annotated[str, typer.Argument(help="identity:NAME or address:IP (a bare name means identity:NAME).")],
    url: UrlOpt = None, cert: CertOpt = None, key: KeyOpt = None, ca: OptCaOpt = None, db: DbOpt = None,
    timeout: TimeoutOpt = 10.0, passphrase_env: PassphraseEnvOpt = None, as_json: JsonOpt = False,
) -> None:
    """Lift a throttle."""
    _lift("throttle", _target("identity", target), url, ca, cert, key, db, timeout, passphrase_env, as_json)


@app.command("undeny")
def undeny(
    serial: Annotated[str, typer.Argument(help="The certificate serial, hexadecimal (serial:HEX also works).")],
    url: UrlOpt = None, cert: CertOpt = None, key: KeyOpt = None, ca: OptCaOpt = None, db: DbOpt = None,
    timeout: TimeoutOpt = 10.0, passphrase_env: PassphraseEnvOpt = None, as_json: JsonOpt = False,
) -> None:
    """Lift a certificate denial and withdraw its pending revocation request."""
    _lift("deny_cert", _target("serial", serial), url, ca, cert, key, db, timeout, passphrase_env, as_json)


@app.command("release")
def release(
    target: Annotated[str, typer.Argument(help="bundle or detector (file:ROLE also works).")],
    url: UrlOpt = None, cert: CertOpt = None, key: KeyOpt = None, ca: OptCaOpt = None, db: DbOpt = None,
    timeout: TimeoutOpt = 10.0, passphrase_env: PassphraseEnvOpt = None, as_json: JsonOpt = False,
) -> None:
    """Release a quarantine: serve the bundle or detector again (accept its new digest first)."""
    _lift("quarantine", _target("file", target), url, ca, cert, key, db, timeout, passphrase_env, as_json)


@app.command("reload")
def reload(
    url: UrlOpt = None, cert: CertOpt = None, key: KeyOpt = None, ca: OptCaOpt = None,
    timeout: TimeoutOpt = 30.0, passphrase_env: PassphraseEnvOpt = None, as_json: JsonOpt = False,
) -> None:
    """Make the server re-read its rule file (validated first: a bad one keeps the old rules) and RBAC policy."""
    server = _remote(url, ca, cert, key, passphrase_env, timeout)
    body = _call(server, "POST", "/v1/admin/monitor/reload").json()
    if as_json:
        emit_json(body)
    else:
        console.print(Text(f"reloaded {body.get('rules')} rules ({body.get('path') or 'default pack'}, sha256 "
                           f"{body.get('rules_sha256')})"))


# --- revocation requests ---
@app.command("revocations")
def revocations(
    out: Annotated[Path, typer.Option("--out", help="Where to write the JSON for the CA host.")],
    db: Annotated[Path, typer.Option("--db", help="The monitor database on the device.")],
    force: Annotated[bool, typer.Option("--force", help="Overwrite OUT if it exists.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Export the certificate revocations the monitor requested (the CA key never lives on the device)."""
    from edgeshield._io import atomic_write_bytes
    from edgeshield.monitor._store import MonitorStore

    with MonitorStore(db, create=False) as store:
        pending = store.pending_revocations()
    doc = {"format": "edgeshield-revocation-requests/v1",
           "exported": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
           "requests": pending}
    atomic_write_bytes(out, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode(), mode=0o600,
                       overwrite=force)
    if as_json:
        emit_json({"out": str(out), "requests": len(pending)})
    else:
        console.print(Text(f"{len(pending)} revocation request(s) written to {out}; on the CA host revoke each "
                           "serial (edgeshield pki revoke) and copy the new CRL to the device"))


# --- rule files ---
RuleFileArg = Annotated[Path | None, typer.Argument(help="A rule file (default: the packaged default pack).")]


@rules_app.command("check")
def rules_check(file: Annotated[Path, typer.Argument(help="The rule file to validate.")],
                as_json: JsonOpt = False) -> None:
    """Validate a rule file offline: one line naming the first problem (exit 2), or how many rules are OK."""
    from edgeshield.monitor._rules import load_rules

    rules = load_rules(file)
    if as_json:
        emit_json({"file": str(file), "rules": len(rules), "sha256": rules.sha256})
    else:
        console.print(Text(f"{len(rules)} rules OK"))


@rules_app.command("show")
def rules_show(file: RuleFileArg = None, as_json: JsonOpt = False) -> None:
    """List a rule file's rules: condition, severity, responses (tags and descriptions with --json)."""
    from edgeshield.monitor._rules import load_rules

    rules = load_rules(file)
    rows: list[dict[str, Any]] = []
    for r in rules.rules:
        c = r.condition
        rows.append({"rule": r.name, "enabled": r.enabled, "severity": r.severity, "kinds": list(c.kinds),
                     "group_by": c.group_by, "count": c.count, "window_s": c.window_s,
                     "responses": [x.action for x in r.responses], "tags": list(r.tags), "desc": r.desc})
    if as_json:
        emit_json({"file": str(file) if file else None, "sha256": rules.sha256, "rules": rows})
        return
    t = table(f"{len(rows)} rules ({file or 'default pack'})", ["rule", "severity", "when", "responses"],
              whole=["rule"])
    for row in rows:
        when = f"{row['count']} × {', '.join(row['kinds'])} per {row['group_by']} in {row['window_s']:g} s"
        name = row["rule"] + ("" if row["enabled"] else " (off)")
        t.add_row(name, row["severity"], Text(when), ", ".join(row["responses"]))
    console.print(t)

