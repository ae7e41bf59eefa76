"""Notifications' rules: who hears of an event and on which channel, how a failed delivery is
retried, and how a webhook is signed. No I/O here.

- `notice_for(event)` says what an event means to people: its kind, the learner it concerns, the
  key that names the occurrence (so a re-published event is recognised), and whether the learner
  hears of it or only webhook subscribers do.
- `learner_channels` applies the learner's preferences and the freshness rule.
- `Scope.covers(audience)` says whether a webhook subscription receives an event about `audience`.
- `RetryPolicy` is exponential backoff with full jitter, then `dead`.
- `sign` is the Standard Webhooks signature; `check_webhook_url` and `address_refusal` guard
  against SSRF (the host a URL names, and each address it resolves to).
"""

import base64
import enum
import fnmatch
import hashlib
import hmac
import ipaddress
import json
import random
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from urllib.parse import urlsplit
from uuid import UUID

from microcred_events import (
    CourseCompleted,
    CredentialIssued,
    CredentialReinstated,
    CredentialRevoked,
    EnrollmentActivated,
    EnrollmentCancelled,
    EnrollmentCreated,
    Event,
    Money,
    PaymentDeclined,
    PaymentFailed,
    PaymentSettled,
    RefundIssued,
)


class Kind(enum.StrEnum):
    """What a notification is about: `<subject>.<action>` of the event type."""

    ENROLLMENT_CREATED = "enrollment.created"
    ENROLLMENT_ACTIVATED = "enrollment.activated"
    ENROLLMENT_CANCELLED = "enrollment.cancelled"
    PAYMENT_SETTLED = "payment.settled"
    PAYMENT_DECLINED = "payment.declined"
    PAYMENT_FAILED = "payment.failed"
    REFUND_ISSUED = "refund.issued"
    COURSE_COMPLETED = "course.completed"
    CREDENTIAL_ISSUED = "credential.issued"
    CREDENTIAL_REVOKED = "credential.revoked"
    CREDENTIAL_REINSTATED = "credential.reinstated"


class Channel(enum.StrEnum):
    EMAIL = "email"
    IN_APP = "in_app"
    WEBHOOK = "webhook"


NOTIFIED_EVENTS: tuple[type[Event], ...] = (
    EnrollmentCreated,
    EnrollmentActivated,
    EnrollmentCancelled,
    PaymentSettled,
    PaymentDeclined,
    PaymentFailed,
    RefundIssued,
    CourseCompleted,
    CredentialIssued,
    CredentialRevoked,
    CredentialReinstated,
)
"""Every event a notification or a webhook is made of; their types are what subscribers filter on."""

WEBHOOK_EVENT_TYPES: frozenset[str] = frozenset(event_type.TYPE for event_type in NOTIFIED_EVENTS)

# The learner is not told of a completion: the credential it leads to follows within seconds and
# says more. Subscribers (partners, employers) do hear of it.
_WEBHOOK_ONLY = frozenset({Kind.COURSE_COMPLETED})

EMAIL_FRESHNESS = timedelta(hours=48)
"""Older events are not emailed (they still reach the in-app inbox). A new deployment reads each
topic from its start; without this, it would email every learner about their whole history."""


@dataclass(frozen=True)
class Notice:
    """What one event means to the people who should hear of it."""

    kind: Kind
    event_type: str
    # Names the occurrence (this enrollment's creation, this credential's issuance), not the
    # Kafka message: the same occurrence published again under another CloudEvents id (a producer
    # retrying outside its outbox, a replay) must not notify anyone twice.
    event_key: str
    learner_id: UUID
    occurred_at: datetime
    for_learner: bool
    link: str | None = None


def kind_of(event_type: str) -> Kind:
    """`org.microcred.issuance.credential.issued.v1` -> `credential.issued`."""
    return Kind(".".join(event_type.split(".")[3:5]))


def notice_for(event: Event) -> Notice:
    """The notice an event gives; raises `TypeError` for an event notifications does not handle."""
    learner_id: UUID
    match event:
        case EnrollmentCreated():
            occurrence, learner_id, at = event.enrollment_id, event.learner.learner_id, event.created_at
        case EnrollmentActivated():
            occurrence, learner_id, at = event.enrollment_id, event.learner_id, event.activated_at
        case EnrollmentCancelled():
            occurrence, learner_id, at = event.enrollment_id, event.learner_id, event.cancelled_at
        case PaymentSettled():
            occurrence, learner_id, at = event.payment_id, event.learner_id, event.settled_at
        case PaymentDeclined():
            # A payment can be declined more than once: each decline is its own news.
            occurrence_key = f"{event.payment_id}:{event.attempt}"
            return _notice(event, occurrence_key, event.learner_id, event.declined_at)
        case PaymentFailed():
            occurrence, learner_id, at = event.payment_id, event.learner_id, event.failed_at
        case RefundIssued():
            occurrence, learner_id, at = event.refund_id, event.learner_id, event.issued_at
        case CourseCompleted():
            occurrence, learner_id, at = event.enrollment_id, event.learner.learner_id, event.completed_at
        case CredentialIssued():
            occurrence, learner_id, at = event.credential_id, event.learner_id, event.issued_at
        case CredentialRevoked():
            # A credential can be suspended and later revoked: each status change is its own news.
            occurrence, learner_id, at = event.credential_id, event.learner_id, event.revoked_at
            return _notice(event, f"{occurrence}:{event.status_purpose}:{at.isoformat()}", learner_id, at)
        case CredentialReinstated():
            occurrence, learner_id, at = event.credential_id, event.learner_id, event.reinstated_at
            return _notice(event, f"{occurrence}:{at.isoformat()}", learner_id, at)
        case _:
            raise TypeError(f"notifications does not handle {type(event).__name__}")
    return _notice(event, str(occurrence), learner_id, at)


def _notice(event: Event, occurrence: str, learner_id: UUID, at: datetime) -> Notice:
    kind = kind_of(event.TYPE)
    return Notice(
        kind=kind,
        event_type=event.TYPE,
        event_key=f"{event.TYPE}:{occurrence}",
        learner_id=learner_id,
        occurred_at=at,
        for_learner=kind not in _WEBHOOK_ONLY,
        link=str(event.credential_url) if isinstance(event, CredentialIssued) else None,
    )


# --- the learner's preferences ---------------------------------------------------------------


@dataclass(frozen=True)
class ChannelPreference:
    enabled: bool = True
    muted: frozenset[Kind] = frozenset()

    def wants(self, kind: Kind) -> bool:
        return self.enabled and kind not in self.muted


@dataclass(frozen=True)
class Preferences:
    """What a learner hears of, per channel; everything by default."""

    email: ChannelPreference = field(default_factory=ChannelPreference)
    in_app: ChannelPreference = field(default_factory=ChannelPreference)


def learner_channels(notice: Notice, preferences: Preferences, now: datetime) -> list[Channel]:
    """The channels on which the learner hears of `notice`."""
    if not notice.for_learner:
        return []
    channels = []
    if preferences.in_app.wants(notice.kind):
        channels.append(Channel.IN_APP)
    if preferences.email.wants(notice.kind) and now - notice.occurred_at <= EMAIL_FRESHNESS:
        channels.append(Channel.EMAIL)
    return channels


def subscribed(event_types: Sequence[str], event_type: str) -> bool:
    """Whether a subscription with this filter receives `event_type`; an empty filter takes all."""
    return not event_types or event_type in event_types


# --- whose events a webhook subscription receives --------------------------------------------


class ScopeKind(enum.StrEnum):
    ALL = "all"
    ISSUER = "issuer"
    PARTNER = "partner"
    LEARNER = "learner"


@dataclass(frozen=True)
class Audience:
    """Whom an event is about: its learner, and the issuer and partners of its course where known."""

    learner_id: UUID
    issuer_id: UUID | None = None
    partner_ids: frozenset[UUID] = frozenset()


@dataclass(frozen=True)
class Course:
    """What notifications knows of a course, from the catalog's events."""

    title: str
    # None for a course kept before migration 005, until the catalog's next event for it.
    issuer_id: UUID | None
    delivery_partner_id: UUID | None


@dataclass(frozen=True)
class Credential:
    """What a credential was for, from its issuance: its revocation names only the credential."""

    achievement_name: str
    credential_url: str
    course_id: UUID | None


def audience(learner_id: UUID, course: Course | None, attested_by: UUID | None = None) -> Audience:
    """Whom an event is about: its learner; its course's issuer and delivering partner, while the
    course is known; the partner that attested a completion, whatever the course."""
    partners = (course.delivery_partner_id if course else None, attested_by)
    return Audience(
        learner_id,
        course.issuer_id if course else None,
        frozenset(partner for partner in partners if partner is not None),
    )


@dataclass(frozen=True)
class Scope:
    """The events a subscription receives: every one (`all`), or those about one issuer's courses,
    one partner's courses (it delivers them, or attested the completion) or one learner."""

    kind: ScopeKind
    id: UUID | None = None

    def __post_init__(self) -> None:
        if (self.kind is ScopeKind.ALL) != (self.id is None):
            raise ValueError("the scope `all` takes no id; every other scope needs one")

    def covers(self, audience: Audience) -> bool:
        match self.kind:
            case ScopeKind.ALL:
                return True
            case ScopeKind.ISSUER:
                return audience.issuer_id == self.id
            case ScopeKind.PARTNER:
                return self.id in audience.partner_ids
            case ScopeKind.LEARNER:
                return audience.learner_id == self.id


# --- delivery attempts -----------------------------------------------------------------------


class DeliveryState(enum.StrEnum):
    PENDING = "pending"
    SENDING = "sending"
    AWAITING_ADDRESS = "awaiting_address"
    DELIVERED = "delivered"
    DEAD = "dead"
    CANCELLED = "cancelled"


class AttemptOutcome(enum.StrEnum):
    DELIVERED = "delivered"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    # The receiver's answer means trying again cannot help (e.g. SMTP 550: no such mailbox).
    REFUSED = "refused"
    INTERRUPTED = "interrupted"


@dataclass(frozen=True)
class AttemptResult:
    outcome: AttemptOutcome
    status_code: int | None = None
    error: str | None = None


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter: attempt n waits uniformly in [0, min(cap, base * 2^(n-1))].

    Full jitter spreads the retries of many deliveries that failed together (a receiver's outage)
    instead of sending them back in synchronised waves.
    """

    max_attempts: int = 8
    base_seconds: float = 5.0
    cap_seconds: float = 3600.0

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        ceiling = min(self.cap_seconds, self.base_seconds * 2 ** min(attempt - 1, 62))
        return float(ceiling * rand())

    def after(
        self, attempt: int, result: AttemptResult, rand: Callable[[], float] = random.random
    ) -> tuple[DeliveryState, float | None]:
        """The state a delivery goes to after attempt number `attempt`, and the delay before the next."""
        if result.outcome is AttemptOutcome.DELIVERED:
            return DeliveryState.DELIVERED, None
        if result.outcome is AttemptOutcome.REFUSED or attempt >= self.max_attempts:
            return DeliveryState.DEAD, None
        return DeliveryState.PENDING, self.delay(attempt, rand)


# --- webhooks --------------------------------------------------------------------------------

SECRET_PREFIX = "whsec_"  # noqa: S105  (the format's marker, not a secret)


def new_secret() -> str:
    """A Standard Webhooks signing secret: `whsec_` and 32 random bytes in base64."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def message_id(delivery_id: UUID) -> str:
    """The `webhook-id`: one per delivery, the same on every retry, so receivers can deduplicate."""
    return f"msg_{delivery_id.hex}"


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header: `v1,` and base64 HMAC-SHA256 over `{id}.{timestamp}.{body}`,
    keyed with the secret's base64-decoded bytes (Standard Webhooks)."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    digest = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return f"v1,{base64.b64encode(digest).decode()}"


def webhook_body(notice: Notice, event: Event) -> str:
    """The JSON a subscriber receives: Standard Webhooks' `type`, `timestamp` and `data` (the event)."""
    return json.dumps(
        {
            "type": notice.event_type,
            "timestamp": notice.occurred_at.isoformat().replace("+00:00", "Z"),
            "data": event.model_dump(mode="json"),
        },
        separators=(",", ":"),
    )


class WebhookUrlRefused(Exception):
    """A subscription URL that must not be called."""


def check_webhook_url(url: str, allowed_hosts: Sequence[str]) -> None:
    """Refuse anything but an http(s) URL to a host matching one of `allowed_hosts`.

    The service calls these URLs from inside the platform's network, so whoever registers one
    could aim it at internal systems (SSRF): only configured host patterns (`*` wildcards, e.g.
    `*.partner.example`) are allowed. The check runs again before every attempt, so narrowing the
    setting stops deliveries to hosts no longer allowed. The addresses the host resolves to are
    checked apart (`address_refusal`), on the connection itself (`egress`).
    """
    try:
        parts = urlsplit(url)
        hostname = parts.hostname
        parts.port  # noqa: B018  (raises ValueError for a port that is not a number in range)
    except ValueError as exc:
        raise WebhookUrlRefused(f"not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise WebhookUrlRefused("only http and https URLs are allowed")
    if not hostname:
        raise WebhookUrlRefused("the URL has no host")
    if parts.username is not None or parts.password is not None:
        # Credentials in a URL end up in logs and listings; receivers check the signature instead.
        raise WebhookUrlRefused("the URL must not carry credentials")
    if not any(fnmatch.fnmatchcase(hostname.lower(), pattern.lower()) for pattern in allowed_hosts):
        raise WebhookUrlRefused(f"the host {hostname} is not allowed (see WEBHOOK_ALLOWED_HOSTS)")


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(
    ipaddress.ip_address(address)
    for address in (
        "169.254.169.254",  # AWS, Google Cloud, Azure, OpenStack, DigitalOcean, Oracle
        "169.254.170.2",  # AWS ECS task metadata
        "169.254.170.23",  # AWS EKS pod identity
        "100.100.100.200",  # Alibaba Cloud
        "fd00:ec2::254",  # AWS over IPv6
        "fd00:ec2::23",  # AWS EKS pod identity over IPv6
    )
)
"""Cloud instance metadata services (credentials for the asking): refused even where a private
network is allowed."""

_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one reaches: IPv4-mapped, 6to4 or NAT64 (RFC 6052)."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def address_refusal(address: IPAddress, allowed_private: Sequence[IPNetwork] = ()) -> str | None:
    """Why a webhook must not connect to `address`, or None when it may.

    Only public (globally routable) unicast addresses are called. `allowed_private` lets an
    operator open given loopback, private, link-local or reserved networks (development and tests
    deliver to receivers on 127.0.0.1); cloud metadata, multicast and unspecified addresses stay
    refused whatever it says.
    """
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            refused = address_refusal(embedded, allowed_private)
            return f"{address} reaches {refused}" if refused else None
    if address in METADATA_ADDRESSES:
        return f"{address}, a cloud metadata address"
    if address.is_multicast or address.is_unspecified:
        return f"{address}, {'a multicast' if address.is_multicast else 'an unspecified'} address"
    if address.is_global and not (address.is_private or address.is_reserved):
        return None
    if any(address in network for network in allowed_private):
        return None
    kind = next(
        name
        for name, flag in (
            ("a loopback", address.is_loopback),
            ("a link-local", address.is_link_local),
            ("a reserved", address.is_reserved),
            ("a private", address.is_private),
            ("a non-public", True),
        )
        if flag
    )
    return f"{address}, {kind} address (see WEBHOOK_ALLOWED_PRIVATE_NETWORKS)"


# --- presentation ----------------------------------------------------------------------------

# ISO 4217 minor-unit exponents that are not 2.
_EXPONENTS = {
    **dict.fromkeys(("BIF", "CLP", "DJF", "GNF", "ISK", "JPY", "KMF", "KRW", "PYG", "RWF"), 0),
    **dict.fromkeys(("UGX", "VND", "VUV", "XAF", "XOF", "XPF"), 0),
    **dict.fromkeys(("BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND"), 3),
}


def format_money(money: Money) -> str:
    """`4900 EUR` (minor units) -> `49.00 EUR`; exact, never through a float."""
    exponent = _EXPONENTS.get(money.currency, 2)
    return f"{Decimal(money.amount_minor).scaleb(-exponent):,.{exponent}f} {money.currency}"
