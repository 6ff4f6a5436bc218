//! The narrow interface between a tracker node and the replicated log.
//!
//! A node proposes entries and applies, in order, whatever comes out of
//! [`Replicator::poll_decided`]. Every node of a cluster sees the same decided
//! sequence. [`SoloReplicator`] is the one-node case: what is proposed is
//! decided at once.

use std::collections::VecDeque;

use crate::meta::Entry;

pub trait Replicator {
    /// Offers an entry for the log. It may be decided later, or never (then
    /// the client times out and retries with the same request id).
    fn propose(&mut self, entry: Entry);
    /// The next decided entry, in log order.
    fn poll_decided(&mut self) -> Option<Entry>;
}

/// A log of one: every proposal is decided immediately.
#[derive(Debug, Default)]
pub struct SoloReplicator {
    decided: VecDeque<Entry>,
}

impl Replicator for SoloReplicator {
    fn propose(&mut self, entry: Entry) {
        self.decided.push_back(entry);
    }

    fn poll_decided(&mut self) -> Option<Entry> {
        self.decided.pop_front()
    }
}
