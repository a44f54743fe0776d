"""The version floor in a TPM NV monotonic counter, and its NV certification, against real software TPMs.

Every attack is mounted for real with owner or lockout auth: undefining and redefining the counter (as a counter,
as an ordinary index holding zeros), TPM2_Clear, a tampered or replayed certification, another index's public area,
a certification of part of the counter, a TPM state restored from a snapshot, and kill -9 in the middle of a raise.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import select
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import edgeshield.hardware._attest as at
from edgeshield.errors import InvalidArgumentError, OutputExistsError
from edgeshield.hardware._nvfloor import (
    COUNTER_ATTRIBUTES,
    DEFAULT_FLOOR_INDEX,
    FloorJumpError,
    TpmCounterFloor,
    parse_index,
)
from edgeshield.hardware._swtpm import SoftwareTPM
from edgeshield.updates import Floor, FloorStateError, FloorViolationError

_indices = iter(range(0x01800100, 0x018003FF))


def new_index() -> int:
    """A fresh NV index on the module's shared TPM (tests there must not share one)."""
    return next(_indices)


@contextmanager
def esys(tcti: str) -> Iterator[tuple[Any, Any]]:
    """A raw ESAPI context: what an attacker with the TPM's owner (or lockout) auth uses."""
    t = at._pytss()
    ctx = t.ESAPI(tcti)
    try:
        yield ctx, t
    finally:
        ctx.close()


def undefine(tcti: str, index: int) -> None:
    with esys(tcti) as (ctx, t):
        ctx.nv_undefine_space(ctx.tr_from_tpmpublic(index), t.ESYS_TR.OWNER)


def define(tcti: str, index: int, attributes: int = COUNTER_ATTRIBUTES, size: int = 8, *,
           increment: bool = False, write: bytes | None = None) -> None:
    with esys(tcti) as (ctx, t):
        pub = t.TPM2B_NV_PUBLIC(nvPublic=t.TPMS_NV_PUBLIC(nvIndex=index, nameAlg=t.TPM2_ALG.SHA256,
                                                          attributes=attributes, dataSize=size))
        handle = ctx.nv_define_space(b"", pub)
        if increment:
            ctx.nv_increment(handle)
        if write is not None:
            ctx.nv_write(handle, write)


ORDINARY = at.NV_AUTHWRITE | at.NV_AUTHREAD | at.NV_OWNERREAD | at.NV_NO_DA  # TPM_NT_ORDINARY: freely writable


@dataclasses.dataclass
class Device:
    sw: SoftwareTPM
    keys: at.DeviceKeys
    ak: at.TpmPublic

    def tpm(self) -> at.DeviceTpm:
        return at.DeviceTpm(self.sw.tcti)


@pytest.fixture(scope="module")
def device(swtpm_module: SoftwareTPM) -> Device:
    with at.DeviceTpm(swtpm_module.tcti) as d:
        keys = d.create_keys()
    return Device(swtpm_module, keys, at.parse_public(keys.ak_public))


# --- NV certification (the verifier's side, against the TPM's own structures) ------------------------------------
def test_nv_certification_proves_the_counter_value(device: Device) -> None:
    index = new_index()
    floor = TpmCounterFloor.create(index, tcti=device.sw.tcti, floor=7)
    nonce = b"fresh nonce 0123"
    with device.tpm() as d:
        nv_public, attest, sig = d.certify_nv_counter(device.keys, nonce, index)
        _, tpm_name = d.ctx.nv_read_public(d.ctx.tr_from_tpmpublic(index))
    assert nv_public == floor.nv_public()
    assert at.nv_name(nv_public) == bytes(tpm_name)  # the name the TPM itself computes
    assert at.verify_nv_counter(nv_public, attest, sig, device.ak, nonce) == 7
    assert at.parse_attest(attest).type == at.ST_ATTEST_NV == 0x8014
    floor.raise_to(9)
    with device.tpm() as d:
        assert at.verify_nv_counter(*d.certify_nv_counter(device.keys, b"n2", index), device.ak, b"n2") == 9


def test_nv_certification_attacks_are_refused(device: Device, swtpm: SoftwareTPM) -> None:
    index, other = new_index(), new_index()
    TpmCounterFloor.create(index, tcti=device.sw.tcti, floor=5)
    TpmCounterFloor.create(other, tcti=device.sw.tcti, floor=9)
    nonce = b"nonce"
    with device.tpm() as d:
        nv_public, attest, sig = d.certify_nv_counter(device.keys, nonce, index)
        other_public = d.nv_public(other)
        quote = d.quote(device.keys, nonce, [0])
    with pytest.raises(at.NonceMismatchError):  # a replayed certification answers an older nonce
        at.verify_nv_counter(nv_public, attest, sig, device.ak, b"another nonce")
    with pytest.raises(at.NvCertifyError, match="another index"):  # claims the higher counter's public area
        at.verify_nv_counter(other_public, attest, sig, device.ak, nonce)
    tampered = attest[:-1] + bytes([attest[-1] ^ 0x40])  # the counter value's last byte
    with pytest.raises(at.QuoteSignatureError):
        at.verify_nv_counter(nv_public, tampered, sig, device.ak, nonce)
    with pytest.raises(at.QuoteFormatError, match="not an NV certification"):
        at.verify_nv_counter(nv_public, quote.attest, quote.signature, device.ak, nonce)
    with at.DeviceTpm(swtpm.tcti) as stranger:  # another TPM's AK signs a certification of its own counter
        keys = stranger.create_keys()
        TpmCounterFloor.create(index, tcti=swtpm.tcti, floor=5)
        _, s_attest, s_sig = stranger.certify_nv_counter(keys, nonce, index)
    with pytest.raises(at.QuoteSignatureError):
        at.verify_nv_counter(nv_public, s_attest, s_sig, device.ak, nonce)
    with pytest.raises(at.NvCertifyError, match="malformed"):
        at.verify_nv_counter(nv_public + b"\x00", attest, sig, device.ak, nonce)


def test_an_ordinary_index_or_part_of_a_counter_is_not_a_floor(device: Device) -> None:
    ordinary, counter = new_index(), new_index()
    define(device.sw.tcti, ordinary, ORDINARY, write=(0).to_bytes(8, "big"))
    TpmCounterFloor.create(counter, tcti=device.sw.tcti, floor=3)
    with device.tpm() as d:
        pub, attest, sig = d.certify_nv_counter(device.keys, b"n", ordinary)  # the TPM certifies any index
        with pytest.raises(at.NvCertifyError, match="not a monotonic counter"):
            at.verify_nv_counter(pub, attest, sig, device.ak, b"n")
        t = d._t
        ak = d._load(device.keys.ak_public, device.keys.ak_private)
        handle = d.ctx.tr_from_tpmpublic(counter)
        try:  # certify only the high 4 bytes: all zeros, a "floor" of 0
            part, part_sig = d.ctx.nv_certify(ak, handle, b"n", t.TPMT_SIG_SCHEME(scheme=t.TPM2_ALG.NULL), 4, 0)
        finally:
            d.ctx.flush_context(ak)
        with pytest.raises(at.NvCertifyError, match="whole 8-byte"):
            at.verify_nv_counter(d.nv_public(counter), bytes(part), bytes(part_sig.marshal()), device.ak, b"n")


def test_nv_certification_checks_the_clock_against_the_last_seen(device: Device) -> None:
    index = new_index()
    TpmCounterFloor.create(index, tcti=device.sw.tcti)
    with device.tpm() as d:
        evidence = d.certify_nv_counter(device.keys, b"n", index)
        clock = d.read_clock()
    assert clock.clock >= at.parse_attest(evidence[1]).clock.clock
    later = dataclasses.replace(clock, clock=clock.clock + 10_000)
    with pytest.raises(at.TpmRollbackError):
        at.verify_nv_counter(*evidence, device.ak, b"n", last=later)


def test_read_clock_moves_forward_with_the_quote_counters(device: Device) -> None:
    with device.tpm() as d:
        first = d.read_clock()
        quote = d.quote(device.keys, b"n", [0])
        time.sleep(0.02)
        second = d.read_clock()
    quoted = at.parse_attest(quote.attest).clock
    assert first.clock <= quoted.clock <= second.clock and second.clock > first.clock
    assert (second.reset_count, second.restart_count) == (quoted.reset_count, quoted.restart_count)


def test_nv_lookups_refuse_what_is_not_an_nv_index(device: Device) -> None:
    with device.tpm() as d:
        with pytest.raises(InvalidArgumentError):
            d.certify_nv_counter(device.keys, b"n", 0x81000001)
        with pytest.raises(at.TpmUnavailableError, match="defined"):
            d.certify_nv_counter(device.keys, b"n", 0x01BFFFFE)
    with pytest.raises(InvalidArgumentError):
        TpmCounterFloor(0x81000001)
    assert parse_index("0x0180E5F1") == DEFAULT_FLOOR_INDEX
    with pytest.raises(InvalidArgumentError):
        parse_index("tpm")


# --- release labels ---------------------------------------------------------------------------------------------
def test_release_label_without_extra_is_unchanged() -> None:
    old = hashlib.sha256(b"EdgeShield key release v1\x00" + b"bundle-1\x00" + b"nonce").hexdigest()
    assert at.release_label("bundle-1", b"nonce") == b"ESrel1 " + old[:56].encode() + b"\x00"
    assert at.release_label("bundle-1", b"nonce", extra=b"") == at.release_label("bundle-1", b"nonce")


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40), st.binary(min_size=1, max_size=64), st.binary(max_size=64), st.binary(max_size=64))
def test_release_labels_bind_every_input(bundle_id: str, nonce: bytes, extra: bytes, extra2: bytes) -> None:
    label = at.release_label(bundle_id, nonce, extra)
    assert len(label) <= 64 and label.endswith(b"\x00") and label[:-1].isascii() and b"\x00" not in label[:-1]
    if extra != extra2:
        assert label != at.release_label(bundle_id, nonce, extra2)
    if extra:  # moving bytes between the nonce and the extra data gives another label
        assert label != at.release_label(bundle_id, nonce + extra[:1], extra[1:])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=120))
def test_nv_parsers_raise_only_typed_errors(data: bytes) -> None:
    for fn in (at.parse_nv_public, at.nv_name, at.parse_attest):
        with suppress(at.QuoteFormatError):
            fn(data)
    nv_attest = (at.TPM_GENERATED.to_bytes(4, "big") + at.ST_ATTEST_NV.to_bytes(2, "big") + b"\x00\x00" * 2
                 + bytes(17) + bytes(8) + data)
    with suppress(at.QuoteFormatError):
        at.parse_attest(nv_attest)


# --- the floor ----------------------------------------------------------------------------------------------------
def test_the_floor_rises_never_falls_and_survives_a_reboot(swtpm: SoftwareTPM) -> None:
    floor = TpmCounterFloor.create(tcti=swtpm.tcti)
    assert isinstance(floor, Floor)
    assert floor.read() == 1 and floor.created_above is None  # a counter reads 1 at the least once written
    floor.raise_to(4)
    floor.raise_to(4)
    assert floor.read() == 4
    with pytest.raises(FloorViolationError):
        floor.raise_to(3)
    with pytest.raises(FloorJumpError, match="at most 1024"):
        floor.raise_to(4 + 1025)
    assert floor.read() == 4  # nothing written
    with pytest.raises(OutputExistsError):
        TpmCounterFloor.create(tcti=swtpm.tcti)
    d = floor.describe()
    assert d["kind"] == "tpm-nv-counter" and d["index"] == "0x0180e5f1" and d["floor"] == 4
    assert d["name"] == at.nv_name(floor.nv_public()).hex()
    with esys(swtpm.tcti) as (ctx, t):
        ctx.shutdown(t.TPM2_SU.CLEAR)
    swtpm.restart()
    assert TpmCounterFloor(tcti=swtpm.tcti).read() == 4


def test_undefining_and_redefining_the_counter_cannot_lower_the_floor(swtpm: SoftwareTPM) -> None:
    floor = TpmCounterFloor.create(tcti=swtpm.tcti)
    floor.raise_to(5)
    undefine(swtpm.tcti, DEFAULT_FLOOR_INDEX)  # owner auth (empty on this TPM, as on many devices)
    with pytest.raises(FloorStateError, match="not defined"):
        floor.read()  # missing is never floor 0
    define(swtpm.tcti, DEFAULT_FLOOR_INDEX)  # redefined, never incremented: cannot be read at all
    with pytest.raises(FloorStateError, match="never incremented"):
        floor.read()
    undefine(swtpm.tcti, DEFAULT_FLOOR_INDEX)
    define(swtpm.tcti, DEFAULT_FLOOR_INDEX, increment=True)  # the TPM starts it above every counter it held
    assert floor.read() >= 5
    undefine(swtpm.tcti, DEFAULT_FLOOR_INDEX)
    define(swtpm.tcti, DEFAULT_FLOOR_INDEX, ORDINARY, write=bytes(8))  # an ordinary index holding zeros
    with pytest.raises(FloorStateError, match="not a monotonic counter"):
        floor.read()
    with pytest.raises(FloorStateError):
        floor.raise_to(7)
    undefine(swtpm.tcti, DEFAULT_FLOOR_INDEX)
    again = TpmCounterFloor.create(tcti=swtpm.tcti, floor=0)  # re-provisioning: the floor starts above 5, said so
    assert again.read() > 5 and again.created_above == again.read()


def test_tpm2_clear_cannot_lower_the_floor(swtpm: SoftwareTPM, caplog: pytest.LogCaptureFixture) -> None:
    TpmCounterFloor.create(tcti=swtpm.tcti).raise_to(6)
    with esys(swtpm.tcti) as (ctx, t):
        ctx.clear(t.ESYS_TR.LOCKOUT)  # lockout auth: removes every owner index
    with pytest.raises(FloorStateError, match="not defined"):
        TpmCounterFloor(tcti=swtpm.tcti).read()
    again = TpmCounterFloor.create(tcti=swtpm.tcti, floor=2)
    assert again.read() >= 6 and again.created_above is not None
    assert "above the floor asked" in caplog.text


def test_a_restored_software_tpm_state_does_lower_it(swtpm: SoftwareTPM) -> None:
    """The limit docs/updates.md states: whoever holds a software TPM's state files (a vTPM's host) can put an
    older state back. The TPM clock goes back with it, which a verifier's last-seen clock check catches."""
    floor = TpmCounterFloor.create(tcti=swtpm.tcti)
    snap = swtpm.snapshot()
    floor.raise_to(8)
    swtpm.restore(snap)
    assert TpmCounterFloor(tcti=swtpm.tcti).read() == 1


_RAISER = textwrap.dedent("""
    import sys
    from edgeshield.hardware._nvfloor import TpmCounterFloor
    floor = TpmCounterFloor(tcti=sys.argv[1])
    floor.read()
    print("ready", flush=True)
    floor.raise_to(int(sys.argv[2]))
    print("done", flush=True)
""")


def test_kill9_mid_raise_leaves_a_floor_between_old_and_new(swtpm: SoftwareTPM) -> None:
    floor = TpmCounterFloor.create(tcti=swtpm.tcti, floor=10)
    rng = random.Random()  # noqa: S311 - when to kill, not a secret
    target, seen = 10, []
    for _ in range(3):
        old, target = target, target + 600
        proc = subprocess.Popen([sys.executable, "-c", _RAISER, swtpm.tcti, str(target)], stdout=subprocess.PIPE,
                                text=True)
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready and proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 0.5))
        proc.kill()
        proc.communicate(timeout=30)
        value = floor.read()
        assert old <= value <= target
        seen.append(value)
        floor.raise_to(target)  # the commit resumes
        assert floor.read() == target
    print(f"kill -9 mid-raise: floors left {seen} (targets 610, 1210, 1810)")
