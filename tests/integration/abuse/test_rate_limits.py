"""Rate limits (issue 13, "No rate limits anywhere").

- Bursts at the public and authentication-adjacent routes (enrollment creation, checkout, partner
  reports, POST /verify): over the limit a 429 problem with Retry-After, and nothing changes; the
  limits are per client address and per token subject, so another client is not refused.
- The client address is the peer's; X-Forwarded-For counts only from a trusted proxy.

Every request from another client address goes through a client of its own (`from_address`);
each test uses addresses of its own, so the counters of one never reach another's.
"""

import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from issuance.jsonld import VC_V2
from microcred_runtime import Principal, Role

from .conftest import PROBLEM_JSON, Platform, wait_for

PER_ADDRESS = 5
PER_SUBJECT = 3
PROXY = "192.0.2.1"


@pytest.fixture(scope="module")
def platform_settings() -> dict[str, Any]:
    return {
        "rate_limit_per_address": f"{PER_ADDRESS}/minute",
        "rate_limit_per_subject": f"{PER_SUBJECT}/minute",
        "http_trusted_proxies": ["192.0.2.0/24"],
    }


@contextlib.asynccontextmanager
async def from_address(platform: Platform, service: str, address: str) -> AsyncIterator[httpx.AsyncClient]:
    """A client of `service` whose requests come from `address` (the TCP peer, as the app sees it)."""
    transport = httpx.ASGITransport(app=platform.apps[service], client=(address, 40_000))
    async with httpx.AsyncClient(transport=transport, base_url="http://service", timeout=120) as client:
        yield client


def assert_rate_limited(response: httpx.Response) -> None:
    assert response.status_code == 429, response.text
    assert response.headers["content-type"] == PROBLEM_JSON
    assert response.json()["type"] == "urn:microcred:problem:rate-limited"
    assert 1 <= int(response.headers["retry-after"]) <= 60


async def course_known_to_enrollment(platform: Platform, course_id: str) -> None:
    async def known() -> bool:
        count = await platform.fetchval(
            "enrollment", "SELECT count(*) FROM courses WHERE course_id = $1", uuid.UUID(course_id)
        )
        return bool(count)

    assert await wait_for(known), "enrollment never learned of the course"


async def test_a_burst_of_enrollments_is_limited_per_subject_then_per_address_and_creates_nothing(
    platform: Platform,
) -> None:
    first = await platform.published_course("Rate limits I")
    second = await platform.published_course("Rate limits II")
    for course_id in (first, second):
        await course_known_to_enrollment(platform, course_id)

    async def enroll(client: httpx.AsyncClient, learner: str, course_id: str) -> httpx.Response:
        return await client.post(
            "/enrollments",
            json={"course_id": course_id},
            headers={**platform.learner(learner), "Idempotency-Key": str(uuid.uuid4())},
        )

    async with from_address(platform, "enrollment", "203.0.113.1") as client:
        statuses = [(await enroll(client, "ada", first)).status_code for _ in range(PER_SUBJECT)]
        assert statuses == [201] + [409] * (PER_SUBJECT - 1)  # already enrolled, but counted
        refused = await enroll(client, "ada", second)
        assert_rate_limited(refused)
        assert "caller" in refused.json()["detail"]
        # Another subject from the same address is not refused: its own count starts.
        assert (await enroll(client, "bob", second)).status_code == 201
        # The address has now sent PER_ADDRESS requests: a third caller from it is refused.
        assert_rate_limited(await enroll(client, "cy", second))
    async with from_address(platform, "enrollment", "203.0.113.2") as client:
        assert (await enroll(client, "cy", second)).status_code == 201

    enrolled = await platform.fetchval(
        "enrollment",
        "SELECT array_agg(learner_id ORDER BY learner_id) FROM enrollments WHERE course_id = $1",
        uuid.UUID(second),
    )
    assert sorted(enrolled) == sorted(
        Principal(name, frozenset({Role.LEARNER})).learner_id for name in ("bob", "cy")
    ), "a refused enrollment was created"


async def test_checkout_is_limited_per_subject(platform: Platform) -> None:
    async with from_address(platform, "billing", "203.0.113.10") as client:
        for _ in range(PER_SUBJECT):
            # No such payment: a 404, counted all the same.
            response = await client.post(
                f"/payments/{uuid.uuid4()}/checkout", headers=platform.learner("dee")
            )
            assert response.status_code == 404, response.text
        assert_rate_limited(
            await client.post(f"/payments/{uuid.uuid4()}/checkout", headers=platform.learner("dee"))
        )
        other = await client.post(f"/payments/{uuid.uuid4()}/checkout", headers=platform.learner("eve"))
        assert other.status_code == 404, other.text


async def test_partner_reports_are_limited_per_address(platform: Platform) -> None:
    partner = uuid.uuid4()
    async with from_address(platform, "enrollment", "203.0.113.20") as client:
        for _ in range(PER_ADDRESS):
            response = await client.post(f"/partners/{partner}/completions", content=b"{}")
            assert response.status_code in (401, 404), response.text
        assert_rate_limited(await client.post(f"/partners/{partner}/completions", content=b"{}"))
    async with from_address(platform, "enrollment", "203.0.113.21") as client:
        response = await client.post(f"/partners/{partner}/completions", content=b"{}")
        assert response.status_code in (401, 404), response.text


async def test_verify_is_limited_per_address_and_x_forwarded_for_counts_from_a_trusted_proxy_only(
    platform: Platform,
) -> None:
    small = {"@context": [VC_V2], "type": ["VerifiableCredential"]}
    async with from_address(platform, "issuance", "198.51.100.1") as client:
        for _ in range(PER_ADDRESS):
            assert (await client.post("/verify", json=small)).status_code == 200
        assert_rate_limited(await client.post("/verify", json=small))
        # A client's own X-Forwarded-For is not believed: it does not make it another client.
        assert_rate_limited(
            await client.post("/verify", json=small, headers={"X-Forwarded-For": "198.51.100.99"})
        )
    async with from_address(platform, "issuance", PROXY) as proxy:
        # Through a trusted proxy, the address it forwards for is the client's.
        forwarded = {"X-Forwarded-For": "10.1.1.1, 198.51.100.1"}
        assert_rate_limited(await proxy.post("/verify", json=small, headers=forwarded))
        forwarded = {"X-Forwarded-For": "198.51.100.2"}
        assert (await proxy.post("/verify", json=small, headers=forwarded)).status_code == 200
