"""The recall/speed trade-off of the retrieval backends (issue 4, section 3).

Three data sets, side by side in one run:
  (a) item vectors of CML trained on citeulike-t (25,975 items), its users as
      queries, each user's training items excluded inside the search;
  (b) 1,000,000 x 100 vectors shaped like learned embeddings (a seeded mixture
      of 2,000 clusters in the unit ball, see _common.clustered_unit_ball) with
      10,000 queries drawn the same way;
  (c) 1,000,000 uniform random unit vectors (the worst case; reported only).
For each backend and a sweep of its parameters: Recall@50 against exact
search, queries per second (2 threads; 1 thread at the setting that first
reaches recall 0.9), build time and memory. numpy brute force (float32 matmul
+ argpartition) is the floor, the native exact kernel the reference.
Writes benches/out/retrieval.{md,json} and benches/retrieval_tradeoff.png.

Run: python benches/bench_retrieval.py [--threads 2] [--only a b c] [--queries 10000]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

import cml_rs
from cml_rs import datasets, retrieval
from cml_rs.retrieval import neighbour_recall

sys.path.insert(0, str(Path(__file__).parent))
from _common import BENCH_DIR, OUT_DIR, clustered_unit_ball, numpy_topk, report, table, timed, uniform_unit_vectors

K = 50
LSH_PROBES = [16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
HNSW_EF = [50, 64, 80, 100, 150, 200, 300, 500]


def citeulike_case(threads: int) -> tuple[np.ndarray, np.ndarray, Any, str]:
    """Item and user vectors of CML trained with the defaults (cached in benches/out)."""
    data = datasets.load("citeulike-t")
    split = datasets.split_paper(data.user_items, seed=0)
    cache = OUT_DIR / "citeulike_cml.npz"
    if cache.exists():
        model = cml_rs.CML.load(cache)
    else:
        model = cml_rs.CML(num_threads=threads).fit(split.train, validation=split.validation, show_progress=False)
        OUT_DIR.mkdir(exist_ok=True)
        model.save(cache)
    return (
        model.item_factors,
        model.user_factors,
        split.train,
        "(a) CML on citeulike-t: 25,975 items, 7,947 users, seen items excluded",
    )


def run_case(label: str, items: np.ndarray, queries: np.ndarray, exclude, threads: int, numpy_queries: int) -> dict:
    print(f"== {label}", flush=True)
    (truth, _), t_exact = timed(lambda: cml_rs.topk_l2(queries, items, K, exclude=exclude, num_threads=threads))
    (_, _), t_exact1 = timed(lambda: cml_rs.topk_l2(queries, items, K, exclude=exclude, num_threads=1))
    sub = slice(0, min(numpy_queries, len(queries)))
    sub_exclude = exclude[sub] if exclude is not None else None
    found, t_numpy = timed(lambda: numpy_topk(queries[sub], items, K, sub_exclude))
    rows: list[dict] = [
        {
            "backend": "numpy brute force",
            "setting": "",
            "recall": neighbour_recall(found, truth[sub]),
            "qps": len(found) / t_numpy,
        },
        {
            "backend": "native exact (topk_l2)",
            "setting": "",
            "recall": 1.0,
            "qps": len(queries) / t_exact,
            "qps_1t": len(queries) / t_exact1,
            "build_s": 0.0,
            "memory_mb": items.nbytes / 1e6,
        },
    ]
    print(f"  exact {len(queries) / t_exact:.0f} q/s, numpy {len(found) / t_numpy:.0f} q/s", flush=True)

    for tables, hashes in ((16, 16), (32, 16)):
        index = cml_rs.LshIndex(items.shape[1], n_tables=tables, n_hashes=hashes, seed=0)
        _, t_build = timed(lambda index=index: index.add_items(items, num_threads=threads))
        memory = index.memory_bytes() / 1e6
        first = True
        for probes in LSH_PROBES:
            if probes < tables:
                continue
            (ids, _), t = timed(
                lambda p=probes, index=index: index.query(queries, K, n_probes=p, exclude=exclude, num_threads=threads)
            )
            row = {
                "backend": f"LSH L={tables} k={hashes}",
                "setting": f"probes={probes}",
                "recall": neighbour_recall(ids, truth),
                "qps": len(queries) / t,
                "build_s": t_build,
                "memory_mb": memory,
            }
            if first and row["recall"] >= 0.9:
                (_, _), t1 = timed(
                    lambda p=probes, index=index: index.query(queries, K, n_probes=p, exclude=exclude, num_threads=1)
                )
                row["qps_1t"], first = len(queries) / t1, False
            rows.append(row)
            print(f"  {row['backend']} {row['setting']}: recall {row['recall']:.3f} {row['qps']:.0f} q/s", flush=True)
            if row["recall"] > 0.995 or row["qps"] < rows[1]["qps"] / 10:
                break  # no further point: recall saturated, or ten times slower than exact search
        del index

    (index, t_build) = timed(lambda: retrieval.HnswIndex(items, M=16, ef_construction=200, num_threads=threads))
    memory = index.memory_bytes() / 1e6
    print(f"  HNSW built in {t_build:.1f}s", flush=True)
    first = True
    for ef in HNSW_EF:
        index.set_ef(ef)
        (ids, _), t = timed(lambda: index.query(queries, K, exclude=exclude, num_threads=threads))
        row = {
            "backend": "HNSW M=16 efC=200",
            "setting": f"ef={ef}",
            "recall": neighbour_recall(ids, truth),
            "qps": len(queries) / t,
            "build_s": t_build,
            "memory_mb": memory,
        }
        if first and row["recall"] >= 0.9:
            (_, _), t1 = timed(lambda: index.query(queries, K, exclude=exclude, num_threads=1))
            row["qps_1t"], first = len(queries) / t1, False
        rows.append(row)
        print(f"  HNSW ef={ef}: recall {row['recall']:.3f} {row['qps']:.0f} q/s", flush=True)
    return {"label": label, "n_items": len(items), "n_queries": len(queries), "rows": rows}


def at_recall(rows: list[dict], backend_prefix: str, target: float) -> dict | None:
    """The fastest setting of a backend family with recall >= target."""
    ok = [r for r in rows if r["backend"].startswith(backend_prefix) and r["recall"] >= target]
    return max(ok, key=lambda r: r["qps"]) if ok else None


def interpolated_qps(rows: list[dict], backend_prefix: str, target: float) -> float | None:
    """A backend's QPS at exactly `target` recall, interpolating log-QPS along its sweep."""
    curve = sorted((r["recall"], r["qps"]) for r in rows if r["backend"].startswith(backend_prefix))
    for (r0, q0), (r1, q1) in zip(curve, curve[1:]):
        if r0 <= target <= r1 and r1 > r0:
            return float(np.exp(np.log(q0) + (np.log(q1) - np.log(q0)) * (target - r0) / (r1 - r0)))
    return None


def plot(cases: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(cases), figsize=(6 * len(cases), 5), squeeze=False)
    for axis, case in zip(axes[0], cases):
        families: dict[str, list] = {}
        for row in case["rows"]:
            families.setdefault(row["backend"], []).append(row)
        for name, rows in families.items():
            rows = sorted(rows, key=lambda r: r["recall"])
            style = "o" if len(rows) == 1 else "o-"
            axis.plot([r["recall"] for r in rows], [r["qps"] for r in rows], style, label=name, markersize=4)
        axis.set_yscale("log")
        axis.set_xlabel(f"Recall@{K} vs exact")
        axis.set_ylabel("queries / second (2 threads)")
        axis.set_title(case["label"].split(":")[0], fontsize=10)
        axis.axvline(0.9, color="grey", linewidth=0.5, linestyle="--")
        axis.grid(True, which="both", linewidth=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="+", default=["a", "b", "c"])
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--numpy-queries", type=int, default=500)
    args = parser.parse_args()
    cases = []
    if "a" in args.only:
        try:
            items, users, seen, label = citeulike_case(args.threads)
            cases.append(run_case(label, items, users, seen, args.threads, args.numpy_queries))
        except FileNotFoundError as missing:
            print(f"skipping (a): {missing}")
    if "b" in args.only:
        items = clustered_unit_ball(args.items, seed=0)
        queries = clustered_unit_ball(args.queries, seed=1)
        label = f"(b) clustered embeddings: {args.items:,} x 100, 2,000 clusters, {args.queries:,} queries"
        cases.append(run_case(label, items, queries, None, args.threads, args.numpy_queries))
        del items
    if "c" in args.only:
        items = uniform_unit_vectors(args.items, seed=0)
        queries = uniform_unit_vectors(args.queries, seed=1)
        label = f"(c) uniform unit vectors: {args.items:,} x 100, {args.queries:,} queries (worst case)"
        cases.append(run_case(label, items, queries, None, args.threads, args.numpy_queries))
        del items

    sections = []
    for case in cases:
        rows = [
            [
                r["backend"],
                r["setting"],
                r["recall"],
                r["qps"],
                r.get("qps_1t", ""),
                r.get("build_s", ""),
                r.get("memory_mb", ""),
            ]
            for r in case["rows"]
        ]
        sections.append(f"**{case['label']}**")
        sections.append(
            table(
                ["backend", "setting", f"Recall@{K}", "q/s (2 threads)", "q/s (1 thread)", "build s", "memory MB"], rows
            )
        )
        lsh, hnsw = at_recall(case["rows"], "LSH", 0.9), at_recall(case["rows"], "HNSW", 0.9)
        exact = case["rows"][1]
        if lsh is not None:
            hnsw_same = interpolated_qps(case["rows"], "HNSW", lsh["recall"])
            hnsw_build = next((r["build_s"] for r in case["rows"] if r["backend"].startswith("HNSW")), None)
            summary = (
                f"At Recall@{K} >= 0.9, the fastest LSH setting ({lsh['backend']}, {lsh['setting']}, recall "
                f"{lsh['recall']:.3f}) runs {lsh['qps']:.0f} q/s: "
                f"{lsh['qps'] / exact['qps']:.2f}x the native exact kernel"
            )
            if hnsw_same:
                summary += f", {lsh['qps'] / hnsw_same:.2f}x hnswlib at the same recall ({hnsw_same:.0f} q/s)"
            if hnsw_build:
                summary += (
                    f"; it builds in {lsh['build_s']:.1f}s against hnswlib's {hnsw_build:.1f}s "
                    f"({hnsw_build / lsh['build_s']:.1f}x)"
                )
            sections.append(summary + ".")
        else:
            sections.append("LSH did not reach Recall@50 0.9 in this sweep.")
        if hnsw is not None:
            sections.append(f"hnswlib first reaches 0.9 at {hnsw['setting']} ({hnsw['qps']:.0f} q/s).")
    path = BENCH_DIR / "retrieval_tradeoff.png"
    plot(cases, path)
    sections.append(f"Plot: `benches/{path.name}` (recall against log queries per second).")
    report("retrieval", "python benches/bench_retrieval.py " + " ".join(sys.argv[1:]), sections, {"cases": cases})


if __name__ == "__main__":
    main()
