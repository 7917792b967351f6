"""`feast-iceberg migrate` on a real table shaped like the contrib Iceberg store's: built with
PyIceberg in the same SQL catalog, append-only with duplicates, hex keys, naive timestamps,
Float32 widened to double, an identity partition on entity_hash."""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from pathlib import Path

import pyarrow as pa
import pytest
from click.testing import CliRunner
from conftest import BASE_TS, driver, driver_key, driver_view, expected_values, plain
from feast.infra.key_encoding_utils import serialize_entity_key
from feast_iceberg import SchemaMismatchError
from feast_iceberg.cli import cli

KEYS = 300
# Appended out of order, so the newest version is not the last one written.
VERSIONS = (1, 3, 2)
TABLE = "feast_online.test_driver_stats_online"

YAML = """\
project: test
registry: data/registry.db
provider: local
online_store:
  type: feast_iceberg.IcebergOnlineStore
  uri: sqlite:///{data}/catalog.db
  warehouse: {data}/warehouse
offline_store:
  type: file
entity_key_serialization_version: 3
"""


def contrib_rows(version: int) -> pa.Table:
    keys = [
        serialize_entity_key(driver_key(i), entity_key_serialization_version=3) for i in range(KEYS)
    ]
    event = BASE_TS + timedelta(minutes=version)
    values = [expected_values(i, version) for i in range(KEYS)]
    return pa.table(
        {
            "entity_key": [k.hex() for k in keys],
            "entity_hash": [int(hashlib.md5(k).hexdigest(), 16) % 32 for k in keys],
            "event_ts": pa.array([event] * KEYS, pa.timestamp("us")),
            "created_ts": pa.array([event] * KEYS, pa.timestamp("us")),
            "conv_rate": pa.array([v["conv_rate"] for v in values], pa.float64()),  # widened
            "acc_rate": pa.array([v["acc_rate"] for v in values], pa.float64()),
            "trips": pa.array([v["trips"] for v in values], pa.int64()),
            "city": pa.array([v["city"] for v in values], pa.string()),
        }
    )


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    from feast import FeatureStore
    from pyiceberg.catalog import load_catalog
    from pyiceberg.transforms import IdentityTransform

    data = tmp_path / "data"
    data.mkdir()
    (tmp_path / "feature_store.yaml").write_text(YAML.format(data=data))
    catalog = load_catalog(
        "feast_catalog", type="sql", uri=f"sqlite:///{data}/catalog.db",
        warehouse=f"file://{data}/warehouse",
    )  # fmt: skip
    catalog.create_namespace("feast_online")
    schema = contrib_rows(1).schema
    table = catalog.create_table(TABLE, schema=schema)
    with table.update_spec() as spec:
        spec.add_field("entity_hash", IdentityTransform(), "entity_hash")
    for version in VERSIONS:
        table.append(contrib_rows(version))
    # The feature view is in the registry, as it was with the contrib store.
    fs = FeatureStore(repo_path=str(tmp_path))
    fs.registry.apply_entity(driver, "test")
    fs.registry.apply_feature_view(driver_view(), "test")
    fs.registry.commit()
    return tmp_path


def run(repo: Path, *args: str) -> list[dict]:
    result = CliRunner().invoke(cli, ["-c", str(repo), *args, "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def read_trips(repo: Path) -> list:
    from feast import FeatureStore
    from feast_iceberg import IcebergOnlineStore

    fs = FeatureStore(repo_path=str(repo))
    results = IcebergOnlineStore().online_read(
        fs.config, driver_view(), [driver_key(i) for i in range(KEYS)]
    )
    return [(None if f is None else {k: plain(v) for k, v in f.items()}) for _, f in results]


def test_migrate_keeps_the_newest_row_per_key_and_swaps_atomically(repo: Path) -> None:
    with pytest.raises(SchemaMismatchError, match="feast-iceberg migrate"):
        read_trips(repo)

    (plan,) = run(repo, "migrate", "--dry-run")
    assert plan["rows_read"] == KEYS * len(VERSIONS) and plan["files_read"] > 0
    assert not plan["already_migrated"]

    (done,) = run(repo, "migrate")
    assert done["rows_live"] == KEYS
    newest = max(VERSIONS)
    assert read_trips(repo) == [expected_values(i, newest) for i in range(KEYS)]
    (stats,) = run(repo, "stats")
    assert stats["rows"] == KEYS and stats["duplicate_keys"] == 0

    # Other engines find our table under the same name, in our layout.
    from pyiceberg.catalog import load_catalog

    data = repo / "data"
    catalog = load_catalog(
        "feast_catalog", type="sql", uri=f"sqlite:///{data}/catalog.db",
        warehouse=f"file://{data}/warehouse",
    )  # fmt: skip
    table = catalog.load_table(TABLE)
    assert "feast.value-types" in table.properties
    assert str(table.schema().find_field("conv_rate").field_type) == "float"
    assert table.scan().to_arrow().num_rows == KEYS
    assert [t[1] for t in catalog.list_tables("feast_online")] == ["test_driver_stats_online"]

    (again,) = run(repo, "migrate")
    assert again["already_migrated"]

    # Teardown removes the migrated table's files and the contrib files it replaced.
    from feast import FeatureStore
    from feast_iceberg import IcebergOnlineStore

    fs = FeatureStore(repo_path=str(repo))
    IcebergOnlineStore().teardown(fs.config, [driver_view()], [])
    assert not [p for p in (data / "warehouse").rglob("*") if p.is_file()]
