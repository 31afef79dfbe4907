"""Sharded training on torch.distributed (gloo): the overhead of 2 ranks against 1 on
this machine, the bytes each rank sends, and the projection to 100M users x 10M
items x 10B interactions at 8 and 64 ranks from the measured traffic.

    python benches/distributed.py --dataset citeulike-t --epochs 4

Every configuration trains the same data with the same settings for a fixed
number of epochs without validation (so no early stop and no gather mid-fit),
the configurations one after another; on 2 cores, two ranks of one thread each
share the cores that one process of two threads would use, so no speed-up is
expected: the figure to read is the overhead of the exchanges. A last run
with validation measures the bytes that rank 0's validation gathers add.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _common import OUT_DIR, report, table

FLOAT = 4


def worker(config_path: str) -> None:
    """One rank: train, then write seconds per epoch, bytes, steps and peak RSS."""
    import cml_rs
    from cml_rs import datasets, distributed

    config = json.loads(Path(config_path).read_text())
    world = distributed.init()
    data = datasets.load(config["dataset"])
    split = datasets.split_paper(data.user_items, seed=0)
    model = cml_rs.CML(**config["model"])
    marks = [time.perf_counter()]

    def clock(epoch: int, elapsed: float) -> None:
        marks.append(time.perf_counter())

    validation = split.validation if config["validation"] else None
    distributed.fit(model, split.train, validation=validation, show_progress=False, callback=clock)
    history = model.history_
    record = {
        "rank": world.rank,
        "history": history,
        "epoch_seconds": [e.get("epoch_seconds") for e in history],
        "bytes_sent": history[-1].get("bytes_sent", 0),
        "steps": sum(e.get("steps", 0) for e in history),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "n_items": int(split.train.shape[1]),
        "n_users": int(split.train.shape[0]),
        "nnz": int(split.train.nnz),
    }
    if world.world_size == 1:  # a plain fit: time the epochs from the callback
        record["epoch_seconds"] = list(np.diff(marks))
    Path(f"{config['out']}.rank{world.rank}.json").write_text(json.dumps(record))


def launch(config: dict, world_size: int, tmp: Path, timeout: float = 3600) -> list[dict]:
    """Runs ``world_size`` ranks of this script's worker; their records."""
    path = tmp / f"config-{world_size}-{time.monotonic_ns()}.json"
    config = {**config, "out": str(path.with_suffix(""))}
    path.write_text(json.dumps(config))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    processes = []
    for rank in range(world_size):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": str(config["model"]["num_threads"]),
        }
        processes.append(subprocess.Popen([sys.executable, __file__, "--worker", str(path)], env=env))
    try:
        for process in processes:
            if process.wait(timeout=timeout) != 0:
                raise SystemExit(f"a rank failed (exit {process.returncode})")
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    return [json.loads(Path(f"{config['out']}.rank{r}.json").read_text()) for r in range(world_size)]


def gib(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB"


def projection(per_epoch_bytes: float, n_items: int, factors: int, batch: int) -> tuple[list[list], float]:
    """Memory per rank and traffic per step at 100M x 10M x 10B, scaled from the
    measured bytes per epoch against the model's count (n_items x r x 4 B x 2 per rank)."""
    model_count = n_items * factors * FLOAT * 2  # item vectors + AdaGrad sums, once per epoch
    overhead = per_epoch_bytes / model_count
    users, items, pairs = 100e6, 10e6, 10e9
    rows = []
    for ranks in (8, 64):
        user_bytes = users / ranks * factors * FLOAT * 2
        block_bytes = items / ranks * factors * FLOAT * 2
        # CSR ids (4 B) + the pair's user (4 B) + the epoch order (4 B) of the rank's pairs.
        pair_bytes = pairs / ranks * 12
        sent_per_epoch = items * factors * FLOAT * 2 * overhead
        steps = pairs / ranks / batch
        all_to_all = batch * 22 * factors * FLOAT  # user, positive and U = 20 negatives per pair
        rows.append(
            [
                ranks,
                gib(user_bytes),
                gib(2 * block_bytes),
                gib(pair_bytes),
                gib(user_bytes + 2 * block_bytes + pair_bytes),
                gib(sent_per_epoch),
                f"{sent_per_epoch / steps / 1e3:,.1f} kB",
                f"{all_to_all / 1e6:,.1f} MB",
            ]
        )
    return rows, overhead


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="citeulike-t")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return
    tmp = OUT_DIR / "distributed"
    tmp.mkdir(parents=True, exist_ok=True)
    base = dict(epochs=args.epochs, patience=10**6, random_state=0)
    runs = {
        "1 rank, 2 threads": (1, {**base, "num_threads": 2}, False),
        "1 rank, 1 thread": (1, {**base, "num_threads": 1}, False),
        "2 ranks, 1 thread each": (2, {**base, "num_threads": 1}, False),
        "2 ranks, with validation every 2nd epoch": (2, {**base, "num_threads": 1}, True),
    }
    records = {}
    for name, (world_size, model, validation) in runs.items():
        print(f"== {name}", flush=True)
        records[name] = launch({"dataset": args.dataset, "model": model, "validation": validation}, world_size, tmp)
    rows = []
    for name, ranks in records.items():
        seconds = float(np.median([s for s in ranks[0]["epoch_seconds"][1:] if s is not None]))
        steps = ranks[0]["steps"] or ""  # a plain fit (1 rank) counts no exchange steps
        sent = [r["bytes_sent"] for r in ranks]
        rows.append(
            [
                name,
                f"{seconds:.2f}",
                " / ".join(f"{b / 1e6:,.1f} MB" for b in sent),
                " / ".join(f"{b / r['steps'] / 1e3:,.1f} kB" if r["steps"] else "" for b, r in zip(sent, ranks)),
                " / ".join(f"{r['peak_rss_bytes'] / 2**20:,.0f} MiB" for r in ranks),
                steps,
            ]
        )
    first = records["1 rank, 2 threads"][0]
    factors = 100
    sharded = records["2 ranks, 1 thread each"]
    per_epoch = float(np.mean([r["bytes_sent"] for r in sharded])) / args.epochs
    proj, overhead = projection(per_epoch, first["n_items"], factors, 2048)
    sections = [
        f"{args.dataset}: {first['n_users']:,} users x {first['n_items']:,} items, {first['nnz']:,} training "
        f"pairs; {args.epochs} epochs per run, default settings, gloo on one machine. Seconds per epoch are "
        f"the median after the first epoch (rank 0); bytes are what each rank sent over the whole run "
        f"(rank 0 / rank 1), and per step is that over the run's steps of that rank.",
        table(["run", "s / epoch", "bytes sent", "per step", "peak RSS", "steps (rank 0)"], rows),
        f"Measured traffic without validation: {per_epoch / 1e6:,.2f} MB per rank per epoch, "
        f"{overhead:.3f} x the item table with its AdaGrad sums ({first['n_items']:,} x {factors} x 4 B x 2), "
        f"as the block schedule predicts (each rank passes every item block on once an epoch).",
        "**Projection**, 100M users x 10M items x 10B interactions, r = 100, AdaGrad, batch 2048, "
        "from the measured traffic per epoch scaled to that item table. Memory per rank: its users' "
        "vectors and sums, two item blocks (the one held and the one arriving), and its pairs "
        "(12 B each: CSR id, pair user, epoch order); the exchange sends and receives tensor by tensor into "
        "the buffers that become the next block, so two blocks are held at once. The last column is what an "
        "all_to_all of the "
        "rows each batch needs would send per step instead.",
        table(
            [
                "ranks",
                "users / rank",
                "item blocks / rank",
                "pairs / rank",
                "memory / rank",
                "sent / rank / epoch",
                "sent / step",
                "all_to_all / step",
            ],
            proj,
        ),
        "Rank 0 also gathers the item table (4 GB at 10M x 100 floats) for each validation and, at the "
        "end, the user table (40 GB) to save one model file; beyond one machine's memory, keep the "
        "sharded checkpoint instead (cml_rs.distributed.load_shards assembles it where it fits).",
    ]
    report("distributed", "python benches/distributed.py " + " ".join(sys.argv[1:]), sections, records)


if __name__ == "__main__":
    main()
