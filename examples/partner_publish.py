"""Publish a signed course-completion report to microcred, as a partner institution would.

A plain Kafka client (aiokafka) and the standard library only: no microcred code. It builds a
`CompletionReported` report, wraps it in the CloudEvents binary envelope, signs
`<ce_id>.<ce_time>.<body>` with the partner's HMAC secret (or Ed25519 key), publishes it to the
partner topic, and then watches the partner's rejection topic for a while: a refusal is told
there, with its reason; an accepted report (or a duplicate of one) is not, and neither is a
message whose signature is not the partner's (it is dead-lettered: anyone may name a partner).
So no rejection means accepted only once the signing is known to be right. See docs/partners.md.

    python examples/partner_publish.py --bootstrap 127.0.0.1:9092 \\
        --partner-id b3d5f7a9-2c4e-4e61-9a83-5f1b7d3c9e20 --secret "$PARTNER_SECRET" \\
        --course-id 3f1c2a9e-5b7d-4c8e-9a21-6d0f4b8e7c15 --learner-email ada@example.org --score 87.5

The secret may also come from the PARTNER_SECRET environment variable (better than the command
line, which other users of the machine can see). Exit status: 0 when no rejection arrived while
watching (accepted, or a signature that is not the partner's), 1 when the report was refused, 2
for bad arguments.
"""

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import os
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

REPORT_TYPE = "org.microcred.partner.completion.reported.v1"
PARTNER_TOPIC = "partner.completion.v1"


def rejection_topic(partner_id: str) -> str:
    return f"partner.{partner_id}.rejections.v1"


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def signature(
    message_id: str, time: str, body: bytes, *, secret: str | None, ed25519_key: Path | None
) -> str:
    """The `ce_signature` header: `v1,<base64 HMAC-SHA256>` and/or `v1a,<base64 Ed25519>`,
    each over `<id>.<time>.<body>`."""
    content = f"{message_id}.{time}.".encode() + body
    signatures = []
    if secret:
        digest = hmac.new(secret.encode(), content, hashlib.sha256).digest()
        signatures.append("v1," + base64.b64encode(digest).decode())
    if ed25519_key:
        # Only needed for Ed25519; the `cryptography` package signs it.
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        key = load_pem_private_key(ed25519_key.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise SystemExit(f"{ed25519_key} is not an Ed25519 private key")
        signatures.append("v1a," + base64.b64encode(key.sign(content)).decode())
    return " ".join(signatures)


def build_report(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {
        "report_id": args.report_id or str(uuid.uuid4()),
        "partner_id": args.partner_id,
        "course_id": args.course_id,
        "completed_at": args.completed_at or now_rfc3339(),
    }
    optional = {
        "learner_id": args.learner_id,
        "learner_email": args.learner_email,
        "enrollment_id": args.enrollment_id,
        "score": args.score,
        "evidence_url": args.evidence_url,
    }
    report.update({name: value for name, value in optional.items() if value is not None})
    return report


async def publish(args: argparse.Namespace, report: dict[str, Any]) -> tuple[str, str]:
    """Publish the signed report; returns its ce_id and ce_time."""
    body = json.dumps(report, separators=(",", ":")).encode()
    message_id, time = str(uuid.uuid4()), now_rfc3339()
    headers = [
        ("ce_specversion", b"1.0"),
        ("ce_id", message_id.encode()),
        ("ce_type", REPORT_TYPE.encode()),
        ("ce_source", f"urn:microcred:partner:{args.partner_id}".encode()),
        ("ce_time", time.encode()),
        ("ce_subject", report["report_id"].encode()),
        ("content-type", b"application/json"),
        (
            "ce_signature",
            signature(message_id, time, body, secret=args.secret, ed25519_key=args.ed25519_key).encode(),
        ),
    ]
    # acks="all" and idempotence: the report is on the broker's replicas before we say it is sent.
    producer = AIOKafkaProducer(bootstrap_servers=args.bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        await producer.send_and_wait(
            args.topic_prefix + PARTNER_TOPIC, body, key=report["report_id"].encode(), headers=headers
        )
    finally:
        await producer.stop()
    return message_id, time


async def watch_rejections(args: argparse.Namespace, message_id: str) -> dict[str, Any] | None:
    """The rejection of our message, if one arrives on the partner's topic within --wait seconds."""
    consumer = AIOKafkaConsumer(
        args.topic_prefix + rejection_topic(args.partner_id),
        bootstrap_servers=args.bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        deadline = asyncio.get_running_loop().time() + args.wait
        while asyncio.get_running_loop().time() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                for record in records:
                    rejection: dict[str, Any] = json.loads(record.value)
                    if rejection.get("message_id") == message_id:
                        return rejection
    finally:
        await consumer.stop()
    return None


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bootstrap", required=True, help="Kafka bootstrap servers, host:port")
    parser.add_argument("--topic-prefix", default="", help="the environment's topic prefix, if it uses one")
    parser.add_argument("--partner-id", required=True, type=lambda text: str(uuid.UUID(text)))
    parser.add_argument(
        "--secret", default=os.environ.get("PARTNER_SECRET"), help="HMAC secret (or PARTNER_SECRET)"
    )
    parser.add_argument(
        "--ed25519-key", type=Path, help="PEM file of the Ed25519 private key, to sign with it"
    )
    parser.add_argument("--course-id", required=True, type=lambda text: str(uuid.UUID(text)))
    parser.add_argument("--learner-id", type=lambda text: str(uuid.UUID(text)))
    parser.add_argument("--learner-email")
    parser.add_argument("--enrollment-id", type=lambda text: str(uuid.UUID(text)))
    parser.add_argument("--report-id", type=lambda text: str(uuid.UUID(text)), help="to resend a report")
    parser.add_argument("--completed-at", help="RFC 3339 with offset; default now")
    parser.add_argument("--score", type=float)
    parser.add_argument("--evidence-url")
    parser.add_argument(
        "--wait", type=float, default=10.0, help="seconds to watch for a rejection (0: don't)"
    )
    args = parser.parse_args(argv)
    if not args.secret and not args.ed25519_key:
        parser.error("sign with --secret (or PARTNER_SECRET) and/or --ed25519-key")
    if not args.learner_id and not args.learner_email and not args.enrollment_id:
        parser.error("name the learner: --learner-id, --learner-email or --enrollment-id")
    return args


async def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    report = build_report(args)
    message_id, time = await publish(args, report)
    print(f"published report {report['report_id']} as message {message_id} ({time})")
    if args.wait <= 0:
        return 0
    rejection = await watch_rejections(args, message_id)
    if rejection is None:
        print(f"not refused within {args.wait:g}s (nor told, if the secret or key is not the partner's)")
        return 0
    print(f"refused: {rejection['reason']}: {rejection['detail']}")
    return 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
