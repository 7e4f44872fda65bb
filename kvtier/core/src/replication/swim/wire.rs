//! The gossip layer's wire format, the compact identity foca tracks, and
//! the directory that maps an identity to its member's addresses.
//!
//! # Datagrams
//!
//! Every message starts with two bytes, the format version and a kind:
//!
//! - `SWIM` (1): one foca packet (a probe, an ack, a gossip round...),
//!   at most [`super::SwimConfig::max_packet_bytes`] after the two bytes.
//!   Its header is `dst` (compact: key u64, stamp u32) first, then `src`
//!   (full), foca's incarnation of `src` (u16) and the message; the
//!   piggybacked member updates follow (count u16, then each a full
//!   identity, an incarnation u16 and a state u8).
//! - `SYNC_REQUEST` (2): anti-entropy; the sender (full) and its bucket
//!   digests (see [`super::sync`]).
//! - `SYNC_RESPONSE` (3): the sender (full), the buckets it wants back, and
//!   member entries.
//!
//! A *full* identity is the member's stamp (u32: generation << 1 | left),
//! its id, gRPC address, gossip address and weight: whoever receives it
//! can reach, place and name the member without asking anyone. The key
//! foca compares is not sent: it is the hash of the id, computed again on
//! receipt, so a key and an id can never disagree.
//!
//! All integers are big-endian (what `bytes` writes). Decoding is total:
//! a short, oversized or malformed message is an error, never a panic.

use bytes::{Buf, BufMut};
use foca::{Codec, Header, Incarnation, Member as FocaMember, Message, State};
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use crate::replication::placement::{Member, NodeId};

/// The format version, first byte of every message.
pub(crate) const VERSION: u8 = 1;

/// The longest node id, in bytes: ids travel in every packet header.
pub const MAX_ID_BYTES: usize = 64;
/// The longest gRPC address, in bytes.
pub const MAX_ADDR_BYTES: usize = 128;

/// What a message is (its second byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Swim = 1,
    SyncRequest = 2,
    SyncResponse = 3,
}

impl Kind {
    pub(crate) fn of(b: u8) -> Option<Self> {
        match b {
            1 => Some(Self::Swim),
            2 => Some(Self::SyncRequest),
            3 => Some(Self::SyncResponse),
            _ => None,
        }
    }
}

/// A member as gossip carries it: its placement entry (id, gRPC address,
/// weight) and the address of its gossip listener.
#[derive(Debug, Clone, PartialEq)]
pub struct Peer {
    /// The placement entry.
    pub member: Member,
    /// Where its gossip messages go.
    pub gossip: SocketAddr,
}

impl Peer {
    /// `member`, gossiping at `gossip`.
    pub fn new(member: Member, gossip: SocketAddr) -> Self {
        Self { member, gossip }
    }

    /// Checks what every packet carries: a non-empty id of at most
    /// [`MAX_ID_BYTES`], a non-empty address of at most [`MAX_ADDR_BYTES`],
    /// a positive finite weight.
    pub fn validate(&self) -> Result<(), String> {
        check_fields(&self.member.id.0, &self.member.addr, self.member.weight)
    }
}

fn check_fields(id: &str, addr: &str, weight: f64) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_ID_BYTES {
        return Err(format!("member id {id:?} must have 1 to {MAX_ID_BYTES} bytes"));
    }
    if addr.is_empty() || addr.len() > MAX_ADDR_BYTES {
        return Err(format!(
            "member {id}: address {addr:?} must have 1 to {MAX_ADDR_BYTES} bytes"
        ));
    }
    if !(weight.is_finite() && weight > 0.0) {
        return Err(format!("member {id}: weight {weight} must be a positive number"));
    }
    Ok(())
}

/// The largest generation: one bit of the stamp says "left".
pub const MAX_GENERATION: u32 = (1 << 31) - 1;

/// What foca tracks for each member: the hash of its id and its stamp
/// (generation, and whether it left). 12 bytes, packed so that a foca
/// member entry takes 16 and the key loads in one instruction: every node
/// keeps one entry per member, foca scans them on every update, and the
/// simulation keeps N of them for each of N nodes.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
#[repr(C, packed(4))]
pub(crate) struct Ident {
    key: u64,
    stamp: u32,
}

impl Ident {
    /// The destination of an announce to a seed address whose member is
    /// not known yet; the receiver reads it as itself.
    pub(crate) const WILDCARD: Ident = Ident { key: 0, stamp: 0 };

    pub(crate) fn new(key: u64, generation: u32, left: bool) -> Self {
        debug_assert!(generation <= MAX_GENERATION);
        Self::from_parts(key, generation << 1 | u32::from(left))
    }

    fn from_parts(key: u64, stamp: u32) -> Self {
        Self { key, stamp }
    }

    pub(crate) fn key(self) -> u64 {
        self.key
    }

    pub(crate) fn stamp(self) -> u32 {
        self.stamp
    }

    pub(crate) fn generation(self) -> u32 {
        self.stamp >> 1
    }

    /// Whether this identity is the member's "left" record.
    pub(crate) fn left(self) -> bool {
        self.stamp & 1 == 1
    }
}

impl std::fmt::Debug for Ident {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:016x}/{}{}",
            self.key(),
            self.generation(),
            if self.left() { "/left" } else { "" }
        )
    }
}

impl foca::Identity for Ident {
    type Addr = u64;

    /// After a false "down", the member comes back as the next generation
    /// (the same addresses); a member that left stays gone.
    fn renew(&self) -> Option<Self> {
        (!self.left() && self.generation() < MAX_GENERATION)
            .then(|| Ident::new(self.key(), self.generation() + 1, false))
    }

    fn addr(&self) -> u64 {
        self.key()
    }

    /// The newer stamp wins: a later generation, or the "left" record of
    /// the same generation.
    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.stamp > adversary.stamp
    }
}

/// The key foca compares for `id`: its hash (never 0, the wildcard's).
pub(crate) fn key_of(id: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(id.as_bytes()).max(1)
}

/// Hashes a member key, which is a hash already (of the node id), as
/// itself: maps by key skip SipHash on every packet.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// A map by member key.
pub(crate) type KeyMap<V> = HashMap<u64, V, std::hash::BuildHasherDefault<KeyHasher>>;

/// Member addresses by key, the newest generation's: how a node turns the
/// identity foca names into an address to send to and a placement entry.
/// Filled from every full identity decoded. A clone shares the table: the
/// simulation gives one to all its nodes (each would hold the same
/// entries), which keeps 10,000 nodes in memory.
#[derive(Clone, Default)]
pub struct Directory {
    inner: Arc<RwLock<KeyMap<Entry>>>,
}

#[derive(Clone)]
struct Entry {
    generation: u32,
    peer: Arc<Peer>,
}

impl std::fmt::Debug for Directory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Directory").field("members", &self.len()).finish()
    }
}

impl Directory {
    /// An empty directory.
    pub fn new() -> Self {
        Self::default()
    }

    /// Members known.
    pub fn len(&self) -> usize {
        self.inner.read().len()
    }

    /// Whether no member is known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Records `peer` at `generation` unless a newer generation is known;
    /// the first record of a generation stays (a member changes addresses
    /// only by restarting as a new generation).
    pub(crate) fn learn(&self, generation: u32, peer: &Peer) {
        let key = key_of(&peer.member.id.0);
        if self.is_current(key, generation, |_| true) {
            return;
        }
        self.insert(key, generation, Arc::new(peer.clone()));
    }

    fn is_current(&self, key: u64, generation: u32, same: impl Fn(&Peer) -> bool) -> bool {
        match self.inner.read().get(&key) {
            Some(e) => e.generation > generation || (e.generation == generation && same(&e.peer)),
            None => false,
        }
    }

    fn insert(&self, key: u64, generation: u32, peer: Arc<Peer>) {
        let mut map = self.inner.write();
        match map.get(&key) {
            Some(e) if e.generation >= generation => {}
            _ => {
                map.insert(key, Entry { generation, peer });
            }
        }
    }

    pub(crate) fn peer(&self, key: u64) -> Option<Arc<Peer>> {
        self.inner.read().get(&key).map(|e| e.peer.clone())
    }

    pub(crate) fn gossip(&self, key: u64) -> Option<SocketAddr> {
        self.inner.read().get(&key).map(|e| e.peer.gossip)
    }
}

/// Why a message could not be decoded (or encoded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireError(pub String);

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for WireError {}

fn err(msg: impl Into<String>) -> WireError {
    WireError(msg.into())
}

/// A bounds-checked cursor over a received message.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    pub(crate) fn pos(&self) -> usize {
        self.pos
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub(crate) fn bytes(&mut self, n: usize, what: &str) -> Result<&'a [u8], WireError> {
        if self.remaining() < n {
            return Err(err(format!(
                "truncated {what}: {n} bytes needed at offset {}, {} left",
                self.pos,
                self.remaining()
            )));
        }
        let b = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(b)
    }

    pub(crate) fn u8(&mut self, what: &str) -> Result<u8, WireError> {
        Ok(self.bytes(1, what)?[0])
    }

    pub(crate) fn u16(&mut self, what: &str) -> Result<u16, WireError> {
        Ok(u16::from_be_bytes(self.bytes(2, what)?.try_into().expect("2 bytes")))
    }

    pub(crate) fn u32(&mut self, what: &str) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(self.bytes(4, what)?.try_into().expect("4 bytes")))
    }

    pub(crate) fn u64(&mut self, what: &str) -> Result<u64, WireError> {
        Ok(u64::from_be_bytes(self.bytes(8, what)?.try_into().expect("8 bytes")))
    }

    fn str(&mut self, max: usize, what: &str) -> Result<&'a str, WireError> {
        let n = usize::from(self.u8(what)?);
        if n == 0 || n > max {
            return Err(err(format!("{what} of {n} bytes (1 to {max} allowed)")));
        }
        std::str::from_utf8(self.bytes(n, what)?).map_err(|_| err(format!("{what} is not UTF-8")))
    }

    fn socket(&mut self) -> Result<SocketAddr, WireError> {
        let ip = match self.u8("gossip address family")? {
            4 => IpAddr::V4(Ipv4Addr::from(
                <[u8; 4]>::try_from(self.bytes(4, "IPv4 address")?).expect("4"),
            )),
            6 => IpAddr::V6(Ipv6Addr::from(
                <[u8; 16]>::try_from(self.bytes(16, "IPv6 address")?).expect("16"),
            )),
            f => return Err(err(format!("gossip address family {f} (4 or 6 expected)"))),
        };
        Ok(SocketAddr::new(ip, self.u16("gossip port")?))
    }

    /// A full identity; its addresses go into `dir` when newer than what
    /// it holds (compared in place: a known member costs no allocation).
    pub(crate) fn full(&mut self, dir: &Directory) -> Result<Ident, WireError> {
        let stamp = self.u32("member stamp")?;
        let id = self.str(MAX_ID_BYTES, "member id")?;
        let addr = self.str(MAX_ADDR_BYTES, "member address")?;
        let gossip = self.socket()?;
        let weight = f64::from_bits(self.u64("member weight")?);
        check_fields(id, addr, weight).map_err(err)?;
        let key = key_of(id);
        let generation = stamp >> 1;
        let same =
            |p: &Peer| p.member.id.0 == id && p.member.addr == addr && p.gossip == gossip && p.member.weight == weight;
        if !dir.is_current(key, generation, same) {
            let member = Member {
                id: NodeId(id.to_string()),
                addr: addr.to_string(),
                weight,
            };
            dir.insert(key, generation, Arc::new(Peer { member, gossip }));
        }
        Ok(Ident::from_parts(key, stamp))
    }

    fn compact(&mut self) -> Result<Ident, WireError> {
        let key = self.u64("destination key")?;
        let stamp = self.u32("destination stamp")?;
        Ok(Ident::from_parts(key, stamp))
    }

    /// A member entry: a full identity, its incarnation and state.
    pub(crate) fn member(&mut self, dir: &Directory) -> Result<FocaMember<Ident>, WireError> {
        let id = self.full(dir)?;
        let incarnation = self.u16("incarnation")?;
        let state = match self.u8("member state")? {
            0 => State::Alive,
            1 => State::Suspect,
            2 => State::Down,
            s => return Err(err(format!("member state {s} (0 to 2 expected)"))),
        };
        Ok(FocaMember::new(id, incarnation, state))
    }
}

fn room(buf: &impl BufMut, n: usize, what: &str) -> Result<(), WireError> {
    if buf.remaining_mut() < n {
        return Err(err(format!(
            "no room for {what}: {n} bytes, {} left",
            buf.remaining_mut()
        )));
    }
    Ok(())
}

/// The encoded length of `peer`'s full identity.
pub(crate) fn full_len(peer: &Peer) -> usize {
    let ip = if peer.gossip.is_ipv4() { 4 } else { 16 };
    4 + 1 + peer.member.id.0.len() + 1 + peer.member.addr.len() + 1 + ip + 2 + 8
}

/// Writes `id` in full, its addresses taken from `dir`; nothing when the
/// buffer has no room for all of it (foca's rule for members).
pub(crate) fn put_full(id: Ident, dir: &Directory, buf: &mut impl BufMut) -> Result<(), WireError> {
    let peer = dir
        .peer(id.key())
        .ok_or_else(|| err(format!("no addresses known for member {id:?}")))?;
    put_peer(id.stamp(), &peer, buf)
}

pub(crate) fn put_peer(stamp: u32, peer: &Peer, buf: &mut impl BufMut) -> Result<(), WireError> {
    room(buf, full_len(peer), "a member")?;
    buf.put_u32(stamp);
    for s in [&peer.member.id.0, &peer.member.addr] {
        buf.put_u8(s.len() as u8);
        buf.put_slice(s.as_bytes());
    }
    match peer.gossip.ip() {
        IpAddr::V4(ip) => {
            buf.put_u8(4);
            buf.put_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            buf.put_u8(6);
            buf.put_slice(&ip.octets());
        }
    }
    buf.put_u16(peer.gossip.port());
    buf.put_u64(peer.member.weight.to_bits());
    Ok(())
}

/// Writes a member entry (full identity, incarnation, state), or nothing.
pub(crate) fn put_member(m: &FocaMember<Ident>, dir: &Directory, buf: &mut impl BufMut) -> Result<(), WireError> {
    let peer = dir
        .peer(m.id().key())
        .ok_or_else(|| err(format!("no addresses known for member {:?}", m.id())))?;
    room(buf, full_len(&peer) + 3, "a member entry")?;
    put_peer(m.id().stamp(), &peer, buf)?;
    buf.put_u16(m.incarnation());
    buf.put_u8(match m.state() {
        State::Alive => 0,
        State::Suspect => 1,
        State::Down => 2,
    });
    Ok(())
}

/// What the codec saw while foca decoded a packet: the key and state of
/// every member named (the sender as alive), for the wrapper to decide
/// whether suspicions may have changed.
pub(crate) type Seen = Arc<Mutex<Vec<(u64, State)>>>;

/// foca's codec: the format above, addresses through a [`Directory`].
pub(crate) struct WireCodec {
    pub(crate) dir: Directory,
    pub(crate) seen: Seen,
}

const PING: u8 = 1;
const ACK: u8 = 2;
const PING_REQ: u8 = 3;
const INDIRECT_PING: u8 = 4;
const INDIRECT_ACK: u8 = 5;
const FORWARDED_ACK: u8 = 6;
const ANNOUNCE: u8 = 7;
const FEED: u8 = 8;
const GOSSIP: u8 = 9;
const BROADCAST: u8 = 10;
const TURN_UNDEAD: u8 = 11;

/// The offset of the message tag in a foca packet (after the destination,
/// the full source and its incarnation), and the tag: how the wrapper
/// recognizes an announce to the wildcard.
pub(crate) fn message_tag(packet: &[u8]) -> Result<u8, WireError> {
    let mut r = Reader::new(packet);
    r.bytes(12, "destination")?;
    r.u32("member stamp")?;
    r.str(MAX_ID_BYTES, "member id")?;
    r.str(MAX_ADDR_BYTES, "member address")?;
    r.socket()?;
    r.u64("member weight")?;
    r.u16("incarnation")?;
    r.u8("message")
}

/// Whether a foca packet's tag says Announce.
pub(crate) fn is_announce(tag: u8) -> bool {
    tag == ANNOUNCE
}

/// Writes `id` compactly, as a packet's destination.
pub(crate) fn put_compact(id: Ident, buf: &mut impl BufMut) {
    buf.put_u64(id.key());
    buf.put_u32(id.stamp());
}

impl Codec<Ident> for WireCodec {
    type Error = WireError;

    fn encode_header(&mut self, header: &Header<Ident>, mut buf: impl BufMut) -> Result<(), WireError> {
        room(&buf, 12, "the destination")?;
        put_compact(header.dst, &mut buf);
        put_full(header.src, &self.dir, &mut buf)?;
        // Incarnation, tag, and a probe number for Ping and Ack.
        room(&buf, 2 + 1 + 1, "the message")?;
        buf.put_u16(header.src_incarnation);
        let (tag, number, named) = match &header.message {
            Message::Ping(n) => (PING, Some(*n), None),
            Message::Ack(n) => (ACK, Some(*n), None),
            Message::PingReq { target, probe_number } => (PING_REQ, None, Some((*target, *probe_number))),
            Message::IndirectPing { origin, probe_number } => (INDIRECT_PING, None, Some((*origin, *probe_number))),
            Message::IndirectAck { target, probe_number } => (INDIRECT_ACK, None, Some((*target, *probe_number))),
            Message::ForwardedAck { origin, probe_number } => (FORWARDED_ACK, None, Some((*origin, *probe_number))),
            Message::Announce => (ANNOUNCE, None, None),
            Message::Feed => (FEED, None, None),
            Message::Gossip => (GOSSIP, None, None),
            Message::Broadcast => (BROADCAST, None, None),
            Message::TurnUndead => (TURN_UNDEAD, None, None),
        };
        buf.put_u8(tag);
        if let Some(n) = number {
            buf.put_u8(n);
        }
        if let Some((id, n)) = named {
            put_full(id, &self.dir, &mut buf)?;
            room(&buf, 1, "the probe number")?;
            buf.put_u8(n);
        }
        Ok(())
    }

    fn decode_header(&mut self, mut buf: impl Buf) -> Result<Header<Ident>, WireError> {
        let mut r = Reader::new(buf.chunk());
        let dst = r.compact()?;
        let src = r.full(&self.dir)?;
        let src_incarnation: Incarnation = r.u16("incarnation")?;
        let message = match r.u8("message")? {
            PING => Message::Ping(r.u8("probe number")?),
            ACK => Message::Ack(r.u8("probe number")?),
            tag @ (PING_REQ | INDIRECT_PING | INDIRECT_ACK | FORWARDED_ACK) => {
                let id = r.full(&self.dir)?;
                let probe_number = r.u8("probe number")?;
                match tag {
                    PING_REQ => Message::PingReq {
                        target: id,
                        probe_number,
                    },
                    INDIRECT_PING => Message::IndirectPing {
                        origin: id,
                        probe_number,
                    },
                    INDIRECT_ACK => Message::IndirectAck {
                        target: id,
                        probe_number,
                    },
                    _ => Message::ForwardedAck {
                        origin: id,
                        probe_number,
                    },
                }
            }
            ANNOUNCE => Message::Announce,
            FEED => Message::Feed,
            GOSSIP => Message::Gossip,
            BROADCAST => Message::Broadcast,
            TURN_UNDEAD => Message::TurnUndead,
            t => return Err(err(format!("unknown message {t}"))),
        };
        self.seen.lock().push((src.key(), State::Alive));
        let n = r.pos();
        buf.advance(n);
        Ok(Header {
            src,
            src_incarnation,
            dst,
            message,
        })
    }

    fn encode_member(&mut self, member: &FocaMember<Ident>, mut buf: impl BufMut) -> Result<(), WireError> {
        put_member(member, &self.dir, &mut buf)
    }

    fn decode_member(&mut self, mut buf: impl Buf) -> Result<FocaMember<Ident>, WireError> {
        let mut r = Reader::new(buf.chunk());
        let m = r.member(&self.dir)?;
        self.seen.lock().push((m.id().key(), m.state()));
        let n = r.pos();
        buf.advance(n);
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(i: u16) -> Peer {
        Peer::new(
            Member::new(format!("node-{i}"), format!("10.0.0.{i}:50051")),
            SocketAddr::from(([10, 0, 0, i as u8], 7946)),
        )
    }

    fn codec(dir: &Directory) -> WireCodec {
        WireCodec {
            dir: dir.clone(),
            seen: Seen::default(),
        }
    }

    fn ident(p: &Peer, generation: u32) -> Ident {
        Ident::new(key_of(&p.member.id.0), generation, false)
    }

    #[test]
    fn every_message_round_trips_and_teaches_the_addresses() {
        let (a, b, c) = (peer(1), peer(2), peer(3));
        let sender = Directory::new();
        for p in [&a, &b, &c] {
            sender.learn(7, p);
        }
        let (ia, ib, ic) = (ident(&a, 7), ident(&b, 7), ident(&c, 7));
        let messages = [
            Message::Ping(3),
            Message::Ack(4),
            Message::PingReq {
                target: ic,
                probe_number: 5,
            },
            Message::IndirectPing {
                origin: ic,
                probe_number: 6,
            },
            Message::IndirectAck {
                target: ic,
                probe_number: 7,
            },
            Message::ForwardedAck {
                origin: ic,
                probe_number: 8,
            },
            Message::Announce,
            Message::Feed,
            Message::Gossip,
            Message::Broadcast,
            Message::TurnUndead,
        ];
        for message in messages {
            let h = Header {
                src: ia,
                src_incarnation: 9,
                dst: ib,
                message,
            };
            let mut buf = Vec::new();
            codec(&sender).encode_header(&h, &mut buf).unwrap();
            let m = FocaMember::new(ic, 2, State::Suspect);
            codec(&sender).encode_member(&m, &mut buf).unwrap();
            let receiver = Directory::new();
            let mut rd = codec(&receiver);
            let mut slice = &buf[..];
            assert_eq!(rd.decode_header(&mut slice).unwrap(), h);
            assert_eq!(rd.decode_member(&mut slice).unwrap(), m);
            assert!(slice.is_empty());
            assert_eq!(
                *receiver.peer(ia.key()).unwrap(),
                a,
                "the sender's addresses travel with it"
            );
            assert_eq!(*receiver.peer(ic.key()).unwrap(), c);
            assert_eq!(
                rd.seen.lock().as_slice(),
                &[(ia.key(), State::Alive), (ic.key(), State::Suspect)]
            );
            assert_eq!(message_tag(&buf).unwrap() == ANNOUNCE, h.message == Message::Announce);
        }
    }

    #[test]
    fn a_member_that_does_not_fit_writes_nothing() {
        let dir = Directory::new();
        dir.learn(1, &peer(1));
        let m = FocaMember::alive(ident(&peer(1), 1));
        let mut buf = bytes::BufMut::limit(Vec::new(), 20);
        assert!(codec(&dir).encode_member(&m, &mut buf).is_err());
        assert!(buf.get_ref().is_empty());
    }

    #[test]
    fn truncated_and_malformed_input_is_a_precise_error() {
        let dir = Directory::new();
        dir.learn(1, &peer(1));
        let mut good = Vec::new();
        codec(&dir)
            .encode_member(&FocaMember::alive(ident(&peer(1), 1)), &mut good)
            .unwrap();
        for cut in 0..good.len() {
            let e = codec(&Directory::new()).decode_member(&good[..cut]).unwrap_err();
            assert!(e.0.contains("truncated"), "cut at {cut}: {e}");
        }
        let mut bad_state = good.clone();
        *bad_state.last_mut().unwrap() = 9;
        assert!(
            codec(&dir)
                .decode_member(&bad_state[..])
                .unwrap_err()
                .0
                .contains("state 9")
        );
        let mut bad_weight = good.clone();
        let w = good.len() - 3 - 8;
        bad_weight[w..w + 8].copy_from_slice(&f64::NAN.to_bits().to_be_bytes());
        assert!(
            codec(&dir)
                .decode_member(&bad_weight[..])
                .unwrap_err()
                .0
                .contains("weight")
        );
        let mut empty_id = good.clone();
        empty_id[4] = 0;
        assert!(
            codec(&dir)
                .decode_member(&empty_id[..])
                .unwrap_err()
                .0
                .contains("member id of 0 bytes")
        );
    }

    #[test]
    fn the_directory_keeps_the_newest_generation() {
        let dir = Directory::new();
        let old = peer(1);
        let mut moved = peer(1);
        moved.member.addr = "10.0.9.9:50051".into();
        dir.learn(5, &old);
        dir.learn(6, &moved);
        dir.learn(5, &old);
        let k = key_of("node-1");
        assert_eq!(dir.peer(k).unwrap().member.addr, "10.0.9.9:50051");
        // The first record of a generation stays.
        let mut other = peer(1);
        other.member.addr = "10.0.8.8:1".into();
        dir.learn(6, &other);
        assert_eq!(dir.peer(k).unwrap().member.addr, "10.0.9.9:50051");
    }

    #[test]
    fn identities_are_compact_and_order_by_stamp() {
        use foca::Identity;
        assert_eq!(std::mem::size_of::<FocaMember<Ident>>(), 16);
        let a = Ident::new(42, 3, false);
        let left = Ident::new(42, 3, true);
        let next = a.renew().unwrap();
        assert_eq!(next, Ident::new(42, 4, false));
        assert!(left.win_addr_conflict(&a));
        assert!(next.win_addr_conflict(&left));
        assert_eq!(left.renew(), None, "a member that left does not come back by itself");
        assert_eq!((a.key(), a.generation(), a.left()), (42, 3, false));
        assert_eq!(key_of(""), xxhash_rust::xxh3::xxh3_64(b"").max(1));
    }
}
