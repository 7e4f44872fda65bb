//! The gossip layer's wire format, the compact identity foca tracks, and
//! the directory that maps an identity to its member's addresses.
//!
//! # Messages
//!
//! Every message starts with a header of six bytes: the format version,
//! a kind, and the slot count its sender places keys in (u32, see
//! [`Envelope`]). The body follows, as the kind says:
//!
//! - `SWIM` (1): one foca packet (a probe, an ack, a gossip round...),
//!   at most [`super::SwimConfig::max_packet_bytes`]. Its header is `dst`
//!   (compact: key u64, stamp u32) first, then `src` (full), foca's
//!   incarnation of `src` (u16) and the message; the piggybacked member
//!   updates follow (count u16, then each a full identity, an incarnation
//!   u16 and a state u8).
//! - `SYNC_REQUEST` (2): anti-entropy; the sender (full) and its bucket
//!   digests (see [`super::sync`]).
//! - `SYNC_RESPONSE` (3): the sender (full), the buckets it wants back, and
//!   member entries.
//! - `REFUSED` (4): the sender refuses the receiver, which places keys in
//!   another slot count than the header's; the sender's id (u8 length,
//!   then the bytes). Never answered.
//!
//! A *full* identity is the member's stamp (u32: generation << 1 | left),
//! its id, gRPC address, gossip address and weight: whoever receives it
//! can reach, place and name the member without asking anyone. The key
//! foca compares is not sent: it is the hash of the id, computed again on
//! receipt, so a key and an id can never disagree.
//!
//! All integers are big-endian (what `bytes` writes). Decoding is total:
//! a short, oversized or malformed message is an error, never a panic.
//!
//! # Tags
//!
//! In a cluster with a bearer token, every message is *sealed*: the top
//! bit of its kind is set and it ends with a tag, HMAC-SHA256 of every
//! byte before the tag under a [`GossipKey`] derived from the token
//! ([`seal`], [`open`]). A receiver with a key drops a message whose tag
//! is missing or does not verify before anything reads it; one without a
//! key drops a sealed message (the two are not in one cluster). The tag
//! authenticates: it does not hide anything (the member list travels in
//! clear), so a network that must not see the list needs encryption below
//! (a VPN, WireGuard, IPsec).
//!
//! The tag covers the whole message, so what it carries is bound to the
//! identities it names: the sender's generation and incarnation in every
//! packet header, each member's in every update. A recorded message
//! replayed later therefore carries versions that the members have since
//! left behind, and loses to them everywhere (foca applies an update only
//! when it is newer). What a replay can still do, by whoever records the
//! traffic: repeat a message of the current versions (an ack that answers
//! a probe of the same number, 1 in 256, may hide a failure for one probe
//! period; a suspicion costs its member a refutation). Closing that would
//! take a sequence number per sender, kept by every receiver.
//!
//! The format version was 1 before the header carried the slot count:
//! nodes of either version refuse the other's messages as another
//! format.

use bytes::{Buf, BufMut};
use foca::{Codec, Header, Incarnation, Member as FocaMember, Message, State};
use hmac::{Hmac, Mac};
use parking_lot::{Mutex, RwLock};
use sha2::Sha256;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use crate::replication::placement::{Member, NodeId};

/// The format version, first byte of every message.
pub(crate) const VERSION: u8 = 2;

/// The header's length: version, kind, slot count.
pub(crate) const HEADER_BYTES: usize = 6;

/// A tag's length: a whole HMAC-SHA256.
pub const TAG_BYTES: usize = 32;

/// The most a message adds to its body: the header and a tag. A datagram
/// takes at most [`super::SwimConfig::max_packet_bytes`] plus this.
pub const ENVELOPE_BYTES: usize = HEADER_BYTES + TAG_BYTES;

/// The bit of the kind byte that says the message ends with a tag.
const SEALED: u8 = 0x80;

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
    Refused = 4,
}

impl Kind {
    pub(crate) fn of(b: u8) -> Option<Self> {
        match b {
            1 => Some(Self::Swim),
            2 => Some(Self::SyncRequest),
            3 => Some(Self::SyncResponse),
            4 => Some(Self::Refused),
            _ => None,
        }
    }
}

/// The key of the tags: HMAC-SHA256 of a fixed label under the cluster's
/// bearer token, not the token itself, so a key that leaks (a core dump)
/// does not open the gRPC port, and tags made for gossip mean nothing
/// anywhere else.
#[derive(Clone)]
pub struct GossipKey([u8; 32]);

impl GossipKey {
    /// The key of the cluster whose bearer token is `token`.
    pub fn from_token(token: &str) -> Self {
        let mut mac = Hmac::<Sha256>::new_from_slice(token.as_bytes()).expect("HMAC takes keys of any length");
        mac.update(b"kvtier gossip tag key v1");
        Self(mac.finalize().into_bytes().into())
    }

    fn mac(&self) -> Hmac<Sha256> {
        Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes keys of any length")
    }
}

impl std::fmt::Debug for GossipKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GossipKey(..)")
    }
}

/// What frames this node's messages and what it requires of others': the
/// slot count it places keys in, which every message states and every
/// receiver compares with its own (a member that places keys otherwise
/// would look for them where the others did not put them), and the key
/// of the tags when the cluster has a token (see "Tags").
#[derive(Debug, Clone)]
pub struct Envelope {
    /// The slot count keys are placed in (`cluster.slots`).
    pub slots: u32,
    /// The key of the tags; none: messages are neither sealed nor
    /// checked, and a sealed one is dropped.
    pub key: Option<GossipKey>,
}

impl Envelope {
    /// Messages stating `slots`, not sealed.
    pub fn new(slots: u32) -> Self {
        Self { slots, key: None }
    }

    /// The same, sealed with `key`.
    pub fn with_key(self, key: GossipKey) -> Self {
        Self { key: Some(key), ..self }
    }

    /// A message of `kind` with its header written, for the body to
    /// follow; `body` bytes reserved.
    pub(crate) fn start(&self, kind: Kind, body: usize) -> Vec<u8> {
        let mut m = Vec::with_capacity(HEADER_BYTES + body + TAG_BYTES);
        m.extend_from_slice(&[VERSION, kind as u8]);
        m.put_u32(self.slots);
        m
    }

    /// The bytes a tag adds to a message.
    pub(crate) fn tag_bytes(&self) -> usize {
        if self.key.is_some() { TAG_BYTES } else { 0 }
    }
}

/// Seals `message` (header and body) with `key`: sets the kind's top bit
/// and appends the tag.
pub(crate) fn seal(key: &GossipKey, message: &mut Vec<u8>) {
    debug_assert!(message.len() >= HEADER_BYTES, "a message has a header");
    message[1] |= SEALED;
    let mut mac = key.mac();
    mac.update(message);
    let tag = mac.finalize().into_bytes();
    message.extend_from_slice(&tag);
}

/// A received message, its header read and its tag checked.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Opened<'a> {
    pub(crate) kind: Kind,
    /// The slot count the sender places keys in.
    pub(crate) slots: u32,
    pub(crate) body: &'a [u8],
}

/// Why a received message was dropped before its body was read.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Unopened {
    /// No tag, or one that does not verify under this node's key, or a
    /// tag this node has no key for.
    Unauthenticated(String),
    /// Too short, another format, an unknown kind.
    Malformed(String),
}

/// Reads `message`'s header and checks its tag against `key` (see
/// "Tags"); nothing is read past the header before the tag verified.
pub(crate) fn open<'a>(key: Option<&GossipKey>, message: &'a [u8]) -> Result<Opened<'a>, Unopened> {
    if message.len() < 2 {
        return Err(Unopened::Malformed(format!(
            "gossip message of {} bytes: shorter than its header",
            message.len()
        )));
    }
    if message[0] != VERSION {
        return Err(Unopened::Malformed(format!(
            "gossip message of format {} (this node speaks {VERSION})",
            message[0]
        )));
    }
    let sealed = message[1] & SEALED != 0;
    let message = match (key, sealed) {
        (None, false) => message,
        (None, true) => {
            return Err(Unopened::Unauthenticated(
                "gossip message dropped: it has a tag, so its sender has a token, and this node has none".into(),
            ));
        }
        (Some(_), false) => {
            return Err(Unopened::Unauthenticated(
                "gossip message dropped: it has no tag, so its sender has no token, and this node has one".into(),
            ));
        }
        (Some(k), true) => {
            let Some(at) = message.len().checked_sub(TAG_BYTES).filter(|at| *at >= HEADER_BYTES) else {
                return Err(Unopened::Unauthenticated(format!(
                    "gossip message dropped: {} bytes, too short for a header and a tag",
                    message.len()
                )));
            };
            let mut mac = k.mac();
            mac.update(&message[..at]);
            if mac.verify_slice(&message[at..]).is_err() {
                return Err(Unopened::Unauthenticated(
                    "gossip message dropped: its tag does not verify (another token, or altered on the way)".into(),
                ));
            }
            &message[..at]
        }
    };
    if message.len() < HEADER_BYTES {
        return Err(Unopened::Malformed(format!(
            "gossip message of {} bytes: shorter than its header",
            message.len()
        )));
    }
    let kind = Kind::of(message[1] & !SEALED)
        .ok_or_else(|| Unopened::Malformed(format!("gossip message of unknown kind {}", message[1] & !SEALED)))?;
    let slots = u32::from_be_bytes(message[2..6].try_into().expect("4 bytes"));
    Ok(Opened {
        kind,
        slots,
        body: &message[HEADER_BYTES..],
    })
}

/// The id and gossip address of the sender of a message of `kind` (a
/// packet or a sync), read without learning them: for the refusal of a
/// member that places keys otherwise.
pub(crate) fn sender(kind: Kind, body: &[u8]) -> Result<(&str, SocketAddr), WireError> {
    let mut r = Reader::new(body);
    match kind {
        Kind::Swim => {
            r.bytes(12, "destination")?;
        }
        Kind::SyncRequest | Kind::SyncResponse => {}
        Kind::Refused => return Err(err("a refusal names no sender")),
    }
    r.u32("member stamp")?;
    let id = r.str(MAX_ID_BYTES, "member id")?;
    r.str(MAX_ADDR_BYTES, "member address")?;
    Ok((id, r.socket()?))
}

/// The body of a refusal by node `id`.
pub(crate) fn refusal_body(id: &str, message: &mut Vec<u8>) {
    debug_assert!(!id.is_empty() && id.len() <= MAX_ID_BYTES, "a validated id");
    message.put_u8(id.len() as u8);
    message.put_slice(id.as_bytes());
}

/// The id of the node that sent the refusal `body`.
pub(crate) fn refuser(body: &[u8]) -> Result<&str, WireError> {
    let mut r = Reader::new(body);
    let id = r.str(MAX_ID_BYTES, "refusing node's id")?;
    if r.remaining() != 0 {
        return Err(err(format!("refusal with {} bytes after its end", r.remaining())));
    }
    Ok(id)
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

    fn message(env: &Envelope) -> Vec<u8> {
        let mut m = env.start(Kind::SyncRequest, 3);
        m.extend_from_slice(b"abc");
        if let Some(k) = &env.key {
            seal(k, &mut m);
        }
        m
    }

    #[test]
    fn a_sealed_message_opens_with_its_key_only() {
        let key = GossipKey::from_token("s3cret");
        let env = Envelope::new(64).with_key(key.clone());
        let m = message(&env);
        assert_eq!(m.len(), HEADER_BYTES + 3 + TAG_BYTES);
        let want = Opened {
            kind: Kind::SyncRequest,
            slots: 64,
            body: b"abc",
        };
        assert_eq!(open(Some(&key), &m), Ok(want));
        let unauthenticated = |r: Result<Opened<'_>, Unopened>| match r {
            Err(Unopened::Unauthenticated(e)) => e,
            r => panic!("not refused as unauthenticated: {r:?}"),
        };
        // Every bit flipped, in the header, the body or the tag.
        for i in 0..m.len() * 8 {
            let mut bad = m.clone();
            bad[i / 8] ^= 1 << (i % 8);
            if i / 8 == 0 {
                // The version byte is read first.
                assert!(matches!(open(Some(&key), &bad), Err(Unopened::Malformed(_))));
                continue;
            }
            let e = match open(Some(&key), &bad) {
                Err(Unopened::Unauthenticated(e)) => e,
                r => panic!("bit {i} flipped: {r:?}"),
            };
            assert!(
                e.contains("does not verify") || e.contains("has no tag"),
                "bit {i}: {e}"
            );
        }
        let e = unauthenticated(open(Some(&GossipKey::from_token("other")), &m));
        assert!(e.contains("does not verify"), "{e}");
        for cut in 1..=m.len() - 2 {
            let e = unauthenticated(open(Some(&key), &m[..m.len() - cut]));
            assert!(
                e.contains("does not verify") || e.contains("too short"),
                "cut {cut}: {e}"
            );
        }
        let e = unauthenticated(open(None, &m));
        assert!(e.contains("this node has none"), "{e}");
        let plain = message(&Envelope::new(64));
        let e = unauthenticated(open(Some(&key), &plain));
        assert!(e.contains("has no tag"), "{e}");
        // A tag appended to a message that does not say it is sealed.
        let mut tagged = plain.clone();
        let mut mac = key.mac();
        mac.update(&plain);
        tagged.extend_from_slice(&mac.finalize().into_bytes());
        assert!(matches!(open(Some(&key), &tagged), Err(Unopened::Unauthenticated(_))));
    }

    #[test]
    fn without_a_key_messages_open_as_they_are() {
        let m = message(&Envelope::new(7));
        assert_eq!(m.len(), HEADER_BYTES + 3, "no tag");
        assert_eq!(
            open(None, &m),
            Ok(Opened {
                kind: Kind::SyncRequest,
                slots: 7,
                body: b"abc",
            })
        );
        for (bytes, says) in [
            (&[][..], "shorter than its header"),
            (&[VERSION, 2, 0][..], "shorter than its header"),
            (&[1, 2, 0, 0, 0, 7][..], "format 1 (this node speaks 2)"),
            (&[VERSION, 9, 0, 0, 0, 7][..], "unknown kind 9"),
        ] {
            match open(None, bytes) {
                Err(Unopened::Malformed(e)) => assert!(e.contains(says), "{e}"),
                r => panic!("{bytes:?}: {r:?}"),
            }
        }
        assert_eq!(format!("{:?}", GossipKey::from_token("s3cret")), "GossipKey(..)");
        let (a, b) = (GossipKey::from_token("s3cret"), GossipKey::from_token("s3cret"));
        assert_eq!(a.0, b.0, "the same token gives the same key");
        assert_ne!(a.0, GossipKey::from_token("s3cret2").0);
    }

    #[test]
    fn a_refusal_names_its_sender_and_a_sender_is_read_without_learning_it() {
        let mut m = Vec::new();
        refusal_body("node-1", &mut m);
        assert_eq!(refuser(&m), Ok("node-1"));
        m.push(0);
        assert!(refuser(&m).unwrap_err().0.contains("after its end"));
        let p = peer(3);
        let mut body = Vec::new();
        put_peer(5, &p, &mut body).unwrap();
        assert_eq!(sender(Kind::SyncRequest, &body), Ok(("node-3", p.gossip)));
        let mut packet = vec![0u8; 12];
        packet.extend_from_slice(&body);
        assert_eq!(sender(Kind::Swim, &packet), Ok(("node-3", p.gossip)));
        assert!(sender(Kind::Swim, &body[..4]).is_err());
    }
}
