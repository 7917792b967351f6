#!/usr/bin/env python3
"""Many writers: concurrent 1-row pushes into one feature view, in the same run as Feast's
sqlite store, on local SQLite and PostgreSQL catalogs and on REST + S3.

    python bench/commits.py            # 100k-entity table, every backend
    python bench/commits.py --quick    # 10k entities, fewer pushes

Loads (every writer is a real process or thread calling `online_write_batch`, as a feature
server's `/push` or a stream job does):
  one pusher     1 process, sequential 1-row pushes: latency, and (ours) where a commit's time goes
  4 processes    4 processes x 1-row pushes at once: latency and aggregate pushes/s
  16 threads     16 threads of one process x 1-row pushes: rows/s committed, snapshots made
  8 mixed        7 pushing processes + 1 full materialization: lost updates and errors

Lost updates are counted by reading every key back: a pushed key must hold its newest push
(push timestamps are newer than the materialization's), every other key the materialization's
row. PostgreSQL and SeaweedFS are started by tests/servers.py (pip/apt, 127.0.0.1 only).
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import queue
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from contextlib import ExitStack
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "tests"))

BASE = datetime(2026, 1, 1, tzinfo=timezone.utc)
FEATURES = ["conv_rate", "acc_rate", "trips", "city"]


def view() -> Any:
    from feast import Entity, FeatureView, Field, FileSource
    from feast.types import Float32, Float64, Int64, String
    from feast.value_type import ValueType

    driver = Entity(name="driver", join_keys=["driver_id"], value_type=ValueType.INT64)
    return FeatureView(
        name="pushes",
        entities=[driver],
        ttl=timedelta(days=3650),
        schema=[
            Field(name="driver_id", dtype=Int64),
            Field(name="conv_rate", dtype=Float32),
            Field(name="acc_rate", dtype=Float64),
            Field(name="trips", dtype=Int64),
            Field(name="city", dtype=String),
        ],
        source=FileSource(name="pushes_src", path="unused.parquet", timestamp_field="ts"),
    )


def row(i: int, version: int, ts: datetime) -> Any:
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    key = EntityKey(join_keys=["driver_id"], entity_values=[Value(int64_val=i)])
    features = {
        "conv_rate": Value(float_val=float(version % 1000)),
        "acc_rate": Value(double_val=i + version / 1e6),
        "trips": Value(int64_val=version),
        "city": Value(string_val=f"c{i}"),
    }
    return (key, features, ts, ts)


def namespace(data: Path) -> str:
    """One namespace per repo, the same in every process (`hash` of a str is per process)."""
    return f"bench_{zlib.crc32(str(data).encode()):08x}"


def online_fields(store: str, data: Path) -> dict[str, Any]:
    if store == "sqlite":
        return {"type": "sqlite", "path": str(data / "online.db")}
    fields: dict[str, Any] = {"type": "feast_iceberg.IcebergOnlineStore"}
    if store == "iceberg-sqlite":
        fields |= {"uri": f"sqlite:///{data / 'catalog.db'}", "warehouse": str(data / "wh")}
    elif store == "iceberg-postgres":
        fields |= json.loads(os.environ["BENCH_PG"]) | {"warehouse": str(data / "wh")}
        fields["namespace"] = namespace(data)
    elif store == "iceberg-rest-s3":
        fields |= json.loads(os.environ["BENCH_REST_S3"])
        fields["namespace"] = namespace(data)
    else:
        raise ValueError(store)
    return fields


def repo_config(store: str, data: Path) -> Any:
    from feast.repo_config import RepoConfig

    return RepoConfig(
        project="bench",
        registry=str(data / "registry.db"),
        provider="local",
        online_store=online_fields(store, data),
        offline_store={"type": "file"},
        entity_key_serialization_version=3,
        repo_path=data,
    )


def online(store: str, data: Path) -> tuple[Any, Any]:
    config = repo_config(store, data)
    if store == "sqlite":
        from feast.infra.online_stores.sqlite import SqliteOnlineStore

        return config, SqliteOnlineStore()
    from feast_iceberg import IcebergOnlineStore

    return config, IcebergOnlineStore()


def setup(store: str, data: Path, entities: int) -> None:
    from feast import Entity
    from feast.value_type import ValueType

    config, s = online(store, data)
    driver = Entity(name="driver", join_keys=["driver_id"], value_type=ValueType.INT64)
    s.update(config, [], [view()], [], [driver], partial=False)
    v = view()
    for lo in range(0, entities, 50_000):
        hi = min(lo + 50_000, entities)
        s.online_write_batch(config, v, [row(i, 0, BASE) for i in range(lo, hi)], None)


def push_ts(process: int, seq: int) -> datetime:
    """Newer than any materialized row, and strictly increasing per (process, seq)."""
    return BASE + timedelta(days=1, seconds=seq, microseconds=process)


def warm_up(s: Any, config: Any, v: Any, key: int) -> None:
    """Connects and writes once before the clock starts. Feast's sqlite store can fail here
    with "database is locked" while 7 other processes warm up too: tried again (only timed
    pushes count errors)."""
    for attempt in range(20):
        try:
            s.online_write_batch(config, v, [row(key, 0, BASE)], None)
            return
        except Exception:
            if attempt == 19:
                raise
            time.sleep(0.1 * (attempt + 1))


def pusher(
    store: str, data: str, process: int, pushes: int, entities: int, start: float, out: Any
) -> None:
    """One pushing process: `pushes` sequential 1-row writes of random keys."""
    config, s = online(store, Path(data))
    v = view()
    rng = np.random.default_rng(process)
    keys = rng.integers(0, entities, pushes)
    warm_up(s, config, v, int(keys[0]))
    timings: list[dict[str, int]] = []
    if store != "sqlite":
        # Our write report (DEBUG record of the store) carries each commit's timings.
        class Grab(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                if record.args and isinstance(record.args, tuple) and len(record.args) > 1:
                    report = record.args[1]
                    if isinstance(report, dict) and "timings" in report:
                        timings.append(dict(report["timings"], attempts=report["attempts"]))

        log = logging.getLogger("feast_iceberg.online_store")
        log.setLevel(logging.DEBUG)
        log.addHandler(Grab())
    while time.time() < start:
        time.sleep(0.001)
    first = time.time()
    lat, errors, last = [], [], {}
    for n in range(pushes):
        k = int(keys[n])
        version = process * 1_000_000 + n + 1
        t0 = time.perf_counter()
        try:
            s.online_write_batch(config, v, [row(k, version, push_ts(process, n))], None)
        except Exception as e:  # counted; the bench goes on
            errors.append(type(e).__name__)
        else:
            last[k] = (push_ts(process, n).timestamp(), version)
        lat.append(time.perf_counter() - t0)
    out.put(
        {
            "lat": lat,
            "errors": errors,
            "last": last,
            "timings": timings,
            "first": first,
            "end": time.time(),
        }
    )


def materializer(store: str, data: str, entities: int, start: float, out: Any) -> None:
    """A full materialization into the same view: every entity, in Feast's 10k-row batches."""
    config, s = online(store, Path(data))
    v = view()
    while time.time() < start:
        time.sleep(0.001)
    t0 = time.perf_counter()
    errors = []
    for lo in range(0, entities, 10_000):
        rows = [row(i, 7, BASE + timedelta(hours=1)) for i in range(lo, min(lo + 10_000, entities))]
        try:
            s.online_write_batch(config, v, rows, None)
        except Exception as e:
            errors.append(type(e).__name__)
    out.put({"materialize_s": time.perf_counter() - t0, "errors": errors, "end": time.time()})


def run_processes(targets: list[tuple[Callable[..., None], tuple[Any, ...]]]) -> list[dict]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    start = time.time() + 8  # every process imported and connected by then
    procs = [ctx.Process(target=f, args=(*a, start, q)) for f, a in targets]
    for p in procs:
        p.start()
    results: list[dict] = []
    deadline = time.time() + 900
    while len(results) < len(procs):
        try:
            results.append(q.get(timeout=1))
        except queue.Empty:
            # A worker that died (an exception outside the timed loop) fails the run at once
            # rather than after the timeout.
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead or time.time() > deadline:
                for p in procs:
                    p.kill()
                raise RuntimeError(
                    f"bench workers failed (exit codes {dead}) or timed out"
                ) from None
    for p in procs:
        p.join(60)
    for r in results:
        r["start"] = start
    return results


def breakdown(timings: list[dict[str, int]]) -> dict[str, float]:
    """Median milliseconds of each phase of our commits (write reports' `timings`)."""
    if not timings:
        return {}
    return {
        k.removesuffix("_us"): float(np.median([t[k] for t in timings])) / 1000
        for k in timings[0]
        if k != "attempts"
    }


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values) * 1000, q)) if values else float("nan")


def lost_updates(
    store: str, data: Path, entities: int, pushed: dict[int, tuple[float, int]], materialized: bool
) -> int:
    """Keys not holding their newest write."""
    config, s = online(store, data)
    v = view()
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    keys = [
        EntityKey(join_keys=["driver_id"], entity_values=[Value(int64_val=i)])
        for i in range(entities)
    ]
    lost = 0
    for lo in range(0, entities, 5000):
        got = s.online_read(config, v, keys[lo : lo + 5000], ["trips"])
        for i, (_, feats) in enumerate(got, start=lo):
            want = pushed[i][1] if i in pushed else (7 if materialized else 0)
            have = None if feats is None else feats["trips"].int64_val
            lost += have != want
    return lost


def commit_count(store: str, config: Any) -> int | None:
    """Snapshots this process committed to the view's table (our metrics), None for sqlite."""
    if store == "sqlite":
        return None
    from feast_iceberg import _internal
    from feast_iceberg.online_store import table_name

    label = f"{config.online_store.namespace}.{table_name(config, view())}"
    table = _internal.metrics_snapshot()["tables"].get(label)
    return 0 if table is None else table["commits"]["committed"]


def bench_store(
    store: str, root: Path, entities: int, pushes: int, seconds: float
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    data = root / store
    data.mkdir(parents=True)

    def fresh(name: str) -> Path:
        d = data / name
        d.mkdir()
        t0 = time.perf_counter()
        setup(store, d, entities)
        out.setdefault("setup_s", time.perf_counter() - t0)
        return d

    # 1 pusher
    d = fresh("one")
    (r,) = run_processes([(pusher, (store, str(d), 0, pushes, entities))])
    out["one"] = {"p50": pct(r["lat"], 50), "p99": pct(r["lat"], 99), "errors": len(r["errors"])}
    if r["timings"]:
        # The first commit after warm-up pays for loading.
        out["one"]["breakdown_ms"] = breakdown(r["timings"][1:])
    # 4 processes
    d = fresh("four")
    rs = run_processes([(pusher, (store, str(d), p, pushes, entities)) for p in range(4)])
    lat = [x for r in rs for x in r["lat"]]
    # From the first push to the last (a process slow to start delays only its own).
    span = max(r["end"] for r in rs) - min(r["first"] for r in rs)
    last: dict[int, tuple[float, int]] = {}
    for r in rs:
        for k, tv in r["last"].items():
            if k not in last or tv > last[k]:
                last[k] = tv
    out["four"] = {
        "p50": pct(lat, 50),
        "p99": pct(lat, 99),
        "pushes_s": len(lat) / span,
        "errors": sum(len(r["errors"]) for r in rs),
        "lost": lost_updates(store, d, entities, last, False),
    }
    timings = [t for r in rs for t in r["timings"]]
    if timings:
        out["four"]["breakdown_ms"] = breakdown(timings)
        out["four"]["attempts_max"] = max(t["attempts"] for t in timings)
    # 16 threads
    d = fresh("threads")
    config, s = online(store, d)
    v = view()
    s.online_write_batch(config, v, [row(0, 0, BASE)], None)
    done = [0] * 16
    errs: list[str] = []
    stop = time.perf_counter() + seconds
    commits0 = commit_count(store, config)

    def thread(t: int) -> None:
        rng = np.random.default_rng(100 + t)
        n = 0
        while time.perf_counter() < stop:
            n += 1
            try:
                s.online_write_batch(
                    config, v, [row(int(rng.integers(0, entities)), n, push_ts(t, n))], None
                )
                done[t] += 1
            except Exception as e:
                errs.append(type(e).__name__)

    threads = [threading.Thread(target=thread, args=(t,)) for t in range(16)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    elapsed = time.perf_counter() - t0
    out["threads"] = {"rows_s": sum(done) / elapsed, "rows": sum(done), "errors": len(errs)}
    if commits0 is not None:
        commits = commit_count(store, config) - commits0
        out["threads"]["commits"] = commits
        out["threads"]["rows_per_commit"] = sum(done) / max(commits, 1)
    # 8 mixed
    d = fresh("mixed")
    rs = run_processes(
        [(pusher, (store, str(d), p, pushes // 2, entities)) for p in range(7)]
        + [(materializer, (store, str(d), entities))]
    )
    last = {}
    for r in rs:
        for k, tv in r.get("last", {}).items():
            if k not in last or tv > last[k]:
                last[k] = tv
    lat = [x for r in rs for x in r.get("lat", [])]
    out["mixed"] = {
        "p50": pct(lat, 50),
        "p99": pct(lat, 99),
        "errors": sorted({e for r in rs for e in r["errors"]}),
        "error_count": sum(len(r["errors"]) for r in rs),
        "materialize_s": next(r["materialize_s"] for r in rs if "materialize_s" in r),
        "lost": lost_updates(store, d, entities, last, True),
    }
    timings = [t for r in rs for t in r.get("timings", [])]
    if timings:
        out["mixed"]["breakdown_ms"] = breakdown(timings)
        out["mixed"]["attempts_max"] = max(t["attempts"] for t in timings)
    return out


def table(results: dict[str, dict[str, Any]]) -> str:
    stores = list(results)
    lines = ["| load | " + " | ".join(stores) + " |", "|---" * (len(stores) + 1) + "|"]

    def line(label: str, f: Callable[[dict[str, Any]], str]) -> None:
        cells = []
        for s in stores:
            try:
                cells.append(f(results[s]))
            except (KeyError, TypeError, StopIteration):
                cells.append("-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    line("1 pusher p50 / p99 ms", lambda r: f"{r['one']['p50']:.1f} / {r['one']['p99']:.1f}")
    line(
        "4 processes p50 / p99 ms",
        lambda r: f"{r['four']['p50']:.1f} / {r['four']['p99']:.1f}",
    )
    line("4 processes pushes/s", lambda r: f"{r['four']['pushes_s']:.0f}")
    line("4 processes lost / errors", lambda r: f"{r['four']['lost']} / {r['four']['errors']}")
    line("16 threads rows/s", lambda r: f"{r['threads']['rows_s']:.0f}")
    line(
        "16 threads commits / rows per commit",
        lambda r: f"{r['threads']['commits']} / {r['threads']['rows_per_commit']:.1f}",
    )
    line("8 mixed p50 / p99 ms", lambda r: f"{r['mixed']['p50']:.1f} / {r['mixed']['p99']:.1f}")
    line("8 mixed lost updates", lambda r: str(r["mixed"]["lost"]))
    line(
        "8 mixed errors",
        lambda r: f"{r['mixed']['error_count']} {','.join(r['mixed']['errors'])}".strip(),
    )
    line("8 mixed materialization s", lambda r: f"{r['mixed']['materialize_s']:.1f}")
    for load, label in [("one", "1 pusher"), ("four", "4 processes"), ("mixed", "8 mixed")]:
        line(
            f"{label} commit ms, median (state/plan/prepare/catalog/cleanup)",
            lambda r, load=load: " / ".join(f"{v:.1f}" for v in r[load]["breakdown_ms"].values()),
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument(
        "--stores",
        default="sqlite,iceberg-sqlite,iceberg-postgres,iceberg-rest-s3",
        help="comma-separated: sqlite (Feast's), iceberg-sqlite, iceberg-postgres, iceberg-rest-s3",
    )
    ap.add_argument("--entities", type=int)
    ap.add_argument("--pushes", type=int, help="pushes per process")
    args = ap.parse_args()
    entities = args.entities or (10_000 if args.quick else 100_000)
    pushes = args.pushes or (30 if args.quick else 60)
    seconds = 5.0 if args.quick else 10.0
    stores = args.stores.split(",")
    results: dict[str, dict[str, Any]] = {}
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="bench-commits-") as tmp:
        import servers

        if "iceberg-postgres" in stores:
            pg = servers.start_postgres()
            stack.callback(pg.close)
            os.environ["BENCH_PG"] = json.dumps(servers.postgres_online_store(pg))
        if "iceberg-rest-s3" in stores:
            sw = servers.start_seaweed()
            stack.callback(sw.close)
            os.environ["BENCH_REST_S3"] = json.dumps(servers.rest_s3_online_store(sw))
        out = BENCH / "results" / f"commits-{time.strftime('%Y%m%d-%H%M%S')}.json"
        out.parent.mkdir(exist_ok=True)
        for store in stores:
            print(f"== {store}", flush=True)
            results[store] = bench_store(store, Path(tmp), entities, pushes, seconds)
            print(json.dumps(results[store], indent=1), flush=True)
            # Saved after every store: a later store's failure keeps the earlier results.
            out.write_text(
                json.dumps({"entities": entities, "pushes": pushes, "results": results}, indent=1)
            )
    print(f"\n{entities} entities, {pushes} pushes per process, 16 threads for {seconds:.0f} s\n")
    print(table(results))
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
