"""feast-iceberg: a Feast online store on Apache Iceberg with true upserts."""

from ._internal import __version__
from .config import IcebergOnlineStoreConfig
from .exceptions import (
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
from .online_store import IcebergOnlineStore

__all__ = [
    "CatalogError",
    "CommitConflictError",
    "ConfigError",
    "CorruptTableError",
    "FeastIcebergError",
    "IcebergOnlineStore",
    "IcebergOnlineStoreConfig",
    "InvalidInputError",
    "ReadTimeoutError",
    "SchemaMismatchError",
    "StorageError",
    "TableNotFoundError",
    "__version__",
]
