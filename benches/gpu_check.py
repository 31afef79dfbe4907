"""GPU checks, in one run (issue 2 section 3, issue 3 sections 3 and 7, issue 9): the
torch rank weights on CUDA agree with the native kernel; the cheap WARP loss
equals the reference formulation on CUDA; CML+F's feature network and EASE give
the CPU's results on CUDA; CML (and CML+F) trains on citeulike-t on the GPU next
to a short CPU run for scale; an epoch of the 10M-pair synthetic set is timed
(issue 13); and Gowalla is compared with the literature (issue 9): EASE and CML,
each tuned on the shipped validation part by recall@20, refit on train +
validation (the published training set) and scored once on test.
Results are written after every step, so a run cut short still reports.

Run (on the GPU machine): python benches/gpu_check.py --data DIR --out DIR

The Gowalla refits also run alone, on any device, each storing its per-user test
metrics: --gowalla-cml-settings (with --gowalla-refit-epochs to skip the
validation run) and --gowalla-baseline FAMILY SETTINGS; --gowalla-report then
sets them side by side with paired tests against CML.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

import cml_rs
from cml_rs import baselines, datasets, evaluation, nn

sys.path.insert(0, str(Path(__file__).parent))
from panel import fit_baseline, grid_search


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


def check_ease(device: torch.device) -> dict:
    """EASE's torch path on the device against LAPACK on the CPU."""
    import scipy.sparse as sp

    matrix = sp.random(3000, 2000, density=0.01, format="csr", random_state=0, dtype=np.float32)
    lapack = baselines.EASE(100.0).fit(matrix)
    moved = baselines.EASE(100.0, device=device).fit(matrix)
    users = np.arange(3000)
    lapack_ids = lapack.recommend(users, matrix, N=20)[0]
    moved_ids = moved.recommend(users, matrix, N=20)[0]
    return {
        "max_weight_difference": float(np.abs(moved.item_weights_.cpu().numpy() - lapack.item_weights_).max()),
        "top20_agreement": float((moved_ids == lapack_ids).mean()),
    }


def test_metrics(model, train, test, cutoffs=(20, 50), per_user: dict | None = None) -> dict:
    """Test recall and NDCG at each cutoff, ``train`` excluded; with ``per_user``, each
    user's values go there too (for paired tests between runs)."""
    metrics = {}
    for k in cutoffs:
        result = evaluation.ranking_metrics_at_k(model, train, test, K=k)
        metrics[f"recall@{k}"], metrics[f"ndcg@{k}"] = result["recall"], result["ndcg"]
        if per_user is not None:
            per_user["user"] = result.per_user["user"]
            per_user[f"recall@{k}"], per_user[f"ndcg@{k}"] = result.per_user["recall"], result.per_user["ndcg"]
    return metrics


def save_per_user(run: dict, out: Path) -> dict:
    """Moves a run's per-user test metrics into ``out/gowalla_<model>_per_user.npz``."""
    per_user = run.pop("per_user", None)
    if per_user:
        name = run["model"].split(" ")[0]
        np.savez_compressed(out / f"gowalla_{name}_per_user.npz", **per_user)
    return run


def gowalla_report(folder: Path, reference: str = "cml", metrics=("recall@20", "ndcg@20", "recall@50")) -> str:
    """The Gowalla refits stored in ``folder`` (``gowalla_<model>.json`` and its per-user
    file): each metric's mean and, against ``reference``, the relative difference and the
    paired Wilcoxon p over test users."""
    runs = {}
    for path in sorted(folder.glob("gowalla_*_per_user.npz")):
        name = path.name.removeprefix("gowalla_").removesuffix("_per_user.npz")
        with np.load(path) as arrays:
            runs[name] = {key: arrays[key] for key in arrays.files}
        runs[name]["params"] = json.loads((folder / f"gowalla_{name}.json").read_text())["params"]
    if reference not in runs:
        raise SystemExit(f"no gowalla_{reference}_per_user.npz in {folder}")
    ours = runs[reference]
    lines = [
        "| model | " + " | ".join(f"{m} (vs {reference}, p)" for m in metrics) + " | settings |",
        "|---|" + "---|" * (len(metrics) + 1),
    ]
    for name, run in sorted(runs.items(), key=lambda item: -item[1][metrics[0]].mean()):
        if not np.array_equal(run["user"], ours["user"]):
            raise SystemExit(f"gowalla_{name} scored other test users than gowalla_{reference}")
        cells = []
        for metric in metrics:
            mean = run[metric].mean()
            if name == reference:
                cells.append(f"{mean:.4f}")
                continue
            p = evaluation.paired_pvalues(run[metric], ours[metric])["wilcoxon_p"]
            cells.append(f"{mean:.4f} ({mean / ours[metric].mean() - 1:+.1%}, {p:.2g})")
        settings = {k: v for k, v in run["params"].items() if k not in ("device", "num_threads")}
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {settings} |")
    return "\n".join(lines)


def gowalla_splits(folder: Path):
    """Gowalla's shipped split, and train + validation: the published training set."""
    split = datasets.load_gowalla(folder).given_split
    full_train = (split.train + split.validation).tocsr()
    full_train.data[:] = 1.0
    return split, full_train


def gowalla_against_literature(folder: Path, device: str, tune_budget: float, record) -> None:
    """Issue 9's Gowalla target (published Recall@20: CML 0.1670, EASE 0.1765, BARS):
    each model's settings are chosen on the shipped validation part (recall@20),
    then it is refit on train + validation, the published training set, and
    scored once on the published test set."""
    split, full_train = gowalla_splits(folder)

    def ease_score(params: dict) -> tuple[float, dict]:
        start = time.perf_counter()
        model = baselines.EASE(device=device, **params).fit(split.train)
        seconds = time.perf_counter() - start
        recall = evaluation.ranking_metrics_at_k(model, split.train, split.validation, K=20)["recall"]
        print(f"  EASE {params}: validation recall@20 {recall:.4f} ({seconds:.1f} s)", flush=True)
        return recall, {"fit_seconds": seconds}

    start = time.perf_counter()
    search = grid_search({"regularization": [100.0, 300.0, 1000.0, 3000.0]}, ease_score)
    run = gowalla_baseline_refit(split, full_train, device, "ease", search["params"])
    run.update(
        {
            "validation_recall@20": search["validation"],
            "trials": search["trials"],
            "still_on_edge": search["still_on_edge"],
            "seconds": time.perf_counter() - start,
        }
    )
    record(run)
    record(gowalla_cml(split, full_train, device, tune_budget=tune_budget))


#: The panel's baselines that can be refit without validation (LightFM and SFCML pick
#: their epochs on it inside the fit).
REFIT_FAMILIES = ("popularity", "ease", "rp3beta", "wrmf", "bpr")


def gowalla_baseline_refit(split, full_train, device: str, family: str, params: dict) -> dict:
    """A panel baseline (one of ``REFIT_FAMILIES``) with settings chosen on validation,
    fit on train + validation and scored once on test; EASE runs on ``device``."""
    start = time.perf_counter()
    if family == "ease":
        model = baselines.EASE(**params, device=None if device == "cpu" else device).fit(full_train)
    else:
        refit_split = datasets.Split(full_train, sp.csr_matrix(full_train.shape, dtype=np.float32), split.test, 0)
        model = fit_baseline(family, refit_split, params, threads=torch.get_num_threads(), seed=0)
    fit_seconds = time.perf_counter() - start
    per_user: dict = {}
    return {
        "dataset": "gowalla (train + validation -> test)",
        "model": family,
        "device": device if family == "ease" else "cpu",
        "params": params,
        "refit_seconds": fit_seconds,
        "test": test_metrics(model, full_train, split.test, per_user=per_user),
        "per_user": per_user,
    }


def gowalla_cml(
    split,
    full_train,
    device: str,
    tune_budget: float = 0.0,
    settings: dict | None = None,
    refit_epochs: int | None = None,
) -> dict:
    """CML on Gowalla: ``settings`` (or, without them, ``cml_rs.tune`` for ``tune_budget``
    seconds) trained on train to early stopping on validation recall@20, then refit on
    train + validation for the same number of epochs and scored on test. Given
    ``refit_epochs`` (the epoch count an earlier run of these settings chose on
    validation), only the refit runs."""
    start = time.perf_counter()
    fixed = {"device": device, "batch_size": 8192, "eval_k": 20}
    if refit_epochs is not None:
        if settings is None:
            raise ValueError("refit_epochs needs the settings whose validation run chose it")
        return cml_refit(split, full_train, {**fixed, **settings}, refit_epochs, {"model": "cml (given settings)"})
    if settings is None:
        result = cml_rs.tune(split.train, split.validation, budget_seconds=tune_budget, show_progress=False, **fixed)
        model, trials = result.model, result.trials
        settings = {k: v for k, v in result.params.items() if k != "num_threads"}
    else:
        settings = {**fixed, **settings}
        model, trials = cml_rs.CML(**settings), []
        model.fit(split.train, validation=split.validation, show_progress=False)
    search = {
        "model": "cml (tune)" if trials else "cml (given settings)",
        "tune_budget_seconds": tune_budget if trials else None,
        "search_seconds": time.perf_counter() - start,
        "validation_recall@20": max(h.get("recall@20", 0.0) for h in model.history_),
        "trials": trials,
        "test_trained_on_train_only": test_metrics(model, full_train, split.test),
    }
    return cml_refit(split, full_train, settings, model.best_epoch_ + 1, search)


def cml_refit(split, full_train, settings: dict, epochs: int, search: dict) -> dict:
    """CML with settings and an epoch count chosen on validation (``search`` says how),
    fit on train + validation and scored once on test."""
    start = time.perf_counter()
    refit = cml_rs.CML(**{**settings, "epochs": epochs})
    refit.fit(full_train, show_progress=False)
    per_user: dict = {}
    return {
        "dataset": "gowalla (train + validation -> test)",
        "device": settings["device"],
        "params": settings,
        **search,
        "refit_epochs": epochs,
        "refit_seconds": time.perf_counter() - start,
        "test": test_metrics(refit, full_train, split.test, per_user=per_user),
        "per_user": per_user,
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
    parser.add_argument("--data", help="folder holding citeulike-t/ and gowalla/ (all but --gowalla-report)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--cpu-epochs", type=int, default=4, help="epochs of the CPU reference run")
    parser.add_argument("--device", default="cuda", help="cpu for a local smoke run of this script")
    parser.add_argument("--max-epochs", type=int, default=None, help="cap every GPU run (smoke runs)")
    parser.add_argument("--tune-budget", type=float, default=150.0, help="seconds of cml_rs.tune on Gowalla")
    parser.add_argument(
        "--gowalla-cml-settings",
        type=json.loads,
        default=None,
        help="JSON of CML settings (e.g. a tune run's): only fit them on Gowalla, refit and score (any device)",
    )
    parser.add_argument(
        "--gowalla-baseline",
        nargs=2,
        metavar=("FAMILY", "SETTINGS"),
        default=None,
        help="only refit this panel baseline with these JSON settings (chosen on validation, e.g. by "
        "panel.py on gowalla) on train + validation and score it on test (EASE on any device)",
    )
    parser.add_argument(
        "--gowalla-refit-epochs",
        type=int,
        default=None,
        help="with --gowalla-cml-settings: the epochs an earlier run of them chose on validation; only refit",
    )
    parser.add_argument(
        "--gowalla-report",
        action="store_true",
        help="print the table of the Gowalla refits stored in --out, with paired tests against CML, and exit",
    )
    args = parser.parse_args()
    out = Path(args.out)
    if args.gowalla_report:
        print(gowalla_report(out))
        return
    if args.data is None:
        parser.error("--data is required")
    if args.gowalla_baseline is not None:
        family, settings = args.gowalla_baseline[0], json.loads(args.gowalla_baseline[1])
        if family not in REFIT_FAMILIES:
            parser.error(f"--gowalla-baseline: {family!r} is not one of {REFIT_FAMILIES}")
        split, full_train = gowalla_splits(Path(args.data) / "gowalla")
        run = save_per_user(gowalla_baseline_refit(split, full_train, args.device, family, settings), out)
        (out / f"gowalla_{family}.json").write_text(json.dumps(run, indent=1))
        print(json.dumps(run, indent=1))
        return
    if args.gowalla_cml_settings is not None:
        split, full_train = gowalla_splits(Path(args.data) / "gowalla")
        run = save_per_user(
            gowalla_cml(
                split,
                full_train,
                args.device,
                settings=args.gowalla_cml_settings,
                refit_epochs=args.gowalla_refit_epochs,
            ),
            out,
        )
        (out / "gowalla_cml.json").write_text(json.dumps(run, indent=1))
        print(json.dumps({k: v for k, v in run.items() if k != "trials"}, indent=1))
        return
    device = torch.device(args.device)
    caps = {} if args.max_epochs is None else {"epochs": args.max_epochs}
    report = {
        "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else "none",
        "torch": torch.__version__,
        "cml_rs": cml_rs.__version__,
        "rank_weights": check_rank_weights(device),
        "warp_loss": check_warp_loss(device),
        "feature_projector": check_feature_projector(device),
        "ease": check_ease(device),
    }
    print(json.dumps(report, indent=1), flush=True)
    report["training"] = []

    def record(run: dict) -> None:
        report["training"].append(save_per_user(run, out))
        print(json.dumps({k: v for k, v in run.items() if k not in ("validation_curve", "trials")}), flush=True)
        (out / "gpu_results.json").write_text(json.dumps(report, indent=1))

    (out / "gpu_results.json").write_text(json.dumps(report, indent=1))
    data_dir = Path(args.data)
    # Most wanted first, so a run cut short keeps them: Gowalla against the
    # literature (not finished on 2026-11-27: the H100 run ran out of time in
    # EASE's refit), then the speed targets (a citeulike-t fit under 10 s, a
    # synthetic epoch under 5 s), measured that day at 26 s and 33 s.
    if (data_dir / "gowalla").is_dir():
        gowalla_against_literature(data_dir / "gowalla", args.device, args.tune_budget, record)
    citeulike_data = datasets.load_citeulike(data_dir / "citeulike-t")
    citeulike = datasets.split_paper(citeulike_data.user_items, seed=0)
    record(train(citeulike, args.device, **caps))
    record(synthetic_epoch(args.device))
    record(train(citeulike, args.device, name="citeulike-t, CML+F", item_features=citeulike_data.item_features, **caps))
    record(train(citeulike, "cpu", epochs=args.cpu_epochs, num_threads=16))


if __name__ == "__main__":
    main()
