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
import logging
import random
import signal
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import infra
from harness import accounting, deployment, processes, sinks, workload
from harness.accounting import Result
from harness.cluster import KafkaCluster
from harness.deployment import MAIL_SINK, SERVICES, Deployment
from harness.monitor import Counts, Database, Monitor, Stage, Stalled
from harness.outages import CONTROLLER, LEADER, POSTGRES, FaultRunError, Outages, diagnose
from harness.processes import HOST
from harness.workload import Api, Learner, PathwayLearner, Publisher, Workload

from microcred_events import Topic

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "tests" / "faults" / "results"
TARGETS = (*SERVICES, MAIL_SINK, CONTROLLER, LEADER, POSTGRES)
PATHWAY_COURSES = 3
PATHWAY_PRICE_MINOR = 4900
# Shorter timers than production's, so that a short run drains in minutes.
_EVERY_SERVICE = {"OUTBOX_POLL_INTERVAL_SECONDS": "0.5", "SHUTDOWN_GRACE_SECONDS": "5"}
TUNING = dict.fromkeys(SERVICES, _EVERY_SERVICE) | {
    # What a race between replicas leaves behind is finished within seconds (production: 30 s).
    "issuance": {**_EVERY_SERVICE, "ISSUANCE_SWEEP_INTERVAL_SECONDS": "5"},
    # Delivery retries from 1 s doubling to 30 s (production: 5 s to an hour); eight attempts
    # still outlast any outage this run causes.
    "notifications": {
        **_EVERY_SERVICE,
        "DELIVERY_RETRY_BASE_SECONDS": "1",
        "DELIVERY_RETRY_CAP_SECONDS": "30",
        "DELIVERY_POLL_INTERVAL_SECONDS": "2",
        "DELIVERY_DRAIN_SECONDS": "3",
    },
}


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


CREDENTIALS = Stage("credentials", lambda counts: counts.credentials >= counts.credentials_due)
# The counter that shows each target's part of the pipeline moving, and when it has nothing left.
STAGES: dict[str, Stage] = {
    "catalog": Stage(
        "catalog_reads",
        lambda c: c.catalog_reads >= (1 + PATHWAY_COURSES) * c.progress.pathway_started,
    ),
    "enrollment": Stage("completed", lambda c: c.completed >= c.sent),
    # A payment counts when it is opened (billing's consumer) and again when it is settled.
    "billing": Stage("billed", lambda c: c.billed >= 2 * PATHWAY_COURSES * c.progress.pathway_started),
    "issuance": CREDENTIALS,
    "notifications": Stage("notified", lambda c: c.in_app >= c.credentials_due),
    MAIL_SINK: Stage("mails", lambda c: c.emails >= c.credentials_due and c.open_deliveries == 0),
    CONTROLLER: CREDENTIALS,
    LEADER: CREDENTIALS,
    POSTGRES: CREDENTIALS,
}


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
        result.brokers = len(cluster.node_ids)
        run_id = uuid.uuid4().hex[:8]
        deployed = deployment.deploy(
            run_id=run_id,
            workdir=config.workdir or RESULTS / "runs" / run_id,
            cluster=cluster,
            database_urls=await deployment.recreate_databases(endpoints.postgres_url),
            replicas=config.replicas,
            tuning=TUNING,
        )
        result.prefix = deployed.prefix
        _say(
            f"fault run {run_id}: {config.completions} completions "
            f"({config.singles} single, {config.pathway_learners} pathway learners x {PATHWAY_COURSES}), "
            f"seed {config.seed}, {config.replicas} replicas a service, {len(cluster.node_ids)} brokers, "
            f"in {deployed.workdir}"
        )
        databases = {service: Database(url) for service, url in deployed.database_urls.items()}
        try:
            async with contextlib.AsyncExitStack() as stack:
                await stack.enter_async_context(
                    sinks.serving(deployed.receiver.app(), deployed.receiver_port, "webhook-receiver")
                )
                for service, (front, port) in deployed.fronts.items():
                    await stack.enter_async_context(sinks.serving(front.app(), port, f"{service}-front"))
                    stack.push_async_callback(front.close)
                await _run(config, deployed, result, databases, started)
        finally:
            for process in deployed.processes:
                process.held_down = True
            await asyncio.to_thread(processes.stop_all, deployed.processes, 15.0)
            for database in databases.values():
                await database.close()
    finally:
        # Whatever happened above, PostgreSQL runs for whoever comes next; the cluster was ours.
        await asyncio.to_thread(infra.ensure_up, kafka=False)
        await asyncio.to_thread(cluster.down)
    result.timings["total"] = time.monotonic() - started
    return result


async def _run(
    config: Config, deployed: Deployment, result: Result, databases: dict[str, Database], started: float
) -> None:
    for process in deployed.processes:
        process.start()
    try:
        await processes.wait_ready(deployed.processes, config.ready_timeout)
    except processes.NotReady as exc:
        raise FaultRunError(str(exc)) from None
    result.timings["start"] = time.monotonic() - started
    api = Api(deployed.services, deployed.token, deadline=config.stall_timeout)
    try:
        await _flow(config, deployed, result, databases, api)
    finally:
        await api.close()


async def _flow(
    config: Config, deployed: Deployment, result: Result, databases: dict[str, Database], api: Api
) -> None:
    setting_up = time.monotonic()
    setup = await workload.set_up(
        api,
        pathway_courses=PATHWAY_COURSES,
        price_minor=PATHWAY_PRICE_MINOR,
        webhook_url=f"http://{HOST}:{deployed.receiver_port}/hook",
    )
    deployed.receiver.secret = setup.webhook_secret
    result.timings["setup"] = time.monotonic() - setting_up

    learners = [
        Learner(f"faults-{deployed.run_id}-learner-{n}", n)
        for n in range(config.singles + config.pathway_learners)
    ]
    enrolling = time.monotonic()
    singles = await workload.enroll_all(
        api,
        learners[: config.singles],
        setup.catalog.single_course,
        deployed.run_id,
        config.concurrency,
        _say,
    )
    result.timings["enroll"] = time.monotonic() - enrolling
    result.enroll_rate = len(singles) / result.timings["enroll"] if singles else 0.0
    _say(f"enrolled {len(singles)} learners in {result.timings['enroll']:.1f}s ({result.enroll_rate:.0f}/s)")

    publisher = Publisher(deployed.cluster.bootstrap, deployed.prefix + Topic.PARTNER_COMPLETION, _say)
    load = Workload(
        workload.interleave(singles, [PathwayLearner(learner) for learner in learners[config.singles :]]),
        api=api,
        catalog=setup.catalog,
        partner=setup.partner,
        publisher=publisher,
        simulator=deployed.simulator.url,
        run_id=deployed.run_id,
        concurrency=config.pathway_concurrency,
    )
    monitor = Monitor(databases, deployed.mail, deployed.webhooks, load.progress, config.poll_interval, _say)
    outages = Outages(
        deployed,
        result,
        monitor,
        load,
        ready_timeout=config.ready_timeout,
        stall_timeout=config.stall_timeout,
        say=_say,
    )
    outages.first_report = lambda: publisher.started_at
    outages.publishing = asyncio.create_task(publisher.run(), name="publisher")
    tasks = [asyncio.create_task(monitor.run(outages.supervise), name="monitor"), outages.publishing]
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
            downtime = round(rng.uniform(0, config.max_downtime), 1)
            release = functools.partial(load.allow, following)
            result.faults.append(await outages.inject(target, STAGES[target], downtime, rng, release))
        load.allow(reports)
        await monitor.until(
            "every report to be acknowledged", lambda c: c.sent >= reports, config.stall_timeout
        )
        result.timings["publish"] = time.monotonic() - flowing
        await monitor.until("the pipeline to drain", functools.partial(_drained, due), config.stall_timeout)
    except Stalled as exc:
        result.diagnosis = await diagnose(deployed, databases, str(exc))
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
        mail=deployed.mail,
        webhooks=deployed.webhooks,
        bootstrap=deployed.cluster.bootstrap,
        prefix=deployed.prefix,
        partner_id=setup.partner.partner_id,
        pathway_id=setup.catalog.pathway_id,
        pathway_courses=set(setup.catalog.pathway_courses),
    )
    result.sweeper = accounting.sweeper_finds(deployed.workdir / "logs")
    result.timings["account"] = time.monotonic() - counting


def _drained(due: int, counts: Counts) -> bool:
    """Every credential owed is there and has been told of on every channel; nothing is pending."""
    return (
        counts.credentials >= due
        and counts.in_app >= due
        and counts.emails >= due
        and counts.webhooks >= due
        and counts.backlog == 0
        and counts.open_deliveries == 0
    )


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
