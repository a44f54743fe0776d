"""The device's version floor in a TPM NV monotonic counter (``TPM_NT_COUNTER``), read raw: nothing can lower it.

A TPM counter can only be incremented, never written, and when an index is (re)defined and first incremented the
TPM starts it at the largest value any counter on that TPM has held: undefining and redefining the index, or a
TPM2_Clear, cannot bring the floor back down. The floor is the counter's own value, never an offset kept on disk,
so a disk-image restore does not lower it either. :meth:`TpmCounterFloor.raise_to` increments until the counter
reaches the version; each increment is atomic in the TPM, so a crash mid-raise leaves a floor between the old and
the new version (the updater's commit resumes it).

Implements :class:`edgeshield.updates.Floor`. ``tpm2_pytss`` is imported lazily (extra ``edgeshield[tpm]``).
What each floor kind stops, and what it does not, is in docs/updates.md ("The floor").
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from edgeshield.errors import EdgeShieldError, InvalidArgumentError, OutputExistsError
from edgeshield.hardware import _attest as at
from edgeshield.updates._errors import FloorStateError, FloorViolationError, UpdateRefusedError
from edgeshield.updates._floor import MAX_VERSION

log = logging.getLogger(__name__)

# The TCG registry leaves 0x01800000..0x01BFFFFF to the platform owner (systemd holds 0x01800400..0x018005FF):
# this index is EdgeShield's default, "E5F1" for "ES floor". Any NV index handle may be chosen instead.
DEFAULT_FLOOR_INDEX = 0x0180E5F1
# NV_Increment calls one raise may make: TPM NV wears out (real TPMs rate-limit NV writes and are rated for some
# 10^5..10^6), so model versions should count releases (1, 2, 3, ...), not dates. A bigger jump is refused before
# anything is written.
MAX_RAISE = 1024
# How the floor's counter is defined: incremented and read with its own empty auth value (any process that can
# reach the TPM can raise the floor, a denial of service; none can lower it), readable by the owner, no
# dictionary-attack lockout, never orderly (an orderly counter's value lives in RAM between NV updates).
COUNTER_ATTRIBUTES = (at.NV_AUTHWRITE | at.NV_AUTHREAD | at.NV_OWNERREAD | at.NV_NO_DA
                      | at.NT_COUNTER << at.NV_TYPE_SHIFT)


class FloorJumpError(UpdateRefusedError):
    """The version is more than ``max_raise`` above a TPM counter floor: raising it would take too many NV writes."""

    reason = "floor-jump"


def parse_index(text: str) -> int:
    """``0x0180E5F1`` (or decimal) to an NV index handle; :class:`InvalidArgumentError` if it is not one."""
    try:
        index = int(text, 0)
    except ValueError:
        raise InvalidArgumentError(f"not an NV index: {text!r} (e.g. 0x{DEFAULT_FLOOR_INDEX:08X})") from None
    if index >> 24 != at.NV_HANDLE_TYPE:
        raise InvalidArgumentError(f"0x{index:x} is not an NV index handle (0x01000000..0x01FFFFFF)")
    return index


class TpmCounterFloor:
    """The floor in TPM NV counter ``index`` of the TPM at ``tcti`` (default: ``$EDGESHIELD_TPM_TCTI``, else
    ``device:/dev/tpmrm0``). Each call opens the TPM and closes it again: nothing is held between calls."""

    kind = "tpm-nv-counter"

    def __init__(self, index: int = DEFAULT_FLOOR_INDEX, *, tcti: str | None = None,
                 max_raise: int = MAX_RAISE) -> None:
        if isinstance(index, bool) or not isinstance(index, int) or index >> 24 != at.NV_HANDLE_TYPE:
            raise InvalidArgumentError(f"{index!r} is not an NV index handle (0x01000000..0x01FFFFFF)")
        if max_raise < 1:
            raise InvalidArgumentError("max_raise must be at least 1")
        self.index = index
        self.tcti = tcti
        self.max_raise = max_raise
        self.created_above: int | None = None  # set by create when the TPM started the counter above the floor asked

    @classmethod
    def create(cls, index: int = DEFAULT_FLOOR_INDEX, *, tcti: str | None = None, floor: int = 0,
               max_raise: int = MAX_RAISE) -> TpmCounterFloor:
        """Define the counter (owner auth, empty) and increment it to ``floor``; refuses an index already defined.

        A counter's first increment sets it to one above the largest value any counter on this TPM has held, so
        it starts at 1 at the least, and above ``floor`` on a TPM whose counters went further before: the floor
        then starts there (``created_above`` says so, and a warning is logged), never lower.
        """
        self = cls(index, tcti=tcti, max_raise=max_raise)
        floor = _check_version(floor)
        if floor > max_raise:
            raise FloorJumpError(f"a TPM counter floor starts at most at {max_raise} (max_raise), not {floor}")
        with self._session() as (ctx, t):
            if self._find(ctx) is not None:
                raise OutputExistsError(f"NV index 0x{index:08x} is already defined on this TPM: choose another "
                                        f"(--floor tpm:0xINDEX) or undefine it (tpm2_nvundefine 0x{index:08x}; the "
                                        "counter would restart at least where it was)")
            pub = t.TPM2B_NV_PUBLIC(nvPublic=t.TPMS_NV_PUBLIC(nvIndex=index, nameAlg=t.TPM2_ALG.SHA256,
                                                              attributes=COUNTER_ATTRIBUTES, dataSize=8))
            with _tpm_call(f"define NV counter 0x{index:08x} (owner auth)"):
                handle = ctx.nv_define_space(b"", pub)
            try:
                with _tpm_call(f"increment NV counter 0x{index:08x}"):
                    ctx.nv_increment(handle)
                value = self._value(ctx, handle)
                if value > max(floor, 1):
                    self.created_above = value
                    log.warning("TPM counter 0x%08x started at %d, above the floor asked (%d): a counter on this "
                                "TPM held %d before; the floor starts there", index, value, floor, value - 1)
                while value < floor:
                    with _tpm_call(f"increment NV counter 0x{index:08x}"):
                        ctx.nv_increment(handle)
                    value = self._value(ctx, handle)
            finally:
                ctx.tr_close(handle)
        return self

    # -- the Floor protocol --
    def read(self) -> int:
        """The counter's value; :class:`FloorStateError` when the index is missing, not a written 8-byte counter."""
        with self._session() as (ctx, _), self._handle(ctx) as handle:
            return self._value(ctx, handle)

    def raise_to(self, version: int) -> None:
        """Increment until the counter is at least ``version``; a lower version is a :class:`FloorViolationError`,
        one more than ``max_raise`` above a :class:`FloorJumpError` (nothing written)."""
        version = _check_version(version)
        with self._session() as (ctx, _), self._handle(ctx) as handle:
            value = self._value(ctx, handle)
            if version < value:
                raise FloorViolationError(f"refusing to lower the floor from {value} to {version}")
            self.check_raise(version, value)
            while value < version:
                with _tpm_call(f"increment NV counter 0x{self.index:08x}"):
                    ctx.nv_increment(handle)
                value = self._value(ctx, handle)

    def check_raise(self, version: int, current: int | None = None) -> None:
        """:class:`FloorJumpError` if raising the floor to ``version`` would take more than ``max_raise`` steps."""
        current = self.read() if current is None else current
        if version - current > self.max_raise:
            raise FloorJumpError(f"version {version} is {version - current} above the TPM counter floor {current}; "
                                 f"one raise is at most {self.max_raise} NV increments (version models by release "
                                 "count, or commit intermediate versions)")

    def describe(self) -> dict[str, Any]:
        with self._session() as (ctx, _), self._handle(ctx) as handle:
            value = self._value(ctx, handle)
            pub = self._public(ctx, handle)
        return {"kind": self.kind, "index": f"0x{self.index:08x}", "floor": value, "name": pub.name.hex(),
                "attributes": f"0x{pub.attributes:08x}", "max_raise": self.max_raise,
                "tcti": self.tcti or at.default_tcti()}

    def nv_public(self) -> bytes:
        """The counter's marshalled ``TPMS_NV_PUBLIC``: what NV certification names (``at.nv_name``)."""
        with self._session() as (ctx, _), self._handle(ctx) as handle:
            return self._public(ctx, handle).raw

    # -- plumbing --
    @contextmanager
    def _session(self) -> Iterator[tuple[Any, Any]]:
        t = at._pytss()
        tcti = self.tcti or at.default_tcti()
        try:
            ctx = t.ESAPI(tcti)
        except Exception as exc:  # noqa: BLE001 - the TSS raises its own untyped errors
            raise at.TpmUnavailableError(f"cannot open the TPM at {tcti}: {exc}") from None
        try:
            yield ctx, t
        finally:
            ctx.close()

    def _find(self, ctx: Any) -> Any:
        """The index's ESYS handle, or None when the TPM has no such index (TPM_RC_HANDLE)."""
        t = at._pytss()
        try:
            return ctx.tr_from_tpmpublic(self.index)
        except t.TSS2_Exception as exc:
            if getattr(exc, "error", None) == t.TPM2_RC.HANDLE:
                return None
            raise at.TpmUnavailableError(f"the TPM refused to look up NV index 0x{self.index:08x}: {exc}") from None

    @contextmanager
    def _handle(self, ctx: Any) -> Iterator[Any]:
        handle = self._find(ctx)
        if handle is None:
            raise FloorStateError(f"the TPM floor counter 0x{self.index:08x} is not defined (undefined by someone "
                                  "with owner auth, or another TPM): it is never recreated at 0; re-provision the "
                                  "device (a new counter starts at least where the old one was)")
        try:
            yield handle
        finally:
            ctx.tr_close(handle)

    def _public(self, ctx: Any, handle: Any) -> at.NvPublic:
        with _tpm_call(f"read NV index 0x{self.index:08x}'s public area"):
            pub, _ = ctx.nv_read_public(handle)
        return at.parse_nv_public(bytes(pub.nvPublic.marshal()))

    def _value(self, ctx: Any, handle: Any) -> int:
        pub = self._public(ctx, handle)
        if pub.nv_type != at.NT_COUNTER or pub.data_size != 8:
            raise FloorStateError(f"NV index 0x{self.index:08x} is not a monotonic counter (type {pub.nv_type}, "
                                  f"{pub.data_size} bytes): it was redefined; the floor cannot be trusted")
        if not pub.attributes & at.NV_WRITTEN:
            raise FloorStateError(f"the TPM floor counter 0x{self.index:08x} was redefined and never incremented: "
                                  "re-provision the device (its first increment starts it at least where the old "
                                  "counter was)")
        with _tpm_call(f"read NV counter 0x{self.index:08x}"):
            data = bytes(ctx.nv_read(handle, 8, 0))
        return int.from_bytes(data, "big")


@contextmanager
def _tpm_call(what: str) -> Iterator[None]:
    try:
        yield
    except EdgeShieldError:
        raise
    except Exception as exc:  # noqa: BLE001 - TSS2_Exception and friends
        raise at.TpmUnavailableError(f"the TPM refused to {what}: {exc}") from None


def _check_version(version: object) -> int:
    if isinstance(version, bool) or not isinstance(version, int) or not 0 <= version <= MAX_VERSION:
        raise FloorViolationError(f"a model version must be a whole number in 0..2**63-1, got {version!r}")
    return version
