//! Building an Iceberg snapshot from public iceberg-rust pieces.
//!
//! iceberg-rust 0.10 only offers `fast_append`; its `TransactionAction` and `TableCommit::build`
//! are crate-private. This module writes the manifests, manifest list and new metadata itself.
//! Replace with the upstream OverwriteAction once apache/iceberg-rust PR #2185 (epic #2269)
//! ships in a release.
//!
//! Manifests are immutable and shared between snapshots, as Iceberg's own writers do: a commit
//! writes one manifest of the files it adds (and one of the delete files it adds), rewrites
//! only the manifests that list a file it removes (those entries become DELETED), and carries
//! every other manifest of the current snapshot by reference. A push therefore costs its own
//! files, not the table's. The manifests of added files depend on nothing but the files and
//! the snapshot id, so a writer writes them before it takes the commit lock
//! (`NewManifests`). When a kind of manifest (data or deletes, per partition spec) would pass
//! `MAX_MANIFESTS`, the commit folds them into one: readers (ours on a reload, PyIceberg,
//! DuckDB) read at most that many manifests, and the fold costs the live files once every
//! `MAX_MANIFESTS` commits or so.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::str::FromStr;
use std::sync::Arc;

use iceberg::MetadataLocation;
use iceberg::io::FileIO;
use iceberg::spec::{
    DataFile, MAIN_BRANCH, ManifestContentType, ManifestFile, ManifestListWriter, ManifestWriter,
    ManifestWriterBuilder, Operation, Snapshot, SnapshotReference, SnapshotRetention, Summary,
    TableMetadata, TableMetadataBuilder, UNASSIGNED_SEQUENCE_NUMBER,
};
use iceberg::{TableRequirement, TableUpdate};
use uuid::Uuid;

use super::delete_quietly;
use crate::catalog::TableId;
use crate::error::{Error, Result};
use crate::table::{LiveFile, Manifest, SnapshotFiles, TableState, bucket_spec_id};

/// Manifests of one kind (data or deletes, one partition spec) a snapshot lists at most
/// before a commit folds them into one.
pub const MAX_MANIFESTS: usize = 16;

/// A new metadata version: its snapshot files are written, and so is its metadata.json when
/// the catalog does not write its own (SQL catalogs; a REST catalog builds its own from
/// `updates`).
#[derive(Debug)]
pub struct PreparedCommit {
    /// The table it commits to (named in the warnings of its cleanups).
    pub table: TableId,
    pub metadata: TableMetadata,
    /// Where `metadata` was written (None: the catalog writes it).
    pub metadata_location: Option<String>,
    /// The same change as REST catalog updates, checked against `requirements`.
    pub updates: Vec<TableUpdate>,
    pub requirements: Vec<TableRequirement>,
    /// Metadata files that fell out of the metadata log; delete after a successful commit.
    pub expired_metadata: Vec<String>,
    /// Snapshots this commit drops (retention); their files are deleted after it lands.
    pub expired_snapshots: Vec<i64>,
    /// Files this attempt wrote (manifests, list, metadata.json); delete if the commit fails.
    /// The new-file manifests written ahead are the caller's, not listed here.
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

fn manifest_builder(
    file_io: &FileIO,
    md: &TableMetadata,
    spec_id: i32,
    snapshot_id: i64,
    path: &str,
) -> Result<ManifestWriterBuilder> {
    let spec = md.partition_spec_by_id(spec_id).ok_or_else(|| {
        Error::internal(format!(
            "partition spec {spec_id} is not in the table's metadata"
        ))
    })?;
    Ok(ManifestWriterBuilder::new(
        file_io.new_output(path)?,
        Some(snapshot_id),
        md.current_schema().clone(),
        spec.as_ref().clone(),
    ))
}

/// Writes one manifest per content (data, deletes) of the files `snapshot_id` adds. ADDED
/// entries without sequence numbers: they inherit the one the manifest list gives the
/// manifest (Iceberg's rule for new files), which is what lets them be written before the
/// sequence number is known.
async fn write_added(
    file_io: &FileIO,
    md: &TableMetadata,
    snapshot_id: i64,
    added: &[DataFile],
    added_deletes: &[DataFile],
    written: &mut Vec<String>,
) -> Result<Vec<ManifestFile>> {
    let prefix = format!("{}/metadata/{}", md.location(), Uuid::new_v4());
    let spec_id = md.default_partition_spec_id();
    let mut writers = Vec::with_capacity(2);
    for (files, suffix) in [(added, "m0"), (added_deletes, "m1")] {
        if files.is_empty() {
            continue;
        }
        let path = format!("{prefix}-{suffix}.avro");
        let builder = manifest_builder(file_io, md, spec_id, snapshot_id, &path)?;
        written.push(path);
        let mut w = if suffix == "m0" {
            builder.build_v2_data()
        } else {
            builder.build_v2_deletes()
        };
        for df in files {
            w.add_file(df.clone(), UNASSIGNED_SEQUENCE_NUMBER)?;
        }
        writers.push(w.write_manifest_file());
    }
    Ok(futures::future::try_join_all(writers).await?)
}

/// The manifests of a commit's new files, written before the commit knows the state it lands
/// on (before the commit lock): they stay valid across rebases as long as the commit adds the
/// same files with the same snapshot id, schema and partition spec.
#[derive(Debug)]
pub struct NewManifests {
    pub snapshot_id: i64,
    schema_id: i32,
    spec_id: i32,
    /// The data and delete files they list.
    files: BTreeSet<String>,
    manifests: Vec<ManifestFile>,
    /// Their paths.
    pub paths: Vec<String>,
}

fn paths_of<'a>(added: &'a [DataFile], added_deletes: &'a [DataFile]) -> BTreeSet<String> {
    added
        .iter()
        .chain(added_deletes)
        .map(|f| f.file_path().to_string())
        .collect()
}

impl NewManifests {
    /// Writes the manifests of `added` and `added_deletes` for a commit on top of `md`.
    pub async fn write(
        file_io: &FileIO,
        md: &TableMetadata,
        added: &[DataFile],
        added_deletes: &[DataFile],
    ) -> Result<Self> {
        let snapshot_id = new_snapshot_id(md);
        let mut paths = Vec::new();
        let written = write_added(file_io, md, snapshot_id, added, added_deletes, &mut paths).await;
        match written {
            Ok(manifests) => Ok(Self {
                snapshot_id,
                schema_id: md.current_schema_id(),
                spec_id: md.default_partition_spec_id(),
                files: paths_of(added, added_deletes),
                manifests,
                paths,
            }),
            Err(e) => {
                delete_quietly(file_io, &md.location(), &paths).await;
                Err(e)
            }
        }
    }

    /// Whether these are the new manifests of a commit adding `added` and `added_deletes`
    /// on top of `md`.
    pub fn fit(&self, md: &TableMetadata, added: &[DataFile], added_deletes: &[DataFile]) -> bool {
        self.schema_id == md.current_schema_id()
            && self.spec_id == md.default_partition_spec_id()
            && md.snapshot_by_id(self.snapshot_id).is_none()
            && self.files == paths_of(added, added_deletes)
    }
}

/// Which of `base`'s manifests a commit rewrites: those that list a file it removes, and
/// every manifest of a kind that would otherwise pass `MAX_MANIFESTS` (folded into one).
/// Manifests without live files are dropped, not carried.
fn to_rewrite<'a>(
    base: &'a SnapshotFiles,
    removed: &HashSet<&str>,
    new: &NewManifests,
) -> BTreeMap<(bool, i32), Vec<&'a Arc<Manifest>>> {
    let is_deletes = |m: &ManifestFile| m.content == ManifestContentType::Deletes;
    // Per kind: the manifests carried by reference, and those rewritten.
    type Split<'m> = (Vec<&'m Arc<Manifest>>, Vec<&'m Arc<Manifest>>);
    let mut kinds: BTreeMap<(bool, i32), Split<'a>> = BTreeMap::new();
    for m in base.manifests.iter().filter(|m| !m.live.is_empty()) {
        let (carried, rewritten) = kinds
            .entry((is_deletes(&m.file), m.file.partition_spec_id))
            .or_default();
        if m.live.iter().any(|f| removed.contains(f.path())) {
            rewritten.push(m);
        } else {
            carried.push(m);
        }
    }
    kinds
        .into_iter()
        .filter_map(|(kind, (carried, mut rewritten))| {
            let added = new
                .manifests
                .iter()
                .filter(|m| (is_deletes(m), m.partition_spec_id) == kind)
                .count();
            let after = carried.len() + usize::from(!rewritten.is_empty()) + added;
            if after > MAX_MANIFESTS {
                rewritten.extend(carried);
            }
            (!rewritten.is_empty()).then_some((kind, rewritten))
        })
        .collect()
}

/// Writes one manifest that replaces `manifests` (of one kind): their live files as EXISTING
/// entries, those in `removed` as DELETED. Returns it with the files that stay live.
async fn rewrite(
    file_io: &FileIO,
    md: &TableMetadata,
    (deletes, spec_id): (bool, i32),
    manifests: &[&Arc<Manifest>],
    removed: &HashSet<&str>,
    snapshot_id: i64,
    written: &mut Vec<String>,
) -> Result<(ManifestFile, Vec<Arc<LiveFile>>)> {
    let path = format!("{}/metadata/{}-r.avro", md.location(), Uuid::new_v4());
    let builder = manifest_builder(file_io, md, spec_id, snapshot_id, &path)?;
    written.push(path);
    let mut w: ManifestWriter = if deletes {
        builder.build_v2_deletes()
    } else {
        builder.build_v2_data()
    };
    let mut live = Vec::new();
    for f in manifests.iter().flat_map(|m| &m.live) {
        let e = &f.entry;
        let data_seq = e.sequence_number().unwrap_or(0);
        let file_seq = e.file_sequence_number.or(Some(data_seq));
        if removed.contains(f.path()) {
            // `add_delete_file` marks an entry DELETED whatever its content; the name misleads.
            w.add_delete_file(e.data_file().clone(), data_seq, file_seq)?;
        } else {
            let origin = e.snapshot_id().unwrap_or(snapshot_id);
            w.add_existing_file(e.data_file().clone(), origin, data_seq, file_seq)?;
            live.push(f.clone());
        }
    }
    Ok((w.write_manifest_file().await?, live))
}

/// Writes the manifest list (and the manifests it needs beyond `new`) of a snapshot that
/// applies `changes` to `base`, and returns the snapshot and its files. `md` is base's
/// metadata with `changes.updates` applied (a new partition spec, say).
async fn write_snapshot(
    file_io: &FileIO,
    base: &TableState,
    md: &TableMetadata,
    changes: &Changes,
    new: &NewManifests,
    written: &mut Vec<String>,
) -> Result<(Snapshot, SnapshotFiles)> {
    let snapshot_id = new.snapshot_id;
    let seq = md.next_sequence_number();
    let removed: HashSet<&str> = changes
        .removed
        .iter()
        .chain(&changes.removed_deletes)
        .map(|f| f.path())
        .collect();

    // What the list writer makes of a manifest this snapshot wrote: its sequence numbers
    // (kept so, the manifest is carried by later snapshots as listed here).
    let listed = |mut file: ManifestFile| {
        if file.sequence_number == UNASSIGNED_SEQUENCE_NUMBER {
            file.sequence_number = seq;
        }
        if file.min_sequence_number == UNASSIGNED_SEQUENCE_NUMBER {
            file.min_sequence_number = seq;
        }
        file
    };
    // New manifests first, as Iceberg's writers list them.
    let mut manifests: Vec<Arc<Manifest>> = Vec::new();
    for file in &new.manifests {
        let file = listed(file.clone());
        let added = match file.content {
            ManifestContentType::Data => &changes.added,
            ManifestContentType::Deletes => &changes.added_deletes,
        };
        let live = added
            .iter()
            .map(|df| SnapshotFiles::added_entry(df, snapshot_id, seq));
        manifests.push(Arc::new(Manifest::new(file, live, bucket_spec_id(md))));
    }
    // Rewritten ones (rare: a push removes nothing), one kind after the other.
    let rewrites = to_rewrite(&base.files, &removed, new);
    for (kind, replaced) in &rewrites {
        let (file, live) =
            rewrite(file_io, md, *kind, replaced, &removed, snapshot_id, written).await?;
        manifests.push(Arc::new(Manifest::of_files(
            listed(file),
            live,
            base.files.bucket_spec(),
        )));
    }
    // Then every other manifest with live files, by reference.
    let replaced: HashSet<&str> = rewrites.values().flatten().map(|m| m.path()).collect();
    manifests.extend(
        base.files
            .manifests
            .iter()
            .filter(|m| !m.live.is_empty() && !replaced.contains(m.path()))
            .cloned(),
    );

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
    list.add_manifests(manifests.iter().map(|m| m.file.clone()))?;
    list.close().await?;

    let files =
        SnapshotFiles::of_manifests(md, Some(snapshot_id), Some(list_path.clone()), manifests);
    let snapshot = Snapshot::builder()
        .with_snapshot_id(snapshot_id)
        .with_parent_snapshot_id(md.current_snapshot_id())
        .with_sequence_number(seq)
        .with_timestamp_ms(chrono::Utc::now().timestamp_millis())
        .with_manifest_list(list_path)
        .with_summary(summary(base, changes))
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

/// Writes the snapshot files for `changes` on top of `base` and builds the next metadata,
/// written too when `write_metadata` (catalogs that do not write their own). `new`, when it
/// fits, holds the manifests of the added files already (else they are written here).
/// Nothing is visible to readers until the catalog commit succeeds.
pub async fn prepare(
    file_io: &FileIO,
    base: &TableState,
    changes: Changes,
    new: Option<&NewManifests>,
    write_metadata: bool,
) -> Result<PreparedCommit> {
    let mut written = Vec::new();
    let result = prepare_inner(file_io, base, changes, new, write_metadata, &mut written).await;
    if result.is_err() {
        delete_quietly(file_io, &base.id, &written).await;
    }
    result
}

async fn prepare_inner(
    file_io: &FileIO,
    base: &TableState,
    mut changes: Changes,
    new: Option<&NewManifests>,
    write_metadata: bool,
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
    let mut snapshot_id = None;
    // A metadata-only change keeps the current snapshot and its files (filed again if the
    // bucket spec moved).
    let mut files = Some(if updates.is_empty() {
        base.files.clone()
    } else {
        Arc::new(SnapshotFiles::of_manifests(
            &updated,
            base.files.snapshot_id,
            base.files.manifest_list.clone(),
            base.files.manifests.clone(),
        ))
    });
    if !changes.added.is_empty() || !changes.removed.is_empty() {
        if let Some(spec) = changes.added_spec
            && spec != updated.default_partition_spec_id()
        {
            return Err(Error::internal(format!(
                "files written in partition spec {spec} cannot be added to a table whose spec \
                 is {}",
                updated.default_partition_spec_id()
            )));
        }
        let own;
        let new = match new {
            Some(n) if n.fit(&updated, &changes.added, &changes.added_deletes) => n,
            _ => {
                own =
                    NewManifests::write(file_io, &updated, &changes.added, &changes.added_deletes)
                        .await?;
                written.extend(own.paths.iter().cloned());
                &own
            }
        };
        let (snapshot, after) =
            write_snapshot(file_io, base, &updated, &changes, new, written).await?;
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
    let metadata_location = if write_metadata {
        let location = MetadataLocation::from_str(&base.metadata_location)
            .map_err(|e| Error::corrupt(&base.id, format!("bad metadata location: {e}")))?
            .with_next_version()
            .with_new_metadata(&metadata);
        written.push(location.to_string());
        metadata.write_to(file_io, &location).await?;
        Some(location.to_string())
    } else {
        None
    };
    Ok(PreparedCommit {
        table: base.id.clone(),
        metadata,
        metadata_location,
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
