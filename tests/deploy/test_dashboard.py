"""The Grafana dashboard queries only metrics the services really export."""

import json
import re
from pathlib import Path

from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_fastapi_instrumentator import Instrumentator

from microcred_runtime.metrics import Metrics

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "microcred-services.json"
_METRIC = re.compile(r"\b((?:microcred|http)_[a-z_]+)")


def _exported_sample_names() -> set[str]:
    metrics = Metrics()
    # Labelled series exist once a label set has been used.
    metrics.consumer_lag.labels("t", "0").set(0)
    metrics.consumed.labels("t", "applied").inc()
    metrics.handler_failures.labels("t", "e").inc()
    metrics.dead_lettered.labels("t", "r").inc()
    app = FastAPI()
    Instrumentator(registry=metrics.registry).instrument(app)

    @app.get("/ping")
    async def ping() -> str:
        return "pong"

    TestClient(app).get("/ping")
    return {sample.name for family in metrics.registry.collect() for sample in family.samples}


def test_every_panel_queries_an_exported_metric() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in _METRIC.findall(target["expr"])
    }
    assert queried, "the dashboard queries nothing"
    missing = queried - _exported_sample_names()
    assert not missing, f"the dashboard queries metrics no service exports: {sorted(missing)}"
