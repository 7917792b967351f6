//! Finding rows in data files: the key index of each file, decoded row groups in a
//! byte-budgeted block cache, and the fetches behind a miss.
//!
//! A lookup asks a file's index which row group may hold the key, takes that row group from
//! the block cache or fetches its bytes (one ranged read) and decodes it, then binary-searches
//! the key inside it. Nothing here decodes a whole file for a point read; whole-file reads are
//! for rewrites (`load_whole_file`), and they bypass the cache.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use arrow_array::{Array, RecordBatch};
use bytes::Bytes;
use futures::FutureExt;
use futures::future::BoxFuture;
use iceberg::io::{FileIO, FileRead};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReader,
    ParquetRecordBatchReaderBuilder,
};
use parquet::arrow::async_reader::AsyncFileReader;
use parquet::file::metadata::{ParquetMetaData, RowGroupMetaData};
use parquet::file::reader::{ChunkReader, Length};
use parquet::schema::types::SchemaDescriptor;

use super::cache::{CacheStats, ClockCache, Weighted};
use super::deletes::{BucketDeletes, PositionDeletes, load_deletes};
use super::index::{FileIndex, RowGroupFooter};
use super::plain::{self, Cells};
use super::{Version, align_to};
use crate::error::{Error, Result};
use crate::runtime;
use crate::schema::{Column, ENTITY_KEY, Layout};
use crate::storage::{IoCounter, IoStats};
use crate::table::LiveFile;

/// parquet's async reader over an iceberg `FileRead`, counting what it fetches.
pub struct CountingReader {
    inner: Box<dyn FileRead>,
    io: Arc<IoStats>,
    fill: Fill,
}

impl CountingReader {
    pub async fn open(file_io: &FileIO, path: &str, io: &Arc<IoStats>, fill: Fill) -> Result<Self> {
        Ok(Self {
            inner: file_io.new_input(path)?.reader().await?,
            io: io.clone(),
            fill,
        })
    }

    fn counter(&self) -> &IoCounter {
        self.fill.counter(&self.io)
    }

    pub(super) async fn read(&self, range: Range<u64>) -> Result<Bytes> {
        let len = usize::try_from(range.end - range.start).unwrap_or(usize::MAX);
        let bytes = self.inner.read(range).await?;
        self.counter().add(len);
        Ok(bytes)
    }
}

impl AsyncFileReader for CountingReader {
    fn get_bytes(&mut self, range: Range<u64>) -> BoxFuture<'_, parquet::errors::Result<Bytes>> {
        async move {
            self.read(range)
                .await
                .map_err(|e| parquet::errors::ParquetError::External(Box::new(e)))
        }
        .boxed()
    }

    fn get_metadata<'a>(
        &'a mut self,
        _options: Option<&'a ArrowReaderOptions>,
    ) -> BoxFuture<'a, parquet::errors::Result<Arc<ParquetMetaData>>> {
        async {
            Err(parquet::errors::ParquetError::General(
                "footers are read through FileIndex".into(),
            ))
        }
        .boxed()
    }
}

/// Gaps worth reading through when fetching several row groups of one file: on object storage
/// a request costs ~1-3 ms while a MiB more on the same one costs less; locally a gap is just
/// wasted copying.
fn coalesce_gap(path: &str) -> u64 {
    if crate::storage::is_remote(path) {
        1 << 20
    } else {
        0
    }
}

/// `ranges` merged where they overlap or lie within `gap` of each other, in file order.
pub fn merge_ranges(ranges: &[Range<u64>], gap: u64) -> Vec<Range<u64>> {
    let mut sorted = ranges.to_vec();
    sorted.sort_by_key(|r| r.start);
    let mut merged: Vec<Range<u64>> = Vec::with_capacity(sorted.len());
    for r in sorted {
        match merged.last_mut() {
            Some(last) if r.start <= last.end.saturating_add(gap) => {
                last.end = last.end.max(r.end);
            }
            _ => merged.push(r),
        }
    }
    merged
}

/// Bytes fetched from a file at `offset`, served to parquet's sync reader as if they were
/// the file: the decoder asks for column chunks by file offset.
#[derive(Clone)]
pub(super) struct Fetched {
    pub(super) offset: u64,
    pub(super) bytes: Bytes,
}

impl Length for Fetched {
    fn len(&self) -> u64 {
        self.offset + self.bytes.len() as u64
    }
}

impl Fetched {
    /// Whether `start..start + len` of the file is in hand.
    pub(super) fn holds(&self, start: u64, len: u64) -> bool {
        start >= self.offset && start.saturating_add(len) <= self.len()
    }

    /// Extends the bytes in hand back to `start` of the file (one more read).
    pub(super) async fn extend_back(&mut self, reader: &CountingReader, start: u64) -> Result<()> {
        if start >= self.offset {
            return Ok(());
        }
        let before = reader.read(start..self.offset).await?;
        let mut joined = Vec::with_capacity(before.len() + self.bytes.len());
        joined.extend_from_slice(&before);
        joined.extend_from_slice(&self.bytes);
        self.offset = start;
        self.bytes = Bytes::from(joined);
        Ok(())
    }

    /// These bytes cut to `range` of the file, copied when they hold much more (ranges read
    /// together): a cached block may keep its row group's bytes (uncompressed values are
    /// sliced from them), and must not keep its neighbours' alive with them.
    pub(super) fn only(self, range: &Range<u64>) -> Self {
        const SLACK: u64 = 4 << 10;
        let held = self.bytes.len() as u64;
        if !self.holds(range.start, range.end - range.start)
            || held <= range.end - range.start + SLACK
        {
            return self;
        }
        let from = (range.start - self.offset) as usize;
        let to = (range.end - self.offset) as usize;
        Self {
            offset: range.start,
            bytes: Bytes::copy_from_slice(&self.bytes[from..to]),
        }
    }

    fn slice(&self, start: u64, len: usize) -> parquet::errors::Result<Bytes> {
        let from = start
            .checked_sub(self.offset)
            .and_then(|f| usize::try_from(f).ok())
            .filter(|f| f.saturating_add(len) <= self.bytes.len())
            .ok_or_else(|| {
                parquet::errors::ParquetError::General(format!(
                    "column chunk at {start}+{len} lies outside its row group's bytes"
                ))
            })?;
        Ok(self.bytes.slice(from..from + len))
    }
}

impl ChunkReader for Fetched {
    type T = bytes::buf::Reader<Bytes>;

    fn get_read(&self, start: u64) -> parquet::errors::Result<Self::T> {
        let rest = usize::try_from(self.len().saturating_sub(start)).unwrap_or(0);
        Ok(bytes::Buf::reader(self.slice(start, rest)?))
    }

    fn get_bytes(&self, start: u64, length: usize) -> parquet::errors::Result<Bytes> {
        self.slice(start, length)
    }
}

/// One decoded row group, its columns in the table schema's order.
#[derive(Debug)]
pub struct Block {
    columns: Vec<Cells>,
    rows: usize,
    /// Table columns of the entity key and the two timestamps.
    key: usize,
    event_ts: usize,
    created_ts: usize,
    /// Rows in key order when the row group is not sorted by key (files of other writers).
    order: Option<Vec<u32>>,
    /// File position of the first row (position deletes name rows by position).
    pub first_position: u64,
    bytes: usize,
}

impl Weighted for Block {
    fn weight(&self) -> usize {
        self.bytes
    }
}

impl Block {
    /// `sorted`: the file says its rows are in key order (our writer's files; see
    /// `write::writer_properties_for`), so the check is skipped: it compared every key with
    /// the next, ~15% of a miss's decode (`perf`).
    pub fn new(
        columns: Vec<Cells>,
        rows: usize,
        layout: &Layout,
        first_position: u64,
        sorted: bool,
    ) -> Self {
        let mut block = Self {
            columns,
            rows,
            key: layout.entity_key,
            event_ts: layout.event_ts,
            created_ts: layout.created_ts,
            order: None,
            first_position,
            bytes: 0,
        };
        let sorted = sorted
            || ((0..rows).all(|r| block.key(r).is_some())
                && (1..rows).all(|r| block.key(r - 1) <= block.key(r)));
        if !sorted {
            let mut keyed: Vec<u32> = (0..rows as u32)
                .filter(|&r| block.key(r as usize).is_some())
                .collect();
            keyed.sort_by(|a, b| block.key(*a as usize).cmp(&block.key(*b as usize)));
            block.order = Some(keyed);
        }
        block.bytes = block.columns.iter().map(Cells::memory).sum::<usize>()
            + block.order.as_ref().map_or(0, |o| o.len() * 4)
            + std::mem::size_of::<Self>();
        block
    }

    /// A block of rows Arrow decoded, aligned to the table schema.
    pub fn from_batch(batch: &RecordBatch, layout: &Layout, first_position: u64) -> Self {
        let columns = batch.columns().iter().cloned().map(Cells::Arrow).collect();
        Self::new(columns, batch.num_rows(), layout, first_position, false)
    }

    fn key(&self, row: usize) -> Option<&[u8]> {
        self.columns[self.key].bytes(row)
    }

    fn version(&self, row: usize) -> Version {
        (
            self.columns[self.event_ts].int64(row).unwrap_or(i64::MIN),
            self.columns[self.created_ts].int64(row),
        )
    }

    /// Writes the serialized Feast `Value` of table column `column` at `row` into `buf`
    /// (cleared first; empty for null).
    pub fn write_value(&self, buf: &mut Vec<u8>, column: &Column, row: usize) {
        self.columns[column.index].write_value(buf, column.kind, row);
    }

    /// The serialized Feast `Value` of table column `column` at `row` (empty for null).
    pub fn value(&self, column: &Column, row: usize) -> Vec<u8> {
        let mut buf = Vec::new();
        self.write_value(&mut buf, column, row);
        buf
    }

    fn row_at(&self, i: usize) -> usize {
        match &self.order {
            Some(o) => o[i] as usize,
            None => i,
        }
    }

    fn len(&self) -> usize {
        self.order.as_ref().map_or(self.rows, Vec::len)
    }

    /// The row holding `key`; of several (append-only writers' files), the newest version.
    pub fn find(&self, key: &[u8]) -> Option<(usize, Version)> {
        let start = {
            let (mut lo, mut hi) = (0, self.len());
            while lo < hi {
                let mid = (lo + hi) / 2;
                if self.key(self.row_at(mid)).is_some_and(|k| k < key) {
                    lo = mid + 1;
                } else {
                    hi = mid;
                }
            }
            lo
        };
        let mut best: Option<(usize, Version)> = None;
        for i in start..self.len() {
            let row = self.row_at(i);
            if self.key(row) != Some(key) {
                break;
            }
            let v = self.version(row);
            if best.is_none_or(|(_, bv)| v >= bv) {
                best = Some((row, v));
            }
        }
        best
    }
}

/// Where a key was found in one file.
#[derive(Debug, Clone)]
pub struct Hit {
    pub block: Arc<Block>,
    pub row: usize,
    pub version: Version,
}

impl Hit {
    pub fn position(&self) -> u64 {
        self.block.first_position + self.row as u64
    }
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct BlockKey {
    path: Arc<str>,
    row_group: usize,
    /// Rows are aligned to one schema version; after an evolution they are decoded again.
    schema_id: i32,
    /// Only keys and timestamps were decoded (`Fill::Versions`).
    versions_only: bool,
}

/// Who asks for row groups: a request (its reads count as data read), the background
/// preparation of a new snapshot (counted as prefetch), or a write looking for the stored
/// rows its keys replace, which needs only keys and timestamps: its row groups are decoded to
/// those (a fifth of the columns at ten features) and cached apart from whole ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    Cache,
    Prefetch,
    Versions,
}

impl Fill {
    /// Where the reads of this fill are counted: background preparation apart from the rest.
    fn counter(self, io: &IoStats) -> &IoCounter {
        if self == Self::Prefetch {
            &io.prefetch
        } else {
            &io.data
        }
    }
}

/// What a store knows of data files: key indexes of live files, decoded row groups within a
/// byte budget, decoded position deletes.
pub struct DataFiles {
    indexes: Mutex<HashMap<Arc<str>, Arc<FileIndex>>>,
    /// Shared with the decode tasks, which insert what they decode.
    blocks: Arc<ClockCache<BlockKey, Block>>,
    /// Decoded position-delete files, outside the budget: small, and bounded by the live
    /// delete files (automatic compaction caps those).
    deletes: Mutex<HashMap<String, Arc<PositionDeletes>>>,
}

impl std::fmt::Debug for DataFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataFiles")
            .field("blocks", &self.blocks)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Memory held for reads.
#[derive(Debug, Clone, Copy, Default)]
pub struct FilesStats {
    pub blocks: CacheStats,
    pub index_files: u64,
    pub index_bytes: u64,
    pub index_rows: u64,
}

impl DataFiles {
    pub fn new(block_budget: usize) -> Self {
        Self {
            indexes: Mutex::new(HashMap::new()),
            blocks: Arc::new(ClockCache::new(block_budget)),
            deletes: Mutex::new(HashMap::new()),
        }
    }

    pub fn stats(&self) -> FilesStats {
        let indexes = lock(&self.indexes);
        FilesStats {
            blocks: self.blocks.stats(),
            index_files: indexes.len() as u64,
            index_bytes: indexes.values().map(|i| i.bytes as u64).sum(),
            index_rows: indexes.values().map(|i| i.rows()).sum(),
        }
    }

    /// The key index of `file`, reading its footer if it is not indexed yet.
    pub async fn index(
        &self,
        file_io: &FileIO,
        file: &LiveFile,
        io: &Arc<IoStats>,
        fill: Fill,
    ) -> Result<Arc<FileIndex>> {
        if let Some(hit) = lock(&self.indexes).get(file.path()) {
            return Ok(hit.clone());
        }
        let reader = CountingReader::open(file_io, file.path(), io, fill).await?;
        let size = file.entry.file_size_in_bytes();
        let rows = file.entry.record_count();
        let background = fill != Fill::Cache;
        let index = Arc::new(FileIndex::load(reader, file.path(), size, rows, background).await?);
        Ok(lock(&self.indexes)
            .entry(index.path.clone())
            .or_insert(index)
            .clone())
    }

    /// The key index of `path` if it is loaded.
    pub fn cached_index(&self, path: &str) -> Option<Arc<FileIndex>> {
        lock(&self.indexes).get(path).cloned()
    }

    /// Forgets files that left the table: their indexes, blocks and decoded deletes.
    pub fn forget(&self, paths: &HashSet<&str>) {
        if paths.is_empty() {
            return;
        }
        lock(&self.indexes).retain(|p, _| !paths.contains(&**p));
        lock(&self.deletes).retain(|p, _| !paths.contains(p.as_str()));
        self.blocks.remove_where(|k| paths.contains(&*k.path));
    }

    /// Whether row group `rg` of `path` is cached for `schema_id`.
    pub fn is_cached(&self, path: &Arc<str>, row_group: usize, schema_id: i32) -> bool {
        self.blocks.contains(&BlockKey {
            path: path.clone(),
            row_group,
            schema_id,
            versions_only: false,
        })
    }

    /// Row groups of one file, from the cache or fetched (nearby ones in one request) and
    /// decoded, in the order asked.
    pub async fn blocks(
        &self,
        file_io: &FileIO,
        index: &Arc<FileIndex>,
        row_groups: &[usize],
        layout: &Arc<Layout>,
        io: &Arc<IoStats>,
        fill: Fill,
    ) -> Result<Vec<Arc<Block>>> {
        let wanted = [(index.clone(), row_groups.to_vec())];
        let mut out = self.blocks_of(file_io, &wanted, layout, io, fill).await?;
        Ok(out.pop().unwrap_or_default())
    }

    /// Row groups of several files (each file's, in the order asked): cached ones at once;
    /// the others fetched together (nearby ones of a file in one request), then decoded in
    /// at most one batch per core. A few misses are decoded right here, on the caller's
    /// thread: a wake-up of another thread costs about what a decode does.
    pub async fn blocks_of(
        &self,
        file_io: &FileIO,
        wanted: &[(Arc<FileIndex>, Vec<usize>)],
        layout: &Arc<Layout>,
        io: &Arc<IoStats>,
        fill: Fill,
    ) -> Result<Vec<Vec<Arc<Block>>>> {
        let schema_id = layout.schema.schema_id();
        let key = |index: &FileIndex, rg: usize, versions_only: bool| BlockKey {
            path: index.path.clone(),
            row_group: rg,
            schema_id,
            versions_only,
        };
        let versions_only = fill == Fill::Versions;
        // A whole row group serves a write too.
        let cached = |index: &FileIndex, rg: usize| {
            self.blocks.get(&key(index, rg, false)).or_else(|| {
                versions_only
                    .then(|| self.blocks.get(&key(index, rg, true)))
                    .flatten()
            })
        };
        let mut out: Vec<Vec<Option<Arc<Block>>>> = wanted
            .iter()
            .map(|(index, rgs)| rgs.iter().map(|&rg| cached(index, rg)).collect())
            .collect();
        let missing: Vec<(usize, Vec<usize>)> = wanted
            .iter()
            .zip(&out)
            .enumerate()
            .filter_map(|(i, ((_, rgs), got))| {
                let miss: Vec<usize> = rgs
                    .iter()
                    .zip(got)
                    .filter(|(_, b)| b.is_none())
                    .map(|(&rg, _)| rg)
                    .collect();
                (!miss.is_empty()).then_some((i, miss))
            })
            .collect();
        if missing.is_empty() {
            return Ok(flatten(out));
        }
        let job = |i: usize, rg: usize, source: Source| {
            let index = &wanted[i].0;
            DecodeJob {
                file: i,
                rg,
                source,
                index: index.clone(),
                first_row: index.row_groups[rg].first_row,
                key: key(index, rg, versions_only),
            }
        };
        let local = missing
            .iter()
            .all(|(i, _)| crate::storage::is_local(&wanted[*i].0.path));
        let jobs: Vec<DecodeJob> = if local {
            // Local reads cost about what copying the bytes does: each decode task reads its
            // own row groups, so a request's reads run on every core its decodes do.
            missing
                .iter()
                .flat_map(|(i, rgs)| {
                    rgs.iter().map(move |&rg| {
                        let range = wanted[*i].0.row_groups[rg].bytes.clone();
                        job(*i, rg, Source::Local(range))
                    })
                })
                .collect()
        } else {
            // Object storage: every request of the miss in flight at once, then decoding.
            let fetched = futures::future::try_join_all(
                missing
                    .iter()
                    .map(|(i, rgs)| fetch_row_groups(file_io, &wanted[*i].0, rgs, io, fill)),
            )
            .await?;
            missing
                .iter()
                .zip(fetched)
                .flat_map(|((i, rgs), sources)| {
                    rgs.iter().zip(sources).map(move |(&rg, source)| {
                        let range = &wanted[*i].0.row_groups[rg].bytes;
                        job(*i, rg, Source::Fetched(source.only(range)))
                    })
                })
                .collect()
        };
        let decode = Decode {
            layout: layout.clone(),
            cache: self.blocks.clone(),
            io: io.clone(),
            fill,
        };
        for (file, rg, block) in decode_all(jobs, decode, local).await? {
            for (slot, &want) in out[file].iter_mut().zip(&wanted[file].1) {
                if want == rg && slot.is_none() {
                    *slot = Some(block.clone());
                }
            }
        }
        Ok(flatten(out))
    }

    /// For each key, its newest row in `file` (None where the file does not hold it).
    pub async fn find(
        &self,
        file_io: &FileIO,
        file: &LiveFile,
        keys: &[&[u8]],
        layout: &Arc<Layout>,
        io: &Arc<IoStats>,
        fill: Fill,
    ) -> Result<Vec<Option<Hit>>> {
        let mut out = self
            .find_in(file_io, &[(file, keys)], layout, io, fill)
            .await?;
        Ok(out.pop().unwrap_or_default())
    }

    /// `find` for several files at once: every row group they need is fetched and decoded
    /// together (`blocks_of`).
    pub async fn find_in(
        &self,
        file_io: &FileIO,
        requests: &[(&LiveFile, &[&[u8]])],
        layout: &Arc<Layout>,
        io: &Arc<IoStats>,
        fill: Fill,
    ) -> Result<Vec<Vec<Option<Hit>>>> {
        let indexes = futures::future::try_join_all(
            requests
                .iter()
                .map(|(file, _)| self.index(file_io, file, io, fill)),
        )
        .await?;
        let candidates: Vec<Vec<Vec<usize>>> = requests
            .iter()
            .zip(&indexes)
            .map(|((_, keys), index)| keys.iter().map(|k| index.candidates(k)).collect())
            .collect();
        let wanted: Vec<(Arc<FileIndex>, Vec<usize>)> = indexes
            .iter()
            .zip(&candidates)
            .map(|(index, per_key)| {
                let mut rgs: Vec<usize> = per_key.iter().flatten().copied().collect();
                rgs.sort_unstable();
                rgs.dedup();
                (index.clone(), rgs)
            })
            .collect();
        let blocks = self.blocks_of(file_io, &wanted, layout, io, fill).await?;
        Ok(requests
            .iter()
            .zip(&candidates)
            .zip(wanted.iter().zip(&blocks))
            .map(|(((_, keys), per_key), ((_, rgs), blocks))| {
                let by_rg: HashMap<usize, &Arc<Block>> = rgs.iter().copied().zip(blocks).collect();
                keys.iter()
                    .zip(per_key)
                    .map(|(key, rgs)| newest_in(key, rgs, &by_rg))
                    .collect()
            })
            .collect())
    }

    /// How many of `keys` one of `files` may hold, by key index alone (ranges and bloom
    /// filters: an upper bound, ~3% of absent keys per file pass): what a write may replace,
    /// known before any row group is read.
    pub async fn maybe_held(
        &self,
        file_io: &FileIO,
        files: &[Arc<LiveFile>],
        keys: &[&[u8]],
        io: &Arc<IoStats>,
    ) -> Result<usize> {
        let indexes = futures::future::try_join_all(
            files
                .iter()
                .map(|f| self.index(file_io, f, io, Fill::Cache)),
        )
        .await?;
        Ok(keys
            .iter()
            .filter(|k| indexes.iter().any(|i| i.may_hold(k)))
            .count())
    }

    /// The decoded position deletes of one delete file, loaded now if not cached.
    pub async fn position_deletes(
        &self,
        file_io: &FileIO,
        file: &LiveFile,
        io: &IoCounter,
    ) -> Result<Arc<PositionDeletes>> {
        if let Some(hit) = lock(&self.deletes).get(file.path()) {
            return Ok(hit.clone());
        }
        let loaded = Arc::new(load_deletes(file_io, file.path(), io).await?);
        Ok(lock(&self.deletes)
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
}

fn flatten(blocks: Vec<Vec<Option<Arc<Block>>>>) -> Vec<Vec<Arc<Block>>> {
    blocks
        .into_iter()
        .map(|file| file.into_iter().flatten().collect())
        .collect()
}

/// A key's newest row among the row groups `rgs` that may hold it.
fn newest_in(key: &[u8], rgs: &[usize], blocks: &HashMap<usize, &Arc<Block>>) -> Option<Hit> {
    let mut best: Option<Hit> = None;
    for rg in rgs {
        let block = blocks[rg];
        if let Some((row, version)) = block.find(key)
            && best.as_ref().is_none_or(|b| version >= b.version)
        {
            best = Some(Hit {
                block: block.clone(),
                row,
                version,
            });
        }
    }
    best
}

/// The bytes of row groups `rgs` of one file, in that order: nearby ones in one request.
async fn fetch_row_groups(
    file_io: &FileIO,
    index: &FileIndex,
    rgs: &[usize],
    io: &Arc<IoStats>,
    fill: Fill,
) -> Result<Vec<Fetched>> {
    let ranges: Vec<Range<u64>> = rgs
        .iter()
        .map(|&rg| index.row_groups[rg].bytes.clone())
        .collect();
    let merged = merge_ranges(&ranges, coalesce_gap(&index.path));
    let reader = CountingReader::open(file_io, &index.path, io, fill).await?;
    let fetched =
        futures::future::try_join_all(merged.iter().map(|r| reader.read(r.clone()))).await?;
    Ok(ranges
        .iter()
        .map(|range| {
            let part = merged.partition_point(|m| m.end < range.end);
            Fetched {
                offset: merged[part].start,
                bytes: fetched[part].clone(),
            }
        })
        .collect())
}

/// Where the bytes of a row group to decode come from.
enum Source {
    Fetched(Fetched),
    /// This range of a local file, read by the task that decodes it.
    Local(Range<u64>),
}

/// A row group to decode (and cache).
struct DecodeJob {
    file: usize,
    rg: usize,
    source: Source,
    index: Arc<FileIndex>,
    first_row: u64,
    key: BlockKey,
}

/// What every job of one `decode_all` shares.
#[derive(Clone)]
struct Decode {
    layout: Arc<Layout>,
    cache: Arc<ClockCache<BlockKey, Block>>,
    io: Arc<IoStats>,
    fill: Fill,
}

impl Decode {
    /// Runs jobs from `queue` until it is empty; on an error, empties it so that the other
    /// threads stop too.
    fn drain(
        &self,
        queue: &Mutex<std::vec::IntoIter<DecodeJob>>,
    ) -> Result<Vec<(usize, usize, Arc<Block>)>> {
        let mut out = Vec::new();
        loop {
            let Some(job) = lock(queue).next() else {
                return Ok(out);
            };
            match self.run(job) {
                Ok(done) => out.push(done),
                Err(e) => {
                    lock(queue).by_ref().for_each(drop);
                    return Err(e);
                }
            }
        }
    }

    /// Reads (if local), decodes and caches one row group. Caching here rather than on the
    /// caller puts the eviction (and freeing) of older blocks on the decoding cores too.
    fn run(&self, job: DecodeJob) -> Result<(usize, usize, Arc<Block>)> {
        let layout = &self.layout;
        let source = match job.source {
            Source::Fetched(fetched) => fetched,
            Source::Local(range) => {
                let offset = range.start;
                let io = self.fill.counter(&self.io);
                let bytes = crate::storage::read_local_range(&job.index.path, range, io)?;
                Fetched { offset, bytes }
            }
        };
        let only = (self.fill == Fill::Versions).then_some([
            layout.entity_key,
            layout.event_ts,
            layout.created_ts,
        ]);
        let block = job
            .index
            .footer(job.rg)
            .and_then(|footer| decode_row_group(source, &footer, layout, job.first_row, only))
            .map_err(|e| e.context(format!("row group {} of {}", job.rg, job.index.path)))?;
        let block = self.cache.insert(job.key, Arc::new(block));
        Ok((job.file, job.rg, block))
    }
}

/// Row groups a request decodes on its own thread rather than handing them to another.
const DECODE_INLINE: usize = 4;

/// Decodes `jobs` on one thread per core, each taking the next job when done with its last
/// (splitting the jobs up front left a request waiting on whichever thread the OS had paused).
/// Up to `DECODE_INLINE` jobs of a request run on its own thread. Past that, helpers from the
/// blocking pool join in; the request's thread stays one of the decoders only when the files
/// are `local`: on object storage it may be one of the runtime's two workers, which every
/// other read needs free to see its responses. Background preparation (`Fill::Prefetch`) and
/// a write's lookups (`Fill::Versions`) run only on the low-priority threads, so that they
/// yield the cores to requests.
async fn decode_all(
    jobs: Vec<DecodeJob>,
    decode: Decode,
    local: bool,
) -> Result<Vec<(usize, usize, Arc<Block>)>> {
    let request = decode.fill == Fill::Cache;
    let few = jobs.len() <= DECODE_INLINE;
    let inline = request && (few || local);
    let threads = if request && few {
        1
    } else {
        runtime::cores().min(jobs.len())
    };
    let queue = Arc::new(Mutex::new(jobs.into_iter()));
    let helpers = (usize::from(inline)..threads)
        .map(|_| {
            let (decode, queue) = (decode.clone(), queue.clone());
            let work = move || decode.drain(&queue);
            if request {
                runtime::blocking(work).boxed()
            } else {
                runtime::background_blocking(work).boxed()
            }
        })
        .collect::<Vec<_>>();
    let mut done = if inline {
        decode.drain(&queue)
    } else {
        Ok(Vec::new())
    };
    for helper in futures::future::join_all(helpers).await {
        match (&mut done, helper.and_then(|r| r)) {
            (Ok(all), Ok(theirs)) => all.extend(theirs),
            (Ok(_), Err(e)) => done = Err(e),
            (Err(_), _) => {}
        }
    }
    done
}

/// Where a table column lies in a file's schema (matched by name, as `align_to` does).
enum FileColumn {
    /// A flat top-level column: leaf `usize`.
    Flat(usize),
    /// A nested column (lists): root field `usize`.
    Nested(usize),
    /// The file predates the column.
    Missing,
}

/// The leaf of top-level column `name` when it is flat (not a list or struct).
pub fn flat_leaf(schema: &SchemaDescriptor, name: &str) -> Option<usize> {
    schema.columns().iter().position(|c| {
        let parts = c.path().parts();
        parts.len() == 1 && parts[0] == name
    })
}

fn file_column(schema: &SchemaDescriptor, name: &str) -> FileColumn {
    match flat_leaf(schema, name) {
        Some(leaf) => FileColumn::Flat(leaf),
        None => match schema
            .root_schema()
            .get_fields()
            .iter()
            .position(|f| f.name() == name)
        {
            Some(root) => FileColumn::Nested(root),
            None => FileColumn::Missing,
        },
    }
}

/// Decodes a row group (`footer`) for point reads: flat PLAIN columns in place (`plain`),
/// the others by Arrow, together, projected to just them. With `only`, just those table
/// columns are decoded; the others read as null.
fn decode_row_group(
    source: Fetched,
    footer: &RowGroupFooter,
    layout: &Layout,
    first_position: u64,
    only: Option<[usize; 3]>,
) -> Result<Block> {
    let row_group = footer.row_group();
    let schema = footer.schema();
    let rows = usize::try_from(row_group.num_rows()).unwrap_or(0);
    let source = Arc::new(source);
    let mut columns: Vec<Option<Cells>> = Vec::with_capacity(layout.arrow.fields().len());
    let mut by_arrow = Vec::new();
    for (i, field) in layout.arrow.fields().iter().enumerate() {
        if only.is_some_and(|only| !only.contains(&i)) {
            columns.push(Some(Cells::Missing));
            continue;
        }
        let (cells, root) = match file_column(schema, field.name()) {
            FileColumn::Missing => (Some(Cells::Missing), None),
            FileColumn::Flat(leaf) => (
                plain::decode_column(&source, row_group, leaf, field.data_type())?,
                Some(schema.get_column_root_idx(leaf)),
            ),
            FileColumn::Nested(root) => (None, Some(root)),
        };
        if let (None, Some(root)) = (&cells, root) {
            by_arrow.push(root);
        }
        columns.push(cells);
    }
    if !by_arrow.is_empty() {
        let batch = decode_by_arrow(source.as_ref().clone(), footer.arrow()?, 0, &by_arrow)?;
        for (slot, field) in columns.iter_mut().zip(layout.arrow.fields()) {
            if slot.is_none() {
                let column = batch.column_by_name(field.name()).ok_or_else(|| {
                    Error::internal(format!("column {} was not decoded", field.name()))
                })?;
                let aligned = if column.data_type() == field.data_type() {
                    column.clone()
                } else {
                    arrow_cast::cast(column, field.data_type())?
                };
                *slot = Some(Cells::Arrow(aligned));
            }
        }
    }
    let columns: Vec<Cells> = columns
        .into_iter()
        .map(|c| c.unwrap_or(Cells::Missing))
        .collect();
    let borrows = columns
        .iter()
        .any(|c| matches!(c, Cells::Plain(p) if p.borrows_source()));
    let sorted = match file_column(schema, ENTITY_KEY) {
        FileColumn::Flat(leaf) => sorted_by(row_group, leaf),
        _ => false,
    };
    let mut block = Block::new(columns, rows, layout, first_position, sorted);
    if borrows {
        block.bytes += source.bytes.len();
    }
    Ok(block)
}

/// Whether the row group declares its rows sorted by leaf column `leaf`, ascending
/// (Parquet's `sorting_columns`, which our writer sets only after checking), the column being
/// required, so no null sits among the keys.
fn sorted_by(row_group: &RowGroupMetaData, leaf: usize) -> bool {
    let first = row_group.sorting_columns().and_then(|c| c.first());
    first.is_some_and(|c| {
        usize::try_from(c.column_idx) == Ok(leaf)
            && !c.descending
            && row_group.column(leaf).column_descr().max_def_level() == 0
    })
}

/// Root columns `roots` of row group `rg`, decoded by Arrow.
fn decode_by_arrow(
    source: Fetched,
    metadata: ArrowReaderMetadata,
    rg: usize,
    roots: &[usize],
) -> Result<RecordBatch> {
    let rows = metadata.metadata().row_group(rg).num_rows();
    let mask = ProjectionMask::roots(
        metadata.metadata().file_metadata().schema_descr(),
        roots.iter().copied(),
    );
    let reader = ParquetRecordBatchReaderBuilder::new_with_metadata(source, metadata)
        .with_row_groups(vec![rg])
        .with_projection(mask)
        .with_batch_size(usize::try_from(rows).unwrap_or(1).max(1))
        .build()?;
    let mut parts = reader.collect::<std::result::Result<Vec<_>, _>>()?;
    if parts.len() == 1
        && let Some(batch) = parts.pop()
    {
        return Ok(batch);
    }
    let schema = parts
        .first()
        .map(RecordBatch::schema)
        .ok_or_else(|| Error::internal("a row group decoded to nothing"))?;
    Ok(arrow_select::concat::concat_batches(&schema, &parts)?)
}

/// A whole parquet file read in one request (counted in `io`).
async fn read_whole(file_io: &FileIO, path: &str, io: &IoCounter) -> Result<Bytes> {
    let data: Bytes = file_io.new_input(path)?.read().await?;
    io.add(data.len());
    Ok(data)
}

fn decode_whole(data: Bytes) -> Result<ParquetRecordBatchReader> {
    Ok(ParquetRecordBatchReaderBuilder::try_new(data)?
        .with_batch_size(64 * 1024)
        .build()?)
}

/// Every batch of a parquet file read in one request (counted in `io`), decoded off the
/// async workers (reads load delete files this way: never queued behind a write).
pub async fn read_whole_parquet(
    file_io: &FileIO,
    path: &str,
    io: &IoCounter,
) -> Result<Vec<RecordBatch>> {
    let data = read_whole(file_io, path, io).await?;
    runtime::blocking(move || Ok(decode_whole(data)?.collect::<std::result::Result<_, _>>()?))
        .await?
}

/// Every row of a data file, aligned to the table schema (for rewrites: not cached). The
/// decode is a write's CPU work: one of the `runtime::cpu` slots.
pub async fn load_whole_file(
    file_io: &FileIO,
    path: &str,
    layout: &Layout,
    io: &IoCounter,
) -> Result<RecordBatch> {
    let data = read_whole(file_io, path, io).await?;
    let schema = layout.arrow.clone();
    runtime::cpu(move || {
        let mut parts = Vec::new();
        for b in decode_whole(data)? {
            parts.push(align_to(&b?, &schema)?);
        }
        Ok(arrow_select::concat::concat_batches(&schema, &parts)?)
    })
    .await?
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `batch` written as one Parquet file with `props`, and the file's key index.
    fn parquet_file(
        batch: &RecordBatch,
        props: parquet::file::properties::WriterProperties,
    ) -> (Bytes, FileIndex) {
        let mut file = Vec::new();
        let mut writer =
            parquet::arrow::ArrowWriter::try_new(&mut file, batch.schema(), Some(props)).unwrap();
        writer.write(batch).unwrap();
        writer.close().unwrap();
        let data = Bytes::from(file);
        let meta = parquet::file::metadata::ParquetMetaDataReader::new()
            .parse_and_finish(&data)
            .unwrap();
        let index = FileIndex::new("mem", Arc::new(meta), vec![]).unwrap();
        (data, index)
    }

    /// The bytes of one row group of `data`, as a miss reads them.
    fn row_group_bytes(data: &Bytes, entry: &crate::read::index::RowGroupEntry) -> Fetched {
        Fetched {
            offset: entry.bytes.start,
            bytes: data.slice(entry.bytes.start as usize..entry.bytes.end as usize),
        }
    }

    /// What a miss costs in CPU, on a real file: `DECODE_FILE=<data file>
    /// DECODE_METADATA=<its table's metadata.json> cargo test --release decode_cost -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement; needs a table"]
    fn decode_cost() {
        use std::time::Instant;
        let path = std::env::var("DECODE_FILE").unwrap();
        let md_path = std::env::var("DECODE_METADATA").unwrap();
        let md: iceberg::spec::TableMetadata =
            serde_json::from_slice(&std::fs::read(md_path).unwrap()).unwrap();
        let layout = Arc::new(Layout::from_metadata(&md).unwrap());
        let data = Bytes::from(std::fs::read(&path).unwrap());
        let meta = parquet::file::metadata::ParquetMetaDataReader::new()
            .parse_and_finish(&data)
            .unwrap();
        let index = FileIndex::new(&path, Arc::new(meta), vec![]).unwrap();
        let n = index.row_groups.len();
        let source = |rg: usize| {
            let r = &index.row_groups[rg].bytes;
            Fetched {
                offset: r.start,
                bytes: data.slice(r.start as usize..r.end as usize),
            }
        };
        let runs = 2000;
        let all_roots: Vec<usize> = (0..index.schema().root_schema().get_fields().len()).collect();
        let t = Instant::now();
        for i in 0..runs {
            let rg = (i * 7919) % n;
            let arrow = index.footer(rg).unwrap().arrow().unwrap();
            let batch = decode_by_arrow(source(rg), arrow, 0, &all_roots).unwrap();
            std::hint::black_box(Block::from_batch(
                &align_to(&batch, &layout.arrow).unwrap(),
                &layout,
                0,
            ));
        }
        let arrow = t.elapsed() / runs as u32;
        let t = Instant::now();
        for i in 0..runs {
            let rg = (i * 7919) % n;
            let footer = index.footer(rg).unwrap();
            std::hint::black_box(decode_row_group(source(rg), &footer, &layout, 0, None).unwrap());
        }
        println!(
            "decode row group: in place {:?}, by Arrow {arrow:?} ({n} row groups)",
            t.elapsed() / runs as u32
        );
        let t = Instant::now();
        for i in 0..runs {
            std::hint::black_box(index.footer((i * 7919) % n).unwrap());
        }
        println!("footer of a row group: {:?}", t.elapsed() / runs as u32);
        let footer = index.footer(0).unwrap();
        let rg0 = footer.row_group();
        let src = Arc::new(source(0));
        for (leaf, field) in layout
            .arrow
            .fields()
            .iter()
            .enumerate()
            .take(rg0.num_columns())
        {
            let t = Instant::now();
            for _ in 0..runs {
                std::hint::black_box(
                    plain::decode_column(&src, rg0, leaf, field.data_type()).unwrap(),
                );
            }
            println!(
                "  {} {:?} {:?}",
                field.name(),
                rg0.column(leaf).compressed_size(),
                t.elapsed() / runs as u32
            );
        }
        let t = Instant::now();
        for _ in 0..runs {
            std::hint::black_box(Arc::new(source(0)));
        }
        println!("  source {:?}", t.elapsed() / runs as u32);
    }

    /// A table with a column of every kind (nulls in each optional one) written as our
    /// writer writes it: a key, a version and every cell read in place equal what Arrow
    /// decodes, and a write's keys-and-timestamps decode agrees on keys and versions.
    #[test]
    fn in_place_decoding_matches_arrow_for_every_kind() {
        use crate::schema::{ColumnKind, ColumnSpec, new_table_schema};
        use arrow_array::builder::{Float32Builder, ListBuilder};
        use arrow_array::{
            ArrayRef, BooleanArray, Float32Array, Float64Array, Int32Array, Int64Array,
            LargeBinaryArray, StringArray, TimestampMicrosecondArray,
        };
        use arrow_schema::DataType;

        let spec = |n: &str, t| ColumnSpec {
            name: n.into(),
            value_type: t,
        };
        let (join, feats) = (
            vec![spec("id", 4)],
            vec![
                spec("b", 1),
                spec("s", 2),
                spec("i32", 3),
                spec("i64", 4),
                spec("f64", 5),
                spec("f32", 6),
                spec("flag", 7),
                spec("at", 8),
                spec("floats", 16),
                spec("proto", 20),
            ],
        );
        let schema = Arc::new(new_table_schema(&join, &feats).unwrap());
        let arrow = Arc::new(iceberg::arrow::schema_to_arrow_schema(&schema).unwrap());
        let column = |c: &ColumnSpec| Column {
            name: c.name.clone(),
            value_type: c.value_type,
            kind: ColumnKind::from_value_type(c.value_type).unwrap(),
            index: arrow.index_of(&c.name).unwrap(),
        };
        let layout = Layout {
            entity_key: arrow.index_of(crate::schema::ENTITY_KEY).unwrap(),
            event_ts: arrow.index_of(crate::schema::EVENT_TS).unwrap(),
            created_ts: arrow.index_of(crate::schema::CREATED_TS).unwrap(),
            join_keys: join.iter().map(column).collect(),
            features: feats.iter().map(column).collect(),
            schema,
            arrow: arrow.clone(),
            buckets: 16,
        };
        let rows = 1300; // three row groups, the last one short
        let null = |r: usize| r % 7 == 3;
        let columns: Vec<ArrayRef> = arrow
            .fields()
            .iter()
            .map(|f| -> ArrayRef {
                let name = f.name().as_str();
                let opt = |r: usize| !(f.is_nullable() && null(r));
                match f.data_type() {
                    DataType::LargeBinary if name == crate::schema::ENTITY_KEY => Arc::new(
                        (0..rows)
                            .map(|r| Some(format!("key-{r:06}").into_bytes()))
                            .collect::<LargeBinaryArray>(),
                    ),
                    DataType::LargeBinary => Arc::new(
                        (0..rows)
                            .map(|r| opt(r).then(|| vec![r as u8; r % 5]))
                            .collect::<LargeBinaryArray>(),
                    ),
                    DataType::Utf8 => Arc::new(
                        (0..rows)
                            .map(|r| opt(r).then(|| format!("v{}", r * 31)))
                            .collect::<StringArray>(),
                    ),
                    DataType::Int32 => Arc::new(
                        (0..rows)
                            .map(|r| opt(r).then_some(r as i32 - 600))
                            .collect::<Int32Array>(),
                    ),
                    DataType::Int64 => Arc::new(
                        (0..rows)
                            .map(|r| opt(r).then_some((r as i64) << 33))
                            .collect::<Int64Array>(),
                    ),
                    DataType::Float32 => Arc::new(
                        (0..rows)
                            .map(|r| opt(r).then_some(r as f32 / 3.0))
                            .collect::<Float32Array>(),
                    ),
                    DataType::Float64 => Arc::new(
                        (0..rows)
                            .map(|r| opt(r).then_some(r as f64 / 7.0))
                            .collect::<Float64Array>(),
                    ),
                    DataType::Boolean => Arc::new(
                        (0..rows)
                            .map(|r| opt(r).then_some(r % 3 == 0))
                            .collect::<BooleanArray>(),
                    ),
                    DataType::Timestamp(_, tz) => Arc::new(
                        (0..rows)
                            .map(|r| opt(r).then_some(1_700_000_000_000_000 + r as i64 * 1001))
                            .collect::<TimestampMicrosecondArray>()
                            .with_timezone_opt(tz.clone()),
                    ),
                    DataType::List(item) => {
                        let mut b =
                            ListBuilder::new(Float32Builder::new()).with_field(item.clone());
                        for r in 0..rows {
                            if opt(r) {
                                b.values().extend((0..r % 4).map(|i| Some(i as f32)));
                                b.append(true);
                            } else {
                                b.append(false);
                            }
                        }
                        Arc::new(b.finish())
                    }
                    other => panic!("no test data for {other}"),
                }
            })
            .collect();
        let batch = RecordBatch::try_new(arrow.clone(), columns).unwrap();
        let (data, index) = parquet_file(&batch, crate::write::writer_properties());
        assert_eq!(index.row_groups.len(), 3);
        // A few bytes per key: parquet's own footer structs (~580 bytes per column chunk) made
        // it ~16 per key at 512-row row groups.
        let per_key = index.bytes as f64 / rows as f64;
        assert!(per_key < 8.0, "{per_key:.1} index bytes per key");
        let roots: Vec<usize> = (0..arrow.fields().len()).collect();
        let wanted: Vec<&Column> = layout.join_keys.iter().chain(&layout.features).collect();
        for (rg, entry) in index.row_groups.iter().enumerate() {
            let source = row_group_bytes(&data, entry);
            let footer = index.footer(rg).unwrap();
            let by_arrow =
                decode_by_arrow(source.clone(), footer.arrow().unwrap(), 0, &roots).unwrap();
            let expect = Block::from_batch(
                &align_to(&by_arrow, &arrow).unwrap(),
                &layout,
                entry.first_row,
            );
            let got =
                decode_row_group(source.clone(), &footer, &layout, entry.first_row, None).unwrap();
            let versions = decode_row_group(
                source,
                &footer,
                &layout,
                entry.first_row,
                Some([layout.entity_key, layout.event_ts, layout.created_ts]),
            )
            .unwrap();
            // Every flat column was read in place; only the list went to Arrow.
            let plain = got
                .columns
                .iter()
                .filter(|c| matches!(c, Cells::Plain(_)))
                .count();
            assert_eq!(plain, arrow.fields().len() - 1);
            assert!(got.weight() < expect.weight() * 2);
            assert!(versions.weight() * 3 < got.weight());
            for row in 0..entry.rows {
                let key = expect.key(row).unwrap();
                assert_eq!(got.key(row), Some(key));
                assert_eq!(got.version(row), expect.version(row));
                assert_eq!(got.find(key), expect.find(key));
                assert_eq!(versions.find(key), expect.find(key));
                for c in &wanted {
                    assert_eq!(
                        got.value(c, row),
                        expect.value(c, row),
                        "{} row {row}",
                        c.name
                    );
                }
            }
            assert!(got.find(b"key-none").is_none());
        }

        // Our writer declares the key order only where it holds; a row group that does not
        // declare it is checked, and its keys are still found.
        let declared = |batch: &RecordBatch| {
            crate::write::writer_properties_for(batch)
                .sorting_columns()
                .cloned()
        };
        assert!(declared(&batch).is_some());
        let backwards = arrow_array::UInt32Array::from_iter_values((0..rows as u32).rev());
        let reversed = arrow_select::take::take_record_batch(&batch, &backwards).unwrap();
        assert!(declared(&reversed).is_none());
        for (batch, sorted) in [(&batch, true), (&reversed, false)] {
            let (data, index) = parquet_file(batch, crate::write::writer_properties_for(batch));
            let entry = &index.row_groups[0];
            let footer = index.footer(0).unwrap();
            let source = row_group_bytes(&data, entry);
            let block = decode_row_group(source, &footer, &layout, 0, None).unwrap();
            assert_eq!(block.order.is_none(), sorted);
            for row in 0..entry.rows {
                let key = block.key(row).unwrap().to_vec();
                assert_eq!(block.find(&key).map(|(r, _)| r), Some(row));
            }
        }
    }

    #[test]
    fn nearby_ranges_are_fetched_together() {
        let ranges = [100..200, 0..10, 210..300, 5000..5100, 150..250];
        assert_eq!(merge_ranges(&ranges, 16), vec![0..10, 100..300, 5000..5100]);
        assert_eq!(merge_ranges(&ranges, 1 << 20), vec![0..5100]);
        assert_eq!(merge_ranges(&ranges, 0), vec![0..10, 100..300, 5000..5100]);
        assert_eq!(merge_ranges(&[], 16), Vec::<Range<u64>>::new());
    }

    #[test]
    fn fetched_bytes_answer_by_file_offset() {
        let f = Fetched {
            offset: 100,
            bytes: Bytes::from_static(b"abcdef"),
        };
        assert_eq!(f.get_bytes(102, 3).unwrap(), Bytes::from_static(b"cde"));
        assert!(f.get_bytes(99, 1).is_err());
        assert!(f.get_bytes(104, 3).is_err());
        assert_eq!(f.len(), 106);
    }
}
