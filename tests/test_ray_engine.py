"""`IcebergRayEngine` on a real local Ray cluster (2 CPUs): the tables it leaves equal the Arrow
engine's, one commit per view per materialization, idempotent re-runs, a task killed
mid-write, two engines at once (Ray beside Spark), errors that fail the materialization where
Feast's Ray engine logs and drops them."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from engine_repos import (
    END,
    START,
    VIEWS,
    arrow_engine_rows,
    duplicate_keys,
    expected_online,
    feature_store,
    in_threads,
    null_key_source,
    orphans,
    stats,
    table_rows,
    write_source,
)
from test_feast_compat import fingerprint

pytest.importorskip("ray")

ENGINE = {"type": "feast_iceberg.IcebergRayEngine"}

pytestmark = pytest.mark.usefixtures("ray_cluster")


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_source(tmp_path_factory.mktemp("ray_source") / "source.parquet")


@pytest.fixture(scope="module")
def arrow_rows(tmp_path_factory: pytest.TempPathFactory, source: Path) -> dict[str, Any]:
    return arrow_engine_rows(tmp_path_factory.mktemp("ray_arrow"), source)


def snapshots(fs: Any) -> dict[str, int]:
    return {v: stats(fs, v)["snapshots"] for v in VIEWS}


def test_same_tables_as_the_arrow_engine_one_commit_per_view_idempotent(
    tmp_path: Path, source: Path, arrow_rows: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    fs = feature_store(tmp_path / "repo", ENGINE, source)
    before = snapshots(fs)
    with caplog.at_level(logging.INFO, logger="feast_iceberg"):
        fs.materialize(START, END)
    assert not [r for r in caplog.records if "proto path" in r.getMessage()]
    for view in VIEWS:
        assert table_rows(fs, view) == arrow_rows[view], view
        assert stats(fs, view)["snapshots"] == before[view] + 1, view
        assert duplicate_keys(fs, view) == 0
        assert orphans(fs, view) == 0
    expected_online(fs, "stats_b", [0, 3, 1999])
    # The same window again: the same rows, one more commit.
    fs.materialize(START, END, feature_views=["stats_a"])
    assert table_rows(fs, "stats_a") == arrow_rows["stats_a"]
    assert stats(fs, "stats_a")["snapshots"] == before["stats_a"] + 2
    assert duplicate_keys(fs, "stats_a") == 0


def test_a_task_killed_mid_write_is_retried_without_duplicates(
    tmp_path: Path, source: Path, arrow_rows: dict[str, Any], engine_faults: Path
) -> None:
    fs = feature_store(tmp_path / "repo", ENGINE, source)
    before = stats(fs, "stats_a")["snapshots"]
    marker = engine_faults / "exit-after-stage"
    marker.touch()  # the first task to stage dies with its files written, token unsent
    try:
        fs.materialize(START, END, feature_views=["stats_a"])
        assert not marker.exists(), "no worker died"
    finally:
        marker.unlink(missing_ok=True)
    assert table_rows(fs, "stats_a") == arrow_rows["stats_a"]
    assert stats(fs, "stats_a")["snapshots"] == before + 1
    assert duplicate_keys(fs, "stats_a") == 0
    assert orphans(fs, "stats_a") == 0  # the dead attempt's files were discarded


@pytest.mark.usefixtures("spark")
def test_two_engines_materialize_different_views_at_once(
    tmp_path: Path, source: Path, arrow_rows: dict[str, Any]
) -> None:
    repo = tmp_path / "repo"
    on_ray = feature_store(repo, ENGINE, source)
    on_spark = feature_store(repo, {"type": "feast_iceberg.IcebergSparkEngine"}, source)
    before = snapshots(on_ray)
    in_threads(
        lambda: on_ray.materialize(START, END, feature_views=["stats_a"]),
        lambda: on_spark.materialize(START, END, feature_views=["stats_b"]),
    )
    for view in VIEWS:
        assert table_rows(on_ray, view) == arrow_rows[view]
        assert stats(on_ray, view)["snapshots"] == before[view] + 1


def test_an_error_fails_the_materialization_and_commits_nothing(tmp_path: Path) -> None:
    fs = feature_store(tmp_path / "repo", ENGINE, null_key_source(tmp_path / "bad.parquet"))
    before = stats(fs, "stats_a")["snapshots"]
    with pytest.raises(Exception, match="driver_id"):
        fs.materialize(START, END, feature_views=["stats_a"])
    assert stats(fs, "stats_a")["snapshots"] == before
    assert orphans(fs, "stats_a") == 0


def test_config_takes_the_ray_engines_fields() -> None:
    from feast_iceberg import IcebergRayEngineConfig

    config = IcebergRayEngineConfig(write_concurrency=3, max_workers=2)
    assert (config.type, config.write_concurrency) == ("feast_iceberg.IcebergRayEngine", 3)
    with pytest.raises(ValueError):
        IcebergRayEngineConfig(nope=1)


def test_mirrored_feast_ray_code_is_unchanged() -> None:
    """`_feast_compat.ray_materialize_one` copies `_materialize_one`'s DAG path; the
    materialization plan builds the `RayWriteNode`s that `replace_node_class` retypes; and
    `IcebergRayWriteNode` replaces `RayWriteNode.execute`'s online half (its offline half runs
    as it is): re-check them when Feast changes these, then update the fingerprints."""
    from feast.infra.compute_engines.ray.compute import RayComputeEngine
    from feast.infra.compute_engines.ray.feature_builder import RayFeatureBuilder
    from feast.infra.compute_engines.ray.nodes import RayWriteNode

    assert fingerprint(RayComputeEngine._materialize_one) == "8579d0cff606f311"
    assert fingerprint(RayWriteNode.execute) == "0ea56d2fc23dc534"
    assert fingerprint(RayFeatureBuilder._build_materialization_plan) == "e748f13f32c50275"
