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

/// Runs a future to completion on the shared runtime (the caller must not be on a runtime thread).
pub fn block_on<F: Future>(fut: F) -> Result<F::Output> {
    Ok(runtime()?.block_on(fut))
}
