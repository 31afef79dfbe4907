//! Vectors quantised to one byte per coordinate, for a cheap first scoring of
//! LSH candidates before the exact re-ranking: a candidate's approximate
//! squared distance reads a quarter of the bytes of its exact vector.

use crate::kernel::VectorOps;
use crate::vectors::Vectors;

/// Vectors quantised to one byte per coordinate, per-coordinate affine:
/// `x_d ~ offset_d + step_d * c_d`. The range of a coordinate is its 0.1% to
/// 99.9% quantile (of a sample), not its extremes: one outlier must not
/// squeeze every other vector into a handful of codes. Values outside the
/// range get the end codes; the exact re-ranking puts such rare vectors right.
#[derive(Clone, Debug, Default)]
pub(super) struct Codes {
    dim: usize,
    codes: Vec<u8>,
    offset: Vec<f32>,
    step: Vec<f32>,
}

/// A query in code units: `(q_d - offset_d) / step_d`, and the weights `step_d^2`.
pub(super) struct CodeTarget {
    position: Vec<f32>,
    weight: Vec<f32>,
}

impl Codes {
    pub(super) fn encode(vectors: Vectors) -> Codes {
        let dim = vectors.dim;
        if vectors.is_empty() {
            return Codes::default();
        }
        let (low, high) = quantile_range(vectors);
        let step: Vec<f32> = low
            .iter()
            .zip(&high)
            .map(|(l, h)| ((h - l) / 255.0).max(f32::MIN_POSITIVE))
            .collect();
        let mut codes = Vec::with_capacity(vectors.data.len());
        for row in vectors.data.chunks_exact(dim) {
            // Truncating x + 0.5 (a floor, these being non-negative) rounds to
            // nearest without a libm call; the clamp guards float slop.
            codes.extend(
                row.iter()
                    .enumerate()
                    .map(|(d, &x)| ((x - low[d]) / step[d] + 0.5).clamp(0.0, 255.0) as u8),
            );
        }
        Codes {
            dim,
            codes,
            offset: low,
            step,
        }
    }

    #[inline]
    pub(super) fn code(&self, item: usize) -> &[u8] {
        &self.codes[item * self.dim..(item + 1) * self.dim]
    }

    pub(super) fn target(&self, q: &[f32]) -> CodeTarget {
        CodeTarget {
            position: q
                .iter()
                .zip(&self.offset)
                .zip(&self.step)
                .map(|((x, o), s)| (x - o) / s)
                .collect(),
            weight: self.step.iter().map(|s| s * s).collect(),
        }
    }

    pub(super) fn memory_bytes(&self) -> usize {
        self.codes.len() + 8 * self.dim
    }
}

/// Per coordinate, the 0.1% and 99.9% quantiles of (an even sample of up to
/// [`RANGE_SAMPLE`] rows of) `vectors`.
fn quantile_range(vectors: Vectors) -> (Vec<f32>, Vec<f32>) {
    let (n, dim) = (vectors.len(), vectors.dim);
    let stride = n.div_ceil(RANGE_SAMPLE).max(1);
    let rows: Vec<usize> = (0..n).step_by(stride).collect();
    let (mut low, mut high) = (vec![0f32; dim], vec![0f32; dim]);
    let mut column = Vec::with_capacity(rows.len());
    for d in 0..dim {
        column.clear();
        column.extend(rows.iter().map(|&r| vectors.data[r * dim + d]));
        let last = column.len() - 1;
        let (lo, hi) = (
            (last as f64 * 0.001) as usize,
            (last as f64 * 0.999).ceil() as usize,
        );
        low[d] = *column.select_nth_unstable_by(lo, f32::total_cmp).1;
        high[d] = *column.select_nth_unstable_by(hi, f32::total_cmp).1;
    }
    (low, high)
}

/// Rows sampled to find each coordinate's range.
const RANGE_SAMPLE: usize = 1 << 16;

impl CodeTarget {
    /// The approximate squared distance of a coded vector to this query.
    #[inline]
    pub(super) fn distance(&self, ops: &VectorOps, codes: &[u8]) -> f32 {
        ops.code_dist(codes, &self.position, &self.weight)
    }
}
