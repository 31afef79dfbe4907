//! The WARP negative sampler of CML (Hsieh et al. 2017, after Weston et al. 2011).
//!
//! An epoch is a seeded permutation of all training pairs (one per stored entry
//! of the user x item CSR), cut into batches of `batch_size`; the last partial
//! batch is kept. Each pair at position `p` of epoch `e` gets `n_negatives`
//! items drawn uniformly from the items that are *not* its user's positives,
//! from the random stream `(seed, NEGATIVES, e, p)`. Because every draw is keyed
//! by position, not by thread, a batch is bit-identical for any thread count and
//! any production order, and a stream can restart anywhere (after a `fork`).
//!
//! Negatives never loop unboundedly: a uniform rank `r` in `[0, n_items - |row|)`
//! is mapped to the `r`-th item missing from the sorted row by binary search
//! over `row[i] - i` (the number of non-positives below `row[i]`), which is
//! exact rejection-free sampling of the complement in O(log |row|) per draw.
//! In catalogues of up to 131,072 items, the longest rows (at least 32
//! positives, at most half of all items) instead test a small bitset and
//! redraw, fewer than two draws on average. A user whose row
//! holds every item has an empty complement; construction rejects it by name
//! instead of hanging, as the reference sampler did.
//!
//! Confidence weights (optional): with a value `v >= 0` per pair (play counts,
//! ratings, BM25 weights), an epoch instead draws `nnz` pairs in proportion to
//! `ln(1 + v)` by systematic sampling: the pairs, in a seeded order, are laid
//! end to end on a line with lengths proportional to their weights, and `nnz`
//! equally spaced points with a seeded offset pick them, so each pair comes
//! `floor` or `ceil` of its expected count; the picks are then shuffled. The
//! logarithm keeps a pair with thousands of plays from crowding out the rest;
//! a pair of value 0 is never drawn. Equal values give the unweighted epoch.
//!
//! Shares (data-parallel training): a sampler made with [`WarpSampler::with_share`]
//! `(rank, world_size)` visits only the `rank`-th of `world_size` contiguous,
//! equal (to one pair) slices of each epoch's order. Every rank computes the
//! same seeded order, so the shares are disjoint and together cover the epoch,
//! and a pair's negatives are keyed by its position in the whole epoch: the
//! union of the shares' batches holds exactly the single-process epoch's pairs
//! and negatives, only cut into batches differently.
//!
//! Cost per epoch: O(nnz) for the permutation plus O(nnz * U * log |row|) for
//! the negatives, spread over the pool. [`BatchStream`] runs this on its own
//! thread, a bounded number of batches ahead of the consumer.

use crate::csr::{prefetch, Csr, RowPart};
use crate::error::{CoreError, Result};
use crate::parallel;
use crate::rng::{tag, Rng};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Pairs per parallel work unit when drawing a batch's negatives.
const PAIRS_PER_TASK: usize = 1024;
/// Rows with at least this many positives get a bitset (see `LongRows`)...
const LONG_ROW: usize = 32;
/// ...when a bitset over all items stays this small (16 KiB): a bit test then
/// hits L1/L2, while a larger, colder bitset costs more than the binary search
/// over a prefetched row.
const MAX_BITSET_ITEMS: usize = 16 << 13;
/// Memory allowed for those bitsets.
const LONG_ROW_BYTES: usize = 64 << 20;
/// How many pairs ahead the rows of upcoming users are prefetched.
const PREFETCH_AHEAD: usize = 4;
/// Below this many draws a batch is produced on one thread.
const SERIAL_DRAWS: usize = 1 << 15;

/// Most batches a stream may prepare ahead of its consumer.
pub const MAX_PREFETCH: usize = 1024;
/// Most negatives one batch may hold (2 GiB of ids).
pub const MAX_BATCH_DRAWS: usize = 1 << 28;
/// Most negatives a stream may hold in the batches it prepares ahead (8 GiB).
pub const MAX_PREFETCH_DRAWS: usize = 1 << 30;

/// Checks how many batches a [`BatchStream`] of `sampler` may prepare ahead:
/// at most [`MAX_PREFETCH`], and their negatives within [`MAX_PREFETCH_DRAWS`].
pub fn check_prefetch(prefetch: usize, sampler: &WarpSampler) -> Result<()> {
    if !(1..=MAX_PREFETCH).contains(&prefetch) {
        return Err(CoreError::invalid(format!(
            "prefetch must be between 1 and {MAX_PREFETCH} batches, got {prefetch}"
        )));
    }
    let draws = sampler.batch_draws();
    if (prefetch + 1).saturating_mul(draws) > MAX_PREFETCH_DRAWS {
        return Err(CoreError::invalid(format!(
            "prefetch {prefetch} batches of {draws} negatives each would hold more than {MAX_PREFETCH_DRAWS} \
             negatives in memory; lower prefetch, batch_size or n_negatives"
        )));
    }
    Ok(())
}

/// What a sampler draws.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplerConfig {
    /// Pairs per batch (the last batch of an epoch may be smaller).
    pub batch_size: usize,
    /// Negatives per pair (U in the paper; 20 there).
    pub n_negatives: usize,
    pub seed: u64,
    /// Draw negatives only among the user's non-positives (else over all items).
    pub check_negative: bool,
    /// Draw negatives in proportion to (item popularity)^this instead of
    /// uniformly (0: uniform); with the hardest of U kept by the loss, this is
    /// the two-stage sampling of Tran et al. (SIGIR 2019).
    pub popularity_exponent: f32,
}

/// One batch: `users[i]`, `positives[i]` and `negatives[i * U .. (i + 1) * U]`
/// describe pair `i`. Ids are `i64` so they convert to numpy/torch without a copy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    pub epoch: u64,
    pub index: usize,
    pub users: Vec<i64>,
    pub positives: Vec<i64>,
    pub negatives: Vec<i64>,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

/// The training pairs of one user x item matrix and how to sample them.
#[derive(Debug)]
pub struct WarpSampler {
    positives: Csr,
    /// The user of each stored pair, in CSR order.
    pair_users: Vec<u32>,
    /// The drawing weight `ln(1 + value)` of each pair, when values matter.
    weights: Option<Vec<f64>>,
    /// Bitsets of the positives of long rows (see [`LongRows`]).
    long_rows: LongRows,
    /// Items weighted by popularity^exponent, when negatives follow popularity.
    popular: Option<AliasTable>,
    config: SamplerConfig,
    /// This sampler's slice of every epoch: (rank, world_size).
    share: (usize, usize),
}

impl WarpSampler {
    pub fn new(positives: Csr, config: SamplerConfig) -> Result<WarpSampler> {
        if config.batch_size == 0 {
            return Err(CoreError::invalid("batch_size must be at least 1, got 0"));
        }
        if config.n_negatives == 0 {
            return Err(CoreError::invalid("n_negatives must be at least 1, got 0"));
        }
        let n_items = positives.n_cols();
        if positives.nnz() == 0 {
            return Err(CoreError::invalid(format!(
                "user_items ({} users x {n_items} items) holds no interactions; there is nothing to sample",
                positives.n_rows()
            )));
        }
        if positives.nnz() >= u32::MAX as usize || positives.n_rows() >= u32::MAX as usize {
            return Err(CoreError::invalid(format!(
                "user_items has {} interactions and {} users; at most {} of each are supported",
                positives.nnz(),
                positives.n_rows(),
                u32::MAX - 1
            )));
        }
        let draws = config
            .batch_size
            .min(positives.nnz())
            .saturating_mul(config.n_negatives);
        if draws > MAX_BATCH_DRAWS {
            return Err(CoreError::invalid(format!(
                "a batch would hold {} pairs x {} negatives = {draws} negatives, more than {MAX_BATCH_DRAWS}; \
                 lower batch_size or n_negatives",
                config.batch_size.min(positives.nnz()),
                config.n_negatives
            )));
        }
        if config.check_negative {
            if let Some(user) = (0..positives.n_rows()).find(|&u| positives.row(u).len() == n_items)
            {
                return Err(CoreError::invalid(format!(
                    "user {user} has all {n_items} items as positives, so no item can be its negative; \
                     drop this user from user_items (a WarpSampler of your own may instead pass \
                     check_negative=False)"
                )));
            }
        }
        let mut pair_users = Vec::with_capacity(positives.nnz());
        for u in 0..positives.n_rows() {
            pair_users.extend(std::iter::repeat_n(u as u32, positives.row(u).len()));
        }
        if !(config.popularity_exponent.is_finite()
            && (0.0..=4.0).contains(&config.popularity_exponent))
        {
            return Err(CoreError::invalid(format!(
                "popularity_exponent must be between 0 and 4, got {}",
                config.popularity_exponent
            )));
        }
        let long_rows = if config.check_negative {
            LongRows::new(&positives)
        } else {
            LongRows::default()
        };
        let popular = (config.popularity_exponent > 0.0).then(|| {
            let mut counts = vec![0f64; n_items];
            for &item in positives.indices() {
                counts[item as usize] += 1.0;
            }
            // +1: an item nobody has chosen yet can still be a negative.
            let exponent = config.popularity_exponent as f64;
            AliasTable::new(
                &counts
                    .iter()
                    .map(|c| (c + 1.0).powf(exponent))
                    .collect::<Vec<_>>(),
            )
        });
        Ok(WarpSampler {
            positives,
            pair_users,
            weights: None,
            long_rows,
            popular,
            config,
            share: (0, 1),
        })
    }

    /// The same sampler drawing only share `rank` of `world_size` of every epoch
    /// (see the module notes): disjoint across ranks, complete together.
    pub fn with_share(mut self, rank: usize, world_size: usize) -> Result<WarpSampler> {
        if world_size == 0 {
            return Err(CoreError::invalid("world_size must be at least 1, got 0"));
        }
        if rank >= world_size {
            return Err(CoreError::invalid(format!(
                "rank must be below world_size {world_size}, got {rank}"
            )));
        }
        if world_size > self.n_pairs() {
            return Err(CoreError::invalid(format!(
                "world_size {world_size} exceeds the {} training pairs, so some ranks would draw nothing; \
                 use at most {} ranks",
                self.n_pairs(),
                self.n_pairs()
            )));
        }
        self.share = (rank, world_size);
        Ok(self)
    }

    /// (rank, world_size) of this sampler's share of each epoch.
    pub fn share(&self) -> (usize, usize) {
        self.share
    }

    /// Positions `[start, end)` of the epoch order that this share visits.
    fn share_range(&self) -> (usize, usize) {
        let (rank, world) = self.share;
        let n = self.n_pairs();
        // rank * n fits: n < 2^32 and rank < n.
        (rank * n / world, (rank + 1) * n / world)
    }

    /// Pairs this share visits per epoch.
    pub fn share_len(&self) -> usize {
        let (start, end) = self.share_range();
        end - start
    }

    /// A sampler that draws pairs in proportion to `ln(1 + value)`, `values`
    /// holding one confidence value per stored pair in CSR order (see the module
    /// notes). Values must be finite and non-negative, and not all zero.
    pub fn with_confidence(
        positives: Csr,
        values: &[f32],
        config: SamplerConfig,
    ) -> Result<WarpSampler> {
        if values.len() != positives.nnz() {
            return Err(CoreError::invalid(format!(
                "got {} confidence values for {} pairs; pass one value per stored entry",
                values.len(),
                positives.nnz()
            )));
        }
        if let Some(at) = values.iter().position(|v| !v.is_finite() || *v < 0.0) {
            let row = positives.indptr().partition_point(|&start| start <= at) - 1;
            let item = positives.indices()[at];
            return Err(CoreError::invalid(format!(
                "user_items[{row}, {item}] is {}; confidence values must be finite and >= 0 \
                 (pass binary=True to treat every stored entry as a plain positive)",
                values[at]
            )));
        }
        if values.iter().all(|&v| v == 0.0) {
            return Err(CoreError::invalid(
                "every value of user_items is 0, so no pair would ever be drawn; \
                 store the interactions as positive values (or pass binary=True)",
            ));
        }
        let mut sampler = WarpSampler::new(positives, config)?;
        if values.iter().any(|&v| v != values[0]) {
            sampler.weights = Some(values.iter().map(|&v| (v as f64).ln_1p()).collect());
        }
        Ok(sampler)
    }

    pub fn config(&self) -> &SamplerConfig {
        &self.config
    }

    /// Whether epochs draw pairs by confidence weight (not a plain permutation).
    pub fn is_weighted(&self) -> bool {
        self.weights.is_some()
    }

    pub fn positives(&self) -> &Csr {
        &self.positives
    }

    pub fn n_pairs(&self) -> usize {
        self.pair_users.len()
    }

    /// Negatives in a full batch: `min(batch_size, n_pairs) * n_negatives`.
    pub fn batch_draws(&self) -> usize {
        self.config.batch_size.min(self.n_pairs()) * self.config.n_negatives
    }

    /// Batches per epoch of this share, the last partial one included.
    pub fn n_batches(&self) -> usize {
        self.share_len().div_ceil(self.config.batch_size)
    }

    /// The pairs (indices into CSR order) that this share visits in epoch
    /// `epoch`, in order: its slice of the epoch's seeded order.
    pub fn epoch_order(&self, epoch: u64) -> Vec<u32> {
        let mut order = self.full_epoch_order(epoch);
        let (start, end) = self.share_range();
        order.truncate(end);
        order.drain(..start);
        order
    }

    /// The seeded order in which epoch `epoch` visits all pairs.
    fn full_epoch_order(&self, epoch: u64) -> Vec<u32> {
        let mut order: Vec<u32> = (0..self.n_pairs() as u32).collect();
        let mut rng = Rng::stream(self.config.seed, tag::EPOCH_ORDER, &[epoch]);
        rng.shuffle(&mut order);
        if let Some(weights) = &self.weights {
            order = systematic_sample(&order, weights, rng.unit_f64());
            rng.shuffle(&mut order);
        }
        order
    }

    /// Batch `index` of epoch `epoch`, given [`Self::epoch_order`] of that epoch.
    pub fn batch(&self, epoch: u64, order: &[u32], index: usize, num_threads: usize) -> Batch {
        debug_assert_eq!(order.len(), self.share_len());
        let start = index * self.config.batch_size;
        let end = (start + self.config.batch_size).min(order.len());
        // Negatives are keyed by position in the whole epoch, whatever the share.
        let share_start = self.share_range().0;
        let pairs = &order[start..end];
        let u = self.config.n_negatives;
        let (mut users, mut positives) = (vec![0i64; pairs.len()], vec![0i64; pairs.len()]);
        let mut negatives = vec![0i64; pairs.len() * u];
        // One work unit per PAIRS_PER_TASK pairs fills its slice of all three outputs.
        let mut units: Vec<(&mut [i64], &mut [i64], &mut [i64])> = users
            .chunks_mut(PAIRS_PER_TASK)
            .zip(positives.chunks_mut(PAIRS_PER_TASK))
            .zip(negatives.chunks_mut(PAIRS_PER_TASK * u))
            .map(|((a, b), c)| (a, b, c))
            .collect();
        let serial = pairs.len() * u < SERIAL_DRAWS;
        parallel::for_each_chunk_mut(num_threads, serial, &mut units, 1, |task, unit| {
            let (unit_users, unit_positives, unit_negatives) = &mut unit[0];
            let first = task * PAIRS_PER_TASK;
            let user_of = |local: usize| self.pair_users[pairs[local] as usize] as usize;
            for (offset, slots) in unit_negatives.chunks_mut(u).enumerate() {
                let local = first + offset;
                if self.config.check_negative {
                    // Pairs arrive in random order: fetch what upcoming pairs need early,
                    // each stage one step ahead of the load that depends on it.
                    if local + 3 * PREFETCH_AHEAD < pairs.len() {
                        prefetch(&self.pair_users[pairs[local + 3 * PREFETCH_AHEAD] as usize]);
                    }
                    if local + 2 * PREFETCH_AHEAD < pairs.len() {
                        self.positives
                            .prefetch_row(user_of(local + 2 * PREFETCH_AHEAD), RowPart::Offsets);
                    }
                    if local + PREFETCH_AHEAD < pairs.len() {
                        self.positives
                            .prefetch_row(user_of(local + PREFETCH_AHEAD), RowPart::Ids);
                    }
                }
                let user = user_of(local);
                unit_users[offset] = user as i64;
                unit_positives[offset] = self.positives.indices()[pairs[local] as usize] as i64;
                self.draw_negatives(epoch, (share_start + start + local) as u64, user, slots);
            }
        });
        drop(units);
        Batch {
            epoch,
            index,
            users,
            positives,
            negatives,
        }
    }

    /// Fills `slots` with the negatives of the pair at `position` of `epoch`.
    #[inline]
    fn draw_negatives(&self, epoch: u64, position: u64, user: usize, slots: &mut [i64]) {
        let mut rng = Rng::stream(self.config.seed, tag::NEGATIVES, &[epoch, position]);
        let n_items = self.positives.n_cols() as u64;
        if let Some(table) = &self.popular {
            let row = self.positives.row(user);
            for slot in slots {
                // Redraw a positive a bounded number of times; a user holding the
                // popular items would otherwise cost unboundedly, so then fall back
                // to a uniform draw over the user's non-positives.
                let mut item = table.draw(&mut rng);
                let mut tries = 1;
                while self.config.check_negative && row.binary_search(&(item as u32)).is_ok() {
                    if tries == POPULAR_TRIES {
                        item = nth_missing(row, rng.below(n_items - row.len() as u64));
                        break;
                    }
                    item = table.draw(&mut rng);
                    tries += 1;
                }
                *slot = item as i64;
            }
        } else if !self.config.check_negative {
            for slot in slots {
                *slot = rng.below(n_items) as i64;
            }
        } else if let Some(positives) = self.long_rows.bits(user) {
            // Redraw while the draw is a positive: uniform over the rest, and at
            // most half the items are positives here, so under two draws expected.
            for slot in slots {
                let mut item = rng.below(n_items);
                while positives[(item / 64) as usize] >> (item % 64) & 1 == 1 {
                    item = rng.below(n_items);
                }
                *slot = item as i64;
            }
        } else {
            let row = self.positives.row(user);
            for slot in slots {
                *slot = nth_missing(row, rng.below(n_items - row.len() as u64)) as i64;
            }
        }
    }
}

/// Attempts at a popularity-weighted negative before falling back to a uniform one.
const POPULAR_TRIES: usize = 16;

/// Walker's alias method: O(1) draws from a fixed discrete distribution.
#[derive(Debug)]
struct AliasTable {
    probability: Vec<f64>,
    alias: Vec<u32>,
}

impl AliasTable {
    /// The table of the distribution proportional to `weights` (positive, finite).
    fn new(weights: &[f64]) -> AliasTable {
        let n = weights.len();
        let total: f64 = weights.iter().sum();
        let mut scaled: Vec<f64> = weights.iter().map(|w| w * n as f64 / total).collect();
        let (mut small, mut large): (Vec<usize>, Vec<usize>) =
            (0..n).partition(|&i| scaled[i] < 1.0);
        let mut alias = vec![0u32; n];
        let mut probability = vec![1.0f64; n];
        while let (Some(s), Some(&l)) = (small.pop(), large.last()) {
            probability[s] = scaled[s];
            alias[s] = l as u32;
            scaled[l] -= 1.0 - scaled[s];
            if scaled[l] < 1.0 {
                large.pop();
                small.push(l);
            }
        }
        AliasTable { probability, alias }
    }

    #[inline]
    fn draw(&self, rng: &mut Rng) -> u64 {
        let i = rng.below(self.probability.len() as u64) as usize;
        if rng.unit_f64() < self.probability[i] {
            i as u64
        } else {
            self.alias[i] as u64
        }
    }
}

/// `visit.len()` picks among the pairs of `visit` (in that order), each pair as
/// many times as equally spaced points with offset `offset` (in [0, 1) steps)
/// fall on its share of the total weight.
fn systematic_sample(visit: &[u32], weights: &[f64], offset: f64) -> Vec<u32> {
    let total: f64 = weights.iter().sum();
    let n = visit.len();
    let step = total / n as f64;
    let mut picks = Vec::with_capacity(n);
    let (mut edge, mut point) = (0.0f64, offset * step);
    for &pair in visit {
        edge += weights[pair as usize];
        while point < edge && picks.len() < n {
            picks.push(pair);
            point += step;
        }
    }
    // Rounding can leave the last point just beyond the last edge.
    while picks.len() < n {
        picks.push(
            *visit
                .iter()
                .rev()
                .find(|&&p| weights[p as usize] > 0.0)
                .expect("a positive weight"),
        );
    }
    picks
}

/// Bitsets of the positives of the longest rows, where the binary search of
/// [`nth_missing`] costs most (log2 of the row per draw) and a bit test with a
/// rare redraw costs least. Only rows of at least [`LONG_ROW`] positives and at
/// most half of all items qualify (so redraws stay rare and never loop long),
/// longest first, within [`LONG_ROW_BYTES`] of bitsets, and only when there are
/// at most [`MAX_BITSET_ITEMS`] items.
#[derive(Debug, Default)]
struct LongRows {
    /// Per user: the offset of its bitset in `words`, or `u32::MAX`.
    offset: Vec<u32>,
    words: Vec<u64>,
    words_per_row: usize,
}

impl LongRows {
    fn new(positives: &Csr) -> LongRows {
        let n_items = positives.n_cols();
        if n_items > MAX_BITSET_ITEMS {
            return LongRows::default();
        }
        let words_per_row = n_items.div_ceil(64);
        let budget_rows = LONG_ROW_BYTES / (8 * words_per_row.max(1));
        let mut long: Vec<usize> = (0..positives.n_rows())
            .filter(|&u| {
                let n = positives.row(u).len();
                n >= LONG_ROW && 2 * n <= n_items
            })
            .collect();
        long.sort_by_key(|&u| (std::cmp::Reverse(positives.row(u).len()), u));
        long.truncate(budget_rows);
        if long.is_empty() || words_per_row * long.len() > u32::MAX as usize {
            return LongRows::default();
        }
        let mut offset = vec![u32::MAX; positives.n_rows()];
        let mut words = vec![0u64; words_per_row * long.len()];
        for (slot, &user) in long.iter().enumerate() {
            offset[user] = (slot * words_per_row) as u32;
            for &item in positives.row(user) {
                words[slot * words_per_row + item as usize / 64] |= 1 << (item % 64);
            }
        }
        LongRows {
            offset,
            words,
            words_per_row,
        }
    }

    #[inline]
    fn bits(&self, user: usize) -> Option<&[u64]> {
        let start = *self.offset.get(user)?;
        (start != u32::MAX)
            .then(|| &self.words[start as usize..start as usize + self.words_per_row])
    }
}

/// The `rank`-th (0-based) non-negative integer missing from the sorted, unique `row`.
#[inline]
pub fn nth_missing(row: &[u32], rank: u64) -> u64 {
    // row[i] - i counts the missing values below row[i] and never decreases, so
    // the answer is rank + (how many i have row[i] - i <= rank). The search is
    // branch-free: the draws are random, so a branchy search would mispredict
    // at nearly every step.
    // SAFETY: every index the search reads is below `row.len()`: `mid < base + size <= len`.
    let below = |i: usize| unsafe { *row.get_unchecked(i) } as u64 - i as u64 <= rank;
    let mut size = row.len();
    if size == 0 {
        return rank;
    }
    let mut base = 0usize;
    while size > 1 {
        let half = size / 2;
        let mid = base + half;
        base = std::hint::select_unpredictable(below(mid), mid, base);
        size -= half;
    }
    rank + base as u64 + below(base) as u64
}

/// Batches produced on a background thread, at most `prefetch` ahead of the
/// consumer, from a starting (epoch, batch) until `end_epoch` (exclusive) or
/// forever. After a `fork` the child's stream restarts its producer from the
/// next batch it has not yet handed out, so it yields exactly what the parent's
/// would have.
pub struct BatchStream {
    sampler: Arc<WarpSampler>,
    next_epoch: u64,
    next_batch: usize,
    end_epoch: Option<u64>,
    prefetch: usize,
    num_threads: usize,
    producer: Option<Producer>,
}

struct Producer {
    pid: u32,
    receiver: Receiver<Batch>,
    handle: JoinHandle<()>,
}

impl BatchStream {
    pub fn new(
        sampler: Arc<WarpSampler>,
        start_epoch: u64,
        end_epoch: Option<u64>,
        prefetch: usize,
        num_threads: usize,
    ) -> BatchStream {
        BatchStream {
            sampler,
            next_epoch: start_epoch,
            next_batch: 0,
            end_epoch,
            prefetch: prefetch.max(1),
            num_threads,
            producer: None,
        }
    }

    /// The (epoch, batch index) the next call to [`BatchStream::next_batch`] returns.
    pub fn position(&self) -> (u64, usize) {
        (self.next_epoch, self.next_batch)
    }

    /// Batches left before `end_epoch`, or `None` for an endless stream.
    pub fn remaining(&self) -> Option<usize> {
        self.end_epoch.map(|end| {
            let epochs_left = end.saturating_sub(self.next_epoch) as usize;
            (epochs_left * self.sampler.n_batches()).saturating_sub(self.next_batch)
        })
    }

    fn finished(&self) -> bool {
        self.end_epoch.is_some_and(|end| self.next_epoch >= end)
    }

    fn spawn_producer(&self) -> Result<Producer> {
        let (sender, receiver) = sync_channel(self.prefetch);
        let sampler = Arc::clone(&self.sampler);
        let (mut epoch, mut index) = (self.next_epoch, self.next_batch);
        let (end_epoch, num_threads) = (self.end_epoch, self.num_threads);
        let handle = std::thread::Builder::new()
            .name("cml-rs-sampler".into())
            .spawn(move || {
                while end_epoch.is_none_or(|end| epoch < end) {
                    let order = sampler.epoch_order(epoch);
                    while index < sampler.n_batches() {
                        let batch = sampler.batch(epoch, &order, index, num_threads);
                        if sender.send(batch).is_err() {
                            return; // the consumer is gone
                        }
                        index += 1;
                    }
                    epoch += 1;
                    index = 0;
                }
            })?;
        Ok(Producer {
            pid: std::process::id(),
            receiver,
            handle,
        })
    }

    /// The next batch, or `None` once `end_epoch` is reached.
    pub fn next_batch(&mut self) -> Result<Option<Batch>> {
        if self.finished() {
            return Ok(None);
        }
        if let Some(p) = &self.producer {
            if p.pid != std::process::id() {
                // Forked: the producer thread does not exist here; abandon its remains.
                std::mem::forget(self.producer.take());
            }
        }
        if self.producer.is_none() {
            self.producer = Some(self.spawn_producer()?);
        }
        let producer = self.producer.as_ref().expect("producer was just started");
        match producer.receiver.recv() {
            Ok(batch) => {
                debug_assert_eq!(
                    (batch.epoch, batch.index),
                    (self.next_epoch, self.next_batch)
                );
                self.next_batch += 1;
                if self.next_batch == self.sampler.n_batches() {
                    self.next_epoch += 1;
                    self.next_batch = 0;
                }
                Ok(Some(batch))
            }
            Err(_) => {
                // The producer only hangs up early if it panicked.
                let producer = self.producer.take().expect("producer present");
                let reason = match producer.handle.join() {
                    Err(payload) => parallel::panic_message(&payload),
                    Ok(()) => "it stopped early".to_string(),
                };
                Err(CoreError::invalid(format!(
                    "the sampler's background thread failed: {reason}"
                )))
            }
        }
    }
}

impl Drop for BatchStream {
    fn drop(&mut self) {
        if let Some(producer) = self.producer.take() {
            if producer.pid == std::process::id() {
                drop(producer.receiver); // unblocks a producer waiting to send
                let _ = producer.handle.join();
            } else {
                std::mem::forget(producer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(rows: &[Vec<u32>], n_items: usize, batch_size: usize, seed: u64) -> WarpSampler {
        let csr = Csr::from_rows(n_items, rows).unwrap();
        WarpSampler::new(
            csr,
            SamplerConfig {
                batch_size,
                n_negatives: 5,
                seed,
                check_negative: true,
                popularity_exponent: 0.0,
            },
        )
        .unwrap()
    }

    #[test]
    fn nth_missing_walks_the_complement() {
        let row = [1u32, 3, 4, 8];
        let complement: Vec<u64> = (0..12).filter(|x| !row.contains(&(*x as u32))).collect();
        for (rank, &expected) in complement.iter().enumerate() {
            assert_eq!(nth_missing(&row, rank as u64), expected);
        }
        assert_eq!(nth_missing(&[], 5), 5);
    }

    #[test]
    fn epoch_covers_every_pair_once_and_keeps_the_tail() {
        let s = sampler(&[vec![0, 2], vec![1], vec![3, 4, 5]], 10, 4, 3);
        assert_eq!(s.n_batches(), 2);
        let order = s.epoch_order(0);
        let batches: Vec<Batch> = (0..2).map(|b| s.batch(0, &order, b, 1)).collect();
        assert_eq!(batches[1].len(), 2);
        let mut pairs: Vec<(i64, i64)> = batches
            .iter()
            .flat_map(|b| b.users.iter().copied().zip(b.positives.iter().copied()))
            .collect();
        pairs.sort();
        assert_eq!(pairs, vec![(0, 0), (0, 2), (1, 1), (2, 3), (2, 4), (2, 5)]);
    }

    #[test]
    fn shares_are_disjoint_complete_and_keep_each_pairs_negatives() {
        let rows: Vec<Vec<u32>> = (0..23u32)
            .map(|u| (0..1 + u % 5).map(|k| (u * 7 + k * 3) % 40).collect())
            .map(|mut r: Vec<u32>| {
                r.sort();
                r.dedup();
                r
            })
            .collect();
        let whole = sampler(&rows, 40, 1000, 9);
        let order = whole.epoch_order(3);
        let reference = whole.batch(3, &order, 0, 1);
        let triples = |b: &Batch| -> Vec<(i64, i64, Vec<i64>)> {
            (0..b.len())
                .map(|i| {
                    (
                        b.users[i],
                        b.positives[i],
                        b.negatives[i * 5..(i + 1) * 5].to_vec(),
                    )
                })
                .collect()
        };
        let mut expected = triples(&reference);
        for world in [1usize, 2, 3, 7] {
            let mut union = Vec::new();
            for rank in 0..world {
                let share = sampler(&rows, 40, 4, 9).with_share(rank, world).unwrap();
                let order = share.epoch_order(3);
                assert!(order.len().abs_diff(whole.n_pairs() / world) <= 1);
                for b in 0..share.n_batches() {
                    union.extend(triples(&share.batch(3, &order, b, 2)));
                }
            }
            union.sort();
            expected.sort();
            assert_eq!(union, expected, "world_size {world}");
        }
        let err = |r, w| {
            sampler(&rows, 40, 4, 9)
                .with_share(r, w)
                .unwrap_err()
                .to_string()
        };
        assert!(err(0, 0).contains("world_size must be at least 1"));
        assert!(err(2, 2).contains("rank must be below world_size 2, got 2"));
        assert!(err(0, 1000).contains("world_size 1000 exceeds the"));
    }

    #[test]
    fn long_rows_draw_uniformly_outside_their_positives() {
        // User 0: 60 of 200 items (bitset path); user 1: 150 (more than half, binary
        // search); user 2: 3 (binary search).
        let rows = vec![
            (0..60).map(|i| i * 3).collect(),
            (0..150).collect(),
            vec![5, 6, 7],
        ];
        let s = sampler(&rows, 200, 64, 11);
        assert!(s.long_rows.bits(0).is_some());
        assert!(s.long_rows.bits(1).is_none() && s.long_rows.bits(2).is_none());
        let mut counts = vec![0usize; 200];
        for epoch in 0..200 {
            let order = s.epoch_order(epoch);
            for b in 0..s.n_batches() {
                let batch = s.batch(epoch, &order, b, 2);
                for (i, &user) in batch.users.iter().enumerate() {
                    for &negative in &batch.negatives[i * 5..(i + 1) * 5] {
                        assert!(!rows[user as usize].contains(&(negative as u32)));
                        if user == 0 {
                            counts[negative as usize] += 1;
                        }
                    }
                }
            }
        }
        // 200 epochs x 60 pairs x 5 negatives over 140 items: about 429 each.
        let eligible: Vec<usize> = (0..200)
            .filter(|i| i % 3 != 0 || *i >= 180)
            .map(|i| counts[i])
            .collect();
        assert_eq!(eligible.len(), 140);
        assert!(
            eligible.iter().all(|&c| (300..560).contains(&c)),
            "{eligible:?}"
        );
    }

    #[test]
    fn confidence_draws_pairs_in_proportion_to_log_one_plus_value() {
        // One user, 4 items; values 0, 1, e - 1 and e^3 - 1: weights 0, ln 2, 1, 3.
        let csr = Csr::from_rows(10, &[vec![0, 1, 2, 3]]).unwrap();
        let e = std::f32::consts::E;
        let values = [0.0, 1.0, e - 1.0, e * e * e - 1.0];
        let config = SamplerConfig {
            batch_size: 4,
            n_negatives: 1,
            seed: 5,
            check_negative: true,
            popularity_exponent: 0.0,
        };
        let s = WarpSampler::with_confidence(csr.clone(), &values, config.clone()).unwrap();
        let mut counts = [0usize; 4];
        for epoch in 0..1000 {
            let order = s.epoch_order(epoch);
            assert_eq!(order.len(), 4);
            for &pair in &order {
                counts[pair as usize] += 1;
            }
        }
        // 4,000 draws over weights 0 : 0.693 : 1 : 3.
        let total = std::f64::consts::LN_2 + 4.0;
        for (pair, weight) in [(1, std::f64::consts::LN_2), (2, 1.0), (3, 3.0)] {
            let expected = 4000.0 * weight / total;
            assert!(
                (counts[pair] as f64 - expected).abs() < 0.05 * expected,
                "{counts:?}"
            );
        }
        assert_eq!(counts[0], 0);
        // Equal values: the same epochs as without values.
        let plain = WarpSampler::new(csr.clone(), config.clone()).unwrap();
        let equal = WarpSampler::with_confidence(csr.clone(), &[3.0; 4], config.clone()).unwrap();
        assert_eq!(plain.epoch_order(7), equal.epoch_order(7));
        let message = |values: &[f32]| {
            WarpSampler::with_confidence(csr.clone(), values, config.clone())
                .unwrap_err()
                .to_string()
        };
        assert!(message(&[1.0, -1.0, 1.0, 1.0]).contains("user_items[0, 1] is -1"));
        assert!(message(&[1.0, 1.0, f32::NAN, 1.0]).contains("user_items[0, 2] is NaN"));
        assert!(message(&[0.0; 4]).contains("every value of user_items is 0"));
        assert!(message(&[1.0]).contains("1 confidence values for 4 pairs"));
    }

    #[test]
    fn popularity_weighted_negatives_follow_their_weights_and_avoid_positives() {
        // Item i is a positive of i users (items 1..=6 among 8 users), so with
        // exponent 1 an item's weight is (count + 1); user 0 has items 5 and 6.
        let rows: Vec<Vec<u32>> = (0..8u32)
            .map(|u| if u == 0 { vec![5, 6] } else { (u..7).collect() })
            .collect();
        let csr = Csr::from_rows(8, &rows).unwrap();
        let config = SamplerConfig {
            batch_size: 64,
            n_negatives: 50,
            seed: 3,
            check_negative: true,
            popularity_exponent: 1.0,
        };
        let s = WarpSampler::new(csr.clone(), config).unwrap();
        let mut counts = [0usize; 8];
        for epoch in 0..100 {
            let order = s.epoch_order(epoch);
            for b in 0..s.n_batches() {
                let batch = s.batch(epoch, &order, b, 1);
                for (i, &user) in batch.users.iter().enumerate() {
                    for &n in &batch.negatives[i * 50..(i + 1) * 50] {
                        assert!(!csr.contains(user as usize, n as u32));
                        if user == 0 {
                            counts[n as usize] += 1;
                        }
                    }
                }
            }
        }
        let column: Vec<f64> = (0..8u32)
            .map(|i| rows.iter().filter(|r| r.contains(&i)).count() as f64 + 1.0)
            .collect();
        let allowed: f64 = (0..8)
            .filter(|i| ![5, 6].contains(i))
            .map(|i| column[i])
            .sum();
        let draws = counts.iter().sum::<usize>() as f64;
        for item in [0usize, 1, 2, 3, 4, 7] {
            let expected = draws * column[item] / allowed;
            assert!(
                (counts[item] as f64 - expected).abs() < 0.06 * expected,
                "{counts:?}"
            );
        }
        let bad = SamplerConfig {
            popularity_exponent: f32::NAN,
            ..s.config().clone()
        };
        let err = WarpSampler::new(csr, bad).unwrap_err().to_string();
        assert!(
            err.contains("popularity_exponent must be between 0 and 4"),
            "{err}"
        );
    }

    #[test]
    fn rejects_a_user_with_every_item() {
        let csr = Csr::from_rows(3, &[vec![0], vec![0, 1, 2]]).unwrap();
        let config = SamplerConfig {
            batch_size: 2,
            n_negatives: 3,
            seed: 0,
            check_negative: true,
            popularity_exponent: 0.0,
        };
        let err = WarpSampler::new(csr.clone(), config.clone()).unwrap_err();
        assert!(err.to_string().contains("user 1 has all 3 items"), "{err}");
        let unchecked = SamplerConfig {
            check_negative: false,
            popularity_exponent: 0.0,
            ..config
        };
        assert!(WarpSampler::new(csr, unchecked).is_ok());
    }

    #[test]
    fn rejects_bad_configuration() {
        let csr = Csr::from_rows(3, &[vec![0]]).unwrap();
        let base = SamplerConfig {
            batch_size: 2,
            n_negatives: 3,
            seed: 0,
            check_negative: true,
            popularity_exponent: 0.0,
        };
        let zero_batch = SamplerConfig {
            batch_size: 0,
            ..base.clone()
        };
        let err = WarpSampler::new(csr.clone(), zero_batch).unwrap_err();
        assert!(err
            .to_string()
            .contains("batch_size must be at least 1, got 0"));
        let zero_neg = SamplerConfig {
            n_negatives: 0,
            ..base.clone()
        };
        let err = WarpSampler::new(csr, zero_neg).unwrap_err();
        assert!(err
            .to_string()
            .contains("n_negatives must be at least 1, got 0"));
        let small = WarpSampler::new(Csr::from_rows(3, &[vec![0]]).unwrap(), base.clone()).unwrap();
        for bad in [0, MAX_PREFETCH + 1] {
            let err = check_prefetch(bad, &small).unwrap_err().to_string();
            assert!(err.contains("prefetch must be between 1 and 1024"), "{err}");
        }
        let huge = SamplerConfig {
            n_negatives: MAX_BATCH_DRAWS,
            ..base.clone()
        };
        let err =
            WarpSampler::new(Csr::from_rows(3, &[vec![0], vec![1]]).unwrap(), huge).unwrap_err();
        assert!(
            err.to_string().contains("2 pairs x 268435456 negatives"),
            "{err}"
        );
        let empty = Csr::from_rows(3, &[vec![], vec![]]).unwrap();
        let err = WarpSampler::new(empty, base).unwrap_err();
        assert!(err.to_string().contains("no interactions"));
    }

    #[test]
    fn stream_matches_direct_batches_across_epochs_and_restarts() {
        let s = Arc::new(sampler(&[vec![0, 2], vec![1], vec![3, 4, 5]], 10, 4, 9));
        let expected: Vec<Batch> = (0..3u64)
            .flat_map(|e| {
                let order = s.epoch_order(e);
                (0..2).map(move |b| (e, order.clone(), b))
            })
            .map(|(e, order, b)| s.batch(e, &order, b, 1))
            .collect();
        let mut stream = BatchStream::new(Arc::clone(&s), 0, Some(3), 2, 2);
        let mut got = Vec::new();
        while let Some(b) = stream.next_batch().unwrap() {
            got.push(b);
        }
        assert_eq!(got, expected);
        assert_eq!(stream.remaining(), Some(0));
        // A stream dropped midway and restarted from its position continues exactly.
        let mut first = BatchStream::new(Arc::clone(&s), 0, None, 1, 1);
        first.next_batch().unwrap();
        first.next_batch().unwrap();
        first.next_batch().unwrap();
        assert_eq!(first.position(), (1, 1));
        assert_eq!(first.next_batch().unwrap().unwrap(), expected[3]);
    }
}
