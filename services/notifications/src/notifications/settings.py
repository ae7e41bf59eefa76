import enum
from email.utils import parseaddr
from typing import Self

from pydantic import Field, IPvAnyNetwork, SecretStr, field_validator, model_validator

from microcred_runtime import ServiceSettings
from microcred_runtime.settings import ConsumerBatchSize, ConsumerFetchMaxWait, ConsumerFetchMinBytes


class SmtpSecurity(enum.StrEnum):
    NONE = "none"
    STARTTLS = "starttls"
    TLS = "tls"


class Settings(ServiceSettings):
    http_port: int = Field(default=8005, ge=1, le=65535)
    # Nobody waits on a notice to the second, and notifications hears of every step of every
    # journey (two events per credential): it takes them in large batches, half a second apart
    # at most, rather than as soon as each arrives. At 390 credentials/s offered on two CPUs
    # (`make bench`, the pipeline shortened) that cut p99 report -> credential from 0.85-1.46 s
    # to 0.61-0.71 s: the CPU its small batches took was the pipeline's.
    consumer_batch_size: ConsumerBatchSize = 500
    consumer_fetch_max_wait_seconds: ConsumerFetchMaxWait = 0.5
    consumer_fetch_min_bytes: ConsumerFetchMinBytes = 256 * 1024

    smtp_host: str = Field(default="127.0.0.1", min_length=1, description="The SMTP server mail goes to.")
    smtp_port: int = Field(default=1025, ge=1, le=65535, description="1025 is the local sink's.")
    smtp_from: str = Field(
        default="microcred <no-reply@microcred.example>",
        description="The From of every email: an address, optionally with a display name.",
    )
    smtp_timeout_seconds: float = Field(
        default=10.0, gt=0, description="Longest one email may take to hand over, connection included."
    )
    smtp_security: SmtpSecurity = Field(
        default=SmtpSecurity.NONE,
        description="`none` (the local sink), `starttls` (upgrade, usually port 587) or `tls` (port 465).",
    )
    smtp_username: str | None = Field(default=None, description="Log in with this user, if set.")
    smtp_password: SecretStr | None = Field(default=None, description="With SMTP_USERNAME.")
    email_concurrency: int = Field(
        default=16,
        ge=1,
        le=100,
        description="Emails in flight at once (a claim takes half of them at least).",
    )

    webhook_timeout_seconds: float = Field(
        default=10.0, gt=0, description="Longest a subscriber may take to answer one delivery."
    )
    webhook_concurrency: int = Field(default=8, ge=1, le=200, description="Webhooks in flight at once.")
    webhook_allowed_hosts: list[str] = Field(
        default=["localhost", "127.0.0.1", "::1"],
        description=(
            "Host patterns (`*` wildcards, e.g. `*.partner.example`) webhook URLs may point at. The "
            "default allows only this machine, for local runs; in production list the subscribers' "
            "hosts, so nobody can aim the service at internal systems. A bare `*` (any host) is refused."
        ),
    )
    webhook_allowed_private_networks: list[IPvAnyNetwork] = Field(
        default=[],
        description=(
            "For development and tests only: networks (CIDR, e.g. `127.0.0.0/8`) webhooks may reach "
            "although they are loopback, private, link-local or reserved. Empty by default: a webhook "
            "host must resolve to public addresses only. Cloud metadata, multicast and unspecified "
            "addresses are refused whatever this says."
        ),
    )

    delivery_max_attempts: int = Field(
        default=8, ge=1, le=100, description="Attempts per email or webhook before it is parked as dead."
    )
    delivery_retry_base_seconds: float = Field(
        default=5.0, gt=0, description="Attempt n is retried after a random delay up to base * 2^(n-1)."
    )
    delivery_retry_cap_seconds: float = Field(default=3600.0, gt=0, description="The most that delay gets.")
    delivery_poll_interval_seconds: float = Field(
        default=5.0, gt=0, description="Safety-net poll; new deliveries wake the workers at once (NOTIFY)."
    )
    delivery_drain_seconds: float = Field(
        default=10.0,
        gt=0,
        description="On shutdown, how long attempts in flight may finish before they are released.",
    )

    @field_validator("smtp_from")
    @classmethod
    def _an_address(cls, value: str) -> str:
        # Refused here rather than on the first send: a header cannot carry a line break.
        _, address = parseaddr(value)
        username, at, domain = address.rpartition("@")
        if not (at and username and "." in domain) or "\n" in value or "\r" in value:
            raise ValueError("must be an email address, e.g. microcred <no-reply@microcred.example>")
        return value

    @field_validator("webhook_allowed_hosts")
    @classmethod
    def _patterns(cls, patterns: list[str]) -> list[str]:
        if any(not pattern.strip() for pattern in patterns):
            raise ValueError("host patterns must not be empty")
        for pattern in patterns:
            if not pattern.strip("*?.[]!"):
                raise ValueError(
                    f"WEBHOOK_ALLOWED_HOSTS must name the subscribers' hosts, not {pattern!r}, which "
                    "allows any host: list them (e.g. `*.partner.example`)"
                )
        return patterns

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if (self.smtp_username is None) != (self.smtp_password is None):
            raise ValueError("set both SMTP_USERNAME and SMTP_PASSWORD, or neither")
        if self.delivery_retry_base_seconds > self.delivery_retry_cap_seconds:
            raise ValueError("DELIVERY_RETRY_BASE_SECONDS must not exceed DELIVERY_RETRY_CAP_SECONDS")
        return self
