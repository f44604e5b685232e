"""The store: durability across restarts and kill -9, group commit, compaction, locking."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiosqlite
import pytest

from rmgrpc.model import Event, EventKind
from rmgrpc.store import SCHEMA_VERSION, EventStore, Store, StoreError, Write
from rmgrpc.store import sqlite as sqlite_store
from rmgrpc.store.schema import SchemaError, migrate
from tests.conftest import nobody_runner

ALLOC = EventKind.ALLOCATION


def ev(revision: int, time: float = 0.0, **kw: object) -> Event:
    fields: dict[str, object] = {
        "kind": ALLOC,
        "type": 1,
        "object_id": f"a{revision}",
        "time": time,
        "data": f"payload {revision}".encode(),
    }
    fields.update(kw)
    return Event(revision, **fields)  # type: ignore[arg-type]


def put_write(revision: int, time: float = 0.0) -> Write:
    """One event describing one object put, as the engine writes them."""
    return Write(events=[ev(revision, time)], puts=[(ALLOC, f"a{revision}", b"v%d" % revision)])


@pytest.fixture
def db_path(tmp_path: Path) -> str:
    return str(tmp_path / "state" / "rmgrpc.db")


@pytest.fixture
async def store(db_path: str) -> AsyncIterator[Store]:
    s = await Store.open(db_path)
    yield s
    await s.close()


async def commit_range(store: Store, first: int, last: int, time: float = 0.0) -> None:
    for revision in range(first, last + 1):
        await store.commit(put_write(revision, time))


# --- basics and restart ---------------------------------------------------------------


async def test_new_database_is_empty_and_migrated(db_path: str) -> None:
    store = await Store.open(db_path)
    state = await store.load()
    await store.close()
    assert state.objects == {kind: {} for kind in EventKind}
    assert (state.last_revision, state.oldest_revision) == (0, 1)
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_restart_keeps_objects_events_and_revisions(db_path: str) -> None:
    store = await Store.open(db_path)
    events = [
        ev(1, 10.0, tenant="org/team", node_ids=("n1", "n2")),
        ev(2, 11.0, kind=EventKind.NODE, object_id="n1", type=3),
        ev(3, 12.0),
    ]
    await store.commit(
        Write(events=events[:2], puts=[(ALLOC, "a1", b"alloc"), (EventKind.NODE, "n1", b"node")])
    )
    await store.commit(
        Write(events=events[2:], puts=[(EventKind.QUOTA, "org", b"q")], deletes=[(ALLOC, "a1")])
    )
    await store.close()

    store = await Store.open(db_path)
    try:
        state = await store.load()
        assert state.objects[EventKind.NODE] == {"n1": b"node"}
        assert state.objects[EventKind.QUOTA] == {"org": b"q"}
        assert state.objects[ALLOC] == {}
        assert state.objects[EventKind.BUDGET] == {}
        assert (state.last_revision, state.oldest_revision) == (3, 1)
        assert await store.read_events(0) == events
        # Revisions continue where the previous process stopped, and only there.
        with pytest.raises(ValueError, match="expected 4"):
            await store.commit(put_write(5))
        await store.commit(put_write(4))
        assert store.last_revision == 4
    finally:
        await store.close()


async def test_later_writes_win_within_one_batch(store: Store) -> None:
    # All four land in one transaction; the final state must still follow their order.
    await asyncio.gather(
        store.commit(Write(puts=[(ALLOC, "x", b"1"), (ALLOC, "y", b"1")])),
        store.commit(Write(deletes=[(ALLOC, "x")])),
        store.commit(Write(deletes=[(ALLOC, "y")])),
        store.commit(Write(puts=[(ALLOC, "y", b"2")])),
    )
    assert store.transactions_committed == 1
    assert (await store.load()).objects[ALLOC] == {"y": b"2"}


async def test_event_fields_round_trip_and_node_ids_are_checked(store: Store) -> None:
    events = [
        ev(1, tenant="t", node_ids=("n-1",)),
        ev(2, node_ids=()),
        ev(3, node_ids=("a", "b", "c"), type=4, time=1.5),
    ]
    await store.commit(Write(events=events))
    assert await store.read_events(0) == events
    with pytest.raises(ValueError, match="node id"):
        await store.commit(Write(events=[ev(4, node_ids=("a,b",))]))
    with pytest.raises(ValueError, match="node id"):
        await store.commit(Write(events=[ev(4, node_ids=("",))]))
    with pytest.raises(ValueError, match="bytes"):
        await store.commit(Write(puts=[(ALLOC, "a", "text")]))  # type: ignore[list-item]


async def test_in_memory_store(tmp_path: Path) -> None:
    store = await Store.open(":memory:")
    try:
        await commit_range(store, 1, 5, time=1.0)
        assert [e.revision for e in await store.read_events(2)] == [3, 4, 5]
        assert await store.compact(max_events=2, min_time=0.0) == 4
        assert len((await store.load()).objects[ALLOC]) == 5
    finally:
        await store.close()
    assert list(tmp_path.iterdir()) == []


async def test_bad_synchronous_mode(db_path: str) -> None:
    with pytest.raises(ValueError):
        await Store.open(db_path, synchronous="SOMETIMES")


async def test_closed_store_refuses_work(db_path: str) -> None:
    store = await Store.open(db_path)
    await store.close()
    await store.close()  # idempotent
    with pytest.raises(StoreError, match="closed"):
        await store.commit(put_write(1))
    with pytest.raises(StoreError, match="closed"):
        await store.read_events(0)


async def test_close_drains_pending_commits(db_path: str) -> None:
    store = await Store.open(db_path)
    futures = [store.submit(put_write(revision)) for revision in range(1, 21)]
    await store.close()
    assert all(f.done() and f.exception() is None for f in futures)
    store = await Store.open(db_path)
    try:
        assert store.last_revision == 20
        assert len((await store.load()).objects[ALLOC]) == 20
    finally:
        await store.close()


# --- group commit ----------------------------------------------------------------------


async def test_group_commit_lands_everything_in_few_transactions(db_path: str) -> None:
    seen: list[int] = []
    calls: list[int] = []

    def on_commit(events: object) -> None:
        assert isinstance(events, list)
        # Called only once the data is durable: the store already counts it as committed.
        assert opened.last_revision == events[-1].revision
        calls.append(len(events))
        seen.extend(e.revision for e in events)

    opened = await Store.open(db_path, on_commit=on_commit)
    store = opened
    try:
        # Revisions are assigned in call order, as the engine does under its own lock.
        await asyncio.gather(*(store.commit(put_write(r)) for r in range(1, 101)))
        assert seen == list(range(1, 101))
        assert store.transactions_committed <= 10 < 100
        assert sum(calls) == 100
        assert [e.revision for e in await store.read_events(0, limit=200)] == seen
        assert len((await store.load()).objects[ALLOC]) == 100
    finally:
        await store.close()


async def test_checkpoints_run_beside_the_writer_and_keep_the_wal_small(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer leaves checkpoints to the checkpointer (its own would stall every commit
    queued behind it) and checkpoints itself only past ~40 MB of WAL; the checkpointer
    keeps the WAL near one interval's worth of writes."""
    monkeypatch.setattr(sqlite_store, "CHECKPOINT_EVERY_SECONDS", 0.02)
    store = await Store.open(db_path)
    big = b"x" * 8192
    try:
        for revision in range(1, 601):  # ~22 MB of WAL frames (~9 4-KiB pages each)
            event = Event(revision, ALLOC, 1, f"a{revision}", 0.0, big)
            await store.commit(Write(events=[event], puts=[(ALLOC, f"a{revision}", big)]))
            if revision % 100 == 0:
                # A complete checkpoint after this block's last commit: the whole WAL
                # is copied, and the next commit starts it over.
                async with asyncio.timeout(30):
                    while store.checkpointed_through < store.transactions_committed:
                        await asyncio.sleep(0.005)
        # Two blocks of 100 commits at most (~7.5 MB), where nothing but the writer's own
        # safety net would let it grow to the whole ~22 MB.
        assert os.path.getsize(db_path + "-wal") < 8 << 20
        async with aiosqlite.connect(db_path) as other:
            (limit,) = await (await other.execute("PRAGMA wal_autocheckpoint")).fetchone()
        assert limit == 1000  # a setting of the writer's connection only
    finally:
        await store.close()
    assert not os.path.exists(db_path + "-wal")  # the writer closed last, removing it


async def test_concurrent_committers_keep_order(db_path: str) -> None:
    seen: list[int] = []
    store = await Store.open(db_path)
    # Attached after open, as the engine does once its watch hub exists.
    store.on_commit = lambda evs: seen.extend(e.revision for e in evs)
    counter = iter(range(1, 1_000_000))

    async def committer() -> None:
        for _ in range(20):
            # No await between taking a revision and submitting it.
            await store.submit(put_write(next(counter)))

    try:
        await asyncio.gather(*(committer() for _ in range(25)))
        assert seen == list(range(1, 501))
        assert store.transactions_committed < 100
    finally:
        await store.close()


async def test_gap_fails_only_its_caller(store: Store) -> None:
    results = await asyncio.gather(
        store.commit(put_write(1)),
        store.commit(put_write(3)),  # gap: rejected before it is queued
        store.commit(put_write(2)),
        return_exceptions=True,
    )
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], ValueError)
    assert store.last_revision == 2
    with pytest.raises(ValueError):
        await store.commit(put_write(2))  # a repeat is a gap too


async def test_failed_transaction_fails_its_batch_and_applies_nothing(db_path: str) -> None:
    store = await Store.open(db_path)
    await commit_range(store, 1, 2)
    await store.close()
    # A trigger makes one object id fail inside SQLite, after validation passed.
    with sqlite3.connect(db_path) as conn:
        conn.execute(
            "CREATE TRIGGER poison BEFORE INSERT ON objects WHEN NEW.id = 'poison'"
            " BEGIN SELECT RAISE(ABORT, 'poisoned'); END"
        )
    seen: list[int] = []
    store = await Store.open(db_path, on_commit=lambda evs: seen.extend(e.revision for e in evs))
    try:
        poisoned = Write(events=[ev(4)], puts=[(ALLOC, "poison", b"x")])
        results = await asyncio.gather(
            store.commit(put_write(3)), store.commit(poisoned), return_exceptions=True
        )
        assert all(isinstance(r, StoreError) and "poisoned" in str(r) for r in results)
        assert seen == [] and store.last_revision == 2
        assert [e.revision for e in await store.read_events(0)] == [1, 2]

        # A write queued behind a failing batch continues its revisions: it fails too.
        first = store.submit(Write(events=[ev(3)], puts=[(ALLOC, "poison", b"x")]))
        for _ in range(3):
            await asyncio.sleep(0)  # let the writer take the first batch
        behind = store.submit(put_write(4))
        with pytest.raises(StoreError, match="poisoned"):
            await first
        with pytest.raises(StoreError, match="earlier"):
            await behind

        # Revisions restart after the last durable one.
        await store.commit(put_write(3))
        assert seen == [3] and store.last_revision == 3
        assert sorted((await store.load()).objects[ALLOC]) == ["a1", "a2", "a3"]
    finally:
        await store.close()


async def test_on_commit_error_does_not_fail_durable_commits(
    db_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(events: object) -> None:
        raise RuntimeError("watcher bug")

    store = await Store.open(db_path, on_commit=broken)
    try:
        await store.commit(put_write(1))
        assert store.last_revision == 1
        assert "on_commit failed" in caplog.text
    finally:
        await store.close()


# --- reading and compaction ------------------------------------------------------------


async def test_read_events_paging(store: Store) -> None:
    await store.commit(Write(events=[ev(r) for r in range(1, 26)]))
    pages: list[list[int]] = []
    after = 0
    while page := await store.read_events(after, limit=10):
        pages.append([e.revision for e in page])
        after = page[-1].revision
    assert pages == [list(range(1, 11)), list(range(11, 21)), list(range(21, 26))]
    assert await store.read_events(25) == []
    assert await store.read_events(1000) == []
    with pytest.raises(ValueError):
        await store.read_events(0, limit=0)


async def test_compaction_by_count(store: Store) -> None:
    await commit_range(store, 1, 10, time=100.0)
    assert await store.compact(max_events=4, min_time=0.0) == 7
    assert (store.oldest_revision, store.last_revision) == (7, 10)
    assert [e.revision for e in await store.read_events(6)] == [7, 8, 9, 10]
    # What was compacted is simply gone: the caller sees the log start at 7.
    assert [e.revision for e in await store.read_events(3, limit=2)] == [7, 8]
    # Nothing more to drop: unchanged.
    assert await store.compact(max_events=4, min_time=0.0) == 7
    # Objects are current state, not history: compaction leaves them alone.
    assert len((await store.load()).objects[ALLOC]) == 10


async def test_compaction_by_age_removes_only_a_prefix(store: Store) -> None:
    times = [1.0, 2.0, 9.0, 3.0, 10.0, 11.0]
    await store.commit(Write(events=[ev(r, t) for r, t in enumerate(times, start=1)]))
    # Revision 4 (time 3) is old but follows a young one: it stays, so the log stays gapless.
    assert await store.compact(max_events=100, min_time=5.0) == 3
    assert [e.revision for e in await store.read_events(2)] == [3, 4, 5, 6]
    assert await store.compact(max_events=100, min_time=10.5) == 6


async def test_compaction_of_everything_survives_restart(db_path: str) -> None:
    store = await Store.open(db_path)
    await commit_range(store, 1, 5)
    assert await store.compact(max_events=0, min_time=0.0) == 6
    assert (store.last_revision, store.oldest_revision) == (5, 6)
    assert await store.read_events(0) == []
    await store.close()

    store = await Store.open(db_path)
    try:
        state = await store.load()
        assert (state.last_revision, state.oldest_revision) == (5, 6)
        with pytest.raises(ValueError):
            await store.commit(put_write(1))
        await store.commit(put_write(6))
        assert [e.revision for e in await store.read_events(5)] == [6]
        assert (store.last_revision, store.oldest_revision) == (6, 6)
    finally:
        await store.close()

    store = await Store.open(db_path)
    try:
        assert (store.last_revision, store.oldest_revision) == (6, 6)
    finally:
        await store.close()


# --- schema ----------------------------------------------------------------------------


async def test_migration_from_an_existing_empty_database(db_path: str) -> None:
    Path(db_path).parent.mkdir(parents=True)
    sqlite3.connect(db_path).close()  # a valid SQLite file with no tables, version 0
    store = await Store.open(db_path)
    try:
        await store.commit(put_write(1))
    finally:
        await store.close()
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"objects", "events", "meta"} <= tables


async def test_each_migration_step_is_one_transaction(tmp_path: Path) -> None:
    steps = [
        ("CREATE TABLE a (x)",),
        ("CREATE TABLE b (x)", "THIS IS NOT SQL"),
    ]
    conn = await aiosqlite.connect(str(tmp_path / "m.db"), isolation_level=None)
    try:
        with pytest.raises(SchemaError, match="version 2"):
            await migrate(conn, steps)
        rows = await conn.execute_fetchall("SELECT name FROM sqlite_master WHERE type='table'")
        assert [r[0] for r in rows] == ["a"]  # step 2 left nothing behind
        steps[1] = ("CREATE TABLE b (x)",)
        assert await migrate(conn, steps) == 2
        rows = await conn.execute_fetchall("PRAGMA user_version")
        assert next(iter(rows))[0] == 2
    finally:
        await conn.close()


async def test_newer_schema_version_is_refused(db_path: str) -> None:
    await (await Store.open(db_path)).close()
    with sqlite3.connect(db_path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="newer"):
        await Store.open(db_path)


# --- opening: locks and bad files ------------------------------------------------------


async def test_second_open_of_a_locked_database_fails(db_path: str) -> None:
    first = await Store.open(db_path)
    with pytest.raises(StoreError, match="in use by another rmgrpc process") as info:
        await Store.open(db_path)
    assert "\n" not in str(info.value)
    await first.close()
    second = await Store.open(db_path)
    await second.close()


async def test_garbage_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "garbage.db"
    path.write_bytes(b"this is not a database, just some text\n" * 200)
    with pytest.raises(StoreError, match="not a database") as info:
        await Store.open(str(path))
    assert "\n" not in str(info.value)
    # The failed open released its lock: a real database there opens fine.
    path.unlink()
    await (await Store.open(str(path))).close()


async def test_unusable_paths_are_refused(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="directory"):
        await Store.open(str(tmp_path))
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="cannot open"):
        await Store.open(str(tmp_path / "file" / "sub" / "db"))


def one_line(info: pytest.ExceptionInfo[StoreError]) -> str:
    message = str(info.value)
    assert "\n" not in message
    return message


async def test_other_paths_to_a_locked_database_are_refused(db_path: str) -> None:
    state = Path(db_path).parent
    first = await Store.open(db_path)
    (state.parent / "link").symlink_to(db_path)
    (state / "sub").mkdir()
    os.link(db_path, state / "hard.db")
    others = [
        str(state.parent / "link"),  # symlink
        str(state / "sub" / ".." / "rmgrpc.db"),  # a path through ..
        str(state / "hard.db"),  # hard link: another real path, the same inode
    ]
    try:
        for other in others:
            with pytest.raises(StoreError) as info:
                await Store.open(other)
            assert "in use by another rmgrpc process" in one_line(info)
    finally:
        await first.close()
    # Closing released every lock: the hard link opens now.
    await (await Store.open(others[2])).close()


HARD_LINK_CHILD = r"""
import asyncio, sys
from rmgrpc.store import Store, StoreError
try:
    asyncio.run(Store.open(sys.argv[1]))
except StoreError as e:
    print(e)
"""


async def test_hard_link_is_refused_to_another_process(db_path: str) -> None:
    # In-process the registry refuses first; only another process exercises the flock on
    # the database file itself.
    hard = str(Path(db_path).parent / "hard.db")
    first = await Store.open(db_path)
    try:
        os.link(db_path, hard)
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-c", HARD_LINK_CHILD, hard, stdout=subprocess.PIPE
        )
        out, _ = await child.communicate()
        assert "in use by another rmgrpc process" in out.decode()
        assert "the same file under another name" in out.decode()
        # The first store is unharmed.
        await store_commit_one(first)
    finally:
        await first.close()


async def store_commit_one(store: Store) -> None:
    await store.commit(put_write(store.last_revision + 1))


# --- the file deleted or replaced under a running store -------------------------------


def replace_with_other_database(db_path: str) -> None:
    other = db_path + ".other"
    sqlite3.connect(other).close()
    os.replace(other, db_path)


@pytest.mark.parametrize(
    "damage",
    [
        os.unlink,
        replace_with_other_database,
        lambda path: shutil.rmtree(os.path.dirname(path)),
    ],
    ids=["deleted", "replaced", "directory-removed"],
)
async def test_no_commit_is_acknowledged_once_the_file_is_gone(
    db_path: str, damage: Callable[[str], None]
) -> None:
    store = await Store.open(db_path)
    try:
        await commit_range(store, 1, 3)
        damage(db_path)
        with pytest.raises(StoreError) as info:
            await store.commit(put_write(4))
        message = one_line(info)
        assert db_path in message and "deleted or replaced" in message
        assert store.last_revision == 3
        # It stays failed: later commits and compaction refuse too, without a transaction.
        committed = store.transactions_committed
        with pytest.raises(StoreError, match="deleted or replaced"):
            await store.commit(put_write(4))
        with pytest.raises(StoreError, match="deleted or replaced"):
            await store.compact(max_events=0, min_time=0.0)
        assert store.transactions_committed == committed
    finally:
        await store.close()


# --- read-only ------------------------------------------------------------------------


async def test_read_only_by_permissions_is_refused(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Simulates a non-root user without write permission (see the runuser test for the
    # real thing): only os.access says no.
    await (await Store.open(db_path)).close()
    real_access = os.access
    monkeypatch.setattr(
        "rmgrpc.store.sqlite.os.access",
        lambda p, mode: False if mode & os.W_OK else real_access(p, mode),
    )
    with pytest.raises(StoreError) as info:
        await Store.open(db_path)
    message = one_line(info)
    assert db_path in message and "is read-only" in message and "writable" in message


async def test_read_only_found_by_the_write_probe(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What os.access cannot see (root, whom permission bits do not stop, or storage that
    # refuses writes anyway): the writer connection opened read-only, so SQLite's real
    # SQLITE_READONLY answers the probe.
    await (await Store.open(db_path)).close()
    from rmgrpc.store import sqlite as store_sqlite

    async def read_only_writer(path: str, synchronous: str) -> aiosqlite.Connection:
        conn = await aiosqlite.connect(
            Path(path).as_uri() + "?mode=ro", uri=True, isolation_level=None
        )
        await conn.execute("PRAGMA journal_mode = WAL")
        return conn

    monkeypatch.setattr(store_sqlite, "_connect_writer", read_only_writer)
    with pytest.raises(StoreError) as info:
        await Store.open(db_path)
    assert "is read-only" in one_line(info)
    # The failed open released its locks.
    monkeypatch.undo()
    await (await Store.open(db_path)).close()


READ_ONLY_CHILD = r"""
import asyncio, sys
from rmgrpc.store import Store, StoreError
try:
    asyncio.run(Store.open(sys.argv[1]))
    print("opened")
except StoreError as e:
    print(e)
"""


def nobody_python() -> list[str] | None:
    """A command running Python as `nobody`, when root and the tools are here."""
    found = nobody_runner()
    if found is None:
        return None
    runner, python = found
    site = [p for p in sys.path if p.endswith("site-packages")]
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = f"PYTHONPATH={os.pathsep.join([src, *site])}"
    cmd = [*runner, env, python]
    probe = subprocess.run([*cmd, "-c", "import rmgrpc.store"], capture_output=True)
    return cmd if probe.returncode == 0 else None


@pytest.mark.parametrize("what", ["file", "directory"])
def test_read_only_for_a_real_non_root_user(what: str) -> None:
    """Real permission bits against a real non-root process (root itself ignores them):
    `nobody` when we are root, else this process."""
    cmd = nobody_python() if os.geteuid() == 0 else [sys.executable]
    if cmd is None:
        pytest.skip("as root, needs runuser, a `nobody` user and a system python")
    # Under /tmp, since pytest's tmp_path is private to root.
    directory = Path(tempfile.mkdtemp(prefix="rmgrpc-ro-"))
    try:
        db = str(directory / "rmgrpc.db")
        asyncio.run(_create(db))
        os.chmod(db, 0o666 if what == "directory" else 0o444)
        os.chmod(directory, 0o555 if what == "directory" else 0o777)
        out = subprocess.run(
            [*cmd, "-c", READ_ONLY_CHILD, db], capture_output=True, text=True, timeout=60
        )
        assert out.stdout.strip().startswith(f"database {db} is read-only"), out
        assert out.stdout.count("\n") == 1
    finally:
        directory.chmod(0o700)
        shutil.rmtree(directory)


async def _create(db: str) -> None:
    store = await Store.open(db)
    await commit_range(store, 1, 3)
    await store.close()


# --- corrupt files and gaps -----------------------------------------------------------


def zero_pages(path: Path) -> None:
    size = path.stat().st_size
    with path.open("r+b") as f:
        # Page 1 holds the header and schema; pages 2..N the tables.
        f.seek(4096)
        f.write(bytes(size - 4096))


def zero_object_leaves(path: Path) -> None:
    # Only the objects table: the event log stays readable, so nothing but the integrity
    # check at open sees it (load would fail later, after the server started).
    with sqlite3.connect(path) as conn:
        pages = [
            n
            for (n,) in conn.execute(
                "SELECT pageno FROM dbstat WHERE name = 'objects' AND pagetype = 'leaf'"
            )
        ]
    assert pages
    with path.open("r+b") as f:
        for n in pages:
            f.seek((n - 1) * 4096)
            f.write(bytes(4096))


@pytest.mark.parametrize(
    "damage",
    [
        zero_pages,
        zero_object_leaves,
        lambda path: os.truncate(path, path.stat().st_size // 2),
        lambda path: os.truncate(path, 100),
        lambda path: path.write_bytes(os.urandom(64 * 1024)),
    ],
    ids=["zeroed-pages", "objects-zeroed", "truncated-half", "truncated-header", "random-bytes"],
)
async def test_corrupt_file_is_refused_at_open(
    db_path: str, damage: Callable[[Path], None]
) -> None:
    store = await Store.open(db_path)
    for revision in range(1, 201):
        await store.commit(Write(events=[ev(revision)], puts=[(ALLOC, f"a{revision}", bytes(500))]))
    await store.close()
    assert Path(db_path).stat().st_size > 20 * 4096
    damage(Path(db_path))
    with pytest.raises(StoreError) as info:
        await Store.open(db_path)
    message = one_line(info)
    assert message.startswith(f"database {db_path} is corrupt (")
    assert "restore it from a backup, or move it away" in message
    # The failed open released its locks: moving it away and starting empty works.
    os.replace(db_path, db_path + ".bad")
    await (await Store.open(db_path)).close()


async def test_gap_in_the_event_log_is_refused_at_open(db_path: str) -> None:
    store = await Store.open(db_path)
    await commit_range(store, 1, 10)
    await store.compact(max_events=8, min_time=0.0)
    await store.close()
    with sqlite3.connect(db_path) as conn:
        conn.execute("DELETE FROM events WHERE revision IN (6, 7)")
    with pytest.raises(StoreError) as info:
        await Store.open(db_path)
    message = one_line(info)
    assert "gap in its event log: revision 6 is missing (retained 3..10)" in message
    assert db_path in message and "restore it from a backup" in message

    # The oldest retained event missing is a gap too.
    with sqlite3.connect(db_path) as conn:
        conn.execute("DELETE FROM events WHERE revision < 8")
    with pytest.raises(StoreError, match="revision 3 is missing"):
        await Store.open(db_path)


async def test_read_events_never_skips_a_missing_revision(store: Store, db_path: str) -> None:
    await commit_range(store, 1, 10)
    with sqlite3.connect(db_path) as conn:
        conn.execute("DELETE FROM events WHERE revision = 5")
    with pytest.raises(StoreError, match="revision 5 is missing"):
        await store.read_events(0)
    # A batch that starts after the hole is fine: it may be compaction, the caller checks.
    assert [e.revision for e in await store.read_events(5)] == [6, 7, 8, 9, 10]
    assert [e.revision for e in await store.read_events(0, limit=4)] == [1, 2, 3, 4]


# --- the contract ---------------------------------------------------------------------


async def test_store_satisfies_the_event_store_protocol(store: Store) -> None:
    # Statically checked in rmgrpc.store.sqlite; runtime_checkable sees the members.
    contract: EventStore = store
    assert isinstance(contract, EventStore)


# --- kill -9 ---------------------------------------------------------------------------

CHILD = r"""
import asyncio, sys
from rmgrpc.model import Event, EventKind
from rmgrpc.store import Store, Write

async def main() -> None:
    store = await Store.open(sys.argv[1])
    print("ready", flush=True)
    slots = asyncio.Semaphore(8)
    tasks = set()

    async def one(revision: int) -> None:
        await store.commit(Write(
            events=[Event(revision, EventKind.ALLOCATION, 1, f"a{revision}", 0.0, b"e")],
            puts=[(EventKind.ALLOCATION, f"a{revision}", b"%d" % revision)],
        ))
        sys.stdout.write(f"{revision}\n")
        sys.stdout.flush()
        slots.release()

    revision = store.last_revision
    while True:
        await slots.acquire()
        revision += 1
        task = asyncio.ensure_future(one(revision))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

asyncio.run(main())
"""


def test_acknowledged_commits_survive_kill_9(db_path: str) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, db_path],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    acked: list[int] = []
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == "ready\n"
        deadline = time.monotonic() + 20
        while len(acked) < 400 and time.monotonic() < deadline:
            line = child.stdout.readline()
            if not line:
                break
            acked.append(int(line))
        assert len(acked) >= 400, child.stderr.read() if child.stderr else ""
        # While the child lives, its lock keeps us out.
        with pytest.raises(StoreError, match="in use"):
            asyncio.run(Store.open(db_path))
    finally:
        os.kill(child.pid, signal.SIGKILL)
        out, _ = child.communicate(timeout=10)
    # Lines the child wrote before dying were acknowledged too.
    acked += [int(line) for line in out.split()]
    assert child.returncode == -signal.SIGKILL

    async def check() -> None:
        # The kernel released the dead child's lock.
        store = await Store.open(db_path)
        try:
            events = await store.read_events(0, limit=1_000_000)
            revisions = [e.revision for e in events]
            assert revisions == list(range(1, store.last_revision + 1))
            assert set(acked) <= set(revisions)
            objects = (await store.load()).objects[EventKind.ALLOCATION]
            assert all(objects[f"a{r}"] == b"%d" % r for r in acked)
            # And the log continues without a gap.
            await store.commit(put_write(store.last_revision + 1))
        finally:
            await store.close()

    asyncio.run(check())
