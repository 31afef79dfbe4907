//! p-stable (Gaussian) hashing maths of Datar et al. 2004: the probability
//! that two points share a slot of one hash, and its inverse, used to choose
//! the bucket width from the data.

/// Probability that two points at distance r share a slot of one p-stable
/// Gaussian hash of width w, as a function of `ratio` = w / r (Datar et al.
/// 2004): 1 - 2 Phi(-t) - 2 / (sqrt(2 pi) t) (1 - exp(-t^2 / 2)), t = ratio.
pub fn collision_probability(ratio: f64) -> f64 {
    let t = ratio.max(1e-12);
    let tail = 0.5 * erfc(t / std::f64::consts::SQRT_2);
    1.0 - 2.0 * tail
        - 2.0 / ((2.0 * std::f64::consts::PI).sqrt() * t) * (1.0 - (-t * t / 2.0).exp())
}

/// The ratio w / r at which one hash collides with probability `p` (bisection;
/// the probability rises with the ratio).
pub(super) fn width_ratio_for(p: f64) -> f64 {
    let (mut low, mut high) = (1e-3f64, 1e4f64);
    for _ in 0..200 {
        let middle = (low * high).sqrt();
        if collision_probability(middle) < p {
            low = middle;
        } else {
            high = middle;
        }
    }
    (low * high).sqrt()
}

/// Complementary error function (Numerical Recipes' erfcc, relative error < 1.2e-7).
fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let value = t * poly.exp();
    if x >= 0.0 {
        value
    } else {
        2.0 - value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collision_probability_matches_known_values() {
        // Monotone from 0 to 1, and about 0.80 at w = 4r (Datar et al.'s Figure).
        assert!(collision_probability(0.01) < 0.01);
        assert!(collision_probability(100.0) > 0.99);
        assert!(
            (collision_probability(4.0) - 0.8).abs() < 0.01,
            "{}",
            collision_probability(4.0)
        );
        let ratio = width_ratio_for(0.9);
        assert!((collision_probability(ratio) - 0.9).abs() < 1e-9);
        assert!((erfc(0.5) - 0.479_500_122).abs() < 1e-6);
        assert!((erfc(-1.0) - 1.842_700_793).abs() < 1e-6);
    }
}
