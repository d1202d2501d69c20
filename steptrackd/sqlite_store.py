"""
The durable store: totals and remembered update ids in a SQLite database.

One writer thread owns the write connection and applies updates in group
commits: everything handed to the store while the previous transaction was
committing goes into the next one, up to a bounded size. Totals, ts and the
ids of applied updates change in the same transaction, so a crash can never
count an update without remembering its id, or the reverse.

Nothing is read from disk after start. The committed totals and the ids
applied within the retention period are loaded into memory when the store
starts and updated by the writer only after each commit: readers see
committed state and nothing else, and telling a resend from a new update
costs a dictionary lookup, not a B-tree search on disk. On disk, applied ids
are an append-only log (cheap to write in order), pruned from its old end.

This module knows SQLite and the store interface; it does not know how
updates arrive or are read.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from queue import SimpleQueue
from typing import IO, Any, Final

import msgspec
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .store import (
    DEFAULT_DEDUPE_RETENTION,
    AppliedIds,
    IStepStore,
    Outcome,
    StoreClosed,
    StoreUnusable,
    StoreWriteFailed,
    Total,
)
from .update import MAX_SAFE_INTEGER, Update

APPLICATION_ID: Final = 0x53545053
"""``PRAGMA application_id`` of a steptrack database ("STPS")."""

_log = Logger()


# Each entry migrates a database from version N to N + 1, in one
# transaction. A database is at the version ``len(MIGRATIONS)`` once
# current; ``PRAGMA user_version`` says where it is.
MIGRATIONS: Final[list[list[str]]] = [
    # 0 -> 1: the first schema, with applied ids looked up on disk.
    [
        # ts has no declared type, so SQLite keeps an integer as an integer
        # and a float as a float, exactly as the client sent it.
        "CREATE TABLE totals ("
        " username TEXT PRIMARY KEY,"
        " steps INTEGER NOT NULL,"
        " ts NOT NULL"
        ") WITHOUT ROWID",
        "CREATE TABLE applied_ids ("
        " username TEXT NOT NULL,"
        " update_id TEXT NOT NULL,"
        " applied_at REAL NOT NULL,"
        " PRIMARY KEY (username, update_id)"
        ") WITHOUT ROWID",
        "CREATE INDEX applied_ids_by_time ON applied_ids (applied_at)",
    ],
    # 1 -> 2: applied ids become a log in the order applied, with no index:
    # it is read into memory at start, appended to in order (cheap), and
    # pruned from its oldest end.
    [
        "ALTER TABLE applied_ids RENAME TO applied_ids_v1",
        "CREATE TABLE applied_ids ("
        " username TEXT NOT NULL,"
        " update_id TEXT NOT NULL,"
        " applied_at REAL NOT NULL"
        ")",
        "INSERT INTO applied_ids"
        " SELECT username, update_id, applied_at FROM applied_ids_v1"
        " ORDER BY applied_at",
        "DROP TABLE applied_ids_v1",
    ],
]
SCHEMA_VERSION: Final = len(MIGRATIONS)
SWITCH_INTERVAL: Final = 0.0005
"""Seconds between GIL hand-overs while the store runs."""

# A group is written with one statement per table, its rows passed as one
# JSON array: each statement lets go of the GIL once for the whole group,
# where executemany() would let go and wait to take it back once per row,
# stalling behind the reactor thread every time.
_INSERT_IDS = (
    "INSERT INTO applied_ids SELECT json_extract(value, '$[0]'),"
    " json_extract(value, '$[1]'), json_extract(value, '$[2]') FROM json_each(?)"
)
_INSERT_ID = "INSERT INTO applied_ids VALUES (?, ?, ?)"
_UPSERT_TOTALS = (
    "INSERT INTO totals SELECT json_extract(value, '$[0]'),"
    " json_extract(value, '$[1]'), json_extract(value, '$[2]') FROM json_each(?)"
    " WHERE true ON CONFLICT (username)"
    " DO UPDATE SET steps = excluded.steps, ts = excluded.ts"
)
_encode = msgspec.json.encode
# The oldest rows come first in rowid order: look at no more than LIMIT.
_PRUNE = (
    "DELETE FROM applied_ids WHERE applied_at < ? AND rowid IN ("
    " SELECT rowid FROM applied_ids ORDER BY rowid LIMIT ?)"
)


def open_database(path: str) -> sqlite3.Connection:
    """
    Open (creating it if need be) and migrate the database at ``path``.
    Raises :class:`StoreUnusable` with a message that says what and where.
    """
    _require_directory(path)
    try:
        connection = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False
        )
    except sqlite3.Error as e:
        raise StoreUnusable(f"{path}: cannot open: {e}") from None
    try:
        _prepare(connection, path)
    except StoreUnusable:
        connection.close()
        raise
    except sqlite3.Error as e:
        connection.close()
        raise StoreUnusable(f"{path}: cannot use: {e}") from None
    return connection


def _prepare(connection: sqlite3.Connection, path: str) -> None:
    (application_id,) = connection.execute("PRAGMA application_id").fetchone()
    (version,) = connection.execute("PRAGMA user_version").fetchone()
    tables = connection.execute(
        "SELECT count(*) FROM sqlite_schema WHERE name NOT LIKE 'sqlite_%'"
    ).fetchone()[0]
    if application_id != APPLICATION_ID and (tables or version):
        raise StoreUnusable(f"{path}: not a steptrack database")
    if version > SCHEMA_VERSION:
        raise StoreUnusable(
            f"{path}: the database is at schema version {version}, newer than "
            f"this steptrack knows ({SCHEMA_VERSION}); run a newer steptrack "
            f"or restore a backup"
        )
    # WAL: readers never wait for the writer. synchronous=FULL: a commit
    # returns only once the WAL is on stable storage, so a committed group
    # survives power loss (NORMAL would survive only a process crash).
    mode = connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if mode != "wal" and path != ":memory:":
        raise StoreUnusable(f"{path}: cannot use write-ahead logging ({mode})")
    connection.execute("PRAGMA synchronous = FULL")
    connection.execute("PRAGMA busy_timeout = 5000")
    for target in range(version + 1, SCHEMA_VERSION + 1):
        connection.execute("BEGIN IMMEDIATE")
        try:
            for statement in MIGRATIONS[target - 1]:
                connection.execute(statement)
            connection.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            connection.execute(f"PRAGMA user_version = {target}")
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        if version > 0:
            _log.info(
                "Migrated {path} to schema version {version}",
                path=path,
                version=target,
            )


def _require_directory(path: str) -> None:
    if path != ":memory:" and not os.path.isdir(os.path.dirname(path) or "."):
        raise StoreUnusable(f"{path}: the directory does not exist")


def _lock_database(path: str) -> IO[bytes] | None:
    """
    Take the lock that keeps a second steptrack process off the same
    database: each process trusts its in-memory copy of the totals and of
    the applied ids, which another writer would make stale. The lock is a
    file beside the database, held until the store closes (or the process
    ends, however it ends).
    """
    if path == ":memory:":
        return None
    _require_directory(path)
    try:
        lock = open(path + ".lock", "ab")  # noqa: SIM115 - held until close
    except OSError as e:
        raise StoreUnusable(f"{path}: cannot create its lock file: {e}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise StoreUnusable(f"{path}: in use by another steptrack process") from None
    return lock


@dataclass
class _Batch:
    """Updates handed over in one ``apply`` call, waiting for their group."""

    updates: Sequence[Update]
    applied_at: float
    done: Deferred[list[Outcome]] = field(default_factory=Deferred)
    outcomes: list[Outcome] = field(default_factory=list)


class _Prune:
    """A request to the writer: forget ids applied before ``horizon``."""

    def __init__(self, horizon: float, limit: int) -> None:
        self.horizon = horizon
        self.limit = limit


_CLOSE: Final = object()


@implementer(IStepStore)
class SQLiteStore(Service):
    """
    Totals in a SQLite database at ``path``, written by one thread in group
    commits. ``reactor`` is where results are delivered; ``clock`` says when
    an update was applied and drives pruning (tests give a ``task.Clock``).
    """

    name = "store"
    prune_interval = 60.0
    prune_batch = 10_000
    max_group = 20_000
    """Most updates in one transaction."""
    retry_delays = (0.05, 0.1, 0.25, 0.5, 1.0)
    """Pauses of the writer after consecutive failed commits."""

    def __init__(
        self,
        path: str,
        reactor: IReactorFromThreads,
        clock: IReactorTime | None = None,
        dedupe_retention: float = DEFAULT_DEDUPE_RETENTION,
    ) -> None:
        self.path = path
        self.description = f"sqlite:{path}"
        self._reactor = reactor
        self._clock: IReactorTime = clock if clock is not None else reactor  # type: ignore[assignment]
        self._retention = dedupe_retention
        self._queue: SimpleQueue[Any] = SimpleQueue()
        self._totals: dict[str, tuple[int, int | float]] = {}
        # Written by the writer thread only, after each commit.
        self._applied_ids = AppliedIds()
        self._connection: sqlite3.Connection | None = None
        self._writer: threading.Thread | None = None
        self._pruning: LoopingCall | None = None
        self._closing: Deferred[None] | None = None
        self._failing = False
        self._failures = 0  # consecutive failed commits; writer thread only
        self._lock: IO[bytes] | None = None
        # Test hook: called in the writer thread before each commit.
        self.before_commit: Callable[[sqlite3.Connection], None] | None = None

    # -- life cycle, in the reactor thread --

    def startService(self) -> None:
        self._lock = _lock_database(self.path)
        try:
            connection = open_database(self.path)
        except StoreUnusable:
            if self._lock is not None:
                self._lock.close()
                self._lock = None
            raise
        for username, steps, ts in connection.execute("SELECT * FROM totals"):
            self._totals[username] = (steps, ts)
        horizon = self._clock.seconds() - self._retention
        key = AppliedIds.key
        for username, update_id, applied_at in connection.execute(
            "SELECT * FROM applied_ids WHERE applied_at >= ? ORDER BY rowid",
            (horizon,),
        ):
            self._applied_ids[key(username, update_id)] = applied_at
        self._connection = connection
        super().startService()
        # The writer and the reactor share one GIL. A thread that has let go
        # of it (SQLite does, in every statement) waits up to the switch
        # interval to get it back from a busy reactor: 5 ms by default,
        # which would cap commits far below what SQLite can do.
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL))
        # A daemon thread, so that a process that never closes the store
        # (a crash of the code around it) can still exit; close() is what
        # commits what is pending.
        self._writer = threading.Thread(
            target=self._write_loop, name="steptrack-sqlite-writer", daemon=True
        )
        self._writer.start()
        self._pruning = LoopingCall(self.prune)
        self._pruning.clock = self._clock
        self._pruning.start(self.prune_interval, now=False)

    def stopService(self) -> Deferred[None]:
        return self.close()

    def close(self) -> Deferred[None]:
        if self._closing is not None:
            return _chain(self._closing)
        self._closing = Deferred()
        if self.running:
            super().stopService()
        if self._pruning is not None and self._pruning.running:
            self._pruning.stop()
        if self._writer is None:
            self._closing.callback(None)
        else:
            # The writer commits everything queued before this, then ends.
            self._queue.put(_CLOSE)
        return _chain(self._closing)

    # -- the store interface, in the reactor thread --

    def apply(self, updates: Sequence[Update]) -> Deferred[list[Outcome]]:
        if self._closing is not None or self._writer is None:
            raise StoreClosed()
        batch = _Batch(updates, self._clock.seconds())
        self._queue.put(batch)
        return batch.done

    def total(self, username: str) -> Deferred[Total | None]:
        if self._closing is not None and self._closing.called:
            raise StoreClosed()
        entry = self._totals.get(username)
        return succeed(None if entry is None else Total(*entry))

    @property
    def remembered_ids(self) -> int:
        """How many applied update ids the store remembers right now."""
        return len(self._applied_ids)

    def prune(self) -> None:
        """Ask the writer to forget expired ids, a bounded step at a time."""
        if self._closing is None:
            self._queue.put(
                _Prune(self._clock.seconds() - self._retention, self.prune_batch)
            )

    # -- the writer thread --

    def _write_loop(self) -> None:
        connection = self._connection
        assert connection is not None
        try:
            while True:
                item = self._queue.get()
                if item is _CLOSE:
                    return
                if isinstance(item, _Prune):
                    self._prune_step(connection, item)
                    continue
                group = [item]
                size = len(item.updates)
                closing = False
                while size < self.max_group and not self._queue.empty():
                    item = self._queue.get()
                    if item is _CLOSE:
                        closing = True
                        break
                    if isinstance(item, _Prune):
                        self._queue.put(item)
                        break
                    group.append(item)
                    size += len(item.updates)
                self._commit_group(connection, group)
                if closing:
                    return
        finally:
            connection.close()
            self._reactor.callFromThread(self._writer_ended)

    def _commit_group(
        self, connection: sqlite3.Connection, group: list[_Batch]
    ) -> None:
        try:
            changed, applied = self._write(connection, group)
        except Exception as e:
            self._rollback(connection)
            if not isinstance(e, sqlite3.Error):
                self._reactor.callFromThread(
                    _log.failure, "Bug while writing updates", Failure()
                )
            self._reactor.callFromThread(self._group_failed, group, str(e))
            self._failures += 1
            delays = self.retry_delays
            # Give the cause (a full disk, say) a moment, without spinning.
            time.sleep(delays[min(self._failures, len(delays)) - 1])
            return
        self._failures = 0
        # Only now, after the commit, do readers see the new totals.
        self._applied_ids.update(applied)
        self._totals.update(changed)
        self._reactor.callFromThread(self._group_committed, group)

    def _write(
        self, connection: sqlite3.Connection, group: list[_Batch]
    ) -> tuple[dict[str, tuple[int, int | float]], dict[str, float]]:
        """
        Work out each update's outcome and commit the group. Returns the new
        totals and the newly applied ids, for the caller to publish.
        """
        committed = self._totals
        remembered = self._applied_ids
        changed: dict[str, tuple[int, int | float]] = {}
        applied: dict[str, float] = {}
        rows = []
        for batch in group:
            outcomes: list[Outcome] = []
            batch.outcomes = outcomes
            applied_at = batch.applied_at
            for update in batch.updates:
                username = update.username
                update_id = update.update_id
                key = None
                if update_id is not None:
                    key = f"{username}\0{update_id}"  # AppliedIds.key, inlined
                    if key in applied or key in remembered:
                        outcomes.append(Outcome.DUPLICATE)
                        continue
                entry = changed.get(username) or committed.get(username)
                steps, ts = entry if entry is not None else (0, update.ts)
                steps += update.new_steps
                if steps > MAX_SAFE_INTEGER:
                    outcomes.append(Outcome.TOTAL_OVERFLOW)
                    continue
                if update.ts > ts:
                    ts = update.ts
                changed[username] = (steps, ts)
                if key is not None:
                    applied[key] = applied_at
                    rows.append((username, update_id, applied_at))
                outcomes.append(Outcome.APPLIED)
        connection.execute("BEGIN IMMEDIATE")
        encoded_rows = _encode(rows)
        if b"\\u0000" in encoded_rows:
            # SQLite's JSON functions cut a string at a NUL, which an
            # update_id may hold: those groups go row by row.
            connection.executemany(_INSERT_ID, rows)
        else:
            connection.execute(_INSERT_IDS, (encoded_rows,))
        connection.execute(
            _UPSERT_TOTALS,
            (_encode([(name, *total) for name, total in changed.items()]),),
        )
        if self.before_commit is not None:
            self.before_commit(connection)
        connection.execute("COMMIT")
        return changed, applied

    def _prune_step(self, connection: sqlite3.Connection, prune: _Prune) -> None:
        forgotten = self._applied_ids.forget_before(prune.horizon, prune.limit)
        try:
            connection.execute("BEGIN IMMEDIATE")
            deleted = connection.execute(_PRUNE, (prune.horizon, prune.limit)).rowcount
            connection.execute("COMMIT")
        except Exception as e:
            self._rollback(connection)
            self._reactor.callFromThread(
                _log.error,
                "Pruning remembered update ids in {path} failed: {error}; "
                "will try again",
                path=self.path,
                error=str(e),
            )
            return
        if prune.limit in (deleted, forgotten):
            # More is due: go on at the reactor's next turn, as a new step
            # behind whatever arrived meanwhile.
            self._reactor.callFromThread(self._clock.callLater, 0, self.prune)

    @staticmethod
    def _rollback(connection: sqlite3.Connection) -> None:
        if connection.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                connection.execute("ROLLBACK")

    # -- results, back in the reactor thread --

    def _group_committed(self, group: list[_Batch]) -> None:
        if self._failing:
            self._failing = False
            _log.info("Writes to {path} work again", path=self.path)
        for batch in group:
            batch.done.callback(batch.outcomes)

    def _group_failed(self, group: list[_Batch], error: str) -> None:
        if not self._failing:
            self._failing = True
            _log.error(
                "Cannot write to {path}: {error}; updates are not applied "
                "(and not acknowledged) until writes work again",
                path=self.path,
                error=error,
            )
        failure = Failure(StoreWriteFailed(error))
        for batch in group:
            batch.done.errback(failure)

    def _writer_ended(self) -> None:
        self._writer = None
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        if self._closing is not None and not self._closing.called:
            self._closing.callback(None)


def _chain(deferred: Deferred[None]) -> Deferred[None]:
    """A new Deferred that fires when ``deferred`` does."""
    chained: Deferred[None] = Deferred()

    def fire(result: object) -> object:
        chained.callback(None)
        return result

    deferred.addBoth(fire)
    return chained
