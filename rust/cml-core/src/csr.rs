//! Compressed sparse rows of item ids: a user's positives, or the items to skip
//! for a query.
//!
//! Invariants after construction (checked once here, `debug_assert!`ed after):
//! `indptr` has `n_rows + 1` non-decreasing entries from 0 to `indices.len()`,
//! and each row's ids are strictly increasing and below `n_cols`. Sorted, unique
//! rows let the sampler map a uniform draw onto the complement of a row and let
//! the top-K kernels test membership by binary search. Building costs
//! O(nnz) for rows that are already sorted, O(nnz log nnz) otherwise.

use crate::error::{CoreError, Result};

/// A validated CSR matrix of `u32` column ids (values are not kept).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Csr {
    n_cols: usize,
    indptr: Vec<usize>,
    indices: Vec<u32>,
}

impl Csr {
    /// Validates raw CSR arrays, sorts each row and drops repeated ids in a row.
    ///
    /// `name` is how the matrix is called in error messages ("user_items").
    pub fn from_parts<P, I>(
        name: &str,
        n_rows: usize,
        n_cols: usize,
        indptr: &[P],
        indices: &[I],
    ) -> Result<Csr>
    where
        P: Copy + Into<i64>,
        I: Copy + Into<i64>,
    {
        Csr::build(name, n_rows, n_cols, indptr, indices, None).map(|(csr, _)| csr)
    }

    /// [`Csr::from_parts`] with a value per stored entry: the values come back in
    /// the matrix's order, those of repeated ids in a row summed (as scipy does).
    pub fn from_parts_with_values<P, I>(
        name: &str,
        n_rows: usize,
        n_cols: usize,
        indptr: &[P],
        indices: &[I],
        values: &[f32],
    ) -> Result<(Csr, Vec<f32>)>
    where
        P: Copy + Into<i64>,
        I: Copy + Into<i64>,
    {
        if values.len() != indices.len() {
            return Err(CoreError::invalid(format!(
                "{name} has {} values for {} indices; the CSR arrays are inconsistent",
                values.len(),
                indices.len()
            )));
        }
        Csr::build(name, n_rows, n_cols, indptr, indices, Some(values))
            .map(|(csr, values)| (csr, values.unwrap_or_default()))
    }

    fn build<P, I>(
        name: &str,
        n_rows: usize,
        n_cols: usize,
        indptr: &[P],
        indices: &[I],
        values: Option<&[f32]>,
    ) -> Result<(Csr, Option<Vec<f32>>)>
    where
        P: Copy + Into<i64>,
        I: Copy + Into<i64>,
    {
        if n_cols > u32::MAX as usize {
            return Err(CoreError::invalid(format!(
                "{name} has {n_cols} columns; at most {} are supported",
                u32::MAX
            )));
        }
        if indptr.len() != n_rows + 1 {
            return Err(CoreError::invalid(format!(
                "{name}.indptr has {} entries, expected n_rows + 1 = {}; is the matrix in CSR format?",
                indptr.len(),
                n_rows + 1
            )));
        }
        if indptr[0].into() != 0 {
            return Err(CoreError::invalid(format!(
                "{name}.indptr must start at 0, got {}; rebuild the matrix with scipy.sparse.csr_matrix",
                indptr[0].into()
            )));
        }
        let nnz = indices.len();
        let mut offsets = Vec::with_capacity(n_rows + 1);
        offsets.push(0usize);
        for r in 0..n_rows {
            let (start, end) = (indptr[r].into(), indptr[r + 1].into());
            if end < start {
                return Err(CoreError::invalid(format!(
                    "{name}.indptr decreases at row {r} ({start} then {end}); a CSR matrix needs non-decreasing indptr"
                )));
            }
            offsets.push(end as usize);
        }
        if offsets[n_rows] != nnz {
            return Err(CoreError::invalid(format!(
                "{name}.indptr ends at {} but there are {nnz} indices; the CSR arrays are inconsistent",
                offsets[n_rows]
            )));
        }

        let mut sorted: Vec<u32> = Vec::with_capacity(nnz);
        let mut sorted_values: Vec<f32> = Vec::with_capacity(values.map_or(0, <[f32]>::len));
        let mut indptr_out = Vec::with_capacity(n_rows + 1);
        indptr_out.push(0usize);
        for r in 0..n_rows {
            let row_start = sorted.len();
            for &raw in &indices[offsets[r]..offsets[r + 1]] {
                let c: i64 = raw.into();
                if c < 0 || c as u64 >= n_cols as u64 {
                    return Err(CoreError::out_of_range(format!(
                        "{name} row {r} holds column id {c}, outside [0, {n_cols}); ids must be below the number of columns"
                    )));
                }
                sorted.push(c as u32);
            }
            if let Some(v) = values {
                sorted_values.extend_from_slice(&v[offsets[r]..offsets[r + 1]]);
            }
            if !sorted[row_start..].windows(2).all(|w| w[0] < w[1]) {
                canonical_row(&mut sorted, &mut sorted_values, row_start, values.is_some());
            }
            indptr_out.push(sorted.len());
        }
        let csr = Csr {
            n_cols,
            indptr: indptr_out,
            indices: sorted,
        };
        Ok((csr, values.map(|_| sorted_values)))
    }

    /// Builds a matrix from rows of ids (used by tests and synthetic data).
    pub fn from_rows(n_cols: usize, rows: &[Vec<u32>]) -> Result<Csr> {
        let mut indptr = vec![0i64];
        let mut indices: Vec<i64> = Vec::new();
        for row in rows {
            indices.extend(row.iter().map(|&c| c as i64));
            indptr.push(indices.len() as i64);
        }
        Csr::from_parts("rows", rows.len(), n_cols, &indptr, &indices)
    }

    pub fn n_rows(&self) -> usize {
        self.indptr.len() - 1
    }

    pub fn n_cols(&self) -> usize {
        self.n_cols
    }

    pub fn nnz(&self) -> usize {
        self.indices.len()
    }

    /// The sorted, unique ids of row `r`.
    #[inline]
    pub fn row(&self, r: usize) -> &[u32] {
        &self.indices[self.indptr[r]..self.indptr[r + 1]]
    }

    /// Row offsets: row `r` is `indices()[indptr()[r]..indptr()[r + 1]]`.
    pub fn indptr(&self) -> &[usize] {
        &self.indptr
    }

    pub fn indices(&self) -> &[u32] {
        &self.indices
    }

    /// Asks the CPU to start loading row `r`'s offsets (`Offsets`) or ids (`Ids`,
    /// which reads the offsets, so request those a step earlier). Lets random row
    /// accesses overlap instead of stalling one cache miss at a time.
    #[inline]
    pub fn prefetch_row(&self, r: usize, part: RowPart) {
        match part {
            RowPart::Offsets => prefetch(&self.indptr[r]),
            RowPart::Ids => {
                let row = self.row(r);
                // At most 8 cache lines: long rows stay hot once touched anyway.
                for line in row.chunks(16).take(8) {
                    prefetch(&line[0]);
                }
            }
        }
    }

    /// Whether row `r` holds `col` (binary search).
    #[inline]
    pub fn contains(&self, r: usize, col: u32) -> bool {
        self.row(r).binary_search(&col).is_ok()
    }
}

/// Sorts the row that starts at `start` (the tail of `ids`) and merges repeated
/// ids, summing their values when `with_values`.
fn canonical_row(ids: &mut Vec<u32>, values: &mut Vec<f32>, start: usize, with_values: bool) {
    let mut pairs: Vec<(u32, f32)> = ids[start..]
        .iter()
        .enumerate()
        .map(|(i, &id)| (id, if with_values { values[start + i] } else { 0.0 }))
        .collect();
    pairs.sort_by_key(|&(id, _)| id);
    ids.truncate(start);
    if with_values {
        values.truncate(start);
    }
    for (id, value) in pairs {
        if ids.len() > start && ids[ids.len() - 1] == id {
            if with_values {
                *values.last_mut().expect("a value per id") += value;
            }
        } else {
            ids.push(id);
            if with_values {
                values.push(value);
            }
        }
    }
}

/// What a search must skip: per query, the ids of its row of `rows` (the items
/// a user has seen); for every query, the sorted `ids` (items nobody may get).
#[derive(Clone, Copy, Debug, Default)]
pub struct Filter<'a> {
    pub rows: Option<&'a Csr>,
    pub ids: &'a [u32],
}

impl<'a> Filter<'a> {
    /// Skips row `query` of `rows`, when given.
    pub fn rows(rows: Option<&'a Csr>) -> Filter<'a> {
        Filter { rows, ids: &[] }
    }

    /// Whether `query` must not get `id`.
    #[inline]
    pub fn skips(&self, query: usize, id: u32) -> bool {
        self.rows.is_some_and(|e| e.contains(query, id))
            || (!self.ids.is_empty() && self.ids.binary_search(&id).is_ok())
    }

    /// Whether nothing is skipped.
    pub fn is_empty(&self) -> bool {
        self.rows.is_none() && self.ids.is_empty()
    }

    /// Checks the filter of a search of `n_queries` queries: one row of `rows`
    /// per query and, where ids are positions (`n_items` given), no id beyond
    /// the items; `ids` strictly increasing.
    pub fn check(&self, n_queries: usize, n_items: Option<usize>) -> Result<()> {
        check_exclusions(self.rows, n_queries, n_items)?;
        if !self.ids.windows(2).all(|w| w[0] < w[1]) {
            return Err(CoreError::invalid(
                "exclude_ids must be sorted and unique (the binding passes them so)",
            ));
        }
        if let (Some(n), Some(&last)) = (n_items, self.ids.last()) {
            if last as usize >= n {
                return Err(CoreError::out_of_range(format!(
                    "exclude_ids holds id {last}, but there are only {n} items"
                )));
            }
        }
        Ok(())
    }
}

/// Checks an `exclude` matrix of a search: one row of excluded ids per query
/// and, where ids are positions (`n_items` given), no column beyond the items.
pub fn check_exclusions(
    exclude: Option<&Csr>,
    n_queries: usize,
    n_items: Option<usize>,
) -> Result<()> {
    let Some(e) = exclude else { return Ok(()) };
    if e.n_rows() != n_queries {
        return Err(CoreError::invalid(format!(
            "exclude has {} rows but there are {n_queries} queries; pass one row of excluded ids per query",
            e.n_rows()
        )));
    }
    if let Some(n_items) = n_items {
        if e.n_cols() > n_items {
            return Err(CoreError::invalid(format!(
                "exclude has {} columns but there are only {n_items} items; its columns must be item ids",
                e.n_cols()
            )));
        }
    }
    Ok(())
}

/// Which part of a row [`Csr::prefetch_row`] loads.
#[derive(Clone, Copy, Debug)]
pub enum RowPart {
    Offsets,
    Ids,
}

/// Hints the CPU to start loading `value`'s cache line.
#[inline(always)]
pub fn prefetch<T>(value: &T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetching is a hint; any address is allowed, and this one is valid.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
            value as *const T as *const i8,
        );
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = value;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sorts_and_deduplicates_rows() {
        let csr = Csr::from_parts("m", 2, 5, &[0i32, 3, 5], &[4i32, 1, 4, 2, 0]).unwrap();
        assert_eq!(csr.row(0), &[1, 4]);
        assert_eq!(csr.row(1), &[0, 2]);
        assert_eq!(csr.nnz(), 4);
        assert!(csr.contains(0, 4));
        assert!(!csr.contains(1, 4));
    }

    #[test]
    fn values_follow_their_ids_and_repeats_add_up() {
        let (csr, values) = Csr::from_parts_with_values(
            "m",
            2,
            5,
            &[0i32, 3, 5],
            &[4i32, 1, 4, 2, 0],
            &[1.0, 2.0, 3.0, 4.0, 5.0],
        )
        .unwrap();
        assert_eq!(csr.row(0), &[1, 4]);
        assert_eq!(values, vec![2.0, 4.0, 5.0, 4.0]);
        let err = Csr::from_parts_with_values("m", 1, 5, &[0i32, 1], &[0i32], &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("0 values for 1 indices"), "{err}");
    }

    #[test]
    fn rejects_malformed_input() {
        let bad_len = Csr::from_parts("m", 2, 5, &[0i64, 1], &[0i64]).unwrap_err();
        assert!(
            bad_len.to_string().contains("expected n_rows + 1 = 3"),
            "{bad_len}"
        );
        let not_zero = Csr::from_parts("m", 1, 5, &[1i64, 1], &[0i64]).unwrap_err();
        assert!(not_zero.to_string().contains("must start at 0"));
        let decreasing = Csr::from_parts("m", 2, 5, &[0i64, 2, 1], &[0i64, 1]).unwrap_err();
        assert!(
            decreasing.to_string().contains("decreases at row 1"),
            "{decreasing}"
        );
        let inconsistent = Csr::from_parts("m", 1, 5, &[0i64, 1], &[0i64, 1]).unwrap_err();
        assert!(inconsistent.to_string().contains("inconsistent"));
        let out = Csr::from_parts("m", 1, 5, &[0i64, 1], &[5i64]).unwrap_err();
        assert!(matches!(out, CoreError::OutOfRange(_)), "{out}");
        let negative = Csr::from_parts("m", 1, 5, &[0i64, 1], &[-1i64]).unwrap_err();
        assert!(matches!(negative, CoreError::OutOfRange(_)));
    }
}
