"""cml-rs: Collaborative Metric Learning (Hsieh et al., WWW 2017) with a Rust core.

Users and items share one Euclidean space, each vector kept in the unit ball,
and a user's recommendations are its nearest items. Rust does the
combinatorics and kernels (WARP sampling, rank weights, exact and LSH top-K);
torch does the learning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import _native

__version__: str = _native.__version__

from .kernels import rank_weights, sqdist, topk_l2
from .sampling import WarpSampler

__all__ = [
    "CML",
    "CollaborativeMetricLearning",
    "LshIndex",
    "WarpSampler",
    "__version__",
    "baselines",
    "datasets",
    "evaluation",
    "nn",
    "rank_weights",
    "retrieval",
    "sqdist",
    "topk_l2",
    "tune",
]

if TYPE_CHECKING:  # what the lazy exports below resolve to, for type checkers and IDEs
    from . import baselines, datasets, evaluation, nn, retrieval
    from .lsh import LshIndex
    from .model import CML, CollaborativeMetricLearning
    from .tuning import tune

# torch, scipy.stats and friends load only when the model side is used.
_LAZY = {
    "CML": ("model", "CML"),
    "CollaborativeMetricLearning": ("model", "CollaborativeMetricLearning"),
    "LshIndex": ("lsh", "LshIndex"),
    "baselines": ("baselines", None),
    "datasets": ("datasets", None),
    "evaluation": ("evaluation", None),
    "nn": ("nn", None),
    "retrieval": ("retrieval", None),
    "tune": ("tuning", "tune"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module_name, attribute = _LAZY[name]
        module = importlib.import_module(f".{module_name}", __name__)
        value = module if attribute is None else getattr(module, attribute)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cml_rs' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
