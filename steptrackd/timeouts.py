"""
The timeouts of every WebSocket connection, batched: the opening handshake,
the keepalive ping and the pong it waits for, the closing handshake.

Autobahn's factory schedules all of these through one "batched timer"
(txaio's ``IBatchedTimer`` interface: ``call_later`` returning something
with ``cancel``), so that tens of thousands of connections do not each put
calls on the reactor. txaio's own implementation costs each pending timeout
about 500 bytes (a wrapper, a closure and its cells, an empty keyword
dictionary), cancels in time proportional to the number of timeouts due in
the same second (every pong cancels one), rounds deadlines down to whole
seconds (a 0.5 s timeout fires at once), and reads the clock of the global
reactor instead of the one it was given. :class:`BatchedTimeouts`
implements the same interface with about 100 bytes per pending timeout,
cancels at once, never fires early, and uses the reactor it is given (so
tests can use ``task.Clock``).

It knows nothing of WebSocket: it runs what Autobahn asks it to run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Final

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

RESOLUTION: Final = 0.25
"""Seconds between the moments at which timeouts can fire: a timeout fires
at its deadline or up to this much later, never earlier."""
CHUNK: Final = 1000
"""Timeouts run in one go before the reactor gets its turn again: 10,000
connections opened together all ping in the same quarter second."""

_log = Logger()


class BatchedTimeouts:
    """
    Timeouts grouped by the moment they are due (a multiple of
    ``resolution``): one reactor call for each such moment, and for each
    timeout one small object in a list.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        resolution: float = RESOLUTION,
        chunk: int = CHUNK,
    ) -> None:
        self._reactor = reactor
        self._resolution = resolution
        self._chunk = chunk
        self._due: dict[int, _Moment] = {}

    def call_later(
        self, delay: float, func: Callable[..., object], *args: object, **kw: object
    ) -> Timeout:
        """Run ``func(*args, **kw)`` ``delay`` seconds from now, or a bit later."""
        now = self._reactor.seconds()
        tick = math.ceil((now + delay) / self._resolution)
        moment = self._due.get(tick)
        if moment is None:
            moment = self._due[tick] = _Moment(self, tick)
            moment.wakeup = self._reactor.callLater(
                max(0.0, tick * self._resolution - now), self._fire, moment
            )
        timeout = Timeout(partial(func, *args, **kw) if args or kw else func, moment)
        moment.timeouts.append(timeout)
        moment.pending += 1
        return timeout

    def _fire(self, moment: _Moment) -> None:
        del self._due[moment.tick]
        self._run(moment.timeouts)

    def _run(self, timeouts: list[Timeout]) -> None:
        for timeout in timeouts[: self._chunk]:
            action = timeout.action
            if action is None:
                continue  # cancelled
            timeout.action = None
            try:
                action()
            except Exception:
                # One connection's bug must not cost the others their
                # timeouts.
                _log.failure("Bug in a connection timeout")
        if len(timeouts) > self._chunk:
            self._reactor.callLater(0, self._run, timeouts[self._chunk :])

    def _forget(self, moment: _Moment) -> None:
        """Every timeout of ``moment`` was cancelled: no need to wake up."""
        if self._due.get(moment.tick) is moment:
            del self._due[moment.tick]
            assert moment.wakeup is not None
            moment.wakeup.cancel()


class _Moment:
    """The timeouts due at one tick, and the reactor call that runs them."""

    __slots__ = ("owner", "pending", "tick", "timeouts", "wakeup")

    def __init__(self, owner: BatchedTimeouts, tick: int) -> None:
        self.owner = owner
        self.tick = tick
        self.timeouts: list[Timeout] = []
        self.pending = 0
        """Timeouts in ``timeouts`` neither cancelled nor run yet."""
        self.wakeup: IDelayedCall | None = None


class Timeout:
    """One pending call; ``cancel()`` is all Autobahn may use of it."""

    __slots__ = ("action", "moment")

    def __init__(self, action: Callable[[], object], moment: _Moment) -> None:
        self.action: Callable[[], object] | None = action
        """What to run; ``None`` once run or cancelled."""
        self.moment = moment

    def cancel(self) -> None:
        # A cancelled timeout stays in its moment's list until then (a
        # removal would cost time in proportion to the list), but lets go of
        # what it would have run, and so of its connection.
        if self.action is None:
            return
        self.action = None
        moment = self.moment
        moment.pending -= 1
        if moment.pending == 0:
            moment.owner._forget(moment)
