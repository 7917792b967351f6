"""Reads while a large rewrite runs: are they held up behind the write's CPU work?

    python3 bench/rewrite_reads.py              # REST catalog + S3 (SeaweedFS, started here)
    python3 bench/rewrite_reads.py --local      # SQLite catalog + local warehouse

One store, two tables: `big` (rewritten whole by one upsert, copy-on-write) and `small`
(read, one key per read, with a block cache too small to hold anything, so every read fetches
a row group from storage). Reads are timed idle, then while `big` is rewritten in another
thread. On object storage a read needs one of the runtime's two async workers to see its HTTP
response; a write that decodes, merges and encodes on those workers holds it up.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pyarrow as pa
from feast.protos.feast.types.EntityKey_pb2 import EntityKey
from feast.protos.feast.types.Value_pb2 import Value
from feast_iceberg import _internal
from feast_iceberg.config import IcebergOnlineStoreConfig

BENCH = Path(__file__).resolve().parent
FEATURES = [f"f{i}" for i in range(10)]


def key(i: int) -> bytes:
    return EntityKey(join_keys=["id"], entity_values=[Value(int64_val=i)]).SerializeToString()


def rows(n: int, version: int) -> pa.Table:
    columns: dict[str, Any] = {"id": pa.array(range(n), pa.int64())}
    for j, f in enumerate(FEATURES):
        columns[f] = pa.array([i * 0.5 + j + version for i in range(n)], pa.float64())
    columns["ts"] = pa.array([1_700_000_000_000_000 + version] * n, pa.timestamp("us", "UTC"))
    return pa.table(columns)


def upsert(store: _internal.Store, table: str, n: int, version: int) -> dict[str, Any]:
    return dict(
        _internal.write_arrow(
            store,
            table,
            rows(n, version),
            [("id", "id")],
            [(f, f) for f in FEATURES],
            "ts",
        )
    )


def timed_reads(store: _internal.Store, n: int, until: threading.Event | int) -> list[float]:
    """Latencies (ms) of one-key reads of `small`: `until` reads, or until the event is set."""
    samples: list[float] = []
    while (len(samples) < until) if isinstance(until, int) else not until.is_set():
        k = key(random.randrange(n))
        start = time.perf_counter()
        store.read("small", [k])
        samples.append((time.perf_counter() - start) * 1e3)
    return samples


def summary(samples: list[float]) -> str:
    q = statistics.quantiles(samples, n=100)
    return (
        f"{len(samples):>6} | {statistics.median(samples):>7.1f} | {q[98]:>7.1f} | "
        f"{max(samples):>7.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--local", action="store_true", help="SQLite + local files, no S3")
    parser.add_argument("--big", type=int, default=300_000, help="rows of the rewritten table")
    parser.add_argument("--small", type=int, default=20_000)
    parser.add_argument("--rewrites", type=int, default=2)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="feast-iceberg-rewrite-reads-"))
    with ExitStack() as stack:
        if args.local:
            fields: dict[str, Any] = {
                "uri": f"sqlite:///{root / 'catalog.db'}",
                "warehouse": str(root / "warehouse"),
            }
        else:
            sys.path.insert(0, str(BENCH.parent / "tests"))
            import servers

            sw = servers.start_seaweed()
            stack.callback(sw.close)
            fields = {**servers.rest_s3_online_store(sw), "namespace": "rewrite_reads"}
        config = IcebergOnlineStoreConfig(
            **fields, partition_count=2, read_cache_bytes=1, metadata_refresh_seconds=60
        )
        store = _internal.Store(config.to_store_json(root, 3))
        for table in ("big", "small"):
            store.ensure_table(table, [("id", 4)], [(f, 5) for f in FEATURES])
        upsert(store, "big", args.big, 0)
        upsert(store, "small", args.small, 0)
        timed_reads(store, args.small, 50)

        where = "SQLite + local" if args.local else "REST + S3 (SeaweedFS)"
        print(f"{where}: reads of 1 key of {args.small:,}, rewrites of {args.big:,} rows")
        print("             reads |  p50 ms |  p99 ms |  max ms")
        print(f"idle        {summary(timed_reads(store, args.small, 300))}")
        during: list[float] = []
        write_seconds: list[float] = []
        for version in range(1, args.rewrites + 1):
            done = threading.Event()

            def rewrite(version: int = version, done: threading.Event = done) -> None:
                start = time.perf_counter()
                upsert(store, "big", args.big, version)
                write_seconds.append(time.perf_counter() - start)
                done.set()

            writer = threading.Thread(target=rewrite)
            writer.start()
            during += timed_reads(store, args.small, done)
            writer.join()
        print(f"rewriting   {summary(during)}")
        print(f"rewrite of {args.big:,} rows: {json.dumps([round(s, 2) for s in write_seconds])} s")


if __name__ == "__main__":
    main()
