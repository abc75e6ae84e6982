"""Schema versions and the steps between them.

We keep our own versioned migration table instead of Alembic: a project is one SQLite file that the app opens
on a user's machine, not a server database; upgrades must run inside the app at open time, from package data,
after a backup, in one transaction, with no `alembic.ini`/env.py/script folder to ship and no extra
dependency. SQLite's `user_version` header field is the authoritative version (it is read before any table
is touched, and it changes in the same transaction as the DDL); `schema_migrations` keeps a row per step for
people reading the file.

To change the schema: edit the models in `schema.py`, bump `SCHEMA_VERSION`, and add
`MIGRATIONS[old] = ("what changed", fn)` where `fn(connection)` brings a version-`old` file to `old + 1`
with plain SQL (the ORM models always describe the newest schema, so steps must not use them).
"""

from __future__ import annotations

from typing import Callable

from sqlalchemy import Connection, text

from . import schema

# from-version -> (description, step bringing the file from that version to the next)
MIGRATIONS: dict[int, tuple[str, Callable[[Connection], None]]] = {}


def current_version() -> int:
    return schema.SCHEMA_VERSION


def create_all(conn: Connection, app_version: str, now: str) -> None:
    schema.Base.metadata.create_all(conn)
    conn.exec_driver_sql(f"PRAGMA application_id = {schema.APPLICATION_ID}")
    conn.exec_driver_sql(f"PRAGMA user_version = {schema.SCHEMA_VERSION}")
    conn.execute(
        text("INSERT INTO schema_migrations (version, applied_at, app_version, description) VALUES (:v, :t, :a, :d)"),
        {"v": schema.SCHEMA_VERSION, "t": now, "a": app_version, "d": "created"},
    )


def upgrade(conn: Connection, from_version: int, app_version: str, now: str) -> list[int]:
    """Runs every step from `from_version` to the current version on `conn` (inside the caller's transaction)."""
    done = []
    for version in range(from_version, schema.SCHEMA_VERSION):
        if version not in MIGRATIONS:
            raise RuntimeError(f"no migration from project schema v{version} to v{version + 1}")
        description, step = MIGRATIONS[version]
        step(conn)
        conn.execute(
            text("INSERT INTO schema_migrations (version, applied_at, app_version, description) "
                 "VALUES (:v, :t, :a, :d)"),
            {"v": version + 1, "t": now, "a": app_version, "d": description},
        )
        done.append(version + 1)
    conn.exec_driver_sql(f"PRAGMA user_version = {schema.SCHEMA_VERSION}")
    conn.execute(text("UPDATE project SET schema_version = :v, app_version = :a"),
                 {"v": schema.SCHEMA_VERSION, "a": app_version})
    return done
