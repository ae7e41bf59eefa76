# syntax=docker/dockerfile:1.7
# One image for every microcred service; the service is chosen when the container starts:
#
#   docker build -t microcred .
#   docker run -e SERVICE=catalog -e DATABASE_URL=... -e KAFKA_BOOTSTRAP_SERVERS=... microcred
#
# The same image runs the migrations alone (`python /app/migrate.py <service>`) and the payment
# simulator (`python -m billing.simulator`). Built from uv.lock only (`--frozen`): no resolution
# happens here, so a build gives the versions the tests ran with.

# Pinned by version; release builds should pin digests too (`docker buildx imagetools inspect`).
ARG PYTHON_IMAGE=python:3.11-slim-trixie
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.9

FROM ${UV_IMAGE} AS uv

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build

COPY --from=uv /uv /bin/uv
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/app/.venv
WORKDIR /src

# Third-party dependencies first, from the lockfile and the members' pyproject files alone, so this
# layer is rebuilt only when a dependency changes, not on every code change.
COPY pyproject.toml uv.lock ./
COPY libs/events/pyproject.toml libs/events/
COPY libs/runtime/pyproject.toml libs/runtime/
COPY services/catalog/pyproject.toml services/catalog/
COPY services/enrollment/pyproject.toml services/enrollment/
COPY services/billing/pyproject.toml services/billing/
COPY services/issuance/pyproject.toml services/issuance/
COPY services/notifications/pyproject.toml services/notifications/
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --all-packages --no-install-workspace

# Then the workspace itself, installed as wheels (--no-editable): the runtime stage needs the
# virtual environment only, not the source tree.
COPY libs libs
COPY services services
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --all-packages --no-editable

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

# A fixed numeric UID/GID: Kubernetes' runAsNonRoot can only verify a numeric user.
RUN groupadd --system --gid 10001 microcred \
 && useradd --system --uid 10001 --gid microcred --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin microcred

COPY --from=build /app/.venv /app/.venv
COPY deploy/migrate.py /app/migrate.py

# HTTP_HOST: a container is reached through its own address, never through its loopback.
# No .pyc writes at run time (the root filesystem is read-only in Kubernetes): uv compiled them.
ENV PATH=/app/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONFAULTHANDLER=1 \
    HTTP_HOST=0.0.0.0
WORKDIR /app
USER 10001:10001

# The services' default ports (HTTP_PORT overrides them).
EXPOSE 8001 8002 8003 8004 8005

# uvicorn turns SIGTERM into a graceful shutdown (SHUTDOWN_GRACE_SECONDS, 20 s by default).
STOPSIGNAL SIGTERM

# Liveness only: readiness (/health/ready) also needs Kafka and PostgreSQL, which is the
# orchestrator's business. No curl in the image: Python asks. The port is HTTP_PORT, or else the
# service's own default read from its Settings.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import importlib, os, urllib.request; port = os.environ.get('HTTP_PORT') or importlib.import_module(os.environ['SERVICE'] + '.settings').Settings.model_fields['http_port'].default; urllib.request.urlopen(f'http://127.0.0.1:{port}/health/live', timeout=4)"]

# `exec` so that the service, not the shell, is PID 1 and receives SIGTERM.
CMD ["sh", "-c", "exec python -m \"${SERVICE:?set SERVICE to catalog, enrollment, billing, issuance or notifications}\""]
