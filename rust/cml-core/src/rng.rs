//! Seeded random streams keyed by *what* is being drawn, never by which thread
//! draws it.
//!
//! Every random decision in the core (the epoch permutation, the negatives of
//! the pair at position p, the projections of an LSH table) gets its own stream
//! derived from `(seed, tag, indices...)` by a strong 64-bit mixer. Work can then
//! be split across any number of threads in any order and the result stays
//! bit-identical for a given seed. The generator is SplitMix64 (Steele, Lea &
//! Flood 2014): one add and a 3-round mix per 64 bits, and it passes BigCrush.
//! It is written here rather than taken from `rand` so the streams, and hence
//! every seeded result, stay the same across releases of third-party crates.

const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// The SplitMix64 finaliser: a bijective avalanche mix of 64 bits.
#[inline(always)]
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Stream tags, one per kind of random decision, so two kinds never share a stream.
pub mod tag {
    pub const EPOCH_ORDER: u64 = 1;
    pub const NEGATIVES: u64 = 2;
    pub const LSH_PROJECTION: u64 = 3;
    pub const SAMPLE: u64 = 4;
}

/// A SplitMix64 generator.
#[derive(Clone, Debug)]
pub struct Rng {
    state: u64,
}

impl Rng {
    /// The stream for `(seed, tag, keys...)`; distinct keys give independent streams.
    #[inline]
    pub fn stream(seed: u64, tag: u64, keys: &[u64]) -> Self {
        let mut h = mix64(seed ^ mix64(tag.wrapping_mul(GOLDEN_GAMMA)));
        for &k in keys {
            h = mix64(h ^ mix64(k.wrapping_add(GOLDEN_GAMMA)));
        }
        Rng { state: h }
    }

    #[inline(always)]
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN_GAMMA);
        mix64(self.state)
    }

    /// Uniform integer in `[0, n)` without modulo bias (Lemire 2019). `n` must be > 0.
    #[inline(always)]
    pub fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0);
        let mut m = (self.next_u64() as u128) * (n as u128);
        if (m as u64) < n {
            let threshold = n.wrapping_neg() % n;
            while (m as u64) < threshold {
                m = (self.next_u64() as u128) * (n as u128);
            }
        }
        (m >> 64) as u64
    }

    /// Uniform float in `[0, 1)` with 53 random bits.
    #[inline]
    pub fn unit_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Standard normal deviate (Box-Muller; one of the pair is discarded for simplicity).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.unit_f64(); // in (0, 1], so ln is finite
        let u2 = self.unit_f64();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, values: &mut [T]) {
        for i in (1..values.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            values.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn first_draws(seed: u64, tag: u64, keys: &[u64]) -> Vec<u64> {
        let mut rng = Rng::stream(seed, tag, keys);
        (0..4).map(|_| rng.next_u64()).collect()
    }

    #[test]
    fn streams_are_reproducible_and_distinct() {
        assert_eq!(first_draws(7, 1, &[3]), first_draws(7, 1, &[3]));
        assert_ne!(first_draws(7, 1, &[3]), first_draws(7, 1, &[4]));
        assert_ne!(first_draws(7, 1, &[]), first_draws(7, 2, &[]));
        assert_ne!(first_draws(7, 1, &[1, 2]), first_draws(7, 1, &[2, 1]));
    }

    #[test]
    fn below_is_uniform_enough() {
        let mut rng = Rng::stream(0, 0, &[]);
        let n = 7u64;
        let mut counts = [0usize; 7];
        for _ in 0..70_000 {
            let x = rng.below(n);
            assert!(x < n);
            counts[x as usize] += 1;
        }
        for c in counts {
            assert!((9_000..11_000).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn normal_has_unit_variance() {
        let mut rng = Rng::stream(1, 0, &[]);
        let xs: Vec<f64> = (0..100_000).map(|_| rng.normal()).collect();
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / xs.len() as f64;
        assert!(mean.abs() < 0.02, "{mean}");
        assert!((var - 1.0).abs() < 0.02, "{var}");
    }
}
