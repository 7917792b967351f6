"""The exception hierarchy; every error feast-iceberg raises is a `FeastIcebergError`."""

from ._internal import (
    CatalogError,
    CommitConflictError,
    ConfigError,
    CorruptTableError,
    FeastIcebergError,
    InvalidInputError,
    ReadTimeoutError,
    SchemaMismatchError,
    StorageError,
    TableNotFoundError,
)

__all__ = [
    "CatalogError",
    "CommitConflictError",
    "ConfigError",
    "CorruptTableError",
    "FeastIcebergError",
    "InvalidInputError",
    "ReadTimeoutError",
    "SchemaMismatchError",
    "StorageError",
    "TableNotFoundError",
]
