//! The one tokio runtime of the process.
//!
//! A runtime's worker threads do not survive `fork()`: a child that inherited the parent's
//! runtime would hang on its first `block_on`. We remember the PID that built the runtime and
//! build a fresh one (leaking the dead parent copy, which owns no live threads) when it changes.
//!
//! The two async workers only drive I/O and futures: CPU-heavy work runs on tokio's blocking
//! pool, so that a rewrite never holds up the I/O of a read or of the catalog (on object
//! storage a read needs a worker to see its response). Reads hand their decodes to
//! [`blocking`]; writes hand theirs to [`cpu`], at most one job per core, so that a write of
//! many buckets cannot crowd the cores (or the pool) that reads decode on.
//!
//! Work that must yield the cores to reads (a write's CPU-heavy steps, the background
//! preparation of a new snapshot) runs on the threads of a second, background runtime, at a
//! lower OS priority (nice +10 on Linux): a feature server that also takes pushes, or a
//! materialization sharing its machine, then slows reads down far less, while on an idle
//! machine that work runs as fast as before.

use std::future::Future;
use std::sync::{Arc, Mutex};

use tokio::runtime::{Builder, Runtime};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::{Error, Result};

type PerProcess<T> = Mutex<Option<(u32, Arc<T>)>>;

static RUNTIME: PerProcess<Runtime> = Mutex::new(None);
static CPU_SLOTS: PerProcess<Semaphore> = Mutex::new(None);
static READ_SLOTS: PerProcess<Semaphore> = Mutex::new(None);
static BACKGROUND: PerProcess<Runtime> = Mutex::new(None);

/// The value of `slot` for this process: made on first use and again after every fork.
fn per_process<T>(slot: &PerProcess<T>, make: impl FnOnce() -> Result<T>) -> Result<Arc<T>> {
    let pid = std::process::id();
    let mut slot = slot
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((owner, value)) = slot.as_ref()
        && *owner == pid
    {
        return Ok(value.clone());
    }
    if let Some((_, stale)) = slot.take() {
        // Dropping a runtime inherited through fork would try to join threads that do not exist
        // in this process; a semaphore may count permits held by such threads.
        std::mem::forget(stale);
    }
    let value = Arc::new(make()?);
    *slot = Some((pid, value.clone()));
    Ok(value)
}

/// The runtime for this process, created on first use and after every fork.
pub fn runtime() -> Result<Arc<Runtime>> {
    per_process(&RUNTIME, || {
        Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("feast-iceberg")
            .enable_all()
            .build()
            .map_err(|e| Error::internal(format!("cannot start tokio runtime: {e}")))
    })
}

/// A panic or cancellation of a blocking job, as an error carrying the panic message.
fn join_error(e: tokio::task::JoinError) -> Error {
    match e.try_into_panic() {
        Ok(payload) => Error::internal(format!("panic: {}", panic_message(&*payload))),
        Err(e) => Error::internal(format!("blocking task failed: {e}")),
    }
}

/// Runs `f` on the blocking pool, started now (not when awaited): for the short decodes of a
/// read, which must never queue behind a write's jobs.
pub fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> impl Future<Output = Result<T>> {
    let task = tokio::task::spawn_blocking(f);
    async move { task.await.map_err(join_error) }
}

/// The machine's cores (what the CPU slots and bounded write tasks count).
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(2, std::num::NonZero::get)
}

/// Lowers the calling thread's OS priority. On Linux a thread has its own nice value; other
/// systems would lower the whole process, so there the thread keeps its priority.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        unsafe extern "C" {
            fn nice(inc: i32) -> i32;
        }
        // glibc's nice() changes the calling thread's nice value on Linux, relative to what
        // it is (a process started under `nice` keeps its background threads below it).
        // Best effort: a failure leaves the thread at its priority.
        // SAFETY: a plain libc call with no pointers.
        unsafe {
            nice(10);
        }
    }
}

/// The background runtime: its threads (the blocking pool included) run at low priority.
fn background() -> Result<Arc<Runtime>> {
    per_process(&BACKGROUND, || {
        Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("feast-iceberg-bg")
            .on_thread_start(lower_priority)
            .enable_all()
            .build()
            .map_err(|e| Error::internal(format!("cannot start background runtime: {e}")))
    })
}

/// Runs `f` on a low-priority thread, started now (not when awaited): background work that
/// yields the cores to reads (preparing a new snapshot for them).
pub fn background_blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> impl Future<Output = Result<T>> {
    let task = background().map(|rt| rt.spawn_blocking(f));
    async move { task?.await.map_err(join_error) }
}

/// Runs the CPU-heavy `f` of a write on a low-priority thread, once one of the process's
/// slots (one per core) is free.
pub async fn cpu<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let slots = per_process(&CPU_SLOTS, || Ok(Semaphore::new(cores())))?;
    let _slot = slots
        .acquire()
        .await
        .map_err(|e| Error::internal(format!("cpu slots closed: {e}")))?;
    background_blocking(f).await
}

/// One of the process's slots (one per core) for a job whose memory lives as long as it runs
/// (a parsed footer until it is indexed), held until the permit drops: a burst of such jobs
/// then holds a core's worth each at once, not the whole burst's. `background` work shares
/// the slots of [`cpu`]; a request's has slots of its own, so it never waits behind a write.
pub async fn slot(background: bool) -> Result<OwnedSemaphorePermit> {
    let slots = per_process(if background { &CPU_SLOTS } else { &READ_SLOTS }, || {
        Ok(Semaphore::new(cores()))
    })?;
    slots
        .acquire_owned()
        .await
        .map_err(|e| Error::internal(format!("slots closed: {e}")))
}

/// [`cpu`] for work that is CPU-bound but written as a future (Parquet encoding inside
/// iceberg's async writer): driven on a blocking thread, its I/O still served by the runtime.
pub async fn cpu_future<F>(fut: F) -> Result<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handle = tokio::runtime::Handle::current();
    cpu(move || handle.block_on(fut)).await
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
        let blocking_panic = block_on(cpu(|| -> u8 { panic!("in a cpu slot") })).unwrap();
        assert!(matches!(&blocking_panic, Err(Error::Internal(m)) if m.contains("in a cpu slot")));
    }

    fn spin(d: Duration) {
        let start = Instant::now();
        while start.elapsed() < d {
            std::hint::spin_loop();
        }
    }

    /// The worst lateness of a 5 ms timer on the runtime while `jobs` run: a timer fires
    /// only when a worker is free to drive the timer (and I/O) driver.
    fn timer_lag_during(jobs: impl FnOnce() -> Vec<tokio::task::JoinHandle<()>>) -> Duration {
        block_on(async move {
            let ticker = tokio::spawn(async {
                let mut worst = Duration::ZERO;
                for _ in 0..20 {
                    let t = Instant::now();
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    worst = worst.max(t.elapsed().saturating_sub(Duration::from_millis(5)));
                }
                worst
            });
            let running = jobs();
            let worst = ticker.await.unwrap();
            for j in running {
                j.await.unwrap();
            }
            worst
        })
        .unwrap()
    }

    use std::time::{Duration, Instant};

    #[test]
    fn cpu_work_leaves_the_async_workers_free() {
        let job = Duration::from_millis(400);
        // What a rewrite did before: CPU work inside tasks on the two workers.
        let inline = timer_lag_during(|| {
            (0..4)
                .map(|_| tokio::spawn(async move { spin(job) }))
                .collect()
        });
        let offloaded = timer_lag_during(|| {
            (0..4)
                .map(|_| {
                    tokio::spawn(async move {
                        cpu(move || spin(job)).await.unwrap();
                    })
                })
                .collect()
        });
        assert!(
            inline > Duration::from_millis(250),
            "the probe cannot see a busy worker: {inline:?}"
        );
        assert!(
            offloaded < Duration::from_millis(150),
            "timers waited {offloaded:?} behind cpu jobs"
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn writes_and_background_work_run_below_reads() {
        fn nice() -> i32 {
            // Field 19 of /proc/thread-self/stat, counted after the command's closing paren.
            let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
            let after = &stat[stat.rfind(')').unwrap() + 2..];
            after.split(' ').nth(16).unwrap().parse().unwrap()
        }
        let (read, write, prepare) = block_on(async {
            let read = blocking(nice).await.unwrap();
            let write = cpu(nice).await.unwrap();
            let prepare = background_blocking(nice).await.unwrap();
            (read, write, prepare)
        })
        .unwrap();
        assert_eq!(read, nice());
        // Nice values stop at 19.
        assert_eq!(write, (read + 10).min(19));
        assert_eq!(prepare, (read + 10).min(19));
    }
}
