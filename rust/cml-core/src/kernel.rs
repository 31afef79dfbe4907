//! Register-blocked squared-distance scores, the inner loop of every top-K.
//!
//! ||q - x||^2 = ||q||^2 + ||x||^2 - 2 q.x, and ||q||^2 does not change which
//! items are nearest to q, so the kernels rank items by the *score*
//! `||x||^2 - 2 q.x` and add ||q||^2 back only for reported distances.
//! A micro-kernel computes an MR x NR tile of scores (MR queries, NR items)
//! from packed panels (k-major: `a[p * MR + i]`, `b[p * NR + j]`) with all
//! accumulators in registers, then compares each row with that query's current
//! top-K threshold and returns a bitmask of the entries that beat it. The
//! caller touches only those, so selection costs almost nothing once the
//! thresholds settle. Items are padded to NR with norm +inf (never selected),
//! queries to MR with threshold -inf (never selected).
//!
//! Three variants, picked once at run time: AVX-512F (8 x 32), AVX2+FMA
//! (6 x 16) and portable scalar code (4 x 8). Each variant accumulates over the
//! dimension in the same order for every tile, so a score never depends on
//! where its tile fell: results are identical for any split of the work.

/// Computes one tile: `scores[i * NR + j] = norms[j] - 2 * sum_p a[p*MR+i] * b[p*NR+j]`
/// and `masks[i]` = bit j set where `scores[i * NR + j] < thresholds[i]`.
///
/// # Safety
/// `a` must hold `dim * MR` floats, `b` `dim * NR`, `norms` NR, `thresholds` MR,
/// `scores` MR * NR and `masks` MR; the CPU must support the variant's features.
pub type TileFn = unsafe fn(
    dim: usize,
    a: *const f32,
    b: *const f32,
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
pub const MAX_TILE: usize = 8 * 32;

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
    a: *const f32,
    b: *const f32,
    norms: *const f32,
    thresholds: *const f32,
    scores: *mut f32,
    masks: *mut u64,
) {
    const MR: usize = 4;
    const NR: usize = 8;
    let mut acc = [[0f32; NR]; MR];
    for p in 0..dim {
        let bp = std::slice::from_raw_parts(b.add(p * NR), NR);
        for (i, row) in acc.iter_mut().enumerate() {
            let av = *a.add(p * MR + i);
            for (c, &bv) in row.iter_mut().zip(bp) {
                *c += av * bv;
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        let threshold = *thresholds.add(i);
        let mut mask = 0u64;
        for (j, &dot) in row.iter().enumerate() {
            let s = *norms.add(j) - 2.0 * dot;
            *scores.add(i * NR + j) = s;
            mask |= ((s < threshold) as u64) << j;
        }
        *masks.add(i) = mask;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile_avx512(
        dim: usize,
        a: *const f32,
        b: *const f32,
        norms: *const f32,
        thresholds: *const f32,
        scores: *mut f32,
        masks: *mut u64,
    ) {
        const MR: usize = 8;
        const NR: usize = 32;
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        for p in 0..dim {
            let b0 = _mm512_loadu_ps(b.add(p * NR));
            let b1 = _mm512_loadu_ps(b.add(p * NR + 16));
            for (i, row) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_ps(*a.add(p * MR + i));
                row[0] = _mm512_fmadd_ps(av, b0, row[0]);
                row[1] = _mm512_fmadd_ps(av, b1, row[1]);
            }
        }
        let minus_two = _mm512_set1_ps(-2.0);
        let n0 = _mm512_loadu_ps(norms);
        let n1 = _mm512_loadu_ps(norms.add(16));
        for (i, row) in acc.iter().enumerate() {
            let s0 = _mm512_fmadd_ps(row[0], minus_two, n0);
            let s1 = _mm512_fmadd_ps(row[1], minus_two, n1);
            _mm512_storeu_ps(scores.add(i * NR), s0);
            _mm512_storeu_ps(scores.add(i * NR + 16), s1);
            let t = _mm512_set1_ps(*thresholds.add(i));
            let m0 = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(s0, t) as u64;
            let m1 = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(s1, t) as u64;
            *masks.add(i) = m0 | (m1 << 16);
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile_avx2(
        dim: usize,
        a: *const f32,
        b: *const f32,
        norms: *const f32,
        thresholds: *const f32,
        scores: *mut f32,
        masks: *mut u64,
    ) {
        const MR: usize = 6;
        const NR: usize = 16;
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        for p in 0..dim {
            let b0 = _mm256_loadu_ps(b.add(p * NR));
            let b1 = _mm256_loadu_ps(b.add(p * NR + 8));
            for (i, row) in acc.iter_mut().enumerate() {
                let av = _mm256_broadcast_ss(&*a.add(p * MR + i));
                row[0] = _mm256_fmadd_ps(av, b0, row[0]);
                row[1] = _mm256_fmadd_ps(av, b1, row[1]);
            }
        }
        let minus_two = _mm256_set1_ps(-2.0);
        let n0 = _mm256_loadu_ps(norms);
        let n1 = _mm256_loadu_ps(norms.add(8));
        for (i, row) in acc.iter().enumerate() {
            let s0 = _mm256_fmadd_ps(row[0], minus_two, n0);
            let s1 = _mm256_fmadd_ps(row[1], minus_two, n1);
            _mm256_storeu_ps(scores.add(i * NR), s0);
            _mm256_storeu_ps(scores.add(i * NR + 8), s1);
            let t = _mm256_set1_ps(*thresholds.add(i));
            let m0 = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_LT_OQ>(s0, t)) as u32 as u64;
            let m1 = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_LT_OQ>(s1, t)) as u32 as u64;
            *masks.add(i) = m0 | (m1 << 8);
        }
    }
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

/// Squared norms of rows `rows`, padded with +inf to a multiple of `width`
/// (padded items must never be selected).
pub fn padded_norms(
    data: &[f32],
    dim: usize,
    rows: std::ops::Range<usize>,
    width: usize,
    out: &mut Vec<f32>,
) {
    out.clear();
    out.extend(rows.clone().map(|r| sq_norm(&data[r * dim..(r + 1) * dim])));
    out.resize(rows.len().div_ceil(width) * width, f32::INFINITY);
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

    /// Every available kernel equals the naive formula on a random tile.
    #[test]
    fn kernels_match_naive_scores() {
        let dim = 37;
        for kernel in [best(), scalar()] {
            let (mr, nr) = (kernel.mr, kernel.nr);
            let q = random(mr * dim, 1);
            let x = random(nr * dim, 2);
            let (mut a, mut b, mut norms) = (Vec::new(), Vec::new(), Vec::new());
            pack_panels(&q, dim, 0..mr, mr, &mut a);
            pack_panels(&x, dim, 0..nr, nr, &mut b);
            padded_norms(&x, dim, 0..nr, nr, &mut norms);
            let thresholds: Vec<f32> = (0..mr).map(|i| i as f32 - 2.0).collect();
            let mut scores = vec![0f32; mr * nr];
            let mut masks = vec![0u64; mr];
            unsafe {
                (kernel.tile)(
                    dim,
                    a.as_ptr(),
                    b.as_ptr(),
                    norms.as_ptr(),
                    thresholds.as_ptr(),
                    scores.as_mut_ptr(),
                    masks.as_mut_ptr(),
                );
            }
            for i in 0..mr {
                for j in 0..nr {
                    let dot: f64 = (0..dim)
                        .map(|p| q[i * dim + p] as f64 * x[j * dim + p] as f64)
                        .sum();
                    let want = norms[j] as f64 - 2.0 * dot;
                    let got = scores[i * nr + j];
                    assert!(
                        (got as f64 - want).abs() < 1e-3,
                        "{} {i} {j}: {got} vs {want}",
                        kernel.name
                    );
                    assert_eq!(
                        masks[i] >> j & 1 == 1,
                        got < thresholds[i],
                        "{}",
                        kernel.name
                    );
                }
            }
        }
    }
}
