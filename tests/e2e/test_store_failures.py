"""The store fails closed, seen through the real `rmgrpc serve`: a damaged, read-only or
already-served database stops the start with one line naming the file and what to do, and
a database deleted or replaced under a running server stops it acknowledging writes."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from rmgrpc.v1 import allocator_pb2 as pb
from rmgrpc.v1 import allocator_pb2_grpc
from rmgrpc.v1.resources_pb2 import Shape
from tests.conftest import ServerProcess, free_port, nobody_runner

SHAPE = Shape(gpus=1, cpu_millis=100, memory_bytes=1 << 20)
FIX = "restore it from a backup, or move it away to start with an empty database"
PAGE = 4096


def serve(db: Path | str, prefix: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    """`rmgrpc serve` on `db`, expected to refuse to start."""
    args = ["serve", "--listen", f"127.0.0.1:{free_port()}", "--db", str(db)]
    return subprocess.run(
        [*(prefix or [sys.executable, "-m", "rmgrpc"]), *args, "--metrics-listen", ""],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "RMGRPC_NVML": "off", "RMGRPC_SIMULATED_NODES": "2"},
    )


def refused(proc: subprocess.CompletedProcess[str]) -> str:
    """The one line a refused start prints (and that it exited non-zero)."""
    assert proc.returncode != 0, proc
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("rmgrpc: ")
    return lines[0]


def allocate_and_release(target: str, count: int, first: int = 0) -> None:
    with grpc.insecure_channel(target) as channel:
        stub = allocator_pb2_grpc.AllocatorServiceStub(channel)
        for i in range(first, first + count):
            a = stub.Allocate(
                pb.AllocateRequest(tenant="org/a", request_id=f"r{i}", count=1, shape=SHAPE)
            ).allocation
            if i % 2:
                stub.ReleaseAllocation(pb.ReleaseAllocationRequest(id=a.id))


@pytest.fixture(scope="module")
def served_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A database a real server wrote and shut down cleanly."""
    db = tmp_path_factory.mktemp("template") / "rmgrpc.db"
    proc = ServerProcess(db).start()
    try:
        allocate_and_release(proc.target, 60)
        assert proc.terminate() == 0
    finally:
        proc.stop()
    assert db.stat().st_size >= 8 * PAGE
    return db


@pytest.fixture
def db(served_db: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "rmgrpc.db"
    shutil.copy(served_db, copy)
    return copy


def zero_pages(path: Path) -> None:
    # Pages 2..N: the header survives, the tables do not.
    with path.open("r+b") as f:
        f.seek(PAGE)
        f.write(bytes(path.stat().st_size - PAGE))


def zero_middle(path: Path) -> None:
    # One page of the objects table (not a free page, whose loss would be harmless): SQLite
    # still opens the file and reads the event log; only the integrity check notices.
    with sqlite3.connect(path) as conn:
        pages = [
            n
            for (n,) in conn.execute(
                "SELECT pageno FROM dbstat WHERE name = 'objects' ORDER BY pageno"
            )
        ]
    with path.open("r+b") as f:
        f.seek(PAGE * (pages[len(pages) // 2] - 1))
        f.write(bytes(PAGE))


@pytest.mark.parametrize(
    "damage",
    [
        lambda path: path.write_bytes(os.urandom(path.stat().st_size)),
        zero_pages,
        zero_middle,
        lambda path: os.truncate(path, path.stat().st_size // 2),
        lambda path: os.truncate(path, 100),
    ],
    ids=["random-bytes", "zeroed-pages", "zeroed-middle", "truncated", "truncated-header"],
)
def test_corrupt_database_is_one_line(db: Path, damage: Callable[[Path], None]) -> None:
    damage(db)
    line = refused(serve(db))
    assert f"database {db} is corrupt (" in line and FIX in line
    # Doing what it says works.
    db.rename(db.with_suffix(".bad"))
    ServerProcess(db).start().terminate()


def test_gap_in_the_event_log_is_one_line(db: Path) -> None:
    with sqlite3.connect(db) as conn:
        last = conn.execute("SELECT MAX(revision) FROM events").fetchone()[0]
        conn.execute("DELETE FROM events WHERE revision = ?", (last // 2,))
    line = refused(serve(db))
    assert f"database {db} has a gap in its event log: revision {last // 2} is missing" in line
    assert FIX in line


@pytest.mark.parametrize("how", ["symlink", "hard-link", "dot-dot"])
def test_other_paths_to_a_served_database_are_refused(tmp_path: Path, how: str) -> None:
    db = tmp_path / "rmgrpc.db"
    proc = ServerProcess(db).start()
    try:
        if how == "symlink":
            other = db.parent / "link.db"
            other.symlink_to(db)
        elif how == "hard-link":
            other = db.parent / "hard.db"
            os.link(db, other)
        else:
            (db.parent / "sub").mkdir()
            other = db.parent / "sub" / ".." / db.name
        assert "in use by another rmgrpc process" in refused(serve(other))
    finally:
        assert proc.terminate() == 0


def replace_with_another_database(path: Path) -> None:
    other = path.with_suffix(".other")
    sqlite3.connect(other).close()
    os.replace(other, path)


@pytest.mark.parametrize(
    "damage", [Path.unlink, replace_with_another_database], ids=["deleted", "replaced"]
)
def test_database_gone_while_serving_stops_acknowledging(
    tmp_path: Path, damage: Callable[[Path], None]
) -> None:
    db = tmp_path / "rmgrpc.db"
    proc = ServerProcess(db).start()
    try:
        allocate_and_release(proc.target, 2)
        damage(db)
        with pytest.raises(grpc.RpcError) as info:
            # A new request id: a repeated one would be answered without a write.
            allocate_and_release(proc.target, 1, first=2)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        # The engine treats a failed commit as fatal: the server exits non-zero by itself.
        assert proc.proc is not None
        assert proc.proc.wait(30) != 0
        assert proc.proc.stderr is not None
        assert "deleted or replaced" in proc.proc.stderr.read()
    finally:
        proc.stop()


def nobody_prefix() -> list[str] | None:
    """A command line running `rmgrpc` as `nobody`, when root with runuser and a system
    Python of this version (the venv's interpreter may sit under /root, out of reach)."""
    found = nobody_runner()
    if found is None:
        return None
    runner, python = found
    code = (
        "import site, sys; site.addsitedir(sys.argv.pop(1));"
        " from rmgrpc.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    site = sysconfig.get_paths()["purelib"]
    prefix = [*runner, python, "-c", code, site]
    probe = subprocess.run([*prefix, "config"], capture_output=True, timeout=60)
    return prefix if probe.returncode == 0 else None


@pytest.fixture
def world_dir() -> Iterator[Path]:
    # pytest's tmp_path is private to root; nobody needs to reach the database.
    directory = Path(tempfile.mkdtemp(prefix="rmgrpc-ro-"))
    yield directory
    shutil.rmtree(directory)


@pytest.mark.parametrize("what", ["file", "directory"])
def test_read_only_database_is_one_line(served_db: Path, world_dir: Path, what: str) -> None:
    """Real permission bits, against the server run as a real non-root user."""
    prefix = nobody_prefix()
    if prefix is None:
        pytest.skip("needs root, runuser, a `nobody` user and a system python")
    db = world_dir / "rmgrpc.db"
    shutil.copy(served_db, db)
    # The file read-only, or writable in a directory where -wal/-shm cannot be created.
    world_dir.chmod(0o755 if what == "directory" else 0o777)
    db.chmod(0o666 if what == "directory" else 0o644)
    line = refused(serve(db, prefix))
    assert f"database {db} is read-only" in line and "writable" in line


@pytest.mark.parametrize("kind", ["allocation", "node", "quota"])
def test_an_undecodable_row_is_one_line_naming_it(db: Path, kind: str) -> None:
    """A row SQLite reads fine but rmgrpc cannot decode stops the start with one line
    naming the file, the object and what to do."""
    conn = sqlite3.connect(db)
    with conn:
        conn.execute(
            "INSERT INTO objects (kind, id, data) VALUES (?, ?, ?)"
            " ON CONFLICT (kind, id) DO UPDATE SET data = excluded.data",
            (kind, "broken", b"\xff\xff\xff\xff not a protobuf"),
        )
    conn.close()
    line = refused(serve(db))
    assert str(db) in line and "broken" in line and kind in line
    assert "restore a backup" in line
