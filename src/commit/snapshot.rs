//! Building an Iceberg overwrite snapshot from public iceberg-rust pieces.
//!
//! iceberg-rust 0.10 only offers `fast_append`; its `TransactionAction` and `TableCommit::build`
//! are crate-private. This module writes the manifest, manifest list and new metadata itself.
//! Replace with the upstream OverwriteAction once apache/iceberg-rust PR #2185 (epic #2269)
//! ships in a release.
//!
//! Every snapshot gets a single data manifest listing ADDED, DELETED and EXISTING entries, and,
//! once the table has position-delete files (merge-on-read writes), a single delete manifest
//! listed the same way. Automatic compaction keeps a bucket to a few files, so rewriting the
//! manifests costs less than tracking several and keeps reads to at most two manifests.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use iceberg::io::FileIO;
use iceberg::spec::{
    DataFile, MAIN_BRANCH, ManifestFile, ManifestListWriter, ManifestWriter, ManifestWriterBuilder,
    Operation, Snapshot, SnapshotReference, SnapshotRetention, Summary, TableMetadata,
    TableMetadataBuilder,
};
use iceberg::{TableRequirement, TableUpdate};
use uuid::Uuid;

use super::delete_quietly;
use crate::catalog::TableId;
use crate::error::{Error, Result};
use crate::table::{LiveFile, NewSnapshot, SnapshotFiles, TableState};

/// A new metadata version: its snapshot files are written, the metadata itself is not yet
/// (a SQL catalog commit writes it, a REST catalog builds its own from `updates`).
#[derive(Debug)]
pub struct PreparedCommit {
    /// The table it commits to (named in the warnings of its cleanups).
    pub table: TableId,
    pub metadata: TableMetadata,
    /// The same change as REST catalog updates, checked against `requirements`.
    pub updates: Vec<TableUpdate>,
    pub requirements: Vec<TableRequirement>,
    /// Metadata files that fell out of the metadata log; delete after a successful commit.
    pub expired_metadata: Vec<String>,
    /// Snapshots this commit drops (retention); their files are deleted after it lands.
    pub expired_snapshots: Vec<i64>,
    /// Files this attempt wrote (manifests, list); delete if the commit fails.
    pub written: Vec<String>,
    pub snapshot_id: Option<i64>,
    /// The files of the table once this lands (known without reading the manifests back).
    pub files: Option<Arc<SnapshotFiles>>,
}

fn new_snapshot_id(md: &TableMetadata) -> i64 {
    loop {
        let (a, b) = Uuid::new_v4().as_u64_pair();
        let id = ((a ^ b) >> 1) as i64;
        if id != 0 && md.snapshot_by_id(id).is_none() {
            return id;
        }
    }
}

fn summary(base: &TableState, changes: &Changes) -> Summary {
    let (added, removed) = (&changes.added, &changes.removed);
    let sum = |it: &mut dyn Iterator<Item = u64>| it.sum::<u64>();
    let added_records = sum(&mut added.iter().map(DataFile::record_count));
    let added_bytes = sum(&mut added.iter().map(DataFile::file_size_in_bytes));
    let removed_records = sum(&mut removed.iter().map(|f| f.entry.record_count()));
    let removed_bytes = sum(&mut removed.iter().map(|f| f.entry.file_size_in_bytes()));
    let added_pos = sum(&mut changes.added_deletes.iter().map(DataFile::record_count));
    let removed_pos = sum(&mut changes
        .removed_deletes
        .iter()
        .map(|f| f.entry.record_count()));
    let total_records = base.files.total_records() + added_records - removed_records;
    let total_bytes = base.files.total_bytes() + added_bytes - removed_bytes;
    let total_files = base.files.data.len() + added.len() - removed.len();
    let total_deletes =
        base.files.deletes.len() + changes.added_deletes.len() - changes.removed_deletes.len();
    let total_pos = base.files.total_position_deletes() + added_pos - removed_pos;
    let props = [
        ("added-data-files", added.len() as u64),
        ("deleted-data-files", removed.len() as u64),
        ("added-records", added_records),
        ("deleted-records", removed_records),
        ("added-files-size", added_bytes),
        ("removed-files-size", removed_bytes),
        ("added-delete-files", changes.added_deletes.len() as u64),
        ("removed-delete-files", changes.removed_deletes.len() as u64),
        ("added-position-deletes", added_pos),
        ("removed-position-deletes", removed_pos),
        (
            "added-position-delete-files",
            changes.added_deletes.len() as u64,
        ),
        (
            "removed-position-delete-files",
            changes.removed_deletes.len() as u64,
        ),
        ("changed-partition-count", changes.buckets_changed as u64),
        ("total-records", total_records),
        ("total-files-size", total_bytes),
        ("total-data-files", total_files as u64),
        ("total-delete-files", total_deletes as u64),
        ("total-position-deletes", total_pos),
        ("total-equality-deletes", 0),
    ];
    Summary {
        operation: if changes.compaction {
            Operation::Replace
        } else if removed.is_empty() && changes.added_deletes.is_empty() {
            Operation::Append
        } else {
            Operation::Overwrite
        },
        additional_properties: props
            .into_iter()
            .filter(|(k, v)| *v > 0 || k.starts_with("total-"))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .chain([("engine-name".to_string(), "feast-iceberg".to_string())])
            .collect::<HashMap<_, _>>(),
    }
}

/// Lists `live` as EXISTING entries, except those in `removed` (DELETED), then adds `added`.
/// `add_delete_file` marks an entry DELETED whatever its content; the name misleads.
fn list_files(
    manifest: &mut ManifestWriter,
    live: &[&Arc<LiveFile>],
    removed: &HashSet<&str>,
    added: &[DataFile],
    snapshot_id: i64,
    seq: i64,
) -> Result<()> {
    for f in live {
        let e = &f.entry;
        let data_seq = e.sequence_number().unwrap_or(0);
        let file_seq = e.file_sequence_number.or(Some(data_seq));
        if removed.contains(f.path()) {
            manifest.add_delete_file(e.data_file().clone(), data_seq, file_seq)?;
        } else {
            let origin = e.snapshot_id().unwrap_or(snapshot_id);
            manifest.add_existing_file(e.data_file().clone(), origin, data_seq, file_seq)?;
        }
    }
    for df in added {
        manifest.add_file(df.clone(), seq)?;
    }
    Ok(())
}

/// The manifests of one content (data or deletes) of a snapshot, one per partition spec:
/// files written in an older spec (the DELETED entries of a re-bucketing) stay described by
/// it, as Iceberg requires; `added` files are in `md`'s default spec.
struct ManifestGroup<'a> {
    deletes: bool,
    live: &'a [Arc<LiveFile>],
    added: &'a [DataFile],
}

impl ManifestGroup<'_> {
    fn is_empty(&self) -> bool {
        self.live.is_empty() && self.added.is_empty()
    }

    /// Each spec's live files, the default spec's with the added files.
    fn by_spec(&self, md: &TableMetadata) -> BTreeMap<i32, (Vec<&Arc<LiveFile>>, &[DataFile])> {
        let mut out: BTreeMap<i32, (Vec<&Arc<LiveFile>>, &[DataFile])> = BTreeMap::new();
        for f in self.live {
            out.entry(f.spec_id).or_default().0.push(f);
        }
        out.entry(md.default_partition_spec_id()).or_default().1 = self.added;
        out.retain(|_, (live, added)| !live.is_empty() || !added.is_empty());
        out
    }
}

/// Writes the snapshot's manifests (at once) and returns their descriptions.
async fn write_manifests(
    file_io: &FileIO,
    md: &TableMetadata,
    groups: [ManifestGroup<'_>; 2],
    removed: &HashSet<&str>,
    snapshot_id: i64,
    written: &mut Vec<String>,
) -> Result<Vec<ManifestFile>> {
    let seq = md.next_sequence_number();
    let commit = Uuid::new_v4();
    let mut writers = Vec::new();
    for group in groups.iter().filter(|g| !g.is_empty()) {
        for (spec_id, (live, added)) in group.by_spec(md) {
            let spec = md.partition_spec_by_id(spec_id).ok_or_else(|| {
                Error::internal(format!("a live file's partition spec {spec_id} is unknown"))
            })?;
            let path = format!(
                "{}/metadata/{commit}-m{}.avro",
                md.location(),
                writers.len()
            );
            written.push(path.clone());
            let builder = ManifestWriterBuilder::new(
                file_io.new_output(&path)?,
                Some(snapshot_id),
                md.current_schema().clone(),
                spec.as_ref().clone(),
            );
            let mut manifest = if group.deletes {
                builder.build_v2_deletes()
            } else {
                builder.build_v2_data()
            };
            list_files(&mut manifest, &live, removed, added, snapshot_id, seq)?;
            writers.push(manifest);
        }
    }
    // The manifests are independent files: written at once.
    Ok(
        futures::future::try_join_all(writers.into_iter().map(ManifestWriter::write_manifest_file))
            .await?,
    )
}

/// Writes the manifests and manifest list of a snapshot that applies `changes` to `base`
/// (`md`: base's metadata with `changes.updates` applied), and returns the snapshot: a data
/// manifest, plus a delete manifest when the table has or gets position-delete files (one
/// of each per partition spec while files of an older spec are listed).
async fn write_snapshot(
    file_io: &FileIO,
    base: &TableState,
    md: &TableMetadata,
    changes: &Changes,
    written: &mut Vec<String>,
) -> Result<(Snapshot, SnapshotFiles)> {
    let snapshot_id = new_snapshot_id(md);
    let seq = md.next_sequence_number();
    let summary = summary(base, changes);
    let removed: HashSet<&str> = changes
        .removed
        .iter()
        .chain(&changes.removed_deletes)
        .map(|f| f.path())
        .collect();
    let groups = [
        ManifestGroup {
            deletes: false,
            live: &base.files.data,
            added: &changes.added,
        },
        ManifestGroup {
            deletes: true,
            live: &base.files.deletes,
            added: &changes.added_deletes,
        },
    ];
    let manifests = write_manifests(file_io, md, groups, &removed, snapshot_id, written).await?;

    let list_path = format!(
        "{}/metadata/snap-{snapshot_id}-1-{}.avro",
        md.location(),
        Uuid::new_v4()
    );
    written.push(list_path.clone());
    let mut list = ManifestListWriter::v2(
        file_io.new_output(&list_path)?.writer().await?,
        snapshot_id,
        md.current_snapshot_id(),
        seq,
    );
    let manifest_paths = manifests.iter().map(|m| m.manifest_path.clone()).collect();
    list.add_manifests(manifests.into_iter())?;
    list.close().await?;

    let added: Vec<&DataFile> = changes.added.iter().chain(&changes.added_deletes).collect();
    let files = SnapshotFiles::after(
        &base.files,
        md,
        NewSnapshot {
            snapshot_id,
            manifest_list: list_path.clone(),
            manifests: manifest_paths,
            seq,
        },
        &removed,
        &added,
    );
    let snapshot = Snapshot::builder()
        .with_snapshot_id(snapshot_id)
        .with_parent_snapshot_id(md.current_snapshot_id())
        .with_sequence_number(seq)
        .with_timestamp_ms(chrono::Utc::now().timestamp_millis())
        .with_manifest_list(list_path)
        .with_summary(summary)
        .with_schema_id(md.current_schema_id())
        .build();
    Ok((snapshot, files))
}

/// The changes one commit makes to a table.
#[derive(Debug, Default)]
pub struct Changes {
    pub added: Vec<DataFile>,
    pub removed: Vec<Arc<LiveFile>>,
    /// Position-delete files added (merge-on-read) and dropped (their bucket was rewritten).
    pub added_deletes: Vec<DataFile>,
    pub removed_deletes: Vec<Arc<LiveFile>>,
    pub buckets_changed: usize,
    /// The rows are the same, only rewritten (`replace` rather than `overwrite`).
    pub compaction: bool,
    /// Snapshots to drop from the metadata in the same commit (retention).
    pub expire: Vec<i64>,
    /// Metadata changes applied before the snapshot is added (schema, property or partition
    /// spec changes).
    pub updates: Vec<TableUpdate>,
    /// The partition spec the added files were written in: the table's default spec once
    /// `updates` are applied (None: no files added, or the default spec as it is).
    pub added_spec: Option<i32>,
}

/// Writes the snapshot files for `changes` on top of `base` and builds the next metadata.
/// Nothing is visible to readers until the catalog commit succeeds.
pub async fn prepare(
    file_io: &FileIO,
    base: &TableState,
    changes: Changes,
) -> Result<PreparedCommit> {
    let mut written = Vec::new();
    let result = prepare_inner(file_io, base, changes, &mut written).await;
    if result.is_err() {
        delete_quietly(file_io, &base.id, &written).await;
    }
    result
}

async fn prepare_inner(
    file_io: &FileIO,
    base: &TableState,
    mut changes: Changes,
    written: &mut Vec<String>,
) -> Result<PreparedCommit> {
    base.files.check_deletes_supported(&base.id)?;
    let mut requirements = vec![
        TableRequirement::UuidMatch {
            uuid: base.metadata.uuid(),
        },
        TableRequirement::RefSnapshotIdMatch {
            r#ref: MAIN_BRANCH.to_string(),
            snapshot_id: base.metadata.current_snapshot_id(),
        },
    ];
    let md = &base.metadata;
    if !changes.updates.is_empty() {
        requirements.extend([
            TableRequirement::CurrentSchemaIdMatch {
                current_schema_id: md.current_schema_id(),
            },
            TableRequirement::LastAssignedFieldIdMatch {
                last_assigned_field_id: md.last_column_id(),
            },
            TableRequirement::DefaultSpecIdMatch {
                default_spec_id: md.default_partition_spec_id(),
            },
            TableRequirement::LastAssignedPartitionIdMatch {
                last_assigned_partition_id: md.last_partition_id(),
            },
        ]);
    }
    let updates = std::mem::take(&mut changes.updates);
    let with_updates = |mut builder: TableMetadataBuilder| -> Result<TableMetadataBuilder> {
        for update in &updates {
            builder = update.clone().apply(builder)?;
        }
        Ok(builder)
    };
    let mut builder = with_updates(
        md.as_ref()
            .clone()
            .into_builder(Some(base.metadata_location.clone())),
    )?;
    let mut snapshot_id = None;
    // A metadata-only change keeps the current snapshot and its files.
    let mut files = Some(base.files.clone());
    if !changes.added.is_empty() || !changes.removed.is_empty() {
        // The snapshot's manifests are written against the metadata the updates make (a new
        // partition spec, say), which the builder does not show until it is built.
        let updated = if updates.is_empty() {
            Cow::Borrowed(md.as_ref())
        } else {
            Cow::Owned(
                with_updates(md.as_ref().clone().into_builder(None))?
                    .build()?
                    .metadata,
            )
        };
        if let Some(spec) = changes.added_spec
            && spec != updated.default_partition_spec_id()
        {
            return Err(Error::internal(format!(
                "files written in partition spec {spec} cannot be added to a table whose spec \
                 is {}",
                updated.default_partition_spec_id()
            )));
        }
        let (snapshot, after) = write_snapshot(file_io, base, &updated, &changes, written).await?;
        files = (base.files.equality_deletes == 0).then(|| Arc::new(after));
        let id = snapshot.snapshot_id();
        snapshot_id = Some(id);
        builder = TableUpdate::AddSnapshot { snapshot }.apply(builder)?;
        builder = TableUpdate::SetSnapshotRef {
            ref_name: MAIN_BRANCH.to_string(),
            reference: SnapshotReference::new(id, SnapshotRetention::branch(None, None, None)),
        }
        .apply(builder)?;
    }
    let mut expired_snapshots = std::mem::take(&mut changes.expire);
    if snapshot_id.is_none() {
        // Retention planned for a new snapshot may name the current one; without a new
        // snapshot the current one stays.
        expired_snapshots.retain(|id| Some(*id) != base.metadata.current_snapshot_id());
    }
    if !expired_snapshots.is_empty() {
        builder = builder.remove_snapshots(&expired_snapshots);
    }
    let built = builder.build()?;
    let metadata = built.metadata;
    Ok(PreparedCommit {
        table: base.id.clone(),
        metadata,
        updates: built.changes,
        requirements,
        expired_metadata: built
            .expired_metadata_logs
            .into_iter()
            .map(|l| l.metadata_file)
            .collect(),
        expired_snapshots,
        written: std::mem::take(written),
        snapshot_id,
        files,
    })
}
