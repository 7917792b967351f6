"""`enforce_ttl`: rows older than `now - feature_view.ttl` are not served, cut in Rust.

Feast's historical retrieval keeps a row while `event_ts >= entity_ts - ttl`, and a ttl of 0
(or none) means the features never expire; the online cut follows the same rule with `now` as
the entity timestamp.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta, timezone

import pandas as pd
import pytest
from conftest import Env, driver, driver_key, driver_row, driver_view, expected_values, plain
from feast import FeatureStore
from feast_iceberg.online_store import _to_micros, table_name

HOUR = timedelta(hours=1)


def now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def values(result: list[tuple]) -> list[dict | None]:
    return [None if f is None else {k: plain(v) for k, v in f.items()} for _, f in result]


def write_ages(env: Env, ttl: timedelta | None, ages: dict[int, timedelta]) -> object:
    """A view with `ttl`, and one row per driver written `ages[driver]` ago (version = driver)."""
    view = driver_view()
    view.ttl = ttl
    env.apply(view)
    env.write(view, [driver_row(i, i, now() - age) for i, age in ages.items()])
    return view


def test_expired_and_fresh_rows_stay_aligned_with_the_request(
    make_env: Callable[..., Env],
) -> None:
    env = make_env(enforce_ttl=True)
    view = write_ages(env, HOUR, {1: 2 * HOUR, 2: timedelta(minutes=10), 4: 30 * HOUR})
    keys = [driver_key(i) for i in (1, 2, 3, 4, 2, 1)]
    result = env.read(view, keys)
    assert values(result) == [
        None,
        expected_values(2, 2),
        None,  # never written
        None,
        expected_values(2, 2),
        None,
    ]
    assert [ts is None for ts, _ in result] == [True, False, True, True, False, True]
    # Requested features and the cut combine.
    assert values(env.read(view, keys[:2], ["trips"])) == [None, {"trips": 2002}]


@pytest.mark.parametrize("ttl", [None, timedelta(0)])
def test_no_ttl_or_zero_ttl_never_expires(make_env: Callable[..., Env], ttl: timedelta) -> None:
    env = make_env(enforce_ttl=True)
    view = write_ages(env, ttl, {1: 3650 * 24 * HOUR, 2: timedelta(seconds=1)})
    assert values(env.read(view, [driver_key(1), driver_key(2)])) == [
        expected_values(1, 1),
        expected_values(2, 2),
    ]


def test_option_off_serves_expired_rows_as_before(make_env: Callable[..., Env]) -> None:
    env = make_env()
    assert env.config.online_store.enforce_ttl is False
    view = write_ages(env, HOUR, {1: 2 * HOUR, 2: timedelta(minutes=10)})
    assert values(env.read(view, [driver_key(1), driver_key(2)])) == [
        expected_values(1, 1),
        expected_values(2, 2),
    ]


def test_the_cut_keeps_a_row_exactly_at_not_before(env: Env) -> None:
    # Through the core directly, so the boundary does not depend on the clock.
    view = driver_view()
    env.apply(view)
    at = datetime(2026, 3, 1, 12, 0, 0)
    env.write(view, [driver_row(1, 1, at), driver_row(2, 2, at - timedelta(microseconds=1))])
    store = env.store._store(env.config)
    keys = [driver_key(i).SerializeToString() for i in (1, 2)]
    cut = _to_micros(at)
    _, timestamps, rows = store.read(table_name(env.config, view), keys, None, cut)
    assert timestamps == [cut, None]
    assert rows[0] is not None and rows[1] is None
    _, timestamps, _ = store.read(table_name(env.config, view), keys, None, None)
    assert timestamps == [cut, cut - 1]


def test_a_newer_write_revives_an_expired_key(make_env: Callable[..., Env]) -> None:
    env = make_env(enforce_ttl=True)
    view = write_ages(env, HOUR, {1: 2 * HOUR})
    assert values(env.read(view, [driver_key(1)])) == [None]
    env.write(view, [driver_row(1, 7, now())])
    assert values(env.read(view, [driver_key(1)])) == [expected_values(1, 7)]


@pytest.mark.parametrize("enforce", [True, False])
def test_get_online_features_end_to_end(make_env: Callable[..., Env], enforce: bool) -> None:
    env = make_env(enforce_ttl=enforce)
    store = FeatureStore(config=env.config)
    view = driver_view()
    view.ttl = HOUR
    store.apply([driver, view])
    t = now()
    df = pd.DataFrame(
        {
            "driver_id": [1, 2],
            "ts": [t - 2 * HOUR, t - timedelta(minutes=5)],
            "conv_rate": [0.5, 0.25],
            "acc_rate": [1.5, 2.5],
            "trips": [10, 20],
            "city": ["a", "b"],
        }
    )
    df["conv_rate"] = df["conv_rate"].astype("float32")
    store.write_to_online_store(view.name, df)

    response = store.get_online_features(
        features=[f"{view.name}:trips", f"{view.name}:city"],
        entity_rows=[{"driver_id": d} for d in (1, 2, 3)],
    )
    got = response.to_dict()
    if enforce:
        assert got["trips"] == [None, 20, None]
        assert got["city"] == [None, "b", None]
    else:
        assert got["trips"] == [10, 20, None]
    # Feast reports an expired row like a missing one.
    statuses = [r.statuses for r in response.proto.results]
    trips_status = statuses[list(response.proto.metadata.feature_names.val).index("trips")]
    expected_first = "NOT_FOUND" if enforce else "PRESENT"
    assert trips_status[0] == _field_status(expected_first)


def _field_status(name: str) -> int:
    from feast.protos.feast.serving.ServingService_pb2 import FieldStatus

    return FieldStatus.Value(name)
