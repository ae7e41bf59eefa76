"""Issuance's rules, without I/O: the credential a completion earns, stacking, status changes."""

import hashlib
import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]  # no stubs in the dev group
import pytest
from pyld import jsonld as pyld

from issuance import domain, keys, status_list
from issuance.domain import Credential, DisplayStatus, Issuance, StatusChangeRefused
from issuance.jsonld import OB_V3, VC_V2, canonicalize
from issuance.service import Platform, single_proof
from microcred_events import (
    CourseCompleted,
    CourseSnapshot,
    CredentialKind,
    CredentialRevoked,
    Learner,
    PathwaySnapshot,
    StatusPurpose,
    example_data,
)

CONFORMANCE = Path(__file__).resolve().parents[3].parent / "shared" / "conformance"
T0 = datetime(2026, 3, 1, 9, 30, 15, 123456, tzinfo=UTC)
LEARNER = Learner(learner_id=uuid.uuid4(), email="ada@example.org", display_name="Ada Lovelace")
BASE = "https://credentials.microcred.example"


def course(**changes: Any) -> CourseSnapshot:
    return CourseSnapshot.model_validate({**example_data(CourseSnapshot), **changes})


def completion(**changes: Any) -> CourseCompleted:
    return CourseCompleted.model_validate(
        {**example_data(CourseCompleted), "learner": LEARNER.model_dump(mode="json"), **changes}
    )


def pathway(*course_ids: uuid.UUID) -> PathwaySnapshot:
    return PathwaySnapshot.model_validate({**example_data(PathwaySnapshot), "course_ids": course_ids})


def issuance(issuer_id: uuid.UUID, salt: str = "0f1e2d3c") -> Issuance:
    credential_id, list_id = uuid.uuid4(), uuid.uuid4()
    list_url = f"{BASE}/status/{list_id}"
    return Issuance(
        credential_id=credential_id,
        credential_url=f"{BASE}/credentials/{credential_id}",
        issuer_did=keys.did_web(BASE, "issuers", str(issuer_id)),
        issued_at=domain.whole_seconds(T0),
        status_list_id=list_id,
        status_index=4242,
        status_entry=status_list.status_entry(list_url, 4242, "revocation"),
        salt=salt,
    )


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Platform:
    directory = tmp_path_factory.mktemp("keys")
    keys.generate_key(directory, "key-1")
    return Platform(BASE, keys.load_keyring(directory))


def conformance_file(name: str) -> Path:
    path = CONFORMANCE / name
    if not path.exists():
        pytest.skip(f"{path} is not there: the conformance data lives beside the repository, in ../shared")
    return path


# --- the credential --------------------------------------------------------------------------


def test_a_course_credential_says_what_was_achieved_by_whom_from_whom() -> None:
    snapshot = course(credential_validity_days=730)
    made = issuance(snapshot.issuer.issuer_id)

    credential = domain.course_credential(made, snapshot, completion())

    assert credential["@context"] == [VC_V2, OB_V3]
    assert credential["id"] == made.credential_url
    assert credential["type"] == ["VerifiableCredential", "OpenBadgeCredential"]
    assert credential["name"] == snapshot.achievement.name
    assert credential["issuer"] == {
        "id": f"did:web:credentials.microcred.example:issuers:{snapshot.issuer.issuer_id}",
        "type": ["Profile"],
        "name": snapshot.issuer.name,
        "url": str(snapshot.issuer.url),
    }
    assert credential["validFrom"] == "2026-03-01T09:30:15Z", "UTC, whole seconds"
    assert credential["validUntil"] == "2028-02-29T09:30:15Z"
    assert credential["awardedDate"] == "2025-05-02T16:45:00Z"
    achievement = credential["credentialSubject"]["achievement"]
    assert achievement["id"] == f"urn:uuid:{snapshot.achievement.achievement_id}"
    assert achievement["criteria"] == {"narrative": snapshot.achievement.criteria_narrative}
    assert achievement["alignment"] == [
        {
            "type": ["Alignment"],
            "targetName": "Manage data for analysis",
            "targetUrl": str(snapshot.achievement.alignments[0].target_url),
            "targetFramework": "ESCO",
            "targetCode": "S5.6.1",
        }
    ]
    assert credential["credentialStatus"] == made.status_entry


def test_the_learner_is_a_salted_hash_of_their_email_never_the_address() -> None:
    snapshot = course()
    credential = domain.course_credential(
        issuance(snapshot.issuer.issuer_id, salt="pepper"), snapshot, completion()
    )

    (identity,) = credential["credentialSubject"]["identifier"]
    expected = hashlib.sha256(b"ada@example.orgpepper").hexdigest()
    assert identity == {
        "type": "IdentityObject",
        "identityHash": f"sha256${expected}",
        "identityType": "emailAddress",
        "hashed": True,
        "salt": "pepper",
    }
    assert "ada@example.org" not in json.dumps(credential)
    assert LEARNER.display_name not in json.dumps(credential)


def test_evidence_carries_the_work_and_the_score_and_is_left_out_without_them() -> None:
    snapshot = course()
    made = issuance(snapshot.issuer.issuer_id)

    with_work = domain.course_credential(
        made, snapshot, completion(score=92, evidence_url="https://x.example/w")
    )
    score_only = domain.course_credential(made, snapshot, completion(score=70.5, evidence_url=None))
    neither = domain.course_credential(made, snapshot, completion(score=None, evidence_url=None))

    assert with_work["evidence"] == [
        {
            "type": ["Evidence"],
            "id": "https://x.example/w",
            "name": "Work submitted for the course",
            "narrative": "Completed with a final score of 92%.",
        }
    ]
    assert score_only["evidence"] == [
        {"type": ["Evidence"], "narrative": "Completed with a final score of 70.5%."}
    ]
    assert "evidence" not in neither


def test_a_course_without_a_validity_period_gives_a_credential_that_does_not_expire() -> None:
    snapshot = course(credential_validity_days=None)
    credential = domain.course_credential(issuance(snapshot.issuer.issuer_id), snapshot, completion())
    assert "validUntil" not in credential
    assert domain.valid_until(snapshot, T0) is None


PART_IDS = [uuid.uuid4(), uuid.uuid4()]
PARTS = [
    domain.PathwayPart(f"https://credentials.microcred.example/credentials/{part_id}", name)
    for part_id, name in zip(PART_IDS, ["Durable Skills: Communication", "Ünïcode <b>\"&'</b>"], strict=True)
]


def test_a_pathway_credential_is_issued_by_the_pathway_issuer_for_its_achievement() -> None:
    snapshot = pathway(uuid.uuid4(), uuid.uuid4())
    made = issuance(snapshot.issuer.issuer_id)

    credential = domain.pathway_credential(made, snapshot, LEARNER, PARTS)

    assert credential["name"] == snapshot.achievement.name
    assert credential["credentialSubject"]["achievement"]["id"] == snapshot.achievement.achievement_id.urn
    assert "validUntil" not in credential


def test_a_pathway_credential_names_the_course_credentials_it_stands_on() -> None:
    snapshot = pathway(uuid.uuid4(), uuid.uuid4())
    credential = domain.pathway_credential(issuance(snapshot.issuer.issuer_id), snapshot, LEARNER, PARTS)

    assert [(item["id"], item["name"]) for item in credential["evidence"]] == [
        (part.credential_url, part.name) for part in PARTS
    ]
    assert domain.part_ids(credential) == PART_IDS
    course_credential = domain.course_credential(issuance(uuid.uuid4()), course(), completion(score=88))
    assert domain.part_ids(course_credential) == []


def signed_credentials(platform: Platform) -> list[dict[str, Any]]:
    """Signed credentials of every shape the service mints, with hostile-looking text too."""
    shapes = [
        (course(credential_validity_days=365), completion(score=88, evidence_url="https://x.example/e")),
        (course(credential_validity_days=None), completion(score=None, evidence_url=None)),
        (
            course(
                achievement={**example_data(CourseSnapshot)["achievement"], "name": "Ünïcode <b>\"&'</b>"},
            ),
            completion(),
        ),
    ]
    documents = []
    for snapshot, completed in shapes:
        made = issuance(snapshot.issuer.issuer_id)
        unsigned = domain.course_credential(made, snapshot, completed)
        documents.append(json.loads(platform.sign(unsigned, made.issuer_did, T0)))
    stacked = pathway(uuid.uuid4(), uuid.uuid4())
    made = issuance(stacked.issuer.issuer_id)
    documents.append(
        json.loads(
            platform.sign(domain.pathway_credential(made, stacked, LEARNER, PARTS), made.issuer_did, T0)
        )
    )
    return documents


def test_every_issued_credential_passes_the_open_badges_3_schema(platform: Platform) -> None:
    schema = json.loads(conformance_file("ob_v3p0_achievementcredential_schema.json").read_text())
    validator = jsonschema.Draft201909Validator(
        schema, format_checker=jsonschema.Draft201909Validator.FORMAT_CHECKER
    )
    for document in signed_credentials(platform):
        errors = [f"{list(error.path)}: {error.message}" for error in validator.iter_errors(document)]
        assert errors == [], document["name"]


def test_the_canonical_form_equals_a_reference_processors_with_the_published_contexts(
    platform: Platform,
) -> None:
    """pyld's own URDNA2015 N-Quads with the contexts as published (not the bundled copies)."""
    published = {
        VC_V2: json.loads(conformance_file("credentials-v2-context.jsonld").read_text()),
        OB_V3: json.loads(conformance_file("ob-v3p0-context-3.0.3.jsonld").read_text()),
    }

    def loader(url: str, options: Any = None) -> dict[str, Any]:
        return {"contextUrl": None, "documentUrl": url, "document": published[url]}

    for document in signed_credentials(platform):
        unsecured = {name: value for name, value in document.items() if name != "proof"}
        reference = pyld.normalize(
            unsecured, {"algorithm": "URDNA2015", "format": "application/n-quads", "documentLoader": loader}
        )
        assert canonicalize(unsecured) == reference


def test_the_stored_proof_array_holds_the_one_proof_the_signer_made(platform: Platform) -> None:
    (document, *_) = signed_credentials(platform)
    assert isinstance(document["proof"], list)
    assert len(document["proof"]) == 1
    assert single_proof(document)["proof"]["verificationMethod"].endswith("#key-1")


# --- stacking --------------------------------------------------------------------------------


def test_a_pathway_is_complete_when_every_one_of_its_courses_is_held() -> None:
    a, b, c = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    ab, abc = pathway(a, b), pathway(a, b, c)

    assert domain.completed_pathways({a}, [ab, abc]) == []
    assert domain.completed_pathways({a, b}, [ab, abc]) == [ab]
    assert domain.completed_pathways({a, b, c, uuid.uuid4()}, [ab, abc]) == [ab, abc]
    assert domain.completed_pathways(set(), []) == []


# --- status ----------------------------------------------------------------------------------


def record(**changes: Any) -> Credential:
    values: dict[str, Any] = {
        "credential_id": uuid.uuid4(),
        "kind": CredentialKind.COURSE,
        "learner": LEARNER,
        "issuer_id": uuid.uuid4(),
        "achievement_id": uuid.uuid4(),
        "achievement_name": "Data Analysis Foundations",
        "document": "{}",
        "document_sha256": "0" * 64,
        "issued_at": T0,
        "valid_until": None,
        "revocation_list_id": uuid.uuid4(),
        "revocation_index": 7,
        "enrollment_id": uuid.uuid4(),
        "course_id": uuid.uuid4(),
        "course_version": 3,
    }
    return Credential(**{**values, **changes})


LATER = T0 + timedelta(days=1)
STAFF = "staff:staff-1"


def test_revoking_is_final_and_announced_with_its_reason() -> None:
    revoked, event = domain.revoke(record(), "  recorded in error ", LATER, STAFF)

    assert (revoked.revoked_at, revoked.revocation_reason) == (LATER, "recorded in error")
    assert revoked.status(LATER) is DisplayStatus.REVOKED
    assert isinstance(event, CredentialRevoked)
    assert (event.status_purpose, event.reason, event.revoked_at) == (
        StatusPurpose.REVOCATION,
        "recorded in error",
        LATER,
    )
    with pytest.raises(StatusChangeRefused, match="already revoked"):
        domain.revoke(revoked, "again", LATER, STAFF)
    with pytest.raises(StatusChangeRefused, match="revocation is final"):
        domain.suspend(revoked, "why not", LATER, STAFF)
    with pytest.raises(StatusChangeRefused, match="revocation is final"):
        domain.reinstate(revoked, LATER, STAFF)


def test_suspension_is_lifted_by_reinstatement_and_superseded_by_revocation() -> None:
    suspended, event = domain.suspend(record(), "under review", LATER, STAFF)
    assert suspended.status(LATER) is DisplayStatus.SUSPENDED
    assert event.status_purpose is StatusPurpose.SUSPENSION
    with pytest.raises(StatusChangeRefused, match="already suspended"):
        domain.suspend(suspended, "twice", LATER, STAFF)

    reinstated, lifted = domain.reinstate(suspended, LATER, STAFF)
    assert reinstated.status(LATER) is DisplayStatus.VALID
    assert (reinstated.suspended_at, reinstated.suspension_reason) == (None, None)
    assert (lifted.credential_id, lifted.reinstated_at) == (suspended.credential_id, LATER)
    with pytest.raises(StatusChangeRefused, match="not suspended"):
        domain.reinstate(reinstated, LATER, STAFF)

    revoked, _ = domain.revoke(suspended, "fraud confirmed", LATER, STAFF)
    assert (revoked.suspended_at, revoked.status(LATER)) == (None, DisplayStatus.REVOKED)


def test_a_status_change_needs_a_reason() -> None:
    with pytest.raises(StatusChangeRefused, match="reason"):
        domain.revoke(record(), "   ", LATER, STAFF)


def test_expiry_shows_after_valid_until_but_revocation_and_suspension_come_first() -> None:
    expiring = record(valid_until=LATER)
    assert expiring.status(LATER - timedelta(seconds=1)) is DisplayStatus.VALID
    assert expiring.status(LATER) is DisplayStatus.EXPIRED
    assert not expiring.counts_towards_pathways(LATER)
    assert domain.suspend(expiring, "x", T0, STAFF)[0].status(LATER) is DisplayStatus.SUSPENDED
    assert domain.revoke(expiring, "x", T0, STAFF)[0].status(LATER) is DisplayStatus.REVOKED


def test_the_issued_event_describes_a_course_or_a_pathway_credential() -> None:
    course_credential = record()
    event = domain.issued_event(course_credential, f"{BASE}/credentials/{course_credential.credential_id}")
    assert (event.kind, event.enrollment_id, event.course_id, event.pathway_id) == (
        CredentialKind.COURSE,
        course_credential.enrollment_id,
        course_credential.course_id,
        None,
    )
    pathway_credential = record(
        kind=CredentialKind.PATHWAY, enrollment_id=None, course_id=None, course_version=None,
        pathway_id=uuid.uuid4(), pathway_version=1,
    )  # fmt: skip
    event = domain.issued_event(pathway_credential, f"{BASE}/credentials/{pathway_credential.credential_id}")
    assert (event.kind, event.pathway_id) == (CredentialKind.PATHWAY, pathway_credential.pathway_id)
