"""The commit protocol under many writers, with real processes on every backend: writers of
disjoint buckets rebase instead of re-planning, concurrent writes of one process coalesce into
one snapshot without one caller's bad batch failing another, and a writer killed mid-commit
leaves a consistent table holding every write it acknowledged."""

from __future__ import annotations

import multiprocessing
import os
import random
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from conftest import BASE_TS, Env, driver_key, driver_row, driver_view, expected_values, plain
from conftest import repo_config as make_repo_config
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from feast_iceberg import InvalidInputError, _internal
from feast_iceberg.online_store import table_name

pytestmark = pytest.mark.backends

# Manifests of one kind (data, deletes) a snapshot lists at most (src/commit/snapshot.rs).
MAX_MANIFESTS = 16


def keys_by_bucket(env: Env, view: Any, count: int) -> dict[int, list[int]]:
    """Driver ids grouped by the bucket the table puts them in."""
    store = env.store._store(env.config)
    ids = list(range(count))
    buckets = _internal.arrow_buckets(
        store,
        table_name(env.config, view),
        pa.table({"driver_id": pa.array(ids, pa.int64())}),
        [("driver_id", "driver_id")],
    )
    out: dict[int, list[int]] = {}
    for i, b in zip(ids, buckets, strict=True):
        out.setdefault(b, []).append(i)
    return out


def report_writer(repo: str, online: dict[str, Any], keys: list[int], start: Any, out: Any) -> None:
    """Single-row writes of `keys`, in order, each version 1; the write reports go to `out`."""
    from feast_iceberg import IcebergOnlineStore
    from feast_iceberg.online_store import _optional_micros, _serialize, _to_micros

    config = make_repo_config(Path(repo), **online)
    online_store = IcebergOnlineStore()
    view = driver_view()
    store = online_store._store(config)
    name = table_name(config, view)
    names = ["conv_rate", "acc_rate", "trips", "city"]
    start.wait()
    reports = []
    for i in keys:
        key, feats, ts, created = driver_row(i, 1)
        reports.append(
            dict(
                store.write(
                    name,
                    names,
                    [_serialize(key)],
                    [_serialize(feats[n]) for n in names],
                    [_to_micros(ts)],
                    [_optional_micros(created)],
                )
            )
        )
    out.put(reports)


def test_writers_of_disjoint_buckets_rebase_without_replanning(env: Env) -> None:
    view = driver_view()
    env.apply(view)
    groups = sorted(keys_by_bucket(env, view, 400).items())
    # Writer 0 owns the even buckets, writer 1 the odd ones: no bucket is written by both.
    owned = [[k for b, ks in groups if b % 2 == w for k in ks][:30] for w in range(2)]
    ctx = multiprocessing.get_context("spawn")
    rebases = 0
    for _ in range(3):  # until the writers did interleave (practically always the first time)
        start, out = ctx.Barrier(2), ctx.Queue()
        procs = [
            ctx.Process(
                target=report_writer, args=(str(env.repo), env.online, owned[w], start, out)
            )
            for w in range(2)
        ]
        for p in procs:
            p.start()
        reports = [r for _ in procs for r in out.get(timeout=300)]
        for p in procs:
            p.join(timeout=60)
        assert [p.exitcode for p in procs] == [0, 0]
        # Carried onto the other writer's commits (under the SQL catalogs' commit lock, or
        # after a lost race on REST) with the prepared files kept: nothing planned again.
        assert all(r["replanned_buckets"] == 0 for r in reports), reports
        assert all(r["rows_written"] == 1 for r in reports)
        rebases += sum(r["rebases"] for r in reports)
        if rebases:
            break
    assert rebases > 0, "the two writers never interleaved"
    keys = owned[0] + owned[1]
    env.stats(view)  # reads serve the cached state until refreshed: load the current one
    got = env.read(view, [driver_key(i) for i in keys])
    assert [{k: plain(v) for k, v in f.items()} for _, f in got if f] == [
        expected_values(i, 1) for i in keys
    ]


def test_a_stale_plan_rebases_onto_a_disjoint_commit(env: Env) -> None:
    """Deterministically: a change planned on an older snapshot (a staged token) lands on top
    of another writer's commit to other buckets with its files as they were written."""
    view = driver_view()
    env.apply(view)
    groups = sorted(keys_by_bucket(env, view, 400).items())
    mine = [k for b, ks in groups if b % 2 == 0 for k in ks]
    theirs = [k for b, ks in groups if b % 2 == 1 for k in ks]
    env.write(view, [driver_row(i, 0) for i in mine + theirs])
    store = env.store._store(env.config)
    name = table_name(env.config, view)
    data = pa.table(
        {
            "driver_id": pa.array(mine, pa.int64()),
            "conv_rate": pa.array([(i % 64) / 64 + 2 for i in mine], pa.float32()),
            "acc_rate": pa.array([i * 0.5 + 2 for i in mine], pa.float64()),
            "trips": pa.array([i * 1000 + 2 for i in mine], pa.int64()),
            "city": pa.array([f"city-{i}-2" for i in mine], pa.string()),
            "ts": pa.array([BASE_TS.replace(minute=2)] * len(mine), pa.timestamp("us", tz="UTC")),
        }
    )
    token = _internal.stage_arrow(
        store,
        name,
        data,
        [("driver_id", "driver_id")],
        [(f, f) for f in ["conv_rate", "acc_rate", "trips", "city"]],
        "ts",
        job="rebase",
        attempt="a0",
    )
    env.write(view, [driver_row(i, 3) for i in theirs])  # commits first, other buckets
    staged = set(re.findall(r"[^\"\\]*/_staged/rebase/a0/[^\"\\]*\.parquet", token.decode()))
    assert staged
    report = _internal.commit_staged(store, name, [token])
    assert report["replanned_buckets"] == 0
    assert report["attempts"] == 1
    live = set(env.pyiceberg_table(view).inspect.files()["file_path"].to_pylist())
    assert staged <= live  # the staged files themselves were committed
    got = env.read(view, [driver_key(i) for i in mine + theirs])
    want = [expected_values(i, 2) for i in mine] + [expected_values(i, 3) for i in theirs]
    assert [{k: plain(v) for k, v in f.items()} for _, f in got if f] == want


def test_pushes_share_manifests_and_every_engine_reads_one_row_per_key(make_env: Any) -> None:
    """A push writes one manifest of its own files, rewrites only the manifests listing a file
    it replaces, and carries the others by reference; past MAX_MANIFESTS of a kind they are
    folded into one. Through all of it PyIceberg (and DuckDB, on local warehouses) read one
    row per key with the newest values, and expiry deletes exactly the manifests no live
    snapshot lists."""
    # Two runs per bucket at most: pushes also merge runs, so manifests get rewritten.
    env = make_env(merge_on_read_max_files=2)
    view = driver_view()
    env.apply(view)
    keys = 600
    env.write(view, [driver_row(i, 0) for i in range(keys)])
    model = {i: 0 for i in range(keys)}
    rng = random.Random(11)
    carried = removed = 0
    for push in range(1, 41):
        pushed = rng.sample(range(keys), 2)
        env.write(view, [driver_row(i, push) for i in pushed])
        model |= {i: push for i in pushed}
        table = env.pyiceberg_table(view)
        snapshot = table.current_snapshot()
        manifests = snapshot.manifests(table.io)
        for kind in {m.content for m in manifests}:
            assert sum(m.content == kind for m in manifests) <= MAX_MANIFESTS, manifests
        # Every manifest the snapshot lists is there (expiry deleted none of them).
        assert all(table.io.new_input(m.manifest_path).exists() for m in manifests)
        carried += sum(m.added_snapshot_id != snapshot.snapshot_id for m in manifests)
        removed += int(snapshot.summary.get("deleted-data-files") or 0)
    assert carried > 0, "no manifest was carried by reference"
    assert removed > 0, "no push replaced a data file"
    arrow = env.pyiceberg_table(view).scan(selected_fields=("driver_id", "trips")).to_arrow()
    got = dict(
        zip(arrow.column("driver_id").to_pylist(), arrow.column("trips").to_pylist(), strict=True)
    )
    assert arrow.num_rows == keys
    assert got == {i: expected_values(i, v)["trips"] for i, v in model.items()}
    env.stats(view)  # load the current state for the reads below
    read = env.read(view, [driver_key(i) for i in range(keys)])
    assert [f["trips"].int64_val for _, f in read if f] == [got[i] for i in range(keys)]
    if "://" in str(env.config.online_store.warehouse):
        return
    from test_interop import duckdb_with_iceberg

    location = env.pyiceberg_table(view).metadata_location
    rows = duckdb_with_iceberg().execute(f"SELECT driver_id, trips FROM iceberg_scan('{location}')")
    assert dict(rows.fetchall()) == got
    # Nothing unreferenced stays behind: manifests no live snapshot lists were deleted.
    store = env.store._store(env.config)
    orphans = store.remove_orphans(table_name(env.config, view), 0.0, True)
    assert orphans["paths"] == [], orphans


def versioned_writer(
    repo: str, online: dict[str, Any], keys: list[int], version: int, batch: int, start: Any
) -> None:
    """Writes `keys` at `version`, `batch` rows per commit, three times over."""
    from feast_iceberg import IcebergOnlineStore

    config = make_repo_config(Path(repo), **online)
    store = IcebergOnlineStore()
    view = driver_view()
    start.wait()
    for _ in range(3):
        for at in range(0, len(keys), batch):
            rows = [driver_row(i, version) for i in keys[at : at + batch]]
            store.online_write_batch(config, view, rows, None)


def test_older_pushes_racing_a_newer_load_commit_nothing_and_fail_nothing(env: Env) -> None:
    """Pushes of rows older than what a concurrent load writes: planned again under the commit
    lock (or after a lost race) they replace nothing, and must then end without a snapshot
    rather than fail (a snapshot-less commit once expired the current snapshot)."""
    view = driver_view()
    env.apply(view)
    keys = list(range(60))
    env.write(view, [driver_row(i, 0) for i in keys])
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(4)
    loader = ctx.Process(
        target=versioned_writer, args=(str(env.repo), env.online, keys, 5, 20, start)
    )
    pushers = [
        ctx.Process(
            target=versioned_writer, args=(str(env.repo), env.online, keys[p::3], 1, 1, start)
        )
        for p in range(3)
    ]
    for proc in [loader, *pushers]:
        proc.start()
    for proc in [loader, *pushers]:
        proc.join(timeout=400)
    assert [p.exitcode for p in [loader, *pushers]] == [0, 0, 0, 0]
    env.stats(view)  # load the current state for the reads below
    got = env.read(view, [driver_key(i) for i in keys])
    assert [{k: plain(v) for k, v in f.items()} for _, f in got if f] == [
        expected_values(i, 5) for i in keys
    ]
    rows = env.pyiceberg_table(view).scan().to_arrow()
    assert rows.num_rows == len(keys)
    # A writer that kept losing (REST: no commit lock) claimed the table and released it.
    assert CLAIM not in env.pyiceberg_table(view).properties


CLAIM = "feast-iceberg.commit-claim"


def test_writers_wait_for_a_live_claim_on_an_optimistic_catalog(env: Env) -> None:
    """On REST, another writer's live claim holds a push back until it ends, and a claim past
    its deadline (its writer died) holds nothing back."""
    if env.config.online_store.catalog_type != "rest":
        pytest.skip("catalogs with commit locks queue writers instead")
    view = driver_view()
    env.apply(view)
    env.write(view, [driver_row(0, 1)])
    table = env.pyiceberg_table(view)

    def claim(ms_from_now: int) -> None:
        with table.transaction() as tx:
            tx.set_properties({CLAIM: f"another {int(time.time() * 1000) + ms_from_now}"})

    claim(-60_000)
    started = time.perf_counter()
    env.write(view, [driver_row(1, 1)])
    assert time.perf_counter() - started < 1.0

    claim(1_500)
    started = time.perf_counter()
    env.write(view, [driver_row(2, 1)])
    waited = time.perf_counter() - started
    assert 1.2 < waited < 10, waited
    got = env.read(view, [driver_key(i) for i in range(3)])
    assert [f["trips"].int64_val for _, f in got if f] == [
        expected_values(i, 1)["trips"] for i in range(3)
    ]


def test_group_commit_coalesces_threads_and_isolates_a_bad_batch(env: Env) -> None:
    view = driver_view()
    env.apply(view)
    env.write(view, [driver_row(0, 0)])
    store = env.store._store(env.config)
    name = table_name(env.config, view)
    from feast_iceberg.online_store import _optional_micros, _serialize, _to_micros

    names = ["conv_rate", "acc_rate", "trips", "city"]
    threads, rounds = 16, 4
    start = threading.Barrier(threads)
    reports: list[dict] = []
    errors: list[Exception] = []

    def push(t: int) -> None:
        start.wait()
        for r in range(rounds):
            key, feats, ts, created = driver_row(t * 100 + r, 1)
            if t == 7 and r == 1:
                feats = dict(feats, trips=ValueProto(string_val="not a number"))
            try:
                got = store.write(
                    name,
                    names,
                    [_serialize(key)],
                    [_serialize(feats[n]) for n in names],
                    [_to_micros(ts)],
                    [_optional_micros(created)],
                )
                reports.append(dict(got))
            except InvalidInputError as e:
                errors.append(e)

    pool = [threading.Thread(target=push, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    assert len(errors) == 1 and "trips" in str(errors[0])
    assert len(reports) == threads * rounds - 1
    assert all(r["rows_written"] == 1 for r in reports)
    snapshots = {r["snapshot_id"] for r in reports}
    assert len(snapshots) < len(reports), "no write was coalesced"
    good = [t * 100 + r for t in range(threads) for r in range(rounds) if (t, r) != (7, 1)]
    got = env.read(view, [driver_key(i) for i in good])
    assert [{k: plain(v) for k, v in f.items()} for _, f in got if f] == [
        expected_values(i, 1) for i in good
    ]
    _, missing = env.read(view, [driver_key(701)])[0]
    assert missing is None


def endless_pusher(repo: str, online: dict[str, Any], log_dir: str) -> None:
    """8 threads pushing single rows until killed; each logs a write once it returned."""
    from feast_iceberg import IcebergOnlineStore

    config = make_repo_config(Path(repo), **online)
    store = IcebergOnlineStore()
    view = driver_view()

    def push(t: int) -> None:
        with open(Path(log_dir) / f"acked-{t}", "a", buffering=1) as log:
            for n in range(1, 100_000):
                i = t * 10 + n % 10
                store.online_write_batch(config, view, [driver_row(i, n)], None)
                log.write(f"{i} {n}\n")

    pool = [threading.Thread(target=push, args=(t,), daemon=True) for t in range(8)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()


def test_a_writer_killed_mid_group_commit_loses_no_acknowledged_write(
    env: Env, tmp_path: Path
) -> None:
    view = driver_view()
    env.apply(view)
    logs = tmp_path / "acks"
    logs.mkdir()
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=endless_pusher, args=(str(env.repo), env.online, str(logs)))
    proc.start()
    deadline = time.monotonic() + 120
    acked = 0
    while time.monotonic() < deadline and acked < 40:
        time.sleep(0.2)
        acked = sum(len(p.read_text().splitlines()) for p in logs.iterdir())
    assert acked >= 40, "the pusher never got going"
    time.sleep(0.05 * (os.getpid() % 7))  # somewhere inside a commit, not at a boundary
    assert proc.pid is not None
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(timeout=30)
    newest: dict[int, int] = {}
    for p in logs.iterdir():
        for line in p.read_text().splitlines():
            if line.count(" ") == 1:  # the line being written at the kill may be torn
                i, n = map(int, line.split())
                newest[i] = max(newest.get(i, 0), n)
    env.stats(view)  # load the current state for the reads below
    # Consistent: one row per key as any Iceberg reader sees it.
    rows = env.pyiceberg_table(view).scan().to_arrow()
    assert rows.num_rows == len(set(rows.column("entity_key").to_pylist()))
    # Durable: every acknowledged write is there (or a newer one of its key).
    got = env.read(view, [driver_key(i) for i in newest])
    for i, (_, feats) in zip(newest, got, strict=True):
        assert feats is not None
        assert feats["trips"].int64_val >= i * 1000 + newest[i]
    # And the table takes writes again.
    env.write(view, [driver_row(999, 1)])
    assert env.read(view, [driver_key(999)])[0][1] is not None
