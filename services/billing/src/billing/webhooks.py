"""Signed webhooks: how the payment provider proves a notification is its own, fresh and intact.

The scheme is Stripe's: the provider sends the header

    Provider-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256>[,v1=<hex>...]

where each `v1` is HMAC-SHA256, keyed with the shared webhook secret, over `"{t}.{raw body}"`.
Signing the timestamp together with the body is what lets the receiver refuse a captured request
replayed later: the timestamp cannot be changed without the secret, and one outside the tolerance
is refused. Several `v1` entries are allowed so a provider can sign with the old and the new secret
while the secret is rotated; keys other than `t` and `v1` are skipped, for schemes added later.
"""

import hashlib
import hmac
import re
from datetime import datetime, timedelta
from typing import Annotated

from pydantic import AfterValidator, SecretStr

SIGNATURE_HEADER = "Provider-Signature"
TOLERANCE = timedelta(minutes=5)
MIN_SECRET_LENGTH = 32

_TIMESTAMP = re.compile(r"\d{1,12}")
# Values people leave in an example configuration; a provider's real secret never looks like this.
_PLACEHOLDERS = ("changethis", "changeme", "change-me", "change_me", "placeholder")


class InvalidWebhook(Exception):
    """A webhook that must not be acted on; `kind` names the problem type, `detail` says why."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


def signature(secret: str, body: bytes, timestamp: int) -> str:
    """The header value a provider holding `secret` sends with `body` at `timestamp`."""
    return f"t={timestamp},v1={_digest(secret, timestamp, body).decode()}"


def verify(
    secret: str, body: bytes, header: str | None, *, now: datetime, tolerance: timedelta = TOLERANCE
) -> None:
    """Accept `body` only if `header` signs exactly these bytes with `secret`, within `tolerance` of `now`.

    Raises `InvalidWebhook`; `body` must be the raw bytes received, before any JSON parsing.
    """
    timestamp, candidates = _parse(header)
    expected = _digest(secret, timestamp, body)
    # compare_digest on bytes: constant time, and no TypeError on non-ASCII header text.
    if not any(hmac.compare_digest(expected, candidate.encode()) for candidate in candidates):
        raise InvalidWebhook("webhook-signature-invalid", "the signature does not match the body")
    skew = now.timestamp() - timestamp
    if abs(skew) > tolerance.total_seconds():
        when = "old" if skew > 0 else "in the future"
        raise InvalidWebhook(
            "webhook-timestamp-out-of-tolerance",
            f"the signature timestamp is {abs(skew):.0f}s {when}; at most "
            f"{tolerance.total_seconds():.0f}s either way is accepted",
        )


def _digest(secret: str, timestamp: int, body: bytes) -> bytes:
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest().encode()


def _parse(header: str | None) -> tuple[int, list[str]]:
    if not header:
        raise InvalidWebhook("webhook-signature-malformed", f"the {SIGNATURE_HEADER} header is missing")
    timestamps: list[str] = []
    candidates: list[str] = []
    for item in header.split(","):
        key, _, value = item.strip().partition("=")
        if key == "t":
            timestamps.append(value)
        elif key == "v1" and value:
            candidates.append(value)
    if len(timestamps) != 1 or not _TIMESTAMP.fullmatch(timestamps[0]) or not candidates:
        raise InvalidWebhook(
            "webhook-signature-malformed",
            f"the {SIGNATURE_HEADER} header must be t=<unix seconds>,v1=<hex HMAC-SHA256>",
        )
    return int(timestamps[0]), candidates


def _strong(secret: SecretStr) -> SecretStr:
    value = secret.get_secret_value()
    if any(placeholder in value.lower() for placeholder in _PLACEHOLDERS):
        raise ValueError("is a placeholder; set the secret shared with the payment provider")
    if len(value) < MIN_SECRET_LENGTH:
        raise ValueError(f"is too short; use at least {MIN_SECRET_LENGTH} random characters")
    return secret


WebhookSecret = Annotated[SecretStr, AfterValidator(_strong)]
"""The secret shared with the payment provider, refused at start-up when guessable."""
