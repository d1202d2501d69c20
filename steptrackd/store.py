"""
Where totals live: the store interface and the in-memory store.

A store applies valid updates (the ``update`` module decides validity) and
answers "total and ts for this username". It knows nothing of WebSockets or
HTTP. Its interface is asynchronous so that a store that writes to disk in a
thread, or talks to a database server, fits behind the same adapters.

A store is a Twisted service: ``startService`` opens it, ``stopService`` is
its ``close()``. The assembly (``server``) stops it last, after both
listeners and every connection have gone.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any, Final, NamedTuple

from twisted.application.service import IService, Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import Attribute, implementer

from .update import MAX_SAFE_INTEGER, Update

DEFAULT_DEDUPE_RETENTION: Final = 7 * 24 * 3600.0
"""How long, in seconds, an applied update id is remembered by default."""


class Outcome(enum.StrEnum):
    """What a store did with one valid update."""

    APPLIED = "applied"
    DUPLICATE = "duplicate"
    """Its update_id was already applied for the same username: ignored."""
    TOTAL_OVERFLOW = "total_overflow"
    """It would push the total past 2^53 - 1: ignored."""


class Total(NamedTuple):
    """A user's running total and the greatest ts among their updates."""

    cumulative_steps: int
    ts: int | float


class StoreClosed(Exception):
    """The store was used after ``close()``."""


class StoreUnusable(Exception):
    """The store cannot be opened: the message says what and where."""


class StoreWriteFailed(Exception):
    """
    The store could not persist some updates (a full disk, say): none of
    them was applied. The store logs the cause; callers need not.
    """


class IStepStore(IService):
    """
    Keeps each user's total and ts, applying every update exactly once.
    """

    description: str = Attribute(
        "What this store is, for the start-up log line, e.g. 'memory:'."
    )

    def apply(updates: Sequence[Update]) -> Deferred[list[Outcome]]:
        """
        Apply ``updates`` in order. The Deferred fires with one outcome per
        update, once the store holds them as firmly as it ever will (for a
        durable store: once they are on disk).
        """

    def total(username: str) -> Deferred[Total | None]:
        """The user's total, or ``None`` for a user with no update."""

    def close() -> Deferred[None]:
        """
        Finish what the store holds and release it. Also ``stopService``.
        """


_log = Logger()


class AppliedIds(dict[str, float]):
    """
    The ids of the updates applied within the retention period, each with
    when it was applied, oldest first (a dict keeps insertion order), so that
    expired ones are forgotten from the front in bounded steps.

    A key is the username and the update_id joined by a NUL, which cannot
    occur in a valid username: one short string per id costs far less
    memory than a tuple of two. It is a dict, not a wrapper around one, so
    that the per-update checks on the hot path are plain dict operations.
    """

    @staticmethod
    def key(username: str, update_id: str) -> str:
        return f"{username}\0{update_id}"

    def forget_before(self, horizon: float, limit: int) -> int:
        """Forget up to ``limit`` ids applied before ``horizon``; say how many."""
        due: list[str] = []
        for key, applied_at in self.items():
            if applied_at >= horizon or len(due) == limit:
                break
            due.append(key)
        for key in due:
            del self[key]
        return len(due)


@implementer(IStepStore)
class MemoryStore(Service):
    """
    Totals and remembered update ids in dictionaries. Fast, and forgets
    everything when the process exits.

    Update ids are remembered for ``dedupe_retention`` seconds after they
    were applied, measured on ``clock``; a periodic job forgets older ones in
    bounded steps so that a large backlog never stalls ingest.
    """

    name = "store"
    description = "memory: (totals are lost when the process exits)"

    prune_interval = 60.0
    prune_batch = 10_000

    def __init__(
        self,
        clock: IReactorTime,
        dedupe_retention: float = DEFAULT_DEDUPE_RETENTION,
    ) -> None:
        self._clock = clock
        self._retention = dedupe_retention
        # username -> [cumulative steps, greatest ts]
        self._totals: dict[str, list[int | float]] = {}
        self._applied_ids = AppliedIds()
        self._pruning: LoopingCall | None = None
        self._closed = False

    def startService(self) -> None:
        super().startService()
        self._pruning = LoopingCall(self.prune)
        self._pruning.clock = self._clock
        self._pruning.start(self.prune_interval, now=False)

    def stopService(self) -> Deferred[None]:
        return self.close()

    def close(self) -> Deferred[None]:
        if self.running:
            super().stopService()
        if self._pruning is not None and self._pruning.running:
            self._pruning.stop()
        self._closed = True
        return succeed(None)

    @property
    def remembered_ids(self) -> int:
        """How many applied update ids the store remembers right now."""
        return len(self._applied_ids)

    def apply(self, updates: Sequence[Update]) -> Deferred[list[Outcome]]:
        if self._closed:
            raise StoreClosed()
        return succeed(self.apply_now(updates))

    def apply_now(self, updates: Sequence[Update]) -> list[Outcome]:
        """:meth:`apply`, without the Deferred."""
        totals = self._totals
        applied_ids = self._applied_ids
        now = self._clock.seconds()
        outcomes = []
        for update in updates:
            username = update.username
            if update.update_id is not None:
                key = f"{username}\0{update.update_id}"  # AppliedIds.key, inlined
                if key in applied_ids:
                    outcomes.append(Outcome.DUPLICATE)
                    continue
            else:
                key = None
            entry = totals.get(username)
            if entry is None:
                if update.new_steps > MAX_SAFE_INTEGER:
                    outcomes.append(Outcome.TOTAL_OVERFLOW)
                    continue
                totals[username] = [update.new_steps, update.ts]
            else:
                steps = entry[0] + update.new_steps
                if steps > MAX_SAFE_INTEGER:
                    outcomes.append(Outcome.TOTAL_OVERFLOW)
                    continue
                entry[0] = steps
                if update.ts > entry[1]:
                    entry[1] = update.ts
            if key is not None:
                applied_ids[key] = now
            outcomes.append(Outcome.APPLIED)
        return outcomes

    def total(self, username: str) -> Deferred[Total | None]:
        if self._closed:
            raise StoreClosed()
        entry = self._totals.get(username)
        if entry is None:
            return succeed(None)
        steps, ts = entry
        return succeed(Total(int(steps), ts))

    def prune(self) -> None:
        """
        Forget update ids applied longer ago than the retention period, at
        most ``prune_batch`` of them now; if more are due, continue on the
        next reactor turn rather than hold the reactor.
        """
        try:
            horizon = self._clock.seconds() - self._retention
            forgotten = self._applied_ids.forget_before(horizon, self.prune_batch)
            if forgotten == self.prune_batch and not self._closed:
                self._clock.callLater(0, self.prune)
        except Exception:
            # A failure must not end the periodic job (LoopingCall stops on
            # an exception): log it and try again at the next interval.
            _log.failure("Pruning remembered update ids failed")


DEFAULT_STORE = "sqlite:steptrack.sqlite3"
STORE_KINDS = "memory: (in memory, lost at exit) or sqlite:PATH (durable)"


def check_store_url(url: str) -> None:
    """
    Raise ``ValueError``, with a message fit for the user, unless ``url``
    names a store this build has.
    """
    scheme, _, rest = url.partition(":")
    if (scheme, rest) == ("memory", "") or (scheme == "sqlite" and rest):
        return
    raise ValueError(f"unknown store {url!r}: the stores are {STORE_KINDS}")


def open_store(
    url: str,
    reactor: Any,
    dedupe_retention: float = DEFAULT_DEDUPE_RETENTION,
    clock: IReactorTime | None = None,
) -> IStepStore:
    """
    Make the store that ``url`` names (see :func:`check_store_url`). It is
    opened when started. ``clock`` (default: ``reactor``) measures time.
    """
    check_store_url(url)
    clock = clock if clock is not None else reactor
    if url.startswith("sqlite:"):
        from .sqlite_store import SQLiteStore

        return SQLiteStore(url[len("sqlite:") :], reactor, clock, dedupe_retention)
    return MemoryStore(clock, dedupe_retention)
