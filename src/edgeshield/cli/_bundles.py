"""`edgeshield protect | verify | inspect | run`: the bundle verbs."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.text import Text

from edgeshield import bundles, keys
from edgeshield._io import check_readable_file
from edgeshield.cli._common import (
    JsonOpt,
    PassphraseEnvOpt,
    console,
    emit_json,
    given,
    gradient_detector_file,
    parse_meta,
    requires,
)
from edgeshield.cli._progress import progress_bars
from edgeshield.cli._tables import fields, table
from edgeshield.errors import InvalidArgumentError, OutputExistsError

if TYPE_CHECKING:
    import numpy as np
    import torch

    from edgeshield.adversarial._smoothing import SmoothingConfig

OwnerPubOpt = Annotated[Path, typer.Option("--owner-key", help="The model owner's public key (owner.pub).")]


def _summary(manifest: bundles.Manifest) -> dict[str, Any]:
    return manifest.to_public_dict()


def _io_summary(manifest: bundles.Manifest) -> dict[str, Any] | None:
    io = bundles.model_io(manifest)
    return None if io is None else io.to_dict()


def _print_manifest(manifest: bundles.Manifest, title: str) -> None:
    """The manifest as a key/value list (hashes whole at 80 columns), then the model's inputs and outputs."""
    from edgeshield.bundles._modelio import is_reserved

    d = manifest.to_public_dict()
    rows = [(key, str(d[key])) for key in (
        "bundle_id", "created", "model_format", "model_version", "model_size", "model_sha256", "signer_key_id",
        "chunk_size", "payload_size", "payload_sha256", "aead", "key_wrap",
    )]
    rows.append(("recipients", "\n".join(manifest.recipient_key_ids)))  # one key id a line: never split
    shown = sorted((k, v) for k, v in manifest.metadata.items() if not is_reserved(k))
    rows.append(("metadata", "\n".join(f"{k}={v}" for k, v in shown) or "-"))
    console.print(fields(title, rows))
    print_model_io(bundles.model_io(manifest))


def print_model_io(io: bundles.ModelIO | None) -> None:
    """The recorded inputs and outputs as a table (names fold, never cut), or why there are none."""
    if io is None:
        console.print("inputs and outputs: not recorded (a bundle protected before EdgeShield recorded them, or "
                      "too many to fit its metadata)", markup=False)
        return
    t = table("model inputs and outputs", ("", "name", "dtype", "shape"))
    for kind, tensors in (("input", io.inputs), ("output", io.outputs)):
        for tensor in tensors:
            t.add_row(kind, Text(tensor.name), Text(tensor.dtype), Text(tensor.shape_text()))
    console.print(t)


@requires("owner")
@requires("owner", "model_signing", "OpenSSL", when=given("sigstore_sig"))
def protect(
    model: Annotated[Path, typer.Argument(help="The ONNX model to protect.")],
    out: Annotated[Path, typer.Option("--out", help="Bundle file to write (atomically).")],
    signing_key: Annotated[Path, typer.Option("--signing-key", help="The owner's private signing key (owner.key).")],
    recipient: Annotated[
        list[Path], typer.Option("--recipient", help="A device public key that may open the bundle (repeatable).")
    ],
    model_version: Annotated[int, typer.Option("--model-version", min=0, help="Monotonic model version.")] = 0,
    meta: Annotated[list[str] | None, typer.Option("--meta", help="User metadata key=value (repeatable).")] = None,
    chunk_size: Annotated[int, typer.Option("--chunk-size", help="Plaintext bytes per encrypted chunk.")] = 1 << 20,
    sigstore_sig: Annotated[
        Path | None,
        typer.Option("--sigstore-sig", help="Also write an OpenSSF model-signing signature of the plain model here."),
    ] = None,
    input_spec: Annotated[
        Path | None,
        typer.Option("--input-spec", help="Input spec JSON to store in the manifest (checked before every inference)."),
    ] = None,
    watermark_key: Annotated[
        Path | None,
        typer.Option("--watermark-key",
                     help="Embed the owner's watermark (from `watermark keygen`) before protecting."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing bundle.")] = False,
    passphrase_env: PassphraseEnvOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Encrypt MODEL for the recipient devices and sign it with the owner key."""
    passphrase = keys.passphrase_from_env(passphrase_env)
    owner = keys.load_owner_private_key(signing_key, passphrase)
    devices = [keys.load_device_public_key(p) for p in recipient]
    for target in (out, sigstore_sig):
        if target is not None and target.exists() and not force:
            raise OutputExistsError(f"{target} exists; use --force to overwrite it")
    if sigstore_sig is not None and sigstore_sig.resolve() == out.resolve():
        raise InvalidArgumentError("--sigstore-sig and --out must be different files")
    metadata = parse_meta(meta)
    if input_spec is not None:
        from edgeshield.adversarial import METADATA_KEY, InputSpec

        metadata[METADATA_KEY] = InputSpec.load(input_spec).to_json()
    with progress_bars() as progress:
        manifest = bundles.protect(
            model, out, signing_key=owner, recipients=devices, model_version=model_version,
            metadata=metadata, chunk_size=chunk_size, watermark_key=_load_watermark_key(watermark_key),
            progress=progress,
        )
    if sigstore_sig is not None:
        from edgeshield.bundles._modelsigning import sign_model

        try:
            sign_model(model, signing_key, sigstore_sig, password=passphrase)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                out.unlink()  # all or nothing: no bundle without the signature that was asked for
            raise
    if as_json:
        emit_json({"bundle": str(out), "sigstore_signature": str(sigstore_sig) if sigstore_sig else None,
                   "manifest": _summary(manifest), "model_io": _io_summary(manifest)})
        return
    console.print(f"[green]protected[/] {model} -> {out} ({out.stat().st_size} bytes)")
    if sigstore_sig is not None:
        console.print(f"model-signing signature -> {sigstore_sig}")
    _print_manifest(manifest, "manifest")


def _load_watermark_key(path: Path | None) -> bytes | None:
    if path is None:
        return None
    from edgeshield.watermark import load_key

    return load_key(path)


@requires("owner", "model_signing", "OpenSSL", when=given("sigstore_sig"))
def verify(
    bundle: Annotated[Path | None, typer.Argument(help="The bundle to verify.")] = None,
    *,
    owner_key: OwnerPubOpt,
    model: Annotated[Path | None,
                     typer.Option("--model", help="A plain model to check against --sigstore-sig.")] = None,
    sigstore_sig: Annotated[
        Path | None, typer.Option("--sigstore-sig", help="An OpenSSF model-signing signature of --model.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Check a bundle's signature and ciphertext (no device key needed), or a model-signing signature.

    Exits 0 only when everything given is authentic.
    """
    if bundle is None and model is None:
        raise InvalidArgumentError("give a BUNDLE, or --model with --sigstore-sig")
    if (model is None) != (sigstore_sig is None):
        raise InvalidArgumentError("--model and --sigstore-sig go together")
    result: dict[str, Any] = {"authentic": True}
    owner = keys.load_owner_public_key(owner_key)
    if bundle is not None:
        result["manifest"] = _summary(bundles.verify(bundle, owner))
    if model is not None and sigstore_sig is not None:
        from edgeshield.bundles._modelsigning import verify_model

        verify_model(model, sigstore_sig, owner_key)
        result["model_signature"] = str(sigstore_sig)
    if as_json:
        emit_json(result)
        return
    if bundle is not None:
        console.print(f"[green]authentic[/] {bundle}: signed by {keys.key_id(owner)}, ciphertext intact")
    if model is not None:
        console.print(f"[green]authentic[/] {model}: model-signing signature {sigstore_sig} verifies")


def inspect(
    bundle: Annotated[Path, typer.Argument(help="The bundle to describe.")],
    owner_key: Annotated[
        Path | None, typer.Option("--owner-key", help="Verify the bundle first with this owner public key.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Print a bundle's manifest (never a secret). Unverified unless --owner-key is given."""
    manifest, verified = bundles.inspect(bundle, keys.load_owner_public_key(owner_key) if owner_key else None)
    if as_json:
        emit_json({"verified": verified, "manifest": _summary(manifest), "model_io": _io_summary(manifest)})
        return
    _print_manifest(manifest, f"{bundle} ({'verified' if verified else 'NOT verified: pass --owner-key'})")


@requires("eval", "torch", "onnx", when=gradient_detector_file("detector"))
def run(
    bundle: Annotated[Path, typer.Argument(help="The bundle to run.")],
    owner_key: OwnerPubOpt,
    device_key: Annotated[Path, typer.Option("--device-key", help="This device's private key (device.key), or "
                                                                  "tpm:HANDLE / tpm:FILE (sealed in the TPM).")],
    input: Annotated[Path, typer.Option("--input", help="Input batch as a .npy file.")],  # noqa: A002 - --input
    output: Annotated[Path | None, typer.Option("--output", help="Save the raw model outputs here (.npy).")] = None,
    detector: Annotated[
        Path | None,
        typer.Option("--detector", help="Detector file from `detect calibrate`: accept, flag or reject each input."),
    ] = None,
    check_digest: Annotated[
        bool,
        typer.Option("--check-digest",
                     help="Also check the SHA-256 payload digest (pins one file even against the owner)."),
    ] = False,
    smoothing: Annotated[
        str | None,
        typer.Option("--smoothing", help="With --detector: answer by randomized smoothing and print each certified "
                                         "L2 radius, e.g. sigma=0.25,n0=100,n=1000,alpha=0.001,batch=4096."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing --output file.")] = False,
    passphrase_env: PassphraseEnvOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Verify, decrypt in memory, and run INPUT through the bundled model."""
    from edgeshield.bundles import _predict

    smoothing_config = None
    if smoothing is not None:
        from edgeshield.adversarial._smoothing import SmoothingConfig

        if detector is None:
            raise InvalidArgumentError("--smoothing needs --detector (smoothing is a robust-inference option)")
        smoothing_config = SmoothingConfig.parse(smoothing)
    check_readable_file(input, what="input")
    if output is not None:  # before any work, like protect and audit export
        if output.exists() and not force:
            raise OutputExistsError(f"{output} exists; use --force to overwrite it")
        if output.resolve() == bundle.resolve():
            raise InvalidArgumentError("--output must not be the bundle itself")
    from edgeshield.hardware._tpm import load_device_key

    device = load_device_key(device_key, keys.passphrase_from_env(passphrase_env))  # a PEM file, or tpm:...
    opened = bundles.open_bundle(bundle, keys.load_owner_public_key(owner_key), device, check_digest=check_digest)
    x = _predict.load_npy(input)
    if detector is not None:
        def torch_model() -> torch.nn.Module:
            from edgeshield.evaluation._adversarial import torch_model_for_bundle

            return torch_model_for_bundle(bundle, owner_key, device_key, passphrase_env)

        _run_robust(opened, detector, x, output, as_json, torch_model, smoothing_config,
                    verified=(keys.load_owner_public_key(owner_key), device))
        return
    from edgeshield.adversarial import InputSpec

    spec = InputSpec.from_metadata(opened.manifest.metadata)
    if spec is not None:
        spec.validate(x)
    outputs = _predict.run_batch(opened.session, x)
    labels = _predict.labels(outputs)
    if output is not None:
        _predict.save_npy(output, outputs)
    if as_json:
        emit_json({"predictions": labels, "output_shape": list(outputs.shape),
                   "output": str(output) if output else None, "bundle_id": opened.manifest.bundle_id})
        return
    console.print(f"predictions ({len(labels)}): {labels}")
    if output is not None:
        console.print(f"outputs {tuple(outputs.shape)} saved to {output}")


def _run_robust(opened: bundles.OpenBundle, detector: Path, x: np.ndarray, output: Path | None, as_json: bool,
                torch_model: Callable[[], torch.nn.Module], smoothing: SmoothingConfig | None = None,
                verified: tuple[Any, Any] | None = None) -> None:
    """Validate, score and decide; rejected (and, with smoothing, abstained) inputs get no prediction.

    ``verified`` (owner public key, device key) opens the file's composed detector graph, when it carries one, so
    one ORT run scores and predicts; without it (or without a composed graph) the numpy path runs.

    ``torch_model`` builds the PyTorch twin of the model, only called when the file's decision detector needs
    gradients (``edgeshield[eval]``); the runtime detectors need none.
    """
    import numpy as np

    from edgeshield.adversarial import DetectorFile, RobustModel
    from edgeshield.bundles import _predict

    file = DetectorFile.load(detector)
    file.check_model(opened.manifest.model_sha256)
    composed = None
    if file.composed is not None and verified is not None:
        from edgeshield.adversarial import open_composed

        composed = open_composed(file, *verified, model_sha256=opened.manifest.model_sha256)
    decisions = RobustModel(opened.session, file, smoothing=smoothing, composed=composed,
                            torch_model=torch_model() if "gradient" in file.decision_detectors() else None).predict(x)
    if output is not None:
        preds = np.array([-1 if d.prediction is None else d.prediction for d in decisions], dtype=np.int64)
        _predict.save_npy(output, preds)
    verdicts = ("accept", "flag", "reject", "abstain") if smoothing is not None else ("accept", "flag", "reject")
    counts = {k: sum(d.decision == k for d in decisions) for k in verdicts}
    if as_json:
        emit_json({"decisions": [d.to_dict() for d in decisions], "counts": counts,
                   "bundle_id": opened.manifest.bundle_id, "output": str(output) if output else None})
        return
    title = f"robust inference ({file.decision} detector, target FPR {file.target_fpr}"
    if smoothing is not None:
        title += f"; smoothing sigma={smoothing.sigma:g}, n={smoothing.n}, alpha={smoothing.alpha:g}"
    t = table(title + ")", ("#", "decision", "prediction", "score", "reject above",
                            *(("certified L2 radius",) if smoothing is not None else ())))
    for i, d in enumerate(decisions[:50]):
        style = {"accept": "green", "flag": "yellow", "reject": "red", "abstain": "magenta"}[d.decision]
        t.add_row(str(i), f"[{style}]{d.decision}[/]", "-" if d.prediction is None else str(d.prediction),
                  f"{d.score:.4g}", f"{d.threshold:.4g}", *(() if d.radius is None else (f"{d.radius:.4g}",)))
    console.print(t)
    if len(decisions) > 50:
        console.print(f"(first 50 of {len(decisions)} shown)")
    summary = f"accepted {counts['accept']}, flagged {counts['flag']}, rejected {counts['reject']}"
    console.print(summary + (f", abstained {counts['abstain']}" if smoothing is not None else ""))
