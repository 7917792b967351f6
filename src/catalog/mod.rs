//! Catalog access: where each table's current metadata.json lives, and the atomic swap that
//! commits a new one. Only these few operations are needed: table metadata itself is read and
//! written through FileIO by the rest of the core.

mod rest;
mod sql;

use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;
use iceberg::io::FileIO;
use iceberg::spec::TableMetadata;

use crate::commit::PreparedCommit;
use crate::config::{CatalogType, StoreConfig};
use crate::error::{Error, Result};
use crate::table::TableState;

/// Namespace + table name. A namespace may have levels separated by dots (`team.feast`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TableId {
    pub namespace: String,
    pub name: String,
}

impl TableId {
    pub fn namespace_levels(&self) -> Vec<&str> {
        self.namespace.split('.').collect()
    }
}

impl std::fmt::Display for TableId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.namespace, self.name)
    }
}

/// Where a table's current metadata lives, and the metadata itself when the catalog sent it
/// along (REST does; SQL catalogs only store the location).
#[derive(Debug)]
pub struct Loaded {
    pub location: String,
    pub metadata: Option<Box<TableMetadata>>,
}

/// How a commit attempt ended.
#[derive(Debug)]
pub enum CommitOutcome {
    Committed(Loaded),
    /// Another writer committed first; nothing of ours is visible.
    Conflict,
    /// The catalog failed without saying whether it applied the commit (REST 5xx, timeout):
    /// the caller must reload before anything else and must not delete files it wrote.
    Unknown(String),
}

/// Held while a writer commits: writers of one catalog that take it commit one at a time
/// instead of racing (a lost race costs a reload, a new snapshot and a retry; the queue costs
/// a wait). What it holds is the catalog's own (a database transaction, say); the commit made
/// under it ends it, `unlock` ends it without one.
pub struct CommitLock(Box<dyn std::any::Any + Send>);

impl CommitLock {
    pub fn new(inner: impl std::any::Any + Send) -> Self {
        Self(Box::new(inner))
    }

    pub fn into_inner<T: 'static>(self) -> Option<T> {
        self.0.downcast::<T>().ok().map(|b| *b)
    }
}

impl Debug for CommitLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CommitLock")
    }
}

#[async_trait]
pub trait Catalog: Send + Sync + Debug {
    /// Creates the namespace (every level of it) if it does not exist.
    async fn ensure_namespace(&self, namespace: &str) -> Result<()>;
    /// The current metadata, or None when the table is not registered.
    async fn load(&self, table: &TableId) -> Result<Option<Loaded>>;
    /// Creates a table whose first metadata is `metadata`; false if the name is taken.
    async fn create(
        &self,
        table: &TableId,
        metadata: &TableMetadata,
        file_io: &FileIO,
    ) -> Result<bool>;
    /// Commits `prepared` on top of `base`, atomically or not at all; inside `lock` (taken
    /// with `lock`, ended by this call) when given.
    async fn commit(
        &self,
        base: &TableState,
        prepared: &PreparedCommit,
        file_io: &FileIO,
        lock: Option<CommitLock>,
    ) -> Result<CommitOutcome>;
    /// Waits for the table's commit lock; None when the catalog has none (REST: the server
    /// decides, commits stay optimistic). Writers that do not take it (other engines) still
    /// race, and the commit stays conditional.
    async fn lock(&self, _table: &TableId) -> Result<Option<CommitLock>> {
        Ok(None)
    }
    /// Whether `lock` takes a lock (commits of this store then never race each other).
    fn locks_commits(&self) -> bool {
        false
    }
    /// The table's commit lock if it is free now (`Ok(None)`: taken by another writer);
    /// `Ok(Some(None))` when the catalog has none. A writer that must wait starts its slow
    /// work (syncing its files) first.
    async fn try_lock(&self, table: &TableId) -> Result<Option<Option<CommitLock>>> {
        self.lock(table).await.map(Some)
    }
    /// Ends `lock` without committing.
    async fn unlock(&self, _lock: CommitLock) {}
    /// Why `swap` cannot work on this catalog, or None if it can. Migration asks before it
    /// stages anything.
    fn swap_unsupported(&self) -> Option<String> {
        None
    }
    /// Points `table` at metadata another table wrote (migration); false on a conflict.
    async fn swap(&self, table: &TableId, expected: &str, new: &str) -> Result<bool>;
    /// Removes the table from the catalog; returns its last metadata location if it existed.
    async fn unregister(&self, table: &TableId) -> Result<Option<String>>;
    /// True when the catalog writes and retires metadata.json files itself (REST): we then
    /// never delete one.
    fn owns_metadata_files(&self) -> bool;

    async fn metadata_location(&self, table: &TableId) -> Result<Option<String>> {
        Ok(self.load(table).await?.map(|l| l.location))
    }
}

pub async fn connect(config: &StoreConfig) -> Result<Arc<dyn Catalog>> {
    match config.catalog_type {
        CatalogType::Sql => Ok(Arc::new(sql::SqlCatalog::connect(config).await?)),
        CatalogType::Rest => Ok(Arc::new(rest::RestCatalog::connect(config).await?)),
    }
}

/// A namespace: one or more valid names joined by dots.
pub fn validate_namespace(namespace: &str) -> Result<()> {
    namespace
        .split('.')
        .try_for_each(|level| validate_name("namespace level", level))
        .map_err(|e| e.context(format!("namespace {namespace:?}")))
}

/// Names become path segments and catalog keys: keep them to a safe alphabet.
pub fn validate_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(Error::config(format!(
            "{what} {name:?} must be 1-255 characters of A-Z, a-z, 0-9, '_' or '-'"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated() {
        assert!(validate_name("table", "proj_driver_stats_online").is_ok());
        assert!(validate_name("table", "").is_err());
        assert!(validate_name("table", "a/../b").is_err());
        assert!(validate_name("table", "a.b").is_err());
        assert!(validate_namespace("team.feast").is_ok());
        assert!(validate_namespace("team..feast").is_err());
        assert!(validate_namespace(".feast").is_err());
    }
}
