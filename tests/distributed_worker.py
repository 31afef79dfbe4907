"""One rank of a distributed fit for tests/test_distributed.py (run as a script).

    python distributed_worker.py CONFIG.json

The rank and group come from RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT.
Rank 0 saves the gathered model to config["out"]; every rank writes its
history (and rank 0 the epochs this process ran) to config["out"] +
".rank<r>.json". ``slow`` seconds of sleep per
epoch (in rank 0's callback) give a test time to kill a rank mid-fit.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import scipy.sparse as sp

import cml_rs
from cml_rs import datasets, distributed


def data(config: dict) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    matrix = datasets.synthetic(**config["data"]).user_items
    rank = int(os.environ.get("RANK", "0"))
    if config.get("perturb_rank") == rank:  # this rank loads other data than the rest
        matrix = matrix.tolil()
        matrix[0, matrix.shape[1] - 1] = 0 if matrix[0, matrix.shape[1] - 1] else 1
        matrix = matrix.tocsr()
    if config.get("empty_odd_users"):  # rank 1 of 2 (odd users) gets no pairs
        keep = np.arange(matrix.shape[0]) % 2 == 0
        matrix = sp.diags(keep.astype(np.float32)) @ matrix
        matrix.eliminate_zeros()
    split = datasets.split_paper(matrix.tocsr(), seed=0, min_items=1)
    return split.train, split.validation


def main() -> int:
    with open(sys.argv[1]) as handle:
        config = json.load(handle)
    world = distributed.init(timeout_seconds=config.get("timeout", 60))
    train, validation = data(config)
    model = cml_rs.CML(**config["model"])
    slow = float(config.get("slow", 0))
    epochs_run = []

    def callback(epoch: int, elapsed: float) -> None:
        epochs_run.append(epoch)
        time.sleep(slow)

    distributed.fit(
        model,
        train,
        validation=validation,
        show_progress=False,
        callback=callback,
        checkpoint=config.get("checkpoint"),
    )
    if world.rank == 0:
        model.save(config["out"])
    with open(f"{config['out']}.rank{world.rank}.json", "w") as handle:
        record = {"history": model.history_, "fitted": model.fitted, "nnz": int(train.nnz), "epochs_run": epochs_run}
        json.dump(record, handle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
