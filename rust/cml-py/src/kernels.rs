//! Binding of the stateless kernels: rank weights, exact top-K, pairwise distances.

use crate::{detached, CsrArg, CsrParts, Int};
use cml_core::csr::Filter;
use cml_core::topk;
use cml_core::vectors::{Neighbours, Vectors};
use numpy::ndarray::Array2;
use numpy::{IntoPyArray, PyArray1, PyArray2, PyReadonlyArray1, PyReadonlyArray2};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

/// Borrows a C-contiguous `(n, d)` float32 array as core vectors.
pub(crate) fn vectors<'a>(
    name: &str,
    array: &'a PyReadonlyArray2<'_, f32>,
) -> PyResult<Vectors<'a>> {
    let dim = array.as_array().ncols();
    let data = array
        .as_slice()
        .map_err(|_| PyValueError::new_err(format!("{name} must be C-contiguous")))?;
    Vectors::new(name, data, dim).map_err(crate::to_py_err)
}

type WeightArrays<'py> = (Bound<'py, PyArray1<f32>>, Bound<'py, PyArray1<i64>>);

/// `(weights, hardest)` of CML's WARP loss for squared distances `pos_dist` (B,)
/// and `neg_dist` (B, U): w = ln(floor(n_items * M / U) + 1) with M the number of
/// negatives inside the margin, and the index of the closest negative.
#[pyfunction]
#[pyo3(signature = (pos_dist, neg_dist, margin, n_items, num_threads=Int::ZERO),
       text_signature = "(pos_dist, neg_dist, margin, n_items, num_threads=0)")]
fn rank_weights<'py>(
    py: Python<'py>,
    pos_dist: PyReadonlyArray1<'py, f32>,
    neg_dist: PyReadonlyArray2<'py, f32>,
    margin: f32,
    n_items: Int,
    num_threads: Int,
) -> PyResult<WeightArrays<'py>> {
    let (n_items, threads) = (n_items.count("n_items")?, num_threads.threads()?);
    let pos = pos_dist
        .as_slice()
        .map_err(|_| PyValueError::new_err("pos_dist must be C-contiguous"))?;
    let neg = vectors("neg_dist", &neg_dist)?;
    let (weights, hardest) = detached(py, || {
        cml_core::rank::rank_weights(pos, neg, margin, n_items, threads)
    })?;
    Ok((weights.into_pyarray(py), hardest.into_pyarray(py)))
}

/// `rank_weights` with the negatives' squared distances computed natively:
/// `anchors` (B, r) are the users, `targets` (N, r) the item vectors and
/// `negatives` (B, U) the ids of each pair's negatives among them.
#[pyfunction]
#[pyo3(signature = (anchors, targets, negatives, pos_dist, margin, n_items, num_threads=Int::ZERO),
       text_signature = "(anchors, targets, negatives, pos_dist, margin, n_items, num_threads=0)")]
#[allow(clippy::too_many_arguments)]
fn rank_weights_by_id<'py>(
    py: Python<'py>,
    anchors: PyReadonlyArray2<'py, f32>,
    targets: PyReadonlyArray2<'py, f32>,
    negatives: PyReadonlyArray2<'py, i64>,
    pos_dist: PyReadonlyArray1<'py, f32>,
    margin: f32,
    n_items: Int,
    num_threads: Int,
) -> PyResult<WeightArrays<'py>> {
    let (n_items, threads) = (n_items.count("n_items")?, num_threads.threads()?);
    let (a, t) = (vectors("anchors", &anchors)?, vectors("targets", &targets)?);
    let ids = negatives
        .as_slice()
        .map_err(|_| PyValueError::new_err("negatives must be C-contiguous"))?;
    let pos = pos_dist
        .as_slice()
        .map_err(|_| PyValueError::new_err("pos_dist must be C-contiguous"))?;
    let (weights, hardest) = detached(py, || {
        cml_core::rank::rank_weights_by_id(a, t, ids, pos, margin, n_items, threads)
    })?;
    Ok((weights.into_pyarray(py), hardest.into_pyarray(py)))
}

pub(crate) type NeighbourArrays<'py> = (Bound<'py, PyArray2<i64>>, Bound<'py, PyArray2<f32>>);

/// `(ids, sqdist)` of a top-K result as two (Q, k) numpy arrays, without copying.
pub(crate) fn neighbour_arrays(py: Python<'_>, found: Neighbours) -> NeighbourArrays<'_> {
    let rows = found.ids.len().checked_div(found.k).unwrap_or(0);
    let ids = Array2::from_shape_vec((rows, found.k), found.ids).expect("Q x k ids");
    let sqdist = Array2::from_shape_vec((rows, found.k), found.sqdist).expect("Q x k distances");
    (ids.into_pyarray(py), sqdist.into_pyarray(py))
}

/// Exact k nearest items of each query by squared L2 distance: `(ids, sqdist)`,
/// each `(Q, min(k, N))`, nearest first, padded with -1 / +inf. `exclude` is
/// `(indptr, indices, n_cols)` of a CSR matrix with one row per query;
/// `exclude_ids` (sorted, unique) are skipped for every query.
#[pyfunction]
#[pyo3(signature = (queries, items, k, exclude=None, num_threads=Int::ZERO, exclude_ids=None),
       text_signature = "(queries, items, k, exclude=None, num_threads=0, exclude_ids=None)")]
fn topk_l2<'py>(
    py: Python<'py>,
    queries: PyReadonlyArray2<'py, f32>,
    items: PyReadonlyArray2<'py, f32>,
    k: Int,
    exclude: Option<CsrArg<'py>>,
    num_threads: Int,
    exclude_ids: Option<PyReadonlyArray1<'py, u32>>,
) -> PyResult<NeighbourArrays<'py>> {
    let (k, threads) = (k.count("k")?, num_threads.threads()?);
    let (q, x) = (vectors("queries", &queries)?, vectors("items", &items)?);
    let exclude = exclude
        .as_ref()
        .map(|e| CsrParts::borrow("exclude", e))
        .transpose()?;
    let banned = id_slice("exclude_ids", &exclude_ids)?;
    let found = detached(py, || {
        let exclude = exclude.as_ref().map(CsrParts::to_csr).transpose()?;
        let filter = Filter {
            rows: exclude.as_ref(),
            ids: banned,
        };
        topk::topk_l2(q, x, k, filter, threads)
    })?;
    Ok(neighbour_arrays(py, found))
}

/// The contents of an optional 1-D uint32 id array (empty when absent).
pub(crate) fn id_slice<'a>(
    name: &str,
    ids: &'a Option<PyReadonlyArray1<'_, u32>>,
) -> PyResult<&'a [u32]> {
    match ids {
        None => Ok(&[]),
        Some(array) => array
            .as_slice()
            .map_err(|_| PyValueError::new_err(format!("{name} must be C-contiguous"))),
    }
}

/// All squared distances between `queries` (Q, d) and `items` (N, d), as (Q, N).
#[pyfunction]
#[pyo3(signature = (queries, items, num_threads=Int::ZERO),
       text_signature = "(queries, items, num_threads=0)")]
fn sqdist<'py>(
    py: Python<'py>,
    queries: PyReadonlyArray2<'py, f32>,
    items: PyReadonlyArray2<'py, f32>,
    num_threads: Int,
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    let threads = num_threads.threads()?;
    let (q, x) = (vectors("queries", &queries)?, vectors("items", &items)?);
    let out = detached(py, || topk::sqdist_matrix(q, x, threads))?;
    Ok(Array2::from_shape_vec((q.len(), x.len()), out)
        .expect("Q x N distances")
        .into_pyarray(py))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(rank_weights, m)?)?;
    m.add_function(wrap_pyfunction!(rank_weights_by_id, m)?)?;
    m.add_function(wrap_pyfunction!(topk_l2, m)?)?;
    m.add_function(wrap_pyfunction!(sqdist, m)?)?;
    Ok(())
}
