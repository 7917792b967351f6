"""Prometheus metrics: real reads and writes on an SQLite catalog and a local warehouse, then a
scrape of `prometheus_client`'s default registry (what `feast serve --metrics` exposes)."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import prometheus_client
import pytest
from conftest import Env, Row, driver_key, driver_row, driver_view, fresh_namespace
from feast_iceberg import _internal, metrics
from feast_iceberg.online_store import _to_micros, table_name
from feast_iceberg.reports import WriteReport
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape() -> Samples:
    text = prometheus_client.generate_latest().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def label(env: Env, view: Any) -> str:
    return f"{env.namespace}.{table_name(env.config, view)}"


def write_row(store: _internal.Store, table: str, row: Row) -> WriteReport:
    """One row through the core's `write`, on a store of the test's own."""
    key, features, event_ts, _ = row
    return store.write(
        table,
        list(features),
        [key.SerializeToString()],
        [v.SerializeToString() for v in features.values()],
        [_to_micros(event_ts)],
        [None],
    )


@pytest.fixture
def menv(make_env: Callable[..., Env]) -> Env:
    # A namespace of its own: the counters are per process and the table name is the label.
    return make_env(namespace=fresh_namespace())


def test_the_collector_is_registered_once_when_a_store_is_first_used(menv: Env) -> None:
    view = driver_view()
    menv.apply(view)
    assert metrics.register() is False, "the online store registered it already"
    families = {f.name for f in prometheus_client.REGISTRY.collect()}
    expected = {
        "feast_iceberg_online_read_seconds",
        "feast_iceberg_commits",
        "feast_iceberg_commit_retries",
        "feast_iceberg_cleanup_failures",
        "feast_iceberg_cache_hits",
        "feast_iceberg_cache_misses",
        "feast_iceberg_cache_evictions",
        "feast_iceberg_cache_bytes",
        "feast_iceberg_storage_read_bytes",
        "feast_iceberg_storage_read_requests",
        "feast_iceberg_metadata_staleness_seconds",
        "feast_iceberg_data_files",
        "feast_iceberg_delete_files",
    }
    assert expected <= families, expected - families
    # Another registry gets its own collector; names clash only within one registry.
    other = prometheus_client.CollectorRegistry()
    assert metrics.register(other) is True
    assert metrics.register(other) is False
    assert "feast_iceberg_stores" in prometheus_client.generate_latest(other).decode()


def test_reads_writes_and_cache_move_their_series(menv: Env) -> None:
    view = driver_view()
    menv.apply(view)
    menv.write(view, [driver_row(i, 1) for i in range(200)])
    table = label(menv, view)
    before = scrape()
    reads = 7
    for _ in range(reads):
        menv.read(view, [driver_key(i) for i in range(0, 200, 20)])
    menv.read(view, [driver_key(5)])
    after = scrape()

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    read = "feast_iceberg_online_read_seconds"
    assert moved(f"{read}_count", table=table) == reads + 1
    assert moved(f"{read}_bucket", table=table, le="+Inf") == reads + 1
    assert 0 < moved(f"{read}_sum", table=table) < 60
    # Buckets are cumulative: each bound holds at most what the next one does.
    bounds = sorted(
        (float(dict(labels)["le"]), v)
        for (name, labels), v in after.items()
        if name == f"{read}_bucket" and dict(labels)["table"] == table
    )
    assert [v for _, v in bounds] == sorted(v for _, v in bounds)
    assert moved("feast_iceberg_online_read_keys_total", table=table) == reads * 10 + 1
    assert moved("feast_iceberg_online_read_errors_total", table=table) == 0
    # The first read decodes from storage, the rest are served from the block cache.
    assert moved("feast_iceberg_cache_misses_total") >= 1
    assert moved("feast_iceberg_cache_hits_total") >= reads - 1
    assert moved("feast_iceberg_storage_read_bytes_total", kind="data") > 0
    assert moved("feast_iceberg_storage_read_requests_total", kind="data") >= 1
    assert value(after, "feast_iceberg_cache_bytes") > 0
    # The default 1 s refresh: the served state was confirmed moments ago.
    assert 0 <= value(after, "feast_iceberg_metadata_staleness_seconds", table=table) < 30
    stats = menv.stats(view)
    assert value(after, "feast_iceberg_data_files", table=table) == stats["data_files"]
    assert value(after, "feast_iceberg_delete_files", table=table) == stats["delete_files"]
    commits = "feast_iceberg_commits_total"
    # apply (table creation) commits through `create`, not counted; one write, one commit.
    assert value(after, commits, table=table, outcome="committed") == 1
    assert value(after, commits, table=table, outcome="conflict") == 0

    # A failed read is counted as an error and still timed.
    store = menv.store._store(menv.config)
    with pytest.raises(ValueError):
        store.read(table_name(menv.config, view), [b"not an entity key"])
    errors = scrape()
    assert value(errors, "feast_iceberg_online_read_errors_total", table=table) == 1
    assert value(errors, f"{read}_count", table=table) == reads + 2


def test_storage_counters_survive_io_stats_reset_and_dropped_stores(menv: Env) -> None:
    view = driver_view()
    menv.apply(view)
    menv.write(view, [driver_row(i, 1) for i in range(50)])
    config = json.dumps(json.loads(menv.config.online_store.to_store_json(menv.repo, 3)))
    extra = _internal.Store(config)
    name = table_name(menv.config, view)
    extra.read(name, [driver_key(1).SerializeToString()])
    assert extra.io_stats(reset=True)["data_bytes"] > 0
    assert extra.io_stats()["data_bytes"] == 0
    live = scrape()
    total = "feast_iceberg_storage_read_bytes_total"
    del extra
    gone = scrape()
    # A counter never goes down: the dropped store's bytes stay in the totals.
    for kind in ("metadata", "data"):
        assert value(gone, total, kind=kind) >= value(live, total, kind=kind) > 0
    assert value(gone, "feast_iceberg_stores") == value(live, "feast_iceberg_stores") - 1


def test_racing_writers_queue_on_the_commit_lock(menv: Env) -> None:
    """Four stores (as four processes would) released together on one table of an SQL
    catalog: they queue on the catalog's commit lock, so every commit is counted as committed
    and none lost a race (conflicts and retries are counted per table: the Rust unit test
    `commits_retries_and_cleanup_failures_count_per_table`)."""
    view = driver_view()
    menv.apply(view)
    table = label(menv, view)
    config = menv.config.online_store.to_store_json(menv.repo, 3)
    writers, rounds = 4, 8
    stores = [_internal.Store(config) for _ in range(writers)]
    name = table_name(menv.config, view)
    start = threading.Barrier(writers)
    failures: list[BaseException] = []

    def write(w: int) -> None:
        try:
            for r in range(rounds):
                start.wait()
                write_row(stores[w], name, driver_row(w, r))
        except BaseException as e:
            failures.append(e)
            start.abort()

    before = scrape()
    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures
    after = scrape()

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    commits = "feast_iceberg_commits_total"
    assert moved(commits, table=table, outcome="committed") == writers * rounds
    assert moved(commits, table=table, outcome="conflict") == 0
    assert moved("feast_iceberg_commit_retries_total", table=table) == 0


def written_table(make_env: Callable[..., Env], **online: Any) -> tuple[Env, Any, str, Path]:
    """A store on a namespace of its own, a view's table with one row written, the table's
    label and its current metadata file."""
    env = make_env(namespace=fresh_namespace(), **online)
    view = driver_view()
    env.apply(view)
    env.write(view, [driver_row(1, 1)])
    metadata = Path(env.stats(view)["metadata_location"].removeprefix("file://"))
    return env, view, label(env, view), metadata


def test_a_failed_cleanup_is_counted(make_env: Callable[..., Env]) -> None:
    env, view, table, doomed = written_table(make_env, metadata_previous_versions_max=1)
    # This metadata file falls out of the log at the third commit from now; a directory in
    # its place makes its deletion fail.
    env.write(view, [driver_row(1, 2)])
    doomed.unlink()
    doomed.mkdir()
    failures = "feast_iceberg_cleanup_failures_total"
    before = value(scrape(), failures, table=table)
    env.write(view, [driver_row(1, 3)])
    env.write(view, [driver_row(1, 4)])
    assert value(scrape(), failures, table=table) - before == 1


def test_an_expired_snapshot_that_cannot_be_listed_is_a_warning_and_a_failure(
    make_env: Callable[..., Env], caplog: pytest.LogCaptureFixture
) -> None:
    env, view, table, location = written_table(make_env, snapshot_retention_count=2)
    (first,) = json.loads(location.read_text())["snapshots"]
    manifest_list = Path(first["manifest-list"].removeprefix("file://"))
    env.write(view, [driver_row(1, 2)])
    manifest_list.unlink()
    # A store that never read the first snapshot: expiring it needs its manifest list.
    fresh = _internal.Store(env.config.online_store.to_store_json(env.repo, 3))
    failures = "feast_iceberg_cleanup_failures_total"
    before = value(scrape(), failures, table=table)
    caplog.set_level(logging.WARNING)
    report = write_row(fresh, table_name(env.config, view), driver_row(1, 3))
    assert report["snapshot_id"] is not None
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("feast_iceberg")]
    assert any(table in m and manifest_list.name in m for m in messages), messages
    assert value(scrape(), failures, table=table) - before == 1


def test_counting_can_be_switched_off(menv: Env) -> None:
    view = driver_view()
    menv.apply(view)
    menv.write(view, [driver_row(1, 1)])
    table = label(menv, view)
    count = "feast_iceberg_online_read_seconds_count"
    before = value(scrape(), count, table=table)
    was = _internal.set_metrics_enabled(False)
    try:
        menv.read(view, [driver_key(1)])
    finally:
        _internal.set_metrics_enabled(was)
    assert was is True
    assert value(scrape(), count, table=table) == before
    menv.read(view, [driver_key(1)])
    assert value(scrape(), count, table=table) == before + 1


CHILD = """
import sys, time
sys.path.insert(0, {tests!r})
import feast.metrics  # what `feast serve` imports: prometheus_client in multiprocess mode
from pathlib import Path
from conftest import driver_key, driver_row, driver_view, repo_config
from feast_iceberg import IcebergOnlineStore, metrics
assert metrics.multiprocess_mode()
metrics.MIRROR_SECONDS = 0.05
config = repo_config(Path({repo!r}), namespace="mirrored")
store, view = IcebergOnlineStore(), driver_view()
store.update(config, [], [view], [], [], partial=False)
store.online_write_batch(config, view, [driver_row(i, 1) for i in range(20)], None)
for _ in range({reads}):
    store.online_read(config, view, [driver_key(1), driver_key(2)])
time.sleep(1.0)
"""


def test_feast_serve_metrics_see_the_families_through_multiprocess_files(tmp_path: Path) -> None:
    # `feast serve --metrics` serves the workers' multiprocess files from another process, not
    # a worker's default registry: the families must reach those files.
    import os
    import subprocess
    import sys

    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    mp_dir, repo = tmp_path / "mp", tmp_path / "repo"
    mp_dir.mkdir()
    (repo / "data").mkdir(parents=True)
    reads = 6
    code = CHILD.format(tests=str(Path(__file__).parent), repo=str(repo), reads=reads)
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(mp_dir)}
    env["PROMETHEUS_MULTIPROCESS_DIR"] = str(mp_dir)
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(mp_dir))
    text = prometheus_client.generate_latest(registry).decode()
    samples = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    table = "mirrored.test_driver_stats_online"
    read = "feast_iceberg_online_read_seconds"
    assert value(samples, f"{read}_count", table=table) == reads, text
    assert value(samples, f"{read}_bucket", table=table, le="+Inf") == reads
    assert value(samples, f"{read}_sum", table=table) > 0
    assert value(samples, "feast_iceberg_online_read_keys_total", table=table) == 2 * reads
    commits = "feast_iceberg_commits_total"
    assert value(samples, commits, table=table, outcome="committed") == 1
    assert value(samples, "feast_iceberg_cache_hits_total") >= reads - 1
    assert value(samples, "feast_iceberg_data_files", table=table) >= 1
    assert value(samples, "feast_iceberg_stores") == 1


def test_a_table_only_cached_has_every_latency_bucket(make_env: Callable[..., Env]) -> None:
    """A table this process loaded but never read or wrote (a fresh `feast apply`) still gets
    a full histogram: the multiprocess mirror zips bounds with buckets."""
    env = make_env()
    view = driver_view(f"cached_{fresh_namespace()}")
    env.apply(view)
    env.stats(view)
    snap = _internal.metrics_snapshot()
    label = f"{env.namespace}.{table_name(env.config, view)}"
    assert len(snap["tables"][label]["read_buckets"]) == len(snap["read_bucket_bounds"]) + 1
    assert list(metrics.families(snap))
