"""`get_online_features` over several feature views in one Rust call (`read_views`), against
Feast's own per-view path (one `online_read` per view, the response built in Python) on the
same repo: every response must be the same proto, values, statuses and event timestamps.

Shapes: views keyed on different entities and on a compound key, missing and repeated keys,
null values and lists, full_feature_names, TTL-expired rows (enforce_ttl), a join key listed
as a Field and requested as a feature, on-demand views (request data; written online),
feature services, versioned `view@vN` reads, version metadata, the async path, and the
shapes that fall back to Feast's path.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
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
    RequestSource,
    StreamFeatureView,
)
from feast.on_demand_feature_view import on_demand_feature_view
from feast.types import Array, Float32, Float64, Int64, String
from feast.value_type import ValueType
from feast_iceberg import IcebergOnlineStore

NOW = datetime.now(timezone.utc).replace(microsecond=123456)
T0 = NOW - timedelta(days=2)
LONG = timedelta(days=3650)


def feature_store(repo: Path, versioning: bool = False, **online: Any) -> FeatureStore:
    (repo / "data").mkdir(parents=True, exist_ok=True)
    return FeatureStore(
        config=RepoConfig(
            project="views",
            registry={
                "path": str(repo / "data" / "registry.db"),
                "enable_online_feature_view_versioning": versioning,
            },
            provider="local",
            online_store={
                "type": "feast_iceberg.IcebergOnlineStore",
                "uri": f"sqlite:///{repo / 'data' / 'catalog.db'}",
                "warehouse": str(repo / "data" / "warehouse"),
                **online,
            },
            offline_store={"type": "file"},
            entity_key_serialization_version=3,
            repo_path=repo,
        )
    )


def source(tmp_path: Path) -> FileSource:
    """Drivers 1-3 x customers a/b; driver 3's rating and tags are null."""
    rows = [(d, c) for d in (1, 2, 3) for c in ("a", "b")]
    df = pd.DataFrame(
        {
            "driver_id": [d for d, _ in rows],
            "customer_id": [c for _, c in rows],
            "trips": [d * 10 for d, _ in rows],
            "rating": [None if d == 3 else d + 0.5 for d, _ in rows],
            "tags": [None if d == 3 else [f"t{d}", c] for d, c in rows],
            "conv": pd.array([d / 4 for d, _ in rows], dtype="float32"),
            "name": [f"driver-{d}" for d, _ in rows],
            "spend": [{"a": 1.25, "b": 2.5}[c] for _, c in rows],
            "affinity": [d * {"a": 1.0, "b": 2.0}[c] for d, c in rows],
            "score": [d * 100 for d, _ in rows],
            # Microseconds, and one row per key per view newest: the timestamps differ per row.
            "event_timestamp": [T0 + timedelta(seconds=i, microseconds=7 * i) for i in range(6)],
        }
    )
    path = tmp_path / "source.parquet"
    df.to_parquet(path)
    return FileSource(name="src", path=str(path), timestamp_field="event_timestamp")


driver = Entity(name="driver", join_keys=["driver_id"], value_type=ValueType.INT64)
customer = Entity(name="customer", join_keys=["customer_id"], value_type=ValueType.STRING)


def views(src: FileSource) -> dict[str, Any]:
    d_stats = FeatureView(
        name="d_stats",
        entities=[driver],
        schema=[
            Field(name="trips", dtype=Int64),
            Field(name="rating", dtype=Float64),
            Field(name="tags", dtype=Array(String)),
        ],
        source=src,
        ttl=LONG,
    )
    # The join key listed as a Field, as in Feast's own examples.
    d_more = FeatureView(
        name="d_more",
        entities=[driver],
        schema=[
            Field(name="driver_id", dtype=Int64),
            Field(name="conv", dtype=Float32),
            Field(name="name", dtype=String),
        ],
        source=src,
        ttl=LONG,
    )
    # A stream view whose schema names the join key: Feast lists it among the features too.
    d_push = StreamFeatureView(
        name="d_push",
        entities=[driver],
        schema=[Field(name="driver_id", dtype=Int64), Field(name="conv", dtype=Float32)],
        source=PushSource(name="d_push_source", batch_source=src),
        ttl=LONG,
    )
    c_stats = FeatureView(
        name="c_stats",
        entities=[customer],
        schema=[Field(name="spend", dtype=Float64)],
        source=src,
        ttl=LONG,
    )
    pair = FeatureView(
        name="pair",
        entities=[driver, customer],
        schema=[Field(name="affinity", dtype=Float64)],
        source=src,
        ttl=LONG,
    )
    # Rows two days old: expired under enforce_ttl.
    d_short = FeatureView(
        name="d_short",
        entities=[driver],
        schema=[Field(name="score", dtype=Int64)],
        source=src,
        ttl=timedelta(days=1),
    )

    @on_demand_feature_view(
        sources=[d_stats, c_stats],
        schema=[Field(name="trips_spend", dtype=Float64)],
    )
    def trips_spend(df: pd.DataFrame) -> pd.DataFrame:
        return pd.DataFrame({"trips_spend": df["trips"] * df["spend"]})

    bonus = RequestSource(name="bonus", schema=[Field(name="bonus", dtype=Float64)])

    @on_demand_feature_view(
        sources=[d_stats, bonus],
        schema=[Field(name="trips_bonus", dtype=Float64)],
    )
    def trips_bonus(df: pd.DataFrame) -> pd.DataFrame:
        return pd.DataFrame({"trips_bonus": df["trips"] + df["bonus"]})

    @on_demand_feature_view(
        entities=[driver, customer],
        sources=[pair],
        schema=[Field(name="affinity_x2", dtype=Float64)],
        write_to_online_store=True,
    )
    def affinity_x2(df: pd.DataFrame) -> pd.DataFrame:
        df["affinity_x2"] = df["affinity"] * 2
        return df

    return {
        "d_stats": d_stats,
        "d_more": d_more,
        "d_push": d_push,
        "c_stats": c_stats,
        "pair": pair,
        "d_short": d_short,
        "trips_spend": trips_spend,
        "trips_bonus": trips_bonus,
        "affinity_x2": affinity_x2,
    }


def build(tmp_path: Path, **online: Any) -> tuple[FeatureStore, dict[str, Any]]:
    vs = views(source(tmp_path))
    fs = feature_store(tmp_path / "repo", **online)
    fs.apply([driver, customer, *vs.values()])
    fs.materialize(T0 - timedelta(hours=1), NOW)
    odfv = vs["affinity_x2"]
    written = pd.DataFrame(
        {
            "driver_id": [1, 2],
            "customer_id": ["a", "b"],
            "affinity": [1.0, 4.0],
            "event_timestamp": [T0, T0],
        }
    )
    fs.write_to_online_store(
        "affinity_x2", df=fs._transform_on_demand_feature_view_df(odfv, written)
    )
    return fs, vs


@pytest.fixture
def repo(tmp_path: Path) -> tuple[FeatureStore, dict[str, Any]]:
    return build(tmp_path)


class Spy:
    """Counts the requests the multi-view read served and those it left to Feast."""

    def __init__(self) -> None:
        self.fast = 0
        self.fallback = 0


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> Iterator[Spy]:
    spy = Spy()
    original = IcebergOnlineStore.read_views

    def counting(self: IcebergOnlineStore, request: Any) -> bool:
        served = original(self, request)
        if served:
            spy.fast += 1
        else:
            spy.fallback += 1
        return served

    monkeypatch.setattr(IcebergOnlineStore, "read_views", counting)
    yield spy


def assert_same(fs: FeatureStore, monkeypatch: pytest.MonkeyPatch, **request: Any) -> Any:
    ours = fs.get_online_features(**request)
    with monkeypatch.context() as m:
        m.setattr(IcebergOnlineStore, "read_views", lambda self, request: False)
        feasts = fs.get_online_features(**request)
    assert ours.proto == feasts.proto
    assert ours.to_dict() == feasts.to_dict()
    return ours


DRIVER_FEATURES = [
    "d_stats:trips",
    "d_stats:rating",
    "d_stats:tags",
    "d_more:conv",
    "d_more:name",
    "d_short:score",
]
ALL_FEATURES = [*DRIVER_FEATURES, "c_stats:spend", "pair:affinity"]
ROWS = [
    {"driver_id": 2, "customer_id": "b"},
    {"driver_id": 9, "customer_id": "a"},  # no such driver
    {"driver_id": 3, "customer_id": "z"},  # null rating and tags; no such customer
    {"driver_id": 2, "customer_id": "b"},  # a repeated row
    {"driver_id": 1, "customer_id": "a"},
]


@pytest.mark.parametrize("full_feature_names", [False, True])
def test_many_views_match_feasts_path(
    repo: Any, spy: Spy, monkeypatch: pytest.MonkeyPatch, full_feature_names: bool
) -> None:
    fs, _ = repo
    features = ALL_FEATURES if full_feature_names else [*DRIVER_FEATURES, "pair:affinity"]
    got = assert_same(
        fs, monkeypatch, features=features, entity_rows=ROWS, full_feature_names=full_feature_names
    ).to_dict()
    assert spy.fast == 1 and spy.fallback == 0
    trips = got["d_stats__trips" if full_feature_names else "trips"]
    assert trips == [20, None, 30, 20, 10]
    rating = got["d_stats__rating" if full_feature_names else "rating"]
    assert rating == [2.5, None, None, 2.5, 1.5]
    affinity = got["pair__affinity" if full_feature_names else "affinity"]
    assert affinity == [4.0, None, None, 4.0, 1.0]
    # Statuses and event timestamps, to the microsecond, as Feast's path makes them.
    response = fs.get_online_features(features=["d_stats:trips"], entity_rows=ROWS).proto
    vector = response.results[-1]
    assert list(vector.statuses) == [1, 3, 1, 1, 1]
    assert vector.event_timestamps[1].seconds == 0
    assert vector.event_timestamps[0].ToDatetime(timezone.utc) == T0 + timedelta(
        seconds=3, microseconds=21
    )


def test_expired_rows_are_not_found_with_enforce_ttl(
    tmp_path: Path, spy: Spy, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs, _ = build(tmp_path, enforce_ttl=True)
    got = assert_same(fs, monkeypatch, features=DRIVER_FEATURES, entity_rows=ROWS).to_dict()
    assert spy.fast == 1
    assert got["score"] == [None] * len(ROWS)
    assert got["trips"] == [20, None, 30, 20, 10]


def test_join_key_requested_as_a_feature(
    repo: Any, spy: Spy, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs, _ = repo
    got = assert_same(
        fs,
        monkeypatch,
        features=["d_push:driver_id", "d_push:conv", "d_more:name", "d_stats:trips"],
        entity_rows=ROWS,
        full_feature_names=True,
    ).to_dict()
    assert spy.fast == 1
    # Answered from the key where the row exists, None (NOT_FOUND) where it does not.
    assert got["d_push__driver_id"] == [2, None, 3, 2, 1]


def test_on_demand_views_with_request_data_and_written_online(
    repo: Any, spy: Spy, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs, _ = repo
    rows = [dict(r, bonus=0.5) for r in ROWS]
    got = assert_same(
        fs,
        monkeypatch,
        features=[
            "trips_spend:trips_spend",
            "trips_bonus:trips_bonus",
            "affinity_x2:affinity_x2",
            "d_more:name",
        ],
        entity_rows=rows,
    ).to_dict()
    assert spy.fast == 1
    assert got["trips_bonus"][0] == 20.5
    assert got["trips_spend"][0] == 50.0
    assert got["affinity_x2"] == [8.0, None, None, 8.0, 2.0]


def test_feature_service_and_version_metadata(
    repo: Any, spy: Spy, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs, vs = repo
    service = FeatureService(
        name="five",
        features=[vs["d_stats"], vs["d_more"], vs["c_stats"], vs["pair"], vs["d_short"]],
    )
    fs.apply([service])
    for include in (False, True):
        ours = assert_same(
            fs,
            monkeypatch,
            features=fs.get_feature_service("five"),
            entity_rows=ROWS,
            include_feature_view_version_metadata=include,
        )
        assert len(ours.proto.metadata.feature_view_metadata) == (5 if include else 0)
    assert spy.fast == 2


def test_projection_with_join_key_map(repo: Any, spy: Spy, monkeypatch: pytest.MonkeyPatch) -> None:
    fs, vs = repo
    # The service reads d_stats keyed by another column of the request: `other_driver`.
    aliased = vs["d_stats"].with_name("other").with_join_key_map({"driver_id": "other_driver"})
    service = FeatureService(name="aliased", features=[aliased, vs["d_more"]])
    fs.apply([service])
    rows = [dict(r, other_driver=d) for r, d in zip(ROWS, (1, 2, 9, 3, 2), strict=True)]
    got = assert_same(
        fs,
        monkeypatch,
        features=fs.get_feature_service("aliased"),
        entity_rows=rows,
        full_feature_names=True,
    ).to_dict()
    assert spy.fast == 1
    assert got["other__trips"] == [10, 20, None, 30, 20]
    assert got["d_more__name"][0] == "driver-2"


def test_async_path_matches_feasts_path(
    repo: Any, spy: Spy, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs, _ = repo
    request = {"features": ALL_FEATURES, "entity_rows": ROWS, "full_feature_names": True}
    ours = asyncio.run(fs.get_online_features_async(**request))
    assert spy.fast == 1
    with monkeypatch.context() as m:
        m.setattr(IcebergOnlineStore, "read_views", lambda self, request: False)
        feasts = asyncio.run(fs.get_online_features_async(**request))
    assert ours.proto == feasts.proto
    assert ours.proto == fs.get_online_features(**request).proto


def test_versioned_views_in_one_request(
    tmp_path: Path, spy: Spy, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = source(tmp_path)

    def view(*fields: Field) -> FeatureView:
        return FeatureView(
            name="d_stats", entities=[driver], schema=list(fields), source=src, ttl=LONG
        )

    fs = feature_store(tmp_path / "repo", versioning=True)
    fs.apply([driver, view(Field(name="trips", dtype=Int64))])
    fs.materialize(T0 - timedelta(hours=1), NOW)
    fs.apply([view(Field(name="trips", dtype=Int64), Field(name="rating", dtype=Float64))])
    fs.materialize(T0 - timedelta(hours=1), NOW)
    got = assert_same(
        fs,
        monkeypatch,
        features=["d_stats@v0:trips", "d_stats@v1:rating", "d_stats:trips"],
        entity_rows=[{"driver_id": 2}, {"driver_id": 5}],
        full_feature_names=True,
        include_feature_view_version_metadata=True,
    ).to_dict()
    assert spy.fast == 1
    assert got["d_stats@v1__rating"] == [2.5, None]
    assert got["d_stats@v0__trips"] == [20, None]


def test_shapes_left_to_feasts_path(
    repo: Any, spy: Spy, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fs, _ = repo
    # pair needs customer_id, which the request lacks: Feast's path decides what that means.
    with caplog.at_level(logging.DEBUG, logger="feast_iceberg.online_store"):
        assert_same(
            fs,
            monkeypatch,
            features=["d_stats:trips", "pair:affinity"],
            entity_rows=[{"driver_id": 1}, {"driver_id": 2}],
        )
    assert spy.fallback == 1 and spy.fast == 0
    assert "the request lacks some of its join keys" in caplog.text
