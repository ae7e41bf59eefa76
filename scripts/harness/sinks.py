"""What the outside world receives, kept on disk: the mail sink and the webhook receiver each write
one line per email or request to an append-only journal before answering, and the accounting reads
the journals, so no count lives only in a process's memory (killing the sink loses no evidence;
a runner that crashes leaves the evidence behind for an offline count).

The mail sink runs as a process of its own, `python scripts/harness/sinks.py mail-sink <journal>`
(ports from SINK_SMTP_PORT and SINK_HTTP_PORT); the webhook receiver is an ASGI app the runner
serves (`serving`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import hashlib
import hmac
import json
import os
import re
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from email import policy
from email.message import EmailMessage
from email.parser import BytesHeaderParser, BytesParser
from pathlib import Path
from typing import Any

import uvicorn
from aiosmtpd.smtp import SMTP, Envelope, Session
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from notifications.smtp_sink import MailStore, SinkSettings, create_app, smtp_server

HOST = "127.0.0.1"
CREDENTIAL_IN_TEXT = re.compile(
    r"/credentials/([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})"
)


class _AppendOnly:
    """One write(2) per line on an O_APPEND descriptor: once it returns the kernel has the line,
    even if this process is killed the next instant, and concurrent writers do not interleave."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, line: dict[str, Any]) -> None:
        os.write(self._fd, (json.dumps(line) + "\n").encode())

    def close(self) -> None:
        os.close(self._fd)


# --- the mail sink -----------------------------------------------------------------------------


class JournalingHandler:
    """aiosmtpd's handler for the run's mail sink: one journal line per accepted email, written
    before the 250 reply: an email killed between the two is sent again under the same Message-ID,
    which the count tells apart from a second email. (The sink's HTTP side, with an empty store,
    serves the liveness probe only.)"""

    def __init__(self, journal: Path) -> None:
        self._journal = _AppendOnly(journal)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:  # noqa: N802
        raw = envelope.original_content or b""
        # The headers alone are parsed, and the body searched as it came, decoded from quoted-
        # printable (whose soft line breaks may cut the link): a full parse of every email, as the
        # local sink's store makes, took a fifth of the machine in a 100,000-completion run. Nor
        # are the emails kept in a store: nothing reads them back, the journal is the record.
        headers = BytesHeaderParser(policy=policy.default).parsebytes(raw)
        found = CREDENTIAL_IN_TEXT.search(binascii.a2b_qp(raw).decode("utf-8", "replace"))
        if found is None and b"base64" in raw:
            # An email that is not ASCII all through may carry its text in base64: parsed whole.
            message = BytesParser(policy=policy.default).parsebytes(raw)
            assert isinstance(message, EmailMessage)  # what policy.default makes
            body = message.get_body(preferencelist=("plain",))
            found = CREDENTIAL_IN_TEXT.search(str(body.get_content())) if body is not None else None
        self._journal.write(
            {
                "message_id": str(headers.get("Message-ID", "")),
                "to": list(envelope.rcpt_tos),
                "subject": str(headers.get("Subject", "")),
                "credential_id": found.group(1) if found else None,
            }
        )
        return "250 Message accepted for delivery"


async def serve_mail_sink(journal: Path) -> None:
    settings = SinkSettings()
    store = MailStore(settings.max_messages)
    async with smtp_server(JournalingHandler(journal), settings.host, settings.smtp_port):
        config = uvicorn.Config(
            create_app(store), host=settings.host, port=settings.http_port, log_level="warning"
        )
        await uvicorn.Server(config).serve()


# --- the webhook receiver ----------------------------------------------------------------------


class WebhookReceiver:
    """Journals every delivery (webhook-id, credential id, whether the signature holds) and answers
    204, or 401 to a bad signature. The subscription's secret is set once it is known."""

    def __init__(self, journal: Path) -> None:
        self.journal = journal
        self.secret: str | None = None
        self._out = _AppendOnly(journal)

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/hook", self._hook, methods=["POST"])])

    async def _hook(self, request: Request) -> Response:
        body = await request.body()
        webhook_id = request.headers.get("webhook-id", "")
        signed = self._signed(webhook_id, request.headers.get("webhook-timestamp", ""), body, request)
        try:
            credential_id = str(json.loads(body)["data"]["credential_id"])
        except (ValueError, KeyError, TypeError):
            credential_id = None
        self._out.write({"webhook_id": webhook_id, "credential_id": credential_id, "signed": signed})
        return Response(status_code=204 if signed else 401)

    def _signed(self, webhook_id: str, timestamp: str, body: bytes, request: Request) -> bool:
        if self.secret is None:
            return False
        key = base64.b64decode(self.secret.removeprefix("whsec_"))
        digest = hmac.new(key, f"{webhook_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
        expected = "v1," + base64.b64encode(digest).decode()
        offered = request.headers.get("webhook-signature", "").split()
        return any(hmac.compare_digest(expected, signature) for signature in offered)


class _QuietServer(uvicorn.Server):
    """uvicorn without its signal handlers: the runner owns SIGINT/SIGTERM (Ctrl-C must reach its
    clean-up, which stops the processes it started)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.asynccontextmanager
async def serving(app: Any, port: int, name: str) -> AsyncIterator[None]:
    """Serve an ASGI app on HOST:port inside this event loop, for the duration of the block."""
    server = _QuietServer(
        uvicorn.Config(app, host=HOST, port=port, log_level="warning", access_log=False, lifespan="off")
    )
    task = asyncio.create_task(server.serve(), name=name)
    while not server.started:
        if task.done():
            task.result()  # raises why it could not start
            raise RuntimeError(f"{name} stopped before it started")
        await asyncio.sleep(0.05)
    try:
        yield
    finally:
        server.should_exit = True
        await task


# --- reading the journals ------------------------------------------------------------------------


@dataclass
class _Journal:
    """Reads a journal as it grows; a line still being written is read once complete."""

    path: Path
    _offset: int = 0

    def refresh(self) -> None:
        try:
            with self.path.open("rb") as journal:
                journal.seek(self._offset)
                chunk = journal.read()
        except FileNotFoundError:
            return
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self._offset += len(complete)
        for raw in complete.splitlines():
            self._take(json.loads(raw))

    def _take(self, line: dict[str, Any]) -> None:
        raise NotImplementedError


@dataclass
class MailJournal(_Journal):
    """Credential emails by credential id and Message-ID, their recipients, and the other emails."""

    by_credential: dict[str, collections.Counter[str]] = field(default_factory=dict)
    recipients: dict[str, set[str]] = field(default_factory=dict)
    # The other emails (enrollment created, payment settled, activated) by Message-ID.
    others: collections.Counter[str] = field(default_factory=collections.Counter)
    received: int = 0

    def _take(self, line: dict[str, Any]) -> None:
        self.received += 1
        credential_id = line["credential_id"]
        if credential_id is None:
            self.others[line["message_id"]] += 1
        else:
            self.by_credential.setdefault(credential_id, collections.Counter())[line["message_id"]] += 1
            self.recipients.setdefault(credential_id, set()).update(line["to"])


@dataclass
class WebhookJournal(_Journal):
    """Correctly signed deliveries by credential id and webhook-id; the badly signed ones counted."""

    by_credential: dict[str, collections.Counter[str]] = field(default_factory=dict)
    received: int = 0
    bad_signatures: int = 0
    unreadable: int = 0  # signed, yet no credential id in the body

    def _take(self, line: dict[str, Any]) -> None:
        self.received += 1
        if not line["signed"]:
            self.bad_signatures += 1
        elif line["credential_id"] is None:
            self.unreadable += 1
        else:
            self.by_credential.setdefault(line["credential_id"], collections.Counter())[
                line["webhook_id"]
            ] += 1


def main(argv: list[str]) -> int:
    if argv[:1] != ["mail-sink"] or len(argv) != 2:
        print("usage: sinks.py mail-sink <journal>", file=sys.stderr)
        return 2
    asyncio.run(serve_mail_sink(Path(argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
