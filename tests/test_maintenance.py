"""The feast-iceberg CLI and explicit maintenance: stats, expiry, compaction, orphan removal,
and crash safety (a writer killed mid-write leaves the table readable; its leftovers are
removed by the next remove-orphans)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import driver, driver_key, driver_row, driver_view, expected_values, plain
from feast_iceberg.cli import cli

FEATURE_STORE_YAML = """\
project: test
registry: data/registry.db
provider: local
online_store:
  type: feast_iceberg.IcebergOnlineStore
  uri: sqlite:///data/catalog.db
  warehouse: data/warehouse
offline_store:
  type: file
entity_key_serialization_version: 3
"""


class Repo:
    def __init__(self, path: Path, online_extra: str = "") -> None:
        from feast import FeatureStore

        (path / "data").mkdir(parents=True)
        yaml = FEATURE_STORE_YAML.replace(
            "  warehouse: data/warehouse\n", f"  warehouse: data/warehouse\n{online_extra}"
        )
        (path / "feature_store.yaml").write_text(yaml)
        self.path = path
        self.view = driver_view()
        self.fs = FeatureStore(repo_path=str(path))
        self.fs.apply([driver, self.view])
        self.online = self.fs._get_provider().online_store

    def write(self, rows: list) -> None:
        self.online.online_write_batch(self.fs.config, self.view, rows, None)

    def trips(self, keys: list[int]) -> list[Any]:
        results = self.online.online_read(self.fs.config, self.view, [driver_key(i) for i in keys])
        return [None if f is None else plain(f["trips"]) for _, f in results]

    def run(self, *args: str) -> Any:
        result = CliRunner().invoke(cli, ["-c", str(self.path), *args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout) if "--json" in args else result.output

    def files(self, suffix: str = "") -> list[Path]:
        root = self.path / "data" / "warehouse"
        return sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith(suffix))


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    return Repo(tmp_path / "repo")


def test_stats_reports_rows_files_snapshots_and_catalog(repo: Repo) -> None:
    repo.write([driver_row(i, 1) for i in range(500)])
    repo.write([driver_row(i, 2) for i in range(300)])
    (row,) = repo.run("stats", "--json")
    assert row["feature_view"] == "driver_stats"
    assert row["identifier"] == "feast_online.test_driver_stats_online"
    assert row["catalog"] == "feast_catalog"
    assert row["rows"] == 500 and row["duplicate_keys"] == 0
    assert row["data_files"] == len(repo.files(".parquet"))
    assert row["snapshots"] == 1 and row["metadata_files"] >= 2
    text = repo.run("stats")
    assert "test_driver_stats_online" in text and "catalog name: feast_catalog" in text


def test_unknown_view_is_a_usage_error(repo: Repo) -> None:
    result = CliRunner().invoke(cli, ["-c", str(repo.path), "stats", "nope"])
    assert result.exit_code != 0 and "nope" in result.output


def _age(path: Path, seconds: float) -> None:
    past = time.time() - seconds
    os.utime(path, (past, past))


def test_remove_orphans_keeps_referenced_and_young_files(repo: Repo) -> None:
    repo.write([driver_row(i, 1) for i in range(200)])
    referenced = repo.files()
    data_dir = repo.files(".parquet")[0].parent
    old_data = data_dir / "orphan-old.parquet"
    old_data.write_bytes(b"left behind by a crashed writer")
    old_meta = referenced[0].parents[2] / "metadata" / "orphan-old.avro"
    old_meta.write_bytes(b"x" * 10)
    young = data_dir / "orphan-young.parquet"
    young.write_bytes(b"a write in progress")
    for p in (old_data, old_meta):
        _age(p, 7200)

    (dry,) = repo.run("remove-orphans", "--dry-run", "--json")
    assert dry["files"] == 2 and dry["too_young"] == 1
    assert sorted(dry["paths"]) == sorted(f"file://{p}" for p in (old_data, old_meta))
    assert old_data.exists() and old_meta.exists()

    (done,) = repo.run("remove-orphans", "--json")
    assert done["files"] == 2
    assert not old_data.exists() and not old_meta.exists() and young.exists()
    assert all(p.exists() for p in referenced)
    assert repo.trips(list(range(200))) == [expected_values(i, 1)["trips"] for i in range(200)]


def test_expire_snapshots_dry_run_and_run(tmp_path: Path) -> None:
    # A grace period keeps the replaced snapshot; once it has passed, expiry removes it.
    repo = Repo(tmp_path / "r", "  snapshot_retention_seconds: 0.5\n")
    repo.write([driver_row(i, 1) for i in range(50)])
    repo.write([driver_row(i, 2) for i in range(50)])
    (before,) = repo.run("stats", "--json")
    assert before["snapshots"] == 2
    time.sleep(0.6)
    (dry,) = repo.run("expire-snapshots", "--dry-run", "--json")
    assert dry["snapshots_expired"] == 1
    assert repo.run("stats", "--json")[0]["snapshots"] == 2
    (done,) = repo.run("expire-snapshots", "--json")
    assert done["snapshots_expired"] == 1
    assert repo.run("stats", "--json")[0]["snapshots"] == 1
    assert repo.trips([7]) == [expected_values(7, 2)["trips"]]


def test_compact_rewrites_every_bucket_keeping_the_newest_rows(repo: Repo) -> None:
    repo.write([driver_row(i, 1) for i in range(400)])
    repo.write([driver_row(i, 2) for i in range(0, 400, 2)])
    (plan,) = repo.run("compact", "--all", "--dry-run", "--json")
    assert plan["buckets"] == 16 and plan["files_added"] == 0
    (done,) = repo.run("compact", "--all", "--json")
    assert done["buckets"] == 16 and done["files_added"] == 16
    want = [expected_values(i, 2 if i % 2 == 0 else 1)["trips"] for i in range(400)]
    assert repo.trips(list(range(400))) == want
    from pyiceberg.catalog import load_catalog

    catalog = load_catalog(
        "feast_catalog",
        type="sql",
        uri=f"sqlite:///{repo.path / 'data' / 'catalog.db'}",
        warehouse=f"file://{repo.path / 'data' / 'warehouse'}",
    )
    table = catalog.load_table("feast_online.test_driver_stats_online")
    assert table.current_snapshot().summary.operation.value == "replace"
    assert table.scan().to_arrow().num_rows == 400
    # Nothing has several files per bucket now: a plain compaction has nothing to do.
    (again,) = repo.run("compact", "--json")
    assert again["buckets"] == 0


def test_compact_buckets_rebuckets_and_dry_run_says_so(repo: Repo) -> None:
    keys = list(range(3000))
    repo.write([driver_row(i, 1) for i in keys])
    (plan,) = repo.run("compact", "--buckets", "32", "--dry-run", "--json")
    assert (plan["buckets_before"], plan["buckets_after"], plan["buckets"]) == (16, 32, 16)
    assert "buckets_after" in repo.run("compact", "--buckets", "32", "--dry-run")
    (stats,) = repo.run("stats", "--json")
    assert stats["buckets"] == 16
    (done,) = repo.run("compact", "--buckets", "32", "--json")
    assert (done["buckets_after"], done["files_added"]) == (32, 32)
    (stats,) = repo.run("stats", "--json")
    assert (stats["buckets"], stats["data_files"], stats["rows"]) == (32, 32, 3000)
    assert repo.trips(keys) == [expected_values(i, 1)["trips"] for i in keys]
    bad = CliRunner().invoke(cli, ["-c", str(repo.path), "compact", "--buckets", "48"])
    assert bad.exit_code != 0 and "multiple of 32" in str(bad.exception)


WRITER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from pathlib import Path
    from feast import FeatureStore
    from conftest import driver_row, driver_view

    fs = FeatureStore(repo_path={repo!r})
    online, view = fs._get_provider().online_store, driver_view()
    for version in range(2, 1000):
        rows = [driver_row(i, version) for i in range(20000)]
        online.online_write_batch(fs.config, view, rows, None)
        print(version, flush=True)
    """
)


def test_a_writer_killed_mid_write_leaves_the_table_readable(repo: Repo) -> None:
    keys = list(range(20000))
    repo.write([driver_row(i, 1) for i in keys])
    script = WRITER.format(tests=str(Path(__file__).parent), repo=str(repo.path))
    writer = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert writer.stdout is not None
    first = writer.stdout.readline()  # one batch committed; the next is in flight
    assert first.strip() == "2", writer.stderr.read() if writer.stderr else ""
    time.sleep(0.3)
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=30)

    # Every key shows the same, complete version: batches commit atomically or not at all.
    from feast_iceberg import IcebergOnlineStore

    repo.online = IcebergOnlineStore()  # nothing cached from before the kill
    trips = repo.trips(keys)
    versions = {t - i * 1000 for t, i in zip(trips, keys, strict=True)}
    assert len(versions) == 1 and versions <= set(range(2, 1000)), sorted(versions)[:5]

    (after,) = repo.run("remove-orphans", "--older-than", "0", "--json")
    (stats,) = repo.run("stats", "--json")
    assert len(repo.files(".parquet")) == stats["data_files"], after
    assert repo.trips(keys[:50]) == trips[:50]


def test_compaction_beside_a_concurrent_writer_loses_nothing(repo: Repo) -> None:
    keys = list(range(2000))
    repo.write([driver_row(i, 1) for i in keys])
    script = (
        WRITER.format(tests=str(Path(__file__).parent), repo=str(repo.path))
        .replace("range(2, 1000)", "range(2, 12)")
        .replace("range(20000)", "range(2000)")
    )
    writer = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    compactions = 0
    while writer.poll() is None:
        repo.run("compact", "--all", "--json")
        compactions += 1
    _, err = writer.communicate(timeout=120)
    assert writer.returncode == 0, err
    assert compactions >= 1
    from feast_iceberg import IcebergOnlineStore

    repo.online = IcebergOnlineStore()
    # The writer's last batch (version 11) is what every key holds: no compaction, planned on
    # an older snapshot, put older rows back.
    assert repo.trips(keys) == [expected_values(i, 11)["trips"] for i in keys]


def test_a_missing_repo_is_a_clear_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["-c", str(tmp_path / "nowhere"), "stats"])
    assert result.exit_code == 2
    assert "no feature_store.yaml" in result.output
    cli_main = subprocess.run(
        [sys.executable, "-m", "feast_iceberg.cli", "-c", str(tmp_path), "stats"],
        capture_output=True,
        text=True,
    )
    assert cli_main.returncode == 2 and "Traceback" not in cli_main.stderr, cli_main.stderr
