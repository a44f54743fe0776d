"""Demo stage: an extraction campaign is blocked while an honest client is served; the watermark proves ownership."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import httpx
import numpy as np

from edgeshield import bundles, keys
from edgeshield.demo import DemoContext, DemoFailure, Stage

if TYPE_CHECKING:
    from starlette.types import Receive, Scope, Send


def _extraction(ctx: DemoContext) -> str:
    from edgeshield.audit import AuditLog
    from edgeshield.extraction import PradaDetector, QueryMonitor, ResponsePolicy
    from edgeshield.models import load_digits_split
    from edgeshield.server import Rbac, ServerState, create_app
    from edgeshield.transport import Identity

    kdir = ctx.state["kdir"]
    opened = bundles.open_bundle(ctx.state["bundle"], keys.load_owner_public_key(kdir / "owner.pub"),
                                 keys.load_device_private_key(kdir / "device.key"))
    monitor = QueryMonitor([PradaDetector()], response=ResponsePolicy(on_alarm={"prada": "block"}))
    state = ServerState(session=opened.session, manifest=opened.manifest, rbac=Rbac(),
                        audit=AuditLog(ctx.workdir / "extraction-audit.db"), spec=None, monitor=monitor)
    app = create_app(state)
    split = load_digits_split()

    def client(name: str) -> httpx.AsyncClient:
        who = Identity(name=name, role="client", serial=len(name), fingerprint_sha256="00" * 32)

        async def with_identity(scope: Scope, receive: Receive, send: Send) -> None:
            # what the mTLS layer does for a verified connection (see the server stage for the real thing)
            if scope["type"] == "http":
                scope = {**scope, "extensions": {"tls": {"edgeshield.identity": who}}}
            await app(scope, receive, send)

        return httpx.AsyncClient(transport=httpx.ASGITransport(app=with_identity), base_url="https://edge")

    rng = np.random.default_rng(0)  # the attacker's synthetic queries (Papernot-style augmentation of 10 seeds)
    pool, queries = split.x_train[:10], [split.x_train[:10]]
    for _ in range(5):
        new = np.clip(pool + 0.1 * rng.choice([-1.0, 1.0], pool.shape), 0, 1)
        queries.append(new)
        pool = np.concatenate([pool, new])
    attack = np.concatenate(queries).astype(np.float32)

    async def run() -> tuple[int | None, int, int]:
        answered, blocked_at = 0, None
        async with client("mallory") as c:
            for batch in np.array_split(attack, len(attack) // 10):
                r = await c.post("/v1/predict", json={"inputs": batch.tolist()})
                if r.status_code == 403:
                    blocked_at = answered
                    break
                answered += len(batch)
        honest_ok = 0
        async with client("alice") as c:
            for batch in np.array_split(split.x_test, 45):
                honest_ok += (await c.post("/v1/predict", json={"inputs": batch.tolist()})).status_code == 200
        return blocked_at, honest_ok, 45

    blocked_at, honest_ok, honest_total = asyncio.run(run())
    if blocked_at is None or honest_ok != honest_total:
        raise DemoFailure(f"extraction defence: attacker blocked at {blocked_at}, honest {honest_ok}/{honest_total}")
    ctx.summary["extraction"] = {"attacker_blocked_after_queries": blocked_at, "honest_requests_ok": honest_ok}
    return (f"synthetic-query attacker blocked after {blocked_at} queries (PRADA); honest client: "
            f"{honest_ok}/{honest_total} requests answered")


def _watermark(ctx: DemoContext) -> str:
    from edgeshield import watermark
    from edgeshield.models import digits_model_path

    kdir = ctx.state["kdir"]
    key = watermark.generate_key(ctx.workdir / "watermark.key")
    marked = ctx.workdir / "digits-marked.esb"
    bundles.protect(digits_model_path(), marked, signing_key=keys.load_owner_private_key(kdir / "owner.key"),
                    recipients=[keys.load_device_public_key(kdir / "device.pub")], watermark_key=key)
    shipped = bundles.decrypt_model(marked, keys.load_owner_public_key(kdir / "owner.pub"),
                                    keys.load_device_private_key(kdir / "device.key"))
    ours, clean = watermark.verify(shipped, key), watermark.verify(digits_model_path().read_bytes(), key)
    if not ours.present or clean.present:
        raise DemoFailure("the watermark did not verify on the marked model, or did on the clean one")
    ctx.summary["watermark"] = {"marked_z": ours.statistic, "marked_p": ours.p_value, "clean_z": clean.statistic}
    return f"protected model: z = {ours.statistic:.1f} (p = {ours.p_value:.1e}); clean model: z = {clean.statistic:.1f}"


def _stolen_copy(ctx: DemoContext) -> str:
    """A thief with real digits spreads its queries over Sybil identities; the served watermark proves its copy."""
    from sklearn.neural_network import MLPClassifier

    from edgeshield import watermark
    from edgeshield.evaluation._extraction import Gateway, Session
    from edgeshield.extraction import QueryBudget, QueryMonitor, ResponsePolicy
    from edgeshield.models import digits_model_path, load_digits_split

    split = load_digits_split()
    key = watermark.load_key(ctx.workdir / "watermark.key")
    # 5 %: the key is fresh every run, and at 2 % a copy that forgets half its marks can fall short of p < 1e-6
    served = watermark.ServedWatermark(key, 0.05, classes=10)
    budget = 500  # above the 450 distinct digits the honest client sends
    gateway = Gateway(digits_model_path().read_bytes(), served=served,
                      evidence=watermark.EvidenceStore(ctx.workdir / "served-evidence.db"),
                      monitor=QueryMonitor([QueryBudget(budget)], response=ResponsePolicy(default="block")))
    steps = 6
    try:
        stolen_x, stolen_y, blocked = [], [], 0
        for start in (0, 600):  # each identity tries 600 distinct natural digits
            ctx.step(start // 600, steps, f"Sybil thief {start // 600 + 1} of 2 queries")
            thief = Session(gateway, f"sybil-{start // 600}")
            thief.query(split.x_train[start : start + 600])
            blocked += thief.blocked
            x, y = thief.t.arrays()
            stolen_x.append(x)
            stolen_y.append(y.argmax(axis=1))
        ctx.step(2, steps, "an honest client queries")
        honest = Session(gateway, "alice", batch=50)
        honest_answers = honest.query(split.x_test).argmax(axis=1)
        honest_ok = honest.t.answered
    finally:
        gateway.close()
    x, y = np.concatenate(stolen_x), np.concatenate(stolen_y)
    ctx.step(3, steps, "the thief trains its copy")
    copy = MLPClassifier((128, 64), max_iter=400, random_state=0).fit(x, y)  # the thief fits its answers
    ctx.step(4, steps, "an independent model is trained (the control)")
    independent = MLPClassifier((128, 64), max_iter=400, random_state=1).fit(split.x_train, split.y_train)
    ctx.step(5, steps, "the served watermark is checked")
    with watermark.EvidenceStore(ctx.workdir / "served-evidence.db", create=False) as store:
        ev_x, ev_y, _, _ = store.load()
    proof = watermark.verify_copy(copy.predict_proba, ev_x, ev_y, classes=10)
    control = watermark.verify_copy(independent.predict_proba, ev_x, ev_y, classes=10)
    fidelity = float((copy.predict(split.x_test) == honest_answers).mean())
    if blocked != 2 or honest_ok != len(split.x_test) or not proof.present or control.present:
        raise DemoFailure(f"stolen copy: {blocked}/2 identities stopped, honest client {honest_ok} answers, "
                          f"copy proven {proof.present}, independent model claimed {control.present}")
    ctx.summary["stolen_copy"] = {"stolen_answers": len(x), "identities_blocked": blocked,
                                  "copy_fidelity": fidelity, "evidence": proof.evidence, "matches": proof.matches,
                                  "p_value": proof.p_value, "independent_matches": control.matches}
    return (f"2 Sybil thieves each stopped at the {budget}-input budget, honest client served; {len(x)} answers "
            f"stolen (copy agrees {fidelity:.0%} with the victim); served watermark at {served.rate:.0%}: the copy "
            f"repeats {proof.matches}/{proof.evidence} marked answers (p = {proof.p_value:.1e}), an independent model "
            f"{control.matches}")


def _round_two(ctx: DemoContext) -> str:
    """The four ways the first extraction defence was beaten, replayed against the served app (issue 14): jittered
    Sybil copies, a thief who waits between rounds, an honest client's retakes and a camera one pixel off."""
    from sklearn.neural_network import MLPClassifier

    from edgeshield import watermark
    from edgeshield.evaluation._extraction import (
        Gateway,
        Session,
        SimulatedClock,
        build_monitor,
        honest_retakes,
        jittered,
        slow_attacker,
    )
    from edgeshield.extraction import BenignTransforms, QueryBudget
    from edgeshield.models import digits_model_path, load_digits_split

    split = load_digits_split()
    key = watermark.load_key(ctx.workdir / "watermark.key")
    served = watermark.ServedWatermark(key, 0.02, classes=10)  # the rate the evaluation proves jittered Sybils at
    clock = SimulatedClock()
    monitor = build_monitor(split.x_train, split.x_test[:225], clock=clock, x_honest=split.x_train[-300:])
    gateway = Gateway(digits_model_path().read_bytes(), served=served, monitor=monitor, clock=clock,
                      evidence=watermark.EvidenceStore(ctx.workdir / "round-two-evidence.db"))
    rng = np.random.default_rng(0)
    steps = 6
    try:
        stolen_x, stolen_y = [], []
        for i in range(4):  # four Sybil identities, 250 digits each, every digit asked three times with jitter
            ctx.step(i, steps, f"jittered Sybil thief {i + 1} of 4")
            thief = Session(gateway, f"jitter-sybil-{i}")
            mine = split.x_train[250 * i : 250 * (i + 1)]
            for start in range(0, len(mine), 50):
                chunk = mine[start : start + 50]
                votes = np.stack([thief.query(jittered(chunk, rng)).argmax(axis=1) for _ in range(3)])
                stolen_x.append(chunk)
                stolen_y.append(np.array([np.bincount(v, minlength=10).argmax() for v in votes.T]))
        budget = next(d for d in monitor.detectors if isinstance(d, QueryBudget))
        counted = int(budget.state("jitter-sybil-0").stats["distinct"])  # what the budget charged the first one
        ctx.step(4, steps, "a thief who waits: 290 new digits a day for four days")
        slow = slow_attacker(gateway, clock, split.x_train, per_day=290, days=4, seed=1)
        ctx.step(5, steps, "honest retakes and a camera one pixel off")
        held = split.x_test[225:]
        retaker = Session(gateway, "honest-retakes", batch=10)
        retaker.query(np.concatenate([honest_retakes(held[:100], 1), honest_retakes(held[:100], 2)]))
        camera = Session(gateway, "shifted-camera", batch=25)
        camera.query(BenignTransforms(image_shape=(8, 8)).shift(held, 0, 1))
    finally:
        gateway.close()
    x, y = np.concatenate(stolen_x), np.concatenate(stolen_y)
    copy = MLPClassifier((128, 64), max_iter=400, random_state=0).fit(x, y)
    with watermark.EvidenceStore(ctx.workdir / "round-two-evidence.db", create=False) as store:
        ev = store.evidence()
    proof = watermark.verify_copy(copy.predict_proba, ev.x, ev.labels, units=ev.units, classes=10)
    independent = MLPClassifier((128, 64), max_iter=400, random_state=1).fit(split.x_train, split.y_train)
    control = watermark.verify_copy(independent.predict_proba, ev.x, ev.labels, units=ev.units, classes=10)
    honest_ok = not retaker.blocked and not camera.blocked
    if counted != 250 or not proof.present or control.present or not slow.blocked or not honest_ok:
        raise DemoFailure(f"round two: budget counted {counted} of 250 jittered digits, Sybil copy proven "
                          f"{proof.present} (p {proof.p_value:.1e}), independent model claimed {control.present}, "
                          f"slow thief blocked {slow.blocked}, honest retakes/camera served "
                          f"{not retaker.blocked}/{not camera.blocked}")
    ctx.summary["extraction_round_two"] = {
        "jitter_budget_distinct": counted, "jitter_copy_units": proof.units, "jitter_copy_matches": proof.matches,
        "jitter_copy_p": proof.p_value, "independent_matches": control.matches,
        "slow_thief_blocked_after": slow.t.blocked_at,
        "honest_retakes_served": retaker.t.answered, "shifted_camera_served": camera.t.answered}
    return (f"jittered Sybils: 750 queries counted as {counted} inputs, copy proven (repeats {proof.matches} of "
            f"{proof.units} marked units, p = {proof.p_value:.1e}; an independent model {control.matches}); a thief "
            f"waiting between days blocked after {slow.t.blocked_at} answers; honest retakes ({retaker.t.answered}) "
            f"and a shifted camera "
            f"({camera.t.answered}) all served")


STAGES = [
    Stage("Block a model-extraction campaign, serve an honest client", _extraction),
    Stage("Prove ownership with the weight watermark", _watermark),
    Stage("Prove a copy stolen through the API (served watermark)", _stolen_copy),
    Stage("Beat jitter, waiting, retakes and a shifted camera (extraction defence, round two)", _round_two),
]
