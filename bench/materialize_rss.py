"""Peak memory of one large `feast materialize`, per store configuration.

    python3 bench/materialize_rss.py --entities 5000000                     # Arrow engine
    python3 bench/materialize_rss.py --entities 1000000 --stores iceberg-arrow iceberg

Each configuration materializes the same parquet file (the benchmark's 10 features) once into an
empty table, in a fresh process, and reports rows/s and that process's peak RSS before and after
the materialization (before: Feast, pyarrow and the store loaded, the repo applied; the peak is
reset first, so it is the materialization's own). The parquet
file is written by this parent process, so generating the data does not count.

`--direct` adds a run that skips Feast's pipeline: the parquet file read into one pyarrow Table,
then the Arrow engine's write call alone, to separate the write path's memory from Feast's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import stores
import workload

BENCH = Path(__file__).resolve().parent


def _status_mb(key: str) -> float | None:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024  # kB
    return None


def start_measuring() -> float:
    """The current RSS, after resetting the peak (Linux: `5` > clear_refs resets VmHWM), so the
    peak read later belongs to the measured call, not to `feast apply` reading the source."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    current = _status_mb("VmRSS")
    return current if current is not None else peak_mb()


def peak_mb() -> float:
    peak = _status_mb("VmHWM")
    if peak is not None:
        return peak
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
    before = start_measuring()
    start, end = workload.window(0, workload.base_time())
    t0 = time.perf_counter()
    fs.materialize(start, end, feature_views=[workload.FEATURE_VIEW])
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "rss_mb_before": before, "peak_mb": peak_mb()}


def direct(root: Path, source: Path, chunk_rows: int | None) -> dict[str, object]:
    """The Arrow write path alone on a table already in memory."""
    import pyarrow.parquet as pq
    from feast import FeatureStore
    from feast_iceberg import _internal
    from feast_iceberg.engine import DEFAULT_CHUNK_ROWS, source_columns
    from feast_iceberg.online_store import table_name

    data = root / "data"
    data.mkdir(parents=True)
    (root / "feature_store.yaml").write_text(stores.feature_store_yaml("iceberg", data))
    fs = FeatureStore(repo_path=str(root))
    fs.apply(list(workload.feast_objects(source)))
    view = fs.get_feature_view(workload.FEATURE_VIEW)
    online = fs._get_provider().online_store
    table = pq.read_table(source)
    columns = source_columns(view)
    assert columns is not None
    before = start_measuring()
    t0 = time.perf_counter()
    _internal.write_arrow(
        online._store(fs.config),
        table_name(fs.config, view),
        table,
        chunk_rows=chunk_rows or DEFAULT_CHUNK_ROWS,
        **columns,
    )
    seconds = time.perf_counter() - t0
    return {
        "seconds": seconds,
        "rss_mb_before": before,
        "peak_mb": peak_mb(),
        "table_mb": table.nbytes / 2**20,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--entities", type=int, default=5_000_000)
    parser.add_argument(
        "--stores", nargs="*", default=["iceberg-arrow"], choices=sorted(stores.LABELS)
    )
    parser.add_argument("--chunk-rows", type=int, help="the Arrow engine's chunk_rows")
    parser.add_argument("--direct", action="store_true", help="also time the write call alone")
    parser.add_argument(
        "--child", nargs=3, metavar=("STORE", "ROOT", "SOURCE"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        store, root, source = args.child
        run = direct if store == "direct" else partial(child, store)
        print(json.dumps(run(Path(root), Path(source), args.chunk_rows)))
        return 0

    tmp = Path(tempfile.mkdtemp(prefix="feast-iceberg-rss-"))
    source = tmp / "source.parquet"
    workload.frame(args.entities, 0, workload.base_time()).to_parquet(source, index=False)
    print(f"{args.entities:,} rows x {len(workload.FEATURE_NAMES)} features, one materialization")
    for store in [*args.stores, *(["direct"] if args.direct else [])]:
        command = [sys.executable, str(BENCH / "materialize_rss.py"), "--child", store]
        command += [str(tmp / store), str(source)]
        if args.chunk_rows:
            command += ["--chunk-rows", str(args.chunk_rows)]
        done = subprocess.run(command, capture_output=True, text=True, cwd=BENCH)
        label = "write_arrow alone, table in memory" if store == "direct" else stores.LABELS[store]
        if done.returncode != 0:
            print(f"  {label}: FAILED (exit {done.returncode})")
            print(done.stderr[-2000:])
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        table_mb = f", Arrow table {r['table_mb']:,.0f} MB" if "table_mb" in r else ""
        print(
            f"  {label}: {args.entities / r['seconds']:,.0f} rows/s "
            f"({r['seconds']:.1f} s), peak RSS {r['peak_mb']:,.0f} MB "
            f"({r['rss_mb_before']:,.0f} MB before it{table_mb})"
        )
    shutil.rmtree(tmp, ignore_errors=True)  # the source and warehouses: GBs at 5M rows
    return 0


if __name__ == "__main__":
    sys.exit(main())
