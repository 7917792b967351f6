//! `Store`: one catalog + warehouse, its caches, and the operations the bindings expose.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow_array::LargeBinaryArray;
use arrow_array::builder::LargeBinaryBuilder;
use iceberg::TableUpdate;
use iceberg::io::FileIO;
use iceberg::spec::{
    FormatVersion, NullOrder, SortDirection, SortField, SortOrder, TableMetadata,
    TableMetadataBuilder, Transform,
};
use tokio::sync::OnceCell;

use crate::catalog::{self, Catalog, Loaded, TableId};
use crate::commit::{self, Changes, PreparedCommit, Step, delete_quietly};
use crate::config::{CatalogType, StoreConfig};
use crate::convert::{
    WriteInput, decode_entity_key, decode_value, entity_key_header, push_entity_key_value,
    serialize_entity_key,
};
use crate::error::{Error, Result};
use crate::maintenance;
use crate::metrics;
use crate::proto::Value;
use crate::read::{self, DataFiles, Hit, ReadOutput, Wanted};
use crate::schema::{self, ColumnSpec, ENTITY_KEY, PROP_BUCKETS};
use crate::storage::{self, IoStats};
use crate::table::{SnapshotFiles, TableState};
use crate::write::{self, WriteReport};

pub struct Store {
    pub(crate) config: StoreConfig,
    pub(crate) file_io: FileIO,
    pub(crate) files: Arc<DataFiles>,
    pub(crate) io: Arc<IoStats>,
    catalog: OnceCell<Arc<dyn Catalog>>,
    /// Shared with the metrics, which report each cached table's staleness and files.
    tables: Arc<Mutex<HashMap<TableId, Arc<TableState>>>>,
    /// Files of snapshots we have read, by manifest-list path (unique per snapshot).
    snapshots: Mutex<HashMap<String, Arc<SnapshotFiles>>>,
    /// Tables whose metadata is being revalidated in the background (one refresh at a time).
    refreshing: Mutex<HashSet<TableId>>,
    /// Concurrent writes waiting to commit together, per table.
    pub(crate) groups: write::Groups,
    _metrics: metrics::Registration,
}

/// Stats of one table's current state.
#[derive(Debug, Clone)]
pub struct TableStats {
    pub snapshot_id: Option<i64>,
    pub snapshots: usize,
    pub data_files: usize,
    pub delete_files: usize,
    /// Live rows: rows of the data files minus the rows position deletes hide.
    pub records: u64,
    pub position_deletes: u64,
    pub data_bytes: u64,
    /// The N of `bucket[N](entity_key)`, and the live bytes of the largest bucket (what
    /// compaction's re-bucketing rule looks at).
    pub buckets: u32,
    pub largest_bucket_bytes: u64,
    pub metadata_location: String,
    pub metadata_log: usize,
}

/// One feature view's share of a multi-view read (`Store::read_views`).
#[derive(Debug, Clone)]
pub struct ViewRead {
    pub table: String,
    /// The view's join keys: the name its entity key uses, and the request column of values.
    pub join_keys: Vec<(String, usize)>,
    pub wanted: Vec<Wanted>,
    /// The view's TTL cut (micros), as for `read`.
    pub not_before: Option<i64>,
}

/// A serialized response (or the `results` of one), in the pieces it was encoded in (each
/// view's vectors, after the response's head if any), and per view the count of PRESENT cells.
/// The pieces are copied once, straight into the Python `bytes` (`concat_into`): at 5 views x
/// 100 keys they hold ~150 KB, and every extra copy of them showed up in a read's profile.
#[derive(Debug, Default)]
pub struct ViewsOutput {
    pub parts: Vec<Vec<u8>>,
    pub present: Vec<u64>,
}

impl ViewsOutput {
    pub fn len(&self) -> usize {
        self.parts.iter().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies the pieces, in order, into `buf` (exactly `len()` bytes).
    pub fn concat_into(&self, buf: &mut [u8]) {
        let mut at = 0;
        for part in &self.parts {
            buf[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        }
    }
}

/// Feast's serialized entity key of each request row for one view.
fn view_keys(view: &ViewRead, rows: usize, decoded: &[Vec<Value>]) -> Result<LargeBinaryArray> {
    let mut columns = Vec::with_capacity(view.join_keys.len());
    for (name, c) in &view.join_keys {
        let column = decoded
            .get(*c)
            .ok_or_else(|| Error::input(format!("join key {name:?}: no request column {c}")))?;
        columns.push((name.as_str(), column));
    }
    // Feast's encoding lists the join keys sorted by name: one header for every row.
    columns.sort_by(|a, b| a.0.cmp(b.0));
    let names: Vec<&str> = columns.iter().map(|(name, _)| *name).collect();
    let header = entity_key_header(&names)?;
    let mut keys = LargeBinaryBuilder::with_capacity(rows, rows * (header.len() + 16));
    let mut key = Vec::with_capacity(header.len() + 16 * columns.len());
    for row in 0..rows {
        key.clear();
        key.extend_from_slice(&header);
        for (name, column) in &columns {
            push_entity_key_value(&mut key, name, &column[row])?;
        }
        keys.append_value(&key);
    }
    Ok(keys.finish())
}

/// Request rows from which the views of a multi-view read run on the runtime's workers in
/// parallel: at 100 rows a view's warm read takes ~100-200 us of CPU, far more than handing it
/// to a worker; at a few rows it takes less than waking one.
const PARALLEL_MIN_ROWS: usize = 32;

/// The request's columns a view's read needs copies of to run in a task of its own: all of
/// them if it is asked for a join key as a feature (answered from the request), else none.
fn key_feature_columns(view: &ViewRead, columns: &[Vec<&[u8]>]) -> Vec<Vec<Vec<u8>>> {
    if !view.wanted.iter().any(|w| matches!(w, Wanted::JoinKey(_))) {
        return Vec::new();
    }
    columns
        .iter()
        .map(|c| c.iter().map(|v| v.to_vec()).collect())
        .collect()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A cleanup step that could not run: the files stay as orphans for `remove-orphans`, and the
/// operator hears of it (a warning naming the table and files, and the cleanup-failure metric).
fn skipped_cleanup(table: &TableId, files: &[String], why: &str) {
    if files.is_empty() {
        return;
    }
    const SHOWN: usize = 10;
    let mut named = files[..files.len().min(SHOWN)].join(", ");
    if files.len() > SHOWN {
        named.push_str(&format!(" and {} more", files.len() - SHOWN));
    }
    log::warn!(
        "table {table}: did not delete {named}, left as orphans for `feast-iceberg \
         remove-orphans`: {why}"
    );
    metrics::cleanup_failed(table, files.len());
}

/// Why a snapshot's file list is not at hand.
fn unlisted(listed: &Result<Option<Arc<SnapshotFiles>>>) -> String {
    match listed {
        Err(e) => e.to_string(),
        Ok(None) => "the snapshot is not in the table's metadata".into(),
        Ok(Some(_)) => "listed".into(),
    }
}

/// The manifest list of snapshot `id`, the one file that names everything it referenced.
fn manifest_list_of(md: &TableMetadata, id: i64) -> Vec<String> {
    md.snapshot_by_id(id)
        .map(|s| s.manifest_list().to_string())
        .into_iter()
        .collect()
}

impl Store {
    pub fn new(config: StoreConfig) -> Result<Self> {
        let file_io = storage::file_io(&config)?;
        let files = Arc::new(DataFiles::new(config.read_cache_bytes));
        let io = Arc::new(IoStats::default());
        let tables = Arc::default();
        let registration = metrics::register(io.clone(), files.clone(), Arc::clone(&tables));
        Ok(Self {
            config,
            file_io,
            files,
            io,
            catalog: OnceCell::new(),
            tables,
            snapshots: Mutex::new(HashMap::new()),
            refreshing: Mutex::new(HashSet::new()),
            groups: write::Groups::default(),
            _metrics: registration,
        })
    }

    pub(crate) async fn catalog(&self) -> Result<&Arc<dyn Catalog>> {
        self.catalog
            .get_or_try_init(|| catalog::connect(&self.config))
            .await
    }

    pub fn table_id(&self, table: &str) -> Result<TableId> {
        catalog::validate_name("table", table)?;
        Ok(TableId {
            namespace: self.config.namespace.clone(),
            name: table.to_string(),
        })
    }

    /// Drops what we cached of a table that is gone or whose identifier names other metadata.
    pub(crate) fn forget(&self, id: &TableId) {
        lock(&self.tables).remove(id);
    }

    fn cached(&self, id: &TableId) -> Option<Arc<TableState>> {
        lock(&self.tables).get(id).cloned()
    }

    /// Makes `state` the one reads use now. The new files' indexes and the row groups that
    /// hold what was hot in the files they replace are loaded in the background.
    fn install(&self, state: Arc<TableState>) {
        let before = lock(&self.tables).insert(state.id.clone(), state.clone());
        let Some(before) = before else { return };
        if before.metadata_location == state.metadata_location {
            return;
        }
        let plan = read::warm_plan(&self.files, &before, &state);
        self.forget_replaced(&before, &state);
        if !plan.is_empty() {
            let (files, file_io, io) = (self.files.clone(), self.file_io.clone(), self.io.clone());
            tokio::spawn(async move { read::warm(&files, &file_io, &io, &state, plan).await });
        }
    }

    /// Drops what the read caches hold of files `before` had and `after` no longer has.
    fn forget_replaced(&self, before: &TableState, after: &TableState) {
        let live: HashSet<&str> = after.files.all_paths().collect();
        let gone: HashSet<&str> = before
            .files
            .all_paths()
            .filter(|p| !live.contains(p))
            .collect();
        self.files.forget(&gone);
    }

    /// The table as of at most `max_age` ago: served from cache while fresh, else one catalog
    /// lookup, and a metadata reload only when another writer committed.
    pub async fn current(&self, id: &TableId, max_age: Duration) -> Result<Arc<TableState>> {
        let cached = self.cached(id);
        if let Some(s) = &cached
            && s.checked_at.elapsed() < max_age
        {
            return Ok(s.clone());
        }
        let state = self.reload(id, cached).await?;
        self.install(state.clone());
        Ok(state)
    }

    /// The table for a read. The freshness check never runs on the request path: a stale
    /// cached state is served while a background task revalidates it, prepares the new files'
    /// indexes and hot row groups, and only then swaps the new state in (warm swap). Only a
    /// table never loaded, or `metadata_refresh_seconds = 0`, waits for the catalog.
    async fn current_for_read(self: &Arc<Self>, id: &TableId) -> Result<Arc<TableState>> {
        let refresh = self.config.metadata_refresh();
        match self.cached(id) {
            Some(s) if s.checked_at.elapsed() < refresh => Ok(s),
            Some(s) if !refresh.is_zero() => {
                self.refresh_in_background(id);
                Ok(s)
            }
            _ => self.current(id, refresh).await,
        }
    }

    fn refresh_in_background(self: &Arc<Self>, id: &TableId) {
        if !lock(&self.refreshing).insert(id.clone()) {
            return;
        }
        let (store, id) = (self.clone(), id.clone());
        tokio::spawn(async move {
            // The old state keeps serving; the next synchronous load reports a lasting error.
            if let Err(e) = store.refresh_warm(&id).await {
                log::warn!("table {id}: background metadata refresh failed: {e}");
            }
            lock(&store.refreshing).remove(&id);
        });
    }

    async fn refresh_warm(&self, id: &TableId) -> Result<()> {
        let before = self.cached(id);
        let after = self.reload(id, before.clone()).await?;
        if let Some(before) = &before
            && before.metadata_location != after.metadata_location
        {
            let plan = read::warm_plan(&self.files, before, &after);
            read::warm(&self.files, &self.file_io, &self.io, &after, plan).await;
        }
        let mut tables = lock(&self.tables);
        // Install unless another load (our own commit, say) installed something meanwhile.
        let unchanged = match (tables.get(id), &before) {
            (Some(now), Some(b)) => Arc::ptr_eq(now, b),
            (None, None) => true,
            _ => false,
        };
        if unchanged {
            tables.insert(id.clone(), after.clone());
            drop(tables);
            if let Some(before) = &before {
                self.forget_replaced(before, &after);
            }
        }
        Ok(())
    }

    /// The table as the catalog names it now, reusing what `cached` already holds.
    async fn reload(
        &self,
        id: &TableId,
        cached: Option<Arc<TableState>>,
    ) -> Result<Arc<TableState>> {
        let Some(loaded) = self.catalog().await?.load(id).await? else {
            self.forget(id);
            return Err(Error::TableNotFound(id.to_string()));
        };
        let known = cached.as_ref().map(|s| s.files.clone());
        let state = match (cached, loaded.metadata) {
            (Some(s), _) if s.metadata_location == loaded.location => Arc::new(TableState {
                id: s.id.clone(),
                metadata_location: loaded.location,
                metadata: s.metadata.clone(),
                layout: s.layout.clone(),
                files: s.files.clone(),
                checked_at: Instant::now(),
            }),
            // The catalog sent the metadata along: no need to read it from storage again.
            (_, Some(metadata)) => {
                let location = loaded.location.clone();
                match TableState::from_metadata(
                    &self.file_io,
                    &self.io.metadata,
                    id.clone(),
                    loaded.location,
                    Arc::from(metadata),
                    known.as_deref(),
                )
                .await
                {
                    Ok(state) => Arc::new(state),
                    // A manifest list or manifest vanished between the catalog's answer and our
                    // read: another writer committed and expired that snapshot. Load what the
                    // catalog names now; only if it still names the same metadata is the table
                    // damaged.
                    Err(Error::FileNotFound(detail)) => {
                        match self.catalog().await?.metadata_location(id).await? {
                            Some(now) if now != location => {
                                Arc::new(self.load_state(id, now, known.as_deref()).await?)
                            }
                            Some(_) => return Err(Error::corrupt(id, detail)),
                            None => return Err(Error::TableNotFound(id.to_string())),
                        }
                    }
                    Err(e) => return Err(e.in_table(id)),
                }
            }
            (_, None) => Arc::new(
                self.load_state(id, loaded.location, known.as_deref())
                    .await?,
            ),
        };
        self.remember_snapshot(&state);
        Ok(state)
    }

    /// Loads a metadata version. If it (or a manifest it names) vanished between the catalog
    /// lookup and the read, another writer replaced and expired it: load the one the catalog
    /// names now, a few times at most while writers keep committing.
    async fn load_state(
        &self,
        id: &TableId,
        mut location: String,
        known: Option<&SnapshotFiles>,
    ) -> Result<TableState> {
        for _ in 0..8 {
            match TableState::load(
                &self.file_io,
                &self.io.metadata,
                id.clone(),
                location.clone(),
                known,
            )
            .await
            {
                Err(Error::FileNotFound(detail)) => {
                    match self.catalog().await?.metadata_location(id).await? {
                        Some(now) if now != location => location = now,
                        Some(_) => return Err(Error::corrupt(id, detail)),
                        None => return Err(Error::TableNotFound(id.to_string())),
                    }
                }
                other => return other.map_err(|e| e.in_table(id)),
            }
        }
        Err(Error::catalog(format!(
            "{id} changed under every one of 8 loads (other writers committing and expiring)"
        )))
    }

    fn remember_snapshot(&self, state: &TableState) {
        if let Some(list) = &state.files.manifest_list {
            lock(&self.snapshots).insert(list.clone(), state.files.clone());
        }
    }

    /// The files of snapshot `snapshot_id` of `md`; manifests `known` holds are not read.
    pub(crate) async fn snapshot_files(
        &self,
        md: &TableMetadata,
        snapshot_id: i64,
        known: Option<&SnapshotFiles>,
    ) -> Result<Option<Arc<SnapshotFiles>>> {
        let Some(snapshot) = md.snapshot_by_id(snapshot_id) else {
            return Ok(None);
        };
        if let Some(hit) = lock(&self.snapshots).get(snapshot.manifest_list()) {
            return Ok(Some(hit.clone()));
        }
        let files = Arc::new(
            SnapshotFiles::load(&self.file_io, md, snapshot, &self.io.metadata, known).await?,
        );
        lock(&self.snapshots).insert(snapshot.manifest_list().to_string(), files.clone());
        Ok(Some(files))
    }

    pub(crate) fn expirable(&self, md: &TableMetadata, pending_new: bool) -> Vec<i64> {
        let grace_ms = i64::try_from(self.config.snapshot_grace().as_millis()).unwrap_or(i64::MAX);
        maintenance::expirable(
            md,
            pending_new,
            chrono::Utc::now().timestamp_millis(),
            self.config.snapshot_retention_count,
            grace_ms,
        )
    }

    /// The state a commit the catalog accepted produced, cached as the table's current one.
    pub(crate) async fn installed(
        &self,
        id: &TableId,
        loaded: Loaded,
        files: Option<Arc<SnapshotFiles>>,
    ) -> Result<Arc<TableState>> {
        // What the last state of the table knew of its manifests.
        let known = self.cached(id).map(|s| s.files.clone());
        let state = match (loaded.metadata, files) {
            (Some(metadata), Some(files)) => Arc::new(TableState::with_files(
                id.clone(),
                loaded.location,
                Arc::from(metadata),
                files,
            )?),
            (Some(metadata), None) => Arc::new(
                TableState::from_metadata(
                    &self.file_io,
                    &self.io.metadata,
                    id.clone(),
                    loaded.location,
                    Arc::from(metadata),
                    known.as_deref(),
                )
                .await?,
            ),
            (None, _) => Arc::new(
                self.load_state(id, loaded.location, known.as_deref())
                    .await?,
            ),
        };
        self.remember_snapshot(&state);
        self.install(state.clone());
        Ok(state)
    }

    /// Deletes metadata.json files that fell out of the log, unless the catalog manages them.
    pub(crate) async fn retire_metadata(&self, prepared: &PreparedCommit) {
        match self.catalog().await {
            Ok(catalog) if catalog.owns_metadata_files() => {}
            Ok(_) => {
                delete_quietly(&self.file_io, &prepared.table, &prepared.expired_metadata).await;
            }
            Err(e) => skipped_cleanup(
                &prepared.table,
                &prepared.expired_metadata,
                &format!("no catalog to ask whether it manages them: {e}"),
            ),
        }
    }

    /// Deletes what the commit made unreachable: files only expired snapshots referenced and
    /// metadata.json files beyond the log. Best effort: a failure leaves orphans, never damage.
    pub(crate) async fn after_commit(
        &self,
        before: &TableState,
        after: &TableState,
        prepared: &PreparedCommit,
        expired: &[i64],
    ) {
        self.forget_replaced(before, after);
        if !expired.is_empty() {
            let mut doomed: HashSet<String> = HashSet::new();
            for id in expired {
                match self
                    .snapshot_files(&before.metadata, *id, Some(&before.files))
                    .await
                {
                    Ok(Some(files)) => {
                        doomed.extend(files.manifest_list.iter().cloned());
                        doomed.extend(files.manifests.iter().map(|m| m.path().to_string()));
                        doomed.extend(files.data.iter().map(|f| f.path().to_string()));
                        doomed.extend(files.delete_paths.iter().cloned());
                    }
                    listed => skipped_cleanup(
                        &after.id,
                        &manifest_list_of(&before.metadata, *id),
                        &format!("cannot list expired snapshot {id}: {}", unlisted(&listed)),
                    ),
                }
            }
            for s in after.metadata.snapshots() {
                match self
                    .snapshot_files(&after.metadata, s.snapshot_id(), Some(&after.files))
                    .await
                {
                    Ok(Some(files)) => {
                        for p in files
                            .manifest_list
                            .iter()
                            .map(String::as_str)
                            .chain(files.manifests.iter().map(|m| m.path()))
                            .chain(files.data.iter().map(|f| f.path()))
                            .chain(files.delete_paths.iter().map(String::as_str))
                        {
                            doomed.remove(p);
                        }
                    }
                    // Unknown references: delete no data rather than guess.
                    listed => {
                        let doomed: Vec<String> = doomed.into_iter().collect();
                        let why = format!(
                            "cannot list what live snapshot {} ({}) still references: {}",
                            s.snapshot_id(),
                            s.manifest_list(),
                            unlisted(&listed)
                        );
                        skipped_cleanup(&after.id, &doomed, &why);
                        self.retire_metadata(prepared).await;
                        return;
                    }
                }
            }
            let doomed: Vec<String> = doomed.into_iter().collect();
            delete_quietly(&self.file_io, &after.id, &doomed).await;
            let mut snaps = lock(&self.snapshots);
            let live: HashSet<&str> = after
                .metadata
                .snapshots()
                .map(|s| s.manifest_list())
                .collect();
            snaps.retain(|k, _| live.contains(k.as_str()));
        }
        self.retire_metadata(prepared).await;
    }

    // ---- tables -------------------------------------------------------------------------

    pub async fn table_exists(&self, table: &str) -> Result<bool> {
        let id = self.table_id(table)?;
        Ok(self
            .catalog()
            .await?
            .metadata_location(&id)
            .await?
            .is_some())
    }

    fn table_properties(&self) -> HashMap<String, String> {
        let grace_ms = self.config.snapshot_grace().as_millis().to_string();
        [
            ("write.format.default", "parquet".to_string()),
            ("write.parquet.compression-codec", "lz4".to_string()),
            (
                "write.parquet.bloom-filter-enabled.column.entity_key",
                "true".to_string(),
            ),
            (
                "write.parquet.bloom-filter-fpp.column.entity_key",
                "0.05".to_string(),
            ),
            (
                "write.parquet.row-group-limit",
                schema::ROW_GROUP_ROWS.to_string(),
            ),
            (
                "write.parquet.page-row-limit",
                schema::ROW_GROUP_ROWS.to_string(),
            ),
            ("write.distribution-mode", "hash".to_string()),
            (
                "write.metadata.delete-after-commit.enabled",
                "true".to_string(),
            ),
            (
                "write.metadata.previous-versions-max",
                self.config.metadata_previous_versions_max.to_string(),
            ),
            (
                "history.expire.min-snapshots-to-keep",
                self.config.snapshot_retention_count.to_string(),
            ),
            ("history.expire.max-snapshot-age-ms", grace_ms),
            (PROP_BUCKETS, self.config.partition_count.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    fn new_metadata(
        &self,
        id: &TableId,
        join_keys: &[ColumnSpec],
        features: &[ColumnSpec],
    ) -> Result<TableMetadata> {
        let schema = schema::new_table_schema(join_keys, features)?;
        let key_id = schema
            .field_by_name(ENTITY_KEY)
            .ok_or_else(|| Error::internal("entity_key missing"))?
            .id;
        let spec = schema::bucket_spec(key_id, self.config.partition_count)?;
        let sort = SortOrder::builder()
            .with_order_id(1)
            .with_sort_field(
                SortField::builder()
                    .source_id(key_id)
                    .transform(Transform::Identity)
                    .direction(SortDirection::Ascending)
                    .null_order(NullOrder::First)
                    .build(),
            )
            .build_unbound()?;
        let declared = join_keys
            .iter()
            .chain(features)
            .map(|c| (c.name.clone(), c.value_type))
            .collect();
        let mut props = self.table_properties();
        props.extend(schema::type_properties(join_keys, &declared)?);
        let location = storage::table_location(&self.config, &id.namespace, &id.name);
        Ok(
            TableMetadataBuilder::new(schema, spec, sort, location, FormatVersion::V2, props)?
                .build()?
                .metadata,
        )
    }

    /// Creates the table, or evolves it: new features become new columns; a changed type is an
    /// error naming the column.
    pub async fn ensure_table(
        &self,
        table: &str,
        join_keys: &[ColumnSpec],
        features: &[ColumnSpec],
    ) -> Result<()> {
        let id = self.table_id(table)?;
        match self.current(&id, Duration::ZERO).await {
            Ok(_) => {}
            Err(Error::TableNotFound(_)) => {
                let md = self.new_metadata(&id, join_keys, features)?;
                let catalog = self.catalog().await?;
                catalog.ensure_namespace(&id.namespace).await?;
                if catalog.create(&id, &md, &self.file_io).await? {
                    return Ok(());
                }
                // Another process created it first: evolve theirs instead.
            }
            Err(e) => return Err(e),
        }
        commit::metadata_commit(self, &id, |state| {
            Ok(match Self::evolution(state, features)? {
                Some(updates) => Step::Commit(
                    Changes {
                        updates,
                        ..Changes::default()
                    },
                    (),
                ),
                None => Step::Done(()),
            })
        })
        .await
    }

    /// The metadata updates that add the missing feature columns, or None if there are none.
    fn evolution(state: &TableState, features: &[ColumnSpec]) -> Result<Option<Vec<TableUpdate>>> {
        let md = &state.metadata;
        let mut declared = schema::declared_types(md)?;
        let Some(new_schema) = schema::evolved_schema(
            md.current_schema(),
            &declared,
            features,
            md.last_column_id(),
        )?
        else {
            return Ok(None);
        };
        declared.extend(features.iter().map(|c| (c.name.clone(), c.value_type)));
        let existing_join: Vec<ColumnSpec> = state
            .layout
            .join_keys
            .iter()
            .map(|c| ColumnSpec {
                name: c.name.clone(),
                value_type: c.value_type,
            })
            .collect();
        Ok(Some(vec![
            TableUpdate::AddSchema { schema: new_schema },
            // -1: the schema added by this commit, whatever id the catalog gives it.
            TableUpdate::SetCurrentSchema { schema_id: -1 },
            TableUpdate::SetProperties {
                updates: schema::type_properties(&existing_join, &declared)?,
            },
        ]))
    }

    /// Unregisters the table and deletes its files. False if it did not exist.
    pub async fn drop_table(&self, table: &str) -> Result<bool> {
        let id = self.table_id(table)?;
        let location = self.catalog().await?.unregister(&id).await?;
        self.forget(&id);
        let Some(location) = location else {
            return Ok(false);
        };
        let Some((root, _)) = location.rsplit_once("/metadata/") else {
            return Err(Error::corrupt(
                &id,
                format!("odd metadata location {location}"),
            ));
        };
        self.file_io.delete_prefix(root).await?;
        // A migrated table lives where it was built (`<name>__migrating`), and the contrib
        // files it replaced stay at the default location: remove both.
        if self.config.catalog_type == CatalogType::Sql {
            let default_root = storage::table_location(&self.config, &id.namespace, &id.name);
            if root != default_root {
                self.file_io.delete_prefix(&default_root).await?;
            }
        }
        Ok(true)
    }

    // ---- data ---------------------------------------------------------------------------

    pub async fn write(
        self: &Arc<Self>,
        table: &str,
        input: &WriteInput<'_>,
    ) -> Result<WriteReport> {
        write::upsert(self, table, input).await
    }

    /// Point lookups, bounded by `read_timeout_ms` when one is configured. Rows with an event
    /// timestamp before `not_before` (micros) are returned as absent.
    pub async fn read(
        self: &Arc<Self>,
        table: &str,
        entity_keys: &[&[u8]],
        features: Option<&[String]>,
        not_before: Option<i64>,
    ) -> Result<ReadOutput> {
        self.bounded(table, entity_keys.len(), async {
            let id = self.table_id(table)?;
            let mut keys =
                LargeBinaryBuilder::with_capacity(entity_keys.len(), entity_keys.len() * 24);
            for k in entity_keys {
                keys.append_value(serialize_entity_key(&decode_entity_key(k)?)?);
            }
            let (state, hits) = self.find_rows(&id, &keys.finish(), not_before).await?;
            Ok(read::encode_rows(&state.layout, &hits, features))
        })
        .await
    }

    /// The lookups of several feature views for the same request rows, all in one call and
    /// concurrently, answered as Feast's `GetOnlineFeaturesResponse.results` (see
    /// `read::push_feature_vectors`), views in request order. `columns` holds the request's
    /// join-key columns, each row's value a serialized `Value`; each view names the ones its
    /// entity key is made of. Every view has its own `read_timeout_ms`, as with `read`.
    pub async fn read_views(
        self: &Arc<Self>,
        columns: &[Vec<&[u8]>],
        views: &[ViewRead],
    ) -> Result<ViewsOutput> {
        let mut out = ViewsOutput::default();
        self.read_views_into(&mut out, columns, views).await?;
        Ok(out)
    }

    /// A whole serialized `GetOnlineFeaturesResponse`: metadata listing `names`, a vector per
    /// request column (`read::push_response_head`), then `read_views`' vectors.
    pub async fn online_features(
        self: &Arc<Self>,
        names: &[String],
        columns: &[Vec<&[u8]>],
        views: &[ViewRead],
    ) -> Result<ViewsOutput> {
        let mut head = Vec::new();
        read::push_response_head(&mut head, names, columns);
        let mut out = ViewsOutput {
            parts: vec![head],
            ..ViewsOutput::default()
        };
        self.read_views_into(&mut out, columns, views).await?;
        Ok(out)
    }

    async fn read_views_into(
        self: &Arc<Self>,
        out: &mut ViewsOutput,
        columns: &[Vec<&[u8]>],
        views: &[ViewRead],
    ) -> Result<()> {
        let rows = columns.first().map_or(0, Vec::len);
        if columns.iter().any(|c| c.len() != rows) {
            return Err(Error::input("join-key columns differ in length"));
        }
        let decoded: Vec<Vec<Value>> = columns
            .iter()
            .map(|c| c.iter().map(|v| decode_value(v)).collect())
            .collect::<Result<_>>()?;
        if views.len() > 1 && rows >= PARALLEL_MIN_ROWS {
            // A task per view, so that both of the runtime's workers take views.
            let tasks = views
                .iter()
                .map(|view| {
                    let keys = view_keys(view, rows, &decoded)?;
                    let owned = key_feature_columns(view, columns);
                    let (store, view) = (Arc::clone(self), view.clone());
                    Ok(tokio::spawn(async move {
                        let columns: Vec<Vec<&[u8]>> = owned
                            .iter()
                            .map(|c| c.iter().map(Vec::as_slice).collect())
                            .collect();
                        let read = store.read_view(&view, &keys, &columns);
                        store.bounded(&view.table, rows, read).await
                    }))
                })
                .collect::<Result<Vec<_>>>()?;
            for task in tasks {
                let (results, present) = task
                    .await
                    .map_err(|e| Error::internal(format!("a view's read task failed: {e}")))??;
                out.parts.push(results);
                out.present.push(present);
            }
            return Ok(());
        }
        // Small requests are read on the caller's thread, the views concurrently within this
        // future: a warm read never waits, and waking a worker costs more than such a read.
        let reads = views
            .iter()
            .map(|view| {
                let keys = view_keys(view, rows, &decoded)?;
                Ok(async move {
                    let read = self.read_view(view, &keys, columns);
                    self.bounded(&view.table, rows, read).await
                })
            })
            .collect::<Result<Vec<_>>>()?;
        for (results, present) in futures::future::try_join_all(reads).await? {
            out.parts.push(results);
            out.present.push(present);
        }
        Ok(())
    }

    async fn read_view(
        self: &Arc<Self>,
        view: &ViewRead,
        keys: &LargeBinaryArray,
        columns: &[Vec<&[u8]>],
    ) -> Result<(Vec<u8>, u64)> {
        let id = self.table_id(&view.table)?;
        let (state, hits) = self.find_rows(&id, keys, view.not_before).await?;
        // About what a vector of scalars takes per row: a value, a status, a timestamp.
        let mut results = Vec::with_capacity(view.wanted.len() * (hits.len() * 32 + 8));
        // A join key asked for as a feature is answered from the request's own value.
        let key_value = |name: &str, row: usize| {
            let (_, column) = view.join_keys.iter().find(|(n, _)| n == name)?;
            Some(columns.get(*column)?[row])
        };
        let present =
            read::push_feature_vectors(&mut results, &state.layout, &hits, &view.wanted, key_value);
        Ok((results, present))
    }

    /// A read of `keys` keys of `table`, timed for the metrics and held to `read_timeout_ms`.
    async fn bounded<T>(
        &self,
        table: &str,
        keys: usize,
        read: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        let started = Instant::now();
        let out = self.with_deadline(table, started, read).await;
        let namespace = &self.config.namespace;
        metrics::read_done(namespace, table, keys, started.elapsed(), out.is_ok());
        out
    }

    /// `read_timeout_ms`, when one is configured. On a deadline the in-flight work is dropped
    /// (reads have no side effects besides filling caches).
    async fn with_deadline<T>(
        &self,
        table: &str,
        started: Instant,
        read: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        let Some(timeout_ms) = self.config.read_timeout_ms else {
            return read.await;
        };
        let deadline = Duration::from_millis(timeout_ms);
        let timed_out = || Error::ReadTimeout {
            table: table.to_string(),
            timeout_ms,
        };
        let out = tokio::time::timeout(deadline, read)
            .await
            .map_err(|_| timed_out())??;
        // Local-filesystem reads never yield to the timer, so a late result is caught here:
        // the deadline means the same on every storage.
        if started.elapsed() > deadline {
            return Err(timed_out());
        }
        Ok(out)
    }

    /// The newest live row of each serialized key, in the table's current state.
    async fn find_rows(
        self: &Arc<Self>,
        id: &TableId,
        keys: &LargeBinaryArray,
        not_before: Option<i64>,
    ) -> Result<(Arc<TableState>, Vec<Option<Hit>>)> {
        let state = self.current_for_read(id).await?;
        let find = |state: Arc<TableState>| async move {
            let (files, file_io, io) = (&self.files, &self.file_io, &self.io);
            let hits = read::find_rows(&state, files, file_io, io, keys, not_before).await?;
            Ok((state, hits))
        };
        match find(state).await {
            // A file vanished under us (expired by another process): refresh and retry once.
            Err(Error::FileNotFound(_)) => {
                let state = self.current(id, Duration::ZERO).await?;
                find(state).await.map_err(|e| e.missing_is_corrupt(id))
            }
            other => other.map_err(|e| e.in_table(id)),
        }
    }

    pub async fn stats(&self, table: &str) -> Result<TableStats> {
        let id = self.table_id(table)?;
        let state = self.current(&id, Duration::ZERO).await?;
        Ok(TableStats {
            snapshot_id: state.metadata.current_snapshot_id(),
            snapshots: state.metadata.snapshots().count(),
            data_files: state.files.data.len(),
            delete_files: state.files.delete_files,
            records: state
                .files
                .total_records()
                .saturating_sub(state.files.total_position_deletes()),
            position_deletes: state.files.total_position_deletes(),
            data_bytes: state.files.total_bytes(),
            buckets: state.layout.buckets,
            largest_bucket_bytes: write::largest_bucket_bytes(&state),
            metadata_location: state.metadata_location.clone(),
            metadata_log: state.metadata.metadata_log().len(),
        })
    }

    /// Expires snapshots past retention now, with a metadata-only commit. Returns how many
    /// snapshots were (on a dry run: would be) expired.
    pub async fn expire(&self, table: &str, dry_run: bool) -> Result<usize> {
        let id = self.table_id(table)?;
        commit::metadata_commit(self, &id, |state| {
            let expire = self.expirable(&state.metadata, false);
            let n = expire.len();
            Ok(if expire.is_empty() || dry_run {
                Step::Done(n)
            } else {
                Step::Commit(
                    Changes {
                        expire,
                        ..Changes::default()
                    },
                    n,
                )
            })
        })
        .await
    }
}
