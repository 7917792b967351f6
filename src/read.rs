//! The read path: hashed point lookups over immutable data files.
//!
//! A data file never changes once written, so its decoded rows and its `entity_key -> row`
//! index are cached by path for as long as the byte budget allows. A lookup hashes the key to
//! its bucket, probes only that bucket's files, and keeps the newest row (robust to tables that
//! hold duplicates, e.g. written by the contrib store).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use arrow_array::cast::AsArray;
use arrow_array::types::TimestampMicrosecondType;
use arrow_array::{Array, ArrayRef, LargeBinaryArray, RecordBatch, new_null_array};
use arrow_schema::SchemaRef;
use bytes::Bytes;
use iceberg::io::FileIO;
use iceberg::spec::Transform;
use iceberg::transform::create_transform_function;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::convert::cell_to_value;
use crate::error::{Error, Result};
use crate::schema::{Column, Layout};
use crate::table::{LiveFile, TableState};

/// Event and created timestamps of a row: the newer pair wins, created_ts breaks ties.
pub type Version = (i64, Option<i64>);

/// The decoded rows of one data file and its key index.
#[derive(Debug)]
pub struct FileData {
    pub batch: RecordBatch,
    pub index: HashMap<Box<[u8]>, u32>,
    pub bytes: usize,
}

impl FileData {
    pub fn version(&self, row: u32, layout: &Layout) -> Version {
        row_version(&self.batch, row as usize, layout)
    }
}

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

async fn load_file(file_io: &FileIO, path: &str, layout: &Layout) -> Result<FileData> {
    let data: Bytes = file_io.new_input(path)?.read().await?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(data)?
        .with_batch_size(64 * 1024)
        .build()?;
    let mut parts = Vec::new();
    for b in reader {
        parts.push(align_to(&b?, &layout.arrow)?);
    }
    let batch = arrow_select::concat::concat_batches(&layout.arrow, &parts)?;
    let keys = keys_of(&batch, layout)?;
    let mut index: HashMap<Box<[u8]>, u32> = HashMap::with_capacity(batch.num_rows());
    for row in 0..batch.num_rows() {
        if keys.is_null(row) {
            continue;
        }
        let row32 = u32::try_from(row).map_err(|_| Error::internal("file has > 4G rows"))?;
        let version = row_version(&batch, row, layout);
        index
            .entry(keys.value(row).into())
            .and_modify(|r| {
                if version >= row_version(&batch, *r as usize, layout) {
                    *r = row32;
                }
            })
            .or_insert(row32);
    }
    let bytes = batch.get_array_memory_size() + index.len() * 48;
    Ok(FileData {
        batch,
        index,
        bytes,
    })
}

/// Decoded files by path, bounded by a byte budget (oldest loaded evicted first).
#[derive(Debug)]
pub struct FileCache {
    inner: Mutex<CacheInner>,
    budget: usize,
}

#[derive(Debug, Default)]
struct CacheInner {
    /// Keyed by path and the schema id the rows were aligned to.
    files: HashMap<(String, i32), Arc<FileData>>,
    order: VecDeque<(String, i32)>,
    bytes: usize,
}

impl FileCache {
    pub fn new(budget: usize) -> Self {
        Self {
            inner: Mutex::new(CacheInner::default()),
            budget,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheInner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub async fn get(
        &self,
        file_io: &FileIO,
        file: &LiveFile,
        layout: &Layout,
    ) -> Result<Arc<FileData>> {
        let key = (file.path().to_string(), layout.schema.schema_id());
        if let Some(hit) = self.lock().files.get(&key) {
            return Ok(hit.clone());
        }
        let data = Arc::new(load_file(file_io, file.path(), layout).await?);
        let mut inner = self.lock();
        if !inner.files.contains_key(&key) {
            inner.bytes += data.bytes;
            inner.files.insert(key.clone(), data.clone());
            inner.order.push_back(key);
            while inner.bytes > self.budget && inner.order.len() > 1 {
                if let Some(old) = inner.order.pop_front()
                    && let Some(gone) = inner.files.remove(&old)
                {
                    inner.bytes -= gone.bytes;
                }
            }
        }
        Ok(data)
    }

    /// Drops files that are no longer live in any table we have loaded.
    pub fn retain_paths(&self, live: &HashSet<&str>) {
        let mut inner = self.lock();
        let CacheInner {
            files,
            order,
            bytes,
        } = &mut *inner;
        files.retain(|(path, _), data| {
            let keep = live.contains(path.as_str());
            if !keep {
                *bytes -= data.bytes;
            }
            keep
        });
        order.retain(|k| files.contains_key(k));
    }

    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }
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
    pub rows: Vec<Option<Vec<Vec<u8>>>>,
}

/// The requested feature columns; unknown names are skipped, like Feast's own stores do.
fn requested<'a>(layout: &'a Layout, features: Option<&[String]>) -> Vec<&'a Column> {
    match features {
        None => layout.features.iter().collect(),
        Some(names) => names.iter().filter_map(|n| layout.feature(n)).collect(),
    }
}

pub async fn lookup(
    state: &TableState,
    cache: &FileCache,
    file_io: &FileIO,
    serialized_keys: &LargeBinaryArray,
    features: Option<&[String]>,
) -> Result<ReadOutput> {
    let layout = &state.layout;
    let bucket_of_key = buckets(serialized_keys, layout.buckets)?;

    // Load every file the request touches, concurrently, once each.
    let mut needed: Vec<&Arc<LiveFile>> = Vec::new();
    let mut seen = HashSet::new();
    for b in bucket_of_key.iter().collect::<HashSet<_>>() {
        for f in state.files.files_for_bucket(*b) {
            if seen.insert(f.path()) {
                needed.push(f);
            }
        }
    }
    let loaded =
        futures::future::try_join_all(needed.iter().map(|f| cache.get(file_io, f, layout))).await?;
    let by_path: HashMap<&str, &Arc<FileData>> =
        needed.iter().map(|f| f.path()).zip(loaded.iter()).collect();

    let columns = requested(layout, features);
    let mut out = ReadOutput {
        names: columns.iter().map(|c| c.name.clone()).collect(),
        event_ts: Vec::with_capacity(serialized_keys.len()),
        rows: Vec::with_capacity(serialized_keys.len()),
    };
    for (i, bucket) in bucket_of_key.iter().enumerate() {
        let key = serialized_keys.value(i);
        let mut best: Option<(&Arc<FileData>, u32, Version)> = None;
        for f in state.files.files_for_bucket(*bucket) {
            let data = by_path[f.path()];
            if let Some(&row) = data.index.get(key) {
                let v = data.version(row, layout);
                if best.as_ref().is_none_or(|(_, _, bv)| v >= *bv) {
                    best = Some((data, row, v));
                }
            }
        }
        match best {
            None => {
                out.event_ts.push(None);
                out.rows.push(None);
            }
            Some((data, row, (ev, _))) => {
                let row = row as usize;
                out.event_ts.push(Some(ev));
                out.rows.push(Some(
                    columns
                        .iter()
                        .map(|c| cell_to_value(c.kind, data.batch.column(c.index), row))
                        .collect(),
                ));
            }
        }
    }
    Ok(out)
}
