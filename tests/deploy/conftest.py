"""What the deployment tests compare the files with: the settings each service reads.

Nothing here needs Docker, a cluster, Kafka or PostgreSQL: the compose file, the Dockerfile and the
rendered Kubernetes manifests are read as files and checked against schemas and against the code.
"""

import importlib
import re
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydantic import AliasChoices

from microcred_runtime import ServiceSettings

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("catalog", "enrollment", "billing", "issuance", "notifications")
# Read by the OpenTelemetry SDK (libs/runtime telemetry.py), not by a Settings class.
SDK_VARIABLES = frozenset({"OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG"})
# Read by the image's command and healthcheck (Dockerfile), not by the service.
IMAGE_VARIABLES = frozenset({"SERVICE"})


@dataclass(frozen=True)
class SettingsSpec:
    """The environment variables a service reads, and those it cannot start without."""

    settings_class: type[ServiceSettings]
    reads: frozenset[str]
    required: frozenset[str]

    @property
    def default_port(self) -> int:
        port = self.settings_class.model_fields["http_port"].default
        assert isinstance(port, int)
        return port


def _variables(settings_class: type[ServiceSettings]) -> dict[str, bool]:
    """Each variable the class reads, and whether it is required (pydantic-settings' naming)."""
    prefix = str(settings_class.model_config.get("env_prefix", ""))
    variables: dict[str, bool] = {}
    for name, field in settings_class.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, str):
            names = [alias]
        elif isinstance(alias, AliasChoices):
            names = [choice for choice in alias.choices if isinstance(choice, str)]
        else:
            names = [field.alias or name]
        for variable in names:
            variables[(prefix + variable).upper()] = field.is_required()
    return variables


@pytest.fixture(scope="session")
def settings_specs() -> Mapping[str, SettingsSpec]:
    specs = {}
    for service in SERVICES:
        settings_class = importlib.import_module(f"{service}.settings").Settings
        variables = _variables(settings_class)
        specs[service] = SettingsSpec(
            settings_class,
            reads=frozenset(variables),
            required=frozenset(name for name, required in variables.items() if required),
        )
    return specs


LoadSettings = Callable[[str, Mapping[str, str]], ServiceSettings]


@pytest.fixture
def load_settings(
    settings_specs: Mapping[str, SettingsSpec], monkeypatch: pytest.MonkeyPatch
) -> LoadSettings:
    """Build a service's Settings from exactly the given environment, as the process would."""

    def load(service: str, environment: Mapping[str, str]) -> ServiceSettings:
        spec = settings_specs[service]
        with monkeypatch.context() as patch:
            for variable in spec.reads:
                patch.delenv(variable, raising=False)
            for variable, value in environment.items():
                patch.setenv(variable, value)
            return spec.settings_class()

    return load


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str


def dockerfile_stages() -> dict[str, list[Instruction]]:
    """The Dockerfile's instructions by stage name (comments dropped, continuations joined)."""
    text = re.sub(r"\\\n(\s*#[^\n]*\n)*", " ", (ROOT / "Dockerfile").read_text())
    stages: dict[str, list[Instruction]] = {"": []}
    current = ""
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        keyword, _, arguments = line.strip().partition(" ")
        if keyword.upper() == "FROM":
            current = arguments.split(" AS ")[-1].strip() if " AS " in arguments else arguments
            stages[current] = []
        stages[current].append(Instruction(keyword.upper(), arguments.strip()))
    return stages


@pytest.fixture(scope="session")
def image_environment() -> dict[str, str]:
    """The ENV of the image's final stage: what every container starts with."""
    final = list(dockerfile_stages().values())[-1]
    environment: dict[str, str] = {}
    for instruction in final:
        if instruction.keyword == "ENV":
            for pair in shlex.split(instruction.arguments):
                name, _, value = pair.partition("=")
                environment[name] = value
    return environment
