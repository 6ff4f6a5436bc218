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
//! A message that carries a complete snapshot is offered first
//! ([`TrackerFrame::ConsensusOffer`]): its bytes begin with the snapshot's
//! base state (the sender's stored snapshot, the same bytes until it
//! compacts again: see `omni`), named by their SHA1. A link that drops loses
//! the rest of its transfer, but the receiver keeps what it got of a base
//! ([`Kept`]); when omnipaxos sends the sync again (on the next link, or
//! from the next leader), the receiver answers the offer of the same base
//! with how much of it it holds ([`TrackerFrame::ConsensusResume`]), and the
//! sender sends the parts from there. The job that decodes the message
//! checks the base against its hash, so bytes kept from one transfer never
//! pass for another's. A message without a base starts again whole.

use std::collections::{BTreeMap, VecDeque};

use super::replicator::{ConsensusMessage, Outbound};
use super::*;
use crate::chunk::Sha1Digest;
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

/// A partial base kept this long after its transfer broke off, for the
/// sync sent again to resume from (longer than a leader change and a
/// redial take, shorter than a tracker would hold the memory for nothing).
pub const KEEP_PARTIAL: Millis = Millis(120_000);

/// The first `len` bytes of an encoded consensus message: the state at the
/// base of the snapshot it carries, whose SHA1 is `digest`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Base {
    pub(crate) digest: Sha1Digest,
    pub(crate) len: usize,
}

/// What waits for the window on a link.
enum Queued {
    /// A frame, and the part bytes it carries (0 for a whole message).
    Frame { frame: Vec<u8>, after_sync: bool, part: usize },
    /// A message being encoded by job `ticket`: its frames take this place.
    Encoding { ticket: u64, after_sync: bool },
    /// A message offered (`ConsensusOffer` sent): its parts wait for the
    /// receiver to say where they start.
    Offered { xfer: u64, bytes: Vec<u8>, base: Base, after_sync: bool },
}

#[derive(Default)]
struct Outgoing {
    queue: VecDeque<Queued>,
    unacked: usize,
}

/// A message arriving in parts, on the link `conn`; `offer` is the base
/// and length an offer announced.
struct Incoming {
    xfer: u64,
    conn: ConnId,
    bytes: Vec<u8>,
    offer: Option<(Base, usize)>,
}

/// What a transfer that broke off had received of a snapshot's base: a sync
/// offered again with the same base resumes from its end.
struct Kept {
    digest: Sha1Digest,
    bytes: Vec<u8>,
    /// When it was kept (`None`: restored at start, the clock not yet read).
    at: Option<Millis>,
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
    /// At most one partial base (one snapshot's worth of memory).
    kept: Option<Kept>,
    /// Bytes of offered messages not sent again, thanks to `kept`.
    resumed: u64,
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
                let offer_over = self.cfg.consensus_part.max(1);
                self.outbox.push(TrackerOutput::Work { ticket, job: Job(JobKind::Encode(msg, offer_over)) });
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
        let frames = self.frames(node, bytes, None, after_sync);
        self.streams.out.entry(node).or_default().queue.extend(frames);
        self.release_parts(node);
    }

    /// The frames that carry `bytes` to `node`: one, or its parts; or, for
    /// a message with a snapshot's `base`, an offer and the parts waiting
    /// for its answer.
    fn frames(&mut self, node: NodeId, bytes: Vec<u8>, base: Option<Base>, after_sync: bool) -> Vec<Queued> {
        let part = self.cfg.consensus_part.max(1);
        if bytes.len() <= part && base.is_none() {
            let frame = encode(&Message::Tracker(TrackerFrame::Consensus(bytes)));
            return vec![Queued::Frame { frame, after_sync, part: 0 }];
        }
        let xfer = self.xfer();
        let Some(base) = base else {
            tracing::debug!(node, bytes = bytes.len(), "sending a consensus message in parts");
            return self.parts(xfer, &bytes, after_sync);
        };
        tracing::debug!(node, bytes = bytes.len(), base = base.len, "offering a snapshot sync");
        let offer = TrackerFrame::ConsensusOffer {
            xfer,
            base: base.digest,
            base_len: base.len as u64,
            len: bytes.len() as u64,
        };
        vec![
            Queued::Frame { frame: encode(&Message::Tracker(offer)), after_sync, part: 0 },
            Queued::Offered { xfer, bytes, base, after_sync },
        ]
    }

    fn xfer(&mut self) -> u64 {
        if self.streams.next_xfer == 0 {
            self.streams.next_xfer = self.rng.next_u64() >> 1;
        }
        self.streams.next_xfer += 1;
        self.streams.next_xfer
    }

    /// `bytes` as the parts of transfer `xfer` (at least one: the last).
    fn parts(&self, xfer: u64, bytes: &[u8], after_sync: bool) -> Vec<Queued> {
        let part = self.cfg.consensus_part.max(1);
        let n = bytes.len().div_ceil(part).max(1);
        (0..n)
            .map(|i| {
                let c = &bytes[(i * part).min(bytes.len())..((i + 1) * part).min(bytes.len())];
                let part = TrackerFrame::ConsensusPart { xfer, last: i + 1 == n, bytes: c.to_vec() };
                Queued::Frame { frame: encode(&Message::Tracker(part)), after_sync, part: c.len() }
            })
            .collect()
    }

    /// Puts `frames` at `at` in what waits for `node` (the place a message
    /// held while it was encoded or offered), and sends what the window allows.
    fn put_in_place(&mut self, node: NodeId, at: usize, frames: Vec<Queued>) {
        if let Some(o) = self.streams.out.get_mut(&node) {
            for (i, f) in frames.into_iter().enumerate() {
                o.queue.insert(at + i, f);
            }
        }
        self.release_parts(node);
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
    /// (its sender starts it again on its next link), and what it holds is
    /// freed now, but for what it got of a snapshot's base (see [`Kept`]).
    pub(crate) fn streams_conn_closed(&mut self, conn: ConnId) {
        let broken: Vec<NodeId> = self.streams.inc.iter().filter(|(_, i)| i.conn == conn).map(|(n, _)| *n).collect();
        for node in broken {
            if let Some(inc) = self.streams.inc.remove(&node) {
                self.keep_partial(inc);
            }
        }
    }

    /// Keeps what `inc` got of its base, in place of what was kept before.
    fn keep_partial(&mut self, inc: Incoming) {
        let Some((base, _)) = inc.offer else { return };
        let mut bytes = inc.bytes;
        bytes.truncate(base.len);
        if bytes.is_empty() {
            return;
        }
        tracing::debug!(bytes = bytes.len(), of = base.len, "keeping a snapshot's partial base to resume from");
        self.streams.kept = Some(Kept { digest: base.digest, bytes, at: Some(self.now) });
    }

    /// Frees a partial base kept past [`KEEP_PARTIAL`].
    pub(crate) fn streams_timeout(&mut self, now: Millis) {
        let Some(k) = self.streams.kept.as_mut() else { return };
        let at = *k.at.get_or_insert(now);
        if now.since(at) >= KEEP_PARTIAL {
            tracing::debug!("freeing a snapshot's partial base no sync resumed");
            self.streams.kept = None;
            self.outbox.push(TrackerOutput::DropPartial);
        }
    }

    /// The partial snapshot base the driver found beside the log at start
    /// (see [`TrackerOutput::SavePartial`]): a sync of that base resumes
    /// after it. One over [`MAX_CONSENSUS_MESSAGE`] is not taken.
    pub fn restore_partial(&mut self, base: Sha1Digest, bytes: Vec<u8>) {
        if bytes.is_empty() || bytes.len() > MAX_CONSENSUS_MESSAGE {
            return;
        }
        tracing::info!(bytes = bytes.len(), "a snapshot's partial base found beside the log, to resume from");
        self.streams.kept = Some(Kept { digest: base, bytes, at: None });
    }

    /// Bytes received so far of the consensus messages arriving in parts.
    pub fn receiving_bytes(&self) -> usize {
        self.streams.inc.values().map(|i| i.bytes.len()).sum()
    }

    /// Bytes of snapshot syncs this tracker did not receive again, because
    /// it resumed a transfer that broke off.
    pub fn resumed_bytes(&self) -> u64 {
        self.streams.resumed
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
            Done::Encoded(bytes, base) => {
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
                let frames = self.frames(node, bytes, base, after_sync);
                self.put_in_place(node, at, frames);
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
    pub(crate) fn handle_consensus(&mut self, conn: ConnId, node: NodeId, bytes: Vec<u8>, base: Option<Base>) {
        let waiting = self.streams.arrived.get(&node).is_some_and(|q| !q.is_empty());
        if bytes.len() > self.cfg.consensus_part.max(1) || base.is_some() {
            let ticket = self.ticket();
            tracing::debug!(node, ticket, bytes = bytes.len(), "decoding a consensus message, off the loop");
            self.streams.arrived.entry(node).or_default().push_back(Arrived::Decoding { conn, ticket });
            self.outbox.push(TrackerOutput::Work { ticket, job: Job(JobKind::Decode(bytes, base)) });
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
        let fresh = || Incoming { xfer, conn, bytes: Vec::new(), offer: None };
        match self.streams.inc.get(&node) {
            Some(inc) if inc.xfer == xfer && inc.conn == conn => {}
            Some(_) => {
                // A new message: the one before was abandoned.
                if let Some(old) = self.streams.inc.insert(node, fresh()) {
                    self.keep_partial(old);
                }
            }
            None => {
                self.streams.inc.insert(node, fresh());
            }
        }
        let Some(inc) = self.streams.inc.get_mut(&node) else { return };
        let limit = inc.offer.map_or(MAX_CONSENSUS_MESSAGE, |(_, len)| len);
        if inc.bytes.len() + bytes.len() > limit {
            self.streams.inc.remove(&node);
            return self.refuse(conn, format!("consensus message parts over the {limit} bytes announced"));
        }
        let at = inc.bytes.len();
        inc.bytes.extend_from_slice(&bytes);
        // What falls in a snapshot's base is kept beside the log too, so a
        // restart resumes after it.
        if let Some((base, _)) = inc.offer.filter(|(b, _)| at < b.len) {
            let end = bytes.len().min(base.len - at);
            let save =
                TrackerOutput::SavePartial { base: base.digest, offset: at as u64, bytes: bytes[..end].to_vec() };
            self.outbox.push(save);
        }
        let ack = encode(&Message::Tracker(TrackerFrame::ConsensusAck { xfer, bytes: bytes.len() as u32 }));
        self.link_send_now(node, ack);
        if !last {
            return;
        }
        let Some(whole) = self.streams.inc.remove(&node) else { return };
        if whole.offer.is_some() {
            self.outbox.push(TrackerOutput::DropPartial);
        }
        if let Some((_, len)) = whole.offer.filter(|(_, len)| *len != whole.bytes.len()) {
            return self.refuse(conn, format!("a consensus message of {} bytes, offered as {len}", whole.bytes.len()));
        }
        tracing::debug!(node, bytes = whole.bytes.len(), "a consensus message arrived in parts");
        self.handle_consensus(conn, node, whole.bytes, whole.offer.map(|(b, _)| b));
    }

    /// `node` offers a message of `len` bytes whose first `base_len` hash
    /// to `digest`: we answer where its parts should start (after what we
    /// kept of that base, or at 0).
    pub(crate) fn handle_consensus_offer(&mut self, conn: ConnId, node: NodeId, offer: (u64, Sha1Digest, u64, u64)) {
        let (xfer, digest, base_len, len) = offer;
        if len > MAX_CONSENSUS_MESSAGE as u64 || base_len > len {
            return self.refuse(conn, format!("a consensus message offered with a base of {base_len} of {len} bytes"));
        }
        let base = Base { digest, len: base_len as usize };
        if let Some(old) = self.streams.inc.remove(&node) {
            self.keep_partial(old);
        }
        let mut bytes = match self.streams.kept.take() {
            Some(k) if k.digest == digest => k.bytes,
            _ => Vec::new(),
        };
        // Or a transfer of the same base from another tracker still under
        // way (a leader that went silent, its link not yet given up on; or
        // two followers' Promises): copied, as that one may yet finish.
        let other = self
            .streams
            .inc
            .values()
            .filter(|i| i.offer.is_some_and(|(b, _)| b.digest == digest))
            .max_by_key(|i| i.bytes.len());
        if let Some(o) = other.filter(|o| o.bytes.len() > bytes.len()) {
            bytes = o.bytes[..o.bytes.len().min(base.len)].to_vec();
        }
        bytes.truncate(base.len);
        let from = bytes.len();
        if from > 0 {
            tracing::info!(node, from, of = len, "resuming a snapshot sync where a broken transfer left it");
            self.streams.resumed += from as u64;
        }
        self.streams.inc.insert(node, Incoming { xfer, conn, bytes, offer: Some((base, len as usize)) });
        let resume = encode(&Message::Tracker(TrackerFrame::ConsensusResume { xfer, from: from as u64 }));
        self.link_send_now(node, resume);
    }

    /// `node` holds the first `from` bytes of the message we offered as
    /// `xfer`: its parts go from there.
    pub(crate) fn handle_consensus_resume(&mut self, node: NodeId, xfer: u64, from: u64) {
        let Some(out) = self.streams.out.get_mut(&node) else { return };
        let Some(at) = out.queue.iter().position(|q| matches!(q, Queued::Offered { xfer: x, .. } if *x == xfer)) else {
            return;
        };
        let Some(Queued::Offered { bytes, base, after_sync, .. }) = out.queue.remove(at) else { return };
        if from > base.len as u64 {
            tracing::warn!(
                node,
                from,
                base = base.len,
                "a tracker claims more of a snapshot than its base; dropping the link"
            );
            let now = self.now;
            return self.link_lost(node, now, true);
        }
        let frames = self.parts(xfer, &bytes[from as usize..], after_sync);
        self.put_in_place(node, at, frames);
    }

    /// `node` received part bytes we sent: the window moves on.
    pub(crate) fn handle_consensus_ack(&mut self, node: NodeId, bytes: u32) {
        if let Some(out) = self.streams.out.get_mut(&node) {
            out.unacked = out.unacked.saturating_sub(bytes as usize);
        }
        self.release_parts(node);
    }
}
