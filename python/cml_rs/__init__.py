"""cml-rs: Collaborative Metric Learning (Hsieh et al., WWW 2017) with a Rust core.

Users and items share one Euclidean space, each vector kept in the unit ball,
and a user's recommendations are its nearest items. Rust does the
combinatorics and kernels (WARP sampling, rank weights, exact and LSH top-K);
torch does the learning.
"""

from __future__ import annotations

from . import _native
from .kernels import rank_weights, sqdist, topk_l2
from .sampling import WarpSampler

__version__: str = _native.__version__

__all__ = [
    "WarpSampler",
    "__version__",
    "rank_weights",
    "sqdist",
    "topk_l2",
]
