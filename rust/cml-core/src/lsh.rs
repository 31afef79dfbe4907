//! p-stable LSH for squared Euclidean top-K, with query-directed multi-probe.
//!
//! Hashing (Datar et al. 2004): `h(v) = floor((a.v + b) / w)` with `a` a
//! Gaussian vector and `b` uniform in [0, w). A table concatenates `n_hashes`
//! such values into one bucket key; `n_tables` tables are built. Near points
//! share buckets with high probability, far points rarely.
//!
//! Multi-probe (Lv et al. 2007): besides the query's own bucket in each table,
//! nearby buckets are probed, obtained by moving some coordinates of the hash
//! tuple by -1 or +1. A perturbation of coordinate i by -1 costs `f_i^2`, by +1
//! `(1 - f_i)^2`, where `f_i` is the query's fractional position in its slot;
//! a min-heap over (table, perturbation set) enumerates probes in increasing
//! total cost across all tables (shift/expand generation over the 2k sorted
//! single perturbations). Every candidate found is scored exactly and kept in
//! a top-K; the reported distances are recomputed in f64.
//!
//! Layout: each table stores item slots sorted by bucket and an open-addressing
//! map key -> (start, len), so a probe costs one or two cache misses. Vectors
//! are stored with their external ids, grouped by their first table's bucket
//! so near items share cache lines and pages. Probes and candidates are handled
//! in batches whose memory is requested ahead of use. Queries run in
//! parallel over chunks with no shared mutable state: results are
//! deterministic for a seed, whatever the thread count. `exclude` rows (by
//! external id) are skipped before scoring.
//!
//! Costs: build O(n * L * k * dim); query O(L * k * dim + probes * (log + bucket)
//! + candidates * dim); memory n * dim * 4 + n * 8 + L * (4n + 16 * buckets * 2).

use crate::csr::{prefetch, Csr};
use crate::error::{CoreError, Result};
use crate::kernel::{self, VectorOps};
use crate::parallel;
use crate::rng::{mix64, tag, Rng};
use crate::topk::{by_score_then_id, Neighbours, TopK, Vectors};
use std::collections::BinaryHeap;
use std::io::{Read, Write};
use std::path::Path;

/// Hash functions per table are limited so a perturbation set fits in a u64 mask.
pub const MAX_HASHES: usize = 32;
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

/// One hash table: item slots grouped by bucket, and a map from bucket key to its group.
#[derive(Clone, Debug, Default)]
struct Table {
    /// Internal item indices, grouped by bucket.
    slots: Vec<u32>,
    /// Open-addressing map; an entry with `len == 0` is empty.
    map: Vec<Bucket>,
}

#[derive(Clone, Copy, Debug, Default)]
struct Bucket {
    key: u64,
    start: u32,
    len: u32,
}

impl Table {
    fn build(keys: &[u64]) -> Table {
        let mut order: Vec<u32> = (0..keys.len() as u32).collect();
        order.sort_unstable_by_key(|&i| (keys[i as usize], i));
        let n_buckets = order
            .chunk_by(|&a, &b| keys[a as usize] == keys[b as usize])
            .count();
        // Load factor at most 3/4: still short probe runs, and up to half the
        // memory (and cache footprint) of a 1/2 cap.
        let capacity = (n_buckets * 4 / 3 + 1).next_power_of_two().max(2);
        let mut map = vec![Bucket::default(); capacity];
        let mut start = 0usize;
        for group in order.chunk_by(|&a, &b| keys[a as usize] == keys[b as usize]) {
            let key = keys[group[0] as usize];
            let mut slot = (mix64(key) as usize) & (capacity - 1);
            while map[slot].len != 0 {
                slot = (slot + 1) & (capacity - 1);
            }
            map[slot] = Bucket {
                key,
                start: start as u32,
                len: group.len() as u32,
            };
            start += group.len();
        }
        Table { slots: order, map }
    }

    #[inline]
    fn bucket(&self, key: u64) -> &[u32] {
        let mask = self.map.len() - 1;
        let mut slot = self.home_slot(key);
        loop {
            let b = self.map[slot];
            if b.len == 0 {
                return &[];
            }
            if b.key == key {
                return &self.slots[b.start as usize..(b.start + b.len) as usize];
            }
            slot = (slot + 1) & mask;
        }
    }

    #[inline]
    fn home_slot(&self, key: u64) -> usize {
        (mix64(key) as usize) & (self.map.len() - 1)
    }

    /// Starts loading the map entry `key` would be found at.
    #[inline]
    fn prefetch_key(&self, key: u64) {
        prefetch(&self.map[self.home_slot(key)]);
    }

    fn memory_bytes(&self) -> usize {
        self.slots.len() * 4 + self.map.len() * std::mem::size_of::<Bucket>()
    }
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

/// The hash of one coordinate's slot. A bucket key is the wrapping sum of
/// its coordinates' slot hashes, so moving a coordinate by +-1 shifts the key by
/// a difference computed once per query, and a probe's key costs one addition
/// per moved coordinate.
#[inline]
fn slot_hash(coordinate: usize, slot: i32) -> u64 {
    mix64(((coordinate as u64) << 32 | slot as u32 as u64) ^ 0x243F_6A88_85A3_08D3)
}

/// The slot of a projection in slot units: floor, without the libm call that
/// `f32::floor` compiles to on baseline x86-64 (projections are far inside i32).
#[inline(always)]
fn slot_of(projection: f32) -> i32 {
    let truncated = projection as i32;
    truncated - ((truncated as f32) > projection) as i32
}

/// The bucket key of the slots of one table's hashes.
#[inline]
fn bucket_key(slots: impl Iterator<Item = i32>) -> u64 {
    slots.enumerate().fold(0u64, |key, (coordinate, slot)| {
        key.wrapping_add(slot_hash(coordinate, slot))
    })
}

impl LshIndex {
    /// An empty index. `bucket_width = None` picks w from the first vectors added.
    pub fn new(params: LshParams) -> Result<LshIndex> {
        if params.dim == 0 {
            return Err(CoreError::invalid("dim must be at least 1, got 0"));
        }
        if params.n_tables == 0 {
            return Err(CoreError::invalid("n_tables must be at least 1, got 0"));
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
        let directions: Vec<f32> = (0..n_functions * params.dim)
            .map(|_| rng.normal() as f32)
            .collect();
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
        if probes == 0 {
            return Err(CoreError::invalid("n_probes must be at least 1, got 0"));
        }
        if tables == 0 || tables > self.params.n_tables {
            return Err(CoreError::invalid(format!(
                "n_tables must be between 1 and {} (the tables built), got {tables}",
                self.params.n_tables
            )));
        }
        self.default_probes = probes;
        self.default_tables = tables;
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
        if vectors.dim != self.params.dim {
            return Err(CoreError::invalid(format!(
                "vectors must have {} columns (the index dimension), got {}",
                self.params.dim, vectors.dim
            )));
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
        vectors.check_finite("vectors")?;
        let mut all_ids: Vec<i64> = self.ids.iter().chain(ids).copied().collect();
        all_ids.sort_unstable();
        if let Some(w) = all_ids.windows(2).find(|w| w[0] == w[1]) {
            return Err(CoreError::invalid(format!(
                "id {} occurs more than once; ids must be unique",
                w[0]
            )));
        }
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
            Vectors::new(&queries, self.params.dim).expect("sample rows"),
            all,
            k,
            None,
            num_threads,
        )
        .expect("consistent shapes");
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
    /// `n_probes` probes (`None`: the tuned default) in the first `n_tables`
    /// tables (`None`: all). Exact distances, nearest first, padded with -1/+inf.
    pub fn query(
        &self,
        queries: Vectors,
        k: usize,
        n_probes: Option<usize>,
        n_tables: Option<usize>,
        exclude: Option<&Csr>,
        num_threads: usize,
    ) -> Result<Neighbours> {
        if queries.dim != self.params.dim {
            return Err(CoreError::invalid(format!(
                "queries must have {} columns (the index dimension), got {}",
                self.params.dim, queries.dim
            )));
        }
        if k == 0 {
            return Err(CoreError::invalid("k must be at least 1, got 0"));
        }
        if self.is_empty() {
            return Err(CoreError::invalid(
                "the index is empty; add vectors with add_items before querying",
            ));
        }
        let tables = n_tables.unwrap_or(self.default_tables);
        if tables == 0 || tables > self.params.n_tables {
            return Err(CoreError::invalid(format!(
                "n_tables must be between 1 and {} (the tables built), got {tables}",
                self.params.n_tables
            )));
        }
        let probes = n_probes.unwrap_or(self.default_probes);
        if probes == 0 {
            return Err(CoreError::invalid("n_probes must be at least 1, got 0"));
        }
        if let Some(e) = exclude {
            if e.n_rows() != queries.len() {
                return Err(CoreError::invalid(format!(
                    "exclude has {} rows but there are {} queries; pass one row per query",
                    e.n_rows(),
                    queries.len()
                )));
            }
        }
        let n_queries = queries.len();
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
                    self.search_one(queries.row(q), q, k, probes, tables, exclude, &mut scratch)
                })
                .collect::<Vec<_>>()
            },
        );
        let mut ids = vec![-1i64; n_queries * k];
        let mut sqdist = vec![f32::INFINITY; n_queries * k];
        for (q, found) in chunks.into_iter().flatten().enumerate() {
            for (slot, (d, id)) in found.into_iter().enumerate() {
                ids[q * k + slot] = id;
                sqdist[q * k + slot] = d;
            }
        }
        Ok(Neighbours { k, ids, sqdist })
    }

    #[allow(clippy::too_many_arguments)]
    fn search_one(
        &self,
        q: &[f32],
        row: usize,
        k: usize,
        probes: usize,
        tables: usize,
        exclude: Option<&Csr>,
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
        let excluded: &[u32] = exclude.map_or(&[], |e| e.row(row));
        let ops = VectorOps::best();
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
                if !excluded.is_empty()
                    && u32::try_from(self.ids[item])
                        .is_ok_and(|id| excluded.binary_search(&id).is_ok())
                {
                    continue;
                }
                top.push(ops.code_dist(self.codes.code(item), &target), item as u32);
            }
            candidates.clear();
        };
        sequence.for_each_probe(projected, n_hashes, tables, probes, &mut |table, key| {
            batch.push((table, key));
            if batch.len() == PROBE_BATCH {
                drain(batch);
            }
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

    /// Writes the index (parameters, projections, vectors, ids; tables are
    /// rebuilt on load) with a CRC-32, to a temporary file renamed over `path`.
    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes = self.to_bytes();
        let tmp = path.with_file_name(format!(
            ".{}.tmp-{}",
            path.file_name()
                .map_or("index".into(), |n| n.to_string_lossy()),
            std::process::id()
        ));
        let result = (|| -> std::io::Result<()> {
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(&bytes)?;
            file.sync_all()?;
            std::fs::rename(&tmp, path)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result.map_err(CoreError::from)
    }

    pub fn load(path: &Path, num_threads: usize) -> Result<LshIndex> {
        let mut bytes = Vec::new();
        std::fs::File::open(path)?.read_to_end(&mut bytes)?;
        LshIndex::from_bytes(&bytes, num_threads)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.memory_bytes());
        out.extend_from_slice(FILE_MAGIC);
        put_u32(&mut out, FILE_VERSION);
        let p = &self.params;
        for v in [
            p.dim as u64,
            p.n_tables as u64,
            p.n_hashes as u64,
            p.seed,
            self.default_probes as u64,
            self.default_tables as u64,
            self.len() as u64,
        ] {
            put_u64(&mut out, v);
        }
        let width = p.bucket_width.unwrap_or(0.0);
        out.extend_from_slice(&width.to_le_bytes());
        for &v in self
            .projections
            .iter()
            .chain(&self.offsets)
            .chain(&self.vectors)
        {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for &id in &self.ids {
            out.extend_from_slice(&id.to_le_bytes());
        }
        let checksum = crc32fast::hash(&out);
        put_u32(&mut out, checksum);
        out
    }

    pub fn from_bytes(bytes: &[u8], num_threads: usize) -> Result<LshIndex> {
        const HEADER: usize = 8 + 4 + 7 * 8 + 4;
        if bytes.len() < 8 || &bytes[..8] != FILE_MAGIC {
            return Err(CoreError::corrupt(
                "not a cml-rs LSH index (the file does not start with CMLRSLSH)",
            ));
        }
        if bytes.len() < HEADER + 4 {
            return Err(CoreError::corrupt(format!(
                "the index file is truncated: {} bytes, shorter than its header",
                bytes.len()
            )));
        }
        let version = get_u32(bytes, 8);
        if version != FILE_VERSION {
            return Err(CoreError::corrupt(format!(
                "the index file has format version {version}; this cml-rs reads version {FILE_VERSION} (use a matching cml-rs)"
            )));
        }
        let field = |i: usize| get_u64(bytes, 12 + 8 * i);
        let (dim, n_tables, n_hashes, seed) = (field(0), field(1), field(2), field(3));
        let (probes, default_tables, n) = (field(4), field(5), field(6));
        let width = f32::from_le_bytes(bytes[HEADER - 4..HEADER].try_into().expect("4 bytes"));
        let n_functions = n_tables.checked_mul(n_hashes);
        let expected = n_functions
            .and_then(|f| f.checked_mul(dim).and_then(|fd| fd.checked_add(f)))
            .and_then(|floats| n.checked_mul(dim).and_then(|nd| nd.checked_add(floats)))
            .and_then(|floats| floats.checked_mul(4))
            .and_then(|b| n.checked_mul(8).and_then(|ids| ids.checked_add(b)))
            .and_then(|b| b.checked_add(HEADER as u64 + 4));
        match expected {
            Some(size) if size == bytes.len() as u64 => {}
            Some(size) if size > bytes.len() as u64 => {
                return Err(CoreError::corrupt(format!(
                    "the index file is truncated: {} bytes, expected {size}",
                    bytes.len()
                )))
            }
            _ => {
                return Err(CoreError::corrupt(format!(
                "the index file's header does not match its size ({} bytes); the file is corrupted",
                bytes.len()
            )))
            }
        }
        let body = bytes.len() - 4;
        if crc32fast::hash(&bytes[..body]) != get_u32(bytes, body) {
            return Err(CoreError::corrupt(
                "the index file's checksum does not match; the file is corrupted",
            ));
        }
        let (dim, n_tables, n_hashes, n) = (
            dim as usize,
            n_tables as usize,
            n_hashes as usize,
            n as usize,
        );
        let params = LshParams {
            dim,
            n_tables,
            n_hashes,
            bucket_width: (width > 0.0).then_some(width),
            seed,
        };
        let mut index = LshIndex::new(LshParams {
            bucket_width: None,
            ..params.clone()
        })
        .map_err(|e| CoreError::corrupt(format!("the index file holds invalid parameters: {e}")))?;
        index.params = params;
        let mut floats = bytes[HEADER..body]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")));
        let n_functions = n_tables * n_hashes;
        index.projections = floats.by_ref().take(n_functions * dim).collect();
        index.offsets = floats.by_ref().take(n_functions).collect();
        index.vectors = floats.take(n * dim).collect();
        let id_start = HEADER + 4 * (n_functions * (dim + 1) + n * dim);
        index.ids = bytes[id_start..body]
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        index
            .set_defaults(probes as usize, default_tables as usize)
            .map_err(|e| {
                CoreError::corrupt(format!("the index file holds invalid defaults: {e}"))
            })?;
        if !index.vectors.iter().all(|v| v.is_finite()) {
            return Err(CoreError::corrupt(
                "the index file holds non-finite vectors; the file is corrupted",
            ));
        }
        index.rebuild(num_threads);
        Ok(index)
    }
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn get_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn get_u64(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
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

/// A set of single-coordinate moves of one table's slots, ordered by total cost
/// in a min-heap (Lv et al. 2007).
#[derive(Clone, Copy, Debug, PartialEq)]
struct ProbeSet {
    cost: f32,
    table: u32,
    /// Bit j set: the j-th cheapest single move of this table is in the set.
    members: u64,
    /// Highest member index.
    last: u32,
}

impl Eq for ProbeSet {}

impl Ord for ProbeSet {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // Reversed: BinaryHeap is a max-heap and the cheapest set must come out first.
        other
            .cost
            .total_cmp(&self.cost)
            .then(other.table.cmp(&self.table))
            .then(other.members.cmp(&self.members))
    }
}

impl PartialOrd for ProbeSet {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// One single move: its cost, the coordinate it moves, and how it shifts the key.
#[derive(Clone, Copy, Debug, Default)]
struct Move {
    cost: f32,
    coordinate: u32,
    key_shift: u64,
}

/// Query-directed probing over all tables, reusing its buffers across queries.
#[derive(Debug, Default)]
struct ProbeSequence {
    base_keys: Vec<u64>,
    /// Per table, the 2k single moves sorted by cost.
    moves: Vec<Move>,
    heap: BinaryHeap<ProbeSet>,
}

impl ProbeSequence {
    /// Calls `visit(table, key)` for each table's own bucket, then for the
    /// cheapest perturbed buckets over all tables, `probes` buckets in all.
    /// A move of coordinate i by -1 costs `f_i^2` and by +1 `(1 - f_i)^2`,
    /// `f_i` the query's fractional position in slot i.
    fn for_each_probe(
        &mut self,
        projected: &[f32],
        n_hashes: usize,
        tables: usize,
        probes: usize,
        visit: &mut impl FnMut(usize, u64),
    ) {
        let width = 2 * n_hashes;
        self.base_keys.clear();
        self.moves.clear();
        for t in 0..tables {
            let slots = &projected[t * n_hashes..(t + 1) * n_hashes];
            self.base_keys
                .push(bucket_key(slots.iter().map(|&p| slot_of(p))));
            let start = self.moves.len();
            for (i, p) in slots.iter().enumerate() {
                let slot = slot_of(*p);
                let f = p - slot as f32;
                let home = slot_hash(i, slot);
                for (cost, shift) in [(f * f, -1), ((1.0 - f) * (1.0 - f), 1)] {
                    self.moves.push(Move {
                        cost,
                        coordinate: i as u32,
                        key_shift: slot_hash(i, slot + shift).wrapping_sub(home),
                    });
                }
            }
            self.moves[start..].sort_unstable_by(|a, b| {
                a.cost
                    .total_cmp(&b.cost)
                    .then(a.coordinate.cmp(&b.coordinate))
            });
        }
        for t in 0..tables.min(probes) {
            visit(t, self.base_keys[t]);
        }
        if probes <= tables {
            return;
        }
        self.heap.clear();
        for t in 0..tables {
            self.heap.push(ProbeSet {
                cost: self.moves[t * width].cost,
                table: t as u32,
                members: 1,
                last: 0,
            });
        }
        let mut emitted = tables;
        while emitted < probes {
            let Some(set) = self.heap.pop() else { break };
            let table = set.table as usize;
            let moves = &self.moves[table * width..(table + 1) * width];
            let last = set.last as usize;
            if last + 1 < width {
                let next = last + 1;
                // shift: replace the highest member by the next one; expand: add it.
                self.heap.push(ProbeSet {
                    cost: set.cost - moves[last].cost + moves[next].cost,
                    members: (set.members & !(1u64 << last)) | (1u64 << next),
                    last: next as u32,
                    ..set
                });
                self.heap.push(ProbeSet {
                    cost: set.cost + moves[next].cost,
                    members: set.members | (1u64 << next),
                    last: next as u32,
                    ..set
                });
            }
            // A set is a probe only if no coordinate moves both ways.
            let (mut coordinates, mut key, mut valid) = (0u32, self.base_keys[table], true);
            let mut bits = set.members;
            while bits != 0 {
                let m = moves[bits.trailing_zeros() as usize];
                bits &= bits - 1;
                valid &= coordinates & (1 << m.coordinate) == 0;
                coordinates |= 1 << m.coordinate;
                key = key.wrapping_add(m.key_shift);
            }
            if valid {
                visit(table, key);
                emitted += 1;
            }
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

/// Vectors quantised to one byte per coordinate, per-coordinate affine:
/// `x_d ~ offset_d + step_d * c_d`. A candidate's approximate squared distance
/// reads a quarter of the bytes of its exact vector, which is what the
/// candidate phase of a query is bound by.
#[derive(Clone, Debug, Default)]
struct Codes {
    dim: usize,
    codes: Vec<u8>,
    offset: Vec<f32>,
    step: Vec<f32>,
}

/// A query in code units: `(q_d - offset_d) / step_d`, and the weights `step_d^2`.
pub struct CodeTarget {
    pub position: Vec<f32>,
    pub weight: Vec<f32>,
}

impl Codes {
    fn encode(vectors: Vectors) -> Codes {
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
    fn code(&self, item: usize) -> &[u8] {
        &self.codes[item * self.dim..(item + 1) * self.dim]
    }

    fn target(&self, q: &[f32]) -> CodeTarget {
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

    fn memory_bytes(&self) -> usize {
        self.codes.len() + 8 * self.dim
    }
}

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
fn width_ratio_for(p: f64) -> f64 {
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

/// Recall of `found` against `truth` (row-major, `k` per query; -1 ignored).
pub fn recall(found: &Neighbours, truth: &Neighbours) -> f64 {
    let k = truth.k.min(found.k);
    let rows = truth.ids.len() / truth.k;
    let (mut hits, mut total) = (0usize, 0usize);
    for r in 0..rows {
        let want: Vec<i64> = truth.ids[r * truth.k..r * truth.k + k]
            .iter()
            .copied()
            .filter(|&i| i >= 0)
            .collect();
        let got = &found.ids[r * found.k..r * found.k + k];
        hits += want.iter().filter(|w| got.contains(w)).count();
        total += want.len();
    }
    if total == 0 {
        1.0
    } else {
        hits as f64 / total as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Points around `clusters` centres (fixed by `clusters`), noise from `seed`.
    fn clustered(n: usize, dim: usize, clusters: usize, seed: u64) -> Vec<f32> {
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

    fn index(data: &[f32], dim: usize, tables: usize) -> LshIndex {
        let mut idx = LshIndex::new(LshParams {
            dim,
            n_tables: tables,
            n_hashes: 8,
            bucket_width: None,
            seed: 1,
        })
        .unwrap();
        let ids: Vec<i64> = (0..(data.len() / dim) as i64).collect();
        idx.add(Vectors::new(data, dim).unwrap(), &ids, 2).unwrap();
        idx
    }

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

    #[test]
    fn probes_come_cheapest_first_over_all_tables() {
        // Two tables of three hashes: brute-force every move vector and its cost.
        let projected = [0.1f32, 2.95, -1.5, 0.6, 3.3, 0.49];
        let mut all: Vec<(f32, usize, u64)> = Vec::new();
        for table in 0..2 {
            let slots = &projected[table * 3..table * 3 + 3];
            for code in 0..27 {
                let shifts = [code % 3, code / 3 % 3, code / 9].map(|d| d - 1);
                let cost: f32 = slots
                    .iter()
                    .zip(shifts)
                    .map(|(p, d)| {
                        let f = p - p.floor();
                        match d {
                            -1 => f * f,
                            1 => (1.0 - f) * (1.0 - f),
                            _ => 0.0,
                        }
                    })
                    .sum();
                let key = bucket_key(slots.iter().zip(shifts).map(|(p, d)| p.floor() as i32 + d));
                all.push((cost, table, key));
            }
        }
        let mut emitted = Vec::new();
        ProbeSequence::default()
            .for_each_probe(&projected, 3, 2, 30, &mut |t, key| emitted.push((t, key)));
        assert_eq!(emitted.len(), 30);
        let cost_of = |t: usize, key: u64| {
            all.iter()
                .find(|a| a.1 == t && a.2 == key)
                .expect("a real bucket")
                .0
        };
        let costs: Vec<f32> = emitted.iter().map(|&(t, k)| cost_of(t, k)).collect();
        assert_eq!(&costs[..2], &[0.0, 0.0], "home buckets first");
        assert!(
            costs[2..].windows(2).all(|w| w[0] <= w[1] + 1e-6),
            "{costs:?}"
        );
        let mut sorted: Vec<f32> = all.iter().map(|a| a.0).collect();
        sorted.sort_by(|a, b| a.total_cmp(b));
        for (got, want) in costs.iter().zip(&sorted) {
            assert!((got - want).abs() < 1e-6, "{costs:?} vs {sorted:?}");
        }
        let mut distinct = emitted.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), emitted.len());
    }

    #[test]
    fn recall_grows_with_probes_and_reaches_high_values() {
        let dim = 16;
        let data = clustered(4000, dim, 40, 2);
        let idx = index(&data, dim, 8);
        let queries = clustered(200, dim, 40, 3);
        let q = Vectors::new(&queries, dim).unwrap();
        let truth =
            crate::topk::topk_l2(q, Vectors::new(&data, dim).unwrap(), 10, None, 1).unwrap();
        let few = recall(&idx.query(q, 10, Some(8), None, None, 1).unwrap(), &truth);
        let many = recall(&idx.query(q, 10, Some(400), None, None, 1).unwrap(), &truth);
        assert!(many >= few, "{few} {many}");
        assert!(many > 0.9, "recall with many probes {many}");
        // Exact distances for what is found.
        let found = idx.query(q, 10, Some(400), None, None, 2).unwrap();
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
        let q = Vectors::new(&queries, dim).unwrap();
        let a = idx.query(q, 20, Some(60), None, None, 1).unwrap();
        let b = idx.query(q, 20, Some(60), None, None, 4).unwrap();
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
        let c = idx.query(q, 20, Some(60), None, Some(&exclude), 2).unwrap();
        for (found, banned) in c.ids.chunks(20).zip(&rows) {
            for id in found {
                assert!(*id < 0 || !banned.contains(&(*id as u32)));
            }
        }
    }

    #[test]
    fn round_trips_through_bytes_and_rejects_damage() {
        let dim = 4;
        let data = clustered(500, dim, 5, 6);
        let idx = index(&data, dim, 3);
        let bytes = idx.to_bytes();
        let back = LshIndex::from_bytes(&bytes, 1).unwrap();
        let q = Vectors::new(&data[..40], dim).unwrap();
        assert_eq!(
            idx.query(q, 5, Some(9), None, None, 1).unwrap(),
            back.query(q, 5, Some(9), None, None, 1).unwrap()
        );
        assert!(LshIndex::from_bytes(&bytes[..bytes.len() - 10], 1)
            .unwrap_err()
            .to_string()
            .contains("truncated"));
        let mut flipped = bytes.clone();
        flipped[200] ^= 1;
        assert!(LshIndex::from_bytes(&flipped, 1)
            .unwrap_err()
            .to_string()
            .contains("checksum"));
        let mut version = bytes.clone();
        version[8] = 9;
        assert!(LshIndex::from_bytes(&version, 1)
            .unwrap_err()
            .to_string()
            .contains("version 9"));
        assert!(LshIndex::from_bytes(b"garbage", 1)
            .unwrap_err()
            .to_string()
            .contains("not a cml-rs LSH index"));
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
        let qv = Vectors::new(&q, 3).unwrap();
        assert!(idx
            .query(qv, 1, None, None, None, 1)
            .unwrap_err()
            .to_string()
            .contains("empty"));
        let data = [0f32, 1.0, 2.0, 3.0, 4.0, 5.0];
        let err = idx
            .add(Vectors::new(&data, 3).unwrap(), &[7, 7], 1)
            .unwrap_err();
        assert!(err.to_string().contains("id 7 occurs more than once"));
        assert!(idx
            .add(Vectors::new(&data, 2).unwrap(), &[1, 2, 3], 1)
            .unwrap_err()
            .to_string()
            .contains("3 columns"));
        assert!(LshIndex::new(LshParams {
            n_hashes: 40,
            ..params.clone()
        })
        .is_err());
        assert!(LshIndex::new(LshParams {
            bucket_width: Some(-1.0),
            ..params
        })
        .is_err());
    }
}
