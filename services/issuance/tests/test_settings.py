"""Issuance refuses to start without usable signing keys, naming the setting."""

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from issuance import keys
from issuance.settings import Settings
from microcred_runtime import ConfigurationError, load_settings

SERVICE_ENVIRONMENT = {
    "DATABASE_URL": "postgresql://issuance:pw@db.internal:5432/issuance",
    "KAFKA_BOOTSTRAP_SERVERS": "kafka-1:9092",
    "AUTH_ISSUER": "https://id.microcred.example",
    "AUTH_JWKS_URL": "https://id.microcred.example/jwks.json",
}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No setting leaks in from the machine running the tests (names match case-insensitively)."""
    for name in list(os.environ):
        if name.lower() in Settings.model_fields:
            monkeypatch.delenv(name)
    for name, value in SERVICE_ENVIRONMENT.items():
        monkeypatch.setenv(name, value)


def test_issuance_reads_its_keys_and_public_url(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    keys.generate_key(tmp_path, "key-1")
    monkeypatch.setenv("ISSUER_KEYS_DIR", str(tmp_path))
    monkeypatch.setenv("PUBLIC_BASE_URL", "https://credentials.microcred.example/")
    monkeypatch.setenv("VERIFY_TRUSTED_HOSTS", '["Partner.example", "status.example:8443"]')

    settings = load_settings(Settings)

    assert settings.issuer_keys_dir == tmp_path
    assert settings.base_url == "https://credentials.microcred.example"
    assert settings.verify_trusted_hosts == ["partner.example", "status.example:8443"]
    assert settings.http_port == 8004


def test_the_default_public_url_is_the_local_port(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    keys.generate_key(tmp_path, "key-1")
    monkeypatch.setenv("ISSUER_KEYS_DIR", str(tmp_path))

    assert load_settings(Settings).base_url == "http://127.0.0.1:8004"


@pytest.mark.parametrize(
    ("prepare", "complaint"),
    [
        (None, "ISSUER_KEYS_DIR: Field required"),
        (lambda directory: None, "ISSUER_KEYS_DIR: cannot load the issuer keys"),
        (lambda directory: (directory / "key-1.pem").write_text("not a key"), "not an unencrypted PKCS#8"),
        (
            lambda directory: (
                keys.generate_key(directory, "key-1"),
                (directory / "active").write_text("key-2"),
            ),
            "names key 'key-2', which is not in the directory",
        ),
    ],
    ids=["unset", "empty", "garbage", "active-names-nothing"],
)
def test_issuance_refuses_keys_it_cannot_sign_with(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, prepare: Callable[[Path], object] | None, complaint: str
) -> None:
    if prepare is not None:
        directory = tmp_path / "keys"
        directory.mkdir()
        prepare(directory)
        monkeypatch.setenv("ISSUER_KEYS_DIR", str(directory))

    with pytest.raises(ConfigurationError) as refused:
        load_settings(Settings)

    assert complaint in str(refused.value)


def test_a_trusted_host_is_a_host_not_a_url(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    keys.generate_key(tmp_path, "key-1")
    monkeypatch.setenv("ISSUER_KEYS_DIR", str(tmp_path))
    monkeypatch.setenv("VERIFY_TRUSTED_HOSTS", '["https://partner.example/"]')

    with pytest.raises(ConfigurationError, match=r"VERIFY_TRUSTED_HOSTS: .* is not a host name"):
        load_settings(Settings)


def test_the_sweep_runs_every_30_s_over_15_min_before_the_last_pass_and_over_everything_hourly(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    keys.generate_key(tmp_path, "key-1")
    monkeypatch.setenv("ISSUER_KEYS_DIR", str(tmp_path))

    settings = load_settings(Settings)

    assert (
        settings.issuance_sweep_interval_seconds,
        settings.issuance_sweep_lookback_seconds,
        settings.issuance_sweep_full_interval_seconds,
    ) == (30, 900, 3600)


@pytest.mark.parametrize(
    ("environment", "complaint"),
    [
        (
            {"ISSUANCE_SWEEP_INTERVAL_SECONDS": "0.5"},
            "ISSUANCE_SWEEP_INTERVAL_SECONDS: Input should be greater",
        ),
        ({"ISSUANCE_SWEEP_INTERVAL_SECONDS": "nan"}, "ISSUANCE_SWEEP_INTERVAL_SECONDS"),
        ({"ISSUANCE_SWEEP_LOOKBACK_SECONDS": "nan"}, "ISSUANCE_SWEEP_LOOKBACK_SECONDS"),
        (
            {"ISSUANCE_SWEEP_LOOKBACK_SECONDS": "200"},
            "ISSUANCE_SWEEP_LOOKBACK_SECONDS must be at least CONSUMER_MAX_POLL_INTERVAL_SECONDS",
        ),
        (
            {"ISSUANCE_SWEEP_LOOKBACK_SECONDS": "500", "CONSUMER_MAX_POLL_INTERVAL_SECONDS": "600"},
            "ISSUANCE_SWEEP_LOOKBACK_SECONDS must be at least CONSUMER_MAX_POLL_INTERVAL_SECONDS",
        ),
        (
            {"ISSUANCE_SWEEP_INTERVAL_SECONDS": "60", "ISSUANCE_SWEEP_FULL_INTERVAL_SECONDS": "30"},
            "ISSUANCE_SWEEP_FULL_INTERVAL_SECONDS must be at least ISSUANCE_SWEEP_INTERVAL_SECONDS",
        ),
    ],
    ids=[
        "too-often",
        "interval-not-a-number",
        "lookback-not-a-number",
        "lookback-shorter-than-a-poll-interval",
        "lookback-shorter-than-a-longer-poll-interval",
        "full-pass-more-often-than-a-pass",
    ],
)
def test_the_sweep_settings_are_checked(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, environment: dict[str, str], complaint: str
) -> None:
    keys.generate_key(tmp_path, "key-1")
    monkeypatch.setenv("ISSUER_KEYS_DIR", str(tmp_path))
    for variable, value in environment.items():
        monkeypatch.setenv(variable, value)

    with pytest.raises(ConfigurationError) as refused:
        load_settings(Settings)

    assert complaint in str(refused.value)
