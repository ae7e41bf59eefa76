"""Service settings: read from the environment, refused at start-up when wrong."""

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Self, TypeVar

from limits import parse_many
from pydantic import (
    Field,
    HttpUrl,
    PostgresDsn,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

# The rate limits' shared stores, through redis-py (see rate_limit.py).
_REDIS_SCHEMES = (
    "async+redis",
    "async+rediss",
    "async+redis+unix",
    "async+redis+sentinel",
    "async+redis+cluster",
)


# The consumer's batching, as types: a service whose events may wait takes other defaults
# (notifications) with the same bounds and descriptions.
ConsumerBatchSize = Annotated[
    int,
    Field(
        ge=1,
        le=1000,
        description=(
            "Most events applied in one transaction and one offset commit: what a poll returns, up "
            "to this. 1 applies each on its own."
        ),
    ),
]
ConsumerFetchMaxWait = Annotated[
    float,
    Field(
        ge=0.001,  # whole milliseconds: less would be 0, a fetch loop that never waits
        le=30,
        description=(
            "Longest the broker holds a fetch for partitions with no new records (or fewer than "
            "CONSUMER_FETCH_MIN_BYTES). A consumer sends its next fetch only after it, so new records "
            "may wait this long behind idle topics; lower costs idle consumers more fetches."
        ),
    ),
]
ConsumerFetchMinBytes = Annotated[
    int,
    Field(
        ge=1,
        le=50 * 1024 * 1024,
        description=(
            "Bytes of new records the broker waits for (up to CONSUMER_FETCH_MAX_WAIT_SECONDS) before "
            "it answers a fetch: above 1, a consumer whose events may wait takes them in fewer, larger "
            "batches, at less CPU per event."
        ),
    ),
]


class ServiceSettings(BaseSettings):
    """What every service reads from its environment; a service subclasses it to add its own."""

    model_config = SettingsConfigDict(frozen=True, extra="ignore", env_file=None)

    database_url: Annotated[PostgresDsn, Field(description="PostgreSQL URL of the service's own database.")]
    kafka_bootstrap_servers: Annotated[
        str, Field(min_length=1, description="Comma-separated Kafka bootstrap servers, host:port.")
    ]
    http_host: str = Field(default="127.0.0.1", description="Interface the HTTP API listens on.")
    http_port: int = Field(default=8000, ge=1, le=65535, description="Port the HTTP API listens on.")
    http_workers: int = Field(
        default=1,
        ge=1,
        le=64,
        description=(
            "Processes serving HTTP_PORT, each a whole copy of the service (see workers.py): one "
            "uses at most one CPU. 1: the service is one process."
        ),
    )
    metrics_port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description=(
            "Port of a server of its own for /metrics, on HTTP_HOST; the API's port then has no "
            "/metrics. Unset: /metrics is on the API's port."
        ),
    )
    log_level: str = Field(default="INFO", pattern="^(DEBUG|INFO|WARNING|ERROR)$")
    cors_origins: list[str] = Field(default_factory=list, description="Browser origins allowed by CORS.")
    http_max_body_bytes: int = Field(
        default=1024 * 1024,
        ge=1024,
        description="Largest request body (413 beyond); a route that needs more or less sets its own.",
    )

    http_trusted_proxies: list[str] = Field(
        default_factory=list,
        description=(
            "Addresses or networks (CIDR) of the proxies in front of the service: only their "
            "X-Forwarded-For names the client; anyone else's is ignored."
        ),
    )
    rate_limit_per_address: str = Field(
        default="300/minute",
        description="Requests one client address may make to each rate-limited route (`limits` notation).",
    )
    rate_limit_per_subject: str = Field(
        default="30/minute",
        description="Requests one token subject may make to each rate-limited route that takes a token.",
    )
    rate_limit_storage_uri: str = Field(
        default="async+memory://",
        description="Where rate limits are counted: in memory (each replica alone) or a shared Redis.",
    )

    auth_issuer: Annotated[str, Field(min_length=1, description="The `iss` every bearer token must carry.")]
    auth_audience: str = Field(default="microcred", min_length=1, description="The `aud` tokens must carry.")
    auth_jwks_url: HttpUrl | None = Field(
        default=None, description="Where the issuer publishes its keys (JWKS)."
    )
    auth_jwks_file: Path | None = Field(default=None, description="A JWKS file, instead of AUTH_JWKS_URL.")
    auth_algorithms: list[str] = Field(
        default=["RS256"], min_length=1, description="Signing algorithms accepted; asymmetric only."
    )
    auth_roles_claim: str = Field(default="roles", description="The claim listing the caller's roles.")
    auth_issuers_claim: str = Field(
        default="issuers",
        description="The claim listing the issuer (institution) ids a staff role acts for (admins: all).",
    )
    auth_token_types: list[str] = Field(
        default=["at+jwt"],
        min_length=1,
        description="Header `typ` values a bearer token may have (RFC 8725 3.11; RFC 9068 access tokens).",
    )
    auth_uuid_subjects_are_learner_ids: bool = Field(
        default=False,
        description=(
            "Take a UUID subject as the learner's id itself, not derive one from it: only for an "
            "issuer whose subjects are learner ids, since a chosen subject could name another learner."
        ),
    )

    db_pool_min_size: int = Field(default=1, ge=0)
    db_pool_max_size: int = Field(default=10, ge=1)

    kafka_topic_prefix: str = Field(
        default="",
        pattern=r"^[A-Za-z0-9._-]*$",
        description="Prepended to every topic and consumer group: several environments can share a cluster.",
    )
    kafka_topic_partitions: int = Field(
        default=3, ge=1, description="Partitions for topics this service creates when they are missing."
    )
    kafka_topic_replication: int = Field(default=1, ge=1)
    consumer_max_attempts: int = Field(
        default=5, ge=1, le=30, description="Handler attempts before a message goes to the dead-letter topic."
    )
    consumer_retry_backoff_seconds: float = Field(
        default=0.2, gt=0, description="First retry delay; it doubles on every further attempt."
    )
    consumer_batch_size: ConsumerBatchSize = 100
    consumer_fetch_max_wait_seconds: ConsumerFetchMaxWait = 0.1
    consumer_fetch_min_bytes: ConsumerFetchMinBytes = 1
    # Consumer-group membership. Dynamic members with a short session, not static membership
    # (group.instance.id): a SIGKILLed replica's partitions go to the survivors once its session
    # expires, either way, and only a dynamic member says goodbye (LeaveGroup) on SIGTERM, so a
    # rolling restart or a scale-down hands partitions over at once; a static one leaves them
    # idle for its session, and Deployment pods have no stable name to be static with. With 6 s
    # (the brokers' group.min.session.timeout.ms by default) and a heartbeat a second, the
    # survivor holds a killed replica's partitions within about 8 s (6.1 s measured). Heartbeats
    # share the event loop with the handlers: one that holds the loop for seconds needs more.
    consumer_session_timeout_seconds: float = Field(
        default=6.0,
        gt=0,
        description=(
            "How long a consumer may go without a heartbeat before the group gives its partitions "
            "to the others; the brokers' group.min/max.session.timeout.ms bound it."
        ),
    )
    consumer_heartbeat_interval_seconds: float = Field(
        default=1.0,
        gt=0,
        description="Heartbeats to the group; a survivor hears of a rebalance at its next one.",
    )
    consumer_max_poll_interval_seconds: float = Field(
        default=300.0,
        gt=0,
        description=(
            "Longest gap between two polls before a member is taken for stuck; a batch stops taking "
            "new work after half of it, and the rest come with the next poll."
        ),
    )
    outbox_batch_size: int = Field(default=500, ge=1, le=10_000)
    outbox_poll_interval_seconds: float = Field(
        default=1.0, gt=0, description="Safety net poll; commits wake the relay at once via NOTIFY."
    )
    outbox_retention_hours: int = Field(
        default=168, ge=0, description="How long published outbox rows are kept for inspection."
    )
    inbox_retention_hours: int = Field(
        default=336,
        ge=1,
        description="How long the inbox remembers an applied event, so that a redelivery or a replay "
        "of it is ignored: at least as long as the topics keep records (14 days in deploy/k8s). "
        "It also bounds the replay protection of a partner's messages, whose ce_time window is "
        "minutes, so an hour is the least it may be.",
    )
    shutdown_grace_seconds: float = Field(
        default=20.0, gt=0, description="Time in-flight messages get to finish on SIGTERM."
    )

    @property
    def kafka_servers(self) -> list[str]:
        """KAFKA_BOOTSTRAP_SERVERS one by one: FastStream takes a string for a single server."""
        return [server.strip() for server in self.kafka_bootstrap_servers.split(",") if server.strip()]

    @field_validator("http_trusted_proxies")
    @classmethod
    def _networks(cls, proxies: list[str]) -> list[str]:
        for proxy in proxies:
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                raise ValueError(
                    f"{proxy!r} is not an IP address or network (e.g. 10.0.0.0/8); a proxy is trusted "
                    "by its address, never by a name or a wildcard"
                ) from None
        return proxies

    @field_validator("rate_limit_per_address", "rate_limit_per_subject")
    @classmethod
    def _limits(cls, limits: str) -> str:
        try:
            parse_many(limits)
        except ValueError:
            raise ValueError(f"{limits!r} is not a rate limit, e.g. 30/minute or 5/second;100/hour") from None
        return limits

    @field_validator("rate_limit_storage_uri")
    @classmethod
    def _storage(cls, uri: str) -> str:
        if uri.partition("://")[0] not in ("async+memory", *_REDIS_SCHEMES):
            raise ValueError(
                "use async+memory:// (each replica counts alone) or a store the replicas share: "
                + ", ".join(f"{scheme}://" for scheme in _REDIS_SCHEMES)
            )
        return uri

    @field_validator("auth_algorithms")
    @classmethod
    def _asymmetric_only(cls, algorithms: list[str]) -> list[str]:
        # A shared-secret or unsigned algorithm would let anyone holding the public key mint tokens.
        refused = [name for name in algorithms if name.lower() == "none" or name.upper().startswith("HS")]
        if refused:
            raise ValueError(f"refused: {', '.join(refused)}; use RS*, PS*, ES* or EdDSA")
        return algorithms

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if (self.auth_jwks_url is None) == (self.auth_jwks_file is None):
            raise ValueError("set exactly one of AUTH_JWKS_URL and AUTH_JWKS_FILE")
        if self.metrics_port == self.http_port:
            raise ValueError("METRICS_PORT must differ from HTTP_PORT (or be unset)")
        if self.db_pool_min_size > self.db_pool_max_size:
            raise ValueError("DB_POOL_MIN_SIZE must not exceed DB_POOL_MAX_SIZE")
        if self.consumer_heartbeat_interval_seconds * 3 > self.consumer_session_timeout_seconds:
            raise ValueError(
                "CONSUMER_HEARTBEAT_INTERVAL_SECONDS must be at most a third of "
                "CONSUMER_SESSION_TIMEOUT_SECONDS, or one lost heartbeat can cost a live member its "
                "partitions"
            )
        # One message's retries and the pause after an outage (the delay doubles each time) must
        # fit in the half of the poll interval a batch has left once its budget is spent.
        retrying = self.consumer_retry_backoff_seconds * (2**self.consumer_max_attempts - 1)
        if retrying > self.consumer_max_poll_interval_seconds / 2:
            raise ValueError(
                f"one message's retries take {retrying:g} s (CONSUMER_RETRY_BACKOFF_SECONDS doubled "
                "CONSUMER_MAX_ATTEMPTS times), more than half of CONSUMER_MAX_POLL_INTERVAL_SECONDS "
                f"({self.consumer_max_poll_interval_seconds:g} s): the group would take the consumer "
                "for stuck"
            )
        return self


SettingsT = TypeVar("SettingsT", bound=ServiceSettings)


class ConfigurationError(Exception):
    """The environment does not configure the service; the message names every bad setting."""


def load_settings(settings_class: type[SettingsT]) -> SettingsT:
    """Read the settings, or raise one error that names each bad environment variable."""
    try:
        return settings_class()
    except SettingsError as exc:
        # A list setting that is not JSON, e.g. CORS_ORIGINS=https://a.example: name it.
        field = re.search(r'field "(\w+)"', str(exc))
        variable = field[1].upper() if field else "a list setting"
        raise ConfigurationError(
            f'invalid configuration:\n  {variable}: not a JSON array (e.g. ["https://a.example"])'
        ) from None
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            message = error["msg"].removeprefix("Value error, ")
            variable = str(error["loc"][0]).upper() if error["loc"] else None
            lines.append(f"  {variable}: {message}" if variable else f"  {message}")
        raise ConfigurationError("invalid configuration:\n" + "\n".join(lines)) from None
