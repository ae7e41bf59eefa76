"""The VC-JWT form of a credential (W3C VC-JOSE-COSE 1.0, §3.1.1): a compact JWS, signed with
EdDSA (Ed25519), whose payload is the credential itself (no Data Integrity proof) and whose
protected header says ``typ: vc+jwt``, ``cty: vc`` and names the key in ``kid``."""

from __future__ import annotations

import json
from typing import Any, Final

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .keys import SigningKey

ALGORITHM: Final = "EdDSA"
TYP: Final = "vc+jwt"
CTY: Final = "vc"


class InvalidVcJwt(ValueError):
    """Not a VC-JWT this service accepts: bad signature, algorithm, header or payload."""


def to_vc_jwt(credential: dict[str, Any], key: SigningKey, *, kid: str) -> str:
    """Sign ``credential`` (its ``proof``, if any, left out) as a VC-JWT. ``kid`` is the full
    verification method id, e.g. ``did:web:...#key-20261129``."""
    payload = {name: value for name, value in credential.items() if name != "proof"}
    # Signed as a JWS over the JSON text rather than through jwt.encode: PyJWT's claim handling
    # would rewrite names such as exp/iat if a credential ever carried them.
    return jwt.PyJWS().encode(
        json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode(),
        key.private_key,
        algorithm=ALGORITHM,
        headers={"kid": kid, "typ": TYP, "cty": CTY},
    )


def from_vc_jwt(token: str, public_key: Ed25519PublicKey) -> dict[str, Any]:
    """The credential a VC-JWT carries, once its signature by ``public_key`` is checked.

    The algorithm is pinned to EdDSA (``none``, HMAC and anything else are refused, so a public
    key can never be used as an HMAC secret), ``typ`` must be ``vc+jwt`` and ``cty``, if present,
    ``vc``. Validity dates are the credential's (``validFrom``/``validUntil``): not checked here.
    Raises ``InvalidVcJwt``.
    """
    try:
        decoded = jwt.PyJWS().decode_complete(token, key=public_key, algorithms=[ALGORITHM])
    except (jwt.InvalidTokenError, ValueError, TypeError) as error:
        raise InvalidVcJwt(f"not a valid JWS: {error}") from None
    header = decoded["header"]
    if header.get("alg") != ALGORITHM or header.get("typ") != TYP or header.get("cty", CTY) != CTY:
        raise InvalidVcJwt(f"not a VC-JWT header (alg {ALGORITHM}, typ {TYP}, cty {CTY}): {header}")
    if "b64" in header:
        raise InvalidVcJwt("unencoded (b64) payloads are not accepted")
    try:
        credential = json.loads(decoded["payload"])
    except ValueError:
        raise InvalidVcJwt("the payload is not JSON") from None
    if not isinstance(credential, dict):
        raise InvalidVcJwt("the payload is not a JSON object")
    return credential
