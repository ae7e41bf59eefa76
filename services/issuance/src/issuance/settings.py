from pathlib import Path
from typing import Annotated, Self

from pydantic import Field, HttpUrl, field_validator, model_validator

from microcred_runtime import ServiceSettings

from .domain import CascadePolicy
from .keys import KeyRingError, load_keyring


class Settings(ServiceSettings):
    http_port: int = Field(default=8004, ge=1, le=65535)
    issuer_keys_dir: Annotated[
        Path,
        Field(
            description=(
                "Folder of the platform's Ed25519 signing keys (`<key_id>.pem`, plus an optional "
                "`active` file naming the signing key), e.g. a mounted Kubernetes Secret."
            )
        ),
    ]
    pathway_cascade: CascadePolicy = Field(
        default=CascadePolicy.REVOKE,
        description=(
            "What revoking a course credential does to the pathway credentials that stand on it: "
            "`revoke` them too, or `suspend` them (staff may reinstate one). Either way with the reason, "
            "in the same transaction."
        ),
    )
    public_base_url: HttpUrl = Field(
        default=HttpUrl("http://127.0.0.1:8004"),
        description=(
            "Where this service is reachable publicly: credential ids, status lists and the did:web "
            "identifiers of issuers are made from it, so it must not change once credentials exist."
        ),
    )
    verify_trusted_hosts: list[str] = Field(
        default_factory=list,
        description=(
            "Hosts (`name` or `name:port`) whose DID documents and status lists POST /verify may fetch, "
            "over HTTPS; nothing else is ever fetched."
        ),
    )
    verify_fetch_timeout_seconds: float = Field(
        default=3.0, gt=0, le=30, description="Time a fetch from a trusted host may take, in all."
    )
    verify_fetch_max_bytes: int = Field(
        default=256 * 1024, ge=1024, description="Largest document fetched from a trusted host."
    )
    verify_max_body_bytes: int = Field(
        default=256 * 1024, ge=1024, description="Largest credential POST /verify accepts."
    )
    verify_workers: int = Field(
        default=2,
        ge=1,
        le=64,
        description=(
            "Processes that check the proofs POST /verify is sent, off the event loop: each takes one "
            "CPU while it works, and some 150 MB."
        ),
    )
    verify_max_concurrent: int = Field(
        default=8,
        ge=1,
        le=10_000,
        description=(
            "Verifications admitted at once (checking, or waiting for a worker); one more is refused "
            "with a 503 `verifier-busy` and Retry-After."
        ),
    )
    issuance_sweep_interval_seconds: float = Field(
        default=30.0,
        ge=1,
        le=3600,
        allow_inf_nan=False,
        description=(
            "How often the sweeper looks for what a race between replicas left behind (a parked "
            "completion whose course version is held, a missing pathway credential) and finishes it."
        ),
    )
    issuance_sweep_lookback_seconds: float = Field(
        default=900.0,
        ge=2,
        le=7 * 24 * 3600,
        allow_inf_nan=False,
        description=(
            "How long before the start of the sweeper's last complete pass each pass looks at course "
            "credentials issued, for learners missing a pathway credential: a credential is issued "
            "before its transaction commits, so at least CONSUMER_MAX_POLL_INTERVAL_SECONDS."
        ),
    )
    issuance_sweep_full_interval_seconds: float = Field(
        default=3600.0,
        ge=1,
        le=7 * 24 * 3600,
        allow_inf_nan=False,
        description=(
            "How often a replica's sweeper looks at every learner (a process's first pass does too), "
            "one replica at a time; at least the interval."
        ),
    )

    @field_validator("issuer_keys_dir")
    @classmethod
    def _loads(cls, directory: Path) -> Path:
        # Refused at start-up rather than at the first credential: a service that cannot sign
        # would take completions off the topic and dead-letter every one of them.
        try:
            load_keyring(directory)
        except KeyRingError as exc:
            raise ValueError(f"cannot load the issuer keys from {directory}: {exc}") from None
        return directory

    @field_validator("verify_trusted_hosts")
    @classmethod
    def _hosts(cls, hosts: list[str]) -> list[str]:
        for host in hosts:
            if not host or any(character in host for character in "/@?#\\ ") or host != host.strip():
                raise ValueError(f"{host!r} is not a host name (with an optional :port)")
        return [host.lower() for host in hosts]

    @model_validator(mode="after")
    def _sweep_overlaps(self) -> Self:
        # A course credential's issued_at is taken when it is minted, and a consumer's batch may
        # commit it up to about a poll interval later: a pass that started in between did not see
        # it, so the next must look back at least that far before that pass's start.
        if self.issuance_sweep_lookback_seconds < self.consumer_max_poll_interval_seconds:
            raise ValueError(
                "ISSUANCE_SWEEP_LOOKBACK_SECONDS must be at least CONSUMER_MAX_POLL_INTERVAL_SECONDS"
            )
        if self.issuance_sweep_full_interval_seconds < self.issuance_sweep_interval_seconds:
            raise ValueError(
                "ISSUANCE_SWEEP_FULL_INTERVAL_SECONDS must be at least ISSUANCE_SWEEP_INTERVAL_SECONDS"
            )
        return self

    @property
    def base_url(self) -> str:
        """The public base URL without a trailing slash, as URLs are built from it."""
        return str(self.public_base_url).rstrip("/")
