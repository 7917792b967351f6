"""What the Spark and Ray engines share: a staged write, the worker steps, the driver's commit.

A materialization of one feature view into feast-iceberg runs like Iceberg's own Spark writer:

1. the driver checks that the view can be written natively (`plan_staged_write`) and picks a
   job id;
2. workers tag every Arrow batch with the Iceberg bucket of its rows' entity keys
   (`tag_buckets`, Rust's bucket transform), and the engine repartitions the rows so that each
   bucket lands in exactly one task;
3. each task stages its buckets (`stage_task`: converted, deduplicated and merged against the
   table's current snapshot, in parallel in Rust) into files under the job's staging
   directory, and returns an opaque token; nothing is visible yet;
4. the driver commits every token in one snapshot (`commit_tokens`), then deletes the files of
   attempts no token names: tasks that died, were retried or ran speculatively.

Everything shipped to workers is a `StagedWrite` (plain strings and tuples, picklable by any
engine): workers build their own `Store` from its config, once per process.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from . import _internal
from .engine import source_columns
from .online_store import IcebergOnlineStore, table_name

logger = logging.getLogger(__name__)

BUCKET_COLUMN = "__feast_iceberg_bucket"
"""The column workers add before the repartition: the row's Iceberg bucket (or its task
group, see `tag_buckets`). Dropped again before staging."""

TOKEN_COLUMN = "token"

FAULTS_ENV = "FEAST_ICEBERG_TEST_FAULTS"
"""Test hook: a directory. A worker that stages a task while a file `exit-after-stage` is in it
removes the file and dies (`os._exit`) with its files written and its token not returned: the
task killed mid-write that the engines' tests retry. Unset (always, outside tests): no effect."""


@dataclass(frozen=True)
class StagedWrite:
    """One feature view's staged write: what every task of the job needs."""

    # The store's settings, credentials included: shipped to workers, never shown.
    store_json: str = field(repr=False)
    table: str
    view: str
    job: str
    join_keys: tuple[tuple[str, str], ...]
    features: tuple[tuple[str, str], ...]
    event_ts: str
    created_ts: str | None

    def columns(self) -> dict[str, Any]:
        """The column mapping, as `stage_arrow` (and `write_arrow`) take it."""
        return {
            "join_keys": list(self.join_keys),
            "features": list(self.features),
            "event_ts": self.event_ts,
            "created_ts": self.created_ts,
        }


def plan_staged_write(context: Any, view: Any, schema: pa.Schema) -> StagedWrite | None:
    """The staged write of `view`'s online half for an offline result of `schema`, or None
    (nothing done, the reason logged) when Feast's own output step must write it."""
    online = context.online_store
    if not getattr(view, "online", False) or not isinstance(online, IcebergOnlineStore):
        return None
    columns = source_columns(view)
    if columns is None:
        _fallback(view, "no batch source")
        return None
    vectors = [f.name for f in view.features if getattr(f, "vector_index", False)]
    if vectors:
        # Feast checks vector widths over the whole result; a task sees only its share.
        _fallback(view, f"vector features {vectors}")
        return None
    config = context.repo_config
    name = table_name(config, view)
    why = _internal.check_arrow(online._store(config), name, schema, **columns)
    if why is not None:
        _fallback(view, why)
        return None
    store_json = config.online_store.to_store_json(
        config.repo_path, config.entity_key_serialization_version
    )
    return StagedWrite(
        store_json=store_json,
        table=name,
        view=view.name,
        job=f"{uuid.uuid4().hex}",
        join_keys=tuple(columns["join_keys"]),
        features=tuple(columns["features"]),
        event_ts=columns["event_ts"],
        created_ts=columns["created_ts"],
    )


def _fallback(view: Any, reason: str) -> None:
    logger.info("feast-iceberg: %s takes Feast's proto path: %s", view.name, reason)


# ---- on the workers ------------------------------------------------------------------------

_stores: dict[tuple[int, str], _internal.Store] = {}
_stores_lock = threading.Lock()


def worker_store(write: StagedWrite) -> _internal.Store:
    """The process's `Store` for the write's config (one per process: never across a fork)."""
    key = (os.getpid(), write.store_json)
    store = _stores.get(key)
    if store is None:
        with _stores_lock:
            store = _stores.get(key)
            if store is None:
                if any(k[0] != key[0] for k in _stores):
                    _stores.clear()
                store = _internal.Store(write.store_json)
                _stores[key] = store
    return store


def tag_buckets(write: StagedWrite, batch: pa.RecordBatch, groups: int = 0) -> pa.RecordBatch:
    """`batch` with `BUCKET_COLUMN` added: each row's Iceberg bucket, or with `groups` > 0
    the bucket modulo `groups` (several buckets per task, every bucket in one task)."""
    buckets = pa.array(
        _internal.arrow_buckets(worker_store(write), write.table, batch, list(write.join_keys)),
        pa.int32(),
    )
    if groups > 0:
        buckets = pc.remainder(buckets, pa.scalar(groups, pa.int32()))
    return batch.append_column(BUCKET_COLUMN, buckets)


def stage_task(write: StagedWrite, batches: Iterable[pa.RecordBatch], attempt: str) -> bytes | None:
    """Stages every row of one task (all rows of the buckets it owns), in one call so that a
    bucket is staged once per attempt; None when the task got no rows."""
    parts = [b.drop_columns([BUCKET_COLUMN]) for b in batches if b.num_rows]
    if not parts:
        return None
    data = pa.Table.from_batches(parts)
    token = _internal.stage_arrow(
        worker_store(write),
        write.table,
        data,
        **write.columns(),
        job=write.job,
        attempt=attempt,
    )
    _fault_after_stage()
    return token


def token_batch(token: bytes | None) -> pa.RecordBatch:
    """A task's result as the one-column batch engines pass back to the driver."""
    tokens = [] if token is None else [token]
    return pa.RecordBatch.from_pydict({TOKEN_COLUMN: pa.array(tokens, pa.binary())})


def attempt_id(*parts: object) -> str:
    """A staging directory name unique to one task attempt: the engine's ids (for whoever
    reads the paths) and a random suffix (unique even where the engine reuses ids)."""
    return "-".join([*(str(p) for p in parts), uuid.uuid4().hex[:12]])


def _fault_after_stage() -> None:
    faults = os.environ.get(FAULTS_ENV)
    if not faults:
        return
    try:
        os.unlink(os.path.join(faults, "exit-after-stage"))
    except OSError as e:
        if e.errno == errno.ENOENT:
            return
        raise
    os._exit(17)


# ---- on the driver -------------------------------------------------------------------------


def bucket_count(context: Any, write: StagedWrite) -> int:
    """The table's number of buckets (`bucket[N](entity_key)`)."""
    store = context.online_store._store(context.repo_config)
    return int(_internal.table_buckets(store, write.table))


def commit_staged_write(
    context: Any, write: StagedWrite, stage: Callable[[], list[bytes]]
) -> dict[str, Any]:
    """Runs the engine's staging job (`stage` returns the tokens of the tasks that succeeded),
    commits every token in one snapshot, and deletes the files of every other attempt. Any
    error fails the materialization; the job's staged files are then deleted (a failed
    commit committed nothing: the core reconciles unknown outcomes before it raises)."""
    store = context.online_store._store(context.repo_config)
    started = time.perf_counter()
    try:
        tokens = stage()
        staged = time.perf_counter()
        report = dict(_internal.commit_staged(store, write.table, tokens))
    except BaseException:
        _discard(store, write, [])
        raise
    committed = time.perf_counter()
    report["discarded_files"] = _discard(store, write, tokens)
    report["tasks"] = len(tokens)
    # What the engine's job took (upstream steps, tagging, shuffle, staging) and the commit.
    report["stage_seconds"] = staged - started
    report["commit_seconds"] = committed - staged
    logger.debug("feast-iceberg staged write of %s (job %s): %s", write.view, write.job, report)
    return report


def _discard(store: _internal.Store, write: StagedWrite, keep: list[bytes]) -> int:
    """Deletes the job's staged files no token in `keep` names. A failure is only logged: the
    commit (or the error being raised) stands, and `remove-orphans` removes what is left."""
    try:
        return int(_internal.discard_staged(store, write.table, write.job, keep))
    except Exception as e:
        logger.warning(
            "feast-iceberg: could not delete the staged files of job %s on %s (left for "
            "`feast-iceberg remove-orphans`): %s",
            write.job,
            write.table,
            e,
        )
        return 0


__all__ = [
    "BUCKET_COLUMN",
    "FAULTS_ENV",
    "TOKEN_COLUMN",
    "StagedWrite",
    "attempt_id",
    "bucket_count",
    "commit_staged_write",
    "plan_staged_write",
    "stage_task",
    "tag_buckets",
    "token_batch",
    "worker_store",
]
