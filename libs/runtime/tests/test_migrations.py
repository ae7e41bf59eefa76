from pathlib import Path

import pytest

from microcred_runtime.migrations import Migration, MigrationError, discover, migrate

from .conftest import FakeConnection


def write(folder: Path, name: str, sql: str = "SELECT 1;") -> None:
    (folder / name).write_text(sql, encoding="utf-8")


def test_migrations_are_ordered_by_number_not_by_name(tmp_path: Path) -> None:
    write(tmp_path, "10_add_index.sql", "CREATE INDEX i ON t (c);")
    write(tmp_path, "2_add_column.sql", "ALTER TABLE t ADD c int;")
    write(tmp_path, "001_create_table.sql", "CREATE TABLE t ();")
    write(tmp_path, "README.md", "not a migration")

    migrations = discover(tmp_path)

    assert [(m.version, m.name) for m in migrations] == [
        (1, "create_table"),
        (2, "add_column"),
        (10, "add_index"),
    ]
    assert migrations[0].sql == "CREATE TABLE t ();"


@pytest.mark.parametrize("name", ["create_table.sql", "001-create-table.sql", "001_Create.sql", "001_.sql"])
def test_a_misnamed_file_is_refused(tmp_path: Path, name: str) -> None:
    write(tmp_path, "001_create_table.sql")
    write(tmp_path, name)

    with pytest.raises(MigrationError, match=r"NNN_description\.sql"):
        discover(tmp_path)


def test_a_version_used_twice_is_refused(tmp_path: Path) -> None:
    write(tmp_path, "001_create_table.sql")
    write(tmp_path, "1_create_other_table.sql")

    with pytest.raises(MigrationError, match="version 1 is used twice"):
        discover(tmp_path)


def test_checksum_follows_the_content() -> None:
    original = Migration(1, "create_table", "CREATE TABLE t ();")

    assert original.checksum == Migration(1, "renamed", "CREATE TABLE t ();").checksum
    assert original.checksum != Migration(1, "create_table", "CREATE TABLE t (c int);").checksum
    assert len(original.checksum) == 64


async def test_migrate_applies_only_pending_files_each_with_its_history_row(tmp_path: Path) -> None:
    write(tmp_path, "001_create_table.sql", "CREATE TABLE t ();")
    write(tmp_path, "002_add_column.sql", "ALTER TABLE t ADD c int;")
    applied = Migration(1, "create_table", "CREATE TABLE t ();")
    conn = FakeConnection(rows=[{"version": 1, "checksum": applied.checksum}])

    done = await migrate(conn, "catalog", tmp_path)  # type: ignore[arg-type]  # a fake connection

    assert [m.version for m in done] == [2]
    statements = [query for query, _ in conn.executed]
    assert statements[0].startswith("SELECT pg_advisory_lock")
    assert "ALTER TABLE t ADD c int;" in statements
    assert "CREATE TABLE t ();" not in statements
    assert statements[-1].startswith("SELECT pg_advisory_unlock")
    history = [args for query, args in conn.executed if "INSERT INTO schema_migrations" in query]
    assert history == [("catalog", 2, "add_column", done[0].checksum)]
    assert conn.transactions == ["committed"]


async def test_migrate_refuses_a_file_edited_after_it_was_applied_and_releases_the_lock(
    tmp_path: Path,
) -> None:
    write(tmp_path, "001_create_table.sql", "CREATE TABLE t (edited int);")
    conn = FakeConnection(rows=[{"version": 1, "checksum": Migration(1, "x", "CREATE TABLE t ();").checksum}])

    with pytest.raises(MigrationError, match=r"catalog migration 001_create_table\.sql was changed"):
        await migrate(conn, "catalog", tmp_path)  # type: ignore[arg-type]  # a fake connection

    assert conn.transactions == []
    assert conn.executed[-1][0].startswith("SELECT pg_advisory_unlock")
