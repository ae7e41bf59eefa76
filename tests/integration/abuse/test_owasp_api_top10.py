"""OWASP API Security Top 10 (2023), one attack per test, against the five services running together.

- API1 broken object-level authorization: Alice, a learner, goes after Bob's enrollment, payment,
  credentials and inbox. Each is answered exactly as something that does not exist (404), and
  nothing of Bob's changes.
- API2 broken authentication: forged, stale and misdirected tokens on a protected route of every
  service: 401 problem+json with `WWW-Authenticate: Bearer`.
- API4 unrestricted resource consumption: 10 MB bodies, huge pages, an oversized partner batch,
  raw bodies over their limits, deeply nested JSON: refused with a 4xx problem, never a 5xx,
  never accepted.
- API5 broken function-level authorization: a learner on every staff and admin operation, staff
  on every admin one: 403, and nothing changes.
- API7 server-side request forgery: credentials sent to POST /verify naming URLs on a server of
  ours on a loopback port (contexts, did:web issuers, key ids, status lists): it is never called;
  webhook subscriptions to internal or malformed URLs are refused.
"""

import asyncio
import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import base58
import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import FastAPI, Request, Response
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

import billing.main
import catalog.main
import enrollment.main
import issuance.main
import notifications.main
from issuance import keys, proofs, status_list
from microcred_runtime import Service

from ..conftest import EXAMPLE_ISSUER_ID
from .conftest import COURSE, PROBLEM_JSON, SERVICES, Platform, on_loopback, wait_for

UNAUTHORIZED = "urn:microcred:problem:unauthorized"
FORBIDDEN = "urn:microcred:problem:forbidden"
TEN_MB = 10 * 1024 * 1024


# --- the victim and the targets --------------------------------------------------------------


@dataclass(frozen=True)
class Victim:
    """Bob's things, which Alice goes after; Alice has things of her own too."""

    learner_id: str
    enrollment_id: str  # paid, waiting for payment
    payment_id: str
    completed_enrollment_id: str
    credential_id: str
    notification_id: str
    paid_course_id: str
    free_course_id: str


@dataclass(frozen=True)
class Targets:
    """Real objects for the staff and admin operations, so a missing check would show."""

    course_id: str
    pathway_id: str
    partner_id: str
    partner_secret: str
    partner_credential_id: str
    subscription_id: str


def alice(platform: Platform) -> dict[str, str]:
    return platform.learner("alice")


def bob(platform: Platform) -> dict[str, str]:
    return platform.learner("bob")


async def _first(platform: Platform, client: httpx.AsyncClient, path: str, headers: dict[str, str]) -> Any:
    async def found() -> Any:
        response = await client.get(path, headers=headers)
        items = response.json()["items"] if response.status_code == 200 else []
        return items[0] if items else None

    return await wait_for(found)


@pytest.fixture(scope="module")
async def victim(platform: Platform) -> Victim:
    paid = await platform.published_course("Negotiation for Engineers", 4900)
    free = await platform.published_course("Introduction to Data Privacy", 0)
    pending = await platform.enroll("bob", paid)
    active = await platform.enroll("bob", free)
    await platform.enroll("alice", paid)
    completed = await platform.enrollment.post(
        f"/enrollments/{active['enrollment_id']}/completion", json={"score": 90}, headers=platform.staff()
    )
    assert completed.status_code == 201, completed.text
    learner_id = pending["learner"]["learner_id"]

    payment = await _first(platform, platform.billing, "/payments", bob(platform))
    assert payment is not None, "billing never made Bob's payment due"
    credential = await _first(
        platform, platform.issuance, f"/credentials?learner_id={learner_id}", platform.staff()
    )
    assert credential is not None, "issuance never minted Bob's credential"
    notification = await _first(platform, platform.notifications, "/me/notifications", bob(platform))
    assert notification is not None, "Bob has nothing in his inbox"
    assert await _first(platform, platform.notifications, "/me/notifications", alice(platform)) is not None
    return Victim(
        learner_id=learner_id,
        enrollment_id=pending["enrollment_id"],
        payment_id=payment["payment_id"],
        completed_enrollment_id=active["enrollment_id"],
        credential_id=credential["credential_id"],
        notification_id=notification["notification_id"],
        paid_course_id=paid,
        free_course_id=free,
    )


@pytest.fixture(scope="module")
async def targets(platform: Platform, victim: Victim) -> Targets:
    pathway = await platform.catalog.post(
        "/pathways",
        json={
            "title": "Privacy and Negotiation",
            "description": "Two courses.",
            "course_ids": [victim.paid_course_id, victim.free_course_id],
            "issuer": COURSE["issuer"],
            "achievement": COURSE["achievement"],
        },
        headers=platform.staff(),
    )
    assert pathway.status_code == 201, pathway.text
    partner = await platform.enrollment.post(
        "/partners", json={"display_name": "Northwind University"}, headers=platform.admin()
    )
    assert partner.status_code == 201, partner.text
    subscription = await platform.notifications.post(
        "/webhooks/subscriptions",
        json={
            "url": "https://hooks.employer.example/microcred",
            "scope": {"kind": "issuer", "id": EXAMPLE_ISSUER_ID},
        },
        headers=platform.staff(),
    )
    assert subscription.status_code == 201, subscription.text
    return Targets(
        course_id=victim.paid_course_id,
        pathway_id=pathway.json()["pathway_id"],
        partner_id=partner.json()["partner_id"],
        partner_secret=partner.json()["secrets"][0]["secret"],
        partner_credential_id=partner.json()["credentials"][0]["credential_id"],
        subscription_id=subscription.json()["subscription_id"],
    )


def assert_problem(response: httpx.Response, status: int, kind: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text[:500]
    assert response.headers["content-type"] == PROBLEM_JSON
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    if kind is not None:
        assert body["type"] == kind, body
    return body


def assert_same_as_missing(
    theirs: httpx.Response, their_id: str, missing: httpx.Response, missing_id: str
) -> None:
    """Someone else's object is answered exactly like one that does not exist."""

    def shape(response: httpx.Response, object_id: str) -> tuple[Any, ...]:
        body = assert_problem(response, 404)
        return body["type"], body["title"], body["detail"].replace(object_id, "<id>")

    assert shape(theirs, their_id) == shape(missing, missing_id)


# --- API1: broken object-level authorization -------------------------------------------------


async def test_api1_a_learner_cannot_read_or_cancel_another_learners_enrollment(
    platform: Platform, victim: Victim
) -> None:
    other, missing = victim.enrollment_id, str(uuid.uuid4())

    peek = await platform.enrollment.get(f"/enrollments/{other}", headers=alice(platform))
    cancel = await platform.enrollment.post(f"/enrollments/{other}/cancellation", headers=alice(platform))
    mine = await platform.enrollment.get("/enrollments", headers=alice(platform))

    assert_same_as_missing(
        peek,
        other,
        await platform.enrollment.get(f"/enrollments/{missing}", headers=alice(platform)),
        missing,
    )
    assert_same_as_missing(
        cancel,
        other,
        await platform.enrollment.post(f"/enrollments/{missing}/cancellation", headers=alice(platform)),
        missing,
    )
    assert mine.status_code == 200
    assert mine.json()["items"], "Alice has an enrollment of her own"
    assert other not in {item["enrollment_id"] for item in mine.json()["items"]}
    own = await platform.enrollment.get(f"/enrollments/{other}", headers=bob(platform))
    assert own.json()["status"] == "pending_payment", "Alice's attempt changed Bob's enrollment"


async def test_api1_a_subject_that_spells_another_learners_id_is_not_that_learner(
    platform: Platform, victim: Victim
) -> None:
    # Bob's id is derived from his subject; a token whose subject is that id (an account at the
    # issuer named so) must not be taken for Bob.
    mallory = platform.bearer(victim.learner_id, "learner", email="mallory@example.org")
    missing = str(uuid.uuid4())

    assert_same_as_missing(
        await platform.enrollment.get(f"/enrollments/{victim.enrollment_id}", headers=mallory),
        victim.enrollment_id,
        await platform.enrollment.get(f"/enrollments/{missing}", headers=mallory),
        missing,
    )
    assert (await platform.enrollment.get("/enrollments", headers=mallory)).json()["items"] == []
    assert (await platform.billing.get("/payments", headers=mallory)).json()["items"] == []
    assert (await platform.issuance.get("/me/credentials", headers=mallory)).json()["items"] == []


async def test_api1_a_learner_cannot_see_or_check_out_another_learners_payment(
    platform: Platform, victim: Victim
) -> None:
    other, missing = victim.payment_id, str(uuid.uuid4())

    peek = await platform.billing.get(f"/payments/{other}", headers=alice(platform))
    checkout = await platform.billing.post(f"/payments/{other}/checkout", headers=alice(platform))
    mine = await platform.billing.get("/payments", headers=alice(platform))

    assert_same_as_missing(
        peek, other, await platform.billing.get(f"/payments/{missing}", headers=alice(platform)), missing
    )
    assert_same_as_missing(
        checkout,
        other,
        await platform.billing.post(f"/payments/{missing}/checkout", headers=alice(platform)),
        missing,
    )
    assert mine.json()["items"], "Alice has a payment of her own"
    assert other not in {item["payment_id"] for item in mine.json()["items"]}
    own = (await platform.billing.get(f"/payments/{other}", headers=bob(platform))).json()
    assert (own["status"], own["checkout_url"]) == ("due", None), "Alice's attempt started Bob's checkout"


async def test_api1_a_learner_lists_only_their_own_credentials_and_cannot_list_anyone_elses(
    platform: Platform, victim: Victim
) -> None:
    mine = await platform.issuance.get("/me/credentials", headers=alice(platform))
    by_learner = await platform.issuance.get(
        f"/credentials?learner_id={victim.learner_id}", headers=alice(platform)
    )
    everyone = await platform.issuance.get("/credentials", headers=alice(platform))
    staff_view = await platform.issuance.get(
        f"/credentials?learner_id={victim.learner_id}", headers=platform.staff()
    )
    bobs_own = await platform.issuance.get("/me/credentials", headers=bob(platform))

    assert mine.status_code == 200
    assert victim.credential_id not in {item["credential_id"] for item in mine.json()["items"]}
    assert_problem(by_learner, 403, FORBIDDEN)
    assert_problem(everyone, 403, FORBIDDEN)
    assert [item["credential_id"] for item in staff_view.json()["items"]] == [victim.credential_id]
    assert [item["credential_id"] for item in bobs_own.json()["items"]] == [victim.credential_id]


async def test_api1_a_learner_cannot_mark_another_learners_notification_read(
    platform: Platform, victim: Victim
) -> None:
    other, missing = victim.notification_id, str(uuid.uuid4())

    marked = await platform.notifications.post(f"/me/notifications/{other}/read", headers=alice(platform))
    everything = await platform.notifications.post("/me/notifications/read-all", headers=alice(platform))
    mine = await platform.notifications.get("/me/notifications", headers=alice(platform))

    assert_same_as_missing(
        marked,
        other,
        await platform.notifications.post(f"/me/notifications/{missing}/read", headers=alice(platform)),
        missing,
    )
    assert everything.status_code == 200
    assert other not in {item["notification_id"] for item in mine.json()["items"]}
    unread = await platform.notifications.get("/me/notifications?unread=true", headers=bob(platform))
    assert other in {item["notification_id"] for item in unread.json()["items"]}, "Bob's is still unread"


# --- API2: broken authentication -------------------------------------------------------------

ISSUER = "https://issuer.test"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _segment(value: dict[str, Any]) -> str:
    return _b64(json.dumps(value).encode())


def _claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    return {
        "iss": ISSUER,
        "aud": "microcred",
        "sub": "mallory",
        "roles": ["admin"],
        "exp": now + 600,
        **changes,
    }


def _unsigned(issuer: Any, alg: str = "none") -> str:
    return f"{_segment({'alg': alg, 'typ': 'JWT'})}.{_segment(_claims())}."


def _hs256_with_the_public_key(issuer: Any) -> str:
    # Algorithm confusion: an HMAC keyed with the issuer's public key, which anyone can fetch.
    private = serialization.load_pem_private_key(
        (Path(issuer.key_dir) / "signing-key.pem").read_bytes(), None
    )
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    signing_input = f"{_segment({'alg': 'HS256', 'typ': 'JWT', 'kid': issuer.key_id})}.{_segment(_claims())}"
    signature = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


def _signed_by_another_key(issuer: Any) -> str:
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return jwt.encode(_claims(), stranger, algorithm="RS256", headers={"kid": issuer.key_id})


def _typed(issuer: Any, typ: str) -> str:
    """Signed by the issuer itself, but of another JWT type than an access token (an ID token)."""
    private = serialization.load_pem_private_key(
        (Path(issuer.key_dir) / "signing-key.pem").read_bytes(), None
    )
    headers = {"kid": issuer.key_id, "typ": typ}
    return jwt.encode(_claims(), private, algorithm="RS256", headers=headers)  # type: ignore[arg-type]


def _signature_stripped(issuer: Any) -> str:
    header, payload, _ = issuer.token("mallory", ["admin"]).split(".")
    return f"{header}.{payload}."


def _signature_of_another_token(issuer: Any) -> str:
    header, payload, _ = issuer.token("mallory", ["admin"]).split(".")
    signature = issuer.token("mallory", ["learner"]).split(".")[2]
    return f"{header}.{payload}.{signature}"


ATTACKS: dict[str, Callable[[Any], str | None]] = {
    "no token": lambda issuer: None,
    "not a JWT": lambda issuer: "Bearer garbage.garbage",
    "alg none": lambda issuer: _unsigned(issuer),
    "alg None": lambda issuer: _unsigned(issuer, "None"),
    "HS256 signed with the issuer's public key": _hs256_with_the_public_key,
    "RS256 signed by another key with the issuer's kid": _signed_by_another_key,
    "signature stripped": _signature_stripped,
    "signature of another token": _signature_of_another_token,
    "expired": lambda issuer: issuer.token("mallory", ["admin"], ttl=-120),
    "not valid yet": lambda issuer: issuer.token("mallory", ["admin"], nbf=int(time.time()) + 3600),
    "wrong audience": lambda issuer: issuer.token("mallory", ["admin"], aud="another-api"),
    "wrong issuer": lambda issuer: issuer.token("mallory", ["admin"], iss="https://evil.test"),
    "an ID token of the issuer (typ JWT)": lambda issuer: _typed(issuer, "JWT"),
    "roles an object": lambda issuer: issuer.token("mallory", {"admin": True}),
    "roles a number": lambda issuer: issuer.token("mallory", 7),
    "Basic credentials": lambda issuer: "Basic " + base64.b64encode(b"admin:admin").decode(),
}
# A protected route of each service, staff-only where the service has one: the forged tokens claim admin.
PROTECTED: dict[str, tuple[str, str, Any]] = {
    "catalog": ("POST", "/courses", {**COURSE, "title": "Forged course"}),
    "enrollment": ("GET", "/partners", None),
    "billing": ("GET", "/payments", None),
    "issuance": ("GET", "/credentials", None),
    "notifications": ("GET", "/webhooks/subscriptions", None),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
@pytest.mark.parametrize("service", SERVICES)
async def test_api2_forged_stale_or_misdirected_tokens_are_refused(
    platform: Platform, service: str, attack: str
) -> None:
    method, path, body = PROTECTED[service]
    token = ATTACKS[attack](platform.issuer)
    headers = {} if token is None else {"Authorization": token if " " in token else f"Bearer {token}"}

    response = await platform.clients[service].request(method, path, json=body, headers=headers)

    assert_problem(response, 401, UNAUTHORIZED)
    assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("service", SERVICES)
async def test_api2_a_valid_token_that_grants_no_microcred_role_is_forbidden(
    platform: Platform, service: str
) -> None:
    method, path, body = PROTECTED[service]

    response = await platform.clients[service].request(
        method, path, json=body, headers=platform.bearer("mallory", "superuser", "root")
    )

    assert_problem(response, 403, FORBIDDEN)


async def test_api2_a_public_route_refuses_a_token_that_is_sent_but_forged(platform: Platform) -> None:
    response = await platform.catalog.get(
        "/courses?status=draft", headers={"Authorization": f"Bearer {_unsigned(platform.issuer)}"}
    )

    assert_problem(response, 401, UNAUTHORIZED)


# --- API5: broken function-level authorization -----------------------------------------------


@dataclass(frozen=True)
class Operation:
    service: str
    method: str
    path: str  # the OpenAPI template
    body: Any = None
    admin_only: bool = False
    query: str = ""
    partner_credential: bool = False  # its {credential_id} is a partner's credential

    def url(self, ids: dict[str, str]) -> str:
        if self.partner_credential:
            ids = {**ids, "credential_id": ids["partner_credential_id"]}
        return self.path.format(**ids) + self.query


STAFF_OPERATIONS = [
    Operation("catalog", "GET", "/courses", query="?status=draft"),
    Operation("catalog", "POST", "/courses", {**COURSE, "title": "Learner-made course"}),
    Operation("catalog", "PUT", "/courses/{course_id}", {**COURSE, "title": "Renamed by a learner"}),
    Operation("catalog", "POST", "/courses/{course_id}/publish"),
    Operation("catalog", "POST", "/courses/{course_id}/retire", {"reason": "a learner said so"}),
    Operation("catalog", "GET", "/pathways", query="?status=draft"),
    Operation(
        "catalog",
        "POST",
        "/pathways",
        {
            "title": "x",
            "description": "x",
            "course_ids": [],
            "issuer": COURSE["issuer"],
            "achievement": COURSE["achievement"],
        },
    ),
    Operation("catalog", "POST", "/pathways/{pathway_id}/publish"),
    Operation("enrollment", "POST", "/enrollments/{enrollment_id}/completion", {"score": 100}),
    Operation("enrollment", "GET", "/enrollments/{enrollment_id}/audit"),
    Operation("enrollment", "GET", "/partners"),
    Operation("enrollment", "GET", "/partners/{partner_id}"),
    Operation("enrollment", "POST", "/partners", {"display_name": "Learner University"}, admin_only=True),
    Operation(
        "enrollment", "PATCH", "/partners/{partner_id}", {"display_name": "Taken over"}, admin_only=True
    ),
    Operation("enrollment", "POST", "/partners/{partner_id}/suspension", {"reason": "x"}, admin_only=True),
    Operation("enrollment", "POST", "/partners/{partner_id}/reactivation", admin_only=True),
    Operation(
        "enrollment", "POST", "/partners/{partner_id}/credentials", {"kind": "hmac_sha256"}, admin_only=True
    ),
    Operation(
        "enrollment",
        "DELETE",
        "/partners/{partner_id}/credentials/{credential_id}",
        admin_only=True,
        partner_credential=True,
    ),
    Operation("billing", "POST", "/payments/{payment_id}/refunds", {"reason": "a learner said so"}),
    Operation("billing", "POST", "/payments/{payment_id}/refunds/{refund_id}/retry"),
    Operation("billing", "GET", "/reconciliation/discrepancies"),
    Operation(
        "billing",
        "POST",
        "/reconciliation/discrepancies/{kind}/{subject}/resolution",
        {"note": "a learner said so"},
    ),
    Operation("issuance", "GET", "/credentials"),
    Operation("issuance", "POST", "/credentials/{credential_id}/revocation", {"reason": "a learner said so"}),
    Operation("issuance", "POST", "/credentials/{credential_id}/suspension", {"reason": "a learner said so"}),
    Operation("issuance", "DELETE", "/credentials/{credential_id}/suspension"),
    Operation("issuance", "GET", "/credentials/{credential_id}/audit"),
    Operation(
        "notifications",
        "POST",
        "/webhooks/subscriptions",
        {"url": "https://hooks.employer.example/x", "scope": {"kind": "issuer", "id": str(uuid.uuid4())}},
    ),
    Operation("notifications", "GET", "/webhooks/subscriptions"),
    Operation("notifications", "GET", "/webhooks/subscriptions/{subscription_id}"),
    Operation("notifications", "DELETE", "/webhooks/subscriptions/{subscription_id}"),
    Operation("notifications", "GET", "/webhooks/deliveries"),
    Operation("notifications", "GET", "/webhooks/deliveries/{delivery_id}"),
    Operation("notifications", "POST", "/webhooks/deliveries/{delivery_id}/replay"),
]


def _ids(victim: Victim, targets: Targets) -> dict[str, str]:
    return {
        "course_id": targets.course_id,
        "pathway_id": targets.pathway_id,
        "enrollment_id": victim.enrollment_id,
        "partner_id": targets.partner_id,
        "partner_credential_id": targets.partner_credential_id,
        "payment_id": victim.payment_id,
        "refund_id": str(uuid.uuid4()),  # the check precedes the lookup
        "kind": "paid_enrollment_cancelled",
        "subject": victim.payment_id,
        "credential_id": victim.credential_id,
        "subscription_id": targets.subscription_id,
        "delivery_id": str(uuid.uuid4()),  # deliveries come from events; the check precedes the lookup
    }


SERVICE_DEFINITIONS: dict[str, Service[Any]] = {
    "catalog": catalog.main.service,
    "enrollment": enrollment.main.service,
    "billing": billing.main.service,
    "issuance": issuance.main.service,
    "notifications": notifications.main.service,
}


def _role_checked(dependant: Dependant) -> bool:
    """Whether a route depends (at any depth) on `microcred_runtime.auth.require(...)`."""
    return any(
        getattr(dependency.call, "__qualname__", "") == "require.<locals>.check" or _role_checked(dependency)
        for dependency in dependant.dependencies
    )


def test_api5_every_role_checked_operation_is_attacked() -> None:
    checked = {
        (name, method, route.path)
        for name, service in SERVICE_DEFINITIONS.items()
        for router in service.routers
        for route in router.routes
        if isinstance(route, APIRoute) and _role_checked(route.dependant)
        for method in route.methods or ()
    }
    attacked = {(operation.service, operation.method, operation.path) for operation in STAFF_OPERATIONS}
    assert checked, "no route depends on a role check: the guard itself is broken"
    assert checked <= attacked, f"not attacked: {sorted(checked - attacked)}"


@pytest.mark.parametrize(
    "operation",
    STAFF_OPERATIONS,
    ids=[f"{op.service} {op.method} {op.path}{op.query}" for op in STAFF_OPERATIONS],
)
async def test_api5_a_learner_cannot_call_a_staff_or_admin_operation(
    platform: Platform, victim: Victim, targets: Targets, operation: Operation
) -> None:
    response = await platform.clients[operation.service].request(
        operation.method, operation.url(_ids(victim, targets)), json=operation.body, headers=alice(platform)
    )

    assert_problem(response, 403, FORBIDDEN)


@pytest.mark.parametrize(
    "operation",
    [op for op in STAFF_OPERATIONS if op.admin_only],
    ids=[f"{op.method} {op.path}" for op in STAFF_OPERATIONS if op.admin_only],
)
async def test_api5_staff_cannot_call_an_admin_operation(
    platform: Platform, victim: Victim, targets: Targets, operation: Operation
) -> None:
    response = await platform.clients[operation.service].request(
        operation.method, operation.url(_ids(victim, targets)), json=operation.body, headers=platform.staff()
    )

    assert_problem(response, 403, FORBIDDEN)


async def test_api5_nothing_the_refused_callers_tried_took_effect(
    platform: Platform, victim: Victim, targets: Targets
) -> None:
    # Runs after the attacks above (pytest keeps the file's order).
    staff = platform.staff()
    course = (await platform.catalog.get(f"/courses/{targets.course_id}", headers=staff)).json()
    pathway = (await platform.catalog.get(f"/pathways/{targets.pathway_id}", headers=staff)).json()
    partner = (await platform.enrollment.get(f"/partners/{targets.partner_id}", headers=staff)).json()
    enrollment = (await platform.enrollment.get(f"/enrollments/{victim.enrollment_id}", headers=staff)).json()
    payment = (await platform.billing.get(f"/payments/{victim.payment_id}", headers=staff)).json()
    credentials = (
        await platform.issuance.get(f"/credentials?learner_id={victim.learner_id}", headers=staff)
    ).json()
    subscription = (
        await platform.notifications.get(f"/webhooks/subscriptions/{targets.subscription_id}", headers=staff)
    ).json()
    partners = (await platform.enrollment.get("/partners", headers=staff)).json()
    courses = (
        await platform.catalog.get("/courses?status=draft&status=published&status=retired", headers=staff)
    ).json()

    assert (course["status"], course["title"]) == ("published", "Negotiation for Engineers")
    assert pathway["status"] == "draft"
    assert (partner["display_name"], partner["status"]) == ("Northwind University", "active")
    assert [credential["active"] for credential in partner["credentials"]] == [True]
    assert [item["display_name"] for item in partners["items"]] == ["Northwind University"]
    assert enrollment["status"] == "pending_payment"
    assert payment["status"] == "due"
    assert [item["status"] for item in credentials["items"]] == ["valid"]
    assert subscription["disabled_at"] is None
    assert "Learner-made course" not in {item["title"] for item in courses["items"]}


# --- API4: unrestricted resource consumption -------------------------------------------------


def _padding() -> str:
    return "x" * TEN_MB


def _oversized_requests(victim: Victim, targets: Targets) -> Iterator[tuple[str, str, str, str, bytes]]:
    """(who, service, method, path, body) for 10 MB bodies."""
    yield (
        "staff",
        "catalog",
        "POST",
        "/courses",
        json.dumps({**COURSE, "overview": _padding()}).encode(),
    )
    yield "staff", "catalog", "POST", "/courses", json.dumps({**COURSE, "extra": _padding()}).encode()
    yield (
        "staff",
        "catalog",
        "PUT",
        f"/courses/{victim.free_course_id}",
        json.dumps({**COURSE, "skills": ["x"] * (TEN_MB // 4)}).encode(),
    )
    yield (
        "alice",
        "enrollment",
        "POST",
        "/enrollments",
        json.dumps({"course_id": victim.free_course_id, "x": _padding()}).encode(),
    )
    yield (
        "none",
        "enrollment",
        "POST",
        f"/partners/{targets.partner_id}/completions",
        json.dumps([{"x": _padding()}]).encode(),
    )
    yield (
        "staff",
        "billing",
        "POST",
        f"/payments/{victim.payment_id}/refunds",
        json.dumps({"reason": _padding()}).encode(),
    )
    yield "none", "billing", "POST", "/webhooks/provider", json.dumps({"id": _padding()}).encode()
    yield "none", "issuance", "POST", "/verify", json.dumps({"@context": [], "x": _padding()}).encode()
    yield (
        "staff",
        "issuance",
        "POST",
        f"/credentials/{victim.credential_id}/suspension",
        json.dumps({"reason": _padding()}).encode(),
    )
    yield (
        "alice",
        "notifications",
        "PUT",
        "/me/preferences",
        json.dumps({"email": {"muted": ["x"] * (TEN_MB // 4)}}).encode(),
    )
    yield (
        "staff",
        "notifications",
        "POST",
        "/webhooks/subscriptions",
        json.dumps({"url": "https://hooks.employer.example/" + _padding()}).encode(),
    )


async def test_api4_a_10_mb_body_is_refused_on_every_write_operation_that_takes_one(
    platform: Platform, victim: Victim, targets: Targets
) -> None:
    callers = {"staff": platform.staff(), "alice": alice(platform), "none": {}}
    before = await _inventory(platform)
    for who, service, method, path, body in _oversized_requests(victim, targets):
        headers = {**callers[who], "content-type": "application/json", "Idempotency-Key": str(uuid.uuid4())}
        response = await platform.clients[service].request(method, path, content=body, headers=headers)
        where = f"{service} {method} {path}"
        assert response.status_code == 413, f"{where}: {response.status_code} {response.text[:300]}"
        assert response.headers["content-type"] == PROBLEM_JSON, where
        assert response.json()["type"] == "urn:microcred:problem:body-too-large", where
        assert len(response.content) < 16 * 1024, f"{where} echoes the body back"
    assert await _inventory(platform) == before, "a 10 MB request changed something"


async def _inventory(platform: Platform) -> dict[str, Any]:
    """What the 10 MB requests would have added to or changed, were one accepted."""
    staff = platform.staff()
    everything = "?status=draft&status=published&status=retired&limit=100"
    return {
        "courses": (await platform.catalog.get(f"/courses{everything}", headers=staff)).json()["items"],
        "alice": (await platform.enrollment.get("/enrollments", headers=alice(platform))).json()["items"],
        "payments": (await platform.billing.get("/payments?limit=100", headers=staff)).json()["items"],
        "credentials": (await platform.issuance.get("/credentials?limit=100", headers=staff)).json()["items"],
        "preferences": (await platform.notifications.get("/me/preferences", headers=alice(platform))).json(),
        "subscriptions": (await platform.notifications.get("/webhooks/subscriptions", headers=staff)).json(),
    }


# A JSON-body operation of each service that needs a bearer token.
AUTHENTICATED_JSON_OPERATIONS = {
    "catalog": ("POST", "/courses"),
    "enrollment": ("POST", "/enrollments"),
    "billing": ("POST", f"/payments/{uuid.uuid4()}/refunds"),
    "issuance": ("POST", f"/credentials/{uuid.uuid4()}/revocation"),
    "notifications": ("PUT", "/me/preferences"),
}


@pytest.mark.parametrize("service", SERVICES)
async def test_api4_an_anonymous_body_is_not_read_in_full(platform: Platform, service: str) -> None:
    method, path = AUTHENTICATED_JSON_OPERATIONS[service]
    read = 0

    async def ten_megabytes() -> AsyncIterator[bytes]:
        nonlocal read
        yield b'{"x": "'
        for _ in range(160):
            read += 64 * 1024
            yield b"x" * (64 * 1024)
        yield b'"}'

    response = await platform.clients[service].request(
        method, path, content=ten_megabytes(), headers={"content-type": "application/json"}
    )

    assert response.status_code in (401, 413), response.text
    assert read <= 1024 * 1024, f"{read} bytes of an anonymous request were read"


def _list_operations(platform: Platform) -> list[tuple[str, str]]:
    """Every GET operation of every service that pages with `limit`, from the services' own OpenAPI."""
    found = []
    for service, app in platform.apps.items():
        for path, operations in app.openapi()["paths"].items():
            parameters = operations.get("get", {}).get("parameters", [])
            if any(parameter["name"] == "limit" and parameter["in"] == "query" for parameter in parameters):
                found.append((service, path))
    return found


@pytest.mark.parametrize("limit", ["100000", "101", "0", "-1", "1e9", "99999999999999999999999"])
async def test_api4_a_huge_or_nonsensical_page_size_is_refused_on_every_list(
    platform: Platform, limit: str
) -> None:
    lists = _list_operations(platform)
    assert len(lists) >= 10, lists
    for service, path in lists:
        response = await platform.clients[service].get(
            path, params={"limit": limit}, headers=platform.admin()
        )
        assert_problem(response, 422, "urn:microcred:problem:invalid-request")


async def test_api4_a_huge_cursor_is_refused_on_every_list(platform: Platform) -> None:
    for service, path in _list_operations(platform):
        response = await platform.clients[service].get(
            path, params={"cursor": "A" * 10_000}, headers=platform.admin()
        )
        assert_problem(response, 422, "urn:microcred:problem:invalid-request")


def _standard_webhook(secret: str, body: bytes) -> dict[str, str]:
    webhook_id = f"msg_{uuid.uuid4().hex}"
    stamp = str(int(time.time()))
    digest = hmac.new(secret.encode(), f"{webhook_id}.{stamp}.".encode() + body, hashlib.sha256).digest()
    return {
        "content-type": "application/json",
        "webhook-id": webhook_id,
        "webhook-timestamp": stamp,
        "webhook-signature": "v1," + base64.b64encode(digest).decode(),
    }


async def test_api4_a_partner_batch_over_1000_reports_is_refused_even_when_signed(
    platform: Platform, victim: Victim, targets: Targets
) -> None:
    report = {
        "partner_id": targets.partner_id,
        "course_id": victim.free_course_id,
        "learner_id": victim.learner_id,
        "completed_at": datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
    }
    batch = json.dumps([{**report, "report_id": str(uuid.uuid4())} for _ in range(1001)]).encode()
    path = f"/partners/{targets.partner_id}/completions"

    signed = await platform.enrollment.post(
        path, content=batch, headers=_standard_webhook(targets.partner_secret, batch)
    )
    unsigned = await platform.enrollment.post(
        path, content=batch, headers={"content-type": "application/json"}
    )
    too_many_bytes = b"[" + b" " * (2 * 1024 * 1024) + b"]"
    too_large = await platform.enrollment.post(
        path, content=too_many_bytes, headers=_standard_webhook(targets.partner_secret, too_many_bytes)
    )

    assert_problem(signed, 413, "urn:microcred:problem:batch-too-large")
    assert_problem(unsigned, 401)
    assert_problem(too_large, 413, "urn:microcred:problem:body-too-large")
    rejected = await platform.fetchval(
        "enrollment", "SELECT count(*) FROM outbox WHERE event_type LIKE '%rejected%'"
    )
    assert rejected == 0, "no report of a refused batch was processed"


# The operations that read their raw body themselves (a signature covers it, or it is a credential).
RAW_BODY_LIMITS = [
    ("issuance", "/verify", 256 * 1024),
    ("billing", "/webhooks/provider", 256 * 1024),
    ("enrollment", "/partners/{partner_id}/completions", 2 * 1024 * 1024),
]


@pytest.mark.parametrize(("service", "path", "limit"), RAW_BODY_LIMITS)
async def test_api4_a_raw_body_over_its_limit_is_refused_declared_or_streamed(
    platform: Platform, targets: Targets, service: str, path: str, limit: int
) -> None:
    body = json.dumps({"@context": [], "x": "x" * TEN_MB}).encode()
    url = path.format(partner_id=targets.partner_id)
    read = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal read
        for start in range(0, len(body), 64 * 1024):
            read += 64 * 1024
            yield body[start : start + 64 * 1024]

    headers = {"content-type": "application/json"}
    declared = await platform.clients[service].post(url, content=body, headers=headers)
    streamed = await platform.clients[service].post(url, content=chunks(), headers=headers)

    assert_problem(declared, 413, "urn:microcred:problem:body-too-large")
    assert "content-length" not in streamed.request.headers
    assert_problem(streamed, 413, "urn:microcred:problem:body-too-large")
    assert read <= limit + 64 * 1024, f"{read} bytes read of a body refused at {limit}"


def _nested(depth: int) -> list[bytes]:
    return [b"[" * depth + b"]" * depth, b'{"a":' * depth + b"1" + b"}" * depth]


async def test_api4_deeply_nested_json_is_refused_with_a_4xx(
    platform: Platform, victim: Victim, targets: Targets
) -> None:
    targets_by_caller: list[tuple[str, str, str, dict[str, str], bool]] = [
        ("catalog", "POST", "/courses", platform.staff(), False),
        ("enrollment", "POST", "/enrollments", {**alice(platform), "Idempotency-Key": "nested"}, False),
        ("enrollment", "POST", f"/partners/{targets.partner_id}/completions", {}, True),
        ("billing", "POST", f"/payments/{victim.payment_id}/refunds", platform.staff(), False),
        ("issuance", "POST", "/verify", {}, False),
        ("notifications", "PUT", "/me/preferences", alice(platform), False),
    ]
    for body in _nested(100_000):
        for service, method, path, headers, signed in targets_by_caller:
            sent = {**headers, "content-type": "application/json"}
            if signed:  # the signature is checked before the body is parsed
                sent.update(_standard_webhook(targets.partner_secret, body))
            response = await platform.clients[service].request(method, path, content=body, headers=sent)
            where = f"{service} {method} {path}: {response.status_code} {response.text[:200]}"
            assert 400 <= response.status_code < 500, where
            assert response.headers["content-type"] == PROBLEM_JSON, where


# --- API7: server-side request forgery -------------------------------------------------------


@dataclass
class Bait:
    """A server on a loopback port that no service is allowed to call; it records every request."""

    requests: list[str] = field(default_factory=list)

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.api_route("/{path:path}", methods=["GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS"])
        async def anything(request: Request) -> Response:
            self.requests.append(f"{request.method} {request.url}")
            return Response(b"{}", media_type="application/json")

        return app


@pytest.fixture
async def bait() -> AsyncIterator[tuple[Bait, int]]:
    server = Bait()
    async with on_loopback(server.app()) as port:
        yield server, port


def _credential(issuer: str, *, contexts: list[Any] | None = None, **members: Any) -> dict[str, Any]:
    return {
        "@context": contexts
        or [
            "https://www.w3.org/ns/credentials/v2",
            "https://purl.imsglobal.org/spec/ob/v3p0/context-3.0.3.json",
        ],
        "id": f"urn:uuid:{uuid.uuid4()}",
        "type": ["VerifiableCredential", "OpenBadgeCredential"],
        "issuer": {"id": issuer, "type": ["Profile"], "name": "Elsewhere College"},
        "validFrom": "2026-01-01T00:00:00Z",
        "credentialSubject": {
            "type": ["AchievementSubject"],
            "identifier": [
                {
                    "type": "IdentityObject",
                    "identityHash": "eve@example.org",
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
        **members,
    }


def _with_subject(credential: dict[str, Any], members: dict[str, Any]) -> dict[str, Any]:
    return {**credential, "credentialSubject": {**members, **credential["credentialSubject"]}}


def _with_proof(credential: dict[str, Any], verification_method: str) -> dict[str, Any]:
    """An eddsa-rdfc-2022 proof that names the method; its value is not a real signature."""
    return {
        **credential,
        "proof": [
            {
                "type": "DataIntegrityProof",
                "cryptosuite": "eddsa-rdfc-2022",
                "created": "2026-01-01T00:00:00Z",
                "verificationMethod": verification_method,
                "proofPurpose": "assertionMethod",
                # 64 bytes, as an Ed25519 signature: the verifier gets as far as canonicalizing.
                "proofValue": "z" + base58.b58encode(bytes(range(64))).decode(),
            }
        ],
    }


def _ssrf_attempts(port: int, tmp_path: Path) -> dict[str, dict[str, Any] | str]:
    """What an attacker sends to POST /verify, each naming the bait in another place."""
    base = f"http://127.0.0.1:{port}"
    did_web = f"did:web:127.0.0.1%3A{port}"
    signer = keys.generate_key(tmp_path / "attacker-keys", "attacker-1")
    did_key = f"did:key:{signer.public_key_multibase}"
    method = f"{did_key}#{signer.public_key_multibase}"

    def signed(credential: dict[str, Any]) -> dict[str, Any]:
        return proofs.sign(credential, signer, verification_method=method, created=datetime.now(UTC))

    def vc_jwt(issuer: str, **header: str) -> str:
        payload = json.dumps(_credential(issuer)).encode()
        return jwt.PyJWS().encode(payload, signer.private_key, algorithm="EdDSA", headers=header)

    return {
        "an @context URL": _with_proof(
            _credential(did_key, contexts=["https://www.w3.org/ns/credentials/v2", f"{base}/context.jsonld"]),
            method,
        ),
        "a nested @context URL": _with_proof(
            _with_subject(_credential(did_key), {"@context": f"{base}/n.jsonld"}), method
        ),
        "an @import in an embedded context": _with_proof(
            _with_subject(_credential(did_key), {"@context": {"@import": f"{base}/import.jsonld"}}), method
        ),
        "a did:web issuer on the bait's host": _with_proof(_credential(did_web), f"{did_web}#key-1"),
        "a did:web issuer with a path": _with_proof(
            _credential(f"{did_web}:issuers:1"), f"{did_web}:issuers:1#key-1"
        ),
        "an issuer and key that are URLs": _with_proof(_credential(f"{base}/issuer"), f"{base}/issuer#key-1"),
        "a status list on the bait (signed credential)": signed(
            _credential(
                did_key, credentialStatus=status_list.status_entry(f"{base}/status/1", 7, "revocation")
            )
        ),
        "a status list behind credentials in the URL": signed(
            _credential(
                did_key,
                credentialStatus=status_list.status_entry(
                    f"http://127.0.0.1:9@127.0.0.1:{port}/s", 7, "revocation"
                ),
            )
        ),
        "a status list on localhost": signed(
            _credential(
                did_key,
                credentialStatus=status_list.status_entry(f"http://localhost:{port}/s", 7, "suspension"),
            )
        ),
        "a VC-JWT whose kid is a did:web on the bait": vc_jwt(did_web, kid=f"{did_web}#key-1"),
        "a VC-JWT with jku and x5u headers": vc_jwt(
            did_web, kid=f"{did_web}#key-1", jku=f"{base}/jwks.json", x5u=f"{base}/cert.pem"
        ),
        "a VC-JWT whose kid is a URL": vc_jwt(f"{base}/issuer", kid=f"{base}/issuer#key-1"),
    }


async def test_api7_verify_never_calls_a_url_a_credential_names(
    platform: Platform, bait: tuple[Bait, int], tmp_path: Path
) -> None:
    server, port = bait
    async with httpx.AsyncClient() as client:  # the bait does notice a request
        assert (await client.get(f"http://127.0.0.1:{port}/canary")).status_code == 200
    assert server.requests == [f"GET http://127.0.0.1:{port}/canary"]
    server.requests.clear()
    verdicts = {}
    for attempt, presented in _ssrf_attempts(port, tmp_path).items():
        response = await platform.issuance.post("/verify", json=presented)
        assert response.status_code == 200, f"{attempt}: {response.text[:300]}"
        verdicts[attempt] = response.json()["verified"]
    # Fetches would have happened inside the requests; a moment more proves nothing trails behind.
    await asyncio.sleep(0.5)

    assert server.requests == [], "the verifier called the bait"
    assert {attempt: verdict for attempt, verdict in verdicts.items() if verdict == "valid"} == {}


async def test_api7_verify_does_not_fetch_urls_that_are_data(
    platform: Platform, bait: tuple[Bait, int], tmp_path: Path
) -> None:
    server, port = bait
    signer = keys.generate_key(tmp_path / "keys", "k-1")
    did_key = f"did:key:{signer.public_key_multibase}"
    credential = proofs.sign(
        _credential(
            did_key,
            evidence=[{"id": f"http://127.0.0.1:{port}/evidence", "type": ["Evidence"]}],
        ),
        signer,
        verification_method=f"{did_key}#{signer.public_key_multibase}",
        created=datetime.now(UTC),
    )

    response = await platform.issuance.post("/verify", json=credential)
    await asyncio.sleep(0.5)

    assert response.status_code == 200, response.text
    assert server.requests == []


REFUSED_WEBHOOK_URLS = [
    "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
    "http://[fd00:ec2::254]/latest/meta-data/",
    "http://metadata.google.internal/computeMetadata/v1/",
    "file:///etc/passwd",
    "gopher://hooks.employer.example:70/_ping",
    "ftp://hooks.employer.example/x",
    "http://user:pass@hooks.employer.example/x",
    "http://hooks.employer.example@169.254.169.254/",
    "http://localhost:5432/",
    "http://127.0.0.1:9092/",
    "http://[::1]/",
    "http://0.0.0.0/",
    "http://2130706433/",
    "http://0x7f000001/",
    "http://hooks.employer.example.evil.test/",
    "http://evil.test/#.partner.example",
    "http://evil.test?.partner.example",
    "https://hooks.employer.example:99999/",
    "//hooks.employer.example/no-scheme",
    "hooks.employer.example",
]


@pytest.mark.parametrize("url", REFUSED_WEBHOOK_URLS)
async def test_api7_a_webhook_subscription_to_an_internal_or_malformed_url_is_refused(
    platform: Platform, url: str
) -> None:
    response = await platform.notifications.post(
        "/webhooks/subscriptions", json={"url": url, "scope": {"kind": "all"}}, headers=platform.admin()
    )

    assert_problem(response, 422, "urn:microcred:problem:webhook-url-refused")


async def test_api7_only_allowed_webhook_hosts_are_subscribed(platform: Platform) -> None:
    allowed = await platform.notifications.post(
        "/webhooks/subscriptions",
        json={
            "url": "https://crm.partner.example/hooks",
            "scope": {"kind": "issuer", "id": EXAMPLE_ISSUER_ID},
        },
        headers=platform.staff(),
    )
    listed = await platform.notifications.get("/webhooks/subscriptions?limit=100", headers=platform.staff())

    assert allowed.status_code == 201, allowed.text
    urls = {item["url"] for item in listed.json()["items"]}
    assert "https://crm.partner.example/hooks" in urls
    assert not urls & set(REFUSED_WEBHOOK_URLS)
