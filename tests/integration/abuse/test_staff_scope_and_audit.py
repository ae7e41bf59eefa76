"""Staff act for their own institution only, nobody completes their own enrollment, and every
change of an enrollment or a credential is on record with who made it (issue 13, items 4 and 5).

Two institutions issue courses here: the example one (`A`, the one `platform.staff()` acts for) and
`B`. Staff roles are scoped by the token's `issuers` claim; admins act for every issuer.
"""

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx
import pytest

from .conftest import COURSE, PROBLEM_JSON, Platform, wait_for

ISSUER_A = COURSE["issuer"]["issuer_id"]
ISSUER_B = str(uuid.uuid4())
ISSUER_SCOPE = "urn:microcred:problem:issuer-scope"
PROFILE_B = {**COURSE["issuer"], "issuer_id": ISSUER_B, "name": "Elsewhere College"}


def staff_of_a(platform: Platform) -> dict[str, str]:
    return platform.bearer("sam-a", "staff", email="sam-a@example.org", issuers=[ISSUER_A])


def staff_of_b(platform: Platform) -> dict[str, str]:
    return platform.bearer("sam-b", "staff", email="sam-b@example.org", issuers=[ISSUER_B])


@dataclass(frozen=True)
class InstitutionB:
    """A course of institution B, an active enrollment in it and one waiting for payment."""

    free_course_id: str
    paid_course_id: str
    active_enrollment_id: str
    pending_enrollment_id: str
    payment_id: str


@pytest.fixture(scope="module")
async def institution_b(platform: Platform) -> InstitutionB:
    free = await _course_of_b(platform, "Soldering for Beginners", 0)
    paid = await _course_of_b(platform, "Advanced Soldering", 4900)
    active = await platform.enroll("carol", free)
    pending = await platform.enroll("carol", paid)

    async def payment() -> Any:
        found = (await platform.billing.get("/payments", headers=platform.learner("carol"))).json()["items"]
        return found[0] if found else None

    due = await wait_for(payment)
    assert due is not None, "billing never made Carol's payment due"
    return InstitutionB(free, paid, active["enrollment_id"], pending["enrollment_id"], due["payment_id"])


async def _course_of_b(platform: Platform, title: str, amount_minor: int) -> str:
    body = {
        **COURSE,
        "title": title,
        "price": {"amount_minor": amount_minor, "currency": "EUR"},
        "issuer": PROFILE_B,
    }
    created = await platform.catalog.post("/courses", json=body, headers=staff_of_b(platform))
    assert created.status_code == 201, created.text
    course_id: str = created.json()["course_id"]
    published = await platform.catalog.post(f"/courses/{course_id}/publish", headers=staff_of_b(platform))
    assert published.status_code == 200, published.text
    return course_id


def assert_problem(response: httpx.Response, status: int, kind: str) -> None:
    assert response.status_code == status, response.text[:500]
    assert response.headers["content-type"] == PROBLEM_JSON
    assert response.json()["type"] == kind, response.json()


async def credential_of(platform: Platform, enrollment_id: str) -> dict[str, Any]:
    """The credential issuance minted for a completed enrollment (as an admin lists them)."""

    async def minted() -> dict[str, Any] | None:
        listed = await platform.issuance.get("/credentials?limit=100", headers=platform.admin())
        found = [item for item in listed.json()["items"] if item.get("enrollment_id") == enrollment_id]
        return found[0] if found else None

    credential: dict[str, Any] | None = await wait_for(minted)
    assert credential is not None, f"issuance never minted the credential of {enrollment_id}"
    return credential


async def enroll_as(platform: Platform, headers: dict[str, str], course_id: str) -> dict[str, Any]:
    """Enroll the token's subject once enrollment has heard of the course; the enrollment."""

    async def attempt() -> httpx.Response | None:
        response = await platform.enrollment.post(
            "/enrollments",
            json={"course_id": course_id},
            headers={**headers, "Idempotency-Key": str(uuid.uuid4())},
        )
        return None if response.status_code == 422 else response

    response: httpx.Response | None = await wait_for(attempt)
    assert response is not None, "enrollment never learned of the course"
    assert response.status_code == 201, response.text
    enrolled: dict[str, Any] = response.json()
    return enrolled


# --- item 4: staff are scoped to issuers ----------------------------------------------------


async def test_staff_of_one_issuer_cannot_act_for_another(
    platform: Platform, institution_b: InstitutionB
) -> None:
    a, b = staff_of_a(platform), staff_of_b(platform)
    course = f"/courses/{await _course_of_b(platform, 'Microsoldering', 0)}"
    enrollment = f"/enrollments/{institution_b.active_enrollment_id}"

    # Catalog: A's staff neither change B's course nor create one under B's name.
    changed = {**COURSE, "title": "Taken over", "issuer": PROFILE_B}
    assert_problem(await platform.catalog.put(course, json=changed, headers=a), 403, ISSUER_SCOPE)
    assert_problem(await platform.catalog.post(f"{course}/retire", headers=a), 403, ISSUER_SCOPE)
    assert_problem(await platform.catalog.post("/courses", json=changed, headers=a), 403, ISSUER_SCOPE)
    # Enrollment: no completion (which would mint B's credential) and no cancellation.
    completion = await platform.enrollment.post(f"{enrollment}/completion", json={"score": 100}, headers=a)
    assert_problem(completion, 403, ISSUER_SCOPE)
    cancellation = await platform.enrollment.post(
        f"/enrollments/{institution_b.pending_enrollment_id}/cancellation", headers=a
    )
    assert_problem(cancellation, 403, ISSUER_SCOPE)
    # Billing: the scope is checked before anything else (B's own staff get the state's 409).
    refunds = f"/payments/{institution_b.payment_id}/refunds"
    assert_problem(await platform.billing.post(refunds, headers=a), 403, ISSUER_SCOPE)
    assert_problem(
        await platform.billing.post(refunds, headers=b), 409, "urn:microcred:problem:payment-not-settled"
    )
    # Nothing of that took effect.
    assert (await platform.catalog.get(course, headers=b)).json()["status"] == "published"
    assert (await platform.enrollment.get(enrollment, headers=b)).json()["status"] == "active"
    pending = await platform.enrollment.get(f"/enrollments/{institution_b.pending_enrollment_id}", headers=b)
    assert pending.json()["status"] == "pending_payment"

    # B's staff complete it; A's staff cannot revoke, suspend or reinstate the credential it earns.
    completed = await platform.enrollment.post(f"{enrollment}/completion", json={"score": 90}, headers=b)
    assert completed.status_code == 201, completed.text
    credential = (
        f"/credentials/{(await credential_of(platform, institution_b.active_enrollment_id))['credential_id']}"
    )
    reason = {"reason": "another institution says so"}
    assert_problem(
        await platform.issuance.post(f"{credential}/revocation", json=reason, headers=a), 403, ISSUER_SCOPE
    )
    assert_problem(
        await platform.issuance.post(f"{credential}/suspension", json=reason, headers=a), 403, ISSUER_SCOPE
    )
    suspended = await platform.issuance.post(f"{credential}/suspension", json=reason, headers=b)
    assert suspended.status_code == 200, suspended.text
    assert_problem(await platform.issuance.delete(f"{credential}/suspension", headers=a), 403, ISSUER_SCOPE)
    assert (await credential_of(platform, institution_b.active_enrollment_id))["status"] == "suspended"
    reinstated = await platform.issuance.delete(f"{credential}/suspension", headers=platform.admin())
    assert reinstated.status_code == 200, "an admin acts for every issuer"


async def test_a_staff_token_without_an_issuer_scope_acts_for_no_issuer(platform: Platform) -> None:
    unscoped = platform.bearer("sam-nowhere", "staff", issuers=[])
    created = await platform.catalog.post("/courses", json={**COURSE, "title": "Nobody's"}, headers=unscoped)
    assert_problem(created, 403, ISSUER_SCOPE)
    malformed = platform.bearer("sam-nowhere", "staff", issuers=ISSUER_A)
    assert (await platform.catalog.post("/courses", json=COURSE, headers=malformed)).status_code == 401


async def test_nobody_completes_their_own_enrollment(platform: Platform) -> None:
    course_id = await platform.published_course("Ethics for Assessors", 0)
    for subject, role in (("sam-self", "staff"), ("ada-admin", "admin")):
        # One person, who learns and grades: the same subject with both roles.
        both = platform.bearer(subject, "learner", role, email=f"{subject}@example.org", issuers=[ISSUER_A])
        enrolled = await enroll_as(platform, both, course_id)
        own = f"/enrollments/{enrolled['enrollment_id']}"

        completion = await platform.enrollment.post(f"{own}/completion", json={"score": 100}, headers=both)

        assert_problem(completion, 403, "urn:microcred:problem:own-enrollment")
        assert (await platform.enrollment.get(own, headers=both)).json()["status"] == "active"


# --- item 5: the audit trail ----------------------------------------------------------------


async def test_the_enrollment_audit_shows_who_did_what_in_order(
    platform: Platform, institution_b: InstitutionB
) -> None:
    completed_course = await platform.enroll("dave", institution_b.free_course_id)
    cancelled_course = await platform.enroll("dave", institution_b.paid_course_id)
    learner = f"learner:{completed_course['learner']['learner_id']}"
    done = f"/enrollments/{completed_course['enrollment_id']}"
    dropped = f"/enrollments/{cancelled_course['enrollment_id']}"
    assert (
        await platform.enrollment.post(f"{done}/completion", headers=staff_of_b(platform))
    ).status_code == 201
    cancelled = await platform.enrollment.post(
        f"{dropped}/cancellation", json={"detail": "Duplicate booking."}, headers=platform.admin()
    )
    assert cancelled.status_code == 200, cancelled.text

    trail = await platform.enrollment.get(f"{done}/audit", headers=staff_of_b(platform))
    assert trail.status_code == 200, trail.text
    assert [(e["change"], e["actor"], e["source"]) for e in trail.json()] == [
        ("created", learner, "enrollment"),
        ("activated", learner, "enrollment"),
        ("completed", "staff:sam-b", "enrollment"),
    ]
    times = [datetime.fromisoformat(entry["at"]) for entry in trail.json()]
    assert times == sorted(times)
    dropped_trail = (await platform.enrollment.get(f"{dropped}/audit", headers=platform.admin())).json()
    assert [(e["change"], e["actor"]) for e in dropped_trail] == [
        ("created", learner),
        ("cancelled", "admin:admin-1"),
    ]


async def test_the_credential_audit_shows_who_did_what_in_order(
    platform: Platform, institution_b: InstitutionB
) -> None:
    enrolled = await platform.enroll("erin", institution_b.free_course_id)
    completed = await platform.enrollment.post(
        f"/enrollments/{enrolled['enrollment_id']}/completion", headers=staff_of_b(platform)
    )
    assert completed.status_code == 201, completed.text
    credential = f"/credentials/{(await credential_of(platform, enrolled['enrollment_id']))['credential_id']}"
    b, admin = staff_of_b(platform), platform.admin()
    for method, path, headers in (
        ("POST", "suspension", b),
        ("DELETE", "suspension", admin),
        ("POST", "suspension", admin),
        ("POST", "revocation", b),
    ):
        body = {"reason": "checking"} if method == "POST" else None
        changed = await platform.issuance.request(method, f"{credential}/{path}", json=body, headers=headers)
        assert changed.status_code == 200, changed.text

    trail = await platform.issuance.get(f"{credential}/audit", headers=b)

    assert trail.status_code == 200, trail.text
    assert [(e["change"], e["actor"]) for e in trail.json()] == [
        ("issued", "issuance"),
        ("suspended", "staff:sam-b"),
        ("reinstated", "admin:admin-1"),
        ("suspended", "admin:admin-1"),
        ("revoked", "staff:sam-b"),
    ]
    times = [datetime.fromisoformat(entry["at"]) for entry in trail.json()]
    assert times == sorted(times)


async def test_a_learner_or_staff_of_another_issuer_cannot_read_an_audit(
    platform: Platform, institution_b: InstitutionB
) -> None:
    enrolled = await platform.enroll("frank", institution_b.free_course_id)
    enrollment = f"/enrollments/{enrolled['enrollment_id']}"
    assert (
        await platform.enrollment.post(f"{enrollment}/completion", headers=staff_of_b(platform))
    ).status_code == 201
    credential = f"/credentials/{(await credential_of(platform, enrolled['enrollment_id']))['credential_id']}"
    enrollment, credential = f"{enrollment}/audit", f"{credential}/audit"
    forbidden = "urn:microcred:problem:forbidden"
    # Frank's own enrollment and credential: their audit is for staff, not for him.
    assert_problem(
        await platform.enrollment.get(enrollment, headers=platform.learner("frank")), 403, forbidden
    )
    assert_problem(await platform.issuance.get(credential, headers=platform.learner("frank")), 403, forbidden)
    assert_problem(await platform.enrollment.get(enrollment, headers=staff_of_a(platform)), 403, ISSUER_SCOPE)
    assert_problem(await platform.issuance.get(credential, headers=staff_of_a(platform)), 403, ISSUER_SCOPE)
