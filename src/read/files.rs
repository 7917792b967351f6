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

use arrow_array::{Array, LargeBinaryArray, RecordBatch};
use bytes::Bytes;
use futures::FutureExt;
use futures::future::BoxFuture;
use iceberg::io::{FileIO, FileRead};
use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReader,
    ParquetRecordBatchReaderBuilder,
};
use parquet::arrow::async_reader::AsyncFileReader;
use parquet::file::metadata::ParquetMetaData;
use parquet::file::reader::{ChunkReader, Length};

use super::cache::{CacheStats, ClockCache, Weighted};
use super::deletes::{BucketDeletes, PositionDeletes, load_deletes};
use super::index::FileIndex;
use super::{Version, align_to, keys_of, row_version};
use crate::error::{Error, Result};
use crate::runtime;
use crate::schema::Layout;
use crate::storage::{IoCounter, IoStats};
use crate::table::LiveFile;

/// parquet's async reader over an iceberg `FileRead`, counting what it fetches.
pub struct CountingReader {
    inner: Box<dyn FileRead>,
    io: Arc<IoStats>,
    prefetch: bool,
}

impl CountingReader {
    pub async fn open(
        file_io: &FileIO,
        path: &str,
        io: &Arc<IoStats>,
        prefetch: bool,
    ) -> Result<Self> {
        Ok(Self {
            inner: file_io.new_input(path)?.reader().await?,
            io: io.clone(),
            prefetch,
        })
    }

    fn counter(&self) -> &IoCounter {
        if self.prefetch {
            &self.io.prefetch
        } else {
            &self.io.data
        }
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

/// One decoded row group, aligned to a table schema.
#[derive(Debug)]
pub struct Block {
    pub batch: RecordBatch,
    keys: LargeBinaryArray,
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
    pub fn new(batch: RecordBatch, layout: &Layout, first_position: u64) -> Result<Self> {
        let keys = keys_of(&batch, layout)?;
        let sorted = (1..keys.len())
            .all(|i| keys.is_null(i - 1) || keys.value(i - 1) <= keys.value(i))
            && keys.null_count() == 0;
        let order = (!sorted).then(|| {
            let mut rows: Vec<u32> = (0..keys.len() as u32)
                .filter(|&r| !keys.is_null(r as usize))
                .collect();
            rows.sort_by(|a, b| keys.value(*a as usize).cmp(keys.value(*b as usize)));
            rows
        });
        let bytes = batch.get_array_memory_size()
            + order.as_ref().map_or(0, |o| o.len() * 4)
            + std::mem::size_of::<Self>();
        Ok(Self {
            batch,
            keys,
            order,
            first_position,
            bytes,
        })
    }

    fn row_at(&self, i: usize) -> usize {
        match &self.order {
            Some(o) => o[i] as usize,
            None => i,
        }
    }

    fn len(&self) -> usize {
        self.order.as_ref().map_or(self.keys.len(), Vec::len)
    }

    /// The row holding `key`; of several (append-only writers' files), the newest version.
    pub fn find(&self, key: &[u8], layout: &Layout) -> Option<(usize, Version)> {
        let start = {
            let (mut lo, mut hi) = (0, self.len());
            while lo < hi {
                let mid = (lo + hi) / 2;
                if self.keys.value(self.row_at(mid)) < key {
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
            if self.keys.value(row) != key {
                break;
            }
            let v = row_version(&self.batch, row, layout);
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
}

/// Who asks for row groups: a request (its reads count as data read) or the background
/// preparation of a new snapshot (counted as prefetch). Both leave what they decode cached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    Cache,
    Prefetch,
}

/// What a store knows of data files: key indexes of live files, decoded row groups within a
/// byte budget, decoded position deletes.
pub struct DataFiles {
    indexes: Mutex<HashMap<Arc<str>, Arc<FileIndex>>>,
    blocks: ClockCache<BlockKey, Block>,
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
            blocks: ClockCache::new(block_budget),
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
        let reader = CountingReader::open(file_io, file.path(), io, fill == Fill::Prefetch).await?;
        let size = file.entry.file_size_in_bytes();
        let rows = file.entry.record_count();
        let index = Arc::new(FileIndex::load(reader, file.path(), size, rows).await?);
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
        })
    }

    /// Row groups of one file, from the cache or fetched (nearby ones in one request) and
    /// decoded, in the order asked.
    pub async fn blocks(
        &self,
        file_io: &FileIO,
        index: &FileIndex,
        row_groups: &[usize],
        layout: &Arc<Layout>,
        io: &Arc<IoStats>,
        fill: Fill,
    ) -> Result<Vec<Arc<Block>>> {
        let schema_id = layout.schema.schema_id();
        let key = |rg: usize| BlockKey {
            path: index.path.clone(),
            row_group: rg,
            schema_id,
        };
        let mut out: Vec<Option<Arc<Block>>> = row_groups
            .iter()
            .map(|&rg| self.blocks.get(&key(rg)))
            .collect();
        let missing: Vec<usize> = row_groups
            .iter()
            .zip(&out)
            .filter(|(_, b)| b.is_none())
            .map(|(&rg, _)| rg)
            .collect();
        if missing.is_empty() {
            return Ok(out.into_iter().flatten().collect());
        }
        let ranges: Vec<Range<u64>> = missing
            .iter()
            .map(|&rg| index.row_groups[rg].bytes.clone())
            .collect();
        let merged = merge_ranges(&ranges, coalesce_gap(&index.path));
        let reader = CountingReader::open(file_io, &index.path, io, fill == Fill::Prefetch).await?;
        let fetched =
            futures::future::try_join_all(merged.iter().map(|r| reader.read(r.clone()))).await?;
        let fetched: Vec<Fetched> = merged
            .iter()
            .zip(fetched)
            .map(|(r, bytes)| Fetched {
                offset: r.start,
                bytes,
            })
            .collect();
        // Decoding is CPU work: off the async workers, one task per row group so that a
        // request's misses decode on every core.
        let decodes = missing.iter().map(|&rg| {
            let range = &index.row_groups[rg].bytes;
            let part = merged.partition_point(|m| m.end < range.end);
            let source = fetched[part].clone();
            let metadata = index.reader_metadata.clone();
            let layout = layout.clone();
            let first = index.row_groups[rg].first_row;
            let path = index.path.clone();
            async move {
                tokio::task::spawn_blocking(move || {
                    decode_row_group(source, metadata, rg, &layout, first)
                        .map_err(|e| e.context(format!("row group {rg} of {path}")))
                })
                .await
                .map_err(|e| Error::internal(format!("row group decode task failed: {e}")))?
            }
        });
        let decoded = futures::future::try_join_all(decodes).await?;
        let mut decoded = missing.into_iter().zip(decoded);
        for slot in &mut out {
            if slot.is_none() {
                let (rg, block) = decoded
                    .next()
                    .ok_or_else(|| Error::internal("fewer row groups decoded than asked"))?;
                *slot = Some(self.blocks.insert(key(rg), Arc::new(block)));
            }
        }
        Ok(out.into_iter().flatten().collect())
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
        let index = self.index(file_io, file, io, fill).await?;
        let candidates: Vec<Vec<usize>> = keys.iter().map(|k| index.candidates(k)).collect();
        let mut wanted: Vec<usize> = candidates.iter().flatten().copied().collect();
        wanted.sort_unstable();
        wanted.dedup();
        let blocks = self
            .blocks(file_io, &index, &wanted, layout, io, fill)
            .await?;
        let by_rg: HashMap<usize, &Arc<Block>> = wanted.iter().copied().zip(&blocks).collect();
        Ok(keys
            .iter()
            .zip(&candidates)
            .map(|(key, rgs)| {
                let mut best: Option<Hit> = None;
                for rg in rgs {
                    let block = by_rg[rg];
                    if let Some((row, version)) = block.find(key, layout)
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

fn decode_row_group(
    source: Fetched,
    metadata: ArrowReaderMetadata,
    rg: usize,
    layout: &Layout,
    first_position: u64,
) -> Result<Block> {
    let rows = metadata.metadata().row_group(rg).num_rows();
    let reader = ParquetRecordBatchReaderBuilder::new_with_metadata(source, metadata)
        .with_row_groups(vec![rg])
        .with_batch_size(usize::try_from(rows).unwrap_or(1).max(1))
        .build()?;
    let mut parts = Vec::with_capacity(1);
    for b in reader {
        parts.push(align_to(&b?, &layout.arrow)?);
    }
    let batch = match parts.len() {
        1 => parts
            .pop()
            .unwrap_or_else(|| RecordBatch::new_empty(layout.arrow.clone())),
        _ => arrow_select::concat::concat_batches(&layout.arrow, &parts)?,
    };
    Block::new(batch, layout, first_position)
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
        let t = Instant::now();
        for i in 0..runs {
            let rg = (i * 7919) % n;
            std::hint::black_box(
                decode_row_group(source(rg), index.reader_metadata.clone(), rg, &layout, 0)
                    .unwrap(),
            );
        }
        println!(
            "decode row group {:?} ({n} row groups)",
            t.elapsed() / runs as u32
        );
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
