//! Merge-on-read writes: a small push adds its rows to a bucket as a new data file plus an
//! Iceberg v2 position-delete file naming the rows they replace, instead of rewriting the
//! bucket. Never equality deletes: PyIceberg cannot read them.
//!
//! Which writes take this path, and when a bucket is compacted back to one file, is
//! `MorPolicy`'s rule. The planning here is pure; `write_position_deletes` does the I/O.

use std::collections::HashMap;
use std::sync::Arc;

use arrow_array::{ArrayRef, Int64Array, RecordBatch, StringArray, UInt32Array};
use arrow_schema::{DataType, Field, Schema};
use bytes::Bytes;
use iceberg::io::FileIO;
use iceberg::spec::{
    DataContentType, DataFile, DataFileBuilder, DataFileFormat, Datum, Literal, Struct,
};
use parquet::arrow::ArrowWriter;
use parquet::arrow::PARQUET_FIELD_ID_META_KEY;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use super::plan::MergeStats;
use crate::config::StoreConfig;
use crate::error::{Error, Result};
use crate::read::{
    DELETE_FILE_PATH, DELETE_FILE_PATH_ID, DELETE_POS, DELETE_POS_ID, Version, keys_of, row_version,
};
use crate::schema::Layout;
use crate::table::TableState;

/// When a write to a bucket is merge-on-read, and when it compacts the bucket instead.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MorPolicy {
    /// Incoming rows at most this fraction of the bucket's live rows (0: never).
    pub max_fraction: f64,
    /// Data files a bucket may hold before a merge-on-read write merges its small files.
    pub max_files: usize,
    /// Deleted rows over stored rows a bucket may reach after a merge-on-read write.
    pub max_delete_ratio: f64,
}

impl MorPolicy {
    pub fn from_config(c: &StoreConfig) -> Self {
        Self {
            max_fraction: c.merge_on_read_max_fraction,
            max_files: c.merge_on_read_max_files,
            max_delete_ratio: c.merge_on_read_max_delete_ratio,
        }
    }

    /// How `shape.incoming` rows go into a bucket.
    ///
    /// Copy-on-write for a large write (cheaper than many deletes), for an empty bucket, and
    /// when the bucket's deleted rows would pass `max_delete_ratio` or its small files would
    /// hold more than a quarter of its rows: the write that crosses a limit compacts the
    /// bucket. When only the file count would pass `max_files`, the small files are merged
    /// into one instead, leaving the large file and its deletes; that costs the small files'
    /// rows, not the bucket's. Either way storage stays bounded however many pushes come.
    pub fn mode(&self, shape: &BucketShape) -> BucketMode {
        if self.max_fraction <= 0.0 || shape.data_files == 0 {
            return BucketMode::CopyOnWrite;
        }
        let stored = shape.stored_rows as f64;
        let live = shape.stored_rows.saturating_sub(shape.deleted_rows) as f64;
        let incoming = shape.incoming as f64;
        // At worst every incoming row replaces a stored one.
        let deleted_after = shape.deleted_rows as f64 + incoming;
        let small_after =
            shape.stored_rows.saturating_sub(shape.largest_file_rows) as f64 + incoming;
        if incoming > self.max_fraction * live
            || deleted_after > self.max_delete_ratio * (stored + incoming)
            || small_after * 4.0 > stored + incoming
        {
            return BucketMode::CopyOnWrite;
        }
        BucketMode::MergeOnRead {
            merge_small_files: shape.data_files >= self.max_files,
        }
    }
}

/// What the policy looks at of a bucket and a write.
#[derive(Debug, Clone, Copy, Default)]
pub struct BucketShape {
    pub incoming: usize,
    /// Rows of the bucket's data files, and of its largest one.
    pub stored_rows: u64,
    pub largest_file_rows: u64,
    /// Rows its position deletes hide.
    pub deleted_rows: u64,
    pub data_files: usize,
}

/// How a write goes into a bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BucketMode {
    /// Rewrite the bucket as one file, deletes applied and dropped.
    CopyOnWrite,
    /// Add a data file and a position-delete file; with `merge_small_files`, the incoming rows
    /// and the live rows of every file but the largest become one new file, and one delete
    /// file carries all of the largest file's deletes.
    MergeOnRead { merge_small_files: bool },
}

/// A live stored row of a key: its version and where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRow {
    pub version: Version,
    pub path: String,
    pub pos: u64,
}

/// What a merge-on-read write adds to a bucket.
#[derive(Debug)]
pub struct MorPlan {
    /// The incoming rows that win, sorted by entity key; None when none wins.
    pub rows: Option<RecordBatch>,
    /// `(file_path, pos)` of the stored rows they replace, sorted.
    pub deletes: Vec<(String, u64)>,
    pub stats: MergeStats,
}

/// Plans a merge-on-read write of `incoming[rows]` (one winner per key, see
/// `winners_by_bucket`). `stored` gives a key's live rows in the bucket. Same rule as the
/// copy-on-write merge: newest version wins, an incoming row wins a full tie, an older
/// incoming row replaces nothing.
pub fn plan_merge_on_read(
    incoming: &RecordBatch,
    rows: &[usize],
    layout: &Layout,
    mut stored: impl FnMut(&[u8]) -> Vec<StoredRow>,
) -> Result<MorPlan> {
    let keys = keys_of(incoming, layout)?;
    let mut winners: Vec<(&[u8], usize)> = Vec::with_capacity(rows.len());
    let mut deletes = Vec::new();
    let mut stats = MergeStats::default();
    for &row in rows {
        let key = keys.value(row);
        let v = row_version(incoming, row, layout);
        let found = stored(key);
        if found.iter().any(|s| s.version > v) {
            stats.ignored_older += 1;
            continue;
        }
        stats.written += 1;
        winners.push((key, row));
        deletes.extend(found.into_iter().map(|s| (s.path, s.pos)));
    }
    deletes.sort_unstable();
    deletes.dedup();
    if winners.is_empty() {
        return Ok(MorPlan {
            rows: None,
            deletes,
            stats,
        });
    }
    winners.sort_unstable_by(|a, b| a.0.cmp(b.0));
    let indices = UInt32Array::from_iter_values(
        winners
            .iter()
            .map(|(_, r)| u32::try_from(*r).unwrap_or(u32::MAX)),
    );
    let columns: Vec<ArrayRef> = incoming
        .columns()
        .iter()
        .map(|c| arrow_select::take::take(c.as_ref(), &indices, None))
        .collect::<std::result::Result<_, _>>()?;
    Ok(MorPlan {
        rows: Some(RecordBatch::try_new(incoming.schema(), columns)?),
        deletes,
        stats,
    })
}

fn field_with_id(name: &str, data_type: DataType, id: i32) -> Field {
    Field::new(name, data_type, false).with_metadata(HashMap::from([(
        PARQUET_FIELD_ID_META_KEY.to_string(),
        id.to_string(),
    )]))
}

/// The Parquet bytes of a position-delete file for `deletes` (sorted by path, then position,
/// as the spec requires).
fn position_delete_parquet(deletes: &[(String, u64)]) -> Result<Bytes> {
    let schema = Arc::new(Schema::new(vec![
        field_with_id(DELETE_FILE_PATH, DataType::Utf8, DELETE_FILE_PATH_ID),
        field_with_id(DELETE_POS, DataType::Int64, DELETE_POS_ID),
    ]));
    let paths = StringArray::from_iter_values(deletes.iter().map(|(p, _)| p.as_str()));
    let pos = deletes
        .iter()
        .map(|(_, p)| i64::try_from(*p).map_err(|_| Error::internal("position beyond i64")))
        .collect::<Result<Vec<i64>>>()?;
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![Arc::new(paths), Arc::new(Int64Array::from(pos))],
    )?;
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .build();
    let mut buf = Vec::new();
    let mut writer = ArrowWriter::try_new(&mut buf, schema, Some(props))?;
    writer.write(&batch)?;
    writer.close()?;
    Ok(Bytes::from(buf))
}

/// Writes the position-delete file of one bucket and describes it for the delete manifest.
/// `deletes` must be sorted and non-empty.
pub async fn write_position_deletes(
    file_io: &FileIO,
    state: &TableState,
    bucket: i32,
    name_prefix: &str,
    deletes: &[(String, u64)],
) -> Result<DataFile> {
    let (Some(first), Some(last)) = (deletes.first(), deletes.last()) else {
        return Err(Error::internal("empty position-delete file"));
    };
    let md = &state.metadata;
    let spec = md.default_partition_spec();
    let partition_dir = spec
        .fields()
        .first()
        .map_or_else(String::new, |f| format!("{}={bucket}/", f.name));
    let path = format!(
        "{}/data/{partition_dir}{name_prefix}-deletes.parquet",
        md.location()
    );
    let bytes = position_delete_parquet(deletes)?;
    let size = bytes.len() as u64;
    file_io.new_output(&path)?.write(bytes).await?;
    DataFileBuilder::default()
        .content(DataContentType::PositionDeletes)
        .file_path(path)
        .file_format(DataFileFormat::Parquet)
        .partition(Struct::from_iter([Some(Literal::int(bucket))]))
        .partition_spec_id(spec.spec_id())
        .record_count(deletes.len() as u64)
        .file_size_in_bytes(size)
        // Bounds on file_path let readers skip this file for data files it does not name.
        .lower_bounds(HashMap::from([(
            DELETE_FILE_PATH_ID,
            Datum::string(first.0.clone()),
        )]))
        .upper_bounds(HashMap::from([(
            DELETE_FILE_PATH_ID,
            Datum::string(last.0.clone()),
        )]))
        .build()
        .map_err(|e| Error::internal(format!("position-delete file entry: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    use arrow_array::{LargeBinaryArray, TimestampMicrosecondArray, new_null_array};
    use iceberg::spec::{FormatVersion, SortOrder, TableMetadataBuilder, UnboundPartitionSpec};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    use crate::schema::{ColumnSpec, PROP_BUCKETS, new_table_schema, type_properties};

    fn layout() -> Layout {
        let join = [ColumnSpec {
            name: "id".into(),
            value_type: 4,
        }];
        let features = [ColumnSpec {
            name: "rate".into(),
            value_type: 6,
        }];
        let schema = new_table_schema(&join, &features).unwrap();
        let declared: BTreeMap<String, i32> = [("id".to_string(), 4), ("rate".to_string(), 6)]
            .into_iter()
            .collect();
        let mut props = type_properties(&join, &declared).unwrap();
        props.insert(PROP_BUCKETS.into(), "4".into());
        let md = TableMetadataBuilder::new(
            schema,
            UnboundPartitionSpec::builder().build(),
            SortOrder::unsorted_order(),
            "memory://t".into(),
            FormatVersion::V2,
            props,
        )
        .unwrap()
        .build()
        .unwrap()
        .metadata;
        Layout::from_metadata(&md).unwrap()
    }

    /// Rows `(key, event_ts)`; other columns null.
    fn batch(layout: &Layout, rows: &[(&[u8], i64)]) -> RecordBatch {
        let n = rows.len();
        let columns = layout
            .arrow
            .fields()
            .iter()
            .enumerate()
            .map(|(i, f)| -> ArrayRef {
                if i == layout.entity_key {
                    Arc::new(LargeBinaryArray::from_iter_values(rows.iter().map(|r| r.0)))
                } else if i == layout.event_ts {
                    Arc::new(
                        TimestampMicrosecondArray::from_iter_values(rows.iter().map(|r| r.1))
                            .with_timezone("+00:00"),
                    )
                } else {
                    new_null_array(f.data_type(), n)
                }
            })
            .collect();
        RecordBatch::try_new(layout.arrow.clone(), columns).unwrap()
    }

    fn stored(version: i64, path: &str, pos: u64) -> StoredRow {
        StoredRow {
            version: (version, None),
            path: path.into(),
            pos,
        }
    }

    #[test]
    fn newer_rows_replace_older_ones_and_older_rows_replace_nothing() {
        let layout = layout();
        let incoming = batch(&layout, &[(b"c", 10), (b"a", 10), (b"b", 10), (b"n", 1)]);
        let plan = plan_merge_on_read(&incoming, &[0, 1, 2, 3], &layout, |k| match k {
            b"a" => vec![stored(5, "f1", 7)],
            b"b" => vec![stored(11, "f1", 2)], // stored row is newer: stays
            b"c" => vec![stored(10, "f2", 0)], // tie: the later write wins
            _ => vec![],                       // new key: added, nothing deleted
        })
        .unwrap();
        assert_eq!(
            plan.stats,
            MergeStats {
                written: 3,
                ignored_older: 1
            }
        );
        assert_eq!(
            plan.deletes,
            vec![("f1".to_string(), 7), ("f2".to_string(), 0)]
        );
        let rows = plan.rows.unwrap();
        let keys = keys_of(&rows, &layout).unwrap();
        let keys: Vec<&[u8]> = keys.iter().map(Option::unwrap).collect();
        assert_eq!(keys, vec![b"a" as &[u8], b"c", b"n"], "sorted by key");
    }

    #[test]
    fn nothing_written_when_every_row_is_older() {
        let layout = layout();
        let incoming = batch(&layout, &[(b"a", 1)]);
        let plan =
            plan_merge_on_read(&incoming, &[0], &layout, |_| vec![stored(2, "f", 0)]).unwrap();
        assert!(plan.rows.is_none() && plan.deletes.is_empty());
        assert_eq!(plan.stats.ignored_older, 1);
    }

    #[test]
    fn policy_prefers_merge_on_read_for_small_writes_and_compacts_past_limits() {
        let p = MorPolicy {
            max_fraction: 0.1,
            max_files: 4,
            max_delete_ratio: 0.2,
        };
        let shape = |incoming, deleted_rows, data_files, small_rows: u64| BucketShape {
            incoming,
            stored_rows: 10_000,
            largest_file_rows: 10_000 - small_rows,
            deleted_rows,
            data_files,
        };
        let mor = BucketMode::MergeOnRead {
            merge_small_files: false,
        };
        let cow = BucketMode::CopyOnWrite;
        assert_eq!(p.mode(&shape(10, 0, 1, 0)), mor);
        assert_eq!(p.mode(&shape(2_000, 0, 1, 0)), cow, "large write: rewrite");
        assert_eq!(
            p.mode(&shape(10, 0, 0, 0)),
            cow,
            "empty bucket: plain write"
        );
        assert_eq!(
            p.mode(&shape(10, 0, 4, 30)),
            BucketMode::MergeOnRead {
                merge_small_files: true
            },
            "file limit reached: merge the small files"
        );
        assert_eq!(
            p.mode(&shape(10, 1_995, 2, 30)),
            cow,
            "delete ratio would pass 20%: compact"
        );
        assert_eq!(
            p.mode(&shape(10, 0, 3, 2_600)),
            cow,
            "small files would pass a quarter of the rows: compact"
        );
        let off = MorPolicy {
            max_fraction: 0.0,
            ..p
        };
        assert_eq!(off.mode(&shape(1, 0, 1, 0)), cow);
    }

    #[test]
    fn delete_file_has_spec_field_ids_and_sorted_rows() {
        let bytes = position_delete_parquet(&[("a".into(), 1), ("b".into(), 0)]).unwrap();
        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes).unwrap();
        let fields = reader.parquet_schema().root_schema().get_fields().to_vec();
        let ids: Vec<i32> = fields.iter().map(|f| f.get_basic_info().id()).collect();
        assert_eq!(ids, vec![DELETE_FILE_PATH_ID, DELETE_POS_ID]);
        let rows: usize = reader.build().unwrap().map(|b| b.unwrap().num_rows()).sum();
        assert_eq!(rows, 2);
    }
}
