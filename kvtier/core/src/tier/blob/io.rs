//! The blob tier's requests: uploads (conditional creates), deletes, the
//! startup check, and reads in windows, each verified before it is served.

use bytes::Bytes;
use object_store::{ObjectStoreExt, PutMode, PutPayload};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::error::{chain, kind_of, map_err};
use super::object::{self, Expect, OBJECT_OVERHEAD_BYTES, object_path};
use super::{Inner, add, container};
use crate::block::{BlockKey, NamespaceId};
use crate::error::{Error, ErrorKind, Result};
use crate::tier::{PinnedBlock, Stored, TierCounters};

impl Inner {
    pub(super) async fn put(&self, ns: NamespaceId, key: BlockKey, mut body: Vec<u8>) -> Result<Stored> {
        let (head, data) = body.split_at_mut(OBJECT_OVERHEAD_BYTES);
        object::encode_header(ns, key, data, head);
        let len = body.len() as u64;
        self.upload_limit.acquire(len).await;
        let _permit = self.uploads.acquire().await.expect("never closed");
        add(&self.req.put, 1);
        let path = object_path(&self.prefix, ns, key);
        match self
            .store
            .put_opts(&path, PutPayload::from(body), PutMode::Create.into())
            .await
        {
            Ok(_) => {
                TierCounters::add(&self.counters.bytes_written, len);
                add(&self.uploaded_bytes, len);
                self.known.lock().put(key, ());
                Ok(Stored::Inserted)
            }
            Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }) => {
                add(&self.req.already_present, 1);
                self.known.lock().put(key, ());
                Ok(Stored::Present)
            }
            Err(e) => {
                add(&self.req.errors, 1);
                Err(map_err(&self.cfg, &format!("upload of {key}"), e))
            }
        }
    }

    pub(super) async fn delete(&self, ns: NamespaceId, key: BlockKey) -> Result<bool> {
        self.known.lock().pop(&key);
        add(&self.req.delete, 1);
        let path = object_path(&self.prefix, ns, key);
        match self.store.delete(&path).await {
            Ok(()) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => {
                add(&self.req.errors, 1);
                Err(map_err(&self.cfg, &format!("delete of {key}"), e))
            }
        }
    }
}

impl Inner {
    /// The startup check: create the container if asked, then one List.
    pub(super) async fn check(&self) -> Result<()> {
        let cfg = &self.cfg;
        let limit = Duration::from_millis(cfg.connect_timeout_ms + cfg.request_timeout_ms);
        let endpoint = cfg.endpoint_url();
        if cfg.create_container {
            let key = cfg.access_key().ok_or_else(|| {
                Error::config("blob.create_container needs a Shared Key (access_key or AZURE_STORAGE_ACCOUNT_KEY)")
            })?;
            let cred = container::SharedKey {
                account: cfg.account.clone(),
                key,
            };
            let made = tokio::time::timeout(limit, container::create_container(&endpoint, &cred, &cfg.container))
                .await
                .map_err(|_| {
                    Error::new(
                        ErrorKind::Unavailable,
                        format!("blob endpoint {endpoint} unreachable: no answer within {limit:?}"),
                    )
                })??;
            if made {
                tracing::info!(container = %cfg.container, "blob container created");
            }
        }
        add(&self.req.list, 1);
        let probe = object_store::path::Path::from(format!("{}kvtier-probe", self.prefix));
        let listed = tokio::time::timeout(limit, self.store.list_with_delimiter(Some(&probe)))
            .await
            .map_err(|_| {
                Error::new(
                    ErrorKind::Unavailable,
                    format!("blob endpoint {endpoint} unreachable: no answer within {limit:?}"),
                )
            })?;
        let e = match listed {
            Ok(_) => return Ok(()),
            Err(e) => e,
        };
        let text = chain(&e);
        // Azure answers a List of a missing container with 404 and
        // "ContainerNotFound"; kind_of reads the 404.
        match kind_of(&e) {
            ErrorKind::NotFound => Err(Error::with_source(
                ErrorKind::Config,
                format!(
                    "blob container {} does not exist in account {} at {endpoint} (create it, or set create_container = true)",
                    cfg.container, cfg.account
                ),
                e,
            )),
            // At startup the credentials are the configuration's: a
            // refusal is a configuration error, as wrong keys in a file.
            ErrorKind::Unauthenticated | ErrorKind::PermissionDenied => Err(Error::with_source(
                ErrorKind::Config,
                format!(
                    "blob account {} container {}: the credentials were refused: {text}",
                    cfg.account, cfg.container
                ),
                e,
            )),
            kind => {
                let kind = if kind.is_retryable() { kind } else { ErrorKind::Io };
                Err(Error::with_source(
                    kind,
                    format!("blob endpoint {endpoint} unreachable or failing: {text}"),
                    e,
                ))
            }
        }
    }

    pub(super) fn is_down(&self) -> bool {
        let mut d = self.down_until.lock();
        match *d {
            Some(t) if Instant::now() < t => true,
            Some(_) => {
                *d = None;
                false
            }
            None => false,
        }
    }

    pub(super) fn mark_down(&self, what: &str, e: &object_store::Error) {
        add(&self.req.errors, 1);
        let wait = Duration::from_millis(self.cfg.unavailable_backoff_ms);
        let mut d = self.down_until.lock();
        if d.is_none() {
            tracing::warn!(
                "blob {what} failed; reads skip the blob tier for {wait:?}: {}",
                chain(e)
            );
        }
        *d = Some(Instant::now() + wait);
    }

    pub(super) fn refuse(&self, key: BlockKey, why: impl std::fmt::Display) {
        TierCounters::add(&self.counters.corrupt, 1);
        self.known.lock().pop(&key);
        tracing::warn!(%key, "blob object refused, counted as a miss: {why}");
    }

    pub(super) async fn head(self: Arc<Self>, ns: NamespaceId, key: BlockKey, expect: Expect) -> bool {
        let _permit = self.downloads.acquire().await.expect("never closed");
        add(&self.req.head, 1);
        match self.store.head(&object_path(&self.prefix, ns, key)).await {
            Ok(meta)
                if (meta.size as usize)
                    .checked_sub(OBJECT_OVERHEAD_BYTES)
                    .is_some_and(|n| expect.fits(n)) =>
            {
                self.known.lock().put(key, ());
                true
            }
            Ok(meta) => {
                self.refuse(
                    key,
                    format_args!("object is {} bytes, expected {expect:?} plus a header", meta.size),
                );
                false
            }
            Err(object_store::Error::NotFound { .. }) => false,
            Err(e) => {
                self.mark_down("HEAD", &e);
                false
            }
        }
    }

    pub(super) async fn present_prefix(
        self: Arc<Self>,
        ns: NamespaceId,
        keys: Vec<BlockKey>,
        block_bytes: Expect,
    ) -> usize {
        let mut n = 0;
        let mut window = 1;
        while n < keys.len() {
            if self.is_down() {
                add(&self.req.skipped_unavailable, 1);
                break;
            }
            let end = (n + window).min(keys.len());
            let mut tasks = Vec::with_capacity(end - n);
            for &k in &keys[n..end] {
                if self.known.lock().get(&k).is_some() {
                    tasks.push(None);
                } else {
                    tasks.push(Some(tokio::spawn(self.clone().head(ns, k, block_bytes))));
                }
            }
            let mut present = 0;
            let mut all = true;
            for t in tasks {
                let hit = match t {
                    None => true,
                    Some(t) => t.await.unwrap_or(false),
                };
                // Every task is awaited; only the leading hits count.
                if all && hit {
                    present += 1;
                } else {
                    all = false;
                }
            }
            n += present;
            if !all {
                break;
            }
            window = (window * 4).min(self.cfg.download_concurrency);
        }
        n
    }

    pub(super) async fn get(self: Arc<Self>, ns: NamespaceId, key: BlockKey, block_bytes: Expect) -> Option<Bytes> {
        let _permit = self.downloads.acquire().await.expect("never closed");
        add(&self.req.get, 1);
        let path = object_path(&self.prefix, ns, key);
        let got = match self.store.get(&path).await {
            Ok(r) => r.bytes().await,
            Err(e) => Err(e),
        };
        let bytes = match got {
            Ok(b) => b,
            Err(object_store::Error::NotFound { .. }) => {
                self.known.lock().pop(&key);
                return None;
            }
            Err(e) => {
                self.mark_down("GET", &e);
                return None;
            }
        };
        TierCounters::add(&self.counters.bytes_read, bytes.len() as u64);
        // Verifying 2 MiB takes about 70 µs: fine on a runtime worker.
        match object::verify(ns, key, block_bytes, &bytes) {
            Ok(off) => {
                self.known.lock().put(key, ());
                Some(bytes.slice(off..))
            }
            Err(why) => {
                self.refuse(key, why);
                None
            }
        }
    }

    pub(super) async fn fetch_prefix(
        self: Arc<Self>,
        ns: NamespaceId,
        keys: Vec<BlockKey>,
        block_bytes: Expect,
    ) -> Vec<BlobBlock> {
        let mut out = Vec::new();
        for window in keys.chunks(self.cfg.download_concurrency) {
            if self.is_down() {
                add(&self.req.skipped_unavailable, 1);
                break;
            }
            let tasks: Vec<_> = window
                .iter()
                .map(|&k| tokio::spawn(self.clone().get(ns, k, block_bytes)))
                .collect();
            let mut all = true;
            for t in tasks {
                match t.await.ok().flatten() {
                    Some(data) if all => out.push(BlobBlock { ns, data }),
                    _ => all = false,
                }
            }
            if !all {
                break;
            }
        }
        let misses = u64::from(out.len() < keys.len());
        TierCounters::add(&self.counters.misses, misses);
        out
    }
}

/// A block downloaded and verified, held in memory.
#[derive(Debug)]
pub struct BlobBlock {
    ns: NamespaceId,
    data: Bytes,
}

impl BlobBlock {
    /// The block's bytes (verified).
    pub fn bytes(&self) -> &[u8] {
        &self.data
    }
}

impl PinnedBlock for BlobBlock {
    fn namespace(&self) -> NamespaceId {
        self.ns
    }

    fn len(&self) -> usize {
        self.data.len()
    }

    fn read_unverified(&self, out: &mut [u8]) -> Result<()> {
        if out.len() != self.data.len() {
            return Err(Error::new(
                ErrorKind::BlockSize,
                format!("blob block is {} bytes, the buffer {}", self.data.len(), out.len()),
            ));
        }
        out.copy_from_slice(&self.data);
        Ok(())
    }

    fn in_memory(&self) -> Option<&[u8]> {
        Some(&self.data)
    }
}
