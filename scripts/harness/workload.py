"""The people around the pipeline, through the same doors they use: staff build the catalog over
its API, learners enroll and pay over the APIs and the payment provider, and a partner institution
publishes signed completion reports to Kafka with a plain client (docs/partners.md).

Every call goes to one replica of the service (`Replicas.next_url`, round-robin over the running
ones) and is retried, on another replica, when it fails for a reason a retry can cure: the calls
are idempotent on retry (enrollments carry an Idempotency-Key, a checkout returns the same session,
a provider event is applied once however often it is delivered).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
from aiokafka import AIOKafkaProducer

from microcred_events import (
    CompletionReported,
    CourseSnapshot,
    CredentialIssued,
    PathwaySnapshot,
    example_data,
)

from .balancer import Replicas
from .monitor import Progress

Record = tuple[bytes, bytes, list[tuple[str, bytes]]]
PUBLISH_CHUNK = 500


class WorkloadError(RuntimeError):
    """A call that kept failing past its deadline, or was refused for good."""


Token = Callable[[str, str, str, str | None], str]  # (subject, role, email, name) -> bearer token


@dataclass
class Api:
    """The services' HTTP APIs as the workload reaches them, with the retry policy."""

    services: Mapping[str, Replicas]
    token: Token
    deadline: float  # seconds a call keeps being retried
    http: httpx.AsyncClient = field(default_factory=lambda: httpx.AsyncClient(timeout=30))
    _tokens: dict[tuple[str, str, str, str | None], dict[str, str]] = field(default_factory=dict)

    def bearer(self, subject: str, role: str, email: str, name: str | None = None) -> dict[str, str]:
        """The caller's Authorization header; the last few callers' tokens are reused (signing one
        costs more CPU than the request it goes with)."""
        key = (subject, role, email, name)
        if key not in self._tokens:
            if len(self._tokens) >= 256:
                self._tokens.pop(next(iter(self._tokens)))
            self._tokens[key] = {"Authorization": f"Bearer {self.token(subject, role, email, name)}"}
        return self._tokens[key]

    async def call(
        self,
        service: str,
        method: str,
        path: str,
        *,
        headers: Mapping[str, str],
        payload: Any = None,
        ok: Collection[int] = (200, 201),
        retry: Collection[int] = (),
    ) -> httpx.Response:
        """The first answer with a status in `ok`; 5xx, `retry` statuses and transport errors are
        retried (each time on the next replica) until `deadline`, anything else raises."""
        give_up = time.monotonic() + self.deadline
        while True:
            url = self.services[service].next_url() + path
            try:
                response = await self.http.request(method, url, headers=headers, json=payload)
            except httpx.TransportError as exc:
                failure = f"{type(exc).__name__} {exc}"
            else:
                if response.status_code in ok:
                    return response
                failure = f"HTTP {response.status_code} {response.text[:500]}"
                if response.status_code < 500 and response.status_code not in retry:
                    raise WorkloadError(f"{method} {service}{path}: {failure}")
            if time.monotonic() > give_up:
                raise WorkloadError(
                    f"{method} {service}{path} still failing after {self.deadline:.0f}s: {failure}"
                )
            await asyncio.sleep(0.25)

    async def close(self) -> None:
        await self.http.aclose()


# --- staff: the catalog, the partner, the webhook subscription --------------------------------------


STAFF = ("faults-staff", "staff", "staff@example.org", None)
ADMIN = ("faults-admin", "admin", "admin@example.org", None)


@dataclass(frozen=True)
class Partner:
    partner_id: str
    secret: str


async def register_partner(api: Api, name: str) -> Partner:
    response = await api.call(
        "enrollment",
        "POST",
        "/partners",
        payload={"display_name": name, "course_ids": [], "credentials": [{"kind": "hmac_sha256"}]},
        headers=api.bearer(*ADMIN),
    )
    partner = response.json()
    return Partner(str(partner["partner_id"]), str(partner["secrets"][0]["secret"]))


async def publish_course(api: Api, *, title: str, price_minor: int, partner_id: str) -> str:
    """A course the partner delivers, created and published through the catalog's API (staff)."""
    details = {
        **{
            name: value
            for name, value in example_data(CourseSnapshot).items()
            if name not in ("course_id", "version")
        },
        "title": title,
        "price": {"amount_minor": price_minor, "currency": "EUR"},
        "delivery_partner_id": partner_id,
        "achievement": {
            **example_data(CourseSnapshot)["achievement"],
            "achievement_id": str(uuid.uuid4()),
            "name": f"{title} (achievement)",
        },
    }
    staff = api.bearer(*STAFF)
    created = await api.call("catalog", "POST", "/courses", payload=details, headers=staff)
    course_id = str(created.json()["course_id"])
    await api.call("catalog", "POST", f"/courses/{course_id}/publish", headers=staff)
    return course_id


async def publish_pathway(api: Api, *, title: str, course_ids: Sequence[str]) -> str:
    details = {
        **{
            name: value
            for name, value in example_data(PathwaySnapshot).items()
            if name not in ("pathway_id", "version")
        },
        "title": title,
        "course_ids": list(course_ids),
        "achievement": {
            **example_data(PathwaySnapshot)["achievement"],
            "achievement_id": str(uuid.uuid4()),
            "name": f"{title} (pathway)",
        },
    }
    staff = api.bearer(*STAFF)
    created = await api.call("catalog", "POST", "/pathways", payload=details, headers=staff)
    pathway_id = str(created.json()["pathway_id"])
    await api.call("catalog", "POST", f"/pathways/{pathway_id}/publish", headers=staff)
    return pathway_id


async def subscribe_webhooks(api: Api, url: str) -> str:
    """Subscribes `url` to every CredentialIssued (an admin's scope `all`: the accounting expects
    one webhook per credential, pathway credentials included); the subscription's signing secret."""
    response = await api.call(
        "notifications",
        "POST",
        "/webhooks/subscriptions",
        payload={"url": url, "scope": {"kind": "all"}, "event_types": [CredentialIssued.TYPE]},
        headers=api.bearer(*ADMIN),
    )
    return str(response.json()["secret"])


@dataclass(frozen=True)
class Catalog:
    pathway_id: str
    pathway_courses: tuple[str, ...]
    single_course: str


@dataclass(frozen=True)
class Setup:
    partner: Partner
    catalog: Catalog
    webhook_secret: str


async def set_up(api: Api, *, pathway_courses: int, price_minor: int, webhook_url: str) -> Setup:
    """Staff's part before the learners come: a partner registered in enrollment; in the catalog,
    a free course and the paid courses of a pathway, all delivered by the partner, and the pathway;
    `webhook_url` subscribed to CredentialIssued."""
    partner = await register_partner(api, "Faultline Institute")
    single = await publish_course(
        api, title="Fault Tolerance Fundamentals", price_minor=0, partner_id=partner.partner_id
    )
    parts = [
        await publish_course(
            api, title=f"Resilience, part {part}", price_minor=price_minor, partner_id=partner.partner_id
        )
        for part in range(1, pathway_courses + 1)
    ]
    pathway = await publish_pathway(api, title="Resilience Pathway", course_ids=parts)
    secret = await subscribe_webhooks(api, webhook_url)
    return Setup(partner, Catalog(pathway, tuple(parts), single), secret)


# --- learners -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Learner:
    subject: str
    number: int

    @property
    def email(self) -> str:
        return f"{self.subject}@example.org"

    def headers(self, api: Api) -> dict[str, str]:
        return api.bearer(self.subject, "learner", self.email, f"Learner {self.number}")


@dataclass(frozen=True)
class Enrolled:
    enrollment_id: str
    learner_id: str
    course_id: str
    status: str


async def enroll(api: Api, learner: Learner, course_id: str, key: str) -> Enrolled:
    # 422 course-not-found: the CoursePublished event has not reached enrollment yet.
    response = await api.call(
        "enrollment",
        "POST",
        "/enrollments",
        payload={"course_id": course_id},
        headers={**learner.headers(api), "Idempotency-Key": key},
        ok=(201,),
        retry=(422,),
    )
    body = response.json()
    return Enrolled(str(body["enrollment_id"]), str(body["learner"]["learner_id"]), course_id, body["status"])


async def enroll_all(
    api: Api,
    learners: Sequence[Learner],
    course_id: str,
    run_id: str,
    concurrency: int,
    say: Callable[[str], None],
) -> list[Enrolled]:
    """Enroll every learner, `concurrency` requests at a time (there is no bulk endpoint, and the
    API is what learners use: bounded concurrency keeps the service busy without piling up requests
    that would only time out). The first goes alone: it waits until enrollment knows the course."""
    if not learners:
        return []
    enrolled: list[Enrolled | None] = [None] * len(learners)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(1, len(learners)):
        queue.put_nowait(index)
    started = time.monotonic()
    done = 0

    async def one(index: int) -> None:
        nonlocal done
        enrolled[index] = await enroll(api, learners[index], course_id, f"{run_id}-{learners[index].number}")
        done += 1
        if done % 5000 == 0:
            say(f"  enrolled {done} of {len(learners)} ({done / (time.monotonic() - started):.0f}/s)")

    async def worker() -> None:
        while not queue.empty():
            await one(queue.get_nowait())

    await one(0)
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return [item for item in enrolled if item is not None]


async def pay(api: Api, learner: Learner, simulator: str, enrollment_ids: Collection[str]) -> int:
    """Pay each enrollment's due payment: check out at billing, pay at the provider (its webhook
    settles the payment at billing), and deliver the provider's event again until billing has taken
    it. Returns how many payments were made."""
    headers = learner.headers(api)
    due: dict[str, str] = {}
    give_up = time.monotonic() + api.deadline
    while len(due) < len(enrollment_ids):
        # Billing opens a payment when it hears of the enrollment, over Kafka: poll until it has.
        page = await api.call("billing", "GET", "/payments?limit=50", headers=headers)
        due = {
            str(item["enrollment_id"]): str(item["payment_id"])
            for item in page.json()["items"]
            if str(item["enrollment_id"]) in enrollment_ids
        }
        if len(due) < len(enrollment_ids):
            if time.monotonic() > give_up:
                raise WorkloadError(
                    f"{learner.subject}: billing opened {len(due)} of {len(enrollment_ids)} payments"
                )
            await asyncio.sleep(0.5)
    for payment_id in due.values():
        checkout = await api.call("billing", "POST", f"/payments/{payment_id}/checkout", headers=headers)
        session_id = checkout.json()["session_id"]
        paid = await api.http.post(f"{simulator}/sessions/{session_id}/pay")
        if paid.status_code != 200:
            raise WorkloadError(f"the provider refused to take payment {payment_id}: {paid.text[:300]}")
        result = paid.json()
        delivery, event_id = result["delivery"], result["event"]["id"]
        give_up = time.monotonic() + api.deadline
        # The provider delivers its webhook once; a real one retries, as this does for it.
        while not (delivery["status_code"] is not None and 200 <= delivery["status_code"] < 300):
            if time.monotonic() > give_up:
                raise WorkloadError(f"billing did not take provider event {event_id}: {delivery}")
            await asyncio.sleep(0.5)
            delivery = (await api.http.post(f"{simulator}/events/{event_id}/resend")).json()
    return len(due)


async def wait_active(api: Api, learner: Learner, enrollment_ids: Collection[str]) -> None:
    """Until every enrollment is active (enrollment hears of the settled payments over Kafka)."""
    headers = learner.headers(api)
    give_up = time.monotonic() + api.deadline
    while True:
        page = await api.call("enrollment", "GET", "/enrollments?status=active&limit=50", headers=headers)
        active = {str(item["enrollment_id"]) for item in page.json()["items"]}
        if active >= set(enrollment_ids):
            return
        if time.monotonic() > give_up:
            raise WorkloadError(
                f"{learner.subject}: {len(active)} of {len(enrollment_ids)} enrollments active"
            )
        await asyncio.sleep(0.5)


# --- the partner: signed completion reports on Kafka -----------------------------------------------


def signed_report(partner: Partner, enrolled: Enrolled, namespace: uuid.UUID, score: int) -> Record:
    """The report that `enrolled` was completed, signed as docs/partners.md says; its ids derive
    from the enrollment, so a resend is the same message."""
    report_id = str(uuid.uuid5(namespace, f"report-{enrolled.enrollment_id}"))
    now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    report = {
        "report_id": report_id,
        "partner_id": partner.partner_id,
        "course_id": enrolled.course_id,
        "learner_id": enrolled.learner_id,
        "enrollment_id": enrolled.enrollment_id,
        "completed_at": now,
        "score": score,
    }
    body = json.dumps(report).encode()
    message_id = str(uuid.uuid5(namespace, f"message-{enrolled.enrollment_id}"))
    content = f"{message_id}.{now}.".encode() + body
    signature = hmac.new(partner.secret.encode(), content, hashlib.sha256).digest()
    headers = [
        ("ce_specversion", b"1.0"),
        ("ce_id", message_id.encode()),
        ("ce_type", CompletionReported.TYPE.encode()),
        ("ce_source", f"urn:microcred:partner:{partner.partner_id}".encode()),
        ("ce_time", now.encode()),
        ("ce_subject", report_id.encode()),
        ("content-type", b"application/json"),
        ("ce_signature", b"v1," + base64.b64encode(signature)),
    ]
    return report_id.encode(), body, headers


@dataclass
class _Batch:
    records: list[Record]
    done: asyncio.Future[None]


class Publisher:
    """Publishes what it is given, in order, retrying until Kafka has acknowledged every record
    (a resend keeps its `ce_id`, so it is a duplicate at worst; one more than 5 minutes after its
    `ce_time` would be refused as stale, unless its report was accepted already). `put` returns
    a future that is done once all of that batch is acknowledged."""

    def __init__(self, bootstrap: str, topic: str, say: Callable[[str], None]) -> None:
        self._bootstrap = bootstrap
        self._topic = topic
        self._say = say
        self._queue: asyncio.Queue[_Batch] = asyncio.Queue()
        self.acknowledged = 0
        self.failed_sends = 0
        self.started_at: float | None = None

    def put(self, records: list[Record]) -> asyncio.Future[None]:
        batch = _Batch(records, asyncio.get_running_loop().create_future())
        self._queue.put_nowait(batch)
        return batch.done

    async def run(self) -> None:
        producer: Any = None
        try:
            while True:
                batches = [await self._queue.get()]
                while not self._queue.empty() and sum(len(b.records) for b in batches) < PUBLISH_CHUNK:
                    batches.append(self._queue.get_nowait())
                if self.started_at is None:
                    self.started_at = time.monotonic()
                pending = [record for batch in batches for record in batch.records]
                while pending:
                    if producer is None:
                        producer = await self._producer()
                    pending = await self._send(producer, pending)
                    if pending:
                        # A failed send may leave the idempotent producer's sequence state behind
                        # the broker's: start a fresh one rather than reason about it.
                        with contextlib.suppress(Exception):
                            await producer.stop()
                        producer = None
                        await asyncio.sleep(1.0)
                for batch in batches:
                    batch.done.set_result(None)
        finally:
            if producer is not None:
                with contextlib.suppress(Exception):
                    await producer.stop()

    async def _producer(self) -> Any:
        while True:
            producer = AIOKafkaProducer(
                bootstrap_servers=self._bootstrap, acks="all", enable_idempotence=True, linger_ms=5
            )
            try:
                await producer.start()
            except Exception as exc:
                self._say(f"  publisher: Kafka unreachable ({type(exc).__name__}), retrying")
                with contextlib.suppress(Exception):
                    await producer.stop()
                await asyncio.sleep(1.0)
                continue
            return producer

    async def _send(self, producer: Any, records: list[Record]) -> list[Record]:
        """Sends the records; returns those Kafka did not acknowledge."""
        futures = []
        try:
            for key, value, headers in records:
                futures.append(await producer.send(self._topic, value, key=key, headers=headers))
        except Exception as exc:
            self._say(f"  publisher: send refused ({type(exc).__name__}: {exc}), will resend")
        results = await asyncio.gather(*futures, return_exceptions=True)
        self.acknowledged += sum(1 for outcome in results if not isinstance(outcome, BaseException))
        failed = [
            record
            for record, outcome in zip(records[: len(futures)], results, strict=True)
            if isinstance(outcome, BaseException)
        ]
        unsent = records[len(futures) :]
        self.failed_sends += len(failed) + len(unsent)
        return failed + unsent


# --- the plan's work, released in order ------------------------------------------------------------


@dataclass(frozen=True)
class PathwayLearner:
    learner: Learner


Unit = Enrolled | PathwayLearner  # a single course's completion, or a learner taking a whole pathway


def interleave(singles: Sequence[Enrolled], pathway: Sequence[PathwayLearner]) -> list[Unit]:
    """The singles in order, with the pathway learners spread evenly among them."""
    total = len(singles) + len(pathway)
    places = {int((index + 0.5) * total / len(pathway)): item for index, item in enumerate(pathway)}
    rest = iter(singles)
    return [places[position] if position in places else next(rest) for position in range(total)]


class Workload:
    """Releases the plan's units in order as `allow` lets it: a single's report goes to the
    publisher; a pathway learner browses the catalog, enrolls in each of its courses, pays for
    them, waits until all are active, then has the partner report every part at once (adjacent
    records, so different partitions, and replicas, take them)."""

    def __init__(
        self,
        units: Sequence[Unit],
        *,
        api: Api,
        catalog: Catalog,
        partner: Partner,
        publisher: Publisher,
        simulator: str,
        run_id: str,
        concurrency: int,
    ) -> None:
        self._units = list(units)
        self._weights = [1 if isinstance(unit, Enrolled) else len(catalog.pathway_courses) for unit in units]
        self._api = api
        self._catalog = catalog
        self._partner = partner
        self._publisher = publisher
        self._simulator = simulator
        self._run_id = run_id
        self._namespace = uuid.uuid5(uuid.NAMESPACE_URL, f"urn:microcred:faults:{run_id}")
        self._released = 0  # units handed on
        self._reports_allowed = 0
        self._slots = asyncio.Semaphore(concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self.failures: list[BaseException] = []
        self.pathway_sent = 0
        self.pathway_started = 0
        self.catalog_reads = 0
        self.payments = 0

    @property
    def reports(self) -> int:
        return sum(self._weights)

    def progress(self) -> Progress:
        return Progress(
            sent=self._publisher.acknowledged,
            pathway_sent=self.pathway_sent,
            pathway_started=self.pathway_started,
            catalog_reads=self.catalog_reads,
        )

    def allow(self, reports: int) -> None:
        """Release the units whose reports fit within the first `reports` of the plan."""
        self._reports_allowed = max(self._reports_allowed, reports)
        singles: list[Record] = []
        position = sum(self._weights[: self._released])
        while self._released < len(self._units):
            if position >= self._reports_allowed:
                break
            weight = self._weights[self._released]
            unit = self._units[self._released]
            if isinstance(unit, Enrolled):
                singles.append(signed_report(self._partner, unit, self._namespace, 50 + self._released % 51))
            else:
                self._start(unit)
            position += weight
            self._released += 1
        for start in range(0, len(singles), PUBLISH_CHUNK):
            self._publisher.put(singles[start : start + PUBLISH_CHUNK])

    def _start(self, unit: PathwayLearner) -> None:
        task = asyncio.create_task(self._take_pathway(unit.learner), name=unit.learner.subject)
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.failures.append(task.exception())  # type: ignore[arg-type]

    async def _take_pathway(self, learner: Learner) -> None:
        async with self._slots:
            self.pathway_started += 1
            api, catalog = self._api, self._catalog
            # Browsing first, as a learner does: the pathway and each of its courses.
            await api.call("catalog", "GET", f"/pathways/{catalog.pathway_id}", headers={})
            self.catalog_reads += 1
            for course_id in catalog.pathway_courses:
                await api.call("catalog", "GET", f"/courses/{course_id}", headers={})
                self.catalog_reads += 1
            enrolled = await asyncio.gather(
                *(
                    enroll(api, learner, course_id, f"{self._run_id}-{learner.number}-{part}")
                    for part, course_id in enumerate(catalog.pathway_courses)
                )
            )
            ids = [item.enrollment_id for item in enrolled]
            self.payments += await pay(api, learner, self._simulator, ids)
            await wait_active(api, learner, ids)
            records = [
                signed_report(self._partner, item, self._namespace, 70 + part)
                for part, item in enumerate(enrolled)
            ]
        await self._publisher.put(records)
        self.pathway_sent += 1

    def check(self) -> None:
        """Raise what made a pathway learner give up, if anything did."""
        if self.failures:
            raise self.failures[0]

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
