"""Native kernels: WARP rank weights, exact top-K and pairwise squared distances.

All of them release the GIL and run on Rust threads (``num_threads=0``: all
cores); results do not depend on the thread count.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _native
from ._checks import as_csr, as_float, as_id_list, as_queries, as_real_array, as_vectors, csr_arrays

__all__ = ["rank_weights", "sqdist", "topk_l2"]


def rank_weights(
    pos_dist: Any, neg_dist: Any, margin: float, n_items: int, num_threads: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """WARP rank weights and hardest negatives of CML's metric loss.

    For each pair b, with ``M`` the number of negatives u where
    ``margin + pos_dist[b] - neg_dist[b, u] > 0``, the weight is
    ``log(floor(n_items * M / U) + 1)``; ``hardest[b]`` is the index of the
    negative with the largest hinge (the smallest ``neg_dist``).

    Parameters
    ----------
    pos_dist : array-like, shape (B,)
        Squared distance of each user to its positive item.
    neg_dist : array-like, shape (B, U)
        Squared distances to the U sampled negatives.
    margin : float
        Hinge margin m.
    n_items : int
        J, the number of items.

    Returns
    -------
    weights : float32 ndarray, shape (B,)
    hardest : int64 ndarray, shape (B,)
    """
    return _native.rank_weights(
        as_real_array(pos_dist, "pos_dist", 1),
        as_vectors(neg_dist, "neg_dist"),
        as_float(margin, "margin"),
        n_items,
        num_threads,
    )


def topk_l2(
    queries: Any,
    items: Any,
    k: int,
    exclude: Any | None = None,
    num_threads: int = 0,
    exclude_ids: Any | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest items of each query by squared Euclidean distance.

    Parameters
    ----------
    queries : array-like, shape (Q, d) or (d,)
        Query vectors (user factors); float64 is converted to float32.
    items : array-like, shape (N, d)
        Item vectors.
    k : int
        Neighbours per query.
    exclude : scipy.sparse matrix, shape (Q, N), optional
        Row q lists item ids query q must not get back (the items a user has
        already seen); skipped inside the search.
    num_threads : int
        0 means all cores (at most 1024).
    exclude_ids : array of int, optional
        Item ids no query gets back (memory O(len), whatever the number of queries).

    Returns
    -------
    ids : int64 ndarray, shape (Q, min(k, N)) (or (min(k, N),) for a 1-D query)
        Nearest first; -1 where fewer items are eligible.
    sqdist : float32 ndarray, same shape
        Exact squared distances; +inf in padded slots.
    """
    query_array, single = as_queries(queries)
    excluded = csr_arrays(as_csr(exclude, "exclude")) if exclude is not None else None
    banned = as_id_list(exclude_ids, "exclude_ids")
    ids, dist = _native.topk_l2(query_array, as_vectors(items, "items"), k, excluded, num_threads, banned)
    return (ids[0], dist[0]) if single else (ids, dist)


def sqdist(queries: Any, items: Any, num_threads: int = 0) -> np.ndarray:
    """All squared Euclidean distances between ``queries`` (Q, d) and ``items`` (N, d), as (Q, N).

    Allocates the full Q x N matrix (a MemoryError says so when it cannot be
    had); use :func:`topk_l2` when only the nearest matter. Computed at GEMM
    speed as ``||q||^2 + ||x||^2 - 2 q.x`` in float32, like BLAS-based distance
    code: the absolute error is about 1e-7 x (||q||^2 + ||x||^2), so vectors
    far from the origin but close to each other lose precision (topk_l2
    recomputes the distances it reports exactly).
    """
    return _native.sqdist(as_vectors(queries, "queries"), as_vectors(items, "items"), num_threads)
