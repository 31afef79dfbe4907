//! Binding of the WARP sampler: one epoch as a Python iterator, or an endless
//! stream through `next_batch`. Every wait for a batch happens with the GIL
//! released and inside the object's lock, so several Python threads can share
//! one sampler and a blocked consumer never blocks the interpreter.

use crate::{detached, IdArray, Int};
use cml_core::{Batch, BatchStream, SamplerConfig};
use numpy::ndarray::Array2;
use numpy::{IntoPyArray, PyArray1, PyArray2, PyReadonlyArray1};
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
    /// The epoch the next iteration produces.
    next_epoch: u64,
    /// The endless stream behind `next_batch()`, started lazily at `next_epoch`.
    stream: Option<BatchStream>,
}

/// Batches of `(users, positives, negatives)` for CML's WARP loss, drawn on
/// Rust threads; `cml_rs.WarpSampler` is this class with scipy input.
#[pyclass(module = "cml_rs._native", subclass, frozen)]
pub struct WarpSampler {
    inner: Arc<cml_core::WarpSampler>,
    prefetch: usize,
    num_threads: usize,
    state: Mutex<StreamState>,
}

impl WarpSampler {
    fn negatives_per_pair(&self) -> usize {
        self.inner.config().n_negatives
    }
}

#[pymethods]
impl WarpSampler {
    /// A sampler over the CSR arrays of a user x item matrix; with `values`
    /// (one per stored entry), pairs are drawn in proportion to ln(1 + value);
    /// with `popularity_exponent` > 0, negatives in proportion to popularity^it;
    /// with `world_size` > 1, only share `rank` of every epoch.
    #[new]
    #[pyo3(signature = (indptr, indices, n_items, batch_size, n_negatives, seed, num_threads, check_negative, prefetch, values=None, popularity_exponent=0.0, rank=Int::ZERO, world_size=Int::ONE),
           text_signature = "(indptr, indices, n_items, batch_size, n_negatives, seed, num_threads, check_negative, prefetch, values=None, popularity_exponent=0.0, rank=0, world_size=1)")]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        indptr: IdArray,
        indices: IdArray,
        n_items: Int,
        batch_size: Int,
        n_negatives: Int,
        seed: Int,
        num_threads: Int,
        check_negative: bool,
        prefetch: Int,
        values: Option<PyReadonlyArray1<'_, f32>>,
        popularity_exponent: f32,
        rank: Int,
        world_size: Int,
    ) -> PyResult<Self> {
        let arg = (indptr, indices, n_items);
        let matrix = crate::CsrParts::borrow("user_items", &arg)?;
        let config = SamplerConfig {
            batch_size: batch_size.count("batch_size")?,
            n_negatives: n_negatives.count("n_negatives")?,
            seed: seed.unsigned("seed")?,
            check_negative,
            popularity_exponent,
        };
        let (num_threads, prefetch) = (num_threads.threads()?, prefetch.count("prefetch")?);
        let (rank, world_size) = (rank.count("rank")?, world_size.count("world_size")?);
        let values = values
            .as_ref()
            .map(|v| {
                v.as_slice()
                    .map_err(|_| PyValueError::new_err("values must be C-contiguous"))
            })
            .transpose()?;
        let inner = detached(py, || {
            let sampler = match values {
                None => cml_core::WarpSampler::new(matrix.to_csr()?, config),
                Some(values) => {
                    let (csr, values) = matrix.to_csr_with(Some(values))?;
                    cml_core::WarpSampler::with_confidence(csr, &values, config)
                }
            }?
            .with_share(rank, world_size)?;
            cml_core::sampler::check_prefetch(prefetch, &sampler)?;
            Ok(sampler)
        })?;
        Ok(WarpSampler {
            inner: Arc::new(inner),
            prefetch,
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

    /// Training pairs (distinct stored entries of user_items): pairs per epoch.
    #[getter]
    fn n_pairs(&self) -> usize {
        self.inner.n_pairs()
    }

    /// This sampler's share of every epoch: its rank...
    #[getter]
    fn rank(&self) -> usize {
        self.inner.share().0
    }

    /// ...of this many disjoint shares.
    #[getter]
    fn world_size(&self) -> usize {
        self.inner.share().1
    }

    /// Rows of the matrix.
    #[getter]
    fn n_users(&self) -> usize {
        self.inner.positives().n_rows()
    }

    /// Columns of the matrix.
    #[getter]
    fn n_items(&self) -> usize {
        self.inner.positives().n_cols()
    }

    /// Pairs per batch.
    #[getter]
    fn batch_size(&self) -> usize {
        self.inner.config().batch_size
    }

    /// Negatives drawn per pair.
    #[getter]
    fn n_negatives(&self) -> usize {
        self.negatives_per_pair()
    }

    /// Seed of the epoch permutations and of the negatives.
    #[getter]
    fn seed(&self) -> u64 {
        self.inner.config().seed
    }

    /// Whether pairs are drawn in proportion to ln(1 + value) (False when the
    /// values were not given or were all equal).
    #[getter]
    fn weighted(&self) -> bool {
        self.inner.is_weighted()
    }

    /// Negatives are drawn in proportion to (item popularity)^this (0: uniformly).
    #[getter]
    fn popularity_exponent(&self) -> f32 {
        self.inner.config().popularity_exponent
    }

    /// Whether negatives avoid the user's positives.
    #[getter]
    fn check_negative(&self) -> bool {
        self.inner.config().check_negative
    }

    /// Threads that draw negatives (0: all cores).
    #[getter]
    fn num_threads(&self) -> usize {
        self.num_threads
    }

    /// Batches prepared ahead of the consumer.
    #[getter]
    fn prefetch(&self) -> usize {
        self.prefetch
    }

    /// The epoch the next iteration produces.
    #[getter]
    fn epoch(&self, py: Python<'_>) -> u64 {
        py.detach(|| lock(&self.state).next_epoch)
    }

    /// Makes the next iteration (and a restarted `next_batch` stream) produce `epoch`.
    fn set_epoch(&self, py: Python<'_>, epoch: Int) -> PyResult<()> {
        let epoch = epoch.unsigned("epoch")?;
        let old = py.detach(|| {
            let mut state = lock(&self.state);
            state.next_epoch = epoch;
            state.stream.take()
        });
        // Joining the old producer can take a moment; do it without the lock or the GIL.
        py.detach(move || drop(old));
        Ok(())
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
            n_negatives: self.negatives_per_pair(),
            stream: Mutex::new(BatchStream::new(
                Arc::clone(&self.inner),
                epoch,
                Some(epoch.saturating_add(1)),
                self.prefetch,
                self.num_threads,
            )),
        }
    }

    /// One epoch: iterating the sampler yields the next epoch's batches.
    fn __iter__(&self, py: Python<'_>) -> EpochBatches {
        self.epoch_batches(py)
    }

    /// Batches per epoch.
    fn __len__(&self) -> usize {
        self.inner.n_batches()
    }

    /// The next batch of an endless stream that moves on to the next epoch after
    /// each full pass: `(users, positives, negatives)`.
    fn next_batch<'py>(&self, py: Python<'py>) -> PyResult<BatchArrays<'py>> {
        let batch = detached(py, || {
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
        })?
        .expect("an endless stream always has a next batch");
        Ok(to_arrays(py, batch, self.negatives_per_pair()))
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
    /// The iterator itself.
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    /// The next batch `(users, positives, negatives)`; waits for it with the GIL released.
    fn __next__<'py>(&self, py: Python<'py>) -> PyResult<Option<BatchArrays<'py>>> {
        let batch = detached(py, || lock(&self.stream).next_batch())?;
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
