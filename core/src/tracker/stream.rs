//! Big consensus messages travel in parts, a window at a time, and are
//! encoded and decoded off the event loop.
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
//! Encoding or decoding a snapshot of a million files takes the better part
//! of a second, long enough for the links' heartbeats to miss their deadline
//! (and the resync that follows to start it all again). So a message that
//! carries a snapshot is encoded by a [`Job`] the driver runs on a thread of
//! its own, and one that arrived in parts is decoded by one; messages on the
//! same link wait for it, in order, and the loop goes on answering.
//!
//! A link that drops loses its transfer; omnipaxos sends the sync again when
//! the link is back.

use std::collections::{BTreeMap, VecDeque};

use super::replicator::{ConsensusMessage, Outbound};
use super::*;
use crate::wire::FrameError;

/// Consensus messages over this are sent in parts of this size.
pub const PART: usize = 256 * 1024;
/// Parts sent to one tracker and not yet acknowledged (4 MiB at [`PART`]).
pub const WINDOW_PARTS: usize = 16;
/// Largest consensus message put together from parts (a snapshot of the
/// metadata): a peer cannot make a tracker buffer more.
pub const MAX_CONSENSUS_MESSAGE: usize = 1 << 30;
/// Consensus messages from one tracker held behind one being decoded (it
/// takes about a second; a tracker sends far fewer meanwhile).
pub const MAX_WAITING_BEHIND_DECODE: usize = 65_536;

/// What waits for the window on a link.
enum Queued {
    /// A frame, and the part bytes it carries (0 for a whole message).
    Frame { frame: Vec<u8>, after_sync: bool, part: usize },
    /// A message being encoded by job `ticket`: its frames take this place.
    Encoding { ticket: u64, after_sync: bool },
}

#[derive(Default)]
struct Outgoing {
    queue: VecDeque<Queued>,
    unacked: usize,
}

/// A message arriving in parts, on the link `conn`.
struct Incoming {
    xfer: u64,
    conn: ConnId,
    bytes: Vec<u8>,
}

/// A consensus message from a tracker, in the order it arrived, waiting
/// for one before it to be decoded.
enum Arrived {
    Decoding { conn: ConnId, ticket: u64 },
    Decoded { conn: ConnId, msg: Result<Box<ConsensusMessage>, FrameError> },
}

#[derive(Default)]
pub(crate) struct Streams {
    out: BTreeMap<NodeId, Outgoing>,
    inc: BTreeMap<NodeId, Incoming>,
    /// Per tracker, what arrived behind a message being decoded.
    arrived: BTreeMap<NodeId, VecDeque<Arrived>>,
    next_xfer: u64,
    next_ticket: u64,
}

impl<R: Replicator> TrackerNode<R> {
    /// Sends what the replicator handed out for `node`: encoded, or (a
    /// snapshot) by a job, its place in the link's order kept.
    pub(crate) fn send_outbound(&mut self, node: NodeId, out: Outbound, after_sync: bool) {
        match out {
            Outbound::Encoded(bytes) => self.send_consensus(node, bytes, after_sync),
            Outbound::Heartbeat(bytes) => {
                self.link_send_now(node, encode(&Message::Tracker(TrackerFrame::Consensus(bytes))))
            }
            Outbound::Snapshot(msg) => {
                if !self.links.is_up(node) {
                    return;
                }
                let ticket = self.ticket();
                tracing::debug!(node, ticket, "encoding a snapshot for a tracker, off the loop");
                let out = self.streams.out.entry(node).or_default();
                out.queue.push_back(Queued::Encoding { ticket, after_sync });
                self.outbox.push(TrackerOutput::Work { ticket, job: Job(JobKind::Encode(msg)) });
            }
        }
    }

    pub(crate) fn ticket(&mut self) -> u64 {
        if self.streams.next_ticket == 0 {
            self.streams.next_ticket = self.rng.next_u64() >> 1;
        }
        self.streams.next_ticket += 1;
        self.streams.next_ticket
    }

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
        let frames = self.frames(node, bytes, after_sync);
        self.streams.out.entry(node).or_default().queue.extend(frames);
        self.release_parts(node);
    }

    /// The frames that carry `bytes` to `node`: one, or its parts.
    fn frames(&mut self, node: NodeId, bytes: Vec<u8>, after_sync: bool) -> Vec<Queued> {
        let part = self.cfg.consensus_part.max(1);
        if bytes.len() <= part {
            let frame = encode(&Message::Tracker(TrackerFrame::Consensus(bytes)));
            return vec![Queued::Frame { frame, after_sync, part: 0 }];
        }
        if self.streams.next_xfer == 0 {
            self.streams.next_xfer = self.rng.next_u64() >> 1;
        }
        self.streams.next_xfer += 1;
        let xfer = self.streams.next_xfer;
        tracing::debug!(node, bytes = bytes.len(), "sending a consensus message in parts");
        let n = bytes.len().div_ceil(part);
        bytes
            .chunks(part)
            .enumerate()
            .map(|(i, c)| {
                let part = TrackerFrame::ConsensusPart { xfer, last: i + 1 == n, bytes: c.to_vec() };
                Queued::Frame { frame: encode(&Message::Tracker(part)), after_sync, part: c.len() }
            })
            .collect()
    }

    /// Sends what the window allows of what waits for `node`.
    fn release_parts(&mut self, node: NodeId) {
        let window = self.cfg.consensus_part.max(1) * WINDOW_PARTS;
        let mut ready = Vec::new();
        if let Some(out) = self.streams.out.get_mut(&node) {
            while let Some(Queued::Frame { part, .. }) = out.queue.front() {
                if *part > 0 && out.unacked + part > window && out.unacked > 0 {
                    break;
                }
                let Some(Queued::Frame { frame, after_sync, part }) = out.queue.pop_front() else { break };
                out.unacked += part;
                ready.push((frame, after_sync));
            }
        }
        for (frame, after_sync) in ready {
            self.link_send(node, frame, after_sync);
        }
    }

    /// Our link to `node` is gone: what waited for it is dropped (a job
    /// still encoding for it is ignored when done).
    pub(crate) fn streams_link_lost(&mut self, node: NodeId) {
        self.streams.out.remove(&node);
    }

    /// A connection closed: a message arriving in parts on it never ends
    /// (its sender starts it again, whole, on its next link), and what it
    /// holds (up to a snapshot) is freed now.
    pub(crate) fn streams_conn_closed(&mut self, conn: ConnId) {
        self.streams.inc.retain(|_, inc| inc.conn != conn);
    }

    /// The trackers whose consensus message is arriving in parts now: begun,
    /// not yet whole (a snapshot on its way to this tracker, say).
    pub fn receiving_in_parts(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.streams.inc.keys().copied()
    }

    /// A job the driver ran is done.
    pub fn handle_job_done(&mut self, ticket: u64, done: JobDone, now: Millis) {
        self.now = self.now.max(now);
        match done.0 {
            Done::Encoded(bytes) => {
                let found = self.streams.out.iter().find_map(|(node, o)| {
                    let at =
                        o.queue.iter().position(|q| matches!(q, Queued::Encoding { ticket: t, .. } if *t == ticket));
                    at.map(|at| (*node, at))
                });
                let Some((node, at)) = found else { return };
                let Some(Queued::Encoding { after_sync, .. }) =
                    self.streams.out.get_mut(&node).and_then(|o| o.queue.remove(at))
                else {
                    return;
                };
                let frames = self.frames(node, bytes, after_sync);
                if let Some(o) = self.streams.out.get_mut(&node) {
                    for (i, f) in frames.into_iter().enumerate() {
                        o.queue.insert(at + i, f);
                    }
                }
                self.release_parts(node);
            }
            Done::Decoded(msg) => {
                let found = self.streams.arrived.iter_mut().find_map(|(node, q)| {
                    q.iter_mut()
                        .find(|a| matches!(a, Arrived::Decoding { ticket: t, .. } if *t == ticket))
                        .map(|a| (*node, a))
                });
                let Some((node, a)) = found else { return };
                let Arrived::Decoding { conn, .. } = *a else { return };
                *a = Arrived::Decoded { conn, msg };
                self.take_arrived(node);
            }
            Done::Derived(hash) => self.password_derived(ticket, hash, now),
            Done::Verified(ok) => self.password_verified(ticket, ok, now),
        }
        self.pump(self.now);
    }

    /// A whole consensus message from `node`, on its link `conn`: handed to
    /// the replicator now if nothing before it waits, else queued; decoded
    /// by a job if it came in parts (it may be the size of the state).
    pub(crate) fn handle_consensus(&mut self, conn: ConnId, node: NodeId, bytes: Vec<u8>) {
        let waiting = self.streams.arrived.get(&node).is_some_and(|q| !q.is_empty());
        if bytes.len() > self.cfg.consensus_part.max(1) {
            let ticket = self.ticket();
            tracing::debug!(node, ticket, bytes = bytes.len(), "decoding a consensus message, off the loop");
            self.streams.arrived.entry(node).or_default().push_back(Arrived::Decoding { conn, ticket });
            self.outbox.push(TrackerOutput::Work { ticket, job: Job(JobKind::Decode(bytes)) });
        } else if waiting {
            let msg = ConsensusMessage::decode(&bytes);
            if msg.as_ref().is_ok_and(|m| m.is_heartbeat()) {
                // Keeps no order: see `Outbound::Heartbeat`.
                return self.hand_over(conn, node, msg);
            }
            let q = self.streams.arrived.entry(node).or_default();
            if q.len() >= MAX_WAITING_BEHIND_DECODE {
                self.streams.arrived.remove(&node);
                return self.refuse(conn, "too many consensus messages behind one being decoded".into());
            }
            q.push_back(Arrived::Decoded { conn, msg: msg.map(Box::new) });
        } else {
            self.hand_over(conn, node, ConsensusMessage::decode(&bytes));
        }
    }

    /// Hands the replicator what arrived from `node`, in order, up to a
    /// message still being decoded.
    fn take_arrived(&mut self, node: NodeId) {
        loop {
            let Some(q) = self.streams.arrived.get_mut(&node) else { return };
            if matches!(q.front(), None | Some(Arrived::Decoding { .. })) {
                if q.is_empty() {
                    self.streams.arrived.remove(&node);
                }
                return;
            }
            match q.pop_front() {
                Some(Arrived::Decoded { conn, msg }) => self.hand_over(conn, node, msg.map(|m| *m)),
                _ => return,
            }
        }
    }

    /// Hands a decoded message from `node` (on its link `conn`) to the
    /// replicator, with the live state; one that does not decode or is
    /// refused closes the link.
    fn hand_over(&mut self, conn: ConnId, node: NodeId, msg: Result<ConsensusMessage, FrameError>) {
        let r = msg.and_then(|m| self.replicator.handle_decoded(node, m, Some(&self.meta)));
        if let Err(e) = r {
            tracing::warn!(node, error = %e, "bad consensus message, closing");
            self.streams.arrived.remove(&node);
            return self.refuse(conn, format!("bad consensus message: {e}"));
        }
        self.pump(self.now);
    }

    /// A part of a consensus message, on `node`'s link to us.
    pub(crate) fn handle_consensus_part(&mut self, conn: ConnId, node: NodeId, part: (u64, bool, Vec<u8>)) {
        let (xfer, last, bytes) = part;
        let inc = self.streams.inc.entry(node).or_insert(Incoming { xfer, conn, bytes: Vec::new() });
        if inc.xfer != xfer || inc.conn != conn {
            // A new message: the one before was abandoned (its link dropped).
            *inc = Incoming { xfer, conn, bytes: Vec::new() };
        }
        if inc.bytes.len() + bytes.len() > MAX_CONSENSUS_MESSAGE {
            self.streams.inc.remove(&node);
            return self.refuse(conn, format!("a consensus message over {MAX_CONSENSUS_MESSAGE} bytes"));
        }
        inc.bytes.extend_from_slice(&bytes);
        let ack = encode(&Message::Tracker(TrackerFrame::ConsensusAck { xfer, bytes: bytes.len() as u32 }));
        self.link_send_now(node, ack);
        if !last {
            return;
        }
        let Some(whole) = self.streams.inc.remove(&node) else { return };
        tracing::debug!(node, bytes = whole.bytes.len(), "a consensus message arrived in parts");
        self.handle_consensus(conn, node, whole.bytes);
    }

    /// `node` received part bytes we sent: the window moves on.
    pub(crate) fn handle_consensus_ack(&mut self, node: NodeId, bytes: u32) {
        if let Some(out) = self.streams.out.get_mut(&node) {
            out.unacked = out.unacked.saturating_sub(bytes as usize);
        }
        self.release_parts(node);
    }
}
