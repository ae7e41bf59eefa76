"""HTTP_WORKERS: a service in several processes on one port, as an operator runs it.

The catalog with two workers against the real PostgreSQL and Kafka: both serve the port, a scrape
counts every worker's requests, SIGTERM stops them all gracefully, and a worker never outlives
the service or is left alone when its sibling dies.
"""

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import Infrastructure, free_port

WORKERS = 2


def _children(parent: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                if int(stat[stat.rindex(")") + 2 :].split()[1]) == parent:
                    found.add(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rindex(")") + 2] != "Z"


@dataclass
class Catalog:
    process: asyncio.subprocess.Process
    api: httpx.AsyncClient
    workers: set[int]

    async def ended(self, within: float = 60) -> tuple[int | None, list[dict[str, Any]]]:
        """Its exit status and its log lines, once it has ended."""
        stdout, _ = await asyncio.wait_for(self.process.communicate(), within)
        return self.process.returncode, [json.loads(line) for line in stdout.decode().splitlines()]


@pytest.fixture
def start_catalog(
    new_database: Callable[[], Any], infrastructure: Infrastructure, topic_prefix: str, jwks_file: Path
) -> Callable[..., contextlib.AbstractAsyncContextManager[Catalog]]:
    @contextlib.asynccontextmanager
    async def start(**settings: str) -> AsyncIterator[Catalog]:
        port = free_port()
        env = {
            **os.environ,
            "DATABASE_URL": await new_database(),
            "KAFKA_BOOTSTRAP_SERVERS": infrastructure.kafka_bootstrap,
            "KAFKA_TOPIC_PREFIX": topic_prefix,
            "HTTP_PORT": str(port),
            "HTTP_WORKERS": str(WORKERS),
            "SHUTDOWN_GRACE_SECONDS": "5",
            "AUTH_ISSUER": "https://issuer.test",
            "AUTH_JWKS_FILE": str(jwks_file),
            **settings,
        }
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "catalog",
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as api:
                await _until_every_worker_is_ready(api, process.pid)
                yield Catalog(process, api, _children(process.pid))
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()

    return start


async def _until_every_worker_is_ready(api: httpx.AsyncClient, supervisor: int, within: float = 120) -> None:
    """Ready answers, from each worker: a new connection each time, so that any of them may take it."""
    deadline = asyncio.get_running_loop().time() + within
    ready_in_a_row = 0
    while ready_in_a_row < 10 * WORKERS:
        assert asyncio.get_running_loop().time() < deadline, "the workers never all became ready"
        try:
            response = await api.get("/health/ready", headers={"Connection": "close"})
            ready_in_a_row = ready_in_a_row + 1 if response.status_code == 200 else 0
        except httpx.TransportError:
            ready_in_a_row = 0
        if not ready_in_a_row:
            await asyncio.sleep(0.5)
    assert len(_children(supervisor)) == WORKERS


def _requests_counted(metrics: str) -> float:
    counted = re.search(
        r'^http_requests_total\{handler="/courses",method="GET",status="2xx"\} (\S+)$', metrics, re.M
    )
    return float(counted[1]) if counted else 0.0


async def test_workers_share_the_port_and_the_metrics_and_stop_together_on_sigterm(
    start_catalog: Callable[..., contextlib.AbstractAsyncContextManager[Catalog]],
) -> None:
    metrics_port = free_port()
    async with start_catalog(METRICS_PORT=str(metrics_port)) as catalog:
        assert len(catalog.workers) == WORKERS
        for _ in range(40):
            answer = await catalog.api.get("/courses", headers={"Connection": "close"})
            assert answer.status_code == 200, answer.text
        # The supervisor answers for them all, whichever served the requests.
        async with httpx.AsyncClient() as scraper:
            scraped = await scraper.get(f"http://127.0.0.1:{metrics_port}/metrics")
        assert _requests_counted(scraped.text) == 40, scraped.text

        catalog.process.send_signal(signal.SIGTERM)
        status, logs = await catalog.ended()

    # Ended as one process would: by the signal it was sent, once every worker had stopped.
    assert status == -signal.SIGTERM, logs
    messages = [entry["message"] for entry in logs]
    assert messages.count("service started") == messages.count("service stopped") == WORKERS, messages
    assert not [entry for entry in logs if entry["level"] == "ERROR"], logs
    assert not [pid for pid in catalog.workers if _alive(pid)]


async def test_a_worker_that_dies_ends_the_service(
    start_catalog: Callable[..., contextlib.AbstractAsyncContextManager[Catalog]],
) -> None:
    async with start_catalog() as catalog:
        for _ in range(10):
            assert (await catalog.api.get("/courses", headers={"Connection": "close"})).status_code == 200
        # Without METRICS_PORT, any worker's /metrics counts them all.
        assert _requests_counted((await catalog.api.get("/metrics")).text) == 10

        killed, survivor = sorted(catalog.workers)
        os.kill(killed, signal.SIGKILL)
        status, logs = await catalog.ended()

    assert status == 1, logs
    assert any("an HTTP worker ended" in entry["message"] for entry in logs), logs
    assert "service stopped" in [entry["message"] for entry in logs]  # the survivor, stopped gracefully
    assert not _alive(survivor)


async def test_the_workers_end_with_a_killed_supervisor(
    start_catalog: Callable[..., contextlib.AbstractAsyncContextManager[Catalog]], wait_for: Any
) -> None:
    async with start_catalog() as catalog:
        catalog.process.kill()
        await catalog.process.wait()
        assert await wait_for(lambda: not any(_alive(pid) for pid in catalog.workers), timeout=60)


@pytest.mark.parametrize("taken", ["HTTP_PORT", "METRICS_PORT"])
def test_a_port_taken_ends_the_service_and_leaves_no_worker(taken: str) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        ports = {"HTTP_PORT": str(free_port()), "METRICS_PORT": str(free_port())}
        ports[taken] = str(holder.getsockname()[1])
        env = {
            **os.environ,
            **ports,
            "HTTP_WORKERS": str(WORKERS),
            "DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none",
            "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1",
            "AUTH_ISSUER": "https://issuer.test",
            "AUTH_JWKS_URL": "https://issuer.test/jwks.json",
        }
        process = subprocess.Popen(
            [sys.executable, "-m", "catalog"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        output, _ = process.communicate(timeout=120)

    assert process.returncode == 1, output
    assert "Address already in use" in output.decode(), output
    # Had a worker outlived it, it would still hold the port.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", int(ports["HTTP_PORT"])), timeout=5).close()
