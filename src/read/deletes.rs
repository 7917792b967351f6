//! Position deletes: which rows of which data files a merge-on-read write replaced.
//!
//! A position-delete file (Iceberg v2) lists `(file_path, pos)` pairs. Like data files they
//! never change, so they are decoded once and cached by path. A lookup or a bucket rewrite
//! gathers the delete files of its bucket into a `BucketDeletes` and asks it whether a row is
//! still live.

use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::Int64Type;
use arrow_array::{Array, BooleanArray, RecordBatch};
use iceberg::io::FileIO;

use crate::FastMap;
use crate::error::{Error, Result};
use crate::storage::IoCounter;
use crate::table::LiveFile;

/// Column names and field ids the Iceberg spec reserves for position-delete files.
pub const DELETE_FILE_PATH: &str = "file_path";
pub const DELETE_POS: &str = "pos";
pub const DELETE_FILE_PATH_ID: i32 = 2_147_483_546;
pub const DELETE_POS_ID: i32 = 2_147_483_545;

/// The decoded content of one position-delete file: sorted positions per data file path.
#[derive(Debug, Default)]
pub struct PositionDeletes {
    by_file: FastMap<String, Vec<u64>>,
}

impl PositionDeletes {
    pub fn from_pairs(pairs: impl IntoIterator<Item = (String, u64)>) -> Self {
        let mut by_file: FastMap<String, Vec<u64>> = FastMap::default();
        for (path, pos) in pairs {
            by_file.entry(path).or_default().push(pos);
        }
        for positions in by_file.values_mut() {
            positions.sort_unstable();
        }
        Self { by_file }
    }

    pub fn contains(&self, path: &str, pos: u64) -> bool {
        self.by_file
            .get(path)
            .is_some_and(|p| p.binary_search(&pos).is_ok())
    }

    /// How many positions it deletes.
    pub fn len(&self) -> usize {
        self.by_file.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Reads and decodes a whole position-delete file.
pub async fn load_deletes(file_io: &FileIO, path: &str, io: &IoCounter) -> Result<PositionDeletes> {
    let mut pairs = Vec::new();
    for batch in super::files::read_whole_parquet(file_io, path, io).await? {
        let (Some(paths), Some(pos)) = (
            batch.column_by_name(DELETE_FILE_PATH),
            batch.column_by_name(DELETE_POS),
        ) else {
            return Err(Error::corrupt(
                path,
                "position-delete file lacks file_path/pos",
            ));
        };
        let paths = arrow_cast::cast(paths, &arrow_schema::DataType::Utf8)?;
        let paths = paths.as_string::<i32>();
        let pos = arrow_cast::cast(pos, &arrow_schema::DataType::Int64)?;
        let pos = pos.as_primitive::<Int64Type>();
        for i in 0..batch.num_rows() {
            if paths.is_null(i) || pos.is_null(i) {
                continue;
            }
            let p = u64::try_from(pos.value(i))
                .map_err(|_| Error::corrupt(path, "negative position in a delete file"))?;
            pairs.push((paths.value(i).to_string(), p));
        }
    }
    Ok(PositionDeletes::from_pairs(pairs))
}

/// The position deletes that apply to one bucket, with their sequence numbers.
#[derive(Debug, Default, Clone)]
pub struct BucketDeletes {
    files: Vec<(i64, Arc<PositionDeletes>)>,
}

impl BucketDeletes {
    pub fn new(files: Vec<(i64, Arc<PositionDeletes>)>) -> Self {
        Self { files }
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Whether row `pos` of `file` is deleted. Per the spec a position delete applies only to
    /// data files whose data sequence number is not above the delete file's.
    pub fn is_deleted(&self, file: &LiveFile, pos: u64) -> bool {
        self.deleted_at(file.path(), file.sequence_number(), pos)
    }

    /// `is_deleted` for a data file given by path and data sequence number.
    pub fn deleted_at(&self, path: &str, seq: i64, pos: u64) -> bool {
        self.files
            .iter()
            .any(|(del_seq, d)| *del_seq >= seq && d.contains(path, pos))
    }

    /// The positions of `file` the bucket's delete files delete, sorted, without repeats.
    pub fn deleted_positions(&self, file: &LiveFile) -> Vec<u64> {
        let seq = file.sequence_number();
        let mut out: Vec<u64> = self
            .files
            .iter()
            .filter(|(del_seq, _)| *del_seq >= seq)
            .filter_map(|(_, d)| d.by_file.get(file.path()))
            .flatten()
            .copied()
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// The rows of `file` (its first `rows` positions) that are still live, as a filter mask;
    /// None when none is deleted.
    pub fn live_mask(&self, file: &LiveFile, rows: usize) -> Option<BooleanArray> {
        let deleted = self.deleted_positions(file);
        if deleted.is_empty() {
            return None;
        }
        let mut live = vec![true; rows];
        for p in deleted {
            if let Some(slot) = usize::try_from(p).ok().and_then(|p| live.get_mut(p)) {
                *slot = false;
            }
        }
        Some(BooleanArray::from(live))
    }

    /// `batch` (all rows of `file`, in file order) without its deleted rows.
    pub fn apply(&self, file: &LiveFile, batch: &RecordBatch) -> Result<RecordBatch> {
        match self.live_mask(file, batch.num_rows()) {
            Some(mask) => Ok(arrow_select::filter::filter_record_batch(batch, &mask)?),
            None => Ok(batch.clone()),
        }
    }

    /// Deleted positions of the bucket's files, for the delete-ratio rule.
    pub fn deleted_rows(&self) -> u64 {
        self.files.iter().map(|(_, d)| d.len() as u64).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deletes_apply_only_to_files_not_newer_than_them() {
        let d = Arc::new(PositionDeletes::from_pairs([("a".to_string(), 1)]));
        let b = BucketDeletes::new(vec![(5, d)]);
        assert!(b.deleted_at("a", 5, 1) && b.deleted_at("a", 3, 1));
        assert!(
            !b.deleted_at("a", 6, 1),
            "a file added after the delete is untouched"
        );
        assert!(!b.deleted_at("a", 5, 0));
        assert_eq!(b.deleted_rows(), 1);
    }

    #[test]
    fn positions_are_found_per_file() {
        let d = PositionDeletes::from_pairs([
            ("a".to_string(), 7),
            ("a".to_string(), 2),
            ("b".to_string(), 2),
        ]);
        assert!(d.contains("a", 2) && d.contains("a", 7) && d.contains("b", 2));
        assert!(!d.contains("a", 3) && !d.contains("c", 2));
        assert_eq!(d.len(), 3);
    }
}
