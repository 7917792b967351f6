//! FileIO for the warehouse. Local filesystem for now: iceberg's own `LocalFsStorage`.
//! S3 arrives with the object_store-backed `Storage` (issue: real catalogs and object storage).

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
