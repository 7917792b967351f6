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
pub use files::{DataFiles, Fill, Hit, flat_leaf, load_whole_file, read_whole_parquet};
pub use index::FileIndex;
pub use response::{Wanted, push_feature_vectors, push_response_head};
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

/// The keys of one request that fall in one bucket: their positions in the request, and the
/// keys themselves.
struct Run<'a> {
    bucket: i32,
    rows: &'a [usize],
    keys: Vec<&'a [u8]>,
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

    // The request's keys by bucket (a stable sort keeps request order within a bucket), then
    // one lookup per file of each touched bucket; every lookup runs concurrently. Keys and
    // files are addressed by position: hashing file paths per key was a visible share of a
    // warm read.
    let mut order: Vec<usize> = (0..bucket_of_key.len()).collect();
    order.sort_by_key(|&i| bucket_of_key[i]);
    let runs: Vec<Run<'_>> = order
        .chunk_by(|a, b| bucket_of_key[*a] == bucket_of_key[*b])
        .map(|rows| Run {
            bucket: bucket_of_key[rows[0]],
            rows,
            keys: rows.iter().map(|&i| serialized_keys.value(i)).collect(),
        })
        .collect();
    let lookups: Vec<(usize, &Arc<LiveFile>)> = runs
        .iter()
        .enumerate()
        .flat_map(|(r, run)| {
            state
                .files
                .files_for_bucket(run.bucket)
                .map(move |f| (r, f))
        })
        .collect();
    let requests: Vec<(&LiveFile, &[&[u8]])> = lookups
        .iter()
        .map(|(r, f)| (f.as_ref(), runs[*r].keys.as_slice()))
        .collect();
    let (found, deletes) = futures::future::try_join(
        files.find_in(file_io, &requests, layout, io, Fill::Cache),
        futures::future::try_join_all(runs.iter().map(|run| {
            files.bucket_deletes(
                file_io,
                state.files.deletes_for_bucket(run.bucket),
                &io.data,
            )
        })),
    )
    .await?;

    // A bucket's files in its order: of equal versions the later file's row wins.
    let mut newest: Vec<Option<Hit>> = vec![None; bucket_of_key.len()];
    for ((r, file), found) in lookups.iter().zip(found) {
        let (run, bucket_deletes) = (runs[*r].rows, &deletes[*r]);
        for (&i, hit) in run.iter().zip(found) {
            let Some(hit) = hit else { continue };
            if bucket_deletes.is_deleted(file, hit.position()) {
                continue;
            }
            if newest[i].as_ref().is_none_or(|b| hit.version >= b.version) {
                newest[i] = Some(hit);
            }
        }
    }
    Ok(newest
        .into_iter()
        .map(|hit| hit.filter(|hit| not_before.is_none_or(|cut| hit.version.0 >= cut)))
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
    let mut cell = Vec::new();
    for hit in hits {
        let Some(hit) = hit else {
            out.event_ts.push(None);
            out.rows.push(None);
            continue;
        };
        out.event_ts.push(Some(hit.version.0));
        let mut encoded = Vec::with_capacity(16 * columns.len());
        for c in &columns {
            hit.block.write_value(&mut cell, c, hit.row);
            proto::push_repeated_value_item(&mut encoded, &cell);
        }
        out.rows.push(Some(encoded));
    }
    out
}
