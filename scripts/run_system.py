"""Run the whole system locally: the project's Kafka and PostgreSQL, then every service.

`make up` calls this. It prints where each service answers, waits until all are ready, and on
Ctrl-C (or SIGTERM) stops the services gracefully; Kafka and PostgreSQL keep running
(`make infra-down` stops them).
"""

import importlib.util
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import infra

ROOT = Path(__file__).resolve().parent.parent
LOGS = ROOT / ".local" / "logs"
# Fixed local ports so frontends and the README can rely on them.
PORTS = {"catalog": 8001, "enrollment": 8002, "billing": 8003, "issuance": 8004, "notifications": 8005}
READY_TIMEOUT = 90.0


def main() -> int:
    endpoints = infra.ensure_up()
    services = [name for name in PORTS if importlib.util.find_spec(name) is not None]
    LOGS.mkdir(parents=True, exist_ok=True)
    processes: dict[str, subprocess.Popen[bytes]] = {}
    for name in services:
        env = {
            **os.environ,
            "DATABASE_URL": endpoints.database_url(name),
            "KAFKA_BOOTSTRAP_SERVERS": endpoints.kafka_bootstrap,
            "HTTP_PORT": str(PORTS[name]),
        }
        log_file = (LOGS / f"{name}.log").open("ab")
        processes[name] = subprocess.Popen(  # noqa: S603  (our own interpreter and module)
            [sys.executable, "-m", name], env=env, stdout=log_file, stderr=subprocess.STDOUT
        )
    stop = _install_signal_handlers()
    try:
        if not _wait_ready(processes):
            return 1
        print("\nmicrocred is running:")
        for name in services:
            print(f"  {name:<14} http://127.0.0.1:{PORTS[name]}/docs   log: {LOGS / name}.log")
        print(f"  kafka          {endpoints.kafka_bootstrap}")
        print(f"  postgres       {endpoints.postgres_url}")
        print("Ctrl-C stops the services; `make infra-down` stops Kafka and PostgreSQL.")
        while not stop:
            for name, process in processes.items():
                if process.poll() is not None:
                    print(f"{name} exited with {process.returncode}; see {LOGS / name}.log", file=sys.stderr)
                    return 1
            time.sleep(1)
        return 0
    finally:
        _terminate(processes)


def _install_signal_handlers() -> list[int]:
    received: list[int] = []

    def handle(signum: int, _frame: object) -> None:
        received.append(signum)

    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)
    return received


def _wait_ready(processes: dict[str, subprocess.Popen[bytes]]) -> bool:
    deadline = time.monotonic() + READY_TIMEOUT
    waiting = set(processes)
    while waiting and time.monotonic() < deadline:
        for name in sorted(waiting):
            if processes[name].poll() is not None:
                print(f"{name} failed to start; last lines of {LOGS / name}.log:", file=sys.stderr)
                print(_tail(LOGS / f"{name}.log"), file=sys.stderr)
                return False
            if _ready(PORTS[name]):
                print(f"{name} ready on port {PORTS[name]}")
                waiting.discard(name)
        time.sleep(0.5)
    if waiting:
        print(f"not ready after {READY_TIMEOUT:.0f}s: {', '.join(sorted(waiting))}", file=sys.stderr)
    return not waiting


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=3) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _terminate(processes: dict[str, subprocess.Popen[bytes]]) -> None:
    for process in processes.values():
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for name, process in processes.items():
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            print(f"{name} did not stop in 30s; killing it", file=sys.stderr)
            process.kill()


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


if __name__ == "__main__":
    raise SystemExit(main())
