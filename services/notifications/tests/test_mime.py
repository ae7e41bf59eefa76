"""The email as sent: what a mail client reads back from the bytes is what the learner is owed."""

import email
import re
from email import policy
from email.header import decode_header, make_header
from email.message import EmailMessage

import pytest
from aiosmtplib.email import flatten_message

from notifications.delivery import mime_email
from notifications.messages import Email

SENDER = "microcred <no-reply@microcred.example>"
CONTENT = Email(
    subject="Your credential: Données — ready",
    text="Hello Zoë,\n\nYour credential is ready: " + "a long line of text " * 60 + "\n",
    html="<p>Your credential for <b>Données</b> is ready.</p>",
)


def wire(message: bytes | EmailMessage) -> bytes:
    """What goes to the SMTP server: the bytes, or an `EmailMessage` as aiosmtplib flattens it."""
    return message if isinstance(message, bytes) else flatten_message(message)


def read_back(name: str, address: str) -> EmailMessage:
    message = mime_email(SENDER, name, address, CONTENT, "<d-1@microcred.example>")
    parsed = email.message_from_bytes(wire(message), policy=policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


def test_a_mail_client_reads_back_every_header_and_both_parts() -> None:
    parsed = read_back("Zoë Ångström", "zoe@example.org")

    assert parsed["From"] == SENDER
    assert parsed["To"].addresses[0].display_name == "Zoë Ångström"
    assert parsed["To"].addresses[0].addr_spec == "zoe@example.org"
    assert parsed["Subject"] == CONTENT.subject
    assert parsed["Message-ID"] == "<d-1@microcred.example>"
    assert parsed["Auto-Submitted"] == "auto-generated"
    assert parsed["Date"] is not None
    assert parsed.get_content_type() == "multipart/alternative"
    text, html = parsed.get_body(("plain",)), parsed.get_body(("html",))
    assert text is not None
    assert html is not None
    # Lines end in CRLF on the wire, as SMTP wants; a mail client shows them as line breaks.
    assert text.get_content().replace("\r\n", "\n") == CONTENT.text
    assert html.get_content().strip() == CONTENT.html


def test_an_address_that_is_not_ascii_goes_as_before_for_smtputf8() -> None:
    message = mime_email(SENDER, "Zoë", "zoe@exämple.org", CONTENT, "<d-1@microcred.example>")

    assert isinstance(message, EmailMessage)
    assert message["To"].addresses[0].addr_spec == "zoe@exämple.org"


def test_every_line_stays_within_smtps_limit_however_long_the_text() -> None:
    message = mime_email(SENDER, "Zoë", "zoe@example.org", CONTENT, "<d-1@microcred.example>")

    lines = wire(message).splitlines()

    assert max(len(line) for line in lines) <= 78


@pytest.mark.parametrize("name", ["Zoe\r\nBcc: someone@example.net", "Zoë\r\nBcc: someone@example.net"])
def test_a_name_holding_a_line_break_cannot_add_a_header(name: str) -> None:
    parsed = read_back(name, "zoe@example.org")

    assert parsed["Bcc"] is None
    assert [address.addr_spec for address in parsed["To"].addresses] == ["zoe@example.org"]


@pytest.mark.parametrize(
    "address", ["root>,x<victim@evil.org", "u1>,<u2>,<x@d.org", "a,b@example.org", "a b@example.org"]
)
def test_an_address_that_would_read_as_more_than_one_is_refused(address: str) -> None:
    with pytest.raises(ValueError, match="not a single plain address"):
        mime_email(SENDER, "Zoe", address, CONTENT, "<d-1@microcred.example>")


def test_long_names_and_subjects_are_folded_into_short_encoded_words() -> None:
    content = Email(
        subject=" ".join(["Votre certificat « Données et société » est prêt"] * 3),
        text="x\n",
        html="<p>x</p>",
    )
    name = "Александр Сергеевич Пушкин-Гончаров"
    message = mime_email(SENDER, name, "a@example.org", content, "<d-1@microcred.example>")

    raw = wire(message)
    parsed = email.message_from_bytes(raw, policy=policy.default)

    assert max(len(line) for line in raw.splitlines()) <= 78
    assert all(len(word) <= 75 for word in re.findall(rb"=\?utf-8\?[qb]\?[^?]*\?=", raw))
    assert parsed["Subject"] == content.subject
    # Read as RFC 2047 says (the space between encoded words is not the name's); Python's address
    # parser keeps it, mail clients do not.
    to = email.message_from_bytes(raw)["To"]
    assert str(make_header(decode_header(to))) == f"{name} <a@example.org>"


def test_a_line_that_starts_with_from_is_sent_as_it_is() -> None:
    content = Email(subject="x", text="Dear Zoe,\nFrom now on you hold it.\n", html="<p>x</p>")
    message = mime_email(SENDER, "Zoe", "zoe@example.org", content, "<d-1@microcred.example>")

    parsed = email.message_from_bytes(wire(message), policy=policy.default)
    text = parsed.get_body(("plain",))

    assert text is not None
    assert text.get_content().replace("\r\n", "\n") == content.text


def test_every_line_ends_in_crlf_and_the_bodies_are_quoted_printable_ascii() -> None:
    raw = wire(mime_email(SENDER, "Zoë", "zoe@example.org", CONTENT, "<d-1@microcred.example>"))

    assert raw.isascii()
    assert b"\n" not in raw.replace(b"\r\n", b"")
    assert raw.count(b"Content-Transfer-Encoding: quoted-printable\r\n") == 2
