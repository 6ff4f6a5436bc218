//! The tracker node: its state, its inputs and its outputs (see the
//! module docs of [`super`] for the calling contract).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use super::links::Links;
use super::outbox::Outbox;
use super::*;

/// A write proposed for a client, answered when applied (or at its deadline).
pub(crate) struct Waiting {
    pub(crate) conn: ConnId,
    pub(crate) deadline: Millis,
    /// Proposed again when a new leader is named (a proposal forwarded to a
    /// leader over a link that was down is lost; applying one twice is not,
    /// the log remembers each request's result).
    pub(crate) entry: Entry,
}

/// A tracker; see the module docs of [`super`].
pub struct TrackerNode<R: Replicator = SoloReplicator> {
    pub(crate) cfg: TrackerConfig,
    pub(crate) rng: Rng,
    pub(crate) meta: MetaState,
    pub(crate) replicator: R,
    pub(crate) conns: BTreeMap<ConnId, Conn>,
    /// Writes proposed for a client, answered when applied (or at the deadline).
    pub(crate) waiting: BTreeMap<RequestId, Waiting>,
    /// Failed logins waiting for their barrier to be applied (by its tag),
    /// with their deadlines; and the last barrier's number.
    pub(crate) held_logins: BTreeMap<RequestId, (super::requests::HeldLogin, Millis)>,
    pub(crate) next_barrier: u64,
    /// Logins and new accounts whose password is being hashed off the loop,
    /// by job ticket.
    pub(crate) passwords: BTreeMap<u64, super::requests::PendingPassword>,
    /// The replicator's term when last looked at.
    pub(crate) term: u64,
    /// Our links to the other trackers, and what we heard on theirs.
    pub(crate) links: Links,
    /// Soft state learned from our clients since the last gossip.
    pub(crate) dirty: SoftState,
    /// Sessions our clients renewed since the last gossip (each told once).
    pub(crate) dirty_leases: BTreeSet<SessionToken>,
    pub(crate) leader: Option<NodeId>,
    /// Soft state: when each session's lease runs out.
    pub(crate) leases: BTreeMap<SessionToken, Millis>,
    pub(crate) outbox: Outbox,
    /// The latest `now` an input brought.
    pub(crate) now: Millis,
    /// Hashed instead of a missing user's, so a failed login costs the same either way.
    pub(crate) decoy: PasswordHash,
    /// Soft state: download grants issued, checked by serving peers.
    pub(crate) grants: BTreeMap<Grant, GrantInfo>,
    /// Soft state: peers holding some chunks of a file they are downloading.
    pub(crate) partial: BTreeMap<(GroupId, FileName), BTreeMap<SocketAddr, UserId>>,
    /// Failed logins: (window start, count) per user and per address.
    pub(crate) login_failures: BTreeMap<LoginKey, (Millis, u32)>,
    pub(crate) next_sweep: Millis,
    /// Chunk-list ranges: what our store holds, pushes, loads and asks.
    pub(crate) ranges: super::ranges::Ranges,
    /// Big consensus messages in parts, both ways.
    pub(crate) streams: super::stream::Streams,
    /// What this tracker did, for its operator.
    pub(crate) counters: super::health::Counters,
    /// Latencies of writes decided since the driver last took them.
    pub(crate) latencies: Vec<u64>,
    /// What each other tracker last told of itself, and when.
    pub(crate) peer_health: BTreeMap<NodeId, (super::health::Health, Millis)>,
    /// Soft state: transfers clients reported, by downloader and file, with
    /// when each report runs out.
    pub(crate) transfers: BTreeMap<(SocketAddr, GroupId, FileName), (super::health::Transfer, Millis)>,
}

impl<R: Replicator> TrackerNode<R> {
    /// A node over `replicator`, which may hold a recovered log: what it
    /// decided is applied now.
    pub fn new(cfg: TrackerConfig, mut rng: Rng, replicator: R) -> TrackerNode<R> {
        let (mut salt, mut hash) = ([0u8; 16], [0u8; 32]);
        rng.fill(&mut salt);
        rng.fill(&mut hash);
        let decoy = PasswordHash::decoy(salt, hash, cfg.password_params);
        let links = Links::new(replicator.peers());
        // Barriers of an earlier run of this tracker may still be in the log.
        let next_barrier = rng.next_u64() >> 1;
        let mut node = TrackerNode {
            cfg,
            rng,
            meta: MetaState::new(),
            replicator,
            conns: BTreeMap::new(),
            waiting: BTreeMap::new(),
            held_logins: BTreeMap::new(),
            next_barrier,
            passwords: BTreeMap::new(),
            term: 0,
            links,
            dirty: SoftState::default(),
            dirty_leases: BTreeSet::new(),
            leader: None,
            leases: BTreeMap::new(),
            outbox: Outbox::default(),
            now: Millis::ZERO,
            decoy,
            grants: BTreeMap::new(),
            partial: BTreeMap::new(),
            login_failures: BTreeMap::new(),
            next_sweep: Millis::ZERO,
            ranges: Default::default(),
            streams: Default::default(),
            counters: Default::default(),
            latencies: Vec::new(),
            peer_health: BTreeMap::new(),
            transfers: BTreeMap::new(),
        };
        while let Some(d) = node.replicator.poll_decided() {
            match d {
                Decided::Entry(e) => {
                    let _ = node.meta.apply(&e);
                }
                Decided::Install(state) => node.meta = *state,
            }
        }
        node.leader = node.named_leader();
        node
    }

    // ---- getters ----

    // ---- getters ----

    pub fn meta(&self) -> &MetaState {
        &self.meta
    }

    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Whether this node holds `grant` (issued here or gossiped by a tracker).
    pub fn knows_grant(&self, grant: &Grant) -> bool {
        self.grants.contains_key(grant)
    }

    pub fn replicator(&self) -> &R {
        &self.replicator
    }

    /// Who leads the cluster, as far as this node knows: none while it does
    /// not reach a majority (see [`super::links`]).
    pub fn leader(&self) -> Option<NodeId> {
        self.leader
    }

    /// The leader consensus names, if this node reaches a majority.
    pub(crate) fn named_leader(&self) -> Option<NodeId> {
        self.replicator.leader().filter(|_| self.links.quorum(self.now))
    }

    // ---- inputs ----

    // ---- inputs ----

    /// A new connection from `remote`.
    pub fn handle_connected(&mut self, conn: ConnId, remote: SocketAddr, now: Millis) {
        self.now = self.now.max(now);
        let c = Conn {
            decoder: FrameDecoder::new(HELLO_FRAME_LIMIT),
            kind: Kind::New,
            remote: remote.ip(),
            opened: now,
            last_seen: now,
            partial_since: None,
            in_flight: 0,
            key: None,
        };
        self.conns.insert(conn, c);
        if self.next_sweep <= now {
            self.next_sweep = now.plus(SWEEP_EVERY);
        }
    }

    /// The other end of `conn` proved it holds `key` (its TLS handshake is
    /// done). Reported before any of its bytes.
    pub fn handle_secured(&mut self, conn: ConnId, key: KeyId, now: Millis) {
        self.now = self.now.max(now);
        if let Some(c) = self.conns.get_mut(&conn) {
            c.key = Some(key);
        }
    }

    /// The operator's files name `key` as tracker `node`'s (a key pinned in
    /// the configuration is kept).
    pub fn learn_peer_key(&mut self, node: NodeId, key: KeyId) {
        if self.replicator.peers().contains(&node) {
            self.cfg.peer_keys.entry(node).or_insert(key);
        }
    }

    /// The peers whose keys this node does not know yet.
    pub fn unknown_peer_keys(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.replicator.peers().iter().copied().filter(|n| !self.cfg.peer_keys.contains_key(n))
    }

    pub fn handle_closed(&mut self, conn: ConnId, now: Millis) {
        self.now = self.now.max(now);
        self.conns.remove(&conn);
        self.outbox.forget_conn(conn);
        self.streams_conn_closed(conn);
    }

    pub fn handle_timeout(&mut self, now: Millis) {
        self.now = self.now.max(now);
        self.replicator.handle_timeout(now);
        let silent = self.links_timeout(now);
        self.streams_timeout(now);
        let dead: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| matches!(c.kind, Kind::Tracker(n) if silent.contains(&n)))
            .map(|(id, _)| *id)
            .collect();
        for conn in dead {
            tracing::debug!(?conn, "a tracker's link to us fell silent; closing it");
            self.refuse(conn, "silent past the link deadline".into());
        }
        self.pump(now);
        if !self.waiting.is_empty() && !self.links.quorum(now) {
            // Cut off from the majority: what waits cannot be decided here
            // now; its clients are better off at another tracker at once
            // (a retry there carries the same request id).
            self.answer_waiting(|_| true);
        }
        if now < self.next_sweep {
            return;
        }
        self.next_sweep = now.plus(SWEEP_EVERY);
        let overdue: Vec<(ConnId, &'static str)> = self
            .conns
            .iter()
            .filter_map(|(id, c)| {
                let greeted = matches!(c.kind, Kind::Client | Kind::Tracker(_));
                let why = if !greeted && now.since(c.opened) >= HELLO_TIMEOUT {
                    "no Hello in time"
                } else if c.partial_since.is_some_and(|t| now.since(t) >= FRAME_TIMEOUT) {
                    "a frame took too long to arrive"
                } else if now.since(c.last_seen) >= IDLE_TIMEOUT {
                    "idle for too long"
                } else {
                    return None;
                };
                Some((*id, why))
            })
            .collect();
        for (conn, why) in overdue {
            tracing::debug!(?conn, why, "closing connection");
            self.refuse(conn, why.into());
        }
        self.login_failures.retain(|_, (start, _)| now.since(*start) < LOGIN_WINDOW);
        self.sweep_soft(now);
        self.answer_waiting(|deadline| deadline <= now);
        self.expire_barriers(now);
        self.sweep_ranges(now);
        self.gossip(now);
        self.send_health(now);
    }

    /// Proposes the writes still waiting again: to the leader just named,
    /// or over a link to it that just came up.
    pub(crate) fn repropose(&mut self) {
        if self.waiting.is_empty() {
            return;
        }
        let entries: Vec<Entry> = self.waiting.values().map(|w| w.entry.clone()).collect();
        tracing::debug!(writes = entries.len(), "proposing the waiting writes again");
        for e in entries {
            self.replicator.propose(e);
        }
        self.pump(self.now);
    }

    /// Answers `NoQuorum` to the writes waiting whose deadline passes `due`.
    fn answer_waiting(&mut self, due: impl Fn(Millis) -> bool) {
        let expired: Vec<RequestId> = self.waiting.iter().filter(|(_, w)| due(w.deadline)).map(|(id, _)| *id).collect();
        for id in expired {
            let Some(Waiting { conn, .. }) = self.waiting.remove(&id) else { continue };
            tracing::debug!(?id, "write not decided in time");
            self.write_answered(conn);
            self.respond(conn, id, Err(ApiError::NoQuorum));
        }
    }

    pub fn handle_bytes(&mut self, conn: ConnId, bytes: &[u8], now: Millis) {
        self.now = self.now.max(now);
        let Some(c) = self.conns.get_mut(&conn) else { return };
        c.decoder.push(bytes);
        c.last_seen = now;
        if let Kind::Tracker(node) = c.kind {
            self.links.heard_in(node, now);
        }
        loop {
            let Some(c) = self.conns.get_mut(&conn) else { return };
            let msg = match c.decoder.next_message() {
                Ok(Some(m)) => m,
                Ok(None) => {
                    c.partial_since =
                        if c.decoder.buffered() > 0 { Some(c.partial_since.unwrap_or(now)) } else { None };
                    return;
                }
                Err(e) => {
                    tracing::debug!(?conn, error = %e, "bad frame, closing");
                    self.refuse(conn, format!("bad frame: {e}"));
                    return;
                }
            };
            match c.kind {
                Kind::Client => {}
                Kind::Tracker(node) => {
                    self.handle_tracker_frame(conn, node, msg, now);
                    continue;
                }
                Kind::TrackerHello => {
                    let ok = match &msg {
                        Message::Tracker(TrackerFrame::Join { node }) => {
                            // Known by key, not by address: the connection
                            // must have proved the key that node holds.
                            let proved = c.key.is_some() && self.cfg.peer_keys.get(node) == c.key.as_ref();
                            if !proved {
                                tracing::warn!(
                                    node,
                                    from = %c.remote,
                                    key = %c.key.map_or("none".to_string(), |k| k.to_string()),
                                    "refused a link claiming to be a tracker: its key is not that tracker's"
                                );
                            }
                            (self.replicator.peers().contains(node) && proved).then_some(*node)
                        }
                        _ => None,
                    };
                    match ok {
                        Some(node) => {
                            c.kind = Kind::Tracker(node);
                            c.decoder.set_limit(MAX_TRACKER_FRAME);
                            self.links.heard_in(node, now);
                            // Its link to us is new: what it sent before may
                            // be lost. omnipaxos resyncs a follower from its
                            // leader when told of a reconnection.
                            self.replicator.handle_peer_up(node);
                            self.pump(now);
                        }
                        None => {
                            self.refuse(conn, "not a tracker of this cluster".into());
                            return;
                        }
                    }
                    continue;
                }
                Kind::New => match msg {
                    Message::Hello { protocol_version: PROTOCOL_VERSION, role: Role::Client } => {
                        c.kind = Kind::Client;
                        c.decoder.set_limit(MAX_CONTROL_FRAME);
                        continue;
                    }
                    Message::Hello { protocol_version: PROTOCOL_VERSION, role: Role::Tracker }
                        if !self.replicator.peers().is_empty() =>
                    {
                        c.kind = Kind::TrackerHello;
                        continue;
                    }
                    Message::Hello { protocol_version, role } => {
                        self.refuse(
                            conn,
                            format!("unsupported hello: protocol {protocol_version} as {role:?} (this tracker speaks {PROTOCOL_VERSION} to clients)"),
                        );
                        return;
                    }
                    _ => {
                        self.refuse(conn, "the first message must be Hello".into());
                        return;
                    }
                },
            }
            match msg {
                Message::Request { id, settled_below, session, body } => {
                    self.handle_request(conn, (id, settled_below), session, body, now)
                }
                other => {
                    tracing::debug!(?conn, "unexpected {:?}", std::mem::discriminant(&other));
                    self.refuse(conn, "clients may only send requests".into());
                    return;
                }
            }
        }
    }

    /// The driver made every record up to sync `seq` ([`TrackerOutput::Sync`])
    /// durable: what waited for them goes out.
    pub fn handle_synced(&mut self, seq: u64, now: Millis) {
        self.now = self.now.max(now);
        self.outbox.synced(seq);
    }

    // ---- outputs ----

    /// The next output, in order; `None` once the step's outputs are out.
    pub fn poll_output(&mut self) -> Option<TrackerOutput> {
        self.outbox.pop()
    }

    /// Connection deadlines, leases, grants and waiting writes are swept
    /// once a second; the replicator has its own ticks, links their
    /// heartbeats and deadlines.
    pub fn poll_timeout(&self) -> Option<Millis> {
        let busy = !self.conns.is_empty()
            || !self.leases.is_empty()
            || !self.grants.is_empty()
            || !self.login_failures.is_empty()
            || !self.waiting.is_empty()
            || !self.held_logins.is_empty()
            || !self.transfers.is_empty()
            || self.ranges_busy();
        let sweep = busy.then_some(self.next_sweep);
        [sweep, self.replicator.poll_timeout(), self.links.deadline()].into_iter().flatten().min()
    }

    // ---- internals ----

    // ---- internals ----

    pub(crate) fn refuse(&mut self, conn: ConnId, reason: String) {
        self.counters.connections_refused += 1;
        self.conns.remove(&conn);
        self.streams_conn_closed(conn);
        self.outbox.send(TrackerOutput::Transmit { conn, bytes: encode(&Message::Refused { reason }) }, false);
        self.outbox.send(TrackerOutput::Close { conn }, false);
    }

    pub(crate) fn respond(&mut self, conn: ConnId, id: RequestId, result: Result<Reply, ApiError>) {
        if let Err(e) = &result {
            self.count_refusal(e);
        }
        let after_sync = self.replicator.answers_need_sync();
        self.send_response(conn, id, result, after_sync);
    }

    /// Sends an answer on `conn` (if still open), after the next sync if `after_sync`.
    pub(crate) fn send_response(
        &mut self,
        conn: ConnId,
        id: RequestId,
        result: Result<Reply, ApiError>,
        after_sync: bool,
    ) {
        if self.conns.contains_key(&conn) {
            let bytes = reply_bytes(id, result);
            self.outbox.send(TrackerOutput::Transmit { conn, bytes }, after_sync);
        }
    }

    pub(crate) fn handle_tracker_frame(&mut self, conn: ConnId, node: NodeId, msg: Message, now: Millis) {
        match msg {
            Message::Tracker(TrackerFrame::Consensus(bytes)) => self.handle_consensus(conn, node, bytes, None),
            Message::Tracker(TrackerFrame::Soft(soft)) => self.merge_soft(soft, now),
            Message::Tracker(TrackerFrame::ConsensusPart { xfer, last, bytes }) => {
                self.handle_consensus_part(conn, node, (xfer, last, bytes))
            }
            Message::Tracker(TrackerFrame::ConsensusAck { bytes, .. }) => self.handle_consensus_ack(node, bytes),
            Message::Tracker(TrackerFrame::ConsensusOffer { xfer, base, base_len, len }) => {
                self.handle_consensus_offer(conn, node, (xfer, base, base_len, len))
            }
            Message::Tracker(TrackerFrame::ConsensusResume { xfer, from }) => {
                self.handle_consensus_resume(node, xfer, from)
            }
            Message::Tracker(
                f @ (TrackerFrame::Range(_) | TrackerFrame::RangeStored(_) | TrackerFrame::RangeWanted(_)),
            ) => self.handle_range_frame(node, f, now),
            Message::Tracker(TrackerFrame::Health(h)) => {
                self.peer_health.insert(node, (h, now));
            }
            Message::Tracker(TrackerFrame::Ping) => {
                let pong = encode(&Message::Tracker(TrackerFrame::Pong));
                self.outbox.send_now(TrackerOutput::Transmit { conn, bytes: pong });
            }
            _ => self.refuse(conn, "unexpected message between trackers".into()),
        }
    }

    /// Drains the replicator: records to persist, messages to other
    /// trackers, then decided entries to apply (and answer).
    pub(crate) fn pump(&mut self, now: Millis) {
        loop {
            while let Some(p) = self.replicator.poll_persist() {
                self.outbox.push(TrackerOutput::Persist(p));
            }
            while let Some((node, out, after_sync)) = self.replicator.poll_send() {
                self.send_outbound(node, out, after_sync);
            }
            let mut applied = false;
            while let Some(d) = self.replicator.poll_decided() {
                applied = true;
                self.apply(d, now);
            }
            if !applied {
                if self.replicator.snapshot_due() {
                    // Its records go out on the next turn.
                    self.replicator.take_snapshot(&self.meta);
                    continue;
                }
                break;
            }
        }
        let term = self.replicator.term();
        if term != self.term {
            // A new ballot: what this node proposed or forwarded before may
            // have been dropped with the old one.
            self.term = term;
            self.repropose();
        }
        let leader = self.named_leader();
        if leader != self.leader {
            self.leader = leader;
            self.counters.leader_changes += 1;
            tracing::info!(?leader, me = self.replicator.me(), "leader changed");
            self.outbox.push(TrackerOutput::LeaderChanged { leader });
            if leader.is_some() {
                self.repropose();
            }
        }
    }

    pub(crate) fn apply(&mut self, d: Decided, now: Millis) {
        let entry = match d {
            Decided::Entry(e) => e,
            Decided::Install(state) => {
                self.meta = *state;
                if self.cfg.report_applied {
                    self.outbox.push(TrackerOutput::Applied { index: self.meta.applied(), entry: None });
                }
                self.want_missing_ranges();
                // Writes we were waiting for may be inside the snapshot.
                let done: Vec<(RequestId, ConnId, Result<Reply, ApiError>)> = self
                    .waiting
                    .iter()
                    .filter_map(|(id, w)| self.meta.result_of(*id).map(|r| (*id, w.conn, r)))
                    .collect();
                for (id, conn, result) in done {
                    self.waiting.remove(&id);
                    self.write_answered(conn);
                    self.respond(conn, id, result);
                }
                return;
            }
        };
        let at_stake = self.ranges_at_stake(&entry.cmd);
        let result = self.meta.apply(&entry);
        self.ranges_applied(&entry.cmd, at_stake, now);
        if self.cfg.report_applied {
            self.outbox.push(TrackerOutput::Applied { index: self.meta.applied(), entry: Some(entry.clone()) });
        }
        match (&entry.cmd, &result) {
            (Command::OpenSession { token, .. } | Command::OpenSessionAt { token, .. }, Ok(_)) => {
                self.leases.insert(*token, now.plus(self.cfg.session_lease));
            }
            (Command::CloseSession { token }, _) => {
                self.leases.remove(token);
            }
            (Command::AddFile { group, file, .. }, Ok(_)) => self.want_ranges_of(group, &file.name),
            _ => {}
        }
        if let Some(id) = entry.id {
            if let Some(Waiting { conn, deadline, .. }) = self.waiting.remove(&id) {
                self.write_answered(conn);
                self.count_write(Millis(deadline.0.saturating_sub(WRITE_DEADLINE.0)));
                self.respond(conn, id, result);
            }
            if matches!(entry.cmd, Command::Noop) {
                self.barrier_passed(id, now);
            }
        }
    }
}

/// A response frame; one too big for a client to read is `limit reached` instead.
fn reply_bytes(id: RequestId, result: Result<Reply, ApiError>) -> Vec<u8> {
    let bytes = encode(&Message::Response { id, result });
    if bytes.len() > crate::wire::MAX_REPLY_FRAME {
        let e = format!(
            "the answer would be {} bytes, over the {} a client reads",
            bytes.len(),
            crate::wire::MAX_REPLY_FRAME
        );
        return encode(&Message::Response { id, result: Err(ApiError::Limit(e)) });
    }
    bytes
}
