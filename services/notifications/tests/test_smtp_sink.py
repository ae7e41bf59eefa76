"""The local mail sink: catches what is sent to it over real SMTP (loopback) and lists it over HTTP."""

from collections.abc import AsyncIterator
from email.message import EmailMessage

import aiosmtplib
import httpx
import pytest

from notifications.smtp_sink import Handler, MailStore, create_app, smtp_server


def email(subject: str, *, html: str | None = None) -> EmailMessage:
    message = EmailMessage()
    message["From"] = "microcred <no-reply@microcred.example>"
    message["To"] = "Ada Lovelace <ada@example.org>"
    message["Subject"] = subject
    message.set_content("Hello Ada,\n\nThe text part.\n")
    if html is not None:
        message.add_alternative(html, subtype="html")
    return message


@pytest.fixture
async def sink() -> AsyncIterator[tuple[MailStore, int]]:
    store = MailStore(limit=3)
    async with smtp_server(Handler(store), port=0) as port:
        yield store, port


async def test_the_sink_keeps_what_it_receives(sink: tuple[MailStore, int]) -> None:
    store, port = sink
    await aiosmtplib.send(
        email("Your credential is ready", html="<p>Hello <b>Ada</b></p>"),
        hostname="127.0.0.1",
        port=port,
        timeout=5,
    )
    (caught,) = store.messages()
    assert caught.from_ == "no-reply@microcred.example"
    assert caught.to == ["ada@example.org"]
    assert caught.subject == "Your credential is ready"
    assert caught.text is not None
    assert "The text part." in caught.text
    assert caught.html is not None
    assert "<b>Ada</b>" in caught.html


async def test_a_text_only_email_has_no_html(sink: tuple[MailStore, int]) -> None:
    store, port = sink
    await aiosmtplib.send(email("Plain"), hostname="127.0.0.1", port=port, timeout=5)
    assert store.messages()[0].html is None


async def test_an_email_that_cannot_be_parsed_hides_no_other(sink: tuple[MailStore, int]) -> None:
    store, port = sink
    unreadable = b"Subject: bogus\r\nContent-Type: text/plain; charset=x-bogus\r\n\r\nnot to be decoded\r\n"
    await aiosmtplib.send(
        unreadable, sender="a@example.org", recipients=["b@example.org"], hostname="127.0.0.1", port=port
    )
    await aiosmtplib.send(email("Readable"), hostname="127.0.0.1", port=port, timeout=5)

    first, second = store.messages()
    assert first.subject.startswith("(unreadable email")
    assert first.text is not None
    assert "not to be decoded" in first.text
    assert second.subject == "Readable"
    assert store.messages()[1] is second  # parsed once, when first read


async def test_the_sink_keeps_only_the_newest(sink: tuple[MailStore, int]) -> None:
    store, port = sink
    for number in range(5):
        await aiosmtplib.send(email(f"mail {number}"), hostname="127.0.0.1", port=port, timeout=5)
    assert [mail.subject for mail in store.messages()] == ["mail 2", "mail 3", "mail 4"]


async def test_the_http_api_lists_clears_and_shows_the_mail(sink: tuple[MailStore, int]) -> None:
    store, port = sink
    for subject in ("first", "second <3"):
        await aiosmtplib.send(
            email(subject, html="<script>alert(1)</script>"), hostname="127.0.0.1", port=port, timeout=5
        )
    transport = httpx.ASGITransport(app=create_app(store))
    async with httpx.AsyncClient(transport=transport, base_url="http://sink") as client:
        listed = (await client.get("/messages")).json()
        assert [mail["subject"] for mail in listed] == ["second <3", "first"]
        assert set(listed[0]) == {"from", "to", "subject", "text", "html", "received_at"}

        page = (await client.get("/")).text
        assert "second &lt;3" in page
        # The email's HTML is shown in a sandboxed frame, escaped into its srcdoc.
        assert "<script>alert(1)</script>" not in page
        assert 'sandbox srcdoc="&lt;script&gt;' in page

        assert (await client.delete("/messages")).status_code == 204
        assert (await client.get("/messages")).json() == []


async def test_a_slow_sink_answers_late() -> None:
    """What the integration tests use to stand for a slow mail server."""
    store = MailStore()
    async with smtp_server(Handler(store, delay_seconds=0.5), port=0) as port:
        with pytest.raises(aiosmtplib.SMTPTimeoutError):
            await aiosmtplib.send(email("slow"), hostname="127.0.0.1", port=port, timeout=0.1)
