"""Rate limits and the verifier's bounds (issue 13, "No rate limits anywhere").

- Bursts at the public and authentication-adjacent routes (enrollment creation, checkout, partner
  reports, POST /verify): over the limit a 429 problem with Retry-After, and nothing changes; the
  limits are per client address and per token subject, so another client is not refused.
- The client address is the peer's; X-Forwarded-For counts only from a trusted proxy.
- POST /verify checks proofs in worker processes: the probes answer promptly while large
  credentials are verified, and a burst past VERIFY_MAX_CONCURRENT gets 503 `verifier-busy`.

Every request from another client address goes through a client of its own (`from_address`);
each test uses addresses of its own, so the counters of one never reach another's.
"""

import asyncio
import contextlib
import statistics
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import base58
import httpx
import pytest

from issuance.jsonld import OB_V3, VC_V2
from microcred_runtime import Principal, Role

from .conftest import PROBLEM_JSON, Platform, on_loopback, wait_for

PER_ADDRESS = 5
PER_SUBJECT = 3
PROXY = "192.0.2.1"
VERIFY_WORKERS = 2
VERIFY_MAX_CONCURRENT = 4
# A did:key issuer (no fetch) whose proof the verifier checks in full before it finds the
# signature wrong: the 64 bytes are no signature of anything.
ISSUER_KEY = "z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK"
ISSUER = f"did:key:{ISSUER_KEY}"


@pytest.fixture(scope="module")
def platform_settings() -> dict[str, Any]:
    return {
        "rate_limit_per_address": f"{PER_ADDRESS}/minute",
        "rate_limit_per_subject": f"{PER_SUBJECT}/minute",
        "http_trusted_proxies": ["192.0.2.0/24"],
        "verify_workers": VERIFY_WORKERS,
        "verify_max_concurrent": VERIFY_MAX_CONCURRENT,
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


def credential(evidence: int, tag: str) -> dict[str, Any]:
    """A well-formed Open Badges credential with `evidence` items (some 107 bytes each)."""
    return {
        "@context": [VC_V2, OB_V3],
        "id": f"urn:uuid:{uuid.uuid4()}",
        "type": ["VerifiableCredential", "OpenBadgeCredential"],
        "issuer": {"id": ISSUER, "type": ["Profile"], "name": f"Elsewhere College {tag}"},
        "validFrom": "2026-01-01T00:00:00Z",
        "credentialSubject": {
            "type": ["AchievementSubject"],
            "id": "did:example:learner",
            "achievement": {
                "id": f"https://elsewhere.example/achievements/{tag}",
                "type": ["Achievement"],
                "name": f"Compilers {tag}",
                "criteria": {"narrative": "Write one."},
            },
        },
        "evidence": [
            {
                "id": f"https://elsewhere.example/evidence/{tag}/{index}",
                "type": ["Evidence"],
                "name": f"item {index}",
                "narrative": f"done {index}",
            }
            for index in range(evidence)
        ],
        "proof": {
            "type": "DataIntegrityProof",
            "cryptosuite": "eddsa-rdfc-2022",
            "created": "2026-01-01T00:00:00Z",
            "verificationMethod": f"{ISSUER}#{ISSUER_KEY}",
            "proofPurpose": "assertionMethod",
            "proofValue": "z" + base58.b58encode(bytes(range(64))).decode(),
        },
    }


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


def probe_latencies(
    port: int, *, count: int | None = None, until: threading.Event | None = None
) -> list[float]:
    """Latencies of /health/live, asked every 10 ms from a thread of its own (as a kubelet would,
    from outside the service's event loop): `count` of them, or until `until` is set."""
    latencies: list[float] = []
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
        while (count is None or len(latencies) < count) and not (until and until.is_set()):
            started = time.perf_counter()
            assert client.get("/health/live").status_code == 200
            latencies.append(time.perf_counter() - started)
            time.sleep(0.01)
    return latencies


async def test_verify_does_not_hold_the_event_loop(platform: Platform) -> None:
    """The liveness probe answers about as fast while large credentials are verified as alone:
    verification runs in worker processes, not on the loop that serves the probes."""
    # Some 230 KiB each, each of its own length: a shape no cache has seen.
    documents = [credential(2_150 + index, f"loop-{index}") for index in range(VERIFY_MAX_CONCURRENT)]

    async def verify(index: int, document: dict[str, Any]) -> float:
        async with from_address(platform, "issuance", f"198.51.100.{50 + index}") as client:
            started = time.perf_counter()
            response = await client.post("/verify", json=document)
            assert response.status_code == 200, response.text
            assert response.json()["checks"]["signature"]["result"] == "failed", response.text
            return time.perf_counter() - started

    async with on_loopback(platform.apps["issuance"]) as port:
        alone = await asyncio.to_thread(probe_latencies, port, count=20)
        done = threading.Event()
        probing = asyncio.create_task(asyncio.to_thread(probe_latencies, port, until=done))
        try:
            durations = await asyncio.gather(*(verify(index, doc) for index, doc in enumerate(documents)))
        finally:
            done.set()
            during = await probing
    ratio = statistics.median(during) / statistics.median(alone)
    print(
        f"probe alone {statistics.median(alone) * 1e3:.1f} ms (median of {len(alone)}), during the burst "
        f"{statistics.median(during) * 1e3:.1f} ms (median of {len(during)}, worst "
        f"{max(during) * 1e3:.1f} ms); verifications {min(durations):.2f}-{max(durations):.2f} s; "
        f"ratio {ratio:.1f}"
    )
    # On the loop, a probe waits for a verification (seconds); off it, for little but a share of CPU.
    assert ratio < 50, f"the probe took {ratio:.0f} times as long during the burst"


async def test_verifications_past_the_bound_are_refused_with_503_and_retry_after(
    platform: Platform,
) -> None:
    documents = [credential(1_000 + index, f"busy-{index}") for index in range(2 * VERIFY_MAX_CONCURRENT)]

    async def verify(index: int, document: dict[str, Any]) -> httpx.Response:
        async with from_address(platform, "issuance", f"198.51.100.{100 + index}") as client:
            return await client.post("/verify", json=document)

    responses = await asyncio.gather(*(verify(index, document) for index, document in enumerate(documents)))
    statuses = sorted(response.status_code for response in responses)
    assert 200 in statuses, statuses
    assert 503 in statuses, statuses
    for response in responses:
        if response.status_code == 503:
            assert response.headers["content-type"] == PROBLEM_JSON
            assert response.json()["type"] == "urn:microcred:problem:verifier-busy"
            assert int(response.headers["retry-after"]) >= 1
