"""Side information for CML+F: feature blocks in, one normalised sparse matrix out.

Users pass one scipy matrix or a dict of named blocks (citeulike-t: tags and
words; MovieLens: genres and tags; ml-100k users: age, gender, occupation).
Each block is normalised on its own so that no block drowns the others by its
scale or width: values become ``log(1 + value)`` (counts are tempered, flags
stay equal), then each row of the block is scaled to unit length. The blocks
are then laid side by side. The transformation is stateless, so features of
items or users that arrive after training are prepared the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import scipy.sparse as sp

from ._checks import as_csr

__all__ = ["FeatureLayout", "prepare"]


class FeatureLayout:
    """The names and widths of the blocks a model was trained with, in order."""

    def __init__(self, blocks: list[tuple[str, int]]) -> None:
        self.blocks = blocks

    @property
    def width(self) -> int:
        return sum(width for _, width in self.blocks)

    def to_json(self) -> list[list[Any]]:
        return [[name, width] for name, width in self.blocks]

    @classmethod
    def from_json(cls, value: Any) -> FeatureLayout:
        if not (
            isinstance(value, list)
            and all(
                isinstance(b, list) and len(b) == 2 and isinstance(b[0], str) and isinstance(b[1], int) and b[1] > 0
                for b in value
            )
        ):
            raise ValueError(f"feature layout {value!r} is not a list of [name, width] pairs")
        return cls([(name, width) for name, width in value])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FeatureLayout) and self.blocks == other.blocks

    def __repr__(self) -> str:
        return "FeatureLayout(" + ", ".join(f"{n}: {w}" for n, w in self.blocks) + ")"


def prepare(
    features: Any, n_rows: int, name: str, layout: FeatureLayout | None = None
) -> tuple[sp.csr_matrix, FeatureLayout]:
    """``features`` (a matrix, or a dict of named blocks) as one normalised CSR matrix with
    ``n_rows`` rows, and its layout. With ``layout`` (a trained model's), the blocks must
    have the same names and widths."""
    blocks = dict(features) if isinstance(features, Mapping) else {"features": features}
    if not blocks:
        raise ValueError(f"{name} is an empty dict; pass at least one feature matrix")
    if layout is not None:
        expected = [n for n, _ in layout.blocks]
        if sorted(blocks) != sorted(expected) and not (expected == ["features"] and len(blocks) == 1):
            raise ValueError(
                f"{name} has blocks {sorted(blocks)} but the model was trained with {expected}; pass the same blocks"
            )
        if expected == ["features"] and len(blocks) == 1:
            blocks = {"features": next(iter(blocks.values()))}
    order = [n for n, _ in layout.blocks] if layout is not None else list(blocks)
    prepared, shapes = [], []
    for block in order:
        label = name if block == "features" else f"{name}[{block!r}]"
        matrix = sp.csr_matrix(as_csr(blocks[block], label), dtype=np.float32, copy=True)
        if matrix.shape[0] != n_rows:
            hint = "; pass its transpose" if matrix.shape[1] == n_rows else ""
            raise ValueError(f"{label} must have one row per entry ({n_rows}), got shape {matrix.shape}{hint}")
        if layout is not None:
            width = dict(layout.blocks)[block]
            if matrix.shape[1] != width:
                raise ValueError(f"{label} has {matrix.shape[1]} columns but the model was trained with {width}")
        if matrix.nnz and (not np.all(np.isfinite(matrix.data)) or matrix.data.min() < 0):
            raise ValueError(f"{label} must hold finite, non-negative values (counts, flags or weights)")
        if matrix.shape[1] == 0:
            raise ValueError(f"{label} has no columns")
        matrix.sum_duplicates()
        matrix.data = np.log1p(matrix.data)
        norms = np.sqrt(np.asarray(matrix.multiply(matrix).sum(axis=1)).ravel())
        matrix = sp.diags(1.0 / np.where(norms > 0, norms, 1.0)).astype(np.float32) @ matrix
        prepared.append(sp.csr_matrix(matrix, dtype=np.float32))
        shapes.append((block, matrix.shape[1]))
    combined = sp.hstack(prepared, format="csr", dtype=np.float32) if len(prepared) > 1 else prepared[0]
    return combined, FeatureLayout(shapes)
