"""The system benchmark (`make bench`): partner completions to recorded credentials and notifications,
the raw ceiling of the same work without the framework, and the catalog list API under load.

Run from the repository root: `.venv/bin/python benchmarks/pipeline.py [options]` (see `--help`).
A benchmark, not a test: it asserts nothing, prints each figure next to the issue's target with
PASS or MISS, and writes them to benchmarks/results/bench.txt. What follows the notes marker in
that file (the hand-written analysis) is kept when the figures are rewritten.

What runs, all on this machine: Kafka and PostgreSQL (`scripts/infra.py`: the project's own, or
those KAFKA_BOOTSTRAP_SERVERS and POSTGRES_URL name, e.g. a pair no other job restarts), and
catalog, enrollment, issuance and notifications as real processes (`python -m <service>`, as
`make up` runs them) on free ports, with databases and a topic prefix of the run's own (removed
afterwards), plus the SMTP server notifications mails to: Postfix's smtp-sink, a C test server made
for benchmarking SMTP clients (unpacked from Debian's package into .local/tools, nothing
installed), so that the sink takes little of the CPU it would share with the pipeline; the
project's Python sink when it cannot be had, which the report says. The measured path is the whole journey's
tail: a partner's signed CompletionReported on Kafka (plain aiokafka, as docs/partners.md says)
-> enrollment completes the enrollment -> issuance signs (eddsa-rdfc-2022), records and publishes
CredentialIssued -> notifications records the learner's notifications.

Set-up, not measured: the course reaches every read model as a CoursePublished event; the partner
and the learners' active (paid) enrollments are bulk-inserted into enrollment's tables with SQL.

Phases, in order:
1. warm-up: `--warmup` reports through the pipeline (connections, JSON-LD templates, caches);
2. throughput: `--completions` reports published at once (a term's cohort: how long until its
   last credential is recorded); credentials recorded per second over
   the steady part (the 10th to the 90th percentile of the recording times), and the CPU seconds
   of Kafka, PostgreSQL (this run's backends and its shared processes), each service and this
   process over the phase, read from /proc; then a shorter burst with py-spy (a dev dependency,
   installed by `make sync`) attached to each service (`--profile` seconds; not measured, sampling costs CPU);
3. ceiling: the same signing and rows (inbox, status index, credential, outbox) done by a minimal
   aiokafka + asyncpg loop in this process, a batch per poll, one transaction per batch;
4. catalog: `GET /courses` of the seeded launch catalog, served by `--catalog-workers` HTTP
   workers (HTTP_WORKERS), loaded by wrk (installed with apt-get when missing; else an asyncio httpx
   load generator, which the report says), `--catalog-seconds` long, then again shorter under py-spy;
5. latency at loads the pipeline sustains (`--fractions` of the throughput measured, `--low-duration`
   s each), lowest first;
6. latency at `--rate` reports/s offered for `--duration` s: publish time to credential recorded.
A paced phase "kept up" when its credentials were recorded at (98% of) the rate they were reported,
the 10th to the 90th percentile of their recording times; the latency target is judged at the
highest offered rate that kept up.

The machine is shared and noisy: besides the wall-clock figures, the report projects what the
CPU each part spent would allow on a quiet machine, and says when other work took a large share.

"Recorded" is when the credential's transaction committed: every commit that queues an event
fires the outbox's NOTIFY, which this process LISTENs to on issuance's database and answers by
reading the new CredentialIssued rows; send and record times come from one monotonic clock.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import functools
import hashlib
import hmac
import itertools
import json
import math
import os
import platform as host
import re
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from issuance import domain, keys, status_list
from issuance.main import service as issuance_service
from issuance.service import STATUS_PURPOSE, Platform, signed_course_credential
from microcred_events import (
    CompletedBy,
    CompletionReported,
    CourseCompleted,
    CoursePublished,
    CourseSnapshot,
    CredentialIssued,
    CredentialKind,
    Learner,
    Topic,
    decode,
    encode,
    example_data,
)
from microcred_runtime import kafka
from microcred_runtime.outbox import CHANNEL

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import infra  # noqa: E402  (the project's Kafka and PostgreSQL, from scripts/)
from harness import processes as harness_processes  # noqa: E402  (the tools' shared process handling)
from harness.processes import NotReady, Process, free_port  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "bench.txt"
NOTES_MARKER = "## Notes (hand-written, kept when the figures are rewritten)"
SERVICES = ("catalog", "enrollment", "issuance", "notifications")
PROFILED = ("enrollment", "issuance", "notifications")
# Enrollments set aside for the profiled burst: more than the pipeline gets through per second.
PROFILE_RATE_BOUND = 300
READY_TIMEOUT = 90.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# The targets.
TARGET_CREDENTIALS_PER_SECOND = 1000.0
TARGET_P99_SECONDS = 1.0
TARGET_CEILING_RATIO = 0.7
TARGET_CATALOG_RPS = 2000.0
TARGET_CATALOG_P99_MS = 50.0
TARGET_RSS_MB = 150.0
# Above this share of the busy time spent outside the run's processes, the run was disturbed.
NOISY_SHARE = 0.15
# A paced phase kept up when its credentials were recorded at this share of the offered rate. The
# recorded rate is measured to about 1% (387/s offered, 391/s recorded, in a run that kept up);
# a shortfall beyond 2% is a backlog that grows as long as the load lasts, not noise (451/s
# offered, 431/s recorded: p50 1.35 s, against 351 ms at 387/s in the same run).
KEPT_UP = 0.98
LOAD_GENERATOR = "bench (load generator)"
# The SMTP server the emails go to: in production another machine's work, so not the system's.
MAIL_SINK = "mail sink (the bench's SMTP server)"
KAFKA = "kafka (whole broker)"


# --- processes -------------------------------------------------------------------------------


def pid(process: Process) -> int:
    assert process.pid is not None, f"{process.name} was never started"
    return process.pid


def wait_ready(processes: Sequence[Process]) -> None:
    try:
        harness_processes.wait_ready_blocking(processes, READY_TIMEOUT, interval=0.3)
    except NotReady as exc:
        raise SystemExit(str(exc)) from None


POSTFIX = ROOT / ".local" / "tools" / "postfix"


@functools.cache
def smtp_sink() -> tuple[list[str], dict[str, str]] | str:
    """Postfix's smtp-sink: on PATH, else unpacked from Debian's postfix package (`apt-get download`
    and `dpkg-deb -x` into .local/tools: no package installed, no mail daemon started). The command
    to run it with (then the address and backlog) and what it adds to the environment, or why it
    could not be had."""
    found = shutil.which("smtp-sink")
    unpacked = POSTFIX / "usr" / "sbin" / "smtp-sink"
    if found is None and not unpacked.exists():
        apt, dpkg = shutil.which("apt-get"), shutil.which("dpkg-deb")
        if apt is None or dpkg is None:
            return "no apt-get and dpkg-deb on this machine"
        with tempfile.TemporaryDirectory() as folder:
            fetched = subprocess.run(  # noqa: S603
                [apt, "-q", "download", "postfix"], cwd=folder, capture_output=True, text=True, check=False
            )
            debs = list(Path(folder).glob("postfix_*.deb"))
            if not debs:
                return (
                    f"apt-get download postfix failed: {(fetched.stderr.strip().splitlines() or ['?'])[-1]}"
                )
            POSTFIX.mkdir(parents=True, exist_ok=True)
            subprocess.run([dpkg, "-x", str(debs[0]), str(POSTFIX)], check=True)  # noqa: S603
        print("unpacked Postfix's smtp-sink (apt-get download postfix) for the emails", flush=True)
    # As root it must be told whom to run as.
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    if found:
        return [found, *user], {}
    return [str(unpacked), *user], {"LD_LIBRARY_PATH": str(POSTFIX / "usr" / "lib" / "postfix")}


@dataclass
class MailSink:
    """The SMTP server the emails go to, and what it is (for the report)."""

    port: int
    pid: int
    what: str


@contextlib.contextmanager
def mail_sink(logs: Path) -> Iterator[MailSink]:
    """smtp-sink (see `smtp_sink`) on a free port, else the project's Python sink, until the block ends."""
    command = smtp_sink()
    started = None if isinstance(command, str) else _start_smtp_sink(*command, logs)
    if isinstance(started, tuple):
        process, port = started
        try:
            yield MailSink(port, process.pid, "Postfix's smtp-sink")
        finally:
            process.terminate()
            process.wait(timeout=10)
        return
    why_not = command if isinstance(command, str) else started
    port, sink_http = free_port(), free_port()
    python = Process(
        "mail-sink",
        [sys.executable, "-m", "notifications.smtp_sink"],
        {"SINK_SMTP_PORT": str(port), "SINK_HTTP_PORT": str(sink_http)},
        f"http://127.0.0.1:{sink_http}/health/live",
        logs / "mail-sink.log",
    )
    python.log.write_bytes(b"")
    python.start()
    try:
        wait_ready([python])
        yield MailSink(port, pid(python), f"the project's Python sink; NOT smtp-sink ({why_not})")
    finally:
        harness_processes.stop_all([python])


def _start_smtp_sink(
    argv: list[str], env: dict[str, str], logs: Path
) -> tuple[subprocess.Popen[bytes], int] | str:
    """smtp-sink listening on a free port, or why it would not start (e.g. a library it needs is
    missing: `apt-get download` fetches no dependencies)."""
    port = free_port()
    log_path = logs / "mail-sink.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(  # noqa: S603
            [*argv, f"127.0.0.1:{port}", "256"], env={**os.environ, **env}, stdout=log, stderr=log
        )
    deadline = time.monotonic() + READY_TIMEOUT
    while process.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return process, port
        time.sleep(0.1)
    process.kill()
    process.wait(timeout=10)
    said = log_path.read_text(errors="replace").strip().splitlines()
    return f"it did not start: {said[-1] if said else 'no answer on its port'}"


# --- CPU and memory from /proc ---------------------------------------------------------------


def _stat_fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()  # fields from the 3rd (state) on


def cpu_seconds(pid: int, *, with_children: bool = False) -> float:
    """User + system CPU seconds of a process (and of its waited-for children)."""
    try:
        fields = _stat_fields(pid)
    except (OSError, ValueError):
        return 0.0
    ticks = int(fields[11]) + int(fields[12])
    if with_children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLOCK_TICKS


def children_of(parent: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                if int(_stat_fields(int(entry.name))[1]) == parent:
                    found.append(int(entry.name))
    return found


def family_cpu_seconds(pid: int) -> dict[int, float]:
    """CPU seconds of a service's process and of each of its live children (its HTTP workers, its
    proof workers): a child's CPU reaches its parent's count only once the child has ended."""
    return {pid: cpu_seconds(pid, with_children=True)} | {
        child: cpu_seconds(child) for child in children_of(pid)
    }


# Titles of PostgreSQL's own processes, which work for every database (WAL, checkpoints, vacuum).
_POSTGRES_SHARED = ("walwriter", "checkpointer", "background writer", "autovacuum", "logical replication")


# The server pids of this process's own connections to the run's databases (the observer's, the
# waits'): their backends' CPU is the load generator's, not the system's.
OWN_BACKENDS: set[int] = set()


async def connect(dsn: str) -> asyncpg.Connection:
    """A connection of the load generator's: its backend's CPU is counted as the bench's."""
    conn = await asyncpg.connect(dsn)
    OWN_BACKENDS.add(conn.get_server_pid())
    return conn


def postgres_processes(postmaster: int, databases_prefix: str) -> dict[int, float]:
    """CPU seconds of the postmaster, its shared processes, and the backends of this run's
    databases; other databases' backends (other jobs on a shared server) are left out."""
    found = {postmaster: cpu_seconds(postmaster)}
    for pid in children_of(postmaster):
        with contextlib.suppress(OSError):
            title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if f" {databases_prefix}" in title or any(name in title for name in _POSTGRES_SHARED):
                found[pid] = cpu_seconds(pid)
    return found


def machine_busy_seconds() -> float:
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = fields[3] + fields[4]
    return (sum(fields) - idle) / CLOCK_TICKS


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return math.nan


def largest_peak_rss_mb(pid: int) -> float:
    """The peak RSS of the largest of a service's processes (itself, its HTTP workers)."""
    return max(peak_rss_mb(process) for process in [pid, *children_of(pid)])


def listener_pid(port: int) -> int | None:
    """The local process listening on this TCP port (Kafka's broker, PostgreSQL's postmaster)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                    inodes.add(f"socket:[{fields[9]}]")
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and inodes:
            with contextlib.suppress(OSError):
                for descriptor in (entry / "fd").iterdir():
                    with contextlib.suppress(OSError):
                        if os.readlink(descriptor) in inodes:
                            return int(entry.name)
    return None


@dataclass
class CpuSample:
    at: float
    machine: float
    parts: dict[str, dict[int, float]]  # part -> pid -> CPU seconds so far


class CpuMeter:
    """CPU seconds of Kafka, PostgreSQL (this run's share), each service and this process."""

    def __init__(self, services: dict[str, list[int]], environment: Environment) -> None:
        self.services = services
        self.databases_prefix = environment.database("")
        self._ports = (
            int(environment.bootstrap.split(",")[0].rpartition(":")[2]),
            urlsplit(environment.postgres_url).port or 5432,
        )
        self.kafka, self.postmaster = self.servers()

    def servers(self) -> tuple[int | None, int | None]:
        """The pids of the local Kafka broker and PostgreSQL postmaster, if they are local."""
        kafka_port, postgres_port = self._ports
        return listener_pid(kafka_port), listener_pid(postgres_port)

    def sample(self) -> CpuSample:
        parts = {
            name: {child: seconds for pid in pids for child, seconds in family_cpu_seconds(pid).items()}
            for name, pids in self.services.items()
        }
        parts[KAFKA] = {self.kafka: cpu_seconds(self.kafka)} if self.kafka else {}
        postgres = postgres_processes(self.postmaster, self.databases_prefix) if self.postmaster else {}
        parts["postgresql"] = {pid: seconds for pid, seconds in postgres.items() if pid not in OWN_BACKENDS}
        parts[LOAD_GENERATOR] = {os.getpid(): cpu_seconds(os.getpid())} | {
            pid: seconds for pid, seconds in postgres.items() if pid in OWN_BACKENDS
        }
        return CpuSample(time.monotonic(), machine_busy_seconds(), parts)


@dataclass
class CpuSplit:
    seconds: float
    machine: float
    parts: dict[str, float]  # NaN: not a process of this machine

    @property
    def own_seconds(self) -> float:
        """CPU seconds of the system under test: Kafka, PostgreSQL and the services, not the load
        generator or the mail sink."""
        return sum(
            seconds
            for name, seconds in self.parts.items()
            if math.isfinite(seconds) and name not in (LOAD_GENERATOR, MAIL_SINK)
        )

    @classmethod
    def between(cls, before: CpuSample, after: CpuSample) -> CpuSplit:
        """A process that started in between counts from zero; one that ended in between is lost."""
        parts = {
            name: sum(seconds - before.parts[name].get(pid, 0.0) for pid, seconds in processes.items())
            if processes
            else math.nan
            for name, processes in after.parts.items()
        }
        return cls(after.at - before.at, after.machine - before.machine, parts)


# --- the run's own databases and topics ------------------------------------------------------


@dataclass(frozen=True)
class Environment:
    postgres_url: str
    bootstrap: str
    run: str
    prefix: str

    def database(self, name: str) -> str:
        return f"bench_{self.run}_{name}"

    def database_url(self, name: str) -> str:
        return self.postgres_url.rpartition("/")[0] + "/" + self.database(name)


@contextlib.asynccontextmanager
async def throwaway(
    endpoints: infra.Endpoints, names: Sequence[str], keep: bool
) -> AsyncIterator[Environment]:
    run = uuid.uuid4().hex[:8]
    environment = Environment(endpoints.postgres_url, endpoints.kafka_bootstrap, run, f"bench-{run}.")
    admin = await asyncpg.connect(endpoints.postgres_url)
    try:
        for name in names:
            await admin.execute(f'CREATE DATABASE "{environment.database(name)}"')
        yield environment
    finally:
        if not keep:
            for name in names:
                await _drop_database(admin, environment.database(name))
            try:
                await _delete_topics(endpoints.kafka_bootstrap, environment.prefix)
            except Exception as exc:  # a leftover must not cost the run its figures
                print(f"could not delete the topics {environment.prefix}*: {exc}", file=sys.stderr)
        await admin.close()


async def _drop_database(admin: asyncpg.Connection, name: str) -> None:
    # FORCE cannot end an autovacuum worker (another role) still in the database: wait it out.
    for attempt in range(10):
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            return
        except asyncpg.PostgresError as exc:
            if attempt == 9:
                print(f"could not drop the database {name}: {exc}", file=sys.stderr)
                return
            await asyncio.sleep(1)


async def _delete_topics(bootstrap: str, prefix: str) -> None:
    client = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await client.start()
    try:
        mine = [topic for topic in await client.list_topics() if topic.startswith(prefix)]
        if mine:
            await client.delete_topics(mine)
    finally:
        await client.close()


# --- set-up: course, partner, enrollments ----------------------------------------------------


@dataclass(frozen=True)
class Learnership:
    """A learner's active enrollment in the benchmark course: what one partner report completes."""

    enrollment_id: uuid.UUID
    learner_id: uuid.UUID


@dataclass(frozen=True)
class BenchPartner:
    partner_id: uuid.UUID
    secret: str


def bench_course(partner_id: uuid.UUID) -> CourseSnapshot:
    return CourseSnapshot.model_validate(
        {
            **example_data(CourseSnapshot),
            "course_id": str(uuid.uuid4()),
            "delivery_partner_id": str(partner_id),
        }
    )


async def publish_course(environment: Environment, course: CourseSnapshot) -> None:
    record = encode(
        CoursePublished(course=course, published_at=datetime.now(UTC)), source="urn:microcred:catalog"
    )
    producer = AIOKafkaProducer(bootstrap_servers=environment.bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        await producer.send_and_wait(
            environment.prefix + record.topic, record.value, key=record.key, headers=record.headers
        )
    finally:
        await producer.stop()


async def wait_for_rows(dsn: str, query: str, *arguments: object, within: float = 60.0) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        deadline = time.monotonic() + within
        while not await conn.fetchval(query, *arguments):
            if time.monotonic() > deadline:
                raise SystemExit(f"gave up after {within:.0f}s waiting for: {query}")
            await asyncio.sleep(0.2)
    finally:
        await conn.close()


async def insert_partner_and_enrollments(
    dsn: str, course: CourseSnapshot, partner: BenchPartner, count: int
) -> list[Learnership]:
    """Set-up, not measured: the partner and `count` active (paid) enrollments, in bulk."""
    now = datetime.now(UTC)
    learners = [Learnership(uuid.uuid4(), uuid.uuid4()) for _ in range(count)]
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await conn.execute(
                "INSERT INTO partners (partner_id, display_name, status, created_at, updated_at)"
                " VALUES ($1, 'Benchmark University', 'active', $2, $2)",
                partner.partner_id,
                now,
            )
            await conn.execute(
                "INSERT INTO partner_credentials (credential_id, partner_id, kind, secret, created_at)"
                " VALUES ($1, $2, 'hmac_sha256', $3, $4)",
                uuid.uuid4(),
                partner.partner_id,
                partner.secret,
                now,
            )
            await conn.copy_records_to_table(
                "enrollments",
                columns=[
                    "enrollment_id",
                    "learner_id",
                    "learner_email",
                    "learner_display_name",
                    "course_id",
                    "course_version",
                    "price_minor",
                    "currency",
                    "status",
                    "created_at",
                    "updated_at",
                    "activated_at",
                ],
                records=[
                    (
                        learner.enrollment_id,
                        learner.learner_id,
                        f"learner-{number}@example.org",
                        f"Learner {number}",
                        course.course_id,
                        course.version,
                        course.price.amount_minor,
                        course.price.currency,
                        "active",
                        now,
                        now,
                        now,
                    )
                    for number, learner in enumerate(learners)
                ],
            )
    finally:
        await conn.close()
    return learners


# --- the partner's side: signed reports on plain Kafka ---------------------------------------


class Reporter:
    """Publishes signed CompletionReported messages as a partner does (docs/partners.md)."""

    def __init__(self, environment: Environment, partner: BenchPartner, course: CourseSnapshot) -> None:
        self.topic = environment.prefix + Topic.PARTNER_COMPLETION
        self.partner = partner
        self.course = course
        self.sent_at: dict[uuid.UUID, float] = {}
        self.producer = AIOKafkaProducer(
            bootstrap_servers=environment.bootstrap, acks="all", enable_idempotence=True, linger_ms=5
        )

    async def report(self, learner: Learnership) -> asyncio.Future[Any]:
        report_id = str(uuid.uuid4())
        report = {
            "report_id": report_id,
            "partner_id": str(self.partner.partner_id),
            "course_id": str(self.course.course_id),
            "learner_id": str(learner.learner_id),
            "completed_at": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            "score": 90,
        }
        body = json.dumps(report).encode()
        message_id, at = str(uuid.uuid4()), datetime.now(UTC).isoformat().replace("+00:00", "Z")
        signature = hmac.new(
            self.partner.secret.encode(), f"{message_id}.{at}.".encode() + body, hashlib.sha256
        ).digest()
        headers = [
            ("ce_specversion", b"1.0"),
            ("ce_id", message_id.encode()),
            ("ce_type", CompletionReported.TYPE.encode()),
            ("ce_source", f"urn:microcred:partner:{self.partner.partner_id}".encode()),
            ("ce_time", at.encode()),
            ("ce_subject", report_id.encode()),
            ("content-type", b"application/json"),
            ("ce_signature", b"v1," + base64.b64encode(signature)),
        ]
        self.sent_at[learner.enrollment_id] = time.monotonic()
        delivery: asyncio.Future[Any] = await self.producer.send(
            self.topic, body, key=report_id.encode(), headers=headers
        )
        return delivery

    async def burst(self, learners: Sequence[Learnership]) -> None:
        deliveries = [await self.report(learner) for learner in learners]
        await asyncio.gather(*deliveries)

    async def paced(self, learners: Sequence[Learnership], rate: float) -> float:
        """Publish at `rate` reports/s on a fixed schedule (catching up when late); the rate achieved."""
        started = time.monotonic()
        deliveries = []
        for number, learner in enumerate(learners):
            delay = started + number / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            deliveries.append(await self.report(learner))
        elapsed = time.monotonic() - started
        await asyncio.gather(*deliveries)
        return (len(learners) - 1) / elapsed if elapsed > 0 else math.nan


# --- observing credentials as they are recorded ----------------------------------------------


# How far back (in outbox ids) a row can still appear: several times the replicas' batches in
# flight at once (a batch takes at most CONSUMER_BATCH_SIZE ids, and MINT_CHUNK more for pathways).
LOOKBACK = 1500


class Recorded:
    """When each credential became visible in issuance's database, by enrollment id.

    Issuance's outbox NOTIFYs at every commit that queues an event; each notification makes this
    read the CredentialIssued rows added since, stamped with the time the first pending
    notification arrived (a few milliseconds' precision; a poll every half second is the safety net).
    """

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self.at: dict[uuid.UUID, float] = {}
        self._last_id = 0
        self._seen: set[int] = set()  # the ids read within LOOKBACK of the last
        self._pending_since: float | None = None
        self._wakeup = asyncio.Event()
        self._grown = asyncio.Event()

    @contextlib.asynccontextmanager
    async def watching(self) -> AsyncIterator[Recorded]:
        listener = await connect(self._dsn)
        reader = await connect(self._dsn)
        await listener.add_listener(CHANNEL, self._notified)
        task = asyncio.create_task(self._run(reader))
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await listener.close()
            await reader.close()

    def _notified(self, *_: object) -> None:
        if self._pending_since is None:
            self._pending_since = time.monotonic()
        self._wakeup.set()

    async def _run(self, reader: asyncpg.Connection) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout=0.5)
            self._wakeup.clear()
            stamp, self._pending_since = self._pending_since or time.monotonic(), None
            # Replicas commit side by side, so a row can become visible after one with a higher id
            # was read: the read looks back LOOKBACK ids and leaves out those already seen.
            floor = max(self._last_id - LOOKBACK, 0)
            self._seen = {row_id for row_id in self._seen if row_id > floor}
            rows = await reader.fetch(
                # NOT IN over a subquery is hashed; `<> ALL($3)` compares each row with every id.
                "SELECT id, payload FROM outbox WHERE id > $1 AND event_type = $2"
                " AND id NOT IN (SELECT unnest($3::bigint[])) ORDER BY id",
                floor,
                CredentialIssued.TYPE,
                list(self._seen),
            )
            for row in rows:
                self.at[uuid.UUID(json.loads(row["payload"])["enrollment_id"])] = stamp
                self._seen.add(row["id"])
                self._last_id = max(self._last_id, row["id"])
            if rows:
                self._grown.set()

    async def until(self, enrollment_ids: Sequence[uuid.UUID], within: float) -> bool:
        """Wait until every one of these credentials is recorded; False if they are not `within` s."""
        deadline = time.monotonic() + within
        while not all(enrollment_id in self.at for enrollment_id in enrollment_ids):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._grown.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._grown.wait(), timeout=min(remaining, 1.0))
        return True


async def notifications_recorded(dsn: str, expected: int, within: float) -> float | None:
    """Wait until `expected` credential notifications are recorded; when (monotonic), or None."""
    conn = await connect(dsn)
    try:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            count = await conn.fetchval("SELECT count(*) FROM notifications WHERE kind = 'credential.issued'")
            if count >= expected:
                return time.monotonic()
            await asyncio.sleep(0.25)
        return None
    finally:
        await conn.close()


async def deliveries_done(dsn: str, within: float) -> float | None:
    """Wait until no email or webhook is waiting to be sent (pending, or being sent); when
    (monotonic), or None. Sending happens after the notification is recorded, so a phase's CPU
    counts it only when the phase waits for this."""
    conn = await connect(dsn)
    try:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if not await conn.fetchval(
                "SELECT count(*) FROM deliveries WHERE state IN ('pending', 'sending')"
            ):
                return time.monotonic()
            await asyncio.sleep(0.25)
        return None
    finally:
        await conn.close()


# Each credential's path, cut where the databases stamp it: a transaction's now() is when it began
# (a batch that failed and was applied again is stamped by the transaction that committed, so its
# retries count in the stage before).
STAGES = (
    "published -> enrollment's batch began",
    "enrollment's batch, its commit, the relay -> CourseCompleted acknowledged by Kafka",
    "acknowledged -> issuance's batch began",
    "issuance's batch began -> its credential committed",
)


async def stage_times(
    environment: Environment, sent: dict[uuid.UUID, float], recorded: dict[uuid.UUID, float]
) -> list[list[float]]:
    """Seconds each credential spent in each of STAGES, from the reports' send times and the times
    their credentials were recorded (monotonic, by enrollment id): a list per stage, one entry per
    credential whose every stamp was found."""
    to_wall = time.time() - time.monotonic()  # the databases stamp wall-clock time, on this machine
    ids = [str(enrollment_id) for enrollment_id in sent]
    enrollment = await connect(environment.database_url("enrollment"))
    try:
        completed = await enrollment.fetch(
            "SELECT event_id::text, payload_id, extract(epoch FROM created_at) AS began,"
            " extract(epoch FROM published_at) AS published"
            " FROM (SELECT *, convert_from(payload, 'UTF8')::jsonb ->> 'enrollment_id' AS payload_id"
            "       FROM outbox WHERE event_type = $1) AS events"
            " WHERE payload_id = ANY($2::text[]) AND published_at IS NOT NULL",
            CourseCompleted.TYPE,
            ids,
        )
    finally:
        await enrollment.close()
    issuance = await connect(environment.database_url("issuance"))
    try:
        rows = await issuance.fetch(
            "SELECT event_id, extract(epoch FROM processed_at) AS began FROM inbox"
            " WHERE event_id = ANY($1::text[])",
            [row["event_id"] for row in completed],
        )
        applied: dict[str, float] = {row["event_id"]: float(row["began"]) for row in rows}
    finally:
        await issuance.close()
    stages: list[list[float]] = [[] for _ in STAGES]
    for row in completed:
        enrollment_id = uuid.UUID(row["payload_id"])
        began_issuing = applied.get(row["event_id"])
        if began_issuing is None or enrollment_id not in recorded:
            continue
        stamps = [
            sent[enrollment_id] + to_wall,
            float(row["began"]),
            float(row["published"]),
            began_issuing,
            recorded[enrollment_id] + to_wall,
        ]
        for stage, (start, end) in zip(stages, itertools.pairwise(stamps), strict=True):
            stage.append(end - start)
    return stages


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile; `inf` entries (never recorded) sort last."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def steady_rate(times: Sequence[float]) -> float:
    """Items per second between the 10th and the 90th percentile of their completion times."""
    ordered = sorted(times)
    low, high = int(len(ordered) * 0.1), int(len(ordered) * 0.9)
    if high <= low or ordered[high] <= ordered[low]:
        return math.nan
    return (high - low) / (ordered[high] - ordered[low])


# --- the raw ceiling: the same signing and rows, no framework --------------------------------


@dataclass
class Ceiling:
    count: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else math.nan


def _completion(course: CourseSnapshot, partner_id: uuid.UUID, number: int) -> CourseCompleted:
    return CourseCompleted(
        enrollment_id=uuid.uuid4(),
        learner=Learner(
            learner_id=uuid.uuid4(), email=f"ceiling{number}@example.org", display_name=f"Learner {number}"
        ),
        course_id=course.course_id,
        course_version=course.version,
        completed_at=datetime.now(UTC),
        score=90,
        evidence_url=None,
        completed_by=CompletedBy.PARTNER,
        partner_id=partner_id,
    )


_CEILING_INBOX = (
    'INSERT INTO inbox (consumer, source, event_id, event_type, topic, partition, "offset")'
    " VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING"
)
_CEILING_INDEX = "INSERT INTO status_indexes (list_id, list_index) VALUES ($1, $2)"
_CEILING_CREDENTIAL = (
    "INSERT INTO credentials (credential_id, kind, learner_id, learner_email, learner_display_name,"
    " enrollment_id, course_id, course_version, issuer_id, achievement_id, achievement_name, document,"
    " document_sha256, issued_at, valid_until, revocation_list_id, revocation_index)"
    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)"
)
_CEILING_OUTBOX = (
    "INSERT INTO outbox (event_id, event_type, topic, message_key, payload, headers)"
    " VALUES ($1, $2, $3, $4, $5, $6)"
)


async def ceiling(
    environment: Environment,
    dsn: str,
    platform: Platform,
    course: CourseSnapshot,
    partner_id: uuid.UUID,
    count: int,
    meter: CpuMeter,
) -> tuple[Ceiling, CpuSplit]:
    """Consume `count` CourseCompleted, sign each credential, and write its rows, batch by batch;
    and the CPU spent from the loop's start to its last commit (publishing them first is not)."""
    topic = environment.prefix + "bench.ceiling"
    await kafka.ensure_topics(environment.bootstrap, [topic], partitions=3, replication=1)
    producer = AIOKafkaProducer(bootstrap_servers=environment.bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        deliveries = []
        for number in range(count):
            record = encode(_completion(course, partner_id, number), source="urn:microcred:enrollment")
            deliveries.append(
                await producer.send(topic, record.value, key=record.key, headers=record.headers)
            )
        await asyncio.gather(*deliveries)
    finally:
        await producer.stop()

    conn = await asyncpg.connect(dsn)
    list_id, now = uuid.uuid4(), datetime.now(UTC)
    await issuance_service.migrate(conn)
    await conn.execute(
        "INSERT INTO status_lists (list_id, purpose, size, bits, document, created_at, updated_at)"
        " VALUES ($1, $2, $3, $4, '{}', $5, $5)",
        list_id,
        STATUS_PURPOSE,
        status_list.MIN_LIST_SIZE,
        bytes(status_list.MIN_LIST_SIZE // 8),
        now,
    )
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=environment.bootstrap,
        group_id=environment.prefix + "ceiling",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    done, first, index = 0, 0.0, 0
    before = meter.sample()
    try:
        while done < count:
            batches = await consumer.getmany(timeout_ms=200, max_records=500)
            records = [record for batch in batches.values() for record in batch]
            if not records:
                continue
            first = first or time.monotonic()
            inbox, indexes, credentials, outbox = [], [], [], []
            for record in records:
                envelope = decode(record.headers, record.value)
                completion = envelope.event
                assert isinstance(completion, CourseCompleted)
                issued = datetime.now(UTC)
                issuance = platform.issuance(course.issuer.issuer_id, list_id, index, issued)
                credential = signed_course_credential(platform, issuance, course, completion, issued)
                event = encode(
                    domain.issued_event(credential, issuance.credential_url), source="urn:microcred:issuance"
                )
                inbox.append(
                    (
                        "ceiling",
                        envelope.source,
                        envelope.id,
                        envelope.type,
                        record.topic,
                        record.partition,
                        record.offset,
                    )
                )
                indexes.append((list_id, index))
                credentials.append(
                    (
                        issuance.credential_id,
                        CredentialKind.COURSE.value,
                        completion.learner.learner_id,
                        completion.learner.email,
                        completion.learner.display_name,
                        completion.enrollment_id,
                        course.course_id,
                        course.version,
                        course.issuer.issuer_id,
                        course.achievement.achievement_id,
                        course.achievement.name,
                        credential.document,
                        credential.document_sha256,
                        credential.issued_at,
                        credential.valid_until,
                        list_id,
                        index,
                    )
                )
                headers = json.dumps({name: value.decode() for name, value in event.headers})
                outbox.append(
                    (uuid.uuid4(), CredentialIssued.TYPE, event.topic, event.key, event.value, headers)
                )
                index += 1
            async with conn.transaction():
                await conn.executemany(_CEILING_INBOX, inbox)
                await conn.executemany(_CEILING_INDEX, indexes)
                await conn.executemany(_CEILING_CREDENTIAL, credentials)
                await conn.executemany(_CEILING_OUTBOX, outbox)
            await consumer.commit()
            done += len(records)
        # Sampled before the connection closes: a backend that has ended is not counted.
        return Ceiling(done, time.monotonic() - first), CpuSplit.between(before, meter.sample())
    finally:
        await consumer.stop()
        await conn.close()


# --- the catalog list API under load ---------------------------------------------------------


@dataclass
class HttpLoad:
    generator: str
    requests: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else math.nan


_WRK_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _wrk_ms(text: str, label: str) -> float:
    match = re.search(rf"^\s*{re.escape(label)}\s+([0-9.]+)(us|ms|s)\s*$", text, re.MULTILINE)
    return float(match[1]) * _WRK_UNITS[match[2]] if match else math.nan


def wrk_load(url: str, connections: int, seconds: int) -> HttpLoad:
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", url]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout  # noqa: S603
    requests = re.search(r"([0-9]+) requests in ([0-9.]+)(ms|s|m)", output)
    errors = re.search(r"Non-2xx or 3xx responses: ([0-9]+)", output)
    socket_errors = re.search(
        r"Socket errors: connect ([0-9]+), read ([0-9]+), write ([0-9]+), timeout ([0-9]+)", output
    )
    assert requests is not None, output
    elapsed = float(requests[2]) * {"ms": 0.001, "s": 1.0, "m": 60.0}[requests[3]]
    failed = int(errors[1]) if errors else 0
    failed += sum(int(value) for value in socket_errors.groups()) if socket_errors else 0
    return HttpLoad(
        f"wrk {' '.join(command[1:-1])}",
        int(requests[1]),
        failed,
        elapsed,
        _wrk_ms(output, "50%"),
        _wrk_ms(output, "99%"),
    )


@functools.cache
def install_wrk() -> str | None:
    """Put wrk on PATH when it is not there (Debian's package, by apt-get as root or with a sudo
    that asks no password): None once it is, else why it could not be."""
    if shutil.which("wrk"):
        return None
    apt = shutil.which("apt-get")
    if apt is None:
        return "no apt-get on this machine"
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    failure = ""
    # The package lists may be stale or absent: fetched again if the first try fails.
    for steps in ([["install", "-y", "wrk"]], [["update"], ["install", "-y", "wrk"]]):
        for step in steps:
            command = [*sudo, apt, "-q", *step]
            done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)  # noqa: S603
            failure = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        if shutil.which("wrk"):
            print("installed wrk (apt-get) for the catalog load", flush=True)
            return None
    return f"apt-get install wrk failed: {failure}"


async def http_load(url: str, connections: int, seconds: int) -> HttpLoad:
    """wrk (see `install_wrk`), else the asyncio generator below, saying why."""
    why_not = install_wrk()
    if why_not is None:
        return await asyncio.to_thread(wrk_load, url, connections, seconds)
    load = await python_load(url, connections, seconds)
    return dataclasses.replace(
        load,
        generator=f"{load.generator}; NOT wrk ({why_not}): this generator takes CPU the catalog would have",
    )


async def python_load(url: str, connections: int, seconds: int) -> HttpLoad:
    """A closed-loop asyncio load generator: `connections` clients, each one request at a time."""
    latencies: list[float] = []
    errors = 0
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=connections)) as client:
        deadline = time.monotonic() + seconds

        async def worker() -> None:
            nonlocal errors
            while time.monotonic() < deadline:
                started = time.monotonic()
                response = await client.get(url)
                latencies.append((time.monotonic() - started) * 1000)
                errors += response.status_code != 200

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.monotonic() - started
    return HttpLoad(
        f"python asyncio + httpx, {connections} connections",
        len(latencies),
        errors,
        elapsed,
        percentile(latencies, 0.5),
        percentile(latencies, 0.99),
    )


@dataclass
class CatalogMeasured:
    load: HttpLoad
    workers: int
    cpu_seconds: float  # of its processes, over the load
    profiles: dict[str, Path]
    profile_seconds: int

    @property
    def cpu_ms_per_request(self) -> float:
        return self.cpu_seconds / max(self.load.requests, 1) * 1000


async def measure_catalog(
    arguments: argparse.Namespace, catalog: Process, profile: bool, logs: Path
) -> CatalogMeasured:
    """`GET /courses` under load, and the CPU the catalog's processes spent on it; then again,
    shorter, with py-spy attached (not measured)."""
    url = f"http://127.0.0.1:{catalog.env['HTTP_PORT']}/courses"
    await python_load(url, 4, 1)  # warm-up
    before = family_cpu_seconds(pid(catalog))
    load = await http_load(url, arguments.catalog_connections, arguments.catalog_seconds)
    after = family_cpu_seconds(pid(catalog))
    spent = sum(seconds - before.get(process, 0.0) for process, seconds in after.items())
    profile_seconds = max(arguments.catalog_seconds // 2, 1) if profile else 0
    profiles: dict[str, Path] = {}
    if profile_seconds:
        with profiling({"catalog": pid(catalog)}, profile_seconds, logs) as profiles:
            await http_load(url, arguments.catalog_connections, profile_seconds + 1)
    return CatalogMeasured(load, arguments.catalog_workers, spent, profiles, profile_seconds)


# --- profiling with py-spy -------------------------------------------------------------------

# Components by the file a sample's innermost frame is in (py-spy's --full-filenames); first match wins.
CATEGORIES = (
    ("OpenTelemetry (spans per request, batch and message)", ("/opentelemetry/",)),
    (
        "signing: JSON-LD/RDFC, Ed25519",
        ("/pyld/", "/pyoxigraph/", "/issuance/jsonld.py", "/issuance/proofs.py", "/cryptography/"),
    ),
    ("asyncpg (driver, SQL round trips)", ("/asyncpg/",)),
    ("aiokafka (client)", ("/aiokafka/",)),
    ("FastStream + fast_depends (framework)", ("/faststream/", "/fast_depends/")),
    ("HTTP: uvicorn, starlette, FastAPI", ("/uvicorn/", "/starlette/", "/fastapi/", "/httptools/")),
    ("prometheus", ("/prometheus_client/", "/prometheus_fastapi_instrumentator/")),
    ("pydantic", ("/pydantic/", "/pydantic_core/")),
    ("logging + JSON log lines", ("/logging/", "/pythonjsonlogger/", "/json/")),
    ("email + SMTP", ("/email/", "/aiosmtplib/", "/smtplib")),
    ("asyncio / uvloop event loop", ("/asyncio/", "/uvloop/", "/anyio/")),
    ("service and runtime code", ("/libs/", "/services/")),
)
_IDLE = ("Condition.wait (", "Queue.get (", "Event.wait (")


def _category(frame: str) -> str:
    return next((name for name, needles in CATEGORIES if any(needle in frame for needle in needles)), "other")


def _function(frame: str) -> str:
    """`name (/path/to/package/module.py:123)` -> `name (package/module.py)`."""
    match = re.match(r"(.*) \((.*?)(?::[0-9]+)?\)$", frame)
    if not match:
        return frame
    return f"{match[1]} ({'/'.join(match[2].split('/')[-2:])})"


def summarize_profile(raw: Path, top: int = 12) -> list[str]:
    """Self time by component, and our functions with the most inclusive time, from py-spy's raw
    output; threads parked on a queue or condition count as idle."""
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [frame for frame in stack.split(";") if not frame.startswith(("process ", "thread "))]
        if not frames or frames[-1].startswith(_IDLE):
            continue
        total += count
        self_time[_category(frames[-1])] += count
        ours = {_function(frame) for frame in frames if "/libs/" in frame or "/services/" in frame}
        for function in ours:
            inclusive[function] += count
    if total == 0:
        return ["    (no samples)"]
    lines = [f"    {total} busy samples; self time by component:"]
    lines += [f"      {100 * count / total:5.1f}%  {name}" for name, count in self_time.most_common()]
    lines.append("    our functions with the most inclusive time:")
    entry_points = ("<module> (", "Service.run (", "Service._serve (", "supervise (", "_work (")
    shown = [(name, count) for name, count in inclusive.most_common() if not name.startswith(entry_points)]
    lines += [f"      {100 * count / total:5.1f}%  {name}" for name, count in shown[:top]]
    return lines


LOAD_SAMPLE_SECONDS = 2.0


@contextlib.contextmanager
def sampling_load() -> Iterator[list[float]]:
    """The machine's 1-minute load average, sampled in a thread of its own while the block runs:
    what else ran beside the benchmark is part of its figures."""
    samples = [os.getloadavg()[0]]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(LOAD_SAMPLE_SECONDS):
            samples.append(os.getloadavg()[0])

    sampler = threading.Thread(target=sample, name="load-sampler", daemon=True)
    sampler.start()
    try:
        yield samples
    finally:
        done.set()
        sampler.join()


def py_spy() -> str | None:
    """py-spy as the workspace's dev dependencies install it (beside this Python), else on PATH."""
    installed = Path(sys.executable).parent / "py-spy"
    return str(installed) if installed.exists() else shutil.which("py-spy")


@contextlib.contextmanager
def profiling(pids: dict[str, int], seconds: int, folder: Path) -> Iterator[dict[str, Path]]:
    """py-spy samples each process for `seconds` (non-blocking), raw stacks into `folder`."""
    spy = py_spy()
    outputs: dict[str, Path] = {}
    started: list[subprocess.Popen[bytes]] = []
    if spy and seconds > 0:
        for name, pid in pids.items():
            outputs[name] = folder / f"profile-{name}.txt"
            # --subprocesses: the HTTP workers of a service run with HTTP_WORKERS above 1.
            command = [spy, "record", "--pid", str(pid), "--duration", str(seconds), "--rate", "100"]
            command += ["--subprocesses"]
            command += [
                "--nonblocking",
                "--full-filenames",
                "--format",
                "raw",
                "--output",
                str(outputs[name]),
            ]
            started.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))  # noqa: S603
    try:
        yield outputs
    finally:
        for spy_process in started:
            spy_process.wait(timeout=seconds + 60)


# --- the report ------------------------------------------------------------------------------


@dataclass
class Figures:
    lines: list[str] = field(default_factory=list)

    def add(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)

    def target(self, name: str, value: str, target: str, passed: bool) -> None:
        self.add(f"  {'PASS' if passed else 'MISS'}  {name:<44} {value:>22}   target {target}")


def stage_lines(figures: Figures, stages: Sequence[Sequence[float]]) -> None:
    """Each stage's median and p99, seconds (the medians need not add up to the whole's)."""
    if not stages[0]:
        figures.add("    (no credential of the phase had all its stamps)")
        return
    figures.add(f"    stage by stage, over {len(stages[0])} credentials (p50 / p99):")
    for name, times in zip(STAGES, stages, strict=True):
        figures.add(
            f"      {_seconds(percentile(times, 0.5)):>9} / {_seconds(percentile(times, 0.99)):>9}  {name}"
        )


def latency_line(label: str, latencies: Sequence[float]) -> str:
    recorded = [value for value in latencies if math.isfinite(value)]
    if not recorded:
        return f"  {label}: nothing recorded"
    parts = [
        f"{name} {_seconds(percentile(latencies, fraction))}"
        for name, fraction in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))
    ]
    missing = len(latencies) - len(recorded)
    suffix = (
        f"; {missing} of {len(latencies)} not recorded within the wait (counted as infinite)"
        if missing
        else ""
    )
    return f"  {label}: {', '.join(parts)}, max {_seconds(max(recorded))}{suffix}"


def _seconds(value: float) -> str:
    if not math.isfinite(value):
        return "> wait"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def cpu_lines(split: CpuSplit, credentials: int) -> list[str]:
    """Each part's CPU seconds, share of the machine's busy time, and milliseconds per credential."""
    available = split.seconds * (os.cpu_count() or 1)
    per = max(credentials, 1) / 1000
    lines = [
        f"  over {split.seconds:.1f} s the machine was busy {split.machine:.1f} of {available:.1f} CPU-s"
        f" ({100 * split.machine / max(available, 1e-9):.0f}%):"
        f" {split.machine / per:.1f} CPU-ms per credential"
    ]
    known = {name: seconds for name, seconds in split.parts.items() if math.isfinite(seconds)}
    for name, seconds in sorted(known.items(), key=lambda item: -item[1]):
        lines.append(
            f"    {name:<24} {seconds:7.1f} CPU-s  {100 * seconds / max(split.machine, 1e-9):5.1f}%"
            f"  {seconds / per:6.2f} ms/credential"
        )
    lines += [f"    {name:<24}   n/a (not a local process)" for name in split.parts if name not in known]
    other = split.machine - sum(known.values())
    lines.append(
        f"    {'other (OS, other work)':<24} {other:7.1f} CPU-s"
        f"  {100 * other / max(split.machine, 1e-9):5.1f}%"
    )
    if other > NOISY_SHARE * split.machine:
        lines.append(
            f"  NOTE: other work took {100 * other / split.machine:.0f}% of the machine's busy time: these"
            " figures are lower than a quiet machine's"
        )
    return lines


def cpu_summary(split: CpuSplit, credentials: int) -> str:
    """One line: how busy the machine was, and each part's CPU-ms per credential."""
    available = split.seconds * (os.cpu_count() or 1)
    per = max(credentials, 1) / 1000
    known = sorted(
        ((name, seconds) for name, seconds in split.parts.items() if math.isfinite(seconds)),
        key=lambda item: -item[1],
    )
    parts = ", ".join(f"{name.split(' (')[0]} {seconds / per:.2f}" for name, seconds in known)
    return (
        f"CPU: the machine {100 * split.machine / max(available, 1e-9):.0f}% busy,"
        f" {split.machine / per:.1f} ms per credential; {parts}"
    )


def write_results(figures: Figures) -> None:
    notes = ""
    if RESULTS.exists():
        previous = RESULTS.read_text()
        if NOTES_MARKER in previous:
            notes = previous[previous.index(NOTES_MARKER) :]
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text("\n".join(figures.lines) + "\n\n" + (notes or NOTES_MARKER + "\n"))


# --- the run ---------------------------------------------------------------------------------


def service_processes(
    environment: Environment,
    scratch: Path,
    logs: Path,
    keys_dir: Path,
    smtp_port: int,
    trace_ratio: float,
    catalog_workers: int,
    replicas: int,
) -> dict[str, list[Process]]:
    """Each service's processes: `replicas` of each consumer of events, in one consumer group as
    deployed, and the catalog alone (its HTTP workers are its scale)."""
    jwks = scratch / "jwks.json"
    jwks.write_text(json.dumps({"keys": []}))
    processes: dict[str, list[Process]] = {}
    for name, replica in itertools.product(SERVICES, range(replicas)):
        if name == "catalog" and replica:
            continue
        port = free_port()
        env = {
            "DATABASE_URL": environment.database_url(name),
            "KAFKA_BOOTSTRAP_SERVERS": environment.bootstrap,
            "KAFKA_TOPIC_PREFIX": environment.prefix,
            "AUTH_ISSUER": "https://benchmark.invalid",
            "AUTH_JWKS_FILE": str(jwks),
            # Production's sampling (deploy/k8s/overlays/prod): unsampled spans still carry trace ids.
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": str(trace_ratio),
        }
        if name == "catalog":
            env |= {"HTTP_WORKERS": str(catalog_workers)}
        if name == "issuance":
            # One public address for all replicas, as behind a Service: it names the issuer's DID.
            first = processes["issuance"][0].ready_url.rsplit("/health", 1)[0] if replica else None
            env |= {"ISSUER_KEYS_DIR": str(keys_dir), "PUBLIC_BASE_URL": first or f"http://127.0.0.1:{port}"}
        if name == "notifications":
            env |= {"SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(smtp_port)}
        started = harness_processes.service(
            name, port=port, env=env, logs=logs, replica=replica + 1 if replica else None
        )
        processes.setdefault(name, []).append(started)
    return processes


@dataclass
class Paced:
    """A latency phase: reports published at a steady rate, and what became of them."""

    offered: float  # the rate achieved by the publisher, reports/s
    latencies: list[float]
    stages: list[list[float]]
    recorded_rate: float  # steady_rate of the phase's recording times
    cpu: CpuSplit  # from its first report to the last email or webhook its credentials caused
    fraction: float | None = None  # of the sustained rate; None for the --rate phase

    @property
    def kept_up(self) -> bool:
        return all(map(math.isfinite, self.latencies)) and self.recorded_rate >= KEPT_UP * self.offered

    @property
    def growth(self) -> float:
        """How much longer (s) the last fifth of the reports (in publishing order) took than the
        first fifth, medians: about 0 while the pipeline keeps up, the backlog's growth when not."""
        if not self.latencies:
            return math.nan
        fifth = max(len(self.latencies) // 5, 1)
        return percentile(self.latencies[-fifth:], 0.5) - percentile(self.latencies[:fifth], 0.5)


@dataclass
class Measured:
    """What one run measured; `report` turns it into the figures."""

    completions: int
    first_sent: float
    sent_all: float
    recorded: list[float]
    complete: bool
    notified: float | None
    delivered: float | None
    sustained: float
    throughput_cpu: CpuSplit
    profiles: dict[str, Path]
    profile_seconds: int
    raw: Ceiling
    ceiling_cpu: CpuSplit
    catalog: CatalogMeasured
    ladder: list[Paced]
    paced: Paced
    rss: dict[str, float]
    mail_sink: str  # what the emails went to

    def highest_kept_up(self) -> Paced | None:
        """The paced phase with the highest offered rate that the pipeline kept up with."""
        kept_up = [phase for phase in [*self.ladder, self.paced] if phase.kept_up]
        return max(kept_up, key=lambda phase: phase.offered, default=None)


async def run(arguments: argparse.Namespace) -> Measured:
    install_wrk()  # now, not amid the measured phases
    endpoints = infra.ensure_up()
    logs = ROOT / ".local" / "bench"
    logs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        keys_dir = scratch / "keys"
        keys.generate_key(keys_dir)
        async with throwaway(endpoints, [*SERVICES, "ceiling"], arguments.keep) as environment:
            with mail_sink(logs) as sink:
                return await run_services(arguments, environment, scratch, logs, keys_dir, sink)


async def run_services(
    arguments: argparse.Namespace,
    environment: Environment,
    scratch: Path,
    logs: Path,
    keys_dir: Path,
    sink: MailSink,
) -> Measured:
    """The services, started and ready, measured, and stopped."""
    replicas = service_processes(
        environment,
        scratch,
        logs,
        keys_dir,
        sink.port,
        arguments.trace_ratio,
        arguments.catalog_workers,
        arguments.replicas,
    )
    everything = list(itertools.chain.from_iterable(replicas.values()))
    for process in everything:
        process.log.write_bytes(b"")
        process.start()
    try:
        wait_ready(everything)
        return await measure(arguments, environment, replicas, sink, keys_dir, logs)
    finally:
        harness_processes.stop_all(everything)


async def set_up(
    environment: Environment, services: dict[str, Process], count: int
) -> tuple[CourseSnapshot, BenchPartner, list[Learnership]]:
    """The launch catalog in catalog; the benchmark's course in every read model (as an event);
    its partner and `count` active enrollments in enrollment's tables (bulk SQL)."""
    seed = [sys.executable, "-m", "catalog.seed"]
    catalog_env = {**os.environ, **services["catalog"].env}
    await asyncio.to_thread(subprocess.run, seed, env=catalog_env, check=True, capture_output=True)
    partner = BenchPartner(uuid.uuid4(), secrets.token_urlsafe(32))
    course = bench_course(partner.partner_id)
    await publish_course(environment, course)
    for service, table in (
        ("enrollment", "courses"),
        ("issuance", "course_versions"),
        ("notifications", "courses"),
    ):
        query = f"SELECT true FROM {table} WHERE course_id = $1"  # our own table names
        await wait_for_rows(environment.database_url(service), query, course.course_id)
    learners = await insert_partner_and_enrollments(
        environment.database_url("enrollment"), course, partner, count
    )
    return course, partner, learners


async def measure(
    arguments: argparse.Namespace,
    environment: Environment,
    replicas: dict[str, list[Process]],
    sink: MailSink,
    keys_dir: Path,
    logs: Path,
) -> Measured:
    services = {name: processes[0] for name, processes in replicas.items()}
    warmup, completions = arguments.warmup, arguments.completions
    profile_seconds = arguments.profile if py_spy() else 0
    paced_count = int(arguments.rate * arguments.duration)
    budget = warmup + completions + profile_seconds * PROFILE_RATE_BOUND
    budget += int(arguments.rate * arguments.low_duration) * len(arguments.fractions) + paced_count
    course, partner, enrolled = await set_up(environment, services, budget)
    learners = iter(enrolled)

    def take(count: int) -> list[Learnership]:
        return list(itertools.islice(learners, count))

    def latencies_of(sent: Sequence[Learnership]) -> list[float]:
        return [
            recorded.at.get(learner.enrollment_id, math.inf) - reporter.sent_at[learner.enrollment_id]
            for learner in sent
        ]

    async def stages_of(sent: Sequence[Learnership]) -> list[list[float]]:
        sent_at = {learner.enrollment_id: reporter.sent_at[learner.enrollment_id] for learner in sent}
        return await stage_times(environment, sent_at, recorded.at)

    notified_so_far = 0  # credential notifications the run has caused so far

    async def paced_phase(sent: Sequence[Learnership], rate: float, fraction: float | None) -> Paced:
        nonlocal notified_so_far
        before = meter.sample()
        offered = await reporter.paced(sent, rate)
        await recorded.until([learner.enrollment_id for learner in sent], within=arguments.drain)
        # The phase's emails and webhooks are its work too, and must not load the next phase.
        notified_so_far += len(sent)
        await notifications_recorded(notifications_dsn, notified_so_far, within=arguments.drain)
        await deliveries_done(notifications_dsn, within=arguments.drain)
        cpu = CpuSplit.between(before, meter.sample())
        times = [
            recorded.at[learner.enrollment_id] for learner in sent if learner.enrollment_id in recorded.at
        ]
        return Paced(offered, latencies_of(sent), await stages_of(sent), steady_rate(times), cpu, fraction)

    reporter = Reporter(environment, partner, course)
    meter = CpuMeter(
        {name: [pid(process) for process in processes] for name, processes in replicas.items()}
        | {MAIL_SINK: [sink.pid]},
        environment,
    )
    notifications_dsn = environment.database_url("notifications")
    await reporter.producer.start()
    try:
        async with Recorded(environment.database_url("issuance")).watching() as recorded:
            # 1. warm-up
            warm = take(warmup)
            await reporter.burst(warm)
            if not await recorded.until([learner.enrollment_id for learner in warm], within=120):
                raise SystemExit(f"the warm-up did not get through the pipeline; see the logs in {logs}")
            notified_so_far = warmup
            await notifications_recorded(notifications_dsn, notified_so_far, within=60)

            # 2. throughput
            burst = take(completions)
            ids = [learner.enrollment_id for learner in burst]
            before = meter.sample()
            await reporter.burst(burst)
            sent_all = time.monotonic()
            deadline = time.monotonic() + arguments.timeout
            await recorded.until(ids, within=arguments.timeout)
            notified_so_far += completions
            notified = await notifications_recorded(
                notifications_dsn, notified_so_far, within=max(deadline - time.monotonic(), 1.0)
            )
            delivered = await deliveries_done(notifications_dsn, within=max(deadline - time.monotonic(), 1.0))
            throughput_cpu = CpuSplit.between(before, meter.sample())
            times = [recorded.at[i] for i in ids if i in recorded.at]
            complete = len(times) == completions
            if not complete or notified is None or delivered is None:
                # Let the rest through (not measured), so that it does not load the phases after.
                await recorded.until(ids, within=arguments.drain)
                await notifications_recorded(notifications_dsn, notified_so_far, within=arguments.drain)
                await deliveries_done(notifications_dsn, within=arguments.drain)
            sustained = steady_rate(times)

            # 2b. a shorter burst with py-spy attached: its sampling costs CPU, so it is not measured
            profiles: dict[str, Path] = {}
            rate_bound = min(sustained if math.isfinite(sustained) else 50, PROFILE_RATE_BOUND)
            profiled = take(int(rate_bound * profile_seconds))
            if profiled:
                pids = {name: pid(services[name]) for name in PROFILED}
                with profiling(pids, profile_seconds, logs) as profiles:
                    await reporter.burst(profiled)
                    ids = [learner.enrollment_id for learner in profiled]
                    await recorded.until(ids, within=arguments.timeout)
                notified_so_far += len(profiled)
                await notifications_recorded(notifications_dsn, notified_so_far, within=arguments.timeout)
                await deliveries_done(notifications_dsn, within=arguments.timeout)

            # 3. the raw ceiling
            platform = Platform("http://127.0.0.1:8004", keys.load_keyring(keys_dir))
            raw, ceiling_cpu = await ceiling(
                environment,
                environment.database_url("ceiling"),
                platform,
                course,
                partner.partner_id,
                arguments.ceiling,
                meter,
            )

            # 4. the catalog list API
            catalog = await measure_catalog(arguments, services["catalog"], bool(profile_seconds), logs)

            # 5. latency at loads the pipeline sustains, lowest first
            ladder = []
            for fraction in sorted(arguments.fractions):
                rate = max(1.0, fraction * (sustained if math.isfinite(sustained) else 10))
                if rate >= arguments.rate:
                    break  # the --rate phase measures it
                if sent := take(int(rate * arguments.low_duration)):
                    ladder.append(await paced_phase(sent, rate, fraction))

            # 6. latency at the offered load
            paced = await paced_phase(take(paced_count), arguments.rate, None)
            rss = {
                name: max(largest_peak_rss_mb(pid(process)) for process in processes)
                for name, processes in replicas.items()
            }
            if meter.servers() != (meter.kafka, meter.postmaster):
                raise SystemExit(
                    "Kafka or PostgreSQL restarted during the run (another job on this machine?):"
                    " its figures mean nothing; run it again"
                )
            return Measured(
                completions=completions,
                first_sent=min(reporter.sent_at[learner.enrollment_id] for learner in burst),
                sent_all=sent_all,
                recorded=times,
                complete=complete,
                notified=notified,
                delivered=delivered,
                sustained=sustained,
                throughput_cpu=throughput_cpu,
                profiles=profiles,
                profile_seconds=profile_seconds,
                raw=raw,
                ceiling_cpu=ceiling_cpu,
                catalog=catalog,
                ladder=ladder,
                paced=paced,
                rss=rss,
                mail_sink=sink.what,
            )
    finally:
        await reporter.producer.stop()


def report(arguments: argparse.Namespace, measured: Measured) -> Figures:
    figures = Figures()
    cpus = os.cpu_count() or 1
    figures.add(f"microcred benchmark, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    figures.add(
        f"python {host.python_version()}, {host.machine()}, {cpus} CPUs shared by Kafka, PostgreSQL, the"
        f" services and this load generator; load average before the run {arguments.load_before:.1f},"
        f" during it median {statistics.median(arguments.load_during):.1f},"
        f" max {max(arguments.load_during):.1f} (sampled every {LOAD_SAMPLE_SECONDS:.0f} s)"
    )
    figures.add(f"command: {arguments.command}")
    figures.add(f"traces: a fraction {arguments.trace_ratio:g} of journeys sampled (--trace-ratio)")
    figures.add(f"emails: sent to {measured.mail_sink} on this machine; its CPU is the mail sink's line")
    figures.add()

    m = measured
    ratio = m.sustained / m.raw.rate if m.raw.rate else math.nan
    p99 = percentile(m.paced.latencies, 0.99) if m.paced.latencies else math.nan
    highest = m.highest_kept_up()
    highest_p99 = percentile(highest.latencies, 0.99) if highest else math.nan
    figures.add("Targets (the issue's), measured in this run:")
    figures.target(
        "end to end, sustained",
        f"{m.sustained:.0f} credentials/s",
        f">= {TARGET_CREDENTIALS_PER_SECOND:.0f}/s",
        m.sustained >= TARGET_CREDENTIALS_PER_SECOND,
    )
    figures.target(
        "p99 latency at the highest rate kept up with"
        + (f" ({highest.offered:.0f}/s)" if highest else " (none kept up)"),
        _seconds(highest_p99),
        f"<= {TARGET_P99_SECONDS:.0f} s",
        highest_p99 <= TARGET_P99_SECONDS,
    )
    figures.target(
        f"p99 latency at {arguments.rate:.0f}/s offered",
        _seconds(p99),
        f"<= {TARGET_P99_SECONDS:.0f} s",
        p99 <= TARGET_P99_SECONDS,
    )
    figures.target(
        "pipeline / raw ceiling", f"{ratio:.2f}", f">= {TARGET_CEILING_RATIO}", ratio >= TARGET_CEILING_RATIO
    )
    figures.target(
        "catalog list API",
        f"{m.catalog.load.rate:.0f} requests/s",
        f">= {TARGET_CATALOG_RPS:.0f}/s",
        m.catalog.load.rate >= TARGET_CATALOG_RPS,
    )
    figures.target(
        "catalog list API p99",
        f"{m.catalog.load.p99_ms:.1f} ms",
        f"<= {TARGET_CATALOG_P99_MS:.0f} ms",
        m.catalog.load.p99_ms <= TARGET_CATALOG_P99_MS,
    )
    for name, megabytes in m.rss.items():
        figures.target(
            f"peak RSS, {name}",
            f"{megabytes:.0f} MB",
            f"<= {TARGET_RSS_MB:.0f} MB",
            megabytes <= TARGET_RSS_MB,
        )

    pipeline_ms = m.throughput_cpu.own_seconds / max(len(m.recorded), 1) * 1000
    # The ceiling's loop runs in this process: its CPU, PostgreSQL's and Kafka's.
    ceiling_parts = (LOAD_GENERATOR, "postgresql", KAFKA)
    ceiling_seconds = sum(
        m.ceiling_cpu.parts[name] for name in ceiling_parts if math.isfinite(m.ceiling_cpu.parts[name])
    )
    ceiling_ms = ceiling_seconds / max(m.raw.count, 1) * 1000
    catalog_ms = m.catalog.cpu_ms_per_request
    catalog_cpus = min(m.catalog.workers, cpus)
    figures.add("  The same, projected from the CPU each took (what a quiet machine would do at best):")
    figures.add(
        f"        end to end: {pipeline_ms:.1f} CPU-ms per credential in Kafka, PostgreSQL and the services:"
        f" {cpus} CPUs sustain at most {cpus * 1000 / pipeline_ms:.0f} credentials/s"
    )
    figures.add(
        f"        raw ceiling: {ceiling_ms:.2f} CPU-ms per credential; pipeline / ceiling by CPU:"
        f" {ceiling_ms / pipeline_ms:.3f}"
    )
    figures.add(
        f"        catalog: {catalog_ms:.2f} CPU-ms per request, summed over its processes"
        f" ({m.catalog.workers} HTTP workers): at most {catalog_cpus * 1000 / catalog_ms:.0f} requests/s"
        f" on {catalog_cpus} CPUs"
    )
    figures.add()
    figures.add(f"1. End to end: {m.completions} signed partner reports published at once")
    last = max(m.recorded, default=m.first_sent)
    figures.add(
        f"  credentials recorded: {len(m.recorded)} of {m.completions}"
        + ("" if m.complete else " (gave up waiting)")
    )
    figures.add(
        f"  the cohort: {m.completions} completions reported at once, every credential recorded"
        f" {last - m.first_sent:.1f} s after the first report was published"
    )
    figures.add(
        f"  sustained {m.sustained:.1f}/s (between the 10th and 90th percentile of the recording times)"
    )
    figures.add(
        f"  overall {len(m.recorded) / max(last - m.first_sent, 1e-9):.1f}/s:"
        " first publish to last credential"
        f" {last - m.first_sent:.1f} s; publishing took {m.sent_all - m.first_sent:.2f} s"
    )
    if m.notified is not None:
        figures.add(
            f"  every credential notification recorded {m.notified - m.first_sent:.1f} s"
            " after the first publish"
        )
    else:
        figures.add("  notifications: not all recorded within the wait")
    if m.delivered is not None:
        figures.add(
            f"  every email and webhook they caused sent {m.delivered - m.first_sent:.1f} s"
            " after the first publish"
        )
    else:
        figures.add("  emails and webhooks: not all sent within the wait")
    figures.add("  CPU over the phase (first publish to the last email or webhook sent):")
    for line in cpu_lines(m.throughput_cpu, len(m.recorded)):
        figures.add(line)
    if m.profiles:
        figures.add(
            f"  where the services' time goes: py-spy (non-blocking, 100 Hz) over {m.profile_seconds} s of a"
            " second, shorter burst"
        )
        for name, path in m.profiles.items():
            figures.add(f"  {name}:")
            for line in summarize_profile(path) if path.exists() else ["    (py-spy wrote nothing)"]:
                figures.add(line)
    elif arguments.profile:
        figures.add("  (no profile: py-spy is not installed; `make sync` installs it)")

    figures.add()
    figures.add(f"2. Raw ceiling: {m.raw.count} CourseCompleted, the same signing and rows, no framework")
    figures.add(
        "  (aiokafka getmany(500) + asyncpg executemany of the inbox, status index, credential and outbox"
        " rows; one transaction and one offset commit per poll; one process)"
    )
    figures.add(
        f"  {m.raw.rate:.0f} credentials/s over {m.raw.seconds:.2f} s; pipeline / ceiling ="
        f" {m.sustained:.1f} / {m.raw.rate:.0f} = {ratio:.3f}"
    )
    parts = m.ceiling_cpu.parts
    figures.add(
        f"  CPU: {parts[LOAD_GENERATOR]:.1f} s in the loop's process,"
        f" {parts['postgresql']:.1f} s in"
        f" PostgreSQL, {parts[KAFKA]:.1f} s in Kafka"
    )

    figures.add()
    figures.add(
        "3. Catalog list API: GET /courses (the seeded launch catalog),"
        f" {arguments.catalog_seconds} s on loopback, catalog in {m.catalog.workers} HTTP workers"
        " (--catalog-workers)"
    )
    figures.add(f"  generator: {m.catalog.load.generator}")
    figures.add(
        f"  {m.catalog.load.rate:.0f} requests/s, p50 {m.catalog.load.p50_ms:.1f} ms,"
        f" p99 {m.catalog.load.p99_ms:.1f} ms, {m.catalog.load.requests} requests,"
        f" {m.catalog.load.errors} errors; {catalog_ms:.2f} CPU-ms per request in its processes"
    )
    for path in m.catalog.profiles.values():
        figures.add(f"  where catalog's time goes (py-spy over {m.catalog.profile_seconds} s of that load):")
        for line in summarize_profile(path) if path.exists() else ["    (py-spy wrote nothing)"]:
            figures.add(line)

    figures.add()
    figures.add("4. Latency: report published -> credential recorded (its transaction committed)")
    asked = f"{arguments.rate:.0f}/s asked, {arguments.duration:.0f} s, waited up to {arguments.drain:.0f} s"
    for phase in [*m.ladder, m.paced]:
        share = (
            f"{phase.fraction:.0%} of the sustained rate, {arguments.low_duration:.0f} s"
            if phase.fraction is not None
            else asked
        )
        kept = "kept up" if phase.kept_up else "fell behind"
        growth = phase.growth
        than_first = (
            f"the last fifth {_seconds(growth)} slower than the first"
            if not growth < 0
            else f"the last fifth {_seconds(-growth)} faster than the first"
        )
        label = (
            f"at {phase.offered:.0f}/s offered ({share}; recorded at {phase.recorded_rate:.0f}/s, "
            f"{than_first}: {kept})"
        )
        figures.add(latency_line(label, phase.latencies))
        stage_lines(figures, phase.stages)
        figures.add("    " + cpu_summary(phase.cpu, len(phase.latencies)))
    figures.add()
    figures.add("5. Peak RSS (VmHWM) of each service's largest process over the whole run:")
    figures.add("  " + ", ".join(f"{name} {megabytes:.0f} MB" for name, megabytes in m.rss.items()))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--completions",
        type=int,
        default=10_000,
        help="reports for the throughput phase, a term's cohort reported at once (10000)",
    )
    parser.add_argument("--warmup", type=int, default=100, help="reports sent first, not measured (100)")
    parser.add_argument(
        "--rate", type=float, default=500.0, help="offered load for the latency phase, reports/s (500)"
    )
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of offered load (30)")
    parser.add_argument(
        "--drain",
        type=float,
        default=120.0,
        help="longest wait for a paced phase's credentials after its last report (120 s)",
    )
    parser.add_argument(
        "--fractions",
        type=lambda text: [float(part) for part in text.split(",") if part],
        default=[0.5, 0.6, 0.7, 0.8, 0.9],
        help="latency phases at these fractions of the sustained rate, comma-separated (0.5,0.6,0.7,0.8,0.9)",
    )
    parser.add_argument(
        "--low-duration", type=float, default=20.0, help="each one's seconds; 0 skips them (20)"
    )
    parser.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="processes of each service consuming events (enrollment, issuance, notifications) (1)",
    )
    parser.add_argument("--ceiling", type=int, default=3000, help="events for the raw ceiling (3000)")
    parser.add_argument("--catalog-seconds", type=int, default=20, help="catalog load duration (20)")
    parser.add_argument("--catalog-connections", type=int, default=16, help="catalog load connections (16)")
    parser.add_argument(
        "--catalog-workers", type=int, default=2, help="the catalog's HTTP_WORKERS, one per CPU at most (2)"
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=20,
        help="py-spy seconds during the throughput phase when installed; 0 = off (20)",
    )
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="longest wait for the throughput phase (300 s)"
    )
    parser.add_argument(
        "--trace-ratio",
        type=float,
        default=0.1,
        help="fraction of journeys traced, as OTEL_TRACES_SAMPLER_ARG in production (0.1); 1 = all",
    )
    parser.add_argument("--keep", action="store_true", help="keep the run's databases and topics")
    arguments = parser.parse_args()
    arguments.command = " ".join(["benchmarks/pipeline.py", *sys.argv[1:]])
    arguments.load_before = os.getloadavg()[0]
    started = time.monotonic()
    with sampling_load() as arguments.load_during:
        measured = asyncio.run(run(arguments))
    figures = report(arguments, measured)
    figures.add(
        f"\n(the run took {time.monotonic() - started:.0f} s; service logs and raw profiles in .local/bench/)"
    )
    write_results(figures)
    print(f"written to {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
