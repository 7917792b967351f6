//! The Iceberg JDBC catalog schema on SQLite or PostgreSQL, the one PyIceberg's SqlCatalog and
//! Java's JdbcCatalog use, so they see our tables. A commit is one conditional UPDATE: zero rows
//! affected means another writer committed first.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::any::{AnyPoolOptions, install_default_drivers};
use sqlx::{AnyPool, Executor, Row};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use iceberg::MetadataLocation;
use iceberg::io::FileIO;
use iceberg::spec::TableMetadata;

use super::{Catalog, CommitLock, CommitOutcome, Loaded, TableId};
use crate::commit::{PreparedCommit, delete_quietly};
use crate::config::{StoreConfig, redact_uri};
use crate::error::{Error, Result};
use crate::table::TableState;

const CREATE_TABLES: &str = "CREATE TABLE IF NOT EXISTS iceberg_tables (
    catalog_name VARCHAR(255) NOT NULL,
    table_namespace VARCHAR(255) NOT NULL,
    table_name VARCHAR(255) NOT NULL,
    metadata_location VARCHAR(1000),
    previous_metadata_location VARCHAR(1000),
    iceberg_type VARCHAR(5),
    PRIMARY KEY (catalog_name, table_namespace, table_name))";

const CREATE_NAMESPACES: &str = "CREATE TABLE IF NOT EXISTS iceberg_namespace_properties (
    catalog_name VARCHAR(255) NOT NULL,
    namespace VARCHAR(255) NOT NULL,
    property_key VARCHAR(255) NOT NULL,
    property_value VARCHAR(1000) NOT NULL,
    PRIMARY KEY (catalog_name, namespace, property_key))";

/// Connections to PostgreSQL per store.
const MAX_PG: usize = 4;

/// How long a SQLite writer waits for a table's commit lock (SQLite's own busy timeout).
const SQLITE_LOCK_WAIT: Duration = Duration::from_secs(30);

pub struct SqlCatalog {
    pool: AnyPool,
    name: String,
    shown_uri: String,
    /// SQLite: the directory of the tables' commit lock files, next to the database.
    lock_dir: Option<PathBuf>,
    /// PostgreSQL commit locks this process may hold at once: each holds a connection, and
    /// loads need one too.
    lock_slots: Arc<Semaphore>,
}

/// A commit lock.
enum SqlLock {
    /// SQLite: an exclusive `flock` on the table's lock file. A writer waiting for it sleeps
    /// in the kernel and wakes when it is released. SQLite's own write lock (`BEGIN
    /// IMMEDIATE`, held for the whole prepare) was waited for by polling with sleeps of up to
    /// 100 ms: with 4 processes pushing, waits stretched to a second (p99) while the lock sat
    /// free, and writers of different tables queued on the one database lock. The swap is
    /// then one short statement of its own.
    File(std::fs::File),
    /// PostgreSQL: an advisory lock on the table, held by the transaction the swap runs in.
    Tx {
        tx: sqlx::Transaction<'static, sqlx::Any>,
        _slot: OwnedSemaphorePermit,
    },
}

impl std::fmt::Debug for SqlCatalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlCatalog")
            .field("name", &self.name)
            .field("uri", &self.shown_uri)
            .finish_non_exhaustive()
    }
}

/// sqlx URL for a catalog URI. Users write SQLAlchemy's forms (the contrib store handed the URI
/// to PyIceberg): `sqlite:////abs/path.db`, `postgresql+psycopg2://...`.
fn sqlx_url(uri: &str) -> Result<String> {
    if let Some(path) = uri.strip_prefix("sqlite:///") {
        let (path, _query) = path.split_once('?').unwrap_or((path, ""));
        if path.is_empty() {
            return Err(Error::config("sqlite catalog URI has no file path"));
        }
        // `sqlite:////abs` is absolute; `sqlite:///rel` relative to the working directory.
        return Ok(format!("sqlite://{path}?mode=rwc"));
    }
    if uri == "sqlite://" || uri.starts_with("sqlite://:memory:") {
        return Err(Error::config(
            "an in-memory sqlite catalog would vanish with the process; give a file path",
        ));
    }
    for prefix in ["postgresql", "postgres"] {
        if let Some(rest) = uri.strip_prefix(prefix)
            && let Some(pos) = rest.find("://")
            && (pos == 0 || rest.starts_with('+'))
        {
            return Ok(format!("postgres://{}", &rest[pos + 3..]));
        }
    }
    Err(Error::config(format!(
        "unsupported SQL catalog URI {} (use sqlite:///path or postgresql://...)",
        redact_uri(uri)
    )))
}

/// The directory of the commit lock files of a SQLite database (sqlx URL), next to it.
fn lock_dir(url: &str) -> Option<PathBuf> {
    let path = url.strip_prefix("sqlite://")?;
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    Some(PathBuf::from(format!("{path}.locks")))
}

/// Opens (creates) a lock file. Lock files are never deleted: a writer locking a file another
/// just unlinked would not exclude the next one.
fn open_lock_file(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
}

/// An exclusive lock on `path` if no one holds it now (else None).
fn try_lock_file(path: &std::path::Path) -> std::io::Result<Option<std::fs::File>> {
    let file = open_lock_file(path)?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

/// Waits for an exclusive lock on `path`.
async fn lock_file(path: PathBuf) -> std::io::Result<std::fs::File> {
    let locked = tokio::task::spawn_blocking(move || {
        let file = open_lock_file(&path)?;
        // Released when the file is closed: by the commit, or by the kernel if the process
        // dies. Given up waiting (timeout), the file is dropped as soon as it is locked.
        file.lock()?;
        Ok(file)
    });
    match tokio::time::timeout(SQLITE_LOCK_WAIT, locked).await {
        Ok(done) => done.map_err(std::io::Error::other)?,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("waited {} s", SQLITE_LOCK_WAIT.as_secs()),
        )),
    }
}

impl SqlCatalog {
    /// SQLite: the table's commit lock file.
    fn lock_file_of(&self, table: &TableId) -> Option<PathBuf> {
        let dir = self.lock_dir.as_ref()?;
        Some(dir.join(format!("{}.{}.lock", table.namespace, table.name)))
    }

    fn lock_err(&self, table: &TableId, path: &std::path::Path, e: &std::io::Error) -> Error {
        Error::catalog(format!(
            "lock {table} for a commit in catalog {} ({}): {e}",
            self.name,
            path.display()
        ))
    }

    /// PostgreSQL: a transaction holding the table's advisory lock, waited for when `wait`
    /// (else None when another session holds it).
    async fn advisory_lock(&self, table: &TableId, wait: bool) -> Result<Option<SqlLock>> {
        let what = format!("lock {table} for a commit");
        let slot = self
            .lock_slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| Error::internal(format!("commit lock slots closed: {e}")))?;
        let mut tx = self.pool.begin().await.map_err(|e| self.err(&what, &e))?;
        let key = format!(
            "feast-iceberg/{}/{}/{}",
            self.name, table.namespace, table.name
        );
        let sql = if wait {
            "SELECT true FROM (SELECT pg_advisory_xact_lock(hashtextextended($1, 0))) AS l"
        } else {
            "SELECT pg_try_advisory_xact_lock(hashtextextended($1, 0))"
        };
        let locked = sqlx::query(sql)
            .bind(key)
            .fetch_one(&mut *tx)
            .await
            .and_then(|row| row.try_get::<bool, _>(0));
        match locked {
            Ok(true) => Ok(Some(SqlLock::Tx { tx, _slot: slot })),
            Ok(false) => {
                let _ = tx.rollback().await;
                Ok(None)
            }
            Err(e) => {
                let _ = tx.rollback().await;
                Err(self.err(&what, &e))
            }
        }
    }

    /// Ends a commit lock without committing.
    async fn end(&self, lock: Option<SqlLock>) {
        if let Some(SqlLock::Tx { tx, .. }) = lock
            && let Err(e) = tx.rollback().await
        {
            // The connection is dropped with the transaction: the lock goes with it.
            log::warn!("catalog {}: ending a commit lock: {e}", self.name);
        }
    }

    /// The conditional UPDATE that commits: true if it moved the pointer from `expected`.
    async fn swap_in(
        &self,
        conn: &mut sqlx::AnyConnection,
        table: &TableId,
        expected: &str,
        new: &str,
    ) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE iceberg_tables SET metadata_location = $1, previous_metadata_location = $2 \
             WHERE catalog_name = $3 AND table_namespace = $4 AND table_name = $5 \
             AND metadata_location = $6",
        )
        .bind(new)
        .bind(expected)
        .bind(&self.name)
        .bind(&table.namespace)
        .bind(&table.name)
        .bind(expected)
        .execute(conn)
        .await
        .map_err(|e| self.err(&format!("commit {table}"), &e))?;
        Ok(done.rows_affected() == 1)
    }

    pub async fn connect(config: &StoreConfig) -> Result<Self> {
        install_default_drivers();
        let url = sqlx_url(&config.uri)?;
        let shown_uri = redact_uri(&config.uri);
        let is_sqlite = url.starts_with("sqlite:");
        let pool = AnyPoolOptions::new()
            .max_connections(if is_sqlite { 2 } else { MAX_PG as u32 })
            .acquire_timeout(config.catalog_acquire_timeout())
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if is_sqlite {
                        // Concurrent writer processes wait for the lock instead of failing.
                        conn.execute("PRAGMA busy_timeout = 30000").await?;
                    }
                    Ok(())
                })
            })
            .connect(&url)
            .await
            .map_err(|e| Error::catalog(format!("cannot connect to catalog {shown_uri}: {e}")))?;
        let catalog = Self {
            pool,
            name: config.catalog_name.clone(),
            shown_uri,
            lock_dir: if is_sqlite { lock_dir(&url) } else { None },
            lock_slots: Arc::new(Semaphore::new(MAX_PG - 1)),
        };
        catalog.init(is_sqlite).await?;
        Ok(catalog)
    }

    async fn init(&self, is_sqlite: bool) -> Result<()> {
        if is_sqlite {
            // Not WAL: this library and Python's own sqlite3 (PyIceberg, Feast) are two copies
            // of SQLite in one process, and POSIX locks are per process. When the Python side
            // closed its last connection it took itself for the last user, checkpointed and
            // deleted the -wal/-shm files our open connections kept writing to: later commits
            // went into a deleted file, invisible to every other reader and lost at exit. The
            // rollback journal (SQLite's default, PyIceberg's too) writes commits to the
            // database file itself. Converts catalogs an earlier version left in WAL mode.
            self.pool
                .execute("PRAGMA journal_mode = DELETE")
                .await
                .map_err(|e| self.err("set the rollback journal", &e))?;
        }
        for ddl in [CREATE_TABLES, CREATE_NAMESPACES] {
            self.pool
                .execute(ddl)
                .await
                .map_err(|e| self.err("create catalog tables", &e))?;
        }
        Ok(())
    }

    fn err(&self, what: &str, e: &sqlx::Error) -> Error {
        Error::catalog(format!(
            "{what} in catalog {} ({}): {e}",
            self.name, self.shown_uri
        ))
    }
}

#[async_trait]
impl Catalog for SqlCatalog {
    async fn ensure_namespace(&self, namespace: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO iceberg_namespace_properties \
             (catalog_name, namespace, property_key, property_value) \
             VALUES ($1, $2, 'exists', 'true') ON CONFLICT DO NOTHING",
        )
        .bind(&self.name)
        .bind(namespace)
        .execute(&self.pool)
        .await
        .map_err(|e| self.err("create namespace", &e))?;
        Ok(())
    }

    async fn load(&self, table: &TableId) -> Result<Option<Loaded>> {
        let row = sqlx::query(
            "SELECT metadata_location FROM iceberg_tables \
             WHERE catalog_name = $1 AND table_namespace = $2 AND table_name = $3",
        )
        .bind(&self.name)
        .bind(&table.namespace)
        .bind(&table.name)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| self.err(&format!("look up {table}"), &e))?;
        let location = row
            .map(|r| r.try_get::<Option<String>, _>(0))
            .transpose()
            .map(Option::flatten)
            .map_err(|e| self.err(&format!("look up {table}"), &e))?;
        Ok(location.map(|location| Loaded {
            location,
            metadata: None,
        }))
    }

    async fn create(
        &self,
        table: &TableId,
        metadata: &TableMetadata,
        file_io: &FileIO,
    ) -> Result<bool> {
        let location = MetadataLocation::new_with_metadata(metadata.location(), metadata);
        metadata.write_to(file_io, &location).await?;
        let location = location.to_string();
        crate::storage::sync_files([location.clone()]).await?;
        let done = sqlx::query(
            "INSERT INTO iceberg_tables (catalog_name, table_namespace, table_name, \
             metadata_location, previous_metadata_location, iceberg_type) \
             VALUES ($1, $2, $3, $4, NULL, 'TABLE') ON CONFLICT DO NOTHING",
        )
        .bind(&self.name)
        .bind(&table.namespace)
        .bind(&table.name)
        .bind(&location)
        .execute(&self.pool)
        .await
        .map_err(|e| self.err(&format!("register {table}"), &e));
        let created = matches!(&done, Ok(d) if d.rows_affected() == 1);
        if !created {
            delete_quietly(file_io, table, &[location]).await;
        }
        done.map(|_| created)
    }

    /// Moves the pointer to the metadata.json `prepare` wrote (and made durable) with a
    /// conditional UPDATE, inside the commit lock's transaction when it has one.
    async fn commit(
        &self,
        base: &TableState,
        prepared: &PreparedCommit,
        _: &FileIO,
        lock: Option<CommitLock>,
    ) -> Result<CommitOutcome> {
        let lock = lock.and_then(CommitLock::into_inner::<SqlLock>);
        let Some(location) = prepared.metadata_location.clone() else {
            self.end(lock).await;
            return Err(Error::internal(format!(
                "commit to {}: no metadata.json was written for the SQL catalog",
                base.id
            )));
        };
        let swapped = match lock {
            Some(SqlLock::Tx { mut tx, .. }) => {
                let done = self
                    .swap_in(&mut tx, &base.id, &base.metadata_location, &location)
                    .await;
                match done {
                    Ok(true) => tx
                        .commit()
                        .await
                        .map(|()| true)
                        .map_err(|e| self.err(&format!("commit {}", base.id), &e)),
                    other => {
                        let _ = tx.rollback().await;
                        other
                    }
                }
            }
            // A SQLite lock file is released once the swap is done (`_file` dropped then).
            Some(SqlLock::File(_file)) => {
                self.swap(&base.id, &base.metadata_location, &location)
                    .await
            }
            None => {
                self.swap(&base.id, &base.metadata_location, &location)
                    .await
            }
        };
        // An UPDATE that failed in flight (connection lost) may still have committed: the
        // caller keeps the files then, orphans at worst. Only "0 rows" proves they are ours
        // alone (the caller deletes them).
        Ok(if swapped? {
            CommitOutcome::Committed(Loaded {
                location,
                metadata: Some(Box::new(prepared.metadata.clone())),
            })
        } else {
            CommitOutcome::Conflict
        })
    }

    async fn lock(&self, table: &TableId) -> Result<Option<CommitLock>> {
        if let Some(path) = self.lock_file_of(table) {
            let file = lock_file(path.clone())
                .await
                .map_err(|e| self.lock_err(table, &path, &e))?;
            return Ok(Some(CommitLock::new(SqlLock::File(file))));
        }
        self.advisory_lock(table, true)
            .await
            .map(|l| l.map(CommitLock::new))
    }

    fn locks_commits(&self) -> bool {
        true
    }

    async fn try_lock(&self, table: &TableId) -> Result<Option<Option<CommitLock>>> {
        let locked = match self.lock_file_of(table) {
            Some(path) => try_lock_file(&path)
                .map_err(|e| self.lock_err(table, &path, &e))?
                .map(SqlLock::File),
            None => self.advisory_lock(table, false).await?,
        };
        Ok(locked.map(|l| Some(CommitLock::new(l))))
    }

    async fn unlock(&self, lock: CommitLock) {
        self.end(lock.into_inner::<SqlLock>()).await;
    }

    fn owns_metadata_files(&self) -> bool {
        false
    }

    async fn swap(&self, table: &TableId, expected: &str, new: &str) -> Result<bool> {
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(|e| self.err(&format!("commit {table}"), &e))?;
        self.swap_in(&mut conn, table, expected, new).await
    }

    async fn unregister(&self, table: &TableId) -> Result<Option<String>> {
        let location = self.metadata_location(table).await?;
        sqlx::query(
            "DELETE FROM iceberg_tables \
             WHERE catalog_name = $1 AND table_namespace = $2 AND table_name = $3",
        )
        .bind(&self.name)
        .bind(&table.namespace)
        .bind(&table.name)
        .execute(&self.pool)
        .await
        .map_err(|e| self.err(&format!("drop {table}"), &e))?;
        Ok(location)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlalchemy_uris_translate() {
        assert_eq!(
            sqlx_url("sqlite:////tmp/c.db").unwrap(),
            "sqlite:///tmp/c.db?mode=rwc"
        );
        assert_eq!(
            sqlx_url("postgresql+psycopg2://u:p@h:5/db").unwrap(),
            "postgres://u:p@h:5/db"
        );
        assert_eq!(
            sqlx_url("postgresql://u@h/db").unwrap(),
            "postgres://u@h/db"
        );
        let err = sqlx_url("mysql://u:hunter2@h/db").unwrap_err().to_string();
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn sqlite_lock_files_live_next_to_the_database() {
        let url = sqlx_url("sqlite:////tmp/x/c.db").unwrap();
        assert_eq!(lock_dir(&url), Some(PathBuf::from("/tmp/x/c.db.locks")));
        assert_eq!(lock_dir("postgres://u@h/db"), None);
    }

    #[test]
    fn a_commit_lock_file_excludes_a_second_holder_until_released() {
        let path = std::env::temp_dir()
            .join(format!("feast-iceberg-lock-{}", uuid::Uuid::new_v4()))
            .join("t.lock");
        crate::runtime::block_on(async {
            let held = lock_file(path.clone()).await.unwrap();
            assert!(
                try_lock_file(&path).unwrap().is_none(),
                "held: try_lock fails"
            );
            let second = tokio::spawn(lock_file(path.clone()));
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert!(!second.is_finished(), "the second locker must wait");
            drop(held);
            let again = tokio::time::timeout(Duration::from_secs(5), second).await;
            assert!(matches!(again, Ok(Ok(Ok(_)))), "{again:?}");
        })
        .unwrap();
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }
}
