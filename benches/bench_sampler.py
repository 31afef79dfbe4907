"""WARP sampler throughput (issue 2, section 7): cml_rs.WarpSampler against a
per-draw Python sampler with the reference semantics and the best vectorised
numpy sampler, side by side in one run, on citeulike-t's training split and a
synthetic 10M-interaction matrix. Throughput counts triples (user, positive,
negative): pairs x U, with U = 20.

Run: python benches/bench_sampler.py [--threads 2] [--skip-large]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import scipy.sparse as sp

import cml_rs
from cml_rs import datasets

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from _common import report, table, timed

U = 20
BATCH = 10_000


def reference_sampler(matrix: sp.csr_matrix, max_pairs: int, seed: int) -> int:
    """The reference (CollMetric) logic: vectorised draws, then a per-draw Python
    membership check that redraws positives one at a time. Returns pairs sampled."""
    rng = np.random.RandomState(seed)
    coo = matrix.tocoo()
    pairs = np.stack([coo.row, coo.col], axis=1)
    positive_sets = [
        set(matrix.indices[matrix.indptr[u] : matrix.indptr[u + 1]].tolist()) for u in range(matrix.shape[0])
    ]
    n_items = matrix.shape[1]
    rng.shuffle(pairs)
    done = 0
    for start in range(0, min(len(pairs), max_pairs), BATCH):
        batch = pairs[start : start + BATCH]
        negatives = rng.randint(0, n_items, size=(len(batch), U))
        for i, (user, _) in enumerate(batch):
            seen = positive_sets[user]
            for j in range(U):
                neg = negatives[i, j]
                while neg in seen:
                    neg = rng.randint(0, n_items)
                    negatives[i, j] = neg
        done += len(batch)
    return done


def numpy_sampler(matrix: sp.csr_matrix, seed: int) -> int:
    """Vectorised: one permutation per epoch; each batch draws B x U at once and
    redraws only the draws that hit a positive, found by searchsorted on the
    sorted (user * J + item) keys of all training pairs."""
    rng = np.random.default_rng(seed)
    n_items = matrix.shape[1]
    users_of_pair = np.repeat(np.arange(matrix.shape[0], dtype=np.int64), np.diff(matrix.indptr))
    keys = users_of_pair * n_items + matrix.indices  # sorted: CSR rows, sorted indices
    order = rng.permutation(matrix.nnz)
    for start in range(0, matrix.nnz, BATCH):
        chosen = order[start : start + BATCH]
        users = users_of_pair[chosen]
        _positives = matrix.indices[chosen]
        negatives = rng.integers(0, n_items, size=(len(chosen), U))
        owner = np.broadcast_to(users[:, None] * n_items, negatives.shape)
        redraw = np.ones(negatives.shape, dtype=bool)
        while True:
            flat_keys = owner[redraw] + negatives[redraw]
            where = np.searchsorted(keys, flat_keys).clip(0, len(keys) - 1)
            hit = keys[where] == flat_keys
            if not hit.any():
                break
            positions = np.flatnonzero(redraw)[hit]
            redraw = np.zeros(negatives.shape, dtype=bool)
            redraw.flat[positions] = True
            negatives.flat[positions] = rng.integers(0, n_items, size=len(positions))
    return matrix.nnz


def cml_rs_sampler(matrix: sp.csr_matrix, seed: int, threads: int, epochs: int) -> int:
    sampler = cml_rs.WarpSampler(matrix, batch_size=BATCH, n_negatives=U, seed=seed, num_threads=threads)
    done = 0
    for _ in range(epochs):
        for users, _, _ in sampler:
            done += len(users)
    return done


def rate(fn) -> tuple[float, float]:
    pairs, elapsed = timed(fn)
    return pairs * U / elapsed, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-large", action="store_true", help="only citeulike-t")
    args = parser.parse_args()
    # No sampler here calls BLAS, but OpenBLAS's idle threads spin for a while after
    # scipy uses them (loading, splitting) and would steal the cores being measured.
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)

    cases = []
    try:
        citeulike = datasets.load_citeulike()
        cases.append(
            (
                "citeulike-t train (paper split, seed 0)",
                datasets.split_paper(citeulike.user_items, 0).train,
                20,
            )
        )
    except FileNotFoundError as error:
        print(f"skipping citeulike-t: {error}")
    if not args.skip_large:
        large = datasets.synthetic(1_000_000, 300_000, 10_000_000, seed=0).user_items
        cases.append(("synthetic 1M x 300k", large, 1))

    rows, data = [], {}
    for name, matrix, epochs in cases:
        reference_pairs = min(matrix.nnz, 100_000)
        ref_rate, ref_time = rate(lambda m=matrix, p=reference_pairs: reference_sampler(m, p, 0))
        np_rate, np_time = rate(lambda m=matrix, e=epochs: sum(numpy_sampler(m, s) for s in range(e)))
        rust_rate, rust_time = rate(lambda m=matrix, e=epochs: cml_rs_sampler(m, 0, args.threads, e))
        one_rate, _ = rate(lambda m=matrix, e=epochs: cml_rs_sampler(m, 0, 1, e))
        label = f"{name}: {matrix.shape[0]:,} users, {matrix.shape[1]:,} items, {matrix.nnz:,} pairs"
        rows += [
            [
                label,
                f"per-draw Python (reference logic, first {reference_pairs:,} pairs)",
                ref_rate / 1e6,
                1.0,
                "",
            ],
            [label, f"vectorised numpy ({epochs} epoch(s))", np_rate / 1e6, np_rate / ref_rate, ""],
            [
                label,
                f"cml_rs.WarpSampler, 1 thread ({epochs} epoch(s))",
                one_rate / 1e6,
                one_rate / ref_rate,
                f"{one_rate / np_rate:.1f}x",
            ],
            [
                label,
                f"cml_rs.WarpSampler, {args.threads} threads ({epochs} epoch(s))",
                rust_rate / 1e6,
                rust_rate / ref_rate,
                f"{rust_rate / np_rate:.1f}x",
            ],
        ]
        data[name] = {
            "pairs": int(matrix.nnz),
            "reference_triples_per_s": ref_rate,
            "numpy_triples_per_s": np_rate,
            "cml_rs_1t_triples_per_s": one_rate,
            f"cml_rs_{args.threads}t_triples_per_s": rust_rate,
            "speedup_vs_reference": rust_rate / ref_rate,
            "speedup_vs_numpy": rust_rate / np_rate,
            "seconds": {"reference": ref_time, "numpy": np_time, "cml_rs": rust_time},
        }
    section = table(["data", "sampler", "M triples/s", "x reference", "x numpy"], rows)
    targets = "Targets (2 threads): >= 50x the per-draw reference, >= 5x vectorised numpy."
    report("sampler", f"python benches/bench_sampler.py --threads {args.threads}", [section, targets], data)


if __name__ == "__main__":
    main()
