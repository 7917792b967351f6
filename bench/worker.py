"""One store's measurements, in a process of its own (bench/run.py starts one per store).

A process per store keeps the RSS numbers apart and lets a crash in one store leave the other's
results intact. Results are flushed to the JSON file after every section.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import resource
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import stores
import workload
from feast import FeatureStore
from feast.type_map import feast_value_type_to_python_type


class Results:
    """The worker's JSON output, rewritten after every section."""

    def __init__(self, path: Path, store: str) -> None:
        self.path = path
        self.data: dict[str, Any] = {"store": store, "errors": {}, "tracebacks": {}}
        self.flush()

    def __setitem__(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.flush()

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        try:
            yield
        except Exception as exc:
            self.data["errors"][name] = f"{type(exc).__name__}: {exc}"
            self.data["tracebacks"][name] = traceback.format_exc()
            traceback.print_exc()
        finally:
            self.flush()

    def flush(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        tmp.replace(self.path)


class Repo:
    """A fresh Feast repo in `path` with the benchmark's feature view applied."""

    def __init__(self, store: str, path: Path) -> None:
        self.data_dir = path / "data"
        self.data_dir.mkdir(parents=True)
        self.source = self.data_dir / "source.parquet"
        (path / "feature_store.yaml").write_text(stores.feature_store_yaml(store, self.data_dir))
        self.fs = FeatureStore(repo_path=str(path))
        self.fs.apply(list(workload.feast_objects(self.source)))
        self.view = self.fs.get_feature_view(workload.FEATURE_VIEW)
        self.online = self.fs._get_provider().online_store
        self.config = self.fs.config


def latency(call: Callable[[Any], Any], inputs: Sequence[Any], warmup: int) -> dict[str, float]:
    """p50/p99/mean in ms of `call(x)` for each input after `warmup` untimed calls."""
    for x in inputs[:warmup]:
        call(x)
    gc.collect()
    samples = []
    for x in inputs[warmup:]:
        start = time.perf_counter_ns()
        call(x)
        samples.append((time.perf_counter_ns() - start) / 1e6)
    p50, p99 = np.percentile(samples, [50, 99])
    return {"p50_ms": p50, "p99_ms": p99, "mean_ms": float(np.mean(samples)), "n": len(samples)}


def random_ids(rng: np.random.Generator, n_entities: int, calls: int, size: int) -> list[list[int]]:
    ids = workload.entity_ids(n_entities)
    return [[int(i) for i in rng.choice(ids, size, replace=False)] for _ in range(calls)]


def keys_for(batches: list[list[int]]) -> list[list[Any]]:
    return [[workload.entity_key(i) for i in ids] for ids in batches]


def check_online_read(repo: Repo, df: Any, ids: list[int]) -> dict[str, int]:
    keys = [workload.entity_key(i) for i in ids]
    result = repo.online.online_read(repo.config, repo.view, keys, workload.FEATURE_NAMES)
    wrong = 0
    for entity_id, (_, values) in zip(ids, result, strict=False):
        got = {k: feast_value_type_to_python_type(v) for k, v in (values or {}).items()}
        wrong += not workload.matches(workload.expected_values(df, entity_id), got)
    return {"checked": len(ids), "wrong_or_missing": wrong + abs(len(result) - len(ids))}


def read_latencies(repo: Repo, spec: dict[str, Any], seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    warmup, n = spec["warmup"], spec["entities"]
    # Keys are built before timing: this measures the store, not EntityKey construction.
    singles = keys_for(random_ids(rng, n, warmup + spec["iters_1"], 1))
    batches = keys_for(random_ids(rng, n, warmup + spec["iters_100"], 100))

    def online_read(keys: list[Any]) -> Any:
        return repo.online.online_read(repo.config, repo.view, keys, workload.FEATURE_NAMES)

    # Warm means every cache a store has is filled: read all batches once before timing, so
    # no timed single-key read lands on a file no earlier read touched.
    for keys in batches:
        online_read(keys)
    return {
        "online_read_1": latency(online_read, singles, warmup),
        "online_read_100": latency(online_read, batches, warmup),
    }


def bench_writes(results: Results, store: str, root: Path, spec: dict[str, Any]) -> Repo:
    repo = Repo(store, root / "write")
    base = datetime.fromisoformat(spec["base"])
    writes = {}
    # Round 0 into the empty table, then round 1 (same keys, newer values) over it.
    for label, round_ in (("insert", 0), ("upsert", 1)):
        rows = workload.write_rows(workload.frame(spec["entities"], round_, base))
        gc.collect()
        start = time.perf_counter()
        repo.online.online_write_batch(repo.config, repo.view, rows, None)
        seconds = time.perf_counter() - start
        writes[label] = {"rows": len(rows), "seconds": seconds, "rows_per_s": len(rows) / seconds}
        results["online_write_batch"] = writes
        del rows
    return repo


def bench_reads(results: Results, repo: Repo, spec: dict[str, Any]) -> None:
    reads = read_latencies(repo, spec, seed=7)
    results["read"] = reads

    rng = np.random.default_rng(8)
    batches = random_ids(rng, spec["entities"], spec["warmup"] + spec["iters_gof"], 100)
    refs = [f"{workload.FEATURE_VIEW}:{name}" for name in workload.FEATURE_NAMES]

    def get_online_features(ids: list[int]) -> Any:
        rows = [{workload.JOIN_KEY: i} for i in ids]
        return repo.fs.get_online_features(features=refs, entity_rows=rows).to_dict()

    reads["get_online_features_100"] = latency(get_online_features, batches, spec["warmup"])
    latest = workload.frame(spec["entities"], 1, datetime.fromisoformat(spec["base"]))
    reads["check"] = check_online_read(repo, latest, batches[0])
    response = get_online_features(batches[0])
    wrong = sum(
        not workload.matches(
            workload.expected_values(latest, entity_id),
            {name: response[name][i] for name in workload.FEATURE_NAMES},
        )
        for i, entity_id in enumerate(batches[0])
    )
    reads["check_get_online_features"] = {"checked": len(batches[0]), "wrong_or_missing": wrong}
    results["read"] = reads


def bench_scaling(results: Results, repo: Repo, spec: dict[str, Any]) -> None:
    """online_read of 100 keys from 1 and from 4 threads: does the store release the GIL?"""
    rng = np.random.default_rng(11)
    batches = keys_for(random_ids(rng, spec["entities"], spec["iters_100"] * 2, 100))

    def read(keys: list[Any]) -> Any:
        return repo.online.online_read(repo.config, repo.view, keys, workload.FEATURE_NAMES)

    def calls_per_s(threads: int) -> float:
        start = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(read, batches))
        return len(batches) / (time.perf_counter() - start)

    calls_per_s(1)  # warm-up
    one, four = calls_per_s(1), calls_per_s(4)
    results["scaling"] = {"threads_1": one, "threads_4": four, "speedup": four / one}


def bench_pushes(results: Results, repo: Repo, spec: dict[str, Any]) -> None:
    """100 small pushes of 10 rows with newer values (like `push`), then reads again."""
    base = datetime.fromisoformat(spec["base"])
    newer = workload.frame(spec["entities"], 2, base)
    rng = np.random.default_rng(12)
    pushed: list[int] = []
    samples = []
    for _ in range(100):
        positions = rng.choice(spec["entities"], 10, replace=False)
        rows = workload.write_rows(newer.iloc[positions])
        pushed += [int(newer[workload.JOIN_KEY].iat[p]) for p in positions]
        start = time.perf_counter_ns()
        repo.online.online_write_batch(repo.config, repo.view, rows, None)
        samples.append((time.perf_counter_ns() - start) / 1e6)
    p50, p99 = np.percentile(samples, [50, 99])
    results["pushes"] = {
        "push_10_rows": {"p50_ms": p50, "p99_ms": p99, "n": len(samples)},
        **read_latencies(repo, spec, seed=13),
        "check": check_online_read(repo, newer, pushed[:100]),
    }


def bench_cold_read(results: Results, store: str, repo: Repo, spec: dict[str, Any]) -> None:
    """One key read by a store with nothing cached: latency and what it read from storage."""
    if not store.startswith("iceberg"):
        return
    from feast_iceberg import IcebergOnlineStore

    ids = [int(i) for i in workload.entity_ids(spec["entities"])[:: spec["entities"] // 5]]
    out = []
    for entity_id in ids:
        cold = IcebergOnlineStore()  # a new core: no metadata, manifests or files cached
        core = cold._store(repo.config)
        start = time.perf_counter_ns()
        cold.online_read(repo.config, repo.view, [workload.entity_key(entity_id)])
        ms = (time.perf_counter_ns() - start) / 1e6
        first = core.io_stats(reset=True)
        # Metadata now cached, the data file of another key's bucket not yet: what a lookup in
        # a bucket nobody read costs (the background load of the first file counts apart).
        other = workload.entity_key(entity_id + 1)
        start = time.perf_counter_ns()
        cold.online_read(repo.config, repo.view, [other])
        warm_md_ms = (time.perf_counter_ns() - start) / 1e6
        second = core.io_stats()
        out.append(
            {
                "ms": ms,
                **first,
                "warm_metadata_ms": warm_md_ms,
                "warm_metadata_data_requests": second["data_requests"],
                "warm_metadata_data_bytes": second["data_bytes"],
            }
        )
    table = f"{workload.PROJECT}_{workload.FEATURE_VIEW}_online"
    results["cold_read"] = {
        "runs": out,
        "ms": float(np.median([r["ms"] for r in out])),
        "data_bytes": float(np.median([r["data_bytes"] for r in out])),
        "data_requests": float(np.median([r["data_requests"] for r in out])),
        "metadata_bytes": float(np.median([r["metadata_bytes"] for r in out])),
        "metadata_requests": float(np.median([r["metadata_requests"] for r in out])),
        "warm_metadata_ms": float(np.median([r["warm_metadata_ms"] for r in out])),
        "warm_metadata_data_requests": float(
            np.median([r["warm_metadata_data_requests"] for r in out])
        ),
        "warm_metadata_data_bytes": float(np.median([r["warm_metadata_data_bytes"] for r in out])),
        "table_data_bytes": repo.online._store(repo.config).stats(table)["data_bytes"],
    }


def bench_materialize(results: Results, store: str, root: Path, spec: dict[str, Any]) -> None:
    repo = Repo(store, root / "materialize")
    base = datetime.fromisoformat(spec["base"])
    out: dict[str, Any] = {"runs": []}
    results["materialize"] = out
    last = spec["rounds"] - 1
    first_ids = [int(i) for i in workload.entity_ids(min(100, spec["entities"]))]
    for round_ in range(spec["rounds"]):
        df = workload.frame(spec["entities"], round_, base)
        df.to_parquet(repo.source, index=False)
        start, end = workload.window(round_, base)
        gc.collect()
        t0 = time.perf_counter()
        repo.fs.materialize(start, end, feature_views=[workload.FEATURE_VIEW])
        seconds = time.perf_counter() - t0
        size, files = stores.disk_usage(store, repo.data_dir)
        out["runs"].append(
            {
                "rows": len(df),
                "seconds": seconds,
                "rows_per_s": len(df) / seconds,
                "bytes": size,
                "files": files,
            }
        )
        if round_ in (0, last):
            label = "after_1" if round_ == 0 else "after_n"
            out[label] = {
                "materializations": round_ + 1,
                "storage": stores.storage(store, repo.data_dir),
                **read_latencies(repo, spec, seed=9 + round_),
                "check": check_online_read(repo, df, first_ids),
            }
        results["materialize"] = out


def rss() -> dict[str, float | None]:
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    current = None
    with contextlib.suppress(ImportError):
        import psutil

        current = psutil.Process(os.getpid()).memory_info().rss / 2**20
    return {"peak_mb": peak_kb / 1024, "current_mb": current}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--store", required=True, choices=sorted(stores.LABELS))
    parser.add_argument("--spec", required=True, help="JSON: entities, rounds, iterations, base")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--workdir", required=True, type=Path)
    args = parser.parse_args()
    spec = json.loads(args.spec)
    results = Results(args.out, args.store)

    repo = None
    if args.store in stores.MATERIALIZE_ONLY:
        with results.section("materialize"):
            bench_materialize(results, args.store, args.workdir, spec)
        results["rss"] = rss()
        results["finished"] = True
        return
    with results.section("online_write_batch"):
        repo = bench_writes(results, args.store, args.workdir, spec)
    with results.section("read"):
        if repo is None:
            raise RuntimeError("skipped: the write repo could not be set up")
        bench_reads(results, repo, spec)
    with results.section("scaling"):
        if repo is not None:
            bench_scaling(results, repo, spec)
    with results.section("cold_read"):
        if repo is not None:
            bench_cold_read(results, args.store, repo, spec)
    with results.section("pushes"):
        if repo is not None:
            bench_pushes(results, repo, spec)
    with results.section("materialize"):
        bench_materialize(results, args.store, args.workdir, spec)
    results["rss"] = rss()
    results["finished"] = True


if __name__ == "__main__":
    main()
