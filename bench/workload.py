"""The benchmark's data: one feature view, N int64 entities x 10 features, one frame per round.

Every frame is a pure function of (entities, round, base time), so the workers of both stores
see exactly the same keys and values without sharing files.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from feast import Entity, FeatureView, Field, FileSource
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from feast.types import Float32, Float64, Int64, String
from feast.value_type import ValueType

PROJECT = "bench"
FEATURE_VIEW = "bench_fv"
JOIN_KEY = "driver_id"
FIRST_ID = 1_000_000
ROUND_SPAN = timedelta(hours=1)

# name -> (Feast type, ValueProto field); 3 float64, 3 int64, 2 float32, 2 string
FEATURES = {
    "f64_0": (Float64, "double_val"),
    "f64_1": (Float64, "double_val"),
    "f64_2": (Float64, "double_val"),
    "i64_0": (Int64, "int64_val"),
    "i64_1": (Int64, "int64_val"),
    "i64_2": (Int64, "int64_val"),
    "f32_0": (Float32, "float_val"),
    "f32_1": (Float32, "float_val"),
    "str_0": (String, "string_val"),
    "str_1": (String, "string_val"),
}
FEATURE_NAMES = list(FEATURES)


def base_time() -> datetime:
    """Start of round 0: recent enough for the feature view's TTL, whole hour for readability."""
    now = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)
    return now - timedelta(days=1)


def entity_ids(n: int) -> np.ndarray:
    return np.arange(FIRST_ID, FIRST_ID + n, dtype=np.int64)


def frame(n: int, round_: int, base: datetime) -> pd.DataFrame:
    """Round `round_` of the data: every entity once, event times inside the round's hour."""
    rng = np.random.default_rng(1000 + round_)
    offsets = pd.to_timedelta(np.arange(n) % 1800, unit="s")
    event_ts = pd.Timestamp(base + round_ * ROUND_SPAN) + offsets
    columns: dict[str, object] = {
        JOIN_KEY: entity_ids(n),
        "event_timestamp": event_ts,
        "created": event_ts,
    }
    for name, (dtype, _) in FEATURES.items():
        if dtype == Float64:
            columns[name] = rng.random(n)
        elif dtype == Int64:
            columns[name] = rng.integers(0, 1 << 40, n, dtype=np.int64)
        elif dtype == Float32:
            columns[name] = rng.random(n, dtype=np.float32)
        else:
            columns[name] = [f"value-{v}" for v in rng.integers(0, 10**9, n)]
    return pd.DataFrame(columns)


def window(round_: int, base: datetime) -> tuple[datetime, datetime]:
    """The materialization interval that holds exactly round `round_`."""
    start = base + round_ * ROUND_SPAN
    return start, start + ROUND_SPAN - timedelta(seconds=1)


def feast_objects(source_path: Path) -> tuple[Entity, FeatureView]:
    driver = Entity(name="driver", join_keys=[JOIN_KEY], value_type=ValueType.INT64)
    source = FileSource(
        name="bench_source",
        path=str(source_path),
        timestamp_field="event_timestamp",
        created_timestamp_column="created",
    )
    view = FeatureView(
        name=FEATURE_VIEW,
        entities=[driver],
        ttl=timedelta(days=7),
        schema=[Field(name=JOIN_KEY, dtype=Int64)]
        + [Field(name=name, dtype=dtype) for name, (dtype, _) in FEATURES.items()],
        source=source,
        online=True,
    )
    return driver, view


def entity_key(entity_id: int) -> EntityKeyProto:
    return EntityKeyProto(join_keys=[JOIN_KEY], entity_values=[ValueProto(int64_val=entity_id)])


def write_rows(
    df: pd.DataFrame,
) -> list[tuple[EntityKeyProto, dict[str, ValueProto], datetime, datetime | None]]:
    """The rows Feast hands `online_write_batch`: protos, naive UTC timestamps."""
    columns = {name: df[name].tolist() for name in FEATURE_NAMES}
    fields = [(name, FEATURES[name][1], columns[name]) for name in FEATURE_NAMES]
    event_ts = df["event_timestamp"].dt.tz_convert(None).dt.to_pydatetime().tolist()
    created = df["created"].dt.tz_convert(None).dt.to_pydatetime().tolist()
    rows = []
    for i, entity_id in enumerate(df[JOIN_KEY].tolist()):
        values = {name: ValueProto(**{field: col[i]}) for name, field, col in fields}
        rows.append((entity_key(entity_id), values, event_ts[i], created[i]))
    return rows


def expected_values(df: pd.DataFrame, entity_id: int) -> dict[str, object]:
    """A row's values as Python numbers/strings, float32 kept at float32 precision."""
    index = entity_id - FIRST_ID
    values = {name: df[name].iat[index] for name in FEATURES}
    return {name: v.item() if isinstance(v, np.generic) else v for name, v in values.items()}


def matches(expected: dict[str, object], got: dict[str, object]) -> bool:
    for name, want in expected.items():
        have = got.get(name)
        if FEATURES[name][0] == Float32:
            if have is None or np.float32(have) != np.float32(want):
                return False
        elif have != want:
            return False
    return True
