//! Vectors quantised to one byte per coordinate, for a cheap first scoring of
//! LSH candidates before the exact re-ranking: a candidate's approximate
//! squared distance reads a quarter of the bytes of its exact vector.

use crate::kernel::VectorOps;
use crate::vectors::Vectors;

/// Vectors quantised to one byte per coordinate, per-coordinate affine:
/// `x_d ~ offset_d + step_d * c_d`.
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
        let (mut low, mut high) = (vec![f32::INFINITY; dim], vec![f32::NEG_INFINITY; dim]);
        for row in vectors.data.chunks_exact(dim) {
            for (d, &x) in row.iter().enumerate() {
                low[d] = low[d].min(x);
                high[d] = high[d].max(x);
            }
        }
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

impl CodeTarget {
    /// The approximate squared distance of a coded vector to this query.
    #[inline]
    pub(super) fn distance(&self, ops: &VectorOps, codes: &[u8]) -> f32 {
        ops.code_dist(codes, &self.position, &self.weight)
    }
}
