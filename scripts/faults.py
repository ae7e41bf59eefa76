#!/usr/bin/env python3
"""Fault injection: N partner completions through the whole deployment while its parts are killed.

    make faults                                           # the full form: 100,000 completions
    python scripts/faults.py --completions N --seed S     # any size; the seed fixes the fault plan

The deployment is the one the design defends, on this machine: every service as `--replicas`
processes (2; one consumer group per service, each replica on its own port), a 3-broker KRaft
cluster of its own (`harness.cluster`, wiped fresh for each run; topics with replication factor 3,
min.insync.replicas 2), the project's PostgreSQL (databases `faults_<service>`, made afresh), the
payment provider's simulator, a mail sink and a webhook receiver that journal what they receive.

1. Staff create the courses and a pathway of three through the catalog's API; a partner is
   registered; the receiver is subscribed to CredentialIssued; single-course learners enroll in a
   free course through the API.
2. The flow: the partner publishes signed completion reports with a plain Kafka client while,
   spread among the singles, a share of learners (`--pathway-share`, 10%) take the whole pathway
   at once: they browse it in the catalog, enroll in its three paid courses, pay each through
   billing and the provider (whose webhook settles the payment, so billing is in the path), and
   once enrollment has activated all three the partner reports every part at once.
3. At seeded random points of the flow, one fault at a time: SIGKILL of one replica of each
   service (its twin keeps working), of the mail sink, of the cluster's active controller, of the
   leader of a partition of the partner's completion topic, and of PostgreSQL (every process at
   once: crash recovery); each victim is restarted after a seeded downtime and the recovery timed.
4. The pipeline drains (or the run gives up, with a diagnosis, when nothing moves for
   `--stall-timeout`), and `harness.accounting` counts from the records, not from the runner's
   memory, whether every report became exactly one credential, every pathway learner exactly one
   pathway credential, and each credential one in-app notification, one email and one webhook.

The figures are printed and written to `tests/faults/results/latest.txt`; `run(Config(...))` is
what `tests/faults/test_faults.py` calls for the shortened form.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import functools
import json
import logging
import random
import signal
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent))
import infra
from dev_issuer import DevIssuer
from harness import accounting, processes, sinks, workload
from harness.accounting import FaultRecord, Result
from harness.balancer import Balancer, Replicas
from harness.cluster import KafkaCluster
from harness.monitor import Counts, Database, Monitor, Stage, Stalled
from harness.processes import HOST, Process
from harness.sinks import MailJournal, WebhookJournal, WebhookReceiver
from harness.workload import Api, Catalog, Learner, PathwayLearner, Publisher, Workload

from issuance import keys
from microcred_events import Topic

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "tests" / "faults" / "results"
SERVICES = ("catalog", "enrollment", "billing", "issuance", "notifications")
MAIL_SINK = "mail-sink"
CONTROLLER = "kafka-controller"
LEADER = "kafka-leader"
POSTGRES = "postgres"
TARGETS = (*SERVICES, MAIL_SINK, CONTROLLER, LEADER, POSTGRES)
ISSUER = "https://issuer.faults.test"
PATHWAY_COURSES = 3
PATHWAY_PRICE_MINOR = 4900
# After the victim is back, the survivors' stall is still watched this long: a replica that
# rejoins its consumer group makes the group rebalance again.
SETTLE_SECONDS = 5.0


class FaultRunError(RuntimeError):
    """The run could not go on (a process that does not come back, a pipeline that stopped)."""


@dataclass(frozen=True)
class Config:
    completions: int = 1000
    seed: int = 1
    # Faults per target: each round kills every target once, in a seeded order.
    rounds: int = 1
    replicas: int = 2
    brokers: int = 3
    # The share of learners who take the whole pathway (each completes all its courses).
    pathway_share: float = 0.1
    # How far the workload may run ahead of the next fault's trigger point. Small values keep
    # work flowing across every fault of a short run; the full form releases large bursts.
    lead: int | None = None
    # Enrollment requests in flight for the single-course learners (measured on a 2-core machine
    # with everything co-located: beyond a few in flight they only queue and contend).
    concurrency: int = 8
    # Pathway learners browsing, enrolling and paying at once during the flow.
    pathway_concurrency: int = 16
    stall_timeout: float = 300.0
    ready_timeout: float = 180.0
    # Each fault keeps its victim down for a seeded random time up to this, before the restart.
    max_downtime: float = 3.0
    poll_interval: float = 1.0
    workdir: Path | None = None
    report: Path | None = RESULTS / "latest.txt"

    @property
    def effective_lead(self) -> int:
        return self.lead if self.lead is not None else max(10, self.completions // 10)

    @property
    def pathway_learners(self) -> int:
        """k learners taking the pathway among L learners in all (k = share x L), their
        completions and the singles' adding up to N: N = L + (courses - 1) k."""
        share = self.pathway_share
        return round(share * self.completions / (1 + (PATHWAY_COURSES - 1) * share))

    @property
    def singles(self) -> int:
        return self.completions - PATHWAY_COURSES * self.pathway_learners


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# The deployment
# --------------------------------------------------------------------------------------------------


@dataclass
class Deployment:
    """What one run owns: its cluster, databases, topic prefix, processes, keys and sinks."""

    config: Config
    run_id: str
    workdir: Path
    cluster: KafkaCluster
    database_urls: dict[str, str]
    services: dict[str, Replicas]
    fronts: dict[str, tuple[Balancer, int]]  # a Service-like address per service
    sink: Process
    simulator: Process
    issuer: DevIssuer
    receiver: WebhookReceiver
    receiver_port: int
    mail: MailJournal
    webhooks: WebhookJournal

    @property
    def prefix(self) -> str:
        return f"faults-{self.run_id}."

    @property
    def processes(self) -> list[Process]:
        return [process for replicas in self.services.values() for process in replicas.processes] + [
            self.sink,
            self.simulator,
        ]

    def front(self, service: str) -> str:
        return f"http://{HOST}:{self.fronts[service][1]}"

    def token(self, subject: str, role: str, email: str, name: str | None) -> str:
        return self.issuer.token(subject, [role], email=email, name=name, ttl=24 * 3600)


async def _recreate_databases(postgres_url: str) -> dict[str, str]:
    admin = await asyncpg.connect(postgres_url)
    try:
        urls = {}
        for service in SERVICES:
            name = f"faults_{service}"
            # FORCE: a process of an earlier, interrupted run may still hold a connection.
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await admin.execute(f'CREATE DATABASE "{name}"')
            urls[service] = urlunsplit(urlsplit(postgres_url)._replace(path=f"/{name}"))
        return urls
    finally:
        await admin.close()


def _deploy(config: Config, cluster: KafkaCluster, database_urls: dict[str, str]) -> Deployment:
    run_id = uuid.uuid4().hex[:8]
    workdir = config.workdir or RESULTS / "runs" / run_id
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    issuer = DevIssuer(workdir / "issuer", issuer=ISSUER, audience="microcred")
    jwks = workdir / "jwks.json"
    jwks.write_text(json.dumps(issuer.jwks()))
    keys_dir = workdir / "issuer-keys"
    if not any(keys_dir.glob("*.pem")):
        keys.generate_key(keys_dir)
    ports = {name: processes.free_port() for name in ("smtp", "sink-http", "simulator", "receiver")}
    fronts = {service: processes.free_port() for service in SERVICES}
    payment_secret = uuid.uuid4().hex + uuid.uuid4().hex
    base = processes.clean_environment()
    common = {
        **base,
        "KAFKA_BOOTSTRAP_SERVERS": cluster.bootstrap,
        "KAFKA_TOPIC_PREFIX": f"faults-{run_id}.",
        "KAFKA_TOPIC_REPLICATION": str(config.brokers),
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
        "catalog": {},
        "enrollment": {},
        "billing": {
            "PAYMENT_PROVIDER_URL": f"http://{HOST}:{ports['simulator']}",
            "PAYMENT_WEBHOOK_SECRET": payment_secret,
        },
        "issuance": {
            "ISSUER_KEYS_DIR": str(keys_dir),
            # The replicas' one public address, as behind a Kubernetes Service.
            "PUBLIC_BASE_URL": f"http://{HOST}:{fronts['issuance']}",
            # What a race between replicas leaves behind is finished within seconds of a short run.
            "ISSUANCE_SWEEP_INTERVAL_SECONDS": "5",
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
    services = {
        service: Replicas(
            service,
            processes.replicas(
                service,
                config.replicas,
                env=lambda _replica, _port, service=service: {  # type: ignore[misc]
                    **common,
                    **own[service],
                    "DATABASE_URL": database_urls[service],
                },
                logs=logs,
                inherit=False,
            ),
        )
        for service in SERVICES
    }
    mail_journal = workdir / "mail.jsonl"
    webhook_journal = workdir / "webhooks.jsonl"
    for journal in (mail_journal, webhook_journal):
        journal.unlink(missing_ok=True)
    sink = Process(
        MAIL_SINK,
        [sys.executable, sinks.__file__, "mail-sink", str(mail_journal)],
        {
            **base,
            "SINK_HOST": HOST,
            "SINK_SMTP_PORT": str(ports["smtp"]),
            "SINK_HTTP_PORT": str(ports["sink-http"]),
        },
        f"http://{HOST}:{ports['sink-http']}/health/live",
        logs / f"{MAIL_SINK}.log",
        inherit=False,
    )
    simulator = Process(
        "payment-simulator",
        [sys.executable, "-m", "billing.simulator"],
        {
            **base,
            "SIMULATOR_HOST": HOST,
            "SIMULATOR_PORT": str(ports["simulator"]),
            # Billing's Service address: the provider's webhooks reach whichever replica runs.
            "SIMULATOR_WEBHOOK_URL": f"http://{HOST}:{fronts['billing']}/webhooks/provider",
            "SIMULATOR_WEBHOOK_SECRET": payment_secret,
        },
        f"http://{HOST}:{ports['simulator']}/health/ready",
        logs / "payment-simulator.log",
        inherit=False,
    )
    return Deployment(
        config=config,
        run_id=run_id,
        workdir=workdir,
        cluster=cluster,
        database_urls=database_urls,
        services=services,
        fronts={service: (Balancer(services[service]), port) for service, port in fronts.items()},
        sink=sink,
        simulator=simulator,
        issuer=issuer,
        receiver=WebhookReceiver(webhook_journal),
        receiver_port=ports["receiver"],
        mail=MailJournal(mail_journal),
        webhooks=WebhookJournal(webhook_journal),
    )


# --------------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------------


def _thresholds(rng: random.Random, faults: int, credentials: int) -> list[int]:
    """Credential counts at which the faults fire: one in each of `faults` equal strata of the
    middle of the run, so they are spread out yet at unpredictable moments."""
    if faults == 0:
        return []
    low, high = 0.05 * credentials, 0.8 * credentials
    width = (high - low) / faults
    return [max(1, int(low + width * (index + rng.random()))) for index in range(faults)]


def _reached(threshold: int, counts: Counts) -> bool:
    return counts.credentials >= threshold


_CREDENTIALS = Stage("credentials", lambda counts: counts.credentials >= counts.credentials_due)
_STAGES: dict[str, Stage] = {
    "catalog": Stage(
        "catalog_reads",
        lambda c: c.catalog_reads >= (1 + PATHWAY_COURSES) * c.progress.pathway_started,
    ),
    "enrollment": Stage("completed", lambda c: c.completed >= c.sent),
    # A payment counts when it is opened (billing's consumer) and again when it is settled.
    "billing": Stage("billed", lambda c: c.billed >= 2 * PATHWAY_COURSES * c.progress.pathway_started),
    "issuance": _CREDENTIALS,
    "notifications": Stage("notified", lambda c: c.in_app >= c.credentials_due),
    MAIL_SINK: Stage("mails", lambda c: c.emails >= c.credentials_due and c.open_deliveries == 0),
    CONTROLLER: _CREDENTIALS,
    LEADER: _CREDENTIALS,
    POSTGRES: _CREDENTIALS,
}


class Faults:
    """The faults, one at a time, and the supervision of the processes while the work flows."""

    def __init__(self, deployment: Deployment, result: Result, monitor: Monitor, load: Workload) -> None:
        self.deployment = deployment
        self.config = deployment.config
        self.result = result
        self.monitor = monitor
        self.load = load
        self.first_report: Callable[[], float | None] = lambda: None
        self.publishing: asyncio.Task[None] | None = None

    def supervise(self) -> None:
        """Like an orchestrator: a process that died on its own is restarted, and reported; a
        learner who gave up, or a publisher that stopped, ends the run."""
        self.load.check()
        if self.publishing is not None and self.publishing.done():
            self.publishing.result()
            raise FaultRunError("the publisher stopped")
        for process in self.deployment.processes:
            code = process.exited
            if code is not None and not process.held_down:
                incident = (
                    f"{process.name} exited on its own with {code}; restarted. Last lines:\n{process.tail()}"
                )
                _say(f"  INCIDENT: {incident}")
                self.result.incidents.append(incident)
                process.start()

    async def inject(self, target: str, rng: random.Random, release: Callable[[], None]) -> FaultRecord:
        """Kill `target`'s victim, keep it down a while, bring it back; `release` lets more work
        flow meanwhile. Ready is timed from the kill until every process answers ready again; the
        stage's recovery from the kill until its counter grew after that (its stall is read from
        the monitor's history, up to SETTLE_SECONDS later at least)."""
        counts = await self.monitor.fresh()
        stage = _STAGES[target]
        started = self.first_report() or time.monotonic()
        record = FaultRecord(
            target=target,
            victim=target,
            at=time.monotonic() - started,
            credentials_at=counts.credentials,
            downtime=round(rng.uniform(0, self.config.max_downtime), 1),
            stage=stage.counter,
            redundant=target in (*SERVICES, CONTROLLER, LEADER),
        )
        killed = time.monotonic()
        if target in SERVICES:
            await self._replica(target, rng, record, release)
        elif target == MAIL_SINK:
            await self._sink(record, release)
        elif target in (CONTROLLER, LEADER):
            await self._broker(target, rng, record, release)
        else:
            await self._postgres(record, release)
        try:
            await processes.wait_ready(self.deployment.processes, self.config.ready_timeout)
        except processes.NotReady as exc:
            raise FaultRunError(f"after the {record.victim} fault: {exc}") from None
        ready = time.monotonic()
        record.ready_after = ready - killed
        before = stage.value(await self.monitor.fresh())

        def moved(counts: Counts) -> bool:
            # Or nothing left to move: a pipeline fast enough to finish all that was released
            # before the fault would otherwise wait here for work the plan releases only later.
            return stage.value(counts) > before or stage.finished(counts)

        after = await self.monitor.until(
            f"{stage.counter} to move after the {record.victim} fault", moved, self.config.stall_timeout
        )
        if stage.value(after) > before:
            record.moving_after = time.monotonic() - killed
        else:
            record.note = "nothing left to do"
        await asyncio.sleep(max(0.0, ready + SETTLE_SECONDS - time.monotonic()))
        record.stall = self.monitor.longest_stall(stage, killed, time.monotonic())
        _say(f"  {record.row()}")
        return record

    async def _replica(
        self, service: str, rng: random.Random, record: FaultRecord, release: Callable[[], None]
    ) -> None:
        replicas = self.deployment.services[service].processes
        running = [process for process in replicas if process.running]
        victim = rng.choice(running)
        twins = {process.name: process.pid for process in running if process is not victim}
        record.victim, record.survivors = f"{victim.name} ({len(twins)} of {len(replicas)} left)", len(twins)
        _say(f"fault: SIGKILL {victim.name} at {record.credentials_at} credentials, down {record.downtime}s")
        victim.held_down = True
        killed_pid = victim.kill()
        release()
        await asyncio.sleep(record.downtime)
        victim.start()
        victim.held_down = False
        kept = all(
            process.running and process.pid == twins[process.name]
            for process in replicas
            if process.name in twins
        )
        record.checks["killed"] = f"pid {killed_pid}"
        record.checks["twin kept running"] = "yes" if twins and kept else "NO"
        record.confirmed = killed_pid is not None and bool(twins) and kept

    async def _sink(self, record: FaultRecord, release: Callable[[], None]) -> None:
        sink = self.deployment.sink
        _say(f"fault: SIGKILL {MAIL_SINK} at {record.credentials_at} credentials, down {record.downtime}s")
        sink.held_down = True
        killed_pid = sink.kill()
        release()
        await asyncio.sleep(record.downtime)
        sink.start()
        sink.held_down = False
        record.checks["killed"] = f"pid {killed_pid}"
        record.confirmed = killed_pid is not None

    async def _broker(
        self, target: str, rng: random.Random, record: FaultRecord, release: Callable[[], None]
    ) -> None:
        cluster = self.deployment.cluster
        controller = await cluster.controller()
        topic = self.deployment.prefix + Topic.PARTNER_COMPLETION
        if target == CONTROLLER:
            node = controller
            record.victim = f"broker {node} (controller)"

            async def moved() -> str | None:
                now = await cluster.controller()
                return f"controller {node} -> {now}" if now != node else None
        else:
            leaders = await cluster.leaders([topic])
            # A leader that is not the controller too, when there is one: the two faults differ.
            candidates = sorted(item for item in leaders.items() if item[1] != controller) or sorted(
                leaders.items()
            )
            (_, partition), node = rng.choice(candidates)
            record.victim = f"broker {node} (partition leader)"

            async def moved() -> str | None:
                now = (await cluster.leaders([topic])).get((topic, partition))
                return (
                    f"{Topic.PARTNER_COMPLETION}/{partition} leader {node} -> {now}"
                    if now not in (node, None, -1)
                    else None
                )

        _say(
            f"fault: SIGKILL {record.victim} at {record.credentials_at} credentials, down {record.downtime}s"
        )
        killed_pid = await asyncio.to_thread(cluster.kill, node)
        watching = asyncio.create_task(_observe(moved, self.config.ready_timeout))
        release()
        await asyncio.sleep(record.downtime)
        await asyncio.to_thread(cluster.start, node)
        await asyncio.to_thread(cluster.wait_ready, node, self.config.ready_timeout)
        change = await watching
        record.checks["killed"] = f"pid {killed_pid}"
        record.checks["seen"] = change or "no failover seen"
        record.confirmed = change is not None

    async def _postgres(self, record: FaultRecord, release: Callable[[], None]) -> None:
        log = infra.PG_LOCAL / "postgres.log"
        offset = log.stat().st_size if log.exists() else 0
        _say(f"fault: SIGKILL PostgreSQL at {record.credentials_at} credentials, down {record.downtime}s")
        killed = await asyncio.to_thread(infra.crash_postgres)
        record.victim = f"PostgreSQL ({killed} processes)"
        release()
        await asyncio.sleep(record.downtime)
        await asyncio.to_thread(infra.ensure_up, kafka=False)
        with log.open("rb") as text:
            text.seek(offset)
            after = text.read().decode(errors="replace")
        recovered = "not properly shut down" in after or "automatic recovery in progress" in after
        record.checks["crash recovery"] = "ran" if recovered else "NOT in the server log"
        record.confirmed = killed > 0 and recovered


async def _observe(change: Callable[[], Any], within: float) -> str | None:
    """Poll `change()` until it names what changed; None when nothing changed `within` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            seen = await change()
            if seen is not None:
                return str(seen)
        await asyncio.sleep(0.5)
    return None


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _one_run_at_a_time() -> Iterator[None]:
    """Two runs on one checkout would drop each other's databases and cluster: the second refuses."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    with (RESULTS / ".lock").open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FaultRunError(f"another fault run is in progress (it holds {RESULTS / '.lock'})") from None
        yield


async def run(config: Config) -> Result:
    """The whole fault run; PostgreSQL is up again and the run's cluster stopped when it returns."""
    with _one_run_at_a_time():
        return await _run_alone(config)


async def _run_alone(config: Config) -> Result:
    started = time.monotonic()
    endpoints = await asyncio.to_thread(infra.ensure_up, kafka=False)
    cluster = KafkaCluster(nodes=config.brokers)
    result = Result(completions=config.completions, seed=config.seed, prefix="", replicas=config.replicas)
    try:
        await asyncio.to_thread(cluster.wipe)
        await asyncio.to_thread(cluster.up, config.ready_timeout)
        result.brokers = config.brokers
        database_urls = await _recreate_databases(endpoints.postgres_url)
        deployment = _deploy(config, cluster, database_urls)
        result.prefix = deployment.prefix
        _say(
            f"fault run {deployment.run_id}: {config.completions} completions "
            f"({config.singles} single, {config.pathway_learners} pathway learners x {PATHWAY_COURSES}), "
            f"seed {config.seed}, {config.replicas} replicas a service, {config.brokers} brokers, "
            f"in {deployment.workdir}"
        )
        databases = {service: Database(url) for service, url in database_urls.items()}
        try:
            async with contextlib.AsyncExitStack() as stack:
                await stack.enter_async_context(
                    sinks.serving(deployment.receiver.app(), deployment.receiver_port, "webhook-receiver")
                )
                for service, (front, port) in deployment.fronts.items():
                    await stack.enter_async_context(sinks.serving(front.app(), port, f"{service}-front"))
                    stack.push_async_callback(front.close)
                await _run(deployment, result, databases, started)
        finally:
            for process in deployment.processes:
                process.held_down = True
            await asyncio.to_thread(processes.stop_all, deployment.processes, 15.0)
            for database in databases.values():
                await database.close()
    finally:
        # Whatever happened above, PostgreSQL runs for whoever comes next; the cluster was ours.
        await asyncio.to_thread(infra.ensure_up, kafka=False)
        await asyncio.to_thread(cluster.down)
    result.timings["total"] = time.monotonic() - started
    return result


async def _run(
    deployment: Deployment, result: Result, databases: dict[str, Database], started: float
) -> None:
    config = deployment.config
    for process in deployment.processes:
        process.start()
    try:
        await processes.wait_ready(deployment.processes, config.ready_timeout)
    except processes.NotReady as exc:
        raise FaultRunError(str(exc)) from None
    result.timings["start"] = time.monotonic() - started

    api = Api(deployment.services, deployment.token, deadline=config.stall_timeout)
    try:
        await _flow(deployment, result, databases, api)
    finally:
        await api.close()


async def _flow(deployment: Deployment, result: Result, databases: dict[str, Database], api: Api) -> None:
    config = deployment.config
    setting_up = time.monotonic()
    partner = await workload.register_partner(api, "Faultline Institute")
    single = await workload.publish_course(
        api, title="Fault Tolerance Fundamentals", price_minor=0, partner_id=partner.partner_id
    )
    parts = [
        await workload.publish_course(
            api,
            title=f"Resilience, part {part}",
            price_minor=PATHWAY_PRICE_MINOR,
            partner_id=partner.partner_id,
        )
        for part in range(1, PATHWAY_COURSES + 1)
    ]
    pathway = await workload.publish_pathway(api, title="Resilience Pathway", course_ids=parts)
    deployment.receiver.secret = await workload.subscribe_webhooks(
        api, f"http://{HOST}:{deployment.receiver_port}/hook"
    )
    result.timings["setup"] = time.monotonic() - setting_up

    learners = [
        Learner(f"faults-{deployment.run_id}-learner-{n}", n)
        for n in range(config.singles + config.pathway_learners)
    ]
    enrolling = time.monotonic()
    singles = await workload.enroll_all(
        api, learners[: config.singles], single, deployment.run_id, config.concurrency, _say
    )
    result.timings["enroll"] = time.monotonic() - enrolling
    result.enroll_rate = len(singles) / result.timings["enroll"] if singles else 0.0
    _say(f"enrolled {len(singles)} learners in {result.timings['enroll']:.1f}s ({result.enroll_rate:.0f}/s)")

    publisher = Publisher(deployment.cluster.bootstrap, deployment.prefix + Topic.PARTNER_COMPLETION, _say)
    load = Workload(
        workload.interleave(singles, [PathwayLearner(learner) for learner in learners[config.singles :]]),
        api=api,
        catalog=Catalog(pathway, tuple(parts), single),
        partner=partner,
        publisher=publisher,
        simulator=deployment.simulator.url,
        run_id=deployment.run_id,
        concurrency=config.pathway_concurrency,
    )
    monitor = Monitor(
        databases, deployment.mail, deployment.webhooks, load.progress, config.poll_interval, _say
    )
    faults = Faults(deployment, result, monitor, load)
    faults.first_report = lambda: publisher.started_at
    faults.publishing = asyncio.create_task(publisher.run(), name="publisher")
    tasks = [asyncio.create_task(monitor.run(faults.supervise), name="monitor"), faults.publishing]
    reports = load.reports
    due = reports + config.pathway_learners
    rng = random.Random(config.seed)  # noqa: S311  (seeded on purpose: a fault plan one can replay)
    plan = [target for _ in range(config.rounds) for target in rng.sample(TARGETS, len(TARGETS))]
    thresholds = _thresholds(rng, len(plan), due)
    lead = config.effective_lead
    flowing = time.monotonic()
    try:
        load.allow(thresholds[0] + lead if plan else reports)
        for index, (target, threshold) in enumerate(zip(plan, thresholds, strict=True)):
            following = thresholds[index + 1] + lead if index + 1 < len(plan) else reports
            await monitor.until(
                f"{threshold} credentials", functools.partial(_reached, threshold), config.stall_timeout
            )
            result.faults.append(await faults.inject(target, rng, functools.partial(load.allow, following)))
        load.allow(reports)
        await monitor.until(
            "every report to be acknowledged", lambda c: c.sent >= reports, config.stall_timeout
        )
        result.timings["publish"] = time.monotonic() - flowing
        await monitor.until(
            "the pipeline to drain",
            lambda c: (
                c.credentials >= due
                and c.in_app >= due
                and c.emails >= due
                and c.webhooks >= due
                and c.backlog == 0
                and c.open_deliveries == 0
            ),
            config.stall_timeout,
        )
    except Stalled as exc:
        result.diagnosis = await _diagnose(deployment, databases, str(exc))
    finally:
        # The final accounting reads what the monitor reads: stop it and the workload first.
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await load.stop()
    result.timings["flow"] = time.monotonic() - flowing
    result.postgres_fault = "SIGKILL" if any(fault.target == POSTGRES for fault in result.faults) else "none"
    counting = time.monotonic()
    await accounting.account(
        result,
        databases=databases,
        mail=deployment.mail,
        webhooks=deployment.webhooks,
        bootstrap=deployment.cluster.bootstrap,
        prefix=deployment.prefix,
        partner_id=partner.partner_id,
        pathway_id=pathway,
        pathway_courses=set(parts),
    )
    result.timings["account"] = time.monotonic() - counting


async def _diagnose(deployment: Deployment, databases: dict[str, Database], why: str) -> str:
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
    for process in deployment.processes:
        lines.append(f"  {process.name}: {process.state()}; last lines of {process.log}:")
        lines += [f"    {line[:300]}" for line in process.tail(8).splitlines()]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def _parse(argv: Sequence[str] | None) -> Config:
    parser = argparse.ArgumentParser(
        prog="faults.py", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument(
        "--completions", type=int, default=Config.completions, help="N, the completion reports"
    )
    parser.add_argument(
        "--seed", type=int, default=Config.seed, help="fixes the fault order, moments and downtimes"
    )
    parser.add_argument("--rounds", type=int, default=Config.rounds, help="faults per target")
    parser.add_argument("--replicas", type=int, default=Config.replicas, help="processes a service")
    parser.add_argument(
        "--pathway-share",
        type=float,
        default=Config.pathway_share,
        help="share of learners taking the pathway",
    )
    parser.add_argument(
        "--lead", type=int, default=None, help="how far the workload runs ahead of the next fault"
    )
    parser.add_argument(
        "--concurrency", type=int, default=Config.concurrency, help="enrollment requests in flight"
    )
    parser.add_argument(
        "--pathway-concurrency",
        type=int,
        default=Config.pathway_concurrency,
        help="pathway learners enrolling and paying at once",
    )
    parser.add_argument(
        "--stall-timeout", type=float, default=Config.stall_timeout, help="give up when nothing moves"
    )
    parser.add_argument(
        "--max-downtime", type=float, default=Config.max_downtime, help="longest outage per fault"
    )
    parser.add_argument("--report", type=Path, default=Config.report, help="where the figures are written")
    parser.add_argument("--workdir", type=Path, default=None, help="logs, keys and the journals")
    args = parser.parse_args(argv)
    if args.completions < 1 or args.rounds < 0 or args.replicas < 2 or not 0 <= args.pathway_share <= 1:
        parser.error(
            "--completions must be at least 1, --rounds not negative, --replicas at least 2 (a replica's "
            "kill needs a twin) and --pathway-share within [0, 1]"
        )
    config = Config(
        completions=args.completions,
        seed=args.seed,
        rounds=args.rounds,
        replicas=args.replicas,
        pathway_share=args.pathway_share,
        lead=args.lead,
        concurrency=args.concurrency,
        pathway_concurrency=args.pathway_concurrency,
        stall_timeout=args.stall_timeout,
        max_downtime=args.max_downtime,
        poll_interval=1.0 if args.completions > 2000 else 0.25,
        workdir=args.workdir,
        report=args.report,
    )
    if config.singles < 1:
        parser.error("too few completions for that --pathway-share")
    return config


def _interrupt(_signal: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    config = _parse(argv)
    # The publisher's client reports every refused connection while a broker is down; the run
    # says what it does itself, and the services' own logs are in the work dir.
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
