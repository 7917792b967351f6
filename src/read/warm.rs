//! Warm swap: before a new table state serves reads, its new files' key indexes are loaded,
//! and so are the row groups that hold the keys that were hot in the files they replace.
//! A materialization that rewrites every bucket then costs readers no cold misses on the
//! keys they were asking for.

use std::collections::HashSet;
use std::sync::Arc;

use iceberg::io::FileIO;

use super::files::{DataFiles, Fill};
use super::index::KeyRange;
use crate::storage::IoStats;
use crate::table::{LiveFile, TableState};

/// Key ranges of cached row groups.
type KeyRanges = Vec<KeyRange>;

/// The new files of a state, each with the key ranges that were hot in its bucket.
#[derive(Default)]
pub struct WarmPlan {
    files: Vec<(Arc<LiveFile>, KeyRanges)>,
    /// Whether the state brought delete files: reads must not decode them on the request path.
    new_deletes: bool,
}

impl WarmPlan {
    pub fn is_empty(&self) -> bool {
        self.files.is_empty() && !self.new_deletes
    }
}

/// What to prepare for `after`, from what the cache holds of `before`'s files. Memory only:
/// it must run before the replaced files are forgotten.
pub fn warm_plan(files: &DataFiles, before: &TableState, after: &TableState) -> WarmPlan {
    let old: HashSet<&str> = before.files.all_paths().collect();
    let live: HashSet<&str> = after.files.all_paths().collect();
    let schema_id = before.layout.schema.schema_id();
    let (n_before, n_after) = (before.layout.buckets, after.layout.buckets);
    let hot_in_bucket = |bucket: Option<i32>| -> KeyRanges {
        let Some(b) = bucket else {
            return Vec::new();
        };
        // A re-bucketed table (M a multiple of N): the keys of new bucket b were in old
        // bucket b % N. Any other change of the count leaves no old bucket to follow.
        let b = match n_before {
            n if n == n_after => b,
            n if n_after.is_multiple_of(n) => b % i32::try_from(n).unwrap_or(i32::MAX),
            _ => return Vec::new(),
        };
        let mut ranges = Vec::new();
        for f in before.files.files_for_bucket(b) {
            if live.contains(f.path()) {
                continue;
            }
            let Some(index) = files.cached_index(f.path()) else {
                continue;
            };
            for (rg, group) in index.row_groups.iter().enumerate() {
                if let Some(keys) = &group.keys
                    && files.is_cached(&index.path, rg, schema_id)
                {
                    ranges.push(keys.clone());
                }
            }
        }
        ranges
    };
    WarmPlan {
        files: after
            .files
            .data
            .iter()
            .filter(|f| !old.contains(f.path()))
            .map(|f| (f.clone(), hot_in_bucket(f.bucket)))
            .collect(),
        new_deletes: after.files.deletes.iter().any(|d| !old.contains(d.path())),
    }
}

/// Carries out a plan. Best effort: a file that cannot be read now is read by the first
/// lookup that needs it, which reports the error.
pub async fn warm(
    files: &DataFiles,
    file_io: &FileIO,
    io: &Arc<IoStats>,
    state: &TableState,
    plan: WarmPlan,
) {
    let layout = &state.layout;
    let tasks = plan.files.iter().map(|(file, hot)| async move {
        let index = match files.index(file_io, file, io, Fill::Prefetch).await {
            Ok(index) => index,
            Err(e) => return warn_failed(state, file.path(), &e),
        };
        let mut row_groups: Vec<usize> = hot
            .iter()
            .flat_map(|(lo, hi)| index.overlapping(lo, hi))
            .collect();
        row_groups.sort_unstable();
        row_groups.dedup();
        if !row_groups.is_empty()
            && let Err(e) = files
                .blocks(file_io, &index, &row_groups, layout, io, Fill::Prefetch)
                .await
        {
            warn_failed(state, file.path(), &e);
        }
    });
    let deletes = state.files.deletes.iter().map(|d| async move {
        if let Err(e) = files.position_deletes(file_io, d, &io.prefetch).await {
            warn_failed(state, d.path(), &e);
        }
    });
    futures::future::join(
        futures::future::join_all(tasks),
        futures::future::join_all(deletes),
    )
    .await;
}

fn warn_failed(state: &TableState, path: &str, e: &crate::error::Error) {
    // A file gone from storage was replaced and expired by a newer commit while this one was
    // being prepared (routine with several writers): no read will need it.
    let level = if matches!(e, crate::error::Error::FileNotFound(_)) {
        log::Level::Debug
    } else {
        log::Level::Warn
    };
    log::log!(
        level,
        "table {}: preparing {path} for reads failed (the first read that needs it retries): {e}",
        state.id
    );
}
