"""Shared fixtures: a Feast RepoConfig on a real SQLite catalog + local warehouse in a temp dir,
feature views, and helpers to build rows and read the tables back with PyIceberg."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from feast import Entity, FeatureView, Field, FileSource
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from feast.repo_config import RepoConfig
from feast.types import Float32, Float64, Int64, String
from feast.value_type import ValueType
from feast_iceberg import IcebergOnlineStore
from feast_iceberg.online_store import table_name

PROJECT = "test"
CATALOG = "feast_catalog"
NAMESPACE = "feast_online"
BASE_TS = datetime(2026, 1, 1, 12, 0, 0)

Row = tuple[EntityKeyProto, dict[str, ValueProto], datetime, datetime | None]


def repo_config(repo: Path, **online: Any) -> RepoConfig:
    """A RepoConfig whose online store is ours, on an SQLite catalog under `repo/data`."""
    store: dict[str, Any] = {
        "type": "feast_iceberg.IcebergOnlineStore",
        "uri": f"sqlite:///{repo / 'data' / 'catalog.db'}",
        "warehouse": str(repo / "data" / "warehouse"),
    }
    store.update(online)
    return RepoConfig(
        project=PROJECT,
        registry=str(repo / "data" / "registry.db"),
        provider="local",
        online_store=store,
        offline_store={"type": "file"},
        entity_key_serialization_version=3,
        repo_path=repo,
    )


driver = Entity(name="driver", join_keys=["driver_id"], value_type=ValueType.INT64)

DRIVER_FEATURES = ["conv_rate", "acc_rate", "trips", "city"]


def driver_view(name: str = "driver_stats", extra: Iterable[Field] = ()) -> FeatureView:
    return FeatureView(
        name=name,
        entities=[driver],
        ttl=timedelta(days=1),
        schema=[
            Field(name="driver_id", dtype=Int64),
            Field(name="conv_rate", dtype=Float32),
            Field(name="acc_rate", dtype=Float64),
            Field(name="trips", dtype=Int64),
            Field(name="city", dtype=String),
            *extra,
        ],
        source=FileSource(name=f"{name}_src", path="unused.parquet", timestamp_field="ts"),
    )


def driver_key(i: int) -> EntityKeyProto:
    return EntityKeyProto(join_keys=["driver_id"], entity_values=[ValueProto(int64_val=i)])


def driver_row(i: int, version: int, ts: datetime | None = None) -> Row:
    """Values derived from (key, version), exact in float32, so reads can be checked exactly."""
    features = {
        "conv_rate": ValueProto(float_val=(i % 64) / 64 + version),
        "acc_rate": ValueProto(double_val=i * 0.5 + version),
        "trips": ValueProto(int64_val=i * 1000 + version),
        "city": ValueProto(string_val=f"city-{i}-{version}"),
    }
    event = ts or BASE_TS + timedelta(minutes=version)
    return (driver_key(i), features, event, event + timedelta(seconds=1))


def expected_values(i: int, version: int) -> dict[str, Any]:
    return {
        "conv_rate": (i % 64) / 64 + version,
        "acc_rate": i * 0.5 + version,
        "trips": i * 1000 + version,
        "city": f"city-{i}-{version}",
    }


def plain(value: ValueProto) -> Any:
    """The Python value a ValueProto holds (None when unset)."""
    kind = value.WhichOneof("val")
    return None if kind is None else getattr(value, kind)


@dataclass
class Env:
    """A store, its repo config and helpers for one test."""

    repo: Path
    config: RepoConfig
    store: IcebergOnlineStore

    def apply(self, *views: FeatureView) -> None:
        self.store.update(self.config, [], list(views), [], [driver], partial=False)

    def write(self, view: FeatureView, rows: list[Row]) -> None:
        self.store.online_write_batch(self.config, view, rows, None)

    def read(
        self, view: FeatureView, keys: list[EntityKeyProto], features: list[str] | None = None
    ) -> list[tuple[datetime | None, dict[str, ValueProto] | None]]:
        return self.store.online_read(self.config, view, keys, features)

    def stats(self, view: FeatureView) -> dict[str, Any]:
        return self.store._store(self.config).stats(table_name(self.config, view))

    def catalog(self) -> Any:
        from pyiceberg.catalog import load_catalog

        return load_catalog(
            CATALOG,
            type="sql",
            uri=f"sqlite:///{self.repo / 'data' / 'catalog.db'}",
            warehouse=f"file://{self.repo / 'data' / 'warehouse'}",
        )

    def pyiceberg_table(self, view: FeatureView) -> Any:
        return self.catalog().load_table(f"{NAMESPACE}.{table_name(self.config, view)}")

    def warehouse_files(self) -> list[Path]:
        return [p for p in (self.repo / "data" / "warehouse").rglob("*") if p.is_file()]


@pytest.fixture
def make_env(tmp_path: Path) -> Callable[..., Env]:
    def make(**online: Any) -> Env:
        repo = tmp_path / f"repo{len(list(tmp_path.iterdir()))}"
        (repo / "data").mkdir(parents=True)
        return Env(repo, repo_config(repo, **online), IcebergOnlineStore())

    return make


@pytest.fixture
def env(make_env: Callable[..., Env]) -> Env:
    return make_env()
