//! Big consensus messages travel in parts, a window at a time.
//!
//! Catching a tracker up can take one consensus message as big as the whole
//! metadata (omnipaxos's `AcceptSync` with a snapshot). Sent as one frame it
//! would sit in front of the link's heartbeats for as long as the path takes
//! to carry it (seconds on a slow one: past [`super::links::LINK_DEADLINE`],
//! so the link is dropped and the transfer starts over), and it would need a
//! frame limit as big as the state. Instead a message over [`PART`] goes as
//! [`TrackerFrame::ConsensusPart`]s; at most [`WINDOW_PARTS`] of them are
//! unacknowledged at once (the receiver answers each with
//! [`TrackerFrame::ConsensusAck`] on its own link), so pings, soft state and
//! ranges go between them, and the receiver puts the parts together and hands
//! the whole message to its replicator (Raft's chunked InstallSnapshot does
//! the same). Consensus messages after a big one wait behind it: a link keeps
//! their order.
//!
//! A link that drops loses its transfer; omnipaxos sends the sync again when
//! the link is back.

use std::collections::{BTreeMap, VecDeque};

use super::*;

/// Consensus messages over this are sent in parts of this size.
pub const PART: usize = 256 * 1024;
/// Parts sent to one tracker and not yet acknowledged (4 MiB at [`PART`]).
pub const WINDOW_PARTS: usize = 16;
/// Largest consensus message put together from parts (a snapshot of the
/// metadata): a peer cannot make a tracker buffer more.
pub const MAX_CONSENSUS_MESSAGE: usize = 1 << 30;

/// A frame waiting for the window, and the part bytes it carries (0 for a
/// whole message).
struct Queued {
    frame: Vec<u8>,
    after_sync: bool,
    part: usize,
}

#[derive(Default)]
struct Outgoing {
    queue: VecDeque<Queued>,
    unacked: usize,
}

/// A message arriving in parts.
struct Incoming {
    xfer: u64,
    bytes: Vec<u8>,
}

#[derive(Default)]
pub(crate) struct Streams {
    out: BTreeMap<NodeId, Outgoing>,
    inc: BTreeMap<NodeId, Incoming>,
    next_xfer: u64,
}

impl<R: Replicator> TrackerNode<R> {
    /// Sends a consensus message on our link to `node`: whole if it is
    /// small and nothing waits before it, else queued (in parts if big).
    pub(crate) fn send_consensus(&mut self, node: NodeId, bytes: Vec<u8>, after_sync: bool) {
        let part = self.cfg.consensus_part.max(1);
        let idle = self.streams.out.get(&node).is_none_or(|o| o.queue.is_empty());
        if bytes.len() <= part && idle {
            let frame = encode(&Message::Tracker(TrackerFrame::Consensus(bytes)));
            return self.link_send(node, frame, after_sync);
        }
        if !self.links.is_up(node) {
            return;
        }
        if self.streams.next_xfer == 0 {
            self.streams.next_xfer = self.rng.next_u64() >> 1;
        }
        self.streams.next_xfer += 1;
        let xfer = self.streams.next_xfer;
        let out = self.streams.out.entry(node).or_default();
        if bytes.len() <= part {
            let frame = encode(&Message::Tracker(TrackerFrame::Consensus(bytes)));
            out.queue.push_back(Queued { frame, after_sync, part: 0 });
        } else {
            tracing::debug!(node, bytes = bytes.len(), "sending a consensus message in parts");
            let n = bytes.len().div_ceil(part);
            for (i, c) in bytes.chunks(part).enumerate() {
                let part = TrackerFrame::ConsensusPart { xfer, last: i + 1 == n, bytes: c.to_vec() };
                out.queue.push_back(Queued { frame: encode(&Message::Tracker(part)), after_sync, part: c.len() });
            }
        }
        self.release_parts(node);
    }

    /// Sends what the window allows of what waits for `node`.
    fn release_parts(&mut self, node: NodeId) {
        let window = self.cfg.consensus_part.max(1) * WINDOW_PARTS;
        let mut ready = Vec::new();
        if let Some(out) = self.streams.out.get_mut(&node) {
            while let Some(q) = out.queue.front() {
                if q.part > 0 && out.unacked + q.part > window && out.unacked > 0 {
                    break;
                }
                let Some(q) = out.queue.pop_front() else { break };
                out.unacked += q.part;
                ready.push((q.frame, q.after_sync));
            }
        }
        for (frame, after_sync) in ready {
            self.link_send(node, frame, after_sync);
        }
    }

    /// Our link to `node` is gone: what waited for it is dropped.
    pub(crate) fn streams_link_lost(&mut self, node: NodeId) {
        self.streams.out.remove(&node);
    }

    /// A part of a consensus message, on `node`'s link to us.
    pub(crate) fn handle_consensus_part(&mut self, conn: ConnId, node: NodeId, part: (u64, bool, Vec<u8>)) {
        let (xfer, last, bytes) = part;
        let inc = self.streams.inc.entry(node).or_insert(Incoming { xfer, bytes: Vec::new() });
        if inc.xfer != xfer {
            // A new message: the one before was abandoned (its link dropped).
            *inc = Incoming { xfer, bytes: Vec::new() };
        }
        if inc.bytes.len() + bytes.len() > MAX_CONSENSUS_MESSAGE {
            self.streams.inc.remove(&node);
            return self.refuse(conn, format!("a consensus message over {MAX_CONSENSUS_MESSAGE} bytes"));
        }
        inc.bytes.extend_from_slice(&bytes);
        let ack = encode(&Message::Tracker(TrackerFrame::ConsensusAck { xfer, bytes: bytes.len() as u32 }));
        self.link_send(node, ack, false);
        if !last {
            return;
        }
        let Some(whole) = self.streams.inc.remove(&node) else { return };
        tracing::debug!(node, bytes = whole.bytes.len(), "a consensus message arrived in parts");
        if let Err(e) = self.replicator.handle_message(node, &whole.bytes) {
            tracing::warn!(node, error = %e, "bad consensus message, closing");
            return self.refuse(conn, format!("bad consensus message: {e}"));
        }
        self.pump(self.now);
    }

    /// `node` received part bytes we sent: the window moves on.
    pub(crate) fn handle_consensus_ack(&mut self, node: NodeId, bytes: u32) {
        if let Some(out) = self.streams.out.get_mut(&node) {
            out.unacked = out.unacked.saturating_sub(bytes as usize);
        }
        self.release_parts(node);
    }
}
