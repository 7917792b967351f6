//! Maintenance: snapshot retention and deletion of files no retained snapshot needs (automatic,
//! after every commit), and the explicit operations of the `feast-iceberg` CLI: orphan removal,
//! compaction, duplicate-key counts.
//!
//! Expiry runs inside every commit (expired snapshots are removed by the same metadata update that adds
//! the new snapshot), so storage stays bounded with no manual step. A replaced snapshot is kept
//! for a grace period after it stopped being current, so readers in other processes that cached
//! it keep finding its files until they refresh.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arrow_array::Array;
use iceberg::spec::{MAIN_BRANCH, Snapshot, TableMetadata};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::commit::delete_quietly;
use crate::error::{Error, Result};
use crate::read::{BucketDeletes, keys_of_column};
use crate::schema::ENTITY_KEY;
use crate::store::Store;
use crate::table::LiveFile;
use crate::write::{
    WriteReport, bucket_target, compact, compaction_buckets, largest_bucket_bytes, rebucket,
};

/// Snapshot ids that branches or tags other than main point at. iceberg-rust keeps `refs`
/// crate-private, so they are read from the metadata's JSON form.
fn other_refs(md: &TableMetadata) -> HashSet<i64> {
    let Ok(json) = serde_json::to_value(md) else {
        return HashSet::new();
    };
    json.get("refs")
        .and_then(|r| r.as_object())
        .map(|refs| {
            refs.iter()
                .filter(|(name, _)| name.as_str() != MAIN_BRANCH)
                .filter_map(|(_, r)| r.get("snapshot-id").and_then(serde_json::Value::as_i64))
                .collect()
        })
        .unwrap_or_default()
}

/// Snapshots on the main branch's history that retention lets go.
///
/// `pending_new`: a new snapshot is about to become current (it counts towards `keep` and the
/// current snapshot is replaced "now"). A snapshot at position `p` of the history (0 = current)
/// is kept while `p < keep`, or while it was replaced less than `grace_ms` ago; snapshots that
/// another branch or tag references are never expired here.
pub fn expirable(
    md: &TableMetadata,
    pending_new: bool,
    now_ms: i64,
    keep: usize,
    grace_ms: i64,
) -> Vec<i64> {
    let referenced = other_refs(md);
    let mut out = Vec::new();
    let mut replaced_at = now_ms;
    let mut position = usize::from(pending_new);
    let mut next: Option<&Snapshot> = md.current_snapshot().map(AsRef::as_ref);
    let mut first = true;
    while let Some(s) = next {
        // The current snapshot is only "replaced" when a new one is pending.
        let replaced = pending_new || !first;
        if replaced
            && position >= keep
            && now_ms - replaced_at >= grace_ms
            && !referenced.contains(&s.snapshot_id())
        {
            out.push(s.snapshot_id());
        }
        replaced_at = s.timestamp_ms();
        position += 1;
        first = false;
        next = s
            .parent_snapshot_id()
            .and_then(|p| md.snapshot_by_id(p))
            .map(AsRef::as_ref);
    }
    out
}

// ---- explicit maintenance (the `feast-iceberg` CLI) -------------------------------------------

/// Files under a table's location that no retained snapshot or metadata version references.
#[derive(Debug, Default, Clone)]
pub struct Orphans {
    /// Removed (or, on a dry run, to be removed).
    pub paths: Vec<String>,
    pub bytes: u64,
    /// Unreferenced but younger than the safety age: possibly a write in progress.
    pub too_young: usize,
}

/// `file:///a/b` -> `/a/b`; None for other schemes.
fn local_path(uri: &str) -> Option<PathBuf> {
    uri.strip_prefix("file://")
        .or_else(|| uri.starts_with('/').then_some(uri))
        .map(PathBuf::from)
}

fn walk(dir: &Path, out: &mut Vec<(PathBuf, std::fs::Metadata)>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        if meta.is_dir() {
            walk(&entry.path(), out)?;
        } else {
            out.push((entry.path(), meta));
        }
    }
    Ok(())
}

impl Store {
    /// Every file a retained snapshot or metadata version of the table references.
    async fn referenced_files(&self, table: &str) -> Result<(String, HashSet<PathBuf>)> {
        let id = self.table_id(table)?;
        let state = self.current(&id, Duration::ZERO).await?;
        let md = &state.metadata;
        let mut uris: Vec<String> = vec![state.metadata_location.clone()];
        uris.extend(md.metadata_log().iter().map(|l| l.metadata_file.clone()));
        for s in md.snapshots() {
            let files = self
                .snapshot_files(md, s.snapshot_id(), Some(&state.files))
                .await?
                .ok_or_else(|| Error::internal("snapshot vanished from its own metadata"))?;
            uris.extend(files.manifest_list.iter().cloned());
            uris.extend(files.manifests.iter().map(|m| m.path().to_string()));
            uris.extend(files.data.iter().map(|f| f.path().to_string()));
            uris.extend(files.delete_paths.iter().cloned());
        }
        let referenced = uris.iter().filter_map(|u| local_path(u)).collect();
        Ok((md.location().to_string(), referenced))
    }

    /// Deletes files under the table's `data/` and `metadata/` that nothing references and
    /// that are older than `older_than` (younger ones may belong to a write in progress).
    pub async fn remove_orphans(
        &self,
        table: &str,
        older_than: Duration,
        dry_run: bool,
    ) -> Result<Orphans> {
        let (location, referenced) = self.referenced_files(table).await?;
        let Some(root) = local_path(&location) else {
            return Err(Error::config(format!(
                "remove-orphans supports local warehouses in this version, not {location}"
            )));
        };
        let mut found = Vec::new();
        for sub in ["data", "metadata"] {
            match walk(&root.join(sub), &mut found) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::storage(format!("list {}: {e}", root.display()))),
            }
        }
        let now = SystemTime::now();
        let mut out = Orphans::default();
        for (path, meta) in found {
            if referenced.contains(&path) {
                continue;
            }
            let age = meta
                .modified()
                .ok()
                .and_then(|m| now.duration_since(m).ok())
                .unwrap_or_default();
            if age < older_than {
                out.too_young += 1;
                continue;
            }
            out.bytes += meta.len();
            out.paths.push(format!("file://{}", path.display()));
        }
        out.paths.sort();
        if !dry_run {
            delete_quietly(&self.file_io, &table, &out.paths).await;
        }
        Ok(out)
    }

    /// Rows whose entity key another live row of the table also has (0 for tables we wrote;
    /// append-only writers such as the contrib store leave them). Rows hidden by position
    /// deletes are not live.
    pub async fn duplicate_keys(&self, table: &str) -> Result<u64> {
        let id = self.table_id(table)?;
        let state = self.current(&id, Duration::ZERO).await?;
        state.files.check_deletes_supported(&id)?;
        let mut by_bucket: HashMap<Option<i32>, Vec<&Arc<LiveFile>>> = HashMap::new();
        for f in &state.files.data {
            by_bucket.entry(f.bucket).or_default().push(f);
        }
        let mut duplicates = 0u64;
        for (bucket, files) in &by_bucket {
            let deletes = match bucket {
                Some(b) => {
                    let files = state.files.deletes_for_bucket(*b);
                    self.files
                        .bucket_deletes(&self.file_io, files, &self.io.metadata)
                        .await?
                }
                None => BucketDeletes::default(),
            };
            let mut seen: HashSet<Vec<u8>> = HashSet::new();
            for file in files {
                let path = file.path();
                let bytes = self.file_io.new_input(path)?.read().await?;
                let builder = ParquetRecordBatchReaderBuilder::try_new(bytes)?;
                let Some(column) = builder
                    .parquet_schema()
                    .columns()
                    .iter()
                    .position(|c| c.path().string() == ENTITY_KEY)
                else {
                    return Err(Error::corrupt(&id, format!("{path} has no entity_key")));
                };
                let mask = ProjectionMask::leaves(builder.parquet_schema(), [column]);
                let mut pos = 0u64;
                for batch in builder.with_projection(mask).build()? {
                    let keys = keys_of_column(batch?.column(0))?;
                    for i in 0..keys.len() {
                        let live = !keys.is_null(i) && !deletes.is_deleted(file, pos + i as u64);
                        if live && !seen.insert(keys.value(i).to_vec()) {
                            duplicates += 1;
                        }
                    }
                    pos += keys.len() as u64;
                }
            }
        }
        Ok(duplicates)
    }

    /// Rewrites buckets with several data files (or every bucket with `all`) into one sorted
    /// file each; or, when the largest bucket outgrew `target_bucket_bytes` or `buckets` asks
    /// for more, re-buckets the table (every bucket split, every file rewritten). A dry run
    /// reports what would be rewritten.
    pub async fn compact(
        &self,
        table: &str,
        all: bool,
        dry_run: bool,
        buckets: Option<u32>,
    ) -> Result<CompactReport> {
        let id = self.table_id(table)?;
        let state = self.current(&id, Duration::ZERO).await?;
        let before = state.layout.buckets;
        let target = bucket_target(&state, self.config.target_bucket_bytes, buckets)?;
        let rebucket_to = (target != before).then_some(target);
        let write = if !dry_run {
            match rebucket_to {
                Some(m) => rebucket(self, table, m).await?,
                None => compact(self, table, all).await?,
            }
        } else {
            let rewritten = match rebucket_to {
                Some(_) => state.files.buckets().map(|(b, _)| b).collect(),
                None => compaction_buckets(&state, all),
            };
            let files = state
                .files
                .buckets()
                .filter(|(b, _)| rewritten.contains(b))
                .map(|(_, f)| f.len())
                .sum();
            WriteReport {
                buckets: rewritten.len(),
                files_removed: files,
                ..WriteReport::default()
            }
        };
        let after = if dry_run {
            target
        } else {
            self.current(&id, Duration::MAX).await?.layout.buckets
        };
        Ok(CompactReport {
            write,
            buckets_before: before,
            buckets_after: after,
            largest_bucket_bytes: largest_bucket_bytes(&state),
        })
    }
}

/// What `compact` did (or, on a dry run, would do).
#[derive(Debug, Default, Clone)]
pub struct CompactReport {
    pub write: WriteReport,
    /// The table's bucket count before and after (different when it was re-bucketed).
    pub buckets_before: u32,
    pub buckets_after: u32,
    /// Live bytes of the largest bucket before.
    pub largest_bucket_bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use iceberg::TableUpdate;
    use iceberg::spec::{
        FormatVersion, NestedField, Operation, PrimitiveType, Schema, SnapshotReference,
        SnapshotRetention, SortOrder, Summary, TableMetadataBuilder, Type, UnboundPartitionSpec,
    };
    use std::collections::HashMap;

    fn table_with_history(timestamps: &[i64]) -> TableMetadata {
        let schema = Schema::builder()
            .with_fields([
                NestedField::required(1, "k", Type::Primitive(PrimitiveType::Long)).into(),
            ])
            .build()
            .unwrap();
        let mut b = TableMetadataBuilder::new(
            schema,
            UnboundPartitionSpec::builder().build(),
            SortOrder::unsorted_order(),
            "memory://t".into(),
            FormatVersion::V2,
            HashMap::new(),
        )
        .unwrap();
        let mut parent = None;
        for (i, ts) in timestamps.iter().enumerate() {
            let id = i as i64 + 1;
            let snap = Snapshot::builder()
                .with_snapshot_id(id)
                .with_parent_snapshot_id(parent)
                .with_sequence_number(id)
                .with_timestamp_ms(*ts)
                .with_manifest_list(format!("memory://t/m{id}.avro"))
                .with_summary(Summary {
                    operation: Operation::Append,
                    additional_properties: HashMap::new(),
                })
                .with_schema_id(0)
                .build();
            b = TableUpdate::AddSnapshot { snapshot: snap }
                .apply(b)
                .unwrap();
            b = TableUpdate::SetSnapshotRef {
                ref_name: MAIN_BRANCH.into(),
                reference: SnapshotReference::new(id, SnapshotRetention::branch(None, None, None)),
            }
            .apply(b)
            .unwrap();
            parent = Some(id);
        }
        b.build().unwrap().metadata
    }

    #[test]
    fn keeps_current_and_snapshots_inside_grace() {
        // Snapshots 1..4 committed at t=1000,2000,3000,4000; now = 10_000.
        let md = table_with_history(&[1000, 2000, 3000, 4000]);
        // No pending commit, keep 1, no grace: everything but the current goes.
        let mut e = expirable(&md, false, 10_000, 1, 0);
        e.sort();
        assert_eq!(e, vec![1, 2, 3]);
        // Grace 7 s: snapshot 3 was replaced at 4000 (6 s ago) and stays; 2 replaced at 3000 goes.
        let mut e = expirable(&md, false, 10_000, 1, 7_000);
        e.sort();
        assert_eq!(e, vec![1, 2]);
        // A pending commit replaces 4 now: with grace it stays; without it goes too.
        assert!(!expirable(&md, true, 10_000, 1, 1).contains(&4));
        assert!(expirable(&md, true, 10_000, 1, 0).contains(&4));
        // keep = 3 with a pending commit: new, 4 and 3 stay.
        let mut e = expirable(&md, true, 10_000, 3, 0);
        e.sort();
        assert_eq!(e, vec![1, 2]);
    }
}
