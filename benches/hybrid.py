"""Hybrid CML: features, cold start and fold-in, against LightFM and implicit.

    python benches/hybrid.py feature-defaults           # CML+F's settings on citeulike-t's validation split
    python benches/hybrid.py features --seeds 0 1 2     # CML+F vs LightFM+features (citeulike-t), CML+F vs CML
    python benches/hybrid.py features --seeds 1 2 --lightfm-from 0   # LightFM's settings from seed 0's validation
    python benches/hybrid.py user-features --seeds 0 1 2   # ml-100k: recall by user activity
    python benches/hybrid.py cold-items --seeds 0 1 2   # item cold start on citeulike-t (--lightfm-from as above)
    python benches/hybrid.py fold-in --seeds 0          # new users: fold-in vs refit vs ALS recalculate_user
    python benches/hybrid.py report                     # the tables, from what is stored

Protocols (every model in one run on the same split; settings chosen on
validation only; per-user metrics stored for paired Wilcoxon tests):

- features: the paper's 60/20/20 split of each data set. CML and CML+F with
  the package defaults (all the data set's item feature blocks); on
  citeulike-t also LightFM WARP with the same features (an identity block
  beside them, LightFM's usual set-up), its learning rate and item_alpha
  tuned on validation (grids extended past any edge) and its epochs chosen on
  validation like CML's.
- user-features: ml-100k, CML against CML with the user table (age, gender,
  occupation); test recall@50 by the user's number of training items.
- cold-items: ``split_cold_items`` holds out 20% of citeulike-t's items with all
  their interactions. Models train on the other items only (the cold ones do
  not exist for them, not even as negatives); a cold item then gets its
  vector from its features alone; each user's held-out items are ranked among
  all cold items. CML+F, LightFM with features (cold rows: features only, no
  identity), and feature popularity (a cold item scores the mean training
  popularity of the warm items sharing its features).
- fold-in: ``split_fold_in_users`` holds out 10% of citeulike-t's users; models
  train on the rest (no validation: the loss-plateau stop), then each held-out
  user is folded in from half of its items and ranked on the other half.
  CML ``recommend(..., recalculate_user=True)`` against a full CML refit that
  includes those halves, and implicit ALS's ``recalculate_user`` (its settings
  from the panel's validation search on citeulike-t).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

import cml_rs
from cml_rs import baselines, datasets, evaluation

sys.path.insert(0, str(Path(__file__).parent))
from _common import OUT_DIR, machine, recall_of_lists, table
from panel import BOUNDS, LightFMWarp, _beyond, grid_search

HYBRID_DIR = OUT_DIR / "hybrid"
K = (50, 100)


# ---------------------------------------------------------------------- helpers


def stored(name: str) -> dict | None:
    path = HYBRID_DIR / f"{name}.json"
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    with np.load(path.with_suffix(".npz")) as arrays:
        record["per_user"] = {k: arrays[k] for k in arrays.files}
    return record


def store(name: str, record: dict, per_user: dict[str, np.ndarray]) -> None:
    HYBRID_DIR.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(HYBRID_DIR / f"{name}.npz", **per_user)
    (HYBRID_DIR / f"{name}.json").write_text(json.dumps(record, indent=1, default=str))
    summary = ", ".join(f"{k} {v:.4f}" for k, v in record.get("test", {}).items())
    print(f"  {name}: {summary}", flush=True)


def scored(model: Any, train: sp.csr_matrix, test: sp.csr_matrix, exclude: Any = None, **kw: Any) -> tuple:
    """Test metrics at every cut-off and the per-user values behind them."""
    summary, per_user = {}, {}
    for k in K:
        metrics = evaluation.ranking_metrics_at_k(model, train, test, K=k, exclude=exclude, **kw)
        per_user["user"] = metrics.per_user["user"]
        for name in ("recall", "ndcg"):
            summary[f"{name}@{k}"] = metrics[name]
            per_user[f"{name}@{k}"] = metrics.per_user[name]
    return summary, per_user


def lightfm_features(blocks: dict[str, sp.csr_matrix], identity_rows: np.ndarray | None, n_identity: int) -> Any:
    """LightFM's item feature matrix: an identity block (rows ``identity_rows`` get their
    own column, the rest none) beside the blocks, each row summing to 1 (LightFM's norm)."""
    n = next(iter(blocks.values())).shape[0]
    rows = np.arange(n) if identity_rows is None else identity_rows
    identity = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, np.arange(len(rows)))), shape=(n, n_identity))
    parts = [identity] + [_row_normalised(b) for b in blocks.values()]
    matrix = sp.hstack(parts, format="csr", dtype=np.float32)
    sums = np.asarray(matrix.sum(axis=1)).ravel()
    return sp.diags(1.0 / np.maximum(sums, 1e-12)) @ matrix


def _row_normalised(block: sp.csr_matrix) -> sp.csr_matrix:
    block = sp.csr_matrix(block, dtype=np.float32)
    sums = np.asarray(block.sum(axis=1)).ravel()
    return sp.diags(1.0 / np.maximum(sums, 1e-12)) @ block


LIGHTFM_GRID = {"learning_rate": [0.025, 0.05, 0.1], "item_alpha": [0.0, 1e-6]}


def tune_lightfm(
    train: sp.csr_matrix,
    validation: sp.csr_matrix,
    features: Any,
    threads: int,
    seed: int,
    grid: dict[str, list] | None = None,
) -> dict:
    """LightFM WARP with features: ``grid`` (default LIGHTFM_GRID) on validation recall@50,
    edges extended; a grid of one point fits just that point (epochs still chosen on validation)."""

    def score(params: dict) -> tuple[float, dict]:
        start = time.perf_counter()
        model = LightFMWarp(
            no_components=100, seed=seed, threads=threads, validation=validation, item_features=features, **params
        ).fit(train)
        seconds = time.perf_counter() - start
        recall = evaluation.ranking_metrics_at_k(model, train, validation, K=50)["recall"]
        print(f"    lightfm {params}: validation recall@50 {recall:.4f} ({model.epochs_} epochs, {seconds:.0f}s)")
        return recall, {"model": model, "fit_seconds": seconds, "epochs": model.epochs_}

    return grid_search(
        grid or LIGHTFM_GRID, score, rounds=4, allowed=lambda name, value: BOUNDS[name][0] <= value <= BOUNDS[name][1]
    )


# ---------------------------------------------------------------------- 1. features


def reused_lightfm_grid(prefix: str, seed: int, lightfm_from: int | None) -> dict[str, list] | None:
    """The one-point grid of LightFM's settings chosen on seed ``lightfm_from`` (its stored
    record ``{prefix}__seed{lightfm_from}__lightfm+f``), or None: search the grid on ``seed``."""
    if lightfm_from is None or lightfm_from == seed:
        return None
    tuned = stored(f"{prefix}__seed{lightfm_from}__lightfm+f")
    if tuned is None:
        raise SystemExit(f"--lightfm-from {lightfm_from}: that seed has no stored LightFM fit ({prefix})")
    return {k: [v] for k, v in tuned["params"].items()}


FEATURE_SETS = {"citeulike-t": ["tags", "words"], "ml-1m-implicit": ["genres"], "ml-latest-small": ["genres", "tags"]}


def run_features(seeds: list[int], threads: int, names: list[str], lightfm_from: int | None = None) -> None:
    """``lightfm_from``: LightFM's learning rate and item_alpha are those chosen on that
    seed's validation split (its stored record) instead of a grid search per seed."""
    for name in names:
        data = datasets.load(name)
        blocks = {b: data.item_features[b] for b in FEATURE_SETS[name]}
        for seed in seeds:
            split = datasets.split_paper(data.user_items, seed=seed)
            print(f"== features: {name}, seed {seed}", flush=True)
            for variant in ("cml", "cml+f"):
                key = f"features__{name}__seed{seed}__{variant}"
                if stored(key):
                    continue
                model = cml_rs.CML(num_threads=threads, random_state=seed)
                start = time.perf_counter()
                model.fit(
                    split.train,
                    validation=split.validation,
                    item_features=blocks if variant == "cml+f" else None,
                    show_progress=False,
                )
                seconds = time.perf_counter() - start
                summary, per_user = scored(model, split.train, split.test, exclude=split.validation)
                record = {"test": summary, "fit_seconds": seconds, "epochs": len(model.history_)}
                store(key, record, per_user)
            key = f"features__{name}__seed{seed}__lightfm+f"
            if name == "citeulike-t" and not stored(key):
                features = lightfm_features(blocks, None, data.n_items)
                grid = reused_lightfm_grid(f"features__{name}", seed, lightfm_from)
                result = tune_lightfm(split.train, split.validation, features, threads, seed, grid)
                summary, per_user = scored(result["model"], split.train, split.test, exclude=split.validation)
                record = {"test": summary, "params": result["params"], "epochs": result["epochs"]}
                record["params_from_seed"] = seed if grid is None else lightfm_from
                record["trials"] = result["trials"]
                store(key, record, per_user)


# The settings searched one after another (each at the best of those before it), each
# grid extended past an edge within its bounds; the package defaults are the middle points.
FEATURE_GRID = {
    "lambda_f": ([0.3, 1.0, 3.0], (0.0, 100.0)),
    "feature_dropout": ([0.2, 0.5, 0.8], (0.0, 0.9)),
    "feature_hidden": ([128, 256, 512], (16, 2048)),
}
TIE_BELOW = [0, 2, 5]


def run_feature_defaults(threads: int) -> None:
    """CML+F's settings on citeulike-t's validation split (seed 0): lambda_f, then dropout,
    then the hidden width (coordinate search, grids extended past their edges); then, for
    the best, the blocks (tags alone) and the rare-item tie (applied after the fit, so one
    fit serves every threshold)."""
    import copy

    from cml_rs.features import prepare

    data = datasets.load("citeulike-t")
    split = datasets.split_paper(data.user_items, seed=0)
    all_blocks = {b: data.item_features[b] for b in FEATURE_SETS["citeulike-t"]}

    def trial(options: dict[str, Any], blocks: dict, suffix: str = "") -> float:
        name = ", ".join(f"{k}={v}" for k, v in options.items()) + suffix
        key = f"feature-defaults__{name}"
        record = stored(key)
        if record is None:
            model = cml_rs.CML(num_threads=threads, random_state=0, **options)
            start = time.perf_counter()
            model.fit(split.train, validation=split.validation, item_features=blocks, show_progress=False)
            seconds = time.perf_counter() - start
            prepared, _ = prepare(blocks, data.n_items, "item_features", model.item_feature_layout_)
            validation = {}
            for tie in TIE_BELOW:
                tied = copy.deepcopy(model)
                tied.feature_tie_below = tie
                if tie:
                    tied._tie_rare_items(split.train, prepared)
                validation[f"tie_below={tie}"] = evaluation.ranking_metrics_at_k(
                    tied, split.train, split.validation, K=50
                )["recall"]
            record = {"options": options, "blocks": sorted(blocks), "validation": validation, "fit_seconds": seconds}
            store(key, {**record, "test": {}}, {})
            print(f"    {name}: validation recall@50 {validation}", flush=True)
        return max(record["validation"].values())

    best = {name: values[len(values) // 2] for name, (values, _) in FEATURE_GRID.items()}
    for name, (values, (low, high)) in FEATURE_GRID.items():
        scores = {value: trial({**best, name: value}, all_blocks) for value in values}
        for _ in range(3):  # extend past an edge, within the setting's bounds
            value = _beyond(sorted(scores), max(scores, key=scores.get), name)
            if value is None:
                break
            value = type(value)(min(max(value, low), high))
            if value in scores:
                break
            scores[value] = trial({**best, name: value}, all_blocks)
        best[name] = max(scores, key=scores.get)
    trial(best, {"tags": all_blocks["tags"]}, ", tags only")


# ---------------------------------------------------------------------- 2. user features


def run_user_features(seeds: list[int], threads: int) -> None:
    data = datasets.load("ml-100k")
    for seed in seeds:
        split = datasets.split_paper(data.user_items, seed=seed)
        print(f"== user features: ml-100k, seed {seed}", flush=True)
        for variant in ("cml", "cml+user"):
            key = f"user-features__ml-100k__seed{seed}__{variant}"
            if stored(key):
                continue
            model = cml_rs.CML(num_threads=threads, random_state=seed)
            model.fit(
                split.train,
                validation=split.validation,
                user_features=data.user_features if variant == "cml+user" else None,
                show_progress=False,
            )
            summary, per_user = scored(model, split.train, split.test, exclude=split.validation)
            per_user["train_items"] = np.diff(split.train.indptr)[per_user["user"]]
            store(key, {"test": summary, "epochs": len(model.history_)}, per_user)


# ---------------------------------------------------------------------- 3. cold items


def feature_popularity(train: sp.csr_matrix, warm: np.ndarray, cold: np.ndarray, blocks: dict) -> np.ndarray:
    """Scores of the cold items: the mean training popularity of the warm items that share
    each of their features, weighted by the item's normalised features."""
    features = sp.hstack([_row_normalised(b) for b in blocks.values()], format="csr")
    popularity = np.asarray(train[:, warm].sum(axis=0)).ravel()
    warm_features = features[warm]
    carriers = np.asarray(warm_features.sum(axis=0)).ravel()
    per_feature = (warm_features.T @ popularity) / np.maximum(carriers, 1e-12)
    return features[cold] @ per_feature


def run_cold_items(seeds: list[int], threads: int, lightfm_from: int | None = None) -> None:
    data = datasets.load("citeulike-t")
    blocks = {b: data.item_features[b] for b in FEATURE_SETS["citeulike-t"]}
    for seed in seeds:
        split = datasets.split_cold_items(data.user_items, fraction=0.2, seed=seed)
        cold = split.cold_items
        warm = np.setdiff1d(np.arange(data.n_items), cold)
        train_warm = split.train[:, warm]
        # Validation for model selection: 20% of each user's warm items (seeded), as in split_paper.
        inner = datasets.split_paper(train_warm, seed=seed, fractions=(0.8, 0.2, 0.0), min_items=2)
        users = np.flatnonzero(np.diff(split.test.indptr))
        print(f"== cold items: citeulike-t, seed {seed}: {len(cold)} cold items, {len(users)} users", flush=True)

        key = f"cold__citeulike-t__seed{seed}__cml+f"
        if not stored(key):
            model = cml_rs.CML(num_threads=threads, random_state=seed)
            start = time.perf_counter()
            warm_blocks = {b: m[warm] for b, m in blocks.items()}
            model.fit(inner.train, validation=inner.validation, item_features=warm_blocks, show_progress=False)
            seconds = time.perf_counter() - start
            vectors = model.item_vectors_from_features({b: m[cold] for b, m in blocks.items()})
            items = np.zeros((data.n_items, vectors.shape[1]), np.float32)
            items[cold] = vectors
            summary, per_user = scored((model.user_factors, items), split.train, split.test, items=cold)
            store(key, {"test": summary, "fit_seconds": seconds, "epochs": len(model.history_)}, per_user)

        key = f"cold__citeulike-t__seed{seed}__lightfm+f"
        if not stored(key):
            warm_features = lightfm_features({b: m[warm] for b, m in blocks.items()}, None, len(warm))
            grid = reused_lightfm_grid("cold__citeulike-t", seed, lightfm_from)
            result = tune_lightfm(inner.train, inner.validation, warm_features, threads, seed, grid)
            cold_features = lightfm_features({b: m[cold] for b, m in blocks.items()}, np.array([], int), len(warm))
            biases, vectors = result["model"].item_representations(cold_features)
            lightfm = result["model"].model
            # Dot products and biases as a metric model would need distances: rank with a
            # scoring wrapper instead.
            summary, per_user = scored(
                _ColdScores(lightfm.user_embeddings, lightfm.user_biases, vectors, biases, cold, data.n_items),
                split.train,
                split.test,
                items=cold,
            )
            record = {"test": summary, "params": result["params"], "epochs": result["epochs"]}
            record["params_from_seed"] = seed if grid is None else lightfm_from
            store(key, {**record, "trials": result["trials"]}, per_user)

        key = f"cold__citeulike-t__seed{seed}__feature-popularity"
        if not stored(key):
            scores = feature_popularity(split.train, warm, cold, blocks)
            zeros = np.zeros((data.n_users, 1), np.float32)
            summary, per_user = scored(
                _ColdScores(
                    zeros, np.zeros(data.n_users, np.float32), np.zeros((len(cold), 1)), scores, cold, data.n_items
                ),
                split.train,
                split.test,
                items=cold,
            )
            store(key, {"test": summary}, per_user)


class _ColdScores(baselines.ScoringRecommender):
    """Dot-product scores (u.v + b_u + b_i) of given user and cold-item representations."""

    def __init__(self, users: Any, user_biases: Any, items: Any, item_biases: Any, cold: Any, n_items: int) -> None:
        super().__init__()
        self.users, self.user_biases = users, user_biases
        self.items, self.item_biases, self.cold = items, item_biases, cold
        self.n_users, self.n_items = users.shape[0], n_items

    def scores(self, userids: np.ndarray, user_rows: sp.csr_matrix) -> np.ndarray:
        out = np.zeros((len(userids), self.n_items), np.float32)  # only the cold columns are ranked
        out[:, self.cold] = (
            self.users[userids] @ self.items.T + self.item_biases[None, :] + self.user_biases[userids, None]
        )
        return out


# ---------------------------------------------------------------------- 4. fold-in

ALS_CITEULIKE = {"factors": 100, "regularization": 30.0, "alpha": 100.0, "iterations": 20}


def run_fold_in(seeds: list[int], threads: int) -> None:
    data = datasets.load("citeulike-t")
    for seed in seeds:
        split = datasets.split_fold_in_users(data.user_items, fraction=0.1, seed=seed)
        print(f"== fold-in: citeulike-t, seed {seed}: {len(split.users)} users held out", flush=True)
        key = f"fold-in__citeulike-t__seed{seed}"
        if stored(key):
            continue
        results: dict[str, Any] = {}
        per_user: dict[str, np.ndarray] = {}
        model = cml_rs.CML(num_threads=threads, random_state=seed)
        start = time.perf_counter()
        model.fit(split.train, show_progress=False)
        results["cml fit (without the held-out users)"] = {"seconds": time.perf_counter() - start}
        start = time.perf_counter()
        ids, _ = model.recommend(split.users, split.fold, N=max(K), recalculate_user=True)
        seconds = time.perf_counter() - start
        for k in K:
            per_user[f"fold-in recall@{k}"] = recall_of_lists(ids, split.test, k)
        results["cml fold-in (recalculate_user)"] = {"seconds": seconds}
        # The refit: the held-out users with their fold halves, trained from scratch.
        full = sp.lil_matrix(split.train)
        full[split.users] = split.fold
        full = sp.csr_matrix(full)
        refit = cml_rs.CML(num_threads=threads, random_state=seed)
        start = time.perf_counter()
        refit.fit(full, show_progress=False)
        results["cml refit (with the fold halves)"] = {"seconds": time.perf_counter() - start}
        ids, _ = refit.recommend(split.users, full[split.users], N=max(K))
        for k in K:
            per_user[f"refit recall@{k}"] = recall_of_lists(ids, split.test, k)
        import implicit
        from threadpoolctl import threadpool_limits

        with threadpool_limits(1, "blas"):
            als = implicit.cpu.als.AlternatingLeastSquares(num_threads=threads, random_state=seed, **ALS_CITEULIKE)
            start = time.perf_counter()
            als.fit(split.train, show_progress=False)
            results["als fit (without the held-out users)"] = {"seconds": time.perf_counter() - start}
            start = time.perf_counter()
            ids, _ = als.recommend(split.users, split.fold, N=max(K), recalculate_user=True)
            results["als fold-in (recalculate_user)"] = {"seconds": time.perf_counter() - start}
        for k in K:
            per_user[f"als recall@{k}"] = recall_of_lists(ids, split.test, k)
        test = {name: float(values.mean()) for name, values in per_user.items()}
        store(key, {"test": test, "timing": results, "users": len(split.users)}, per_user)


# ---------------------------------------------------------------------- report


def paired(a: np.ndarray, b: np.ndarray) -> str:
    return f"{evaluation.paired_pvalues(a, b)['wilcoxon_p']:.2g}"


def versus(reference: np.ndarray, values: np.ndarray) -> str:
    """CML+F's per-user metric against another model's: relative difference and paired p
    (blank while the two do not yet cover the same seeds)."""
    if len(reference) != len(values):
        return ""
    return f"{(reference.mean() / values.mean() - 1) * 100:+.1f}%, p {paired(reference, values)}"


def lightfm_settings(records: dict[str, dict], prefix: str) -> list[str]:
    """A line saying, per seed, LightFM's settings and where they were chosen."""
    origins = []
    for key in sorted(k for k in records if k.startswith(prefix) and k.endswith("__lightfm+f")):
        record = records[key]
        seed = int(key.split("__seed")[1].split("__")[0])
        origin = record.get("params_from_seed", seed)
        how = "grid on its validation" if origin == seed else f"the settings chosen on seed {origin}'s"
        origins.append(f"seed {seed}: {record['params']}, {record['epochs']} epochs ({how})")
    return ["LightFM+F's settings: " + "; ".join(origins) + "."] if origins else []


def report() -> str:
    lines = [f"{time.strftime('%Y-%m-%d')}; {machine()}"]
    records = {p.stem: stored(p.stem) for p in sorted(HYBRID_DIR.glob("*.json"))}

    def pooled(prefix: str, variant: str, metric: str) -> tuple[list[float], np.ndarray]:
        keys = sorted(k for k in records if k.startswith(prefix) and k.endswith(f"__{variant}"))
        means = [records[k]["test"][metric] for k in keys]
        values = np.concatenate([records[k]["per_user"][metric] for k in keys]) if keys else np.zeros(0)
        return means, values

    trials = sorted(k for k in records if k.startswith("feature-defaults__"))
    if trials:
        rows = [
            [k.split("__", 1)[1], *(f"{records[k]['validation'][f'tie_below={t}']:.4f}" for t in TIE_BELOW)]
            for k in trials
        ]
        lines += [
            "\n**CML+F settings**, citeulike-t validation recall@50 (seed 0), by the rare-item tie threshold",
            table(["trial", *(f"tie_below={t}" for t in TIE_BELOW)], rows),
        ]
    for name in FEATURE_SETS:
        prefix = f"features__{name}__"
        variants = [
            v for v in ("cml+f", "cml", "lightfm+f") if any(k.startswith(prefix) and k.endswith(v) for k in records)
        ]
        if not variants:
            continue
        rows = []
        for variant in variants:
            row = [variant]
            for metric in ("recall@50", "recall@100"):
                means, values = pooled(prefix, variant, metric)
                row.append(f"{np.mean(means):.4f} ± {np.std(means):.4f} ({len(means)} seeds)")
                _, reference = pooled(prefix, "cml+f", metric)
                row.append("" if variant == "cml+f" else versus(reference, values))
            rows.append(row)
        lines += [
            f"\n**{name}**, features {FEATURE_SETS[name]}",
            table(["model", "test recall@50", "CML+F vs it", "test recall@100", "CML+F vs it"], rows),
        ]
        lines += lightfm_settings(records, prefix)
    # user features by activity bucket
    keys = sorted(k for k in records if k.startswith("user-features__"))
    if keys:
        edges = [1, 10, 20, 50, 100, 10**6]
        rows = []
        for variant in ("cml", "cml+user"):
            picked = [records[k]["per_user"] for k in keys if k.endswith(f"__{variant}")]
            recall = np.concatenate([p["recall@50"] for p in picked])
            items = np.concatenate([p["train_items"] for p in picked])
            row = [variant, f"{recall.mean():.4f}"]
            for lo, hi in zip(edges[:-1], edges[1:]):
                mask = (items >= lo) & (items < hi)
                row.append(f"{recall[mask].mean():.4f} (n={mask.sum()})")
            rows.append(row)
        cml = np.concatenate([records[k]["per_user"]["recall@50"] for k in keys if k.endswith("__cml")])
        user = np.concatenate([records[k]["per_user"]["recall@50"] for k in keys if k.endswith("__cml+user")])
        headers = ["model", "all users"] + [f"{lo}-{hi - 1} train items" for lo, hi in zip(edges[:-1], edges[1:])]
        headers[-1] = f">= {edges[-2]} train items"
        lines += [
            f"\n**ml-100k user features** (age, gender, occupation): test recall@50 by the user's number of "
            f"training items, {len(keys) // 2} seeds pooled; paired Wilcoxon p (all users) {paired(user, cml)}",
            table(headers, rows),
        ]
    keys = sorted(k for k in records if k.startswith("cold__"))
    if keys:
        rows = []
        for variant in ("cml+f", "lightfm+f", "feature-popularity"):
            row = [variant]
            for metric in ("recall@50", "recall@100"):
                means, values = pooled("cold__citeulike-t__", variant, metric)
                if not means:
                    row += ["", ""]
                    continue
                _, reference = pooled("cold__citeulike-t__", "cml+f", metric)
                row.append(f"{np.mean(means):.4f} ± {np.std(means):.4f} ({len(means)} seeds)")
                row.append("" if variant == "cml+f" else versus(reference, values))
            rows.append(row)
        lines += [
            "\n**Item cold start**, citeulike-t (tags + words), 20% of items held out",
            table(["model", "recall@50 among cold items", "CML+F vs it", "recall@100", "CML+F vs it"], rows),
            *lightfm_settings(records, "cold__citeulike-t__"),
        ]
    keys = sorted(k for k in records if k.startswith("fold-in__"))
    if keys:
        rows = []
        shares, time_shares = [], []
        for key in keys:
            record = records[key]
            test, timing = record["test"], record["timing"]
            fold_seconds = timing["cml fold-in (recalculate_user)"]["seconds"]
            refit_seconds = timing["cml refit (with the fold halves)"]["seconds"]
            shares.append(test["fold-in recall@50"] / test["refit recall@50"])
            time_shares.append(fold_seconds / refit_seconds)
            per_user = record["per_user"]
            rows.append(
                [
                    key.rsplit("seed", 1)[1],
                    *(f"{test[f'{m} recall@{k}']:.4f}" for m in ("fold-in", "refit", "als") for k in K),
                    f"{shares[-1]:.1%} (p {paired(per_user['fold-in recall@50'], per_user['refit recall@50'])})",
                    f"{fold_seconds:.2f} s / {refit_seconds:.0f} s = {time_shares[-1]:.2%}",
                    f"{timing['als fold-in (recalculate_user)']['seconds']:.2f} s",
                ]
            )
        headers = ["seed"] + [f"{m} R@{k}" for m in ("fold-in", "refit", "ALS") for k in K]
        headers += ["fold-in / refit R@50", "fold-in / refit seconds", "ALS fold-in seconds"]
        lines += [
            f"\n**User fold-in**, citeulike-t, {records[keys[0]]['users']} held-out users per seed: fold-in reaches "
            f"{np.mean(shares):.1%} of the refit's recall@50 in {np.mean(time_shares):.2%} of its time (means over "
            f"{len(keys)} seeds)",
            table(headers, rows),
        ]
    return "\n\n".join(line.strip("\n") for line in lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "part", choices=("feature-defaults", "features", "user-features", "cold-items", "fold-in", "report")
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--datasets", nargs="+", default=list(FEATURE_SETS), choices=list(FEATURE_SETS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--lightfm-from",
        type=int,
        default=None,
        help="features, cold-items: reuse LightFM's settings chosen on this seed's validation split for the others",
    )
    args = parser.parse_args()
    if args.part == "report":
        print(report())
        return
    from panel import require_extras

    require_extras({"features": ["lightfm"], "cold-items": ["lightfm"], "fold-in": ["wrmf"]}.get(args.part, []))
    import torch

    torch.set_num_threads(args.threads)
    if args.part == "feature-defaults":
        run_feature_defaults(args.threads)
    elif args.part == "features":
        run_features(args.seeds, args.threads, args.datasets, args.lightfm_from)
    elif args.part == "user-features":
        run_user_features(args.seeds, args.threads)
    elif args.part == "cold-items":
        run_cold_items(args.seeds, args.threads, args.lightfm_from)
    else:
        run_fold_in(args.seeds, args.threads)


if __name__ == "__main__":
    main()
