//! Exact top-K by squared Euclidean distance, fused with the distance kernel.
//!
//! Work is cut into tasks of (a chunk of queries) x (a range of items). A task
//! packs its queries once into panels of NR (they stay in L2), then streams its
//! items once, MR rows at a time, through the micro-kernel of
//! [`crate::kernel`] against every query panel, pushing only the entries that
//! beat a query's current threshold into its [`TopK`]. Memory per task is
//! O(chunk * (dim + k)), never O(Q x N), and the item matrix is never copied.
//! With few queries, items are split over tasks too and per-query lists merged.
//!
//! Selection uses the score `||x||^2 - 2 q.x`; the K winners then get their
//! exact distance recomputed (f64 accumulation) and are ordered by
//! (distance, id), so reported distances are exact and ties resolve by id.
//! Items in a query's `exclude` row are skipped inside the scan. Fewer than k
//! eligible items: the row is padded with id -1 and distance +inf.
//! Cost: 2 * Q * N * dim flops plus O(Q * k * (log k + dim)).

use crate::alloc;
use crate::csr::Filter;
use crate::error::{CoreError, Result};
use crate::kernel::{self, Kernel, MAX_MR, MAX_TILE};
use crate::parallel;
use crate::vectors::{by_score_then_id, Neighbours, TopK, Vectors};
use std::ops::Range;

/// Below this many multiply-adds a call runs on the calling thread.
const SERIAL_FLOPS: usize = 1 << 22;
/// An item split is never smaller than this.
const MIN_SPLIT_ITEMS: usize = 4096;
/// Floats of packed items per block of [`sqdist_matrix`] (512 KB, in L2).
const SQDIST_BLOCK_FLOATS: usize = 1 << 17;
/// Floats of packed items per group of blocks packed at once (8 MB).
const SQDIST_GROUP_FLOATS: usize = 1 << 21;
/// Outputs from this size on are advised onto huge pages (numpy's threshold).
const HUGE_PAGE_MIN_BYTES: usize = 4 << 20;

/// How queries and items are cut into tasks.
struct Plan {
    chunk: usize,
    n_chunks: usize,
    splits: usize,
    serial: bool,
}

fn plan(n_queries: usize, n_items: usize, dim: usize, nr: usize, num_threads: usize) -> Plan {
    let threads = parallel::resolve_threads(num_threads);
    let serial = threads == 1 || n_queries * n_items * dim < SERIAL_FLOPS;
    let target_tasks = if serial { 1 } else { 4 * threads };
    // At most 512 queries (200 KiB of packed queries at dim 100) per task, so they stay in L2.
    let chunk = n_queries
        .div_ceil(target_tasks)
        .div_ceil(nr)
        .clamp(1, 512 / nr)
        * nr;
    let n_chunks = n_queries.div_ceil(chunk).max(1);
    let splits = if serial || n_chunks >= 2 * threads {
        1
    } else {
        (2 * threads)
            .div_ceil(n_chunks)
            .min((n_items / MIN_SPLIT_ITEMS).max(1))
    };
    Plan {
        chunk,
        n_chunks,
        splits,
        serial,
    }
}

/// Walks `item_range` in tiles of MR items against all query panels of one
/// task, calling `visit(item_tile_start, panel, scores, masks, thresholds)`
/// after each kernel call; `visit` may lower the panel's thresholds.
fn stream_tiles(
    kernel: &Kernel,
    items: Vectors,
    item_range: Range<usize>,
    packed_queries: &[f32],
    thresholds: &mut [f32],
    mut visit: impl FnMut(usize, usize, &[f32], &[u64], &mut [f32]),
) {
    let (mr, nr, dim) = (kernel.mr, kernel.nr, items.dim);
    let n_panels = thresholds.len() / nr;
    let mut pad = Vec::new();
    let mut norms = [0f32; MAX_MR];
    let mut scores = [0f32; MAX_TILE];
    let mut masks = [0u64; MAX_MR];
    let mut start = item_range.start;
    while start < item_range.end {
        let tile = kernel::item_tile(
            items.data,
            dim,
            start,
            item_range.end,
            mr,
            &mut pad,
            &mut norms,
        );
        for panel in 0..n_panels {
            let panel_thresholds = &mut thresholds[panel * nr..(panel + 1) * nr];
            // SAFETY: `tile` holds MR rows of `dim`, the panel `dim * NR` packed
            // queries, and the buffers are sized for the largest kernel.
            unsafe {
                (kernel.tile)(
                    dim,
                    tile.as_ptr(),
                    packed_queries[panel * nr * dim..].as_ptr(),
                    norms.as_ptr(),
                    panel_thresholds.as_ptr(),
                    scores.as_mut_ptr(),
                    masks.as_mut_ptr(),
                );
            }
            visit(
                start,
                panel,
                &scores[..mr * nr],
                &masks[..mr],
                panel_thresholds,
            );
        }
        start += mr;
    }
}

fn split_range(n: usize, parts: usize, part: usize) -> Range<usize> {
    (n * part / parts)..(n * (part + 1) / parts)
}

/// The best `k` candidates of each query in `query_range` among `item_range`,
/// by score, skipping excluded items.
fn scan(
    kernel: &Kernel,
    queries: Vectors,
    query_range: Range<usize>,
    items: Vectors,
    item_range: Range<usize>,
    k: usize,
    filter: Filter,
) -> Vec<Vec<(f32, u32)>> {
    let nr = kernel.nr;
    let n_local = query_range.len();
    let mut tops: Vec<TopK> = (0..n_local).map(|_| TopK::new(k)).collect();
    let mut packed_queries = Vec::new();
    kernel::pack_panels(
        queries.data,
        queries.dim,
        query_range.clone(),
        nr,
        &mut packed_queries,
    );
    let mut thresholds: Vec<f32> = (0..n_local.div_ceil(nr) * nr)
        .map(|j| {
            if j < n_local {
                f32::INFINITY
            } else {
                f32::NEG_INFINITY
            }
        })
        .collect();
    stream_tiles(
        kernel,
        items,
        item_range,
        &packed_queries,
        &mut thresholds,
        |first_item, panel, scores, masks, panel_thresholds| {
            for (i, &mask) in masks.iter().enumerate() {
                let mut mask = mask;
                let item = (first_item + i) as u32;
                while mask != 0 {
                    let lane = mask.trailing_zeros() as usize;
                    mask &= mask - 1;
                    let local = panel * nr + lane;
                    if filter.skips(query_range.start + local, item) {
                        continue;
                    }
                    tops[local].push(scores[i * nr + lane], item);
                    panel_thresholds[lane] = tops[local].threshold();
                }
            }
        },
    );
    tops.into_iter().map(TopK::into_sorted).collect()
}

/// The `k` items nearest to each query (exact), nearest first, skipping what
/// `filter` says. The result has `min(k, n_items)` columns: a row can never
/// hold more items than there are.
pub fn topk_l2(
    queries: Vectors,
    items: Vectors,
    k: usize,
    filter: Filter,
    num_threads: usize,
) -> Result<Neighbours> {
    topk_l2_with(&kernel::best(), queries, items, k, filter, num_threads)
}

/// [`topk_l2`] with an explicit micro-kernel (tests compare the variants).
pub fn topk_l2_with(
    kernel: &Kernel,
    queries: Vectors,
    items: Vectors,
    k: usize,
    filter: Filter,
    num_threads: usize,
) -> Result<Neighbours> {
    queries.expect_dim("queries", items.dim, "the item dimension")?;
    if k == 0 {
        return Err(CoreError::invalid("k must be at least 1, got 0"));
    }
    let (n_queries, n_items) = (queries.len(), items.len());
    if n_items == 0 {
        return Err(CoreError::invalid(
            "items is empty; there is nothing to search",
        ));
    }
    if n_items > u32::MAX as usize {
        return Err(CoreError::invalid(format!(
            "{n_items} items exceed the supported {}",
            u32::MAX
        )));
    }
    filter.check(n_queries, Some(n_items))?;
    queries.check_values("queries")?;
    items.check_values("items")?;
    let k = k.min(n_items);
    let mut result = Neighbours::padded(n_queries, k)?;
    let plan = plan(n_queries, n_items, queries.dim, kernel.nr, num_threads);
    let n_tasks = plan.n_chunks * plan.splits;
    let partial = parallel::map_tasks(num_threads, plan.serial, n_tasks, |task| {
        let (chunk, split) = (task / plan.splits, task % plan.splits);
        let query_range = (chunk * plan.chunk)..((chunk + 1) * plan.chunk).min(n_queries);
        let item_range = split_range(n_items, plan.splits, split);
        scan(kernel, queries, query_range, items, item_range, k, filter)
    });

    let mut rows: Vec<(&mut [i64], &mut [f32])> = result
        .ids
        .chunks_mut(k)
        .zip(result.sqdist.chunks_mut(k))
        .collect();
    parallel::for_each_chunk_mut(
        num_threads,
        plan.serial,
        &mut rows,
        plan.chunk,
        |chunk, rows| {
            for (local, (row_ids, row_dist)) in rows.iter_mut().enumerate() {
                let query = chunk * plan.chunk + local;
                let mut candidates: Vec<(f32, u32)> = (0..plan.splits)
                    .flat_map(|split| partial[chunk * plan.splits + split][local].iter().copied())
                    .collect();
                if plan.splits > 1 && candidates.len() > k {
                    candidates.select_nth_unstable_by(k - 1, by_score_then_id);
                    candidates.truncate(k);
                }
                let q = queries.row(query);
                let mut exact: Vec<(f32, u32)> = candidates
                    .into_iter()
                    .map(|(_, id)| (kernel::sq_dist(q, items.row(id as usize)), id))
                    .collect();
                exact.sort_unstable_by(by_score_then_id);
                for (slot, (d, id)) in exact.into_iter().enumerate() {
                    row_ids[slot] = id as i64;
                    row_dist[slot] = d;
                }
            }
        },
    );
    drop(rows);
    Ok(result)
}

/// All squared distances, row-major `n_queries x n_items` (the batched distance
/// kernel; memory is the caller's choice here).
///
/// The kernel runs with the roles of [`topk_l2`] swapped: items are packed into
/// panels of NR and queries stream through as MR-row tiles, so each register
/// holds one query's distances to NR consecutive items and lands in the output
/// row as one contiguous store. Items are packed a group at a time (a few MB,
/// shared by all threads); each thread fills a contiguous range of rows.
pub fn sqdist_matrix(queries: Vectors, items: Vectors, num_threads: usize) -> Result<Vec<f32>> {
    queries.expect_dim("queries", items.dim, "the item dimension")?;
    queries.check_values("queries")?;
    items.check_values("items")?;
    let kernel = kernel::best();
    let (n_queries, n_items, nr, dim) = (queries.len(), items.len(), kernel.nr, items.dim);
    let what = format!("a {n_queries} x {n_items} distance matrix");
    let advice = |error: CoreError| match error {
        CoreError::Memory(m) => CoreError::memory(format!(
            "{m}; use topk_l2 when only the nearest items matter"
        )),
        other => other,
    };
    let len = alloc::product(n_queries, n_items, &what).map_err(advice)?;
    // Every element is written below, so the matrix is not zero-filled first.
    let mut out = uninit_matrix(len, &what).map_err(advice)?;
    if len == 0 {
        return Ok(out);
    }
    let threads = parallel::resolve_threads(num_threads);
    let serial = threads == 1 || len * dim < SERIAL_FLOPS;
    let rows_per_task = if serial {
        n_queries
    } else {
        n_queries.div_ceil(4 * threads).next_multiple_of(kernel.mr)
    };
    let item_norms: Vec<f32> = (0..n_items)
        .map(|i| kernel::sq_norm(items.row(i)))
        .collect();
    // A block's packed items (about 512 KB) stay in L2 while every query tile
    // of a task passes over them; a group of blocks is packed at once.
    let block_items = (SQDIST_BLOCK_FLOATS / dim.max(1)).max(nr) / nr * nr;
    let group_items =
        (SQDIST_GROUP_FLOATS / dim.max(1)).max(block_items) / block_items * block_items;
    let out_rows = &mut out.spare_capacity_mut()[..len];
    for group_start in (0..n_items).step_by(group_items) {
        let group_end = (group_start + group_items).min(n_items);
        let blocks: Vec<Range<usize>> = (group_start..group_end)
            .step_by(block_items)
            .map(|start| start..(start + block_items).min(group_end))
            .collect();
        let packed: Vec<Vec<f32>> = parallel::map_tasks(num_threads, serial, blocks.len(), |b| {
            let mut panels = Vec::new();
            kernel::pack_panels(items.data, dim, blocks[b].clone(), nr, &mut panels);
            panels
        });
        parallel::for_each_chunk_mut(
            num_threads,
            serial,
            &mut *out_rows,
            rows_per_task * n_items,
            |task, rows| {
                let query_range =
                    (task * rows_per_task)..((task + 1) * rows_per_task).min(n_queries);
                for (block, panels) in blocks.iter().zip(&packed) {
                    // Thresholds no score is below: no candidate masks wanted.
                    let mut thresholds = vec![f32::NEG_INFINITY; block.len().div_ceil(nr) * nr];
                    stream_tiles(
                        &kernel,
                        queries,
                        query_range.clone(),
                        panels,
                        &mut thresholds,
                        |first_query, panel, scores, _, _| {
                            let first_item = block.start + panel * nr;
                            let lanes = nr.min(block.end - first_item);
                            let norms = &item_norms[first_item..first_item + lanes];
                            let tile_rows = kernel.mr.min(query_range.end - first_query);
                            for i in 0..tile_rows {
                                let row = (first_query - query_range.start + i) * n_items;
                                let dst = &mut rows[row + first_item..row + first_item + lanes];
                                let tile_scores = &scores[i * nr..i * nr + lanes];
                                for ((slot, &score), &norm) in
                                    dst.iter_mut().zip(tile_scores).zip(norms)
                                {
                                    slot.write((score + norm).max(0.0));
                                }
                            }
                        },
                    );
                }
            },
        );
    }
    // SAFETY: the groups cover every item column, the tasks every query row,
    // and each (row, column) element is written once above.
    unsafe { out.set_len(len) };
    Ok(out)
}

/// An empty vector with room for `len` floats. Large ones are backed by huge
/// pages where Linux allows it (as numpy does for its arrays): first touching
/// hundreds of MB page by page costs more than the distances written into it.
fn uninit_matrix(len: usize, what: &str) -> Result<Vec<f32>> {
    let out: Vec<f32> = alloc::reserve(len, what)?;
    #[cfg(target_os = "linux")]
    {
        const PAGE: usize = 4096;
        let bytes = len * std::mem::size_of::<f32>();
        if bytes >= HUGE_PAGE_MIN_BYTES {
            let start = out.as_ptr() as usize;
            let aligned = start.next_multiple_of(PAGE);
            // SAFETY: advice only, on whole pages inside this vector's own
            // allocation; madvise neither reads nor frees the memory, and its
            // failure (THP disabled) changes nothing.
            unsafe {
                libc::madvise(
                    aligned as *mut libc::c_void,
                    (start + bytes - aligned) / PAGE * PAGE,
                    libc::MADV_HUGEPAGE,
                );
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::csr::Csr;
    use crate::rng::Rng;

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = Rng::stream(seed, 0, &[]);
        (0..n).map(|_| rng.normal() as f32).collect()
    }

    fn naive(
        queries: Vectors,
        items: Vectors,
        k: usize,
        exclude: Option<&Csr>,
    ) -> Vec<Vec<(f64, u32)>> {
        (0..queries.len())
            .map(|q| {
                let mut all: Vec<(f64, u32)> = (0..items.len())
                    .filter(|&j| !exclude.is_some_and(|e| e.contains(q, j as u32)))
                    .map(|j| {
                        let d: f64 = queries
                            .row(q)
                            .iter()
                            .zip(items.row(j))
                            .map(|(a, b)| ((a - b) as f64).powi(2))
                            .sum();
                        (d, j as u32)
                    })
                    .collect();
                all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
                all.truncate(k);
                all
            })
            .collect()
    }

    #[test]
    fn topk_equals_naive_with_exclusion_and_padding() {
        let dim = 19;
        let (nq, ni) = (23, 300);
        let q = random(nq * dim, 1);
        let x = random(ni * dim, 2);
        let (queries, items) = (
            Vectors::new("v", &q, dim).unwrap(),
            Vectors::new("v", &x, dim).unwrap(),
        );
        let rows: Vec<Vec<u32>> = (0..nq)
            .map(|r| {
                (0..ni as u32)
                    .filter(|j| (j + r as u32).is_multiple_of(3))
                    .collect()
            })
            .collect();
        let exclude = Csr::from_rows(ni, &rows).unwrap();
        for kernel in [kernel::best(), kernel::scalar()] {
            for threads in [1, 3] {
                for k in [1, 10, 250] {
                    let got = topk_l2_with(
                        &kernel,
                        queries,
                        items,
                        k,
                        Filter::rows(Some(&exclude)),
                        threads,
                    )
                    .unwrap();
                    let want = naive(queries, items, k, Some(&exclude));
                    for (qi, want_row) in want.iter().enumerate() {
                        for slot in 0..k {
                            let (id, d) = (got.ids[qi * k + slot], got.sqdist[qi * k + slot]);
                            match want_row.get(slot) {
                                Some(&(wd, wid)) => {
                                    assert_eq!(id, wid as i64, "{} q{qi} slot{slot}", kernel.name);
                                    assert!((d as f64 - wd).abs() < 1e-4 * wd.max(1.0));
                                }
                                None => {
                                    assert_eq!(id, -1);
                                    assert_eq!(d, f32::INFINITY);
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn split_items_give_the_same_answer() {
        let dim = 8;
        let q = random(3 * dim, 3);
        let x = random(20_000 * dim, 4);
        let (queries, items) = (
            Vectors::new("v", &q, dim).unwrap(),
            Vectors::new("v", &x, dim).unwrap(),
        );
        let one = topk_l2(queries, items, 7, Filter::default(), 1).unwrap();
        let many = topk_l2(queries, items, 7, Filter::default(), 8).unwrap();
        assert_eq!(one, many);
    }

    #[test]
    fn sqdist_matrix_equals_naive() {
        // dim 2000 makes blocks of 64 items and groups of 1,024: several of
        // each, with partial tiles, panels, blocks and groups. The last case
        // is over 4 MB, so its memory is advised onto huge pages.
        for (dim, n_queries, n_items) in [(5, 13, 70), (2000, 13, 1100), (8, 1100, 1001)] {
            let q = random(n_queries * dim, 5);
            let x = random(n_items * dim, 6);
            let (queries, items) = (
                Vectors::new("v", &q, dim).unwrap(),
                Vectors::new("v", &x, dim).unwrap(),
            );
            let d = sqdist_matrix(queries, items, 2).unwrap();
            assert_eq!(d, sqdist_matrix(queries, items, 1).unwrap());
            for i in 0..n_queries {
                for j in 0..n_items {
                    let want = kernel::sq_dist(queries.row(i), items.row(j));
                    let got = d[i * n_items + j];
                    assert!((got - want).abs() < 1e-4 * (1.0 + want), "{i} {j}");
                }
            }
        }
    }

    #[test]
    fn rejects_bad_arguments() {
        let q = [0f32; 4];
        let x = [0f32; 6];
        let queries = Vectors::new("queries", &q, 2).unwrap();
        let items3 = Vectors::new("items", &x, 3).unwrap();
        let message = |r: Result<Neighbours>| r.unwrap_err().to_string();
        assert!(message(topk_l2(queries, items3, 1, Filter::default(), 1))
            .contains("queries must have 3 columns (the item dimension), got 2"));
        let items2 = Vectors::new("items", &x, 2).unwrap();
        assert!(message(topk_l2(queries, items2, 0, Filter::default(), 1))
            .contains("k must be at least 1"));
        let none = Vectors::new("items", &[], 2).unwrap();
        assert!(
            message(topk_l2(queries, none, 1, Filter::default(), 1)).contains("nothing to search")
        );
        let wrong_rows = Csr::from_rows(3, &[vec![0]]).unwrap();
        assert!(message(topk_l2(
            queries,
            items2,
            1,
            Filter::rows(Some(&wrong_rows)),
            1
        ))
        .contains("exclude has 1 rows but there are 2 queries"));
        let wide = Csr::from_rows(9, &[vec![0], vec![8]]).unwrap();
        assert!(
            message(topk_l2(queries, items2, 1, Filter::rows(Some(&wide)), 1))
                .contains("exclude has 9 columns but there are only 3 items")
        );
        let nan = [0.0, f32::NAN, 1.0, 2.0];
        let bad = Vectors::new("queries", &nan, 2).unwrap();
        assert!(
            message(topk_l2(bad, items2, 1, Filter::default(), 1)).contains("queries[0, 1] is NaN")
        );
        let err = sqdist_matrix(queries, bad, 1).unwrap_err().to_string();
        assert!(err.contains("items[0, 1] is NaN"), "{err}");
    }
}
