//! The turmoil adapter: the production state machines of `core`
//! (`TrackerNode` with omnipaxos, `ClientEngine`) driven by tokio tasks over
//! turmoil's simulated TCP, so bytes take the real framing and codec path
//! through real (simulated) sockets, with turmoil's latency, crashes and
//! partitions. Its disks are the world's: a [`MemDisk`] per client and a
//! [`TrackerLog`] per tracker. Scenarios live in `tests/turmoil.rs`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha1::{Digest, Sha1};
use shoal_core::chunk::Sha1Digest;
use shoal_core::client::download::PeerConnId;
use shoal_core::client::{ClientConfig, ClientEngine, ClientInput, ClientOutput, PeerEvent, Ticket, TrackerEvent};
use shoal_core::meta::{MetaState, PasswordParams};
use shoal_core::rng::Rng;
use shoal_core::shell::parse;
use shoal_core::time::Millis;
use shoal_core::tracker::{ConnId, OmniReplicator, TrackerConfig, TrackerNode, TrackerOutput};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::time::Instant;
use turmoil::net::{TcpListener, TcpStream};

use crate::disk::{DiskConfig, MemDisk, TrackerLog};

pub const TRACKER_PORT: u16 = 7000;
pub const PEER_PORT: u16 = 9000;

/// What the scenarios share across hosts (turmoil runs them on one thread).
#[derive(Clone, Default)]
pub struct Shared {
    /// Each tracker's log: what was synced survives a crash of its host.
    pub logs: Arc<Mutex<BTreeMap<u64, TrackerLog>>>,
    /// Each running tracker's metadata, published as it changes.
    pub metas: Arc<Mutex<BTreeMap<u64, MetaState>>>,
    /// Hash of every tracker output, in the order the simulation produced them.
    pub trace: Arc<Mutex<Sha1>>,
    /// Who each tracker believes leads.
    pub leaders: Arc<Mutex<BTreeMap<u64, Option<u64>>>>,
    /// What each client script reported (for the test to check afterwards).
    pub reports: Arc<Mutex<BTreeMap<String, String>>>,
}

impl Shared {
    pub fn report(&self, who: &str, what: String) {
        self.reports.lock().unwrap().insert(who.to_string(), what);
    }
    pub fn digest(&self) -> String {
        Sha1Digest(self.trace.lock().unwrap().clone().finalize().into()).to_hex()
    }
}

/// Reads a socket into events until it closes.
fn spawn_reader<E: Send + 'static>(
    mut r: turmoil::net::tcp::OwnedReadHalf,
    tx: UnboundedSender<E>,
    bytes: impl Fn(Vec<u8>) -> E + Send + 'static,
    closed: E,
) {
    tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.send(bytes(buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
            }
        }
        let _ = tx.send(closed);
    });
}

/// Writes what it is sent; `None` (or a dropped sender) closes the socket.
fn spawn_writer(mut w: turmoil::net::tcp::OwnedWriteHalf) -> UnboundedSender<Option<Vec<u8>>> {
    let (tx, mut rx) = unbounded_channel::<Option<Vec<u8>>>();
    tokio::spawn(async move {
        while let Some(Some(b)) = rx.recv().await {
            if w.write_all(&b).await.is_err() {
                break;
            }
        }
        let _ = w.shutdown().await;
    });
    tx
}

/// Connects to `addr` in the background: `up` with the writer, then bytes
/// and `closed`; or `failed` if the connection cannot be made.
fn spawn_connect<E: Send + 'static>(
    addr: SocketAddr,
    tx: UnboundedSender<E>,
    up: impl FnOnce(UnboundedSender<Option<Vec<u8>>>) -> E + Send + 'static,
    bytes: impl Fn(Vec<u8>) -> E + Send + 'static,
    closed: E,
    failed: E,
) {
    tokio::spawn(async move {
        match TcpStream::connect(addr).await {
            Ok(s) => {
                let (r, w) = s.into_split();
                let _ = tx.send(up(spawn_writer(w)));
                spawn_reader(r, tx, bytes, closed);
            }
            Err(_) => {
                let _ = tx.send(failed);
            }
        }
    });
}

/// The simulation's clock, the same for every host and across a host's
/// restart (a restarted host's own tokio clock starts at a fraction of a
/// millisecond that depends on real time, which would make runs differ).
fn sim_now() -> Millis {
    Millis(turmoil::sim_elapsed().unwrap_or_default().as_millis() as u64)
}

/// The host clock's instant at which the simulation reads `at`.
fn instant_at(at: Millis) -> Instant {
    Instant::now() + Duration::from_millis(at.0.saturating_sub(sim_now().0))
}

// ---- tracker host ----

enum TEv {
    Accepted(u64, SocketAddr, UnboundedSender<Option<Vec<u8>>>),
    Bytes(u64, Vec<u8>),
    Closed(u64),
    /// Our link to tracker `.0`, dialled as attempt `.1`, connected / closed / sent bytes back.
    LinkUp(u64, u64, UnboundedSender<Option<Vec<u8>>>),
    LinkDown(u64, u64),
    LinkBytes(u64, u64, Vec<u8>),
}

/// A tracker host: a `TrackerNode` over omnipaxos, its log on a
/// [`TrackerLog`], its clients and links over turmoil TCP.
pub async fn tracker_host(me: u64, n: u64, shared: Shared) -> turmoil::Result {
    // Whatever was not synced died with the host's last run.
    let (records, held, partial) = {
        let mut logs = shared.logs.lock().unwrap();
        let log = logs.entry(me).or_default();
        log.crash();
        (log.records().to_vec(), log.held_ranges(), log.partial())
    };
    let nodes: Vec<u64> = (1..=n).collect();
    let rep = OmniReplicator::recover(me, &nodes, records.iter().map(|r| r.as_slice()))?.with_snapshot_every(40);
    let peer_keys =
        (1..=n).filter(|p| *p != me).map(|p| (p, crate::key_of(turmoil::lookup(format!("t{p}"))))).collect();
    let cfg = TrackerConfig { password_params: PasswordParams::INSECURE_FAST, peer_keys, ..TrackerConfig::default() };
    let mut node = TrackerNode::new(cfg, Rng::from_u64(me), rep);
    node.add_stored_ranges(held);
    if let Some((base, bytes)) = partial {
        node.restore_partial(base, bytes);
    }
    let (tx, mut rx) = unbounded_channel::<TEv>();
    let listener = TcpListener::bind(("0.0.0.0", TRACKER_PORT)).await?;
    let atx = tx.clone();
    tokio::spawn(async move {
        let mut next = 1u64;
        while let Ok((s, remote)) = listener.accept().await {
            let (r, w) = s.into_split();
            let id = next;
            next += 1;
            let _ = atx.send(TEv::Accepted(id, remote, spawn_writer(w)));
            spawn_reader(r, atx.clone(), move |b| TEv::Bytes(id, b), TEv::Closed(id));
        }
    });
    let mut conns: BTreeMap<u64, UnboundedSender<Option<Vec<u8>>>> = BTreeMap::new();
    let mut links: BTreeMap<u64, UnboundedSender<Option<Vec<u8>>>> = BTreeMap::new();
    // The current dial attempt of each link: events of older ones are stale.
    let mut attempt: BTreeMap<u64, u64> = BTreeMap::new();
    let mut published = u64::MAX;
    loop {
        let ev = match node.poll_timeout() {
            Some(d) => {
                let at = instant_at(d);
                tokio::select! {
                    biased;
                    ev = rx.recv() => ev,
                    _ = tokio::time::sleep_until(at) => None,
                }
            }
            None => rx.recv().await,
        };
        let now = sim_now();
        match ev {
            Some(TEv::Accepted(id, remote, w)) => {
                conns.insert(id, w);
                node.handle_connected(ConnId(id), remote, now);
                node.handle_secured(ConnId(id), crate::key_of(remote.ip()), now);
            }
            Some(TEv::Bytes(id, b)) => node.handle_bytes(ConnId(id), &b, now),
            Some(TEv::Closed(id)) => {
                conns.remove(&id);
                node.handle_closed(ConnId(id), now);
            }
            Some(TEv::LinkUp(p, a, w)) if attempt.get(&p) == Some(&a) => {
                links.insert(p, w);
                node.handle_link_up(p, crate::key_of(turmoil::lookup(format!("t{p}"))), now);
            }
            // A link that was up and closed is left to its deadline: when
            // a host crashes, turmoil resets its connections in the order
            // its tasks happen to be dropped (by tokio task id, a counter of
            // the process), so reporting the close would make two runs of a
            // seed differ. The node notices the silence on its own.
            Some(TEv::LinkDown(p, a)) if attempt.get(&p) == Some(&a) && !links.contains_key(&p) => {
                node.handle_link_down(p, now);
            }
            Some(TEv::LinkBytes(p, a, b)) if attempt.get(&p) == Some(&a) => node.handle_link_bytes(p, &b, now),
            Some(TEv::LinkUp(..) | TEv::LinkDown(..) | TEv::LinkBytes(..)) => {}
            None => node.handle_timeout(now),
        }
        if node.poll_timeout().is_some_and(|d| d <= now) {
            node.handle_timeout(now);
        }
        loop {
            let outs: Vec<TrackerOutput> = std::iter::from_fn(|| node.poll_output()).collect();
            if outs.is_empty() {
                break;
            }
            let mut loaded = Vec::new();
            let mut done = Vec::new();
            for out in outs {
                match out {
                    TrackerOutput::StoreRange { hash, bytes } => {
                        shared.logs.lock().unwrap().entry(me).or_default().store_range(hash, bytes)
                    }
                    TrackerOutput::DropRange { hash } => {
                        shared.logs.lock().unwrap().entry(me).or_default().drop_range(&hash)
                    }
                    TrackerOutput::SavePartial { base, offset, bytes } => {
                        shared.logs.lock().unwrap().entry(me).or_default().save_partial(base, offset, &bytes)
                    }
                    TrackerOutput::DropPartial => shared.logs.lock().unwrap().entry(me).or_default().drop_partial(),
                    TrackerOutput::LoadRange { hash } => {
                        let got = shared.logs.lock().unwrap().entry(me).or_default().load_range(&hash);
                        loaded.push((hash, got));
                    }
                    // Written; made durable when the node asks (lazy records
                    // ride along with the next sync).
                    TrackerOutput::Persist(p) => shared.logs.lock().unwrap().entry(me).or_default().persist(p),
                    TrackerOutput::Sync { seq } => {
                        shared.logs.lock().unwrap().entry(me).or_default().sync();
                        node.handle_synced(seq, now);
                    }
                    TrackerOutput::Transmit { conn, bytes } => {
                        shared.trace.lock().unwrap().update(&bytes);
                        if let Some(w) = conns.get(&conn.0) {
                            let _ = w.send(Some(bytes));
                        }
                    }
                    TrackerOutput::Close { conn } => {
                        if let Some(w) = conns.remove(&conn.0) {
                            let _ = w.send(None);
                        }
                    }
                    TrackerOutput::Dial { node: p } => {
                        let a = attempt.get(&p).map_or(1, |a| a + 1);
                        attempt.insert(p, a);
                        if let Some(w) = links.remove(&p) {
                            let _ = w.send(None);
                        }
                        spawn_connect(
                            SocketAddr::new(turmoil::lookup(format!("t{p}")), TRACKER_PORT),
                            tx.clone(),
                            move |w| TEv::LinkUp(p, a, w),
                            move |b| TEv::LinkBytes(p, a, b),
                            TEv::LinkDown(p, a),
                            TEv::LinkDown(p, a),
                        );
                    }
                    TrackerOutput::Hangup { node: p } => {
                        *attempt.entry(p).or_default() += 1;
                        if let Some(w) = links.remove(&p) {
                            let _ = w.send(None);
                        }
                    }
                    TrackerOutput::PeerSend { node: p, bytes } => {
                        shared.trace.lock().unwrap().update(&bytes);
                        if let Some(w) = links.get(&p) {
                            let _ = w.send(Some(bytes));
                        }
                    }
                    TrackerOutput::LeaderChanged { leader } => {
                        shared.trace.lock().unwrap().update(format!("t{me} leader {leader:?}").as_bytes());
                        shared.leaders.lock().unwrap().insert(me, leader);
                    }
                    TrackerOutput::Applied { .. } => {}
                    TrackerOutput::Work { ticket, job } => done.push((ticket, job.run())),
                }
            }
            for (hash, bytes) in loaded {
                node.handle_range_loaded(hash, bytes, now);
            }
            for (ticket, d) in done {
                node.handle_job_done(ticket, d, now);
            }
        }
        if node.meta().applied() != published {
            published = node.meta().applied();
            shared.metas.lock().unwrap().insert(me, node.meta().clone());
        }
    }
}

// ---- client host ----

enum CEv {
    /// Connected to the tracker at that IP.
    TrackerUp(u64, std::net::IpAddr, UnboundedSender<Option<Vec<u8>>>),
    TrackerDown(u64),
    TrackerBytes(u64, Vec<u8>),
    /// Accepted from that IP (the key its TLS handshake would prove).
    PeerAccepted(PeerConnId, std::net::IpAddr, UnboundedSender<Option<Vec<u8>>>),
    /// Connected to that IP.
    PeerUp(PeerConnId, std::net::IpAddr, UnboundedSender<Option<Vec<u8>>>),
    PeerFailed(PeerConnId),
    PeerBytes(PeerConnId, Vec<u8>),
    PeerClosed(PeerConnId),
}

/// A ClientEngine over turmoil sockets, with a simulated disk.
pub struct ClientDriver {
    engine: ClientEngine,
    tx: UnboundedSender<CEv>,
    rx: UnboundedReceiver<CEv>,
    tracker: Option<(u64, UnboundedSender<Option<Vec<u8>>>)>,
    tracker_gen: u64,
    peers: BTreeMap<PeerConnId, UnboundedSender<Option<Vec<u8>>>>,
    pub disk: MemDisk,
    results: BTreeMap<Ticket, Result<Vec<String>, String>>,
    next_ticket: u64,
}

impl ClientDriver {
    /// Starts a client on host `host` with these files on its disk.
    pub async fn start(
        seed: u64,
        host: &str,
        trackers: &[&str],
        files: BTreeMap<String, Vec<u8>>,
        max_upload_rate: Option<u64>,
    ) -> turmoil::Result<ClientDriver> {
        let me = turmoil::lookup(host);
        let listen = SocketAddr::new(me, PEER_PORT);
        let tracker_addrs: Vec<SocketAddr> =
            trackers.iter().map(|t| SocketAddr::new(turmoil::lookup(*t), TRACKER_PORT)).collect();
        let mut cfg = ClientConfig::new(listen, tracker_addrs);
        cfg.max_upload_rate = max_upload_rate;
        let engine = ClientEngine::new(cfg, Rng::from_u64(seed));
        let (tx, rx) = unbounded_channel();
        let listener = TcpListener::bind(("0.0.0.0", PEER_PORT)).await?;
        let atx = tx.clone();
        tokio::spawn(async move {
            let mut next = 1u64;
            while let Ok((s, remote)) = listener.accept().await {
                let (r, w) = s.into_split();
                let conn = PeerConnId(next);
                next += 1;
                let _ = atx.send(CEv::PeerAccepted(conn, remote.ip(), spawn_writer(w)));
                spawn_reader(r, atx.clone(), move |b| CEv::PeerBytes(conn, b), CEv::PeerClosed(conn));
            }
        });
        let cfg = DiskConfig { min_latency: Millis(0), max_latency: Millis(2), stall_one_in: 0, read_fault_one_in: 0 };
        let mut disk = MemDisk::new(cfg, seed);
        for (path, content) in files {
            disk.write_file(&path, &content);
        }
        disk.mkdir("/dl");
        Ok(ClientDriver {
            engine,
            tx,
            rx,
            tracker: None,
            tracker_gen: 0,
            peers: BTreeMap::new(),
            disk,
            results: BTreeMap::new(),
            next_ticket: 1,
        })
    }

    fn now(&self) -> Millis {
        sim_now()
    }

    /// Waits for one event (or the engine's next timer, or a disk
    /// operation's completion) and handles it.
    async fn turn(&mut self, until: Instant) {
        let due = [self.engine.poll_timeout(), self.disk.next_due()].into_iter().flatten().min();
        let deadline = due.map(instant_at);
        let at = deadline.map_or(until, |d| d.min(until));
        let ev = tokio::select! {
            biased;
            ev = self.rx.recv() => ev,
            _ = tokio::time::sleep_until(at) => None,
        };
        let now = self.now();
        let e = &mut self.engine;
        match ev {
            Some(CEv::TrackerUp(g, ip, w)) if g == self.tracker_gen => {
                self.tracker = Some((g, w));
                e.handle_input(ClientInput::Tracker(TrackerEvent::Connected { key: crate::key_of(ip) }), now);
            }
            Some(CEv::TrackerDown(g)) if g == self.tracker_gen => {
                self.tracker = None;
                e.handle_input(ClientInput::Tracker(TrackerEvent::Closed), now);
            }
            Some(CEv::TrackerBytes(g, b)) if g == self.tracker_gen => {
                e.handle_input(ClientInput::Tracker(TrackerEvent::Bytes(&b)), now)
            }
            Some(CEv::PeerAccepted(c, ip, w)) => {
                self.peers.insert(c, w);
                e.handle_input(ClientInput::Peer(c, PeerEvent::Accepted), now);
                e.handle_input(ClientInput::Peer(c, PeerEvent::Secured { key: crate::key_of(ip) }), now);
            }
            Some(CEv::PeerUp(c, ip, w)) => {
                self.peers.insert(c, w);
                e.handle_input(ClientInput::Peer(c, PeerEvent::Connected { key: Some(crate::key_of(ip)) }), now);
            }
            Some(CEv::PeerFailed(c)) | Some(CEv::PeerClosed(c)) => {
                self.peers.remove(&c);
                e.handle_input(ClientInput::Peer(c, PeerEvent::Closed), now);
            }
            Some(CEv::PeerBytes(c, b)) => e.handle_input(ClientInput::Peer(c, PeerEvent::Bytes(&b)), now),
            Some(_) => {}
            None => {}
        }
        while let Some((_, done)) = self.disk.complete(now) {
            if let Some(done) = done {
                self.engine.handle_input(ClientInput::Disk(done), now);
            }
        }
        if self.engine.poll_timeout().is_some_and(|d| d <= now) {
            self.engine.handle_input(ClientInput::Timeout, now);
        }
        self.drain();
    }

    fn drain(&mut self) {
        while let Some(out) = self.engine.poll_output() {
            let now = self.now();
            match out {
                ClientOutput::Connect { addr } => {
                    if let Some((_, w)) = self.tracker.take() {
                        let _ = w.send(None);
                    }
                    self.tracker_gen += 1;
                    let g = self.tracker_gen;
                    spawn_connect(
                        addr,
                        self.tx.clone(),
                        move |w| CEv::TrackerUp(g, addr.ip(), w),
                        move |b| CEv::TrackerBytes(g, b),
                        CEv::TrackerDown(g),
                        CEv::TrackerDown(g),
                    );
                }
                ClientOutput::Transmit(b) => {
                    if let Some((_, w)) = &self.tracker {
                        let _ = w.send(Some(b));
                    }
                }
                ClientOutput::Disconnect => {
                    if let Some((_, w)) = self.tracker.take() {
                        let _ = w.send(None);
                    }
                    self.tracker_gen += 1;
                }
                ClientOutput::Done { ticket, result } => {
                    self.results.insert(ticket, result.map_err(|e| e.to_string()));
                }
                ClientOutput::PeerConnect { conn, addr } => spawn_connect(
                    addr,
                    self.tx.clone(),
                    move |w| CEv::PeerUp(conn, addr.ip(), w),
                    move |b| CEv::PeerBytes(conn, b),
                    CEv::PeerClosed(conn),
                    CEv::PeerFailed(conn),
                ),
                ClientOutput::PeerTransmit { conn, bytes } => {
                    if let Some(w) = self.peers.get(&conn) {
                        let _ = w.send(Some(bytes));
                    }
                }
                ClientOutput::PeerClose { conn } => {
                    if let Some(w) = self.peers.remove(&conn) {
                        let _ = w.send(None);
                    }
                }
                ClientOutput::SendBlock { conn, path, offset, mut header, len } => {
                    let range = offset as usize..offset as usize + len as usize;
                    let r = match self.disk.read(&path, range) {
                        Some(d) => {
                            header.extend_from_slice(&d);
                            if let Some(w) = self.peers.get(&conn) {
                                let _ = w.send(Some(header));
                            }
                            Ok(())
                        }
                        _ => Err(format!("{path}: cannot read")),
                    };
                    self.engine.handle_input(ClientInput::Peer(conn, PeerEvent::BlockSent(r)), now);
                }
                ClientOutput::Disk(op) => self.disk.submit(0, op, now),
            }
        }
    }

    /// Runs one shell line to its end.
    pub async fn run(&mut self, line: &str) -> Result<Vec<String>, String> {
        let ticket = Ticket(self.next_ticket);
        self.next_ticket += 1;
        let cmd = parse(line).map_err(|e| e.to_string())?;
        self.engine.handle_input(ClientInput::User { ticket, cmd }, self.now());
        self.drain();
        loop {
            if let Some(r) = self.results.remove(&ticket) {
                return r;
            }
            self.turn(Instant::now() + Duration::from_secs(1)).await;
        }
    }

    /// Runs `line` until it succeeds (other clients' steps may come first).
    pub async fn until_ok(&mut self, line: &str) -> Vec<String> {
        loop {
            match self.run(line).await {
                Ok(out) => return out,
                Err(_) => self.idle(Duration::from_millis(300)).await,
            }
        }
    }

    /// Keeps the engine running (serving peers, heartbeating) for `d`.
    pub async fn idle(&mut self, d: Duration) {
        let until = Instant::now() + d;
        while Instant::now() < until {
            self.turn(until).await;
        }
    }

    /// This client's downloads.
    pub fn download_stats(&self) -> Vec<shoal_core::client::DownloadStat> {
        self.engine.download_stats(self.now())
    }

    /// Waits until the download of `name` completes; returns bytes per source.
    pub async fn wait_download(&mut self, name: &str) -> Vec<(SocketAddr, u64)> {
        loop {
            let stats = self.engine.download_stats(self.now());
            if let Some(s) = stats.iter().find(|s| s.name.as_str() == name) {
                assert!(s.failed.is_none(), "download failed: {:?}", s.failed);
                if s.complete {
                    return s.supplied.clone();
                }
            }
            self.idle(Duration::from_millis(100)).await;
        }
    }
}
