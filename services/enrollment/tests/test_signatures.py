"""The partners' signature recipe: what verifies, and everything that must not."""

import base64
import uuid
from datetime import UTC, datetime

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.rsa import generate_private_key
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from enrollment import signatures
from enrollment.domain import Credential, CredentialKind
from enrollment.signatures import BadSignature, hmac_signature, signed_content, verify

T0 = datetime(2025, 5, 2, 16, 45, tzinfo=UTC)
SECRET = "q5d1O0VJ0-4a1hYb0yYk3Yw9mYx0Z7o2m0Tq0kLh5zQ"
BODY = b'{"report_id": "6f4a2c8e-9b1d-4a53-8c7e-2d0b5f9a1c36"}'
CONTENT = signed_content("msg-1", "2025-05-02T16:45:01Z", BODY)
PRIVATE_KEY = Ed25519PrivateKey.generate()


def hmac_credential(secret: str = SECRET, *, revoked: bool = False) -> Credential:
    return Credential(
        uuid.uuid4(), CredentialKind.HMAC_SHA256, T0, secret=secret, revoked_at=T0 if revoked else None
    )


def ed25519_credential(key: Ed25519PrivateKey = PRIVATE_KEY) -> Credential:
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return Credential(uuid.uuid4(), CredentialKind.ED25519, T0, public_key=public)


def test_the_signed_content_is_id_time_and_body_joined_by_dots() -> None:
    assert CONTENT == b"msg-1.2025-05-02T16:45:01Z." + BODY


def test_an_hmac_signature_verifies() -> None:
    verify(hmac_signature(SECRET, CONTENT), CONTENT, [hmac_credential()])


def test_an_ed25519_signature_verifies() -> None:
    verify(signatures.ed25519_signature(PRIVATE_KEY, CONTENT), CONTENT, [ed25519_credential()])


@pytest.mark.parametrize(
    "tampered",
    [
        signed_content("msg-2", "2025-05-02T16:45:01Z", BODY),
        signed_content("msg-1", "2025-05-02T16:45:02Z", BODY),
        signed_content("msg-1", "2025-05-02T16:45:01Z", BODY.replace(b"6f4a", b"7f4a")),
    ],
    ids=["id", "time", "body"],
)
def test_a_signature_does_not_verify_other_content(tampered: bytes) -> None:
    credentials = [hmac_credential(), ed25519_credential()]
    for signature in (hmac_signature(SECRET, CONTENT), signatures.ed25519_signature(PRIVATE_KEY, CONTENT)):
        with pytest.raises(BadSignature, match="no signature matches"):
            verify(signature, tampered, credentials)


def test_a_signature_with_another_key_does_not_verify() -> None:
    other_partner = [
        hmac_credential("another partner's secret"),
        ed25519_credential(Ed25519PrivateKey.generate()),
    ]

    for signature in (hmac_signature(SECRET, CONTENT), signatures.ed25519_signature(PRIVATE_KEY, CONTENT)):
        with pytest.raises(BadSignature, match="no signature matches"):
            verify(signature, CONTENT, other_partner)


def test_a_scheme_is_checked_only_against_its_own_kind_of_credential() -> None:
    # An HMAC keyed with the raw public key must not pass as a signature of the key's owner.
    public = ed25519_credential()
    assert public.public_key is not None
    forged = hmac_signature(public.public_key.decode("latin-1"), CONTENT)

    with pytest.raises(BadSignature):
        verify(forged, CONTENT, [public])
    with pytest.raises(BadSignature):
        verify("v1a," + hmac_signature(SECRET, CONTENT).split(",")[1], CONTENT, [hmac_credential()])


def test_any_active_credential_verifies_so_a_partner_can_rotate() -> None:
    old, new = hmac_credential(), hmac_credential("the new secret")
    both = f"{hmac_signature('the new secret', CONTENT)} {hmac_signature(SECRET, CONTENT)}"

    verify(hmac_signature(SECRET, CONTENT), CONTENT, [old, new])
    verify(hmac_signature("the new secret", CONTENT), CONTENT, [old, new])
    verify(both, CONTENT, [new])
    verify("v1,bm90IGl0 v2,abcd " + hmac_signature(SECRET, CONTENT), CONTENT, [old])


def test_a_revoked_credential_verifies_nothing() -> None:
    with pytest.raises(BadSignature, match="no active credential"):
        verify(hmac_signature(SECRET, CONTENT), CONTENT, [hmac_credential(revoked=True)])
    with pytest.raises(BadSignature, match="no signature matches"):
        verify(
            hmac_signature(SECRET, CONTENT),
            CONTENT,
            [hmac_credential(revoked=True), hmac_credential("still active")],
        )


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (None, "not signed"),
        ("", "not signed"),
        ("   ", "not signed"),
        ("v1=abc", "expected form"),
        ("v1,not base64!", "expected form"),
        ("v1,bm90IGl0", "expected form"),
        ("v2," + hmac_signature(SECRET, CONTENT).split(",")[1], "expected form"),
        ("v1," + "A" * 5000, "longer than"),
    ],
)
def test_a_missing_or_unreadable_signature_is_refused(header: str | None, message: str) -> None:
    with pytest.raises(BadSignature, match=message):
        verify(header, CONTENT, [hmac_credential()])


def test_only_the_first_signatures_of_a_header_are_tried() -> None:
    padding = " ".join([hmac_signature("wrong", CONTENT)] * signatures.MAX_SIGNATURES)

    with pytest.raises(BadSignature):
        verify(f"{padding} {hmac_signature(SECRET, CONTENT)}", CONTENT, [hmac_credential()])


def test_a_new_secret_is_random_and_urlsafe() -> None:
    first, second = signatures.new_secret(), signatures.new_secret()

    assert first != second
    assert len(first) == 43
    assert set(first) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


class TestPublicKeyBytes:
    RAW = PRIVATE_KEY.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def test_reads_base64_of_the_raw_key(self) -> None:
        assert signatures.public_key_bytes(base64.b64encode(self.RAW).decode()) == self.RAW

    def test_reads_pem(self) -> None:
        pem = PRIVATE_KEY.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()

        assert signatures.public_key_bytes(pem) == self.RAW

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            (base64.b64encode(b"x" * 31).decode(), "32 bytes"),
            ("not a key at all", "neither"),
            ("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----", "not a PEM"),
        ],
    )
    def test_refuses_what_is_no_ed25519_key(self, text: str, message: str) -> None:
        with pytest.raises(ValueError, match=message):
            signatures.public_key_bytes(text)

    def test_refuses_another_kind_of_key(self) -> None:
        rsa = generate_private_key(public_exponent=65537, key_size=2048).public_key()
        pem = rsa.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()

        with pytest.raises(ValueError, match="not an Ed25519 key"):
            signatures.public_key_bytes(pem)
