//! A byte-budgeted, sharded cache (RocksDB's block cache, in small): values are decoded row
//! groups of immutable files, so an entry never goes stale, it is only evicted or dropped when
//! its file leaves the table.
//!
//! Eviction is CLOCK (second chance), an LRU approximation that costs O(1) per hit and per
//! insert: a hit only sets a flag, and the hand clears flags until it finds an entry not used
//! since its last pass. Shards keep concurrent readers off each other's lock.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

const SHARDS: usize = 16;

/// Something that knows how much memory it holds.
pub trait Weighted {
    fn weight(&self) -> usize;
}

struct Slot<K, V> {
    key: K,
    value: Arc<V>,
    referenced: bool,
}

struct Shard<K, V> {
    map: HashMap<K, usize>,
    slots: Vec<Option<Slot<K, V>>>,
    free: Vec<usize>,
    hand: usize,
    bytes: usize,
}

impl<K: Hash + Eq + Clone, V: Weighted> Shard<K, V> {
    fn new() -> Self {
        Self {
            map: HashMap::new(),
            slots: Vec::new(),
            free: Vec::new(),
            hand: 0,
            bytes: 0,
        }
    }

    fn remove_slot(&mut self, i: usize) {
        if let Some(slot) = self.slots[i].take() {
            self.map.remove(&slot.key);
            self.bytes -= slot.value.weight();
            self.free.push(i);
        }
    }

    /// Evicts one entry other than `keep`; false if there is none.
    fn evict_one(&mut self, keep: usize) -> bool {
        if self.map.len() <= 1 {
            return false;
        }
        // Two sweeps at most: the first clears every flag it passes.
        for _ in 0..2 * self.slots.len() {
            let i = self.hand;
            self.hand = (self.hand + 1) % self.slots.len();
            if i == keep {
                continue;
            }
            match &mut self.slots[i] {
                Some(slot) if slot.referenced => slot.referenced = false,
                Some(_) => {
                    self.remove_slot(i);
                    return true;
                }
                None => {}
            }
        }
        false
    }
}

/// Hits, misses and bytes of a cache since it was made.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub inserts: u64,
    pub evictions: u64,
    pub bytes: u64,
    pub entries: u64,
}

pub struct ClockCache<K, V> {
    shards: Vec<Mutex<Shard<K, V>>>,
    hasher: RandomState,
    shard_budget: usize,
    hits: AtomicU64,
    misses: AtomicU64,
    inserts: AtomicU64,
    evictions: AtomicU64,
}

impl<K, V> std::fmt::Debug for ClockCache<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClockCache")
            .field("budget", &(self.shard_budget * SHARDS))
            .finish_non_exhaustive()
    }
}

impl<K: Hash + Eq + Clone, V: Weighted> ClockCache<K, V> {
    /// A cache of at most `budget` bytes (each shard keeps its newest entry even past its
    /// share, so a budget below one entry still serves the entry just loaded).
    pub fn new(budget: usize) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::new())).collect(),
            hasher: RandomState::new(),
            shard_budget: budget / SHARDS,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            inserts: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
        }
    }

    fn shard(&self, key: &K) -> MutexGuard<'_, Shard<K, V>> {
        let i = (self.hasher.hash_one(key) as usize) % SHARDS;
        self.shards[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub fn get(&self, key: &K) -> Option<Arc<V>> {
        let mut shard = self.shard(key);
        let found = shard.map.get(key).copied().and_then(|i| {
            let slot = shard.slots[i].as_mut()?;
            slot.referenced = true;
            Some(slot.value.clone())
        });
        drop(shard);
        let counter = if found.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// Inserts `value` unless the key is cached already; returns the cached value.
    pub fn insert(&self, key: K, value: Arc<V>) -> Arc<V> {
        let mut shard = self.shard(&key);
        if let Some(existing) = shard.map.get(&key).and_then(|&i| shard.slots[i].as_ref()) {
            return existing.value.clone();
        }
        let slot = Slot {
            key: key.clone(),
            value: value.clone(),
            referenced: false,
        };
        let i = match shard.free.pop() {
            Some(i) => {
                shard.slots[i] = Some(slot);
                i
            }
            None => {
                shard.slots.push(Some(slot));
                shard.slots.len() - 1
            }
        };
        shard.map.insert(key, i);
        shard.bytes += value.weight();
        let mut evicted = 0;
        while shard.bytes > self.shard_budget && shard.evict_one(i) {
            evicted += 1;
        }
        drop(shard);
        self.inserts.fetch_add(1, Ordering::Relaxed);
        self.evictions.fetch_add(evicted, Ordering::Relaxed);
        value
    }

    /// Drops every entry `doomed` says so of (their files left the table).
    pub fn remove_where(&self, doomed: impl Fn(&K) -> bool) {
        for shard in &self.shards {
            let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            let gone: Vec<usize> = shard
                .map
                .iter()
                .filter(|(k, _)| doomed(k))
                .map(|(_, &i)| i)
                .collect();
            for i in gone {
                shard.remove_slot(i);
            }
        }
    }

    pub fn contains(&self, key: &K) -> bool {
        self.shard(key).map.contains_key(key)
    }

    pub fn stats(&self) -> CacheStats {
        let (mut bytes, mut entries) = (0u64, 0u64);
        for shard in &self.shards {
            let shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            bytes += shard.bytes as u64;
            entries += shard.map.len() as u64;
        }
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            inserts: self.inserts.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            bytes,
            entries,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Sized(usize);
    impl Weighted for Sized {
        fn weight(&self) -> usize {
            self.0
        }
    }

    #[test]
    fn stays_within_budget_and_keeps_what_is_used() {
        let cache: ClockCache<u32, Sized> = ClockCache::new(SHARDS * 300);
        for k in 0..10_000u32 {
            cache.insert(k, Arc::new(Sized(100)));
            // Key 7 is used all the time: CLOCK must keep it.
            assert!(k < 7 || cache.get(&7).is_some(), "hot key evicted at {k}");
        }
        let s = cache.stats();
        assert!(s.bytes <= (SHARDS * 300) as u64, "{s:?}");
        assert!(s.evictions > 9_000, "{s:?}");
        assert_eq!(s.inserts, 10_000);
    }

    #[test]
    fn a_budget_below_one_entry_still_serves_the_newest() {
        let cache: ClockCache<u32, Sized> = ClockCache::new(0);
        cache.insert(1, Arc::new(Sized(100)));
        assert!(cache.get(&1).is_some());
        let before = cache.stats();
        assert_eq!((before.hits, before.misses), (1, 0));
        assert!(cache.get(&2).is_none());
        assert_eq!(cache.stats().misses, 1);
    }

    #[test]
    fn remove_where_drops_bytes_too() {
        let cache: ClockCache<u32, Sized> = ClockCache::new(1 << 20);
        for k in 0..100u32 {
            cache.insert(k, Arc::new(Sized(10)));
        }
        cache.remove_where(|k| k % 2 == 0);
        let s = cache.stats();
        assert_eq!((s.entries, s.bytes), (50, 500));
        assert!(cache.get(&2).is_none() && cache.get(&3).is_some());
    }
}
