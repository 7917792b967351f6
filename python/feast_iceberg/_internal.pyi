"""Type stubs for the Rust extension `feast_iceberg._internal`.

Every method that touches a catalog or storage releases the GIL while it works.
"""

from typing import Any, Final, final

from typing_extensions import Self

from feast_iceberg.reports import (
    ArrowWriteReport,
    CompactReport,
    ExpireReport,
    IoStats,
    MetricsSnapshot,
    MigrationReport,
    OrphanReport,
    TableStats,
    WriteReport,
)

__all__ = [
    "__version__",
    "FeastIcebergError",
    "ConfigError",
    "SchemaMismatchError",
    "InvalidInputError",
    "TableNotFoundError",
    "CommitConflictError",
    "CommitStateUnknownError",
    "CatalogError",
    "StorageError",
    "CorruptTableError",
    "TableStateError",
    "ConversionError",
    "ReadTimeoutError",
    "ForkError",
    "InternalError",
    "Store",
    "ViewsPlan",
    "serialize_entity_keys",
    "check_arrow",
    "write_arrow",
    "table_buckets",
    "arrow_buckets",
    "stage_arrow",
    "commit_staged",
    "discard_staged",
    "metrics_snapshot",
    "set_metrics_enabled",
]

__version__: Final[str]

class FeastIcebergError(Exception):
    """Base class of every error raised by feast-iceberg."""

class ConfigError(FeastIcebergError, ValueError):
    """The store configuration is invalid (unknown catalog type, bad URI, bad option)."""

class SchemaMismatchError(FeastIcebergError, ValueError):
    """A batch or request does not fit the table schema (unknown/missing feature, type change)."""

class InvalidInputError(FeastIcebergError, ValueError):
    """A value is malformed or has the wrong type for its column."""

class TableNotFoundError(FeastIcebergError, KeyError):
    """The feature view's table does not exist in the catalog (run `feast apply`)."""

class CommitConflictError(FeastIcebergError):
    """Concurrent writers kept winning; the batch was not committed after all retries."""

class CommitStateUnknownError(CommitConflictError):
    """The catalog failed mid-commit and no attempt is known to have landed; the table is
    consistent and writing the rows again is safe."""

class CatalogError(FeastIcebergError):
    """The catalog could not be reached or answered with an error."""

class StorageError(FeastIcebergError):
    """A data, manifest or metadata file could not be read or written."""

class CorruptTableError(FeastIcebergError):
    """Table metadata or a file it references is unreadable or inconsistent."""

class TableStateError(FeastIcebergError):
    """The table is valid Iceberg but in a state this store cannot work on (files another
    engine wrote: not bucketed by entity key, equality deletes); nothing was changed."""

class ConversionError(FeastIcebergError, ValueError):
    """Arrow data could not be converted (a failed cast, an overflow, batches that do not fit
    together)."""

class ReadTimeoutError(FeastIcebergError, TimeoutError):
    """An online read did not finish within `read_timeout_ms`."""

class ForkError(FeastIcebergError):
    """A `Store` built before `fork()` was used in the child; build a new one there."""

class InternalError(FeastIcebergError):
    """A bug in feast-iceberg: a broken invariant, or a Rust panic caught at the boundary."""

def serialize_entity_keys(entity_keys: list[bytes], version: int) -> list[bytes]:
    """Feast's `serialize_entity_key` for serialized `EntityKey` protos, computed in Rust."""

@final
class ViewsPlan:
    """What every `get_online_features` request of one shape reads, converted once."""

    def __new__(
        cls,
        names: list[str],
        views: list[tuple[str, list[tuple[str, int]], list[tuple[str, bool]], int | None]],
    ) -> Self:
        """`names`: the response's names (request columns, then features); `views` as for
        `Store.read_views`."""

@final
class Store:
    """One catalog + warehouse; safe to share between threads, rebuilt after fork by the shim."""

    def __new__(cls, config_json: str) -> Self:
        """Parse and validate the config (JSON of `StoreConfig`); opens nothing yet."""

    def ensure_table(
        self,
        table: str,
        join_keys: list[tuple[str, int]],
        features: list[tuple[str, int]],
    ) -> None:
        """Create the table, or add columns for new features. Types are Feast `ValueType` ints."""

    def drop_table(self, table: str) -> bool:
        """Drop the table and delete its files; False if it did not exist."""

    def table_exists(self, table: str) -> bool: ...
    def write(
        self,
        table: str,
        feature_names: list[str],
        entity_keys: list[bytes],
        values: list[bytes],
        event_ts_micros: list[int],
        created_ts_micros: list[int | None],
    ) -> WriteReport:
        """Upsert rows in one atomic snapshot.

        `entity_keys[i]` is a serialized `EntityKey` proto; `values` is row-major: the serialized
        `Value` protos of row i are `values[i*len(feature_names):(i+1)*len(feature_names)]`.
        Returns a report: rows_written, rows_ignored_older, buckets, files_added, files_removed,
        delete_files_added, merge_on_read_buckets (buckets written merge-on-read), attempts,
        snapshot_id.
        """

    def read(
        self,
        table: str,
        entity_keys: list[bytes],
        features: list[str] | None = None,
        not_before: int | None = None,
    ) -> tuple[list[str], list[int | None], list[bytes | None]]:
        """Point lookups aligned with `entity_keys`.

        Returns (feature names, event_ts micros or None per key, the key's features as one
        serialized `feast.types.RepeatedValue` in feature-name order, or None). A row whose
        event_ts is before `not_before` (micros; the TTL cut) comes back as None, None.
        """

    def io_stats(self, reset: bool = False) -> IoStats:
        """Bytes and requests read so far: `metadata_*` (metadata.json, manifest lists,
        manifests), `data_*` (data read to answer requests), `prefetch_*` (indexes and row groups
        loaded in the background when a new snapshot is swapped in); the block cache's
        `cache_bytes`, `cache_entries`, `cache_hits`, `cache_misses`, `cache_evictions`; and the
        key indexes' `index_files`, `index_bytes`, `index_rows`. `reset` zeroes the I/O
        counters."""

    def read_views(
        self,
        join_columns: list[list[bytes]],
        views: list[tuple[str, list[tuple[str, int]], list[tuple[str, bool]], int | None]],
    ) -> tuple[bytes, list[int]]:
        """The lookups of several feature views for one request, concurrently, in one call.

        `join_columns`: the request's join-key columns, every row's value a serialized
        `feast.types.Value`. Each view is (table, [(join key, index into join_columns)],
        [(feature, is_join_key)] in response order, not_before micros or None).
        Returns (serialized `GetOnlineFeaturesResponse` holding one `results` entry per
        requested feature, views in order, for `MergeFromString`; per view the number of
        PRESENT cells). A feature the table lacks, a row not found and a row before
        `not_before` are NOT_FOUND with an unset value and timestamp.
        """

    def online_features(
        self,
        plan: ViewsPlan,
        columns: list[tuple[int, list[Any]]],
        cuts: list[int | None] | None = None,
    ) -> tuple[bytes, list[int]]:
        """A whole `get_online_features` answer in one call: `read_views` with the response
        around it.

        `columns`: the request's join-key columns as (kind, values): kind 0, serialized
        `feast.types.Value`s; 2, 3, 4 (Feast's STRING, INT32, INT64), Python `str`s or
        `int`s, encoded as Feast's `python_values_to_proto_values` encodes them; the plan's
        views index them. `cuts`: the views' TTL cuts (micros or None) in the plan's order,
        replacing the plan's. Returns (a serialized `GetOnlineFeaturesResponse`: metadata
        listing the plan's names, one `results` entry per column, every value PRESENT with an
        unset event timestamp, then the views' entries; per view the number of PRESENT
        cells).
        """

    def stats(self, table: str) -> TableStats:
        """Rows, files, bytes and snapshots of the current table state. `records` counts live
        rows (rows of data files minus `position_deletes`)."""

    def compact(
        self, table: str, all: bool = False, dry_run: bool = False, buckets: int | None = None
    ) -> CompactReport:
        """Rewrite buckets with several data files (every bucket with `all`) into one sorted
        file each, newest row per key, in one `replace` snapshot. When `buckets` (a multiple
        of the table's count) asks for more buckets, or the largest bucket holds more than
        `target_bucket_bytes` live bytes, re-bucket instead: a new `bucket[M](entity_key)`
        partition spec and every file rewritten into it, in the same snapshot."""

    def remove_orphans(
        self, table: str, older_than_seconds: float, dry_run: bool = False
    ) -> OrphanReport:
        """Delete files under the table's data/ and metadata/ that no retained snapshot or
        metadata version references and that are older than `older_than_seconds`. Returns
        files, bytes, too_young (unreferenced but younger) and paths."""

    def migrate(
        self,
        table: str,
        join_keys: list[tuple[str, int]],
        features: list[tuple[str, int]],
        dry_run: bool = False,
    ) -> MigrationReport:
        """Convert a table written by Feast's contrib Iceberg store into this layout in place,
        newest row per key, swapped in atomically. Returns already_migrated, files_read,
        rows_read, rows_live, previous_metadata (the contrib files are left in place)."""

    def duplicate_keys(self, table: str) -> int:
        """Rows whose entity key another live row also has (0 for tables feast-iceberg wrote)."""

    def expire(self, table: str, dry_run: bool = False) -> ExpireReport:
        """Run snapshot expiry and unreferenced-file deletion now (it also runs after commits).
        Returns snapshots_expired (on a dry run: how many would be)."""

def check_arrow(
    store: Store,
    table: str,
    schema: Any,
    join_keys: list[tuple[str, str]],
    features: list[tuple[str, str]],
    event_ts: str,
    created_ts: str | None = None,
) -> str | None:
    """Why an offline result of Arrow `schema` (any object with `__arrow_c_schema__`) cannot be
    written natively to `table`, or None if it can. Column mappings are (table column, source
    column) pairs. Reads no data and writes nothing."""

def write_arrow(
    store: Store,
    table: str,
    data: Any,
    join_keys: list[tuple[str, str]],
    features: list[tuple[str, str]],
    event_ts: str,
    created_ts: str | None = None,
    chunk_rows: int = 1_000_000,
) -> ArrowWriteReport:
    """Upsert every row of `data` (any object with `__arrow_c_stream__`: a pyarrow Table or
    RecordBatchReader), converted in Rust with Feast's conversion rules, one atomic snapshot per
    chunk of at most `chunk_rows` rows. Returns the write report summed over the chunks, plus
    rows_read and chunks."""

def table_buckets(store: Store, table: str) -> int:
    """The table's bucket count (the N of its bucket[N](entity_key) partitioning)."""

def arrow_buckets(
    store: Store,
    table: str,
    data: Any,
    join_keys: list[tuple[str, str]],
) -> list[int]:
    """The Iceberg bucket of each row's entity key, in row order, built from the join-key
    columns of `data` (any object with `__arrow_c_stream__`): what a distributed engine
    repartitions rows by, so that one task writes each bucket."""

def stage_arrow(
    store: Store,
    table: str,
    data: Any,
    join_keys: list[tuple[str, str]],
    features: list[tuple[str, str]],
    event_ts: str,
    created_ts: str | None = None,
    *,
    job: str,
    attempt: str,
) -> bytes:
    """One task's share of a distributed materialization: converts every row of `data`,
    writes the buckets they touch under `<table>/data/_staged/<job>/<attempt>/` against the
    table's current state, and returns a token for `commit_staged`. Nothing is visible until
    then; on an error nothing is left behind."""

def commit_staged(store: Store, table: str, tokens: list[bytes]) -> WriteReport:
    """Commits the buckets of every token in one snapshot; buckets another writer changed
    after they were staged are merged again from the staged rows (`replanned_buckets`)."""

def discard_staged(store: Store, table: str, job: str, keep: list[bytes]) -> int:
    """Deletes every file under the job's staging directory that neither the table nor a token
    in `keep` references (failed, killed or speculative attempts); returns how many."""

def metrics_snapshot() -> MetricsSnapshot:
    """Everything the process's stores have counted (read latencies, commits, cache, storage,
    per-table staleness and files), for `feast_iceberg.metrics` to turn into Prometheus
    families on a scrape."""

def set_metrics_enabled(enabled: bool) -> bool:
    """Turn per-read and per-commit counting on or off; returns the previous setting
    (`FEAST_ICEBERG_METRICS=0` starts with it off)."""
