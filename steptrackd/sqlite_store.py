"""
The durable store: totals and remembered update ids in a SQLite database.

One writer thread owns the write connection and applies updates in group
commits: everything handed to the store while the previous transaction was
committing goes into the next one, up to a bounded size. Totals, ts and the
ids of applied updates change in the same transaction, so a crash can never
count an update without remembering its id, or the reverse.

Reads never touch the disk. The committed totals and the ids applied
within the retention period are loaded into memory when the store starts,
and the writer thread updates them only with committed state: its own
groups once committed, and (when shared) what other processes committed.
Readers see committed state and nothing else, and telling a resend from a
new update costs a dictionary lookup, not a B-tree search on disk. On disk,
applied ids are an append-only log (cheap to write in order), pruned from
its old end.

Several processes can share one database (``shared=True``): each worker
process of one daemon runs its own store on the same file. Writers take
turns (a lock file beside the database, ``PATH.write-lock``, held around
each write transaction), and each store catches up with what the others
committed before it decides anything: inside its own write transaction,
where nobody else can commit, it reads the totals and the ids committed
since it last looked, so exactly-once and "ts is the greatest" hold across
all of them. Between groups it looks at least every ``share_interval``
seconds (``PRAGMA data_version`` says, without reading a table, whether
another connection committed), so that its readers see the others' totals
soon after they commit. A table, ``commit_counter``, numbers the groups
of shared stores; each total carries the number of the group that last
changed it, and each applied id a key that is never reused: "what changed
since N" is an index range, not a scan.

Outside shared mode one process owns the database, enforced by a lock file
(``PATH.lock``, see :func:`lock_database`); in shared mode the supervising
process holds that lock for all its workers.

This module knows SQLite and the store interface; it does not know how
updates arrive or are read, nor how worker processes are started.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from queue import Empty, SimpleQueue
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
    # 2 -> 3: what a store needs to catch up with other processes writing
    # the same database, by reading only what they changed.
    [
        # One row: the number of the last group committed, by any process.
        # Each group takes the next number inside its write transaction.
        "CREATE TABLE commit_counter (seq INTEGER NOT NULL)",
        "INSERT INTO commit_counter VALUES (0)",
        # The group that last changed each total: "totals changed since
        # group N" is a range of this index. Keeping it up to date is most
        # of what sharing costs a write (an index update per changed
        # total). A log of each group's changed totals, one row per group,
        # would cost less to write, but needs pruning of its own and a full
        # reload for a store that falls behind what is left of it.
        "ALTER TABLE totals ADD COLUMN seq INTEGER NOT NULL DEFAULT 0",
        "CREATE INDEX totals_by_seq ON totals (seq)",
        # Applied ids get a key that grows with every insert and is never
        # reused (AUTOINCREMENT: a plain rowid starts again from 1 once
        # pruning has emptied the table, and a store that had seen up to
        # key N would then miss the new rows), so "ids applied since key N"
        # is a range of the table itself, with no index to maintain.
        "ALTER TABLE applied_ids RENAME TO applied_ids_v2",
        "CREATE TABLE applied_ids ("
        " id INTEGER PRIMARY KEY AUTOINCREMENT,"
        " username TEXT NOT NULL,"
        " update_id TEXT NOT NULL,"
        " applied_at REAL NOT NULL"
        ")",
        "INSERT INTO applied_ids (username, update_id, applied_at)"
        " SELECT username, update_id, applied_at FROM applied_ids_v2"
        " ORDER BY rowid",
        "DROP TABLE applied_ids_v2",
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
    "INSERT INTO applied_ids (username, update_id, applied_at)"
    " SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'),"
    " json_extract(value, '$[2]') FROM json_each(?)"
)
_INSERT_ID = (
    "INSERT INTO applied_ids (username, update_id, applied_at) VALUES (?, ?, ?)"
)
_UPSERT_TOTALS = (
    "INSERT INTO totals (username, steps, ts) SELECT json_extract(value, '$[0]'),"
    " json_extract(value, '$[1]'), json_extract(value, '$[2]') FROM json_each(?)"
    " WHERE true ON CONFLICT (username)"
    " DO UPDATE SET steps = excluded.steps, ts = excluded.ts"
)
# A shared store also numbers its group and marks the totals it changed
# with that number. A store that is not shared leaves both alone, which
# spares an index update per changed total (about a third of the cost of
# writing a group): it is the only writer while it runs (the daemon lock
# says so), and a store opened after it reads every total at start.
_UPSERT_SHARED_TOTALS = (
    "INSERT INTO totals SELECT json_extract(value, '$[0]'),"
    " json_extract(value, '$[1]'), json_extract(value, '$[2]'), ?2"
    " FROM json_each(?1) WHERE true ON CONFLICT (username)"
    " DO UPDATE SET steps = excluded.steps, ts = excluded.ts, seq = excluded.seq"
)
_NEXT_GROUP = "UPDATE commit_counter SET seq = seq + 1 RETURNING seq"
_LAST_GROUP = "SELECT seq FROM commit_counter"
_LAST_ID = "SELECT seq FROM sqlite_sequence WHERE name = 'applied_ids'"
_TOTALS_SINCE = "SELECT username, steps, ts FROM totals WHERE seq > ?"
# Keys built by SQLite (AppliedIds.key: username, NUL, update_id), so that
# the rows go into the dictionary without a Python loop.
_IDS_SINCE = (
    "SELECT username || char(0) || update_id, applied_at FROM applied_ids"
    " WHERE id > ? ORDER BY id"
)
_encode = msgspec.json.encode
# The oldest rows come first in id order: look at no more than LIMIT.
_PRUNE = (
    "DELETE FROM applied_ids WHERE applied_at < ? AND id IN ("
    " SELECT id FROM applied_ids ORDER BY id LIMIT ?)"
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
            # Another process opening the same database may have done this
            # step since the version was read: look again, under the lock.
            (current,) = connection.execute("PRAGMA user_version").fetchone()
            migrating = current < target
            if migrating:
                for statement in MIGRATIONS[target - 1]:
                    connection.execute(statement)
                connection.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                connection.execute(f"PRAGMA user_version = {target}")
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        if migrating and version > 0:
            _log.info(
                "Migrated {path} to schema version {version}",
                path=path,
                version=target,
            )


def _require_directory(path: str) -> None:
    if path != ":memory:" and not os.path.isdir(os.path.dirname(path) or "."):
        raise StoreUnusable(f"{path}: the directory does not exist")


def lock_database(path: str) -> IO[bytes] | None:
    """
    Take the lock that keeps a second steptrack daemon off the database at
    ``path``: each daemon trusts its in-memory copy of the totals and of the
    applied ids, and only stores that know of each other (``shared``) catch
    up with what another writes. The lock is a file beside the database,
    ``PATH.lock``, held until the returned file is closed (or the process
    ends, however it ends). Raises :class:`StoreUnusable` if another daemon
    holds it. ``None`` for a database in memory, which nobody else can open.

    A store that is not shared takes this lock itself. For shared stores,
    the process that starts the workers takes it once and lets the workers
    inherit the file: an ``flock`` lock belongs to the open file
    description, which a forked or spawned child holding a copy of the
    descriptor shares, so the lock stays held until the last process with a
    copy has closed it or ended, even if the parent ends first.
    """
    if path == ":memory:":
        return None
    _require_directory(path)
    try:
        # Beside the real file: a second daemon reaching the same database
        # through a symbolic link must find the same lock.
        lock = open(os.path.realpath(path) + ".lock", "ab")  # noqa: SIM115
    except OSError as e:
        raise StoreUnusable(f"{path}: cannot create its lock file: {e}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise StoreUnusable(f"{path}: in use by another steptrack process") from None
    return lock


def _open_write_lock(path: str) -> IO[bytes]:
    """
    The file whose ``flock`` shared stores take around each write
    transaction, so that writers take turns. SQLite would serialize them
    anyway, but a writer that finds the database locked polls, sleeping in
    growing steps up to 100 ms, and can sleep long after the lock was let
    go; a process blocked in ``flock`` is woken by the kernel the moment it
    is free (and waits with the GIL released).
    """
    try:
        return open(os.path.realpath(path) + ".write-lock", "ab")
    except OSError as e:
        raise StoreUnusable(f"{path}: cannot create its lock file: {e}") from None


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

    With ``shared``, other processes, each with a shared store of its own,
    write the same database at the same time. This store then does not take
    the database's lock (:func:`lock_database`: whoever starts the processes
    holds it for them), takes turns with the other writers, decides every
    group on the latest committed state, and between groups loads what the
    others committed, looking at least every ``share_interval`` seconds.
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
        *,
        shared: bool = False,
        share_interval: float = 0.02,
    ) -> None:
        if shared and path == ":memory:":
            raise ValueError("a database in memory cannot be shared")
        self.path = path
        self.description = f"sqlite:{path}"
        self.shared = shared
        self.share_interval = share_interval
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
        self._write_lock: IO[bytes] | None = None
        # How far this store has read the database: the connection's data
        # version (it changes when another connection commits), the last
        # group number and the last applied id key loaded. Catching up
        # reads only what is newer. The writer thread's, once it runs.
        self._seen_version: int | None = None
        self._seen_group = 0
        self._seen_id = 0
        self._next_look = 0.0  # time.monotonic() of the next look between groups
        self._looks_fail = False
        # Test hook: called in the writer thread before each commit.
        self.before_commit: Callable[[sqlite3.Connection], None] | None = None

    # -- life cycle, in the reactor thread --

    def startService(self) -> None:
        if not self.shared:
            self._lock = lock_database(self.path)
        try:
            connection = open_database(self.path)
            try:
                if self.shared:
                    self._write_lock = _open_write_lock(self.path)
                self._load(connection)
            except BaseException:
                connection.close()
                raise
        except BaseException:
            self._release_locks()
            raise
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

    def _load(self, connection: sqlite3.Connection) -> None:
        """Read the committed totals and the ids within the retention."""
        horizon = self._clock.seconds() - self._retention
        try:
            with _reading(connection):
                # First, so that it describes the state read below.
                (self._seen_version,) = connection.execute(
                    "PRAGMA data_version"
                ).fetchone()
                (self._seen_group,) = connection.execute(_LAST_GROUP).fetchone()
                self._seen_id = _last_id(connection)
                totals = self._totals
                for username, steps, ts in connection.execute(
                    "SELECT username, steps, ts FROM totals"
                ):
                    totals[username] = (steps, ts)
                self._applied_ids.update(
                    connection.execute(
                        "SELECT username || char(0) || update_id, applied_at"
                        " FROM applied_ids WHERE applied_at >= ? ORDER BY id",
                        (horizon,),
                    )
                )
        except sqlite3.Error as e:
            raise StoreUnusable(f"{self.path}: cannot read: {e}") from None

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
                item = self._next_item(connection)
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

    def _next_item(self, connection: sqlite3.Connection) -> Any:
        """
        The next thing handed to the writer. A shared store waits for it no
        longer than until its next look at what the others committed.
        """
        if not self.shared:
            return self._queue.get()
        while True:
            wait = self._next_look - time.monotonic()
            try:
                if wait > 0:
                    return self._queue.get(timeout=wait)
                return self._queue.get_nowait()
            except Empty:
                self._look(connection)

    def _look(self, connection: sqlite3.Connection) -> None:
        """Between groups: load what other processes committed, if anything."""
        try:
            (version,) = connection.execute("PRAGMA data_version").fetchone()
            if version == self._seen_version:
                self._caught_up()
            else:
                with _reading(connection):
                    self._catch_up(connection)
        except Exception as e:
            if not isinstance(e, sqlite3.Error):
                self._reactor.callFromThread(
                    _log.failure, "Bug while catching up", Failure()
                )
            if not self._looks_fail:
                self._looks_fail = True
                self._reactor.callFromThread(
                    _log.error,
                    "Cannot read what other processes committed to {path}: "
                    "{error}; totals read here may be behind until it works",
                    path=self.path,
                    error=str(e),
                )
            # Try again at the next look, not at once.
            self._next_look = time.monotonic() + self.share_interval

    def _catch_up(self, connection: sqlite3.Connection) -> None:
        """
        Load the totals and the ids that other processes committed since
        this store last read them. Runs inside a transaction, so that what
        it reads is one committed state. What it loads is final (others
        committed it), so it stays loaded even if the transaction around it
        is then rolled back; if reading fails, nothing is marked as read,
        and the next try reads it all again.
        """
        # The first statement of the transaction: the version that
        # describes the state this transaction reads.
        (version,) = connection.execute("PRAGMA data_version").fetchone()
        if version != self._seen_version:  # another connection committed
            (last_group,) = connection.execute(_LAST_GROUP).fetchone()
            # The same group number: what was committed was not a group (a
            # prune, say), and there is nothing to load.
            if last_group != self._seen_group:
                totals = connection.execute(_TOTALS_SINCE, (self._seen_group,))
                changed = {name: (steps, ts) for name, steps, ts in totals}
                ids = connection.execute(_IDS_SINCE, (self._seen_id,)).fetchall()
                last_id = _last_id(connection)
                self._totals.update(changed)
                self._applied_ids.update(ids)
                self._seen_group = last_group
                self._seen_id = last_id
            self._seen_version = version
        self._caught_up()

    def _caught_up(self) -> None:
        """This store has read everything committed so far."""
        if self._looks_fail:
            self._looks_fail = False
            self._reactor.callFromThread(
                _log.info,
                "Reading what other processes committed to {path} works again",
                path=self.path,
            )
        if self.shared:
            self._next_look = time.monotonic() + self.share_interval

    @contextlib.contextmanager
    def _writing(self, connection: sqlite3.Connection) -> Iterator[None]:
        """
        A write transaction around the block: committed at its end, rolled
        back if it raises. A shared store takes the write lock around it,
        so that writers of several processes take turns.
        """
        lock = self._write_lock
        if lock is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            connection.execute("BEGIN IMMEDIATE")
            try:
                yield
                connection.execute("COMMIT")
            except BaseException:
                self._rollback(connection)
                raise
        finally:
            if lock is not None:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _commit_group(
        self, connection: sqlite3.Connection, group: list[_Batch]
    ) -> None:
        try:
            with self._writing(connection):
                # Under the write lock nobody else can commit: the outcomes
                # are decided on the latest committed state of every process.
                # (A store that is not shared is the only writer: it skips
                # this, and the statement it costs.)
                if self.shared:
                    self._catch_up(connection)
                written = self._write(connection, group)
        except Exception as e:
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
        changed, applied, number, last_id = written
        if number is not None:
            self._seen_group = number
        if last_id is not None:
            self._seen_id = last_id
        # Only now, after the commit, do readers see the new totals.
        self._applied_ids.update(applied)
        self._totals.update(changed)
        self._reactor.callFromThread(self._group_committed, group)

    def _write(
        self, connection: sqlite3.Connection, group: list[_Batch]
    ) -> tuple[
        dict[str, tuple[int, int | float]], dict[str, float], int | None, int | None
    ]:
        """
        Work out each update's outcome and write the group, in the open
        transaction. Returns the new totals and the newly applied ids, for
        the caller to publish once committed, with the group's number and
        the key of its last applied id (``None`` when it wrote none).
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
        number = last_id = None
        # A group that changed nothing (all duplicates, say) writes nothing,
        # and its commit costs no sync.
        if changed and self.shared:
            (number,) = connection.execute(_NEXT_GROUP).fetchone()
        if rows:
            encoded_rows = _encode(rows)
            if b"\\u0000" in encoded_rows:
                # SQLite's JSON functions cut a string at a NUL, which an
                # update_id may hold: those groups go row by row.
                connection.executemany(_INSERT_ID, rows)
                (last_id,) = connection.execute("SELECT last_insert_rowid()").fetchone()
            else:
                last_id = connection.execute(_INSERT_IDS, (encoded_rows,)).lastrowid
        if changed:
            totals = _encode([(name, *total) for name, total in changed.items()])
            if number is None:
                connection.execute(_UPSERT_TOTALS, (totals,))
            else:
                connection.execute(_UPSERT_SHARED_TOTALS, (totals, number))
        if self.before_commit is not None:
            self.before_commit(connection)
        return changed, applied, number, last_id

    def _prune_step(self, connection: sqlite3.Connection, prune: _Prune) -> None:
        # Each store forgets in memory; on disk, when several share the
        # database, the first to get there deletes and the others find the
        # oldest rows already gone, at the cost of one short index probe.
        forgotten = self._applied_ids.forget_before(prune.horizon, prune.limit)
        try:
            with self._writing(connection):
                deleted = connection.execute(
                    _PRUNE, (prune.horizon, prune.limit)
                ).rowcount
        except Exception as e:
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
        _rollback(connection)

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
        self._release_locks()
        if self._closing is not None and not self._closing.called:
            self._closing.callback(None)

    def _release_locks(self) -> None:
        for lock in (self._lock, self._write_lock):
            if lock is not None:
                lock.close()
        self._lock = self._write_lock = None


def _rollback(connection: sqlite3.Connection) -> None:
    if connection.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            connection.execute("ROLLBACK")


@contextlib.contextmanager
def _reading(connection: sqlite3.Connection) -> Iterator[None]:
    """A read transaction around the block: one committed state."""
    connection.execute("BEGIN")
    try:
        yield
    finally:
        _rollback(connection)


def _last_id(connection: sqlite3.Connection) -> int:
    """The greatest key ever given to an applied id (0 before the first)."""
    row = connection.execute(_LAST_ID).fetchone()
    return 0 if row is None else int(row[0])


def _chain(deferred: Deferred[None]) -> Deferred[None]:
    """A new Deferred that fires when ``deferred`` does."""
    chained: Deferred[None] = Deferred()

    def fire(result: object) -> object:
        chained.callback(None)
        return result

    deferred.addBoth(fire)
    return chained
