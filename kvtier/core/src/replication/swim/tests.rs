use super::sim::{Net, Observed, SEC, Sim, node_id, peer};
use super::*;
use crate::replication::membership::Detector;

/// The slot count of the nodes these tests build.
const SLOTS: u32 = 64;

fn env() -> Envelope {
    Envelope::new(SLOTS)
}

/// A message header of kind byte `kind`, at [`SLOTS`].
fn header(kind: u8) -> Vec<u8> {
    let mut h = env().start(Kind::Swim, 0);
    h[1] = kind;
    h
}

fn quiet() -> impl FnMut(u64, Observed<'_>) {
    |_, _| {}
}

/// Every change every node reported, in order.
#[derive(Default)]
struct Log(Vec<(u64, usize, MemberChange)>);

impl Log {
    fn on(&mut self) -> impl FnMut(u64, Observed<'_>) + '_ {
        |now, o| {
            if let Observed::Change { node, change } = o {
                self.0.push((now, node, change.clone()));
            }
        }
    }

    fn about<'a>(&'a self, id: &'a NodeId) -> impl Iterator<Item = &'a (u64, usize, MemberChange)> + 'a {
        self.0.iter().filter(move |(_, _, c)| match c {
            MemberChange::Joined { member, .. } => member.id == *id,
            MemberChange::Left { id: x, .. } | MemberChange::Liveness { id: x, .. } => x == id,
        })
    }
}

/// A cluster built by joins from nothing: node 0 alone, the others join
/// through it.
fn grown(n: usize, seed: u64) -> Sim {
    let mut sim = Sim::formed(0, SwimConfig::default(), Net::default(), seed, true, 1);
    for i in 0..n {
        let j = sim.add(1);
        assert_eq!(i, j);
        let seeds: Vec<usize> = if i == 0 { vec![] } else { vec![0] };
        sim.join(i, &seeds, &mut quiet());
    }
    sim
}

#[test]
fn nodes_join_through_one_seed_and_every_list_converges() {
    let mut sim = grown(8, 1);
    sim.run_until(10 * SEC, &mut quiet());
    assert_eq!(sim.views_agree(), Some(Ok(())));
    for n in &sim.nodes {
        assert_eq!(n.view.as_ref().unwrap().members().len(), 8);
        assert_eq!(n.swim.live_members(), 7);
        assert!(n.swim.joined());
    }
    assert_eq!(sim.stats.refused, 0, "{:?}", sim.first_errors);
}

#[test]
fn a_crash_is_detected_and_a_restart_comes_back_without_moving_keys() {
    let mut sim = grown(6, 2);
    sim.run_until(10 * SEC, &mut quiet());
    let digest = sim.nodes[0].view.as_ref().unwrap().digest();
    sim.kill(3);
    let mut log = Log::default();
    sim.run_until(30 * SEC, &mut log.on());
    assert_eq!(sim.views_agree(), Some(Ok(())), "everyone holds node 3 down");
    let v = sim.nodes[0].view.as_ref().unwrap();
    assert_eq!(v.liveness(&node_id(3)), Some(Liveness::Down));
    assert_eq!(v.digest(), digest, "a failure keeps the member in the list");
    let suspected_first = log.about(&node_id(3)).any(|(_, _, c)| {
        matches!(
            c,
            MemberChange::Liveness {
                to: Liveness::Suspect,
                ..
            }
        )
    });
    assert!(suspected_first, "down comes after suspect");
    // A restart at a newer generation comes back up everywhere.
    sim.restart(3, 2);
    sim.join(3, &[0, 1], &mut quiet());
    sim.run_until(45 * SEC, &mut quiet());
    assert_eq!(sim.views_agree(), Some(Ok(())));
    assert_eq!(sim.nodes[0].view.as_ref().unwrap().digest(), digest);
    let gens: Vec<u32> = sim.nodes[0]
        .swim
        .members()
        .iter()
        .filter(|m| m.peer.member.id == node_id(3))
        .map(|m| m.generation)
        .collect();
    assert_eq!(gens, vec![2], "one entry per member, the newest generation");
}

#[test]
fn a_graceful_leave_is_seen_as_left_never_as_down() {
    let mut sim = grown(6, 3);
    sim.run_until(10 * SEC, &mut quiet());
    let mut log = Log::default();
    sim.leave(4, &mut log.on());
    sim.run_until(20 * SEC, &mut log.on());
    assert_eq!(sim.views_agree(), Some(Ok(())));
    for i in [0, 1, 2, 3, 5] {
        let v = sim.nodes[i].view.as_ref().unwrap();
        assert_eq!(v.liveness(&node_id(4)), None, "node {i} dropped the leaver");
        assert_eq!(v.members().len(), 5);
    }
    let leaver = node_id(4);
    let downs: Vec<_> = log
        .about(&leaver)
        .filter(|(_, _, c)| {
            matches!(
                c,
                MemberChange::Liveness {
                    to: Liveness::Down | Liveness::Suspect,
                    ..
                }
            )
        })
        .collect();
    assert!(downs.is_empty(), "a leave is not a failure: {downs:?}");
}

#[test]
fn an_operator_removes_a_dead_member_everywhere_and_a_live_one_comes_back() {
    let mut sim = grown(6, 4);
    sim.run_until(10 * SEC, &mut quiet());
    sim.kill(2);
    sim.run_until(30 * SEC, &mut quiet());
    assert!(sim.remove(0, &node_id(2), &mut quiet()));
    assert!(
        !sim.remove(0, &node_id(2), &mut quiet()),
        "removing twice changes nothing"
    );
    assert!(!sim.remove(0, &node_id(99), &mut quiet()), "not a member");
    sim.run_until(40 * SEC, &mut quiet());
    assert_eq!(sim.views_agree(), Some(Ok(())));
    assert_eq!(sim.nodes[1].view.as_ref().unwrap().members().len(), 5);
    // Removing a live member: it hears it is down and comes back as the
    // next generation, in the list again.
    assert!(sim.remove(0, &node_id(5), &mut quiet()));
    sim.run_until(70 * SEC, &mut quiet());
    assert_eq!(sim.views_agree(), Some(Ok(())));
    assert_eq!(sim.nodes[1].view.as_ref().unwrap().members().len(), 5);
    assert!(sim.nodes[5].swim.generation() > 1);
}

#[test]
fn a_joiner_learns_down_and_departed_members_from_its_sync() {
    let mut sim = grown(6, 5);
    sim.run_until(10 * SEC, &mut quiet());
    sim.kill(1);
    sim.leave(2, &mut quiet());
    sim.run_until(40 * SEC, &mut quiet());
    // Gossip about both is over; only a sync can teach them.
    let j = sim.add(1);
    sim.join(j, &[0], &mut quiet());
    sim.run_until(50 * SEC, &mut quiet());
    assert_eq!(sim.views_agree(), Some(Ok(())));
    let v = sim.nodes[j].view.as_ref().unwrap();
    assert_eq!(
        v.liveness(&node_id(1)),
        Some(Liveness::Down),
        "the dead member keeps its place"
    );
    assert_eq!(v.liveness(&node_id(2)), None, "the departed one is gone");
}

#[test]
fn a_node_that_missed_everything_catches_up_by_anti_entropy() {
    let mut sim = grown(10, 6);
    sim.run_until(10 * SEC, &mut quiet());
    // Node 9 hears nothing while node 1 crashes and node 2 leaves.
    sim.partition(&[(9, 1)]);
    sim.kill(1);
    sim.leave(2, &mut quiet());
    // Shorter than its suspicion of everyone else would take.
    sim.run_until(11 * SEC + 500_000, &mut quiet());
    sim.partition(&[]);
    sim.run_until(80 * SEC, &mut quiet());
    assert_eq!(sim.views_agree(), Some(Ok(())));
    let v = sim.nodes[9].view.as_ref().unwrap();
    assert_eq!(v.liveness(&node_id(2)), None);
}

#[test]
fn a_partition_heals_into_one_list() {
    let mut sim = grown(20, 7);
    sim.run_until(10 * SEC, &mut quiet());
    // Four nodes are cut off long enough for both sides to declare the
    // other down.
    sim.partition(&[(16, 1), (17, 1), (18, 1), (19, 1)]);
    sim.run_until(50 * SEC, &mut quiet());
    let v = sim.nodes[0].view.as_ref().unwrap();
    assert_eq!(v.liveness(&node_id(17)), Some(Liveness::Down));
    sim.partition(&[]);
    sim.run_until(250 * SEC, &mut quiet());
    assert_eq!(sim.views_agree(), Some(Ok(())), "{:?}", sim.first_errors);
    assert_eq!(sim.nodes[0].view.as_ref().unwrap().members().len(), 20);
}

#[test]
fn seeds_skip_this_node_and_a_lone_node_stays_alone() {
    let dir = Directory::new();
    let mut s = Swim::new(peer(0), 1, SwimConfig::default(), env(), 1, dir).unwrap();
    let first = s.take_ready();
    assert_eq!(
        first.changes,
        vec![MemberChange::Joined {
            member: peer(0).member,
            generation: 1
        }]
    );
    s.join(&[peer(0).gossip]);
    assert!(s.joined());
    assert!(s.take_ready().sends.is_empty(), "nothing to send to itself");
    s.join(&[peer(0).gossip, peer(1).gossip, peer(1).gossip]);
    let r = s.take_ready();
    assert!(!s.joined());
    assert!(r.sends.iter().all(|o| o.to == peer(1).gossip));
    assert_eq!(r.sends.len(), 2, "one announce, one sync request: {:?}", r.sends);
    assert_eq!(r.sends.iter().filter(|o| o.channel == Channel::Stream).count(), 1);
}

#[test]
fn bad_messages_are_refused_precisely_and_change_nothing() {
    let dir = Directory::new();
    let mut a = Swim::new(peer(0), 1, SwimConfig::default(), env(), 1, dir.clone()).unwrap();
    let mut b = Swim::new(peer(1), 1, SwimConfig::default(), env(), 2, Directory::new()).unwrap();
    a.restore([(peer(1), 1)]).unwrap();
    a.take_ready();
    b.take_ready();
    // A real packet from b to a, to cut and bend.
    b.join(&[peer(0).gossip]);
    let good = b
        .take_ready()
        .sends
        .into_iter()
        .find(|o| o.channel == Channel::Datagram)
        .unwrap()
        .bytes;
    let before = a.members();
    let cases: Vec<(Vec<u8>, ErrorKind, &str)> = vec![
        (vec![], ErrorKind::InvalidArgument, "shorter than its header"),
        (vec![9, 1, 0], ErrorKind::InvalidArgument, "format 9"),
        (
            vec![2, 1, 0, 0, 0],
            ErrorKind::InvalidArgument,
            "shorter than its header",
        ),
        (header(77), ErrorKind::InvalidArgument, "unknown kind 77"),
        (good[..good.len() - 3].to_vec(), ErrorKind::InvalidArgument, "truncated"),
        (
            [&good[..], &vec![0u8; 2000][..]].concat(),
            ErrorKind::TooLarge,
            "max_packet_bytes",
        ),
        (
            [header(Kind::SyncRequest as u8), vec![1, 2]].concat(),
            ErrorKind::InvalidArgument,
            "sync request: truncated",
        ),
        (
            [header(Kind::SyncResponse as u8), vec![0, 0, 0, 0]].concat(),
            ErrorKind::InvalidArgument,
            "sync response: truncated",
        ),
        (
            [header(Kind::Refused as u8), vec![0]].concat(),
            ErrorKind::InvalidArgument,
            "refusing node's id of 0 bytes",
        ),
    ];
    for (bytes, kind, says) in cases {
        let e = a.handle_message(&bytes).unwrap_err();
        assert_eq!(e.kind(), kind, "{e}");
        assert!(e.to_string().contains(says), "{e} should say {says:?}");
        assert!(a.take_ready().is_empty(), "{e}: nothing to do");
        assert_eq!(a.members(), before, "{e}: nothing changed");
    }
    // A non-announce without a destination.
    let mut ping = good.clone();
    let h = wire::HEADER_BYTES;
    let tag_at = {
        let mut r = wire::Reader::new(&ping[h..]);
        r.bytes(12, "").unwrap();
        r.full(&Directory::new()).unwrap();
        r.u16("").unwrap();
        h + r.pos()
    };
    ping[tag_at] = 9; // Gossip
    ping[h..h + 12].fill(0);
    let e = a.handle_message(&ping).unwrap_err();
    assert!(e.to_string().contains("not an announce"), "{e}");
    assert_eq!(a.stats().messages_refused, 10);
    // The good one is taken.
    a.handle_message(&good).unwrap();
    assert_eq!(a.stats().messages_in, 1);
}

#[test]
fn changes_map_onto_the_member_list() {
    let me = NodeId::from("a");
    let mut view = Membership::with_members(me.clone(), &[Member::new("a", "a:1")], 64, Detector::default()).unwrap();
    let b = Member::new("b", "b:1");
    let joined = MemberChange::Joined {
        member: b.clone(),
        generation: 1,
    };
    let e0 = view.list_epoch();
    assert_eq!(
        apply_change(&mut view, &joined).unwrap(),
        Some(Change::Joined(b.id.clone()))
    );
    assert_eq!(
        apply_change(&mut view, &joined).unwrap(),
        None,
        "a restart at the same addresses moves nothing"
    );
    assert_eq!(view.list_epoch(), e0 + 1);
    let down = |to| MemberChange::Liveness {
        id: b.id.clone(),
        to,
        generation: 1,
    };
    assert!(matches!(
        apply_change(&mut view, &down(Liveness::Suspect)).unwrap(),
        Some(Change::Liveness {
            to: Liveness::Suspect,
            ..
        })
    ));
    assert!(view.is_writable(&b.id), "a suspect is still written to");
    apply_change(&mut view, &down(Liveness::Down)).unwrap();
    assert!(!view.is_writable(&b.id));
    assert_eq!(view.list_epoch(), e0 + 1, "liveness never moves the list's clock");
    let moved = MemberChange::Joined {
        member: Member::new("b", "b:2"),
        generation: 2,
    };
    assert_eq!(
        apply_change(&mut view, &moved).unwrap(),
        Some(Change::Joined(b.id.clone())),
        "re-addressed"
    );
    let left = MemberChange::Left {
        id: b.id.clone(),
        generation: 2,
    };
    assert_eq!(
        apply_change(&mut view, &left).unwrap(),
        Some(Change::Left(b.id.clone()))
    );
    assert_eq!(apply_change(&mut view, &left).unwrap(), None);
    assert_eq!(view.list_epoch(), e0 + 3);
    // A node's own liveness never changes in its view.
    assert_eq!(
        apply_change(
            &mut view,
            &MemberChange::Liveness {
                id: me,
                to: Liveness::Down,
                generation: 1
            }
        )
        .unwrap(),
        None
    );
}

#[test]
fn config_is_validated_and_scales_with_the_cluster() {
    let c = SwimConfig::default();
    assert!(c.validate().is_ok());
    assert_eq!(c.transmissions(3), 4);
    assert_eq!(c.transmissions(200), 12);
    assert_eq!(c.transmissions(1_000), 16);
    assert_eq!(c.transmissions(10_000), 20);
    assert_eq!(c.suspect_timeout(3), Duration::from_secs(2));
    assert_eq!(c.suspect_timeout(10_000), Duration::from_secs(8));
    let bad = SwimConfig {
        probe_rtt_ms: 1000,
        ..SwimConfig::default()
    };
    assert!(bad.validate().unwrap_err().contains("probe_rtt_ms"));
    let fixed = SwimConfig {
        suspect_timeout_ms: 5000,
        ..SwimConfig::default()
    };
    assert_eq!(fixed.suspect_timeout(10_000), Duration::from_secs(5));
    let bad = SwimConfig {
        suspect_timeout_ms: 10,
        ..SwimConfig::default()
    };
    assert!(bad.validate().unwrap_err().contains("suspect_timeout_ms"));
    let bad = SwimConfig {
        max_packet_bytes: 100,
        ..SwimConfig::default()
    };
    assert!(bad.validate().unwrap_err().contains("max_packet_bytes"));
    let e = Swim::new(peer(0), 1, bad, env(), 1, Directory::new()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config);
    let mut p = peer(0);
    p.member.weight = 0.0;
    assert!(Swim::new(p, 1, SwimConfig::default(), env(), 1, Directory::new()).is_err());
    let toml_text = "probe_period_ms = 500\nprobe_rtt_ms = 200\n";
    let c: SwimConfig = toml::from_str(toml_text).unwrap();
    assert_eq!((c.probe_period_ms, c.sync_interval_ms), (500, 30_000));
    assert!(
        toml::from_str::<SwimConfig>("probe_period = 5").is_err(),
        "unknown fields are refused"
    );
}

/// Carries what `nodes` send to each other (by gossip address; what goes
/// elsewhere is lost) until none sends more, for at most 50 rounds;
/// timers are not fired. Answers each refused message's error, with the
/// index of the node that refused it.
fn exchange(nodes: &mut [&mut Swim]) -> Vec<(usize, Error)> {
    let mut errors = Vec::new();
    for _ in 0..50 {
        let mut sends = Vec::new();
        for n in nodes.iter_mut() {
            sends.extend(n.take_ready().sends);
        }
        if sends.is_empty() {
            return errors;
        }
        for out in sends {
            if let Some(i) = nodes.iter().position(|n| n.me().gossip == out.to)
                && let Err(e) = nodes[i].handle_message(&out.bytes)
            {
                errors.push((i, e));
            }
        }
    }
    panic!("still sending after 50 rounds");
}

fn ids(s: &Swim) -> Vec<String> {
    let mut v: Vec<String> = s.members().iter().map(|m| m.peer.member.id.0.clone()).collect();
    v.sort();
    v
}

#[test]
fn a_node_that_places_keys_in_another_slot_count_is_refused_and_told_why() {
    let mut a = Swim::new(peer(0), 1, SwimConfig::default(), env(), 1, Directory::new()).unwrap();
    let mut b = Swim::new(
        peer(1),
        1,
        SwimConfig::default(),
        Envelope::new(128),
        2,
        Directory::new(),
    )
    .unwrap();
    let mut c = Swim::new(peer(2), 1, SwimConfig::default(), env(), 3, Directory::new()).unwrap();
    for n in [&mut a, &mut b, &mut c] {
        n.take_ready();
    }
    b.join(&[peer(0).gossip]);
    c.join(&[peer(0).gossip]);
    let errors = exchange(&mut [&mut a, &mut b, &mut c]);
    assert_eq!(ids(&a), [node_id(0).0, node_id(2).0], "c joined, b did not");
    assert_eq!(ids(&c), [node_id(0).0, node_id(2).0]);
    assert_eq!(ids(&b), [node_id(1).0], "b is alone");
    assert!(!b.joined() && c.joined());
    let (at_a, at_b): (Vec<_>, Vec<_>) = errors.iter().partition(|(i, _)| *i == 0);
    let b_addr = peer(1).gossip;
    assert_eq!(at_a.len(), 2, "b's announce and sync request: {errors:?}");
    for (_, e) in &at_a {
        assert_eq!(e.kind(), ErrorKind::Config, "{e}");
        assert!(
            e.message().contains(&format!(
                "from node {} at {b_addr} refused: it places keys in 128 slots, this node in 64",
                node_id(1)
            )),
            "{e}"
        );
    }
    assert_eq!(at_b.len(), 1, "the refusal of b's sync request: {errors:?}");
    let e = &at_b[0].1;
    assert_eq!(e.kind(), ErrorKind::Config, "{e}");
    assert!(
        e.message().contains(&format!(
            "node {} refuses this node's gossip: it places keys in 64 slots, this node in 128",
            node_id(0)
        )),
        "{e}"
    );
    assert_eq!(a.stats().placement_mismatches, 2);
    assert_eq!(b.stats().placement_mismatches, 1);
    assert_eq!(a.stats().messages_refused + b.stats().messages_refused, 0);

    // b tries again, and is refused again: nothing of it ever reaches a's
    // table, nor a's member changes.
    a.take_ready();
    b.join(&[peer(0).gossip]);
    exchange(&mut [&mut a, &mut b]);
    assert!(a.take_ready().changes.is_empty());
    assert_eq!(ids(&a), [node_id(0).0, node_id(2).0]);
    assert_eq!(b.stats().placement_mismatches, 2);
}

#[test]
fn sealed_gossip_joins_and_a_wrong_key_or_none_is_dropped_unread() {
    let key = || GossipKey::from_token("s3cret");
    let sealed = |i: usize, key: GossipKey| {
        Swim::new(
            peer(i),
            1,
            SwimConfig::default(),
            env().with_key(key),
            i as u64,
            Directory::new(),
        )
        .unwrap()
    };
    let mut a = sealed(0, key());
    let mut b = sealed(1, key());
    let mut other = sealed(2, GossipKey::from_token("other"));
    let mut open = Swim::new(peer(3), 1, SwimConfig::default(), env(), 4, Directory::new()).unwrap();
    for n in [&mut a, &mut b, &mut other, &mut open] {
        n.take_ready();
    }
    b.join(&[peer(0).gossip]);
    other.join(&[peer(0).gossip]);
    open.join(&[peer(0).gossip]);
    let errors = exchange(&mut [&mut a, &mut b, &mut other, &mut open]);
    assert_eq!(ids(&a), [node_id(0).0, node_id(1).0]);
    assert_eq!(ids(&b), [node_id(0).0, node_id(1).0]);
    assert_eq!(ids(&other), [node_id(2).0]);
    assert_eq!(ids(&open), [node_id(3).0]);
    assert!(b.joined() && !other.joined() && !open.joined());
    assert_eq!(errors.len(), 4, "two messages each from other and open: {errors:?}");
    for (i, e) in &errors {
        assert_eq!(*i, 0, "{e}");
        assert_eq!(e.kind(), ErrorKind::Unauthenticated, "{e}");
    }
    assert!(errors.iter().any(|(_, e)| e.message().contains("tag does not verify")));
    assert!(errors.iter().any(|(_, e)| e.message().contains("has no tag")));
    let s = a.stats();
    assert_eq!(
        (s.messages_rejected, s.messages_refused, s.placement_mismatches),
        (4, 0, 0)
    );
    assert!(s.messages_in > 0);

    // A sealed message to a node without a key is dropped too.
    let mut lone = sealed(4, key());
    lone.take_ready();
    lone.join(&[peer(3).gossip]);
    let sent = lone.take_ready().sends;
    assert_eq!(sent.len(), 2);
    for out in sent {
        let e = open.handle_message(&out.bytes).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unauthenticated, "{e}");
        assert!(e.message().contains("this node has none"), "{e}");
    }
    assert_eq!(open.stats().messages_rejected, 2);
    assert_eq!(ids(&open), [node_id(3).0]);
}
