//! Deterministic simulation of shoal over the production state machines.
//!
//! A [`World`] holds 1-5 tracker nodes and any number of client engines from
//! `shoal-core`, unchanged, and plays the network and disks between them in
//! virtual time. Every byte a node transmits is delivered after a latency
//! drawn from the world's one seeded PRNG, in order per connection; every
//! timer fires when the node's own (possibly skewed) clock reaches it. No
//! sockets, threads or clocks are involved, so a seed determines the whole
//! run; [`World::digest`] hashes its trace so two runs can be compared bit
//! for bit.
//!
//! Faults the world can inject: tracker crash and restart (the durable log
//! kept, memory lost), a wiped data dir, client crash and restart, cuts
//! between any two endpoints in one or both directions (partitions, partial
//! partitions, one-way loss), connection resets, slow peers, corrupt files,
//! and clock skew (each node's timers run at their own rate).
//!
//! Invariants it checks as it goes (a violation panics at once):
//! no two trackers apply different entries at the same log index; no chunk is
//! ever written to a part file unless it matches its SHA1; a finished download
//! equals the source (the simulated disk renames only on a whole-file match).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::net::SocketAddr;

use sha1::{Digest, Sha1};
use shoal_core::chunk::{FileDigest, FileHasher, Sha1Digest, CHUNK_SIZE};
use shoal_core::client::download::PeerConnId;
use shoal_core::client::peer::Bitmap;
use shoal_core::client::{ClientConfig, ClientEngine, ClientOutput, DownloadId, Prepared, Ticket};
use shoal_core::meta::{Entry, MetaState, PasswordParams};
use shoal_core::proto::{Message, RequestId};
use shoal_core::rng::Rng;
use shoal_core::shell::{parse, ShellError};
use shoal_core::time::Millis;
use shoal_core::tracker::{
    ConnId, Decided, NodeId, OmniReplicator, Persist, Replicator, SoloReplicator, TrackerConfig, TrackerNode,
    TrackerOutput,
};
use shoal_core::wire::{decode, FrameError};

/// The seed from `SIM_SEED`, or `default`.
pub fn seed_from_env(default: u64) -> u64 {
    std::env::var("SIM_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

/// The seeds a sweep test runs: `SIM_SEED` alone, else `SIM_SEEDS` (a count,
/// from 0), else `0..default_count`.
pub fn seeds(default_count: u64) -> Vec<u64> {
    if std::env::var("SIM_SEED").is_ok() {
        return vec![seed_from_env(0)];
    }
    let n = std::env::var("SIM_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(default_count);
    (0..n).collect()
}

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
    fn poll_send(&mut self) -> Option<(NodeId, Vec<u8>, bool)> {
        both!(self, r => r.poll_send())
    }
    fn answers_need_sync(&self) -> bool {
        both!(self, r => r.answers_need_sync())
    }
    fn handle_message(&mut self, from: NodeId, bytes: &[u8]) -> Result<(), FrameError> {
        both!(self, r => r.handle_message(from, bytes))
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
    fn is_synced(&self) -> bool {
        both!(self, r => r.is_synced())
    }
    fn me(&self) -> NodeId {
        both!(self, r => r.me())
    }
    fn peers(&self) -> &[NodeId] {
        both!(self, r => r.peers())
    }
}

/// A node's clock: `local = offset + global * rate_ppm / 10^6`.
#[derive(Clone, Copy, Debug)]
struct Clock {
    offset: u64,
    rate_ppm: u64,
}

impl Clock {
    const TRUE: Clock = Clock { offset: 0, rate_ppm: 1_000_000 };

    fn local(&self, global: Millis) -> Millis {
        Millis(self.offset + (global.0 as u128 * self.rate_ppm as u128 / 1_000_000) as u64)
    }

    /// The first global time at which the local clock reads `deadline` or more.
    fn global(&self, deadline: Millis) -> Millis {
        let d = deadline.0.saturating_sub(self.offset) as u128;
        let mut g = (d * 1_000_000).div_ceil(self.rate_ppm as u128) as u64;
        while self.local(Millis(g)) < deadline {
            g += 1;
        }
        Millis(g)
    }
}

/// An endpoint of the simulated network.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Ep {
    Tracker(usize),
    Client(usize),
}

#[derive(Debug)]
enum Event {
    /// A peer connection from `from` (its id `conn`) reaches client `to`, which
    /// knows it as `accepted`.
    PeerConnected {
        from: usize,
        conn: PeerConnId,
        to: usize,
        accepted: PeerConnId,
    },
    PeerBytes {
        to: usize,
        conn: PeerConnId,
        bytes: Vec<u8>,
    },
    PeerClosed {
        to: usize,
        conn: PeerConnId,
    },
    Prepared {
        client: usize,
        id: DownloadId,
        result: Result<Prepared, String>,
    },
    Finished {
        client: usize,
        id: DownloadId,
        result: Result<(), String>,
    },
    /// A download's writer checks a chunk's SHA1, writes it if it matches,
    /// and reports: a while after the engine handed it over, as a writer
    /// thread would.
    ChunkChecked {
        client: usize,
        id: DownloadId,
        serial: u64,
        chunk: u32,
        data: Vec<u8>,
        /// Whether `data` matched the chunk's SHA1 (checked when handed over).
        ok: bool,
    },
    /// A client's connection attempt reaches (or fails to reach) a tracker.
    Connected {
        client: usize,
        conn: ConnId,
    },
    ToTracker {
        conn: ConnId,
        bytes: Vec<u8>,
    },
    ToClient {
        conn: ConnId,
        bytes: Vec<u8>,
    },
    /// Tracker `from`'s link to `to` connects (or fails to).
    LinkConnected {
        from: usize,
        to: usize,
        conn: ConnId,
    },
    /// Bytes on a tracker-to-tracker link, arriving at the receiver's `conn`.
    LinkBytes {
        conn: ConnId,
        bytes: Vec<u8>,
    },
    Hashed {
        client: usize,
        job: u64,
        result: Result<FileDigest, String>,
    },
    /// A tracker closed `conn`; the other side sees it after the bytes before it.
    CloseConn {
        conn: ConnId,
    },
}

struct SimClient {
    engine: ClientEngine,
    clock: Clock,
    /// The tracker connection the engine believes is open, if any.
    conn: Option<ConnId>,
    results: BTreeMap<Ticket, Result<Vec<String>, ShellError>>,
    listen: SocketAddr,
    /// Downloads' part files: id -> (digest, part, final path).
    parts: BTreeMap<DownloadId, SimPart>,
    /// Extra latency on everything this client sends to peers (a slow peer).
    slow: Millis,
    up: bool,
}

/// A download in progress; its part file lives on the simulated disk.
struct SimPart {
    final_path: String,
    /// Tells this part from a later one with the same id (after a restart).
    serial: u64,
    /// Chunks written to the part file, each after it matched its SHA1.
    stored: Bitmap,
    /// When the writer reports its last queued chunk: it works in order.
    due: Millis,
}

fn part_path(final_path: &str) -> String {
    format!("{final_path}.part")
}

/// One end of a peer connection: (client, its id for the connection).
type PeerEnd = (usize, PeerConnId);

/// A tracker's own link to another tracker.
#[derive(Clone, Copy, Debug)]
enum Link {
    Down {
        retry_at: Millis,
        backoff: Millis,
    },
    Connecting(ConnId),
    /// Connected; `ConnId` is the receiving tracker's id for it.
    Up(ConnId),
}

struct SimTracker {
    node: Option<TrackerNode<Rep>>,
    addr: SocketAddr,
    clock: Clock,
    /// The durable log: what a restart replays.
    disk: Vec<Vec<u8>>,
    /// Lazy records written after the last sync: lost in a crash.
    volatile: Vec<Vec<u8>>,
    links: BTreeMap<usize, Link>,
    /// Log index this tracker has applied up to (for the agreement check).
    applied: u64,
}

/// A connection's two ends and when its last bytes are due each way.
#[derive(Clone, Copy, Debug)]
enum ConnKind {
    /// Client `client` to tracker `tracker`.
    Client { client: usize, tracker: usize },
    /// Tracker `from`'s link to `to` (data flows from -> to only).
    Link { from: usize, to: usize },
}

#[derive(Clone, Copy, Debug)]
struct LiveConn {
    kind: ConnKind,
    /// When the last bytes towards the tracker (or link receiver) are due.
    up_due: Millis,
    /// When the last bytes towards the client are due.
    down_due: Millis,
    /// Whether the tracker side was told of it (`handle_connected`).
    accepted: bool,
}

/// Knobs of the simulated network and cluster.
#[derive(Clone, Copy, Debug)]
pub struct NetConfig {
    pub min_latency: Millis,
    pub max_latency: Millis,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig { min_latency: Millis(1), max_latency: Millis(40) }
    }
}

/// How a world is built.
#[derive(Clone, Copy, Debug)]
pub struct WorldConfig {
    pub trackers: usize,
    pub clients: usize,
    pub net: NetConfig,
    /// Largest clock rate error of any node, in parts per million.
    pub max_skew_ppm: u64,
    /// Snapshot the metadata after this many decided entries.
    pub snapshot_every: usize,
}

const REDIAL_MIN: Millis = Millis(100);
const REDIAL_MAX: Millis = Millis(1_000);

pub struct World {
    now: Millis,
    rng: Rng,
    net: NetConfig,
    trackers: Vec<SimTracker>,
    clients: Vec<SimClient>,
    /// Files on the simulated disks: path -> content (shared by all clients).
    files: BTreeMap<String, Vec<u8>>,
    queue: BinaryHeap<Reverse<(Millis, u64)>>,
    events: BTreeMap<u64, Event>,
    next_event: u64,
    next_conn: u64,
    next_ticket: u64,
    conns: BTreeMap<ConnId, LiveConn>,
    /// Directions that lose everything: (from, to).
    cuts: BTreeSet<(Ep, Ep)>,
    /// Running hash of every event, in order.
    trace: Sha1,
    steps: u64,
    /// Open peer connections, both directions, with when their last bytes are due.
    peer_links: BTreeMap<PeerEnd, (PeerEnd, Millis)>,
    next_accepted: u64,
    /// Chunks written to part files, and how many blocks were served from a
    /// part file's chunk before that chunk was written there (an invariant:
    /// must stay zero; such a block holds whatever the file held before).
    pub chunks_written: u64,
    pub unwritten_serves: u64,
    next_part: u64,
    /// Hash of the entry applied at each log index, by whichever tracker applied it first.
    canon: Vec<[u8; 20]>,
    snapshot_every: usize,
    /// The state after the canonical log, and who was ever a member or owner of which group.
    canon_state: MetaState,
    ever_member: BTreeSet<(String, String)>,
    ever_owner: BTreeSet<(String, String)>,
    /// Redial backoff of each tracker link (from, to).
    link_backoff: BTreeMap<(usize, usize), Millis>,
    /// Write requests clients sent, and those a tracker answered with success.
    writes_sent: BTreeSet<RequestId>,
    acked: BTreeSet<RequestId>,
    /// Request ids of the entries in the canonical log.
    canon_ids: BTreeSet<RequestId>,
    /// A tracker armed to crash in the middle of its next step with records.
    mid_step_crash: Option<usize>,
    /// How many faults of each kind were injected.
    pub faults: BTreeMap<&'static str, u64>,
    /// `SIM_TRACE=1`: print the trace as it is recorded.
    verbose: bool,
    cfg: TrackerConfig,
}

fn entry_hash(e: &Entry) -> [u8; 20] {
    Sha1::digest(postcard::to_allocvec(e).expect("encode")).into()
}

impl World {
    /// One tracker (no consensus), `clients` clients, true clocks.
    pub fn new(seed: u64, clients: usize, net: NetConfig) -> World {
        World::build(seed, WorldConfig { trackers: 1, clients, net, max_skew_ppm: 0, snapshot_every: 50 })
    }

    pub fn build(seed: u64, wc: WorldConfig) -> World {
        let mut rng = Rng::from_u64(seed);
        let tracker_addrs: Vec<SocketAddr> =
            (0..wc.trackers).map(|i| SocketAddr::from(([10, 0, 0, 1 + i as u8], 7000))).collect();
        let cfg = TrackerConfig {
            password_params: PasswordParams::INSECURE_FAST,
            report_applied: true,
            ..TrackerConfig::default()
        };
        let skewed = |rng: &mut Rng| {
            if wc.max_skew_ppm == 0 {
                return Clock::TRUE;
            }
            let span = 2 * wc.max_skew_ppm + 1;
            Clock { offset: rng.below(10_000), rate_ppm: 1_000_000 - wc.max_skew_ppm + rng.below(span) }
        };
        let trackers = tracker_addrs
            .iter()
            .map(|addr| SimTracker {
                node: None,
                addr: *addr,
                clock: skewed(&mut rng),
                disk: Vec::new(),
                volatile: Vec::new(),
                links: BTreeMap::new(),
                applied: 0,
            })
            .collect();
        let clients = (0..wc.clients)
            .map(|i| {
                let listen = SocketAddr::from(([10, 0, 1, i as u8], 9000));
                let engine =
                    ClientEngine::new(ClientConfig::new(listen, tracker_addrs.clone()), Rng::from_u64(rng.next_u64()));
                SimClient {
                    engine,
                    clock: skewed(&mut rng),
                    conn: None,
                    results: BTreeMap::new(),
                    listen,
                    parts: BTreeMap::new(),
                    slow: Millis::ZERO,
                    up: true,
                }
            })
            .collect();
        let mut w = World {
            now: Millis::ZERO,
            rng,
            net: wc.net,
            trackers,
            clients,
            files: BTreeMap::new(),
            queue: BinaryHeap::new(),
            events: BTreeMap::new(),
            next_event: 0,
            next_conn: 1,
            next_ticket: 1,
            conns: BTreeMap::new(),
            cuts: BTreeSet::new(),
            trace: Sha1::new(),
            steps: 0,
            peer_links: BTreeMap::new(),
            next_accepted: 1,
            chunks_written: 0,
            unwritten_serves: 0,
            next_part: 0,
            canon: Vec::new(),
            snapshot_every: wc.snapshot_every,
            link_backoff: BTreeMap::new(),
            writes_sent: BTreeSet::new(),
            acked: BTreeSet::new(),
            canon_ids: BTreeSet::new(),
            mid_step_crash: None,
            faults: BTreeMap::new(),
            verbose: std::env::var("SIM_TRACE").is_ok_and(|v| v == "1"),
            canon_state: MetaState::new(),
            ever_member: BTreeSet::new(),
            ever_owner: BTreeSet::new(),
            cfg,
        };
        for t in 0..wc.trackers {
            w.start_tracker(t);
        }
        w
    }

    pub fn now(&self) -> Millis {
        self.now
    }

    /// The first tracker (the only one in a world of one).
    pub fn tracker(&self) -> &TrackerNode<Rep> {
        self.trackers[0].node.as_ref().expect("tracker 0 is up")
    }

    /// Tracker `t`, if it is running.
    pub fn tracker_at(&self, t: usize) -> Option<&TrackerNode<Rep>> {
        self.trackers[t].node.as_ref()
    }

    pub fn tracker_count(&self) -> usize {
        self.trackers.len()
    }

    pub fn client_count(&self) -> usize {
        self.clients.len()
    }

    /// Tracker `t`'s durable log, as a restart would replay it.
    pub fn tracker_log(&self, t: usize) -> &[Vec<u8>] {
        &self.trackers[t].disk
    }

    /// How many log entries some tracker has applied.
    pub fn log_len(&self) -> u64 {
        self.canon.len() as u64
    }

    /// Log index tracker `t` has applied up to.
    pub fn applied(&self, t: usize) -> u64 {
        self.trackers[t].applied
    }

    /// Hash of everything that happened so far.
    pub fn digest(&self) -> String {
        Sha1Digest(self.trace.clone().finalize().into()).to_hex()
    }

    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Puts a file on the simulated disk.
    pub fn write_file(&mut self, path: &str, content: Vec<u8>) {
        self.files.insert(path.to_string(), content);
    }

    fn record(&mut self, line: String) {
        if self.verbose {
            eprintln!("{line}");
        }
        self.trace.update(line.as_bytes());
        self.trace.update(b"\n");
    }

    fn latency(&mut self) -> Millis {
        let span = self.net.max_latency.0.saturating_sub(self.net.min_latency.0) + 1;
        Millis(self.net.min_latency.0 + self.rng.below(span))
    }

    /// How long a download's writer takes to check and write a chunk: a
    /// network latency, and now and then a disk that stalls for several
    /// round trips (long enough for peers to ask for what is not written yet).
    fn disk_lag(&mut self) -> Millis {
        let lag = self.latency();
        if self.rng.below(8) == 0 {
            lag.plus(Millis(self.net.max_latency.0.saturating_mul(6)))
        } else {
            lag
        }
    }

    fn schedule(&mut self, at: Millis, ev: Event) {
        let id = self.next_event;
        self.next_event += 1;
        self.queue.push(Reverse((at, id)));
        self.events.insert(id, ev);
    }

    fn reachable(&self, from: Ep, to: Ep) -> bool {
        !self.cuts.contains(&(from, to))
    }

    fn new_conn(&mut self) -> ConnId {
        let c = ConnId(self.next_conn);
        self.next_conn += 1;
        c
    }

    // ---- faults ----

    /// Loses everything sent from `from` to `to` from now on (connections
    /// that need that direction are reset) until [`World::heal`].
    pub fn cut(&mut self, from: Ep, to: Ep) {
        self.record(format!("{} cut {from:?}->{to:?}", self.now.0));
        *self.faults.entry("cut").or_default() += 1;
        self.cuts.insert((from, to));
        let doomed: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| match c.kind {
                ConnKind::Client { client, tracker } => {
                    let pair = (Ep::Client(client), Ep::Tracker(tracker));
                    (from, to) == pair || (to, from) == pair
                }
                ConnKind::Link { from: a, to: b } => (from, to) == (Ep::Tracker(a), Ep::Tracker(b)),
            })
            .map(|(id, _)| *id)
            .collect();
        for c in doomed {
            self.reset(c);
        }
    }

    /// Cuts both directions between `a` and `b`.
    pub fn cut_both(&mut self, a: Ep, b: Ep) {
        self.cut(a, b);
        self.cut(b, a);
    }

    /// Removes every cut.
    pub fn heal(&mut self) {
        self.record(format!("{} heal", self.now.0));
        self.cuts.clear();
    }

    /// Resets one open connection (both ends see it close).
    pub fn reset(&mut self, conn: ConnId) {
        let Some(c) = self.conns.remove(&conn) else { return };
        self.record(format!("{} reset {}", self.now.0, conn.0));
        *self.faults.entry("reset").or_default() += 1;
        match c.kind {
            ConnKind::Client { client, tracker } => {
                if c.accepted {
                    self.tracker_conn_closed(tracker, conn);
                }
                if self.clients[client].conn == Some(conn) {
                    self.clients[client].conn = None;
                    let now = self.client_now(client);
                    self.clients[client].engine.handle_tracker_closed(now);
                    self.drain_client(client);
                }
            }
            ConnKind::Link { from, to } => {
                if c.accepted {
                    self.tracker_conn_closed(to, conn);
                }
                self.link_down(from, to);
            }
        }
    }

    /// Tracker `t` learns that its side of `conn` closed.
    fn tracker_conn_closed(&mut self, t: usize, conn: ConnId) {
        let now = self.tracker_now(t);
        if let Some(n) = self.trackers[t].node.as_mut() {
            n.handle_closed(conn, now);
        }
        self.drain_tracker(t);
    }

    /// Resets a random open connection, if any.
    pub fn reset_random(&mut self) {
        if self.conns.is_empty() {
            return;
        }
        let i = self.rng.below(self.conns.len() as u64) as usize;
        let id = *self.conns.keys().nth(i).expect("in range");
        self.reset(id);
    }

    /// Stops tracker `t` abruptly: memory lost, its durable log kept.
    pub fn crash_tracker(&mut self, t: usize) {
        if self.trackers[t].node.is_none() {
            return;
        }
        self.record(format!("{} crash t{t}", self.now.0));
        *self.faults.entry("tracker crash").or_default() += 1;
        let mine: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| match c.kind {
                ConnKind::Client { tracker, .. } => tracker == t,
                ConnKind::Link { from, to } => from == t || to == t,
            })
            .map(|(id, _)| *id)
            .collect();
        self.trackers[t].node = None;
        self.trackers[t].volatile.clear();
        for c in mine {
            // What the process wrote to a socket before it died still
            // arrives (the kernel sends it), then the connection closes.
            let lc = self.conns[&c];
            let out_due = match lc.kind {
                ConnKind::Client { .. } => Some(lc.down_due),
                ConnKind::Link { from, .. } if from == t => Some(lc.up_due),
                ConnKind::Link { .. } => None,
            };
            match out_due {
                Some(due) if due > self.now => {
                    self.conns.get_mut(&c).expect("listed").accepted = false;
                    self.schedule(due, Event::CloseConn { conn: c });
                }
                _ => self.reset(c),
            }
        }
        self.trackers[t].links.clear();
    }

    /// Starts tracker `t` again from its durable log (or from nothing, if `wipe`).
    pub fn restart_tracker(&mut self, t: usize, wipe: bool) {
        if self.trackers[t].node.is_some() {
            return;
        }
        if self.mid_step_crash == Some(t) {
            self.mid_step_crash = None;
        }
        self.record(format!("{} restart t{t} wipe={wipe}", self.now.0));
        if wipe {
            *self.faults.entry("wipe").or_default() += 1;
            self.trackers[t].disk.clear();
        }
        self.start_tracker(t);
    }

    /// Whether tracker `t` may lose its data dir without the cluster losing
    /// decided entries: every other tracker is up, reachable and holds every
    /// decided entry. (A wiped tracker forgets its votes; if the others do not
    /// hold everything a majority agreed on, no consensus protocol can recover
    /// it. Wiping is losing a replica.)
    pub fn safe_to_wipe(&self, t: usize) -> bool {
        let n = self.log_len();
        self.cuts.is_empty()
            && (0..self.trackers.len()).filter(|o| *o != t).all(|o| self.tracker_up(o) && self.applied(o) == n)
    }

    pub fn tracker_up(&self, t: usize) -> bool {
        self.trackers[t].node.is_some()
    }

    fn start_tracker(&mut self, t: usize) {
        let n = self.trackers.len();
        let rng = Rng::from_u64(self.rng.next_u64());
        let rep = if n == 1 {
            let recs = self.trackers[t].disk.iter().map(|r| r.as_slice());
            Rep::Solo(SoloReplicator::recover(recs).expect("own log decodes"))
        } else {
            let nodes: Vec<NodeId> = (1..=n as NodeId).collect();
            let recs = self.trackers[t].disk.iter().map(|r| r.as_slice());
            let r = OmniReplicator::recover(t as NodeId + 1, &nodes, recs).expect("own log decodes");
            Rep::Omni(Box::new(r.with_snapshot_every(self.snapshot_every)))
        };
        let node = TrackerNode::new(self.cfg.clone(), rng, rep);
        self.trackers[t].applied = node.meta().applied();
        self.trackers[t].node = Some(node);
        for p in 0..n {
            if p != t {
                self.trackers[t].links.insert(p, Link::Down { retry_at: self.now, backoff: REDIAL_MIN });
            }
        }
    }

    /// Stops client `c` abruptly: its engine (memory) is lost, its files kept.
    pub fn crash_client(&mut self, c: usize) {
        if !self.clients[c].up {
            return;
        }
        self.record(format!("{} crash c{c}", self.now.0));
        *self.faults.entry("client crash").or_default() += 1;
        if let Some(conn) = self.clients[c].conn {
            self.reset(conn);
        }
        let ends: Vec<PeerEnd> = self.peer_links.keys().filter(|(x, _)| *x == c).copied().collect();
        for end in ends {
            if let Some(((to, other), due)) = self.peer_links.remove(&end) {
                self.peer_links.remove(&(to, other));
                let at = self.now.plus(self.net.min_latency).max(due);
                self.schedule(at, Event::PeerClosed { to, conn: other });
            }
        }
        for (_, p) in std::mem::take(&mut self.clients[c].parts) {
            self.files.remove(&part_path(&p.final_path));
        }
        self.clients[c].up = false;
    }

    /// Starts client `c` again with a fresh engine (it must log in again).
    pub fn restart_client(&mut self, c: usize) {
        let all: Vec<usize> = (0..self.trackers.len()).collect();
        self.restart_client_with(c, &all);
    }

    /// Starts client `c` again, knowing only the trackers `only`.
    pub fn restart_client_with(&mut self, c: usize, only: &[usize]) {
        if self.clients[c].up {
            return;
        }
        self.record(format!("{} restart c{c}", self.now.0));
        let trackers: Vec<SocketAddr> = only.iter().map(|t| self.trackers[*t].addr).collect();
        let cfg = ClientConfig::new(self.clients[c].listen, trackers);
        self.clients[c].engine = ClientEngine::new(cfg, Rng::from_u64(self.rng.next_u64()));
        self.clients[c].results.clear();
        self.clients[c].up = true;
    }

    pub fn client_up(&self, c: usize) -> bool {
        self.clients[c].up
    }

    /// Adds `extra` latency to everything client `c` sends to peers.
    pub fn set_slow(&mut self, c: usize, extra: Millis) {
        if extra > Millis::ZERO {
            *self.faults.entry("slow peer").or_default() += 1;
        }
        self.clients[c].slow = extra;
    }

    // ---- commands ----

    /// Types a line into client `c`'s shell; returns its ticket.
    pub fn command(&mut self, c: usize, line: &str) -> Ticket {
        let ticket = Ticket(self.next_ticket);
        self.next_ticket += 1;
        self.record(format!("{} c{c} cmd {line}", self.now.0));
        match parse(line) {
            Ok(cmd) if self.clients[c].up => {
                let now = self.client_now(c);
                self.clients[c].engine.handle_command(ticket, cmd, now);
                self.drain_client(c);
            }
            Ok(_) => {
                self.clients[c].results.insert(ticket, Err(ShellError::Local("client is down".into())));
            }
            Err(e) => {
                self.clients[c].results.insert(ticket, Err(e.into()));
            }
        }
        ticket
    }

    /// The result of `ticket` on client `c`, if it finished.
    pub fn take_result(&mut self, c: usize, ticket: Ticket) -> Option<Result<Vec<String>, ShellError>> {
        self.clients[c].results.remove(&ticket)
    }

    /// Runs until client `c` finishes `ticket` (or `limit` of virtual time passes).
    pub fn wait(&mut self, c: usize, ticket: Ticket, limit: Millis) -> Option<Result<Vec<String>, ShellError>> {
        let until = self.now.plus(limit);
        loop {
            if let Some(r) = self.clients[c].results.remove(&ticket) {
                return Some(r);
            }
            if !self.step(until) {
                return None;
            }
        }
    }

    /// Types a line and runs until it is done.
    pub fn run(&mut self, c: usize, line: &str) -> Result<Vec<String>, ShellError> {
        let t = self.command(c, line);
        self.wait(c, t, Millis::from_secs(120)).unwrap_or_else(|| panic!("`{line}` did not finish"))
    }

    /// Advances virtual time by `d`, processing everything due.
    pub fn run_for(&mut self, d: Millis) {
        let until = self.now.plus(d);
        while self.step(until) {}
        self.now = until;
    }

    fn tracker_now(&self, t: usize) -> Millis {
        self.trackers[t].clock.local(self.now)
    }

    fn client_now(&self, c: usize) -> Millis {
        self.clients[c].clock.local(self.now)
    }

    /// When the next timer of any node fires, in global time.
    fn next_timer(&self) -> Option<Millis> {
        let trackers = self.trackers.iter().flat_map(|t| {
            let node = t.node.as_ref().and_then(|n| n.poll_timeout()).map(|d| t.clock.global(d));
            let links = t.links.values().filter_map(|l| match l {
                Link::Down { retry_at, .. } if t.node.is_some() => Some(*retry_at),
                _ => None,
            });
            node.into_iter().chain(links)
        });
        let clients =
            self.clients.iter().filter(|c| c.up).filter_map(|c| c.engine.poll_timeout().map(|d| c.clock.global(d)));
        trackers.chain(clients).min()
    }

    /// Processes the next event or timer due no later than `until`; false if none.
    fn step(&mut self, until: Millis) -> bool {
        let next_event = self.queue.peek().map(|Reverse((at, _))| *at);
        let next = match (next_event, self.next_timer()) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => match a.or(b) {
                Some(t) => t,
                None => return false,
            },
        };
        if next > until {
            return false;
        }
        self.now = self.now.max(next);
        self.steps += 1;
        if next_event == Some(next) {
            let Reverse((_, id)) = self.queue.pop().expect("peeked");
            let ev = self.events.remove(&id).expect("scheduled");
            self.deliver(ev);
        } else {
            for t in 0..self.trackers.len() {
                self.tracker_timers(t);
            }
            for c in 0..self.clients.len() {
                if !self.clients[c].up {
                    continue;
                }
                let now = self.client_now(c);
                if self.clients[c].engine.poll_timeout().is_some_and(|t| t <= now) {
                    self.record(format!("{} c{c} timeout", self.now.0));
                    self.clients[c].engine.handle_timeout(now);
                    self.drain_client(c);
                }
            }
        }
        true
    }

    fn tracker_timers(&mut self, t: usize) {
        if self.trackers[t].node.is_none() {
            return;
        }
        let now = self.tracker_now(t);
        let due = self.trackers[t].node.as_ref().and_then(|n| n.poll_timeout()).is_some_and(|d| d <= now);
        if due {
            if let Some(n) = self.trackers[t].node.as_mut() {
                n.handle_timeout(now);
            }
            self.drain_tracker(t);
        }
        // Redial links that are down.
        let redial: Vec<usize> = self.trackers[t]
            .links
            .iter()
            .filter(|(_, l)| matches!(l, Link::Down { retry_at, .. } if *retry_at <= self.now))
            .map(|(p, _)| *p)
            .collect();
        for p in redial {
            let conn = self.new_conn();
            let Some(Link::Down { backoff, .. }) = self.trackers[t].links.get(&p).copied() else { continue };
            self.trackers[t].links.insert(p, Link::Connecting(conn));
            self.conns.insert(
                conn,
                LiveConn {
                    kind: ConnKind::Link { from: t, to: p },
                    up_due: self.now,
                    down_due: self.now,
                    accepted: false,
                },
            );
            let at = self.now.plus(self.latency());
            self.schedule(at, Event::LinkConnected { from: t, to: p, conn });
            // Remember the backoff for the next failure.
            self.link_backoff.insert((t, p), backoff);
        }
    }

    fn link_down(&mut self, from: usize, to: usize) {
        if self.trackers[from].node.is_none() {
            return;
        }
        let Some(l) = self.trackers[from].links.get(&to).copied() else { return };
        let backoff = self.link_backoff.get(&(from, to)).copied().unwrap_or(REDIAL_MIN);
        let was_up = matches!(l, Link::Up(_));
        let next_backoff = if was_up { REDIAL_MIN } else { Millis((backoff.0 * 2).min(REDIAL_MAX.0)) };
        let retry_at = self.now.plus(if was_up { REDIAL_MIN } else { backoff });
        self.trackers[from].links.insert(to, Link::Down { retry_at, backoff: next_backoff });
        self.link_backoff.insert((from, to), next_backoff);
        if was_up {
            let now = self.tracker_now(from);
            if let Some(n) = self.trackers[from].node.as_mut() {
                n.handle_peer_down(to as NodeId + 1, now);
            }
            self.drain_tracker(from);
        }
    }

    fn deliver(&mut self, ev: Event) {
        match ev {
            Event::Connected { client, conn } => {
                let Some(c) = self.conns.get(&conn).copied() else { return };
                let ConnKind::Client { tracker, .. } = c.kind else { return };
                if self.clients[client].conn != Some(conn) {
                    return;
                }
                let ok = self.trackers[tracker].node.is_some()
                    && self.reachable(Ep::Client(client), Ep::Tracker(tracker))
                    && self.reachable(Ep::Tracker(tracker), Ep::Client(client));
                if !ok {
                    self.record(format!("{} c{client} connect to t{tracker} failed", self.now.0));
                    self.conns.remove(&conn);
                    self.clients[client].conn = None;
                    let now = self.client_now(client);
                    self.clients[client].engine.handle_tracker_closed(now);
                    self.drain_client(client);
                    return;
                }
                self.record(format!("{} c{client} connected t{tracker} {}", self.now.0, conn.0));
                self.conns.get_mut(&conn).expect("live").accepted = true;
                let remote = SocketAddr::from(([10, 0, 1, client as u8], 40000));
                let now = self.tracker_now(tracker);
                self.trackers[tracker].node.as_mut().expect("up").handle_connected(conn, remote, now);
                self.drain_tracker(tracker);
                let now = self.client_now(client);
                self.clients[client].engine.handle_tracker_connected(now);
                self.drain_client(client);
            }
            Event::ToTracker { conn, bytes } => {
                let Some(LiveConn { kind: ConnKind::Client { tracker, .. }, .. }) = self.conns.get(&conn).copied()
                else {
                    return;
                };
                self.record(format!("{} ->t{tracker} {} {}", self.now.0, conn.0, Sha1Digest::of(&bytes).to_hex()));
                let now = self.tracker_now(tracker);
                if let Some(n) = self.trackers[tracker].node.as_mut() {
                    n.handle_bytes(conn, &bytes, now);
                }
                self.drain_tracker(tracker);
            }
            Event::ToClient { conn, bytes } => {
                let Some(LiveConn { kind: ConnKind::Client { client, .. }, .. }) = self.conns.get(&conn).copied()
                else {
                    return;
                };
                if self.clients[client].conn != Some(conn) {
                    return;
                }
                self.record(format!("{} ->c{client} {}", self.now.0, Sha1Digest::of(&bytes).to_hex()));
                let now = self.client_now(client);
                self.clients[client].engine.handle_tracker_bytes(&bytes, now);
                self.drain_client(client);
            }
            Event::LinkConnected { from, to, conn } => {
                if !self.conns.contains_key(&conn) {
                    return;
                }
                if !matches!(self.trackers[from].links.get(&to), Some(Link::Connecting(c)) if *c == conn) {
                    self.conns.remove(&conn);
                    return;
                }
                let ok = self.trackers[to].node.is_some() && self.reachable(Ep::Tracker(from), Ep::Tracker(to));
                if !ok {
                    self.conns.remove(&conn);
                    self.link_down(from, to);
                    return;
                }
                self.record(format!("{} t{from}->t{to} linked {}", self.now.0, conn.0));
                self.conns.get_mut(&conn).expect("live").accepted = true;
                self.trackers[from].links.insert(to, Link::Up(conn));
                let remote = SocketAddr::new(self.trackers[from].addr.ip(), 50000);
                let now = self.tracker_now(to);
                self.trackers[to].node.as_mut().expect("up").handle_connected(conn, remote, now);
                self.drain_tracker(to);
                let now = self.tracker_now(from);
                self.trackers[from].node.as_mut().expect("up").handle_peer_up(to as NodeId + 1, now);
                self.drain_tracker(from);
            }
            Event::LinkBytes { conn, bytes } => {
                let Some(LiveConn { kind: ConnKind::Link { from, to }, .. }) = self.conns.get(&conn).copied() else {
                    return;
                };
                self.record(format!("{} t{from}->t{to} {}", self.now.0, Sha1Digest::of(&bytes).to_hex()));
                let now = self.tracker_now(to);
                if let Some(n) = self.trackers[to].node.as_mut() {
                    n.handle_bytes(conn, &bytes, now);
                }
                self.drain_tracker(to);
            }
            Event::PeerConnected { from, conn, to, accepted } => {
                if !self.peer_links.contains_key(&(from, conn)) {
                    return;
                }
                self.record(format!("{} c{from}->c{to} peer connected", self.now.0));
                let now = self.client_now(to);
                self.clients[to].engine.handle_peer_accepted(accepted, now);
                self.drain_client(to);
                let now = self.client_now(from);
                self.clients[from].engine.handle_peer_connected(conn, now);
                self.drain_client(from);
            }
            Event::PeerBytes { to, conn, bytes } => {
                if !self.peer_links.contains_key(&(to, conn)) {
                    return;
                }
                self.record(format!("{} ->c{to} peer {} {}", self.now.0, conn.0, Sha1Digest::of(&bytes).to_hex()));
                let now = self.client_now(to);
                self.clients[to].engine.handle_peer_bytes(conn, &bytes, now);
                self.drain_client(to);
            }
            Event::PeerClosed { to, conn } => {
                if !self.clients[to].up {
                    return;
                }
                self.record(format!("{} c{to} peer {} closed", self.now.0, conn.0));
                let now = self.client_now(to);
                self.clients[to].engine.handle_peer_closed(conn, now);
                self.drain_client(to);
            }
            Event::Prepared { client, id, result } => {
                if !self.clients[client].up || !self.clients[client].parts.contains_key(&id) {
                    return;
                }
                let now = self.client_now(client);
                self.clients[client].engine.handle_download_prepared(id, result, now);
                self.drain_client(client);
            }
            Event::Finished { client, id, result } => {
                if !self.clients[client].up {
                    return;
                }
                self.record(format!("{} c{client} download {} finished {:?}", self.now.0, id.0, result));
                let now = self.client_now(client);
                self.clients[client].engine.handle_download_finished(id, result, now);
                self.drain_client(client);
            }
            Event::ChunkChecked { client, id, serial, chunk, data, ok } => {
                if !self.clients[client].up {
                    return;
                }
                let Some(p) = self.clients[client].parts.get_mut(&id).filter(|p| p.serial == serial) else { return };
                let line = format!("{} c{client} download {} chunk {chunk} checked {ok}", self.now.0, id.0);
                if ok {
                    p.stored.set(chunk);
                    let at = chunk as usize * CHUNK_SIZE as usize;
                    let path = part_path(&p.final_path);
                    self.chunks_written += 1;
                    if let Some(part) = self.files.get_mut(&path) {
                        part[at..at + data.len()].copy_from_slice(&data);
                    }
                }
                self.record(line);
                let now = self.client_now(client);
                self.clients[client].engine.handle_chunk_checked(id, chunk, ok, now);
                // The buffer comes back for reuse, its old bytes still in it.
                self.clients[client].engine.handle_chunk_buffer(id, data);
                self.drain_client(client);
            }
            Event::CloseConn { conn } => self.reset(conn),
            Event::Hashed { client, job, result } => {
                if !self.clients[client].up {
                    return;
                }
                let now = self.client_now(client);
                self.clients[client].engine.handle_file_hashed(job, result, now);
                self.drain_client(client);
            }
        }
    }

    fn drain_tracker(&mut self, t: usize) {
        loop {
            let outs: Vec<TrackerOutput> = match self.trackers[t].node.as_mut() {
                Some(n) => std::iter::from_fn(|| n.poll_output()).collect(),
                None => return,
            };
            if outs.is_empty() {
                return;
            }
            // An armed mid-step crash strikes once records are in flight: the
            // messages that need not wait for them are out, the records are
            // not on disk, and nothing else leaves.
            let crash = self.mid_step_crash == Some(t) && outs.iter().any(|o| matches!(o, TrackerOutput::Persist(_)));
            let mut waiting: BTreeSet<(bool, u64)> = BTreeSet::new();
            let (mut early, mut late) = (Vec::new(), Vec::new());
            for out in outs {
                match out {
                    // The simulated disk syncs when the step's records are
                    // written: before anything that waits for them is sent.
                    TrackerOutput::Persist(Persist::Append(r)) if !crash => {
                        let tr = &mut self.trackers[t];
                        tr.disk.append(&mut tr.volatile);
                        tr.disk.push(r);
                    }
                    // Written but not synced: a crash loses it (see crash_tracker).
                    TrackerOutput::Persist(Persist::Lazy(r)) if !crash => self.trackers[t].volatile.push(r),
                    TrackerOutput::Persist(Persist::Rewrite(r)) if !crash => {
                        self.trackers[t].volatile.clear();
                        self.trackers[t].disk = vec![r];
                    }
                    TrackerOutput::Persist(_) => {}
                    // A tracker alone decides an entry by writing it: if it dies
                    // before the write is durable, the entry never was decided
                    // (and nobody was answered). With consensus, what a tracker
                    // applies was already durable on a majority.
                    TrackerOutput::Applied { .. } if crash && self.trackers.len() == 1 => {}
                    TrackerOutput::Applied { index, entry } => self.check_applied(t, index, entry),
                    TrackerOutput::LeaderChanged { leader } => {
                        self.record(format!("{} t{t} leader {leader:?}", self.now.0));
                    }
                    out => {
                        // Keep each connection's order: once one waits, the rest wait.
                        let (key, after_sync) = match &out {
                            TrackerOutput::Transmit { conn, after_sync, .. } => ((false, conn.0), *after_sync),
                            TrackerOutput::Close { conn } => ((false, conn.0), false),
                            TrackerOutput::PeerSend { node, after_sync, .. } => ((true, *node), *after_sync),
                            _ => unreachable!("handled above"),
                        };
                        if after_sync || waiting.contains(&key) {
                            waiting.insert(key);
                            late.push(out);
                        } else {
                            early.push(out);
                        }
                    }
                }
            }
            for out in early {
                self.send_tracker_output(t, out);
            }
            if crash {
                self.mid_step_crash = None;
                self.record(format!("{} t{t} crashes mid-step", self.now.0));
                *self.faults.entry("mid-step crash").or_default() += 1;
                self.crash_tracker(t);
                return;
            }
            for out in late {
                self.send_tracker_output(t, out);
            }
        }
    }

    fn send_tracker_output(&mut self, t: usize, out: TrackerOutput) {
        match out {
            TrackerOutput::Transmit { conn, bytes, .. } => {
                // A write answered with success must already be in the log.
                if let Ok(Message::Response { id, result: Ok(_) }) = decode::<Message>(&bytes[4..]) {
                    if self.writes_sent.contains(&id) {
                        assert!(
                            self.canon_ids.contains(&id),
                            "t{t} acknowledged write {id:?} before any tracker applied it"
                        );
                        self.acked.insert(id);
                    }
                }
                let Some(c) = self.conns.get_mut(&conn) else { return };
                let ConnKind::Client { .. } = c.kind else { return };
                let due = c.down_due;
                let at = self.now.plus(self.latency()).max(due);
                self.conns.get_mut(&conn).expect("live").down_due = at;
                self.schedule(at, Event::ToClient { conn, bytes });
            }
            TrackerOutput::Close { conn } => {
                // The tracker forgot it; the other side sees the close
                // after the bytes sent before it.
                let Some(c) = self.conns.get_mut(&conn) else { return };
                c.accepted = false;
                let due = c.down_due;
                let at = self.now.plus(self.latency()).max(due);
                self.schedule(at, Event::CloseConn { conn });
            }
            TrackerOutput::PeerSend { node, bytes, .. } => {
                let to = node as usize - 1;
                let Some(Link::Up(conn)) = self.trackers[t].links.get(&to).copied() else { return };
                let Some(c) = self.conns.get(&conn).copied() else { return };
                let at = self.now.plus(self.latency()).max(c.up_due);
                self.conns.get_mut(&conn).expect("live").up_due = at;
                self.schedule(at, Event::LinkBytes { conn, bytes });
            }
            _ => {}
        }
    }

    /// Cancels a mid-step crash that has not struck yet.
    pub fn disarm(&mut self) {
        self.mid_step_crash = None;
    }

    /// Crashes tracker `t` in the middle of its next step that writes
    /// records: after it sent what need not wait for them, before they are
    /// durable (the moment the driver's fsync would have protected).
    pub fn crash_tracker_mid_step(&mut self, t: usize) {
        if self.trackers[t].node.is_some() {
            self.mid_step_crash = Some(t);
        }
    }

    /// Agreement: every tracker applies the same entry at each log index.
    fn check_applied(&mut self, t: usize, index: u64, entry: Option<Entry>) {
        let tr = &mut self.trackers[t];
        match entry {
            None => {
                assert!(index as usize <= self.canon.len(), "t{t} installed a snapshot at {index} beyond the log");
                tr.applied = index;
            }
            Some(e) => {
                assert_eq!(index, tr.applied + 1, "t{t} applied entry {index} after {}", tr.applied);
                tr.applied = index;
                let h = entry_hash(&e);
                let i = index as usize - 1;
                if i < self.canon.len() {
                    assert!(self.canon[i] == h, "t{t} applied a different entry at log index {index}: {e:?}");
                } else {
                    assert_eq!(i, self.canon.len(), "t{t} applied index {index} past the end");
                    self.canon.push(h);
                    if let Some(id) = e.id {
                        self.canon_ids.insert(id);
                    }
                    let _ = self.canon_state.apply(&e);
                    if let Err(why) = self.canon_state.check_invariants() {
                        panic!("metadata rule broken after log index {index}: {why}");
                    }
                    for (g, grp) in self.canon_state.groups() {
                        self.ever_owner.insert((g.to_string(), grp.owner.to_string()));
                        for m in &grp.members {
                            self.ever_member.insert((g.to_string(), m.to_string()));
                        }
                    }
                }
            }
        }
    }

    fn drain_client(&mut self, c: usize) {
        while let Some(out) = self.clients[c].engine.poll_output() {
            match out {
                ClientOutput::Connect { addr } => {
                    let tracker =
                        self.trackers.iter().position(|t| t.addr == addr).expect("clients dial known trackers");
                    self.close_client_conn(c);
                    let conn = self.new_conn();
                    self.clients[c].conn = Some(conn);
                    let at = self.now.plus(self.latency());
                    self.conns.insert(
                        conn,
                        LiveConn {
                            kind: ConnKind::Client { client: c, tracker },
                            up_due: at,
                            down_due: at,
                            accepted: false,
                        },
                    );
                    self.schedule(at, Event::Connected { client: c, conn });
                }
                ClientOutput::Transmit(bytes) => {
                    if let Ok(Message::Request { id, body, .. }) = decode::<Message>(&bytes[4..]) {
                        if body.is_write() {
                            self.writes_sent.insert(id);
                        }
                    }
                    let Some(conn) = self.clients[c].conn else { continue };
                    let Some(lc) = self.conns.get(&conn).copied() else { continue };
                    let at = self.now.plus(self.latency()).max(lc.up_due);
                    self.conns.get_mut(&conn).expect("live").up_due = at;
                    self.schedule(at, Event::ToTracker { conn, bytes });
                }
                ClientOutput::Disconnect => self.close_client_conn(c),
                ClientOutput::HashFile { job, path } => {
                    let result = match self.files.get(&path) {
                        None => Err("No such file or directory".to_string()),
                        Some(data) => {
                            let mut h = FileHasher::new();
                            h.update(data)
                                .map_err(|e| e.to_string())
                                .and_then(|_| h.finish().map_err(|e| e.to_string()))
                        }
                    };
                    let at = self.now.plus(self.latency());
                    self.schedule(at, Event::Hashed { client: c, job, result });
                }
                ClientOutput::Done { ticket, result } => {
                    self.record(format!("{} c{c} done {:?}", self.now.0, result));
                    self.clients[c].results.insert(ticket, result);
                }
                ClientOutput::PeerConnect { conn, addr } => {
                    let at = self.now.plus(self.latency());
                    match self.clients.iter().position(|x| x.listen == addr && x.up) {
                        Some(to) => {
                            let accepted = PeerConnId(self.next_accepted);
                            self.next_accepted += 1;
                            self.peer_links.insert((c, conn), ((to, accepted), at));
                            self.peer_links.insert((to, accepted), ((c, conn), at));
                            self.schedule(at, Event::PeerConnected { from: c, conn, to, accepted });
                        }
                        None => self.schedule(at, Event::PeerClosed { to: c, conn }),
                    }
                }
                ClientOutput::PeerTransmit { conn, bytes } => self.peer_send(c, conn, bytes),
                ClientOutput::PeerClose { conn } => {
                    if let Some(((to, other), due)) = self.peer_links.remove(&(c, conn)) {
                        self.peer_links.remove(&(to, other));
                        // The hang-up arrives after the bytes sent before it.
                        let at = self.now.plus(self.latency()).max(due);
                        self.schedule(at, Event::PeerClosed { to, conn: other });
                    }
                }
                ClientOutput::SendBlock { conn, path, offset, mut header, len } => {
                    let range = offset as usize..offset as usize + len as usize;
                    let unwritten = self.clients[c]
                        .parts
                        .values()
                        .any(|p| part_path(&p.final_path) == path && !p.stored.get((offset / CHUNK_SIZE) as u32));
                    if unwritten {
                        self.unwritten_serves += 1;
                    }
                    let result = match self.files.get(&path) {
                        Some(data) if range.end <= data.len() => {
                            header.extend_from_slice(&data[range]);
                            Ok(())
                        }
                        _ => Err(format!("{path}: cannot read")),
                    };
                    if result.is_ok() {
                        self.peer_send(c, conn, header);
                    }
                    let now = self.client_now(c);
                    self.clients[c].engine.handle_block_sent(conn, result, now);
                }
                ClientOutput::PrepareDownload { id, dest, name, digest } => {
                    let final_path = if dest.ends_with('/') { format!("{dest}{name}") } else { dest };
                    let result =
                        if self.files.contains_key(&final_path) || self.files.contains_key(&part_path(&final_path)) {
                            Err(format!("{final_path} already exists"))
                        } else {
                            let n = digest.chunks.len() as u32;
                            self.files.insert(part_path(&final_path), vec![0; digest.size as usize]);
                            Ok(Prepared {
                                part_path: part_path(&final_path),
                                final_path: final_path.clone(),
                                have: Bitmap::new(n),
                            })
                        };
                    if result.is_ok() {
                        self.next_part += 1;
                        let (serial, stored) = (self.next_part, Bitmap::new(digest.chunks.len() as u32));
                        self.clients[c].parts.insert(id, SimPart { final_path, serial, stored, due: Millis::ZERO });
                    }
                    let at = self.now.plus(self.latency());
                    self.schedule(at, Event::Prepared { client: c, id, result });
                }
                ClientOutput::WriteChunk { id, chunk, data, sha1 } => {
                    // As in net-mio: the checker reports a bad chunk at once;
                    // good ones queue, in order, for the writer, and are
                    // reported once written. A bad verdict may thus overtake
                    // earlier good ones.
                    let ok = sha1.matches(&data);
                    let lag = if ok { self.disk_lag() } else { self.latency() };
                    let Some(p) = self.clients[c].parts.get_mut(&id) else { continue };
                    let at = if ok { self.now.plus(lag).max(p.due) } else { self.now.plus(lag) };
                    if ok {
                        p.due = at;
                    }
                    let serial = p.serial;
                    self.schedule(at, Event::ChunkChecked { client: c, id, serial, chunk, data, ok });
                }
                ClientOutput::SaveProgress { .. } => {}
                ClientOutput::FinishDownload { id, sha1 } => {
                    let Some(p) = self.clients[c].parts.remove(&id) else { continue };
                    let part = self.files.remove(&part_path(&p.final_path)).unwrap_or_default();
                    let result = if Sha1Digest::of(&part) == sha1 {
                        self.files.insert(p.final_path, part);
                        Ok(())
                    } else {
                        Err("whole-file SHA1 mismatch".into())
                    };
                    let at = self.now.plus(self.latency());
                    self.schedule(at, Event::Finished { client: c, id, result });
                }
            }
        }
    }

    /// Bytes on a peer connection, delivered in order after a latency.
    fn peer_send(&mut self, c: usize, conn: PeerConnId, bytes: Vec<u8>) {
        let lat = self.latency().plus(self.clients[c].slow);
        let Some(((to, other), due)) = self.peer_links.get_mut(&(c, conn)) else { return };
        let at = self.now.plus(lat).max(*due);
        *due = at;
        let (to, other) = (*to, *other);
        self.schedule(at, Event::PeerBytes { to, conn: other, bytes });
    }

    /// A file on the simulated disk, if it is there.
    pub fn file(&self, path: &str) -> Option<&[u8]> {
        self.files.get(path).map(|v| v.as_slice())
    }

    /// Damages a file on the simulated disk (a sharer whose copy rotted).
    pub fn corrupt_file(&mut self, path: &str) {
        *self.faults.entry("corrupt file").or_default() += 1;
        if let Some(data) = self.files.get_mut(path) {
            for i in (0..data.len()).step_by(CHUNK_SIZE as usize) {
                data[i] ^= 0xff;
            }
        }
    }

    fn close_client_conn(&mut self, c: usize) {
        if let Some(conn) = self.clients[c].conn.take() {
            if let Some(lc) = self.conns.remove(&conn) {
                if let (ConnKind::Client { tracker, .. }, true) = (lc.kind, lc.accepted) {
                    self.tracker_conn_closed(tracker, conn);
                }
            }
        }
    }

    /// The metadata after every entry decided so far (by whichever tracker applied it first).
    pub fn canon_state(&self) -> &MetaState {
        &self.canon_state
    }

    /// Whether `user` was ever a member (or owner) of `group` in the decided history.
    pub fn ever_member(&self, group: &str, user: &str) -> bool {
        self.ever_member.contains(&(group.to_string(), user.to_string()))
    }

    pub fn ever_owner(&self, group: &str, user: &str) -> bool {
        self.ever_owner.contains(&(group.to_string(), user.to_string()))
    }

    /// How many writes trackers acknowledged with success.
    pub fn acked_writes(&self) -> usize {
        self.acked.len()
    }

    /// Every running tracker's metadata, for convergence checks.
    pub fn metas(&self) -> Vec<(usize, &MetaState)> {
        self.trackers.iter().enumerate().filter_map(|(i, t)| t.node.as_ref().map(|n| (i, n.meta()))).collect()
    }
}
