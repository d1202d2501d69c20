#!/usr/bin/env python3
"""
``make bench``: steptrack measured side by side with the two reference
servers, reported as medians and ratios.

One run starts three servers on free ports of 127.0.0.1: node-ref and
fastapi-ref from the shared folder, with their dependencies installed as
their READMEs say, and steptrack with its default settings (only the
listening addresses are given: its default durable store is created in a
fresh temporary folder that is its working directory). Extra steptrack
configurations can be measured beside it (``--steptrack-args``); the
targets are judged on the default one only. Then, round after round, every
load runs against every server it applies to:

- ``ingest-c16``: the shared ``stepload.py ingest``, one update per frame
  (protocol version 1), 16 connections, 1000 users, 1,000,000 updates;
- ``ingest-c1``: the same on 1 connection and 100 users;
- ``v2-c16-b100``: ``bench/v2load.py``, protocol version 2 batches of 100
  updates, 16 connections, 1000 users (steptrack only);
- ``query-c16``: ``stepload.py query``, GETs on 16 keep-alive connections;
- ``mixed-c4-q4``: ``stepload.py mixed``, an ingest of 1,000,000 updates on
  4 connections while GETs run on 4 more: GET latency under write load;
- ``idle``: ``stepload.py idle``, 10,000 WebSocket connections held, on a
  server started for it alone (its RSS before is the baseline) and stopped
  right after, once per server per round.

A server may be several processes (steptrack's parent runs one worker per
core). Its CPU and RSS are taken over its whole process tree: the loads run
``stepload.py`` through ``stepload_tree.py``, which sums both over the
started PID and its descendants (``proctree.py``) at the moments stepload
reads them, and ``v2load.py`` does the same. Processes of a server that end
during a load, or that outlive their server's stop, are reported.

Every run's JSON goes to ``raw.jsonl`` in a new dated folder of
``bench/results/`` as it finishes; the tables go to ``report.md`` there and
to stdout. Earlier folders are left as they are.

This script only measures: it never changes the servers it starts, and a
failed check is reported, not retried. The reference servers' dependencies
are installed into ``bench/.cache/`` (copies of their sources; the shared
folder is read-only), and reinstalled when their sources change. Standard
library only.

Exit status: 0 every run passed its checks; 1 a run failed a check or a
server could not be set up (the report says which); 2 the benchmark itself
could not start.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import proctree

REPOSITORY = Path(__file__).resolve().parent.parent
BENCH = REPOSITORY / "bench"
CACHE = BENCH / ".cache"
CLIENT_TIMEOUT_S = 300
"""--timeout given to the load clients: the bound on one timed phase."""
CLIENT_WALL_LIMIT_S = 600
"""A client process still running after this long is killed."""
START_LIMIT_S = 30.0
STOP_LIMIT_S = 10.0
DATED = re.compile(r"\d{4}-\d{2}-\d{2}")
MISSING = "-"
"""A table cell with no number."""


def say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


class BenchError(Exception):
    """The benchmark cannot run at all (no shared folder, no steptrack)."""


class Unavailable(Exception):
    """One server cannot be set up; the others are still measured."""


# -- the reference servers, installed in the cache -------------------------


def source_digest(folder: Path) -> str:
    """A digest of every file an anchor ships, to notice when one changes."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder)
        if relative.parts[0] in ("node_modules", ".venv"):
            continue
        digest.update(str(relative).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def install_anchor(
    name: str, source: Path, install: Callable[[Path, TextIO], None], log: TextIO
) -> Path:
    """
    A copy of the anchor ``source`` under the cache with its dependencies
    installed by ``install``. Reused while the sources are unchanged.
    """
    if not source.is_dir():
        raise Unavailable(f"{source} does not exist")
    target = CACHE / "anchors" / name
    stamp = target / ".bench-installed"
    digest = source_digest(source)
    if stamp.is_file() and stamp.read_text() == digest:
        return target
    say(f"installing {name} into {target}")
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(
        source,
        target,
        ignore=shutil.ignore_patterns("node_modules", ".venv"),
        copy_function=shutil.copyfile,
    )
    # The shared folder is read-only and copytree copies directory modes.
    for folder in [target, *(p for p in target.rglob("*") if p.is_dir())]:
        folder.chmod(0o755)
    install(target, log)
    stamp.write_text(digest)
    return target


def run_logged(command: list[str], cwd: Path, log: TextIO, limit: float) -> None:
    log.write(f"$ {' '.join(command)}\n")
    log.flush()
    try:
        done = subprocess.run(
            command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, timeout=limit
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise Unavailable(f"{command[0]}: {error}") from None
    if done.returncode != 0:
        raise Unavailable(f"{' '.join(command)} exited {done.returncode}")


def install_node_ref(target: Path, log: TextIO) -> None:
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        raise Unavailable("node or npm is not on PATH")
    run_logged([npm, "ci", "--no-audit", "--no-fund"], target, log, 600)


def install_fastapi_ref(target: Path, log: TextIO) -> None:
    python = shutil.which("python3") or sys.executable
    run_logged([python, "-m", "venv", ".venv"], target, log, 120)
    pip = str(target / ".venv" / "bin" / "pip")
    run_logged([pip, "install", "--quiet", "-r", "requirements.txt"], target, log, 600)


# -- servers ---------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def accepts(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


SETTLE_S = 1.0
"""A started server counts as settled once its processes and RSS have held
still this long."""
SETTLE_LIMIT_S = 15.0


@dataclass
class Server:
    """One server under test: how to start it, and the process once started."""

    name: str
    cwd: Path
    command: Callable[[str, str], list[str]]
    """The command line, given the WebSocket port and the REST port."""
    logs: Path
    scratch: Path | None = None
    """When set, each start runs in a new empty folder under it: steptrack's
    default store is a file in its working directory."""
    process: subprocess.Popen[bytes] | None = None
    ws_port: int = 0
    http_port: int = 0
    starts: int = 0
    exit_codes: list[int | None] = field(default_factory=list)
    left_behind: list[str] = field(default_factory=list)
    """Processes of its tree still running after the server had stopped."""
    most_processes: int = 0
    seen: set[proctree.Process] = field(default_factory=set)
    """Every process of its tree seen since the last start: a descendant
    whose parent died is no longer in the tree, but must still be stopped."""

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def is_steptrack(self) -> bool:
        return self.name.startswith("steptrack")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def processes(self) -> list[proctree.Process]:
        """This server's process tree now; empty when it is not running."""
        if not self.alive():
            return []
        members = proctree.tree(self.pid)
        self.most_processes = max(self.most_processes, len(members))
        self.seen.update(members)
        return members

    def start(self) -> None:
        self.starts += 1
        self.seen.clear()
        self.ws_port, self.http_port = free_port(), free_port()
        slug = re.sub(r"[^A-Za-z0-9.]+", "-", self.name).strip("-")
        log_path = self.logs / f"{slug}-{self.starts}.log"
        cwd = self.cwd
        if self.scratch is not None:
            cwd = self.scratch / str(self.starts)
            cwd.mkdir(parents=True)
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.command(str(self.ws_port), str(self.http_port)),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + START_LIMIT_S
        while time.monotonic() < deadline:
            if not self.alive():
                raise Unavailable(
                    f"{self.name} exited at start ({self.process.returncode}); "
                    f"see {log_path}"
                )
            if accepts(self.ws_port) and accepts(self.http_port):
                self.settle()
                say(
                    f"{self.name}: pid {self.pid}, {len(self.processes())} "
                    f"process(es), ws {self.ws_port}, http {self.http_port}"
                )
                return
            time.sleep(0.1)
        self.stop()
        raise Unavailable(f"{self.name} did not listen within {START_LIMIT_S}s")

    def settle(self) -> None:
        """
        Waits until the server's processes and their RSS hold still: a
        parent may listen before its workers have started, and a baseline
        RSS taken then would charge their start-up to the first load.
        """
        deadline = time.monotonic() + SETTLE_LIMIT_S
        before = (self.processes(), proctree.rss_kb(self.pid) or 0)
        while time.monotonic() < deadline:
            time.sleep(SETTLE_S)
            now = (self.processes(), proctree.rss_kb(self.pid) or 0)
            if now[0] == before[0] and abs(now[1] - before[1]) <= before[1] / 50:
                return
            before = now
        say(f"{self.name}: its processes or RSS still changed after {SETTLE_LIMIT_S}s")

    def stop(self) -> None:
        """
        SIGTERM to this server's PID, SIGKILL if it is still there later;
        then the same, by PID, for any process of its tree that outlived it.
        """
        if self.process is None:
            return
        self.processes()
        process, self.process = self.process, None
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(STOP_LIMIT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(STOP_LIMIT_S)
        self.exit_codes.append(process.returncode)
        descendants = sorted(
            (p for p in self.seen if p.pid != process.pid), key=lambda p: p.pid
        )
        deadline = time.monotonic() + STOP_LIMIT_S
        while time.monotonic() < deadline and any(
            map(proctree.is_running, descendants)
        ):
            time.sleep(0.1)
        for member in descendants:
            if proctree.is_running(member):
                self.left_behind.append(f"pid {member.pid}")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(member.pid, signal.SIGKILL)
        self.seen.clear()


# -- loads -----------------------------------------------------------------


def flags(**values: object) -> list[str]:
    """``--name value`` pairs; an underscore in a name becomes a dash."""
    return [
        text
        for name, value in values.items()
        for text in (f"--{name.replace('_', '-')}", str(value))
    ]


RATE_UNITS = ("updates/s", "requests/s")


@dataclass(frozen=True)
class Load:
    key: str
    title: str
    metric: str
    """The field of the client's JSON that is the result."""
    unit: str
    client: list[str]
    """The client's command line up to its options."""
    options: list[str]
    steptrack_only: bool = False
    fresh_server: bool = False
    """Run after the rounds, as many times per server as there are rounds,
    each time on a process started for it alone and stopped right after."""
    rest: bool = True
    """The client also reads over REST and takes ``--http`` and ``--timeout``
    (``stepload.py idle`` takes neither: its phases have their own bounds)."""

    @property
    def is_rate(self) -> bool:
        return self.unit in RATE_UNITS

    def command(self, server: Server) -> list[str]:
        """The client's command line against ``server``, which is running."""
        endpoints: dict[str, object] = {
            "ws": f"ws://127.0.0.1:{server.ws_port}",
            "pid": server.pid,
        }
        if self.rest:
            endpoints["http"] = f"http://127.0.0.1:{server.http_port}"
            endpoints["timeout"] = CLIENT_TIMEOUT_S
        return [*self.client, *flags(**endpoints), *self.options]

    def passed(self, result: dict[str, Any]) -> bool:
        """
        Whether a run counts: the client's own checks, and for ``mixed``
        also the GETs made during the ingest, which ``stepload.py`` reports
        but leaves out of its ``ok``: a GET answered with an error, or none
        answered at all, must not make the latency look good.
        """
        if not result.get("ok"):
            return False
        if self.key != MIXED:
            return True
        queries = result.get("query_during_ingest") or {}
        return (
            queries.get("non_200") == 0
            and queries.get("connection_errors") == 0
            and bool(queries.get("requests"))
        )


MIXED = "mixed-c4-q4"
IDLE = "idle"


def loads(shared_bench: Path, settings: argparse.Namespace) -> list[Load]:
    # stepload.py through the wrapper that sums the server's figures over
    # its process tree; v2load.py does that itself.
    stepload = [
        sys.executable,
        str(BENCH / "stepload_tree.py"),
        str(shared_bench / "stepload.py"),
    ]
    v2load = [sys.executable, str(BENCH / "v2load.py")]
    updates = settings.updates
    return [
        Load(
            "ingest-c16",
            f"ingest v1, C=16, U=1000, {updates:,} updates",
            "updates_per_s",
            "updates/s",
            [*stepload, "ingest"],
            flags(connections=16, users=1000, updates=updates),
        ),
        Load(
            "ingest-c1",
            f"ingest v1, C=1, U=100, {updates:,} updates",
            "updates_per_s",
            "updates/s",
            [*stepload, "ingest"],
            flags(connections=1, users=100, updates=updates),
        ),
        Load(
            "v2-c16-b100",
            f"ingest v2 batches of 100, C=16, U=1000, {updates:,} updates",
            "updates_per_s",
            "updates/s",
            v2load,
            flags(connections=16, users=1000, batch=100, updates=updates),
            steptrack_only=True,
        ),
        Load(
            "query-c16",
            f"query, C=16, 100 users, {settings.requests:,} GETs",
            "requests_per_s",
            "requests/s",
            [*stepload, "query"],
            flags(connections=16, users=100, prefix="q", requests=settings.requests),
        ),
        Load(
            MIXED,
            f"mixed: ingest v1, C=4, U=1000, {settings.mixed_updates:,} updates, "
            "with GETs on 4 more",
            "updates_per_s",
            "updates/s",
            [*stepload, "mixed"],
            flags(
                connections=4,
                updates=settings.mixed_updates,
                users=1000,
                query_connections=4,
                query_users=100,
            ),
        ),
        Load(
            IDLE,
            f"idle, {settings.idle_connections:,} connections held "
            f"{settings.idle_hold:g} s, fresh server",
            "kb_per_connection",
            "KB/connection",
            [*stepload, "idle"],
            flags(connections=settings.idle_connections, hold=settings.idle_hold),
            fresh_server=True,
            rest=False,
        ),
    ]


def rounds_text(rounds: int) -> str:
    return "1 round" if rounds == 1 else f"{rounds} rounds"


def runs_text(runs: int) -> str:
    return "1 run" if runs == 1 else f"{runs} runs"


def run_client(command: list[str]) -> tuple[int | None, dict[str, Any], float]:
    """(exit status, the last JSON line of stdout, wall seconds)."""
    began = time.monotonic()
    try:
        done = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=CLIENT_WALL_LIMIT_S,
        )
    except subprocess.TimeoutExpired:
        return None, {"ok": False, "error": "the client was killed"}, 0.0
    wall = time.monotonic() - began
    lines = done.stdout.decode("utf-8", "replace").strip().splitlines()
    try:
        result = json.loads(lines[-1])
        if not isinstance(result, dict):
            raise ValueError("not an object")
    except (IndexError, ValueError):
        tail = done.stderr.decode("utf-8", "replace").strip()[-500:]
        result = {"ok": False, "error": f"no JSON result; stderr ended: {tail!r}"}
    return done.returncode, result, wall


# -- what was measured on ---------------------------------------------------


def command_output(command: list[str], cwd: Path = REPOSITORY) -> str | None:
    try:
        done = subprocess.run(
            command, cwd=cwd, capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def filesystem_of(path: Path) -> str:
    """The type of the file system ``path`` is on (ext4, tmpfs, ...)."""
    best, kind = "", "?"
    with contextlib.suppress(OSError), open("/proc/mounts", encoding="utf-8") as mounts:
        for line in mounts:
            _device, point, fstype, *_ = line.split()
            inside = str(path).startswith(point.rstrip("/") + "/")
            if (inside or str(path) == point) and len(point) > len(best):
                best, kind = point, fstype
    return kind


def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as info:
        for line in info:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def package_versions(names: list[str]) -> dict[str, str]:
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def anchor_versions(folders: dict[str, Path]) -> dict[str, str]:
    versions: dict[str, str] = {}
    node = folders.get("node-ref")
    if node is not None:
        versions["node"] = command_output(["node", "--version"]) or "?"
        versions["npm"] = command_output(["npm", "--version"]) or "?"
        for package in ("ws", "express"):
            manifest = node / "node_modules" / package / "package.json"
            with contextlib.suppress(OSError, ValueError):
                versions[package] = json.loads(manifest.read_text())["version"]
    fastapi = folders.get("fastapi-ref")
    if fastapi is not None:
        script = (
            "import importlib.metadata as m, json, platform; print(json.dumps("
            "{'fastapi-ref python': platform.python_version(), **{n: m.version(n)"
            " for n in ('fastapi', 'uvicorn', 'starlette', 'pydantic',"
            " 'websockets', 'uvloop', 'httptools')}}))"
        )
        found = command_output([str(fastapi / ".venv/bin/python"), "-c", script])
        with contextlib.suppress(TypeError, ValueError):
            versions.update(json.loads(found or ""))
    return versions


# -- the report --------------------------------------------------------------


@dataclass
class Record:
    round: int
    server: str
    load: str
    ok: bool
    """The run counts: see ``Load.passed``."""
    exit_code: int | None
    wall_s: float
    result: dict[str, Any]
    server_processes: int = 0
    """Processes in the server's tree when the load started."""


def number_at(result: dict[str, Any], path: str) -> float | None:
    """The number at ``path`` in a client's JSON; a dot steps into an object."""
    value: Any = result
    for name in path.split("."):
        value = value.get(name) if isinstance(value, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value


def median_of(
    records: list[Record], path: str, passed_only: bool = True
) -> float | None:
    found = (number_at(r.result, path) for r in records if r.ok or not passed_only)
    values = [value for value in found if value is not None]
    return statistics.median(values) if values else None


def thousands(value: float | None) -> str:
    return MISSING if value is None else f"{value:,.0f}"


def figure(value: float | None) -> str:
    """Large numbers with separators, small ones (ms, KB) with 3 digits."""
    if value is None:
        return MISSING
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def ratio_text(numerator: float | None, denominator: float | None) -> str:
    if numerator is None or not denominator:
        return MISSING
    return f"{numerator / denominator:.2f}"


CLOSE = 0.2
"""Within this fraction of a goal, a verdict is within run-to-run noise."""


def verdict(value: float | None, goal: float, at_most: bool) -> str:
    if value is None:
        return "unknown"
    met = value <= goal if at_most else value >= goal
    text = "yes" if met else "**no**"
    return text + (" (close)" if abs(value / goal - 1) < CLOSE else "")


DEFAULT = "steptrack"
"""The name of steptrack with its default settings: the one judged."""


@dataclass(frozen=True)
class Target:
    """One goal, most of them set against a reference server of the same run."""

    title: str
    load: str
    path: str
    """Where the measure is in the client's JSON (see ``number_at``)."""
    goal: float
    at_most: bool = False
    """The goal is a ceiling (latency, memory), not a floor (a rate)."""
    reference: str | None = "node-ref"
    """The server whose median the value is divided by; None: the goal is
    in the measure's own unit."""
    reference_load: str | None = None
    """The reference's load, when it is not ``load`` (v2 is steptrack's only)."""
    unit: str = ""

    def amount(self, value: float | None) -> str:
        return MISSING if value is None else f"{figure(value)} {self.unit}"

    def goal_text(self) -> str:
        sign = "≤" if self.at_most else "≥"
        if self.reference is None:
            return f"{sign} {self.goal:g} {self.unit}"
        return f"{sign} {self.goal:g}x {self.reference}"


TARGETS = [
    Target(
        "ingest v1, single-update frames, 16 connections, 1000 users (`ingest-c16`)",
        "ingest-c16",
        "updates_per_s",
        0.5,
    ),
    Target(
        "ingest v1, single-update frames, 16 connections, 1000 users (`ingest-c16`)",
        "ingest-c16",
        "updates_per_s",
        2.0,
        reference="fastapi-ref",
    ),
    Target(
        "ingest v1, 1 connection, 100 users (`ingest-c1`)",
        "ingest-c1",
        "updates_per_s",
        0.3,
    ),
    Target(
        "ingest v2, batches of 100 (`v2-c16-b100`) vs node-ref's `ingest-c16`",
        "v2-c16-b100",
        "updates_per_s",
        1.0,
        reference_load="ingest-c16",
    ),
    Target(
        "GET, 16 keep-alive connections (`query-c16`): requests/s",
        "query-c16",
        "requests_per_s",
        1.0,
    ),
    Target(
        "GET, 16 keep-alive connections (`query-c16`): p99",
        "query-c16",
        "p99_ms",
        1.0,
        at_most=True,
    ),
    Target(
        f"GET p99 while an ingest runs (`{MIXED}`)",
        MIXED,
        "query_during_ingest.p99_ms",
        20.0,
        at_most=True,
        reference=None,
        unit="ms",
    ),
    Target(
        "idle connections (`idle`): RSS per connection",
        IDLE,
        "kb_per_connection",
        1.0,
        at_most=True,
    ),
]


@dataclass(frozen=True)
class Comparison:
    """A row of the ratio table: one measure of steptrack over a reference's."""

    title: str
    load: str
    path: str
    reference_load: str
    lower_is_better: bool = False


@dataclass
class Report:
    servers: list[str]
    loads: list[Load]
    records: list[Record]
    unavailable: dict[str, str]
    events: list[str]
    """What went wrong outside the loads: servers that died, for one."""
    runs: int

    def of(self, server: str, load: str) -> list[Record]:
        return [r for r in self.records if r.server == server and r.load == load]

    def median(self, server: str, load: str, path: str | None = None) -> float | None:
        """The median of ``path`` (the load's metric if None) over passing runs."""
        metric = path or next(x.metric for x in self.loads if x.key == load)
        return median_of(self.of(server, load), metric)

    @property
    def steptracks(self) -> list[str]:
        """The default configuration first, then the extra ones."""
        return [s for s in self.servers if s.startswith(DEFAULT)]

    @property
    def rate_loads(self) -> list[Load]:
        return [load for load in self.loads if load.is_rate]

    def cell(self, server: str, load: Load) -> str:
        if load.steptrack_only and not server.startswith(DEFAULT):
            return "n/a"
        if server in self.unavailable:
            return "unavailable"
        records = self.of(server, load.key)
        passed = sum(1 for r in records if r.ok)
        text = thousands(median_of(records, load.metric))
        if passed < len(records) or not records:
            text += f" ({passed}/{len(records)} ok)"
        return text

    def medians_table(self) -> list[str]:
        lines = [
            "| load | unit | " + " | ".join(self.servers) + " |",
            "|---|---|" + "---:|" * len(self.servers),
        ]
        for load in self.rate_loads:
            cells = " | ".join(self.cell(server, load) for server in self.servers)
            lines.append(f"| {load.title} | {load.unit} | {cells} |")
        return lines

    def latency_table(self) -> list[str]:
        rows = [
            ("query-c16", "requests/s", "requests_per_s"),
            ("query-c16", "p50 ms", "p50_ms"),
            ("query-c16", "p99 ms", "p99_ms"),
            (MIXED, "GETs answered during the ingest", "query_during_ingest.requests"),
            (MIXED, "GET requests/s", "query_during_ingest.requests_per_s"),
            (MIXED, "GET p50 ms", "query_during_ingest.p50_ms"),
            (MIXED, "GET p99 ms", "query_during_ingest.p99_ms"),
            (MIXED, "GET max ms", "query_during_ingest.max_ms"),
            (MIXED, "ingest updates/s", "updates_per_s"),
        ]
        lines = [
            "| load | measure | " + " | ".join(self.servers) + " |",
            "|---|---|" + "---:|" * len(self.servers),
        ]
        for load, measure, path in rows:
            cells = " | ".join(
                figure(self.median(server, load, path)) for server in self.servers
            )
            lines.append(f"| {load} | {measure} | {cells} |")
        return lines

    def idle_table(self) -> list[str]:
        """
        Medians over every idle run, passing or not: how many connections
        were refused or dropped is the point when one fails.
        """
        rows = [
            ("connections asked for", "requested"),
            ("opened", "succeeded"),
            ("alive after the hold", "alive_after_hold"),
            ("seconds to open them", "open_s"),
            ("server RSS before, KB", "rss_before_kb"),
            ("server RSS once connected, KB", "rss_connected_kb"),
            ("server RSS at the end of the hold, KB", "rss_after_kb"),
            ("KB per connection", "kb_per_connection"),
        ]
        lines = [
            "| measure | " + " | ".join(self.servers) + " |",
            "|---|" + "---:|" * len(self.servers),
        ]
        for measure, path in rows:
            cells = " | ".join(
                figure(median_of(self.of(server, IDLE), path, passed_only=False))
                for server in self.servers
            )
            lines.append(f"| {measure} | {cells} |")
        spans = []
        for server in self.servers:
            found = [
                number_at(r.result, "kb_per_connection") for r in self.of(server, IDLE)
            ]
            values = [value for value in found if value is not None]
            spans.append(
                f"{figure(min(values))} to {figure(max(values))}" if values else MISSING
            )
        lines.append("| KB per connection, min to max | " + " | ".join(spans) + " |")
        passed = []
        for server in self.servers:
            records = self.of(server, IDLE)
            ok = sum(1 for r in records if r.ok)
            passed.append(f"{ok}/{len(records)}" if records else MISSING)
        lines.append("| runs that passed | " + " | ".join(passed) + " |")
        return lines

    def comparisons(self) -> list[Comparison]:
        rows = []
        for load in self.rate_loads:
            # v2 has no counterpart on the anchors: it is compared with
            # their v1 ingest of the same shape (16 connections, 1000 users).
            theirs = "ingest-c16" if load.steptrack_only else load.key
            title = load.title + (" vs their v1 C=16" if load.steptrack_only else "")
            rows.append(Comparison(title, load.key, load.metric, theirs))
        rows += [
            Comparison("GET p99, query-c16", "query-c16", "p99_ms", "query-c16", True),
            Comparison(
                f"GET p99 during the ingest, {MIXED}",
                MIXED,
                "query_during_ingest.p99_ms",
                MIXED,
                True,
            ),
            Comparison(
                "RSS per idle connection", IDLE, "kb_per_connection", IDLE, True
            ),
        ]
        return rows

    def ratios_table(self) -> list[str]:
        header = ["load", "better"]
        for mine in self.steptracks:
            header += [f"{mine} ÷ node-ref", f"{mine} ÷ fastapi-ref"]
        lines = [
            "| " + " | ".join(header) + " |",
            "|---|---|" + "---:|" * (len(header) - 2),
        ]
        for row in self.comparisons():
            cells = []
            for mine in self.steptracks:
                for anchor in ("node-ref", "fastapi-ref"):
                    cells.append(
                        ratio_text(
                            self.median(mine, row.load, row.path),
                            self.median(anchor, row.reference_load, row.path),
                        )
                    )
            better = "lower" if row.lower_is_better else "higher"
            lines.append(f"| {row.title} | {better} | " + " | ".join(cells) + " |")
        return lines

    def targets_table(self) -> list[str]:
        """
        Each goal judged on steptrack's default configuration; any extra
        configuration is shown beside it for reference, never judged.
        """
        extra = self.steptracks[1:]
        header = "| measure | goal | reference, median | steptrack | met |"
        rule = "|---|---|---:|---:|---|"
        for name in extra:
            header += f" {name} (for reference) |"
            rule += "---:|"
        lines = [header, rule]
        for target in TARGETS:
            if target.reference is None:
                # An absolute goal: node-ref's figure is there for scale.
                reference = self.median("node-ref", target.load, target.path)
                cells = [f"node-ref: {target.amount(reference)}"]
            else:
                reference_load = target.reference_load or target.load
                reference = self.median(target.reference, reference_load, target.path)
                cells = [f"{target.reference}: {figure(reference)}"]
            for index, server in enumerate(self.steptracks):
                measured = self.median(server, target.load, target.path)
                value: float | None
                if target.reference is None:
                    value = measured
                    cells.append(target.amount(measured))
                elif measured is not None and reference:
                    value = measured / reference
                    cells.append(f"{value:.2f} ({figure(measured)})")
                else:
                    value = None
                    cells.append(MISSING)
                if index == 0:
                    cells.append(verdict(value, target.goal, target.at_most))
            lines.append(
                f"| {target.title} | {target.goal_text()} | " + " | ".join(cells) + " |"
            )
        held = [self.held("node-ref")[0], *self.held(DEFAULT)]
        held += [self.held(name)[0] for name in extra]
        lines.append(
            "| idle connections (`idle`): every connection held, every run | all | "
            + " | ".join(held)
            + " |"
        )
        return lines

    def held(self, server: str) -> list[str]:
        """(alive after the hold / asked for, met) over every idle run."""
        records = self.of(server, IDLE)
        if not records:
            return [MISSING, "unknown"]
        alive = [number_at(r.result, "alive_after_hold") or 0 for r in records]
        asked = [number_at(r.result, "requested") or 0 for r in records]
        held = all(a == n and n > 0 for a, n in zip(alive, asked, strict=True))
        return [f"{min(alive):,.0f} / {max(asked):,.0f}", "yes" if held else "**no**"]

    def noise_table(self) -> list[str]:
        lines = [
            "| load | server | processes | ok | min | max | client CPU share, max "
            "| server CPU share, median | other CPU s, max |",
            "|---|---|---:|---|---:|---:|---:|---:|---:|",
        ]
        for load in self.rate_loads:
            for server in self.servers:
                records = self.of(server, load.key)
                if not records:
                    continue
                values = [r.result[load.metric] for r in records if r.ok]

                def numbers(name: str, records: list[Record] = records) -> list[float]:
                    found = (r.result.get(name) for r in records)
                    return [v for v in found if isinstance(v, (int, float))]

                client = numbers("client_cpu_share")
                server_share = numbers("server_cpu_share")
                other = numbers("other_cpu_s")
                passed = len(values)
                processes = max(r.server_processes for r in records)
                # The median of an even count is a mean: round it as the
                # client rounds its shares.
                server_median = (
                    round(statistics.median(server_share), 3) if server_share else None
                )
                lines.append(
                    f"| {load.key} | {server} | {processes} "
                    f"| {passed}/{len(records)} "
                    f"| {thousands(min(values) if values else None)} "
                    f"| {thousands(max(values) if values else None)} "
                    f"| {max(client) if client else MISSING} "
                    f"| {MISSING if server_median is None else server_median} "
                    f"| {max(other) if other else MISSING} |"
                )
        return lines

    def failures(self) -> list[str]:
        lines = []
        for r in self.records:
            if r.ok:
                continue
            interesting = {
                k: v
                for k, v in r.result.items()
                if k in FAILURE_FIELDS and v not in (0, None, [], {}, False)
            }
            queries = r.result.get("query_during_ingest")
            if isinstance(queries, dict):
                interesting["query_during_ingest"] = {
                    k: queries.get(k) for k in QUERY_FAILURE_FIELDS
                }
            lines.append(
                f"- round {r.round}, {r.server}, {r.load}: exit {r.exit_code}, "
                f"`{json.dumps(interesting)}`"
            )
        for server, why in self.unavailable.items():
            lines.append(f"- {server} unavailable: {why}")
        lines += [f"- {event}" for event in self.events]
        return lines


FAILURE_FIELDS = {
    "error",
    "failed",
    "error_samples",
    "requested",
    "succeeded",
    "alive_after_hold",
    "timed_out",
    "stalled",
    "mismatched_users",
    "missing_users",
    "ts_mismatched_users",
    "late_users",
    "lost_steps",
    "excess_steps",
    "closed_by_server",
    "close_reasons",
    "rejected",
    "retry",
    "unacked",
    "duplicate_acks",
    "unknown_acks",
    "bad_replies",
    "out_of_order_replies",
    "mismatched_replies",
    "missing_replies",
    "non_200",
    "connection_errors",
    "failure_samples",
}


QUERY_FAILURE_FIELDS = ("requests", "non_200", "connection_errors", "error_samples")
"""What a failed ``mixed`` run's GETs show: the failure may be theirs."""


# -- the run ---------------------------------------------------------------


def raise_open_files_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard one; the servers inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def running(servers: list[Server]) -> Iterator[None]:
    try:
        yield
    finally:
        for server in servers:
            server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )

    def size(name: str, kind: type, text: str) -> None:
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            type=kind,
            help=f"{text} (default {STANDARD[name]:,}; --quick: {QUICK[name]:,})",
        )

    size("runs", int, "rounds; every median is over this many runs")
    size("updates", int, "updates per ingest-c16, ingest-c1 and v2-c16-b100 run")
    size("requests", int, "GETs per query-c16 run")
    size("mixed_updates", int, "updates per mixed-c4-q4 run")
    size("idle_connections", int, "connections each idle run holds")
    size("idle_hold", float, "seconds each idle run holds them")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run of every load at small sizes, one round, with its "
        "report under bench/.cache/quick-results unless --results is given: "
        "it checks that the benchmark works, it measures nothing",
    )
    parser.add_argument(
        "--steptrack-args",
        action="append",
        default=[],
        metavar="ARGS",
        help="also measure steptrack started with these extra arguments (one "
        "string, split as a shell would), e.g. --steptrack-args='--workers 1' "
        "or --steptrack-args='--store memory:'; repeatable. Shown beside the "
        "default configuration, which alone is judged against the targets",
    )
    parser.add_argument(
        "--shared",
        type=Path,
        default=Path(os.environ.get("STEPTRACK_SHARED", REPOSITORY.parent / "shared")),
        help="the shared folder (default: $STEPTRACK_SHARED, else ../shared)",
    )
    parser.add_argument(
        "--results",
        type=Path,
        help="where the dated folder goes (default bench/results)",
    )
    settings = parser.parse_args(argv)
    sizes = QUICK if settings.quick else STANDARD
    for name, value in sizes.items():
        if getattr(settings, name) is None:
            setattr(settings, name, value)
    if settings.results is None:
        settings.results = CACHE / "quick-results" if settings.quick else RESULTS
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:
        return measure(settings)
    except BenchError as error:
        say(f"cannot run: {error}")
        return 2


RESULTS = BENCH / "results"
STANDARD: dict[str, float] = {
    "runs": 3,
    "updates": 1_000_000,
    "requests": 100_000,
    "mixed_updates": 1_000_000,
    "idle_connections": 10_000,
    "idle_hold": 10.0,
}
"""The sizes of a measurement: the loads as the performance goals name them."""
QUICK: dict[str, float] = {
    "runs": 1,
    "updates": 20_000,
    "requests": 5_000,
    "mixed_updates": 50_000,
    "idle_connections": 500,
    "idle_hold": 1.0,
}
"""The sizes of ``--quick``: enough to exercise every path, in about 2 minutes."""


def measure(settings: argparse.Namespace) -> int:
    began = time.monotonic()
    shared = settings.shared.resolve()
    stepload = shared / "bench" / "stepload.py"
    twistd = Path(sys.executable).parent / "twistd"
    if not stepload.is_file():
        raise BenchError(f"{stepload} not found; set STEPTRACK_SHARED")
    if not twistd.is_file():
        raise BenchError(f"{twistd} not found; run this with the project's .venv")
    for name in ["runs", "updates", "requests", "mixed_updates", "idle_connections"]:
        if getattr(settings, name) < 1:
            raise BenchError(f"--{name.replace('_', '-')} must be at least 1")
    if settings.idle_hold < 0:
        raise BenchError("--idle-hold must not be negative")
    extra: list[list[str]] = []
    for text in settings.steptrack_args:
        try:
            extra.append(shlex.split(text))
        except ValueError as error:
            raise BenchError(f"--steptrack-args {text!r}: {error}") from None
    out = new_results_folder(settings.results)
    CACHE.mkdir(parents=True, exist_ok=True)
    # Keeps the cache out of git, and so out of ruff, even before the
    # repository's .gitignore names it.
    (CACHE / ".gitignore").write_text("*\n")
    logs = CACHE / "logs"
    if logs.exists():
        shutil.rmtree(logs)
    logs.mkdir()
    nofile = raise_open_files_limit()
    anchors, unavailable = install_anchors(shared / "anchors", logs)

    scratch = Path(tempfile.mkdtemp(prefix="steptrack-bench-"))
    try:
        servers = servers_to_measure(anchors, twistd, scratch / "rounds", logs, extra)
        # The same servers again, each to be started alone on a process that
        # has done nothing yet, steptrack in a new empty folder each time.
        (logs / "fresh").mkdir()
        fresh = servers_to_measure(
            anchors, twistd, scratch / "fresh", logs / "fresh", extra
        )
        bench = Rounds(servers, loads(shared / "bench", settings), unavailable)
        with (out / "raw.jsonl").open("w") as raw:
            with running(servers):
                bench.run(settings.runs, raw)
            with running(fresh):
                bench.run_on_fresh_servers(fresh, settings.runs, raw)
        database_mb = sum(
            p.stat().st_size
            for p in (scratch / "rounds" / DEFAULT).rglob("*.sqlite3*")
            if p.is_file()
        ) / (1024 * 1024)
        fs_type = filesystem_of(scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    elapsed = time.monotonic() - began

    exits = {
        server.name: server.exit_codes + again.exit_codes
        for server, again in zip(servers, fresh, strict=True)
        if server.is_steptrack
    }
    left_behind = {
        server.name: server.left_behind + again.left_behind
        for server, again in zip(servers, fresh, strict=True)
        if server.left_behind or again.left_behind
    }
    report = Report(
        [server.name for server in servers],
        bench.loads,
        bench.records,
        unavailable,
        bench.events,
        settings.runs,
    )
    environment = describe(
        anchors, settings, servers, fresh, nofile, fs_type, database_mb, elapsed
    )
    text = render(report, environment, exits, left_behind)
    (out / "report.md").write_text(text)
    print(text, flush=True)
    say(f"wrote {out / 'report.md'} and raw.jsonl in {elapsed:.0f}s")
    all_ok = all(r.ok for r in bench.records)
    clean_exits = all(code == 0 for codes in exits.values() for code in codes)
    clean = all_ok and clean_exits and not left_behind
    return 0 if clean and not unavailable and not bench.events else 1


def new_results_folder(results: Path) -> Path:
    """
    ``results/DATE``, or ``DATE-2``, ``DATE-3``... when that exists: a run
    never overwrites or removes the raw results of an earlier one.
    """
    today = datetime.date.today().isoformat()
    for number in range(1, 1000):
        out = results / (today if number == 1 else f"{today}-{number}")
        try:
            out.mkdir(parents=True)
        except FileExistsError:
            continue
        return out
    raise BenchError(f"{results} already has 999 folders of {today}")


def install_anchors(
    anchors: Path, logs: Path
) -> tuple[dict[str, Path], dict[str, str]]:
    """(where each reference server is ready to run, why others are not)."""
    ready: dict[str, Path] = {}
    unavailable: dict[str, str] = {}
    with (logs / "install.log").open("w") as log:
        for name, install in (
            ("node-ref", install_node_ref),
            ("fastapi-ref", install_fastapi_ref),
        ):
            try:
                ready[name] = install_anchor(name, anchors / name, install, log)
            except (Unavailable, OSError) as error:
                unavailable[name] = str(error)
                say(f"{name} unavailable: {error}")
    return ready, unavailable


def servers_to_measure(
    anchors: dict[str, Path],
    twistd: Path,
    scratch: Path,
    logs: Path,
    extra: list[list[str]],
) -> list[Server]:
    """
    node-ref, fastapi-ref, steptrack with its default settings, and
    steptrack with each list of ``extra`` arguments. Each steptrack runs in
    new folders under ``scratch``, where its default store is created.
    """

    def steptrack(arguments: list[str]) -> Callable[[str, str], list[str]]:
        # Only the listening addresses are given: the default ports may be
        # taken, and the benchmark stays on the loopback interface.
        return lambda ws, rest: [
            str(twistd),
            "--nodaemon",
            "--pidfile=",
            "steptrack",
            *flags(
                ws_listen=f"tcp:{ws}:interface=127.0.0.1",
                rest_listen=f"tcp:{rest}:interface=127.0.0.1",
            ),
            *arguments,
        ]

    def anchor(*program: str) -> Callable[[str, str], list[str]]:
        return lambda ws, rest: [
            *program,
            *flags(ws_port=ws, http_port=rest, host="127.0.0.1"),
        ]

    # An anchor that could not be installed is never started; its folder
    # is only a placeholder.
    node = anchors.get("node-ref", scratch)
    fastapi = anchors.get("fastapi-ref", scratch)
    servers = [
        Server("node-ref", node, anchor("node", "server.js"), logs),
        Server(
            "fastapi-ref",
            fastapi,
            anchor(str(fastapi / ".venv/bin/python"), "server.py"),
            logs,
        ),
    ]
    for arguments in [[], *extra]:
        name = " ".join([DEFAULT, *arguments])
        servers.append(
            Server(
                name,
                REPOSITORY,
                steptrack(arguments),
                logs,
                scratch=scratch / re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-"),
            )
        )
    return servers


@dataclass
class Rounds:
    """Every load against every server it applies to, round after round."""

    servers: list[Server]
    loads: list[Load]
    unavailable: dict[str, str]
    records: list[Record] = field(default_factory=list)
    events: list[str] = field(default_factory=list)

    def run(self, runs: int, raw: TextIO) -> None:
        for server in self.servers:
            if server.name not in self.unavailable:
                self._start(server)
        for round_number in range(1, runs + 1):
            for load in self.loads:
                if load.fresh_server:
                    continue
                for server in turned(self.servers, round_number):
                    if server.name in self.unavailable or (
                        load.steptrack_only and not server.is_steptrack
                    ):
                        continue
                    self._measure(server, load, round_number, raw)
                    if not server.alive():
                        self._event(
                            f"{server.name} died during round {round_number} "
                            f"of {load.key}; restarted",
                            raw,
                        )
                        server.stop()
                        self._start(server)

    def run_on_fresh_servers(self, fresh: list[Server], runs: int, raw: TextIO) -> None:
        """
        Each ``fresh_server`` load ``runs`` times per server, each time on a
        process of its own that is stopped right after: one server running
        at a time.
        """
        for round_number in range(1, runs + 1):
            for load in self.loads:
                if not load.fresh_server:
                    continue
                for server in turned(fresh, round_number):
                    if server.name in self.unavailable:
                        continue
                    try:
                        server.start()
                    except Unavailable as error:
                        result = {"ok": False, "error": f"no fresh server: {error}"}
                        record = Record(
                            round_number, server.name, load.key, False, None, 0, result
                        )
                        self._record(record, raw)
                        continue
                    try:
                        self._measure(server, load, round_number, raw)
                        if not server.alive():
                            self._event(
                                f"{server.name} died during {load.key} "
                                f"of round {round_number}",
                                raw,
                            )
                    finally:
                        server.stop()

    def _measure(
        self, server: Server, load: Load, round_number: int, raw: TextIO
    ) -> None:
        before = server.processes()
        record = measure_once(server, load, round_number)
        record.server_processes = len(before)
        self._record(record, raw)
        ended = [p.pid for p in before[1:] if not proctree.is_running(p)]
        if ended and server.alive():
            # A supervisor that replaces a worker would hide the crash: the
            # run may still pass, but it did not measure a steady server.
            self._event(
                f"{len(ended)} process(es) of {server.name} ended during round "
                f"{round_number} of {load.key} (pids {ended})",
                raw,
            )

    def _record(self, record: Record, raw: TextIO) -> None:
        self.records.append(record)
        raw.write(json.dumps(record.__dict__) + "\n")
        raw.flush()

    def _event(self, event: str, raw: TextIO) -> None:
        self.events.append(event)
        raw.write(json.dumps({"event": event}) + "\n")
        raw.flush()
        say(f"!! {event}")

    def _start(self, server: Server) -> None:
        try:
            server.start()
        except Unavailable as error:
            self.unavailable[server.name] = str(error)
            say(f"{server.name} unavailable: {error}")


def turned(servers: list[Server], round_number: int) -> list[Server]:
    """The servers turned by one each round, so no server always goes first."""
    shift = (round_number - 1) % len(servers)
    return servers[shift:] + servers[:shift]


def measure_once(server: Server, load: Load, round_number: int) -> Record:
    exit_code, result, wall = run_client(load.command(server))
    ok = load.passed(result)
    client_cpu = result.get("client_cpu_share")
    say(
        f"round {round_number} {load.key:<12} {server.name:<17} "
        f"{'ok' if ok else 'FAILED':<6} {figure(number_at(result, load.metric)):>9} "
        f"{load.unit}" + ("" if client_cpu is None else f"  client CPU {client_cpu}")
    )
    return Record(
        round_number, server.name, load.key, ok, exit_code, round(wall, 2), result
    )


def shown(command: list[str]) -> str:
    """A command line for the report, with paths relative to the repository."""
    return shlex.join(command).replace(f"{REPOSITORY}/", "")


def describe(
    anchors: dict[str, Path],
    settings: argparse.Namespace,
    servers: list[Server],
    fresh: list[Server],
    nofile: int,
    fs_type: str,
    database_mb: float,
    elapsed: float,
) -> list[str]:
    commit = command_output(["git", "rev-parse", "HEAD"]) or "?"
    changed = command_output(["git", "diff", "--name-only", "HEAD"])
    changed_files = ", ".join(f"`{name}`" for name in (changed or "").splitlines())
    memory_kb = 0
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as info:
        memory_kb = int(info.readline().split()[1])
    steptrack = package_versions(
        ["steptrack", "twisted", "autobahn", "klein", "msgspec"]
    )
    others = anchor_versions(anchors)
    lines = [
        f"- date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; "
        f"whole run {elapsed / 60:.1f} min",
        f"- git commit: `{commit}`"
        + (f"; uncommitted changes measured too: {changed_files}" if changed else ""),
        f"- machine: {os.cpu_count()} cores, {len(os.sched_getaffinity(0))} "
        f"usable by this run ({cpu_model()}), "
        f"{memory_kb / 1024 / 1024:.0f} GiB, Linux {platform.release()}; "
        f"open files limit {nofile}",
        f"- Python {platform.python_version()} (steptrack and the load clients); "
        + ", ".join(f"{k} {v}" for k, v in steptrack.items())
        + f"; SQLite {sqlite3.sqlite_version}",
        "- reference servers: "
        + (", ".join(f"{k} {v}" for k, v in others.items()) or "none"),
        f"- sizes: {rounds_text(settings.runs)}; {settings.updates:,} updates "
        f"per ingest-c16, ingest-c1 and v2-c16-b100 run; {settings.requests:,} "
        f"GETs per query run; {settings.mixed_updates:,} updates per mixed run; "
        f"idle: {settings.idle_connections:,} connections held "
        f"{settings.idle_hold:g} s, {runs_text(settings.runs)} per server, "
        "each on a fresh process",
        f"- steptrack's store: its default, `steptrack.sqlite3` in its working "
        f"directory, a new empty temporary folder ({fs_type}); "
        f"{database_mb:.0f} MB with its WAL at the end of the rounds",
        "",
        "| server | command | processes, most seen |",
        "|---|---|---:|",
    ]
    for server, again in zip(servers, fresh, strict=True):
        command = shown(server.command("WS_PORT", "HTTP_PORT"))
        processes = max(server.most_processes, again.most_processes)
        lines.append(f"| {server.name} | `{command}` | {processes or MISSING} |")
    if settings.quick:
        lines += [
            "",
            "**A `--quick` smoke run: the sizes are far below the goals' loads; "
            "these figures measure nothing.**",
        ]
    elif settings.runs < 3:
        lines += [
            "",
            f"**Medians of {rounds_text(settings.runs)} only: run with "
            "`--runs 3` or more before drawing a conclusion.**",
        ]
    return lines


def render(
    report: Report,
    environment: list[str],
    exits: dict[str, list[int | None]],
    left_behind: dict[str, list[str]],
) -> str:
    lines = [
        "# steptrack benchmark",
        "",
        *environment,
        "",
        "A server's CPU and RSS are those of its whole process tree: the",
        "process started and every descendant, read from /proc and summed",
        "(`bench/proctree.py`). CPU is taken over each load's timed window,",
        "RSS at the moments `stepload.py idle` reads it: before the",
        "connections open, once they are open, and at the end of the hold.",
        "RSS counts pages shared between processes once per process.",
        "",
        "## Targets (steptrack with its default settings)",
        "",
        "A ratio is steptrack's median ÷ the reference's median from this run;",
        f"`close` means within {CLOSE:.0%} of the goal, inside this machine's",
        "run-to-run noise: check the min and max below before trusting it.",
        "",
        *report.targets_table(),
        "",
        f"## Medians over {rounds_text(report.runs)} "
        "(of the runs that passed every check)",
        "",
        *report.medians_table(),
        "",
        "## Ratios of medians",
        "",
        *report.ratios_table(),
        "",
        "## GET latency (medians of the passing runs)",
        "",
        *report.latency_table(),
        "",
        "## Idle connections (each run on a fresh process; medians of every run)",
        "",
        *report.idle_table(),
        "",
        "## Spread and CPU (check that the client stayed well below 1)",
        "",
        "`processes`: how many the server's tree had when a load started;",
        "its CPU share can reach that many cores.",
        "",
        *report.noise_table(),
        "",
        "## Failed checks",
        "",
        *(report.failures() or ["none"]),
        "",
        "steptrack exit statuses after SIGTERM: "
        + ", ".join(f"{name} {codes}" for name, codes in exits.items()),
        "",
        "processes that outlived their server's stop (then killed): "
        + (
            "; ".join(
                f"{name}: {', '.join(pids)}" for name, pids in left_behind.items()
            )
            or "none"
        ),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
