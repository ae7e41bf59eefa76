"""Numbered plain-SQL migrations, applied once each, in order, by one process at a time.

A migration is a file `NNN_description.sql` in a folder. Every replica runs the runner at start-up;
a PostgreSQL advisory lock makes them take turns, so the second replica finds the work done.
Each file runs in its own transaction together with the row that records it, so a failed
migration leaves nothing half-applied. An applied file that was edited afterwards is refused:
the database would no longer match the code that reads it.
"""

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from .db import Connection

log = logging.getLogger(__name__)

_FILE_NAME = re.compile(r"^(?P<version>\d+)_(?P<name>[a-z0-9_]+)\.sql$")
# An arbitrary constant that only this runner uses as its advisory-lock key.
_LOCK_KEY = 0x6D6372_6D6967  # "mcr" "mig"

_HISTORY_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    component  text        NOT NULL,
    version    integer     NOT NULL,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (component, version)
)
"""


class MigrationError(Exception):
    """The migration files or the recorded history are inconsistent."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def file_name(self) -> str:
        return f"{self.version:03d}_{self.name}.sql"

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def discover(folder: Path) -> list[Migration]:
    """The migrations in a folder, in version order; a misnamed or duplicate file is an error."""
    if not folder.is_dir():
        raise MigrationError(f"{folder} is not a folder of migrations")
    migrations: dict[int, Migration] = {}
    for path in sorted(folder.glob("*.sql")):
        match = _FILE_NAME.match(path.name)
        if match is None:
            raise MigrationError(f"{path}: migration files are named NNN_description.sql")
        version = int(match["version"])
        if version in migrations:
            raise MigrationError(f"{path}: version {version} is used twice in {folder}")
        migrations[version] = Migration(version, match["name"], path.read_text(encoding="utf-8"))
    return [migrations[version] for version in sorted(migrations)]


async def migrate(conn: Connection, component: str, folder: Path) -> list[Migration]:
    """Apply the folder's pending migrations for `component`; returns those it applied."""
    pending = discover(folder)
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
    try:
        await conn.execute(_HISTORY_TABLE)
        rows = await conn.fetch(
            "SELECT version, checksum FROM schema_migrations WHERE component = $1", component
        )
        applied = {row["version"]: row["checksum"] for row in rows}
        done: list[Migration] = []
        for migration in pending:
            recorded = applied.get(migration.version)
            if recorded is not None:
                if recorded != migration.checksum:
                    raise MigrationError(
                        f"{component} migration {migration.file_name} was changed "
                        "after it was applied; add a new migration instead"
                    )
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (component, version, name, checksum)"
                    " VALUES ($1, $2, $3, $4)",
                    component,
                    migration.version,
                    migration.name,
                    migration.checksum,
                )
            log.info("applied migration", extra={"component": component, "migration": migration.name})
            done.append(migration)
        return done
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
