//! Python exception classes, one per `Error` variant. Some also derive from a builtin
//! (`ValueError`, `KeyError`, `TimeoutError`) so callers catching those keep working; pyo3's
//! `create_exception!` takes a single base, so the classes are built with `type()` at import.

use pyo3::exceptions::{PyException, PyKeyError, PyTimeoutError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple, PyType};

use crate::error::Error;

const MODULE: &str = "feast_iceberg._internal";

struct Classes {
    base: Py<PyType>,
    config: Py<PyType>,
    schema: Py<PyType>,
    input: Py<PyType>,
    not_found: Py<PyType>,
    conflict: Py<PyType>,
    unknown: Py<PyType>,
    catalog: Py<PyType>,
    storage: Py<PyType>,
    corrupt: Py<PyType>,
    table_state: Py<PyType>,
    conversion: Py<PyType>,
    timeout: Py<PyType>,
    fork: Py<PyType>,
    internal: Py<PyType>,
}

static CLASSES: PyOnceLock<Classes> = PyOnceLock::new();

fn make(
    py: Python<'_>,
    name: &str,
    bases: &[Bound<'_, PyType>],
    doc: &str,
) -> PyResult<Py<PyType>> {
    let ns = PyDict::new(py);
    ns.set_item("__module__", MODULE)?;
    ns.set_item("__doc__", doc)?;
    let bases = PyTuple::new(py, bases)?;
    let cls = py
        .get_type::<PyType>()
        .call1((name, bases, ns))?
        .cast_into::<PyType>()?;
    Ok(cls.unbind())
}

fn build(py: Python<'_>) -> PyResult<Classes> {
    let base = make(
        py,
        "FeastIcebergError",
        &[py.get_type::<PyException>()],
        "Base class of every error raised by feast-iceberg.",
    )?;
    let b = base.bind(py).clone();
    let value = py.get_type::<PyValueError>();
    let sub = |name: &str, extra: Option<&Bound<'_, PyType>>, doc: &str| {
        let mut bases = vec![b.clone()];
        bases.extend(extra.cloned());
        make(py, name, &bases, doc)
    };
    let conflict = sub(
        "CommitConflictError",
        None,
        "Concurrent writers kept winning; the batch was not committed.",
    )?;
    let conflict_type = conflict.bind(py).clone();
    Ok(Classes {
        config: sub(
            "ConfigError",
            Some(&value),
            "The store configuration is invalid.",
        )?,
        schema: sub(
            "SchemaMismatchError",
            Some(&value),
            "A batch or request does not fit the table schema.",
        )?,
        input: sub(
            "InvalidInputError",
            Some(&value),
            "A value is malformed or mistyped.",
        )?,
        not_found: sub(
            "TableNotFoundError",
            Some(&py.get_type::<PyKeyError>()),
            "The feature view's table does not exist (run `feast apply`).",
        )?,
        unknown: make(
            py,
            "CommitStateUnknownError",
            &[conflict_type],
            "The catalog failed mid-commit and no attempt is known to have landed; the table \
             is consistent and writing the rows again is safe.",
        )?,
        conflict,
        catalog: sub(
            "CatalogError",
            None,
            "The catalog could not be reached or failed.",
        )?,
        storage: sub("StorageError", None, "A file could not be read or written.")?,
        corrupt: sub(
            "CorruptTableError",
            None,
            "Table metadata or a referenced file is unreadable or inconsistent.",
        )?,
        table_state: sub(
            "TableStateError",
            None,
            "The table is valid Iceberg but in a state this store cannot work on (files \
             another engine wrote); nothing was changed.",
        )?,
        conversion: sub(
            "ConversionError",
            Some(&value),
            "Arrow data could not be converted (a failed cast, an overflow, batches that do \
             not fit together).",
        )?,
        timeout: sub(
            "ReadTimeoutError",
            Some(&py.get_type::<PyTimeoutError>()),
            "An online read did not finish within read_timeout_ms.",
        )?,
        fork: sub(
            "ForkError",
            None,
            "A Store built before fork() was used in the child; build a new one there.",
        )?,
        internal: sub(
            "InternalError",
            None,
            "A bug in feast-iceberg (a broken invariant or a Rust panic); please report it.",
        )?,
        base,
    })
}

fn classes(py: Python<'_>) -> PyResult<&'static Classes> {
    CLASSES.get_or_try_init(py, || build(py))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let c = classes(m.py())?;
    for (name, cls) in [
        ("FeastIcebergError", &c.base),
        ("ConfigError", &c.config),
        ("SchemaMismatchError", &c.schema),
        ("InvalidInputError", &c.input),
        ("TableNotFoundError", &c.not_found),
        ("CommitConflictError", &c.conflict),
        ("CommitStateUnknownError", &c.unknown),
        ("CatalogError", &c.catalog),
        ("StorageError", &c.storage),
        ("CorruptTableError", &c.corrupt),
        ("TableStateError", &c.table_state),
        ("ConversionError", &c.conversion),
        ("ReadTimeoutError", &c.timeout),
        ("ForkError", &c.fork),
        ("InternalError", &c.internal),
    ] {
        m.add(name, cls.clone_ref(m.py()))?;
    }
    Ok(())
}

pub fn to_py(err: Error) -> PyErr {
    Python::attach(|py| {
        let Ok(c) = classes(py) else {
            return PyException::new_err(err.to_string());
        };
        let cls = match &err {
            Error::Config(_) => &c.config,
            Error::SchemaMismatch(_) => &c.schema,
            Error::InvalidInput(_) => &c.input,
            Error::TableNotFound(_) => &c.not_found,
            Error::CommitConflict { .. } => &c.conflict,
            Error::CommitUnknown { .. } => &c.unknown,
            Error::Catalog(_) => &c.catalog,
            Error::Storage(_) | Error::FileNotFound(_) => &c.storage,
            Error::CorruptTable { .. } => &c.corrupt,
            Error::TableState { .. } => &c.table_state,
            Error::Conversion(_) => &c.conversion,
            Error::ReadTimeout { .. } => &c.timeout,
            Error::Forked(_) => &c.fork,
            Error::Internal(_) => &c.internal,
        };
        PyErr::from_type(cls.bind(py).clone(), err.to_string())
    })
}
