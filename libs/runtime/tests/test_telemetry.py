import json
import logging
import re
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.trace import Tracer

from microcred_runtime.telemetry import configure_logging

NOISY = ("aiokafka", "faststream", "uvicorn.access")


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    noisy_levels = {name: logging.getLogger(name).level for name in NOISY}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, noisy_level in noisy_levels.items():
        logging.getLogger(name).setLevel(noisy_level)


def lines(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_each_record_is_one_json_line_naming_level_logger_and_service(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("catalog", "INFO")

    logging.getLogger("catalog.api").info("course %s published", "c-1", extra={"course_id": "c-1"})
    logging.getLogger("catalog.api").debug("not shown at INFO")

    (line,) = lines(capsys)
    assert line["level"] == "INFO"
    assert line["logger"] == "catalog.api"
    assert line["message"] == "course c-1 published"
    assert line["service"] == "catalog"
    assert line["course_id"] == "c-1"
    assert "time" in line
    assert "trace_id" not in line


def test_inside_a_span_each_line_carries_the_trace_and_span_ids(
    capsys: pytest.CaptureFixture[str], tracer: Tracer
) -> None:
    configure_logging("catalog", "DEBUG")

    with tracer.start_as_current_span("publish course") as span:
        logging.getLogger("catalog").warning("inside")

    (line,) = lines(capsys)
    context = span.get_span_context()
    assert re.fullmatch("[0-9a-f]{32}", line["trace_id"])
    assert re.fullmatch("[0-9a-f]{16}", line["span_id"])
    assert int(line["trace_id"], 16) == context.trace_id
    assert int(line["span_id"], 16) == context.span_id


def test_client_libraries_stay_quiet_below_warning() -> None:
    configure_logging("catalog", "DEBUG")

    assert logging.getLogger().level == logging.DEBUG
    assert all(logging.getLogger(name).level == logging.WARNING for name in NOISY)
