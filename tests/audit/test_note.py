"""C2SP signed notes, vkeys, checkpoints and cosignatures against the examples their specifications and reference
implementations publish (byte for byte), plus property tests of the parsers."""

from __future__ import annotations

import base64
import contextlib
import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeshield.audit import note as n
from edgeshield.errors import MalformedNoteError, NoteSignatureError

# c2sp.org/signed-note, "Example": this vkey verifies this note.
SPEC_VKEY = "example.com/foo+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k"
SPEC_NOTE = ("This is an example message.\n\n"
             "— example.com/foo Uw2QOkn8srV1yJGh2VYRlL1Tnagv1YEq6TfXppzi2ONncAlTgK7Ztg1ERYNZXsYjOBH3mFXmRKuwHjG1Yu72Ine"
             "yaQM=\n")

# golang.org/x/mod/sumdb/note (the reference implementation), example_test.go and note_test.go: a private key whose
# deterministic Ed25519 signature over TEXT is PETER_SIG, and a second key's signature over the same text.
PETER_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
PETER_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
ENOCH_VKEY = "EnochRoot+af0cfe78+ATtqJ7zOtqQtYqOo0CpvDXNlMhV3HeJDpjrASKGLWdop"
TEXT = "If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n"
PETER_SIG = ("— PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJn"
             "AM=\n")
ENOCH_SIG = ("— EnochRoot rwz+eBzmZa0SO3NbfRGzPCpDckykFXSdeX+MNtCOXm2/5n2tiOHp+vAF1aGrQ5ovTG01oOTGwnWLox33WWd1RvMc+Q"
             "Q=\n")

# A real checkpoint of the Go checksum database (transparency-dev/formats log/note_test.go): key name != origin.
SUMDB_VKEY = "sum.golang.org+033de0ae+Ac4zctda0e5eza+HJyk9SxEdh+s3Ux18htTTAD8OuAn8"
SUMDB_NOTE = ("go.sum database tree\n6476701\nmb8QLQIs0Z0yP5Cstq6guj87oXWeC9gEM8oVikmm9Wk=\n\n"
              "— sum.golang.org Az3grsLX85Gz+s1SiTbgkuqxgItqFq7gsMUEyVnrsa9LM7Us9S+1xbFIGu95949rj4nPRYfvimWEPWL"
              "+o3GeoWwOoAw=\n")

# c2sp.org/tlog-cosignature: the example checkpoint with a witness cosignature, and the signed message it shows.
COSIGNED = ("example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n\n"
            "— example.com/behind-the-sofa Az3grlgtzPICa5OS8npVmf1Myq/5IZniMp+ZJurmRDeOoRDe4URYN7u5/Zhcyv2q1gGzGku9nT"
            "o+zyWE+xeMcTOAYQ8=\n"
            "— witness.example.com/w1 jWbPPwAAAABkGFDLEZMHwSRaJNiIDoe9DYn/zXcrtPHeolMI5OWXEhZCB9dlrDJsX3b2oyin1nPZqhf5"
            "nNo0xUe+mbIUBkBIfZ+qnA==\n")
COSIGNED_MESSAGE = ("cosignature/v1\ntime 1679315147\nexample.com/behind-the-sofa\n20852163\n"
                    "CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n")


def private_from_skey(skey: str) -> Ed25519PrivateKey:
    raw = base64.b64decode(skey.split("+", 4)[4])  # PRIVATE+KEY+name+id+key; the key may hold "+"
    assert raw[0] == n.SIG_ED25519
    return Ed25519PrivateKey.from_private_bytes(raw[1:])


def test_spec_example_verifies() -> None:
    vkey = n.parse_vkey(SPEC_VKEY)
    assert (vkey.name, vkey.key_id.hex(), str(vkey)) == ("example.com/foo", "530d903a", SPEC_VKEY)
    note = n.parse_note(SPEC_NOTE)
    assert note.text == "This is an example message.\n" and str(note) == SPEC_NOTE
    [verified] = n.verify_note(note, [vkey])
    assert verified.vkey == vkey and verified.timestamp is None


def test_reference_implementation_signature_is_reproduced_byte_for_byte() -> None:
    key = private_from_skey(PETER_SKEY)
    assert str(n.make_vkey("PeterNeumann", key.public_key())) == PETER_VKEY
    assert n.sign_note(TEXT, "PeterNeumann", key).line() == PETER_SIG  # Ed25519 is deterministic
    note = n.parse_note(TEXT + "\n" + PETER_SIG + ENOCH_SIG)
    peter, enoch = n.parse_vkey(PETER_VKEY), n.parse_vkey(ENOCH_VKEY)
    assert [v.vkey.name for v in n.verify_note(note, [peter])] == ["PeterNeumann"]  # unknown signers ignored
    assert [v.vkey.name for v in n.verify_note(note, [peter, enoch])] == ["PeterNeumann", "EnochRoot"]
    with pytest.raises(NoteSignatureError):
        n.verify_note(note, [])


def test_signed_note_rejections() -> None:
    peter = n.parse_vkey(PETER_VKEY)
    bad_sig = PETER_SIG[:60] + "ABCD" + PETER_SIG[60:]  # a known key whose signature fails: the note is rejected
    with pytest.raises(NoteSignatureError):
        n.verify_note(n.parse_note(TEXT + "\n" + bad_sig), [peter])
    with pytest.raises(NoteSignatureError):  # known name, other key ID: ignored, so nothing verifies
        n.verify_note(n.parse_note(TEXT + "\n" + PETER_SIG.replace("PeterNeumann", "CarmenSandiego")), [peter])
    for malformed in (TEXT + "\n", TEXT + "\n" + PETER_SIG[:-1], "\x01" + TEXT + "\n" + PETER_SIG,
                      TEXT + "\n" + "— Bad Name x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqd"
                      "ngotpRZb6KE6RyyBwJnAM=\n", TEXT + "\n" + PETER_SIG + "Unexpected line.\n",
                      TEXT + "\n" + PETER_SIG * 33, b"\xff" + TEXT.encode()):
        with pytest.raises(MalformedNoteError):
            n.parse_note(malformed)


def test_real_checkpoint_with_a_key_name_other_than_its_origin() -> None:
    note = n.parse_note(SUMDB_NOTE)
    assert n.verify_note(note, [n.parse_vkey(SUMDB_VKEY)])[0].vkey.name == "sum.golang.org"
    cp = n.parse_checkpoint(note.text)
    assert (cp.origin, cp.tree_size, cp.extensions) == ("go.sum database tree", 6476701, ())
    assert cp.text() == note.text
    assert base64.b64encode(cp.root).decode() == "mb8QLQIs0Z0yP5Cstq6guj87oXWeC9gEM8oVikmm9Wk="


def test_cosignature_format_from_the_spec_example() -> None:
    note = n.parse_note(COSIGNED)
    log_sig, witness_sig = note.signatures
    assert witness_sig.name == "witness.example.com/w1" and witness_sig.key_id.hex() == "8d66cf3f"
    assert len(witness_sig.signature) == 72 and int.from_bytes(witness_sig.signature[:8], "big") == 1679315147
    assert n.cosignature_message(note.text, 1679315147) == COSIGNED_MESSAGE.encode()
    assert log_sig.name == "example.com/behind-the-sofa"


def test_cosign_and_verify_round_trip() -> None:
    key = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    text = n.CheckpointBody("example.com/log", 5, hashlib.sha256(b"x").digest()).text()
    sig = n.cosign(text, "witness.example/w1", key, 1679315147)
    vkey = n.make_vkey("witness.example/w1", key.public_key(), n.SIG_COSIGNATURE_V1)
    raw = key.public_key().public_bytes_raw()
    assert vkey.key_id == hashlib.sha256(b"witness.example/w1\n\x04" + raw).digest()[:4] == sig.key_id
    assert str(vkey).startswith("witness.example/w1+") and base64.b64decode(str(vkey).split("+", 2)[2])[0] == 4
    assert sig.signature[:8] == (1679315147).to_bytes(8, "big")
    key.public_key().verify(sig.signature[8:], n.cosignature_message(text, 1679315147))
    [verified] = n.verify_note(n.Note(text, (sig,)), [vkey])
    assert verified.timestamp == 1679315147
    # the same key as a plain note signer has another key ID: the two never verify each other's signatures
    assert n.make_vkey("witness.example/w1", key.public_key()).key_id != vkey.key_id
    with pytest.raises(NoteSignatureError):  # cosignature of other text
        n.verify_note(n.Note(text.replace("5", "6"), (sig,)), [vkey])


@pytest.mark.parametrize("bad", [
    "example.com/foo+530d903a", "example.com/foo+530D903A+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k",
    "example.com/foo+530d903b+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k",  # key ID does not match
    "example.com/foo+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2",  # not base64
    "PeterNeumann+cc469956+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TWBADKEY==",  # wrong length (Go's test)
    "PeterNeumann+173116ae+ZRpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",  # unknown algorithm (Go's test)
    "bad name+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k", "",
])
def test_bad_vkeys(bad: str) -> None:
    with pytest.raises(MalformedNoteError):
        n.parse_vkey(bad)


@pytest.mark.parametrize("text", [
    "origin\n5\n", "origin\n05\n" + "A" * 43 + "=\n", "origin\n-1\n" + "A" * 43 + "=\n", "\n5\n" + "A" * 43 + "=\n",
    "origin\n5\nAAAA\n", "origin\n5\n" + "A" * 43 + "=", "origin\n5\n" + "A" * 43 + "=\n\n",
    "origin\n٥\n" + "A" * 43 + "=\n",  # noqa: RUF001 - an Arabic-Indic five, which is not an ASCII digit
])
def test_bad_checkpoints(text: str) -> None:
    with pytest.raises(MalformedNoteError):
        n.parse_checkpoint(text)


_names = st.text(st.characters(blacklist_categories=["Zs", "Cc", "Cs", "Zl", "Zp", "Cn", "Co"],
                               blacklist_characters="+"), min_size=1, max_size=20).filter(str.isprintable)
_lines = st.text(st.characters(blacklist_categories=["Cc", "Cs"]), min_size=1, max_size=30)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=_names, lines=st.lists(_lines, min_size=1, max_size=4), seed=st.binary(min_size=32, max_size=32))
def test_sign_format_parse_verify_round_trip(name: str, lines: list[str], seed: bytes) -> None:
    key = Ed25519PrivateKey.from_private_bytes(seed)
    text = "".join(x + "\n" for x in lines)
    sig = n.sign_note(text, name, key)
    note = n.parse_note(n.format_note(text, [sig]))
    assert note.text == text and note.signatures == (sig,)
    assert n.verify_note(note, [n.parse_vkey(str(n.make_vkey(name, key.public_key())))])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400) | st.text(max_size=200).map(str.encode))
def test_parsers_refuse_garbage_with_typed_errors(data: bytes) -> None:
    for parse in (n.parse_note, lambda d: n.parse_checkpoint(d.decode("utf-8", "replace")),
                  lambda d: n.parse_vkey(d.decode("utf-8", "replace"))):
        with contextlib.suppress(MalformedNoteError):
            parse(data)


@settings(max_examples=200, deadline=None)
@given(origin=_names, size=st.integers(0, 2**63 - 1), root=st.binary(min_size=32, max_size=32))
def test_checkpoint_text_round_trip(origin: str, size: int, root: bytes) -> None:
    body = n.CheckpointBody(origin, size, root)
    assert n.parse_checkpoint(body.text()) == body
