"""Key rings on disk, rotation, and the public forms of keys: Multikey, DID documents, JWKS,
did:web and did:key."""

from __future__ import annotations

import base64
import os
import stat
from datetime import UTC, datetime
from pathlib import Path

import base58
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    BestAvailableEncryption,
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from issuance.jsonld import OB_V3, VC_V2
from issuance.keys import (
    KeyRingError,
    did_document,
    did_key_public_key,
    did_web,
    did_web_document_url,
    generate_key,
    jwks,
    load_keyring,
    public_key_from_multibase,
)
from issuance.proofs import sign, verify

# The W3C vc-di-eddsa test vector's key pair (TestVectors/keyPair.json).
VECTOR_PUBLIC_KEY = "z6MkrJVnaZkeFzdQyMZu1cgjg7k1pZZ6pvBQ7XJPt4swbTQ2"
VECTOR_PRIVATE_KEY = "z3u2en7t5LR2WtQH5PfFqMqwVHBeXouLzo6haApm8XHqvjxq"
DID = "did:web:127.0.0.1%3A8004:issuers:42"


def raw(public_key: object) -> bytes:
    assert hasattr(public_key, "public_bytes")
    data: bytes = public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return data


def write_pem(path: Path, pem: bytes) -> None:
    path.write_bytes(pem)
    path.chmod(0o600)


def test_generate_then_load(tmp_path: Path) -> None:
    generated = generate_key(tmp_path / "keys")
    pem = tmp_path / "keys" / f"{generated.key_id}.pem"
    assert stat.S_IMODE(pem.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) == 0o700
    assert pem.read_text().startswith("-----BEGIN PRIVATE KEY-----")  # PKCS#8
    assert (tmp_path / "keys" / "active").read_text().strip() == generated.key_id
    ring = load_keyring(tmp_path / "keys")
    assert ring.signing.key_id == generated.key_id
    assert raw(ring.signing.public_key) == raw(generated.public_key)
    assert ring.signing.created == generated.created
    assert ring.get(generated.key_id) == ring.signing
    assert ring.get("key-19700101") is None


def test_default_key_ids_carry_the_creation_time(tmp_path: Path) -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    key = generate_key(tmp_path)
    assert key.key_id == f"key-{key.created:%Y%m%dT%H%M%SZ}"
    assert before <= key.created <= datetime.now(UTC)


def test_the_active_file_chooses_the_signing_key(tmp_path: Path) -> None:
    first = generate_key(tmp_path, "key-20261101")
    generate_key(tmp_path, "key-20261129", activate=False)
    ring = load_keyring(tmp_path)
    assert ring.signing.key_id == first.key_id
    assert [key.key_id for key in ring.keys] == ["key-20261101", "key-20261129"]


def test_without_an_active_file_the_newest_key_signs(tmp_path: Path) -> None:
    generate_key(tmp_path, "key-20261129", activate=False)
    generate_key(tmp_path, "key-20250101T000000Z", activate=False)
    generate_key(tmp_path, "key-20261101", activate=False)
    ring = load_keyring(tmp_path)
    assert ring.signing.key_id == "key-20261129"
    assert ring.signing.created == datetime(2026, 11, 29, tzinfo=UTC)
    assert [key.key_id for key in ring.keys] == ["key-20250101T000000Z", "key-20261101", "key-20261129"]


def test_an_id_without_a_date_is_dated_by_the_file(tmp_path: Path) -> None:
    generate_key(tmp_path, "primary", activate=False)
    os.utime(tmp_path / "primary.pem", (1_700_000_000, 1_700_000_000))
    assert load_keyring(tmp_path).signing.created == datetime.fromtimestamp(1_700_000_000, UTC)


def test_rotation_keeps_old_credentials_verifiable(tmp_path: Path) -> None:
    credential = {
        "@context": [VC_V2, OB_V3],
        "id": "urn:uuid:5d1fb1d4-5bfc-4a5d-9c4f-3c3b2f0f6a01",
        "type": ["VerifiableCredential", "OpenBadgeCredential"],
        "issuer": {"id": DID, "type": ["Profile"], "name": "Microcred"},
        "validFrom": "2026-11-29T10:15:00Z",
        "credentialSubject": {
            "type": ["AchievementSubject"],
            "achievement": {"id": "urn:x:a", "type": ["Achievement"]},
        },
    }
    old = generate_key(tmp_path, "key-20261101")
    created = datetime(2026, 11, 29, tzinfo=UTC)
    old_credential = sign(credential, old, verification_method=f"{DID}#{old.key_id}", created=created)

    new = generate_key(tmp_path, "key-20261129")
    ring = load_keyring(tmp_path)
    assert ring.signing.key_id == new.key_id
    new_credential = sign(
        credential, ring.signing, verification_method=f"{DID}#{new.key_id}", created=created
    )

    for secured in (old_credential, new_credential):
        key_id = secured["proof"]["verificationMethod"].partition("#")[2]
        key = ring.get(key_id)
        assert key is not None
        assert verify(secured, key.public_key)
    assert not verify(old_credential, ring.signing.public_key)
    assert {method["id"] for method in did_document(DID, ring)["verificationMethod"]} == {
        f"{DID}#key-20261101",
        f"{DID}#key-20261129",
    }


def test_kubernetes_secret_mount_layout_loads(tmp_path: Path) -> None:
    # kubelet: ..<timestamp>/ holds the files, ..data -> it, and each file name is a symlink.
    data = tmp_path / "..2026_11_29_10_15_00.123"
    data.mkdir()
    write_pem(
        data / "key-20261129.pem",
        Ed25519PrivateKey.generate().private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()),
    )
    (data / "active").write_text("key-20261129")
    (tmp_path / "..data").symlink_to(data.name)
    (tmp_path / "key-20261129.pem").symlink_to("..data/key-20261129.pem")
    (tmp_path / "active").symlink_to("..data/active")
    assert load_keyring(tmp_path).signing.key_id == "key-20261129"


def _bad_folder(tmp_path: Path, case: str) -> Path:
    ed25519 = Ed25519PrivateKey.generate()
    if case == "missing":
        return tmp_path / "nowhere"
    if case == "empty":
        return tmp_path
    if case == "not a key":
        (tmp_path / "key-1.pem").write_text("hello")
    elif case == "encrypted":
        write_pem(
            tmp_path / "key-1.pem",
            ed25519.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, BestAvailableEncryption(b"pw")),
        )
    elif case == "not ed25519":
        write_pem(
            tmp_path / "key-1.pem",
            ec.generate_private_key(ec.SECP256R1()).private_bytes(
                Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()
            ),
        )
    elif case == "bad name":
        write_pem(
            tmp_path / "key 1.pem", ed25519.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
        )
    elif case == "stray file":
        generate_key(tmp_path, "key-1")
        (tmp_path / "notes.txt").write_text("rotate in May")
    elif case == "active names nothing":
        generate_key(tmp_path, "key-1")
        (tmp_path / "active").write_text("key-2\n")
    return tmp_path


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "not found"),
        ("empty", "no keys"),
        ("not a key", "not an unencrypted PKCS#8"),
        ("encrypted", "not an unencrypted PKCS#8"),
        ("not ed25519", "not an Ed25519 key"),
        ("bad name", "not a key file"),
        ("stray file", "not a key file"),
        ("active names nothing", "'key-2'"),
    ],
)
def test_bad_key_folders_are_refused_naming_the_path(tmp_path: Path, case: str, message: str) -> None:
    folder = _bad_folder(tmp_path, case)
    with pytest.raises(KeyRingError, match=message) as raised:
        load_keyring(folder)
    assert str(tmp_path) in str(raised.value)


def test_generate_refuses_bad_and_existing_ids(tmp_path: Path) -> None:
    generate_key(tmp_path, "key-1")
    with pytest.raises(KeyRingError, match="already exists"):
        generate_key(tmp_path, "key-1")
    for bad in ("", "key#1", "../key", ".hidden", "key/1", "k" * 65):
        with pytest.raises(KeyRingError, match="key id"):
            generate_key(tmp_path, bad)


@pytest.mark.parametrize(
    ("base_url", "path", "did", "document_url"),
    [
        (
            "http://127.0.0.1:8004",
            ("issuers", "42"),
            "did:web:127.0.0.1%3A8004:issuers:42",
            "http://127.0.0.1:8004/issuers/42/did.json",
        ),
        (
            "https://badges.microcred.example",
            (),
            "did:web:badges.microcred.example",
            "https://badges.microcred.example/.well-known/did.json",
        ),
        (
            "https://Example.COM/base/",
            ("issuers", "a b:c"),
            "did:web:example.com:base:issuers:a%20b%3Ac",
            "https://example.com/base/issuers/a%20b%3Ac/did.json",
        ),
        ("http://localhost:8004/", ("x",), "did:web:localhost%3A8004:x", "http://localhost:8004/x/did.json"),
        (
            "https://example.com:8443",
            (),
            "did:web:example.com%3A8443",
            "https://example.com:8443/.well-known/did.json",
        ),
    ],
)
def test_did_web_both_ways(base_url: str, path: tuple[str, ...], did: str, document_url: str) -> None:
    assert did_web(base_url, *path) == did
    assert did_web_document_url(did) == document_url


def test_did_web_examples_from_the_method_specification() -> None:
    assert (
        did_web_document_url("did:web:w3c-ccg.github.io") == "https://w3c-ccg.github.io/.well-known/did.json"
    )
    assert (
        did_web_document_url("did:web:w3c-ccg.github.io:user:alice")
        == "https://w3c-ccg.github.io/user/alice/did.json"
    )
    assert (
        did_web_document_url("did:web:example.com%3A3000:user:alice")
        == "https://example.com:3000/user/alice/did.json"
    )


@pytest.mark.parametrize(
    "did",
    [
        "did:key:z6Mk",
        "did:web:",
        "did:web:example.com#key-1",
        "did:web:example.com::x",
        "did:web:evil.example%40127.0.0.1",  # user info: the fetch would go to 127.0.0.1
        "did:web:evil.example%2F..%2F",
        "did:web:example.com%3Anotaport",
        "did:web:example.com%5C",  # a backslash some clients read as '/'
        "did:web:example.com:..:admin",
    ],
)
def test_did_web_document_url_refuses_what_is_not_a_plain_did_web(did: str) -> None:
    with pytest.raises(ValueError, match=r"did:web|host"):
        did_web_document_url(did)


@pytest.mark.parametrize(
    "base_url",
    ["ftp://example.com", "https://user:pw@example.com", "https://example.com/?q=1", "example.com"],
)
def test_did_web_refuses_urls_it_cannot_name(base_url: str) -> None:
    with pytest.raises(ValueError, match="URL"):
        did_web(base_url)


def test_did_key_resolves_offline_with_the_vector_key() -> None:
    public_key = did_key_public_key(f"did:key:{VECTOR_PUBLIC_KEY}#{VECTOR_PUBLIC_KEY}")
    private = base58.b58decode(VECTOR_PRIVATE_KEY[1:])  # multicodec ed25519-priv (0x8026) + 32 bytes
    assert raw(public_key) == raw(Ed25519PrivateKey.from_private_bytes(private[2:]).public_key())
    assert raw(did_key_public_key(f"did:key:{VECTOR_PUBLIC_KEY}")) == raw(public_key)
    assert raw(public_key_from_multibase(VECTOR_PUBLIC_KEY)) == raw(public_key)


@pytest.mark.parametrize(
    "did_key",
    [
        f"did:web:example.com#{VECTOR_PUBLIC_KEY}",
        f"did:key:{VECTOR_PUBLIC_KEY}#z6MkOther",
        "did:key:zQ3shokFTS3brHcDQrn82RUDfCZESWL1ZdCEJwekUDPQiYBme",  # secp256k1
        "did:key:u7QE",
        "did:key:z0OIl",
    ],
)
def test_did_key_refuses_what_is_not_an_ed25519_did_key(did_key: str) -> None:
    with pytest.raises(ValueError, match=r"did:key|fragment|Ed25519|multibase|base58|character"):
        did_key_public_key(did_key)


def test_did_document_lists_every_key(tmp_path: Path) -> None:
    generate_key(tmp_path, "key-20261101")
    generate_key(tmp_path, "key-20261129")
    ring = load_keyring(tmp_path)
    document = did_document(DID, ring)
    ids = [f"{DID}#key-20261101", f"{DID}#key-20261129"]
    assert document == {
        "@context": ["https://www.w3.org/ns/did/v1", "https://w3id.org/security/multikey/v1"],
        "id": DID,
        "verificationMethod": [
            {
                "id": ids[0],
                "type": "Multikey",
                "controller": DID,
                "publicKeyMultibase": ring.keys[0].public_key_multibase,
            },
            {
                "id": ids[1],
                "type": "Multikey",
                "controller": DID,
                "publicKeyMultibase": ring.keys[1].public_key_multibase,
            },
        ],
        "assertionMethod": ids,
        "authentication": ids,
    }
    for method, key in zip(document["verificationMethod"], ring.keys, strict=True):
        assert method["publicKeyMultibase"].startswith("z6Mk")
        assert raw(public_key_from_multibase(method["publicKeyMultibase"])) == raw(key.public_key)


def test_jwks_lists_every_key(tmp_path: Path) -> None:
    generate_key(tmp_path, "key-20261101")
    generate_key(tmp_path, "key-20261129")
    ring = load_keyring(tmp_path)
    document = jwks(ring)
    assert [jwk["kid"] for jwk in document["keys"]] == ["key-20261101", "key-20261129"]
    for jwk, key in zip(document["keys"], ring.keys, strict=True):
        assert {name: jwk[name] for name in ("kty", "crv", "alg", "use")} == {
            "kty": "OKP",
            "crv": "Ed25519",
            "alg": "EdDSA",
            "use": "sig",
        }
        assert set(jwk) == {"kty", "crv", "x", "kid", "alg", "use"}  # no private part
        assert "=" not in jwk["x"]
        assert base64.urlsafe_b64decode(jwk["x"] + "=") == raw(key.public_key)
    assert [jwk["kid"] for jwk in jwks(ring, did=DID)["keys"]] == [
        f"{DID}#key-20261101",
        f"{DID}#key-20261129",
    ]


def test_private_keys_stay_out_of_reprs(tmp_path: Path) -> None:
    assert "private_key" not in repr(generate_key(tmp_path))
