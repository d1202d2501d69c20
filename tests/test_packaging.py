"""
The wheel carries the twistd plugin, so that an installed steptrack has
``twistd steptrack``.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_ships_the_plugin_and_the_typing_marker(tmp_path: Path) -> None:
    """The wheel holds the plugin module (no plugins __init__) and py.typed."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
    )
    [wheel] = tmp_path.glob("steptrack-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "twisted/plugins/steptrack.py" in names
    assert "twisted/plugins/__init__.py" not in names
    assert "twisted/__init__.py" not in names
    assert "steptrackd/py.typed" in names
    assert "steptrackd/server.py" in names
    assert not any(name.startswith("tests/") for name in names)
