"""
The batched timer behind every connection's timeouts, on a ``task.Clock``.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs

from steptrackd.timeouts import BatchedTimeouts


def test_a_timeout_fires_at_its_deadline_never_before() -> None:
    """A timeout runs once its delay has passed, and not a moment earlier."""
    clock = Clock()
    clock.advance(1000.1)
    timeouts = BatchedTimeouts(clock, resolution=0.25)
    fired: list[float] = []
    timeouts.call_later(0.5, lambda: fired.append(clock.seconds()))
    clock.advance(0.49)
    assert fired == []
    clock.advance(0.25)
    assert len(fired) == 1
    assert 1000.6 <= fired[0] <= 1000.6 + 0.25


def test_timeouts_due_together_share_one_reactor_call() -> None:
    """Many timeouts due in the same tick cost the reactor one delayed call."""
    clock = Clock()
    timeouts = BatchedTimeouts(clock, resolution=0.25)
    fired: list[int] = []
    for i in range(100):
        timeouts.call_later(30.01 + i / 1000, fired.append, i)
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(30.25)
    assert fired == list(range(100))


def test_a_cancelled_timeout_does_not_run() -> None:
    """cancel() keeps a timeout from running; the others still run."""
    clock = Clock()
    timeouts = BatchedTimeouts(clock)
    fired: list[str] = []
    kept = timeouts.call_later(1, fired.append, "kept")
    dropped = timeouts.call_later(1, fired.append, "dropped")
    dropped.cancel()
    dropped.cancel()  # twice is harmless
    clock.advance(2)
    assert fired == ["kept"]
    kept.cancel()  # after it ran: harmless too
    assert fired == ["kept"]


def test_cancelling_every_timeout_of_a_tick_cancels_the_reactor_call() -> None:
    """Nothing stays scheduled on the reactor for timeouts that were all cancelled."""
    clock = Clock()
    timeouts = BatchedTimeouts(clock)
    pending = [timeouts.call_later(10, lambda: None) for _ in range(3)]
    for timeout in pending:
        timeout.cancel()
    assert clock.getDelayedCalls() == []


def test_keyword_arguments_reach_the_call() -> None:
    """call_later passes positional and keyword arguments, as txaio's does."""
    clock = Clock()
    timeouts = BatchedTimeouts(clock)
    seen: list[tuple[int, str]] = []
    timeouts.call_later(1, lambda a, b: seen.append((a, b)), 1, b="two")
    clock.advance(1)
    assert seen == [(1, "two")]


def test_a_failing_timeout_is_logged_and_the_rest_still_run() -> None:
    """One timeout raising costs no other timeout its turn."""
    clock = Clock()
    timeouts = BatchedTimeouts(clock)
    fired: list[str] = []

    def broken() -> None:
        raise ZeroDivisionError("bug")

    timeouts.call_later(1, fired.append, "before")
    timeouts.call_later(1, broken)
    timeouts.call_later(1, fired.append, "after")
    with capturedLogs() as events:
        clock.advance(1)
    assert fired == ["before", "after"]
    [failure] = [e for e in events if e.get("log_level") == LogLevel.critical]
    assert failure["log_failure"].check(ZeroDivisionError)


def test_a_large_tick_runs_in_chunks_with_the_reactor_between() -> None:
    """Thousands due at once run a chunk at a time, all of them in the end."""
    clock = Clock()
    timeouts = BatchedTimeouts(clock, chunk=100)
    fired: list[int | str] = []
    # The first one asks the reactor for a turn: it comes after the chunk.
    timeouts.call_later(5, lambda: clock.callLater(0, fired.append, "reactor"))
    for i in range(250):
        timeouts.call_later(5, fired.append, i)
    clock.advance(5)
    assert fired == [*range(99), "reactor", *range(99, 250)]
    assert clock.getDelayedCalls() == []


def test_a_timeout_set_from_a_timeout_runs_later() -> None:
    """A timeout may schedule another; each runs at its own time."""
    clock = Clock()
    timeouts = BatchedTimeouts(clock, resolution=0.25)
    fired: list[float] = []

    def again() -> None:
        fired.append(clock.seconds())
        if len(fired) < 3:
            timeouts.call_later(30, again)

    timeouts.call_later(30, again)
    clock.pump([0.25] * 400)
    assert fired == [30.0, 60.0, 90.0]
