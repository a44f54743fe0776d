"""`edgeshield comply …`: compliance reports with evidence, data-subject erasure and retention purges."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from edgeshield.cli._common import JsonOpt, console, emit_json, requires
from edgeshield.cli._tables import table
from edgeshield.errors import InvalidArgumentError, OutputExistsError

if TYPE_CHECKING:
    from edgeshield.compliance import Deployment, Regulation

app = typer.Typer(help="Compliance with evidence: reports (JSON, HTML, OSCAL), data-subject erasure, retention.",
                  no_args_is_help=True)

ConfigOpt = Annotated[Path, typer.Option("--config", help="The deployment: the TOML file `edgeshield serve --config` "
                                                          "reads, with the compliance keys (docs/compliance.md).")]
MappingsOpt = Annotated[
    Path | None,
    typer.Option("--mappings", help="A directory of regulation mapping files (*.yaml) to use instead of the "
                                    "packaged ones."),
]


class ReportFormat(str, Enum):  # noqa: UP042 - a StrEnum would change what str() and format() of a member give
    json = "json"
    html = "html"
    oscal = "oscal"


def _serve_keys() -> set[str]:
    """The keys a serve config may hold: the serve command's option names (and its BUNDLE argument)."""
    import click
    import typer.main

    from edgeshield.cli import _serve

    serve_app = typer.Typer()
    serve_app.command("serve")(_serve.serve)
    command = typer.main.get_command(serve_app)
    out = set()
    for param in command.params:
        if isinstance(param, click.Argument) and param.name:
            out.add(param.name)
        out |= {opt[2:] for opt in getattr(param, "opts", ()) if opt.startswith("--")}
    return out


def _deployment(config: Path) -> Deployment:
    from edgeshield.compliance import Deployment

    return Deployment.from_toml(config, serve_keys=_serve_keys())


def _mappings(directory: Path | None) -> list[Regulation] | None:
    if directory is None:
        return None
    from edgeshield.compliance import load_mappings

    if not directory.is_dir():
        raise InvalidArgumentError(f"--mappings must be a directory of *.yaml files: {directory}")
    files = sorted(directory.glob("*.yaml"))
    if not files:
        raise InvalidArgumentError(f"no mapping files (*.yaml) in {directory}")
    return load_mappings(files)


@app.command("report")
@requires("comply", when=lambda arguments: arguments.get("fmt") == ReportFormat.oscal)
def report(
    config: ConfigOpt,
    out: Annotated[Path | None, typer.Option("--out", help="Where to write the report (JSON without it: stdout).")]
    = None,
    fmt: Annotated[ReportFormat, typer.Option("--format", help="json, html (for people) or oscal (assessment "
                                                               "results; needs edgeshield[comply]).")]
    = ReportFormat.json,
    probe_url: Annotated[
        str | None,
        typer.Option("--probe-url", metavar="URL", help="The running server (https://HOST:PORT): try a TLS 1.2 and "
                                                        "a certificate-less TLS 1.3 handshake, both must fail."),
    ] = None,
    mappings: MappingsOpt = None,
    timeout: Annotated[float, typer.Option("--timeout", min=0.1, max=60.0, help="Seconds for each probe.")] = 5.0,
    force: Annotated[bool, typer.Option("--force", help="Overwrite --out.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Judge every mapped requirement from the device's own evidence: pass, fail, not_assessed, not_applicable."""
    from edgeshield.compliance import assess, render, write_report

    if out is None and fmt is not ReportFormat.json:
        raise InvalidArgumentError(f"--format {fmt.value} needs --out PATH")
    if out is not None and out.exists() and not force:
        raise OutputExistsError(f"{out} exists; use --force to overwrite it")
    deployment = _deployment(config)
    result = assess(deployment, probe_url=probe_url, regulations=_mappings(mappings), timeout_s=timeout)
    if out is None:
        sys.stdout.write(render(result, "json").decode())
        return
    write_report(result, fmt.value, out, overwrite=force)
    if as_json:
        emit_json({"out": str(out), "format": fmt.value, "summary": result.summary})
        return
    shown = table(f"compliance report: {out} ({fmt.value})", ("regulation", "pass", "fail", "not assessed",
                                                              "not applicable"))
    for reg, counts in result.summary.items():
        shown.add_row(reg, *(str(counts[s]) for s in ("pass", "fail", "not_assessed", "not_applicable")))
    console.print(shown)


def _subject(value: str) -> str:
    if value != "-":
        return value
    line = sys.stdin.readline().rstrip("\r\n")
    if not line:
        raise InvalidArgumentError("--subject -: no subject id on standard input")
    return line


@app.command("erase")
def erase(
    config: ConfigOpt,
    subject: Annotated[str, typer.Option("--subject", metavar="ID", help="The data subject's id ('-': read it from "
                                                                         "standard input, off the shell history).")],
    as_json: JsonOpt = False,
) -> None:
    """Right to erasure: delete the subject's records from every named store and destroy its key."""
    from edgeshield.compliance import erase_subject

    deployment = _deployment(config)
    done = erase_subject(deployment, _subject(subject))
    if as_json:
        emit_json(done.to_dict())
        return
    stores = ", ".join(f"{k}: {v}" for k, v in done.stores.items())
    console.print(f"erased: {done.records} records deleted ({stores}); key "
                  f"{'destroyed' if done.key_destroyed else 'not found (no key held for that id)'}", markup=False)
    console.print(f"erasure id {done.erasure_id} (audit entry {done.audit_seq}, under checkpoint {done.checkpoint}): "
                  "give it to the requester as the receipt; it names nobody", markup=False)


@app.command("purge")
def purge(config: ConfigOpt, as_json: JsonOpt = False) -> None:
    """Apply the retention policy: delete records older than retention-days (run it on a schedule)."""
    from edgeshield.compliance import purge as run_purge

    deployment = _deployment(config)
    done = run_purge(deployment)
    if as_json:
        emit_json(done.to_dict())
        return
    stores = ", ".join(f"{k}: {v}" for k, v in done.stores.items()) or "no personal-data store configured"
    console.print(f"purged {done.records} records stored before {done.before} ({stores}); audit entry "
                  f"{done.audit_seq}", markup=False)


@app.command("checks")
def checks(mappings: MappingsOpt = None, as_json: JsonOpt = False) -> None:
    """List the checks, what evidence each looks at, and which requirements each mapping ties to them."""
    from edgeshield.compliance import CHECKS, load_mappings

    loaded = _mappings(mappings)
    regs = loaded if loaded is not None else load_mappings()
    if as_json:
        emit_json({"checks": [{"name": c.name, "title": c.title, "looks_at": c.looks_at} for c in CHECKS.values()],
                   "regulations": [r.to_dict() for r in regs]})
        return
    shown = table("checks", ("check", "what it looks at", "requirements"))
    for c in CHECKS.values():
        cited = [f"{r.regulation}:{r.id}" for reg in regs for r in reg.requirements if c.name in r.checks]
        shown.add_row(c.name, c.looks_at, ", ".join(cited) or "-")
    console.print(shown)
    for reg in regs:
        none = [r.reference for r in reg.requirements if not r.checks]
        console.print(f"{reg.id}: {len(reg.requirements)} requirements ({reg.path}); not assessed automatically: "
                      f"{', '.join(none) or 'none'}", markup=False)
