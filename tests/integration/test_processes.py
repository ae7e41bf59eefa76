"""Services as operators run them: a process that answers its probes and stops cleanly on SIGTERM."""

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

from .conftest import Infrastructure


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def test_service_process_is_ready_then_stops_gracefully_on_sigterm(
    new_database: Callable[[], Any],
    infrastructure: Infrastructure,
    topic_prefix: str,
    jwks_file: Path,
    wait_for: Any,
) -> None:
    port = _free_port()
    env = {
        **os.environ,
        "DATABASE_URL": await new_database(),
        "KAFKA_BOOTSTRAP_SERVERS": infrastructure.kafka_bootstrap,
        "KAFKA_TOPIC_PREFIX": topic_prefix,
        "HTTP_PORT": str(port),
        "SHUTDOWN_GRACE_SECONDS": "5",
        "AUTH_ISSUER": "https://issuer.test",
        "AUTH_JWKS_FILE": str(jwks_file),
    }
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
