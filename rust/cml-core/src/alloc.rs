//! Allocations whose size comes from the caller, checked before they are made.
//!
//! A result of `queries x k` entries or a `Q x N` distance matrix is sized by
//! arguments a user typed; Rust's infallible allocation would abort the whole
//! Python process when it cannot be had. Here the size is computed without
//! overflow, compared with the machine's physical memory (Linux overcommits,
//! so a too-large request might "succeed" and be killed later), and reserved
//! with `try_reserve_exact`; every failure is a [`CoreError::Memory`] naming
//! what was asked for.

use crate::error::{CoreError, Result};

/// A vector of `len` copies of `value`, or a Memory error naming `what`.
pub fn filled<T: Clone>(len: usize, value: T, what: &str) -> Result<Vec<T>> {
    let mut out = reserve(len, what)?;
    out.resize(len, value);
    Ok(out)
}

/// An empty vector with room for `len` elements, or a Memory error naming `what`.
pub fn reserve<T>(len: usize, what: &str) -> Result<Vec<T>> {
    let bytes = len
        .checked_mul(std::mem::size_of::<T>().max(1))
        .ok_or_else(|| CoreError::memory(format!("{what} would need more than 2^64 bytes")))?;
    if let Some(physical) = physical_memory() {
        if bytes as u128 > physical as u128 {
            return Err(CoreError::memory(format!(
                "{what} would need {} but this machine has {} of memory",
                human(bytes as f64),
                human(physical as f64)
            )));
        }
    }
    let mut out = Vec::new();
    out.try_reserve_exact(len).map_err(|_| {
        CoreError::memory(format!(
            "{what} would need {}, which could not be allocated",
            human(bytes as f64)
        ))
    })?;
    Ok(out)
}

/// `a * b`, or a Memory error naming `what` when the product overflows.
pub fn product(a: usize, b: usize, what: &str) -> Result<usize> {
    a.checked_mul(b).ok_or_else(|| {
        CoreError::memory(format!(
            "{what} would hold {a} x {b} entries, more than can be counted"
        ))
    })
}

/// Bytes of physical memory, where the platform says.
fn physical_memory() -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: sysconf only reads system configuration.
        let (pages, size) = unsafe {
            (
                libc::sysconf(libc::_SC_PHYS_PAGES),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        if pages > 0 && size > 0 {
            return Some(pages as u64 * size as u64);
        }
    }
    None
}

fn human(bytes: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absurd_sizes_are_errors_not_aborts() {
        let err = filled(usize::MAX / 2, 0u64, "the result")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("the result would need more than 2^64 bytes"),
            "{err}"
        );
        let err = filled(1usize << 44, 0f32, "a 2^22 x 2^22 matrix")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("a 2^22 x 2^22 matrix would need 64.0 TiB"),
            "{err}"
        );
        assert!(product(usize::MAX, 2, "x")
            .is_err_and(|e| e.to_string().contains("more than can be counted")));
        assert_eq!(filled(3, 7u8, "small").unwrap(), vec![7, 7, 7]);
    }
}
