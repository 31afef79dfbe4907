"""Exact top-K throughput (issue 2, section 7): cml_rs.topk_l2 against numpy
(float32 BLAS matmul + argpartition) and torch (matmul + topk), side by side in
one run, K = 50, r = 100, with 25,975 and 1,000,000 items. Also measures this
machine's sgemm GFLOP/s (numpy matmul of the same shapes) and the GFLOP/s of
cml_rs's distance work: fused with selection (topk_l2) and alone (sqdist).

Run: python benches/bench_topk.py [--threads 2] [--queries 2048]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

import cml_rs

sys.path.insert(0, str(Path(__file__).parent))
from _common import best_time, numpy_topk, report, table

K, DIM, BLOCK = 50, 100, 256


def unit_ball(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x * rng.uniform(0, 1, (n, 1)).astype(np.float32) ** (1 / DIM)


def torch_topk(queries, items):
    import torch

    norms = (items * items).sum(1)
    out = []
    for start in range(0, len(queries), BLOCK):
        scores = norms[None, :] - 2.0 * (queries[start : start + BLOCK] @ items.T)
        out.append(torch.topk(scores, K, dim=1, largest=False, sorted=True).indices)
    return torch.cat(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--queries", type=int, default=2048)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    queries = unit_ball(args.queries, 1)
    rows, data = [], {}
    for n_items in (25_975, 1_000_000):
        items = unit_ball(n_items, 2)
        q_torch, x_torch = torch.from_numpy(queries), torch.from_numpy(items)
        flops = 2.0 * len(queries) * n_items * DIM
        t_numpy = best_time(lambda i=items: numpy_topk(queries, i, K), repeat=1 if n_items > 100_000 else 3)
        t_torch = best_time(lambda x=x_torch, q=q_torch: torch_topk(q, x), repeat=1 if n_items > 100_000 else 3)
        t_rust = best_time(lambda i=items: cml_rs.topk_l2(queries, i, K, num_threads=args.threads))
        t_rust1 = best_time(lambda i=items: cml_rs.topk_l2(queries, i, K, num_threads=1))
        # sgemm of the same shapes, in query blocks as the baselines use it.
        t_gemm = best_time(
            lambda i=items: [queries[s : s + BLOCK] @ i.T for s in range(0, len(queries), BLOCK)],
            repeat=1 if n_items > 100_000 else 3,
        )
        # Distance kernel alone, on a block that fits in memory.
        block_q = queries[:BLOCK]
        block_items = items[:25_975]
        t_dist = best_time(lambda q=block_q, x=block_items: cml_rs.sqdist(q, x, num_threads=args.threads), repeat=10)
        t_gemm_block = best_time(lambda q=block_q, x=block_items: q @ x.T, repeat=10)
        dist_flops = 2.0 * BLOCK * len(block_items) * DIM
        agree = (cml_rs.topk_l2(queries[:64], items, K)[0] == numpy_topk(queries[:64], items, K)).mean()
        faster = min(t_numpy, t_torch)
        label = f"{n_items:,} items"
        rows += [
            [label, "numpy matmul + argpartition", len(queries) / t_numpy, flops / t_numpy / 1e9, ""],
            [label, "torch matmul + topk", len(queries) / t_torch, flops / t_torch / 1e9, ""],
            [
                label,
                "cml_rs.topk_l2, 1 thread",
                len(queries) / t_rust1,
                flops / t_rust1 / 1e9,
                f"{faster / t_rust1:.1f}x",
            ],
            [
                label,
                f"cml_rs.topk_l2, {args.threads} threads",
                len(queries) / t_rust,
                flops / t_rust / 1e9,
                f"{faster / t_rust:.1f}x",
            ],
            [label, "sgemm alone (numpy, same shapes)", "", flops / t_gemm / 1e9, ""],
        ]
        data[label] = {
            "qps": {
                "numpy": len(queries) / t_numpy,
                "torch": len(queries) / t_torch,
                "cml_rs": len(queries) / t_rust,
                "cml_rs_1t": len(queries) / t_rust1,
            },
            "speedup_vs_faster_baseline": faster / t_rust,
            "gflops": {
                "sgemm": flops / t_gemm / 1e9,
                "topk_fused": flops / t_rust / 1e9,
                "sqdist_block": dist_flops / t_dist / 1e9,
                "sgemm_block": dist_flops / t_gemm_block / 1e9,
            },
            "top50_agreement_with_numpy": float(agree),
        }
    lines = [table(["items", "method", "queries/s", "GFLOP/s (distance work)", "x faster baseline"], rows)]
    gflop_rows = [
        [
            label,
            d["gflops"]["sgemm"],
            d["gflops"]["topk_fused"],
            d["gflops"]["topk_fused"] / d["gflops"]["sgemm"],
            d["gflops"]["sqdist_block"],
            d["gflops"]["sgemm_block"],
            d["gflops"]["sqdist_block"] / d["gflops"]["sgemm_block"],
        ]
        for label, d in data.items()
    ]
    lines.append(
        table(
            [
                "items",
                "sgemm GFLOP/s",
                "topk_l2 GFLOP/s",
                "ratio",
                f"sqdist {BLOCK}x25,975 GFLOP/s",
                "sgemm same block",
                "ratio",
            ],
            gflop_rows,
        )
    )
    lines.append(
        f"{args.queries} queries, K = {K}, r = {DIM}, unit-ball vectors; top-{K} ids agree with numpy "
        f"on {min(d['top50_agreement_with_numpy'] for d in data.values()):.4f} of slots (rest are float "
        "ties). Targets: >= 1.5x the faster of numpy/torch; distance GFLOP/s >= 70% of sgemm."
    )
    report("topk", f"python benches/bench_topk.py --threads {args.threads} --queries {args.queries}", lines, data)


if __name__ == "__main__":
    main()
