"""The WARP negative sampler (Hsieh et al. 2017), produced by Rust threads.

Plug it into any torch loop::

    sampler = WarpSampler(train, batch_size=4096, n_negatives=20, seed=0)
    for epoch in range(20):
        for users, positives, negatives in sampler:   # one epoch, reshuffled each time
            u = torch.from_numpy(users)                # no copy
            ...
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _native
from ._checks import as_csr, as_float, csr_arrays

__all__ = ["WarpSampler"]

Batch = tuple[np.ndarray, np.ndarray, np.ndarray]


class WarpSampler(_native.WarpSampler):
    """Batches of ``(users, positives, negatives)`` for CML's WARP loss.

    Every training pair (stored entry of ``user_items``) appears exactly once per
    epoch, in a seeded order; the final partial batch is kept. Each pair gets
    ``n_negatives`` items drawn uniformly from the items its user has not
    interacted with (from all items when ``check_negative=False``). Batches are
    made on Rust threads up to ``prefetch`` batches ahead, with the GIL released,
    and are identical for a given ``seed`` whatever ``num_threads`` is.

    Parameters
    ----------
    user_items : scipy.sparse matrix, shape (n_users, n_items)
        Training interactions; CSR is used as is, other formats are converted
        once with a warning. Values are ignored; repeated entries count once.
    batch_size : int
        Pairs per batch.
    n_negatives : int
        Negatives per pair (U; the paper uses 20).
    seed : int
        Seed of the epoch permutations and of the negatives.
    num_threads : int
        Threads that draw negatives; 0 means all cores.
    check_negative : bool
        Never draw one of the user's positives as a negative.
    prefetch : int
        Batches prepared ahead of the consumer.
    weighted : bool
        Use the matrix's values as confidence: an epoch then draws as many
        pairs as there are, each in proportion to ``log(1 + value)`` (a pair
        with value 0 is never drawn; equal values give the plain epoch).
        Values must be finite and non-negative.
    popularity_exponent : float
        Draw negatives in proportion to (item popularity + 1)^this instead of
        uniformly (0). With the loss keeping the hardest of the U negatives,
        this is the two-stage negative sampling of Tran et al. (SIGIR 2019):
        popular items, the likelier impostors, are offered more often.
    rank, world_size : int
        Data-parallel training: draw only share ``rank`` (0-based) of
        ``world_size`` of every epoch. Every rank computes the same seeded
        order, so the shares are disjoint and cover the epoch, and each pair
        keeps the negatives it would get in one process.

    Raises
    ------
    ValueError
        If the matrix is empty, or (with ``check_negative``) a user has every
        item as a positive, so no negative exists for it.

    Notes
    -----
    Iterating yields one epoch and moves on: the k-th ``for`` loop over a fresh
    sampler is epoch k. ``set_epoch(e)`` chooses the next epoch explicitly.
    ``next_batch()`` instead serves an endless stream across epochs, for loops
    written like the reference implementation. The sampler survives ``fork``
    (torch DataLoader workers), may be shared between Python threads, and
    pickles (the copy starts at the original's current epoch).
    """

    def __new__(
        cls,
        user_items: Any,
        batch_size: int = 4096,
        n_negatives: int = 20,
        seed: int = 0,
        num_threads: int = 0,
        check_negative: bool = True,
        prefetch: int = 4,
        weighted: bool = False,
        popularity_exponent: float = 0.0,
        rank: int = 0,
        world_size: int = 1,
    ) -> WarpSampler:
        matrix = as_csr(user_items, "user_items")
        values = np.ascontiguousarray(matrix.data, dtype=np.float32) if weighted else None
        exponent = as_float(popularity_exponent, "popularity_exponent")
        sampler = super().__new__(
            cls,
            *csr_arrays(matrix),
            batch_size,
            n_negatives,
            seed,
            num_threads,
            bool(check_negative),
            prefetch,
            values,
            exponent,
            rank,
            world_size,
        )
        sampler._matrix, sampler._values_given = matrix, bool(weighted)
        return sampler

    def __reduce__(self) -> Any:
        options = (self.batch_size, self.n_negatives, self.seed, self.num_threads, self.check_negative, self.prefetch)
        options += (self._values_given, self.popularity_exponent, self.rank, self.world_size)
        return (_restore, (self._matrix, options, self.epoch))

    def __repr__(self) -> str:
        return (
            f"WarpSampler(n_users={self.n_users}, n_items={self.n_items}, n_pairs={self.n_pairs}, "
            f"batch_size={self.batch_size}, n_negatives={self.n_negatives}, epoch={self.epoch}"
            + (f", rank={self.rank}, world_size={self.world_size})" if self.world_size > 1 else ")")
        )


def _restore(matrix: Any, options: tuple, epoch: int) -> WarpSampler:
    sampler = WarpSampler(matrix, *options)
    sampler.set_epoch(epoch)
    return sampler
