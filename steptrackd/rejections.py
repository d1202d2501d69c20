"""
Counting invalid updates and broken connections, and telling the log about
them without flooding it.

Every update that is not applied for a client's fault (bad JSON, a field out
of range, a total that would overflow) is counted here by reason, and every
connection closed for breaking the WebSocket protocol by close code. Counts
only grow, for the life of the process. The log gets at most one warning of
each kind per interval: how many since the last one, by reason or code, with
one example explanation each.
"""

from __future__ import annotations

from collections import Counter
from typing import Final

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from .update import Reason

DEFAULT_SUMMARY_INTERVAL: Final = 10.0


class RejectionCounter(Service):
    """
    Counts invalid updates by reason; while running, logs a summary warning
    every ``interval`` seconds in which there was at least one.
    """

    name = "rejections"
    log = Logger()

    def __init__(
        self, clock: IReactorTime, interval: float = DEFAULT_SUMMARY_INTERVAL
    ) -> None:
        self.totals: Counter[Reason] = Counter()
        self._clock = clock
        self._interval = interval
        self._recent: Counter[Reason] = Counter()
        self._examples: dict[Reason, str] = {}
        self.closed: Counter[int] = Counter()
        self._recent_closed: Counter[int] = Counter()
        self._closed_examples: dict[int, str] = {}
        self._summary: LoopingCall | None = None

    def count(self, reason: Reason, detail: str) -> None:
        """Count one invalid update; ``detail`` says why, for the log."""
        self.totals[reason] += 1
        self._recent[reason] += 1
        if reason not in self._examples:
            self._examples[reason] = detail[:200]

    def count_closed(self, code: int, detail: str) -> None:
        """Count one connection closed for breaking the protocol."""
        self.closed[code] += 1
        self._recent_closed[code] += 1
        if code not in self._closed_examples:
            self._closed_examples[code] = detail[:200]

    def startService(self) -> None:
        super().startService()
        self._summary = LoopingCall(self.log_summary)
        self._summary.clock = self._clock
        self._summary.start(self._interval, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self._summary is not None and self._summary.running:
            self._summary.stop()
        self.log_summary()

    def log_summary(self) -> None:
        """Log what was counted since the last summary, if anything."""
        for report in (self._report_invalid, self._report_closed):
            try:
                report()
            except Exception:
                # Never let one bad summary end the periodic job.
                self.log.failure("Logging a summary failed")

    def _report_invalid(self) -> None:
        if not self._recent:
            return
        recent, examples = self._recent, self._examples
        self._recent, self._examples = Counter(), {}
        self.log.warn(
            "Ignored {count} invalid update(s) since the last report: {breakdown}",
            count=sum(recent.values()),
            breakdown="; ".join(
                f"{reason.value} x{n} (e.g. {examples[reason]})"
                for reason, n in sorted(recent.items())
            ),
            by_reason={reason.value: n for reason, n in recent.items()},
        )

    def _report_closed(self) -> None:
        if not self._recent_closed:
            return
        closed, examples = self._recent_closed, self._closed_examples
        self._recent_closed, self._closed_examples = Counter(), {}
        self.log.warn(
            "Closed {count} connection(s) for protocol errors since the last "
            "report: {breakdown}",
            count=sum(closed.values()),
            breakdown="; ".join(
                f"{code} x{n} (e.g. {examples[code]})"
                for code, n in sorted(closed.items())
            ),
            by_code=dict(closed),
        )
