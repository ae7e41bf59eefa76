#!/usr/bin/env python3
"""Fault injection: N partner completions through the whole pipeline while its parts are killed.

    make faults                                           # the full form: 100,000 completions
    python scripts/faults.py --completions N --seed S     # any size; the seed fixes the fault plan

What it does, in an environment of its own (databases `faults_<service>`, dropped and created
afresh; topic prefix `faults-<run>.`; free HTTP ports), on the project's Kafka and PostgreSQL:

1. starts enrollment, issuance and notifications as processes, a mail sink that journals every
   email it accepts to a file (so that killing it loses no evidence), and an in-process webhook
   receiver; auth is a `DevIssuer` whose keys the services read from a JWKS file;
2. registers a partner, publishes a free course it delivers (`CoursePublished`), subscribes the
   receiver to `CredentialIssued`, and enrolls N learners through the API;
3. publishes N signed completion reports with a plain aiokafka producer (docs/partners.md) and,
   at seeded random points of the flow, SIGKILLs and restarts each service and the mail sink,
   SIGKILLs and restarts the Kafka broker, and restarts PostgreSQL, timing each recovery;
4. waits for the pipeline to drain (giving up, with a diagnosis, when nothing moves for
   `--stall-timeout` seconds) and checks, from the services' databases, the mail journal, the
   receiver and the dead-letter topics, that every completion became exactly one credential, one
   in-app notification, one email and one webhook, that no outbox holds an unpublished event and
   that every dead letter carries its reason.

The figures are printed and written to `tests/faults/results/latest.txt`. `run(Config(...))` is
what `tests/faults/test_faults.py` calls for the shortened form.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import fcntl
import functools
import hashlib
import hmac
import json
import logging
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import uvicorn
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiosmtpd.smtp import SMTP, Envelope, Session
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

sys.path.insert(0, str(Path(__file__).resolve().parent))
import infra
from dev_issuer import DevIssuer

from issuance import keys
from microcred_events import (
    CompletionReported,
    CoursePublished,
    CourseSnapshot,
    CredentialIssued,
    Money,
    Topic,
    encode,
    example_data,
)
from microcred_events.topics import partner_rejection_topic
from notifications.smtp_sink import Handler, MailStore, SinkSettings, create_app, smtp_server

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "tests" / "faults" / "results"
SERVICES = ("enrollment", "issuance", "notifications")
MAIL_SINK = "mail-sink"
KAFKA = "kafka"
POSTGRES = "postgres"
TARGETS = (*SERVICES, MAIL_SINK, KAFKA, POSTGRES)
ISSUER = "https://issuer.faults.test"
HOST = "127.0.0.1"
CREDENTIAL_IN_TEXT = re.compile(
    r"/credentials/([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})"
)
# Variables the services or the sink read: a developer's shell must not leak into our environment.
_SETTING_PREFIXES = (
    "AUTH_", "KAFKA_", "DATABASE_URL", "HTTP_", "SMTP_", "SINK_", "OUTBOX_", "CONSUMER_", "DELIVERY_",
    "WEBHOOK_", "EMAIL_", "ISSUER_", "PUBLIC_BASE_URL", "DB_POOL_", "OTEL_", "LOG_LEVEL", "VERIFY_",
    "SHUTDOWN_",
)  # fmt: skip
_DB_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)
_PUBLISH_CHUNK = 500


class FaultRunError(RuntimeError):
    """The run could not go on (a process that does not come back, a pipeline that stopped)."""


# --------------------------------------------------------------------------------------------------
# Configuration and result
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    completions: int = 1000
    seed: int = 1
    # Faults per target: each round kills every target once, in a seeded order.
    rounds: int = 1
    # How far the publisher may run ahead of the next fault's trigger point. Small values keep
    # work flowing across every fault of a short run; the full form publishes in large bursts.
    lead: int | None = None
    # Enrollment requests in flight. Measured on a 2-core machine with everything co-located:
    # 8 or 16 give ~90 learners/s, 32 gives 75/s and 64 gives 56/s (one service process, a pool
    # of 10 connections: beyond a few requests in flight they only queue and contend).
    concurrency: int = 8
    stall_timeout: float = 300.0
    ready_timeout: float = 180.0
    # Each fault keeps its target down for a seeded random time up to this, before the restart.
    max_downtime: float = 3.0
    poll_interval: float = 1.0
    workdir: Path | None = None
    report: Path | None = RESULTS / "latest.txt"
    keep_topics: bool = False

    @property
    def effective_lead(self) -> int:
        return self.lead if self.lead is not None else max(10, self.completions // 10)


@dataclass
class FaultRecord:
    target: str
    at: float  # seconds since the first completion was published
    credentials_at: int
    downtime: float  # how long the target was kept down before the restart
    ready_after: float | None = None  # kill -> restarted and every process ready again
    moving_after: float | None = None  # kill -> the stage's counter grew again, after ready
    stage: str = ""
    note: str = ""

    def describe(self) -> str:
        action = {KAFKA: "SIGKILL broker", POSTGRES: "restart PostgreSQL"}.get(self.target)
        what = action or f"SIGKILL {self.target}"
        ready = f"{self.ready_after:.1f}s" if self.ready_after is not None else "never"
        if self.moving_after is not None:
            moving = f"{self.stage} moving again after {self.moving_after:.1f}s"
        else:
            moving = self.note or f"{self.stage} did not move again"
        return (
            f"+{self.at:7.1f}s  {what:<26} at {self.credentials_at:>7} credentials, "
            f"down {self.downtime:.1f}s: ready after {ready}, {moving}"
        )


@dataclass
class Result:
    completions: int
    seed: int
    prefix: str
    sent: int = 0
    issued: int = 0  # distinct enrollments of ours with a credential
    credential_rows: int = 0
    duplicates: int = 0  # credentials beyond one per enrollment
    lost: int = 0  # completions without a credential
    strangers: int = 0  # credentials for enrollments we did not complete
    in_app_unique: int = 0
    in_app_rows: int = 0
    emails_unique: int = 0  # credentials with an email
    emails_messages: int = 0  # distinct Message-IDs of credential emails
    emails_received: int = 0  # credential emails the sink accepted, redeliveries included
    emails_misaddressed: int = 0  # credentials whose email went to someone else than their learner
    other_emails: int = 0  # distinct Message-IDs of the other emails
    other_emails_received: int = 0
    webhooks_unique: int = 0
    webhooks_ids: int = 0  # distinct webhook-ids
    webhooks_received: int = 0
    bad_signatures: int = 0
    dead_lettered: int = 0
    dead_letters_without_reason: int = 0
    dead_letter_reasons: dict[str, int] = field(default_factory=dict)
    rejections: dict[str, int] = field(default_factory=dict)
    outbox_backlog: dict[str, int] = field(default_factory=dict)
    deliveries: dict[str, int] = field(default_factory=dict)  # "channel/state" -> count
    faults: list[FaultRecord] = field(default_factory=list)
    incidents: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    enroll_rate: float = 0.0
    diagnosis: str = ""

    @property
    def email_duplicates(self) -> int:
        return self.emails_messages - self.emails_unique

    @property
    def webhook_duplicates(self) -> int:
        return self.webhooks_ids - self.webhooks_unique

    @property
    def lost_notifications(self) -> dict[str, int]:
        return {
            "in-app": self.issued - self.in_app_unique,
            "email": self.issued - self.emails_unique,
            "webhook": self.issued - self.webhooks_unique,
        }

    @property
    def failures(self) -> list[str]:
        """What broke the promise; empty when nothing was lost or doubled."""
        problems = []
        if self.diagnosis:
            problems.append("the pipeline did not drain")
        if self.sent != self.completions:
            problems.append(f"only {self.sent} of {self.completions} completions acknowledged by Kafka")
        if self.lost or self.duplicates or self.strangers:
            problems.append(
                f"credentials: {self.lost} lost, {self.duplicates} doubled, {self.strangers} unexpected"
            )
        if self.in_app_rows != self.in_app_unique or self.in_app_unique != self.issued:
            problems.append(f"in-app: {self.in_app_unique} unique, {self.in_app_rows} rows")
        if self.email_duplicates or self.emails_unique != self.issued or self.emails_misaddressed:
            problems.append(
                f"emails: {self.emails_unique} unique, {self.email_duplicates} doubled, "
                f"{self.emails_misaddressed} misaddressed"
            )
        if self.webhook_duplicates or self.webhooks_unique != self.issued or self.bad_signatures:
            problems.append(
                f"webhooks: {self.webhooks_unique} unique, {self.webhook_duplicates} doubled, "
                f"{self.bad_signatures} badly signed"
            )
        if any(backlog != 0 for backlog in self.outbox_backlog.values()):
            problems.append(f"outbox backlog {self.outbox_backlog}")
        if self.dead_letters_without_reason:
            problems.append(f"{self.dead_letters_without_reason} dead letters without a reason")
        return problems

    @property
    def ok(self) -> bool:
        return not self.failures

    def render(self) -> str:
        backlog = ", ".join(f"{name} {count}" for name, count in self.outbox_backlog.items())
        reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(self.dead_letter_reasons.items()))
        rejections = ", ".join(f"{reason} {count}" for reason, count in sorted(self.rejections.items()))
        deliveries = ", ".join(f"{key} {count}" for key, count in sorted(self.deliveries.items()))
        lines = [
            f"microcred fault injection: {self.completions} completions, seed {self.seed}, "
            f"topic prefix {self.prefix}",
            f"  sent           {self.sent:>8}  completions acknowledged by Kafka",
            f"  issued         {self.issued:>8}  credentials ({self.credential_rows} rows)",
            f"  duplicates     {self.duplicates:>8}",
            f"  lost           {self.lost:>8}  (notifications lost: "
            + ", ".join(f"{channel} {count}" for channel, count in self.lost_notifications.items())
            + ")",
            f"  dead-lettered  {self.dead_lettered:>8}  "
            f"({self.dead_letters_without_reason} without a reason{'; ' + reasons if reasons else ''})",
            f"  rejected       {sum(self.rejections.values()):>8}  on the partner's rejection topic"
            + (f" ({rejections})" if rejections else ""),
            f"  in-app         {self.in_app_unique:>8}  unique / {self.in_app_rows} rows",
            f"  emails         {self.emails_unique:>8}  unique / {self.emails_messages} Message-IDs / "
            f"{self.emails_received} received, {self.emails_misaddressed} misaddressed "
            f"(and {self.other_emails} enrollment emails, {self.other_emails_received} received)",
            f"  webhooks       {self.webhooks_unique:>8}  unique / {self.webhooks_ids} webhook-ids / "
            f"{self.webhooks_received} received, {self.bad_signatures} badly signed",
            f"  outbox backlog  {backlog}",
            f"  deliveries      {deliveries}",
            "faults (time since the first completion was published; recovery: until the stage's counter "
            "grew again after everything was ready):",
            *(f"  {fault.describe()}" for fault in self.faults),
        ]
        if self.incidents:
            lines += ["incidents:", *(f"  {incident}" for incident in self.incidents)]
        timings = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in self.timings.items())
        lines.append(f"timings: {timings}; enrolled {self.enroll_rate:.0f} learners/s")
        lines.append("result: PASS" if self.ok else "result: FAIL: " + "; ".join(self.failures))
        if self.diagnosis:
            lines += ["diagnosis:", self.diagnosis]
        return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------------


@dataclass
class Process:
    """A child process the run starts, kills and restarts; its output is appended to `log`."""

    name: str
    argv: list[str]
    env: dict[str, str]
    ready_url: str
    log: Path
    popen: subprocess.Popen[bytes] | None = None
    # Set while a fault holds it down, so the supervisor does not count it as a crash.
    held_down: bool = False

    def start(self) -> None:
        with self.log.open("ab") as log:
            log.write(f"\n=== faults.py: starting {self.name} at {datetime.now(UTC).isoformat()}\n".encode())
            # Its own session: a Ctrl-C at the terminal reaches the runner, which stops it cleanly.
            self.popen = subprocess.Popen(  # noqa: S603  (our interpreter, our modules)
                self.argv,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def exited(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def kill(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(timeout=30)

    def stop(self, timeout: float = 30.0) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _with_database(url: str, database: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{database}"))


def _clean_environment() -> dict[str, str]:
    return {name: value for name, value in os.environ.items() if not name.startswith(_SETTING_PREFIXES)}


# --------------------------------------------------------------------------------------------------
# The durable mail sink (`faults.py mail-sink`, a process of its own)
# --------------------------------------------------------------------------------------------------


class JournalingHandler(Handler):
    """The local sink's handler, plus one line per accepted email in an append-only journal.

    The stock sink keeps emails in memory, so a SIGKILL would erase the very evidence the run
    counts. The line is written before the 250 reply: an email killed between the two is sent
    again under the same Message-ID, which the count tells apart from a second email.
    """

    def __init__(self, store: MailStore, journal: Path) -> None:
        super().__init__(store)
        self._journal = os.open(journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:  # noqa: N802
        message = BytesParser(policy=policy.default).parsebytes(envelope.original_content or b"")
        assert isinstance(message, EmailMessage)  # what policy.default makes
        body = message.get_body(preferencelist=("plain",))
        found = CREDENTIAL_IN_TEXT.search(str(body.get_content())) if body is not None else None
        line = {
            "message_id": str(message.get("Message-ID", "")),
            "to": list(envelope.rcpt_tos),
            "subject": str(message.get("Subject", "")),
            "credential_id": found.group(1) if found else None,
        }
        # One write(2) on an O_APPEND descriptor: the kernel has the line once it returns, even
        # if this process is killed the next instant.
        os.write(self._journal, (json.dumps(line) + "\n").encode())
        return await super().handle_DATA(server, session, envelope)


class _QuietServer(uvicorn.Server):
    """uvicorn without its signal handlers: the runner owns SIGINT/SIGTERM (Ctrl-C must reach its
    cleanup, which stops the processes it started)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve_mail_sink(journal: Path) -> None:
    settings = SinkSettings()
    store = MailStore(settings.max_messages)
    async with smtp_server(JournalingHandler(store, journal), settings.host, settings.smtp_port):
        config = uvicorn.Config(
            create_app(store), host=settings.host, port=settings.http_port, log_level="warning"
        )
        await uvicorn.Server(config).serve()


@dataclass
class MailJournal:
    """Reads the sink's journal as it grows: credential emails by credential id and Message-ID."""

    path: Path
    by_credential: dict[str, collections.Counter[str]] = field(default_factory=dict)
    recipients: dict[str, set[str]] = field(default_factory=dict)
    # The other emails (enrollment created, activated) by Message-ID.
    others: collections.Counter[str] = field(default_factory=collections.Counter)
    received: int = 0
    _offset: int = 0

    def refresh(self) -> None:
        try:
            with self.path.open("rb") as journal:
                journal.seek(self._offset)
                chunk = journal.read()
        except FileNotFoundError:
            return
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a line being written is read next time
        self._offset += len(complete)
        for raw in complete.splitlines():
            line = json.loads(raw)
            self.received += 1
            if line["credential_id"] is None:
                self.others[line["message_id"]] += 1
            else:
                credential_id = line["credential_id"]
                self.by_credential.setdefault(credential_id, collections.Counter())[line["message_id"]] += 1
                self.recipients.setdefault(credential_id, set()).update(line["to"])


# --------------------------------------------------------------------------------------------------
# The webhook receiver (in the runner's process)
# --------------------------------------------------------------------------------------------------


@dataclass
class WebhookReceiver:
    """Records every delivery by credential id and `webhook-id`; refuses a bad signature (401)."""

    secret: str | None = None
    by_credential: dict[str, collections.Counter[str]] = field(default_factory=dict)
    received: int = 0
    bad_signatures: int = 0

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/hook", self._hook, methods=["POST"])])

    async def _hook(self, request: Request) -> Response:
        body = await request.body()
        webhook_id = request.headers.get("webhook-id", "")
        if not self._signed(webhook_id, request.headers.get("webhook-timestamp", ""), body, request):
            self.bad_signatures += 1
            return Response(status_code=401)
        credential_id = str(json.loads(body)["data"]["credential_id"])
        self.by_credential.setdefault(credential_id, collections.Counter())[webhook_id] += 1
        self.received += 1
        return Response(status_code=204)

    def _signed(self, webhook_id: str, timestamp: str, body: bytes, request: Request) -> bool:
        if self.secret is None:
            return False
        key = base64.b64decode(self.secret.removeprefix("whsec_"))
        digest = hmac.new(key, f"{webhook_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
        expected = "v1," + base64.b64encode(digest).decode()
        offered = request.headers.get("webhook-signature", "").split()
        return any(hmac.compare_digest(expected, signature) for signature in offered)


@contextlib.asynccontextmanager
async def serving(app: Starlette, port: int) -> AsyncIterator[None]:
    server = _QuietServer(
        uvicorn.Config(app, host=HOST, port=port, log_level="warning", access_log=False, lifespan="off")
    )
    task = asyncio.create_task(server.serve(), name="webhook-receiver")
    while not server.started:
        if task.done():
            task.result()  # raises why it could not start
        await asyncio.sleep(0.05)
    try:
        yield
    finally:
        server.should_exit = True
        await task


# --------------------------------------------------------------------------------------------------
# Watching the pipeline
# --------------------------------------------------------------------------------------------------


class Database:
    """One connection to a service's database that survives PostgreSQL restarts."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._conn: asyncpg.Connection | None = None

    async def fetchrow(self, query: str, *args: Any) -> asyncpg.Record | None:
        """The row, or None while the database cannot be reached."""
        try:
            if self._conn is None or self._conn.is_closed():
                self._conn = await asyncpg.connect(self.dsn, timeout=5)
            return await self._conn.fetchrow(query, *args, timeout=30)
        except _DB_ERRORS:
            if self._conn is not None:
                self._conn.terminate()
                self._conn = None
            return None

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        """For the final checks: PostgreSQL is up by then, and an error must not pass silently.

        On a connection of its own: the monitor's may be mid-query (a second operation on it
        fails, and the monitor's recovery from that closes it under this one).
        """
        conn = await asyncpg.connect(self.dsn, timeout=10)
        try:
            return await conn.fetch(query, *args, timeout=600)
        finally:
            await conn.close(timeout=5)

    async def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(*_DB_ERRORS):
                await self._conn.close(timeout=5)


@dataclass(frozen=True)
class Counts:
    """Where the flow stands; every field only grows, except the backlogs."""

    sent: int = 0
    completed: int = 0  # enrollments completed (enrollment)
    credentials: int = 0  # credential rows (issuance)
    relayed: int = 0  # issuance outbox rows Kafka acknowledged
    in_app: int = 0  # in-app CredentialIssued notifications (notifications)
    notified: int = 0  # in-app notifications of any kind (notifications)
    emails: int = 0  # credentials with an email in the sink
    mails: int = 0  # emails of any kind the sink accepted
    webhooks: int = 0  # credentials the receiver was told of
    backlog: int = 0  # unpublished outbox rows, all services
    open_deliveries: int = 0  # emails and webhooks neither delivered nor dead

    def line(self) -> str:
        return (
            f"sent {self.sent} completed {self.completed} credentials {self.credentials} "
            f"relayed {self.relayed} in-app {self.in_app}/{self.notified} emails {self.emails}/{self.mails} "
            f"webhooks {self.webhooks} "
            f"outbox-backlog {self.backlog} open-deliveries {self.open_deliveries}"
        )


class Stalled(FaultRunError):
    pass


class Monitor:
    """Samples the counters every `interval`; waits on conditions, failing when nothing moves."""

    def __init__(
        self,
        databases: dict[str, Database],
        journal: MailJournal,
        receiver: WebhookReceiver,
        sent: Callable[[], int],
        interval: float,
    ) -> None:
        self._databases = databases
        self._journal = journal
        self._receiver = receiver
        self._sent = sent
        self._interval = interval
        self.counts = Counts()
        # False while a database does not answer: its figures are then the last ones it gave.
        self.complete = False
        self.moved_at = time.monotonic()
        self._tick = asyncio.Event()
        self._last_print = 0.0
        # The loop and a fault sample side by side; one asyncpg connection takes one query at a time.
        self._sampling = asyncio.Lock()

    async def run(self, supervise: Callable[[], None]) -> None:
        while True:
            supervise()
            await self.sample()
            now = time.monotonic()
            if now - self._last_print >= 15:
                self._last_print = now
                _say(f"  {self.counts.line()}")
            await asyncio.sleep(self._interval)

    async def sample(self) -> Counts:
        async with self._sampling:
            return await self._sample()

    async def fresh(self) -> Counts:
        """A sample every database answered (after a PostgreSQL restart, the first may not)."""
        while True:
            counts = await self.sample()
            if self.complete:
                return counts
            await asyncio.sleep(0.1)

    async def _sample(self) -> Counts:
        previous = self.counts
        enrollment, issuance, notifications = await asyncio.gather(
            self._databases["enrollment"].fetchrow(
                "SELECT (SELECT count(*) FROM enrollments WHERE status = 'completed') AS completed,"
                " (SELECT count(*) FROM outbox WHERE published_at IS NULL) AS backlog"
            ),
            self._databases["issuance"].fetchrow(
                "SELECT (SELECT count(*) FROM credentials) AS credentials,"
                " (SELECT count(*) FROM outbox WHERE published_at IS NOT NULL) AS relayed,"
                " (SELECT count(*) FROM outbox WHERE published_at IS NULL) AS backlog"
            ),
            self._databases["notifications"].fetchrow(
                "SELECT (SELECT count(*) FROM notifications WHERE kind = 'credential.issued') AS in_app,"
                " (SELECT count(*) FROM notifications) AS notified,"
                " (SELECT count(*) FROM deliveries"
                "   WHERE state IN ('pending', 'sending', 'awaiting_address')) AS open,"
                " (SELECT count(*) FROM outbox WHERE published_at IS NULL) AS backlog"
            ),
        )
        self._journal.refresh()
        self.complete = bool(enrollment and issuance and notifications)
        # A database that does not answer (PostgreSQL restarting) keeps its last figures.
        self.counts = Counts(
            sent=self._sent(),
            completed=enrollment["completed"] if enrollment else previous.completed,
            credentials=issuance["credentials"] if issuance else previous.credentials,
            relayed=issuance["relayed"] if issuance else previous.relayed,
            in_app=notifications["in_app"] if notifications else previous.in_app,
            notified=notifications["notified"] if notifications else previous.notified,
            emails=len(self._journal.by_credential),
            mails=self._journal.received,
            webhooks=len(self._receiver.by_credential),
            backlog=(
                (enrollment["backlog"] if enrollment else 0)
                + (issuance["backlog"] if issuance else 0)
                + (notifications["backlog"] if notifications else 0)
                if enrollment and issuance and notifications
                else previous.backlog
            ),
            open_deliveries=notifications["open"] if notifications else previous.open_deliveries,
        )
        if self.counts != previous:
            self.moved_at = time.monotonic()
        self._tick.set()
        self._tick = asyncio.Event()
        return self.counts

    async def until(self, what: str, done: Callable[[Counts], bool], stall_timeout: float) -> Counts:
        """Wait until `done(counts)`; raise Stalled when no counter moved for `stall_timeout`."""
        while not done(self.counts):
            if time.monotonic() - self.moved_at > stall_timeout:
                raise Stalled(
                    f"nothing moved for {stall_timeout:.0f}s waiting for {what}: {self.counts.line()}"
                )
            await self._tick.wait()
        return self.counts


# --------------------------------------------------------------------------------------------------
# The partner's side: signed completion reports on Kafka
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Enrolled:
    enrollment_id: str
    learner_id: str


class Publisher:
    """Publishes report i for enrollment i, in order, up to what `allow` lets it; retries until
    Kafka has acknowledged every one (a resend keeps its `ce_id`, so it is a duplicate at worst)."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        partner_id: str,
        secret: str,
        course_id: str,
        enrolled: Sequence[Enrolled],
        namespace: uuid.UUID,
    ) -> None:
        self._bootstrap = bootstrap
        self._topic = topic
        self._partner_id = partner_id
        self._secret = secret
        self._course_id = course_id
        self._enrolled = enrolled
        self._namespace = namespace
        self._allowed = 0
        self._more = asyncio.Event()
        self.acknowledged = 0
        self.started_at: float | None = None
        self.failed_sends = 0

    def allow(self, upto: int) -> None:
        self._allowed = max(self._allowed, min(upto, len(self._enrolled)))
        self._more.set()

    async def run(self) -> None:
        producer: Any = None
        following = 0
        try:
            while following < len(self._enrolled):
                if following >= self._allowed:
                    self._more.clear()
                    await self._more.wait()
                    continue
                if self.started_at is None:
                    self.started_at = time.monotonic()
                chunk = range(following, min(self._allowed, following + _PUBLISH_CHUNK))
                pending = [self._record(index) for index in chunk]
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
                following = chunk.stop
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
                _say(f"  publisher: Kafka unreachable ({type(exc).__name__}), retrying")
                with contextlib.suppress(Exception):
                    await producer.stop()
                await asyncio.sleep(1.0)
                continue
            return producer

    async def _send(
        self, producer: Any, records: list[tuple[bytes, bytes, list[tuple[str, bytes]]]]
    ) -> list[tuple[bytes, bytes, list[tuple[str, bytes]]]]:
        """Sends the records; returns those Kafka did not acknowledge."""
        futures = []
        try:
            for key, value, headers in records:
                futures.append(await producer.send(self._topic, value, key=key, headers=headers))
        except Exception as exc:
            _say(f"  publisher: send refused ({type(exc).__name__}: {exc}), will resend")
        results = await asyncio.gather(*futures, return_exceptions=True)
        acknowledged = sum(1 for outcome in results if not isinstance(outcome, BaseException))
        self.acknowledged += acknowledged
        unsent = records[len(futures) :]
        failed = [
            record
            for record, outcome in zip(records[: len(futures)], results, strict=True)
            if isinstance(outcome, BaseException)
        ]
        self.failed_sends += len(failed) + len(unsent)
        return failed + unsent

    def _record(self, index: int) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
        """The report for enrollment `index`, signed as docs/partners.md says."""
        enrolled = self._enrolled[index]
        report_id = str(uuid.uuid5(self._namespace, f"report-{index}"))
        now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        report = {
            "report_id": report_id,
            "partner_id": self._partner_id,
            "course_id": self._course_id,
            "learner_id": enrolled.learner_id,
            "enrollment_id": enrolled.enrollment_id,
            "completed_at": now,
            "score": 50 + index % 51,
        }
        body = json.dumps(report).encode()
        message_id = str(uuid.uuid5(self._namespace, f"message-{index}"))
        content = f"{message_id}.{now}.".encode() + body
        signature = hmac.new(self._secret.encode(), content, hashlib.sha256).digest()
        headers = [
            ("ce_specversion", b"1.0"),
            ("ce_id", message_id.encode()),
            ("ce_type", CompletionReported.TYPE.encode()),
            ("ce_source", f"urn:microcred:partner:{self._partner_id}".encode()),
            ("ce_time", now.encode()),
            ("ce_subject", report_id.encode()),
            ("content-type", b"application/json"),
            ("ce_signature", b"v1," + base64.b64encode(signature)),
        ]
        return report_id.encode(), body, headers


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Environment:
    """What one run owns: databases, topic prefix, processes, keys and the receiver."""

    config: Config
    endpoints: infra.Endpoints
    run_id: str
    workdir: Path
    processes: dict[str, Process]
    database_urls: dict[str, str]
    issuer: DevIssuer
    receiver: WebhookReceiver
    receiver_port: int
    journal: MailJournal

    @property
    def prefix(self) -> str:
        return f"faults-{self.run_id}."

    def url(self, service: str) -> str:
        return self.processes[service].ready_url.removesuffix("/health/ready")

    def bearer(self, subject: str, role: str, *, email: str, name: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.issuer.token(subject, [role], email=email, name=name)}"}


async def _recreate_databases(postgres_url: str) -> dict[str, str]:
    admin = await asyncpg.connect(postgres_url)
    try:
        urls = {}
        for service in SERVICES:
            name = f"faults_{service}"
            # FORCE: a process of an earlier, interrupted run may still hold a connection.
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await admin.execute(f'CREATE DATABASE "{name}"')
            urls[service] = _with_database(postgres_url, name)
        return urls
    finally:
        await admin.close()


def _prepare(config: Config, endpoints: infra.Endpoints, database_urls: dict[str, str]) -> Environment:
    run_id = uuid.uuid4().hex[:8]
    workdir = config.workdir or RESULTS / "runs" / run_id
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    issuer = DevIssuer(workdir / "issuer", issuer=ISSUER, audience="microcred")
    jwks = workdir / "jwks.json"
    jwks.write_text(json.dumps(issuer.jwks()))
    keys_dir = workdir / "issuer-keys"
    if not any(keys_dir.glob("*.pem")):
        keys.generate_key(keys_dir)
    ports = {name: _free_port() for name in (*SERVICES, "smtp", "sink-http", "receiver")}
    prefix = f"faults-{run_id}."
    base = _clean_environment()
    common = {
        "KAFKA_BOOTSTRAP_SERVERS": endpoints.kafka_bootstrap,
        "KAFKA_TOPIC_PREFIX": prefix,
        "HTTP_HOST": HOST,
        "AUTH_ISSUER": ISSUER,
        "AUTH_JWKS_FILE": str(jwks),
        "LOG_LEVEL": "INFO",
        "OUTBOX_POLL_INTERVAL_SECONDS": "0.5",
        "SHUTDOWN_GRACE_SECONDS": "5",
        # Production's sampling (deploy/k8s/overlays/prod); unsampled spans still carry trace ids.
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0.1",
    }
    own: dict[str, dict[str, str]] = {
        "enrollment": {},
        "issuance": {
            "ISSUER_KEYS_DIR": str(keys_dir),
            "PUBLIC_BASE_URL": f"http://{HOST}:{ports['issuance']}",
        },
        "notifications": {
            "SMTP_HOST": HOST,
            "SMTP_PORT": str(ports["smtp"]),
            # Shorter than the defaults (5 s doubling to an hour) so that a short run drains in
            # minutes; eight attempts still outlast any outage this run causes.
            "DELIVERY_RETRY_BASE_SECONDS": "1",
            "DELIVERY_RETRY_CAP_SECONDS": "30",
            "DELIVERY_POLL_INTERVAL_SECONDS": "2",
            "DELIVERY_DRAIN_SECONDS": "3",
        },
    }
    processes = {
        service: Process(
            service,
            [sys.executable, "-m", service],
            {
                **base,
                **common,
                **own[service],
                "DATABASE_URL": database_urls[service],
                "HTTP_PORT": str(ports[service]),
            },
            f"http://{HOST}:{ports[service]}/health/ready",
            workdir / "logs" / f"{service}.log",
        )
        for service in SERVICES
    }
    journal = workdir / "mail.jsonl"
    journal.unlink(missing_ok=True)
    processes[MAIL_SINK] = Process(
        MAIL_SINK,
        [sys.executable, str(Path(__file__).resolve()), "mail-sink", str(journal)],
        {
            **base,
            "SINK_HOST": HOST,
            "SINK_SMTP_PORT": str(ports["smtp"]),
            "SINK_HTTP_PORT": str(ports["sink-http"]),
        },
        f"http://{HOST}:{ports['sink-http']}/health/live",
        workdir / "logs" / f"{MAIL_SINK}.log",
    )
    return Environment(
        config=config,
        endpoints=endpoints,
        run_id=run_id,
        workdir=workdir,
        processes=processes,
        database_urls=database_urls,
        issuer=issuer,
        receiver=WebhookReceiver(),
        receiver_port=ports["receiver"],
        journal=MailJournal(journal),
    )


async def _wait_ready(env: Environment, within: float, names: Sequence[str] | None = None) -> None:
    """Poll each process's health URL until it answers 200; fail on an exit or the timeout."""

    async def one(http: httpx.AsyncClient, process: Process) -> None:
        deadline = time.monotonic() + within
        while True:
            if process.exited is not None:
                raise FaultRunError(
                    f"{process.name} exited with {process.exited}; last lines of {process.log}:\n"
                    f"{process.tail()}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get(process.ready_url)).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise FaultRunError(
                    f"{process.name} not ready after {within:.0f}s; last lines of {process.log}:\n"
                    f"{process.tail()}"
                )
            await asyncio.sleep(0.25)

    async with httpx.AsyncClient(timeout=5) as http:
        await asyncio.gather(*(one(http, env.processes[name]) for name in names or env.processes))


async def _register_partner(env: Environment, http: httpx.AsyncClient) -> tuple[str, str]:
    response = await http.post(
        f"{env.url('enrollment')}/partners",
        json={
            "display_name": "Faultline Institute",
            "course_ids": [],
            "credentials": [{"kind": "hmac_sha256"}],
        },
        headers=env.bearer("faults-admin", "admin", email="admin@example.org"),
    )
    response.raise_for_status()
    partner = response.json()
    return str(partner["partner_id"]), str(partner["secrets"][0]["secret"])


async def _publish_course(env: Environment, partner_id: str) -> str:
    """A free course the partner delivers, announced as the catalog would (its read models)."""
    course = CourseSnapshot.model_validate(
        {
            **example_data(CourseSnapshot),
            "course_id": str(uuid.uuid4()),
            "title": "Fault Tolerance Fundamentals",
            "version": 1,
            "price": Money(amount_minor=0, currency="USD").model_dump(),
            "delivery_partner_id": partner_id,
        }
    )
    record = encode(
        CoursePublished(course=course, published_at=datetime.now(UTC)), source="urn:microcred:catalog"
    )
    producer = AIOKafkaProducer(
        bootstrap_servers=env.endpoints.kafka_bootstrap, acks="all", enable_idempotence=True
    )
    await producer.start()
    try:
        await producer.send_and_wait(
            env.prefix + record.topic, record.value, key=record.key, headers=record.headers
        )
    finally:
        await producer.stop()
    return str(course.course_id)


async def _subscribe_receiver(env: Environment, http: httpx.AsyncClient) -> None:
    response = await http.post(
        f"{env.url('notifications')}/webhooks/subscriptions",
        json={"url": f"http://{HOST}:{env.receiver_port}/hook", "event_types": [CredentialIssued.TYPE]},
        headers=env.bearer("faults-staff", "staff", email="staff@example.org"),
    )
    response.raise_for_status()
    env.receiver.secret = response.json()["secret"]


async def _enroll(env: Environment, course_id: str, count: int) -> list[Enrolled]:
    """Enroll `count` learners, each with a token of their own, `concurrency` requests at a time.

    There is no bulk endpoint, and the API is what learners use: bounded concurrency keeps the
    service busy without piling up requests that would only time out. A retry reuses the
    Idempotency-Key, so it can never enroll anyone twice.
    """
    enrolled: list[Enrolled | None] = [None] * count
    url = f"{env.url('enrollment')}/enrollments"
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(count):
        queue.put_nowait(index)
    started = time.monotonic()
    done = 0

    async def one(http: httpx.AsyncClient, index: int) -> Enrolled:
        subject = f"faults-{env.run_id}-learner-{index}"
        headers = {
            **env.bearer(subject, "learner", email=f"{subject}@example.org", name=f"Learner {index}"),
            "Idempotency-Key": f"{env.run_id}-{index}",
        }
        deadline = time.monotonic() + env.config.ready_timeout
        while True:
            try:
                response = await http.post(url, json={"course_id": course_id}, headers=headers)
            except httpx.TransportError:
                response = None
            if response is not None and response.status_code == 201:
                body = response.json()
                return Enrolled(str(body["enrollment_id"]), str(body["learner"]["learner_id"]))
            # 422 course-not-found: the CoursePublished event has not reached enrollment yet.
            retryable = response is None or response.status_code >= 500 or response.status_code == 422
            if not retryable or time.monotonic() > deadline:
                detail = response.text if response is not None else "no answer"
                raise FaultRunError(f"enrolling learner {index} failed: {detail}")
            await asyncio.sleep(0.2)

    async def worker(http: httpx.AsyncClient) -> None:
        nonlocal done
        while not queue.empty():
            index = queue.get_nowait()
            enrolled[index] = await one(http, index)
            done += 1
            if done % 5000 == 0:
                _say(f"  enrolled {done} of {count} ({done / (time.monotonic() - started):.0f}/s)")

    limits = httpx.Limits(max_connections=env.config.concurrency)
    async with httpx.AsyncClient(timeout=30, limits=limits) as http:
        # The first one alone: it waits until enrollment knows the course.
        enrolled[queue.get_nowait()] = await one(http, 0)
        done = 1
        await asyncio.gather(*(worker(http) for _ in range(env.config.concurrency)))
    return [item for item in enrolled if item is not None]


def _thresholds(rng: random.Random, faults: int, completions: int) -> list[int]:
    """Credential counts at which the faults fire: one in each of `faults` equal strata of the
    middle of the run, so they are spread out yet at unpredictable moments."""
    if faults == 0:
        return []
    low, high = 0.05 * completions, 0.8 * completions
    width = (high - low) / faults
    return [max(1, int(low + width * (index + rng.random()))) for index in range(faults)]


def _credentials_reached(threshold: int, counts: Counts) -> bool:
    return counts.credentials >= threshold


@dataclass(frozen=True)
class Stage:
    """The counter that shows a target's part of the pipeline moving, and when it has nothing left.

    Notifications and the sink are judged on everything they handle, not only on credentials:
    they work through the learners' enrollment notices too, which come first.
    """

    counter: str
    finished: Callable[[Counts, int], bool]


_CREDENTIALS = Stage("credentials", lambda counts, n: counts.credentials >= n)
_STAGES: dict[str, Stage] = {
    "enrollment": _CREDENTIALS,
    "issuance": _CREDENTIALS,
    KAFKA: _CREDENTIALS,
    POSTGRES: _CREDENTIALS,
    "notifications": Stage("notified", lambda counts, n: counts.in_app >= n),
    MAIL_SINK: Stage("mails", lambda counts, n: counts.emails >= n and counts.open_deliveries == 0),
}


class Run:
    """The faults and the supervision of the processes, while the completions flow."""

    def __init__(self, env: Environment, result: Result, monitor: Monitor, publisher: Publisher) -> None:
        self.env = env
        self.config = env.config
        self.result = result
        self.monitor = monitor
        self.publisher = publisher

    def supervise(self) -> None:
        """Like an orchestrator: a process that died on its own is restarted, and reported."""
        for process in self.env.processes.values():
            code = process.exited
            if code is not None and not process.held_down:
                incident = (
                    f"{process.name} exited on its own with {code}; restarted. Last lines:\n{process.tail()}"
                )
                _say(f"  INCIDENT: {incident}")
                self.result.incidents.append(incident)
                process.start()

    async def inject(self, target: str, rng: random.Random, release: Callable[[], None]) -> FaultRecord:
        """Kill `target`, keep it down a while, bring it back; `release` lets more work flow meanwhile.

        Recovery is timed from the kill to the first growth of the target's stage counter sampled
        after every process answered ready again: growth from work already in memory before the
        fault (a consumer's prefetched batch) is not taken for recovery.
        """
        assert self.publisher.started_at is not None  # the first fault comes after some credentials
        counts = await self.monitor.fresh()
        stage = _STAGES[target]
        record = FaultRecord(
            target=target,
            at=time.monotonic() - self.publisher.started_at,
            credentials_at=counts.credentials,
            downtime=round(rng.uniform(0, self.config.max_downtime), 1),
            stage=stage.counter,
        )
        _say(f"fault: {target} at {record.credentials_at} credentials, down for {record.downtime}s")
        killed = time.monotonic()
        if target in self.env.processes:
            process = self.env.processes[target]
            process.held_down = True
            process.kill()
            release()
            await asyncio.sleep(record.downtime)  # the outage itself
            process.start()
            process.held_down = False
        elif target == KAFKA:
            pid = await asyncio.to_thread(_kill_broker)
            release()
            await asyncio.sleep(record.downtime)
            _say(f"  broker (pid {pid}) killed; starting it again")
            await asyncio.to_thread(infra.ensure_up, kafka=True, postgres=False)
        else:
            await asyncio.to_thread(infra.ensure_down, kafka=False, postgres=True)
            release()
            await asyncio.sleep(record.downtime)
            await asyncio.to_thread(infra.ensure_up, kafka=False, postgres=True)
        await _wait_ready(self.env, self.config.ready_timeout)
        record.ready_after = time.monotonic() - killed
        before = getattr(await self.monitor.fresh(), stage.counter)
        completions = self.config.completions

        def moved(counts: Counts) -> bool:
            # Or nothing left to move: a pipeline fast enough to finish all that was published
            # before the fault would otherwise wait here for work the plan releases only later.
            caught_up = stage.finished(counts, min(completions, counts.sent))
            return bool(getattr(counts, stage.counter) > before or caught_up)

        after = await self.monitor.until(
            f"{stage.counter} to move after the {target} fault", moved, self.config.stall_timeout
        )
        if getattr(after, stage.counter) > before:
            record.moving_after = time.monotonic() - killed
        else:
            record.note = f"{stage.counter} had nothing left to do"
        _say(f"  {record.describe()}")
        return record


def _kill_broker() -> int:
    """SIGKILL this checkout's broker (the pid infra.py recorded) and wait until it is gone."""
    pid = int(infra.KAFKA_PID.read_text().strip())
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    if b"kafka.Kafka" not in cmdline:
        raise FaultRunError(f"pid {pid} in {infra.KAFKA_PID} is not this checkout's Kafka broker")
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
        except OSError:
            return pid
        if state == "Z":  # dead; its parent (init) reaps it
            return pid
        time.sleep(0.05)
    raise FaultRunError(f"the broker (pid {pid}) survived SIGKILL for 30s")


@contextlib.contextmanager
def _one_run_at_a_time() -> Iterator[None]:
    """Two runs on one checkout would drop each other's `faults_*` databases: the second refuses."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    with (RESULTS / ".lock").open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FaultRunError(f"another fault run is in progress (it holds {RESULTS / '.lock'})") from None
        yield


async def run(config: Config) -> Result:
    """The whole fault run; the infrastructure is up and healthy again when it returns."""
    with _one_run_at_a_time():
        return await _run_alone(config)


async def _run_alone(config: Config) -> Result:
    started = time.monotonic()
    endpoints = await asyncio.to_thread(infra.ensure_up)
    database_urls = await _recreate_databases(endpoints.postgres_url)
    env = _prepare(config, endpoints, database_urls)
    result = Result(completions=config.completions, seed=config.seed, prefix=env.prefix)
    _say(f"fault run {env.run_id}: {config.completions} completions, seed {config.seed}, in {env.workdir}")
    databases = {service: Database(url) for service, url in database_urls.items()}
    tasks: list[asyncio.Task[None]] = []
    try:
        async with serving(env.receiver.app(), env.receiver_port):
            await _run(env, result, databases, tasks, started)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for process in env.processes.values():
            process.held_down = True
        await asyncio.gather(*(asyncio.to_thread(process.stop) for process in env.processes.values()))
        for database in databases.values():
            await database.close()
        # Whatever happened above, leave Kafka and PostgreSQL running for whoever comes next.
        await asyncio.to_thread(infra.ensure_up)
        if not config.keep_topics:
            with contextlib.suppress(Exception):
                await _delete_topics(endpoints.kafka_bootstrap, env.prefix)
    result.timings["total"] = time.monotonic() - started
    return result


async def _run(
    env: Environment,
    result: Result,
    databases: dict[str, Database],
    tasks: list[asyncio.Task[None]],
    started: float,
) -> None:
    config = env.config
    for process in env.processes.values():
        process.start()
    await _wait_ready(env, config.ready_timeout)
    result.timings["start"] = time.monotonic() - started

    async with httpx.AsyncClient(timeout=30) as http:
        partner_id, secret = await _register_partner(env, http)
        course_id = await _publish_course(env, partner_id)
        await _subscribe_receiver(env, http)
    enrolling = time.monotonic()
    enrolled = await _enroll(env, course_id, config.completions)
    result.timings["enroll"] = time.monotonic() - enrolling
    result.enroll_rate = len(enrolled) / result.timings["enroll"]
    _say(f"enrolled {len(enrolled)} learners in {result.timings['enroll']:.1f}s ({result.enroll_rate:.0f}/s)")

    publisher = Publisher(
        env.endpoints.kafka_bootstrap,
        env.prefix + Topic.PARTNER_COMPLETION,
        partner_id,
        secret,
        course_id,
        enrolled,
        uuid.uuid5(uuid.NAMESPACE_URL, f"urn:microcred:faults:{env.run_id}"),
    )
    monitor = Monitor(
        databases, env.journal, env.receiver, lambda: publisher.acknowledged, config.poll_interval
    )
    run = Run(env, result, monitor, publisher)
    tasks.append(asyncio.create_task(monitor.run(run.supervise), name="monitor"))
    publishing = asyncio.create_task(publisher.run(), name="publisher")
    tasks.append(publishing)

    rng = random.Random(config.seed)  # noqa: S311  (seeded on purpose: a fault plan one can replay)
    plan = [target for _ in range(config.rounds) for target in rng.sample(TARGETS, len(TARGETS))]
    thresholds = _thresholds(rng, len(plan), config.completions)
    lead = config.effective_lead
    publisher.allow(thresholds[0] + lead if plan else config.completions)
    flowing = time.monotonic()
    try:
        for index, (target, threshold) in enumerate(zip(plan, thresholds, strict=True)):
            following = thresholds[index + 1] + lead if index + 1 < len(plan) else config.completions
            await monitor.until(
                f"{threshold} credentials",
                functools.partial(_credentials_reached, threshold),
                config.stall_timeout,
            )
            result.faults.append(await run.inject(target, rng, functools.partial(publisher.allow, following)))
        publisher.allow(config.completions)
        await monitor.until(
            "every completion to be acknowledged",
            lambda c: c.sent >= config.completions,
            config.stall_timeout,
        )
        result.timings["publish"] = time.monotonic() - flowing
        if publishing.done():
            publishing.result()  # surfaces a publisher that died
        n = config.completions
        await monitor.until(
            "the pipeline to drain",
            lambda c: (
                c.credentials >= n
                and c.in_app >= n
                and c.emails >= n
                and c.webhooks >= n
                and c.backlog == 0
                and c.open_deliveries == 0
            ),
            config.stall_timeout,
        )
    except Stalled as exc:
        result.diagnosis = await _diagnose(env, databases, str(exc))
    result.timings["flow"] = time.monotonic() - flowing
    result.sent = publisher.acknowledged
    # The final accounting reads what the monitor reads: stop it first (with 100,000 completions
    # the checks take long enough for a monitor tick to land in the middle of them).
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await _verify(env, result, databases, enrolled, partner_id)


async def _verify(
    env: Environment,
    result: Result,
    databases: dict[str, Database],
    enrolled: Sequence[Enrolled],
    partner_id: str,
) -> None:
    """The final accounting, from the services' own records and what the outside world received."""
    ours = {item.enrollment_id for item in enrolled}
    rows = await databases["issuance"].fetch(
        "SELECT credential_id, enrollment_id, learner_email FROM credentials"
    )
    per_enrollment = collections.Counter(str(row["enrollment_id"]) for row in rows)
    credential_ids = {str(row["credential_id"]) for row in rows}
    result.credential_rows = len(rows)
    result.issued = len(ours & per_enrollment.keys())
    result.duplicates = sum(count - 1 for count in per_enrollment.values())
    result.lost = len(ours - per_enrollment.keys())
    result.strangers = len(per_enrollment.keys() - ours)

    in_app = await databases["notifications"].fetch(
        "SELECT event_key FROM notifications WHERE kind = 'credential.issued'"
    )
    result.in_app_rows = len(in_app)
    result.in_app_unique = len({row["event_key"].rpartition(":")[2] for row in in_app} & credential_ids)

    env.journal.refresh()
    emails = {cid: ids for cid, ids in env.journal.by_credential.items() if cid in credential_ids}
    result.emails_unique = len(emails)
    result.emails_messages = sum(len(ids) for ids in env.journal.by_credential.values())
    result.emails_received = sum(sum(ids.values()) for ids in env.journal.by_credential.values())
    result.other_emails = len(env.journal.others)
    result.other_emails_received = sum(env.journal.others.values())
    learner_emails = {str(row["credential_id"]): row["learner_email"] for row in rows}
    result.emails_misaddressed = sum(
        1 for cid in emails if env.journal.recipients.get(cid) != {learner_emails[cid]}
    )

    hooks = env.receiver.by_credential
    result.webhooks_unique = len(hooks.keys() & credential_ids)
    result.webhooks_ids = sum(len(ids) for ids in hooks.values())
    result.webhooks_received = env.receiver.received
    result.bad_signatures = env.receiver.bad_signatures

    for service, database in databases.items():
        backlog = await database.fetch("SELECT count(*) AS backlog FROM outbox WHERE published_at IS NULL")
        result.outbox_backlog[service] = int(backlog[0]["backlog"])
    states = await databases["notifications"].fetch(
        "SELECT channel, state, count(*) AS n FROM deliveries GROUP BY channel, state"
    )
    result.deliveries = {f"{row['channel']}/{row['state']}": int(row["n"]) for row in states}

    bootstrap = env.endpoints.kafka_bootstrap
    topics = await _topics(bootstrap, env.prefix)
    for topic in sorted(topic for topic in topics if topic.endswith(".dlq")):
        for record in await _read_all(bootstrap, topic):
            headers = dict(record.headers)
            result.dead_lettered += 1
            reason = headers.get("dlq_reason", b"").decode(errors="replace")
            if not reason:
                result.dead_letters_without_reason += 1
            key = f"{topic.removeprefix(env.prefix)}:{reason or '(none)'}"
            result.dead_letter_reasons[key] = result.dead_letter_reasons.get(key, 0) + 1
    rejection_topic = env.prefix + partner_rejection_topic(uuid.UUID(partner_id))
    if rejection_topic in topics:
        for record in await _read_all(bootstrap, rejection_topic):
            reason = str(json.loads(record.value).get("reason"))
            result.rejections[reason] = result.rejections.get(reason, 0) + 1


async def _diagnose(env: Environment, databases: dict[str, Database], why: str) -> str:
    lines = [why]
    for service, database in databases.items():
        row = await database.fetchrow(
            "SELECT count(*) FILTER (WHERE published_at IS NULL) AS backlog,"
            " min(created_at) FILTER (WHERE published_at IS NULL) AS oldest FROM outbox"
        )
        lines.append(f"  {service} outbox: {dict(row) if row else 'unreachable'}")
    row = await databases["notifications"].fetchrow(
        "SELECT string_agg(channel || '/' || state || ' ' || n, ', ') AS states FROM"
        " (SELECT channel, state, count(*) AS n FROM deliveries GROUP BY channel, state) s"
    )
    lines.append(f"  deliveries: {row['states'] if row else 'unreachable'}")
    for process in env.processes.values():
        state = "running" if process.exited is None else f"exited {process.exited}"
        lines.append(f"  {process.name}: {state}; last lines of {process.log}:")
        lines += [f"    {line[:300]}" for line in process.tail(8).splitlines()]
    return "\n".join(lines)


async def _topics(bootstrap: str, prefix: str) -> set[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return {topic for topic in await admin.list_topics() if topic.startswith(prefix)}
    finally:
        await admin.close()


async def _delete_topics(bootstrap: str, prefix: str) -> None:
    """A run's topics go with it, so a broker that serves many runs does not pile up partitions."""
    mine = await _topics(bootstrap, prefix)
    if not mine:
        return
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_topics(list(mine))
    finally:
        await admin.close()


async def _read_all(bootstrap: str, topic: str) -> list[Any]:
    """Every record of a topic, from its start up to its end as of now."""
    # No group: the consumer takes every partition itself and commits nothing.
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        partitions = [
            TopicPartition(topic, partition) for partition in consumer.partitions_for_topic(topic) or ()
        ]
        ends = await consumer.end_offsets(partitions)
        records: list[Any] = []
        async with asyncio.timeout(120):
            while [tp for tp, end in ends.items() if await consumer.position(tp) < end]:
                batch = await consumer.getmany(timeout_ms=1000)
                records += [record for chunk in batch.values() for record in chunk]
        return records
    finally:
        await consumer.stop()


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def _parse(argv: Sequence[str] | None) -> Config:
    parser = argparse.ArgumentParser(
        prog="faults.py", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument(
        "--completions", type=int, default=Config.completions, help="N, the completions to push"
    )
    parser.add_argument(
        "--seed", type=int, default=Config.seed, help="fixes the fault order, moments and downtimes"
    )
    parser.add_argument("--rounds", type=int, default=Config.rounds, help="faults per target")
    parser.add_argument(
        "--lead", type=int, default=None, help="how far publishing runs ahead of the next fault"
    )
    parser.add_argument(
        "--concurrency", type=int, default=Config.concurrency, help="enrollment requests in flight"
    )
    parser.add_argument(
        "--stall-timeout", type=float, default=Config.stall_timeout, help="give up when nothing moves"
    )
    parser.add_argument(
        "--max-downtime", type=float, default=Config.max_downtime, help="longest outage per fault"
    )
    parser.add_argument("--report", type=Path, default=Config.report, help="where the figures are written")
    parser.add_argument("--workdir", type=Path, default=None, help="logs, keys and the mail journal")
    parser.add_argument("--keep-topics", action="store_true", help="keep the run's Kafka topics")
    args = parser.parse_args(argv)
    if args.completions < 1 or args.rounds < 0:
        parser.error("--completions must be at least 1 and --rounds not negative")
    return Config(
        completions=args.completions,
        seed=args.seed,
        rounds=args.rounds,
        lead=args.lead,
        concurrency=args.concurrency,
        stall_timeout=args.stall_timeout,
        max_downtime=args.max_downtime,
        poll_interval=1.0 if args.completions > 2000 else 0.25,
        workdir=args.workdir,
        report=args.report,
        keep_topics=args.keep_topics,
    )


def _interrupt(_signal: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["mail-sink"]:
        # The sink's own process, started by the run: `faults.py mail-sink <journal>`.
        asyncio.run(serve_mail_sink(Path(arguments[1])))
        return 0
    config = _parse(arguments)
    # The publisher's client reports every refused connection while the broker is down; the
    # run says what it does itself, and the services' own logs are in the work dir.
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    # A stopped run (SIGTERM, as from `timeout` or a CI runner) stops the processes it started, as
    # Ctrl-C does: asyncio.run cancels the run, whose clean-up ends them.
    signal.signal(signal.SIGTERM, _interrupt)
    result = asyncio.run(run(config))
    text = result.render()
    print(text, end="")
    if config.report is not None:
        config.report.parent.mkdir(parents=True, exist_ok=True)
        config.report.write_text(text)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
