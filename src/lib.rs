//! feast-iceberg: a Feast online store on Apache Iceberg with true upserts.
//!
//! The core (everything but `bindings`) knows nothing about Python, so `cargo test` runs it
//! without an interpreter. Module map: `config` (settings), `catalog` (where metadata lives and
//! the atomic swap), `storage` (FileIO), `schema` (Feast <-> Iceberg types), `proto` + `convert`
//! (Feast protos <-> Arrow, entity keys), `table` (a loaded table), `read` (point lookups),
//! `write` (upserts, compaction and snapshot building), `maintenance` (retention, orphans),
//! `migrate` (from the contrib store's layout), `metrics` (counters for operators), `store`
//! (ties them up).

pub mod catalog;
pub mod commit;
pub mod config;
pub mod convert;
pub mod error;
pub mod ingest;
pub mod maintenance;
pub mod metrics;
pub mod migrate;
pub mod proto;
pub mod read;
pub mod runtime;
pub mod schema;
pub mod storage;
pub mod store;
pub mod table;
pub mod write;

#[cfg(feature = "python")]
mod bindings;

pub use error::{Error, Result};

/// A map for per-row work on trusted keys (entity keys, file paths): SipHash, std's default,
/// was the top Rust symbol of an incremental write.
pub(crate) type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
pub use store::Store;
