"""The database schema and its versioned migrations.

Owns the table layout and the one rule for changing it: the schema version lives in
`PRAGMA user_version`, `MIGRATIONS[i]` takes a database from version i to i + 1, and each
step runs in its own transaction together with the version bump, so a crash mid-upgrade
leaves the database at the last complete version. A database newer than `SCHEMA_VERSION`
is refused rather than guessed at. Never edit a released step: append a new one.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

import aiosqlite

# One step: SQL statements run in order inside one transaction.
Migration = tuple[str, ...]

# meta key holding the highest revision removed by compaction (0: none). It lets
# last_revision and oldest_revision survive even when every event was compacted away.
COMPACTED_THROUGH = "compacted_through"


class SchemaError(Exception):
    """The schema cannot be brought to this code's version (the Store reports it as a
    StoreError)."""


MIGRATIONS: tuple[Migration, ...] = (
    # 1: the object table, the event log and the meta table.
    (
        """CREATE TABLE objects (
            kind TEXT NOT NULL,
            id TEXT NOT NULL,
            data BLOB NOT NULL,
            PRIMARY KEY (kind, id)
        ) WITHOUT ROWID""",
        # revision is the rowid: appends go to the end of the b-tree and compaction
        # deletes a prefix, both cheap.
        """CREATE TABLE events (
            revision INTEGER PRIMARY KEY,
            kind TEXT NOT NULL,
            type INTEGER NOT NULL,
            object_id TEXT NOT NULL,
            time REAL NOT NULL,
            tenant TEXT NOT NULL DEFAULT '',
            node_ids TEXT NOT NULL DEFAULT '',
            data BLOB NOT NULL
        )""",
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID",
        f"INSERT INTO meta (key, value) VALUES ('{COMPACTED_THROUGH}', 0)",
    ),
)

SCHEMA_VERSION = len(MIGRATIONS)


async def schema_version(conn: aiosqlite.Connection) -> int:
    async with conn.execute("PRAGMA user_version") as cursor:
        row = await cursor.fetchone()
    return int(row[0]) if row is not None else 0


async def migrate(conn: aiosqlite.Connection, migrations: Sequence[Migration] = MIGRATIONS) -> int:
    """Bring the database up to `len(migrations)`; return the version it ends at.

    `conn` must be in autocommit mode (isolation_level=None): each step issues its own
    BEGIN IMMEDIATE/COMMIT so no other writer can interleave with an upgrade.
    """
    version = await schema_version(conn)
    if version > len(migrations):
        raise SchemaError(
            f"database schema version {version} is newer than this rmgrpc supports "
            f"({len(migrations)}); upgrade rmgrpc or use another database"
        )
    for target in range(version + 1, len(migrations) + 1):
        try:
            await conn.execute("BEGIN IMMEDIATE")
            for statement in migrations[target - 1]:
                await conn.execute(statement)
            # PRAGMA values cannot be bound; target is an int we computed.
            await conn.execute(f"PRAGMA user_version = {target}")
            await conn.execute("COMMIT")
        except sqlite3.Error as e:
            if conn.in_transaction:
                await conn.execute("ROLLBACK")
            raise SchemaError(f"migration to schema version {target} failed: {e}") from e
    return len(migrations)
