"""Webhook subscriptions are scoped: a subscriber hears only of its own learners (issue 13, item 1).

Two partners each deliver a course and each have a webhook subscription scoped to themselves; a
learner enrolls in each course. Through the running platform on real Kafka and PostgreSQL, each
subscription gets deliveries about its own partner's learner and never the other's (whose names,
emails and scores it has no business seeing). Who may subscribe to which scope is checked too.
"""

import uuid
from typing import Any

import pytest

from ..conftest import EXAMPLE_ISSUER_ID
from .conftest import PROBLEM_JSON, Platform, wait_for


async def _subscribe(platform: Platform, url: str, scope: dict[str, Any], headers: dict[str, str]) -> Any:
    return await platform.notifications.post(
        "/webhooks/subscriptions", json={"url": url, "scope": scope}, headers=headers
    )


async def _payloads(platform: Platform, subscription_id: str) -> list[str]:
    payloads: list[str] | None = await platform.fetchval(
        "notifications",
        "SELECT array_agg(payload) FROM deliveries WHERE subscription_id = $1",
        uuid.UUID(subscription_id),
    )
    return payloads or []


async def test_a_partners_subscription_never_receives_another_partners_learners(platform: Platform) -> None:
    partners = {"a": uuid.uuid4(), "b": uuid.uuid4()}
    courses = {
        name: await platform.published_course(f"Scoped course {name}", delivery_partner_id=str(partner))
        for name, partner in partners.items()
    }
    subscriptions = {}
    for name, partner in partners.items():
        created = await _subscribe(
            platform,
            f"https://lms-{name}.partner.example/hooks",
            {"kind": "partner", "id": str(partner)},
            platform.admin(),
        )
        assert created.status_code == 201, created.text
        assert created.json()["scope"] == {"kind": "partner", "id": str(partner)}
        subscriptions[name] = created.json()["subscription_id"]
    # Notifications learns each course's partner from catalog's events before anyone enrolls.
    known = await wait_for(
        lambda: platform.fetchval(
            "notifications",
            "SELECT count(*) = 2 FROM courses WHERE course_id = ANY($1::uuid[])",
            [uuid.UUID(course) for course in courses.values()],
        )
    )
    assert known, "notifications never heard of the courses"

    learners = {"a": "scoped-ann", "b": "scoped-bob"}
    for name, learner in learners.items():
        await platform.enroll(learner, courses[name])
    # Each learner's activation reached their inbox: the fan-out of their events is done.
    for learner in learners.values():
        headers = platform.learner(learner)

        async def activated(headers: dict[str, str] = headers) -> bool:
            listed = await platform.notifications.get("/me/notifications", headers=headers)
            return any(item["kind"] == "enrollment.activated" for item in listed.json()["items"])

        assert await wait_for(activated), f"{learner} never heard of the activation"

    for name, other in (("a", "b"), ("b", "a")):
        payloads = await _payloads(platform, subscriptions[name])
        assert payloads, f"partner {name}'s subscription received nothing about its own learner"
        leaked = [payload for payload in payloads if f"{learners[other]}@example.org" in payload]
        assert leaked == [], f"partner {name} received partner {other}'s learner"
        assert not any(courses[other] in payload for payload in payloads)
        assert all(courses[name] in payload for payload in payloads)


@pytest.mark.parametrize(
    ("who", "scope", "status", "kind"),
    [
        # Staff are not admins: never every learner's events, nor a partner's or a learner's,
        # which span issuers.
        ("staff", {"kind": "all"}, 403, "urn:microcred:problem:scope-forbidden"),
        ("staff", {"kind": "partner", "id": str(uuid.uuid4())}, 403, "urn:microcred:problem:scope-forbidden"),
        ("staff", {"kind": "learner", "id": str(uuid.uuid4())}, 403, "urn:microcred:problem:scope-forbidden"),
        # Staff act for their own institutions only.
        ("staff", {"kind": "issuer", "id": str(uuid.uuid4())}, 403, "urn:microcred:problem:scope-forbidden"),
        # Learners subscribe nobody: webhooks are for institutions' systems, registered by staff.
        ("learner", {"kind": "learner", "id": str(uuid.uuid4())}, 403, "urn:microcred:problem:forbidden"),
        ("learner", {"kind": "partner", "id": str(uuid.uuid4())}, 403, "urn:microcred:problem:forbidden"),
        # No scope is not "everything".
        ("admin", None, 422, None),
        ("admin", {"kind": "partner"}, 422, None),
    ],
)
async def test_nobody_subscribes_to_a_scope_they_do_not_own(
    platform: Platform, who: str, scope: dict[str, Any] | None, status: int, kind: str | None
) -> None:
    callers = {
        "staff": platform.staff(),
        "admin": platform.admin(),
        "learner": platform.learner("scoped-eve"),
    }
    body: dict[str, Any] = {"url": "https://lms-eve.partner.example/hooks"}
    if scope is not None:
        body["scope"] = scope
    before = await platform.fetchval("notifications", "SELECT count(*) FROM webhook_subscriptions")

    response = await platform.notifications.post("/webhooks/subscriptions", json=body, headers=callers[who])

    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM_JSON
    if kind is not None:
        assert response.json()["type"] == kind
    assert await platform.fetchval("notifications", "SELECT count(*) FROM webhook_subscriptions") == before


async def test_an_admin_subscribes_to_every_event_and_staff_to_their_issuers(platform: Platform) -> None:
    created = await _subscribe(
        platform, "https://warehouse.partner.example/hooks", {"kind": "all"}, platform.admin()
    )
    issuer = {"kind": "issuer", "id": EXAMPLE_ISSUER_ID}  # the one the platform's staff act for
    by_staff = await _subscribe(platform, "https://lms.partner.example/hooks", issuer, platform.staff())

    assert created.status_code == 201, created.text
    assert created.json()["scope"] == {"kind": "all", "id": None}
    assert by_staff.status_code == 201, by_staff.text
    assert by_staff.json()["scope"] == issuer


async def test_staff_see_and_manage_only_their_issuers_subscriptions(platform: Platform) -> None:
    mine = await _subscribe(
        platform,
        "https://mine.partner.example/hooks",
        {"kind": "issuer", "id": EXAMPLE_ISSUER_ID},
        platform.staff(),
    )
    partners = await _subscribe(
        platform,
        "https://theirs.partner.example/hooks",
        {"kind": "partner", "id": str(uuid.uuid4())},
        platform.admin(),
    )
    assert mine.status_code == partners.status_code == 201
    other_staff = platform.bearer("staff-of-another", "staff", issuers=[str(uuid.uuid4())])

    for staff, visible, hidden in (
        (platform.staff(), mine.json(), partners.json()),
        (other_staff, None, mine.json()),
    ):
        listed = await platform.notifications.get("/webhooks/subscriptions?limit=100", headers=staff)
        ids = {item["subscription_id"] for item in listed.json()["items"]}
        assert hidden["subscription_id"] not in ids
        if visible is not None:
            assert visible["subscription_id"] in ids
        path = f"/webhooks/subscriptions/{hidden['subscription_id']}"
        for method in ("GET", "DELETE"):
            response = await platform.notifications.request(method, path, headers=staff)
            assert response.status_code == 404, (method, response.text)
            assert response.headers["content-type"] == PROBLEM_JSON
        deliveries = await platform.notifications.get(
            f"/webhooks/deliveries?subscription_id={hidden['subscription_id']}", headers=staff
        )
        assert deliveries.json()["items"] == []

    # Neither was disabled by those who may not.
    for created in (mine, partners):
        shown = await platform.notifications.get(
            f"/webhooks/subscriptions/{created.json()['subscription_id']}", headers=platform.admin()
        )
        assert shown.json()["disabled_at"] is None
