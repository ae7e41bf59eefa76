"""Wiring only: what the issuance service is made of."""

import dataclasses
from pathlib import Path

from fastapi import FastAPI

from microcred_runtime import Service, load_settings

from . import api, subscribers, sweeper
from .keys import load_keyring
from .proof_workers import ProofWorkers
from .service import Platform
from .settings import Settings
from .verification import Trust, http_fetcher


@dataclasses.dataclass(frozen=True)
class IssuanceService(Service[Settings]):
    """A Service whose subscribers and routes are bound to the keys its settings name."""

    def create_app(self, settings: Settings | None = None) -> FastAPI:
        settings = settings or load_settings(Settings)
        # Loaded once per process: a rotated key (a new file and `active` in ISSUER_KEYS_DIR) signs
        # after a restart, e.g. the rollout that follows updating the Kubernetes Secret.
        platform = Platform(
            settings.base_url,
            load_keyring(settings.issuer_keys_dir),
            pathway_cascade=settings.pathway_cascade,
        )
        trust = Trust(
            frozenset(settings.verify_trusted_hosts),
            settings.verify_fetch_timeout_seconds,
            settings.verify_fetch_max_bytes,
        )
        workers = ProofWorkers(settings.verify_workers, settings.verify_max_concurrent)
        bound = dataclasses.replace(
            self,
            subscriptions=subscribers.subscriptions(platform),
            background=[sweeper.sweeping(platform), workers.running],
        )
        app = Service.create_app(bound, settings)
        app.state.platform = platform
        app.state.trust = trust
        app.state.fetch = http_fetcher(trust)
        app.state.proof_workers = workers
        return app


service = IssuanceService(
    name="issuance",
    settings_class=Settings,
    migrations=Path(__file__).parent / "migrations",
    routers=[api.credentials, api.learners, api.published, api.verification],
    description=(
        "Mints, signs (Data Integrity eddsa-rdfc-2022 and VC-JWT), records and publishes Open Badges 3.0 "
        "credentials; revocation through W3C Bitstring Status Lists; verifies any OB 3.0 credential."
    ),
)


def create_app(settings: Settings | None = None) -> FastAPI:
    return service.create_app(settings)
