"""Notifications refuses to start on settings it cannot use, naming the variable."""

import os

import pytest

from microcred_runtime import ConfigurationError, load_settings
from notifications.settings import Settings, SmtpSecurity

SERVICE_ENVIRONMENT = {
    "DATABASE_URL": "postgresql://notifications:pw@db.internal:5432/notifications",
    "KAFKA_BOOTSTRAP_SERVERS": "kafka-1:9092",
    "AUTH_ISSUER": "https://id.microcred.example",
    "AUTH_JWKS_URL": "https://id.microcred.example/jwks.json",
}


@pytest.fixture(autouse=True)
def environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No setting leaks in from the machine running the tests; the service's required ones set."""
    for name in list(os.environ):
        if name.lower() in Settings.model_fields:
            monkeypatch.delenv(name)
    for name, value in SERVICE_ENVIRONMENT.items():
        monkeypatch.setenv(name, value)


def test_the_defaults_suit_a_local_run() -> None:
    settings = load_settings(Settings)
    assert (settings.http_port, settings.smtp_host, settings.smtp_port) == (8005, "127.0.0.1", 1025)
    assert settings.smtp_from == "microcred <no-reply@microcred.example>"
    assert settings.smtp_security is SmtpSecurity.NONE
    assert settings.webhook_allowed_hosts == ["localhost", "127.0.0.1", "::1"]
    # ... but a webhook reaches only public addresses until an operator opens a private network.
    assert settings.webhook_allowed_private_networks == []
    assert settings.delivery_max_attempts == 8


def test_smtp_and_webhook_settings_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMTP_HOST", "smtp.mail.example")
    monkeypatch.setenv("SMTP_PORT", "587")
    monkeypatch.setenv("SMTP_SECURITY", "starttls")
    monkeypatch.setenv("SMTP_USERNAME", "microcred")
    monkeypatch.setenv("SMTP_PASSWORD", "s3cret-app-password")
    monkeypatch.setenv("WEBHOOK_ALLOWED_HOSTS", '["*.partner.example"]')
    monkeypatch.setenv("WEBHOOK_ALLOWED_PRIVATE_NETWORKS", '["127.0.0.0/8", "::1/128"]')
    settings = load_settings(Settings)
    assert settings.smtp_security is SmtpSecurity.STARTTLS
    assert settings.smtp_password is not None
    assert settings.smtp_password.get_secret_value() == "s3cret-app-password"
    assert settings.webhook_allowed_hosts == ["*.partner.example"]
    assert [str(network) for network in settings.webhook_allowed_private_networks] == [
        "127.0.0.0/8",
        "::1/128",
    ]


@pytest.mark.parametrize(
    ("variables", "named"),
    [
        ({"SMTP_FROM": "no-reply"}, "SMTP_FROM"),
        ({"SMTP_FROM": "microcred <no-reply@microcred.example>\nBcc: x@example.org"}, "SMTP_FROM"),
        ({"SMTP_SECURITY": "ssl3"}, "SMTP_SECURITY"),
        ({"SMTP_PORT": "0"}, "SMTP_PORT"),
        ({"SMTP_USERNAME": "microcred"}, "SMTP_PASSWORD"),
        ({"WEBHOOK_ALLOWED_HOSTS": '[""]'}, "WEBHOOK_ALLOWED_HOSTS"),
        ({"WEBHOOK_ALLOWED_HOSTS": "*.partner.example"}, "WEBHOOK_ALLOWED_HOSTS"),
        # Any host at all: the allow-list would allow nothing less than everything.
        ({"WEBHOOK_ALLOWED_HOSTS": '["*"]'}, "WEBHOOK_ALLOWED_HOSTS"),
        ({"WEBHOOK_ALLOWED_HOSTS": '["*.partner.example", "*.*"]'}, "WEBHOOK_ALLOWED_HOSTS"),
        ({"WEBHOOK_ALLOWED_PRIVATE_NETWORKS": '["127.0.0.1/8"]'}, "WEBHOOK_ALLOWED_PRIVATE_NETWORKS"),
        ({"WEBHOOK_ALLOWED_PRIVATE_NETWORKS": '["localhost"]'}, "WEBHOOK_ALLOWED_PRIVATE_NETWORKS"),
        ({"DELIVERY_MAX_ATTEMPTS": "0"}, "DELIVERY_MAX_ATTEMPTS"),
        ({"DELIVERY_RETRY_BASE_SECONDS": "120", "DELIVERY_RETRY_CAP_SECONDS": "60"}, "DELIVERY_RETRY_BASE"),
    ],
)
def test_unusable_settings_are_refused_by_name(
    monkeypatch: pytest.MonkeyPatch, variables: dict[str, str], named: str
) -> None:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigurationError, match=named):
        load_settings(Settings)
