"""Helpers shared by the Python benchmarks: timing, machine description, tables."""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
OUT_DIR = BENCH_DIR / "out"


def machine() -> str:
    """CPU model, core count and library versions, for RESULTS.md."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import cml_rs

    parts = [
        f"{cpu}, {os.cpu_count()} cores",
        f"Python {sys.version.split()[0]}",
        f"numpy {np.__version__}",
        f"cml_rs {cml_rs.__version__} ({cml_rs._native.simd_kernel()} kernel)",
    ]
    try:
        import torch

        parts.append(f"torch {torch.__version__}")
    except ImportError:
        pass
    return "; ".join(parts)


def best_time(fn: Callable[[], Any], repeat: int = 3, min_time: float = 0.0) -> float:
    """Best wall time of `repeat` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        if sum(times) > 60 and len(times) >= 1 and min_time == 0:
            break
    return min(times)


def table(headers: list[str], rows: list[list[Any]]) -> str:
    def fmt(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def report(name: str, command: str, sections: list[str], data: dict[str, Any]) -> None:
    """Prints a markdown report and stores it (and the raw numbers) under benches/out/."""
    OUT_DIR.mkdir(exist_ok=True)
    stamp = datetime.date.today().isoformat()
    text = "\n\n".join([f"### {name}", f"{stamp}; {machine()}", f"Command: `{command}`", *sections])
    print(text)
    (OUT_DIR / f"{name}.md").write_text(text + "\n")
    (OUT_DIR / f"{name}.json").write_text(json.dumps({"date": stamp, "machine": machine(), **data}, indent=2))
