//! Shared types of the kernels and indexes: borrowed row-major vectors, the
//! running top-K selection, and the `(ids, sqdist)` result of a search.
//!
//! These sit below every module that searches (the exact kernels and LSH), so
//! those modules depend on this one and never on each other's internals.

use crate::alloc;
use crate::error::{CoreError, Result};
use std::cmp::Ordering;

/// A row-major matrix of `f32` vectors borrowed from the caller.
#[derive(Clone, Copy, Debug)]
pub struct Vectors<'a> {
    pub data: &'a [f32],
    pub dim: usize,
}

impl<'a> Vectors<'a> {
    /// `name` is how the matrix is called in error messages ("queries").
    pub fn new(name: &str, data: &'a [f32], dim: usize) -> Result<Self> {
        if dim == 0 {
            return Err(CoreError::invalid(format!(
                "{name} has no columns; vectors need at least one dimension"
            )));
        }
        if !data.len().is_multiple_of(dim) {
            return Err(CoreError::invalid(format!(
                "{name}: {} values do not form rows of {dim} columns",
                data.len()
            )));
        }
        Ok(Vectors { data, dim })
    }

    pub fn len(&self) -> usize {
        self.data.len() / self.dim
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    #[inline]
    pub fn row(&self, i: usize) -> &'a [f32] {
        &self.data[i * self.dim..(i + 1) * self.dim]
    }

    /// Fails unless the rows have `dim` columns; `what` says where `dim` comes
    /// from ("the item dimension").
    pub fn expect_dim(&self, name: &str, dim: usize, what: &str) -> Result<()> {
        if self.dim != dim {
            return Err(CoreError::invalid(format!(
                "{name} must have {dim} columns ({what}), got {}",
                self.dim
            )));
        }
        Ok(())
    }

    /// Fails unless every value is finite and small enough for squared distances
    /// between such vectors to stay finite in f32 (rescale the vectors if not).
    pub fn check_values(&self, name: &str) -> Result<()> {
        self.check_finite(name)?;
        let largest = self.data.iter().fold(0f32, |m, v| m.max(v.abs()));
        let limit = max_magnitude(self.dim);
        if largest > limit {
            return Err(CoreError::invalid(format!(
                "{name} holds a value of magnitude {largest:e}; squared distances between vectors of {} \
                 dimensions overflow float32 above {limit:e}, so rescale the vectors",
                self.dim
            )));
        }
        Ok(())
    }

    /// Fails on the first NaN or infinity, naming `name[row, column]`.
    pub fn check_finite(&self, name: &str) -> Result<()> {
        match self.data.iter().position(|v| !v.is_finite()) {
            None => Ok(()),
            Some(at) => Err(CoreError::invalid(format!(
                "{name}[{}, {}] is {}; every value must be finite (check the model for divergence or the input for missing values)",
                at / self.dim,
                at % self.dim,
                self.data[at]
            ))),
        }
    }
}

/// The largest coordinate magnitude for which `dim` * (2 x)^2, the largest
/// squared distance two such vectors can have, stays below f32::MAX.
pub fn max_magnitude(dim: usize) -> f32 {
    ((f32::MAX as f64 / (4.0 * dim.max(1) as f64)).sqrt() * 0.999) as f32
}

/// Orders (score, id) pairs: by score, then by id, so ties resolve the same
/// way whatever order candidates arrive in.
#[inline]
pub fn by_score_then_id(a: &(f32, u32), b: &(f32, u32)) -> Ordering {
    a.0.total_cmp(&b.0).then(a.1.cmp(&b.1))
}

/// The k smallest (score, id) pairs pushed so far. Candidates collect in a
/// buffer of about 2k; when it fills, a linear-time selection keeps the best k
/// and the k-th score becomes the threshold a new candidate must beat.
#[derive(Clone, Debug)]
pub struct TopK {
    k: usize,
    buffer: Vec<(f32, u32)>,
    threshold: f32,
}

impl TopK {
    /// `k` must be at least 1 (callers check it at their entry point).
    pub fn new(k: usize) -> TopK {
        debug_assert!(k >= 1);
        TopK {
            k,
            buffer: Vec::with_capacity(Self::capacity(k)),
            threshold: f32::INFINITY,
        }
    }

    fn capacity(k: usize) -> usize {
        2 * k + 32
    }

    /// A candidate must score strictly below this to matter. Candidates arrive in
    /// increasing id order within a scan, so an equal score would lose the tie.
    #[inline]
    pub fn threshold(&self) -> f32 {
        self.threshold
    }

    #[inline]
    pub fn push(&mut self, score: f32, id: u32) {
        if score < self.threshold {
            self.buffer.push((score, id));
            if self.buffer.len() == Self::capacity(self.k) {
                self.compact();
            }
        }
    }

    fn compact(&mut self) {
        if self.buffer.len() > self.k {
            self.buffer
                .select_nth_unstable_by(self.k - 1, by_score_then_id);
            self.buffer.truncate(self.k);
            self.threshold = self.buffer[self.k - 1].0;
        }
    }

    /// The best k, sorted by (score, id).
    pub fn into_sorted(mut self) -> Vec<(f32, u32)> {
        self.compact();
        self.buffer.sort_unstable_by(by_score_then_id);
        self.buffer
    }
}

/// The `(ids, sqdist)` of a top-K search, row-major `n_queries x k`: nearest
/// first, padded with id -1 and distance +inf where fewer were found.
#[derive(Clone, Debug, PartialEq)]
pub struct Neighbours {
    pub k: usize,
    pub ids: Vec<i64>,
    pub sqdist: Vec<f32>,
}

impl Neighbours {
    /// `n_queries` rows of `k` padding entries (id -1, distance inf) for a search to
    /// fill: a row with fewer than `k` candidates keeps its padding at the end.
    pub fn padded(n_queries: usize, k: usize) -> Result<Self> {
        let ids = alloc::filled(
            alloc::product(n_queries, k, "the result")?,
            -1i64,
            "the result's ids",
        )?;
        let sqdist = alloc::filled(ids.len(), f32::INFINITY, "the result's distances")?;
        Ok(Self { k, ids, sqdist })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topk_keeps_the_smallest_and_breaks_ties_by_id() {
        let mut top = TopK::new(3);
        for (score, id) in [(5.0, 0), (1.0, 9), (3.0, 2), (1.0, 4), (0.5, 7), (3.0, 1)] {
            top.push(score, id);
        }
        assert_eq!(top.into_sorted(), vec![(0.5, 7), (1.0, 4), (1.0, 9)]);
        // The threshold tightens once the buffer has been compacted.
        let mut many = TopK::new(2);
        for id in 0..100u32 {
            many.push(100.0 - id as f32, id);
        }
        assert!(many.threshold() < 100.0);
        assert_eq!(many.into_sorted(), vec![(1.0, 99), (2.0, 98)]);
    }

    #[test]
    fn vectors_check_their_shape_and_values() {
        let x = [0f32; 6];
        let err = Vectors::new("items", &x, 4).unwrap_err().to_string();
        assert!(
            err.contains("items: 6 values do not form rows of 4"),
            "{err}"
        );
        let err = Vectors::new("items", &x, 0).unwrap_err().to_string();
        assert!(err.contains("items has no columns"), "{err}");
        let nan = [0.0, f32::NAN, 1.0, 2.0];
        let err = Vectors::new("queries", &nan, 2)
            .unwrap()
            .check_finite("queries")
            .unwrap_err();
        assert!(err.to_string().contains("queries[0, 1] is NaN"), "{err}");
    }
}
