"""Run the whole system locally: Kafka, PostgreSQL, the dev token issuer, the payment-provider
simulator and every service, with the launch catalog seeded.

`make up` calls this. It prints where everything answers, waits until all are ready, and on
Ctrl-C (or SIGTERM) stops what it started, gracefully; Kafka and PostgreSQL keep running
(`make infra-down` stops them). Secrets for local runs are generated on first use under
`.local/` (git-ignored), never committed.
"""

import importlib.util
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import dev_issuer
import infra
from harness import processes
from harness.processes import NotReady, Process

ROOT = Path(__file__).resolve().parent.parent
LOGS = ROOT / ".local" / "logs"
SECRETS = ROOT / ".local" / "dev-secrets"
# Fixed local ports so frontends and the README can rely on them.
PORTS = {"catalog": 8001, "enrollment": 8002, "billing": 8003, "issuance": 8004, "notifications": 8005}
SIMULATOR_PORT = 8090
# The local SMTP sink notifications sends to; its page lists the caught emails.
MAIL_SINK_SMTP_PORT = 1025
MAIL_SINK_HTTP_PORT = 8025
READY_TIMEOUT = 90.0


def main() -> int:
    endpoints = infra.ensure_up()
    LOGS.mkdir(parents=True, exist_ok=True)
    webhook_secret = _secret("payment-webhook-secret")
    auth = {"AUTH_ISSUER": dev_issuer.ISSUER, "AUTH_JWKS_URL": f"{dev_issuer.ISSUER}/jwks.json"}
    issuer = _auxiliary(
        "dev-issuer",
        [sys.executable, str(ROOT / "scripts" / "dev_issuer.py")],
        f"{dev_issuer.ISSUER}/jwks.json",
    )
    services = [
        processes.service(
            name,
            port=port,
            env={
                "DATABASE_URL": endpoints.database_url(name),
                "KAFKA_BOOTSTRAP_SERVERS": endpoints.kafka_bootstrap,
                **auth,
            },
            logs=LOGS,
        )
        for name, port in PORTS.items()
        if importlib.util.find_spec(name) is not None
    ]
    auxiliaries = [issuer]
    if importlib.util.find_spec("billing.simulator") is not None:
        auxiliaries.append(
            _auxiliary(
                "payment-simulator",
                [sys.executable, "-m", "billing.simulator"],
                f"http://127.0.0.1:{SIMULATOR_PORT}/docs",
                {
                    "SIMULATOR_PORT": str(SIMULATOR_PORT),
                    "SIMULATOR_WEBHOOK_URL": f"http://127.0.0.1:{PORTS['billing']}/webhooks/provider",
                    "SIMULATOR_WEBHOOK_SECRET": webhook_secret,
                },
            )
        )
        for service in services:
            if service.name == "billing":
                service.env["PAYMENT_PROVIDER_URL"] = f"http://127.0.0.1:{SIMULATOR_PORT}"
                service.env["PAYMENT_WEBHOOK_SECRET"] = webhook_secret
    for service in services:
        if service.name == "issuance":
            service.env["ISSUER_KEYS_DIR"] = str(_issuer_keys())
            service.env["PUBLIC_BASE_URL"] = f"http://127.0.0.1:{PORTS['issuance']}"
    if importlib.util.find_spec("notifications.smtp_sink") is not None:
        auxiliaries.append(
            _auxiliary(
                "mail-sink",
                [sys.executable, "-m", "notifications.smtp_sink"],
                f"http://127.0.0.1:{MAIL_SINK_HTTP_PORT}/health/live",
                {"SINK_SMTP_PORT": str(MAIL_SINK_SMTP_PORT), "SINK_HTTP_PORT": str(MAIL_SINK_HTTP_PORT)},
            )
        )
        for service in services:
            if service.name == "notifications":
                service.env["SMTP_HOST"] = "127.0.0.1"
                service.env["SMTP_PORT"] = str(MAIL_SINK_SMTP_PORT)
    everything = auxiliaries + services
    stop = _install_signal_handlers()
    try:
        for process in everything:
            process.start()
        try:
            processes.wait_ready_blocking(
                everything, READY_TIMEOUT, on_ready=lambda process: print(f"{process.name} ready")
            )
        except NotReady as exc:
            print(exc, file=sys.stderr)
            return 1
        if any(service.name == "catalog" for service in services):
            _seed_catalog(endpoints.database_url("catalog"), endpoints.kafka_bootstrap, auth)
        _print_summary(everything, endpoints)
        while not stop:
            for process in everything:
                if process.exited is not None:
                    print(f"{process.name} exited with {process.exited}; see {process.log}", file=sys.stderr)
                    return 1
            time.sleep(1)
        return 0
    finally:
        for name in processes.stop_all(everything, timeout=30):
            print(f"{name} did not stop in 30s; killed it", file=sys.stderr)


def _auxiliary(name: str, argv: list[str], ready_url: str, env: dict[str, str] | None = None) -> Process:
    return Process(name, argv, env or {}, ready_url, LOGS / f"{name}.log")


def _secret(name: str) -> str:
    path = SECRETS / name
    if not path.exists():
        SECRETS.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(secrets.token_urlsafe(32))
    return path.read_text().strip()


def _issuer_keys() -> Path:
    """Issuance's signing keys for local runs: one Ed25519 key, made on first run under `.local/`."""
    from issuance import keys

    directory = SECRETS / "issuer-keys"
    if not any(directory.glob("*.pem")):
        keys.generate_key(directory)
    return directory


def _seed_catalog(database_url: str, kafka: str, auth: dict[str, str]) -> None:
    env = {**os.environ, "DATABASE_URL": database_url, "KAFKA_BOOTSTRAP_SERVERS": kafka, **auth}
    result = subprocess.run(
        [sys.executable, "-m", "catalog.seed"], env=env, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        print(f"seeding the catalog failed:\n{result.stdout}{result.stderr}", file=sys.stderr)
    else:
        print("catalog seeded with the launch microcredentials")


def _print_summary(started: list[Process], endpoints: infra.Endpoints) -> None:
    print("\nmicrocred is running:")
    for name, port in PORTS.items():
        if any(process.name == name for process in started):
            print(f"  {name:<18} http://127.0.0.1:{port}/docs   log: {LOGS / name}.log")
    print(f'  {"dev token issuer":<18} {dev_issuer.ISSUER}/token   (POST {{"sub", "roles", "email"}})')
    if any(process.name == "payment-simulator" for process in started):
        print(f"  {'payment simulator':<18} http://127.0.0.1:{SIMULATOR_PORT}/docs")
    if any(process.name == "mail-sink" for process in started):
        print(f"  {'mail sink':<18} http://127.0.0.1:{MAIL_SINK_HTTP_PORT}/   (every email sent, caught)")
    print(f"  {'kafka':<18} {endpoints.kafka_bootstrap}")
    print(f"  {'postgres':<18} {endpoints.postgres_url}")
    print("Ctrl-C stops the services; `make infra-down` stops Kafka and PostgreSQL.")


def _install_signal_handlers() -> list[int]:
    received: list[int] = []

    def handle(signum: int, _frame: object) -> None:
        received.append(signum)

    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)
    return received


if __name__ == "__main__":
    raise SystemExit(main())
