//! `check_arrow` / `write_arrow`: offline-store results handed over through the Arrow PyCapsule
//! interface (zero copy), for the Arrow-native materialization engine. Module functions taking
//! the `Store`, so the `Store` class keeps one `#[pymethods]` block.

use pyo3::prelude::*;
use pyo3::types::PyDict;
use pyo3_arrow::{PyRecordBatchReader, PySchema};

use super::{PyStore, run, write_report};
use crate::Error;
use crate::ingest::{self, SourceColumns};

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

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(check_arrow, m)?)?;
    m.add_function(wrap_pyfunction!(write_arrow, m)?)?;
    Ok(())
}
