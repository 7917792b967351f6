"""The reports the Rust core returns, as `TypedDict`s (plain dicts at runtime).

The stub of `feast_iceberg._internal` types its return values with these, so a misspelt key is
a type error. The keys are built in `src/bindings/`; `mypy.stubtest` (`make lint`) checks the
stub against the built module.
"""

from __future__ import annotations

from typing import TypedDict


class CommitTimings(TypedDict):
    """Where a commit's time went, in microseconds, summed over its attempts."""

    # Loading the table state (a catalog lookup; metadata and manifests when they moved).
    state_us: int
    # Reading what the buckets hold, writing data and delete files.
    plan_us: int
    # Writing the manifests and manifest list, building the metadata.
    prepare_us: int
    # The catalog commit (for SQL catalogs: metadata.json, then the swap).
    catalog_us: int
    # After the commit: expired snapshots' files and old metadata deleted.
    cleanup_us: int


class WriteReport(TypedDict):
    """What one `Store.write` (or `compact`) did."""

    rows_written: int
    # Rows older than the stored row of their key (newest event timestamp wins).
    rows_ignored_older: int
    buckets: int
    files_added: int
    files_removed: int
    # Position-delete files added by merge-on-read buckets.
    delete_files_added: int
    # Buckets written merge-on-read (the others of `buckets` were rewritten).
    merge_on_read_buckets: int
    attempts: int
    # Buckets merged again at commit time because another writer changed them first (the
    # others were rebased onto the winner's snapshot without rewriting a file).
    replanned_buckets: int
    # Times the write was carried onto another writer's newer commit, keeping its files.
    rebases: int
    timings: CommitTimings
    # The snapshot committed; None when nothing changed.
    snapshot_id: int | None


class CompactReport(WriteReport):
    """`compact`: the write report of its `replace` snapshot (on a dry run: the buckets and
    files it would rewrite), and the table's bucket count before and after."""

    # Different when the table was (would be) re-bucketed: every bucket split, every file
    # rewritten into the new `bucket[N](entity_key)` spec.
    buckets_before: int
    buckets_after: int
    # Live bytes of the largest bucket before (what the re-bucketing rule compares with
    # `target_bucket_bytes`).
    largest_bucket_bytes: int


class ArrowWriteReport(WriteReport):
    """`write_arrow`: the write reports of its chunks summed (`snapshot_id` is the last
    chunk's), plus what was read."""

    rows_read: int
    chunks: int


class OrphanReport(TypedDict):
    files: int
    bytes: int
    # Unreferenced files kept because they are younger than `older_than_seconds`.
    too_young: int
    paths: list[str]


class MigrationReport(TypedDict):
    already_migrated: bool
    files_read: int
    rows_read: int
    rows_live: int
    # The contrib table's last metadata file (its files are left in place).
    previous_metadata: str


class TableStats(TypedDict):
    snapshot_id: int | None
    snapshots: int
    data_files: int
    delete_files: int
    # Live rows: rows of the data files minus `position_deletes`.
    records: int
    position_deletes: int
    data_bytes: int
    # The N of `bucket[N](entity_key)`, and the live bytes of the largest bucket.
    buckets: int
    largest_bucket_bytes: int
    metadata_location: str
    metadata_log: int


class IoStats(TypedDict):
    metadata_bytes: int
    metadata_requests: int
    data_bytes: int
    data_requests: int
    prefetch_bytes: int
    prefetch_requests: int
    cache_bytes: int
    cache_entries: int
    cache_hits: int
    cache_misses: int
    cache_evictions: int
    index_files: int
    index_bytes: int
    index_rows: int


class ExpireReport(TypedDict):
    snapshots_expired: int


class TableMetrics(TypedDict):
    """One table's series in a `MetricsSnapshot` (summed over the stores that serve it)."""

    # Reads per latency bucket of `MetricsSnapshot.read_bucket_bounds`, not cumulative; one
    # more slot for reads slower than the last bound.
    read_buckets: list[int]
    read_seconds: float
    read_keys: int
    read_errors: int
    # Commit attempts by outcome: committed, conflict, unknown, error.
    commits: dict[str, int]
    commit_retries: int
    cleanup_failures: int
    # None when no live store has the table cached.
    staleness_seconds: float | None
    data_files: int | None
    delete_files: int | None


class MetricsSnapshot(TypedDict):
    """`metrics_snapshot()`: what every store of the process has counted."""

    stores: int
    read_bucket_bounds: list[float]
    cache_hits: int
    cache_misses: int
    cache_inserts: int
    cache_evictions: int
    cache_bytes: int
    cache_entries: int
    index_bytes: int
    # By kind: metadata, data, prefetch.
    storage_read_bytes: dict[str, int]
    storage_read_requests: dict[str, int]
    # By qualified table name, `namespace.table`.
    tables: dict[str, TableMetrics]


__all__ = [
    "ArrowWriteReport",
    "ExpireReport",
    "IoStats",
    "MetricsSnapshot",
    "MigrationReport",
    "OrphanReport",
    "TableMetrics",
    "TableStats",
    "WriteReport",
]
