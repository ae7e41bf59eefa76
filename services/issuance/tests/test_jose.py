"""VC-JWT (VC-JOSE-COSE): round trip, header, and tokens that must be refused."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from issuance.jose import InvalidVcJwt, from_vc_jwt, to_vc_jwt
from issuance.jsonld import OB_V3, VC_V2
from issuance.keys import SigningKey
from issuance.proofs import sign

KID = "did:web:badges.microcred.example#key-20261129"
CREDENTIAL: dict[str, Any] = {
    "@context": [VC_V2, OB_V3],
    "id": "urn:uuid:5d1fb1d4-5bfc-4a5d-9c4f-3c3b2f0f6a01",
    "type": ["VerifiableCredential", "OpenBadgeCredential"],
    "name": "Introduction to Data Engineering — ÉTÉ 🎓",
    "issuer": {"id": "did:web:badges.microcred.example", "type": ["Profile"], "name": "Microcred"},
    "validFrom": "2026-11-29T10:15:00Z",
    "credentialSubject": {
        "type": ["AchievementSubject"],
        "achievement": {"id": "urn:x:a", "type": ["Achievement"]},
    },
}


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey("key-20261129", Ed25519PrivateKey.generate(), datetime(2026, 11, 29, tzinfo=UTC))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _parts(token: str) -> list[str]:
    return token.split(".")


def test_round_trip(key: SigningKey) -> None:
    token = to_vc_jwt(CREDENTIAL, key, kid=KID)
    assert from_vc_jwt(token, key.public_key) == CREDENTIAL
    assert jwt.get_unverified_header(token) == {"alg": "EdDSA", "kid": KID, "typ": "vc+jwt", "cty": "vc"}


def test_the_data_integrity_proof_is_left_out(key: SigningKey) -> None:
    secured = sign(CREDENTIAL, key, verification_method=KID, created=datetime(2026, 11, 29, tzinfo=UTC))
    assert from_vc_jwt(to_vc_jwt(secured, key, kid=KID), key.public_key) == CREDENTIAL


def test_a_tampered_payload_is_refused(key: SigningKey) -> None:
    header, _, signature = _parts(to_vc_jwt(CREDENTIAL, key, kid=KID))
    forged = _b64(json.dumps({**CREDENTIAL, "name": "Something else"}).encode())
    with pytest.raises(InvalidVcJwt):
        from_vc_jwt(f"{header}.{forged}.{signature}", key.public_key)


def test_another_key_is_refused(key: SigningKey) -> None:
    with pytest.raises(InvalidVcJwt):
        from_vc_jwt(to_vc_jwt(CREDENTIAL, key, kid=KID), Ed25519PrivateKey.generate().public_key())


def test_alg_none_is_refused(key: SigningKey) -> None:
    header = _b64(json.dumps({"alg": "none", "typ": "vc+jwt", "kid": KID}).encode())
    payload = _b64(json.dumps(CREDENTIAL).encode())
    with pytest.raises(InvalidVcJwt):
        from_vc_jwt(f"{header}.{payload}.", key.public_key)


def test_hs256_with_the_public_key_as_secret_is_refused(key: SigningKey) -> None:
    # The classic algorithm confusion: an attacker "signs" with the verifier's public key bytes.
    secret = key.public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    token = jwt.PyJWS().encode(
        json.dumps(CREDENTIAL).encode(), secret, algorithm="HS256", headers={"typ": "vc+jwt", "kid": KID}
    )
    with pytest.raises(InvalidVcJwt):
        from_vc_jwt(token, key.public_key)


@pytest.mark.parametrize(
    "headers",
    [
        {"typ": "JWT"},
        {"typ": "vc+ld+jwt"},
        {"typ": "vc+jwt", "cty": "vp"},
        {"typ": "vc+jwt", "crit": ["exp"], "exp": 1},
    ],
)
def test_other_headers_are_refused(key: SigningKey, headers: dict[str, Any]) -> None:
    token = jwt.PyJWS().encode(
        json.dumps(CREDENTIAL).encode(), key.private_key, algorithm="EdDSA", headers=headers
    )
    with pytest.raises(InvalidVcJwt):
        from_vc_jwt(token, key.public_key)


@pytest.mark.parametrize("payload", [b"[1, 2]", b"not json", b'"a string"'])
def test_payloads_that_are_not_credentials_are_refused(key: SigningKey, payload: bytes) -> None:
    token = jwt.PyJWS().encode(payload, key.private_key, algorithm="EdDSA", headers={"typ": "vc+jwt"})
    with pytest.raises(InvalidVcJwt):
        from_vc_jwt(token, key.public_key)


@pytest.mark.parametrize("token", ["", "a.b", "a.b.c", "....", "eyJhbGciOiJFZERTQSJ9.e30."])
def test_garbage_is_refused(key: SigningKey, token: str) -> None:
    with pytest.raises(InvalidVcJwt):
        from_vc_jwt(token, key.public_key)
