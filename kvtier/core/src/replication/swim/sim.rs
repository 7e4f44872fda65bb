//! [`Swim`] at scale in one process: simulated time and network (loss,
//! delay, partitions), no sockets and no sleeps. Every node runs the same
//! code the server drives; the simulator delivers its messages and fires
//! its timers in time order, deterministically for a seed.
//!
//! [`Scenario`] is the script both the tests and `kvtier-bench
//! cluster-sim` run: a formed cluster under steady load, a crash, a join
//! and a graceful leave, measured against ground truth.
//!
//! # Memory
//!
//! Each node keeps an entry per member (16 bytes in foca's table, which
//! grows by doubling): 10,000 nodes take about 2.6 GB. Filling those
//! tables is the cost of a large run: foca scans its table on every
//! insert, so a node's full table costs O(n²), about 15 ms at 10,000. Nodes share one
//! [`Directory`] (each would hold the same addresses), and the per-node
//! [`Membership`] views are kept only when asked (they hold strings).

use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use serde::Serialize;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};

use super::{Channel, Directory, Envelope, MemberChange, Peer, Ready, Swim, SwimConfig, SwimTimer, apply_change};
use crate::replication::membership::{Detector, Liveness, Membership};
use crate::replication::placement::{Member, NodeId};
use crate::replication::slots::{MAX_R, SlotTable};
use std::sync::Arc;

/// Slots of the simulated nodes' views: they check member lists, not the
/// spread of keys, so a small table keeps thousands of them cheap.
const SIM_SLOTS: u32 = 64;

/// Node `i`'s view of `members`, as the server keeps it.
fn view_of(i: usize, members: &[Member]) -> Membership {
    Membership::with_members(node_id(i), members, SIM_SLOTS, Detector::default()).expect("valid members")
}

/// The simulated network.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Net {
    /// Share of datagrams lost (streams are reliable, as TCP is).
    pub loss: f64,
    /// One-way delay, uniform between these, microseconds.
    pub delay_min_us: u64,
    /// See `delay_min_us`.
    pub delay_max_us: u64,
}

impl Default for Net {
    fn default() -> Self {
        Self {
            loss: 0.0,
            delay_min_us: 200,
            delay_max_us: 5_000,
        }
    }
}

/// Node `i`'s id.
pub fn node_id(i: usize) -> NodeId {
    NodeId(format!("node-{i}"))
}

/// Node `i`'s entry: gRPC at 10.x.y.z:50051, gossip at 10.x.y.z:7946.
pub fn peer(i: usize) -> Peer {
    let ip = Ipv4Addr::from(0x0a00_0000u32 + 1 + i as u32);
    Peer::new(
        Member::new(node_id(i).0, format!("{ip}:50051")),
        SocketAddr::from((ip, 7946)),
    )
}

/// What a node reported, as the simulator hands it to an observer.
#[derive(Debug)]
pub enum Observed<'a> {
    /// A member change at `node`.
    Change {
        /// The reporting node.
        node: usize,
        /// What changed.
        change: &'a MemberChange,
    },
    /// `node`'s probe found `member` unresponsive.
    Suspected {
        /// The prober.
        node: usize,
        /// The suspect.
        member: &'a NodeId,
    },
}

/// A simulated node.
#[derive(Debug)]
pub struct SimNode {
    /// Its gossip state machine.
    pub swim: Swim,
    /// Whether it runs (a crashed or departed node drops what it gets).
    pub alive: bool,
    /// Its member list, when the simulation keeps views.
    pub view: Option<Membership>,
    /// Bumped at each restart: timers of an earlier life are dropped.
    life: u32,
}

#[derive(Debug)]
enum Event {
    Deliver { to: usize, bytes: Vec<u8> },
    Timer { node: usize, life: u32, timer: SwimTimer },
}

/// Counters of the simulated network.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct NetStats {
    /// Messages sent (datagrams and streams).
    pub sent: u64,
    /// Bytes sent.
    pub sent_bytes: u64,
    /// Stream messages sent (syncs).
    pub streams: u64,
    /// Lost to `loss`.
    pub lost: u64,
    /// Dropped by a partition, or sent to a stopped node or an unknown
    /// address.
    pub dropped: u64,
    /// Messages a node refused (malformed or unexpected).
    pub refused: u64,
    /// Errors from timers (foca's internal checks).
    pub timer_errors: u64,
}

/// The simulator: nodes, a clock, a queue of deliveries and timers.
#[derive(Debug)]
pub struct Sim {
    now_us: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<(u64, u64, usize)>>,
    events: Vec<Option<Event>>,
    free: Vec<usize>,
    /// The nodes, by index.
    pub nodes: Vec<SimNode>,
    by_addr: HashMap<SocketAddr, usize>,
    dir: Directory,
    rng: SmallRng,
    net: Net,
    config: SwimConfig,
    /// Partition group per node: messages between groups are dropped.
    group: Vec<u8>,
    keep_views: bool,
    /// Network counters.
    pub stats: NetStats,
    /// The first few refusal messages, to diagnose.
    pub first_errors: Vec<String>,
}

impl Sim {
    /// `n` nodes (ids 0..n) that already know each other, at generation
    /// 1, each starting its probe cycle at a random phase. `keep_views`
    /// keeps a [`Membership`] per node (up to a few thousand nodes).
    /// Builds the nodes on up to `threads` threads: each node's table
    /// takes O(n²) to fill in foca, the cost of a 10,000-node start.
    pub fn formed(n: usize, config: SwimConfig, net: Net, seed: u64, keep_views: bool, threads: usize) -> Self {
        let dir = Directory::new();
        let peers: Vec<Peer> = (0..n).map(peer).collect();
        for p in &peers {
            dir.learn(1, p);
        }
        let build = |i: usize| {
            let mut s = Swim::new(
                peers[i].clone(),
                1,
                config.clone(),
                Envelope::new(SIM_SLOTS),
                seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
                dir.clone(),
            )
            .expect("valid node");
            s.restore(peers.iter().map(|p| (p.clone(), 1))).expect("valid peers");
            s
        };
        let threads = threads.clamp(1, 64).min(n.max(1));
        let mut swims: Vec<Option<Swim>> = (0..n).map(|_| None).collect();
        std::thread::scope(|sc| {
            let chunk = n.div_ceil(threads);
            for (t, part) in swims.chunks_mut(chunk.max(1)).enumerate() {
                let build = &build;
                sc.spawn(move || {
                    for (j, slot) in part.iter_mut().enumerate() {
                        *slot = Some(build(t * chunk + j));
                    }
                });
            }
        });
        let mut sim = Self::empty(config, net, seed, dir, keep_views);
        let all: Vec<Member> = peers.iter().map(|p| p.member.clone()).collect();
        let table = (keep_views && !all.is_empty())
            .then(|| Arc::new(SlotTable::new(&all, SIM_SLOTS, MAX_R).expect("valid members")));
        for (i, swim) in swims.into_iter().enumerate() {
            let view = table
                .as_ref()
                .map(|t| Membership::new(node_id(i), t.clone(), Detector::default()));
            sim.by_addr.insert(peers[i].gossip, i);
            sim.nodes.push(SimNode {
                swim: swim.expect("built"),
                alive: true,
                view,
                life: 0,
            });
            sim.group.push(0);
        }
        let period_us = sim.config.probe_period_ms * 1000;
        for i in 0..n {
            // A random phase: nodes of a real cluster do not tick together.
            let phase = sim.rng.random_range(0..period_us);
            let ready = sim.nodes[i].swim.take_ready();
            sim.process(i, ready, phase, &mut |_, _| {});
        }
        sim
    }

    fn empty(config: SwimConfig, net: Net, seed: u64, dir: Directory, keep_views: bool) -> Self {
        Self {
            now_us: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            events: Vec::new(),
            free: Vec::new(),
            nodes: Vec::new(),
            by_addr: HashMap::new(),
            dir,
            rng: SmallRng::seed_from_u64(seed),
            net,
            config,
            group: Vec::new(),
            keep_views,
            stats: NetStats::default(),
            first_errors: Vec::new(),
        }
    }

    /// The simulated time, microseconds.
    pub fn now_us(&self) -> u64 {
        self.now_us
    }

    /// The nodes that run.
    pub fn live(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.nodes.len()).filter(|i| self.nodes[*i].alive)
    }

    /// Replaces the network's behaviour from now on.
    pub fn set_net(&mut self, net: Net) {
        self.net = net;
    }

    /// Puts each node in a partition group (missing ones in group 0):
    /// messages between different groups are dropped. All zero heals.
    pub fn partition(&mut self, groups: &[(usize, u8)]) {
        self.group.iter_mut().for_each(|g| *g = 0);
        for (i, g) in groups {
            self.group[*i] = *g;
        }
    }

    /// Stops node `i` without a word (a crash, a power loss).
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].alive = false;
    }

    /// Adds node `i` (the next index) at `generation`, not yet joined;
    /// answers its index.
    pub fn add(&mut self, generation: u32) -> usize {
        let i = self.nodes.len();
        let p = peer(i);
        let swim = Swim::new(
            p.clone(),
            generation,
            self.config.clone(),
            Envelope::new(SIM_SLOTS),
            self.rng.random(),
            self.dir.clone(),
        )
        .expect("valid node");
        let view = self.keep_views.then(|| view_of(i, std::slice::from_ref(&p.member)));
        self.by_addr.insert(p.gossip, i);
        self.nodes.push(SimNode {
            swim,
            alive: true,
            view,
            life: 0,
        });
        self.group.push(0);
        i
    }

    /// Starts node `i` again as `generation`, with an empty table (a
    /// restart keeps no gossip state); it must join again.
    pub fn restart(&mut self, i: usize, generation: u32) {
        let p = peer(i);
        let swim = Swim::new(
            p.clone(),
            generation,
            self.config.clone(),
            Envelope::new(SIM_SLOTS),
            self.rng.random(),
            self.dir.clone(),
        )
        .expect("valid node");
        let n = &mut self.nodes[i];
        n.swim = swim;
        n.alive = true;
        n.life += 1;
        if let Some(v) = &mut n.view {
            // The server keeps its list on disk; liveness restarts as up.
            let members = v.members();
            *v = view_of(i, &members);
        }
    }

    /// Node `i` joins through `seeds` (node indices, as DNS would list
    /// them).
    pub fn join(&mut self, i: usize, seeds: &[usize], on: &mut impl FnMut(u64, Observed<'_>)) {
        let addrs: Vec<SocketAddr> = seeds.iter().map(|s| peer(*s).gossip).collect();
        self.nodes[i].swim.join(&addrs);
        let ready = self.nodes[i].swim.take_ready();
        self.process(i, ready, 0, on);
    }

    /// Node `i` leaves gracefully, then stops.
    pub fn leave(&mut self, i: usize, on: &mut impl FnMut(u64, Observed<'_>)) {
        self.nodes[i].swim.leave().expect("leave");
        let ready = self.nodes[i].swim.take_ready();
        self.process(i, ready, 0, on);
        self.nodes[i].alive = false;
    }

    /// Declares member `id` left at node `i` (an operator's removal).
    pub fn remove(&mut self, i: usize, id: &NodeId, on: &mut impl FnMut(u64, Observed<'_>)) -> bool {
        let r = self.nodes[i].swim.remove(id).expect("remove");
        let ready = self.nodes[i].swim.take_ready();
        self.process(i, ready, 0, on);
        r
    }

    fn push(&mut self, at_us: u64, e: Event) {
        let slot = match self.free.pop() {
            Some(s) => {
                self.events[s] = Some(e);
                s
            }
            None => {
                self.events.push(Some(e));
                self.events.len() - 1
            }
        };
        self.seq += 1;
        self.queue.push(Reverse((at_us, self.seq, slot)));
    }

    /// Carries out what node `i` asked for; timers start `offset_us` late.
    fn process(&mut self, i: usize, ready: Ready, offset_us: u64, on: &mut impl FnMut(u64, Observed<'_>)) {
        for s in &ready.suspected {
            on(self.now_us, Observed::Suspected { node: i, member: s });
        }
        for c in &ready.changes {
            if let Some(v) = &mut self.nodes[i].view {
                apply_change(v, c).expect("the simulation's member lists have slot tables");
            }
            on(self.now_us, Observed::Change { node: i, change: c });
        }
        let life = self.nodes[i].life;
        for (after, timer) in ready.timers {
            let at = self.now_us + offset_us + after.as_micros() as u64;
            self.push(at, Event::Timer { node: i, life, timer });
        }
        for out in ready.sends {
            self.stats.sent += 1;
            self.stats.sent_bytes += out.bytes.len() as u64;
            let Some(&to) = self.by_addr.get(&out.to) else {
                self.stats.dropped += 1;
                continue;
            };
            if out.channel == Channel::Stream {
                self.stats.streams += 1;
            } else if self.net.loss > 0.0 && self.rng.random_bool(self.net.loss) {
                self.stats.lost += 1;
                continue;
            }
            if self.group[i] != self.group[to] {
                self.stats.dropped += 1;
                continue;
            }
            let delay = self
                .rng
                .random_range(self.net.delay_min_us..=self.net.delay_max_us.max(self.net.delay_min_us));
            self.push(self.now_us + delay, Event::Deliver { to, bytes: out.bytes });
        }
    }

    /// Runs every event up to `until_us` (simulated), reporting what nodes
    /// report to `on`.
    pub fn run_until(&mut self, until_us: u64, on: &mut impl FnMut(u64, Observed<'_>)) {
        while let Some(Reverse((at, _, slot))) = self.queue.peek().copied() {
            if at > until_us {
                break;
            }
            self.queue.pop();
            let e = self.events[slot].take().expect("queued event");
            self.free.push(slot);
            self.now_us = at;
            match e {
                Event::Deliver { to, bytes } => {
                    if !self.nodes[to].alive {
                        self.stats.dropped += 1;
                        continue;
                    }
                    if let Err(err) = self.nodes[to].swim.handle_message(&bytes) {
                        self.stats.refused += 1;
                        if self.first_errors.len() < 8 {
                            self.first_errors.push(format!("node {to}: {err}"));
                        }
                    }
                    let ready = self.nodes[to].swim.take_ready();
                    self.process(to, ready, 0, on);
                }
                Event::Timer { node, life, timer } => {
                    let n = &mut self.nodes[node];
                    if !n.alive || n.life != life {
                        continue;
                    }
                    if let Err(err) = n.swim.handle_timer(timer) {
                        self.stats.timer_errors += 1;
                        if self.first_errors.len() < 8 {
                            self.first_errors.push(format!("node {node} timer: {err}"));
                        }
                    }
                    let ready = self.nodes[node].swim.take_ready();
                    self.process(node, ready, 0, on);
                }
            }
        }
        self.now_us = self.now_us.max(until_us);
    }

    /// Whether every running node's view holds the same member list and
    /// sees every running member up (or suspect) and every stopped one
    /// down; `None`
    /// without views. Answers the first disagreement.
    pub fn views_agree(&self) -> Option<Result<(), String>> {
        if !self.keep_views {
            return None;
        }
        let live: Vec<usize> = self.live().collect();
        let first = self.nodes[*live.first()?].view.as_ref()?;
        for &i in &live {
            let v = self.nodes[i].view.as_ref()?;
            if v.digest() != first.digest() {
                return Some(Err(format!(
                    "node {i} holds {} members, node {} holds {}",
                    v.members().len(),
                    live[0],
                    first.members().len()
                )));
            }
            for m in v.members() {
                let j = self.by_addr.get(&peer_of(&m).gossip).copied();
                let running = j.is_some_and(|j| self.nodes[j].alive);
                let l = v.liveness(&m.id).expect("member");
                // A suspicion may be under way when the run stops: a
                // suspect is still written to, as an up member is.
                let ok = if running {
                    l != Liveness::Down
                } else {
                    l == Liveness::Down
                };
                if !ok {
                    return Some(Err(format!("node {i} sees {} as {}", m.id, l.name())));
                }
            }
        }
        Some(Ok(()))
    }
}

/// The simulated entry of the member named `m` (ids are `node-<i>`).
fn peer_of(m: &Member) -> Peer {
    let i: usize =
        m.id.0
            .strip_prefix("node-")
            .and_then(|s| s.parse().ok())
            .expect("a simulated id");
    peer(i)
}

/// A scripted run: a formed cluster of `members`, measured through a
/// steady phase, a crash, a join and a graceful leave.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Nodes in the formed cluster.
    pub members: usize,
    /// The protocol's settings.
    pub config: SwimConfig,
    /// The network during the whole run.
    pub net: Net,
    /// Seeds every random choice.
    pub seed: u64,
    /// Keep a [`Membership`] per node and check that they agree at the end.
    pub keep_views: bool,
    /// Threads to build the formed cluster on.
    pub threads: usize,
    /// Simulated seconds of steady state before the crash (messages are
    /// counted over the last two thirds).
    pub steady_s: u64,
    /// Simulated seconds from the crash to the join.
    pub crash_s: u64,
    /// Simulated seconds from the join to the leave, and from the leave
    /// to the end.
    pub step_s: u64,
}

impl Scenario {
    /// `members` nodes, default settings, 1% datagram loss, 0.2–5 ms delay.
    pub fn new(members: usize, seed: u64) -> Self {
        Self {
            members,
            config: SwimConfig::default(),
            net: Net {
                loss: 0.01,
                ..Net::default()
            },
            seed,
            keep_views: false,
            threads: 1,
            steady_s: 15,
            crash_s: 25,
            step_s: 15,
        }
    }
}

/// What a [`Scenario`] measured. Times are simulated seconds.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Nodes in the formed cluster.
    pub members: usize,
    /// Share of datagrams lost.
    pub loss: f64,
    /// The probe period.
    pub probe_period_s: f64,
    /// The suspicion timeout at this size.
    pub suspect_timeout_s: f64,
    /// Messages each node sent per second in the steady phase (probes,
    /// acks, gossip, announces, syncs).
    pub messages_per_node_per_s: f64,
    /// Bytes each node sent per second in the steady phase.
    pub bytes_per_node_per_s: f64,
    /// The reference: all-to-all heartbeats, one ping and one answer per
    /// pair and probe period, per node.
    pub all_to_all_messages_per_node_per_s: f64,
    /// `messages_per_node_per_s` over the reference.
    pub messages_vs_all_to_all: f64,
    /// From the crash until the first node held the crashed one down.
    pub detect_first_s: Option<f64>,
    /// From the crash until every running node held it down.
    pub detect_s: Option<f64>,
    /// Running members that did not hold the crashed one down by the join.
    pub detect_missing: usize,
    /// Suspicions raised by a probe against a running member.
    pub false_suspicions: u64,
    /// Running members some node declared down.
    pub false_downs: u64,
    /// From the join until every running node held the joiner up and the
    /// joiner held every member in its list.
    pub converge_s: Option<f64>,
    /// Running members that had not seen the joiner up, plus members the
    /// joiner did not know, by the leave.
    pub converge_missing: usize,
    /// From the leave until every running node had dropped the leaver.
    pub leave_s: Option<f64>,
    /// Running members that had not dropped the leaver by the end.
    pub leave_missing: usize,
    /// Whether all views agree at the end (with `keep_views`).
    pub views_agree: Option<bool>,
    /// The first disagreement, if any.
    pub views_disagreement: Option<String>,
    /// Messages and bytes over the whole run.
    pub net: NetStats,
    /// Simulated seconds run.
    pub simulated_s: f64,
    /// The first errors nodes reported, if any.
    pub errors: Vec<String>,
}

/// What the observer tracks against ground truth.
#[derive(Default)]
struct Track {
    victim: Option<NodeId>,
    killed_at: u64,
    down_by: HashMap<usize, u64>,
    joiner: Option<(usize, NodeId)>,
    joined_at: u64,
    joiner_up_at: HashMap<usize, u64>,
    joiner_knows: HashMap<NodeId, u64>,
    leaver: Option<NodeId>,
    left_at: u64,
    left_by: HashMap<usize, u64>,
    false_suspicions: u64,
    false_downs: u64,
    running: HashMap<NodeId, bool>,
}

impl Track {
    fn see(&mut self, now: u64, o: Observed<'_>) {
        match o {
            Observed::Suspected { member, .. } => {
                if self.running.get(member).copied().unwrap_or(false) {
                    self.false_suspicions += 1;
                }
            }
            Observed::Change { node, change } => match change {
                MemberChange::Liveness { id, to, .. } => {
                    if *to == Liveness::Down {
                        if self.victim.as_ref() == Some(id) {
                            self.down_by.entry(node).or_insert(now);
                        } else if self.running.get(id).copied().unwrap_or(false) {
                            self.false_downs += 1;
                        }
                    }
                    if *to == Liveness::Up
                        && let Some((j, jid)) = &self.joiner
                    {
                        if jid == id {
                            self.joiner_up_at.entry(node).or_insert(now);
                        } else if node == *j {
                            self.joiner_knows.entry(id.clone()).or_insert(now);
                        }
                    }
                    if *to == Liveness::Down
                        && let Some((j, _)) = &self.joiner
                        && node == *j
                    {
                        self.joiner_knows.entry(id.clone()).or_insert(now);
                    }
                }
                MemberChange::Left { id, .. } => {
                    if self.leaver.as_ref() == Some(id) {
                        self.left_by.entry(node).or_insert(now);
                    }
                }
                MemberChange::Joined { .. } => {}
            },
        }
    }
}

/// When the last of `need` saw it (seconds after `since`), if all did;
/// and how many did not.
fn all_by(need: &[usize], at: &HashMap<usize, u64>, since: u64) -> (Option<f64>, usize) {
    let missing = need.iter().filter(|i| !at.contains_key(i)).count();
    let last = need.iter().filter_map(|i| at.get(i)).max().copied().unwrap_or(since);
    ((missing == 0 && !need.is_empty()).then(|| secs(last - since)), missing)
}

fn secs(us: u64) -> f64 {
    us as f64 / 1e6
}

impl Scenario {
    /// Runs the script:
    ///
    /// 1. `steady_s` of a formed cluster (messages counted over the last
    ///    two thirds);
    /// 2. a random node crashes; `crash_s` later
    /// 3. a new node joins through three random running seeds; `step_s`
    ///    later
    /// 4. another random node leaves gracefully; after `step_s` the run
    ///    ends.
    pub fn run(&self) -> Report {
        self.run_with(|_| {})
    }

    /// [`Scenario::run`], calling `phase` as each step begins ("formed",
    /// "crash", "join", "leave", "end"): the bench times the steps.
    pub fn run_with(&self, mut phase: impl FnMut(&'static str)) -> Report {
        let s = SEC;
        let mut sim = Sim::formed(
            self.members,
            self.config.clone(),
            self.net,
            self.seed,
            self.keep_views,
            self.threads,
        );
        phase("steady");
        let mut rng = SmallRng::seed_from_u64(self.seed ^ 0x5c3e);
        let mut t = Track::default();
        for i in 0..self.members {
            t.running.insert(node_id(i), true);
        }
        // 1. Steady state.
        let warm = self.steady_s * s / 3;
        sim.run_until(warm, &mut |now, o| t.see(now, o));
        let before = sim.stats;
        sim.run_until(self.steady_s * s, &mut |now, o| t.see(now, o));
        let window_s = secs(self.steady_s * s - warm);
        let live = sim.live().count() as f64;
        let sent = (sim.stats.sent - before.sent) as f64;
        let sent_bytes = (sim.stats.sent_bytes - before.sent_bytes) as f64;
        // 2. A crash.
        phase("crash");
        let victim = rng.random_range(0..self.members);
        sim.kill(victim);
        t.running.insert(node_id(victim), false);
        t.victim = Some(node_id(victim));
        t.killed_at = sim.now_us();
        sim.run_until(sim.now_us() + self.crash_s * s, &mut |now, o| t.see(now, o));
        // 3. A join through three running seeds.
        phase("join");
        let seeds: Vec<usize> = {
            let live: Vec<usize> = sim.live().collect();
            (0..3).map(|_| live[rng.random_range(0..live.len())]).collect()
        };
        let j = sim.add(1);
        t.joiner = Some((j, node_id(j)));
        t.running.insert(node_id(j), true);
        t.joined_at = sim.now_us();
        sim.join(j, &seeds, &mut |now, o| t.see(now, o));
        sim.run_until(sim.now_us() + self.step_s * s, &mut |now, o| t.see(now, o));
        // 4. A graceful leave.
        phase("leave");
        let leaver = loop {
            let c = rng.random_range(0..self.members);
            if c != victim {
                break c;
            }
        };
        t.leaver = Some(node_id(leaver));
        t.running.insert(node_id(leaver), false);
        t.left_at = sim.now_us();
        sim.leave(leaver, &mut |now, o| t.see(now, o));
        sim.run_until(sim.now_us() + self.step_s * s, &mut |now, o| t.see(now, o));
        phase("end");
        self.report(&sim, &t, live, window_s, sent, sent_bytes, victim, j, leaver)
    }

    #[allow(clippy::too_many_arguments)]
    fn report(
        &self,
        sim: &Sim,
        t: &Track,
        live: f64,
        window_s: f64,
        sent: f64,
        sent_bytes: f64,
        victim: usize,
        joiner: usize,
        leaver: usize,
    ) -> Report {
        // Who ran during each step decides who had to see it.
        let at_crash: Vec<usize> = (0..self.members).filter(|i| *i != victim).collect();
        let (detect, detect_missing) = all_by(&at_crash, &t.down_by, t.killed_at);
        let detect_first = t.down_by.values().min().map(|at| secs(at - t.killed_at));
        let (seen, mut converge_missing) = all_by(&at_crash, &t.joiner_up_at, t.joined_at);
        let mut known = HashMap::new();
        for i in 0..self.members {
            if let Some(at) = t.joiner_knows.get(&node_id(i)) {
                known.insert(i, *at);
            }
        }
        let (knows, unknown) = all_by(&(0..self.members).collect::<Vec<_>>(), &known, t.joined_at);
        converge_missing += unknown;
        let converge = seen.zip(knows).map(|(a, b)| a.max(b));
        let after_leave: Vec<usize> = (0..=joiner).filter(|i| *i != victim && *i != leaver).collect();
        let (leave, leave_missing) = all_by(&after_leave, &t.left_by, t.left_at);
        let agree = sim.views_agree();
        let period_s = self.config.probe_period_ms as f64 / 1000.0;
        let per_node = sent / live / window_s;
        let all_to_all = 2.0 * (self.members as f64 - 1.0) / period_s;
        Report {
            members: self.members,
            loss: self.net.loss,
            probe_period_s: period_s,
            suspect_timeout_s: self.config.suspect_timeout(self.members).as_secs_f64(),
            messages_per_node_per_s: per_node,
            bytes_per_node_per_s: sent_bytes / live / window_s,
            all_to_all_messages_per_node_per_s: all_to_all,
            messages_vs_all_to_all: per_node / all_to_all,
            detect_first_s: detect_first,
            detect_s: detect,
            detect_missing,
            false_suspicions: t.false_suspicions,
            false_downs: t.false_downs,
            converge_s: converge,
            converge_missing,
            leave_s: leave,
            leave_missing,
            views_agree: agree.as_ref().map(|r| r.is_ok()),
            views_disagreement: agree.and_then(|r| r.err()),
            net: sim.stats,
            simulated_s: secs(sim.now_us()),
            errors: sim.first_errors.clone(),
        }
    }
}

/// One simulated second, in microseconds.
pub const SEC: u64 = 1_000_000;

#[cfg(test)]
mod tests {
    use super::*;

    /// The simulation check at the size a debug build runs in
    /// seconds: times are simulated (deterministic for the seed), not
    /// measured.
    #[test]
    fn a_thousand_members_detect_a_crash_converge_after_a_join_and_agree() {
        let seed = 17;
        let mut sc = Scenario::new(1000, seed);
        sc.keep_views = true;
        sc.threads = 2;
        let r = sc.run();
        assert_eq!(r.views_agree, Some(true), "seed {seed}: {:?}", r.views_disagreement);
        let detect = r.detect_s.expect("every running member holds the crashed one down");
        assert!(detect <= 15.0, "seed {seed}: detected in {detect} s");
        let converge = r.converge_s.expect("the joiner and the cluster learn each other");
        assert!(converge <= 5.0, "seed {seed}: converged in {converge} s");
        let leave = r.leave_s.expect("every running member drops the leaver");
        assert!(leave <= 5.0, "seed {seed}: leave seen in {leave} s");
        assert_eq!(r.false_downs, 0, "seed {seed}");
        assert!(
            r.false_suspicions <= 5,
            "seed {seed}: {} false suspicions at 1% loss",
            r.false_suspicions
        );
        assert!(
            r.messages_per_node_per_s <= 10.0,
            "seed {seed}: {}",
            r.messages_per_node_per_s
        );
        assert_eq!(
            (r.net.refused, r.net.timer_errors),
            (0, 0),
            "seed {seed}: {:?}",
            r.errors
        );
    }

    #[test]
    fn heavy_loss_raises_suspicions_that_are_refuted_not_turned_down() {
        let seed = 23;
        let mut sc = Scenario::new(200, seed);
        sc.net.loss = 0.10;
        sc.keep_views = true;
        let r = sc.run();
        assert!(r.false_suspicions > 0, "seed {seed}: 10% loss fails some probes");
        assert_eq!(r.false_downs, 0, "seed {seed}: every suspicion is refuted in time");
        assert_eq!(r.views_agree, Some(true), "seed {seed}: {:?}", r.views_disagreement);
        assert!(
            r.detect_s.is_some() && r.converge_s.is_some() && r.leave_s.is_some(),
            "seed {seed}: {r:?}"
        );
    }

    #[test]
    fn a_run_is_deterministic_for_its_seed() {
        let run = |seed| {
            let mut sc = Scenario::new(50, seed);
            sc.crash_s = 20;
            sc.step_s = 10;
            let r = sc.run();
            (r.net, r.detect_s, r.converge_s, r.false_suspicions)
        };
        assert_eq!(run(5), run(5));
        assert_ne!(run(5).0, run(6).0);
    }
}
