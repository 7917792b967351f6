//! The Iceberg REST catalog protocol, the few calls we need, with the commit semantics of the
//! spec: every commit carries requirements; 409 means another writer won (reload, re-plan);
//! 500/502/503/504 or a lost response mean the outcome is unknown, so the caller reconciles
//! by reloading before anything else and never deletes files the commit may reference.
//!
//! iceberg-catalog-rest 0.10 cannot carry our own snapshot (`TableCommit::build` is
//! crate-private, see write/overwrite.rs) and folds 5xx answers into generic errors, so the
//! protocol lives here on reqwest. Settings use PyIceberg's property names (`credential`,
//! `token`, `oauth2-server-uri`, `scope`, `header.*`), read from `storage_options`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use iceberg::io::FileIO;
use iceberg::spec::TableMetadata;
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::Mutex;

use super::{Catalog, CommitOutcome, Loaded, TableId};
use crate::commit::PreparedCommit;
use crate::config::{StoreConfig, redact_uri};
use crate::error::{Error, Result};
use crate::table::TableState;

/// Refresh a token this long before the server says it expires.
const TOKEN_MARGIN: Duration = Duration::from_secs(60);

enum Auth {
    None,
    /// A static bearer token (`token`).
    Bearer(String),
    /// OAuth2 client credentials (`credential` = "client_id:client_secret"), exchanged for a
    /// token that is refreshed before it expires and again when the server answers 401.
    Client {
        token_url: String,
        client_id: Option<String>,
        secret: String,
        scope: String,
        current: Mutex<Option<(String, Instant)>>,
    },
}

pub struct RestCatalog {
    http: reqwest::Client,
    /// `{uri}/v1/{prefix}/`: every table and namespace route hangs below it.
    base: String,
    shown_uri: String,
    auth: Auth,
    headers: Vec<(String, String)>,
}

impl std::fmt::Debug for RestCatalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestCatalog")
            .field("uri", &self.shown_uri)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct ConfigResponse {
    #[serde(default)]
    defaults: BTreeMap<String, String>,
    #[serde(default)]
    overrides: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

#[derive(Deserialize)]
struct LoadTableResponse {
    #[serde(rename = "metadata-location")]
    metadata_location: Option<String>,
    metadata: Value,
}

/// The message of an Iceberg REST error body (`{"error": {"message", "type"}}`) or of an OAuth
/// error (`{"error", "error_description"}`); never the request, which may hold secrets.
fn error_message(body: &[u8]) -> String {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
    };
    if let Some(e) = v.get("error").and_then(Value::as_object) {
        let kind = e.get("type").and_then(Value::as_str).unwrap_or("");
        let msg = e.get("message").and_then(Value::as_str).unwrap_or("");
        return format!("{kind}: {msg}");
    }
    match (
        v.get("error").and_then(Value::as_str),
        v.get("error_description").and_then(Value::as_str),
    ) {
        (Some(e), Some(d)) => format!("{e}: {d}"),
        (Some(e), None) => e.to_string(),
        _ => v.to_string(),
    }
}

/// A request that got no answer.
struct SendFailure {
    /// The request may have reached the server (timeout or connection lost after sending).
    maybe_applied: bool,
    error: Error,
}

impl From<SendFailure> for Error {
    fn from(f: SendFailure) -> Self {
        f.error
    }
}

fn is_unknown_outcome(status: StatusCode) -> bool {
    matches!(status.as_u16(), 500 | 502 | 503 | 504)
}

impl RestCatalog {
    pub async fn connect(config: &StoreConfig) -> Result<Self> {
        let uri = config.uri.trim_end_matches('/').to_string();
        let shown_uri = redact_uri(&uri);
        if !(uri.starts_with("http://") || uri.starts_with("https://")) {
            return Err(Error::config(format!(
                "REST catalog uri must be http:// or https://, got {shown_uri}"
            )));
        }
        let props = &config.storage_options;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| Error::catalog(format!("HTTP client: {e}")))?;
        let auth = if let Some(token) = props.get("token") {
            Auth::Bearer(token.clone())
        } else if let Some(credential) = props.get("credential") {
            let (client_id, secret) = match credential.split_once(':') {
                Some((id, secret)) => (Some(id.to_string()), secret.to_string()),
                None => (None, credential.clone()),
            };
            Auth::Client {
                token_url: props
                    .get("oauth2-server-uri")
                    .cloned()
                    .unwrap_or_else(|| format!("{uri}/v1/oauth/tokens")),
                client_id,
                secret,
                scope: props
                    .get("scope")
                    .cloned()
                    .unwrap_or_else(|| "catalog".into()),
                current: Mutex::new(None),
            }
        } else {
            Auth::None
        };
        let headers = props
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix("header.")?.to_string(), v.clone())))
            .collect();
        let mut catalog = Self {
            http,
            base: format!("{uri}/v1/"),
            shown_uri,
            auth,
            headers,
        };
        // Asked while `base` is still unprefixed: /v1/config is the one route above the prefix.
        let server = catalog.server_config(&config.warehouse).await?;
        // Server overrides win over our settings, defaults lose to them (REST spec, /v1/config).
        let prefix = server
            .overrides
            .get("prefix")
            .or_else(|| props.get("prefix"))
            .or_else(|| server.defaults.get("prefix"));
        let uri = server.overrides.get("uri").cloned().unwrap_or(uri);
        catalog.base = match prefix {
            Some(p) if !p.is_empty() => format!("{uri}/v1/{}/", p.trim_matches('/')),
            _ => format!("{uri}/v1/"),
        };
        Ok(catalog)
    }

    async fn server_config(&self, warehouse: &str) -> Result<ConfigResponse> {
        let path = if warehouse.is_empty() {
            "config".to_string()
        } else {
            let q: String = url::form_urlencoded::Serializer::new(String::new())
                .append_pair("warehouse", warehouse)
                .finish();
            format!("config?{q}")
        };
        let (status, body) = self
            .send(Method::GET, &path, None, "read its config")
            .await?;
        if !status.is_success() {
            return Err(self.failed("read its config", status, &body));
        }
        serde_json::from_slice(&body)
            .map_err(|e| Error::catalog(format!("{}: bad /v1/config answer: {e}", self.shown_uri)))
    }

    fn failed(&self, what: &str, status: StatusCode, body: &[u8]) -> Error {
        let hint = match status.as_u16() {
            401 | 403 => " (check `credential` / `token` in storage_options)",
            _ => "",
        };
        Error::catalog(format!(
            "REST catalog {} could not {what}: HTTP {status}: {}{hint}",
            self.shown_uri,
            error_message(body)
        ))
    }

    async fn token(&self, force: bool) -> Result<Option<String>> {
        match &self.auth {
            Auth::None => Ok(None),
            Auth::Bearer(t) => Ok(Some(t.clone())),
            Auth::Client {
                token_url,
                client_id,
                secret,
                scope,
                current,
            } => {
                let mut current = current.lock().await;
                if let Some((token, until)) = current.as_ref()
                    && !force
                    && Instant::now() < *until
                {
                    return Ok(Some(token.clone()));
                }
                let mut form = vec![
                    ("grant_type", "client_credentials"),
                    ("client_secret", secret.as_str()),
                    ("scope", scope.as_str()),
                ];
                if let Some(id) = client_id {
                    form.push(("client_id", id.as_str()));
                }
                let shown_url = redact_uri(token_url);
                let resp = self
                    .http
                    .post(token_url)
                    .form(&form)
                    .send()
                    .await
                    .map_err(|e| {
                        Error::catalog(format!(
                            "cannot reach the token endpoint {shown_url}: {}",
                            e.without_url()
                        ))
                    })?;
                let status = resp.status();
                let body = resp.bytes().await.unwrap_or_default();
                if !status.is_success() {
                    return Err(Error::catalog(format!(
                        "REST catalog {} rejected the client credentials: HTTP {status}: {}",
                        self.shown_uri,
                        error_message(&body)
                    )));
                }
                let t: TokenResponse = serde_json::from_slice(&body).map_err(|e| {
                    Error::catalog(format!("bad token answer from {shown_url}: {e}"))
                })?;
                let life = Duration::from_secs(t.expires_in.unwrap_or(3600));
                let until = Instant::now() + life.saturating_sub(TOKEN_MARGIN);
                *current = Some((t.access_token.clone(), until));
                Ok(Some(t.access_token))
            }
        }
    }

    /// One request below `base` (`{uri}/v1/` until /v1/config has named a prefix), with a fresh
    /// token on a 401. Errors before the request was sent are `Catalog` errors; the caller
    /// decides what a failed send means for a commit.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        what: &str,
    ) -> std::result::Result<(StatusCode, bytes::Bytes), SendFailure> {
        let url = format!("{}{path}", self.base);
        let mut refreshed = false;
        loop {
            let mut req = self.http.request(method.clone(), &url);
            for (k, v) in &self.headers {
                req = req.header(k, v);
            }
            let token = self.token(refreshed).await.map_err(|error| SendFailure {
                maybe_applied: false,
                error,
            })?;
            if let Some(token) = token {
                req = req.bearer_auth(token);
            }
            if let Some(b) = body {
                req = req.json(b);
            }
            let resp = req.send().await.map_err(|e| self.send_error(what, e))?;
            let status = resp.status();
            if status == StatusCode::UNAUTHORIZED
                && !refreshed
                && matches!(self.auth, Auth::Client { .. })
            {
                refreshed = true;
                continue;
            }
            let bytes = resp.bytes().await.map_err(|e| self.send_error(what, e))?;
            return Ok((status, bytes));
        }
    }

    fn send_error(&self, what: &str, e: reqwest::Error) -> SendFailure {
        let kind = if e.is_connect() {
            "unreachable"
        } else if e.is_timeout() {
            "timed out"
        } else {
            "failed"
        };
        // Without the URL (the message says which catalog); with the cause, which reqwest keeps
        // in the source chain.
        let e = e.without_url();
        let cause = std::error::Error::source(&e).map_or(String::new(), |c| format!(": {c}"));
        SendFailure {
            maybe_applied: kind != "unreachable",
            error: Error::catalog(format!(
                "REST catalog {} {kind} while trying to {what}: {e}{cause}",
                self.shown_uri
            )),
        }
    }

    fn table_path(table: &TableId) -> String {
        format!(
            "namespaces/{}/tables/{}",
            table.namespace_levels().join("%1F"),
            table.name
        )
    }
}

#[async_trait]
impl Catalog for RestCatalog {
    async fn ensure_namespace(&self, namespace: &str) -> Result<()> {
        // Create every level: servers differ on whether parents must exist.
        let levels: Vec<&str> = namespace.split('.').collect();
        for depth in 1..=levels.len() {
            let body = json!({"namespace": &levels[..depth], "properties": {}});
            let what = format!("create namespace {}", levels[..depth].join("."));
            let (status, reply) = self
                .send(Method::POST, "namespaces", Some(&body), &what)
                .await?;
            if !(status.is_success() || status == StatusCode::CONFLICT) {
                return Err(self.failed(&what, status, &reply));
            }
        }
        Ok(())
    }

    async fn load(&self, table: &TableId) -> Result<Option<Loaded>> {
        let what = format!("load {table}");
        let (status, body) = self
            .send(Method::GET, &Self::table_path(table), None, &what)
            .await?;
        if status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(self.failed(&what, status, &body));
        }
        let loaded: LoadTableResponse = serde_json::from_slice(&body)
            .map_err(|e| Error::corrupt(table, format!("bad loadTable answer: {e}")))?;
        let metadata: TableMetadata = serde_json::from_value(loaded.metadata)
            .map_err(|e| Error::corrupt(table, format!("bad metadata in loadTable answer: {e}")))?;
        let location = loaded
            .metadata_location
            .ok_or_else(|| Error::corrupt(table, "loadTable answer has no metadata-location"))?;
        Ok(Some(Loaded {
            location,
            metadata: Some(Box::new(metadata)),
        }))
    }

    /// The server picks the location and writes the first metadata.json.
    async fn create(&self, table: &TableId, metadata: &TableMetadata, _: &FileIO) -> Result<bool> {
        let what = format!("create {table}");
        let body = json!({
            "name": table.name,
            "schema": metadata.current_schema(),
            "partition-spec": metadata.default_partition_spec(),
            "write-order": metadata.default_sort_order(),
            "properties": metadata.properties(),
            "stage-create": false,
        });
        let path = format!("namespaces/{}/tables", table.namespace_levels().join("%1F"));
        let (status, reply) = self.send(Method::POST, &path, Some(&body), &what).await?;
        match status {
            s if s.is_success() => Ok(true),
            StatusCode::CONFLICT => Ok(false),
            s => Err(self.failed(&what, s, &reply)),
        }
    }

    async fn commit(
        &self,
        base: &TableState,
        prepared: &PreparedCommit,
        _: &FileIO,
    ) -> Result<CommitOutcome> {
        let table = &base.id;
        let what = format!("commit to {table}");
        let body = json!({
            "identifier": {"namespace": table.namespace_levels(), "name": table.name},
            "requirements": prepared.requirements,
            "updates": prepared.updates,
        });
        let (status, reply) = match self
            .send(Method::POST, &Self::table_path(table), Some(&body), &what)
            .await
        {
            Ok(answer) => answer,
            // Sent, but no answer: the server may have applied it.
            Err(f) if f.maybe_applied => return Ok(CommitOutcome::Unknown(f.error.to_string())),
            Err(f) => return Err(f.error),
        };
        if status == StatusCode::CONFLICT {
            return Ok(CommitOutcome::Conflict);
        }
        if is_unknown_outcome(status) {
            return Ok(CommitOutcome::Unknown(format!(
                "HTTP {status}: {}",
                error_message(&reply)
            )));
        }
        if !status.is_success() {
            return Err(self.failed(&what, status, &reply));
        }
        let loaded: LoadTableResponse = serde_json::from_slice(&reply)
            .map_err(|e| Error::catalog(format!("{what}: bad commit answer: {e}")))?;
        let metadata: TableMetadata = serde_json::from_value(loaded.metadata)
            .map_err(|e| Error::catalog(format!("{what}: bad metadata in commit answer: {e}")))?;
        let location = loaded
            .metadata_location
            .ok_or_else(|| Error::catalog(format!("{what}: answer has no metadata-location")))?;
        Ok(CommitOutcome::Committed(Loaded {
            location,
            metadata: Some(Box::new(metadata)),
        }))
    }

    fn swap_unsupported(&self) -> Option<String> {
        Some("the REST protocol has no metadata-location swap; migrate with a SQL catalog".into())
    }

    async fn swap(&self, table: &TableId, _: &str, _: &str) -> Result<bool> {
        let why = self.swap_unsupported().unwrap_or_default();
        Err(Error::config(format!("cannot repoint {table}: {why}")))
    }

    async fn unregister(&self, table: &TableId) -> Result<Option<String>> {
        let Some(loaded) = self.load(table).await? else {
            return Ok(None);
        };
        let what = format!("drop {table}");
        let path = format!("{}?purgeRequested=false", Self::table_path(table));
        let (status, reply) = self.send(Method::DELETE, &path, None, &what).await?;
        match status {
            s if s.is_success() => Ok(Some(loaded.location)),
            StatusCode::NOT_FOUND => Ok(None),
            s => Err(self.failed(&what, s, &reply)),
        }
    }

    fn owns_metadata_files(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bodies_become_messages() {
        let rest = br#"{"error":{"message":"branch main has changed","type":"CommitFailedException","code":409}}"#;
        assert_eq!(
            error_message(rest),
            "CommitFailedException: branch main has changed"
        );
        let oauth =
            br#"{"error":"invalid_client","error_description":"Invalid client credentials"}"#;
        assert_eq!(
            error_message(oauth),
            "invalid_client: Invalid client credentials"
        );
        assert_eq!(error_message(b"Bad Gateway"), "Bad Gateway");
    }

    #[test]
    fn multi_level_namespaces_use_the_unit_separator() {
        let id = TableId {
            namespace: "team.feast".into(),
            name: "t".into(),
        };
        assert_eq!(
            RestCatalog::table_path(&id),
            "namespaces/team%1Ffeast/tables/t"
        );
    }

    #[test]
    fn only_gateway_and_server_errors_are_unknown() {
        for code in [500, 502, 503, 504] {
            assert!(is_unknown_outcome(StatusCode::from_u16(code).unwrap()));
        }
        for code in [400, 401, 409, 501] {
            assert!(!is_unknown_outcome(StatusCode::from_u16(code).unwrap()));
        }
    }
}
