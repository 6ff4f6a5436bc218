//! Deterministic simulation of shoal over the production state machines.
//!
//! A [`World`] holds a tracker node and any number of client engines from
//! `shoal-core`, unchanged, and plays the network between them in virtual
//! time: every byte a node transmits is delivered after a latency drawn from
//! the world's one seeded PRNG, in order per connection, and every timer fires
//! when virtual time reaches it. No sockets, threads or clocks are involved,
//! so a seed determines the whole run; [`World::digest`] hashes its trace so
//! two runs can be compared bit for bit.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::net::SocketAddr;

use sha1::{Digest, Sha1};
use shoal_core::chunk::{FileDigest, FileHasher, Sha1Digest, CHUNK_SIZE};
use shoal_core::client::{ClientConfig, ClientEngine, ClientOutput, DownloadId, Prepared, Ticket};
use shoal_core::download::PeerConnId;
use shoal_core::meta::PasswordParams;
use shoal_core::peer::Bitmap;
use shoal_core::rng::Rng;
use shoal_core::shell::{parse, ShellError};
use shoal_core::time::Millis;
use shoal_core::tracker::{ConnId, SoloReplicator, TrackerConfig, TrackerNode, TrackerOutput};

/// The seed from `SIM_SEED`, or `default`.
pub fn seed_from_env(default: u64) -> u64 {
    std::env::var("SIM_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(default)
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
    /// A client's connection attempt reaches the tracker.
    Connected {
        client: usize,
        conn: ConnId,
    },
    ToTracker {
        conn: ConnId,
        bytes: Vec<u8>,
    },
    ToClient {
        client: usize,
        conn: ConnId,
        bytes: Vec<u8>,
    },
    Hashed {
        client: usize,
        job: u64,
        result: Result<FileDigest, String>,
    },
}

struct SimClient {
    engine: ClientEngine,
    /// The connection the engine believes is open, if any.
    conn: Option<ConnId>,
    results: BTreeMap<Ticket, Result<Vec<String>, ShellError>>,
    /// When the last byte in each direction is due, to keep per-connection order.
    up_due: Millis,
    down_due: Millis,
    listen: SocketAddr,
    /// Downloads' part files: id -> (digest, part, final path).
    parts: BTreeMap<DownloadId, SimPart>,
}

/// A download in progress; its part file lives on the simulated disk.
struct SimPart {
    digest: FileDigest,
    final_path: String,
}

fn part_path(final_path: &str) -> String {
    format!("{final_path}.part")
}

/// One end of a peer connection: (client, its id for the connection).
type PeerEnd = (usize, PeerConnId);

/// Knobs of the simulated network.
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

pub struct World {
    now: Millis,
    rng: Rng,
    net: NetConfig,
    tracker: TrackerNode,
    tracker_addr: SocketAddr,
    clients: Vec<SimClient>,
    /// Files on the simulated disks: path -> content (shared by all clients).
    files: BTreeMap<String, Vec<u8>>,
    queue: BinaryHeap<Reverse<(Millis, u64)>>,
    events: BTreeMap<u64, Event>,
    next_event: u64,
    next_conn: u64,
    next_ticket: u64,
    /// conn -> client, for routing tracker output.
    conn_owner: BTreeMap<ConnId, usize>,
    /// Running hash of every event, in order.
    trace: Sha1,
    steps: u64,
    /// Open peer connections, both directions, with when their last bytes are due.
    peer_links: BTreeMap<PeerEnd, (PeerEnd, Millis)>,
    next_accepted: u64,
    /// Chunks written to part files, and how many of them failed their SHA1
    /// (an invariant: must stay zero).
    pub chunks_written: u64,
    pub unverified_writes: u64,
    /// The tracker's durable log, as a restart would replay it.
    pub tracker_log: Vec<Vec<u8>>,
}

impl World {
    pub fn new(seed: u64, clients: usize, net: NetConfig) -> World {
        let mut rng = Rng::from_u64(seed);
        let tracker_addr: SocketAddr = "10.0.0.1:7000".parse().expect("valid");
        let cfg = TrackerConfig { password_params: PasswordParams::INSECURE_FAST, ..TrackerConfig::default() };
        let tracker = TrackerNode::new(cfg, Rng::from_u64(rng.next_u64()), SoloReplicator::default());
        let clients = (0..clients)
            .map(|i| {
                let listen = SocketAddr::from(([10, 0, 1, i as u8], 9000));
                let engine =
                    ClientEngine::new(ClientConfig::new(listen, vec![tracker_addr]), Rng::from_u64(rng.next_u64()));
                SimClient {
                    engine,
                    conn: None,
                    results: BTreeMap::new(),
                    up_due: Millis::ZERO,
                    down_due: Millis::ZERO,
                    listen,
                    parts: BTreeMap::new(),
                }
            })
            .collect();
        World {
            now: Millis::ZERO,
            rng,
            net,
            tracker,
            tracker_addr,
            clients,
            files: BTreeMap::new(),
            queue: BinaryHeap::new(),
            events: BTreeMap::new(),
            next_event: 0,
            next_conn: 1,
            next_ticket: 1,
            conn_owner: BTreeMap::new(),
            trace: Sha1::new(),
            steps: 0,
            peer_links: BTreeMap::new(),
            next_accepted: 1,
            chunks_written: 0,
            unverified_writes: 0,
            tracker_log: Vec::new(),
        }
    }

    pub fn now(&self) -> Millis {
        self.now
    }

    pub fn tracker(&self) -> &TrackerNode {
        &self.tracker
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
        self.trace.update(line.as_bytes());
        self.trace.update(b"\n");
    }

    fn latency(&mut self) -> Millis {
        let span = self.net.max_latency.0.saturating_sub(self.net.min_latency.0) + 1;
        Millis(self.net.min_latency.0 + self.rng.below(span))
    }

    fn schedule(&mut self, at: Millis, ev: Event) {
        let id = self.next_event;
        self.next_event += 1;
        self.queue.push(Reverse((at, id)));
        self.events.insert(id, ev);
    }

    /// Types a line into client `c`'s shell; returns its ticket.
    pub fn command(&mut self, c: usize, line: &str) -> Ticket {
        let ticket = Ticket(self.next_ticket);
        self.next_ticket += 1;
        self.record(format!("{} c{c} cmd {line}", self.now.0));
        match parse(line) {
            Ok(cmd) => {
                self.clients[c].engine.handle_command(ticket, cmd, self.now);
                self.drain_client(c);
            }
            Err(e) => {
                self.clients[c].results.insert(ticket, Err(e.into()));
            }
        }
        ticket
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

    /// Processes the next event or timer due no later than `until`; false if none.
    fn step(&mut self, until: Millis) -> bool {
        let next_event = self.queue.peek().map(|Reverse((at, _))| *at);
        let next_timer =
            self.clients.iter().filter_map(|c| c.engine.poll_timeout()).chain(self.tracker.poll_timeout()).min();
        let next = match (next_event, next_timer) {
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
            let now = self.now;
            if self.tracker.poll_timeout().is_some_and(|t| t <= now) {
                self.tracker.handle_timeout(now);
                self.drain_tracker();
            }
            for c in 0..self.clients.len() {
                if self.clients[c].engine.poll_timeout().is_some_and(|t| t <= now) {
                    self.record(format!("{} c{c} timeout", now.0));
                    self.clients[c].engine.handle_timeout(now);
                    self.drain_client(c);
                }
            }
        }
        true
    }

    fn deliver(&mut self, ev: Event) {
        let now = self.now;
        match ev {
            Event::Connected { client, conn } => {
                if self.clients[client].conn != Some(conn) {
                    return;
                }
                self.record(format!("{} c{client} connected {}", now.0, conn.0));
                let remote = SocketAddr::from(([10, 0, 1, client as u8], 40000));
                self.tracker.handle_connected(conn, remote, now);
                self.clients[client].engine.handle_tracker_connected(now);
                self.drain_client(client);
            }
            Event::ToTracker { conn, bytes } => {
                self.record(format!("{} ->t {} {}", now.0, conn.0, Sha1Digest::of(&bytes).to_hex()));
                self.tracker.handle_bytes(conn, &bytes, now);
                self.drain_tracker();
            }
            Event::ToClient { client, conn, bytes } => {
                if self.clients[client].conn != Some(conn) {
                    return;
                }
                self.record(format!("{} ->c{client} {}", now.0, Sha1Digest::of(&bytes).to_hex()));
                self.clients[client].engine.handle_tracker_bytes(&bytes, now);
                self.drain_client(client);
            }
            Event::PeerConnected { from, conn, to, accepted } => {
                if !self.peer_links.contains_key(&(from, conn)) {
                    return;
                }
                self.record(format!("{} c{from}->c{to} peer connected", now.0));
                self.clients[to].engine.handle_peer_accepted(accepted, now);
                self.drain_client(to);
                self.clients[from].engine.handle_peer_connected(conn, now);
                self.drain_client(from);
            }
            Event::PeerBytes { to, conn, bytes } => {
                if !self.peer_links.contains_key(&(to, conn)) {
                    return;
                }
                self.record(format!("{} ->c{to} peer {} {}", now.0, conn.0, Sha1Digest::of(&bytes).to_hex()));
                self.clients[to].engine.handle_peer_bytes(conn, &bytes, now);
                self.drain_client(to);
            }
            Event::PeerClosed { to, conn } => {
                self.record(format!("{} c{to} peer {} closed", now.0, conn.0));
                self.clients[to].engine.handle_peer_closed(conn, now);
                self.drain_client(to);
            }
            Event::Prepared { client, id, result } => {
                self.clients[client].engine.handle_download_prepared(id, result, now);
                self.drain_client(client);
            }
            Event::Finished { client, id, result } => {
                self.record(format!("{} c{client} download {} finished {:?}", now.0, id.0, result));
                self.clients[client].engine.handle_download_finished(id, result, now);
                self.drain_client(client);
            }
            Event::Hashed { client, job, result } => {
                self.clients[client].engine.handle_file_hashed(job, result, now);
                self.drain_client(client);
            }
        }
    }

    fn drain_tracker(&mut self) {
        while let Some(out) = self.tracker.poll_output() {
            match out {
                // The simulated disk is synchronous: a record is durable at once.
                TrackerOutput::Persist { record } => self.tracker_log.push(record),
                TrackerOutput::Transmit { conn, bytes } => {
                    let Some(&client) = self.conn_owner.get(&conn) else { continue };
                    let at = self.now.plus(self.latency()).max(self.clients[client].down_due);
                    self.clients[client].down_due = at;
                    self.schedule(at, Event::ToClient { client, conn, bytes });
                }
                TrackerOutput::Close { conn } => {
                    // Closing is seen by the client after the bytes before it.
                    if let Some(client) = self.conn_owner.remove(&conn) {
                        if self.clients[client].conn == Some(conn) {
                            self.clients[client].conn = None;
                            self.clients[client].engine.handle_tracker_closed(self.now);
                            self.drain_client(client);
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
                    assert_eq!(addr, self.tracker_addr, "one tracker in this world");
                    self.close_client_conn(c);
                    let conn = ConnId(self.next_conn);
                    self.next_conn += 1;
                    self.clients[c].conn = Some(conn);
                    self.conn_owner.insert(conn, c);
                    let at = self.now.plus(self.latency());
                    self.clients[c].up_due = at;
                    self.clients[c].down_due = at;
                    self.schedule(at, Event::Connected { client: c, conn });
                }
                ClientOutput::Transmit(bytes) => {
                    let Some(conn) = self.clients[c].conn else { continue };
                    let at = self.now.plus(self.latency()).max(self.clients[c].up_due);
                    self.clients[c].up_due = at;
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
                    match self.clients.iter().position(|x| x.listen == addr) {
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
                ClientOutput::SendBlock { conn, path, offset, mut frame, data_at } => {
                    let len = frame.len() - data_at;
                    let result = match self.files.get(&path) {
                        Some(data) if (offset as usize + len) <= data.len() => {
                            frame[data_at..].copy_from_slice(&data[offset as usize..offset as usize + len]);
                            Ok(())
                        }
                        _ => Err(format!("{path}: cannot read")),
                    };
                    if result.is_ok() {
                        self.peer_send(c, conn, frame);
                    }
                    self.clients[c].engine.handle_block_sent(conn, result, self.now);
                }
                ClientOutput::PrepareDownload { id, dest, name, digest } => {
                    let final_path = if dest.ends_with('/') { format!("{dest}{name}") } else { dest };
                    let result = if self.files.contains_key(&final_path) {
                        Err(format!("{final_path} already exists"))
                    } else {
                        let n = digest.chunks.len() as u32;
                        self.files.insert(part_path(&final_path), vec![0; digest.size as usize]);
                        self.clients[c].parts.insert(id, SimPart { digest, final_path: final_path.clone() });
                        Ok(Prepared { part_path: part_path(&final_path), final_path, have: Bitmap::new(n) })
                    };
                    let at = self.now.plus(self.latency());
                    self.schedule(at, Event::Prepared { client: c, id, result });
                }
                ClientOutput::WriteChunk { id, chunk, data } => {
                    let Some(p) = self.clients[c].parts.get(&id) else { continue };
                    self.chunks_written += 1;
                    if Sha1Digest::of(&data) != p.digest.chunks[chunk as usize] {
                        self.unverified_writes += 1;
                    }
                    let at = chunk as usize * CHUNK_SIZE as usize;
                    if let Some(part) = self.files.get_mut(&part_path(&p.final_path)) {
                        part[at..at + data.len()].copy_from_slice(&data);
                    }
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
        let lat = self.latency();
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
        if let Some(data) = self.files.get_mut(path) {
            for i in (0..data.len()).step_by(CHUNK_SIZE as usize) {
                data[i] ^= 0xff;
            }
        }
    }

    fn close_client_conn(&mut self, c: usize) {
        if let Some(conn) = self.clients[c].conn.take() {
            self.conn_owner.remove(&conn);
            self.tracker.handle_closed(conn, self.now);
            self.drain_tracker();
        }
    }
}
