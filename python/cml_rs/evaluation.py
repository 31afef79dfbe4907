"""Ranking metrics with the paper's protocol (Hsieh et al. 2017).

Every item is ranked for every evaluated user (exact top-K by
:func:`cml_rs.topk_l2`, never a dense users x items array); training items, and
for the test set also validation items, are excluded inside the search.
Recall@K = hits in the top K / size of the user's held-out set, averaged over
users with a non-empty held-out set. Precision, NDCG and MAP at K come along,
and per-user values stay available for paired significance tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

from ._checks import as_csr, as_ids, as_vectors, check_ids_below, check_int
from .kernels import topk_l2

__all__ = ["RankingMetrics", "compare", "list_metrics", "paired_pvalues", "ranking_metrics_at_k"]

METRICS = ("recall", "precision", "ndcg", "map")


class RankingMetrics(dict):
    """Mean metrics as a dict (``recall``, ``precision``, ``ndcg``, ``map``,
    ``users``), with per-user values in :attr:`per_user` (arrays aligned with
    ``per_user["user"]``) and the cut-off in :attr:`k`."""

    def __init__(self, k: int, per_user: dict[str, np.ndarray]) -> None:
        means = {name: float(per_user[name].mean()) if len(per_user[name]) else 0.0 for name in METRICS}
        super().__init__(**means, users=len(per_user["user"]))
        self.k = k
        self.per_user = per_user

    def __repr__(self) -> str:
        values = ", ".join(f"{name}@{self.k}={self[name]:.4f}" for name in METRICS)
        return f"RankingMetrics({values}, users={self['users']})"


def _metric_factors(model_or_factors: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """The (users, items) vectors of a metric model or tuple, ranked by distance;
    None for any other recommender (ranked through its ``recommend``)."""
    if isinstance(model_or_factors, (tuple, list)) and len(model_or_factors) == 2:
        users, items = model_or_factors
    elif getattr(model_or_factors, "metric_space", None) == "euclidean":
        users, items = model_or_factors.user_factors, model_or_factors.item_factors
    elif callable(getattr(model_or_factors, "recommend", None)):
        return None
    else:
        raise TypeError(
            "pass a fitted model (CML, or any model with implicit's recommend) or a "
            "(user_factors, item_factors) tuple of metric vectors"
        )
    users, items = as_vectors(users, "user_factors"), as_vectors(items, "item_factors")
    if items.shape[1] != users.shape[1]:
        raise ValueError(f"item_factors must have {users.shape[1]} columns (the user dimension), got {items.shape[1]}")
    return users, items


def _top_ids(
    model: Any,
    factors: tuple[np.ndarray, np.ndarray] | None,
    users: np.ndarray,
    excluded: sp.csr_matrix,
    K: int,
    num_threads: int,
    items: np.ndarray | None = None,
) -> np.ndarray:
    """Each user's top-K item ids with its excluded items skipped, among ``items`` when given:
    by distance for metric factors, else through the model's implicit-style ``recommend``."""
    if factors is not None:
        if items is None:
            ids, _ = topk_l2(factors[0][users], factors[1], K, exclude=excluded[users], num_threads=num_threads)
            return ids
        local, _ = topk_l2(
            factors[0][users], factors[1][items], K, exclude=excluded[users][:, items], num_threads=num_threads
        )
        return np.where(local >= 0, items[np.maximum(local, 0)], -1)
    out = np.full((len(users), K), -1, dtype=np.int64)
    for start in range(0, len(users), 1024):
        block = users[start : start + 1024]
        if items is None:
            ids, scores = model.recommend(block, excluded[block], N=K)
        else:
            ids, scores = model.recommend(block, excluded[block], N=K, items=items)
        ids = np.asarray(ids, dtype=np.int64).reshape(len(block), -1)
        # A tail of excluded items (scored as low as it gets) is no recommendation.
        ids[np.asarray(scores).reshape(len(block), -1) <= np.finfo(np.float32).min] = -1
        out[start : start + len(block), : ids.shape[1]] = ids
    return out


def ranking_metrics_at_k(
    model_or_factors: Any,
    train: Any,
    test: Any,
    K: int = 50,
    exclude: Any | Sequence[Any] | None = None,
    users: Any | None = None,
    num_threads: int = 0,
    items: Any | None = None,
) -> RankingMetrics:
    """Recall, precision, NDCG and MAP at ``K`` of a recommender.

    Parameters
    ----------
    model_or_factors : fitted model or (user_factors, item_factors)
        A CML model or a tuple of metric vectors: items are ranked by squared
        Euclidean distance to the user (exactly, by the native kernel). Any
        other model with implicit's ``recommend(userids, user_items, N)`` (the
        baselines, implicit's and LightFM wrappers) ranks items itself.
    train : scipy.sparse matrix (n_users, n_items)
        Items excluded from every user's ranking (the training interactions).
    test : scipy.sparse matrix (n_users, n_items)
        Held-out items to find.
    K : int
        Cut-off.
    exclude : sparse matrix or list of them, optional
        More items to exclude, e.g. the validation set when scoring the test set.
    users : array of int, optional
        Evaluate only these users (those with held-out items among them).
    items : array of int, optional
        Rank only these items (e.g. the held-out items of an item cold-start
        split); held-out items outside them cannot be found.

    Returns
    -------
    RankingMetrics
        A dict of means plus ``per_user`` arrays.
    """
    factors = _metric_factors(model_or_factors)
    K = check_int(K, "K")
    shape = (factors[0].shape[0], factors[1].shape[0]) if factors is not None else _model_shape(model_or_factors, test)
    train = _matrix_of_shape(train, "train", shape)
    test = _matrix_of_shape(test, "test", shape)
    excluded = train
    for i, extra in enumerate([exclude] if sp.issparse(exclude) else list(exclude or [])):
        excluded = excluded + _matrix_of_shape(extra, f"exclude[{i}]", shape)
    held_out_sizes = np.diff(test.indptr)
    if users is None:
        evaluated = np.flatnonzero(held_out_sizes)
    else:
        evaluated = np.unique(check_ids_below(as_ids(users, "users")[0], shape[0], "users"))
        evaluated = evaluated[held_out_sizes[evaluated] > 0]
    if len(evaluated) == 0:
        return _metrics_of_lists(np.empty((0, 1), dtype=np.int64), test, evaluated, K)  # no users, no lists

    candidates = None
    if items is not None:
        candidates = np.unique(check_ids_below(as_ids(items, "items")[0], shape[1], "items"))
        if len(candidates) == 0:
            raise ValueError("items is empty; pass the ids of the items to rank")
    width = min(K, shape[1] if candidates is None else len(candidates))
    ids = _top_ids(model_or_factors, factors, evaluated, excluded, width, num_threads, candidates)
    # A ranking is at most as long as the catalogue: K beyond it ranks every item.
    return _metrics_of_lists(ids, test, evaluated, K)


def list_metrics(ids: Any, test: Any, users: Any | None = None) -> RankingMetrics:
    """Recall, precision, NDCG and MAP of ranked lists made elsewhere (an LSH or HNSW
    index, another system), at K = the lists' length, on the same terms as
    :func:`ranking_metrics_at_k`: lists of users without held-out items are skipped.

    Parameters
    ----------
    ids : int array (n_lists, K)
        One ranked list of item ids per row, best first; -1 pads a shorter list.
        An item may appear once in a list.
    test : scipy.sparse matrix (n_users, n_items)
        Held-out items to find.
    users : array of int (n_lists,), optional
        The user each row ranks for, each once; row r is user r when omitted.
    """
    test = as_csr(test, "test")
    array = np.asarray(ids)
    if array.ndim != 2:
        raise ValueError(f"ids must be a 2-D array (one list per row), got shape {array.shape}")
    lists = as_ids(array.ravel(), "ids")[0].reshape(array.shape)
    if lists.shape[1] == 0:
        raise ValueError("ids holds empty lists; each row needs at least one column")
    if lists.size and (lists.min() < -1 or lists.max() >= test.shape[1]):
        bad = lists[(lists < -1) | (lists >= test.shape[1])][0]
        raise IndexError(f"ids holds item {bad}: ids must be in [0, {test.shape[1]}), or -1 for no item")
    ordered = np.sort(lists, axis=1)
    repeated = ((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)).any(axis=1)
    if repeated.any():
        raise ValueError(f"ids row {np.flatnonzero(repeated)[0]} lists an item twice; each would count as a hit")
    if users is None:
        if len(lists) > test.shape[0]:
            raise ValueError(f"ids has {len(lists)} rows but test only {test.shape[0]} users; pass users")
        owners = np.arange(len(lists), dtype=np.int64)
    else:
        owners = check_ids_below(as_ids(users, "users")[0], test.shape[0], "users")
        if len(owners) != len(lists):
            raise ValueError(f"users has {len(owners)} ids but ids has {len(lists)} rows; one user per list")
        if len(np.unique(owners)) != len(owners):
            raise ValueError("users names a user twice; give each user one list")
    scored = np.diff(test.indptr)[owners] > 0
    return _metrics_of_lists(lists[scored], test, owners[scored], lists.shape[1])


def _metrics_of_lists(ids: np.ndarray, test: sp.csr_matrix, evaluated: np.ndarray, K: int) -> RankingMetrics:
    """The per-user metrics at ``K`` of ranked lists ``ids`` (row r for user ``evaluated[r]``,
    each with held-out items in ``test``; -1 for no item)."""
    per_user = {name: np.zeros(len(evaluated)) for name in METRICS}
    per_user["user"] = evaluated
    if len(evaluated) == 0:
        return RankingMetrics(K, per_user)
    hits = _hits(ids, test[evaluated], test.shape[1])  # (users, list length) booleans
    width = hits.shape[1]
    n_held = np.diff(test.indptr)[evaluated].astype(np.float64)
    discounts = 1.0 / np.log2(np.arange(2, width + 2))
    ideal = np.cumsum(discounts)[np.minimum(n_held, K).astype(np.int64) - 1]
    hit_counts = hits.sum(axis=1)
    precision_at_rank = np.cumsum(hits, axis=1) / np.arange(1, width + 1)
    per_user["recall"] = hit_counts / n_held
    per_user["precision"] = hit_counts / K
    per_user["ndcg"] = (hits * discounts).sum(axis=1) / ideal
    per_user["map"] = (precision_at_rank * hits).sum(axis=1) / np.minimum(n_held, K)
    return RankingMetrics(K, per_user)


def _model_shape(model: Any, test: Any) -> tuple[int, int]:
    """(users, items) of a non-metric model: its own sizes where it states them, else the test matrix's."""
    n_users, n_items = getattr(model, "n_users", None), getattr(model, "n_items", None)
    if isinstance(n_users, int) and isinstance(n_items, int):
        return n_users, n_items
    return as_csr(test, "test").shape


def _matrix_of_shape(matrix: Any, name: str, shape: tuple[int, int]) -> sp.csr_matrix:
    """``matrix`` as CSR, or a ValueError when it is not users x items of the factors."""
    matrix = as_csr(matrix, name)
    if matrix.shape != shape:
        raise ValueError(f"{name} has shape {matrix.shape} but the factors give {shape[0]} users x {shape[1]} items")
    return matrix


def _hits(ids: np.ndarray, held_out: sp.csr_matrix, n_items: int) -> np.ndarray:
    """Whether each recommended id is in its user's held-out row (vectorised)."""
    held_out = held_out.tocsr()
    held_out.sort_indices()
    rows = np.repeat(np.arange(held_out.shape[0], dtype=np.int64), np.diff(held_out.indptr))
    keys = rows * n_items + held_out.indices
    wanted = np.arange(ids.shape[0], dtype=np.int64)[:, None] * n_items + np.maximum(ids, 0)
    where = np.searchsorted(keys, wanted).clip(0, max(len(keys) - 1, 0))
    return (keys[where] == wanted) & (ids >= 0) if len(keys) else np.zeros(ids.shape, dtype=bool)


def compare(a: RankingMetrics, b: RankingMetrics, metric: str = "recall") -> dict[str, float]:
    """Paired significance of ``a`` over ``b`` on the users both evaluated.

    Returns the mean difference, the Wilcoxon signed-rank p-value and the
    paired t-test p-value (two-sided).
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    common, ia, ib = np.intersect1d(a.per_user["user"], b.per_user["user"], return_indices=True)
    if len(common) < 2:
        raise ValueError("the two evaluations share fewer than 2 users; were they scored on the same split?")
    x, y = a.per_user[metric][ia], b.per_user[metric][ib]
    return {"users": len(common), "mean_difference": float((x - y).mean()), **paired_pvalues(x, y)}


def paired_pvalues(x: Any, y: Any) -> dict[str, float]:
    """Two-sided Wilcoxon signed-rank and paired t-test p-values of per-user
    values ``x`` against ``y`` (same users, same order); both are 1 when every
    pair is equal, where the tests themselves are undefined."""
    from scipy import stats

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"x and y must be 1-D arrays of the same length, got shapes {x.shape} and {y.shape}")
    if len(x) < 2:
        raise ValueError(f"x and y must hold at least 2 pairs for a paired test, got {len(x)}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("x and y must be finite (no NaN or inf)")
    if not np.any(x != y):
        return {"wilcoxon_p": 1.0, "ttest_p": 1.0}
    return {"wilcoxon_p": float(stats.wilcoxon(x, y).pvalue), "ttest_p": float(stats.ttest_rel(x, y).pvalue)}
