"""Turns the workers' JSON into the comparison table and the target check."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import stores

# DESIGN.md section 6: Feast's contrib Iceberg store, 100k int64 entities x 10 features, 2 cores.
# Measured elsewhere, not by this script; printed only for the same workload size.
REFERENCE = {
    "label": "contrib Iceberg (reference, DESIGN.md)",
    "entities": 100_000,
    "rounds": 10,
    "cells": {
        "write_insert": "9,818",
        "materialize_first": "5,876",
        "read_1": "34 / 38",
        "read_100": "689 / 757",
        "rows_n": "1,000,000",
        "bytes_1": "7.9 MB",
        "bytes_n": "77.7 MB",
        "read_1_n": "156 / 254",
        "read_100_n": "3,937 / 5,015",
    },
}

ERROR_WIDTH = 48


def dig(data: dict[str, Any], *path: str) -> Any:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def rate(value: Any) -> str | None:
    return None if value is None else f"{value:,.0f}"


def pair(stats: Any) -> str | None:
    if not stats:
        return None
    return f"{fmt_ms(stats['p50_ms'])} / {fmt_ms(stats['p99_ms'])}"


def fmt_ms(ms: float) -> str:
    return f"{ms:,.0f}" if ms >= 100 else f"{ms:.2f}" if ms < 10 else f"{ms:.1f}"


def size(value: Any) -> str | None:
    return None if value is None else f"{value / 1e6:,.1f} MB"


def count(value: Any) -> str | None:
    return None if value is None else f"{value:,}"


def first_run_rate(result: dict[str, Any]) -> float | None:
    runs = dig(result, "materialize", "runs") or []
    return runs[0]["rows_per_s"] if runs else None


def later_runs_mean(result: dict[str, Any]) -> float | None:
    runs = dig(result, "materialize", "runs") or []
    later = [run["rows_per_s"] for run in runs[1:]]
    return sum(later) / len(later) if later else None


def speedup(scaling: dict[str, Any] | None) -> str | None:
    if not scaling:
        return None
    return f"{scaling['threads_4']:,.0f} ({scaling['speedup']:.1f}x)"


def warm_metadata_io(cold: dict[str, Any] | None) -> str | None:
    if not cold or "warm_metadata_ms" not in cold:
        return None
    return (
        f"{fmt_ms(cold['warm_metadata_ms'])}; {cold['warm_metadata_data_bytes'] / 1e3:,.0f} "
        f"({cold['warm_metadata_data_requests']:.0f})"
    )


def cold_io(cold: dict[str, Any] | None) -> str | None:
    if not cold:
        return None
    return (
        f"{cold['metadata_bytes'] / 1e3:,.0f} ({cold['metadata_requests']:.0f}) / "
        f"{cold['data_bytes'] / 1e3:,.0f} ({cold['data_requests']:.0f}) "
        f"of {cold['table_data_bytes'] / 1e6:,.1f} MB"
    )


def check(result: dict[str, Any]) -> str | None:
    checks = [
        dig(result, "read", "check"),
        dig(result, "read", "check_get_online_features"),
        dig(result, "materialize", "after_1", "check"),
        dig(result, "materialize", "after_n", "check"),
        dig(result, "pushes", "check"),
    ]
    done = [c for c in checks if c]
    if not done:
        return None
    wrong = sum(c["wrong_or_missing"] for c in done)
    total = sum(c["checked"] for c in done)
    return f"{total - wrong}/{total} ok" if wrong == 0 else f"FAILED: {wrong}/{total} wrong"


def at(formatter: Callable[[Any], str | None], *path: str) -> Callable[[dict], str | None]:
    """A cell: the value at `path` in one store's result, formatted."""
    return lambda result: formatter(dig(result, *path))


def rows(spec: dict[str, Any]) -> list[tuple[str, str, str, Callable[[dict], str | None]]]:
    """(label, reference cell key, worker section, one store's result -> cell text or None)."""
    n = spec["rounds"]
    write, read, mat = "online_write_batch", "read", "materialize"
    after_1, after_n = (mat, "after_1"), (mat, "after_n")
    return [
        ("online_write_batch, empty table (rows/s)", "write_insert", write,
         at(rate, write, "insert", "rows_per_s")),
        ("online_write_batch, upsert same keys (rows/s)", "", write,
         at(rate, write, "upsert", "rows_per_s")),
        ("materialize, 1st run (rows/s)", "materialize_first", mat,
         lambda r: rate(first_run_rate(r))),
        (f"materialize, runs 2..{n} mean (rows/s)", "", mat, lambda r: rate(later_runs_mean(r))),
        ("online_read 1 key p50 / p99 (ms)", "read_1", read, at(pair, read, "online_read_1")),
        ("online_read 100 keys p50 / p99 (ms)", "read_100", read,
         at(pair, read, "online_read_100")),
        ("get_online_features 100 keys p50 / p99 (ms)", "", read,
         at(pair, read, "get_online_features_100")),
        ("live rows after 1 materialization", "", mat, at(count, *after_1, "storage", "rows")),
        (f"live rows after {n} materializations", "rows_n", mat,
         at(count, *after_n, "storage", "rows")),
        ("bytes on disk after 1 materialization", "bytes_1", mat,
         at(size, *after_1, "storage", "bytes")),
        (f"bytes on disk after {n} materializations", "bytes_n", mat,
         at(size, *after_n, "storage", "bytes")),
        ("online_read 1 key after 1 mat. p50 / p99 (ms)", "", mat,
         at(pair, *after_1, "online_read_1")),
        (f"online_read 1 key after {n} mat. p50 / p99 (ms)", "read_1_n", mat,
         at(pair, *after_n, "online_read_1")),
        ("online_read 100 keys after 1 mat. p50 / p99 (ms)", "", mat,
         at(pair, *after_1, "online_read_100")),
        (f"online_read 100 keys after {n} mat. p50 / p99 (ms)", "read_100_n", mat,
         at(pair, *after_n, "online_read_100")),
        ("online_read 100 keys, 1 thread (calls/s)", "", "scaling",
         at(rate, "scaling", "threads_1")),
        ("online_read 100 keys, 4 threads (calls/s)", "", "scaling",
         lambda r: speedup(dig(r, "scaling"))),
        ("push 10 rows (online_write_batch) p50 / p99 (ms)", "", "pushes",
         at(pair, "pushes", "push_10_rows")),
        ("online_read 100 keys after 100 pushes p50 / p99 (ms)", "", "pushes",
         at(pair, "pushes", "online_read_100")),
        ("cold online_read 1 key, new store (ms)", "", "cold_read",
         at(lambda v: None if v is None else fmt_ms(v), "cold_read", "ms")),
        ("  read for it: metadata / data (KB, requests)", "", "cold_read",
         lambda r: cold_io(dig(r, "cold_read"))),
        ("cold 1 key, metadata cached (ms; data KB, requests)", "", "cold_read",
         lambda r: warm_metadata_io(dig(r, "cold_read"))),
        ("values read back == values written", "", "", check),
        ("peak RSS of the worker process (MB)", "", "", at(rate, "rss", "peak_mb")),
    ]  # fmt: skip


def cell(result: dict[str, Any], section: str, fn: Callable[[dict], str | None]) -> str:
    """The value, else the error of the section that should have produced it, else '-'."""
    text = fn(result)
    if text is not None:
        return text
    errors = result.get("errors") or {}
    error = errors.get(section) or next(iter(errors.values()), None)
    if error:
        short = f"ERROR: {error}".replace("\n", " ")
        return short if len(short) <= ERROR_WIDTH else short[: ERROR_WIDTH - 3] + "..."
    return "-"


def table(spec: dict[str, Any], results: dict[str, dict[str, Any]]) -> str:
    show_reference = (spec["entities"], spec["rounds"]) == (
        REFERENCE["entities"],
        REFERENCE["rounds"],
    )
    header = ["metric", *(stores.LABELS[s] for s in results)]
    if show_reference:
        header.append(REFERENCE["label"])
    lines = []
    for label, ref_key, section, fn in rows(spec):
        line = [label, *(cell(result, section, fn) for result in results.values())]
        if show_reference:
            line.append(REFERENCE["cells"].get(ref_key, ""))
        lines.append(line)
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]

    def render(row: list[str]) -> str:
        first = row[0].ljust(widths[0])
        rest = (value.rjust(width) for value, width in zip(row[1:], widths[1:], strict=True))
        return " | ".join([first, *rest])

    out = [render(header), "-+-".join("-" * w for w in widths), *map(render, lines)]
    if not show_reference:
        out.append(
            "(the contrib Iceberg reference column of DESIGN.md is shown only for the default "
            f"{REFERENCE['entities']:,} entities x {REFERENCE['rounds']} materializations)"
        )
    return "\n".join(out)


def storage_curve(results: dict[str, dict[str, Any]]) -> list[str]:
    """Bytes and files on disk after each materialization, per store."""
    lines = []
    for store, result in results.items():
        runs = dig(result, "materialize", "runs") or []
        if runs and "bytes" in runs[0]:
            sizes = " ".join(f"{r['bytes'] / 1e6:.1f}" for r in runs)
            files = " ".join(str(r["files"]) for r in runs)
            lines.append(f"  {stores.LABELS[store]}: MB {sizes}")
            lines.append(f"  {' ' * len(stores.LABELS[store])}  files {files}")
    return lines


def errors(results: dict[str, dict[str, Any]]) -> list[str]:
    return [
        f"{stores.LABELS[store]} / {section}: {message}"
        for store, result in results.items()
        for section, message in (result.get("errors") or {}).items()
    ]


def targets(spec: dict[str, Any], results: dict[str, dict[str, Any]]) -> list[str]:
    """DESIGN.md section 6 targets, checked against this run's numbers (benchmarks, not tests)."""
    ours, sqlite = results.get("iceberg"), results.get("sqlite")
    if not ours or not sqlite:
        return []
    n = spec["rounds"]
    p99 = lambda r, *path: dig(r, *path, "p99_ms")  # noqa: E731
    checks = [
        ("online_read 1 key p99 <= sqlite's",
         p99(ours, "read", "online_read_1"), p99(sqlite, "read", "online_read_1"), 1.0),
        ("online_read 100 keys p99 <= 0.5x sqlite's",
         p99(ours, "read", "online_read_100"), p99(sqlite, "read", "online_read_100"), 0.5),
        ("online_read 100 keys p99 <= 2 ms (aim)",
         p99(ours, "read", "online_read_100"), 2.0, 1.0),
        ("online_read 1 key p99 < 1 ms (issue: reads)",
         p99(ours, "read", "online_read_1"), 1.0, 1.0),
        ("online_read 100 keys p99 < 10 ms (issue: reads)",
         p99(ours, "read", "online_read_100"), 10.0, 1.0),
        ("get_online_features 100 keys p99 <= sqlite's",
         p99(ours, "read", "get_online_features_100"),
         p99(sqlite, "read", "get_online_features_100"), 1.0),
        ("4 reader threads scale past 1 (>= 1.2x)",
         1.2, dig(ours, "scaling", "speedup"), 1.0),
        ("online_write_batch >= 100,000 rows/s",
         100_000, dig(ours, "online_write_batch", "insert", "rows_per_s"), 1.0),
        (f"bytes after {n} materializations <= 1.2x after 1",
         dig(ours, "materialize", "after_n", "storage", "bytes"),
         dig(ours, "materialize", "after_1", "storage", "bytes"), 1.2),
        (f"100-key read p99 after {n} materializations <= 1.5x after 1 (flat)",
         p99(ours, "materialize", "after_n", "online_read_100"),
         p99(ours, "materialize", "after_1", "online_read_100"), 1.5),
        (f"live rows after {n} materializations == entities",
         dig(ours, "materialize", "after_n", "storage", "rows"), spec["entities"], 1.0),
    ]  # fmt: skip
    arrow = results.get("iceberg-arrow")
    if arrow:
        checks.append(
            ("materialize through the Arrow engine >= 50,000 rows/s (runs 2..n)",
             50_000, later_runs_mean(arrow), 1.0),
        )  # fmt: skip
    lines = []
    for label, left, right, factor in checks:
        if left is None or right is None:
            verdict = "n/a "
        elif "==" in label:
            verdict = "MET " if left == right else "MISS"
        else:
            verdict = "MET " if left <= factor * right else "MISS"
        lines.append(f"  [{verdict}] {label}")
    return lines
