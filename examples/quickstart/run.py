"""feast-iceberg quickstart: apply, materialize, read; then newer values replace the old ones.

Run from anywhere: `python3 run.py` (or `make quickstart` at the project root). Everything it
creates lives in ./data, which is wiped at the start, so the script can be re-run.
Exits non-zero if Feast returns anything other than what was written.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent
DATA = REPO / "data"
SOURCE = DATA / "driver_stats.parquet"
FEATURE_VIEW = "driver_hourly_stats"
FEATURES = ["conv_rate", "trips_today", "city", "recent_ratings"]
DRIVERS = [1001, 1002, 1003, 1004, 1005]
CITIES = ["Amsterdam", "Berlin", "Lisbon", "Oslo", "Prague", "Vienna"]


def feature_rows(hours: list[datetime]) -> pd.DataFrame:
    """One row per driver and hour; values are exact in float32 so they compare exactly."""
    rows = []
    for h, ts in enumerate(hours):
        hour_of_day = ts.hour
        for d, driver in enumerate(DRIVERS):
            rows.append(
                {
                    "driver_id": driver,
                    "event_timestamp": ts,
                    "created": ts + timedelta(minutes=5),
                    "conv_rate": (d * 8 + h) / 64,
                    "trips_today": 10 * hour_of_day + d,
                    "city": CITIES[(d + h) % len(CITIES)],
                    "recent_ratings": [4.0 + d / 4, 3.5 + h / 8],
                }
            )
    df = pd.DataFrame(rows)
    df["conv_rate"] = df["conv_rate"].astype(np.float32)
    return df


def feast(*args: str) -> None:
    """Run the `feast` CLI in the repo directory, like a user would."""
    print(f"$ feast {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, "-m", "feast.cli.cli", *args], cwd=REPO, check=True)


def newest_per_driver(df: pd.DataFrame) -> dict[int, dict[str, Any]]:
    newest = df.sort_values("event_timestamp").groupby("driver_id").tail(1)
    return {int(r.driver_id): {f: getattr(r, f) for f in FEATURES} for r in newest.itertuples()}


def read_online(drivers: list[int]) -> pd.DataFrame:
    from feast import FeatureStore

    store = FeatureStore(repo_path=str(REPO))
    response = store.get_online_features(
        features=[f"{FEATURE_VIEW}:{f}" for f in FEATURES],
        entity_rows=[{"driver_id": d} for d in drivers],
    )
    return response.to_df()[["driver_id", *FEATURES]]


def same(expected: Any, got: Any) -> bool:
    if isinstance(expected, (list, np.ndarray)):
        return got is not None and [float(x) for x in expected] == [float(x) for x in got]
    if isinstance(expected, (float, np.floating)):
        # Float32 features come back as Python floats of the float32 value.
        return got is not None and float(np.float32(expected)) == float(got)
    return expected == got


def check(step: str, online: pd.DataFrame, expected: dict[int, dict[str, Any]]) -> list[str]:
    errors = []
    for row in online.to_dict("records"):
        want = expected[int(row["driver_id"])]
        for feature in FEATURES:
            if not same(want[feature], row[feature]):
                errors.append(
                    f"{step}: driver {row['driver_id']} {feature}: "
                    f"expected {want[feature]!r}, got {row[feature]!r}"
                )
    return errors


def iceberg_row_count() -> int | None:
    """Live rows of the feature view's Iceberg table, read with PyIceberg (None if not installed).

    The catalog name, URI and warehouse must match the online_store block of feature_store.yaml.
    """
    try:
        from pyiceberg.catalog import load_catalog
    except ImportError:
        return None
    catalog = load_catalog(
        "feast_catalog",
        type="sql",
        uri=f"sqlite:///{DATA / 'iceberg_catalog.db'}",
        warehouse=f"file://{DATA / 'iceberg_warehouse'}",
    )
    table = catalog.load_table(f"feast_online.quickstart_{FEATURE_VIEW}_online")
    return table.scan(selected_fields=("entity_key",)).to_arrow().num_rows


def show(title: str, online: pd.DataFrame) -> None:
    print(f"\n{title}")
    with pd.option_context("display.width", 120, "display.max_columns", 10):
        print(online.to_string(index=False))
    print()


def main() -> int:
    shutil.rmtree(DATA, ignore_errors=True)
    DATA.mkdir()
    base = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0) - timedelta(
        hours=6
    )
    first_hours = [base + timedelta(hours=h) for h in range(4)]
    later_hours = [base + timedelta(hours=h) for h in range(4, 6)]

    # 1. Four hours of driver stats, registered and materialized with the feast CLI.
    first = feature_rows(first_hours)
    first.to_parquet(SOURCE, index=False)
    print(f"wrote {len(first)} rows for {len(DRIVERS)} drivers to {SOURCE.relative_to(REPO)}")
    feast("apply")
    start = first_hours[0] - timedelta(minutes=1)
    end = first_hours[-1] + timedelta(minutes=1)
    feast("materialize", start.isoformat(), end.isoformat())

    online = read_online(DRIVERS)
    show(
        f"online features after `feast materialize` (newest hour: {first_hours[-1]:%H:%M} UTC):",
        online,
    )
    errors = check("materialize", online, newest_per_driver(first))

    # 2. Two newer hours arrive in the source; an incremental materialization upserts them.
    everything = pd.concat([first, feature_rows(later_hours)], ignore_index=True)
    everything.to_parquet(SOURCE, index=False)
    print(f"appended {len(everything) - len(first)} newer rows to {SOURCE.relative_to(REPO)}")
    feast("materialize-incremental", (later_hours[-1] + timedelta(minutes=1)).isoformat())

    online = read_online(DRIVERS)
    show(
        f"after `feast materialize-incremental` (newest hour: {later_hours[-1]:%H:%M} UTC):", online
    )
    errors += check("materialize-incremental", online, newest_per_driver(everything))

    # 3. Upsert, not append: the table holds one live row per driver.
    rows = iceberg_row_count()
    if rows is None:
        print("pyiceberg is not installed: skipping the Iceberg row count")
    else:
        print(
            f"Iceberg table feast_online.quickstart_{FEATURE_VIEW}_online: {rows} live rows "
            f"for {len(DRIVERS)} drivers after 2 materializations of {len(everything)} source rows"
        )
        if rows != len(DRIVERS):
            errors.append(f"expected {len(DRIVERS)} live rows in the Iceberg table, found {rows}")

    if errors:
        print("\nFAILED:", *errors, sep="\n  ", file=sys.stderr)
        return 1
    print("OK: every value read back is the newest one written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
