//! Binding of the LSH index. Queries share a read lock and run with the GIL
//! released; adding vectors takes the write lock.

use crate::kernels::{check_k, neighbour_arrays, vectors as borrow_vectors, NeighbourArrays};
use crate::{csr_from_arg, shape_of, CsrArg, OrRaise};
use cml_core::lsh::{LshIndex as CoreIndex, LshParams};
use numpy::ndarray::Array2;
use numpy::{
    IntoPyArray, PyArray1, PyArray2, PyReadonlyArray1, PyReadonlyArray2, PyUntypedArrayMethods,
};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use std::path::PathBuf;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Native LSH index; use `cml_rs.LshIndex`, which accepts array-likes and scipy matrices.
#[pyclass(module = "cml_rs._native", frozen)]
pub struct LshIndex {
    inner: RwLock<CoreIndex>,
}

impl LshIndex {
    fn read(&self) -> RwLockReadGuard<'_, CoreIndex> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, CoreIndex> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    fn wrap(index: CoreIndex) -> Self {
        LshIndex {
            inner: RwLock::new(index),
        }
    }
}

#[pymethods]
impl LshIndex {
    /// An empty index of `n_tables` tables of `n_hashes` p-stable hashes each.
    #[new]
    #[pyo3(signature = (dim, n_tables, n_hashes, bucket_width, seed))]
    fn new(
        dim: usize,
        n_tables: usize,
        n_hashes: usize,
        bucket_width: Option<f32>,
        seed: u64,
    ) -> PyResult<Self> {
        let params = LshParams {
            dim,
            n_tables,
            n_hashes,
            bucket_width,
            seed,
        };
        Ok(LshIndex::wrap(CoreIndex::new(params).or_raise()?))
    }

    /// Adds `vectors` (n, dim) with `ids` (n,) and rebuilds the tables.
    #[pyo3(signature = (vectors, ids, num_threads=0))]
    fn add_items(
        &self,
        py: Python<'_>,
        vectors: PyReadonlyArray2<'_, f32>,
        ids: PyReadonlyArray1<'_, i64>,
        num_threads: usize,
    ) -> PyResult<()> {
        let rows = vectors.shape()[0];
        let data = borrow_vectors("vectors", &vectors)?;
        let ids = ids
            .as_slice()
            .map_err(|_| PyValueError::new_err("ids must be C-contiguous"))?;
        if rows == 0 {
            return Err(PyValueError::new_err(format!(
                "vectors has shape {}; there is nothing to add",
                shape_of(vectors.shape())
            )));
        }
        py.detach(|| self.write().add(data, ids, num_threads))
            .or_raise()
    }

    /// `(ids, sqdist)`, each (Q, k): the k nearest indexed vectors among the
    /// candidates of `n_probes` probes over the first `n_tables` tables.
    #[pyo3(signature = (queries, k, n_probes=None, n_tables=None, exclude=None, num_threads=0))]
    #[allow(clippy::too_many_arguments)]
    fn query<'py>(
        &self,
        py: Python<'py>,
        queries: PyReadonlyArray2<'py, f32>,
        k: i64,
        n_probes: Option<usize>,
        n_tables: Option<usize>,
        exclude: Option<CsrArg<'py>>,
        num_threads: usize,
    ) -> PyResult<NeighbourArrays<'py>> {
        let k = check_k(k)?;
        let q = borrow_vectors("queries", &queries)?;
        let exclude = exclude
            .map(|e| csr_from_arg(py, "exclude", &e))
            .transpose()?;
        let found = py
            .detach(|| {
                q.check_finite("queries")?;
                self.read()
                    .query(q, k, n_probes, n_tables, exclude.as_ref(), num_threads)
            })
            .or_raise()?;
        Ok(neighbour_arrays(py, found))
    }

    /// Sets the probes and tables used when a query does not name them.
    fn set_defaults(&self, py: Python<'_>, n_probes: usize, n_tables: usize) -> PyResult<()> {
        py.detach(|| self.write().set_defaults(n_probes, n_tables))
            .or_raise()
    }

    /// A copy of the indexed vectors (n, dim), in storage order (grouped by bucket).
    fn vectors<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray2<f32>> {
        let index = self.read();
        let (n, dim) = (index.len(), index.params().dim);
        Array2::from_shape_vec((n, dim), index.vectors().data.to_vec())
            .expect("n x dim")
            .into_pyarray(py)
    }

    /// The ids of the indexed vectors, in storage order (as `vectors`).
    fn ids<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<i64>> {
        self.read().ids().to_vec().into_pyarray(py)
    }

    /// Writes the index with a checksum (atomically: a temporary file is renamed).
    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        py.detach(|| self.read().save(&path)).or_raise()
    }

    /// Reads an index written by `save`; damaged files raise ValueError.
    #[staticmethod]
    #[pyo3(signature = (path, num_threads=0))]
    fn load(py: Python<'_>, path: PathBuf, num_threads: usize) -> PyResult<Self> {
        let index = py
            .detach(|| CoreIndex::load(&path, num_threads))
            .or_raise()?;
        Ok(LshIndex::wrap(index))
    }

    /// The index in its file format (for pickling).
    fn to_bytes<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        let bytes = py.detach(|| self.read().to_bytes());
        PyBytes::new(py, &bytes)
    }

    /// An index from `to_bytes` output.
    #[staticmethod]
    #[pyo3(signature = (data, num_threads=0))]
    fn from_bytes(py: Python<'_>, data: &[u8], num_threads: usize) -> PyResult<Self> {
        let owned = data.to_vec();
        let index = py
            .detach(move || CoreIndex::from_bytes(&owned, num_threads))
            .or_raise()?;
        Ok(LshIndex::wrap(index))
    }

    /// Bytes held by the index (vectors, ids, projections, tables).
    fn memory_bytes(&self) -> usize {
        self.read().memory_bytes()
    }

    fn __len__(&self) -> usize {
        self.read().len()
    }

    #[getter]
    fn dim(&self) -> usize {
        self.read().params().dim
    }

    #[getter]
    fn n_tables(&self) -> usize {
        self.read().params().n_tables
    }

    #[getter]
    fn n_hashes(&self) -> usize {
        self.read().params().n_hashes
    }

    /// The slot width w (None until vectors are added, when it is chosen from them).
    #[getter]
    fn bucket_width(&self) -> Option<f32> {
        self.read().params().bucket_width
    }

    #[getter]
    fn seed(&self) -> u64 {
        self.read().params().seed
    }

    #[getter]
    fn default_probes(&self) -> usize {
        self.read().default_probes()
    }

    #[getter]
    fn default_tables(&self) -> usize {
        self.read().default_tables()
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<LshIndex>()
}
