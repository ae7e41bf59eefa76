"""A mail sink for local runs: an SMTP server that keeps what it receives and shows it over HTTP.

    python -m notifications.smtp_sink

`make up` starts it and points notifications at it, so a newcomer sees every email the system
sends. Nothing is relayed anywhere; the last `SINK_MAX_MESSAGES` emails are kept in memory.

- SMTP on `SINK_HOST`:`SINK_SMTP_PORT` (127.0.0.1:1025), no authentication or TLS.
- HTTP on `SINK_HOST`:`SINK_HTTP_PORT` (127.0.0.1:8025):
  - `GET /`: the caught emails, newest first, as a page (HTML parts shown in sandboxed frames);
  - `GET /messages`: the same as JSON, `[{from, to, subject, text, html, received_at}]`;
  - `DELETE /messages`: forget them all.
- `SINK_DELAY_SECONDS` (0) makes it answer each email that much later: a slow mail server.
"""

import asyncio
import contextlib
import html
import sys
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser

import uvicorn
from aiosmtpd.smtp import SMTP, Envelope, Session
from fastapi import FastAPI, Response
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict


class SinkSettings(BaseSettings):
    model_config = SettingsConfigDict(frozen=True, extra="ignore", env_file=None, env_prefix="SINK_")

    host: str = "127.0.0.1"
    smtp_port: int = Field(default=1025, ge=1, le=65535)
    http_port: int = Field(default=8025, ge=1, le=65535)
    max_messages: int = Field(default=500, ge=1, le=100_000)
    delay_seconds: float = Field(default=0.0, ge=0)


class CaughtMail(BaseModel):
    from_: str = Field(alias="from", description="The envelope sender.")
    to: list[str] = Field(description="The envelope recipients.")
    subject: str
    text: str | None = Field(description="The text/plain part.")
    html: str | None = Field(description="The text/html part.")
    received_at: datetime


@dataclass
class _Received:
    mail_from: str
    rcpt_tos: list[str]
    raw: bytes
    received_at: datetime
    _parsed: CaughtMail | None = None

    def parsed(self) -> CaughtMail:
        """The email as read, parsed on the first read only."""
        if self._parsed is None:
            self._parsed = self._parse()
        return self._parsed

    def _parse(self) -> CaughtMail:
        fields: dict[str, object] = {
            "from": self.mail_from,
            "to": self.rcpt_tos,
            "received_at": self.received_at,
        }
        try:
            message = BytesParser(policy=policy.default).parsebytes(self.raw)
            assert isinstance(message, EmailMessage)  # what policy.default makes
            fields |= {
                "subject": str(message.get("subject", "")),
                "text": _part(message, "plain"),
                "html": _part(message, "html"),
            }
        except Exception as error:  # one email nobody can read must not hide the others
            fields |= {
                "subject": f"(unreadable email: {error})",
                "text": self.raw.decode("utf-8", "replace"),
                "html": None,
            }
        return CaughtMail.model_validate(fields)


class MailStore:
    """The last `limit` emails received; older ones are dropped.

    Emails are kept as received and parsed when read: parsing each one as it came cost the sink
    more CPU than notifications spent sending it (measured under `make bench`), and most are
    never read."""

    def __init__(self, limit: int = 500) -> None:
        self._messages: deque[_Received] = deque(maxlen=limit)

    def add(self, mail_from: str, rcpt_tos: list[str], raw: bytes) -> None:
        self._messages.append(_Received(mail_from, rcpt_tos, raw, datetime.now(UTC)))

    def messages(self) -> list[CaughtMail]:
        """Oldest first."""
        return [received.parsed() for received in self._messages]

    def clear(self) -> None:
        self._messages.clear()


class Handler:
    """aiosmtpd's handler: keeps each email in the store."""

    def __init__(self, store: MailStore, delay_seconds: float = 0.0) -> None:
        self._store = store
        self.delay_seconds = delay_seconds

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:  # noqa: N802
        if self.delay_seconds:
            await asyncio.sleep(self.delay_seconds)
        self._store.add(envelope.mail_from or "", list(envelope.rcpt_tos), envelope.original_content or b"")
        return "250 Message accepted for delivery"


def _part(message: EmailMessage, subtype: str) -> str | None:
    body = message.get_body(preferencelist=(subtype,))
    if body is None or body.get_content_subtype() != subtype:
        return None
    # SMTP carries CRLF line ends; readers of the JSON expect plain newlines.
    return str(body.get_content()).replace("\r\n", "\n")


@contextlib.asynccontextmanager
async def smtp_server(handler: object, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[int]:
    """Serve SMTP on the running loop with an aiosmtpd handler (`Handler`, or one of its own);
    yields the port (a free one when `port` is 0)."""
    loop = asyncio.get_running_loop()
    # SMTPUTF8: notifications sends to an address that is not ASCII with it, as a mail server must take.
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="microcred-sink", enable_SMTPUTF8=True, loop=loop), host, port
    )
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


def create_app(store: MailStore) -> FastAPI:
    app = FastAPI(
        title="microcred mail sink",
        description="Emails caught by the local SMTP sink; nothing is relayed anywhere.",
    )

    @app.get("/messages", summary="The caught emails, newest first")
    async def list_messages() -> list[CaughtMail]:
        return store.messages()[::-1]

    @app.delete("/messages", status_code=204, summary="Forget every caught email")
    async def clear_messages() -> Response:
        store.clear()
        return Response(status_code=204)

    @app.get("/", summary="The caught emails, as a page", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(_page(store.messages()[::-1]))

    @app.get("/health/live", summary="The process is up")
    async def live() -> dict[str, str]:
        return {"status": "ok"}

    return app


def _page(messages: list[CaughtMail]) -> str:
    def text(value: object) -> str:
        return html.escape(str(value))

    items = "".join(
        f"""<article><h2>{text(mail.subject)}</h2>
<p class="meta">{text(mail.received_at.isoformat(timespec="seconds"))} · from {text(mail.from_)}
to {text(", ".join(mail.to))}</p>
{f'<iframe sandbox srcdoc="{text(mail.html)}"></iframe>' if mail.html else ""}
<details><summary>Text part</summary><pre>{text(mail.text or "")}</pre></details></article>"""
        for mail in messages
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>microcred mail sink</title>
<style>body{{font-family:system-ui,sans-serif;max-width:48rem;margin:2rem auto;color:#1f2933}}
article{{border-top:1px solid #d0d5dd;padding:1rem 0}}.meta{{color:#6b7280;font-size:.9rem}}
iframe{{width:100%;height:22rem;border:1px solid #d0d5dd;border-radius:6px}}
pre{{white-space:pre-wrap}}</style>
</head><body>
<h1>microcred mail sink</h1>
<p>{len(messages)} email(s) caught, newest first. JSON at <a href="/messages">/messages</a>;
<code>curl -X DELETE .../messages</code> clears them.</p>
{items or "<p>No email yet.</p>"}
</body></html>"""


async def serve(settings: SinkSettings) -> None:
    store = MailStore(settings.max_messages)
    handler = Handler(store, settings.delay_seconds)
    async with smtp_server(handler, settings.host, settings.smtp_port) as port:
        print(
            f"mail sink: SMTP on {settings.host}:{port}, emails at http://{settings.host}:{settings.http_port}/"
        )
        config = uvicorn.Config(create_app(store), host=settings.host, port=settings.http_port)
        # uvicorn returns on SIGINT or SIGTERM; the SMTP server closes after it.
        await uvicorn.Server(config).serve()


def main() -> None:
    try:
        settings = SinkSettings()
    except ValidationError as exc:
        lines = [
            f"  SINK_{str(error['loc'][0]).upper()}: {error['msg'].removeprefix('Value error, ')}"
            for error in exc.errors()
        ]
        print("mail sink: invalid configuration:\n" + "\n".join(lines), file=sys.stderr)
        raise SystemExit(2) from None
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
