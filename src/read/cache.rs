//! Decoded data files, cached by path for as long as the byte budget allows.
//!
//! A data file never changes once written, so its decoded rows and `entity_key -> row` index
//! stay valid until the file leaves the table. Eviction is least recently used.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use arrow_array::{Array, RecordBatch};
use bytes::Bytes;
use iceberg::io::FileIO;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};

use super::deletes::{BucketDeletes, PositionDeletes, load_deletes};
use super::{Version, align_to, keys_of, row_version};
use crate::error::{Error, Result};
use crate::schema::Layout;
use crate::storage::{IoCounter, IoStats};
use crate::table::LiveFile;

/// Rows of one data file (all of them, or the ones a probe found) and their key index.
#[derive(Debug)]
pub struct FileData {
    pub batch: RecordBatch,
    pub index: HashMap<Box<[u8]>, u32>,
    pub bytes: usize,
    /// The row's position in the file, for rows a probe picked out; None when `batch` holds
    /// the whole file (row = position). Position deletes name rows by position.
    pub positions: Option<Vec<u64>>,
}

impl FileData {
    /// Indexes `batch` by entity key; where a key repeats (tables written by append-only
    /// writers), the newest version wins.
    pub fn index(batch: RecordBatch, layout: &Layout) -> Result<Self> {
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
        Ok(Self {
            batch,
            index,
            bytes,
            positions: None,
        })
    }

    /// Where row `row` of `batch` sits in the data file.
    pub fn position(&self, row: u32) -> u64 {
        match &self.positions {
            Some(p) => p[row as usize],
            None => u64::from(row),
        }
    }

    pub fn version(&self, row: u32, layout: &Layout) -> Version {
        row_version(&self.batch, row as usize, layout)
    }
}

/// A whole parquet file read in one request (counted in `io`), ready to decode in memory.
pub async fn read_whole_parquet(
    file_io: &FileIO,
    path: &str,
    io: &IoCounter,
) -> Result<ParquetRecordBatchReader> {
    let data: Bytes = file_io.new_input(path)?.read().await?;
    io.add(data.len());
    Ok(ParquetRecordBatchReaderBuilder::try_new(data)?
        .with_batch_size(64 * 1024)
        .build()?)
}

/// Reads and decodes a whole data file.
pub async fn load_file(
    file_io: &FileIO,
    path: &str,
    layout: &Layout,
    io: &IoCounter,
) -> Result<FileData> {
    let mut parts = Vec::new();
    for b in read_whole_parquet(file_io, path, io).await? {
        parts.push(align_to(&b?, &layout.arrow)?);
    }
    let batch = arrow_select::concat::concat_batches(&layout.arrow, &parts)?;
    FileData::index(batch, layout)
}

struct Entry {
    data: Arc<FileData>,
    last_used: u64,
}

#[derive(Default)]
struct Inner {
    /// Schema id the rows were aligned to -> path -> entry. Nested so a lookup by `&str`
    /// allocates nothing.
    files: HashMap<i32, HashMap<String, Entry>>,
    /// (schema id, path) of files being loaded in the background.
    loading: HashSet<(i32, String)>,
    bytes: usize,
    clock: u64,
}

/// Decoded files by path, bounded by a byte budget, least recently used evicted first. The
/// most recently loaded file always stays, so a budget below one file still works.
/// Decoded position-delete files are kept beside them, outside the budget: they are small
/// and bounded by the live delete files (automatic compaction caps those).
pub struct FileCache {
    inner: Mutex<Inner>,
    deletes: Mutex<HashMap<String, Arc<PositionDeletes>>>,
    budget: usize,
}

impl std::fmt::Debug for FileCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileCache")
            .field("budget", &self.budget)
            .field("bytes", &self.bytes())
            .finish()
    }
}

impl FileCache {
    pub fn new(budget: usize) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            deletes: Mutex::new(HashMap::new()),
            budget,
        }
    }

    fn deletes_lock(&self) -> MutexGuard<'_, HashMap<String, Arc<PositionDeletes>>> {
        self.deletes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The decoded position deletes of one delete file, loaded now if not cached.
    pub async fn position_deletes(
        &self,
        file_io: &FileIO,
        file: &LiveFile,
        io: &IoCounter,
    ) -> Result<Arc<PositionDeletes>> {
        if let Some(hit) = self.deletes_lock().get(file.path()) {
            return Ok(hit.clone());
        }
        let loaded = Arc::new(load_deletes(file_io, file.path(), io).await?);
        Ok(self
            .deletes_lock()
            .entry(file.path().to_string())
            .or_insert(loaded)
            .clone())
    }

    /// The position deletes of `files` (a bucket's delete files), loaded concurrently.
    pub async fn bucket_deletes<'a>(
        &self,
        file_io: &FileIO,
        files: impl Iterator<Item = &'a Arc<LiveFile>>,
        io: &IoCounter,
    ) -> Result<BucketDeletes> {
        let files: Vec<&Arc<LiveFile>> = files.collect();
        if files.is_empty() {
            return Ok(BucketDeletes::default());
        }
        let loaded = futures::future::try_join_all(
            files.iter().map(|f| self.position_deletes(file_io, f, io)),
        )
        .await?;
        Ok(BucketDeletes::new(
            files
                .iter()
                .map(|f| f.sequence_number())
                .zip(loaded)
                .collect(),
        ))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The decoded file if it is cached.
    pub fn cached(&self, path: &str, schema_id: i32) -> Option<Arc<FileData>> {
        let mut inner = self.lock();
        inner.clock += 1;
        let now = inner.clock;
        let entry = inner.files.get_mut(&schema_id)?.get_mut(path)?;
        entry.last_used = now;
        Some(entry.data.clone())
    }

    /// The decoded file, loaded now if it is not cached.
    pub async fn get(
        &self,
        file_io: &FileIO,
        file: &LiveFile,
        layout: &Layout,
        io: &IoStats,
    ) -> Result<Arc<FileData>> {
        let schema_id = layout.schema.schema_id();
        if let Some(hit) = self.cached(file.path(), schema_id) {
            return Ok(hit);
        }
        let data = Arc::new(load_file(file_io, file.path(), layout, &io.data).await?);
        Ok(self.insert(file.path(), schema_id, data))
    }

    /// Loads the file into the cache on the runtime, unless it is cached or already loading.
    /// A failure is logged and otherwise dropped: the next read that needs the file probes it
    /// again.
    pub fn warm_in_background(
        self: &Arc<Self>,
        file_io: &FileIO,
        file: &LiveFile,
        layout: &Arc<Layout>,
        io: &Arc<IoStats>,
    ) {
        let schema_id = layout.schema.schema_id();
        let path = file.path().to_string();
        {
            let mut inner = self.lock();
            let cached = inner
                .files
                .get(&schema_id)
                .is_some_and(|m| m.contains_key(&path));
            if cached || !inner.loading.insert((schema_id, path.clone())) {
                return;
            }
        }
        let (cache, file_io, layout, io) =
            (self.clone(), file_io.clone(), layout.clone(), io.clone());
        tokio::spawn(async move {
            match load_file(&file_io, &path, &layout, &io.prefetch).await {
                Ok(data) => {
                    cache.insert(&path, schema_id, Arc::new(data));
                }
                // Never while holding the cache lock: logging takes the GIL.
                Err(e) => log::warn!(
                    "table at {}: loading {path} into the read cache failed: {e}",
                    crate::storage::table_root(&path)
                ),
            }
            cache.lock().loading.remove(&(schema_id, path));
        });
    }

    fn insert(&self, path: &str, schema_id: i32, data: Arc<FileData>) -> Arc<FileData> {
        let mut inner = self.lock();
        inner.clock += 1;
        let now = inner.clock;
        let files = inner.files.entry(schema_id).or_default();
        if let Some(existing) = files.get_mut(path) {
            existing.last_used = now;
            return existing.data.clone();
        }
        let size = data.bytes;
        files.insert(
            path.to_string(),
            Entry {
                data: data.clone(),
                last_used: now,
            },
        );
        inner.bytes += size;
        while inner.bytes > self.budget && inner.evict_lru(now) {}
        data
    }

    /// Drops files (data or delete) that are no longer live in the table just committed.
    pub fn retain_paths(&self, live: &HashSet<&str>) {
        self.deletes_lock()
            .retain(|path, _| live.contains(path.as_str()));
        let mut inner = self.lock();
        let Inner { files, bytes, .. } = &mut *inner;
        for by_path in files.values_mut() {
            by_path.retain(|path, entry| {
                let keep = live.contains(path.as_str());
                if !keep {
                    *bytes -= entry.data.bytes;
                }
                keep
            });
        }
        files.retain(|_, by_path| !by_path.is_empty());
    }

    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }
}

impl Inner {
    /// Evicts the least recently used file other than the one used at `keep`; false if there
    /// is none.
    fn evict_lru(&mut self, keep: u64) -> bool {
        let victim = self
            .files
            .iter()
            .flat_map(|(id, m)| m.iter().map(move |(p, e)| (e.last_used, *id, p)))
            .filter(|(used, _, _)| *used != keep)
            .min_by_key(|(used, _, _)| *used)
            .map(|(_, id, p)| (id, p.clone()));
        let Some((id, path)) = victim else {
            return false;
        };
        if let Some(entry) = self.files.get_mut(&id).and_then(|m| m.remove(&path)) {
            self.bytes -= entry.data.bytes;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_schema::Schema;

    fn data(bytes: usize) -> Arc<FileData> {
        Arc::new(FileData {
            batch: RecordBatch::new_empty(Arc::new(Schema::empty())),
            index: HashMap::new(),
            bytes,
            positions: None,
        })
    }

    #[test]
    fn evicts_the_least_recently_used_file() {
        let cache = FileCache::new(250);
        cache.insert("a", 0, data(100));
        cache.insert("b", 0, data(100));
        assert!(cache.cached("a", 0).is_some()); // a is now more recent than b
        cache.insert("c", 0, data(100));
        assert!(cache.cached("b", 0).is_none());
        assert!(cache.cached("a", 0).is_some() && cache.cached("c", 0).is_some());
        assert_eq!(cache.bytes(), 200);
    }

    #[test]
    fn keeps_the_newest_file_even_over_budget() {
        let cache = FileCache::new(10);
        cache.insert("a", 0, data(100));
        assert!(cache.cached("a", 0).is_some());
        cache.insert("b", 0, data(100));
        assert!(cache.cached("a", 0).is_none() && cache.cached("b", 0).is_some());
        assert!(cache.cached("b", 1).is_none());
    }
}
