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
//!   listener took (ids below [`OUTGOING`]), then `Secured` with the key the
//!   other end proved once its TLS handshake is done (before any of its
//!   bytes); `Connected` with that key (or `Closed`) after a
//!   [`ClientOutput::PeerConnect`], once TLS is up; `Backlog` (unsent bytes
//!   after a flush) and `BlockSent` after a [`ClientOutput::SendBlock`]. With
//!   [`ClientConfig::plaintext_peers`] no key is reported;
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
use crate::identity::KeyId;
use crate::ids::{FileName, GroupId, SessionToken, UserId};
use crate::proto::{ApiError, Message, Reply, Request, RequestId, Role, PROTOCOL_VERSION};
use crate::rng::Rng;
use crate::shell::{render, ShellCommand, ShellError};
use crate::time::Millis;
use crate::wire::{encode, FrameDecoder, MAX_REPLY_FRAME};

mod commands;
pub mod disk;
pub mod download;
pub mod fetch;
mod link;
mod lists;
pub mod peer;
pub mod picker;
pub mod receive;
pub mod serve;
pub mod sidecar;
pub mod verify;

use disk::{DiskDone, DiskOp};
use download::PeerConnId;
use fetch::DownloadEntry;
pub use fetch::{format_secs, DownloadId, DownloadStat};
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
    /// The key each tracker must prove, by position in `trackers` (missing
    /// or `None`: not pinned; the key it proves first is then required of
    /// it for the rest of the run).
    pub tracker_keys: Vec<Option<KeyId>>,
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
    /// Talk to peers without TLS (`--insecure-plaintext-peers`, for a
    /// benchmark baseline): no key is proved or checked on peer connections,
    /// and only peers that also run so are reached or served.
    pub plaintext_peers: bool,
}

impl ClientConfig {
    pub fn new(listen: SocketAddr, trackers: Vec<SocketAddr>) -> ClientConfig {
        ClientConfig {
            listen,
            trackers,
            tracker_keys: Vec::new(),
            request_timeout: Millis::from_secs(3),
            give_up_after: Millis::from_secs(20),
            heartbeat_every: Millis::from_secs(5),
            retry_backoff: Millis(500),
            quorum_wait: Millis::from_secs(5),
            download: Default::default(),
            max_upload_rate: None,
            plaintext_peers: false,
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
    /// The connection opened and its TLS handshake is done: the other end
    /// proved it holds `key`. Nothing is sent before the engine accepts it.
    Connected {
        key: KeyId,
    },
    /// It failed to open, or an open one dropped.
    Closed,
    Bytes(&'a [u8]),
}

/// What happened on a peer connection.
#[derive(Debug)]
pub enum PeerEvent<'a> {
    /// The listener accepted it (an upload; ids below [`OUTGOING`]).
    Accepted,
    /// An accepted connection's TLS handshake is done: the other end proved
    /// it holds `key` (never reported on plaintext connections).
    Secured { key: KeyId },
    /// A [`ClientOutput::PeerConnect`] connected and its TLS handshake is
    /// done: the other end proved `key` (`None` on a plaintext connection).
    /// Nothing is sent on it before this.
    Connected { key: Option<KeyId> },
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
    /// Telling the tracker how a download goes.
    Progress,
    /// Sharing a file by its index ([`lists`]).
    Share(u64),
    /// One range of a shared file's chunk list.
    PutRange(u64),
    /// One range of a download's chunk list.
    GetRange(u64, u32),
    /// `list_groups`, a page at a time: the groups so far.
    GroupsPage {
        ticket: Ticket,
        cmd: ShellCommand,
        got: Vec<crate::proto::GroupSummary>,
    },
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
    /// Block bytes served since start, over every share.
    served: u64,
    /// Keys proved by trackers whose key is not pinned, by position: first
    /// seen, then required.
    tracker_seen_keys: BTreeMap<usize, KeyId>,
    /// Trackers that proved the wrong key since one proved the right one:
    /// once all have, what waits fails at once (nobody it may go to).
    key_refused: BTreeMap<usize, ShellError>,
    downloads: BTreeMap<DownloadId, DownloadEntry>,
    next_download: u64,
    peers: BTreeMap<PeerConnId, PeerLink>,
    /// When download rates are next sampled.
    next_tick: Millis,
    /// The upload rate limit, if the user set one.
    upload_limit: Option<crate::rate::TokenBucket>,
    /// An upload waits for the rate limit.
    throttled: bool,
    /// Under the rate limit, the upload connection whose turn it is: the
    /// one with a chunk part sent, else the one after the last that
    /// finished a chunk (see `uploads_timeout`).
    upload_turn: (PeerConnId, bool),
    tracker: usize,
    /// Trackers tried since the last answer, to know when a round is complete.
    tried: usize,
    /// A tracker of this round answered "no quorum" or "catching up".
    refused_round: bool,
    link: Link,
    decoder: FrameDecoder,
    pending: BTreeMap<u64, Pending>,
    hash_jobs: BTreeMap<u64, UploadHash>,
    /// Files being shared, and downloads fetching their chunk lists.
    sharing: BTreeMap<u64, lists::Sharing>,
    listing: BTreeMap<u64, lists::Listing>,
    /// Where the tracker's silence is counted from: the last time it said
    /// anything, we connected, or we sent a request on an idle link (a link
    /// quiet for longer than `request_timeout` is not a silent tracker).
    last_heard: Millis,
    last_sent: Millis,
    out: VecDeque<ClientOutput>,
}

impl ClientEngine {
    pub fn new(mut cfg: ClientConfig, mut rng: Rng) -> ClientEngine {
        cfg.download.plaintext_peers = cfg.plaintext_peers;
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
            served: 0,
            tracker_seen_keys: BTreeMap::new(),
            key_refused: BTreeMap::new(),
            downloads: BTreeMap::new(),
            next_download: 1,
            peers: BTreeMap::new(),
            next_tick: Millis::ZERO,
            upload_limit,
            throttled: false,
            upload_turn: (PeerConnId(0), false),
            tracker: start,
            tried: 0,
            refused_round: false,
            link: Link::Down,
            decoder: FrameDecoder::new(MAX_REPLY_FRAME),
            pending: BTreeMap::new(),
            hash_jobs: BTreeMap::new(),
            sharing: BTreeMap::new(),
            listing: BTreeMap::new(),
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
            ClientInput::Tracker(TrackerEvent::Connected { key }) => self.tracker_connected(key, now),
            ClientInput::Tracker(TrackerEvent::Closed) => self.tracker_closed(now),
            ClientInput::Tracker(TrackerEvent::Bytes(b)) => self.tracker_bytes(b, now),
            ClientInput::Peer(conn, ev) => match ev {
                PeerEvent::Accepted => self.peer_accepted(conn, now),
                PeerEvent::Secured { key } => self.peer_secured(conn, key),
                PeerEvent::Connected { key } => self.peer_connected(conn, key, now),
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

    fn timeout(&mut self, now: Millis) {
        self.link_timeout(now);
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
}

#[cfg(test)]
mod tests;
