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

import numpy as np
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
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
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
            "zone_id": pd.array([d % 2 for d, _ in rows], dtype="int32"),
            # Microseconds, and one row per key per view newest: the timestamps differ per row.
            "event_timestamp": [T0 + timedelta(seconds=i, microseconds=7 * i) for i in range(6)],
        }
    )
    path = tmp_path / "source.parquet"
    df.to_parquet(path)
    return FileSource(name="src", path=str(path), timestamp_field="event_timestamp")


driver = Entity(name="driver", join_keys=["driver_id"], value_type=ValueType.INT64)
customer = Entity(name="customer", join_keys=["customer_id"], value_type=ValueType.STRING)
zone = Entity(name="zone", join_keys=["zone_id"], value_type=ValueType.INT32)


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

    # Keyed on an Int32 entity.
    z_stats = FeatureView(
        name="z_stats",
        entities=[zone],
        schema=[Field(name="score", dtype=Int64)],
        source=src,
        ttl=LONG,
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
        "z_stats": z_stats,
        "trips_spend": trips_spend,
        "trips_bonus": trips_bonus,
        "affinity_x2": affinity_x2,
    }


def build(tmp_path: Path, **online: Any) -> tuple[FeatureStore, dict[str, Any]]:
    vs = views(source(tmp_path))
    fs = feature_store(tmp_path / "repo", **online)
    fs.apply([driver, customer, zone, *vs.values()])
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
    """Counts the requests answered whole (`read_request`), those whose views the multi-view
    read served after Feast's preparation (`read_views`), and those left to Feast's per-view
    path."""

    def __init__(self) -> None:
        self.whole = 0
        self.views = 0
        self.fallback = 0


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> Iterator[Spy]:
    spy = Spy()
    read_request, read_views = IcebergOnlineStore.read_request, IcebergOnlineStore.read_views

    def whole(self: IcebergOnlineStore, request: Any) -> Any:
        response = read_request(self, request)
        spy.whole += response is not None
        return response

    def views(self: IcebergOnlineStore, request: Any) -> bool:
        served = read_views(self, request)
        spy.views += served
        spy.fallback += not served
        return served

    monkeypatch.setattr(IcebergOnlineStore, "read_request", whole)
    monkeypatch.setattr(IcebergOnlineStore, "read_views", views)
    yield spy


def feasts_path(m: pytest.MonkeyPatch) -> None:
    """Within `m`, Feast prepares every request and reads its views one `online_read` after
    another."""
    m.setattr(IcebergOnlineStore, "read_request", lambda self, request: None)
    m.setattr(IcebergOnlineStore, "read_views", lambda self, request: False)


def assert_same(fs: FeatureStore, monkeypatch: pytest.MonkeyPatch, **request: Any) -> Any:
    ours = fs.get_online_features(**request)
    with monkeypatch.context() as m:
        feasts_path(m)
        feasts = fs.get_online_features(**request)
    assert ours.proto == feasts.proto
    assert ours.proto.SerializeToString() == feasts.proto.SerializeToString()
    assert ours.to_dict() == feasts.to_dict()
    assert ours._feature_types == feasts._feature_types
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
    assert spy.whole == 1 and spy.views == 0 and spy.fallback == 0
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
    assert spy.whole == 1
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
    assert spy.whole == 1
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
    # Feast prepares requests with on-demand views; their views are read in one call.
    assert spy.whole == 0 and spy.views == 1
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
    assert spy.whole == 2


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
    assert spy.whole == 1
    assert got["other__trips"] == [10, 20, None, 30, 20]
    assert got["d_more__name"][0] == "driver-2"


def test_async_path_matches_feasts_path(
    repo: Any, spy: Spy, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs, _ = repo
    request = {"features": ALL_FEATURES, "entity_rows": ROWS, "full_feature_names": True}
    ours = asyncio.run(fs.get_online_features_async(**request))
    assert spy.whole == 1
    with monkeypatch.context() as m:
        feasts_path(m)
        feasts = asyncio.run(fs.get_online_features_async(**request))
    assert ours.proto == feasts.proto
    assert ours.proto == fs.get_online_features(**request).proto
    # With on-demand views Feast prepares the request, and the views are read in one call.
    request["features"] = ["trips_spend:trips_spend", "d_more:name"]
    ours = asyncio.run(fs.get_online_features_async(**request))
    assert spy.views == 1
    with monkeypatch.context() as m:
        feasts_path(m)
        assert ours.proto == asyncio.run(fs.get_online_features_async(**request)).proto


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
    assert spy.whole == 1
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
    assert spy.fallback == 1 and spy.whole == 0 and spy.views == 0
    assert "the request lacks some of its join keys" in caplog.text


def test_entity_rows_as_columns_protos_and_numpy(
    repo: Any, spy: Spy, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs, _ = repo
    features = ["d_stats:trips", "c_stats:spend", "pair:affinity", "d_more:name"]
    drivers, customers = [2, 9, 3, 2, 1], ["b", "a", "z", "b", "a"]
    for entity_rows in (
        {"driver_id": drivers, "customer_id": customers},
        {"customer_id": tuple(customers), "driver_id": tuple(drivers)},
        # Values Feast converts itself: protos, numpy ints.
        {"driver_id": [ValueProto(int64_val=d) for d in drivers], "customer_id": customers},
        {"driver_id": list(np.array(drivers, dtype=np.int64)), "customer_id": customers},
    ):
        got = assert_same(
            fs, monkeypatch, features=features, entity_rows=entity_rows, full_feature_names=True
        ).to_dict()
        assert got["d_stats__trips"] == [20, None, 30, 20, 10]
        assert got["c_stats__spend"] == [2.5, 1.25, None, 2.5, 1.25]
    assert spy.whole == 4 and spy.views == 0


def test_join_key_types_and_bounds(repo: Any, spy: Spy, monkeypatch: pytest.MonkeyPatch) -> None:
    fs, _ = repo
    features = ["z_stats:score", "c_stats:spend", "d_stats:trips"]
    rows = [
        {"zone_id": z, "customer_id": c, "driver_id": d}
        for z, c, d in [
            (1, "a", 1),
            (0, "", 2**63 - 1),
            (-1, "é", -(2**63)),
            (2**31 - 1, "b", 0),
            (-(2**31), "b", 3),
        ]
    ]
    got = assert_same(
        fs, monkeypatch, features=features, entity_rows=rows, full_feature_names=True
    ).to_dict()
    assert spy.whole == 1
    assert got["z_stats__score"] == [300, 200, None, None, None]
    assert got["zone_id"] == [1, 0, -1, 2**31 - 1, -(2**31)]
    # Out of an Int32 key's range: Feast's conversion decides, on both paths.
    too_big = [{"zone_id": 2**31, "customer_id": "a", "driver_id": 1}]
    with pytest.raises(ValueError) as ours:
        fs.get_online_features(features=features, entity_rows=too_big)
    with monkeypatch.context() as m, pytest.raises(ValueError) as feasts:
        feasts_path(m)
        fs.get_online_features(features=features, entity_rows=too_big)
    assert str(ours.value) == str(feasts.value)


def test_join_key_columns_no_view_is_keyed_on(
    repo: Any, spy: Spy, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs, _ = repo
    # customer_id is a join key (of another view): Feast puts it in the response as it came,
    # unset values included.
    rows = [dict(r, customer_id=c) for r, c in zip(ROWS, ["a", None, "b", None, "z"], strict=True)]
    got = assert_same(fs, monkeypatch, features=["d_stats:trips"], entity_rows=rows).to_dict()
    assert spy.whole == 1
    assert got["customer_id"] == ["a", None, "b", None, "z"]
    assert got["trips"] == [20, None, 30, 20, 10]


def test_requests_feast_prepares(
    repo: Any, spy: Spy, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fs, _ = repo
    with caplog.at_level(logging.DEBUG, logger="feast_iceberg.online_store"):
        # A key that is no join key: Feast leaves it out of its response.
        rows = [dict(r, unrelated=1.5) for r in ROWS]
        got = assert_same(fs, monkeypatch, features=["d_stats:trips"], entity_rows=rows)
        assert "unrelated" not in got.to_dict()
        # The entity's name instead of its join key (deprecated by Feast).
        with pytest.warns(UserWarning, match="deprecated"):
            assert_same(fs, monkeypatch, features=["d_stats:trips"], entity_rows=[{"driver": 2}])
        # Rows of different keys: Feast's error.
        with pytest.raises(ValueError, match="same"):
            fs.get_online_features(
                features=["d_stats:trips"], entity_rows=[{"driver_id": 1}, {"customer_id": "a"}]
            )
    assert spy.whole == 0 and spy.views == 2
    assert "an entity-row key that is not a join key" in caplog.text
    assert "entity rows of another shape" in caplog.text


def error_of(call: Any) -> BaseException:
    with pytest.raises(Exception) as raised:
        call()
    return raised.value


def test_an_unset_key_value_is_left_to_feast(
    repo: Any, spy: Spy, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs, _ = repo
    request = {
        "features": ["d_stats:trips"],
        "entity_rows": [{"driver_id": 1}, {"driver_id": None}],
    }
    ours = error_of(lambda: fs.get_online_features(**request))
    with monkeypatch.context() as m:
        feasts_path(m)
        feasts = error_of(lambda: fs.get_online_features(**request))
    assert type(ours) is type(feasts) and str(ours) == str(feasts)
    assert spy.whole == 0 and spy.views == 0 and spy.fallback == 1


def test_plans_follow_the_registry(repo: Any, spy: Spy, monkeypatch: pytest.MonkeyPatch) -> None:
    fs, vs = repo
    request = {"features": ["d_stats:trips", "d_stats:rating"], "entity_rows": ROWS}
    assert_same(fs, monkeypatch, **request)
    # The view's table gains a feature and the registry changes under the cached plan.
    grown = FeatureView(
        name="d_stats",
        entities=[driver],
        schema=[*vs["d_stats"].schema, Field(name="score", dtype=Int64)],
        source=vs["d_stats"].batch_source,
        ttl=LONG,
    )
    fs.apply([grown])
    fs.materialize(T0 - timedelta(hours=1), NOW)
    got = assert_same(
        fs, monkeypatch, features=["d_stats:trips", "d_stats:score"], **{"entity_rows": ROWS}
    ).to_dict()
    assert got["score"] == [200, None, 300, 200, 100]
    assert_same(fs, monkeypatch, **request)
    assert spy.whole == 3
