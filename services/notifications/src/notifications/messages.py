"""What people read: subject lines and bodies, rendered from `templates/` (Jinja2).

Each kind of notification has two templates: `<kind>.txt` sets `subject` and holds the plain-text
message (used in-app as is, and in the text part of the email inside `_layout.txt`), and
`<kind>.html` the HTML part of the email (extending `_layout.html`). HTML templates are
autoescaped, so an achievement name or a reason containing markup is shown, never interpreted;
undefined variables raise rather than vanish.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from microcred_events import CancellationReason, Event, Money

from .domain import Kind, format_money

_ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
    autoescape=jinja2.select_autoescape(enabled_extensions=("html",), default_for_string=False),
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)

_CANCELLATION_REASONS = {
    CancellationReason.LEARNER_REQUEST: "as you asked",
    CancellationReason.PAYMENT_FAILED: "because the payment did not go through",
    CancellationReason.REFUNDED: "because your payment was refunded",
    CancellationReason.COURSE_RETIRED: "because the course is no longer offered",
    CancellationReason.STAFF_ACTION: "by our staff",
}


@dataclass(frozen=True)
class Content:
    """What a message is made of: the event, and what the read models add to it."""

    event: Event
    course: str | None = None
    achievement: str | None = None
    link: str | None = None

    def variables(self) -> dict[str, Any]:
        money = getattr(self.event, "amount", None) or getattr(self.event, "price", None)
        return {
            "event": self.event,
            "course": self.course,
            "achievement": self.achievement,
            "link": self.link,
            "amount": format_money(money) if isinstance(money, Money) else None,
            "reasons": _CANCELLATION_REASONS,
        }


@dataclass(frozen=True)
class InApp:
    title: str
    body: str
    link: str | None


@dataclass(frozen=True)
class Email:
    subject: str
    text: str
    html: str


def in_app(kind: Kind, content: Content) -> InApp:
    subject, message = _message(kind, content)
    return InApp(title=subject, body=message, link=content.link)


def email(kind: Kind, content: Content, name: str) -> Email:
    subject, message = _message(kind, content)
    text = _ENV.get_template("_layout.txt").render(name=name, message=message)
    html = _ENV.get_template(f"{kind}.html").render(content.variables(), name=name, subject=subject)
    return Email(subject=subject, text=text, html=html)


def _message(kind: Kind, content: Content) -> tuple[str, str]:
    module = _ENV.get_template(f"{kind}.txt").make_module(content.variables())
    # One line, whatever the template or the data hold: a line break cannot go into a header.
    subject = " ".join(str(vars(module)["subject"]).split())
    return subject, str(module).strip()
