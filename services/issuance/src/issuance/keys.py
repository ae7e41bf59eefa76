"""Issuer signing keys (Ed25519), their public forms (Multikey, DID document, JWKS) and did:web.

A key ring is a directory with one unencrypted PKCS#8 PEM file per key, ``<key_id>.pem`` (a
Kubernetes Secret mounted as a folder looks exactly like this), and optionally a file ``active``
holding the id of the key to sign with. Rotation is ``generate_key``: the new key signs from
then on, the old ones stay in the ring so credentials they signed still verify.

A key's ``created`` comes from its id when the id carries a date (``key-20261129`` or
``key-20261129T101500Z``, what ``generate_key`` writes), otherwise from the file's mtime. Dates in
ids are preferred because a mounted Secret gives every file the mount time. Without an ``active``
file the newest key signs (ties broken by id).
"""

from __future__ import annotations

import base64
import os
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote, unquote, urlsplit

import base58
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
)

ACTIVE_FILE: Final = "active"
_KEY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # safe in a file name and a URL fragment
_DATE_IN_KEY_ID = re.compile(r"(\d{8})(?:T(\d{6})Z)?")
_ED25519_PUB_MULTICODEC: Final = b"\xed\x01"
_LOCAL_HOSTS: Final = frozenset({"localhost", "127.0.0.1", "::1"})
_HOST = re.compile(r"(?P<name>[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")


class KeyRingError(Exception):
    """The key directory is missing, empty or holds something that is not a usable key."""


@dataclass(frozen=True)
class SigningKey:
    """One Ed25519 issuer key. ``key_id`` is the DID URL fragment naming it (``<did>#<key_id>``)."""

    key_id: str
    private_key: Ed25519PrivateKey = field(repr=False)
    created: datetime

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()

    @property
    def public_key_multibase(self) -> str:
        """Multikey form: "z" + base58btc(0xed01 || raw 32-byte public key)."""
        return "z" + base58.b58encode(_ED25519_PUB_MULTICODEC + _raw(self.public_key)).decode()


@dataclass(frozen=True)
class KeyRing:
    """All keys of an issuer, oldest first; ``signing`` is the one new credentials are signed with."""

    signing: SigningKey
    keys: tuple[SigningKey, ...]

    def get(self, key_id: str) -> SigningKey | None:
        """The key with this id, if the ring has it."""
        return next((key for key in self.keys if key.key_id == key_id), None)


def load_keyring(directory: Path) -> KeyRing:
    """Read a key directory (see the module docstring). Raises ``KeyRingError`` naming the path
    when the directory is missing or empty, a file is not an Ed25519 PKCS#8 PEM key named by a
    valid key id, or ``active`` names a key that is not there."""
    if not directory.is_dir():
        raise KeyRingError(f"{directory}: key directory not found")
    keys: list[SigningKey] = []
    for path in sorted(directory.iterdir()):
        # Kubernetes mounts a Secret as ..data/..<timestamp> entries plus symlinks: skip dot-files.
        if path.name.startswith(".") or path.name == ACTIVE_FILE:
            continue
        keys.append(_load_key(path))
    if not keys:
        raise KeyRingError(f"{directory}: no keys (<key_id>.pem files)")
    keys.sort(key=lambda key: (key.created, key.key_id))
    active_path = directory / ACTIVE_FILE
    if active_path.exists():
        active_id = active_path.read_text().strip()
        signing = next((key for key in keys if key.key_id == active_id), None)
        if signing is None:
            raise KeyRingError(f"{active_path}: names key {active_id!r}, which is not in the directory")
    else:
        signing = keys[-1]
    return KeyRing(signing=signing, keys=tuple(keys))


def generate_key(directory: Path, key_id: str | None = None, *, activate: bool = True) -> SigningKey:
    """Create a new Ed25519 key as ``<directory>/<key_id>.pem`` (mode 0600, never overwriting) and,
    if ``activate``, name it in ``active``. The default id is ``key-<UTC timestamp>``. The directory
    is created (mode 0700) if needed. Raises ``KeyRingError`` for a bad or existing key id."""
    created = datetime.now(UTC).replace(microsecond=0)
    if key_id is None:
        key_id = f"key-{created:%Y%m%dT%H%M%SZ}"
    if not _KEY_ID.fullmatch(key_id):
        raise KeyRingError(f"{key_id!r}: a key id is 1-64 letters, digits, '.', '_' or '-'")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / f"{key_id}.pem"
    private_key = Ed25519PrivateKey.generate()
    pem = private_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    try:
        # O_EXCL: rotating must never replace a key that credentials were signed with.
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyRingError(f"{path}: a key with this id already exists") from None
    with os.fdopen(descriptor, "wb") as file:
        file.write(pem)
    if activate:
        # Written then renamed, so a reader never sees a half-written name.
        temporary = directory / f".{ACTIVE_FILE}.tmp"
        temporary.write_text(key_id + "\n")
        temporary.replace(directory / ACTIVE_FILE)
    return SigningKey(key_id=key_id, private_key=private_key, created=_created(key_id, path))


def did_document(did: str, ring: KeyRing) -> dict[str, Any]:
    """The DID Core document of ``did`` listing every key of the ring as a Multikey verification
    method ``<did>#<key_id>``, each usable for assertion (credentials) and authentication."""
    methods = [
        {
            "id": f"{did}#{key.key_id}",
            "type": "Multikey",
            "controller": did,
            "publicKeyMultibase": key.public_key_multibase,
        }
        for key in ring.keys
    ]
    ids = [method["id"] for method in methods]
    return {
        "@context": ["https://www.w3.org/ns/did/v1", "https://w3id.org/security/multikey/v1"],
        "id": did,
        "verificationMethod": methods,
        "assertionMethod": ids,
        "authentication": list(ids),
    }


def jwks(ring: KeyRing, *, did: str | None = None) -> dict[str, Any]:
    """The ring's public keys as a JWK Set (RFC 8037 OKP/Ed25519). Each ``kid`` is the key id, or
    the full verification method id ``<did>#<key_id>`` when ``did`` is given (what VC-JWTs carry)."""
    return {
        "keys": [
            {
                "kty": "OKP",
                "crv": "Ed25519",
                "x": base64.urlsafe_b64encode(_raw(key.public_key)).rstrip(b"=").decode(),
                "kid": f"{did}#{key.key_id}" if did else key.key_id,
                "alg": "EdDSA",
                "use": "sig",
            }
            for key in ring.keys
        ]
    }


def did_web(base_url: str, *path: str) -> str:
    """The did:web DID for a URL and optional path segments, e.g. ``did_web("http://127.0.0.1:8004",
    "issuers", "42")`` is ``did:web:127.0.0.1%3A8004:issuers:42`` (the port's colon percent-encoded,
    as did:web requires; segments are percent-encoded so none can hold a ':')."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ValueError(f"{base_url!r}: need an http(s) URL without query or fragment")
    if parts.username or parts.password:
        raise ValueError(f"{base_url!r}: a did:web URL cannot carry credentials")
    segments = [segment for segment in parts.path.split("/") if segment] + list(path)
    encoded = [quote(parts.netloc.lower(), safe="")] + [quote(segment, safe="") for segment in segments]
    return "did:web:" + ":".join(encoded)


def did_web_document_url(did: str) -> str:
    """Where a did:web DID's document lives: ``https://<host>/<path>/did.json``, or
    ``https://<host>/.well-known/did.json`` without a path. For localhost, 127.0.0.1 and [::1] the
    scheme is http, so a development issuer resolves without TLS; anything else is https as the
    method requires. The caller fetching it must still refuse private addresses (SSRF)."""
    if not did.startswith("did:web:"):
        raise ValueError(f"{did!r}: not a did:web DID")
    segments = did.removeprefix("did:web:").split(":")
    if any(not segment for segment in segments) or any(char in did for char in "/?#"):
        raise ValueError(f"{did!r}: not a did:web DID (a bare DID, not a DID URL)")
    host = unquote(segments[0])
    # Only a plain DNS name or IP literal with an optional port: a decoded '@', '/' or '\\' would
    # send the fetch somewhere other than where the DID says.
    authority = _HOST.fullmatch(host)
    if authority is None or any(unquote(segment) in (".", "..") for segment in segments[1:]):
        raise ValueError(f"{did!r}: not a plain host[:port] and path")
    path = "/".join(quote(unquote(segment), safe="") for segment in segments[1:])
    scheme = "http" if authority["name"].strip("[]").lower() in _LOCAL_HOSTS else "https"
    return f"{scheme}://{host}/{path + '/did.json' if path else '.well-known/did.json'}"


def public_key_from_multibase(value: str) -> Ed25519PublicKey:
    """The Ed25519 key of a Multikey ``publicKeyMultibase`` ("z6Mk..."). Raises ``ValueError``."""
    if not value.startswith("z"):
        raise ValueError(f"{value!r}: not base58btc multibase")
    decoded = base58.b58decode(value[1:])
    if len(decoded) != 34 or not decoded.startswith(_ED25519_PUB_MULTICODEC):
        raise ValueError(f"{value!r}: not an Ed25519 public key")
    return Ed25519PublicKey.from_public_bytes(decoded[2:])


def did_key_public_key(did_key_url: str) -> Ed25519PublicKey:
    """The Ed25519 key a ``did:key:z6Mk...`` DID or DID URL (``...#z6Mk...``) names, resolved
    offline. Raises ``ValueError`` for anything else (another key type, a mismatched fragment)."""
    did, _, fragment = did_key_url.partition("#")
    if not did.startswith("did:key:"):
        raise ValueError(f"{did_key_url!r}: not a did:key")
    multibase = did.removeprefix("did:key:")
    if fragment and fragment != multibase:
        raise ValueError(f"{did_key_url!r}: the fragment must repeat the key")
    return public_key_from_multibase(multibase)


def _load_key(path: Path) -> SigningKey:
    key_id = path.name.removesuffix(".pem")
    if path.suffix != ".pem" or not _KEY_ID.fullmatch(key_id):
        raise KeyRingError(f"{path}: not a key file (<key_id>.pem, key id of letters, digits, '.', '_', '-')")
    try:
        private_key = load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError, OSError, UnsupportedAlgorithm) as error:
        raise KeyRingError(f"{path}: not an unencrypted PKCS#8 PEM private key ({error})") from None
    if not isinstance(private_key, Ed25519PrivateKey):
        raise KeyRingError(f"{path}: not an Ed25519 key")
    return SigningKey(key_id=key_id, private_key=private_key, created=_created(key_id, path))


def _created(key_id: str, path: Path) -> datetime:
    match = _DATE_IN_KEY_ID.search(key_id)
    if match:
        try:
            return datetime.strptime(match.group(1) + (match.group(2) or "000000"), "%Y%m%d%H%M%S").replace(
                tzinfo=UTC
            )
        except ValueError:
            pass  # eight digits that are not a date: fall back to the file's time
    return datetime.fromtimestamp(path.stat().st_mtime, UTC)


def _raw(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
