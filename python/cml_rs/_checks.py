"""Input normalisation shared by every public entry point.

Array-likes become C-contiguous float32 / int64 numpy arrays (copied only when
they must be) and scipy matrices become CSR. The native layer then checks
values (NaN, id ranges) once, with the GIL released.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import scipy.sparse as sp

CsrArrays = tuple[np.ndarray, np.ndarray, int]


def as_vectors(x: Any, name: str, dim: int | None = None) -> np.ndarray:
    """`x` as a C-contiguous float32 (n, d) array; float64 and ints are converted."""
    if sp.issparse(x):
        raise TypeError(f"{name} must be a dense array of vectors, got a scipy sparse matrix")
    try:
        array = np.asarray(x)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{name} must be an array of numbers: {error}") from None
    if array.dtype == object or not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise TypeError(f"{name} must hold real numbers, got dtype {array.dtype}")
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n, d), got shape {array.shape}")
    if dim is not None and array.shape[1] != dim:
        raise ValueError(f"{name} must have {dim} columns (the vector dimension), got {array.shape[1]}")
    return np.ascontiguousarray(array, dtype=np.float32)


def as_queries(x: Any, name: str = "queries", dim: int | None = None) -> tuple[np.ndarray, bool]:
    """Queries as a (Q, d) float32 array, and whether a single 1-D query was given."""
    array = np.asarray(x) if not sp.issparse(x) else x
    single = getattr(array, "ndim", 0) == 1
    if single:
        array = array[None, :]
    return as_vectors(array, name, dim), single


def as_csr(matrix: Any, name: str, n_rows: int | None = None, n_cols: int | None = None) -> sp.csr_matrix:
    """`matrix` as scipy CSR: other sparse formats are converted with a warning,
    dense 2-D arrays are rejected (an implicit-feedback matrix is sparse)."""
    if not sp.issparse(matrix):
        raise TypeError(
            f"{name} must be a scipy.sparse matrix (CSR preferred), got {type(matrix).__name__}; "
            f"wrap dense data with scipy.sparse.csr_matrix(...)"
        )
    if matrix.format != "csr":
        warnings.warn(
            f"{name} is a {matrix.format.upper()} matrix; converting it to CSR once (pass CSR to avoid the copy)",
            stacklevel=3,
        )
        matrix = matrix.tocsr()
    if matrix.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got {matrix.ndim}-D")
    rows, cols = matrix.shape
    if n_rows is not None and rows != n_rows:
        raise ValueError(f"{name} must have {n_rows} rows, got {rows} (shape {matrix.shape})")
    if n_cols is not None and cols != n_cols:
        raise ValueError(f"{name} must have {n_cols} columns, got {cols} (shape {matrix.shape})")
    return matrix


def csr_arrays(matrix: sp.csr_matrix) -> CsrArrays:
    """The (indptr, indices, n_cols) triple the native layer takes (no copy)."""
    indptr = np.ascontiguousarray(matrix.indptr)
    indices = np.ascontiguousarray(matrix.indices)
    return indptr, indices, int(matrix.shape[1])


def check_positive_int(value: Any, name: str, minimum: int = 1) -> int:
    """`value` as an int >= minimum, or a clear TypeError / ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return int(value)


def check_num_threads(num_threads: Any) -> int:
    """Thread count: 0 means all cores."""
    return check_positive_int(num_threads, "num_threads", minimum=0)
