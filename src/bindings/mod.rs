//! The Python module `feast_iceberg._internal`: the only code that knows about Python.
//! Every call that may touch the catalog or storage runs with the GIL released.

mod arrow;
mod errors;
mod logging;
mod metrics;

use std::sync::Arc;

use prost::Message;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};

use crate::config::StoreConfig;
use crate::convert::{self, WriteInput};
use crate::error::Result;
use crate::proto::Value;
use crate::proto::value::Val;
use crate::read::Wanted;
use crate::runtime;
use crate::schema::ColumnSpec;
use crate::store::{Store, ViewRead, ViewsOutput};
use crate::write::WriteReport;

/// Byte strings copied out of Python objects into one buffer, so the GIL can be released while
/// Rust works on them.
struct Blobs {
    data: Vec<u8>,
    ends: Vec<usize>,
}

impl Blobs {
    fn from_py(items: &[Bound<'_, PyBytes>]) -> Self {
        let total = items.iter().map(|b| b.as_bytes().len()).sum();
        let mut data = Vec::with_capacity(total);
        let mut ends = Vec::with_capacity(items.len());
        for b in items {
            data.extend_from_slice(b.as_bytes());
            ends.push(data.len());
        }
        Self { data, ends }
    }

    fn slices(&self) -> Vec<&[u8]> {
        let mut start = 0;
        self.ends
            .iter()
            .map(|&end| {
                let s = &self.data[start..end];
                start = end;
                s
            })
            .collect()
    }
}

/// What `Store.read` hands Python: feature names, event timestamps (micros), and per key a
/// serialized `RepeatedValue` of the features or None.
type PyReadResult<'py> = (Vec<String>, Vec<Option<i64>>, Bound<'py, PyList>);

/// One view of `Store.read_views`: table, join keys with their request column, requested
/// features with whether each is a join key, TTL cut.
type PyViewRead = (
    String,
    Vec<(String, usize)>,
    Vec<(String, bool)>,
    Option<i64>,
);

/// Runs `f` on the shared runtime with the GIL released. Every call into the core goes through
/// here: errors become their Python classes, and a panic becomes `InternalError` (see
/// `runtime::block_on`), never pyo3's `PanicException`.
fn run<T: Send>(
    py: Python<'_>,
    f: impl std::future::Future<Output = Result<T>> + Send,
) -> PyResult<T> {
    py.detach(|| runtime::block_on(f).and_then(|r| r))
        .map_err(errors::to_py)
}

fn specs(cols: Vec<(String, i32)>) -> Vec<ColumnSpec> {
    cols.into_iter()
        .map(|(name, value_type)| ColumnSpec { name, value_type })
        .collect()
}

fn view_reads(views: Vec<PyViewRead>) -> Vec<ViewRead> {
    views
        .into_iter()
        .map(|(table, join_keys, features, not_before)| ViewRead {
            table,
            join_keys,
            wanted: features
                .into_iter()
                .map(|(name, is_key)| {
                    if is_key {
                        Wanted::JoinKey(name)
                    } else {
                        Wanted::Feature(name)
                    }
                })
                .collect(),
            not_before,
        })
        .collect()
}

/// What every `get_online_features` request of one shape reads (see `Store.online_features`),
/// converted once: passing it as Python lists made ~110 strings per 5-view request, most of
/// the allocations of a cached read.
#[pyclass(name = "ViewsPlan", module = "feast_iceberg._internal", frozen)]
struct PyViewsPlan {
    names: Vec<String>,
    views: Vec<ViewRead>,
}

#[pymethods]
impl PyViewsPlan {
    /// `names`: the response's names (request columns, then features); `views` as for
    /// `Store.read_views`.
    #[new]
    fn new(names: Vec<String>, views: Vec<PyViewRead>) -> Self {
        Self {
            names,
            views: view_reads(views),
        }
    }

    fn __repr__(&self) -> String {
        format!(
            "ViewsPlan({} names, {} views)",
            self.names.len(),
            self.views.len()
        )
    }
}

fn response_bytes<'py>(py: Python<'py>, out: &ViewsOutput) -> PyResult<Bound<'py, PyBytes>> {
    PyBytes::new_with(py, out.len(), |buf| {
        out.concat_into(buf);
        Ok(())
    })
}

/// One request column of `Store.online_features` as serialized `Value`s.
fn request_values(kind: i32, items: &Bound<'_, PyList>) -> PyResult<Vec<Vec<u8>>> {
    let scalar = |val: Val| Value { val: Some(val) }.encode_to_vec();
    items
        .iter()
        .map(|item| {
            Ok(match kind {
                0 => item.cast::<PyBytes>()?.as_bytes().to_vec(),
                2 => scalar(Val::StringVal(item.extract()?)),
                3 => scalar(Val::Int32Val(item.extract()?)),
                4 => scalar(Val::Int64Val(item.extract()?)),
                _ => {
                    return Err(pyo3::exceptions::PyValueError::new_err(format!(
                        "request column kind {kind} is not 0, 2, 3 or 4"
                    )));
                }
            })
        })
        .collect()
}

#[pyclass(name = "Store", module = "feast_iceberg._internal", frozen)]
struct PyStore {
    inner: Arc<Store>,
    shown: String,
    /// The process that built it: its catalog connections are sockets of that process.
    pid: u32,
}

impl PyStore {
    /// The core, if this process built it. A child of `fork()` shares the parent's catalog
    /// sockets; talking over them would garble the parent's conversation with its database.
    pub(crate) fn core(&self) -> PyResult<&Arc<Store>> {
        if self.pid == std::process::id() {
            Ok(&self.inner)
        } else {
            Err(errors::to_py(crate::error::Error::Forked(
                "this Store was created before a fork(); create a new one in the child \
                 (IcebergOnlineStore does so by itself)"
                    .into(),
            )))
        }
    }
}

impl Drop for PyStore {
    fn drop(&mut self) {
        if self.pid != std::process::id() {
            // Never close the parent's connections from a forked child: closing a pooled
            // PostgreSQL connection sends Terminate over the socket both processes share.
            std::mem::forget(Arc::clone(&self.inner));
        }
    }
}

#[pymethods]
impl PyStore {
    #[new]
    fn new(config_json: &str) -> PyResult<Self> {
        let config = StoreConfig::from_json(config_json).map_err(errors::to_py)?;
        let shown = format!("{config:?}");
        let inner = Arc::new(Store::new(config).map_err(errors::to_py)?);
        Ok(Self {
            inner,
            shown,
            pid: std::process::id(),
        })
    }

    fn __repr__(&self) -> String {
        format!("<feast_iceberg Store {}>", self.shown)
    }

    fn ensure_table(
        &self,
        py: Python<'_>,
        table: String,
        join_keys: Vec<(String, i32)>,
        features: Vec<(String, i32)>,
    ) -> PyResult<()> {
        let (join_keys, features) = (specs(join_keys), specs(features));
        run(py, self.core()?.ensure_table(&table, &join_keys, &features))
    }

    fn drop_table(&self, py: Python<'_>, table: String) -> PyResult<bool> {
        run(py, self.core()?.drop_table(&table))
    }

    fn table_exists(&self, py: Python<'_>, table: String) -> PyResult<bool> {
        run(py, self.core()?.table_exists(&table))
    }

    #[allow(clippy::too_many_arguments)]
    fn write<'py>(
        &self,
        py: Python<'py>,
        table: String,
        feature_names: Vec<String>,
        entity_keys: Vec<Bound<'py, PyBytes>>,
        values: Vec<Bound<'py, PyBytes>>,
        event_ts_micros: Vec<i64>,
        created_ts_micros: Vec<Option<i64>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let keys = Blobs::from_py(&entity_keys);
        let vals = Blobs::from_py(&values);
        drop((entity_keys, values));
        let (key_slices, value_slices) = (keys.slices(), vals.slices());
        let input = WriteInput {
            feature_names: &feature_names,
            entity_keys: &key_slices,
            values: &value_slices,
            event_ts: &event_ts_micros,
            created_ts: &created_ts_micros,
        };
        let report = run(py, self.core()?.write(&table, &input))?;
        write_report(py, &report)
    }

    /// Rewrites buckets with several files (every bucket with `all`) into one sorted file
    /// each, newest row per key, in one `replace` snapshot; re-buckets the table instead
    /// (`buckets`, or its largest bucket past `target_bucket_bytes`).
    #[pyo3(signature = (table, all=false, dry_run=false, buckets=None))]
    fn compact<'py>(
        &self,
        py: Python<'py>,
        table: String,
        all: bool,
        dry_run: bool,
        buckets: Option<u32>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let report = run(py, self.core()?.compact(&table, all, dry_run, buckets))?;
        let d = write_report(py, &report.write)?;
        d.set_item("buckets_before", report.buckets_before)?;
        d.set_item("buckets_after", report.buckets_after)?;
        d.set_item("largest_bucket_bytes", report.largest_bucket_bytes)?;
        Ok(d)
    }

    /// Deletes unreferenced files older than `older_than_seconds` under the table.
    #[pyo3(signature = (table, older_than_seconds, dry_run=false))]
    fn remove_orphans<'py>(
        &self,
        py: Python<'py>,
        table: String,
        older_than_seconds: f64,
        dry_run: bool,
    ) -> PyResult<Bound<'py, PyDict>> {
        let older_than = std::time::Duration::try_from_secs_f64(older_than_seconds)
            .map_err(|e| errors::to_py(crate::Error::config(format!("older_than: {e}"))))?;
        let o = run(py, self.core()?.remove_orphans(&table, older_than, dry_run))?;
        let d = PyDict::new(py);
        d.set_item("files", o.paths.len())?;
        d.set_item("bytes", o.bytes)?;
        d.set_item("too_young", o.too_young)?;
        d.set_item("paths", o.paths)?;
        Ok(d)
    }

    /// Converts a table written by Feast's contrib Iceberg store into this layout, atomically,
    /// keeping the newest row per key. Types are Feast `ValueType` ints.
    #[pyo3(signature = (table, join_keys, features, dry_run=false))]
    fn migrate<'py>(
        &self,
        py: Python<'py>,
        table: String,
        join_keys: Vec<(String, i32)>,
        features: Vec<(String, i32)>,
        dry_run: bool,
    ) -> PyResult<Bound<'py, PyDict>> {
        let (join_keys, features) = (specs(join_keys), specs(features));
        let r = run(
            py,
            self.core()?.migrate(&table, &join_keys, &features, dry_run),
        )?;
        let d = PyDict::new(py);
        d.set_item("already_migrated", r.already_migrated)?;
        d.set_item("files_read", r.files_read)?;
        d.set_item("rows_read", r.rows_read)?;
        d.set_item("rows_live", r.rows_live)?;
        d.set_item("previous_metadata", r.previous_metadata)?;
        Ok(d)
    }

    /// Rows whose entity key another live row also has.
    fn duplicate_keys(&self, py: Python<'_>, table: String) -> PyResult<u64> {
        run(py, self.core()?.duplicate_keys(&table))
    }

    /// Point lookups; rows whose event timestamp (micros) is before `not_before` come back as
    /// absent, cut in Rust so expired rows are never encoded or parsed.
    #[pyo3(signature = (table, entity_keys, features=None, not_before=None))]
    fn read<'py>(
        &self,
        py: Python<'py>,
        table: String,
        entity_keys: Vec<Bound<'py, PyBytes>>,
        features: Option<Vec<String>>,
        not_before: Option<i64>,
    ) -> PyResult<PyReadResult<'py>> {
        let keys = Blobs::from_py(&entity_keys);
        drop(entity_keys);
        let slices = keys.slices();
        let read = self
            .core()?
            .read(&table, &slices, features.as_deref(), not_before);
        let out = run(py, read)?;
        let rows = PyList::empty(py);
        for row in out.rows {
            match row {
                None => rows.append(py.None())?,
                Some(encoded) => rows.append(PyBytes::new(py, &encoded))?,
            }
        }
        Ok((out.names, out.event_ts, rows))
    }

    /// The lookups of several feature views for one request, in one call with the GIL
    /// released once, answered as serialized `GetOnlineFeaturesResponse.results` entries (one
    /// per requested feature, views in order) for `MergeFromString`, and per view the count of
    /// PRESENT cells. `join_columns`: the request's join-key columns, each row a serialized
    /// `Value`; a view is `(table, [(join key, column index)], [(feature, is_join_key)],
    /// not_before)`.
    fn read_views<'py>(
        &self,
        py: Python<'py>,
        join_columns: Vec<Vec<Bound<'py, PyBytes>>>,
        views: Vec<PyViewRead>,
    ) -> PyResult<(Bound<'py, PyBytes>, Vec<u64>)> {
        let blobs: Vec<Blobs> = join_columns.iter().map(|c| Blobs::from_py(c)).collect();
        drop(join_columns);
        let columns: Vec<Vec<&[u8]>> = blobs.iter().map(Blobs::slices).collect();
        let views = view_reads(views);
        let out = run(py, self.core()?.read_views(&columns, &views))?;
        Ok((response_bytes(py, &out)?, out.present))
    }

    /// A whole `get_online_features` answer in one call, the GIL released once: the serialized
    /// `GetOnlineFeaturesResponse` (metadata listing the plan's names, one vector per request
    /// column, then the views' as `read_views` makes them) and per view the count of PRESENT
    /// cells. `columns` are the request's join-key columns as `(kind, values)`: kind 0,
    /// serialized `Value`s; 2, 3 or 4 (Feast's STRING, INT32, INT64), Python `str`s or `int`s,
    /// encoded here as Feast encodes them. `cuts`, when given, are the views' TTL cuts (micros
    /// or None), in the plan's order.
    #[pyo3(signature = (plan, columns, cuts=None))]
    fn online_features<'py>(
        &self,
        py: Python<'py>,
        plan: &PyViewsPlan,
        columns: Vec<(i32, Bound<'py, PyList>)>,
        cuts: Option<Vec<Option<i64>>>,
    ) -> PyResult<(Bound<'py, PyBytes>, Vec<u64>)> {
        let values: Vec<Vec<Vec<u8>>> = columns
            .iter()
            .map(|(kind, items)| request_values(*kind, items))
            .collect::<PyResult<_>>()?;
        drop(columns);
        let columns: Vec<Vec<&[u8]>> = values
            .iter()
            .map(|c| c.iter().map(Vec::as_slice).collect())
            .collect();
        let cut;
        let views = match cuts {
            None => &plan.views,
            Some(cuts) if cuts.len() == plan.views.len() => {
                cut = plan
                    .views
                    .iter()
                    .zip(cuts)
                    .map(|(view, not_before)| ViewRead {
                        not_before,
                        ..view.clone()
                    })
                    .collect();
                &cut
            }
            Some(cuts) => {
                return Err(pyo3::exceptions::PyValueError::new_err(format!(
                    "{} cuts for {} views",
                    cuts.len(),
                    plan.views.len()
                )));
            }
        };
        let out = run(
            py,
            self.core()?.online_features(&plan.names, &columns, views),
        )?;
        Ok((response_bytes(py, &out)?, out.present))
    }

    fn stats<'py>(&self, py: Python<'py>, table: String) -> PyResult<Bound<'py, PyDict>> {
        let s = run(py, self.core()?.stats(&table))?;
        let d = PyDict::new(py);
        d.set_item("snapshot_id", s.snapshot_id)?;
        d.set_item("snapshots", s.snapshots)?;
        d.set_item("data_files", s.data_files)?;
        d.set_item("delete_files", s.delete_files)?;
        d.set_item("records", s.records)?;
        d.set_item("position_deletes", s.position_deletes)?;
        d.set_item("data_bytes", s.data_bytes)?;
        d.set_item("buckets", s.buckets)?;
        d.set_item("largest_bucket_bytes", s.largest_bucket_bytes)?;
        d.set_item("metadata_location", s.metadata_location)?;
        d.set_item("metadata_log", s.metadata_log)?;
        Ok(d)
    }

    /// What this store has read from the warehouse so far (bytes and requests of table
    /// metadata, of data read to answer requests, and of files loaded into the cache in the
    /// background), and the decoded bytes cached; `reset` zeroes the counters afterwards.
    #[pyo3(signature = (reset=false))]
    fn io_stats<'py>(&self, py: Python<'py>, reset: bool) -> PyResult<Bound<'py, PyDict>> {
        let io = &self.core()?.io;
        let d = PyDict::new(py);
        for (name, counter) in [
            ("metadata", &io.metadata),
            ("data", &io.data),
            ("prefetch", &io.prefetch),
        ] {
            let (bytes, requests) = counter.get();
            d.set_item(format!("{name}_bytes"), bytes)?;
            d.set_item(format!("{name}_requests"), requests)?;
        }
        let files = self.core()?.files.stats();
        d.set_item("cache_bytes", files.blocks.bytes)?;
        d.set_item("cache_entries", files.blocks.entries)?;
        d.set_item("cache_hits", files.blocks.hits)?;
        d.set_item("cache_misses", files.blocks.misses)?;
        d.set_item("cache_evictions", files.blocks.evictions)?;
        d.set_item("index_files", files.index_files)?;
        d.set_item("index_bytes", files.index_bytes)?;
        d.set_item("index_rows", files.index_rows)?;
        if reset {
            io.reset();
        }
        Ok(d)
    }

    #[pyo3(signature = (table, dry_run=false))]
    fn expire<'py>(
        &self,
        py: Python<'py>,
        table: String,
        dry_run: bool,
    ) -> PyResult<Bound<'py, PyDict>> {
        let expired = run(py, self.core()?.expire(&table, dry_run))?;
        let d = PyDict::new(py);
        d.set_item("snapshots_expired", expired)?;
        Ok(d)
    }
}

fn write_report<'py>(py: Python<'py>, report: &WriteReport) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("rows_written", report.rows_written)?;
    d.set_item("rows_ignored_older", report.rows_ignored_older)?;
    d.set_item("buckets", report.buckets)?;
    d.set_item("files_added", report.files_added)?;
    d.set_item("files_removed", report.files_removed)?;
    d.set_item("delete_files_added", report.delete_files_added)?;
    d.set_item("merge_on_read_buckets", report.merge_on_read_buckets)?;
    d.set_item("attempts", report.attempts)?;
    d.set_item("replanned_buckets", report.replanned_buckets)?;
    d.set_item("rebases", report.rebases)?;
    let t = &report.timings;
    let timings = PyDict::new(py);
    for (k, v) in [
        ("state_us", t.state_us),
        ("plan_us", t.plan_us),
        ("prepare_us", t.prepare_us),
        ("catalog_us", t.catalog_us),
        ("cleanup_us", t.cleanup_us),
    ] {
        timings.set_item(k, v)?;
    }
    d.set_item("timings", timings)?;
    d.set_item("snapshot_id", report.snapshot_id)?;
    Ok(d)
}

/// Feast's `serialize_entity_key` for serialized `EntityKey` protos.
#[pyfunction]
fn serialize_entity_keys<'py>(
    py: Python<'py>,
    entity_keys: Vec<Bound<'py, PyBytes>>,
    version: u32,
) -> PyResult<Vec<Bound<'py, PyBytes>>> {
    if version < 3 {
        return Err(errors::to_py(crate::Error::config(
            "only entity_key_serialization_version >= 3 is supported",
        )));
    }
    let slices: Vec<&[u8]> = entity_keys.iter().map(|b| b.as_bytes()).collect();
    let keys = convert::serialize_entity_keys(&slices).map_err(errors::to_py)?;
    Ok(keys.iter().map(|k| PyBytes::new(py, k)).collect())
}

#[pymodule]
fn _internal(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    logging::install();
    errors::register(m)?;
    m.add_class::<PyStore>()?;
    m.add_class::<PyViewsPlan>()?;
    m.add_function(wrap_pyfunction!(serialize_entity_keys, m)?)?;
    arrow::register(m)?;
    metrics::register(m)?;
    Ok(())
}
