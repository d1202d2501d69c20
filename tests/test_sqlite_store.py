"""
What only the SQLite store promises: totals and remembered ids survive a
restart, the schema is versioned, a database it cannot use is refused at
start, and a failing write is reported, never acknowledged, and recovered
from.
"""

from __future__ import annotations

import json
import random
import sqlite3
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import Clock, deferLater
from twisted.logger import LogLevel, capturedLogs

from steptrackd import sqlite_store
from steptrackd.sqlite_store import (
    APPLICATION_ID,
    MIGRATIONS,
    SCHEMA_VERSION,
    SQLiteStore,
    lock_database,
    open_database,
)
from steptrackd.store import Outcome, StoreUnusable, StoreWriteFailed, Total
from steptrackd.update import Update

from .test_store import THREAD_CALLS, result_of


def open_store(path: Path) -> SQLiteStore:
    store = SQLiteStore(str(path), THREAD_CALLS, Clock())
    store.startService()
    return store


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "steps.sqlite3"


@pytest.fixture
def store(path: Path) -> Iterator[SQLiteStore]:
    store = open_store(path)
    yield store
    result_of(store.close())


def test_totals_and_ids_survive_a_restart(path: Path) -> None:
    """After close and reopen, totals are there and a resend is still a duplicate."""
    store = open_store(path)
    result_of(store.apply([Update("a", 5, 10, "id-1"), Update("a", 2.5, 1)]))
    result_of(store.close())
    again = open_store(path)
    assert result_of(again.total("a")) == Total(11, 5)
    assert result_of(again.apply([Update("a", 9, 10, "id-1")])) == [Outcome.DUPLICATE]
    assert result_of(again.total("a")) == Total(11, 5)
    result_of(again.close())


def test_close_commits_everything_handed_over(path: Path) -> None:
    """Updates handed over before close() are committed, even if not yet answered."""
    store = open_store(path)
    pending = [store.apply([Update("u", i, 1, f"id-{i}")]) for i in range(500)]
    result_of(store.close())
    assert all(d.called for d in pending)
    again = open_store(path)
    assert result_of(again.total("u")) == Total(500, 499)
    result_of(again.close())


def test_ts_keeps_its_type_on_disk(path: Path) -> None:
    """An integer ts reads back as an int and a float as a float, after a restart."""
    store = open_store(path)
    result_of(store.apply([Update("i", 7, 1), Update("f", 7.0, 1)]))
    result_of(store.close())
    again = open_store(path)
    assert type(result_of(again.total("i")).ts) is int  # type: ignore[union-attr]
    assert type(result_of(again.total("f")).ts) is float  # type: ignore[union-attr]
    result_of(again.close())


def test_new_database_gets_the_current_schema(store: SQLiteStore, path: Path) -> None:
    """A new file is a steptrack database at the current version, in WAL mode."""
    connection = sqlite3.connect(path)
    assert connection.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert connection.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
    assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    connection.close()


def build_database(path: Path, version: int) -> None:
    """A database as steptrack left it at schema ``version``, with some data."""
    connection = sqlite3.connect(path, isolation_level=None)
    for statement in (s for step in MIGRATIONS[:version] for s in step):
        connection.execute(statement)
    if version > 0:
        connection.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        connection.execute(f"PRAGMA user_version = {version}")
        # The same three columns at versions 1 and 2; the order applied.
        connection.execute("INSERT INTO totals VALUES ('old', 42, 7)")
        connection.execute("INSERT INTO applied_ids VALUES ('old', 'x', 1.0)")
        connection.execute("INSERT INTO applied_ids VALUES ('old', 'y', 2.0)")
    connection.close()


@pytest.mark.parametrize("version", range(SCHEMA_VERSION))
def test_older_database_is_migrated(path: Path, version: int) -> None:
    """A database at any older schema version is migrated forward, keeping its data."""
    build_database(path, version)
    with capturedLogs() as events:
        store = open_store(path)
    migrated = any("Migrated" in str(e.get("log_format")) for e in events)
    assert migrated == (version > 0)
    if version > 0:
        assert result_of(store.total("old")) == Total(42, 7)
        assert result_of(store.apply([Update("old", 1, 1, "x")])) == [Outcome.DUPLICATE]
    assert result_of(store.apply([Update("old", 9, 1, "z")])) == [Outcome.APPLIED]
    result_of(store.close())
    connection = sqlite3.connect(path)
    assert connection.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    names = {row[0] for row in connection.execute("SELECT name FROM sqlite_schema")}
    assert names == {
        "totals",
        "totals_by_seq",
        "applied_ids",
        "commit_counter",
        "sqlite_sequence",
    }
    old = [("old", "x", 1.0), ("old", "y", 2.0)] if version > 0 else []
    rows = connection.execute("SELECT * FROM applied_ids ORDER BY id").fetchall()
    assert rows == [(i + 1, *row) for i, row in enumerate(old)] + [
        (len(old) + 1, "old", "z", 0.0)
    ]
    steps = 43 if version > 0 else 1
    # Only shared stores number their groups (a store alone need not).
    assert connection.execute("SELECT steps, ts, seq FROM totals").fetchall() == [
        (steps, 9, 0)
    ]
    connection.close()
    shared = SQLiteStore(str(path), THREAD_CALLS, Clock(), shared=True)
    shared.startService()
    assert result_of(shared.total("old")) == Total(steps, 9)
    assert result_of(shared.apply([Update("old", 10, 1, "w")])) == [Outcome.APPLIED]
    result_of(shared.close())
    connection = sqlite3.connect(path)
    assert connection.execute("SELECT steps, ts, seq FROM totals").fetchall() == [
        (steps + 1, 10, 1)
    ]
    assert connection.execute("SELECT seq FROM commit_counter").fetchall() == [(1,)]
    assert connection.execute("SELECT max(id) FROM applied_ids").fetchone() == (
        len(old) + 2,
    )
    connection.close()


class ReadsTheVersionTooEarly(sqlite3.Connection):
    """A connection that reads the schema version as it was at version 2."""

    early = True

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql == "PRAGMA user_version" and self.early:
            self.early = False
            return super().execute("SELECT 2")
        return super().execute(sql, *args)


def test_a_migration_done_meanwhile_is_not_done_again(path: Path) -> None:
    """Two processes opening an old database at once: the second skips the steps."""
    build_database(path, 2)
    open_database(str(path)).close()
    late = sqlite3.connect(path, isolation_level=None, factory=ReadsTheVersionTooEarly)
    with capturedLogs() as events:
        sqlite_store._prepare(late, str(path))
    late.close()
    assert not any("Migrated" in str(e.get("log_format")) for e in events)
    store = open_store(path)
    assert result_of(store.total("old")) == Total(42, 7)
    assert result_of(store.apply([Update("old", 1, 1, "y")])) == [Outcome.DUPLICATE]
    result_of(store.close())


def test_newer_database_is_refused(path: Path) -> None:
    """A database from a newer steptrack is refused at start, saying so."""
    result_of(open_store(path).close())
    connection = sqlite3.connect(path)
    connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    connection.close()
    with pytest.raises(StoreUnusable, match="newer"):
        SQLiteStore(str(path), THREAD_CALLS, Clock()).startService()


@pytest.mark.parametrize(
    ("prepare", "message"),
    [
        (lambda p: p.write_bytes(b"this is not a database at all" * 100), "cannot use"),
        (
            lambda p: (
                sqlite3.connect(p).execute("CREATE TABLE other (x)").connection.commit()
            ),
            "not a steptrack database",
        ),
        (lambda p: p.mkdir(), "cannot"),
    ],
)
def test_unusable_files_are_refused(path: Path, prepare: object, message: str) -> None:
    """Garbage, another program's database or a directory: refused, saying where."""
    prepare(path)  # type: ignore[operator]
    with pytest.raises(StoreUnusable, match=message) as raised:
        SQLiteStore(str(path), THREAD_CALLS, Clock()).startService()
    assert str(path) in str(raised.value)


def test_missing_directory_is_refused(tmp_path: Path) -> None:
    """A path in a directory that does not exist is refused, naming the path."""
    path = tmp_path / "nowhere" / "steps.sqlite3"
    with pytest.raises(StoreUnusable, match="directory does not exist"):
        SQLiteStore(str(path), THREAD_CALLS, Clock()).startService()


def test_full_disk_fails_writes_then_recovers(store: SQLiteStore) -> None:
    """
    A write that fails (SQLite's own "database or disk is full") applies
    nothing, is logged once as an error, leaves reads working, and writes
    resume once there is room again.
    """
    result_of(store.apply([Update("a", 1, 10, "before")]))
    connection = store._connection
    assert connection is not None
    (pages,) = connection.execute("PRAGMA page_count").fetchone()
    connection.execute(f"PRAGMA max_page_count = {pages}")
    big = [Update(f"user-{i:05}-{'x' * 200}", i, 1, f"id-{i}") for i in range(2000)]
    with capturedLogs() as events:
        for _ in range(3):
            with pytest.raises(StoreWriteFailed):
                result_of(store.apply(big))
    errors = [e for e in events if e.get("log_level") == LogLevel.error]
    assert len(errors) == 1
    assert "full" in str(errors[0]["error"])
    assert result_of(store.total("a")) == Total(10, 1)
    assert result_of(store.total("user-00000-" + "x" * 200)) is None
    connection.execute("PRAGMA max_page_count = 1000000")
    with capturedLogs() as events:
        outcomes = result_of(store.apply(big))
    assert outcomes == [Outcome.APPLIED] * len(big)
    assert any("work again" in str(e.get("log_format")) for e in events)
    assert result_of(store.apply([Update("a", 1, 10, "before")])) == [Outcome.DUPLICATE]


def test_refused_update_is_not_remembered_on_disk(store: SQLiteStore) -> None:
    """An update refused for overflow leaves no id behind, even among new ids."""
    result_of(store.apply([Update("a", 1, 9_007_199_254_740_000)]))
    outcomes = result_of(
        store.apply([Update("a", 1, 5000, "over"), Update("b", 1, 1, "fine")])
    )
    assert outcomes == [Outcome.TOTAL_OVERFLOW, Outcome.APPLIED]
    assert result_of(store.apply([Update("a", 1, 1, "over")])) == [Outcome.APPLIED]


def test_expired_ids_leave_the_disk_too(path: Path) -> None:
    """Pruning deletes expired ids from disk; a restart does not bring them back."""
    clock = Clock()
    store = SQLiteStore(str(path), THREAD_CALLS, clock, dedupe_retention=100)
    store.prune_batch = 3
    store.startService()
    result_of(store.apply([Update("a", 1, 1, f"old-{i}") for i in range(7)]))
    clock.advance(200)
    result_of(store.apply([Update("a", 1, 1, "fresh")]))
    clock.advance(store.prune_interval)
    for _ in range(4):  # 7 expired ids, 3 per step
        clock.advance(0)
        result_of(store.apply([]))
    reader = sqlite3.connect(path)
    rows = reader.execute("SELECT update_id FROM applied_ids").fetchall()
    reader.close()
    assert rows == [("fresh",)]
    assert store.remembered_ids == 1
    result_of(store.close())
    again = SQLiteStore(str(path), THREAD_CALLS, clock, dedupe_retention=100)
    again.startService()
    assert again.remembered_ids == 1
    assert result_of(again.apply([Update("a", 1, 1, "old-0")])) == [Outcome.APPLIED]
    result_of(again.close())


def test_odd_update_ids_survive_a_restart_exactly(path: Path) -> None:
    """Ids with NUL, emoji or quotes are kept exactly, so resends stay duplicates."""
    odd = ["a\x00b", "😀", 'quote"s', "back\\slash", "x" * 128]
    store = open_store(path)
    result_of(store.apply([Update("u", 1, 1, update_id) for update_id in odd]))
    result_of(store.apply([Update("v", 1.5, 2, "plain")]))
    result_of(store.close())
    again = open_store(path)
    outcomes = result_of(again.apply([Update("u", 1, 1, i) for i in odd]))
    assert outcomes == [Outcome.DUPLICATE] * len(odd)
    assert result_of(again.apply([Update("u", 1, 1, "a")])) == [Outcome.APPLIED]
    assert result_of(again.total("v")) == Total(2, 1.5)
    result_of(again.close())


def test_second_store_on_the_same_file_is_refused(
    store: SQLiteStore, path: Path
) -> None:
    """Two processes (or stores) on one database would each trust stale memory."""
    with pytest.raises(StoreUnusable, match="in use by another steptrack process"):
        SQLiteStore(str(path), THREAD_CALLS, Clock()).startService()
    result_of(store.close())
    again = open_store(path)
    result_of(again.close())


# -- several stores on one database, as the worker processes of one daemon --

reactor: Any = global_reactor


def open_shared(path: Path, max_group: int = 50) -> SQLiteStore:
    """A shared store on the real reactor, writing small groups to interleave."""
    store = SQLiteStore(str(path), reactor, shared=True)
    store.max_group = max_group
    store.startService()
    return store


def workload(users: int, count: int, seed: int) -> list[Update]:
    """``count`` updates with distinct ids over ``users`` users, ts in no order."""
    rng = random.Random(seed)
    return [
        Update(f"user-{i % users}", rng.randint(0, 10**6), rng.randint(0, 1000), f"{i}")
        for i in range(count)
    ]


def expected_totals(updates: list[Update]) -> dict[str, Total]:
    """Steps summed over distinct ids and the greatest ts, per user."""
    totals: dict[str, Total] = {}
    seen: set[tuple[str, str | None]] = set()
    for update in updates:
        if (update.username, update.update_id) in seen:
            continue
        seen.add((update.username, update.update_id))
        steps, ts = totals.get(update.username, (0, update.ts))
        totals[update.username] = Total(steps + update.new_steps, max(ts, update.ts))
    return totals


async def apply_in_batches(
    store: SQLiteStore, updates: list[Update], size: int
) -> list[Outcome]:
    """Hand all the batches over at once; the outcomes in order."""
    answers = await gatherResults(
        [store.apply(updates[i : i + size]) for i in range(0, len(updates), size)]
    )
    return [outcome for answer in answers for outcome in answer]


async def settled_total(store: SQLiteStore, username: str, expected: Total) -> Any:
    """The store's total once it is ``expected``, or what it is after 10 s."""
    total = None
    for _ in range(1000):
        total = await store.total(username)
        if total == expected:
            break
        await deferLater(reactor, 0.01)
    return total


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("count", [2, 3])
async def test_shared_stores_apply_each_update_once_in_all(
    path: Path, count: int
) -> None:
    """The same updates through several shared stores at once count once in all."""
    updates = workload(users=20, count=3000, seed=count)
    stores = [open_shared(path) for _ in range(count)]
    try:
        orders = [random.Random(i).sample(updates, len(updates)) for i in range(count)]
        answers = await gatherResults(
            [
                Deferred.fromCoroutine(apply_in_batches(s, order, 25))
                for s, order in zip(stores, orders, strict=True)
            ]
        )
        applied = Counter(
            (update.username, update.update_id)
            for order, outcomes in zip(orders, answers, strict=True)
            for update, outcome in zip(order, outcomes, strict=True)
            if outcome == Outcome.APPLIED
        )
        assert len(applied) == len(updates)
        assert set(applied.values()) == {1}
        expected = expected_totals(updates)
        for store in stores:
            for username, total in expected.items():
                assert await settled_total(store, username, total) == total
    finally:
        for store in stores:
            await store.close()
    # Everything is on disk, once: a store opened afresh has it all.
    again = SQLiteStore(str(path), reactor)
    again.startService()
    try:
        for username, total in expected.items():
            assert await again.total(username) == total
        outcomes = await again.apply(updates)
        assert set(outcomes) == {Outcome.DUPLICATE}
    finally:
        await again.close()


@pytest_twisted.ensureDeferred
async def test_shared_stores_see_each_others_totals(path: Path) -> None:
    """What one shared store commits, another serves soon after, without writing."""
    first, second = open_shared(path), open_shared(path)
    try:
        await first.apply([Update("luisa", 500, 100, "a")])
        assert await settled_total(second, "luisa", Total(100, 500)) == Total(100, 500)
        assert second.remembered_ids == 1
        # An older ts through the other store adds steps, leaves ts.
        assert await second.apply([Update("luisa", 300, 1, "b")]) == [Outcome.APPLIED]
        assert await settled_total(first, "luisa", Total(101, 500)) == Total(101, 500)
        assert await second.apply([Update("luisa", 900, 100, "a")]) == [
            Outcome.DUPLICATE
        ]
        assert await first.apply([Update("luisa", 900, 1, "b")]) == [Outcome.DUPLICATE]
        assert await first.apply([Update("luisa", 700, 2, "c")]) == [Outcome.APPLIED]
        assert await settled_total(second, "luisa", Total(103, 700)) == Total(103, 700)
    finally:
        await first.close()
        await second.close()


@pytest_twisted.ensureDeferred
async def test_shared_stores_keep_catching_up_after_pruning(path: Path) -> None:
    """Ids committed after pruning emptied the table still reach the other store."""
    first, second = open_shared(path), open_shared(path)
    try:
        await first.apply([Update("a", 1, 1, f"old-{i}") for i in range(5)])
        assert await settled_total(second, "a", Total(5, 1)) == Total(5, 1)
        connection = sqlite3.connect(path)
        connection.execute("DELETE FROM applied_ids")  # as pruning would
        connection.commit()
        connection.close()
        await first.apply([Update("a", 2, 1, "new")])
        assert await settled_total(second, "a", Total(6, 2)) == Total(6, 2)
        assert await second.apply([Update("a", 2, 1, "new")]) == [Outcome.DUPLICATE]
    finally:
        await first.close()
        await second.close()


def test_a_failed_look_at_the_others_is_logged_once_and_tried_again(
    path: Path,
) -> None:
    """Reading what others committed fails: logged once; the next look loads it."""
    # A writer that never looks on its own, so that it logs nothing here.
    writer = SQLiteStore(
        str(path), THREAD_CALLS, Clock(), shared=True, share_interval=3600
    )
    writer.startService()
    # A reader whose looks the test makes itself, with no writer thread.
    reader = SQLiteStore(str(path), THREAD_CALLS, Clock(), shared=True)
    connection = open_database(str(path))
    reader._load(connection)
    result_of(writer.apply([Update("a", 1, 5, "x")]))
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("ALTER TABLE commit_counter RENAME TO elsewhere")
    with capturedLogs() as events:
        for _ in range(3):
            reader._look(connection)
        THREAD_CALLS.run_pending()
    errors = [e for e in events if e.get("log_level") == LogLevel.error]
    assert len(errors) == 1
    assert "no such table" in errors[0]["error"]
    assert result_of(reader.total("a")) is None
    other.execute("ALTER TABLE elsewhere RENAME TO commit_counter")
    other.close()
    with capturedLogs() as events:
        reader._look(connection)
        THREAD_CALLS.run_pending()
    assert any("works again" in str(e.get("log_format")) for e in events)
    assert result_of(reader.total("a")) == Total(5, 1)
    assert reader.remembered_ids == 1
    connection.close()
    result_of(writer.close())


def test_shared_stores_leave_the_daemon_lock_to_their_parent(path: Path) -> None:
    """A shared store does not take PATH.lock; a store that is not shared does."""
    lock = lock_database(str(path))  # as the process starting the workers does
    assert lock is not None
    shared = SQLiteStore(str(path), THREAD_CALLS, Clock(), shared=True)
    shared.startService()
    with pytest.raises(StoreUnusable, match="in use by another steptrack process"):
        SQLiteStore(str(path), THREAD_CALLS, Clock()).startService()
    result_of(shared.close())
    lock.close()
    store = open_store(path)
    with pytest.raises(StoreUnusable, match="in use by another steptrack process"):
        lock_database(str(path))
    result_of(store.close())
    again = lock_database(str(path))
    assert again is not None
    again.close()


def test_the_daemon_lock_is_held_while_a_child_holds_a_copy(path: Path) -> None:
    """The lock stays held after the parent closes it, while a child has the file."""
    lock = lock_database(str(path))
    assert lock is not None
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"],
        stdin=subprocess.PIPE,
        pass_fds=[lock.fileno()],
    )
    try:
        lock.close()
        with pytest.raises(StoreUnusable, match="in use by another steptrack process"):
            lock_database(str(path))
    finally:
        assert child.stdin is not None
        child.stdin.close()
        assert child.wait(timeout=30) == 0
    again = lock_database(str(path))
    assert again is not None
    again.close()


# One worker process: a shared store applying every update of a fixed set,
# in an order of its own, once told to go; it prints how many it applied.
WORKER = """
import json, os, random, sys, time
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.internet.task import react
from steptrackd.sqlite_store import SQLiteStore
from steptrackd.update import Update

path, go, seed, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

async def main(reactor):
    store = SQLiteStore(path, reactor, shared=True)
    store.max_group = 50
    store.startService()
    print("ready", flush=True)
    for _ in range(3000):
        if os.path.exists(go):
            break
        time.sleep(0.01)
    updates = [Update(f"user-{i % 20}", i, i % 7 + 1, f"id-{i}") for i in range(count)]
    random.Random(seed).shuffle(updates)
    answers = await gatherResults(
        [store.apply(updates[i : i + 20]) for i in range(0, count, 20)]
    )
    await store.close()
    applied = sum(outcome == "applied" for answer in answers for outcome in answer)
    print(json.dumps({"applied": applied}), flush=True)

react(lambda reactor: ensureDeferred(main(reactor)))
"""


def test_two_worker_processes_apply_each_update_once(tmp_path: Path) -> None:
    """Two processes applying the same updates at once: each counted once in all."""
    path, go, count = tmp_path / "steps.sqlite3", tmp_path / "go", 4000
    open_database(str(path)).close()  # migrated once, as the parent does
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(path), str(go), str(seed), str(count)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for seed in (1, 2)
    ]
    try:
        for worker in workers:
            assert worker.stdout is not None
            assert worker.stdout.readline() == "ready\n"
        go.touch()
        outputs = [worker.communicate(timeout=60)[0] for worker in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    assert [worker.returncode for worker in workers] == [0, 0]
    applied = [json.loads(output.splitlines()[-1])["applied"] for output in outputs]
    assert sum(applied) == count
    connection = sqlite3.connect(path)
    assert connection.execute(
        "SELECT count(*), count(DISTINCT username || char(0) || update_id)"
        " FROM applied_ids"
    ).fetchone() == (count, count)
    totals = dict(
        (username, (steps, ts))
        for username, steps, ts in connection.execute(
            "SELECT username, steps, ts FROM totals"
        )
    )
    connection.close()
    expected: dict[str, tuple[int, int]] = {}
    for i in range(count):
        steps, ts = expected.get(f"user-{i % 20}", (0, 0))
        expected[f"user-{i % 20}"] = (steps + i % 7 + 1, max(ts, i))
    assert totals == expected
