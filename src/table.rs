//! A loaded table: its metadata, column layout and live data files grouped by bucket.
//! Everything here is immutable once built; a commit produces a new `TableState`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use iceberg::io::FileIO;
use iceberg::spec::{
    DataContentType, DataFile, Literal, ManifestEntry, ManifestEntryRef, ManifestFile,
    ManifestList, ManifestStatus, PrimitiveLiteral, Snapshot, TableMetadata,
};

use crate::catalog::TableId;
use crate::error::{Error, Result};
use crate::schema::Layout;
use crate::storage::IoCounter;

/// A live data or delete file and the manifest entry that describes it.
#[derive(Debug)]
pub struct LiveFile {
    pub entry: ManifestEntryRef,
    pub bucket: Option<i32>,
}

impl LiveFile {
    pub fn new(entry: ManifestEntryRef) -> Self {
        let bucket = bucket_of(&entry);
        Self { entry, bucket }
    }

    pub fn path(&self) -> &str {
        self.entry.file_path()
    }

    /// The data sequence number: a position delete applies to data files whose number is not
    /// above its own.
    pub fn sequence_number(&self) -> i64 {
        self.entry.sequence_number().unwrap_or(0)
    }
}

/// One manifest of a snapshot's list: its list entry and its live files. Manifests are
/// immutable and carried from snapshot to snapshot by reference, so a state loaded after
/// another writer's commit reuses what it already knows of them instead of reading them again.
#[derive(Debug)]
pub struct Manifest {
    pub file: ManifestFile,
    pub live: Vec<Arc<LiveFile>>,
}

impl Manifest {
    pub fn path(&self) -> &str {
        &self.file.manifest_path
    }
}

/// The files one snapshot references.
#[derive(Debug, Default)]
pub struct SnapshotFiles {
    pub snapshot_id: Option<i64>,
    pub manifest_list: Option<String>,
    pub manifests: Vec<Arc<Manifest>>,
    pub data: Vec<Arc<LiveFile>>,
    by_bucket: HashMap<i32, Vec<Arc<LiveFile>>>,
    /// Files whose partition is not our bucket (written by another engine or layout): every
    /// lookup has to consult them.
    unbucketed: Vec<Arc<LiveFile>>,
    /// Live position-delete files (merge-on-read writes), applied by reads and rewrites.
    pub deletes: Vec<Arc<LiveFile>>,
    deletes_by_bucket: HashMap<i32, Vec<Arc<LiveFile>>>,
    unbucketed_deletes: Vec<Arc<LiveFile>>,
    /// Equality-delete files (written by other engines): we cannot apply them, so reads and
    /// writes refuse the table rather than serve deleted rows.
    pub equality_deletes: usize,
    /// Every delete file, position or equality.
    pub delete_files: usize,
    /// Their paths (they must survive orphan removal).
    pub delete_paths: Vec<String>,
}

impl SnapshotFiles {
    /// The files of `snapshot`. Manifests `known` already holds (a state loaded before) are
    /// taken from it, not read again: only the manifests new since then are read.
    pub async fn load(
        file_io: &FileIO,
        md: &TableMetadata,
        snapshot: &Snapshot,
        io: &IoCounter,
        known: Option<&SnapshotFiles>,
    ) -> Result<Self> {
        let bytes = file_io.new_input(snapshot.manifest_list())?.read().await?;
        io.add(bytes.len());
        let list = ManifestList::parse_with_version(&bytes, md.format_version())?;
        let known: HashMap<&str, &Arc<Manifest>> = known
            .map(|k| k.manifests.iter().map(|m| (m.path(), m)).collect())
            .unwrap_or_default();
        let reads = list.entries().iter().map(|manifest_file| {
            let known = known.get(manifest_file.manifest_path.as_str()).copied();
            async move {
                // The same path is the same file; its entries inherit from the list entry.
                if let Some(m) = known.filter(|m| same_listing(&m.file, manifest_file)) {
                    return Ok::<_, Error>(m.clone());
                }
                let manifest = manifest_file.load_manifest(file_io).await?;
                io.add(usize::try_from(manifest_file.manifest_length).unwrap_or(0));
                let live = manifest
                    .entries()
                    .iter()
                    .filter(|e| e.is_alive())
                    .map(|e| Arc::new(LiveFile::new(e.clone())))
                    .collect();
                Ok(Arc::new(Manifest {
                    file: manifest_file.clone(),
                    live,
                }))
            }
        });
        let manifests = futures::future::try_join_all(reads).await?;
        Ok(Self::of_manifests(
            Some(snapshot.snapshot_id()),
            Some(snapshot.manifest_list().to_string()),
            manifests,
        ))
    }

    /// The files of a snapshot whose manifests are known: their live files, filed by bucket.
    pub fn of_manifests(
        snapshot_id: Option<i64>,
        manifest_list: Option<String>,
        manifests: Vec<Arc<Manifest>>,
    ) -> Self {
        let mut out = Self {
            snapshot_id,
            manifest_list,
            ..Self::default()
        };
        for m in &manifests {
            for f in &m.live {
                out.add(f.clone());
            }
        }
        out.manifests = manifests;
        out
    }

    /// A live manifest entry for a file a commit of ours adds in snapshot `snapshot_id` at
    /// sequence number `seq` (what reading the manifest back would give).
    pub fn added_entry(df: &DataFile, snapshot_id: i64, seq: i64) -> Arc<LiveFile> {
        Arc::new(LiveFile::new(Arc::new(
            ManifestEntry::builder()
                .status(ManifestStatus::Added)
                .snapshot_id(snapshot_id)
                .sequence_number(seq)
                .file_sequence_number(seq)
                .data_file(df.clone())
                .build(),
        )))
    }

    /// Files one live file to the lists it belongs in.
    fn add(&mut self, file: Arc<LiveFile>) {
        let bucket = file.bucket;
        let path = file.path().to_string();
        match file.entry.content_type() {
            DataContentType::Data => {
                match bucket {
                    Some(b) => self.by_bucket.entry(b).or_default().push(file.clone()),
                    None => self.unbucketed.push(file.clone()),
                }
                self.data.push(file);
            }
            DataContentType::PositionDeletes => {
                self.delete_files += 1;
                self.delete_paths.push(path);
                match bucket {
                    Some(b) => self
                        .deletes_by_bucket
                        .entry(b)
                        .or_default()
                        .push(file.clone()),
                    None => self.unbucketed_deletes.push(file.clone()),
                }
                self.deletes.push(file);
            }
            DataContentType::EqualityDeletes => {
                self.delete_files += 1;
                self.equality_deletes += 1;
                self.delete_paths.push(path);
            }
        }
    }

    /// Every file that may hold a key of bucket `b`.
    pub fn files_for_bucket(&self, b: i32) -> impl Iterator<Item = &Arc<LiveFile>> {
        self.by_bucket
            .get(&b)
            .into_iter()
            .flatten()
            .chain(self.unbucketed.iter())
    }

    /// Every position-delete file that may apply to a file of bucket `b`.
    pub fn deletes_for_bucket(&self, b: i32) -> impl Iterator<Item = &Arc<LiveFile>> {
        self.deletes_by_bucket
            .get(&b)
            .into_iter()
            .flatten()
            .chain(self.unbucketed_deletes.iter())
    }

    /// Rows the position-delete files mark as deleted (each position is deleted once: our
    /// writers never delete a row twice).
    pub fn total_position_deletes(&self) -> u64 {
        self.deletes.iter().map(|f| f.entry.record_count()).sum()
    }

    /// Fails on tables whose deletes we cannot apply (equality deletes from other engines).
    pub fn check_deletes_supported(&self, table: &dyn std::fmt::Display) -> Result<()> {
        if self.equality_deletes > 0 {
            return Err(Error::table_state(
                table,
                format!(
                    "it has {} equality-delete files (written by another engine), which this \
                     store cannot apply; rewrite the table without them first",
                    self.equality_deletes
                ),
            ));
        }
        Ok(())
    }

    /// Each bucket with its files.
    pub fn buckets(&self) -> impl Iterator<Item = (i32, &[Arc<LiveFile>])> {
        self.by_bucket.iter().map(|(b, f)| (*b, f.as_slice()))
    }

    pub fn unbucketed_count(&self) -> usize {
        self.unbucketed.len()
    }

    pub fn total_records(&self) -> u64 {
        self.data.iter().map(|f| f.entry.record_count()).sum()
    }

    /// Paths of every live data and position-delete file.
    pub fn all_paths(&self) -> impl Iterator<Item = &str> {
        self.data.iter().chain(&self.deletes).map(|f| f.path())
    }

    pub fn total_bytes(&self) -> u64 {
        self.data.iter().map(|f| f.entry.file_size_in_bytes()).sum()
    }
}

/// Whether two list entries name the same manifest with the same inherited values.
fn same_listing(a: &ManifestFile, b: &ManifestFile) -> bool {
    a.manifest_path == b.manifest_path
        && a.manifest_length == b.manifest_length
        && a.sequence_number == b.sequence_number
        && a.added_snapshot_id == b.added_snapshot_id
}

fn bucket_of(entry: &ManifestEntryRef) -> Option<i32> {
    // Our spec has exactly one field, bucket[N](entity_key); anything else is "unbucketed".
    let fields = entry.data_file().partition().fields();
    match fields {
        [Some(Literal::Primitive(PrimitiveLiteral::Int(b)))] => Some(*b),
        _ => None,
    }
}

/// Reads and parses one metadata.json, counting the bytes read.
pub async fn read_metadata(
    file_io: &FileIO,
    io: &IoCounter,
    id: &TableId,
    location: &str,
) -> Result<TableMetadata> {
    let bytes = file_io.new_input(location)?.read().await?;
    io.add(bytes.len());
    serde_json::from_slice(&bytes).map_err(|e| Error::corrupt(id, format!("{location}: {e}")))
}

/// A table as of one metadata version.
#[derive(Debug)]
pub struct TableState {
    pub id: TableId,
    pub metadata_location: String,
    pub metadata: Arc<TableMetadata>,
    pub layout: Arc<Layout>,
    pub files: Arc<SnapshotFiles>,
    /// When the catalog last confirmed this is the current version.
    pub checked_at: Instant,
}

impl TableState {
    /// Loads a metadata version; manifests `known` holds are not read again.
    pub async fn load(
        file_io: &FileIO,
        io: &IoCounter,
        id: TableId,
        metadata_location: String,
        known: Option<&SnapshotFiles>,
    ) -> Result<Self> {
        let shown = id.to_string();
        let corrupt = |e: Error| match e {
            Error::CorruptTable { detail, .. } => Error::corrupt(&shown, detail),
            Error::Storage(m) => {
                Error::corrupt(&shown, format!("cannot read {metadata_location}: {m}"))
            }
            other => other,
        };
        let metadata = read_metadata(file_io, io, &id, &metadata_location)
            .await
            .map_err(corrupt)?;
        Self::from_metadata(
            file_io,
            io,
            id,
            metadata_location.clone(),
            Arc::new(metadata),
            known,
        )
        .await
        .map_err(corrupt)
    }

    /// A state whose files are known without reading manifests (a commit of ours).
    pub fn with_files(
        id: TableId,
        metadata_location: String,
        metadata: Arc<TableMetadata>,
        files: Arc<SnapshotFiles>,
    ) -> Result<Self> {
        Ok(Self {
            id,
            metadata_location,
            layout: Arc::new(Layout::from_metadata(&metadata)?),
            metadata,
            files,
            checked_at: Instant::now(),
        })
    }

    pub async fn from_metadata(
        file_io: &FileIO,
        io: &IoCounter,
        id: TableId,
        metadata_location: String,
        metadata: Arc<TableMetadata>,
        known: Option<&SnapshotFiles>,
    ) -> Result<Self> {
        let layout = Arc::new(Layout::from_metadata(&metadata)?);
        let files = match metadata.current_snapshot() {
            Some(s) => SnapshotFiles::load(file_io, &metadata, s, io, known).await?,
            None => SnapshotFiles::default(),
        };
        Ok(Self {
            id,
            metadata_location,
            metadata,
            layout,
            files: Arc::new(files),
            checked_at: Instant::now(),
        })
    }
}
