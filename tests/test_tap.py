"""
The ``twistd steptrack`` options and the service they build, without
starting anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import twisted.test
from twisted.python import usage

from steptrackd.server import ProtocolLimits, SteptrackService
from steptrackd.store import MemoryStore
from steptrackd.supervisor import Supervisor, usable_cores
from steptrackd.tap import Options, makeService

# A TLS endpoint needs a real key and certificate: Twisted's test one.
TLS_ENDPOINT = "ssl:0:privateKey=" + str(
    Path(twisted.test.__file__).with_name("server.pem")
).replace(":", "\\:")


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


def test_defaults_follow_the_contract() -> None:
    """Dual-stack 8081 and 8080, a durable store and the section 5 limits."""
    options = parse()
    assert options["ws-listen"] == r"tcp6:8081:interface=\:\:"
    assert options["rest-listen"] == r"tcp6:8080:interface=\:\:"
    assert options["store"] == "sqlite:steptrack.sqlite3"
    assert options["dedupe-retention"] == 7 * 24 * 3600
    assert options.limits() == ProtocolLimits()
    assert options.limits().max_message_size == 64 * 1024


def test_durations_take_units() -> None:
    """Durations are seconds, or numbers with s, m, h or d."""
    options = parse(
        "--dedupe-retention", "14d", "--ping-interval", "45", "--ping-timeout", "1m"
    )
    assert options["dedupe-retention"] == 14 * 86400
    assert options.limits().ping_interval == 45
    assert options.limits().ping_timeout == 60


def test_help_shows_every_default() -> None:
    """--help lists every option with its default."""
    text = " ".join(str(Options()).split())
    options: list[list[Any]] = Options.optParameters  # type: ignore[assignment]
    for name, _, default, *_ in options:
        assert f"--{name}=" in text
        assert f"[default: {default}]" in text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-message-size", "0"], "positive"),
        (["--max-message-size", "big"], "max-message-size"),
        (["--max-new-steps", "-5"], "positive"),
        (["--max-new-steps", str(2**53)], "2\\^53"),
        (["--dedupe-retention", "0"], "dedupe-retention"),
        (["--dedupe-retention", "forever"], "duration"),
        (["--ping-interval", "soon"], "duration"),
        (["--handshake-timeout", "0"], "handshake-timeout"),
        (["--ping-interval", "10", "--ping-timeout", "0"], "ping-timeout"),
        (["--ws-listen", "nonsense:1"], "--ws-listen"),
        (["--rest-listen", "tcp:notaport"], "--rest-listen"),
        (["--store", "bogus:"], "--store"),
        (["--store", "memory:extra"], "--store"),
        (["--workers", "0"], "--workers"),
        (["--workers", "many"], "--workers"),
        (["--workers", "65"], "at most 64"),
        (["--workers", "2", "--rest-listen", "unix:/tmp/steps.sock"], "tcp:"),
        (["--workers", "2", "--store", "memory:"], "sqlite: store"),
        (["--workers", "2", "--ws-listen", TLS_ENDPOINT], "tcp:"),
    ],
)
def test_bad_values_are_usage_errors(argv: list[str], message: str) -> None:
    """A bad option value is a UsageError that says what is wrong."""
    with pytest.raises(usage.UsageError, match=message):
        parse(*argv)


def test_workers_default_to_one_per_core_when_they_can_share() -> None:
    """auto: one worker per usable core, but one where workers cannot share."""
    assert parse()["workers"] == usable_cores()
    assert parse("--workers", "3")["workers"] == 3
    assert parse("--store", "memory:")["workers"] == 1
    assert parse("--rest-listen", TLS_ENDPOINT)["workers"] == 1
    assert parse("--ws-listen", "unix:/tmp/steps.sock")["workers"] == 1
    assert parse("--rest-listen", r"tcp6:8080:interface=\:\:1")["workers"] > 1


def test_make_service_with_workers_is_a_supervisor() -> None:
    """More than one worker: the service is their supervisor, on the database."""
    service = makeService(parse("--workers", "2", "--store", "sqlite:/srv/s.db"))
    assert isinstance(service, Supervisor)
    assert (service.count, service.database) == (2, "/srv/s.db")
    assert isinstance(makeService(parse("--workers", "1")), SteptrackService)


def test_ping_timeout_may_be_zero_when_pings_are_off() -> None:
    """--ping-interval 0 turns keepalive off; then no timeout is needed."""
    assert (
        parse("--ping-interval", "0", "--ping-timeout", "0").limits().ping_interval == 0
    )


def test_make_service_assembles_store_and_listeners() -> None:
    """The service holds the store first and both listeners, with the limits given."""
    service = makeService(
        parse(
            "--store",
            "memory:",
            "--max-message-size",
            "1000",
            "--dedupe-retention",
            "1h",
        )
    )
    assert isinstance(service, SteptrackService)
    assert isinstance(service.store, MemoryStore)
    assert service.store._retention == 3600
    assert next(iter(service)) is service.store
    assert service.limits.max_message_size == 1000
    assert service.ws_factory.maxMessagePayloadSize == 1000


def test_plugin_is_lazy() -> None:
    """The twistd plugin names the tap module without importing Autobahn or Klein."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from twisted.plugin import getPlugins\n"
        "from twisted.application.service import IServiceMaker\n"
        "names = [p.tapname for p in getPlugins(IServiceMaker)]\n"
        "assert 'steptrack' in names, names\n"
        "heavy = ('autobahn', 'klein', 'steptrackd.server')\n"
        "loaded = [m for m in heavy if m in sys.modules]\n"
        "assert not loaded, loaded\n"
        "assert 'twisted.internet.reactor' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
