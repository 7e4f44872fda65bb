//! The clients this node reaches its peers with, one per member it has
//! known; members join at run time, so the set grows.
//!
//! Callers borrow a client for as long as they need it, across awaits,
//! without holding a lock: each client is allocated once and never freed
//! (`Box::leak`). A process leaks one client per member it ever learns of
//! (a join or a re-address), which is bounded by the cluster's changes.

use kvtier::replication::placement::{Member, NodeId};
use parking_lot::RwLock;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;
use tokio::sync::Semaphore;

use kvtier_client::{Client, ClientConfig};

/// Replica writes in flight to one peer at most, across all of this
/// node's writes: enough to keep the peer storing one piece while the next
/// ones are on the wire, few enough that a slow peer holds a bounded
/// amount of this node's memory.
pub const REPLICA_WRITES_IN_FLIGHT: usize = 8;

/// One peer: its id, endpoint and client, and the slots of its replica
/// writes in flight.
#[derive(Debug)]
struct Entry {
    id: NodeId,
    endpoint: String,
    client: Client,
    slots: Semaphore,
}

/// Peer clients by member id.
#[derive(Debug)]
pub struct Peers {
    template: ClientConfig,
    scheme: &'static str,
    connect_timeout: Duration,
    /// The address connections leave from (`cluster.source_ip`).
    source: Option<IpAddr>,
    map: RwLock<BTreeMap<NodeId, &'static Entry>>,
}

impl Peers {
    /// No peers yet; clients are built from `template` (token, CA, TLS
    /// name) with `scheme://addr` as the endpoint, connecting from
    /// `source` when set.
    pub(super) fn new(template: ClientConfig, tls: bool, connect_timeout: Duration, source: Option<IpAddr>) -> Self {
        Self {
            template,
            scheme: if tls { "https" } else { "http" },
            connect_timeout,
            source,
            map: RwLock::new(BTreeMap::new()),
        }
    }

    /// Adds a client for `m`, or replaces it when `m` moved to another
    /// address; a client for the same address is kept.
    pub(super) fn insert(&self, m: &Member) -> Result<(), String> {
        let endpoint = format!("{}://{}", self.scheme, m.addr);
        if self.map.read().get(&m.id).is_some_and(|e| e.endpoint == endpoint) {
            return Ok(());
        }
        let cfg = ClientConfig {
            endpoint: endpoint.clone(),
            ..self.template.clone()
        };
        let client = Client::lazy_from(&cfg, self.connect_timeout, self.source)
            .map_err(|e| format!("cluster member {}: {e}", m.id))?;
        let entry: &'static Entry = Box::leak(Box::new(Entry {
            id: m.id.clone(),
            endpoint,
            client,
            slots: Semaphore::new(REPLICA_WRITES_IN_FLIGHT),
        }));
        self.map.write().insert(m.id.clone(), entry);
        Ok(())
    }

    /// The client of `id`; `None` for a node that is no peer, which
    /// callers treat as an unreachable one.
    pub fn get(&self, id: &NodeId) -> Option<&'static Client> {
        self.map.read().get(id).map(|e| &e.client)
    }

    /// The client of `id` with the slots of its replica writes in flight
    /// (at most [`REPLICA_WRITES_IN_FLIGHT`] taken at once).
    pub fn with_slots(&self, id: &NodeId) -> Option<(&'static Client, &'static Semaphore)> {
        self.map.read().get(id).map(|e| (&e.client, &e.slots))
    }

    /// Whether `id` has a client.
    pub fn contains_key(&self, id: &NodeId) -> bool {
        self.map.read().contains_key(id)
    }

    /// Every peer's id, in id order.
    pub fn keys(&self) -> std::vec::IntoIter<&'static NodeId> {
        let v: Vec<&'static NodeId> = self.map.read().values().map(|e| &e.id).collect();
        v.into_iter()
    }
}

impl IntoIterator for &Peers {
    type Item = (&'static NodeId, &'static Client);
    type IntoIter = std::vec::IntoIter<(&'static NodeId, &'static Client)>;

    /// A snapshot of the peers, in id order.
    fn into_iter(self) -> Self::IntoIter {
        let v: Vec<_> = self.map.read().values().map(|e| (&e.id, &e.client)).collect();
        v.into_iter()
    }
}
