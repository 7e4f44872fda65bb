//! The read path: prefix lookups across the tiers, leases that pin the
//! present prefix, and loads that copy it out (or hand it out where it
//! lies, [`BlockManager::load_with`]), verify it and promote it.

use serde::Serialize;

use super::{BlockManager, Scratch, add};
use crate::block::{BlockKey, NamespaceId};
use crate::error::{Error, ErrorKind, Result};
use crate::tier::blob::object::Expect;
use crate::tier::{Pin, PinnedBlock, Tier, TierCounters, TierKind};

/// Where each block of a lookup's present prefix lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Lookup {
    /// The tier of each block of the longest present prefix, in key order.
    pub tiers: Vec<TierKind>,
}

impl Lookup {
    /// Length of the longest present prefix, in blocks.
    pub fn hit_blocks(&self) -> usize {
        self.tiers.len()
    }
}

/// Why a leased block failed to load.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LoadFailure {
    /// Position of the block in the request.
    pub index: usize,
    /// What went wrong ([`ErrorKind::ChecksumMismatch`] for corrupt bytes).
    #[serde(skip)]
    pub kind: ErrorKind,
    /// The error's text.
    pub message: String,
}

/// What a load did: the leading `loaded` blocks are in the buffer, verified.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct LoadOutcome {
    /// Leading blocks copied out.
    pub loaded: usize,
    /// The block that stopped the load, if one was present but unreadable;
    /// the engine must recompute it and everything after it.
    pub failed: Option<LoadFailure>,
}

/// Pins on the leading present blocks of a request.
#[derive(Debug)]
pub struct Lease {
    ns: NamespaceId,
    blocks: Vec<(BlockKey, TierKind, Pin)>,
}

impl Lease {
    /// Blocks pinned: the present prefix at the time of the lease.
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    /// Whether nothing was pinned.
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// The tier each pinned block was found in.
    pub fn tiers(&self) -> Vec<TierKind> {
        self.blocks.iter().map(|b| b.1).collect()
    }

    /// How many leading pinned blocks are exactly `block_bytes` long: what
    /// [`BlockManager::load_leased`] can copy into whole-block slots.
    /// Checkpoint chunks may be shorter than their namespace's block; a
    /// caller moving them reads those one by one instead.
    pub fn whole_blocks(&self, block_bytes: usize) -> usize {
        self.blocks.iter().take_while(|b| b.2.len() == block_bytes).count()
    }

    /// Keeps the first `n` pinned blocks and unpins the rest.
    pub fn truncate(&mut self, n: usize) {
        self.blocks.truncate(n);
    }
}

impl BlockManager {
    /// The longest present prefix of `keys` and the tier of each block.
    pub fn lookup(&self, ns: NamespaceId, keys: &[BlockKey]) -> Result<Lookup> {
        self.lookup_with(ns, keys, true)
    }

    /// [`BlockManager::lookup`] in the host and disk tiers only (a cluster
    /// asks its peers before blob).
    pub fn lookup_local(&self, ns: NamespaceId, keys: &[BlockKey]) -> Result<Lookup> {
        self.lookup_with(ns, keys, false)
    }

    fn lookup_with(&self, ns: NamespaceId, keys: &[BlockKey], use_blob: bool) -> Result<Lookup> {
        let block = self.block_bytes(ns)? as usize;
        let mut tiers = Vec::new();
        'keys: for k in keys {
            for t in self.tiers() {
                if t.contains(k) {
                    tiers.push(t.kind());
                    continue 'keys;
                }
            }
            break;
        }
        if let Some(blob) = self.shared.blob.as_ref().filter(|_| use_blob)
            && tiers.len() < keys.len()
        {
            let n = blob.present_prefix(ns, &keys[tiers.len()..], block);
            tiers.extend(std::iter::repeat_n(TierKind::Blob, n));
        }
        add(&self.shared.counters.lookups, 1);
        add(&self.shared.counters.lookup_hit_blocks, tiers.len() as u64);
        Ok(Lookup { tiers })
    }

    /// Pins the leading present blocks of `keys`.
    ///
    /// Blocks the local tiers miss are fetched from blob (downloaded and
    /// verified) into the lease.
    pub fn lease(&self, ns: NamespaceId, keys: &[BlockKey]) -> Result<Lease> {
        let block = self.block_bytes(ns)? as usize;
        self.lease_sized(ns, keys, Expect::Exact(block), true)
    }

    fn lease_sized(&self, ns: NamespaceId, keys: &[BlockKey], block: Expect, use_blob: bool) -> Result<Lease> {
        let mut blocks = Vec::new();
        let mut foreign = false;
        'keys: for k in keys {
            for t in self.tiers() {
                if let Some(p) = t.pin(k) {
                    if p.namespace() != ns {
                        // Keys are rooted in their namespace, so this takes a
                        // 128-bit collision; refuse it all the same.
                        foreign = true;
                        break 'keys;
                    }
                    blocks.push((*k, t.kind(), p));
                    continue 'keys;
                }
            }
            break;
        }
        if let Some(blob) = self.shared.blob.as_ref().filter(|_| use_blob)
            && !foreign
            && blocks.len() < keys.len()
        {
            let rest = &keys[blocks.len()..];
            for (k, b) in rest.iter().zip(blob.fetch_prefix(ns, rest, block)) {
                blocks.push((*k, TierKind::Blob, Box::new(b) as Pin));
            }
        }
        Ok(Lease { ns, blocks })
    }

    /// Copies the leased blocks into `out` (back to back, exactly
    /// `lease.len()` blocks) and promotes disk hits into the host tier.
    pub fn load_leased(&self, lease: &Lease, out: &mut [u8]) -> Result<LoadOutcome> {
        let keys: Vec<BlockKey> = lease.blocks.iter().map(|b| b.0).collect();
        let block = self.check(lease.ns, &keys, out.len(), "load")?;
        let sh = &self.shared;
        add(&sh.counters.loads, 1);
        let mut res = LoadOutcome::default();
        let chunks: Vec<&mut [u8]> = out.chunks_exact_mut(block).collect();
        let disk_blocks = lease.blocks.iter().filter(|b| b.1 == TierKind::Disk).count();
        let pins: Vec<&dyn PinnedBlock> = lease.blocks.iter().map(|b| &*b.2).collect();
        read_verified(&pins, chunks, disk_blocks >= 2, |i, chunk, r| {
            let (key, tier, _) = &lease.blocks[i];
            self.finish_block(lease.ns, i, *key, *tier, chunk, r, &mut res)
        });
        add(&sh.counters.loaded_blocks, res.loaded as u64);
        Ok(res)
    }

    /// Accounts one block of a load; false stops the load.
    #[allow(clippy::too_many_arguments)]
    fn finish_block(
        &self,
        ns: NamespaceId,
        i: usize,
        key: BlockKey,
        tier: TierKind,
        chunk: &[u8],
        r: Result<()>,
        res: &mut LoadOutcome,
    ) -> bool {
        let sh = &self.shared;
        if let Err(e) = r {
            add(&sh.counters.load_failures, 1);
            tracing::warn!(%key, "load failed, the engine recomputes: {e}");
            res.failed = Some(LoadFailure {
                index: i,
                kind: e.kind(),
                message: e.to_string(),
            });
            return false;
        }
        TierCounters::add(&self.counters_of(tier).hits, 1);
        res.loaded += 1;
        match tier {
            TierKind::Disk => {
                add(&sh.counters.served_local_bytes, chunk.len() as u64);
                if let Some(h) = &sh.host {
                    TierCounters::add(&h.counters().misses, 1);
                    if sh.cfg.promote_on_hit && h.put(ns, key, chunk).is_ok() {
                        add(&sh.counters.promotions, 1);
                    }
                }
            }
            TierKind::Blob => {
                add(&sh.counters.served_blob_bytes, chunk.len() as u64);
                if sh.cfg.promote_on_hit {
                    // Into the first local tier; a promoted block is in blob
                    // already, so it is not logged for writeback.
                    let put = match (&sh.host, &sh.disk) {
                        (Some(h), _) => Some(h.put(ns, key, chunk)),
                        (None, Some(d)) if sh.admission.admits(&key) => Some(d.put(ns, key, chunk)),
                        _ => None,
                    };
                    match put {
                        Some(Ok(_)) => add(&sh.counters.blob_promotions, 1),
                        Some(Err(e)) => tracing::debug!(%key, "blob hit not promoted: {e}"),
                        None => {}
                    }
                }
            }
            _ => add(&sh.counters.served_local_bytes, chunk.len() as u64),
        }
        true
    }

    fn counters_of(&self, tier: TierKind) -> &TierCounters {
        match tier {
            TierKind::Host => self
                .shared
                .host
                .as_ref()
                .expect("a host block came from the host tier")
                .counters(),
            TierKind::Disk => self
                .shared
                .disk
                .as_ref()
                .expect("a disk block came from the disk tier")
                .counters(),
            TierKind::Blob => self
                .shared
                .blob
                .as_ref()
                .expect("a blob block came from the blob tier")
                .counters(),
        }
    }

    /// Loads the leading present blocks of `keys` into `out`, laid out back
    /// to back (`keys.len()` blocks). Blocks past the present prefix are
    /// misses; a present block that fails verification stops the load and is
    /// reported in [`LoadOutcome::failed`], never served.
    pub fn load(&self, ns: NamespaceId, keys: &[BlockKey], out: &mut [u8]) -> Result<LoadOutcome> {
        self.load_buf(ns, keys, out, true)
    }

    /// [`BlockManager::load`] from the host and disk tiers only (a cluster
    /// asks its peers before blob).
    pub fn load_local(&self, ns: NamespaceId, keys: &[BlockKey], out: &mut [u8]) -> Result<LoadOutcome> {
        self.load_buf(ns, keys, out, false)
    }

    fn load_buf(&self, ns: NamespaceId, keys: &[BlockKey], out: &mut [u8], use_blob: bool) -> Result<LoadOutcome> {
        let block = self.check(ns, keys, out.len(), "load")?;
        let lease = self.lease_sized(ns, keys, Expect::Exact(block), use_blob)?;
        let n = lease.len();
        let res = self.load_leased(&lease, &mut out[..n * block])?;
        self.count_missed(keys.len() - n);
        Ok(res)
    }

    fn count_missed(&self, missed: usize) {
        add(&self.shared.counters.missed_blocks, missed as u64);
        if missed > 0 {
            for t in self.tiers() {
                TierCounters::add(&t.counters().misses, 1);
            }
        }
    }

    /// [`BlockManager::load`] without a buffer of the caller's: `sink`
    /// gets the verified bytes of the leading present blocks where they
    /// lie, to copy them to their destination itself (an engine's KV
    /// tensors), in one copy.
    ///
    /// `sink(first, blocks)` is called with runs of consecutive blocks, in
    /// order: `blocks[j]` is the bytes of block `first + j` of `keys`,
    /// valid for the call only. Host blocks are handed out in the pool;
    /// disk blocks are read and verified into a reused scratch buffer
    /// first, so a run ends where that buffer is full. Verification is
    /// `load`'s: a block that fails it is never handed out, the load stops
    /// there and reports it in [`LoadOutcome::failed`]. An error from
    /// `sink` ends the load and is returned; the blocks of that run were
    /// not loaded.
    pub fn load_with(
        &self,
        ns: NamespaceId,
        keys: &[BlockKey],
        sink: impl FnMut(usize, &[&[u8]]) -> Result<()>,
    ) -> Result<LoadOutcome> {
        let block = self.block_bytes(ns)? as usize;
        let lease = self.lease_sized(ns, keys, Expect::Exact(block), true)?;
        let res = self.load_leased_with(&lease, sink)?;
        self.count_missed(keys.len() - lease.len());
        Ok(res)
    }

    /// [`BlockManager::load_leased`] through a sink, as
    /// [`BlockManager::load_with`] does.
    pub fn load_leased_with(
        &self,
        lease: &Lease,
        mut sink: impl FnMut(usize, &[&[u8]]) -> Result<()>,
    ) -> Result<LoadOutcome> {
        let block = self.block_bytes(lease.ns)? as usize;
        let sh = &self.shared;
        add(&sh.counters.loads, 1);
        let mut res = LoadOutcome::default();
        let room = self.scratch_blocks(block);
        let mut scratch: Option<Scratch> = None;
        let n = lease.blocks.len();
        let mut start = 0;
        while start < n {
            // A run: blocks start..end, each in memory or read into scratch.
            let mut in_memory: Vec<Option<&[u8]>> = Vec::new();
            let mut read: Vec<usize> = Vec::new();
            let mut failed: Option<(usize, Error)> = None;
            let mut end = start;
            while end < n {
                let (key, _, pin) = &lease.blocks[end];
                if pin.len() != block {
                    let e = Error::new(
                        ErrorKind::BlockSize,
                        format!("block {key} is {} bytes, not a whole block of {block}", pin.len()),
                    );
                    failed = Some((end, e));
                    break;
                }
                match pin.in_memory() {
                    Some(bytes) => {
                        if let Err(e) = pin.verify(bytes) {
                            failed = Some((end, e));
                            break;
                        }
                        in_memory.push(Some(bytes));
                    }
                    None if read.len() == room => break,
                    None => {
                        read.push(end);
                        in_memory.push(None);
                    }
                }
                end += 1;
            }
            if !read.is_empty() {
                let buf = scratch.get_or_insert_with(|| self.scratch(block));
                let chunks: Vec<&mut [u8]> = buf.chunks_exact_mut(block).take(read.len()).collect();
                let pins: Vec<&dyn PinnedBlock> = read.iter().map(|&i| &*lease.blocks[i].2).collect();
                let disk_blocks = read.iter().filter(|&&i| lease.blocks[i].1 == TierKind::Disk).count();
                read_verified(&pins, chunks, disk_blocks >= 2, |j, _, r| match r {
                    Ok(()) => true,
                    Err(e) => {
                        // Before any failure found above: those are at `end`.
                        failed = Some((read[j], e));
                        false
                    }
                });
            }
            let good = failed.as_ref().map_or(end, |f| f.0) - start;
            let mut scratch_blocks = scratch.as_deref().unwrap_or_default().chunks_exact(block);
            let blocks: Vec<&[u8]> = in_memory[..good]
                .iter()
                .map(|b| b.unwrap_or_else(|| scratch_blocks.next().expect("a read block is in scratch")))
                .collect();
            if !blocks.is_empty() {
                sink(start, &blocks)?;
            }
            for (i, bytes) in (start..).zip(&blocks) {
                let (key, tier, _) = &lease.blocks[i];
                self.finish_block(lease.ns, i, *key, *tier, bytes, Ok(()), &mut res);
            }
            if let Some((i, e)) = failed {
                let (key, tier, _) = &lease.blocks[i];
                self.finish_block(lease.ns, i, *key, *tier, &[], Err(e), &mut res);
                break;
            }
            start = end;
        }
        add(&sh.counters.loaded_blocks, res.loaded as u64);
        Ok(res)
    }

    /// Loads one block of any length (see [`BlockManager::store_one`]):
    /// `None` on a miss. Corrupt bytes are an error
    /// ([`ErrorKind::ChecksumMismatch`]), never data.
    pub fn load_one(&self, ns: NamespaceId, key: BlockKey) -> Result<Option<Vec<u8>>> {
        Ok(self.load_one_with(ns, key, true)?.map(|b| b.to_vec()))
    }

    /// [`BlockManager::load_one`] from the host and disk tiers only.
    pub fn load_one_local(&self, ns: NamespaceId, key: BlockKey) -> Result<Option<Vec<u8>>> {
        Ok(self.load_one_with(ns, key, false)?.map(|b| b.to_vec()))
    }

    /// [`BlockManager::load_one`] into a page-aligned buffer, as `Bytes`:
    /// read from the SSD without staging, and ready for an O_DIRECT write
    /// or the network without a copy.
    pub fn load_chunk(&self, ns: NamespaceId, key: BlockKey) -> Result<Option<bytes::Bytes>> {
        self.load_one_with(ns, key, true)
    }

    /// [`BlockManager::load_chunk`] from the host and disk tiers only.
    pub fn load_chunk_local(&self, ns: NamespaceId, key: BlockKey) -> Result<Option<bytes::Bytes>> {
        self.load_one_with(ns, key, false)
    }

    fn load_one_with(&self, ns: NamespaceId, key: BlockKey, use_blob: bool) -> Result<Option<bytes::Bytes>> {
        let max = self.block_bytes(ns)? as usize;
        let lease = self.lease_sized(ns, &[key], Expect::AtMost(max), use_blob)?;
        let sh = &self.shared;
        add(&sh.counters.loads, 1);
        let Some((k, tier, pin)) = lease.blocks.first() else {
            add(&sh.counters.missed_blocks, 1);
            for t in self.tiers() {
                TierCounters::add(&t.counters().misses, 1);
            }
            return Ok(None);
        };
        let len = pin.len();
        let mut buf = crate::buf::AlignedBuf::new(len);
        let out = &mut buf[..len];
        let r = pin.read_into(out);
        let mut res = LoadOutcome::default();
        if self.finish_block(ns, 0, *k, *tier, out, r, &mut res) {
            add(&sh.counters.loaded_blocks, 1);
            return Ok(Some(bytes::Bytes::from_owner(buf).slice(..len)));
        }
        let f = res.failed.expect("a block that did not finish failed");
        Err(Error::new(f.kind, f.message))
    }
}

/// Reads each pinned block into its chunk and verifies it, in order,
/// handing `each` the block's index, chunk and result; stops when `each`
/// answers false. With `pipeline`, block i+1 is read on another thread
/// while block i is verified: the device is busy while the CPU hashes,
/// instead of idle.
fn read_verified(
    pins: &[&dyn PinnedBlock],
    chunks: Vec<&mut [u8]>,
    pipeline: bool,
    mut each: impl FnMut(usize, &mut [u8], Result<()>) -> bool,
) {
    if !pipeline {
        for (i, (pin, chunk)) in pins.iter().zip(chunks).enumerate() {
            let r = pin.read_into(chunk);
            if !each(i, chunk, r) {
                break;
            }
        }
        return;
    }
    std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<(usize, &mut [u8], Result<()>)>(1);
        s.spawn(move || {
            for (i, (pin, chunk)) in pins.iter().zip(chunks).enumerate() {
                let r = pin.read_unverified(chunk);
                let failed = r.is_err();
                if tx.send((i, chunk, r)).is_err() || failed {
                    break;
                }
            }
        });
        for (i, chunk, r) in rx {
            let r = r.and_then(|()| pins[i].verify(chunk));
            if !each(i, chunk, r) {
                // Dropping the receiver stops the reader.
                break;
            }
        }
    });
}
