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
use parquet::basic::{ConvertedType, Encoding, LogicalType, TimeUnit, Type as Physical};
use parquet::column::page::{Page, PageReader};
use parquet::file::metadata::{ColumnChunkMetaData, RowGroupMetaData};
use parquet::file::properties::{ReaderProperties, ReaderPropertiesPtr};
use parquet::file::serialized_reader::SerializedPageReader;
use parquet::schema::types::ColumnDescriptor;

use super::files::Fetched;
use crate::convert::{ScalarRef, cell_to_value, scalar_value};
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
    /// The serialized Feast `Value` of `row` (empty for null).
    pub fn value(&self, kind: ColumnKind, row: usize) -> Vec<u8> {
        match self {
            Self::Plain(c) => c.value(kind, row),
            Self::Arrow(a) => cell_to_value(kind, a.as_ref(), row),
            Self::Missing => Vec::new(),
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
    /// every row has a value (required columns).
    slots: Option<Vec<u32>>,
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

    fn value(&self, kind: ColumnKind, row: usize) -> Vec<u8> {
        let Some(i) = self.slot(row) else {
            return Vec::new();
        };
        match kind {
            ColumnKind::Proto => self.bytes(i).to_vec(),
            ColumnKind::Scalar(s) => scalar_value(s, self.scalar(i)),
            // Lists are nested columns: never plain.
            ColumnKind::List(_) | ColumnKind::Set(_) => Vec::new(),
        }
    }

    fn memory(&self) -> usize {
        self.values.len()
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

/// Reads the definition levels of a flat optional column (bit width 1, Parquet's RLE /
/// bit-packed hybrid) into `slots`, numbering the present values from `*next`.
fn push_slots(mut levels: &[u8], count: usize, slots: &mut Vec<u32>, next: &mut u32) -> Result<()> {
    let bad = || Error::corrupt("data file", "definition levels end early");
    let end = slots.len() + count;
    while slots.len() < end {
        let (header, used) = varint(levels).ok_or_else(bad)?;
        levels = &levels[used..];
        if header & 1 == 0 {
            // A run of one level, stored in one byte.
            let run = usize::try_from(header >> 1).map_err(|_| bad())?;
            let (&level, rest) = levels.split_first().ok_or_else(bad)?;
            levels = rest;
            for _ in 0..run.min(end - slots.len()) {
                if level & 1 == 1 {
                    slots.push(*next);
                    *next += 1;
                } else {
                    slots.push(NULL_SLOT);
                }
            }
        } else {
            // Groups of 8 levels, one bit each.
            let groups = usize::try_from(header >> 1).map_err(|_| bad())?;
            let bits = levels.get(..groups).ok_or_else(bad)?;
            levels = &levels[groups..];
            for i in 0..(groups * 8).min(end - slots.len()) {
                if bits[i / 8] >> (i % 8) & 1 == 1 {
                    slots.push(*next);
                    *next += 1;
                } else {
                    slots.push(NULL_SLOT);
                }
            }
        }
    }
    Ok(())
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

/// Appends one page's PLAIN values (`count` of them) to `values`, recording where each
/// byte array starts.
fn push_values(
    physical: Physical,
    page: &[u8],
    count: usize,
    values: &mut Vec<u8>,
    starts: &mut Vec<u32>,
) -> Result<()> {
    let short = || Error::corrupt("data file", "page holds fewer values than it says");
    match physical {
        Physical::BOOLEAN => {
            let bits = page.get(..count.div_ceil(8)).ok_or_else(short)?;
            values.extend((0..count).map(|i| bits[i / 8] >> (i % 8) & 1));
        }
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
                let start = values.len() + at + 4;
                starts.push(u32::try_from(start).map_err(|_| short())?);
                at += 4 + len;
            }
            values.extend_from_slice(&page[..at]);
        }
        _ => {
            let width = if matches!(physical, Physical::INT64 | Physical::DOUBLE) {
                8
            } else {
                4
            };
            values.extend_from_slice(page.get(..count * width).ok_or_else(short)?);
        }
    }
    Ok(())
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
    // Sized once, so that the cache's weight of a block is what it holds (a doubling Vec
    // could hold twice its length). The chunk's uncompressed size bounds its values.
    let capacity = usize::try_from(chunk.uncompressed_size()).unwrap_or(0);
    let mut values = Vec::with_capacity(if physical == Physical::BOOLEAN {
        rows
    } else {
        capacity
    });
    let mut starts = Vec::with_capacity(if physical == Physical::BYTE_ARRAY {
        rows
    } else {
        0
    });
    let mut slots = optional.then(|| Vec::with_capacity(rows));
    let (mut levels_read, mut next) = (0usize, 0u32);
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
                    (&buf[..], &[][..], count, *encoding)
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
                    (&buf[4 + len..], &buf[4..4 + len], count, *encoding)
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
                (&buf[to..], &buf[from..to], *num_values as usize, *encoding)
            }
            Page::DictionaryPage { .. } => return Ok(None),
        };
        if encoding != Encoding::PLAIN {
            return Ok(None);
        }
        let present = match &mut slots {
            Some(slots) => {
                let before = next;
                push_slots(levels, count, slots, &mut next)?;
                (next - before) as usize
            }
            None => count,
        };
        levels_read += count;
        push_values(physical, buf, present, &mut values, &mut starts)?;
    }
    if levels_read != rows {
        return Err(Error::corrupt(
            "data file",
            format!("column chunk holds {levels_read} rows, its row group {rows}"),
        ));
    }
    Ok(Some(PlainColumn {
        physical,
        values: Bytes::from(values),
        starts,
        slots,
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
        let mut slots = Vec::new();
        let mut next = 0;
        push_slots(&levels, 13, &mut slots, &mut next).unwrap();
        let n = NULL_SLOT;
        assert_eq!(slots, vec![0, 1, 2, 3, n, 4, n, n, 5, n, 6, n, n]);
        assert_eq!(next, 7);
        assert!(push_slots(&levels[..2], 5, &mut Vec::new(), &mut 0).is_err());
    }

    #[test]
    fn plain_byte_arrays_are_found_by_their_starts() {
        let mut page = Vec::new();
        for v in [&b"ab"[..], b"", b"xyz"] {
            page.extend_from_slice(&(v.len() as u32).to_le_bytes());
            page.extend_from_slice(v);
        }
        let (mut values, mut starts) = (Vec::new(), Vec::new());
        push_values(Physical::BYTE_ARRAY, &page, 3, &mut values, &mut starts).unwrap();
        push_values(Physical::BYTE_ARRAY, &page, 1, &mut values, &mut starts).unwrap();
        let c = PlainColumn {
            physical: Physical::BYTE_ARRAY,
            values: Bytes::from(values),
            starts,
            slots: None,
        };
        let got: Vec<&[u8]> = (0..4).map(|i| c.bytes(i)).collect();
        assert_eq!(got, vec![&b"ab"[..], b"", b"xyz", b"ab"]);
        assert!(
            push_values(
                Physical::BYTE_ARRAY,
                &page[..5],
                2,
                &mut Vec::new(),
                &mut Vec::new()
            )
            .is_err()
        );
    }
}
