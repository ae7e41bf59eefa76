"""Service processes: start, SIGKILL, stop and restart one, each with its own log file, and wait
until a set of them answers ready, failing with what is needed to tell why (the exit status, the
last answer of the readiness URL and the tail of the log).

A service is `python -m <service>` with its settings in the environment; replicas of one service
are processes of their own, each on its own HTTP port, in one consumer group (the services derive
the group from their name, so replicas share it without being told).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx

HOST = "127.0.0.1"
TAIL_LINES = 30
# Settings the services, the sinks and the simulator read: a developer's shell must not leak into
# a run that sets its own (a stray DATABASE_URL would point a replica at another database).
SETTING_PREFIXES = (
    "AUTH_", "KAFKA_", "DATABASE_URL", "HTTP_", "SMTP_", "SINK_", "OUTBOX_", "CONSUMER_", "DELIVERY_",
    "WEBHOOK_", "EMAIL_", "ISSUER_", "PUBLIC_BASE_URL", "DB_POOL_", "OTEL_", "LOG_LEVEL", "VERIFY_",
    "SHUTDOWN_", "PAYMENT_", "SIMULATOR_", "CORS_", "COURSE_LIST_", "ISSUANCE_",
)  # fmt: skip


class NotReady(RuntimeError):
    """A process that exited, or did not answer ready in time; the message says all we know."""


@dataclass
class Process:
    """A child process started, killed and restarted at will; its output is appended to `log`.

    `env` is its whole environment when `inherit` is false, else what it adds to ours.
    """

    name: str
    argv: list[str]
    env: dict[str, str]
    ready_url: str
    log: Path
    inherit: bool = True
    popen: subprocess.Popen[bytes] | None = None
    # Set while a fault holds it down, so that a supervisor does not take the kill for a crash.
    held_down: bool = False
    starts: int = 0

    @property
    def url(self) -> str:
        """Its HTTP base URL (the readiness URL's scheme, host and port)."""
        scheme, _, rest = self.ready_url.partition("://")
        return f"{scheme}://{rest.split('/', 1)[0]}"

    @property
    def pid(self) -> int | None:
        return None if self.popen is None else self.popen.pid

    @property
    def exited(self) -> int | None:
        """The exit status once it has exited; None while it runs or before its first start."""
        return None if self.popen is None else self.popen.poll()

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def start(self) -> None:
        """Start it (again), appending to its log; its own session, so a Ctrl-C at the terminal
        reaches only whoever started it, which then stops it cleanly."""
        if self.running:
            raise RuntimeError(f"{self.name} is running already (pid {self.pid})")
        self.log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.env} if self.inherit else self.env
        with self.log.open("ab") as log:
            log.write(f"\n=== harness: starting {self.name} at {datetime.now(UTC).isoformat()}\n".encode())
            log.flush()
            self.popen = subprocess.Popen(  # noqa: S603  (our interpreter, our modules)
                self.argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.starts += 1

    def kill(self) -> int | None:
        """SIGKILL, and wait until it is gone; its pid, or None when it was not running."""
        if self.popen is None or self.popen.poll() is not None:
            return None
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(timeout=30)
        return self.popen.pid

    def terminate(self) -> None:
        """SIGTERM (a graceful stop), without waiting."""
        if self.running:
            assert self.popen is not None
            self.popen.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM, then SIGKILL when it has not finished within `timeout`."""
        self.terminate()
        self.wait_stopped(timeout)

    def wait_stopped(self, timeout: float) -> bool:
        """Wait for it to exit, SIGKILL it after `timeout`; False when it had to be killed."""
        if self.popen is None:
            return True
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return False
        return True

    def restart(self, timeout: float = 30.0) -> None:
        self.stop(timeout)
        self.start()

    def tail(self, lines: int = TAIL_LINES) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return f"(no log at {self.log})"
        return "\n".join(text.splitlines()[-lines:])

    def state(self) -> str:
        if self.popen is None:
            return "never started"
        code = self.popen.poll()
        return f"pid {self.popen.pid} running" if code is None else f"pid {self.popen.pid} exited with {code}"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def clean_environment() -> dict[str, str]:
    """Our environment without any setting a service, sink or simulator reads."""
    return {name: value for name, value in os.environ.items() if not name.startswith(SETTING_PREFIXES)}


def service(
    name: str,
    *,
    port: int,
    env: Mapping[str, str],
    logs: Path,
    replica: int | None = None,
    inherit: bool = True,
) -> Process:
    """`python -m <name>` listening on `port`; replica `n` is called and logged `<name>-<n>`."""
    label = name if replica is None else f"{name}-{replica}"
    return Process(
        label,
        [sys.executable, "-m", name],
        {**env, "HTTP_HOST": HOST, "HTTP_PORT": str(port)},
        f"http://{HOST}:{port}/health/ready",
        logs / f"{label}.log",
        inherit=inherit,
    )


def replicas(
    name: str,
    count: int,
    *,
    env: Callable[[int, int], Mapping[str, str]],
    logs: Path,
    inherit: bool = True,
) -> list[Process]:
    """`count` replicas of service `name`, numbered from 1, each on a free port of its own;
    `env(replica, port)` gives each its settings."""
    made = []
    for replica in range(1, count + 1):
        port = free_port()
        made.append(
            service(
                name,
                port=port,
                env=env(replica, port),
                logs=logs,
                replica=replica if count > 1 else None,
                inherit=inherit,
            )
        )
    return made


def stop_all(processes: Iterable[Process], timeout: float = 30.0) -> list[str]:
    """SIGTERM them all at once, then wait for each; the names of those that had to be killed."""
    running = [process for process in processes if process.running]
    for process in running:
        process.terminate()
    deadline = time.monotonic() + timeout
    return [
        process.name for process in running if not process.wait_stopped(max(0.0, deadline - time.monotonic()))
    ]


# --- readiness -------------------------------------------------------------------------------


@dataclass
class _Probe:
    process: Process
    answer: str = "no answer yet"

    def failure(self, within: float) -> str:
        code = self.process.exited
        if code is not None:
            head = f"{self.process.name} exited with {code} before it was ready"
        else:
            head = f"{self.process.name} not ready after {within:.0f}s ({self.process.state()})"
        return (
            f"{head}; last answer of {self.process.ready_url}: {self.answer}; "
            f"last lines of {self.process.log}:\n{self.process.tail()}"
        )


def _verdict(waiting: list[_Probe], within: float, deadline: float) -> None:
    """Raise NotReady when one of them exited, or for all of them once the deadline has passed."""
    exited = [probe for probe in waiting if probe.process.exited is not None]
    failing = exited or (waiting if time.monotonic() > deadline else [])
    if failing:
        raise NotReady("\n\n".join(probe.failure(within) for probe in failing))


def _describe(status: int, body: str) -> str:
    return f"HTTP {status} {' '.join(body.split())[:300]}".strip()


async def wait_ready(processes: Sequence[Process], within: float, *, interval: float = 0.25) -> None:
    """Poll each process's readiness URL until it answers 200; raise NotReady when one exits or
    `within` seconds pass first."""

    async def probe_once(http: httpx.AsyncClient, probe: _Probe) -> bool:
        try:
            response = await http.get(probe.process.ready_url)
        except httpx.HTTPError as exc:
            probe.answer = f"{type(exc).__name__} {exc}".strip()
            return False
        probe.answer = _describe(response.status_code, response.text)
        return response.status_code == 200

    deadline = time.monotonic() + within
    waiting = [_Probe(process) for process in processes]
    async with httpx.AsyncClient(timeout=5) as http:
        while waiting:
            _verdict(waiting, within, deadline)
            ready = await asyncio.gather(*(probe_once(http, probe) for probe in waiting))
            waiting = [probe for probe, done in zip(waiting, ready, strict=True) if not done]
            if waiting:
                await asyncio.sleep(interval)


def wait_ready_blocking(
    processes: Sequence[Process],
    within: float,
    *,
    interval: float = 0.5,
    on_ready: Callable[[Process], None] | None = None,
) -> None:
    """`wait_ready` for callers without an event loop; `on_ready` is told of each as it gets ready."""
    deadline = time.monotonic() + within
    waiting = [_Probe(process) for process in processes]
    while waiting:
        _verdict(waiting, within, deadline)
        for probe in list(waiting):
            ready, probe.answer = _probe_once(probe.process.ready_url)
            if ready:
                waiting.remove(probe)
                if on_ready is not None:
                    on_ready(probe.process)
        if waiting:
            time.sleep(interval)


def _probe_once(url: str) -> tuple[bool, str]:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:  # noqa: S310  (loopback URLs we built)
            return response.status == 200, _describe(response.status, "")
    except urllib.error.HTTPError as exc:
        with contextlib.suppress(OSError):
            return False, _describe(exc.code, exc.read().decode(errors="replace"))
        return False, f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        return False, f"{type(exc).__name__} {exc}"
