"""Type stubs of the native module (checked against the build by mypy.stubtest)."""

from collections.abc import Iterator
from os import PathLike
from typing import final

import numpy as np
import numpy.typing as npt
from typing_extensions import Self, disjoint_base

_IdArray = npt.NDArray[np.int32] | npt.NDArray[np.int64]
_Csr = tuple[_IdArray, _IdArray, int]
_Batch = tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]
_Neighbours = tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]

__all__ = [
    "EpochBatches",
    "LshIndex",
    "WarpSampler",
    "__version__",
    "rank_weights",
    "rank_weights_by_id",
    "simd_kernel",
    "sqdist",
    "topk_l2",
]
__version__: str

def simd_kernel() -> str: ...
def rank_weights(
    pos_dist: npt.NDArray[np.float32],
    neg_dist: npt.NDArray[np.float32],
    margin: float,
    n_items: int,
    num_threads: int = 0,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]: ...
def rank_weights_by_id(
    anchors: npt.NDArray[np.float32],
    targets: npt.NDArray[np.float32],
    negatives: npt.NDArray[np.int64],
    pos_dist: npt.NDArray[np.float32],
    margin: float,
    n_items: int,
    num_threads: int = 0,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]: ...
def topk_l2(
    queries: npt.NDArray[np.float32],
    items: npt.NDArray[np.float32],
    k: int,
    exclude: _Csr | None = None,
    num_threads: int = 0,
    exclude_ids: npt.NDArray[np.uint32] | None = None,
) -> _Neighbours: ...
def sqdist(
    queries: npt.NDArray[np.float32],
    items: npt.NDArray[np.float32],
    num_threads: int = 0,
) -> npt.NDArray[np.float32]: ...

@disjoint_base
class WarpSampler:
    def __new__(
        cls,
        indptr: _IdArray,
        indices: _IdArray,
        n_items: int,
        batch_size: int,
        n_negatives: int,
        seed: int,
        num_threads: int,
        check_negative: bool,
        prefetch: int,
        values: npt.NDArray[np.float32] | None = None,
        popularity_exponent: float = 0.0,
        rank: int = 0,
        world_size: int = 1,
    ) -> Self: ...
    @property
    def n_batches(self) -> int: ...
    @property
    def n_pairs(self) -> int: ...
    @property
    def rank(self) -> int: ...
    @property
    def world_size(self) -> int: ...
    @property
    def n_users(self) -> int: ...
    @property
    def n_items(self) -> int: ...
    @property
    def batch_size(self) -> int: ...
    @property
    def n_negatives(self) -> int: ...
    @property
    def seed(self) -> int: ...
    @property
    def weighted(self) -> bool: ...
    @property
    def popularity_exponent(self) -> float: ...
    @property
    def check_negative(self) -> bool: ...
    @property
    def num_threads(self) -> int: ...
    @property
    def prefetch(self) -> int: ...
    @property
    def epoch(self) -> int: ...
    def set_epoch(self, epoch: int) -> None: ...
    def epoch_batches(self) -> EpochBatches: ...
    def __iter__(self) -> EpochBatches: ...
    def __len__(self) -> int: ...
    def next_batch(self) -> _Batch: ...

@final
class EpochBatches(Iterator[_Batch]):
    def __iter__(self) -> EpochBatches: ...
    def __next__(self) -> _Batch: ...
    def __len__(self) -> int: ...

@disjoint_base
class LshIndex:
    def __new__(
        cls, dim: int, n_tables: int = 16, n_hashes: int = 16, bucket_width: float | None = None, seed: int = 0
    ) -> Self: ...
    def add_items(self, vectors: npt.NDArray[np.float32], ids: npt.NDArray[np.int64], num_threads: int = 0) -> None: ...
    def query(
        self,
        queries: npt.NDArray[np.float32],
        k: int,
        n_probes: int | None = None,
        n_tables: int | None = None,
        exclude: _Csr | None = None,
        num_threads: int = 0,
        exclude_ids: npt.NDArray[np.uint32] | None = None,
    ) -> _Neighbours: ...
    def set_defaults(self, n_probes: int, n_tables: int) -> None: ...
    def vectors(self) -> npt.NDArray[np.float32]: ...
    @property
    def ids(self) -> npt.NDArray[np.int64]: ...
    def save(self, path: str | PathLike[str]) -> None: ...
    @classmethod
    def load(cls, path: str | PathLike[str], num_threads: int = 0) -> Self: ...
    def to_bytes(self) -> bytes: ...
    @classmethod
    def from_bytes(cls, data: bytes, num_threads: int = 0) -> Self: ...
    def memory_bytes(self) -> int: ...
    def __len__(self) -> int: ...
    @property
    def dim(self) -> int: ...
    @property
    def n_tables(self) -> int: ...
    @property
    def n_hashes(self) -> int: ...
    @property
    def bucket_width(self) -> float | None: ...
    @property
    def seed(self) -> int: ...
    @property
    def default_probes(self) -> int: ...
    @property
    def default_tables(self) -> int: ...
