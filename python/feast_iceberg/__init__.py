"""feast-iceberg: a Feast online store on Apache Iceberg with true upserts."""

import importlib
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

# `batch_engine: {type: feast_iceberg.IcebergArrowEngine}` makes Feast import the engine and
# its config class from this package; they load Feast's compute-engine modules (and pyspark or
# ray, the optional extras `spark` and `ray`), so only on first use.
_ENGINE_MODULES = {
    "IcebergArrowEngine": "engine",
    "IcebergArrowEngineConfig": "engine",
    "IcebergSparkEngine": "spark_engine",
    "IcebergSparkEngineConfig": "spark_engine",
    "IcebergRayEngine": "ray_engine",
    "IcebergRayEngineConfig": "ray_engine",
}


def __getattr__(name: str) -> Any:
    module = _ENGINE_MODULES.get(name)
    if module is not None:
        return getattr(importlib.import_module(f"{__name__}.{module}"), name)
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
    "IcebergRayEngine",
    "IcebergRayEngineConfig",
    "IcebergSparkEngine",
    "IcebergSparkEngineConfig",
    "InternalError",
    "InvalidInputError",
    "ReadTimeoutError",
    "SchemaMismatchError",
    "StorageError",
    "TableNotFoundError",
    "TableStateError",
    "__version__",
]
