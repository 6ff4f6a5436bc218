//! A tracker: client connections in, answers out, metadata in between,
//! replicated across the cluster.
//!
//! [`TrackerNode`] owns the connection-level protocol (framing, `Hello`,
//! request ids), the [`MetaState`], the soft state that is not replicated
//! (session leases, grants, partial holders), its links to the other
//! trackers and the persist-before-send barrier. It turns each write request
//! into a [`Command`], proposes it to its [`Replicator`], and answers the
//! client once the entry is decided and applied. Reads are answered from the
//! local state at once.
//!
//! Modules, by what they own: [`node`] the node and its inputs and outputs;
//! `requests` what clients ask; `soft` leases, grants and partial holders;
//! [`links`] the links to other trackers; [`outbox`] the barrier;
//! [`replicator`] and [`omni`] the replicated log.
//!
//! # Calling contract
//!
//! Every input takes the driver's `now`, which never goes backwards:
//! - at start-up, build the replicator from the records of the durable log
//!   (`SoloReplicator::recover`, `OmniReplicator::recover`) and hand it to
//!   [`TrackerNode::new`], which applies what they decided; then tell it
//!   which chunk-list ranges the range store holds
//!   ([`TrackerNode::add_stored_ranges`], none for a new store);
//! - connections accepted on the listener: [`TrackerNode::handle_connected`],
//!   the key the other end proved once its TLS handshake is done
//!   [`TrackerNode::handle_secured`], their bytes (any split)
//!   [`TrackerNode::handle_bytes`], their end [`TrackerNode::handle_closed`];
//! - this node's links to the other trackers: open one when told
//!   ([`TrackerOutput::Dial`]) and report [`TrackerNode::handle_link_up`]
//!   (once its TLS handshake is done, with the key the other end proved) or
//!   [`TrackerNode::handle_link_down`] (also when an open one fails), the
//!   bytes that come back on it [`TrackerNode::handle_link_bytes`]; close it
//!   when told ([`TrackerOutput::Hangup`], no report needed). Dialling
//!   policy, heartbeats and deadlines are the node's;
//! - the log: append (or rewrite) every [`TrackerOutput::Persist`] record in
//!   order; on [`TrackerOutput::Sync`] make everything written so far durable
//!   and report [`TrackerNode::handle_synced`] with the highest `seq` covered
//!   (one fsync may cover several). The node holds back what must wait for
//!   the records; whatever it emits may be sent at once;
//! - when [`TrackerNode::poll_timeout`] passes: [`TrackerNode::handle_timeout`]
//!   (calling it early is harmless).
//!
//! After every input, drain [`TrackerNode::poll_output`] until `None`, in
//! order, and carry the outputs out in that order (close a connection after
//! flushing what was sent on it). No input may be fed while draining.
//!
//! With several trackers, writes are answered once decided by a majority;
//! one that is not decided within [`WRITE_DEADLINE`] is answered
//! `NoQuorum` (the client tries another tracker with the same request id,
//! so it is still applied at most once), and so is one that reaches a node
//! cut off from the majority, at once. A tracker answers nothing until it
//! has caught up with the cluster once since it started (`CatchingUp`); from
//! then on it answers reads from its own state even without a majority.
//! Soft state (leases, grants, partial holders) is gossiped to the other
//! trackers once a second, outside the log.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use crate::chunk::Sha1Digest;
use crate::client::peer::Grant;
use crate::identity::KeyId;
use crate::ids::{FileName, GroupId, SessionToken, UserId};
use crate::meta::{Command, Entry, MetaState, PasswordHash, PasswordParams, Sharer};
use crate::proto::{
    ApiError, Message, Reply, Request, RequestId, Role, SharerAddr, SoftGrant, SoftState, TrackerFrame,
    MAX_PASSWORD_LEN, PROTOCOL_VERSION,
};
use crate::rng::Rng;
use crate::time::Millis;
use crate::wire::{encode, FrameDecoder, MAX_CONTROL_FRAME};

pub mod health;
pub mod links;
pub mod node;
pub mod omni;
pub mod outbox;
pub mod ranges;
pub mod replicator;
mod requests;
mod soft;
pub mod stream;

pub use health::{ClusterView, Counters, Health, PeerView, Transfer};
pub use node::TrackerNode;
pub use omni::OmniReplicator;
pub use replicator::{Decided, LogImage, NodeId, Persist, Replicator, SoloReplicator};

/// A connection, named by the driver. Ids are never reused while open.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnId(pub u64);

#[derive(Clone, Debug)]
pub struct TrackerConfig {
    pub password_params: PasswordParams,
    /// How long a session counts as live without hearing from its client.
    pub session_lease: Millis,
    /// The key each other tracker must prove ([`TrackerNode::handle_secured`]
    /// on its connections to us, [`TrackerNode::handle_link_up`] on ours):
    /// a `Join` naming a tracker is accepted only over a connection that
    /// proved its key, and our link to it only if the other end proves it.
    /// A peer missing here is refused until its key is learned
    /// ([`TrackerNode::learn_peer_key`]).
    pub peer_keys: BTreeMap<NodeId, KeyId>,
    /// Emit [`TrackerOutput::Applied`] for every log entry applied (the
    /// simulator checks that trackers agree on them).
    pub report_applied: bool,
    /// Consensus messages over this many bytes go in parts, with a window of
    /// 16 parts ([`stream::PART`]; the simulator makes them small so that
    /// ordinary messages are split too).
    pub consensus_part: usize,
}

impl Default for TrackerConfig {
    fn default() -> Self {
        TrackerConfig {
            password_params: PasswordParams::DEFAULT,
            session_lease: Millis::from_secs(15),
            peer_keys: BTreeMap::new(),
            report_applied: false,
            consensus_part: stream::PART,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TrackerOutput {
    /// Append this record to the log (not yet durable: see `Sync`).
    Persist(Persist),
    /// Make every record persisted so far durable, then report
    /// [`TrackerNode::handle_synced`] with this `seq` (or a later one).
    Sync { seq: u64 },
    /// Send to a connection.
    Transmit { conn: ConnId, bytes: Vec<u8> },
    /// Flush what was transmitted to `conn`, then close it.
    Close { conn: ConnId },
    /// Open this node's link to tracker `node`.
    Dial { node: NodeId },
    /// Close this node's link to tracker `node` (no report follows).
    Hangup { node: NodeId },
    /// Send on this node's link to tracker `node` (a whole frame).
    PeerSend { node: NodeId, bytes: Vec<u8> },
    /// Who leads changed (for the operator: print it, log it). `None` while
    /// there is no leader, or this node does not reach a majority.
    LeaderChanged { leader: Option<NodeId> },
    /// Write this chunk-list range (the bytes hash to `hash`) to the range
    /// store: like a log record, durable once a later `Sync` is reported.
    StoreRange { hash: Sha1Digest, bytes: Vec<u8> },
    /// Read this range from the range store and report it with
    /// [`TrackerNode::handle_range_loaded`] (after draining the outputs).
    LoadRange { hash: Sha1Digest },
    /// Remove this range from the range store (no file names it any more);
    /// no report follows, and it need not be durable before anything.
    DropRange { hash: Sha1Digest },
    /// Write `bytes` at `offset` of the partial snapshot base named `base`
    /// kept beside the log (offset 0 starts it again, for this base; a write
    /// past its end, or for another base, is dropped). It need not be
    /// durable: the restart hands back what is there
    /// ([`TrackerNode::restore_partial`]), and a torn one fails its hash
    /// when the sync completes, then comes again whole.
    SavePartial { base: Sha1Digest, offset: u64, bytes: Vec<u8> },
    /// Remove the partial snapshot base (its sync arrived, or it expired).
    DropPartial,
    /// Run this job off the event loop (a thread of its own: it can take
    /// a second) and report its result with [`TrackerNode::handle_job_done`].
    /// Nothing waits on it but the link it is for.
    Work { ticket: u64, job: Job },
    /// Only with [`TrackerConfig::report_applied`]: log entry `index` (1-based)
    /// was applied; `None` when a snapshot up to `index` was installed.
    Applied { index: u64, entry: Option<Entry> },
}

/// Work too slow for the event loop: encoding a consensus message the size
/// of the metadata (a sync carrying a snapshot) for a tracker that catches
/// up, or decoding one that arrived; or a password's argon2id (about 15 ms
/// each on a 2-core VM: a flood of logins on the loop would hold every
/// link's heartbeat). Run it anywhere ([`Job::run`]); a driver may run
/// password jobs apart from the others ([`Job::is_password`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job(JobKind);

#[derive(Clone, Debug, PartialEq, Eq)]
enum JobKind {
    /// A message to encode; offered with its base (see `stream`) if it
    /// comes to more than this many bytes (more than one part), else whole.
    Encode(Box<replicator::ConsensusMessage>, usize),
    /// A message that arrived, and where its snapshot's base ends (if it
    /// came offered with one).
    Decode(Vec<u8>, Option<stream::Base>),
    Password(PasswordJob),
}

/// A password to hash for a new account, or to check against an account's
/// hash. The password is never printed.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum PasswordJob {
    Derive { password: String, salt: [u8; 16], params: PasswordParams },
    Verify { password: String, hash: PasswordHash },
}

impl std::fmt::Debug for PasswordJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PasswordJob::Derive { .. } => f.write_str("PasswordJob::Derive(<redacted>)"),
            PasswordJob::Verify { .. } => f.write_str("PasswordJob::Verify(<redacted>)"),
        }
    }
}

/// What a [`Job`] produced, for [`TrackerNode::handle_job_done`].
pub struct JobDone(Done);

impl std::fmt::Debug for JobDone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Done::Encoded(b, _) => write!(f, "JobDone(encoded {} bytes)", b.len()),
            Done::Decoded(Ok(m)) => write!(f, "JobDone(decoded {m:?})"),
            Done::Decoded(Err(e)) => write!(f, "JobDone(not decoded: {e})"),
            Done::Derived(_) => f.write_str("JobDone(password hashed)"),
            Done::Verified(ok) => write!(f, "JobDone(password checked: {ok})"),
        }
    }
}

enum Done {
    /// The bytes, and the base they start with (a snapshot's state).
    Encoded(Vec<u8>, Option<stream::Base>),
    Decoded(Result<Box<replicator::ConsensusMessage>, crate::wire::FrameError>),
    Derived(PasswordHash),
    Verified(bool),
}

impl Job {
    pub fn run(self) -> JobDone {
        JobDone(match self.0 {
            JobKind::Encode(m, offer_over) => {
                let (bytes, base) = m.encode_with_base(offer_over);
                Done::Encoded(bytes, base)
            }
            JobKind::Decode(b, base) => {
                Done::Decoded(replicator::ConsensusMessage::decode_with_base(&b, base).map(Box::new))
            }
            JobKind::Password(PasswordJob::Derive { password, salt, params }) => {
                Done::Derived(PasswordHash::derive(&password, salt, params))
            }
            JobKind::Password(PasswordJob::Verify { password, hash }) => Done::Verified(hash.verify(&password)),
        })
    }

    /// `"encode"`, `"decode"` or `"password"` (for logs and counts).
    pub fn kind(&self) -> &'static str {
        match self.0 {
            JobKind::Encode(..) => "encode",
            JobKind::Decode(..) => "decode",
            JobKind::Password(_) => "password",
        }
    }

    /// Whether this hashes a password: it may run apart from the other
    /// jobs (nothing orders it with them), and it never waits behind one.
    pub fn is_password(&self) -> bool {
        matches!(self.0, JobKind::Password(_))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Before `Hello`.
    New,
    Client,
    /// Said `Hello` as a tracker; `Join` comes next.
    TrackerHello,
    Tracker(NodeId),
}

pub(crate) struct Conn {
    pub(crate) decoder: FrameDecoder,
    pub(crate) kind: Kind,
    pub(crate) remote: IpAddr,
    pub(crate) opened: Millis,
    pub(crate) last_seen: Millis,
    /// Since when a frame has been arriving without completing.
    pub(crate) partial_since: Option<Millis>,
    /// Writes of this connection proposed and not yet answered.
    pub(crate) in_flight: usize,
    /// The key the other end proved (TLS), once the driver reports it.
    pub(crate) key: Option<KeyId>,
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
/// Passwords being hashed off the loop at once (logins and new accounts):
/// past this (about 4 s of argon2 on one thread) a login is answered
/// `Limit`, so a flood queues neither memory nor minutes of work. Each also
/// holds a write slot of its connection ([`MAX_WRITES_IN_FLIGHT`]).
pub const MAX_PASSWORD_JOBS: usize = 256;
/// How often connection deadlines and soft state are swept (and soft state gossiped).
const SWEEP_EVERY: Millis = Millis(1_000);
/// A write not decided by then is answered `NoQuorum`.
pub const WRITE_DEADLINE: Millis = Millis(2_000);
/// Largest log entry, encoded. Bulk data (a file's chunk list) lives beside
/// the log ([`ranges`]); an entry over this is refused at the request
/// (etcd refuses requests over 1.5 MiB the same way).
pub const MAX_ENTRY_BYTES: usize = 64 * 1024;
/// Largest frame between trackers. What can be big travels in bounded
/// frames: consensus messages in parts of [`stream::PART`], chunk-list
/// ranges of [`crate::chunk::RANGE_CHUNKS`] hashes (320 KiB), soft state in
/// batches of [`SOFT_BATCH`] items (under 1 MiB).
pub const MAX_TRACKER_FRAME: usize = 2 * 1024 * 1024;
const _: () = assert!(stream::PART + 1024 <= MAX_TRACKER_FRAME);
const _: () = assert!(crate::chunk::RANGE_CHUNKS as usize * 20 + 1024 <= MAX_TRACKER_FRAME);
const _: () = assert!(SOFT_BATCH * 512 <= MAX_TRACKER_FRAME / 2);
/// Items of soft state (leases, grants, partial holders) in one frame: at
/// most about 450 bytes each (a grant naming a 255-byte file), so a frame
/// stays under 1 MiB however much a tracker knows (up to [`MAX_GRANTS`]
/// grants, all sent on a new link).
pub const SOFT_BATCH: usize = 2048;

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum LoginKey {
    User(UserId),
    Addr(IpAddr),
}

/// How long a download grant stays valid; a downloader asks again for sources
/// (and a fresh grant) every few seconds while it runs.
pub const GRANT_TTL: Millis = Millis(10 * 60 * 1000);
/// Most grants alive at once.
pub const MAX_GRANTS: usize = 100_000;
/// Most partial holders remembered per file.
pub const MAX_PARTIAL_HOLDERS: usize = 1024;

pub(crate) struct GrantInfo {
    pub(crate) user: UserId,
    /// The key the downloader proved (`None`: a plaintext session's grant).
    pub(crate) key: Option<KeyId>,
    pub(crate) group: GroupId,
    pub(crate) name: FileName,
    expires: Millis,
}

#[cfg(test)]
mod tests;
