"""Buckets that grow with the table: `compact` re-buckets a table whose largest bucket outgrew
`target_bucket_bytes` (or when `--buckets N` asks), as one partition-spec evolution committed
with the rewrite of every file into the new spec. Every key keeps its newest row, reads find
keys in every new bucket, other engines see one row per key and prune by the new spec, and
writers planned on the old spec (pushes, staged distributed writes) lose nothing."""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    Env,
    driver_key,
    driver_row,
    driver_view,
    expected_values,
    plain,
    repo_config,
)
from feast.infra.key_encoding_utils import serialize_entity_key
from feast_iceberg import InvalidInputError, _internal
from feast_iceberg.online_store import table_name
from pyiceberg.expressions import EqualTo

pytestmark = pytest.mark.backends

KEYS = 2000


def store_of(env: Env) -> _internal.Store:
    return env.store._store(env.config)


def compact(env: Env, view: Any, **kwargs: Any) -> dict[str, Any]:
    return dict(store_of(env).compact(table_name(env.config, view), **kwargs))


def check_versions(env: Env, view: Any, version_of: Callable[[int], int], keys: range) -> None:
    got = env.read(view, [driver_key(i) for i in keys])
    for i, (_, feats) in zip(keys, got, strict=True):
        assert feats is not None, i
        assert {k: plain(v) for k, v in feats.items()} == expected_values(i, version_of(i)), i


def spec_buckets(table: Any) -> list[str]:
    return [str(f.transform) for f in table.spec().fields]


def data_partitions(table: Any) -> list[tuple[int, int]]:
    """(spec id, bucket) of every live data file, as PyIceberg plans a full scan."""
    return sorted((t.file.spec_id, t.file.partition[0]) for t in table.scan().plan_files())


def loaded(make_env: Callable[..., Env], **online: Any) -> tuple[Env, Any]:
    """A table of `KEYS` keys at version 1 (4 buckets unless `online` says otherwise)."""
    env = make_env(**{"partition_count": 4, **online})
    view = driver_view()
    env.apply(view)
    env.write(view, [driver_row(i, 1) for i in range(KEYS)])
    return env, view


def test_forced_rebucketing_keeps_every_key_and_other_engines_prune_by_the_new_spec(
    make_env: Callable[..., Env],
) -> None:
    env, view = loaded(make_env)
    # A small push (merge-on-read: position deletes) and one older row (ignored).
    env.write(view, [driver_row(i, 2) for i in range(0, KEYS, 50)])
    env.write(view, [driver_row(7, 0)])
    assert env.stats(view)["delete_files"] > 0

    def newest(i: int) -> int:
        return 2 if i % 50 == 0 else 1

    before = env.pyiceberg_table(view)
    assert spec_buckets(before) == ["bucket[4]"]

    plan = compact(env, view, buckets=16, dry_run=True)
    assert (plan["buckets_before"], plan["buckets_after"]) == (4, 16)
    assert plan["buckets"] == 4 and plan["files_removed"] >= 4
    assert env.pyiceberg_table(view).metadata_location == before.metadata_location

    done = compact(env, view, buckets=16)
    assert (done["buckets_before"], done["buckets_after"]) == (4, 16)
    assert done["files_added"] == 16 and done["snapshot_id"] is not None
    stats = env.stats(view)
    assert (stats["buckets"], stats["records"], stats["delete_files"]) == (16, KEYS, 0)
    check_versions(env, view, newest, range(KEYS))

    table = env.pyiceberg_table(view)
    assert spec_buckets(table) == ["bucket[16]"]
    assert len(table.specs()) == 2  # the old spec stays in the metadata, as Iceberg keeps it
    assert table.current_snapshot().summary.operation.value == "replace"
    # Every live file is in the new spec, one per bucket, every bucket filled.
    spec_id = table.spec().spec_id
    assert data_partitions(table) == [(spec_id, b) for b in range(16)]
    arrow = table.scan(selected_fields=("driver_id", "trips")).to_arrow()
    assert arrow.num_rows == KEYS and len(set(arrow.column("driver_id").to_pylist())) == KEYS
    # A point filter on the entity key prunes to the key's bucket under the new spec.
    key = serialize_entity_key(driver_key(1234), 3)
    (task,) = table.scan(row_filter=EqualTo("entity_key", key)).plan_files()
    assert task.file.spec_id == spec_id
    one = table.scan(row_filter="driver_id = 1234").to_arrow()
    assert one.column("trips").to_pylist() == [expected_values(1234, 1)["trips"]]
    con = table.scan(selected_fields=("driver_id",)).to_duckdb(table_name="t")
    assert con.sql("SELECT count(*), count(DISTINCT driver_id) FROM t").fetchone() == (KEYS, KEYS)

    # Writes land in the new spec; a fresh reader (no cache) reads the same.
    env.write(view, [driver_row(i, 3) for i in range(0, KEYS, 3)])

    def newest3(i: int) -> int:
        return 3 if i % 3 == 0 else newest(i)

    check_versions(env, view, newest3, range(KEYS))
    fresh = Env(env.repo, repo_config(env.repo, **env.online), type(env.store)(), env.online)
    check_versions(fresh, view, newest3, range(KEYS))
    assert {s for s, _ in data_partitions(env.pyiceberg_table(view))} == {spec_id}


def test_compaction_rebuckets_by_the_size_rule_and_says_so_on_a_dry_run(
    make_env: Callable[..., Env],
) -> None:
    env, view = loaded(make_env, partition_count=2, target_bucket_bytes=16 * 1024)
    largest = env.stats(view)["largest_bucket_bytes"]
    assert largest > 16 * 1024
    # The fewest doublings that bring the largest bucket to 3/4 of the target.
    want = 2
    while largest * 2 > 12 * 1024 * want:
        want *= 2
    plan = compact(env, view, dry_run=True)
    assert (plan["buckets_before"], plan["buckets_after"]) == (2, want)
    assert plan["largest_bucket_bytes"] == largest
    assert env.stats(view)["buckets"] == 2

    done = compact(env, view)
    assert done["buckets_after"] == want
    assert env.stats(view)["largest_bucket_bytes"] <= 16 * 1024
    check_versions(env, view, lambda _: 1, range(KEYS))
    # Within the target now: a compaction has nothing to re-bucket (or rewrite).
    again = compact(env, view)
    assert (again["buckets_before"], again["buckets_after"], again["buckets"]) == (want, want, 0)


def test_bad_bucket_counts_are_refused_and_an_empty_table_only_changes_its_spec(
    make_env: Callable[..., Env],
) -> None:
    env = make_env(partition_count=4)
    view = driver_view()
    env.apply(view)
    for bad in (6, 2, 8192):
        with pytest.raises(InvalidInputError, match="multiple of 4"):
            compact(env, view, buckets=bad)
    done = compact(env, view, buckets=8)
    assert (done["buckets_after"], done["snapshot_id"]) == (8, None)
    assert spec_buckets(env.pyiceberg_table(view)) == ["bucket[8]"]
    env.write(view, [driver_row(i, 1) for i in range(300)])
    check_versions(env, view, lambda _: 1, range(300))
    assert {b for _, b in data_partitions(env.pyiceberg_table(view))} == set(range(8))


def test_a_token_staged_on_the_old_spec_lands_in_the_new_buckets(
    make_env: Callable[..., Env],
) -> None:
    from test_staged import Job, offline

    env, view = loaded(make_env)
    job = Job(env, view)
    tokens = [
        job.stage(part, f"a{p}")
        for p, part in enumerate(job.by_bucket(offline(range(0, 600), 2), 2))
    ]
    compact(env, view, buckets=16)
    report = job.commit(tokens)
    # Merged again from the staged files, which hold the rest of their old buckets too.
    assert report["rows_written"] >= 600
    check_versions(env, view, lambda i: 2 if i < 600 else 1, range(KEYS))
    table = env.pyiceberg_table(view)
    assert {s for s, _ in data_partitions(table)} == {table.spec().spec_id}
    assert table.scan().to_arrow().num_rows == KEYS
    job.discard(tokens)


def test_a_reader_holding_the_old_buckets_switches_to_the_new_ones(
    make_env: Callable[..., Env],
) -> None:
    env, view = loaded(make_env, metadata_refresh_seconds=0.05)
    reader = Env(env.repo, repo_config(env.repo, **env.online), type(env.store)(), env.online)
    check_versions(reader, view, lambda _: 1, range(KEYS))  # its caches hold the old files
    compact(env, view, buckets=32)
    env.write(view, [driver_row(i, 2) for i in range(0, KEYS, 5)])

    def newest(i: int) -> int:
        return 2 if i % 5 == 0 else 1

    # The reader serves its old state until its background refresh has prepared the new one
    # (or a file it needs is gone): every key is found all along, at one version or the other.
    deadline = time.monotonic() + 30
    while True:
        got = reader.read(view, [driver_key(i) for i in range(KEYS)])
        trips = [None if f is None else plain(f["trips"]) for _, f in got]
        allowed = [
            {expected_values(i, 1)["trips"], expected_values(i, newest(i))["trips"]}
            for i in range(KEYS)
        ]
        assert all(t in a for t, a in zip(trips, allowed, strict=True))
        if trips == [expected_values(i, newest(i))["trips"] for i in range(KEYS)]:
            break
        assert time.monotonic() < deadline, "the reader never switched to the new buckets"
        time.sleep(0.05)
    check_versions(reader, view, newest, range(KEYS))


WRITES = 8


def writer_process(repo: str, online: dict[str, Any]) -> None:
    from feast_iceberg import IcebergOnlineStore

    config = repo_config(Path(repo), **online)
    store, view = IcebergOnlineStore(), driver_view()
    for version in range(2, 2 + WRITES):
        # A materialization of every key, then a push of a few (merge-on-read).
        store.online_write_batch(config, view, [driver_row(i, version) for i in range(KEYS)], None)
        pushed = range(version, KEYS, 97)
        store.online_write_batch(config, view, [driver_row(i, version + 100) for i in pushed], None)


def test_a_concurrent_writer_loses_nothing_while_the_table_is_rebucketed(env: Env) -> None:
    view = driver_view()
    env.apply(view)
    env.write(view, [driver_row(i, 1) for i in range(KEYS)])
    writer = multiprocessing.get_context("spawn").Process(
        target=writer_process, args=(str(env.repo), env.online)
    )
    writer.start()
    rebucketed = 0
    while writer.is_alive() and env.stats(view)["buckets"] < 256:
        buckets = env.stats(view)["buckets"]
        done = compact(env, view, buckets=buckets * 2)
        rebucketed += done["buckets_after"] > buckets
    writer.join(timeout=300)
    assert writer.exitcode == 0
    assert rebucketed >= 1

    def newest(i: int) -> int:
        # A push's event time (version + 100 minutes) is after every materialization's.
        pushes = [v + 100 for v in range(2, 2 + WRITES) if i >= v and (i - v) % 97 == 0]
        return max(pushes, default=1 + WRITES)

    check_versions(env, view, newest, range(KEYS))
    table = env.pyiceberg_table(view)
    assert table.scan().to_arrow().num_rows == KEYS
    assert {s for s, _ in data_partitions(table)} == {table.spec().spec_id}
