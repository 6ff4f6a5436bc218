//! The client engine: shell commands, the tracker link, downloads and the
//! chunk server, as one deterministic state machine.
//!
//! [`ClientEngine`] keeps one connection to a tracker at a time. Commands that
//! need the tracker become [`Request`]s with fresh [`RequestId`]s; if the
//! tracker does not answer within `request_timeout`, or the connection drops,
//! the engine moves to the next tracker of `tracker_info.txt` and sends every
//! unanswered request again with the *same* id, so a write is applied once.
//! A request nobody answered within `give_up_after` fails.
//!
//! Beside the tracker link: downloads ([`fetch`]: peers and piece selection
//! in [`download::Download`], chunk and whole-file verification in
//! [`verify::Verifier`]), the zero-copy receive path ([`receive`]) and the
//! chunk server ([`serve`]). The disk is the driver's: the engine asks for
//! reads, hashes, writes and renames ([`disk::DiskOp`]) and decides on what
//! comes back.
//!
//! # Calling contract
//!
//! Inputs, grouped by where they come from ([`ClientInput`]), go in through
//! [`ClientEngine::handle_input`] with the driver's `now`, which never goes
//! backwards:
//! - the user: a shell line ([`ClientInput::User`]), answered by one
//!   [`ClientOutput::Done`] with its [`Ticket`];
//! - the tracker connection ([`TrackerEvent`]): after a
//!   [`ClientOutput::Connect`], `Connected` or `Closed` (also when an open one
//!   drops), and the bytes it sends;
//! - peer connections ([`PeerEvent`]): `Accepted` for a connection the
//!   listener took (ids below [`OUTGOING`]), `Connected` or `Closed` after a
//!   [`ClientOutput::PeerConnect`], `Backlog` (unsent bytes after a flush) and
//!   `BlockSent` after a [`ClientOutput::SendBlock`];
//! - the disk: one [`disk::DiskDone`] for every [`disk::DiskOp`], in any
//!   order;
//! - timers: [`ClientInput::Timeout`] once [`ClientEngine::poll_timeout`]
//!   has passed (early is harmless).
//!
//! The one exception is the receive path of peer connections: the driver
//! reads into the buffers [`ClientEngine::peer_recv_bufs`] lends it (block
//! data straight into its chunk) and reports the count with
//! [`ClientEngine::handle_peer_received`]; `PeerEvent::Bytes` copies instead.
//!
//! After every input, drain [`ClientEngine::poll_output`] until `None`, in
//! order, then ask `poll_timeout` again. No input may be fed while draining.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;

use crate::chunk::{chunk_count, FileDigest, FileMeta};
use crate::ids::{FileName, GroupId, SessionToken, UserId};
use crate::proto::{ApiError, Message, Reply, Request, RequestId, Role, PROTOCOL_VERSION};
use crate::rng::Rng;
use crate::shell::{render, ShellCommand, ShellError};
use crate::time::Millis;
use crate::wire::{encode, FrameDecoder, MAX_CONTROL_FRAME};

pub mod disk;
pub mod download;
pub mod fetch;
pub mod peer;
pub mod picker;
pub mod receive;
pub mod serve;
pub mod sidecar;
pub mod verify;

use disk::{DiskDone, DiskOp};
use download::PeerConnId;
use fetch::DownloadEntry;
pub use fetch::{DownloadId, DownloadStat};
use peer::Bitmap;
use receive::BlockStream;
use serve::{Shared, Upload};
pub use serve::{MAX_UPLOAD_CONNECTIONS, PEER_HANDSHAKE_TIMEOUT, PEER_IDLE_TIMEOUT, SEND_HIGH_WATER};

/// Connection ids of outgoing (download) connections have this bit set; the
/// driver numbers accepted connections below it.
pub const OUTGOING: u64 = 1 << 62;
/// How often download rates are sampled, progress saved and upload
/// connections' deadlines checked.
const TICK: Millis = Millis(500);

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
    /// How long to keep trying trackers that answer "no quorum" or
    /// "catching up" before telling the user there is no quorum.
    pub quorum_wait: Millis,
    pub download: crate::client::download::DownloadConfig,
    /// Upload at most this many bytes per second, over all peers.
    pub max_upload_rate: Option<u64>,
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
            quorum_wait: Millis::from_secs(5),
            download: Default::default(),
            max_upload_rate: None,
        }
    }
}

/// What the engine asks of its driver.
#[derive(Debug)]
pub enum ClientOutput {
    /// Open a connection to this tracker (closing any other first).
    Connect {
        addr: SocketAddr,
    },
    /// Send on the open tracker connection.
    Transmit(Vec<u8>),
    /// Close the tracker connection.
    Disconnect,
    /// A command finished: print `Ok` lines on stdout, an `Err` as `error: ...`.
    Done {
        ticket: Ticket,
        result: Result<Vec<String>, ShellError>,
    },
    /// Open a connection to a peer.
    PeerConnect {
        conn: PeerConnId,
        addr: SocketAddr,
    },
    PeerTransmit {
        conn: PeerConnId,
        bytes: Vec<u8>,
    },
    /// Flush what was transmitted, then close.
    PeerClose {
        conn: PeerConnId,
    },
    /// Send `header`, then the `len` bytes at `offset` of the file at `path`
    /// (together one `Block` frame; the data never needs to pass through the
    /// engine), then report [`PeerEvent::BlockSent`]. If the file cannot be
    /// read, send nothing and report the error.
    SendBlock {
        conn: PeerConnId,
        path: String,
        offset: u64,
        header: Vec<u8>,
        len: u32,
    },
    /// Disk work; each op is answered by one [`DiskDone`].
    Disk(DiskOp),
}

/// An input, by where it comes from.
#[derive(Debug)]
pub enum ClientInput<'a> {
    /// A line the user typed, parsed.
    User {
        ticket: Ticket,
        cmd: ShellCommand,
    },
    Tracker(TrackerEvent<'a>),
    Peer(PeerConnId, PeerEvent<'a>),
    Disk(DiskDone),
    /// [`ClientEngine::poll_timeout`] has passed.
    Timeout,
}

/// What happened on the tracker connection.
#[derive(Debug)]
pub enum TrackerEvent<'a> {
    Connected,
    /// It failed to open, or an open one dropped.
    Closed,
    Bytes(&'a [u8]),
}

/// What happened on a peer connection.
#[derive(Debug)]
pub enum PeerEvent<'a> {
    /// The listener accepted it (an upload; ids below [`OUTGOING`]).
    Accepted,
    /// A [`ClientOutput::PeerConnect`] connected.
    Connected,
    /// Bytes arrived (a copy; see [`ClientEngine::peer_recv_bufs`]).
    Bytes(&'a [u8]),
    /// Unsent bytes after the driver's last flush.
    Backlog(usize),
    /// A [`ClientOutput::SendBlock`] was queued (or its file could not be read).
    BlockSent(Result<(), String>),
    /// It closed, or failed to open.
    Closed,
}

/// A peer connection: one of our downloads' or one we serve.
pub(crate) enum PeerLink {
    Out {
        download: DownloadId,
        decoder: FrameDecoder,
        /// The block whose data is being received straight into its chunk.
        stream: Option<BlockStream>,
    },
    In(Box<Upload>),
}

#[derive(Debug, PartialEq, Eq)]
enum Link {
    Down,
    /// Waiting to retry at this time.
    Backoff(Millis),
    Connecting,
    Up,
}

/// Why a request was sent, which decides what its answer does.
#[derive(Clone, Debug)]
enum Purpose {
    Shell {
        ticket: Ticket,
        cmd: ShellCommand,
    },
    Heartbeat,
    /// Fresh sources (and grant) for a running download.
    Sources(DownloadId),
    /// Checking an incoming peer's grant.
    CheckGrant(PeerConnId),
    /// Telling the tracker about a verified chunk.
    Announce,
    /// Registering a finished download as shared.
    Reshare(DownloadId),
}

struct Pending {
    purpose: Purpose,
    request: Request,
    give_up_at: Millis,
    /// Trackers that answered "no quorum" or "catching up" to this request.
    refused: usize,
    sent_at: Millis,
}

/// An `upload_file` waiting for its file's digest.
struct UploadHash {
    ticket: Ticket,
    cmd: ShellCommand,
    group: GroupId,
    name: FileName,
}

pub struct ClientEngine {
    cfg: ClientConfig,
    rng: Rng,
    client_id: u64,
    next_seq: u64,
    next_job: u64,
    session: Option<(SessionToken, UserId)>,
    /// What this client serves: uploads, finished and running downloads.
    shares: BTreeMap<(GroupId, FileName), Shared>,
    downloads: BTreeMap<DownloadId, DownloadEntry>,
    next_download: u64,
    peers: BTreeMap<PeerConnId, PeerLink>,
    /// When download rates are next sampled.
    next_tick: Millis,
    /// The upload rate limit, if the user set one.
    upload_limit: Option<crate::rate::TokenBucket>,
    /// An upload waits for the rate limit.
    throttled: bool,
    tracker: usize,
    /// Trackers tried since the last answer, to know when a round is complete.
    tried: usize,
    /// A tracker of this round answered "no quorum" or "catching up".
    refused_round: bool,
    link: Link,
    decoder: FrameDecoder,
    pending: BTreeMap<u64, Pending>,
    hash_jobs: BTreeMap<u64, UploadHash>,
    /// Where the tracker's silence is counted from: the last time it said
    /// anything, we connected, or we sent a request on an idle link (a link
    /// quiet for longer than `request_timeout` is not a silent tracker).
    last_heard: Millis,
    last_sent: Millis,
    out: VecDeque<ClientOutput>,
}

impl ClientEngine {
    pub fn new(cfg: ClientConfig, mut rng: Rng) -> ClientEngine {
        assert!(!cfg.trackers.is_empty(), "a client needs at least one tracker");
        let start = rng.below(cfg.trackers.len() as u64) as usize;
        let upload_limit =
            cfg.max_upload_rate.map(|r| crate::rate::TokenBucket::new(r, (r / 10).max(256 * 1024), Millis::ZERO));
        ClientEngine {
            client_id: rng.next_u64(),
            rng,
            cfg,
            next_seq: 1,
            next_job: 1,
            session: None,
            shares: BTreeMap::new(),
            downloads: BTreeMap::new(),
            next_download: 1,
            peers: BTreeMap::new(),
            next_tick: Millis::ZERO,
            upload_limit,
            throttled: false,
            tracker: start,
            tried: 0,
            refused_round: false,
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

    // ---- inputs ----

    /// Feeds one input; then drain [`ClientEngine::poll_output`].
    pub fn handle_input(&mut self, input: ClientInput<'_>, now: Millis) {
        match input {
            ClientInput::User { ticket, cmd } => self.handle_command(ticket, cmd, now),
            ClientInput::Tracker(TrackerEvent::Connected) => self.tracker_connected(now),
            ClientInput::Tracker(TrackerEvent::Closed) => self.tracker_closed(now),
            ClientInput::Tracker(TrackerEvent::Bytes(b)) => self.tracker_bytes(b, now),
            ClientInput::Peer(conn, ev) => match ev {
                PeerEvent::Accepted => self.peer_accepted(conn, now),
                PeerEvent::Connected => self.peer_connected(conn, now),
                PeerEvent::Bytes(b) => self.peer_bytes(conn, b, now),
                PeerEvent::Backlog(n) => self.peer_backlog(conn, n, now),
                PeerEvent::BlockSent(r) => self.block_sent(conn, r, now),
                PeerEvent::Closed => self.peer_closed(conn, now),
            },
            ClientInput::Disk(DiskDone::FileHashed { job, result }) => self.file_hashed(job, result, now),
            ClientInput::Disk(done) => self.disk_done(done, now),
            ClientInput::Timeout => self.timeout(now),
        }
    }

    fn handle_command(&mut self, ticket: Ticket, cmd: ShellCommand, now: Millis) {
        let done = |this: &mut Self, result| this.out.push_back(ClientOutput::Done { ticket, result });
        let logged_in = self.session.is_some();
        match &cmd {
            ShellCommand::Help => return done(self, Ok(crate::shell::help())),
            ShellCommand::ShowDownloads { verbose } => return done(self, Ok(self.show_downloads(*verbose))),
            ShellCommand::Exit if !logged_in => return done(self, Ok(render(&cmd, &Reply::Done))),
            ShellCommand::Login { .. } if logged_in => {
                let user = self.user().cloned().expect("logged in");
                return done(self, Err(ShellError::AlreadyLoggedIn(user)));
            }
            ShellCommand::CreateUser { .. } | ShellCommand::Login { .. } | ShellCommand::Exit => {}
            _ if !logged_in => return done(self, Err(ApiError::NotLoggedIn.into())),
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
                self.hash_jobs.insert(job, UploadHash { ticket, cmd: cmd.clone(), group: group.clone(), name });
                self.out.push_back(ClientOutput::Disk(DiskOp::HashFile { job, path: path.clone() }));
                return;
            }
            ShellCommand::DownloadFile { group, name, .. } => {
                if let Some(e) = self.download_conflict(group, name) {
                    return done(self, Err(ShellError::Local(e)));
                }
                Request::DownloadFile { group: group.clone(), name: name.clone() }
            }
            ShellCommand::StopShare { group, name } => Request::StopShare { group: group.clone(), name: name.clone() },
            ShellCommand::Logout | ShellCommand::Exit => Request::Logout,
            ShellCommand::Help | ShellCommand::ShowDownloads { .. } => unreachable!("answered above"),
        };
        self.send(Purpose::Shell { ticket, cmd }, request, now);
    }

    fn file_hashed(&mut self, job: u64, result: Result<FileDigest, String>, now: Millis) {
        let Some(j) = self.hash_jobs.remove(&job) else { return };
        let ShellCommand::UploadFile { path, .. } = &j.cmd else { unreachable!("hash jobs come from uploads") };
        match result {
            Err(e) => self.out.push_back(ClientOutput::Done {
                ticket: j.ticket,
                result: Err(ShellError::Local(format!("cannot read {path}: {e}"))),
            }),
            Ok(digest) => {
                let meta = FileMeta { name: j.name, digest };
                self.send(
                    Purpose::Shell { ticket: j.ticket, cmd: j.cmd },
                    Request::UploadFile { group: j.group, meta },
                    now,
                );
            }
        }
    }

    fn tracker_connected(&mut self, now: Millis) {
        self.link = Link::Up;
        self.last_heard = now;
        self.decoder = FrameDecoder::new(MAX_CONTROL_FRAME);
        self.transmit(&Message::Hello { protocol_version: PROTOCOL_VERSION, role: Role::Client }, now);
        let resend: Vec<Message> = self
            .pending
            .iter()
            .map(|(seq, p)| Message::Request {
                id: self.id(*seq),
                settled_below: self.settled_below(),
                session: self.token(),
                body: p.request.clone(),
            })
            .collect();
        for m in resend {
            self.transmit(&m, now);
        }
        if self.session.is_some() {
            // A new tracker (after a failover) learns at once that this
            // client is alive and which files it holds parts of; the others'
            // soft state may have died with the old one.
            if self.pending.is_empty() {
                self.send(Purpose::Heartbeat, Request::Heartbeat, now);
            }
            self.announce_partial(now);
        }
    }

    /// Tells the tracker again which files this client holds parts of (a
    /// download announces its first chunk only): with every heartbeat, so
    /// a record the tracker dropped when a lease lapsed comes back.
    fn announce_partial(&mut self, now: Millis) {
        let partial: Vec<(GroupId, FileName, u32)> = self
            .shares
            .iter()
            .filter(|(_, s)| s.have.count() < s.have.len())
            .filter_map(|((g, n), s)| s.have.iter_set().next().map(|c| (g.clone(), n.clone(), c)))
            .collect();
        for (g, n, c) in partial {
            self.announce(&g, &n, c, now);
        }
    }

    fn tracker_closed(&mut self, now: Millis) {
        if self.link == Link::Down || matches!(self.link, Link::Backoff(_)) {
            return;
        }
        if self.pending.is_empty() && self.session.is_none() {
            // Nothing to say (the tracker closed an idle link): reconnect when needed.
            self.link = Link::Down;
            return;
        }
        tracing::debug!(tracker = %self.cfg.trackers[self.tracker], "tracker connection lost");
        self.fail_over(now);
    }

    fn tracker_bytes(&mut self, bytes: &[u8], now: Millis) {
        if self.link != Link::Up {
            return;
        }
        self.last_heard = now;
        self.decoder.push(bytes);
        loop {
            match self.decoder.next_message::<Message>() {
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

    fn timeout(&mut self, now: Millis) {
        // Give up on requests nobody answered in time.
        let expired: Vec<u64> = self.pending.iter().filter(|(_, p)| p.give_up_at <= now).map(|(s, _)| *s).collect();
        for seq in expired {
            let p = self.pending.remove(&seq).expect("listed above");
            let err = ShellError::NoTracker { tried: self.cfg.trackers.len() };
            self.finish_request(p, Err(err), now);
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
                    self.fail_over(now);
                } else if !waiting && self.session.is_some() && now.since(self.last_sent) >= self.cfg.heartbeat_every {
                    self.send(Purpose::Heartbeat, Request::Heartbeat, now);
                    self.announce_partial(now);
                }
            }
            Link::Connecting if now.since(self.last_heard) >= self.cfg.request_timeout => {
                self.out.push_back(ClientOutput::Disconnect);
                self.fail_over(now);
            }
            _ => {}
        }
        self.uploads_timeout(now);
        self.downloads_timeout(now);
        if now >= self.next_tick {
            self.next_tick = now.plus(TICK);
            self.uploads_tick(now);
            self.downloads_tick(now);
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
        let ticking = !self.peers.is_empty() || self.downloads_running();
        let tick = ticking.then_some(self.next_tick);
        [give_up, link, tick, self.downloads_deadline(), self.uploads_deadline()].into_iter().flatten().min()
    }

    // ---- internals ----

    fn id(&self, seq: u64) -> RequestId {
        RequestId { client: self.client_id, seq }
    }

    /// Every request below this has its answer (or was given up on): the
    /// oldest still pending, or the next to be sent.
    fn settled_below(&self) -> u64 {
        self.pending.keys().next().copied().unwrap_or(self.next_seq)
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

    fn send(&mut self, purpose: Purpose, request: Request, now: Millis) {
        let seq = self.next_seq;
        let settled_below = self.settled_below();
        self.next_seq += 1;
        let msg = Message::Request { id: self.id(seq), settled_below, session: self.token(), body: request.clone() };
        let give_up_at = now.plus(match purpose {
            // Exit logs out, but must not keep the user waiting long.
            Purpose::Shell { cmd: ShellCommand::Exit, .. } => self.cfg.request_timeout,
            _ => self.cfg.give_up_after,
        });
        let idle = self.pending.is_empty();
        self.pending.insert(seq, Pending { purpose, request, give_up_at, refused: 0, sent_at: now });
        match self.link {
            Link::Up => {
                if idle {
                    self.last_heard = now;
                }
                self.transmit(&msg, now)
            }
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
            // A whole round failed: pause before the next one. Trackers that
            // answered (no quorum yet, catching up) are alive and are tried
            // again sooner than ones that did not.
            self.tried = 0;
            let pause = if std::mem::take(&mut self.refused_round) {
                Millis(self.cfg.retry_backoff.0 / 5)
            } else {
                self.cfg.retry_backoff
            };
            self.link = Link::Backoff(now.plus(pause));
        } else {
            self.connect();
        }
    }

    fn handle_response(&mut self, id: RequestId, result: Result<Reply, ApiError>, now: Millis) {
        if id.client != self.client_id {
            return;
        }
        let Some(mut p) = self.pending.remove(&id.seq) else { return };
        if let Err(ApiError::NoQuorum | ApiError::CatchingUp) = result {
            // This tracker cannot decide (or has not caught up): another may.
            // The same request id goes to the next one, so a write that was
            // decided after all is still applied once.
            p.refused += 1;
            if p.refused < self.cfg.trackers.len() || now.since(p.sent_at) < self.cfg.quorum_wait {
                tracing::debug!(tracker = %self.cfg.trackers[self.tracker], "tracker cannot serve, failing over");
                self.pending.insert(id.seq, p);
                self.refused_round = true;
                self.out.push_back(ClientOutput::Disconnect);
                return self.fail_over(now);
            }
            self.tried = 0;
            return self.finish_request(p, Err(ShellError::from(ApiError::NoQuorum)), now);
        }
        self.tried = 0;
        self.finish_request(p, result.map_err(ShellError::from), now);
    }

    /// What an answered (or abandoned) request does.
    fn finish_request(&mut self, p: Pending, result: Result<Reply, ShellError>, now: Millis) {
        let (ticket, cmd) = match p.purpose {
            Purpose::Shell { ticket, cmd } => (ticket, cmd),
            Purpose::Heartbeat | Purpose::Announce => return,
            Purpose::Sources(id) => return self.sources_answered(id, result, now),
            Purpose::CheckGrant(conn) => return self.grant_checked(conn, result),
            Purpose::Reshare(id) => return self.reshared(id, result),
        };
        let result = match (&cmd, result) {
            (ShellCommand::Login { user, .. }, Ok(Reply::Session { token })) => {
                self.session = Some((token, user.clone()));
                Ok(render(&cmd, &Reply::Done))
            }
            (ShellCommand::Logout | ShellCommand::Exit, r) => {
                // Whatever the tracker said, this client's session is over.
                self.session = None;
                self.stop_serving(None, "the sharer logged out");
                r.map(|reply| render(&cmd, &reply))
            }
            (ShellCommand::UploadFile { path, group }, Ok(_)) => {
                let Request::UploadFile { meta, .. } = p.request else { unreachable!("upload request") };
                let d = &meta.digest;
                let line = format!(
                    "shared {} in {group}: {} bytes, {} chunks, sha1 {}",
                    meta.name,
                    d.size,
                    chunk_count(d.size),
                    d.sha1
                );
                let have = Bitmap::full(d.chunks.len() as u32);
                self.shares.insert(
                    (group.clone(), meta.name.clone()),
                    Shared { path: path.clone(), size: d.size, sha1: d.sha1, have },
                );
                Ok(vec![line])
            }
            (ShellCommand::StopShare { group, name }, Ok(reply)) => {
                self.stop_serving(Some((group, name)), "the sharer stopped sharing this file");
                self.shares.remove(&(group.clone(), name.clone()));
                Ok(render(&cmd, &reply))
            }
            (ShellCommand::LeaveGroup { group }, Ok(reply)) => {
                let names: Vec<FileName> =
                    self.shares.keys().filter(|(g, _)| g == group).map(|(_, n)| n.clone()).collect();
                for n in names {
                    self.stop_serving(Some((group, &n)), "the sharer left the group");
                    self.shares.remove(&(group.clone(), n));
                }
                Ok(render(&cmd, &reply))
            }
            (
                ShellCommand::DownloadFile { group, name, destination },
                Ok(Reply::Download { digest, sharers, grant }),
            ) => {
                let (group, name, destination) = (group.clone(), name.clone(), destination.clone());
                // The command finishes once the download is set up on disk.
                return self.start_download(ticket, group, name, destination, digest, sharers, grant, now);
            }
            (_, Ok(reply)) => Ok(render(&cmd, &reply)),
            (_, Err(e)) => Err(e),
        };
        self.out.push_back(ClientOutput::Done { ticket, result });
    }
}

#[cfg(test)]
mod tests;
