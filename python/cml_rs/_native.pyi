"""Type stubs of the native module (checked against the build by mypy.stubtest)."""

from typing import final

import numpy as np
import numpy.typing as npt

_IdArray = npt.NDArray[np.int32] | npt.NDArray[np.int64]
_Csr = tuple[_IdArray, _IdArray, int]
_Batch = tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]

__version__: str

def simd_kernel() -> str: ...
def rank_weights(
    pos_dist: npt.NDArray[np.float32],
    neg_dist: npt.NDArray[np.float32],
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
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]: ...
def sqdist(
    queries: npt.NDArray[np.float32],
    items: npt.NDArray[np.float32],
    num_threads: int = 0,
) -> npt.NDArray[np.float32]: ...

@final
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
    ) -> WarpSampler: ...
    @property
    def n_batches(self) -> int: ...
    @property
    def n_pairs(self) -> int: ...
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
    def check_negative(self) -> bool: ...
    @property
    def epoch(self) -> int: ...
    def set_epoch(self, epoch: int) -> None: ...
    def epoch_batches(self) -> EpochBatches: ...
    def next_batch(self) -> _Batch: ...

@final
class EpochBatches:
    def __iter__(self) -> EpochBatches: ...
    def __next__(self) -> _Batch: ...
    def __len__(self) -> int: ...
