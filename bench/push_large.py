"""Small pushes into a large table: 1-row and 10-row pushes into an N-row table (default 1M),
then 100-key reads after them. Merge-on-read pushes should cost the same whatever the table
size; the target is <= 50 ms for a 1-row push into 1M rows on a local warehouse.

    python3 bench/push_large.py                      # feast-iceberg, 1M entities
    python3 bench/push_large.py --entities 100000 --stores sqlite iceberg

Each store runs in this process one after the other, on a fresh temporary repo. Loading the
table goes through online_write_batch in chunks (copy-on-write, untimed). Prints one line per
metric and writes bench/results/push_large-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import workload
from worker import Repo, check_online_read, keys_for, latency, random_ids

BENCH = Path(__file__).resolve().parent
CHUNK = 100_000


def timed_pushes(repo: Repo, df: Any, rows: int, pushes: int, seed: int) -> tuple[dict, list]:
    """`pushes` writes of `rows` random rows of `df` (newer values); p50/p99 in ms."""
    rng = np.random.default_rng(seed)
    samples, pushed = [], []
    for _ in range(pushes):
        positions = rng.choice(len(df), rows, replace=False)
        batch = workload.write_rows(df.iloc[positions])
        pushed += [int(df[workload.JOIN_KEY].iat[p]) for p in positions]
        start = time.perf_counter_ns()
        repo.online.online_write_batch(repo.config, repo.view, batch, None)
        samples.append((time.perf_counter_ns() - start) / 1e6)
    p50, p99 = np.percentile(samples, [50, 99])
    return {"p50_ms": p50, "p99_ms": p99, "max_ms": max(samples), "n": pushes}, pushed


def run_store(store: str, root: Path, entities: int, pushes: int) -> dict[str, Any]:
    repo = Repo(store, root / store)
    base = workload.base_time()
    loaded = workload.frame(entities, 0, base)
    start = time.perf_counter()
    for lo in range(0, entities, CHUNK):
        repo.online.online_write_batch(
            repo.config, repo.view, workload.write_rows(loaded.iloc[lo : lo + CHUNK]), None
        )
        gc.collect()
    out: dict[str, Any] = {"load_seconds": time.perf_counter() - start}
    del loaded
    newer = workload.frame(entities, 1, base)
    # Warm the store like a long-running feature server: one read of 100 keys per bucket.
    warm = keys_for(random_ids(np.random.default_rng(1), entities, 20, 100))
    for keys in warm:
        repo.online.online_read(repo.config, repo.view, keys, workload.FEATURE_NAMES)
    out["push_1_row"], pushed_1 = timed_pushes(repo, newer, 1, pushes, seed=2)
    out["push_10_rows"], pushed_10 = timed_pushes(repo, newer, 10, pushes, seed=3)
    batches = keys_for(random_ids(np.random.default_rng(4), entities, 10 + 100, 100))

    def read(keys: list[Any]) -> Any:
        return repo.online.online_read(repo.config, repo.view, keys, workload.FEATURE_NAMES)

    for keys in batches:
        read(keys)
    out["online_read_100_after_pushes"] = latency(read, batches, 10)
    out["check"] = check_online_read(repo, newer, (pushed_1 + pushed_10)[:200])
    if store == "iceberg":
        table = f"{workload.PROJECT}_{workload.FEATURE_VIEW}_online"
        stats = repo.online._store(repo.config).stats(table)
        out["table"] = {k: stats[k] for k in ("records", "data_files", "delete_files")}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--entities", type=int, default=1_000_000)
    parser.add_argument("--pushes", type=int, default=100)
    parser.add_argument("--stores", nargs="+", default=["iceberg"], choices=["sqlite", "iceberg"])
    args = parser.parse_args()
    results: dict[str, Any] = {"entities": args.entities, "pushes": args.pushes}
    with tempfile.TemporaryDirectory(prefix="push-large-") as tmp:
        for store in args.stores:
            results[store] = run_store(store, Path(tmp), args.entities, args.pushes)
            r = results[store]
            print(
                f"{store}: load {r['load_seconds']:.0f} s; push 1 row p50/p99 "
                f"{r['push_1_row']['p50_ms']:.1f}/{r['push_1_row']['p99_ms']:.1f} ms; "
                f"push 10 rows {r['push_10_rows']['p50_ms']:.1f}/"
                f"{r['push_10_rows']['p99_ms']:.1f} ms; read 100 keys after pushes "
                f"{r['online_read_100_after_pushes']['p50_ms']:.2f}/"
                f"{r['online_read_100_after_pushes']['p99_ms']:.2f} ms; check {r['check']}; "
                f"{r.get('table', '')}",
                flush=True,
            )
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = BENCH / "results" / f"push_large-{stamp}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
