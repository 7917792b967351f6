//! Process-wide counters for operators (Prometheus, through the bindings' `metrics_snapshot`).
//!
//! Recording is a handful of relaxed atomic adds; everything that costs more (summing caches,
//! reading clocks of cached tables, building labels) happens only when a scrape asks for a
//! [`Snapshot`]. Counters that already exist elsewhere are not counted twice: the block
//! cache's hits and misses and the storage byte counters are read from each live store, and
//! folded into `retired` when a store is dropped so that totals never go down.
//!
//! Per-table series are keyed by the table's qualified name (`namespace.table`): stores of
//! several configurations in one process that serve the same name add up.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, PoisonError, RwLock};
use std::time::Duration;

use crate::catalog::TableId;
use crate::read::DataFiles;
use crate::storage::IoStats;
use crate::table::TableState;

/// Upper bounds (seconds) of the read-latency histogram: a cached read takes well under a
/// millisecond, a cold one on object storage tens of milliseconds, a timeout seconds.
pub const READ_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Turns per-read and per-commit recording on or off (the bench compares both); returns the
/// previous setting. Counters of the caches and storage are always kept.
pub fn set_enabled(on: bool) -> bool {
    ENABLED.swap(on, Ordering::Relaxed)
}

fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// How one commit attempt through the catalog ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Commit {
    Committed,
    /// Another writer won the race.
    Conflict,
    /// The catalog's answer was lost and reconciling could not tell (REST 5xx).
    Unknown,
    Error,
}

impl Commit {
    const ALL: [Commit; 4] = [
        Commit::Committed,
        Commit::Conflict,
        Commit::Unknown,
        Commit::Error,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Commit::Committed => "committed",
            Commit::Conflict => "conflict",
            Commit::Unknown => "unknown",
            Commit::Error => "error",
        }
    }
}

/// Counters of one table.
#[derive(Debug, Default)]
struct TableCounters {
    /// Reads per latency bucket (not cumulative); the last slot is above every bound.
    read_buckets: [AtomicU64; READ_BUCKETS.len() + 1],
    read_nanos: AtomicU64,
    read_keys: AtomicU64,
    read_errors: AtomicU64,
    commits: [AtomicU64; Commit::ALL.len()],
    commit_retries: AtomicU64,
    cleanup_failures: AtomicU64,
}

static TABLES: LazyLock<RwLock<HashMap<String, Arc<TableCounters>>>> =
    LazyLock::new(|| RwLock::new(HashMap::new()));

thread_local! {
    /// The label being looked up, reused so that a read allocates nothing to find its table.
    static LABEL: RefCell<String> = const { RefCell::new(String::new()) };
}

/// Runs `f` on the counters of `namespace.name`, creating them on first use.
fn with_table(namespace: &str, name: &str, f: impl FnOnce(&TableCounters)) {
    LABEL.with_borrow_mut(|label| {
        label.clear();
        label.push_str(namespace);
        label.push('.');
        label.push_str(name);
        let found = TABLES
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(label.as_str())
            .cloned();
        let counters = found.unwrap_or_else(|| {
            TABLES
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(label.clone())
                .or_default()
                .clone()
        });
        f(&counters);
    });
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

/// One `Store::read` of `keys` keys of `namespace.name` took `elapsed`.
pub fn read_done(namespace: &str, name: &str, keys: usize, elapsed: Duration, ok: bool) {
    if !enabled() {
        return;
    }
    let seconds = elapsed.as_secs_f64();
    let slot = READ_BUCKETS.partition_point(|&bound| bound < seconds);
    with_table(namespace, name, |t| {
        bump(&t.read_buckets[slot], 1);
        bump(
            &t.read_nanos,
            u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX),
        );
        bump(&t.read_keys, keys as u64);
        if !ok {
            bump(&t.read_errors, 1);
        }
    });
}

/// A commit attempt on `table` ended as `outcome`.
pub fn commit_done(table: &TableId, outcome: Commit) {
    if enabled() {
        with_table(&table.namespace, &table.name, |t| {
            bump(&t.commits[outcome as usize], 1);
        });
    }
}

/// A commit on `table` lost a race and is planned again.
pub fn commit_retried(table: &TableId) {
    if enabled() {
        with_table(&table.namespace, &table.name, |t| {
            bump(&t.commit_retries, 1)
        });
    }
}

/// `n` files of `table` (shown as `namespace.name`) that should have been deleted were not,
/// or a cleanup step was skipped: they stay as orphans. Counted whether or not recording is
/// on, since failures are rare and an operator alerts on them.
pub fn cleanup_failed(table: &dyn std::fmt::Display, n: usize) {
    let label = table.to_string();
    let (namespace, name) = label.rsplit_once('.').unwrap_or(("", label.as_str()));
    with_table(namespace, name, |t| bump(&t.cleanup_failures, n as u64));
}

// ---- stores ---------------------------------------------------------------------------------

/// What a live store contributes to a snapshot.
struct Source {
    pid: u32,
    io: Arc<IoStats>,
    files: Arc<DataFiles>,
    tables: Arc<Mutex<HashMap<TableId, Arc<TableState>>>>,
}

#[derive(Default)]
struct Sources {
    next_id: u64,
    live: HashMap<u64, Source>,
    /// Counter totals of stores that were dropped.
    retired: StoreTotals,
}

static SOURCES: LazyLock<Mutex<Sources>> = LazyLock::new(|| Mutex::new(Sources::default()));

fn sources() -> std::sync::MutexGuard<'static, Sources> {
    SOURCES.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Keeps a store in the snapshots while it lives; dropping it retires the store's counters.
#[derive(Debug)]
pub struct Registration(u64);

/// Makes a store's caches, storage counters and cached tables part of every snapshot.
pub fn register(
    io: Arc<IoStats>,
    files: Arc<DataFiles>,
    tables: Arc<Mutex<HashMap<TableId, Arc<TableState>>>>,
) -> Registration {
    let mut s = sources();
    s.next_id += 1;
    let id = s.next_id;
    let pid = std::process::id();
    s.live.insert(
        id,
        Source {
            pid,
            io,
            files,
            tables,
        },
    );
    Registration(id)
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut s = sources();
        if let Some(source) = s.live.remove(&self.0)
            && source.pid == std::process::id()
        {
            // Under the same lock as a snapshot, so a scrape sees the store either live or
            // retired, never neither.
            let totals = StoreTotals::of(&source);
            s.retired.add(&totals);
        }
    }
}

/// Monotonic counters of stores: block cache and storage reads.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StoreTotals {
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub cache_inserts: u64,
    pub cache_evictions: u64,
    /// (bytes, requests) of metadata, data read for requests, and background prefetch.
    pub metadata: (u64, u64),
    pub data: (u64, u64),
    pub prefetch: (u64, u64),
}

impl StoreTotals {
    fn of(source: &Source) -> Self {
        let blocks = source.files.stats().blocks;
        Self {
            cache_hits: blocks.hits,
            cache_misses: blocks.misses,
            cache_inserts: blocks.inserts,
            cache_evictions: blocks.evictions,
            metadata: source.io.metadata.total(),
            data: source.io.data.total(),
            prefetch: source.io.prefetch.total(),
        }
    }

    fn add(&mut self, o: &Self) {
        let pair = |a: &mut (u64, u64), b: (u64, u64)| {
            a.0 += b.0;
            a.1 += b.1;
        };
        self.cache_hits += o.cache_hits;
        self.cache_misses += o.cache_misses;
        self.cache_inserts += o.cache_inserts;
        self.cache_evictions += o.cache_evictions;
        pair(&mut self.metadata, o.metadata);
        pair(&mut self.data, o.data);
        pair(&mut self.prefetch, o.prefetch);
    }
}

// ---- snapshots ------------------------------------------------------------------------------

/// One table's series.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct TableSnapshot {
    /// Reads per bucket of [`READ_BUCKETS`], not cumulative; one more slot for the rest.
    pub read_buckets: Vec<u64>,
    pub read_seconds: f64,
    pub read_keys: u64,
    pub read_errors: u64,
    /// Per outcome label.
    pub commits: Vec<(&'static str, u64)>,
    pub commit_retries: u64,
    pub cleanup_failures: u64,
    /// Of the stores that have the table cached: the longest time since the state they serve
    /// was confirmed current (what the next read may serve), and the data and delete files of
    /// the most recently confirmed state.
    pub staleness_seconds: Option<f64>,
    pub data_files: Option<u64>,
    pub delete_files: Option<u64>,
}

/// Everything a scrape reports, for the whole process.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Snapshot {
    pub stores: u64,
    pub totals: StoreTotals,
    pub cache_bytes: u64,
    pub cache_entries: u64,
    pub index_bytes: u64,
    pub tables: BTreeMap<String, TableSnapshot>,
}

fn load(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

impl TableSnapshot {
    fn of(t: &TableCounters) -> Self {
        Self {
            read_buckets: t.read_buckets.iter().map(load).collect(),
            read_seconds: load(&t.read_nanos) as f64 / 1e9,
            read_keys: load(&t.read_keys),
            read_errors: load(&t.read_errors),
            commits: Commit::ALL
                .iter()
                .map(|c| (c.label(), load(&t.commits[*c as usize])))
                .collect(),
            commit_retries: load(&t.commit_retries),
            cleanup_failures: load(&t.cleanup_failures),
            ..Self::default()
        }
    }

    /// Folds in one store's cached state of the table.
    fn observe(&mut self, state: &TableState) {
        let age = state.checked_at.elapsed().as_secs_f64();
        let freshest = self.staleness_seconds.is_none_or(|s| age <= s);
        self.staleness_seconds = Some(self.staleness_seconds.map_or(age, |s| s.max(age)));
        if freshest || self.data_files.is_none() {
            self.data_files = Some(state.files.data.len() as u64);
            self.delete_files = Some(state.files.delete_files as u64);
        }
    }
}

/// The process's metrics now. Stores inherited through `fork()` are skipped: their locks may
/// have been held by threads that do not exist in this process.
pub fn snapshot() -> Snapshot {
    let mut out = Snapshot::default();
    for (label, t) in TABLES.read().unwrap_or_else(PoisonError::into_inner).iter() {
        out.tables.insert(label.clone(), TableSnapshot::of(t));
    }
    let s = sources();
    out.totals = s.retired;
    let pid = std::process::id();
    for source in s.live.values().filter(|s| s.pid == pid) {
        out.stores += 1;
        out.totals.add(&StoreTotals::of(source));
        let files = source.files.stats();
        out.cache_bytes += files.blocks.bytes;
        out.cache_entries += files.blocks.entries;
        out.index_bytes += files.index_bytes;
        let tables = source.tables.lock().unwrap_or_else(PoisonError::into_inner);
        for (id, state) in tables.iter() {
            // A table only cached (no read or commit counted yet) still has every bucket.
            out.tables
                .entry(id.to_string())
                .or_insert_with(|| TableSnapshot {
                    read_buckets: vec![0; READ_BUCKETS.len() + 1],
                    ..TableSnapshot::default()
                })
                .observe(state);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(label: &str) -> TableSnapshot {
        snapshot().tables.remove(label).unwrap_or_default()
    }

    #[test]
    fn reads_land_in_their_latency_bucket() {
        let before = table("m_ns.reads");
        read_done("m_ns", "reads", 3, Duration::from_micros(300), true);
        read_done("m_ns", "reads", 1, Duration::from_micros(500), true);
        read_done("m_ns", "reads", 1, Duration::from_secs(30), false);
        let after = table("m_ns.reads");
        let moved: Vec<u64> = after
            .read_buckets
            .iter()
            .zip(before.read_buckets.iter().chain(std::iter::repeat(&0)))
            .map(|(a, b)| a - b)
            .collect();
        // 300 us falls in (250 us, 500 us], so does 500 us (a bound is inclusive), 30 s above all.
        assert_eq!(moved[2], 2, "{moved:?}");
        assert_eq!(moved[READ_BUCKETS.len()], 1, "{moved:?}");
        assert_eq!(moved.iter().sum::<u64>(), 3);
        assert_eq!(after.read_keys - before.read_keys, 5);
        assert_eq!(after.read_errors - before.read_errors, 1);
        assert!((after.read_seconds - before.read_seconds - 30.0008).abs() < 1e-6);
    }

    #[test]
    fn commits_retries_and_cleanup_failures_count_per_table() {
        let id = TableId {
            namespace: "m_ns.deep".into(),
            name: "commits".into(),
        };
        commit_done(&id, Commit::Conflict);
        commit_done(&id, Commit::Committed);
        commit_retried(&id);
        cleanup_failed(&id, 2);
        let t = table("m_ns.deep.commits");
        assert_eq!(
            t.commits,
            vec![
                ("committed", 1),
                ("conflict", 1),
                ("unknown", 0),
                ("error", 0)
            ]
        );
        assert_eq!((t.commit_retries, t.cleanup_failures), (1, 2));
    }

    #[test]
    fn a_dropped_store_keeps_its_counts_in_the_totals() {
        let io = Arc::new(IoStats::default());
        let files = Arc::new(DataFiles::new(1 << 20));
        let reg = register(io.clone(), files, Arc::default());
        io.data.add(1000);
        let live = snapshot().totals.data;
        drop(reg);
        let retired = snapshot().totals.data;
        // Other tests may read concurrently; this store's 1000 bytes must not vanish.
        assert!(
            retired.0 >= live.0 && retired.1 >= live.1,
            "{live:?} -> {retired:?}"
        );
        io.reset();
        assert!(snapshot().totals.data.0 >= live.0);
    }
}
