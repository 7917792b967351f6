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
    /// Stored rows a write may replace, as a fraction of the bucket's live rows (0: never).
    pub max_fraction: f64,
    /// Data files (sorted runs) a bucket may hold.
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
    /// What a merge-on-read write costs is the rows it adds and the stored rows it deletes,
    /// so new keys are always cheap: they become a new sorted run of the bucket, whatever
    /// their number. Copy-on-write is for writes that would replace more than `max_fraction`
    /// of the live rows (cheaper than that many deletes), for an empty bucket, and when the
    /// bucket's deleted rows would pass `max_delete_ratio`: that write compacts the bucket.
    /// When a new run would pass `max_files`, the smallest runs are merged with it
    /// (`runs_to_merge`), which costs those runs' rows, not the bucket's.
    pub fn mode(&self, shape: &BucketShape) -> BucketMode {
        if !self.may_merge_on_read(shape.run_rows.len()) {
            return BucketMode::CopyOnWrite;
        }
        let stored: u64 = shape.run_rows.iter().sum();
        let live = stored.saturating_sub(shape.deleted_rows) as f64;
        let replaced = shape.replaced as f64;
        let deleted_after = shape.deleted_rows as f64 + replaced;
        if replaced > self.max_fraction * live
            || deleted_after > self.max_delete_ratio * (stored + shape.incoming as u64) as f64
        {
            return BucketMode::CopyOnWrite;
        }
        match self.runs_to_merge(shape) {
            n if n >= shape.run_rows.len() && n > 0 => BucketMode::CopyOnWrite,
            merge_runs => BucketMode::MergeOnRead { merge_runs },
        }
    }

    /// Whether a write into a bucket of `runs` data files can be merge-on-read at all: when
    /// not, `mode` needs no look at the write's keys.
    pub fn may_merge_on_read(&self, runs: usize) -> bool {
        self.max_fraction > 0.0 && runs > 0
    }

    /// How many of the bucket's smallest runs a write merges with its own (size-tiered, as
    /// RocksDB's universal compaction): none while the bucket holds fewer than `max_files`
    /// runs; then, smallest first, each run at most as large as the runs taken so far, and
    /// at least enough to stay within `max_files`. A row is so rewritten about log2 of
    /// (bucket rows / write rows) times over the bucket's life, against the bucket's size per
    /// merge were every run folded into the largest.
    fn runs_to_merge(&self, shape: &BucketShape) -> usize {
        let runs = shape.run_rows.len();
        if runs < self.max_files {
            return 0;
        }
        let mut sizes = shape.run_rows.clone();
        sizes.sort_unstable();
        let mut taken = shape.incoming as u64;
        let mut n = 0;
        while n < runs && (sizes[n] <= taken || runs - n + 1 > self.max_files) {
            taken += sizes[n];
            n += 1;
        }
        n
    }
}

/// What the policy looks at of a bucket and a write.
#[derive(Debug, Clone, Default)]
pub struct BucketShape {
    pub incoming: usize,
    /// At most this many incoming keys have a stored row (bloom filters' estimate).
    pub replaced: usize,
    /// Rows of each data file (sorted run) of the bucket.
    pub run_rows: Vec<u64>,
    /// Rows its position deletes hide.
    pub deleted_rows: u64,
}

/// How a write goes into a bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BucketMode {
    /// Rewrite the bucket as one file, deletes applied and dropped.
    CopyOnWrite,
    /// Add a data file and a position-delete file; with `merge_runs` > 0, the incoming rows
    /// and the live rows of the bucket's `merge_runs` smallest files become one new file,
    /// and one delete file carries all deletes of the files kept.
    MergeOnRead { merge_runs: usize },
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
            stats.ignored.push(row);
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
    data_dir: &str,
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
    let path = format!("{data_dir}/{partition_dir}{name_prefix}-deletes.parquet");
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
                ignored: vec![2]
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
        assert_eq!(plan.stats.ignored.len(), 1);
    }

    #[test]
    fn policy_adds_runs_for_new_keys_and_compacts_past_limits() {
        let p = MorPolicy {
            max_fraction: 0.1,
            max_files: 4,
            max_delete_ratio: 0.2,
        };
        let shape = |incoming, replaced, deleted_rows, run_rows: &[u64]| BucketShape {
            incoming,
            replaced,
            run_rows: run_rows.to_vec(),
            deleted_rows,
        };
        let add = BucketMode::MergeOnRead { merge_runs: 0 };
        let cow = BucketMode::CopyOnWrite;
        assert_eq!(p.mode(&shape(10, 10, 0, &[10_000])), add);
        assert_eq!(
            p.mode(&shape(20_000, 0, 0, &[10_000])),
            add,
            "new keys, however many: a new run"
        );
        assert_eq!(
            p.mode(&shape(2_000, 1_500, 0, &[10_000])),
            cow,
            "replaces more than 10% of the live rows: rewrite"
        );
        assert_eq!(
            p.mode(&shape(10, 0, 0, &[])),
            cow,
            "empty bucket: plain write"
        );
        assert_eq!(
            p.mode(&shape(10, 10, 2_000, &[10_000, 30])),
            cow,
            "delete ratio would pass 20%: compact"
        );
        assert_eq!(
            p.mode(&shape(10, 0, 0, &[10_000, 40, 30, 2_000])),
            BucketMode::MergeOnRead { merge_runs: 2 },
            "file limit: the smallest runs, each no larger than those taken (10+30 >= 40)"
        );
        assert_eq!(
            p.mode(&shape(10, 0, 0, &[10_000, 5_000, 3_000, 2_000])),
            BucketMode::MergeOnRead { merge_runs: 1 },
            "at least enough to stay within the limit"
        );
        assert_eq!(
            p.mode(&shape(5_000, 0, 0, &[1_000, 2_000, 3_000, 4_000])),
            cow,
            "every run merged: a rewrite"
        );
        let off = MorPolicy {
            max_fraction: 0.0,
            ..p
        };
        assert_eq!(off.mode(&shape(1, 0, 0, &[10])), cow);
    }

    #[test]
    fn size_tiered_runs_rewrite_a_row_a_few_times() {
        // 100 writes of new keys into one bucket (a 10M-row load in 100k-row commits over 16
        // buckets): a row is rewritten ~1.6 times, and the bucket never holds more than 8 runs.
        let p = MorPolicy {
            max_fraction: 0.1,
            max_files: 8,
            max_delete_ratio: 0.2,
        };
        let (mut runs, mut rewritten) = (vec![6_250u64], 0u64);
        for _ in 1..100 {
            let shape = BucketShape {
                incoming: 6_250,
                replaced: 0,
                run_rows: runs.clone(),
                deleted_rows: 0,
            };
            // Copy-on-write here is every run merged: the same rewrite.
            let merge_runs = match p.mode(&shape) {
                BucketMode::MergeOnRead { merge_runs } => merge_runs,
                BucketMode::CopyOnWrite => runs.len(),
            };
            runs.sort_unstable();
            let merged: u64 = runs.drain(..merge_runs).sum();
            rewritten += merged;
            runs.push(merged + 6_250);
            assert!(runs.len() <= 8, "{runs:?}");
        }
        let amplification = rewritten as f64 / (100.0 * 6_250.0);
        assert!(amplification < 2.0, "{amplification}");
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
