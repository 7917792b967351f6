"""Benchmark: feast-iceberg vs Feast's sqlite online store, side by side, in one run.

    python3 bench/run.py            # 100k entities x 10 features, 10 materializations
    python3 bench/run.py --quick    # 10k entities, 3 materializations, fewer iterations (< 2 min)

Each store runs in its own process (bench/worker.py) on fresh temporary Feast repos with the same
keys and values. The table goes to stdout, everything measured to bench/results/<timestamp>.json.
A store that fails shows its error in its column; the other store's numbers are still printed.
Exit status 1 if any store failed or read back wrong values (missed targets do not fail the run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import report
import stores
import workload

BENCH = Path(__file__).resolve().parent

# iters_*: timed calls of online_read with 1 / 100 keys and of get_online_features with 100 keys.
PROFILES = {
    "full": dict(entities=100_000, rounds=10, iters_1=1000, iters_100=200, iters_gof=200),
    "quick": dict(entities=10_000, rounds=3, iters_1=200, iters_100=50, iters_gof=50),
}
WARMUP = 10


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small run for CI-like checks")
    parser.add_argument("--entities", type=int, help="override the number of entities")
    parser.add_argument("--rounds", type=int, help="override the number of materializations")
    parser.add_argument(
        "--stores",
        nargs="+",
        default=["sqlite", "iceberg", "iceberg-arrow"],
        choices=sorted(stores.LABELS),
    )
    parser.add_argument("--timeout", type=float, help="seconds per store (default 150 / 3600)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary repos and logs")
    return parser.parse_args()


@contextmanager
def seaweed_for_bench() -> Iterator[None]:
    """SeaweedFS (S3 + Iceberg REST) for the REST + S3 column, started like the tests do and
    handed to the workers through the environment only."""
    sys.path.insert(0, str(BENCH.parent / "tests"))
    import servers

    sw = servers.start_seaweed()
    os.environ[stores.REST_S3_ENV] = json.dumps(servers.rest_s3_online_store(sw))
    print(f"SeaweedFS: S3 {sw.s3_endpoint}, REST catalog {sw.iceberg_uri}", flush=True)
    try:
        yield
    finally:
        del os.environ[stores.REST_S3_ENV]
        sw.close()


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for dist in ("feast", "feast-iceberg", "pyiceberg", "pyarrow", "pandas", "protobuf"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = None
    return found


def run_worker(store: str, spec: dict[str, Any], root: Path, timeout: float) -> dict[str, Any]:
    """Run one store's worker; whatever it measured before failing is kept."""
    workdir = root / store
    workdir.mkdir()
    out = root / f"{store}.json"
    log_path = root / f"{store}.log"
    command = [
        sys.executable,
        str(BENCH / "worker.py"),
        *("--store", store, "--spec", json.dumps(spec)),
        *("--out", str(out), "--workdir", str(workdir)),
    ]
    print(f"running {stores.LABELS[store]} ... (log: {log_path})", flush=True)
    started = time.perf_counter()
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
        try:
            returncode = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            returncode = None
    elapsed = time.perf_counter() - started
    result: dict[str, Any] = {"store": store, "errors": {}}
    if out.exists():
        result = json.loads(out.read_text())
    result["wall_seconds"] = elapsed
    result["log"] = str(log_path)
    if returncode is None:
        result["errors"]["timeout"] = f"killed after {timeout:.0f} s"
    elif not result.get("finished"):
        tail = log_path.read_text().strip().splitlines()[-3:]
        result["errors"]["process"] = f"exit code {returncode}: " + " | ".join(tail)
    print(f"  done in {elapsed:.1f} s", flush=True)
    return result


def failed(results: dict[str, dict[str, Any]]) -> bool:
    return any(
        r.get("errors") or (report.check(r) or "").startswith("FAILED") for r in results.values()
    )


def main() -> int:
    args = parse_args()
    profile = "quick" if args.quick else "full"
    spec: dict[str, Any] = {**PROFILES[profile], "warmup": WARMUP}
    spec["entities"] = args.entities or spec["entities"]
    spec["rounds"] = max(2, args.rounds or spec["rounds"])
    spec["base"] = workload.base_time().isoformat()
    timeout = args.timeout or (150.0 if args.quick else 3600.0)
    started = datetime.now(timezone.utc)
    print(
        f"feast-iceberg benchmark ({profile}): {spec['entities']:,} entities x "
        f"{len(workload.FEATURE_NAMES)} features, {spec['rounds']} materializations, "
        f"{os.cpu_count()} CPUs"
    )

    root = Path(tempfile.mkdtemp(prefix="feast-iceberg-bench-"))
    with ExitStack() as servers_up:
        if "iceberg-rest-s3" in args.stores and stores.REST_S3_ENV not in os.environ:
            servers_up.enter_context(seaweed_for_bench())
        results = {store: run_worker(store, spec, root, timeout) for store in args.stores}

    print()
    print(report.table(spec, results))
    curve = report.storage_curve(results)
    if curve:
        print("\nbytes and files on disk after each materialization:")
        print("\n".join(curve))
    lines = report.targets(spec, results)
    if lines:
        print("\nDESIGN.md targets, this run:")
        print("\n".join(lines))
    problems = report.errors(results)
    if problems:
        print("\nerrors:")
        print("\n".join(f"  {p}" for p in problems))

    out_dir = BENCH / "results"
    out_dir.mkdir(exist_ok=True)
    out_file = out_dir / f"{started:%Y%m%dT%H%M%SZ}.json"
    document = {
        "started": started.isoformat(),
        "profile": profile,
        "spec": spec,
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
        },
        "versions": versions(),
        "reference_not_measured": report.REFERENCE,
        "results": results,
    }
    out_file.write_text(json.dumps(document, indent=2, default=str))
    print(f"\nresults: {out_file}")

    if args.keep or problems:
        print(f"temporary repos and worker logs kept in {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if failed(results) else 0


if __name__ == "__main__":
    sys.exit(main())
