"""Recommendation quality with the paper's protocol (issue 3, section 7).

Trains CML with the package's default hyper-parameters on citeulike-t's
60/20/20 split (seed 0), early-stopped on validation recall@50, and scores the
test set once (train and validation items excluded, all items ranked). In the
same run, where they are installed, peers are tuned on the same validation set
and scored on the same test set: WRMF (implicit's ALS), BPR (implicit) and
WARP (LightFM). Matrix-factorisation scores (inner products) are ranked with
the same exact kernel after the MIPS-to-L2 transform. Per-user recall@50 of
CML is compared with each peer by the paired Wilcoxon and t tests. CML's test
recall is also traced over wall time (the tracing time itself excluded), to
see when it passes WRMF's.

Run: python benches/quality.py [--threads 2] [--datasets citeulike-t ml-1m-implicit gowalla]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

import cml_rs
from cml_rs import datasets, evaluation

sys.path.insert(0, str(Path(__file__).parent))
from _common import report, table


def mips_to_l2(users: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Factors whose squared L2 order equals the inner-product order (Bachrach et al. 2014):
    x -> [x, sqrt(M^2 - |x|^2)], q -> [q, 0], so |q' - x'|^2 = |q|^2 + M^2 - 2 q.x."""
    norms = np.einsum("ij,ij->i", items, items)
    extra = np.sqrt(np.maximum(norms.max() - norms, 0.0))[:, None]
    return (
        np.hstack([users, np.zeros((len(users), 1))]).astype(np.float32),
        np.hstack([items, extra]).astype(np.float32),
    )


def scores(factors, split, k: int, threads: int, on: str = "test") -> evaluation.RankingMetrics:
    if on == "validation":
        return evaluation.ranking_metrics_at_k(factors, split.train, split.validation, K=k, num_threads=threads)
    return evaluation.ranking_metrics_at_k(
        factors, split.train, split.test, K=k, exclude=split.validation, num_threads=threads
    )


def tune(name: str, grid: dict[str, list], fit: Callable[..., tuple], split, threads: int) -> dict[str, Any]:
    """Best validation recall@50 over `grid`; returns its test metrics and settings."""
    best: dict[str, Any] | None = None
    for values in itertools.product(*grid.values()):
        params = dict(zip(grid, values))
        start = time.perf_counter()
        factors = fit(split.train, **params)
        seconds = time.perf_counter() - start
        valid = scores(factors, split, 50, threads, on="validation")["recall"]
        print(f"  {name} {params}: validation recall@50 {valid:.4f} ({seconds:.1f}s)", flush=True)
        if best is None or valid > best["validation"]:
            best = {"params": params, "validation": valid, "factors": factors, "seconds": seconds}
    assert best is not None
    best["test"] = {k: scores(best["factors"], split, k, threads) for k in (50, 100)}
    return best


def implicit_peers(threads: int) -> dict[str, tuple[dict, Callable]]:
    try:
        import implicit
    except ImportError:
        print("implicit is not installed: WRMF and BPR are skipped (pip install implicit)")
        return {}
    from threadpoolctl import threadpool_limits

    def als(train, factors, regularization, alpha, iterations=15):
        with threadpool_limits(1, "blas"):
            model = implicit.cpu.als.AlternatingLeastSquares(
                factors=factors,
                regularization=regularization,
                alpha=alpha,
                iterations=iterations,
                num_threads=threads,
                random_state=0,
            )
            model.fit(train, show_progress=False)
        return mips_to_l2(model.user_factors, model.item_factors)

    def bpr(train, factors, learning_rate, regularization, iterations=200):
        model = implicit.cpu.bpr.BayesianPersonalizedRanking(
            factors=factors,
            learning_rate=learning_rate,
            regularization=regularization,
            iterations=iterations,
            num_threads=threads,
            random_state=0,
        )
        model.fit(train, show_progress=False)
        return mips_to_l2(model.user_factors, model.item_factors)

    return {
        "WRMF (implicit ALS)": ({"factors": [100], "regularization": [0.1, 1.0, 10.0], "alpha": [1.0, 5.0, 20.0]}, als),
        "BPR (implicit)": ({"factors": [100], "learning_rate": [0.01, 0.05], "regularization": [0.001, 0.01]}, bpr),
    }


def lightfm_peer(threads: int) -> dict[str, tuple[dict, Callable]]:
    try:
        from lightfm import LightFM
    except ImportError:
        print("lightfm is not installed: WARP is skipped")
        return {}

    def warp(train, no_components, learning_rate, epochs=30):
        model = LightFM(no_components=no_components, loss="warp", learning_rate=learning_rate, random_state=0)
        model.fit(train.tocoo(), epochs=epochs, num_threads=threads)
        users = np.hstack([model.user_embeddings, model.user_biases[:, None], np.ones((train.shape[0], 1))])
        items = np.hstack([model.item_embeddings, np.ones((train.shape[1], 1)), model.item_biases[:, None]])
        return mips_to_l2(users, items)

    return {"WARP (LightFM)": ({"no_components": [100], "learning_rate": [0.05, 0.1]}, warp)}


def run_cml(split, threads: int, trace: bool) -> dict[str, Any]:
    """CML with package defaults; optionally traces test recall@50 against wall time."""
    curve: list[tuple[float, float]] = []
    traced = [0.0]

    def callback(epoch, elapsed, loss, metrics):
        if trace and metrics:
            start = time.perf_counter()
            recall = scores(model, split, 50, threads)["recall"]
            curve.append((elapsed - traced[0], recall))
            traced[0] += time.perf_counter() - start

    model = cml_rs.CML(num_threads=threads)
    start = time.perf_counter()
    model.fit(split.train, validation=split.validation, show_progress=False, callback=callback)
    seconds = time.perf_counter() - start - traced[0]
    return {
        "model": model,
        "seconds": seconds,
        "epochs": len(model.history_),
        "best_epoch": model.best_epoch_,
        "test": {k: scores(model, split, k, threads) for k in (50, 100)},
        "curve": curve,
    }


def split_of(name: str):
    data = datasets.load(name)
    if name == "gowalla":
        return data, data.given_split, "shipped train/valid/test"
    return data, datasets.split_paper(data.user_items, seed=0), "split_paper(seed=0)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--datasets", nargs="+", default=["citeulike-t"])
    parser.add_argument("--no-peers", action="store_true")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    sections, data_out = [], {}
    for name in args.datasets:
        data, split, how = split_of(name)
        print(f"== {data} ({how})", flush=True)
        cml = run_cml(split, args.threads, trace=name == "citeulike-t")
        peers = {}
        if not args.no_peers:
            for peer, (grid, fit) in {**implicit_peers(args.threads), **lightfm_peer(args.threads)}.items():
                peers[peer] = tune(peer, grid, fit, split, args.threads)
        rows = [
            [
                "CML (cml-rs defaults)",
                cml["test"][50]["recall"],
                cml["test"][100]["recall"],
                cml["test"][50]["ndcg"],
                f"{cml['seconds']:.1f}",
                f"{cml['epochs']} epochs (best {cml['best_epoch']})",
                "",
                "",
            ]
        ]
        record: dict[str, Any] = {
            "split": how,
            "cml": {
                "recall@50": cml["test"][50]["recall"],
                "recall@100": cml["test"][100]["recall"],
                "ndcg@50": cml["test"][50]["ndcg"],
                "seconds": cml["seconds"],
                "epochs": cml["epochs"],
                "best_epoch": cml["best_epoch"],
                "hyperparameters": cml["model"].hyperparameters(),
                "test_recall_curve": cml["curve"],
            },
        }
        for peer, result in peers.items():
            test = evaluation.compare(cml["test"][50], result["test"][50])
            rows.append(
                [
                    peer,
                    result["test"][50]["recall"],
                    result["test"][100]["recall"],
                    result["test"][50]["ndcg"],
                    f"{result['seconds']:.1f}",
                    str(result["params"]),
                    f"{test['wilcoxon_p']:.2g}",
                    f"{test['ttest_p']:.2g}",
                ]
            )
            record[peer] = {
                "recall@50": result["test"][50]["recall"],
                "recall@100": result["test"][100]["recall"],
                "params": result["params"],
                "seconds": result["seconds"],
                "cml_vs_peer": test,
            }
        text = [
            f"**{data.name}** ({how}; {split.train.nnz:,} train / {split.validation.nnz:,} validation / "
            f"{split.test.nnz:,} test pairs; {args.threads} threads)",
            table(
                [
                    "model",
                    "Recall@50",
                    "Recall@100",
                    "NDCG@50",
                    "fit seconds",
                    "settings (tuned on validation)",
                    "Wilcoxon p (CML vs)",
                    "t-test p",
                ],
                rows,
            ),
        ]
        wrmf = peers.get("WRMF (implicit ALS)")
        if cml["curve"] and wrmf is not None:
            bar = wrmf["test"][50]["recall"]
            reached = next((t for t, r in cml["curve"] if r >= bar), None)
            record["cml"]["seconds_to_wrmf_recall@50"] = reached
            text.append(
                f"CML passes WRMF's test recall@50 ({bar:.4f}) after "
                + (f"{reached:.1f} s of training" if reached is not None else "never (within this run)")
                + "; curve (seconds, test recall@50): "
                + ", ".join(f"({t:.0f}, {r:.3f})" for t, r in cml["curve"][:: max(1, len(cml["curve"]) // 12)])
            )
        sections += text
        data_out[name] = record
    report("quality", "python benches/quality.py " + " ".join(sys.argv[1:]), sections, data_out)


if __name__ == "__main__":
    main()
