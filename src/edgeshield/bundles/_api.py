"""The bundle recipe: protect, verify, inspect and open a signed, encrypted model bundle."""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import hmac
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from edgeshield._io import atomic_writer, check_readable_file
from edgeshield._progress import ProgressCallback, report
from edgeshield.bundles import _format, _modelio, _session, _stream, _wrap
from edgeshield.errors import (
    InvalidArgumentError,
    KeyCommitmentError,
    MalformedBundleError,
    NotARecipientError,
    PayloadDigestError,
    SignatureError,
    TrailingDataError,
    TruncatedBundleError,
    WrongOwnerKeyError,
)
from edgeshield.keys import DevicePrivateKey, DevicePublicKey, OwnerPrivateKey, OwnerPublicKey, key_id

if TYPE_CHECKING:
    import numpy as np

    from edgeshield.bundles._image import PlainImage
    from edgeshield.bundles._ort import onnxruntime

Manifest = _format.Manifest
PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class OpenBundle:
    """A verified, decrypted bundle: its manifest and a ready ONNX Runtime session."""

    manifest: Manifest
    session: onnxruntime.InferenceSession


# --- reading ---------------------------------------------------------------------------------------------------
class _FileReader:
    """``ReadAt`` over one open descriptor (``os.pread``, safe from several threads), which can also read into a
    caller's buffer (``os.preadv``) so that the streamed open allocates nothing per chunk."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __call__(self, offset: int, n: int) -> bytes:
        return os.pread(self.fd, n, offset)

    def into(self, offset: int, view: memoryview) -> int:
        if not hasattr(os, "preadv"):  # not on Windows or macOS before 11
            data = os.pread(self.fd, len(view), offset)
            view[: len(data)] = data
            return len(data)
        got = 0
        while got < len(view):
            n = os.preadv(self.fd, [view[got:]], offset + got)
            if n == 0:  # end of file
                break
            got += n
        return got


@contextlib.contextmanager
def _open_for_read(path: PathLike) -> Iterator[tuple[_stream.ReadAt, int]]:
    p = check_readable_file(path, what="bundle")
    fd = os.open(p, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        yield _FileReader(fd), size
    finally:
        os.close(fd)


def _authenticated_manifest(read_at: _stream.ReadAt, size: int, owner_key: OwnerPublicKey) -> _format.Manifest:
    """Parse the header, check the signature, then decode the manifest and check the payload's length."""
    header = _format.parse_header(read_at, size)
    expected_id = key_id(owner_key)
    claimed = _claimed_signer(header.manifest_raw)
    if claimed is not None and not hmac.compare_digest(claimed, expected_id):
        raise WrongOwnerKeyError(f"bundle is signed by key {claimed}, not by the owner key given ({expected_id})")
    try:
        owner_key.verify(header.signature, _format.signed_message(header.manifest_raw, header.version),
                         ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise SignatureError("bundle signature is invalid: the manifest was altered or not signed by this "
                             "owner") from None
    manifest = _format.decode_manifest(header.manifest_raw)
    if manifest.format_version != header.version:  # both signed; a writer bug, never to be guessed around
        raise MalformedBundleError(f"manifest format version {manifest.format_version} differs from the header's "
                                   f"{header.version}")
    if manifest.signer_key_id != expected_id:  # signed, so this can only be a writer bug; still never trust it
        raise WrongOwnerKeyError("bundle manifest names a different signer than the key that signed it")
    actual = size - header.payload_offset
    if actual < manifest.payload_size:
        raise TruncatedBundleError(f"bundle is truncated: payload has {actual} of {manifest.payload_size} bytes")
    if actual > manifest.payload_size:
        raise TrailingDataError(f"bundle has {actual - manifest.payload_size} unexpected bytes after its payload")
    return manifest


def _claimed_signer(manifest_raw: bytes) -> str | None:
    # Only to give a precise error before the signature check; nothing here is trusted, so only a well-formed
    # key id is returned (anything else falls through to the signature check).
    with contextlib.suppress(Exception):
        value = json.loads(manifest_raw).get("signer_key_id")
        if isinstance(value, str) and _format.KEY_ID_RE.fullmatch(value):
            return value
    return None


def _payload_args(read_at: _stream.ReadAt, size: int,
                  manifest: _format.Manifest) -> tuple[bytes, int, int, _stream.ReadAt]:
    payload_offset = size - manifest.payload_size
    return (
        bytes.fromhex(manifest.bundle_id),
        manifest.plaintext_size,
        manifest.chunk_size,
        lambda offset, n: read_at(payload_offset + offset, n),
    )


def _check_payload_digest(read_at: _stream.ReadAt, size: int, manifest: _format.Manifest) -> None:
    """Gateway check: the sealed chunks hash to the signed payload digest."""
    digest, _ = _stream.process_payload(None, *_payload_args(read_at, size, manifest))
    assert digest is not None  # noqa: S101 - narrows the type: process_payload hashes unless digest=False
    _compare_digest(digest, manifest)


def _compare_digest(digest: bytes, manifest: _format.Manifest) -> None:
    if not hmac.compare_digest(digest.hex(), manifest.payload_sha256):
        raise PayloadDigestError("bundle payload does not match the digest its signed manifest commits to")


def verify(bundle: PathLike, owner_key: OwnerPublicKey) -> Manifest:
    """Check the owner's signature and the encrypted payload's integrity; no device key is needed.

    Returns the authenticated manifest; raises an ``IntegrityError`` subclass for anything altered.
    """
    with _open_for_read(bundle) as (read_at, size):
        manifest = _authenticated_manifest(read_at, size, owner_key)
        _check_payload_digest(read_at, size, manifest)
    return manifest


def model_io(manifest: Manifest) -> _modelio.ModelIO | None:
    """The model's inputs and outputs as ``protect`` recorded them, or None for a bundle made before it did."""
    return _modelio.from_metadata(manifest.metadata)


def inspect(bundle: PathLike, owner_key: OwnerPublicKey | None = None) -> tuple[Manifest, bool]:
    """Return the manifest and whether it was verified (only when ``owner_key`` is given)."""
    if owner_key is not None:
        return verify(bundle, owner_key), True
    with _open_for_read(bundle) as (read_at, size):
        header = _format.parse_header(read_at, size)
    return _format.decode_manifest(header.manifest_raw), False


def _device_keys(manifest: Manifest, device_key: DevicePrivateKey) -> tuple[_format.Recipient, bytes, bytes]:
    """This device's stanza and the (data key, MAC key) unwrapped from it."""
    device_id = key_id(device_key.public_key())
    stanza = next((r for r in manifest.recipients if hmac.compare_digest(r.key_id, device_id)), None)
    if stanza is None:
        raise NotARecipientError(
            f"device key {device_id} is not a recipient of this bundle "
            f"(recipients: {', '.join(manifest.recipient_key_ids)})"
        )
    data_key, mac_key = _wrap.unwrap_key(stanza.wrapped_key, device_key, bytes.fromhex(manifest.bundle_id))
    return stanza, data_key, mac_key


def _decrypt_image(
    bundle: PathLike, owner_key: OwnerPublicKey, device_key: DevicePrivateKey, check_digest: bool
) -> tuple[Manifest, np.ndarray[tuple[int], np.dtype[np.uint8]]]:
    """Authenticate and decrypt a bundle into a private in-memory buffer (a uint8 numpy array)."""
    with _open_for_read(bundle) as (read_at, size):
        manifest = _authenticated_manifest(read_at, size, owner_key)
        stanza, data_key, mac_key = _device_keys(manifest, device_key)
        plaintext = decrypt_payload(read_at, size, manifest, stanza, data_key, mac_key, check_digest=check_digest,
                                    whose_key=_WHOSE_KEY, whose_mac=" for this device")
    return manifest, plaintext


_WHOSE_KEY = "the data key wrapped for this device"


def _check_key_commitment(manifest: Manifest, data_key: bytes, whose_key: str) -> None:
    if not hmac.compare_digest(_format.data_key_commitment(bytes.fromhex(manifest.bundle_id), data_key),
                               manifest.data_key_commitment):
        raise KeyCommitmentError(f"{whose_key} is not the one the manifest commits to")


def streams(manifest: Manifest) -> bool:
    """Whether opening ``manifest``'s bundle streams verified chunks into ONNX Runtime (see ``_session``): a
    version 2 bundle (per-chunk MACs) whose image is one self-contained model, on a platform with fd paths."""
    return manifest.format_version >= 2 and manifest.image.weights_size == 0 and _session.can_stream()


def _streamed_session(
    read_at: _stream.ReadAt, size: int, manifest: Manifest, stanza: _format.Recipient, data_key: bytes,
    mac_key: bytes, *, check_digest: bool, session_options: onnxruntime.SessionOptions | None,
    providers: Sequence[str] | None,
) -> onnxruntime.InferenceSession:
    """Decrypt chunk by chunk into ONNX Runtime's loader; each chunk is passed on only once it has matched this
    device's signed per-chunk MAC and its own GCM tag, and the session is returned only once every chunk has (and,
    with ``check_digest``, the payload digest too)."""
    _check_key_commitment(manifest, data_key, _WHOSE_KEY)
    digests: list[bytes] | None = [] if check_digest else None
    read_into: _stream.ReadInto | None = None
    if isinstance(read_at, _FileReader):
        reader, payload_offset = read_at, size - manifest.payload_size

        def read_into(offset: int, view: memoryview) -> int:
            return reader.into(payload_offset + offset, view)

    def chunks() -> Iterator[memoryview]:
        yield from _stream.verified_chunks(data_key, mac_key, *_payload_args(read_at, size, manifest),
                                           stanza.chunk_mac, read_into=read_into, digest=digests)
        if digests is not None:
            _compare_digest(_stream.digest_of_chunk_digests(digests), manifest)

    return _session.from_stream(chunks(), manifest.image.graph_size, session_options, providers)


def decrypt_payload(
    read_at: _stream.ReadAt, size: int, manifest: Manifest, stanza: _format.Recipient, data_key: bytes,
    mac_key: bytes, *, check_digest: bool, whose_key: str, whose_mac: str,
) -> np.ndarray[tuple[int], np.dtype[np.uint8]]:
    """Check ``data_key`` against the manifest's commitment, then decrypt every chunk into a private buffer and MAC
    it under ``stanza``'s MAC key in one pass; nothing is parsed before the MAC matches the signed manifest, so not
    even another recipient (which knows the data key) can swap the model. ``whose_key``/``whose_mac`` name the key
    in the errors."""
    _check_key_commitment(manifest, data_key, whose_key)
    import numpy as np

    plaintext = np.empty(manifest.plaintext_size, dtype=np.uint8)
    digest, mac = _stream.process_payload(
        data_key, *_payload_args(read_at, size, manifest), plaintext.data, mac_key=mac_key, digest=check_digest,
    )
    assert mac is not None  # noqa: S101 - narrows the type: process_payload MACs whenever mac_key is given
    if digest is not None:
        _compare_digest(digest, manifest)
    if not hmac.compare_digest(mac.hex(), stanza.payload_mac):
        raise PayloadDigestError(f"bundle payload does not match the MAC its signed manifest holds{whose_mac}")
    return plaintext


def session_from_image(
    manifest: Manifest, plaintext: np.ndarray[tuple[int], np.dtype[np.uint8]], *,
    session_options: onnxruntime.SessionOptions | None = None, providers: Sequence[str] | None = None,
) -> OpenBundle:
    """An ONNX Runtime session over a decrypted, authenticated image (graph and weights straight from the buffer).

    A self-contained model (no weights section) is streamed from the buffer into ONNX Runtime's loader where the
    platform allows, which spares the copy of the graph that handing it over as ``bytes`` would make.
    """
    img = manifest.image
    if img.weights_size == 0 and _session.can_stream():
        step = 1 << 20
        view = plaintext.data
        pieces = (view[i : i + step] for i in range(0, img.graph_size, step))
        return OpenBundle(manifest, _session.from_stream(pieces, img.graph_size, session_options, providers))
    weights = plaintext[img.weights_offset : img.weights_offset + img.weights_size]
    session = _create_session(plaintext[: img.graph_size].tobytes(), weights, img, session_options, providers)
    return OpenBundle(manifest, session)


def open_bundle(
    bundle: PathLike,
    owner_key: OwnerPublicKey,
    device_key: DevicePrivateKey,
    *,
    session_options: onnxruntime.SessionOptions | None = None,
    providers: Sequence[str] | None = None,
    check_digest: bool = False,
) -> OpenBundle:
    """Verify, decrypt in memory and create an ONNX Runtime session; the plaintext never touches disk.

    The device checks its own payload MAC, which no other recipient can forge. ``check_digest=True`` also checks
    the SHA-256 hash list a gateway checks, which pins one exact file even against the owner (who knows every MAC
    key), at the cost of a SHA-256 pass over the ciphertext.

    A version 2 bundle holding one self-contained model is decrypted straight into ONNX Runtime's loader, chunk by
    chunk, each chunk only after it has matched this device's signed per-chunk MAC (see ``streams``); other
    bundles are decrypted and checked in full first, then handed over from memory.
    """
    with _open_for_read(bundle) as (read_at, size):
        manifest = _authenticated_manifest(read_at, size, owner_key)
        if streams(manifest):
            stanza, data_key, mac_key = _device_keys(manifest, device_key)
            session = _streamed_session(read_at, size, manifest, stanza, data_key, mac_key,
                                        check_digest=check_digest, session_options=session_options,
                                        providers=providers)
            return OpenBundle(manifest, session)
    manifest, plaintext = _decrypt_image(bundle, owner_key, device_key, check_digest)
    return session_from_image(manifest, plaintext, session_options=session_options, providers=providers)


def decrypt_model(bundle: PathLike, owner_key: OwnerPublicKey, device_key: DevicePrivateKey) -> bytes:
    """The bundled model as self-contained ONNX bytes, in memory (for tools such as the gradient detector).

    Needs the ``onnx`` package. The bytes are the plaintext model: keep them in memory, as ``open_bundle`` does.
    """
    from edgeshield.bundles._image import rebuild_model

    manifest, plaintext = _decrypt_image(bundle, owner_key, device_key, False)
    return rebuild_model(plaintext, manifest.image)


def open_session(
    bundle: PathLike,
    owner_key: OwnerPublicKey,
    device_key: DevicePrivateKey,
    *,
    session_options: onnxruntime.SessionOptions | None = None,
    providers: Sequence[str] | None = None,
    check_digest: bool = False,
) -> onnxruntime.InferenceSession:
    """Like :func:`open_bundle`, returning only the ``onnxruntime.InferenceSession``."""
    return open_bundle(
        bundle, owner_key, device_key, session_options=session_options, providers=providers, check_digest=check_digest
    ).session


_create_session = _session.from_image  # the in-memory path (graph bytes + in-memory weights file)


# --- writing ---------------------------------------------------------------------------------------------------
def protect(
    model: PathLike,
    out: PathLike,
    *,
    signing_key: OwnerPrivateKey,
    recipients: Sequence[DevicePublicKey],
    model_version: int = 0,
    metadata: Mapping[str, str] | None = None,
    chunk_size: int = _stream.DEFAULT_CHUNK_SIZE,
    overwrite: bool = True,
    watermark_key: bytes | None = None,
    progress: ProgressCallback | None = None,
    format_version: int = _format.FORMAT_VERSION,
) -> Manifest:
    """Encrypt ``model`` for ``recipients``, sign the manifest with ``signing_key`` and write ``out`` atomically.

    A model stored with ONNX external data (the only way to ship one over 2 GB) is read together with its data
    files, which must lie in the model's directory. The model's inputs and outputs are recorded in the signed
    metadata (``edgeshield.model_io``, see ``_modelio``). With ``watermark_key`` the owner's spread-spectrum
    watermark (``edgeshield.watermark``) is embedded first, in memory, so the bundle carries the marked model and
    ``model_sha256`` is the marked model's digest. ``progress`` (see ``edgeshield._progress``) hears the bytes read,
    sealed, hashed and written.

    ``format_version`` 2 (the default) keeps a self-contained model's weights inside the graph and signs every
    recipient's per-chunk MACs, so that a device streams decryption into ONNX Runtime; 1 writes the earlier layout
    (weights in a separate section), which devices running an earlier EdgeShield can still open.
    """
    from edgeshield.bundles._image import build_image, has_external_data

    _stream.check_chunk_size(chunk_size)
    if format_version not in _format.SUPPORTED_VERSIONS:
        raise InvalidArgumentError(f"format version must be one of {_format.SUPPORTED_VERSIONS}")
    if not recipients:
        raise InvalidArgumentError("at least one recipient device key is needed")
    if isinstance(model_version, bool) or not isinstance(model_version, int) or not 0 <= model_version < 2**63:
        raise InvalidArgumentError("model version must be an integer between 0 and 2**63-1")
    try:
        meta = _format.validate_metadata(dict(metadata or {}))
    except MalformedBundleError as exc:
        raise InvalidArgumentError(str(exc)) from None
    reserved = sorted(k for k in meta if _modelio.is_reserved(k))
    if reserved:
        raise InvalidArgumentError(f"metadata key {reserved[0]!r} is reserved: protect records the model's inputs "
                                   "and outputs there itself")
    recipient_ids = [key_id(r) for r in recipients]
    if len(set(recipient_ids)) != len(recipient_ids):
        raise InvalidArgumentError("the same recipient key is given twice")
    model_path = check_readable_file(model, what="model")
    if Path(out).resolve() == model_path.resolve():
        raise InvalidArgumentError("the bundle cannot overwrite its own model")
    model_bytes = model_path.read_bytes()
    if watermark_key is not None:
        from edgeshield.watermark import SCHEME, embed

        if has_external_data(model_bytes):
            raise InvalidArgumentError("the weight watermark needs a self-contained ONNX model; this one keeps its "
                                       "weights in external data files")
        model_bytes, _ = embed(model_bytes, watermark_key)
        meta["edgeshield.watermark"] = SCHEME  # which scheme, never the key
    image = build_image(model_bytes, model_path=model_path, from_file=watermark_key is None, progress=progress,
                        inline_weights=format_version >= 2)
    model_sha256, model_size = hashlib.sha256(model_bytes).hexdigest(), len(model_bytes)
    del model_bytes  # the image holds what is needed; the model's bytes would only add to the peak below
    io_entries = image.io.to_metadata()
    if len(meta) + len(io_entries) <= _format.MAX_METADATA_ENTRIES:  # else it is left out: inspect says so
        meta.update(io_entries)
    report(progress, "check that ONNX Runtime loads it", 0, 1)
    _check_loadable(image)
    report(progress, "check that ONNX Runtime loads it", 1, 1)

    data_key = os.urandom(_stream.KEY_SIZE)
    mac_keys = [os.urandom(_stream.KEY_SIZE) for _ in recipients]
    bundle_id = os.urandom(16)

    def sealed() -> Iterator[bytes]:
        return _stream.encrypt_chunks(data_key, bundle_id, image.size, chunk_size, image.read_at)

    # Encryption is deterministic for a given key and nonce sequence: pass one only hashes and MACs, pass two
    # writes, so neither the ciphertext nor a temporary file is ever needed in full.
    n_chunks = _stream.chunk_count(image.size, chunk_size)
    sealed_size = _stream.payload_size(image.size, chunk_size)
    macs = [AESGCM(k) for k in mac_keys]
    chunk_digests: list[bytes] = []
    chunk_tags: list[list[bytes]] = [[] for _ in recipients]
    done = 0
    for i, chunk in enumerate(sealed()):
        chunk_digests.append(hashlib.sha256(chunk).digest())
        for tags, mac in zip(chunk_tags, macs, strict=True):
            tags.append(_stream.chunk_mac(mac, i, i == n_chunks - 1, chunk))
        done += len(chunk)
        report(progress, "encrypt, hash and MAC", done, sealed_size, unit="B")
    payload_sha256 = _stream.digest_of_chunk_digests(chunk_digests)
    plain_hash = hashlib.sha256()
    for offset in range(0, image.size, 1 << 20):
        plain_hash.update(image.read_at(offset, min(1 << 20, image.size - offset)))
        report(progress, "hash the plaintext", min(offset + (1 << 20), image.size), image.size, unit="B")

    manifest = _format.Manifest(
        bundle_id=bundle_id.hex(),
        created=_dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        model_format="onnx",
        model_version=model_version,
        model_sha256=model_sha256,
        model_size=model_size,
        metadata=meta,
        signer_key_id=key_id(signing_key.public_key()),
        chunk_size=chunk_size,
        plaintext_size=image.size,
        plaintext_sha256=plain_hash.hexdigest(),
        payload_size=sealed_size,
        payload_sha256=payload_sha256.hex(),
        data_key_commitment=_format.data_key_commitment(bundle_id, data_key),
        recipients=tuple(
            _format.Recipient(
                rid,
                _wrap.wrap_key(data_key + mac_key, r, bundle_id),
                _stream.digest_of_chunk_digests(tags).hex(),
                b"".join(tags) if format_version >= 2 else b"",
            )
            for rid, r, mac_key, tags in zip(recipient_ids, recipients, mac_keys, chunk_tags, strict=True)
        ),
        image=image.layout,
        format_version=format_version,
    )
    manifest_raw = manifest.encode()
    if len(manifest_raw) > _format.MAX_MANIFEST_SIZE:
        raise InvalidArgumentError(f"the manifest would be {len(manifest_raw)} bytes, over the format's limit of "
                                   f"{_format.MAX_MANIFEST_SIZE}: use a larger chunk size or fewer recipients")
    signature = signing_key.sign(_format.signed_message(manifest_raw, format_version), ec.ECDSA(hashes.SHA256()))
    with atomic_writer(out, overwrite=overwrite) as fh:
        fh.write(_format.encode_header(manifest_raw, signature, format_version))
        done = 0
        for chunk in sealed():
            fh.write(chunk)
            done += len(chunk)
            report(progress, "encrypt and write", done, sealed_size, unit="B")
    return manifest


def _check_loadable(image: PlainImage) -> None:
    """Refuse to ship a bundle that ONNX Runtime could not open on the device."""
    import numpy as np

    _create_session(image.graph, np.frombuffer(image.weights, dtype=np.uint8), image.layout, None, None)
