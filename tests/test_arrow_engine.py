"""The Arrow-native write path (`write_arrow`, `IcebergArrowEngine`) stores exactly what Feast's
proto path stores: the same data goes both ways into two tables, and the full table contents and
`online_read` results must be equal, for every Feast primitive and list type, nulls, NaN,
compound keys, duplicates, naive and tz-aware timestamps and renamed (field-mapped) columns."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pytest
from conftest import BASE_TS, Env, driver, plain
from feast import Entity, FeatureStore, FeatureView, Field, FileSource
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from feast.repo_config import RepoConfig
from feast.types import (
    Array,
    Bool,
    Bytes,
    Float32,
    Float64,
    Int32,
    Int64,
    Set,
    String,
    UnixTimestamp,
)
from feast.utils import _convert_arrow_to_proto
from feast.value_type import ValueType
from feast_iceberg import InvalidInputError, SchemaMismatchError, _internal
from feast_iceberg.engine import IcebergArrowEngineConfig, source_columns
from feast_iceberg.online_store import table_name

zone = Entity(name="zone", join_keys=["zone"], value_type=ValueType.STRING)

# Every Feast primitive and its list, with the Arrow type an offline store hands over.
TYPED = [
    ("i32", Int32, pa.int32()),
    ("i64", Int64, pa.int64()),
    ("f32", Float32, pa.float32()),
    ("f64", Float64, pa.float64()),
    ("s", String, pa.string()),
    ("b", Bytes, pa.binary()),
    ("ok", Bool, pa.bool_()),
    ("at", UnixTimestamp, pa.timestamp("us")),
    ("li32", Array(Int32), pa.list_(pa.int32())),
    ("li64", Array(Int64), pa.list_(pa.int64())),
    ("lf32", Array(Float32), pa.list_(pa.float32())),
    ("lf64", Array(Float64), pa.list_(pa.float64())),
    ("ls", Array(String), pa.list_(pa.string())),
    ("lb", Array(Bytes), pa.list_(pa.binary())),
    ("lok", Array(Bool), pa.list_(pa.bool_())),
    ("lat", Array(UnixTimestamp), pa.list_(pa.timestamp("us"))),
]


def typed_view(name: str, source: FileSource | None = None) -> FeatureView:
    return FeatureView(
        name=name,
        entities=[driver, zone],
        ttl=timedelta(days=3650),
        schema=[
            Field(name="driver_id", dtype=Int64),
            Field(name="zone", dtype=String),
            *(Field(name=n, dtype=t) for n, t, _ in TYPED),
        ],
        source=source
        or FileSource(
            name=f"{name}_src",
            path="unused.parquet",
            timestamp_field="event_timestamp",
            created_timestamp_column="created",
        ),
    )


def feature_values(i: int, v: int) -> dict[str, Any]:
    """Row i, version v; every 7th row all null, NaN and null list elements sprinkled in."""
    if i % 7 == 3:
        return {n: None for n, _, _ in TYPED}
    at = datetime(2025, 6, 1) + timedelta(seconds=1000 * i + v, microseconds=250)
    return {
        "i32": -(2**31) if i == 1 else i * 10 + v,
        "i64": 2**62 if i == 1 else i * 1000 + v,
        "f32": float("nan") if i % 5 == 2 else (i % 64) / 64 + v,
        "f64": float("nan") if i % 5 == 4 else i * 0.5 + v,
        "s": "" if i == 2 else f"héllo-{i}-{v}",
        "b": bytes([i % 256, 0, 255, v]),
        "ok": (i + v) % 2 == 0,
        "at": None if i % 6 == 5 else at,
        "li32": [] if i == 2 else [i, -i, v],
        "li64": [2**40 + i, v],
        "lf32": [0.25 * i, float("nan"), None] if i % 4 == 1 else [float(v)],
        "lf64": [i / 3, None] if i % 4 == 2 else [],
        "ls": [f"x{i}", None, ""] if i % 3 == 0 else [f"y{v}"],
        "lb": [b"\x00", bytes([i % 256])],
        "lok": [True, None, False] if i % 4 == 0 else [v % 2 == 1],
        "lat": [at, None] if i % 5 == 0 else [at],
    }


def arrow_rows(
    keys: range,
    versions: list[tuple[int, timedelta, timedelta | None]],
    tz: str | None,
    unit: str = "us",
) -> pa.Table:
    """One row per (key, version): (version, event offset, created offset or None)."""
    rows = []
    for v, ev, cr in versions:
        for i in keys:
            event = BASE_TS + ev
            created = None if cr is None else BASE_TS + cr
            if tz is not None:
                event = event.replace(tzinfo=timezone.utc)
                created = None if created is None else created.replace(tzinfo=timezone.utc)
            rows.append(
                {
                    "driver_id": i,
                    "zone": f"z{i % 3}",
                    "event_timestamp": event,
                    "created": created,
                    **feature_values(i, v),
                }
            )
    schema = pa.schema(
        [
            ("driver_id", pa.int64()),
            ("zone", pa.string()),
            ("event_timestamp", pa.timestamp(unit, tz=tz)),
            ("created", pa.timestamp(unit, tz=tz)),
            *((n, t) for n, _, t in TYPED),
        ]
    )
    return pa.Table.from_pylist(rows, schema=schema)


def normalized(value: Any) -> Any:
    """NaN compares unequal to itself; compare it as a marker."""
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    if isinstance(value, list):
        return [normalized(v) for v in value]
    if isinstance(value, dict):
        return {k: normalized(v) for k, v in value.items()}
    return value


def as_ints(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """Timestamps as integers: Feast's NaN timestamp (-2**63) is no Python datetime."""
    t = column.type
    if pa.types.is_timestamp(t):
        return column.cast(pa.int64())
    if pa.types.is_list(t) and pa.types.is_timestamp(t.value_type):
        return column.cast(pa.list_(pa.int64()))
    return column


def table_contents(env: Env, view: FeatureView) -> list[dict[str, Any]]:
    data = env.pyiceberg_table(view).scan().to_arrow().sort_by("entity_key")
    data = pa.table([as_ints(c) for c in data.columns], names=data.column_names)
    return normalized(data.to_pylist())


def read_all(env: Env, view: FeatureView, keys: list[EntityKeyProto]) -> list[Any]:
    out = []
    for ts, feats in env.read(view, keys):
        out.append(
            (ts, None if feats is None else {k: v.SerializeToString() for k, v in feats.items()})
        )
    return out


def keys_of(view: FeatureView, data: pa.Table) -> list[EntityKeyProto]:
    names = [c.name for c in view.entity_columns]
    seen = {tuple(r[n] for n in names) for r in data.select(names).to_pylist()}
    return [
        EntityKeyProto(
            join_keys=names,
            entity_values=[
                ValueProto(int64_val=v) if isinstance(v, int) else ValueProto(string_val=v)
                for v in values
            ],
        )
        for values in sorted(seen)
    ] + [
        EntityKeyProto(
            join_keys=names,
            entity_values=[ValueProto(int64_val=-1), ValueProto(string_val="none")],
        )
    ]


def write_proto_path(env: Env, view: FeatureView, data: pa.Table) -> None:
    """What Feast's LocalOutputNode does (its converter takes one record batch)."""
    join_keys = {c.name: c.dtype.to_value_type() for c in view.entity_columns}
    rows = _convert_arrow_to_proto(data.combine_chunks(), view, join_keys)
    env.write(view, rows)


def write_arrow_path(env: Env, view: FeatureView, data: Any, chunk_rows: int = 1000) -> dict:
    columns = source_columns(view)
    assert columns is not None
    store = env.store._store(env.config)
    name = table_name(env.config, view)
    assert _internal.check_arrow(store, name, data.schema, **columns) is None
    return _internal.write_arrow(store, name, data, chunk_rows=chunk_rows, **columns)


def assert_same_both_ways(make_env: Callable[..., Env], data: pa.Table, chunk_rows: int) -> dict:
    proto, arrow = make_env(), make_env()
    view = typed_view("typed")
    proto.apply(view)
    arrow.apply(view)
    write_proto_path(proto, view, data)
    report = write_arrow_path(arrow, view, data, chunk_rows)
    assert table_contents(arrow, view) == table_contents(proto, view)
    keys = keys_of(view, data)
    assert read_all(arrow, view, keys) == read_all(proto, view, keys)
    return report


DUPLICATES = [
    # (version, event offset, created offset): version 2 ties version 1's event timestamp and
    # wins on created; version 3 is older than both and loses; version 0 is the oldest.
    (0, timedelta(minutes=0), timedelta(minutes=1)),
    (1, timedelta(hours=1), timedelta(hours=1)),
    (2, timedelta(hours=1), timedelta(hours=2)),
    (3, timedelta(minutes=30), timedelta(hours=5)),
]


@pytest.mark.parametrize(
    ("tz", "unit"), [(None, "us"), ("UTC", "us"), (None, "ns"), ("America/New_York", "ms")]
)
def test_same_table_as_proto_path_for_every_type(
    make_env: Callable[..., Env], tz: str | None, unit: str
) -> None:
    data = arrow_rows(range(40), DUPLICATES, tz, unit)
    report = assert_same_both_ways(make_env, data, chunk_rows=1000)
    assert report["rows_read"] == 160
    assert report["chunks"] == 1
    assert report["rows_written"] == 40


def test_chunks_commit_the_same_rows_as_one_batch(make_env: Callable[..., Env]) -> None:
    # Duplicates land in different chunks: the newest still wins, as in one batch.
    data = arrow_rows(range(30), DUPLICATES, None)
    report = assert_same_both_ways(make_env, data, chunk_rows=7)
    assert report["chunks"] == 18
    assert report["rows_read"] == 120


def test_null_created_timestamps(make_env: Callable[..., Env]) -> None:
    data = arrow_rows(range(20), [(1, timedelta(0), None), (2, timedelta(0), None)], None)
    assert_same_both_ways(make_env, data, chunk_rows=1000)


def test_every_record_batch_of_a_stream_is_written(env: Env) -> None:
    # Feast's converter takes only the first record batch of a table; the stream takes all.
    view = typed_view("typed")
    env.apply(view)
    data = arrow_rows(range(50), [(1, timedelta(0), None)], None)
    batches = data.to_batches(max_chunksize=6)
    reader = pa.RecordBatchReader.from_batches(data.schema, iter(batches))
    report = write_arrow_path(env, view, reader, chunk_rows=20)
    assert (report["rows_read"], report["chunks"], report["rows_written"]) == (50, 3, 50)
    assert env.pyiceberg_table(view).scan().to_arrow().num_rows == 50


def test_summed_report_counts_merge_on_read_chunks(make_env: Callable[..., Env]) -> None:
    # One bucket of 200 rows, then 3 chunks of 10 newer rows: each chunk is a small push
    # (10 <= 10% of 200), written merge-on-read with one position-delete file.
    env = make_env(partition_count=1)
    view = typed_view("typed")
    env.apply(view)
    write_arrow_path(env, view, arrow_rows(range(200), [(1, timedelta(0), None)], None))
    newer = arrow_rows(range(30), [(2, timedelta(hours=1), None)], None)
    report = write_arrow_path(env, view, newer, chunk_rows=10)
    assert (report["chunks"], report["rows_written"], report["buckets"]) == (3, 30, 3)
    assert report["merge_on_read_buckets"] == 3
    assert report["delete_files_added"] == 3
    assert report["files_added"] == 3 and report["files_removed"] == 0
    assert env.stats(view)["delete_files"] == 3


def test_renamed_columns_are_mapped(env: Env) -> None:
    view = typed_view("typed")
    env.apply(view)
    original = arrow_rows(range(5), [(1, timedelta(0), timedelta(0))], None)
    data = original.rename_columns([f"raw_{n}" for n in original.column_names])
    columns = source_columns(view)
    assert columns is not None
    mapped = {
        "join_keys": [(t, f"raw_{s}") for t, s in columns["join_keys"]],
        "features": [(t, f"raw_{s}") for t, s in columns["features"]],
        "event_ts": "raw_event_timestamp",
        "created_ts": "raw_created",
    }
    store = env.store._store(env.config)
    name = table_name(env.config, view)
    _internal.write_arrow(store, name, data, **mapped)
    got = env.read(view, keys_of(view, original)[:1])[0][1]
    assert got is not None and plain(got["i64"]) == 1


# ---- bad input: typed errors, checked before any I/O ---------------------------------------


@pytest.fixture
def applied_typed(env: Env) -> tuple[Env, FeatureView, Any]:
    view = typed_view("typed")
    env.apply(view)
    write_arrow_path(env, view, arrow_rows(range(10), [(1, timedelta(0), None)], None))
    return env, view, env.stats(view)["snapshot_id"]


def test_null_join_key_is_rejected_and_nothing_written(applied_typed) -> None:
    env, view, snapshot = applied_typed
    data = arrow_rows(range(10), [(2, timedelta(hours=1), None)], None)
    ids = data.column("driver_id").to_pylist()
    ids[4] = None
    data = data.set_column(0, "driver_id", pa.array(ids, pa.int64()))
    with pytest.raises(InvalidInputError, match="driver_id"):
        write_arrow_path(env, view, data)
    assert env.stats(view)["snapshot_id"] == snapshot


def test_null_event_timestamp_is_rejected(applied_typed) -> None:
    env, view, snapshot = applied_typed
    data = arrow_rows(range(10), [(2, timedelta(hours=1), None)], None)
    ts = data.column("event_timestamp").to_pylist()
    ts[9] = None
    data = data.set_column(2, "event_timestamp", pa.array(ts, pa.timestamp("us")))
    with pytest.raises(InvalidInputError, match="event timestamp is null"):
        write_arrow_path(env, view, data)
    assert env.stats(view)["snapshot_id"] == snapshot


def test_out_of_range_value_is_rejected(applied_typed) -> None:
    env, view, snapshot = applied_typed
    data = arrow_rows(range(10), [(2, timedelta(hours=1), None)], None)
    i32 = data.schema.get_field_index("i32")
    data = data.set_column(i32, "i32", pa.array([2**40] * 10, pa.int64()))
    with pytest.raises(InvalidInputError, match="i32"):
        write_arrow_path(env, view, data)
    assert env.stats(view)["snapshot_id"] == snapshot


def test_unconvertible_types_are_reported_not_written(applied_typed) -> None:
    env, view, snapshot = applied_typed
    data = arrow_rows(range(10), [(2, timedelta(hours=1), None)], None)
    data = data.set_column(
        data.schema.get_field_index("i64"), "i64", pa.array(["x"] * 10, pa.string())
    )
    columns = source_columns(view)
    assert columns is not None
    store = env.store._store(env.config)
    name = table_name(env.config, view)
    why = _internal.check_arrow(store, name, data.schema, **columns)
    assert why is not None and "i64" in why
    with pytest.raises(SchemaMismatchError, match="i64"):
        _internal.write_arrow(store, name, data, **columns)
    good = arrow_rows(range(1), [(2, timedelta(hours=1), None)], None).schema
    missing = dict(columns, event_ts="nope")
    assert "nope" in (_internal.check_arrow(store, name, good, **missing) or "")
    assert env.stats(view)["snapshot_id"] == snapshot


def test_a_bad_chunk_leaves_earlier_chunks_committed(applied_typed) -> None:
    env, view, _ = applied_typed
    good = arrow_rows(range(10), [(2, timedelta(hours=1), None)], None)
    ids = good.column("driver_id").to_pylist()
    ids[8] = None
    data = good.set_column(0, "driver_id", pa.array(ids, pa.int64()))
    # The error names the table and the row of the whole stream, not of the chunk.
    with pytest.raises(InvalidInputError, match=r'test_typed_online.*"driver_id" is null in row 8'):
        write_arrow_path(env, view, data, chunk_rows=5)
    stamps = {ts for ts, _ in read_all(env, view, keys_of(view, good)[:10])}
    # Chunk 1 (rows 0-4) committed the new event timestamp; chunk 2 (rows 5-9) nothing.
    old, new = BASE_TS, BASE_TS + timedelta(hours=1)
    assert stamps == {old.replace(tzinfo=timezone.utc), new.replace(tzinfo=timezone.utc)}


def test_engine_config_is_validated() -> None:
    with pytest.raises(ValueError):
        IcebergArrowEngineConfig(chunk_rows=0)
    assert IcebergArrowEngineConfig().type == "feast_iceberg.IcebergArrowEngine"


# ---- end to end: feast materialize through the engine vs Feast's local engine -----------------


def feature_store(repo: Path, engine: dict[str, Any] | None, online: dict[str, Any]) -> Any:
    (repo / "data").mkdir(parents=True)
    config = RepoConfig(
        project="e2e",
        registry=str(repo / "data" / "registry.db"),
        provider="local",
        online_store=online,
        offline_store={"type": "file"},
        entity_key_serialization_version=3,
        repo_path=repo,
        **({"batch_engine": engine} if engine else {}),
    )
    return FeatureStore(config=config)


def iceberg(repo: Path) -> dict[str, Any]:
    return {
        "type": "feast_iceberg.IcebergOnlineStore",
        "uri": f"sqlite:///{repo / 'data' / 'catalog.db'}",
        "warehouse": str(repo / "data" / "warehouse"),
    }


ENGINE = {"type": "feast_iceberg.IcebergArrowEngine", "chunk_rows": 25}


def e2e_views(source_path: Path) -> list[FeatureView]:
    mapped = FileSource(
        name="mapped_src",
        path=str(source_path),
        timestamp_field="event_timestamp",
        created_timestamp_column="created",
        # Feast renames raw columns before the output step; both paths see the feature names.
        field_mapping={"raw_i64": "i64", "raw_s": "s"},
    )
    plain_src = FileSource(
        name="plain_src",
        path=str(source_path),
        timestamp_field="event_timestamp",
        created_timestamp_column="created",
    )
    with_set = FeatureView(
        name="with_set",
        entities=[driver],
        ttl=timedelta(days=3650),
        schema=[
            Field(name="driver_id", dtype=Int64),
            Field(name="i64", dtype=Int64),
            Field(name="tags", dtype=Set(String)),
        ],
        source=FileSource(name="set_src", path=str(source_path), timestamp_field="event_timestamp"),
    )
    return [typed_view("typed", plain_src), typed_view("mapped", mapped), with_set]


def e2e_frame() -> pd.DataFrame:
    data = arrow_rows(range(60), DUPLICATES, "UTC")
    frame = data.to_pandas()
    frame["raw_i64"] = frame["i64"]
    frame["raw_s"] = frame["s"]
    frame["tags"] = [["a"] if i % 2 else None for i in range(len(frame))]
    return frame


def test_materialize_through_engine_equals_local_engine(
    tmp_path: Path, make_env: Callable[..., Env], caplog: pytest.LogCaptureFixture
) -> None:
    source = tmp_path / "source.parquet"
    e2e_frame().to_parquet(source)
    stores = {}
    for label, engine in (("proto", None), ("arrow", ENGINE)):
        repo = tmp_path / label
        fs = feature_store(repo, engine, iceberg(repo))
        fs.apply([driver, zone, *e2e_views(source)])
        with caplog.at_level(logging.DEBUG, logger="feast_iceberg.engine"):
            fs.materialize(BASE_TS - timedelta(days=1), BASE_TS + timedelta(days=1))
        stores[label] = fs
    native = {r.getMessage().split()[2] for r in caplog.records if "natively" in r.getMessage()}
    assert native == {"typed", "mapped"}  # with_set (a Set feature) took the proto path
    assert any("with_set takes Feast's proto path" in r.getMessage() for r in caplog.records)

    for view in e2e_views(source):
        envs = []
        for label in ("proto", "arrow"):
            fs = stores[label]
            envs.append(Env(tmp_path / label, fs.config, fs._get_provider().online_store))
        proto_env, arrow_env = envs
        assert table_contents(arrow_env, view) == table_contents(proto_env, view), view.name
        if view.name != "with_set":
            frame = pa.Table.from_pandas(e2e_frame())
            keys = keys_of(view, frame)
            assert read_all(arrow_env, view, keys) == read_all(proto_env, view, keys)

    refs = ["typed:i64", "typed:ls", "mapped:s", "with_set:tags"]
    rows = [{"driver_id": i, "zone": f"z{i % 3}"} for i in (0, 5, 59, 1000)]
    got = [
        stores[label].get_online_features(features=refs, entity_rows=rows).to_dict()
        for label in ("proto", "arrow")
    ]
    assert got[0] == got[1]
    assert got[1]["i64"][:2] == [2, 5002]  # version 2: ties version 1, wins on created_ts


def test_other_online_stores_take_the_proto_path(tmp_path: Path) -> None:
    source = tmp_path / "source.parquet"
    e2e_frame().to_parquet(source)
    online = {"type": "sqlite", "path": str(tmp_path / "repo" / "data" / "online.db")}
    fs = feature_store(tmp_path / "repo", ENGINE, online)
    views = e2e_views(source)
    fs.apply([driver, zone, *views])
    fs.materialize(BASE_TS - timedelta(days=1), BASE_TS + timedelta(days=1))
    got = fs.get_online_features(
        features=["typed:i64"], entity_rows=[{"driver_id": 5, "zone": "z2"}]
    ).to_dict()
    assert got["i64"] == [5002]
