//! p-stable LSH for squared Euclidean top-K, with query-directed multi-probe
//! and exact re-ranking.
//!
//! Hashing (Datar et al. 2004): `h(v) = floor((a.v + b) / w)` with `a` a
//! Gaussian vector and `b` uniform in [0, w). A table concatenates `n_hashes`
//! such values into one bucket key; `n_tables` tables are built. Near points
//! share buckets with high probability, far points rarely. Besides the query's
//! own bucket in each table, the cheapest nearby buckets are probed
//! ([`probe`], Lv et al. 2007). Candidates are scored on 8-bit codes
//! ([`codes`]), the best few times k re-ranked on the exact vectors, and the
//! reported distances recomputed in f64.
//!
//! Vectors are stored with their external ids, grouped by their first table's
//! bucket so near items share cache lines and pages; each [`table`] maps a
//! bucket key to its run of items. Probes and candidates are handled in
//! batches whose memory is requested ahead of use. Queries run in parallel
//! over chunks with no shared mutable state: results are deterministic for a
//! seed, whatever the thread count. `exclude` rows (by external id) are skipped
//! before scoring. The file format is in [`format`].
//!
//! Costs: build O(n * L * k * dim); query O(L * k * dim + probes * (log + bucket)
//! + candidates * dim); memory n * dim * 4 + n * 8 + L * (4n + 16 * buckets * 2).

mod codes;
mod format;
mod probe;
mod pstable;
mod table;

pub use pstable::collision_probability;
use pstable::width_ratio_for;

use crate::alloc;
use crate::csr::{prefetch, Filter};
use crate::error::{CoreError, Result};
use crate::kernel::{self, VectorOps};
use crate::parallel;
use crate::rng::{tag, Rng};
use crate::vectors::{by_score_then_id, Neighbours, TopK, Vectors};
use codes::Codes;
use probe::{bucket_key, slot_of, ProbeSequence};
use table::Table;

/// Hash functions per table are limited so a perturbation set fits in a u64 mask.
pub const MAX_HASHES: usize = 32;
/// The largest shape an index may have: more is a mistake, and its hash
/// functions alone would not fit in memory.
pub const MAX_TABLES: usize = 1024;
pub const MAX_DIM: usize = 1 << 16;
/// Probes per searched table a query may ask for; a request for more is cut
/// to this (4,096 per table is 16 times what tuning ever picks).
pub const MAX_PROBES_PER_TABLE: usize = 4096;
/// Default shape: 16 tables of 16 hashes suit unit-ball embeddings of about
/// 100 dimensions and 10^4 - 10^6 items (benches/RESULTS.md).
pub const DEFAULT_TABLES: usize = 16;
pub const DEFAULT_HASHES: usize = 16;
const FILE_MAGIC: &[u8; 8] = b"CMLRSLSH";
const FILE_VERSION: u32 = 1;
/// Queries per parallel task.
const QUERIES_PER_TASK: usize = 64;
/// Probability that a typical 10th nearest neighbour lands in the query's
/// bucket of one table, which the automatic bucket width aims for.
const TABLE_COLLISION_TARGET: f64 = 0.035;
/// The exact re-ranking looks at this many times k candidates (at least k + 32).
const RERANK_FACTOR: usize = 4;
const RERANK_MIN_EXTRA: usize = 32;
/// Probes whose buckets are fetched together.
const PROBE_BATCH: usize = 16;
/// Candidates prefetched ahead of the one being scored.
const PREFETCH_AHEAD: usize = 6;

/// How an index hashes.
#[derive(Clone, Debug, PartialEq)]
pub struct LshParams {
    pub dim: usize,
    pub n_tables: usize,
    pub n_hashes: usize,
    /// Slot width w; `None` until chosen from the first vectors added.
    pub bucket_width: Option<f32>,
    pub seed: u64,
}

/// An L2 LSH index over `f32` vectors with `i64` ids.
#[derive(Clone, Debug)]
pub struct LshIndex {
    params: LshParams,
    /// (n_tables * n_hashes) x dim Gaussian directions, already divided by w.
    projections: Vec<f32>,
    /// b / w for each hash function, in [0, 1).
    offsets: Vec<f32>,
    vectors: Vec<f32>,
    ids: Vec<i64>,
    tables: Vec<Table>,
    /// The vectors as 8-bit codes, for cheap first scoring of candidates.
    codes: Codes,
    /// Probes per query when the caller does not say (set by tuning).
    default_probes: usize,
    /// Tables searched when the caller does not say (a prefix of the tables built).
    default_tables: usize,
}

impl LshIndex {
    /// An empty index. `bucket_width = None` picks w from the first vectors added.
    pub fn new(params: LshParams) -> Result<LshIndex> {
        if !(1..=MAX_DIM).contains(&params.dim) {
            return Err(CoreError::invalid(format!(
                "dim must be between 1 and {MAX_DIM}, got {}",
                params.dim
            )));
        }
        if !(1..=MAX_TABLES).contains(&params.n_tables) {
            return Err(CoreError::invalid(format!(
                "n_tables must be between 1 and {MAX_TABLES}, got {}",
                params.n_tables
            )));
        }
        if params.n_hashes == 0 || params.n_hashes > MAX_HASHES {
            return Err(CoreError::invalid(format!(
                "n_hashes must be between 1 and {MAX_HASHES}, got {}",
                params.n_hashes
            )));
        }
        if let Some(w) = params.bucket_width {
            if !(w.is_finite() && w > 0.0) {
                return Err(CoreError::invalid(format!(
                    "bucket_width must be a positive number, got {w}"
                )));
            }
        }
        let n_functions = params.n_tables * params.n_hashes;
        let mut rng = Rng::stream(params.seed, tag::LSH_PROJECTION, &[]);
        let mut directions =
            alloc::reserve(n_functions * params.dim, "the index's hash functions")?;
        directions.extend((0..n_functions * params.dim).map(|_| rng.normal() as f32));
        let offsets: Vec<f32> = (0..n_functions).map(|_| rng.unit_f64() as f32).collect();
        let mut index = LshIndex {
            params,
            projections: directions,
            offsets,
            vectors: Vec::new(),
            ids: Vec::new(),
            tables: Vec::new(),
            codes: Codes::default(),
            default_probes: 0,
            default_tables: 0,
        };
        index.default_probes = 4 * index.params.n_tables;
        index.default_tables = index.params.n_tables;
        if let Some(w) = index.params.bucket_width {
            index.scale_projections(w);
        }
        Ok(index)
    }

    fn scale_projections(&mut self, width: f32) {
        self.projections.iter_mut().for_each(|a| *a /= width);
    }

    pub fn params(&self) -> &LshParams {
        &self.params
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    pub fn ids(&self) -> &[i64] {
        &self.ids
    }

    pub fn vectors(&self) -> Vectors<'_> {
        Vectors {
            data: &self.vectors,
            dim: self.params.dim,
        }
    }

    pub fn default_probes(&self) -> usize {
        self.default_probes
    }

    pub fn default_tables(&self) -> usize {
        self.default_tables
    }

    /// Sets the probes and tables a query uses when it does not say.
    pub fn set_defaults(&mut self, probes: usize, tables: usize) -> Result<()> {
        self.check_search(probes, tables)?;
        self.default_probes = probes;
        self.default_tables = tables;
        Ok(())
    }

    /// Checks a search's probes and tables (a prefix of the tables built).
    fn check_search(&self, probes: usize, tables: usize) -> Result<()> {
        if probes == 0 {
            return Err(CoreError::invalid("n_probes must be at least 1, got 0"));
        }
        if tables == 0 || tables > self.params.n_tables {
            return Err(CoreError::invalid(format!(
                "n_tables must be between 1 and {} (the tables built), got {tables}",
                self.params.n_tables
            )));
        }
        Ok(())
    }

    /// Bytes held: vectors, ids, projections and tables.
    pub fn memory_bytes(&self) -> usize {
        self.vectors.len() * 4
            + self.ids.len() * 8
            + (self.projections.len() + self.offsets.len()) * 4
            + self.tables.iter().map(Table::memory_bytes).sum::<usize>()
            + self.codes.memory_bytes()
    }

    /// Adds vectors (row-major, `dim` columns, finite) with their ids, then
    /// rebuilds the tables. Ids must be unique across the index. Vectors are
    /// stored grouped by bucket, so [`LshIndex::ids`] and [`LshIndex::vectors`]
    /// come in that order, not in insertion order.
    pub fn add(&mut self, vectors: Vectors, ids: &[i64], num_threads: usize) -> Result<()> {
        vectors.expect_dim("vectors", self.params.dim, "the index dimension")?;
        if vectors.is_empty() {
            return Err(CoreError::invalid(
                "vectors has no rows; there is nothing to add",
            ));
        }
        if ids.len() != vectors.len() {
            return Err(CoreError::invalid(format!(
                "got {} ids for {} vectors; pass one id per vector",
                ids.len(),
                vectors.len()
            )));
        }
        if self.len() + vectors.len() > u32::MAX as usize {
            return Err(CoreError::invalid(
                "an index holds at most 4,294,967,295 vectors",
            ));
        }
        vectors.check_values("vectors")?;
        if let Some(&negative) = ids.iter().find(|&&id| id < 0) {
            return Err(CoreError::invalid(format!(
                "ids must be non-negative, got {negative} (-1 marks an empty slot in results)"
            )));
        }
        let mut all_ids: Vec<i64> = self.ids.iter().chain(ids).copied().collect();
        all_ids.sort_unstable();
        if let Some(w) = all_ids.windows(2).find(|w| w[0] == w[1]) {
            return Err(CoreError::invalid(format!(
                "id {} occurs more than once; ids must be unique",
                w[0]
            )));
        }
        self.vectors
            .try_reserve(vectors.data.len())
            .and(self.ids.try_reserve(ids.len()))
            .map_err(|_| CoreError::memory("the index could not grow to hold these vectors"))?;
        self.vectors.extend_from_slice(vectors.data);
        self.ids.extend_from_slice(ids);
        if self.params.bucket_width.is_none() {
            let width = self.estimate_width(num_threads);
            self.params.bucket_width = Some(width);
            self.scale_projections(width);
        }
        self.rebuild(num_threads);
        Ok(())
    }

    /// w from the data: the width at which a point at the median distance to a
    /// sample point's 10th nearest neighbour shares a whole table bucket
    /// (all `n_hashes` slots) with probability [`TABLE_COLLISION_TARGET`]. The
    /// target keeps bucket selectivity the same whatever `n_hashes` is; it was
    /// set where recall per unit of query time peaked on clustered embeddings
    /// (benches/RESULTS.md).
    fn estimate_width(&self, num_threads: usize) -> f32 {
        let all = self.vectors();
        let n = all.len();
        if n < 2 {
            return 1.0;
        }
        let sample = n.min(256);
        let mut rng = Rng::stream(self.params.seed, tag::SAMPLE, &[]);
        let mut picks: Vec<usize> = (0..n).collect();
        rng.shuffle(&mut picks);
        let queries: Vec<f32> = picks[..sample]
            .iter()
            .flat_map(|&i| all.row(i).iter().copied())
            .collect();
        let k = (n - 1).clamp(1, 10) + 1; // the point itself comes first
        let found = crate::topk::topk_l2(
            Vectors::new("v", &queries, self.params.dim).expect("sample rows"),
            all,
            k,
            Filter::default(),
            num_threads,
        )
        .expect("checked vectors of one shape");
        let mut radii: Vec<f32> = (0..sample)
            .map(|q| found.sqdist[q * k + k - 1].sqrt())
            .collect();
        radii.sort_unstable_by(|a, b| a.total_cmp(b));
        let median = radii[radii.len() / 2];
        if !(median.is_finite() && median > 0.0) {
            return 1.0;
        }
        let per_hash = TABLE_COLLISION_TARGET.powf(1.0 / self.params.n_hashes as f64);
        (median as f64 * width_ratio_for(per_hash)) as f32
    }

    /// Projections of one vector onto every hash function, in slot units: `(a.v + b) / w`.
    #[inline]
    fn project(&self, v: &[f32], out: &mut [f32]) {
        let dim = self.params.dim;
        let ops = VectorOps::best();
        for (f, slot) in out.iter_mut().enumerate() {
            *slot = ops.dot(&self.projections[f * dim..(f + 1) * dim], v) + self.offsets[f];
        }
    }

    fn rebuild(&mut self, num_threads: usize) {
        let (l, k) = (self.params.n_tables, self.params.n_hashes);
        let n = self.len();
        let this = &*self;
        // keys[t * n + i]: the bucket key of item i in table t.
        let per_item: Vec<Vec<u64>> =
            parallel::map_tasks(num_threads, n < 2048, n.div_ceil(1024), |task| {
                let mut projected = vec![0f32; l * k];
                let rows = (task * 1024)..((task + 1) * 1024).min(n);
                let mut keys = Vec::with_capacity(rows.len() * l);
                for i in rows {
                    this.project(
                        &this.vectors[i * this.params.dim..(i + 1) * this.params.dim],
                        &mut projected,
                    );
                    for t in 0..l {
                        keys.push(bucket_key(
                            projected[t * k..(t + 1) * k].iter().map(|&p| slot_of(p)),
                        ));
                    }
                }
                keys
            });
        let keys: Vec<u64> = per_item.into_iter().flatten().collect();
        // Store the vectors grouped by their first table's bucket: the members
        // of a bucket, and items near each other in general, then sit together
        // in memory, so scoring candidates reads fewer scattered cache lines.
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by_key(|&i| (keys[i * l], i));
        let dim = self.params.dim;
        self.vectors = gather_rows(&self.vectors, dim, &order);
        self.ids = order.iter().map(|&i| self.ids[i]).collect();
        let keys = gather_rows(&keys, l, &order);
        self.codes = Codes::encode(Vectors {
            data: &self.vectors,
            dim,
        });
        let tables = parallel::map_tasks(num_threads, n < 2048, l, |t| {
            let table_keys: Vec<u64> = (0..n).map(|i| keys[i * l + t]).collect();
            Table::build(&table_keys)
        });
        self.tables = tables;
    }

    /// The k nearest indexed vectors of each query among the buckets of
    /// `n_probes` probes (`None`: the tuned default; at most
    /// [`MAX_PROBES_PER_TABLE`] per table) in the first `n_tables` tables
    /// (`None`: all), skipping what `filter` names (by external id). Exact
    /// distances, nearest first, padded with -1/+inf; `min(k, len)` columns.
    pub fn query(
        &self,
        queries: Vectors,
        k: usize,
        n_probes: Option<usize>,
        n_tables: Option<usize>,
        filter: Filter,
        num_threads: usize,
    ) -> Result<Neighbours> {
        queries.expect_dim("queries", self.params.dim, "the index dimension")?;
        if k == 0 {
            return Err(CoreError::invalid("k must be at least 1, got 0"));
        }
        if self.is_empty() {
            return Err(CoreError::invalid(
                "the index is empty; add vectors with add_items before querying",
            ));
        }
        let tables = n_tables.unwrap_or(self.default_tables);
        let probes = n_probes.unwrap_or(self.default_probes);
        self.check_search(probes, tables)?;
        let probes = probes.min(tables * MAX_PROBES_PER_TABLE);
        filter.check(queries.len(), None)?;
        queries.check_values("queries")?;
        let (n_queries, k) = (queries.len(), k.min(self.len()));
        let mut result = Neighbours::padded(n_queries, k)?;
        let serial = n_queries < 8;
        let chunks = parallel::map_tasks(
            num_threads,
            serial,
            n_queries.div_ceil(QUERIES_PER_TASK),
            |task| {
                let mut scratch =
                    Scratch::new(self.len(), self.params.n_tables * self.params.n_hashes);
                let rows =
                    (task * QUERIES_PER_TASK)..((task + 1) * QUERIES_PER_TASK).min(n_queries);
                rows.map(|q| {
                    self.search_one(queries.row(q), q, k, probes, tables, filter, &mut scratch)
                })
                .collect::<Vec<_>>()
            },
        );
        for (q, found) in chunks.into_iter().flatten().enumerate() {
            for (slot, (d, id)) in found.into_iter().enumerate() {
                result.ids[q * k + slot] = id;
                result.sqdist[q * k + slot] = d;
            }
        }
        Ok(result)
    }

    #[allow(clippy::too_many_arguments)]
    fn search_one(
        &self,
        q: &[f32],
        row: usize,
        k: usize,
        probes: usize,
        tables: usize,
        filter: Filter,
        scratch: &mut Scratch,
    ) -> Vec<(f32, i64)> {
        let (dim, n_hashes) = (self.params.dim, self.params.n_hashes);
        scratch.next_query();
        self.project(q, &mut scratch.projected);
        let projected = &scratch.projected;
        // Candidates are scored on their 8-bit codes; the best `shortlist` are
        // then re-ranked on the exact vectors.
        let shortlist = (RERANK_FACTOR * k).max(k + RERANK_MIN_EXTRA);
        let mut top = TopK::new(shortlist);
        let target = self.codes.target(q);
        let ops = VectorOps::best();
        // Once every item has been a candidate, more probes cannot find more.
        let seen = std::cell::Cell::new(0usize);
        // Probes and candidates go in batches: every address a batch needs is
        // requested before the first is used, so the cache misses of the map,
        // the bucket members, the stamps and the vectors overlap instead of
        // being paid one after another.
        let Scratch {
            stamps,
            stamp,
            probes: sequence,
            batch,
            candidates,
            ..
        } = scratch;
        let mut drain = |batch: &mut Vec<(usize, u64)>| {
            for &(table, key) in batch.iter() {
                self.tables[table].prefetch_key(key);
            }
            for &(table, key) in batch.iter() {
                let members = self.tables[table].bucket(key);
                if let Some(first) = members.first() {
                    prefetch(first);
                }
            }
            for &(table, key) in batch.iter() {
                candidates.extend_from_slice(self.tables[table].bucket(key));
            }
            batch.clear();
            for j in 0..candidates.len() {
                if let Some(&ahead) = candidates.get(j + PREFETCH_AHEAD) {
                    let ahead = ahead as usize;
                    prefetch(&stamps[ahead]);
                    for line in self.codes.code(ahead).chunks(64) {
                        prefetch(&line[0]);
                    }
                }
                let item = candidates[j] as usize;
                if stamps[item] == *stamp {
                    continue;
                }
                stamps[item] = *stamp;
                seen.set(seen.get() + 1);
                if !filter.is_empty()
                    && u32::try_from(self.ids[item]).is_ok_and(|id| filter.skips(row, id))
                {
                    continue;
                }
                top.push(target.distance(ops, self.codes.code(item)), item as u32);
            }
            candidates.clear();
        };
        let everything = self.len();
        sequence.for_each_probe(projected, n_hashes, tables, probes, &mut |table, key| {
            batch.push((table, key));
            if batch.len() == PROBE_BATCH {
                drain(batch);
            }
            seen.get() < everything
        });
        drain(batch);
        // Re-rank the shortlist on the exact vectors (f32), keep k, and report
        // their distances accumulated in f64, like the exact search does.
        let vector = |item: u32| &self.vectors[item as usize * dim..(item as usize + 1) * dim];
        let mut shortlist: Vec<(f32, u32)> = top
            .into_sorted()
            .into_iter()
            .map(|(_, item)| (ops.sq_dist(q, vector(item)), item))
            .collect();
        if shortlist.len() > k {
            shortlist.select_nth_unstable_by(k - 1, by_score_then_id);
            shortlist.truncate(k);
        }
        let mut found: Vec<(f32, i64)> = shortlist
            .into_iter()
            .map(|(_, item)| (kernel::sq_dist(q, vector(item)), self.ids[item as usize]))
            .collect();
        found.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        found
    }
}

/// Per-task buffers: a stamp per indexed item marks candidates already scored.
struct Scratch {
    stamps: Vec<u32>,
    stamp: u32,
    projected: Vec<f32>,
    probes: ProbeSequence,
    /// Probes (table, key) waiting to be looked up together.
    batch: Vec<(usize, u64)>,
    /// Bucket members of the current batch, to be scored.
    candidates: Vec<u32>,
}

impl Scratch {
    fn new(n_items: usize, n_functions: usize) -> Scratch {
        Scratch {
            stamps: vec![0; n_items],
            stamp: 0,
            projected: vec![0.0; n_functions],
            probes: ProbeSequence::default(),
            batch: Vec::with_capacity(PROBE_BATCH),
            candidates: Vec::new(),
        }
    }

    fn next_query(&mut self) {
        self.stamp = self.stamp.wrapping_add(1);
        if self.stamp == 0 {
            self.stamps.iter_mut().for_each(|s| *s = 0);
            self.stamp = 1;
        }
    }
}

/// Rows `order[0], order[1], ...` of a row-major matrix with `width` columns.
fn gather_rows<T: Copy>(data: &[T], width: usize, order: &[usize]) -> Vec<T> {
    let mut out = Vec::with_capacity(order.len() * width);
    for &i in order {
        out.extend_from_slice(&data[i * width..(i + 1) * width]);
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::csr::Csr;

    /// Points around `clusters` centres (fixed by `clusters`), noise from `seed`.
    pub(crate) fn clustered(n: usize, dim: usize, clusters: usize, seed: u64) -> Vec<f32> {
        let mut centre_rng = Rng::stream(clusters as u64, 1, &[]);
        let centres: Vec<f32> = (0..clusters * dim)
            .map(|_| centre_rng.normal() as f32 / (dim as f32).sqrt())
            .collect();
        let mut rng = Rng::stream(seed, 0, &[]);
        (0..n)
            .flat_map(|i| {
                let c = i % clusters;
                (0..dim)
                    .map(|p| centres[c * dim + p] + 0.3 * rng.normal() as f32 / (dim as f32).sqrt())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    pub(crate) fn index(data: &[f32], dim: usize, tables: usize) -> LshIndex {
        let mut idx = LshIndex::new(LshParams {
            dim,
            n_tables: tables,
            n_hashes: 8,
            bucket_width: None,
            seed: 1,
        })
        .unwrap();
        let ids: Vec<i64> = (0..(data.len() / dim) as i64).collect();
        idx.add(Vectors::new("v", data, dim).unwrap(), &ids, 2)
            .unwrap();
        idx
    }

    /// Recall of `found` against `truth` (row-major, `k` per query; -1 ignored).
    pub(crate) fn recall(found: &Neighbours, truth: &Neighbours) -> f64 {
        let k = truth.k.min(found.k);
        let rows = truth.ids.len() / truth.k;
        let (mut hits, mut total) = (0usize, 0usize);
        for r in 0..rows {
            let want = truth.ids[r * truth.k..r * truth.k + k]
                .iter()
                .filter(|&&i| i >= 0);
            let got = &found.ids[r * found.k..r * found.k + k];
            for w in want {
                hits += got.contains(w) as usize;
                total += 1;
            }
        }
        if total == 0 {
            1.0
        } else {
            hits as f64 / total as f64
        }
    }

    #[test]
    fn recall_grows_with_probes_and_reaches_high_values() {
        let dim = 16;
        let data = clustered(4000, dim, 40, 2);
        let idx = index(&data, dim, 8);
        let queries = clustered(200, dim, 40, 3);
        let q = Vectors::new("v", &queries, dim).unwrap();
        let truth = crate::topk::topk_l2(
            q,
            Vectors::new("v", &data, dim).unwrap(),
            10,
            Filter::default(),
            1,
        )
        .unwrap();
        let few = recall(
            &idx.query(q, 10, Some(8), None, Filter::default(), 1)
                .unwrap(),
            &truth,
        );
        let many = recall(
            &idx.query(q, 10, Some(400), None, Filter::default(), 1)
                .unwrap(),
            &truth,
        );
        assert!(many >= few, "{few} {many}");
        assert!(many > 0.9, "recall with many probes {many}");
        // Exact distances for what is found.
        let found = idx
            .query(q, 10, Some(400), None, Filter::default(), 2)
            .unwrap();
        for (slot, &id) in found.ids.iter().enumerate() {
            if id >= 0 {
                let qi = slot / 10;
                let d =
                    kernel::sq_dist(q.row(qi), &data[id as usize * dim..(id as usize + 1) * dim]);
                assert_eq!(d, found.sqdist[slot]);
            }
        }
    }

    #[test]
    fn results_do_not_depend_on_threads_and_exclusions_hold() {
        let dim = 8;
        let data = clustered(3000, dim, 30, 4);
        let idx = index(&data, dim, 6);
        let queries = clustered(300, dim, 30, 5);
        let q = Vectors::new("v", &queries, dim).unwrap();
        let a = idx
            .query(q, 20, Some(60), None, Filter::default(), 1)
            .unwrap();
        let b = idx
            .query(q, 20, Some(60), None, Filter::default(), 4)
            .unwrap();
        assert_eq!(a, b);
        let rows: Vec<Vec<u32>> = (0..300)
            .map(|r| {
                let found = &a.ids[r * 20..r * 20 + 5];
                found
                    .iter()
                    .filter(|&&i| i >= 0)
                    .map(|&i| i as u32)
                    .collect()
            })
            .collect();
        let exclude = Csr::from_rows(3000, &rows).unwrap();
        let c = idx
            .query(q, 20, Some(60), None, Filter::rows(Some(&exclude)), 2)
            .unwrap();
        for (found, banned) in c.ids.chunks(20).zip(&rows) {
            for id in found {
                assert!(*id < 0 || !banned.contains(&(*id as u32)));
            }
        }
    }

    #[test]
    fn rejects_bad_use() {
        let params = LshParams {
            dim: 3,
            n_tables: 2,
            n_hashes: 4,
            bucket_width: None,
            seed: 0,
        };
        let mut idx = LshIndex::new(params.clone()).unwrap();
        let q = [0f32; 3];
        let qv = Vectors::new("v", &q, 3).unwrap();
        assert!(idx
            .query(qv, 1, None, None, Filter::default(), 1)
            .unwrap_err()
            .to_string()
            .contains("empty"));
        let data = [0f32, 1.0, 2.0, 3.0, 4.0, 5.0];
        let err = idx
            .add(Vectors::new("v", &data, 3).unwrap(), &[7, 7], 1)
            .unwrap_err();
        assert!(err.to_string().contains("id 7 occurs more than once"));
        assert!(idx
            .add(Vectors::new("v", &data, 2).unwrap(), &[1, 2, 3], 1)
            .unwrap_err()
            .to_string()
            .contains("3 columns"));
        let err = |p: LshParams| LshIndex::new(p).unwrap_err().to_string();
        assert!(err(LshParams {
            n_hashes: 40,
            ..params.clone()
        })
        .contains("n_hashes must be between 1 and 32, got 40"));
        assert!(err(LshParams {
            bucket_width: Some(-1.0),
            ..params.clone()
        })
        .contains("bucket_width must be a positive number, got -1"));
        let none: [f32; 0] = [];
        assert!(idx
            .add(Vectors::new("v", &none, 3).unwrap(), &[], 1)
            .unwrap_err()
            .to_string()
            .contains("nothing to add"));
        assert!(idx
            .add(Vectors::new("v", &data[..3], 3).unwrap(), &[-2], 1)
            .unwrap_err()
            .to_string()
            .contains("ids must be non-negative, got -2"));
        idx.add(Vectors::new("v", &data, 3).unwrap(), &[1, 2], 1)
            .unwrap();
        assert!(idx
            .query(qv, 1, Some(0), None, Filter::default(), 1)
            .unwrap_err()
            .to_string()
            .contains("n_probes must be at least 1"));
        assert!(idx
            .set_defaults(4, 3)
            .unwrap_err()
            .to_string()
            .contains("n_tables must be between 1 and 2 (the tables built), got 3"));
    }
}
