"""
The store contract (section 3 of the contract), run against every store.

Time is a ``task.Clock``, and no test runs the reactor. Every store kind is
built by one entry of ``STORES``; a new store joins the suite by adding an
entry there. The memory store answers at once; the SQLite store's writer
thread hands its results over with ``callFromThread``, which here is
:class:`ThreadCalls`, run by the test until the result it waits for is in.
"""

from __future__ import annotations

import os
import queue
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.task import Clock
from zope.interface import implementer

from steptrackd.sqlite_store import SQLiteStore
from steptrackd.store import (
    DEFAULT_DEDUPE_RETENTION,
    AppliedIds,
    IStepStore,
    MemoryStore,
    Outcome,
    StoreClosed,
    Total,
    open_store,
)
from steptrackd.update import MAX_SAFE_INTEGER, Update

T = TypeVar("T")

DAY = 24 * 3600.0


@implementer(IReactorFromThreads)
class ThreadCalls:
    """
    Stands in for the reactor's ``callFromThread``: calls from other threads
    wait in a queue until the test runs them.
    """

    def __init__(self) -> None:
        self._calls: queue.Queue[tuple[Callable[..., Any], Any, Any]] = queue.Queue()

    def callFromThread(
        self, callable: Callable[..., Any], *args: object, **kwargs: object
    ) -> None:
        self._calls.put((callable, args, kwargs))

    def run_until(self, deferred: Deferred[Any], timeout: float = 10.0) -> None:
        while not deferred.called:
            f, args, kwargs = self._calls.get(timeout=timeout)
            f(*args, **kwargs)

    def run_pending(self) -> None:
        """Run the calls already made, and no more."""
        while not self._calls.empty():
            f, args, kwargs = self._calls.get()
            f(*args, **kwargs)


THREAD_CALLS = ThreadCalls()


def _sqlite(clock: Clock, retention: float, shared: bool = False) -> IStepStore:
    directory = tempfile.mkdtemp(prefix="steptrack-test-")
    path = os.path.join(directory, "steps.sqlite3")
    return SQLiteStore(path, THREAD_CALLS, clock, retention, shared=shared)


STORES: dict[str, Callable[[Clock, float], IStepStore]] = {
    "memory": lambda clock, retention: MemoryStore(clock, retention),
    "sqlite": _sqlite,
    # One of the stores of several worker processes (alone on its file here:
    # test_sqlite_store runs several at once).
    "sqlite-shared": lambda clock, retention: _sqlite(clock, retention, shared=True),
}


def result_of(deferred: Deferred[T]) -> T:
    """The result of a Deferred, once calls from store threads have run."""
    THREAD_CALLS.run_until(deferred)
    results: list[T] = []
    failures: list[Any] = []
    deferred.addCallbacks(results.append, failures.append)
    if failures:
        failures[0].raiseException()
    return results[0]


class StoreUnderTest:
    def __init__(
        self,
        make: Callable[[Clock, float], IStepStore],
        retention: float = DEFAULT_DEDUPE_RETENTION,
    ) -> None:
        self.clock = Clock()
        self.store = make(self.clock, retention)
        self.store.startService()

    def apply(self, *updates: Update) -> list[Outcome]:
        return result_of(self.store.apply(list(updates)))

    def total(self, username: str) -> Total | None:
        return result_of(self.store.total(username))

    def settle(self) -> None:
        """Let the store finish what it has scheduled (a prune, say)."""
        self.clock.advance(0)
        self.apply()

    def close(self) -> None:
        result_of(self.store.close())
        path = getattr(self.store, "path", None)
        if path is not None:
            shutil.rmtree(os.path.dirname(path))

    def remembered_ids(self) -> int:
        self.settle()
        count: int = self.store.remembered_ids  # type: ignore[attr-defined]
        return count


@pytest.fixture(params=sorted(STORES))
def store_kind(request: pytest.FixtureRequest) -> Callable[[Clock, float], IStepStore]:
    return STORES[request.param]


@pytest.fixture
def subject(
    store_kind: Callable[[Clock, float], IStepStore],
) -> Iterator[StoreUnderTest]:
    subject = StoreUnderTest(store_kind)
    yield subject
    subject.close()


def test_unknown_user_has_no_total(subject: StoreUnderTest) -> None:
    """A user with no applied update reads as None (REST turns that into 404)."""
    assert subject.total("nobody") is None


def test_first_update_creates_the_user(subject: StoreUnderTest) -> None:
    """A valid update for a new user creates it with that update's steps and ts."""
    assert subject.apply(Update("luisa", 1666960429981, 108)) == [Outcome.APPLIED]
    assert subject.total("luisa") == Total(108, 1666960429981)


def test_steps_add_up(subject: StoreUnderTest) -> None:
    """cumulativeSteps is the sum of newSteps over applied updates."""
    subject.apply(Update("a", 1, 10), Update("a", 2, 20), Update("a", 3, 0))
    assert subject.total("a") == Total(30, 3)


def test_ts_is_the_greatest_not_the_last(subject: StoreUnderTest) -> None:
    """A late update with an older ts adds its steps but does not move ts back."""
    subject.apply(Update("a", 500, 1), Update("a", 100, 2))
    assert subject.total("a") == Total(3, 500)


def test_ts_keeps_its_type(subject: StoreUnderTest) -> None:
    """An integer ts comes back as an int, a fractional one as a float."""
    subject.apply(Update("int", 7, 1), Update("float", 7.5, 1))
    assert type(subject.total("int").ts) is int  # type: ignore[union-attr]
    assert subject.total("float") == Total(1, 7.5)


def test_duplicate_update_id_is_ignored(subject: StoreUnderTest) -> None:
    """An update_id already applied for the same username is not counted again."""
    outcomes = subject.apply(Update("a", 1, 10, "id-1"), Update("a", 9, 10, "id-1"))
    assert outcomes == [Outcome.APPLIED, Outcome.DUPLICATE]
    assert subject.total("a") == Total(10, 1)


def test_duplicate_in_a_later_call_is_ignored(subject: StoreUnderTest) -> None:
    """Exactly-once holds across calls, not only within one batch."""
    subject.apply(Update("a", 1, 10, "id-1"))
    assert subject.apply(Update("a", 1, 10, "id-1")) == [Outcome.DUPLICATE]
    assert subject.total("a") == Total(10, 1)


def test_same_update_id_for_another_user_counts(subject: StoreUnderTest) -> None:
    """Update ids are scoped by username."""
    subject.apply(Update("a", 1, 10, "same"), Update("b", 1, 5, "same"))
    assert (subject.total("a"), subject.total("b")) == (Total(10, 1), Total(5, 1))


def test_updates_without_id_always_apply(subject: StoreUnderTest) -> None:
    """An update without update_id cannot be deduplicated, so it always counts."""
    subject.apply(Update("a", 1, 10), Update("a", 1, 10))
    assert subject.total("a") == Total(20, 1)


def test_usernames_are_exact_and_case_sensitive(subject: StoreUnderTest) -> None:
    """Case matters, and names like toString or __proto__ are plain names."""
    names = ["luisa", "Luisa", "toString", "__proto__", "constructor", "__class__"]
    subject.apply(*(Update(name, i, i + 1) for i, name in enumerate(names)))
    for i, name in enumerate(names):
        assert subject.total(name) == Total(i + 1, i)
    assert subject.total("get") is None
    assert subject.total("keys") is None


def test_total_may_reach_but_not_pass_the_safe_limit(subject: StoreUnderTest) -> None:
    """An update that would pass 2^53 - 1 is refused and changes nothing."""
    big = 1_000_000
    start = MAX_SAFE_INTEGER - big
    subject.apply(Update("a", 1, start))
    outcomes = subject.apply(
        Update("a", 99, big + 1, "over"), Update("a", 2, big, "exact")
    )
    assert outcomes == [Outcome.TOTAL_OVERFLOW, Outcome.APPLIED]
    assert subject.total("a") == Total(MAX_SAFE_INTEGER, 2)
    # A refused update's id was not remembered: it was never applied.
    assert subject.apply(Update("a", 3, 0, "over")) == [Outcome.APPLIED]


def test_ids_are_remembered_for_the_retention_period(subject: StoreUnderTest) -> None:
    """A resend within the retention period is a duplicate, however late."""
    subject.apply(Update("a", 1, 10, "id-1"))
    subject.clock.advance(DEFAULT_DEDUPE_RETENTION - 1)
    assert subject.apply(Update("a", 1, 10, "id-1")) == [Outcome.DUPLICATE]


def test_ids_are_forgotten_after_the_retention_period(
    store_kind: Callable[[Clock, float], IStepStore],
) -> None:
    """Dedupe state is bounded: ids older than the retention are pruned."""
    subject = StoreUnderTest(store_kind, retention=7 * DAY)
    interval = subject.store.prune_interval  # type: ignore[attr-defined]
    subject.apply(Update("a", 1, 10, "old"))
    subject.clock.advance(3 * DAY)
    subject.apply(Update("a", 1, 10, "newer"))
    assert subject.remembered_ids() == 2
    for _ in range(int(4 * DAY / interval) + 2):
        subject.clock.advance(interval)
    assert subject.remembered_ids() == 1
    assert subject.apply(Update("a", 1, 10, "old")) == [Outcome.APPLIED]
    assert subject.apply(Update("a", 1, 10, "newer")) == [Outcome.DUPLICATE]
    subject.close()


def test_pruning_works_in_bounded_steps(
    store_kind: Callable[[Clock, float], IStepStore],
) -> None:
    """A large backlog of expired ids is forgotten a bounded batch at a time."""
    subject = StoreUnderTest(store_kind, retention=10)
    subject.store.prune_batch = 100  # type: ignore[attr-defined]
    subject.apply(*(Update("a", 1, 1, f"id-{i}") for i in range(250)))
    subject.clock.advance(11)
    subject.store.prune()  # type: ignore[attr-defined]
    subject.apply()
    assert subject.store.remembered_ids == 150  # type: ignore[attr-defined]
    subject.settle()
    subject.settle()
    assert subject.remembered_ids() == 0
    subject.close()


def test_a_failing_prune_does_not_end_pruning(monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception inside one prune is logged, and the periodic job goes on."""
    clock = Clock()
    store = MemoryStore(clock, dedupe_retention=10)
    store.startService()
    result_of(store.apply([Update("a", 1, 1, "x")]))
    calls = []
    real = store._applied_ids

    class Exploding(AppliedIds):
        def forget_before(self, horizon: float, limit: int) -> int:
            calls.append(1)
            raise RuntimeError("boom")

    store._applied_ids = Exploding()
    clock.advance(store.prune_interval)
    assert calls == [1]
    store._applied_ids = real
    clock.advance(store.prune_interval)
    assert store.remembered_ids == 0
    result_of(store.close())


def test_closed_store_refuses_work(subject: StoreUnderTest) -> None:
    """After close() a store says so instead of silently dropping updates."""
    result_of(subject.store.close())
    with pytest.raises(StoreClosed):
        subject.store.apply([Update("a", 1, 1)])


def test_stop_service_is_close(subject: StoreUnderTest) -> None:
    """stopService closes the store."""
    result_of(subject.store.stopService())
    with pytest.raises(StoreClosed):
        subject.store.total("a")


def test_open_store_knows_memory_and_refuses_others() -> None:
    """--store memory: gives a memory store; an unknown URL is a clear ValueError."""
    assert isinstance(open_store("memory:", Clock(), 1.0), MemoryStore)
    with pytest.raises(ValueError, match="unknown store"):
        open_store("bogus:", Clock(), 1.0)


# A sequence of updates: each is (username, update_id or None, ts, newSteps).
_updates = st.lists(
    st.tuples(
        st.sampled_from(["a", "b", "c"]),
        st.one_of(st.none(), st.sampled_from(["u1", "u2", "u3", "u4"])),
        st.one_of(st.integers(0, 1000), st.floats(0, 1000)),
        st.integers(0, 1000),
    ),
    max_size=40,
)


# No deadline: an example's time is mostly the durable stores' disk syncs
# (one per batch), which say nothing about the property checked here.
@settings(max_examples=200, deadline=None)
@given(updates=_updates, batch=st.integers(1, 5))
def test_totals_are_sums_over_distinct_ids(
    updates: list[tuple[str, str | None, float, int]], batch: int
) -> None:
    """Any updates, in any batches: totals sum distinct ids, ts is the greatest."""
    for make in STORES.values():
        subject = StoreUnderTest(make)
        decoded = [Update(u, ts, n, i) for u, i, ts, n in updates]
        for start in range(0, len(decoded), batch):
            subject.apply(*decoded[start : start + batch])
        expected: dict[str, tuple[int, float]] = {}
        seen: set[tuple[str, str]] = set()
        for username, update_id, ts, new_steps in updates:
            if update_id is not None:
                if (username, update_id) in seen:
                    continue
                seen.add((username, update_id))
            steps, greatest = expected.get(username, (0, ts))
            expected[username] = (steps + new_steps, max(greatest, ts))
        for username in ["a", "b", "c"]:
            total = subject.total(username)
            if username in expected:
                assert total == Total(*expected[username])
            else:
                assert total is None
        subject.close()


def test_first_update_may_not_pass_the_safe_limit(subject: StoreUnderTest) -> None:
    """Even a new user's first update is refused if it alone passes 2^53 - 1."""
    outcomes = subject.apply(
        Update("new", 1, MAX_SAFE_INTEGER + 1, "x"), Update("new", 2, 5)
    )
    assert outcomes == [Outcome.TOTAL_OVERFLOW, Outcome.APPLIED]
    assert subject.total("new") == Total(5, 2)
