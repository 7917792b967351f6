//! Local files. Deletes go to iceberg's own `LocalFsStorage`; reads are done here, because
//! `LocalFsStorage` turns every `io::Error` into message text and the read path must tell a
//! file that is gone (expired by another process: reload and retry) from one that is damaged
//! or unreadable, by the error's kind rather than its wording.
//!
//! Writes are done here too, without an fsync per file (`LocalFsStorage` syncs files written
//! through a writer and not those written in one call): a commit makes every file it is about
//! to publish durable in one parallel batch just before the catalog swap (`sync_files`), so
//! a commit costs about one fsync of latency however many files it wrote.

use std::io::{self, ErrorKind as IoKind};
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use iceberg::io::{
    FileMetadata, FileRead, FileWrite, InputFile, LocalFsStorage, OutputFile, Storage,
};
use iceberg::{Error as IcebergError, ErrorKind};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct LocalStorage;

/// `file:///p`, `file:/p` and `/p` -> `/p`, as `LocalFsStorage` reads them.
/// Collects the paths of every file under `dir`, relative to `root`, joined with '/'.
pub(super) fn walk(
    root: &std::path::Path,
    dir: &std::path::Path,
    out: &mut Vec<String>,
) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            walk(root, &path, out)?;
        } else if let Ok(rel) = path.strip_prefix(root) {
            let parts: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            out.push(parts.join("/"));
        }
    }
    Ok(())
}

fn local_path(path: &str) -> PathBuf {
    let stripped = path
        .strip_prefix("file://")
        .or_else(|| path.strip_prefix("file:"))
        .unwrap_or(path);
    if stripped.starts_with('/') {
        PathBuf::from(stripped)
    } else {
        PathBuf::from(format!("/{stripped}"))
    }
}

/// A missing file is typed; a file shorter than its metadata says is a damaged table.
fn from_io(path: &str, what: &str, e: &io::Error) -> IcebergError {
    match e.kind() {
        IoKind::NotFound => super::not_found(path),
        IoKind::UnexpectedEof => IcebergError::new(
            ErrorKind::DataInvalid,
            format!("{path} is shorter than expected: {e}"),
        ),
        _ => IcebergError::new(ErrorKind::Unexpected, format!("cannot {what} {path}: {e}")),
    }
}

#[async_trait]
#[typetag::serde]
impl Storage for LocalStorage {
    async fn exists(&self, path: &str) -> iceberg::Result<bool> {
        LocalFsStorage.exists(path).await
    }

    async fn metadata(&self, path: &str) -> iceberg::Result<FileMetadata> {
        let meta = std::fs::metadata(local_path(path)).map_err(|e| from_io(path, "stat", &e))?;
        Ok(FileMetadata { size: meta.len() })
    }

    async fn read(&self, path: &str) -> iceberg::Result<Bytes> {
        let bytes = std::fs::read(local_path(path)).map_err(|e| from_io(path, "read", &e))?;
        Ok(Bytes::from(bytes))
    }

    async fn reader(&self, path: &str) -> iceberg::Result<Box<dyn FileRead>> {
        let file = std::fs::File::open(local_path(path)).map_err(|e| from_io(path, "open", &e))?;
        Ok(Box::new(LocalRead {
            file,
            path: path.to_string(),
        }))
    }

    async fn write(&self, path: &str, bs: Bytes) -> iceberg::Result<()> {
        let local = local_path(path);
        create_parent(&local, path)?;
        std::fs::write(&local, &bs).map_err(|e| from_io(path, "write", &e))
    }

    async fn writer(&self, path: &str) -> iceberg::Result<Box<dyn FileWrite>> {
        let local = local_path(path);
        create_parent(&local, path)?;
        let file = std::fs::File::create(&local).map_err(|e| from_io(path, "create", &e))?;
        Ok(Box::new(LocalWrite {
            file: Some(io::BufWriter::with_capacity(256 * 1024, file)),
            path: path.to_string(),
        }))
    }

    async fn delete(&self, path: &str) -> iceberg::Result<()> {
        LocalFsStorage.delete(path).await
    }

    async fn delete_prefix(&self, path: &str) -> iceberg::Result<()> {
        LocalFsStorage.delete_prefix(path).await
    }

    async fn delete_stream(&self, paths: BoxStream<'static, String>) -> iceberg::Result<()> {
        LocalFsStorage.delete_stream(paths).await
    }

    // Input and output files must come back here for their reads, not go to LocalFsStorage.
    fn new_input(&self, path: &str) -> iceberg::Result<InputFile> {
        Ok(InputFile::new(Arc::new(*self), path.to_string()))
    }

    fn new_output(&self, path: &str) -> iceberg::Result<OutputFile> {
        Ok(OutputFile::new(Arc::new(*self), path.to_string()))
    }
}

fn create_parent(local: &std::path::Path, path: &str) -> iceberg::Result<()> {
    match local.parent() {
        Some(dir) => {
            std::fs::create_dir_all(dir).map_err(|e| from_io(path, "create the directory of", &e))
        }
        None => Ok(()),
    }
}

/// A file being written; durable only once `sync_files` has run on it.
struct LocalWrite {
    file: Option<io::BufWriter<std::fs::File>>,
    path: String,
}

#[async_trait]
impl FileWrite for LocalWrite {
    async fn write(&mut self, bs: Bytes) -> iceberg::Result<()> {
        use std::io::Write;
        let file = self.file.as_mut().ok_or_else(|| {
            IcebergError::new(ErrorKind::DataInvalid, format!("{} is closed", self.path))
        })?;
        file.write_all(&bs)
            .map_err(|e| from_io(&self.path, "write", &e))
    }

    async fn close(&mut self) -> iceberg::Result<()> {
        use std::io::Write;
        let mut file = self.file.take().ok_or_else(|| {
            IcebergError::new(ErrorKind::DataInvalid, format!("{} is closed", self.path))
        })?;
        file.flush().map_err(|e| from_io(&self.path, "write", &e))
    }
}

/// Makes local files durable: one fsync per file, all at once (a journaling file system
/// commits concurrent fsyncs together).
pub(super) async fn sync(paths: Vec<String>) -> crate::error::Result<()> {
    let syncs = paths.into_iter().map(|path| {
        tokio::task::spawn_blocking(move || {
            std::fs::File::open(local_path(&path))
                .and_then(|f| f.sync_all())
                .map_err(|e| crate::error::Error::storage(format!("cannot sync {path}: {e}")))
        })
    });
    for done in futures::future::join_all(syncs).await {
        done.map_err(|e| crate::error::Error::internal(format!("sync task failed: {e}")))??;
    }
    Ok(())
}

/// Positioned reads of one open file (no seek, so concurrent ranges need no lock). The file
/// stays readable after another process deletes it.
struct LocalRead {
    file: std::fs::File,
    path: String,
}

#[async_trait]
impl FileRead for LocalRead {
    async fn read(&self, range: Range<u64>) -> iceberg::Result<Bytes> {
        read_at(&self.file, &self.path, range)
    }
}

/// `range` of a local file, read on the calling thread: for work that is already on a
/// blocking thread (a read miss decoding there), where a trip through the async `FileRead`
/// would cost more than the read.
pub fn read_range(path: &str, range: Range<u64>) -> iceberg::Result<Bytes> {
    let file = std::fs::File::open(local_path(path)).map_err(|e| from_io(path, "open", &e))?;
    read_at(&file, path, range)
}

/// `range` of `file` into a fresh buffer. pread writes straight into the buffer's spare
/// capacity: zeroing it first (`vec![0; len]`) was ~5% of a read-miss-heavy process (`perf`).
fn read_at(file: &std::fs::File, path: &str, range: Range<u64>) -> iceberg::Result<Bytes> {
    use std::os::fd::AsRawFd;
    unsafe extern "C" {
        fn pread(fd: i32, buf: *mut u8, count: usize, offset: i64) -> isize;
    }
    let bad = || IcebergError::new(ErrorKind::DataInvalid, format!("bad range {range:?}"));
    let len =
        usize::try_from(range.end.checked_sub(range.start).ok_or_else(bad)?).map_err(|_| bad())?;
    let mut buf: Vec<u8> = Vec::with_capacity(len);
    while buf.len() < len {
        let offset = i64::try_from(range.start + buf.len() as u64).map_err(|_| bad())?;
        let spare = buf.spare_capacity_mut();
        // SAFETY: pread writes at most `spare.len()` bytes into the buffer's allocated,
        // unused capacity; only the bytes it reports written are then marked initialized.
        let n = unsafe {
            pread(
                file.as_raw_fd(),
                spare.as_mut_ptr().cast(),
                spare.len(),
                offset,
            )
        };
        match n {
            0 => {
                let e = io::Error::from(IoKind::UnexpectedEof);
                return Err(from_io(path, "read", &e));
            }
            n if n < 0 => {
                let e = io::Error::last_os_error();
                if e.kind() == IoKind::Interrupted {
                    continue;
                }
                return Err(from_io(path, "read", &e));
            }
            // SAFETY: the kernel initialized the next `n` (<= spare.len()) bytes.
            n => unsafe { buf.set_len(buf.len() + n.cast_unsigned()) },
        }
    }
    Ok(Bytes::from(buf))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;

    /// A fresh directory under the system temp dir (no tempfile crate: see Cargo.toml).
    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("feast-iceberg-{name}-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        crate::runtime::block_on(f).unwrap()
    }

    #[test]
    fn a_missing_file_is_typed_not_found() {
        let dir = scratch("missing");
        let path = format!("file://{}/gone.parquet", dir.display());
        let storage = LocalStorage;
        for result in [
            block_on(storage.read(&path)).map(|_| ()),
            block_on(storage.metadata(&path)).map(|_| ()),
            block_on(storage.reader(&path)).map(|_| ()),
        ] {
            let err = Error::from(result.unwrap_err());
            assert!(
                matches!(err, Error::FileNotFound(ref m) if m.contains("gone.parquet")),
                "{err}"
            );
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn an_unreadable_file_whose_path_says_not_found_is_not_missing() {
        // A directory where a data file should be: reading it fails, but the file is there.
        // Its path contains the words the old text match looked for.
        let dir = scratch("no such file");
        let path = dir.join("not found.parquet");
        std::fs::create_dir(&path).unwrap();
        let err = Error::from(block_on(LocalStorage.read(path.to_str().unwrap())).unwrap_err());
        assert!(matches!(err, Error::Storage(_)), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn reads_go_through_local_storage_and_round_trip() {
        let dir = scratch("roundtrip");
        let path = format!("file:{}/x.bin", dir.display());
        let input = LocalStorage.new_input(&path).unwrap();
        block_on(LocalStorage.write(&path, Bytes::from_static(b"abc"))).unwrap();
        assert_eq!(&block_on(input.read()).unwrap()[..], b"abc");
        block_on(LocalStorage.delete(&path)).unwrap();
        assert!(matches!(
            Error::from(block_on(input.read()).unwrap_err()),
            Error::FileNotFound(_)
        ));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
