"""Billing and its simulator refuse to start with a guessable webhook secret, naming the setting."""

import os

import pytest

from billing import simulator
from billing.settings import Settings
from microcred_runtime import ConfigurationError, load_settings

SECRET = "whsec_4c0f1d2e9b8a7c6d5e4f3a2b1c0d9e8f"
SERVICE_ENVIRONMENT = {
    "DATABASE_URL": "postgresql://billing:pw@db.internal:5432/billing",
    "KAFKA_BOOTSTRAP_SERVERS": "kafka-1:9092",
    "AUTH_ISSUER": "https://id.microcred.example",
    "AUTH_JWKS_URL": "https://id.microcred.example/jwks.json",
}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No setting leaks in from the machine running the tests (names match case-insensitively)."""
    known = Settings.model_fields.keys() | {
        f"simulator_{name}" for name in simulator.SimulatorSettings.model_fields
    }
    for name in list(os.environ):
        if name.lower() in known:
            monkeypatch.delenv(name)


def environment(monkeypatch: pytest.MonkeyPatch, variables: dict[str, str]) -> None:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)


def test_billing_reads_the_provider_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    environment(monkeypatch, {**SERVICE_ENVIRONMENT, "PAYMENT_WEBHOOK_SECRET": SECRET})

    settings = load_settings(Settings)

    assert settings.payment_webhook_secret.get_secret_value() == SECRET
    assert str(settings.payment_provider_url) == "http://127.0.0.1:8090/"
    assert settings.http_port == 8003
    assert SECRET not in repr(settings), "the secret must not show up in logs"


@pytest.mark.parametrize(
    ("secret", "complaint"),
    [(None, "Field required"), ("changethis", "is a placeholder"), ("0123456789abcdef", "is too short")],
)
def test_billing_refuses_a_missing_or_guessable_secret(
    monkeypatch: pytest.MonkeyPatch, secret: str | None, complaint: str
) -> None:
    environment(monkeypatch, SERVICE_ENVIRONMENT)
    if secret is not None:
        monkeypatch.setenv("PAYMENT_WEBHOOK_SECRET", secret)

    with pytest.raises(ConfigurationError) as refused:
        load_settings(Settings)

    assert f"PAYMENT_WEBHOOK_SECRET: {complaint}" in str(refused.value)


def test_the_simulator_refuses_a_guessable_secret_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    environment(monkeypatch, {"SIMULATOR_WEBHOOK_SECRET": "changethis", "SIMULATOR_PORT": "0"})

    with pytest.raises(SystemExit) as stopped:
        simulator.main()

    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert "SIMULATOR_WEBHOOK_SECRET: is a placeholder" in error
    assert "SIMULATOR_PORT: " in error
