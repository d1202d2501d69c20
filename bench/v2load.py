#!/usr/bin/env python3
"""
v2load: timed ingest over protocol version 2 of steptrack, checked strictly.

Protocol version 2 is the WebSocket subprotocol ``steptrack.v2``: a message
is one update or a JSON array of updates, each with an ``update_id``, and the
server answers every message, in order, with ``{"seq", "acked", "rejected",
"retry"}`` once its store has committed the updates.

What a run does:

1. Untimed: builds every message (a JSON array of ``--batch`` updates) as a
   masked RFC 6455 text frame, and opens ``--connections`` WebSockets with
   its own handshake, asking for ``steptrack.v2`` and refusing to go on if
   the server does not grant it.
2. Timed, from the first byte written: writes every frame with non-blocking
   sockets and a selector, and reads replies as they arrive. The clock stops
   when every message has its reply and every update id is acked.
3. Untimed: reads every user's total and ts over REST, once. Acks come only
   after the store committed, so every total must already be exact.

The workload is stepload's: update ``i`` goes to user ``i % users`` with
``ts = start + i``; user ``u`` is pinned to connection ``u % connections``,
so each user's updates travel in order on one connection and its greatest
ts is well defined.

This file is a load client and nothing else: it never resends (a ``retry``
fails the run), and it only talks to the URLs it is given. Standard library
only (with ``proctree.py`` beside it), so it runs on any Python 3.10+
without the project installed.

Output: progress on stderr, then ``# v2ingest: ...`` and one JSON object as
the last line of stdout. Exit status: 0 every check passed, 1 the server
failed a check, 2 the run could not start.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import http.client
import json
import os
import random
import resource
import selectors
import socket
import sys
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import proctree

SUBPROTOCOL = "steptrack.v2"
WEBSOCKET_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
TEXT, BINARY, CONTINUATION = 0x1, 0x2, 0x0
CLOSE, PING, PONG = 0x8, 0x9, 0xA
CHUNK_BYTES = 64 * 1024
"""Frames are joined into write chunks of about this size."""
RECV_BYTES = 64 * 1024
SERVER_MESSAGE_LIMIT = 64 * 1024
"""steptrack's default --max-message-size; a bigger message is refused."""
CLIENT_BOUND_SHARE = 0.75
"""Client CPU over wall time at or above this: the rate is suspect."""
SAMPLES = 5
"""How many examples of each kind of failure the report keeps."""


def log(message: str) -> None:
    print(f"[v2load] {message}", file=sys.stderr, flush=True)


class SetupError(Exception):
    """The run could not start: bad URL, refused connection, failed handshake."""


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    path: str


def parse_url(url: str, scheme: str) -> Endpoint:
    parts = urlsplit(url)
    if parts.scheme != scheme or not parts.hostname or parts.port is None:
        raise SetupError(f"expected {scheme}://HOST:PORT[/path], got {url!r}")
    return Endpoint(parts.hostname, parts.port, parts.path or "/")


# -- CPU accounting --------------------------------------------------------


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def machine_cpu_seconds() -> tuple[float, float] | None:
    """(busy, stolen) CPU seconds of all cores since boot, from /proc/stat."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            values = [int(v) for v in stat.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = values
    ticks = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / ticks, steal / ticks


@dataclass
class CpuMeter:
    """
    CPU used in the timed window by this client, by the server (given its
    PID: the process and all its descendants, see ``proctree``), by anything
    else on the machine, and stolen by the hypervisor.
    """

    server_pid: int | None
    started: float = 0.0
    _own: float = 0.0
    _server: float | None = None
    _machine: tuple[float, float] | None = None

    def start(self) -> float:
        self._own = own_cpu_seconds()
        self._server = proctree.cpu_seconds(self.server_pid)
        self._machine = machine_cpu_seconds()
        self.started = time.perf_counter()
        return self.started

    def stop(self, ended: float) -> dict[str, Any]:
        wall = ended - self.started
        own = own_cpu_seconds() - self._own
        server_now = proctree.cpu_seconds(self.server_pid)
        server = (
            None
            if server_now is None or self._server is None
            else server_now - self._server
        )
        machine_now = machine_cpu_seconds()
        other = steal = None
        if machine_now is not None and self._machine is not None:
            busy = machine_now[0] - self._machine[0]
            steal = machine_now[1] - self._machine[1]
            if server is not None:
                other = max(0.0, busy - own - server)
        share = own / wall if wall > 0 else 0.0
        return {
            "client_cpu_s": round(own, 3),
            "client_cpu_share": round(share, 3),
            "client_bound": share >= CLIENT_BOUND_SHARE,
            "server_cpu_s": None if server is None else round(server, 3),
            "server_cpu_share": (
                None if server is None or wall <= 0 else round(server / wall, 3)
            ),
            "other_cpu_s": None if other is None else round(other, 3),
            "steal_s": None if steal is None else round(steal, 3),
        }


# -- WebSocket framing -----------------------------------------------------


def masked(payload: bytes, key: bytes) -> bytes:
    """``payload`` XOR-ed with the repeated 4-byte ``key`` (RFC 6455 5.3)."""
    if not payload:
        return b""
    stream = (key * (len(payload) // 4 + 1))[: len(payload)]
    value = int.from_bytes(payload, "little") ^ int.from_bytes(stream, "little")
    return value.to_bytes(len(payload), "little")


def client_frame(payload: bytes, opcode: int, key: bytes | None = None) -> bytes:
    """One final, masked client frame; a fresh random key unless given."""
    key = os.urandom(4) if key is None else key
    size = len(payload)
    if size < 126:
        header = bytes((0x80 | opcode, 0x80 | size))
    elif size < 1 << 16:
        header = bytes((0x80 | opcode, 0x80 | 126)) + size.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 0x80 | 127)) + size.to_bytes(8, "big")
    return header + key + masked(payload, key)


class ServerStream:
    """
    Turns the bytes a server sends into whole messages and control frames,
    joining fragmented messages.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._fragments: list[bytes] = []
        self._fragmented_opcode = 0

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """(opcode, payload) of every message and control frame completed."""
        self._buffer += data
        buffer = self._buffer
        out: list[tuple[int, bytes]] = []
        pos = 0
        while len(buffer) - pos >= 2:
            first, second = buffer[pos], buffer[pos + 1]
            size, head = second & 0x7F, pos + 2
            if size >= 126:
                width = 2 if size == 126 else 8
                if len(buffer) < head + width:
                    break
                size = int.from_bytes(buffer[head : head + width], "big")
                head += width
            key = b""
            if second & 0x80:
                key = bytes(buffer[head : head + 4])
                head += 4
            if len(buffer) < head + size:
                break
            payload = bytes(buffer[head : head + size])
            if key:
                payload = masked(payload, key)
            pos = head + size
            opcode, final = first & 0x0F, bool(first & 0x80)
            if opcode >= 0x8:
                out.append((opcode, payload))
            elif opcode == CONTINUATION:
                self._fragments.append(payload)
                if final:
                    out.append((self._fragmented_opcode, b"".join(self._fragments)))
                    self._fragments = []
            elif final:
                out.append((opcode, payload))
            else:
                self._fragmented_opcode, self._fragments = opcode, [payload]
        del buffer[:pos]
        return out


def open_websocket(endpoint: Endpoint, timeout: float) -> tuple[socket.socket, bytes]:
    """
    Connect and upgrade, asking for ``steptrack.v2``. Returns the socket,
    non-blocking, and whatever the server sent after its 101 response.
    """
    sock = socket.create_connection((endpoint.host, endpoint.port), timeout=timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        key = base64.b64encode(os.urandom(16)).decode("ascii")
        sock.sendall(
            (
                f"GET {endpoint.path} HTTP/1.1\r\n"
                f"Host: {endpoint.host}:{endpoint.port}\r\n"
                "Upgrade: websocket\r\n"
                "Connection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n"
                f"Sec-WebSocket-Protocol: {SUBPROTOCOL}\r\n\r\n"
            ).encode("ascii")
        )
        response = bytearray()
        while (end := response.find(b"\r\n\r\n")) < 0:
            data = sock.recv(4096)
            if not data or len(response) > 64 * 1024:
                raise SetupError("the connection closed during the handshake")
            response += data
        status, *lines = bytes(response[:end]).decode("latin-1").split("\r\n")
        if status.split(" ", 2)[1:2] != ["101"]:
            raise SetupError(f"handshake refused: {status!r}")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        digest = hashlib.sha1((key + WEBSOCKET_GUID).encode("ascii")).digest()
        if headers.get("sec-websocket-accept") != base64.b64encode(digest).decode():
            raise SetupError("handshake: wrong or missing Sec-WebSocket-Accept")
        granted = headers.get("sec-websocket-protocol")
        if granted != SUBPROTOCOL:
            raise SetupError(
                f"the server did not grant {SUBPROTOCOL} (it answered "
                f"Sec-WebSocket-Protocol: {granted!r})"
            )
        sock.setblocking(False)
        return sock, bytes(response[end + 4 :])
    except BaseException:
        sock.close()
        raise


# -- the workload ----------------------------------------------------------


@dataclass
class User:
    """What the server must report for one user once everything is acked."""

    username: str
    steps: int = 0
    ts: int = 0


@dataclass
class Plan:
    """Every frame, pre-built and masked, and what each reply must ack."""

    chunks: list[list[bytes]]
    """Per connection: write chunks, each a run of whole frames."""
    message_ids: list[list[list[str]]]
    """Per connection, per message in order: the update ids it carries."""
    users: list[User]
    updates: int
    messages: int
    largest_message: int
    total_bytes: int


def build_plan(
    updates: int,
    users: int,
    connections: int,
    batch: int,
    seed: int | None,
    prefix: str,
) -> Plan:
    rng = random.Random(seed)
    expected = [User(f"{prefix}-{u}") for u in range(users)]
    streams: list[list[tuple[str, str]]] = [[] for _ in range(connections)]
    start_ts = int(time.time() * 1000)
    for i in range(updates):
        user = expected[i % users]
        steps = rng.randint(1, 1000)
        ts = start_ts + i
        update_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        streams[(i % users) % connections].append(
            (
                update_id,
                f'{{"update_id":"{update_id}","username":"{user.username}",'
                f'"ts":{ts},"newSteps":{steps}}}',
            )
        )
        user.steps += steps
        user.ts = ts
    chunks: list[list[bytes]] = []
    message_ids: list[list[list[str]]] = []
    largest = total = 0
    for stream in streams:
        frames: list[bytes] = []
        ids: list[list[str]] = []
        for first in range(0, len(stream), batch):
            group = stream[first : first + batch]
            payload = ("[" + ",".join(text for _, text in group) + "]").encode()
            largest = max(largest, len(payload))
            frames.append(client_frame(payload, TEXT))
            ids.append([update_id for update_id, _ in group])
        chunks.append(_join_into_chunks(frames))
        message_ids.append(ids)
        total += sum(len(frame) for frame in frames)
    return Plan(
        chunks=chunks,
        message_ids=message_ids,
        users=expected,
        updates=updates,
        messages=sum(len(ids) for ids in message_ids),
        largest_message=largest,
        total_bytes=total,
    )


def _join_into_chunks(frames: list[bytes]) -> list[bytes]:
    chunks: list[bytes] = []
    pending: list[bytes] = []
    size = 0
    for frame in frames:
        pending.append(frame)
        size += len(frame)
        if size >= CHUNK_BYTES:
            chunks.append(b"".join(pending))
            pending, size = [], 0
    if pending:
        chunks.append(b"".join(pending))
    return chunks


# -- acks ------------------------------------------------------------------


@dataclass
class Tally:
    """Every reply, checked against what was sent: each id acked exactly once."""

    unacked: set[str]
    sent: frozenset[str]
    acked: int = 0
    rejected: int = 0
    retry: int = 0
    duplicate_acks: int = 0
    unknown_acks: int = 0
    bad_replies: int = 0
    """Replies that were not JSON objects of the documented shape."""
    out_of_order_replies: int = 0
    """Replies whose seq was not the next one on their connection."""
    mismatched_replies: int = 0
    """Replies whose ids were not exactly those of the message they answer."""
    unexpected_replies: int = 0
    """Replies beyond the number of messages sent."""
    samples: dict[str, list[Any]] = field(default_factory=dict)

    def sample(self, kind: str, what: Any) -> None:
        kept = self.samples.setdefault(kind, [])
        if len(kept) < SAMPLES:
            kept.append(what)

    def check(self, payload: bytes, seq: int, ids: list[str] | None) -> None:
        """Count one reply: the ``seq``-th on its connection, answering ``ids``."""
        if ids is None:
            self.unexpected_replies += 1
            self.sample("unexpected_reply", payload[:200].decode("utf-8", "replace"))
            return
        try:
            reply = json.loads(payload)
            acked = [str(i) for i in reply["acked"]]
            rejected = list(reply["rejected"])
            retry = [str(i) for i in reply["retry"]]
            got_seq = reply["seq"]
        except (ValueError, KeyError, TypeError):
            self.bad_replies += 1
            self.sample("bad_reply", payload[:200].decode("utf-8", "replace"))
            return
        if got_seq != seq:
            self.out_of_order_replies += 1
            self.sample("out_of_order_reply", {"expected": seq, "got": got_seq})
        for update_id in acked:
            if update_id in self.unacked:
                self.unacked.discard(update_id)
                self.acked += 1
            elif update_id in self.sent:
                self.duplicate_acks += 1
                self.sample("duplicate_ack", update_id)
            else:
                self.unknown_acks += 1
                self.sample("unknown_ack", update_id)
        self.rejected += len(rejected)
        for rejection in rejected:
            self.sample("rejected", rejection)
        self.retry += len(retry)
        for update_id in retry:
            self.sample("retry", update_id)
        answered: list[Any] = acked + retry
        answered += [r.get("update_id") for r in rejected if isinstance(r, dict)]
        if len(answered) != len(ids) or set(answered) != set(ids):
            self.mismatched_replies += 1
            self.sample("mismatched_reply", {"seq": seq, "sent": len(ids)})

    def report(self) -> dict[str, Any]:
        return {
            "acked": self.acked,
            "rejected": self.rejected,
            "retry": self.retry,
            "unacked": len(self.unacked),
            "duplicate_acks": self.duplicate_acks,
            "unknown_acks": self.unknown_acks,
            "bad_replies": self.bad_replies,
            "out_of_order_replies": self.out_of_order_replies,
            "mismatched_replies": self.mismatched_replies,
            "unexpected_replies": self.unexpected_replies,
            "failure_samples": self.samples,
        }


# -- the timed phase -------------------------------------------------------


@dataclass
class Connection:
    """One WebSocket: its chunks to write, and the replies it still awaits."""

    sock: socket.socket
    chunks: deque[bytes]
    awaiting: deque[list[str]]
    stream: ServerStream = field(default_factory=ServerStream)
    pongs: deque[bytes] = field(default_factory=deque)
    writing: memoryview = field(default_factory=lambda: memoryview(b""))
    writing_chunk: bool = False
    early: bytes = b""
    """What the server sent right after its handshake response."""
    replies: int = 0
    pings: int = 0
    closed_reason: str | None = None

    def wants_to_write(self) -> bool:
        return bool(self.writing) or bool(self.pongs) or bool(self.chunks)

    def finished(self) -> bool:
        return self.closed_reason is not None or not self.awaiting

    def unsent_bytes(self) -> int:
        current = len(self.writing) if self.writing_chunk else 0
        return current + sum(len(chunk) for chunk in self.chunks)


class Pump:
    """
    Writes every connection's chunks and reads replies, in one thread with
    one selector, until each message has its reply, a connection closes,
    the deadline passes, or the server stalls: everything is sent and no
    reply has come for ``stall`` seconds.
    """

    def __init__(self, connections: list[Connection], tally: Tally) -> None:
        self.connections = connections
        self.tally = tally
        self.all_sent_at: float | None = None
        self.last_reply_at: float | None = None
        self.stalled = False
        self._selector = selectors.DefaultSelector()

    def run(self, deadline: float, stall: float) -> None:
        for conn in self.connections:
            self._watch(conn, register=True)
            if conn.early:
                self._consume(conn, conn.early)
        try:
            while not all(conn.finished() for conn in self.connections):
                now = time.perf_counter()
                if now >= deadline:
                    return
                if self.all_sent_at is not None:
                    quiet_since = max(self.all_sent_at, self.last_reply_at or 0.0)
                    if now - quiet_since >= stall:
                        self.stalled = True
                        return
                events = self._selector.select(timeout=min(0.05, deadline - now))
                for key, mask in events:
                    ready: Connection = key.data
                    if mask & selectors.EVENT_READ:
                        self._read(ready)
                    if mask & selectors.EVENT_WRITE and ready.closed_reason is None:
                        self._write(ready)
        finally:
            self._selector.close()

    def _watch(self, conn: Connection, register: bool = False) -> None:
        events = selectors.EVENT_READ
        if conn.wants_to_write():
            events |= selectors.EVENT_WRITE
        if register:
            self._selector.register(conn.sock, events, conn)
        else:
            self._selector.modify(conn.sock, events, conn)

    def _write(self, conn: Connection) -> None:
        while True:
            if not conn.writing:
                # Pongs go between chunks, which always end on a frame.
                if conn.pongs:
                    conn.writing, conn.writing_chunk = (
                        memoryview(conn.pongs.popleft()),
                        False,
                    )
                elif conn.chunks:
                    conn.writing = memoryview(conn.chunks.popleft())
                    conn.writing_chunk = True
                else:
                    self._watch(conn)
                    self._note_if_all_sent()
                    return
            try:
                sent = conn.sock.send(conn.writing)
            except BlockingIOError:
                return
            except OSError as error:
                self._closed(conn, f"write error: {error}")
                return
            conn.writing = conn.writing[sent:]

    def _read(self, conn: Connection) -> None:
        try:
            data = conn.sock.recv(RECV_BYTES)
        except BlockingIOError:
            return
        except OSError as error:
            self._closed(conn, f"read error: {error}")
            return
        if not data:
            self._closed(conn, "the server closed the TCP connection")
            return
        self._consume(conn, data)

    def _consume(self, conn: Connection, data: bytes) -> None:
        for opcode, payload in conn.stream.feed(data):
            if opcode in (TEXT, BINARY):
                conn.replies += 1
                ids = conn.awaiting.popleft() if conn.awaiting else None
                self.tally.check(payload, conn.replies, ids)
                self.last_reply_at = time.perf_counter()
            elif opcode == PING:
                conn.pings += 1
                conn.pongs.append(client_frame(payload, PONG))
                self._watch(conn)
            elif opcode == CLOSE:
                code = int.from_bytes(payload[:2], "big") if len(payload) > 1 else None
                reason = payload[2:].decode("utf-8", "replace")
                self._closed(conn, f"the server sent close {code} {reason!r}")
                return

    def _closed(self, conn: Connection, reason: str) -> None:
        conn.closed_reason = reason
        self._selector.unregister(conn.sock)
        self._note_if_all_sent()

    def _note_if_all_sent(self) -> None:
        if self.all_sent_at is None and all(
            conn.closed_reason is not None or not conn.wants_to_write()
            for conn in self.connections
        ):
            self.all_sent_at = time.perf_counter()

    def close_all(self) -> None:
        for conn in self.connections:
            if conn.closed_reason is None and not conn.writing:
                with contextlib.suppress(OSError):
                    conn.sock.send(client_frame((1000).to_bytes(2, "big"), CLOSE))
            conn.sock.close()


# -- checking totals over REST ---------------------------------------------


VISIBLE_WITHIN = 0.05
"""Seconds the contract gives an applied update to show through REST."""


def read_total(
    client: http.client.HTTPConnection, username: str
) -> tuple[int, Any, Any]:
    """(status, cumulativeSteps, ts); status 0 when there was no answer."""
    try:
        client.request("GET", f"/users/{quote(username, safe='')}/steps")
        response = client.getresponse()
        body = response.read()
    except (OSError, http.client.HTTPException):
        client.close()
        return 0, None, None
    if response.status != 200:
        return response.status, None, None
    try:
        total = json.loads(body)
        return 200, total.get("cumulativeSteps"), total.get("ts")
    except (ValueError, AttributeError):
        return -1, None, None


def check_totals(endpoint: Endpoint, users: list[User]) -> dict[str, Any]:
    """
    One read per user. The contract lets an acknowledged update take up to
    50 ms to show through REST (through another worker's, say), so a user
    that is not exact is read again 50 ms later; one still not exact is
    read once more a second later, only to tell "shown late" from "wrong":
    either fails the run.
    """
    client = http.client.HTTPConnection(endpoint.host, endpoint.port, timeout=10)
    wrong: list[tuple[User, tuple[int, Any, Any]]] = []
    try:
        for user in users:
            seen = read_total(client, user.username)
            if seen != (200, user.steps, user.ts):
                wrong.append((user, seen))
        if wrong:
            time.sleep(VISIBLE_WITHIN)
            wrong = [
                (user, seen)
                for user, seen in wrong
                if read_total(client, user.username) != (200, user.steps, user.ts)
            ]
        if wrong:
            time.sleep(1.0)
        late = 0
        lost: int | float = 0
        excess: int | float = 0
        missing = ts_wrong = 0
        samples: list[dict[str, Any]] = []
        for user, first in wrong:
            seen = read_total(client, user.username)
            if seen == (200, user.steps, user.ts):
                late += 1
                continue
            status, steps, ts = seen
            if len(samples) < SAMPLES:
                samples.append(
                    {
                        "username": user.username,
                        "expected": [user.steps, user.ts],
                        "first_read": list(first),
                        "second_read": list(seen),
                    }
                )
            if status != 200 or not isinstance(steps, (int, float)):
                missing += 1
                lost += user.steps
                continue
            lost += max(0, user.steps - steps)
            excess += max(0, steps - user.steps)
            if ts != user.ts:
                ts_wrong += 1
    finally:
        client.close()
    return {
        "mismatched_users": len(wrong),
        "late_users": late,
        "missing_users": missing,
        "ts_mismatched_users": ts_wrong,
        "lost_steps": lost,
        "excess_steps": excess,
        "user_samples": samples,
    }


# -- one run ---------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    ws = parse_url(args.ws, "ws")
    rest = parse_url(args.http, "http")
    if args.users < args.connections:
        log(f"{args.users} users < {args.connections} connections: some stay idle")
    began = time.perf_counter()
    plan = build_plan(
        args.updates, args.users, args.connections, args.batch, args.seed, args.prefix
    )
    log(
        f"built {plan.messages} messages of up to {args.batch} updates "
        f"({plan.total_bytes / 1e6:.1f} MB) in {time.perf_counter() - began:.2f}s"
    )
    if plan.largest_message > SERVER_MESSAGE_LIMIT:
        log(
            f"warning: a message is {plan.largest_message} bytes, more than "
            f"steptrack's default limit of {SERVER_MESSAGE_LIMIT}"
        )
    connections: list[Connection] = []
    try:
        for chunks, ids in zip(plan.chunks, plan.message_ids, strict=True):
            sock, early = open_websocket(ws, args.timeout)
            connections.append(Connection(sock, deque(chunks), deque(ids), early=early))
    except (OSError, SetupError):
        for conn in connections:
            conn.sock.close()
        raise
    log(f"opened {len(connections)} connections; sending")

    all_ids = [i for per_conn in plan.message_ids for ids in per_conn for i in ids]
    tally = Tally(unacked=set(all_ids), sent=frozenset(all_ids))
    if len(tally.sent) != plan.updates:
        raise SetupError("two updates got the same id; use another --seed")
    pump = Pump(connections, tally)
    meter = CpuMeter(args.pid)
    started = meter.start()
    pump.run(deadline=started + args.timeout, stall=args.stall)
    ended = pump.last_reply_at or time.perf_counter()
    cpu = meter.stop(ended)
    replied = all(not conn.awaiting for conn in connections)
    closed = [conn for conn in connections if conn.closed_reason is not None]
    pings = sum(conn.pings for conn in connections)
    unsent = sum(conn.unsent_bytes() for conn in connections)
    pump.close_all()
    log(f"timed phase over after {ended - started:.3f}s; checking every user")

    acks = tally.report()
    totals = check_totals(rest, plan.users)
    elapsed = ended - started
    ok = (
        replied
        and not closed
        and tally.acked == plan.updates
        and all(
            acks[name] == 0
            for name in (
                "rejected",
                "retry",
                "duplicate_acks",
                "unknown_acks",
                "bad_replies",
                "out_of_order_replies",
                "mismatched_replies",
                "unexpected_replies",
            )
        )
        and totals["mismatched_users"] == 0
    )
    return {
        "mode": "v2ingest",
        "ok": ok,
        "updates": plan.updates,
        "batch": args.batch,
        "messages": plan.messages,
        "connections": args.connections,
        "users": args.users,
        "elapsed_s": round(elapsed, 4),
        "updates_per_s": round(plan.updates / elapsed) if ok else None,
        "messages_per_s": round(plan.messages / elapsed) if ok else None,
        "send_s": (
            None if pump.all_sent_at is None else round(pump.all_sent_at - started, 4)
        ),
        "missing_replies": sum(len(conn.awaiting) for conn in connections),
        **acks,
        **totals,
        "closed_by_server": len(closed),
        "close_reasons": sorted({conn.closed_reason or "" for conn in closed})[:5],
        "unsent_bytes": unsent,
        "server_pings": pings,
        **cpu,
        "bytes_sent": plan.total_bytes - unsent,
        "stalled": pump.stalled,
        "timed_out": not replied and not closed and not pump.stalled,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ws", required=True, help="ws://HOST:PORT[/path]")
    parser.add_argument("--http", required=True, help="http://HOST:PORT")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--updates", type=int, default=200_000)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument(
        "--batch", type=int, default=100, help="updates per message (default 100)"
    )
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="bound on the timed phase, s"
    )
    parser.add_argument(
        "--stall",
        type=float,
        default=10.0,
        help="give up when all is sent and no reply came for this long, s",
    )
    parser.add_argument(
        "--pid",
        type=int,
        help="server PID: report the CPU of it and its descendants",
    )
    parser.add_argument("--seed", type=int, help="seed for newSteps and update ids")
    parser.add_argument(
        "--prefix",
        default="v2" + os.urandom(4).hex(),
        help="username prefix (default: random, so runs never collide)",
    )
    return parser


def summary_line(result: dict[str, Any]) -> str:
    keys = [
        "ok",
        "updates_per_s",
        "elapsed_s",
        "acked",
        "rejected",
        "retry",
        "mismatched_users",
        "closed_by_server",
        "client_cpu_share",
        "server_cpu_share",
    ]
    shown = ", ".join(f"{key}={result[key]}" for key in keys if key in result)
    return f"# {result['mode']}: {shown}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        for name in ("connections", "updates", "users", "batch"):
            if getattr(args, name) < 1:
                raise SetupError(f"--{name} must be at least 1")
        if args.timeout <= 0 or args.stall <= 0:
            raise SetupError("--timeout and --stall must be positive")
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        result = run(args)
    except (SetupError, OSError) as error:
        print(
            json.dumps(
                {
                    "mode": "v2ingest",
                    "ok": False,
                    "error": f"{type(error).__name__}: {error}",
                }
            ),
            flush=True,
        )
        return 2
    result["cpu_count"] = os.cpu_count()
    if result["client_bound"]:
        result["note"] = "client CPU near wall time: the client may be the bottleneck"
    print(summary_line(result), flush=True)
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
