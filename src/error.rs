//! One error type for the whole core. Every variant maps to exactly one Python exception class
//! (see `bindings::errors`), so callers can catch by kind without parsing messages.

use std::fmt::Display;

/// Placeholder for errors converted where the table is not known; `in_table` fills it in.
const UNKNOWN_TABLE: &str = "?";

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

// Clone: one failed group commit is every member's error.
#[derive(Debug, Clone, thiserror::Error)]
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
    /// The last commit attempt's outcome is unknown (the catalog failed mid-request) and no
    /// attempt is known to have landed: the table is consistent, the rows may or may not be in.
    #[error(
        "commit to {table} gave up after {attempts} attempts; the last one's outcome is \
         unknown (the rows may or may not be committed; writing them again is safe): {detail}"
    )]
    CommitUnknown {
        table: String,
        attempts: u32,
        detail: String,
    },
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
    /// A valid table in a state this store cannot work on (files another engine wrote: not
    /// bucketed by entity key, equality deletes, ...). Nothing was changed.
    #[error("table {table} cannot be used as it is: {detail}")]
    TableState { table: String, detail: String },
    /// Arrow data that cannot be converted (a cast that fails, an overflow, batches that do
    /// not fit together).
    #[error("arrow conversion failed: {0}")]
    Conversion(String),
    /// A store object built before `fork()` was used in the child.
    #[error("{0}")]
    Forked(String),
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
    pub fn table_state(table: impl Display, detail: impl Display) -> Self {
        Self::TableState {
            table: table.to_string(),
            detail: detail.to_string(),
        }
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
            Self::Conversion(m) => Self::Conversion(wrap(m)),
            Self::Internal(m) => Self::Internal(wrap(m)),
            other => other,
        }
    }
}

/// Errors from iceberg-rust: a missing file (typed by our storage, see `storage::NotFound`)
/// first; its `DataInvalid` on metadata we loaded means a corrupt table, most others come from
/// FileIO.
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

/// Parquet errors come from reading or writing a file; a read of a file that vanished carries
/// the storage's typed not-found as its source.
impl From<parquet::errors::ParquetError> for Error {
    fn from(err: parquet::errors::ParquetError) -> Self {
        if crate::storage::is_not_found(&err) {
            return Self::FileNotFound(format!("parquet: {err}"));
        }
        Self::Storage(format!("parquet: {err}"))
    }
}

/// Arrow errors: I/O and parquet failures underneath a reader are storage errors (a vanished
/// file a `FileNotFound`), a bad C stream from Python is invalid input, and the rest are
/// conversions of values or batches that do not fit.
impl From<arrow_schema::ArrowError> for Error {
    fn from(err: arrow_schema::ArrowError) -> Self {
        use arrow_schema::ArrowError as A;
        if crate::storage::is_not_found(&err) {
            return Self::FileNotFound(format!("arrow: {err}"));
        }
        match err {
            A::IoError(..) | A::ExternalError(_) | A::ParquetError(_) => {
                Self::Storage(format!("arrow: {err}"))
            }
            A::CDataInterface(_) => Self::InvalidInput(format!("arrow stream: {err}")),
            other => Self::Conversion(other.to_string()),
        }
    }
}

impl From<serde_json::Error> for Error {
    fn from(err: serde_json::Error) -> Self {
        Self::Internal(format!("json: {err}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_schema::ArrowError;

    #[test]
    fn arrow_errors_land_in_their_class() {
        let cast = ArrowError::CastError("cannot cast string to int".into());
        assert!(matches!(Error::from(cast), Error::Conversion(m) if m.contains("cast")));
        let overflow = ArrowError::ArithmeticOverflow("2^70".into());
        assert!(matches!(Error::from(overflow), Error::Conversion(_)));
        let stream = ArrowError::CDataInterface("released stream".into());
        assert!(matches!(Error::from(stream), Error::InvalidInput(_)));
        let io = ArrowError::IoError("read".into(), std::io::Error::other("disk"));
        assert!(matches!(Error::from(io), Error::Storage(_)));
    }

    #[test]
    fn a_vanished_file_under_parquet_and_arrow_is_file_not_found() {
        let gone = || crate::storage::not_found("s3://b/t/data/x.parquet");
        let parquet = parquet::errors::ParquetError::External(Box::new(gone()));
        assert!(matches!(Error::from(parquet), Error::FileNotFound(_)));
        let arrow = ArrowError::ExternalError(Box::new(gone()));
        assert!(matches!(Error::from(arrow), Error::FileNotFound(_)));
        assert!(matches!(Error::from(gone()), Error::FileNotFound(_)));
    }

    #[test]
    fn not_found_in_a_message_is_not_a_missing_file() {
        // The text alone decided before: an S3 error about a bucket "not found" or a path
        // that contains the words was taken for a file expired by another process.
        let text = iceberg::Error::new(
            iceberg::ErrorKind::Unexpected,
            "s3 s3://b/not found/x: bucket not found",
        );
        assert!(matches!(Error::from(text), Error::Storage(_)));
        let external = parquet::errors::ParquetError::External(Box::new(iceberg::Error::new(
            iceberg::ErrorKind::Unexpected,
            "No such file or directory",
        )));
        assert!(matches!(Error::from(external), Error::Storage(_)));
    }
}
