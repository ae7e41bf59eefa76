import os

import pytest

from microcred_runtime import ConfigurationError, ServiceSettings, load_settings

VALID = {
    "DATABASE_URL": "postgresql://catalog:secret@db.internal:5432/catalog",
    "KAFKA_BOOTSTRAP_SERVERS": "kafka-1:9092,kafka-2:9092",
    "AUTH_ISSUER": "https://id.microcred.example",
    "AUTH_JWKS_URL": "https://id.microcred.example/jwks.json",
}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No setting leaks in from the machine running the tests (names match case-insensitively)."""
    for name in list(os.environ):
        if name.lower() in ServiceSettings.model_fields:
            monkeypatch.delenv(name)


def set_environment(monkeypatch: pytest.MonkeyPatch, variables: dict[str, str]) -> None:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)


def test_a_valid_environment_loads_with_defaults_for_the_rest(monkeypatch: pytest.MonkeyPatch) -> None:
    set_environment(monkeypatch, {**VALID, "HTTP_PORT": "8081", "KAFKA_TOPIC_PREFIX": "staging."})

    settings = load_settings(ServiceSettings)

    assert str(settings.database_url) == VALID["DATABASE_URL"]
    assert settings.kafka_bootstrap_servers == VALID["KAFKA_BOOTSTRAP_SERVERS"]
    assert settings.http_port == 8081
    assert settings.kafka_topic_prefix == "staging."
    assert settings.consumer_max_attempts == 5


def test_missing_variables_are_each_named() -> None:
    with pytest.raises(ConfigurationError) as caught:
        load_settings(ServiceSettings)

    for variable in ("DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS", "AUTH_ISSUER"):
        assert variable in str(caught.value)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("DATABASE_URL", "not a url"),
        ("DATABASE_URL", "mysql://catalog@db/catalog"),
        ("KAFKA_BOOTSTRAP_SERVERS", ""),
        ("HTTP_PORT", "abc"),
        ("HTTP_PORT", "70000"),
        ("LOG_LEVEL", "LOUD"),
        ("KAFKA_TOPIC_PREFIX", "has spaces"),
        ("CONSUMER_MAX_ATTEMPTS", "0"),
        ("CONSUMER_MAX_ATTEMPTS", "31"),
        ("CONSUMER_SESSION_TIMEOUT_SECONDS", "0"),
        ("CONSUMER_HEARTBEAT_INTERVAL_SECONDS", "-1"),
        ("CONSUMER_MAX_POLL_INTERVAL_SECONDS", "soon"),
        ("HTTP_TRUSTED_PROXIES", '["*"]'),
        ("HTTP_TRUSTED_PROXIES", '["ingress.internal"]'),
        ("HTTP_TRUSTED_PROXIES", '["10.0.0.0/33"]'),
        ("RATE_LIMIT_PER_ADDRESS", "lots"),
        ("RATE_LIMIT_PER_SUBJECT", "30 a minute"),
        ("RATE_LIMIT_STORAGE_URI", "memcached://cache:11211"),
        ("RATE_LIMIT_STORAGE_URI", "redis://cache:6379"),
        # Less than an hour would forget partner messages still inside their ce_time window.
        ("INBOX_RETENTION_HOURS", "0"),
    ],
)
def test_a_bad_value_is_refused_naming_its_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    set_environment(monkeypatch, {**VALID, variable: value})

    with pytest.raises(ConfigurationError) as caught:
        load_settings(ServiceSettings)

    named = [line.split(":")[0].strip() for line in str(caught.value).splitlines()[1:]]
    assert named == [variable]


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("0", "greater than or equal to 1"),
        ("65", "less than or equal to 64"),
        ("two", "a valid integer"),
        ("1.5", "a valid integer"),
    ],
)
def test_http_workers_is_refused_with_its_reason(
    monkeypatch: pytest.MonkeyPatch, value: str, reason: str
) -> None:
    set_environment(monkeypatch, {**VALID, "HTTP_WORKERS": value})

    with pytest.raises(ConfigurationError) as caught:
        load_settings(ServiceSettings)

    (line,) = str(caught.value).splitlines()[1:]
    variable, _, message = line.strip().partition(": ")
    assert variable == "HTTP_WORKERS"
    assert reason in message


def test_several_bad_values_are_reported_together(monkeypatch: pytest.MonkeyPatch) -> None:
    set_environment(monkeypatch, {**VALID, "HTTP_PORT": "abc"})
    monkeypatch.delenv("DATABASE_URL")

    with pytest.raises(ConfigurationError) as caught:
        load_settings(ServiceSettings)

    assert "DATABASE_URL" in str(caught.value)
    assert "HTTP_PORT" in str(caught.value)
    assert "KAFKA_BOOTSTRAP_SERVERS" not in str(caught.value)


def test_a_service_subclass_adds_its_own_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    class CatalogSettings(ServiceSettings):
        signing_key: str

    set_environment(monkeypatch, VALID)
    with pytest.raises(ConfigurationError, match="SIGNING_KEY"):
        load_settings(CatalogSettings)

    monkeypatch.setenv("SIGNING_KEY", "k")
    assert load_settings(CatalogSettings).signing_key == "k"


def test_consumers_leave_a_dead_replica_within_seconds_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    set_environment(monkeypatch, VALID)

    settings = load_settings(ServiceSettings)

    # At the brokers' default floor (group.min.session.timeout.ms, 6 s), a heartbeat a second.
    assert settings.consumer_session_timeout_seconds == 6.0
    assert settings.consumer_heartbeat_interval_seconds == 1.0
    assert settings.consumer_max_poll_interval_seconds == 300.0


def test_a_heartbeat_slower_than_a_third_of_the_session_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    set_environment(
        monkeypatch,
        {**VALID, "CONSUMER_SESSION_TIMEOUT_SECONDS": "6", "CONSUMER_HEARTBEAT_INTERVAL_SECONDS": "3"},
    )

    with pytest.raises(ConfigurationError, match="at most a third of CONSUMER_SESSION_TIMEOUT_SECONDS"):
        load_settings(ServiceSettings)


def test_retries_that_outlast_half_the_poll_interval_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    set_environment(
        monkeypatch,
        {
            **VALID,
            "CONSUMER_MAX_ATTEMPTS": "10",
            "CONSUMER_RETRY_BACKOFF_SECONDS": "1",
            "CONSUMER_MAX_POLL_INTERVAL_SECONDS": "600",
        },
    )

    # 1 + 2 + ... + 256 s of retries, then a 512 s pause after an outage: 1023 s > 300 s.
    with pytest.raises(
        ConfigurationError, match=r"retries take 1023 s .* CONSUMER_MAX_POLL_INTERVAL_SECONDS"
    ):
        load_settings(ServiceSettings)

    monkeypatch.setenv("CONSUMER_MAX_POLL_INTERVAL_SECONDS", "2100")
    assert load_settings(ServiceSettings).consumer_max_attempts == 10


def test_kafka_servers_are_the_bootstrap_servers_one_by_one(monkeypatch: pytest.MonkeyPatch) -> None:
    set_environment(monkeypatch, {**VALID, "KAFKA_BOOTSTRAP_SERVERS": "kafka-1:9092, kafka-2:9092,"})

    assert load_settings(ServiceSettings).kafka_servers == ["kafka-1:9092", "kafka-2:9092"]


def test_rate_limits_and_trusted_proxies_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    set_environment(
        monkeypatch,
        {
            **VALID,
            "HTTP_TRUSTED_PROXIES": '["10.0.0.0/8", "192.0.2.1", "2001:db8::/32"]',
            "RATE_LIMIT_PER_ADDRESS": "10/second;300/minute",
            "RATE_LIMIT_STORAGE_URI": "async+redis://limits.internal:6379/0",
        },
    )

    settings = load_settings(ServiceSettings)

    assert settings.http_trusted_proxies == ["10.0.0.0/8", "192.0.2.1", "2001:db8::/32"]
    assert settings.rate_limit_per_address == "10/second;300/minute"
    assert settings.rate_limit_per_subject == "30/minute"
    assert settings.rate_limit_storage_uri == "async+redis://limits.internal:6379/0"
