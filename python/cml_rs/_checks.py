"""Input normalisation shared by every public entry point.

Python's share of checking is the types: array-likes become C-contiguous
float32 / int64 numpy arrays (copied only when they must be), scipy matrices
become CSR, a 1-D query becomes one row. Ranges and shapes of what goes to
the native core are checked there, once, and its messages are the ones users
see. Arguments that never leave Python (model hyper-parameters, N, K) are
checked here with the same wording.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any

import numpy as np
import scipy.sparse as sp

CsrArrays = tuple[np.ndarray, np.ndarray, int]


def as_real_array(x: Any, name: str, ndim: int) -> np.ndarray:
    """`x` as a C-contiguous float32 array of `ndim` dimensions; ints and float64 are converted."""
    if sp.issparse(x):
        raise TypeError(f"{name} must be a dense array, got a scipy sparse matrix")
    try:
        array = np.asarray(x)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{name} must be an array of numbers: {error}") from None
    if array.dtype == bool or not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise TypeError(f"{name} must hold real numbers (float or int), got dtype {array.dtype}")
    if array.ndim != ndim:
        shape = "(n, d)" if ndim == 2 else "(n,)"
        raise ValueError(f"{name} must be {ndim}-D {shape}, got shape {array.shape}")
    return np.ascontiguousarray(array, dtype=np.float32)


def as_vectors(x: Any, name: str) -> np.ndarray:
    """`x` as a C-contiguous float32 (n, d) array."""
    return as_real_array(x, name, 2)


def as_queries(x: Any, name: str = "queries") -> tuple[np.ndarray, bool]:
    """Queries as a (Q, d) float32 array, and whether a single 1-D query was given."""
    single = not sp.issparse(x) and np.ndim(x) == 1
    return as_vectors(np.asarray(x)[None, :] if single else x, name), single


def as_csr(matrix: Any, name: str) -> sp.csr_matrix:
    """`matrix` as scipy CSR: other sparse formats are converted with a warning,
    dense arrays are rejected (an implicit-feedback matrix is sparse)."""
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
        matrix = sp.csr_matrix(matrix)
    return matrix


def require_csr(matrix: Any, name: str) -> sp.csr_matrix:
    """`matrix` when it is already CSR; anything else is a ValueError saying what to pass."""
    if not (sp.issparse(matrix) and matrix.format == "csr"):
        kind = f"a {matrix.format.upper()} matrix" if sp.issparse(matrix) else type(matrix).__name__
        raise ValueError(f"{name} must be a CSR matrix, got {kind}; pass scipy.sparse.csr_matrix({name})")
    return matrix


def csr_arrays(matrix: sp.csr_matrix) -> CsrArrays:
    """The (indptr, indices, n_cols) triple the native layer takes (no copy when the index
    arrays are int32 or int64, as scipy makes them; other integer types are converted)."""

    def index_array(array: np.ndarray) -> np.ndarray:
        if array.dtype not in (np.int32, np.int64):
            array = array.astype(np.int64)
        return np.ascontiguousarray(array)

    return index_array(matrix.indptr), index_array(matrix.indices), int(matrix.shape[1])


def as_ids(values: Any, name: str) -> tuple[np.ndarray, bool]:
    """Ids as a 1-D int64 array, and whether a scalar was given. Floats are
    accepted only when they are whole numbers (0.7 is a mistake, not id 0)."""
    array = np.asarray(values)
    single = array.ndim == 0
    if array.size and array.dtype.kind == "f":
        if not np.all(np.isfinite(array)) or np.any(array != np.round(array)):
            raise TypeError(f"{name} must hold integer ids, got non-integral values such as {array.ravel()[0]!r}")
    elif array.size and array.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integer ids, got dtype {array.dtype}")
    if array.ndim > 1:
        raise ValueError(f"{name} must be an id or a 1-D array of ids, got shape {array.shape}")
    if array.size and array.dtype.kind == "u" and array.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{name} holds ids beyond 2**63")
    return np.atleast_1d(array).astype(np.int64, copy=False).ravel(), single


def as_id_list(values: Any, name: str) -> np.ndarray | None:
    """Ids excluded for every query, as the sorted, unique uint32 array the native layer takes."""
    if values is None:
        return None
    ids, _ = as_ids(values, name)
    if ids.size and (ids.min() < 0 or ids.max() > np.iinfo(np.uint32).max):
        bad = ids[(ids < 0) | (ids > np.iinfo(np.uint32).max)][0]
        raise IndexError(f"{name} holds id {bad}; ids are between 0 and 2**32 - 1")
    return np.unique(ids).astype(np.uint32)


def check_ids_below(ids: np.ndarray, limit: int, name: str) -> np.ndarray:
    """`ids` when every one is in [0, limit); an IndexError naming the first that is not."""
    if ids.size and (ids.min() < 0 or ids.max() >= limit):
        bad = ids[(ids < 0) | (ids >= limit)][0]
        raise IndexError(f"{name} {bad} is out of range: ids must be in [0, {limit})")
    return ids


def check_int(value: Any, name: str, minimum: int = 1, maximum: int | None = None) -> int:
    """`value` as an int in [minimum, maximum], or a clear TypeError / ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be at most {maximum}, got {value}")
    return int(value)


def as_float(value: Any, name: str) -> float:
    """`value` as a float (any real number), or a TypeError naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    return float(value)


def check_float(
    value: Any, name: str, minimum: float | None = None, strict: bool = False, maximum: float | None = None
) -> float:
    """`value` as a finite float within the bounds, or a clear TypeError / ValueError."""
    number = as_float(value, name)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {number}")
    if minimum is not None and (number < minimum or (strict and number == minimum)):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum}, got {number}")
    if maximum is not None and number > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {number}")
    return number
