"""Demo stages for the adversarial-input defence: calibrate, then defend against real ART attacks."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeshield import bundles, keys
from edgeshield.demo import DemoContext, DemoFailure, Stage

if TYPE_CHECKING:
    from edgeshield.adversarial import Decision

TARGET_FPR = 0.02


def _open(ctx: DemoContext) -> bundles.OpenBundle:
    kdir = ctx.state["kdir"]
    return bundles.open_bundle(ctx.state["bundle"], keys.load_owner_public_key(kdir / "owner.pub"),
                               keys.load_device_private_key(kdir / "device.key"))


def _calibrate(ctx: DemoContext) -> str:
    from edgeshield.adversarial import calibrate
    from edgeshield.models import digits_input_spec, load_digits_split

    split = load_digits_split()
    opened = _open(ctx)
    half = len(split.x_test) // 2  # calibrate on one half of the held-out digits, attack the other
    file = calibrate(opened.session, split.x_test[:half], model_sha256=opened.manifest.model_sha256,
                     input_spec=digits_input_spec(), target_fpr=TARGET_FPR, reference=split.x_train)
    ctx.state.update(detector=file, session=opened.session, split=split, half=half)
    ens = file.get("ensemble")
    ctx.summary["detector"] = {d.name: {"reject_threshold": d.reject_threshold,
                                        "fpr_calibration": d.calibration["fpr_reject"]} for d in file.detectors}
    return (f"squeeze + noise + reconstruction → ensemble, thresholds for ≤ {TARGET_FPR:.0%} FPR on {half} clean "
            f"digits (calibration FPR {ens.calibration['fpr_reject']:.1%})")


def _attack_and_defend(ctx: DemoContext) -> str:
    from edgeshield.adversarial import RobustModel
    from edgeshield.adversarial._torch import onnx_to_torch
    from edgeshield.evaluation._adversarial import art_classifier

    kdir, split, half = ctx.state["kdir"], ctx.state["split"], ctx.state["half"]
    x, y = split.x_test[half:], split.y_test[half:]
    ctx.step(0, 4, "FGSM")
    model = bundles.decrypt_model(ctx.state["bundle"], keys.load_owner_public_key(kdir / "owner.pub"),
                                  keys.load_device_private_key(kdir / "device.key"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from art.attacks.evasion import FastGradientMethod, ProjectedGradientDescent

        classifier = art_classifier(onnx_to_torch(model), input_shape=(64,), nb_classes=10)
        attacked = {"FGSM ε=0.1": FastGradientMethod(classifier, eps=0.1).generate(x)}
        ctx.step(1, 4, "PGD, 40 iterations")
        attacked["PGD ε=0.1"] = ProjectedGradientDescent(classifier, eps=0.1, eps_step=0.01, max_iter=40,
                                                         verbose=False).generate(x)
    ctx.step(2, 4, "robust inference on clean digits")
    robust = RobustModel(ctx.state["session"], ctx.state["detector"])
    rows: dict[str, dict[str, Any]] = {}
    clean = robust.predict(x)
    rows["clean"] = _count(clean, np.ones(len(x), bool))
    ctx.step(3, 4, "robust inference on the attacks")
    for name, generated in attacked.items():
        xa = generated.astype(np.float32)
        fooled = robust.clf.predict(xa) != y
        decisions = robust.predict(xa)
        rows[name] = _count(decisions, fooled) | {"fooled_undefended": float(fooled.mean())}
    ctx.summary["robust_inference"] = rows
    if rows["clean"]["reject"] / len(x) > 0.1:
        raise DemoFailure("the calibrated detector rejected more than 10% of clean digits")
    _print_table(ctx, rows, len(x))
    pgd = rows["PGD ε=0.1"]
    return (f"clean: {rows['clean']['reject']}/{len(x)} rejected; PGD fooled the bare model on "
            f"{pgd['fooled_undefended']:.0%}, the detector rejected {pgd['reject_of_fooled']}/{pgd['fooled']} of those")


def _count(decisions: list[Decision], fooled: np.ndarray) -> dict[str, int]:
    verdicts = np.array([d.decision for d in decisions])
    return {"accept": int((verdicts == "accept").sum()), "flag": int((verdicts == "flag").sum()),
            "reject": int((verdicts == "reject").sum()), "fooled": int(fooled.sum()),
            "reject_of_fooled": int(((verdicts == "reject") & fooled).sum())}


def _print_table(ctx: DemoContext, rows: dict[str, dict[str, Any]], n: int) -> None:
    from rich.table import Table

    table = Table(title=f"robust inference on {n} held-out digits (ensemble detector, target FPR {TARGET_FPR:.0%})")
    for col in ("inputs", "accepted", "flagged", "rejected", "model fooled", "fooled & rejected"):
        table.add_column(col)
    for name, r in rows.items():
        fooled = "-" if name == "clean" else f"{r['fooled']}"
        caught = "-" if name == "clean" else f"{r['reject_of_fooled']}/{r['fooled']}"
        table.add_row(name, str(r["accept"]), str(r["flag"]), str(r["reject"]), fooled, caught)
    ctx.tables.append(table)


STAGES = [
    Stage("Calibrate adversarial-input detectors", _calibrate),
    Stage("Defend against ART attacks (robust inference)", _attack_and_defend),
]
