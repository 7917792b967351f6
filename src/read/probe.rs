//! Cold point lookups: the rows of a few keys from a data file that is not cached, reading only
//! what they need: the footer with the page index, then the pages whose `entity_key` range
//! covers a requested key (our files are sorted by `entity_key`, so that is about one page per
//! column), fetched concurrently. On object storage that is a few ranged GETs instead of the
//! whole file.
//!
//! The bloom filter on `entity_key` is not consulted: it is larger than the pages it would
//! spare (16 KiB per row group against ~1 page per column), so it only serves other engines.

use std::collections::HashSet;
use std::ops::Range;
use std::sync::Arc;

use arrow_array::{Array, RecordBatch};
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{FutureExt, TryStreamExt};
use iceberg::io::{FileIO, FileRead};
use parquet::arrow::arrow_reader::{ArrowReaderOptions, RowSelection, RowSelector};
use parquet::arrow::async_reader::{AsyncFileReader, ParquetRecordBatchStreamBuilder};
use parquet::file::metadata::{
    PageIndexPolicy, ParquetMetaData, ParquetMetaDataReader, RowGroupMetaData,
};
use parquet::file::page_index::column_index::ColumnIndexMetaData;
use parquet::file::statistics::Statistics;

use super::cache::FileData;
use super::{align_to, keys_of};
use crate::error::{Error, Result};
use crate::schema::{ENTITY_KEY, Layout};
use crate::storage::IoStats;
use crate::table::LiveFile;

/// parquet's async reader over an iceberg `FileRead`, counting what it fetches as data read.
struct CountingReader {
    inner: Box<dyn FileRead>,
    size: u64,
    io: Arc<IoStats>,
    /// Ranges closer than this are fetched as one: on object storage a request costs ~1-3 ms
    /// while a MiB more on the same one costs less, locally a gap is just wasted copying.
    coalesce: u64,
}

/// Gaps worth reading through, by storage: object_store's own default for remote storage.
fn coalesce_gap(path: &str) -> u64 {
    if crate::storage::is_remote(path) {
        1 << 20
    } else {
        4 << 10
    }
}

/// `ranges` merged where they overlap or lie within `gap` of each other, in file order.
fn merge_ranges(ranges: &[Range<u64>], gap: u64) -> Vec<Range<u64>> {
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

impl AsyncFileReader for CountingReader {
    fn get_bytes(&mut self, range: Range<u64>) -> BoxFuture<'_, parquet::errors::Result<Bytes>> {
        async move {
            let len = usize::try_from(range.end - range.start).unwrap_or(usize::MAX);
            let bytes = self
                .inner
                .read(range)
                .await
                .map_err(|e| parquet::errors::ParquetError::External(Box::new(e)))?;
            self.io.data.add(len);
            Ok(bytes)
        }
        .boxed()
    }

    /// The pages of all columns at once, nearby ones in one request: on object storage a cold
    /// lookup is the footer plus one or two ranged GETs, not one per column.
    fn get_byte_ranges(
        &mut self,
        ranges: Vec<Range<u64>>,
    ) -> BoxFuture<'_, parquet::errors::Result<Vec<Bytes>>> {
        async move {
            let merged = merge_ranges(&ranges, self.coalesce);
            let fetches = merged.iter().map(|range| {
                let len = usize::try_from(range.end - range.start).unwrap_or(usize::MAX);
                let (inner, io) = (&self.inner, &self.io);
                async move {
                    let bytes = inner
                        .read(range.clone())
                        .await
                        .map_err(|e| parquet::errors::ParquetError::External(Box::new(e)))?;
                    io.data.add(len);
                    Ok::<_, parquet::errors::ParquetError>(bytes)
                }
            });
            let fetched = futures::future::try_join_all(fetches).await?;
            // Slice each requested range out of the fetch that covers it.
            Ok(ranges
                .iter()
                .map(|r| {
                    let i = merged.partition_point(|m| m.end < r.end);
                    let m = &merged[i];
                    let from = usize::try_from(r.start - m.start).unwrap_or(0);
                    let to = usize::try_from(r.end - m.start).unwrap_or(0);
                    fetched[i].slice(from..to)
                })
                .collect())
        }
        .boxed()
    }

    fn get_metadata<'a>(
        &'a mut self,
        _options: Option<&'a ArrowReaderOptions>,
    ) -> BoxFuture<'a, parquet::errors::Result<Arc<ParquetMetaData>>> {
        async move {
            let size = self.size;
            // Footer and page index in one read for our files (about 4 KiB + 1 KiB per 16k rows).
            let meta = ParquetMetaDataReader::new()
                .with_prefetch_hint(Some(16 * 1024))
                .with_page_index_policy(PageIndexPolicy::Optional)
                .load_and_finish(self, size)
                .await?;
            Ok(Arc::new(meta))
        }
        .boxed()
    }
}

/// The requested keys that may lie in `[min, max]` of a row group's statistics.
fn in_row_group<'k>(rg: &RowGroupMetaData, column: usize, keys: &[&'k [u8]]) -> Vec<&'k [u8]> {
    let range = match rg.column(column).statistics() {
        Some(Statistics::ByteArray(s)) => s
            .min_bytes_opt()
            .zip(s.max_bytes_opt())
            .map(|(lo, hi)| (lo.to_vec(), hi.to_vec())),
        _ => None,
    };
    keys.iter()
        .copied()
        .filter(|k| {
            range
                .as_ref()
                .is_none_or(|(lo, hi)| *k >= &lo[..] && *k <= &hi[..])
        })
        .collect()
}

/// Row ranges (within the row group) of the pages whose key range covers a wanted key; the
/// whole row group when the file has no usable page index.
fn page_rows(
    meta: &ParquetMetaData,
    rg: usize,
    column: usize,
    keys: &[&[u8]],
) -> Vec<Range<usize>> {
    let rows = usize::try_from(meta.row_group(rg).num_rows()).unwrap_or(0);
    let whole = std::iter::once(0..rows).collect();
    let (Some(columns), Some(offsets)) = (meta.column_index(), meta.offset_index()) else {
        return whole;
    };
    let (Some(ColumnIndexMetaData::BYTE_ARRAY(index)), Some(offsets)) = (
        columns.get(rg).and_then(|c| c.get(column)),
        offsets.get(rg).and_then(|o| o.get(column)),
    ) else {
        return whole;
    };
    let pages = offsets.page_locations();
    let mut out: Vec<Range<usize>> = Vec::new();
    for (i, page) in pages.iter().enumerate() {
        let start = usize::try_from(page.first_row_index).unwrap_or(0);
        let end = pages.get(i + 1).map_or(rows, |next| {
            usize::try_from(next.first_row_index).unwrap_or(rows)
        });
        let covers = match (index.min_value(i), index.max_value(i)) {
            (Some(lo), Some(hi)) => keys.iter().any(|k| *k >= lo && *k <= hi),
            _ => false, // an all-null page holds no key
        };
        if covers {
            match out.last_mut() {
                Some(last) if last.end == start => last.end = end,
                _ => out.push(start..end),
            }
        }
    }
    out
}

fn selection(row_groups: &[(usize, Vec<Range<usize>>)]) -> RowSelection {
    let mut selectors = Vec::new();
    for (rows, ranges) in row_groups {
        let mut at = 0;
        for r in ranges {
            if r.start > at {
                selectors.push(RowSelector::skip(r.start - at));
            }
            selectors.push(RowSelector::select(r.end - r.start));
            at = r.end;
        }
        if *rows > at {
            selectors.push(RowSelector::skip(rows - at));
        }
    }
    RowSelection::from(selectors)
}

/// The rows of `keys` (serialized entity keys) in `file`, indexed like a cached file.
pub async fn probe(
    file_io: &FileIO,
    file: &LiveFile,
    layout: &Layout,
    keys: &[&[u8]],
    io: &Arc<IoStats>,
) -> Result<FileData> {
    let reader = CountingReader {
        inner: file_io.new_input(file.path())?.reader().await?,
        size: file.entry.file_size_in_bytes(),
        io: io.clone(),
        coalesce: coalesce_gap(file.path()),
    };
    let options = ArrowReaderOptions::new().with_page_index_policy(PageIndexPolicy::Optional);
    let builder = ParquetRecordBatchStreamBuilder::new_with_options(reader, options).await?;
    let meta = builder.metadata().clone();
    let column = builder
        .parquet_schema()
        .columns()
        .iter()
        .position(|c| c.path().string() == ENTITY_KEY)
        .ok_or_else(|| Error::corrupt(file.path(), "data file has no entity_key column"))?;

    let mut chosen: Vec<(usize, Vec<Range<usize>>)> = Vec::new();
    let mut row_groups = Vec::new();
    // File positions of the selected rows, in the order the reader returns them.
    let mut selected: Vec<u64> = Vec::new();
    let mut rg_start = 0u64;
    for rg in 0..meta.num_row_groups() {
        let first_row = rg_start;
        rg_start += u64::try_from(meta.row_group(rg).num_rows()).unwrap_or(0);
        let candidates = in_row_group(meta.row_group(rg), column, keys);
        if candidates.is_empty() {
            continue;
        }
        let ranges = page_rows(&meta, rg, column, &candidates);
        if !ranges.is_empty() {
            for r in &ranges {
                selected.extend((r.start as u64..r.end as u64).map(|p| first_row + p));
            }
            let rows = usize::try_from(meta.row_group(rg).num_rows()).unwrap_or(0);
            chosen.push((rows, ranges));
            row_groups.push(rg);
        }
    }
    if row_groups.is_empty() {
        return FileData::index(RecordBatch::new_empty(layout.arrow.clone()), layout);
    }
    let stream = builder
        .with_row_groups(row_groups)
        .with_row_selection(selection(&chosen))
        .build()?;
    let batches: Vec<RecordBatch> = stream.try_collect().await?;
    let wanted: HashSet<&[u8]> = keys.iter().copied().collect();
    let mut parts = Vec::with_capacity(batches.len());
    let mut positions = Vec::new();
    let mut at = 0;
    for b in &batches {
        let b = align_to(b, &layout.arrow)?;
        let found = keys_of(&b, layout)?;
        let keep: Vec<bool> = (0..found.len())
            .map(|i| !found.is_null(i) && wanted.contains(found.value(i)))
            .collect();
        for (i, k) in keep.iter().enumerate() {
            if *k {
                let pos = selected
                    .get(at + i)
                    .copied()
                    .ok_or_else(|| Error::internal("probe returned more rows than it selected"))?;
                positions.push(pos);
            }
        }
        at += found.len();
        let mask = arrow_array::BooleanArray::from(keep);
        parts.push(arrow_select::filter::filter_record_batch(&b, &mask)?);
    }
    let batch = arrow_select::concat::concat_batches(&layout.arrow, &parts)?;
    let mut data = FileData::index(batch, layout)?;
    data.positions = Some(positions);
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearby_ranges_are_fetched_together() {
        let ranges = [100..200, 0..10, 210..300, 5000..5100, 150..250];
        assert_eq!(merge_ranges(&ranges, 16), vec![0..10, 100..300, 5000..5100]);
        assert_eq!(merge_ranges(&ranges, 1 << 20), vec![0..5100]);
        assert_eq!(merge_ranges(&[], 16), Vec::<Range<u64>>::new());
    }

    #[test]
    fn selection_skips_unwanted_rows_of_each_row_group() {
        let whole: Vec<Range<usize>> = std::iter::once(0..40).collect();
        let s = selection(&[(100, vec![10..30, 50..60]), (40, whole)]);
        let selectors: Vec<RowSelector> = s.into();
        assert_eq!(
            selectors,
            vec![
                RowSelector::skip(10),
                RowSelector::select(20),
                RowSelector::skip(20),
                RowSelector::select(10),
                RowSelector::skip(40),
                RowSelector::select(40),
            ]
        );
    }
}
