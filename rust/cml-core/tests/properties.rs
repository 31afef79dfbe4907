//! Property tests of the core on random inputs: the sampler never hands out a
//! positive as a negative and covers every pair once per epoch, whatever the
//! thread count; the kernels equal naive references.

use cml_core::csr::Filter;
use cml_core::lsh::{LshIndex, LshParams};
use cml_core::rank::rank_weights;
use cml_core::topk::{sqdist_matrix, topk_l2};
use cml_core::vectors::Vectors;
use cml_core::{Csr, SamplerConfig, WarpSampler};
use proptest::prelude::*;

/// A random user x item matrix where no user has every item.
fn interactions() -> impl Strategy<Value = (usize, Vec<Vec<u32>>)> {
    (2usize..150).prop_flat_map(|n_items| {
        let row = proptest::collection::btree_set(0..n_items as u32, 0..n_items)
            .prop_map(|set| set.into_iter().collect::<Vec<u32>>());
        (Just(n_items), proptest::collection::vec(row, 1..30))
    })
}

fn vectors(rows: std::ops::Range<usize>, dim: usize) -> impl Strategy<Value = Vec<f32>> {
    rows.prop_flat_map(move |n| proptest::collection::vec(-2.0f32..2.0, n * dim))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn sampler_never_draws_a_positive_and_covers_each_pair_once(
        (n_items, rows) in interactions(),
        batch_size in 1usize..50,
        n_negatives in 1usize..8,
        seed in any::<u64>(),
        epoch in 0u64..5,
    ) {
        let csr = Csr::from_rows(n_items, &rows).unwrap();
        prop_assume!(csr.nnz() > 0);
        let config = SamplerConfig { batch_size, n_negatives, seed, check_negative: true, popularity_exponent: 0.0 };
        let sampler = WarpSampler::new(csr.clone(), config).unwrap();
        let order = sampler.epoch_order(epoch);
        let mut seen_pairs = Vec::new();
        for index in 0..sampler.n_batches() {
            let one = sampler.batch(epoch, &order, index, 1);
            let many = sampler.batch(epoch, &order, index, 3);
            prop_assert_eq!(&one, &many);
            for (i, (&user, &item)) in one.users.iter().zip(&one.positives).enumerate() {
                seen_pairs.push((user, item));
                for &negative in &one.negatives[i * n_negatives..(i + 1) * n_negatives] {
                    prop_assert!(negative >= 0 && (negative as usize) < n_items);
                    prop_assert!(!csr.contains(user as usize, negative as u32));
                }
            }
        }
        seen_pairs.sort();
        let mut expected: Vec<(i64, i64)> = (0..csr.n_rows())
            .flat_map(|u| csr.row(u).iter().map(move |&i| (u as i64, i as i64)))
            .collect();
        expected.sort();
        prop_assert_eq!(seen_pairs, expected);
    }

    #[test]
    fn topk_equals_a_naive_reference(
        dim in 1usize..12,
        queries in vectors(1..20, 12),
        items in vectors(1..120, 12),
        k in 1usize..40,
        threads in 1usize..4,
        exclude_seed in any::<u64>(),
    ) {
        // Re-cut the generated buffers to the drawn dimension.
        let q = &queries[..queries.len() / 12 * dim];
        let x = &items[..items.len() / 12 * dim];
        let (qv, xv) = (Vectors::new("q", q, dim).unwrap(), Vectors::new("x", x, dim).unwrap());
        let rows: Vec<Vec<u32>> = (0..qv.len())
            .map(|r| (0..xv.len() as u32).filter(|j| (exclude_seed >> ((j + r as u32) % 60)) & 1 == 1).collect())
            .collect();
        let exclude = Csr::from_rows(xv.len(), &rows).unwrap();
        let found = topk_l2(qv, xv, k, Filter::rows(Some(&exclude)), threads).unwrap();
        for (r, excluded) in rows.iter().enumerate() {
            let mut all: Vec<(f64, i64)> = (0..xv.len())
                .filter(|j| !excluded.contains(&(*j as u32)))
                .map(|j| {
                    let d: f64 = qv.row(r).iter().zip(xv.row(j)).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
                    (d, j as i64)
                })
                .collect();
            all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            prop_assert_eq!(found.k, k.min(xv.len()));
            let width = found.k;
            for slot in 0..width {
                let (id, d) = (found.ids[r * width + slot], found.sqdist[r * width + slot]);
                match all.get(slot) {
                    Some(&(want, _)) => {
                        prop_assert!(id >= 0 && !excluded.contains(&(id as u32)));
                        prop_assert!((d as f64 - want).abs() <= 1e-3 * want.max(1.0), "{} vs {}", d, want);
                    }
                    None => prop_assert!(id == -1 && d == f32::INFINITY),
                }
            }
        }
        let matrix = sqdist_matrix(qv, xv, threads).unwrap();
        for r in 0..qv.len() {
            for j in 0..xv.len() {
                let want: f64 = qv.row(r).iter().zip(xv.row(j)).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
                prop_assert!((matrix[r * xv.len() + j] as f64 - want).abs() <= 1e-3 * want.max(1.0));
            }
        }
    }

    #[test]
    fn rank_weights_equal_the_formula(
        pos in proptest::collection::vec(0.0f32..4.0, 1..50),
        negatives in 1usize..30,
        margin in 0.0f32..2.0,
        n_items in 1u64..100_000,
        seed in any::<u64>(),
    ) {
        let mut state = seed;
        let neg: Vec<f32> = (0..pos.len() * negatives)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (state >> 40) as f32 / (1u64 << 24) as f32 * 4.0
            })
            .collect();
        let neg_vectors = Vectors::new("neg", &neg, negatives).unwrap();
        let (weights, hardest) = rank_weights(&pos, neg_vectors, margin, n_items as usize, 2).unwrap();
        for (b, &p) in pos.iter().enumerate() {
            let row = &neg[b * negatives..(b + 1) * negatives];
            let impostors = row.iter().filter(|&&d| margin + p - d > 0.0).count() as u64;
            let rank = n_items * impostors / negatives as u64;
            prop_assert!((weights[b] as f64 - ((rank + 1) as f64).ln()).abs() < 1e-5);
            let min = row.iter().copied().fold(f32::INFINITY, f32::min);
            prop_assert_eq!(row[hardest[b] as usize], min);
            prop_assert_eq!(row.iter().position(|&d| d == min).unwrap() as i64, hardest[b]);
        }
    }

    #[test]
    fn lsh_returns_true_distances_of_real_items_without_repeats(
        items in vectors(5..200, 6),
        queries in vectors(1..10, 6),
        probes in 1usize..200,
        seed in any::<u64>(),
    ) {
        let (xv, qv) = (Vectors::new("v", &items, 6).unwrap(), Vectors::new("v", &queries, 6).unwrap());
        let mut index = LshIndex::new(LshParams { dim: 6, n_tables: 4, n_hashes: 4, bucket_width: None, seed }).unwrap();
        let ids: Vec<i64> = (0..xv.len() as i64).map(|i| 1000 + 3 * i).collect();
        index.add(xv, &ids, 2).unwrap();
        let found = index.query(qv, 8, Some(probes), None, Filter::default(), 2).unwrap();
        let again = index.query(qv, 8, Some(probes), None, Filter::default(), 1).unwrap();
        prop_assert_eq!(&found, &again);
        let width = found.k;
        prop_assert_eq!(width, 8.min(xv.len()));
        for r in 0..qv.len() {
            let row = &found.ids[r * width..(r + 1) * width];
            let real: Vec<i64> = row.iter().copied().filter(|&i| i >= 0).collect();
            let mut unique = real.clone();
            unique.sort();
            unique.dedup();
            prop_assert_eq!(unique.len(), real.len());
            for (slot, &id) in row.iter().enumerate() {
                if id < 0 {
                    prop_assert!(row[slot..].iter().all(|&i| i < 0));
                    continue;
                }
                prop_assert!(id >= 1000 && (id - 1000) % 3 == 0);
                let j = ((id - 1000) / 3) as usize;
                let want: f64 = qv.row(r).iter().zip(xv.row(j)).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
                prop_assert!((found.sqdist[r * width + slot] as f64 - want).abs() < 1e-4 * want.max(1.0));
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// The index file reader on damaged input: any flipped bytes, truncation or
    /// rewritten header field gives an error or a working index, never a panic,
    /// a hang or an allocation the file cannot justify.
    #[test]
    fn lsh_reader_survives_damaged_files(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
        field in 0usize..8,
        value in prop_oneof![Just(0u64), Just(1), Just(u64::MAX), Just(1 << 40), any::<u64>()],
        rewrite in any::<bool>(),
        fix_checksum in any::<bool>(),
    ) {
        let dim = 4;
        let data: Vec<f32> = (0..40 * dim).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut index = LshIndex::new(LshParams { dim, n_tables: 3, n_hashes: 4, bucket_width: None, seed: 1 }).unwrap();
        let ids: Vec<i64> = (0..40).collect();
        index.add(Vectors::new("v", &data, dim).unwrap(), &ids, 1).unwrap();
        let mut bytes = index.to_bytes();
        if rewrite {
            let at = 12 + 8 * field.min(6);
            bytes[at..at + 8].copy_from_slice(&value.to_le_bytes());
        }
        for (at, xor) in &flips {
            let i = at.index(bytes.len());
            bytes[i] ^= xor;
        }
        if truncate {
            bytes.truncate(cut.index(bytes.len() + 1));
        }
        if fix_checksum && bytes.len() >= 4 {
            // Damage that a valid checksum vouches for: only the content checks can catch it.
            let body = bytes.len() - 4;
            let crc = crc32fast::hash(&bytes[..body]);
            bytes[body..].copy_from_slice(&crc.to_le_bytes());
        }
        if let Ok(loaded) = LshIndex::from_bytes(&bytes, 1) {
            let q = Vectors::new("q", &data[..dim], dim).unwrap();
            let found = loaded.query(q, 3, Some(8), None, Filter::default(), 1).unwrap();
            prop_assert_eq!(found.k, 3.min(loaded.len()));
        }
    }
}
