"""Migrations produce exactly the models' schema, and round-trip (upgrade, downgrade, upgrade)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlmodel import SQLModel

import service.models  # noqa: F401
from service.db import current_revision, downgrade, head_revision, make_engine, migrate
from tests.conftest import PostgresDatabase, _pg_url


@pytest.fixture
def empty_database(backend: str, tmp_path: Path) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'fresh' / 'taskrelay.db'}"
        return
    admin_url = _pg_url()
    assert admin_url is not None
    database = PostgresDatabase.create(admin_url, prefix="taskrelay_migration")
    yield database.url
    database.drop()


def schema_diff(url: str) -> list[object]:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            return list(compare_metadata(context, SQLModel.metadata))
    finally:
        engine.dispose()


def table_names(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(sa.inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def partial_indexes(url: str) -> dict[tuple[str, str], str]:
    """Each partial index's predicate as the database has it, normalised: (table, index) ->
    text. Alembic's comparison ignores predicates, so the migrations could drift from the
    models there unseen."""
    engine = make_engine(url)
    key = f"{engine.dialect.name}_where"
    found = {}
    try:
        inspector = sa.inspect(engine)
        for table in inspector.get_table_names():
            for index in inspector.get_indexes(table):
                where = index.get("dialect_options", {}).get(key)
                if where is not None:
                    found[(table, str(index["name"]))] = _predicate(str(where))
    finally:
        engine.dispose()
    return found


def _predicate(text: str) -> str:
    return " ".join(text.strip().strip("()").lower().split())


def test_partial_indexes_have_the_models_predicates(empty_database: str) -> None:
    migrate(empty_database)
    dialect = sa.engine.make_url(empty_database).get_backend_name()
    expected = {
        (table.name, str(index.name)): _predicate(str(index.dialect_options[dialect]["where"]))
        for table in SQLModel.metadata.tables.values()
        for index in table.indexes
        if index.dialect_options[dialect]["where"] is not None
    }
    assert expected  # the models have some
    assert partial_indexes(empty_database) == expected


def test_upgrade_downgrade_upgrade(empty_database: str) -> None:
    url = empty_database
    migrate(url)
    assert schema_diff(url) == []
    assert table_names(url) == set(SQLModel.metadata.tables)
    engine = make_engine(url)
    assert current_revision(engine) == head_revision(url)
    engine.dispose()

    downgrade(url, "base")
    assert table_names(url) == set()

    migrate(url)
    assert schema_diff(url) == []
    assert table_names(url) == set(SQLModel.metadata.tables)
