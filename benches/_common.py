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
import scipy.sparse as sp

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


def best_time(fn: Callable[[], Any], repeat: int = 3) -> float:
    """Best wall time of ``repeat`` calls, after a pause and one warm-up call.

    OpenBLAS and torch workers spin for a while after each call; on 2 cores
    they would steal the CPU from whatever is timed next, hence the pause."""
    time.sleep(0.5)
    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``fn()``'s result and the seconds it took (one call, for work too long to repeat)."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def numpy_topk(queries: np.ndarray, items: np.ndarray, k: int, exclude: Any = None, block: int = 256) -> np.ndarray:
    """The k nearest items by squared distance with numpy (matmul + argpartition), blocks of queries
    at a time; ``exclude`` (CSR, one row per query) is skipped. The baseline of the top-K benches."""
    norms = np.einsum("ij,ij->i", items, items)
    out = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), block):
        scores = norms[None, :] - 2.0 * (queries[start : start + block] @ items.T)
        if exclude is not None:
            rows = exclude[start : start + block].tocoo()
            scores[rows.row, rows.col] = np.inf
        part = np.argpartition(scores, k, axis=1)[:, :k]
        order = np.argsort(np.take_along_axis(scores, part, axis=1), axis=1)
        out[start : start + block] = np.take_along_axis(part, order, axis=1)
    return out


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


def clustered_unit_ball(
    n: int, dim: int = 100, n_clusters: int = 2000, spread: float = 0.35, seed: int = 0, centre_seed: int = 1234
) -> np.ndarray:
    """Vectors shaped like trained CML embeddings: a seeded mixture of `n_clusters`
    clusters of uneven size (Zipf weights) and radius (about `spread`, log-normal),
    around centres of norm 0.5-0.9, clipped into the unit ball. Within a cluster
    the spread decays over directions (variance ~ 1/(j+1) in a random basis, about
    16 effective dimensions), as in learned embeddings, so near neighbours are
    meaningfully nearer than the rest of their cluster. Queries drawn with
    another `seed` share the clusters."""
    structure = np.random.default_rng(centre_seed)
    directions = structure.standard_normal((n_clusters, dim))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    centres = directions * structure.uniform(0.5, 0.9, (n_clusters, 1))
    weights = 1.0 / np.sqrt(np.arange(1, n_clusters + 1))
    weights = structure.permutation(weights / weights.sum())
    radii = spread * structure.lognormal(0.0, 0.3, n_clusters)
    basis, _ = np.linalg.qr(structure.standard_normal((dim, dim)))
    profile = 1.0 / np.sqrt(np.arange(1, dim + 1))
    profile /= np.linalg.norm(profile)
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        labels = rng.choice(n_clusters, stop - start, p=weights)
        noise = (rng.standard_normal((stop - start, dim)) * profile) @ basis.T
        points = centres[labels] + noise * radii[labels, None]
        norms = np.maximum(np.linalg.norm(points, axis=1, keepdims=True), 1.0)
        out[start:stop] = points / norms
    return out


def uniform_unit_vectors(n: int, dim: int = 100, seed: int = 0) -> np.ndarray:
    """Uniform random directions on the unit sphere (the worst case for any index)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        x = rng.standard_normal((stop - start, dim))
        out[start:stop] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def recall_of_lists(ids: np.ndarray, test: sp.csr_matrix, k: int) -> np.ndarray:
    """Per-user recall@k of recommended id lists (row r for test row r, -1 for no item),
    aligned row for row for paired tests, so every test row needs a held-out item."""
    from cml_rs.evaluation import list_metrics

    test = sp.csr_matrix(test)
    if not np.diff(test.indptr).all():
        raise ValueError("every row of test needs a held-out item for recall")
    return list_metrics(np.asarray(ids)[:, :k], test).per_user["recall"]
