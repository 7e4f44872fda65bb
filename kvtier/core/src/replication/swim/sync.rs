//! Anti-entropy: member tables compared by bucket digests, the differing
//! buckets exchanged both ways (see the module docs, "Anti-entropy").
//!
//! A request carries the sender (full) and 256 bucket digests (u64). A
//! response carries the sender (full), the buckets it wants back (u8 ids),
//! and entries (count u32, then members as in packets). This node's own
//! entry goes out at incarnation 0: foca keeps its own incarnation to
//! itself, and a lower incarnation never overrides a higher one.

use bytes::BufMut;

use super::wire::{self, Reader};
use super::*;

/// Buckets of the digest, by the top byte of a member's key.
pub(super) const BUCKETS: usize = 256;

/// The smallest encoded entry: a full identity with one-byte id and
/// address and an IPv4 gossip address, an incarnation and a state.
const MIN_ENTRY_BYTES: usize = 4 + 2 + 2 + 7 + 8 + 3;

fn bucket(key: u64) -> usize {
    (key >> 56) as usize
}

/// What a member contributes to its bucket: its version and whether it
/// is down (final for a version); not its incarnation or suspicion.
fn entry_hash(id: Ident, down: bool) -> u64 {
    let mut b = [0u8; 13];
    b[..8].copy_from_slice(&id.key().to_le_bytes());
    b[8..12].copy_from_slice(&id.stamp().to_le_bytes());
    b[12] = u8::from(down);
    xxhash_rust::xxh3::xxh3_64(&b)
}

fn refused(what: &str, e: WireError) -> Error {
    bad(format!("{what}: {e}"))
}

impl Swim {
    /// This node's table in buckets, itself included.
    fn digests(&self) -> [u64; BUCKETS] {
        let mut d = [0u64; BUCKETS];
        let me = *self.foca.identity();
        d[bucket(self.key)] = entry_hash(me, false);
        for m in self.foca.iter_membership_state() {
            let id = *m.id();
            if id.key() == self.key {
                continue;
            }
            let b = bucket(id.key());
            d[b] = d[b].wrapping_add(entry_hash(id, m.state() == State::Down));
        }
        d
    }

    pub(super) fn send_sync_request(&mut self, to: SocketAddr) {
        let d = self.digests();
        let mut bytes = self
            .envelope
            .start(Kind::SyncRequest, wire::full_len(&self.me) + 2 + 8 * BUCKETS);
        wire::put_peer(self.foca.identity().stamp(), &self.me, &mut bytes).expect("a Vec has room");
        bytes.put_u16(BUCKETS as u16);
        for x in d {
            bytes.put_u64(x);
        }
        self.ready.sends.push(Outgoing {
            to,
            bytes,
            channel: Channel::Stream,
        });
    }

    pub(super) fn handle_sync_request(&mut self, body: &[u8]) -> Result<()> {
        let what = "sync request";
        let mut r = Reader::new(body);
        let from = r.full(&self.dir).map_err(|e| refused(what, e))?;
        if from.key() == self.key {
            return Err(bad(format!("{what} from this node's own id")));
        }
        let n = usize::from(r.u16("bucket count").map_err(|e| refused(what, e))?);
        if n != BUCKETS {
            return Err(bad(format!("{what} with {n} buckets ({BUCKETS} expected)")));
        }
        let mut theirs = [0u64; BUCKETS];
        for x in &mut theirs {
            *x = r.u64("bucket digest").map_err(|e| refused(what, e))?;
        }
        if r.remaining() != 0 {
            return Err(bad(format!("{what} with {} bytes after its end", r.remaining())));
        }
        let mine = self.digests();
        let differ: Vec<u8> = (0..BUCKETS)
            .filter(|b| mine[*b] != theirs[*b])
            .map(|b| b as u8)
            .collect();
        if differ.is_empty() {
            return Ok(());
        }
        if let Some(to) = self.dir.gossip(from.key()) {
            self.send_entries(to, &differ, true);
        }
        Ok(())
    }

    /// Sends this node's entries in `buckets`; `want_back` asks for the
    /// receiver's entries in the same buckets.
    fn send_entries(&mut self, to: SocketAddr, buckets: &[u8], want_back: bool) {
        let mut chosen = [false; BUCKETS];
        for b in buckets {
            chosen[usize::from(*b)] = true;
        }
        let mut bytes = self.envelope.start(Kind::SyncResponse, 0);
        wire::put_peer(self.foca.identity().stamp(), &self.me, &mut bytes).expect("a Vec has room");
        let want: &[u8] = if want_back { buckets } else { &[] };
        bytes.put_u16(want.len() as u16);
        bytes.extend_from_slice(want);
        let count_at = bytes.len();
        bytes.put_u32(0);
        let mut count = 0u32;
        // The whole message, its tag included, fits in max_sync_bytes.
        let room = self
            .config
            .max_sync_bytes
            .saturating_sub(bytes.len() + self.envelope.tag_bytes());
        let mut buf = bytes.limit(room);
        let mine = FocaMember::new(*self.foca.identity(), 0, State::Alive);
        let others = self.foca.iter_membership_state().filter(|m| m.id().key() != self.key);
        for m in std::iter::once(&mine).chain(others) {
            if !chosen[bucket(m.id().key())] {
                continue;
            }
            // A table over max_sync_bytes goes out in part; the rest
            // differs again at the next sync.
            if wire::put_member(m, &self.dir, &mut buf).is_err() {
                break;
            }
            count += 1;
        }
        let mut bytes = buf.into_inner();
        bytes[count_at..count_at + 4].copy_from_slice(&count.to_be_bytes());
        self.stats.syncs_sent += 1;
        self.ready.sends.push(Outgoing {
            to,
            bytes,
            channel: Channel::Stream,
        });
    }

    pub(super) fn handle_sync_response(&mut self, body: &[u8]) -> Result<()> {
        let what = "sync response";
        let len = body.len() + wire::HEADER_BYTES + self.envelope.tag_bytes();
        if len > self.config.max_sync_bytes {
            return Err(Error::new(
                ErrorKind::TooLarge,
                format!(
                    "{what} of {len} bytes (max_sync_bytes is {})",
                    self.config.max_sync_bytes
                ),
            ));
        }
        let mut r = Reader::new(body);
        let from = r.full(&self.dir).map_err(|e| refused(what, e))?;
        if from.key() == self.key {
            return Err(bad(format!("{what} from this node's own id")));
        }
        let nw = usize::from(r.u16("wanted bucket count").map_err(|e| refused(what, e))?);
        if nw > BUCKETS {
            return Err(bad(format!("{what} wants {nw} buckets back (at most {BUCKETS})")));
        }
        let want = r.bytes(nw, "wanted buckets").map_err(|e| refused(what, e))?.to_vec();
        let count = r.u32("entry count").map_err(|e| refused(what, e))? as usize;
        if count > r.remaining() / MIN_ENTRY_BYTES {
            return Err(bad(format!("{what} claims {count} entries in {} bytes", r.remaining())));
        }
        let mut entries = Vec::with_capacity(count);
        for _ in 0..count {
            entries.push(r.member(&self.dir).map_err(|e| refused(what, e))?);
        }
        if r.remaining() != 0 {
            return Err(bad(format!("{what} with {} bytes after its end", r.remaining())));
        }
        self.synced = true;
        let fresh_down = unknown_down(&self.foca, &entries);
        let mut rt = Collect::new(&mut self.ready, &self.dir, self.envelope.slots);
        // What a sync teaches is not gossiped on: the sender has it, and
        // its own syncs spread it.
        let res = self.foca.apply_many(entries.iter().cloned(), false, &mut rt);
        let c = rt.done();
        self.settle(c);
        if !fresh_down.is_empty() {
            let held: Vec<Ident> = self
                .foca
                .iter_membership_state()
                .filter(|m| m.state() == State::Down && fresh_down.contains(&m.id().key()))
                .map(|m| *m.id())
                .collect();
            for id in held {
                self.placed(id, false, true);
            }
        }
        if !want.is_empty()
            && let Some(to) = self.dir.gossip(from.key())
        {
            self.send_entries(to, &want, false);
        }
        res.map_err(|e| internal("applying a sync", e))
    }
}
