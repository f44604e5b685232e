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
import contextlib
import errno
import fcntl
import itertools
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiosqlite

from rmgrpc.model import Event, EventKind
from rmgrpc.store.protocol import EventStore, LoadedState, OnCommit, StoreError, Write
from rmgrpc.store.schema import COMPACTED_THROUGH, SchemaError, migrate, schema_version

log = logging.getLogger(__name__)

MEMORY = ":memory:"
SYNCHRONOUS_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")
# How long a statement waits on SQLite's own locks (a checkpoint, an outside reader)
# before failing; our file lock already keeps other writers away.
BUSY_TIMEOUT_MS = 5000
# Writes per transaction: bounds how long the first caller of a batch waits for the last.
MAX_BATCH = 1000
# WAL checkpoints run on their own connection (and thread) this often while commits come
# in, so no commit waits for one: inside COMMIT, SQLite's automatic checkpoint copies and
# fsyncs ~4 MB every ~1,000 pages, a 20-40 ms stall for every write queued behind it.
CHECKPOINT_EVERY_SECONDS = 0.5
# The writer still checkpoints by itself past this many WAL pages (~40 MB): a safety net
# that bounds the WAL should the checkpointer fall behind or fail.
WRITER_AUTOCHECKPOINT_PAGES = 10_000

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
# SQLite primary result codes (the low byte of an extended code) that mean the file itself
# is bad, as opposed to busy or misused.
_CORRUPT_CODES = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)
_FIX_BAD_FILE = "restore it from a backup, or move it away to start with an empty database"

# (st_dev, st_ino) of every database file a Store in this process has open. The flock on
# the file stops other processes; this stops a second Store here without opening the file,
# because closing any descriptor of a file drops this process's POSIX locks on it (SQLite's).
_OPEN_FILES: set[tuple[int, int]] = set()


@dataclass(frozen=True, slots=True)
class _Lock:
    """What keeps other servers off the database: flocks on `<realpath>.lock` and on the
    database file itself, so symlinks, hard links and `..` paths to it all conflict."""

    # Resolved path of the database: what the connections open and the writer re-checks.
    real_path: str
    # (st_dev, st_ino) of the file as opened: a different one later means it was replaced.
    file_id: tuple[int, int]
    fds: tuple[int, ...]


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
        lock: _Lock | None,
        on_commit: OnCommit | None,
        last_revision: int,
        oldest_revision: int,
        checkpoint_conn: aiosqlite.Connection | None = None,
    ) -> None:
        """Private: use `Store.open`."""
        self._path = path
        self._write_conn = write_conn
        # None for ":memory:", whose reads share the write connection.
        self._read_conn = read_conn
        # None for ":memory:", which has no WAL.
        self._checkpoint_conn = checkpoint_conn
        # None for ":memory:", which has no file to lock or watch.
        self._lock = lock
        # Set once the file is found deleted or replaced: every later commit fails with it.
        self._broken: StoreError | None = None
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
        self._checkpointer: asyncio.Task[None] | None = None
        if checkpoint_conn is not None:
            self._checkpointer = asyncio.get_running_loop().create_task(
                self._checkpoint_loop(checkpoint_conn), name="rmgrpc-store-checkpointer"
            )
        #: WAL checkpoints run by the checkpointer (for tests and the curious), and the
        #: `transactions_committed` that the last complete one copied into the database.
        self.checkpoints = 0
        self.checkpointed_through = 0

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
        cannot be used: locked by another server, read-only, corrupt (checked with
        `PRAGMA quick_check`, which reads the whole file), a gap in the event log, or a
        schema newer than this code.
        """
        mode = synchronous.upper()
        if mode not in SYNCHRONOUS_MODES:
            raise ValueError(f"synchronous must be one of {', '.join(SYNCHRONOUS_MODES)}")
        lock: _Lock | None = None
        write_conn: aiosqlite.Connection | None = None
        read_conn: aiosqlite.Connection | None = None
        checkpoint_conn: aiosqlite.Connection | None = None
        try:
            if path != MEMORY:
                if os.path.isdir(path):
                    raise StoreError(f"cannot open database {path}: it is a directory")
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                _check_writable(path)
                # Lock before touching the database, so a second server never changes it.
                lock = _acquire_lock(path)
            write_conn = await _connect_writer(lock.real_path if lock else path, mode)
            if lock is not None:
                await _check_integrity(write_conn, path)
            await migrate(write_conn)
            if lock is not None:
                await _probe_writable(write_conn)
            last_revision, oldest_revision = await _read_revisions(write_conn)
            await _check_gapless(write_conn, path, last_revision, oldest_revision)
            if lock is not None:
                read_conn = await _connect_reader(lock.real_path)
                checkpoint_conn = await _connect_checkpointer(lock.real_path, mode)
                # SQLite opened the file by path after we locked it: make sure that path
                # still names the file we locked.
                _check_file(path, lock)
        except BaseException as e:
            if checkpoint_conn is not None:
                await checkpoint_conn.close()
            await _close_all(read_conn, write_conn, lock)
            if isinstance(e, sqlite3.Error | SchemaError | OSError):
                raise _open_error(path, e) from e
            raise
        return cls(
            path=path,
            write_conn=write_conn,
            read_conn=read_conn,
            lock=lock,
            on_commit=on_commit,
            last_revision=last_revision,
            oldest_revision=oldest_revision,
            checkpoint_conn=checkpoint_conn,
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
            try:
                rows = await self._write_conn.execute_fetchall("SELECT kind, id, data FROM objects")
            except sqlite3.Error as e:
                # quick_check at open passed, so this is damage since, or an I/O error.
                raise _open_error(self._path, e) from e
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
        if self._broken is not None:
            raise self._broken
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
        revision expected is again `last_revision + 1`. Once the database file is found
        deleted or replaced, this and every later commit fail: the writes would land in a
        file nobody will read again.
        """
        await self.submit(write)

    async def read_events(self, after_revision: int, limit: int = 1000) -> list[Event]:
        """Up to `limit` retained events with revision > after_revision, in revision order.

        Compaction is not an error here: when it removed some of those events, the result
        starts after after_revision + 1 (or is empty), which the caller checks for. A
        revision missing inside the result is: that raises StoreError, since a watcher
        would otherwise skip it silently.
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
        events = [_event_from_row(row) for row in rows]
        for previous, event in itertools.pairwise(events):
            if event.revision != previous.revision + 1:
                raise StoreError(
                    f"database {self._path} has a gap in its event log: revision"
                    f" {previous.revision + 1} is missing; {_FIX_BAD_FILE}"
                )
        return events

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
                self._check_file()
                await conn.execute("COMMIT")
            except sqlite3.Error as e:
                await _rollback(conn)
                raise StoreError(f"compaction of {self._path} failed: {e}") from e
            except BaseException:
                await _rollback(conn)
                raise
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
            await self._stop_checkpointer()
            async with self._read_lock, self._txn_lock:
                read_conn, self._read_conn = self._read_conn, None
                lock, self._lock = self._lock, None
                self._closed = True
                await _close_all(read_conn, self._write_conn, lock)

    async def _stop_checkpointer(self) -> None:
        task, self._checkpointer = self._checkpointer, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        conn, self._checkpoint_conn = self._checkpoint_conn, None
        if conn is not None:
            try:
                await conn.close()
            except Exception:
                log.exception("closing the checkpoint connection failed")

    async def _checkpoint_loop(self, conn: aiosqlite.Connection) -> None:
        """PASSIVE checkpoints, off the writer's connection: they never block a commit
        (nor a reader), they copy what no reader still needs and let the writer restart
        the WAL from its beginning once all of it is copied."""
        while True:
            await asyncio.sleep(CHECKPOINT_EVERY_SECONDS)
            committed = self.transactions_committed
            if committed == self.checkpointed_through:
                continue
            try:
                rows = list(await conn.execute_fetchall("PRAGMA wal_checkpoint(PASSIVE)"))
                self.checkpoints += 1
                busy, frames, copied = rows[0]
                if not busy and frames == copied:
                    self.checkpointed_through = committed
            except sqlite3.Error as e:
                # The writer's own checkpoint past WRITER_AUTOCHECKPOINT_PAGES still bounds
                # the WAL; a broken file shows up on the next commit.
                log.warning("WAL checkpoint of %s failed: %s", self._path, e)

    def _check_open(self) -> None:
        # Reads and compaction still work while close() drains the queue; submit() does not.
        if self._closed:
            raise StoreError(f"database {self._path} is closed")

    def _check_file(self) -> None:
        """Raise (and stay failed) if the database file is gone or another file took its
        place: SQLite would go on writing to the unlinked inode, acknowledging writes that
        no restart will ever see. One stat, so cheap enough for every transaction."""
        if self._broken is not None:
            raise self._broken
        if self._lock is None:
            return
        try:
            _check_file(self._path, self._lock)
        except StoreError as e:
            self._broken = e
            raise

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
            if self._broken is not None:
                raise self._broken
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
        rows = [_event_row(event) for event in events]
        # The whole transaction is one call into the connection's thread: statement by
        # statement it would be five round trips through the event loop, each waiting
        # for the loop to come round, which is most of a commit's latency under load.
        # (`_execute` runs a callable on aiosqlite's thread; pinned to 0.22 in pyproject.)
        await conn._execute(  # type: ignore[no-untyped-call]
            _write_transaction, conn, rows, puts, deletes, self._check_file
        )

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


def _write_transaction(
    conn: aiosqlite.Connection,
    events: Sequence[tuple[Any, ...]],
    puts: Sequence[tuple[str, str, bytes]],
    deletes: Sequence[tuple[str, str]],
    check_file: Callable[[], None],
) -> None:
    """One write transaction, run on the connection's own thread."""
    db: sqlite3.Connection = conn._conn
    db.execute("BEGIN IMMEDIATE")
    try:
        if events:
            db.executemany(_INSERT_EVENT, events)
        if puts:
            db.executemany(_UPSERT_OBJECT, puts)
        if deletes:
            db.executemany(_DELETE_OBJECT, deletes)
        # Last thing before COMMIT, so the window for an unnoticed swap is smallest.
        check_file()
        db.execute("COMMIT")
    except BaseException:
        try:
            if db.in_transaction:
                db.execute("ROLLBACK")
        except Exception:
            # The connection is beyond use; the original error is what the caller needs.
            log.exception("rollback failed")
        raise


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


def _acquire_lock(db_path: str) -> _Lock:
    """Lock the database against every other server, whatever path it was reached by.

    Two flocks: on `<realpath>.lock` (which also records our pid for the other side's
    message) and on the database file itself, since hard links share the inode but not
    the real path. flock belongs to the open file, so the kernel drops it when the process
    dies, kill -9 included, and a second open in the same process conflicts too. It does
    not interact with SQLite's own POSIX (fcntl) locks on Linux.
    """
    real_path = os.path.realpath(db_path)
    lock_path = real_path + ".lock"
    fds: list[int] = []
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        fds.append(fd)
        if not _try_flock(fd):
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            by = f"pid {holder}, " if holder.isdigit() else ""
            raise StoreError(
                f"database {db_path} is in use by another rmgrpc process ({by}holding {lock_path})"
            )
        # The pid is only for the message another process prints; the lock is the flock.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        in_use = StoreError(
            f"database {db_path} is in use by another rmgrpc process"
            f" (holding {real_path}, the same file under another name)"
        )
        # Checked before opening the file: see _OPEN_FILES.
        try:
            st = os.stat(real_path)
            if (st.st_dev, st.st_ino) in _OPEN_FILES:
                raise in_use
        except FileNotFoundError:
            pass
        # Read-only is enough to flock; O_CREAT makes an empty file, which SQLite takes
        # as a new database.
        db_fd = os.open(real_path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        fds.append(db_fd)
        if not _try_flock(db_fd):
            raise in_use
        st = os.fstat(db_fd)
    except BaseException:
        for fd in reversed(fds):
            os.close(fd)
        raise
    file_id = (st.st_dev, st.st_ino)
    _OPEN_FILES.add(file_id)
    return _Lock(real_path, file_id, tuple(fds))


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _check_file(path: str, lock: _Lock) -> None:
    """Raise StoreError unless `lock.real_path` still names the file we locked."""
    try:
        st = os.stat(lock.real_path)
    except FileNotFoundError:
        detail = "it, or its directory, no longer exists"
    except OSError as e:
        detail = f"it can no longer be checked: {e.strerror}"
    else:
        if (st.st_dev, st.st_ino) == lock.file_id:
            return
        detail = "another file now has its name"
    raise StoreError(
        f"database {path} was deleted or replaced while in use ({detail}); no further"
        " writes are acknowledged: restart rmgrpc on the intended file"
    )


def _check_writable(path: str) -> None:
    """Refuse a database we could not write, before locking or touching anything.

    Permission bits do not bind root (except on a read-only mount, which os.access does
    report); `_probe_writable` catches the rest with a real write.
    """
    real_path = os.path.realpath(path)
    # WAL creates -wal and -shm beside the file, and we create the .lock file there.
    directory_ok = os.access(os.path.dirname(real_path), os.W_OK | os.X_OK)
    if not directory_ok or (os.path.exists(real_path) and not os.access(real_path, os.W_OK)):
        raise _read_only(path)


async def _probe_writable(conn: aiosqlite.Connection) -> None:
    """Write the schema version back unchanged, then roll back: fails with SQLITE_READONLY
    wherever SQLite cannot write, which is the only test that cannot be fooled."""
    version = await schema_version(conn)
    await conn.execute("BEGIN IMMEDIATE")
    try:
        await conn.execute(f"PRAGMA user_version = {version}")
    finally:
        await _rollback(conn)


async def _check_integrity(conn: aiosqlite.Connection, path: str) -> None:
    """`PRAGMA quick_check`: reads every page (about 60 ms for 60 MB from the page cache,
    0.45 s from disk), so damage is a clear error at start instead of a failure later.
    The (1) only stops at the first problem; a sound file costs the same."""
    started = time.monotonic()
    async with conn.execute("PRAGMA quick_check(1)") as cursor:
        row = await cursor.fetchone()
    if row is None or row[0] != "ok":
        raise _corrupt(path, str(row[0]) if row is not None else "quick_check said nothing")
    took = time.monotonic() - started
    if took > 1.0:
        log.info("integrity check of %s took %.1f s", path, took)


async def _check_gapless(
    conn: aiosqlite.Connection, path: str, last_revision: int, oldest_revision: int
) -> None:
    """Refuse a log with a revision missing between oldest and last: watchers would skip
    it, and the state rebuilt from objects would not match the log. Cheap: the count and
    minimum come from the primary key."""
    async with conn.execute("SELECT COUNT(*), MIN(revision) FROM events") as cursor:
        row = await cursor.fetchone()
    assert row is not None
    count, first = int(row[0]), row[1]
    if count == last_revision - oldest_revision + 1 and (count == 0 or first == oldest_revision):
        return
    if count and first < oldest_revision:
        raise StoreError(
            f"database {path} has an inconsistent event log: event {first} is older than"
            f" its compaction point {oldest_revision - 1}; {_FIX_BAD_FILE}"
        )
    missing = oldest_revision
    if count and first == oldest_revision:
        # Only run when something is wrong: the first event whose successor is missing.
        async with conn.execute(
            "SELECT e.revision + 1 FROM events e WHERE NOT EXISTS"
            " (SELECT 1 FROM events n WHERE n.revision = e.revision + 1)"
            " ORDER BY e.revision LIMIT 1"
        ) as cursor:
            gap = await cursor.fetchone()
        assert gap is not None
        missing = int(gap[0])
    raise StoreError(
        f"database {path} has a gap in its event log: revision {missing} is missing"
        f" (retained {oldest_revision}..{last_revision}); {_FIX_BAD_FILE}"
    )


def _open_error(path: str, error: BaseException) -> StoreError:
    """One line saying what is wrong with the file and what to do about it."""
    # Migrations wrap the sqlite3 error that says what really happened.
    cause = error.__cause__ if isinstance(error, SchemaError) else error
    if isinstance(cause, sqlite3.Error):
        code = (cause.sqlite_errorcode or 0) & 0xFF
        if code == sqlite3.SQLITE_READONLY:
            return _read_only(path)
        if code in _CORRUPT_CODES:
            return _corrupt(path, str(cause))
    if isinstance(cause, OSError) and cause.errno == errno.EROFS:
        return _read_only(path)
    return StoreError(f"cannot open database {path}: {_one_line(str(error))}")


def _read_only(path: str) -> StoreError:
    return StoreError(
        f"database {path} is read-only (SQLite must write it and create files beside it):"
        " make the file and its directory writable by this user, or set db to another path"
    )


def _corrupt(path: str, detail: str) -> StoreError:
    return StoreError(f"database {path} is corrupt ({_one_line(detail)}): {_FIX_BAD_FILE}")


def _one_line(text: str) -> str:
    return " ".join(text.split())


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
        if path != MEMORY:
            await conn.execute(f"PRAGMA wal_autocheckpoint = {WRITER_AUTOCHECKPOINT_PAGES}")
    except BaseException:
        await conn.close()
        raise
    return conn


async def _connect_checkpointer(path: str, synchronous: str) -> aiosqlite.Connection:
    # Its own connection, so checkpoints run in their own aiosqlite thread; it never
    # writes rows, only copies WAL frames into the database (and fsyncs it, per synchronous).
    conn = await aiosqlite.connect(path, isolation_level=None)
    try:
        await conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
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
    lock: _Lock | None,
) -> None:
    # The writer closes last: as the final connection it checkpoints and removes the WAL,
    # which the read-only connection cannot do.
    for conn in (read_conn, write_conn):
        if conn is not None:
            try:
                await conn.close()
            except Exception:
                log.exception("closing the database failed")
    if lock is not None:
        # After the connections: closing our descriptor of the database file would
        # otherwise drop SQLite's POSIX locks on it. Closing releases the flocks.
        for fd in reversed(lock.fds):
            os.close(fd)
        _OPEN_FILES.discard(lock.file_id)


if TYPE_CHECKING:
    # mypy proves Store keeps the contract the engine is written against.
    _satisfies: type[EventStore] = Store
