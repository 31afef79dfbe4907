"""The ``cml-rs`` command: train, evaluate, recommend, and the demo (the README's main job).

Bad input (a missing file, an unknown data set, a malformed line, a value out
of range) ends with a one-line message and exit status 2. Anything else is a
bug of ours and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ._params import HYPERPARAMETERS

# The paper's Table 2 (CiteULike, r = 100), printed beside our numbers. The
# paper-era loader read each line's leading count of citeulike-t as an item,
# which inflated these figures, so they are a rough bar.
PAPER_CITEULIKE = {
    "WRMF": (0.2437, 0.3112),
    "BPR": (0.2489, 0.3296),
    "WARP": (0.1916, 0.2526),
    "CML": (0.2714, 0.3411),
}

EXIT_BAD_INPUT = 2


def _hyperparameter_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per hyper-parameter that has a flag, with the package default (no model is built)."""
    group = parser.add_argument_group("model (defaults are the tuned package defaults)")
    for param in HYPERPARAMETERS:
        if param.flag is None:
            continue
        group.add_argument(
            param.flag,
            dest=param.name,
            type=param.kind,
            default=param.default,
            choices=param.choices,
            metavar=None if param.choices else param.flag.lstrip("-").upper().replace("-", "_"),
            help=param.help if param.default is None else f"{param.help} (default: {param.default})",
        )
    group.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")


def _model_from_args(args: argparse.Namespace) -> Any:
    from .model import CollaborativeMetricLearning

    options = {p.name: getattr(args, p.name) for p in HYPERPARAMETERS if p.flag is not None}
    return CollaborativeMetricLearning(**options, device=args.device)


def _load_dataset(name: str, data_dir: str | None) -> Any:
    from . import datasets

    if data_dir is not None and name in datasets.DATASETS:
        return datasets.DATASETS[name](Path(data_dir) / name)
    return datasets.load(name)


def _split(dataset: Any, args: argparse.Namespace, seed: int) -> Any:
    from . import datasets

    if getattr(args, "split_file", None) and Path(args.split_file).exists():
        split = datasets.Split.load(args.split_file)
        if split.shape != dataset.user_items.shape:
            raise ValueError(
                f"{args.split_file} splits a {split.shape} matrix, but {dataset.name} is {dataset.user_items.shape}"
            )
        return split
    if getattr(args, "split", "paper") == "given":
        if dataset.given_split is None:
            raise ValueError(f"{dataset.name} ships no split; use --split paper")
        split = dataset.given_split
    else:
        split = datasets.split_paper(dataset.user_items, seed=seed)
    if getattr(args, "split_file", None):
        split.save(args.split_file)
    return split


def _metrics_table(model: Any, split: Any, ks: list[int], threads: int) -> tuple[str, dict[int, Any]]:
    from .evaluation import ranking_metrics_at_k

    results = {
        k: ranking_metrics_at_k(model, split.train, split.test, K=k, exclude=split.validation, num_threads=threads)
        for k in ks
    }
    lines = ["| K | recall | precision | NDCG | MAP | users |", "|---|---|---|---|---|---|"]
    for k, m in results.items():
        lines.append(
            f"| {k} | {m['recall']:.4f} | {m['precision']:.4f} | {m['ndcg']:.4f} | {m['map']:.4f} | {m['users']} |"
        )
    return "\n".join(lines), results


def _split_sizes(split: Any) -> str:
    return f"train {split.train.nnz:,}, validation {split.validation.nnz:,}, test {split.test.nnz:,}"


def _model_and_dataset(args: argparse.Namespace) -> tuple[Any, Any]:
    """The saved model and the data set it must have been trained on."""
    from .model import CollaborativeMetricLearning

    model = CollaborativeMetricLearning.load(args.model)
    dataset = _load_dataset(args.dataset, args.data_dir)
    if (model.n_users, model.n_items) != dataset.user_items.shape:
        raise ValueError(
            f"the model has {model.n_users} users x {model.n_items} items "
            f"but {dataset.name} has {dataset.user_items.shape}"
        )
    return model, dataset


def _feature_blocks(available: dict, names: list[str] | None, dataset: str, side: str) -> dict | None:
    """The named feature blocks of a data set ('all': every one), or None when none is asked for."""
    if not names:
        return None
    chosen = sorted(available) if names == ["all"] else names
    missing = [n for n in chosen if n not in available]
    if missing or not chosen:
        raise ValueError(f"{dataset} has no {side} feature block {missing or names}; it has {sorted(available)}")
    return {name: available[name] for name in chosen}


def command_train(args: argparse.Namespace) -> int:
    dataset = _load_dataset(args.dataset, args.data_dir)
    split = _split(dataset, args, seed=args.random_state)
    model = _model_from_args(args)
    features = _feature_blocks(dataset.item_features, args.features, dataset.name, "item")
    user_features = _feature_blocks(dataset.user_features, args.user_features, dataset.name, "user")
    validation = split.validation if split.validation.nnz else None
    # Under torchrun (WORLD_SIZE > 1) every rank trains its shard of one model;
    # rank 0 then holds the whole model, reports and saves it.
    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world_size > 1:
        from . import distributed

        if features is not None or user_features is not None:
            raise ValueError("CML+F (--features, --user-features) is not sharded yet; train it in one process")
        world = distributed.init(None if args.backend == "auto" else args.backend, args.timeout)
        start = time.perf_counter()
        distributed.fit(
            model,
            split.train,
            validation=validation,
            show_progress=not args.no_progress,
            checkpoint=args.checkpoint,
            checkpoint_every=args.checkpoint_every,
        )
        if world.rank != 0:
            return 0
        print(f"{dataset}\nsplit: {_split_sizes(split)} ({split.note})")
        print(f"trained on {world_size} ranks ({world.backend}) in {time.perf_counter() - start:.1f}s")
    else:
        detected = f" ({dataset.note})" if dataset.note else ""
        print(f"{dataset}{detected}\nsplit: {_split_sizes(split)} ({split.note})")
        start = time.perf_counter()
        model.fit(
            split.train,
            validation=validation,
            show_progress=not args.no_progress,
            item_features=features,
            user_features=user_features,
            checkpoint=args.checkpoint,
            checkpoint_every=args.checkpoint_every,
        )
    print(f"trained in {time.perf_counter() - start:.1f}s, best epoch {model.best_epoch_}")
    table, _ = _metrics_table(model, split, [50, 100], args.num_threads)
    print("test metrics:\n" + table)
    if args.out:
        model.save(args.out)
        print(f"model saved to {args.out}")
    return 0


def command_evaluate(args: argparse.Namespace) -> int:
    model, dataset = _model_and_dataset(args)
    split = _split(dataset, args, seed=args.seed)
    table, results = _metrics_table(model, split, args.k, args.threads)
    if args.json:
        print(json.dumps({str(k): dict(m) for k, m in results.items()}))
    else:
        print(table)
    return 0


def command_recommend(args: argparse.Namespace) -> int:
    model, dataset = _model_and_dataset(args)
    bad = [u for u in args.users if not 0 <= u < model.n_users]
    if bad:
        raise ValueError(f"--users {bad[0]} is not a user of the model: users are 0..{model.n_users - 1}")
    users = np.asarray(args.users, dtype=np.int64)
    ids, scores = model.recommend(
        users,
        dataset.user_items[users],
        N=args.n,
        filter_already_liked_items=not args.include_seen,
        backend=args.backend,
    )
    rows = []
    for user, user_ids, user_scores in zip(users, ids, scores):
        for rank, (item, score) in enumerate(zip(user_ids, user_scores), start=1):
            entry = {"user": int(user), "rank": rank, "item": int(item), "score": float(score)}
            if dataset.item_ids is not None:
                entry["item_id"] = str(dataset.item_ids[item])
            if dataset.item_titles is not None:
                entry["title"] = str(dataset.item_titles[item])
            elif dataset.item_labels is not None:
                entry["label"] = str(dataset.item_labels[item])
            rows.append(entry)
    if args.json:
        print(json.dumps(rows))
    else:
        extra = "title" if dataset.item_titles is not None else "label"
        print(f"| user | rank | item | score | {extra} |\n|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['user']} | {r['rank']} | {r['item']} | {r['score']:.4f} | {r.get(extra, '')} |")
    return 0


def _changed_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The hyper-parameters given on the command line with a value other than the default."""
    return {
        p.name: getattr(args, p.name)
        for p in HYPERPARAMETERS
        if p.flag is not None and getattr(args, p.name) != p.default and p.name not in ("num_threads", "random_state")
    }


def command_tune(args: argparse.Namespace) -> int:
    """Successive-halving search on the validation part, then test metrics of the best model."""
    from .tuning import SEARCH_SPACE, tune

    dataset = _load_dataset(args.dataset, args.data_dir)
    split = _split(dataset, args, seed=args.random_state)
    if not split.validation.nnz:
        raise ValueError(f"{dataset.name}'s split has no validation part to tune on; use --split paper")
    print(f"{dataset}\nsplit: {_split_sizes(split)} ({split.note})")
    fixed = _changed_settings(args)
    space = {name: spec for name, spec in SEARCH_SPACE.items() if name not in fixed}
    if not space:
        raise ValueError("every searched setting is fixed on the command line; there is nothing to tune")
    with warnings.catch_warnings():  # said below, in the command's own words
        warnings.filterwarnings("ignore", message="tune: the budget ran out", category=UserWarning)
        result = tune(
            split.train,
            split.validation,
            budget_seconds=args.budget,
            seed=args.random_state,
            num_threads=args.num_threads,
            configurations=args.configurations,
            space=space,
            show_progress=not args.no_progress,
            device=args.device,
            **fixed,
        )
    print(f"searched for {result.seconds:.0f}s; trials (best validation recall first):\n{result.table()}")
    if not result.converged:
        print("the budget ended the best model's training before early stopping; a larger --budget may score higher")
    table, _ = _metrics_table(result.model, split, [50, 100], args.num_threads)
    print("test metrics of the best model:\n" + table)
    if args.out:
        result.model.save(args.out)
        print(f"model saved to {args.out}")
    return 0


def command_compare(args: argparse.Namespace) -> int:
    """CML against dependency-free baselines tuned on validation, on one split, with paired p-values."""
    from . import baselines
    from .evaluation import compare, ranking_metrics_at_k

    dataset = _load_dataset(args.dataset, args.data_dir)
    split = _split(dataset, args, seed=args.random_state)
    print(f"{dataset}\nsplit: {_split_sizes(split)} ({split.note})")
    validation = split.validation if split.validation.nnz else None
    threads = args.num_threads

    def test(model: Any) -> Any:
        return ranking_metrics_at_k(model, split.train, split.test, K=args.k, exclude=validation, num_threads=threads)

    def tuned(name: str, make: Any, grid: list[Any]) -> tuple[str, Any, str]:
        """The grid point with the best validation recall (the first without validation)."""
        best: tuple[float, Any, Any] | None = None
        for value in grid if validation is not None else grid[:1]:
            model = make(value).fit(split.train)
            score = 0.0
            if validation is not None:
                score = ranking_metrics_at_k(model, split.train, validation, K=args.k, num_threads=threads)["recall"]
            if best is None or score > best[0]:
                best = (score, model, value)
        assert best is not None
        return name, best[1], f"{best[2]} (grid {grid})"

    start = time.perf_counter()
    cml = _model_from_args(args)
    cml.fit(split.train, validation=validation, show_progress=not args.no_progress)
    print(f"CML trained in {time.perf_counter() - start:.0f}s")
    changed = _changed_settings(args)
    setting = ", ".join(f"{k}={v}" for k, v in changed.items()) or "defaults"
    rows = [("CML", cml, f"{setting}; {len(cml.history_)} epochs")]
    rows.append(("popularity", baselines.Popularity().fit(split.train), ""))
    if dataset.n_items <= args.ease_max_items:
        ease_device = None if args.device == "cpu" else args.device  # torch on a GPU; LAPACK on the CPU
        rows.append(tuned("EASE", lambda lam: baselines.EASE(lam, device=ease_device), [50.0, 200.0, 800.0, 3200.0]))
    else:
        print(f"EASE skipped: {dataset.n_items} items exceed --ease-max-items {args.ease_max_items}")
    rows.append(tuned("RP3beta", lambda b: baselines.RP3beta(alpha=1.0, beta=b, top_k=200), [0.0, 0.3, 0.6]))
    reference = test(cml)
    lines = [f"| model | Recall@{args.k} | NDCG@{args.k} | setting | vs CML: Wilcoxon p |", "|---|---|---|---|---|"]
    for name, model, note in rows:
        result = reference if model is cml else test(model)
        p = "" if model is cml else f"{compare(reference, result)['wilcoxon_p']:.2g}"
        lines.append(f"| {name} | {result['recall']:.4f} | {result['ndcg']:.4f} | {note} | {p} |")
    print("\n".join(lines))
    if validation is None:
        print("(no validation part: each baseline ran with the first setting of its grid)")
    return 0


def command_demo(args: argparse.Namespace) -> int:
    """Train on citeulike-t (synthetic data when it is absent), evaluate, retrieve, plot."""
    from . import datasets
    from .lsh import LshIndex
    from .model import CollaborativeMetricLearning
    from .plots import plot_item_embedding

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        dataset = _load_dataset("citeulike-t", args.data_dir)
        print(f"data: {dataset}")
    except FileNotFoundError as missing:
        print(f"citeulike-t not found ({missing}); using a synthetic data set instead (set CML_DATA to use real data)")
        dataset = datasets.synthetic(n_users=8000, n_items=20000, n_interactions=140_000, n_clusters=40, seed=args.seed)
        print(f"data: {dataset}")
    split = datasets.split_paper(dataset.user_items, seed=args.seed)
    split.save(out / "split.npz")
    print(f"split (seed {args.seed}): {_split_sizes(split)}")

    model = CollaborativeMetricLearning(epochs=args.epochs, num_threads=args.threads, random_state=args.seed)
    start = time.perf_counter()
    model.fit(split.train, validation=split.validation, show_progress=not args.no_progress)
    print(f"trained in {time.perf_counter() - start:.1f}s (best epoch {model.best_epoch_})")
    model.save(out / "model.npz")

    table, results = _metrics_table(model, split, [50, 100], args.threads)
    print("\ntest metrics (all items ranked; train and validation items excluded):\n" + table)
    if dataset.name == "citeulike-t":
        print("\npaper, Table 2 (CiteULike; its loader counted each line's length as an item, inflating recall):")
        print("| model | Recall@50 | Recall@100 |\n|---|---|---|")
        for name, (r50, r100) in PAPER_CITEULIKE.items():
            print(f"| {name} (paper) | {r50:.4f} | {r100:.4f} |")
        print(f"| CML (cml-rs, this run) | {results[50]['recall']:.4f} | {results[100]['recall']:.4f} |")

    # Retrieval: exact versus LSH for the first users with test items.
    users = np.flatnonzero(np.diff(split.test.indptr))[:3]
    index = LshIndex(model.factors, seed=args.seed)
    index.add_items(model.item_factors)
    choice = index.tune(model.user_factors[:: max(1, model.n_users // 500)], k=10)
    exact_ids, _ = model.recommend(users, split.train[users], N=5)
    lsh_ids, _ = model.recommend(users, split.train[users], N=5, backend=index)
    print(f"\ntop-5 recommendations (LSH tuned to {choice['n_probes']} probes, recall@10 {choice['recall']:.2f}):")
    for user, exact_row, lsh_row in zip(users, exact_ids, lsh_ids):
        held_out = set(split.test.indices[split.test.indptr[user] : split.test.indptr[user + 1]].tolist())
        shown = ", ".join(f"{i}{'*' if i in held_out else ''} ({dataset.item_labels[i]})" for i in exact_row)
        print(f"  user {user}: {shown}")
        print(f"    LSH agrees on {len(set(exact_row) & set(lsh_row))}/5")
    print("  (* = in the user's held-out test set)")

    if not args.no_plot:
        path = out / "item_embedding.png"
        plot_item_embedding(
            model,
            dataset.item_labels,
            path,
            max_items=args.plot_items,
            seed=args.seed,
            title=f"{dataset.name}: items coloured by {dataset.item_label_kind}",
        )
        print(f"\nembedding plot: {path}")
    print(f"model, split: {out / 'model.npz'}, {out / 'split.npz'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cml-rs",
        description="Collaborative Metric Learning with a Rust core: train, evaluate, recommend.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def data_options(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--data-dir", help="folder holding the data set folders (default: $CML_DATA, then ../shared/data)"
        )
        p.add_argument(
            "--split",
            choices=("paper", "given"),
            default="paper",
            help="60/20/20 per-user split, or the one the data ships with",
        )
        p.add_argument("--split-file", help="load the split from this file if it exists, else save it there")

    train = sub.add_parser("train", help="train CML on a data set and report test metrics")
    train.add_argument(
        "dataset",
        help="citeulike-t, ml-100k, ml-1m-implicit, ml-latest-small, gowalla, synthetic, or a CSV/TSV file",
    )
    train.add_argument("--out", help="save the trained model here (.npz)")
    train.add_argument(
        "--features", nargs="+", help="train CML+F with these item feature blocks (e.g. tags words), or 'all'"
    )
    train.add_argument("--user-features", nargs="+", help="user feature blocks (e.g. age gender occupation), or 'all'")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument(
        "--checkpoint",
        help="write the fit's state here as it goes; if the file exists, resume from it (same data and settings)",
    )
    train.add_argument("--checkpoint-every", type=int, default=1, help="epochs between checkpoints (default: 1)")
    train.add_argument(
        "--backend",
        choices=("auto", "gloo", "nccl"),
        default="auto",
        help="under torchrun: torch.distributed backend (auto: nccl with GPUs, else gloo)",
    )
    train.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="under torchrun: seconds a rank waits for the others before failing (default 300)",
    )
    data_options(train)
    _hyperparameter_arguments(train)
    train.set_defaults(handler=command_train)

    evaluate = sub.add_parser("evaluate", help="metrics of a saved model on a data set's test split")
    evaluate.add_argument("model", help="a model file written by train")
    evaluate.add_argument("dataset")
    evaluate.add_argument("-k", type=int, nargs="+", default=[50, 100], help="cut-offs")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the split")
    evaluate.add_argument("--threads", type=int, default=0)
    evaluate.add_argument("--json", action="store_true", help="print JSON instead of a table")
    data_options(evaluate)
    evaluate.set_defaults(handler=command_evaluate)

    recommend = sub.add_parser("recommend", help="top-N items for some users")
    recommend.add_argument("model")
    recommend.add_argument("dataset", help="the data set the model was trained on (for seen items and names)")
    recommend.add_argument("--users", type=int, nargs="+", required=True, help="user indices")
    recommend.add_argument("-n", type=int, default=10, help="items per user")
    recommend.add_argument("--backend", choices=("exact", "lsh", "hnsw"), default="exact")
    recommend.add_argument("--include-seen", action="store_true", help="do not filter items the user already has")
    recommend.add_argument("--json", action="store_true")
    recommend.add_argument("--data-dir")
    recommend.set_defaults(handler=command_recommend)

    tune_parser = sub.add_parser(
        "tune",
        help="search CML's settings on the validation split within a time budget",
        description="Successive halving over the margin, learning rate, negatives and covariance weight "
        "(any of them given below is fixed instead), judged by validation recall; then test metrics.",
    )
    tune_parser.add_argument("dataset")
    tune_parser.add_argument("--budget", type=float, default=600.0, help="seconds the search may take (default 600)")
    tune_parser.add_argument(
        "--configurations", type=int, help="configurations to start with (default: as many as the budget affords)"
    )
    tune_parser.add_argument("--out", help="save the best model here (.npz)")
    tune_parser.add_argument("--no-progress", action="store_true")
    data_options(tune_parser)
    _hyperparameter_arguments(tune_parser)
    tune_parser.set_defaults(handler=command_tune)

    compare_parser = sub.add_parser(
        "compare",
        help="CML against popularity, EASE and RP3beta (tuned on validation) on one split, with p-values",
    )
    compare_parser.add_argument("dataset")
    compare_parser.add_argument("-k", type=int, default=50, help="cut-off of the metrics (default 50)")
    compare_parser.add_argument(
        "--ease-max-items", type=int, default=30000, help="skip EASE above this many items (it is dense in them)"
    )
    compare_parser.add_argument("--no-progress", action="store_true")
    data_options(compare_parser)
    _hyperparameter_arguments(compare_parser)
    compare_parser.set_defaults(handler=command_compare)

    demo = sub.add_parser("demo", help="the main job: train on citeulike-t, evaluate, retrieve, plot")
    demo.add_argument("--out", default="demo_out", help="output folder")
    demo.add_argument("--epochs", type=int, default=200, help="upper bound on epochs (early stopping decides)")
    demo.add_argument("--threads", type=int, default=0)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--plot-items", type=int, default=3000, help="items in the t-SNE plot")
    demo.add_argument("--no-plot", action="store_true")
    demo.add_argument("--no-progress", action="store_true")
    demo.add_argument("--data-dir")
    demo.set_defaults(handler=command_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except (ValueError, OSError, FloatingPointError) as error:
        # What bad input raises: a value out of range or malformed (ValueError), a
        # file that cannot be read (OSError), a fit that diverged (FloatingPointError).
        print(f"cml-rs: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("cml-rs: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as error:
        from .distributed import DistributedError  # torch is loaded by then

        if not isinstance(error, DistributedError):  # a lost rank of a distributed fit
            raise
        print(f"cml-rs: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
