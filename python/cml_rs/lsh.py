"""Euclidean LSH index for fast approximate top-K (Hsieh et al. 2017).

    index = LshIndex(dim=100)
    index.add_items(model.item_factors)
    index.tune(model.user_factors[:500], k=50, target_recall=0.9)
    ids, sqdist = index.query(model.user_factors, k=50, exclude=train)

p-stable hashes (Datar et al. 2004) in ``n_tables`` tables of ``n_hashes``
each, query-directed multi-probe (Lv et al. 2007), candidates re-ranked by
exact squared distance. The work happens in Rust with the GIL released.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from . import _native
from ._checks import as_csr, as_id_list, as_ids, as_queries, as_vectors, check_float, csr_arrays
from .kernels import topk_l2
from .retrieval import neighbour_recall

__all__ = ["LshIndex"]


class LshIndex(_native.LshIndex):
    """p-stable L2 LSH with multi-probe and exact re-ranking.

    Parameters
    ----------
    dim : int
        Vector dimension.
    n_tables : int
        Hash tables L. More tables: higher recall per probe, more memory.
    n_hashes : int
        Hashes per table k (1..32). More hashes: smaller buckets, more probes needed.
    bucket_width : float, optional
        Slot width w. By default it is chosen from the first vectors added: the
        width at which a point at the median distance to its 10th nearest
        neighbour shares a whole bucket of one table with probability 0.035.
    seed : int
        Seed of the hash functions; the same seed gives the same index.

    Notes
    -----
    The defaults (16 tables of 16 hashes) suit unit-ball CML embeddings of
    about 100 dimensions and 10^4 - 10^6 items; :meth:`tune` then picks the
    probes (and optionally fewer tables) that reach a recall target. Queries
    pad with id -1 and distance +inf when fewer than k candidates are found.
    ``knn_query`` is ``query`` under hnswlib's name.
    """

    def add_items(self, vectors: Any, ids: Any | None = None, num_threads: int = 0) -> None:
        """Adds ``vectors`` (n, dim) under ``ids`` (default: the next n integers) and rebuilds the tables."""
        array = as_vectors(vectors, "vectors")
        if ids is None:
            start = int(self.ids.max()) + 1 if len(self) else 0
            id_array = np.arange(start, start + len(array), dtype=np.int64)
        else:
            id_array, _ = as_ids(ids, "ids")
        super().add_items(array, id_array, num_threads)

    def query(
        self,
        queries: Any,
        k: int = 10,
        n_probes: int | None = None,
        exclude: Any | None = None,
        num_threads: int = 0,
        n_tables: int | None = None,
        exclude_ids: Any | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, sqdist)`` of the k nearest indexed vectors found.

        Parameters
        ----------
        queries : array-like, (Q, dim) or (dim,)
        k : int
        n_probes : int, optional
            Buckets visited per query over all tables (the home bucket of each
            table first); default: the tuned value (4 per table before tuning).
            At most 4,096 per table are visited, and a query stops once every
            indexed vector has been a candidate.
        exclude : scipy.sparse matrix (Q, n_ids), optional
            Row q lists ids query q must not get back; skipped inside the search.
        n_tables : int, optional
            Search only the first tables (default: the tuned value, else all).
        exclude_ids : array of int, optional
            Ids no query gets back.

        Returns
        -------
        ids : int64 (Q, min(k, len)), nearest first, -1 where fewer were found
        sqdist : float32, same shape, exact squared distances, +inf where padded
        """
        query_array, single = as_queries(queries)
        excluded = csr_arrays(as_csr(exclude, "exclude")) if exclude is not None else None
        banned = as_id_list(exclude_ids, "exclude_ids")
        ids, dist = super().query(query_array, k, n_probes, n_tables, excluded, num_threads, banned)
        return (ids[0], dist[0]) if single else (ids, dist)

    knn_query = query

    def tune(
        self,
        sample_queries: Any,
        k: int = 10,
        target_recall: float = 0.9,
        tune_tables: bool = False,
        max_probes: int | None = None,
        num_threads: int = 0,
    ) -> dict[str, Any]:
        """Chooses the fewest probes (and, with ``tune_tables``, the fastest
        number of tables) that reach ``target_recall`` of the exact top-``k``
        on ``sample_queries``, and makes them the defaults.

        Returns the choice: ``n_probes``, ``n_tables``, the ``recall`` reached
        and the sample's ``queries_per_second``. When even ``max_probes``
        (default: 256 per table) cannot reach the target, the best found is
        kept and ``reached`` is False.
        """
        queries, _ = as_queries(sample_queries, "sample_queries")
        target_recall = check_float(target_recall, "target_recall", minimum=0.0, strict=True, maximum=1.0)
        if len(self) == 0:
            raise ValueError("the index is empty; add vectors before tuning")
        positions, _ = topk_l2(queries, self.vectors(), k, num_threads=num_threads)
        truth = np.where(positions >= 0, self.ids[np.maximum(positions, 0)], -1)

        def measure(probes: int, tables: int) -> tuple[float, float]:
            start = time.perf_counter()
            found, _ = super(LshIndex, self).query(queries, k, probes, tables, None, num_threads)
            elapsed = time.perf_counter() - start
            return neighbour_recall(found, truth), len(queries) / max(elapsed, 1e-9)

        table_choices = [self.n_tables]
        if tune_tables:
            table_choices = sorted({max(1, self.n_tables * f // 4) for f in (1, 2, 3, 4)})
        best: dict[str, Any] | None = None
        for tables in table_choices:
            limit = max_probes or 256 * tables
            probes, (recall, qps) = tables, measure(tables, tables)
            while recall < target_recall and probes < limit:
                low = probes
                probes = min(2 * probes, limit)
                recall, qps = measure(probes, tables)
                if recall >= target_recall:  # binary search back down
                    high = probes
                    while high - low > max(1, low // 8):
                        middle = (low + high) // 2
                        r, q = measure(middle, tables)
                        if r >= target_recall:
                            high, recall, qps = middle, r, q
                        else:
                            low = middle
                    probes = high
                    recall, qps = measure(probes, tables)
            choice = {
                "n_probes": probes,
                "n_tables": tables,
                "recall": recall,
                "queries_per_second": qps,
                "reached": recall >= target_recall,
            }
            if best is None or _preference(choice) > _preference(best):
                best = choice
        assert best is not None
        self.set_defaults(int(best["n_probes"]), int(best["n_tables"]))
        return best

    @property
    def n_probes(self) -> int:
        """Probes a query uses by default."""
        return self.default_probes

    @n_probes.setter
    def n_probes(self, value: int) -> None:
        self.set_defaults(value, self.default_tables)

    def __reduce__(self) -> Any:
        return (type(self).from_bytes, (bytes(self.to_bytes()),))

    def __repr__(self) -> str:
        width = f"{self.bucket_width:.4g}" if self.bucket_width is not None else "auto"
        return (
            f"LshIndex(dim={self.dim}, n_tables={self.n_tables}, n_hashes={self.n_hashes}, "
            f"bucket_width={width}, items={len(self)}, n_probes={self.n_probes})"
        )


def _preference(choice: dict[str, Any]) -> tuple[bool, float]:
    """Reached the target first, then the faster; among misses, the higher recall."""
    return choice["reached"], choice["queries_per_second"] if choice["reached"] else choice["recall"]
