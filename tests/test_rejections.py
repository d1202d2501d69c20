"""
Counting invalid updates, and the warning summary that keeps the log calm.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs

from steptrackd.rejections import RejectionCounter
from steptrackd.update import Reason


def warnings(events: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e.get("log_level") == LogLevel.warn]


def test_one_warning_per_interval_with_counts_by_reason() -> None:
    """Many invalid updates in an interval give one warning, with counts by reason."""
    clock = Clock()
    counter = RejectionCounter(clock, interval=10)
    counter.startService()
    with capturedLogs() as events:
        for _ in range(1000):
            counter.count(Reason.NOT_JSON, "JSON is malformed")
        counter.count(Reason.BAD_TS, "ts out of range")
        assert warnings(events) == []
        clock.advance(10)
    [warning] = warnings(events)
    assert warning["count"] == 1001
    assert warning["by_reason"] == {"not_json": 1000, "bad_ts": 1}
    assert counter.totals == {Reason.NOT_JSON: 1000, Reason.BAD_TS: 1}
    counter.stopService()


def test_quiet_intervals_log_nothing() -> None:
    """No invalid update, no warning."""
    clock = Clock()
    counter = RejectionCounter(clock, interval=10)
    counter.startService()
    with capturedLogs() as events:
        clock.advance(100)
    assert warnings(events) == []
    counter.stopService()


def test_totals_keep_growing_across_reports() -> None:
    """Each summary covers its interval; the totals cover the whole life."""
    clock = Clock()
    counter = RejectionCounter(clock, interval=10)
    counter.startService()
    with capturedLogs() as events:
        counter.count(Reason.BAD_USERNAME, "empty")
        clock.advance(10)
        counter.count(Reason.BAD_USERNAME, "empty")
        clock.advance(10)
    assert [w["count"] for w in warnings(events)] == [1, 1]
    assert counter.totals == {Reason.BAD_USERNAME: 2}
    counter.stopService()


def test_stopping_reports_what_is_pending() -> None:
    """Invalid updates counted just before shutdown still reach the log."""
    counter = RejectionCounter(Clock(), interval=10)
    counter.startService()
    counter.count(Reason.BAD_NEW_STEPS, "1.5")
    with capturedLogs() as events:
        counter.stopService()
    [warning] = warnings(events)
    assert warning["by_reason"] == {"bad_new_steps": 1}


def test_a_failing_summary_does_not_stop_the_reports() -> None:
    """If one summary cannot be logged, the next interval still reports."""
    clock = Clock()
    counter = RejectionCounter(clock, interval=10)
    counter.startService()
    counter.count(Reason.NOT_JSON, "x")
    counter._examples = {}  # the summary will fail to find its example
    with capturedLogs() as events:
        clock.advance(10)
        counter.count(Reason.NOT_JSON, "y")
        clock.advance(10)
    assert [e["log_level"] for e in events if "log_failure" in e] == [LogLevel.critical]
    assert [w["count"] for w in warnings(events)] == [1]
    counter.stopService()


def test_protocol_errors_are_summed_up_by_close_code() -> None:
    """Protocol errors give one warning per interval, by close code."""
    clock = Clock()
    counter = RejectionCounter(clock, interval=10)
    counter.startService()
    with capturedLogs() as events:
        for _ in range(500):
            counter.count_closed(1007, "invalid UTF-8")
        counter.count_closed(1009, "too big")
        clock.advance(10)
    [warning] = warnings(events)
    assert warning["by_code"] == {1007: 500, 1009: 1}
    assert counter.closed == {1007: 500, 1009: 1}
    counter.stopService()
