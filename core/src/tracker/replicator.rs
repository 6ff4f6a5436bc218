//! The narrow interface between a tracker node and the replicated log.
//!
//! A node proposes entries and applies, in order, whatever comes out of
//! [`Replicator::poll_decided`]. Every node of a cluster sees the same decided
//! sequence. Two implementations:
//!
//! - [`SoloReplicator`], a cluster of one: what is proposed is decided at once;
//! - [`super::omni::OmniReplicator`], omnipaxos across the trackers of
//!   `tracker_info.txt`.
//!
//! Calling contract (the tracker node does this for its driver): after every
//! input, drain [`Replicator::poll_persist`] (records the driver makes durable
//! before it sends anything that follows them), then [`Replicator::poll_send`]
//! (messages to other trackers), then [`Replicator::poll_decided`]; once
//! nothing more is decided, if [`Replicator::snapshot_due`], call
//! [`Replicator::take_snapshot`] with the state every decided entry was
//! applied to, and drain again.

use std::collections::VecDeque;

use crate::meta::{Entry, MetaState};
use crate::time::Millis;
pub use crate::tracker::omni::LogImage;
use crate::wire::FrameError;

/// A tracker's id: its line in `tracker_info.txt` (1-based).
pub type NodeId = u64;

/// What the log hands the state machine, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decided {
    /// Apply this entry.
    Entry(Entry),
    /// Replace the state with this one (a snapshot of a longer prefix of the
    /// log than was applied: this node was far behind, or starts empty).
    Install(Box<MetaState>),
}

/// A consensus message, decoded: what a replicator sends and takes.
#[derive(Clone)]
pub struct ConsensusMessage(pub(crate) omnipaxos::messages::Message<Entry>);

impl ConsensusMessage {
    /// The message in `bytes` (from another tracker: untrusted).
    pub fn decode(bytes: &[u8]) -> Result<ConsensusMessage, FrameError> {
        crate::wire::decode(bytes).map(ConsensusMessage)
    }

    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(&self.0).expect("encode to Vec")
    }

    /// A leader election heartbeat: it keeps no order with the log's
    /// messages (see [`Outbound::Heartbeat`]).
    pub fn is_heartbeat(&self) -> bool {
        matches!(self.0, omnipaxos::messages::Message::BLE(_))
    }
}

impl std::fmt::Debug for ConsensusMessage {
    /// Its kind and ends only: one may hold the whole metadata.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use omnipaxos::messages::Message as M;
        match &self.0 {
            M::SequencePaxos(p) => {
                let kind = format!("{:?}", p.msg);
                let kind = kind.split(['(', ' ', '{']).next().unwrap_or("");
                write!(f, "ConsensusMessage({kind} {} -> {})", p.from, p.to)
            }
            M::BLE(b) => write!(f, "ConsensusMessage(BLE {} -> {})", b.from, b.to),
        }
    }
}

impl PartialEq for ConsensusMessage {
    /// By encoding (tests compare outputs; nothing else does).
    fn eq(&self, other: &ConsensusMessage) -> bool {
        self.encode() == other.encode()
    }
}

impl Eq for ConsensusMessage {}

/// A consensus message for another tracker, as a replicator hands it out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outbound {
    Encoded(Vec<u8>),
    /// One that carries a snapshot of the metadata, or many log entries:
    /// too big to encode on the event loop (the node has it encoded off it,
    /// see [`crate::tracker::Job`]).
    Snapshot(Box<ConsensusMessage>),
    /// A leader election heartbeat, encoded: it promises nothing and keeps
    /// no order with the log's messages, so it leaves at once, past votes
    /// waiting for this node's disk and parts of a big message (and is
    /// handled on arrival, past one being decoded). Held behind a vote
    /// while a snapshot's log rewrite was fsynced, the heartbeats of a
    /// round came too late and the cluster elected a new leader after
    /// each snapshot.
    Heartbeat(Vec<u8>),
}

impl Outbound {
    /// Its bytes, encoding it here if it is not yet.
    pub fn into_bytes(self) -> Vec<u8> {
        match self {
            Outbound::Encoded(b) | Outbound::Heartbeat(b) => b,
            Outbound::Snapshot(m) => m.encode(),
        }
    }
}

/// A record for the durable log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Persist {
    /// Append it; durable before anything that follows it is sent.
    Append(Vec<u8>),
    /// Append it, but it need not be durable before sends: a crash may lose
    /// it until a later `Append` (or `Rewrite`) is made durable. For records
    /// whose loss recovery tolerates (omnipaxos's decided index: a restarted
    /// node learns it again from the others).
    Lazy(Vec<u8>),
    /// Replace the whole log with the records of this image, in order
    /// (after compaction: an image of the storage, in parts of at most
    /// [`crate::tracker::omni::IMAGE_PART`] so no record is over the log's
    /// limit). The image is a copy that shares the live state's nodes, so
    /// taking it costs the event loop nothing; whoever writes the log
    /// encodes it ([`LogImage::records`]), off the loop.
    Rewrite(Box<LogImage>),
}

pub trait Replicator {
    /// Offers an entry for the log. It may be decided later, or never (then
    /// the client times out and retries with the same request id).
    fn propose(&mut self, entry: Entry);
    /// The next decided entry, in log order.
    fn poll_decided(&mut self) -> Option<Decided>;
    /// The next record to make durable.
    fn poll_persist(&mut self) -> Option<Persist>;
    /// The next message for another tracker, and whether it must wait until
    /// the records polled before it are durable (a vote: it promises what
    /// those records hold). Other messages may leave while they are written.
    fn poll_send(&mut self) -> Option<(NodeId, Outbound, bool)> {
        None
    }
    /// Whether the log is due a snapshot now: asked once every decided entry
    /// was handed out and applied. (No default: a wrapper that forgot to
    /// pass it on would never compact its log.)
    fn snapshot_due(&self) -> bool;
    /// Snapshots the log; `live` is the state machine with every decided
    /// entry applied.
    fn take_snapshot(&mut self, live: &MetaState);
    /// A message from tracker `from`, encoded.
    fn handle_message(&mut self, from: NodeId, bytes: &[u8]) -> Result<(), FrameError> {
        self.handle_decoded(from, ConsensusMessage::decode(bytes)?, None)
    }
    /// A message from tracker `from`, decoded (off the event loop, when
    /// big). `live` is the state machine with every decided entry applied,
    /// if the caller has it: a sync that needs the state up to there (to
    /// send a snapshot, or to merge one in) takes it instead of applying
    /// the log's entries again.
    fn handle_decoded(
        &mut self,
        _from: NodeId,
        _msg: ConsensusMessage,
        _live: Option<&MetaState>,
    ) -> Result<(), FrameError> {
        Ok(())
    }
    /// A link to tracker `node` was (re)established.
    fn handle_peer_up(&mut self, _node: NodeId) {}
    fn handle_timeout(&mut self, _now: Millis) {}
    fn poll_timeout(&self) -> Option<Millis> {
        None
    }
    /// Whether answers to clients must wait until the records polled before
    /// them are durable. True when an entry is decided in the same step it is
    /// written (a log of one); with consensus, an answered entry was made
    /// durable by a majority in earlier steps, so answers need not wait.
    fn answers_need_sync(&self) -> bool {
        true
    }
    /// Who leads, as far as this node knows.
    fn leader(&self) -> Option<NodeId>;
    /// A number that changes whenever leadership may have (a new ballot
    /// promised): entries proposed before may have been dropped.
    fn term(&self) -> u64 {
        0
    }
    /// Whether this node has caught up with the cluster since it started: it
    /// may answer reads only then.
    fn is_synced(&self) -> bool {
        true
    }
    fn me(&self) -> NodeId;
    fn peers(&self) -> &[NodeId] {
        &[]
    }
    /// The log index up to which entries are decided, and the one below
    /// which they live only in the snapshot (for the operator); `None` if
    /// the log does not say (every decided entry is applied at once).
    fn log_indexes(&self) -> Option<(u64, u64)> {
        None
    }
}

/// A log of one: every proposal is decided immediately.
#[derive(Debug, Default)]
pub struct SoloReplicator {
    decided: VecDeque<Entry>,
    persist: VecDeque<Vec<u8>>,
}

impl SoloReplicator {
    /// Rebuilds the log from its durable records (each one entry), oldest first.
    pub fn recover<'a>(records: impl IntoIterator<Item = &'a [u8]>) -> Result<SoloReplicator, FrameError> {
        let mut r = SoloReplicator::default();
        for rec in records {
            r.decided.push_back(crate::wire::decode(rec)?);
        }
        Ok(r)
    }
}

impl Replicator for SoloReplicator {
    fn propose(&mut self, entry: Entry) {
        self.persist.push_back(postcard::to_allocvec(&entry).expect("postcard encoding into a Vec"));
        self.decided.push_back(entry);
    }

    fn poll_decided(&mut self) -> Option<Decided> {
        self.decided.pop_front().map(Decided::Entry)
    }

    fn poll_persist(&mut self) -> Option<Persist> {
        self.persist.pop_front().map(Persist::Append)
    }

    /// A log of one keeps every entry (its replay is the state).
    fn snapshot_due(&self) -> bool {
        false
    }

    fn take_snapshot(&mut self, _live: &MetaState) {}

    fn leader(&self) -> Option<NodeId> {
        Some(1)
    }

    fn me(&self) -> NodeId {
        1
    }
}
