"""Peak memory of one large `feast materialize`, per store configuration.

    python3 bench/materialize_rss.py --entities 5000000                     # Arrow engine
    python3 bench/materialize_rss.py --entities 1000000 --stores iceberg-arrow iceberg

Each configuration materializes the same parquet file (the benchmark's 10 features) once into an
empty table, in a fresh process, and reports rows/s and that process's peak RSS before and after
the materialization (before: Feast, pyarrow and the store loaded, the repo applied). The parquet
file is written by this parent process, so generating the data does not count.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import stores
import workload

BENCH = Path(__file__).resolve().parent


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(store: str, root: Path, source: Path, chunk_rows: int | None) -> dict[str, object]:
    from feast import FeatureStore

    data = root / "data"
    data.mkdir(parents=True)
    yaml = stores.feature_store_yaml(store, data)
    if chunk_rows and store == "iceberg-arrow":
        yaml += f"  chunk_rows: {chunk_rows}\n"
    (root / "feature_store.yaml").write_text(yaml)
    fs = FeatureStore(repo_path=str(root))
    fs.apply(list(workload.feast_objects(source)))
    before = peak_mb()
    start, end = workload.window(0, workload.base_time())
    t0 = time.perf_counter()
    fs.materialize(start, end, feature_views=[workload.FEATURE_VIEW])
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_mb_before": before, "peak_mb": peak_mb()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--entities", type=int, default=5_000_000)
    parser.add_argument(
        "--stores", nargs="+", default=["iceberg-arrow"], choices=sorted(stores.LABELS)
    )
    parser.add_argument("--chunk-rows", type=int, help="the Arrow engine's chunk_rows")
    parser.add_argument(
        "--child", nargs=3, metavar=("STORE", "ROOT", "SOURCE"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        store, root, source = args.child
        print(json.dumps(child(store, Path(root), Path(source), args.chunk_rows)))
        return 0

    tmp = Path(tempfile.mkdtemp(prefix="feast-iceberg-rss-"))
    source = tmp / "source.parquet"
    workload.frame(args.entities, 0, workload.base_time()).to_parquet(source, index=False)
    print(f"{args.entities:,} rows x {len(workload.FEATURE_NAMES)} features, one materialization")
    for store in args.stores:
        command = [sys.executable, str(BENCH / "materialize_rss.py"), "--child", store]
        command += [str(tmp / store), str(source)]
        if args.chunk_rows:
            command += ["--chunk-rows", str(args.chunk_rows)]
        done = subprocess.run(command, capture_output=True, text=True, cwd=BENCH)
        if done.returncode != 0:
            print(f"  {stores.LABELS[store]}: FAILED (exit {done.returncode})")
            print(done.stderr[-2000:])
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(
            f"  {stores.LABELS[store]}: {args.entities / r['seconds']:,.0f} rows/s "
            f"({r['seconds']:.1f} s), peak RSS {r['peak_mb']:,.0f} MB "
            f"({r['peak_mb_before']:,.0f} MB before materializing)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
