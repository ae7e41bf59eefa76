"""`make demo` talks to the broker `make up` uses, read from the same settings."""

import os
import subprocess
import sys

import pytest

from tests.deploy.conftest import ROOT


def _demo_broker(settings: dict[str, str]) -> str:
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in ("KAFKA_BOOTSTRAP_SERVERS", "MICROCRED_KAFKA_PORT")
    }
    # The module's settings only: running it would walk a learner through a live system.
    probe = "import runpy; print(runpy.run_path('scripts/demo.py', run_name='probe')['KAFKA'])"
    done = subprocess.run(  # noqa: S603  (our own interpreter and script)
        [sys.executable, "-c", probe],
        cwd=ROOT,
        env=env | settings,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


@pytest.mark.parametrize(
    ("settings", "broker"),
    [
        ({}, "127.0.0.1:9092"),
        ({"MICROCRED_KAFKA_PORT": "23092"}, "127.0.0.1:23092"),
        (
            {"KAFKA_BOOTSTRAP_SERVERS": "kafka.example:9094", "MICROCRED_KAFKA_PORT": "23092"},
            "kafka.example:9094",
        ),
    ],
)
def test_the_demo_uses_the_broker_make_up_uses(settings: dict[str, str], broker: str) -> None:
    assert _demo_broker(settings) == broker
