"""A real PostgreSQL database for the tests of issuance's use cases under concurrency.

The server comes from `POSTGRES_URL`, else the project's own (`scripts/infra.py`, started if it is
not running); each test gets a throwaway database with issuance's migrations, dropped afterwards.
"""

import os
import sys
import uuid
import warnings
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from opentelemetry import trace

from issuance.keys import generate_key, load_keyring
from issuance.main import service
from issuance.service import Platform, issue_course_credentials
from microcred_events import (
    CompletedBy,
    CourseCompleted,
    CoursePublished,
    CourseSnapshot,
    Learner,
    PathwaySnapshot,
    example_data,
)
from microcred_runtime import Connection, Delivery

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """A role that may create databases."""
    if os.environ.get("POSTGRES_URL"):
        return os.environ["POSTGRES_URL"]
    sys.path.insert(0, str(ROOT / "scripts"))
    import infra

    return infra.ensure_up(kafka=False).postgres_url


@pytest.fixture
async def database(postgres_url: str) -> AsyncIterator[str]:
    """The URL of a new database holding issuance's tables."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    base, _, _ = postgres_url.rpartition("/")
    url = f"{base}/{name}"
    admin = await asyncpg.connect(postgres_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        conn = await asyncpg.connect(url)
        try:
            await service.migrate(conn)
        finally:
            await conn.close()
        yield url
    finally:
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        except asyncpg.PostgresError as exc:
            warnings.warn(f"could not drop test database {name}: {exc}", stacklevel=1)
        await admin.close()


@pytest.fixture
async def pool(database: str) -> AsyncIterator[asyncpg.Pool]:
    async with asyncpg.create_pool(database, min_size=1, max_size=4) as opened:
        yield opened


@pytest.fixture
def platform(tmp_path: Path) -> Platform:
    generate_key(tmp_path / "keys", "key-1")
    return Platform("https://issuance.test", load_keyring(tmp_path / "keys"))


def a_course(version: int = 1) -> CourseSnapshot:
    return CourseSnapshot.model_validate(
        {**example_data(CourseSnapshot), "course_id": str(uuid.uuid4()), "version": version}
    )


def a_pathway(*courses: CourseSnapshot, version: int = 1) -> PathwaySnapshot:
    data: dict[str, Any] = example_data(PathwaySnapshot)
    return PathwaySnapshot.model_validate(
        {
            **data,
            "pathway_id": str(uuid.uuid4()),
            "version": version,
            "course_ids": [str(course.course_id) for course in courses],
            "achievement": {**data["achievement"], "achievement_id": str(uuid.uuid4())},
        }
    )


def a_learner() -> Learner:
    return Learner(learner_id=uuid.uuid4(), email="ada@example.org", display_name="Ada Lovelace")


def a_completion(course: CourseSnapshot, learner: Learner) -> CourseCompleted:
    return CourseCompleted(
        enrollment_id=uuid.uuid4(),
        learner=learner,
        course_id=course.course_id,
        course_version=course.version,
        completed_at=datetime.now(UTC),
        score=90.0,
        evidence_url=None,
        completed_by=CompletedBy.STAFF,
    )


def published(course: CourseSnapshot) -> CoursePublished:
    return CoursePublished(course=course, published_at=datetime.now(UTC))


async def mint(conn: Connection, platform: Platform, *completions: CourseCompleted) -> None:
    """Apply completions as the consumer does, as one batch (each delivered under the current span)."""
    span = trace.get_current_span()
    await issue_course_credentials(conn, platform, [Delivery(completion, span) for completion in completions])
