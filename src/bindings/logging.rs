//! Rust `log` records forwarded to Python's `logging`: the core logs with `log::warn!` and
//! friends, a record's target (`feast_iceberg::write::overwrite`) becomes the logger name
//! (`feast_iceberg.write.overwrite`), so `logging.getLogger("feast_iceberg")` configures them
//! all.
//!
//! A small bridge instead of the pyo3-log crate: pyo3-log needs `log`'s `std` feature, which
//! would change the features of `log` under iceberg, sqlx and reqwest and rebuild all of them
//! (twice: the wheel and `cargo test` would no longer share them). It also checks the Python
//! logger's level on every record instead of caching it, so `logging` configuration changed
//! at any time takes effect; that costs a GIL acquisition per record, fine for warnings.
//!
//! Rule for the core: never log while holding a lock a GIL-holding Python thread may wait for
//! (the read cache's, for instance): the log call waits for the GIL.

use log::{Level, LevelFilter, Log, Metadata, Record};
use pyo3::prelude::*;

/// Our crate's records down to debug; dependencies' (sqlx, reqwest, iceberg) only from error
/// up: sqlx alone warns about every statement slower than a second, which concurrent writers
/// waiting on SQLite's lock produce in numbers.
const OURS: &str = "feast_iceberg";
const OUR_LEVEL: LevelFilter = LevelFilter::Debug;
const OTHERS_LEVEL: LevelFilter = LevelFilter::Error;

struct PythonLogging;

static LOGGER: PythonLogging = PythonLogging;

fn python_level(level: Level) -> u8 {
    match level {
        Level::Error => 40,
        Level::Warn => 30,
        Level::Info => 20,
        Level::Debug => 10,
        Level::Trace => 5,
    }
}

fn logger_name(target: &str) -> String {
    target.replace("::", ".")
}

impl Log for PythonLogging {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        let ours = metadata.target() == OURS || metadata.target().starts_with("feast_iceberg::");
        metadata.level() <= if ours { OUR_LEVEL } else { OTHERS_LEVEL }
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let name = logger_name(record.target());
        let message = record.args().to_string();
        let level = python_level(record.level());
        // None while the interpreter shuts down (a background task may still log): the
        // record is dropped then, there is no Python left to hand it to.
        let _ = Python::try_attach(|py| {
            // A record logged while an exception is pending must not replace it.
            let pending = PyErr::take(py);
            let sent = py
                .import("logging")
                .and_then(|logging| logging.call_method1("getLogger", (name,)))
                .and_then(|logger| logger.call_method1("log", (level, "%s", message)));
            if let Err(e) = sent {
                e.write_unraisable(py, None);
            }
            if let Some(pending) = pending {
                pending.restore(py);
            }
        });
    }

    fn flush(&self) {}
}

/// Installs the bridge once per process; a second import (another interpreter) keeps it.
pub fn install() {
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(OUR_LEVEL.max(OTHERS_LEVEL));
    }
}
