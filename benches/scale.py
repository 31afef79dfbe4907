"""A million users on one box: seconds per epoch, seconds per step of each covariance
mode, and peak RSS of a whole fit (evaluation included) on the synthetic
1M users x 300k items x 10M interactions of ``cml_rs.datasets.synthetic``.

    python benches/scale.py --epochs 4

Each measurement runs in a fresh process, so its peak RSS (getrusage) is its own:
1. the step cost of every ``covariance_rows`` mode, 30 steps each after 5 warm-up
   steps, interleaved, as a ratio to the default;
2. a fit with the defaults: ``--epochs`` epochs, validation recall every second
   epoch (on ``eval_users`` users), then test metrics on 10,000 users; its epoch
   seconds, evaluation seconds and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _common import OUT_DIR, report, table

SHAPE = dict(n_users=1_000_000, n_items=300_000, n_interactions=10_000_000, n_clusters=500, seed=0)


def data():
    from cml_rs import datasets

    start = time.perf_counter()
    matrix = datasets.synthetic(**SHAPE).user_items
    split = datasets.split_paper(matrix, seed=0)
    return split, time.perf_counter() - start


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def step_costs(threads: int) -> dict:
    """Seconds per training step of each covariance mode, interleaved in rounds."""
    import cml_rs
    from cml_rs.training import Trainer, torch_threads

    split, _ = data()
    trainers = {}
    for mode in ("all", "batch", "sampled"):
        model = cml_rs.CML(covariance_rows=mode, num_threads=threads)
        model._build(*split.train.shape, None, None)
        trainers[mode] = Trainer(model, split.train, None)
    streams = {mode: iter(t.sampler) for mode, t in trainers.items()}
    times: dict[str, list[float]] = {mode: [] for mode in trainers}
    with torch_threads(threads):
        for round_ in range(7):
            for mode, trainer in trainers.items():
                batches = [next(streams[mode]) for _ in range(5)]
                start = time.perf_counter()
                for step, batch in enumerate(batches):
                    trainer.step(batch, 0, round_ * 5 + step)
                if round_ > 0:  # the first round warms up
                    times[mode].append((time.perf_counter() - start) / len(batches))
    steps_per_epoch = trainers["all"].sampler.n_batches
    return {
        "seconds_per_step": {mode: float(np.median(t)) for mode, t in times.items()},
        "steps_per_epoch": steps_per_epoch,
        "peak_rss_bytes": peak_rss(),
    }


def whole_fit(epochs: int, threads: int) -> dict:
    """A fit with the defaults and validation, then test metrics on 10,000 users."""
    import cml_rs
    from cml_rs import evaluation

    split, data_seconds = data()
    model = cml_rs.CML(epochs=epochs, num_threads=threads)
    marks = [time.perf_counter()]

    def clock(epoch: int, elapsed: float) -> None:
        marks.append(time.perf_counter())

    start = time.perf_counter()
    model.fit(split.train, validation=split.validation, show_progress=False, callback=clock)
    fit_seconds = time.perf_counter() - start
    users = np.flatnonzero(np.diff(split.test.indptr))
    users = np.sort(np.random.default_rng(0).choice(users, min(10_000, len(users)), replace=False))
    start = time.perf_counter()
    test = evaluation.ranking_metrics_at_k(
        model, split.train, split.test, K=50, exclude=split.validation, users=users, num_threads=threads
    )
    return {
        "data_seconds": data_seconds,
        "train_pairs": int(split.train.nnz),
        "epoch_seconds": list(np.diff(marks)),
        "fit_seconds": fit_seconds,
        "eval_users": model.eval_users,
        "test_seconds": time.perf_counter() - start,
        "test_recall@50": test["recall"],
        "history": model.history_,
        "peak_rss_bytes": peak_rss(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--run", choices=("steps", "fit"), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        result = step_costs(args.threads) if args.run == "steps" else whole_fit(args.epochs, args.threads)
        Path(args.out).write_text(json.dumps(result))
        return
    OUT_DIR.mkdir(exist_ok=True)
    results = {}
    for run in ("steps", "fit"):
        out = OUT_DIR / f"scale-{run}.json"
        command = [sys.executable, __file__, "--run", run, "--out", str(out)]
        command += ["--epochs", str(args.epochs), "--threads", str(args.threads)]
        print(f"== {run}", flush=True)
        subprocess.run(command, check=True)
        results[run] = json.loads(out.read_text())
    steps, fit = results["steps"], results["fit"]
    per_step = steps["seconds_per_step"]
    from cml_rs._params import defaults

    default = defaults()["covariance_rows"]
    rows = [
        [
            mode,
            f"{seconds * 1e3:,.1f} ms",
            f"{seconds * steps['steps_per_epoch']:,.0f} s",
            f"{per_step[default] / seconds:.3g}",
        ]
        for mode, seconds in per_step.items()
    ]
    gib = 2**30
    validation_recalls = ", ".join(f"{e['recall@50']:.4f}" for e in fit["history"] if "recall@50" in e)
    epoch_seconds = ", ".join(f"{s:.0f}" for s in fit["epoch_seconds"])
    sections = [
        f"Synthetic {SHAPE['n_users']:,} users x {SHAPE['n_items']:,} items x {SHAPE['n_interactions']:,} "
        f"interactions (split_paper: {fit['train_pairs']:,} training pairs, {steps['steps_per_epoch']:,} "
        f"steps of 2,048 per epoch); {args.threads} threads; generating and splitting the data took "
        f"{fit['data_seconds']:.0f} s.",
        "Step cost per covariance mode (median of 6 rounds of 5 steps, interleaved), and the epoch it implies:",
        table(["covariance_rows", "per step", "per epoch", f"speed relative to {default}"], rows),
        f"A fit with the defaults for {args.epochs} epochs, validation recall every 2nd epoch on "
        f"{fit['eval_users']:,} sampled users, then test metrics on 10,000 users: "
        f"epochs took {epoch_seconds} s (validation included), "
        f"the fit {fit['fit_seconds']:.0f} s, the test evaluation {fit['test_seconds']:.1f} s; "
        f"validation recall@50 {validation_recalls}, test recall@50 "
        f"{fit['test_recall@50']:.4f}. **Peak RSS of the whole run: {fit['peak_rss_bytes'] / gib:.2f} GiB** "
        f"(the step-cost process, which holds three models: {steps['peak_rss_bytes'] / gib:.2f} GiB).",
    ]
    report("scale", "python benches/scale.py " + " ".join(sys.argv[1:]), sections, results)


if __name__ == "__main__":
    main()
