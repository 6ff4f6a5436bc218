//! The tracker's metadata: accounts, sessions, groups, membership, shared files.
//!
//! [`MetaState`] is a deterministic state machine. Trackers replicate it by
//! applying the same [`Entry`] sequence in the same order ([`MetaState::apply`]);
//! two states that applied the same entries are equal, field for field. Reads
//! (the `list_*`/`*_of` methods) never change it.
//!
//! Everything a command needs that is random or slow (salts, password hashes,
//! session tokens) is computed by the tracker node *before* proposing and
//! travels inside the command, so applying stays cheap and deterministic.

use imbl::{OrdMap, OrdSet};
use std::net::SocketAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::chunk::{FileRecord, Sha1Digest};
use crate::identity::KeyId;
use crate::ids::{FileName, GroupId, SessionToken, UserId};
use crate::proto::{ApiError, FileSummary, GroupSummary, MyGroup, Reply, RequestId};

/// Most files one group may list.
pub const MAX_FILES_PER_GROUP: usize = 10_000;
/// Most clients whose write results are remembered for retries.
pub const MAX_REMEMBERED_CLIENTS: usize = 100_000;
/// Most results remembered per client: its writes applied and not yet
/// settled (answered, as far as the client has told). A client keeps far
/// fewer in flight ([`crate::tracker::MAX_WRITES_IN_FLIGHT`] per connection).
pub const MAX_RESULTS_PER_CLIENT: usize = 64;

/// Argon2id cost. Production uses [`PasswordParams::DEFAULT`]; tests and the
/// simulator may choose a cheaper one. The parameters travel with each hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PasswordParams {
    pub m_kib: u32,
    pub t_cost: u32,
}

impl PasswordParams {
    /// OWASP's recommendation for argon2id: 19 MiB, 2 passes, 1 lane.
    pub const DEFAULT: PasswordParams = PasswordParams { m_kib: 19 * 1024, t_cost: 2 };
    /// The smallest argon2 allows; only for tests and simulation.
    pub const INSECURE_FAST: PasswordParams = PasswordParams { m_kib: 8, t_cost: 1 };
}

/// A salted argon2id password hash.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PasswordHash {
    salt: [u8; 16],
    hash: [u8; 32],
    params: PasswordParams,
}

impl std::fmt::Debug for PasswordHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PasswordHash(<redacted>)")
    }
}

impl PasswordHash {
    pub fn derive(password: &str, salt: [u8; 16], params: PasswordParams) -> PasswordHash {
        PasswordHash { salt, hash: argon2id(password, &salt, params), params }
    }

    /// A hash for no known password (`hash` is random): checking a
    /// password against it costs what checking against an account's does,
    /// and computing it costs nothing.
    pub fn decoy(salt: [u8; 16], hash: [u8; 32], params: PasswordParams) -> PasswordHash {
        PasswordHash { salt, hash, params }
    }

    /// Constant-time comparison of `password`'s hash with this one.
    pub fn verify(&self, password: &str) -> bool {
        let h = argon2id(password, &self.salt, self.params);
        h.iter().zip(self.hash.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

fn argon2id(password: &str, salt: &[u8; 16], p: PasswordParams) -> [u8; 32] {
    thread_local! {
        /// argon2's working memory (19 MiB by default), kept for the next
        /// hash. Allocated anew each time, these blocks came from the heap
        /// once malloc had raised its mmap threshold, and fragments of
        /// several stayed resident: a tracker after four logins held 78 MiB
        /// of heap (the flood test). Reused, a thread holds one. It only
        /// affects memory, never a result.
        static SCRATCH: std::cell::RefCell<Vec<argon2::Block>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let mut out = [0u8; 32];
    let ok = argon2::Params::new(p.m_kib.max(8), p.t_cost.max(1), 1, Some(32)).and_then(|params| {
        let blocks = params.block_count();
        let hasher = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        SCRATCH.with_borrow_mut(|scratch| {
            if scratch.len() < blocks {
                scratch.resize(blocks, argon2::Block::default());
            }
            hasher.hash_password_into_with_memory(password.as_bytes(), salt, &mut out, &mut scratch[..blocks])
        })
    });
    // Parameters are clamped into argon2's range and the salt is 16 bytes, so
    // this only fails for passwords over 4 GiB, which no frame can carry.
    debug_assert!(ok.is_ok());
    out
}

/// A state change, as replicated.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    CreateUser {
        user: UserId,
        password: PasswordHash,
    },
    /// Opens a session for a client listening at `listen`; a previous session
    /// of a client at that address ends. Kept to replay logs written before
    /// [`Command::OpenSessionAt`]; trackers no longer propose it.
    OpenSession {
        user: UserId,
        token: SessionToken,
        listen: SocketAddr,
    },
    CloseSession {
        token: SessionToken,
    },
    CreateGroup {
        token: SessionToken,
        group: GroupId,
    },
    JoinGroup {
        token: SessionToken,
        group: GroupId,
    },
    LeaveGroup {
        token: SessionToken,
        group: GroupId,
    },
    AcceptRequest {
        token: SessionToken,
        group: GroupId,
        user: UserId,
    },
    RejectRequest {
        token: SessionToken,
        group: GroupId,
        user: UserId,
    },
    /// Shares a file. Its chunk list is not here: the entry names each range
    /// of it by hash ([`crate::chunk::FileIndex`]), and trackers hold the
    /// ranges beside the log (a tracker proposes this only once every range
    /// is durable on a majority of them).
    AddFile {
        token: SessionToken,
        group: GroupId,
        file: FileRecord,
    },
    StopShare {
        token: SessionToken,
        group: GroupId,
        name: FileName,
    },
    /// Changes nothing: a barrier, applied once everything decided before it is.
    Noop,
    /// Opens a session for a client listening at `listen` (the address the
    /// tracker saw it connect from, the port it named), if the session at
    /// that address is still `replaces`: none, one of the same user's, or
    /// one whose client the proposing tracker no longer heard from. Another
    /// session opened there meanwhile wins (`AddressInUse`): a login never
    /// ends a session its tracker did not judge replaceable.
    ///
    /// The session is bound to `key`, the key the client proved on the
    /// connection it logged in on: its token is good on no other.
    OpenSessionAt {
        user: UserId,
        token: SessionToken,
        listen: SocketAddr,
        replaces: Option<SessionToken>,
        key: KeyId,
        plaintext_peers: bool,
    },
}

/// One slot of the replicated log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The client request this came from: a retried request is applied once.
    pub id: Option<RequestId>,
    /// Every request of that client with a lower sequence number has its
    /// answer (the client said so when it sent this one): their results
    /// can be forgotten. 0 without an id.
    pub settled_below: u64,
    pub cmd: Command,
}

/// A client's session: who, where that client serves chunks, and the key
/// it proved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    pub user: UserId,
    pub listen: SocketAddr,
    /// The key the client proved on the connection it logged in on: the
    /// session's requests must come from a connection proving it, and
    /// downloaders sent to this client check it holds it. `None` for a
    /// session from a log written before keys: no connection can use it.
    pub key: Option<KeyId>,
    /// The client serves chunks without TLS (`--insecure-plaintext-peers`):
    /// nobody can check its key on a peer connection.
    pub plaintext_peers: bool,
}

impl Session {
    /// The key a downloader must find at this client's listen address
    /// (`None`: none can be checked, the client serves in plaintext).
    pub fn peer_key(&self) -> Option<KeyId> {
        if self.plaintext_peers {
            None
        } else {
            self.key
        }
    }
}

/// A client that shares a file: the user, and the address its client serves at.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Sharer {
    pub user: UserId,
    pub listen: SocketAddr,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedFile {
    pub meta: FileRecord,
    pub sharers: Sharers,
}

/// The clients sharing one file, sorted, each once. A plain vector: most
/// files have one sharer or a few, and a persistent set's smallest node
/// holds 16 (about 1 KiB for every file). Encoded as a sequence, as the
/// set it replaces was.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Sharers(Vec<Sharer>);

impl Sharers {
    pub fn unit(s: Sharer) -> Sharers {
        Sharers(vec![s])
    }

    /// Adds `s`; false if it was there.
    pub fn insert(&mut self, s: Sharer) -> bool {
        match self.0.binary_search(&s) {
            Ok(_) => false,
            Err(at) => {
                self.0.insert(at, s);
                true
            }
        }
    }

    /// Removes `s`; false if it was not there.
    pub fn remove(&mut self, s: &Sharer) -> bool {
        match self.0.binary_search(s) {
            Ok(at) => {
                self.0.remove(at);
                true
            }
            Err(_) => false,
        }
    }

    /// Keeps only the sharers `keep` accepts.
    pub fn retain(&mut self, keep: impl FnMut(&Sharer) -> bool) {
        self.0.retain(keep);
    }

    pub fn iter(&self) -> std::slice::Iter<'_, Sharer> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<'de> Deserialize<'de> for Sharers {
    /// Sorted and deduplicated as it is read, whatever the sender's order.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Sharers, D::Error> {
        let mut v = Vec::<Sharer>::deserialize(d)?;
        v.sort_unstable();
        v.dedup();
        v.shrink_to_fit();
        Ok(Sharers(v))
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    pub owner: UserId,
    /// In the order they joined: ownership passes to the longest-standing.
    pub members: Vec<UserId>,
    /// In the order they asked.
    pub pending: Vec<UserId>,
    /// Each behind an `Arc`: a snapshot shares the map's nodes with the
    /// live state until a write copies one, and a copied node then copies
    /// 16 pointers, not 16 files (names, hashes, sharers).
    pub files: OrdMap<FileName, Arc<SharedFile>>,
}

impl Group {
    pub fn is_member(&self, user: &UserId) -> bool {
        self.members.contains(user)
    }
}

/// What a client's writes did, for its retries: Raft's client sessions. A
/// result is kept per request, not per client, so a client's writes may
/// reach the log in any order (a background re-share overtaking a command
/// delayed by a failover) and each is applied once with its own result.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct ClientWrites {
    /// Requests below this are settled: answered, or given up by the client.
    settled_below: u64,
    /// Results of applied requests at or above `settled_below`, by seq.
    results: OrdMap<u64, Result<Reply, ApiError>>,
    /// Apply index of this client's last write, its key in `by_age`.
    age: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Dedupe {
    clients: OrdMap<u64, ClientWrites>,
    /// (apply index, client), to forget the least recently active client first.
    by_age: OrdSet<(u64, u64)>,
}

/// The replicated metadata of a tracker cluster.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaState {
    users: OrdMap<UserId, PasswordHash>,
    sessions: OrdMap<SessionToken, Session>,
    session_at: OrdMap<SocketAddr, SessionToken>,
    groups: OrdMap<GroupId, Group>,
    /// How many shared files (in all groups) name each stored chunk-list range.
    ranges: OrdMap<Sha1Digest, u32>,
    dedupe: Dedupe,
    applied: u64,
}

/// Counts `file`'s stored ranges in (`add`) or out of `refs`.
fn count_ranges(refs: &mut OrdMap<Sha1Digest, u32>, file: &FileRecord, add: bool) {
    for (_, h) in file.index.stored_ranges() {
        if add {
            *refs.entry(h).or_default() += 1;
        } else if let Some(n) = refs.get_mut(&h) {
            *n -= 1;
            if *n == 0 {
                refs.remove(&h);
            }
        }
    }
}

impl MetaState {
    pub fn new() -> MetaState {
        MetaState::default()
    }

    /// How many entries have been applied.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// Applies the next log entry. A request id seen before returns the
    /// result it had the first time and changes nothing; so does one the
    /// client had already settled (it no longer waits for it, and its
    /// result may be forgotten): such a late copy is never applied.
    pub fn apply(&mut self, entry: &Entry) -> Result<Reply, ApiError> {
        self.applied += 1;
        let Some(id) = entry.id else { return self.execute(&entry.cmd) };
        let w = self.touch(id.client);
        if entry.settled_below > w.settled_below {
            w.settled_below = entry.settled_below;
            // What is at or above the new mark stays. Removed one by one
            // (usually one): a split rebuilds both halves, and cost a third
            // of a busy tracker's loop.
            while let Some(seq) = w.results.get_min().map(|(seq, _)| *seq).filter(|&s| s < entry.settled_below) {
                w.results.remove(&seq);
            }
        }
        if let Some(result) = w.results.get(&id.seq) {
            return result.clone();
        }
        if id.seq < w.settled_below {
            return Err(ApiError::Limit("request already settled by the client".into()));
        }
        let result = self.execute(&entry.cmd);
        if let Some(w) = self.dedupe.clients.get_mut(&id.client) {
            w.results.insert(id.seq, result.clone());
            while w.results.len() > MAX_RESULTS_PER_CLIENT {
                // The oldest is forgotten, and counts as settled: a copy of
                // it arriving later is refused rather than applied twice.
                let Some(seq) = w.results.get_min().map(|(seq, _)| *seq) else { break };
                w.results.remove(&seq);
                w.settled_below = w.settled_below.max(seq + 1);
            }
        }
        result
    }

    /// The result a request had when it was applied, if it was (and is still remembered).
    pub fn result_of(&self, id: RequestId) -> Option<Result<Reply, ApiError>> {
        self.dedupe.clients.get(&id.client)?.results.get(&id.seq).cloned()
    }

    /// A client's write record, marked as its most recently active, and the
    /// least recently active forgotten past [`MAX_REMEMBERED_CLIENTS`].
    fn touch(&mut self, client: u64) -> &mut ClientWrites {
        let applied = self.applied;
        let d = &mut self.dedupe;
        let age = d.clients.get(&client).map(|w| w.age);
        if let Some(age) = age {
            d.by_age.remove(&(age, client));
        }
        d.by_age.insert((applied, client));
        while d.clients.len() >= MAX_REMEMBERED_CLIENTS && age.is_none() {
            match d.by_age.remove_min() {
                Some((_, old)) if old != client => {
                    d.clients.remove(&old);
                }
                Some(mine) => {
                    d.by_age.insert(mine);
                    break;
                }
                None => break,
            }
        }
        let w = d.clients.entry(client).or_default();
        w.age = applied;
        w
    }

    fn execute(&mut self, cmd: &Command) -> Result<Reply, ApiError> {
        match cmd {
            Command::Noop => Ok(Reply::Done),
            Command::CreateUser { user, password } => {
                if self.users.contains_key(user) {
                    return Err(ApiError::UserExists);
                }
                self.users.insert(user.clone(), password.clone());
                Ok(Reply::Done)
            }
            Command::OpenSessionAt { user, token, listen, replaces, key, plaintext_peers } => {
                if !self.users.contains_key(user) {
                    return Err(ApiError::BadCredentials);
                }
                if self.session_at.get(listen) != replaces.as_ref() {
                    return Err(ApiError::AddressInUse);
                }
                if let Some(old) = self.session_at.insert(*listen, *token) {
                    self.sessions.remove(&old);
                }
                let s =
                    Session { user: user.clone(), listen: *listen, key: Some(*key), plaintext_peers: *plaintext_peers };
                self.sessions.insert(*token, s);
                Ok(Reply::Session { token: *token })
            }
            Command::OpenSession { user, token, listen } => {
                if !self.users.contains_key(user) {
                    return Err(ApiError::BadCredentials);
                }
                if let Some(old) = self.session_at.insert(*listen, *token) {
                    self.sessions.remove(&old);
                }
                let s = Session { user: user.clone(), listen: *listen, key: None, plaintext_peers: false };
                self.sessions.insert(*token, s);
                Ok(Reply::Session { token: *token })
            }
            Command::CloseSession { token } => {
                let s = self.sessions.remove(token).ok_or(ApiError::NotLoggedIn)?;
                self.session_at.remove(&s.listen);
                Ok(Reply::Done)
            }
            Command::CreateGroup { token, group } => {
                let me = self.user_of(token)?.clone();
                if self.groups.contains_key(group) {
                    return Err(ApiError::GroupExists);
                }
                self.groups.insert(
                    group.clone(),
                    Group { owner: me.clone(), members: vec![me], pending: vec![], files: OrdMap::new() },
                );
                Ok(Reply::Done)
            }
            Command::JoinGroup { token, group } => {
                let me = self.user_of(token)?.clone();
                let g = self.groups.get_mut(group).ok_or(ApiError::NoSuchGroup)?;
                if g.is_member(&me) {
                    return Err(ApiError::AlreadyMember);
                }
                if g.pending.contains(&me) {
                    return Err(ApiError::AlreadyRequested);
                }
                g.pending.push(me);
                Ok(Reply::Done)
            }
            Command::LeaveGroup { token, group } => {
                let me = self.user_of(token)?.clone();
                let g = self.groups.get_mut(group).ok_or(ApiError::NoSuchGroup)?;
                if !g.is_member(&me) {
                    return Err(ApiError::NotMember);
                }
                g.members.retain(|m| *m != me);
                // Only the files it shares are touched (copied, when a
                // snapshot shares them).
                let mine: Vec<FileName> = g
                    .files
                    .iter()
                    .filter(|(_, f)| f.sharers.iter().any(|s| s.user == me))
                    .map(|(n, _)| n.clone())
                    .collect();
                for n in mine {
                    let Some(f) = g.files.get_mut(&n).map(Arc::make_mut) else { continue };
                    f.sharers.retain(|s| s.user != me);
                    if f.sharers.is_empty() {
                        count_ranges(&mut self.ranges, &f.meta, false);
                        g.files.remove(&n);
                    }
                }
                if g.members.is_empty() {
                    self.groups.remove(group);
                    return Ok(Reply::Left { group_deleted: true, new_owner: None });
                }
                let mut new_owner = None;
                if g.owner == me {
                    g.owner = g.members[0].clone();
                    new_owner = Some(g.owner.clone());
                }
                Ok(Reply::Left { group_deleted: false, new_owner })
            }
            Command::AcceptRequest { token, group, user } | Command::RejectRequest { token, group, user } => {
                let me = self.user_of(token)?.clone();
                let g = self.groups.get_mut(group).ok_or(ApiError::NoSuchGroup)?;
                if g.owner != me {
                    return Err(ApiError::NotOwner);
                }
                let at = g.pending.iter().position(|u| u == user).ok_or(ApiError::NoSuchRequest)?;
                g.pending.remove(at);
                if matches!(cmd, Command::AcceptRequest { .. }) {
                    g.members.push(user.clone());
                }
                Ok(Reply::Done)
            }
            Command::AddFile { token, group, file } => {
                let session = self.sessions.get(token).ok_or(ApiError::NotLoggedIn)?;
                let sharer = Sharer { user: session.user.clone(), listen: session.listen };
                file.index.validate().map_err(|e| ApiError::InvalidFile(e.to_string()))?;
                let g = self.groups.get_mut(group).ok_or(ApiError::NoSuchGroup)?;
                if !g.is_member(&sharer.user) {
                    return Err(ApiError::NotMember);
                }
                if let Some(f) = g.files.get_mut(&file.name).map(Arc::make_mut) {
                    if f.meta.index != file.index {
                        return Err(ApiError::FileNameTaken);
                    }
                    f.sharers.insert(sharer);
                    return Ok(Reply::Done);
                }
                if g.files.len() >= MAX_FILES_PER_GROUP {
                    return Err(ApiError::Limit(format!("a group holds at most {MAX_FILES_PER_GROUP} files")));
                }
                count_ranges(&mut self.ranges, file, true);
                let f = SharedFile { meta: file.clone(), sharers: Sharers::unit(sharer) };
                g.files.insert(file.name.clone(), Arc::new(f));
                Ok(Reply::Done)
            }
            Command::StopShare { token, group, name } => {
                let session = self.sessions.get(token).ok_or(ApiError::NotLoggedIn)?;
                let sharer = Sharer { user: session.user.clone(), listen: session.listen };
                let g = self.groups.get_mut(group).ok_or(ApiError::NoSuchGroup)?;
                if !g.is_member(&sharer.user) {
                    return Err(ApiError::NotMember);
                }
                let f = g.files.get_mut(name).map(Arc::make_mut).ok_or(ApiError::NoSuchFile)?;
                if !f.sharers.remove(&sharer) {
                    return Err(ApiError::NotSharing);
                }
                if f.sharers.is_empty() {
                    count_ranges(&mut self.ranges, &f.meta, false);
                    g.files.remove(name);
                }
                Ok(Reply::Done)
            }
        }
    }

    // ---- reads ----

    /// The rules every state must keep (checked by tests and the simulator):
    /// a group's owner is a member, nobody is both member and pending, every
    /// sharer of a file is a member of its group and a user, sessions are
    /// indexed by their address both ways.
    pub fn check_invariants(&self) -> Result<(), String> {
        for (name, g) in &self.groups {
            if !g.is_member(&g.owner) {
                return Err(format!("group {name}: owner {} is not a member", g.owner));
            }
            if let Some(u) = g.pending.iter().find(|u| g.is_member(u)) {
                return Err(format!("group {name}: {u} is both member and pending"));
            }
            for (f, sf) in &g.files {
                if let Some(s) = sf.sharers.iter().find(|s| !g.is_member(&s.user)) {
                    return Err(format!("group {name}: file {f} shared by non-member {}", s.user));
                }
                if sf.sharers.is_empty() {
                    return Err(format!("group {name}: file {f} has no sharer"));
                }
            }
            for u in g.members.iter().chain(&g.pending) {
                if !self.users.contains_key(u) {
                    return Err(format!("group {name}: unknown user {u}"));
                }
            }
        }
        for (t, s) in &self.sessions {
            if self.session_at.get(&s.listen) != Some(t) {
                return Err(format!("session of {} at {} is not indexed", s.user, s.listen));
            }
        }
        if self.session_at.len() != self.sessions.len() {
            return Err("session index has stale entries".into());
        }
        let mut refs = OrdMap::new();
        for g in self.groups.values() {
            for f in g.files.values() {
                count_ranges(&mut refs, &f.meta, true);
            }
        }
        if refs != self.ranges {
            return Err("chunk-list range counts do not match the files shared".into());
        }
        Ok(())
    }

    /// Whether a shared file names this chunk-list range.
    pub fn names_range(&self, hash: &Sha1Digest) -> bool {
        self.ranges.contains_key(hash)
    }

    /// Every chunk-list range the shared files name.
    pub fn stored_ranges(&self) -> impl Iterator<Item = &Sha1Digest> {
        self.ranges.keys()
    }

    pub fn user_exists(&self, user: &UserId) -> bool {
        self.users.contains_key(user)
    }

    pub fn password_of(&self, user: &UserId) -> Option<&PasswordHash> {
        self.users.get(user)
    }

    pub fn session(&self, token: &SessionToken) -> Option<&Session> {
        self.sessions.get(token)
    }

    /// The session a client listening at `listen` holds, if any.
    pub fn session_at(&self, listen: &SocketAddr) -> Option<(&SessionToken, &Session)> {
        let t = self.session_at.get(listen)?;
        Some((t, &self.sessions[t]))
    }

    pub fn user_of(&self, token: &SessionToken) -> Result<&UserId, ApiError> {
        self.sessions.get(token).map(|s| &s.user).ok_or(ApiError::NotLoggedIn)
    }

    pub fn group(&self, group: &GroupId) -> Option<&Group> {
        self.groups.get(group)
    }

    pub fn groups(&self) -> impl Iterator<Item = (&GroupId, &Group)> {
        self.groups.iter()
    }

    pub fn list_groups(&self) -> Vec<GroupSummary> {
        self.groups
            .iter()
            .map(|(id, g)| GroupSummary { group: id.clone(), owner: g.owner.clone(), members: g.members.len() as u32 })
            .collect()
    }

    /// At most `max` groups after `after` (from the first if `None`), in
    /// order, and whether more follow.
    pub fn list_groups_page(&self, after: Option<&GroupId>, max: usize) -> (Vec<GroupSummary>, bool) {
        use std::ops::Bound::{Excluded, Unbounded};
        let from = after.map_or(Unbounded, Excluded);
        let mut it =
            self.groups.range::<(std::ops::Bound<&GroupId>, std::ops::Bound<&GroupId>), GroupId>((from, Unbounded));
        let page = it
            .by_ref()
            .take(max)
            .map(|(id, g)| GroupSummary { group: id.clone(), owner: g.owner.clone(), members: g.members.len() as u32 })
            .collect();
        (page, it.next().is_some())
    }

    pub fn list_my_groups(&self, user: &UserId) -> Vec<MyGroup> {
        self.groups
            .iter()
            .filter(|(_, g)| g.is_member(user))
            .map(|(id, g)| MyGroup { group: id.clone(), owner: g.owner == *user })
            .collect()
    }

    /// The group, if `user` is one of its members.
    pub fn group_of_member(&self, user: &UserId, group: &GroupId) -> Result<&Group, ApiError> {
        let g = self.groups.get(group).ok_or(ApiError::NoSuchGroup)?;
        if g.is_member(user) {
            Ok(g)
        } else {
            Err(ApiError::NotMember)
        }
    }

    /// Files of a group the user belongs to, with `live(sharer)` deciding who
    /// shares it *now* (liveness is soft state, kept outside the log).
    pub fn list_files(
        &self,
        user: &UserId,
        group: &GroupId,
        live: impl Fn(&Sharer) -> bool,
    ) -> Result<Vec<FileSummary>, ApiError> {
        let g = self.group_of_member(user, group)?;
        Ok(g.files
            .values()
            .map(|f| FileSummary {
                name: f.meta.name.clone(),
                size: f.meta.index.size,
                live_sharers: f.sharers.iter().filter(|s| live(s)).count() as u32,
            })
            .collect())
    }

    pub fn list_requests(&self, user: &UserId, group: &GroupId) -> Result<Vec<UserId>, ApiError> {
        let g = self.groups.get(group).ok_or(ApiError::NoSuchGroup)?;
        if g.owner != *user {
            return Err(ApiError::NotOwner);
        }
        Ok(g.pending.clone())
    }

    /// Whether a sharer's client is logged in as that user right now.
    pub fn is_logged_in(&self, sharer: &Sharer) -> bool {
        self.session_at(&sharer.listen).is_some_and(|(_, s)| s.user == sharer.user)
    }
}

#[cfg(test)]
mod tests;
