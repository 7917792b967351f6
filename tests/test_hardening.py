"""Errors in their right class, settings that were fixed, and cleanups that fail out loud."""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path

import pytest
from conftest import Env, driver_key, driver_row, driver_view, expected_values, plain
from feast_iceberg import (
    CatalogError,
    ConfigError,
    ConversionError,
    FeastIcebergError,
    ForkError,
    InternalError,
    TableStateError,
    _internal,
)
from feast_iceberg.config import IcebergOnlineStoreConfig
from feast_iceberg.online_store import table_name


def test_every_error_class_is_a_feast_iceberg_error() -> None:
    for cls in (TableStateError, ConversionError, ForkError, InternalError):
        assert issubclass(cls, FeastIcebergError) and issubclass(cls, Exception)
        assert cls.__module__ == "feast_iceberg._internal"
    # A panic becomes InternalError: `except Exception` catches it, unlike PanicException.
    assert not issubclass(InternalError, ConfigError)
    assert issubclass(ConversionError, ValueError)


def test_files_another_engine_wrote_unbucketed_are_a_table_state_error(env: Env) -> None:
    view = driver_view()
    env.apply(view)
    env.write(view, [driver_row(i, 1) for i in range(10)])
    table = env.pyiceberg_table(view)
    rows = table.scan().to_arrow()
    # Another engine drops the bucket partitioning and appends: its file has no bucket.
    with table.update_spec() as spec:
        spec.remove_field("entity_key_bucket")
    table.refresh().append(rows.slice(0, 1))
    before = env.stats(view)
    with pytest.raises(TableStateError, match="not partitioned by bucket"):
        env.write(view, [driver_row(1, 2)])
    after = env.stats(view)
    assert (after["snapshot_id"], after["metadata_location"]) == (
        before["snapshot_id"],
        before["metadata_location"],
    )


def _silent_port() -> socket.socket:
    """A port that accepts TCP connections (the kernel's backlog) and never answers."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    return s


def test_catalog_acquire_timeout_is_a_setting(tmp_path: Path) -> None:
    with _silent_port() as silent:
        port = silent.getsockname()[1]
        config = IcebergOnlineStoreConfig(
            uri=f"postgresql://feast:hunter2@127.0.0.1:{port}/feast",
            warehouse=str(tmp_path / "warehouse"),
            catalog_acquire_timeout_seconds=0.5,
        )
        store = _internal.Store(config.to_store_json(tmp_path, 3))
        started = time.monotonic()
        with pytest.raises(CatalogError) as info:
            store.table_exists("anything")
        waited = time.monotonic() - started
    assert waited < 5, f"waited {waited:.1f} s, the fixed 10 s rather than the setting"
    assert "hunter2" not in str(info.value)
    assert IcebergOnlineStoreConfig().catalog_acquire_timeout_seconds == 10.0
    with pytest.raises(ValueError):
        IcebergOnlineStoreConfig(catalog_acquire_timeout_seconds=0)


def test_a_duration_too_long_to_represent_is_a_config_error(tmp_path: Path) -> None:
    # 1e300 s is finite, and used to panic in Rust on the first read.
    config = IcebergOnlineStoreConfig(metadata_refresh_seconds=1e300)
    with pytest.raises(ConfigError, match="metadata_refresh_seconds"):
        _internal.Store(config.to_store_json(tmp_path, 3))


def test_a_cleanup_that_fails_logs_a_warning_naming_table_and_file(
    make_env, caplog: pytest.LogCaptureFixture
) -> None:
    env = make_env(metadata_previous_versions_max=1)
    view = driver_view()
    env.apply(view)
    env.write(view, [driver_row(1, 1)])
    # This metadata file falls out of the log (one previous version kept) at the third commit
    # from now; a directory in its place makes its deletion fail.
    doomed = Path(env.stats(view)["metadata_location"].removeprefix("file://"))
    env.write(view, [driver_row(1, 2)])
    doomed.unlink()
    doomed.mkdir()
    caplog.set_level(logging.WARNING)
    env.write(view, [driver_row(1, 3)])
    env.write(view, [driver_row(1, 4)])
    warnings = [r for r in caplog.records if r.name.startswith("feast_iceberg")]
    table = f"{env.namespace}.{table_name(env.config, view)}"
    assert any(
        r.levelno == logging.WARNING and table in r.getMessage() and doomed.name in r.getMessage()
        for r in warnings
    ), [r.getMessage() for r in caplog.records]
    # Best effort: the write itself went through.
    ((_, values),) = env.read(view, [driver_key(1)])
    assert values is not None and plain(values["trips"]) == expected_values(1, 4)["trips"]


def test_reports_have_exactly_the_keys_of_their_typed_dicts(env: Env) -> None:
    # stubtest checks names and signatures; the keys of the returned dicts are checked here.
    import pyarrow as pa
    from feast_iceberg import reports
    from feast_iceberg.engine import source_columns

    view = driver_view()
    env.apply(view)
    store = env.store._store(env.config)
    name = table_name(env.config, view)
    env.write(view, [driver_row(i, 1) for i in range(5)])
    keys = lambda d: set(d)  # noqa: E731
    got = store.compact(name, all=True)
    assert keys(got) == set(reports.CompactReport.__required_keys__)
    assert keys(store.stats(name)) == set(reports.TableStats.__required_keys__)
    assert keys(store.io_stats()) == set(reports.IoStats.__required_keys__)
    assert keys(store.expire(name)) == set(reports.ExpireReport.__required_keys__)
    orphans = store.remove_orphans(name, 3600.0, dry_run=True)
    assert keys(orphans) == set(reports.OrphanReport.__required_keys__)
    columns = source_columns(view)
    assert columns is not None
    columns["created_ts"] = None
    data = pa.table(
        {
            "driver_id": pa.array([1], pa.int64()),
            columns["event_ts"]: pa.array([0], pa.timestamp("us", tz="UTC")),
            **{f: pa.nulls(1) for f, _ in columns["features"]},
        }
    )
    arrow = _internal.write_arrow(store, name, data, **columns)
    assert keys(arrow) == set(reports.ArrowWriteReport.__required_keys__)
