//! Binding of the WARP sampler: one epoch as a Python iterator, or an endless
//! stream through `next_batch`. Every wait for a batch happens with the GIL
//! released and inside the object's lock, so several Python threads can share
//! one sampler and a blocked consumer never blocks the interpreter.

use crate::{csr_from_ids, IdArray, OrRaise};
use cml_core::{Batch, BatchStream, SamplerConfig};
use numpy::ndarray::Array2;
use numpy::{IntoPyArray, PyArray1, PyArray2};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use std::sync::{Arc, Mutex, MutexGuard};

type BatchArrays<'py> = (
    Bound<'py, PyArray1<i64>>,
    Bound<'py, PyArray1<i64>>,
    Bound<'py, PyArray2<i64>>,
);

fn to_arrays(py: Python<'_>, batch: Batch, n_negatives: usize) -> BatchArrays<'_> {
    let rows = batch.len();
    let negatives = Array2::from_shape_vec((rows, n_negatives), batch.negatives)
        .expect("a batch holds n_negatives per pair");
    (
        batch.users.into_pyarray(py),
        batch.positives.into_pyarray(py),
        negatives.into_pyarray(py),
    )
}

/// Locks a mutex even if a panic poisoned it (the guarded state stays valid:
/// a stream is either intact or replaced).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

struct StreamState {
    /// The epoch the next `epoch_batches()` call iterates.
    next_epoch: u64,
    /// The endless stream behind `next_batch()`, started lazily at `next_epoch`.
    stream: Option<BatchStream>,
}

/// Native WARP sampler; use `cml_rs.WarpSampler`, which accepts scipy matrices.
#[pyclass(module = "cml_rs._native", frozen)]
pub struct WarpSampler {
    inner: Arc<cml_core::WarpSampler>,
    prefetch: usize,
    num_threads: usize,
    state: Mutex<StreamState>,
}

#[pymethods]
impl WarpSampler {
    /// Builds a sampler over the CSR arrays of a user x item matrix.
    #[new]
    #[pyo3(signature = (indptr, indices, n_items, batch_size, n_negatives, seed, num_threads, check_negative, prefetch))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        indptr: IdArray,
        indices: IdArray,
        n_items: usize,
        batch_size: usize,
        n_negatives: usize,
        seed: u64,
        num_threads: usize,
        check_negative: bool,
        prefetch: usize,
    ) -> PyResult<Self> {
        if indptr.len() == 0 {
            return Err(PyValueError::new_err(
                "user_items.indptr is empty; a CSR matrix has n_rows + 1 offsets",
            ));
        }
        let (p, i) = (
            indptr.as_ids("user_items.indptr")?,
            indices.as_ids("user_items.indices")?,
        );
        let n_users = indptr.len() - 1;
        let config = SamplerConfig {
            batch_size,
            n_negatives,
            seed,
            check_negative,
        };
        let inner = py
            .detach(|| {
                let csr = csr_from_ids("user_items", n_users, n_items, &p, &i)?;
                cml_core::WarpSampler::new(csr, config)
            })
            .or_raise()?;
        Ok(WarpSampler {
            inner: Arc::new(inner),
            prefetch: prefetch.max(1),
            num_threads,
            state: Mutex::new(StreamState {
                next_epoch: 0,
                stream: None,
            }),
        })
    }

    /// Batches per epoch (the last, partial batch included).
    #[getter]
    fn n_batches(&self) -> usize {
        self.inner.n_batches()
    }

    /// Training pairs (distinct stored entries of user_items).
    #[getter]
    fn n_pairs(&self) -> usize {
        self.inner.n_pairs()
    }

    #[getter]
    fn n_users(&self) -> usize {
        self.inner.positives().n_rows()
    }

    #[getter]
    fn n_items(&self) -> usize {
        self.inner.positives().n_cols()
    }

    #[getter]
    fn batch_size(&self) -> usize {
        self.inner.config().batch_size
    }

    #[getter]
    fn n_negatives(&self) -> usize {
        self.inner.config().n_negatives
    }

    #[getter]
    fn seed(&self) -> u64 {
        self.inner.config().seed
    }

    #[getter]
    fn check_negative(&self) -> bool {
        self.inner.config().check_negative
    }

    /// The epoch the next iteration will produce.
    #[getter]
    fn epoch(&self, py: Python<'_>) -> u64 {
        py.detach(|| lock(&self.state).next_epoch)
    }

    /// Makes the next iteration (and a restarted `next_batch` stream) produce `epoch`.
    fn set_epoch(&self, py: Python<'_>, epoch: u64) {
        let old = py.detach(|| {
            let mut state = lock(&self.state);
            state.next_epoch = epoch;
            state.stream.take()
        });
        // Joining the old producer can take a moment; do it without the lock or the GIL.
        py.detach(move || drop(old));
    }

    /// The batches of the next epoch, produced ahead on a background thread.
    fn epoch_batches(&self, py: Python<'_>) -> EpochBatches {
        let epoch = py.detach(|| {
            let mut state = lock(&self.state);
            let epoch = state.next_epoch;
            state.next_epoch += 1;
            epoch
        });
        EpochBatches {
            n_negatives: self.inner.config().n_negatives,
            stream: Mutex::new(BatchStream::new(
                Arc::clone(&self.inner),
                epoch,
                Some(epoch + 1),
                self.prefetch,
                self.num_threads,
            )),
        }
    }

    /// The next batch of an endless stream that moves on to the next epoch after
    /// each full pass: `(users, positives, negatives)`.
    fn next_batch<'py>(&self, py: Python<'py>) -> PyResult<BatchArrays<'py>> {
        let batch = py
            .detach(|| {
                let mut state = lock(&self.state);
                let start = state.next_epoch;
                let stream = state.stream.get_or_insert_with(|| {
                    BatchStream::new(
                        Arc::clone(&self.inner),
                        start,
                        None,
                        self.prefetch,
                        self.num_threads,
                    )
                });
                stream.next_batch()
            })
            .or_raise()?
            .expect("an endless stream always has a next batch");
        Ok(to_arrays(py, batch, self.inner.config().n_negatives))
    }
}

impl Drop for WarpSampler {
    fn drop(&mut self) {
        // Stop the producer before the sampler goes; the GIL may be held here,
        // but the producer never needs it, so joining cannot deadlock.
        lock(&self.state).stream.take();
    }
}

/// One epoch of batches from a `WarpSampler`.
#[pyclass(module = "cml_rs._native", frozen)]
pub struct EpochBatches {
    n_negatives: usize,
    stream: Mutex<BatchStream>,
}

#[pymethods]
impl EpochBatches {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__<'py>(&self, py: Python<'py>) -> PyResult<Option<BatchArrays<'py>>> {
        let batch = py.detach(|| lock(&self.stream).next_batch()).or_raise()?;
        Ok(batch.map(|b| to_arrays(py, b, self.n_negatives)))
    }

    /// Batches not yet handed out.
    fn __len__(&self, py: Python<'_>) -> usize {
        py.detach(|| lock(&self.stream).remaining().unwrap_or(0))
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<WarpSampler>()?;
    m.add_class::<EpochBatches>()?;
    Ok(())
}
