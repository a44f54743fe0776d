"""HPKE (RFC 9180) known-answer tests, and a cross-check of the data-key wrapping against a reference.

``edgeshield.bundles._wrap`` wraps a bundle's data key with ``cryptography``'s single-shot HPKE API, which takes
neither an ephemeral key nor AAD, so the published vectors cannot be fed to it directly.  Instead this module
carries a small reference implementation of HPKE Base mode (RFC 9180 sections 4, 5.1, 5.2, 5.3 and 7.1.3, built only
from ``cryptography`` primitives), checks it against the published vectors, and then checks that the product and the
reference interoperate in both directions.

Vector sources (values copied verbatim, hex):

* DHKEM(X25519, HKDF-SHA256) / HKDF-SHA256 / AES-128-GCM, mode 0 -- RFC 9180 Appendix A.1.1 (and A.1.1.1 for the
  exported values).  Copied from ``golang/go`` ``src/crypto/internal/hpke/testdata/rfc9180-vectors.json``
  (commit 438fc12b95027f2db8a525cf297901b9e66c3290), which reproduces the RFC appendix text; the exported values
  from ``aws/aws-lc`` ``crypto/hpke/hpke_test_vectors.txt`` (commit 7147e7a0cc0a616a88e25dba2646a483d04d9d55,
  BoringSSL's conversion of the CFRG ``test-vectors.json``), which match the RFC's A.1.1.1.
* DHKEM(X25519, HKDF-SHA256) / HKDF-SHA256 / AES-256-GCM, mode 0 -- not reproduced in the RFC's appendix, only in the
  CFRG ``test-vectors.json`` (cfrg/draft-irtf-cfrg-hpke).  ikmE / ikmR / skRm / pkRm / enc copied from ``golang/go``
  ``src/crypto/internal/hpke/testdata/rfc9180.json`` (commit 7c985a2df46fa961746a3493de9bddc48cd89548); skEm / pkEm,
  the encryptions and the exported values from ``aws/aws-lc`` ``crypto/hpke/hpke_test_vectors.txt`` (commit above,
  entry ``mode = 0, kem_id = 32, kdf_id = 1, aead_id = 2``).  Neither source lists shared_secret / key / base_nonce /
  exporter_secret for this suite, so those are pinned indirectly: the AES-256-GCM ciphertexts (tag included) depend
  on key and base_nonce, and the exported values depend on exporter_secret.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from edgeshield.bundles import _wrap
from edgeshield.errors import KeyUnwrapError

# ---------------------------------------------------------------------------------------------------------------------
# Reference HPKE, Base mode only: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-GCM.
# ---------------------------------------------------------------------------------------------------------------------

MODE_BASE = 0x00
KEM_X25519_HKDF_SHA256 = 0x0020
KDF_HKDF_SHA256 = 0x0001
AEAD_AES_128_GCM = 0x0001
AEAD_AES_256_GCM = 0x0002

N_H = 32  # HKDF-SHA256 output size
N_SECRET = 32  # DHKEM(X25519) shared secret size
N_SK = 32  # X25519 private key size
N_N = 12  # AES-GCM nonce size
N_K = {AEAD_AES_128_GCM: 16, AEAD_AES_256_GCM: 32}


def i2osp(value: int, length: int) -> bytes:
    return value.to_bytes(length, "big")


def hkdf_extract(salt: bytes, ikm: bytes) -> bytes:
    # RFC 5869: an absent salt is HashLen zero bytes.
    h = hmac.HMAC(salt or b"\x00" * N_H, hashes.SHA256())
    h.update(ikm)
    return h.finalize()


def hkdf_expand(prk: bytes, info: bytes, length: int) -> bytes:
    return HKDFExpand(algorithm=hashes.SHA256(), length=length, info=info).derive(prk)


def labeled_extract(suite_id: bytes, salt: bytes, label: bytes, ikm: bytes) -> bytes:
    return hkdf_extract(salt, b"HPKE-v1" + suite_id + label + ikm)


def labeled_expand(suite_id: bytes, prk: bytes, label: bytes, info: bytes, length: int) -> bytes:
    return hkdf_expand(prk, i2osp(length, 2) + b"HPKE-v1" + suite_id + label + info, length)


KEM_SUITE_ID = b"KEM" + i2osp(KEM_X25519_HKDF_SHA256, 2)


def hpke_suite_id(aead_id: int) -> bytes:
    return b"HPKE" + struct.pack(">HHH", KEM_X25519_HKDF_SHA256, KDF_HKDF_SHA256, aead_id)


def derive_key_pair(ikm: bytes) -> tuple[bytes, bytes]:
    """RFC 9180 section 7.1.3 for X25519: (skX, pkX) as raw bytes."""
    dkp_prk = labeled_extract(KEM_SUITE_ID, b"", b"dkp_prk", ikm)
    sk = labeled_expand(KEM_SUITE_ID, dkp_prk, b"sk", b"", N_SK)
    pk = x25519.X25519PrivateKey.from_private_bytes(sk).public_key().public_bytes_raw()
    return sk, pk


def extract_and_expand(dh: bytes, kem_context: bytes) -> bytes:
    eae_prk = labeled_extract(KEM_SUITE_ID, b"", b"eae_prk", dh)
    return labeled_expand(KEM_SUITE_ID, eae_prk, b"shared_secret", kem_context, N_SECRET)


def encap(pk_r: bytes, sk_e: bytes) -> tuple[bytes, bytes]:
    """DHKEM Encap with a given ephemeral private key: (shared_secret, enc)."""
    ephemeral = x25519.X25519PrivateKey.from_private_bytes(sk_e)
    dh = ephemeral.exchange(x25519.X25519PublicKey.from_public_bytes(pk_r))
    enc = ephemeral.public_key().public_bytes_raw()
    return extract_and_expand(dh, enc + pk_r), enc


def decap(enc: bytes, sk_r: bytes) -> bytes:
    recipient = x25519.X25519PrivateKey.from_private_bytes(sk_r)
    dh = recipient.exchange(x25519.X25519PublicKey.from_public_bytes(enc))
    pk_r = recipient.public_key().public_bytes_raw()
    return extract_and_expand(dh, enc + pk_r)


@dataclass
class Context:
    aead_id: int
    key_schedule_context: bytes
    secret: bytes
    key: bytes
    base_nonce: bytes
    exporter_secret: bytes
    seq: int = 0

    def _nonce(self, seq: int) -> bytes:
        return bytes(a ^ b for a, b in zip(self.base_nonce, i2osp(seq, N_N), strict=True))

    def seal_at(self, seq: int, aad: bytes, pt: bytes) -> bytes:
        return AESGCM(self.key).encrypt(self._nonce(seq), pt, aad)

    def open_at(self, seq: int, aad: bytes, ct: bytes) -> bytes:
        return AESGCM(self.key).decrypt(self._nonce(seq), ct, aad)

    def seal(self, aad: bytes, pt: bytes) -> bytes:
        ct = self.seal_at(self.seq, aad, pt)
        self.seq += 1
        return ct

    def open(self, aad: bytes, ct: bytes) -> bytes:
        pt = self.open_at(self.seq, aad, ct)
        self.seq += 1
        return pt

    def export(self, exporter_context: bytes, length: int) -> bytes:
        return labeled_expand(hpke_suite_id(self.aead_id), self.exporter_secret, b"sec", exporter_context, length)


def key_schedule_base(aead_id: int, shared_secret: bytes, info: bytes) -> Context:
    """RFC 9180 section 5.1, mode_base (psk = psk_id = empty)."""
    suite_id = hpke_suite_id(aead_id)
    psk = psk_id = b""
    psk_id_hash = labeled_extract(suite_id, b"", b"psk_id_hash", psk_id)
    info_hash = labeled_extract(suite_id, b"", b"info_hash", info)
    ksc = i2osp(MODE_BASE, 1) + psk_id_hash + info_hash
    secret = labeled_extract(suite_id, shared_secret, b"secret", psk)
    return Context(
        aead_id=aead_id,
        key_schedule_context=ksc,
        secret=secret,
        key=labeled_expand(suite_id, secret, b"key", ksc, N_K[aead_id]),
        base_nonce=labeled_expand(suite_id, secret, b"base_nonce", ksc, N_N),
        exporter_secret=labeled_expand(suite_id, secret, b"exp", ksc, N_H),
    )


def setup_base_s(aead_id: int, pk_r: bytes, info: bytes, sk_e: bytes) -> tuple[bytes, Context]:
    shared_secret, enc = encap(pk_r, sk_e)
    return enc, key_schedule_base(aead_id, shared_secret, info)


def setup_base_r(aead_id: int, enc: bytes, sk_r: bytes, info: bytes) -> Context:
    return key_schedule_base(aead_id, decap(enc, sk_r), info)


# ---------------------------------------------------------------------------------------------------------------------
# Published vectors (see the module docstring for where each value comes from).
# ---------------------------------------------------------------------------------------------------------------------

PT = "4265617574792069732074727574682c20747275746820626561757479"  # "Beauty is truth, truth beauty"
INFO = "4f6465206f6e2061204772656369616e2055726e"  # "Ode on a Grecian Urn"

RFC9180_A_1_1 = {
    "name": "RFC 9180 A.1.1 X25519/HKDF-SHA256/AES-128-GCM base",
    "aead_id": AEAD_AES_128_GCM,
    "info": INFO,
    "ikmE": "7268600d403fce431561aef583ee1613527cff655c1343f29812e66706df3234",
    "pkEm": "37fda3567bdbd628e88668c3c8d7e97d1d1253b6d4ea6d44c150f741f1bf4431",
    "skEm": "52c4a758a802cd8b936eceea314432798d5baf2d7e9235dc084ab1b9cfa2f736",
    "ikmR": "6db9df30aa07dd42ee5e8181afdb977e538f5e1fec8a06223f33f7013e525037",
    "pkRm": "3948cfe0ad1ddb695d780e59077195da6c56506b027329794ab02bca80815c4d",
    "skRm": "4612c550263fc8ad58375df3f557aac531d26850903e55a9f23f21d8534e8ac8",
    "enc": "37fda3567bdbd628e88668c3c8d7e97d1d1253b6d4ea6d44c150f741f1bf4431",
    "shared_secret": "fe0e18c9f024ce43799ae393c7e8fe8fce9d218875e8227b0187c04e7d2ea1fc",
    "key_schedule_context": (
        "00725611c9d98c07c03f60095cd32d400d8347d45ed67097bbad50fc56da742d07"
        "cb6cffde367bb0565ba28bb02c90744a20f5ef37f30523526106f637abb05449"
    ),
    "secret": "12fff91991e93b48de37e7daddb52981084bd8aa64289c3788471d9a9712f397",
    "key": "4531685d41d65f03dc48f6b8302c05b0",
    "base_nonce": "56d890e5accaaf011cff4b7d",
    "exporter_secret": "45ff1c2e220db587171952c0592d5f5ebe103f1561a2614e38f2ffd47e99e3f8",
    "encryptions": [
        # (sequence number, aad, nonce, ct); pt is PT for all of them.
        (
            0,
            "436f756e742d30",
            "56d890e5accaaf011cff4b7d",
            "f938558b5d72f1a23810b4be2ab4f84331acc02fc97babc53a52ae8218a355a96d8770ac83d07bea87e13c512a",
        ),
        (
            1,
            "436f756e742d31",
            "56d890e5accaaf011cff4b7c",
            "af2d7e9ac9ae7e270f46ba1f975be53c09f8d875bdc8535458c2494e8a6eab251c03d0c22a56b8ca42c2063b84",
        ),
        (
            2,
            "436f756e742d32",
            "56d890e5accaaf011cff4b7f",
            "498dfcabd92e8acedc281e85af1cb4e3e31c7dc394a1ca20e173cb72516491588d96a19ad4a683518973dcc180",
        ),
        (
            4,
            "436f756e742d34",
            "56d890e5accaaf011cff4b79",
            "583bd32bc67a5994bb8ceaca813d369bca7b2a42408cddef5e22f880b631215a09fc0012bc69fccaa251c0246d",
        ),
        (
            255,
            "436f756e742d323535",
            "56d890e5accaaf011cff4b82",
            "7175db9717964058640a3a11fb9007941a5d1757fda1a6935c805c21af32505bf106deefec4a49ac38d71c9e0a",
        ),
        (
            256,
            "436f756e742d323536",
            "56d890e5accaaf011cff4a7d",
            "957f9800542b0b8891badb026d79cc54597cb2d225b54c00c5238c25d05c30e3fbeda97d2e0e1aba483a2df9f2",
        ),
    ],
    "exports": [
        ("", 32, "3853fe2b4035195a573ffc53856e77058e15d9ea064de3e59f4961d0095250ee"),
        ("00", 32, "2e8f0b54673c7029649d4eb9d5e33bf1872cf76d623ff164ac185da9e88c21a5"),
        ("54657374436f6e74657874", 32, "e9e43065102c3836401bed8c3c3c75ae46be1639869391d62c61f1ec7af54931"),
    ],
}

CFRG_X25519_AES256GCM_BASE = {
    "name": "CFRG test-vectors.json X25519/HKDF-SHA256/AES-256-GCM base",
    "aead_id": AEAD_AES_256_GCM,
    "info": INFO,
    "ikmE": "2cd7c601cefb3d42a62b04b7a9041494c06c7843818e0ce28a8f704ae7ab20f9",
    "pkEm": "6c93e09869df3402d7bf231bf540fadd35cd56be14f97178f0954db94b7fc256",
    "skEm": "179d4b53b6365c45b600c4163b61d95cbc2f4d9e36f1695558dce265ab8bab11",
    "ikmR": "dac33b0e9db1b59dbbea58d59a14e7b5896e9bdf98fad6891e99d1686492b9ee",
    "pkRm": "430f4b9859665145a6b1ba274024487bd66f03a2dd577d7753c68d7d7d00c00c",
    "skRm": "497b4502664cfea5d5af0b39934dac72242a74f8480451e1aee7d6a53320333d",
    "enc": "6c93e09869df3402d7bf231bf540fadd35cd56be14f97178f0954db94b7fc256",
    "encryptions": [
        (
            0,
            "436f756e742d30",
            None,
            "e5d84cd531cfb583096e7cfa9641bd3079cf3a91cda813c52deb5f512be9931980a41de125a925cdad859d5b7a",
        ),
        (
            1,
            "436f756e742d31",
            None,
            "2c43aff25343fdbff864506f0818b9d87df84ea01b1a2144d23b4d40c26bf655fdf197fe40297a8aebeed5cc2d",
        ),
        (
            2,
            "436f756e742d32",
            None,
            "e0a8f2cf92ff61215edbb8c55dc31fe9e2eb42a5685867bb6854211542099f9e940c4b41c192bc390835b1a5f7",
        ),
        (
            255,
            "436f756e742d323535",
            None,
            "f6ad1823eb0b932d04b6e23010eea64f1fe5edd0583dae5ba27ca6363f4ea104bd217331460ef4208040423641",
        ),
        (
            256,
            "436f756e742d323536",
            None,
            "53624f4f9f173453b14e633b45390ff54cacaa4428d44baee1bff8133fab1ab3afe60f88e4634b525c54e92eda",
        ),
    ],
    "exports": [
        ("", 32, "ded6cffafaea6b812cbf3e241e88332adbc077aca81512914213810ee291770a"),
        ("00", 32, "04d3cb6cc116b28ffd22ad5bc276c60d31fec71ceb87ae24db811c64b7507339"),
        ("54657374436f6e74657874", 32, "7c5ded445732c14fe09727d29b4251c0fd38455fe8440571e687f0886aac94d2"),
    ],
}

VECTORS = [RFC9180_A_1_1, CFRG_X25519_AES256GCM_BASE]
vectors = pytest.mark.parametrize("v", VECTORS, ids=lambda v: v["name"])


def h(value: str) -> bytes:
    return bytes.fromhex(value)


# ---------------------------------------------------------------------------------------------------------------------
# 1-2. The reference against the published vectors.
# ---------------------------------------------------------------------------------------------------------------------


@vectors
def test_derive_key_pair(v):
    assert derive_key_pair(h(v["ikmE"])) == (h(v["skEm"]), h(v["pkEm"]))
    assert derive_key_pair(h(v["ikmR"])) == (h(v["skRm"]), h(v["pkRm"]))


@vectors
def test_encap_and_decap(v):
    shared_secret, enc = encap(h(v["pkRm"]), h(v["skEm"]))
    assert enc == h(v["enc"])
    assert decap(enc, h(v["skRm"])) == shared_secret
    if "shared_secret" in v:
        assert shared_secret == h(v["shared_secret"])


@vectors
def test_key_schedule(v):
    enc, ctx = setup_base_s(v["aead_id"], h(v["pkRm"]), h(v["info"]), h(v["skEm"]))
    assert enc == h(v["enc"])
    assert len(ctx.key) == N_K[v["aead_id"]]
    assert len(ctx.base_nonce) == N_N
    for name in ("key_schedule_context", "secret", "key", "base_nonce", "exporter_secret"):
        if name in v:
            assert getattr(ctx, name) == h(v[name]), name
    recipient = setup_base_r(v["aead_id"], enc, h(v["skRm"]), h(v["info"]))
    assert (recipient.key, recipient.base_nonce, recipient.exporter_secret) == (
        ctx.key,
        ctx.base_nonce,
        ctx.exporter_secret,
    )


@vectors
def test_encryptions(v):
    enc, sender = setup_base_s(v["aead_id"], h(v["pkRm"]), h(v["info"]), h(v["skEm"]))
    recipient = setup_base_r(v["aead_id"], enc, h(v["skRm"]), h(v["info"]))
    for seq, aad, nonce, ct in v["encryptions"]:
        if nonce is not None:
            assert sender._nonce(seq) == h(nonce)
        assert sender.seal_at(seq, h(aad), h(PT)) == h(ct), seq
        assert recipient.open_at(seq, h(aad), h(ct)) == h(PT), seq


@vectors
def test_first_encryptions_with_running_sequence_number(v):
    enc, sender = setup_base_s(v["aead_id"], h(v["pkRm"]), h(v["info"]), h(v["skEm"]))
    recipient = setup_base_r(v["aead_id"], enc, h(v["skRm"]), h(v["info"]))
    leading = [e for e in v["encryptions"] if e[0] < 3]
    assert [e[0] for e in leading] == [0, 1, 2]
    for _seq, aad, _nonce, ct in leading:
        assert sender.seal(h(aad), h(PT)) == h(ct)
        assert recipient.open(h(aad), h(ct)) == h(PT)
    assert sender.seq == recipient.seq == 3


@vectors
def test_open_rejects_wrong_aad_or_sequence(v):
    enc, _ = setup_base_s(v["aead_id"], h(v["pkRm"]), h(v["info"]), h(v["skEm"]))
    recipient = setup_base_r(v["aead_id"], enc, h(v["skRm"]), h(v["info"]))
    _seq, aad, _nonce, ct = v["encryptions"][0]
    with pytest.raises(InvalidTag):
        recipient.open_at(0, h(aad) + b"x", h(ct))
    with pytest.raises(InvalidTag):
        recipient.open_at(1, h(aad), h(ct))
    wrong_info = setup_base_r(v["aead_id"], enc, h(v["skRm"]), h(v["info"]) + b"!")
    with pytest.raises(InvalidTag):
        wrong_info.open_at(0, h(aad), h(ct))


@vectors
def test_exports(v):
    _, ctx = setup_base_s(v["aead_id"], h(v["pkRm"]), h(v["info"]), h(v["skEm"]))
    for exporter_context, length, value in v["exports"]:
        assert ctx.export(h(exporter_context), length) == h(value)


# ---------------------------------------------------------------------------------------------------------------------
# 3. The product (cryptography's single-shot HPKE, via _wrap) against the reference.
# ---------------------------------------------------------------------------------------------------------------------

DATA_KEY = bytes(range(32))
MAC_KEY = bytes(range(32, 64))
SECRET = DATA_KEY + MAC_KEY  # what a bundle wraps per recipient: data key || that recipient's MAC key
BUNDLE_ID = b"bundle-0001"


def _device() -> tuple[x25519.X25519PrivateKey, bytes, bytes]:
    # The AES-256-GCM vector's recipient key pair, derived from its ikmR.
    sk, pk = derive_key_pair(h(CFRG_X25519_AES256GCM_BASE["ikmR"]))
    return x25519.X25519PrivateKey.from_private_bytes(sk), sk, pk


def test_product_suite_is_the_one_under_test():
    assert _wrap.SUITE_NAME == "HPKE-Base/DHKEM(X25519,HKDF-SHA256)/HKDF-SHA256/AES-256-GCM"
    assert _wrap.WRAPPED_KEY_SIZE == 32 + len(SECRET) + 16  # enc || AES-256-GCM(secret) || tag


def test_product_wrap_opens_with_reference():
    device, sk, _pk = _device()
    wrapped = _wrap.wrap_key(SECRET, device.public_key(), BUNDLE_ID)
    assert len(wrapped) == _wrap.WRAPPED_KEY_SIZE
    enc, ct = wrapped[:32], wrapped[32:]
    ctx = setup_base_r(AEAD_AES_256_GCM, enc, sk, _wrap.info_for(BUNDLE_ID))
    assert ctx.open(b"", ct) == SECRET
    # Bound to the bundle: the same wrap does not open under another bundle's info.
    other = setup_base_r(AEAD_AES_256_GCM, enc, sk, _wrap.info_for(b"bundle-0002"))
    with pytest.raises(InvalidTag):
        other.open(b"", ct)


def test_product_wraps_use_fresh_ephemeral_keys():
    device, sk, _pk = _device()
    first = _wrap.wrap_key(SECRET, device.public_key(), BUNDLE_ID)
    second = _wrap.wrap_key(SECRET, device.public_key(), BUNDLE_ID)
    assert first[:32] != second[:32]
    for wrapped in (first, second):
        ctx = setup_base_r(AEAD_AES_256_GCM, wrapped[:32], sk, _wrap.info_for(BUNDLE_ID))
        assert ctx.open(b"", wrapped[32:]) == SECRET


def _reference_wrap(data_key: bytes, pk_r: bytes, bundle_id: bytes) -> bytes:
    # Fixed ephemeral key: the AES-256-GCM vector's skEm (derived from its ikmE).
    sk_e, _ = derive_key_pair(h(CFRG_X25519_AES256GCM_BASE["ikmE"]))
    enc, ctx = setup_base_s(AEAD_AES_256_GCM, pk_r, _wrap.info_for(bundle_id), sk_e)
    return enc + ctx.seal(b"", data_key)


def test_reference_wrap_opens_with_product():
    device, _sk, pk = _device()
    wrapped = _reference_wrap(SECRET, pk, BUNDLE_ID)
    assert len(wrapped) == _wrap.WRAPPED_KEY_SIZE
    assert wrapped[:32] == h(CFRG_X25519_AES256GCM_BASE["enc"])
    assert _wrap.unwrap_key(wrapped, device, BUNDLE_ID) == (DATA_KEY, MAC_KEY)


def test_unwrap_with_wrong_bundle_id_raises():
    device, _sk, pk = _device()
    for wrapped in (_reference_wrap(SECRET, pk, BUNDLE_ID), _wrap.wrap_key(SECRET, device.public_key(), BUNDLE_ID)):
        with pytest.raises(KeyUnwrapError):
            _wrap.unwrap_key(wrapped, device, b"bundle-0002")


def test_unwrap_with_other_device_key_raises():
    device, _sk, pk = _device()
    # A different, fixed device: the AES-128-GCM vector's recipient.
    other = x25519.X25519PrivateKey.from_private_bytes(derive_key_pair(h(RFC9180_A_1_1["ikmR"]))[0])
    for wrapped in (_reference_wrap(SECRET, pk, BUNDLE_ID), _wrap.wrap_key(SECRET, device.public_key(), BUNDLE_ID)):
        with pytest.raises(KeyUnwrapError):
            _wrap.unwrap_key(wrapped, other, BUNDLE_ID)
        with pytest.raises(KeyUnwrapError):
            _wrap.unwrap_key(wrapped, x25519.X25519PrivateKey.generate(), BUNDLE_ID)


def test_unwrap_of_tampered_wrap_raises():
    device, _sk, pk = _device()
    wrapped = bytearray(_reference_wrap(SECRET, pk, BUNDLE_ID))
    wrapped[-1] ^= 0x01
    with pytest.raises(KeyUnwrapError):
        _wrap.unwrap_key(bytes(wrapped), device, BUNDLE_ID)
