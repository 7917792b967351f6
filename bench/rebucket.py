"""Re-bucketing a grown table: what `feast-iceberg compact` costs and what it buys.

    python3 bench/rebucket.py                       # 2M rows x 10 float64 features, 16 buckets
    python3 bench/rebucket.py --rows 500000 --target-mib 2

A table is loaded with the Arrow engine's write path (1M-row chunks) into `--buckets` buckets,
then compacted with `target_bucket_bytes` = `--target-mib`, which re-buckets it (more buckets,
every file rewritten into the new partition spec). Reported: the compaction's time, bucket
file sizes before and after, and what one copy-on-write write of one key costs before and
after (merge-on-read off, so the write rewrites the key's whole bucket: the cost re-bucketing
bounds). SQLite catalog and local warehouse, in a temporary directory.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from feast.protos.feast.types.EntityKey_pb2 import EntityKey
from feast.protos.feast.types.Value_pb2 import Value
from feast_iceberg import _internal
from feast_iceberg.config import IcebergOnlineStoreConfig

FEATURES = [f"f{i}" for i in range(10)]
TABLE = "grown"


def rows(ids: np.ndarray, version: int) -> pa.Table:
    rng = np.random.default_rng(version)
    columns: dict[str, Any] = {"id": pa.array(ids, pa.int64())}
    for f in FEATURES:
        columns[f] = pa.array(rng.random(len(ids)), pa.float64())
    ts = np.full(len(ids), 1_700_000_000_000_000 + version, dtype="int64")
    columns["ts"] = pa.array(ts, pa.timestamp("us", "UTC"))
    return pa.table(columns)


def upsert(store: _internal.Store, data: pa.Table) -> dict[str, Any]:
    features = [(f, f) for f in FEATURES]
    return dict(_internal.write_arrow(store, TABLE, data, [("id", "id")], features, "ts"))


def key(i: int) -> bytes:
    return EntityKey(join_keys=["id"], entity_values=[Value(int64_val=i)]).SerializeToString()


def data_files(root: Path) -> list[int]:
    """Sizes of the table's data files (expiry deleted the replaced ones)."""
    return sorted(p.stat().st_size for p in (root / "warehouse").rglob("*.parquet"))


def sizes(files: list[int]) -> str:
    mib = [s / 2**20 for s in files]
    return (
        f"{len(mib)} files, MiB min/median/max {min(mib):.2f} / {statistics.median(mib):.2f} / "
        f"{max(mib):.2f}"
    )


def one_key_writes(store: _internal.Store, n: int, version: int, times: int = 5) -> str:
    """Median and max seconds of a copy-on-write upsert of one random key."""
    seconds = []
    for t in range(times):
        start = time.perf_counter()
        upsert(store, rows(np.array([random.randrange(n)]), version + t))
        seconds.append(time.perf_counter() - start)
    return f"median {statistics.median(seconds):.3f} s, max {max(seconds):.3f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--buckets", type=int, default=16)
    parser.add_argument("--target-mib", type=float, default=4.0)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="feast-iceberg-rebucket-"))
    config = IcebergOnlineStoreConfig(
        uri=f"sqlite:///{root / 'catalog.db'}",
        warehouse=str(root / "warehouse"),
        partition_count=args.buckets,
        target_bucket_bytes=int(args.target_mib * 2**20),
        merge_on_read_max_fraction=0,
    )
    store = _internal.Store(config.to_store_json(root, 3))
    store.ensure_table(TABLE, [("id", 4)], [(f, 5) for f in FEATURES])
    ids = np.arange(args.rows, dtype="int64")

    start = time.perf_counter()
    upsert(store, rows(ids, 0))
    loaded = time.perf_counter() - start
    print(f"loaded {args.rows:,} rows x {len(FEATURES)} float64 in {loaded:.1f} s")
    before = store.stats(TABLE)
    print(
        f"before: {before['buckets']} buckets, {before['data_bytes'] / 2**20:.1f} MiB, "
        f"{sizes(data_files(root))}"
    )
    print(f"  1-key copy-on-write upsert: {one_key_writes(store, args.rows, 1)}")

    plan = dict(store.compact(TABLE, dry_run=True))
    print(
        f"compact --dry-run: {plan['buckets_before']} -> {plan['buckets_after']} buckets "
        f"(largest {plan['largest_bucket_bytes'] / 2**20:.1f} MiB, target {args.target_mib} MiB)"
    )
    start = time.perf_counter()
    done = dict(store.compact(TABLE))
    seconds = time.perf_counter() - start
    t = done["timings"]
    print(
        f"compact: {seconds:.1f} s ({args.rows / seconds:,.0f} rows/s; plan "
        f"{t['plan_us'] / 1e6:.1f} s, prepare {t['prepare_us'] / 1e6:.2f} s, catalog "
        f"{t['catalog_us'] / 1e6:.2f} s), {done['files_removed']} files -> {done['files_added']}"
    )
    after = store.stats(TABLE)
    print(
        f"after: {after['buckets']} buckets, {after['data_bytes'] / 2**20:.1f} MiB, "
        f"{sizes(data_files(root))}"
    )
    print(f"  1-key copy-on-write upsert: {one_key_writes(store, args.rows, 100)}")

    sample = random.sample(range(args.rows), 1000)
    got = store.read(TABLE, [key(i) for i in sample])
    assert all(ts is not None for ts in got[1]), "a key went missing"
    assert after["records"] == args.rows


if __name__ == "__main__":
    main()
