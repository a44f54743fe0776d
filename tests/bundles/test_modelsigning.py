"""OpenSSF model-signing interop: our sign/verify wrappers and the library's own CLI agree."""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("model_signing")

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from edgeshield.bundles._modelsigning import sign_model, verify_model
from edgeshield.errors import (
    KeyFileError,
    MissingDependencyError,
    ModelSignatureError,
    NotAFileError,
    PassphraseError,
    PathNotFoundError,
)

PASSPHRASE = b"correct horse battery staple"
CLI = Path(sys.executable).parent / "model_signing"
UNENCRYPTED_MARKERS = (b"-----BEGIN PRIVATE KEY-----", b"-----BEGIN EC PRIVATE KEY-----")


def _write_keypair(directory: Path, *, password: bytes | None = None, name: str = "owner") -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    enc = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    priv = directory / f"{name}.key"
    pub = directory / f"{name}.pub"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc))
    pub.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return priv, pub


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    d = tmp_path / "keys"
    d.mkdir()
    return _write_keypair(d)


@pytest.fixture
def model(tmp_path: Path) -> Path:
    p = tmp_path / "model.onnx"
    p.write_bytes(os.urandom(10_000))
    return p


@pytest.fixture
def signed(tmp_path: Path, keys: tuple[Path, Path], model: Path) -> Path:
    sig = tmp_path / "model.onnx.sig"
    sign_model(model, keys[0], sig)
    return sig


def _cli_verify(model: Path, sig: Path, pub: Path) -> subprocess.CompletedProcess[str]:
    if not CLI.exists():
        pytest.skip(f"model_signing CLI not found next to {sys.executable}")
    return subprocess.run(
        [str(CLI), "verify", "key", str(model), "--signature", str(sig), "--public_key", str(pub)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


# --- happy paths ----------------------------------------------------------------------------------------------------
def test_sign_then_verify(signed: Path, keys: tuple[Path, Path], model: Path) -> None:
    verify_model(model, signed, keys[1])
    bundle = json.loads(signed.read_text())
    assert bundle["mediaType"] == "application/vnd.dev.sigstore.bundle.v0.3+json"
    assert bundle["verificationMaterial"]["tlogEntries"] == []  # local key only: no Rekor
    statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    assert [r["name"] for r in statement["predicate"]["resources"]] == ["."]
    assert statement["subject"][0]["name"] == "model.onnx"


def test_key_as_pem_bytes(tmp_path: Path, keys: tuple[Path, Path], model: Path) -> None:
    sig = tmp_path / "bytes.sig"
    sign_model(model, keys[0].read_bytes(), sig)
    verify_model(model, sig, keys[1])


def test_library_cli_verifies_our_signature(signed: Path, keys: tuple[Path, Path], model: Path) -> None:
    res = _cli_verify(model, signed, keys[1])
    assert res.returncode == 0, res.stderr
    assert "Verification succeeded" in res.stdout


def test_we_verify_library_cli_signature(tmp_path: Path, keys: tuple[Path, Path], model: Path) -> None:
    if not CLI.exists():
        pytest.skip("model_signing CLI not found")
    sig = tmp_path / "cli.sig"
    res = subprocess.run(
        [str(CLI), "sign", "key", str(model), "--private_key", str(keys[0]), "--signature", str(sig)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    verify_model(model, sig, keys[1])


def test_file_name_and_location_are_not_signed(
    tmp_path: Path, signed: Path, keys: tuple[Path, Path], model: Path
) -> None:
    other = tmp_path / "elsewhere"
    other.mkdir()
    moved = other / "renamed.bin"
    shutil.copyfile(model, moved)
    verify_model(moved, signed, keys[1])
    assert _cli_verify(moved, signed, keys[1]).returncode == 0


def test_symlinked_model_is_followed(tmp_path: Path, signed: Path, keys: tuple[Path, Path], model: Path) -> None:
    link = tmp_path / "link.onnx"
    link.symlink_to(model)
    verify_model(link, signed, keys[1])


def test_existing_signature_is_replaced(tmp_path: Path, keys: tuple[Path, Path], model: Path) -> None:
    sig = tmp_path / "model.sig"
    sig.write_text("old")
    sign_model(model, keys[0], sig)
    verify_model(model, sig, keys[1])
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# --- encrypted owner key --------------------------------------------------------------------------------------------
def _scan_for_plaintext_keys(roots: list[Path], since: float, exclude: Path | None = None) -> list[Path]:
    found = []
    for root in roots:
        for dirpath, dirs, files in os.walk(root, onerror=lambda _e: None):
            if exclude is not None:
                dirs[:] = [d for d in dirs if Path(dirpath, d) != exclude]
            for name in files:
                p = Path(dirpath) / name
                try:
                    st = p.lstat()
                    if not stat.S_ISREG(st.st_mode) or st.st_mtime < since or st.st_size > 1_000_000:
                        continue
                    data = p.read_bytes()
                except OSError:
                    continue
                if any(m in data for m in UNENCRYPTED_MARKERS):
                    found.append(p)
    return found


@pytest.mark.parametrize("as_bytes", [False, True], ids=["key-path", "key-bytes"])
def test_encrypted_key_never_lands_on_disk_in_clear(
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    model: Path,
    monkeypatch: pytest.MonkeyPatch,
    as_bytes: bool,
) -> None:
    from model_signing._signing import sign_ec_key

    keydir = tmp_path / "enc"
    keydir.mkdir()
    priv, pub = _write_keypair(keydir, password=PASSPHRASE)
    assert b"ENCRYPTED PRIVATE KEY" in priv.read_bytes()
    # The real system temp dir, minus pytest's own tree (other tests keep plain keys there); plus tmp_path, which
    # also holds this process's temp dir for the duration so that any temp file we create is scanned for sure.
    system_tmp = Path(tempfile.gettempdir())
    pytest_root = tmp_path_factory.getbasetemp().parent
    private_tmp = tmp_path / "systmp"
    private_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private_tmp))
    since = time.time() - 1

    def scan() -> list[Path]:
        return _scan_for_plaintext_keys([tmp_path], since) + _scan_for_plaintext_keys([system_tmp], since, pytest_root)
    seen: list[tuple[str, int, list[Path]]] = []
    real_init = sign_ec_key.Signer.__init__

    def spy_init(self, private_key_path, password=None):  # type: ignore[no-untyped-def]
        # At the moment model-signing loads the key: what path did it get, and is any clear key on disk?
        seen.append((str(private_key_path), os.stat(private_key_path).st_mode, scan()))
        real_init(self, private_key_path, password)

    monkeypatch.setattr(sign_ec_key.Signer, "__init__", spy_init)
    sig = tmp_path / "model.sig"
    sign_model(model, priv.read_bytes() if as_bytes else priv, sig, password=PASSPHRASE)

    assert len(seen) == 1
    key_path, mode, leaked = seen[0]
    assert leaked == []
    if os.path.isdir("/dev/fd"):
        assert stat.S_ISFIFO(mode), f"key handed to model-signing via {key_path}, not a pipe"
    assert scan() == []
    verify_model(model, sig, pub)
    assert _cli_verify(model, sig, pub).returncode == 0


def test_encrypted_key_str_password(tmp_path: Path, model: Path) -> None:
    priv, pub = _write_keypair(tmp_path, password=PASSPHRASE)
    sign_model(model, priv, tmp_path / "s.sig", password=PASSPHRASE.decode())
    verify_model(model, tmp_path / "s.sig", pub)


def test_encrypted_key_needs_right_passphrase(tmp_path: Path, model: Path) -> None:
    priv, _pub = _write_keypair(tmp_path, password=PASSPHRASE)
    sig = tmp_path / "s.sig"
    with pytest.raises(PassphraseError):
        sign_model(model, priv, sig)
    with pytest.raises(PassphraseError):
        sign_model(model, priv, sig, password=b"wrong")
    assert not sig.exists()


def test_passphrase_for_plain_key_is_refused(keys: tuple[Path, Path], model: Path, tmp_path: Path) -> None:
    with pytest.raises(PassphraseError):
        sign_model(model, keys[0], tmp_path / "s.sig", password=PASSPHRASE)


def test_failed_signing_keeps_existing_signature(tmp_path: Path, model: Path) -> None:
    priv, _pub = _write_keypair(tmp_path, password=PASSPHRASE)
    sig = tmp_path / "s.sig"
    sig.write_bytes(b"previous")
    with pytest.raises(PassphraseError):
        sign_model(model, priv, sig, password=b"wrong")
    assert sig.read_bytes() == b"previous"


# --- failures -------------------------------------------------------------------------------------------------------
def test_tampered_model(signed: Path, keys: tuple[Path, Path], model: Path) -> None:
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    with pytest.raises(ModelSignatureError) as info:
        verify_model(model, signed, keys[1])
    assert "\n" not in str(info.value)
    assert _cli_verify(model, signed, keys[1]).returncode != 0


def test_truncated_and_empty_model(signed: Path, keys: tuple[Path, Path], model: Path) -> None:
    model.write_bytes(model.read_bytes()[:-1])
    with pytest.raises(ModelSignatureError):
        verify_model(model, signed, keys[1])
    model.write_bytes(b"")
    with pytest.raises(ModelSignatureError):
        verify_model(model, signed, keys[1])


def test_other_public_key(tmp_path: Path, signed: Path, model: Path) -> None:
    _priv, other_pub = _write_keypair(tmp_path, name="other")
    with pytest.raises(ModelSignatureError):
        verify_model(model, signed, other_pub)
    assert _cli_verify(model, signed, other_pub).returncode != 0


def test_other_public_key_without_hint(tmp_path: Path, signed: Path, model: Path) -> None:
    # Stripping the key hint must not help: the ECDSA check still fails under the wrong key.
    _priv, other_pub = _write_keypair(tmp_path, name="other")
    bundle = json.loads(signed.read_text())
    bundle["verificationMaterial"]["publicKey"].pop("hint")
    signed.write_text(json.dumps(bundle))
    with pytest.raises(ModelSignatureError):
        verify_model(model, signed, other_pub)


def _edit_bundle(sig: Path, edit) -> None:  # type: ignore[no-untyped-def]
    bundle = json.loads(sig.read_text())
    edit(bundle)
    sig.write_text(json.dumps(bundle))


def _flip_sig(b: dict) -> None:
    raw = bytearray(base64.b64decode(b["dsseEnvelope"]["signatures"][0]["sig"]))
    raw[-1] ^= 0x01
    b["dsseEnvelope"]["signatures"][0]["sig"] = base64.b64encode(bytes(raw)).decode()


def _swap_digest(b: dict) -> None:
    st = json.loads(base64.b64decode(b["dsseEnvelope"]["payload"]))
    st["predicate"]["resources"][0]["digest"] = "00" * 32
    b["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(st).encode()).decode()


def _ignore_everything(b: dict) -> None:
    st = json.loads(base64.b64decode(b["dsseEnvelope"]["payload"]))
    st["predicate"]["resources"] = []
    st["predicate"]["serialization"]["ignore_paths"].append(".")
    b["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(st).encode()).decode()


@pytest.mark.parametrize(
    "edit",
    [
        _flip_sig,
        _swap_digest,
        _ignore_everything,
        lambda b: b["dsseEnvelope"].__setitem__("signatures", []),
        lambda b: b["dsseEnvelope"]["signatures"][0].__setitem__("sig", "!!not base64"),
        lambda b: b.__setitem__("mediaType", "application/x-other"),
        lambda b: b.pop("verificationMaterial"),
    ],
    ids=["flipped-sig", "swapped-digest", "ignore-everything", "no-sigs", "bad-base64", "media-type", "no-material"],
)
def test_tampered_signature(signed: Path, keys: tuple[Path, Path], model: Path, edit) -> None:  # type: ignore[no-untyped-def]
    _edit_bundle(signed, edit)
    with pytest.raises(ModelSignatureError) as info:
        verify_model(model, signed, keys[1])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "content", [b"", b"not json", b"[]", b"{}", b"\xff\xfe"], ids=["empty", "text", "list", "obj", "bin"]
)
def test_garbage_signature_file(signed: Path, keys: tuple[Path, Path], model: Path, content: bytes) -> None:
    signed.write_bytes(content)
    with pytest.raises(ModelSignatureError):
        verify_model(model, signed, keys[1])


def test_flipped_byte_anywhere_in_signature_file(signed: Path, keys: tuple[Path, Path], model: Path) -> None:
    original = signed.read_bytes()
    for i in range(0, len(original), max(1, len(original) // 40)):
        data = bytearray(original)
        data[i] ^= 0x01
        signed.write_bytes(bytes(data))
        try:
            verify_model(model, signed, keys[1])
        except ModelSignatureError:
            continue
        # A flip that survives must not have changed anything signed (e.g. JSON whitespace/escaping can't occur
        # in this compact output, so no flip should survive).
        pytest.fail(f"flipping byte {i} of the signature file went unnoticed")


def test_bad_paths(tmp_path: Path, signed: Path, keys: tuple[Path, Path], model: Path) -> None:
    with pytest.raises(PathNotFoundError):
        verify_model(tmp_path / "missing.onnx", signed, keys[1])
    with pytest.raises(NotAFileError):
        verify_model(tmp_path, signed, keys[1])
    with pytest.raises(PathNotFoundError):
        verify_model(model, tmp_path / "missing.sig", keys[1])
    with pytest.raises(PathNotFoundError):
        verify_model(model, signed, tmp_path / "missing.pub")
    with pytest.raises(PathNotFoundError):
        sign_model(tmp_path / "missing.onnx", keys[0], tmp_path / "x.sig")
    with pytest.raises(PathNotFoundError):
        sign_model(model, tmp_path / "missing.key", tmp_path / "x.sig")
    with pytest.raises(NotAFileError):
        sign_model(model, keys[0], tmp_path)
    with pytest.raises(PathNotFoundError):
        sign_model(model, keys[0], tmp_path / "no-such-dir" / "x.sig")


def test_bad_keys(tmp_path: Path, signed: Path, keys: tuple[Path, Path], model: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_bytes(b"-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n")
    with pytest.raises(KeyFileError):
        verify_model(model, signed, junk)
    empty = tmp_path / "empty.pub"
    empty.write_bytes(b"")
    with pytest.raises(KeyFileError):
        verify_model(model, signed, empty)
    with pytest.raises(KeyFileError):  # a private key where the public key belongs
        verify_model(model, signed, keys[0])
    ed = ed25519.Ed25519PrivateKey.generate()
    ed_priv = tmp_path / "ed.key"
    ed_priv.write_bytes(
        ed.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    ed_pub = tmp_path / "ed.pub"
    ed_pub.write_bytes(
        ed.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(KeyFileError):
        sign_model(model, ed_priv, tmp_path / "x.sig")
    with pytest.raises(KeyFileError):
        verify_model(model, signed, ed_pub)
    with pytest.raises(KeyFileError):
        sign_model(model, keys[1], tmp_path / "x.sig")  # a public key where the private key belongs
    with pytest.raises(KeyFileError):
        sign_model(model, b"not a key", tmp_path / "x.sig")
    assert not (tmp_path / "x.sig").exists()


def test_missing_dependency(
    monkeypatch: pytest.MonkeyPatch, signed: Path, keys: tuple[Path, Path], model: Path
) -> None:
    monkeypatch.setitem(sys.modules, "model_signing", None)
    with pytest.raises(MissingDependencyError, match=r"edgeshield\[owner\]"):
        verify_model(model, signed, keys[1])
    with pytest.raises(MissingDependencyError):
        sign_model(model, keys[0], signed)


def test_owner_signed_statement_that_ignores_the_model_is_refused(
    tmp_path: Path, keys: tuple[Path, Path], model: Path
) -> None:
    # model-signing itself accepts any content for a (genuinely signed) statement whose ignore_paths hold ".";
    # verify_model insists the statement covers exactly the one model file.
    import model_signing

    sig = tmp_path / "ignores.sig"
    model_signing.signing.Config().use_elliptic_key_signer(private_key=keys[0]).set_hashing_config(
        model_signing.hashing.Config().set_ignored_paths(paths=["."])
    ).sign(model, sig)
    evil = tmp_path / "evil.onnx"
    evil.write_bytes(b"anything at all")
    model_signing.verifying.Config().use_elliptic_key_verifier(public_key=keys[1]).verify(evil, sig)  # library: ok
    with pytest.raises(ModelSignatureError, match="exactly one model file"):
        verify_model(evil, sig, keys[1])
