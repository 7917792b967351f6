"""Benchmark: `get_online_features` over a feature service of 5 views x 10 features against one
view x 10 features, 1 and 100 keys, in a steady loop (the garbage collector left on), for
Feast's sqlite store and feast-iceberg in one run.

    python3 bench/views.py            # 10k entities, up to 2000 calls (10 s) per cell
    python3 bench/views.py --quick    # 2k entities, up to 400 calls (2 s) per cell

feast-iceberg runs three times: answering each request whole (`read_request`: one Rust call
encodes the whole response); with that off, after Feast's own preparation of the request, all
views in one Rust call (`read_views`, what requests with on-demand views get); and with both
off, through Feast's per-view path (one `online_read` per view, the response built in Python).
Targets (issue 14): 5-view p99 <= 1.5x the 1-view p99, and 100 keys over 5 views p99 <= 5 ms.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import report
import stores
import workload
from feast import FeatureService, FeatureStore, FeatureView, Field
from feast_iceberg import IcebergOnlineStore
from worker import latency, random_ids

VIEWS = 5
PROFILES = {
    "full": dict(entities=10_000, calls=2000, seconds=10.0),
    "quick": dict(entities=2_000, calls=400, seconds=2.0),
}
WARMUP = 20
CELLS = [(1, 1), (1, 100), (VIEWS, 1), (VIEWS, 100)]  # (views, keys)
COLUMNS = {
    "sqlite": "Feast sqlite store",
    "iceberg-feast": "feast-iceberg, Feast's per-view path",
    "iceberg-views": "feast-iceberg, Feast's preparation + read_views",
    "iceberg": "feast-iceberg, whole request",
}


def repo(store: str, path: Path, entities: int) -> tuple[FeatureStore, dict[int, FeatureService]]:
    """A Feast repo with VIEWS views of the workload's 10 features over one source, and a
    service of the first view and one of all of them."""
    data = path / "data"
    data.mkdir(parents=True)
    (path / "feature_store.yaml").write_text(stores.feature_store_yaml(store, data))
    fs = FeatureStore(repo_path=str(path))
    source_path = data / "source.parquet"
    base = workload.base_time()
    workload.frame(entities, 0, base).to_parquet(source_path)
    entity, template = workload.feast_objects(source_path)
    views = [
        FeatureView(
            name=f"view_{i}",
            entities=[entity],
            ttl=timedelta(days=7),
            schema=[Field(name=f.name, dtype=f.dtype) for f in template.schema],
            source=template.batch_source,
            online=True,
        )
        for i in range(VIEWS)
    ]
    services = {n: FeatureService(name=f"views_{n}", features=views[:n]) for n in (1, VIEWS)}
    fs.apply([entity, *views, *services.values()])
    start, end = workload.window(0, base)
    fs.materialize(start, end)
    return fs, {n: fs.get_feature_service(f"views_{n}") for n in services}


def measure(
    fs: FeatureStore, services: dict[int, FeatureService], profile: dict[str, Any]
) -> dict[tuple[int, int], dict[str, float]]:
    rng = np.random.default_rng(14)
    out = {}
    for views, keys in CELLS:
        service = services[views]

        def call(ids: list[int], service: FeatureService = service) -> Any:
            rows = [{workload.JOIN_KEY: i} for i in ids]
            return fs.get_online_features(
                features=service, entity_rows=rows, full_feature_names=True
            )

        # Calls within the cell's time budget, from a short probe.
        probe = random_ids(rng, profile["entities"], WARMUP, keys)
        started = time.perf_counter()
        for ids in probe:
            call(ids)
        per_call = (time.perf_counter() - started) / WARMUP
        calls = int(min(profile["calls"], max(100, profile["seconds"] / per_call)))
        inputs = random_ids(rng, profile["entities"], WARMUP + calls, keys)
        out[views, keys] = latency(call, inputs, WARMUP)
    return out


def check_same(fs: FeatureStore, services: dict[int, FeatureService]) -> None:
    """Every path answers as Feast's per-view path does (a sanity check; tests/test_views.py
    covers the shapes)."""
    rows = [{workload.JOIN_KEY: i} for i in (*workload.entity_ids(50).tolist(), -1)]
    request = {"features": services[VIEWS], "entity_rows": rows, "full_feature_names": True}
    with off("read_request", "read_views"):
        theirs = fs.get_online_features(**request).proto
    with off("read_request"):
        views = fs.get_online_features(**request).proto
    if not fs.get_online_features(**request).proto == views == theirs:
        raise SystemExit("feast-iceberg's one-call reads differ from Feast's per-view path")


class off:
    """Within it, feast-iceberg's `read_request` and/or `read_views` leave every request to
    Feast's path."""

    def __init__(self, *hooks: str) -> None:
        self.hooks = hooks

    def __enter__(self) -> None:
        self.saved: dict[str, Callable[..., Any]] = {}
        for hook in self.hooks:
            self.saved[hook] = getattr(IcebergOnlineStore, hook)
            declined = None if hook == "read_request" else False
            setattr(IcebergOnlineStore, hook, lambda self, request, d=declined: d)

    def __exit__(self, *exc: object) -> None:
        for hook, saved in self.saved.items():
            setattr(IcebergOnlineStore, hook, saved)


def table(results: dict[str, dict[tuple[int, int], dict[str, float]]]) -> list[str]:
    header = ["views x features, keys", *(f"{COLUMNS[c]} p50 / p99 ms" for c in results)]
    body = [
        [f"{views} x 10, {keys}", *(report.pair(results[c][views, keys]) or "-" for c in results)]
        for views, keys in CELLS
    ]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

    def render(row: list[str]) -> str:
        return "| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " |"

    return [render(header), render(["-" * w for w in widths]), *map(render, body)]


def targets(ours: dict[tuple[int, int], dict[str, float]]) -> list[str]:
    lines = []
    for keys in (1, 100):
        ratio = ours[VIEWS, keys]["p99_ms"] / ours[1, keys]["p99_ms"]
        verdict = "met" if ratio <= 1.5 else "MISSED"
        lines.append(f"{keys} key(s): 5-view p99 / 1-view p99 = {ratio:.2f} (<= 1.5: {verdict})")
    p99 = ours[VIEWS, 100]["p99_ms"]
    lines.append(
        f"100 keys over 5 views: p99 {p99:.2f} ms (<= 5 ms: {'met' if p99 <= 5 else 'MISSED'})"
    )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small run (about a minute)")
    profile = PROFILES["quick" if parser.parse_args().quick else "full"]
    results: dict[str, dict[tuple[int, int], dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-views-") as tmp:
        fs, services = repo("sqlite", Path(tmp) / "sqlite", profile["entities"])
        results["sqlite"] = measure(fs, services, profile)
        fs, services = repo("iceberg", Path(tmp) / "iceberg", profile["entities"])
        check_same(fs, services)
        with off("read_request", "read_views"):
            results["iceberg-feast"] = measure(fs, services, profile)
        with off("read_request"):
            results["iceberg-views"] = measure(fs, services, profile)
        results["iceberg"] = measure(fs, services, profile)
    print(f"get_online_features, {profile['entities']:,} entities, full_feature_names, GC on")
    print("\n".join(table(results)))
    print("\n".join(targets(results["iceberg"])))


if __name__ == "__main__":
    main()
