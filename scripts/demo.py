"""Walk one learner through the whole journey against the running system (`make up` first).

browse the catalog -> enroll -> pay through the provider simulator -> a partner institution
reports the completion on Kafka, signed -> the credential is minted -> the email is caught ->
the credential verifies. Each step is printed; the last line is the verified credential's page.

    make demo
"""

import asyncio
import base64
import hashlib
import hmac
import json
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
from aiokafka import AIOKafkaProducer

from catalog.seed import COMMUNICATION
from microcred_events import CompletionReported, Topic

sys.path.insert(0, str(Path(__file__).parent))
import infra  # the settings `make up` reads

ISSUER = "http://127.0.0.1:8000"
CATALOG, ENROLLMENT, BILLING, ISSUANCE = (f"http://127.0.0.1:{port}" for port in (8001, 8002, 8003, 8004))
SIMULATOR, MAIL = "http://127.0.0.1:8090", "http://127.0.0.1:8025"
# The broker `make up` uses, read from the same settings (KAFKA_BOOTSTRAP_SERVERS, else the
# project's own broker on MICROCRED_KAFKA_PORT).
KAFKA = infra.endpoints().kafka_bootstrap
T = TypeVar("T")


def step(message: str) -> None:
    print(f"\n==> {message}", flush=True)


def show(message: str) -> None:
    print(f"    {message}", flush=True)


async def eventually(what: str, check: Callable[[], Awaitable[T | None]], within: float = 60) -> T:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if (found := await check()) is not None:
            return found
        await asyncio.sleep(0.5)
    raise SystemExit(f"gave up waiting for {what} after {within:.0f}s: is `make up` running?")


async def token(http: httpx.AsyncClient, subject: str, role: str, **claims: str) -> dict[str, str]:
    response = await http.post(f"{ISSUER}/token", json={"sub": subject, "roles": [role], **claims})
    response.raise_for_status()
    return {"Authorization": f"Bearer {response.json()['access_token']}"}


async def main() -> None:
    run = uuid.uuid4().hex[:6]
    learner_email = f"ada.{run}@example.org"
    async with httpx.AsyncClient(timeout=10) as http:
        ada = await token(http, f"ada-{run}", "learner", email=learner_email, name="Ada Lovelace")
        admin = await token(http, f"admin-{run}", "admin", email="admin@example.org")

        step("Ada browses the catalog")
        page = (await http.get(f"{CATALOG}/courses", params={"q": "communication"})).json()
        # By id: a catalog seeded by an older release may title it otherwise.
        course = next(item for item in page["items"] if item["course_id"] == str(COMMUNICATION))
        price = course["price"]
        show(f"{course['title']}: {price['amount_minor'] / 100:.2f} {price['currency']}, {course['format']}")

        step("A partner institution that teaches it is registered (admin)")
        partner = (
            await http.post(
                f"{ENROLLMENT}/partners",
                json={
                    "display_name": f"Northwind University {run}",
                    "course_ids": [course["course_id"]],
                    "credentials": [{"kind": "hmac_sha256"}],
                },
                headers=admin,
            )
        ).json()
        secret = partner["secrets"][0]["secret"]
        show(f"partner {partner['partner_id']} may report completions of this course")

        step("Ada enrolls")
        enrolled = await http.post(
            f"{ENROLLMENT}/enrollments",
            json={"course_id": course["course_id"]},
            headers={**ada, "Idempotency-Key": f"demo-{run}"},
        )
        enrolled.raise_for_status()
        enrollment = enrolled.json()
        show(f"enrollment {enrollment['enrollment_id']}: {enrollment['status']}")

        step("Ada pays through the payment provider (the simulator signs its webhook to billing)")

        async def payment_due() -> dict[str, Any] | None:
            items = (await http.get(f"{BILLING}/payments", headers=ada)).json()["items"]
            return next((p for p in items if p["enrollment_id"] == enrollment["enrollment_id"]), None)

        payment = await eventually("the payment to fall due", payment_due)
        checkout = (
            await http.post(f"{BILLING}/payments/{payment['payment_id']}/checkout", headers=ada)
        ).json()
        show(f"checkout page: {checkout['checkout_url']}")
        paid = (await http.post(f"{SIMULATOR}/sessions/{checkout['session_id']}/pay")).json()
        show(f"provider webhook answered {paid['delivery']['status_code']}")

        async def active() -> str | None:
            state = (
                await http.get(f"{ENROLLMENT}/enrollments/{enrollment['enrollment_id']}", headers=ada)
            ).json()
            return state["status"] if state["status"] == "active" else None

        show(f"enrollment is {await eventually('the enrollment to become active', active)}")

        step("The partner reports Ada's completion on Kafka, signed, with a plain Kafka client")
        report = {
            "report_id": str(uuid.uuid4()),
            "partner_id": partner["partner_id"],
            "course_id": course["course_id"],
            "learner_id": enrollment["learner"]["learner_id"],
            "completed_at": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            "score": 94,
        }
        await publish_signed(partner["partner_id"], secret, report)
        show(f"report {report['report_id']} published to {Topic.PARTNER_COMPLETION}")

        step("Issuance mints and signs the credential")

        async def minted() -> dict[str, Any] | None:
            items = (await http.get(f"{ISSUANCE}/me/credentials", headers=ada)).json()["items"]
            return items[0] if items else None

        credential = await eventually("the credential", minted)
        show(f"{credential['achievement_name']}: {credential['credential_url']}")

        step("Ada's email is caught by the local SMTP sink")

        async def emailed() -> dict[str, Any] | None:
            messages = (await http.get(f"{MAIL}/messages")).json()
            return next(
                (m for m in messages if learner_email in m["to"] and "credential" in m["subject"].lower()),
                None,
            )

        mail = await eventually("the credential email", emailed)
        show(f"to {mail['to'][0]}: {mail['subject']!r}")

        step("Anyone verifies the credential")
        signed = (
            await http.get(credential["credential_url"], headers={"Accept": "application/ld+json"})
        ).json()
        verdict = (await http.post(f"{ISSUANCE}/verify", json=signed)).json()
        for name, check in verdict["checks"].items():
            show(f"{name:<10} {check['result']}: {check['detail']}")
        show(f"verified: {verdict['verified']}")
        if verdict["verified"] != "valid":
            raise SystemExit("the credential did not verify")
        print(f"\nThe verified credential's page: {credential['credential_url']}")


async def publish_signed(partner_id: str, secret: str, report: dict[str, Any]) -> None:
    """The partner side, as docs/partners.md describes it."""
    body = json.dumps(report).encode()
    message_id, at = str(uuid.uuid4()), datetime.now(UTC).isoformat().replace("+00:00", "Z")
    signature = hmac.new(secret.encode(), f"{message_id}.{at}.".encode() + body, hashlib.sha256).digest()
    producer = AIOKafkaProducer(bootstrap_servers=KAFKA, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        await producer.send_and_wait(
            Topic.PARTNER_COMPLETION,
            body,
            key=report["report_id"].encode(),
            headers=[
                ("ce_specversion", b"1.0"),
                ("ce_id", message_id.encode()),
                ("ce_type", CompletionReported.TYPE.encode()),
                ("ce_source", f"urn:microcred:partner:{partner_id}".encode()),
                ("ce_time", at.encode()),
                ("ce_subject", report["report_id"].encode()),
                ("content-type", b"application/json"),
                ("ce_signature", b"v1," + base64.b64encode(signature)),
            ],
        )
    finally:
        await producer.stop()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except httpx.HTTPError as exc:
        sys.exit(f"a service did not answer ({exc}): is `make up` running?")
