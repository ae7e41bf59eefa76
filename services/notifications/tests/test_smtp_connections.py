"""Emails reuse open SMTP sessions, and a session that failed or idled too long is not reused."""

import asyncio
from collections.abc import AsyncIterator
from email.message import EmailMessage

import aiosmtplib
import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from notifications.delivery import SmtpConnections
from notifications.settings import Settings
from notifications.smtp_sink import Handler, MailStore, smtp_server


class CountingHandler(Handler):
    """The sink's handler, noting which SMTP session each email came over; refuses one address."""

    def __init__(self, store: MailStore) -> None:
        super().__init__(store)
        # The sessions themselves, not their id(): a closed session's id can be reused by the next.
        self.sessions: list[Session] = []

    async def handle_RCPT(  # noqa: N802  # aiosmtpd's hook name
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if address == "nobody@example.org":
            return "550 no such mailbox"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:  # noqa: N802
        self.sessions.append(session)
        return await super().handle_DATA(server, session, envelope)


def email(to: str = "ada@example.org") -> EmailMessage:
    message = EmailMessage()
    message["From"] = "microcred <no-reply@microcred.example>"
    message["To"] = to
    message["Subject"] = "Hello"
    message.set_content("Hello\n")
    return message


@pytest.fixture
async def sink() -> AsyncIterator[tuple[CountingHandler, int]]:
    handler = CountingHandler(MailStore(limit=100))
    async with smtp_server(handler, port=0) as port:
        yield handler, port


def settings(port: int) -> Settings:
    # The SMTP settings with their defaults; the rest of the service's are not needed here.
    return Settings.model_construct(smtp_port=port)


async def test_emails_share_one_session_when_sent_one_after_another(
    sink: tuple[CountingHandler, int],
) -> None:
    handler, port = sink
    connections = SmtpConnections(settings(port))
    try:
        for _ in range(5):
            await connections.send(email(), "ada@example.org")
    finally:
        connections.close()
    assert len(handler.sessions) == 5
    assert len(set(handler.sessions)) == 1


async def test_emails_sent_side_by_side_open_no_more_sessions_than_go_at_once(
    sink: tuple[CountingHandler, int],
) -> None:
    """Under load, as the email worker sends (a few at a time): each session carries many emails."""
    handler, port = sink
    connections = SmtpConnections(settings(port))
    at_once = asyncio.Semaphore(4)

    async def send() -> None:
        async with at_once:
            await connections.send(email(), "ada@example.org")

    try:
        await asyncio.gather(*(send() for _ in range(40)))
    finally:
        connections.close()
    assert len(handler.sessions) == 40
    assert len(set(handler.sessions)) <= 4


async def test_a_session_is_renewed_after_its_quota_of_emails(sink: tuple[CountingHandler, int]) -> None:
    handler, port = sink
    connections = SmtpConnections(settings(port), uses=2)
    try:
        for _ in range(5):
            await connections.send(email(), "ada@example.org")
    finally:
        connections.close()
    assert len(set(handler.sessions)) == 3  # 2 + 2 + 1


async def test_an_idle_session_is_not_reused(sink: tuple[CountingHandler, int]) -> None:
    handler, port = sink
    connections = SmtpConnections(settings(port), idle_seconds=0.0)
    try:
        for _ in range(3):
            await connections.send(email(), "ada@example.org")
    finally:
        connections.close()
    assert len(set(handler.sessions)) == 3


async def test_a_session_that_failed_is_dropped(sink: tuple[CountingHandler, int]) -> None:
    handler, port = sink
    connections = SmtpConnections(settings(port))
    try:
        await connections.send(email(), "ada@example.org")
        with pytest.raises(aiosmtplib.SMTPRecipientsRefused):
            await connections.send(email("nobody@example.org"), "nobody@example.org")
        await connections.send(email(), "ada@example.org")
    finally:
        connections.close()
    first, second = handler.sessions
    assert first is not second
