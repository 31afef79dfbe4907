//! Bucket keys and query-directed multi-probe (Lv et al. 2007).
//!
//! A table's bucket key is the wrapping sum of one hash per (coordinate, slot),
//! so moving one coordinate of the hash tuple by -1 or +1 shifts the key by a
//! difference computed once per query. A move of coordinate i by -1 costs
//! `f_i^2` and by +1 `(1 - f_i)^2`, `f_i` the query's fractional position in
//! its slot; a min-heap over (table, set of moves) enumerates probes in
//! increasing total cost across all tables, by the shift/expand generation
//! over each table's 2k single moves sorted by cost. Cost per probe:
//! O(log heap + moves in the set).

use crate::rng::mix64;
use std::collections::BinaryHeap;

/// The hash of one coordinate's slot. A bucket key is the wrapping sum of
/// its coordinates' slot hashes, so moving a coordinate by +-1 shifts the key by
/// a difference computed once per query, and a probe's key costs one addition
/// per moved coordinate.
#[inline]
pub(super) fn slot_hash(coordinate: usize, slot: i32) -> u64 {
    mix64(((coordinate as u64) << 32 | slot as u32 as u64) ^ 0x243F_6A88_85A3_08D3)
}

/// The slot of a projection in slot units: floor, without the libm call that
/// `f32::floor` compiles to on baseline x86-64 (projections are far inside i32).
#[inline(always)]
pub(super) fn slot_of(projection: f32) -> i32 {
    let truncated = projection as i32;
    truncated - ((truncated as f32) > projection) as i32
}

/// The bucket key of the slots of one table's hashes.
#[inline]
pub(super) fn bucket_key(slots: impl Iterator<Item = i32>) -> u64 {
    slots.enumerate().fold(0u64, |key, (coordinate, slot)| {
        key.wrapping_add(slot_hash(coordinate, slot))
    })
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
pub(super) struct ProbeSequence {
    base_keys: Vec<u64>,
    /// Per table, the 2k single moves sorted by cost.
    moves: Vec<Move>,
    heap: BinaryHeap<ProbeSet>,
}

impl ProbeSequence {
    /// Calls `visit(table, key)` (which returns false to stop) for each table's own bucket, then for the
    /// cheapest perturbed buckets over all tables, `probes` buckets in all.
    /// A move of coordinate i by -1 costs `f_i^2` and by +1 `(1 - f_i)^2`,
    /// `f_i` the query's fractional position in slot i.
    pub(super) fn for_each_probe(
        &mut self,
        projected: &[f32],
        n_hashes: usize,
        tables: usize,
        probes: usize,
        visit: &mut impl FnMut(usize, u64) -> bool,
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
            if !visit(t, self.base_keys[t]) {
                return;
            }
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
                if !visit(table, key) {
                    return;
                }
                emitted += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        ProbeSequence::default().for_each_probe(&projected, 3, 2, 30, &mut |t, key| {
            emitted.push((t, key));
            true
        });
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
}
