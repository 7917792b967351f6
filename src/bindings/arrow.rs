//! `check_arrow` / `write_arrow`: offline-store results handed over through the Arrow PyCapsule
//! interface (zero copy), for the Arrow-native materialization engine. Module functions taking
//! the `Store`, so the `Store` class keeps one `#[pymethods]` block.

use pyo3::prelude::*;
use std::time::Duration;

use pyo3::types::{PyBytes, PyDict};
use pyo3_arrow::{PyRecordBatchReader, PySchema};

use super::{PyStore, run, write_report};
use crate::Error;
use crate::ingest::{self, SourceColumns};
use crate::write::{self, Token};

fn source_columns(
    join_keys: Vec<(String, String)>,
    features: Vec<(String, String)>,
    event_ts: String,
    created_ts: Option<String>,
) -> SourceColumns {
    SourceColumns {
        join_keys,
        features,
        event_ts,
        created_ts,
    }
}

/// Why the columns of `schema` cannot be written natively to `table`, or None if they can.
/// Column mappings are (table column, source column) pairs. Reads and writes nothing.
#[pyfunction]
#[pyo3(signature = (store, table, schema, join_keys, features, event_ts, created_ts=None))]
#[allow(clippy::too_many_arguments)]
fn check_arrow(
    py: Python<'_>,
    store: &Bound<'_, PyStore>,
    table: String,
    schema: PySchema,
    join_keys: Vec<(String, String)>,
    features: Vec<(String, String)>,
    event_ts: String,
    created_ts: Option<String>,
) -> PyResult<Option<String>> {
    let cols = source_columns(join_keys, features, event_ts, created_ts);
    let schema = schema.into_inner();
    let inner = store.get().core()?.clone();
    // A schema the table cannot take is the answer, not an error.
    let checked = async {
        match ingest::check(&inner, &table, &cols, &schema).await {
            Ok(()) => Ok(None),
            Err(Error::SchemaMismatch(why)) => Ok(Some(why)),
            Err(e) => Err(e),
        }
    };
    run(py, checked)
}

/// Upserts every row of `data` (any object with `__arrow_c_stream__`: a pyarrow Table or
/// RecordBatchReader, ...) into `table`, one snapshot per chunk of at most `chunk_rows` rows.
/// The stream is read with the GIL released.
#[pyfunction]
#[pyo3(signature = (store, table, data, join_keys, features, event_ts, created_ts=None, chunk_rows=1_000_000))]
#[allow(clippy::too_many_arguments)]
fn write_arrow<'py>(
    py: Python<'py>,
    store: &Bound<'py, PyStore>,
    table: String,
    data: PyRecordBatchReader,
    join_keys: Vec<(String, String)>,
    features: Vec<(String, String)>,
    event_ts: String,
    created_ts: Option<String>,
    chunk_rows: usize,
) -> PyResult<Bound<'py, PyDict>> {
    let cols = source_columns(join_keys, features, event_ts, created_ts);
    let reader = data.into_reader()?;
    let schema = reader.schema();
    let inner = store.get().core()?.clone();
    let report = run(
        py,
        ingest::ingest(&inner, &table, &cols, &schema, reader, chunk_rows),
    )?;
    let d = write_report(py, &report.write)?;
    d.set_item("rows_read", report.rows_read)?;
    d.set_item("chunks", report.chunks)?;
    Ok(d)
}

/// The table's bucket count (the `N` of its `bucket[N](entity_key)` partitioning).
#[pyfunction]
fn table_buckets(py: Python<'_>, store: &Bound<'_, PyStore>, table: String) -> PyResult<u32> {
    let inner = store.get().core()?.clone();
    run(py, async move {
        let id = inner.table_id(&table)?;
        Ok(inner.current(&id, Duration::ZERO).await?.layout.buckets)
    })
}

/// The Iceberg bucket of each row's entity key, in row order: what a distributed engine
/// repartitions rows by, so that one task writes each bucket.
#[pyfunction]
fn arrow_buckets(
    py: Python<'_>,
    store: &Bound<'_, PyStore>,
    table: String,
    data: PyRecordBatchReader,
    join_keys: Vec<(String, String)>,
) -> PyResult<Vec<i32>> {
    let reader = data.into_reader()?;
    let schema = reader.schema();
    let inner = store.get().core()?.clone();
    run(
        py,
        ingest::buckets(&inner, &table, &join_keys, &schema, reader),
    )
}

/// One task's share of a distributed materialization: converts every row of `data`, writes
/// the buckets they touch under `<table>/data/_staged/<job>/<attempt>/` against the table's
/// current state, and returns the token the driver passes to `commit_staged`. Nothing is
/// visible until then; on an error nothing is left behind.
#[pyfunction]
#[pyo3(signature = (store, table, data, join_keys, features, event_ts, created_ts=None, *, job, attempt))]
#[allow(clippy::too_many_arguments)]
fn stage_arrow<'py>(
    py: Python<'py>,
    store: &Bound<'py, PyStore>,
    table: String,
    data: PyRecordBatchReader,
    join_keys: Vec<(String, String)>,
    features: Vec<(String, String)>,
    event_ts: String,
    created_ts: Option<String>,
    job: String,
    attempt: String,
) -> PyResult<Bound<'py, PyBytes>> {
    let cols = source_columns(join_keys, features, event_ts, created_ts);
    let reader = data.into_reader()?;
    let schema = reader.schema();
    let inner = store.get().core()?.clone();
    let bytes = run(py, async move {
        let (_, token) =
            ingest::stage(&inner, &table, &cols, &schema, reader, &job, &attempt).await?;
        token.to_bytes()
    })?;
    Ok(PyBytes::new(py, &bytes))
}

fn tokens(raw: &[Bound<'_, PyBytes>]) -> PyResult<Vec<Token>> {
    raw.iter()
        .map(|b| Token::from_bytes(b.as_bytes()).map_err(super::errors::to_py))
        .collect()
}

/// Commits the buckets of every token in one snapshot. Buckets another writer changed after
/// they were staged are merged again from the staged rows (`replanned_buckets`).
#[pyfunction]
fn commit_staged<'py>(
    py: Python<'py>,
    store: &Bound<'py, PyStore>,
    table: String,
    tokens: Vec<Bound<'py, PyBytes>>,
) -> PyResult<Bound<'py, PyDict>> {
    let tokens = self::tokens(&tokens)?;
    let inner = store.get().core()?.clone();
    let report = run(py, write::commit_staged(&inner, &table, tokens))?;
    write_report(py, &report)
}

/// Deletes every file under the job's staging directory that neither the table nor a token
/// in `keep` references (failed, killed or speculative attempts); returns how many.
#[pyfunction]
fn discard_staged(
    py: Python<'_>,
    store: &Bound<'_, PyStore>,
    table: String,
    job: String,
    keep: Vec<Bound<'_, PyBytes>>,
) -> PyResult<usize> {
    let keep = tokens(&keep)?;
    let inner = store.get().core()?.clone();
    run(py, async move {
        write::discard(&inner, &table, &job, &keep).await
    })
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(table_buckets, m)?)?;
    m.add_function(wrap_pyfunction!(arrow_buckets, m)?)?;
    m.add_function(wrap_pyfunction!(stage_arrow, m)?)?;
    m.add_function(wrap_pyfunction!(commit_staged, m)?)?;
    m.add_function(wrap_pyfunction!(discard_staged, m)?)?;
    m.add_function(wrap_pyfunction!(check_arrow, m)?)?;
    m.add_function(wrap_pyfunction!(write_arrow, m)?)?;
    Ok(())
}
