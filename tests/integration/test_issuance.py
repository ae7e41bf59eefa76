"""The issuance service end to end, against a real Kafka broker and PostgreSQL server.

Each test plays catalog and enrollment by publishing their events (CoursePublished,
PathwayPublished, CourseCompleted) on their topics, and reads what issuance recorded (its
database), published (the issuance topic) and serves (its HTTP API). Keys are generated into a
temporary folder, as an operator's Secret would hold them. One test renders the credential page in
a real headless Chromium.
"""

import asyncio
import contextlib
import hashlib
import io
import json
import os
import socket
import struct
import uuid
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import jsonschema  # type: ignore[import-untyped]  # no stubs in the dev group
import jwt
import pytest
import uvicorn
from aiokafka import AIOKafkaProducer
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from fastapi import FastAPI
from PIL import Image

import issuance.main
import issuance.settings
from issuance import keys, proofs, status_list
from issuance.service import single_proof
from microcred_events import (
    CompletedBy,
    CourseCompleted,
    CoursePublished,
    CourseSnapshot,
    CredentialIssued,
    CredentialKind,
    CredentialRevoked,
    Event,
    Learner,
    PathwayPublished,
    PathwaySnapshot,
    StatusPurpose,
    Topic,
    decode,
    encode,
    example_data,
)

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = ROOT.parent / "shared" / "conformance" / "ob_v3p0_achievementcredential_schema.json"
BASE = "https://issuance.test"
CATALOG = "urn:microcred:catalog"
ENROLLMENT = "urn:microcred:enrollment"
UNREACHABLE_HOST = "127.0.0.1:9"  # discard port: nothing listens, connections are refused at once
CHROMIUM = Path("/usr/bin/chromium")


@dataclass
class Harness:
    """What a test drives: the API, issuance's database, Kafka, and the test's callers."""

    api: httpx.AsyncClient
    db: asyncpg.Connection
    producer: AIOKafkaProducer
    prefix: str
    bearer: Callable[..., dict[str, str]]
    topic_reader: Callable[..., Any]
    wait_for: Callable[..., Any]

    def staff(self) -> dict[str, str]:
        return self.bearer("staff-1", "staff")

    def learner_token(self, learner: Learner) -> dict[str, str]:
        return self.bearer(str(learner.learner_id), "learner")

    async def send(self, event: Event, source: str, event_id: str | None = None) -> str:
        """Publish as another service would; returns the CloudEvents id."""
        event_id = event_id or str(uuid.uuid4())
        record = encode(event, source=source, event_id=event_id)
        await self.producer.send_and_wait(
            self.prefix + record.topic, record.value, key=record.key, headers=record.headers
        )
        return event_id

    async def consumed(self, event_id: str) -> bool:
        """Whether issuance has applied the event (its inbox holds it)."""
        return bool(
            await self.wait_for(
                lambda: self.db.fetchval("SELECT count(*) > 0 FROM inbox WHERE event_id = $1", event_id)
            )
        )

    async def publish_course(self, **changes: Any) -> CourseSnapshot:
        snapshot = CourseSnapshot.model_validate(
            {**example_data(CourseSnapshot), "course_id": str(uuid.uuid4()), "version": 2, **changes}
        )
        event_id = await self.send(CoursePublished(course=snapshot, published_at=datetime.now(UTC)), CATALOG)
        assert await self.consumed(event_id), "issuance did not take the course"
        return snapshot

    async def publish_pathway(self, *courses: CourseSnapshot, wait: bool = True) -> PathwaySnapshot:
        achievement = {
            **example_data(PathwaySnapshot)["achievement"],
            "achievement_id": str(uuid.uuid4()),
            "name": "Data Analyst Pathway",
        }
        snapshot = PathwaySnapshot.model_validate(
            {
                **example_data(PathwaySnapshot),
                "pathway_id": str(uuid.uuid4()),
                "course_ids": [str(course.course_id) for course in courses],
                "achievement": achievement,
            }
        )
        event_id = await self.send(
            PathwayPublished(pathway=snapshot, published_at=datetime.now(UTC)), CATALOG
        )
        if wait:
            assert await self.consumed(event_id)
        return snapshot

    def completion(self, course: CourseSnapshot, learner: Learner, **changes: Any) -> CourseCompleted:
        values: dict[str, Any] = {
            "enrollment_id": uuid.uuid4(),
            "learner": learner,
            "course_id": course.course_id,
            "course_version": course.version,
            "completed_at": datetime.now(UTC),
            "score": 92.5,
            "evidence_url": "https://northwind.example.edu/portfolio/final-project",
            "completed_by": CompletedBy.STAFF,
            **changes,
        }
        return CourseCompleted(**values)

    async def complete(self, completion: CourseCompleted, event_id: str | None = None) -> str:
        return await self.send(completion, ENROLLMENT, event_id)

    async def credential_of(self, enrollment_id: uuid.UUID) -> dict[str, Any]:
        """The credential issuance recorded for an enrollment, once it has."""
        row = await self.wait_for(
            lambda: self.db.fetchrow("SELECT * FROM credentials WHERE enrollment_id = $1", enrollment_id)
        )
        assert row is not None, "no credential was recorded for the completion"
        return dict(row)

    async def document(self, credential_id: uuid.UUID) -> dict[str, Any]:
        response = await self.api.get(f"/credentials/{credential_id}")
        assert response.status_code == 200, response.text
        document: dict[str, Any] = response.json()
        return document

    async def verify(self, presented: dict[str, Any] | str, *, jwt_as_json: bool = False) -> dict[str, Any]:
        """POST /verify: a credential as JSON, or a VC-JWT (raw, or as a JSON string)."""
        if isinstance(presented, dict) or jwt_as_json:
            response = await self.api.post("/verify", json=presented)
        else:
            response = await self.api.post(
                "/verify", content=presented, headers={"Content-Type": "application/vc+jwt"}
            )
        assert response.status_code == 200, response.text
        report: dict[str, Any] = response.json()
        return report

    async def issued_events(self, minimum: int, timeout: float = 30.0) -> list[CredentialIssued]:
        records = await self.topic_reader(self.prefix + Topic.ISSUANCE_CREDENTIAL, minimum, timeout)
        events = [decode(record.headers, record.value).event for record in records]
        return [event for event in events if isinstance(event, CredentialIssued)]


def learner(name: str = "Ada Lovelace") -> Learner:
    return Learner(learner_id=uuid.uuid4(), email=f"{name.split()[0].lower()}@example.org", display_name=name)


@pytest.fixture
def keys_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "issuer-keys"
    keys.generate_key(directory, "key-20260101")
    return directory


@pytest.fixture
def start(
    new_database: Callable[[], Any],
    make_settings: Callable[..., Any],
    serve: Any,
    producer: AIOKafkaProducer,
    topic_prefix: str,
    bearer: Callable[..., dict[str, str]],
    topic_reader: Callable[..., Any],
    wait_for: Callable[..., Any],
    keys_dir: Path,
) -> Callable[..., contextlib.AbstractAsyncContextManager[Harness]]:
    """Starts issuance (again, on the same database, when called again in a test)."""
    databases: list[str] = []

    @contextlib.asynccontextmanager
    async def running(**overrides: Any) -> AsyncIterator[Harness]:
        if not databases:
            databases.append(await new_database())
        settings = make_settings(
            issuance.settings.Settings,
            databases[0],
            issuer_keys_dir=keys_dir,
            public_base_url=BASE,
            verify_trusted_hosts=[UNREACHABLE_HOST],
            verify_fetch_timeout_seconds=2,
            **overrides,
        )
        db = await asyncpg.connect(databases[0])
        try:
            async with serve(issuance.main.create_app(settings)) as api:
                yield Harness(api, db, producer, topic_prefix, bearer, topic_reader, wait_for)
        finally:
            await db.close()

    return running


@pytest.fixture
async def harness(start: Callable[..., Any]) -> AsyncIterator[Harness]:
    async with start() as running:
        yield running


# --- minting ---------------------------------------------------------------------------------


async def test_a_completion_mints_one_credential_whatever_is_redelivered_or_replayed(
    harness: Harness,
) -> None:
    h = harness
    course = await h.publish_course(credential_validity_days=365)
    ada = learner()
    completion = h.completion(course, ada)

    event_id = await h.complete(completion)
    row = await h.credential_of(completion.enrollment_id)
    (issued,) = await h.issued_events(1)

    assert issued.credential_id == row["credential_id"]
    assert (issued.kind, issued.enrollment_id, issued.course_id) == (
        CredentialKind.COURSE,
        completion.enrollment_id,
        course.course_id,
    )
    assert issued.learner_id == ada.learner_id
    assert str(issued.credential_url) == f"{BASE}/credentials/{row['credential_id']}"
    assert issued.valid_until is not None

    redelivered = await h.complete(completion, event_id)
    replayed = await h.complete(completion)  # the same completion under a new event id
    assert redelivered == event_id
    assert await h.consumed(replayed)
    count = await h.db.fetchval(
        "SELECT count(*) FROM credentials WHERE enrollment_id = $1", completion.enrollment_id
    )
    assert count == 1
    assert (
        await h.db.fetchval("SELECT count(*) FROM outbox WHERE event_type = $1", CredentialIssued.TYPE) == 1
    )
    assert len(await h.issued_events(2, timeout=3)) == 1

    document = await h.document(row["credential_id"])
    served = (await h.api.get(f"/credentials/{row['credential_id']}")).content
    assert served.decode() == row["document"], "served exactly as stored"
    assert row["document_sha256"] == hashlib.sha256(served).hexdigest()
    assert document["credentialSubject"]["achievement"]["name"] == course.achievement.name
    assert document["evidence"][0]["id"] == str(completion.evidence_url)


async def test_the_proof_verifies_with_the_key_the_issuer_did_document_publishes(harness: Harness) -> None:
    h = harness
    course = await h.publish_course()
    completion = h.completion(course, learner())
    await h.complete(completion)
    row = await h.credential_of(completion.enrollment_id)
    document = await h.document(row["credential_id"])

    did = document["issuer"]["id"]
    assert did == f"did:web:issuance.test:issuers:{course.issuer.issuer_id}"
    did_document = (await h.api.get(f"/issuers/{course.issuer.issuer_id}/did.json")).json()
    method_id = single_proof(document)["proof"]["verificationMethod"]
    assert method_id in did_document["assertionMethod"]
    (method,) = [item for item in did_document["verificationMethod"] if item["id"] == method_id]
    public_key = keys.public_key_from_multibase(method["publicKeyMultibase"])

    assert proofs.verify(single_proof(document), public_key)
    tampered = single_proof({**document, "name": "Something Else"})
    assert not proofs.verify(tampered, public_key)
    assert (await h.api.get(f"/issuers/{uuid.uuid4()}/did.json")).status_code == 404
    jwks = (await h.api.get("/.well-known/jwks.json")).json()
    assert [key["kid"] for key in jwks["keys"]] == ["did:web:issuance.test#key-20260101"]


async def test_a_downloaded_baked_badge_verifies_with_an_independent_verifier(harness: Harness) -> None:
    # openbadgeslib, as an employer's tool: it extracts the credential from the file and checks
    # its proof with the key the issuer's DID document publishes.
    from openbadgeslib.ob3.ldp import verify_data_integrity_proof
    from openbadgeslib.ob3.verifier import OB3Verifier

    h = harness
    course = await h.publish_course()
    completion = h.completion(course, learner())
    await h.complete(completion)
    credential_id = (await h.credential_of(completion.enrollment_id))["credential_id"]
    document = await h.document(credential_id)
    did_document = (await h.api.get(f"/issuers/{course.issuer.issuer_id}/did.json")).json()
    (method,) = did_document["verificationMethod"]
    public_pem = keys.public_key_from_multibase(method["publicKeyMultibase"]).public_bytes(
        Encoding.PEM, PublicFormat.SubjectPublicKeyInfo
    )

    png = await h.api.get(f"/credentials/{credential_id}/baked.png")
    svg = await h.api.get(f"/credentials/{credential_id}/baked.svg")

    assert png.headers["content-type"] == "image/png"
    assert png.headers["content-disposition"].startswith("attachment; filename=")
    assert svg.headers["content-type"] == "image/svg+xml"
    for carried in (
        OB3Verifier.extract_token_from_png(png.content),
        OB3Verifier.extract_token_from_svg(svg.content),
    ):
        assert json.loads(carried) == document
        verify_data_integrity_proof(json.loads(carried), public_pem)  # raises unless it verifies


async def test_an_unknown_credential_is_a_page_for_browsers_and_a_problem_for_clients(
    harness: Harness,
) -> None:
    unknown = uuid.uuid4()
    browser = await harness.api.get(
        f"/credentials/{unknown}", headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
    )
    client = await harness.api.get(f"/credentials/{unknown}", headers={"Accept": "application/json"})

    assert browser.status_code == 404
    assert browser.headers["content-type"] == "text/html; charset=utf-8"
    assert "No such credential" in browser.text
    assert str(unknown) in browser.text
    assert "Content-Security-Policy" in browser.headers
    assert client.status_code == 404
    assert client.headers["content-type"] == "application/problem+json"
    assert client.json()["type"] == "urn:microcred:problem:credential-not-found"


async def test_the_credential_passes_the_open_badges_3_schema(harness: Harness) -> None:
    if not SCHEMA.exists():
        pytest.skip(f"{SCHEMA} is not there: the conformance data lives beside the repository, in ../shared")
    h = harness
    course = await h.publish_course(credential_validity_days=730)
    completion = h.completion(course, learner())
    await h.complete(completion)
    row = await h.credential_of(completion.enrollment_id)

    validator = jsonschema.Draft201909Validator(
        json.loads(SCHEMA.read_text()), format_checker=jsonschema.Draft201909Validator.FORMAT_CHECKER
    )
    errors = [error.message for error in validator.iter_errors(await h.document(row["credential_id"]))]
    assert errors == []


async def test_verify_accepts_the_credential_and_its_vc_jwt_and_rejects_any_tampering(
    harness: Harness,
) -> None:
    h = harness
    course = await h.publish_course(credential_validity_days=365)
    completion = h.completion(course, learner())
    await h.complete(completion)
    row = await h.credential_of(completion.enrollment_id)
    document = await h.document(row["credential_id"])
    token = (await h.api.get(f"/credentials/{row['credential_id']}/jwt")).text

    valid = await h.verify(document)
    as_jwt = await h.verify(token)
    as_json_string = await h.verify(token, jwt_as_json=True)

    assert valid["verified"] == "valid", valid
    assert {check["result"] for check in valid["checks"].values()} == {"passed"}
    assert valid["credential_id"] == document["id"]
    assert as_jwt["verified"] == "valid", as_jwt
    assert as_json_string["verified"] == "valid", as_json_string
    for path, value in [
        (("name",), "Doctorate"),
        (("validUntil",), "2099-01-01T00:00:00Z"),
        (("issuer", "name"), "Another University"),
        (("credentialSubject", "achievement", "description"), "Something else"),
        (("credentialSubject", "identifier", 0, "salt"), "other"),
        (("credentialStatus", "statusListIndex"), "0"),
    ]:
        tampered = json.loads(json.dumps(document))
        node = tampered
        for step in path[:-1]:
            node = node[step]
        node[path[-1]] = value
        report = await h.verify(tampered)
        assert report["verified"] == "invalid", path
        assert report["checks"]["signature"]["result"] == "failed", path


async def test_revocation_sets_the_bit_of_a_signed_status_list_and_verify_reports_it(
    harness: Harness,
) -> None:
    h = harness
    course = await h.publish_course()
    ada = learner()
    completion = h.completion(course, ada)
    await h.complete(completion)
    row = await h.credential_of(completion.enrollment_id)
    document = await h.document(row["credential_id"])
    url = f"/credentials/{row['credential_id']}/revocation"

    refused = await h.api.post(url, json={"reason": "mine"}, headers=h.learner_token(ada))
    revoked = await h.api.post(url, json={"reason": "Completion recorded in error."}, headers=h.staff())
    again = await h.api.post(url, json={"reason": "again"}, headers=h.staff())
    report = await h.verify(document)

    assert refused.status_code == 403
    assert revoked.status_code == 200, revoked.text
    assert revoked.json()["status"] == "revoked"
    assert (again.status_code, again.headers["content-type"]) == (409, "application/problem+json")
    assert report["verified"] == "invalid"
    assert report["checks"]["status"] == {"result": "failed", "detail": "revoked by its issuer"}
    assert report["checks"]["signature"]["result"] == "passed", "the credential itself is untouched"

    entry = document["credentialStatus"]
    status_list_path = entry["statusListCredential"].removeprefix(BASE)
    published = (await h.api.get(status_list_path)).json()
    assert published["type"] == ["VerifiableCredential", "BitstringStatusListCredential"]
    bits = status_list.decode_list(published["credentialSubject"]["encodedList"])
    assert len(bits) * 8 >= status_list.MIN_LIST_SIZE
    assert status_list.get_bit(bits, int(entry["statusListIndex"]))
    assert sum(bin(byte).count("1") for byte in bits) == 1
    platform = (await h.api.get("/.well-known/did.json")).json()
    list_key = keys.public_key_from_multibase(platform["verificationMethod"][-1]["publicKeyMultibase"])
    assert published["issuer"] == platform["id"] == "did:web:issuance.test"
    assert proofs.verify(single_proof(published), list_key), "the re-signed list verifies"

    records = await h.topic_reader(h.prefix + Topic.ISSUANCE_CREDENTIAL, 2)
    events = [decode(record.headers, record.value).event for record in records]
    (revocation,) = [event for event in events if isinstance(event, CredentialRevoked)]
    assert (revocation.credential_id, revocation.status_purpose, revocation.reason) == (
        row["credential_id"],
        StatusPurpose.REVOCATION,
        "Completion recorded in error.",
    )

    # The achievement can be earned again, through a new completion (a new enrollment).
    second = h.completion(course, ada)
    await h.complete(second)
    renewed = await h.credential_of(second.enrollment_id)
    assert (await h.verify(await h.document(renewed["credential_id"])))["verified"] == "valid"


async def test_suspension_is_reported_until_the_credential_is_reinstated(harness: Harness) -> None:
    h = harness
    course = await h.publish_course()
    completion = h.completion(course, learner())
    await h.complete(completion)
    row = await h.credential_of(completion.enrollment_id)
    document = await h.document(row["credential_id"])
    url = f"/credentials/{row['credential_id']}/suspension"

    before = await h.api.get(f"/credentials/{row['credential_id']}/verification")
    suspended = await h.api.post(url, json={"reason": "Under review."}, headers=h.staff())
    while_suspended = await h.verify(document)
    page = await h.api.get(f"/credentials/{row['credential_id']}", headers={"Accept": "text/html"})
    checks_page = await h.api.get(
        f"/credentials/{row['credential_id']}/verification", headers={"Accept": "text/html"}
    )
    reinstated = await h.api.delete(url, headers=h.staff())
    after = await h.verify(document)
    not_suspended = await h.api.delete(url, headers=h.staff())

    assert suspended.status_code == 200, suspended.text
    assert suspended.json()["status"] == "suspended"
    assert while_suspended["verified"] == "invalid"
    assert while_suspended["checks"]["status"]["detail"] == "suspended by its issuer"
    assert "Suspended by the issuer" in page.text
    assert "Add to LinkedIn profile" not in page.text
    # The page's Verify button: the same checks as POST /verify, on the credential as issued.
    assert before.status_code == 200, before.text
    assert before.json()["verified"] == "valid"
    assert {check["result"] for check in before.json()["checks"].values()} == {"passed"}
    assert checks_page.headers["content-type"] == "text/html; charset=utf-8"
    assert 'data-verdict="invalid"' in checks_page.text
    assert 'data-check="status" data-result="failed"' in checks_page.text
    assert "suspended by its issuer" in checks_page.text
    assert reinstated.status_code == 200, reinstated.text
    assert reinstated.json()["status"] == "valid"
    assert after["verified"] == "valid", after
    assert not_suspended.status_code == 409


async def test_a_status_list_that_cannot_be_fetched_leaves_the_verdict_unknown(
    harness: Harness, tmp_path: Path
) -> None:
    h = harness
    other = keys.generate_key(tmp_path / "elsewhere", "other-1")
    did = f"did:key:{other.public_key_multibase}"

    def credential(status_url: str) -> dict[str, Any]:
        unsigned = {
            "@context": [
                "https://www.w3.org/ns/credentials/v2",
                "https://purl.imsglobal.org/spec/ob/v3p0/context-3.0.3.json",
            ],
            "id": f"urn:uuid:{uuid.uuid4()}",
            "type": ["VerifiableCredential", "OpenBadgeCredential"],
            "issuer": {"id": did, "type": ["Profile"], "name": "Elsewhere College"},
            "validFrom": "2026-01-01T00:00:00Z",
            "credentialSubject": {
                "type": ["AchievementSubject"],
                "identifier": [
                    {
                        "type": "IdentityObject",
                        "identityHash": "grace@example.org",
                        "identityType": "emailAddress",
                        "hashed": False,
                    }
                ],
                "achievement": {
                    "id": "https://elsewhere.example/a/1",
                    "type": ["Achievement"],
                    "name": "Compilers",
                    "criteria": {"narrative": "Write one."},
                },
            },
            "credentialStatus": status_list.status_entry(status_url, 3, "revocation"),
        }
        return proofs.sign(
            unsigned,
            other,
            verification_method=f"{did}#{other.public_key_multibase}",
            created=datetime.now(UTC),
        )

    trusted_but_down = await h.verify(credential(f"http://{UNREACHABLE_HOST}/status/1"))
    untrusted = await h.verify(credential("http://169.254.169.254/latest/meta-data"))

    for report in (trusted_but_down, untrusted):
        assert report["checks"]["signature"]["result"] == "passed", report
        assert report["checks"]["status"]["result"] == "unknown", report
        assert report["verified"] == "unknown", "fail closed: never valid without the status"
    assert "could not be fetched" in trusted_but_down["checks"]["status"]["detail"]
    assert "untrusted" in untrusted["checks"]["status"]["detail"]


async def test_verify_refuses_what_is_not_a_credential_or_too_large(harness: Harness) -> None:
    h = harness
    huge = {"@context": ["https://www.w3.org/ns/credentials/v2"], "padding": "x" * 300_000}

    too_large = await h.api.post("/verify", json=huge)
    not_json = await h.api.post("/verify", content=b"{", headers={"Content-Type": "application/json"})
    a_list = await h.api.post("/verify", json=[1, 2])

    assert (too_large.status_code, too_large.headers["content-type"]) == (413, "application/problem+json")
    assert not_json.status_code == 422
    assert a_list.status_code == 422


# --- stacking --------------------------------------------------------------------------------


async def test_the_pathway_credential_is_minted_once_when_its_last_course_completes(harness: Harness) -> None:
    h = harness
    first, second = await h.publish_course(), await h.publish_course()
    pathway = await h.publish_pathway(first, second)
    ada = learner()

    await h.complete(h.completion(first, ada))
    last = h.completion(second, ada)
    event_id = await h.complete(last)
    await h.credential_of(last.enrollment_id)

    async def pathway_credentials() -> list[asyncpg.Record]:
        return await h.db.fetch(
            "SELECT credential_id, document FROM credentials WHERE kind = 'pathway' AND learner_id = $1",
            ada.learner_id,
        )

    (stacked,) = await h.wait_for(pathway_credentials)
    await h.complete(last, event_id)
    assert await h.consumed(await h.complete(last))
    assert len(await pathway_credentials()) == 1, "redelivery and replay mint no second pathway credential"
    document = json.loads(stacked["document"])
    assert document["credentialSubject"]["achievement"]["name"] == "Data Analyst Pathway"
    assert (await h.verify(document))["verified"] == "valid"
    issued = await h.issued_events(3)
    assert [event.kind for event in issued].count(CredentialKind.PATHWAY) == 1
    (announced,) = [event for event in issued if event.kind is CredentialKind.PATHWAY]
    assert (announced.pathway_id, announced.credential_id) == (pathway.pathway_id, stacked["credential_id"])

    listed = (await h.api.get("/me/credentials", headers=h.learner_token(ada))).json()
    assert [item["kind"] for item in listed["items"]].count("pathway") == 1
    assert len(listed["items"]) == 3
    # The pathway credential names the course credentials it stands on, signed, and so does the list.
    courses = {
        item["course_id"]: item["credential_id"] for item in listed["items"] if item["kind"] == "course"
    }
    parts = [courses[str(first.course_id)], courses[str(second.course_id)]]
    assert [item["id"] for item in document["evidence"]] == [f"{BASE}/credentials/{part}" for part in parts]
    assert [item["name"] for item in document["evidence"]] == [
        first.achievement.name,
        second.achievement.name,
    ]
    (listed_pathway,) = [item for item in listed["items"] if item["kind"] == "pathway"]
    assert listed_pathway["parts"] == parts
    nobody = (await h.api.get("/me/credentials", headers=h.learner_token(learner("Grace Hopper")))).json()
    assert nobody["items"] == []
    by_staff = await h.api.get(
        "/credentials", params={"learner_id": str(ada.learner_id), "limit": 2}, headers=h.staff()
    )
    assert len(by_staff.json()["items"]) == 2
    assert by_staff.json()["next_cursor"] is not None


async def test_a_pathway_published_after_the_courses_were_completed_is_awarded(harness: Harness) -> None:
    h = harness
    first, second = await h.publish_course(), await h.publish_course()
    grace = learner("Grace Hopper")
    for course in (first, second):
        completion = h.completion(course, grace)
        await h.complete(completion)
        await h.credential_of(completion.enrollment_id)

    pathway = await h.publish_pathway(first, second)

    count = await h.db.fetchval(
        "SELECT count(*) FROM credentials WHERE kind = 'pathway' AND pathway_id = $1 AND learner_id = $2",
        pathway.pathway_id,
        grace.learner_id,
    )
    assert count == 1


async def test_a_completion_ahead_of_its_course_version_waits_for_it(harness: Harness) -> None:
    h = harness
    snapshot = CourseSnapshot.model_validate(
        {**example_data(CourseSnapshot), "course_id": str(uuid.uuid4()), "version": 5}
    )
    completion = h.completion(snapshot, learner())

    assert await h.consumed(await h.complete(completion))
    assert await h.db.fetchval("SELECT count(*) FROM credentials") == 0
    assert await h.db.fetchval("SELECT count(*) FROM awaiting_course_version") == 1
    await h.send(CoursePublished(course=snapshot, published_at=datetime.now(UTC)), CATALOG)

    row = await h.credential_of(completion.enrollment_id)
    assert row["course_version"] == 5
    assert await h.db.fetchval("SELECT count(*) FROM awaiting_course_version") == 0


# --- keys ------------------------------------------------------------------------------------


async def test_after_a_key_rotation_new_credentials_use_the_new_key_and_old_ones_still_verify(
    start: Callable[..., Any], keys_dir: Path
) -> None:
    ada = learner()
    async with start() as h:
        course = await h.publish_course()
        before = h.completion(course, ada)
        await h.complete(before)
        old = await h.document((await h.credential_of(before.enrollment_id))["credential_id"])

    keys.generate_key(keys_dir, "key-20270101")

    async with start() as h:
        after = h.completion(course, ada)
        await h.complete(after)
        new = await h.document((await h.credential_of(after.enrollment_id))["credential_id"])
        old_report = await h.verify(old)
        new_report = await h.verify(new)
        did_document = (await h.api.get(f"/issuers/{course.issuer.issuer_id}/did.json")).json()

    assert single_proof(old)["proof"]["verificationMethod"].endswith("#key-20260101")
    assert single_proof(new)["proof"]["verificationMethod"].endswith("#key-20270101")
    assert old_report["verified"] == "valid", old_report
    assert new_report["verified"] == "valid", new_report
    assert [method["id"].rsplit("#", 1)[1] for method in did_document["verificationMethod"]] == [
        "key-20260101",
        "key-20270101",
    ]


# --- the page, in a real browser -------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def _uvicorn(app: FastAPI, port: int) -> AsyncIterator[None]:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on"))
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(60):
            while not server.started:
                if task.done():
                    task.result()
                await asyncio.sleep(0.05)
        yield
    finally:
        server.should_exit = True
        await task


async def _chromium(*arguments: str, profile: Path) -> str:
    process = await asyncio.create_subprocess_exec(
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        *arguments,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(90):
            stdout, stderr = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode == 0, stderr.decode(errors="replace")[-2000:]
    return stdout.decode()


def _png_colours(png: bytes) -> int:
    """How many distinct byte values the image's pixel data holds: a blank page has a handful."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    position, data = 8, b""
    while position < len(png):
        (length,) = struct.unpack(">I", png[position : position + 4])
        kind = png[position + 4 : position + 8]
        if kind == b"IDAT":
            data += png[position + 8 : position + 8 + length]
        position += 12 + length
    return len(set(zlib.decompress(data)))


class _Dom(HTMLParser):
    def __init__(self, html: str) -> None:
        super().__init__()
        self.meta: dict[str, str] = {}
        self.hrefs: dict[str, str] = {}
        self.text: list[str] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {name: value or "" for name, value in attrs}
        if tag == "meta" and "property" in attributes:
            self.meta[attributes["property"]] = attributes.get("content", "")
        if tag == "a" and "id" in attributes:
            self.hrefs[attributes["id"]] = attributes.get("href", "")

    def handle_data(self, data: str) -> None:
        self.text.append(data)


@pytest.fixture
async def served(
    make_settings: Callable[..., Any],
    new_database: Callable[[], Any],
    producer: AIOKafkaProducer,
    topic_prefix: str,
    bearer: Callable[..., dict[str, str]],
    topic_reader: Callable[..., Any],
    wait_for: Callable[..., Any],
    keys_dir: Path,
) -> AsyncIterator[tuple[str, Harness]]:
    """Issuance served over real HTTP on a port of its own (what outside tools need), its base URL
    and a harness that calls it there."""
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    database = await new_database()
    settings = make_settings(
        issuance.settings.Settings, database, issuer_keys_dir=keys_dir, public_base_url=base
    )
    db = await asyncpg.connect(database)
    try:
        async with (
            _uvicorn(issuance.main.create_app(settings), port),
            httpx.AsyncClient(base_url=base) as api,
        ):
            yield base, Harness(api, db, producer, topic_prefix, bearer, topic_reader, wait_for)
    finally:
        await db.close()


async def test_a_standard_jwks_client_finds_the_key_a_vc_jwt_names(served: tuple[str, Harness]) -> None:
    # PyJWT's PyJWKClient, as an employer's code would use it: it fetches the JWKS over HTTP and
    # picks the key whose `kid` is the token header's, with nothing of ours in between.
    base, h = served
    course = await h.publish_course()
    completion = h.completion(course, learner())
    await h.complete(completion)
    credential_id = (await h.credential_of(completion.enrollment_id))["credential_id"]
    document = await h.document(credential_id)
    token = (await h.api.get(f"/credentials/{credential_id}/jwt")).text
    client = jwt.PyJWKClient(f"{base}/issuers/{course.issuer.issuer_id}/jwks.json")
    signing_key = await asyncio.to_thread(client.get_signing_key_from_jwt, token)
    platform_client = jwt.PyJWKClient(f"{base}/.well-known/jwks.json")
    with pytest.raises(jwt.PyJWKClientError):  # the platform's own keys are named by its DID
        await asyncio.to_thread(platform_client.get_signing_key_from_jwt, token)

    header = jwt.get_unverified_header(token)
    assert header["kid"].startswith(f"{document['issuer']['id']}#key-")  # the issuer's DID URL
    assert signing_key.key_id == header["kid"]
    payload = json.loads(jwt.PyJWS().decode(token, key=signing_key.key, algorithms=["EdDSA"]))
    assert payload == {name: value for name, value in document.items() if name != "proof"}


async def test_a_browser_renders_the_credential_page(served: tuple[str, Harness], tmp_path: Path) -> None:
    if not CHROMIUM.exists():  # noqa: ASYNC240  (one stat, before the test's own work)
        message = f"{CHROMIUM} is missing: apt-get install -y chromium (CI installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    base, h = served
    course = await h.publish_course(credential_validity_days=365)
    ada = learner("Ada <Lovelace> & Co")
    completion = h.completion(course, ada)
    await h.complete(completion)
    credential_id = (await h.credential_of(completion.enrollment_id))["credential_id"]
    url = f"{base}/credentials/{credential_id}"

    dom = _Dom(await _chromium("--dump-dom", url, profile=tmp_path / "profile-dom"))
    screenshot = tmp_path / "page.png"
    await _chromium(
        f"--screenshot={screenshot}",
        "--window-size=1200,1000",
        url,
        profile=tmp_path / "profile-shot",
    )
    # The Verify button's target, as the browser shows it after a click.
    verification = _Dom(
        await _chromium("--dump-dom", f"{url}/verification", profile=tmp_path / "profile-verify")
    )
    # The preview image as a browser gets it: the PNG card, decoded by Chromium itself.
    card = await h.api.get(f"/credentials/{credential_id}/card.png")
    card_shot = tmp_path / "card.png"
    await _chromium(
        f"--screenshot={card_shot}",
        "--window-size=1200,630",
        f"{url}/card.png",
        profile=tmp_path / "profile-card",
    )

    text = " ".join(" ".join(dom.text).split())
    assert course.achievement.name in text
    assert course.issuer.name in text
    assert "Ada <Lovelace> & Co" in text, "the learner's name, as text"
    assert "Valid" in text
    assert dom.hrefs["linkedin"].startswith(
        "https://www.linkedin.com/profile/add?startTask=CERTIFICATION_NAME&"
    )
    assert f"certUrl={url.replace(':', '%3A').replace('/', '%2F')}" in dom.hrefs["linkedin"]
    assert dom.meta["og:title"] == course.achievement.name
    assert dom.meta["og:url"] == url
    assert dom.hrefs["verify-button"] == f"{url}/verification"
    shown = " ".join(" ".join(verification.text).split())
    assert "Verified: every check passed" in shown
    for check in ("Structure", "Signature", "Dates", "Status"):
        assert f"passed {check}:" in shown
    assert dom.meta["og:image"] == f"{url}/card.png"
    assert (dom.meta["og:image:width"], dom.meta["og:image:height"]) == ("1200", "630")
    assert card.status_code == 200
    assert card.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(card.content)) as decoded:
        assert (decoded.format, decoded.size) == ("PNG", (1200, 630))
    assert _png_colours(card_shot.read_bytes()) > 50, "Chromium drew the card, not a broken-image icon"
    assert dom.meta["og:type"] == "website"
    assert "Ada <Lovelace> & Co" in dom.meta["og:description"]
    png = screenshot.read_bytes()
    assert len(png) > 10_000
    assert _png_colours(png) > 50, "the screenshot shows a rendered page, not a blank one"
