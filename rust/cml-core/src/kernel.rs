//! Register-blocked squared-distance scores, the inner loop of every top-K.
//!
//! ||q - x||^2 = ||q||^2 + ||x||^2 - 2 q.x, and ||q||^2 does not change which
//! items are nearest to q, so the kernels rank items by the *score*
//! `||x||^2 - 2 q.x` and add ||q||^2 back only for reported distances.
//! A micro-kernel computes an MR x NR tile of scores (MR items, NR queries)
//! with all accumulators in registers. Items are read straight from the
//! caller's row-major matrix (one scalar broadcast per item and dimension), so
//! the item side, the big one, is streamed once and never repacked; queries
//! are packed k-major into panels of NR (`b[p * NR + j]`). Each item row of the
//! tile is then compared with the NR queries' current top-K thresholds, and
//! the kernel returns per item a bitmask of the queries it beats. The caller
//! touches only those, so selection costs almost nothing once the thresholds
//! settle. A partial item tile is padded with zero rows of norm +inf (never
//! selected); padded query lanes get threshold -inf (never selected).
//!
//! Three variants, picked once at run time: AVX-512F (8 x 32), AVX2+FMA
//! (6 x 16) and portable scalar code (4 x 8). Each accumulates over the
//! dimension in the same order for every tile, so a score never depends on
//! where its tile fell: results are identical for any split of the work.

/// Computes one tile: `scores[i * NR + j] = norms[i] - 2 * sum_p items[i * dim + p] * queries[p * NR + j]`
/// and `masks[i]` = bit j set where `scores[i * NR + j] < thresholds[j]`.
///
/// # Safety
/// `items` must hold `MR * dim` floats (row-major), `queries` `dim * NR`,
/// `norms` MR, `thresholds` NR, `scores` MR * NR and `masks` MR; the CPU must
/// support the variant's features.
pub type TileFn = unsafe fn(
    dim: usize,
    items: *const f32,
    queries: *const f32,
    norms: *const f32,
    thresholds: *const f32,
    scores: *mut f32,
    masks: *mut u64,
);

/// A micro-kernel and its tile shape.
#[derive(Clone, Copy, Debug)]
pub struct Kernel {
    pub mr: usize,
    pub nr: usize,
    pub name: &'static str,
    pub tile: TileFn,
}

/// Largest tile over all variants, for stack buffers.
pub const MAX_MR: usize = 8;
pub const MAX_NR: usize = 32;
pub const MAX_TILE: usize = MAX_MR * MAX_NR;

/// The fastest kernel this CPU supports.
pub fn best() -> Kernel {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return Kernel {
                mr: 8,
                nr: 32,
                name: "avx512",
                tile: x86::tile_avx512,
            };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return Kernel {
                mr: 6,
                nr: 16,
                name: "avx2",
                tile: x86::tile_avx2,
            };
        }
    }
    scalar()
}

/// The portable kernel (also the reference the SIMD ones are tested against).
pub fn scalar() -> Kernel {
    Kernel {
        mr: 4,
        nr: 8,
        name: "scalar",
        tile: tile_scalar,
    }
}

unsafe fn tile_scalar(
    dim: usize,
    items: *const f32,
    queries: *const f32,
    norms: *const f32,
    thresholds: *const f32,
    scores: *mut f32,
    masks: *mut u64,
) {
    const MR: usize = 4;
    const NR: usize = 8;
    let mut acc = [[0f32; NR]; MR];
    for p in 0..dim {
        let qp = std::slice::from_raw_parts(queries.add(p * NR), NR);
        for (i, row) in acc.iter_mut().enumerate() {
            let x = *items.add(i * dim + p);
            for (c, &q) in row.iter_mut().zip(qp) {
                *c += x * q;
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        let norm = *norms.add(i);
        let mut mask = 0u64;
        for (j, &dot) in row.iter().enumerate() {
            let s = norm - 2.0 * dot;
            *scores.add(i * NR + j) = s;
            mask |= ((s < *thresholds.add(j)) as u64) << j;
        }
        *masks.add(i) = mask;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{lanes_code_dist, lanes_dot, lanes_sq_dist};
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
        lanes_dot::<true>(a, b)
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn sq_dist_avx512(a: &[f32], b: &[f32]) -> f32 {
        lanes_sq_dist::<true>(a, b)
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn code_dist_avx512(codes: &[u8], position: &[f32], weight: &[f32]) -> f32 {
        lanes_code_dist::<true>(codes, position, weight)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn code_dist_avx2(codes: &[u8], position: &[f32], weight: &[f32]) -> f32 {
        lanes_code_dist::<true>(codes, position, weight)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
        lanes_dot::<true>(a, b)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn sq_dist_avx2(a: &[f32], b: &[f32]) -> f32 {
        lanes_sq_dist::<true>(a, b)
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile_avx512(
        dim: usize,
        items: *const f32,
        queries: *const f32,
        norms: *const f32,
        thresholds: *const f32,
        scores: *mut f32,
        masks: *mut u64,
    ) {
        const MR: usize = 8;
        const NR: usize = 32;
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        for p in 0..dim {
            let q0 = _mm512_loadu_ps(queries.add(p * NR));
            let q1 = _mm512_loadu_ps(queries.add(p * NR + 16));
            for (i, row) in acc.iter_mut().enumerate() {
                let x = _mm512_set1_ps(*items.add(i * dim + p));
                row[0] = _mm512_fmadd_ps(x, q0, row[0]);
                row[1] = _mm512_fmadd_ps(x, q1, row[1]);
            }
        }
        let minus_two = _mm512_set1_ps(-2.0);
        let t0 = _mm512_loadu_ps(thresholds);
        let t1 = _mm512_loadu_ps(thresholds.add(16));
        for (i, row) in acc.iter().enumerate() {
            let norm = _mm512_set1_ps(*norms.add(i));
            let s0 = _mm512_fmadd_ps(row[0], minus_two, norm);
            let s1 = _mm512_fmadd_ps(row[1], minus_two, norm);
            _mm512_storeu_ps(scores.add(i * NR), s0);
            _mm512_storeu_ps(scores.add(i * NR + 16), s1);
            let m0 = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(s0, t0) as u64;
            let m1 = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(s1, t1) as u64;
            *masks.add(i) = m0 | (m1 << 16);
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile_avx2(
        dim: usize,
        items: *const f32,
        queries: *const f32,
        norms: *const f32,
        thresholds: *const f32,
        scores: *mut f32,
        masks: *mut u64,
    ) {
        const MR: usize = 6;
        const NR: usize = 16;
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        for p in 0..dim {
            let q0 = _mm256_loadu_ps(queries.add(p * NR));
            let q1 = _mm256_loadu_ps(queries.add(p * NR + 8));
            for (i, row) in acc.iter_mut().enumerate() {
                let x = _mm256_broadcast_ss(&*items.add(i * dim + p));
                row[0] = _mm256_fmadd_ps(x, q0, row[0]);
                row[1] = _mm256_fmadd_ps(x, q1, row[1]);
            }
        }
        let minus_two = _mm256_set1_ps(-2.0);
        let t0 = _mm256_loadu_ps(thresholds);
        let t1 = _mm256_loadu_ps(thresholds.add(8));
        for (i, row) in acc.iter().enumerate() {
            let norm = _mm256_set1_ps(*norms.add(i));
            let s0 = _mm256_fmadd_ps(row[0], minus_two, norm);
            let s1 = _mm256_fmadd_ps(row[1], minus_two, norm);
            _mm256_storeu_ps(scores.add(i * NR), s0);
            _mm256_storeu_ps(scores.add(i * NR + 8), s1);
            let m0 = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_LT_OQ>(s0, t0)) as u32 as u64;
            let m1 = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_LT_OQ>(s1, t1)) as u32 as u64;
            *masks.add(i) = m0 | (m1 << 8);
        }
    }
}

/// Dot product and squared distance of two vectors, compiled for the best
/// instruction set this CPU has (chosen once, like the tile kernels).
#[derive(Clone, Copy, Debug)]
pub struct VectorOps {
    dot: unsafe fn(&[f32], &[f32]) -> f32,
    sq_dist: unsafe fn(&[f32], &[f32]) -> f32,
    code_dist: unsafe fn(&[u8], &[f32], &[f32]) -> f32,
}

impl VectorOps {
    /// The variant for this CPU.
    pub fn best() -> &'static VectorOps {
        static OPS: std::sync::OnceLock<VectorOps> = std::sync::OnceLock::new();
        OPS.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx512f") {
                    return VectorOps {
                        dot: x86::dot_avx512,
                        sq_dist: x86::sq_dist_avx512,
                        code_dist: x86::code_dist_avx512,
                    };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    return VectorOps {
                        dot: x86::dot_avx2,
                        sq_dist: x86::sq_dist_avx2,
                        code_dist: x86::code_dist_avx2,
                    };
                }
            }
            VectorOps {
                dot: |a, b| lanes_dot::<false>(a, b),
                sq_dist: |a, b| lanes_sq_dist::<false>(a, b),
                code_dist: |c, p, w| lanes_code_dist::<false>(c, p, w),
            }
        })
    }

    #[inline]
    pub fn dot(&self, a: &[f32], b: &[f32]) -> f32 {
        debug_assert_eq!(a.len(), b.len());
        // SAFETY: the function pointer was chosen for features this CPU has.
        unsafe { (self.dot)(a, b) }
    }

    #[inline]
    pub fn sq_dist(&self, a: &[f32], b: &[f32]) -> f32 {
        debug_assert_eq!(a.len(), b.len());
        // SAFETY: as in `dot`.
        unsafe { (self.sq_dist)(a, b) }
    }

    /// `sum_d weight[d] * (codes[d] - position[d])^2`: the squared distance of a
    /// byte-coded vector to a query expressed in code units.
    #[inline]
    pub fn code_dist(&self, codes: &[u8], position: &[f32], weight: &[f32]) -> f32 {
        debug_assert!(codes.len() == position.len() && codes.len() == weight.len());
        // SAFETY: as in `dot`.
        unsafe { (self.code_dist)(codes, position, weight) }
    }
}

const LANES: usize = 16;

/// Sum over 16 independent lanes (vectorises to one zmm or two ymm registers);
/// `FMA` fuses multiply and add, which only pays where the CPU has it.
#[inline(always)]
fn lanes_dot<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for j in 0..LANES {
            acc[j] = if FMA {
                x[j].mul_add(y[j], acc[j])
            } else {
                acc[j] + x[j] * y[j]
            };
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
fn lanes_sq_dist<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| (x - y) * (x - y))
        .sum();
    for (x, y) in ca.zip(cb) {
        for j in 0..LANES {
            let d = x[j] - y[j];
            acc[j] = if FMA {
                d.mul_add(d, acc[j])
            } else {
                acc[j] + d * d
            };
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
fn lanes_code_dist<const FMA: bool>(codes: &[u8], position: &[f32], weight: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let n = codes.len() / LANES * LANES;
    let mut tail = 0f32;
    for d in n..codes.len() {
        let diff = codes[d] as f32 - position[d];
        tail += weight[d] * diff * diff;
    }
    for ((c, p), w) in codes[..n]
        .chunks_exact(LANES)
        .zip(position.chunks_exact(LANES))
        .zip(weight.chunks_exact(LANES))
    {
        for j in 0..LANES {
            let diff = c[j] as f32 - p[j];
            acc[j] = if FMA {
                (w[j] * diff).mul_add(diff, acc[j])
            } else {
                acc[j] + w[j] * diff * diff
            };
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Packs rows `rows` of the row-major `data` (`dim` columns) into k-major
/// panels of `width` rows each, zero-padding the last panel.
pub fn pack_panels(
    data: &[f32],
    dim: usize,
    rows: std::ops::Range<usize>,
    width: usize,
    out: &mut Vec<f32>,
) {
    let n = rows.len();
    let panels = n.div_ceil(width);
    out.clear();
    out.resize(panels * width * dim, 0.0);
    for (offset, r) in rows.enumerate() {
        let (panel, lane) = (offset / width, offset % width);
        let dst = &mut out[panel * width * dim..(panel + 1) * width * dim];
        for (p, &v) in data[r * dim..(r + 1) * dim].iter().enumerate() {
            dst[p * width + lane] = v;
        }
    }
}

/// The item tile starting at row `start`: a pointer into `data` when MR full rows
/// remain, else a copy padded with zero rows into `pad`; `norms` gets the rows'
/// squared norms, +inf for padding.
pub fn item_tile<'a>(
    data: &'a [f32],
    dim: usize,
    start: usize,
    end: usize,
    mr: usize,
    pad: &'a mut Vec<f32>,
    norms: &mut [f32],
) -> &'a [f32] {
    let rows = (end - start).min(mr);
    for (i, norm) in norms.iter_mut().enumerate().take(mr) {
        *norm = if i < rows {
            sq_norm(&data[(start + i) * dim..(start + i + 1) * dim])
        } else {
            f32::INFINITY
        };
    }
    if rows == mr {
        &data[start * dim..(start + mr) * dim]
    } else {
        pad.clear();
        pad.extend_from_slice(&data[start * dim..end * dim]);
        pad.resize(mr * dim, 0.0);
        pad
    }
}

/// Squared Euclidean norm, summed in a fixed order.
#[inline]
pub fn sq_norm(v: &[f32]) -> f32 {
    v.iter().map(|x| x * x).sum()
}

/// Exact squared distance, accumulated in f64 (used for every reported distance).
#[inline]
pub fn sq_dist(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| {
            let d = (x - y) as f64;
            d * d
        })
        .sum::<f64>() as f32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = Rng::stream(seed, 0, &[]);
        (0..n).map(|_| rng.normal() as f32).collect()
    }

    #[test]
    fn vector_ops_match_naive_formulas() {
        let ops = VectorOps::best();
        for n in [1, 15, 16, 17, 100] {
            let a = random(n, 7);
            let b = random(n, 8);
            let dot: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            let dist: f64 = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
                .sum();
            assert!((ops.dot(&a, &b) as f64 - dot).abs() < 1e-4, "{n}");
            assert!((ops.sq_dist(&a, &b) as f64 - dist).abs() < 1e-4, "{n}");
            assert!((lanes_dot::<false>(&a, &b) as f64 - dot).abs() < 1e-4);
        }
    }

    /// Every available kernel equals the naive formula on a random tile,
    /// including a partial (padded) item tile.
    #[test]
    fn kernels_match_naive_scores() {
        let dim = 37;
        for kernel in [best(), scalar()] {
            let (mr, nr) = (kernel.mr, kernel.nr);
            let x = random(mr * dim, 2);
            let q = random(nr * dim, 1);
            let mut packed = Vec::new();
            pack_panels(&q, dim, 0..nr, nr, &mut packed);
            let thresholds: Vec<f32> = (0..nr).map(|j| j as f32 - 2.0).collect();
            for rows in [mr, mr - 1] {
                let (mut pad, mut norms) = (Vec::new(), vec![0f32; mr]);
                let tile = item_tile(&x, dim, 0, rows, mr, &mut pad, &mut norms);
                let mut scores = vec![0f32; mr * nr];
                let mut masks = vec![0u64; mr];
                unsafe {
                    (kernel.tile)(
                        dim,
                        tile.as_ptr(),
                        packed.as_ptr(),
                        norms.as_ptr(),
                        thresholds.as_ptr(),
                        scores.as_mut_ptr(),
                        masks.as_mut_ptr(),
                    );
                }
                for i in 0..mr {
                    for j in 0..nr {
                        let got = scores[i * nr + j];
                        if i >= rows {
                            assert_eq!(masks[i], 0, "{} padded row {i}", kernel.name);
                            continue;
                        }
                        let dot: f64 = (0..dim)
                            .map(|p| x[i * dim + p] as f64 * q[j * dim + p] as f64)
                            .sum();
                        let want = norms[i] as f64 - 2.0 * dot;
                        assert!(
                            (got as f64 - want).abs() < 1e-3,
                            "{} {i} {j}: {got} vs {want}",
                            kernel.name
                        );
                        assert_eq!(
                            masks[i] >> j & 1 == 1,
                            got < thresholds[j],
                            "{}",
                            kernel.name
                        );
                    }
                }
            }
        }
    }
}
