"""`IcebergOnlineStoreConfig`: the `online_store:` block of feature_store.yaml.

Accepts every field of Feast's contrib Iceberg store, so switching is a change of `type:` only.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Literal

from feast.repo_config import FeastConfigBaseModel
from pydantic import Field, StrictStr, field_validator

from ._redact import redact_mapping, redact_uri
from .exceptions import ConfigError

DEFAULT_CATALOG_FILE = "data/iceberg_catalog.db"
DEFAULT_WAREHOUSE = "data/iceberg_warehouse"


class IcebergOnlineStoreConfig(FeastConfigBaseModel):
    """Online store config for feast-iceberg (Iceberg tables with true upserts)."""

    type: Literal[
        "feast_iceberg.IcebergOnlineStore",
        "feast_iceberg.online_store.IcebergOnlineStore",
        "feast_iceberg.config.IcebergOnlineStore",
    ] = "feast_iceberg.IcebergOnlineStore"

    catalog_type: Literal["sql", "rest"] = "sql"
    """`sql` (SQLite file or PostgreSQL, the Iceberg JDBC schema) or `rest`."""

    catalog_name: StrictStr = "feast_catalog"
    """Name the tables are registered under; readers (PyIceberg, Spark) must use the same one."""

    uri: StrictStr | None = None
    """Catalog URI. Default: `sqlite:///<repo>/data/iceberg_catalog.db`."""

    warehouse: StrictStr | None = None
    """Warehouse root: a local path or `file://`/`s3://` URI.
    Default `<repo>/data/iceberg_warehouse`; relative paths are taken from the repo directory."""

    namespace: StrictStr = "feast_online"

    partition_strategy: Literal["entity_hash", "timestamp", "hybrid"] = "entity_hash"
    """Accepted for contrib compatibility. Tables are always bucketed by entity key."""

    partition_count: int = Field(default=16, ge=1, le=4096)
    """Number of `bucket[N](entity_key)` partitions of a new table."""

    read_timeout_ms: int | None = Field(default=None, gt=0)
    """Deadline for one `online_read`; exceeding it raises `ReadTimeoutError`. None: no deadline."""

    storage_options: dict[str, str] = Field(default_factory=dict)
    """PyIceberg property names (`s3.endpoint`, `s3.access-key-id`, `token`, ...)."""

    metadata_refresh_seconds: float = Field(default=1.0, ge=0)
    """How stale cached table metadata may get before a read re-checks the catalog (0 = every read).
    Our own commits are visible at once."""

    snapshot_retention_count: int = Field(default=1, ge=1)
    """Snapshots always kept (the current one counts)."""

    snapshot_retention_seconds: float = Field(default=0.0, ge=0)
    """Grace period: a replaced snapshot and its files are kept this long after it stopped being
    current. feast-iceberg's own readers need none (a file deleted under them makes them refresh
    and retry); raise it for other engines' scans that outlive a materialization."""

    metadata_previous_versions_max: int = Field(default=5, ge=1)
    """metadata.json files kept besides the current one."""

    commit_max_retries: int = Field(default=20, ge=0)
    """How often a conflicting commit is re-planned before `CommitConflictError`."""

    enforce_ttl: bool = False
    """Serve no row older than the feature view's `ttl`: `online_read` returns `(None, None)`
    for a key whose event timestamp is before `now - ttl` (Feast's offline rule, so online and
    historical retrieval agree). A ttl of None or 0 never expires. Off: `ttl` is ignored on
    reads, as in Feast's own online stores."""

    read_cache_bytes: int = Field(default=512 * 1024 * 1024, ge=0)
    """Memory budget of the block cache: decoded row groups (512 rows each) kept for point reads,
    least recently used evicted first. A miss reads and decodes one row group, so a budget far
    below the table's size still serves reads in milliseconds; the per-file key indexes (~16
    bytes per key: footers and bloom filters) are kept outside this budget."""

    merge_on_read_max_fraction: float = Field(default=0.1, ge=0, le=1)
    """A write that replaces at most this fraction of a bucket's stored live rows (as the key
    index estimates) is merge-on-read: its rows go to a new data file (a sorted run) plus a
    position-delete file for the rows they replace, instead of a rewrite of the bucket. New
    keys cost no deletes, so they always become a run. 0: always copy-on-write."""

    merge_on_read_max_files: int = Field(default=8, ge=2)
    """Sorted runs (data files) a bucket may hold: a write into a bucket that holds this many
    merges its smallest runs into its own file, size-tiered (each next run while it is no
    larger than those taken)."""

    merge_on_read_max_delete_ratio: float = Field(default=0.2, ge=0, le=1)
    """Automatic compaction: a bucket in which more than this fraction of the stored rows would
    be deleted rows is rewritten copy-on-write (one file, its delete files dropped)."""

    target_bucket_bytes: int = Field(default=128 * 1024 * 1024, ge=0)
    """`feast-iceberg compact` re-buckets a table whose largest bucket holds more live bytes
    than this: the bucket count doubles until it fits, every file is rewritten into the new
    `bucket[N](entity_key)` spec. 0: only `compact --buckets N` re-buckets."""

    catalog_acquire_timeout_seconds: float = Field(default=10.0, gt=0, le=1e12)
    """SQL catalogs (SQLite, PostgreSQL): how long an operation waits for a connection of the
    catalog's pool, opening one included, before it fails with `CatalogError`. Raise it when
    many threads share one store or the database is far away; lower it to fail fast."""

    @field_validator("storage_options", mode="before")
    @classmethod
    def _stringify_options(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {str(k): str(v) for k, v in value.items()}
        return value

    def __repr_args__(self) -> Any:
        for key, value in super().__repr_args__():
            if key == "uri" and isinstance(value, str):
                yield key, redact_uri(value)
            elif key == "storage_options" and isinstance(value, dict):
                yield key, redact_mapping(value)
            else:
                yield key, value

    def to_store_json(self, repo_path: Path | None, entity_key_serialization_version: int) -> str:
        """The config the Rust core takes, with repo-relative defaults resolved."""
        if self.partition_strategy != "entity_hash":
            warnings.warn(
                f"partition_strategy={self.partition_strategy!r} is ignored: feast-iceberg always "
                "partitions by bucket[N](entity_key) so every lookup and upsert touches one "
                "bucket.",
                stacklevel=3,
            )
        base = Path(repo_path) if repo_path else Path.cwd()
        if self.catalog_type == "rest":
            if not self.uri:
                raise ConfigError("catalog_type 'rest' needs `uri` (e.g. http://host:8181)")
            # The server's warehouse name (a REST catalog decides where tables live).
            uri, warehouse = self.uri, self.warehouse or ""
        else:
            uri = self.uri or f"sqlite:///{(base / DEFAULT_CATALOG_FILE).resolve()}"
            if uri.startswith("sqlite:///"):
                uri = _resolve_sqlite_uri(uri, base)
            warehouse = _resolve_warehouse(self.warehouse or DEFAULT_WAREHOUSE, base)
        return json.dumps(
            {
                "catalog_type": self.catalog_type,
                "catalog_name": self.catalog_name,
                "uri": uri,
                "warehouse": warehouse,
                "namespace": self.namespace,
                "partition_count": self.partition_count,
                "read_timeout_ms": self.read_timeout_ms,
                "storage_options": self.storage_options,
                "metadata_refresh_seconds": self.metadata_refresh_seconds,
                "snapshot_retention_count": self.snapshot_retention_count,
                "snapshot_retention_seconds": self.snapshot_retention_seconds,
                "metadata_previous_versions_max": self.metadata_previous_versions_max,
                "commit_max_retries": self.commit_max_retries,
                "read_cache_bytes": self.read_cache_bytes,
                "merge_on_read_max_fraction": self.merge_on_read_max_fraction,
                "merge_on_read_max_files": self.merge_on_read_max_files,
                "merge_on_read_max_delete_ratio": self.merge_on_read_max_delete_ratio,
                "catalog_acquire_timeout_seconds": self.catalog_acquire_timeout_seconds,
                "target_bucket_bytes": self.target_bucket_bytes,
                "entity_key_serialization_version": entity_key_serialization_version,
            }
        )


def _resolve_sqlite_uri(uri: str, base: Path) -> str:
    """`sqlite:///rel/x.db` is relative to the repo, `sqlite:////abs/x.db` absolute (SQLAlchemy)."""
    rest = uri[len("sqlite:///") :]
    path, sep, query = rest.partition("?")
    p = Path(path)
    if not p.is_absolute():
        p = base / p
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the directory of the sqlite catalog {p}: {e}") from e
    return f"sqlite:///{p.resolve()}" + (sep + query if sep else "")


def _resolve_warehouse(warehouse: str, base: Path) -> str:
    if "://" in warehouse:
        return warehouse
    p = Path(warehouse)
    if not p.is_absolute():
        p = base / p
    return f"file://{p.resolve()}"


def __getattr__(name: str) -> Any:
    # Feast imports the store class from the module that defines the config class.
    if name == "IcebergOnlineStore":
        from .online_store import IcebergOnlineStore

        return IcebergOnlineStore
    raise AttributeError(name)
