"""Traces and logs: one trace per journey across HTTP and Kafka; JSON logs carrying its id.

Spans are per request, per consumed event and per consumed batch, not per SQL statement: a span
for each of the statements an event costs took 10-11% of the consumers' samples (benchmarks/
results/bench.txt, 2026-12-06) for what the event's span and the database's statistics say."""

import logging
import os
import sys
import time

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from pythonjsonlogger.json import JsonFormatter

_configured = False


def configure_tracing(service_name: str, version: str) -> None:
    """Install the tracer provider once per process.

    Spans are always created, so trace ids flow into logs and through Kafka headers; they are
    exported over OTLP only when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (the exporter reads the
    standard OTEL_* variables itself).
    """
    global _configured
    if _configured:
        return
    provider = TracerProvider(
        resource=Resource.create({"service.name": service_name, "service.version": version})
    )
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _configured = True


class _TraceIds(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            record.trace_id = format(context.trace_id, "032x")
            record.span_id = format(context.span_id, "016x")
        return True


def configure_logging(service_name: str, level: str) -> None:
    """JSON lines on stdout, each with the service name and, inside a span, its trace and span ids."""
    handler = logging.StreamHandler(sys.stdout)
    handler.addFilter(_TraceIds())
    formatter = JsonFormatter(
        "{asctime}{levelname}{name}{message}",
        style="{",
        rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        static_fields={"service": service_name},
        datefmt="%Y-%m-%dT%H:%M:%S%z",
    )
    formatter.converter = time.gmtime  # UTC, like every other time in microcred
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Per-message chatter from the clients stays out of INFO.
    for noisy in ("aiokafka", "faststream", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
