"""RFC 9458 Appendix A byte for byte, RFC 9292 Figure 8, and `cryptography`'s HPKE as the independent opener of
the requests we make (pyhpke builds them)."""

from __future__ import annotations

import pytest

pytest.importorskip("pyhpke")

from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import x25519

from edgeshield.transport import _ohttp as o

# RFC 9458 Appendix A (https://www.rfc-editor.org/rfc/rfc9458#appendix-A)
SKR = "3c168975674b2fa8e465970b79c8dcf09f1c741626480bd4c6162fc5b6a98e1a"
PKR = "31e1f05a740102115220e9af918f738674aec95f54db6e04eb705aae8e798155"
KEY_CONFIG = "01002031e1f05a740102115220e9af918f738674aec95f54db6e04eb705aae8e79815500080001000100010003"
REQUEST = "00034745540568747470730b6578616d706c652e636f6d012f"
SKE = "bc51d5e930bda26589890ac7032f70ad12e4ecb37abb1b65b1256c9c48999c73"
PKE = "4b28f881333e7c164ffc499ad9796f877f4e1051ee6d31bad19dec96c208b472"
INFO = "6d6573736167652f626874747020726571756573740001002000010001"
ENC_REQUEST = ("010020000100014b28f881333e7c164ffc499ad9796f877f4e1051ee6d31bad19dec96c208b472"
               "6374e469135906992e1268c594d2a10c695d858c40a026e7965e7d86b83dd440b2c0185204b4d63525")
RESPONSE = "0140c8"
RESPONSE_NONCE = "c789e7151fcba46158ca84b04464910d"
ENC_RESPONSE = "c789e7151fcba46158ca84b04464910d86f9013e404feea014e7be4a441f234f857fbd"
# RFC 9292 Figure 8: GET /hello.txt, known length
FIG8 = ("0003474554056874747073000a2f68656c6c6f2e747874406c0a757365722d6167656e74346375726c2f372e31362e33206c696263"
        "75726c2f372e31362e33204f70656e53534c2f302e392e376c207a6c69622f312e322e3304686f73740f7777772e6578616d706c65"
        "2e636f6d0f6163636570742d6c616e677561676506656e2c206d690000")

SUITES = ((o.KDF_HKDF_SHA256, o.AEAD_AES_128_GCM), (o.KDF_HKDF_SHA256, o.AEAD_CHACHA20))


def gateway() -> o.KeyPair:
    return o.KeyPair(1, x25519.X25519PrivateKey.from_private_bytes(bytes.fromhex(SKR)), SUITES)


def test_key_configuration() -> None:
    config = gateway().config
    assert config.public_key.hex() == PKR
    assert config.encode().hex() == KEY_CONFIG
    assert o.KeyConfig.parse(bytes.fromhex(KEY_CONFIG)) == config
    listed = o.encode_key_configs([config])
    assert listed[:2] == len(bytes.fromhex(KEY_CONFIG)).to_bytes(2, "big")
    assert o.parse_key_configs(listed) == [config]


def test_request_info_and_encapsulation_with_the_given_ephemeral_key() -> None:
    assert o.request_info(1, 1, 1).hex() == INFO
    ephemeral = x25519.X25519PrivateKey.from_private_bytes(bytes.fromhex(SKE))
    assert ephemeral.public_key().public_bytes_raw().hex() == PKE
    data, sender = o.encapsulate_request(gateway().config, bytes.fromhex(REQUEST), ephemeral=ephemeral)
    assert data.hex() == ENC_REQUEST
    assert sender.enc.hex() == PKE
    assert sender.open_response(bytes.fromhex(ENC_RESPONSE)).hex() == RESPONSE


def test_decapsulation_and_the_response_with_the_given_nonce() -> None:
    plain, receiver = o.decapsulate_request([gateway()], bytes.fromhex(ENC_REQUEST))
    assert plain.hex() == REQUEST
    request = o.BhttpRequest.parse(plain)
    assert (request.method, request.scheme, request.authority, request.path) == (b"GET", b"https", b"example.com",
                                                                                  b"/")
    assert receiver.seal_response(bytes.fromhex(RESPONSE), nonce=bytes.fromhex(RESPONSE_NONCE)).hex() == ENC_RESPONSE
    assert o.BhttpResponse.parse(bytes.fromhex(RESPONSE)) == o.BhttpResponse(200)


def test_bhttp_rfc9292_figure_8() -> None:
    request = o.BhttpRequest.parse(bytes.fromhex(FIG8))
    assert request.method == b"GET" and request.path == b"/hello.txt" and request.authority == b""
    assert request.headers == ((b"user-agent", b"curl/7.16.3 libcurl/7.16.3 OpenSSL/0.9.7l zlib/1.2.3"),
                               (b"host", b"www.example.com"), (b"accept-language", b"en, mi"))
    assert request.encode().hex() == FIG8


@pytest.mark.parametrize("aead", [o.AEAD_AES_128_GCM, o.AEAD_CHACHA20, o.AEAD_AES_256_GCM])
def test_cryptography_opens_the_requests_we_make(aead: int) -> None:
    """The request encapsulation is a single-shot Base-mode seal with empty aad: an independent HPKE must open it."""
    pair = o.KeyPair.generate(7, ((o.KDF_HKDF_SHA256, aead),))
    data, _ = o.encapsulate_request(pair.config, b"hello through the relay")
    names = {o.AEAD_AES_128_GCM: hpke.AEAD.AES_128_GCM, o.AEAD_CHACHA20: hpke.AEAD.CHACHA20_POLY1305,
             o.AEAD_AES_256_GCM: hpke.AEAD.AES_256_GCM}
    suite = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, names[aead])
    assert suite.decrypt(data[7:], pair.private_key, info=o.request_info(7, 1, aead)) == b"hello through the relay"
    # and the other way round: what cryptography seals, we open
    sealed = suite.encrypt(b"the other way", pair.private_key.public_key(), info=o.request_info(7, 1, aead))
    plain, _ = o.decapsulate_request([pair], data[:7] + sealed)
    assert plain == b"the other way"
