"""
The supervisor's decisions that the real-process tests cannot provoke: a
worker failing while the daemon starts (everything a worker needs is
checked by the parent first, so a real one cannot be made to fail then).
"""

from __future__ import annotations

from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import ProcessTerminated
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, capturedLogs
from twisted.python.failure import Failure

from steptrackd.server import ProtocolLimits
from steptrackd.supervisor import Supervisor, _Worker


def supervisor_on(reactor: MemoryReactorClock) -> Supervisor:
    endpoint = TCP4ServerEndpoint(reactor, 0)
    return Supervisor(
        reactor,
        endpoint,
        endpoint,
        "steps.sqlite3",
        2,
        dedupe_retention=60,
        limits=ProtocolLimits(),
    )


def test_a_worker_failing_while_starting_stops_the_daemon_with_status_1() -> None:
    """No restart loop: the daemon stops, says why, and will exit with 1."""
    reactor = MemoryReactorClock()
    supervisor = supervisor_on(reactor)
    worker = _Worker(supervisor, 1)
    supervisor.workers[1] = worker

    with capturedLogs() as events:
        supervisor.worker_ended(worker, Failure(ProcessTerminated(exitCode=1)))

    assert supervisor.exit_status == 1
    assert reactor.hasStopped
    assert not reactor.getDelayedCalls(), "a restart was scheduled"
    critical = [e for e in events if e["log_level"] == LogLevel.critical]
    assert len(critical) == 1 and critical[0]["index"] == 1


def test_a_worker_dying_after_the_start_is_replaced_later() -> None:
    """Once the daemon has started, a dead worker is replaced after a pause."""
    reactor = MemoryReactorClock()
    supervisor = supervisor_on(reactor)
    worker = _Worker(supervisor, 2)
    supervisor.workers[2] = worker
    supervisor._announced = True

    with capturedLogs() as events:
        supervisor.worker_ended(worker, Failure(ProcessTerminated(signal=9)))

    assert supervisor.exit_status == 0 and not reactor.hasStopped
    (restart,) = reactor.getDelayedCalls()
    assert restart.getTime() == supervisor.restart_delay
    assert [e["log_level"] for e in events] == [LogLevel.error]
