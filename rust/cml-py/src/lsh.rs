//! Binding of the LSH index. Queries share a read lock and run with the GIL
//! released; adding vectors takes the write lock.

use crate::kernels::{id_slice, neighbour_arrays, vectors as borrow_vectors, NeighbourArrays};
use crate::{detached, CsrArg, CsrParts, Int};
use cml_core::csr::Filter;
use cml_core::lsh::{LshIndex as CoreIndex, LshParams};
use numpy::ndarray::Array2;
use numpy::{IntoPyArray, PyArray1, PyArray2, PyReadonlyArray1, PyReadonlyArray2};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyType};
use std::path::PathBuf;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// p-stable L2 LSH with multi-probe and exact re-ranking; `cml_rs.LshIndex`
/// is this class with array-like input and tuning.
#[pyclass(module = "cml_rs._native", subclass, frozen)]
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

    /// An instance of `cls` (this class or a Python subclass) holding `index`:
    /// `cls` is called with the index's parameters, then given the index.
    fn instance_of<'py>(cls: &Bound<'py, PyType>, index: CoreIndex) -> PyResult<Bound<'py, PyAny>> {
        let p = index.params();
        let object = cls.call1((p.dim, p.n_tables, p.n_hashes, p.bucket_width, p.seed))?;
        *object.cast::<LshIndex>()?.get().write() = index;
        Ok(object)
    }
}

#[pymethods]
impl LshIndex {
    /// An empty index of `n_tables` tables of `n_hashes` p-stable hashes each;
    /// `bucket_width=None` chooses the width from the first vectors added.
    #[new]
    #[pyo3(signature = (dim, n_tables=Int::DEFAULT_TABLES, n_hashes=Int::DEFAULT_HASHES, bucket_width=None, seed=Int::ZERO),
       text_signature = "(dim, n_tables=16, n_hashes=16, bucket_width=None, seed=0)")]
    fn new(
        dim: Int,
        n_tables: Int,
        n_hashes: Int,
        bucket_width: Option<f32>,
        seed: Int,
    ) -> PyResult<Self> {
        let params = LshParams {
            dim: dim.count("dim")?,
            n_tables: n_tables.count("n_tables")?,
            n_hashes: n_hashes.count("n_hashes")?,
            bucket_width,
            seed: seed.unsigned("seed")?,
        };
        let index = CoreIndex::new(params).map_err(crate::to_py_err)?;
        Ok(LshIndex {
            inner: RwLock::new(index),
        })
    }

    /// Adds `vectors` (n, dim) with unique `ids` (n,) and rebuilds the tables.
    #[pyo3(signature = (vectors, ids, num_threads=Int::ZERO),
       text_signature = "($self, vectors, ids, num_threads=0)")]
    fn add_items(
        &self,
        py: Python<'_>,
        vectors: PyReadonlyArray2<'_, f32>,
        ids: PyReadonlyArray1<'_, i64>,
        num_threads: Int,
    ) -> PyResult<()> {
        let threads = num_threads.threads()?;
        let data = borrow_vectors("vectors", &vectors)?;
        let ids = ids
            .as_slice()
            .map_err(|_| PyValueError::new_err("ids must be C-contiguous"))?;
        detached(py, || self.write().add(data, ids, threads))
    }

    /// `(ids, sqdist)`, each (Q, min(k, len)): the k nearest indexed vectors
    /// among the candidates of `n_probes` probes (at most 4,096 per table)
    /// over the first `n_tables` tables, skipping `exclude` rows and `exclude_ids`.
    #[pyo3(signature = (queries, k, n_probes=None, n_tables=None, exclude=None, num_threads=Int::ZERO, exclude_ids=None),
       text_signature = "($self, queries, k, n_probes=None, n_tables=None, exclude=None, num_threads=0, exclude_ids=None)")]
    #[allow(clippy::too_many_arguments)]
    fn query<'py>(
        &self,
        py: Python<'py>,
        queries: PyReadonlyArray2<'py, f32>,
        k: Int,
        n_probes: Option<Int>,
        n_tables: Option<Int>,
        exclude: Option<CsrArg<'py>>,
        num_threads: Int,
        exclude_ids: Option<PyReadonlyArray1<'py, u32>>,
    ) -> PyResult<NeighbourArrays<'py>> {
        let k = k.count("k")?;
        let probes = Int::optional_count(&n_probes, "n_probes")?;
        let tables = Int::optional_count(&n_tables, "n_tables")?;
        let threads = num_threads.threads()?;
        let q = borrow_vectors("queries", &queries)?;
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
            self.read().query(q, k, probes, tables, filter, threads)
        })?;
        Ok(neighbour_arrays(py, found))
    }

    /// Sets the probes and tables used when a query does not name them.
    fn set_defaults(&self, py: Python<'_>, n_probes: Int, n_tables: Int) -> PyResult<()> {
        let (probes, tables) = (n_probes.count("n_probes")?, n_tables.count("n_tables")?);
        detached(py, || self.write().set_defaults(probes, tables))
    }

    /// A copy of the indexed vectors (n, dim), in storage order (grouped by bucket).
    fn vectors<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray2<f32>> {
        let index = self.read();
        let (n, dim) = (index.len(), index.params().dim);
        Array2::from_shape_vec((n, dim), index.vectors().data.to_vec())
            .expect("n x dim")
            .into_pyarray(py)
    }

    /// The ids of the indexed vectors, in storage order (as `vectors()`).
    #[getter]
    fn ids<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<i64>> {
        self.read().ids().to_vec().into_pyarray(py)
    }

    /// Writes the index with a checksum (atomically: a temporary file is renamed).
    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        detached(py, || self.read().save(&path))
    }

    /// Reads an index written by `save`; a damaged file raises ValueError, a
    /// missing one FileNotFoundError.
    #[classmethod]
    #[pyo3(signature = (path, num_threads=Int::ZERO),
       text_signature = "($cls, path, num_threads=0)")]
    fn load<'py>(
        cls: &Bound<'py, PyType>,
        path: PathBuf,
        num_threads: Int,
    ) -> PyResult<Bound<'py, PyAny>> {
        let threads = num_threads.threads()?;
        let index = detached(cls.py(), || CoreIndex::load(&path, threads))?;
        Self::instance_of(cls, index)
    }

    /// The index in its file format (for pickling).
    fn to_bytes<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        let bytes = py.detach(|| self.read().to_bytes());
        PyBytes::new(py, &bytes)
    }

    /// An index from `to_bytes` output.
    #[classmethod]
    #[pyo3(signature = (data, num_threads=Int::ZERO),
       text_signature = "($cls, data, num_threads=0)")]
    fn from_bytes<'py>(
        cls: &Bound<'py, PyType>,
        data: &[u8],
        num_threads: Int,
    ) -> PyResult<Bound<'py, PyAny>> {
        let threads = num_threads.threads()?;
        let index = detached(cls.py(), || CoreIndex::from_bytes(data, threads))?;
        Self::instance_of(cls, index)
    }

    /// Bytes held by the index (vectors, ids, projections, tables).
    fn memory_bytes(&self) -> usize {
        self.read().memory_bytes()
    }

    /// Vectors held.
    fn __len__(&self) -> usize {
        self.read().len()
    }

    /// Dimension of the vectors.
    #[getter]
    fn dim(&self) -> usize {
        self.read().params().dim
    }

    /// Hash tables built.
    #[getter]
    fn n_tables(&self) -> usize {
        self.read().params().n_tables
    }

    /// Hashes per table.
    #[getter]
    fn n_hashes(&self) -> usize {
        self.read().params().n_hashes
    }

    /// The slot width w (None until vectors are added, when it is chosen from them).
    #[getter]
    fn bucket_width(&self) -> Option<f32> {
        self.read().params().bucket_width
    }

    /// Seed of the hash functions.
    #[getter]
    fn seed(&self) -> u64 {
        self.read().params().seed
    }

    /// Probes a query uses when it does not say.
    #[getter]
    fn default_probes(&self) -> usize {
        self.read().default_probes()
    }

    /// Tables a query searches when it does not say.
    #[getter]
    fn default_tables(&self) -> usize {
        self.read().default_tables()
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<LshIndex>()
}
