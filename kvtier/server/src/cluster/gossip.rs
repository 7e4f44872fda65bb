//! Gossip membership: the core's SWIM state machine
//! ([`kvtier::replication::swim`]) over real sockets ([`Gossip`]), and
//! kvtierd's cluster fed by it when `cluster.membership = "gossip"`.
//!
//! # The driver
//!
//! One port serves both transports: UDP for SWIM's datagrams (probes,
//! acks, gossip; lost ones are SWIM's business) and TCP for syncs (a
//! joiner's whole member table, anti-entropy), each a frame of a u32
//! length and the message. One task owns the state machine: it reads the
//! socket, fires timers, and carries out what the machine asks
//! ([`kvtier::replication::swim::Ready`]). Seeds are names or addresses;
//! a name (a Kubernetes headless service) is resolved to all its
//! addresses at each join attempt, here, since resolving is I/O.
//!
//! # In kvtierd
//!
//! [`Cluster::start_gossip`] binds `cluster.gossip_port` (default: the
//! port after this node's gRPC `addr`) before the daemon announces its
//! address, so a port that cannot be bound fails the start. It takes this
//! start's generation from `data_dir/gossip.json` (one more than the last,
//! at least the seconds since 2024; saved durably before use, and saved
//! again when a refuted "down" raises it), so a restarted node is a newer
//! identity that wins over its old "down" everywhere. The members the view
//! already lists (the saved list, or the config's) are handed to the state
//! machine as known at generation 0, so probes find one that never comes
//! back down, as missed heartbeats would. Then it joins through
//! `cluster.seeds` (default: the other members' gossip addresses).
//!
//! The [`MemberChange`]s go through the paths the heartbeats used, in
//! batches of what has arrived: the joins and leaves of a batch as one
//! member-list change (clients first, then the view with its slot table
//! computed off the runtime, then a rebalancing pass; `members.json`
//! saved), so a node joining 10,000 members computes one table, not
//! 10,000; then each liveness change, in order, to the view's
//! [`Membership::set_liveness`] (and so the same logging, resync of a
//! member back from down, upload takeover). A join of a member already
//! listed as it is (a restart, a refutation) changes nothing. The heartbeat loop keeps running without
//! pings and without the list catch-up: it only starts hint deliveries,
//! resyncs, rebalancing and namespace registrations to members up again.
//!
//! A leave (`kvtier cluster leave`) of this node tells gossip (the others
//! see "left", not a failure), stops gossiping, and hands the keys over by
//! a non-member's rebalancing pass; a leave of another live member is sent
//! to it; a leave of a member that is down declares it left for good
//! ([`Swim::remove`]). `kvtier cluster join` is refused: a node joins by
//! starting with seeds. A stop (SIGTERM) is not a leave: the node is down
//! until it restarts.
//!
//! # What gossip lets in
//!
//! With a bearer token (`auth_token`, `auth_token_file`), every datagram
//! and sync frame carries an HMAC-SHA256 tag under a key derived from it
//! (see [`kvtier::replication::swim::Envelope`]); one whose tag is missing
//! or wrong is dropped before the state machine reads it, counted
//! (`gossip_messages_rejected`) and logged at warn, at most once per
//! [`LOG_EVERY`]. Without a token gossip is unauthenticated: whoever
//! reaches the port can join or declare members down. The tag is not
//! encryption (the member list travels in clear), and a recorded message
//! of the members' current versions can be replayed (see the wire
//! format's "Tags").
//!
//! Every message also states the slot count its sender places keys in
//! (`cluster.slots`); one from a node that places keys otherwise is
//! refused, as the heartbeats' pings refuse it, so that node never
//! enters the member list. The refusal is counted (`placement_mismatches`)
//! and logged as an error at most once per [`LOG_EVERY`]; a sync request
//! from it, which a joiner sends each join round, is answered with a
//! refusal, which the joiner counts and logs the same way: its join keeps
//! failing, saying why.

use super::Cluster;
use crate::config::{ClusterConfig, MembershipMode};
use crate::{proto, status_of};
use kvtier::replication::membership::{Liveness, Membership};
use kvtier::replication::placement::{Member, NodeId};
use kvtier::replication::swim::{
    Channel, Directory, Envelope, GossipKey, MemberChange, Peer, Ready, Swim, SwimConfig, SwimStats, SwimTimer,
};
use kvtier::replication::swim::{ENVELOPE_BYTES, MAX_GENERATION};
use kvtier::{Error, ErrorKind, Result};
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::Status;

/// How long a sync stream may take to connect, or to send or receive a
/// frame.
const STREAM_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a node that has not joined, or holds no other member live,
/// resolves its seeds and tries again (once a join's attempts are spent).
const REJOIN_EVERY: Duration = Duration::from_secs(30);
/// Gossip refused for a wrong tag or another slot count is logged at
/// most this often (per cause): such a peer sends several messages a
/// second.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// A running gossip member.
#[derive(Debug)]
pub struct Gossip {
    local: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<()>>,
    commands: mpsc::UnboundedSender<Command>,
    /// The state machine's generation, as of its last event.
    generation: Arc<AtomicU32>,
    stats: Arc<Mutex<SwimStats>>,
}

/// What the owner asks of the running member.
#[derive(Debug)]
enum Command {
    /// Declare a member left for good ([`Swim::remove`]).
    Remove(NodeId, oneshot::Sender<Result<bool>>),
}

fn io(context: &str, e: std::io::Error) -> Error {
    Error::io(context.to_string(), e)
}

impl Gossip {
    /// Binds UDP and TCP on `listen` (a concrete address: it is what the
    /// others are told; port 0 picks a free one for both), then joins
    /// through `seeds` (`host:port`, names resolved to every address).
    /// Messages are framed by `envelope` (this node's slot count, and the
    /// key of their tags). Member changes, this node's joining first, go
    /// to the receiver.
    pub async fn start(
        member: kvtier::replication::placement::Member,
        listen: SocketAddr,
        generation: u32,
        config: SwimConfig,
        envelope: Envelope,
        seeds: Vec<String>,
    ) -> Result<(Self, mpsc::UnboundedReceiver<MemberChange>)> {
        Self::start_knowing(member, listen, generation, config, envelope, seeds, Vec::new()).await
    }

    /// As [`Gossip::start`], also taking `known` members as live without
    /// reporting them (a restart's saved member list, see
    /// [`Swim::restore`]): probes then find which of them are down.
    pub async fn start_knowing(
        member: kvtier::replication::placement::Member,
        listen: SocketAddr,
        generation: u32,
        config: SwimConfig,
        envelope: Envelope,
        seeds: Vec<String>,
        known: Vec<(Peer, u32)>,
    ) -> Result<(Self, mpsc::UnboundedReceiver<MemberChange>)> {
        let (udp, tcp) = bind_both(listen).await?;
        let local = udp.local_addr().map_err(|e| io("gossip socket", e))?;
        let seed: u64 = {
            let mut b = [0u8; 8];
            getrandom::fill(&mut b).map_err(|e| Error::new(ErrorKind::Internal, format!("random seed: {e}")))?;
            u64::from_le_bytes(b)
        };
        let mut swim = Swim::new(
            Peer::new(member, local),
            generation,
            config,
            envelope,
            seed,
            Directory::new(),
        )?;
        swim.restore(known)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let (stop, stopped) = oneshot::channel();
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let gen_now = Arc::new(AtomicU32::new(generation));
        let stats = Arc::new(Mutex::new(SwimStats::default()));
        let shared = Shared {
            generation: gen_now.clone(),
            stats: stats.clone(),
        };
        let task = tokio::spawn(run(swim, Arc::new(udp), tcp, seeds, tx, stopped, commands_rx, shared));
        Ok((
            Self {
                local,
                stop: Some(stop),
                task,
                commands,
                generation: gen_now,
                stats,
            },
            rx,
        ))
    }

    /// The gossip address (UDP and TCP).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// This node's generation now: the one it started with, or larger
    /// after it refuted a false "down" (to be saved, so that the next
    /// start uses a larger one still).
    pub fn generation(&self) -> u32 {
        self.generation.load(Relaxed)
    }

    /// The state machine's counters.
    pub fn stats(&self) -> SwimStats {
        *self.stats.lock()
    }

    /// Declares member `id` left for good (an operator giving up on a
    /// dead node): every member drops it from placement. Answers whether
    /// it was a member.
    /// The answer does not borrow this handle.
    pub fn remove(&self, id: NodeId) -> impl Future<Output = Result<bool>> + Send + 'static {
        let (tx, rx) = oneshot::channel();
        let sent = self.commands.send(Command::Remove(id, tx)).is_ok();
        async move {
            let gone = || Error::new(ErrorKind::Closed, "gossip stopped");
            if !sent {
                return Err(gone());
            }
            rx.await.map_err(|_| gone())?
        }
    }

    /// Leaves the cluster gracefully and stops.
    pub async fn leave(mut self) -> Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        match (&mut self.task).await {
            Ok(r) => r,
            Err(e) => Err(Error::new(ErrorKind::Internal, format!("gossip task: {e}"))),
        }
    }
}

impl Drop for Gossip {
    fn drop(&mut self) {
        if self.stop.is_some() {
            self.task.abort();
        }
    }
}

/// A sync connection to `to`, leaving from `from` (the gossip listener's
/// address) when that is a specific one: a node's gossip, datagrams and
/// syncs alike, comes from the one address the others know it by.
async fn connect_from(from: Option<std::net::IpAddr>, to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = if to.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    if let Some(ip) = from.filter(|ip| !ip.is_unspecified() && ip.is_ipv4() == to.is_ipv4()) {
        s.bind(SocketAddr::new(ip, 0))?;
    }
    s.connect(to).await
}

/// UDP and TCP on the same port (the UDP one picked first when 0).
async fn bind_both(listen: SocketAddr) -> Result<(UdpSocket, TcpListener)> {
    for _ in 0..16 {
        let udp = UdpSocket::bind(listen).await.map_err(|e| io("gossip UDP socket", e))?;
        let at = udp.local_addr().map_err(|e| io("gossip UDP socket", e))?;
        match TcpListener::bind(at).await {
            Ok(tcp) => return Ok((udp, tcp)),
            // The port UDP got may be taken for TCP: try another.
            Err(_) if listen.port() == 0 => continue,
            Err(e) => return Err(io("gossip TCP listener", e)),
        }
    }
    Err(Error::new(
        ErrorKind::Unavailable,
        format!("no free port on {} for both UDP and TCP", listen.ip()),
    ))
}

/// Every address the seeds name; a seed that does not resolve is skipped.
async fn resolve(seeds: &[String]) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for s in seeds {
        match tokio::net::lookup_host(s.as_str()).await {
            Ok(addrs) => out.extend(addrs),
            Err(e) => tracing::warn!(seed = %s, "gossip seed does not resolve: {e}"),
        }
    }
    out
}

/// Timers by deadline (a sequence number breaks ties).
#[derive(Default)]
struct Timers {
    at: BTreeMap<(Instant, u64), SwimTimer>,
    seq: u64,
}

impl Timers {
    fn set(&mut self, after: Duration, t: SwimTimer) {
        self.seq += 1;
        self.at.insert((Instant::now() + after, self.seq), t);
    }

    fn next(&self) -> Instant {
        self.at
            .first_key_value()
            .map(|(k, _)| k.0)
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600))
    }

    fn due(&mut self) -> Vec<SwimTimer> {
        let now = Instant::now();
        let mut out = Vec::new();
        while let Some(e) = self.at.first_entry() {
            if e.key().0 > now {
                break;
            }
            out.push(e.remove());
        }
        out
    }
}

/// What the task publishes for the [`Gossip`] handle.
struct Shared {
    generation: Arc<AtomicU32>,
    stats: Arc<Mutex<SwimStats>>,
}

#[allow(clippy::too_many_arguments)]
async fn run(
    mut swim: Swim,
    udp: Arc<UdpSocket>,
    tcp: TcpListener,
    seeds: Vec<String>,
    changes: mpsc::UnboundedSender<MemberChange>,
    mut stop: oneshot::Receiver<()>,
    mut commands: mpsc::UnboundedReceiver<Command>,
    shared: Shared,
) -> Result<()> {
    let max_frame = swim.config().max_sync_bytes;
    let (frames_tx, mut frames) = mpsc::channel::<(SocketAddr, Vec<u8>)>(64);
    let mut timers = Timers::default();
    // One byte more than the largest datagram: a longer one is cut short
    // by the socket, and then refused.
    let mut buf = vec![0u8; swim.config().max_packet_bytes + ENVELOPE_BYTES + 1];
    let mut refusals = Refusals::default();
    swim.join(&resolve(&seeds).await);
    let mut rejoin = tokio::time::interval(REJOIN_EVERY);
    rejoin.tick().await;
    loop {
        carry_out(swim.take_ready(), &udp, &mut timers, &changes, max_frame);
        shared.generation.store(swim.generation(), Relaxed);
        *shared.stats.lock() = swim.stats();
        tokio::select! {
            Some(c) = commands.recv() => match c {
                Command::Remove(id, answer) => {
                    let _ = answer.send(swim.remove(&id));
                }
            },
            _ = &mut stop => {
                let r = swim.leave();
                carry_out(swim.take_ready(), &udp, &mut timers, &changes, max_frame);
                // The datagrams above are on their way; give them a moment.
                tokio::time::sleep(Duration::from_millis(50)).await;
                return r;
            }
            r = udp.recv_from(&mut buf) => match r {
                Ok((n, from)) => {
                    if let Err(e) = swim.handle_message(&buf[..n]) {
                        refusals.log(from, "datagram", &e);
                    }
                }
                Err(e) => tracing::debug!("gossip receive: {e}"),
            },
            r = tcp.accept() => {
                if let Ok((s, from)) = r {
                    tokio::spawn(read_frames(s, from, max_frame, frames_tx.clone()));
                }
            }
            Some((from, frame)) = frames.recv() => {
                if let Err(e) = swim.handle_message(&frame) {
                    refusals.log(from, "sync", &e);
                }
            }
            _ = tokio::time::sleep_until(timers.next()) => {
                for t in timers.due() {
                    if let Err(e) = swim.handle_timer(t) {
                        tracing::warn!("gossip timer: {e}");
                    }
                }
            }
            _ = rejoin.tick() => {
                // Alone too: two nodes that started together may each have
                // found no seed but itself (a headless service lists a pod
                // once it has an address), and would stay two clusters.
                if !swim.joined() || swim.live_members() == 0 {
                    swim.join(&resolve(&seeds).await);
                }
            }
        }
    }
}

/// The logging of refused gossip: a message with a wrong tag (warn) or
/// from a node that places keys otherwise (error), each at most once per
/// [`LOG_EVERY`] with how many went unlogged since; anything else refused
/// (malformed, from an old member) at debug.
#[derive(Default)]
struct Refusals {
    unauthenticated: Quiet,
    placement: Quiet,
}

/// When a cause was last logged, and how many went unlogged since.
#[derive(Default)]
struct Quiet {
    last: Option<Instant>,
    unlogged: u64,
}

impl Quiet {
    /// Whether to log now; if so, how many went unlogged before.
    fn due(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self.last.is_some_and(|t| now.duration_since(t) < LOG_EVERY) {
            self.unlogged += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.unlogged))
    }
}

impl Refusals {
    fn log(&mut self, from: SocketAddr, what: &str, e: &Error) {
        match e.kind() {
            ErrorKind::Unauthenticated => {
                if let Some(unlogged) = self.unauthenticated.due() {
                    tracing::warn!(%from, via = what, unlogged, "{}", e.message());
                }
            }
            ErrorKind::Config => {
                if let Some(unlogged) = self.placement.due() {
                    tracing::error!(%from, via = what, unlogged, "{}", e.message());
                }
            }
            _ => tracing::debug!(%from, "gossip {what} refused: {e}"),
        }
    }
}

/// Sends, sets timers, and reports changes, as `ready` asks.
fn carry_out(
    ready: Ready,
    udp: &Arc<UdpSocket>,
    timers: &mut Timers,
    changes: &mpsc::UnboundedSender<MemberChange>,
    max_frame: usize,
) {
    for c in ready.changes {
        let _ = changes.send(c);
    }
    for id in &ready.suspected {
        tracing::debug!(member = %id, "probe failed: suspected");
    }
    for (after, t) in ready.timers {
        timers.set(after, t);
    }
    for out in ready.sends {
        match out.channel {
            Channel::Datagram => {
                // A full socket buffer loses the datagram, as the network
                // may: SWIM does not count on any single one.
                if let Err(e) = udp.try_send_to(&out.bytes, out.to) {
                    tracing::debug!(to = %out.to, "gossip datagram not sent: {e}");
                }
            }
            Channel::Stream => {
                if out.bytes.len() > max_frame {
                    continue;
                }
                let from = udp.local_addr().ok().map(|a| a.ip());
                tokio::spawn(async move {
                    let r = tokio::time::timeout(STREAM_TIMEOUT, async {
                        let mut s = connect_from(from, out.to).await?;
                        s.write_all(&(out.bytes.len() as u32).to_be_bytes()).await?;
                        s.write_all(&out.bytes).await?;
                        s.shutdown().await
                    })
                    .await;
                    if !matches!(r, Ok(Ok(()))) {
                        tracing::debug!(to = %out.to, ?r, "gossip sync not sent");
                    }
                });
            }
        }
    }
}

/// Reads length-prefixed frames from a sync stream until it ends; a frame
/// over `max` bytes ends it.
async fn read_frames(mut s: TcpStream, from: SocketAddr, max: usize, to: mpsc::Sender<(SocketAddr, Vec<u8>)>) {
    loop {
        let frame = tokio::time::timeout(STREAM_TIMEOUT, async {
            let n = s.read_u32().await? as usize;
            if n > max {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("frame of {n} bytes (max_sync_bytes is {max})"),
                ));
            }
            let mut b = vec![0u8; n];
            s.read_exact(&mut b).await?;
            Ok(b)
        })
        .await;
        match frame {
            Ok(Ok(b)) => {
                if to.send((from, b)).await.is_err() {
                    return;
                }
            }
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return,
            r => {
                tracing::debug!(%from, ?r, "gossip stream ended");
                return;
            }
        }
    }
}

/// A cluster's gossip: its settings, the running member, and the
/// generation saved in the data dir.
#[derive(Debug)]
pub(super) struct GossipState {
    /// The `[cluster]` table, in gossip mode.
    cfg: Option<ClusterConfig>,
    file: PathBuf,
    running: Mutex<Option<Gossip>>,
    saved: AtomicU32,
    /// Each member's generation as gossip last reported it (this node's
    /// own included), for Stats.
    generations: Mutex<BTreeMap<NodeId, u32>>,
    /// The key of the tags, from the daemon's bearer token.
    key: Option<GossipKey>,
}

/// `gossip.json` in the data dir: the last generation this node used.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SavedGeneration {
    generation: u32,
}

/// Member changes applied together at most.
const BATCH_CHANGES: usize = 100_000;

/// Seconds from 1970 to 2024-01-01: generations count seconds from there,
/// so one taken from the clock stays below [`MAX_GENERATION`] until 2092.
const GENERATION_EPOCH_S: u64 = 1_704_067_200;

impl GossipState {
    /// Gossip as `cfg` says, its messages sealed with a key derived from
    /// `token` when there is one.
    pub(super) fn new(cfg: &ClusterConfig, data_dir: &Path, token: Option<&str>) -> Self {
        Self {
            key: token.map(GossipKey::from_token),
            cfg: (cfg.membership == MembershipMode::Gossip).then(|| cfg.clone()),
            file: data_dir.join("gossip.json"),
            running: Mutex::new(None),
            saved: AtomicU32::new(0),
            generations: Mutex::new(BTreeMap::new()),
        }
    }

    /// Member `id`'s generation as gossip last reported it; 0 if never.
    pub(super) fn generation_of(&self, id: &NodeId) -> u32 {
        self.generations.lock().get(id).copied().unwrap_or(0)
    }

    /// The generation for this start: above the one saved, and at least
    /// the seconds since [`GENERATION_EPOCH_S`] (a node whose data dir was
    /// wiped still comes back newer than its old self); saved durably
    /// before it is used.
    fn next_generation(&self) -> Result<u32> {
        let saved = match std::fs::read(&self.file) {
            Ok(b) => {
                serde_json::from_slice::<SavedGeneration>(&b)
                    .map_err(|e| Error::new(ErrorKind::Config, format!("{}: {e}", self.file.display())))?
                    .generation
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(io(&format!("read {}", self.file.display()), e)),
        };
        let clock = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs().saturating_sub(GENERATION_EPOCH_S));
        let next = u64::from(saved)
            .saturating_add(1)
            .max(clock)
            .min(u64::from(MAX_GENERATION)) as u32;
        if next <= saved {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "{}: generation {saved} is the last one: remove the file and start with a new node id",
                    self.file.display()
                ),
            ));
        }
        self.save(next)?;
        Ok(next)
    }

    /// Takes the running member out (dropping it stops it without a
    /// leave).
    pub(super) fn stop(&self) -> Option<Gossip> {
        self.running.lock().take()
    }

    fn save(&self, generation: u32) -> Result<()> {
        let text = serde_json::to_vec_pretty(&SavedGeneration { generation })
            .map_err(|e| Error::new(ErrorKind::Internal, e.to_string()))?;
        kvtier::fsio::replace_durably(&self.file, &text)?;
        self.saved.store(generation, Relaxed);
        Ok(())
    }
}

/// The first address `addr` (`host:port`) resolves to.
async fn resolve_one(addr: &str) -> Result<SocketAddr> {
    tokio::net::lookup_host(addr)
        .await
        .map_err(|e| {
            Error::new(
                ErrorKind::Config,
                format!("gossip address {addr} does not resolve: {e}"),
            )
        })?
        .next()
        .ok_or_else(|| Error::new(ErrorKind::Config, format!("gossip address {addr} resolves to nothing")))
}

impl Cluster {
    /// Gossip mode: binds the gossip port, takes this start's generation,
    /// and joins through the seeds; the member changes gossip reports go
    /// to the view from then on (see the module doc). Nothing in
    /// heartbeat mode.
    pub async fn start_gossip(self: &Arc<Self>) -> Result<()> {
        let Some(cfg) = &self.gossip.cfg else { return Ok(()) };
        let at = cfg
            .gossip_addr()
            .ok_or_else(|| Error::new(ErrorKind::Config, "cluster: this node has no gossip address"))?;
        let listen = resolve_one(&at).await?;
        let (me, others) = {
            let v = self.view.read();
            let me = v.member(&self.me).cloned();
            (
                me,
                v.members().into_iter().filter(|m| m.id != self.me).collect::<Vec<_>>(),
            )
        };
        let me = match me {
            Some(m) => m,
            // A node that left and restarts rejoins with its configured entry.
            None => cfg
                .members
                .iter()
                .find(|m| m.id == self.me)
                .cloned()
                .ok_or_else(|| Error::new(ErrorKind::Config, "cluster: this node is not among the members"))?,
        };
        // The members this node already lists (the saved list, or the
        // config's): gossip probes them from the start, so one that never
        // comes back is found down, as a missed heartbeat would. Their
        // generation is unknown: 0, older than any real one.
        let mut known = Vec::new();
        for m in others {
            let Some(addr) = cfg.gossip_addr_of(&m) else { continue };
            match resolve_one(&addr).await {
                Ok(a) => known.push((Peer::new(m, a), 0)),
                Err(e) => tracing::warn!(member = %m.id, "not probed until it gossips: {e}"),
            }
        }
        let generation = self.gossip.next_generation()?;
        let seeds = cfg.seed_list();
        let mut envelope = Envelope::new(self.slots());
        if let Some(k) = &self.gossip.key {
            envelope = envelope.with_key(k.clone());
        }
        let authenticated = envelope.key.is_some();
        let (g, rx) =
            Gossip::start_knowing(me, listen, generation, cfg.swim.clone(), envelope, seeds.clone(), known).await?;
        tracing::info!(gossip = %g.local_addr(), generation, ?seeds, authenticated, "gossip membership started");
        *self.gossip.running.lock() = Some(g);
        self.spawn(self.clone().follow_gossip(rx));
        Ok(())
    }

    /// Applies what gossip reports, in batches of what has arrived, until
    /// it stops.
    async fn follow_gossip(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<MemberChange>) {
        while let Some(c) = rx.recv().await {
            let mut batch = vec![c];
            while batch.len() < BATCH_CHANGES
                && let Ok(c) = rx.try_recv()
            {
                batch.push(c);
            }
            self.gossip_changes(batch).await;
        }
    }

    /// Member changes from gossip, through the same paths as the
    /// heartbeats' (liveness) and the member-list changes' (clients
    /// first, then the view, then a rebalancing pass, the list saved).
    /// The joins and leaves of a batch make one list change, so a node
    /// joining a large cluster computes one slot table, not one per
    /// member; the liveness changes follow, in order (a member's joining
    /// comes before its liveness, which needs it in the list).
    async fn gossip_changes(self: &Arc<Self>, batch: Vec<MemberChange>) {
        {
            let mut g = self.gossip.generations.lock();
            for c in &batch {
                let (id, generation) = match c {
                    MemberChange::Joined { member, generation } => (&member.id, *generation),
                    MemberChange::Left { id, generation } | MemberChange::Liveness { id, generation, .. } => {
                        (id, *generation)
                    }
                };
                g.insert(id.clone(), generation);
            }
        }
        let list: Vec<&MemberChange> = batch
            .iter()
            .filter(|c| !matches!(c, MemberChange::Liveness { .. }))
            .collect();
        if !list.is_empty() {
            let r = self
                .change_members(|v| {
                    let mut members: BTreeMap<NodeId, Member> =
                        v.members().into_iter().map(|m| (m.id.clone(), m)).collect();
                    for c in &list {
                        match c {
                            MemberChange::Joined { member, .. } => {
                                members.insert(member.id.clone(), member.clone());
                            }
                            MemberChange::Left { id, .. } => {
                                members.remove(id);
                            }
                            MemberChange::Liveness { .. } => {}
                        }
                    }
                    // The list's clock moves by one per batch: in gossip
                    // mode it is this node's own (the digest is what
                    // nodes compare).
                    v.propose_adopt(members.into_values().collect(), v.list_epoch() + 1)
                })
                .await;
            if let Err(e) = r {
                tracing::warn!(
                    changes = list.len(),
                    "gossip: member changes left the list unchanged: {}",
                    e.message()
                );
            }
        }
        for c in batch {
            if let MemberChange::Liveness { id, to, .. } = c {
                let change = self.view.write().set_liveness(&id, to);
                self.log_change(change);
            }
        }
    }

    /// The gossip part of a tick: namespaces to peers that may lack them
    /// once they are up, and this node's generation saved when it grew.
    pub(super) fn gossip_tick(self: &Arc<Self>) {
        let ready: Vec<NodeId> = {
            let v = self.view.read();
            let mut u = self.unsynced.lock();
            let ready: Vec<NodeId> = u
                .iter()
                .filter(|id| v.liveness(id) == Some(Liveness::Up))
                .cloned()
                .collect();
            for id in &ready {
                u.remove(id);
            }
            ready
        };
        for id in ready {
            self.spawn(self.clone().sync_namespaces(id));
        }
        let now = self.gossip.running.lock().as_ref().map(Gossip::generation);
        if let Some(g) = now.filter(|g| *g > self.gossip.saved.load(Relaxed))
            && let Err(e) = self.gossip.save(g)
        {
            tracing::warn!(generation = g, "gossip generation not saved: {e}");
        }
    }

    /// The gossip fields of Stats.
    pub(super) fn gossip_stats(&self, s: &mut proto::ClusterStats) {
        if let Some(g) = self.gossip.running.lock().as_ref() {
            s.gossip_addr = g.local_addr().to_string();
            s.gossip_generation = g.generation();
            let st = g.stats();
            s.gossip_messages_in = st.messages_in;
            s.gossip_messages_refused = st.messages_refused;
            s.gossip_messages_rejected = st.messages_rejected;
            // Refused for another slot count, as a heartbeat's ping would be.
            s.placement_mismatches += st.placement_mismatches;
        }
    }

    /// Whether members join and leave by gossip.
    pub(super) fn gossiping(&self) -> bool {
        self.mode == MembershipMode::Gossip
    }

    /// A leave in gossip mode: this node leaves by telling gossip (the
    /// others drop it from placement as they hear it) and hands its keys
    /// over by the rebalancing pass of a non-member; a dead member is
    /// declared left for good; a live one is asked to leave by itself.
    pub(super) async fn leave_by_gossip(
        self: &Arc<Self>,
        id: NodeId,
        dead: bool,
    ) -> std::result::Result<proto::MembershipResponse, Status> {
        if id == self.me {
            let running = self.gossip.running.lock().take();
            if let Some(g) = running
                && let Err(e) = g.leave().await
            {
                tracing::warn!("gossip leave: {e}");
            }
            self.change_members(|v| v.propose_leave(&id)).await?;
            return Ok(self.membership_reply(Vec::new(), Vec::new()));
        }
        if dead {
            let removing = self.gossip.running.lock().as_ref().map(|g| g.remove(id.clone()));
            match removing {
                Some(r) => {
                    r.await.map_err(|e| status_of(e.kind(), format!("gossip: {e}")))?;
                }
                None => return Err(status_of(ErrorKind::Closed, "this node left the cluster")),
            }
            self.change_members(|v| v.propose_leave(&id)).await?;
            return Ok(self.membership_reply(Vec::new(), vec![id.0]));
        }
        let Some(c) = self.peers.get(&id) else {
            return Err(status_of(ErrorKind::InvalidArgument, format!("{id} is not a member")));
        };
        let req = proto::LeaveRequest {
            id: id.0.clone(),
            forwarded: true,
        };
        let r = tokio::time::timeout(self.peer_timeout, c.leave(req)).await;
        let not_reached = if matches!(r, Ok(Ok(_))) {
            Vec::new()
        } else {
            tracing::warn!(member = %id, ?r, "leave not sent to the leaver");
            vec![id.0]
        };
        Ok(self.membership_reply(not_reached, Vec::new()))
    }
}

/// Applies every change waiting in `rx` to `view`; answers how many there
/// were.
pub fn apply_pending(view: &mut Membership, rx: &mut mpsc::UnboundedReceiver<MemberChange>) -> usize {
    let mut n = 0;
    while let Ok(c) = rx.try_recv() {
        if let Err(e) = kvtier::replication::swim::apply_change(view, &c) {
            tracing::warn!(?c, "gossip: a member change left the view unchanged: {e}");
        }
        n += 1;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvtier::replication::membership::Detector;

    fn fast() -> SwimConfig {
        SwimConfig {
            probe_period_ms: 100,
            probe_rtt_ms: 40,
            gossip_interval_ms: 50,
            sync_interval_ms: 1000,
            join_retry_ms: 300,
            ..SwimConfig::default()
        }
    }

    async fn node(i: usize, seeds: Vec<String>) -> (Gossip, mpsc::UnboundedReceiver<MemberChange>, Membership) {
        let m = Member::new(format!("g{i}"), format!("127.0.0.1:{}", 60000 + i));
        let view = Membership::with_members(m.id.clone(), std::slice::from_ref(&m), 64, Detector::default()).unwrap();
        let (g, rx) = Gossip::start(m, "127.0.0.1:0".parse().unwrap(), 1, fast(), Envelope::new(64), seeds)
            .await
            .unwrap();
        (g, rx, view)
    }

    /// Polls `f` over the views every 20 ms for at most 10 s.
    async fn until(
        nodes: &mut [(Gossip, mpsc::UnboundedReceiver<MemberChange>, Membership)],
        what: &str,
        f: impl Fn(&[&Membership]) -> bool,
    ) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            for (_, rx, v) in nodes.iter_mut() {
                apply_pending(v, rx);
            }
            let views: Vec<&Membership> = nodes.iter().map(|n| &n.2).collect();
            if f(&views) {
                return;
            }
            assert!(Instant::now() < deadline, "not within 10 s: {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn members_find_each_other_through_a_seed_and_see_a_leave_over_real_sockets() {
        let first = node(0, vec![]).await;
        let seed = first.0.local_addr().to_string();
        let mut nodes = vec![first];
        for i in 1..4 {
            nodes.push(node(i, vec![seed.clone(), "no-such-host.invalid:1".into()]).await);
        }
        until(&mut nodes, "every list has 4 members", |vs| {
            vs.iter().all(|v| v.members().len() == 4)
        })
        .await;
        let digest = nodes[0].2.digest();
        until(&mut nodes, "the lists agree", |vs| {
            vs.iter().all(|v| v.digest() == digest)
        })
        .await;
        let gone = nodes.pop().unwrap();
        gone.0.leave().await.unwrap();
        let id = NodeId::from("g3");
        until(&mut nodes, "the leaver is out of every list", |vs| {
            vs.iter().all(|v| v.liveness(&id).is_none() && v.members().len() == 3)
        })
        .await;
        assert!(
            nodes
                .iter()
                .all(|n| n.2.liveness(&NodeId::from("g1")) == Some(Liveness::Up)),
            "the others are up"
        );
    }
}
