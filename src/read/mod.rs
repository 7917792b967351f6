//! The read path: hashed point lookups over immutable data files.
//!
//! A lookup hashes each key to its bucket and consults only that bucket's files, keeping the
//! newest row (robust to tables that hold duplicates, e.g. written by the contrib store). A
//! cached file answers from memory (`cache`); a file that is not cached yet is probed for just
//! the requested keys (`probe`) while the whole file is loaded into the cache in the
//! background, so the first read is cheap and the following ones are served from memory.
//! Position deletes (merge-on-read writes) are folded in: a deleted row is invisible, so of a
//! key's rows in several files of its bucket only the live one answers.

mod cache;
mod deletes;
mod probe;

use std::collections::HashMap;
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::TimestampMicrosecondType;
use arrow_array::{Array, ArrayRef, LargeBinaryArray, RecordBatch, new_null_array};
use arrow_schema::SchemaRef;
use iceberg::io::FileIO;
use iceberg::spec::Transform;
use iceberg::transform::create_transform_function;

pub use cache::{FileCache, FileData};
pub use deletes::{
    BucketDeletes, DELETE_FILE_PATH, DELETE_FILE_PATH_ID, DELETE_POS, DELETE_POS_ID,
    PositionDeletes,
};

use crate::convert::cell_to_value;
use crate::error::{Error, Result};
use crate::proto;
use crate::schema::{Column, Layout};
use crate::storage::IoStats;
use crate::table::{LiveFile, TableState};

/// Event and created timestamps of a row: the newer pair wins, created_ts breaks ties.
pub type Version = (i64, Option<i64>);

pub fn row_version(batch: &RecordBatch, row: usize, layout: &Layout) -> Version {
    let ev = batch
        .column(layout.event_ts)
        .as_primitive::<TimestampMicrosecondType>();
    let cr = batch
        .column(layout.created_ts)
        .as_primitive::<TimestampMicrosecondType>();
    (ev.value(row), (!cr.is_null(row)).then(|| cr.value(row)))
}

pub fn keys_of(batch: &RecordBatch, layout: &Layout) -> Result<LargeBinaryArray> {
    batch
        .column(layout.entity_key)
        .as_binary_opt::<i64>()
        .cloned()
        .ok_or_else(|| Error::internal("entity_key column is not LargeBinary"))
}

/// An entity-key column as read from any file (`binary` may arrive as Binary or LargeBinary).
pub fn keys_of_column(column: &ArrayRef) -> Result<LargeBinaryArray> {
    arrow_cast::cast(column, &arrow_schema::DataType::LargeBinary)?
        .as_binary_opt::<i64>()
        .cloned()
        .ok_or_else(|| Error::internal("entity_key column is not binary"))
}

/// Re-shapes a batch read from a file to the table's current Arrow schema: columns matched by
/// name, cast when an older writer used another Arrow type, null when the file predates the
/// column (schema evolution).
pub fn align_to(batch: &RecordBatch, target: &SchemaRef) -> Result<RecordBatch> {
    let rows = batch.num_rows();
    let columns: Vec<ArrayRef> = target
        .fields()
        .iter()
        .map(|f| match batch.column_by_name(f.name()) {
            Some(c) if c.data_type() == f.data_type() => Ok(c.clone()),
            Some(c) => Ok(arrow_cast::cast(c, f.data_type())?),
            None => Ok(new_null_array(f.data_type(), rows)),
        })
        .collect::<Result<_>>()?;
    Ok(RecordBatch::try_new(target.clone(), columns)?)
}

/// Iceberg's `bucket[N]` (murmur3) of each serialized key, as engines compute it for pruning.
pub fn buckets(keys: &LargeBinaryArray, n: u32) -> Result<Vec<i32>> {
    let f = create_transform_function(&Transform::Bucket(n))?;
    let out = f.transform(Arc::new(keys.clone()))?;
    Ok(out
        .as_primitive::<arrow_array::types::Int32Type>()
        .values()
        .to_vec())
}

/// Lookup results aligned with the request.
#[derive(Debug, Default)]
pub struct ReadOutput {
    pub names: Vec<String>,
    pub event_ts: Vec<Option<i64>>,
    /// Per key, the requested features as one serialized `feast.types.RepeatedValue` (in
    /// `names` order): Python parses one message per row instead of one per cell.
    pub rows: Vec<Option<Vec<u8>>>,
}

/// The requested feature columns; unknown names are skipped, like Feast's own stores do.
fn requested<'a>(layout: &'a Layout, features: Option<&[String]>) -> Vec<&'a Column> {
    match features {
        None => layout.features.iter().collect(),
        Some(names) => names.iter().filter_map(|n| layout.feature(n)).collect(),
    }
}

/// The rows of one file a lookup needs: the cached file, or a probe for `keys` while the file
/// is loaded in the background.
pub(crate) async fn rows_of(
    file: &Arc<LiveFile>,
    keys: &[&[u8]],
    cache: &Arc<FileCache>,
    file_io: &FileIO,
    layout: &Arc<Layout>,
    io: &Arc<IoStats>,
) -> Result<Arc<FileData>> {
    if let Some(hit) = cache.cached(file.path(), layout.schema.schema_id()) {
        return Ok(hit);
    }
    cache.warm_in_background(file_io, file, layout, io);
    Ok(Arc::new(
        probe::probe(file_io, file, layout, keys, io).await?,
    ))
}

/// Looks up each key's newest row. A row whose event timestamp is before `not_before` (micros;
/// the feature view's TTL cut) counts as absent and is never encoded: an expired older row
/// cannot stand in for it, since it is older still.
pub async fn lookup(
    state: &TableState,
    cache: &Arc<FileCache>,
    file_io: &FileIO,
    io: &Arc<IoStats>,
    serialized_keys: &LargeBinaryArray,
    features: Option<&[String]>,
    not_before: Option<i64>,
) -> Result<ReadOutput> {
    let layout = &state.layout;
    state.files.check_deletes_supported(&state.id)?;
    let bucket_of_key = buckets(serialized_keys, layout.buckets)?;

    // The requested keys of each file the request touches; every file is read once,
    // concurrently.
    let mut keys_by_file: HashMap<&str, (&Arc<LiveFile>, Vec<&[u8]>)> = HashMap::new();
    for (i, bucket) in bucket_of_key.iter().enumerate() {
        for f in state.files.files_for_bucket(*bucket) {
            keys_by_file
                .entry(f.path())
                .or_insert_with(|| (f, Vec::new()))
                .1
                .push(serialized_keys.value(i));
        }
    }
    let needed: Vec<_> = keys_by_file.values().collect();
    let mut touched: Vec<i32> = bucket_of_key.clone();
    touched.sort_unstable();
    touched.dedup();
    let (loaded, deletes) =
        futures::future::try_join(
            futures::future::try_join_all(
                needed
                    .iter()
                    .map(|(f, keys)| rows_of(f, keys, cache, file_io, layout, io)),
            ),
            futures::future::try_join_all(touched.iter().map(|b| {
                cache.bucket_deletes(file_io, state.files.deletes_for_bucket(*b), &io.data)
            })),
        )
        .await?;
    let deletes: HashMap<i32, BucketDeletes> = touched.into_iter().zip(deletes).collect();
    let by_path: HashMap<&str, &Arc<FileData>> = needed
        .iter()
        .map(|(f, _)| f.path())
        .zip(loaded.iter())
        .collect();

    let columns = requested(layout, features);
    let mut out = ReadOutput {
        names: columns.iter().map(|c| c.name.clone()).collect(),
        event_ts: Vec::with_capacity(serialized_keys.len()),
        rows: Vec::with_capacity(serialized_keys.len()),
    };
    for (i, bucket) in bucket_of_key.iter().enumerate() {
        let key = serialized_keys.value(i);
        let mut best: Option<(&Arc<FileData>, u32, Version)> = None;
        let bucket_deletes = &deletes[bucket];
        for f in state.files.files_for_bucket(*bucket) {
            let data = by_path[f.path()];
            if let Some(&row) = data.index.get(key) {
                if bucket_deletes.is_deleted(f, data.position(row)) {
                    continue;
                }
                let v = data.version(row, layout);
                if best.as_ref().is_none_or(|(_, _, bv)| v >= *bv) {
                    best = Some((data, row, v));
                }
            }
        }
        match best {
            Some((data, row, (ev, _))) if not_before.is_none_or(|cut| ev >= cut) => {
                let row = row as usize;
                out.event_ts.push(Some(ev));
                let mut encoded = Vec::with_capacity(16 * columns.len());
                for c in &columns {
                    let value = cell_to_value(c.kind, data.batch.column(c.index), row);
                    proto::push_repeated_value_item(&mut encoded, &value);
                }
                out.rows.push(Some(encoded));
            }
            _ => {
                out.event_ts.push(None);
                out.rows.push(None);
            }
        }
    }
    Ok(out)
}
