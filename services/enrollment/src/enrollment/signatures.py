"""How a partner signs what it sends, and how we check it: one recipe for Kafka and for HTTP.

The signed content is `<id>.<time>.<body>`: the message's id, its time exactly as sent, and the
raw body bytes, joined by dots.
- Kafka: id `ce_id`, time `ce_time` (RFC 3339 text), signature in the `ce_signature` header.
- HTTP (Standard Webhooks): id `webhook-id`, time `webhook-timestamp` (Unix seconds), signature
  in the `webhook-signature` header.

A signature header holds one or more space-separated signatures, each `<scheme>,<base64>` in
Standard Webhooks' notation: `v1` is HMAC-SHA256 keyed with the partner's secret (its ASCII
bytes, exactly as issued), `v1a` is Ed25519 with the partner's private key. One valid signature
by any active credential of the partner is enough, which is how a partner rotates: sign with the
old and the new credential until the old one is revoked.

Signing the id and time with the body binds them: a captured body cannot be replayed under a new
id (our de-duplication key) or, over HTTP, a fresh timestamp.
"""

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Iterable

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_public_key

from .domain import Credential, CredentialKind

HMAC_SCHEME = "v1"
ED25519_SCHEME = "v1a"
# Bounds on what we try: a header stuffed with signatures must not buy CPU time.
MAX_HEADER_LENGTH = 4096
MAX_SIGNATURES = 8
_ED25519_KEY_BYTES = 32
_SIGNATURE_BYTES = {HMAC_SCHEME: 32, ED25519_SCHEME: 64}


class BadSignature(Exception):
    """The signature is missing, malformed, or made with no active credential of the partner."""


def signed_content(message_id: str, time: str, body: bytes) -> bytes:
    """What is signed: `<id>.<time>.<body>`."""
    return f"{message_id}.{time}.".encode() + body


def hmac_signature(secret: str, content: bytes) -> str:
    """A `v1` signature: base64 HMAC-SHA256 of `content`, keyed with the secret's ASCII bytes."""
    digest = hmac.new(secret.encode(), content, hashlib.sha256).digest()
    return f"{HMAC_SCHEME},{base64.b64encode(digest).decode()}"


def ed25519_signature(private_key: Ed25519PrivateKey, content: bytes) -> str:
    """A `v1a` signature: base64 Ed25519 signature of `content`."""
    return f"{ED25519_SCHEME},{base64.b64encode(private_key.sign(content)).decode()}"


def verify(header: str | None, content: bytes, credentials: Iterable[Credential]) -> None:
    """Pass when one signature in `header` verifies with an active credential; else `BadSignature`."""
    if not header or not header.strip():
        raise BadSignature("the message is not signed")
    if len(header) > MAX_HEADER_LENGTH:
        raise BadSignature(f"the signature header is longer than {MAX_HEADER_LENGTH} characters")
    active = [credential for credential in credentials if credential.active]
    if not active:
        raise BadSignature("the partner has no active credential")
    readable = 0
    for item in header.split()[:MAX_SIGNATURES]:
        scheme, _, encoded = item.partition(",")
        try:
            signature = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            continue
        if len(signature) != _SIGNATURE_BYTES.get(scheme):
            continue
        readable += 1
        if any(_verifies(credential, scheme, signature, content) for credential in active):
            return
    if not readable:
        raise BadSignature("no signature in the expected form `v1,<base64>` or `v1a,<base64>`")
    raise BadSignature("no signature matches an active credential of the partner")


def _verifies(credential: Credential, scheme: str, signature: bytes, content: bytes) -> bool:
    if scheme == HMAC_SCHEME and credential.kind is CredentialKind.HMAC_SHA256:
        assert credential.secret is not None
        expected = hmac.new(credential.secret.encode(), content, hashlib.sha256).digest()
        return hmac.compare_digest(expected, signature)
    if scheme == ED25519_SCHEME and credential.kind is CredentialKind.ED25519:
        assert credential.public_key is not None
        try:
            Ed25519PublicKey.from_public_bytes(credential.public_key).verify(signature, content)
        except InvalidSignature:
            return False
        return True
    return False


def new_secret() -> str:
    """A fresh HMAC secret: 32 random bytes, base64url (43 characters)."""
    return secrets.token_urlsafe(32)


def public_key_bytes(text: str) -> bytes:
    """The raw 32-byte Ed25519 public key from a PEM `PUBLIC KEY` or the base64 of the raw key.

    Raises `ValueError` saying why the text is not an Ed25519 public key.
    """
    text = text.strip()
    if text.startswith("-----BEGIN"):
        try:
            key = load_pem_public_key(text.encode())
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise ValueError(f"not a PEM public key: {exc}") from None
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError("the PEM key is not an Ed25519 key")
        return key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("neither a PEM public key nor base64") from None
    if len(raw) != _ED25519_KEY_BYTES:
        raise ValueError(f"an Ed25519 public key is {_ED25519_KEY_BYTES} bytes, this is {len(raw)}")
    return raw
