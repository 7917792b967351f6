//! Fairness on catalogs without commit locks (REST): a claim on the next commit.
//!
//! Optimistic commits favour small writers: a push re-plans and commits one bucket in a few
//! milliseconds, while a load touching most buckets loses to whichever push lands inside its
//! window, attempt after attempt, until it gives up with `CommitConflictError`. So a writer
//! that lost `CLAIM_AFTER` races in a row claims the table: it sets a table property naming
//! itself until a deadline, in a commit that requires nothing but the table's identity and so
//! never conflicts with data commits. Writers of this store that see another's live claim wait
//! (without spending attempts) until it is released or expires; the claimant then commits on
//! a quiet table and releases the claim. A claimant that dies holds the table for at most
//! `CLAIM_FOR`. Other engines ignore the property and stay optimistic. Catalogs with commit
//! locks (SQLite, PostgreSQL) queue writers in order and never need this.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use iceberg::TableUpdate;
use iceberg::spec::TableMetadata;

use super::{Changes, Landed, commit, prepare};
use crate::catalog::TableId;
use crate::error::Result;
use crate::store::Store;
use crate::table::TableState;

/// The table property: `<claimant id> <deadline, Unix ms>`.
const CLAIM_PROPERTY: &str = "feast-iceberg.commit-claim";
/// Lost races in a row before a writer claims the table.
pub const CLAIM_AFTER: u32 = 3;
/// How long a claim holds other writers back at most.
const CLAIM_FOR: Duration = Duration::from_secs(10);

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The live claim on the table: its claimant and the time it has left.
fn live_claim(md: &TableMetadata) -> Option<(&str, Duration)> {
    let (who, until) = md.properties().get(CLAIM_PROPERTY)?.split_once(' ')?;
    let left = until.parse::<i64>().ok()? - now_ms();
    (left > 0).then(|| (who, Duration::from_millis(left.unsigned_abs())))
}

/// A writer's claim, once taken.
#[derive(Debug, Default)]
pub struct Claim {
    id: Option<String>,
}

impl Claim {
    /// Whether `state` holds this writer's live claim.
    pub fn held_in(&self, state: &TableState) -> bool {
        matches!((&self.id, live_claim(&state.metadata)), (Some(mine), Some((who, _))) if mine == who)
    }

    /// Claims the table (unless another writer's claim is live) and returns the state with
    /// the claim. Any error leaves the writer as it was: the claim is only a courtesy.
    pub async fn take(
        &mut self,
        store: &Store,
        id: &TableId,
        state: &Arc<TableState>,
    ) -> Option<Arc<TableState>> {
        if live_claim(&state.metadata).is_some() {
            return None;
        }
        let mine = uuid::Uuid::new_v4().simple().to_string();
        let until = now_ms().saturating_add(CLAIM_FOR.as_millis() as i64);
        let set = TableUpdate::SetProperties {
            updates: [(CLAIM_PROPERTY.to_string(), format!("{mine} {until}"))].into(),
        };
        let now = property_commit(store, state, set).await?;
        log::info!(
            "{id}: commits lost {CLAIM_AFTER} races in a row; other writers wait for this one"
        );
        self.id = Some(mine);
        Some(now)
    }

    /// Removes this writer's claim if the table still holds it (best effort: it expires).
    pub async fn release(&mut self, store: &Store, id: &TableId) {
        if self.id.is_none() {
            return;
        }
        let Ok(state) = store.current(id, Duration::ZERO).await else {
            return;
        };
        if self.held_in(&state) {
            let remove = TableUpdate::RemoveProperties {
                removals: vec![CLAIM_PROPERTY.to_string()],
            };
            property_commit(store, &state, remove).await;
        }
        self.id = None;
    }
}

/// Waits while another writer's claim on the table is live; returns the state to go on from.
pub async fn wait_for_others(
    store: &Store,
    id: &TableId,
    mine: &Claim,
    mut state: Arc<TableState>,
) -> Result<Arc<TableState>> {
    while let Some((who, left)) = live_claim(&state.metadata) {
        if mine.id.as_deref() == Some(who) {
            break;
        }
        let poll = Duration::from_millis(20 + fastrand::u64(0..=30));
        tokio::time::sleep(left.min(poll)).await;
        state = store.current(id, Duration::ZERO).await?;
    }
    Ok(state)
}

/// Commits one property change, required to match only the table's identity: it never
/// conflicts with data commits.
async fn property_commit(
    store: &Store,
    state: &Arc<TableState>,
    update: TableUpdate,
) -> Option<Arc<TableState>> {
    let changes = Changes {
        updates: vec![update],
        ..Changes::default()
    };
    let mut prepared = prepare(&store.file_io, state, changes, None, false)
        .await
        .ok()?;
    prepared.requirements.truncate(1);
    match commit(store, state, &prepared, None).await {
        Ok(Landed::Yes(now)) => Some(now),
        _ => None,
    }
}
