"""The templates: every kind renders a subject, a text and an HTML part; HTML escapes what it shows."""

from typing import Any

import pytest

from microcred_events import CredentialIssued, Event, PaymentDeclined, example_data
from notifications import messages
from notifications.domain import NOTIFIED_EVENTS, notice_for

LEARNER_EVENTS = [
    event_type
    for event_type in NOTIFIED_EVENTS
    if notice_for(event_type.model_validate(example_data(event_type))).for_learner
]
HOSTILE = '<script>alert("x")</script> & co'


def example(event_type: type[Event], **changes: Any) -> Event:
    return event_type.model_validate({**example_data(event_type), **changes})


def content(event: Event, **extra: Any) -> messages.Content:
    return messages.Content(event, link=notice_for(event).link, **extra)


@pytest.mark.parametrize("event_type", LEARNER_EVENTS, ids=lambda event_type: event_type.__name__)
def test_every_kind_renders_an_email_and_an_in_app_message(event_type: type[Event]) -> None:
    event = example(event_type)
    kind = notice_for(event).kind

    email = messages.email(kind, content(event, course="Data Analysis with Python"), "Ada Lovelace")
    in_app = messages.in_app(kind, content(event, course="Data Analysis with Python"))

    assert email.subject
    assert "\n" not in email.subject
    assert email.text.startswith("Hello Ada Lovelace,")
    assert "<p>Hello Ada Lovelace,</p>" in email.html
    assert email.html.rstrip().endswith("</html>")
    assert in_app.title == email.subject
    assert in_app.body
    assert in_app.body in email.text
    assert "Hello" not in in_app.body


def test_the_credential_email_links_to_the_credential_page() -> None:
    event = example(CredentialIssued)
    assert isinstance(event, CredentialIssued)
    email = messages.email(notice_for(event).kind, content(event), "Ada")
    url = str(event.credential_url)
    assert url in email.text
    assert f'href="{url}"' in email.html
    assert "Data Analysis Foundations" in email.subject
    assert messages.in_app(notice_for(event).kind, content(event)).link == url


def test_a_pathway_credential_is_announced_as_one() -> None:
    course = example(CredentialIssued)
    pathway = example(
        CredentialIssued,
        kind="pathway",
        achievement_name="Durable Skills",
        pathway_id="3f1d2c4b-5a6e-4f70-8a9b-0c1d2e3f4a5b",
        course_id=None,
        enrollment_id=None,
    )
    course_email = messages.email(notice_for(course).kind, content(course), "Ada")
    pathway_email = messages.email(notice_for(pathway).kind, content(pathway), "Ada")

    assert pathway_email.subject == 'Your pathway credential "Durable Skills" is ready'
    assert "course credentials of the pathway" in pathway_email.text
    assert "course credentials of the pathway" in pathway_email.html
    assert "pathway" not in course_email.subject
    assert "course credentials of the pathway" not in course_email.text
    assert messages.in_app(notice_for(pathway).kind, content(pathway)).title == pathway_email.subject


def test_money_and_course_titles_are_shown() -> None:
    from microcred_events import PaymentSettled

    event = example(PaymentSettled)
    email = messages.email(notice_for(event).kind, content(event, course="Data Analysis"), "Ada")
    assert "49.00 EUR" in email.subject
    assert "49.00 EUR" in email.text
    assert "Data Analysis" in email.text


def test_an_unknown_course_reads_naturally() -> None:
    from microcred_events import EnrollmentActivated

    event = example(EnrollmentActivated)
    message = messages.in_app(notice_for(event).kind, content(event))
    assert "None" not in message.title + message.body
    assert "your course" in message.title


def test_html_escapes_event_data_and_text_keeps_it_verbatim() -> None:
    event = example(CredentialIssued, achievement_name=HOSTILE)
    email = messages.email(notice_for(event).kind, content(event), 'Eve <img src=x onerror="y">')
    assert "<script>" not in email.html
    assert "<img" not in email.html
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; &amp; co" in email.html
    assert "&lt;img src=x onerror=&#34;y&#34;&gt;" in email.html
    # Plain text is not HTML: escaping it would show the learner entities.
    assert HOSTILE in email.text


def test_a_line_break_in_the_data_cannot_reach_the_subject_header() -> None:
    event = example(CredentialIssued, achievement_name="Data\r\nBcc: everyone@example.org")
    email = messages.email(notice_for(event).kind, content(event), "Ada")
    assert "\n" not in email.subject
    assert "\r" not in email.subject
    assert "Data Bcc: everyone@example.org" in email.subject


def test_a_declined_card_tells_the_learner_to_check_out_again() -> None:
    event = example(PaymentDeclined, attempts_left=1)
    email = messages.email(notice_for(event).kind, content(event), "Ada")
    said = "check out again to pay with another card (1 try left)"
    assert said in " ".join(email.text.split())
    assert said in " ".join(email.html.split())
    assert said in messages.in_app(notice_for(event).kind, content(event)).body
