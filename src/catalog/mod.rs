//! Catalog access: where each table's current metadata.json lives, and the atomic swap that
//! commits a new one. Only these few operations are needed: table metadata itself is read and
//! written through FileIO by the rest of the core.

mod sql;

use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;

use crate::config::{CatalogType, StoreConfig};
use crate::error::{Error, Result};

/// Namespace + table name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TableId {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for TableId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.namespace, self.name)
    }
}

#[async_trait]
pub trait Catalog: Send + Sync + Debug {
    /// Creates the namespace if it does not exist.
    async fn ensure_namespace(&self, namespace: &str) -> Result<()>;
    /// The current metadata location, or None when the table is not registered.
    async fn metadata_location(&self, table: &TableId) -> Result<Option<String>>;
    /// Registers a new table; false if one with that name already exists.
    async fn register(&self, table: &TableId, metadata_location: &str) -> Result<bool>;
    /// Atomically replaces `expected` by `new`; false (a conflict) if the table moved on.
    async fn swap(&self, table: &TableId, expected: &str, new: &str) -> Result<bool>;
    /// Removes the table; returns its last metadata location if it existed.
    async fn unregister(&self, table: &TableId) -> Result<Option<String>>;
}

pub async fn connect(config: &StoreConfig) -> Result<Arc<dyn Catalog>> {
    match config.catalog_type {
        CatalogType::Sql => Ok(Arc::new(sql::SqlCatalog::connect(config).await?)),
        CatalogType::Rest => Err(Error::config(
            "catalog_type 'rest' is not supported yet in this version; use catalog_type 'sql'",
        )),
    }
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
    }
}
