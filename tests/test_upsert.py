"""Upsert semantics through the Feast OnlineStore interface: one live row per key, newest event
timestamp wins (created_ts breaks ties, then the later write), reads aligned with the request."""

from __future__ import annotations

from datetime import timedelta, timezone

import pytest
from conftest import (
    BASE_TS,
    DRIVER_FEATURES,
    Env,
    driver_key,
    driver_row,
    driver_view,
    expected_values,
    plain,
)
from feast.protos.feast.types.Value_pb2 import Value as ValueProto

pytestmark = pytest.mark.backends


def values_of(result: tuple) -> dict | None:
    _ts, feats = result
    return None if feats is None else {k: plain(v) for k, v in feats.items()}


def test_five_writes_leave_the_last_values_and_one_row_per_key(env: Env) -> None:
    view = driver_view()
    env.apply(view)
    keys = list(range(200))
    for version in range(5):
        env.write(view, [driver_row(i, version) for i in keys])
    results = env.read(view, [driver_key(i) for i in keys])
    for i, result in zip(keys, results, strict=True):
        assert values_of(result) == expected_values(i, 4)
        assert result[0] == (BASE_TS + timedelta(minutes=4)).replace(tzinfo=timezone.utc)
    stats = env.stats(view)
    assert stats["records"] == len(keys)
    scanned = env.pyiceberg_table(view).scan().to_arrow()
    assert scanned.num_rows == len(keys)
    assert len(set(scanned.column("driver_id").to_pylist())) == len(keys)


def test_an_older_write_does_not_overwrite_a_newer_row(env: Env) -> None:
    view = driver_view()
    env.apply(view)
    env.write(view, [driver_row(1, 5), driver_row(2, 5)])
    snapshot = env.stats(view)["snapshot_id"]
    # Key 1 arrives older (ignored), key 2 newer (applied).
    env.write(view, [driver_row(1, 3), driver_row(2, 6)])
    r1, r2 = env.read(view, [driver_key(1), driver_key(2)])
    assert values_of(r1) == expected_values(1, 5)
    assert values_of(r2) == expected_values(2, 6)
    assert env.stats(view)["snapshot_id"] != snapshot
    # A batch that only holds older rows commits nothing.
    snapshot = env.stats(view)["snapshot_id"]
    env.write(view, [driver_row(1, 0), driver_row(2, 0)])
    assert env.stats(view)["snapshot_id"] == snapshot
    assert values_of(env.read(view, [driver_key(1)])[0]) == expected_values(1, 5)


def test_equal_event_ts_newer_created_ts_wins_then_later_write(env: Env) -> None:
    view = driver_view()
    env.apply(view)
    key, feats, ts, _ = driver_row(7, 1)
    newer_created = dict(feats, city=ValueProto(string_val="newer-created"))
    older_created = dict(feats, city=ValueProto(string_val="older-created"))
    env.write(view, [(key, newer_created, ts, ts + timedelta(seconds=10))])
    env.write(view, [(key, older_created, ts, ts + timedelta(seconds=5))])
    assert plain(env.read(view, [key])[0][1]["city"]) == "newer-created"
    same_again = dict(feats, city=ValueProto(string_val="later-write"))
    env.write(view, [(key, same_again, ts, ts + timedelta(seconds=10))])
    assert plain(env.read(view, [key])[0][1]["city"]) == "later-write"


def test_duplicates_inside_one_batch_keep_the_newest(env: Env) -> None:
    view = driver_view()
    env.apply(view)
    rows = [driver_row(3, 2), driver_row(3, 9), driver_row(3, 4), driver_row(4, 1)]
    env.write(view, rows)
    r3, r4 = env.read(view, [driver_key(3), driver_key(4)])
    assert values_of(r3) == expected_values(3, 9)
    assert values_of(r4) == expected_values(4, 1)
    assert env.stats(view)["records"] == 2


def test_reads_are_aligned_with_repeated_and_missing_keys(env: Env) -> None:
    view = driver_view()
    env.apply(view)
    env.write(view, [driver_row(i, 1) for i in (10, 20, 30)])
    request = [20, 99, 10, 20, 30, 99, 20]
    results = env.read(view, [driver_key(i) for i in request])
    assert len(results) == len(request)
    for i, result in zip(request, results, strict=True):
        if i == 99:
            assert result == (None, None)
        else:
            assert values_of(result) == expected_values(i, 1)


def test_requested_features_are_honoured(env: Env) -> None:
    view = driver_view()
    env.apply(view)
    env.write(view, [driver_row(1, 1)])
    ((_, feats),) = env.read(view, [driver_key(1)], ["trips", "city"])
    assert feats is not None and set(feats) == {"trips", "city"}
    ((_ts, feats),) = env.read(view, [driver_key(1)])
    assert feats is not None and set(feats) == set(DRIVER_FEATURES)


def test_event_timestamps_come_back_aware_utc_with_microseconds(env: Env) -> None:
    view = driver_view()
    env.apply(view)
    ts = BASE_TS.replace(microsecond=123456)
    env.write(view, [driver_row(1, 1, ts=ts)])
    ((got, _),) = env.read(view, [driver_key(1)])
    assert got == ts.replace(tzinfo=timezone.utc)
    assert got is not None and got.tzinfo is not None and got.microsecond == 123456


def test_null_features_stay_null(env: Env) -> None:
    view = driver_view()
    env.apply(view)
    key, feats, ts, created = driver_row(1, 1)
    feats = dict(feats, city=ValueProto(), trips=ValueProto(null_val=0))
    env.write(view, [(key, feats, ts, created)])
    ((_, got),) = env.read(view, [driver_key(1)])
    assert got is not None
    assert got["city"] == ValueProto() and got["trips"] == ValueProto()
    assert plain(got["acc_rate"]) == feats["acc_rate"].double_val


def test_progress_callback_counts_rows(env: Env) -> None:
    view = driver_view()
    env.apply(view)
    seen: list[int] = []
    env.store.online_write_batch(
        env.config, view, [driver_row(i, 1) for i in range(25)], seen.append
    )
    assert sum(seen) == 25


def test_new_features_become_new_columns_and_old_rows_read_null(env: Env) -> None:
    from feast import Field
    from feast.types import Int32

    view = driver_view()
    env.apply(view)
    env.write(view, [driver_row(1, 1)])
    wider = driver_view(extra=[Field(name="rank", dtype=Int32)])
    env.apply(wider)
    ((_, feats),) = env.read(wider, [driver_key(1)])
    assert feats is not None and feats["rank"] == ValueProto()
    key, row, ts, created = driver_row(1, 2)
    env.write(wider, [(key, dict(row, rank=ValueProto(int32_val=3)), ts, created)])
    ((_, feats),) = env.read(wider, [driver_key(1)])
    assert feats is not None and feats["rank"] == ValueProto(int32_val=3)
    schema = env.pyiceberg_table(wider).schema()
    assert str(schema.find_field("rank").field_type) == "int"


def test_update_drops_and_teardown_removes_tables(env: Env) -> None:
    a, b = driver_view("a_view"), driver_view("b_view")
    env.apply(a, b)
    env.write(a, [driver_row(1, 1)])
    env.store.update(env.config, [a], [b], [], [], partial=False)
    catalog = env.catalog()
    names = {t[1] for t in catalog.list_tables(env.namespace)}
    assert names == {"test_b_view_online"}
    env.store.teardown(env.config, [b], [])
    assert catalog.list_tables(env.namespace) == []


@pytest.mark.backends("sqlite")
def test_commits_stay_visible_when_python_sqlite_shares_the_process(env: Env) -> None:
    """PyIceberg and Feast open the SQLite catalog with Python's own sqlite3 library; closing
    those connections must not hide our later commits from other readers."""
    import sqlite3
    import subprocess
    import sys

    view = driver_view()
    env.apply(view)
    db = env.repo / "data" / "catalog.db"
    query = "SELECT metadata_location FROM iceberg_tables"
    for version in range(3):
        env.write(view, [driver_row(i, version) for i in range(10)])
        with sqlite3.connect(db) as conn:  # opened and closed in this process, like PyIceberg
            (location,) = conn.execute(query).fetchone()
        conn.close()
        assert location == env.stats(view)["metadata_location"]
    other_process = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import sqlite3; print(sqlite3.connect({str(db)!r}).execute({query!r}).fetchone()[0])",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert other_process.stdout.strip() == env.stats(view)["metadata_location"]
