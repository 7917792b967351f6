"""Benchmark: materializing with Spark and Ray into feast-iceberg, Feast's engines against ours.

    python3 bench/engines.py            # 300k entities x 10 features, 2 rounds, local[4] / 4 CPUs
    python3 bench/engines.py --quick    # 30k entities (a few minutes)

In one run, each in a process of its own (fresh temporary repo, file offline store, same data):
Feast's `spark.engine` and `IcebergSparkEngine` on `local[4]`, Feast's `ray.engine` and
`IcebergRayEngine` on a 4-CPU local Ray, then ours with 1, 2 and 4 workers (the scaling curve).
Round 1 materializes every entity into an empty table, round 2 newer values of every entity.
Measured: rows/s of each `feast materialize`, commits (new snapshots) per view per
materialization, and, read back from the table after the last round, the keys whose row is not
the newest value (0 expected), missing keys and live rows. The table goes to stdout, everything
to bench/results/engines-<timestamp>.json. Exit status 1 if a run failed or read back wrong.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import workload

BENCH = Path(__file__).resolve().parent
PROFILES = {"full": dict(entities=300_000, rounds=2), "quick": dict(entities=30_000, rounds=2)}
# (label, batch_engine type, workers); the first four are the comparison, the rest the curve.
RUNS = [
    ("feast spark.engine", "spark.engine", 4),
    ("IcebergSparkEngine", "feast_iceberg.IcebergSparkEngine", 4),
    ("feast ray.engine", "ray.engine", 4),
    ("IcebergRayEngine", "feast_iceberg.IcebergRayEngine", 4),
    ("IcebergSparkEngine", "feast_iceberg.IcebergSparkEngine", 1),
    ("IcebergSparkEngine", "feast_iceberg.IcebergSparkEngine", 2),
    ("IcebergRayEngine", "feast_iceberg.IcebergRayEngine", 1),
    ("IcebergRayEngine", "feast_iceberg.IcebergRayEngine", 2),
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="30k entities")
    parser.add_argument("--entities", type=int, help="override the number of entities")
    parser.add_argument("--rounds", type=int, help="override the number of materializations")
    parser.add_argument("--only", nargs="+", help="run only these engine types")
    parser.add_argument("--no-scaling", action="store_true", help="skip the 1/2-worker runs")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    # One run, in a process of its own (what the parent starts).
    parser.add_argument("--run", help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=4, help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    return parser.parse_args()


# ---- one run ---------------------------------------------------------------------------------


def feature_store_yaml(data: Path, engine: str, workers: int) -> str:
    lines = [
        f"project: {workload.PROJECT}",
        f"registry: {data / 'registry.db'}",
        "provider: local",
        "online_store:",
        "  type: feast_iceberg.IcebergOnlineStore",
        f"  uri: sqlite:///{data / 'iceberg_catalog.db'}",
        f"  warehouse: {data / 'iceberg_warehouse'}",
        # Every snapshot kept for the run, so its commits can be counted.
        "  snapshot_retention_count: 10000",
        "offline_store:",
        "  type: file",
        "entity_key_serialization_version: 3",
        "batch_engine:",
        f"  type: {engine}",
    ]
    if "ray" in engine.lower():
        # Feast's default is 1 (written for the sqlite store); ours stages that many tasks.
        lines.append(f"  write_concurrency: {workers}")
    return "\n".join(lines) + "\n"


def start_cluster(engine: str, workers: int) -> None:
    if "spark" in engine.lower():
        from pyspark.sql import SparkSession

        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        session = (
            SparkSession.builder.master(f"local[{workers}]")
            .config("spark.ui.enabled", "false")
            .config("spark.ui.showConsoleProgress", "false")
            .config("spark.driver.memory", "6g")
            .config("spark.sql.session.timeZone", "UTC")
            .getOrCreate()
        )
        session.sparkContext.setLogLevel("ERROR")
    else:
        import ray

        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)


def table_state(fs: Any) -> dict[str, Any]:
    from feast_iceberg.online_store import table_name

    online = fs._get_provider().online_store
    view = fs.get_feature_view(workload.FEATURE_VIEW)
    return dict(online._store(fs.config).stats(table_name(fs.config, view)))


def keys_off_newest(fs: Any, expected: pd.DataFrame) -> dict[str, int]:
    """Reads the whole table back and compares every key's row with its newest value."""
    from pyiceberg.catalog import load_catalog

    data = Path(fs.config.repo_path) / "data"
    catalog = load_catalog(
        "feast_catalog",
        type="sql",
        uri=f"sqlite:///{data / 'iceberg_catalog.db'}",
        warehouse=f"file://{data / 'iceberg_warehouse'}",
    )
    table = catalog.load_table(f"feast_online.{workload.PROJECT}_{workload.FEATURE_VIEW}_online")
    got = table.scan().to_arrow().to_pandas()
    merged = expected.merge(got, on=workload.JOIN_KEY, how="left", suffixes=("", "_got"))
    off = pd.Series(False, index=merged.index)
    for name in workload.FEATURE_NAMES:
        want, have = merged[name], merged[f"{name}_got"]
        if workload.FEATURES[name][0] == workload.Float32:
            want, have = want.astype(np.float32), have.astype(np.float32)
        off |= want.ne(have)
    event = pd.to_datetime(merged["event_ts"], utc=True)
    off |= event.ne(pd.to_datetime(merged["event_timestamp"], utc=True))
    return {
        "keys_off_newest": int(off.sum()),
        "missing_keys": int(merged["event_ts"].isna().sum()),
        "live_rows": len(got),
        "duplicate_keys": int(got[workload.JOIN_KEY].duplicated().sum()),
    }


def run_one(args: argparse.Namespace) -> dict[str, Any]:
    from feast import FeatureStore, FeatureView, FileSource

    engine, workers = args.run, args.workers
    spec = json.loads(args.spec)
    entities, rounds = spec["entities"], spec["rounds"]
    base = datetime.fromisoformat(spec["base"])
    data = Path(args.workdir) / "data"
    data.mkdir(parents=True)
    frames = [workload.frame(entities, r, base) for r in range(rounds)]
    source = data / "source.parquet"
    pd.concat(frames, ignore_index=True).to_parquet(source)
    (data.parent / "feature_store.yaml").write_text(feature_store_yaml(data, engine, workers))
    start_cluster(engine, workers)
    fs = FeatureStore(repo_path=str(data.parent))
    entity, view = workload.feast_objects(source)
    # A warm-up view over a small source: the cluster's first job (JVM, worker processes,
    # imports) is paid there, not in round 1.
    warm_source = data / "warmup.parquet"
    workload.frame(1000, 0, base).to_parquet(warm_source)
    warm = FeatureView(
        name="warmup",
        entities=[entity],
        ttl=view.ttl,
        schema=view.schema,
        source=FileSource(
            name="warmup_source",
            path=str(warm_source),
            timestamp_field="event_timestamp",
            created_timestamp_column="created",
        ),
    )
    fs.apply([entity, view, warm])
    fs.materialize(*workload.window(0, base), feature_views=["warmup"])
    result: dict[str, Any] = {"engine": engine, "workers": workers, "rounds": []}
    for r in range(rounds):
        before = table_state(fs)["snapshots"]
        start, end = workload.window(r, base)
        t0 = time.perf_counter()
        fs.materialize(start, end, feature_views=[workload.FEATURE_VIEW])
        seconds = time.perf_counter() - t0
        state = table_state(fs)
        result["rounds"].append(
            {
                "seconds": seconds,
                "rows_per_second": entities / seconds,
                "commits": state["snapshots"] - before,
                "data_files": state["data_files"],
                "delete_files": state["delete_files"],
                "data_bytes": state["data_bytes"],
            }
        )
        print(f"round {r}: {seconds:.1f} s, {result['rounds'][-1]}", flush=True)
    result["check"] = keys_off_newest(fs, frames[-1])
    result["finished"] = True
    return result


# ---- the parent ------------------------------------------------------------------------------


def launch(engine: str, workers: int, spec: dict[str, Any], root: Path, timeout: float) -> dict:
    name = f"{engine.replace('.', '_')}-{workers}"
    workdir, out, log_path = root / name, root / f"{name}.json", root / f"{name}.log"
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        *("--run", engine, "--workers", str(workers), "--spec", json.dumps(spec)),
        *("--workdir", str(workdir), "--out", str(out)),
    ]
    print(f"running {engine} with {workers} workers ... (log: {log_path})", flush=True)
    started = time.perf_counter()
    result: dict[str, Any] = {"engine": engine, "workers": workers}
    with log_path.open("w") as log:
        try:
            code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
            returncode: int | None = code.returncode
        except subprocess.TimeoutExpired:
            returncode = None
    if out.exists():
        result = json.loads(out.read_text())
    result["wall_seconds"] = time.perf_counter() - started
    if not result.get("finished"):
        tail = log_path.read_text().strip().splitlines()[-3:]
        result["error"] = f"exit {returncode}: " + " | ".join(tail)
    print(f"  done in {result['wall_seconds']:.1f} s", flush=True)
    return result


def rate(result: dict[str, Any], index: int) -> str:
    rounds = result.get("rounds", [])
    return f"{rounds[index]['rows_per_second']:,.0f}" if len(rounds) > index else "-"


def table(results: list[tuple[str, dict[str, Any]]]) -> str:
    head = [
        "engine",
        "workers",
        "rows/s round 1 (empty)",
        "rows/s round 2 (upsert)",
        "commits per view per materialization",
        "keys off newest",
        "missing / duplicate keys",
        "live rows",
        "data files / MB",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, r in results:
        check = r.get("check", {})
        rounds = r.get("rounds", [])
        commits = " / ".join(str(x["commits"]) for x in rounds) or "-"
        last = rounds[-1] if rounds else {}
        files = f"{last.get('data_files', '-')} / {last.get('data_bytes', 0) / 1e6:.1f}"
        row = [
            label if "error" not in r else f"{label} (FAILED: {r['error'][:120]})",
            str(r.get("workers")),
            rate(r, 0),
            rate(r, 1),
            commits,
            str(check.get("keys_off_newest", "-")),
            f"{check.get('missing_keys', '-')} / {check.get('duplicate_keys', '-')}",
            f"{check.get('live_rows', '-'):,}" if check else "-",
            files if rounds else "-",
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> int:
    args = parse_args()
    if args.run:
        Path(args.out).write_text(json.dumps(run_one(args), indent=2))
        return 0
    profile = "quick" if args.quick else "full"
    spec: dict[str, Any] = dict(PROFILES[profile])
    spec["entities"] = args.entities or spec["entities"]
    spec["rounds"] = max(1, args.rounds or spec["rounds"])
    spec["base"] = workload.base_time().isoformat()
    runs = RUNS[:4] if args.no_scaling else RUNS
    if args.only:
        runs = [r for r in runs if r[1] in args.only]
    print(
        f"feast-iceberg engines benchmark ({profile}): {spec['entities']:,} entities x "
        f"{len(workload.FEATURE_NAMES)} features, {spec['rounds']} materializations, "
        f"{os.cpu_count()} CPUs"
    )
    started = datetime.now(timezone.utc)
    root = Path(tempfile.mkdtemp(prefix="feast-iceberg-engines-"))
    results = [
        (label, launch(engine, workers, spec, root, args.timeout))
        for label, engine, workers in runs
    ]
    print()
    print(table(results))
    speedups = []
    for ours, feast in (
        ("IcebergSparkEngine", "feast spark.engine"),
        ("IcebergRayEngine", "feast ray.engine"),
    ):
        a = next((r for label, r in results if label == ours and r.get("workers") == 4), None)
        b = next((r for label, r in results if label == feast), None)
        if a and b and a.get("rounds") and b.get("rounds"):
            ratio = [
                x["rows_per_second"] / y["rows_per_second"]
                for x, y in zip(a["rounds"], b["rounds"], strict=False)
            ]
            speedups.append(f"{ours} / {feast}: " + " / ".join(f"{x:.1f}x" for x in ratio))
    if speedups:
        print("\nspeedup per round (target >= 4x): " + "; ".join(speedups))
    out_dir = BENCH / "results"
    out_dir.mkdir(exist_ok=True)
    out_file = out_dir / f"engines-{started:%Y%m%dT%H%M%SZ}.json"
    document = {
        "started": started.isoformat(),
        "profile": profile,
        "spec": spec,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "results": [dict(r, label=label) for label, r in results],
    }
    out_file.write_text(json.dumps(document, indent=2, default=str))
    print(f"\nresults: {out_file}; logs and repos in {root}")
    bad = [
        r
        for _, r in results
        if "error" in r
        or r.get("check", {}).get("keys_off_newest", 1)
        or r["check"]["missing_keys"]
    ]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
