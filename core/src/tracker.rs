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
//! - at start-up, [`TrackerNode::restore`] each record of the durable log;
//! - after each of those, drain [`TrackerNode::poll_output`] until `None`:
//!   append `Persist` records to the log and make them durable before sending
//!   any `Transmit` that follows them; transmit bytes in order per connection;
//!   close when told (after flushing).

use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, SocketAddr};

use crate::ids::{FileName, GroupId, SessionToken, UserId};
use crate::meta::{Command, Entry, MetaState, PasswordHash, PasswordParams, Sharer};
use crate::peer::Grant;
use crate::proto::{ApiError, Message, Reply, Request, RequestId, Role, MAX_PASSWORD_LEN, PROTOCOL_VERSION};
use crate::rng::Rng;
use crate::time::Millis;
use crate::wire::{encode, FrameDecoder, MAX_CONTROL_FRAME};

pub mod replicator;
pub use replicator::{Replicator, SoloReplicator};

/// A connection, named by the driver. Ids are never reused while open.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnId(pub u64);

#[derive(Clone, Debug)]
pub struct TrackerConfig {
    pub password_params: PasswordParams,
    /// How long a session counts as live without hearing from its client.
    pub session_lease: Millis,
}

impl Default for TrackerConfig {
    fn default() -> Self {
        TrackerConfig { password_params: PasswordParams::DEFAULT, session_lease: Millis::from_secs(15) }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TrackerOutput {
    /// Append this record to the durable log. It must be on disk (fsync)
    /// before any `Transmit` that follows it is sent: a client is answered only
    /// about what a restart will not lose. Several records may share one fsync.
    Persist {
        record: Vec<u8>,
    },
    Transmit {
        conn: ConnId,
        bytes: Vec<u8>,
    },
    /// Flush what was transmitted to `conn`, then close it.
    Close {
        conn: ConnId,
    },
}

struct Conn {
    decoder: FrameDecoder,
    greeted: bool,
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
/// How often connection deadlines and soft state are swept.
const SWEEP_EVERY: Millis = Millis(1_000);

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
    /// Writes proposed for a client, answered when applied.
    waiting: BTreeMap<RequestId, ConnId>,
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
    pub fn new(cfg: TrackerConfig, mut rng: Rng, replicator: R) -> TrackerNode<R> {
        let mut salt = [0u8; 16];
        rng.fill(&mut salt);
        let decoy = PasswordHash::derive("decoy", salt, cfg.password_params);
        TrackerNode {
            cfg,
            rng,
            meta: MetaState::new(),
            replicator,
            conns: BTreeMap::new(),
            waiting: BTreeMap::new(),
            leases: BTreeMap::new(),
            out: VecDeque::new(),
            decoy,
            grants: BTreeMap::new(),
            partial: BTreeMap::new(),
            login_failures: BTreeMap::new(),
            next_sweep: Millis::ZERO,
        }
    }

    // ---- getters ----

    pub fn meta(&self) -> &MetaState {
        &self.meta
    }

    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    // ---- inputs ----

    /// A new connection from `remote`.
    pub fn handle_connected(&mut self, conn: ConnId, remote: SocketAddr, now: Millis) {
        let c = Conn {
            decoder: FrameDecoder::new(HELLO_FRAME_LIMIT),
            greeted: false,
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

    pub fn handle_timeout(&mut self, now: Millis) {
        if now < self.next_sweep {
            return;
        }
        self.next_sweep = now.plus(SWEEP_EVERY);
        let overdue: Vec<(ConnId, &'static str)> = self
            .conns
            .iter()
            .filter_map(|(id, c)| {
                let why = if !c.greeted && now.since(c.opened) >= HELLO_TIMEOUT {
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
            if !c.greeted {
                match msg {
                    Message::Hello { protocol_version: PROTOCOL_VERSION, role: Role::Client } => {
                        c.greeted = true;
                        c.decoder.set_limit(MAX_CONTROL_FRAME);
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
                }
                continue;
            }
            match msg {
                Message::Request { id, session, body } => self.handle_request(conn, id, session, body, now),
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

    /// Connection deadlines, leases and grants are swept once a second.
    pub fn poll_timeout(&self) -> Option<Millis> {
        let busy = !self.conns.is_empty()
            || !self.leases.is_empty()
            || !self.grants.is_empty()
            || !self.login_failures.is_empty();
        busy.then_some(self.next_sweep)
    }

    // ---- internals ----

    fn refuse(&mut self, conn: ConnId, reason: String) {
        self.conns.remove(&conn);
        self.out.push_back(TrackerOutput::Transmit { conn, bytes: encode(&Message::Refused { reason }) });
        self.out.push_back(TrackerOutput::Close { conn });
    }

    fn respond(&mut self, conn: ConnId, id: RequestId, result: Result<Reply, ApiError>) {
        if self.conns.contains_key(&conn) {
            self.out.push_back(TrackerOutput::Transmit { conn, bytes: encode(&Message::Response { id, result }) });
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
        id: RequestId,
        session: Option<SessionToken>,
        body: Request,
        now: Millis,
    ) {
        // A valid session refreshes its lease, whatever the request.
        let user = session.and_then(|t| self.meta.session(&t).map(|s| (t, s.user.clone(), s.listen)));
        if let Some((t, _, _)) = &user {
            self.leases.insert(*t, now.plus(self.cfg.session_lease));
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
        self.waiting.insert(id, conn);
        self.replicator.propose(Entry { id: Some(id), cmd });
        self.apply_decided(now);
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
        let holders = self.partial.entry((group, name)).or_default();
        if holders.len() >= MAX_PARTIAL_HOLDERS && !holders.contains_key(&my_listen) {
            return Err(ApiError::Limit("too many peers downloading this file".into()));
        }
        holders.insert(my_listen, me);
        Ok(Reply::Done)
    }

    /// Replays one record of the durable log (see [`TrackerOutput::Persist`])
    /// at start-up, before any connection.
    pub fn restore(&mut self, record: &[u8]) -> Result<(), crate::wire::FrameError> {
        let entry: Entry = crate::wire::decode(record)?;
        let _ = self.meta.apply(&entry);
        Ok(())
    }

    fn apply_decided(&mut self, now: Millis) {
        while let Some(entry) = self.replicator.poll_decided() {
            let record = postcard::to_allocvec(&entry).expect("postcard encoding into a Vec");
            self.out.push_back(TrackerOutput::Persist { record });
            let result = self.meta.apply(&entry);
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
                if let Some(conn) = self.waiting.remove(&id) {
                    if let Some(c) = self.conns.get_mut(&conn) {
                        c.in_flight = c.in_flight.saturating_sub(1);
                    }
                    self.respond(conn, id, result);
                }
            }
        }
    }
}

fn unspecified() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 0))
}

#[cfg(test)]
mod tests;
