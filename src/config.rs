//! The store configuration, parsed once from the JSON the Python shim builds.
//! Secrets (passwords in URIs, keys and tokens in storage options) never reach `Debug` output.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::Deserialize;

use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CatalogType {
    Sql,
    Rest,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    pub catalog_type: CatalogType,
    pub catalog_name: String,
    pub uri: String,
    pub warehouse: String,
    pub namespace: String,
    pub partition_count: u32,
    #[serde(default)]
    pub read_timeout_ms: Option<u64>,
    #[serde(default)]
    pub storage_options: BTreeMap<String, String>,
    pub metadata_refresh_seconds: f64,
    pub snapshot_retention_count: usize,
    pub snapshot_retention_seconds: f64,
    pub metadata_previous_versions_max: usize,
    pub commit_max_retries: u32,
    pub entity_key_serialization_version: u32,
    /// Byte budget of the decoded data-file cache of the read path.
    #[serde(default = "default_read_cache_bytes")]
    pub read_cache_bytes: usize,
    /// Merge-on-read for a bucket when its incoming rows are at most this fraction of its live
    /// rows (0 turns merge-on-read off: every write is copy-on-write).
    #[serde(default = "default_mor_max_fraction")]
    pub merge_on_read_max_fraction: f64,
    /// A merge-on-read write into a bucket holding this many data files merges the bucket's
    /// small files into one (automatic compaction).
    #[serde(default = "default_mor_max_files")]
    pub merge_on_read_max_files: usize,
    /// A bucket in which more than this fraction of the stored rows would be deleted rows is
    /// rewritten copy-on-write (automatic compaction).
    #[serde(default = "default_mor_max_delete_ratio")]
    pub merge_on_read_max_delete_ratio: f64,
    /// How long a SQL catalog operation waits for a pooled connection (opening one included)
    /// before it fails with a catalog error.
    #[serde(default = "default_catalog_acquire_timeout")]
    pub catalog_acquire_timeout_seconds: f64,
    /// Compaction re-buckets the table (more buckets, each bucket split evenly) once its
    /// largest bucket holds more live bytes than this; 0: only when asked for.
    #[serde(default = "default_target_bucket_bytes")]
    pub target_bucket_bytes: u64,
}

fn default_read_cache_bytes() -> usize {
    512 << 20
}

fn default_mor_max_fraction() -> f64 {
    0.1
}

fn default_mor_max_files() -> usize {
    8
}

fn default_mor_max_delete_ratio() -> f64 {
    0.2
}

fn default_catalog_acquire_timeout() -> f64 {
    10.0
}

fn default_target_bucket_bytes() -> u64 {
    128 << 20
}

/// Seconds a `Duration` can hold without `Duration::from_secs_f64` panicking, with margin;
/// about 31,700 years.
const MAX_SECONDS: f64 = 1e12;

impl StoreConfig {
    pub fn from_json(json: &str) -> Result<Self> {
        let cfg: Self = serde_json::from_str(json).map_err(|e| Error::config(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        if !(1..=4096).contains(&self.partition_count) {
            return Err(Error::config(format!(
                "partition_count must be in 1..=4096, got {}",
                self.partition_count
            )));
        }
        if self.entity_key_serialization_version < 3 {
            return Err(Error::config(
                "entity_key_serialization_version must be 3 or newer (Feast removed older versions)",
            ));
        }
        for (name, v) in [
            (
                "merge_on_read_max_fraction",
                self.merge_on_read_max_fraction,
            ),
            (
                "merge_on_read_max_delete_ratio",
                self.merge_on_read_max_delete_ratio,
            ),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(Error::config(format!("{name} must be in [0, 1], got {v}")));
            }
        }
        if self.merge_on_read_max_files < 2 {
            return Err(Error::config(
                "merge_on_read_max_files must be >= 2 (a merge-on-read write adds a file)",
            ));
        }
        for (name, v) in [
            ("metadata_refresh_seconds", self.metadata_refresh_seconds),
            (
                "snapshot_retention_seconds",
                self.snapshot_retention_seconds,
            ),
        ] {
            if !(0.0..=MAX_SECONDS).contains(&v) {
                return Err(Error::config(format!(
                    "{name} must be a number in [0, {MAX_SECONDS:e}], got {v}"
                )));
            }
        }
        let acquire = self.catalog_acquire_timeout_seconds;
        if !(acquire > 0.0 && acquire <= MAX_SECONDS) {
            return Err(Error::config(format!(
                "catalog_acquire_timeout_seconds must be a number in (0, {MAX_SECONDS:e}], got \
                 {acquire}"
            )));
        }
        if self.snapshot_retention_count == 0 {
            return Err(Error::config("snapshot_retention_count must be >= 1"));
        }
        crate::catalog::validate_namespace(&self.namespace)?;
        if self.catalog_name.is_empty() {
            return Err(Error::config("catalog_name must not be empty"));
        }
        Ok(())
    }

    pub fn metadata_refresh(&self) -> Duration {
        Duration::from_secs_f64(self.metadata_refresh_seconds)
    }

    pub fn snapshot_grace(&self) -> Duration {
        Duration::from_secs_f64(self.snapshot_retention_seconds)
    }

    pub fn catalog_acquire_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.catalog_acquire_timeout_seconds)
    }
}

impl fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let options: BTreeMap<&str, &str> = self
            .storage_options
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str(),
                    if is_secret_key(k) { "***" } else { v.as_str() },
                )
            })
            .collect();
        f.debug_struct("StoreConfig")
            .field("catalog_type", &self.catalog_type)
            .field("catalog_name", &self.catalog_name)
            .field("uri", &redact_uri(&self.uri))
            .field("warehouse", &redact_uri(&self.warehouse))
            .field("namespace", &self.namespace)
            .field("partition_count", &self.partition_count)
            .field("storage_options", &options)
            .finish_non_exhaustive()
    }
}

/// Storage option keys whose values are credentials.
pub fn is_secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    [
        "secret",
        "password",
        "token",
        "credential",
        "session",
        "key-id",
        "access-key",
    ]
    .iter()
    .any(|s| k.contains(s))
}

/// `scheme://user:password@host/...` -> `scheme://user:***@host/...`.
pub fn redact_uri(uri: &str) -> String {
    let Some(scheme_end) = uri.find("://") else {
        return uri.to_string();
    };
    let rest = &uri[scheme_end + 3..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        return uri.to_string();
    };
    let userinfo = &authority[..at];
    let user = userinfo.split(':').next().unwrap_or("");
    let redacted = if userinfo.contains(':') {
        format!("{user}:***")
    } else {
        "***".to_string()
    };
    format!("{}{}@{}", &uri[..scheme_end + 3], redacted, &rest[at + 1..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords_in_uris() {
        assert_eq!(
            redact_uri("postgresql://feast:hunter2@127.0.0.1:5432/db"),
            "postgresql://feast:***@127.0.0.1:5432/db"
        );
        assert_eq!(redact_uri("sqlite:////tmp/x.db"), "sqlite:////tmp/x.db");
        assert_eq!(redact_uri("https://tok@h/x"), "https://***@h/x");
    }

    #[test]
    fn debug_hides_secrets() {
        let json = r#"{"catalog_type":"sql","catalog_name":"c","uri":"postgresql://u:hunter2@h/db",
            "warehouse":"file:///tmp/w","namespace":"ns","partition_count":16,
            "storage_options":{"s3.secret-access-key":"s3cr3t","s3.region":"us-east-1"},
            "metadata_refresh_seconds":1.0,"snapshot_retention_count":1,
            "snapshot_retention_seconds":1.0,"metadata_previous_versions_max":5,
            "commit_max_retries":3,"entity_key_serialization_version":3}"#;
        let cfg = StoreConfig::from_json(json).unwrap();
        let shown = format!("{cfg:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("s3cr3t"),
            "{shown}"
        );
        assert!(shown.contains("us-east-1"));
    }

    #[test]
    fn rejects_bad_values() {
        let bad = r#"{"catalog_type":"sql","catalog_name":"c","uri":"sqlite:///x","warehouse":"w",
            "namespace":"ns","partition_count":0,"metadata_refresh_seconds":1.0,
            "snapshot_retention_count":1,"snapshot_retention_seconds":1.0,
            "metadata_previous_versions_max":5,"commit_max_retries":3,
            "entity_key_serialization_version":3}"#;
        assert!(matches!(StoreConfig::from_json(bad), Err(Error::Config(_))));
        assert!(matches!(
            StoreConfig::from_json(r#"{"catalog_type":"hive"}"#),
            Err(Error::Config(_))
        ));
    }

    #[test]
    fn merge_on_read_limits_are_checked() {
        let json = |extra: &str| {
            format!(
                r#"{{"catalog_type":"sql","catalog_name":"c","uri":"sqlite:///x","warehouse":"w",
                "namespace":"ns","partition_count":16,"metadata_refresh_seconds":1.0,
                "snapshot_retention_count":1,"snapshot_retention_seconds":1.0,
                "metadata_previous_versions_max":5,"commit_max_retries":3,
                "entity_key_serialization_version":3{extra}}}"#
            )
        };
        let cfg = StoreConfig::from_json(&json("")).unwrap();
        assert_eq!(
            (
                cfg.merge_on_read_max_fraction,
                cfg.merge_on_read_max_files,
                cfg.merge_on_read_max_delete_ratio
            ),
            (0.1, 8, 0.2)
        );
        for bad in [
            r#","merge_on_read_max_fraction":1.5"#,
            r#","merge_on_read_max_delete_ratio":-0.1"#,
            r#","merge_on_read_max_files":1"#,
        ] {
            assert!(
                matches!(StoreConfig::from_json(&json(bad)), Err(Error::Config(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn catalog_acquire_timeout_is_a_setting() {
        let json = |acquire: &str, refresh: &str| {
            format!(
                r#"{{"catalog_type":"sql","catalog_name":"c","uri":"sqlite:///x","warehouse":"w",
                "namespace":"ns","partition_count":16,"metadata_refresh_seconds":{refresh},
                "snapshot_retention_count":1,"snapshot_retention_seconds":1.0,
                "metadata_previous_versions_max":5,"commit_max_retries":3,
                "entity_key_serialization_version":3{acquire}}}"#
            )
        };
        let default = StoreConfig::from_json(&json("", "1.0")).unwrap();
        assert_eq!(default.catalog_acquire_timeout(), Duration::from_secs(10));
        let short =
            StoreConfig::from_json(&json(r#","catalog_acquire_timeout_seconds":0.25"#, "1"));
        assert_eq!(
            short.unwrap().catalog_acquire_timeout(),
            Duration::from_millis(250)
        );
        // 1e300 is finite, but `Duration::from_secs_f64` panics on it.
        for (acquire, refresh) in [
            (r#","catalog_acquire_timeout_seconds":0"#, "1"),
            (r#","catalog_acquire_timeout_seconds":-1"#, "1"),
            (r#","catalog_acquire_timeout_seconds":1e300"#, "1"),
            ("", "1e300"),
        ] {
            let err = StoreConfig::from_json(&json(acquire, refresh)).err();
            assert!(
                matches!(&err, Some(Error::Config(m)) if m.contains("must be a number")),
                "{acquire} {refresh}: {err:?}"
            );
        }
    }
}
