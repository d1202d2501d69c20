#!/usr/bin/env python3
"""
The shared ``stepload.py``, run with its server figures taken over the
server's whole process tree.

``stepload.py --pid PID`` reads the CPU time and the RSS of that one
process. A server that runs workers (steptrack's supervising parent does)
would then be measured by its parent alone, which does almost nothing. This
wrapper loads ``stepload.py`` unchanged, points the two functions that read
a server's figures (``cpu_seconds_of`` and ``rss_kb_of``) at ``proctree``,
which sums them over the PID and all its descendants, and runs its ``main``
with the remaining arguments. Everything else, the load, the checks, the
moments at which the figures are taken and the JSON it prints, is
stepload's own: the CPU window is its timed phase, and idle's RSS is read
before the connections open, once they are open, and at the end of the
hold.

    stepload_tree.py PATH/TO/stepload.py MODE [stepload's options]

Standard library only (and ``proctree.py`` beside this file). Exit status
is stepload's; 2 also when ``stepload.py`` cannot be loaded or no longer has
the functions this wrapper replaces, with a JSON line that says so.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import proctree

REPLACED = {"cpu_seconds_of": proctree.cpu_seconds, "rss_kb_of": proctree.rss_kb}


def load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("stepload", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    # Its dataclasses look their module up by name while they are built.
    sys.modules["stepload"] = module
    spec.loader.exec_module(module)
    return module


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        stepload = load(Path(argv[0]))
    except (ImportError, OSError, SyntaxError) as error:
        return refuse(f"{argv[0]}: {error}")
    for name in [*REPLACED, "main"]:
        if not callable(getattr(stepload, name, None)):
            # A figure of the parent alone would pass for the server's.
            return refuse(f"{argv[0]} has no {name}(); this wrapper needs updating")
    for name, replacement in REPLACED.items():
        setattr(stepload, name, replacement)
    status = stepload.main(argv[1:])
    return int(status)


def refuse(error: str) -> int:
    print(f"[stepload_tree] {error}", file=sys.stderr, flush=True)
    print(json.dumps({"ok": False, "error": error}), flush=True)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
