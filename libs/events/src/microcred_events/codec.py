"""The CloudEvents 1.0 Kafka protocol binding, binary content mode.

The CloudEvents attributes travel as `ce_*` headers, the event's JSON is the value, and the key
is the aggregate id. W3C trace context travels in the plain `traceparent` and `tracestate`
headers, where OpenTelemetry's propagators read and write it.

We implement the binding rather than use the `cloudevents` SDK: it is a few lines, and the SDK
would still need wrapping to turn its assorted exceptions into `InvalidEvent`, to read aiokafka's
header list, and to validate the body with the pydantic model directly from bytes.
"""

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal
from uuid import uuid4

from pydantic import ValidationError

from microcred_events.base import Event
from microcred_events.registry import REGISTRY

SPECVERSION = "1.0"
CONTENT_TYPE = "application/json"

# Names of the headers decode reads; any other header is passed over without being decoded.
_CE_HEADERS = ("ce_specversion", "ce_id", "ce_type", "ce_source", "ce_time", "ce_subject")
_CONTENT_TYPE_HEADER = "content-type"
_TRACE_HEADERS = ("traceparent", "tracestate")
_READ = frozenset((*_CE_HEADERS, _CONTENT_TYPE_HEADER, *_TRACE_HEADERS))

_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}(-.*)?")
_SCHEMA_ERRORS_SHOWN = 3

InvalidReason = Literal[
    "missing_header",
    "invalid_header",
    "unsupported_specversion",
    "unsupported_content_type",
    "unknown_type",
    "malformed_body",
    "schema_violation",
]


class InvalidEvent(Exception):
    """A Kafka message that is not a valid event of this contract; it belongs in a dead-letter topic.

    `reason` is a stable code for metrics and dead-letter headers; `detail` says, for people,
    which header or field is wrong.
    """

    def __init__(self, reason: InvalidReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason: InvalidReason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class KafkaRecord:
    """One Kafka message ready for a producer: what `encode` returns and the outbox stores."""

    topic: str
    key: bytes | None  # None: no key (a dead letter of a keyless record); events have their aggregate's
    value: bytes
    headers: list[tuple[str, bytes]]


@dataclass(frozen=True, slots=True)
class Envelope:
    """A decoded event with its CloudEvents attributes.

    Consumers deduplicate on (`source`, `id`), which is unique per event and stable across
    redeliveries; `time` is when the occurrence happened (UTC); `subject` is the aggregate id.
    """

    id: str
    type: str
    source: str
    time: datetime
    subject: str
    traceparent: str | None
    tracestate: str | None
    event: Event


def encode(
    event: Event,
    *,
    source: str,
    event_id: str | None = None,
    time: datetime | None = None,
    traceparent: str | None = None,
    tracestate: str | None = None,
) -> KafkaRecord:
    """Encode `event` as a Kafka record in CloudEvents binary mode, on its aggregate's topic.

    `event_id` defaults to a new UUID; pass the stored one when publishing again, so consumers
    see a redelivery rather than a new event. `time` defaults to now. Raises `ValueError` for an
    empty source or id, a naive time, or a traceparent that is not W3C trace context.
    """
    event_id = str(uuid4()) if event_id is None else event_id
    time = datetime.now(UTC) if time is None else time
    if not source or not event_id:
        raise ValueError("source and event_id must not be empty")
    if time.utcoffset() is None:
        raise ValueError("time must be timezone-aware")
    if traceparent is not None and not _valid_traceparent(traceparent):
        raise ValueError(f"not a W3C traceparent: {traceparent!r}")
    if tracestate is not None and traceparent is None:
        raise ValueError("tracestate is meaningless without traceparent")
    key = event.aggregate_id()
    headers = [
        ("ce_specversion", SPECVERSION),
        ("ce_id", event_id),
        ("ce_type", event.TYPE),
        ("ce_source", source),
        ("ce_time", time.astimezone(UTC).isoformat().replace("+00:00", "Z")),
        ("ce_subject", key),
        (_CONTENT_TYPE_HEADER, CONTENT_TYPE),
    ]
    if traceparent is not None:
        headers.append(("traceparent", traceparent))
    if tracestate is not None:
        headers.append(("tracestate", tracestate))
    return KafkaRecord(
        topic=event.TOPIC,
        key=key.encode(),
        value=event.model_dump_json().encode(),
        headers=[(name, value.encode()) for name, value in headers],
    )


def decode(headers: Sequence[tuple[str, bytes]] | Mapping[str, bytes | str], value: bytes | None) -> Envelope:
    """Decode a Kafka record in CloudEvents binary mode into a validated event.

    `headers` as aiokafka gives them (a sequence of name/value pairs) or as a mapping; header
    names are matched case-insensitively. Fields that this version of the contract does not know
    are ignored, so events from a newer minor version decode. Raises `InvalidEvent`, and nothing
    else, for any message that is not a valid event.
    """
    found = _read_headers(headers)
    specversion = _required(found, "ce_specversion")
    if specversion != SPECVERSION:
        raise InvalidEvent(
            "unsupported_specversion", f"ce_specversion is {specversion!r}, only {SPECVERSION} is"
        )
    event_id, event_type, source, time_text, subject = (_required(found, name) for name in _CE_HEADERS[1:])
    content_type = _required(found, _CONTENT_TYPE_HEADER)
    media_type, *parameters = (part.strip().lower() for part in content_type.split(";"))
    if media_type != CONTENT_TYPE or any(p.replace(" ", "") not in ("charset=utf-8", "") for p in parameters):
        raise InvalidEvent(
            "unsupported_content_type",
            f"content-type is {content_type!r}; binary mode with {CONTENT_TYPE} only",
        )
    event_class = REGISTRY.get(event_type)
    if event_class is None:
        raise InvalidEvent("unknown_type", f"ce_type {event_type!r} is not an event type of this contract")
    traceparent, tracestate = _trace_context(found)
    return Envelope(
        id=event_id,
        type=event_type,
        source=source,
        time=_parse_time(time_text),
        subject=subject,
        traceparent=traceparent,
        tracestate=tracestate,
        event=_parse_body(event_class, value),
    )


def _read_headers(
    headers: Sequence[tuple[str, bytes]] | Mapping[str, bytes | str],
) -> dict[str, list[str | None]]:
    """The values of the headers decode reads, by lower-cased name; None where not UTF-8 text."""
    found: dict[str, list[str | None]] = {}
    try:
        pairs: Iterable[tuple[object, object]] = headers.items() if isinstance(headers, Mapping) else headers
        for name, raw in pairs:
            if isinstance(name, str) and name.lower() in _READ:
                found.setdefault(name.lower(), []).append(_text(raw))
    except (TypeError, ValueError) as exc:
        raise InvalidEvent("invalid_header", "headers are not (name, value) pairs") from exc
    return found


def _text(raw: object) -> str | None:
    if isinstance(raw, str):
        return raw
    if isinstance(raw, bytes | bytearray):
        try:
            return raw.decode()
        except UnicodeDecodeError:
            return None
    return None


def _required(found: dict[str, list[str | None]], name: str) -> str:
    values = found.get(name)
    if not values:
        raise InvalidEvent("missing_header", f"header {name} is missing")
    if len(set(values)) > 1:
        raise InvalidEvent(
            "invalid_header", f"header {name} appears {len(values)} times with different values"
        )
    text = values[0]
    if text is None:
        raise InvalidEvent("invalid_header", f"header {name} is not UTF-8 text")
    if not text:
        raise InvalidEvent("invalid_header", f"header {name} is empty")
    return text


def _parse_time(text: str) -> datetime:
    try:
        time = datetime.fromisoformat(text)
        if time.utcoffset() is None:
            raise ValueError("no UTC offset")
        return time.astimezone(UTC)
    except (ValueError, OverflowError) as exc:
        raise InvalidEvent(
            "invalid_header", f"ce_time {text[:64]!r} is not an RFC 3339 timestamp: {exc}"
        ) from exc


def _trace_context(found: dict[str, list[str | None]]) -> tuple[str | None, str | None]:
    # Tracing is best effort: W3C says to drop a trace context that cannot be parsed, not the event.
    traceparents = found.get("traceparent", [])
    if len(traceparents) != 1 or traceparents[0] is None or not _valid_traceparent(traceparents[0]):
        return None, None
    tracestates = found.get("tracestate", [])
    tracestate = ",".join(state for state in tracestates if state) or None
    return traceparents[0], tracestate


def _valid_traceparent(text: str) -> bool:
    match = _TRACEPARENT.fullmatch(text)
    if match is None:
        return False
    version, trace_id, parent_id, rest = match.groups()
    return (
        version != "ff"
        and not (version == "00" and rest is not None)
        and trace_id != "0" * 32
        and parent_id != "0" * 16
    )


def _parse_body(event_class: type[Event], value: bytes | None) -> Event:
    if not value:
        raise InvalidEvent("malformed_body", "the body is empty")
    try:
        return event_class.model_validate_json(value, extra="ignore")
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False, include_context=False)
        if any(error["type"] in ("json_invalid", "json_type") for error in errors):
            raise InvalidEvent("malformed_body", f"the body is not JSON: {errors[0]['msg']}") from exc
        if any(error["loc"] == () and error["type"] == "model_type" for error in errors):
            raise InvalidEvent("malformed_body", "the body is not a JSON object") from exc
        shown = "; ".join(
            f"{'.'.join(map(str, error['loc']))}: {error['msg']}" for error in errors[:_SCHEMA_ERRORS_SHOWN]
        )
        more = len(errors) - _SCHEMA_ERRORS_SHOWN
        raise InvalidEvent(
            "schema_violation",
            f"{event_class.__name__}: {shown}" + (f" (and {more} more)" if more > 0 else ""),
        ) from exc
