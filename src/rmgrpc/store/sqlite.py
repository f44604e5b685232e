"""The Store: current objects and the event log in one SQLite file, written by group commit.

Owns the database file and everything about using it: the lock that keeps a second server
off it, the connection settings (WAL, `synchronous`), the single writer task that folds
concurrent commits into one transaction, compaction of the event log, and reading back.
It knows nothing of allocations or nodes: objects are opaque bytes keyed by (kind, id),
and the engine encodes and decodes them.

Like aiosqlite itself, one owner does the writing: `commit()` only validates and queues;
the writer task drains the queue, writes everything in one transaction, and only once that
transaction is committed tells `on_commit` (the watch fan-out) and the waiting callers.
"""

from __future__ import annotations

import asyncio
import collections
import fcntl
import logging
import os
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite

from rmgrpc.model import Event, EventKind
from rmgrpc.store.schema import COMPACTED_THROUGH, SchemaError, migrate

log = logging.getLogger(__name__)

MEMORY = ":memory:"
SYNCHRONOUS_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")
# How long a statement waits on SQLite's own locks (a checkpoint, an outside reader)
# before failing; our file lock already keeps other writers away.
BUSY_TIMEOUT_MS = 5000
# Writes per transaction: bounds how long the first caller of a batch waits for the last.
MAX_BATCH = 1000

_INSERT_EVENT = (
    "INSERT INTO events (revision, kind, type, object_id, time, tenant, node_ids, data)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_SELECT_EVENTS = (
    "SELECT revision, kind, type, object_id, time, tenant, node_ids, data FROM events"
    " WHERE revision > ? ORDER BY revision LIMIT ?"
)
_UPSERT_OBJECT = (
    "INSERT INTO objects (kind, id, data) VALUES (?, ?, ?)"
    " ON CONFLICT (kind, id) DO UPDATE SET data = excluded.data"
)
_DELETE_OBJECT = "DELETE FROM objects WHERE kind = ? AND id = ?"
_SELECT_COMPACTED = "SELECT value FROM meta WHERE key = ?"


class StoreError(Exception):
    """The database cannot be used: unreadable, corrupt, locked, too new, or a commit failed.

    The message is one line, fit to print before exiting.
    """


@dataclass(frozen=True, slots=True)
class Write:
    """One atomic change: events appended and objects put or deleted, all or nothing.

    Events must continue the log gaplessly, in increasing revision order. Within a write,
    puts apply before deletes; across writes, later writes win.
    """

    events: Sequence[Event] = ()
    puts: Sequence[tuple[EventKind, str, bytes]] = ()
    deletes: Sequence[tuple[EventKind, str]] = ()


@dataclass(frozen=True, slots=True)
class LoadedState:
    """Everything persisted, as of `last_revision`."""

    # Every EventKind is a key, with an empty dict when it has no objects.
    objects: dict[EventKind, dict[str, bytes]]
    last_revision: int
    # Revision of the oldest retained event; last_revision + 1 when the log is empty.
    oldest_revision: int


OnCommit = Callable[[Sequence[Event]], None]
_Pending = tuple[Write, "asyncio.Future[None]"]


class Store:
    """Objects and the event log in one SQLite database. Create with `await Store.open(...)`.

    `on_commit(events)` (an attribute, settable after open) is called synchronously,
    exactly once per committed event, in revision order, only after the transaction holding
    them is committed, and before the callers of `commit` resume. It must not raise or
    block (an exception is logged).
    """

    def __init__(
        self,
        *,
        path: str,
        write_conn: aiosqlite.Connection,
        read_conn: aiosqlite.Connection | None,
        lock_fd: int | None,
        on_commit: OnCommit | None,
        last_revision: int,
        oldest_revision: int,
    ) -> None:
        """Private: use `Store.open`."""
        self._path = path
        self._write_conn = write_conn
        # None for ":memory:", whose reads share the write connection.
        self._read_conn = read_conn
        self._lock_fd = lock_fd
        #: Called with each committed batch of events (see the class docstring). Settable
        #: after open, so whoever builds the watch fan-out can attach it later.
        self.on_commit = on_commit
        self._last_revision = last_revision
        self._oldest_revision = oldest_revision
        # The revision the next event handed to commit() must carry. It runs ahead of
        # _last_revision by whatever is queued and not yet durable.
        self._next_revision = last_revision + 1
        self._queue: collections.deque[_Pending] = collections.deque()
        self._wakeup = asyncio.Event()
        # Held for each write transaction and by anything else using the write connection,
        # so no statement ever lands inside another's transaction.
        self._txn_lock = asyncio.Lock()
        # Guards the read connection against close() pulling it away mid-read.
        self._read_lock = asyncio.Lock()
        # closing: no new commits; closed: connections gone, nothing works.
        self._closing = False
        self._closed = False
        self._close_task: asyncio.Task[None] | None = None
        #: Write transactions committed by the writer (group commit makes this far fewer
        #: than the commit() calls). Compaction is not counted.
        self.transactions_committed = 0
        self._writer = asyncio.get_running_loop().create_task(
            self._write_loop(), name="rmgrpc-store-writer"
        )

    @classmethod
    async def open(
        cls,
        path: str,
        *,
        on_commit: OnCommit | None = None,
        synchronous: str = "NORMAL",
    ) -> Store:
        """Open (creating it, its parent directories and its schema if needed) and lock.

        `synchronous`: NORMAL survives kill -9 of the process; FULL also survives power
        loss, at the price of an fsync per transaction. Raises StoreError when the database
        cannot be used.
        """
        mode = synchronous.upper()
        if mode not in SYNCHRONOUS_MODES:
            raise ValueError(f"synchronous must be one of {', '.join(SYNCHRONOUS_MODES)}")
        lock_fd: int | None = None
        write_conn: aiosqlite.Connection | None = None
        read_conn: aiosqlite.Connection | None = None
        try:
            if path != MEMORY:
                if os.path.isdir(path):
                    raise StoreError(f"cannot open database {path}: it is a directory")
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                # Lock before touching the database, so a second server never changes it.
                lock_fd = _acquire_lock(path)
            write_conn = await _connect_writer(path, mode)
            await migrate(write_conn)
            last_revision, oldest_revision = await _read_revisions(write_conn)
            if path != MEMORY:
                read_conn = await _connect_reader(path)
        except BaseException as e:
            await _close_all(read_conn, write_conn, lock_fd)
            if isinstance(e, sqlite3.Error | SchemaError | OSError):
                raise StoreError(f"cannot open database {path}: {e}") from e
            raise
        return cls(
            path=path,
            write_conn=write_conn,
            read_conn=read_conn,
            lock_fd=lock_fd,
            on_commit=on_commit,
            last_revision=last_revision,
            oldest_revision=oldest_revision,
        )

    @property
    def path(self) -> str:
        return self._path

    @property
    def last_revision(self) -> int:
        """The newest durable revision (0 for a new database)."""
        return self._last_revision

    @property
    def oldest_revision(self) -> int:
        """The oldest retained revision; last_revision + 1 when the log is empty."""
        return self._oldest_revision

    async def load(self) -> LoadedState:
        """Every stored object, with the revisions they are current as of."""
        async with self._txn_lock:
            self._check_open()
            rows = await self._write_conn.execute_fetchall("SELECT kind, id, data FROM objects")
            last_revision, oldest_revision = self._last_revision, self._oldest_revision
        objects: dict[EventKind, dict[str, bytes]] = {kind: {} for kind in EventKind}
        for kind, object_id, data in rows:
            try:
                objects[EventKind(kind)][object_id] = bytes(data)
            except ValueError:
                raise StoreError(
                    f"database {self._path} holds objects of unknown kind {kind!r}"
                ) from None
        return LoadedState(objects, last_revision, oldest_revision)

    def submit(self, write: Write) -> asyncio.Future[None]:
        """Validate and queue `write` now; the future resolves once it is durable.

        Checking and queueing happen before this returns, so a caller can assign revisions
        and submit under its own lock, then await outside it. Raises ValueError when the
        events do not continue the log gaplessly (a programming error).
        """
        if self._closing:
            raise StoreError(f"database {self._path} is closed")
        if self._writer.done():
            raise StoreError(f"database {self._path}: the writer has stopped")
        next_revision = _validate(write, self._next_revision)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((write, future))
        self._next_revision = next_revision
        self._wakeup.set()
        return future

    async def commit(self, write: Write) -> None:
        """Make `write` durable, sharing a transaction with concurrent commits.

        If the transaction fails, this raises StoreError and nothing of it was applied;
        writes queued behind it fail too (they continue its revisions), and the next
        revision expected is again `last_revision + 1`.
        """
        await self.submit(write)

    async def read_events(self, after_revision: int, limit: int = 1000) -> list[Event]:
        """Up to `limit` retained events with revision > after_revision, in revision order.

        Compaction is not an error here: when it removed some of those events, the result
        starts after after_revision + 1 (or is empty), which the caller checks for.
        """
        if limit <= 0:
            raise ValueError("limit must be positive")
        if self._path == MEMORY:
            # No second connection can see an in-memory database: wait only for the
            # transaction in flight, never for the queue behind it.
            async with self._txn_lock:
                self._check_open()
                rows = await self._write_conn.execute_fetchall(
                    _SELECT_EVENTS, (after_revision, limit)
                )
        else:
            # Held only so close() never pulls the connection from under a read.
            async with self._read_lock:
                self._check_open()
                assert self._read_conn is not None
                rows = await self._read_conn.execute_fetchall(
                    _SELECT_EVENTS, (after_revision, limit)
                )
        return [_event_from_row(row) for row in rows]

    async def compact(self, *, max_events: int, min_time: float) -> int:
        """Drop old events; return the new oldest_revision.

        Keeps at most the newest `max_events`, and drops the run of oldest events whose
        time is before `min_time`. Only a prefix of the log is ever removed, so what is
        retained stays gapless: an old-timed event after a newer one waits for it.
        Everything may go, leaving oldest_revision = last_revision + 1.
        """
        if max_events < 0:
            raise ValueError("max_events must not be negative")
        async with self._txn_lock:
            self._check_open()
            conn = self._write_conn
            last, oldest = self._last_revision, self._oldest_revision
            keep_from = max(oldest, last - max_events + 1)
            # Walks the log from keep_from and stops at the first event young enough.
            rows = list(
                await conn.execute_fetchall(
                    "SELECT revision FROM events WHERE revision >= ? AND time >= ?"
                    " ORDER BY revision LIMIT 1",
                    (keep_from, min_time),
                )
            )
            keep_from = int(rows[0][0]) if rows else last + 1
            if keep_from <= oldest:
                return oldest
            await conn.execute("BEGIN IMMEDIATE")
            try:
                await conn.execute("DELETE FROM events WHERE revision < ?", (keep_from,))
                await conn.execute(
                    "UPDATE meta SET value = ? WHERE key = ?", (keep_from - 1, COMPACTED_THROUGH)
                )
                await conn.execute("COMMIT")
            except sqlite3.Error as e:
                await _rollback(conn)
                raise StoreError(f"compaction of {self._path} failed: {e}") from e
            self._oldest_revision = keep_from
            return keep_from

    async def close(self) -> None:
        """Finish every queued commit, close the connections and release the lock."""
        if self._close_task is None:
            self._closing = True
            self._wakeup.set()
            self._close_task = asyncio.get_running_loop().create_task(self._close())
        # Shielded: a caller cancelled while closing must not leave the lock half-released.
        await asyncio.shield(self._close_task)

    async def _close(self) -> None:
        try:
            await self._writer
        finally:
            async with self._read_lock, self._txn_lock:
                read_conn, self._read_conn = self._read_conn, None
                lock_fd, self._lock_fd = self._lock_fd, None
                self._closed = True
                await _close_all(read_conn, self._write_conn, lock_fd)

    def _check_open(self) -> None:
        # Reads and compaction still work while close() drains the queue; submit() does not.
        if self._closed:
            raise StoreError(f"database {self._path} is closed")

    async def _write_loop(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            # Everything that queued while the previous transaction ran goes in this one:
            # that is the whole of group commit.
            batch = [self._queue.popleft() for _ in range(min(len(self._queue), MAX_BATCH))]
            await self._write_batch(batch)

    async def _write_batch(self, batch: list[_Pending]) -> None:
        events = [event for write, _ in batch for event in write.events]
        # Coalesce to each object's final state: keeps the order between writes while
        # still writing one executemany per table.
        final: dict[tuple[str, str], bytes | None] = {}
        for write, _ in batch:
            for kind, object_id, data in write.puts:
                final[(kind.value, object_id)] = data
            for kind, object_id in write.deletes:
                final[(kind.value, object_id)] = None
        puts = [(k, i, d) for (k, i), d in final.items() if d is not None]
        deletes = [(k, i) for (k, i), d in final.items() if d is None]
        try:
            async with self._txn_lock:
                await self._transaction(events, puts, deletes)
                if events:
                    self._last_revision = events[-1].revision
                self.transactions_committed += 1
        except BaseException as e:
            self._fail(batch, e)
            if not isinstance(e, Exception):
                raise
            return
        if events and self.on_commit is not None:
            try:
                self.on_commit(events)
            except Exception:
                log.exception("on_commit failed for revisions up to %d", events[-1].revision)
        for _, future in batch:
            if not future.done():
                future.set_result(None)

    async def _transaction(
        self,
        events: Sequence[Event],
        puts: Sequence[tuple[str, str, bytes]],
        deletes: Sequence[tuple[str, str]],
    ) -> None:
        conn = self._write_conn
        await conn.execute("BEGIN IMMEDIATE")
        try:
            if events:
                await conn.executemany(_INSERT_EVENT, [_event_row(event) for event in events])
            if puts:
                await conn.executemany(_UPSERT_OBJECT, puts)
            if deletes:
                await conn.executemany(_DELETE_OBJECT, deletes)
            await conn.execute("COMMIT")
        except BaseException:
            await _rollback(conn)
            raise

    def _fail(self, batch: list[_Pending], error: BaseException) -> None:
        reason = f"commit to {self._path} failed: {error}"
        for _, future in batch:
            if not future.done():
                exc = StoreError(reason)
                exc.__cause__ = error
                future.set_exception(exc)
        # Writes queued behind the failed batch continue its revisions: applying them would
        # leave a gap in the log, so they fail too and revisions restart after the durable.
        for _, future in self._queue:
            if not future.done():
                future.set_exception(StoreError(f"commit aborted: an earlier {reason}"))
        self._queue.clear()
        self._next_revision = self._last_revision + 1


def _validate(write: Write, next_revision: int) -> int:
    """Check `write` before it joins a shared transaction; return the next revision.

    Anything that would make the transaction fail is caught here, so one caller's
    mistake fails only that caller, not everyone batched with it.
    """
    for event in write.events:
        if event.revision != next_revision:
            raise ValueError(
                f"event revision {event.revision} does not continue the log"
                f" (expected {next_revision})"
            )
        _check_key(event.kind, event.object_id)
        if not isinstance(event.data, bytes):
            raise ValueError(f"event {event.revision}: data must be bytes")
        for node_id in event.node_ids:
            # node_ids are stored comma-joined.
            if not node_id or "," in node_id:
                raise ValueError(f"event {event.revision}: bad node id {node_id!r}")
        next_revision += 1
    for kind, object_id, data in write.puts:
        _check_key(kind, object_id)
        if not isinstance(data, bytes):
            raise ValueError(f"put {kind}/{object_id}: data must be bytes")
    for kind, object_id in write.deletes:
        _check_key(kind, object_id)
    return next_revision


def _check_key(kind: EventKind, object_id: str) -> None:
    if not isinstance(kind, EventKind) or not isinstance(object_id, str):
        raise ValueError(f"bad object key ({kind!r}, {object_id!r})")


def _event_row(event: Event) -> tuple[Any, ...]:
    return (
        event.revision,
        event.kind.value,
        int(event.type),
        event.object_id,
        event.time,
        event.tenant,
        ",".join(event.node_ids),
        event.data,
    )


def _event_from_row(row: Sequence[Any]) -> Event:
    revision, kind, type_, object_id, time, tenant, node_ids, data = row
    return Event(
        revision=revision,
        kind=EventKind(kind),
        type=type_,
        object_id=object_id,
        time=time,
        data=bytes(data),
        tenant=tenant,
        node_ids=tuple(node_ids.split(",")) if node_ids else (),
    )


def _acquire_lock(db_path: str) -> int:
    """Take the exclusive lock file beside the database; return its descriptor.

    flock belongs to the open file, so the kernel drops it when the process dies, kill -9
    included, and a second open in the same process conflicts too.
    """
    lock_path = db_path + ".lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        by = f"pid {holder}, " if holder.isdigit() else ""
        raise StoreError(
            f"database {db_path} is in use by another rmgrpc process ({by}holding {lock_path})"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    # The pid is only for the message another process prints; the lock is the flock.
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


async def _connect_writer(path: str, synchronous: str) -> aiosqlite.Connection:
    # isolation_level=None: we issue BEGIN/COMMIT ourselves, so sqlite3 never opens or
    # commits a transaction behind our back.
    conn = await aiosqlite.connect(path, isolation_level=None)
    try:
        await conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        if path != MEMORY:
            # The first statement to read the file: a non-database fails here.
            async with conn.execute("PRAGMA journal_mode = WAL") as cursor:
                row = await cursor.fetchone()
            if row is None or str(row[0]).lower() != "wal":
                raise StoreError(f"cannot open database {path}: WAL journal mode unavailable")
        await conn.execute(f"PRAGMA synchronous = {synchronous}")
    except BaseException:
        await conn.close()
        raise
    return conn


async def _connect_reader(path: str) -> aiosqlite.Connection:
    # Read-only, so catch-up reads never queue behind the writer (WAL readers do not block).
    uri = Path(path).resolve().as_uri() + "?mode=ro"
    conn = await aiosqlite.connect(uri, uri=True, isolation_level=None)
    try:
        await conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    except BaseException:
        await conn.close()
        raise
    return conn


async def _read_revisions(conn: aiosqlite.Connection) -> tuple[int, int]:
    """(last_revision, oldest_revision) as persisted."""
    async with conn.execute("SELECT MAX(revision) FROM events") as cursor:
        row = await cursor.fetchone()
    newest = int(row[0]) if row is not None and row[0] is not None else 0
    compacted_through = await _compacted_through(conn)
    # All events compacted away: the meta row alone remembers how far the log got.
    return max(newest, compacted_through), compacted_through + 1


async def _compacted_through(conn: aiosqlite.Connection) -> int:
    async with conn.execute(_SELECT_COMPACTED, (COMPACTED_THROUGH,)) as cursor:
        row = await cursor.fetchone()
    return int(row[0]) if row is not None else 0


async def _rollback(conn: aiosqlite.Connection) -> None:
    try:
        if conn.in_transaction:
            await conn.execute("ROLLBACK")
    except Exception:
        # The connection is beyond use; the original error is what the caller needs.
        log.exception("rollback failed")


async def _close_all(
    read_conn: aiosqlite.Connection | None,
    write_conn: aiosqlite.Connection | None,
    lock_fd: int | None,
) -> None:
    # The writer closes last: as the final connection it checkpoints and removes the WAL,
    # which the read-only connection cannot do.
    for conn in (read_conn, write_conn):
        if conn is not None:
            try:
                await conn.close()
            except Exception:
                log.exception("closing the database failed")
    if lock_fd is not None:
        # Closing the descriptor releases the flock.
        os.close(lock_fd)
