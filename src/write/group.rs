//! Group commit: concurrent writes to one table in one process (threads, async pushes, a
//! feature server's push endpoint) coalesce into one snapshot.
//!
//! Each caller converts and validates its own batch first, so bad input fails only that
//! caller. It then joins the table's queue. The first caller to find no commit in flight leads:
//! a task takes everything queued, commits it as one write through the commit module, hands
//! every member its own report, and goes on while callers keep arriving. A commit that returns
//! has landed for every member in it; nothing is acknowledged before.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow_array::RecordBatch;
use tokio::sync::{Notify, oneshot};

use super::{Placement, Rows, RowsPlanner, StoreIo, WriteReport, report};
use crate::catalog::TableId;
use crate::commit;
use crate::error::{Error, Result};
use crate::store::Store;

/// Rows one group commit takes at most: a big batch commits alone rather than wait for or
/// hold up the group.
const MAX_GROUP_ROWS: usize = 1 << 20;

/// The longest a leader waits for the callers of its last group to come back.
const MAX_GATHER: Duration = Duration::from_millis(4);

/// One caller's batch (in the table's Arrow schema) and where its report goes.
struct Member {
    batch: RecordBatch,
    reply: oneshot::Sender<Result<WriteReport>>,
}

#[derive(Default)]
struct Queue {
    waiting: Vec<Member>,
    /// A leader task is committing (and will take what waits when it is done).
    leading: bool,
    /// Told of every member that joins, for a leader gathering a group.
    joined: Arc<Notify>,
}

/// The queues of a store's tables.
#[derive(Default)]
pub struct Groups {
    tables: Mutex<HashMap<TableId, Arc<Mutex<Queue>>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Groups {
    fn queue(&self, id: &TableId) -> Arc<Mutex<Queue>> {
        lock(&self.tables).entry(id.clone()).or_default().clone()
    }
}

/// Upserts `batch` (converted for the table's current schema) together with whatever other
/// writes to the table are waiting, in one snapshot; returns this batch's own report.
pub async fn write(store: &Arc<Store>, id: &TableId, batch: RecordBatch) -> Result<WriteReport> {
    let (reply, answer) = oneshot::channel();
    let queue = store.groups.queue(id);
    let lead = {
        let mut q = lock(&queue);
        q.waiting.push(Member { batch, reply });
        q.joined.notify_one();
        !std::mem::replace(&mut q.leading, true)
    };
    if lead {
        // A task, not this caller: the leader goes on committing for others after this
        // caller has its answer, and a caller that goes away does not stop it.
        tokio::spawn(lead_group(store.clone(), id.clone(), queue));
    }
    answer
        .await
        .map_err(|_| Error::internal("the group commit ended without an answer"))?
}

/// Hands the queue back if the leader dies (a panic: a bug): the callers waiting get an
/// error instead of waiting forever, and the next write leads again.
struct Leader {
    queue: Arc<Mutex<Queue>>,
    done: bool,
}

impl Drop for Leader {
    fn drop(&mut self) {
        if !self.done {
            let mut q = lock(&self.queue);
            q.leading = false;
            q.waiting.clear();
        }
    }
}

/// Commits what waits in `queue`, group after group, until nothing does.
async fn lead_group(store: Arc<Store>, id: TableId, queue: Arc<Mutex<Queue>>) {
    let mut leader = Leader { queue, done: false };
    let mut last: Option<(usize, Duration)> = None;
    loop {
        if let Some((members, took)) = last {
            gather(&leader.queue, members, took).await;
        }
        let group = {
            let mut q = lock(&leader.queue);
            if q.waiting.is_empty() {
                q.leading = false;
                leader.done = true;
                return;
            }
            take_group(&mut q.waiting)
        };
        let members = group.len();
        let started = Instant::now();
        commit_group(&store, &id, group).await;
        last = Some((members, started.elapsed()));
    }
}

/// Waits, briefly, until as many callers wait as the last group had. Callers answered by a
/// commit come back with their next write a moment later (their own conversion first): a
/// leader that took only those already back would commit the herd in halves, twice the
/// commits for the same rows (measured with 16 pushing threads: 8 rows per commit). The wait
/// is at most a quarter of the last commit's time (and `MAX_GATHER`), so a lone writer, whose
/// group is itself, never waits.
async fn gather(queue: &Mutex<Queue>, members: usize, took: Duration) {
    let deadline = Instant::now() + (took / 4).min(MAX_GATHER);
    loop {
        let joined = {
            let q = lock(queue);
            if q.waiting.len() >= members {
                return;
            }
            q.joined.clone()
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || tokio::time::timeout(left, joined.notified()).await.is_err() {
            return;
        }
    }
}

/// The oldest waiting members, up to `MAX_GROUP_ROWS` rows (at least one member).
fn take_group(waiting: &mut Vec<Member>) -> Vec<Member> {
    let mut rows = 0;
    let mut n = 0;
    for m in waiting.iter() {
        if n > 0 && rows + m.batch.num_rows() > MAX_GROUP_ROWS {
            break;
        }
        rows += m.batch.num_rows();
        n += 1;
    }
    waiting.drain(..n).collect()
}

/// Errors that only the input of a batch can cause: in a group, each member is then
/// committed on its own, so that one batch never fails another.
fn caused_by_input(e: &Error) -> bool {
    matches!(
        e,
        Error::InvalidInput(_) | Error::SchemaMismatch(_) | Error::Conversion(_)
    )
}

async fn commit_group(store: &Store, id: &TableId, group: Vec<Member>) {
    let schema = group[0].batch.schema();
    let (same, other): (Vec<Member>, Vec<Member>) =
        group.into_iter().partition(|m| m.batch.schema() == schema);
    // Batches converted for another schema (the table evolved between) commit apart.
    for m in other {
        let done = commit_members(store, id, std::slice::from_ref(&m.batch)).await;
        let _ = m.reply.send(done.map(|mut r| r.pop().unwrap_or_default()));
    }
    let batches: Vec<RecordBatch> = same.iter().map(|m| m.batch.clone()).collect();
    match commit_members(store, id, &batches).await {
        Ok(reports) => {
            for (m, r) in same.into_iter().zip(reports) {
                let _ = m.reply.send(Ok(r));
            }
        }
        Err(e) if same.len() > 1 && caused_by_input(&e) => {
            for m in same {
                let done = commit_members(store, id, std::slice::from_ref(&m.batch)).await;
                let _ = m.reply.send(done.map(|mut r| r.pop().unwrap_or_default()));
            }
        }
        Err(e) => {
            for m in same {
                let _ = m.reply.send(Err(e.clone()));
            }
        }
    }
}

/// Commits `batches` (one schema) as one write; one report per batch: its own rows written
/// and ignored, the snapshot's bucket and file counts.
async fn commit_members(
    store: &Store,
    id: &TableId,
    batches: &[RecordBatch],
) -> Result<Vec<WriteReport>> {
    let Some(first) = batches.first() else {
        return Ok(Vec::new());
    };
    let all = if batches.len() == 1 {
        first.clone()
    } else {
        arrow_select::concat::concat_batches(&first.schema(), batches)?
    };
    let mut planner = RowsPlanner {
        io: StoreIo::new(store, Placement::default()),
        rows: Rows::Batch(Arc::new(all)),
        converted: None,
    };
    let done = commit::commit_buckets(store, id, &mut planner).await?;
    // Which member each winning and each ignored row belongs to.
    let mut bounds = Vec::with_capacity(batches.len());
    let mut end = 0;
    for b in batches {
        end += b.num_rows();
        bounds.push(end);
    }
    let member_of = |row: usize| bounds.partition_point(|&e| e <= row);
    let mut won = vec![0usize; batches.len()];
    if let Some(c) = &planner.converted {
        for rows in c.groups.values() {
            for &r in rows {
                won[member_of(r)] += 1;
            }
        }
    }
    let mut ignored = vec![0usize; batches.len()];
    for c in &done.changes {
        for &r in &c.ignored_rows {
            ignored[member_of(r)] += 1;
        }
    }
    let shared = report(done);
    Ok((0..batches.len())
        .map(|i| WriteReport {
            rows_written: won[i] - ignored[i].min(won[i]),
            rows_ignored_older: ignored[i],
            ..shared.clone()
        })
        .collect())
}
