"""feast-iceberg: a Feast online store on Apache Iceberg with true upserts."""

from typing import Any

from ._internal import __version__
from .config import IcebergOnlineStoreConfig
from .exceptions import (
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
from .online_store import IcebergOnlineStore

# `batch_engine: {type: feast_iceberg.IcebergArrowEngine}` makes Feast import these two names
# from this package; they load Feast's compute-engine modules, so only on first use.
_ENGINE_NAMES = ("IcebergArrowEngine", "IcebergArrowEngineConfig")


def __getattr__(name: str) -> Any:
    if name in _ENGINE_NAMES:
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CatalogError",
    "CommitConflictError",
    "CommitStateUnknownError",
    "ConfigError",
    "ConversionError",
    "CorruptTableError",
    "FeastIcebergError",
    "ForkError",
    "IcebergArrowEngine",
    "IcebergArrowEngineConfig",
    "IcebergOnlineStore",
    "IcebergOnlineStoreConfig",
    "InternalError",
    "InvalidInputError",
    "ReadTimeoutError",
    "SchemaMismatchError",
    "StorageError",
    "TableNotFoundError",
    "TableStateError",
    "__version__",
]
