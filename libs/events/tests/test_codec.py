import contextlib
import json
import random
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from microcred_events import (
    REGISTRY,
    CoursePublished,
    Envelope,
    Event,
    InvalidEvent,
    KafkaRecord,
    PaymentSettled,
    decode,
    encode,
    example_data,
)

SOURCE = "urn:microcred:catalog"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TIME = datetime(2025, 3, 1, 9, 30, 5, 123456, tzinfo=UTC)
Headers = list[tuple[str, bytes]]


def example(cls: type[Event], **changes: Any) -> Event:
    return cls.model_validate({**example_data(cls), **changes})


def record(**changes: Any) -> KafkaRecord:
    arguments: dict[str, Any] = {"source": SOURCE, "event_id": "evt-1", "time": TIME, **changes}
    return encode(example(CoursePublished), **arguments)


def set_header(headers: Headers, name: str, value: bytes | None) -> Headers:
    """`headers` with `name` replaced by `value`, or removed when `value` is None."""
    kept = [(n, v) for n, v in headers if n != name]
    return kept if value is None else [*kept, (name, value)]


@pytest.mark.parametrize("cls", list(REGISTRY.values()), ids=lambda cls: cls.__name__)
def test_every_event_type_round_trips(cls: type[Event]) -> None:
    event = example(cls)

    encoded = encode(event, source=SOURCE, event_id="evt-1", time=TIME, traceparent=TRACEPARENT)
    envelope = decode(encoded.headers, encoded.value)

    assert envelope == Envelope(
        id="evt-1",
        type=cls.TYPE,
        source=SOURCE,
        time=TIME,
        subject=event.aggregate_id(),
        traceparent=TRACEPARENT,
        tracestate=None,
        event=event,
    )
    assert encoded.topic == cls.TOPIC
    assert encoded.key == event.aggregate_id().encode()


def test_encode_writes_the_binary_mode_headers() -> None:
    encoded = record(traceparent=TRACEPARENT, tracestate="vendor=abc")

    assert encoded.topic == "catalog.course.v1"
    assert encoded.key == b"3f1c2a9e-5b7d-4c8e-9a21-6d0f4b8e7c15"
    assert encoded.headers == [
        ("ce_specversion", b"1.0"),
        ("ce_id", b"evt-1"),
        ("ce_type", b"org.microcred.catalog.course.published.v1"),
        ("ce_source", b"urn:microcred:catalog"),
        ("ce_time", b"2025-03-01T09:30:05.123456Z"),
        ("ce_subject", b"3f1c2a9e-5b7d-4c8e-9a21-6d0f4b8e7c15"),
        ("content-type", b"application/json"),
        ("traceparent", TRACEPARENT.encode()),
        ("tracestate", b"vendor=abc"),
    ]


def test_encode_writes_compact_json_with_money_in_minor_units() -> None:
    value = record().value
    body = json.loads(value)

    assert value == json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    assert body["course"]["price"] == {"amount_minor": 4900, "currency": "EUR"}


def test_encode_defaults_to_a_fresh_uuid_and_now() -> None:
    before = datetime.now(UTC)
    first = dict(encode(example(CoursePublished), source=SOURCE).headers)
    second = dict(encode(example(CoursePublished), source=SOURCE).headers)

    assert uuid.UUID(first["ce_id"].decode()).version == 4
    assert first["ce_id"] != second["ce_id"]
    assert datetime.fromisoformat(first["ce_time"].decode()) >= before
    assert "traceparent" not in first


def test_encode_converts_time_to_utc() -> None:
    encoded = record(time=datetime(2025, 3, 1, 11, 30, tzinfo=timezone(timedelta(hours=2))))

    assert dict(encoded.headers)["ce_time"] == b"2025-03-01T09:30:00Z"


@pytest.mark.parametrize(
    "changes",
    [
        {"source": ""},
        {"event_id": ""},
        {"time": datetime(2025, 3, 1, 9, 30)},
        {"traceparent": "not-a-traceparent"},
        {"traceparent": "00-00000000000000000000000000000000-00f067aa0ba902b7-01"},
        {"tracestate": "vendor=abc"},
    ],
    ids=["empty-source", "empty-id", "naive-time", "bad-traceparent", "zero-trace-id", "tracestate-alone"],
)
def test_encode_refuses_what_would_make_an_invalid_message(changes: dict[str, Any]) -> None:
    arguments: dict[str, Any] = {"source": SOURCE, "event_id": "evt-1", "time": TIME, **changes}

    with pytest.raises(ValueError, match=r"\S"):
        encode(example(CoursePublished), **arguments)


def test_decode_accepts_a_mapping_and_any_header_case() -> None:
    encoded = record()
    headers: dict[str, bytes | str] = {name.upper(): value for name, value in encoded.headers}
    headers["CE_ID"] = "evt-1"

    assert decode(headers, encoded.value).id == "evt-1"


def test_decode_ignores_unknown_fields_from_a_newer_minor_version() -> None:
    encoded = record()
    body = json.loads(encoded.value)
    body["new_top_level_field"] = "from v1.1"
    body["course"]["price"]["new_nested_field"] = {"deep": [1, 2]}

    envelope = decode(encoded.headers, json.dumps(body).encode())

    assert envelope.event == example(CoursePublished)


def test_decode_ignores_other_headers_even_binary_ones() -> None:
    encoded = record()

    envelope = decode([*encoded.headers, ("x-binary", b"\xff\xfe"), ("x-none", None)], encoded.value)  # type: ignore[list-item]

    assert envelope.id == "evt-1"


def test_decode_accepts_charset_utf8() -> None:
    encoded = record()
    headers = set_header(encoded.headers, "content-type", b"application/json; charset=UTF-8")

    assert decode(headers, encoded.value).type == CoursePublished.TYPE


@pytest.mark.parametrize(
    "traceparent",
    [
        b"garbage",
        b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        b"\xff",
    ],
)
def test_decode_drops_an_invalid_trace_context_but_keeps_the_event(traceparent: bytes) -> None:
    encoded = record(traceparent=TRACEPARENT, tracestate="vendor=abc")
    headers = set_header(encoded.headers, "traceparent", traceparent)

    envelope = decode(headers, encoded.value)

    assert (envelope.traceparent, envelope.tracestate) == (None, None)


def test_decode_joins_repeated_tracestate_headers() -> None:
    encoded = record(traceparent=TRACEPARENT, tracestate="a=1")

    envelope = decode([*encoded.headers, ("tracestate", b"b=2")], encoded.value)

    assert envelope.tracestate == "a=1,b=2"


def _without(name: str) -> Callable[[Headers, bytes], tuple[Headers, bytes | None]]:
    return lambda headers, value: (set_header(headers, name, None), value)


def _with(name: str, header: bytes) -> Callable[[Headers, bytes], tuple[Headers, bytes | None]]:
    return lambda headers, value: (set_header(headers, name, header), value)


def _body(body: bytes | None) -> Callable[[Headers, bytes], tuple[Headers, bytes | None]]:
    return lambda headers, value: (headers, body)


def _json_change(
    change: Callable[[dict[str, Any]], None],
) -> Callable[[Headers, bytes], tuple[Headers, bytes]]:
    def apply(headers: Headers, value: bytes) -> tuple[Headers, bytes]:
        body = json.loads(value)
        change(body)
        return headers, json.dumps(body).encode()

    return apply


INVALID = {
    "missing specversion": ("missing_header", "ce_specversion", _without("ce_specversion")),
    "missing id": ("missing_header", "ce_id", _without("ce_id")),
    "missing type": ("missing_header", "ce_type", _without("ce_type")),
    "missing source": ("missing_header", "ce_source", _without("ce_source")),
    "missing time": ("missing_header", "ce_time", _without("ce_time")),
    "missing subject": ("missing_header", "ce_subject", _without("ce_subject")),
    "missing content type": ("missing_header", "content-type", _without("content-type")),
    "empty id": ("invalid_header", "ce_id", _with("ce_id", b"")),
    "id not utf-8": ("invalid_header", "ce_id", _with("ce_id", b"\xc3\x28")),
    "conflicting ids": ("invalid_header", "ce_id", lambda h, v: ([*h, ("ce_id", b"other")], v)),
    "time not rfc 3339": ("invalid_header", "ce_time", _with("ce_time", b"yesterday")),
    "naive time": ("invalid_header", "ce_time", _with("ce_time", b"2025-03-01T09:30:00")),
    "time past datetime.max in utc": (
        "invalid_header",
        "ce_time",
        _with("ce_time", b"9999-12-31T23:00-05:00"),
    ),
    "specversion 0.3": ("unsupported_specversion", "0.3", _with("ce_specversion", b"0.3")),
    "structured mode": (
        "unsupported_content_type",
        "application/cloudevents+json",
        _with("content-type", b"application/cloudevents+json"),
    ),
    "avro": ("unsupported_content_type", "avro", _with("content-type", b"application/avro")),
    "latin-1 charset": (
        "unsupported_content_type",
        "latin-1",
        _with("content-type", b"application/json; charset=latin-1"),
    ),
    "unknown type": ("unknown_type", "org.example.other", _with("ce_type", b"org.example.other.v1")),
    "unknown major": (
        "unknown_type",
        "published.v9",
        _with("ce_type", b"org.microcred.catalog.course.published.v9"),
    ),
    "tombstone": ("malformed_body", "empty", _body(None)),
    "empty body": ("malformed_body", "empty", _body(b"")),
    "not json": ("malformed_body", "not JSON", _body(b"{not json")),
    "binary body": ("malformed_body", "not JSON", _body(bytes(range(256)))),
    "invalid utf-8 in a string": ("malformed_body", "not JSON", _body(b'{"course": "\xff"}')),
    "json array": ("malformed_body", "not a JSON object", _body(b"[1, 2]")),
    "json null": ("malformed_body", "not a JSON object", _body(b"null")),
    "missing field": ("schema_violation", "published_at", _json_change(lambda b: b.pop("published_at"))),
    "wrong nested type": (
        "schema_violation",
        "course.price.amount_minor",
        _json_change(lambda b: b["course"]["price"].update(amount_minor="lots")),
    ),
    "float money": (
        "schema_violation",
        "course.price.amount_minor",
        _json_change(lambda b: b["course"]["price"].update(amount_minor=49.0)),
    ),
    "huge number": (
        "schema_violation",
        "course.version",
        _json_change(lambda b: b["course"].update(version=10**40)),
    ),
    "time past datetime.max in body": (
        "schema_violation",
        "published_at",
        _json_change(lambda b: b.update(published_at="9999-12-31T23:00:00-05:00")),
    ),
}


@pytest.mark.parametrize(("reason", "named", "corrupt"), INVALID.values(), ids=INVALID.keys())
def test_decode_says_why_a_message_is_not_a_valid_event(
    reason: str, named: str, corrupt: Callable[[Headers, bytes], tuple[Headers, bytes | None]]
) -> None:
    encoded = record()
    headers, value = corrupt(encoded.headers, encoded.value)

    with pytest.raises(InvalidEvent) as caught:
        decode(headers, value)

    assert caught.value.reason == reason
    assert named in caught.value.detail
    assert str(caught.value) == f"{reason}: {caught.value.detail}"


def test_schema_violation_detail_stays_short() -> None:
    encoded = record()

    with pytest.raises(InvalidEvent) as caught:
        decode(encoded.headers, b"{}")

    assert caught.value.reason == "schema_violation"
    assert caught.value.detail.startswith(
        "CoursePublished: course: Field required; published_at: Field required"
    )
    assert len(caught.value.detail) < 300


def test_schema_violation_names_the_field_and_not_the_value() -> None:
    encoded = encode(example(PaymentSettled), source="urn:microcred:billing")
    body = json.loads(encoded.value)
    body["amount"] = {"amount_minor": 100, "currency": "secret-ish-value"}

    with pytest.raises(InvalidEvent) as caught:
        decode(encoded.headers, json.dumps(body).encode())

    assert "amount.currency" in caught.value.detail
    assert "secret-ish-value" not in caught.value.detail


def test_a_cross_field_rule_is_a_schema_violation() -> None:
    encoded = record()
    headers = set_header(encoded.headers, "ce_type", b"org.microcred.enrollment.course.completed.v1")
    body = example_data(REGISTRY["org.microcred.enrollment.course.completed.v1"]) | {"partner_id": None}

    with pytest.raises(InvalidEvent) as caught:
        decode(headers, json.dumps(body).encode())

    assert caught.value.reason == "schema_violation"


class TestGarbage:
    """Whatever arrives on a topic, decode answers with an Envelope or an InvalidEvent."""

    JUNK_VALUES: tuple[Any, ...] = (
        None,
        0,
        -1,
        10**400,
        1e308,
        -0.0,
        "",
        "\x00",
        "\ud800",
        "é" * 1000,
        True,
        [],
        {},
        [[[[[]]]]],
        {"a": {"b": {"c": [None, 1, "x"]}}},
    )

    JUNK_HEADERS: tuple[Any, ...] = (
        None,
        42,
        "ce_id",
        b"ce_id",
        [("ce_id",)],
        [("ce_id", b"1", b"2")],
        [(None, b"x")],
        [(b"ce_id", b"x")],
        [("ce_id", 5)],
        {"ce_specversion": None},
        {"ce_specversion": 1.0},
        [object()],
    )

    def decodes_or_refuses(self, headers: Headers, value: bytes) -> None:
        with contextlib.suppress(InvalidEvent):
            decode(headers, value)

    def test_junk_headers(self) -> None:
        value = record().value
        for headers in self.JUNK_HEADERS:
            with pytest.raises(InvalidEvent):
                decode(headers, value)

    def test_deeply_nested_body(self) -> None:
        encoded = record()

        for body in (b"[" * 100_000, b'{"course":' * 50_000, b"[" * 100_000 + b"]" * 100_000):
            with pytest.raises(InvalidEvent, match=r"malformed_body|schema_violation"):
                decode(encoded.headers, body)

    def test_huge_integer_literal(self) -> None:
        encoded = record()
        body = encoded.value.replace(b'"amount_minor":4900', b'"amount_minor":' + b"9" * 100_000)

        with pytest.raises(InvalidEvent):
            decode(encoded.headers, body)

    @pytest.mark.parametrize("cls", list(REGISTRY.values()), ids=lambda cls: cls.__name__)
    def test_random_corruption_of_valid_messages(self, cls: type[Event]) -> None:
        rng = random.Random(cls.TYPE)
        encoded = encode(example(cls), source=SOURCE, traceparent=TRACEPARENT, tracestate="a=1")
        for _ in range(150):
            headers = list(encoded.headers)
            value = bytearray(encoded.value)
            for _ in range(rng.randint(1, 3)):
                self.corrupt(rng, headers, value)
            self.decodes_or_refuses(headers, bytes(value))
        for _ in range(150):
            self.decodes_or_refuses(encoded.headers, self.junk_body(rng, encoded.value))

    def corrupt(self, rng: random.Random, headers: Headers, value: bytearray) -> None:
        choice = rng.randrange(5)
        if choice == 0 and value:
            value[rng.randrange(len(value))] = rng.randrange(256)
        elif choice == 1 and value:
            del value[rng.randrange(len(value)) :]
        elif choice == 2:
            index = rng.randrange(len(headers))
            headers[index] = (headers[index][0], rng.randbytes(rng.randint(0, 40)))
        elif choice == 3:
            headers.pop(rng.randrange(len(headers)))
        else:
            headers.append((rng.choice([n for n, _ in headers] or ["ce_id"]), rng.randbytes(8)))

    def junk_body(self, rng: random.Random, valid: bytes) -> bytes:
        """The valid body with one value somewhere replaced by junk."""
        body = json.loads(valid)
        node = body
        while True:
            key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
            child = node[key]
            if isinstance(child, dict | list) and child and rng.random() < 0.6:
                node = child
                continue
            node[key] = rng.choice(self.JUNK_VALUES)
            return json.dumps(body).encode()
