"""The email as sent: what a mail client reads back from the bytes is what the learner is owed."""

import email
from email import policy
from email.message import EmailMessage

from aiosmtplib.email import flatten_message

from notifications.delivery import mime_email
from notifications.messages import Email

SENDER = "microcred <no-reply@microcred.example>"
CONTENT = Email(
    subject="Your credential: Données — ready",
    text="Hello Zoë,\n\nYour credential is ready: " + "a long line of text " * 60 + "\n",
    html="<p>Your credential for <b>Données</b> is ready.</p>",
)


def read_back(name: str, address: str) -> EmailMessage:
    message = mime_email(SENDER, name, address, CONTENT, "<d-1@microcred.example>")
    parsed = email.message_from_bytes(flatten_message(message), policy=policy.default)
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
    assert text.get_content() == CONTENT.text
    assert html.get_content().strip() == CONTENT.html


def test_an_address_that_is_not_ascii_goes_as_before_for_smtputf8() -> None:
    message = mime_email(SENDER, "Zoë", "zoe@exämple.org", CONTENT, "<d-1@microcred.example>")

    assert isinstance(message, EmailMessage)
    assert message["To"].addresses[0].addr_spec == "zoe@exämple.org"


def test_every_line_stays_within_smtps_limit_however_long_the_text() -> None:
    message = mime_email(SENDER, "Zoë", "zoe@example.org", CONTENT, "<d-1@microcred.example>")

    lines = flatten_message(message).splitlines()

    assert max(len(line) for line in lines) <= 78


def test_a_name_holding_a_line_break_cannot_add_a_header() -> None:
    parsed = read_back("Zoë\r\nBcc: someone@example.net", "zoe@example.org")

    assert parsed["Bcc"] is None
    assert parsed["To"].addresses[0].addr_spec == "zoe@example.org"
    assert len(parsed["To"].addresses) == 1
