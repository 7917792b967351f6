//! The upsert write path: convert, dedup, merge each touched bucket copy-on-write or (small
//! writes) merge-on-read, commit one overwrite snapshot with optimistic concurrency, clean up.

mod deletes;
mod group;
mod plan;
mod rebucket;
mod stage;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use arrow_array::{Array, RecordBatch};
use arrow_schema::DataType;
use iceberg::io::FileIO;
use iceberg::spec::{DataFile, DataFileFormat, Literal, PartitionKey, PartitionSpec, Struct};
use iceberg::writer::base_writer::data_file_writer::DataFileWriterBuilder;
use iceberg::writer::file_writer::ParquetWriterBuilder;
use iceberg::writer::file_writer::location_generator::{
    DefaultFileNameGenerator, DefaultLocationGenerator,
};
use iceberg::writer::file_writer::rolling_writer::RollingFileWriterBuilder;
use iceberg::writer::{IcebergWriter, IcebergWriterBuilder};
use parquet::arrow::ArrowSchemaConverter;
use parquet::basic::Compression;
use parquet::file::metadata::SortingColumn;
use parquet::file::properties::{
    BloomFilterPosition, EnabledStatistics, WriterProperties, WriterPropertiesBuilder,
};
use parquet::schema::types::ColumnPath;
use uuid::Uuid;

pub use deletes::{BucketMode, BucketShape, MorPlan, MorPolicy, StoredRow, plan_merge_on_read};
pub use group::Groups;
pub use plan::{MergeStats, merge_bucket, winners_by_bucket};
pub use rebucket::{bucket_target, grown_buckets, largest_bucket_bytes, rebucket};
pub use stage::{Token, discard, stage_batch};

use crate::FastMap;
use crate::commit::{self, BucketChange, Committed, Planner, bucket_base, delete_quietly};
use crate::convert::{WriteInput, build_write_batch};
use crate::error::{Error, Result};
use crate::read::{BucketDeletes, DataFiles, Fill, keys_of, load_whole_file};
use crate::schema::{ENTITY_KEY, ROW_GROUP_ROWS};
use crate::storage::IoStats;
use crate::store::Store;
use crate::table::{LiveFile, TableState};

/// Parquet settings of every data file we write (mirrored in the table's `write.parquet.*`
/// properties so other writers follow them).
pub fn writer_properties() -> WriterProperties {
    properties_builder().build()
}

/// `writer_properties` for a file of `batch`: a column LZ4 would not shrink by a fifth (random
/// floats and ids, embeddings) is written uncompressed, since a read miss then slices its
/// values straight from the bytes read, with no decompression (a fifth of a miss's CPU, `perf`).
/// Other engines read it as any Parquet; the table's codec property stays LZ4.
///
/// Rows in entity-key order (every file we write: buckets are merged sorted) are declared so
/// in each row group's `sorting_columns`: a read miss then skips checking the order.
pub fn writer_properties_for(batch: &RecordBatch) -> WriterProperties {
    let props = batch
        .schema()
        .fields()
        .iter()
        .zip(batch.columns())
        .filter(|(_, column)| !compresses(column.as_ref()))
        .fold(properties_builder(), |props, (field, _)| {
            props.set_column_compression(
                ColumnPath::from(field.name().as_str()),
                Compression::UNCOMPRESSED,
            )
        });
    props.set_sorting_columns(key_order(batch)).build()
}

/// `entity_key` as the sort column of a file of `batch`, if its rows are in key order with
/// no null key.
fn key_order(batch: &RecordBatch) -> Option<Vec<SortingColumn>> {
    let keys = crate::read::keys_of_column(batch.column_by_name(ENTITY_KEY)?).ok()?;
    let sorted =
        keys.null_count() == 0 && (1..keys.len()).all(|i| keys.value(i - 1) <= keys.value(i));
    if !sorted {
        return None;
    }
    let schema = ArrowSchemaConverter::new().convert(&batch.schema()).ok()?;
    let leaf = crate::read::flat_leaf(&schema, ENTITY_KEY)?;
    Some(vec![SortingColumn {
        column_idx: i32::try_from(leaf).ok()?,
        descending: false,
        nulls_first: false,
    }])
}

/// Whether LZ4 shrinks a sample of the column's value bytes to at most 80%. Columns that are
/// neither fixed-width nor byte arrays (booleans, lists) keep the default.
fn compresses(column: &dyn Array) -> bool {
    const SAMPLE: usize = 64 << 10;
    let data = column.to_data();
    let sample: &[u8] = match column.data_type() {
        t if t.is_primitive() => {
            let width = t.primitive_width().unwrap_or(1);
            let values = data.buffers()[0].as_slice();
            let from = (data.offset() * width).min(values.len());
            let to = ((data.offset() + data.len()) * width).min(values.len());
            &values[from..to.min(from + SAMPLE)]
        }
        DataType::Binary | DataType::LargeBinary | DataType::Utf8 | DataType::LargeUtf8 => {
            let values = data.buffers()[1].as_slice();
            &values[..values.len().min(SAMPLE)]
        }
        _ => return true,
    };
    sample.len() < 64 || lz4_flex::block::compress(sample).len() * 5 <= sample.len() * 4
}

fn properties_builder() -> WriterPropertiesBuilder {
    WriterProperties::builder()
        // A read miss decodes a row group of small pages; zstd spends most of that decode
        // setting up a context per page (~300 us a row group of 14 columns against ~95 us
        // with LZ4, measured by `read::files` `decode_cost`), for files ~25% smaller.
        .set_compression(Compression::LZ4_RAW)
        // A dictionary page holds every distinct value of its column chunk and must be read
        // before any data page: for unique keys and timestamps that is most of the column, so
        // a point read of one page would fetch the whole dictionary too. LZ4 still compresses.
        .set_dictionary_enabled(false)
        // A row group is one page per column: a page index (column or offset index) would
        // only repeat what the footer says of the row group.
        .set_statistics_enabled(EnabledStatistics::Chunk)
        .set_offset_index_disabled(true)
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
        .set_data_page_row_count_limit(ROW_GROUP_ROWS)
        .set_column_bloom_filter_enabled(ColumnPath::from(ENTITY_KEY), true)
        // Part of our key index (read::index), and other engines' point lookups use it too.
        // Sized for one row group's keys (the default assumes a million: 1 MiB of filter per
        // row group): 512 bytes, ~2-3% false positives. Written next to the footer, so that
        // the footer and every filter are one read.
        .set_column_bloom_filter_ndv(ColumnPath::from(ENTITY_KEY), ROW_GROUP_ROWS as u64)
        .set_column_bloom_filter_fpp(ColumnPath::from(ENTITY_KEY), 0.05)
        .set_bloom_filter_position(BloomFilterPosition::End)
}

/// What one `write` call did.
#[derive(Debug, Default, Clone)]
pub struct WriteReport {
    pub rows_written: usize,
    pub rows_ignored_older: usize,
    pub buckets: usize,
    pub files_added: usize,
    pub files_removed: usize,
    /// Position-delete files added by merge-on-read buckets.
    pub delete_files_added: usize,
    /// Buckets written merge-on-read (the rest of `buckets` were rewritten).
    pub merge_on_read_buckets: usize,
    pub attempts: u32,
    /// Buckets planned again at commit time because another writer changed them first (the
    /// others were rebased: their files kept, only the snapshot rebuilt).
    pub replanned_buckets: usize,
    /// Times the write was carried onto another writer's newer commit keeping its files.
    pub rebases: u32,
    /// Where the commit's time went (the last write's, for summed reports).
    pub timings: commit::Timings,
    pub snapshot_id: Option<i64>,
}

/// Adds a later write's report to this one (the chunks of one ingest): counts are summed, the
/// snapshot is the later write's if it made one. Destructured so that a new field cannot be
/// left out of the sum without a compile error.
impl std::ops::AddAssign<&WriteReport> for WriteReport {
    fn add_assign(&mut self, later: &WriteReport) {
        let WriteReport {
            rows_written,
            rows_ignored_older,
            buckets,
            files_added,
            files_removed,
            delete_files_added,
            merge_on_read_buckets,
            attempts,
            replanned_buckets,
            rebases,
            timings,
            snapshot_id,
        } = later;
        self.rows_written += rows_written;
        self.rows_ignored_older += rows_ignored_older;
        self.buckets += buckets;
        self.files_added += files_added;
        self.files_removed += files_removed;
        self.delete_files_added += delete_files_added;
        self.merge_on_read_buckets += merge_on_read_buckets;
        self.attempts += attempts;
        self.replanned_buckets += replanned_buckets;
        self.rebases += rebases;
        self.timings = *timings;
        self.snapshot_id = snapshot_id.or(self.snapshot_id);
    }
}

/// One bucket written: the new files and the old files they replace.
#[derive(Default)]
struct BucketRewrite {
    added: Vec<DataFile>,
    removed: Vec<Arc<LiveFile>>,
    added_deletes: Vec<DataFile>,
    removed_deletes: Vec<Arc<LiveFile>>,
    stats: MergeStats,
    merge_on_read: bool,
}

impl BucketRewrite {
    fn into_change(self, bucket: i32, state: &TableState) -> BucketChange {
        let paths =
            |files: Vec<Arc<LiveFile>>| files.iter().map(|f| f.path().to_string()).collect();
        BucketChange {
            bucket,
            base: bucket_base(state, bucket),
            spec_id: state.metadata.default_partition_spec_id(),
            added: self.added,
            removed: paths(self.removed),
            added_deletes: self.added_deletes,
            removed_deletes: paths(self.removed_deletes),
            written: self.stats.written,
            ignored_older: self.stats.ignored.len(),
            ignored_rows: self.stats.ignored,
            merge_on_read: self.merge_on_read,
        }
    }
}

/// Where a write puts its files: the table's data location, or (staged distributed writes) a
/// directory of the job's attempt under it, which the job's cleanup can list.
#[derive(Clone, Debug, Default)]
pub struct Placement {
    pub staging: Option<String>,
}

impl Placement {
    /// The directory new data and delete files go under (then `<partition>/<file>`).
    pub fn data_dir(&self, md: &iceberg::spec::TableMetadata) -> String {
        let props = md.properties();
        let root = props
            .get("write.data.path")
            .or_else(|| props.get("write.folder-storage.path"))
            .cloned()
            .unwrap_or_else(|| format!("{}/data", md.location()));
        match &self.staging {
            Some(dir) => format!("{}/{dir}", root.trim_end_matches('/')),
            None => root,
        }
    }
}

/// Writes `batch` as the data file(s) of `bucket` in the table's current partition spec.
async fn write_bucket(
    io: &StoreIo,
    state: &TableState,
    bucket: i32,
    batch: RecordBatch,
    prefix: String,
) -> Result<Vec<DataFile>> {
    let spec = state.metadata.default_partition_spec().as_ref().clone();
    write_bucket_in(io, state, &spec, bucket, batch, prefix).await
}

/// Writes `batch` as the data file(s) of `bucket` of partition spec `spec`.
async fn write_bucket_in(
    io: &StoreIo,
    state: &TableState,
    spec: &PartitionSpec,
    bucket: i32,
    batch: RecordBatch,
    prefix: String,
) -> Result<Vec<DataFile>> {
    let (file_io, schema) = (io.file_io.clone(), state.layout.schema.clone());
    let location =
        DefaultLocationGenerator::with_data_location(io.placement.data_dir(&state.metadata));
    let names = DefaultFileNameGenerator::new(prefix, None, DataFileFormat::Parquet);
    let key = PartitionKey::new(
        spec.clone(),
        state.layout.schema.clone(),
        Struct::from_iter([Some(Literal::int(bucket))]),
    );
    // Choosing the codecs (an LZ4 trial per column) and checking the key order, encoding and
    // compressing: CPU work, in a cpu slot, off the async workers.
    crate::runtime::cpu_future(async move {
        let parquet = ParquetWriterBuilder::new(writer_properties_for(&batch), schema);
        let rolling =
            RollingFileWriterBuilder::new_with_default_file_size(parquet, file_io, location, names);
        let mut writer = DataFileWriterBuilder::new(rolling).build(Some(key)).await?;
        writer.write(batch).await?;
        Ok(writer.close().await?)
    })
    .await?
}

/// What a bucket task needs of the store; owned, since tasks outlive the caller's borrow.
#[derive(Clone)]
struct StoreIo {
    file_io: FileIO,
    cache: Arc<DataFiles>,
    stats: Arc<IoStats>,
    policy: MorPolicy,
    placement: Placement,
}

impl StoreIo {
    fn new(store: &Store, placement: Placement) -> Self {
        Self {
            file_io: store.file_io.clone(),
            cache: store.files.clone(),
            stats: store.io.clone(),
            policy: MorPolicy::from_config(&store.config),
            placement,
        }
    }
}

/// A bucket as stored: its data files and delete files, and the deletes decoded.
struct StoredBucket<'a> {
    id: i32,
    files: &'a [Arc<LiveFile>],
    delete_files: &'a [Arc<LiveFile>],
    deletes: &'a BucketDeletes,
}

/// The bucket's own delete files: they name no file of another bucket, so a rewrite of this
/// bucket may drop them.
fn own_deletes(bucket: i32, delete_files: &[Arc<LiveFile>]) -> Vec<Arc<LiveFile>> {
    delete_files
        .iter()
        .filter(|d| d.bucket == Some(bucket))
        .cloned()
        .collect()
}

/// Adds `incoming[rows]` to the bucket as a new data file plus a position-delete file for the
/// stored rows they replace. The stored rows are found like a read finds them (key index,
/// then the row group, cached for the reads that follow), deletes applied. With `merge_runs`
/// the bucket's smallest files are folded in too (`fold_runs`).
async fn merge_on_read(
    io: &StoreIo,
    state: &TableState,
    incoming: &RecordBatch,
    rows: &[usize],
    stored: StoredBucket<'_>,
    merge_runs: usize,
    prefix: String,
) -> Result<BucketRewrite> {
    let StoredBucket {
        id: bucket,
        files,
        delete_files,
        deletes,
    } = stored;
    let layout = &state.layout;
    let keys = keys_of(incoming, layout)?;
    let wanted: Vec<&[u8]> = rows.iter().map(|&r| keys.value(r)).collect();
    let requests: Vec<(&LiveFile, &[&[u8]])> = files
        .iter()
        .map(|f| (f.as_ref(), wanted.as_slice()))
        .collect();
    let found = io
        .cache
        .find_in(&io.file_io, &requests, layout, &io.stats, Fill::Versions)
        .await?;
    let mut stored: FastMap<&[u8], Vec<StoredRow>> = FastMap::default();
    for (f, hits) in files.iter().zip(found) {
        for (key, hit) in wanted.iter().zip(hits) {
            let Some(hit) = hit else { continue };
            let pos = hit.position();
            if !deletes.is_deleted(f, pos) {
                stored.entry(*key).or_default().push(StoredRow {
                    version: hit.version,
                    path: f.path().to_string(),
                    pos,
                });
            }
        }
    }
    let plan = plan_merge_on_read(incoming, rows, layout, |key| {
        stored.remove(key).unwrap_or_default()
    })?;
    let mut out = BucketRewrite {
        stats: plan.stats,
        merge_on_read: true,
        ..BucketRewrite::default()
    };
    let Some(mut batch) = plan.rows else {
        return Ok(out);
    };
    let mut new_deletes = plan.deletes;
    if merge_runs > 0 {
        let merged = fold_runs(io, state, files, merge_runs, deletes, batch, new_deletes).await?;
        (batch, new_deletes, out.removed) = merged;
        out.removed_deletes = own_deletes(bucket, delete_files);
    }
    out.added = write_bucket(io, state, bucket, batch, prefix.clone()).await?;
    if !new_deletes.is_empty() {
        let dir = io.placement.data_dir(&state.metadata);
        match deletes::write_position_deletes(
            &io.file_io,
            state,
            &dir,
            bucket,
            &prefix,
            &new_deletes,
        )
        .await
        {
            Ok(d) => out.added_deletes.push(d),
            Err(e) => {
                let paths: Vec<String> = out
                    .added
                    .iter()
                    .map(|d| d.file_path().to_string())
                    .collect();
                delete_quietly(&io.file_io, &state.id, &paths).await;
                return Err(e);
            }
        }
    }
    Ok(out)
}

/// Folds the bucket's `n` smallest files into the rows a merge-on-read write adds: returns
/// those rows (the folded files' live rows, minus the ones `replaced` deletes, plus
/// `winners`, sorted by key), every delete of the files kept (old and `replaced`) for one new
/// delete file, and the folded files, which the commit removes along with the bucket's delete
/// files. Costs the folded files' rows, not the bucket's.
async fn fold_runs(
    io: &StoreIo,
    state: &TableState,
    files: &[Arc<LiveFile>],
    n: usize,
    deletes: &BucketDeletes,
    winners: RecordBatch,
    replaced: Vec<(String, u64)>,
) -> Result<(RecordBatch, Vec<(String, u64)>, Vec<Arc<LiveFile>>)> {
    let layout = &state.layout;
    let mut by_size: Vec<&Arc<LiveFile>> = files.iter().collect();
    by_size.sort_by_key(|f| f.entry.record_count());
    let (folded, kept) = by_size.split_at(n.min(by_size.len()));
    let replaced_in = |path: &str| -> Vec<u64> {
        replaced
            .iter()
            .filter(|(p, _)| p == path)
            .map(|(_, pos)| *pos)
            .collect()
    };
    let mut parts = Vec::with_capacity(folded.len());
    for f in folded {
        let batch = load_whole_file(&io.file_io, f.path(), layout, &io.stats.data).await?;
        let mut live = vec![true; batch.num_rows()];
        for p in deletes
            .deleted_positions(f)
            .into_iter()
            .chain(replaced_in(f.path()))
        {
            if let Some(slot) = usize::try_from(p).ok().and_then(|p| live.get_mut(p)) {
                *slot = false;
            }
        }
        let mask = arrow_array::BooleanArray::from(live);
        parts.push(arrow_select::filter::filter_record_batch(&batch, &mask)?);
    }
    let kept_rows = arrow_select::concat::concat_batches(&layout.arrow, &parts)?;
    // The kept rows and the winners hold different keys (a winner's stored row is in
    // `replaced`), so the merge only sorts them.
    let all: Vec<usize> = (0..winners.num_rows()).collect();
    let merge_layout = state.layout.clone();
    let (merged, _) = crate::runtime::cpu(move || {
        merge_bucket(Some(&kept_rows), &winners, &all, &merge_layout, true)
    })
    .await??;
    let merged = merged.ok_or_else(|| Error::internal("forced merge returned nothing"))?;
    let mut kept_deletes: Vec<(String, u64)> = kept
        .iter()
        .flat_map(|f| {
            deletes
                .deleted_positions(f)
                .into_iter()
                .chain(replaced_in(f.path()))
                .map(|p| (f.path().to_string(), p))
        })
        .collect();
    kept_deletes.sort_unstable();
    kept_deletes.dedup();
    Ok((
        merged,
        kept_deletes,
        folded.iter().map(|f| (*f).clone()).collect(),
    ))
}

/// A bucket as `state` holds it: its data files, its delete files and their deletes.
struct BucketFiles {
    files: Vec<Arc<LiveFile>>,
    delete_files: Vec<Arc<LiveFile>>,
    deletes: BucketDeletes,
}

async fn bucket_files(io: &StoreIo, state: &TableState, bucket: i32) -> Result<BucketFiles> {
    let files = state.files.files_for_bucket(bucket).cloned().collect();
    let delete_files: Vec<Arc<LiveFile>> =
        state.files.deletes_for_bucket(bucket).cloned().collect();
    let deletes = io
        .cache
        .bucket_deletes(&io.file_io, delete_files.iter(), &io.stats.data)
        .await?;
    Ok(BucketFiles {
        files,
        delete_files,
        deletes,
    })
}

/// The rows `files` hold, `deletes` applied, in the table's schema (None without files).
async fn stored_rows(
    io: &StoreIo,
    state: &TableState,
    files: &[Arc<LiveFile>],
    deletes: &BucketDeletes,
) -> Result<Option<RecordBatch>> {
    let layout = &state.layout;
    let mut parts = Vec::with_capacity(files.len());
    for f in files {
        let batch = load_whole_file(&io.file_io, f.path(), layout, &io.stats.data).await?;
        parts.push(deletes.apply(f, &batch)?);
    }
    Ok(match parts.len() {
        0 => None,
        1 => parts.pop(),
        _ => Some(arrow_select::concat::concat_batches(&layout.arrow, &parts)?),
    })
}

async fn rewrite_bucket(
    io: StoreIo,
    state: Arc<TableState>,
    incoming: Arc<RecordBatch>,
    bucket: i32,
    rows: Vec<usize>,
    attempt_id: Uuid,
    force: bool,
) -> Result<BucketChange> {
    let done =
        rewrite_bucket_files(io, state.clone(), incoming, bucket, rows, attempt_id, force).await?;
    Ok(done.into_change(bucket, &state))
}

async fn rewrite_bucket_files(
    io: StoreIo,
    state: Arc<TableState>,
    incoming: Arc<RecordBatch>,
    bucket: i32,
    rows: Vec<usize>,
    attempt_id: Uuid,
    force: bool,
) -> Result<BucketRewrite> {
    let layout = &state.layout;
    let BucketFiles {
        files,
        delete_files,
        deletes,
    } = bucket_files(&io, &state, bucket).await?;
    let prefix = format!("{attempt_id}-b{bucket}");
    let mode = if force || !io.policy.may_merge_on_read(files.len()) {
        BucketMode::CopyOnWrite
    } else {
        let keys = keys_of(&incoming, layout)?;
        let wanted: Vec<&[u8]> = rows.iter().map(|&r| keys.value(r)).collect();
        let replaced = io
            .cache
            .maybe_held(&io.file_io, &files, &wanted, &io.stats)
            .await?;
        io.policy.mode(&BucketShape {
            incoming: rows.len(),
            replaced,
            run_rows: files.iter().map(|f| f.entry.record_count()).collect(),
            deleted_rows: deletes.deleted_rows(),
        })
    };
    if let BucketMode::MergeOnRead { merge_runs } = mode {
        let stored = StoredBucket {
            id: bucket,
            files: &files,
            delete_files: &delete_files,
            deletes: &deletes,
        };
        return merge_on_read(&io, &state, &incoming, &rows, stored, merge_runs, prefix).await;
    }
    // Copy-on-write (also the automatic compaction of a bucket past the merge-on-read
    // limits): the live rows, deletes applied, merged and written as one sorted file that
    // replaces the bucket's data files and drops its delete files.
    let existing = stored_rows(&io, state.as_ref(), &files, &deletes).await?;
    let layout = state.layout.clone();
    let (merged, stats) = crate::runtime::cpu(move || {
        merge_bucket(existing.as_ref(), &incoming, &rows, &layout, force)
    })
    .await??;
    let Some(merged) = merged else {
        return Ok(BucketRewrite {
            stats,
            ..BucketRewrite::default()
        });
    };
    let added = write_bucket(&io, &state, bucket, merged, prefix).await?;
    Ok(BucketRewrite {
        added,
        removed: files,
        removed_deletes: own_deletes(bucket, &delete_files),
        stats,
        ..BucketRewrite::default()
    })
}

/// Fails on tables this store cannot write: files not in its bucket spec (written by another
/// tool, or left in an older spec), equality deletes.
fn check_plannable(state: &TableState) -> Result<()> {
    if state.files.unbucketed_count() > 0 {
        return Err(Error::table_state(
            &state.id,
            "it holds files not partitioned by bucket(entity_key) in its current spec \
             (written by another tool); migrate it before writing",
        ));
    }
    state.files.check_deletes_supported(&state.id)
}

/// Rewrites `groups` (bucket -> rows of `incoming`) on `state` in parallel, one task per
/// bucket (a compaction's tasks a core's worth at a time: each holds a whole bucket). On an
/// error, the files of every bucket already written are deleted.
async fn plan_buckets(
    io: &StoreIo,
    state: &Arc<TableState>,
    incoming: &Arc<RecordBatch>,
    groups: impl Iterator<Item = (i32, Vec<usize>)>,
    compaction: bool,
) -> Result<Vec<BucketChange>> {
    check_plannable(state)?;
    let attempt_id = Uuid::new_v4();
    let tasks = groups.map(|(bucket, rows)| {
        rewrite_bucket(
            io.clone(),
            state.clone(),
            incoming.clone(),
            bucket,
            rows,
            attempt_id,
            compaction,
        )
    });
    let limit = if compaction {
        crate::runtime::cores()
    } else {
        usize::MAX
    };
    run_bucket_tasks(io, state, tasks, limit).await
}

/// Runs bucket tasks, at most `limit` at once. On an error no further task starts, and once
/// the running ones are done, the files of every bucket written are deleted.
async fn run_bucket_tasks<F>(
    io: &StoreIo,
    state: &TableState,
    mut tasks: impl Iterator<Item = F>,
    limit: usize,
) -> Result<Vec<BucketChange>>
where
    F: Future<Output = Result<BucketChange>> + Send + 'static,
{
    let mut running = tokio::task::JoinSet::new();
    let mut changes = Vec::new();
    let mut first_error = None;
    loop {
        while first_error.is_none() && running.len() < limit {
            let Some(task) = tasks.next() else { break };
            running.spawn(task);
        }
        let Some(done) = running.join_next().await else {
            break;
        };
        match done.map_err(|e| Error::internal(format!("bucket task failed: {e}"))) {
            Ok(Ok(change)) => changes.push(change),
            Ok(Err(e)) | Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_error {
        let paths: Vec<String> = changes
            .iter()
            .flat_map(BucketChange::written_paths)
            .collect();
        delete_quietly(&io.file_io, &state.id, &paths).await;
        return Err(e);
    }
    Ok(changes)
}

/// The incoming rows of one write, converted for a schema and grouped by bucket.
struct Converted {
    /// The schema and partition spec of the table they were converted and grouped for.
    shape: (i32, i32),
    incoming: Arc<RecordBatch>,
    groups: BTreeMap<i32, Vec<usize>>,
}

/// What converting and grouping rows depend on: the schema and the partition spec.
fn shape(state: &TableState) -> (i32, i32) {
    let md = &state.metadata;
    (md.current_schema_id(), md.default_partition_spec_id())
}

/// Where a write's rows come from.
enum Rows {
    /// Rows already in the table's Arrow schema (they must still fit when planned).
    Batch(Arc<RecordBatch>),
    /// None: compaction rewrites buckets from their own rows.
    Compaction { all: bool },
}

/// The planner of upserts and compactions in this process.
struct RowsPlanner {
    io: StoreIo,
    rows: Rows,
    converted: Option<Converted>,
}

impl RowsPlanner {
    /// The rows converted for `state`'s schema and grouped by its buckets: converting is the
    /// costly part of planning, so it is redone only when the schema or partitioning moved.
    fn converted(&mut self, state: &TableState) -> Result<&Converted> {
        if self
            .converted
            .as_ref()
            .is_none_or(|c| c.shape != shape(state))
        {
            let incoming = match &self.rows {
                Rows::Batch(batch) if batch.schema() == state.layout.arrow => batch.clone(),
                Rows::Batch(_) => {
                    return Err(Error::schema(format!(
                        "{} changed schema while rows were being converted for it",
                        state.id
                    )));
                }
                Rows::Compaction { .. } => {
                    Arc::new(RecordBatch::new_empty(state.layout.arrow.clone()))
                }
            };
            let groups = match &self.rows {
                Rows::Compaction { .. } => BTreeMap::new(),
                _ => winners_by_bucket(&incoming, &state.layout)?,
            };
            self.converted = Some(Converted {
                shape: shape(state),
                incoming,
                groups,
            });
        }
        self.converted
            .as_ref()
            .ok_or_else(|| Error::internal("rows not converted"))
    }
}

#[async_trait::async_trait]
impl Planner for RowsPlanner {
    async fn plan(
        &mut self,
        state: &Arc<TableState>,
        again: Option<&[BucketChange]>,
    ) -> Result<Vec<BucketChange>> {
        // Changes of another spec name buckets of another numbering: all is planned again.
        let spec = state.metadata.default_partition_spec_id();
        let buckets: Option<BTreeSet<i32>> = again
            .filter(|a| a.iter().all(|c| c.spec_id == spec))
            .map(|a| a.iter().map(|c| c.bucket).collect());
        let buckets = buckets.as_ref();
        let compaction = match self.rows {
            Rows::Compaction { all } => Some(all),
            _ => None,
        };
        let converted = self.converted(state)?;
        let incoming = converted.incoming.clone();
        let groups: Vec<(i32, Vec<usize>)> = match compaction {
            // A bucket another writer changed is compacted again only if it still needs it.
            Some(all) => compaction_buckets(state, all)
                .into_iter()
                .filter(|b| buckets.is_none_or(|want| want.contains(b)))
                .map(|b| (b, Vec::new()))
                .collect(),
            None => converted
                .groups
                .iter()
                .filter(|(b, _)| buckets.is_none_or(|want| want.contains(b)))
                .map(|(b, rows)| (*b, rows.clone()))
                .collect(),
        };
        plan_buckets(
            &self.io,
            state,
            &incoming,
            groups.into_iter(),
            compaction.is_some(),
        )
        .await
    }

    fn compaction(&self) -> bool {
        matches!(self.rows, Rows::Compaction { .. })
    }
}

/// The write report of a landed data commit.
fn report(done: Committed) -> WriteReport {
    let mut report = WriteReport {
        attempts: done.attempts,
        replanned_buckets: done.replanned,
        rebases: done.rebases,
        timings: done.timings,
        snapshot_id: done.snapshot_id,
        ..WriteReport::default()
    };
    for c in &done.changes {
        report.rows_written += c.written;
        report.rows_ignored_older += c.ignored_older;
        if !c.added.is_empty() {
            report.buckets += 1;
            report.merge_on_read_buckets += usize::from(c.merge_on_read);
        }
        report.files_added += c.added.len();
        report.files_removed += c.removed.len();
        report.delete_files_added += c.added_deletes.len();
    }
    report
}

async fn commit_rows(store: &Store, table: &str, rows: Rows) -> Result<WriteReport> {
    let id = store.table_id(table)?;
    let mut planner = RowsPlanner {
        io: StoreIo::new(store, Placement::default()),
        rows,
        converted: None,
    };
    Ok(report(
        commit::commit_buckets(store, &id, &mut planner).await?,
    ))
}

/// Upserts Feast's rows: converted (and validated) for the table's schema, then committed
/// with whatever other writes to the table this process has waiting (`group`).
pub async fn upsert(
    store: &Arc<Store>,
    table: &str,
    input: &WriteInput<'_>,
) -> Result<WriteReport> {
    let id = store.table_id(table)?;
    // The cached schema serves the conversion; a batch converted for a schema that moved
    // meanwhile is converted again for the new one.
    let mut state = store.current(&id, Duration::MAX).await?;
    loop {
        let batch = build_write_batch(&state.layout, input)?;
        let schema = batch.schema();
        match group::write(store, &id, batch).await {
            Err(Error::SchemaMismatch(why)) => {
                let fresh = store.current(&id, Duration::ZERO).await?;
                if fresh.layout.arrow == schema {
                    return Err(Error::SchemaMismatch(why));
                }
                state = fresh;
            }
            done => return done,
        }
    }
}

/// Upserts rows already in the table's Arrow schema (migration converts them itself).
pub async fn upsert_batch(store: &Store, table: &str, batch: RecordBatch) -> Result<WriteReport> {
    commit_rows(store, table, Rows::Batch(Arc::new(batch))).await
}

/// Buckets a compaction rewrites: those with several data files or with delete files, or
/// every bucket (`all`, which also removes duplicate keys inside single files).
pub fn compaction_buckets(state: &TableState, all: bool) -> Vec<i32> {
    state
        .files
        .buckets()
        .filter(|(b, files)| {
            all || files.len() > 1 || state.files.deletes_for_bucket(*b).next().is_some()
        })
        .map(|(b, _)| b)
        .collect()
}

/// Rewrites buckets into one sorted file each, newest row per key, deletes applied and
/// dropped, in one `replace` snapshot.
pub async fn compact(store: &Store, table: &str, all: bool) -> Result<WriteReport> {
    commit_rows(store, table, Rows::Compaction { all }).await
}

/// Commits staged tokens (a distributed materialization's tasks) in one snapshot.
pub async fn commit_staged(store: &Store, table: &str, tokens: Vec<Token>) -> Result<WriteReport> {
    let id = store.table_id(table)?;
    let mut planner = stage::StagedPlanner::new(store, table, tokens)?;
    Ok(report(
        commit::commit_buckets(store, &id, &mut planner).await?,
    ))
}
