//! Criterion benchmarks of the native core: WARP sampling, rank weights and
//! exact top-K. Throughput is reported per triple / per query so runs on
//! different sizes compare. Run: `cargo bench -p cml-core`.

use cml_core::csr::Filter;
use cml_core::rng::Rng;
use cml_core::topk::{sqdist_matrix, topk_l2};
use cml_core::vectors::Vectors;
use cml_core::{Csr, SamplerConfig, WarpSampler};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;

/// `n_users` users with `per_user` random items each among `n_items`.
fn interactions(n_users: usize, n_items: usize, per_user: usize, seed: u64) -> Csr {
    let mut rng = Rng::stream(seed, 0, &[]);
    let rows: Vec<Vec<u32>> = (0..n_users)
        .map(|_| {
            (0..per_user)
                .map(|_| rng.below(n_items as u64) as u32)
                .collect()
        })
        .collect();
    Csr::from_rows(n_items, &rows).unwrap()
}

/// Vectors inside the unit ball, like trained CML embeddings.
fn unit_ball(n: usize, dim: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng::stream(seed, 0, &[]);
    let mut data: Vec<f32> = (0..n * dim).map(|_| rng.normal() as f32).collect();
    for row in data.chunks_mut(dim) {
        let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
        let radius = rng.unit_f64().powf(1.0 / dim as f64) as f32;
        row.iter_mut().for_each(|x| *x *= radius / norm);
    }
    data
}

fn sampler(c: &mut Criterion) {
    let mut group = c.benchmark_group("warp_sampler");
    group.sample_size(10);
    // citeulike-t sized (7,947 users, 25,975 items, ~11 positives each) and a
    // larger, cache-unfriendly matrix (100k users x 300k items x 100 each).
    for (name, n_users, n_items, per_user) in [
        ("citeulike_like", 7_947, 25_975, 11),
        ("large", 100_000, 300_000, 100),
    ] {
        let config = SamplerConfig {
            batch_size: 10_000,
            n_negatives: 20,
            seed: 0,
            check_negative: true,
            popularity_exponent: 0.0,
        };
        let s = WarpSampler::new(interactions(n_users, n_items, per_user, 1), config).unwrap();
        let order = s.epoch_order(0);
        group.throughput(Throughput::Elements((10_000 * 20) as u64));
        for threads in [1, 2] {
            group.bench_with_input(
                BenchmarkId::new(name, format!("{threads}t")),
                &threads,
                |b, &t| {
                    let mut index = 0;
                    b.iter(|| {
                        index = (index + 1) % (s.n_batches() - 1);
                        black_box(s.batch(0, &order, index, t))
                    })
                },
            );
        }
    }
    group.finish();
}

fn rank_weights(c: &mut Criterion) {
    let rows = 10_000;
    let mut rng = Rng::stream(3, 0, &[]);
    let pos: Vec<f32> = (0..rows).map(|_| rng.unit_f64() as f32).collect();
    let neg: Vec<f32> = (0..rows * 20)
        .map(|_| 2.0 * rng.unit_f64() as f32)
        .collect();
    let mut group = c.benchmark_group("rank_weights");
    group.throughput(Throughput::Elements(rows as u64));
    group.bench_function("10000x20", |b| {
        let neg = Vectors::new("neg", &neg, 20).unwrap();
        b.iter(|| black_box(cml_core::rank::rank_weights(&pos, neg, 0.5, 25_975, 1)))
    });
    group.finish();
}

fn topk(c: &mut Criterion) {
    let dim = 100;
    let queries = unit_ball(1_024, dim, 4);
    let mut group = c.benchmark_group("topk_l2");
    group.sample_size(10);
    for n_items in [25_975usize, 1_000_000] {
        let items = unit_ball(n_items, dim, 5);
        let (q, x) = (
            Vectors::new("v", &queries, dim).unwrap(),
            Vectors::new("v", &items, dim).unwrap(),
        );
        group.throughput(Throughput::Elements(1_024));
        for threads in [1, 2] {
            group.bench_with_input(
                BenchmarkId::new(format!("k50_items{n_items}"), format!("{threads}t")),
                &threads,
                |b, &t| b.iter(|| black_box(topk_l2(q, x, 50, Filter::default(), t).unwrap())),
            );
        }
    }
    // The distance kernel alone (Q x N written out), for GFLOP/s: 2 * 256 * 25,975 * 100 flops.
    let items = unit_ball(25_975, dim, 6);
    let (q, x) = (
        Vectors::new("v", &queries[..256 * dim], dim).unwrap(),
        Vectors::new("v", &items, dim).unwrap(),
    );
    group.throughput(Throughput::Elements((2 * 256 * 25_975 * dim) as u64));
    group.bench_function("sqdist_256x25975_flops_1t", |b| {
        b.iter(|| black_box(sqdist_matrix(q, x, 1).unwrap()))
    });
    group.finish();
}

criterion_group!(benches, sampler, rank_weights, topk);
criterion_main!(benches);
