"""Services as operators run them: a process that answers its probes from its first instant, says
what its start waits for, and stops cleanly on SIGTERM.

The fault suite once failed with "enrollment not ready after 240s" and a log that said nothing:
the consumers' first join of their group did not complete (the broker's group coordinator was in
trouble), the runtime waited for it inside the ASGI lifespan, so uvicorn never listened, nothing
was logged at INFO, and SIGTERM could not stop the process. The tests below hold a consumer
group's rebalance, and take the broker away, while a service starts.
"""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition

from microcred_events import Topic
from microcred_runtime import kafka

from .conftest import Infrastructure, free_port

# A held rebalance lasts at most this long (the holder's rebalance timeout): time enough for the
# service to start and reach its consumers on a busy machine.
HOLD_SECONDS = 60
# Until a starting service must have answered its probes, naming what it waits for.
ANSWER_WITHIN = 45.0
# A start-up step that has not finished says so this often (the runtime's `_STILL_WAITING_SECONDS`).
STILL_WAITING_SECONDS = 10.0


def _environment(database_url: str, bootstrap: str, topic_prefix: str, jwks_file: Path) -> dict[str, str]:
    """An enrollment process's settings, on a free port (`HTTP_PORT`)."""
    return {
        **os.environ,
        "DATABASE_URL": database_url,
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "KAFKA_TOPIC_PREFIX": topic_prefix,
        "HTTP_PORT": str(free_port()),
        "SHUTDOWN_GRACE_SECONDS": "5",
        "AUTH_ISSUER": "https://issuer.test",
        "AUTH_JWKS_FILE": str(jwks_file),
    }


async def test_service_process_is_ready_then_stops_gracefully_on_sigterm(
    new_database: Callable[[], Any],
    infrastructure: Infrastructure,
    topic_prefix: str,
    jwks_file: Path,
    wait_for: Any,
) -> None:
    env = _environment(await new_database(), infrastructure.kafka_bootstrap, topic_prefix, jwks_file)
    port = int(env["HTTP_PORT"])
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "enrollment", env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:

            async def ready() -> httpx.Response | None:
                try:
                    response = await client.get("/health/ready")
                except httpx.TransportError:
                    return None
                return response if response.status_code == 200 else None

            answer = await wait_for(ready, timeout=60)
            assert answer is not None, "the service never became ready"
            assert answer.json() == {"status": "ready", "checks": {"postgres": "ok", "kafka": "ok"}}
            assert (await client.get("/health/live")).json() == {"status": "ok"}
        process.send_signal(signal.SIGTERM)
        stdout, _ = await asyncio.wait_for(process.communicate(), 30)
    finally:
        if process.returncode is None:
            process.kill()
    output = stdout.decode()
    # uvicorn re-raises SIGTERM once its graceful shutdown is done, so the parent sees the signal.
    assert process.returncode in (0, -signal.SIGTERM), output
    logs = [json.loads(line) for line in output.splitlines()]
    messages = [entry["message"] for entry in logs]
    assert "service started" in messages
    assert messages.index("service stopped") > messages.index("service started")
    assert all(entry["service"] == "enrollment" for entry in logs)


def test_bad_configuration_stops_start_up_naming_the_setting() -> None:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS")
    }
    env["HTTP_PORT"] = "not-a-port"
    result = subprocess.run(
        [sys.executable, "-m", "catalog"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 2
    for setting in ("DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS", "HTTP_PORT"):
        assert setting in result.stderr, result.stderr


class Holding(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka is untyped
    """Keeps the group in its rebalance until `release` is set: a member that does not rejoin."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.holding = asyncio.Event()

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        if revoked:
            self.holding.set()
            await self.release.wait()

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        pass


async def test_a_service_waiting_for_its_consumer_group_answers_its_probes_and_says_so(
    new_database: Callable[[], Any],
    infrastructure: Infrastructure,
    topic_prefix: str,
    jwks_file: Path,
    wait_for: Any,
) -> None:
    group = topic_prefix + "enrollment"
    topic = topic_prefix + Topic.CATALOG_COURSE
    await kafka.ensure_topics(infrastructure.kafka_bootstrap, [topic], partitions=1, replication=1)
    env = _environment(await new_database(), infrastructure.kafka_bootstrap, topic_prefix, jwks_file)
    holding = Holding()
    holder = AIOKafkaConsumer(
        bootstrap_servers=infrastructure.kafka_bootstrap,
        group_id=group,
        enable_auto_commit=False,
        rebalance_timeout_ms=HOLD_SECONDS * 1000,
    )
    holder.subscribe([topic], listener=holding)
    await holder.start()  # the group's only member, holding its one partition
    try:
        await _start_while_the_group_is_held(holding, group, infrastructure, env, wait_for)
    finally:
        holding.release.set()
        await holder.stop()


async def _start_while_the_group_is_held(
    holding: Holding, group: str, infrastructure: Infrastructure, env: dict[str, str], wait_for: Any
) -> None:
    port = int(env["HTTP_PORT"])
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "enrollment", env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    lines: list[str] = []
    reminded = asyncio.Event()  # the log said what the start waits for, while it waited

    async def read_output() -> None:
        assert process.stdout is not None
        async for raw in process.stdout:
            line = raw.decode(errors="replace")
            lines.append(line)
            if "start-up still waits for Kafka" in line and group in line:
                reminded.set()

    reading = asyncio.create_task(read_output())
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:

            async def naming_the_group() -> dict[str, Any] | None:
                assert process.returncode is None, "".join(lines[-30:])
                try:
                    ready = await client.get("/health/ready")
                except httpx.TransportError:
                    return None
                assert ready.status_code == 503, ready.text
                body: dict[str, Any] = ready.json()
                return body if group in body.get("waiting_for", "") else None

            async def ready() -> httpx.Response | None:
                response = await client.get("/health/ready")
                return response if response.status_code == 200 else None

            body = await wait_for(naming_the_group, timeout=ANSWER_WITHIN, interval=0.25)
            assert body is not None, (
                f"no probe answer naming {group} within {ANSWER_WITHIN:.0f} s while its group was held;"
                " the service's output:\n" + "".join(lines[-30:])
            )
            # The service's join is what the holder holds.
            await asyncio.wait_for(holding.holding.wait(), ANSWER_WITHIN)
            assert body["type"] == "urn:microcred:problem:not-ready"
            assert body["checks"] == {"startup": "waiting"}
            assert group in body["detail"]
            live = await client.get("/health/live")
            assert (live.status_code, live.json()) == (200, {"status": "ok"})
            await asyncio.wait_for(reminded.wait(), STILL_WAITING_SECONDS + 10)

            holding.release.set()
            answer = await wait_for(ready, timeout=ANSWER_WITHIN, interval=0.25)
            assert answer is not None, "".join(lines[-30:])
            assert answer.json() == {"status": "ready", "checks": {"postgres": "ok", "kafka": "ok"}}
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), 30)
        await reading
    finally:
        holding.release.set()
        if process.returncode is None:
            process.kill()
            await process.wait()
        reading.cancel()
    assert process.returncode in (0, -signal.SIGTERM), "".join(lines[-30:])
    messages = [json.loads(line)["message"] for line in lines if line.startswith("{")]
    assert messages.index("service stopped") > messages.index("service started")


async def test_a_start_waiting_for_kafka_stops_at_once_on_sigterm(
    new_database: Callable[[], Any], topic_prefix: str, jwks_file: Path, wait_for: Any
) -> None:
    """A broker that is not there: the start waits, says why, and SIGTERM still stops the process."""
    with socket.socket() as nobody:
        nobody.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        nowhere = f"127.0.0.1:{nobody.getsockname()[1]}"
        env = _environment(await new_database(), nowhere, topic_prefix, jwks_file)
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "enrollment", env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        try:
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{env['HTTP_PORT']}", timeout=5
            ) as client:

                async def failing_to_reach_kafka() -> httpx.Response | None:
                    assert process.returncode is None, "the start gave up instead of waiting"
                    try:
                        ready = await client.get("/health/ready")
                    except httpx.TransportError:
                        return None
                    return ready if ready.json().get("last_error") else None

                ready = await wait_for(failing_to_reach_kafka, timeout=ANSWER_WITHIN, interval=0.25)
            assert ready is not None, f"no probe answer within {ANSWER_WITHIN:.0f} s"
            assert ready.status_code == 503
            assert ready.json()["waiting_for"] == f"Kafka at {nowhere} to create the topics"
            assert ready.json()["last_error"].startswith("KafkaConnectionError: Unable to bootstrap")
            process.send_signal(signal.SIGTERM)
            stdout, _ = await asyncio.wait_for(process.communicate(), 15)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    assert process.returncode in (0, -signal.SIGTERM), stdout.decode()
    assert f"start-up waits for Kafka at {nowhere} to create the topics" in stdout.decode()
