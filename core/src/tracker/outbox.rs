//! The persist-before-send barrier: what a tracker may send only once the
//! records before it are durable.
//!
//! `Outbox` queues a node's outputs for its driver. Log records go out at
//! once (the driver writes them); a send that promises what they hold (a
//! vote, or an answer a log of one decided by writing) is held until the
//! driver reports, with [`super::TrackerNode::handle_synced`], that a sync
//! covering them is done. Once a send to a destination waits, every later
//! send to it waits too, so each connection and link keeps its order. At the
//! end of a step that wrote records that must be durable, the outbox asks for
//! one [`TrackerOutput::Sync`]; several steps' records may share one fsync
//! (the driver reports the highest sequence number it covered).

use std::collections::{BTreeSet, VecDeque};

use super::replicator::{NodeId, Persist};
use super::{ConnId, TrackerOutput};

/// Where a send goes, to keep each destination's order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Dest {
    Conn(u64),
    Link(NodeId),
}

fn dest(out: &TrackerOutput) -> Option<Dest> {
    match out {
        TrackerOutput::Transmit { conn, .. } | TrackerOutput::Close { conn } => Some(Dest::Conn(conn.0)),
        TrackerOutput::PeerSend { node, .. } => Some(Dest::Link(*node)),
        _ => None,
    }
}

#[derive(Debug, Default)]
pub(crate) struct Outbox {
    ready: VecDeque<TrackerOutput>,
    /// Sends waiting for the sync of that sequence number, in order.
    held: VecDeque<(u64, TrackerOutput)>,
    held_dests: BTreeSet<Dest>,
    /// Records that must be durable were written since the last sync asked for.
    unsynced: bool,
    /// The last sync asked for, and the last one done.
    requested: u64,
    synced: u64,
}

impl Outbox {
    /// A log record (or any output that is not a send): out at once.
    pub(crate) fn push(&mut self, out: TrackerOutput) {
        if let TrackerOutput::Persist(Persist::Append(_) | Persist::Rewrite(_)) | TrackerOutput::StoreRange { .. } =
            &out
        {
            self.unsynced = true;
        }
        self.ready.push_back(out);
    }

    /// A send; `after_sync` if it may leave only once the records written
    /// before it are durable.
    pub(crate) fn send(&mut self, out: TrackerOutput, after_sync: bool) {
        let d = dest(&out);
        let wait = if self.unsynced {
            Some(self.requested + 1)
        } else if self.requested > self.synced {
            Some(self.requested)
        } else {
            None
        };
        let queued_behind = d.is_some_and(|d| self.held_dests.contains(&d));
        match wait {
            Some(seq) if after_sync || queued_behind => self.hold(seq, d, out),
            // Nothing pending: what is held waits for a sync already done.
            None if queued_behind => self.hold(self.requested, d, out),
            _ => self.ready.push_back(out),
        }
    }

    /// A send that promises nothing and needs no order with the others to
    /// its destination (a link's `Ping` and `Pong`, a part's ack): out at
    /// once, past whatever there waits for a sync. A heartbeat held behind a
    /// vote while a slow fsync (a snapshot's log rewrite) runs would make a
    /// busy disk look like a dead link: hung up, leadership moved, and the
    /// follower resynced.
    pub(crate) fn send_now(&mut self, out: TrackerOutput) {
        self.ready.push_back(out);
    }

    fn hold(&mut self, seq: u64, d: Option<Dest>, out: TrackerOutput) {
        if let Some(d) = d {
            self.held_dests.insert(d);
        }
        self.held.push_back((seq, out));
    }

    /// The driver made every record up to sync `seq` durable.
    pub(crate) fn synced(&mut self, seq: u64) {
        if seq <= self.synced || seq > self.requested {
            return;
        }
        self.synced = seq;
        while self.held.front().is_some_and(|(s, _)| *s <= seq) {
            let (_, out) = self.held.pop_front().expect("checked");
            self.ready.push_back(out);
        }
        self.held_dests = self.held.iter().filter_map(|(_, o)| dest(o)).collect();
    }

    /// The link to `node` closed: what waited for it is for a link that is gone.
    pub(crate) fn forget_link(&mut self, node: NodeId) {
        self.forget(Dest::Link(node));
    }

    /// The connection closed: what waited for it cannot be sent.
    pub(crate) fn forget_conn(&mut self, conn: ConnId) {
        self.forget(Dest::Conn(conn.0));
    }

    fn forget(&mut self, d: Dest) {
        if self.held_dests.remove(&d) {
            self.held.retain(|(_, o)| dest(o) != Some(d));
        }
    }

    /// The next output; once the step's outputs are out, the sync they need.
    pub(crate) fn pop(&mut self) -> Option<TrackerOutput> {
        if self.ready.is_empty() && std::mem::take(&mut self.unsynced) {
            self.requested += 1;
            return Some(TrackerOutput::Sync { seq: self.requested });
        }
        self.ready.pop_front()
    }

    /// Sends waiting for a sync.
    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        self.held.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tx(conn: u64, b: u8) -> TrackerOutput {
        TrackerOutput::Transmit { conn: ConnId(conn), bytes: vec![b] }
    }

    fn drain(o: &mut Outbox) -> Vec<TrackerOutput> {
        std::iter::from_fn(|| o.pop()).collect()
    }

    #[test]
    fn a_vote_waits_for_its_records_and_later_sends_to_it_wait_too() {
        let mut o = Outbox::default();
        o.push(TrackerOutput::Persist(Persist::Append(vec![1])));
        o.send(tx(1, 1), true);
        o.send(tx(1, 2), false);
        o.send(tx(2, 3), false);
        let out = drain(&mut o);
        assert_eq!(out.len(), 3, "{out:?}");
        assert!(matches!(out[0], TrackerOutput::Persist(_)));
        assert_eq!(out[1], tx(2, 3), "another destination need not wait");
        assert_eq!(out[2], TrackerOutput::Sync { seq: 1 });
        assert_eq!(o.held(), 2);
        // A later step, before the sync is done: its votes wait for the same sync.
        o.send(tx(3, 4), true);
        assert!(drain(&mut o).is_empty());
        o.synced(1);
        assert_eq!(drain(&mut o), vec![tx(1, 1), tx(1, 2), tx(3, 4)]);
        // Nothing pending: a vote goes at once.
        o.send(tx(1, 5), true);
        assert_eq!(drain(&mut o), vec![tx(1, 5)]);
    }

    #[test]
    fn a_heartbeat_passes_what_waits_for_a_sync() {
        let mut o = Outbox::default();
        o.push(TrackerOutput::Persist(Persist::Append(vec![1])));
        let vote = TrackerOutput::PeerSend { node: 2, bytes: vec![1] };
        let ping = TrackerOutput::PeerSend { node: 2, bytes: vec![2] };
        o.send(vote.clone(), true);
        o.send_now(ping.clone());
        let out = drain(&mut o);
        assert!(out.contains(&ping), "the ping leaves while the vote waits: {out:?}");
        assert!(!out.contains(&vote));
        o.synced(1);
        assert_eq!(drain(&mut o), vec![vote]);
    }

    #[test]
    fn lazy_records_need_no_sync_and_a_gone_link_drops_what_waited() {
        let mut o = Outbox::default();
        o.push(TrackerOutput::Persist(Persist::Lazy(vec![1])));
        o.send(tx(1, 1), true);
        assert_eq!(drain(&mut o).len(), 2, "no sync asked for lazy records");
        o.push(TrackerOutput::Persist(Persist::Append(vec![2])));
        o.send(TrackerOutput::PeerSend { node: 2, bytes: vec![9] }, true);
        drain(&mut o);
        o.forget_link(2);
        o.synced(1);
        assert!(drain(&mut o).is_empty());
        assert_eq!(o.held(), 0);
    }
}
