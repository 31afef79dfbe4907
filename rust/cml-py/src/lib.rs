//! `cml_rs._native`: the thin PyO3 layer over `cml-core`.
//!
//! Each function converts its arguments while attached to the interpreter
//! (numpy arrays borrowed without copies, integers with their names kept for
//! error messages), runs the core with the GIL released, and converts the owned
//! results back without copying. The core checks ranges and shapes; its
//! messages are the ones users see. Array-likes, dtypes and scipy formats are
//! normalised by the Python package (`cml_rs`), whose classes subclass the ones
//! here.

use cml_core::{CoreError, Csr};
use numpy::PyReadonlyArray1;
use pyo3::exceptions::{PyIndexError, PyMemoryError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyInt};
use std::panic::{catch_unwind, AssertUnwindSafe};

mod kernels;
mod lsh;
mod sampler;

/// Maps a core error to the Python exception that fits it.
pub(crate) fn to_py_err(error: CoreError) -> PyErr {
    match error {
        CoreError::Invalid(m) | CoreError::Corrupt(m) => PyValueError::new_err(m),
        CoreError::OutOfRange(m) => PyIndexError::new_err(m),
        CoreError::Memory(m) => PyMemoryError::new_err(m),
        CoreError::Io(e) => PyErr::from(e),
    }
}

/// Runs `work` with the GIL released and maps its outcome: a core error to the
/// builtin that fits, and a panic (a bug of ours) to a RuntimeError, so that no
/// `PanicException` ever reaches the caller.
pub(crate) fn detached<T, F>(py: Python<'_>, work: F) -> PyResult<T>
where
    T: Send,
    F: FnOnce() -> cml_core::Result<T> + Send,
{
    py.detach(|| catch_unwind(AssertUnwindSafe(work)))
        .map_err(|payload| {
            PyRuntimeError::new_err(format!(
                "internal error in cml-rs (please report it): {}",
                cml_core::parallel::panic_message(&payload)
            ))
        })?
        .map_err(to_py_err)
}

/// An integer argument as Python passed it. Extraction accepts any object, so
/// that the conversion below can name the argument in its error: PyO3's own
/// errors for a float or an out-of-range int do not say which argument it was.
pub(crate) struct Int {
    value: std::result::Result<i64, IntProblem>,
}

enum IntProblem {
    /// Not an integer: the type's name.
    NotInt(String),
    /// An integer beyond i64: its repr.
    OutOfRange(String),
}

impl<'a, 'py> FromPyObject<'a, 'py> for Int {
    type Error = PyErr;

    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        let value = if obj.is_instance_of::<PyBool>() {
            Err(IntProblem::NotInt("bool".to_string()))
        } else if obj.is_instance_of::<PyInt>() || obj.hasattr("__index__")? {
            obj.extract::<i64>().map_err(|_| {
                IntProblem::OutOfRange(obj.repr().map_or_else(|_| "?".into(), |r| r.to_string()))
            })
        } else {
            Err(IntProblem::NotInt(obj.get_type().name()?.to_string()))
        };
        Ok(Int { value })
    }
}

impl Int {
    /// The default of a `num_threads` argument (all cores).
    pub(crate) const ZERO: Int = Int { value: Ok(0) };
    pub(crate) const ONE: Int = Int { value: Ok(1) };
    pub(crate) const DEFAULT_TABLES: Int = Int {
        value: Ok(cml_core::lsh::DEFAULT_TABLES as i64),
    };
    pub(crate) const DEFAULT_HASHES: Int = Int {
        value: Ok(cml_core::lsh::DEFAULT_HASHES as i64),
    };

    fn integer(&self, name: &str) -> PyResult<i64> {
        match &self.value {
            Ok(v) => Ok(*v),
            Err(IntProblem::NotInt(type_name)) => Err(PyTypeError::new_err(format!(
                "{name} must be an integer, got {type_name}"
            ))),
            Err(IntProblem::OutOfRange(repr)) => Err(PyValueError::new_err(format!(
                "{name} is {repr}, beyond what any size, count or seed here can be (-2**63 to 2**63 - 1)"
            ))),
        }
    }

    /// A count or size: a non-negative integer (the core checks its range).
    pub(crate) fn count(&self, name: &str) -> PyResult<usize> {
        let value = self.integer(name)?;
        usize::try_from(value).map_err(|_| {
            PyValueError::new_err(format!(
                "{name} must be a non-negative integer, got {value}"
            ))
        })
    }

    /// A seed or epoch: any integer in [0, 2**63).
    pub(crate) fn unsigned(&self, name: &str) -> PyResult<u64> {
        self.count(name).map(|v| v as u64)
    }

    /// A thread count: 0 (all cores) up to the core's maximum.
    pub(crate) fn threads(&self) -> PyResult<usize> {
        let threads = self.count("num_threads")?;
        cml_core::parallel::check_threads(threads).map_err(to_py_err)
    }

    /// A count where None means "the default".
    pub(crate) fn optional_count(value: &Option<Int>, name: &str) -> PyResult<Option<usize>> {
        value.as_ref().map(|v| v.count(name)).transpose()
    }
}

/// A 1-D integer array of either width scipy uses for CSR index arrays.
pub(crate) enum IdArray<'py> {
    I32(PyReadonlyArray1<'py, i32>),
    I64(PyReadonlyArray1<'py, i64>),
}

impl<'a, 'py> FromPyObject<'a, 'py> for IdArray<'py> {
    type Error = PyErr;

    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        if let Ok(array) = obj.extract::<PyReadonlyArray1<'py, i32>>() {
            return Ok(IdArray::I32(array));
        }
        if let Ok(array) = obj.extract::<PyReadonlyArray1<'py, i64>>() {
            return Ok(IdArray::I64(array));
        }
        let described = obj
            .getattr("dtype")
            .and_then(|d| d.str().map(|s| s.to_string()))
            .unwrap_or_else(|_| {
                obj.get_type()
                    .name()
                    .map_or_else(|_| "?".into(), |n| n.to_string())
            });
        Err(PyTypeError::new_err(format!(
            "CSR index arrays must be 1-D numpy arrays of int32 or int64, got {described}"
        )))
    }
}

/// The borrowed contents of an [`IdArray`] (Send, so it can cross `detach`).
pub(crate) enum IdSlice<'a> {
    I32(&'a [i32]),
    I64(&'a [i64]),
}

impl IdArray<'_> {
    pub(crate) fn len(&self) -> usize {
        match self {
            IdArray::I32(a) => a.as_array().len(),
            IdArray::I64(a) => a.as_array().len(),
        }
    }

    pub(crate) fn as_ids(&self, name: &str) -> PyResult<IdSlice<'_>> {
        match self {
            IdArray::I32(a) => a.as_slice().map(IdSlice::I32),
            IdArray::I64(a) => a.as_slice().map(IdSlice::I64),
        }
        .map_err(|_| PyValueError::new_err(format!("{name} must be C-contiguous")))
    }
}

/// A CSR matrix passed from Python as `(indptr, indices, n_cols)`.
pub(crate) type CsrArg<'py> = (IdArray<'py>, IdArray<'py>, Int);

/// The borrowed arrays of a [`CsrArg`], ready to be validated by the core.
pub(crate) struct CsrParts<'a> {
    name: &'a str,
    n_rows: usize,
    n_cols: usize,
    indptr: IdSlice<'a>,
    indices: IdSlice<'a>,
}

impl<'a> CsrParts<'a> {
    pub(crate) fn borrow(name: &'a str, arg: &'a CsrArg) -> PyResult<Self> {
        let (indptr, indices, n_cols) = arg;
        if indptr.len() == 0 {
            return Err(PyValueError::new_err(format!(
                "{name}.indptr is empty; a CSR matrix has n_rows + 1 offsets"
            )));
        }
        Ok(CsrParts {
            name,
            n_rows: indptr.len() - 1,
            n_cols: n_cols.count(&format!("{name}.shape[1]"))?,
            indptr: indptr.as_ids(&format!("{name}.indptr"))?,
            indices: indices.as_ids(&format!("{name}.indices"))?,
        })
    }

    /// Validates the arrays into a core matrix (rows sorted, duplicates dropped).
    pub(crate) fn to_csr(&self) -> cml_core::Result<Csr> {
        self.to_csr_with(None).map(|(csr, _)| csr)
    }

    /// As [`CsrParts::to_csr`], with `values` (one per stored entry) following
    /// their ids, the values of repeated ids summed.
    pub(crate) fn to_csr_with(&self, values: Option<&[f32]>) -> cml_core::Result<(Csr, Vec<f32>)> {
        use IdSlice::{I32, I64};
        macro_rules! build {
            ($p:expr, $i:expr) => {
                match values {
                    None => Csr::from_parts(self.name, self.n_rows, self.n_cols, $p, $i)
                        .map(|csr| (csr, Vec::new())),
                    Some(v) => {
                        Csr::from_parts_with_values(self.name, self.n_rows, self.n_cols, $p, $i, v)
                    }
                }
            };
        }
        match (&self.indptr, &self.indices) {
            (I32(p), I32(i)) => build!(p, i),
            (I32(p), I64(i)) => build!(p, i),
            (I64(p), I32(i)) => build!(p, i),
            (I64(p), I64(i)) => build!(p, i),
        }
    }
}

/// The kernel variant this CPU uses for distances ("avx512", "avx2" or "scalar").
#[pyfunction]
fn simd_kernel() -> &'static str {
    cml_core::kernel::best().name
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(simd_kernel, m)?)?;
    sampler::register(m)?;
    kernels::register(m)?;
    lsh::register(m)?;
    Ok(())
}
