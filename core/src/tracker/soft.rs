//! Soft state, kept out of the log: session leases, download grants and
//! partial holders, learned from clients and gossiped between trackers.

use super::*;

/// `soft`'s frames, [`SOFT_BATCH`] items at most in each (a transfer
/// counts as four); merged in any
/// order they make the same state as the whole.
pub(crate) fn soft_frames(mut soft: SoftState) -> Vec<Vec<u8>> {
    fn take<T>(v: &mut Vec<T>, room: &mut usize) -> Vec<T> {
        let n = v.len().min(*room);
        *room -= n;
        v.split_off(v.len() - n)
    }
    let mut frames = Vec::new();
    loop {
        let mut batch = SoftState::default();
        // A transfer (up to about 1.3 KB) takes the room of four items.
        let mut room = super::health::TRANSFER_BATCH;
        batch.transfers = take(&mut soft.transfers, &mut room);
        let mut room = SOFT_BATCH - 4 * batch.transfers.len();
        batch.leases = take(&mut soft.leases, &mut room);
        batch.grants = take(&mut soft.grants, &mut room);
        batch.partial = take(&mut soft.partial, &mut room);
        if batch == SoftState::default() && !frames.is_empty() {
            return frames;
        }
        frames.push(encode(&Message::Tracker(TrackerFrame::Soft(batch))));
    }
}

impl<R: Replicator> TrackerNode<R> {
    pub(crate) fn lease_alive(&self, token: &SessionToken, now: Millis) -> bool {
        self.leases.get(token).is_some_and(|until| *until > now)
    }

    /// Whether a sharer is logged in and its client was heard from lately.
    pub(crate) fn is_live(&self, sharer: &Sharer, now: Millis) -> bool {
        match self.meta.session_at(&sharer.listen) {
            Some((token, s)) => s.user == sharer.user && self.lease_alive(token, now),
            None => false,
        }
    }

    /// Everything we know of the soft state, for a tracker we just reached.
    pub(crate) fn full_soft_state(&self, now: Millis) -> SoftState {
        SoftState {
            leases: self.leases.iter().map(|(t, until)| (*t, until.0.saturating_sub(now.0))).collect(),
            grants: self
                .grants
                .iter()
                .map(|(g, i)| SoftGrant {
                    grant: *g,
                    user: i.user.clone(),
                    key: i.key,
                    group: i.group.clone(),
                    name: i.name.clone(),
                    ttl_ms: i.expires.0.saturating_sub(now.0),
                })
                .collect(),
            partial: self
                .partial
                .iter()
                .flat_map(|((g, n), holders)| holders.iter().map(move |(l, u)| (g.clone(), n.clone(), *l, u.clone())))
                .collect(),
            transfers: self.transfers(now),
        }
    }

    /// Sends what our clients told us since the last gossip to every tracker we reach.
    pub(crate) fn gossip(&mut self, now: Millis) {
        let mut soft = std::mem::take(&mut self.dirty);
        let leases = &self.leases;
        soft.leases = std::mem::take(&mut self.dirty_leases)
            .into_iter()
            .filter_map(|t| leases.get(&t).map(|until| (t, until.0.saturating_sub(now.0))))
            .collect();
        if soft == SoftState::default() || !self.links.any_up() {
            return;
        }
        for batch in soft_frames(soft) {
            self.broadcast(batch);
        }
    }

    /// Soft state from another tracker: kept as if our clients had told us,
    /// within the same bounds.
    pub(crate) fn merge_soft(&mut self, soft: SoftState, now: Millis) {
        for (token, ttl) in soft.leases {
            let until = now.plus(Millis(ttl.min(self.cfg.session_lease.0)));
            if self.meta.session(&token).is_some() {
                let e = self.leases.entry(token).or_insert(until);
                *e = (*e).max(until);
            }
        }
        for g in soft.grants {
            if self.grants.len() >= MAX_GRANTS {
                break;
            }
            let expires = now.plus(Millis(g.ttl_ms.min(GRANT_TTL.0)));
            self.grants.entry(g.grant).or_insert(GrantInfo {
                user: g.user,
                key: g.key,
                group: g.group,
                name: g.name,
                expires,
            });
        }
        for (group, name, listen, user) in soft.partial {
            let holders = self.partial.entry((group, name)).or_default();
            if holders.len() < MAX_PARTIAL_HOLDERS || holders.contains_key(&listen) {
                holders.insert(listen, user);
            }
        }
        for t in soft.transfers {
            if t.sources.len() <= super::health::MAX_PROGRESS_SOURCES && t.done <= t.size {
                self.keep_transfer(t, now);
            }
        }
        if self.next_sweep <= now {
            self.next_sweep = now.plus(SWEEP_EVERY);
        }
    }

    /// Sends a frame on every link that is up.
    pub(super) fn broadcast(&mut self, bytes: Vec<u8>) {
        let up: Vec<NodeId> = self.links.up().collect();
        for node in up {
            self.link_send(node, bytes.clone(), false);
        }
    }

    /// Forgets expired leases and grants, and partial holders whose session is gone.
    pub(super) fn sweep_soft(&mut self, now: Millis) {
        self.leases.retain(|_, until| *until > now);
        self.grants.retain(|_, g| g.expires > now);
        self.transfers.retain(|_, (_, until)| *until > now);
        let meta = &self.meta;
        let leases = &self.leases;
        self.partial.retain(|_, holders| {
            holders.retain(|listen, user| {
                meta.session_at(listen).is_some_and(|(t, s)| s.user == *user && leases.contains_key(t))
            });
            !holders.is_empty()
        });
    }
}
