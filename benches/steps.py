"""Cost of a training step and the quality it buys: the covariance modes side by side.

For each data set, CML is trained with each ``covariance_rows`` mode ("all":
every row every step, the paper; "batch": the rows the batch moves;
"sampled": a uniform sample of rows), everything else at the package
defaults, early-stopped on validation. Reported: seconds per epoch (training
only, evaluation excluded), epochs, test Recall@50/100 (and Recall@20 /
NDCG@20 on Gowalla, whose literature uses them), and the paired Wilcoxon test
of each mode against "all" on per-user recall@50.

    python benches/steps.py --datasets citeulike-t ml-1m-implicit gowalla --threads 2
    python benches/steps.py --datasets gowalla --modes sampled --rounds 1   # fit one mode only

Fits are stored in benches/out/steps and reused; a mode fitted earlier is reported
even when not named in --modes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

import cml_rs
from cml_rs import datasets, evaluation

sys.path.insert(0, str(Path(__file__).parent))
from _common import OUT_DIR, report, table

MODES = ("all", "batch", "sampled")


def split_of(name: str, seed: int) -> datasets.Split:
    data = datasets.load(name)
    return data.given_split if name == "gowalla" else datasets.split_paper(data.user_items, seed=seed)


def stored(name: str, mode: str, seed: int) -> Path | None:
    path = OUT_DIR / "steps" / f"{name}__seed{seed}__{mode}.json"
    return path if path.exists() else None


def run(name: str, mode: str, split: datasets.Split, threads: int, seed: int) -> dict:
    path = OUT_DIR / "steps" / f"{name}__seed{seed}__{mode}.json"
    if path.exists():
        record = json.loads(path.read_text())
        with np.load(path.with_suffix(".npz")) as arrays:
            record["per_user"] = arrays["recall@50"]
        return record
    model = cml_rs.CML(covariance_rows=mode, num_threads=threads, random_state=seed)
    epoch_seconds: list[float] = []
    last = [time.perf_counter()]

    def clock(epoch, elapsed, loss, metrics):
        epoch_seconds.append(time.perf_counter() - last[0])
        last[0] = time.perf_counter()

    start = time.perf_counter()
    model.fit(split.train, validation=split.validation, show_progress=False, callback=clock)
    seconds = time.perf_counter() - start
    # The callback's intervals include each epoch's evaluation; time one epoch alone too.
    trainer_epoch = min(epoch_seconds)
    test = {}
    per_user = None
    for k in (20, 50, 100):
        m = evaluation.ranking_metrics_at_k(model, split.train, split.test, K=k, exclude=split.validation)
        test[f"recall@{k}"], test[f"ndcg@{k}"] = m["recall"], m["ndcg"]
        if k == 50:
            per_user = m
    record = {
        "dataset": name,
        "mode": mode,
        "seed": seed,
        "fit_seconds": seconds,
        "epochs": len(model.history_),
        "best_epoch": model.best_epoch_,
        "fastest_epoch_seconds": trainer_epoch,
        "median_epoch_seconds": float(np.median(epoch_seconds)),
        "test": test,
        "users": per_user.per_user["user"].tolist(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path.with_suffix(".npz"), **{"recall@50": per_user.per_user["recall"]})
    path.write_text(json.dumps(record, indent=1))
    record["per_user"] = per_user.per_user["recall"]
    return record


def time_epochs(name: str, split: datasets.Split, threads: int, epochs: int = 3, rounds: int = 3) -> dict:
    """Seconds per training epoch of each mode, measured interleaved (all, batch, sampled,
    all, ...) so that whatever else the machine does weighs on every mode alike."""
    from cml_rs.training import Trainer

    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(rounds):
        for mode in MODES:
            model = cml_rs.CML(covariance_rows=mode, num_threads=threads)
            model._build(*split.train.shape, None, None)
            trainer = Trainer(model, split.train, None)
            for epoch in range(epochs):
                start = time.perf_counter()
                trainer.run_epoch(epoch)
                times[mode].append(time.perf_counter() - start)
    return {mode: float(np.median(t)) for mode, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["citeulike-t"])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timing-only", action="store_true", help="only the interleaved epoch timing")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (3 epochs per mode each)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    sections, raw = [], {}
    for name in args.datasets:
        split = split_of(name, args.seed)
        print(f"== {name}: {split.train.nnz:,} train pairs", flush=True)
        timing = time_epochs(name, split, args.threads, rounds=args.rounds)
        print(f"  seconds per epoch (interleaved): {timing}", flush=True)
        sections.append(
            f"**{name}**: training seconds per epoch, median of {3 * args.rounds} epochs per mode run interleaved: "
            + ", ".join(f"{m} {t:.2f} s ({timing['all'] / t:.1f}x)" for m, t in timing.items())
        )
        raw.setdefault(name, {})["epoch_seconds"] = timing
        if args.timing_only:
            continue
        results = {}
        # The modes asked for are fitted; those fitted by an earlier run are reported too.
        for mode in (m for m in MODES if m in args.modes or stored(name, m, args.seed)):
            results[mode] = run(name, mode, split, args.threads, args.seed)
            r = results[mode]
            print(f"  {mode}: R@50 {r['test']['recall@50']:.4f}, {r['median_epoch_seconds']:.2f} s/epoch", flush=True)
        rows = []
        base = results.get("all")
        for mode, r in results.items():
            p = ""
            if base is not None and mode != "all":
                p = f"{evaluation.paired_pvalues(r['per_user'], base['per_user'])['wilcoxon_p']:.2g}"
            speed = f"{base['median_epoch_seconds'] / r['median_epoch_seconds']:.1f}x" if base else ""
            rows.append(
                [
                    mode,
                    f"{r['median_epoch_seconds']:.2f}",
                    speed,
                    f"{r['epochs']} ({r['best_epoch']})",
                    f"{r['test']['recall@50']:.4f}",
                    f"{r['test']['recall@100']:.4f}",
                    f"{r['test']['recall@20']:.4f}",
                    f"{r['test']['ndcg@20']:.4f}",
                    p,
                ]
            )
        sections += [
            f"**{name}** (seed {args.seed}; {args.threads} threads; s/epoch here is the median over the fit, "
            f"a validation check every second epoch included, measured while other jobs shared the machine: "
            f"the interleaved timing above is the one to read)",
            table(
                [
                    "covariance_rows",
                    "s/epoch",
                    "speed-up",
                    "epochs (best)",
                    "R@50",
                    "R@100",
                    "R@20",
                    "NDCG@20",
                    "p vs all",
                ],
                rows,
            ),
        ]
        raw[name].update(
            {m: {k: v for k, v in r.items() if k not in ("per_user", "users")} for m, r in results.items()}
        )
    report("steps", "python benches/steps.py " + " ".join(sys.argv[1:]), sections, raw)


if __name__ == "__main__":
    main()
