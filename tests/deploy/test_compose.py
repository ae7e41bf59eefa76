"""docker-compose.yml, checked without Docker: against the Compose Specification's JSON schema, and
against what the services read (settings, ports, health endpoints, start order)."""

import json
import re
import runpy
import shutil
import subprocess
import sys
from collections.abc import Mapping
from importlib.resources import files
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema  # type: ignore[import-untyped]  # no stubs in the dev group
import pytest
import uvicorn
import yaml

from issuance.keys import load_keyring
from tests.deploy.conftest import IMAGE_VARIABLES, ROOT, SDK_VARIABLES, SERVICES, LoadSettings, SettingsSpec

COMPOSE_FILE = ROOT / "docker-compose.yml"
# The image's and the runtime's names for where keys live in the container.
KEYS_IN_CONTAINER = "/var/lib/microcred/issuer-keys"
# Long-running containers without a healthcheck, and why.
ALL_INTERFACES = "0.0.0.0"  # noqa: S104  (what a container must listen on)
NO_HEALTHCHECK = {
    # Distroless image: no shell and no HTTP client to ask its health_check extension with.
    "otel-collector",
}

Compose = dict[str, Any]


@pytest.fixture(scope="module")
def compose() -> Compose:
    document: Compose = yaml.safe_load(COMPOSE_FILE.read_text())
    return document


@pytest.fixture(scope="module")
def compose_schema() -> dict[str, Any]:
    # The Compose Specification's schema as check-jsonschema vendors it (refreshed with each of its
    # releases from the compose-spec repository); read from the installed package, never fetched.
    schema: dict[str, Any] = json.loads(
        (files("check_jsonschema") / "builtin_schemas" / "vendor" / "compose-spec.json").read_text()
    )
    return schema


def _env_file(path: str) -> dict[str, str]:
    values = {}
    for line in (ROOT / path).read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value
    return values


def _env_files(service: Mapping[str, Any]) -> list[str]:
    entries = service.get("env_file", [])
    entries = [entries] if isinstance(entries, str | dict) else entries
    return [entry if isinstance(entry, str) else entry["path"] for entry in entries]


def environment(service: Mapping[str, Any]) -> dict[str, str]:
    """What the container gets: its env files, then `environment` (which wins, as in Compose)."""
    values: dict[str, str] = {}
    for path in _env_files(service):
        values.update(_env_file(path))
    given = service.get("environment", {})
    if isinstance(given, list):
        given = dict(entry.split("=", 1) for entry in given)
    values.update({name: str(value) for name, value in given.items()})
    return values


def test_compose_file_follows_the_compose_specification(
    compose: Compose, compose_schema: dict[str, Any]
) -> None:
    validator = jsonschema.Draft202012Validator(
        compose_schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )
    errors = [
        f"{'/'.join(map(str, error.path))}: {error.message}" for error in validator.iter_errors(compose)
    ]
    assert not errors, "\n".join(errors)
    assert "version" not in compose, "the Compose Specification has no `version`"


def _compose_command() -> list[str] | None:
    """`docker compose` where the plugin is installed, else a standalone `docker-compose` v2."""
    candidates = []
    if docker := shutil.which("docker"):
        candidates.append([docker, "compose"])
    if standalone := shutil.which("docker-compose"):
        candidates.append([standalone])
    for command in candidates:
        version = subprocess.run(  # noqa: S603  (the Compose CLI found on PATH)
            [*command, "version", "--short"], capture_output=True, text=True, check=False
        )
        # 1.x is the retired Python docker-compose, which predates the Compose Specification.
        if version.returncode == 0 and not version.stdout.startswith("1."):
            return command
    return None


def test_docker_compose_itself_accepts_the_file() -> None:
    # Compose's own loader (interpolation, merge keys, extends, references between services) where a
    # Compose v2 CLI exists; it needs no engine for `config`. The schema test above runs everywhere.
    command = _compose_command()
    if command is None:
        pytest.skip("no Docker Compose v2 CLI on this machine (the schema test covers the file)")
    result = subprocess.run(  # noqa: S603  (compose on our own file)
        [*command, "--file", str(COMPOSE_FILE), "config", "--quiet"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_the_schema_would_catch_a_misspelt_key(compose: Compose, compose_schema: dict[str, Any]) -> None:
    broken = {**compose, "services": {**compose["services"], "kafka": {**compose["services"]["kafka"]}}}
    broken["services"]["kafka"]["helthcheck"] = broken["services"]["kafka"].pop("healthcheck")
    with pytest.raises(jsonschema.ValidationError, match="helthcheck"):
        jsonschema.validate(broken, compose_schema, cls=jsonschema.Draft202012Validator)


def test_every_file_the_compose_file_names_exists(compose: Compose) -> None:
    for name, service in compose["services"].items():
        for path in _env_files(service):
            assert (ROOT / path).is_file(), f"{name}: env file {path} is missing"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name}: {source} is missing"


@pytest.mark.parametrize("service", SERVICES)
def test_each_service_runs_from_the_image_with_its_settings(
    compose: Compose, settings_specs: Mapping[str, SettingsSpec], service: str
) -> None:
    spec = settings_specs[service]
    container = compose["services"][service]
    given = environment(container)
    assert container["build"]["context"] == "."
    assert given["SERVICE"] == service
    missing = spec.required - set(given)
    assert not missing, f"{service} cannot start without {sorted(missing)}"
    unknown = set(given) - spec.reads - SDK_VARIABLES - IMAGE_VARIABLES
    assert not unknown, f"{service} reads no {sorted(unknown)} (a typo?)"
    assert given["AUTH_JWKS_URL"].startswith("http://dev-issuer:")


@pytest.mark.parametrize("service", SERVICES)
def test_each_service_starts_with_the_compose_environment(
    compose: Compose,
    settings_specs: Mapping[str, SettingsSpec],
    image_environment: dict[str, str],
    load_settings: LoadSettings,
    service: str,
    tmp_path: Path,
) -> None:
    reads = settings_specs[service].reads
    image = {name: value for name, value in image_environment.items() if name in reads}
    given = {**image, **environment(compose["services"][service])}
    if "ISSUER_KEYS_DIR" in given:
        # The volume the one-shot `issuer-keys` fills: run its command against a folder here.
        assert given["ISSUER_KEYS_DIR"] == KEYS_IN_CONTAINER
        given["ISSUER_KEYS_DIR"] = str(_generate_issuer_keys(compose, tmp_path))
    settings = load_settings(service, given)
    assert settings.http_host == ALL_INTERFACES, "the image sets HTTP_HOST: reachable from other containers"
    assert str(settings.database_url).endswith(f"@postgres:5432/{service}")


def _generate_issuer_keys(compose: Compose, tmp_path: Path) -> Path:
    command = compose["services"]["issuer-keys"]["command"]
    assert command[:2] == ["python", "-c"]
    script = command[2].replace(KEYS_IN_CONTAINER, str(tmp_path))
    # As root in the container; the ownership it hands over is not this test's business.
    script = script.replace("os.chown(path, 10001, 10001)", "pass")
    exec(compile(script, "issuer-keys", "exec"), {})  # noqa: S102  (our own compose command)
    load_keyring(tmp_path)
    return tmp_path


@pytest.mark.parametrize("service", SERVICES)
def test_ports_and_healthchecks_agree_with_the_service(
    compose: Compose, settings_specs: Mapping[str, SettingsSpec], service: str
) -> None:
    container = compose["services"][service]
    given = environment(container)
    port = int(given["HTTP_PORT"])
    assert port == settings_specs[service].default_port, "the same port as `make up` and the README"
    # /metrics on a port of its own, published apart (9101 catalog ... 9105 notifications, as the
    # README says).
    metrics = int(given["METRICS_PORT"])
    assert metrics != port
    host_metrics = 9101 + SERVICES.index(service)
    assert container["ports"] == [f"127.0.0.1:{port}:{port}", f"127.0.0.1:{host_metrics}:{metrics}"]
    probe = " ".join(container["healthcheck"]["test"])
    assert "os.environ['HTTP_PORT']" in probe
    assert "/health/ready" in probe


@pytest.mark.parametrize("service", SERVICES)
def test_each_service_waits_for_kafka_postgres_and_its_migrations(compose: Compose, service: str) -> None:
    services = compose["services"]
    depends_on = services[service]["depends_on"]
    assert depends_on["kafka"]["condition"] == "service_healthy"
    assert depends_on["postgres"]["condition"] == "service_healthy"
    assert depends_on["dev-issuer"]["condition"] == "service_healthy"
    assert depends_on[f"{service}-migrate"]["condition"] == "service_completed_successfully"
    migrate = services[f"{service}-migrate"]
    assert migrate["command"] == ["python", "/app/migrate.py", service]
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert environment(migrate)["DATABASE_URL"] == environment(services[service])["DATABASE_URL"]


def test_healthchecks_on_everything_that_runs_and_the_right_wait_conditions(compose: Compose) -> None:
    services = compose["services"]
    one_shots = {name for name, service in services.items() if service.get("restart") == "no"}
    for name, service in services.items():
        healthcheck = service.get("healthcheck", {})
        if name in one_shots:
            assert healthcheck.get("disable") is True, f"{name}: a one-shot has nothing to probe"
        elif name not in NO_HEALTHCHECK:
            assert healthcheck.get("test"), f"{name} has no healthcheck"
        for dependency, condition in service.get("depends_on", {}).items():
            expected = (
                "service_completed_successfully"
                if dependency in one_shots
                else "service_started"
                if dependency in NO_HEALTHCHECK
                else "service_healthy"
            )
            assert condition["condition"] == expected, f"{name} -> {dependency}"


def test_development_secrets_agree_and_are_marked(compose: Compose) -> None:
    postgres = environment(compose["services"]["postgres"])
    for service in SERVICES:
        url = urlsplit(environment(compose["services"][service])["DATABASE_URL"])
        assert (url.username, url.path) == (service, f"/{service}"), "each service its own role and database"
        assert url.password == postgres[f"{service.upper()}_DB_PASSWORD"]
    billing = environment(compose["services"]["billing"])
    simulator = environment(compose["services"]["payment-simulator"])
    assert billing["PAYMENT_WEBHOOK_SECRET"] == simulator["SIMULATOR_WEBHOOK_SECRET"]
    for env_file in (ROOT / "deploy" / "compose" / "env").glob("*.env"):
        assert env_file.read_text().startswith("# DEVELOPMENT ONLY"), env_file
        for line in env_file.read_text().splitlines():
            if "PASSWORD=" in line or "SECRET=" in line or ":dev-only" in line:
                assert "dev-only" in line, f"{env_file.name}: {line}"


def test_the_postgres_init_script_creates_every_service_database() -> None:
    script = (ROOT / "deploy" / "compose" / "postgres-init" / "10-create-databases.sh").read_text()
    loop = re.search(r"^for service in (.+); do$", script, re.MULTILINE)
    assert loop is not None
    assert tuple(loop[1].split()) == SERVICES
    assert (
        ROOT / "deploy" / "compose" / "postgres-init" / "10-create-databases.sh"
    ).stat().st_mode & 0o111, "executable, or the postgres entrypoint sources it into its own shell"


def test_the_auxiliaries_listen_where_the_services_look(compose: Compose) -> None:
    services = compose["services"]
    simulator = environment(services["payment-simulator"])
    billing = environment(services["billing"])
    assert billing["PAYMENT_PROVIDER_URL"] == f"http://payment-simulator:{simulator['SIMULATOR_PORT']}"
    assert simulator["SIMULATOR_WEBHOOK_URL"] == f"http://billing:{billing['HTTP_PORT']}/webhooks/provider"
    notifications = environment(services["notifications"])
    sink = environment(services["mail-sink"])
    assert services["mail-sink"]["command"] == ["python", "-m", "notifications.smtp_sink"]
    assert (notifications["SMTP_HOST"], notifications["SMTP_PORT"]) == ("mail-sink", sink["SINK_SMTP_PORT"])
    assert sink["SINK_HOST"] == ALL_INTERFACES
    assert services["issuance"]["volumes"] == [f"issuer-keys:{KEYS_IN_CONTAINER}:ro"]
    assert services["issuer-keys"]["volumes"] == [f"issuer-keys:{KEYS_IN_CONTAINER}"]
    # The dev issuer names itself http://127.0.0.1:<port> in its tokens (scripts/dev_issuer.py).
    assert environment(services["catalog"])["AUTH_ISSUER"] == "http://127.0.0.1:8000"
    assert services["dev-issuer"]["ports"] == ["127.0.0.1:8000:8000"]


def test_the_dev_issuer_container_serves_the_dev_issuer_on_every_interface(
    compose: Compose, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The container's layout, from the compose file's own bind mounts.
    container = compose["services"]["dev-issuer"]
    for mount in container["volumes"]:
        source, target, _ = mount.split(":")
        destination = tmp_path / Path(target).relative_to("/")
        if (ROOT / source).is_dir():
            shutil.copytree(ROOT / source, destination)
        else:
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / source, destination)
    served: list[dict[str, Any]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: served.append(options))
    monkeypatch.setattr(sys, "path", list(sys.path))
    imported = sys.modules.pop("dev_issuer", None)
    try:
        script = tmp_path / Path(container["command"][1]).relative_to("/")
        runpy.run_path(str(script), run_name="__main__")
    finally:
        # Other tests import scripts/dev_issuer.py itself, not this copy.
        sys.modules.pop("dev_issuer", None)
        if imported is not None:
            sys.modules["dev_issuer"] = imported
    (options,) = served
    assert options["host"] == ALL_INTERFACES
    assert container["ports"] == [f"127.0.0.1:{options['port']}:{options['port']}"]
    # Its key went where compose keeps a tmpfs.
    (keys,) = container["tmpfs"]
    assert (tmp_path / Path(keys).relative_to("/") / "dev-issuer" / "signing-key.pem").is_file()
