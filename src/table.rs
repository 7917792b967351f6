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
    /// The partition spec it was written in (its manifest's: iceberg-rust keeps a data file's
    /// own copy private).
    pub spec_id: i32,
    /// Its bucket, when it was written in the table's current `bucket[N](entity_key)` spec.
    pub bucket: Option<i32>,
}

impl LiveFile {
    /// A live file written in spec `spec_id`, for a table whose bucket spec is `bucket_spec`.
    pub fn new(entry: ManifestEntryRef, spec_id: i32, bucket_spec: Option<i32>) -> Self {
        let bucket = bucket_of(&entry).filter(|_| bucket_spec == Some(spec_id));
        Self {
            entry,
            spec_id,
            bucket,
        }
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
    /// The table's bucket spec its live files were filed for (see `LiveFile::bucket`).
    bucket_spec: Option<i32>,
}

impl Manifest {
    /// A manifest's live `entries`, filed for a table whose bucket spec is `bucket_spec`.
    pub fn new(
        file: ManifestFile,
        entries: impl IntoIterator<Item = ManifestEntryRef>,
        bucket_spec: Option<i32>,
    ) -> Self {
        let spec_id = file.partition_spec_id;
        let live = entries
            .into_iter()
            .map(|e| Arc::new(LiveFile::new(e, spec_id, bucket_spec)))
            .collect();
        Self {
            file,
            live,
            bucket_spec,
        }
    }

    /// A manifest whose live files are already filed for `bucket_spec` (carried from the
    /// snapshot they were loaded with).
    pub fn of_files(
        file: ManifestFile,
        live: Vec<Arc<LiveFile>>,
        bucket_spec: Option<i32>,
    ) -> Self {
        Self {
            file,
            live,
            bucket_spec,
        }
    }

    pub fn path(&self) -> &str {
        &self.file.manifest_path
    }

    /// This manifest filed for a table whose bucket spec is `bucket_spec`: itself, unless a
    /// re-bucketing changed whether its spec is the table's bucket spec.
    fn filed_for(self: &Arc<Self>, bucket_spec: Option<i32>) -> Arc<Self> {
        let spec = Some(self.file.partition_spec_id);
        if (self.bucket_spec == spec) == (bucket_spec == spec) {
            return self.clone();
        }
        let entries = self.live.iter().map(|f| f.entry.clone());
        Arc::new(Self::new(self.file.clone(), entries, bucket_spec))
    }
}

/// The files one snapshot references.
#[derive(Debug, Default)]
pub struct SnapshotFiles {
    /// The table's current spec when it is `bucket[N](entity_key)`: only files written in it
    /// are filed by bucket (a re-bucketed table's files of an older spec, or files other
    /// engines wrote, would answer for other keys).
    bucket_spec: Option<i32>,
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
        let bucket_spec = bucket_spec_id(md);
        let known: HashMap<&str, &Arc<Manifest>> = known
            .map(|k| k.manifests.iter().map(|m| (m.path(), m)).collect())
            .unwrap_or_default();
        let reads = list.entries().iter().map(|manifest_file| {
            let known = known.get(manifest_file.manifest_path.as_str()).copied();
            async move {
                // The same path is the same file; its entries inherit from the list entry.
                if let Some(m) = known.filter(|m| same_listing(&m.file, manifest_file)) {
                    return Ok::<_, Error>(m.filed_for(bucket_spec));
                }
                let manifest = manifest_file.load_manifest(file_io).await?;
                io.add(usize::try_from(manifest_file.manifest_length).unwrap_or(0));
                let live = manifest.entries().iter().filter(|e| e.is_alive()).cloned();
                Ok(Arc::new(Manifest::new(
                    manifest_file.clone(),
                    live,
                    bucket_spec,
                )))
            }
        });
        let manifests = futures::future::try_join_all(reads).await?;
        Ok(Self::of_manifests(
            md,
            Some(snapshot.snapshot_id()),
            Some(snapshot.manifest_list().to_string()),
            manifests,
        ))
    }

    /// The files of a snapshot whose manifests are known: their live files, filed by bucket.
    /// `md`: the table's metadata with the snapshot. Files written in its current bucket
    /// spec are filed by bucket; a re-bucketed table's files of an older spec, or files other
    /// engines wrote, would answer for other keys and are consulted by every lookup.
    pub fn of_manifests(
        md: &TableMetadata,
        snapshot_id: Option<i64>,
        manifest_list: Option<String>,
        manifests: Vec<Arc<Manifest>>,
    ) -> Self {
        let bucket_spec = bucket_spec_id(md);
        let mut out = Self {
            bucket_spec,
            snapshot_id,
            manifest_list,
            ..Self::default()
        };
        let manifests: Vec<Arc<Manifest>> =
            manifests.iter().map(|m| m.filed_for(bucket_spec)).collect();
        for m in &manifests {
            for f in &m.live {
                out.add(f.clone());
            }
        }
        out.manifests = manifests;
        out
    }

    /// The table's bucket spec these files are filed for.
    pub fn bucket_spec(&self) -> Option<i32> {
        self.bucket_spec
    }

    /// The live manifest entry of a file a commit of ours adds in snapshot `snapshot_id` at
    /// sequence number `seq` (what reading the manifest back would give).
    pub fn added_entry(df: &DataFile, snapshot_id: i64, seq: i64) -> ManifestEntryRef {
        Arc::new(
            ManifestEntry::builder()
                .status(ManifestStatus::Added)
                .snapshot_id(snapshot_id)
                .sequence_number(seq)
                .file_sequence_number(seq)
                .data_file(df.clone())
                .build(),
        )
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

/// The id of the table's current spec when it is ours, `bucket[N](entity_key)`.
pub fn bucket_spec_id(md: &TableMetadata) -> Option<i32> {
    crate::schema::spec_buckets(md).map(|_| md.default_partition_spec_id())
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

#[cfg(test)]
mod tests {
    use super::*;
    use iceberg::TableUpdate;
    use iceberg::spec::{
        DataFileBuilder, DataFileFormat, FormatVersion, NestedField, PrimitiveType, Schema,
        SortOrder, Struct, TableMetadataBuilder, Type,
    };

    use crate::schema::{ENTITY_KEY, bucket_spec, spec_buckets};

    /// A table created as `bucket[counts[0]](entity_key)`, re-bucketed through the others.
    fn metadata(counts: &[u32]) -> TableMetadata {
        let schema = Schema::builder()
            .with_fields([NestedField::required(
                1,
                ENTITY_KEY,
                Type::Primitive(PrimitiveType::Binary),
            )
            .into()])
            .build()
            .unwrap();
        let mut builder = TableMetadataBuilder::new(
            schema,
            bucket_spec(1, counts[0]).unwrap(),
            SortOrder::unsorted_order(),
            "memory://t".into(),
            FormatVersion::V2,
            HashMap::new(),
        )
        .unwrap();
        for &n in &counts[1..] {
            builder = TableUpdate::AddSpec {
                spec: bucket_spec(1, n).unwrap(),
            }
            .apply(builder)
            .unwrap();
            builder = TableUpdate::SetDefaultSpec { spec_id: -1 }
                .apply(builder)
                .unwrap();
        }
        builder.build().unwrap().metadata
    }

    fn data_file(path: &str, bucket: i32) -> DataFile {
        DataFileBuilder::default()
            .content(DataContentType::Data)
            .file_format(DataFileFormat::Parquet)
            .file_path(path.to_string())
            .file_size_in_bytes(1024)
            .record_count(10)
            .partition(Struct::from_iter([Some(Literal::int(bucket))]))
            .build()
            .unwrap()
    }

    /// A manifest of spec `spec_id` listing `files` as added in snapshot `id`.
    fn manifest(md: &TableMetadata, spec_id: i32, id: i64, files: &[&DataFile]) -> Arc<Manifest> {
        let file = ManifestFile {
            manifest_path: format!("memory://t/m{id}.avro"),
            manifest_length: 1,
            partition_spec_id: spec_id,
            content: iceberg::spec::ManifestContentType::Data,
            sequence_number: id,
            min_sequence_number: id,
            added_snapshot_id: id,
            added_files_count: None,
            existing_files_count: None,
            deleted_files_count: None,
            added_rows_count: None,
            existing_rows_count: None,
            deleted_rows_count: None,
            partitions: None,
            key_metadata: None,
            first_row_id: None,
        };
        let entries = files
            .iter()
            .map(|df| SnapshotFiles::added_entry(df, id, id));
        Arc::new(Manifest::new(file, entries, bucket_spec_id(md)))
    }

    fn paths<'a>(files: impl Iterator<Item = &'a Arc<LiveFile>>) -> Vec<&'a str> {
        let mut out: Vec<&str> = files.map(|f| f.path()).collect();
        out.sort_unstable();
        out
    }

    #[test]
    fn only_files_of_the_current_bucket_spec_are_filed_by_bucket() {
        let old = metadata(&[4]);
        assert_eq!(spec_buckets(&old), Some(4));
        let (a, b) = (data_file("a", 1), data_file("b", 3));
        let old_spec = old.default_partition_spec_id();
        let m1 = manifest(&old, old_spec, 1, &[&a]);
        let m2 = manifest(&old, old_spec, 2, &[&b]);
        let base = SnapshotFiles::of_manifests(&old, Some(2), None, vec![m1.clone(), m2]);
        assert_eq!(paths(base.files_for_bucket(1)), ["a"]);
        assert_eq!(base.unbucketed_count(), 0);

        // Re-bucketed to 8: a file left in the old spec holds keys of several new buckets
        // (its bucket 1 is new buckets 1 and 5), so every lookup must consult it.
        let new = metadata(&[4, 8]);
        assert_eq!(spec_buckets(&new), Some(8));
        assert_ne!(
            new.default_partition_spec_id(),
            old.default_partition_spec_id()
        );
        let c = data_file("c", 5);
        let m3 = manifest(&new, new.default_partition_spec_id(), 3, &[&c]);
        // The old spec's manifest is carried by reference, as a commit carries it.
        let after = SnapshotFiles::of_manifests(&new, Some(3), None, vec![m3, m1]);
        assert_eq!(after.unbucketed_count(), 1);
        assert_eq!(paths(after.files_for_bucket(5)), ["a", "c"]);
        assert_eq!(paths(after.files_for_bucket(1)), ["a"]);
        let spec_of = |p: &str| after.data.iter().find(|f| f.path() == p).unwrap().spec_id;
        assert_eq!(spec_of("a"), old.default_partition_spec_id());
        assert_eq!(spec_of("c"), new.default_partition_spec_id());
    }
}
