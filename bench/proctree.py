"""
A server's process tree, read from ``/proc``: the process the benchmark
started and every process descended from it, with their CPU time and
resident memory summed.

A server may be more than one process: steptrack's supervising parent runs
workers, and a reference server could fork too. Figures of the started PID
alone would then miss most of the work, so the load clients of ``bench/``
take the server's CPU and RSS through this module.

Descendants are found by reading every ``/proc/PID/stat`` and following
parent PIDs (``/proc/PID/task/TID/children`` is missing from kernels built
without ``CONFIG_PROC_CHILDREN``, and is documented as unreliable while the
children run). A process is known by its PID and its start time, so a PID
that the kernel hands to a new process is never taken for the old one.

Linux only, standard library only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Process:
    pid: int
    started: int
    """Start time after boot, in clock ticks (field 22 of proc(5)'s stat)."""


@dataclass(frozen=True)
class Stat:
    """The fields of ``/proc/PID/stat`` that the benchmark reads."""

    state: str
    parent: int
    started: int
    cpu_ticks: int
    """User + system time of every thread of the process, and of the
    children it has waited for (fields 14 to 17 of proc(5)'s stat)."""


def stat_of(pid: int) -> Stat | None:
    """The process's stat, or None when it is gone (or was never there)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            text = stat.read()
    except OSError:
        return None
    # The command name may hold spaces and parentheses; what follows its
    # last ")" does not. fields[0] is field 3 of proc(5).
    try:
        fields = text.rsplit(")", 1)[1].split()
        utime, stime, cutime, cstime = (int(value) for value in fields[11:15])
        parent, started = int(fields[1]), int(fields[19])
    except (IndexError, ValueError):
        return None
    return Stat(fields[0], parent, started, utime + stime + cutime + cstime)


def tree(root: int) -> list[Process]:
    """
    ``root`` and its descendants, the root first; empty when the root is
    gone. Processes that start or end while ``/proc`` is read may be missed.
    """
    stats: dict[int, Stat] = {}
    with os.scandir("/proc") as entries:
        for entry in entries:
            if entry.name.isdigit():
                found = stat_of(int(entry.name))
                if found is not None:
                    stats[int(entry.name)] = found
    if root not in stats:
        return []
    children: dict[int, list[int]] = {}
    for pid, found in stats.items():
        children.setdefault(found.parent, []).append(pid)
    members: list[Process] = []
    waiting = [root]
    # A parent link cannot loop, but the bound costs nothing.
    while waiting and len(members) <= len(stats):
        pid = waiting.pop(0)
        members.append(Process(pid, stats[pid].started))
        waiting.extend(sorted(children.get(pid, [])))
    return members


def is_running(process: Process) -> bool:
    """The same process (not a new one with its PID) is there, and not a zombie."""
    found = stat_of(process.pid)
    return (
        found is not None
        and found.started == process.started
        and found.state not in ("Z", "X")
    )


def cpu_seconds(root: int | None) -> float | None:
    """
    CPU time (user + system, every thread) of the tree under ``root``, or
    None when there is no such process. It includes the CPU of the
    descendants that have ended and been waited for by their parent, so a
    worker that exits during a window does not take its CPU with it; one
    whose parent never waits for it does.
    """
    if root is None:
        return None
    ticks = [stat_of(process.pid) for process in tree(root)]
    if not ticks:
        return None
    return sum(found.cpu_ticks for found in ticks if found is not None) / CLOCK_TICKS


def rss_kb(root: int | None) -> int | None:
    """
    VmRSS of the tree under ``root``, summed, in KB; None when there is no
    such process. Pages that several processes share (the code and the
    copy-on-write memory of forked workers) count once per process, so the
    sum overstates what the tree takes; a difference of two sums taken on
    the same processes, as RSS per connection is, is much less affected.
    """
    if root is None:
        return None
    members = tree(root)
    if not members:
        return None
    return sum(vm_rss_kb(process.pid) for process in members)


def vm_rss_kb(pid: int) -> int:
    """A process's VmRSS in KB; 0 when it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return 0
    return 0
