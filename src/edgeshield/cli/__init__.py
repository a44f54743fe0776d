"""The `edgeshield` command: a thin Typer layer over the library.

Every ``EdgeShieldError`` becomes one line on stderr and its documented exit code (1 general, 2 usage or bad
input, 3 integrity or authenticity, 4 key error); usage errors exit 2. Set ``EDGESHIELD_DEBUG=1`` to see the
traceback of an unexpected failure.
"""

from __future__ import annotations

import os
import sys

import click
import typer

from edgeshield import __version__
from edgeshield.cli import (
    _attest,
    _audit,
    _bundles,
    _client,
    _comply,
    _detect,
    _extraction,
    _fl,
    _help,
    _keys,
    _monitor,
    _pki,
    _probe,
    _relay,
    _serve,
    _tpm,
    _train,
    _update,
    _watermark,
)
from edgeshield.cli._common import err_console, requires
from edgeshield.errors import EXIT_GENERAL, EXIT_INPUT, EdgeShieldError

_help.install()  # --help never cuts an option name, however narrow the terminal

app = typer.Typer(
    name="edgeshield",
    help="Secure AI models on edge devices: signed, encrypted model bundles served from memory.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(_keys.app, name="keys")
app.add_typer(_detect.app, name="detect")
app.add_typer(_audit.app, name="audit")
app.add_typer(_pki.app, name="pki")
app.add_typer(_watermark.app, name="watermark")
app.add_typer(_extraction.app, name="extraction")
app.add_typer(_client.app, name="client")
app.add_typer(_monitor.app, name="monitor")
app.add_typer(_comply.app, name="comply")
app.add_typer(_fl.app, name="fl")
app.add_typer(_tpm.app, name="tpm")
app.add_typer(_update.app, name="update")
app.add_typer(_attest.app, name="attest")
app.add_typer(_train.app, name="train")
app.command("serve", context_settings={"auto_envvar_prefix": _serve.ENV_PREFIX})(_serve.serve)
app.command("protect")(_bundles.protect)
app.command("verify")(_bundles.verify)
app.command("inspect")(_bundles.inspect)
app.command("run")(_bundles.run)
app.command("probe")(_probe.probe)
app.command("relay")(_relay.relay)


@app.command("demo")
@requires("demo")
def demo(
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    workdir: str | None = typer.Option(None, "--workdir", help="Keep the demo's files here instead of a temp dir."),
) -> None:
    """Run the end-to-end demo on the bundled digits model."""
    from edgeshield.demo import run_demo

    run_demo(as_json=as_json, workdir=workdir)


@app.command("version")
def version() -> None:
    """Print the EdgeShield version."""
    print(__version__)


def _fail(message: str, code: int) -> int:
    err_console.print(f"edgeshield: error: {message}", markup=False, highlight=False)
    return code


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns (and exits with) the process status."""
    try:
        rc = app(args=argv, standalone_mode=False, prog_name="edgeshield")
        code = rc if isinstance(rc, int) else 0
    except EdgeShieldError as exc:
        code = _fail(str(exc) or type(exc).__name__, exc.exit_code)
    except click.exceptions.UsageError as exc:
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        code = _fail(exc.format_message().replace("\n", " ") + hint, EXIT_INPUT)
    except click.exceptions.Abort:
        code = _fail("aborted", EXIT_GENERAL)
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except KeyboardInterrupt:
        code = _fail("interrupted", 130)
    except Exception as exc:  # a bug, not a user error: still one line unless asked for the traceback
        if os.environ.get("EDGESHIELD_DEBUG"):
            raise
        code = _fail(f"internal error: {type(exc).__name__}: {exc} (set EDGESHIELD_DEBUG=1 for a traceback)",
                     EXIT_GENERAL)
    if argv is None:
        sys.exit(code)
    return code


if __name__ == "__main__":
    main()
