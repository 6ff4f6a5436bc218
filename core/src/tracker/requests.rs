//! What clients ask a tracker: each request read at once or turned into a
//! command for the log; failed logins counted and limited.

use super::*;

impl<R: Replicator> TrackerNode<R> {
    pub(crate) fn handle_request(
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
        // A session is good only on a connection that proved the key it was
        // opened with: a token copied to another connection is no session.
        let conn_key = self.conns.get(&conn).and_then(|c| c.key);
        let user = session.and_then(|t| {
            let s = self.meta.session(&t).filter(|s| s.key.is_some() && s.key == conn_key)?;
            Some((t, s.user.clone(), (s.listen, s.peer_key())))
        });
        // A valid session refreshes its lease, whatever the request.
        if let Some((t, _, _)) = &user {
            self.leases.insert(*t, now.plus(self.cfg.session_lease));
            if !self.replicator.peers().is_empty() {
                self.dirty_leases.insert(*t);
            }
        }
        if !body.is_write() && !matches!(body, Request::Heartbeat) {
            self.counters.reads += 1;
        }
        let needs_session = !matches!(body, Request::CreateUser { .. } | Request::Login { .. });
        let (token, me, my_listen) = match (needs_session, user) {
            (true, None) => return self.respond(conn, id, Err(ApiError::NotLoggedIn)),
            (true, Some(u)) => u,
            // Placeholders, unused by the two requests that need no session.
            (false, _) => (SessionToken([0; 16]), UserId::new("-").expect("valid id"), (unspecified(), None)),
        };
        let cmd = match body {
            Request::CreateUser { user, password } => {
                if password.len() > MAX_PASSWORD_LEN {
                    return self.respond(conn, id, Err(ApiError::PasswordTooLong));
                }
                let mut salt = [0u8; 16];
                self.rng.fill(&mut salt);
                let job = PasswordJob::Derive { password, salt, params: self.cfg.password_params };
                let pending = PendingPassword::Create { conn, id, settled_below, user };
                return self.hash_password(job, pending, now);
            }
            Request::Login { user, password, listen, plaintext_peers } => {
                let remote = self.conns.get(&conn).map(|c| c.remote);
                let keys = [Some(LoginKey::User(user.clone())), remote.map(LoginKey::Addr)];
                if let Some(wait) = self.login_blocked(&keys, now) {
                    return self.respond(conn, id, Err(ApiError::TooManyAttempts { retry_after_secs: wait }));
                }
                let held = HeldLogin { conn, id, settled_below, user, password, listen, plaintext_peers, keys };
                return self.check_login(held, false, now);
            }
            Request::Logout => Command::CloseSession { token },
            Request::Heartbeat => return self.respond(conn, id, Ok(Reply::Done)),
            Request::CreateGroup { group } => Command::CreateGroup { token, group },
            Request::JoinGroup { group } => Command::JoinGroup { token, group },
            Request::LeaveGroup { group } => Command::LeaveGroup { token, group },
            Request::AcceptRequest { group, user } => Command::AcceptRequest { token, group, user },
            Request::RejectRequest { group, user } => Command::RejectRequest { token, group, user },
            Request::UploadFile { group, file } => {
                if let Err(e) = file.index.validate() {
                    return self.respond(conn, id, Err(ApiError::InvalidFile(e.to_string())));
                }
                let missing: Vec<u32> = file
                    .index
                    .stored_ranges()
                    .filter(|(_, h)| !self.range_confirmed(h))
                    .map(|(i, _)| i as u32)
                    .collect();
                if !missing.is_empty() {
                    return self.respond(conn, id, Err(ApiError::MissingRanges { ranges: missing }));
                }
                Command::AddFile { token, group, file }
            }
            Request::PutRange { hashes } => return self.put_range(conn, id, &me, hashes, now),
            Request::GetRange { group, name, range } => return self.get_range(conn, id, &me, (group, name, range)),
            Request::StopShare { group, name } => Command::StopShare { token, group, name },
            Request::ListGroups => return self.respond(conn, id, Ok(Reply::Groups(self.meta.list_groups()))),
            Request::ListGroupsPage { after } => {
                let (groups, more) = self.meta.list_groups_page(after.as_ref(), crate::proto::GROUPS_PAGE);
                return self.respond(conn, id, Ok(Reply::GroupsPage { groups, more }));
            }
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
                let r = self.have_chunk(me, my_listen.0, group, name, chunk);
                return self.respond(conn, id, r);
            }
            Request::Progress { group, name, size, done, rate, sources } => {
                let t = super::health::Transfer {
                    listen: my_listen.0,
                    user: me.clone(),
                    group,
                    name,
                    size,
                    done,
                    rate,
                    sources,
                    ttl_ms: 0,
                };
                let r = self.progress(t, now);
                return self.respond(conn, id, r);
            }
            Request::CheckGrant { grant, group, name, holder } => {
                let r = match self.grants.get(&grant) {
                    // Issued to the key the downloader proved to the peer:
                    // a grant copied to another connection is worth nothing.
                    Some(g) if g.expires > now && g.group == group && g.name == name && g.key == holder => {
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
        self.propose_write(conn, (id, settled_below), cmd, now);
    }

    /// Checks `held`'s password off the loop: against its account's hash,
    /// or the decoy's if there is no such account, so the time taken tells
    /// nobody which accounts exist. `barrier_passed`: the second check, once
    /// everything decided before the login is applied here.
    fn check_login(&mut self, held: HeldLogin, barrier_passed: bool, now: Millis) {
        if held.password.len() > MAX_PASSWORD_LEN {
            // No account has such a password: no need to hash it.
            if barrier_passed {
                self.write_answered(held.conn);
            }
            return self.login_checked(held, false, barrier_passed, now);
        }
        let (hash, account) = match self.meta.password_of(&held.user) {
            Some(h) => (h.clone(), true),
            None => (self.decoy.clone(), false),
        };
        let job = PasswordJob::Verify { password: held.password.clone(), hash };
        self.hash_password(job, PendingPassword::Login { held, account, barrier_passed }, now);
    }

    /// Hands a password to a job. Like a write, it holds one of its
    /// connection's slots until done (a login after its barrier keeps the
    /// barrier's); past [`MAX_PASSWORD_JOBS`] in all it is answered `Limit`.
    fn hash_password(&mut self, job: PasswordJob, pending: PendingPassword, now: Millis) {
        let (conn, id) = pending.request();
        let holds_slot = matches!(pending, PendingPassword::Login { barrier_passed: true, .. });
        if !holds_slot && !self.admit_write(conn, id, now) {
            return;
        }
        if self.passwords.len() >= MAX_PASSWORD_JOBS {
            self.write_answered(conn);
            let e = "too many passwords being checked at once; try again in a moment";
            return self.respond(conn, id, Err(ApiError::Limit(e.into())));
        }
        let ticket = self.ticket();
        self.passwords.insert(ticket, pending);
        self.outbox.push(TrackerOutput::Work { ticket, job: Job(JobKind::Password(job)) });
    }

    /// A new account's password is hashed: the account goes to the log.
    pub(crate) fn password_derived(&mut self, ticket: u64, hash: PasswordHash, now: Millis) {
        let Some(PendingPassword::Create { conn, id, settled_below, user }) = self.passwords.remove(&ticket) else {
            return;
        };
        self.write_answered(conn);
        self.propose_write(conn, (id, settled_below), Command::CreateUser { user, password: hash }, now);
    }

    /// A login's password is checked.
    pub(crate) fn password_verified(&mut self, ticket: u64, matches: bool, now: Millis) {
        let Some(PendingPassword::Login { held, account, barrier_passed }) = self.passwords.remove(&ticket) else {
            return;
        };
        self.write_answered(held.conn);
        self.login_checked(held, account && matches, barrier_passed, now);
    }

    /// Answers a login whose password was checked (`ok`), or holds it for a
    /// barrier if this tracker may not know the account yet.
    fn login_checked(&mut self, held: HeldLogin, ok: bool, barrier_passed: bool, now: Millis) {
        if !ok && !barrier_passed && !self.replicator.peers().is_empty() {
            // This tracker may not have applied the account yet (it was
            // created through another one a moment ago): a no is final only
            // once everything decided before this request is applied here.
            // A barrier through the log waits for that (for a wrong
            // password too, so the answer's timing tells nobody which
            // accounts exist).
            return self.barrier(held, now);
        }
        if !ok {
            self.login_failed(held.keys, now);
            return self.respond(held.conn, held.id, Err(ApiError::BadCredentials));
        }
        let HeldLogin { conn, id, settled_below, user, listen, plaintext_peers, .. } = held;
        match self.open_session(conn, user, listen, plaintext_peers, now) {
            Ok(cmd) => self.propose_write(conn, (id, settled_below), cmd, now),
            Err(e) => self.respond(conn, id, Err(e)),
        }
    }

    /// Takes a slot for a write of `conn` about to go through the log, or
    /// answers request `id` why not: cut off from the majority (the client
    /// is better off at another tracker now), or too many in flight.
    pub(crate) fn admit_write(&mut self, conn: ConnId, id: RequestId, now: Millis) -> bool {
        if !self.links.quorum(now) {
            self.respond(conn, id, Err(ApiError::NoQuorum));
            return false;
        }
        let Some(c) = self.conns.get_mut(&conn) else { return false };
        if c.in_flight >= MAX_WRITES_IN_FLIGHT {
            self.respond(conn, id, Err(ApiError::Limit("too many requests in flight".into())));
            return false;
        }
        c.in_flight += 1;
        true
    }

    /// Proposes a client's write; it is answered once applied (or at its deadline).
    fn propose_write(&mut self, conn: ConnId, (id, settled_below): (RequestId, u64), cmd: Command, now: Millis) {
        let entry = Entry { id: Some(id), settled_below, cmd };
        let size = encode(&entry).len();
        if size > MAX_ENTRY_BYTES {
            let e = format!("a log entry holds at most {MAX_ENTRY_BYTES} bytes; this one would be {size}");
            return self.respond(conn, id, Err(ApiError::Limit(e)));
        }
        if !self.admit_write(conn, id, now) {
            return;
        }
        let w = super::node::Waiting { conn, deadline: now.plus(WRITE_DEADLINE), entry: entry.clone() };
        if let Some(old) = self.waiting.insert(id, w) {
            // The same request again (a retry on another connection): answer the newest.
            self.write_answered(old.conn);
        }
        self.replicator.propose(entry);
        self.pump(now);
    }

    /// Holds a failed login until a no-op entry proposed now is applied here:
    /// then this tracker has everything decided before it, and decides.
    fn barrier(&mut self, held: HeldLogin, now: Millis) {
        if !self.admit_write(held.conn, held.id, now) {
            return;
        }
        self.next_barrier += 1;
        let tag = RequestId { client: u64::MAX - self.replicator.me(), seq: self.next_barrier };
        self.held_logins.insert(tag, (held, now.plus(WRITE_DEADLINE)));
        self.replicator.propose(Entry { id: Some(tag), settled_below: tag.seq, cmd: Command::Noop });
        self.pump(now);
    }

    /// A login's barrier was applied: the account as the cluster knows it.
    /// Its password is checked again; the barrier's write slot is held
    /// until that is done.
    pub(crate) fn barrier_passed(&mut self, tag: RequestId, now: Millis) {
        let Some((h, _)) = self.held_logins.remove(&tag) else { return };
        self.check_login(h, true, now);
    }

    /// The session a login with good credentials opens: at the address the
    /// connection comes from, with the port the client listens on; replacing
    /// the session there only if it is the same user's or its client has
    /// gone quiet past its lease (no login ends another user's live session).
    fn open_session(
        &mut self,
        conn: ConnId,
        user: UserId,
        listen: SocketAddr,
        plaintext_peers: bool,
        now: Millis,
    ) -> Result<Command, ApiError> {
        let Some((remote, key)) = self.conns.get(&conn).map(|c| (c.remote, c.key)) else {
            return Err(ApiError::BadAddress("connection closed".into()));
        };
        let key = key.ok_or(ApiError::Unsecured)?;
        if listen.port() == 0 {
            return Err(ApiError::BadAddress("port 0".into()));
        }
        let listen = SocketAddr::new(remote, listen.port());
        let replaces = match self.meta.session_at(&listen) {
            None => None,
            Some((t, s)) if s.user == user || !self.lease_alive(t, now) => Some(*t),
            Some(_) => return Err(ApiError::AddressInUse),
        };
        let mut t = [0u8; 16];
        self.rng.fill(&mut t);
        Ok(Command::OpenSessionAt { user, token: SessionToken(t), listen, replaces, key, plaintext_peers })
    }

    /// Logins whose barrier was not applied in time: `NoQuorum`.
    pub(crate) fn expire_barriers(&mut self, now: Millis) {
        let due: Vec<RequestId> =
            self.held_logins.iter().filter(|(_, (_, deadline))| *deadline <= now).map(|(t, _)| *t).collect();
        for t in due {
            if let Some((h, _)) = self.held_logins.remove(&t) {
                self.write_answered(h.conn);
                self.respond(h.conn, h.id, Err(ApiError::NoQuorum));
            }
        }
    }

    pub(crate) fn write_answered(&mut self, conn: ConnId) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.in_flight = c.in_flight.saturating_sub(1);
        }
    }

    /// Seconds to wait if any of `keys` has used up its failed logins.
    pub(crate) fn login_blocked(&self, keys: &[Option<LoginKey>], now: Millis) -> Option<u64> {
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

    pub(crate) fn login_failed(&mut self, keys: [Option<LoginKey>; 2], now: Millis) {
        self.counters.failed_logins += 1;
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
    pub(crate) fn download(
        &mut self,
        me: &UserId,
        (my_listen, my_key): (SocketAddr, Option<KeyId>),
        group: GroupId,
        name: FileName,
        now: Millis,
    ) -> Result<Reply, ApiError> {
        let g = self.meta.group_of_member(me, &group)?;
        let f = g.files.get(&name).ok_or(ApiError::NoSuchFile)?;
        // Each with the key its session proved: the downloader checks it.
        let at = |listen: SocketAddr| SharerAddr {
            addr: listen,
            key: self.meta.session_at(&listen).and_then(|(_, x)| x.peer_key()),
        };
        let mut sharers: Vec<SharerAddr> =
            f.sharers.iter().filter(|s| s.listen != my_listen && self.is_live(s, now)).map(|s| at(s.listen)).collect();
        if let Some(partial) = self.partial.get(&(group.clone(), name.clone())) {
            for (listen, user) in partial {
                let s = Sharer { user: user.clone(), listen: *listen };
                if *listen != my_listen
                    && g.is_member(user)
                    && self.is_live(&s, now)
                    && !sharers.iter().any(|x| x.addr == *listen)
                {
                    sharers.push(at(*listen));
                }
            }
        }
        let index = f.meta.index.clone();
        let sharing = f.sharers.iter().any(|s| s.listen == my_listen);
        if self.grants.len() >= MAX_GRANTS {
            return Err(ApiError::Limit("too many downloads in progress".into()));
        }
        let mut bits = [0u8; 16];
        self.rng.fill(&mut bits);
        let grant = Grant(bits);
        self.counters.grants += 1;
        if self.links.any_up() {
            // Gossiped at once, not with the next sweep: the downloader is
            // about to show it to a peer that checks it with its own tracker.
            let g = SoftGrant {
                grant,
                user: me.clone(),
                key: my_key,
                group: group.clone(),
                name: name.clone(),
                ttl_ms: GRANT_TTL.0,
            };
            let bytes =
                encode(&Message::Tracker(TrackerFrame::Soft(SoftState { grants: vec![g], ..SoftState::default() })));
            self.broadcast(bytes);
        }
        // A downloader is a source from the start, as a BitTorrent peer is
        // once it announces: the others connect at once and learn each chunk
        // it gains as it gains it (`HaveOne`). Waiting for its first chunk
        // and their next refresh would leave a flash crowd fetching only
        // from the sharer for seconds. Past the limit it is just not listed.
        if my_listen != unspecified() && !sharing {
            let _ = self.note_partial(me.clone(), my_listen, group.clone(), name.clone());
        }
        self.grants
            .insert(grant, GrantInfo { user: me.clone(), key: my_key, group, name, expires: now.plus(GRANT_TTL) });
        Ok(Reply::Download { index, sharers, grant })
    }

    pub(crate) fn have_chunk(
        &mut self,
        me: UserId,
        my_listen: SocketAddr,
        group: GroupId,
        name: FileName,
        chunk: u32,
    ) -> Result<Reply, ApiError> {
        let g = self.meta.group_of_member(&me, &group)?;
        let f = g.files.get(&name).ok_or(ApiError::NoSuchFile)?;
        if chunk as u64 >= f.meta.index.chunks() {
            return Err(ApiError::InvalidFile(format!("no chunk {chunk}")));
        }
        self.note_partial(me, my_listen, group, name)?;
        Ok(Reply::Done)
    }

    /// Lists the client listening at `listen` as a holder of part of the file
    /// (gossiped to the other trackers), so that downloaders find it.
    fn note_partial(&mut self, me: UserId, listen: SocketAddr, group: GroupId, name: FileName) -> Result<(), ApiError> {
        let holders = self.partial.entry((group.clone(), name.clone())).or_default();
        if holders.len() >= MAX_PARTIAL_HOLDERS && !holders.contains_key(&listen) {
            return Err(ApiError::Limit("too many peers downloading this file".into()));
        }
        if holders.insert(listen, me.clone()).is_none() && !self.replicator.peers().is_empty() {
            self.dirty.partial.push((group, name, listen, me));
        }
        Ok(())
    }
}

pub(crate) fn unspecified() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 0))
}

/// A request whose password is being hashed by a job.
pub(crate) enum PendingPassword {
    /// A new account, proposed once its hash is known.
    Create { conn: ConnId, id: RequestId, settled_below: u64, user: UserId },
    /// A login; `account`: checked against a real account's hash (not the
    /// decoy's); `barrier_passed`: the check after the barrier.
    Login { held: HeldLogin, account: bool, barrier_passed: bool },
}

impl PendingPassword {
    fn request(&self) -> (ConnId, RequestId) {
        match self {
            PendingPassword::Create { conn, id, .. } => (*conn, *id),
            PendingPassword::Login { held, .. } => (held.conn, held.id),
        }
    }
}

/// A login waiting for its password check or its barrier.
pub(crate) struct HeldLogin {
    conn: ConnId,
    id: RequestId,
    settled_below: u64,
    user: UserId,
    password: String,
    listen: SocketAddr,
    plaintext_peers: bool,
    keys: [Option<LoginKey>; 2],
}
