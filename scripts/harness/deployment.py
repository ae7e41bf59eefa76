"""The deployment a fault run stands up on this machine, shaped as production runs it: every
service as replicas (a process and a port each, one consumer group per service) against a
replicated Kafka cluster and PostgreSQL, one Service-like address in front of each service's
replicas, the payment provider's simulator, the mail sink and the webhook receiver.

Databases `faults_<service>` are made afresh; topics carry the run's prefix; the services read a
JWKS file of the run's own token issuer. `tuning` adds settings per service (shorter timers for
a short run).
"""

from __future__ import annotations

import json
import secrets
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from dev_issuer import DevIssuer

from issuance import keys
from microcred_events import Issuer, example_data

from . import processes, sinks
from .balancer import Balancer, Replicas
from .cluster import KafkaCluster
from .processes import HOST, Process
from .sinks import MailJournal, WebhookJournal, WebhookReceiver

SERVICES = ("catalog", "enrollment", "billing", "issuance", "notifications")
MAIL_SINK = "mail-sink"
ISSUER = "https://issuer.faults.test"


@dataclass
class Deployment:
    """What one run owns: its cluster, databases, topic prefix, processes, keys and sinks."""

    run_id: str
    workdir: Path
    cluster: KafkaCluster
    database_urls: dict[str, str]
    services: dict[str, Replicas]
    fronts: dict[str, tuple[Balancer, int]]  # a Service-like address (balancer, port) per service
    sink: Process
    simulator: Process
    issuer: DevIssuer
    receiver: WebhookReceiver
    receiver_port: int
    mail: MailJournal
    webhooks: WebhookJournal

    @property
    def prefix(self) -> str:
        return prefix(self.run_id)

    @property
    def processes(self) -> list[Process]:
        replicas = [process for group in self.services.values() for process in group.processes]
        return [*replicas, self.sink, self.simulator]

    def token(self, subject: str, role: str, email: str, name: str | None) -> str:
        # Staff act for the institution the workload's courses are issued by (the example one).
        scope = {"issuers": [str(example_data(Issuer)["issuer_id"])]} if role == "staff" else {}
        return self.issuer.token(subject, [role], email=email, name=name, ttl=24 * 3600, **scope)


def prefix(run_id: str) -> str:
    return f"faults-{run_id}."


async def recreate_databases(postgres_url: str) -> dict[str, str]:
    """`faults_<service>` for each service, dropped and created afresh; their URLs."""
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


def deploy(
    *,
    run_id: str,
    workdir: Path,
    cluster: KafkaCluster,
    database_urls: Mapping[str, str],
    replicas: int,
    tuning: Mapping[str, Mapping[str, str]],
) -> Deployment:
    """The processes of the deployment, not started yet; logs, keys and journals under `workdir`."""
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
    payment_secret = secrets.token_urlsafe(32)
    base = processes.clean_environment()
    common = {
        **base,
        "KAFKA_BOOTSTRAP_SERVERS": cluster.bootstrap,
        "KAFKA_TOPIC_PREFIX": prefix(run_id),
        "KAFKA_TOPIC_REPLICATION": str(min(3, len(cluster.node_ids))),
        "AUTH_ISSUER": ISSUER,
        "AUTH_JWKS_FILE": str(jwks),
        "LOG_LEVEL": "INFO",
        # The workload's learners all come through the balancer, from one address, at a rate no
        # learner reaches: the limits are for abuse, which the harness does not exercise.
        "RATE_LIMIT_PER_ADDRESS": "1000000/minute",
        "RATE_LIMIT_PER_SUBJECT": "1000000/minute",
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
        },
        "notifications": {
            "SMTP_HOST": HOST,
            "SMTP_PORT": str(ports["smtp"]),
            # The webhook receiver is on this machine's loopback, which webhooks reach only when allowed.
            "WEBHOOK_ALLOWED_PRIVATE_NETWORKS": '["127.0.0.0/8"]',
        },
    }

    def settings(service: str) -> Callable[[int, int], dict[str, str]]:
        def env(_replica: int, _port: int) -> dict[str, str]:
            return {
                **common,
                **own[service],
                **tuning.get(service, {}),
                "DATABASE_URL": database_urls[service],
            }

        return env

    groups = {
        service: Replicas(
            service, processes.replicas(service, replicas, env=settings(service), logs=logs, inherit=False)
        )
        for service in SERVICES
    }
    mail_journal, webhook_journal = workdir / "mail.jsonl", workdir / "webhooks.jsonl"
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
        run_id=run_id,
        workdir=workdir,
        cluster=cluster,
        database_urls=dict(database_urls),
        services=groups,
        fronts={service: (Balancer(groups[service]), port) for service, port in fronts.items()},
        sink=sink,
        simulator=simulator,
        issuer=issuer,
        receiver=WebhookReceiver(webhook_journal),
        receiver_port=ports["receiver"],
        mail=MailJournal(mail_journal),
        webhooks=WebhookJournal(webhook_journal),
    )
