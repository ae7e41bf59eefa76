import pytest
from starlette.requests import Request

from microcred_runtime import Problem, ServiceSettings
from microcred_runtime.rate_limit import RateLimiter

BASE = {
    "database_url": "postgresql://catalog:secret@db.internal:5432/catalog",
    "kafka_bootstrap_servers": "kafka-1:9092",
    "auth_issuer": "https://id.microcred.example",
    "auth_jwks_url": "https://id.microcred.example/jwks.json",
}


def request(address: str) -> Request:
    return Request(
        {"type": "http", "method": "POST", "path": "/verify", "headers": [], "client": (address, 1)}
    )


def limiter(**settings: str) -> RateLimiter:
    return RateLimiter("issuance", ServiceSettings(**{**BASE, **settings}))  # type: ignore[arg-type]


async def test_an_address_over_its_limit_is_refused_with_retry_after_and_another_is_not() -> None:
    limits = limiter(rate_limit_per_address="2/minute")
    for _ in range(2):
        await limits.by_address(request("198.51.100.1"))

    with pytest.raises(Problem) as refused:
        await limits.by_address(request("198.51.100.1"))

    assert refused.value.status == 429
    assert 1 <= int(refused.value.headers["Retry-After"]) <= 60
    await limits.by_address(request("198.51.100.2"))


async def test_a_shared_store_that_cannot_be_reached_lets_requests_through(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # redis-py, as the image ships it; nothing listens on port 1.
    limits = limiter(rate_limit_per_address="1/minute", rate_limit_storage_uri="async+redis://127.0.0.1:1/0")

    for _ in range(3):
        await limits.by_address(request("198.51.100.1"))

    assert "rate limit not applied" in caplog.text
