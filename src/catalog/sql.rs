//! The Iceberg JDBC catalog schema on SQLite or PostgreSQL, the one PyIceberg's SqlCatalog and
//! Java's JdbcCatalog use, so they see our tables. A commit is one conditional UPDATE: zero rows
//! affected means another writer committed first.

use std::str::FromStr;
use std::sync::Arc;

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

pub struct SqlCatalog {
    pool: AnyPool,
    name: String,
    shown_uri: String,
    is_sqlite: bool,
    /// Commit locks this process may hold at once: each holds a connection, and loads need
    /// one too. SQLite's lock is the database's write lock, one for every table.
    lock_slots: Arc<Semaphore>,
}

/// A commit lock: a transaction that holds SQLite's write lock (`BEGIN IMMEDIATE`) or a
/// PostgreSQL advisory lock on the table; the swap runs inside it.
struct SqlLock {
    tx: sqlx::Transaction<'static, sqlx::Any>,
    _slot: OwnedSemaphorePermit,
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

impl SqlCatalog {
    /// Ends a commit lock without committing.
    async fn end(&self, lock: Option<SqlLock>) {
        if let Some(lock) = lock
            && let Err(e) = lock.tx.rollback().await
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
            is_sqlite,
            lock_slots: Arc::new(Semaphore::new(if is_sqlite { 1 } else { MAX_PG - 1 })),
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

    /// Writes the next metadata.json, then moves the pointer with a conditional UPDATE
    /// (inside the commit lock's transaction when given).
    async fn commit(
        &self,
        base: &TableState,
        prepared: &PreparedCommit,
        file_io: &FileIO,
        lock: Option<CommitLock>,
    ) -> Result<CommitOutcome> {
        let lock = lock.and_then(CommitLock::into_inner::<SqlLock>);
        let location = match MetadataLocation::from_str(&base.metadata_location) {
            Ok(l) => l.with_next_version().with_new_metadata(&prepared.metadata),
            Err(e) => {
                self.end(lock).await;
                return Err(Error::corrupt(
                    &base.id,
                    format!("bad metadata location: {e}"),
                ));
            }
        };
        let written = async {
            prepared.metadata.write_to(file_io, &location).await?;
            // The swap publishes it: durable first.
            crate::storage::sync_files([location.to_string()]).await
        };
        if let Err(e) = written.await {
            self.end(lock).await;
            return Err(e);
        }
        let location = location.to_string();
        let swapped = match lock {
            Some(mut lock) => {
                let done = self
                    .swap_in(&mut lock.tx, &base.id, &base.metadata_location, &location)
                    .await;
                match done {
                    Ok(true) => lock
                        .tx
                        .commit()
                        .await
                        .map(|()| true)
                        .map_err(|e| self.err(&format!("commit {}", base.id), &e)),
                    other => {
                        let _ = lock.tx.rollback().await;
                        other
                    }
                }
            }
            None => {
                self.swap(&base.id, &base.metadata_location, &location)
                    .await
            }
        };
        // An UPDATE that failed in flight (connection lost) may still have committed: keep the
        // file then, an orphan at worst. Only "0 rows" proves it is ours alone.
        Ok(if swapped? {
            CommitOutcome::Committed(Loaded {
                location,
                metadata: Some(Box::new(prepared.metadata.clone())),
            })
        } else {
            delete_quietly(file_io, &base.id, &[location]).await;
            CommitOutcome::Conflict
        })
    }

    async fn lock(&self, table: &TableId) -> Result<Option<CommitLock>> {
        let slot = self
            .lock_slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| Error::internal(format!("commit lock slots closed: {e}")))?;
        let what = format!("lock {table} for a commit");
        let tx = if self.is_sqlite {
            self.pool.begin_with("BEGIN IMMEDIATE").await
        } else {
            self.pool.begin().await
        }
        .map_err(|e| self.err(&what, &e))?;
        let mut lock = SqlLock { tx, _slot: slot };
        if !self.is_sqlite {
            let key = format!(
                "feast-iceberg/{}/{}/{}",
                self.name, table.namespace, table.name
            );
            let locked = sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
                .bind(key)
                .execute(&mut *lock.tx)
                .await;
            if let Err(e) = locked {
                let _ = lock.tx.rollback().await;
                return Err(self.err(&what, &e));
            }
        }
        Ok(Some(CommitLock::new(lock)))
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
}
