"""Bad input gets a clear, typed error and leaves the table exactly as it was."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from conftest import Env, driver_key, driver_row, driver_view, expected_values, plain
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from feast_iceberg import (
    CatalogError,
    ConfigError,
    CorruptTableError,
    FeastIcebergError,
    InvalidInputError,
    ReadTimeoutError,
    SchemaMismatchError,
    TableNotFoundError,
    _internal,
)


def snapshot_state(env: Env, view) -> tuple:
    stats = env.stats(view)
    files = sorted(str(p) for p in env.warehouse_files())
    return stats["snapshot_id"], stats["metadata_location"], files


@pytest.fixture
def applied(env: Env):
    view = driver_view()
    env.apply(view)
    env.write(view, [driver_row(i, 1) for i in range(20)])
    return env, view


def assert_unchanged(env: Env, view, before: tuple) -> None:
    assert snapshot_state(env, view) == before
    results = env.read(view, [driver_key(i) for i in range(20)])
    for i, (_, feats) in enumerate(results):
        assert feats is not None
        assert {k: plain(v) for k, v in feats.items()} == expected_values(i, 1)


def with_feature(row, name: str, value: ValueProto):
    key, feats, ts, created = row
    return key, dict(feats, **{name: value}), ts, created


def test_wrong_value_type_is_rejected_before_any_io(applied) -> None:
    env, view = applied
    before = snapshot_state(env, view)
    rows = [driver_row(i, 2) for i in range(20)]
    rows[13] = with_feature(rows[13], "trips", ValueProto(string_val="not a number"))
    with pytest.raises(InvalidInputError, match="trips"):
        env.write(view, rows)
    assert_unchanged(env, view, before)


def test_float64_in_a_float32_column_is_not_silently_coerced(applied) -> None:
    env, view = applied
    before = snapshot_state(env, view)
    rows = [with_feature(driver_row(0, 2), "conv_rate", ValueProto(double_val=0.1))]
    with pytest.raises(InvalidInputError, match="conv_rate"):
        env.write(view, rows)
    assert_unchanged(env, view, before)


def test_missing_and_unknown_features_are_schema_errors(applied) -> None:
    env, view = applied
    before = snapshot_state(env, view)
    key, feats, ts, created = driver_row(1, 2)
    missing = {k: v for k, v in feats.items() if k != "city"}
    with pytest.raises(SchemaMismatchError, match="city"):
        env.write(view, [(key, missing, ts, created)])
    unknown = dict(feats, bogus=ValueProto(int64_val=1))
    with pytest.raises(SchemaMismatchError, match="bogus"):
        env.write(view, [(key, unknown, ts, created)])
    assert_unchanged(env, view, before)


def test_a_renamed_feature_deep_in_the_batch_is_a_schema_error(applied) -> None:
    # Same width as the view, so only the lookup by name can notice; the error names the
    # first offending row's missing and unknown features.
    env, view = applied
    before = snapshot_state(env, view)
    rows = [driver_row(i, 2) for i in range(20)]
    key, feats, ts, created = rows[17]
    renamed = {("town" if k == "city" else k): v for k, v in feats.items()}
    rows[17] = (key, renamed, ts, created)
    with pytest.raises(SchemaMismatchError, match=r"missing \['city'\]; unknown \['town'\]"):
        env.write(view, rows)
    assert_unchanged(env, view, before)


def test_a_one_feature_view_round_trips(env: Env) -> None:
    from feast import Field
    from feast.types import Int64

    view = driver_view("one_feature")
    view.features = [Field(name="trips", dtype=Int64)]
    env.apply(view)
    env.write(
        view,
        [
            (driver_key(i), {"trips": ValueProto(int64_val=i)}, *driver_row(i, 1)[2:])
            for i in range(3)
        ],
    )
    got = [plain(f["trips"]) for _, f in env.read(view, [driver_key(i) for i in range(3)])]
    assert got == [0, 1, 2]


def test_feature_not_in_the_table_is_a_schema_error(applied) -> None:
    from feast import Field
    from feast.types import Int64

    env, view = applied
    before = snapshot_state(env, view)
    wider = driver_view(extra=[Field(name="not_applied", dtype=Int64)])
    key, feats, ts, created = driver_row(1, 2)
    with pytest.raises(SchemaMismatchError, match="not_applied"):
        env.write(wider, [(key, dict(feats, not_applied=ValueProto(int64_val=1)), ts, created)])
    assert_unchanged(env, view, before)


def test_feature_type_change_names_the_column(applied) -> None:
    from feast import Field
    from feast.types import String

    env, _view = applied
    changed = driver_view(extra=[])
    changed.features = [
        Field(name="trips", dtype=String) if f.name == "trips" else f for f in changed.features
    ]
    with pytest.raises(SchemaMismatchError, match="trips"):
        env.apply(changed)


def test_unknown_feature_view_is_table_not_found(env: Env) -> None:
    view = driver_view("never_applied")
    with pytest.raises(TableNotFoundError):
        env.write(view, [driver_row(1, 1)])
    with pytest.raises(TableNotFoundError):
        env.read(view, [driver_key(1)])
    # Also a KeyError, for callers that catch the builtin.
    with pytest.raises(KeyError):
        env.read(view, [driver_key(1)])


def test_corrupt_metadata_file_is_a_typed_error_and_nothing_is_written(make_env) -> None:
    env = make_env(metadata_refresh_seconds=0)
    view = driver_view()
    env.apply(view)
    env.write(view, [driver_row(1, 1)])
    location = env.stats(view)["metadata_location"]
    path = Path(location.removeprefix("file://"))
    path.write_text("{ this is not json")
    other = env.__class__(env.repo, env.config, type(env.store)())  # a fresh process-like cache
    files = sorted(str(p) for p in env.warehouse_files())
    with pytest.raises(CorruptTableError):
        other.read(view, [driver_key(1)])
    with pytest.raises(CorruptTableError):
        other.write(view, [driver_row(1, 2)])
    assert sorted(str(p) for p in env.warehouse_files()) == files


def test_missing_metadata_file_is_a_typed_error(make_env) -> None:
    env = make_env()
    view = driver_view()
    env.apply(view)
    env.write(view, [driver_row(1, 1)])
    location = env.stats(view)["metadata_location"]
    Path(location.removeprefix("file://")).unlink()
    fresh = env.__class__(env.repo, env.config, type(env.store)())
    with pytest.raises(CorruptTableError):
        fresh.read(view, [driver_key(1)])


def test_missing_data_file_is_a_typed_error_not_a_wrong_answer(make_env) -> None:
    env = make_env()
    view = driver_view()
    env.apply(view)
    env.write(view, [driver_row(1, 1)])
    for p in env.warehouse_files():
        if p.suffix == ".parquet":
            p.unlink()
    fresh = env.__class__(env.repo, env.config, type(env.store)())
    with pytest.raises(FeastIcebergError):
        fresh.read(view, [driver_key(1)])


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_catalog_is_a_catalog_error_without_the_password(make_env) -> None:
    env = make_env(uri=f"postgresql://feast:hunter2@127.0.0.1:{_closed_port()}/feast")
    view = driver_view()
    with pytest.raises(CatalogError) as info:
        env.apply(view)
    assert "hunter2" not in str(info.value)
    assert "hunter2" not in repr(env.config.online_store)


def test_unusable_sqlite_path_is_a_catalog_error(tmp_path: Path, make_env) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    env = make_env(uri=f"sqlite:///{blocker}/sub/catalog.db")
    with pytest.raises((CatalogError, ConfigError)):
        env.apply(driver_view())


def test_bad_config_values_are_config_errors() -> None:
    with pytest.raises(ConfigError):
        _internal.Store('{"catalog_type": "hive"}')
    with pytest.raises(ConfigError):
        _internal.Store("not json")


def test_malformed_entity_key_bytes_are_invalid_input(applied) -> None:
    env, _view = applied
    store = env.store._store(env.config)
    with pytest.raises(InvalidInputError):
        store.read("test_driver_stats_online", [b"\xff\xff\xff"], None)


def test_read_deadline_raises_read_timeout(make_env) -> None:
    env = make_env(read_timeout_ms=1, metadata_refresh_seconds=0)
    view = driver_view()
    env.apply(view)
    env.write(view, [driver_row(i, 1) for i in range(5000)])
    fresh = env.__class__(env.repo, env.config, type(env.store)())
    # A cold read loads metadata, manifests and data files: far more than 1 ms.
    with pytest.raises(ReadTimeoutError) as info:
        fresh.read(view, [driver_key(i) for i in range(0, 5000, 7)])
    assert isinstance(info.value, TimeoutError)
