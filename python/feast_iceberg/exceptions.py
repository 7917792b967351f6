"""The exception hierarchy; every error feast-iceberg raises is a `FeastIcebergError`."""

from ._internal import (
    CatalogError,
    CommitConflictError,
    CommitStateUnknownError,
    ConfigError,
    ConversionError,
    CorruptTableError,
    FeastIcebergError,
    ForkError,
    InternalError,
    InvalidInputError,
    ReadTimeoutError,
    SchemaMismatchError,
    StorageError,
    TableNotFoundError,
    TableStateError,
)

__all__ = [
    "CatalogError",
    "CommitConflictError",
    "CommitStateUnknownError",
    "ConfigError",
    "ConversionError",
    "CorruptTableError",
    "FeastIcebergError",
    "ForkError",
    "InternalError",
    "InvalidInputError",
    "ReadTimeoutError",
    "SchemaMismatchError",
    "StorageError",
    "TableNotFoundError",
    "TableStateError",
]
