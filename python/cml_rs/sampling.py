"""The WARP negative sampler (SPEC section 2), produced by Rust threads.

Plug it into any torch loop::

    sampler = WarpSampler(train, batch_size=4096, n_negatives=20, seed=0)
    for epoch in range(20):
        for users, positives, negatives in sampler:   # one epoch, reshuffled each time
            u = torch.from_numpy(users)                # no copy
            ...
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from . import _native
from ._checks import as_csr, check_num_threads, check_positive_int

Batch = tuple[np.ndarray, np.ndarray, np.ndarray]


class WarpSampler:
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
    (torch DataLoader workers) and may be shared between Python threads.
    """

    def __init__(
        self,
        user_items: Any,
        batch_size: int = 4096,
        n_negatives: int = 20,
        seed: int = 0,
        num_threads: int = 0,
        check_negative: bool = True,
        prefetch: int = 4,
    ) -> None:
        matrix = as_csr(user_items, "user_items")
        self._matrix = matrix
        self._options = dict(
            batch_size=check_positive_int(batch_size, "batch_size"),
            n_negatives=check_positive_int(n_negatives, "n_negatives"),
            seed=check_positive_int(seed, "seed", minimum=0),
            num_threads=check_num_threads(num_threads),
            check_negative=bool(check_negative),
            prefetch=check_positive_int(prefetch, "prefetch"),
        )
        self._native = _native.WarpSampler(
            np.ascontiguousarray(matrix.indptr),
            np.ascontiguousarray(matrix.indices),
            int(matrix.shape[1]),
            **self._options,
        )

    def __iter__(self) -> Iterator[Batch]:
        return self._native.epoch_batches()

    def __len__(self) -> int:
        return int(self._native.n_batches)

    def next_batch(self) -> Batch:
        """The next batch of an endless stream that runs through epoch after epoch."""
        return self._native.next_batch()

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration (and a restarted ``next_batch`` stream) epoch ``epoch``."""
        self._native.set_epoch(check_positive_int(epoch, "epoch", minimum=0))

    @property
    def epoch(self) -> int:
        """The epoch the next iteration produces."""
        return int(self._native.epoch)

    @property
    def n_users(self) -> int:
        return int(self._native.n_users)

    @property
    def n_items(self) -> int:
        return int(self._native.n_items)

    @property
    def n_pairs(self) -> int:
        """Distinct training pairs, i.e. pairs per epoch."""
        return int(self._native.n_pairs)

    @property
    def batch_size(self) -> int:
        return int(self._native.batch_size)

    @property
    def n_negatives(self) -> int:
        return int(self._native.n_negatives)

    def __reduce__(self) -> Any:
        # Rebuilds from the matrix and options (for spawn-based workers); the
        # copy starts at this sampler's current epoch.
        return (_restore, (self._matrix, self._options, self.epoch))

    def __repr__(self) -> str:
        return (
            f"WarpSampler(n_users={self.n_users}, n_items={self.n_items}, n_pairs={self.n_pairs}, "
            f"batch_size={self.batch_size}, n_negatives={self.n_negatives}, epoch={self.epoch})"
        )


def _restore(matrix: Any, options: dict, epoch: int) -> WarpSampler:
    sampler = WarpSampler(matrix, **options)
    sampler.set_epoch(epoch)
    return sampler
