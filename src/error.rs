//! One error type for the whole core. Every variant maps to exactly one Python exception class
//! (see `bindings::errors`), so callers can catch by kind without parsing messages.

use std::fmt::Display;

/// Placeholder for errors converted where the table is not known; `in_table` fills it in.
const UNKNOWN_TABLE: &str = "?";

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store configuration is unusable.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A batch or request does not fit the table schema.
    #[error("schema mismatch: {0}")]
    SchemaMismatch(String),
    /// A value is malformed or of the wrong type for its column.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The table is not registered in the catalog.
    #[error("table {0} does not exist (run `feast apply` to create it)")]
    TableNotFound(String),
    /// Other writers kept committing first; nothing was committed.
    #[error("commit conflict on {table}: gave up after {attempts} attempts")]
    CommitConflict { table: String, attempts: u32 },
    /// The catalog could not be reached or rejected the request.
    #[error("catalog error: {0}")]
    Catalog(String),
    /// A file could not be read or written.
    #[error("storage error: {0}")]
    Storage(String),
    /// A file the loaded metadata references is gone: usually another process expired the
    /// snapshot we planned on (reload and retry); if the current metadata still references it,
    /// the table is corrupt.
    #[error("file not found: {0}")]
    FileNotFound(String),
    /// Metadata or files referenced by it are unreadable or inconsistent.
    #[error("corrupt table {table}: {detail}")]
    CorruptTable { table: String, detail: String },
    /// A read missed its deadline.
    #[error("read of {table} exceeded its deadline of {timeout_ms} ms")]
    ReadTimeout { table: String, timeout_ms: u64 },
    /// A bug: an invariant of ours did not hold.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    pub fn config(msg: impl Display) -> Self {
        Self::Config(msg.to_string())
    }
    pub fn schema(msg: impl Display) -> Self {
        Self::SchemaMismatch(msg.to_string())
    }
    pub fn input(msg: impl Display) -> Self {
        Self::InvalidInput(msg.to_string())
    }
    pub fn catalog(msg: impl Display) -> Self {
        Self::Catalog(msg.to_string())
    }
    pub fn storage(msg: impl Display) -> Self {
        Self::Storage(msg.to_string())
    }
    pub fn internal(msg: impl Display) -> Self {
        Self::Internal(msg.to_string())
    }
    pub fn corrupt(table: impl Display, detail: impl Display) -> Self {
        Self::CorruptTable {
            table: table.to_string(),
            detail: detail.to_string(),
        }
    }

    /// A missing file that the current metadata still references: the table is damaged.
    #[must_use]
    pub fn missing_is_corrupt(self, table: impl Display) -> Self {
        match self {
            Self::FileNotFound(detail) => Self::corrupt(table, detail),
            other => other.in_table(table),
        }
    }

    /// Names the table in errors raised below the store, which do not know it.
    #[must_use]
    pub fn in_table(self, table: impl Display) -> Self {
        match self {
            Self::CorruptTable { table: t, detail } if t == UNKNOWN_TABLE => {
                Self::corrupt(table, detail)
            }
            other => other,
        }
    }

    /// Adds the operation and table to a message so errors say where they happened.
    #[must_use]
    pub fn context(self, what: impl Display) -> Self {
        let wrap = |m: String| format!("{what}: {m}");
        match self {
            Self::Config(m) => Self::Config(wrap(m)),
            Self::SchemaMismatch(m) => Self::SchemaMismatch(wrap(m)),
            Self::InvalidInput(m) => Self::InvalidInput(wrap(m)),
            Self::Catalog(m) => Self::Catalog(wrap(m)),
            Self::Storage(m) => Self::Storage(wrap(m)),
            Self::FileNotFound(m) => Self::FileNotFound(wrap(m)),
            Self::Internal(m) => Self::Internal(wrap(m)),
            other => other,
        }
    }
}

/// Errors from iceberg-rust: its `DataInvalid` on metadata we loaded means a corrupt table, most
/// others come from FileIO.
impl From<iceberg::Error> for Error {
    fn from(err: iceberg::Error) -> Self {
        use iceberg::ErrorKind as K;
        let msg = format!("{err:#}");
        if crate::storage::is_not_found(&err) {
            return Self::FileNotFound(msg);
        }
        match err.kind() {
            K::DataInvalid => Self::CorruptTable {
                table: UNKNOWN_TABLE.into(),
                detail: msg,
            },
            K::FeatureUnsupported => Self::InvalidInput(msg),
            K::NamespaceNotFound | K::TableNotFound => Self::TableNotFound(msg),
            _ => Self::Storage(msg),
        }
    }
}

impl From<parquet::errors::ParquetError> for Error {
    fn from(err: parquet::errors::ParquetError) -> Self {
        Self::Storage(format!("parquet: {err}"))
    }
}

impl From<arrow_schema::ArrowError> for Error {
    fn from(err: arrow_schema::ArrowError) -> Self {
        Self::Internal(format!("arrow: {err}"))
    }
}

impl From<serde_json::Error> for Error {
    fn from(err: serde_json::Error) -> Self {
        Self::Internal(format!("json: {err}"))
    }
}
