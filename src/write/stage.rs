//! Staged writes, for distributed engines (Spark, Ray): the contract of Iceberg's own Spark
//! writer. Each task writes the files of the buckets it owns (`stage_batch`, rows repartitioned
//! by bucket so that one task owns each bucket) and returns a `Token` describing them; the
//! driver commits every token of a job in one snapshot (`StagedPlanner` through
//! `commit::commit_buckets`) and then deletes what failed or speculative attempts left under
//! the job's directory (`discard`).
//!
//! A token's bucket is valid while the bucket still holds the files it was staged on. A bucket
//! another writer changed in between (or that two tokens both staged) is merged again at commit
//! time from the staged rows: the newest version per key wins, as in every write, so the result
//! is the same as if the staged write had come second.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use arrow_array::RecordBatch;
use iceberg::spec::{
    DataFile, FormatVersion, deserialize_data_file_from_json, serialize_data_file_to_json,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{Placement, StoreIo, plan_buckets, rewrite_bucket, winners_by_bucket};
use crate::commit::{BucketChange, Planner, delete_quietly};
use crate::error::{Error, Result};
use crate::read::load_whole_file;
use crate::store::Store;
use crate::table::TableState;

const TOKEN_VERSION: u32 = 1;

/// What one task staged: its buckets' files, against the table as the task saw it.
#[derive(Debug, Serialize, Deserialize)]
pub struct Token {
    version: u32,
    table: String,
    job: String,
    attempt: String,
    schema_id: i32,
    spec_id: i32,
    buckets: Vec<StagedBucket>,
}

/// `commit::BucketChange` with its files as Iceberg's JSON data-file form.
#[derive(Debug, Serialize, Deserialize)]
struct StagedBucket {
    bucket: i32,
    base: Vec<String>,
    added: Vec<String>,
    removed: Vec<String>,
    added_deletes: Vec<String>,
    removed_deletes: Vec<String>,
    written: usize,
    ignored_older: usize,
    merge_on_read: bool,
}

impl Token {
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        serde_json::to_vec(self).map_err(|e| Error::internal(format!("encode a token: {e}")))
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let token: Self = serde_json::from_slice(bytes)
            .map_err(|e| Error::input(format!("not a staged-write token: {e}")))?;
        if token.version != TOKEN_VERSION {
            return Err(Error::input(format!(
                "staged-write token version {} (this build reads {TOKEN_VERSION})",
                token.version
            )));
        }
        Ok(token)
    }

    /// Every file the token names as written.
    fn written_paths(&self, state: &TableState) -> Result<Vec<String>> {
        Ok(self
            .changes(state)?
            .iter()
            .flat_map(BucketChange::written_paths)
            .collect())
    }

    fn changes(&self, state: &TableState) -> Result<Vec<BucketChange>> {
        let md = &state.metadata;
        let schema = md.schema_by_id(self.schema_id).ok_or_else(|| {
            Error::table_state(
                &state.id,
                format!("the token's schema {} is not in the table", self.schema_id),
            )
        })?;
        let spec = md.partition_spec_by_id(self.spec_id).ok_or_else(|| {
            Error::table_state(
                &state.id,
                format!("the token's partition spec {} is gone", self.spec_id),
            )
        })?;
        let partition_type = spec.partition_type(schema)?;
        let decode = |files: &[String]| -> Result<Vec<DataFile>> {
            files
                .iter()
                .map(|j| {
                    Ok(deserialize_data_file_from_json(
                        j,
                        self.spec_id,
                        &partition_type,
                        schema,
                    )?)
                })
                .collect()
        };
        self.buckets
            .iter()
            .map(|b| {
                Ok(BucketChange {
                    bucket: b.bucket,
                    base: b.base.iter().cloned().collect(),
                    spec_id: self.spec_id,
                    added: decode(&b.added)?,
                    removed: b.removed.clone(),
                    added_deletes: decode(&b.added_deletes)?,
                    removed_deletes: b.removed_deletes.clone(),
                    written: b.written,
                    ignored_older: b.ignored_older,
                    ignored_rows: Vec::new(),
                    merge_on_read: b.merge_on_read,
                })
            })
            .collect()
    }
}

/// Job and attempt names become directory names.
fn check_name(what: &str, name: &str) -> Result<()> {
    crate::catalog::validate_name(what, name)
}

/// The directory (under the table's data location) of a job, or of one attempt of it.
fn staging_dir(job: &str, attempt: Option<&str>) -> String {
    match attempt {
        Some(a) => format!("_staged/{job}/{a}"),
        None => format!("_staged/{job}"),
    }
}

/// Writes the buckets of `batch` (rows in the table's Arrow schema) against the table's
/// current state, under the job's attempt directory, and describes them. Nothing is visible
/// until the token is committed; on an error nothing is left behind.
pub async fn stage_batch(
    store: &Store,
    table: &str,
    batch: RecordBatch,
    job: &str,
    attempt: &str,
) -> Result<Token> {
    check_name("job", job)?;
    check_name("attempt", attempt)?;
    let id = store.table_id(table)?;
    let state = store.current(&id, Duration::ZERO).await?;
    if batch.schema() != state.layout.arrow {
        return Err(Error::schema(format!(
            "{id} changed schema while rows were being converted for it"
        )));
    }
    let io = StoreIo::new(
        store,
        Placement {
            staging: Some(staging_dir(job, Some(attempt))),
        },
    );
    let groups = winners_by_bucket(&batch, &state.layout)?;
    let incoming = Arc::new(batch);
    let changes = plan_buckets(&io, &state, &incoming, groups.into_iter(), false)
        .await
        .map_err(|e| e.in_table(&id))?;
    let spec = state.metadata.default_partition_spec();
    let partition_type = spec.partition_type(state.metadata.current_schema())?;
    let encode = |files: &[DataFile]| -> Result<Vec<String>> {
        files
            .iter()
            .map(|f| {
                Ok(serialize_data_file_to_json(
                    f.clone(),
                    &partition_type,
                    FormatVersion::V2,
                )?)
            })
            .collect()
    };
    let encoded: Result<Vec<StagedBucket>> = changes
        .iter()
        .map(|c| {
            Ok(StagedBucket {
                bucket: c.bucket,
                base: c.base.iter().cloned().collect(),
                added: encode(&c.added)?,
                removed: c.removed.clone(),
                added_deletes: encode(&c.added_deletes)?,
                removed_deletes: c.removed_deletes.clone(),
                written: c.written,
                ignored_older: c.ignored_older,
                merge_on_read: c.merge_on_read,
            })
        })
        .collect();
    let buckets = match encoded {
        Ok(b) => b,
        Err(e) => {
            let paths: Vec<String> = changes
                .iter()
                .flat_map(BucketChange::written_paths)
                .collect();
            delete_quietly(&store.file_io, &id, &paths).await;
            return Err(e);
        }
    };
    Ok(Token {
        version: TOKEN_VERSION,
        table: id.to_string(),
        job: job.to_string(),
        attempt: attempt.to_string(),
        schema_id: state.metadata.current_schema_id(),
        spec_id: spec.spec_id(),
        buckets,
    })
}

/// Commits staged tokens: their bucket changes as they are where the bucket is unchanged;
/// the rest merged again from the staged rows, in the job's directory.
pub struct StagedPlanner {
    io: StoreIo,
    tokens: Vec<Token>,
}

impl StagedPlanner {
    pub fn new(store: &Store, table: &str, tokens: Vec<Token>) -> Result<Self> {
        let id = store.table_id(table)?.to_string();
        let mut job = None;
        for t in &tokens {
            if t.table != id {
                return Err(Error::input(format!(
                    "a token of {} cannot be committed to {id}",
                    t.table
                )));
            }
            if job.get_or_insert(t.job.as_str()) != &t.job {
                return Err(Error::input(
                    "tokens of different jobs cannot be committed together",
                ));
            }
        }
        let staging = job.map(|j| staging_dir(j, Some(&format!("commit-{}", Uuid::new_v4()))));
        Ok(Self {
            io: StoreIo::new(store, Placement { staging }),
            tokens,
        })
    }

    /// The rows `previous` staged (the files they add), in `state`'s schema.
    async fn staged_rows(
        &self,
        state: &TableState,
        previous: &[&BucketChange],
    ) -> Result<RecordBatch> {
        let layout = &state.layout;
        let mut parts = Vec::new();
        for file in previous.iter().flat_map(|c| &c.added) {
            parts.push(
                load_whole_file(
                    &self.io.file_io,
                    file.file_path(),
                    layout,
                    &self.io.stats.data,
                )
                .await?,
            );
        }
        Ok(arrow_select::concat::concat_batches(&layout.arrow, &parts)?)
    }

    /// Merges the staged rows of `previous` (changes of one bucket) into the bucket as `state`
    /// holds it.
    async fn merge_again(
        &self,
        state: &Arc<TableState>,
        bucket: i32,
        previous: &[&BucketChange],
    ) -> Result<BucketChange> {
        let rows = self.staged_rows(state, previous).await?;
        let all: Vec<usize> = (0..rows.num_rows()).collect();
        rewrite_bucket(
            self.io.clone(),
            state.clone(),
            Arc::new(rows),
            bucket,
            all,
            Uuid::new_v4(),
            false,
        )
        .await
    }

    /// Merges the staged rows of `previous`, staged against another partition spec (the table
    /// was re-bucketed while the job ran), into `state`'s buckets: each row goes to its bucket
    /// under the current spec, as in any write.
    async fn regroup(
        &self,
        state: &Arc<TableState>,
        previous: &[&BucketChange],
    ) -> Result<Vec<BucketChange>> {
        let rows = self.staged_rows(state, previous).await?;
        let groups = winners_by_bucket(&rows, &state.layout)?;
        plan_buckets(&self.io, state, &Arc::new(rows), groups.into_iter(), false).await
    }
}

#[async_trait::async_trait]
impl Planner for StagedPlanner {
    async fn plan(
        &mut self,
        state: &Arc<TableState>,
        again: Option<&[BucketChange]>,
    ) -> Result<Vec<BucketChange>> {
        let spec = state.metadata.default_partition_spec_id();
        if let Some(previous) = again {
            if previous.iter().any(|c| c.spec_id != spec) {
                let all: Vec<&BucketChange> = previous.iter().collect();
                return self.regroup(state, &all).await;
            }
            let mut out = Vec::with_capacity(previous.len());
            for c in previous {
                out.push(self.merge_again(state, c.bucket, &[c]).await?);
            }
            return Ok(out);
        }
        let mut by_bucket: BTreeMap<i32, Vec<BucketChange>> = BTreeMap::new();
        for t in &self.tokens {
            if t.schema_id != state.metadata.current_schema_id() {
                return Err(Error::schema(format!(
                    "{}: the schema changed while the job ran; materialize again",
                    state.id
                )));
            }
            for c in t.changes(state)? {
                by_bucket.entry(c.bucket).or_default().push(c);
            }
        }
        if self.tokens.iter().any(|t| t.spec_id != spec) {
            // Bucket numbers of another spec name other keys: every staged row is placed
            // again. The staged files are then the job's leftovers (`discard` deletes them).
            let all: Vec<&BucketChange> = by_bucket.values().flatten().collect();
            return self.regroup(state, &all).await;
        }
        let mut out = Vec::with_capacity(by_bucket.len());
        for (bucket, mut changes) in by_bucket {
            if changes.len() == 1 {
                out.extend(changes.pop());
                continue;
            }
            // Two tasks staged one bucket (rows not partitioned by bucket): merge both.
            let refs: Vec<&BucketChange> = changes.iter().collect();
            let merged = self.merge_again(state, bucket, &refs).await?;
            let paths: Vec<String> = changes
                .iter()
                .flat_map(BucketChange::written_paths)
                .collect();
            delete_quietly(&self.io.file_io, &state.id, &paths).await;
            out.push(merged);
        }
        Ok(out)
    }

    fn rebases_onto(&self, planned_on: &TableState, state: &TableState) -> bool {
        let md = &state.metadata;
        self.tokens
            .iter()
            .all(|t| t.schema_id == md.current_schema_id())
            && planned_on.metadata.default_partition_spec_id() == md.default_partition_spec_id()
    }
}

/// Deletes every file under the job's staging directory that neither a retained snapshot of
/// the table nor a token in `keep` references: what failed, killed or speculative attempts
/// wrote. Returns how many files were deleted.
pub async fn discard(store: &Store, table: &str, job: &str, keep: &[Token]) -> Result<usize> {
    check_name("job", job)?;
    let id = store.table_id(table)?;
    let state = store.current(&id, Duration::ZERO).await?;
    let dir = Placement {
        staging: Some(staging_dir(job, None)),
    }
    .data_dir(&state.metadata);
    let found = crate::storage::list_files(&store.config, &dir).await?;
    if found.is_empty() {
        return Ok(0);
    }
    let mut referenced: HashSet<String> = HashSet::new();
    for t in keep {
        referenced.extend(t.written_paths(&state)?);
    }
    let md = &state.metadata;
    for s in md.snapshots() {
        let files = store
            .snapshot_files(md, s.snapshot_id(), Some(&state.files))
            .await?
            .ok_or_else(|| Error::internal("snapshot vanished from its own metadata"))?;
        referenced.extend(files.data.iter().map(|f| f.path().to_string()));
        referenced.extend(files.delete_paths.iter().cloned());
    }
    let doomed: Vec<String> = found
        .into_iter()
        .filter(|p| !referenced.contains(p))
        .collect();
    Ok(delete_quietly(&store.file_io, &id, &doomed).await)
}
