"""
Acknowledged updates survive the death of the real daemon.

A few protocol v2 clients stream batches to ``twistd -n steptrack`` on a
SQLite file; the daemon is killed with SIGKILL (or stopped with SIGTERM)
while batches are in flight, and a second daemon on the same file must show
every update that was acknowledged, no update counted twice, and accept a
resend of everything without counting anything again.

The workload makes a total say exactly which updates it holds: update ``j``
of a user carries ``4 ** j`` steps, so the total written in base 4 has one
digit per update, counting how often that update was applied (a 2 is a
double count). What is tested here is the process and its file; the store's
own transactions are tested in memory and on temporary files elsewhere.
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import signal
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import pytest_twisted
from twisted.internet.task import deferLater

from .clients import Closed, RecordingClient, http, open_ws, wait_for_total
from .test_e2e import (
    LOOPBACK,
    STOP_TIMEOUT,
    Daemon,
    Daemons,
    Exit,
    assert_no_traceback,
    reactor,
)

V2 = "steptrack.v2"
DIGIT = 4
UPDATES_PER_USER = 26
"""Update ``j`` carries ``DIGIT ** j`` steps; even counted three times over,
every total stays below 2^53 - 1."""
MAX_NEW_STEPS = DIGIT ** (UPDATES_PER_USER - 1)
FIRST_TS = 1_700_000_000_000
POLL = 0.002
"""Seconds between looks at what the clients have received."""
STREAM_TIMEOUT = 20.0
"""Generous: the whole stream normally takes well under a second."""


@dataclass(frozen=True)
class Update:
    """One update the test may send."""

    update_id: str
    username: str
    ts: int
    new_steps: int

    def wire(self) -> dict[str, Any]:
        return {
            "update_id": self.update_id,
            "username": self.username,
            "ts": self.ts,
            "newSteps": self.new_steps,
        }


def make_streams(
    rng: random.Random, run: str, connections: int, users: int, batch_size: int
) -> list[list[list[Update]]]:
    """
    For each connection, its batches in send order. A connection carries all
    the updates of its ``users`` users, each user's in order of ``j``, the
    users interleaved at random; ts goes up and down within a user so that
    the greatest ts is rarely the last one sent.
    """
    streams = []
    for connection in range(connections):
        queues = []
        for number in range(users):
            username = f"{run}-walker {connection}.{number}"
            order = rng.sample(range(UPDATES_PER_USER), UPDATES_PER_USER)
            queues.append(
                [
                    Update(
                        f"{run}:{connection}:{number}:{j}",
                        username,
                        FIRST_TS + 1000 * order[j] + number,
                        DIGIT**j,
                    )
                    for j in range(UPDATES_PER_USER)
                ]
            )
        # A random merge that keeps each user's own order.
        owners = [n for n, queue in enumerate(queues) for _ in queue]
        rng.shuffle(owners)
        cursors = [0] * users
        sequence = []
        for owner in owners:
            sequence.append(queues[owner][cursors[owner]])
            cursors[owner] += 1
        streams.append(
            [
                sequence[start : start + batch_size]
                for start in range(0, len(sequence), batch_size)
            ]
        )
    return streams


@dataclass
class Stream:
    """
    One v2 connection sending its batches, at most ``window`` of them
    unanswered at a time, and reading the replies.
    """

    client: RecordingClient
    batches: list[list[Update]]
    window: int
    sent: int = 0
    """How many of ``batches`` were handed to the connection."""
    replies: list[dict[str, Any]] = field(default_factory=list)

    def read(self) -> None:
        """Decode the replies that arrived since the last call."""
        for payload, _ in self.client.messages[len(self.replies) :]:
            self.replies.append(json.loads(payload))

    def send_more(self) -> None:
        while self.sent < len(self.batches) and (
            self.sent - len(self.replies) < self.window
        ):
            batch = [update.wire() for update in self.batches[self.sent]]
            self.client.sendMessage(json.dumps(batch).encode("utf-8"), isBinary=False)
            self.sent += 1

    def sent_updates(self) -> list[Update]:
        """What this connection sent, in order."""
        return [update for batch in self.batches[: self.sent] for update in batch]

    def acknowledged(self, *, fully: bool = False) -> set[str]:
        """
        The ids the server acknowledged, after checking that each reply
        answers its batch: in order, nothing rejected, and every id either
        acked or to be retried (with ``fully``: every id acked).
        """
        acked: set[str] = set()
        for number, reply in enumerate(self.replies):
            ids = [update.update_id for update in self.batches[number]]
            where = f"reply {number + 1}: {reply}"
            assert reply["seq"] == number + 1, where
            assert reply["rejected"] == [], where
            if fully:
                assert (reply["acked"], reply["retry"]) == (ids, []), where
            else:
                assert sorted(reply["acked"] + reply["retry"]) == sorted(ids), where
            acked.update(reply["acked"])
        return acked


async def open_streams(
    port: int, batches: list[list[list[Update]]], window: int
) -> list[Stream]:
    streams = []
    for own_batches in batches:
        client = await open_ws(reactor, "127.0.0.1", port, protocols=[V2])
        assert client.subprotocol == V2
        streams.append(Stream(client, own_batches, window))
    return streams


async def stream_until(streams: list[Stream], answered_batches: int) -> None:
    """
    Keep every stream's window full until the server has answered
    ``answered_batches`` batches in all (or every batch, if fewer).
    """
    total = min(answered_batches, sum(len(stream.batches) for stream in streams))
    deadline = reactor.seconds() + STREAM_TIMEOUT
    while True:
        for stream in streams:
            stream.read()
            stream.send_more()
        answered = sum(len(stream.replies) for stream in streams)
        if answered >= total:
            return
        assert reactor.seconds() < deadline, (
            f"{answered} of {total} batches answered after {STREAM_TIMEOUT} s"
        )
        await deferLater(reactor, POLL, lambda: None)


def unanswered(streams: Iterable[Stream]) -> int:
    """How many batches were sent and not answered yet."""
    return sum(stream.sent - len(stream.replies) for stream in streams)


async def closed(client: RecordingClient) -> Closed:
    """How the connection ended; fails if it is still open after 5 s."""
    return await client.closed.addTimeout(STOP_TIMEOUT, reactor)


async def read_total(port: int, username: str) -> dict[str, Any] | None:
    """The user's total from ``GET /users/{username}/steps``, or None on 404."""
    path = f"/users/{quote(username, safe='')}/steps"
    answer = await http("GET", "127.0.0.1", port, path, reactor=reactor)
    if answer.status == 404:
        return None
    assert answer.status == 200, (username, answer)
    result: dict[str, Any] = answer.json()
    return result


def times_applied(total: dict[str, Any] | None) -> list[int]:
    """How often each update ``j`` of a user is counted in ``total``."""
    if total is None:
        return [0] * UPDATES_PER_USER
    steps = total["cumulativeSteps"]
    assert isinstance(steps, int) and 0 <= steps < DIGIT**UPDATES_PER_USER, total
    return [steps // DIGIT**j % DIGIT for j in range(UPDATES_PER_USER)]


def expected_totals(streams: Iterable[Stream]) -> dict[str, dict[str, Any]]:
    """The total of each user with a sent update, each update counted once."""
    totals: dict[str, dict[str, Any]] = {}
    for stream in streams:
        for update in stream.sent_updates():
            total = totals.setdefault(
                update.username, {"cumulativeSteps": 0, "ts": update.ts}
            )
            total["cumulativeSteps"] += update.new_steps
            total["ts"] = max(total["ts"], update.ts)
    return totals


@dataclass(frozen=True)
class Recovered:
    """What a restarted daemon holds of the updates that were sent."""

    held: int
    """Sent updates it counts (once each)."""
    lacking: int
    """Sent updates it does not count."""


async def check_recovered(
    port: int, streams: Iterable[Stream], acked: set[str]
) -> Recovered:
    """
    Check every total a daemon shows against what ``streams`` sent: each
    ``acked`` update counted, no update counted twice or without being sent,
    ts the greatest among the counted updates, and what a connection sent
    kept from its start on.
    """
    problems: list[str] = []
    held = lacking = 0
    for stream in streams:
        sent = stream.sent_updates()
        sent_ids = {update.update_id for update in sent}
        by_user: dict[str, list[Update]] = {}
        for batch in stream.batches:
            for update in batch:
                by_user.setdefault(update.username, []).append(update)
        applied: set[str] = set()
        for username, updates in by_user.items():
            total = await read_total(port, username)
            counts = times_applied(total)
            counted = [u for u, count in zip(updates, counts, strict=True) if count]
            applied.update(update.update_id for update in counted)
            for update, count in zip(updates, counts, strict=True):
                if count > 1:
                    problems.append(f"{update.update_id} counted {count} times")
                if count and update.update_id not in sent_ids:
                    problems.append(f"{update.update_id} counted, never sent")
                if not count and update.update_id in acked:
                    problems.append(f"{update.update_id} acked, then lost")
            if total is not None and not counted:
                problems.append(f"{username!r}: {total} with no update counted")
            if total is not None and counted:
                greatest = max(update.ts for update in counted)
                if total["ts"] != greatest:
                    problems.append(f"{username!r}: ts {total['ts']}, not {greatest}")
        # A connection's updates are applied in the order sent, so what
        # survives is the start of what it sent.
        kept = [update.update_id in applied for update in sent]
        if False in kept and True in kept[kept.index(False) :]:
            first_gap = sent[kept.index(False)].update_id
            problems.append(f"{first_gap} lost while later ones of its connection kept")
        held += len(applied)
        lacking += len(sent_ids - applied)
    assert not problems, "\n".join(problems)
    return Recovered(held, lacking)


async def start_on(
    daemons: Daemons, database: Path, workers: str = "auto"
) -> tuple[Daemon, int, int]:
    """A daemon on ``database``: the daemon, its WebSocket and REST ports."""
    daemon, ports = await daemons.start(
        *LOOPBACK,
        "--store",
        f"sqlite:{database}",
        "--max-new-steps",
        str(MAX_NEW_STEPS),
        "--workers",
        workers,
    )
    return daemon, ports.ws, ports.rest


def kill_every_process(daemon: Daemon) -> None:
    """
    SIGKILL to the daemon's workers, if it has any, and to the daemon: the
    whole of it dies at once, as in a power cut, with no worker left to
    shut down cleanly.
    """
    started = re.search(r"\d+ workers \(pids ([\d, ]+)\)", daemon.log)
    for pid in started[1].split(", ") if started else []:
        os.kill(int(pid), signal.SIGKILL)
    daemon.send_signal("KILL")


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(("seed", "workers"), [(1, "auto"), (2, "auto"), (3, "1")])
async def test_sigkill_mid_stream_loses_no_acked_update(
    daemons: Daemons, tmp_path: Path, seed: int, workers: str
) -> None:
    """After SIGKILL mid-stream, acked updates are kept, none twice; resends ack."""
    rng = random.Random(seed)
    batches = make_streams(
        rng, secrets.token_hex(4), connections=4, users=30, batch_size=60
    )
    batch_count = sum(len(own) for own in batches)
    database = tmp_path / "totals.sqlite3"
    daemon, ws_port, _ = await start_on(daemons, database, workers)
    streams = await open_streams(ws_port, batches, window=4)

    await stream_until(streams, rng.randint(batch_count // 5, batch_count // 2))
    kill_every_process(daemon)
    in_flight = unanswered(streams)
    assert in_flight > 0
    assert await daemon.exited(STOP_TIMEOUT) == Exit(None, signal.SIGKILL)
    for stream in streams:
        await closed(stream.client)
        # Replies already on their way when the process died count too.
        stream.read()
    assert_no_traceback(daemon.log)
    acked = set().union(*(stream.acknowledged() for stream in streams))

    daemon, ws_port, rest_port = await start_on(daemons, database)
    recovered = await check_recovered(rest_port, streams, acked)
    print(
        f"seed {seed}: {sum(s.sent for s in streams)} batches sent, "
        f"{in_flight} unanswered at the kill, {len(acked)} updates acked, "
        f"{recovered.held} kept, {recovered.lacking} lost unacked"
    )

    # Devices that do not know what survived send everything again.
    resent = [stream.batches[: stream.sent] for stream in streams]
    again = await open_streams(ws_port, resent, window=batch_count)
    await stream_until(again, batch_count)
    acked = set().union(*(stream.acknowledged(fully=True) for stream in again))
    for username, total in expected_totals(streams).items():
        await wait_for_total(reactor, "127.0.0.1", rest_port, username, total)
    await check_recovered(rest_port, streams, acked)

    assert await daemon.stop() == Exit(0, None), daemon.log
    assert_no_traceback(daemon.log)


@pytest_twisted.ensureDeferred
async def test_sigterm_mid_stream_closes_1001_exits_0_keeps_acked(
    daemons: Daemons, tmp_path: Path
) -> None:
    """SIGTERM mid-stream: close 1001, exit 0 within 5 s, acked updates kept."""
    rng = random.Random(0)
    batches = make_streams(
        rng, secrets.token_hex(4), connections=2, users=10, batch_size=50
    )
    database = tmp_path / "totals.sqlite3"
    daemon, ws_port, _ = await start_on(daemons, database)
    streams = await open_streams(ws_port, batches, window=4)

    await stream_until(streams, 6)
    daemon.send_signal("TERM")
    assert unanswered(streams) > 0
    assert await daemon.exited(STOP_TIMEOUT) == Exit(0, None), daemon.log
    for stream in streams:
        assert (await closed(stream.client)).code == 1001
        stream.read()
    assert "steptrack stopped" in daemon.log
    assert_no_traceback(daemon.log)
    acked = set().union(*(stream.acknowledged() for stream in streams))

    daemon, _, rest_port = await start_on(daemons, database)
    await check_recovered(rest_port, streams, acked)
    assert await daemon.stop() == Exit(0, None), daemon.log
    assert_no_traceback(daemon.log)
