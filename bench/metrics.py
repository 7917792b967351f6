"""What metrics cost: read latency with the core's counting on and off, in one process.

    python3 bench/metrics.py                 # 20k entities, 3000 reads per setting and size
    python3 bench/metrics.py --reads 500     # quicker

Reads go through `Store.read` of the core (what `online_read` calls), on an SQLite catalog and
a local warehouse, with the block cache warm: the cheapest read there is, so the one where
counting would show. The settings alternate in short blocks so that a load change on the
machine hits both alike. A last column scrapes the default registry the way `/metrics` does.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import prometheus_client
from feast.protos.feast.types.EntityKey_pb2 import EntityKey
from feast.protos.feast.types.Value_pb2 import Value
from feast_iceberg import _internal, metrics
from feast_iceberg.config import IcebergOnlineStoreConfig

FEATURES = [f"f{i}" for i in range(10)]
FLOAT64 = 5  # Feast ValueType.DOUBLE
INT64 = 4  # Feast ValueType.INT64
TABLE = "bench_metrics_online"
BLOCK = 50


def key(i: int) -> bytes:
    return EntityKey(join_keys=["id"], entity_values=[Value(int64_val=i)]).SerializeToString()


def load(store: _internal.Store, entities: int) -> None:
    store.ensure_table(TABLE, [("id", INT64)], [(f, FLOAT64) for f in FEATURES])
    values = [
        Value(double_val=i + j / 10).SerializeToString()
        for i in range(entities)
        for j in range(len(FEATURES))
    ]
    store.write(
        TABLE,
        FEATURES,
        [key(i) for i in range(entities)],
        values,
        [1_700_000_000_000_000] * entities,
        [None] * entities,
    )


def timed_reads(
    store: _internal.Store, keysets: list[list[bytes]], enabled: bool, reads: int
) -> list[float]:
    """Latencies (us) of `reads` reads with counting `enabled`."""
    _internal.set_metrics_enabled(enabled)
    samples: list[float] = []
    for n in range(reads):
        keys = keysets[n % len(keysets)]
        start = time.perf_counter_ns()
        store.read(TABLE, keys)
        samples.append((time.perf_counter_ns() - start) / 1e3)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--entities", type=int, default=20_000)
    parser.add_argument("--reads", type=int, default=3000)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="feast-iceberg-bench-metrics-"))
    config = IcebergOnlineStoreConfig(
        uri=f"sqlite:///{root / 'catalog.db'}", warehouse=str(root / "warehouse")
    )
    store = _internal.Store(config.to_store_json(root, 3))
    metrics.register()
    load(store, args.entities)
    stride = max(1, args.entities // 997)
    sizes = {1: [[key(i * stride % args.entities)] for i in range(997)]}
    sizes[100] = [
        [key((i * 100 + j) * stride % args.entities) for j in range(100)] for i in range(50)
    ]
    for keysets in sizes.values():  # warm the cache and the code paths
        timed_reads(store, keysets, True, 2 * BLOCK)

    print(f"{args.entities:,} entities x {len(FEATURES)} features; {args.reads} reads a cell")
    header = ["keys", "p50 on", "p50 off", "diff", "p99 on", "p99 off"]
    print(" | ".join(f"{h:>{w}}" for h, w in zip(header, (5, 9, 9, 7, 9, 9), strict=True)))
    print("-" * 64)
    for n, keysets in sizes.items():
        on: list[float] = []
        off: list[float] = []
        # Interleave whole blocks of each setting: half the blocks on, half off.
        for _ in range(0, args.reads, BLOCK):
            on += timed_reads(store, keysets, True, BLOCK)
            off += timed_reads(store, keysets, False, BLOCK)
        _internal.set_metrics_enabled(True)
        p50_on, p50_off = statistics.median(on), statistics.median(off)
        p99_on = statistics.quantiles(on, n=100)[98]
        p99_off = statistics.quantiles(off, n=100)[98]
        diff = (p50_on - p50_off) / p50_off * 100
        print(
            f"{n:>5} | {p50_on:>7.1f}us | {p50_off:>7.1f}us | {diff:>+6.1f}% | "
            f"{p99_on:>7.1f}us | {p99_off:>7.1f}us"
        )
    start = time.perf_counter_ns()
    scrapes = 100
    for _ in range(scrapes):
        prometheus_client.generate_latest()
    scrape_us = (time.perf_counter_ns() - start) / 1e3 / scrapes
    print(f"\none scrape of the default registry (generate_latest): {scrape_us:.0f} us")


if __name__ == "__main__":
    main()
