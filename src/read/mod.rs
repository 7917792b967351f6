//! The read path: hashed point lookups over immutable data files.
//!
//! A lookup hashes each key to its bucket and consults only that bucket's files, keeping the
//! newest row (robust to tables that hold duplicates, e.g. written by the contrib store). In
//! each file the key index names the one row group that may hold the key; the row group comes
//! from the block cache or from one ranged read (`files`). So a read costs the keys asked
//! for, whether or not the table fits in memory.
//! Position deletes (merge-on-read writes) are folded in: a deleted row is invisible, so of a
//! key's rows in several files of its bucket only the live one answers.

mod cache;
mod deletes;
mod files;
mod index;
mod plain;
mod response;
mod warm;

use std::collections::HashMap;
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::TimestampMicrosecondType;
use arrow_array::{Array, ArrayRef, LargeBinaryArray, RecordBatch, new_null_array};
use arrow_schema::SchemaRef;
use iceberg::io::FileIO;
use iceberg::spec::Transform;
use iceberg::transform::create_transform_function;

pub use cache::CacheStats;
pub use deletes::{
    BucketDeletes, DELETE_FILE_PATH, DELETE_FILE_PATH_ID, DELETE_POS, DELETE_POS_ID,
    PositionDeletes,
};
pub use files::{DataFiles, Fill, Hit, load_whole_file, read_whole_parquet};
pub use index::FileIndex;
pub use response::{Wanted, push_feature_vectors};
pub use warm::{WarmPlan, warm, warm_plan};

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

fn requested<'a>(layout: &'a Layout, features: Option<&[String]>) -> Vec<&'a Column> {
    match features {
        None => layout.features.iter().collect(),
        Some(names) => names.iter().filter_map(|n| layout.feature(n)).collect(),
    }
}

/// Each key's newest live row, aligned with the request (duplicates included). A row whose
/// event timestamp is before `not_before` (micros; the feature view's TTL cut) counts as absent:
/// an expired older row cannot stand in for it, since it is older still.
pub async fn find_rows(
    state: &TableState,
    files: &DataFiles,
    file_io: &FileIO,
    io: &Arc<IoStats>,
    serialized_keys: &LargeBinaryArray,
    not_before: Option<i64>,
) -> Result<Vec<Option<Hit>>> {
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
    let requests: Vec<(&LiveFile, &[&[u8]])> = needed
        .iter()
        .map(|(f, keys)| (f.as_ref(), keys.as_slice()))
        .collect();
    let mut touched: Vec<i32> = bucket_of_key.clone();
    touched.sort_unstable();
    touched.dedup();
    let (found, deletes) =
        futures::future::try_join(
            files.find_in(file_io, &requests, layout, io, Fill::Cache),
            futures::future::try_join_all(touched.iter().map(|b| {
                files.bucket_deletes(file_io, state.files.deletes_for_bucket(*b), &io.data)
            })),
        )
        .await?;
    let deletes: HashMap<i32, BucketDeletes> = touched.into_iter().zip(deletes).collect();
    let mut hits: HashMap<(&str, &[u8]), Hit> = HashMap::new();
    for ((f, keys), found) in needed.iter().zip(found) {
        for (key, hit) in keys.iter().zip(found) {
            if let Some(hit) = hit {
                hits.insert((f.path(), *key), hit);
            }
        }
    }

    let newest = |i: usize, bucket: i32| {
        let key = serialized_keys.value(i);
        let bucket_deletes = &deletes[&bucket];
        let mut best: Option<&Hit> = None;
        for f in state.files.files_for_bucket(bucket) {
            let Some(hit) = hits.get(&(f.path(), key)) else {
                continue;
            };
            if bucket_deletes.is_deleted(f, hit.position()) {
                continue;
            }
            if best.is_none_or(|b| hit.version >= b.version) {
                best = Some(hit);
            }
        }
        best.filter(|hit| not_before.is_none_or(|cut| hit.version.0 >= cut))
            .cloned()
    };
    Ok(bucket_of_key
        .iter()
        .enumerate()
        .map(|(i, bucket)| newest(i, *bucket))
        .collect())
}

/// The rows found as `online_read` hands them to Python: per key one `RepeatedValue` of the
/// requested features (unknown names are skipped, like Feast's own stores do).
pub fn encode_rows(
    layout: &Layout,
    hits: &[Option<Hit>],
    features: Option<&[String]>,
) -> ReadOutput {
    let columns = requested(layout, features);
    let mut out = ReadOutput {
        names: columns.iter().map(|c| c.name.clone()).collect(),
        event_ts: Vec::with_capacity(hits.len()),
        rows: Vec::with_capacity(hits.len()),
    };
    for hit in hits {
        let Some(hit) = hit else {
            out.event_ts.push(None);
            out.rows.push(None);
            continue;
        };
        out.event_ts.push(Some(hit.version.0));
        let mut encoded = Vec::with_capacity(16 * columns.len());
        for c in &columns {
            let value = hit.block.value(c, hit.row);
            proto::push_repeated_value_item(&mut encoded, &value);
        }
        out.rows.push(Some(encoded));
    }
    out
}
