"""Staged writes (`stage_arrow` / `commit_staged` / `discard_staged`), the Rust half of the
distributed engines: tasks stage the buckets they own, the driver commits every token in one
snapshot, merges again only the buckets another writer changed meanwhile, and deletes what
failed attempts left behind."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from conftest import BASE_TS, Env, driver_key, driver_row, driver_view, expected_values, plain
from feast_iceberg import InvalidInputError, _internal
from feast_iceberg.engine import source_columns
from feast_iceberg.online_store import table_name

N = 400


def offline(keys: range, version: int) -> pa.Table:
    """An offline-store result: what `driver_row(i, version)` holds, in Feast's Arrow types."""
    ts = BASE_TS + timedelta(minutes=version)
    return pa.table(
        {
            "driver_id": pa.array(list(keys), pa.int64()),
            "conv_rate": pa.array([(i % 64) / 64 + version for i in keys], pa.float32()),
            "acc_rate": pa.array([i * 0.5 + version for i in keys], pa.float64()),
            "trips": pa.array([i * 1000 + version for i in keys], pa.int64()),
            "city": pa.array([f"city-{i}-{version}" for i in keys], pa.string()),
            "ts": pa.array([ts] * len(keys), pa.timestamp("us", tz="UTC")),
        }
    )


class Job:
    def __init__(self, env: Env, view: Any, job: str = "job1") -> None:
        self.store = env.store._store(env.config)
        self.name = table_name(env.config, view)
        self.columns = source_columns(view)
        assert self.columns is not None
        self.job = job

    def by_bucket(self, data: pa.Table, parts: int) -> list[pa.Table]:
        """The rows repartitioned by bucket, as an engine does, into `parts` tasks."""
        keys = [(k, k) for k, _ in self.columns["join_keys"]]
        buckets = _internal.arrow_buckets(self.store, self.name, data, keys)
        assert len(buckets) == data.num_rows
        assert all(0 <= b < _internal.table_buckets(self.store, self.name) for b in buckets)
        return [data.filter(pa.array([b % parts == p for b in buckets])) for p in range(parts)]

    def stage(self, data: pa.Table, attempt: str) -> bytes:
        return _internal.stage_arrow(
            self.store, self.name, data, **self.columns, job=self.job, attempt=attempt
        )

    def commit(self, tokens: list[bytes]) -> dict:
        return dict(_internal.commit_staged(self.store, self.name, tokens))

    def discard(self, keep: list[bytes]) -> int:
        return _internal.discard_staged(self.store, self.name, self.job, keep)


def values(env: Env, view: Any, keys: range) -> list[Any]:
    out = []
    for _, feats in env.read(view, [driver_key(i) for i in keys]):
        assert feats is not None
        out.append({k: plain(v) for k, v in feats.items()})
    return out


def staged_files(env: Env) -> list[Path]:
    return [p for p in env.warehouse_files() if "_staged" in p.parts and p.suffix == ".parquet"]


def test_tokens_of_many_tasks_commit_in_one_snapshot(env: Env) -> None:
    view = driver_view()
    env.apply(view)
    env.write(view, [driver_row(i, 0) for i in range(N)])
    before = env.stats(view)["snapshot_id"]
    job = Job(env, view)
    parts = job.by_bucket(offline(range(N), 1), 3)
    tokens = [job.stage(p, f"task{n}-a0") for n, p in enumerate(parts)]
    # Nothing is visible before the commit.
    assert values(env, view, range(3)) == [expected_values(i, 0) for i in range(3)]
    report = job.commit(tokens)
    assert report["rows_written"] == N
    assert report["replanned_buckets"] == 0
    # One snapshot, on top of the one before.
    current = env.pyiceberg_table(view).current_snapshot()
    assert current.snapshot_id == report["snapshot_id"]
    assert current.parent_snapshot_id == before
    assert values(env, view, range(N)) == [expected_values(i, 1) for i in range(N)]
    assert env.pyiceberg_table(view).scan().to_arrow().num_rows == N
    # Every staged file is referenced: discard deletes nothing.
    assert job.discard(tokens) == 0


def test_failed_attempts_are_never_committed_and_are_discarded(env: Env) -> None:
    view = driver_view()
    env.apply(view)
    job = Job(env, view)
    (part,) = job.by_bucket(offline(range(N), 1), 1)
    dead = job.stage(part, "task0-a0")  # an attempt whose result never reached the driver
    dead_files = set(staged_files(env))
    assert dead_files
    retried = job.stage(part, "task0-a1")
    job.commit([retried])
    assert job.discard([retried]) == len(dead_files)
    assert not (set(staged_files(env)) & dead_files)
    assert env.pyiceberg_table(view).scan().to_arrow().num_rows == N
    assert values(env, view, range(N)) == [expected_values(i, 1) for i in range(N)]
    # A job that failed: discard with nothing kept removes every staged file it wrote.
    lost = Job(env, view, job="job2")
    lost.stage(part, "task0-a0")
    assert lost.discard([]) > 0
    assert all("job2" not in p.parts for p in staged_files(env))
    del dead


def test_a_bucket_another_writer_changed_is_merged_again(env: Env) -> None:
    view = driver_view()
    env.apply(view)
    env.write(view, [driver_row(i, 0) for i in range(N)])
    job = Job(env, view)
    (part,) = job.by_bucket(offline(range(N), 2), 1)
    token = job.stage(part, "task0-a0")
    # Another writer commits after staging: newer rows for keys 0-9, older ones for 10-19.
    env.write(view, [driver_row(i, 5) for i in range(10)])
    env.write(view, [driver_row(i, 1) for i in range(10, 20)])
    report = job.commit([token])
    assert report["replanned_buckets"] > 0
    got = values(env, view, range(N))
    assert got[:10] == [expected_values(i, 5) for i in range(10)]
    assert got[10:] == [expected_values(i, 2) for i in range(10, N)]
    assert env.pyiceberg_table(view).scan().to_arrow().num_rows == N
    assert job.discard([token]) >= 0
    assert len({p.name for p in staged_files(env)}) == len(staged_files(env))


def test_one_bucket_staged_by_two_tasks_keeps_the_newest_rows(env: Env) -> None:
    view = driver_view()
    env.apply(view)
    job = Job(env, view)
    first = job.stage(offline(range(N), 1), "task0-a0")
    second = job.stage(offline(range(0, N, 2), 3), "task1-a0")
    job.commit([first, second])
    got = values(env, view, range(N))
    assert got == [expected_values(i, 3 if i % 2 == 0 else 1) for i in range(N)]
    assert env.pyiceberg_table(view).scan().to_arrow().num_rows == N


def test_tokens_are_checked(env: Env) -> None:
    view, other = driver_view(), driver_view("other_stats")
    env.apply(view, other)
    job = Job(env, view)
    token = job.stage(offline(range(10), 1), "task0-a0")
    with pytest.raises(InvalidInputError, match="cannot be committed"):
        Job(env, other).commit([token])
    with pytest.raises(InvalidInputError, match="token"):
        job.commit([b"not a token"])
    report = job.commit([])
    assert report["snapshot_id"] is None
