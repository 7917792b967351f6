//! Re-bucketing: buckets that grow with the table.
//!
//! A table starts as `bucket[N](entity_key)`. Every copy-on-write rewrite of a bucket costs
//! the bucket, so once the largest bucket holds more than `target_bucket_bytes` live bytes,
//! compaction moves the table to `bucket[M]`, M = N x 2^k (`grown_buckets`). Iceberg's bucket transform is `(murmur3(key) & i32::MAX) % n`: with M a multiple of
//! N, the keys of old bucket b are exactly those of new buckets b, b + N, ..., so every old
//! bucket splits into M/N new ones and nothing else.
//!
//! The move is one Iceberg partition-spec evolution committed with the rewrite of every file
//! into the new spec, as one `replace` snapshot (`AddSpec` + `SetDefaultSpec` and the files,
//! through the commit module). Afterwards the table has one spec again: every reader and
//! writer maps a key to one bucket, every engine prunes `entity_key = x` by the current spec.
//! Letting files of the old spec live on would spread the split over later writes, but every
//! read, write, rebase and compaction would then have to map a key to a bucket per live spec.
//! The whole rewrite costs a bounded number of writes of each row however large the table
//! grows, as a hash table's resize does (a split comes only after the table grew by a third,
//! so the rewrites form a geometric series), runs in maintenance, and a conflict re-plans only
//! the old buckets another writer changed meanwhile.
//!
//! Writers planned on the old spec cannot rebase onto the new one (`Planner::rebases_onto`
//! compares the spec): they plan again from their rows, grouped by the new buckets.

use std::collections::HashMap;
use std::sync::Arc;

use arrow_array::{RecordBatch, UInt32Array};
use iceberg::TableUpdate;
use iceberg::spec::{PartitionSpec, TableMetadata};
use uuid::Uuid;

use super::{
    BucketFiles, Placement, StoreIo, WriteReport, bucket_files, check_plannable, merge_bucket,
    own_deletes, report, run_bucket_tasks, shape, stored_rows, write_bucket_in,
};
use crate::commit::{self, BucketChange, Changes, Planner, Step, bucket_base, delete_quietly};
use crate::error::{Error, Result};
use crate::read::{buckets, keys_of};
use crate::schema::{self, ENTITY_KEY, Layout, MAX_BUCKETS, PROP_BUCKETS};
use crate::store::Store;
use crate::table::{LiveFile, TableState};

/// The live bytes of `bucket`: its data files' bytes, less the share of rows deleted.
fn live_bytes(state: &TableState, bucket: i32) -> u64 {
    let files = &state.files;
    let (bytes, rows) = files
        .files_for_bucket(bucket)
        .fold((0u128, 0u128), |(b, r), f| {
            let e = &f.entry;
            (
                b + u128::from(e.file_size_in_bytes()),
                r + u128::from(e.record_count()),
            )
        });
    let deleted: u128 = files
        .deletes_for_bucket(bucket)
        .map(|d| u128::from(d.entry.record_count()))
        .sum();
    let live = bytes * rows.saturating_sub(deleted) / rows.max(1);
    u64::try_from(live).unwrap_or(u64::MAX)
}

/// The live bytes of the table's largest bucket.
pub fn largest_bucket_bytes(state: &TableState) -> u64 {
    state
        .files
        .buckets()
        .map(|(b, _)| live_bytes(state, b))
        .max()
        .unwrap_or(0)
}

/// The rule: once the largest bucket holds more than `target` live bytes, `n` buckets double
/// until it would hold at most 3/4 of `target` (each split halves a bucket, in expectation),
/// up to `MAX_BUCKETS`. The quarter left is room to grow by a third before the next split, and
/// keeps hashing skew and each file's fixed overhead from splitting a table again right away.
/// `target` 0 keeps `n`.
pub fn grown_buckets(n: u32, largest: u64, target: u64) -> u32 {
    if target == 0 || largest <= target {
        return n;
    }
    let goal = u128::from(target) * 3 / 4;
    let mut m = n;
    while m.saturating_mul(2) <= MAX_BUCKETS
        && u128::from(largest) * u128::from(n) > goal * u128::from(m)
    {
        m *= 2;
    }
    m
}

/// The bucket count a compaction moves the table to: `forced` (checked), or what the rule
/// makes of the largest bucket and `target_bytes`.
pub fn bucket_target(state: &TableState, target_bytes: u64, forced: Option<u32>) -> Result<u32> {
    let n = state.layout.buckets;
    let Some(m) = forced else {
        return Ok(grown_buckets(n, largest_bucket_bytes(state), target_bytes));
    };
    if m < n || !m.is_multiple_of(n) || m > MAX_BUCKETS {
        return Err(Error::input(format!(
            "{}: cannot re-bucket {n} buckets into {m}: the count must be a multiple of {n} \
             (each bucket splits into equal parts), at most {MAX_BUCKETS}",
            state.id
        )));
    }
    Ok(m)
}

/// The metadata changes that make `bucket[m](entity_key)` the table's spec: a new spec (old
/// files keep theirs, as Iceberg's partition evolution does), and the bucket-count property.
fn spec_updates(md: &TableMetadata, m: u32) -> Result<Vec<TableUpdate>> {
    let key = md
        .current_schema()
        .field_by_name(ENTITY_KEY)
        .ok_or_else(|| Error::corrupt(md.location(), "column entity_key is missing"))?
        .id;
    Ok(vec![
        TableUpdate::AddSpec {
            spec: schema::bucket_spec(key, m)?,
        },
        // -1: the spec this commit adds, whatever id it gets.
        TableUpdate::SetDefaultSpec { spec_id: -1 },
        TableUpdate::SetProperties {
            updates: HashMap::from([(PROP_BUCKETS.to_string(), m.to_string())]),
        },
    ])
}

/// The spec `spec_updates` makes the default, with the id it gets on `md`: the one files are
/// written in before the commit assigns it.
fn new_spec(md: &TableMetadata, m: u32) -> Result<PartitionSpec> {
    let mut builder = md.clone().into_builder(None);
    for update in spec_updates(md, m)? {
        builder = update.apply(builder)?;
    }
    Ok(builder
        .build()?
        .metadata
        .default_partition_spec()
        .as_ref()
        .clone())
}

/// `rows` (sorted by key) cut by their bucket among `m`, each part still sorted.
fn split_by_bucket(rows: &RecordBatch, layout: &Layout, m: u32) -> Result<Vec<(i32, RecordBatch)>> {
    let of_row = buckets(&keys_of(rows, layout)?, m)?;
    let mut by_bucket: std::collections::BTreeMap<i32, Vec<u32>> = Default::default();
    for (row, b) in of_row.into_iter().enumerate() {
        let row = u32::try_from(row).map_err(Error::internal)?;
        by_bucket.entry(b).or_default().push(row);
    }
    by_bucket
        .into_iter()
        .map(|(b, rows_of_b)| {
            let indices = UInt32Array::from(rows_of_b);
            Ok((b, arrow_select::take::take_record_batch(rows, &indices)?))
        })
        .collect()
}

/// One old bucket split: its live rows (deletes applied, newest row per key) written as the
/// files of its new buckets in `spec`, replacing its data and delete files.
async fn split_bucket(
    io: StoreIo,
    state: Arc<TableState>,
    spec: Arc<PartitionSpec>,
    bucket: i32,
    attempt: Uuid,
) -> Result<BucketChange> {
    let BucketFiles {
        files,
        delete_files,
        deletes,
    } = bucket_files(&io, &state, bucket).await?;
    let existing = stored_rows(&io, &state, &files, &deletes).await?;
    let layout = state.layout.clone();
    let m = bucket_count(&spec)?;
    let parts = crate::runtime::cpu(move || -> Result<Vec<(i32, RecordBatch)>> {
        let none = RecordBatch::new_empty(layout.arrow.clone());
        match merge_bucket(existing.as_ref(), &none, &[], &layout, true)? {
            (Some(rows), _) => split_by_bucket(&rows, &layout, m),
            (None, _) => Ok(Vec::new()),
        }
    })
    .await??;
    let mut added = Vec::new();
    for (b, rows) in parts {
        let prefix = format!("{attempt}-b{b}");
        match write_bucket_in(&io, &state, &spec, b, rows, prefix).await {
            Ok(written) => added.extend(written),
            Err(e) => {
                let paths: Vec<String> = added.iter().map(|d| d.file_path().to_string()).collect();
                delete_quietly(&io.file_io, &state.id, &paths).await;
                return Err(e);
            }
        }
    }
    let paths = |files: &[Arc<LiveFile>]| files.iter().map(|f| f.path().to_string()).collect();
    Ok(BucketChange {
        bucket,
        base: bucket_base(&state, bucket),
        spec_id: spec.spec_id(),
        added,
        removed: paths(&files),
        removed_deletes: paths(&own_deletes(bucket, &delete_files)),
        ..BucketChange::default()
    })
}

/// The N of a `bucket[N]` spec of ours.
fn bucket_count(spec: &PartitionSpec) -> Result<u32> {
    match spec.fields() {
        [field] => match field.transform {
            iceberg::spec::Transform::Bucket(n) => Ok(n),
            _ => Err(Error::internal("a re-bucketing spec is not bucket[N]")),
        },
        _ => Err(Error::internal("a re-bucketing spec has several fields")),
    }
}

/// Plans a re-bucketing: every old bucket split into the new spec's buckets, a core's worth
/// of buckets at a time (each holds a whole bucket in memory). Changes are per old bucket, so
/// a conflict re-plans only the old buckets the winner changed.
struct RebucketPlanner {
    io: StoreIo,
    target: u32,
    /// The schema and spec the changes so far were planned on.
    planned_on: Option<(i32, i32)>,
}

#[async_trait::async_trait]
impl Planner for RebucketPlanner {
    async fn plan(
        &mut self,
        state: &Arc<TableState>,
        again: Option<&[BucketChange]>,
    ) -> Result<Vec<BucketChange>> {
        let n = state.layout.buckets;
        if n >= self.target {
            // Another compaction re-bucketed it meanwhile.
            return Ok(Vec::new());
        }
        if !self.target.is_multiple_of(n) || schema::spec_buckets(&state.metadata).is_none() {
            return Err(Error::table_state(
                &state.id,
                format!(
                    "another writer changed its partitioning (to spec {}) while it was being \
                     re-bucketed into {} buckets; run compact again",
                    state.metadata.default_partition_spec_id(),
                    self.target
                ),
            ));
        }
        check_plannable(state)?;
        let same = self.planned_on == Some(shape(state));
        self.planned_on = Some(shape(state));
        let old: Vec<i32> = match again {
            Some(changes) if same => changes.iter().map(|c| c.bucket).collect(),
            _ => state.files.buckets().map(|(b, _)| b).collect(),
        };
        let spec = Arc::new(new_spec(&state.metadata, self.target)?);
        let attempt = Uuid::new_v4();
        let tasks = old
            .into_iter()
            .map(|b| split_bucket(self.io.clone(), state.clone(), spec.clone(), b, attempt));
        run_bucket_tasks(&self.io, state, tasks, crate::runtime::cores()).await
    }

    fn compaction(&self) -> bool {
        true
    }

    fn updates(&self, state: &TableState) -> Result<Vec<TableUpdate>> {
        spec_updates(&state.metadata, self.target)
    }
}

/// Moves the table to `bucket[target](entity_key)`: one `replace` snapshot that adds the new
/// spec and rewrites every file into it (an empty table only changes its spec).
pub async fn rebucket(store: &Store, table: &str, target: u32) -> Result<WriteReport> {
    let id = store.table_id(table)?;
    // An empty table: a metadata-only commit, unless rows landed meanwhile.
    let changed_empty = commit::metadata_commit(store, &id, |state| {
        if state.layout.buckets >= target {
            return Ok(Step::Done(true));
        }
        if !state.files.data.is_empty() {
            return Ok(Step::Done(false));
        }
        let changes = Changes {
            updates: spec_updates(&state.metadata, target)?,
            ..Changes::default()
        };
        Ok(Step::Commit(changes, true))
    })
    .await?;
    if changed_empty {
        return Ok(WriteReport::default());
    }
    let mut planner = RebucketPlanner {
        io: StoreIo::new(store, Placement::default()),
        target,
        planned_on: None,
    };
    Ok(report(
        commit::commit_buckets(store, &id, &mut planner).await?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn buckets_double_until_the_largest_fits_the_target() {
        assert_eq!(grown_buckets(16, 100 * MIB, 128 * MIB), 16);
        assert_eq!(grown_buckets(16, 128 * MIB, 128 * MIB), 16);
        // Past the target: split until the largest is at most 96 MiB (3/4 of it).
        assert_eq!(grown_buckets(16, 129 * MIB, 128 * MIB), 32);
        assert_eq!(grown_buckets(16, 192 * MIB, 128 * MIB), 32);
        assert_eq!(grown_buckets(16, 193 * MIB, 128 * MIB), 64);
        assert_eq!(grown_buckets(16, 300 * MIB, 128 * MIB), 64);
        assert_eq!(grown_buckets(3, 1000, 100), 48);
        // 0 turns the rule off; the cap holds however large the table.
        assert_eq!(grown_buckets(16, u64::MAX, 0), 16);
        assert_eq!(grown_buckets(16, u64::MAX, 1), MAX_BUCKETS);
        assert_eq!(grown_buckets(MAX_BUCKETS, u64::MAX, 1), MAX_BUCKETS);
        assert_eq!(grown_buckets(3000, u64::MAX, 1), 3000);
    }

    #[test]
    fn a_bucket_splits_into_the_buckets_that_are_it_modulo_n() {
        // Iceberg's bucket transform: with M a multiple of N, bucket_M(k) % N == bucket_N(k),
        // which is what makes every old bucket split cleanly.
        let keys: Vec<Vec<u8>> = (0..5000u32).map(|i| i.to_le_bytes().to_vec()).collect();
        let array = arrow_array::LargeBinaryArray::from_iter_values(keys.iter().map(Vec::as_slice));
        let by16 = buckets(&array, 16).unwrap();
        for m in [32, 64, 256] {
            let by_m = buckets(&array, m).unwrap();
            assert!(by16.iter().zip(&by_m).all(|(n, m)| m % 16 == *n));
        }
    }
}
