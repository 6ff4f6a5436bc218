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
//! - after each of those, drain [`TrackerNode::poll_output`] until `None`:
//!   transmit bytes in order per connection, close when told (after flushing).

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;

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

    pub fn handle_connected(&mut self, conn: ConnId, _now: Millis) {
        self.conns.insert(conn, Conn { decoder: FrameDecoder::new(MAX_CONTROL_FRAME), greeted: false });
    }

    pub fn handle_closed(&mut self, conn: ConnId, _now: Millis) {
        self.conns.remove(&conn);
    }

    pub fn handle_timeout(&mut self, now: Millis) {
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
        loop {
            let Some(c) = self.conns.get_mut(&conn) else { return };
            let msg = match c.decoder.next_message() {
                Ok(Some(m)) => m,
                Ok(None) => return,
                Err(e) => {
                    tracing::debug!(?conn, error = %e, "bad frame, closing");
                    self.refuse(conn, format!("bad frame: {e}"));
                    return;
                }
            };
            if !c.greeted {
                match msg {
                    Message::Hello { protocol_version: PROTOCOL_VERSION, role: Role::Client } => c.greeted = true,
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

    /// Lease and grant bookkeeping only needs a sweep now and then.
    pub fn poll_timeout(&self) -> Option<Millis> {
        let grants = self.grants.values().map(|g| g.expires).min();
        [self.leases.values().min().copied(), grants].into_iter().flatten().min()
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
                if password.len() > MAX_PASSWORD_LEN {
                    return self.respond(conn, id, Err(ApiError::BadCredentials));
                }
                let ok = match self.meta.password_of(&user) {
                    Some(h) => h.verify(&password),
                    None => {
                        self.decoy.verify(&password);
                        false
                    }
                };
                if !ok {
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
        self.waiting.insert(id, conn);
        self.replicator.propose(Entry { id: Some(id), cmd });
        self.apply_decided(now);
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

    fn apply_decided(&mut self, now: Millis) {
        while let Some(entry) = self.replicator.poll_decided() {
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
