//! The blob tier's configuration: the `[blob]` table users write, and the
//! `object_store` Azure client it builds.

use object_store::azure::{AzureConfigKey, MicrosoftAzure, MicrosoftAzureBuilder};
use object_store::{ClientOptions, RetryConfig};
use serde::{Deserialize, Serialize};
use std::time::Duration;

use super::BlobTier;
use crate::error::{Error, Result};

/// Whether kvtier writes to the blob tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BlobMode {
    /// Blocks are read from blob (and promoted) but never written: the
    /// container is filled by someone else, e.g. a node in writeback mode.
    #[default]
    CacheOnly,
    /// Blocks that reach the SSD are uploaded lazily from a durable dirty
    /// log; a restart resumes pending uploads.
    Writeback,
}

impl BlobMode {
    /// The name the configuration uses (serde's spelling too).
    pub const fn name(self) -> &'static str {
        match self {
            Self::CacheOnly => "cache-only",
            Self::Writeback => "writeback",
        }
    }
}

/// How kvtier authenticates to the storage account.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Credential {
    /// Whatever the `AZURE_*` environment provides, in `object_store`'s
    /// order (bearer token, access key, workload identity, client secret,
    /// SAS, Azure CLI), else the VM's managed identity.
    #[default]
    Auto,
    /// Shared Key: `access_key`, or `AZURE_STORAGE_ACCOUNT_KEY`.
    AccessKey,
    /// A SAS token: `sas_token`, or `AZURE_STORAGE_SAS_TOKEN`.
    Sas,
    /// The managed identity of the VM or node (IMDS); `client_id` picks a
    /// user-assigned one.
    ManagedIdentity,
    /// AKS workload identity: `AZURE_CLIENT_ID`, `AZURE_TENANT_ID` and
    /// `AZURE_FEDERATED_TOKEN_FILE`, as the AKS webhook sets them.
    WorkloadIdentity,
}

/// A secret string: serialized as is, never printed by `Debug`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Configuration of the blob tier: the `[blob]` table users write.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlobConfig {
    /// Storage account name.
    pub account: String,
    /// Container (3 to 63 lowercase letters, digits and hyphens).
    pub container: String,
    /// Prefix for every object name (e.g. `kv/prod/`); empty for none.
    #[serde(default)]
    pub prefix: String,
    /// Blob service URL; default `https://{account}.blob.core.windows.net`.
    /// Azurite: `http://127.0.0.1:10000/devstoreaccount1`.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// `cache-only` (default) or `writeback`.
    #[serde(default)]
    pub mode: BlobMode,
    /// How to authenticate.
    #[serde(default)]
    pub credential: Credential,
    /// Shared Key (prefer `AZURE_STORAGE_ACCOUNT_KEY` to a file).
    #[serde(default)]
    pub access_key: Option<Secret>,
    /// SAS token (prefer `AZURE_STORAGE_SAS_TOKEN` to a file).
    #[serde(default)]
    pub sas_token: Option<Secret>,
    /// Client id of a user-assigned managed identity.
    #[serde(default)]
    pub client_id: Option<String>,
    /// Create the container at startup if missing (needs a Shared Key).
    #[serde(default)]
    pub create_container: bool,
    /// Uploads in flight at most.
    #[serde(default = "default_upload_concurrency")]
    pub upload_concurrency: usize,
    /// Downloads and HEADs in flight at most.
    #[serde(default = "default_download_concurrency")]
    pub download_concurrency: usize,
    /// Upload requests per second at most; 0 for no limit.
    #[serde(default)]
    pub max_uploads_per_s: u32,
    /// Upload bytes per second at most; 0 for no limit.
    #[serde(default)]
    pub max_upload_bytes_per_s: u64,
    /// Retries of one request inside the HTTP client (transient errors).
    #[serde(default = "default_max_retries")]
    pub max_retries: usize,
    /// Time limit of one request, retries included.
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// Time limit to connect.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// First wait before a failed writeback upload is tried again; doubles
    /// per failure up to `retry_max_backoff_ms`.
    #[serde(default = "default_retry_min_backoff_ms")]
    pub retry_min_backoff_ms: u64,
    /// Longest wait between tries of a failed writeback upload.
    #[serde(default = "default_retry_max_backoff_ms")]
    pub retry_max_backoff_ms: u64,
    /// After a read fails for a reason other than a missing object, reads
    /// skip the blob tier (answer miss) for this long.
    #[serde(default = "default_unavailable_backoff_ms")]
    pub unavailable_backoff_ms: u64,
    /// Keys remembered as present in blob, sparing a HEAD on lookup.
    #[serde(default = "default_known_keys")]
    pub known_keys: usize,
}

fn default_upload_concurrency() -> usize {
    16
}
fn default_download_concurrency() -> usize {
    32
}
fn default_max_retries() -> usize {
    3
}
fn default_request_timeout_ms() -> u64 {
    30_000
}
fn default_connect_timeout_ms() -> u64 {
    3_000
}
fn default_retry_min_backoff_ms() -> u64 {
    200
}
fn default_retry_max_backoff_ms() -> u64 {
    30_000
}
fn default_unavailable_backoff_ms() -> u64 {
    1_000
}
fn default_known_keys() -> usize {
    1 << 20
}

impl BlobConfig {
    /// A cache-only tier of `container` in `account`, other settings default.
    pub fn new(account: impl Into<String>, container: impl Into<String>) -> Self {
        let mut c: Self = toml::from_str("account = \"\"\ncontainer = \"\"").expect("every other field has a default");
        c.account = account.into();
        c.container = container.into();
        c
    }

    /// The blob service URL.
    pub fn endpoint_url(&self) -> String {
        match &self.endpoint {
            Some(e) => e.trim_end_matches('/').to_string(),
            None => format!("https://{}.blob.core.windows.net", self.account),
        }
    }

    /// `prefix`, ending in `/` unless empty.
    pub(super) fn prefix(&self) -> String {
        let p = self.prefix.trim_matches('/');
        if p.is_empty() { String::new() } else { format!("{p}/") }
    }

    /// Checks everything that can be checked without the network.
    pub fn validate(&self) -> Result<()> {
        if self.account.is_empty()
            || !self
                .account
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        {
            return Err(Error::config(format!(
                "blob.account {:?}: lowercase letters and digits",
                self.account
            )));
        }
        if !(3..=63).contains(&self.container.len())
            || !self
                .container
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(Error::config(format!(
                "blob.container {:?}: 3 to 63 lowercase letters, digits and hyphens",
                self.container
            )));
        }
        let p = self.prefix.trim_matches('/');
        if !p.is_empty()
            && (p.split('/').any(|s| s.is_empty() || s == "." || s == "..")
                || !p.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b)))
        {
            return Err(Error::config(format!(
                "blob.prefix {:?}: path segments of letters, digits, '-', '_' and '.'",
                self.prefix
            )));
        }
        if let Some(e) = &self.endpoint
            && !(e.starts_with("https://") || e.starts_with("http://"))
        {
            return Err(Error::config(format!(
                "blob.endpoint {e:?}: an http:// or https:// URL"
            )));
        }
        let positive = [
            ("upload_concurrency", self.upload_concurrency as u64),
            ("download_concurrency", self.download_concurrency as u64),
            ("request_timeout_ms", self.request_timeout_ms),
            ("connect_timeout_ms", self.connect_timeout_ms),
            ("retry_min_backoff_ms", self.retry_min_backoff_ms),
            ("known_keys", self.known_keys as u64),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(Error::config(format!("blob.{name} must be > 0")));
            }
        }
        if self.retry_max_backoff_ms < self.retry_min_backoff_ms {
            return Err(Error::config(
                "blob.retry_max_backoff_ms must be >= retry_min_backoff_ms",
            ));
        }
        Ok(())
    }

    /// The Shared Key, from the file or `AZURE_STORAGE_ACCOUNT_KEY`.
    pub(super) fn access_key(&self) -> Option<String> {
        self.access_key
            .as_ref()
            .map(|s| s.0.clone())
            .or_else(|| std::env::var("AZURE_STORAGE_ACCOUNT_KEY").ok())
            .or_else(|| std::env::var("AZURE_STORAGE_ACCESS_KEY").ok())
    }

    pub(super) fn store(&self) -> Result<MicrosoftAzure> {
        let endpoint = self.endpoint_url();
        let mut b = match self.credential {
            Credential::Auto => MicrosoftAzureBuilder::from_env(),
            _ => MicrosoftAzureBuilder::new(),
        };
        b = b
            .with_account(&self.account)
            .with_container_name(&self.container)
            .with_retry(RetryConfig {
                max_retries: self.max_retries,
                retry_timeout: Duration::from_millis(self.request_timeout_ms),
                ..RetryConfig::default()
            })
            .with_client_options(
                ClientOptions::new()
                    .with_timeout(Duration::from_millis(self.request_timeout_ms))
                    .with_connect_timeout(Duration::from_millis(self.connect_timeout_ms))
                    .with_allow_http(endpoint.starts_with("http://")),
            );
        if self.endpoint.is_some() {
            b = b.with_endpoint(endpoint.clone());
        }
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let missing = |what: &str| Error::config(format!("blob.credential = {:?} needs {what}", self.credential));
        match self.credential {
            Credential::Auto => {
                if let Some(k) = &self.access_key {
                    b = b.with_access_key(&k.0);
                }
                if let Some(s) = &self.sas_token {
                    b = b.with_config(AzureConfigKey::SasKey, &s.0);
                }
                if let Some(c) = &self.client_id {
                    b = b.with_client_id(c);
                }
            }
            Credential::AccessKey => {
                let k = self
                    .access_key()
                    .ok_or_else(|| missing("access_key or AZURE_STORAGE_ACCOUNT_KEY"))?;
                b = b.with_access_key(k);
            }
            Credential::Sas => {
                let s = self
                    .sas_token
                    .as_ref()
                    .map(|s| s.0.clone())
                    .or_else(|| env("AZURE_STORAGE_SAS_TOKEN"))
                    .ok_or_else(|| missing("sas_token or AZURE_STORAGE_SAS_TOKEN"))?;
                b = b.with_config(AzureConfigKey::SasKey, s.trim_start_matches('?'));
            }
            Credential::ManagedIdentity => {
                if let Some(c) = &self.client_id {
                    b = b.with_client_id(c);
                }
                if let Some(e) = env("IDENTITY_ENDPOINT").or_else(|| env("MSI_ENDPOINT")) {
                    b = b.with_msi_endpoint(e);
                }
            }
            Credential::WorkloadIdentity => {
                let client = self
                    .client_id
                    .clone()
                    .or_else(|| env("AZURE_CLIENT_ID"))
                    .ok_or_else(|| missing("AZURE_CLIENT_ID (or client_id)"))?;
                let tenant = env("AZURE_TENANT_ID").ok_or_else(|| missing("AZURE_TENANT_ID"))?;
                let file = env("AZURE_FEDERATED_TOKEN_FILE").ok_or_else(|| missing("AZURE_FEDERATED_TOKEN_FILE"))?;
                b = b
                    .with_client_id(client)
                    .with_tenant_id(tenant)
                    .with_federated_token_file(file);
                if let Some(h) = env("AZURE_AUTHORITY_HOST") {
                    b = b.with_authority_host(h);
                }
            }
        }
        b.build()
            .map_err(|e| Error::config(format!("blob tier for account {}: {e}", self.account)))
    }

    /// Connects: creates the container if asked, then checks that it exists
    /// and that the credentials are accepted (one List request).
    pub fn build(&self) -> Result<BlobTier> {
        BlobTier::open(self)
    }
}
