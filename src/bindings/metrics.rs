//! The metrics snapshot as Python dicts (typed by `feast_iceberg.reports.MetricsSnapshot`);
//! `feast_iceberg.metrics` turns it into Prometheus families on every scrape.

use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::metrics::{self, READ_BUCKETS, TableSnapshot};

/// Everything the process's stores have counted, in one call per scrape.
#[pyfunction]
fn metrics_snapshot(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let s = py.detach(metrics::snapshot);
    let d = PyDict::new(py);
    d.set_item("stores", s.stores)?;
    d.set_item("read_bucket_bounds", READ_BUCKETS.to_vec())?;
    let t = &s.totals;
    d.set_item("cache_hits", t.cache_hits)?;
    d.set_item("cache_misses", t.cache_misses)?;
    d.set_item("cache_inserts", t.cache_inserts)?;
    d.set_item("cache_evictions", t.cache_evictions)?;
    d.set_item("cache_bytes", s.cache_bytes)?;
    d.set_item("cache_entries", s.cache_entries)?;
    d.set_item("index_bytes", s.index_bytes)?;
    let (bytes, requests) = (PyDict::new(py), PyDict::new(py));
    for (kind, (b, r)) in [
        ("metadata", t.metadata),
        ("data", t.data),
        ("prefetch", t.prefetch),
    ] {
        bytes.set_item(kind, b)?;
        requests.set_item(kind, r)?;
    }
    d.set_item("storage_read_bytes", bytes)?;
    d.set_item("storage_read_requests", requests)?;
    let tables = PyDict::new(py);
    for (label, table) in &s.tables {
        tables.set_item(label, table_dict(py, table)?)?;
    }
    d.set_item("tables", tables)?;
    Ok(d)
}

fn table_dict<'py>(py: Python<'py>, t: &TableSnapshot) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("read_buckets", &t.read_buckets)?;
    d.set_item("read_seconds", t.read_seconds)?;
    d.set_item("read_keys", t.read_keys)?;
    d.set_item("read_errors", t.read_errors)?;
    let commits = PyDict::new(py);
    for (outcome, n) in &t.commits {
        commits.set_item(outcome, n)?;
    }
    d.set_item("commits", commits)?;
    d.set_item("commit_retries", t.commit_retries)?;
    d.set_item("cleanup_failures", t.cleanup_failures)?;
    d.set_item("staleness_seconds", t.staleness_seconds)?;
    d.set_item("data_files", t.data_files)?;
    d.set_item("delete_files", t.delete_files)?;
    Ok(d)
}

/// Turns the per-read and per-commit counting on or off; returns the previous setting. For
/// measuring what counting costs (`bench/metrics.py`); `FEAST_ICEBERG_METRICS=0` starts off.
#[pyfunction]
fn set_metrics_enabled(enabled: bool) -> bool {
    metrics::set_enabled(enabled)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    if std::env::var("FEAST_ICEBERG_METRICS").is_ok_and(|v| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "0" | "off" | "false" | "no"
        )
    }) {
        metrics::set_enabled(false);
    }
    m.add_function(wrap_pyfunction!(metrics_snapshot, m)?)?;
    m.add_function(wrap_pyfunction!(set_metrics_enabled, m)?)?;
    Ok(())
}
