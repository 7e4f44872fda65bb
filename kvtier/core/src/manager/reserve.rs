//! In-place stores: [`BlockManager::reserve`] hands out writable space for
//! new blocks, the caller fills it (an engine copies straight from its KV
//! tensors), and [`Reservation::commit`] publishes it. `store` takes a
//! filled buffer and copies it into the tier; this takes no copy of its
//! own.

use super::store::put_disk_batch;
use super::{BlockManager, Scratch, StoreOutcome, add};
use crate::block::{BlockKey, NamespaceId};
use crate::error::{Error, ErrorKind, Result};
use crate::tier::host::{HostSlot, HostTier};
use crate::tier::{Stored, Tier};

/// Writable space for new blocks of one namespace, from
/// [`BlockManager::reserve`]: fill every slot of [`Reservation::slots_mut`]
/// entirely, then [`Reservation::commit`].
///
/// Nothing of it is visible to lookups or loads before the commit;
/// dropped uncommitted, it frees its space and leaves nothing behind.
#[derive(Debug)]
pub struct Reservation<'m> {
    mgr: &'m BlockManager,
    ns: NamespaceId,
    block: usize,
    /// The keys covered: a leading run of those asked for.
    keys: Vec<BlockKey>,
    slots: Vec<Slot>,
    /// SSD-only: the staged blocks, back to back in key order.
    staging: Option<Scratch>,
    /// Write-through queue room held for host slots bound for the disk.
    queued: usize,
}

#[derive(Debug)]
enum Slot {
    /// Stored already (keys name their content): nothing to write.
    Present,
    /// SSD-only: kept off the disk by the admission filter.
    NotAdmitted,
    /// Space in the host pool; `through` when the block is written through
    /// to disk at commit (its queue room is held).
    Host { slot: HostSlot, through: bool },
    /// SSD-only: the next block of the staging buffer.
    Staged,
}

impl BlockManager {
    /// Reserves writable space for new blocks of namespace `ns`, one per
    /// key, in the host tier (or, without one, in a staging buffer bound
    /// for the disk); [`Reservation::commit`] publishes them as
    /// [`BlockManager::store`] would have stored them.
    ///
    /// - The reservation covers a leading run of `keys`, at least one key
    ///   when `keys` is not empty: it stops where the host tier has no more
    ///   room (every other block pinned or reserved, as when the request is
    ///   larger than the pool), where the write-through queue is full, or,
    ///   without a host tier, where a staging buffer is full. Commit it and
    ///   reserve the rest.
    /// - When not even the first key gets room, it fails with
    ///   [`ErrorKind::Throttled`] (counted), as `store` does, and changes
    ///   nothing.
    /// - A key already present (or being written by another caller) gets
    ///   no slot and counts as present at commit; so does a key the disk
    ///   admission filter keeps out of an SSD-only store (not admitted).
    /// - Admission sightings are counted as each key is covered; making
    ///   room evicts (and cascades to disk) as a store does; write-through
    ///   blocks hold their queue room from now until commit or drop.
    pub fn reserve(&self, ns: NamespaceId, keys: &[BlockKey]) -> Result<Reservation<'_>> {
        let block = self.block_bytes(ns)? as usize;
        let mut r = Reservation {
            mgr: self,
            ns,
            block,
            keys: Vec::with_capacity(keys.len()),
            slots: Vec::with_capacity(keys.len()),
            staging: None,
            queued: 0,
        };
        let res = match &self.shared.host {
            Some(host) => self.reserve_host(host, keys, &mut r),
            None => self.reserve_staged(keys, &mut r),
        };
        if let Err(e) = res {
            if e.kind() == ErrorKind::Throttled {
                add(&self.shared.counters.throttled, 1);
            }
            return Err(e);
        }
        Ok(r)
    }

    fn reserve_host(&self, host: &HostTier, keys: &[BlockKey], r: &mut Reservation<'_>) -> Result<()> {
        let sh = &self.shared;
        // Write-through runs when there are workers, which start only with
        // a disk tier.
        let through_to = self.tx.as_ref().and(sh.disk.as_ref());
        for k in keys {
            sh.admission.record(std::slice::from_ref(k));
            let through = through_to.is_some_and(|d| sh.admission.admits(k) && !host.contains(k) && !d.contains(k));
            if through && let Err(e) = self.take_queue_room(1) {
                if r.slots.is_empty() {
                    return Err(e);
                }
                break;
            }
            match host.reserve(r.ns, *k, r.block) {
                Ok(Some(slot)) => {
                    r.queued += usize::from(through);
                    r.slots.push(Slot::Host { slot, through });
                }
                Ok(None) => {
                    self.release_queue_room(usize::from(through));
                    r.slots.push(Slot::Present);
                }
                Err(e) => {
                    self.release_queue_room(usize::from(through));
                    if e.kind() != ErrorKind::NoSpace {
                        return Err(e);
                    }
                    if r.slots.is_empty() {
                        // Every host block is pinned by readers: transient.
                        return Err(Error::throttled(format!("host tier: {}", e.message())));
                    }
                    break;
                }
            }
            r.keys.push(*k);
        }
        Ok(())
    }

    fn reserve_staged(&self, keys: &[BlockKey], r: &mut Reservation<'_>) -> Result<()> {
        let sh = &self.shared;
        let disk = sh.disk.as_ref().expect("validated: a tier is configured");
        let room = self.scratch_blocks(r.block);
        let mut staged = 0;
        for k in keys {
            // Only a block to be written needs room: check before counting
            // the sighting, so a key left for the next reservation is
            // counted once.
            if staged == room && !disk.contains(k) {
                break;
            }
            sh.admission.record(std::slice::from_ref(k));
            // The order of `store`'s SSD-only path: admission first.
            let slot = if !sh.admission.admits(k) {
                Slot::NotAdmitted
            } else if disk.contains(k) {
                Slot::Present
            } else {
                staged += 1;
                Slot::Staged
            };
            r.slots.push(slot);
            r.keys.push(*k);
        }
        if staged > 0 {
            r.staging = Some(self.scratch(r.block));
        }
        Ok(())
    }
}

impl Reservation<'_> {
    /// Keys covered: a leading run of those given to
    /// [`BlockManager::reserve`].
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no key is covered (only when none was asked for).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The keys covered, in order.
    pub fn keys(&self) -> &[BlockKey] {
        &self.keys
    }

    /// Bytes of each block.
    pub fn block_bytes(&self) -> usize {
        self.block
    }

    /// One entry per covered key, in order: the block's bytes to fill, or
    /// `None` where nothing is to be written (the key is present, or the
    /// admission filter keeps it off the disk). The bytes start
    /// unspecified: the caller writes all of them before committing.
    pub fn slots_mut(&mut self) -> Vec<Option<&mut [u8]>> {
        let Self {
            slots, staging, block, ..
        } = self;
        let mut staged = staging.as_deref_mut().map(|s| s.chunks_exact_mut(*block));
        slots
            .iter_mut()
            .map(|s| match s {
                Slot::Host { slot, .. } => Some(slot.as_mut_slice()),
                Slot::Staged => Some(
                    staged
                        .as_mut()
                        .and_then(Iterator::next)
                        .expect("a staged slot has its block in the staging buffer"),
                ),
                Slot::Present | Slot::NotAdmitted => None,
            })
            .collect()
    }

    /// Publishes every filled block, as [`BlockManager::store`] would have
    /// stored them: host blocks become visible (and queue for write-through
    /// when it runs); SSD-only blocks are written to disk, each visible
    /// once its write is done. Answers what a store answers; an I/O error
    /// on the disk is returned after the other blocks are written, and the
    /// caller retries the whole request (stores are idempotent).
    pub fn commit(mut self) -> Result<StoreOutcome> {
        let mgr = self.mgr;
        let sh = &mgr.shared;
        add(&sh.counters.stores, 1);
        let mut out = StoreOutcome::default();
        let mut staged = Vec::new();
        let mut sent = 0;
        for (k, s) in self.keys.iter().zip(std::mem::take(&mut self.slots)) {
            match s {
                Slot::Present => out.present += 1,
                Slot::NotAdmitted => {
                    out.not_admitted += 1;
                    add(&sh.counters.not_admitted, 1);
                }
                Slot::Host { slot, through } => {
                    slot.commit();
                    out.stored += 1;
                    let host = sh.host.as_ref().expect("a host slot came from the host tier");
                    if through && mgr.write_through(host, self.ns, *k) {
                        sent += 1;
                    }
                }
                Slot::Staged => staged.push(*k),
            }
        }
        // Room held for blocks evicted again before their job was queued.
        mgr.release_queue_room(std::mem::take(&mut self.queued) - sent);
        let mut result = Ok(());
        if let Some(buf) = self.staging.as_deref() {
            let disk = sh.disk.as_ref().expect("staged blocks go to the disk tier");
            let items: Vec<_> = staged
                .iter()
                .zip(buf.chunks_exact(self.block))
                .map(|(k, b)| (self.ns, *k, b))
                .collect();
            for r in put_disk_batch(disk, sh.wb.as_deref(), &items) {
                match r {
                    Ok(Stored::Inserted) => out.stored += 1,
                    Ok(Stored::Present) => out.present += 1,
                    Err(e) => {
                        if result.is_ok() {
                            result = Err(e);
                        }
                    }
                }
            }
        }
        add(&sh.counters.stored_blocks, out.stored as u64);
        add(&sh.counters.present_blocks, out.present as u64);
        result.map(|()| out)
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        // Uncommitted: host slots free themselves as they drop, the staging
        // buffer goes back to its pool, and the queue room is given back.
        self.mgr.release_queue_room(self.queued);
    }
}
