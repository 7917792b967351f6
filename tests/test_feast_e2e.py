"""Feast end to end on every backend: apply, materialize, get_online_features from a
feature_store.yaml; and the README quickstart exactly as a user runs it."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import Backend, pyiceberg_catalog

ROOT = Path(__file__).resolve().parents[1]

FEATURES_PY = """
from datetime import timedelta
from feast import Entity, FeatureView, Field, FileSource
from feast.types import Array, Float32, Float64, Int64, String
from feast.value_type import ValueType

driver = Entity(name="driver", join_keys=["driver_id"], value_type=ValueType.INT64)
source = FileSource(
    name="stats_source", path="{source}", timestamp_field="event_timestamp",
    created_timestamp_column="created",
)
driver_stats = FeatureView(
    name="driver_stats",
    entities=[driver],
    ttl=timedelta(days=3650),
    schema=[
        Field(name="driver_id", dtype=Int64),
        Field(name="conv_rate", dtype=Float32),
        Field(name="trips", dtype=Int64),
        Field(name="city", dtype=String),
        Field(name="ratings", dtype=Array(Float64)),
    ],
    source=source,
    online=True,
)
"""


def frame(drivers: range, hour: datetime, version: int) -> pd.DataFrame:
    df = pd.DataFrame(
        {
            "driver_id": list(drivers),
            "event_timestamp": [hour] * len(drivers),
            "created": [hour + timedelta(minutes=1)] * len(drivers),
            "conv_rate": [(d % 32) / 32 + version for d in drivers],
            "trips": [d * 10 + version for d in drivers],
            "city": [f"c{d}-{version}" for d in drivers],
            "ratings": [[float(version), d / 2] for d in drivers],
        }
    )
    df["conv_rate"] = df["conv_rate"].astype(np.float32)
    return df


@pytest.fixture
def repo(tmp_path: Path, backend: Backend) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    (tmp_path / "features.py").write_text(FEATURES_PY.format(source=data / "stats.parquet"))
    # SQLite: the bare block, to show the defaults work; other backends need their fields.
    online = {"type": "feast_iceberg.IcebergOnlineStore"}
    if backend.name != "sqlite":
        online.update(backend.options(tmp_path))
    config = {
        "project": "e2e",
        "registry": "data/registry.db",
        "provider": "local",
        "online_store": online,
        "offline_store": {"type": "file"},
        "entity_key_serialization_version": 3,
    }
    (tmp_path / "feature_store.yaml").write_text(yaml.safe_dump(config))
    return tmp_path


@pytest.mark.backends
def test_apply_materialize_get_online_features(repo: Path, backend: Backend) -> None:
    from feast import FeatureStore
    from feast.repo_operations import apply_total, create_feature_store  # noqa: F401

    drivers = range(1, 301)
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    first = frame(drivers, t0, 1)
    first.to_parquet(repo / "data" / "stats.parquet")

    store = FeatureStore(repo_path=str(repo))
    sys.path.insert(0, str(repo))
    try:
        import features  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(repo))
    store.apply([features.driver, features.driver_stats])
    store.materialize(t0 - timedelta(hours=1), t0 + timedelta(hours=1))

    refs = [f"driver_stats:{f}" for f in ("conv_rate", "trips", "city", "ratings")]
    rows = [{"driver_id": d} for d in (5, 300, 999, 5)]
    got = store.get_online_features(features=refs, entity_rows=rows).to_dict()
    assert got["trips"] == [51, 3001, None, 51]
    assert got["city"] == ["c5-1", "c300-1", None, "c5-1"]
    assert got["conv_rate"][0] == pytest.approx(5 / 32 + 1)
    assert list(got["ratings"][1]) == [1.0, 150.0]

    # A newer materialization replaces the values: one live row per driver.
    t1 = t0 + timedelta(hours=2)
    pd.concat([first, frame(drivers, t1, 2)]).to_parquet(repo / "data" / "stats.parquet")
    store.materialize(t1 - timedelta(minutes=30), t1 + timedelta(hours=1))
    got = store.get_online_features(features=refs, entity_rows=rows[:2]).to_dict()
    assert got["trips"] == [52, 3002]

    if backend.name == "sqlite":
        # The default config put the catalog and warehouse under the repo's data directory.
        assert (repo / "data" / "iceberg_catalog.db").is_file()
        assert (repo / "data" / "iceberg_warehouse").is_dir()
    namespace = store.config.online_store.namespace
    table = pyiceberg_catalog(store.config).load_table(f"{namespace}.e2e_driver_stats_online")
    assert table.scan().to_arrow().num_rows == len(drivers)


def test_quickstart_runs_as_the_readme_says() -> None:
    result = subprocess.run(
        [sys.executable, "run.py"],
        cwd=ROOT / "examples" / "quickstart",
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "OK: every value read back is the newest one written" in result.stdout
    assert "5 live rows for 5 drivers" in result.stdout
