//! The client engine, tracker side: shell commands in, tracker requests out.
//!
//! [`ClientEngine`] keeps one connection to a tracker at a time. Commands that
//! need the tracker become [`Request`]s with fresh [`RequestId`]s; if the
//! tracker does not answer within `request_timeout`, or the connection drops,
//! the engine moves to the next tracker of `tracker_info.txt` and sends every
//! unanswered request again with the *same* id, so a write is applied once.
//! A request nobody answered within `give_up_after` fails.
//!
//! Calling contract, for the driver:
//! - a line from the user: [`ClientEngine::handle_command`] with a [`Ticket`];
//! - [`ClientOutput::Connect`]: open TCP to that address, then report
//!   [`ClientEngine::handle_tracker_connected`] or
//!   [`ClientEngine::handle_tracker_closed`] (also when an open one drops);
//! - bytes from the tracker: [`ClientEngine::handle_tracker_bytes`];
//! - [`ClientOutput::HashFile`]: hash the file off-thread (see
//!   [`crate::chunk::FileHasher`]), then [`ClientEngine::handle_file_hashed`];
//! - deadlines: [`ClientEngine::poll_timeout`] / [`ClientEngine::handle_timeout`];
//! - after every input, drain [`ClientEngine::poll_output`] until `None`.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;

use crate::chunk::{chunk_count, FileDigest, FileMeta};
use crate::ids::{FileName, GroupId, SessionToken, UserId};
use crate::proto::{Message, Reply, Request, RequestId, Role, PROTOCOL_VERSION};
use crate::rng::Rng;
use crate::shell::{render, ShellCommand, ShellError};
use crate::time::Millis;
use crate::wire::{encode, FrameDecoder, MAX_CONTROL_FRAME};

/// The shell's handle on one command, echoed in its [`ClientOutput::Done`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ticket(pub u64);

#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Where this client serves chunks; the trackers name it as a sharer by it.
    pub listen: SocketAddr,
    pub trackers: Vec<SocketAddr>,
    /// Silence from the tracker after which the engine fails over.
    pub request_timeout: Millis,
    /// A request still unanswered after this fails.
    pub give_up_after: Millis,
    /// How often a logged-in client that is otherwise quiet renews its lease.
    pub heartbeat_every: Millis,
    /// Pause before reconnecting after every tracker failed in turn.
    pub retry_backoff: Millis,
}

impl ClientConfig {
    pub fn new(listen: SocketAddr, trackers: Vec<SocketAddr>) -> ClientConfig {
        ClientConfig {
            listen,
            trackers,
            request_timeout: Millis::from_secs(3),
            give_up_after: Millis::from_secs(20),
            heartbeat_every: Millis::from_secs(5),
            retry_backoff: Millis(500),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientOutput {
    /// Open a connection to this tracker (closing any other first).
    Connect { addr: SocketAddr },
    /// Send on the open tracker connection.
    Transmit(Vec<u8>),
    /// Close the tracker connection.
    Disconnect,
    /// Read and hash the file at `path`.
    HashFile { job: u64, path: String },
    /// A command finished: print `Ok` lines on stdout, an `Err` as `error: ...`.
    Done { ticket: Ticket, result: Result<Vec<String>, ShellError> },
}

#[derive(Debug, PartialEq, Eq)]
enum Link {
    Down,
    /// Waiting to retry at this time.
    Backoff(Millis),
    Connecting,
    Up,
}

struct Pending {
    /// `None` for the engine's own requests (heartbeats).
    ticket: Option<Ticket>,
    cmd: ShellCommand,
    request: Request,
    give_up_at: Millis,
}

struct HashJob {
    ticket: Ticket,
    cmd: ShellCommand,
    group: GroupId,
    name: FileName,
}

pub struct ClientEngine {
    cfg: ClientConfig,
    client_id: u64,
    next_seq: u64,
    next_job: u64,
    session: Option<(SessionToken, UserId)>,
    /// What this client shares: (group, name) -> path on disk.
    shares: BTreeMap<(GroupId, FileName), String>,
    tracker: usize,
    /// Trackers tried since the last answer, to know when a round is complete.
    tried: usize,
    link: Link,
    decoder: FrameDecoder,
    pending: BTreeMap<u64, Pending>,
    hash_jobs: BTreeMap<u64, HashJob>,
    /// Last time the tracker said anything, or we connected.
    last_heard: Millis,
    last_sent: Millis,
    out: VecDeque<ClientOutput>,
}

impl ClientEngine {
    pub fn new(cfg: ClientConfig, mut rng: Rng) -> ClientEngine {
        assert!(!cfg.trackers.is_empty(), "a client needs at least one tracker");
        let start = rng.below(cfg.trackers.len() as u64) as usize;
        ClientEngine {
            client_id: rng.next_u64(),
            cfg,
            next_seq: 1,
            next_job: 1,
            session: None,
            shares: BTreeMap::new(),
            tracker: start,
            tried: 0,
            link: Link::Down,
            decoder: FrameDecoder::new(MAX_CONTROL_FRAME),
            pending: BTreeMap::new(),
            hash_jobs: BTreeMap::new(),
            last_heard: Millis::ZERO,
            last_sent: Millis::ZERO,
            out: VecDeque::new(),
        }
    }

    // ---- getters ----

    /// The logged-in user, for the prompt.
    pub fn user(&self) -> Option<&UserId> {
        self.session.as_ref().map(|(_, u)| u)
    }

    /// Files this client shares, with their paths on disk.
    pub fn shares(&self) -> impl Iterator<Item = (&(GroupId, FileName), &String)> {
        self.shares.iter()
    }

    /// Whether any command is still running.
    pub fn is_busy(&self) -> bool {
        self.pending.values().any(|p| p.ticket.is_some()) || !self.hash_jobs.is_empty()
    }

    // ---- inputs ----

    pub fn handle_command(&mut self, ticket: Ticket, cmd: ShellCommand, now: Millis) {
        let done = |this: &mut Self, result| this.out.push_back(ClientOutput::Done { ticket, result });
        let logged_in = self.session.is_some();
        match &cmd {
            ShellCommand::Help => return done(self, Ok(crate::shell::help())),
            ShellCommand::Exit if !logged_in => return done(self, Ok(vec![])),
            ShellCommand::Login { .. } if logged_in => {
                let user = self.user().cloned().expect("logged in");
                return done(self, Err(ShellError::AlreadyLoggedIn(user)));
            }
            ShellCommand::CreateUser { .. } | ShellCommand::Login { .. } | ShellCommand::Exit => {}
            _ if !logged_in => return done(self, Err(crate::proto::ApiError::NotLoggedIn.into())),
            _ => {}
        }
        let request = match &cmd {
            ShellCommand::CreateUser { user, password } => {
                Request::CreateUser { user: user.clone(), password: password.clone() }
            }
            ShellCommand::Login { user, password } => {
                Request::Login { user: user.clone(), password: password.clone(), listen: self.cfg.listen }
            }
            ShellCommand::CreateGroup { group } => Request::CreateGroup { group: group.clone() },
            ShellCommand::JoinGroup { group } => Request::JoinGroup { group: group.clone() },
            ShellCommand::LeaveGroup { group } => Request::LeaveGroup { group: group.clone() },
            ShellCommand::ListRequests { group } => Request::ListRequests { group: group.clone() },
            ShellCommand::AcceptRequest { group, user } => {
                Request::AcceptRequest { group: group.clone(), user: user.clone() }
            }
            ShellCommand::RejectRequest { group, user } => {
                Request::RejectRequest { group: group.clone(), user: user.clone() }
            }
            ShellCommand::ListGroups => Request::ListGroups,
            ShellCommand::ListMyGroups => Request::ListMyGroups,
            ShellCommand::ListFiles { group } => Request::ListFiles { group: group.clone() },
            ShellCommand::UploadFile { path, group } => {
                let base = std::path::Path::new(path).file_name().and_then(|n| n.to_str()).unwrap_or("");
                let name = match FileName::new(base) {
                    Ok(n) => n,
                    Err(e) => return done(self, Err(ShellError::Local(format!("cannot share {path:?}: {e}")))),
                };
                let job = self.next_job;
                self.next_job += 1;
                self.hash_jobs.insert(job, HashJob { ticket, cmd: cmd.clone(), group: group.clone(), name });
                self.out.push_back(ClientOutput::HashFile { job, path: path.clone() });
                return;
            }
            ShellCommand::DownloadFile { group, name, .. } => {
                Request::DownloadFile { group: group.clone(), name: name.clone() }
            }
            ShellCommand::ShowDownloads => return done(self, Ok(vec!["no downloads".into()])),
            ShellCommand::StopShare { group, name } => Request::StopShare { group: group.clone(), name: name.clone() },
            ShellCommand::Logout | ShellCommand::Exit => Request::Logout,
            ShellCommand::Help => unreachable!("answered above"),
        };
        self.send(Some(ticket), cmd, request, now);
    }

    pub fn handle_file_hashed(&mut self, job: u64, result: Result<FileDigest, String>, now: Millis) {
        let Some(j) = self.hash_jobs.remove(&job) else { return };
        let path = match &j.cmd {
            ShellCommand::UploadFile { path, .. } => path.clone(),
            _ => unreachable!("hash jobs come from uploads"),
        };
        match result {
            Err(e) => self.out.push_back(ClientOutput::Done {
                ticket: j.ticket,
                result: Err(ShellError::Local(format!("cannot read {path}: {e}"))),
            }),
            Ok(digest) => {
                let meta = FileMeta { name: j.name, digest };
                self.send(Some(j.ticket), j.cmd, Request::UploadFile { group: j.group, meta }, now);
            }
        }
    }

    pub fn handle_tracker_connected(&mut self, now: Millis) {
        self.link = Link::Up;
        self.last_heard = now;
        self.decoder = FrameDecoder::new(MAX_CONTROL_FRAME);
        self.transmit(&Message::Hello { protocol_version: PROTOCOL_VERSION, role: Role::Client }, now);
        let resend: Vec<Message> = self
            .pending
            .iter()
            .map(|(seq, p)| Message::Request { id: self.id(*seq), session: self.token(), body: p.request.clone() })
            .collect();
        for m in resend {
            self.transmit(&m, now);
        }
    }

    pub fn handle_tracker_closed(&mut self, now: Millis) {
        if self.link == Link::Down || matches!(self.link, Link::Backoff(_)) {
            return;
        }
        tracing::debug!(tracker = %self.cfg.trackers[self.tracker], "tracker connection lost");
        self.fail_over(now);
    }

    pub fn handle_tracker_bytes(&mut self, bytes: &[u8], now: Millis) {
        if self.link != Link::Up {
            return;
        }
        self.last_heard = now;
        self.decoder.push(bytes);
        loop {
            match self.decoder.next_message() {
                Ok(None) => return,
                Ok(Some(Message::Response { id, result })) => self.handle_response(id, result, now),
                Ok(Some(Message::Refused { reason })) => {
                    tracing::warn!(%reason, "tracker refused us");
                    return self.fail_over(now);
                }
                Ok(Some(_)) | Err(_) => return self.fail_over(now),
            }
        }
    }

    pub fn handle_timeout(&mut self, now: Millis) {
        // Give up on requests nobody answered in time.
        let expired: Vec<u64> = self.pending.iter().filter(|(_, p)| p.give_up_at <= now).map(|(s, _)| *s).collect();
        for seq in expired {
            let p = self.pending.remove(&seq).expect("listed above");
            if let Some(ticket) = p.ticket {
                let result = Err(ShellError::NoTracker { tried: self.cfg.trackers.len() });
                self.out.push_back(ClientOutput::Done { ticket, result });
            }
        }
        match self.link {
            Link::Backoff(at) if at <= now => {
                self.link = Link::Down;
                if !self.pending.is_empty() || self.session.is_some() {
                    self.connect();
                }
            }
            Link::Up => {
                let waiting = !self.pending.is_empty();
                if waiting && now.since(self.last_heard) >= self.cfg.request_timeout {
                    tracing::debug!(tracker = %self.cfg.trackers[self.tracker], "tracker silent, failing over");
                    self.out.push_back(ClientOutput::Disconnect);
                    return self.fail_over(now);
                }
                if !waiting && self.session.is_some() && now.since(self.last_sent) >= self.cfg.heartbeat_every {
                    self.send(None, ShellCommand::Help, Request::Heartbeat, now);
                }
            }
            Link::Connecting if now.since(self.last_heard) >= self.cfg.request_timeout => {
                self.out.push_back(ClientOutput::Disconnect);
                self.fail_over(now);
            }
            _ => {}
        }
    }

    // ---- outputs ----

    pub fn poll_output(&mut self) -> Option<ClientOutput> {
        self.out.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Millis> {
        let give_up = self.pending.values().map(|p| p.give_up_at).min();
        let link = match self.link {
            Link::Backoff(at) => Some(at),
            Link::Up if !self.pending.is_empty() => Some(self.last_heard.plus(self.cfg.request_timeout)),
            Link::Up if self.session.is_some() => Some(self.last_sent.plus(self.cfg.heartbeat_every)),
            Link::Connecting => Some(self.last_heard.plus(self.cfg.request_timeout)),
            _ => None,
        };
        [give_up, link].into_iter().flatten().min()
    }

    // ---- internals ----

    fn id(&self, seq: u64) -> RequestId {
        RequestId { client: self.client_id, seq }
    }

    fn token(&self) -> Option<SessionToken> {
        self.session.as_ref().map(|(t, _)| *t)
    }

    fn transmit(&mut self, msg: &Message, now: Millis) {
        self.last_sent = now;
        self.out.push_back(ClientOutput::Transmit(encode(msg)));
    }

    fn connect(&mut self) {
        self.link = Link::Connecting;
        self.out.push_back(ClientOutput::Connect { addr: self.cfg.trackers[self.tracker] });
    }

    fn send(&mut self, ticket: Option<Ticket>, cmd: ShellCommand, request: Request, now: Millis) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let msg = Message::Request { id: self.id(seq), session: self.token(), body: request.clone() };
        let give_up_at = now.plus(match cmd {
            // Exit logs out, but must not keep the user waiting long.
            ShellCommand::Exit => self.cfg.request_timeout,
            _ => self.cfg.give_up_after,
        });
        self.pending.insert(seq, Pending { ticket, cmd, request, give_up_at });
        match self.link {
            Link::Up => self.transmit(&msg, now),
            Link::Down => {
                self.last_heard = now;
                self.connect()
            }
            Link::Connecting | Link::Backoff(_) => {}
        }
    }

    fn fail_over(&mut self, now: Millis) {
        self.tracker = (self.tracker + 1) % self.cfg.trackers.len();
        self.tried += 1;
        self.last_heard = now;
        if self.tried >= self.cfg.trackers.len() {
            // A whole round failed: pause before the next one.
            self.tried = 0;
            self.link = Link::Backoff(now.plus(self.cfg.retry_backoff));
        } else {
            self.connect();
        }
    }

    fn handle_response(&mut self, id: RequestId, result: Result<Reply, crate::proto::ApiError>, _now: Millis) {
        if id.client != self.client_id {
            return;
        }
        let Some(p) = self.pending.remove(&id.seq) else { return };
        self.tried = 0;
        let result = match (&p.cmd, result) {
            (ShellCommand::Login { user, .. }, Ok(Reply::Session { token })) => {
                self.session = Some((token, user.clone()));
                Ok(render(&p.cmd, &Reply::Done))
            }
            (ShellCommand::Logout | ShellCommand::Exit, r) => {
                // Whatever the tracker said, this client's session is over.
                self.session = None;
                r.map(|reply| render(&p.cmd, &reply)).map_err(ShellError::from)
            }
            (ShellCommand::UploadFile { path, group }, Ok(reply)) => {
                if let Request::UploadFile { meta, .. } = &p.request {
                    self.shares.insert((group.clone(), meta.name.clone()), path.clone());
                    let d = &meta.digest;
                    Ok(vec![format!(
                        "shared {} in {group}: {} bytes, {} chunks, sha1 {}",
                        meta.name,
                        d.size,
                        chunk_count(d.size),
                        d.sha1
                    )])
                } else {
                    Ok(render(&p.cmd, &reply))
                }
            }
            (ShellCommand::StopShare { group, name }, Ok(reply)) => {
                self.shares.remove(&(group.clone(), name.clone()));
                Ok(render(&p.cmd, &reply))
            }
            (ShellCommand::LeaveGroup { group }, Ok(reply)) => {
                self.shares.retain(|(g, _), _| g != group);
                Ok(render(&p.cmd, &reply))
            }
            (ShellCommand::DownloadFile { name, .. }, Ok(Reply::Download { digest, sharers })) => {
                Err(ShellError::Local(format!(
                    "downloads are not available in this version yet ({name}: {} bytes, {} chunks, {} live sharers)",
                    digest.size,
                    digest.chunks.len(),
                    sharers.len()
                )))
            }
            (_, Ok(reply)) => Ok(render(&p.cmd, &reply)),
            (_, Err(e)) => Err(e.into()),
        };
        if let Some(ticket) = p.ticket {
            self.out.push_back(ClientOutput::Done { ticket, result });
        }
    }
}

#[cfg(test)]
mod tests;
