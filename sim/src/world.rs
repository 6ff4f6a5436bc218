//! The world: hosts, network and disks on one seeded PRNG and one virtual
//! clock, and the loop that runs them.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::net::SocketAddr;

use sha1::{Digest, Sha1};
use shoal_core::chunk::{FileHasher, Sha1Digest};
use shoal_core::client::disk::DiskDone;
use shoal_core::client::download::PeerConnId;
use shoal_core::client::{ClientConfig, ClientEngine, ClientInput, ClientOutput, DownloadId, PeerEvent, Ticket};
use shoal_core::meta::{MetaState, PasswordParams};
use shoal_core::proto::{Message, RequestId};
use shoal_core::rng::Rng;
use shoal_core::shell::{parse, ShellError};
use shoal_core::time::Millis;
use shoal_core::tracker::{NodeId, OmniReplicator, SoloReplicator, TrackerConfig, TrackerNode, TrackerOutput};
use shoal_core::wire::decode;

use crate::disk::{DiskConfig, MemDisk, TrackerLog};
use crate::hosts::{Clock, Link, Rep, SimClient, SimTracker};
use crate::net::{ConnKind, Ep, Event, LiveConn, NetConfig, PeerEnd};

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
    /// The clients' disks.
    pub disk: DiskConfig,
    /// Every client's upload limit, bytes per second (`--max-upload-rate`).
    pub max_upload_rate: Option<u64>,
    /// Each client's upload limit is its own uplink's rate (`bandwidth`),
    /// where `max_upload_rate` sets none: peers of mixed capacity, each
    /// pacing itself to its link.
    pub cap_at_uplink: bool,
    /// Every client's download settings (`None`: the client's defaults).
    pub download: Option<shoal_core::client::download::DownloadConfig>,
    /// Each client's network capacity for peer traffic, by client index
    /// (`None`, and a rate of 0, unlimited).
    pub bandwidth: Option<fn(usize) -> Bandwidth>,
}

/// A block a watched client sent: when, to which client, at what offset
/// of the file, how long.
pub type ServedBlock = (Millis, usize, u64, u32);

/// A host's link for peer traffic, bytes per second each way. What a client
/// sends to peers leaves one message after another at `up` (one queue for
/// all its connections, like the uplink of a host); what it receives comes
/// in one after another at `down`; each message then takes the path's
/// latency. Deterministic: the order of sends decides the order of the
/// queues.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bandwidth {
    pub up: u64,
    pub down: u64,
}

/// Client `i`'s address: 10.0.1.0 to 10.0.1.255 for the first 256, then
/// on through 10.0.2.0 and up (the trackers are at 10.0.0.1 and up).
pub(crate) fn client_ip(i: usize) -> std::net::IpAddr {
    let n = i + 256;
    std::net::Ipv4Addr::new(10, (n >> 16) as u8, (n >> 8) as u8, n as u8).into()
}

/// A client's upload limit: the world's, else its uplink's if so asked.
pub(crate) fn upload_cap(max: Option<u64>, at_uplink: bool, link: Bandwidth) -> Option<u64> {
    max.or((at_uplink && link.up > 0).then_some(link.up))
}

impl Default for WorldConfig {
    fn default() -> Self {
        WorldConfig {
            trackers: 1,
            clients: 2,
            net: NetConfig::default(),
            max_skew_ppm: 0,
            snapshot_every: 50,
            disk: DiskConfig::default(),
            max_upload_rate: None,
            cap_at_uplink: false,
            download: None,
            bandwidth: None,
        }
    }
}

pub struct World {
    pub(crate) now: Millis,
    pub(crate) rng: Rng,
    pub(crate) net: NetConfig,
    pub(crate) trackers: Vec<SimTracker>,
    pub(crate) clients: Vec<SimClient>,
    /// The clients' files (paths are each client's own).
    pub(crate) disk: MemDisk,
    /// Every file put on the disk, by its whole-file SHA1: what downloads of
    /// it must write and serve.
    pub(crate) sources: BTreeMap<Sha1Digest, crate::pieces::Stored>,
    /// For a resumed download: the chunks its sidecar claimed intact, which
    /// it must not fetch again.
    pub(crate) resume_keep: BTreeMap<(usize, DownloadId), BTreeSet<u32>>,
    pub(crate) queue: BinaryHeap<Reverse<(Millis, u64)>>,
    pub(crate) events: BTreeMap<u64, Event>,
    pub(crate) next_event: u64,
    pub(crate) next_conn: u64,
    pub(crate) next_ticket: u64,
    pub(crate) conns: BTreeMap<shoal_core::tracker::ConnId, LiveConn>,
    /// Directions that lose everything, connections reset: (from, to).
    pub(crate) cuts: BTreeSet<(Ep, Ep)>,
    /// Directions cut silently, and what they hold up until the heal.
    pub(crate) silent: BTreeSet<(Ep, Ep)>,
    pub(crate) stalled: Vec<Event>,
    /// Running hash of every event, in order.
    pub(crate) trace: Sha1,
    pub(crate) steps: u64,
    /// Open peer connections, both directions, with when their last bytes are due.
    pub(crate) peer_links: BTreeMap<PeerEnd, (PeerEnd, Millis)>,
    pub(crate) next_accepted: u64,
    /// The user each serving end's downloader was logged in as when it dialled.
    pub(crate) link_user: BTreeMap<PeerEnd, Option<String>>,
    /// The next peer connection reaches an impostor instead of the sharer.
    pub(crate) forge_dial: bool,
    /// Downloaders' connections that reached an impostor: nothing may be sent on them.
    pub(crate) forged_dials: BTreeSet<PeerEnd>,
    /// Serving ends opened by an impostor showing a copied grant: nothing of
    /// the file may be sent on them.
    pub(crate) impostor_serves: BTreeSet<PeerEnd>,
    /// The last `Want` a downloader sent (its grant is what an eavesdropper copies).
    pub(crate) last_want: Option<shoal_core::client::peer::PeerMessage>,
    /// Chunks written to part files, and blocks served from part files
    /// (each checked against the source).
    pub chunks_written: u64,
    pub part_serves: u64,
    /// The client watched and the blocks it sent since, if a test asked
    /// (see [`World::watch_serves`]).
    pub watched_serves: Option<(usize, Vec<ServedBlock>)>,
    /// Blocks served whose receiver was checked to be a member.
    pub member_serves: u64,
    /// Hash of the entry applied at each log index, by whichever tracker applied it first.
    pub(crate) canon: Vec<[u8; 20]>,
    pub(crate) snapshot_every: usize,
    /// The state after the canonical log, and who was ever a member or owner of which group.
    pub(crate) canon_state: MetaState,
    pub(crate) ever_member: BTreeSet<(String, String)>,
    pub(crate) ever_owner: BTreeSet<(String, String)>,
    /// Write requests clients sent, and those a tracker answered with success.
    pub(crate) writes_sent: BTreeSet<RequestId>,
    pub(crate) acked: BTreeSet<RequestId>,
    /// Request ids of the entries in the canonical log.
    pub(crate) canon_ids: BTreeSet<RequestId>,
    /// A tracker armed to crash in the middle of its next step with records.
    pub(crate) mid_step_crash: Option<usize>,
    /// How many faults of each kind were injected.
    pub faults: BTreeMap<&'static str, u64>,
    /// Jobs trackers ran off their event loop, by kind (`"encode"`: a
    /// snapshot sync for a tracker catching up; `"decode"`: a consensus
    /// message that came in parts).
    pub jobs: BTreeMap<&'static str, u64>,
    /// `SIM_TRACE=1`: print the trace as it is recorded.
    pub(crate) verbose: bool,
    pub(crate) cfg: TrackerConfig,
    pub(crate) max_upload_rate: Option<u64>,
    pub(crate) cap_at_uplink: bool,
    pub(crate) download: Option<shoal_core::client::download::DownloadConfig>,
    /// Each running client's next timer (global time), by when it fires:
    /// kept as each client's engine changes, so that finding the next timer
    /// does not ask every client (a step then costs the same in a crowd of
    /// a thousand as of two).
    pub(crate) client_timers: BTreeSet<(Millis, usize)>,
}

/// A disk result, for the trace.
fn disk_line(d: &DiskDone) -> String {
    match d {
        DiskDone::FileHashed { job, result } => format!("hashed file {job} ok={}", result.is_ok()),
        DiskDone::PartOpened { id, result } => format!("{} opened ok={}", id.0, result.is_ok()),
        DiskDone::Read { id, chunk, result, .. } => format!("{} read {chunk} ok={}", id.0, result.is_ok()),
        DiskDone::Hashed { id, .. } => format!("{} hashed", id.0),
        DiskDone::Written { id, chunk, result, .. } => format!("{} wrote {chunk} ok={}", id.0, result.is_ok()),
        DiskDone::StateSaved { id, result } => format!("{} state ok={}", id.0, result.is_ok()),
        DiskDone::Finished { id, result } => format!("{} finished {result:?}", id.0),
    }
}

impl World {
    /// One tracker (no consensus), `clients` clients, true clocks.
    pub fn new(seed: u64, clients: usize, net: NetConfig) -> World {
        World::build(seed, WorldConfig { trackers: 1, clients, net, ..WorldConfig::default() })
    }

    pub fn build(seed: u64, wc: WorldConfig) -> World {
        let mut rng = Rng::from_u64(seed);
        let tracker_addrs: Vec<SocketAddr> =
            (0..wc.trackers).map(|i| SocketAddr::from(([10, 0, 0, 1 + i as u8], 7000))).collect();
        let cfg = TrackerConfig {
            password_params: PasswordParams::INSECURE_FAST,
            report_applied: true,
            peer_keys: tracker_addrs
                .iter()
                .enumerate()
                .map(|(i, a)| (i as NodeId + 1, crate::key_of(a.ip())))
                .collect(),
            // Every other seed splits consensus messages into parts of
            // 2-16 KiB, so that syncs and batches go in parts (taken from the seed,
            // not the world's generator: the other draws stay as they were).
            consensus_part: if seed.is_multiple_of(2) {
                2048 + (seed / 2 % 14_336) as usize
            } else {
                shoal_core::tracker::stream::PART
            },
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
                log: TrackerLog::default(),
                links: BTreeMap::new(),
                applied: 0,
                run: 0,
            })
            .collect();
        let clients = (0..wc.clients)
            .map(|i| {
                let listen = SocketAddr::new(client_ip(i), 9000);
                let mut cfg = ClientConfig::new(listen, tracker_addrs.clone());
                let link = wc.bandwidth.map(|f| f(i)).unwrap_or_default();
                cfg.max_upload_rate = upload_cap(wc.max_upload_rate, wc.cap_at_uplink, link);
                if let Some(d) = &wc.download {
                    cfg.download = *d;
                }
                let engine = ClientEngine::new(cfg, Rng::from_u64(rng.next_u64()));
                SimClient {
                    engine,
                    clock: skewed(&mut rng),
                    conn: None,
                    results: BTreeMap::new(),
                    listen,
                    slow: Millis::ZERO,
                    up: true,
                    last_user: None,
                    link,
                    up_free_us: 0,
                    down_free_us: 0,
                    timer: None,
                }
            })
            .collect();
        let mut w = World {
            now: Millis::ZERO,
            rng,
            net: wc.net,
            trackers,
            clients,
            disk: MemDisk::new(wc.disk, seed ^ 0xd15c),
            sources: BTreeMap::new(),
            resume_keep: BTreeMap::new(),
            queue: BinaryHeap::new(),
            events: BTreeMap::new(),
            next_event: 0,
            next_conn: 1,
            next_ticket: 1,
            conns: BTreeMap::new(),
            cuts: BTreeSet::new(),
            silent: BTreeSet::new(),
            stalled: Vec::new(),
            trace: Sha1::new(),
            steps: 0,
            peer_links: BTreeMap::new(),
            next_accepted: 1,
            link_user: BTreeMap::new(),
            forge_dial: false,
            forged_dials: BTreeSet::new(),
            impostor_serves: BTreeSet::new(),
            last_want: None,
            chunks_written: 0,
            part_serves: 0,
            watched_serves: None,
            member_serves: 0,
            canon: Vec::new(),
            snapshot_every: wc.snapshot_every,
            writes_sent: BTreeSet::new(),
            acked: BTreeSet::new(),
            canon_ids: BTreeSet::new(),
            mid_step_crash: None,
            faults: BTreeMap::new(),
            jobs: BTreeMap::new(),
            verbose: std::env::var("SIM_TRACE").is_ok_and(|v| v == "1"),
            canon_state: MetaState::new(),
            ever_member: BTreeSet::new(),
            ever_owner: BTreeSet::new(),
            cfg,
            max_upload_rate: wc.max_upload_rate,
            cap_at_uplink: wc.cap_at_uplink,
            download: wc.download,
            client_timers: BTreeSet::new(),
        };
        for c in 0..wc.clients {
            w.refresh_timer(c);
        }
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

    /// Client `c`'s downloads, as it reports them.
    pub fn download_stats(&self, c: usize) -> Vec<shoal_core::client::DownloadStat> {
        self.clients[c].engine.download_stats(self.client_now(c))
    }

    /// Whether client `c` is up with a download running.
    pub fn downloading(&self, c: usize) -> bool {
        self.clients[c].up && self.clients[c].engine.downloads_running()
    }

    /// Where client `c` serves peers.
    pub fn client_addr(&self, c: usize) -> SocketAddr {
        self.clients[c].listen
    }

    pub fn client_count(&self) -> usize {
        self.clients.len()
    }

    /// Tracker `t`'s durable log, as a restart would replay it.
    pub fn tracker_log(&self, t: usize) -> &[Vec<u8>] {
        self.trackers[t].log.records()
    }

    /// How many log entries some tracker has applied.
    /// Whether tracker `t`'s range store holds this range durably.
    pub fn holds_range(&self, t: usize, hash: &shoal_core::chunk::Sha1Digest) -> bool {
        self.trackers[t].log.holds_durably(hash)
    }

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

    /// Bytes in flight on the network (queued events).
    pub fn bytes_in_flight(&self) -> usize {
        self.events
            .values()
            .map(|e| match e {
                Event::PeerBytes { bytes, .. }
                | Event::ToTracker { bytes, .. }
                | Event::ToClient { bytes, .. }
                | Event::LinkBytes { bytes, .. }
                | Event::LinkBack { bytes, .. } => bytes.len(),
                _ => 0,
            })
            .sum()
    }

    /// From now on, records every block client `c` sends ([`World::watched_serves`]).
    pub fn watch_serves(&mut self, c: usize) {
        self.watched_serves = Some((c, Vec::new()));
    }

    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Puts a file on the simulated disk (and remembers its content, to
    /// check what downloads of it write and serve).
    pub fn write_file(&mut self, path: &str, content: &[u8]) {
        let mut h = FileHasher::new();
        if h.update(content).is_ok() {
            if let Ok(d) = h.finish() {
                if !self.sources.contains_key(&d.sha1) {
                    let stored = self.disk.store(content);
                    self.sources.insert(d.sha1, stored);
                }
            }
        }
        self.disk.write_file(path, content);
    }

    /// Makes a directory on the simulated disk.
    pub fn mkdir(&mut self, path: &str) {
        self.disk.mkdir(path);
    }

    pub(crate) fn record(&mut self, line: String) {
        if self.verbose {
            eprintln!("{line}");
        }
        self.trace.update(line.as_bytes());
        self.trace.update(b"\n");
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
                self.clients[c].engine.handle_input(ClientInput::User { ticket, cmd }, now);
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

    pub(crate) fn tracker_now(&self, t: usize) -> Millis {
        self.trackers[t].clock.local(self.now)
    }

    pub(crate) fn client_now(&self, c: usize) -> Millis {
        self.clients[c].clock.local(self.now)
    }

    /// When the next timer of any node fires, in global time.
    pub(crate) fn next_timer(&self) -> Option<Millis> {
        let trackers = self
            .trackers
            .iter()
            .filter_map(|t| t.node.as_ref().and_then(|n| n.poll_timeout()).map(|d| t.clock.global(d)));
        trackers.chain(self.client_timers.first().map(|(at, _)| *at)).min()
    }

    /// Files client `c`'s next timer where [`World::next_timer`] finds it:
    /// called whenever its engine may have changed (after every drain, a
    /// crash or a restart).
    pub(crate) fn refresh_timer(&mut self, c: usize) {
        let cl = &mut self.clients[c];
        if let Some(old) = cl.timer.take() {
            self.client_timers.remove(&(old, c));
        }
        if cl.up {
            cl.timer = cl.engine.poll_timeout().map(|d| cl.clock.global(d));
            if let Some(at) = cl.timer {
                self.client_timers.insert((at, c));
            }
        }
    }

    /// Processes the next event or timer due no later than `until`; false if none.
    pub(crate) fn step(&mut self, until: Millis) -> bool {
        let next_event = self.queue.peek().map(|Reverse((at, _))| *at);
        let next_disk = self.disk.next_due();
        let Some(next) = [next_event, next_disk, self.next_timer()].into_iter().flatten().min() else {
            return false;
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
        } else if next_disk == Some(next) {
            if let Some((c, done)) = self.disk.complete(next) {
                self.disk_done(c, done);
            }
        } else {
            for t in 0..self.trackers.len() {
                self.tracker_timers(t);
            }
            // In client order, as every due one fires in the same step.
            let mut due: Vec<usize> =
                self.client_timers.iter().take_while(|(at, _)| *at <= self.now).map(|(_, c)| *c).collect();
            due.sort_unstable();
            for c in due {
                if !self.clients[c].up {
                    continue;
                }
                let now = self.client_now(c);
                if self.clients[c].engine.poll_timeout().is_some_and(|t| t <= now) {
                    self.record(format!("{} c{c} timeout", self.now.0));
                    self.clients[c].engine.handle_input(ClientInput::Timeout, now);
                    self.drain_client(c);
                }
            }
        }
        true
    }

    pub(crate) fn start_tracker(&mut self, t: usize) {
        let n = self.trackers.len();
        let rng = Rng::from_u64(self.rng.next_u64());
        let rep = if n == 1 {
            let recs = self.trackers[t].log.records().iter().map(|r| r.as_slice());
            Rep::Solo(SoloReplicator::recover(recs).expect("own log decodes"))
        } else {
            let nodes: Vec<NodeId> = (1..=n as NodeId).collect();
            let recs = self.trackers[t].log.records().iter().map(|r| r.as_slice());
            let r = OmniReplicator::recover(t as NodeId + 1, &nodes, recs).expect("own log decodes");
            Rep::Omni(Box::new(r.with_snapshot_every(self.snapshot_every)))
        };
        let mut node = TrackerNode::new(self.cfg.clone(), rng, rep);
        node.add_stored_ranges(self.trackers[t].log.held_ranges());
        if let Some((base, bytes)) = self.trackers[t].log.partial() {
            node.restore_partial(base, bytes);
        }
        self.trackers[t].applied = node.meta().applied();
        self.trackers[t].node = Some(node);
        self.trackers[t].links.clear();
        self.trackers[t].run += 1;
    }

    pub(crate) fn drain_tracker(&mut self, t: usize) {
        loop {
            let outs: Vec<TrackerOutput> = match self.trackers[t].node.as_mut() {
                Some(n) => std::iter::from_fn(|| n.poll_output()).collect(),
                None => return,
            };
            if outs.is_empty() {
                return;
            }
            // An armed mid-step crash strikes when the step asks for its
            // records to be made durable: what need not wait for them is
            // out, they are not on disk, and what waits never leaves.
            let crash = self.mid_step_crash == Some(t) && outs.iter().any(|o| matches!(o, TrackerOutput::Sync { .. }));
            let mut loaded = Vec::new();
            for out in outs {
                match out {
                    TrackerOutput::StoreRange { hash, bytes } => self.trackers[t].log.store_range(hash, bytes),
                    TrackerOutput::LoadRange { hash } => loaded.push((hash, self.trackers[t].log.load_range(&hash))),
                    TrackerOutput::DropRange { hash } => self.trackers[t].log.drop_range(&hash),
                    TrackerOutput::SavePartial { base, offset, bytes } => {
                        self.trackers[t].log.save_partial(base, offset, &bytes)
                    }
                    TrackerOutput::DropPartial => self.trackers[t].log.drop_partial(),
                    // Written, not yet durable: a crash before the sync loses it.
                    TrackerOutput::Persist(p) => self.trackers[t].log.persist(p),
                    TrackerOutput::Sync { .. } if crash => {
                        self.mid_step_crash = None;
                        self.record(format!("{} t{t} crashes mid-step", self.now.0));
                        *self.faults.entry("mid-step crash").or_default() += 1;
                        self.crash_tracker(t);
                        return;
                    }
                    // The simulated disk syncs at once.
                    TrackerOutput::Sync { seq } => {
                        self.trackers[t].log.sync();
                        let now = self.tracker_now(t);
                        if let Some(n) = self.trackers[t].node.as_mut() {
                            n.handle_synced(seq, now);
                        }
                    }
                    // A tracker alone decides an entry by writing it: if it dies
                    // before the write is durable, the entry never was decided
                    // (and nobody was answered). With consensus, what a tracker
                    // applies was already durable on a majority.
                    TrackerOutput::Applied { .. } if crash && self.trackers.len() == 1 => {}
                    TrackerOutput::Applied { index, entry } => self.check_applied(t, index, entry),
                    TrackerOutput::LeaderChanged { leader } => {
                        self.record(format!("{} t{t} leader {leader:?}", self.now.0));
                    }
                    TrackerOutput::Dial { node } => self.dial(t, node as usize - 1),
                    TrackerOutput::Hangup { node } => self.hang_up(t, node as usize - 1),
                    // A thread of the driver's runs it while the tracker goes on.
                    TrackerOutput::Work { ticket, job } => {
                        *self.jobs.entry(job.kind()).or_default() += 1;
                        let at = self.now.plus(self.latency());
                        let run = self.trackers[t].run;
                        self.schedule(at, Event::JobDone { t, run, ticket, done: job.run() });
                    }
                    out => self.send_tracker_output(t, out),
                }
            }
            let now = self.tracker_now(t);
            if let Some(n) = self.trackers[t].node.as_mut() {
                for (hash, bytes) in loaded {
                    n.handle_range_loaded(hash, bytes, now);
                }
            }
        }
    }

    pub(crate) fn send_tracker_output(&mut self, t: usize, out: TrackerOutput) {
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
                let due = c.down_due;
                let back = matches!(c.kind, ConnKind::Link { .. });
                let at = self.now.plus(self.latency()).max(due);
                self.conns.get_mut(&conn).expect("live").down_due = at;
                if back {
                    self.schedule(at, Event::LinkBack { conn, bytes });
                } else {
                    self.schedule(at, Event::ToClient { conn, bytes });
                }
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

    pub(crate) fn drain_client(&mut self, c: usize) {
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
                ClientOutput::Done { ticket, result } => {
                    self.record(format!("{} c{c} done {:?}", self.now.0, result));
                    if let Some(u) = self.clients[c].engine.user() {
                        self.clients[c].last_user = Some(u.to_string());
                    }
                    self.clients[c].results.insert(ticket, result);
                }
                ClientOutput::PeerConnect { conn, addr } => {
                    let at = self.now.plus(self.latency());
                    if std::mem::take(&mut self.forge_dial) {
                        *self.faults.entry("forged sharer dialled").or_default() += 1;
                        self.forged_dials.insert((c, conn));
                        self.schedule(at, Event::ForgedPeerConnected { from: c, conn });
                        continue;
                    }
                    match self.clients.iter().position(|x| x.listen == addr && x.up) {
                        Some(to) => {
                            let accepted = PeerConnId(self.next_accepted);
                            self.next_accepted += 1;
                            self.peer_links.insert((c, conn), ((to, accepted), at));
                            self.peer_links.insert((to, accepted), ((c, conn), at));
                            self.link_user.insert((to, accepted), self.clients[c].last_user.clone());
                            self.schedule(at, Event::PeerConnected { from: c, conn, to, accepted });
                        }
                        None => self.schedule(at, Event::PeerClosed { to: c, conn }),
                    }
                }
                ClientOutput::PeerTransmit { conn, bytes } => {
                    if self.check_peer_transmit(c, conn, &bytes) {
                        self.peer_send(c, conn, bytes);
                    }
                }
                ClientOutput::PeerClose { conn } => {
                    self.peer_closed_by(c, conn);
                    if let Some(((to, other), due)) = self.peer_links.remove(&(c, conn)) {
                        self.peer_links.remove(&(to, other));
                        // The hang-up arrives after the bytes sent before it.
                        let at = self.now.plus(self.latency()).max(due);
                        self.schedule(at, Event::PeerClosed { to, conn: other });
                    }
                }
                ClientOutput::SendBlock { conn, path, offset, mut header, len } => {
                    self.check_serve(c, &path, offset, len);
                    if let Some((w, log)) = self.watched_serves.as_mut().filter(|(w, _)| *w == c) {
                        let to = self.peer_links.get(&(*w, conn)).map_or(usize::MAX, |((to, _), _)| *to);
                        log.push((self.now, to, offset, len));
                    }
                    self.check_receiver(c, conn);
                    let range = offset as usize..offset as usize + len as usize;
                    let result = match self.disk.read(&path, range) {
                        Some(data) => {
                            header.extend_from_slice(&data);
                            Ok(())
                        }
                        None => Err(format!("{path}: cannot read")),
                    };
                    if result.is_ok() {
                        self.peer_send(c, conn, header);
                    }
                    let now = self.client_now(c);
                    self.clients[c].engine.handle_input(ClientInput::Peer(conn, PeerEvent::BlockSent(result)), now);
                }
                ClientOutput::Disk(op) => {
                    self.check_disk_op(c, &op);
                    self.disk.submit(c, op, self.now);
                }
            }
        }
        self.refresh_timer(c);
    }

    /// A file on the simulated disk (a copy of its bytes), if it is there.
    pub fn file(&self, path: &str) -> Option<Vec<u8>> {
        self.disk.file(path)
    }

    /// Whether a file is on the simulated disk.
    pub fn has_file(&self, path: &str) -> bool {
        self.disk.stored(path).is_some()
    }

    /// The simulated disk, for its fault counts.
    pub fn disk(&self) -> &MemDisk {
        &self.disk
    }

    pub(crate) fn close_client_conn(&mut self, c: usize) {
        if let Some(conn) = self.clients[c].conn.take() {
            if let Some(lc) = self.conns.remove(&conn) {
                if let (ConnKind::Client { tracker, .. }, true) = (lc.kind, lc.accepted) {
                    self.tracker_conn_closed(tracker, conn);
                }
            }
        }
    }
    /// A disk operation of client `c` completed.
    pub(crate) fn disk_done(&mut self, c: usize, done: Option<DiskDone>) {
        let Some(done) = done else { return };
        if !self.clients[c].up {
            return;
        }
        self.record(format!("{} c{c} disk {}", self.now.0, disk_line(&done)));
        self.check_disk_done(c, &done);
        let now = self.client_now(c);
        self.clients[c].engine.handle_input(ClientInput::Disk(done), now);
        self.drain_client(c);
    }
}
