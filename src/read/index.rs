//! The per-file key index: which row group of a data file may hold a key, where that row
//! group's bytes lie, and the footer needed to decode it. RocksDB's index block, for Parquet.
//!
//! It is derived from the file's own footer (row-group statistics of `entity_key`) and the
//! key column's Parquet bloom filters, so it is exactly as immutable as the file and never
//! needs writing anywhere: the table stays plain Iceberg. Our writer keeps row groups small
//! (`schema::ROW_GROUP_ROWS`) and sorted by key, so a key maps to one row group, and one row
//! group is one contiguous byte range: a miss costs one ranged read and the decode of one row
//! group, never the whole file.

use std::ops::Range;
use std::sync::Arc;

use parquet::arrow::arrow_reader::{ArrowReaderMetadata, ArrowReaderOptions};
use parquet::basic::{Compression, EncodingMask};
use parquet::bloom_filter::Sbbf;
use parquet::file::FOOTER_SIZE;
use parquet::file::metadata::{
    ColumnChunkMetaData, FileMetaData, FooterTail, ParquetMetaData, ParquetMetaDataOptions,
    ParquetMetaDataReader, ParquetStatisticsPolicy, RowGroupMetaData, SortingColumn,
};
use parquet::file::statistics::Statistics;
use parquet::schema::types::SchemaDescriptor;

use super::files::{CountingReader, Fetched, flat_leaf};
use crate::error::{Error, Result};
use crate::schema::ENTITY_KEY;

/// The smallest and largest key of a row group, inclusive.
pub type KeyRange = (Box<[u8]>, Box<[u8]>);

/// What the footer says of one row group.
#[derive(Debug)]
pub struct RowGroupEntry {
    /// `entity_key` range; None when the writer kept no statistics (every key may be here).
    pub keys: Option<KeyRange>,
    /// The row group's bloom filter of `entity_key`: a key inside the range but not in the
    /// filter is not here. A bucket holds several files whose key ranges all span the key
    /// space (keys are hashed into buckets, then sorted), so without it every file of the
    /// bucket would be a candidate for every key.
    pub filter: Option<Sbbf>,
    /// Position of the row group's first row in the file (position deletes count from it).
    pub first_row: u64,
    pub rows: usize,
    /// All column chunks of the row group, as one byte range of the file.
    pub bytes: Range<u64>,
    /// What decoding needs of each column chunk (`RowGroupMetaData` is rebuilt from it).
    chunks: Box<[Chunk]>,
    sorting: Option<Box<[SortingColumn]>>,
}

/// The part of a column chunk's footer entry that decoding reads. Parquet's own
/// `ColumnChunkMetaData` is ~580 bytes in memory (most of it room for statistics, histograms
/// and encryption we never hold), which made the footers 14 of the index's 16 bytes per key.
#[derive(Debug)]
struct Chunk {
    data_page: i64,
    dictionary_page: Option<i64>,
    compressed: i64,
    uncompressed: i64,
    values: i64,
    compression: Compression,
    encodings: EncodingMask,
}

impl Chunk {
    fn of(c: &ColumnChunkMetaData) -> Self {
        Self {
            data_page: c.data_page_offset(),
            dictionary_page: c.dictionary_page_offset(),
            compressed: c.compressed_size(),
            uncompressed: c.uncompressed_size(),
            values: c.num_values(),
            compression: c.compression(),
            encodings: *c.encodings_mask(),
        }
    }
}

/// The key index of one data file.
#[derive(Debug)]
pub struct FileIndex {
    pub path: Arc<str>,
    pub row_groups: Vec<RowGroupEntry>,
    /// Row groups ordered by key with disjoint ranges (our writer's files): a key is found by
    /// binary search. Otherwise every row group whose range covers the key is a candidate.
    sorted: bool,
    /// The footer's file-level part (schema, key-value metadata), to decode row groups
    /// without reading the footer again.
    file: FileMetaData,
    /// Memory this index holds.
    pub bytes: usize,
}

/// The footer of one row group, rebuilt for decoding it: a `ParquetMetaData` holding just
/// that row group (as row group 0).
pub struct RowGroupFooter(Arc<ParquetMetaData>);

impl RowGroupFooter {
    pub fn row_group(&self) -> &RowGroupMetaData {
        self.0.row_group(0)
    }

    pub fn schema(&self) -> &SchemaDescriptor {
        self.0.file_metadata().schema_descr()
    }

    /// The footer as Arrow's reader takes it (the file's Arrow schema decoded again: only
    /// row groups with nested columns need it).
    pub fn arrow(&self) -> Result<ArrowReaderMetadata> {
        Ok(ArrowReaderMetadata::try_new(
            self.0.clone(),
            ArrowReaderOptions::new(),
        )?)
    }
}

fn key_range(meta: &ParquetMetaData, rg: usize, column: usize) -> Option<KeyRange> {
    match meta.row_group(rg).column(column).statistics() {
        Some(Statistics::ByteArray(s)) => s
            .min_bytes_opt()
            .zip(s.max_bytes_opt())
            .map(|(lo, hi)| (lo.into(), hi.into())),
        _ => None,
    }
}

/// The byte range that holds every column chunk of row group `rg`.
fn row_group_bytes(meta: &ParquetMetaData, rg: usize, path: &str) -> Result<Range<u64>> {
    let mut range: Option<Range<u64>> = None;
    for c in meta.row_group(rg).columns() {
        let start = c.dictionary_page_offset().unwrap_or(c.data_page_offset());
        let (Ok(start), Ok(len)) = (u64::try_from(start), u64::try_from(c.compressed_size()))
        else {
            return Err(Error::corrupt(
                path,
                "negative column chunk offset in footer",
            ));
        };
        let end = start.saturating_add(len);
        range = Some(match range {
            Some(r) => r.start.min(start)..r.end.max(end),
            None => start..end,
        });
    }
    range.ok_or_else(|| Error::corrupt(path, "row group without columns"))
}

/// Bytes at the end of one of our files per row group: ~1.1 KiB of footer (13 columns) and
/// the key column's bloom filter (512 bytes and its header), written together at the end.
const TAIL_BYTES_PER_ROW_GROUP: u64 = 1700;

/// Where the key column's bloom filter of each row group lies, if it has one.
fn bloom_ranges(meta: &ParquetMetaData, column: usize) -> Vec<Option<Range<u64>>> {
    meta.row_groups()
        .iter()
        .map(|rg| {
            let c = rg.column(column);
            let start = u64::try_from(c.bloom_filter_offset()?).ok()?;
            let len = u64::try_from(c.bloom_filter_length()?).ok()?;
            Some(start..start.saturating_add(len))
        })
        .collect()
}

/// A footer decoded with only what the index keeps: the key column's statistics (its row
/// groups' key ranges), no other column's, no page-encoding or size statistics.
fn decode_footer(footer: &[u8]) -> Result<ParquetMetaData> {
    let schema = ParquetMetaDataReader::decode_schema(footer)?;
    let keys: Vec<usize> = flat_leaf(&schema, ENTITY_KEY).into_iter().collect();
    let options = ParquetMetaDataOptions::new()
        .with_schema(schema)
        .with_column_stats_policy(ParquetStatisticsPolicy::skip_except(&keys))
        .with_encoding_stats_policy(ParquetStatisticsPolicy::SkipAll)
        .with_size_stats_policy(ParquetStatisticsPolicy::SkipAll);
    Ok(ParquetMetaDataReader::decode_metadata_with_options(
        footer,
        Some(&options),
    )?)
}

fn key_column(meta: &ParquetMetaData, path: &str) -> Result<usize> {
    flat_leaf(meta.file_metadata().schema_descr(), ENTITY_KEY)
        .ok_or_else(|| Error::corrupt(path, "data file has no entity_key column"))
}

impl FileIndex {
    /// Reads the tail of `path` (`size` bytes, `rows` rows as its manifest entry says): the
    /// footer and the key column's bloom filters, and indexes its row groups.
    ///
    /// Our writer puts every bloom filter right before the footer, so the whole index is one
    /// read from the end of the file, sized from the row count. Files of other writers whose
    /// filters lie spread over the file are indexed by key range alone.
    ///
    /// `background`: preparing a new snapshot, whose CPU work yields to requests.
    pub async fn load(
        reader: CountingReader,
        path: &str,
        size: u64,
        rows: u64,
        background: bool,
    ) -> Result<Self> {
        let row_groups = rows.div_ceil(crate::schema::ROW_GROUP_ROWS as u64);
        let guess = row_groups
            .saturating_mul(TAIL_BYTES_PER_ROW_GROUP)
            .saturating_add(8 * 1024)
            .min(size);
        let mut tail = Fetched {
            offset: size - guess,
            bytes: reader.read(size - guess..size).await?,
        };
        if tail.bytes.len() < FOOTER_SIZE {
            return Err(Error::corrupt(path, "shorter than a parquet footer"));
        }
        let last = &tail.bytes[tail.bytes.len() - FOOTER_SIZE..];
        let footer_len = FooterTail::try_from(last)?.metadata_length() as u64;
        let footer_start = size
            .checked_sub(footer_len + FOOTER_SIZE as u64)
            .ok_or_else(|| Error::corrupt(path, "footer longer than the file"))?;
        tail.extend_back(&reader, footer_start).await?;
        let from = usize::try_from(footer_start - tail.offset).unwrap_or(usize::MAX);
        // A parsed footer holds ~580 bytes per column chunk until it is indexed, and the
        // first request on a table indexes every file it touches at once: at most a core's
        // worth are parsed and held at a time (a peak the allocator kept: 2M entities,
        // reader peak RSS 345 -> 298 MB; 10M, 895 -> 871 MiB).
        let _slot = crate::runtime::slot(background).await?;
        // Decoding a footer is CPU work (a file of 1,000 row groups takes milliseconds):
        // never on the async workers, and below reads when it prepares a new snapshot.
        let footer = tail.bytes.slice(from..tail.bytes.len() - FOOTER_SIZE);
        let decode = move || decode_footer(&footer);
        let meta = if background {
            crate::runtime::background_blocking(decode).await??
        } else {
            crate::runtime::blocking(decode).await??
        };
        let column = key_column(&meta, path)?;
        let ranges = bloom_ranges(&meta, column);
        // Filters written together before the footer are worth one more read if the guess
        // fell short; filters spread over the file (other writers) are not.
        let filter_bytes: u64 = ranges.iter().flatten().map(|r| r.end - r.start).sum();
        if let Some(first) = ranges.iter().flatten().map(|r| r.start).min()
            && tail.offset.saturating_sub(first) <= filter_bytes + 64 * 1024
        {
            tail.extend_back(&reader, first).await?;
        }
        let path = path.to_string();
        let index = move || {
            let mut filters = Vec::with_capacity(ranges.len());
            for (rg, range) in ranges.iter().enumerate() {
                let filter = match range {
                    Some(r) if tail.holds(r.start, r.end - r.start) => {
                        Sbbf::read_from_column_chunk(meta.row_group(rg).column(column), &tail)?
                    }
                    _ => None,
                };
                filters.push(filter);
            }
            Self::new(&path, Arc::new(meta), filters)
        };
        if background {
            crate::runtime::background_blocking(index).await?
        } else {
            crate::runtime::blocking(index).await?
        }
    }

    /// Indexes a footer; `filters` are the key column's bloom filters per row group (None
    /// where a row group has none, or is empty when none is known).
    pub fn new(
        path: &str,
        meta: Arc<ParquetMetaData>,
        mut filters: Vec<Option<Sbbf>>,
    ) -> Result<Self> {
        let column = key_column(&meta, path)?;
        filters.resize(meta.num_row_groups(), None);
        let mut row_groups = Vec::with_capacity(meta.num_row_groups());
        let mut first_row = 0u64;
        for (rg, filter) in filters.into_iter().enumerate() {
            let rows = usize::try_from(meta.row_group(rg).num_rows())
                .map_err(|_| Error::corrupt(path, "negative row count in footer"))?;
            let group = meta.row_group(rg);
            row_groups.push(RowGroupEntry {
                keys: key_range(&meta, rg, column),
                filter,
                first_row,
                rows,
                bytes: row_group_bytes(&meta, rg, path)?,
                chunks: group.columns().iter().map(Chunk::of).collect(),
                sorting: group.sorting_columns().map(|s| s.as_slice().into()),
            });
            first_row += rows as u64;
        }
        let sorted = row_groups.iter().all(|g| g.keys.is_some())
            && row_groups
                .windows(2)
                .all(|w| match (&w[0].keys, &w[1].keys) {
                    (Some((_, hi)), Some((lo, _))) => hi < lo,
                    _ => false,
                });
        let entries_bytes: usize = row_groups
            .iter()
            .map(|g| {
                std::mem::size_of::<RowGroupEntry>()
                    + g.keys.as_ref().map_or(0, |(lo, hi)| lo.len() + hi.len())
                    + g.filter.as_ref().map_or(0, |f| f.num_blocks() * 32)
                    + std::mem::size_of_val(&*g.chunks)
                    + g.sorting
                        .as_ref()
                        .map_or(0, |s| std::mem::size_of_val(&**s))
            })
            .sum();
        let file = meta.file_metadata().clone();
        let file_bytes = std::mem::size_of::<FileMetaData>()
            + file.key_value_metadata().map_or(0, |kv| {
                kv.iter()
                    .map(|e| e.key.len() + e.value.as_ref().map_or(0, String::len))
                    .sum()
            });
        Ok(Self {
            path: Arc::from(path),
            row_groups,
            sorted,
            file,
            bytes: entries_bytes + file_bytes,
        })
    }

    /// The file's Parquet schema.
    pub fn schema(&self) -> &SchemaDescriptor {
        self.file.schema_descr()
    }

    /// Row group `rg`'s footer, rebuilt to decode it (~2 us, `files::tests::decode_cost`;
    /// a row group's decode takes ~45 us).
    pub fn footer(&self, rg: usize) -> Result<RowGroupFooter> {
        let group = &self.row_groups[rg];
        let schema = self.file.schema_descr_ptr();
        let columns = group
            .chunks
            .iter()
            .enumerate()
            .map(|(leaf, c)| {
                ColumnChunkMetaData::builder(schema.column(leaf))
                    .set_data_page_offset(c.data_page)
                    .set_dictionary_page_offset(c.dictionary_page)
                    .set_total_compressed_size(c.compressed)
                    .set_total_uncompressed_size(c.uncompressed)
                    .set_num_values(c.values)
                    .set_compression(c.compression)
                    .set_encodings_mask(c.encodings)
                    .build()
            })
            .collect::<parquet::errors::Result<Vec<_>>>()?;
        let row_group = RowGroupMetaData::builder(schema)
            .set_num_rows(i64::try_from(group.rows).unwrap_or(i64::MAX))
            .set_total_byte_size(columns.iter().map(|c| c.uncompressed_size()).sum())
            .set_sorting_columns(group.sorting.as_deref().map(<[_]>::to_vec))
            .set_column_metadata(columns)
            .build()?;
        Ok(RowGroupFooter(Arc::new(ParquetMetaData::new(
            self.file.clone(),
            vec![row_group],
        ))))
    }

    /// Row groups that may hold `key`.
    pub fn candidates(&self, key: &[u8]) -> Vec<usize> {
        let covers = |g: &RowGroupEntry| {
            g.keys
                .as_ref()
                .is_none_or(|(lo, hi)| key >= &lo[..] && key <= &hi[..])
                && g.filter.as_ref().is_none_or(|f| f.check(key))
        };
        if self.sorted {
            // The last row group starting at or before the key is the only candidate.
            let after = self
                .row_groups
                .partition_point(|g| g.keys.as_ref().is_some_and(|(lo, _)| &lo[..] <= key));
            return match after.checked_sub(1) {
                Some(i) if covers(&self.row_groups[i]) => vec![i],
                _ => Vec::new(),
            };
        }
        (0..self.row_groups.len())
            .filter(|&i| covers(&self.row_groups[i]))
            .collect()
    }

    /// Whether some row group may hold `key`.
    pub fn may_hold(&self, key: &[u8]) -> bool {
        !self.candidates(key).is_empty()
    }

    /// Row groups whose key range meets `[lo, hi]` (those without statistics always do).
    pub fn overlapping(&self, lo: &[u8], hi: &[u8]) -> Vec<usize> {
        (0..self.row_groups.len())
            .filter(|&i| {
                self.row_groups[i]
                    .keys
                    .as_ref()
                    .is_none_or(|(a, b)| &a[..] <= hi && &b[..] >= lo)
            })
            .collect()
    }

    pub fn rows(&self) -> u64 {
        self.row_groups.iter().map(|g| g.rows as u64).sum()
    }
}
