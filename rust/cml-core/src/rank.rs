//! WARP rank weights of CML's metric loss (Hsieh et al. 2017,
//! after Weston et al.'s WARP).
//!
//! For pair b with squared distance `pos[b]` to its positive and `neg[b, u]` to
//! each of its U negatives, the hinge of negative u is
//! `margin + pos[b] - neg[b, u]`. With M the number of positive hinges
//! ("impostors"), the rank estimate is `floor(J * M / U)` and the weight is
//! `ln(rank + 1)`. The hardest negative is the one with the largest hinge, i.e.
//! the smallest `neg[b, u]` (first on ties). Cost: O(B * U), parallel over rows.

use crate::error::{CoreError, Result};
use crate::parallel;
use crate::vectors::Vectors;

/// Rows per parallel work unit.
const ROWS_PER_TASK: usize = 4096;

/// `(weights, hardest)` for each pair: `pos[b]` is its squared distance to the
/// positive, row b of `neg` (one column per negative) those to the negatives.
pub fn rank_weights(
    pos: &[f32],
    neg: Vectors,
    margin: f32,
    n_items: usize,
    num_threads: usize,
) -> Result<(Vec<f32>, Vec<i64>)> {
    let (rows, n_negatives) = (pos.len(), neg.dim);
    if neg.len() != rows {
        return Err(CoreError::invalid(format!(
            "pos_dist has {rows} entries but neg_dist has {} rows; pass one positive distance per row",
            neg.len()
        )));
    }
    if n_items == 0 {
        return Err(CoreError::invalid("n_items must be at least 1, got 0"));
    }
    if !margin.is_finite() {
        return Err(CoreError::invalid(format!(
            "margin must be finite, got {margin}"
        )));
    }
    Vectors::new("pos_dist", pos, 1)?.check_finite("pos_dist")?;
    neg.check_finite("neg_dist")?;
    let (neg, n_items) = (neg.data, n_items as u64);
    let serial = rows * n_negatives < 1 << 16;
    let mut out: Vec<(f32, i64)> = vec![(0.0, 0); rows];
    parallel::for_each_chunk_mut(
        num_threads,
        serial,
        &mut out,
        ROWS_PER_TASK,
        |task, chunk| {
            for (offset, slot) in chunk.iter_mut().enumerate() {
                let b = task * ROWS_PER_TASK + offset;
                *slot = row_weight(
                    pos[b],
                    &neg[b * n_negatives..(b + 1) * n_negatives],
                    margin,
                    n_items,
                );
            }
        },
    );
    Ok(out.into_iter().unzip())
}

/// `(ln(floor(J * M / U) + 1), argmin_u neg[u])` for one pair.
#[inline]
pub fn row_weight(pos: f32, neg: &[f32], margin: f32, n_items: u64) -> (f32, i64) {
    let mut impostors = 0u64;
    let mut hardest = 0usize;
    for (u, &d) in neg.iter().enumerate() {
        if margin + pos - d > 0.0 {
            impostors += 1;
        }
        if d < neg[hardest] {
            hardest = u;
        }
    }
    let rank = n_items * impostors / neg.len() as u64;
    (((rank + 1) as f64).ln() as f32, hardest as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_spec_by_hand() {
        // margin 0.5, pos 1.0: hinges 0.5+1-0.2=1.3, 0.5+1-2=-0.5, 0.5+1-1.4=0.1, 0.5+1-3=-1.5
        let (w, h) = row_weight(1.0, &[0.2, 2.0, 1.4, 3.0], 0.5, 100);
        assert_eq!(h, 0);
        let rank = 100 * 2 / 4;
        assert!((w - ((rank + 1) as f32).ln()).abs() < 1e-6);
        // No impostor: rank 0, weight ln(1) = 0.
        let (w0, h0) = row_weight(0.0, &[2.0, 1.0], 0.5, 100);
        assert_eq!(w0, 0.0);
        assert_eq!(h0, 1);
    }

    #[test]
    fn parallel_equals_serial() {
        let rows = 10_000;
        let u = 20;
        let mut rng = crate::rng::Rng::stream(5, 0, &[]);
        let pos: Vec<f32> = (0..rows).map(|_| rng.unit_f64() as f32).collect();
        let neg: Vec<f32> = (0..rows * u).map(|_| 2.0 * rng.unit_f64() as f32).collect();
        let neg = Vectors::new("neg", &neg, u).unwrap();
        let serial = rank_weights(&pos, neg, 0.5, 25_975, 1).unwrap();
        let parallel = rank_weights(&pos, neg, 0.5, 25_975, 4).unwrap();
        assert_eq!(serial, parallel);
    }

    #[test]
    fn rejects_bad_arguments() {
        let neg = [1.0f32; 6];
        let neg = Vectors::new("neg_dist", &neg, 2).unwrap();
        let message = |pos: &[f32], margin: f32, n_items: usize| {
            rank_weights(pos, neg, margin, n_items, 1)
                .unwrap_err()
                .to_string()
        };
        assert!(
            message(&[1.0; 2], 0.5, 10).contains("pos_dist has 2 entries but neg_dist has 3 rows")
        );
        assert!(message(&[1.0; 3], 0.5, 0).contains("n_items must be at least 1"));
        assert!(message(&[1.0; 3], f32::NAN, 10).contains("margin must be finite"));
        assert!(message(&[1.0, f32::INFINITY, 1.0], 0.5, 10).contains("pos_dist[1, 0] is inf"));
    }
}
