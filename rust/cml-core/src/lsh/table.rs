//! One LSH hash table: item slots sorted by bucket key, and an
//! open-addressing map from a bucket key to its run of slots, so a probe
//! costs one or two cache misses. Build O(n log n); memory 4n bytes of slots
//! plus 16 bytes per map entry at a load factor of at most 3/4.

use crate::csr::prefetch;
use crate::rng::mix64;

/// One hash table: item slots grouped by bucket, and a map from bucket key to its group.
#[derive(Clone, Debug, Default)]
pub(super) struct Table {
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
    pub(super) fn build(keys: &[u64]) -> Table {
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
    pub(super) fn bucket(&self, key: u64) -> &[u32] {
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
    pub(super) fn prefetch_key(&self, key: u64) {
        prefetch(&self.map[self.home_slot(key)]);
    }

    pub(super) fn memory_bytes(&self) -> usize {
        self.slots.len() * 4 + self.map.len() * std::mem::size_of::<Bucket>()
    }
}
