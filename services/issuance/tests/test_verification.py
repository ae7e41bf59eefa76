"""Verification without I/O: our own records and the network are small fakes, so every refusal to
fetch is observable (the fake fails the test when called)."""

import asyncio
import copy
import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from issuance import domain, keys, proofs, status_list
from issuance.domain import Issuance
from issuance.jose import to_vc_jwt
from issuance.jsonld import OB_V3, VC_V2
from issuance.service import Platform
from issuance.verification import Outcome, Trust, Unreachable, Verdict, Verifier, http_fetcher
from microcred_events import CourseCompleted, CourseSnapshot, example_data

BASE = "https://credentials.microcred.example"
NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
ISSUED = NOW - timedelta(days=30)
EMPTY_LIST = bytes(status_list.MIN_LIST_SIZE // 8)
COURSE = CourseSnapshot.model_validate({**example_data(CourseSnapshot), "credential_validity_days": 365})
COMPLETION = CourseCompleted.model_validate(example_data(CourseCompleted))


class Records:
    """Our database, as the verifier sees it."""

    def __init__(self) -> None:
        self.lists: dict[uuid.UUID, tuple[str, bytes]] = {}
        self.issuers: set[uuid.UUID] = {COURSE.issuer.issuer_id}
        self.suspended: set[uuid.UUID] = set()

    async def status_list(self, list_id: uuid.UUID) -> tuple[str, bytes] | None:
        return self.lists.get(list_id)

    async def issuer_known(self, issuer_id: uuid.UUID) -> bool:
        return issuer_id in self.issuers

    async def is_suspended(self, credential_id: uuid.UUID) -> bool:
        return credential_id in self.suspended


class Network:
    """What trusted hosts would answer; records every URL asked for."""

    def __init__(self) -> None:
        self.documents: dict[str, Any] = {}
        self.asked: list[str] = []

    async def __call__(self, url: str) -> Any:
        self.asked.append(url)
        if url not in self.documents:
            raise Unreachable(f"{url}: connection refused")
        return self.documents[url]


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Platform:
    directory = tmp_path_factory.mktemp("keys")
    keys.generate_key(directory, "key-1")
    return Platform(BASE, keys.load_keyring(directory))


@pytest.fixture(scope="module")
def foreign_key(tmp_path_factory: pytest.TempPathFactory) -> keys.SigningKey:
    return keys.generate_key(tmp_path_factory.mktemp("foreign"), "other-1")


@pytest.fixture
def records() -> Records:
    return Records()


@pytest.fixture
def network() -> Network:
    return Network()


Verify = Callable[..., Any]


@pytest.fixture
def verify(platform: Platform, records: Records, network: Network) -> Verify:
    async def run(
        presented: dict[str, Any] | str, *, hosts: frozenset[str] = frozenset(), now: datetime = NOW
    ) -> Any:
        return await Verifier(platform, Trust(hosts), records, network, now).verify(presented)

    return run


def ours(platform: Platform, records: Records, **course_changes: Any) -> dict[str, Any]:
    """A credential as the service mints it, its status list registered locally."""
    course = COURSE.model_copy(update=course_changes)
    credential_id, list_id = uuid.uuid4(), uuid.uuid4()
    records.lists[list_id] = ("revocation", EMPTY_LIST)
    issuance = Issuance(
        credential_id=credential_id,
        credential_url=platform.credential_url(credential_id),
        issuer_did=platform.issuer_did(course.issuer.issuer_id),
        issued_at=ISSUED,
        status_list_id=list_id,
        status_index=77,
        status_entry=status_list.status_entry(platform.status_list_url(list_id), 77, "revocation"),
        salt="5a17",
    )
    unsigned = domain.course_credential(issuance, course, COMPLETION)
    signed: dict[str, Any] = json.loads(platform.sign(unsigned, issuance.issuer_did, ISSUED))
    return signed


def foreign(
    key: keys.SigningKey,
    *,
    issuer: str | None = None,
    method: str | None = None,
    status_url: str | None = None,
) -> dict[str, Any]:
    """Another issuer's credential, signed with `key` (a did:key issuer unless told otherwise)."""
    did_key = f"did:key:{key.public_key_multibase}"
    issuer = issuer or did_key
    credential: dict[str, Any] = {
        "@context": [VC_V2, OB_V3],
        "id": "urn:uuid:2b1f0a9e-0c2d-4e5f-8a7b-6c5d4e3f2a1b",
        "type": ["VerifiableCredential", "OpenBadgeCredential"],
        "issuer": {"id": issuer, "type": ["Profile"], "name": "Elsewhere College"},
        "validFrom": "2026-01-01T00:00:00Z",
        "credentialSubject": {
            "type": ["AchievementSubject"],
            "identifier": [domain.identity_object("grace@example.org", "s")],
            "achievement": {
                "id": "https://elsewhere.example/achievements/1",
                "type": ["Achievement"],
                "name": "Compilers",
                "criteria": {"narrative": "Write one."},
            },
        },
    }
    if status_url:
        credential["credentialStatus"] = status_list.status_entry(status_url, 9, "revocation")
    return proofs.sign(
        credential, key, verification_method=method or f"{issuer}#{key.public_key_multibase}", created=ISSUED
    )


def signed_status_list(key: keys.SigningKey, url: str, bits: bytes) -> dict[str, Any]:
    did_key = f"did:key:{key.public_key_multibase}"
    unsigned = status_list.status_list_credential(url, "revocation", bits, did_key, ISSUED)
    return proofs.sign(
        unsigned, key, verification_method=f"{did_key}#{key.public_key_multibase}", created=ISSUED
    )


def outcomes(report: Any) -> dict[str, Outcome]:
    return {name: check.outcome for name, check in report.checks.items()}


# --- our own credentials ---------------------------------------------------------------------


async def test_a_credential_we_issued_is_valid_without_any_fetch(
    verify: Verify, platform: Platform, records: Records, network: Network
) -> None:
    report = await verify(ours(platform, records))

    assert report.verified is Verdict.VALID, report.checks
    assert set(outcomes(report).values()) == {Outcome.PASSED}
    assert network.asked == []


@pytest.mark.parametrize(
    "tamper",
    [
        lambda c: c.update(name="Something Grander"),
        lambda c: c["issuer"].update(name="Harvard"),
        lambda c: c.update(validUntil="2099-01-01T00:00:00Z"),
        lambda c: c["credentialSubject"]["achievement"].update(name="Brain Surgery"),
        lambda c: c["credentialSubject"]["achievement"]["criteria"].update(narrative="Nothing"),
        lambda c: c["credentialSubject"]["identifier"][0].update(identityHash="sha256$" + "0" * 64),
        lambda c: c["credentialStatus"].update(statusListIndex="78"),
        lambda c: c["evidence"][0].update(id="https://forged.example/"),
        lambda c: c.update(awardedDate="2020-01-01T00:00:00Z"),
        lambda c: c["credentialSubject"]["achievement"]["alignment"].pop(),
    ],
    ids=[
        "name",
        "issuer-name",
        "validUntil",
        "achievement-name",
        "criteria",
        "identity",
        "status-index",
        "evidence",
        "awarded",
        "alignment",
    ],
)
async def test_changing_any_field_breaks_the_signature(
    verify: Verify, platform: Platform, records: Records, tamper: Callable[[dict[str, Any]], None]
) -> None:
    credential = ours(platform, records)
    tampered = copy.deepcopy(credential)
    tamper(tampered)
    assert tampered != credential

    report = await verify(tampered)

    assert report.checks["signature"].outcome is Outcome.FAILED
    assert report.verified is Verdict.INVALID


async def test_revoked_and_suspended_credentials_are_invalid(
    verify: Verify, platform: Platform, records: Records
) -> None:
    credential = ours(platform, records)
    list_id = uuid.UUID(credential["credentialStatus"]["statusListCredential"].rsplit("/", 1)[1])
    bits = bytearray(EMPTY_LIST)
    status_list.set_bit(bits, 77, True)

    records.lists[list_id] = ("revocation", bytes(bits))
    revoked = await verify(credential)
    records.lists[list_id] = ("revocation", EMPTY_LIST)
    records.suspended.add(uuid.UUID(credential["id"].rsplit("/", 1)[1]))
    suspended = await verify(credential)

    assert (revoked.verified, revoked.checks["status"].detail) == (Verdict.INVALID, "revoked by its issuer")
    assert (suspended.verified, suspended.checks["status"].detail) == (
        Verdict.INVALID,
        "suspended by its issuer",
    )


async def test_dates_outside_the_validity_period_fail(
    verify: Verify, platform: Platform, records: Records
) -> None:
    credential = ours(platform, records)

    expired = await verify(credential, now=ISSUED + timedelta(days=366))
    early = await verify(credential, now=ISSUED - timedelta(seconds=1))

    assert expired.checks["dates"].outcome is Outcome.FAILED
    assert expired.checks["dates"].detail.startswith("expired")
    assert early.checks["dates"].outcome is Outcome.FAILED
    assert early.verified is Verdict.INVALID


async def test_a_key_of_another_did_cannot_sign_for_our_issuer(
    verify: Verify, platform: Platform, records: Records, foreign_key: keys.SigningKey
) -> None:
    issuer = platform.issuer_did(COURSE.issuer.issuer_id)
    # Signed by a did:key while claiming to be our institution.
    forged = foreign(foreign_key, issuer=issuer, method=f"did:key:{foreign_key.public_key_multibase}#x")

    report = await verify(forged)

    assert report.checks["signature"].outcome is Outcome.FAILED
    assert "does not belong to the issuer" in report.checks["signature"].detail


async def test_an_issuer_we_never_heard_of_under_our_name_fails(
    verify: Verify, platform: Platform, records: Records
) -> None:
    credential = ours(platform, records)
    records.issuers.clear()

    report = await verify(credential)

    assert report.checks["signature"].outcome is Outcome.FAILED
    assert "not an issuer of this platform" in report.checks["signature"].detail


async def test_the_vc_jwt_form_verifies_and_a_forged_one_does_not(
    verify: Verify, platform: Platform, records: Records
) -> None:
    credential = ours(platform, records)
    key = platform.keyring.signing
    kid = f"{credential['issuer']['id']}#{key.key_id}"
    token = to_vc_jwt(credential, key, kid=kid)
    header, payload, signature = token.split(".")
    forged = ".".join([header, payload[:-4] + ("AAAA" if payload[-4:] != "AAAA" else "BBBB"), signature])

    valid = await verify(token)
    broken = await verify(forged)

    assert valid.verified is Verdict.VALID, valid.checks
    assert valid.credential["id"] == credential["id"]
    assert broken.checks["signature"].outcome is Outcome.FAILED


# --- other issuers, and what is never fetched ------------------------------------------------


async def test_a_did_key_credential_verifies_offline(
    verify: Verify, foreign_key: keys.SigningKey, network: Network
) -> None:
    report = await verify(foreign(foreign_key))

    assert report.verified is Verdict.VALID, report.checks
    assert report.checks["status"].detail == "the credential has no status to check"
    assert network.asked == []


async def test_an_unknown_context_fails_and_is_never_fetched(
    verify: Verify, foreign_key: keys.SigningKey, network: Network
) -> None:
    credential = foreign(foreign_key)
    credential["@context"] = [*credential["@context"], "https://attacker.example/context.json"]

    report = await verify(credential, hosts=frozenset({"attacker.example"}))

    assert report.checks["structure"].outcome is Outcome.FAILED
    assert "unsupported context" in report.checks["structure"].detail
    assert report.checks["signature"].outcome is Outcome.UNKNOWN
    assert report.verified is Verdict.INVALID
    assert network.asked == []


async def test_an_inline_context_is_refused_too(verify: Verify, foreign_key: keys.SigningKey) -> None:
    credential = foreign(foreign_key)
    credential["@context"] = [*credential["@context"], {"name": "https://attacker.example/name"}]

    report = await verify(credential)

    assert report.checks["structure"].outcome is Outcome.FAILED


async def test_a_did_web_of_an_untrusted_host_is_unknown_and_not_fetched(
    verify: Verify, foreign_key: keys.SigningKey, network: Network
) -> None:
    credential = foreign(foreign_key, issuer="did:web:169.254.169.254", method="did:web:169.254.169.254#k")

    report = await verify(credential)

    assert report.checks["signature"] == report.checks["signature"].__class__(
        Outcome.UNKNOWN, "untrusted issuer host: its DID document is not fetched"
    )
    assert report.verified is Verdict.UNKNOWN
    assert network.asked == []


async def test_a_did_web_of_a_trusted_host_is_resolved_from_its_did_document(
    verify: Verify, foreign_key: keys.SigningKey, network: Network
) -> None:
    did = "did:web:partner.example:issuers:7"
    ring = keys.KeyRing(signing=foreign_key, keys=(foreign_key,))
    network.documents["https://partner.example/issuers/7/did.json"] = keys.did_document(did, ring)
    credential = foreign(foreign_key, issuer=did, method=f"{did}#{foreign_key.key_id}")

    report = await verify(credential, hosts=frozenset({"partner.example"}))

    assert report.verified is Verdict.VALID, report.checks
    assert network.asked == ["https://partner.example/issuers/7/did.json"]


async def test_a_key_the_did_document_does_not_list_for_assertion_fails(
    verify: Verify, foreign_key: keys.SigningKey, network: Network
) -> None:
    did = "did:web:partner.example"
    document = keys.did_document(did, keys.KeyRing(signing=foreign_key, keys=(foreign_key,)))
    document["assertionMethod"] = []
    network.documents["https://partner.example/.well-known/did.json"] = document
    credential = foreign(foreign_key, issuer=did, method=f"{did}#{foreign_key.key_id}")

    report = await verify(credential, hosts=frozenset({"partner.example"}))

    assert report.checks["signature"].outcome is Outcome.FAILED
    assert "not an assertion method" in report.checks["signature"].detail


async def test_a_status_list_on_an_untrusted_host_is_unknown_and_not_fetched(
    verify: Verify, foreign_key: keys.SigningKey, network: Network
) -> None:
    credential = foreign(foreign_key, status_url="http://10.0.0.1/internal/status/1")

    report = await verify(credential)

    assert report.checks["signature"].outcome is Outcome.PASSED
    assert report.checks["status"].outcome is Outcome.UNKNOWN
    assert report.verified is Verdict.UNKNOWN, "fail closed: an unchecked status is never valid"
    assert network.asked == []


async def test_an_unreachable_status_list_is_unknown(
    verify: Verify, foreign_key: keys.SigningKey, network: Network
) -> None:
    url = "https://status.partner.example/lists/1"
    credential = foreign(foreign_key, status_url=url)

    report = await verify(credential, hosts=frozenset({"status.partner.example"}))

    assert network.asked == [url]
    assert report.checks["status"].outcome is Outcome.UNKNOWN
    assert "could not be fetched" in report.checks["status"].detail
    assert report.verified is Verdict.UNKNOWN


async def test_a_trusted_status_list_reports_revocation_once_its_own_signature_holds(
    verify: Verify, foreign_key: keys.SigningKey, network: Network
) -> None:
    url = "https://status.partner.example/lists/1"
    credential = foreign(foreign_key, status_url=url)
    bits = bytearray(EMPTY_LIST)
    status_list.set_bit(bits, 9, True)
    hosts = frozenset({"status.partner.example"})

    network.documents[url] = signed_status_list(foreign_key, url, bytes(bits))
    revoked = await verify(credential, hosts=hosts)
    # Someone between us and the host clears the bit: the list's signature no longer holds.
    forged_list = copy.deepcopy(network.documents[url])
    forged_list["credentialSubject"]["encodedList"] = status_list.encode_list(EMPTY_LIST)
    network.documents[url] = forged_list
    forged = await verify(credential, hosts=hosts)

    assert (revoked.checks["status"].outcome, revoked.verified) == (Outcome.FAILED, Verdict.INVALID)
    assert forged.checks["status"].outcome is Outcome.UNKNOWN
    assert "signature" in forged.checks["status"].detail


async def test_a_credential_without_a_proof_or_with_another_suite_is_not_valid(
    verify: Verify, foreign_key: keys.SigningKey
) -> None:
    credential = foreign(foreign_key)
    unsigned = {name: value for name, value in credential.items() if name != "proof"}
    other_suite = {**credential, "proof": {**credential["proof"], "cryptosuite": "ecdsa-rdfc-2019"}}

    assert (await verify(unsigned)).checks["signature"].outcome is Outcome.FAILED
    assert (await verify(other_suite)).verified is Verdict.UNKNOWN


async def test_structure_names_what_is_missing(verify: Verify) -> None:
    report = await verify({"@context": [VC_V2], "type": ["OpenBadgeCredential"]})

    detail = report.checks["structure"].detail
    assert report.checks["structure"].outcome is Outcome.FAILED
    for missing in ("VerifiableCredential", "issuer", "credentialSubject", "validFrom"):
        assert missing in detail
    assert report.verified is Verdict.INVALID


# --- the allowlist and the fetcher -----------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("https://partner.example/did.json", True),
        ("https://PARTNER.example/did.json", True),
        ("http://partner.example/did.json", False),
        ("https://partner.example.attacker.example/did.json", False),
        ("https://user@partner.example/did.json", False),
        ("https://other.example/did.json", False),
        ("https://ported.example:8443/x", True),
        ("https://ported.example/x", False),
        ("http://127.0.0.1:9/status", True),
        ("http://127.0.0.1:10/status", False),
        ("file:///etc/passwd", False),
        ("https://[::1/", False),
    ],
)
def test_only_trusted_hosts_are_allowed(url: str, allowed: bool) -> None:
    trust = Trust(frozenset({"partner.example", "ported.example:8443", "127.0.0.1:9"}))
    assert trust.allows(url) is allowed


async def test_the_fetcher_follows_no_redirect_and_stops_at_the_size_limit() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/moved":
            return httpx.Response(302, headers={"Location": "http://169.254.169.254/"})
        if request.url.path == "/huge":
            return httpx.Response(200, content=b"[" + b"0," * 10_000 + b"0]")
        return httpx.Response(200, json={"ok": True})

    fetch = http_fetcher(Trust(max_bytes=1024), transport=httpx.MockTransport(answer))

    assert await fetch("https://partner.example/fine") == {"ok": True}
    with pytest.raises(Unreachable, match="302"):
        await fetch("https://partner.example/moved")
    with pytest.raises(Unreachable, match="larger than 1024"):
        await fetch("https://partner.example/huge")


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)
MEMBERS = (
    "@context",
    "type",
    "issuer",
    "credentialSubject",
    "proof",
    "validFrom",
    "validUntil",
    "credentialStatus",
    "id",
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    changes=st.dictionaries(st.sampled_from(MEMBERS), JSON, max_size=4),
    removed=st.sets(st.sampled_from(MEMBERS), max_size=3),
)
def test_whatever_is_sent_the_verifier_answers_and_never_valid_when_changed(
    platform: Platform, changes: dict[str, Any], removed: set[str]
) -> None:
    records = Records()
    credential = ours(platform, records)
    presented = {name: value for name, value in {**credential, **changes}.items() if name not in removed}
    network = Network()

    report = asyncio.run(
        Verifier(platform, Trust(frozenset({"partner.example"})), records, network, NOW).verify(presented)
    )

    assert set(report.checks) == {"structure", "signature", "dates", "status"}
    if presented != credential:
        assert report.verified is not Verdict.VALID
    assert all(urlsplit(url).hostname == "partner.example" for url in network.asked)
