"""The faults themselves, one at a time, and the supervision of the deployment while work flows.

Each fault SIGKILLs its victim (one replica of a service, the mail sink, a Kafka broker, or
PostgreSQL's every process), keeps it down for the plan's downtime, brings it back, and records
what it was seen to do (the twin kept running, the controller or the partition's leadership moved,
PostgreSQL ran crash recovery) and how the pipeline came through: the time until every process
answered ready again, until the stage's counter moved again, and the longest stall in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable, Mapping

import infra

from microcred_events import Topic

from . import processes
from .accounting import FaultRecord, Result
from .deployment import MAIL_SINK, Deployment
from .monitor import Counts, Database, Monitor, Stage
from .workload import Workload

CONTROLLER = "kafka-controller"
LEADER = "kafka-leader"
POSTGRES = "postgres"
# After the victim is back, the survivors' stall is still watched this long: a replica that
# rejoins its consumer group makes the group rebalance again.
SETTLE_SECONDS = 5.0


class FaultRunError(RuntimeError):
    """The run could not go on (a process that does not come back, a pipeline that stopped)."""


class Outages:
    """Injects the faults the plan names and supervises the processes, as an orchestrator would."""

    def __init__(
        self,
        deployment: Deployment,
        result: Result,
        monitor: Monitor,
        load: Workload,
        *,
        ready_timeout: float,
        stall_timeout: float,
        say: Callable[[str], None],
    ) -> None:
        self.deployment = deployment
        self.result = result
        self.monitor = monitor
        self.load = load
        self.ready_timeout = ready_timeout
        self.stall_timeout = stall_timeout
        self.say = say
        self.first_report: Callable[[], float | None] = lambda: None
        self.publishing: asyncio.Task[None] | None = None

    def supervise(self) -> None:
        """A process that died on its own is restarted, and reported; a learner who gave up, or a
        publisher that stopped, ends the run."""
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
                self.say(f"  INCIDENT: {incident}")
                self.result.incidents.append(incident)
                process.start()

    async def inject(
        self, target: str, stage: Stage, downtime: float, rng: random.Random, release: Callable[[], None]
    ) -> FaultRecord:
        """Kill `target`'s victim, keep it down `downtime` seconds, bring it back; `release` lets more
        work flow meanwhile. Ready is timed from the kill until every process answers ready again;
        the stage's recovery from the kill until its counter grew after that; its stall is read
        from the monitor's history, up to SETTLE_SECONDS after ready at least."""
        counts = await self.monitor.fresh()
        started = self.first_report() or time.monotonic()
        record = FaultRecord(
            target=target,
            victim=target,
            at=time.monotonic() - started,
            credentials_at=counts.credentials,
            downtime=downtime,
            stage=stage.counter,
            redundant=target in (*self.deployment.services, CONTROLLER, LEADER),
        )
        killed = time.monotonic()
        if target in self.deployment.services:
            await self._replica(target, rng, record, release)
        elif target == MAIL_SINK:
            await self._sink(record, release)
        elif target in (CONTROLLER, LEADER):
            await self._broker(target, rng, record, release)
        elif target == POSTGRES:
            await self._postgres(record, release)
        else:
            raise ValueError(f"no such fault target: {target}")
        try:
            await processes.wait_ready(self.deployment.processes, self.ready_timeout)
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
            f"{stage.counter} to move after the {record.victim} fault", moved, self.stall_timeout
        )
        if stage.value(after) > before:
            record.moving_after = time.monotonic() - killed
        else:
            record.note = "nothing left to do"
        await asyncio.sleep(max(0.0, ready + SETTLE_SECONDS - time.monotonic()))
        record.stall = self.monitor.longest_stall(stage, killed, time.monotonic())
        self.say(f"  {record.row()}")
        return record

    def _announce(self, record: FaultRecord) -> None:
        self.say(
            f"fault: SIGKILL {record.victim} at {record.credentials_at} credentials, down {record.downtime}s"
        )

    async def _replica(
        self, service: str, rng: random.Random, record: FaultRecord, release: Callable[[], None]
    ) -> None:
        replicas = self.deployment.services[service].processes
        running = [process for process in replicas if process.running]
        victim = rng.choice(running)
        twins = {process.name: process.pid for process in running if process is not victim}
        record.victim, record.survivors = f"{victim.name} ({len(twins)} of {len(replicas)} left)", len(twins)
        self._announce(record)
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
        self._announce(record)
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
                if now in (node, None, -1):
                    return None
                return f"{Topic.PARTNER_COMPLETION}/{partition} leader {node} -> {now}"

        self._announce(record)
        killed_pid = await asyncio.to_thread(cluster.kill, node)
        watching = asyncio.create_task(_observe(moved, self.ready_timeout))
        release()
        await asyncio.sleep(record.downtime)
        await asyncio.to_thread(cluster.start, node)
        await asyncio.to_thread(cluster.wait_ready, node, self.ready_timeout)
        change = await watching
        record.checks["killed"] = f"pid {killed_pid}"
        record.checks["seen"] = change or "no failover seen"
        record.confirmed = change is not None

    async def _postgres(self, record: FaultRecord, release: Callable[[], None]) -> None:
        log = infra.PG_LOCAL / "postgres.log"
        offset = log.stat().st_size if log.exists() else 0
        record.victim = "PostgreSQL"
        self._announce(record)
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


async def _observe(change: Callable[[], Awaitable[str | None]], within: float) -> str | None:
    """Poll `change()` until it names what changed; None when nothing changed `within` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            seen = await change()
            if seen is not None:
                return seen
        await asyncio.sleep(0.5)
    return None


async def diagnose(deployment: Deployment, databases: Mapping[str, Database], why: str) -> str:
    """Why the pipeline stopped, as far as the databases and the processes' logs tell."""
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
