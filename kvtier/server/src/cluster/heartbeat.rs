//! Heartbeats and namespace registration across members: how this node
//! learns who is up and makes sure every member knows every namespace.

use super::*;

impl Cluster {
    /// Registers `ns` on every peer, in parallel; a peer that does not
    /// answer gets it at its next answered heartbeat.
    pub async fn register_everywhere(&self, ns: NamespaceId) {
        let Some(spec) = self.spec(ns) else { return };
        let mut set = JoinSet::new();
        for (id, c) in &self.peers {
            if !self.view.read().is_writable(id) {
                // Down: it gets the namespace when it answers again.
                self.unsynced.lock().insert(id.clone());
                continue;
            }
            let (id, c, spec, t) = (id.clone(), c.clone(), spec.clone(), self.peer_timeout);
            set.spawn(async move {
                let r = tokio::time::timeout(t, c.replica_register(spec)).await;
                (id, matches!(r, Ok(Ok(()))))
            });
        }
        while let Some(Ok((id, ok))) = set.join_next().await {
            if !ok {
                tracing::warn!(member = %id, namespace = %ns, "namespace not registered on a member: sent again when it answers");
                self.unsynced.lock().insert(id);
            }
        }
    }

    /// Sends every namespace to `id`; marks it unsynced again on failure.
    pub(super) async fn sync_namespaces(self: Arc<Self>, id: NodeId) {
        let Some(c) = self.peers.get(&id) else { return };
        for (ns, _, _) in self.registry.all() {
            let Some(spec) = self.spec(ns) else { continue };
            match tokio::time::timeout(self.peer_timeout, c.replica_register(spec)).await {
                Ok(Ok(())) => {}
                r => {
                    tracing::debug!(member = %id, ?r, "namespace sync failed");
                    self.unsynced.lock().insert(id);
                    return;
                }
            }
        }
    }

    /// Pings every peer each heartbeat interval, feeds the membership,
    /// fetches a newer member list from a peer that has one, sends
    /// namespaces to peers that may lack them and hands hints back to
    /// replicas that are up. An answer from a peer that places keys in
    /// another slot count counts as missed. Runs until aborted.
    pub async fn heartbeats(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if self.mode == MembershipMode::Gossip {
                // Gossip feeds the view; this loop only starts the work
                // that follows from it.
                self.gossip_tick();
                self.after_tick();
                continue;
            }
            let (epoch, slots) = {
                let v = self.view.read();
                (v.epoch(), v.slots())
            };
            let mut set = JoinSet::new();
            for (id, c) in &self.peers {
                let (id, c, me, t) = (id.clone(), c.clone(), self.me.0.clone(), self.peer_timeout);
                set.spawn(async move {
                    let r = tokio::time::timeout(t, c.ping(&me, epoch, slots)).await;
                    (id, r.ok().and_then(Result::ok))
                });
            }
            while let Some(Ok((id, answer))) = set.join_next().await {
                let answer = answer.filter(|p| self.placement_agrees(&id, p.placement_slots).is_ok());
                let ok = answer.is_some();
                if let Some(p) = answer {
                    self.maybe_catch_up(&id, p.members_epoch, p.members_digest);
                }
                let change = {
                    let mut v = self.view.write();
                    if ok {
                        v.heartbeat_ok(&id)
                    } else {
                        v.heartbeat_failed(&id)
                    }
                };
                self.log_change(change);
                if ok && self.unsynced.lock().remove(&id) {
                    self.spawn(self.clone().sync_namespaces(id));
                }
            }
            self.after_tick();
        }
    }

    /// What each tick starts, whatever feeds the view: hint deliveries to
    /// replicas that are up, resyncs, rebalancing.
    fn after_tick(self: &Arc<Self>) {
        if (self.hints.pending() > 0 || self.hints.tombstones() > 0) && !self.delivering.swap(true, Relaxed) {
            let this = self.clone();
            self.spawn(async move {
                // Deletes first: a copy handed back after it is new.
                this.deliver_tombstones().await;
                this.deliver_hints().await;
                this.delivering.store(false, Relaxed);
            });
        }
        self.start_resync();
        self.start_rebalance();
        self.start_strays();
    }
}
