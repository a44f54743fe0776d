"""`edgeshield detect …`: expose hidden outputs, calibrate detectors for a bundle, evaluate them against real
attacks."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from edgeshield import bundles, keys
from edgeshield.cli._common import JsonOpt, PassphraseEnvOpt, console, emit_json, given, listed, requires
from edgeshield.cli._progress import progress_bars
from edgeshield.cli._tables import never_cut, table
from edgeshield.errors import InvalidArgumentError, OutputExistsError

if TYPE_CHECKING:
    import numpy as np

    from edgeshield.adversarial import DetectorFile, InputSpec

app = typer.Typer(help="Adversarial-input detectors: calibrate to a target FPR, evaluate against ART attacks.",
                  no_args_is_help=True)

OwnerOpt = Annotated[Path, typer.Option("--owner-key", help="The model owner's public key (owner.pub).")]
DeviceOpt = Annotated[Path, typer.Option("--device-key", help="This device's private key (device.key), or "
                                                              "tpm:HANDLE / tpm:FILE (sealed in the TPM).")]
SpecOpt = Annotated[
    Path | None,
    typer.Option("--input-spec", help="Input spec JSON (default: the bundle's, else shape/dtype from the model "
                                      "and the value range of the clean data)."),
]


def open_with_spec(bundle: Path, owner_key: Path, device_key: Path, passphrase_env: str | None,
                   input_spec: Path | None, clean: np.ndarray | None = None) -> tuple[bundles.OpenBundle, InputSpec]:
    """Open a bundle and work out its input spec: file > bundle metadata > model + clean-data range."""
    from edgeshield.adversarial import InputSpec
    from edgeshield.hardware._tpm import load_device_key

    device = load_device_key(device_key, keys.passphrase_from_env(passphrase_env))  # a PEM file, or tpm:...
    opened = bundles.open_bundle(bundle, keys.load_owner_public_key(owner_key), device)
    if input_spec is not None:
        return opened, InputSpec.load(input_spec)
    spec = InputSpec.from_metadata(opened.manifest.metadata)
    if spec is None:
        if clean is None:
            raise InvalidArgumentError("the bundle carries no input spec: pass --input-spec")
        spec = InputSpec.from_session(opened.session, min=float(clean.min()), max=float(clean.max()))
    return opened, spec


@app.command("expose-hidden")
@requires("owner")
def expose_hidden(
    model: Annotated[Path, typer.Argument(help="The ONNX model (before `protect`).")],
    out: Annotated[Path, typer.Option("--out", help="The model with hidden outputs to write (then `protect` it).")],
    tensor: Annotated[
        list[str] | None,
        typer.Option("--tensor", help="An intermediate tensor to expose (repeatable; default: the output of each "
                                      "hidden ReLU and the input of the last Gemm/MatMul)."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing --out file.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Append hidden activations as extra model outputs for the mahalanobis and lid detectors; the logits stay
    output 0, unchanged."""
    from edgeshield._io import atomic_write_bytes, check_readable_file
    from edgeshield.adversarial._hidden import expose_hidden as expose

    data = check_readable_file(model, what="model").read_bytes()
    if out.exists() and not force:
        raise OutputExistsError(f"{out} exists; use --force to overwrite it")
    result, names = expose(data, tensor or "auto")
    atomic_write_bytes(out, result)
    if as_json:
        emit_json({"path": str(out), "hidden_outputs": names})
        return
    console.print(f"exposed {', '.join(names)} as outputs after the logits; written to {out}")


@app.command("calibrate")
@requires("eval", "torch", "onnx", when=listed("detectors", "gradient"))
@requires("owner", when=given("signing_key"))
def calibrate(
    bundle: Annotated[Path, typer.Argument(help="The protected model.")],
    owner_key: OwnerOpt,
    device_key: DeviceOpt,
    clean: Annotated[Path, typer.Option("--clean", help="Clean held-out inputs (.npy) to calibrate on.")],
    out: Annotated[Path, typer.Option("--out", help="Detector file to write (JSON, atomically).")],
    target_fpr: Annotated[float,
                          typer.Option("--target-fpr", help="Largest false-positive rate on clean data.")] = 0.02,
    flag_fpr: Annotated[float | None, typer.Option("--flag-fpr", help="FPR of the (looser) flag threshold.")] = None,
    detectors: Annotated[
        str | None,
        typer.Option("--detectors", help="Comma-separated: squeeze, noise, reconstruction, mahalanobis, lid, "
                                         "gradient (default: squeeze, noise, and reconstruction when --reference is "
                                         "given). mahalanobis and lid need a model from `detect expose-hidden`."),
    ] = None,
    reference: Annotated[
        Path | None,
        typer.Option("--reference", help="Clean reference inputs (.npy, e.g. the training set) for the "
                                         "reconstruction, mahalanobis and lid detectors."),
    ] = None,
    reference_labels: Annotated[
        Path | None,
        typer.Option("--reference-labels", help="True labels of --reference (.npy) for the mahalanobis class means "
                                                "(default: the model's predictions)."),
    ] = None,
    decision: Annotated[
        str, typer.Option("--decision", help="The detector robust inference decides with: ensemble (max over "
                                             "members), fisher (Fisher's combination of p-values) or a member.")
    ] = "ensemble",
    input_spec: SpecOpt = None,
    signing_key: Annotated[
        Path | None,
        typer.Option("--signing-key", help="The owner's private key (owner.key): also compose the model and its "
                                           "runtime detectors into one ONNX graph, sealed as a bundle signed with "
                                           "this key and bound to the model, so `serve` scores in one session run."),
    ] = None,
    recipient: Annotated[
        list[Path] | None,
        typer.Option("--recipient", help="With --signing-key: a device public key that may open the composed graph "
                                         "(repeatable; default: this device's)."),
    ] = None,
    signing_passphrase_env: Annotated[
        str | None,
        typer.Option("--signing-passphrase-env", metavar="VAR",
                     help="Environment variable holding the passphrase of --signing-key."),
    ] = None,
    passphrase_env: PassphraseEnvOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Set each detector's thresholds so that at most TARGET-FPR of clean inputs are rejected."""
    from edgeshield.adversarial import calibrate as run_calibration
    from edgeshield.bundles._predict import load_npy

    x = load_npy(clean)
    opened, spec = open_with_spec(bundle, owner_key, device_key, passphrase_env, input_spec, x)
    ref = load_npy(reference) if reference is not None else None
    ref_labels = load_npy(reference_labels) if reference_labels is not None else None
    if detectors is None:
        detectors = "squeeze,noise" + (",reconstruction" if ref is not None else "")
    names = [d.strip() for d in detectors.split(",") if d.strip()]
    torch_model = None
    if "gradient" in names:
        from edgeshield.evaluation._adversarial import torch_model_for_bundle

        torch_model = torch_model_for_bundle(bundle, owner_key, device_key, passphrase_env)
    if recipient and signing_key is None:
        raise InvalidArgumentError("--recipient goes with --signing-key")
    result = run_calibration(opened.session, x, model_sha256=opened.manifest.model_sha256, input_spec=spec,
                             target_fpr=target_fpr, flag_fpr=flag_fpr, detectors=names, torch_model=torch_model,
                             reference=ref, reference_labels=ref_labels, decision=decision)
    if signing_key is not None:
        result = _compose(result, bundle, owner_key, device_key, passphrase_env, x, signing_key, recipient or [],
                          signing_passphrase_env, opened.manifest.model_version)
    result.save(out)
    if as_json:
        summary = result.to_dict() | {"path": str(out)}
        if "composed" in summary:  # its sealed bundle stays in the file
            summary["composed"] = {k: v for k, v in summary["composed"].items() if k != "bundle"}
        emit_json(summary)
        return
    t = table(f"detectors calibrated on {len(x)} clean inputs, target FPR {target_fpr}",
              ("detector", "reject threshold", "flag threshold", "FPR (reject)", "FPR (flag)"))
    for d in result.detectors:
        t.add_row(d.name + (" (decides)" if d.name == result.decision else ""), f"{d.reject_threshold:.4g}",
                  f"{d.flag_threshold:.4g}", f"{d.calibration['fpr_reject']:.3f}", f"{d.calibration['fpr_flag']:.3f}")
    console.print(t)
    if result.composed is not None:
        console.print(f"composed into one signed graph: {', '.join(result.composed.detectors)} "
                      "(the rest runs in numpy)")
    console.print(f"written to {out}")


def _compose(result: DetectorFile, bundle: Path, owner_key: Path, device_key: Path, passphrase_env: str | None,
             clean: np.ndarray, signing_key: Path, recipients: list[Path], signing_passphrase_env: str | None,
             model_version: int) -> DetectorFile:
    """The detector file with its composed graph, sealed for ``recipients`` (default: the calibrating device)."""
    from edgeshield.adversarial._compose import compose
    from edgeshield.hardware._tpm import load_device_key

    owner = keys.load_owner_private_key(signing_key, keys.passphrase_from_env(signing_passphrase_env))
    if keys.key_id(owner.public_key()) != keys.key_id(keys.load_owner_public_key(owner_key)):
        raise InvalidArgumentError("--signing-key is not the private half of --owner-key (the bundle's signer)")
    device = load_device_key(device_key, keys.passphrase_from_env(passphrase_env))
    devices = [keys.load_device_public_key(p) for p in recipients] or [device.public_key()]
    model = bundles.decrypt_model(bundle, keys.load_owner_public_key(owner_key), device)
    return compose(result, model, clean, signing_key=owner, recipients=devices, model_version=model_version)


@app.command("evaluate")
@requires("eval")
@requires("eval", "matplotlib", when=given("out_dir"))
def evaluate(
    bundle: Annotated[Path, typer.Argument(help="The protected model.")],
    owner_key: OwnerOpt,
    device_key: DeviceOpt,
    detector: Annotated[Path, typer.Option("--detector", help="Detector file from `detect calibrate` for this model.")],
    data: Annotated[Path, typer.Option("--data", help="Clean evaluation inputs (.npy), NOT the calibration set.")],
    labels: Annotated[Path, typer.Option("--labels", help="Their true labels (.npy, 1-D integers).")],
    quick: Annotated[bool,
                     typer.Option("--quick", help="Fewer iterations, no HopSkipJump, small adaptive sweep.")] = False,
    out_dir: Annotated[
        Path | None, typer.Option("--out-dir", help="Write one ROC plot per attack here (roc_<attack>.png).")
    ] = None,
    system: Annotated[bool, typer.Option(
        "--system", help="Also evaluate the whole defended system: per input, the worst case over AutoAttack "
                         "(projected onto the spec's grid; needs torchattacks) and the adaptive sweep, at each "
                         "--budget, with 95% intervals.")] = False,
    budget: Annotated[list[str] | None, typer.Option(
        "--budget", help="With --system: a threat model norm:eps, e.g. linf:2/16 or l2:1.0 (repeatable; default "
                         "linf:1/16, linf:2/16, linf:3/16, l2:1.0).")] = None,
    smoothing: Annotated[str | None, typer.Option(
        "--smoothing", help="With --system: the system answers by randomized smoothing, e.g. sigma=0.25 (the "
                            "adaptive attack then runs EOT over its noise).")] = None,
    autoattack_iterations: Annotated[int | None, typer.Option(
        "--autoattack-iterations", min=1, max=1000,
        help="With --system: 100 runs the reference AutoAttack's iteration counts (default: torchattacks' "
             "AutoAttack, 10).")] = None,
    passphrase_env: PassphraseEnvOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Attack the bundled model with ART (FGSM, PGD, CW, DeepFool, HopSkipJump) and an adaptive attack; report
    detection rates, AUROC, measured FPR and the cost of robust inference; with --system, the whole defence's
    robust accuracy and end-to-end attack success."""
    import numpy as np

    from edgeshield.adversarial import DetectorFile
    from edgeshield.adversarial._smoothing import SmoothingConfig
    from edgeshield.bundles._predict import load_npy
    from edgeshield.evaluation._adversarial import evaluate as run_evaluation
    from edgeshield.evaluation._adversarial import jsonable, report_tables, torch_model_for_bundle
    from edgeshield.evaluation._system import BUDGETS, Budget, SuiteConfig

    if not system and (budget or smoothing is not None or autoattack_iterations is not None):
        raise InvalidArgumentError("--budget, --smoothing and --autoattack-iterations go with --system")
    budgets = tuple(Budget.parse(b) for b in budget) if budget else BUDGETS
    smoothing_config = SmoothingConfig.parse(smoothing) if smoothing is not None else None
    if system:  # before minutes of ART attacks, not after them
        from edgeshield.evaluation._autoattack import _import_torchattacks

        _import_torchattacks()
    suite = dataclasses.replace(SuiteConfig.quick() if quick else SuiteConfig(),
                                autoattack_iterations=autoattack_iterations)
    file = DetectorFile.load(detector)
    x, y = load_npy(data), load_npy(labels)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise InvalidArgumentError(f"{labels} must hold a 1-D integer array of labels, not {y.dtype} {tuple(y.shape)}")
    if len(y) != len(x):
        raise InvalidArgumentError(f"{len(x)} inputs but {len(y)} labels")
    opened, _ = open_with_spec(bundle, owner_key, device_key, passphrase_env, None, x)
    file.check_model(opened.manifest.model_sha256)
    torch_model = torch_model_for_bundle(bundle, owner_key, device_key, passphrase_env)
    with progress_bars() as progress:  # on stderr: minutes of attacks, never silent
        result = run_evaluation(opened.session, torch_model, file, x, y, quick=quick, out_dir=out_dir,
                                progress=progress)
        system_result = None
        if system:
            from edgeshield.evaluation._system import DefendedSystem, evaluate_system

            defended = DefendedSystem("system", opened.session, torch_model, file, smoothing=smoothing_config)
            system_result = evaluate_system(defended, x, y, budgets, suite=suite, progress=progress)
    if as_json:
        emit_json(jsonable(result) | ({"system": system_result.to_dict()} if system_result else {}))
        return
    for report in report_tables(result):
        console.print(never_cut(report))
    if system_result is not None:
        from edgeshield.evaluation._system import report_table

        console.print(never_cut(report_table([system_result])))
    if result["roc_png"]:
        console.print(f"ROC plots: {', '.join(result['roc_png'].values())}")
