//! S3 (and S3-compatible servers) behind iceberg's public `Storage` trait, through `object_store`.
//!
//! iceberg-rust 0.10 ships only local and in-memory storage in its core crate; its opendal
//! backend would bring a second HTTP stack (reqwest 0.13). object_store is already here for
//! parquet's ranged reads, so it serves S3 too. Settings use PyIceberg's property names, so a
//! user's `storage_options` work unchanged for both; AWS_* environment variables fill the rest.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use iceberg::io::{FileMetadata, FileRead, FileWrite, InputFile, OutputFile, Storage};
use iceberg::{Error as IcebergError, ErrorKind};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};

/// PyIceberg's S3 property names.
const ENDPOINT: &str = "s3.endpoint";
const ACCESS_KEY: &str = "s3.access-key-id";
const SECRET_KEY: &str = "s3.secret-access-key";
const SESSION_TOKEN: &str = "s3.session-token";
const REGION: &str = "s3.region";
const PATH_STYLE: &str = "s3.path-style-access";

/// One object_store client per bucket, built on first use from the store's settings.
#[derive(Clone, Default, Serialize, Deserialize)]
pub struct S3Storage {
    // Never serialized: the settings hold credentials (typetag requires the trait bound only).
    #[serde(skip)]
    props: Arc<BTreeMap<String, String>>,
    #[serde(skip)]
    buckets: Arc<Mutex<HashMap<String, Arc<AmazonS3>>>>,
}

impl std::fmt::Debug for S3Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Storage")
            .field("endpoint", &self.props.get(ENDPOINT))
            .field("region", &self.props.get(REGION))
            .finish_non_exhaustive()
    }
}

fn err(kind: ErrorKind, msg: impl Into<String>) -> IcebergError {
    IcebergError::new(kind, msg)
}

/// object_store errors carry URLs but no credentials; a missing object becomes our typed
/// not-found, so a file expired by another process reads as a conflict, not corruption.
fn from_store(path: &str, e: &object_store::Error) -> IcebergError {
    match e {
        object_store::Error::NotFound { .. } => super::not_found(path),
        other => err(ErrorKind::Unexpected, format!("s3 {path}: {other}")),
    }
}

impl S3Storage {
    pub fn new(props: BTreeMap<String, String>) -> Self {
        Self {
            props: Arc::new(props),
            buckets: Arc::default(),
        }
    }

    fn is_true(&self, key: &str) -> bool {
        self.props
            .get(key)
            .is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "true" | "1" | "yes"))
    }

    fn client(&self, bucket: &str) -> Result<Arc<AmazonS3>, IcebergError> {
        let mut clients = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(c) = clients.get(bucket) {
            return Ok(c.clone());
        }
        let mut b = AmazonS3Builder::from_env().with_bucket_name(bucket);
        if let Some(v) = self.props.get(ENDPOINT) {
            b = b.with_endpoint(v).with_allow_http(v.starts_with("http://"));
        }
        if let Some(v) = self.props.get(ACCESS_KEY) {
            b = b.with_access_key_id(v);
        }
        if let Some(v) = self.props.get(SECRET_KEY) {
            b = b.with_secret_access_key(v);
        }
        if let Some(v) = self.props.get(SESSION_TOKEN) {
            b = b.with_token(v);
        }
        if let Some(v) = self
            .props
            .get(REGION)
            .or_else(|| self.props.get("client.region"))
        {
            b = b.with_region(v);
        }
        // Custom endpoints (MinIO, SeaweedFS, ...) rarely resolve bucket subdomains.
        let path_style = match self.props.get(PATH_STYLE) {
            Some(_) => self.is_true(PATH_STYLE),
            None => self.props.contains_key(ENDPOINT),
        };
        b = b.with_virtual_hosted_style_request(!path_style);
        let client = Arc::new(b.build().map_err(|e| {
            err(
                ErrorKind::DataInvalid,
                format!("cannot configure S3 for bucket {bucket}: {e}"),
            )
        })?);
        clients.insert(bucket.to_string(), client.clone());
        Ok(client)
    }

    /// `s3://bucket/key` -> (client of bucket, key).
    /// Every object under the "directory" `dir` (an `s3://bucket/prefix`), as full URIs.
    pub async fn list(&self, dir: &str) -> Result<Vec<String>, IcebergError> {
        let (store, key) = self.locate(dir)?;
        let scheme_bucket = &dir[..dir.len() - key.as_ref().len()];
        let scheme_bucket = scheme_bucket.trim_end_matches('/');
        store
            .list(Some(&key))
            .map_ok(|meta| format!("{scheme_bucket}/{}", meta.location))
            .try_collect()
            .await
            .map_err(|e| from_store(dir, &e))
    }

    fn locate(&self, path: &str) -> Result<(Arc<AmazonS3>, Path), IcebergError> {
        let rest = ["s3://", "s3a://", "s3n://"]
            .iter()
            .find_map(|p| path.strip_prefix(p))
            .ok_or_else(|| err(ErrorKind::DataInvalid, format!("not an s3:// path: {path}")))?;
        let (bucket, key) = rest
            .split_once('/')
            .ok_or_else(|| err(ErrorKind::DataInvalid, format!("no key in {path}")))?;
        let key = Path::parse(key).map_err(|e| {
            err(
                ErrorKind::DataInvalid,
                format!("bad object key {path}: {e}"),
            )
        })?;
        Ok((self.client(bucket)?, key))
    }
}

#[async_trait]
#[typetag::serde]
impl Storage for S3Storage {
    async fn exists(&self, path: &str) -> iceberg::Result<bool> {
        let (store, key) = self.locate(path)?;
        match store.head(&key).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(from_store(path, &e)),
        }
    }

    async fn metadata(&self, path: &str) -> iceberg::Result<FileMetadata> {
        let (store, key) = self.locate(path)?;
        let meta = store.head(&key).await.map_err(|e| from_store(path, &e))?;
        Ok(FileMetadata { size: meta.size })
    }

    async fn read(&self, path: &str) -> iceberg::Result<Bytes> {
        let (store, key) = self.locate(path)?;
        let got = store.get(&key).await.map_err(|e| from_store(path, &e))?;
        got.bytes().await.map_err(|e| from_store(path, &e))
    }

    async fn reader(&self, path: &str) -> iceberg::Result<Box<dyn FileRead>> {
        let (store, key) = self.locate(path)?;
        Ok(Box::new(S3Read {
            store,
            key,
            path: path.to_string(),
        }))
    }

    async fn write(&self, path: &str, bs: Bytes) -> iceberg::Result<()> {
        let (store, key) = self.locate(path)?;
        store
            .put(&key, PutPayload::from(bs))
            .await
            .map_err(|e| from_store(path, &e))?;
        Ok(())
    }

    async fn writer(&self, path: &str) -> iceberg::Result<Box<dyn FileWrite>> {
        let (store, key) = self.locate(path)?;
        Ok(Box::new(S3Write {
            store,
            key,
            path: path.to_string(),
            parts: Vec::new(),
            closed: false,
        }))
    }

    async fn delete(&self, path: &str) -> iceberg::Result<()> {
        let (store, key) = self.locate(path)?;
        match store.delete(&key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(from_store(path, &e)),
        }
    }

    async fn delete_prefix(&self, path: &str) -> iceberg::Result<()> {
        let (store, key) = self.locate(path.trim_end_matches('/'))?;
        let listed = store.list(Some(&key)).map_ok(|meta| meta.location).boxed();
        store
            .delete_stream(listed)
            .try_collect::<Vec<_>>()
            .await
            .map_err(|e| from_store(path, &e))?;
        Ok(())
    }

    async fn delete_stream(&self, mut paths: BoxStream<'static, String>) -> iceberg::Result<()> {
        while let Some(p) = paths.next().await {
            self.delete(&p).await?;
        }
        Ok(())
    }

    fn new_input(&self, path: &str) -> iceberg::Result<InputFile> {
        Ok(InputFile::new(Arc::new(self.clone()), path.to_string()))
    }

    fn new_output(&self, path: &str) -> iceberg::Result<OutputFile> {
        Ok(OutputFile::new(Arc::new(self.clone()), path.to_string()))
    }
}

/// Ranged GETs: the read path asks for footers and single pages, never whole objects.
struct S3Read {
    store: Arc<AmazonS3>,
    key: Path,
    path: String,
}

#[async_trait]
impl FileRead for S3Read {
    async fn read(&self, range: Range<u64>) -> iceberg::Result<Bytes> {
        self.store
            .get_range(&self.key, range)
            .await
            .map_err(|e| from_store(&self.path, &e))
    }
}

/// Buffers the file and uploads it with one PUT on close, so a failed write never leaves a
/// partial object behind. Our files are bucket-sized (a few MB); S3 takes up to 5 GB per PUT.
struct S3Write {
    store: Arc<AmazonS3>,
    key: Path,
    path: String,
    parts: Vec<Bytes>,
    closed: bool,
}

#[async_trait]
impl FileWrite for S3Write {
    async fn write(&mut self, bs: Bytes) -> iceberg::Result<()> {
        if self.closed {
            return Err(err(
                ErrorKind::Unexpected,
                format!("{} is closed", self.path),
            ));
        }
        self.parts.push(bs);
        Ok(())
    }

    async fn close(&mut self) -> iceberg::Result<()> {
        if self.closed {
            return Err(err(
                ErrorKind::Unexpected,
                format!("{} is closed", self.path),
            ));
        }
        self.closed = true;
        let payload: PutPayload = std::mem::take(&mut self.parts).into_iter().collect();
        self.store
            .put(&self.key, payload)
            .await
            .map_err(|e| from_store(&self.path, &e))?;
        Ok(())
    }
}
