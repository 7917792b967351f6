//! The Iceberg JDBC catalog schema on SQLite or PostgreSQL, the one PyIceberg's SqlCatalog and
//! Java's JdbcCatalog use, so they see our tables. A commit is one conditional UPDATE: zero rows
//! affected means another writer committed first.

use std::str::FromStr;

use async_trait::async_trait;
use sqlx::any::{AnyPoolOptions, install_default_drivers};
use sqlx::{AnyPool, Executor, Row};

use iceberg::MetadataLocation;
use iceberg::io::FileIO;
use iceberg::spec::TableMetadata;

use super::{Catalog, CommitOutcome, Loaded, TableId};
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

pub struct SqlCatalog {
    pool: AnyPool,
    name: String,
    shown_uri: String,
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
    pub async fn connect(config: &StoreConfig) -> Result<Self> {
        install_default_drivers();
        let url = sqlx_url(&config.uri)?;
        let shown_uri = redact_uri(&config.uri);
        let is_sqlite = url.starts_with("sqlite:");
        let pool = AnyPoolOptions::new()
            .max_connections(if is_sqlite { 2 } else { 4 })
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

    /// Writes the next metadata.json, then moves the pointer with a conditional UPDATE.
    async fn commit(
        &self,
        base: &TableState,
        prepared: &PreparedCommit,
        file_io: &FileIO,
    ) -> Result<CommitOutcome> {
        let location = MetadataLocation::from_str(&base.metadata_location)
            .map_err(|e| Error::corrupt(&base.id, format!("bad metadata location: {e}")))?
            .with_next_version()
            .with_new_metadata(&prepared.metadata);
        prepared.metadata.write_to(file_io, &location).await?;
        let location = location.to_string();
        // The swap publishes it: durable first.
        crate::storage::sync_files([location.clone()]).await?;
        let swapped = self
            .swap(&base.id, &base.metadata_location, &location)
            .await;
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

    fn owns_metadata_files(&self) -> bool {
        false
    }

    async fn swap(&self, table: &TableId, expected: &str, new: &str) -> Result<bool> {
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
        .execute(&self.pool)
        .await
        .map_err(|e| self.err(&format!("commit {table}"), &e))?;
        Ok(done.rows_affected() == 1)
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
