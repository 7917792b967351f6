"""`IcebergSparkEngine` on a real local Spark (`local[2,4]`: two threads, up to four attempts
per task): the tables it leaves equal the Arrow engine's, one commit per view per
materialization, idempotent re-runs, a task killed mid-write, two engines at once, errors
that fail the materialization."""

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

pytest.importorskip("pyspark")

ENGINE = {"type": "feast_iceberg.IcebergSparkEngine"}

pytestmark = pytest.mark.usefixtures("spark")


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_source(tmp_path_factory.mktemp("spark_source") / "source.parquet")


@pytest.fixture(scope="module")
def arrow_rows(tmp_path_factory: pytest.TempPathFactory, source: Path) -> dict[str, Any]:
    return arrow_engine_rows(tmp_path_factory.mktemp("spark_arrow"), source)


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
    expected_online(fs, "stats_a", [0, 3, 1999])
    # The same window again: the same rows, one more commit.
    fs.materialize(START, END, feature_views=["stats_a"])
    assert table_rows(fs, "stats_a") == arrow_rows["stats_a"]
    assert stats(fs, "stats_a")["snapshots"] == before["stats_a"] + 2
    assert duplicate_keys(fs, "stats_a") == 0


def test_a_task_killed_mid_write_is_retried_without_duplicates(
    tmp_path: Path, source: Path, arrow_rows: dict[str, Any], engine_faults: Path
) -> None:
    fs = feature_store(tmp_path / "repo", ENGINE, source)
    before = stats(fs, "stats_b")["snapshots"]
    marker = engine_faults / "exit-after-stage"
    marker.touch()  # the first task to stage dies with its files written, token unsent
    try:
        fs.materialize(START, END, feature_views=["stats_b"])
        assert not marker.exists(), "no worker died"
    finally:
        marker.unlink(missing_ok=True)
    assert table_rows(fs, "stats_b") == arrow_rows["stats_b"]
    assert stats(fs, "stats_b")["snapshots"] == before + 1
    assert duplicate_keys(fs, "stats_b") == 0
    assert orphans(fs, "stats_b") == 0  # the dead attempt's files were discarded


def test_two_engines_materialize_different_views_at_once(
    tmp_path: Path, source: Path, arrow_rows: dict[str, Any]
) -> None:
    repo = tmp_path / "repo"
    first = feature_store(repo, ENGINE, source)
    second = feature_store(repo, ENGINE, source)
    before = snapshots(first)
    in_threads(
        lambda: first.materialize(START, END, feature_views=["stats_a"]),
        lambda: second.materialize(START, END, feature_views=["stats_b"]),
    )
    for view in VIEWS:
        assert table_rows(first, view) == arrow_rows[view]
        assert stats(first, view)["snapshots"] == before[view] + 1


def test_an_error_fails_the_materialization_and_commits_nothing(tmp_path: Path) -> None:
    fs = feature_store(tmp_path / "repo", ENGINE, null_key_source(tmp_path / "bad.parquet"))
    before = stats(fs, "stats_a")["snapshots"]
    with pytest.raises(Exception, match="driver_id"):
        fs.materialize(START, END, feature_views=["stats_a"])
    assert stats(fs, "stats_a")["snapshots"] == before
    assert orphans(fs, "stats_a") == 0


def test_partition_tags_spread_buckets_over_sparks_hash_partitions(spark: Any) -> None:
    from feast_iceberg.spark_engine import partition_tags, spark_hash_int
    from pyspark.sql import functions as F

    values = [0, 1, 7, -1, 2**31 - 1, -(2**31), 123_456]
    frame = spark.createDataFrame([(v,) for v in values], "v int").select("v", F.hash("v"))
    assert [spark_hash_int(v) for v in values] == [row[1] for row in frame.collect()]
    for n in (1, 2, 3, 16):
        assert sorted(spark_hash_int(t) % n for t in partition_tags(n)) == list(range(n))


def test_config_takes_the_spark_engines_fields() -> None:
    from feast_iceberg import IcebergSparkEngineConfig

    config = IcebergSparkEngineConfig(partitions=8, spark_conf={"spark.a": "b"})
    assert (config.type, config.partitions) == ("feast_iceberg.IcebergSparkEngine", 8)
    with pytest.raises(ValueError):
        IcebergSparkEngineConfig(nope=1)


def test_mirrored_feast_spark_code_is_unchanged() -> None:
    """`_feast_compat.spark_materialize_one` copies `_materialize_one`'s DAG path, and
    `IcebergSparkWriteNode` replaces `SparkWriteNode.execute`'s online half (its offline half
    runs as it is): re-check them when Feast changes these, then update the fingerprints."""
    from feast.infra.compute_engines.spark.compute import SparkComputeEngine
    from feast.infra.compute_engines.spark.feature_builder import SparkFeatureBuilder
    from feast.infra.compute_engines.spark.nodes import SparkWriteNode

    assert fingerprint(SparkComputeEngine._materialize_one) == "2822c91b6ab0f75c"
    assert fingerprint(SparkWriteNode.execute) == "7ccd85b1a39a14a6"
    assert fingerprint(SparkFeatureBuilder.build_output_nodes) == "c0671ecb2b5a5728"
