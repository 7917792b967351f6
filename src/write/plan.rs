//! Planning an upsert: in-batch dedup, grouping by bucket, and the copy-on-write merge of a
//! bucket's live rows with the incoming ones. Pure functions over Arrow data: no I/O.

use std::collections::BTreeMap;

use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_select::interleave::interleave;

use crate::FastMap;
use crate::error::Result;
use crate::read::{Version, buckets, keys_of, row_version};
use crate::schema::Layout;

/// The winning row index per distinct key in `batch` (newest version; later rows win ties),
/// grouped by bucket, each group sorted by row index.
pub fn winners_by_bucket(
    batch: &RecordBatch,
    layout: &Layout,
) -> Result<BTreeMap<i32, Vec<usize>>> {
    let keys = keys_of(batch, layout)?;
    let mut best: FastMap<&[u8], (Version, usize)> =
        FastMap::with_capacity_and_hasher(keys.len(), Default::default());
    for row in 0..keys.len() {
        let v = row_version(batch, row, layout);
        best.entry(keys.value(row))
            .and_modify(|cur| {
                if v >= cur.0 {
                    *cur = (v, row);
                }
            })
            .or_insert((v, row));
    }
    let bucket_of = buckets(&keys, layout.buckets)?;
    let mut out: BTreeMap<i32, Vec<usize>> = BTreeMap::new();
    for (_, (_, row)) in best {
        out.entry(bucket_of[row]).or_default().push(row);
    }
    for rows in out.values_mut() {
        rows.sort_unstable();
    }
    Ok(out)
}

/// What merging one bucket did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MergeStats {
    /// Incoming rows that replaced or added a key.
    pub written: usize,
    /// Incoming rows (indices) older than the stored row for their key (the stored row
    /// stays). A group commit tells each caller which of its rows these were.
    pub ignored: Vec<usize>,
}

/// Merges `incoming[rows]` into the bucket's `existing` rows: per key the newest version wins
/// (an incoming row wins a full tie: it is the later write). Returns the merged rows sorted by
/// entity key, or None when no incoming row wins and `force` is off (nothing to rewrite).
/// `force` (compaction) returns the existing rows deduplicated and sorted all the same.
pub fn merge_bucket(
    existing: Option<&RecordBatch>,
    incoming: &RecordBatch,
    rows: &[usize],
    layout: &Layout,
    force: bool,
) -> Result<(Option<RecordBatch>, MergeStats)> {
    const EXISTING: usize = 0;
    const INCOMING: usize = 1;
    let in_keys = keys_of(incoming, layout)?;
    let ex_keys = existing.map(|b| keys_of(b, layout)).transpose()?;

    let mut winners: FastMap<&[u8], (usize, usize, Version)> = FastMap::default();
    if let (Some(batch), Some(keys)) = (existing, ex_keys.as_ref()) {
        for row in 0..batch.num_rows() {
            let v = row_version(batch, row, layout);
            winners
                .entry(keys.value(row))
                .and_modify(|w| {
                    if v >= w.2 {
                        *w = (EXISTING, row, v);
                    }
                })
                .or_insert((EXISTING, row, v));
        }
    }
    let mut stats = MergeStats::default();
    for &row in rows {
        let v = row_version(incoming, row, layout);
        let key = in_keys.value(row);
        match winners.get(key) {
            Some(&(_, _, stored)) if stored > v => stats.ignored.push(row),
            _ => {
                winners.insert(key, (INCOMING, row, v));
                stats.written += 1;
            }
        }
    }
    if stats.written == 0 && !force {
        return Ok((None, stats));
    }
    let mut ordered: Vec<(&[u8], (usize, usize))> = winners
        .into_iter()
        .map(|(k, (src, row, _))| (k, (src, row)))
        .collect();
    ordered.sort_unstable_by(|a, b| a.0.cmp(b.0));
    let indices: Vec<(usize, usize)> = ordered.into_iter().map(|(_, i)| i).collect();

    let empty;
    let existing = match existing {
        Some(b) => b,
        None => {
            empty = RecordBatch::new_empty(layout.arrow.clone());
            &empty
        }
    };
    let columns: Vec<ArrayRef> = (0..layout.arrow.fields().len())
        .map(|c| {
            let sources: [&dyn Array; 2] =
                [existing.column(c).as_ref(), incoming.column(c).as_ref()];
            interleave(&sources, &indices)
        })
        .collect::<std::result::Result<_, _>>()?;
    Ok((
        Some(RecordBatch::try_new(layout.arrow.clone(), columns)?),
        stats,
    ))
}
