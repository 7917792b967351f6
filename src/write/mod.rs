//! The upsert write path: convert, dedup, merge touched buckets copy-on-write, commit one
//! overwrite snapshot with optimistic concurrency, clean up.

mod overwrite;
mod plan;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use arrow_array::RecordBatch;
use iceberg::io::FileIO;
use iceberg::spec::{DataFile, DataFileFormat, Literal, PartitionKey, Struct};
use iceberg::writer::base_writer::data_file_writer::DataFileWriterBuilder;
use iceberg::writer::file_writer::ParquetWriterBuilder;
use iceberg::writer::file_writer::location_generator::{
    DefaultFileNameGenerator, DefaultLocationGenerator,
};
use iceberg::writer::file_writer::rolling_writer::RollingFileWriterBuilder;
use iceberg::writer::{IcebergWriter, IcebergWriterBuilder};
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;
use uuid::Uuid;

pub use overwrite::{Changes, PreparedCommit, delete_quietly, prepare};
pub use plan::{MergeStats, merge_bucket, winners_by_bucket};

use crate::convert::{WriteInput, build_write_batch};
use crate::error::{Error, Result};
use crate::read::FileCache;
use crate::schema::ENTITY_KEY;
use crate::storage::IoStats;
use crate::store::Landed;
use crate::store::Store;
use crate::table::{LiveFile, TableState};

/// Rows per row group and per page: small enough that a point read decodes little.
const ROW_GROUP_ROWS: usize = 16 * 1024;
const PAGE_ROWS: usize = 1024;

/// Parquet settings of every data file we write (mirrored in the table's `write.parquet.*`
/// properties so other writers follow them).
pub fn writer_properties() -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        // A dictionary page holds every distinct value of its column chunk and must be read
        // before any data page: for unique keys and timestamps that is most of the column, so
        // a point read of one page would fetch the whole dictionary too. zstd still compresses.
        .set_dictionary_enabled(false)
        .set_statistics_enabled(EnabledStatistics::Page)
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
        .set_data_page_row_count_limit(PAGE_ROWS)
        .set_column_bloom_filter_enabled(ColumnPath::from(ENTITY_KEY), true)
        // For other engines' point lookups. Sized for one row group's keys (the default
        // assumes a million: 1 MiB of filter per row group); 16 KiB at 5% false positives.
        .set_column_bloom_filter_ndv(ColumnPath::from(ENTITY_KEY), ROW_GROUP_ROWS as u64)
        .set_column_bloom_filter_fpp(ColumnPath::from(ENTITY_KEY), 0.05)
        .build()
}

/// What one `write` call did.
#[derive(Debug, Default, Clone)]
pub struct WriteReport {
    pub rows_written: usize,
    pub rows_ignored_older: usize,
    pub buckets: usize,
    pub files_added: usize,
    pub files_removed: usize,
    pub attempts: u32,
    pub snapshot_id: Option<i64>,
}

/// One bucket rewritten: the new files and the old files they replace.
struct BucketRewrite {
    added: Vec<DataFile>,
    removed: Vec<Arc<LiveFile>>,
    stats: MergeStats,
}

async fn write_bucket(
    file_io: &FileIO,
    state: &TableState,
    bucket: i32,
    batch: RecordBatch,
    prefix: String,
) -> Result<Vec<DataFile>> {
    let md = &state.metadata;
    let parquet = ParquetWriterBuilder::new(writer_properties(), state.layout.schema.clone());
    let rolling = RollingFileWriterBuilder::new_with_default_file_size(
        parquet,
        file_io.clone(),
        DefaultLocationGenerator::new(md)?,
        DefaultFileNameGenerator::new(prefix, None, DataFileFormat::Parquet),
    );
    let key = PartitionKey::new(
        md.default_partition_spec().as_ref().clone(),
        state.layout.schema.clone(),
        Struct::from_iter([Some(Literal::int(bucket))]),
    );
    let mut writer = DataFileWriterBuilder::new(rolling).build(Some(key)).await?;
    writer.write(batch).await?;
    Ok(writer.close().await?)
}

/// What a bucket task needs of the store; owned, since tasks outlive the caller's borrow.
#[derive(Clone)]
struct StoreIo {
    file_io: FileIO,
    cache: Arc<FileCache>,
    stats: Arc<IoStats>,
}

async fn rewrite_bucket(
    io: StoreIo,
    state: Arc<TableState>,
    incoming: Arc<RecordBatch>,
    bucket: i32,
    rows: Vec<usize>,
    attempt_id: Uuid,
    force: bool,
) -> Result<Option<BucketRewrite>> {
    let layout = &state.layout;
    let files: Vec<Arc<LiveFile>> = state.files.files_for_bucket(bucket).cloned().collect();
    let mut parts = Vec::with_capacity(files.len());
    for f in &files {
        parts.push(
            io.cache
                .get(&io.file_io, f, layout, &io.stats)
                .await?
                .batch
                .clone(),
        );
    }
    let existing = match parts.len() {
        0 => None,
        1 => parts.pop(),
        _ => Some(arrow_select::concat::concat_batches(&layout.arrow, &parts)?),
    };
    let (merged, stats) = merge_bucket(existing.as_ref(), &incoming, &rows, layout, force)?;
    let Some(merged) = merged else {
        return Ok(Some(BucketRewrite {
            added: Vec::new(),
            removed: Vec::new(),
            stats,
        }));
    };
    let prefix = format!("{attempt_id}-b{bucket}");
    let added = write_bucket(&io.file_io, &state, bucket, merged, prefix).await?;
    Ok(Some(BucketRewrite {
        added,
        removed: files,
        stats,
    }))
}

enum Attempt {
    Committed(WriteReport),
    Conflict,
}

/// What one commit attempt rewrites: the incoming rows grouped by bucket, or (compaction)
/// buckets rewritten from their own rows, deduplicated and sorted.
struct Plan {
    incoming: Arc<RecordBatch>,
    groups: BTreeMap<i32, Vec<usize>>,
    compaction: bool,
}

async fn try_commit(store: &Store, state: &Arc<TableState>, plan: &Plan) -> Result<Attempt> {
    if state.files.unbucketed_count() > 0 {
        return Err(Error::input(format!(
            "table {} holds files not partitioned by bucket(entity_key) (written by another \
             tool); migrate it before writing",
            state.id
        )));
    }
    let attempt_id = Uuid::new_v4();
    let io = StoreIo {
        file_io: store.file_io.clone(),
        cache: store.files.clone(),
        stats: store.io.clone(),
    };
    let tasks: Vec<_> = plan
        .groups
        .iter()
        .map(|(&bucket, rows)| {
            tokio::spawn(rewrite_bucket(
                io.clone(),
                state.clone(),
                plan.incoming.clone(),
                bucket,
                rows.clone(),
                attempt_id,
                plan.compaction,
            ))
        })
        .collect();
    let mut report = WriteReport::default();
    let mut changes = Changes {
        compaction: plan.compaction,
        ..Changes::default()
    };
    let mut first_error = None;
    for t in tasks {
        match t
            .await
            .map_err(|e| Error::internal(format!("bucket task failed: {e}")))
        {
            Ok(Ok(Some(r))) => {
                report.rows_written += r.stats.written;
                report.rows_ignored_older += r.stats.ignored_older;
                if !r.added.is_empty() {
                    changes.buckets_changed += 1;
                }
                changes.added.extend(r.added);
                changes.removed.extend(r.removed);
            }
            Ok(Ok(None)) => {}
            Ok(Err(e)) | Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    let data_paths: Vec<String> = changes
        .added
        .iter()
        .map(|d| d.file_path().to_string())
        .collect();
    if let Some(e) = first_error {
        delete_quietly(&store.file_io, &data_paths).await;
        return Err(e);
    }
    report.buckets = changes.buckets_changed;
    report.files_added = changes.added.len();
    report.files_removed = changes.removed.len();
    if changes.added.is_empty() {
        return Ok(Attempt::Committed(report));
    }
    changes.expire = store.expirable(&state.metadata, true);
    let removed = changes.removed.clone();
    let expire = changes.expire.clone();
    let prepared = match prepare(&store.file_io, state, changes).await {
        Ok(p) => p,
        Err(e) => {
            delete_quietly(&store.file_io, &data_paths).await;
            return Err(e);
        }
    };
    match store.commit(state, &prepared).await? {
        Landed::Yes(new_state) => {
            report.snapshot_id = prepared.snapshot_id;
            store
                .after_commit(state, &new_state, &prepared, &expire, &removed)
                .await;
            Ok(Attempt::Committed(report))
        }
        Landed::Conflict => {
            delete_quietly(&store.file_io, &data_paths).await;
            delete_quietly(&store.file_io, &prepared.written).await;
            Ok(Attempt::Conflict)
        }
        // The catalog may still apply it: deleting our files could break the table. They are
        // orphans at worst (`remove-orphans`); re-plan on what the catalog names now.
        Landed::Unknown => Ok(Attempt::Conflict),
    }
}

/// Jittered exponential backoff: 20 ms doubling to 1 s, times 0.5-1.5.
fn backoff(attempt: u32) -> Duration {
    let base = 20u64.saturating_mul(1 << attempt.min(6)).min(1000);
    Duration::from_millis(base / 2 + fastrand::u64(0..=base))
}

/// Plans against the current table, commits, and on a conflict reloads, re-plans and retries
/// with jittered backoff, up to `commit_max_retries`.
async fn commit_with_retries(
    store: &Store,
    table: &str,
    mut plan_for: impl FnMut(&TableState) -> Result<Arc<Plan>>,
) -> Result<WriteReport> {
    let id = store.table_id(table)?;
    let mut state = store.current(&id, Duration::ZERO).await?;
    let mut plan = plan_for(&state)?;
    let attempts = store.config.commit_max_retries + 1;
    for attempt in 1..=attempts {
        let outcome = match try_commit(store, &state, &plan).await {
            // A file of the snapshot we planned on is gone: another writer committed and
            // expired it. That is a conflict, unless the catalog still names our snapshot.
            Err(Error::FileNotFound(detail)) => {
                let fresh = store.current(&id, Duration::ZERO).await?;
                if fresh.metadata_location == state.metadata_location {
                    return Err(Error::corrupt(&id, detail));
                }
                Attempt::Conflict
            }
            other => other.map_err(|e| e.in_table(&id))?,
        };
        match outcome {
            Attempt::Committed(mut report) => {
                report.attempts = attempt;
                return Ok(report);
            }
            Attempt::Conflict if attempt < attempts => {
                tokio::time::sleep(backoff(attempt)).await;
                state = store.current(&id, Duration::ZERO).await?;
                plan = plan_for(&state)?;
            }
            Attempt::Conflict => {}
        }
    }
    Err(Error::CommitConflict {
        table: id.to_string(),
        attempts,
    })
}

pub async fn upsert(store: &Store, table: &str, input: &WriteInput<'_>) -> Result<WriteReport> {
    // Converting the batch is the costly part of planning: redo it only if the schema moved.
    let mut built: Option<(i32, Arc<Plan>)> = None;
    commit_with_retries(store, table, |state| {
        let schema_id = state.layout.schema.schema_id();
        if let Some((id, plan)) = &built
            && *id == schema_id
        {
            return Ok(plan.clone());
        }
        let incoming = Arc::new(build_write_batch(&state.layout, input)?);
        let groups = winners_by_bucket(&incoming, &state.layout)?;
        let plan = Arc::new(Plan {
            incoming,
            groups,
            compaction: false,
        });
        built = Some((schema_id, plan.clone()));
        Ok(plan)
    })
    .await
}

/// Upserts rows already in the table's Arrow schema (migration converts them itself).
pub async fn upsert_batch(store: &Store, table: &str, batch: RecordBatch) -> Result<WriteReport> {
    let incoming = Arc::new(batch);
    commit_with_retries(store, table, |state| {
        if incoming.schema() != state.layout.arrow {
            return Err(Error::schema(format!(
                "{} changed schema while rows were being converted for it",
                state.id
            )));
        }
        Ok(Arc::new(Plan {
            incoming: incoming.clone(),
            groups: winners_by_bucket(&incoming, &state.layout)?,
            compaction: false,
        }))
    })
    .await
}

/// Buckets a compaction rewrites: those with several data files, or every bucket (`all`,
/// which also removes duplicate keys inside single files).
pub fn compaction_buckets(state: &TableState, all: bool) -> Vec<i32> {
    state
        .files
        .buckets()
        .filter(|(_, files)| all || files.len() > 1)
        .map(|(b, _)| b)
        .collect()
}

/// Rewrites buckets into one sorted file each, newest row per key, in one `replace` snapshot.
pub async fn compact(store: &Store, table: &str, all: bool) -> Result<WriteReport> {
    commit_with_retries(store, table, |state| {
        Ok(Arc::new(Plan {
            incoming: Arc::new(RecordBatch::new_empty(state.layout.arrow.clone())),
            groups: compaction_buckets(state, all)
                .into_iter()
                .map(|b| (b, Vec::new()))
                .collect(),
            compaction: true,
        }))
    })
    .await
}
