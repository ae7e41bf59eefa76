"""Notifications' rules: who hears of what, on which channel; backoff; the webhook signature; SSRF."""

import base64
import hashlib
import hmac
import ipaddress
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

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
    example_data,
)
from notifications.domain import (
    EMAIL_FRESHNESS,
    NOTIFIED_EVENTS,
    WEBHOOK_EVENT_TYPES,
    AttemptOutcome,
    AttemptResult,
    Audience,
    Channel,
    ChannelPreference,
    DeliveryState,
    Kind,
    Preferences,
    RetryPolicy,
    Scope,
    ScopeKind,
    WebhookUrlRefused,
    address_refusal,
    check_webhook_url,
    format_money,
    kind_of,
    learner_channels,
    message_id,
    new_secret,
    notice_for,
    sign,
    subscribed,
    webhook_body,
)

LEARNER = uuid.UUID("1d6f8b3a-4c2e-4a97-b5d1-8e0c3f7a2b59")


def example(event_type: type[Event], **changes: Any) -> Event:
    return event_type.model_validate({**example_data(event_type), **changes})


# --- what each event causes ------------------------------------------------------------------

EXPECTED: list[tuple[type[Event], Kind, str, bool]] = [
    (EnrollmentCreated, Kind.ENROLLMENT_CREATED, "enrollment_id", True),
    (EnrollmentActivated, Kind.ENROLLMENT_ACTIVATED, "enrollment_id", True),
    (EnrollmentCancelled, Kind.ENROLLMENT_CANCELLED, "enrollment_id", True),
    (PaymentSettled, Kind.PAYMENT_SETTLED, "payment_id", True),
    (PaymentFailed, Kind.PAYMENT_FAILED, "payment_id", True),
    (RefundIssued, Kind.REFUND_ISSUED, "refund_id", True),
    (CourseCompleted, Kind.COURSE_COMPLETED, "enrollment_id", False),
    (CredentialIssued, Kind.CREDENTIAL_ISSUED, "credential_id", True),
]


@pytest.mark.parametrize(("event_type", "kind", "occurrence", "for_learner"), EXPECTED)
def test_each_event_names_its_kind_learner_and_occurrence(
    event_type: type[Event], kind: Kind, occurrence: str, for_learner: bool
) -> None:
    event = example(event_type)
    notice = notice_for(event)
    assert notice.kind is kind
    assert notice.learner_id == LEARNER
    assert notice.event_type == event_type.TYPE
    assert notice.event_key == f"{event_type.TYPE}:{getattr(event, occurrence)}"
    assert notice.for_learner is for_learner


def test_a_reinstatement_is_news_of_its_own_each_time() -> None:
    first = notice_for(example(CredentialReinstated))
    later = notice_for(example(CredentialReinstated, reinstated_at=datetime(2026, 1, 2, tzinfo=UTC)))
    assert first.kind is Kind.CREDENTIAL_REINSTATED
    assert first.for_learner
    assert first.event_key != later.event_key


def test_each_declined_charge_of_a_payment_is_news_of_its_own() -> None:
    first = notice_for(example(PaymentDeclined, attempt=1))
    second = notice_for(example(PaymentDeclined, attempt=2))
    failed = notice_for(example(PaymentFailed))
    assert first.kind is Kind.PAYMENT_DECLINED
    assert first.for_learner
    assert len({first.event_key, second.event_key, failed.event_key}) == 3


def test_every_notified_event_is_covered_here() -> None:
    covered: set[type[Event]] = {event_type for event_type, *_ in EXPECTED} | {
        CredentialRevoked,
        CredentialReinstated,
        PaymentDeclined,
    }
    assert covered == set(NOTIFIED_EVENTS)
    assert {event_type.TYPE for event_type in covered} == WEBHOOK_EVENT_TYPES


def test_the_occurrence_time_comes_from_the_event() -> None:
    assert notice_for(example(PaymentSettled)).occurred_at == datetime(2025, 3, 20, 10, 17, 12, tzinfo=UTC)
    assert notice_for(example(CredentialIssued)).occurred_at == datetime(2025, 5, 2, 16, 46, 3, tzinfo=UTC)


def test_a_credential_notice_links_to_the_credential_page() -> None:
    event = example(CredentialIssued)
    assert isinstance(event, CredentialIssued)
    assert notice_for(event).link == str(event.credential_url)
    assert notice_for(example(PaymentSettled)).link is None


def test_suspension_and_revocation_of_one_credential_are_separate_news() -> None:
    suspended = notice_for(example(CredentialRevoked, status_purpose="suspension"))
    revoked = notice_for(example(CredentialRevoked, revoked_at="2025-07-01T00:00:00Z"))
    again = notice_for(example(CredentialRevoked, revoked_at="2025-07-01T00:00:00Z"))
    assert suspended.kind is revoked.kind is Kind.CREDENTIAL_REVOKED
    assert suspended.event_key != revoked.event_key
    assert revoked.event_key == again.event_key


def test_the_same_occurrence_gives_the_same_key_whatever_else_differs() -> None:
    first = notice_for(example(EnrollmentActivated))
    second = notice_for(example(EnrollmentActivated, activated_at="2025-03-21T00:00:00Z"))
    assert first.event_key == second.event_key


def test_an_event_notifications_does_not_handle_is_refused() -> None:
    from microcred_events import CoursePublished

    with pytest.raises(TypeError):
        notice_for(example(CoursePublished))


def test_kind_of_reads_subject_and_action_from_the_type() -> None:
    assert kind_of("org.microcred.billing.refund.issued.v1") is Kind.REFUND_ISSUED
    assert kind_of("org.microcred.issuance.credential.issued.v2") is Kind.CREDENTIAL_ISSUED


# --- preferences and channels ----------------------------------------------------------------


def channels(preferences: Preferences, event_type: type[Event] = CredentialIssued) -> list[Channel]:
    """The learner's channels for an event that has just happened."""
    notice = notice_for(example(event_type))
    return learner_channels(notice, preferences, notice.occurred_at + timedelta(seconds=1))


def test_by_default_the_learner_hears_in_app_and_by_email() -> None:
    assert channels(Preferences()) == [Channel.IN_APP, Channel.EMAIL]


def test_a_learner_can_turn_a_channel_off() -> None:
    assert channels(Preferences(email=ChannelPreference(enabled=False))) == [Channel.IN_APP]
    assert channels(Preferences(in_app=ChannelPreference(enabled=False))) == [Channel.EMAIL]


def test_a_learner_can_mute_one_kind_on_one_channel() -> None:
    muted = Preferences(email=ChannelPreference(muted=frozenset({Kind.PAYMENT_SETTLED})))
    assert channels(muted, PaymentSettled) == [Channel.IN_APP]
    assert channels(muted, PaymentFailed) == [Channel.IN_APP, Channel.EMAIL]


def test_webhook_only_events_reach_no_learner_channel() -> None:
    assert channels(Preferences(), CourseCompleted) == []


def test_old_events_reach_the_inbox_but_are_not_emailed() -> None:
    notice = notice_for(example(CredentialIssued))
    just_fresh = notice.occurred_at + EMAIL_FRESHNESS
    assert learner_channels(notice, Preferences(), just_fresh) == [Channel.IN_APP, Channel.EMAIL]
    stale = just_fresh + timedelta(seconds=1)
    assert learner_channels(notice, Preferences(), stale) == [Channel.IN_APP]


def test_an_empty_subscription_filter_takes_every_type() -> None:
    assert subscribed([], CredentialIssued.TYPE)
    assert subscribed([CredentialIssued.TYPE], CredentialIssued.TYPE)
    assert not subscribed([CredentialRevoked.TYPE], CredentialIssued.TYPE)


# --- retries ---------------------------------------------------------------------------------

POLICY = RetryPolicy(max_attempts=8, base_seconds=2.0, cap_seconds=60.0)
FAILED = AttemptResult(AttemptOutcome.FAILED, status_code=503, error="HTTP 503")


@pytest.mark.parametrize(
    ("attempt", "ceiling"), [(1, 2.0), (2, 4.0), (3, 8.0), (5, 32.0), (6, 60.0), (7, 60.0), (500, 60.0)]
)
def test_backoff_is_full_jitter_below_a_doubling_capped_ceiling(attempt: int, ceiling: float) -> None:
    assert POLICY.delay(attempt, lambda: 0.0) == 0.0
    assert POLICY.delay(attempt, lambda: 0.5) == pytest.approx(ceiling / 2)
    assert POLICY.delay(attempt, lambda: 0.999999) == pytest.approx(ceiling, rel=1e-5)


def test_real_jitter_stays_within_bounds_and_spreads() -> None:
    delays = [POLICY.delay(4) for _ in range(2000)]
    assert all(0.0 <= delay <= 16.0 for delay in delays)
    # Spread over the whole range rather than bunched: both halves get a fair share.
    assert 0.35 < sum(delay < 8.0 for delay in delays) / len(delays) < 0.65


def test_a_failed_attempt_is_retried_until_the_last_then_dead() -> None:
    for attempt in range(1, 8):
        state, delay = POLICY.after(attempt, FAILED, lambda: 1.0)
        assert state is DeliveryState.PENDING
        assert delay == pytest.approx(min(60.0, 2.0 * 2 ** (attempt - 1)))
    assert POLICY.after(8, FAILED) == (DeliveryState.DEAD, None)


def test_success_is_final_and_a_refusal_is_dead_at_once() -> None:
    assert POLICY.after(3, AttemptResult(AttemptOutcome.DELIVERED, 200)) == (DeliveryState.DELIVERED, None)
    refused = AttemptResult(AttemptOutcome.REFUSED, 550, "no such mailbox")
    assert POLICY.after(1, refused) == (DeliveryState.DEAD, None)


def test_timeouts_are_retried() -> None:
    state, _ = POLICY.after(1, AttemptResult(AttemptOutcome.TIMED_OUT, error="no answer"))
    assert state is DeliveryState.PENDING


# --- the Standard Webhooks signature ---------------------------------------------------------


def test_the_signature_matches_the_standard_webhooks_test_vector() -> None:
    signature = sign(
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "msg_p5jXN8AQM9LWM0D4loKWxJek",
        1614265330,
        b'{"test": 2432232314}',
    )
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_the_signature_covers_id_timestamp_and_body() -> None:
    secret = new_secret()
    body = b'{"type":"x"}'
    signature = sign(secret, "msg_1", 1700000000, body)
    assert signature != sign(secret, "msg_2", 1700000000, body)
    assert signature != sign(secret, "msg_1", 1700000001, body)
    assert signature != sign(secret, "msg_1", 1700000000, b'{"type":"y"}')
    assert signature != sign(new_secret(), "msg_1", 1700000000, body)


def test_a_new_secret_is_whsec_and_32_random_bytes() -> None:
    secret = new_secret()
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret.removeprefix("whsec_"))) == 32
    assert secret != new_secret()


def test_the_webhook_id_is_stable_per_delivery() -> None:
    delivery = uuid.uuid4()
    assert message_id(delivery) == message_id(delivery) == f"msg_{delivery.hex}"


def test_the_webhook_body_is_type_timestamp_and_the_event() -> None:
    import json

    event = example(CredentialIssued)
    body = json.loads(webhook_body(notice_for(event), event))
    assert body == {
        "type": CredentialIssued.TYPE,
        "timestamp": "2025-05-02T16:46:03Z",
        "data": event.model_dump(mode="json"),
    }


def test_the_body_signed_is_the_body_sent() -> None:
    """A receiver recomputes the HMAC over the raw bytes it got; do it here by hand."""
    event = example(PaymentSettled)
    body = webhook_body(notice_for(event), event).encode()
    secret = new_secret()
    key = base64.b64decode(secret.removeprefix("whsec_"))
    expected = base64.b64encode(hmac.new(key, b"msg_a.1700000000." + body, hashlib.sha256).digest())
    assert sign(secret, "msg_a", 1700000000, body) == f"v1,{expected.decode()}"


# --- which URLs may be called ----------------------------------------------------------------

LOCAL = ["localhost", "127.0.0.1", "::1"]


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/hooks",
        "https://localhost/hooks",
        "http://[::1]:9000/",
        "https://LOCALHOST/x",
    ],
)
def test_loopback_urls_are_allowed_by_the_local_default(url: str) -> None:
    check_webhook_url(url, LOCAL)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://127.0.0.1/hooks", "only http and https"),
        ("file:///etc/passwd", "only http and https"),
        ("gopher://127.0.0.1:6379/_FLUSHALL", "only http and https"),
        ("127.0.0.1:8080/hooks", "only http and https"),
        ("http:///path-only", "no host"),
        ("http://user:pw@127.0.0.1/hooks", "credentials"),
        ("http://169.254.169.254/latest/meta-data", "not allowed"),
        ("http://10.0.0.5/internal", "not allowed"),
        ("http://127.0.0.1.nip.io/", "not allowed"),
        ("http://127.0.0.1:99999/", "not a valid URL"),
    ],
)
def test_other_urls_are_refused_with_a_reason(url: str, reason: str) -> None:
    with pytest.raises(WebhookUrlRefused, match=reason):
        check_webhook_url(url, LOCAL)


def test_host_patterns_allow_subdomains_of_a_partner() -> None:
    patterns = ["*.partner.example", "hooks.employer.example"]
    check_webhook_url("https://lms.partner.example/hook", patterns)
    check_webhook_url("https://hooks.employer.example/hook", patterns)
    for refused in ("https://partner.example/hook", "https://evil.example/?x=.partner.example"):
        with pytest.raises(WebhookUrlRefused):
            check_webhook_url(refused, patterns)


# --- presentation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("amount", "currency", "shown"),
    [
        (4900, "EUR", "49.00 EUR"),
        (5, "USD", "0.05 USD"),
        (123456789, "GBP", "1,234,567.89 GBP"),
        (5000, "JPY", "5,000 JPY"),
        (1500, "KWD", "1.500 KWD"),
        (0, "EUR", "0.00 EUR"),
        (2**63 - 1, "EUR", "92,233,720,368,547,758.07 EUR"),
    ],
)
def test_money_is_shown_in_major_units_exactly(amount: int, currency: str, shown: str) -> None:
    assert format_money(Money(amount_minor=amount, currency=currency)) == shown


# --- scopes ----------------------------------------------------------------------------------

_LEARNER, _ISSUER, _PARTNER = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
_KNOWN = Audience(_LEARNER, _ISSUER, frozenset({_PARTNER}))


@pytest.mark.parametrize(
    ("scope", "audience", "covered"),
    [
        (Scope(ScopeKind.ALL), Audience(_LEARNER), True),
        (Scope(ScopeKind.ISSUER, _ISSUER), _KNOWN, True),
        (Scope(ScopeKind.ISSUER, uuid.uuid4()), _KNOWN, False),
        (Scope(ScopeKind.PARTNER, _PARTNER), _KNOWN, True),
        (Scope(ScopeKind.PARTNER, uuid.uuid4()), _KNOWN, False),
        (Scope(ScopeKind.LEARNER, _LEARNER), _KNOWN, True),
        (Scope(ScopeKind.LEARNER, uuid.uuid4()), _KNOWN, False),
        # A course not known yet: no issuer or partner hears of it, its learner still does.
        (Scope(ScopeKind.ISSUER, _ISSUER), Audience(_LEARNER), False),
        (Scope(ScopeKind.PARTNER, _PARTNER), Audience(_LEARNER), False),
        (Scope(ScopeKind.LEARNER, _LEARNER), Audience(_LEARNER), True),
    ],
)
def test_a_scope_covers_only_its_own_issuer_partner_or_learner(
    scope: Scope, audience: Audience, covered: bool
) -> None:
    assert scope.covers(audience) is covered


def test_a_scope_has_an_id_exactly_when_it_is_not_all() -> None:
    with pytest.raises(ValueError, match="all"):
        Scope(ScopeKind.ALL, uuid.uuid4())
    with pytest.raises(ValueError, match="all"):
        Scope(ScopeKind.PARTNER)


# --- the addresses webhooks may reach --------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "refused_as"),
    [
        ("127.0.0.1", "loopback"),
        ("10.0.0.7", "private"),
        ("172.16.5.4", "private"),
        ("192.168.1.1", "private"),
        ("100.64.0.1", "non-public"),
        ("169.254.10.10", "link-local"),
        ("169.254.169.254", "metadata"),
        ("100.100.100.200", "metadata"),
        ("224.0.0.251", "multicast"),
        ("0.0.0.0", "unspecified"),  # noqa: S104  (an address refused, not bound)
        ("240.0.0.1", "reserved"),
        ("192.0.2.10", "private"),
        ("::1", "loopback"),
        ("::", "unspecified"),
        ("fe80::1", "link-local"),
        ("fd12:3456::1", "private"),
        ("fd00:ec2::254", "metadata"),
        ("ff02::1", "multicast"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:169.254.169.254", "metadata"),
        ("2002:a00:1::", "private"),  # 6to4 of 10.0.0.1
        ("64:ff9b::7f00:1", "loopback"),  # NAT64 of 127.0.0.1
        ("93.184.215.14", None),
        ("2606:4700:4700::1111", None),
        ("::ffff:93.184.215.14", None),
    ],
)
def test_only_public_unicast_addresses_are_reached(address: str, refused_as: str | None) -> None:
    refusal = address_refusal(ipaddress.ip_address(address))
    if refused_as is None:
        assert refusal is None
    else:
        assert refusal is not None
        assert refused_as in refusal


def test_an_allowed_private_network_opens_it_but_never_metadata() -> None:
    loopback = [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("169.254.0.0/16")]
    assert address_refusal(ipaddress.ip_address("127.0.0.1"), loopback) is None
    assert address_refusal(ipaddress.ip_address("::ffff:127.0.0.1"), loopback) is None
    assert address_refusal(ipaddress.ip_address("10.0.0.1"), loopback) is not None
    assert "metadata" in (address_refusal(ipaddress.ip_address("169.254.169.254"), loopback) or "")
