//! The `[s3]` table of kvtierd's configuration.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// What a bucket holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum BucketKind {
    /// KV blocks: small immutable objects, each one kvtier block (up to
    /// `max_block_object_bytes`), with the namespace's replication (R = 1
    /// unless `replicas` says otherwise) and blob mode. A cache: an
    /// evicted block is an absent object.
    Blocks,
    /// Files of any size (checkpoints): cut into chunks, replicated like
    /// checkpoints (R = min(3, members), strong writes), committed
    /// atomically.
    Objects,
}

impl BucketKind {
    /// The name the configuration uses.
    pub fn name(self) -> &'static str {
        match self {
            Self::Blocks => "blocks",
            Self::Objects => "objects",
        }
    }
}

/// Which kind `CreateBucket` makes, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CreateBuckets {
    /// `CreateBucket` is refused (`AccessDenied`): buckets come from the
    /// configuration only.
    #[default]
    Off,
    /// New buckets hold KV blocks.
    Blocks,
    /// New buckets hold objects of any size.
    Objects,
}

/// One access key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credential {
    /// `AWS_ACCESS_KEY_ID` of the clients.
    pub access_key_id: String,
    /// `AWS_SECRET_ACCESS_KEY` of the clients.
    pub secret_access_key: String,
}

/// A bucket declared in the configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BucketConfig {
    /// The bucket's name (3 to 63 lower-case letters, digits, `-`, `.`).
    pub name: String,
    /// `blocks` or `objects`.
    pub kind: BucketKind,
    /// Unsigned requests may read and write it (local access without
    /// keys); signed requests are checked as always.
    #[serde(default)]
    pub anonymous: bool,
    /// Copies in a cluster (blocks: default 1; objects: min(3, members)).
    #[serde(default)]
    pub replicas: Option<usize>,
}

/// The S3-compatible listener.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    /// Address of the S3 listener (its own port; port 0 picks one, printed
    /// at startup). Served with the daemon's `[tls]` certificate when it
    /// has one.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Domains for virtual-host-style requests: `Host: {bucket}.{domain}`.
    /// Path-style requests (`/{bucket}/{key}`) always work.
    #[serde(default)]
    pub domains: Vec<String>,
    /// Largest difference between a request's signing time and the
    /// daemon's clock (`RequestTimeTooSkewed` beyond).
    #[serde(default = "default_max_clock_skew_s")]
    pub max_clock_skew_s: u64,
    /// Access keys, in addition to those in `credentials_file`.
    #[serde(default)]
    pub credentials: Vec<Credential>,
    /// A file of access keys, one `ACCESS_KEY_ID SECRET_ACCESS_KEY` pair
    /// per line (`#` starts a comment): a mounted secret.
    #[serde(default)]
    pub credentials_file: Option<PathBuf>,
    /// What `CreateBucket` makes: `off` (refused), `blocks` or `objects`.
    #[serde(default)]
    pub create_buckets: CreateBuckets,
    /// The buckets.
    #[serde(default)]
    pub buckets: Vec<BucketConfig>,
    /// Largest object of a `blocks` bucket.
    #[serde(default = "default_max_block_object_bytes")]
    pub max_block_object_bytes: u64,
    /// Largest object of an `objects` bucket.
    #[serde(default = "default_max_object_bytes")]
    pub max_object_bytes: u64,
    /// Chunk size of `objects` buckets.
    #[serde(default = "default_chunk_bytes")]
    pub chunk_bytes: u32,
    /// Seconds after which an unfinished multipart upload is aborted.
    #[serde(default = "default_multipart_expiry_s")]
    pub multipart_expiry_s: u64,
    /// Requests served at once; more wait for a slot.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
}

fn default_listen() -> String {
    "127.0.0.1:9000".into()
}
fn default_max_clock_skew_s() -> u64 {
    900
}
fn default_max_block_object_bytes() -> u64 {
    64 << 20
}
fn default_max_object_bytes() -> u64 {
    5 << 40
}
fn default_chunk_bytes() -> u32 {
    8 << 20
}
fn default_multipart_expiry_s() -> u64 {
    24 * 3600
}
fn default_max_connections() -> usize {
    1024
}

impl Default for S3Config {
    fn default() -> Self {
        toml::from_str("").expect("every field has a default")
    }
}

/// Whether `name` is a valid bucket name (S3's rules, the common subset).
pub fn valid_bucket_name(name: &str) -> bool {
    let b = name.as_bytes();
    (3..=63).contains(&b.len())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-' || *c == b'.')
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && !name.contains("..")
        && !name
            .split('.')
            .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|c| c.is_ascii_digit()))
}

impl S3Config {
    /// Checks everything that needs no I/O.
    pub fn validate(&self) -> Result<(), String> {
        if self.listen.is_empty() {
            return Err("s3.listen must not be empty".into());
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, b) in self.buckets.iter().enumerate() {
            if !valid_bucket_name(&b.name) {
                return Err(format!(
                    "s3.buckets[{i}].name {:?}: 3 to 63 lower-case letters, digits, '-' and '.', not an IP address",
                    b.name
                ));
            }
            if !seen.insert(&b.name) {
                return Err(format!("s3.buckets: duplicate bucket {:?}", b.name));
            }
            if b.replicas == Some(0) {
                return Err(format!("s3.buckets[{i}] ({}): replicas must be at least 1", b.name));
            }
        }
        for (i, c) in self.credentials.iter().enumerate() {
            if c.access_key_id.is_empty() || c.secret_access_key.is_empty() {
                return Err(format!(
                    "s3.credentials[{i}]: access_key_id and secret_access_key must not be empty"
                ));
            }
        }
        if !(4096..=(1 << 30)).contains(&self.chunk_bytes) {
            return Err(format!(
                "s3.chunk_bytes {} must be between 4096 and 1 GiB",
                self.chunk_bytes
            ));
        }
        if !(1..=(1 << 30)).contains(&self.max_block_object_bytes) {
            return Err(format!(
                "s3.max_block_object_bytes {} must be between 1 and 1 GiB",
                self.max_block_object_bytes
            ));
        }
        if self.max_object_bytes == 0 || self.max_clock_skew_s == 0 || self.multipart_expiry_s == 0 {
            return Err("s3.max_object_bytes, s3.max_clock_skew_s and s3.multipart_expiry_s must be > 0".into());
        }
        if self.max_connections == 0 {
            return Err("s3.max_connections must be > 0".into());
        }
        for d in &self.domains {
            if d.is_empty() || d.starts_with('.') || d.contains(':') {
                return Err(format!("s3.domains: {d:?} is not a domain name"));
            }
        }
        Ok(())
    }

    /// Every access key: the table's, then the file's.
    pub fn load_credentials(&self) -> Result<Vec<Credential>, String> {
        let mut out = self.credentials.clone();
        if let Some(p) = &self.credentials_file {
            let text =
                std::fs::read_to_string(p).map_err(|e| format!("read s3.credentials_file {}: {e}", p.display()))?;
            for (n, line) in text.lines().enumerate() {
                let line = line.split('#').next().unwrap_or("").trim();
                if line.is_empty() {
                    continue;
                }
                let mut it = line.split_whitespace();
                match (it.next(), it.next(), it.next()) {
                    (Some(id), Some(secret), None) => out.push(Credential {
                        access_key_id: id.to_string(),
                        secret_access_key: secret.to_string(),
                    }),
                    _ => {
                        return Err(format!(
                            "s3.credentials_file {} line {}: expected `ACCESS_KEY_ID SECRET_ACCESS_KEY`",
                            p.display(),
                            n + 1
                        ));
                    }
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_names_follow_s3s_rules() {
        for ok in ["kv", "abc", "my-bucket.v2", "a1b", "0ab"] {
            assert_eq!(valid_bucket_name(ok), ok.len() >= 3, "{ok}");
        }
        for bad in ["Ab1", "a_b", "-ab", "ab-", "a..b", "192.168.1.1", &"a".repeat(64)] {
            assert!(!valid_bucket_name(bad), "{bad}");
        }
    }

    #[test]
    fn a_table_parses_and_validates() {
        let c: S3Config = toml::from_str(
            r#"
            listen = "127.0.0.1:0"
            domains = ["s3.kvtier.test"]
            create_buckets = "objects"
            [[credentials]]
            access_key_id = "a"
            secret_access_key = "b"
            [[buckets]]
            name = "kv-blocks"
            kind = "blocks"
            [[buckets]]
            name = "ckpt"
            kind = "objects"
            anonymous = true
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.buckets[1].kind, BucketKind::Objects);
        assert!(c.buckets[1].anonymous);
        assert_eq!(c.create_buckets, CreateBuckets::Objects);
    }

    #[test]
    fn mistakes_are_named() {
        let bad = |t: &str| {
            toml::from_str::<S3Config>(t)
                .map_err(|e| e.to_string())
                .and_then(|c| c.validate())
        };
        assert!(
            bad("[[buckets]]\nname = \"x\"\nkind = \"blocks\"")
                .unwrap_err()
                .contains("s3.buckets[0].name")
        );
        assert!(
            bad("[[buckets]]\nname = \"abc\"\nkind = \"blocks\"\n[[buckets]]\nname = \"abc\"\nkind = \"objects\"")
                .unwrap_err()
                .contains("duplicate")
        );
        assert!(
            bad("[[buckets]]\nname = \"abc\"\nkind = \"files\"")
                .unwrap_err()
                .contains("unknown variant")
        );
        assert!(bad("chunk_bytes = 10").unwrap_err().contains("chunk_bytes"));
        assert!(bad("nonsense = 1").unwrap_err().contains("unknown field"));
    }

    #[test]
    fn the_credentials_file_is_read_and_checked() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("keys");
        std::fs::write(&p, "# keys\nAK1 SECRET1\n\n  AK2   SECRET2  # trailing\n").unwrap();
        let c = S3Config {
            credentials_file: Some(p.clone()),
            ..S3Config::default()
        };
        let keys = c.load_credentials().unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[1].secret_access_key, "SECRET2");
        std::fs::write(&p, "AK1\n").unwrap();
        assert!(c.load_credentials().unwrap_err().contains("line 1"));
    }
}
