"""Bitstring Status List v1.0: encoding, bit order, refusals (zip bombs included) and the shapes of
the list credential and the entries pointing into it."""

from __future__ import annotations

import base64
import gzip
import random
from datetime import UTC, datetime, timedelta, timezone

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from issuance.jsonld import VC_V2, canonicalize
from issuance.keys import SigningKey
from issuance.proofs import sign, verify
from issuance.status_list import (
    MAX_DECODED_BYTES,
    MIN_LIST_SIZE,
    decode_list,
    encode_list,
    get_bit,
    set_bit,
    status_entry,
    status_list_credential,
)

LIST_URL = "https://badges.microcred.example/status/1"
ISSUER = "did:web:badges.microcred.example"
# The empty 16 KiB list as the specification's examples show it (Bitstring Status List v1.0, §2.2).
SPEC_EMPTY_LIST = "uH4sIAAAAAAAAA-3BMQEAAADCoPVPbQwfoAAAAAAAAAAAAAAAAAAAAIC3AYbSVKsAQAAA"


def _empty() -> bytearray:
    return bytearray(MIN_LIST_SIZE // 8)


def test_round_trip_and_determinism() -> None:
    bits = _empty()
    for index in random.Random(7).sample(range(MIN_LIST_SIZE), 500):
        set_bit(bits, index, True)
    encoded = encode_list(bytes(bits))
    assert encoded.startswith("u")
    assert "=" not in encoded
    assert decode_list(encoded) == bits
    assert encode_list(bytes(bits)) == encoded  # no timestamp in the GZIP header


def test_bit_order_is_most_significant_first() -> None:
    bits = _empty()
    set_bit(bits, 0, True)
    set_bit(bits, 9, True)
    set_bit(bits, MIN_LIST_SIZE - 1, True)
    assert bits[:2] == bytes([0b1000_0000, 0b0100_0000])
    assert bits[-1] == 0b0000_0001
    assert [get_bit(bits, index) for index in (0, 1, 8, 9, MIN_LIST_SIZE - 1)] == [
        True,
        False,
        False,
        True,
        True,
    ]
    set_bit(bits, 9, False)
    assert bits[1] == 0
    assert get_bit(bits, 0)


def test_the_empty_list_matches_the_specification() -> None:
    assert decode_list(SPEC_EMPTY_LIST) == bytes(MIN_LIST_SIZE // 8)
    encoded = encode_list(bytes(MIN_LIST_SIZE // 8))
    assert len(encoded) == len(SPEC_EMPTY_LIST) == 69
    # Same DEFLATE stream; only the GZIP header's flag/OS bytes may differ between zlib builds.
    assert encoded[14:] == SPEC_EMPTY_LIST[14:]


def test_lists_below_the_minimum_size_are_not_encoded() -> None:
    with pytest.raises(ValueError, match="131072"):
        encode_list(bytes(MIN_LIST_SIZE // 8 - 1))


@pytest.mark.parametrize("index", [-1, MIN_LIST_SIZE, 10**9])
def test_indexes_outside_the_list_are_refused(index: int) -> None:
    with pytest.raises(IndexError):
        get_bit(bytes(_empty()), index)
    with pytest.raises(IndexError):
        set_bit(_empty(), index, True)


def test_a_zip_bomb_is_refused() -> None:
    bomb = gzip.compress(bytes(MAX_DECODED_BYTES + 1), mtime=0)
    assert len(bomb) < 20_000  # 16 MiB of zeros travel in less than 20 KB
    with pytest.raises(ValueError, match="more than"):
        decode_list("u" + base64.urlsafe_b64encode(bomb).rstrip(b"=").decode())


def test_the_largest_allowed_list_decodes() -> None:
    encoded = "u" + base64.urlsafe_b64encode(gzip.compress(bytes(MAX_DECODED_BYTES), mtime=0)).decode()
    assert len(decode_list(encoded)) == MAX_DECODED_BYTES


def _u(data: bytes) -> str:
    return "u" + base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.mark.parametrize(
    "encoded",
    [
        "",
        "u",
        "z" + SPEC_EMPTY_LIST[1:],  # another multibase
        "uH4sI+AAA/",  # base64, not base64url
        "u!!!!",
        _u(b"not gzip at all"),
        _u(gzip.compress(bytes(MIN_LIST_SIZE // 8))[:-8]),  # truncated
        _u(gzip.compress(bytes(16)) + b"trailing"),
        _u(gzip.compress(bytes(16)) * 2),  # two members
    ],
)
def test_malformed_lists_are_refused(encoded: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011  # the messages vary; the type is the contract
        decode_list(encoded)


def test_status_entry_shape() -> None:
    assert status_entry(LIST_URL, 4711, "revocation") == {
        "id": f"{LIST_URL}#4711",
        "type": "BitstringStatusListEntry",
        "statusPurpose": "revocation",
        "statusListIndex": "4711",
        "statusListCredential": LIST_URL,
    }
    with pytest.raises(ValueError, match="index"):
        status_entry(LIST_URL, -1, "revocation")
    with pytest.raises(ValueError, match="purpose"):
        status_entry(LIST_URL, 1, "revoked")


def test_status_list_credential_shape() -> None:
    bits = _empty()
    set_bit(bits, 4711, True)
    valid_from = datetime(2026, 11, 29, 11, 15, 30, 5, tzinfo=timezone(timedelta(hours=1)))
    credential = status_list_credential(LIST_URL, "revocation", bytes(bits), ISSUER, valid_from)
    encoded = credential["credentialSubject"].pop("encodedList")
    assert credential == {
        "@context": [VC_V2],
        "id": LIST_URL,
        "type": ["VerifiableCredential", "BitstringStatusListCredential"],
        "issuer": ISSUER,
        "validFrom": "2026-11-29T10:15:30Z",
        "credentialSubject": {
            "id": f"{LIST_URL}#list",
            "type": "BitstringStatusList",
            "statusPurpose": "revocation",
        },
    }
    assert get_bit(decode_list(encoded), 4711)
    with pytest.raises(ValueError, match="timezone"):
        status_list_credential(LIST_URL, "revocation", bytes(bits), ISSUER, datetime(2026, 11, 29))
    with pytest.raises(ValueError, match="purpose"):
        status_list_credential(LIST_URL, "message", bytes(bits), ISSUER, valid_from)


def test_status_list_credential_signs_and_verifies() -> None:
    key = SigningKey("key-20261129", Ed25519PrivateKey.generate(), datetime(2026, 11, 29, tzinfo=UTC))
    now = datetime(2026, 11, 29, 10, 15, tzinfo=UTC)
    credential = status_list_credential(LIST_URL, "revocation", bytes(_empty()), ISSUER, now)
    assert "BitstringStatusList>" in canonicalize(credential)  # every term defined by VC 2.0
    secured = sign(credential, key, verification_method=f"{ISSUER}#{key.key_id}", created=now)
    assert verify(secured, key.public_key)
    bits = _empty()
    set_bit(bits, 1, True)
    secured["credentialSubject"]["encodedList"] = encode_list(bytes(bits))  # a revocation forged
    assert not verify(secured, key.public_key)
