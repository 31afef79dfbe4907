"""The fuzz suite in CI: every public entry point on arbitrary input, in a subprocess.

``fuzz_entry_points.py`` runs hypothesis over every public entry point (see
its docstring for the property). It runs in a child process so that an abort
or a hang is reported here as a failure; the number of examples is bounded so
CI stays quick (``CML_FUZZ_EXAMPLES`` raises it for a longer run).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.timeout(900)
def test_every_entry_point_survives_arbitrary_input():
    examples = os.environ.get("CML_FUZZ_EXAMPLES", "60")
    script = Path(__file__).with_name("fuzz_entry_points.py")
    result = subprocess.run(
        [sys.executable, str(script), "--examples", examples, "--seed", "0"],
        capture_output=True,
        text=True,
        timeout=840,
    )
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    counts = json.loads(result.stdout.strip().splitlines()[-1])
    per_entry_point = {name: n for name, n in counts.items() if name.startswith("cases: ")}
    assert len(per_entry_point) == 12 and set(per_entry_point.values()) == {int(examples)}, per_entry_point
    assert counts["cases"] == 12 * int(examples)
    assert counts["clean errors"] + counts["results"] == counts["cases"]
    assert counts["results checked against numpy"] > 0
