"""The online_store block: contrib fields accepted, unknown fields rejected, defaults under the
repo, secrets redacted, and Feast's class lookup finds the store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from feast.repo_config import get_online_config_from_type
from feast_iceberg import IcebergOnlineStore, IcebergOnlineStoreConfig
from pydantic import ValidationError

CONTRIB_BLOCK = {
    "type": "feast_iceberg.IcebergOnlineStore",
    "catalog_type": "sql",
    "catalog_name": "feast_catalog",
    "uri": "postgresql+psycopg2://feast:hunter2@127.0.0.1:5432/feast",
    "warehouse": "s3://bucket/warehouse",
    "namespace": "feast_online",
    "partition_strategy": "entity_hash",
    "partition_count": 32,
    "read_timeout_ms": 100,
    "storage_options": {"s3.endpoint": "http://127.0.0.1:9000", "s3.secret-access-key": "s3cr3t"},
}


def test_every_contrib_field_is_accepted() -> None:
    cfg = IcebergOnlineStoreConfig(**CONTRIB_BLOCK)
    assert cfg.partition_count == 32 and cfg.read_timeout_ms == 100


def test_unknown_fields_are_rejected_with_their_name() -> None:
    with pytest.raises(ValidationError, match="not_a_field"):
        IcebergOnlineStoreConfig(type="feast_iceberg.IcebergOnlineStore", not_a_field=1)


def test_secrets_are_redacted_in_repr() -> None:
    cfg = IcebergOnlineStoreConfig(**CONTRIB_BLOCK)
    shown = repr(cfg) + str(cfg)
    assert "hunter2" not in shown and "s3cr3t" not in shown
    assert "127.0.0.1:9000" in shown


def test_feast_finds_config_and_store_classes_from_the_type_string() -> None:
    for type_name in (
        "feast_iceberg.IcebergOnlineStore",
        "feast_iceberg.online_store.IcebergOnlineStore",
    ):
        assert get_online_config_from_type(type_name) is IcebergOnlineStoreConfig
    # Feast imports the store class from the module that defines the config class.
    import importlib

    module = importlib.import_module(IcebergOnlineStoreConfig.__module__)
    assert module.IcebergOnlineStore is IcebergOnlineStore


def test_defaults_live_under_the_repo(tmp_path: Path) -> None:
    cfg = IcebergOnlineStoreConfig()
    core = json.loads(cfg.to_store_json(tmp_path, 3))
    assert core["catalog_type"] == "sql"
    assert core["uri"] == f"sqlite:///{tmp_path.resolve() / 'data' / 'iceberg_catalog.db'}"
    assert core["warehouse"] == f"file://{tmp_path.resolve() / 'data' / 'iceberg_warehouse'}"


def test_relative_sqlite_uri_and_warehouse_are_taken_from_the_repo(tmp_path: Path) -> None:
    cfg = IcebergOnlineStoreConfig(uri="sqlite:///cat/c.db", warehouse="wh")
    core = json.loads(cfg.to_store_json(tmp_path, 3))
    assert core["uri"] == f"sqlite:///{tmp_path.resolve() / 'cat' / 'c.db'}"
    assert core["warehouse"] == f"file://{tmp_path.resolve() / 'wh'}"


def test_other_partition_strategies_warn(tmp_path: Path) -> None:
    cfg = IcebergOnlineStoreConfig(partition_strategy="timestamp")
    with pytest.warns(UserWarning, match="bucket"):
        cfg.to_store_json(tmp_path, 3)


def test_partition_count_is_bounded() -> None:
    with pytest.raises(ValidationError):
        IcebergOnlineStoreConfig(partition_count=0)
