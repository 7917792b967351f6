"""The online stores under test: their feature_store.yaml block and how to measure storage."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from pathlib import Path
from typing import Any

from workload import FEATURE_VIEW, PROJECT

ICEBERG_CATALOG = "feast_catalog"
ICEBERG_NAMESPACE = "feast_online"
ICEBERG_TABLE = f"{ICEBERG_NAMESPACE}.{PROJECT}_{FEATURE_VIEW}_online"
SQLITE_TABLE = f"{PROJECT}_{FEATURE_VIEW}"

LABELS = {
    "sqlite": "Feast sqlite store",
    "iceberg": "feast-iceberg",
    "iceberg-arrow": "feast-iceberg, Arrow engine",
    "iceberg-rest-s3": "feast-iceberg, REST + S3",
}
# The REST catalog + S3 fields (credentials included) come from the environment that
# bench/run.py (or scripts/servers.py) sets after starting SeaweedFS; never from a file.
REST_S3_ENV = "FEAST_ICEBERG_ONLINE_STORE_REST_S3"


def rest_s3_fields(data_dir: Path) -> dict[str, Any]:
    """online_store fields for the REST + S3 store, a namespace of its own per repo."""
    fields: dict[str, Any] = json.loads(os.environ[REST_S3_ENV])
    fields["namespace"] = "bench_" + hashlib.sha1(str(data_dir).encode()).hexdigest()[:12]
    return fields


# Measured for materialization only: everything else is the `iceberg` store itself.
MATERIALIZE_ONLY = {"iceberg-arrow"}
ARROW_ENGINE_YAML = "batch_engine:\n  type: feast_iceberg.IcebergArrowEngine\n"


def online_store_yaml(store: str, data_dir: Path) -> str:
    if store == "sqlite":
        return f"  type: sqlite\n  path: {data_dir / 'online.db'}\n"
    if store in ("iceberg", "iceberg-arrow"):
        return (
            "  type: feast_iceberg.IcebergOnlineStore\n"
            "  catalog_type: sql\n"
            f"  catalog_name: {ICEBERG_CATALOG}\n"
            f"  uri: sqlite:///{data_dir / 'iceberg_catalog.db'}\n"
            f"  warehouse: {data_dir / 'iceberg_warehouse'}\n"
            f"  namespace: {ICEBERG_NAMESPACE}\n"
        )
    if store == "iceberg-rest-s3":
        # JSON is YAML: one flow mapping keeps nested storage_options intact.
        fields = {"type": "feast_iceberg.IcebergOnlineStore", **rest_s3_fields(data_dir)}
        return "".join(f"  {k}: {json.dumps(v)}\n" for k, v in fields.items())
    raise ValueError(f"unknown store {store!r}")


def _core_stats(data_dir: Path) -> dict[str, Any]:
    """What the core reports of the bench table on a remote warehouse (no local files)."""
    from feast_iceberg import IcebergOnlineStoreConfig, _internal

    config = IcebergOnlineStoreConfig(**rest_s3_fields(data_dir))
    store = _internal.Store(config.to_store_json(data_dir, 3))
    return store.stats(f"{PROJECT}_{FEATURE_VIEW}_online")


def feature_store_yaml(store: str, data_dir: Path) -> str:
    return (
        f"project: {PROJECT}\n"
        f"registry: {data_dir / 'registry.db'}\n"
        "provider: local\n"
        "online_store:\n"
        f"{online_store_yaml(store, data_dir)}"
        "offline_store:\n"
        "  type: file\n"
        "entity_key_serialization_version: 3\n"
        + (ARROW_ENGINE_YAML if store == "iceberg-arrow" else "")
    )


def _tree_bytes(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def disk_usage(store: str, data_dir: Path) -> tuple[int, int]:
    """Bytes and files the online store keeps on disk (cheap: no table scan)."""
    if store == "sqlite":
        files = list(data_dir.glob("online.db*"))
        return sum(p.stat().st_size for p in files), len(files)
    if store == "iceberg-rest-s3":
        # Live data files only: the objects under the table prefix are not listed here.
        stats = _core_stats(data_dir)
        return stats["data_bytes"], stats["data_files"]
    return _tree_bytes(data_dir / "iceberg_warehouse")


def storage(store: str, data_dir: Path) -> dict[str, object]:
    """Live rows and bytes on disk of the feature view's online table."""
    if store == "sqlite":
        db = data_dir / "online.db"
        with sqlite3.connect(db) as conn:
            keys, table_rows = conn.execute(
                f'SELECT COUNT(DISTINCT entity_key), COUNT(*) FROM "{SQLITE_TABLE}"'
            ).fetchone()
        size = sum(p.stat().st_size for p in data_dir.glob("online.db*"))
        # One SQLite row per (entity, feature); `rows` counts entities like the Iceberg tables.
        return {"rows": keys, "table_rows": table_rows, "bytes": size, "files": 1}
    if store == "iceberg-rest-s3":
        stats = _core_stats(data_dir)
        return {
            "rows": stats["records"],
            "bytes": stats["data_bytes"],
            "files": stats["data_files"],
            "snapshots": stats["snapshots"],
        }
    size, files = _tree_bytes(data_dir / "iceberg_warehouse")
    result: dict[str, object] = {"bytes": size, "files": files, "rows": None}
    try:
        from pyiceberg.catalog import load_catalog
    except ImportError:
        result["rows_note"] = "pyiceberg not installed"
        return result
    catalog = load_catalog(
        ICEBERG_CATALOG,
        type="sql",
        uri=f"sqlite:///{data_dir / 'iceberg_catalog.db'}",
        warehouse=f"file://{data_dir / 'iceberg_warehouse'}",
    )
    table = catalog.load_table(ICEBERG_TABLE)
    result["rows"] = table.scan(selected_fields=("entity_key",)).to_arrow().num_rows
    result["snapshots"] = len(table.snapshots())
    return result
