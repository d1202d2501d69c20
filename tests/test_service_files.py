"""
The service files in ``etc/``: the SysV init script, run for real against
the installed ``twistd`` with its settings in a temporary directory, and the
systemd unit and the defaults file, read as their programs read them.

Not for the daemon's own behaviour: the other tests cover that.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from steptrackd.tap import Options

ETC = Path(__file__).resolve().parent.parent / "etc"
INIT_SCRIPT = ETC / "init.d" / "steptrack"
UNIT = ETC / "systemd" / "steptrack.service"
DEFAULTS = ETC / "default" / "steptrack"
TWISTD = Path(sys.executable).parent / "twistd"
INSTALLED_TWISTD = "/opt/steptrack/venv/bin/twistd"

LOOPBACK_OPTS = (
    "--ws-listen tcp:0:interface=127.0.0.1 --rest-listen tcp:0:interface=127.0.0.1"
)
REST_LISTENING = re.compile(r"REST totals: listening on 127\.0\.0\.1:(\d+)$", re.M)

# LSB exit codes of the init script.
OK = 0
DEAD_WITH_PIDFILE = 1
NOT_RUNNING = 3


def poll(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Wait until ``check()`` is true; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"still waiting after {timeout} s for {what}")
        time.sleep(0.05)


def is_alive(pid: int) -> bool:
    """
    Whether process ``pid`` is alive. A zombie is not: the daemon's parent
    is init, which may take its time to collect the exit status.
    """
    if not Path("/proc/self").exists():
        # No /proc: only the kernel's word that the PID exists.
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    state = re.search(r"^State:\s*(\S)", status, re.M)
    return state is not None and state.group(1) not in "ZXx"


def is_our_daemon(pid: int, pidfile: Path) -> bool:
    """Whether ``pid`` is the twistd started with ``pidfile``, and alive."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return is_alive(pid) and f"--pidfile={pidfile}".encode() in argv


def daemons_using(pidfile: Path) -> list[int]:
    """Every live process that was started with ``pidfile``."""
    return [
        int(entry.name)
        for entry in Path("/proc").iterdir()
        if entry.name.isdigit() and is_our_daemon(int(entry.name), pidfile)
    ]


def reaped_pid() -> int:
    """The PID of a process that has exited and been reaped."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


@dataclass
class InitScript:
    """The init script, with its defaults file and its paths in one directory."""

    directory: Path
    options: str = LOOPBACK_OPTS
    stop_timeout: int = 10
    seen_pids: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.defaults = self.directory / "defaults"
        self.pidfile = self.directory / "run" / "steptrack.pid"
        self.logfile = self.directory / "log" / "steptrack.log"
        self.rundir = self.directory / "lib"
        self.write_defaults()

    def write_defaults(self) -> None:
        settings = {
            "TWISTD": TWISTD,
            "PIDFILE": self.pidfile,
            "LOGFILE": self.logfile,
            "RUNDIR": self.rundir,
            # Run as whoever runs the tests, never switch user.
            "STEPTRACK_USER": "",
            "STOP_TIMEOUT": self.stop_timeout,
            "STEPTRACK_OPTS": self.options,
        }
        self.defaults.write_text(
            "".join(f"{name}={shlex.quote(str(v))}\n" for name, v in settings.items())
        )

    def run(self, action: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["sh", str(INIT_SCRIPT), action],
            env={**os.environ, "STEPTRACK_DEFAULTS": str(self.defaults)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        pid = self.pid()
        if pid is not None:
            self.seen_pids.add(pid)
        return result

    def pid(self) -> int | None:
        """The PID in the pidfile, if there is one."""
        try:
            return int(self.pidfile.read_text())
        except (FileNotFoundError, ValueError):
            return None

    def start(self) -> int:
        """Start the daemon and return its PID."""
        result = self.run("start")
        assert result.returncode == OK, result
        pid = self.pid()
        assert pid is not None and is_our_daemon(pid, self.pidfile), result
        return pid

    def rest_port(self) -> int:
        """The port the daemon's REST listener is bound to, from its log."""
        found: list[int] = []

        def logged() -> bool:
            if self.logfile.exists():
                found.extend(map(int, REST_LISTENING.findall(self.logfile.read_text())))
            return bool(found)

        poll(logged, f"the REST address in {self.logfile}")
        return found[-1]

    def stop_leftovers(self) -> None:
        """
        Stop any daemon a failed test left behind, by the PIDs it had,
        never by name.
        """
        pids = set(self.seen_pids)
        pid = self.pid()
        if pid is not None:
            pids.add(pid)
        for pid in pids:
            if is_our_daemon(pid, self.pidfile):
                self._end(pid)

    def _end(self, pid: int) -> None:
        os.kill(pid, signal.SIGTERM)
        # In case a test stopped it.
        os.kill(pid, signal.SIGCONT)
        deadline = time.monotonic() + 10
        while is_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if is_our_daemon(pid, self.pidfile):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def init_script(tmp_path: Path) -> Iterator[InitScript]:
    script = InitScript(tmp_path)
    try:
        yield script
    finally:
        script.stop_leftovers()


def get_totals(port: int, username: str) -> tuple[int, str, object]:
    """GET a user's totals: the status, the content type and the JSON body."""
    # No proxy: the environment's one would not reach our loopback daemon.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    url = f"http://127.0.0.1:{port}/users/{username}/steps"
    try:
        with opener.open(url, timeout=10) as response:
            return (
                response.status,
                response.headers["Content-Type"],
                json.load(response),
            )
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.headers["Content-Type"], json.load(error)


def test_start_runs_a_serving_daemon(init_script: InitScript) -> None:
    """After start exits 0, the daemon answers REST requests with JSON."""
    init_script.start()
    status, content_type, body = get_totals(init_script.rest_port(), "nobody")
    assert status == 404
    assert content_type.startswith("application/json")
    assert isinstance(body, dict) and "error" in body


def test_status_reports_a_running_daemon(init_script: InitScript) -> None:
    """status exits 0 and names the PID while the daemon runs."""
    pid = init_script.start()
    result = init_script.run("status")
    assert result.returncode == OK, result
    assert str(pid) in result.stdout


def test_start_again_keeps_the_running_daemon(init_script: InitScript) -> None:
    """A second start exits 0 and starts no second process."""
    pid = init_script.start()
    init_script.rest_port()  # serving
    result = init_script.run("start")
    assert result.returncode == OK, result
    assert init_script.pid() == pid
    assert daemons_using(init_script.pidfile) == [pid]
    assert len(REST_LISTENING.findall(init_script.logfile.read_text())) == 1


def test_stop_ends_the_daemon(init_script: InitScript) -> None:
    """stop exits 0 with the process gone and its pidfile removed."""
    pid = init_script.start()
    result = init_script.run("stop")
    assert result.returncode == OK, result
    assert not is_alive(pid)
    assert not init_script.pidfile.exists()
    assert init_script.run("status").returncode == NOT_RUNNING


def test_stop_kills_a_daemon_that_does_not_exit(tmp_path: Path) -> None:
    """stop sends SIGKILL when the daemon outlives STOP_TIMEOUT after SIGTERM."""
    script = InitScript(tmp_path, stop_timeout=1)
    try:
        pid = script.start()
        # A stopped process cannot act on SIGTERM; SIGKILL ends it anyway.
        os.kill(pid, signal.SIGSTOP)
        result = script.run("stop")
        assert result.returncode == OK, result
        assert "killing" in result.stderr
        assert not is_alive(pid)
        assert not script.pidfile.exists()
    finally:
        script.stop_leftovers()


def test_restart_replaces_the_daemon(init_script: InitScript) -> None:
    """restart and force-reload each leave a new, serving daemon."""
    pids = [init_script.start()]
    for action in ("restart", "force-reload"):
        result = init_script.run(action)
        assert result.returncode == OK, result
        pid = init_script.pid()
        assert pid is not None and pid not in pids
        assert daemons_using(init_script.pidfile) == [pid]
        pids.append(pid)
    assert get_totals(init_script.rest_port(), "nobody")[0] == 404


def test_not_running(init_script: InitScript) -> None:
    """Without a daemon, status exits 3 and stop exits 0."""
    result = init_script.run("status")
    assert result.returncode == NOT_RUNNING, result
    result = init_script.run("stop")
    assert result.returncode == OK, result


def test_stale_pidfile(init_script: InitScript) -> None:
    """A pidfile naming a dead PID: status exits 1, start replaces it."""
    init_script.pidfile.parent.mkdir(parents=True)
    dead = reaped_pid()
    init_script.pidfile.write_text(f"{dead}\n")
    result = init_script.run("status")
    assert result.returncode == DEAD_WITH_PIDFILE, result
    pid = init_script.start()
    assert pid != dead
    assert get_totals(init_script.rest_port(), "nobody")[0] == 404


def test_stop_signals_only_steptrack(init_script: InitScript) -> None:
    """A pidfile naming another live program: stop leaves that program alone."""
    init_script.pidfile.parent.mkdir(parents=True)
    with subprocess.Popen(["sleep", "60"]) as other:
        try:
            init_script.pidfile.write_text(str(other.pid))
            assert init_script.run("status").returncode == DEAD_WITH_PIDFILE
            result = init_script.run("stop")
            assert result.returncode == OK, result
            assert other.poll() is None
            assert not init_script.pidfile.exists()
        finally:
            other.kill()


def test_start_fails_when_a_port_is_taken(tmp_path: Path) -> None:
    """start exits 1 and leaves no pidfile when the daemon cannot listen."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        script = InitScript(
            tmp_path,
            options="--ws-listen tcp:0:interface=127.0.0.1 "
            f"--rest-listen tcp:{port}:interface=127.0.0.1",
        )
        try:
            result = script.run("start")
            assert result.returncode == 1, result
            assert not script.pidfile.exists()
            assert script.run("status").returncode == NOT_RUNNING
        finally:
            script.stop_leftovers()


def test_missing_defaults_file_is_an_error(tmp_path: Path) -> None:
    """A STEPTRACK_DEFAULTS file that does not exist stops start and status."""
    env = {**os.environ, "STEPTRACK_DEFAULTS": str(tmp_path / "missing")}
    for action, code in (("start", 6), ("status", 4)):
        result = subprocess.run(
            ["sh", str(INIT_SCRIPT), action],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == code, result
        assert "cannot read" in result.stderr


def test_init_script_is_a_posix_lsb_script() -> None:
    """The init script parses with sh -n and has a complete LSB header."""
    subprocess.run(["sh", "-n", str(INIT_SCRIPT)], check=True, timeout=60)
    text = INIT_SCRIPT.read_text()
    assert text.startswith("#!/bin/sh\n")
    header = text.split("### BEGIN INIT INFO\n", 1)[1].split("### END INIT INFO")[0]
    for key in ("Provides", "Required-Start", "Required-Stop", "Default-Start"):
        assert re.search(rf"^# {key}:\s+\S", header, re.M), key
    assert os.access(INIT_SCRIPT, os.X_OK)


def read_unit(path: Path) -> configparser.ConfigParser:
    """The unit as sections of keys; a repeated key keeps its last value."""
    unit = configparser.ConfigParser(
        strict=False, interpolation=None, comment_prefixes=("#", ";")
    )
    unit.optionxform = str  # type: ignore[assignment, method-assign]
    unit.read_string(path.read_text())
    return unit


def test_systemd_unit(tmp_path: Path) -> None:
    """Foreground twistd as steptrack, hardened; systemd-analyze (if any) accepts it."""
    unit = read_unit(UNIT)
    service = unit["Service"]
    argv = shlex.split(service["ExecStart"])
    assert argv[0] == INSTALLED_TWISTD
    assert "--nodaemon" in argv and "--pidfile=" in argv
    assert argv[argv.index("steptrack") + 1 :] == ["$STEPTRACK_OPTS"]
    expected = {
        "Type": {"simple", "exec"},
        "User": {"steptrack"},
        "Group": {"steptrack"},
        "WorkingDirectory": {"/var/lib/steptrack"},
        "StateDirectory": {"steptrack"},
        "EnvironmentFile": {"-/etc/default/steptrack"},
        "NoNewPrivileges": {"yes"},
        "ProtectSystem": {"strict"},
        "KillMode": {"mixed"},
        "ProtectHome": {"yes"},
        "PrivateTmp": {"yes"},
        "PrivateDevices": {"yes"},
        "ProtectKernelTunables": {"yes"},
        "ProtectControlGroups": {"yes"},
        "RestrictAddressFamilies": {"AF_INET AF_INET6 AF_UNIX"},
        "Restart": {"on-failure"},
        "KillSignal": {"SIGTERM"},
        "TimeoutStopSec": {"10"},
    }
    for key, values in expected.items():
        assert service.get(key) in values, key
    assert int(service["LimitNOFILE"]) >= 65536
    assert unit["Install"]["WantedBy"] == "multi-user.target"

    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return
    # verify insists that ExecStart exists, and the documented install
    # location does not exist here: put this environment's twistd there.
    copy = tmp_path / "steptrack.service"
    copy.write_text(UNIT.read_text().replace(INSTALLED_TWISTD, str(TWISTD)))
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result
    # Unknown keys and bad values are only warnings. Those about other
    # units (the system's own targets) are none of ours.
    ours = [line for line in result.stderr.splitlines() if "steptrack" in line]
    assert ours == [], result.stderr


def test_defaults_file_reads_the_same_in_sh_and_systemd() -> None:
    """The defaults file sets STEPTRACK_OPTS in syntax sh and systemd share."""
    assignments = {}
    for line in DEFAULTS.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        match = re.fullmatch(r'([A-Z_]+)="([^"$`\\]*)"', line)
        assert match, f'not a plain NAME="value" line: {line!r}'
        assignments[match[1]] = match[2]
    assert set(assignments) == {"STEPTRACK_OPTS"}
    # The example options are ones the daemon accepts.
    Options().parseOptions(assignments["STEPTRACK_OPTS"].split())
    # One variable name throughout.
    assert "$STEPTRACK_OPTS" in INIT_SCRIPT.read_text()
    assert "$STEPTRACK_OPTS" in read_unit(UNIT)["Service"]["ExecStart"]
