//! WARP rank weights of CML's metric loss (Hsieh et al. 2017,
//! after Weston et al.'s WARP).
//!
//! For pair b with squared distance `pos[b]` to its positive and `neg[b, u]` to
//! each of its U negatives, the hinge of negative u is
//! `margin + pos[b] - neg[b, u]`. With M the number of positive hinges
//! ("impostors"), the rank estimate is `floor(J * M / U)` and the weight is
//! `ln(rank + 1)`. The hardest negative is the one with the largest hinge, i.e.
//! the smallest `neg[b, u]` (first on ties). Cost: O(B * U), parallel over rows.

use crate::csr::prefetch;
use crate::error::{CoreError, Result};
use crate::kernel::VectorOps;
use crate::parallel;
use crate::vectors::Vectors;

/// Rows per parallel work unit.
const ROWS_PER_TASK: usize = 4096;
/// Pairs per parallel work unit when computing negatives' distances.
const PAIRS_PER_DISTANCE_TASK: usize = 256;
/// How many distances ahead a target row is requested.
const PREFETCH_AHEAD: usize = 8;

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

/// [`rank_weights`] with the negatives' distances computed here: `anchors` row
/// b is pair b's user vector, `negatives` names U rows of `targets` (the item
/// vectors) per pair. Training calls this every step; reading the U target
/// rows once per pair, in cache, costs a fraction of building the B x U x r
/// array of differences the distances would otherwise go through. The
/// distances are f32 sums in a fixed order, so results repeat for a seed.
pub fn rank_weights_by_id(
    anchors: Vectors,
    targets: Vectors,
    negatives: &[i64],
    pos: &[f32],
    margin: f32,
    n_items: usize,
    num_threads: usize,
) -> Result<(Vec<f32>, Vec<i64>)> {
    let rows = anchors.len();
    targets.expect_dim("targets", anchors.dim, "the anchors' dimension")?;
    if pos.len() != rows {
        return Err(CoreError::invalid(format!(
            "pos_dist has {} entries but there are {rows} anchors; pass one positive distance per anchor",
            pos.len()
        )));
    }
    if rows == 0 || negatives.is_empty() || !negatives.len().is_multiple_of(rows) {
        return Err(CoreError::invalid(format!(
            "negatives must hold the same number (at least 1) of ids for each of the {rows} anchors, got {} ids",
            negatives.len()
        )));
    }
    if let Some(&bad) = negatives
        .iter()
        .find(|&&id| id < 0 || id as u64 >= targets.len() as u64)
    {
        return Err(CoreError::out_of_range(format!(
            "negative id {bad} is outside [0, {}), the rows of targets",
            targets.len()
        )));
    }
    let n_negatives = negatives.len() / rows;
    let ops = VectorOps::best();
    let mut dist = vec![0f32; negatives.len()];
    let serial = negatives.len() * anchors.dim < 1 << 18;
    // The target rows are random: request each one a few distances ahead, so
    // their cache misses overlap instead of stalling one at a time.
    let chunk_len = PAIRS_PER_DISTANCE_TASK * n_negatives;
    parallel::for_each_chunk_mut(num_threads, serial, &mut dist, chunk_len, |task, chunk| {
        let first = task * chunk_len;
        for (offset, slot) in chunk.iter_mut().enumerate() {
            let at = first + offset;
            if let Some(&ahead) = negatives.get(at + PREFETCH_AHEAD) {
                for line in targets.row(ahead as usize).chunks(16) {
                    prefetch(&line[0]);
                }
            }
            let anchor = anchors.row(at / n_negatives);
            *slot = ops.sq_dist(anchor, targets.row(negatives[at] as usize));
        }
    });
    let neg = Vectors::new("neg_dist", &dist, n_negatives)?;
    rank_weights(pos, neg, margin, n_items, num_threads)
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
    // In 128 bits: J * M overflows 64 bits for catalogues beyond 2^59 items.
    let rank = n_items as u128 * impostors as u128 / neg.len() as u128;
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
    fn by_id_equals_the_distances_computed_first() {
        let dim = 7;
        let mut rng = crate::rng::Rng::stream(9, 0, &[]);
        let items: Vec<f32> = (0..50 * dim).map(|_| rng.normal() as f32).collect();
        let users: Vec<f32> = (0..30 * dim).map(|_| rng.normal() as f32).collect();
        let negatives: Vec<i64> = (0..30 * 4).map(|_| rng.below(50) as i64).collect();
        let pos: Vec<f32> = (0..30).map(|_| 2.0 * rng.unit_f64() as f32).collect();
        let (anchors, targets) = (
            Vectors::new("anchors", &users, dim).unwrap(),
            Vectors::new("targets", &items, dim).unwrap(),
        );
        let neg: Vec<f32> = negatives
            .iter()
            .enumerate()
            .map(|(at, &id)| {
                VectorOps::best().sq_dist(anchors.row(at / 4), targets.row(id as usize))
            })
            .collect();
        let want = rank_weights(&pos, Vectors::new("n", &neg, 4).unwrap(), 1.5, 50, 1).unwrap();
        let got = rank_weights_by_id(anchors, targets, &negatives, &pos, 1.5, 50, 2).unwrap();
        assert_eq!(got, want);
        let err = rank_weights_by_id(anchors, targets, &[0; 31], &pos, 1.5, 50, 1);
        assert!(err.unwrap_err().to_string().contains("same number"));
        let err = rank_weights_by_id(anchors, targets, &negatives, &pos[..3], 1.5, 50, 1);
        assert!(err
            .unwrap_err()
            .to_string()
            .contains("pos_dist has 3 entries but there are 30 anchors"));
        let bad_ids = vec![99i64; 30];
        let err = rank_weights_by_id(anchors, targets, &bad_ids, &pos, 1.5, 50, 1).unwrap_err();
        assert!(
            err.to_string()
                .contains("negative id 99 is outside [0, 50)"),
            "{err}"
        );
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
