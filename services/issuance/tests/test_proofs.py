"""eddsa-rdfc-2022 Data Integrity proofs: the official W3C test vector reproduced, sign/verify,
and every kind of tampering or malformed proof refused."""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import base58
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from issuance.jsonld import OB_V3, VC_V2, ContextNotAvailable, canonicalize, document_loader
from issuance.keys import SigningKey, did_key_public_key
from issuance.proofs import sign, verification_method_of, verify

# ---------------------------------------------------------------------------------------------
# W3C Data Integrity EdDSA Cryptosuites v1.0, Appendix B.1 "Representation: eddsa-rdfc-2022"
# (https://www.w3.org/TR/vc-di-eddsa/#representation-eddsa-rdfc-2022), files of
# https://github.com/w3c/vc-di-eddsa/tree/main/TestVectors: keyPair.json, and in eddsa-rdfc-2022/
# signedDataInt.json, docHashDataInt.txt, proofHashDataInt.txt.
VECTOR_PUBLIC_KEY = "z6MkrJVnaZkeFzdQyMZu1cgjg7k1pZZ6pvBQ7XJPt4swbTQ2"
VECTOR_PRIVATE_KEY = "z3u2en7t5LR2WtQH5PfFqMqwVHBeXouLzo6haApm8XHqvjxq"
VECTOR_SIGNED: dict[str, Any] = {
    "@context": ["https://www.w3.org/ns/credentials/v2", "https://www.w3.org/ns/credentials/examples/v2"],
    "id": "urn:uuid:58172aac-d8ba-11ed-83dd-0b3aef56cc33",
    "type": ["VerifiableCredential", "AlumniCredential"],
    "name": "Alumni Credential",
    "description": "A minimum viable example of an Alumni Credential.",
    "issuer": "https://vc.example/issuers/5678",
    "validFrom": "2023-01-01T00:00:00Z",
    "credentialSubject": {"id": "did:example:abcdefgh", "alumniOf": "The School of Examples"},
    "proof": {
        "type": "DataIntegrityProof",
        "cryptosuite": "eddsa-rdfc-2022",
        "created": "2023-02-24T23:36:38Z",
        "verificationMethod": f"did:key:{VECTOR_PUBLIC_KEY}#{VECTOR_PUBLIC_KEY}",
        "proofPurpose": "assertionMethod",
        "proofValue": (
            "z2YwC8z3ap7yx1nZYCg4L3j3ApHsF8kgPdSb5xoS1VR7vPG3F561B52hYnQF9iseabecm3ijx4K1FBTQsCZahKZme"
        ),
    },
}
VECTOR_DOCUMENT_HASH = "517744132ae165a5349155bef0bb0cf2258fff99dfe1dbd914b938d775a36017"
VECTOR_PROOF_CONFIG_HASH = "bea7b7acfbad0126b135104024a5f1733e705108f42d59668b05c0c50004c6b0"
# The canonical document as the spec shows it (Example "Canonical Credential without Proof").
VECTOR_CANONICAL_DOCUMENT = (
    "<did:example:abcdefgh> <https://www.w3.org/ns/credentials/examples#alumniOf> "
    '"The School of Examples" .\n'
    "<urn:uuid:58172aac-d8ba-11ed-83dd-0b3aef56cc33> <http://www.w3.org/1999/02/22-rdf-syntax-ns#type> "
    "<https://www.w3.org/2018/credentials#VerifiableCredential> .\n"
    "<urn:uuid:58172aac-d8ba-11ed-83dd-0b3aef56cc33> <http://www.w3.org/1999/02/22-rdf-syntax-ns#type> "
    "<https://www.w3.org/ns/credentials/examples#AlumniCredential> .\n"
    "<urn:uuid:58172aac-d8ba-11ed-83dd-0b3aef56cc33> <https://schema.org/description> "
    '"A minimum viable example of an Alumni Credential." .\n'
    '<urn:uuid:58172aac-d8ba-11ed-83dd-0b3aef56cc33> <https://schema.org/name> "Alumni Credential" .\n'
    "<urn:uuid:58172aac-d8ba-11ed-83dd-0b3aef56cc33> <https://www.w3.org/2018/credentials#credentialSubject> "
    "<did:example:abcdefgh> .\n"
    "<urn:uuid:58172aac-d8ba-11ed-83dd-0b3aef56cc33> <https://www.w3.org/2018/credentials#issuer> "
    "<https://vc.example/issuers/5678> .\n"
    "<urn:uuid:58172aac-d8ba-11ed-83dd-0b3aef56cc33> <https://www.w3.org/2018/credentials#validFrom> "
    '"2023-01-01T00:00:00Z"^^<http://www.w3.org/2001/XMLSchema#dateTime> .\n'
)
# https://www.w3.org/ns/credentials/examples/v2, which the vector names; never bundled.
EXAMPLES_CONTEXT = {"@context": {"@vocab": "https://www.w3.org/ns/credentials/examples#"}}


def vector_loader(url: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    if url == "https://www.w3.org/ns/credentials/examples/v2":
        return {"contextUrl": None, "documentUrl": url, "document": EXAMPLES_CONTEXT}
    return document_loader(url, options)


def vector_key() -> SigningKey:
    decoded = base58.b58decode(VECTOR_PRIVATE_KEY[1:])
    assert decoded[:2] == b"\x80\x26"  # multicodec ed25519-priv
    return SigningKey(
        "vector", Ed25519PrivateKey.from_private_bytes(decoded[2:]), datetime(2023, 2, 24, tzinfo=UTC)
    )


def test_w3c_vector_canonical_forms_and_hashes() -> None:
    unsecured = {name: value for name, value in VECTOR_SIGNED.items() if name != "proof"}
    options = {name: value for name, value in VECTOR_SIGNED["proof"].items() if name != "proofValue"}
    canonical_document = canonicalize(unsecured, loader=vector_loader)
    canonical_config = canonicalize({**options, "@context": unsecured["@context"]}, loader=vector_loader)
    assert canonical_document == VECTOR_CANONICAL_DOCUMENT
    assert hashlib.sha256(canonical_document.encode()).hexdigest() == VECTOR_DOCUMENT_HASH
    assert hashlib.sha256(canonical_config.encode()).hexdigest() == VECTOR_PROOF_CONFIG_HASH


def test_w3c_vector_proof_value_is_reproduced_and_verifies() -> None:
    key = vector_key()
    assert key.public_key_multibase == VECTOR_PUBLIC_KEY
    unsecured = {name: value for name, value in VECTOR_SIGNED.items() if name != "proof"}
    signed = sign(
        unsecured,
        key,
        verification_method=VECTOR_SIGNED["proof"]["verificationMethod"],
        created=datetime(2023, 2, 24, 23, 36, 38, tzinfo=UTC),
        loader=vector_loader,
    )
    assert signed == VECTOR_SIGNED  # Ed25519 is deterministic: the very same proofValue
    resolved = did_key_public_key(VECTOR_SIGNED["proof"]["verificationMethod"])
    assert verify(VECTOR_SIGNED, resolved, loader=vector_loader)


def test_w3c_vector_names_a_context_that_is_not_bundled() -> None:
    with pytest.raises(ContextNotAvailable):
        verify(VECTOR_SIGNED, vector_key().public_key)


# ---------------------------------------------------------------------------------------------
ISSUER = "did:web:badges.microcred.example"
METHOD = f"{ISSUER}#key-20261129"
CREATED = datetime(2026, 11, 29, 10, 15, 0, tzinfo=UTC)


def credential() -> dict[str, Any]:
    return {
        "@context": [VC_V2, OB_V3],
        "id": "urn:uuid:5d1fb1d4-5bfc-4a5d-9c4f-3c3b2f0f6a01",
        "type": ["VerifiableCredential", "OpenBadgeCredential"],
        "name": "Introduction to Data Engineering",
        "issuer": {"id": ISSUER, "type": ["Profile"], "name": "Microcred University"},
        "validFrom": "2026-11-29T10:15:00Z",
        "credentialSubject": {
            "type": ["AchievementSubject"],
            "identifier": [
                {
                    "type": "IdentityObject",
                    "identityHash": "sha256$3f1e0c3c1f3d6f5bbd1c0a3e2c9e6f8a4b2d7c1e0f9a8b7c6d5e4f3a2b1c0d9e",
                    "identityType": "emailAddress",
                    "hashed": True,
                    "salt": "9c2d4e6f8a0b1c3d",
                }
            ],
            "achievement": {
                "id": "https://badges.microcred.example/achievements/data-eng-101",
                "type": ["Achievement"],
                "name": "Introduction to Data Engineering",
                "description": "Pipelines, storage and orchestration.",
                "criteria": {"narrative": "Pass the final project."},
            },
        },
    }


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey("key-20261129", Ed25519PrivateKey.generate(), CREATED)


@pytest.fixture(scope="module")
def signed(key: SigningKey) -> dict[str, Any]:
    return sign(credential(), key, verification_method=METHOD, created=CREATED)


def test_sign_adds_a_data_integrity_proof(key: SigningKey, signed: dict[str, Any]) -> None:
    proof = signed["proof"]
    assert {name: value for name, value in proof.items() if name != "proofValue"} == {
        "type": "DataIntegrityProof",
        "cryptosuite": "eddsa-rdfc-2022",
        "created": "2026-11-29T10:15:00Z",
        "verificationMethod": METHOD,
        "proofPurpose": "assertionMethod",
    }
    assert proof["proofValue"].startswith("z")
    assert len(base58.b58decode(proof["proofValue"][1:])) == 64
    assert {name: value for name, value in signed.items() if name != "proof"} == credential()
    assert verify(signed, key.public_key)
    assert verification_method_of(signed) == METHOD


def test_created_is_written_in_utc_to_the_second(key: SigningKey) -> None:
    created = datetime(2026, 11, 29, 11, 15, 0, 987654, tzinfo=timezone(timedelta(hours=1)))
    signed = sign(credential(), key, verification_method=METHOD, created=created)
    assert signed["proof"]["created"] == "2026-11-29T10:15:00Z"


def test_sign_refuses_naive_times_and_second_proofs(key: SigningKey, signed: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="timezone"):
        sign(credential(), key, verification_method=METHOD, created=datetime(2026, 11, 29))
    with pytest.raises(ValueError, match="already has a proof"):
        sign(signed, key, verification_method=METHOD, created=CREATED)


def _set(path: tuple[str | int, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def change(document: dict[str, Any]) -> None:
        target: Any = document
        for step in path[:-1]:
            target = target[step]
        target[path[-1]] = value

    return change


@pytest.mark.parametrize(
    "change",
    [
        _set(("name",), "Introduction to Data Engineering (Honours)"),
        _set(("credentialSubject", "achievement", "name"), "Advanced Data Engineering"),
        _set(("credentialSubject", "achievement", "criteria", "narrative"), "Attend."),
        _set(("validFrom",), "2026-11-28T10:15:00Z"),
        _set(("issuer", "id"), "did:web:evil.example"),
        _set(("credentialSubject", "identifier", 0, "identityHash"), "sha256$00"),
        _set(("credentialSubject", "identifier", 0, "hashed"), False),
        _set(("validUntil",), "2030-01-01T00:00:00Z"),
        _set(("type",), ["VerifiableCredential", "OpenBadgeCredential", "EndorsementCredential"]),
        _set(("@context",), [VC_V2, "https://purl.imsglobal.org/spec/ob/v3p0/context-3.0.2.json"]),
        _set(("proof", "created"), "2026-11-29T10:15:01Z"),
        _set(("proof", "verificationMethod"), f"{ISSUER}#key-2"),
    ],
    ids=[
        "name",
        "achievement-name",
        "criteria",
        "validFrom",
        "issuer-id",
        "identity-hash",
        "hashed-flag",
        "added-validUntil",
        "type",
        "context",
        "proof-created",
        "proof-method",
    ],
)
def test_any_change_breaks_the_proof(
    key: SigningKey, signed: dict[str, Any], change: Callable[[dict[str, Any]], None]
) -> None:
    tampered = copy.deepcopy(signed)
    change(tampered)
    assert not verify(tampered, key.public_key)


def test_another_key_does_not_verify(signed: dict[str, Any]) -> None:
    assert not verify(signed, Ed25519PrivateKey.generate().public_key())


@pytest.mark.parametrize(
    "proof_value",
    [
        "",
        "z",
        "z0OIl",  # not base58
        "u" + "A" * 86,  # another multibase
        "z" + base58.b58encode(bytes(63)).decode(),
        "z" + base58.b58encode(bytes(65)).decode(),
        "z" + base58.b58encode(bytes(64)).decode(),
        42,
        None,
    ],
)
def test_malformed_proof_values_do_not_verify(
    key: SigningKey, signed: dict[str, Any], proof_value: Any
) -> None:
    tampered = copy.deepcopy(signed)
    tampered["proof"]["proofValue"] = proof_value
    assert not verify(tampered, key.public_key)


@pytest.mark.parametrize(
    "proof",
    [
        None,
        "a proof",
        [],
        {"type": "Ed25519Signature2020"},
        {"cryptosuite": "ecdsa-rdfc-2019"},
        {"proofPurpose": "authentication"},
        {"created": "yesterday"},
        {"created": "2026-11-29"},
        {"expires": "2026-11-30T00:00:00Z"},  # in the past when this runs
        {"verificationMethod": None},
    ],
)
def test_malformed_or_unexpected_proofs_do_not_verify(
    key: SigningKey, signed: dict[str, Any], proof: Any
) -> None:
    tampered = copy.deepcopy(signed)
    if isinstance(proof, dict):
        tampered["proof"].update(proof)
    else:
        tampered["proof"] = proof
    assert not verify(tampered, key.public_key)


def test_a_proof_without_the_document_is_not_verified(key: SigningKey) -> None:
    assert not verify(credential(), key.public_key)
    assert not verify({}, key.public_key)
    assert verification_method_of(credential()) is None


def test_a_proof_context_must_open_the_document_context(key: SigningKey, signed: dict[str, Any]) -> None:
    with_context = copy.deepcopy(signed)
    with_context["proof"]["@context"] = [VC_V2, OB_V3]
    assert verify(with_context, key.public_key)
    with_context["proof"]["@context"] = [VC_V2]  # a prefix: the document is read with VC 2.0 only
    assert not verify(with_context, key.public_key)  # ... which leaves OB terms undefined
    with_context["proof"]["@context"] = [OB_V3, VC_V2]
    assert not verify(with_context, key.public_key)


def test_a_one_element_proof_list_is_that_proof(key: SigningKey, signed: dict[str, Any]) -> None:
    listed = {**signed, "proof": [signed["proof"]]}
    assert verify(listed, key.public_key)
    assert verification_method_of(listed) == METHOD
    assert not verify({**signed, "proof": [signed["proof"], signed["proof"]]}, key.public_key)
    assert verification_method_of({**signed, "proof": [signed["proof"], signed["proof"]]}) is None


def test_another_proof_purpose_is_checked_as_asked(key: SigningKey) -> None:
    signed = sign(
        credential(), key, verification_method=METHOD, created=CREATED, proof_purpose="authentication"
    )
    assert not verify(signed, key.public_key)
    assert verify(signed, key.public_key, proof_purpose="authentication")


def test_lossy_documents_do_not_verify_and_unbundled_contexts_raise(
    key: SigningKey, signed: dict[str, Any]
) -> None:
    # A property the contexts do not define would not be covered by the signature.
    assert not verify({**signed, "unsignedClaim": "anything"}, key.public_key)
    with pytest.raises(ContextNotAvailable):
        verify({**signed, "@context": [VC_V2, "https://evil.example/ctx"]}, key.public_key)


def test_text_with_control_characters_signs_and_verifies(key: SigningKey) -> None:
    document = credential()
    document["name"] = "Line\x0bTab\tBell\x07"
    signed = sign(document, key, verification_method=METHOD, created=CREATED)
    assert verify(signed, key.public_key)
    signed["name"] = "Line\x0cTab\tBell\x07"
    assert not verify(signed, key.public_key)


def test_interoperates_with_openbadgeslib(key: SigningKey) -> None:
    # An independent eddsa-rdfc-2022 implementation (pyld-based, so no control characters here).
    from openbadgeslib.ob3.ldp import add_data_integrity_proof, verify_data_integrity_proof

    private_pem = key.private_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    public_pem = key.public_key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    ours = sign(credential(), key, verification_method=METHOD, created=CREATED)
    verify_data_integrity_proof(ours, public_pem)  # raises if it does not verify
    theirs = add_data_integrity_proof(credential(), private_pem, METHOD, created=CREATED)
    assert theirs["proof"]["proofValue"] == ours["proof"]["proofValue"]
    assert verify(theirs, key.public_key)
