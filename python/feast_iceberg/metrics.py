"""Prometheus metrics of every feast-iceberg store in the process.

The Rust core counts (relaxed atomic adds, a fixed-bucket histogram per table); this module
only turns one snapshot of those counters into metric families when Prometheus scrapes, so a
read costs no Python for its metrics. `register()` adds the collector to `prometheus_client`'s
default registry; the online store calls it when it builds its first store.

Feast's feature server (`feast serve --metrics`, Feast 0.67) does not serve a worker's
registry: it runs `prometheus_client` in multiprocess mode and a separate process serves the
metric files every worker writes. In that mode (`PROMETHEUS_MULTIPROC_DIR` set when
`prometheus_client` was imported, which importing `feast.metrics` does) `register()` also
starts a daemon thread that copies the snapshot into multiprocess metrics every
`MIRROR_SECONDS`, so the families appear there too, summed over the workers.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from itertools import accumulate

from prometheus_client import Counter, Gauge, Histogram, values
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import REGISTRY, Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

from . import _internal
from .reports import MetricsSnapshot

logger = logging.getLogger(__name__)

PREFIX = "feast_iceberg"


Scalar = CounterMetricFamily | GaugeMetricFamily


def _families() -> tuple[HistogramMetricFamily, dict[str, Scalar]]:
    """Every family this collector reports, empty: the read histogram, and the others by name
    without the prefix."""

    def counter(name: str, doc: str, *labels: str) -> CounterMetricFamily:
        return CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=list(labels))

    def gauge(name: str, doc: str, *labels: str) -> GaugeMetricFamily:
        return GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=list(labels))

    histogram = HistogramMetricFamily(
        f"{PREFIX}_online_read_seconds",
        "Time of one online read in the core (catalog check, lookups, encoding).",
        labels=["table"],
    )
    scalars: list[Scalar] = [
        counter("online_read_keys", "Entity keys asked for by online reads.", "table"),
        counter("online_read_errors", "Online reads that raised (timeouts included).", "table"),
        counter(
            "commits",
            "Commit attempts by outcome: committed, conflict (another writer won), unknown "
            "(the catalog's answer was lost), error.",
            "table",
            "outcome",
        ),
        counter("commit_retries", "Commits planned again after losing a race.", "table"),
        counter(
            "cleanup_failures",
            "Files that should have been deleted and were left as orphans "
            "(`feast-iceberg remove-orphans` removes them).",
            "table",
        ),
        gauge(
            "metadata_staleness_seconds",
            "Seconds since the catalog last confirmed the table state a store serves "
            "(the longest over the stores that have it cached).",
            "table",
        ),
        gauge("data_files", "Data files of the table's current snapshot.", "table"),
        gauge("delete_files", "Position-delete files of the table's current snapshot.", "table"),
        counter("cache_hits", "Block cache lookups that found the row group decoded."),
        counter("cache_misses", "Block cache lookups that had to fetch and decode."),
        counter("cache_evictions", "Row groups evicted from the block cache for its budget."),
        gauge("cache_bytes", "Decoded bytes held by the block caches."),
        gauge("cache_entries", "Row groups held by the block caches."),
        gauge("index_bytes", "Bytes of the per-file key indexes (outside the cache budget)."),
        counter(
            "storage_read_bytes",
            "Bytes read from storage, by kind: metadata (metadata.json, manifests), data "
            "(read to answer requests and for rewrites), prefetch (loaded in the background).",
            "kind",
        ),
        counter("storage_read_requests", "Read requests to storage, by kind.", "kind"),
        gauge("stores", "Live stores (one per catalog configuration) in this process."),
    ]
    return histogram, {f.name.removeprefix(f"{PREFIX}_"): f for f in scalars}


def _histogram(family: HistogramMetricFamily, snap: MetricsSnapshot) -> None:
    bounds = [floatToGoString(b) for b in snap["read_bucket_bounds"]] + ["+Inf"]
    for table, t in snap["tables"].items():
        cumulative = list(accumulate(t["read_buckets"]))
        family.add_metric(
            [table],
            buckets=list(zip(bounds, cumulative, strict=True)),
            sum_value=t["read_seconds"],
        )


def families(snap: MetricsSnapshot) -> Iterator[Metric]:
    """The metric families of one snapshot."""
    histogram, scalars = _families()
    fam = scalars.__getitem__
    _histogram(histogram, snap)
    for table, t in snap["tables"].items():
        fam("online_read_keys").add_metric([table], t["read_keys"])
        fam("online_read_errors").add_metric([table], t["read_errors"])
        for outcome, n in t["commits"].items():
            fam("commits").add_metric([table, outcome], n)
        fam("commit_retries").add_metric([table], t["commit_retries"])
        fam("cleanup_failures").add_metric([table], t["cleanup_failures"])
        # Absent while no live store has the table cached: a gauge that is not known.
        for gauge, value in (
            ("data_files", t["data_files"]),
            ("delete_files", t["delete_files"]),
            ("metadata_staleness_seconds", t["staleness_seconds"]),
        ):
            if value is not None:
                fam(gauge).add_metric([table], value)
    for name, total in (
        ("cache_hits", snap["cache_hits"]),
        ("cache_misses", snap["cache_misses"]),
        ("cache_evictions", snap["cache_evictions"]),
        ("cache_bytes", snap["cache_bytes"]),
        ("cache_entries", snap["cache_entries"]),
        ("index_bytes", snap["index_bytes"]),
        ("stores", snap["stores"]),
    ):
        fam(name).add_metric([], total)
    for kind, n in snap["storage_read_bytes"].items():
        fam("storage_read_bytes").add_metric([kind], n)
    for kind, n in snap["storage_read_requests"].items():
        fam("storage_read_requests").add_metric([kind], n)
    yield histogram
    yield from scalars.values()


class IcebergCollector(Collector):
    """Pulls one snapshot from the core per scrape."""

    def collect(self) -> Iterator[Metric]:
        return families(_internal.metrics_snapshot())

    def describe(self) -> Iterator[Metric]:
        # Names only: registering must not call into the core.
        histogram, scalars = _families()
        yield histogram
        yield from scalars.values()


# ---- multiprocess mode --------------------------------------------------------------------

MIRROR_SECONDS = 5.0

# How the metrics server combines a gauge over worker processes.
_GAUGE_MODES = {
    "metadata_staleness_seconds": "max",
    "data_files": "max",
    "delete_files": "max",
}

SeriesKey = tuple[str, tuple[object, ...]]


def multiprocess_mode() -> bool:
    """Whether `prometheus_client` keeps values in multiprocess files in this process."""
    return values.ValueClass is not values.MutexValue


class Mirror:
    """Copies snapshots into `prometheus_client` metrics, which in multiprocess mode live in
    this process's metric files. Counters advance by what moved since the last copy, starting
    from the counts at creation: a worker forked from a process that counted does not report
    its parent's counts again."""

    def __init__(self) -> None:
        self._metrics: dict[str, Counter | Gauge] = {}
        self._histogram: Histogram | None = None
        self._last: dict[SeriesKey, float] = {}
        self._advance(_internal.metrics_snapshot(), publish=False)

    def publish(self) -> None:
        self._advance(_internal.metrics_snapshot(), publish=True)

    def _moved(self, key: SeriesKey, total: float) -> float:
        delta = total - self._last.get(key, 0.0)
        self._last[key] = total
        return delta

    def _metric(self, family: Metric, labels: list[str]) -> Counter | Gauge:
        made = self._metrics.get(family.name)
        if made is None:
            # In no registry: the values reach the metrics server through the files, and the
            # default registry has the collector under the same names.
            if isinstance(family, CounterMetricFamily):
                made = Counter(family.name, family.documentation, labels, registry=None)
            else:
                mode = _GAUGE_MODES.get(family.name.removeprefix(f"{PREFIX}_"), "livesum")
                made = Gauge(
                    family.name,
                    family.documentation,
                    labels,
                    registry=None,
                    multiprocess_mode=mode,  # type: ignore[arg-type]
                )
            self._metrics[family.name] = made
        return made

    def _advance(self, snap: MetricsSnapshot, publish: bool) -> None:
        for family in families(snap):
            if isinstance(family, HistogramMetricFamily):
                continue
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                counter = isinstance(family, CounterMetricFamily)
                moved = self._moved(key, sample.value) if counter else 0.0
                if not publish:
                    continue
                metric = self._metric(family, sorted(sample.labels))
                child = metric.labels(**sample.labels) if sample.labels else metric
                if isinstance(child, Gauge):
                    child.set(sample.value)
                elif moved > 0:
                    child.inc(moved)
        for table, t in snap["tables"].items():
            buckets = [
                self._moved(("read_bucket", (table, str(i))), n)
                for i, n in enumerate(t["read_buckets"])
            ]
            seconds = self._moved(("read_sum", (table,)), t["read_seconds"])
            if publish and any(buckets):
                self._observe(snap, table, buckets, seconds)

    def _observe(
        self, snap: MetricsSnapshot, table: str, moved: list[float], seconds: float
    ) -> None:
        if self._histogram is None:
            histogram, _ = _families()
            self._histogram = Histogram(
                histogram.name,
                histogram.documentation,
                ["table"],
                registry=None,
                buckets=snap["read_bucket_bounds"],
            )
        # `observe` takes one value at a time; a snapshot brings counts per bucket, so they go
        # to the child's values directly (`_buckets` are per bucket, not cumulative, and
        # `_sum`: the same since prometheus_client 0.4).
        child = self._histogram.labels(table=table)
        for value, n in zip(child._buckets, moved, strict=True):
            if n > 0:
                value.inc(n)
        child._sum.inc(seconds)


_lock = threading.Lock()
_registered: list[CollectorRegistry] = []
_mirror_pid: int | None = None


def _mirror_forever(mirror: Mirror) -> None:
    while True:
        time.sleep(MIRROR_SECONDS)
        try:
            mirror.publish()
        except Exception:
            logger.exception("feast-iceberg: copying metrics to the multiprocess files failed")


def _start_mirror() -> None:
    """One mirror thread per process (a forked worker starts its own)."""
    global _mirror_pid
    if _mirror_pid == os.getpid() or not multiprocess_mode():
        return
    _mirror_pid = os.getpid()
    threading.Thread(
        target=_mirror_forever, args=(Mirror(),), name="feast-iceberg-metrics", daemon=True
    ).start()


def register(registry: CollectorRegistry = REGISTRY) -> bool:
    """Adds the collector to `registry` once per process; True if this call added it. A
    collector with the same names registered by someone else is left in place. In
    multiprocess mode, also starts copying the metrics to this process's metric files."""
    with _lock:
        if registry is REGISTRY:
            _start_mirror()
        if any(r is registry for r in _registered):
            return False
        try:
            registry.register(IcebergCollector())
        except ValueError as e:
            logger.debug("feast-iceberg metrics already in the registry: %s", e)
            return False
        _registered.append(registry)
        return True


__all__ = [
    "MIRROR_SECONDS",
    "IcebergCollector",
    "Mirror",
    "families",
    "multiprocess_mode",
    "register",
]
