//! FileIO for the warehouse: local files through iceberg's own `LocalFsStorage`, `s3://` through
//! our object_store-backed `S3Storage`. One FileIO serves both, routed by each path's scheme,
//! because a REST catalog decides table locations and a migrated table may point elsewhere.

mod local;
mod s3;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use iceberg::io::{
    FileIO, FileIOBuilder, FileMetadata, FileRead, FileWrite, InputFile, OutputFile, Storage,
    StorageConfig, StorageFactory,
};
use serde::{Deserialize, Serialize};

pub use local::LocalStorage;
pub use s3::S3Storage;

use crate::config::StoreConfig;
use crate::error::{Error, Result};

/// Schemes we can read and write.
fn is_s3(path: &str) -> bool {
    ["s3://", "s3a://", "s3n://"]
        .iter()
        .any(|p| path.starts_with(p))
}

/// True for object storage, where a request costs more than reading a little extra.
pub fn is_remote(path: &str) -> bool {
    is_s3(path)
}

/// Local files: `file:/...` or an absolute path.
pub fn is_local(path: &str) -> bool {
    path.starts_with("file:/") || path.starts_with('/')
}

/// `range` of the local file `path` (`is_local`), read on the calling thread: for work
/// already on a blocking thread. Counted in `io` like any read.
pub fn read_local_range(path: &str, range: std::ops::Range<u64>, io: &IoCounter) -> Result<Bytes> {
    let bytes = local::read_range(path, range)?;
    io.add(bytes.len());
    Ok(bytes)
}

/// Dispatches every call to the storage of the path's scheme.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Routed {
    #[serde(skip)]
    s3: S3Storage,
    #[serde(skip)]
    local: LocalStorage,
}

impl Routed {
    fn pick(&self, path: &str) -> iceberg::Result<&dyn Storage> {
        if is_s3(path) {
            Ok(&self.s3)
        } else if is_local(path) {
            Ok(&self.local)
        } else {
            Err(iceberg::Error::new(
                iceberg::ErrorKind::FeatureUnsupported,
                format!(
                    "unsupported storage scheme in {path} (use a local path, file:// or s3://)"
                ),
            ))
        }
    }
}

#[async_trait]
#[typetag::serde]
impl Storage for Routed {
    async fn exists(&self, path: &str) -> iceberg::Result<bool> {
        self.pick(path)?.exists(path).await
    }
    async fn metadata(&self, path: &str) -> iceberg::Result<FileMetadata> {
        self.pick(path)?.metadata(path).await
    }
    async fn read(&self, path: &str) -> iceberg::Result<Bytes> {
        self.pick(path)?.read(path).await
    }
    async fn reader(&self, path: &str) -> iceberg::Result<Box<dyn FileRead>> {
        self.pick(path)?.reader(path).await
    }
    async fn write(&self, path: &str, bs: Bytes) -> iceberg::Result<()> {
        self.pick(path)?.write(path, bs).await
    }
    async fn writer(&self, path: &str) -> iceberg::Result<Box<dyn FileWrite>> {
        self.pick(path)?.writer(path).await
    }
    async fn delete(&self, path: &str) -> iceberg::Result<()> {
        self.pick(path)?.delete(path).await
    }
    async fn delete_prefix(&self, path: &str) -> iceberg::Result<()> {
        self.pick(path)?.delete_prefix(path).await
    }
    async fn delete_stream(&self, mut paths: BoxStream<'static, String>) -> iceberg::Result<()> {
        use futures::StreamExt;
        while let Some(p) = paths.next().await {
            self.delete(&p).await?;
        }
        Ok(())
    }
    fn new_input(&self, path: &str) -> iceberg::Result<InputFile> {
        self.pick(path)?.new_input(path)
    }
    fn new_output(&self, path: &str) -> iceberg::Result<OutputFile> {
        self.pick(path)?.new_output(path)
    }
}

/// Hands FileIO our one storage; the props are already inside it.
#[derive(Debug, Default, Serialize, Deserialize)]
struct RoutedFactory {
    #[serde(skip)]
    storage: Arc<Routed>,
}

#[typetag::serde]
impl StorageFactory for RoutedFactory {
    fn build(&self, _config: &StorageConfig) -> iceberg::Result<Arc<dyn Storage>> {
        Ok(self.storage.clone())
    }
}

pub fn file_io(config: &StoreConfig) -> Result<FileIO> {
    let wh = config.warehouse.as_str();
    let rest = config.catalog_type == crate::config::CatalogType::Rest;
    if !(rest || wh.is_empty() || is_local(wh) || is_s3(wh)) {
        let scheme = wh.split("://").next().unwrap_or(wh);
        return Err(Error::config(format!(
            "warehouse scheme {scheme:?} is not supported; use a local path, file:// or s3://"
        )));
    }
    let s3_props: BTreeMap<String, String> = config
        .storage_options
        .iter()
        .filter(|(k, _)| k.starts_with("s3.") || k.starts_with("client."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let storage = Arc::new(Routed {
        s3: S3Storage::new(s3_props),
        local: LocalStorage,
    });
    Ok(FileIOBuilder::new(Arc::new(RoutedFactory { storage })).build())
}

/// Makes the files a commit is about to publish durable before the catalog points at them:
/// local files are fsynced, all at once; an object store's PUT is durable when it returns.
pub async fn sync_files(paths: impl IntoIterator<Item = String>) -> Result<()> {
    let local: Vec<String> = paths.into_iter().filter(|p| is_local(p)).collect();
    if local.is_empty() {
        return Ok(());
    }
    local::sync(local).await
}

/// Every file under the directory `dir` (recursively), as `dir/<relative path>`. A missing
/// directory holds no files.
pub async fn list_files(config: &StoreConfig, dir: &str) -> Result<Vec<String>> {
    let dir = dir.trim_end_matches('/');
    if is_s3(dir) {
        let s3_props: BTreeMap<String, String> = config
            .storage_options
            .iter()
            .filter(|(k, _)| k.starts_with("s3.") || k.starts_with("client."))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        return S3Storage::new(s3_props)
            .list(dir)
            .await
            .map_err(|e| Error::storage(format!("list {dir}: {e}")));
    }
    let root = std::path::PathBuf::from(dir.strip_prefix("file://").unwrap_or(dir));
    let found = crate::runtime::blocking(move || {
        let mut out = Vec::new();
        local::walk(&root, &root, &mut out).map(|()| out)
    })
    .await?;
    match found {
        Ok(rel) => Ok(rel.into_iter().map(|r| format!("{dir}/{r}")).collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(Error::storage(format!("list {dir}: {e}"))),
    }
}

/// `{warehouse}/{namespace}/{table}` like iceberg-rust's catalogs.
pub fn table_location(config: &StoreConfig, namespace: &str, table: &str) -> String {
    format!(
        "{}/{namespace}/{table}",
        config.warehouse.trim_end_matches('/')
    )
}

/// The table location a data or metadata file lives under (`<location>/data/...`), for messages
/// about a file whose table the caller does not know; the path itself when it has no such part.
pub fn table_root(path: &str) -> &str {
    path.rsplit_once("/data/")
        .or_else(|| path.rsplit_once("/metadata/"))
        .map_or(path, |(root, _)| root)
}

/// The marker our storages attach (as the source of an `iceberg::Error`) when a file does not
/// exist: a file expired by another process reads as "reload and retry", not as corruption,
/// and no error text is ever parsed to tell.
#[derive(Debug, thiserror::Error)]
#[error("file not found: {path}")]
pub struct NotFound {
    pub path: String,
}

/// The error a storage returns for a missing file.
pub(crate) fn not_found(path: &str) -> iceberg::Error {
    iceberg::Error::new(iceberg::ErrorKind::Unexpected, format!("not found: {path}")).with_source(
        NotFound {
            path: path.to_string(),
        },
    )
}

/// True when `err`, or an error it wraps (parquet and arrow readers wrap storage errors),
/// is our typed `NotFound`.
pub fn is_not_found(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(err);
    while let Some(e) = current {
        if e.is::<NotFound>() {
            return true;
        }
        current = e.source();
    }
    false
}

/// Bytes and requests of one kind of read, for the bench and `stats`. `reset` moves a baseline
/// instead of zeroing, so the totals the metrics report never go down.
#[derive(Debug, Default)]
pub struct IoCounter {
    bytes: AtomicU64,
    requests: AtomicU64,
    base_bytes: AtomicU64,
    base_requests: AtomicU64,
}

impl IoCounter {
    pub fn add(&self, bytes: usize) {
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// (bytes, requests) since the last reset.
    pub fn get(&self) -> (u64, u64) {
        let (bytes, requests) = self.total();
        (
            bytes.saturating_sub(self.base_bytes.load(Ordering::Relaxed)),
            requests.saturating_sub(self.base_requests.load(Ordering::Relaxed)),
        )
    }

    /// (bytes, requests) since the store was made.
    pub fn total(&self) -> (u64, u64) {
        (
            self.bytes.load(Ordering::Relaxed),
            self.requests.load(Ordering::Relaxed),
        )
    }

    fn reset(&self) {
        let (bytes, requests) = self.total();
        self.base_bytes.store(bytes, Ordering::Relaxed);
        self.base_requests.store(requests, Ordering::Relaxed);
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
