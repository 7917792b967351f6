"""Automatic expiry: storage tracks the live data; a grace period keeps replaced snapshots
readable for other engines; a reader whose files were deleted under it refreshes and retries."""

from __future__ import annotations

from collections.abc import Callable

from conftest import Env, driver_key, driver_row, driver_view, expected_values, plain


def values(result: tuple) -> dict | None:
    _, feats = result
    return None if feats is None else {k: plain(v) for k, v in feats.items()}


def test_default_keeps_only_the_current_snapshot(env: Env) -> None:
    view = driver_view()
    env.apply(view)
    for version in range(4):
        env.write(view, [driver_row(i, version) for i in range(300)])
    stats = env.stats(view)
    assert stats["snapshots"] == 1
    parquet = [p for p in env.warehouse_files() if p.suffix == ".parquet"]
    assert len(parquet) == stats["data_files"]


def test_grace_period_keeps_the_replaced_snapshot_readable(make_env: Callable[..., Env]) -> None:
    env = make_env(snapshot_retention_seconds=600)
    view = driver_view()
    env.apply(view)
    env.write(view, [driver_row(i, 1) for i in range(100)])
    first = env.pyiceberg_table(view).current_snapshot().snapshot_id
    env.write(view, [driver_row(i, 2) for i in range(100)])
    assert env.stats(view)["snapshots"] == 2
    table = env.pyiceberg_table(view)
    old = table.scan(snapshot_id=first, selected_fields=("driver_id", "trips")).to_arrow()
    assert sorted(old.column("trips").to_pylist()) == sorted(
        expected_values(i, 1)["trips"] for i in range(100)
    )
    # Manual expiry honours the grace period too: nothing is due yet.
    store = env.store._store(env.config)
    assert store.expire("test_driver_stats_online")["snapshots_expired"] == 0


def test_a_reader_whose_files_were_expired_under_it_refreshes_and_retries(
    make_env: Callable[..., Env],
) -> None:
    # Reader and writer are separate stores (separate caches, like separate processes); the
    # reader would not re-check the catalog for an hour on its own.
    writer = make_env()
    view = driver_view()
    writer.apply(view)
    keys = list(range(200))
    writer.write(view, [driver_row(i, 1) for i in keys])
    reader = Env(writer.repo, writer.config.model_copy(deep=True), type(writer.store)())
    reader.config.online_store.metadata_refresh_seconds = 3600
    assert values(reader.read(view, [driver_key(0)])[0]) == expected_values(0, 1)

    writer.write(view, [driver_row(i, 2) for i in keys])  # expires and deletes version 1's files
    results = reader.read(view, [driver_key(i) for i in keys])
    # The buckets other than key 0's were never loaded: their files are gone, so the read
    # refreshes the metadata and answers every key from version 2.
    for i, result in zip(keys, results, strict=True):
        assert values(result) == expected_values(i, 2)
