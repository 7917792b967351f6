"""Other engines read our tables: after 10 writes of the same 10k keys, PyIceberg and DuckDB's
iceberg extension each see exactly 10k rows with the newest values, and storage stays bounded."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import duckdb
import pytest
from conftest import Env, driver_row, driver_view, expected_values

KEYS = 10_000
WRITES = 10


def duckdb_with_iceberg(extra: tuple[str, ...] = ()) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the iceberg extension (and `extra` ones, e.g. httpfs) loaded
    from their PyPI packages (no download)."""
    con = duckdb.connect()
    for name in ("avro", "iceberg", *extra):
        module = importlib.import_module(f"duckdb_extension_{name}")
        path = Path(module.__file__).parent / "extensions" / f"v{duckdb.__version__}"
        con.execute(f"LOAD '{path / f'{name}.duckdb_extension'}'")
    return con


def newest_check(rows: list[tuple[int, int, str]], version: int) -> None:
    assert len(rows) == KEYS
    assert len({r[0] for r in rows}) == KEYS
    for driver_id, trips, city in rows:
        want = expected_values(driver_id, version)
        assert (trips, city) == (want["trips"], want["city"]), driver_id


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from conftest import repo_config
    from feast_iceberg import IcebergOnlineStore

    repo = tmp_path_factory.mktemp("interop")
    (repo / "data").mkdir()
    env = Env(repo, repo_config(repo), IcebergOnlineStore())
    view = driver_view()
    env.apply(view)
    sizes = []
    file_counts = []
    for version in range(WRITES):
        env.write(view, [driver_row(i, version) for i in range(KEYS)])
        sizes.append(env.stats(view)["data_bytes"])
        file_counts.append(len(env.warehouse_files()))
    return {"env": env, "view": view, "sizes": sizes, "files": file_counts}


def test_pyiceberg_reads_one_row_per_key_with_the_newest_values(written: dict) -> None:
    env, view = written["env"], written["view"]
    table = env.pyiceberg_table(view)
    arrow = table.scan(selected_fields=("driver_id", "trips", "city")).to_arrow()
    rows = list(
        zip(*(arrow.column(c).to_pylist() for c in ("driver_id", "trips", "city")), strict=True)
    )
    newest_check(rows, WRITES - 1)
    # Point filter on the entity key prunes to one bucket file.
    one = table.scan(row_filter="driver_id = 4242").to_arrow()
    assert one.column("trips").to_pylist() == [expected_values(4242, WRITES - 1)["trips"]]


def test_duckdb_iceberg_extension_reads_one_row_per_key(written: dict) -> None:
    env, view = written["env"], written["view"]
    location = env.pyiceberg_table(view).metadata_location
    con = duckdb_with_iceberg()
    rows = con.execute(
        f"SELECT driver_id, trips, city FROM iceberg_scan('{location}') ORDER BY driver_id"
    ).fetchall()
    newest_check(rows, WRITES - 1)


def test_live_bytes_stay_near_one_copy_and_files_are_bounded(written: dict) -> None:
    sizes, files = written["sizes"], written["files"]
    assert sizes[-1] <= 1.2 * sizes[0], sizes
    # Expiry deletes what old snapshots referenced; only the metadata.json log grows, up to
    # metadata_previous_versions_max (5), then the file count is flat.
    assert files[-1] <= files[0] + 5, files
    assert len(set(files[6:])) == 1, files
    env, view = written["env"], written["view"]
    on_disk = sum(p.stat().st_size for p in env.warehouse_files())
    assert on_disk <= 1.5 * sizes[0] + 512 * 1024, (on_disk, sizes[0])
    stats = env.stats(view)
    assert stats["records"] == KEYS
    assert stats["snapshots"] <= 2


def test_history_is_one_snapshot_per_write(written: dict) -> None:
    env, view = written["env"], written["view"]
    table = env.pyiceberg_table(view)
    current = table.current_snapshot()
    assert current is not None
    assert current.summary is not None
    assert current.summary.operation.value == "overwrite"
    assert int(current.summary["total-records"]) == KEYS
    assert int(current.summary["added-records"]) == KEYS
