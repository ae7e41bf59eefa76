"""Data Integrity proofs with the ``eddsa-rdfc-2022`` cryptosuite (W3C vc-di-eddsa 1.0, §3.3).

hashData = SHA-256(canonical proof configuration) || SHA-256(canonical document), signed with
Ed25519; the proof configuration is the proof's options (no ``proofValue``) carrying the
document's ``@context``, and both canonical forms are RDFC-1.0 N-Quads (``jsonld.canonicalize``).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
from datetime import UTC, datetime
from typing import Any, Final

import base58
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .jsonld import CanonicalizationError, ContextNotAvailable, DocumentLoader, canonicalize
from .keys import SigningKey

PROOF_TYPE: Final = "DataIntegrityProof"
CRYPTOSUITE: Final = "eddsa-rdfc-2022"
_SIGNATURE_LENGTH: Final = 64


def sign(
    credential: dict[str, Any],
    key: SigningKey,
    *,
    verification_method: str,
    created: datetime,
    proof_purpose: str = "assertionMethod",
    loader: DocumentLoader | None = None,
) -> dict[str, Any]:
    """A copy of ``credential`` with an ``eddsa-rdfc-2022`` ``DataIntegrityProof`` added.

    ``verification_method`` is the full id of the key (``did:web:...#key-...``); ``created`` must be
    timezone-aware and is written in UTC to the second. ``loader`` is for tests only (see
    ``jsonld.canonicalize``). Raises ``ValueError`` for a credential that already has a proof or
    cannot be canonicalised losslessly (``jsonld.CanonicalizationError``, ``ContextNotAvailable``).
    """
    proof = _proof(
        credential,
        key,
        verification_method=verification_method,
        created=created,
        proof_purpose=proof_purpose,
        loader=loader,
    )
    secured = copy.deepcopy(credential)
    secured["proof"] = proof
    return secured


def signed_json(
    credential: dict[str, Any], key: SigningKey, *, verification_method: str, created: datetime
) -> str:
    """``sign``, as the JSON a credential is served and stored in: compact, UTF-8 as is, and the
    proof as a one-element array, which the Open Badges 3.0 schema wants (JSON-LD reads it as the
    single proof, and the proof is not part of what is signed, so the wrapping changes no signature)."""
    proof = _proof(
        credential,
        key,
        verification_method=verification_method,
        created=created,
        proof_purpose="assertionMethod",
    )
    # Written straight out, so no copy of the credential is needed (a deep copy was a sixth of
    # the signing path's time).
    return json.dumps({**credential, "proof": [proof]}, ensure_ascii=False, separators=(",", ":"))


def _proof(
    credential: dict[str, Any],
    key: SigningKey,
    *,
    verification_method: str,
    created: datetime,
    proof_purpose: str,
    loader: DocumentLoader | None = None,
) -> dict[str, Any]:
    if "proof" in credential:
        raise ValueError("the credential already has a proof; proof sets are not supported")
    if created.tzinfo is None:
        raise ValueError("created must be timezone-aware")
    options = {
        "type": PROOF_TYPE,
        "cryptosuite": CRYPTOSUITE,
        "created": created.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "verificationMethod": verification_method,
        "proofPurpose": proof_purpose,
    }
    signature = key.private_key.sign(_hash_data(credential, options, loader, cache_config=True))
    return {**options, "proofValue": "z" + base58.b58encode(signature).decode()}


def verify(
    secured: dict[str, Any],
    public_key: Ed25519PublicKey,
    *,
    proof_purpose: str = "assertionMethod",
    loader: DocumentLoader | None = None,
) -> bool:
    """Whether ``secured`` carries an ``eddsa-rdfc-2022`` proof by ``public_key`` for
    ``proof_purpose`` over exactly its present content (vc-di-eddsa §3.3.2).

    False for any tampering, a wrong key, another purpose, an expired or malformed proof, a proof
    set (a list of several proofs; a list of one is read as that proof), or a document that
    cannot be canonicalised losslessly. Raises ``ContextNotAvailable`` (a ``ValueError``) when the
    document names a context that is not bundled: that is "cannot check", not "forged", and a
    caller may want to say so. The caller chooses ``public_key``, e.g. from
    ``verification_method_of(secured)``.
    """
    proof = _single_proof(secured)
    if proof is None:
        return False
    options = {key: value for key, value in proof.items() if key != "proofValue"}
    proof_value = proof.get("proofValue")
    if (
        options.get("type") != PROOF_TYPE
        or options.get("cryptosuite") != CRYPTOSUITE
        or options.get("proofPurpose") != proof_purpose
        or not isinstance(options.get("verificationMethod"), str)
        or not _is_valid_datetime(options.get("created"), required=False)
        or not _is_valid_datetime(options.get("expires"), required=False)
        or _has_expired(options.get("expires"))
        or not isinstance(proof_value, str)
    ):
        return False
    signature = _decode_proof_value(proof_value)
    if signature is None:
        return False
    unsecured = {key: value for key, value in secured.items() if key != "proof"}
    if "@context" in options:
        # §3.3.2 step 4: the proof's contexts must open the document's, in order, and then are
        # what the document is read with.
        proof_context, document_context = (
            _as_list(options.pop("@context")),
            _as_list(unsecured.get("@context")),
        )
        if document_context[: len(proof_context)] != proof_context:
            return False
        unsecured["@context"] = proof_context
    try:
        hash_data = _hash_data(unsecured, options, loader)
        public_key.verify(signature, hash_data)
    except ContextNotAvailable:
        raise
    except (CanonicalizationError, InvalidSignature, TypeError):
        return False
    return True


def verification_method_of(secured: dict[str, Any]) -> str | None:
    """The ``verificationMethod`` of the document's single proof (an object or a one-element
    list), if it has one. Unverified: for choosing the key to verify with."""
    proof = _single_proof(secured)
    method = proof.get("verificationMethod") if proof is not None else None
    return method if isinstance(method, str) else None


def _single_proof(secured: Any) -> dict[str, Any] | None:
    # JSON-LD reads a one-element array as the object itself (the OB 3.0 JSON Schema wants the
    # array); a proof set of several is not supported.
    proof = secured.get("proof") if isinstance(secured, dict) else None
    if isinstance(proof, list) and len(proof) == 1:
        proof = proof[0]
    return proof if isinstance(proof, dict) else None


def _hash_data(
    document: dict[str, Any],
    options: dict[str, Any],
    loader: DocumentLoader | None,
    *,
    cache_config: bool = False,
) -> bytes:
    # §3.3.5: the proof configuration is the options with the document's @context.
    proof_config = {**options, "@context": document.get("@context")}
    # Only our own signing is cached: a verified document's context is anyone's, and large
    # contexts of hostile documents would be kept alive in the cache.
    canonical_config = (
        _canonical_config(json.dumps(proof_config, sort_keys=True))
        if cache_config and loader is None
        else canonicalize(proof_config, loader=loader)
    )
    return (
        hashlib.sha256(canonical_config.encode()).digest()
        + hashlib.sha256(canonicalize(document, loader=loader).encode()).digest()
    )


@functools.lru_cache(maxsize=256)
def _canonical_config(config_json: str) -> str:
    # A batch's proofs share their options but for the key that signs (created is to the second),
    # so their configuration's canonical form is worked out once, not per credential. Keyed by the
    # JSON text: the canonical form is a function of the configuration alone (bundled contexts).
    return canonicalize(json.loads(config_json))


def _decode_proof_value(proof_value: str) -> bytes | None:
    if not proof_value.startswith("z"):  # multibase base58btc
        return None
    try:
        signature = base58.b58decode(proof_value[1:])
    except ValueError:
        return None
    return signature if len(signature) == _SIGNATURE_LENGTH else None


def _is_valid_datetime(value: Any, *, required: bool) -> bool:
    if value is None:
        return not required
    return isinstance(value, str) and _parse_datetime(value) is not None


def _has_expired(value: Any) -> bool:
    expires = _parse_datetime(value) if isinstance(value, str) else None
    return expires is not None and expires <= datetime.now(UTC)


def _parse_datetime(value: str) -> datetime | None:
    # XML Schema dateTime with a time zone, as Data Integrity requires for created/expires.
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None and "T" in value else None


def _as_list(context: Any) -> list[Any]:
    return context if isinstance(context, list) else [context]
