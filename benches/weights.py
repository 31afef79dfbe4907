"""Confidence weights: does drawing positives in proportion to log(1 + value) help?

ml-latest-small with every rating as an interaction and its stars (0.5-5) as the
value, split per user (60/20/20, ``split_paper``, values kept). CML is fitted on
the same split with the values (the default) and with ``binary=True``, each
early-stopped on the liked (rating >= 4) validation items, and scored on the
liked test items, train and validation items excluded: does a model that draws
highly rated pairs more often recommend what users like? Paired Wilcoxon test
on per-user recall@50, per split seed, and the mean over seeds.

Fold-in, second: ``split_fold_in_users`` holds out 20% of the users (values kept);
CML is fitted on the others (defaults, a fixed 60 epochs: there is no validation
part), and each held-out user is folded in from half of their ratings, once with
the stars (drawn in proportion to log(1 + value), as the fit draws) and once
with them dropped (every rating drawn alike, the fold-in before it read the
values). Scored on the liked items of the other half, the fold half excluded.

    python benches/weights.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import scipy.sparse as sp

import cml_rs
from cml_rs import datasets, evaluation

sys.path.insert(0, str(Path(__file__).parent))
from _common import recall_of_lists, report, table

LIKED = 4.0


def liked(matrix: sp.csr_matrix) -> sp.csr_matrix:
    """The entries rated at least LIKED, as a binary matrix of the same shape."""
    out = (matrix >= LIKED).astype(np.float32).tocsr()
    out.eliminate_zeros()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    folder = Path(os.environ.get("CML_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    ratings = folder / "ml-latest-small" / "ratings.csv"
    if not ratings.exists():
        raise SystemExit(f"{ratings} is missing; set CML_DATA to the folder that holds ml-latest-small")
    data = datasets.load_interactions(ratings, value_column="rating")
    rows, raw = [], {}
    for seed in args.seeds:
        split = datasets.split_paper(data.user_items, seed=seed)
        validation, test = liked(split.validation), liked(split.test)
        scored = {}
        for name, binary in (("weights", False), ("binary", True)):
            model = cml_rs.CML(binary=binary, num_threads=args.threads, random_state=seed)
            model.fit(split.train, validation=validation, show_progress=False)
            scored[name] = evaluation.ranking_metrics_at_k(
                model, split.train, test, K=50, exclude=split.validation, num_threads=args.threads
            )
            print(f"seed {seed} {name}: test recall@50 {scored[name]['recall']:.4f}", flush=True)
        paired = evaluation.compare(scored["weights"], scored["binary"])
        raw[seed] = {name: scored[name]["recall"] for name in scored} | paired
        rows.append(
            [
                seed,
                f"{scored['weights']['recall']:.4f}",
                f"{scored['binary']['recall']:.4f}",
                f"{paired['mean_difference']:+.4f}",
                f"{paired['wilcoxon_p']:.2g}",
            ]
        )
    means = {name: np.mean([raw[s][name] for s in args.seeds]) for name in ("weights", "binary")}
    rows.append(["mean", f"{means['weights']:.4f}", f"{means['binary']:.4f}", "", ""])
    header = ["split seed", "weights (default)", "binary=True", "mean difference", "Wilcoxon p"]
    section = (
        f"ml-latest-small, {data.user_items.nnz:,} ratings as interactions (values: stars), liked = rating >= "
        f"{LIKED:g}; {args.threads} threads\n\n" + table(header, rows)
    )
    fold_in_rows, fold_in_raw = fold_in_with_values(data.user_items, args.seeds, args.threads)
    fold_in_section = (
        f"Fold-in of {FOLD_IN_FRACTION:.0%} held-out users, recall@50 on their liked test items\n\n"
        + table(
            ["split seed", "users", "with the values", "values dropped", "mean difference", "Wilcoxon p"], fold_in_rows
        )
    )
    report(
        "weights",
        "python benches/weights.py " + " ".join(sys.argv[1:]),
        [section, fold_in_section],
        {"seeds": raw, "fold_in": fold_in_raw},
    )


FOLD_IN_FRACTION = 0.2


def fold_in_with_values(user_items: sp.csr_matrix, seeds: list[int], threads: int) -> tuple[list, dict]:
    """Held-out users folded in from half of their ratings with and without the values, each
    scored by per-user recall@50 on the liked items of the other half."""
    rows, raw = [], {}
    for seed in seeds:
        split = datasets.split_fold_in_users(user_items, fraction=FOLD_IN_FRACTION, seed=seed)
        with warnings.catch_warnings():  # the held-out users' rows are empty in train, by design
            warnings.filterwarnings("ignore", message=".*users have no interactions")
            model = cml_rs.CML(epochs=60, num_threads=threads, random_state=seed).fit(split.train, show_progress=False)
        truth = liked(split.test)
        scored = np.diff(truth.indptr) > 0
        recalls = {}
        for name, fold in (("values", split.fold), ("dropped", split.fold.astype(bool).astype(np.float32))):
            ids, _ = model.recommend(split.users, fold, N=50, recalculate_user=True)
            recalls[name] = recall_of_lists(ids[scored], truth[scored], 50)
        difference = recalls["values"] - recalls["dropped"]
        p_value = evaluation.paired_pvalues(recalls["values"], recalls["dropped"])["wilcoxon_p"]
        paired = {"mean_difference": float(difference.mean()), "wilcoxon_p": p_value}
        raw[seed] = {"users": int(scored.sum()), **{n: float(r.mean()) for n, r in recalls.items()}, **paired}
        rows.append(
            [
                seed,
                int(scored.sum()),
                f"{recalls['values'].mean():.4f}",
                f"{recalls['dropped'].mean():.4f}",
                f"{paired['mean_difference']:+.4f}",
                f"{paired['wilcoxon_p']:.2g}",
            ]
        )
        print(f"fold-in seed {seed}: {rows[-1]}", flush=True)
    rows.append(["mean", "", *(f"{np.mean([raw[s][n] for s in seeds]):.4f}" for n in ("values", "dropped")), "", ""])
    return rows, raw


if __name__ == "__main__":
    main()
