//! Binding of the stateless kernels: rank weights, exact top-K, pairwise distances.

use crate::{csr_from_arg, shape_of, CsrArg, OrRaise};
use cml_core::topk::{self, Neighbours, Vectors};
use numpy::ndarray::Array2;
use numpy::{
    IntoPyArray, PyArray1, PyArray2, PyReadonlyArray1, PyReadonlyArray2, PyUntypedArrayMethods,
};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

/// Borrows a C-contiguous `(n, d)` float32 array as core vectors.
pub(crate) fn vectors<'a>(
    name: &str,
    array: &'a PyReadonlyArray2<'_, f32>,
) -> PyResult<Vectors<'a>> {
    let dim = array.shape()[1];
    let data = array
        .as_slice()
        .map_err(|_| PyValueError::new_err(format!("{name} must be C-contiguous")))?;
    if dim == 0 {
        return Err(PyValueError::new_err(format!(
            "{name} has shape {} with no columns; vectors need at least one dimension",
            shape_of(array.shape())
        )));
    }
    Vectors::new(data, dim).or_raise()
}

type WeightArrays<'py> = (Bound<'py, PyArray1<f32>>, Bound<'py, PyArray1<i64>>);

/// `(weights, hardest)` of CML's WARP loss for squared distances `pos_dist` (B,)
/// and `neg_dist` (B, U): w = ln(floor(n_items * M / U) + 1) with M the number of
/// negatives inside the margin, and the index of the closest negative.
#[pyfunction]
#[pyo3(signature = (pos_dist, neg_dist, margin, n_items, num_threads=0))]
fn rank_weights<'py>(
    py: Python<'py>,
    pos_dist: PyReadonlyArray1<'py, f32>,
    neg_dist: PyReadonlyArray2<'py, f32>,
    margin: f32,
    n_items: i64,
    num_threads: usize,
) -> PyResult<WeightArrays<'py>> {
    let (rows, u) = (neg_dist.shape()[0], neg_dist.shape()[1]);
    if pos_dist.len() != rows {
        return Err(PyValueError::new_err(format!(
            "pos_dist has {} entries but neg_dist has {rows} rows (shape {}); pass one positive distance per row",
            pos_dist.len(),
            shape_of(neg_dist.shape())
        )));
    }
    if u == 0 {
        return Err(PyValueError::new_err(
            "neg_dist has no columns; each pair needs at least one negative",
        ));
    }
    if n_items < 1 {
        return Err(PyValueError::new_err(format!(
            "n_items must be at least 1, got {n_items}"
        )));
    }
    if !margin.is_finite() {
        return Err(PyValueError::new_err(format!(
            "margin must be finite, got {margin}"
        )));
    }
    let pos = pos_dist
        .as_slice()
        .map_err(|_| PyValueError::new_err("pos_dist must be C-contiguous"))?;
    let neg = vectors("neg_dist", &neg_dist)?;
    let (weights, hardest) = py
        .detach(|| {
            Vectors::new(pos, 1)?.check_finite("pos_dist")?;
            neg.check_finite("neg_dist")?;
            Ok(cml_core::rank::rank_weights(
                pos,
                neg.data,
                u,
                margin,
                n_items as u64,
                num_threads,
            ))
        })
        .or_raise()?;
    Ok((weights.into_pyarray(py), hardest.into_pyarray(py)))
}

pub(crate) type NeighbourArrays<'py> = (Bound<'py, PyArray2<i64>>, Bound<'py, PyArray2<f32>>);

/// `(ids, sqdist)` of a top-K result as two (Q, k) numpy arrays, without copying.
pub(crate) fn neighbour_arrays(py: Python<'_>, found: Neighbours) -> NeighbourArrays<'_> {
    let rows = found.ids.len() / found.k;
    let ids = Array2::from_shape_vec((rows, found.k), found.ids).expect("Q x k ids");
    let sqdist = Array2::from_shape_vec((rows, found.k), found.sqdist).expect("Q x k distances");
    (ids.into_pyarray(py), sqdist.into_pyarray(py))
}

/// `k` as a count, or the ValueError every top-K entry point raises.
pub(crate) fn check_k(k: i64) -> PyResult<usize> {
    if k < 1 {
        return Err(PyValueError::new_err(format!(
            "k must be at least 1, got {k}"
        )));
    }
    Ok(k as usize)
}

/// Exact k nearest items of each query by squared L2 distance: `(ids, sqdist)`,
/// each `(Q, k)`, nearest first, padded with -1 / +inf. `exclude` is
/// `(indptr, indices, n_cols)` of a CSR matrix with one row per query.
#[pyfunction]
#[pyo3(signature = (queries, items, k, exclude=None, num_threads=0))]
fn topk_l2<'py>(
    py: Python<'py>,
    queries: PyReadonlyArray2<'py, f32>,
    items: PyReadonlyArray2<'py, f32>,
    k: i64,
    exclude: Option<CsrArg<'py>>,
    num_threads: usize,
) -> PyResult<NeighbourArrays<'py>> {
    let k = check_k(k)?;
    let (q, x) = (vectors("queries", &queries)?, vectors("items", &items)?);
    if q.dim != x.dim {
        return Err(PyValueError::new_err(format!(
            "queries have shape {} but items have shape {}; both need the same number of columns",
            shape_of(queries.shape()),
            shape_of(items.shape())
        )));
    }
    if x.is_empty() {
        return Err(PyValueError::new_err(format!(
            "items has shape {}; there is nothing to search",
            shape_of(items.shape())
        )));
    }
    let exclude = exclude
        .map(|e| csr_from_arg(py, "exclude", &e))
        .transpose()?;
    let found = py
        .detach(|| {
            q.check_finite("queries")?;
            x.check_finite("items")?;
            topk::topk_l2(q, x, k, exclude.as_ref(), num_threads)
        })
        .or_raise()?;
    Ok(neighbour_arrays(py, found))
}

/// All squared distances between `queries` (Q, d) and `items` (N, d), as (Q, N).
#[pyfunction]
#[pyo3(signature = (queries, items, num_threads=0))]
fn sqdist<'py>(
    py: Python<'py>,
    queries: PyReadonlyArray2<'py, f32>,
    items: PyReadonlyArray2<'py, f32>,
    num_threads: usize,
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    let (q, x) = (vectors("queries", &queries)?, vectors("items", &items)?);
    let out = py
        .detach(|| {
            q.check_finite("queries")?;
            x.check_finite("items")?;
            topk::sqdist_matrix(q, x, num_threads)
        })
        .or_raise()?;
    Ok(Array2::from_shape_vec((q.len(), x.len()), out)
        .expect("Q x N distances")
        .into_pyarray(py))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(rank_weights, m)?)?;
    m.add_function(wrap_pyfunction!(topk_l2, m)?)?;
    m.add_function(wrap_pyfunction!(sqdist, m)?)?;
    Ok(())
}
