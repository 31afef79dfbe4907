"""GPU checks, in one run (issue 2 section 3, issue 3 sections 3 and 7): the
torch rank weights on CUDA agree with the native kernel; the cheap WARP loss
equals the reference formulation on CUDA; CML+F's feature network gives the CPU's
output and gradients on CUDA; CML (and CML+F) trains on citeulike-t on the GPU
(AdaGrad and Adam) next to a short CPU run for scale; an epoch of the 10M-pair
synthetic set is timed (issue 13); and the package defaults
are run on ml-1m-implicit (paper split) and gowalla (its shipped split).
Results are written after every step, so a run cut short still reports.

Run (on the GPU machine): python benches/gpu_check.py --data DIR --out DIR
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import cml_rs
from cml_rs import datasets, evaluation, nn


def check_rank_weights(device: torch.device) -> dict:
    rng = np.random.default_rng(0)
    pos = rng.uniform(0, 2, 100_000).astype(np.float32)
    neg = rng.uniform(0, 4, (100_000, 20)).astype(np.float32)
    native_w, native_h = cml_rs.rank_weights(pos, neg, 0.5, 25975)
    torch_w, torch_h = nn.rank_weights_torch(
        torch.from_numpy(pos).to(device), torch.from_numpy(neg).to(device), 0.5, 25975
    )
    return {
        "rows": len(pos),
        "max_abs_weight_difference": float(np.abs(torch_w.cpu().numpy() - native_w).max()),
        "hardest_equal": bool((torch_h.cpu().numpy() == native_h).all()),
    }


def check_warp_loss(device: torch.device) -> dict:
    generator = torch.Generator().manual_seed(0)
    users = torch.randint(0, 500, (4096,), generator=generator).to(device)
    positives = torch.randint(0, 2000, (4096,), generator=generator).to(device)
    negatives = torch.randint(0, 2000, (4096, 20), generator=generator).to(device)
    a = nn.CMLEmbedding(500, 2000, 64, generator=torch.Generator().manual_seed(1)).to(device)
    b = nn.CMLEmbedding(500, 2000, 64, generator=torch.Generator().manual_seed(1)).to(device)
    fast = a.warp_loss(users, positives, negatives, 1.5, 2000)
    slow = nn.warp_metric_loss(*b.distances(users, positives, negatives), 1.5, 2000)
    fast.backward()
    slow.backward()
    return {
        "loss_relative_difference": float(abs(fast.item() - slow.item()) / abs(slow.item())),
        "max_item_gradient_difference": float((a.items.grad - b.items.grad).abs().max()),
    }


def check_feature_projector(device: torch.device) -> dict:
    """CML+F's network on the device against the CPU: the embedding bag over the
    feature-major first layer gives the same output and gradients."""
    import scipy.sparse as sp

    features = sp.random(4096, 20_000, density=25 / 20_000, format="csr", random_state=0, dtype=np.float32)
    cpu = nn.FeatureProjector(20_000, 100, dropout=0.0)
    moved = nn.FeatureProjector(20_000, 100, dropout=0.0).to(device)
    moved.load_state_dict(cpu.state_dict())
    out_cpu, out_device = cpu(features), moved(features)
    out_cpu.pow(2).sum().backward()
    out_device.pow(2).sum().backward()
    gradient_difference = moved.hidden.weight.grad.cpu() - cpu.hidden.weight.grad
    return {
        "first_layer_feature_major_on_device": bool(moved.hidden.weight.T.is_contiguous()),
        "max_output_difference": float((out_device.detach().cpu() - out_cpu.detach()).abs().max()),
        "max_first_layer_gradient_difference": float(gradient_difference.abs().max()),
    }


def train(split, device: str, name: str = "citeulike-t", item_features=None, **options) -> dict:
    model = cml_rs.CML(device=device, **options)
    start = time.perf_counter()
    model.fit(split.train, validation=split.validation, item_features=item_features, show_progress=False)
    elapsed = time.perf_counter() - start
    metrics = {
        k: evaluation.ranking_metrics_at_k(model, split.train, split.test, K=k, exclude=split.validation)["recall"]
        for k in (50, 100)
    }
    epochs = len(model.history_)
    return {
        "dataset": name,
        "device": device,
        "options": options,
        "seconds": elapsed,
        "epochs": epochs,
        "seconds_per_epoch": elapsed / max(epochs, 1),
        "best_epoch": model.best_epoch_,
        "test_recall@50": metrics[50],
        "test_recall@100": metrics[100],
        "validation_curve": [
            (h["epoch"], round(h["elapsed"], 2), h.get("recall@50")) for h in model.history_ if "recall@50" in h
        ],
    }


def synthetic_epoch(device: str, epochs: int = 2) -> dict:
    """Seconds per training epoch on the synthetic 1M users x 300k items x 10M
    interactions (issue 13: under 5 s on a GPU); the first epoch warms up."""
    from cml_rs.training import Trainer

    matrix = datasets.synthetic(1_000_000, 300_000, 10_000_000, n_clusters=500, seed=0).user_items
    model = cml_rs.CML(device=device)
    model._build(*matrix.shape, None, None)
    trainer = Trainer(model, matrix, None)
    seconds = []
    for epoch in range(epochs):
        start = time.perf_counter()
        trainer.run_epoch(epoch)
        if device != "cpu":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    name = "synthetic 1M x 300k x 10M"
    return {"dataset": name, "device": device, "pairs": int(matrix.nnz), "epoch_seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True, help="folder holding citeulike-t/")
    parser.add_argument("--out", required=True)
    parser.add_argument("--cpu-epochs", type=int, default=4, help="epochs of the CPU reference run")
    parser.add_argument("--device", default="cuda", help="cpu for a local smoke run of this script")
    parser.add_argument("--max-epochs", type=int, default=None, help="cap every GPU run (smoke runs)")
    args = parser.parse_args()
    out = Path(args.out)
    device = torch.device(args.device)
    caps = {} if args.max_epochs is None else {"epochs": args.max_epochs}
    report = {
        "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else "none",
        "torch": torch.__version__,
        "cml_rs": cml_rs.__version__,
        "rank_weights": check_rank_weights(device),
        "warp_loss": check_warp_loss(device),
        "feature_projector": check_feature_projector(device),
    }
    print(json.dumps(report, indent=1), flush=True)
    report["training"] = []

    def record(run: dict) -> None:
        report["training"].append(run)
        print(json.dumps({k: v for k, v in run.items() if k != "validation_curve"}), flush=True)
        (out / "gpu_results.json").write_text(json.dumps(report, indent=1))

    (out / "gpu_results.json").write_text(json.dumps(report, indent=1))
    data_dir = Path(args.data)
    citeulike_data = datasets.load_citeulike(data_dir / "citeulike-t")
    citeulike = datasets.split_paper(citeulike_data.user_items, seed=0)
    record(train(citeulike, args.device, **caps))
    record(train(citeulike, args.device, name="citeulike-t, CML+F", item_features=citeulike_data.item_features, **caps))
    record(train(citeulike, args.device, optimizer="adam", learning_rate=0.002, **caps))
    record(train(citeulike, "cpu", epochs=args.cpu_epochs, num_threads=16))
    record(synthetic_epoch(args.device))
    if (data_dir / "ml-1m-implicit").is_dir():
        ml1m = datasets.load_movielens_1m_implicit(data_dir / "ml-1m-implicit")
        ml1m_split = datasets.split_paper(ml1m.user_items, seed=0)
        record(train(ml1m_split, args.device, name="ml-1m-implicit (paper split)", **caps))
    if (data_dir / "gowalla").is_dir():
        gowalla = datasets.load_gowalla(data_dir / "gowalla")
        record(train(gowalla.given_split, args.device, name="gowalla (shipped split)", batch_size=8192, **caps))


if __name__ == "__main__":
    main()
