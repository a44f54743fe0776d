"""Install EdgeShield with no extras into a fresh venv and run every device-side command there for real.

    .venv/bin/python scripts/check_device_install.py [--venv .venv-device] [--keep]

Run it with the full development venv (``make test`` / ``make device-check`` do): the owner-side inputs — a
protected bundle, the digits data as ``.npy`` files — are made with it first, since ``protect`` needs onnx and the
data scikit-learn. Then, in the fresh venv (``pip install .``, non-editable; torch, onnx, scipy, scikit-learn,
ART, matplotlib, model-signing and compliance-trestle must be absent afterwards):

* keys, pki (an admin certificate; revoke by serial and by name), audit keygen / vkey / witness keygen, verify,
  inspect, run (plain, with a detector, with --check-digest), detect calibrate, watermark keygen, monitor rules
  check / show (on rules.yaml: the packaged pack with rbac_denials at 15 denials), comply checks;
* ``serve`` with every runtime flag (``SERVE_FLAGS``, or ``SERVE_FLAGS_NOT_RUN`` with the reason; a flag in
  neither fails the check), the security monitor on, started as a real process, queried with ``client predict`` by
  an honest client past the point where PRADA's Shapiro–Wilk test runs and by a synthetic prober that PRADA must
  block (403, never 500), ``client model`` and ``client health``, a predict carrying the ``x-subject-id`` data-subject
  header; with an admin certificate: ``monitor status`` (the prober's block kept by the monitor), ``monitor lift``,
  a client tripping rbac_denials with forbidden GET /metrics until it is blocked everywhere, ``monitor unblock`` and
  the client served again, an external ``attestation.failed`` event sent through --events-socket
  (``edgeshield.monitor.send_events``) and its alert in ``monitor status``, ``monitor unthrottle`` / ``undeny`` /
  ``release`` (none in force), ``monitor reload``; then stopped with SIGTERM (exit 0);
* the alert webhook: an HTTPS receiver in this script (certificate from the run's CA, --webhook-ca) must have got
  the alerts, as JSON with the bearer token of --webhook-token-env;
* audit verify (--require-checkpoint) / show / export on the log it wrote, watermark verify-copy on the evidence it
  kept, monitor status --db / revocations on the monitor database; ``audit witness serve`` as a second process
  (serve publishes to it), ``audit publish``, ``audit verify --against/--witness``;
* on deploy.toml (this run's serve keys plus retention-days), after both servers stopped: comply report as JSON
  (its contract: a ``requirements`` list, each with regulation, id, reference, status, evidence; some pass) that
  must fail encryption_at_rest and nothing else while the owner's plaintext digits.onnx lies beside the bundle,
  then, that file removed, fail nothing; as HTML; comply erase --subject patient-1 (the key serve made for it
  destroyed), comply purge;
* a model update (``update_steps``): the owner publishes v1 and v2 to a TUF repository and the device pulls them with
  the full venv (tuf is ``[update]``); ``update init / install / status / commit / rollback`` in the device venv, a
  rollback below the committed floor refused;
* the owner, evaluation and OSCAL commands (``NEEDS_EXTRA``) must fail with one line naming the right extra.

It prints the plain install's size: the distributions ``pip list`` shows in the fresh venv (edgeshield included;
pip, setuptools and wheel not) and the MiB under its lib/.

To cover a new ``serve`` flag, add one line to ``SERVE_FLAGS`` (and the file it reads, if any, to ``FILES``); a new
device command, one ``Step`` in ``device_steps`` (``after_serve_steps`` if it reads what the server wrote,
``queries`` if it talks to the running server, ``witness_steps`` if to the witness); a new owner/eval command, one
line in ``NEEDS_EXTRA``; a check in the device venv's python (httpx, numpy), a ``Step`` with ``python=True``.
``{name}`` in an argument (and in ``FILLED_FILES``) is filled from the context (``bundle``, ``port``,
``witness_port``, ``hook_port``, ``events_socket``, ``work`` and what steps saved, e.g. ``bob_serial``,
``log_vkey``).
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ABSENT = ("torch", "onnx", "onnxscript", "scipy", "sklearn", "art", "matplotlib", "model_signing", "trestle", "flwr",
          "ray", "opendp", "dp_accounting")
BUNDLE = ["{bundle}", "--owner-key", "keys/owner.pub", "--device-key", "keys/device.key"]
TLS = ["--ca", "pki/ca.crt"]
URL = ["--url", "https://127.0.0.1:{port}"]
AS_ADMIN = [*URL, *TLS, "--cert", "pki/issued/admin.crt", "--key", "pki/issued/admin.key"]
WEBHOOK_TOKEN_ENV, WEBHOOK_TOKEN = "EDGESHIELD_CHECK_WEBHOOK_TOKEN", "check-device-install-token"
DEPLOY = ["--config", "deploy.toml"]
DEVICE_KEY = ["--device-key", "keys/device.key"]
AS_ALICE_CERT = ["--cert", "pki/issued/alice.crt", "--key", "pki/issued/alice.key"]
# serve the update directory's current slot (no bundle argument); its own audit log and port
UPDATE_SERVE = ["serve", "--update-dir", "dev", "--owner-key", "keys/owner.pub", *DEVICE_KEY, "--ca", "pki", "--cert",
                "pki/issued/edge.crt", "--key", "pki/issued/edge.key", "--audit-db", "audit-update.db",
                "--audit-key", "audit.key", "--host", "127.0.0.1", "--port", "{update_port}"]
RELOAD = """
import json, ssl, sys
import httpx
ctx = ssl.create_default_context(cafile="pki/ca.crt")
ctx.load_cert_chain("pki/issued/admin.crt", "pki/issued/admin.key")
r = httpx.post(sys.argv[1] + "/v1/admin/reload", verify=ctx, timeout=60)
if r.status_code != 200:
    sys.exit(f"reload answered {r.status_code}: {r.text}")
print(json.dumps(r.json()["new"]))
"""
PUBLISH = ["update", "repo", "publish", "repo", "--keys", "rkeys", "--owner-key", "keys/owner.pub", "--model", "digits",
           "--input-spec", "spec.json", "--bundle"]

# Every runtime flag of `serve`, one line each (a flag that takes no value: ("--flag",)).
SERVE_FLAGS: list[tuple[str, ...]] = [
    ("--ca", "pki"),
    ("--cert", "pki/issued/edge.crt"),
    ("--key", "pki/issued/edge.key"),
    ("--audit-db", "audit.db"),
    ("--audit-key", "audit.key"),
    ("--host", "127.0.0.1"),
    ("--port", "{port}"),
    ("--detector", "detector.json"),
    ("--policy", "policy.csv"),
    ("--rate-limit", "client=500:1000"),
    ("--extraction-monitor", "block"),
    ("--query-budget", "1000"),  # far above what the clients send: a block here can only come from PRADA
    ("--query-window", "3600"),
    ("--outputs", '{"policy": "top_k", "k": 3}'),
    ("--served-watermark-key", "wm.key"),
    ("--served-watermark-rate", "0.05"),
    ("--served-watermark-evidence", "evidence.db"),
    ("--extraction-state", "extraction-state.db"),  # budgets, blocks and the key registry, flushed at shutdown
    ("--decaying-budget", "5000:1000"),  # far above what the clients send (PRADA's block is the one tested)
    ("--fleet-budget", "100000"),
    ("--prada-dup-distance", "0.164"),  # digits retakes at sigma 0.01 (calibrate_dup_distance)
    ("--fleet-group", "role"),
    ("--max-monitored-clients", "1000"),
    ("--audit-durability", "normal"),
    ("--audit-commit-delay-ms", "0.2"),
    ("--max-body", "1048576"),
    ("--config", "serve.toml"),  # see FILES; the flags here override it
    ("--max-batch", "64"),
    ("--inference-timeout", "10"),
    ("--log-level", "info"),
    ("--handshake-timeout", "5"),
    ("--request-head-timeout", "5"),
    ("--body-timeout", "10"),
    ("--keep-alive", "5"),
    ("--max-connections", "64"),
    ("--max-connections-per-address", "32"),
    ("--handshake-rate", "50"),
    ("--handshake-burst", "50"),
    ("--max-connections-per-identity", "8"),
    ("--max-in-flight", "16"),
    ("--max-in-flight-per-identity", "4"),
    ("--crl-expired", "fail-closed"),
    ("--crl-warn-days", "2"),
    ("--crl-poll", "1"),
    ("--witness", "https://127.0.0.1:{witness_port}"),  # the witness runs while serve does (WITNESS)
    ("--witness-ca", "pki/ca.crt"),
    ("--witness-cert", "pki/issued/edge-device.crt"),
    ("--witness-cert-key", "pki/issued/edge-device.key"),
    ("--witness-vkey", "witness.vkey"),
    ("--witness-every", "1"),
    ("--witness-note", "serve-cosigned.note"),
    ("--monitor",),
    ("--monitor-rules", "rules.yaml"),  # the packaged pack with rbac_denials at 15 (see FILES): proves it is read
    ("--monitor-db", "monitor.db"),
    ("--webhook", "https://127.0.0.1:{hook_port}/alerts"),  # this script's receiver (WebhookReceiver)
    ("--webhook-token-env", WEBHOOK_TOKEN_ENV),  # set by clean_env(); the receiver checks the bearer token
    ("--webhook-ca", "pki/ca.crt"),
    ("--events-socket", "{events_socket}"),  # under /tmp: a Unix socket path has at most 107 bytes
    ("--watch-interval", "1"),
    ("--subject-header", "x-subject-id"),
    ("--subject-keys", "subjects.keys"),
    ("--retention-days", "30"),
]

# Flags of `serve` this check does not pass, each with the reason; any other flag missing from SERVE_FLAGS fails it.
SERVE_FLAGS_NOT_RUN: dict[str, str] = {
    "--update-dir": "run by update_steps (UPDATE_SERVE), a second serve on the update directory's slot",
    "--released-key": "needs a TPM: tests/server/test_serve_released.py serves from a released key with swtpm",
    "--tpm-keys": "with --released-key (tests/server/test_serve_released.py)",
    "--tcti": "with --released-key or a tpm: device key (tests/server/test_serve_released.py, tests/hardware)",
    "--passphrase-env": "the keys here are unencrypted (passphrases: tests/keys, tests/cli)",
    "--no-monitor": "the off switch of --monitor, which runs here (servers without a monitor: tests/compliance)",
    "--ood-reference": "needs a reference .npz of the task's inputs (FILES holds text): the OOD signal from a file is "
                       "tested in tests/server/test_extraction_state.py and tests/extraction/test_signals.py",
    "--ood-transforms": "with --ood-reference (tests/server/test_extraction_state.py)",
    "--http3-port": "needs the h3 extra (aioquic): tests/server/test_h3.py serves HTTP/3 over UDP beside TCP",
    "--ohttp": "needs the ohttp extra (pyhpke): tests/server/test_serve_ohttp.py serves it through a relay",
    "--ohttp-key": "with --ohttp, needs the ohttp extra (tests/server/test_serve_ohttp.py)",
    "--ohttp-window": "with --ohttp, needs the ohttp extra (tests/server/test_serve_ohttp.py)",
}


def _rules() -> str:
    """The packaged rule pack with rbac_denials tripping at 15 denials instead of 20: a rule file serve must read."""
    text = (ROOT / "src/edgeshield/monitor/rules/default.yaml").read_text(encoding="utf-8")
    rule = text.index("- rule: rbac_denials")
    at = text.index("    count: 20\n", rule)
    return text[:at] + f"    count: {RBAC_DENIALS}\n" + text[at + len("    count: 20\n"):]


RBAC_DENIALS = 15
# The deployment `comply` judges: the serve keys of this run (relative paths: relative to the file) and retention.
DEPLOY_TOML = """\
bundle = "digits.esb"
owner-key = "keys/owner.pub"
device-key = "keys/device.key"
ca = "pki"
cert = "pki/issued/edge.crt"
key = "pki/issued/edge.key"
audit-db = "audit.db"
audit-key = "audit.key"
policy = "policy.csv"
host = "127.0.0.1"
port = {port}
served-watermark-evidence = "evidence.db"
witness = "https://127.0.0.1:{witness_port}"
witness-note = "serve-cosigned.note"
monitor-rules = "rules.yaml"
monitor-db = "monitor.db"
subject-header = "x-subject-id"
subject-keys = "subjects.keys"
retention-days = 30
"""
# Small files the device commands read, written into the work directory first (e.g. a serve.toml for --config);
# in those of FILLED_FILES ``{name}`` is filled from the context (the ports are chosen first).
FILES: dict[str, str] = {"serve.toml": "max-body = 2097152\nlog-level = \"warning\"\n", "rules.yaml": _rules()}
FILLED_FILES: dict[str, str] = {"deploy.toml": DEPLOY_TOML}

# Owner and evaluation commands: on a plain install each must fail with one line naming this extra.
NEEDS_EXTRA: list[tuple[str, list[str]]] = [
    ("owner", ["protect", "digits.onnx", "--out", "again.esb", "--signing-key", "keys/owner.key",
               "--recipient", "keys/device.pub"]),
    ("owner", ["verify", "--model", "digits.onnx", "--sigstore-sig", "digits.sig", "--owner-key", "keys/owner.pub"]),
    ("owner", ["watermark", "embed", "digits.onnx", "--key", "wm.key", "--out", "marked.onnx"]),
    ("owner", ["watermark", "verify", "digits.onnx", "--key", "wm.key"]),
    ("eval", ["detect", "evaluate", *BUNDLE, "--detector", "detector.json", "--data", "eval.npy",
              "--labels", "eval_labels.npy", "--quick"]),
    ("eval", ["detect", "calibrate", *BUNDLE, "--clean", "clean.npy", "--detectors", "gradient",
              "--out", "gradient.json"]),
    ("eval", ["extraction", "evaluate", "--quick"]),
    ("demo", ["demo"]),
    ("update", ["update", "pull", "dev", *DEVICE_KEY]),
    ("comply", ["comply", "report", *DEPLOY, "--format", "oscal", "--out", "compliance.oscal.json"]),
]


@dataclass
class Step:
    """One command in the device venv: ``argv`` after ``edgeshield`` (``python=True``: after ``python -c``, the code
    first, not filled), the exit code it must give (None: any but 0), and a check of its output."""

    name: str
    argv: list[str]
    rc: int | None = 0
    check: Callable[[subprocess.CompletedProcess[str], dict[str, str]], None] | None = None
    python: bool = False


@dataclass
class Checker:
    work: Path
    edgeshield: Path
    context: dict[str, str] = field(default_factory=dict)
    done: int = 0

    def fill(self, argv: list[str]) -> list[str]:
        return [re.sub(r"\{(\w+)\}", lambda m: self.context[m.group(1)], a) for a in argv]

    def device(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.edgeshield), *self.fill(list(argv))], cwd=self.work, env=clean_env(),
                              capture_output=True, text=True, timeout=timeout, check=False)

    def device_python(self, code: str, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """``python -c CODE ARGV`` in the device venv (its own packages only: httpx, numpy, edgeshield)."""
        return subprocess.run([str(self.edgeshield.parent / "python"), "-I", "-c", code, *self.fill(list(argv))],
                              cwd=self.work, env=clean_env(), capture_output=True, text=True, timeout=timeout,
                              check=False)

    def run(self, step: Step) -> subprocess.CompletedProcess[str]:
        t0 = time.monotonic()
        proc = self.device_python(*step.argv) if step.python else self.device(*step.argv)
        try:
            if proc.returncode != step.rc and not (step.rc is None and proc.returncode != 0):
                raise CheckFailed(f"exit {proc.returncode}, expected {'non-zero' if step.rc is None else step.rc}")
            if "Traceback" in proc.stderr:
                raise CheckFailed("printed a traceback")
            if step.check is not None:
                step.check(proc, self.context)
        except CheckFailed as exc:
            argv = ["python -c CODE", *self.fill(step.argv[1:])] if step.python else self.fill(step.argv)
            raise CheckFailed(f"{step.name}: {exc}\n  argv: {argv}\n  stdout: {proc.stdout[-2000:]}"
                              f"\n  stderr: {proc.stderr[-2000:]}") from None
        self.ok(step.name, t0)
        return proc

    def ok(self, name: str, t0: float) -> None:
        self.done += 1
        print(f"  ok  {name} ({time.monotonic() - t0:.1f} s)", flush=True)


class CheckFailed(Exception):
    pass


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["ORT_DISABLE_TELEMETRY"] = "1"
    env["COLUMNS"] = "200"
    env[WEBHOOK_TOKEN_ENV] = WEBHOOK_TOKEN  # serve --webhook-token-env names it
    return env


def sh(*cmd: object, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=clean_env(), capture_output=True, text=True,
                          timeout=timeout, check=False)
    if proc.returncode != 0:
        raise CheckFailed(f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                          f"{proc.stderr[-3000:]}")
    return proc


# --- 1. the fresh venv --------------------------------------------------------------------------------------------
def make_venv(venv: Path) -> Path:
    t0 = time.monotonic()
    if venv.exists():
        shutil.rmtree(venv)
    sh(sys.executable, "-m", "venv", venv)
    py = venv / "bin" / "python"
    sh(py, "-m", "pip", "install", "--quiet", str(ROOT), cwd=ROOT)  # no extras, not editable
    found = sh(py, "-c", "import importlib.util as u, sys; "
                         f"print(' '.join(m for m in {ABSENT!r} if u.find_spec(m)))").stdout.split()
    expect(not found, f"a plain install pulled in {found}")
    where = sh(py, "-c", "import edgeshield; print(edgeshield.__file__)", cwd=venv).stdout.strip()
    expect(Path(where).resolve().is_relative_to(venv.resolve()), f"edgeshield imported from {where}, not the venv")
    size = sum(f.stat().st_size for f in (venv / "lib").rglob("*") if f.is_file()) / 2**20
    listed = json.loads(sh(py, "-m", "pip", "list", "--format", "json", "--disable-pip-version-check").stdout)
    dists = [d["name"] for d in listed if d["name"].lower() not in ("pip", "setuptools", "wheel")]
    print(f"  ok  fresh venv, pip install . (no extras): none of {', '.join(ABSENT)}; {len(dists)} distributions "
          f"(edgeshield included, pip not), {size:.0f} MiB installed ({time.monotonic() - t0:.1f} s)", flush=True)
    return venv / "bin" / "edgeshield"


# --- 2. owner-side inputs, made with the full venv -----------------------------------------------------------------
def owner_inputs(work: Path) -> None:
    """The protected bundle and data files a device receives; needs onnx and scikit-learn (this interpreter's)."""
    t0 = time.monotonic()
    code = """
import json, shutil, numpy as np
from edgeshield.models import digits_input_spec, digits_model_path, load_digits_split
s = load_digits_split()
np.save("clean.npy", s.x_test[:150]); np.save("reference.npy", s.x_train)
np.save("input.npy", s.x_test[150:170]); np.save("eval.npy", s.x_test[170:230])
np.save("eval_labels.npy", s.y_test[170:230])
for i in range(3):  # an honest client: distinct real digits
    np.save(f"honest{i}.npy", s.x_test[230 + 40 * i:270 + 40 * i])
# a synthetic prober: one digit with two pixels moved two grey levels, as in Jacobian-style extraction (steps
# beyond --prada-dup-distance: PRADA ignores queries within it of an earlier one, see docs/extraction.md's limits)
seed = s.x_test[0]
probes = np.repeat(seed[None], 80, axis=0)
for j in range(80):
    for p in ((3 * j) % 64, (3 * j + 1) % 64):
        probes[j, p] = probes[j, p] + 2 / 16 if probes[j, p] <= 1 - 2 / 16 else probes[j, p] - 2 / 16
np.save("probe0.npy", probes[:40]); np.save("probe1.npy", probes[40:])
shutil.copy(digits_model_path(), "digits.onnx")
open("spec.json", "w").write(digits_input_spec().to_json())
"""
    sh(sys.executable, "-c", code, cwd=work)
    sh(sys.executable, "-m", "edgeshield", "protect", "digits.onnx", "--out", "digits.esb", "--signing-key",
       "keys/owner.key", "--recipient", "keys/device.pub", "--input-spec", "spec.json", cwd=work)
    shutil.copy(ROOT / "src/edgeshield/server/policy/policy.csv", work / "policy.csv")
    print(f"  ok  owner side (full venv): protected digits.esb, clean/reference/input .npy "
          f"({time.monotonic() - t0:.1f} s)", flush=True)


# --- 3. device commands -------------------------------------------------------------------------------------------
def save_json(key: str, path: str) -> Callable[[subprocess.CompletedProcess[str], dict[str, str]], None]:
    """A check that stores ``json[path]`` (dotted) of the command's --json output as ``{key}``."""

    def check(proc: subprocess.CompletedProcess[str], ctx: dict[str, str]) -> None:
        value = json.loads(proc.stdout)
        for part in path.split("."):
            value = value[part]
        ctx[key] = str(value)

    return check


def json_has(test: Callable[[Any], bool], what: str) -> Callable[[subprocess.CompletedProcess[str], dict[str, str]],
                                                                      None]:
    """A check that the command's JSON output passes ``test`` (``what`` says what it looks for)."""

    def check(proc: subprocess.CompletedProcess[str], ctx: dict[str, str]) -> None:
        try:
            doc = json.loads(proc.stdout)
            ok = bool(test(doc))
        except (ValueError, LookupError, TypeError) as exc:
            raise CheckFailed(f"JSON output lacks {what}: {type(exc).__name__}: {exc}") from None
        expect(ok, f"JSON output lacks {what}: {json.dumps(doc, separators=(',', ':'))[:3000]}")

    return check


def contains(*needles: str) -> Callable[[subprocess.CompletedProcess[str], dict[str, str]], None]:
    def check(proc: subprocess.CompletedProcess[str], ctx: dict[str, str]) -> None:
        for needle in needles:
            expect(needle in proc.stdout + proc.stderr, f"output lacks {needle!r}")

    return check


def device_steps() -> list[Step]:
    return [
        Step("keys device", ["keys", "device", "keys", "--name", "gateway-7"]),
        Step("keys list", ["keys", "list", "keys", "--json"], check=contains("gateway-7", "owner", "device")),
        Step("verify", ["verify", "{bundle}", "--owner-key", "keys/owner.pub"], check=contains("authentic")),
        Step("inspect", ["inspect", "{bundle}", "--owner-key", "keys/owner.pub", "--json"],
             check=contains('"verified": true')),
        Step("run", ["run", *BUNDLE, "--input", "input.npy", "--output", "out.npy", "--json"],
             check=contains('"predictions"')),
        Step("run --check-digest --force", ["run", *BUNDLE, "--input", "input.npy", "--output", "out.npy", "--force",
                                            "--check-digest"]),
        Step("detect calibrate", ["detect", "calibrate", *BUNDLE, "--clean", "clean.npy", "--reference",
                                  "reference.npy", "--out", "detector.json"]),
        Step("run --detector", ["run", *BUNDLE, "--input", "input.npy", "--detector", "detector.json", "--json"],
             check=contains('"decisions"')),
        Step("watermark keygen", ["watermark", "keygen", "wm.key"]),
        Step("pki init", ["pki", "init", "pki"]),
        Step("pki issue (server)", ["pki", "issue", "pki", "--name", "edge", "--role", "server", "--server",
                                    "--san", "127.0.0.1"]),
        Step("pki issue (honest client)", ["pki", "issue", "pki", "--name", "alice", "--role", "client"]),
        Step("pki issue (prober)", ["pki", "issue", "pki", "--name", "mallory", "--role", "client"]),
        Step("pki issue (to revoke)", ["pki", "issue", "pki", "--name", "bob", "--role", "client", "--json"],
             check=save_json("bob_serial", "serial")),
        Step("pki revoke", ["pki", "revoke", "pki", "--serial", "{bob_serial}", "--reason", "key-compromise"]),
        Step("pki issue (to revoke by name)", ["pki", "issue", "pki", "--name", "carol", "--role", "client"]),
        Step("pki revoke --name", ["pki", "revoke", "pki", "--name", "carol"]),
        Step("pki issue (device, to the witness)", ["pki", "issue", "pki", "--name", "edge-device", "--role",
                                                    "client"]),
        Step("pki issue (witness)", ["pki", "issue", "pki", "--name", "witness", "--role", "server", "--server",
                                     "--san", "127.0.0.1"]),
        Step("pki issue (admin)", ["pki", "issue", "pki", "--name", "admin", "--role", "admin"]),
        Step("pki issue (client to trip the monitor)", ["pki", "issue", "pki", "--name", "eve", "--role", "client"]),
        Step("pki issue (webhook receiver)", ["pki", "issue", "pki", "--name", "hook", "--role", "server",
                                              "--server", "--san", "127.0.0.1"]),
        Step("pki crl", ["pki", "crl", "pki"]),
        Step("pki list", ["pki", "list", "pki", "--json"], check=contains("revoked", "alice")),
        Step("audit keygen", ["audit", "keygen", "audit.key"]),
        Step("audit vkey", ["audit", "vkey", "audit.pub", "--json"], check=save_json("log_vkey", "vkey")),
        Step("audit witness keygen", ["audit", "witness", "keygen", "witness.key", "--name", "witness.test/w1"]),
        Step("monitor rules check", ["monitor", "rules", "check", "rules.yaml", "--json"],
             check=json_has(lambda d: d["rules"] >= 20, "20 rules or more")),
        Step("monitor rules show", ["monitor", "rules", "show", "rules.yaml", "--json"],
             check=json_has(lambda d: any(r["rule"] == "rbac_denials" and r["count"] == RBAC_DENIALS
                                          for r in d["rules"]), f"rbac_denials at {RBAC_DENIALS}")),
        Step("monitor rules show (default pack)", ["monitor", "rules", "show"], check=contains("attestation_failed")),
        Step("probe --json", ["probe", "--json"],
             check=json_has(lambda d: {"sgx", "tdx", "sev", "trustzone", "tpm", "secure_boot", "ima", "hwrng",
                                       "listening"} <= set(d) and all(v["status"] in ("present", "absent", "unknown")
                                                                      for v in d.values()), "nine features")),
        Step("comply checks", ["comply", "checks", "--json"],
             check=json_has(lambda d: len(d["checks"]) >= 5 and len(d["regulations"]) >= 5, "checks, regulations")),
    ]


def client(name: str, batch: str, rc: int | None = 0, check=None, port: str = "port") -> Step:  # type: ignore[no-untyped-def]
    return Step(f"client predict ({name}, {batch})",
                ["client", "predict", "--url", f"https://127.0.0.1:{{{port}}}", *TLS, "--cert",
                 f"pki/issued/{name}.crt", "--key", f"pki/issued/{name}.key", "--input", batch, "--json"], rc=rc,
                check=check)


def queries() -> list[Step]:
    blocked = contains("blocked")
    return [
        # 40 distinct digits each: from the second request on, PRADA holds > 30 distances and runs Shapiro–Wilk
        *(client("alice", f"honest{i}.npy", check=contains('"decisions"')) for i in range(3)),
        client("mallory", "probe0.npy", rc=4, check=blocked),  # W of near-equal distances: blocked (403)
        # from then on the monitor's extraction_blocked rule holds the block, before PRADA sees the request
        client("mallory", "probe1.npy", rc=4, check=contains("refused by the security monitor")),
        client("alice", "honest0.npy", check=contains('"decisions"')),  # the honest client is still served
        Step("client model", ["client", "model", "--url", "https://127.0.0.1:{port}", *TLS, "--cert",
                              "pki/issued/alice.crt", "--key", "pki/issued/alice.key", "--json"]),
        Step("client health", ["client", "health", "--url", "https://127.0.0.1:{port}", *TLS, "--cert",
                               "pki/issued/alice.crt", "--key", "pki/issued/alice.key"]),
        client("bob", "input.npy", rc=None),  # revoked before the server started: refused
        Step("predict about a data subject (x-subject-id)", [SUBJECT_PREDICT, "https://127.0.0.1:{port}",
                                                             "honest1.npy"], python=True),
        # PRADA blocked mallory; the extraction_blocked rule keeps that block, persisted, until an admin lifts it
        Step("monitor status (admin, --json)", ["monitor", "status", *AS_ADMIN, "--json"],
             check=json_has(lambda d: d["enabled"] and any(a["rule"] == "extraction_blocked" for a in d["alerts"])
                            and any(r["target"] == "identity:mallory" for r in d["responses"]),
                            "extraction_blocked alert and block on identity:mallory")),
        Step("monitor lift block identity:mallory", ["monitor", "lift", "block", "identity:mallory", *AS_ADMIN,
                                                     "--json"], check=contains('"lifted": true')),
        Step(f"{RBAC_DENIALS} RBAC denials (eve: GET /metrics) trip rbac_denials: blocked",
             [TRIP_RBAC, "https://127.0.0.1:{port}", str(RBAC_DENIALS)], python=True),
        Step("monitor status (eve blocked)", ["monitor", "status", *AS_ADMIN, "--json"],
             check=json_has(lambda d: any(a["rule"] == "rbac_denials" and a["key"] == "identity:eve"
                                          for a in d["alerts"])
                            and any(r["action"] == "block" and r["target"] == "identity:eve" for r in d["responses"]),
                            "rbac_denials alert and block on identity:eve")),
        client("eve", "honest2.npy", rc=4, check=contains("security monitor")),  # blocked on every endpoint
        Step("monitor unblock eve", ["monitor", "unblock", "eve", *AS_ADMIN], check=contains("lifted")),
        client("eve", "honest2.npy", check=contains('"decisions"')),  # served again
        Step("external event on --events-socket (attestation.failed)", [SEND_EVENT, "{events_socket}"],
             python=True),
        Step("monitor status (attestation_failed alert)", ["monitor", "status", *AS_ADMIN],
             check=contains("attestation_failed", "gateway-9")),
        Step("monitor unthrottle (none in force)", ["monitor", "unthrottle", "alice", *AS_ADMIN],
             check=contains("none in force")),
        Step("monitor undeny (none in force)", ["monitor", "undeny", "{bob_serial}", *AS_ADMIN],
             check=contains("none in force")),
        Step("monitor release (none in force)", ["monitor", "release", "bundle", *AS_ADMIN],
             check=contains("none in force")),
        Step("monitor reload", ["monitor", "reload", *AS_ADMIN, "--json"],
             check=json_has(lambda d: d["rules"] >= 20 and d["path"].endswith("rules.yaml"), "the reloaded rules")),
    ]


# Code run with the device venv's python (httpx and numpy come with a plain install); arguments after the code.
_MTLS = """
import json, ssl, sys, httpx
def client(name):
    ctx = ssl.create_default_context(cafile="pki/ca.crt")
    ctx.load_cert_chain(f"pki/issued/{name}.crt", f"pki/issued/{name}.key")
    return httpx.Client(base_url=sys.argv[1], verify=ctx, timeout=10)
"""
SUBJECT_PREDICT = _MTLS + """
with client("alice") as c:
    r = c.post("/v1/predict", content=open(sys.argv[2], "rb").read(),
               headers={"content-type": "application/x-npy", "x-subject-id": "patient-1"})
print(r.status_code, r.text[:300])
sys.exit(0 if r.status_code == 200 and "decisions" in r.json() else 1)
"""
TRIP_RBAC = _MTLS + """
n, codes = int(sys.argv[2]), []
with client("eve") as c:
    for _ in range(n):
        r = c.get("/metrics")  # the client role may not read /metrics: 403 from RBAC
        codes.append(r.status_code)
        ok = r.status_code == 403 and "security monitor" not in r.text
        if not ok:
            sys.exit(f"denial {len(codes)}: {r.status_code} {r.text[:200]}")
    r = c.get("/v1/model")  # allowed to a client, but eve is blocked now
print(codes, r.status_code, r.text[:200])
sys.exit(0 if r.status_code == 403 and "security monitor" in r.text else 1)
"""
SEND_EVENT = """
import json, sys
from edgeshield.monitor import send_events
replies = send_events(sys.argv[1], [{"kind": "attestation.failed", "actor": "gateway-9", "source": "keyrelease",
                                     "data": {"device": "gateway-9", "reason": "measurement mismatch"}}])
print(json.dumps(replies))
sys.exit(0 if replies and replies[0].get("ok") else 1)
"""


def update_steps(c: Checker) -> list[Step | Callable[[], None]]:
    """A model update on the device: the owner (full venv) publishes v1 then v2 to a TUF repository of plain files and
    the device pulls with ``[update]``'s tuf (full venv too: a plain install must refuse ``update pull``, see
    NEEDS_EXTRA); ``update init / install / status / commit / rollback`` run in the device venv, and a rollback below
    the committed floor is refused (exit 3)."""

    def owner(*argv: str) -> subprocess.CompletedProcess[str]:
        return sh(sys.executable, "-m", "edgeshield", *c.fill(list(argv)), cwd=c.work)

    def publish_v1() -> None:
        t0 = time.monotonic()
        for v in (1, 2):
            owner("protect", "digits.onnx", "--out", f"u{v}.esb", "--signing-key", "keys/owner.key", "--recipient",
                  "keys/device.pub", "--input-spec", "spec.json", "--model-version", str(v))
        c.context["tuf_root"] = json.loads(owner("update", "repo", "init", "repo", "--keys", "rkeys",
                                                 "--json").stdout)["root"]
        owner(*PUBLISH, "u1.esb")
        c.ok("update repo init / publish v1 (owner, full venv)", t0)

    def pull(version: int) -> Callable[[], None]:
        def step() -> None:
            t0 = time.monotonic()
            if version > 1:
                owner(*PUBLISH, f"u{version}.esb")
            staged = json.loads(owner("update", "pull", "dev", *DEVICE_KEY, "--json").stdout)["staged"]
            expect(staged["model_version"] == version, f"pulled {staged}, expected version {version}")
            c.ok(f"update pull v{version} (tuf, full venv)", t0)

        return step

    def version_served(n: int) -> Step:
        return Step(f"client model (serving v{n})", ["client", "model", "--url", "https://127.0.0.1:{update_port}",
                                                     *TLS, *AS_ALICE_CERT, "--json"],
                    check=json_has(lambda d: d["model_version"] == n, f"model_version {n}"))

    def serve_the_slot() -> None:  # serve --update-dir at v1; v2 installed while it serves, then a reload
        run_service(c, "serve --update-dir", UPDATE_SERVE, "update_port", [
            version_served(1),
            pull(2),
            Step("update install v2 (while serving)", ["update", "install", "dev", *DEVICE_KEY, "--json"],
                 check=json_has(lambda d: d["status"]["pending"] is True, "a pending v2")),
            Step("POST /v1/admin/reload (admin)", [RELOAD, "https://127.0.0.1:{update_port}"], python=True,
                 check=contains('"model_version": 2')),
            version_served(2),
            client("alice", "input.npy", port="update_port"),
        ])

    floor = lambda n: json_has(lambda d: d["floor"]["floor"] == n, f"floor {n}")  # noqa: E731
    return [
        publish_v1,
        Step("update init", ["update", "init", "dev", "--root", "{tuf_root}", "--owner-key", "keys/owner.pub",
                             "--model", "digits", "--url", "file://{work}/repo"]),
        pull(1),
        Step("update install v1", ["update", "install", "dev", *DEVICE_KEY, "--json"]),
        Step("update commit v1", ["update", "commit", "dev", *DEVICE_KEY, "--json"],
             check=json_has(lambda d: d["floor"] == 1, "floor 1")),
        serve_the_slot,
        Step("update status", ["update", "status", "dev", *DEVICE_KEY, "--json"], check=floor(1)),
        Step("update rollback (to v1, not committed past)", ["update", "rollback", "dev", *DEVICE_KEY, "--json"],
             check=json_has(lambda d: d["current"]["model_version"] == 1, "v1 current")),
        Step("update rollback (back to v2)", ["update", "rollback", "dev", *DEVICE_KEY, "--json"]),
        Step("update commit v2", ["update", "commit", "dev", *DEVICE_KEY, "--json"],
             check=json_has(lambda d: d["floor"] == 2, "floor 2")),
        Step("update rollback below the floor refused", ["update", "rollback", "dev", *DEVICE_KEY], rc=3,
             check=contains("below the floor")),
    ]


def after_serve_steps() -> list[Step]:
    return [
        Step("audit verify", ["audit", "verify", "audit.db", "--checkpoint-key", "audit.pub", "--require-checkpoint",
                              "--json"]),
        Step("audit show", ["audit", "show", "audit.db", "--last", "500", "--json"],
             check=contains("extraction.blocked", "\"prada\"", "server.startup")),
        Step("audit export", ["audit", "export", "audit.db", "--out", "audit.jsonl"]),
        Step("watermark verify-copy", ["watermark", "verify-copy", "digits.onnx", "--evidence", "evidence.db",
                                       "--json"], check=contains('"present"')),
        Step("monitor status --db", ["monitor", "status", "--db", "monitor.db", "--json"],
             check=json_has(lambda d: {"rbac_denials", "attestation_failed", "extraction_blocked"}
                            <= {a["rule"] for a in d["alerts"]} and not d["responses"],
                            "the three alerts, every block lifted")),
        Step("monitor revocations", ["monitor", "revocations", "--db", "monitor.db", "--out", "revocations.json",
                                     "--json"], check=json_has(lambda d: d["requests"] == 0, "0 requests")),
    ]


def comply_steps(work: Path) -> list[Step | Callable[[], None]]:
    """On the deployment (deploy.toml) after the server and the witness stopped."""

    def remove_plaintext_model() -> None:
        (work / "digits.onnx").unlink()  # the owner's, made here for the owner commands; a device never holds it

    return [
        # this work directory plays the owner too: the plaintext model beside the bundle must fail encryption at rest
        Step("comply report (json) flags the owner's plaintext digits.onnx",
             ["comply", "report", *DEPLOY, "--format", "json", "--out", "compliance-owner.json"],
             check=report_contract("compliance-owner.json", failing={"encryption_at_rest"})),
        remove_plaintext_model,
        Step("comply report (json)", ["comply", "report", *DEPLOY, "--format", "json", "--out", "compliance.json",
                                      "--json"], check=report_contract("compliance.json")),
        Step("comply report (html)", ["comply", "report", *DEPLOY, "--format", "html", "--out", "compliance.html"],
             check=lambda proc, ctx: expect(Path(ctx["work"], "compliance.html").read_text().startswith(
                 "<!DOCTYPE html>"), "compliance.html is not an HTML page")),
        Step("comply erase --subject patient-1", ["comply", "erase", *DEPLOY, "--subject", "patient-1", "--json"],
             check=json_has(lambda d: d["key_destroyed"] is True, "key_destroyed: true")),
        Step("comply purge", ["comply", "purge", *DEPLOY, "--json"], check=contains('"records"')),
    ]


def report_contract(out: str, failing: set[str] | frozenset[str] = frozenset()) -> Callable[
        [subprocess.CompletedProcess[str], dict[str, str]], None]:
    """The JSON report OUT: a ``requirements`` list, each with regulation, id, reference, status and evidence; some
    pass, and the checks that fail are exactly ``failing`` (none: this deployment is meant to comply)."""

    def check(proc: subprocess.CompletedProcess[str], ctx: dict[str, str]) -> None:
        doc = json.loads(Path(ctx["work"], out).read_text())
        reqs = doc.get("requirements")
        expect(isinstance(reqs, list) and len(reqs) > 0, "no requirements list")
        for r in reqs:
            expect({"regulation", "id", "reference", "status", "evidence"} <= set(r), f"requirement lacks keys: {r}")
            expect(r["status"] in ("pass", "fail", "not_assessed", "not_applicable"), f"status {r['status']!r}")
        expect(any(r["status"] == "pass" for r in reqs), "no requirement passes")
        failed = {c["check"]: c.get("reason") for c in doc["checks"] if c["status"] == "fail"}
        expect(set(failed) == set(failing), f"checks failing: {failed}, expected {sorted(failing) or 'none'}")

    return check


# The witness (another host in real life; here 127.0.0.1), run from the same plain install.
WITNESS = ["audit", "witness", "serve", "--signing-key", "witness.key", "--db", "witness.db", "--tls-cert",
           "pki/issued/witness.crt", "--tls-key", "pki/issued/witness.key", "--client-ca", "pki", "--log", "{log_vkey}",
           "--host", "127.0.0.1", "--port", "{witness_port}"]
AS_ALICE = ["--ca", "pki/ca.crt", "--cert", "pki/issued/alice.crt", "--key", "pki/issued/alice.key"]


def witness_steps() -> list[Step]:
    url = "https://127.0.0.1:{witness_port}"
    return [
        Step("audit publish", ["audit", "publish", "audit.db", "--witness", url, "--checkpoint-key", "audit.pub",
                               *AS_ALICE, "--witness-key", "witness.vkey", "--out", "cosigned.note"]),
        Step("audit verify --against", ["audit", "verify", "audit.db", "--checkpoint-key", "audit.pub",
                                        "--against", "cosigned.note", "--witness-key", "witness.vkey"]),
        Step("audit verify --against (serve --witness's note)", ["audit", "verify", "audit.db", "--checkpoint-key",
             "audit.pub", "--against", "serve-cosigned.note", "--witness-key", "witness.vkey"]),
        Step("audit verify --witness", ["audit", "verify", "audit.db", "--checkpoint-key", "audit.pub",
                                        "--witness", url, *AS_ALICE, "--witness-key", "witness.vkey"]),
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def unexercised_serve_flags() -> list[str]:
    """`serve` options (from the CLI itself) that neither SERVE_FLAGS, BUNDLE nor SERVE_FLAGS_NOT_RUN covers."""
    import typer.main

    from edgeshield.cli import app

    command = typer.main.get_command(app).commands["serve"]  # type: ignore[attr-defined]
    options = {o for p in command.params for o in [*p.opts, *p.secondary_opts] if o.startswith("--")} - {"--help"}
    covered = {f[0] for f in SERVE_FLAGS} | {a for a in BUNDLE if a.startswith("--")} | set(SERVE_FLAGS_NOT_RUN)
    return sorted(options - covered)


def run_service(c: Checker, name: str, argv: list[str], port: str,
                steps: Sequence[Step | Callable[[], None]]) -> str:
    """Start ``edgeshield ARGV`` as a real process on a free port (``{port}``), wait until it listens, run ``steps``
    (a ``Step``, or a callable for a nested service) against it, stop it with SIGTERM (it must exit 0); returns its
    log."""
    t0 = time.monotonic()
    c.context.setdefault(port, str(free_port()))  # main chooses some first: deploy.toml names them
    path = c.work / f"{name.replace(' ', '-')}.log"
    with path.open("w") as log:
        proc = subprocess.Popen([str(c.edgeshield), *c.fill(argv)], cwd=c.work, env=clean_env(), stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while True:
                expect(proc.poll() is None, f"{name} exited {proc.returncode} at start-up:\n{tail(path)}")
                with socket.socket() as sock:
                    if sock.connect_ex(("127.0.0.1", int(c.context[port]))) == 0:
                        break
                expect(time.monotonic() < deadline, f"{name} not listening after 60 s:\n{tail(path)}")
                time.sleep(0.2)
            c.ok(f"{name} listening", t0)
            for step in steps:
                c.run(step) if isinstance(step, Step) else step()
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=30)
            expect(rc == 0, f"{name} exited {rc} on SIGTERM:\n{tail(path)}")
            c.ok(f"{name} stopped by SIGTERM, exit 0", t0)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return path.read_text()


def serve_and_query(c: Checker) -> None:
    argv = ["serve", *BUNDLE] + [a for flag in SERVE_FLAGS for a in flag]
    log = run_service(c, f"serve with {len(SERVE_FLAGS)} flags", argv, "port", queries())
    answers = re.findall(r'HTTP/[\d.]+\\?" (\d{3})', log)  # uvicorn's access log, one line per request
    expect("200" in answers and "403" in answers, f"no access-log lines for the requests:\n{log[-3000:]}")
    expect("500" not in answers, f"the server answered 500:\n{log[-3000:]}")


class WebhookReceiver:
    """The alert webhook's far end: HTTPS on 127.0.0.1 with the ``hook`` certificate of this run's CA (serve checks
    it with --webhook-ca), keeping what each POST brought."""

    def __init__(self, work: Path) -> None:
        received: list[tuple[str, str, bytes]] = []
        self.received = received

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                received.append((self.path, self.headers.get("authorization") or "", body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(work / "pki/issued/hook.crt", work / "pki/issued/hook.key")
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def check(self, c: Checker) -> None:
        """Every alert the server raised reached it, as JSON, with the bearer token from --webhook-token-env."""
        t0 = time.monotonic()
        alerts = []
        for path, auth, body in self.received:
            expect(path == "/alerts", f"webhook POST to {path}")
            expect(auth == f"Bearer {WEBHOOK_TOKEN}", "webhook POST without the bearer token")
            alerts.append(json.loads(body))
        rules = {a.get("labels", {}).get("alertname") for a in alerts}
        expect({"rbac_denials", "attestation_failed", "extraction_blocked"} <= rules,
               f"the webhook got alerts for {sorted(map(str, rules))}")
        c.ok(f"webhook receiver got {len(alerts)} alerts ({', '.join(sorted(map(str, rules)))}) with the token", t0)


def tail(path: Path) -> str:
    return path.read_text()[-3000:] if path.exists() else "(no log)"


def needs_extra(c: Checker) -> None:
    for extra, argv in NEEDS_EXTRA:
        t0 = time.monotonic()
        proc = c.device(*argv)
        lines = proc.stderr.strip().splitlines()
        hint = f"pip install 'edgeshield[{extra}]'"
        expect(proc.returncode != 0 and len(lines) == 1 and hint in lines[0] and proc.stdout == "",
               f"`{' '.join(argv[:2])}` on a plain install: exit {proc.returncode}, stdout {proc.stdout[-500:]!r}, "
               f"stderr {proc.stderr[-1000:]!r}; expected one line naming {hint}")
        c.ok(f"{' '.join(a for a in argv[:2] if not a.startswith('{'))} refused: needs [{extra}]", t0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, default=ROOT / ".venv-device", help="Where to create the fresh venv.")
    parser.add_argument("--keep", action="store_true", help="Keep the work directory (printed) for inspection.")
    args = parser.parse_args(argv)
    import importlib.util

    if importlib.util.find_spec("onnx") is None or importlib.util.find_spec("sklearn") is None:
        print("check_device_install: run me with the full development venv (.venv/bin/python): the owner-side "
              "inputs need onnx and scikit-learn", file=sys.stderr)
        return 2
    missing = unexercised_serve_flags()
    if missing:
        print(f"device install check FAILED: serve flags not exercised: {', '.join(missing)}; add each to "
              "SERVE_FLAGS in scripts/check_device_install.py (one line: the flag and a value that works)",
              file=sys.stderr)
        return 1
    start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="edgeshield-device-"))
    sockets = Path(tempfile.mkdtemp(prefix="es-", dir="/tmp"))  # short: a Unix socket path has at most 107 bytes
    print(f"device install check (work dir {work})", flush=True)
    receiver: WebhookReceiver | None = None
    try:
        c = Checker(work, make_venv(args.venv.resolve()))
        c.context.update(bundle="digits.esb", work=str(work), events_socket=str(sockets / "events.sock"),
                         port=str(free_port()), witness_port=str(free_port()))
        for name, text in FILES.items():
            (work / name).write_text(text)
        for name, text in FILLED_FILES.items():
            (work / name).write_text(c.fill([text])[0])
        c.run(Step("keys init", ["keys", "init", "keys"]))
        owner_inputs(work)
        for step in device_steps():
            c.run(step)
        for item in update_steps(c):
            c.run(item) if isinstance(item, Step) else item()
        receiver = hook = WebhookReceiver(work)
        c.context["hook_port"] = str(hook.port)
        # the witness first: serve publishes its checkpoints to it (--witness), and the audit steps check them there
        run_service(c, "audit witness serve", WITNESS, "witness_port",
                    [lambda: serve_and_query(c), lambda: hook.check(c), *after_serve_steps(), *witness_steps()])
        needs_extra(c)
        for item in comply_steps(work):
            c.run(item) if isinstance(item, Step) else item()
    except (CheckFailed, subprocess.TimeoutExpired) as exc:
        print(f"device install check FAILED: {exc}", file=sys.stderr)
        print(f"(work dir kept: {work})", file=sys.stderr)
        return 1
    finally:
        if receiver is not None:
            receiver.close()
        shutil.rmtree(sockets, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(f"device install check OK: {c.done} steps, {time.monotonic() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
