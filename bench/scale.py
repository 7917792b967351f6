"""Benchmark at scale: point reads when the table is larger than the read cache, and writes.

    python3 bench/scale.py                  # 100k, 1M and 10M entities; Feast's sqlite store at 1M
    python3 bench/scale.py --quick          # 100k entities (sqlite at 100k), a few minutes
    python3 bench/scale.py --sizes 1000000 --sqlite-size 0
    python3 bench/scale.py --s3 --sizes 1000000    # feast-iceberg on REST + S3 (SeaweedFS)

Per size, feast-iceberg is loaded through the Arrow engine's core call (`write_arrow`, what
`IcebergArrowEngine` hands Feast's offline result to) in windows of 1M rows, one commit per
100k rows (as `online_write_batch_size: 100000` cuts a materialization), then a 1%
incremental is written. Reads run in a separate process (a fresh one per configuration), as a
feature server would: with the default config and with a block cache of 1/8 of the decoded
table. Then the reader runs while a writer process upserts 1% of the keys every few seconds.
Feast's sqlite store is filled through `online_write_batch` in 100k-row batches (how long it
took is printed) and read by its own process. Everything measured goes to
bench/results/scale-<timestamp>.json; the table to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import stores  # noqa: E402
import workload  # noqa: E402

WINDOW = 1_000_000
BATCH = 100_000
FEATURE_TYPES = {
    "f64_0": "DOUBLE",
    "f64_1": "DOUBLE",
    "f64_2": "DOUBLE",
    "i64_0": "INT64",
    "i64_1": "INT64",
    "i64_2": "INT64",
    "f32_0": "FLOAT",
    "f32_1": "FLOAT",
    "str_0": "STRING",
    "str_1": "STRING",
}


def arrow_rows(first: int, n: int, round_: int, base: datetime) -> pa.Table:
    """Rows for entity ids [first, first + n): the bench's 10 features, one event per entity."""
    rng = np.random.default_rng(first * 31 + round_)
    ids = np.arange(workload.FIRST_ID + first, workload.FIRST_ID + first + n, dtype=np.int64)
    ts = np.datetime64(base.replace(tzinfo=None), "us") + np.timedelta64(round_, "h")
    event = np.full(n, ts) + (np.arange(n) % 1800).astype("timedelta64[s]")
    columns: dict[str, Any] = {
        workload.JOIN_KEY: ids,
        "event_timestamp": pa.array(event, pa.timestamp("us", tz="UTC")),
        "created": pa.array(event, pa.timestamp("us", tz="UTC")),
    }
    for name, kind in FEATURE_TYPES.items():
        if kind == "DOUBLE":
            columns[name] = rng.random(n)
        elif kind == "INT64":
            columns[name] = rng.integers(0, 1 << 40, n, dtype=np.int64)
        elif kind == "FLOAT":
            columns[name] = rng.random(n, dtype=np.float32)
        else:
            columns[name] = pa.array(
                np.char.add("value-", rng.integers(0, 10**9, n).astype(str)), pa.string()
            )
    return pa.table(columns)


def iceberg_store(s3: bool) -> str:
    return "iceberg-rest-s3" if s3 else "iceberg"


def repo_for(store: str, root: Path) -> Path:
    from feast import FeatureStore

    data = root / "data"
    data.mkdir(parents=True)
    (root / "feature_store.yaml").write_text(stores.feature_store_yaml(store, data))
    fs = FeatureStore(repo_path=str(root))
    fs.apply(list(workload.feast_objects(data / "source.parquet")))
    return root


def core_store(root: Path) -> Any:
    from feast import FeatureStore

    fs = FeatureStore(repo_path=str(root))
    online = fs._get_provider().online_store
    return online._store(fs.config), f"{workload.PROJECT}_{workload.FEATURE_VIEW}_online"


def write_arrow(core: Any, table: str, rows: pa.Table, chunk_rows: int = WINDOW) -> dict:
    from feast_iceberg import _internal

    return _internal.write_arrow(
        core,
        table,
        rows,
        join_keys=[(workload.JOIN_KEY, workload.JOIN_KEY)],
        features=[(f, f) for f in FEATURE_TYPES],
        event_ts="event_timestamp",
        created_ts="created",
        chunk_rows=chunk_rows,
    )


def load_iceberg(root: Path, n: int, base: datetime) -> dict[str, Any]:
    core, table = core_store(root)
    windows = []
    t_all = time.perf_counter()
    for first in range(0, n, WINDOW):
        rows = arrow_rows(first, min(WINDOW, n - first), 0, base)
        t0 = time.perf_counter()
        # 100k rows a commit, as Feast's `online_write_batch_size` would cut it.
        write_arrow(core, table, rows, chunk_rows=BATCH)
        windows.append(rows.num_rows / (time.perf_counter() - t0))
    total = time.perf_counter() - t_all
    # 1% incremental: updates of keys spread over the whole table, a newer round.
    update = incremental(n, 1, base)
    t0 = time.perf_counter()
    report = write_arrow(core, table, update)
    inc_s = time.perf_counter() - t0
    stats = core.stats(table)
    files = list((root / "data" / "iceberg_warehouse").rglob("*.parquet"))
    if files:
        sample = pq.read_table(max(files, key=lambda p: p.stat().st_size))
        decoded = sample.nbytes / max(sample.num_rows, 1) * n
    else:
        # A remote warehouse: the offline rows plus the entity-key column the table adds
        # (about the size of the key's proto, and a 64-bit offset).
        key_bytes = len(workload.entity_key(workload.FIRST_ID).SerializeToString()) + 8
        decoded = (rows.nbytes / max(rows.num_rows, 1) + key_bytes) * n
    return {
        "load_seconds": total,
        "window_rows_per_s": windows,
        "incremental_rows": update.num_rows,
        "incremental_rows_per_s": update.num_rows / inc_s,
        "incremental_report": report,
        "data_files": stats["data_files"],
        "delete_files": stats["delete_files"],
        "data_bytes": stats["data_bytes"],
        "decoded_bytes_estimate": int(decoded),
    }


def incremental(n: int, round_: int, base: datetime, fraction: float = 0.01) -> pa.Table:
    rng = np.random.default_rng(round_)
    m = max(1, int(n * fraction))
    ids = np.sort(rng.choice(n, m, replace=False))
    fresh = arrow_rows(0, m, round_, base)
    key = pa.array(ids + workload.FIRST_ID, pa.int64())
    return fresh.set_column(0, workload.JOIN_KEY, key)


def load_sqlite(root: Path, n: int, base: datetime) -> dict[str, Any]:
    from feast import FeatureStore

    fs = FeatureStore(repo_path=str(root))
    online = fs._get_provider().online_store
    view = fs.get_feature_view(workload.FEATURE_VIEW)
    t0 = time.perf_counter()
    for first in range(0, n, 100_000):
        df = arrow_rows(first, min(100_000, n - first), 0, base).to_pandas()
        online.online_write_batch(fs.config, view, workload.write_rows(df), None)
    return {"load_seconds": time.perf_counter() - t0}


# ---- the reader process ----------------------------------------------------------------------


def reader_main(spec: dict[str, Any]) -> None:
    from feast import FeatureStore

    root = Path(spec["repo"])
    if spec.get("read_cache_bytes") is not None:
        yaml = (root / "feature_store.yaml").read_text()
        extra = f"  read_cache_bytes: {spec['read_cache_bytes']}\n"
        yaml = yaml.replace("offline_store:\n", extra + "offline_store:\n", 1)
        (root / "feature_store.yaml").write_text(yaml)
    fs = FeatureStore(repo_path=str(root))
    online = fs._get_provider().online_store
    view = fs.get_feature_view(workload.FEATURE_VIEW)
    config = fs.config
    n = spec["entities"]
    rng = np.random.default_rng(spec["seed"])

    def keys(size: int, calls: int) -> list[list[Any]]:
        ids = rng.integers(0, n, (calls, size)) + workload.FIRST_ID
        return [[workload.entity_key(int(i)) for i in row] for row in ids]

    def read(ks: list[Any]) -> Any:
        return online.online_read(config, view, ks, workload.FEATURE_NAMES)

    def timed(batches: list[list[Any]], seconds: float | None = None) -> list[float]:
        out = []
        deadline = None if seconds is None else time.monotonic() + seconds
        for ks in batches:
            t0 = time.perf_counter_ns()
            read(ks)
            out.append((time.perf_counter_ns() - t0) / 1e6)
            if deadline is not None and time.monotonic() > deadline:
                break
        return out

    core = online._store(config) if hasattr(online, "_store") else None
    # Warm-up: the first touch of each file's footer, and the page cache of the OS.
    read(keys(100, 1)[0])
    for ks in keys(100, spec["warmup"]):
        read(ks)
    if core is not None:
        core.io_stats(reset=True)
    one = timed(keys(1, spec["iters_1"]))
    hundred = timed(keys(100, spec["iters_100"]))
    result: dict[str, Any] = {
        "read_1": pct(one),
        "read_100": pct(hundred),
        "rss_mb": peak_rss_mb(),
    }
    if core is not None:
        io = core.io_stats()
        result["io"] = io
        misses = max(io["cache_misses"], 1)
        result["bytes_per_miss"] = io["data_bytes"] / misses
        result["requests_per_miss"] = io["data_requests"] / misses
        result["index_bytes_per_key"] = io["index_bytes"] / max(io["index_rows"], 1)
        lookups = io["cache_hits"] + io["cache_misses"]
        result["hit_ratio"] = io["cache_hits"] / max(lookups, 1)
    if spec.get("during_writes"):
        # Tell the parent we are ready, then read while its writer process upserts.
        print("READY", flush=True)
        sys.stdin.readline()
        one_w = timed(keys(1, 50_000), seconds=spec["during_writes"] / 2)
        hundred_w = timed(keys(100, 5_000), seconds=spec["during_writes"] / 2)
        result["during_writes_1"] = pct(one_w)
        result["during_writes_100"] = pct(hundred_w)
    print("RESULT " + json.dumps(result, default=str), flush=True)


def peak_rss_mb() -> float:
    """This process's peak RSS. Not `ru_maxrss`: that keeps the peak of the parent's memory the
    child was forked with (GBs of Arrow tables at 10M), whatever the child later uses."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pct(samples: list[float]) -> dict[str, float]:
    p50, p99 = np.percentile(samples, [50, 99])
    return {"p50_ms": float(p50), "p99_ms": float(p99), "n": len(samples)}


def run_reader(spec: dict[str, Any], writer: dict[str, Any] | None = None) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--reader", json.dumps(spec)]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdin is not None
    writes: list[float] = []
    for line in proc.stdout:
        if line.startswith("READY") and writer is not None:
            writes = upsert_while_reading(proc, writer)
        elif line.startswith("RESULT "):
            proc.wait()
            result = json.loads(line[len("RESULT ") :])
            if writes:
                result["writes_during"] = len(writes)
                result["write_seconds"] = writes
            return result
    proc.wait()
    raise RuntimeError(f"reader exited with {proc.returncode} and no result")


def upsert_while_reading(reader: subprocess.Popen, writer: dict[str, Any]) -> list[float]:
    """Starts a writer process that upserts 1% of the keys every `interval` seconds for as
    long as the reader reads; returns the writer's per-write seconds."""
    cmd = [sys.executable, __file__, "--writer", json.dumps(writer)]
    w = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert reader.stdin is not None and w.stdout is not None
    time.sleep(0.5)
    reader.stdin.write("go\n")
    reader.stdin.flush()
    out, _ = w.communicate()
    for line in out.splitlines():
        if line.startswith("WRITES "):
            return json.loads(line[len("WRITES ") :])
    return []


def writer_main(spec: dict[str, Any]) -> None:
    core, table = core_store(Path(spec["repo"]))
    base = datetime.fromisoformat(spec["base"])
    deadline = time.monotonic() + spec["seconds"]
    seconds = []
    round_ = 10
    while time.monotonic() < deadline:
        rows = incremental(spec["entities"], round_, base)
        t0 = time.perf_counter()
        write_arrow(core, table, rows)
        seconds.append(time.perf_counter() - t0)
        round_ += 1
        time.sleep(spec["interval"])
    print("WRITES " + json.dumps(seconds), flush=True)


# ---- the run -----------------------------------------------------------------------------


def bench_size(n: int, root: Path, base: datetime, quick: bool, s3: bool) -> dict[str, Any]:
    repo = repo_for(iceberg_store(s3), root / f"iceberg-{n}")
    print(f"[{n:,}] loading feast-iceberg ...", file=sys.stderr, flush=True)
    load = load_iceberg(repo, n, base)
    iters = dict(iters_1=300 if quick else 2000, iters_100=100 if quick else 500, warmup=20)
    spec = {"repo": str(repo), "entities": n, "seed": 7, **iters}
    out: dict[str, Any] = {"load": load}
    print(f"[{n:,}] reading, default config ...", file=sys.stderr, flush=True)
    out["default"] = run_reader(spec)
    eighth = max(load["decoded_bytes_estimate"] // 8, 1 << 20)
    print(f"[{n:,}] reading, cache {eighth / 2**20:.0f} MiB ...", file=sys.stderr, flush=True)
    out["eighth"] = run_reader({**spec, "read_cache_bytes": eighth})
    out["eighth"]["cache_budget"] = eighth
    seconds = 20 if quick else 40
    print(f"[{n:,}] reading while writing ...", file=sys.stderr, flush=True)
    out["writes"] = run_reader(
        {**spec, "during_writes": seconds},
        writer={
            "repo": str(repo),
            "entities": n,
            "base": base.isoformat(),
            "seconds": seconds,
            "interval": 3.0,
        },
    )
    return out


def bench_sqlite(n: int, root: Path, base: datetime, quick: bool) -> dict[str, Any]:
    repo = repo_for("sqlite", root / f"sqlite-{n}")
    print(f"[{n:,}] loading Feast's sqlite store ...", file=sys.stderr, flush=True)
    load = load_sqlite(repo, n, base)
    iters = dict(iters_1=300 if quick else 2000, iters_100=100 if quick else 500, warmup=20)
    reads = run_reader({"repo": str(repo), "entities": n, "seed": 7, **iters})
    return {"load": load, "default": reads}


def fmt(r: dict[str, Any] | None, key: str) -> str:
    if not r or key not in r:
        return "-"
    return f"{r[key]['p50_ms']:.3f} / {r[key]['p99_ms']:.3f}"


def table(results: dict[str, Any]) -> str:
    lines = [
        "| store, entities, config | 1 key p50 / p99 ms | 100 keys p50 / p99 ms | reader RSS MB "
        "| index B/key | hit ratio | bytes, requests per miss |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results["sizes"].items():
        for label, key in (("default", "default"), ("cache 1/8", "eighth")):
            x = r[key]
            budget = f" ({x['cache_budget'] / 2**20:.0f} MiB)" if "cache_budget" in x else ""
            lines.append(
                f"| ours, {name}, {label}{budget} | {fmt(x, 'read_1')} | {fmt(x, 'read_100')} "
                f"| {x['rss_mb']:.0f} | {x.get('index_bytes_per_key', 0):.2f} "
                f"| {x.get('hit_ratio', 0):.2f} "
                f"| {x.get('bytes_per_miss', 0) / 1024:.1f} KiB, "
                f"{x.get('requests_per_miss', 0):.2f} |"
            )
        w = r["writes"]
        lines.append(
            f"| ours, {name}, during 1% writes every 3 s ({w.get('writes_during', 0)} writes) "
            f"| {fmt(w, 'during_writes_1')} | {fmt(w, 'during_writes_100')} | - | - | - | - |"
        )
    if results.get("sqlite"):
        s = results["sqlite"]
        lines.append(
            f"| Feast sqlite, {s['entities']:,} | {fmt(s['default'], 'read_1')} "
            f"| {fmt(s['default'], 'read_100')} | {s['default']['rss_mb']:.0f} | - | - | - |"
        )
    lines.append("")
    lines.append(
        "| load | seconds | rows/s per 1M window (100k-row commits) | 1% incremental rows/s "
        "| files |"
    )
    lines.append("|---|---|---|---|---|")
    for name, r in results["sizes"].items():
        ld = r["load"]
        rates = ", ".join(f"{x / 1000:.0f}k" for x in ld["window_rows_per_s"])
        lines.append(
            f"| ours, {name} | {ld['load_seconds']:.1f} | {rates} "
            f"| {ld['incremental_rows_per_s'] / 1000:.0f}k ({ld['incremental_rows']:,} rows) "
            f"| {ld['data_files']} data + {ld['delete_files']} delete |"
        )
    if results.get("sqlite"):
        s = results["sqlite"]
        lines.append(
            f"| Feast sqlite, {s['entities']:,} | {s['load']['load_seconds']:.1f} "
            f"| {s['entities'] / s['load']['load_seconds'] / 1000:.1f}k | - | - |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sizes", type=int, nargs="+")
    parser.add_argument("--sqlite-size", type=int)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument(
        "--s3", action="store_true", help="feast-iceberg on REST + S3 (SeaweedFS, started here)"
    )
    parser.add_argument("--reader", help=argparse.SUPPRESS)
    parser.add_argument("--writer", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reader:
        reader_main(json.loads(args.reader))
        return 0
    if args.writer:
        writer_main(json.loads(args.writer))
        return 0
    sizes = args.sizes or ([100_000] if args.quick else [100_000, 1_000_000, 10_000_000])
    sqlite_size = args.sqlite_size
    if sqlite_size is None:
        sqlite_size = 100_000 if args.quick else 1_000_000
    base = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)
    base -= timedelta(days=1)
    root = Path(tempfile.mkdtemp(prefix="feast-iceberg-scale-"))
    results: dict[str, Any] = {"sizes": {}, "started": time.time()}
    servers_up = ExitStack()
    try:
        if args.s3 and stores.REST_S3_ENV not in os.environ:
            from run import seaweed_for_bench

            servers_up.enter_context(seaweed_for_bench())
        results["store"] = iceberg_store(args.s3)
        for n in sizes:
            results["sizes"][f"{n:,}"] = bench_size(n, root, base, args.quick, args.s3)
            shutil.rmtree(root / f"iceberg-{n}", ignore_errors=True)
        if sqlite_size:
            results["sqlite"] = {
                "entities": sqlite_size,
                **bench_sqlite(sqlite_size, root, base, args.quick),
            }
    finally:
        servers_up.close()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    out_dir = BENCH / "results"
    out_dir.mkdir(exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    (out_dir / f"scale-{stamp}.json").write_text(json.dumps(results, indent=2, default=str))
    print(table(results))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("FEAST_USAGE", "False")
    sys.exit(main())
