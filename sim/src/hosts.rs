//! The simulated hosts: trackers and clients, as the world holds them.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use shoal_core::client::{ClientEngine, Ticket};
use shoal_core::meta::Entry;
use shoal_core::shell::ShellError;
use shoal_core::time::Millis;
use shoal_core::tracker::replicator::{ConsensusMessage, Outbound};
use shoal_core::tracker::{ConnId, Decided, NodeId, OmniReplicator, Persist, Replicator, SoloReplicator, TrackerNode};
use shoal_core::wire::FrameError;

use crate::disk::TrackerLog;

/// Either replicator, so one world type runs clusters of one and of many.
pub enum Rep {
    Solo(SoloReplicator),
    Omni(Box<OmniReplicator>),
}

macro_rules! both {
    ($self:ident, $r:ident => $e:expr) => {
        match $self {
            Rep::Solo($r) => $e,
            Rep::Omni($r) => $e,
        }
    };
}

impl Replicator for Rep {
    fn propose(&mut self, entry: Entry) {
        both!(self, r => r.propose(entry))
    }
    fn poll_decided(&mut self) -> Option<Decided> {
        both!(self, r => r.poll_decided())
    }
    fn poll_persist(&mut self) -> Option<Persist> {
        both!(self, r => r.poll_persist())
    }
    fn poll_send(&mut self) -> Option<(NodeId, Outbound, bool)> {
        both!(self, r => r.poll_send())
    }
    fn snapshot_due(&self) -> bool {
        both!(self, r => r.snapshot_due())
    }
    fn take_snapshot(&mut self, live: &shoal_core::meta::MetaState) {
        both!(self, r => r.take_snapshot(live))
    }
    fn answers_need_sync(&self) -> bool {
        both!(self, r => r.answers_need_sync())
    }
    fn handle_message(&mut self, from: NodeId, bytes: &[u8]) -> Result<(), FrameError> {
        both!(self, r => r.handle_message(from, bytes))
    }
    fn handle_decoded(
        &mut self,
        from: NodeId,
        msg: ConsensusMessage,
        live: Option<&shoal_core::meta::MetaState>,
    ) -> Result<(), FrameError> {
        both!(self, r => r.handle_decoded(from, msg, live))
    }
    fn handle_peer_up(&mut self, node: NodeId) {
        both!(self, r => r.handle_peer_up(node))
    }
    fn handle_timeout(&mut self, now: Millis) {
        both!(self, r => r.handle_timeout(now))
    }
    fn poll_timeout(&self) -> Option<Millis> {
        both!(self, r => r.poll_timeout())
    }
    fn leader(&self) -> Option<NodeId> {
        both!(self, r => r.leader())
    }
    fn term(&self) -> u64 {
        both!(self, r => r.term())
    }
    fn is_synced(&self) -> bool {
        both!(self, r => r.is_synced())
    }
    fn me(&self) -> NodeId {
        both!(self, r => r.me())
    }
    fn peers(&self) -> &[NodeId] {
        both!(self, r => r.peers())
    }
    fn log_indexes(&self) -> Option<(u64, u64)> {
        both!(self, r => r.log_indexes())
    }
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct Clock {
    pub(crate) offset: u64,
    pub(crate) rate_ppm: u64,
}

impl Clock {
    pub(crate) const TRUE: Clock = Clock { offset: 0, rate_ppm: 1_000_000 };

    pub(crate) fn local(&self, global: Millis) -> Millis {
        Millis(self.offset + (global.0 as u128 * self.rate_ppm as u128 / 1_000_000) as u64)
    }

    /// The first global time at which the local clock reads `deadline` or more.
    pub(crate) fn global(&self, deadline: Millis) -> Millis {
        let d = deadline.0.saturating_sub(self.offset) as u128;
        let mut g = (d * 1_000_000).div_ceil(self.rate_ppm as u128) as u64;
        while self.local(Millis(g)) < deadline {
            g += 1;
        }
        Millis(g)
    }
}

pub(crate) struct SimClient {
    pub(crate) engine: ClientEngine,
    pub(crate) clock: Clock,
    /// The tracker connection the engine believes is open, if any.
    pub(crate) conn: Option<ConnId>,
    pub(crate) results: BTreeMap<Ticket, Result<Vec<String>, ShellError>>,
    pub(crate) listen: SocketAddr,
    /// Extra latency on everything this client sends to peers (a slow peer).
    pub(crate) slow: Millis,
    pub(crate) up: bool,
    /// The user it was last logged in as: its downloads (and their grants)
    /// are that user's, even after a logout.
    pub(crate) last_user: Option<String>,
    /// Its capacity for peer traffic, and when (global microseconds) its
    /// uplink and downlink are free again.
    pub(crate) link: crate::Bandwidth,
    pub(crate) up_free_us: u64,
    pub(crate) down_free_us: u64,
    /// Its next timer as filed in the world (global time).
    pub(crate) timer: Option<Millis>,
}

/// A tracker's own link to another tracker, as its node dialled it (a
/// link that is down has no entry).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Link {
    Connecting(ConnId),
    /// Connected; `ConnId` is the receiving tracker's id for it.
    Up(ConnId),
}

pub(crate) struct SimTracker {
    pub(crate) node: Option<TrackerNode<Rep>>,
    pub(crate) addr: SocketAddr,
    pub(crate) clock: Clock,
    /// The log on its disk: what a restart replays.
    pub(crate) log: TrackerLog,
    pub(crate) links: BTreeMap<usize, Link>,
    /// Log index this tracker has applied up to (for the agreement check).
    pub(crate) applied: u64,
    /// Which run of the tracker this is (a restart starts the next): a job
    /// done after a crash reports to nobody.
    pub(crate) run: u64,
}
