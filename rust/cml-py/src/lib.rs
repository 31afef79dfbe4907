//! `cml_rs._native`: the thin PyO3 layer over `cml-core`.
//!
//! Each function extracts its numpy inputs while attached to the interpreter,
//! releases the GIL around the core call, and converts the owned results back
//! without copying. Array-likes, dtypes and scipy formats are normalised by the
//! Python package (`cml_rs`), which is the public surface; this module checks
//! shapes and values, once, and maps core errors to the builtin that fits.

use cml_core::{CoreError, Csr};
use numpy::PyReadonlyArray1;
use pyo3::exceptions::{PyIndexError, PyOSError, PyValueError};
use pyo3::prelude::*;

mod kernels;
mod lsh;
mod sampler;

/// Maps a core error to the Python exception that fits it.
pub(crate) fn to_py_err(error: CoreError) -> PyErr {
    match error {
        CoreError::Invalid(m) | CoreError::Corrupt(m) => PyValueError::new_err(m),
        CoreError::OutOfRange(m) => PyIndexError::new_err(m),
        CoreError::Io(e) => PyOSError::new_err(e.to_string()),
    }
}

pub(crate) trait OrRaise<T> {
    fn or_raise(self) -> PyResult<T>;
}

impl<T> OrRaise<T> for cml_core::Result<T> {
    fn or_raise(self) -> PyResult<T> {
        self.map_err(to_py_err)
    }
}

/// A 1-D integer array of either width scipy uses for CSR index arrays.
#[derive(FromPyObject)]
pub(crate) enum IdArray<'py> {
    I32(PyReadonlyArray1<'py, i32>),
    I64(PyReadonlyArray1<'py, i64>),
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

/// Validates CSR arrays into a core matrix (rows sorted, duplicates dropped).
pub(crate) fn csr_from_ids(
    name: &str,
    n_rows: usize,
    n_cols: usize,
    indptr: &IdSlice,
    indices: &IdSlice,
) -> cml_core::Result<Csr> {
    use IdSlice::{I32, I64};
    match (indptr, indices) {
        (I32(p), I32(i)) => Csr::from_parts(name, n_rows, n_cols, p, i),
        (I32(p), I64(i)) => Csr::from_parts(name, n_rows, n_cols, p, i),
        (I64(p), I32(i)) => Csr::from_parts(name, n_rows, n_cols, p, i),
        (I64(p), I64(i)) => Csr::from_parts(name, n_rows, n_cols, p, i),
    }
}

/// A CSR matrix passed from Python as `(indptr, indices, n_cols)`.
pub(crate) type CsrArg<'py> = (IdArray<'py>, IdArray<'py>, usize);

/// Converts a [`CsrArg`] with the GIL released (the arrays stay borrowed).
pub(crate) fn csr_from_arg(py: Python<'_>, name: &str, arg: &CsrArg) -> PyResult<Csr> {
    let (indptr, indices, n_cols) = arg;
    if indptr.len() == 0 {
        return Err(PyValueError::new_err(format!(
            "{name}.indptr is empty; a CSR matrix has n_rows + 1 offsets"
        )));
    }
    let (p, i) = (
        indptr.as_ids(&format!("{name}.indptr"))?,
        indices.as_ids(&format!("{name}.indices"))?,
    );
    let n_rows = indptr.len() - 1;
    py.detach(|| csr_from_ids(name, n_rows, *n_cols, &p, &i))
        .or_raise()
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

/// Shapes an `(n, d)` array for error messages.
pub(crate) fn shape_of(shape: &[usize]) -> String {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    format!("({})", dims.join(", "))
}
