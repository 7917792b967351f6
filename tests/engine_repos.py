"""Feast repos for the distributed engines' tests (tests/test_spark_engine.py,
tests/test_ray_engine.py): one parquet source, two feature views over it, our store on an SQLite
catalog + local warehouse, and helpers that read back what a materialization left behind."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pandas as pd
from feast import Entity, FeatureStore, FeatureView, Field, FileSource, RepoConfig
from feast.types import Array, Float32, Float64, Int64, String
from feast.value_type import ValueType
from feast_iceberg.online_store import table_name

ENTITIES = 2_000
T0 = datetime(2026, 1, 1, 12, tzinfo=timezone.utc)
START, END = T0 - timedelta(days=1), T0 + timedelta(days=1)
VIEWS = ("stats_a", "stats_b")

driver = Entity(name="driver", join_keys=["driver_id"], value_type=ValueType.INT64)


def source_frame(entities: int = ENTITIES, version: int = 1) -> pd.DataFrame:
    """Every entity at `version`, plus an older row for every third one (Feast's dedup and
    ours must keep the newer), a null here and there."""
    rows = []
    for old in (True, False):
        for i in range(entities):
            if old and i % 3:
                continue
            v = version - 1 if old else version
            ts = T0 - timedelta(hours=2 if old else 1, seconds=i % 600)
            rows.append(
                {
                    "driver_id": i,
                    "event_timestamp": ts,
                    "created": ts + timedelta(seconds=1),
                    "conv_rate": (i % 64) / 64 + v,
                    "acc_rate": None if i % 11 == 5 else i * 0.5 + v,
                    "trips": i * 1000 + v,
                    "city": f"city-{i}-{v}",
                    "tags": [f"t{i % 5}", f"v{v}"] if i % 4 else [],
                }
            )
    frame = pd.DataFrame(rows)
    frame["conv_rate"] = frame["conv_rate"].astype("float32")
    return frame


def views(source: Path) -> list[FeatureView]:
    src = FileSource(
        name="stats_src",
        path=str(source),
        timestamp_field="event_timestamp",
        created_timestamp_column="created",
    )
    schema = [
        Field(name="driver_id", dtype=Int64),
        Field(name="conv_rate", dtype=Float32),
        Field(name="acc_rate", dtype=Float64),
        Field(name="trips", dtype=Int64),
        Field(name="city", dtype=String),
        Field(name="tags", dtype=Array(String)),
    ]
    return [
        # Feast's Ray engine drops rows older than now - ttl when it materializes.
        FeatureView(name=n, entities=[driver], ttl=timedelta(days=3650), schema=schema, source=src)
        for n in VIEWS
    ]


def online_store(repo: Path) -> dict[str, Any]:
    return {
        "type": "feast_iceberg.IcebergOnlineStore",
        "uri": f"sqlite:///{repo / 'data' / 'catalog.db'}",
        "warehouse": str(repo / "data" / "warehouse"),
        # Keep every snapshot, so a test can count the commits of a materialization.
        "snapshot_retention_count": 1000,
    }


def feature_store(repo: Path, engine: dict[str, Any] | None, source: Path) -> FeatureStore:
    (repo / "data").mkdir(parents=True, exist_ok=True)
    config = RepoConfig(
        project="dist",
        registry=str(repo / "data" / "registry.db"),
        provider="local",
        online_store=online_store(repo),
        offline_store={"type": "file"},
        entity_key_serialization_version=3,
        repo_path=repo,
        **({"batch_engine": engine} if engine else {}),
    )
    fs = FeatureStore(config=config)
    fs.apply([driver, *views(source)])
    return fs


def write_source(path: Path, version: int = 1, entities: int = ENTITIES) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    source_frame(entities, version).to_parquet(path)
    return path


def core_store(fs: FeatureStore) -> Any:
    return fs._get_provider().online_store._store(fs.config)


def stats(fs: FeatureStore, view: str) -> dict[str, Any]:
    return dict(core_store(fs).stats(table_name(fs.config, fs.get_feature_view(view))))


def duplicate_keys(fs: FeatureStore, view: str) -> int:
    return int(core_store(fs).duplicate_keys(table_name(fs.config, fs.get_feature_view(view))))


def orphans(fs: FeatureStore, view: str) -> int:
    """Files under the table that no snapshot references (staged files of dead attempts)."""
    name = table_name(fs.config, fs.get_feature_view(view))
    return int(core_store(fs).remove_orphans(name, 0.0, dry_run=True)["files"])


def _normalized(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    if isinstance(value, list):
        return [_normalized(v) for v in value]
    return value


def table_rows(fs: FeatureStore, view: str) -> list[dict[str, Any]]:
    """The table's live rows, sorted by entity key (PyIceberg applies deletes)."""
    from pyiceberg.catalog import load_catalog

    online = fs.config.online_store
    repo = Path(fs.config.repo_path)
    catalog = load_catalog(
        online.catalog_name,
        type="sql",
        uri=f"sqlite:///{repo / 'data' / 'catalog.db'}",
        warehouse=f"file://{repo / 'data' / 'warehouse'}",
    )
    name = f"{online.namespace}.{table_name(fs.config, fs.get_feature_view(view))}"
    data = catalog.load_table(name).scan().to_arrow().sort_by("entity_key")
    return [{k: _normalized(v) for k, v in row.items()} for row in data.to_pylist()]


def expected_online(fs: FeatureStore, view: str, ids: list[int], version: int = 1) -> None:
    """`get_online_features` serves the newest value of every entity."""
    got = fs.get_online_features(
        features=[f"{view}:trips", f"{view}:city"],
        entity_rows=[{"driver_id": i} for i in ids],
    ).to_dict()
    assert got["trips"] == [i * 1000 + version for i in ids]
    assert got["city"] == [f"city-{i}-{version}" for i in ids]


def in_threads(*calls: Callable[[], Any]) -> list[Any]:
    """Runs the calls at once; returns their results, re-raising the first error."""
    results: list[Any] = [None] * len(calls)
    errors: list[BaseException] = []

    def run(i: int, call: Callable[[], Any]) -> None:
        try:
            results[i] = call()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def arrow_engine_rows(tmp: Path, source: Path) -> dict[str, list[dict[str, Any]]]:
    """What our local Arrow engine leaves in each view's table for the same source."""
    fs = feature_store(tmp / "arrow", {"type": "feast_iceberg.IcebergArrowEngine"}, source)
    fs.materialize(START, END)
    return {v: table_rows(fs, v) for v in VIEWS}


def null_key_source(path: Path) -> Path:
    """A source whose rows include a null join key, which the core refuses to write."""
    frame = source_frame(200)
    frame["driver_id"] = frame["driver_id"].astype("Int64")
    frame.loc[7, "driver_id"] = pd.NA
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(path)
    return path
