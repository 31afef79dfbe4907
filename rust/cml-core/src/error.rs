//! Errors of the core. Each variant says which kind of mistake it is, so the
//! binding can map it to the Python builtin that fits (ValueError, IndexError,
//! MemoryError, OSError and its subclasses) without parsing messages. Messages
//! say what was expected, what came, and how to fix it.

use std::fmt;
use std::path::Path;

/// Every fallible core entry point returns this.
#[derive(Debug)]
pub enum CoreError {
    /// An argument has the wrong value or shape (maps to `ValueError`).
    Invalid(String),
    /// An id lies outside the range it must be in (maps to `IndexError`).
    OutOfRange(String),
    /// Memory for a result or buffer could not be had (maps to `MemoryError`).
    Memory(String),
    /// A file could not be read or written (maps to `OSError`, or the subclass
    /// its kind names, such as `FileNotFoundError`).
    Io(std::io::Error),
    /// A file was read but is not a valid, intact file of ours (maps to `ValueError`).
    Corrupt(String),
}

pub type Result<T> = std::result::Result<T, CoreError>;

impl CoreError {
    pub fn invalid(message: impl Into<String>) -> Self {
        CoreError::Invalid(message.into())
    }

    pub fn out_of_range(message: impl Into<String>) -> Self {
        CoreError::OutOfRange(message.into())
    }

    pub fn corrupt(message: impl Into<String>) -> Self {
        CoreError::Corrupt(message.into())
    }

    pub fn memory(message: impl Into<String>) -> Self {
        CoreError::Memory(message.into())
    }

    /// An I/O error on `path`, its message prefixed with the path and its kind kept.
    pub fn io(path: &Path, error: std::io::Error) -> Self {
        CoreError::Io(std::io::Error::new(
            error.kind(),
            format!("{}: {error}", path.display()),
        ))
    }
}

impl fmt::Display for CoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CoreError::Invalid(m)
            | CoreError::OutOfRange(m)
            | CoreError::Corrupt(m)
            | CoreError::Memory(m) => f.write_str(m),
            CoreError::Io(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for CoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            CoreError::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<std::io::Error> for CoreError {
    fn from(e: std::io::Error) -> Self {
        CoreError::Io(e)
    }
}
