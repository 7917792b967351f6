//! The one tokio runtime of the process.
//!
//! A runtime's worker threads do not survive `fork()`: a child that inherited the parent's
//! runtime would hang on its first `block_on`. We remember the PID that built the runtime and
//! build a fresh one (leaking the dead parent copy, which owns no live threads) when it changes.

use std::future::Future;
use std::sync::{Arc, Mutex};

use tokio::runtime::{Builder, Runtime};

use crate::error::{Error, Result};

static RUNTIME: Mutex<Option<(u32, Arc<Runtime>)>> = Mutex::new(None);

/// The runtime for this process, created on first use and after every fork.
pub fn runtime() -> Result<Arc<Runtime>> {
    let pid = std::process::id();
    let mut slot = RUNTIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((owner, rt)) = slot.as_ref()
        && *owner == pid
    {
        return Ok(rt.clone());
    }
    if let Some((_, stale)) = slot.take() {
        // Dropping a runtime inherited through fork would try to join threads that do not exist
        // in this process.
        std::mem::forget(stale);
    }
    let rt = Arc::new(
        Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("feast-iceberg")
            .enable_all()
            .build()
            .map_err(|e| Error::internal(format!("cannot start tokio runtime: {e}")))?,
    );
    *slot = Some((pid, rt.clone()));
    Ok(rt)
}

/// Runs a future to completion on the shared runtime (the caller must not be on a runtime
/// thread). A panic inside it becomes `Error::Internal` carrying the panic message: a Python
/// caller gets a `FeastIcebergError` (catchable with `except Exception`) instead of pyo3's
/// `PanicException`, which derives from `BaseException`.
pub fn block_on<F: Future>(fut: F) -> Result<F::Output> {
    use futures::FutureExt;
    let caught = runtime()?.block_on(std::panic::AssertUnwindSafe(fut).catch_unwind());
    caught.map_err(|payload| Error::internal(format!("panic: {}", panic_message(&*payload))))
}

/// The text a panic was raised with (`panic!` with a literal or a formatted message).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_an_internal_error_and_the_runtime_survives() {
        let n = 7;
        let err = block_on(async move {
            if n > 0 {
                panic!("invariant broken at {n}");
            }
        })
        .unwrap_err();
        assert!(
            matches!(&err, Error::Internal(m) if m.contains("panic: invariant broken at 7")),
            "{err}"
        );
        async fn boom() {
            panic!("plain");
        }
        let literal = block_on(boom()).unwrap_err();
        assert!(matches!(&literal, Error::Internal(m) if m.ends_with("panic: plain")));
        assert_eq!(block_on(async { 1 + 1 }).unwrap(), 2);
    }
}
