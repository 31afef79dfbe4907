"""Euclidean LSH index for fast approximate top-K (SPEC section 6).

    index = LshIndex(dim=100)
    index.add_items(model.item_factors)
    index.tune(model.user_factors[:500], k=50, target_recall=0.9)
    ids, sqdist = index.query(model.user_factors, k=50, exclude=train)

p-stable hashes (Datar et al. 2004) in ``n_tables`` tables of ``n_hashes``
each, query-directed multi-probe (Lv et al. 2007), candidates re-ranked by
exact squared distance. The work happens in Rust with the GIL released.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from . import _native
from ._checks import as_csr, as_queries, as_vectors, check_num_threads, check_positive_int, csr_arrays
from .kernels import topk_l2

__all__ = ["LshIndex"]


class LshIndex:
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
    """

    def __init__(
        self,
        dim: int,
        n_tables: int = 16,
        n_hashes: int = 16,
        bucket_width: float | None = None,
        seed: int = 0,
    ) -> None:
        self._native = _native.LshIndex(
            check_positive_int(dim, "dim"),
            check_positive_int(n_tables, "n_tables"),
            check_positive_int(n_hashes, "n_hashes"),
            None if bucket_width is None else float(bucket_width),
            check_positive_int(seed, "seed", minimum=0),
        )

    @classmethod
    def _wrap(cls, native: Any) -> LshIndex:
        index = cls.__new__(cls)
        index._native = native
        return index

    # -------------------------------------------------------------- building

    def add_items(self, vectors: Any, ids: Any | None = None, num_threads: int = 0) -> None:
        """Adds ``vectors`` (n, dim) under ``ids`` (default: the next n integers) and rebuilds the tables."""
        array = as_vectors(vectors, "vectors", dim=self.dim)
        if ids is None:
            start = int(self._native.ids().max()) + 1 if len(self) else 0
            id_array = np.arange(start, start + len(array), dtype=np.int64)
        else:
            id_array = np.ascontiguousarray(np.asarray(ids), dtype=np.int64)
            if id_array.ndim != 1 or len(id_array) != len(array):
                raise ValueError(f"ids must be 1-D with one id per vector ({len(array)}), got shape {id_array.shape}")
            if len(id_array) and id_array.min() < 0:
                raise ValueError(f"ids must be non-negative, got {id_array.min()}")
        self._native.add_items(array, id_array, check_num_threads(num_threads))

    # -------------------------------------------------------------- querying

    def query(
        self,
        queries: Any,
        k: int = 10,
        n_probes: int | None = None,
        exclude: Any | None = None,
        num_threads: int = 0,
        n_tables: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, sqdist)`` of the k nearest indexed vectors found.

        Parameters
        ----------
        queries : array-like, (Q, dim) or (dim,)
        k : int
        n_probes : int, optional
            Buckets visited per query over all tables (the home bucket of each
            table first); default: the tuned value (4 per table before tuning).
        exclude : scipy.sparse matrix (Q, n_ids), optional
            Row q lists ids query q must not get back; skipped inside the search.
        n_tables : int, optional
            Search only the first tables (default: the tuned value, else all).

        Returns
        -------
        ids : int64 (Q, k), nearest first, -1 where fewer were found
        sqdist : float32 (Q, k), exact squared distances, +inf where padded
        """
        query_array, single = as_queries(queries, dim=self.dim)
        excluded = None
        if exclude is not None:
            matrix = as_csr(exclude, "exclude", n_rows=len(query_array))
            excluded = csr_arrays(matrix)
        ids, dist = self._native.query(
            query_array,
            check_positive_int(k, "k"),
            None if n_probes is None else check_positive_int(n_probes, "n_probes"),
            None if n_tables is None else check_positive_int(n_tables, "n_tables"),
            excluded,
            check_num_threads(num_threads),
        )
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
    ) -> dict[str, float]:
        """Chooses the fewest probes (and, with ``tune_tables``, the fastest
        number of tables) that reach ``target_recall`` of the exact top-``k``
        on ``sample_queries``, and makes them the defaults.

        Returns the choice: ``n_probes``, ``n_tables``, the ``recall`` reached
        and the sample's ``queries_per_second``. When even ``max_probes``
        (default: 256 per table) cannot reach the target, the best found is
        kept and ``reached`` is False.
        """
        queries, _ = as_queries(sample_queries, "sample_queries", dim=self.dim)
        k = check_positive_int(k, "k")
        if not 0.0 < target_recall <= 1.0:
            raise ValueError(f"target_recall must be in (0, 1], got {target_recall}")
        if len(self) == 0:
            raise ValueError("the index is empty; add vectors before tuning")
        threads = check_num_threads(num_threads)
        positions, _ = topk_l2(queries, self._native.vectors(), min(k, len(self)), num_threads=threads)
        truth = np.where(positions >= 0, self._native.ids()[np.maximum(positions, 0)], -1)

        def measure(probes: int, tables: int) -> tuple[float, float]:
            start = time.perf_counter()
            found, _ = self._native.query(queries, k, probes, tables, None, threads)
            elapsed = time.perf_counter() - start
            return _recall(found, truth), len(queries) / max(elapsed, 1e-9)

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
            if best is None or (
                choice["reached"],
                choice["queries_per_second"] if choice["reached"] else choice["recall"],
            ) > (
                best["reached"],
                best["queries_per_second"] if best["reached"] else best["recall"],
            ):
                best = choice
        assert best is not None
        self._native.set_defaults(int(best["n_probes"]), int(best["n_tables"]))
        return best

    # -------------------------------------------------------------- state

    @property
    def dim(self) -> int:
        return int(self._native.dim)

    @property
    def n_tables(self) -> int:
        return int(self._native.n_tables)

    @property
    def n_hashes(self) -> int:
        return int(self._native.n_hashes)

    @property
    def bucket_width(self) -> float | None:
        return self._native.bucket_width

    @property
    def n_probes(self) -> int:
        """Probes a query uses by default."""
        return int(self._native.default_probes)

    @n_probes.setter
    def n_probes(self, value: int) -> None:
        self._native.set_defaults(check_positive_int(value, "n_probes"), int(self._native.default_tables))

    @property
    def ids(self) -> np.ndarray:
        """The ids held, in storage order (grouped by bucket, not insertion order)."""
        return self._native.ids()

    def __len__(self) -> int:
        return len(self._native)

    def memory_bytes(self) -> int:
        """Bytes held by the index (vectors, ids, hash functions, tables)."""
        return int(self._native.memory_bytes())

    def save(self, path: str | os.PathLike) -> None:
        """Writes the index in cml-rs's versioned format with a CRC-32 (atomically)."""
        self._native.save(os.fspath(path))

    @classmethod
    def load(cls, path: str | os.PathLike, num_threads: int = 0) -> LshIndex:
        """Reads an index written by :meth:`save`; a truncated, corrupted or
        other-version file raises ValueError, a missing one OSError."""
        return cls._wrap(_native.LshIndex.load(os.fspath(path), check_num_threads(num_threads)))

    def __reduce__(self) -> Any:
        return (_from_bytes, (bytes(self._native.to_bytes()),))

    def __repr__(self) -> str:
        width = f"{self.bucket_width:.4g}" if self.bucket_width is not None else "auto"
        return (
            f"LshIndex(dim={self.dim}, n_tables={self.n_tables}, n_hashes={self.n_hashes}, "
            f"bucket_width={width}, items={len(self)}, n_probes={self.n_probes})"
        )


def _from_bytes(data: bytes) -> LshIndex:
    return LshIndex._wrap(_native.LshIndex.from_bytes(data))


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of the true neighbours (ids >= 0) that were found, over all queries."""
    hits = total = 0
    for got, want in zip(found, truth):
        want = want[want >= 0]
        hits += int(np.isin(want, got).sum())
        total += len(want)
    return hits / total if total else 1.0
