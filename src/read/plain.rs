//! Row groups decoded without Arrow, for point reads.
//!
//! A read miss needs one row of a row group, yet Arrow's reader spends ~6 us per column just
//! setting up (page reader, decoder, array builders) before it decodes anything: ~100 us a
//! row group of 14 columns, most of what a miss cost. Our writer's column chunks are the
//! simplest Parquet there is (PLAIN values, no dictionary, flat columns with at most one
//! definition level), so here each chunk's pages are decompressed and indexed in place:
//! where each row's value starts, and which rows are null. Values are read from those bytes
//! when a row is asked for. Anything else (nested columns, dictionary or other encodings,
//! timestamps in another unit, files of other writers using them) is decoded by Arrow,
//! column by column.

use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::{Int64Type, TimestampMicrosecondType};
use arrow_array::{Array, ArrayRef};
use arrow_schema::DataType;
use bytes::Bytes;
use parquet::basic::{
    Compression, ConvertedType, Encoding, LogicalType, TimeUnit, Type as Physical,
};
use parquet::column::page::{Page, PageReader};
use parquet::file::metadata::{ColumnChunkMetaData, RowGroupMetaData};
use parquet::file::properties::{ReaderProperties, ReaderPropertiesPtr};
use parquet::file::serialized_reader::SerializedPageReader;
use parquet::schema::types::ColumnDescriptor;

use super::files::Fetched;
use crate::convert::{ScalarRef, write_cell_value, write_scalar_value};
use crate::error::{Error, Result};
use crate::schema::ColumnKind;

/// Slot of a null row in `PlainColumn::slots`.
const NULL_SLOT: u32 = u32::MAX;

/// One column of a decoded row group.
#[derive(Debug)]
pub enum Cells {
    Plain(PlainColumn),
    /// Decoded by Arrow (nested columns, other encodings), aligned to the table's type.
    Arrow(ArrayRef),
    /// The file predates the column (schema evolution): every row is null.
    Missing,
}

impl Cells {
    /// Writes the serialized Feast `Value` of `row` into `buf` (cleared first; empty for null).
    pub fn write_value(&self, buf: &mut Vec<u8>, kind: ColumnKind, row: usize) {
        match self {
            Self::Plain(c) => c.write_value(buf, kind, row),
            Self::Arrow(a) => write_cell_value(buf, kind, a.as_ref(), row),
            Self::Missing => buf.clear(),
        }
    }

    /// A binary or string cell (the entity key).
    pub fn bytes(&self, row: usize) -> Option<&[u8]> {
        match self {
            Self::Plain(c) => c.slot(row).map(|i| c.bytes(i)),
            Self::Arrow(a) => match a.data_type() {
                DataType::LargeBinary => {
                    let a = a.as_binary::<i64>();
                    (!a.is_null(row)).then(|| a.value(row))
                }
                DataType::Binary => {
                    let a = a.as_binary::<i32>();
                    (!a.is_null(row)).then(|| a.value(row))
                }
                _ => None,
            },
            Self::Missing => None,
        }
    }

    /// An int64 or timestamp cell (event and created timestamps).
    pub fn int64(&self, row: usize) -> Option<i64> {
        match self {
            Self::Plain(c) => c.slot(row).map(|i| c.int64(i)),
            Self::Arrow(a) => {
                let value = match a.data_type() {
                    DataType::Timestamp(..) => {
                        a.as_primitive_opt::<TimestampMicrosecondType>()?.value(row)
                    }
                    _ => a.as_primitive_opt::<Int64Type>()?.value(row),
                };
                (!a.is_null(row)).then_some(value)
            }
            Self::Missing => None,
        }
    }

    pub fn memory(&self) -> usize {
        match self {
            Self::Plain(c) => c.memory(),
            Self::Arrow(a) => a.get_array_memory_size(),
            Self::Missing => 0,
        }
    }
}

/// A flat column's PLAIN values as the pages hold them, with where each value starts.
#[derive(Debug)]
pub struct PlainColumn {
    physical: Physical,
    /// The values, page after page; booleans one byte each.
    values: Bytes,
    /// Byte arrays: where each value's bytes start in `values` (its length is the 4 bytes
    /// before). Empty for fixed-width types.
    starts: Vec<u32>,
    /// Optional columns: per row, the index of its value, `NULL_SLOT` for null. None when
    /// every row has a value.
    slots: Option<Vec<u32>>,
    /// `values` is a slice of the row group's bytes as read (an uncompressed page): the block
    /// accounts for those bytes once, not each column.
    borrowed: bool,
}

impl PlainColumn {
    fn slot(&self, row: usize) -> Option<usize> {
        match &self.slots {
            None => Some(row),
            Some(s) => (s[row] != NULL_SLOT).then_some(s[row] as usize),
        }
    }

    /// The `N` bytes of `values` at byte offset `at`.
    fn le<const N: usize>(&self, at: usize) -> [u8; N] {
        let mut out = [0; N];
        out.copy_from_slice(&self.values[at..at + N]);
        out
    }

    /// Fixed-width value `i`.
    fn fixed<const N: usize>(&self, i: usize) -> [u8; N] {
        self.le(i * N)
    }

    fn bytes(&self, i: usize) -> &[u8] {
        let start = self.starts[i] as usize;
        let len = u32::from_le_bytes(self.le(start - 4)) as usize;
        &self.values[start..start + len]
    }

    fn int64(&self, i: usize) -> i64 {
        match self.physical {
            Physical::INT64 => i64::from_le_bytes(self.fixed(i)),
            _ => i64::from(i32::from_le_bytes(self.fixed(i))),
        }
    }

    fn scalar(&self, i: usize) -> ScalarRef<'_> {
        match self.physical {
            Physical::BOOLEAN => ScalarRef::Bool(self.values[i] != 0),
            Physical::INT32 => ScalarRef::Int32(i32::from_le_bytes(self.fixed(i))),
            Physical::INT64 => ScalarRef::Int64(i64::from_le_bytes(self.fixed(i))),
            Physical::FLOAT => ScalarRef::Float(f32::from_le_bytes(self.fixed(i))),
            Physical::DOUBLE => ScalarRef::Double(f64::from_le_bytes(self.fixed(i))),
            _ => ScalarRef::Bytes(self.bytes(i)),
        }
    }

    fn write_value(&self, buf: &mut Vec<u8>, kind: ColumnKind, row: usize) {
        buf.clear();
        let Some(i) = self.slot(row) else {
            return;
        };
        match kind {
            ColumnKind::Proto => buf.extend_from_slice(self.bytes(i)),
            ColumnKind::Scalar(s) => write_scalar_value(buf, s, self.scalar(i)),
            // Lists are nested columns: never plain.
            ColumnKind::List(_) | ColumnKind::Set(_) => {}
        }
    }

    /// Whether `values` lies in the row group's bytes as read (see `borrowed`).
    pub fn borrows_source(&self) -> bool {
        self.borrowed
    }

    fn memory(&self) -> usize {
        (if self.borrowed { 0 } else { self.values.len() })
            + self.starts.len() * 4
            + self.slots.as_ref().map_or(0, |s| s.len() * 4)
            + std::mem::size_of::<Self>()
    }
}

/// The physical type a flat file column must have to be read in place as `target`, or None
/// when Arrow must decode it (another type, or a timestamp in another unit).
fn plain_physical(target: &DataType, column: &ColumnDescriptor) -> Option<Physical> {
    let physical = column.physical_type();
    let fits = match target {
        DataType::Boolean => physical == Physical::BOOLEAN,
        DataType::Int32 => physical == Physical::INT32,
        DataType::Int64 => physical == Physical::INT64,
        DataType::Float32 => physical == Physical::FLOAT,
        DataType::Float64 => physical == Physical::DOUBLE,
        DataType::Binary | DataType::LargeBinary | DataType::Utf8 | DataType::LargeUtf8 => {
            physical == Physical::BYTE_ARRAY
        }
        DataType::Timestamp(arrow_schema::TimeUnit::Microsecond, _) => {
            physical == Physical::INT64
                && match column.logical_type_ref() {
                    Some(LogicalType::Timestamp { unit, .. }) => *unit == TimeUnit::MICROS,
                    _ => column.converted_type() == ConvertedType::TIMESTAMP_MICROS,
                }
        }
        _ => false,
    };
    (fits && column.max_rep_level() == 0 && column.max_def_level() <= 1).then_some(physical)
}

/// Page reader settings: page statistics are not needed to decode.
fn reader_properties() -> ReaderPropertiesPtr {
    static PROPS: std::sync::OnceLock<ReaderPropertiesPtr> = std::sync::OnceLock::new();
    PROPS
        .get_or_init(|| {
            Arc::new(
                ReaderProperties::builder()
                    .set_read_page_statistics(false)
                    .build(),
            )
        })
        .clone()
}

/// Where each row's value is in an optional column. While every row so far has a value, row
/// `i` is value `i` and no map is kept: most feature columns hold no null, and a map would
/// cost 4 bytes a row of cache, half of what a float64 column's values do.
#[derive(Default)]
struct Slots {
    next: u32,
    map: Option<Vec<u32>>,
}

impl Slots {
    fn present(&mut self, n: usize) {
        let to = self.next + n as u32;
        if let Some(map) = &mut self.map {
            map.extend(self.next..to);
        }
        self.next = to;
    }

    fn null(&mut self, n: usize) {
        let next = self.next;
        self.map
            .get_or_insert_with(|| (0..next).collect())
            .extend(std::iter::repeat_n(NULL_SLOT, n));
    }

    /// Reads `count` definition levels of a flat optional column (bit width 1, Parquet's RLE
    /// / bit-packed hybrid); returns how many of them are present values.
    fn push(&mut self, mut levels: &[u8], count: usize) -> Result<usize> {
        let bad = || Error::corrupt("data file", "definition levels end early");
        let before = self.next;
        let mut left = count;
        while left > 0 {
            let (header, used) = varint(levels).ok_or_else(bad)?;
            levels = &levels[used..];
            if header & 1 == 0 {
                // A run of one level, stored in one byte.
                let run = usize::try_from(header >> 1).map_err(|_| bad())?.min(left);
                let (&level, rest) = levels.split_first().ok_or_else(bad)?;
                levels = rest;
                if level & 1 == 1 {
                    self.present(run);
                } else {
                    self.null(run);
                }
                left -= run;
            } else {
                // Groups of 8 levels, one bit each.
                let groups = usize::try_from(header >> 1).map_err(|_| bad())?;
                let bits = levels.get(..groups).ok_or_else(bad)?;
                levels = &levels[groups..];
                let n = (groups * 8).min(left);
                for i in 0..n {
                    if bits[i / 8] >> (i % 8) & 1 == 1 {
                        self.present(1);
                    } else {
                        self.null(1);
                    }
                }
                left -= n;
            }
        }
        Ok((self.next - before) as usize)
    }
}

fn varint(bytes: &[u8]) -> Option<(u64, usize)> {
    let mut value = 0u64;
    for (i, b) in bytes.iter().enumerate().take(10) {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

/// How many bytes of `page` its `count` PLAIN values take, recording where each byte array
/// starts (`base` + its offset in the page) in `starts`.
fn values_len(
    physical: Physical,
    page: &[u8],
    count: usize,
    base: usize,
    starts: &mut Vec<u32>,
) -> Result<usize> {
    let short = || Error::corrupt("data file", "page holds fewer values than it says");
    let len = match physical {
        Physical::BOOLEAN => count.div_ceil(8),
        Physical::BYTE_ARRAY => {
            let mut at = 0;
            for _ in 0..count {
                let len: [u8; 4] = page
                    .get(at..at + 4)
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(short)?;
                let len = u32::from_le_bytes(len) as usize;
                if at + 4 + len > page.len() {
                    return Err(short());
                }
                starts.push(u32::try_from(base + at + 4).map_err(|_| short())?);
                at += 4 + len;
            }
            at
        }
        Physical::INT64 | Physical::DOUBLE => count * 8,
        _ => count * 4,
    };
    if len > page.len() {
        return Err(short());
    }
    Ok(len)
}

/// A column chunk's values, page after page. The values of a chunk of one page (all of ours:
/// a row group is one page per column) stay where the page is, a slice of the bytes read for
/// an uncompressed page: no copy. A second page copies them out.
enum Values {
    Empty,
    Page(Bytes),
    Owned(Vec<u8>),
}

impl Values {
    fn len(&self) -> usize {
        match self {
            Self::Empty => 0,
            Self::Page(b) => b.len(),
            Self::Owned(v) => v.len(),
        }
    }

    fn push(&mut self, page: Bytes, physical: Physical, count: usize) {
        if physical == Physical::BOOLEAN {
            // One byte per value, so that a value is found by its index.
            let bits = page;
            self.owned()
                .extend((0..count).map(|i| bits[i / 8] >> (i % 8) & 1));
            return;
        }
        match self {
            Self::Empty => *self = Self::Page(page),
            _ => self.owned().extend_from_slice(&page),
        }
    }

    fn owned(&mut self) -> &mut Vec<u8> {
        if !matches!(self, Self::Owned(_)) {
            let held = match self {
                Self::Page(b) => b.to_vec(),
                _ => Vec::new(),
            };
            *self = Self::Owned(held);
        }
        match self {
            Self::Owned(v) => v,
            _ => unreachable!("made owned above"),
        }
    }

    fn into_bytes(self) -> Bytes {
        match self {
            Self::Empty => Bytes::new(),
            Self::Page(b) => b,
            // Values of several pages grew by doubling: the cache weighs a block by what it
            // holds, so it holds no spare capacity.
            Self::Owned(mut v) => {
                v.shrink_to_fit();
                Bytes::from(v)
            }
        }
    }
}

/// Decodes one flat column chunk in place, or None when its pages are not PLAIN (a
/// dictionary, another encoding): Arrow decodes it then.
fn decode_chunk(
    source: &Arc<Fetched>,
    chunk: &ColumnChunkMetaData,
    physical: Physical,
    optional: bool,
    rows: usize,
) -> Result<Option<PlainColumn>> {
    if chunk.dictionary_page_offset().is_some() {
        return Ok(None);
    }
    let mut pages = SerializedPageReader::new_with_properties(
        source.clone(),
        chunk,
        rows,
        None,
        reader_properties(),
    )?;
    let mut values = Values::Empty;
    let mut starts = Vec::with_capacity(if physical == Physical::BYTE_ARRAY {
        rows
    } else {
        0
    });
    let mut slots = Slots::default();
    let mut levels_read = 0usize;
    while let Some(page) = pages.get_next_page()? {
        let (buf, levels, count, encoding) = match &page {
            Page::DataPage {
                buf,
                num_values,
                encoding,
                def_level_encoding,
                ..
            } => {
                let count = *num_values as usize;
                if !optional {
                    (buf.clone(), 0..0, count, *encoding)
                } else {
                    if *def_level_encoding != Encoding::RLE {
                        return Ok(None);
                    }
                    // Levels of a v1 page: their byte length, then the levels.
                    let len = buf
                        .get(..4)
                        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
                        .filter(|len| 4 + len <= buf.len())
                        .ok_or_else(|| Error::corrupt("data file", "bad definition levels"))?;
                    (buf.slice(4 + len..), 4..4 + len, count, *encoding)
                }
            }
            Page::DataPageV2 {
                buf,
                num_values,
                encoding,
                def_levels_byte_len,
                rep_levels_byte_len,
                ..
            } => {
                let from = *rep_levels_byte_len as usize;
                let to = from + *def_levels_byte_len as usize;
                if to > buf.len() {
                    return Err(Error::corrupt("data file", "bad definition levels"));
                }
                (buf.slice(to..), from..to, *num_values as usize, *encoding)
            }
            Page::DictionaryPage { .. } => return Ok(None),
        };
        if encoding != Encoding::PLAIN {
            return Ok(None);
        }
        let present = if optional {
            slots.push(&page.buffer()[levels], count)?
        } else {
            count
        };
        levels_read += count;
        let len = values_len(physical, &buf, present, values.len(), &mut starts)?;
        values.push(buf.slice(..len), physical, present);
    }
    if levels_read != rows {
        return Err(Error::corrupt(
            "data file",
            format!("column chunk holds {levels_read} rows, its row group {rows}"),
        ));
    }
    let borrowed =
        matches!(values, Values::Page(_)) && chunk.compression() == Compression::UNCOMPRESSED;
    Ok(Some(PlainColumn {
        physical,
        values: values.into_bytes(),
        starts,
        slots: slots.map,
        borrowed,
    }))
}

/// Flat column `leaf` of a row group decoded in place as table type `target`, or None when
/// Arrow must decode it.
pub fn decode_column(
    source: &Arc<Fetched>,
    row_group: &RowGroupMetaData,
    leaf: usize,
    target: &DataType,
) -> Result<Option<Cells>> {
    let column = row_group.schema_descr().column(leaf);
    let Some(physical) = plain_physical(target, &column) else {
        return Ok(None);
    };
    let rows = usize::try_from(row_group.num_rows()).unwrap_or(0);
    let optional = column.max_def_level() == 1;
    Ok(decode_chunk(source, row_group.column(leaf), physical, optional, rows)?.map(Cells::Plain))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn definition_levels_number_present_values() {
        // A run of 3 present, then 8 bit-packed levels 0b1010_0101, then a run of 2 nulls.
        let levels = [3 << 1, 1, (1 << 1) | 1, 0b1010_0101, 2 << 1, 0];
        let mut slots = Slots::default();
        assert_eq!(slots.push(&levels, 13).unwrap(), 7);
        let n = NULL_SLOT;
        assert_eq!(
            slots.map.unwrap(),
            vec![0, 1, 2, 3, n, 4, n, n, 5, n, 6, n, n]
        );
        assert!(Slots::default().push(&levels[..2], 5).is_err());
    }

    #[test]
    fn a_column_without_nulls_keeps_no_slot_map() {
        let mut slots = Slots::default();
        // Two pages: a run of 300 present levels, then 8 bit-packed present levels.
        assert_eq!(slots.push(&[0xd8, 0x04, 1], 300).unwrap(), 300);
        assert_eq!(slots.push(&[(1 << 1) | 1, 0xff], 8).unwrap(), 8);
        assert!(slots.map.is_none());
        assert_eq!(slots.next, 308);
    }

    #[test]
    fn plain_byte_arrays_are_found_by_their_starts() {
        let mut page = Vec::new();
        for v in [&b"ab"[..], b"", b"xyz"] {
            page.extend_from_slice(&(v.len() as u32).to_le_bytes());
            page.extend_from_slice(v);
        }
        let (mut values, mut starts) = (Values::Empty, Vec::new());
        for count in [3, 1] {
            let len = values_len(
                Physical::BYTE_ARRAY,
                &page,
                count,
                values.len(),
                &mut starts,
            );
            values.push(
                Bytes::from(page[..len.unwrap()].to_vec()),
                Physical::BYTE_ARRAY,
                count,
            );
        }
        let c = PlainColumn {
            physical: Physical::BYTE_ARRAY,
            values: values.into_bytes(),
            starts,
            slots: None,
            borrowed: false,
        };
        let got: Vec<&[u8]> = (0..4).map(|i| c.bytes(i)).collect();
        assert_eq!(got, vec![&b"ab"[..], b"", b"xyz", b"ab"]);
        assert!(values_len(Physical::BYTE_ARRAY, &page[..5], 2, 0, &mut Vec::new()).is_err());
    }
}
