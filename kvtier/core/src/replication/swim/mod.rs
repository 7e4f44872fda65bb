//! Gossip membership: SWIM with suspicion and piggybacked dissemination, as
//! a state machine without I/O. The server feeds it received bytes and
//! fired timers; it answers with bytes to send, timers to set and member
//! changes to apply to [`Membership`] ([`apply_change`]).
//!
//! # Why foca
//!
//! Two maintained Rust implementations exist. [foca] 2.0 (MPL-2.0, a
//! weak, file-level copyleft: using it unmodified as a dependency puts no
//! terms on kvtier's own files) is SWIM with the Inf. and Susp. extensions
//! (suspicion, incarnations, piggybacked updates) and nothing else: no
//! sockets, no clock, no threads. It is called with bytes and timer events
//! and calls back a `Runtime` to send, schedule and notify, which is the
//! shape of this crate's replication core (raft-rs `RawNode`): the core
//! decides, the server does the I/O, and a simulation drives the same code
//! with simulated time. Identities, the wire format and the random source
//! are ours to choose, which lets a member entry take 16 bytes (10,000
//! nodes × 10,000 entries fit in one process for the simulation).
//! [chitchat] 0.13 (MIT, Quickwit) is Scuttlebutt anti-entropy of per-node
//! key-value state with a phi-accrual detector; it owns a tokio transport
//! and its own timers, has no SWIM probes (no indirect probes, no
//! suspicion subprotocol) and sends digests of the whole cluster state to
//! a few peers each round, which grows with the cluster. Its key-value
//! state is not needed here: a member's identity (id, addresses, weight)
//! is all placement uses.
//!
//! What foca lacks, this module adds: a full-state exchange for joiners
//! (foca's own announce returns a few members, so a node joining 10,000
//! would learn the rest over hours), periodic anti-entropy by bucketed
//! digests (a node that missed every copy of an update — paused, or
//! behind a partition — catches up within a sync interval), seeds given
//! by address rather than identity, a graceful leave that others tell
//! apart from a crash, and liveness changes as events (foca reports up
//! and down only).
//!
//! # Identities, generations and incarnations
//!
//! A member is known to foca by an identity: the hash of its node id (the
//! key, one per member) and a *stamp*: its **generation** and a "left"
//! bit. The generation is chosen by the server at start and must grow at
//! every start of the same node id (seconds since an epoch, or one more
//! than the last one it saved, whichever is larger): a restarted node is
//! the same member with a newer identity, which wins over the old one
//! everywhere. The addresses (gRPC, gossip) and weight travel with every
//! identity and are fixed per generation: changing them takes a restart.
//! A member falsely declared down comes back by itself as generation + 1
//! ([`Swim::generation`] then changes; the server saves it).
//!
//! Within a generation, foca's **incarnation** (u16) refutes suspicion: a
//! suspected member bumps it, and "alive at a higher incarnation" beats
//! "suspect". Incarnations order liveness only; they never move keys.
//!
//! Every node applies the updates of one member in the order of (stamp,
//! incarnation) and ignores older ones, so all nodes converge on the same
//! latest version of every member however gossip delivers them.
//!
//! # From gossip to the member list and liveness
//!
//! [`MemberChange`]s map to [`Membership`] as follows ([`apply_change`]):
//!
//! | gossip | change | `Membership` |
//! | --- | --- | --- |
//! | a member never seen, alive | `Joined` + `Liveness(Up)` | [`Membership::join`]: the placement set grows (keys move) |
//! | a member never seen, learned as down (a joiner's sync) | `Joined` + `Liveness(Down)` | joins the set, down: writes skip it and leave hints |
//! | a newer generation, same addresses | `Joined` (no-op) + `Liveness` | liveness only: a restart moves no key |
//! | a newer generation, new addresses or weight | `Joined` | re-addressed (its keys move if the weight changed) |
//! | probe failed (here or elsewhere) | `Liveness(Suspect)` | still written to |
//! | suspicion refuted | `Liveness(Up)` | |
//! | suspicion timed out | `Liveness(Down)` | keeps its place; writes skip it, with hints |
//! | the "left" record (graceful leave, or [`Swim::remove`]) | `Left` | [`Membership::leave`]: the set shrinks (keys move) |
//!
//! So, as before, a failure moves no keys; only a join, a leave (or an
//! operator's removal of a dead node) and a weight change do. The epochs
//! placement uses are [`Membership`]'s: `list_epoch` moves on each change
//! of the placement set (a `Joined` that added or re-addressed a member,
//! a `Left`), `epoch` also on liveness. Both are local counters; whether
//! two nodes place keys alike is [`Membership::digest`], equal on every
//! node once gossip has converged. A cluster-wide scalar epoch would need
//! every node to know every member's whole history (a joiner learns only
//! the current versions), so generations order each member's changes
//! instead: that is what makes every node end on the same list.
//!
//! # Seeds
//!
//! [`Swim::join`] takes socket addresses: the config's seed list and what
//! the server resolved from DNS (the Kubernetes headless service has one
//! A record per pod; the resolution is I/O and belongs to the server).
//! It announces to a few of them, whose identities it does not know (the
//! receiver reads the wildcard destination as itself), and asks one for a
//! full sync, retrying other seeds until one answers. The node's own
//! address among the seeds is skipped; no seed at all makes a one-node
//! cluster that others join.
//!
//! # What a node lets in
//!
//! Every message states the slot count its sender places keys in, and
//! carries a tag when the cluster has a key ([`Envelope`]; the format is
//! in `wire.rs`, "Tags"). [`Swim::handle_message`] drops a message whose
//! tag is missing or wrong before reading it, and refuses one from a node
//! that places keys otherwise: neither reaches foca, so such a node never
//! enters the member table, whatever it claims.
//!
//! # Anti-entropy
//!
//! Every `sync_interval_ms` a node sends one random member the digests of
//! its member table in 256 buckets (by key): each bucket sums a hash of
//! (key, stamp, down?) over its members, so liveness blips and
//! incarnations do not count, only versions and deaths. Equal buckets cost
//! nothing more. For the buckets that differ, the receiver sends its
//! entries and asks for the sender's, and both apply what they get with
//! foca's precedence rules. A joiner's first sync differs in every bucket
//! and receives the whole table.
//!
//! [foca]: https://docs.rs/foca/2.0.0
//! [chitchat]: https://docs.rs/chitchat/0.13.0

pub mod sim;
mod sync;
mod wire;

pub use wire::{
    Directory, ENVELOPE_BYTES, Envelope, GossipKey, MAX_ADDR_BYTES, MAX_GENERATION, MAX_ID_BYTES, Peer, TAG_BYTES,
    WireError,
};

use foca::{Foca, Member as FocaMember, NoCustomBroadcast, OwnedNotification, Runtime, State, Timer};
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::num::{NonZeroU8, NonZeroUsize};
use std::sync::Arc;
use std::time::Duration;

use self::wire::{Ident, KeyMap, Kind, Opened, Seen, Unopened, WireCodec, key_of};
use super::membership::{Change, ListError, Liveness, Membership};
use super::placement::{Member, NodeId};
use crate::error::{Error, ErrorKind, Result};

/// The SWIM protocol's settings. With the defaults, every member of a
/// 10,000-member cluster holds a crashed one down within about 11 s, for
/// about 2.2 messages per node per second (`kvtier-bench cluster-sim`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SwimConfig {
    /// How often this node probes one member (SWIM's protocol period).
    pub probe_period_ms: u64,
    /// How long a probe waits for its ack before asking `indirect_probes`
    /// other members to probe for it; below `probe_period_ms`.
    pub probe_rtt_ms: u64,
    /// Members asked to probe an unresponsive member indirectly.
    pub indirect_probes: usize,
    /// A suspect is declared down after `suspicion_mult × max(1, log10 n)`
    /// probe periods (n: live members) unless it refutes: time for the
    /// suspicion to reach it and its refutation to come back.
    pub suspicion_mult: f64,
    /// A fixed suspicion timeout instead (0: scale with the cluster as
    /// above); at least one probe period.
    pub suspect_timeout_ms: u64,
    /// Each update is sent `retransmit_mult × ceil(log10(n + 1))` times
    /// (memberlist's rule): each member then misses all copies with a
    /// probability of about e^-(that), and anti-entropy repairs the rare
    /// miss.
    pub retransmit_mult: f64,
    /// How often pending updates are also sent to `gossip_fanout` random
    /// members besides the probes (0: only on probes). Sent only while
    /// updates are pending.
    pub gossip_interval_ms: u64,
    /// Members each such gossip round goes to.
    pub gossip_fanout: usize,
    /// How often this node asks one member for a few live members, and
    /// (twice as long) announces itself to two members it holds down, to
    /// heal partitions (0: never).
    pub announce_interval_ms: u64,
    /// How often this node compares its member table with one random
    /// member's (0: never). See "Anti-entropy".
    pub sync_interval_ms: u64,
    /// A join asks the next seed when no sync came back by then.
    pub join_retry_ms: u64,
    /// Join rounds before giving up (the server may resolve the seeds
    /// again and call [`Swim::join`] anew).
    pub join_attempts: u32,
    /// Largest gossip datagram, bytes (what UDP carries unfragmented).
    pub max_packet_bytes: usize,
    /// Largest sync message, bytes (a stream; 10,000 members take about
    /// 0.6 MB).
    pub max_sync_bytes: usize,
}

impl Default for SwimConfig {
    fn default() -> Self {
        Self {
            probe_period_ms: 1000,
            probe_rtt_ms: 400,
            indirect_probes: 3,
            suspicion_mult: 2.0,
            suspect_timeout_ms: 0,
            retransmit_mult: 4.0,
            gossip_interval_ms: 200,
            gossip_fanout: 3,
            announce_interval_ms: 30_000,
            sync_interval_ms: 30_000,
            join_retry_ms: 2_000,
            join_attempts: 10,
            max_packet_bytes: 1400,
            max_sync_bytes: 64 << 20,
        }
    }
}

impl SwimConfig {
    /// Checks the values; the message names the field.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.probe_period_ms == 0 || self.probe_rtt_ms == 0 || self.probe_rtt_ms >= self.probe_period_ms {
            return Err(format!(
                "probe_rtt_ms ({}) must be above 0 and below probe_period_ms ({})",
                self.probe_rtt_ms, self.probe_period_ms
            ));
        }
        if self.indirect_probes == 0 {
            return Err("indirect_probes must be at least 1".into());
        }
        for (name, v) in [
            ("suspicion_mult", self.suspicion_mult),
            ("retransmit_mult", self.retransmit_mult),
        ] {
            if !(v.is_finite() && v > 0.0 && v <= 100.0) {
                return Err(format!("{name} {v} must be above 0 and at most 100"));
            }
        }
        if self.suspect_timeout_ms > 0 && self.suspect_timeout_ms < self.probe_period_ms {
            return Err(format!(
                "suspect_timeout_ms {} must be 0 (scaled) or at least probe_period_ms ({})",
                self.suspect_timeout_ms, self.probe_period_ms
            ));
        }
        if self.gossip_interval_ms > 0 && self.gossip_fanout == 0 {
            return Err("gossip_fanout must be at least 1 when gossip_interval_ms is set".into());
        }
        if self.join_retry_ms == 0 || self.join_attempts == 0 {
            return Err("join_retry_ms and join_attempts must be at least 1".into());
        }
        if !(512..=65_000).contains(&self.max_packet_bytes) {
            return Err(format!(
                "max_packet_bytes {} must be between 512 and 65000 (a header takes up to about 470)",
                self.max_packet_bytes
            ));
        }
        if self.max_sync_bytes < self.max_packet_bytes {
            return Err(format!(
                "max_sync_bytes {} must be at least max_packet_bytes {}",
                self.max_sync_bytes, self.max_packet_bytes
            ));
        }
        Ok(())
    }

    fn period(&self) -> Duration {
        Duration::from_millis(self.probe_period_ms)
    }

    /// How long a suspect has to refute with `n` live members.
    pub fn suspect_timeout(&self, n: usize) -> Duration {
        if self.suspect_timeout_ms > 0 {
            return Duration::from_millis(self.suspect_timeout_ms);
        }
        let scale = (n.max(1) as f64).log10().max(1.0);
        self.period().mul_f64(self.suspicion_mult * scale)
    }

    /// How many times an update is sent with `n` live members.
    pub fn transmissions(&self, n: usize) -> u8 {
        let t = (self.retransmit_mult * ((n + 1) as f64).log10().ceil()).round();
        t.clamp(1.0, 255.0) as u8
    }

    fn foca(&self, n: usize) -> foca::Config {
        let every = |ms: u64, members: usize| {
            (ms > 0).then(|| foca::PeriodicParams {
                frequency: Duration::from_millis(ms),
                num_members: NonZeroUsize::new(members).expect("validated"),
            })
        };
        foca::Config {
            probe_period: self.period(),
            probe_rtt: Duration::from_millis(self.probe_rtt_ms),
            num_indirect_probes: NonZeroUsize::new(self.indirect_probes).expect("validated"),
            max_transmissions: NonZeroU8::new(self.transmissions(n)).expect("at least 1"),
            suspect_to_down_after: self.suspect_timeout(n),
            // Never forget a member: the table is bounded by node ids, and
            // a forgotten "left" record would let stale gossip revive it.
            remove_down_after: None,
            max_packet_size: NonZeroUsize::new(self.max_packet_bytes).expect("validated"),
            notify_down_members: true,
            periodic_announce: every(self.announce_interval_ms, 1),
            periodic_announce_to_down_members: every(self.announce_interval_ms.saturating_mul(2), 2),
            periodic_gossip: every(self.gossip_interval_ms, self.gossip_fanout),
        }
    }
}

/// A change of the member list or of a member's liveness, in the order
/// they happened; [`apply_change`] applies it.
#[derive(Debug, Clone, PartialEq)]
pub enum MemberChange {
    /// `member` is in the placement set with these addresses and weight:
    /// a new member, one back after leaving, or a new generation (which
    /// may have moved). Applying it changes nothing when the set already
    /// holds it as it is.
    Joined {
        /// The placement entry.
        member: Member,
        /// Its generation.
        generation: u32,
    },
    /// The member left (gracefully, or removed by an operator): out of the
    /// placement set.
    Left {
        /// Which member.
        id: NodeId,
        /// The generation that left.
        generation: u32,
    },
    /// A member's liveness as SWIM sees it.
    Liveness {
        /// Which member.
        id: NodeId,
        /// Up, suspect or down.
        to: Liveness,
        /// Its generation.
        generation: u32,
    },
}

/// Applies `change` to `view`: what the server does with each change, in
/// order. Answers the change to the view, if any; an error when the member
/// list after a join or leave has no slot table (the view is unchanged).
pub fn apply_change(view: &mut Membership, change: &MemberChange) -> Result<Option<Change>, ListError> {
    match change {
        MemberChange::Joined { member, .. } => view.join(member.clone()),
        MemberChange::Left { id, .. } => view.leave(id),
        MemberChange::Liveness { id, to, .. } => Ok(view.set_liveness(id, *to)),
    }
}

/// How a message travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// A datagram (UDP): may be lost; at most `max_packet_bytes` +
    /// [`ENVELOPE_BYTES`].
    Datagram,
    /// A reliable stream (TCP, gRPC): syncs, up to `max_sync_bytes`.
    Stream,
}

/// A message to send.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// The receiver's gossip address.
    pub to: SocketAddr,
    /// The bytes, to hand to the receiver's [`Swim::handle_message`].
    pub bytes: Vec<u8>,
    /// How.
    pub channel: Channel,
}

/// A timer to set; when it fires, hand it back to [`Swim::handle_timer`].
/// Timers need not be cancelled: a stale one does nothing.
#[derive(Debug, Clone)]
pub struct SwimTimer(TimerKind);

#[derive(Debug, Clone)]
enum TimerKind {
    Foca(Timer<Ident>),
    Sync,
    JoinRetry,
}

/// What a call asks the server to do; drain it with [`Swim::take_ready`]
/// after each call.
#[derive(Debug, Default)]
pub struct Ready {
    /// Messages to send, in order.
    pub sends: Vec<Outgoing>,
    /// Timers to set: after how long, which.
    pub timers: Vec<(Duration, SwimTimer)>,
    /// Member changes, in order.
    pub changes: Vec<MemberChange>,
    /// Members this node's own probe found unresponsive (directly and
    /// through the indirect probes): each raised a suspicion.
    pub suspected: Vec<NodeId>,
}

impl Ready {
    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.sends.is_empty() && self.timers.is_empty() && self.changes.is_empty() && self.suspected.is_empty()
    }
}

/// One member as this node sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct MemberState {
    /// Its addresses and placement entry.
    pub peer: Arc<Peer>,
    /// Up, suspect or down.
    pub liveness: Liveness,
    /// Its generation.
    pub generation: u32,
    /// Its incarnation within the generation.
    pub incarnation: u16,
    /// Whether it left (then `liveness` is down).
    pub left: bool,
}

/// Counters of what came in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SwimStats {
    /// Messages handled without error.
    pub messages_in: u64,
    /// Messages refused (malformed, oversized, from this node...).
    pub messages_refused: u64,
    /// Messages dropped unread because their tag was missing or wrong, or
    /// there was one and this node has no key (see [`Envelope`]).
    pub messages_rejected: u64,
    /// Messages refused because their sender places keys in another slot
    /// count, and refusals of this node by such a member.
    pub placement_mismatches: u64,
    /// Sync exchanges that found a difference (entries sent).
    pub syncs_sent: u64,
    /// Messages to a member whose address is unknown (a bug if not 0).
    pub unroutable: u64,
}

type Inner = Foca<Ident, WireCodec, SmallRng, NoCustomBroadcast>;

/// This node's gossip membership.
pub struct Swim {
    foca: Inner,
    me: Arc<Peer>,
    key: u64,
    config: SwimConfig,
    envelope: Envelope,
    dir: Directory,
    seen: Seen,
    /// What the codec saw, swapped out of `seen` (its capacity reused).
    seen_buf: Vec<(u64, State)>,
    rng: SmallRng,
    /// Members held suspect, by key: a suspicion or its refutation is
    /// reported once.
    suspects: KeyMap<Ident>,
    /// foca's current (transmissions, suspicion timeout), tuned to the
    /// number of live members, and that number.
    tuned: (u8, Duration),
    tuned_for: usize,
    seeds: Vec<SocketAddr>,
    join_attempt: u32,
    synced: bool,
    left: bool,
    ready: Ready,
    stats: SwimStats,
}

impl std::fmt::Debug for Swim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Swim")
            .field("me", &self.me.member.id)
            .field("identity", self.foca.identity())
            .field("live_members", &self.foca.num_members())
            .field("left", &self.left)
            .finish()
    }
}

/// foca's runtime: collects what foca asks for into a [`Ready`].
struct Collect<'a> {
    ready: &'a mut Ready,
    dir: &'a Directory,
    /// The slot count the header states.
    slots: u32,
    /// Where a message to the wildcard goes (an announce to a seed).
    seed: Option<SocketAddr>,
    notes: Vec<OwnedNotification<Ident>>,
    /// Keys this node's probes suspected.
    suspected: Vec<u64>,
    unroutable: u64,
    /// Drop what is sent (a leave's identity change gossips the old
    /// identity as down, which others would read as a crash).
    mute: bool,
}

impl<'a> Collect<'a> {
    fn new(ready: &'a mut Ready, dir: &'a Directory, slots: u32) -> Self {
        Self {
            ready,
            dir,
            slots,
            seed: None,
            notes: Vec::new(),
            suspected: Vec::new(),
            unroutable: 0,
            mute: false,
        }
    }
}

impl Runtime<Ident> for Collect<'_> {
    fn notify(&mut self, n: foca::Notification<'_, Ident>) {
        self.notes.push(n.to_owned());
    }

    fn send_to(&mut self, to: Ident, data: &[u8]) {
        if self.mute {
            return;
        }
        let addr = if to == Ident::WILDCARD {
            self.seed
        } else {
            self.dir.gossip(to.key())
        };
        let Some(addr) = addr else {
            self.unroutable += 1;
            return;
        };
        // Sealed, when the cluster has a key, in `take_ready`.
        let mut bytes = Envelope::new(self.slots).start(Kind::Swim, data.len());
        bytes.extend_from_slice(data);
        self.ready.sends.push(Outgoing {
            to: addr,
            bytes,
            channel: Channel::Datagram,
        });
    }

    fn submit_after(&mut self, event: Timer<Ident>, after: Duration) {
        if let Timer::ChangeSuspectToDown { member_id, .. } = &event {
            self.suspected.push(member_id.key());
        }
        self.ready.timers.push((after, SwimTimer(TimerKind::Foca(event))));
    }
}

/// What a collected call left to process.
struct Collected {
    notes: Vec<OwnedNotification<Ident>>,
    suspected: Vec<u64>,
    unroutable: u64,
}

impl Collect<'_> {
    fn done(self) -> Collected {
        Collected {
            notes: self.notes,
            suspected: self.suspected,
            unroutable: self.unroutable,
        }
    }
}

fn bad(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidArgument, msg)
}

fn internal(context: &str, e: foca::Error) -> Error {
    Error::new(ErrorKind::Internal, format!("{context}: {e}"))
}

impl Swim {
    /// This node, `me`, at `generation` (see "Identities"), alone until it
    /// joins; its messages framed by `envelope` (its slot count, and the
    /// key of their tags). `seed` seeds its random choices (whom to probe,
    /// to gossip to): the server passes a random one, the simulation a
    /// fixed one. `dir` is a fresh [`Directory`] except in the simulation.
    /// The first change is `me` joining.
    pub fn new(
        me: Peer,
        generation: u32,
        config: SwimConfig,
        envelope: Envelope,
        seed: u64,
        dir: Directory,
    ) -> Result<Self> {
        me.validate().map_err(|e| Error::new(ErrorKind::Config, e))?;
        config
            .validate()
            .map_err(|e| Error::new(ErrorKind::Config, format!("swim: {e}")))?;
        if generation > MAX_GENERATION {
            return Err(Error::new(
                ErrorKind::Config,
                format!("generation {generation} is above {MAX_GENERATION}"),
            ));
        }
        let key = key_of(&me.member.id.0);
        dir.learn(generation, &me);
        let seen = Seen::default();
        let codec = WireCodec {
            dir: dir.clone(),
            seen: seen.clone(),
        };
        let ident = Ident::new(key, generation, false);
        let foca_config = config.foca(1);
        let tuned = (foca_config.max_transmissions.get(), foca_config.suspect_to_down_after);
        let foca = Foca::new(ident, foca_config, SmallRng::seed_from_u64(seed), codec);
        let mut s = Self {
            foca,
            me: Arc::new(me),
            key,
            rng: SmallRng::seed_from_u64(seed ^ 0x5157_494d_5f72_6e67),
            config,
            envelope,
            dir,
            seen,
            seen_buf: Vec::new(),
            suspects: KeyMap::default(),
            tuned,
            tuned_for: 1,
            seeds: Vec::new(),
            join_attempt: 0,
            synced: false,
            left: false,
            ready: Ready::default(),
            stats: SwimStats::default(),
        };
        s.ready.changes.push(MemberChange::Joined {
            member: s.me.member.clone(),
            generation,
        });
        s.schedule_sync();
        Ok(s)
    }

    /// This node's entry.
    pub fn me(&self) -> &Peer {
        &self.me
    }

    /// This node's current generation (one more after each false "down"
    /// it came back from): the server saves it so that the next start
    /// uses a larger one.
    pub fn generation(&self) -> u32 {
        self.foca.identity().generation()
    }

    /// The settings.
    pub fn config(&self) -> &SwimConfig {
        &self.config
    }

    /// Counters.
    pub fn stats(&self) -> SwimStats {
        self.stats
    }

    /// Members this node holds live (up or suspect), itself excluded.
    pub fn live_members(&self) -> usize {
        self.foca.num_members()
    }

    /// Whether a join's sync has been answered (or no seed was given).
    pub fn joined(&self) -> bool {
        self.synced || self.seeds.is_empty()
    }

    /// Takes what the calls since the last take asked for; the messages
    /// sealed when the envelope has a key.
    pub fn take_ready(&mut self) -> Ready {
        let mut ready = std::mem::take(&mut self.ready);
        if let Some(key) = &self.envelope.key {
            for out in &mut ready.sends {
                wire::seal(key, &mut out.bytes);
            }
        }
        ready
    }

    /// Every member this node knows, itself included, with liveness; left
    /// members too. One pass over the table.
    pub fn members(&self) -> Vec<MemberState> {
        let mut out = vec![MemberState {
            peer: self.me.clone(),
            liveness: Liveness::Up,
            generation: self.generation(),
            incarnation: 0,
            left: self.left,
        }];
        for m in self.foca.iter_membership_state() {
            let id = *m.id();
            if id.key() == self.key {
                continue;
            }
            let Some(peer) = self.dir.peer(id.key()) else { continue };
            out.push(MemberState {
                peer,
                liveness: liveness_of(m.state()),
                generation: id.generation(),
                incarnation: m.incarnation(),
                left: id.left(),
            });
        }
        out
    }

    /// Takes `peers` (each at its generation) as live members without
    /// gossiping them and without reporting changes: for a node whose
    /// [`Membership`] already holds them (the simulation's formed
    /// cluster; a server restoring the list it saved, which probes then
    /// correct).
    pub fn restore(&mut self, peers: impl IntoIterator<Item = (Peer, u32)>) -> Result<()> {
        let mut members = Vec::new();
        for (p, generation) in peers {
            p.validate().map_err(bad)?;
            let key = key_of(&p.member.id.0);
            if key == self.key {
                continue;
            }
            self.dir.learn(generation, &p);
            members.push(FocaMember::alive(Ident::new(key, generation, false)));
        }
        let mut rt = Collect::new(&mut self.ready, &self.dir, self.envelope.slots);
        let r = self.foca.apply_many(members.into_iter(), false, &mut rt);
        // The caller's view holds these members already.
        self.stats.unroutable += rt.done().unroutable;
        r.map_err(|e| internal("restoring members", e))?;
        self.retune();
        Ok(())
    }

    /// Joins the cluster that the members at `seeds` belong to: announces
    /// to a few and asks one for the member table, trying the others
    /// until one answers. This node's own address is skipped; with no
    /// other seed it stays alone (the first node).
    pub fn join(&mut self, seeds: &[SocketAddr]) {
        let mut seeds: Vec<SocketAddr> = seeds.iter().copied().filter(|a| *a != self.me.gossip).collect();
        seeds.sort_unstable();
        seeds.dedup();
        seeds.shuffle(&mut self.rng);
        self.seeds = seeds;
        self.join_attempt = 0;
        self.synced = false;
        if !self.seeds.is_empty() {
            self.join_round();
        }
    }

    fn join_round(&mut self) {
        let n = self.seeds.len();
        let first = self.join_attempt as usize;
        for j in 0..n.min(3) {
            let to = self.seeds[(first + j) % n];
            let mut rt = Collect::new(&mut self.ready, &self.dir, self.envelope.slots);
            rt.seed = Some(to);
            // Sending never fails but for an encoding bug, counted below.
            let _ = self.foca.announce(Ident::WILDCARD, &mut rt);
            let c = rt.done();
            self.settle(c);
        }
        self.send_sync_request(self.seeds[first % n]);
        self.join_attempt += 1;
        if self.join_attempt < self.config.join_attempts {
            self.ready.timers.push((
                Duration::from_millis(self.config.join_retry_ms),
                SwimTimer(TimerKind::JoinRetry),
            ));
        }
    }

    /// Leaves the cluster gracefully: others see it leave (placement
    /// drops it), not fail. Stop the node once the messages are sent.
    pub fn leave(&mut self) -> Result<()> {
        if self.left {
            return Ok(());
        }
        let cur = *self.foca.identity();
        let gone = Ident::new(cur.key(), cur.generation(), true);
        {
            let mut rt = Collect::new(&mut self.ready, &self.dir, self.envelope.slots);
            rt.mute = true;
            let r = self.foca.change_identity(gone, &mut rt);
            let c = rt.done();
            self.settle(c);
            r.map_err(|e| internal("leaving", e))?;
        }
        let mut rt = Collect::new(&mut self.ready, &self.dir, self.envelope.slots);
        // The "left" record goes to three random members, then twice more:
        // nine first carriers, each spreading it on.
        let r = self
            .foca
            .leave_cluster(&mut rt)
            .and_then(|()| self.foca.gossip(&mut rt))
            .and_then(|()| self.foca.gossip(&mut rt));
        let c = rt.done();
        self.left = true;
        self.ready.changes.push(MemberChange::Left {
            id: self.me.member.id.clone(),
            generation: cur.generation(),
        });
        self.settle(c);
        r.map_err(|e| internal("leaving", e))
    }

    /// Declares member `id` left for good (an operator giving up on a dead
    /// node): every node drops it from placement. A member that is in
    /// fact alive hears it is down and comes back as a new generation.
    /// Answers whether it was a member.
    pub fn remove(&mut self, id: &NodeId) -> Result<bool> {
        let key = key_of(&id.0);
        if key == self.key {
            return Err(bad("a node removes itself by leaving"));
        }
        let Some(cur) = self
            .foca
            .iter_membership_state()
            .map(|m| *m.id())
            .find(|i| i.key() == key)
        else {
            return Ok(false);
        };
        if cur.left() {
            return Ok(false);
        }
        let gone = FocaMember::down(Ident::new(key, cur.generation(), true));
        let mut rt = Collect::new(&mut self.ready, &self.dir, self.envelope.slots);
        let r = self.foca.apply_many(std::iter::once(gone), true, &mut rt);
        let c = rt.done();
        self.settle(c);
        r.map_err(|e| internal("removing a member", e))?;
        Ok(true)
    }

    /// A timer set earlier fired.
    pub fn handle_timer(&mut self, timer: SwimTimer) -> Result<()> {
        match timer.0 {
            TimerKind::Foca(t) => {
                let mut rt = Collect::new(&mut self.ready, &self.dir, self.envelope.slots);
                let r = self.foca.handle_timer(t, &mut rt);
                let c = rt.done();
                self.settle(c);
                r.map_err(|e| internal("gossip timer", e))
            }
            TimerKind::Sync => {
                self.schedule_sync();
                if !self.left {
                    let n = self.foca.num_members();
                    if n > 0 {
                        let pick = self.rng.random_range(0..n);
                        let to = self.foca.iter_members().nth(pick).map(|m| m.id().key());
                        if let Some(addr) = to.and_then(|k| self.dir.gossip(k)) {
                            self.send_sync_request(addr);
                        }
                    }
                }
                Ok(())
            }
            TimerKind::JoinRetry => {
                if !self.synced && !self.left && !self.seeds.is_empty() {
                    self.join_round();
                }
                Ok(())
            }
        }
    }

    fn schedule_sync(&mut self) {
        if self.config.sync_interval_ms == 0 {
            return;
        }
        // Jittered, so that the nodes of a cluster started at once do not
        // all sync in the same instant.
        let ms = self.config.sync_interval_ms as f64 * self.rng.random_range(0.5..1.5);
        self.ready
            .timers
            .push((Duration::from_millis(ms as u64), SwimTimer(TimerKind::Sync)));
    }

    /// A message arrived (from another node's [`Outgoing`]). A malformed,
    /// oversized or unexpected one is refused with a precise error and
    /// changes nothing. So is one that fails the [`Envelope`]'s checks,
    /// each with its own kind of error and counter:
    ///
    /// - [`ErrorKind::Unauthenticated`] (`messages_rejected`): its tag is
    ///   missing or wrong, or it has one and this node has no key. Nothing
    ///   past its header was read.
    /// - [`ErrorKind::Config`] (`placement_mismatches`): its sender places
    ///   keys in another slot count. A sync request from it is answered
    ///   with a refusal, so that a joiner learns why nobody lets it in; a
    ///   refusal of this node arrives as this error too.
    pub fn handle_message(&mut self, bytes: &[u8]) -> Result<()> {
        let m = match wire::open(self.envelope.key.as_ref(), bytes) {
            Ok(m) => m,
            Err(Unopened::Unauthenticated(e)) => {
                self.stats.messages_rejected += 1;
                return Err(Error::new(ErrorKind::Unauthenticated, e));
            }
            Err(Unopened::Malformed(e)) => {
                self.stats.messages_refused += 1;
                return Err(bad(e));
            }
        };
        if self.left {
            self.stats.messages_in += 1;
            return Ok(());
        }
        let mismatch = match m.kind {
            Kind::Refused => self.refused_by(&m),
            _ if m.slots != self.envelope.slots => Err(self.refuse(&m)),
            _ => Ok(()),
        };
        if let Err(e) = mismatch {
            if e.kind() == ErrorKind::Config {
                self.stats.placement_mismatches += 1;
            } else {
                self.stats.messages_refused += 1;
            }
            return Err(e);
        }
        let r = match m.kind {
            Kind::Swim => self.handle_swim(m.body),
            Kind::SyncRequest => self.handle_sync_request(m.body),
            Kind::SyncResponse => self.handle_sync_response(m.body),
            Kind::Refused => unreachable!("answered above"),
        };
        match &r {
            Ok(()) => self.stats.messages_in += 1,
            Err(_) => self.stats.messages_refused += 1,
        }
        r
    }

    /// The error for message `m`, whose sender places keys in another
    /// slot count; a sync request gets a refusal back. Only sync requests:
    /// a joiner sends one per join round and a member one per sync
    /// interval, so refusals stay as rare as those, and a flood of
    /// datagrams (forged, in a cluster without a key) makes no traffic.
    fn refuse(&mut self, m: &Opened<'_>) -> Error {
        let (theirs, mine) = (m.slots, self.envelope.slots);
        let why = format!(
            "it places keys in {theirs} slots, this node in {mine}: members refuse each other until every node has the same cluster.slots"
        );
        let Ok((id, gossip)) = wire::sender(m.kind, m.body) else {
            return Error::new(
                ErrorKind::Config,
                format!("gossip from an unreadable sender refused: {why}"),
            );
        };
        let e = Error::new(
            ErrorKind::Config,
            format!("gossip from node {id} at {gossip} refused: {why}"),
        );
        if m.kind == Kind::SyncRequest {
            let me = &self.me.member.id.0;
            let mut bytes = self.envelope.start(Kind::Refused, 1 + me.len());
            wire::refusal_body(me, &mut bytes);
            self.ready.sends.push(Outgoing {
                to: gossip,
                bytes,
                channel: Channel::Stream,
            });
        }
        e
    }

    /// A refusal of this node by a member that places keys otherwise: a
    /// [`ErrorKind::Config`] error saying so.
    fn refused_by(&self, m: &Opened<'_>) -> Result<()> {
        let id = wire::refuser(m.body).map_err(|e| bad(format!("gossip refusal: {e}")))?;
        let (theirs, mine) = (m.slots, self.envelope.slots);
        if theirs == mine {
            return Err(bad(format!(
                "gossip refusal from node {id}, which places keys in {theirs} slots as this node does"
            )));
        }
        Err(Error::new(
            ErrorKind::Config,
            format!(
                "node {id} refuses this node's gossip: it places keys in {theirs} slots, this node in {mine}; set the same cluster.slots on every node"
            ),
        ))
    }

    fn handle_swim(&mut self, data: &[u8]) -> Result<()> {
        if data.len() > self.config.max_packet_bytes {
            return Err(Error::new(
                ErrorKind::TooLarge,
                format!(
                    "gossip packet of {} bytes (max_packet_bytes is {})",
                    data.len(),
                    self.config.max_packet_bytes
                ),
            ));
        }
        // An announce to a seed address names no destination: it is for
        // whoever listens there, this node.
        let readdressed;
        let data = if data.len() >= 12 && data[..12] == [0u8; 12] {
            let tag = wire::message_tag(data).map_err(|e| bad(format!("gossip packet: {e}")))?;
            if !wire::is_announce(tag) {
                return Err(bad("gossip packet without a destination that is not an announce"));
            }
            let mut v = Vec::with_capacity(data.len());
            wire::put_compact(*self.foca.identity(), &mut v);
            v.extend_from_slice(&data[12..]);
            readdressed = v;
            &readdressed[..]
        } else {
            data
        };
        let mut rt = Collect::new(&mut self.ready, &self.dir, self.envelope.slots);
        let r = self.foca.handle_data(data, &mut rt);
        let c = rt.done();
        self.settle(c);
        r.map_err(|e| bad(format!("gossip packet: {e}")))
    }

    /// Processes what a foca call reported: member changes from its
    /// notifications, suspicions from a pass over the table when
    /// something may have changed one, and foca's tuning.
    fn settle(&mut self, c: Collected) {
        self.stats.unroutable += c.unroutable;
        let mut seen = std::mem::take(&mut self.seen_buf);
        std::mem::swap(&mut *self.seen.lock(), &mut seen);
        let mut rescan = !c.suspected.is_empty();
        for key in c.suspected {
            if let Some(p) = self.dir.peer(key) {
                self.ready.suspected.push(p.member.id.clone());
            }
        }
        let notes = c.notes;
        let mut i = 0;
        while i < notes.len() {
            match &notes[i] {
                OwnedNotification::Rename(_, new) => {
                    // foca reports a change of liveness right after.
                    let active = match notes.get(i + 1) {
                        Some(OwnedNotification::MemberUp(n)) if n == new => Some(true),
                        Some(OwnedNotification::MemberDown(n)) if n == new => Some(false),
                        _ => None,
                    };
                    if active.is_some() {
                        i += 1;
                    }
                    let active = active.unwrap_or_else(|| self.is_active(*new));
                    self.placed(*new, active, true);
                    rescan = true;
                }
                // Down is final for an identity, so up without a rename is
                // a member this node never knew.
                OwnedNotification::MemberUp(new) => self.placed(*new, true, true),
                OwnedNotification::MemberDown(id) => self.placed(*id, false, false),
                _ => {}
            }
            i += 1;
        }
        rescan |= seen
            .iter()
            .any(|(k, s)| *s == State::Suspect || (!self.suspects.is_empty() && self.suspects.contains_key(k)));
        seen.clear();
        self.seen_buf = seen;
        if rescan {
            self.rescan_suspects();
        }
        self.retune();
    }

    /// Reports member `id` as now active (or down), and in (or out of)
    /// the placement set; `upsert` also reports its entry.
    fn placed(&mut self, id: Ident, active: bool, upsert: bool) {
        if id.key() == self.key {
            return;
        }
        let Some(peer) = self.dir.peer(id.key()) else {
            self.stats.unroutable += 1;
            return;
        };
        self.suspects.remove(&id.key());
        let generation = id.generation();
        if id.left() {
            self.ready.changes.push(MemberChange::Left {
                id: peer.member.id.clone(),
                generation,
            });
            return;
        }
        if upsert {
            self.ready.changes.push(MemberChange::Joined {
                member: peer.member.clone(),
                generation,
            });
        }
        self.ready.changes.push(MemberChange::Liveness {
            id: peer.member.id.clone(),
            to: if active { Liveness::Up } else { Liveness::Down },
            generation,
        });
    }

    fn is_active(&self, id: Ident) -> bool {
        self.foca
            .iter_membership_state()
            .find(|m| *m.id() == id)
            .is_some_and(|m| m.state() != State::Down)
    }

    /// One pass over the table: reports new suspects and refuted ones
    /// (down ones were reported by foca's notifications).
    fn rescan_suspects(&mut self) {
        let mut now = KeyMap::default();
        let mut refuted = Vec::new();
        for m in self.foca.iter_membership_state() {
            let id = *m.id();
            if id.key() == self.key {
                continue;
            }
            match m.state() {
                State::Suspect => {
                    now.insert(id.key(), id);
                }
                State::Alive if self.suspects.contains_key(&id.key()) => refuted.push(id),
                _ => {}
            }
        }
        let mut fresh: Vec<Ident> = now
            .iter()
            .filter(|(k, _)| !self.suspects.contains_key(*k))
            .map(|(_, id)| *id)
            .collect();
        fresh.sort_by_key(|id| id.key());
        refuted.sort_by_key(|id| id.key());
        for (id, to) in fresh
            .into_iter()
            .map(|id| (id, Liveness::Suspect))
            .chain(refuted.into_iter().map(|id| (id, Liveness::Up)))
        {
            if let Some(peer) = self.dir.peer(id.key()) {
                self.ready.changes.push(MemberChange::Liveness {
                    id: peer.member.id.clone(),
                    to,
                    generation: id.generation(),
                });
            }
        }
        self.suspects = now;
    }

    /// Tunes transmissions and the suspicion timeout to the live members.
    fn retune(&mut self) {
        let n = self.foca.num_members() + 1;
        if n == self.tuned_for {
            return;
        }
        self.tuned_for = n;
        let want = (self.config.transmissions(n), self.config.suspect_timeout(n));
        if want != self.tuned {
            // Only these two change, which foca allows at any time.
            if self.foca.set_config(self.config.foca(n)).is_ok() {
                self.tuned = want;
            }
        }
    }
}

fn liveness_of(s: State) -> Liveness {
    match s {
        State::Alive => Liveness::Up,
        State::Suspect => Liveness::Suspect,
        State::Down => Liveness::Down,
    }
}

/// Keys of `entries` that `foca` does not know, among the down ones: foca
/// takes a member it never knew as down without a notification, so the
/// wrapper reports those itself.
fn unknown_down(foca: &Inner, entries: &[FocaMember<Ident>]) -> HashSet<u64> {
    let mut down: HashSet<u64> = entries
        .iter()
        .filter(|m| m.state() == State::Down)
        .map(|m| m.id().key())
        .collect();
    if !down.is_empty() {
        for m in foca.iter_membership_state() {
            down.remove(&m.id().key());
        }
    }
    down
}

#[cfg(test)]
mod tests;
