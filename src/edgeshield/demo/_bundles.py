"""Demo stages for protected model bundles."""

from __future__ import annotations

from edgeshield import bundles, keys
from edgeshield.demo import DemoContext, DemoFailure, Stage
from edgeshield.errors import IntegrityError, NotARecipientError


def _keys(ctx: DemoContext) -> str:
    kdir = ctx.workdir / "keys"
    created = keys.init_keys(kdir)
    other = keys.add_device(kdir, "other-device")
    ctx.state["kdir"] = kdir
    ctx.summary["keys"] = {k.name: k.key_id for k in [*created, other]}
    return f"owner {created[0].key_id}, device {created[1].key_id} (private keys 0600)"


def _protect(ctx: DemoContext) -> str:
    from edgeshield.adversarial import METADATA_KEY
    from edgeshield.models import digits_input_spec, digits_model_path

    kdir = ctx.state["kdir"]
    out = ctx.workdir / "digits.esb"
    manifest = bundles.protect(
        digits_model_path(),
        out,
        signing_key=keys.load_owner_private_key(kdir / "owner.key"),
        recipients=[keys.load_device_public_key(kdir / "device.pub")],
        model_version=1,
        metadata={"model": "digits-mlp", "demo": "true", METADATA_KEY: digits_input_spec().to_json()},
        progress=ctx.progress,
    )
    ctx.state["bundle"] = out
    ctx.summary["bundle"] = {"bytes": out.stat().st_size, "model_sha256": manifest.model_sha256}
    return f"{out.name}: {out.stat().st_size} bytes, AES-256-GCM stream, data key wrapped for 1 device"


def _verify(ctx: DemoContext) -> str:
    manifest = bundles.verify(ctx.state["bundle"], keys.load_owner_public_key(ctx.state["kdir"] / "owner.pub"))
    ctx.summary["verified"] = True
    return f"signature and ciphertext digest check out (bundle {manifest.bundle_id}), no device key used"


def _tamper(ctx: DemoContext) -> str:
    kdir, bundle = ctx.state["kdir"], ctx.state["bundle"]
    owner = keys.load_owner_public_key(kdir / "owner.pub")
    data = bundle.read_bytes()
    rejected = []
    for label, offset in (("manifest byte", 40), ("payload byte", len(data) - 100)):
        bad = bytearray(data)
        bad[offset] ^= 0x01
        copy = ctx.workdir / "tampered.esb"
        copy.write_bytes(bytes(bad))
        try:
            bundles.verify(copy, owner)
        except IntegrityError as exc:
            rejected.append(f"{label} → {type(exc).__name__}")
        else:
            raise DemoFailure(f"a bundle with a flipped {label} was accepted")
    try:
        bundles.open_session(bundle, owner, keys.load_device_private_key(kdir / "other-device.key"))
    except NotARecipientError:
        rejected.append("other device → NotARecipientError")
    else:
        raise DemoFailure("a device that is not a recipient opened the bundle")
    ctx.summary["tamper_rejected"] = rejected
    return "; ".join(rejected)


def _run(ctx: DemoContext) -> str:
    from edgeshield.bundles._ort import onnxruntime as ort
    from edgeshield.models import DIGITS_INPUT_NAME, digits_model_path, load_digits_split

    kdir = ctx.state["kdir"]
    split = load_digits_split()
    session = bundles.open_session(
        ctx.state["bundle"],
        keys.load_owner_public_key(kdir / "owner.pub"),
        keys.load_device_private_key(kdir / "device.key"),
    )
    plain = ort.InferenceSession(str(digits_model_path()), providers=["CPUExecutionProvider"])
    acc = {}
    for name, sess in (("bundle", session), ("plain", plain)):
        pred = sess.run(None, {DIGITS_INPUT_NAME: split.x_test})[0].argmax(axis=1)
        acc[name] = float((pred == split.y_test).mean())
    ctx.summary["accuracy"] = acc | {"test_examples": len(split.y_test)}
    if acc["bundle"] != acc["plain"]:
        raise DemoFailure(f"bundle accuracy {acc['bundle']:.4f} differs from the plain model's {acc['plain']:.4f}")
    return f"accuracy {acc['bundle']:.4f} on {len(split.y_test)} test digits, equal to the plain model's"


STAGES = [
    Stage("Create owner and device keys", _keys),
    Stage("Protect the digits model", _protect),
    Stage("Verify the bundle on a gateway", _verify),
    Stage("Reject tampered bundles and foreign devices", _tamper),
    Stage("Run the test split from the bundle", _run),
]
