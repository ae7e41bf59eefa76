"""The final accounting of a fault run, and the result it renders.

Everything counted is read from where it is kept, none of it from the runner's memory: what was
asked for from the partner's completion topic (each report names its enrollment and learner), what
was done from the services' databases, what reached the outside world from the sinks' journals,
and every dead letter, with its reason, from the dead-letter topics.
"""

from __future__ import annotations

import asyncio
import collections
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from issuance.sweeper import FOUND
from microcred_events import Topic
from microcred_events.topics import partner_rejection_topic

from .monitor import Database
from .sinks import MailJournal, WebhookJournal

# --- the result -----------------------------------------------------------------------------------


@dataclass
class FaultRecord:
    """One fault: what was hit, and how the pipeline came through it."""

    target: str  # what the plan named: a service, "mail-sink", "kafka-controller", ...
    victim: str  # what was actually killed: "enrollment-2", "broker 3 (controller)", ...
    at: float  # seconds since the first completion report was published
    credentials_at: int
    downtime: float  # how long the victim was kept down before the restart
    stage: str  # the counter that shows the target's part of the pipeline moving
    # True when others kept serving (a twin replica, the other brokers): recovery is then the
    # longest stall; else (PostgreSQL, the mail sink) the time until the stage moved again.
    redundant: bool
    survivors: int | None = None  # the victim's twins still running at the kill
    ready_after: float | None = None  # kill -> restarted and every process ready again
    stall: float | None = None  # longest time the stage stood still with work left, in the window
    moving_after: float | None = None  # kill -> the stage's counter grew after everything was ready
    # What the fault was seen to do (the twin kept running, the controller moved, PostgreSQL ran
    # crash recovery...), and whether that is what the plan meant it to do.
    checks: dict[str, str] = field(default_factory=dict)
    confirmed: bool = False
    note: str = ""

    @property
    def recovery(self) -> float | None:
        return self.stall if self.redundant else self.moving_after

    def row(self) -> str:
        def seconds(value: float | None) -> str:
            return f"{value:.1f}s" if value is not None else "never"

        recovery = seconds(self.recovery) + (" stall" if self.redundant else "")
        if self.recovery is None and self.note:
            recovery = self.note
        checks = "; ".join(f"{name} {value}" for name, value in self.checks.items())
        return (
            f"{self.at:>+8.1f}s  {self.victim:<30} {self.stage:<13} {self.credentials_at:>8}  "
            f"{self.downtime:>4.1f}s  {seconds(self.ready_after):>8}  {recovery:<14}"
            + (f"  {checks}" if checks else "")
        )


FAULT_TABLE_HEADER = (
    f"{'at':>9}  {'fault (SIGKILL)':<30} {'stage':<13} {'creds at':>8}  {'down':>5}  {'ready':>8}  recovery"
)


@dataclass
class Result:
    completions: int  # what the plan asked for
    seed: int
    prefix: str
    replicas: int = 0
    brokers: int = 0
    postgres_fault: str = "none"
    reports: int = 0  # distinct completion reports on the partner's topic
    report_records: int = 0  # records there, resends included
    course_expected: int = 0  # enrollments reported completed
    issued: int = 0  # of those, with a course credential
    credential_rows: int = 0  # credential rows of any kind
    duplicates: int = 0  # course credentials beyond one per enrollment
    lost: int = 0  # reported enrollments without a credential
    strangers: int = 0  # course credentials for enrollments nobody reported
    pathway_expected: int = 0  # learners whose reports complete the pathway
    pathway_issued: int = 0
    pathway_duplicates: int = 0
    pathway_lost: int = 0
    pathway_strangers: int = 0
    payments_expected: int = 0  # paid enrollments reported completed
    payments_settled: int = 0
    payments_doubled: int = 0  # payments beyond one per enrollment
    in_app_unique: int = 0
    in_app_rows: int = 0
    emails_unique: int = 0  # credentials with an email
    emails_messages: int = 0  # distinct Message-IDs of credential emails
    emails_received: int = 0  # credential emails the sink accepted, redeliveries included
    emails_misaddressed: int = 0  # credentials whose email went to someone else than their learner
    other_emails: int = 0  # distinct Message-IDs of the other emails
    other_emails_received: int = 0
    webhooks_unique: int = 0  # credentials with a correctly signed webhook
    webhooks_ids: int = 0  # distinct webhook-ids, correctly signed
    webhooks_received: int = 0  # requests, redeliveries and bad signatures included
    bad_signatures: int = 0
    webhooks_unreadable: int = 0
    dead_lettered: int = 0
    dead_letters_without_reason: int = 0
    dead_letter_reasons: dict[str, int] = field(default_factory=dict)  # "topic: reason" -> count
    dead_letter_details: dict[str, str] = field(default_factory=dict)  # "topic: reason" -> a detail
    rejections: dict[str, int] = field(default_factory=dict)
    sweeper: dict[str, dict[str, int]] = field(default_factory=dict)  # replica -> kind or "failed" -> finds
    outbox_backlog: dict[str, int] = field(default_factory=dict)
    deliveries: dict[str, int] = field(default_factory=dict)  # "channel/state" -> count
    faults: list[FaultRecord] = field(default_factory=list)
    incidents: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    enroll_rate: float = 0.0
    diagnosis: str = ""

    @property
    def credentials_expected(self) -> int:
        return self.course_expected + self.pathway_expected

    @property
    def credentials_issued(self) -> int:
        return self.issued + self.pathway_issued

    @property
    def all_lost(self) -> int:
        return self.lost + self.pathway_lost

    @property
    def all_duplicated(self) -> int:
        return self.duplicates + self.pathway_duplicates

    @property
    def email_duplicates(self) -> int:
        return self.emails_messages - self.emails_unique

    @property
    def webhook_duplicates(self) -> int:
        return self.webhooks_ids - self.webhooks_unique

    @property
    def failures(self) -> list[str]:
        """What broke the promise; empty when nothing was lost or doubled."""
        expected = self.credentials_expected
        problems = []
        if self.diagnosis:
            problems.append("the pipeline did not drain")
        if self.reports != self.completions:
            problems.append(f"only {self.reports} of {self.completions} completion reports on the topic")
        if self.lost or self.duplicates or self.strangers:
            problems.append(
                f"course credentials: {self.lost} lost, {self.duplicates} doubled, "
                f"{self.strangers} unexpected"
            )
        if self.pathway_lost or self.pathway_duplicates or self.pathway_strangers:
            problems.append(
                f"pathway credentials: {self.pathway_lost} lost, {self.pathway_duplicates} doubled, "
                f"{self.pathway_strangers} unexpected"
            )
        if self.payments_settled != self.payments_expected or self.payments_doubled:
            problems.append(
                f"payments: {self.payments_settled} of {self.payments_expected} settled, "
                f"{self.payments_doubled} doubled"
            )
        if self.in_app_rows != self.in_app_unique or self.in_app_unique != expected:
            problems.append(f"in-app: {self.in_app_unique} unique, {self.in_app_rows} rows")
        if self.email_duplicates or self.emails_unique != expected or self.emails_misaddressed:
            problems.append(
                f"emails: {self.emails_unique} unique, {self.email_duplicates} doubled, "
                f"{self.emails_misaddressed} misaddressed"
            )
        if self.webhook_duplicates or self.webhooks_unique != expected or self.bad_signatures:
            problems.append(
                f"webhooks: {self.webhooks_unique} unique, {self.webhook_duplicates} doubled, "
                f"{self.bad_signatures} badly signed"
            )
        if self.webhooks_unreadable:
            problems.append(f"webhooks: {self.webhooks_unreadable} without a credential id")
        if any(backlog != 0 for backlog in self.outbox_backlog.values()):
            problems.append(f"outbox backlog {self.outbox_backlog}")
        if self.dead_letters_without_reason:
            problems.append(f"{self.dead_letters_without_reason} dead letters without a reason")
        return problems

    @property
    def ok(self) -> bool:
        return not self.failures

    def _sweeper(self) -> str:
        if not self.sweeper:
            return "no issuance log read"
        return "; ".join(
            f"{replica}: " + ", ".join(f"{kind} {count}" for kind, count in finds.items())
            for replica, finds in sorted(self.sweeper.items())
        )

    def render(self) -> str:
        backlog = ", ".join(f"{name} {count}" for name, count in self.outbox_backlog.items())
        deliveries = ", ".join(f"{key} {count}" for key, count in sorted(self.deliveries.items()))
        rejections = ", ".join(f"{reason} {count}" for reason, count in sorted(self.rejections.items()))
        lines = [
            f"replicas per consuming service: {self.replicas}",
            f"kafka brokers: {self.brokers}",
            f"postgresql fault: {self.postgres_fault}",
            f"completions: {self.reports}",
            f"pathway credentials expected: {self.pathway_expected}   issued: {self.pathway_issued}   "
            f"duplicated: {self.pathway_duplicates}",
            f"lost: {self.all_lost}",
            f"duplicated: {self.all_duplicated}",
            f"dead letters without a reason: {self.dead_letters_without_reason}",
            f"webhooks received: {self.webhooks_ids}   expected: {self.credentials_expected}",
            "result: PASS" if self.ok else "result: FAIL: " + "; ".join(self.failures),
            "",
            f"microcred fault injection: {self.completions} completions planned, seed {self.seed}, "
            f"topic prefix {self.prefix}",
            f"  reports        {self.reports:>8}  distinct on the partner's topic "
            f"({self.report_records} records)",
            f"  course         {self.issued:>8}  of {self.course_expected} credentials; {self.lost} lost, "
            f"{self.duplicates} doubled, {self.strangers} unexpected",
            f"  pathway        {self.pathway_issued:>8}  of {self.pathway_expected} credentials; "
            f"{self.pathway_lost} lost, {self.pathway_duplicates} doubled, "
            f"{self.pathway_strangers} unexpected",
            f"  credential rows{self.credential_rows:>8}",
            f"  payments       {self.payments_settled:>8}  of {self.payments_expected} settled through the "
            f"provider's webhook, {self.payments_doubled} doubled",
            f"  in-app         {self.in_app_unique:>8}  unique / {self.in_app_rows} rows",
            f"  emails         {self.emails_unique:>8}  unique / {self.emails_messages} Message-IDs / "
            f"{self.emails_received} received, {self.emails_misaddressed} misaddressed "
            f"(and {self.other_emails} other emails, {self.other_emails_received} received)",
            f"  webhooks       {self.webhooks_unique:>8}  unique / {self.webhooks_ids} webhook-ids / "
            f"{self.webhooks_received} received, {self.bad_signatures} badly signed",
            f"  dead-lettered  {self.dead_lettered:>8}  "
            f"({self.dead_letters_without_reason} without a reason)",
            *(
                f"    {count} x {reason}: {self.dead_letter_details.get(reason, '')}"
                for reason, count in sorted(self.dead_letter_reasons.items())
            ),
            f"  rejected       {sum(self.rejections.values()):>8}  on the partner's rejection topic"
            + (f" ({rejections})" if rejections else ""),
            f"  outbox backlog  {backlog}",
            f"  sweeper found   {self._sweeper()}",
            f"  deliveries      {deliveries}",
            "",
            "faults, one at a time (at: seconds since the first report was published; ready: from the",
            "kill until the victim and every other process answered ready again; recovery: for a replica",
            "or broker kill, the survivors' stall, the longest time the stage's counter stood still while",
            "it had work, from the kill until it moved again after everything was ready; for PostgreSQL",
            "and the mail sink, the time from the kill until the stage moved again):",
            "  " + FAULT_TABLE_HEADER,
            *(f"  {fault.row()}" for fault in self.faults),
        ]
        if self.incidents:
            lines += ["incidents:", *(f"  {incident}" for incident in self.incidents)]
        timings = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in self.timings.items())
        lines.append(f"timings: {timings}; enrolled {self.enroll_rate:.0f} learners/s")
        if self.diagnosis:
            lines += ["diagnosis:", self.diagnosis]
        return "\n".join(lines) + "\n"


# --- Kafka --------------------------------------------------------------------------------------------


async def topics(bootstrap: str, prefix: str) -> set[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return {topic for topic in await admin.list_topics() if topic.startswith(prefix)}
    finally:
        await admin.close()


async def delete_topics(bootstrap: str, prefix: str) -> None:
    """A run's topics go with it, so a cluster that serves many runs does not pile up partitions."""
    mine = await topics(bootstrap, prefix)
    if not mine:
        return
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_topics(list(mine))
    finally:
        await admin.close()


async def read_topic(bootstrap: str, topic: str, within: float = 300.0) -> list[Any]:
    """Every record of a topic, from its start up to its end as of now."""
    # No group: the consumer takes every partition itself and commits nothing.
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )
    await consumer.start()
    try:
        partitions = [
            TopicPartition(topic, partition) for partition in consumer.partitions_for_topic(topic) or ()
        ]
        ends = await consumer.end_offsets(partitions)
        records: list[Any] = []
        async with asyncio.timeout(within):
            while [tp for tp, end in ends.items() if await consumer.position(tp) < end]:
                batch = await consumer.getmany(timeout_ms=1000, max_records=10_000)
                records += [record for chunk in batch.values() for record in chunk]
        return records
    finally:
        await consumer.stop()


# --- the accounting --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Asked:
    """What the partner's topic says was completed."""

    enrollments: set[str]  # enrollments reported completed
    pathway_learners: set[str]  # learners with a report for every course of the pathway
    paid_enrollments: set[str]  # reported enrollments in the paid (pathway) courses
    reports: int
    records: int


async def asked(bootstrap: str, prefix: str, pathway_courses: set[str]) -> Asked:
    records = await read_topic(bootstrap, prefix + Topic.PARTNER_COMPLETION)
    reports: dict[str, dict[str, Any]] = {}
    for record in records:
        report = json.loads(record.value)
        reports[report["report_id"]] = report
    courses_of: dict[str, set[str]] = collections.defaultdict(set)
    paid = set()
    for report in reports.values():
        if report["course_id"] in pathway_courses:
            courses_of[report["learner_id"]].add(report["course_id"])
            paid.add(report["enrollment_id"])
    return Asked(
        enrollments={report["enrollment_id"] for report in reports.values()},
        pathway_learners={learner for learner, courses in courses_of.items() if courses == pathway_courses},
        paid_enrollments=paid,
        reports=len(reports),
        records=len(records),
    )


async def account(
    result: Result,
    *,
    databases: Mapping[str, Database],
    mail: MailJournal,
    webhooks: WebhookJournal,
    bootstrap: str,
    prefix: str,
    partner_id: str,
    pathway_id: str,
    pathway_courses: set[str],
) -> None:
    """Fill `result` in from the records: the partner's topic, the databases, the journals, the
    dead-letter and rejection topics."""
    wanted = await asked(bootstrap, prefix, pathway_courses)
    result.reports, result.report_records = wanted.reports, wanted.records
    result.course_expected = len(wanted.enrollments)
    result.pathway_expected = len(wanted.pathway_learners)
    result.payments_expected = len(wanted.paid_enrollments)

    rows = await databases["issuance"].fetch(
        "SELECT credential_id, kind, enrollment_id, learner_id, pathway_id, learner_email FROM credentials"
    )
    result.credential_rows = len(rows)
    per_enrollment = collections.Counter(str(row["enrollment_id"]) for row in rows if row["kind"] == "course")
    result.issued = len(wanted.enrollments & per_enrollment.keys())
    result.duplicates = sum(count - 1 for count in per_enrollment.values())
    result.lost = len(wanted.enrollments - per_enrollment.keys())
    result.strangers = len(per_enrollment.keys() - wanted.enrollments)
    per_learner = collections.Counter(
        str(row["learner_id"])
        for row in rows
        if row["kind"] == "pathway" and str(row["pathway_id"]) == pathway_id
    )
    result.pathway_issued = len(wanted.pathway_learners & per_learner.keys())
    result.pathway_duplicates = sum(count - 1 for count in per_learner.values())
    result.pathway_lost = len(wanted.pathway_learners - per_learner.keys())
    result.pathway_strangers = len(per_learner.keys() - wanted.pathway_learners) + sum(
        1 for row in rows if row["kind"] == "pathway" and str(row["pathway_id"]) != pathway_id
    )
    credential_ids = {str(row["credential_id"]) for row in rows}

    payments = await databases["billing"].fetch("SELECT enrollment_id, status FROM payments")
    per_payment = collections.Counter(str(row["enrollment_id"]) for row in payments)
    result.payments_doubled = sum(count - 1 for count in per_payment.values())
    result.payments_settled = len(
        {str(row["enrollment_id"]) for row in payments if row["status"] == "settled"}
        & wanted.paid_enrollments
    )

    in_app = await databases["notifications"].fetch(
        "SELECT event_key FROM notifications WHERE kind = 'credential.issued'"
    )
    result.in_app_rows = len(in_app)
    result.in_app_unique = len({row["event_key"].rpartition(":")[2] for row in in_app} & credential_ids)

    mail.refresh()
    emails = {cid: ids for cid, ids in mail.by_credential.items() if cid in credential_ids}
    result.emails_unique = len(emails)
    result.emails_messages = sum(len(ids) for ids in mail.by_credential.values())
    result.emails_received = sum(sum(ids.values()) for ids in mail.by_credential.values())
    result.other_emails = len(mail.others)
    result.other_emails_received = sum(mail.others.values())
    learner_emails = {str(row["credential_id"]): row["learner_email"] for row in rows}
    result.emails_misaddressed = sum(1 for cid in emails if mail.recipients.get(cid) != {learner_emails[cid]})

    webhooks.refresh()
    result.webhooks_unique = len(webhooks.by_credential.keys() & credential_ids)
    result.webhooks_ids = sum(len(ids) for ids in webhooks.by_credential.values())
    result.webhooks_received = webhooks.received
    result.bad_signatures = webhooks.bad_signatures
    result.webhooks_unreadable = webhooks.unreadable

    for service, database in databases.items():
        backlog = await database.fetch("SELECT count(*) AS backlog FROM outbox WHERE published_at IS NULL")
        result.outbox_backlog[service] = int(backlog[0]["backlog"])
    states = await databases["notifications"].fetch(
        "SELECT channel, state, count(*) AS n FROM deliveries GROUP BY channel, state"
    )
    result.deliveries = {f"{row['channel']}/{row['state']}": int(row["n"]) for row in states}

    found = await topics(bootstrap, prefix)
    for topic in sorted(topic for topic in found if topic.endswith(".dlq")):
        for record in await read_topic(bootstrap, topic):
            headers = dict(record.headers)
            result.dead_lettered += 1
            reason = headers.get("dlq_reason", b"").decode(errors="replace")
            if not reason:
                result.dead_letters_without_reason += 1
            key = f"{topic.removeprefix(prefix)}: {reason or '(no reason)'}"
            result.dead_letter_reasons[key] = result.dead_letter_reasons.get(key, 0) + 1
            detail = headers.get("dlq_detail", b"").decode(errors="replace")
            result.dead_letter_details.setdefault(key, " ".join(detail.split())[:300])
    rejection_topic = prefix + partner_rejection_topic(uuid.UUID(partner_id))
    if rejection_topic in found:
        for record in await read_topic(bootstrap, rejection_topic):
            reason = str(json.loads(record.value).get("reason"))
            result.rejections[reason] = result.rejections.get(reason, 0) + 1


def sweeper_finds(logs: Path) -> dict[str, dict[str, int]]:
    """What each issuance replica's sweeper found and finished, by kind, and the finds it could not
    finish ("failed"), from its log: a counter at /metrics starts again at each restart, the log is
    appended to across them."""
    found = {message: kind for kind, message in FOUND.items()}
    finds: dict[str, dict[str, int]] = {}
    for path in sorted(logs.glob("issuance-*.log")):
        counts = finds[path.stem] = {**dict.fromkeys(FOUND, 0), "failed": 0}
        with path.open(encoding="utf-8", errors="replace") as lines:
            for line in lines:
                if '"issuance.sweeper"' not in line:
                    continue
                record = json.loads(line)
                message = record.get("message", "")
                if message in found:
                    counts[found[message]] += 1
                elif message.startswith("could not finish a find"):
                    counts["failed"] += 1
    return finds
