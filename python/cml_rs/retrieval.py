"""Top-K retrieval backends behind one small interface.

CML's recommendations are Euclidean nearest neighbours, so any L2 index
serves. Three backends share ``build_index(backend, vectors)`` and
``index.query(queries, k, exclude=None, num_threads=0, exclude_ids=None) -> (ids, sqdist)``:

- ``"exact"``: :class:`ExactIndex`, the fused native kernel (:func:`cml_rs.topk_l2`).
- ``"lsh"``: :class:`cml_rs.LshIndex`, p-stable LSH with multi-probe, candidates
  re-ranked exactly (Rust).
- ``"hnsw"``: :class:`HnswIndex`, hnswlib's graph index (``pip install cml-rs[hnsw]``).

All return int64 ids and float32 squared distances, nearest first, padded
with -1 / +inf when fewer than k eligible items exist (at most as many
columns as there are vectors), and skip the items in each query's
``exclude`` row and the ``exclude_ids`` of every query.
"""

from __future__ import annotations

from typing import Any, Protocol, Union

import numpy as np
import scipy.sparse as sp

from ._checks import as_csr, as_id_list, as_queries, as_vectors, check_int
from .kernels import topk_l2

__all__ = [
    "Backend",
    "ExactIndex",
    "HnswIndex",
    "NearestNeighbourIndex",
    "build_index",
    "neighbour_recall",
    "search_subset",
    "top_n",
]


class NearestNeighbourIndex(Protocol):
    """What every backend offers."""

    def query(
        self,
        queries: Any,
        k: int = 10,
        exclude: Any | None = None,
        num_threads: int = 0,
        exclude_ids: Any | None = None,
    ) -> tuple[np.ndarray, np.ndarray]: ...

    def memory_bytes(self) -> int: ...


Backend = Union[str, NearestNeighbourIndex]


class ExactIndex:
    """Exact search: every item scored by the fused native distance + top-K kernel."""

    def __init__(self, vectors: Any) -> None:
        self.vectors = as_vectors(vectors, "vectors")
        if len(self.vectors) == 0:
            raise ValueError("cannot index an empty set of vectors")

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def __len__(self) -> int:
        return int(self.vectors.shape[0])

    def query(
        self,
        queries: Any,
        k: int = 10,
        exclude: Any | None = None,
        num_threads: int = 0,
        exclude_ids: Any | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact ``(ids, sqdist)`` of the k nearest vectors (see :func:`cml_rs.topk_l2`)."""
        return topk_l2(queries, self.vectors, k, exclude=exclude, num_threads=num_threads, exclude_ids=exclude_ids)

    knn_query = query

    def memory_bytes(self) -> int:
        return int(self.vectors.nbytes)


class HnswIndex:
    """hnswlib (``space='l2'``) with its quirks hidden.

    hnswlib raises when it cannot return k results and wants ``ef >= k``; here
    ``ef`` is raised as needed, a query that still comes up short is answered
    exactly, and rows are padded with -1 / +inf instead. Exclusions cannot be
    filtered inside hnswlib without a Python callback per candidate, so each
    query fetches k plus its number of excluded items and drops those (queries
    are grouped by that number to keep the over-fetch small).
    """

    def __init__(
        self,
        vectors: Any,
        M: int = 16,
        ef_construction: int = 200,
        ef: int = 100,
        seed: int = 0,
        num_threads: int = 0,
    ) -> None:
        try:
            import hnswlib
        except ImportError as error:
            raise ImportError("the HNSW backend needs hnswlib: pip install 'cml-rs[hnsw]'") from error
        self.vectors = _finite(as_vectors(vectors, "vectors"), "vectors")
        if len(self.vectors) == 0:
            raise ValueError("cannot index an empty set of vectors")
        self.M, self.ef_construction, self.ef = M, ef_construction, check_int(ef, "ef")
        self.index = hnswlib.Index(space="l2", dim=self.dim)
        self.index.init_index(max_elements=len(self.vectors), M=M, ef_construction=ef_construction, random_seed=seed)
        self.index.add_items(self.vectors, np.arange(len(self.vectors)), num_threads=_hnsw_threads(num_threads))

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def __len__(self) -> int:
        return int(self.vectors.shape[0])

    def set_ef(self, ef: int) -> None:
        """Search breadth: higher is slower and more accurate."""
        self.ef = check_int(ef, "ef")

    def query(
        self,
        queries: Any,
        k: int = 10,
        exclude: Any | None = None,
        num_threads: int = 0,
        exclude_ids: Any | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, sqdist)`` of the (approximately) k nearest vectors."""
        query_array, single = as_queries(queries)
        if query_array.shape[1] != self.dim:
            raise ValueError(f"queries must have {self.dim} columns (the index dimension), got {query_array.shape[1]}")
        _finite(query_array, "queries")
        n = len(self)
        k = min(check_int(k, "k"), n)
        threads = _hnsw_threads(check_int(num_threads, "num_threads", minimum=0, maximum=1024))
        excluded = _exclusions_for(exclude, len(query_array), n)
        banned = as_id_list(exclude_ids, "exclude_ids")
        banned = banned[banned < n].astype(np.int64) if banned is not None else np.zeros(0, np.int64)
        counts = np.diff(excluded.indptr) if excluded is not None else np.zeros(len(query_array), np.int64)
        counts = counts + len(banned)
        ids = np.full((len(query_array), k), -1, dtype=np.int64)
        dist = np.full((len(query_array), k), np.inf, dtype=np.float32)
        # Group queries by how many extra results they need (0, 1, 2-3, 4-7, ...).
        groups = np.where(counts == 0, 0, np.floor(np.log2(np.maximum(counts, 1))).astype(np.int64) + 1)
        for group in np.unique(groups):
            rows = np.flatnonzero(groups == group)
            fetch = min(n, k + (0 if group == 0 else int(2**group) - 1))
            found, found_dist = self._knn(query_array[rows], fetch, threads)
            for r, row in enumerate(rows):
                keep = found[r] >= 0
                if excluded is not None and excluded.indptr[row + 1] > excluded.indptr[row]:
                    seen = excluded.indices[excluded.indptr[row] : excluded.indptr[row + 1]]
                    keep &= ~np.isin(found[r], seen)
                if len(banned):
                    keep &= ~np.isin(found[r], banned)
                chosen = np.flatnonzero(keep)[:k]
                ids[row, : len(chosen)] = found[r, chosen]
                dist[row, : len(chosen)] = found_dist[r, chosen]
        return (ids[0], dist[0]) if single else (ids, dist)

    knn_query = query

    def _knn(self, queries: np.ndarray, fetch: int, threads: int) -> tuple[np.ndarray, np.ndarray]:
        """hnswlib's knn_query with ef >= fetch; rows it cannot fill are answered exactly."""
        self.index.set_ef(max(self.ef, fetch))
        try:
            labels, dist = self.index.knn_query(queries, k=fetch, num_threads=threads)
            return labels.astype(np.int64), dist.astype(np.float32)
        except RuntimeError:
            # hnswlib found fewer than `fetch` neighbours for some query.
            return topk_l2(queries, self.vectors, fetch)

    def memory_bytes(self) -> int:
        """Vectors plus graph links, as hnswlib lays them out (an estimate from its parameters)."""
        n = len(self)
        level0 = n * (self.dim * 4 + 8 + 4 + 2 * self.M * 4)
        upper = int(n / max(np.log(self.M), 1.0) * (4 + self.M * 4 + 8))
        return int(level0 + upper)


def _hnsw_threads(num_threads: int) -> int:
    return -1 if num_threads == 0 else num_threads


def _finite(array: np.ndarray, name: str) -> np.ndarray:
    """``array`` when it holds no NaN or infinity (hnswlib would index or search them silently)."""
    if not np.all(np.isfinite(array)):
        row, column = np.argwhere(~np.isfinite(array))[0]
        raise ValueError(f"{name}[{row}, {column}] is {array[row, column]}; every value must be finite")
    return array


def build_index(
    backend: Backend, vectors: Any, seed: int = 0, tune_queries: Any | None = None, **options: Any
) -> NearestNeighbourIndex:
    """An index of ``vectors`` for ``backend`` ("exact", "lsh", "hnsw"); an index object is returned as is.

    ``options`` go to the backend's constructor (e.g. ``n_tables`` for LSH,
    ``M`` / ``ef`` for HNSW). The LSH index is tuned to 95% recall@50 on
    ``tune_queries`` (default: a sample of the vectors themselves) unless
    ``tune=False``.
    """
    if not isinstance(backend, str):
        return backend
    if backend == "exact":
        return ExactIndex(vectors)
    if backend == "hnsw":
        return HnswIndex(vectors, seed=seed, **options)
    if backend == "lsh":
        from .lsh import LshIndex

        tune = options.pop("tune", True)
        array = as_vectors(vectors, "vectors")
        index = LshIndex(array.shape[1], seed=seed, **options)
        index.add_items(array)
        if tune:
            if tune_queries is None:
                rng = np.random.default_rng(seed)
                tune_queries = array[rng.choice(len(array), min(len(array), 500), replace=False)]
            index.tune(tune_queries, k=min(50, len(array)), target_recall=0.95)
        return index
    raise ValueError(f"backend must be 'exact', 'lsh', 'hnsw' or an index object, got {backend!r}")


def _exclusions_for(exclude: Any | None, n_queries: int, n_items: int) -> sp.csr_matrix | None:
    """``exclude`` as CSR with one row per query and at most ``n_items`` columns (checked here:
    hnswlib is not the native core, which checks this for the other backends)."""
    if exclude is None:
        return None
    matrix = as_csr(exclude, "exclude")
    if matrix.shape[0] != n_queries:
        raise ValueError(
            f"exclude has {matrix.shape[0]} rows but there are {n_queries} queries; "
            f"pass one row of excluded ids per query"
        )
    if matrix.shape[1] > n_items:
        raise ValueError(
            f"exclude has {matrix.shape[1]} columns but there are only {n_items} items; its columns must be item ids"
        )
    return matrix


#: The score of a liked item that fills the tail of a recommendation list (as in implicit).
TAIL_SCORE = -np.finfo(np.float32).max


def search_subset(
    vectors: np.ndarray, queries: np.ndarray, k: int, exclude: sp.csr_matrix | None, allowed: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Exact nearest ``vectors`` rows among the ids ``allowed`` only (such subsets are
    usually small, and an index over all vectors cannot serve them), skipping ``exclude``."""
    position = np.full(vectors.shape[0], -1, dtype=np.int64)
    position[allowed] = np.arange(len(allowed))
    sub_exclude = None
    if exclude is not None:
        coo = exclude.tocoo()
        keep = position[coo.col] >= 0
        sub_exclude = sp.csr_matrix(
            (coo.data[keep], (coo.row[keep], position[coo.col[keep]])), shape=(len(queries), len(allowed))
        )
    local, sqdist = ExactIndex(vectors[allowed]).query(queries, k, exclude=sub_exclude)
    return np.where(local >= 0, allowed[np.maximum(local, 0)], -1), sqdist


def top_n(
    index: NearestNeighbourIndex,
    vectors: np.ndarray,
    queries: np.ndarray,
    n: int,
    liked: sp.csr_matrix | None = None,
    banned: np.ndarray | None = None,
    allowed: np.ndarray | None = None,
    num_threads: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """The model-level top-N: ``(ids, scores)``, one row per query, never padded.

    Candidates are ``allowed`` (default: every row of ``vectors``) minus
    ``banned`` (skipped inside the search: memory O(len(banned)), not per
    query); each row has ``min(n, number of candidates)`` entries. The
    query's nearest candidates that it has not ``liked`` come first, scored by
    minus their squared distance; when fewer than that remain, the row is
    completed with its liked candidates, nearest first, scored ``TAIL_SCORE``
    (so scores never increase along a row). ``index`` serves searches over all
    vectors; where an approximate index comes back short, the row is searched
    again exactly.
    """
    n_vectors = vectors.shape[0]
    candidates = np.unique(allowed) if allowed is not None else None
    banned = np.unique(banned) if banned is not None else np.zeros(0, np.int64)
    if candidates is not None:
        banned = np.intersect1d(banned, candidates)
    width = min(n, (n_vectors if candidates is None else len(candidates)) - len(banned))
    if width <= 0:
        return np.zeros((len(queries), 0), np.int64), np.zeros((len(queries), 0), np.float32)
    exclude = sp.csr_matrix(liked, dtype=np.float32) if liked is not None and liked.nnz else None

    def search(rows: np.ndarray | slice, searcher: Any) -> tuple[np.ndarray, np.ndarray]:
        row_exclude = exclude[rows] if exclude is not None else None
        if candidates is not None:
            return search_subset(vectors, queries[rows], width, row_exclude, np.setdiff1d(candidates, banned))
        return searcher.query(
            queries[rows],
            width,
            exclude=row_exclude,
            num_threads=num_threads,
            exclude_ids=banned if len(banned) else None,
        )

    ids, sqdist = search(slice(None), index)
    short = np.flatnonzero((ids < 0).any(axis=1))
    if len(short) and candidates is None and not isinstance(index, ExactIndex):
        ids[short], sqdist[short] = search(short, ExactIndex(vectors))
        short = np.flatnonzero((ids < 0).any(axis=1))
    scores = -sqdist
    if len(short) and liked is not None:
        _fill_with_liked(ids, scores, short, vectors, queries, liked, banned, candidates)
    return ids, scores


def _fill_with_liked(
    ids: np.ndarray,
    scores: np.ndarray,
    rows: np.ndarray,
    vectors: np.ndarray,
    queries: np.ndarray,
    liked: sp.csr_matrix,
    banned: np.ndarray,
    candidates: np.ndarray | None,
) -> None:
    """Completes short ``rows`` in place with each query's liked candidates, nearest first."""
    for row in rows:
        own = liked.indices[liked.indptr[row] : liked.indptr[row + 1]]
        if candidates is not None:
            own = np.intersect1d(own, candidates)
        own = np.setdiff1d(own, banned)
        free = np.flatnonzero(ids[row] < 0)
        distances = ((vectors[own] - queries[row]) ** 2).sum(axis=1)
        nearest = own[np.lexsort((own, distances))][: len(free)]
        ids[row, free[: len(nearest)]] = nearest
        scores[row, free[: len(nearest)]] = TAIL_SCORE


def neighbour_recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of the true neighbours (ids >= 0 in ``truth``, one row per query) that
    the same row of ``found`` holds, over all queries: the recall of an approximate search."""
    found, truth = np.atleast_2d(found), np.atleast_2d(truth)
    wanted = truth >= 0
    total = int(wanted.sum())
    if total == 0:
        return 1.0
    hits = (truth[:, :, None] == found[:, None, :]).any(axis=2) & wanted
    return float(hits.sum() / total)
