"""At 80 columns (and narrower) nothing the CLI prints is cut: no ellipsis in any --help or table, and every key
id, serial, hash and option name appears whole (after undoing the folding of a narrow terminal)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import click
import pytest
import typer
from typer.testing import CliRunner

from edgeshield.cli import app
from edgeshield.cli._common import console

ELLIPSIS = ("…",)  # rich's cut mark ("[ARGS]..." in a usage line is click's notation, not a cut)


def _commands() -> Iterator[tuple[list[str], click.Command]]:
    def walk(cmd: click.Command, path: list[str]) -> Iterator[tuple[list[str], click.Command]]:
        yield path, cmd
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                yield from walk(sub, [*path, name])

    yield from walk(typer.main.get_command(app), [])


COMMANDS = list(_commands())


def _help(path: list[str], width: int) -> str:
    r = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": str(width)}, terminal_width=width)
    assert r.exit_code == 0, r.output
    return r.output


@pytest.mark.parametrize("width", [80, 60])
@pytest.mark.parametrize("path", [p for p, _ in COMMANDS], ids=lambda p: " ".join(p) or "edgeshield")
def test_help_cuts_nothing(path: list[str], width: int) -> None:
    out = _help(path, width)
    command = {tuple(p): c for p, c in COMMANDS}[tuple(path)]
    # only the ellipses the help texts themselves contain (a "…" written in a sentence), none from cutting
    texts = [command.help or "", *(getattr(p, "help", None) or "" for p in command.params)]
    if isinstance(command, click.Group):
        texts += [c.help or "" for c in command.commands.values()]
    assert out.count("…") <= sum(t.count("…") for t in texts), out
    assert max(len(line) for line in out.splitlines()) <= width
    names = [o for p in command.params for o in p.opts if o.startswith("--")]
    joined = _unfold_help(out)
    for name in names:  # every option name whole: on one line at 80, or folded across lines at 60
        assert name in (out if width == 80 else joined), (name, out)


def _unfold_help(out: str) -> str:
    """The option-name column of every panel row, lines concatenated (so a folded name reads whole again)."""
    cells = []
    for line in out.splitlines():
        tokens = line.strip().strip("│").replace("*", " ").split()
        cells.append(tokens[0] if tokens else "")
    return "".join(cells)


def test_the_longest_option_names_stay_on_one_line_at_80_columns() -> None:
    out = _help(["serve"], 80)
    for name in ("--served-watermark-evidence", "--served-watermark-rate", "--extraction-monitor"):
        assert re.search(rf"(^|\s){re.escape(name)}(\s|$)", out, re.M), out


# --- tables -----------------------------------------------------------------------------------------------------
@pytest.fixture
def at(request: pytest.FixtureRequest) -> Iterator[int]:
    """Render the CLI's console at ``request.param`` columns (the fixture's value)."""
    old = console.width
    console.width = request.param
    yield request.param
    console.width = old


def run(*args: object) -> str:
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, (r.output, r.exception)
    return r.stdout


def unfold_fields(out: str) -> dict[str, str]:
    """A key/value listing (``fields`` tables) back to its values: continuation lines (blank key) are joined."""
    values: dict[str, str] = {}
    key = None
    for line in out.splitlines():
        m = re.match(r"^(\S[^ ]*(?: [a-z]+)?)\s{2,}(\S.*?)\s*$", line) or re.match(r"^(\S+)\s+(\S.*?)\s*$", line)
        if line.startswith(" ") and key is not None and line.strip():
            values[key] += line.strip()
        elif m:
            key = m.group(1)
            values[key] = m.group(2)
    return values


def boxed_cells(out: str, starts: Callable[[list[str]], bool]) -> list[list[str]]:
    """A boxed rich table's body rows, each cell's folded lines joined; ``starts(cells)`` tells a row's first line
    (e.g. the line whose key id cell, which never wraps, is filled) from a continuation line."""
    rows: list[list[str]] = []
    for line in out.splitlines():
        if not line.startswith("│"):
            continue
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if starts(cells) or not rows:
            rows.append(cells)
        else:
            rows[-1] = [a + b for a, b in zip(rows[-1], cells, strict=False)]
    return rows


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    from edgeshield import keys
    from edgeshield.models import digits_model_path

    root = tmp_path_factory.mktemp("narrow")
    k = root / "keys"
    keys.init_keys(k)
    long_name = "gateway-in-the-far-north-warehouse-number-07"
    keys.add_device(k, long_name)
    bundle = root / "d.esb"
    out = CliRunner().invoke(app, ["protect", str(digits_model_path()), "--out", str(bundle), "--signing-key",
                                   str(k / "owner.key"), "--recipient", str(k / "device.pub"), "--recipient",
                                   str(k / f"{long_name}.pub"), "--meta", "note=" + "n" * 150, "--json"])
    assert out.exit_code == 0, out.output
    ca = root / "ca"
    run("pki", "init", ca)
    run("pki", "issue", ca, "--name", "edge-gateway-with-a-long-name-07", "--role", "server", "--server",
        "--san", "127.0.0.1")
    run("pki", "issue", ca, "--name", "alice", "--role", "operator")
    return {"root": root, "keys": k, "bundle": bundle, "long_name": long_name, "ca": ca,
            "manifest": json.loads(out.stdout)["manifest"]}


@pytest.mark.parametrize("at", [80, 50], indirect=True)
def test_keys_list_keeps_every_key_id_whole(world: dict, at: int) -> None:  # type: ignore[type-arg]
    from edgeshield import keys

    out = run("keys", "list", world["keys"])
    assert not any(e in out for e in ELLIPSIS), out
    rows = boxed_cells(out, lambda cells: bool(cells[2]))
    for info in keys.list_keys(world["keys"]):
        assert info.key_id in out  # on one line: the key id column does not wrap
        assert [info.name, info.key_id] in [[r[0], r[2]] for r in rows], rows


@pytest.mark.parametrize("at", [80, 50], indirect=True)
def test_inspect_shows_every_hash_and_id_whole(world: dict, at: int) -> None:  # type: ignore[type-arg]
    out = run("inspect", world["bundle"])
    assert not any(e in out for e in ELLIPSIS), out
    m = world["manifest"]
    shown = unfold_fields(out)
    for key in ("bundle_id", "model_sha256", "payload_sha256", "signer_key_id"):
        assert shown[key] == m[key], (key, out)
        if at == 80:  # whole on its line, not folded
            assert re.search(rf"^{key}\s+{m[key]}\s*$", out, re.M), out
    for rid in (r["key_id"] for r in m["recipients"]):
        assert re.search(rf"\s{rid}\s*$", out, re.M), out  # one recipient key id a line, never split
    assert "n" * 150 in shown["metadata"].replace(" ", "")


@pytest.mark.parametrize("at", [80, 50], indirect=True)
def test_pki_tables_keep_serials_and_fingerprints_whole(world: dict, at: int) -> None:  # type: ignore[type-arg]
    from edgeshield import transport

    certs = transport.list_certs(world["ca"])
    out = run("pki", "list", world["ca"])
    assert not any(e in out for e in ELLIPSIS), out
    rows = boxed_cells(out, lambda cells: cells[0] == "serial" or bool(re.match(r"[a-z]+ \((client|server)\)",
                                                                                 cells[1])))
    for c in certs:
        assert [c.name] in [[r[0]] for r in rows], rows
        assert ["serial", c.serial_hex] in [[r[0], r[1]] for r in rows], rows
        if at == 80:
            assert re.search(rf"│\s+{c.serial_hex}\s+│", out), out
    issued = run("pki", "issue", world["ca"], "--name", f"bob-{at}", "--role", "client")
    info = next(c for c in transport.list_certs(world["ca"]) if c.name == f"bob-{at}")
    assert not any(e in issued for e in ELLIPSIS), issued
    shown = unfold_fields(issued)
    assert shown["serial"] == info.serial_hex and shown["fingerprint"] == info.fingerprint_sha256
    revoked = run("pki", "revoke", world["ca"], "--name", f"bob-{at}")
    assert unfold_fields(revoked)["serial"] == info.serial_hex and "…" not in revoked


def test_inspect_at_80_columns_in_a_real_terminal_width(world: dict) -> None:  # type: ignore[type-arg]
    """The real thing once: a subprocess that learns its width from COLUMNS, as a terminal sets it."""
    proc = subprocess.run([sys.executable, "-m", "edgeshield", "inspect", str(world["bundle"])], capture_output=True,
                          text=True, env={**os.environ, "COLUMNS": "80"}, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert max(len(line) for line in proc.stdout.splitlines()) <= 80
    assert not any(e in proc.stdout for e in ELLIPSIS)
    for key in ("model_sha256", "payload_sha256"):
        assert world["manifest"][key] in proc.stdout


def test_tables_built_elsewhere_fold_instead_of_cutting() -> None:
    import io

    from rich.console import Console
    from rich.table import Table

    from edgeshield.cli._tables import never_cut

    t = Table()
    t.add_column("budget")
    t.add_row("max_iter=40," + "x" * 100)
    c = Console(width=40, file=io.StringIO(), record=True)
    c.print(never_cut(t))
    text = c.export_text()
    assert "…" not in text and "x" * 100 in re.sub(r"[│\s]", "", text)


@pytest.mark.parametrize("at", [80, 50], indirect=True)
def test_audit_show_keeps_every_entry_hash_and_its_data_whole(tmp_path: Path, at: int) -> None:
    from edgeshield import audit

    log = audit.AuditLog(tmp_path / "a.db", signing_key=audit.generate_signing_key(tmp_path / "a.key"))
    entries = [log.append("inference.predict", "alice", {"input_sha256": f"{i:02x}" * 32, "batch": i})
               for i in range(3)]
    log.close()
    out = run("audit", "show", tmp_path / "a.db", "--last", "5")
    assert not any(e in out for e in ELLIPSIS), out
    flat = "".join(line.strip().strip("│").replace("│", "").replace(" ", "") for line in out.splitlines())
    for e in entries:
        assert e.entry_hash.hex() in flat and e.data["input_sha256"] in flat
