//! A tracker node: client connections in, answers out, metadata in between.
//!
//! [`TrackerNode`] owns the connection-level protocol (framing, `Hello`,
//! request ids), the [`MetaState`], and the soft state that is not replicated
//! (session leases, which decide who shares a file *now*). It turns each
//! write request into a [`Command`], proposes it to its [`Replicator`], and
//! answers the client once the entry is decided and applied. Reads are answered
//! from the local state at once.
//!
//! Calling contract, for the driver:
//! - a new TCP connection: [`TrackerNode::handle_connected`];
//! - bytes received: [`TrackerNode::handle_bytes`] (any split);
//! - the peer hung up or the socket failed: [`TrackerNode::handle_closed`];
//! - when [`TrackerNode::poll_timeout`] passes: [`TrackerNode::handle_timeout`];
//! - an outgoing link to another tracker connected: [`TrackerNode::handle_peer_up`];
//!   it failed or closed: [`TrackerNode::handle_peer_down`] (then redial with backoff);
//! - at start-up, build the replicator from the records of the durable log
//!   (`SoloReplicator::recover`, `OmniReplicator::recover`) and hand it to
//!   [`TrackerNode::new`], which applies what they decided;
//! - after each of those, drain [`TrackerNode::poll_output`] until `None`:
//!   append (or rewrite) `Persist` records to the log and make them durable
//!   before sending any `Transmit` or `PeerSend` marked `after_sync` that
//!   follows them (others may leave while the records are written; keep the
//!   order per connection: once one message on a connection waits, the
//!   later ones on it wait too); close when told (after flushing).
//!
//! With several trackers, writes are answered once decided by a majority;
//! one that is not decided within [`WRITE_DEADLINE`] is answered
//! `NoQuorum` (the client tries another tracker with the same request id,
//! so it is still applied at most once). A tracker answers nothing until it
//! has caught up with the cluster once since it started (`CatchingUp`); from
//! then on it answers reads from its own state even without a majority.
//! Soft state (leases, grants, partial holders) is gossiped to the other
//! trackers once a second, outside the log.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::{IpAddr, SocketAddr};

use crate::client::peer::Grant;
use crate::ids::{FileName, GroupId, SessionToken, UserId};
use crate::meta::{Command, Entry, MetaState, PasswordHash, PasswordParams, Sharer};
use crate::proto::{
    ApiError, Message, Reply, Request, RequestId, Role, SoftGrant, SoftState, TrackerFrame, MAX_PASSWORD_LEN,
    PROTOCOL_VERSION,
};
use crate::rng::Rng;
use crate::time::Millis;
use crate::wire::{encode, FrameDecoder, MAX_CONTROL_FRAME};

pub mod omni;
pub mod replicator;
pub use omni::OmniReplicator;
pub use replicator::{Decided, NodeId, Persist, Replicator, SoloReplicator};

/// A connection, named by the driver. Ids are never reused while open.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnId(pub u64);

#[derive(Clone, Debug)]
pub struct TrackerConfig {
    pub password_params: PasswordParams,
    /// How long a session counts as live without hearing from its client.
    pub session_lease: Millis,
    /// The address each other tracker connects from: a `Join` naming a
    /// tracker is accepted only from its address. Empty: not checked.
    pub peer_ips: BTreeMap<NodeId, IpAddr>,
    /// Emit [`TrackerOutput::Applied`] for every log entry applied (the
    /// simulator checks that trackers agree on them).
    pub report_applied: bool,
}

impl Default for TrackerConfig {
    fn default() -> Self {
        TrackerConfig {
            password_params: PasswordParams::DEFAULT,
            session_lease: Millis::from_secs(15),
            peer_ips: BTreeMap::new(),
            report_applied: false,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TrackerOutput {
    /// Append this record to the durable log. It must be on disk (fsync)
    /// before any `Transmit` that follows it is sent: a client is answered only
    /// about what a restart will not lose. Several records may share one fsync.
    Persist(Persist),
    /// Send to a client. Unless `after_sync`, it need not wait for the
    /// records before it to be durable.
    Transmit { conn: ConnId, bytes: Vec<u8>, after_sync: bool },
    /// Flush what was transmitted to `conn`, then close it.
    Close { conn: ConnId },
    /// Send on this node's own link to tracker `node` (a whole frame).
    /// Unless `after_sync`, it need not wait for the records before it.
    PeerSend { node: NodeId, bytes: Vec<u8>, after_sync: bool },
    /// Who leads changed (for the operator: print it, log it).
    LeaderChanged { leader: Option<NodeId> },
    /// Only with [`TrackerConfig::report_applied`]: log entry `index` (1-based)
    /// was applied; `None` when a snapshot up to `index` was installed.
    Applied { index: u64, entry: Option<Entry> },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Before `Hello`.
    New,
    Client,
    /// Said `Hello` as a tracker; `Join` comes next.
    TrackerHello,
    Tracker(NodeId),
}

struct Conn {
    decoder: FrameDecoder,
    kind: Kind,
    remote: IpAddr,
    opened: Millis,
    last_seen: Millis,
    /// Since when a frame has been arriving without completing.
    partial_since: Option<Millis>,
    /// Writes of this connection proposed and not yet answered.
    in_flight: usize,
}

/// Largest frame before `Hello`: a stranger cannot make the tracker buffer more.
pub const HELLO_FRAME_LIMIT: usize = 1024;
/// A connection that has not said `Hello` by then is closed (half-open, scans).
pub const HELLO_TIMEOUT: Millis = Millis(10_000);
/// A connection silent this long is closed; logged-in clients heartbeat well within it.
pub const IDLE_TIMEOUT: Millis = Millis(120_000);
/// A frame must arrive whole within this time once it started (slow-loris).
pub const FRAME_TIMEOUT: Millis = Millis(30_000);
/// Writes one connection may have waiting for the log at once.
pub const MAX_WRITES_IN_FLIGHT: usize = 32;
/// Failed logins counted per user and per address over [`LOGIN_WINDOW`].
pub const MAX_FAILED_LOGINS_PER_USER: u32 = 5;
pub const MAX_FAILED_LOGINS_PER_ADDR: u32 = 20;
pub const LOGIN_WINDOW: Millis = Millis(60_000);
/// Most users and addresses whose failed logins are tracked at once.
pub const MAX_LOGIN_TRACKED: usize = 10_000;
/// How often connection deadlines and soft state are swept (and soft state gossiped).
const SWEEP_EVERY: Millis = Millis(1_000);
/// A write not decided by then is answered `NoQuorum`.
pub const WRITE_DEADLINE: Millis = Millis(2_000);
/// Largest frame between trackers (a snapshot of the metadata travels in one).
pub const MAX_TRACKER_FRAME: usize = 64 * 1024 * 1024;

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum LoginKey {
    User(UserId),
    Addr(IpAddr),
}

pub struct TrackerNode<R: Replicator = SoloReplicator> {
    cfg: TrackerConfig,
    rng: Rng,
    meta: MetaState,
    replicator: R,
    conns: BTreeMap<ConnId, Conn>,
    /// Writes proposed for a client, answered when applied (or at the deadline).
    waiting: BTreeMap<RequestId, (ConnId, Millis)>,
    /// Other trackers our own links reach now.
    links_up: BTreeSet<NodeId>,
    /// Soft state learned from our clients since the last gossip.
    dirty: SoftState,
    /// Sessions our clients renewed since the last gossip (each told once).
    dirty_leases: BTreeSet<SessionToken>,
    leader: Option<NodeId>,
    /// Soft state: when each session's lease runs out.
    leases: BTreeMap<SessionToken, Millis>,
    out: VecDeque<TrackerOutput>,
    /// Hashed instead of a missing user's, so a failed login costs the same either way.
    decoy: PasswordHash,
    /// Soft state: download grants issued, checked by serving peers.
    grants: BTreeMap<Grant, GrantInfo>,
    /// Soft state: peers holding some chunks of a file they are downloading.
    partial: BTreeMap<(GroupId, FileName), BTreeMap<SocketAddr, UserId>>,
    /// Failed logins: (window start, count) per user and per address.
    login_failures: BTreeMap<LoginKey, (Millis, u32)>,
    next_sweep: Millis,
}

/// How long a download grant stays valid; a downloader asks again for sources
/// (and a fresh grant) every few seconds while it runs.
pub const GRANT_TTL: Millis = Millis(10 * 60 * 1000);
/// Most grants alive at once.
pub const MAX_GRANTS: usize = 100_000;
/// Most partial holders remembered per file.
pub const MAX_PARTIAL_HOLDERS: usize = 1024;

struct GrantInfo {
    user: UserId,
    group: GroupId,
    name: FileName,
    expires: Millis,
}

impl<R: Replicator> TrackerNode<R> {
    /// A node over `replicator`, which may hold a recovered log: what it
    /// decided is applied now.
    pub fn new(cfg: TrackerConfig, mut rng: Rng, replicator: R) -> TrackerNode<R> {
        let mut salt = [0u8; 16];
        rng.fill(&mut salt);
        let decoy = PasswordHash::derive("decoy", salt, cfg.password_params);
        let mut node = TrackerNode {
            cfg,
            rng,
            meta: MetaState::new(),
            replicator,
            conns: BTreeMap::new(),
            waiting: BTreeMap::new(),
            links_up: BTreeSet::new(),
            dirty: SoftState::default(),
            dirty_leases: BTreeSet::new(),
            leader: None,
            leases: BTreeMap::new(),
            out: VecDeque::new(),
            decoy,
            grants: BTreeMap::new(),
            partial: BTreeMap::new(),
            login_failures: BTreeMap::new(),
            next_sweep: Millis::ZERO,
        };
        while let Some(d) = node.replicator.poll_decided() {
            match d {
                Decided::Entry(e) => {
                    let _ = node.meta.apply(&e);
                }
                Decided::Install(state) => node.meta = *state,
            }
        }
        node.leader = node.replicator.leader();
        node
    }

    // ---- getters ----

    pub fn meta(&self) -> &MetaState {
        &self.meta
    }

    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    pub fn replicator(&self) -> &R {
        &self.replicator
    }

    /// Who leads the cluster, as far as this node knows.
    pub fn leader(&self) -> Option<NodeId> {
        self.replicator.leader()
    }

    // ---- inputs ----

    /// A new connection from `remote`.
    pub fn handle_connected(&mut self, conn: ConnId, remote: SocketAddr, now: Millis) {
        let c = Conn {
            decoder: FrameDecoder::new(HELLO_FRAME_LIMIT),
            kind: Kind::New,
            remote: remote.ip(),
            opened: now,
            last_seen: now,
            partial_since: None,
            in_flight: 0,
        };
        self.conns.insert(conn, c);
        if self.next_sweep <= now {
            self.next_sweep = now.plus(SWEEP_EVERY);
        }
    }

    pub fn handle_closed(&mut self, conn: ConnId, _now: Millis) {
        self.conns.remove(&conn);
    }

    /// Our link to tracker `node` is connected: introduce ourselves and
    /// tell it the soft state we know.
    pub fn handle_peer_up(&mut self, node: NodeId, now: Millis) {
        if !self.replicator.peers().contains(&node) {
            return;
        }
        self.links_up.insert(node);
        let hello = Message::Hello { protocol_version: PROTOCOL_VERSION, role: Role::Tracker };
        self.out.push_back(TrackerOutput::PeerSend { node, bytes: encode(&hello), after_sync: false });
        let join = Message::Tracker(TrackerFrame::Join { node: self.replicator.me() });
        self.out.push_back(TrackerOutput::PeerSend { node, bytes: encode(&join), after_sync: false });
        let soft = Message::Tracker(TrackerFrame::Soft(self.full_soft_state(now)));
        self.out.push_back(TrackerOutput::PeerSend { node, bytes: encode(&soft), after_sync: false });
        self.replicator.handle_peer_up(node);
        self.pump(now);
    }

    /// Our link to tracker `node` failed or closed.
    pub fn handle_peer_down(&mut self, node: NodeId, _now: Millis) {
        self.links_up.remove(&node);
    }

    pub fn handle_timeout(&mut self, now: Millis) {
        self.replicator.handle_timeout(now);
        self.pump(now);
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
        self.leases.retain(|_, until| *until > now);
        self.grants.retain(|_, g| g.expires > now);
        let meta = &self.meta;
        let leases = &self.leases;
        // Partial holders whose session is gone are forgotten.
        self.partial.retain(|_, holders| {
            holders.retain(|listen, user| {
                meta.session_at(listen).is_some_and(|(t, s)| s.user == *user && leases.contains_key(t))
            });
            !holders.is_empty()
        });
        let expired: Vec<RequestId> =
            self.waiting.iter().filter(|(_, (_, deadline))| *deadline <= now).map(|(id, _)| *id).collect();
        for id in expired {
            let (conn, _) = self.waiting.remove(&id).expect("listed above");
            tracing::debug!(?id, "write not decided in time");
            self.write_answered(conn);
            self.respond(conn, id, Err(ApiError::NoQuorum));
        }
        self.gossip(now);
    }

    pub fn handle_bytes(&mut self, conn: ConnId, bytes: &[u8], now: Millis) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        c.decoder.push(bytes);
        c.last_seen = now;
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
                            let from_ip = self.cfg.peer_ips.get(node).is_none_or(|ip| *ip == c.remote);
                            (self.replicator.peers().contains(node) && from_ip).then_some(*node)
                        }
                        _ => None,
                    };
                    match ok {
                        Some(node) => {
                            c.kind = Kind::Tracker(node);
                            c.decoder.set_limit(MAX_TRACKER_FRAME);
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

    // ---- outputs ----

    pub fn poll_output(&mut self) -> Option<TrackerOutput> {
        self.out.pop_front()
    }

    /// Connection deadlines, leases, grants and waiting writes are swept
    /// once a second; the replicator has its own ticks.
    pub fn poll_timeout(&self) -> Option<Millis> {
        let busy = !self.conns.is_empty()
            || !self.leases.is_empty()
            || !self.grants.is_empty()
            || !self.login_failures.is_empty()
            || !self.waiting.is_empty();
        let sweep = busy.then_some(self.next_sweep);
        [sweep, self.replicator.poll_timeout()].into_iter().flatten().min()
    }

    // ---- internals ----

    fn refuse(&mut self, conn: ConnId, reason: String) {
        self.conns.remove(&conn);
        self.out.push_back(TrackerOutput::Transmit {
            conn,
            bytes: encode(&Message::Refused { reason }),
            after_sync: false,
        });
        self.out.push_back(TrackerOutput::Close { conn });
    }

    fn respond(&mut self, conn: ConnId, id: RequestId, result: Result<Reply, ApiError>) {
        if self.conns.contains_key(&conn) {
            let bytes = encode(&Message::Response { id, result });
            let after_sync = self.replicator.answers_need_sync();
            self.out.push_back(TrackerOutput::Transmit { conn, bytes, after_sync });
        }
    }

    fn lease_alive(&self, token: &SessionToken, now: Millis) -> bool {
        self.leases.get(token).is_some_and(|until| *until > now)
    }

    /// Whether a sharer is logged in and its client was heard from lately.
    fn is_live(&self, sharer: &Sharer, now: Millis) -> bool {
        match self.meta.session_at(&sharer.listen) {
            Some((token, s)) => s.user == sharer.user && self.lease_alive(token, now),
            None => false,
        }
    }

    fn handle_request(
        &mut self,
        conn: ConnId,
        (id, settled_below): (RequestId, u64),
        session: Option<SessionToken>,
        body: Request,
        now: Millis,
    ) {
        if !self.replicator.is_synced() {
            return self.respond(conn, id, Err(ApiError::CatchingUp));
        }
        // A valid session refreshes its lease, whatever the request.
        let user = session.and_then(|t| self.meta.session(&t).map(|s| (t, s.user.clone(), s.listen)));
        if let Some((t, _, _)) = &user {
            self.leases.insert(*t, now.plus(self.cfg.session_lease));
            if !self.replicator.peers().is_empty() {
                self.dirty_leases.insert(*t);
            }
        }
        let needs_session = !matches!(body, Request::CreateUser { .. } | Request::Login { .. });
        let (token, me, my_listen) = match (needs_session, user) {
            (true, None) => return self.respond(conn, id, Err(ApiError::NotLoggedIn)),
            (true, Some(u)) => u,
            // Placeholders, unused by the two requests that need no session.
            (false, _) => (SessionToken([0; 16]), UserId::new("-").expect("valid id"), unspecified()),
        };
        let cmd = match body {
            Request::CreateUser { user, password } => {
                if password.len() > MAX_PASSWORD_LEN {
                    return self.respond(conn, id, Err(ApiError::PasswordTooLong));
                }
                let mut salt = [0u8; 16];
                self.rng.fill(&mut salt);
                Command::CreateUser { user, password: PasswordHash::derive(&password, salt, self.cfg.password_params) }
            }
            Request::Login { user, password, listen } => {
                let remote = self.conns.get(&conn).map(|c| c.remote);
                let keys = [Some(LoginKey::User(user.clone())), remote.map(LoginKey::Addr)];
                if let Some(wait) = self.login_blocked(&keys, now) {
                    return self.respond(conn, id, Err(ApiError::TooManyAttempts { retry_after_secs: wait }));
                }
                let ok = password.len() <= MAX_PASSWORD_LEN
                    && match self.meta.password_of(&user) {
                        Some(h) => h.verify(&password),
                        None => {
                            self.decoy.verify(&password);
                            false
                        }
                    };
                if !ok {
                    self.login_failed(keys, now);
                    return self.respond(conn, id, Err(ApiError::BadCredentials));
                }
                let mut t = [0u8; 16];
                self.rng.fill(&mut t);
                Command::OpenSession { user, token: SessionToken(t), listen }
            }
            Request::Logout => Command::CloseSession { token },
            Request::Heartbeat => return self.respond(conn, id, Ok(Reply::Done)),
            Request::CreateGroup { group } => Command::CreateGroup { token, group },
            Request::JoinGroup { group } => Command::JoinGroup { token, group },
            Request::LeaveGroup { group } => Command::LeaveGroup { token, group },
            Request::AcceptRequest { group, user } => Command::AcceptRequest { token, group, user },
            Request::RejectRequest { group, user } => Command::RejectRequest { token, group, user },
            Request::UploadFile { group, meta } => Command::AddFile { token, group, meta },
            Request::StopShare { group, name } => Command::StopShare { token, group, name },
            Request::ListGroups => return self.respond(conn, id, Ok(Reply::Groups(self.meta.list_groups()))),
            Request::ListMyGroups => return self.respond(conn, id, Ok(Reply::MyGroups(self.meta.list_my_groups(&me)))),
            Request::ListRequests { group } => {
                let r = self.meta.list_requests(&me, &group).map(Reply::Requests);
                return self.respond(conn, id, r);
            }
            Request::ListFiles { group } => {
                let r = self.meta.list_files(&me, &group, |s| self.is_live(s, now)).map(Reply::Files);
                return self.respond(conn, id, r);
            }
            Request::DownloadFile { group, name } => {
                let r = self.download(&me, my_listen, group, name, now);
                return self.respond(conn, id, r);
            }
            Request::HaveChunk { group, name, chunk } => {
                let r = self.have_chunk(me, my_listen, group, name, chunk);
                return self.respond(conn, id, r);
            }
            Request::CheckGrant { grant, group, name } => {
                let r = match self.grants.get(&grant) {
                    Some(g) if g.expires > now && g.group == group && g.name == name => {
                        match self.meta.group_of_member(&g.user, &group) {
                            Ok(_) => Ok(Reply::GrantValid { user: g.user.clone() }),
                            Err(_) => Err(ApiError::BadGrant),
                        }
                    }
                    _ => Err(ApiError::BadGrant),
                };
                return self.respond(conn, id, r);
            }
        };
        let Some(c) = self.conns.get_mut(&conn) else { return };
        if c.in_flight >= MAX_WRITES_IN_FLIGHT {
            return self.respond(conn, id, Err(ApiError::Limit("too many requests in flight".into())));
        }
        c.in_flight += 1;
        if let Some((old, _)) = self.waiting.insert(id, (conn, now.plus(WRITE_DEADLINE))) {
            // The same request again (a retry on another connection): answer the newest.
            self.write_answered(old);
        }
        self.replicator.propose(Entry { id: Some(id), settled_below, cmd });
        self.pump(now);
    }

    fn write_answered(&mut self, conn: ConnId) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.in_flight = c.in_flight.saturating_sub(1);
        }
    }

    fn handle_tracker_frame(&mut self, conn: ConnId, node: NodeId, msg: Message, now: Millis) {
        match msg {
            Message::Tracker(TrackerFrame::Consensus(bytes)) => {
                if let Err(e) = self.replicator.handle_message(node, &bytes) {
                    tracing::warn!(node, error = %e, "bad consensus message, closing");
                    self.refuse(conn, format!("bad consensus message: {e}"));
                    return;
                }
                self.pump(now);
            }
            Message::Tracker(TrackerFrame::Soft(soft)) => self.merge_soft(soft, now),
            _ => self.refuse(conn, "unexpected message between trackers".into()),
        }
    }

    /// Drains the replicator: records to persist, messages to other
    /// trackers, then decided entries to apply (and answer).
    fn pump(&mut self, now: Millis) {
        loop {
            while let Some(p) = self.replicator.poll_persist() {
                self.out.push_back(TrackerOutput::Persist(p));
            }
            while let Some((node, bytes, after_sync)) = self.replicator.poll_send() {
                if self.links_up.contains(&node) {
                    let bytes = encode(&Message::Tracker(TrackerFrame::Consensus(bytes)));
                    self.out.push_back(TrackerOutput::PeerSend { node, bytes, after_sync });
                }
            }
            let mut applied = false;
            while let Some(d) = self.replicator.poll_decided() {
                applied = true;
                self.apply(d, now);
            }
            if !applied {
                break;
            }
        }
        let leader = self.replicator.leader();
        if leader != self.leader {
            self.leader = leader;
            tracing::info!(?leader, me = self.replicator.me(), "leader changed");
            self.out.push_back(TrackerOutput::LeaderChanged { leader });
        }
    }

    /// Everything we know of the soft state, for a tracker we just reached.
    fn full_soft_state(&self, now: Millis) -> SoftState {
        SoftState {
            leases: self.leases.iter().map(|(t, until)| (*t, until.0.saturating_sub(now.0))).collect(),
            grants: self
                .grants
                .iter()
                .map(|(g, i)| SoftGrant {
                    grant: *g,
                    user: i.user.clone(),
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
        }
    }

    /// Sends what our clients told us since the last gossip to every tracker we reach.
    fn gossip(&mut self, now: Millis) {
        let mut soft = std::mem::take(&mut self.dirty);
        let leases = &self.leases;
        soft.leases = std::mem::take(&mut self.dirty_leases)
            .into_iter()
            .filter_map(|t| leases.get(&t).map(|until| (t, until.0.saturating_sub(now.0))))
            .collect();
        if soft == SoftState::default() || self.links_up.is_empty() {
            return;
        }
        let bytes = encode(&Message::Tracker(TrackerFrame::Soft(soft)));
        for node in &self.links_up {
            self.out.push_back(TrackerOutput::PeerSend { node: *node, bytes: bytes.clone(), after_sync: false });
        }
    }

    /// Soft state from another tracker: kept as if our clients had told us,
    /// within the same bounds.
    fn merge_soft(&mut self, soft: SoftState, now: Millis) {
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
            self.grants.entry(g.grant).or_insert(GrantInfo { user: g.user, group: g.group, name: g.name, expires });
        }
        for (group, name, listen, user) in soft.partial {
            let holders = self.partial.entry((group, name)).or_default();
            if holders.len() < MAX_PARTIAL_HOLDERS || holders.contains_key(&listen) {
                holders.insert(listen, user);
            }
        }
        if self.next_sweep <= now {
            self.next_sweep = now.plus(SWEEP_EVERY);
        }
    }

    /// Seconds to wait if any of `keys` has used up its failed logins.
    fn login_blocked(&self, keys: &[Option<LoginKey>], now: Millis) -> Option<u64> {
        keys.iter()
            .flatten()
            .filter_map(|k| {
                let (start, n) = self.login_failures.get(k)?;
                let max = if matches!(k, LoginKey::User(_)) {
                    MAX_FAILED_LOGINS_PER_USER
                } else {
                    MAX_FAILED_LOGINS_PER_ADDR
                };
                let left = LOGIN_WINDOW.0.saturating_sub(now.since(*start).0);
                (*n >= max && left > 0).then_some(left.div_ceil(1000))
            })
            .max()
    }

    fn login_failed(&mut self, keys: [Option<LoginKey>; 2], now: Millis) {
        for k in keys.into_iter().flatten() {
            if !self.login_failures.contains_key(&k) && self.login_failures.len() >= MAX_LOGIN_TRACKED {
                self.login_failures.retain(|_, (start, _)| now.since(*start) < LOGIN_WINDOW);
                if self.login_failures.len() >= MAX_LOGIN_TRACKED {
                    continue;
                }
            }
            let e = self.login_failures.entry(k).or_insert((now, 0));
            if now.since(e.0) >= LOGIN_WINDOW {
                *e = (now, 0);
            }
            e.1 += 1;
        }
    }

    /// Answers a download: the digest, who holds chunks now, and a grant.
    fn download(
        &mut self,
        me: &UserId,
        my_listen: SocketAddr,
        group: GroupId,
        name: FileName,
        now: Millis,
    ) -> Result<Reply, ApiError> {
        let g = self.meta.group_of_member(me, &group)?;
        let f = g.files.get(&name).ok_or(ApiError::NoSuchFile)?;
        let mut sharers: Vec<SocketAddr> =
            f.sharers.iter().filter(|s| s.listen != my_listen && self.is_live(s, now)).map(|s| s.listen).collect();
        if let Some(partial) = self.partial.get(&(group.clone(), name.clone())) {
            for (listen, user) in partial {
                let s = Sharer { user: user.clone(), listen: *listen };
                if *listen != my_listen && g.is_member(user) && self.is_live(&s, now) && !sharers.contains(listen) {
                    sharers.push(*listen);
                }
            }
        }
        let digest = f.meta.digest.clone();
        if self.grants.len() >= MAX_GRANTS {
            return Err(ApiError::Limit("too many downloads in progress".into()));
        }
        let mut bits = [0u8; 16];
        self.rng.fill(&mut bits);
        let grant = Grant(bits);
        if !self.links_up.is_empty() {
            // Gossiped at once, not with the next sweep: the downloader is
            // about to show it to a peer that checks it with its own tracker.
            let g =
                SoftGrant { grant, user: me.clone(), group: group.clone(), name: name.clone(), ttl_ms: GRANT_TTL.0 };
            let bytes =
                encode(&Message::Tracker(TrackerFrame::Soft(SoftState { grants: vec![g], ..SoftState::default() })));
            for node in &self.links_up {
                self.out.push_back(TrackerOutput::PeerSend { node: *node, bytes: bytes.clone(), after_sync: false });
            }
        }
        self.grants.insert(grant, GrantInfo { user: me.clone(), group, name, expires: now.plus(GRANT_TTL) });
        Ok(Reply::Download { digest, sharers, grant })
    }

    fn have_chunk(
        &mut self,
        me: UserId,
        my_listen: SocketAddr,
        group: GroupId,
        name: FileName,
        chunk: u32,
    ) -> Result<Reply, ApiError> {
        let g = self.meta.group_of_member(&me, &group)?;
        let f = g.files.get(&name).ok_or(ApiError::NoSuchFile)?;
        if chunk as usize >= f.meta.digest.chunks.len() {
            return Err(ApiError::InvalidFile(format!("no chunk {chunk}")));
        }
        let holders = self.partial.entry((group.clone(), name.clone())).or_default();
        if holders.len() >= MAX_PARTIAL_HOLDERS && !holders.contains_key(&my_listen) {
            return Err(ApiError::Limit("too many peers downloading this file".into()));
        }
        if holders.insert(my_listen, me.clone()).is_none() && !self.replicator.peers().is_empty() {
            self.dirty.partial.push((group, name, my_listen, me));
        }
        Ok(Reply::Done)
    }

    fn apply(&mut self, d: Decided, now: Millis) {
        let entry = match d {
            Decided::Entry(e) => e,
            Decided::Install(state) => {
                self.meta = *state;
                if self.cfg.report_applied {
                    self.out.push_back(TrackerOutput::Applied { index: self.meta.applied(), entry: None });
                }
                // Writes we were waiting for may be inside the snapshot.
                let done: Vec<(RequestId, ConnId, Result<Reply, ApiError>)> = self
                    .waiting
                    .iter()
                    .filter_map(|(id, (conn, _))| self.meta.result_of(*id).map(|r| (*id, *conn, r)))
                    .collect();
                for (id, conn, result) in done {
                    self.waiting.remove(&id);
                    self.write_answered(conn);
                    self.respond(conn, id, result);
                }
                return;
            }
        };
        let result = self.meta.apply(&entry);
        if self.cfg.report_applied {
            self.out.push_back(TrackerOutput::Applied { index: self.meta.applied(), entry: Some(entry.clone()) });
        }
        match (&entry.cmd, &result) {
            (Command::OpenSession { token, .. }, Ok(_)) => {
                self.leases.insert(*token, now.plus(self.cfg.session_lease));
            }
            (Command::CloseSession { token }, _) => {
                self.leases.remove(token);
            }
            _ => {}
        }
        if let Some(id) = entry.id {
            if let Some((conn, _)) = self.waiting.remove(&id) {
                self.write_answered(conn);
                self.respond(conn, id, result);
            }
        }
    }
}

fn unspecified() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 0))
}

#[cfg(test)]
mod tests;
