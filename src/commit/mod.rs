//! The one commit protocol, used by every writer (upserts, group commits, staged distributed
//! writes, compaction, table creation and evolution, expiry):
//!
//! 1. plan on the current table state: write the data and delete files of each touched bucket;
//! 2. prepare: write the manifests and manifest list, build the next metadata (`snapshot`);
//! 3. commit: swap the metadata pointer through the catalog, atomically;
//! 4. reconcile an unknown outcome (REST 5xx, a lost connection): reload, and if the catalog
//!    names our snapshot, it landed;
//! 5. on a conflict, reload and *rebase*: a bucket whose files the winning commit did not touch
//!    keeps its prepared files (only the manifests and metadata are rebuilt); only buckets that
//!    really changed are planned again. Retries back off with jitter;
//! 6. clean up: files of an attempt that cannot land are deleted; files of an attempt whose
//!    outcome is unknown are kept (the catalog may still apply it), orphans at worst.
//!
//! A commit that returns has landed in the catalog: nothing is acknowledged before that.

mod claim;
mod snapshot;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Display;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use iceberg::TableUpdate;
use iceberg::io::FileIO;
use iceberg::spec::DataFile;

pub use snapshot::{Changes, MAX_MANIFESTS, NewManifests, PreparedCommit, prepare};

use claim::{CLAIM_AFTER, Claim};

use crate::catalog::{CommitLock, CommitOutcome, TableId};
use crate::error::{Error, Result};
use crate::metrics;
use crate::store::Store;
use crate::table::{LiveFile, TableState};

/// Whether a commit is now the table's current state.
#[derive(Debug)]
pub enum Landed {
    Yes(Arc<TableState>),
    /// Another writer won; our files are ours alone and may be deleted.
    Conflict,
    /// Not visible after reconciling, yet the catalog may still apply it: keep our files. The
    /// catalog's message, for the error if no later attempt lands.
    Unknown(String),
}

/// Commits a prepared metadata version through the catalog, reconciling an unknown outcome:
/// if the catalog now names our snapshot, it landed.
pub async fn commit(
    store: &Store,
    base: &TableState,
    prepared: &PreparedCommit,
    lock: Option<CommitLock>,
) -> Result<Landed> {
    let landed = commit_uncounted(store, base, prepared, lock).await;
    let outcome = match &landed {
        Ok(Landed::Yes(_)) => metrics::Commit::Committed,
        Ok(Landed::Conflict) => metrics::Commit::Conflict,
        Ok(Landed::Unknown(_)) => metrics::Commit::Unknown,
        Err(_) => metrics::Commit::Error,
    };
    metrics::commit_done(&base.id, outcome);
    landed
}

async fn commit_uncounted(
    store: &Store,
    base: &TableState,
    prepared: &PreparedCommit,
    lock: Option<CommitLock>,
) -> Result<Landed> {
    let catalog = store.catalog().await?;
    let loaded = match catalog.commit(base, prepared, &store.file_io, lock).await? {
        CommitOutcome::Committed(loaded) => loaded,
        CommitOutcome::Conflict => return Ok(Landed::Conflict),
        CommitOutcome::Unknown(why) => {
            let now = store.current(&base.id, Duration::ZERO).await?;
            let ours = prepared
                .snapshot_id
                .is_some_and(|id| now.metadata.snapshot_by_id(id).is_some());
            return Ok(if ours {
                Landed::Yes(now)
            } else {
                Landed::Unknown(why)
            });
        }
    };
    // The files of our own snapshot are known: no need to read its manifests back, unless
    // the catalog made something else of it.
    let known = prepared.files.clone().filter(|_| {
        loaded
            .metadata
            .as_ref()
            .is_some_and(|md| md.current_snapshot_id() == prepared.metadata.current_snapshot_id())
    });
    Ok(Landed::Yes(store.installed(&base.id, loaded, known).await?))
}

/// Waits for the catalog's commit lock of the table (None: optimistic commits only).
async fn lock(store: &Store, id: &TableId) -> Result<Option<CommitLock>> {
    store.catalog().await?.lock(id).await
}

/// The table's commit lock: taken at once if free, else `while_waiting` runs first and the
/// lock is waited for.
async fn lock_or(
    store: &Store,
    id: &TableId,
    while_waiting: impl FnOnce(),
) -> Result<Option<CommitLock>> {
    let catalog = store.catalog().await?;
    match catalog.try_lock(id).await? {
        Some(held) => Ok(held),
        None => {
            while_waiting();
            catalog.lock(id).await
        }
    }
}

/// Ends a commit lock that no commit ended.
async fn unlock(store: &Store, lock: Option<CommitLock>) {
    if let (Some(lock), Ok(catalog)) = (lock, store.catalog().await) {
        catalog.unlock(lock).await;
    }
}

/// Jittered exponential backoff before attempt `attempt + 1`: 5 ms doubling to 1 s, times
/// 0.5-1.5. Short at first because most conflicts rebase without re-planning.
pub fn backoff(attempt: u32) -> Duration {
    let base = 5u64.saturating_mul(1 << attempt.min(8)).min(1000);
    Duration::from_millis(base / 2 + fastrand::u64(0..=base))
}

/// The error once every attempt failed: a conflict, or, when the last attempt's outcome was
/// unknown, that, with the catalog's message.
fn gave_up(id: &TableId, attempts: u32, unknown: Option<String>) -> Error {
    match unknown {
        Some(detail) => Error::CommitUnknown {
            table: id.to_string(),
            attempts,
            detail,
        },
        None => Error::CommitConflict {
            table: id.to_string(),
            attempts,
        },
    }
}

/// Best-effort deletion of files of `table` nobody references; returns how many were deleted.
/// A failure leaves an orphan for `remove-orphans`, never a broken table, and is logged as a
/// warning naming the table and the file, so orphans never pile up without a trace.
pub async fn delete_quietly(
    file_io: &FileIO,
    table: &(dyn Display + Sync),
    paths: &[String],
) -> usize {
    let deletes = paths.iter().map(|p| async move {
        match file_io.delete(p).await {
            Ok(()) => true,
            Err(e) => {
                log::warn!(
                    "table {table}: could not delete {p}, left as an orphan for `feast-iceberg \
                     remove-orphans`: {e}"
                );
                metrics::cleanup_failed(table, 1);
                false
            }
        }
    });
    futures::future::join_all(deletes)
        .await
        .into_iter()
        .filter(|ok| *ok)
        .count()
}

// ---- metadata-only commits ------------------------------------------------------------------

/// What a metadata-only commit does on the state it is given.
pub enum Step<T> {
    /// Nothing to commit: the answer.
    Done(T),
    /// Commit these changes; the answer once they land.
    Commit(Changes, T),
}

/// Commits a change that writes no data (schema evolution, expiry): `step` builds it on the
/// current state and is asked again after every conflict.
pub async fn metadata_commit<T>(
    store: &Store,
    id: &TableId,
    mut step: impl FnMut(&Arc<TableState>) -> Result<Step<T>>,
) -> Result<T> {
    let attempts = store.config.commit_max_retries + 1;
    let mut unknown = None;
    for attempt in 1..=attempts {
        let held = lock(store, id).await?;
        let planned = async {
            let state = store.current(id, Duration::ZERO).await?;
            let (changes, answer) = match step(&state)? {
                Step::Done(answer) => return Ok(Err(answer)),
                Step::Commit(changes, answer) => (changes, answer),
            };
            let write_metadata = !store.catalog().await?.owns_metadata_files();
            let prepared = prepare(&store.file_io, &state, changes, None, write_metadata).await?;
            if let Err(e) = crate::storage::sync_files(prepared.written.iter().cloned()).await {
                delete_quietly(&store.file_io, id, &prepared.written).await;
                return Err(e);
            }
            Ok(Ok((state, prepared, answer)))
        };
        let (state, prepared, answer) = match planned.await {
            Ok(Ok(ready)) => ready,
            Ok(Err(answer)) => {
                unlock(store, held).await;
                return Ok(answer);
            }
            Err(e) => {
                unlock(store, held).await;
                return Err(e);
            }
        };
        match commit(store, &state, &prepared, held).await? {
            Landed::Yes(new_state) => {
                store
                    .after_commit(&state, &new_state, &prepared, &prepared.expired_snapshots)
                    .await;
                return Ok(answer);
            }
            Landed::Conflict => {
                unknown = None;
                delete_quietly(&store.file_io, id, &prepared.written).await;
            }
            Landed::Unknown(why) => unknown = Some(why),
        }
        if attempt < attempts {
            metrics::commit_retried(id);
            tokio::time::sleep(backoff(attempt)).await;
        }
    }
    Err(gave_up(id, attempts, unknown))
}

// ---- data commits, bucket by bucket ---------------------------------------------------------

/// The files of one bucket as a change was planned on them: data and delete file paths. The
/// change stays valid on any later state whose bucket holds exactly these files.
pub type BucketBase = BTreeSet<String>;

/// The bucket's files in `state`.
pub fn bucket_base(state: &TableState, bucket: i32) -> BucketBase {
    state
        .files
        .files_for_bucket(bucket)
        .chain(state.files.deletes_for_bucket(bucket))
        .map(|f| f.path().to_string())
        .collect()
}

/// One bucket's part of a data commit, planned on `base`.
#[derive(Debug, Clone, Default)]
pub struct BucketChange {
    pub bucket: i32,
    pub base: BucketBase,
    /// The partition spec its files were written in.
    pub spec_id: i32,
    pub added: Vec<DataFile>,
    /// Data files of `base` the change replaces.
    pub removed: Vec<String>,
    pub added_deletes: Vec<DataFile>,
    /// Delete files of `base` the change drops (their bucket was rewritten).
    pub removed_deletes: Vec<String>,
    /// Incoming rows that replaced or added a key, and those older than the stored row.
    pub written: usize,
    pub ignored_older: usize,
    /// Which incoming rows (indices into the writer's batch) were older, when it knows.
    pub ignored_rows: Vec<usize>,
    pub merge_on_read: bool,
}

impl BucketChange {
    /// Paths of the files this change wrote.
    pub fn written_paths(&self) -> impl Iterator<Item = String> + '_ {
        self.added
            .iter()
            .chain(&self.added_deletes)
            .map(|d| d.file_path().to_string())
    }

    fn changes_files(&self) -> bool {
        !self.added.is_empty() || !self.removed.is_empty()
    }
}

/// A writer's side of a data commit: it writes the files of the buckets it touches.
#[async_trait]
pub trait Planner: Send {
    /// Plans on `state` every bucket the writer touches (`again` None), or again the buckets
    /// of `again`, changes planned before that no longer fit (their files still exist; the
    /// caller deletes them afterwards). Writes the files and describes them. On an error,
    /// files it wrote are deleted.
    async fn plan(
        &mut self,
        state: &Arc<TableState>,
        again: Option<&[BucketChange]>,
    ) -> Result<Vec<BucketChange>>;

    /// True for a compaction: the snapshot is a `replace`, the rows stay the same.
    fn compaction(&self) -> bool {
        false
    }

    /// Metadata changes that land with the data (a new partition spec), built on `state`.
    fn updates(&self, _state: &TableState) -> Result<Vec<TableUpdate>> {
        Ok(Vec::new())
    }

    /// True when `state` can take the changes planned on `planned_on` bucket by bucket; false
    /// re-plans everything (the schema or the partitioning moved).
    fn rebases_onto(&self, planned_on: &TableState, state: &TableState) -> bool {
        planned_on.metadata.current_schema_id() == state.metadata.current_schema_id()
            && planned_on.metadata.default_partition_spec_id()
                == state.metadata.default_partition_spec_id()
    }
}

/// Where a data commit's time went, in microseconds, summed over its attempts.
#[derive(Debug, Default, Clone, Copy)]
pub struct Timings {
    /// Loading the table state (a catalog lookup; metadata and manifests when they moved).
    pub state_us: u64,
    /// Planning: reading what the buckets hold, writing data and delete files.
    pub plan_us: u64,
    /// Writing the manifests and manifest list, building the metadata.
    pub prepare_us: u64,
    /// The catalog commit (for SQL catalogs: writing metadata.json, then the swap).
    pub catalog_us: u64,
    /// After the commit: expired snapshots' files and old metadata deleted.
    pub cleanup_us: u64,
}

fn micros(since: std::time::Instant) -> u64 {
    u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// A data commit that landed.
#[derive(Debug, Default)]
pub struct Committed {
    pub snapshot_id: Option<i64>,
    pub attempts: u32,
    /// The bucket changes committed (or, when nothing needed a snapshot, planned).
    pub changes: Vec<BucketChange>,
    /// Buckets planned again because another writer changed them after they were planned.
    pub replanned: usize,
    /// Times the change was carried onto a newer table state (another writer committed
    /// first) keeping its files, if only for some buckets.
    pub rebases: u32,
    pub timings: Timings,
}

/// Buckets whose planned change no longer fits `state`.
fn stale(changes: &BTreeMap<i32, BucketChange>, state: &TableState) -> BTreeSet<i32> {
    changes
        .values()
        .filter(|c| bucket_base(state, c.bucket) != c.base)
        .map(|c| c.bucket)
        .collect()
}

/// The snapshot changes of `planned` on `state`: removed paths resolved to `state`'s files.
fn snapshot_changes(
    store: &Store,
    state: &TableState,
    planned: &BTreeMap<i32, BucketChange>,
    planner: &dyn Planner,
) -> Result<Changes> {
    let live: HashMap<&str, &Arc<LiveFile>> = state
        .files
        .data
        .iter()
        .chain(&state.files.deletes)
        .map(|f| (f.path(), f))
        .collect();
    let resolve = |paths: &[String]| -> Result<Vec<Arc<LiveFile>>> {
        paths
            .iter()
            .map(|p| {
                live.get(p.as_str()).map(|f| (*f).clone()).ok_or_else(|| {
                    Error::internal(format!("a rebased change removes {p}, not in the table"))
                })
            })
            .collect()
    };
    let mut changes = Changes {
        compaction: planner.compaction(),
        expire: store.expirable(&state.metadata, true),
        updates: planner.updates(state)?,
        ..Changes::default()
    };
    for c in planned.values() {
        if c.changes_files() {
            changes.buckets_changed += 1;
        }
        if !c.added.is_empty() || !c.added_deletes.is_empty() {
            // One spec for every file added: `prepare` checks it is the table's.
            if changes
                .added_spec
                .replace(c.spec_id)
                .is_some_and(|s| s != c.spec_id)
            {
                return Err(Error::internal(
                    "one commit adds files written in different partition specs",
                ));
            }
        }
        changes.added.extend(c.added.iter().cloned());
        changes
            .added_deletes
            .extend(c.added_deletes.iter().cloned());
        changes.removed.extend(resolve(&c.removed)?);
        changes.removed_deletes.extend(resolve(&c.removed_deletes)?);
    }
    Ok(changes)
}

/// Removes from `planned` the changes that no longer fit `state` (every change, when the writer
/// cannot rebase onto it) and returns them.
fn take_stale(
    planner: &dyn Planner,
    planned: &mut BTreeMap<i32, BucketChange>,
    planned_on: &TableState,
    state: &TableState,
) -> Vec<BucketChange> {
    let buckets: Vec<i32> = if planner.rebases_onto(planned_on, state) {
        stale(planned, state).into_iter().collect()
    } else {
        planned.keys().copied().collect()
    };
    buckets.iter().filter_map(|b| planned.remove(b)).collect()
}

/// Makes files durable before the catalog points at them. The syncs of what a writer wrote
/// before the commit lock (data and delete files, the manifests of the added files) start
/// then and run while it waits for the lock and prepares; only what is written under the
/// lock (manifest list, metadata.json) is synced there, in the same wait.
#[derive(Default)]
struct Durable {
    /// Synced, or being synced by `pending`.
    started: HashSet<String>,
    pending: Vec<tokio::task::JoinHandle<Result<()>>>,
}

impl Durable {
    fn start(&mut self, paths: impl IntoIterator<Item = String>) {
        let fresh: Vec<String> = paths
            .into_iter()
            .filter(|p| self.started.insert(p.clone()))
            .collect();
        if !fresh.is_empty() {
            self.pending
                .push(tokio::spawn(crate::storage::sync_files(fresh)));
        }
    }

    /// Returns once `paths` and every path started before are durable.
    async fn wait(&mut self, paths: impl IntoIterator<Item = String>) -> Result<()> {
        self.start(paths);
        let mut failed = None;
        for task in std::mem::take(&mut self.pending) {
            let done = task
                .await
                .map_err(|e| Error::internal(format!("sync task failed: {e}")))
                .and_then(|synced| synced);
            if let Err(e) = done {
                failed.get_or_insert(e);
            }
        }
        failed.map_or(Ok(()), Err)
    }
}

/// The data and delete files `planned` adds.
fn added_files(planned: &BTreeMap<i32, BucketChange>) -> (Vec<DataFile>, Vec<DataFile>) {
    let added = planned.values().flat_map(|c| c.added.iter().cloned());
    let deletes = planned
        .values()
        .flat_map(|c| c.added_deletes.iter().cloned());
    (added.collect(), deletes.collect())
}

/// Makes `ahead` the manifests of the files `planned` adds on top of `state`: kept if they
/// still fit, else written again (the stale ones deleted unless `keep`).
async fn manifests_ahead(
    store: &Store,
    state: &TableState,
    planned: &BTreeMap<i32, BucketChange>,
    ahead: &mut Option<NewManifests>,
    keep: bool,
) -> Result<()> {
    let (added, deletes) = added_files(planned);
    if ahead
        .as_ref()
        .is_some_and(|a| a.fit(&state.metadata, &added, &deletes))
    {
        return Ok(());
    }
    if let Some(stale) = ahead.take()
        && !keep
    {
        delete_quietly(&store.file_io, &state.id, &stale.paths).await;
    }
    if !added.is_empty() || !deletes.is_empty() {
        *ahead =
            Some(NewManifests::write(&store.file_io, &state.metadata, &added, &deletes).await?);
    }
    Ok(())
}

/// Under a commit lock: reloads the table and, if it moved since `state`, takes out of
/// `planned` the changes that no longer fit it. Returns the new state and those changes, or
/// None if nothing moved.
async fn catch_up(
    store: &Store,
    id: &TableId,
    planner: &mut dyn Planner,
    planned: &mut BTreeMap<i32, BucketChange>,
    planned_on: &TableState,
    state: &TableState,
) -> Result<Option<(Arc<TableState>, Vec<BucketChange>)>> {
    let now = store.current(id, Duration::ZERO).await?;
    if now.metadata_location == state.metadata_location {
        return Ok(None);
    }
    let stale = take_stale(planner, planned, planned_on, &now);
    Ok(Some((now, stale)))
}

/// How a commit attempt under way ended early.
enum Attempt {
    /// The files of the state it planned on are gone (another writer committed and expired
    /// them): plan these changes again on a newer state.
    Replan(Vec<BucketChange>),
    Failed(Error),
}

/// Plans on the current table, commits one snapshot, and on a conflict rebases: buckets the
/// winner did not touch keep their files; the others (or all, when the schema moved) are
/// planned again. Up to `commit_max_retries` retries, with backoff.
pub async fn commit_buckets(
    store: &Store,
    id: &TableId,
    planner: &mut dyn Planner,
) -> Result<Committed> {
    let mut claim = Claim::default();
    let committed = commit_buckets_claiming(store, id, planner, &mut claim).await;
    claim.release(store, id).await;
    committed
}

async fn commit_buckets_claiming(
    store: &Store,
    id: &TableId,
    planner: &mut dyn Planner,
    claim: &mut Claim,
) -> Result<Committed> {
    let attempts = store.config.commit_max_retries + 1;
    let catalog = store.catalog().await?;
    let write_metadata = !catalog.owns_metadata_files();
    // Optimistic commits on REST: see `claim`.
    let claims = catalog.owns_metadata_files() && !catalog.locks_commits();
    // Under a commit lock, whatever landed since the plan is folded in before the commit
    // (`catch_up`): the plan may start from the state this process last saw, if it is
    // fresh, instead of asking the catalog twice. An optimistic commit plans on the newest.
    let max_age = if catalog.locks_commits() {
        store.config.metadata_refresh()
    } else {
        Duration::ZERO
    };
    let mut t = Timings::default();
    let started = std::time::Instant::now();
    let mut state = store.current(id, max_age).await?;
    if claims {
        state = claim::wait_for_others(store, id, claim, state).await?;
    }
    t.state_us += micros(started);
    let mut planned_on = state.clone();
    let mut planned: BTreeMap<i32, BucketChange> = BTreeMap::new();
    // What to plan before the next commit: None is every bucket the writer touches, else the
    // changes that went stale.
    let mut want: Option<Vec<BucketChange>> = None;
    let mut must_plan = true;
    let mut replanned = 0;
    let mut rebases = 0;
    // The manifests of the files `planned` adds, written before the lock.
    let mut ahead: Option<NewManifests> = None;
    let mut durable = Durable::default();
    // Once an attempt's outcome is unknown, the catalog may yet commit it, files and all: from
    // then on nothing planned before is deleted (orphans at worst).
    let mut keep_files = false;
    let mut unknown = None;
    let discard = |changes: Vec<BucketChange>, ahead: Option<NewManifests>, keep: bool| {
        let paths: Vec<String> = if keep {
            Vec::new()
        } else {
            changes
                .iter()
                .flat_map(BucketChange::written_paths)
                .chain(ahead.into_iter().flat_map(|a| a.paths))
                .collect()
        };
        async move { delete_quietly(&store.file_io, id, &paths).await }
    };
    let mut attempt = 1;
    loop {
        if must_plan {
            let started = std::time::Instant::now();
            let planned_now = planner.plan(&state, want.as_deref()).await;
            t.plan_us += micros(started);
            match planned_now {
                Ok(fresh) => {
                    planned.extend(fresh.into_iter().map(|c| (c.bucket, c)));
                    discard(want.take().unwrap_or_default(), None, keep_files).await;
                    planned_on = state.clone();
                    must_plan = false;
                    // Changes planned elsewhere (staged by tasks) may already be stale:
                    // merged again now, before a commit that could only conflict.
                    let stale_now = take_stale(planner, &mut planned, &planned_on, &state);
                    if !stale_now.is_empty() {
                        replanned += stale_now.len();
                        want = Some(stale_now);
                        must_plan = true;
                        continue;
                    }
                }
                // A file of the state we planned on is gone: another writer committed and
                // expired it. That is a conflict, unless the catalog still names our state.
                Err(Error::FileNotFound(detail)) => {
                    let now = store.current(id, Duration::ZERO).await?;
                    if now.metadata_location == state.metadata_location {
                        let mut all: Vec<BucketChange> = planned.into_values().collect();
                        all.extend(want.unwrap_or_default());
                        discard(all, ahead, keep_files).await;
                        return Err(Error::corrupt(id, detail));
                    }
                    state = now;
                    let dropped = take_stale(planner, &mut planned, &planned_on, &state);
                    if let Some(w) = &mut want {
                        w.extend(dropped);
                    } else {
                        discard(dropped, None, keep_files).await;
                    }
                    if attempt >= attempts {
                        break;
                    }
                    attempt += 1;
                    continue;
                }
                Err(e) => {
                    let mut all: Vec<BucketChange> = planned.into_values().collect();
                    all.extend(want.unwrap_or_default());
                    discard(all, ahead, keep_files).await;
                    return Err(e.in_table(id));
                }
            }
        }
        let nothing =
            |planned: BTreeMap<i32, BucketChange>, replanned, rebases, timings| Committed {
                snapshot_id: None,
                attempts: attempt,
                changes: planned.into_values().collect(),
                replanned,
                rebases,
                timings,
            };
        if !planned.values().any(BucketChange::changes_files) {
            discard(Vec::new(), ahead, keep_files).await;
            return Ok(nothing(planned, replanned, rebases, t));
        }
        // Before the lock: the manifests of the added files. If the lock is taken, the syncs
        // of everything written so far start now and run while this writer waits; if it is
        // free, they wait for the files written under it, so that all of them share one
        // file system journal commit rather than two in a row.
        let started = std::time::Instant::now();
        if let Err(e) = manifests_ahead(store, &planned_on, &planned, &mut ahead, keep_files).await
        {
            discard(planned.into_values().collect(), ahead, keep_files).await;
            return Err(e.in_table(id));
        }
        t.prepare_us += micros(started);
        let started = std::time::Instant::now();
        let early = planned
            .values()
            .flat_map(BucketChange::written_paths)
            .chain(ahead.iter().flat_map(|a| a.paths.iter().cloned()));
        let held = match lock_or(store, id, || durable.start(early)).await {
            Ok(held) => held,
            Err(e) => {
                discard(planned.into_values().collect(), ahead, keep_files).await;
                return Err(e.in_table(id));
            }
        };
        t.catalog_us += micros(started);
        let locked = held.is_some();
        let under_lock = async {
            if locked {
                // Under the lock no writer of this protocol commits: whatever landed since
                // the plan is folded in now (rebase, or a re-plan of the buckets it touched)
                // rather than found by a failed swap.
                let started = std::time::Instant::now();
                let caught_up =
                    catch_up(store, id, planner, &mut planned, &planned_on, &state).await;
                t.state_us += micros(started);
                if let Some((now, stale)) = caught_up.map_err(Attempt::Failed)? {
                    let started = std::time::Instant::now();
                    let fresh = planner.plan(&now, Some(&stale)).await;
                    t.plan_us += micros(started);
                    let fresh = match fresh {
                        Ok(fresh) => fresh,
                        Err(Error::FileNotFound(_)) => {
                            state = now;
                            return Err(Attempt::Replan(stale));
                        }
                        Err(e) => {
                            discard(stale, None, keep_files).await;
                            return Err(Attempt::Failed(e));
                        }
                    };
                    replanned += stale.len();
                    discard(stale, None, keep_files).await;
                    planned.extend(fresh.into_iter().map(|c| (c.bucket, c)));
                    rebases += u32::from(!planned.is_empty());
                    planned_on = now.clone();
                    state = now;
                }
            }
            // Planned again on what landed meanwhile, the rows may all be there already:
            // then there is nothing to commit (a snapshot-less commit would still expire the
            // current snapshot).
            if !planned.values().any(BucketChange::changes_files) {
                return Ok(None);
            }
            let started = std::time::Instant::now();
            manifests_ahead(store, &state, &planned, &mut ahead, keep_files)
                .await
                .map_err(Attempt::Failed)?;
            let changes =
                snapshot_changes(store, &state, &planned, &*planner).map_err(Attempt::Failed)?;
            let prepared = prepare(
                &store.file_io,
                &state,
                changes,
                ahead.as_ref(),
                write_metadata,
            )
            .await
            .map_err(Attempt::Failed)?;
            // Durable before the catalog points at them: what this attempt publishes.
            let publish = planned
                .values()
                .flat_map(BucketChange::written_paths)
                .chain(ahead.iter().flat_map(|a| a.paths.iter().cloned()))
                .chain(prepared.written.iter().cloned());
            if let Err(e) = durable.wait(publish).await {
                delete_quietly(&store.file_io, id, &prepared.written).await;
                return Err(Attempt::Failed(e));
            }
            t.prepare_us += micros(started);
            Ok(Some(prepared))
        };
        let outcome = under_lock.await;
        let prepared = match outcome {
            Ok(Some(prepared)) => prepared,
            Ok(None) => {
                unlock(store, held).await;
                discard(Vec::new(), ahead, keep_files).await;
                return Ok(nothing(planned, replanned, rebases, t));
            }
            Err(Attempt::Replan(stale)) => {
                unlock(store, held).await;
                replanned += stale.len();
                want = Some(stale);
                must_plan = true;
                if attempt >= attempts {
                    break;
                }
                attempt += 1;
                continue;
            }
            Err(Attempt::Failed(e)) => {
                unlock(store, held).await;
                discard(planned.into_values().collect(), ahead, keep_files).await;
                return Err(e.in_table(id));
            }
        };
        // A catalog error may come after the swap was sent (a lost connection): the commit
        // may have landed, so nothing is deleted then.
        let started = std::time::Instant::now();
        let landed = commit(store, &state, &prepared, held)
            .await
            .map_err(|e| e.in_table(id))?;
        t.catalog_us += micros(started);
        match landed {
            Landed::Yes(new_state) => {
                let started = std::time::Instant::now();
                store
                    .after_commit(&state, &new_state, &prepared, &prepared.expired_snapshots)
                    .await;
                t.cleanup_us += micros(started);
                return Ok(Committed {
                    snapshot_id: prepared.snapshot_id,
                    attempts: attempt,
                    changes: planned.into_values().collect(),
                    replanned,
                    rebases,
                    timings: t,
                });
            }
            Landed::Conflict => {
                unknown = None;
                delete_quietly(&store.file_io, id, &prepared.written).await;
            }
            Landed::Unknown(why) => {
                keep_files = true;
                unknown = Some(why);
                // That attempt may still land with this snapshot id: the next one gets its
                // own (its files are kept with the rest).
                ahead = None;
            }
        }
        if attempt >= attempts {
            break;
        }
        attempt += 1;
        metrics::commit_retried(id);
        // Holding the claim, this writer is the one the others wait for.
        let claimed = claim.held_in(&state);
        tokio::time::sleep(backoff(if claimed { 0 } else { attempt - 1 })).await;
        let started = std::time::Instant::now();
        state = store.current(id, Duration::ZERO).await?;
        if claims {
            if attempt > CLAIM_AFTER
                && !claim.held_in(&state)
                && let Some(now) = claim.take(store, id, &state).await
            {
                state = now;
            }
            state = claim::wait_for_others(store, id, claim, state).await?;
        }
        t.state_us += micros(started);
        let dropped = take_stale(planner, &mut planned, &planned_on, &state);
        rebases += u32::from(!planned.is_empty());
        if !dropped.is_empty() {
            replanned += dropped.len();
            want = Some(dropped);
            must_plan = true;
        }
    }
    let mut all: Vec<BucketChange> = planned.into_values().collect();
    all.extend(want.unwrap_or_default());
    discard(all, ahead, keep_files).await;
    Err(gave_up(id, attempts, unknown))
}
