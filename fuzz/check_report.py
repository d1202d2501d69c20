"""
Judges an Autobahn|Testsuite fuzzingclient run against steptrack: reads the
report (``index.json`` and the per-case JSON files beside it) and the
daemon's log, prints a summary, and exits 1 when any check fails.

The testsuite scores two things per case: ``behavior``, whether the server
echoed what it was sent, and ``behaviorClose``, how the connection was
closed. steptrack never sends data messages, so ``behavior`` says nothing
about it and is ignored (except for compression, below); a case passes on
its closing behaviour:

- ``behaviorClose`` is ``OK``, or ``INFORMATIONAL`` where the case itself
  says the RFC leaves the behaviour open (7.1.6, 7.13.1, 7.13.2).
- Where the testsuite tolerates a server that fails the connection by just
  dropping TCP (``requireClean`` false), steptrack must send the RFC 6455
  close code the case expects: it turns Autobahn's ``failByDrop`` off so
  that clients learn what they did wrong. This is stricter than the
  testsuite.
- 9.* cases send messages larger than the daemon's default limit of 64 KiB
  and wait for an echo: the server must close them itself, cleanly, with
  1009, which the testsuite scores as ``FAILED``.
- 12.* and 13.* test permessage-deflate, which steptrack declines: their
  ``behavior`` must be ``UNIMPLEMENTED``, i.e. the offer was refused.

The daemon's log must hold no traceback and no line at error or critical
level (``Logger.failure`` logs at critical).

This is not a WebSocket test of its own: what is tested is what the
testsuite sent, as fuzz/run.sh chose the cases.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CLOSE_MESSAGE_TOO_BIG = 1009
OPCODES = {0: "continuation", 1: "text", 2: "binary", 8: "close", 9: "ping", 10: "pong"}
LOG_PROBLEMS = re.compile(
    r"Traceback \(most recent call last\)|Unhandled Error"
    r"|\[[^\]]*#(?:error|critical|failure)\]"
)
TAGS = re.compile(r"<[^>]+>")
WIRE_PAYLOAD_SHOWN = 40
LOG_LINES_SHOWN = 20


@dataclass
class Case:
    """One case of the run, with its entry in index.json and its own report."""

    id: str
    entry: dict[str, Any]
    report: dict[str, Any] | None

    @property
    def group(self) -> str:
        return self.id.split(".")[0]

    def sort_key(self) -> tuple[int, ...]:
        return tuple(int(part) for part in self.id.split("."))


def problem_of(case: Case) -> str | None:
    """What is wrong with the closing of ``case``, or None when it passes."""
    close = case.entry["behaviorClose"]
    report = case.report
    if report is None:
        return f"no per-case report ({case.entry.get('reportfile')})"
    if case.group in ("12", "13"):
        if case.entry["behavior"] != "UNIMPLEMENTED":
            return (
                "the server accepted permessage-deflate, which steptrack keeps "
                f"off (behavior {case.entry['behavior']})"
            )
        if close not in ("OK", "UNIMPLEMENTED"):
            return f"behaviorClose is {close}: {report['resultClose']}"
        return None
    if case.group == "9":
        if (
            report["remoteCloseCode"] == CLOSE_MESSAGE_TOO_BIG
            and not report["closedByMe"]
            and report["wasClean"]
        ):
            return None
        return (
            "a message over the 64 KiB limit must be closed by the server, "
            "cleanly, with 1009"
        )
    if close == "INFORMATIONAL":
        return None
    if close != "OK":
        return f"behaviorClose is {close}: {report['resultClose']}"
    expected = report["expectedClose"]
    codes = expected["closeCode"]
    if not expected["requireClean"] and report["remoteCloseCode"] not in codes:
        return (
            f"no close code {' or '.join(map(str, codes))} from the server "
            "(the testsuite accepts a dropped connection; steptrack promises "
            "the code)"
        )
    return None


def expected_codes(case: Case) -> list[int]:
    """The close codes the server should send in ``case``."""
    if case.group == "9":
        return [CLOSE_MESSAGE_TOO_BIG]
    report = case.report or {}
    codes: list[int] = report.get("expectedClose", {}).get("closeCode", [])
    return codes


def describe_expected(case: Case, report: dict[str, Any]) -> str:
    """What the case expects, in the testsuite's own field names."""
    codes = " or ".join(map(str, expected_codes(case)))
    if case.group == "9":
        return (
            f"close code {codes} from the server, closedByMe False, "
            "wasClean True (the testsuite itself expects an echo)"
        )
    expected = report["expectedClose"]
    return (
        f"close code {codes} from the server, "
        f"closedByMe {expected['closedByMe']}, "
        f"requireClean {expected['requireClean']}"
    )


def describe_observed(report: dict[str, Any]) -> str:
    """What happened, in the testsuite's own field names."""
    observed = (
        f"close code {report['remoteCloseCode']} from the server"
        f" (client sent {report['localCloseCode']}), "
        f"closedByMe {report['closedByMe']}, droppedByMe {report['droppedByMe']}, "
        f"wasClean {report['wasClean']}"
    )
    if report["wasNotCleanReason"]:
        observed += f": {report['wasNotCleanReason']}"
    return observed


def _payload(frame: list[Any]) -> str:
    length, shown = frame
    shown = str(shown)
    if len(shown) > WIRE_PAYLOAD_SHOWN:
        shown = shown[:WIRE_PAYLOAD_SHOWN] + "..."
    return f"{length} bytes {shown!r}" if length else "empty"


def describe_wire(wirelog: list[list[Any]]) -> Iterable[str]:
    """The frames and timers of a case, without the raw octets."""
    for event in wirelog:
        kind = event[0]
        if kind in ("TF", "RF"):
            opcode, fin, rsv = event[2], event[3], event[4]
            sender = "client" if kind == "TF" else "server"
            name = OPCODES.get(opcode, f"opcode {opcode}")
            flags = "" if fin else " fin=0"
            flags += f" rsv={rsv}" if rsv else ""
            yield f"{sender} sent {name}{flags}: {_payload(event[1])}"
        elif kind == "KL":
            yield f"client arms its kill timer ({event[1]} s)"
        elif kind == "KLE":
            yield "client kill timer fires: the client closes with 1001"
        elif kind == "TI":
            yield f"client arms its close timer ({event[1]} s)"
        elif kind == "TIE":
            yield "client close timer fires: the client closes"
        elif kind == "CTE":
            yield f"client continues ({event[1]})"
    if not any(event[0] == "RF" for event in wirelog):
        yield "server sent no frame"


def load_cases(index_path: Path, agent: str | None) -> tuple[str, list[Case]]:
    index = json.loads(index_path.read_text(encoding="utf-8"))
    if agent is None:
        if len(index) != 1:
            raise SystemExit(f"{index_path}: name one agent of {sorted(index)}")
        agent = next(iter(index))
    if agent not in index:
        raise SystemExit(f"{index_path}: no agent {agent!r} in {sorted(index)}")
    cases = []
    for case_id, entry in index[agent].items():
        report_path = index_path.parent / entry["reportfile"]
        report = (
            json.loads(report_path.read_text(encoding="utf-8"))
            if report_path.exists()
            else None
        )
        cases.append(Case(case_id, entry, report))
    cases.sort(key=Case.sort_key)
    return agent, cases


def log_problems(log_path: Path) -> list[tuple[int, str]]:
    with log_path.open(encoding="utf-8", errors="replace") as log:
        return [
            (number, line.rstrip("\n"))
            for number, line in enumerate(log, start=1)
            if LOG_PROBLEMS.search(line)
        ]


def counts(values: Iterable[str]) -> str:
    return ", ".join(f"{value} {n}" for value, n in Counter(values).most_common())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("index", type=Path, help="the testsuite's index.json")
    parser.add_argument("log", type=Path, help="the daemon's log")
    parser.add_argument("--agent", help="the server's name in the report")
    args = parser.parse_args(argv)

    if not args.index.exists():
        print(f"FAIL: no report at {args.index}: the testsuite did not finish")
        return 1
    agent, cases = load_cases(args.index, args.agent)
    failing = [(case, problem) for case in cases if (problem := problem_of(case))]

    passed = len(cases) - len(failing)
    print(f"Autobahn|Testsuite fuzzingclient against {agent}: {len(cases)} cases")
    print(f"  behaviorClose: {counts(c.entry['behaviorClose'] for c in cases)}")
    print(
        f"  behavior (echo, not judged): {counts(c.entry['behavior'] for c in cases)}"
    )
    print(f"  judged on closing: {passed} passed, {len(failing)} failed")
    if failing:
        print(
            "\nIn the testsuite's words: closedByMe, its client started the "
            "closing handshake;\ndroppedByMe, its client dropped TCP; wasClean, "
            "a full closing handshake, then\nthe server closed TCP."
        )
    for case, problem in failing:
        report = case.report
        print(f"\nFAIL {case.id}: {problem}")
        if report is None:
            continue
        print(f"  case:     {TAGS.sub('', report['description'])}")
        print(f"  expected: {describe_expected(case, report)}")
        print(f"  observed: {describe_observed(report)}")
        print(f"  testsuite: behaviorClose {case.entry['behaviorClose']}")
        if not report.get("createWirelog", True):
            print("    (the testsuite keeps no wire log for this case)")
            continue
        for line in describe_wire(report["wirelog"]):
            print(f"    {line}")

    bad_lines = log_problems(args.log) if args.log.exists() else None
    if bad_lines is None:
        print(f"\nFAIL: no daemon log at {args.log}")
    elif bad_lines:
        print(f"\nFAIL: {len(bad_lines)} traceback or error line(s) in the daemon log:")
        for number, line in bad_lines[:LOG_LINES_SHOWN]:
            print(f"  {args.log}:{number}: {line}")
    else:
        print(f"daemon log: no traceback, no error or critical line ({args.log})")

    if failing:
        print("\nfailing cases: close code(s) expected, close code the server sent")
        for case, _ in failing:
            sent = (case.report or {}).get("remoteCloseCode")
            print(f"  {case.id}: expected {expected_codes(case)}, got {sent}")
    if not cases:
        print("FAIL: the report holds no case")
    return 0 if cases and not failing and bad_lines == [] else 1


if __name__ == "__main__":
    sys.exit(main())
