"""Repo shapes Feast users have, end to end through FeatureStore (apply, materialize, push,
write_to_online_store, get_online_features) on a real SQLite catalog and local warehouse:

- a view whose schema lists the entity's join key as a Field (and a stream view over a push
  source, which Feast's registry then lists among the features too);
- an on-demand view with `write_to_online_store=True`, whose rows carry the entity columns;
- precomputed feature-service vectors (the synthetic `__precomputed__{service}` view);
- `online_write_batch_async` (push_async);
- versioned feature views (`registry.enable_online_feature_view_versioning`).
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from feast import (
    Entity,
    FeatureService,
    FeatureStore,
    FeatureView,
    Field,
    FileSource,
    PushSource,
    RepoConfig,
    StreamFeatureView,
)
from feast.infra.key_encoding_utils import serialize_entity_key
from feast.on_demand_feature_view import on_demand_feature_view
from feast.protos.feast.core.PrecomputedFeatureVector_pb2 import PrecomputedFeatureVector
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from feast.types import Float32, Float64, Int32, Int64
from feast.value_type import ValueType
from feast_iceberg import IcebergOnlineStore, SchemaMismatchError
from feast_iceberg.online_store import table_name

T0 = datetime(2026, 1, 1, 12, tzinfo=timezone.utc)
ARROW_ENGINE = {"type": "feast_iceberg.IcebergArrowEngine"}


def feature_store(repo: Path, versioning: bool = False, engine: Any = None) -> FeatureStore:
    (repo / "data").mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {
        "project": "shapes",
        "registry": {
            "path": str(repo / "data" / "registry.db"),
            "enable_online_feature_view_versioning": versioning,
        },
        "provider": "local",
        "online_store": {
            "type": "feast_iceberg.IcebergOnlineStore",
            "uri": f"sqlite:///{repo / 'data' / 'catalog.db'}",
            "warehouse": str(repo / "data" / "warehouse"),
        },
        "offline_store": {"type": "file"},
        "entity_key_serialization_version": 3,
        "repo_path": repo,
    }
    if engine is not None:
        config["batch_engine"] = engine
    return FeatureStore(config=RepoConfig(**config))


def iceberg_rows(fs: FeatureStore, view: Any) -> list[dict[str, Any]]:
    """The table's live rows, read with PyIceberg (what another engine sees)."""
    from pyiceberg.catalog import load_catalog

    online = fs.config.online_store
    catalog = load_catalog(
        online.catalog_name,
        type="sql",
        uri=online.uri,
        warehouse=f"file://{online.warehouse}",
    )
    table = catalog.load_table(f"{online.namespace}.{table_name(fs.config, view)}")
    return sorted(table.scan().to_arrow().to_pylist(), key=lambda r: r["entity_key"])


def column_names(fs: FeatureStore, view: Any) -> list[str]:
    from pyiceberg.catalog import load_catalog

    online = fs.config.online_store
    catalog = load_catalog(
        online.catalog_name, type="sql", uri=online.uri, warehouse=f"file://{online.warehouse}"
    )
    table = catalog.load_table(f"{online.namespace}.{table_name(fs.config, view)}")
    return [f.name for f in table.schema().fields]


# ---- 1. the join key listed as a Field ------------------------------------------------------


def location_repo(tmp_path: Path, engine: Any = None) -> tuple[FeatureStore, dict[str, Any]]:
    source_path = tmp_path / "locations.parquet"
    pd.DataFrame(
        {
            "location_id": [1, 2, 3],
            "temperature": pd.array([10, 20, 30], dtype="int32"),
            "event_timestamp": [T0] * 3,
        }
    ).to_parquet(source_path)
    source = FileSource(name="locations", path=str(source_path), timestamp_field="event_timestamp")
    # Feast's own examples: an entity without a value type, its join key in the schema.
    location = Entity(name="location_id")
    stats = FeatureView(
        name="location_stats",
        entities=[location],
        schema=[Field(name="temperature", dtype=Int32), Field(name="location_id", dtype=Int64)],
        source=source,
        ttl=timedelta(days=3650),
    )
    pushable = StreamFeatureView(
        name="pushable_location_stats",
        entities=[location],
        schema=[Field(name="temperature", dtype=Int32), Field(name="location_id", dtype=Int64)],
        source=PushSource(name="location_push", batch_source=source),
        ttl=timedelta(days=3650),
    )
    fs = feature_store(tmp_path / "repo", engine=engine)
    fs.apply([location, stats, pushable])
    return fs, {"stats": stats, "pushable": pushable}


@pytest.mark.parametrize("engine", [None, ARROW_ENGINE], ids=["local-engine", "arrow-engine"])
def test_join_key_in_schema_materialize_push_and_read(tmp_path: Path, engine: Any) -> None:
    fs, views = location_repo(tmp_path, engine)
    # Feast's registry lists the stream view's join key among its features as well.
    assert "location_id" in [
        f.name for f in fs.get_stream_feature_view("pushable_location_stats").features
    ]

    fs.materialize(T0 - timedelta(hours=1), T0 + timedelta(hours=1))
    rows = [{"location_id": i} for i in (2, 9, 1)]
    got = fs.get_online_features(
        features=["location_stats:temperature", "pushable_location_stats:temperature"],
        entity_rows=rows,
        full_feature_names=True,
    ).to_dict()
    assert got["location_stats__temperature"] == [20, None, 10]
    assert got["pushable_location_stats__temperature"] == [20, None, 10]
    assert got["location_id"] == [2, 9, 1]

    fs.push(
        "location_push",
        pd.DataFrame(
            {
                "location_id": [2, 7],
                "temperature": pd.array([21, 70], dtype="int32"),
                "event_timestamp": [T0 + timedelta(hours=1)] * 2,
            }
        ),
    )
    got = fs.get_online_features(
        features=["pushable_location_stats:temperature", "pushable_location_stats:location_id"],
        entity_rows=[{"location_id": i} for i in (2, 7, 3, 9)],
    ).to_dict()
    assert got["temperature"] == [21, 70, 30, None]
    # The join key Feast asks for as a feature comes back from the key; like any feature of a
    # key that is not stored, it is None there (as with Feast's sqlite store).
    assert got["location_id"] == [2, 7, 3, None]

    # One typed key column per join key, no feature column of the same name.
    for view in views.values():
        columns = column_names(fs, view)
        assert columns.count("location_id") == 1
        assert "temperature" in columns
    stored = iceberg_rows(fs, views["pushable"])
    assert sorted((r["location_id"], r["temperature"]) for r in stored) == [
        (1, 10),
        (2, 21),
        (3, 30),
        (7, 70),
    ]


def test_join_key_requested_as_feature_of_missing_key_reads_as_none(tmp_path: Path) -> None:
    fs, views = location_repo(tmp_path)
    store = fs._get_provider().online_store
    key = EntityKeyProto(join_keys=["location_id"], entity_values=[ValueProto(int64_val=5)])
    assert store.online_read(fs.config, views["pushable"], [key], ["location_id"]) == [(None, None)]


# ---- 2. on-demand views written to the online store ------------------------------------------


def odfv_repo(tmp_path: Path) -> tuple[FeatureStore, Any, pd.DataFrame]:
    df = pd.DataFrame(
        {
            "customer_id": [1, 2],
            "product_id": [10, 20],
            "price": [100.0, 200.0],
            "revenue": [5.0, 10.0],
            "event_timestamp": [T0] * 2,
            "created_timestamp": [T0] * 2,
        }
    )
    path = tmp_path / "orders.parquet"
    df.to_parquet(path)
    customer = Entity(name="customer_id", join_keys=["customer_id"], value_type=ValueType.INT64)
    product = Entity(name="product_id", join_keys=["product_id"], value_type=ValueType.INT64)
    fv = FeatureView(
        name="price_revenue",
        entities=[customer, product],
        schema=[Field(name="price", dtype=Float32), Field(name="revenue", dtype=Float32)],
        source=FileSource(
            name="orders",
            path=str(path),
            timestamp_field="event_timestamp",
            created_timestamp_column="created_timestamp",
        ),
        ttl=timedelta(days=3650),
    )

    @on_demand_feature_view(
        entities=[customer, product],
        sources=[fv],
        schema=[Field(name="total_value", dtype=Float64)],
        write_to_online_store=True,
    )
    def total_value(df: pd.DataFrame) -> pd.DataFrame:
        df["total_value"] = df["price"] + df["revenue"]
        return df

    fs = feature_store(tmp_path / "repo")
    fs.apply([customer, product, fv, total_value])
    return fs, total_value, df


def test_on_demand_view_written_to_online_store(tmp_path: Path) -> None:
    fs, odfv, _ = odfv_repo(tmp_path)
    fs.materialize(T0 - timedelta(days=1), T0 + timedelta(days=1))
    got = fs.get_online_features(
        features=["total_value:total_value"],
        entity_rows=[{"customer_id": 2, "product_id": 20}, {"customer_id": 1, "product_id": 10}],
    ).to_dict()
    assert got["total_value"] == [210.0, 105.0]

    new = pd.DataFrame(
        {
            "customer_id": [3],
            "product_id": [30],
            "price": [300.0],
            "revenue": [15.0],
            "event_timestamp": [T0 + timedelta(hours=1)],
            "created_timestamp": [T0 + timedelta(hours=1)],
        }
    )
    fs.write_to_online_store("total_value", df=fs._transform_on_demand_feature_view_df(odfv, new))
    got = fs.get_online_features(
        features=["total_value:total_value"],
        entity_rows=[{"customer_id": 3, "product_id": 30}],
    ).to_dict()
    assert got["total_value"] == [315.0]
    # The entity columns the rows carried are the key columns, not features as well.
    assert column_names(fs, odfv) == [
        "entity_key",
        "customer_id",
        "product_id",
        "event_ts",
        "created_ts",
        "total_value",
    ]
    stored = iceberg_rows(fs, odfv)
    assert sorted((r["customer_id"], r["product_id"], r["total_value"]) for r in stored) == [
        (1, 10, 105.0),
        (2, 20, 210.0),
        (3, 30, 315.0),
    ]


def test_unknown_feature_in_a_row_is_still_rejected(tmp_path: Path) -> None:
    fs, odfv, _ = odfv_repo(tmp_path)
    store = fs._get_provider().online_store
    key = EntityKeyProto(
        join_keys=["customer_id", "product_id"],
        entity_values=[ValueProto(int64_val=1), ValueProto(int64_val=10)],
    )
    good = {"total_value": ValueProto(double_val=1.0), "customer_id": ValueProto(int64_val=1)}
    bad = {"total_value": ValueProto(double_val=2.0), "discount": ValueProto(double_val=0.5)}
    ts = datetime(2026, 1, 1)
    with pytest.raises(SchemaMismatchError, match=r"unknown \['discount'\]"):
        store.online_write_batch(
            fs.config, odfv, [(key, good, ts, None), (key, bad, ts, None)], None
        )
    assert store.online_read(fs.config, odfv, [key]) == [(None, None)]


# ---- 3. precomputed feature-service vectors -------------------------------------------------


def test_precomputed_vectors_are_written_and_read_without_update(tmp_path: Path) -> None:
    fs, views = location_repo(tmp_path)
    service = FeatureService(
        name="location_service", features=[views["stats"][["temperature"]]], precompute_online=True
    )
    fs.apply([service])
    store = fs._get_provider().online_store
    keys = [
        EntityKeyProto(join_keys=["location_id"], entity_values=[ValueProto(int64_val=i)])
        for i in (1, 2)
    ]
    # Nothing written yet: every key reads as missing, and no table is created by the read.
    assert store.read_precomputed_vectors(fs.config, "location_service", "shapes", keys) == [
        None,
        None,
    ]
    for key, temperature in zip(keys, (11, 22), strict=True):
        vector = PrecomputedFeatureVector(
            feature_names=["temperature"], values=[ValueProto(int32_val=temperature)]
        )
        store.write_precomputed_vector(
            fs.config, "location_service", "shapes", key, vector.SerializeToString()
        )
    blobs = store.read_precomputed_vectors(fs.config, "location_service", "shapes", keys)
    assert [PrecomputedFeatureVector.FromString(b).values[0].int32_val for b in blobs] == [11, 22]
    got = fs.get_online_features(
        features=fs.get_feature_service("location_service"),
        entity_rows=[{"location_id": 2}, {"location_id": 1}],
    ).to_dict()
    assert got["temperature"] == [22, 11]


# ---- 4. async writes ------------------------------------------------------------------------


def test_online_write_batch_async_and_async_supported(tmp_path: Path) -> None:
    fs, _ = location_repo(tmp_path)
    store = fs._get_provider().online_store
    assert isinstance(store, IcebergOnlineStore)
    assert store.async_supported.read and store.async_supported.write

    pushed = pd.DataFrame(
        {
            "location_id": [4, 5],
            "temperature": pd.array([40, 50], dtype="int32"),
            "event_timestamp": [T0] * 2,
        }
    )
    asyncio.run(fs.push_async("location_push", pushed))
    got = asyncio.run(
        fs.get_online_features_async(
            features=["pushable_location_stats:temperature"],
            entity_rows=[{"location_id": 5}, {"location_id": 4}],
        )
    ).to_dict()
    assert got["temperature"] == [50, 40]


# ---- 5. versioned feature views -------------------------------------------------------------


def test_versioned_feature_views_read_each_version_from_its_table(tmp_path: Path) -> None:
    source_path = tmp_path / "drivers.parquet"
    pd.DataFrame(
        {
            "driver_id": [1, 2],
            "trips": [10, 20],
            "rating": [4.5, 3.5],
            "event_timestamp": [T0] * 2,
        }
    ).to_parquet(source_path)
    source = FileSource(name="drivers", path=str(source_path), timestamp_field="event_timestamp")
    driver = Entity(name="driver", join_keys=["driver_id"], value_type=ValueType.INT64)

    def view(*fields: Field) -> FeatureView:
        return FeatureView(
            name="driver_stats",
            entities=[driver],
            schema=[Field(name="driver_id", dtype=Int64), *fields],
            source=source,
            ttl=timedelta(days=3650),
        )

    fs = feature_store(tmp_path / "repo", versioning=True)
    assert fs._get_provider().online_store._is_versioned_read_supported()
    fs.apply([driver, view(Field(name="trips", dtype=Int64))])
    fs.materialize(T0 - timedelta(hours=1), T0 + timedelta(hours=1))
    v0 = fs.get_feature_view("driver_stats")
    assert table_name(fs.config, v0) == "shapes_driver_stats_online"

    # A schema change makes version 1: its own table, `{project}_{name}_v1_online`.
    fs.apply([view(Field(name="trips", dtype=Int64), Field(name="rating", dtype=Float64))])
    v1 = fs.get_feature_view("driver_stats")
    assert v1.current_version_number == 1
    assert table_name(fs.config, v1) == "shapes_driver_stats_v1_online"
    fs.materialize(T0 - timedelta(hours=1), T0 + timedelta(hours=1))

    rows = [{"driver_id": 2}, {"driver_id": 1}]
    latest = fs.get_online_features(
        features=["driver_stats:trips", "driver_stats:rating"], entity_rows=rows
    ).to_dict()
    assert latest["rating"] == [3.5, 4.5]
    assert latest["trips"] == [20, 10]
    pinned = fs.get_online_features(features=["driver_stats@v1:rating"], entity_rows=rows).to_dict()
    assert pinned["rating"] == [3.5, 4.5]
    old = fs.get_online_features(features=["driver_stats@v0:trips"], entity_rows=rows).to_dict()
    assert old["trips"] == [20, 10]
    assert "rating" not in column_names(fs, v0)


def test_serialized_keys_match_feast(tmp_path: Path) -> None:
    # The precomputed table is keyed like every other: Feast's serialize_entity_key bytes.
    fs, _ = location_repo(tmp_path)
    key = EntityKeyProto(join_keys=["location_id"], entity_values=[ValueProto(int64_val=1)])
    store = fs._get_provider().online_store
    store.write_precomputed_vector(fs.config, "svc", "shapes", key, b"blob")
    view = FeatureView(name="__precomputed__svc", entities=[], schema=[], source=None)
    assert [r["entity_key"] for r in iceberg_rows(fs, view)] == [serialize_entity_key(key, 3)]
