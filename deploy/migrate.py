"""Bring one service's database up to date, and nothing else: `python migrate.py <service>`.

The image runs it (as /app/migrate.py) before a service starts: the compose one-shot
`<service>-migrate` and the Kubernetes init container. It reads DATABASE_URL only, so it needs
none of the service's other settings. Running it twice, or beside a starting replica, is safe: the
runner applies each migration once, under a PostgreSQL advisory lock (`Service.migrate`); the
service repeats the same check at start-up and finds nothing left to do.
"""

import asyncio
import importlib
import os
import sys
from typing import Any

import asyncpg

from microcred_runtime import Service
from microcred_runtime.telemetry import configure_logging

SERVICES = ("catalog", "enrollment", "billing", "issuance", "notifications")
USAGE = f"usage: python migrate.py {{{','.join(SERVICES)}}}  (with DATABASE_URL set)"


def service_named(name: str) -> Service[Any]:
    """The service's own description, as its process builds it (`<name>.main.service`)."""
    if name not in SERVICES:
        raise SystemExit(f"unknown service {name!r}\n{USAGE}")
    service: Service[Any] = importlib.import_module(f"{name}.main").service
    return service


async def migrate(name: str, database_url: str) -> None:
    service = service_named(name)
    conn = await asyncpg.connect(database_url)
    try:
        await service.migrate(conn)
    finally:
        await conn.close()


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise SystemExit(USAGE)
    database_url = os.environ.get("DATABASE_URL")
    if not database_url:
        raise SystemExit(f"DATABASE_URL is not set\n{USAGE}")
    configure_logging(f"{argv[0]}-migrate", os.environ.get("LOG_LEVEL", "INFO"))
    asyncio.run(migrate(argv[0], database_url))


if __name__ == "__main__":
    main(sys.argv[1:])
