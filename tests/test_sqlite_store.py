"""
What only the SQLite store promises: totals and remembered ids survive a
restart, the schema is versioned, a database it cannot use is refused at
start, and a failing write is reported, never acknowledged, and recovered
from.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs

from steptrackd.sqlite_store import (
    APPLICATION_ID,
    MIGRATIONS,
    SCHEMA_VERSION,
    SQLiteStore,
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


def test_older_database_is_migrated(path: Path) -> None:
    """A database at schema version 1 is migrated forward, keeping its data."""
    connection = sqlite3.connect(path, isolation_level=None)
    for statement in MIGRATIONS[0]:
        connection.execute(statement)
    connection.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    connection.execute("PRAGMA user_version = 1")
    connection.execute("INSERT INTO totals VALUES ('old', 42, 7)")
    connection.execute("INSERT INTO applied_ids VALUES ('old', 'x', 1.0)")
    connection.close()
    with capturedLogs() as events:
        store = open_store(path)
    assert any("Migrated" in str(e.get("log_format")) for e in events)
    assert result_of(store.total("old")) == Total(42, 7)
    assert result_of(store.apply([Update("old", 1, 1, "x")])) == [Outcome.DUPLICATE]
    result_of(store.close())
    connection = sqlite3.connect(path)
    assert connection.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_schema")}
    assert tables == {"totals", "applied_ids"}
    assert connection.execute("SELECT * FROM applied_ids").fetchall() == [
        ("old", "x", 1.0)
    ]
    connection.close()


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
