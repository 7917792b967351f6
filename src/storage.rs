//! FileIO for the warehouse. Local filesystem for now: iceberg's own `LocalFsStorage`.
//! S3 arrives with the object_store-backed `Storage` (issue: real catalogs and object storage).

use std::sync::atomic::{AtomicU64, Ordering};

use iceberg::io::FileIO;

use crate::config::StoreConfig;
use crate::error::{Error, Result};

pub fn file_io(config: &StoreConfig) -> Result<FileIO> {
    let wh = config.warehouse.as_str();
    if wh.starts_with("file:/") || wh.starts_with('/') {
        return Ok(FileIO::new_with_fs());
    }
    let scheme = wh.split("://").next().unwrap_or(wh);
    Err(Error::config(format!(
        "warehouse scheme {scheme:?} is not supported yet; use a local path or file:// URI"
    )))
}

/// `{warehouse}/{namespace}/{table}` like iceberg-rust's catalogs.
pub fn table_location(config: &StoreConfig, namespace: &str, table: &str) -> String {
    format!(
        "{}/{namespace}/{table}",
        config.warehouse.trim_end_matches('/')
    )
}

/// True when an error means the file is gone (deleted by expiry in another process).
pub fn is_not_found(err: &iceberg::Error) -> bool {
    let text = format!("{err:#}").to_ascii_lowercase();
    text.contains("not found") || text.contains("no such file")
}

/// Bytes and requests of one kind of read, for the bench and `stats`.
#[derive(Debug, Default)]
pub struct IoCounter {
    bytes: AtomicU64,
    requests: AtomicU64,
}

impl IoCounter {
    pub fn add(&self, bytes: usize) {
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// (bytes, requests) so far.
    pub fn get(&self) -> (u64, u64) {
        (
            self.bytes.load(Ordering::Relaxed),
            self.requests.load(Ordering::Relaxed),
        )
    }

    fn reset(&self) {
        self.bytes.store(0, Ordering::Relaxed);
        self.requests.store(0, Ordering::Relaxed);
    }
}

/// What a store has read from the warehouse: table metadata (metadata.json, manifest lists,
/// manifests), data read to answer requests, and data loaded into the cache in the background.
#[derive(Debug, Default)]
pub struct IoStats {
    pub metadata: IoCounter,
    pub data: IoCounter,
    pub prefetch: IoCounter,
}

impl IoStats {
    pub fn reset(&self) {
        for c in [&self.metadata, &self.data, &self.prefetch] {
            c.reset();
        }
    }
}
