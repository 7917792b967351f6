"""Merge-on-read pushes: a small write adds a data file plus a position-delete file per bucket
instead of rewriting it. Semantics stay those of the copy-on-write path (newest event time
wins, an older row replaces nothing), other engines see one row per key, automatic compaction
keeps the files of a bucket bounded, and expiry and orphan removal know the delete files."""

from __future__ import annotations

import itertools
import multiprocessing
import random
import signal
import subprocess
import sys
import time
from datetime import timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    BASE_TS,
    Env,
    driver_key,
    driver_row,
    driver_view,
    expected_values,
    plain,
    repo_config,
)
from feast_iceberg.online_store import table_name
from test_interop import duckdb_with_iceberg

KEYS = 2000  # 16 buckets of ~125 rows: a push of a few keys is well under 10% of a bucket


def values(result: tuple) -> dict | None:
    _ts, feats = result
    return None if feats is None else {k: plain(v) for k, v in feats.items()}


def seeded(env: Env) -> Any:
    view = driver_view()
    env.apply(view)
    env.write(view, [driver_row(i, 0) for i in range(KEYS)])
    assert env.stats(view)["delete_files"] == 0
    return view


def check_all(env: Env, view: Any, model: dict[int, int]) -> None:
    """Every key reads back exactly the version the model says, in request order."""
    keys = list(range(KEYS + 10))
    results = env.read(view, [driver_key(i) for i in keys])
    for i, result in zip(keys, results, strict=True):
        if i in model:
            assert values(result) == expected_values(i, model[i]), i
            want_ts = (BASE_TS + timedelta(minutes=model[i])).replace(tzinfo=timezone.utc)
            assert result[0] == want_ts, i
        else:
            assert result == (None, None), i


def check_engines(env: Env, view: Any, model: dict[int, int]) -> None:
    """PyIceberg and DuckDB's iceberg extension see one row per key with the newest values."""
    table = env.pyiceberg_table(view)
    arrow = table.scan(selected_fields=("driver_id", "trips")).to_arrow()
    got = dict(
        zip(arrow.column("driver_id").to_pylist(), arrow.column("trips").to_pylist(), strict=True)
    )
    assert arrow.num_rows == len(model) == len(got)
    assert got == {i: expected_values(i, v)["trips"] for i, v in model.items()}
    con = duckdb_with_iceberg()
    rows = con.execute(
        f"SELECT driver_id, trips FROM iceberg_scan('{table.metadata_location}')"
    ).fetchall()
    assert len(rows) == len(model)
    assert dict(rows) == {i: expected_values(i, v)["trips"] for i, v in model.items()}


def test_a_small_push_writes_deletes_instead_of_rewriting_buckets(env: Env) -> None:
    view = seeded(env)
    before = env.stats(view)
    keys = [3, 700, 1500]  # different buckets
    env.write(view, [driver_row(i, 5) for i in keys])
    after = env.stats(view)
    touched = after["data_files"] - before["data_files"]
    assert touched >= 2, "each touched bucket got a new small file; none was rewritten"
    assert after["delete_files"] == touched
    assert after["position_deletes"] == len(keys)
    assert after["records"] == KEYS
    model = {i: 0 for i in range(KEYS)} | {i: 5 for i in keys}
    check_all(env, view, model)
    summary = env.pyiceberg_table(view).current_snapshot().summary
    assert summary.operation.value == "overwrite"
    assert int(summary["added-position-deletes"]) == len(keys)
    assert int(summary["added-delete-files"]) == touched
    assert int(summary["total-delete-files"]) == touched
    assert int(summary["total-position-deletes"]) == len(keys)
    assert env.store._store(env.config).duplicate_keys(table_name(env.config, view)) == 0


def test_push_semantics_match_copy_on_write(env: Env) -> None:
    view = seeded(env)
    model = {i: 0 for i in range(KEYS)}
    # Newer replaces.
    env.write(view, [driver_row(10, 4), driver_row(11, 4)])
    model |= {10: 4, 11: 4}
    check_all(env, view, model)
    # Older is ignored, in the same batch as a newer row for another key.
    snapshot = env.stats(view)["snapshot_id"]
    env.write(view, [driver_row(10, 2), driver_row(12, 3)])
    model[12] = 3
    check_all(env, view, model)
    assert env.stats(view)["snapshot_id"] != snapshot
    # A push of only older rows commits nothing.
    snapshot = env.stats(view)["snapshot_id"]
    env.write(view, [driver_row(10, 1), driver_row(11, 1)])
    assert env.stats(view)["snapshot_id"] == snapshot
    # Same event time: the newer created_ts wins, then the later write.
    key, feats, ts, created = driver_row(13, 6)
    _, feats_b, _, _ = driver_row(13, 7)
    env.write(view, [(key, feats_b, ts, created - timedelta(seconds=5))])
    env.write(view, [(key, feats, ts, created)])
    model[13] = 6
    check_all(env, view, model)
    # The same key pushed again and again: one live row, the newest.
    for version in range(8, 20):
        env.write(view, [driver_row(20, version)])
    model[20] = 19
    # A key not stored yet: added, nothing deleted.
    deletes = env.stats(view)["position_deletes"]
    env.write(view, [driver_row(KEYS + 5, 3)])
    model[KEYS + 5] = 3
    assert env.stats(view)["position_deletes"] == deletes
    check_all(env, view, model)
    check_engines(env, view, model)
    assert env.stats(view)["records"] == len(model)


def test_reads_from_a_fresh_process_apply_deletes_on_cold_files(env: Env) -> None:
    """A store with nothing cached probes single pages; the positions it finds must still be
    the file's, or deleted rows would come back."""
    view = seeded(env)
    model = {i: 0 for i in range(KEYS)}
    for version, keys in enumerate(([1, 2, 3], [2, 3], [3, 900]), start=1):
        env.write(view, [driver_row(i, version) for i in keys])
        model |= {i: version for i in keys}
    from feast_iceberg import IcebergOnlineStore

    fresh = Env(env.repo, repo_config(env.repo), IcebergOnlineStore())
    check_all(fresh, view, model)


def test_200_pushes_stay_exact_and_bounded_by_automatic_compaction(env: Env) -> None:
    view = seeded(env)
    rng = random.Random(7)
    model = {i: 0 for i in range(KEYS)}
    data_files = []
    for push in range(1, 201):
        keys = rng.sample(range(KEYS), 3)
        env.write(view, [driver_row(i, push) for i in keys])
        model |= {i: push for i in keys}
        data_files.append(env.stats(view)["data_files"])
    stats = env.stats(view)
    # merge_on_read_max_files (8) per bucket at most, one delete file fewer.
    assert max(data_files) <= 16 * 8, max(data_files)
    assert stats["delete_files"] <= 16 * 7
    # Compaction happened: the file count went down after growing.
    assert any(b < a for a, b in itertools.pairwise(data_files)), data_files
    assert stats["records"] == KEYS
    # Nothing unreferenced stays behind (expiry deleted old data and delete files), and the
    # warehouse holds live files, the manifests (16 of each kind at most), a list and the
    # metadata log, no more.
    store = env.store._store(env.config)
    orphans = store.remove_orphans(table_name(env.config, view), 0.0, True)
    assert orphans["paths"] == [], orphans
    parquet = [p for p in env.warehouse_files() if p.suffix == ".parquet"]
    assert len(parquet) == stats["data_files"] + stats["delete_files"]
    assert len(env.warehouse_files()) <= len(parquet) + 2 * 16 + 1 + 6
    check_all(env, view, model)
    check_engines(env, view, model)
    assert store.duplicate_keys(table_name(env.config, view)) == 0


def test_a_large_write_and_compaction_drop_the_delete_files(env: Env) -> None:
    view = seeded(env)
    env.write(view, [driver_row(i, 1) for i in (5, 600, 1200)])
    assert env.stats(view)["delete_files"] > 0
    # compact rewrites the buckets with deletes: one file each, deletes gone, rows unchanged.
    model = {i: 0 for i in range(KEYS)} | {5: 1, 600: 1, 1200: 1}
    report = env.store._store(env.config).compact(table_name(env.config, view))
    assert report["buckets"] >= 2
    stats = env.stats(view)
    assert (stats["delete_files"], stats["position_deletes"]) == (0, 0)
    check_all(env, view, model)
    # Small pushes again, then a write of every key: copy-on-write everywhere.
    env.write(view, [driver_row(i, 2) for i in (5, 601)])
    assert env.stats(view)["delete_files"] > 0
    env.write(view, [driver_row(i, 3) for i in range(KEYS)])
    stats = env.stats(view)
    assert (stats["delete_files"], stats["data_files"]) == (0, 16)
    check_all(env, view, dict.fromkeys(range(KEYS), 3))
    check_engines(env, view, dict.fromkeys(range(KEYS), 3))


def test_merge_on_read_can_be_turned_off(make_env: Any) -> None:
    env = make_env(merge_on_read_max_fraction=0)
    view = seeded(env)
    env.write(view, [driver_row(1, 1)])
    stats = env.stats(view)
    assert (stats["delete_files"], stats["data_files"]) == (0, 16)
    assert values(env.read(view, [driver_key(1)])[0]) == expected_values(1, 1)


PUSHES = 30
MATERIALIZATIONS = 6
PUSHED = [1, 2, 3, 500, 1000]


def pusher(repo: str, start: Any) -> None:
    from feast_iceberg import IcebergOnlineStore

    config, store, view = repo_config(Path(repo)), IcebergOnlineStore(), driver_view()
    start.wait()
    for push in range(PUSHES):
        # Newer than anything the materializer writes.
        rows = [driver_row(i, 1000 + push) for i in PUSHED]
        store.online_write_batch(config, view, rows, None)


def materializer(repo: str, start: Any) -> None:
    from feast_iceberg import IcebergOnlineStore

    config, store, view = repo_config(Path(repo)), IcebergOnlineStore(), driver_view()
    start.wait()
    for version in range(1, MATERIALIZATIONS + 1):
        store.online_write_batch(config, view, [driver_row(i, version) for i in range(KEYS)], None)


def test_a_push_and_a_materialization_in_two_processes_lose_no_update(env: Env) -> None:
    view = seeded(env)
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(2)
    procs = [ctx.Process(target=f, args=(str(env.repo), start)) for f in (pusher, materializer)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0]
    model = dict.fromkeys(range(KEYS), MATERIALIZATIONS) | dict.fromkeys(PUSHED, 1000 + PUSHES - 1)
    check_all(env, view, model)
    check_engines(env, view, model)


@pytest.mark.backends
def test_pushes_on_every_catalog_and_storage(env: Env) -> None:
    """Delete files go through the same FileIO and catalog commit as data files: SQL catalogs,
    REST + S3."""
    view = seeded(env)
    model = dict.fromkeys(range(KEYS), 0)
    for version in range(1, 12):
        keys = [version, version + 1, 1000 + version]
        env.write(view, [driver_row(i, version) for i in keys])
        model |= dict.fromkeys(keys, version)
    stats = env.stats(view)
    assert stats["delete_files"] > 0 and stats["records"] == KEYS
    check_all(env, view, model)
    arrow = env.pyiceberg_table(view).scan(selected_fields=("driver_id", "trips")).to_arrow()
    got = dict(
        zip(arrow.column("driver_id").to_pylist(), arrow.column("trips").to_pylist(), strict=True)
    )
    assert got == {i: expected_values(i, v)["trips"] for i, v in model.items()}


PUSH_WRITER = """
import sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from conftest import driver_row, driver_view, repo_config
from feast_iceberg import IcebergOnlineStore

config, store, view = repo_config(Path({repo!r})), IcebergOnlineStore(), driver_view()
for version in range(1, 100000):
    store.online_write_batch(config, view, [driver_row(i, version) for i in (7, 8, 900)], None)
    print(version, flush=True)
"""


def test_a_pusher_killed_mid_push_leaves_the_table_consistent(env: Env) -> None:
    view = seeded(env)
    script = PUSH_WRITER.format(tests=str(Path(__file__).parent), repo=str(env.repo))
    writer = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert writer.stdout is not None
    for _ in range(5):  # a few pushes committed, the next in flight
        assert writer.stdout.readline().strip(), writer.stderr.read() if writer.stderr else ""
    time.sleep(0.05)
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=30)

    from feast_iceberg import IcebergOnlineStore

    fresh = Env(env.repo, repo_config(env.repo), IcebergOnlineStore())
    # Each push committed all of its rows or none: the three keys share one version.
    results = fresh.read(view, [driver_key(i) for i in (7, 8, 900)])
    versions = {
        plain(f["trips"]) - i * 1000 for i, (_, f) in zip((7, 8, 900), results, strict=True)
    }
    assert len(versions) == 1 and min(versions) >= 5, versions
    model = dict.fromkeys(range(KEYS), 0) | dict.fromkeys((7, 8, 900), versions.pop())
    check_all(fresh, view, model)
    check_engines(fresh, view, model)
    # What the killed push wrote is an orphan; removing orphans leaves exactly the live files.
    store = fresh.store._store(fresh.config)
    store.remove_orphans(table_name(fresh.config, view), 0.0, False)
    stats = fresh.stats(view)
    parquet = [p for p in fresh.warehouse_files() if p.suffix == ".parquet"]
    assert len(parquet) == stats["data_files"] + stats["delete_files"]
    check_all(fresh, view, model)
