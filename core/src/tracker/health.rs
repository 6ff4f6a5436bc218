//! What a tracker shows its operator: counters of what it did, its own
//! health and what it last heard of every other tracker's, and the
//! transfers clients report. Pure data, read by the driver, which turns it
//! into metrics and a status page (`net-mio`'s `http`).
//!
//! Every tracker tells the others its [`Health`] once a second on its links
//! ([`TrackerFrame::Health`], outside the log), so any one of them can show
//! the whole cluster: who leads, how far each is behind, and which is down
//! (its link silent past [`super::links::LINK_DEADLINE`]). Clients report
//! each running download's progress to their tracker about once a second
//! ([`Request::Progress`]); it is soft state, gossiped like grants, so
//! every tracker knows every transfer.

use serde::{Deserialize, Serialize};

use super::*;

/// Counts of what this tracker did since it started (for `/metrics`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Writes of this tracker's clients decided and answered.
    pub writes: u64,
    /// Requests answered from the local state (heartbeats not counted).
    pub reads: u64,
    /// Times the leader this tracker names changed (to none included).
    pub leader_changes: u64,
    /// Logins refused for a wrong user id or password.
    pub failed_logins: u64,
    /// Download grants issued.
    pub grants: u64,
    /// Requests answered with an error, by [`ApiError::kind`].
    pub refusals: BTreeMap<&'static str, u64>,
    /// Connections closed for breaking the protocol or its limits.
    pub connections_refused: u64,
}

/// What a tracker tells the others of itself once a second.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// Log entries applied here (the decided index, once applied).
    pub applied: u64,
    /// The leader this tracker names (none while it reaches no majority).
    pub leader: Option<NodeId>,
    /// Whether it caught up with the cluster since it started.
    pub synced: bool,
    /// Client connections open to it.
    pub clients: u32,
    /// Sessions whose lease is alive, as it knows them.
    pub sessions: u32,
    pub groups: u32,
    /// Files shared, in all groups.
    pub files: u64,
    /// Requests it answered from its state since it started.
    pub reads: u64,
}

/// One transfer in progress, as its downloader reported it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transfer {
    /// The downloader: where it serves peers, and who it is.
    pub listen: SocketAddr,
    pub user: UserId,
    pub group: GroupId,
    pub name: FileName,
    pub size: u64,
    /// Bytes verified so far.
    pub done: u64,
    /// Bytes a second, over the last second or so.
    pub rate: u64,
    /// Bytes verified from each source peer (at most [`MAX_PROGRESS_SOURCES`]).
    pub sources: Vec<(SocketAddr, u64)>,
    /// How long this report stands unless renewed.
    pub ttl_ms: u64,
}

/// Most source peers one progress report names (the busiest).
pub const MAX_PROGRESS_SOURCES: usize = 16;
/// A reported transfer not renewed this long is forgotten (the downloader
/// reports every second while it runs).
pub const TRANSFER_TTL: Millis = Millis(10_000);
/// Most transfers a tracker remembers at once.
pub const MAX_TRANSFERS: usize = 10_000;
/// Transfers in one soft-state frame: each at most about 1.3 KB (two
/// 255-byte names, a user id and [`MAX_PROGRESS_SOURCES`] sources), and
/// counted as four of its [`SOFT_BATCH`] items.
pub const TRANSFER_BATCH: usize = 256;
const _: () = assert!(4 * TRANSFER_BATCH <= SOFT_BATCH);

/// Another tracker as this one sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerView {
    pub node: NodeId,
    /// Our link to it is up and it answered within the link deadline.
    pub up: bool,
    /// How long ago we last heard from it on either link.
    pub heard_ago: Option<Millis>,
    /// What it last told of itself, and how long ago.
    pub health: Option<(Health, Millis)>,
}

/// The cluster as this tracker sees it, for its status page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterView {
    pub me: NodeId,
    pub health: Health,
    pub peers: Vec<PeerView>,
}

impl<R: Replicator> TrackerNode<R> {
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Latencies (ms from request to answer) of the writes decided since
    /// the last call, oldest first; at most [`MAX_LATENCIES`] are kept.
    pub fn take_write_latencies(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.latencies)
    }

    /// This tracker's own health now.
    pub fn health(&self, now: Millis) -> Health {
        Health {
            applied: self.meta.applied(),
            leader: self.leader,
            synced: self.replicator.is_synced(),
            clients: self.conns.values().filter(|c| c.kind == Kind::Client).count() as u32,
            sessions: self.leases.values().filter(|until| **until > now).count() as u32,
            groups: self.meta.groups().count() as u32,
            files: self.meta.groups().map(|(_, g)| g.files.len() as u64).sum(),
            reads: self.counters.reads,
        }
    }

    /// Every tracker of the cluster as this one sees it now.
    pub fn cluster_view(&self, now: Millis) -> ClusterView {
        let peers = self
            .replicator
            .peers()
            .iter()
            .map(|&node| PeerView {
                node,
                up: self.links.reachable_now(node, now),
                heard_ago: self.links.last_heard(node).map(|t| now.since(t)),
                health: self.peer_health.get(&node).map(|(h, at)| (h.clone(), now.since(*at))),
            })
            .collect();
        ClusterView { me: self.replicator.me(), health: self.health(now), peers }
    }

    /// The transfers clients reported, as known here (ours and gossiped),
    /// in order of downloader and file.
    pub fn transfers(&self, now: Millis) -> Vec<Transfer> {
        self.transfers
            .iter()
            .filter(|(_, (_, until))| *until > now)
            .map(|(_, (t, until))| Transfer { ttl_ms: until.since(now).0, ..t.clone() })
            .collect()
    }

    /// Counts an answer's error by kind.
    pub(crate) fn count_refusal(&mut self, e: &ApiError) {
        *self.counters.refusals.entry(e.kind()).or_default() += 1;
    }

    /// A write of ours was decided and answered; it was proposed at `since`.
    pub(crate) fn count_write(&mut self, since: Millis) {
        self.counters.writes += 1;
        if self.latencies.len() < MAX_LATENCIES {
            self.latencies.push(self.now.since(since).0);
        }
    }

    /// Tells every tracker we reach how we are (once a second).
    pub(crate) fn send_health(&mut self, now: Millis) {
        if !self.links.any_up() {
            return;
        }
        let bytes = encode(&Message::Tracker(TrackerFrame::Health(self.health(now))));
        self.broadcast(bytes);
    }

    /// A client's `Progress` report (`t` names the session's user and
    /// address, not what the client claimed): kept (and gossiped) if that
    /// user is a member of the group, within the bounds.
    pub(crate) fn progress(&mut self, mut t: Transfer, now: Millis) -> Result<Reply, ApiError> {
        self.meta.group_of_member(&t.user, &t.group)?;
        if t.done > t.size {
            return Err(ApiError::InvalidFile("more bytes done than the file holds".into()));
        }
        if t.sources.len() > MAX_PROGRESS_SOURCES {
            return Err(ApiError::Limit(format!("a progress report names at most {MAX_PROGRESS_SOURCES} sources")));
        }
        t.ttl_ms = TRANSFER_TTL.0;
        if !self.keep_transfer(t.clone(), now) {
            return Err(ApiError::Limit("too many transfers reported".into()));
        }
        if !self.replicator.peers().is_empty() {
            self.dirty.transfers.push(t);
        }
        Ok(Reply::Done)
    }

    /// Keeps a transfer report (ours or gossiped); false past the limit.
    pub(crate) fn keep_transfer(&mut self, t: Transfer, now: Millis) -> bool {
        let key = (t.listen, t.group.clone(), t.name.clone());
        if !self.transfers.contains_key(&key) && self.transfers.len() >= MAX_TRANSFERS {
            return false;
        }
        let until = now.plus(Millis(t.ttl_ms.min(TRANSFER_TTL.0)));
        self.transfers.insert(key, (t, until));
        true
    }
}

/// Most write latencies kept between two [`TrackerNode::take_write_latencies`].
pub const MAX_LATENCIES: usize = 1 << 16;
