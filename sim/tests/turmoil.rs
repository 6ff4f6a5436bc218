//! turmoil scenarios: the production state machines of `core` (TrackerNode
//! with omnipaxos, ClientEngine) driven by a small tokio adapter over
//! turmoil's simulated TCP, so bytes take the real framing and codec path
//! through real (simulated) sockets, with turmoil's latency, crashes and
//! partitions. Each scenario is seeded (`SIM_SEED`), prints
//! `seed=<n> digest=<hex>` over the trackers' output, and a meta-test
//! requires one seed to replay to the same digest.
//!
//! Scenarios: multi-peer parallel download, sudden peer shutdown, tracker
//! failure and recovery, artificial latency, consistency across trackers.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha1::{Digest, Sha1};
use shoal_core::chunk::{FileHasher, Sha1Digest};
use shoal_core::client::download::PeerConnId;
use shoal_core::client::peer::Bitmap;
use shoal_core::client::{ClientConfig, ClientEngine, ClientOutput, DownloadId, Prepared, Ticket};
use shoal_core::meta::{MetaState, PasswordParams};
use shoal_core::rng::Rng;
use shoal_core::shell::parse;
use shoal_core::time::Millis;
use shoal_core::tracker::{ConnId, OmniReplicator, Persist, TrackerConfig, TrackerNode, TrackerOutput};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::time::Instant;
use turmoil::net::{TcpListener, TcpStream};

const TRACKER_PORT: u16 = 7000;
const PEER_PORT: u16 = 9000;

/// What the scenarios share across hosts (turmoil runs them on one thread).
#[derive(Clone, Default)]
struct Shared {
    /// Each tracker's durable log: survives a crash of its host.
    disks: Arc<Mutex<BTreeMap<u64, Vec<Vec<u8>>>>>,
    /// Each running tracker's metadata, published as it changes.
    metas: Arc<Mutex<BTreeMap<u64, MetaState>>>,
    /// Hash of every tracker output, in the order the simulation produced them.
    trace: Arc<Mutex<Sha1>>,
    /// Who each tracker believes leads.
    leaders: Arc<Mutex<BTreeMap<u64, Option<u64>>>>,
    /// What each client script reported (for the test to check afterwards).
    reports: Arc<Mutex<BTreeMap<String, String>>>,
}

impl Shared {
    fn report(&self, who: &str, what: String) {
        self.reports.lock().unwrap().insert(who.to_string(), what);
    }
    fn digest(&self) -> String {
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

fn millis(start: Instant) -> Millis {
    Millis(start.elapsed().as_millis() as u64)
}

// ---- tracker host ----

enum TEv {
    Accepted(u64, SocketAddr, UnboundedSender<Option<Vec<u8>>>),
    Bytes(u64, Vec<u8>),
    Closed(u64),
    PeerUp(u64, UnboundedSender<Option<Vec<u8>>>),
    PeerDown(u64),
}

async fn tracker_host(me: u64, n: u64, shared: Shared) -> turmoil::Result {
    let records = shared.disks.lock().unwrap().get(&me).cloned().unwrap_or_default();
    let nodes: Vec<u64> = (1..=n).collect();
    let rep = OmniReplicator::recover(me, &nodes, records.iter().map(|r| r.as_slice()))?.with_snapshot_every(40);
    let cfg = TrackerConfig { password_params: PasswordParams::INSECURE_FAST, ..TrackerConfig::default() };
    let mut node = TrackerNode::new(cfg, Rng::from_u64(me), rep);
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
    for p in nodes.iter().copied().filter(|p| *p != me) {
        let ptx = tx.clone();
        tokio::spawn(async move {
            loop {
                if let Ok(s) = TcpStream::connect((format!("t{p}"), TRACKER_PORT)).await {
                    let (mut r, w) = s.into_split();
                    let _ = ptx.send(TEv::PeerUp(p, spawn_writer(w)));
                    let mut buf = [0u8; 1024];
                    while let Ok(k) = r.read(&mut buf).await {
                        if k == 0 {
                            break;
                        }
                    }
                    let _ = ptx.send(TEv::PeerDown(p));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
    }
    let start = Instant::now();
    let mut conns: BTreeMap<u64, UnboundedSender<Option<Vec<u8>>>> = BTreeMap::new();
    let mut links: BTreeMap<u64, UnboundedSender<Option<Vec<u8>>>> = BTreeMap::new();
    let mut published = u64::MAX;
    loop {
        let ev = match node.poll_timeout() {
            Some(d) => {
                let at = start + Duration::from_millis(d.0);
                tokio::select! {
                    biased;
                    ev = rx.recv() => ev,
                    _ = tokio::time::sleep_until(at) => None,
                }
            }
            None => rx.recv().await,
        };
        let now = millis(start);
        match ev {
            Some(TEv::Accepted(id, remote, w)) => {
                conns.insert(id, w);
                node.handle_connected(ConnId(id), remote, now);
            }
            Some(TEv::Bytes(id, b)) => node.handle_bytes(ConnId(id), &b, now),
            Some(TEv::Closed(id)) => {
                conns.remove(&id);
                node.handle_closed(ConnId(id), now);
            }
            Some(TEv::PeerUp(p, w)) => {
                links.insert(p, w);
                node.handle_peer_up(p, now);
            }
            Some(TEv::PeerDown(p)) => {
                links.remove(&p);
                node.handle_peer_down(p, now);
            }
            None => node.handle_timeout(now),
        }
        if node.poll_timeout().is_some_and(|d| d <= now) {
            node.handle_timeout(now);
        }
        while let Some(out) = node.poll_output() {
            match out {
                TrackerOutput::Persist(Persist::Append(r) | Persist::Lazy(r)) => {
                    shared.disks.lock().unwrap().entry(me).or_default().push(r);
                }
                TrackerOutput::Persist(Persist::Rewrite(r)) => {
                    shared.disks.lock().unwrap().insert(me, vec![r]);
                }
                TrackerOutput::Transmit { conn, bytes, .. } => {
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
                TrackerOutput::PeerSend { node: p, bytes, .. } => {
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
    TrackerUp(u64, UnboundedSender<Option<Vec<u8>>>),
    TrackerDown(u64),
    TrackerBytes(u64, Vec<u8>),
    PeerAccepted(PeerConnId, UnboundedSender<Option<Vec<u8>>>),
    PeerUp(PeerConnId, UnboundedSender<Option<Vec<u8>>>),
    PeerFailed(PeerConnId),
    PeerBytes(PeerConnId, Vec<u8>),
    PeerClosed(PeerConnId),
}

struct Part {
    final_path: String,
    data: Vec<u8>,
}

/// A ClientEngine over turmoil sockets, with an in-memory disk.
struct ClientDriver {
    engine: ClientEngine,
    start: Instant,
    tx: UnboundedSender<CEv>,
    rx: UnboundedReceiver<CEv>,
    tracker: Option<(u64, UnboundedSender<Option<Vec<u8>>>)>,
    tracker_gen: u64,
    peers: BTreeMap<PeerConnId, UnboundedSender<Option<Vec<u8>>>>,
    files: BTreeMap<String, Vec<u8>>,
    parts: BTreeMap<DownloadId, Part>,
    results: BTreeMap<Ticket, Result<Vec<String>, String>>,
    next_ticket: u64,
}

impl ClientDriver {
    async fn start(
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
            while let Ok((s, _)) = listener.accept().await {
                let (r, w) = s.into_split();
                let conn = PeerConnId(next);
                next += 1;
                let _ = atx.send(CEv::PeerAccepted(conn, spawn_writer(w)));
                spawn_reader(r, atx.clone(), move |b| CEv::PeerBytes(conn, b), CEv::PeerClosed(conn));
            }
        });
        Ok(ClientDriver {
            engine,
            start: Instant::now(),
            tx,
            rx,
            tracker: None,
            tracker_gen: 0,
            peers: BTreeMap::new(),
            files,
            parts: BTreeMap::new(),
            results: BTreeMap::new(),
            next_ticket: 1,
        })
    }

    fn now(&self) -> Millis {
        millis(self.start)
    }

    /// Waits for one event (or the engine's next timer) and handles it.
    async fn turn(&mut self, until: Instant) {
        let deadline = self.engine.poll_timeout().map(|d| self.start + Duration::from_millis(d.0));
        let at = deadline.map_or(until, |d| d.min(until));
        let ev = tokio::select! {
            biased;
            ev = self.rx.recv() => ev,
            _ = tokio::time::sleep_until(at) => None,
        };
        let now = self.now();
        match ev {
            Some(CEv::TrackerUp(g, w)) if g == self.tracker_gen => {
                self.tracker = Some((g, w));
                self.engine.handle_tracker_connected(now);
            }
            Some(CEv::TrackerDown(g)) if g == self.tracker_gen => {
                self.tracker = None;
                self.engine.handle_tracker_closed(now);
            }
            Some(CEv::TrackerBytes(g, b)) if g == self.tracker_gen => self.engine.handle_tracker_bytes(&b, now),
            Some(CEv::PeerAccepted(c, w)) => {
                self.peers.insert(c, w);
                self.engine.handle_peer_accepted(c, now);
            }
            Some(CEv::PeerUp(c, w)) => {
                self.peers.insert(c, w);
                self.engine.handle_peer_connected(c, now);
            }
            Some(CEv::PeerFailed(c)) | Some(CEv::PeerClosed(c)) => {
                self.peers.remove(&c);
                self.engine.handle_peer_closed(c, now);
            }
            Some(CEv::PeerBytes(c, b)) => self.engine.handle_peer_bytes(c, &b, now),
            Some(_) => {}
            None => {}
        }
        if self.engine.poll_timeout().is_some_and(|d| d <= now) {
            self.engine.handle_timeout(now);
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
                        move |w| CEv::TrackerUp(g, w),
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
                ClientOutput::HashFile { job, path } => {
                    let r = match self.files.get(&path) {
                        Some(d) => {
                            let mut h = FileHasher::new();
                            h.update(d).map_err(|e| e.to_string()).and_then(|_| h.finish().map_err(|e| e.to_string()))
                        }
                        None => Err("No such file or directory".into()),
                    };
                    self.engine.handle_file_hashed(job, r, now);
                }
                ClientOutput::Done { ticket, result } => {
                    self.results.insert(ticket, result.map_err(|e| e.to_string()));
                }
                ClientOutput::PeerConnect { conn, addr } => spawn_connect(
                    addr,
                    self.tx.clone(),
                    move |w| CEv::PeerUp(conn, w),
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
                    let r = match self.files.get(&path) {
                        Some(d) if range.end <= d.len() => {
                            header.extend_from_slice(&d[range]);
                            if let Some(w) = self.peers.get(&conn) {
                                let _ = w.send(Some(header));
                            }
                            Ok(())
                        }
                        _ => Err(format!("{path}: cannot read")),
                    };
                    self.engine.handle_block_sent(conn, r, now);
                }
                ClientOutput::PrepareDownload { id, dest, name, digest } => {
                    let final_path = if dest.ends_with('/') { format!("{dest}{name}") } else { dest };
                    let r = if self.files.contains_key(&final_path) {
                        Err(format!("{final_path} already exists"))
                    } else {
                        let n = digest.chunks.len() as u32;
                        let data = vec![0; digest.size as usize];
                        self.parts.insert(id, Part { final_path: final_path.clone(), data });
                        Ok(Prepared { part_path: format!("{final_path}.part"), final_path, have: Bitmap::new(n) })
                    };
                    self.engine.handle_download_prepared(id, r, now);
                }
                ClientOutput::WriteChunk { id, chunk, data, sha1 } => {
                    if let Some(p) = self.parts.get_mut(&id) {
                        let ok = sha1.matches(&data);
                        if ok {
                            let at = chunk as usize * shoal_core::chunk::CHUNK_SIZE as usize;
                            p.data[at..at + data.len()].copy_from_slice(&data);
                        }
                        self.engine.handle_chunk_checked(id, chunk, ok, now);
                    }
                }
                ClientOutput::SaveProgress { .. } => {}
                ClientOutput::FinishDownload { id, sha1 } => {
                    let r = match self.parts.remove(&id) {
                        Some(p) if Sha1Digest::of(&p.data) == sha1 => {
                            self.files.insert(p.final_path, p.data);
                            Ok(())
                        }
                        _ => Err("whole-file SHA1 mismatch".to_string()),
                    };
                    self.engine.handle_download_finished(id, r, now);
                }
            }
        }
    }

    /// Runs one shell line to its end.
    async fn run(&mut self, line: &str) -> Result<Vec<String>, String> {
        let ticket = Ticket(self.next_ticket);
        self.next_ticket += 1;
        let cmd = parse(line).map_err(|e| e.to_string())?;
        self.engine.handle_command(ticket, cmd, self.now());
        self.drain();
        loop {
            if let Some(r) = self.results.remove(&ticket) {
                return r;
            }
            self.turn(Instant::now() + Duration::from_secs(1)).await;
        }
    }

    /// Runs `line` until it succeeds (other clients' steps may come first).
    async fn until_ok(&mut self, line: &str) -> Vec<String> {
        loop {
            match self.run(line).await {
                Ok(out) => return out,
                Err(_) => self.idle(Duration::from_millis(300)).await,
            }
        }
    }

    /// Keeps the engine running (serving peers, heartbeating) for `d`.
    async fn idle(&mut self, d: Duration) {
        let until = Instant::now() + d;
        while Instant::now() < until {
            self.turn(until).await;
        }
    }

    /// Waits until the download of `name` completes; returns bytes per source.
    async fn wait_download(&mut self, name: &str) -> Vec<(SocketAddr, u64)> {
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

// ---- scenarios ----

fn content(seed: u64, size: usize) -> Vec<u8> {
    let mut v = vec![0u8; size];
    Rng::from_u64(seed).fill(&mut v);
    v
}

fn builder(seed: u64, min_ms: u64, max_ms: u64) -> turmoil::Builder {
    let mut b = turmoil::Builder::new();
    b.rng_seed(seed)
        .simulation_duration(Duration::from_secs(600))
        .min_message_latency(Duration::from_millis(min_ms))
        .max_message_latency(Duration::from_millis(max_ms));
    b
}

fn add_trackers(sim: &mut turmoil::Sim<'_>, n: u64, shared: &Shared) {
    for me in 1..=n {
        let s = shared.clone();
        sim.host(format!("t{me}"), move || tracker_host(me, n, s.clone()));
    }
}

const TRACKERS: [&str; 3] = ["t1", "t2", "t3"];

/// Three sharers and a downloader: the file arrives whole, from several peers
/// at once. With `kill_sharer`, one sharer's host crashes mid-download.
fn swarm(seed: u64, kill_sharer: bool, min_ms: u64, max_ms: u64) -> Shared {
    let shared = Shared::default();
    let mut sim = builder(seed, min_ms, max_ms).build();
    add_trackers(&mut sim, 3, &shared);
    let file = content(seed, 3 * 1024 * 1024 + 4321);
    for i in 0..3u64 {
        let (s, f) = (shared.clone(), file.clone());
        sim.host(format!("s{i}"), move || {
            let (s, f) = (s.clone(), f.clone());
            async move {
                let files = BTreeMap::from([("/data.bin".to_string(), f)]);
                let mut c = ClientDriver::start(100 + i, &format!("s{i}"), &TRACKERS, files, Some(1_000_000)).await?;
                c.until_ok(&format!("create_user s{i} pw")).await;
                c.until_ok(&format!("login s{i} pw")).await;
                if i == 0 {
                    c.until_ok("create_group g").await;
                    // Admit everyone who asks, for a while.
                    for _ in 0..60 {
                        if let Ok(lines) = c.run("list_requests g").await {
                            for u in lines.iter().filter(|l| !l.starts_with("no pending")) {
                                let _ = c.run(&format!("accept_request g {u}")).await;
                            }
                        }
                        c.idle(Duration::from_millis(200)).await;
                    }
                } else {
                    c.until_ok("join_group g").await;
                    c.until_ok("list_files g").await;
                }
                c.until_ok("upload_file /data.bin g").await;
                s.report(&format!("s{i}"), "sharing".into());
                c.idle(Duration::from_secs(600)).await;
                Ok(())
            }
        });
    }
    let (s, f) = (shared.clone(), file.clone());
    sim.client("d", async move {
        let mut c = ClientDriver::start(7, "d", &TRACKERS, BTreeMap::new(), None).await?;
        c.until_ok("create_user d pw").await;
        c.until_ok("login d pw").await;
        c.until_ok("join_group g").await;
        // Wait until all three share it.
        loop {
            if let Ok(l) = c.run("list_files g").await {
                if l.iter().any(|l| l.ends_with("3 peers")) {
                    break;
                }
            }
            c.idle(Duration::from_millis(300)).await;
        }
        c.until_ok("download_file g data.bin /dl/").await;
        if kill_sharer {
            // Sharers upload at 1 MB/s each: a third of the way in, one dies.
            c.idle(Duration::from_millis(300)).await;
            s.report("kill", "s1".into());
        }
        let supplied = c.wait_download("data.bin").await;
        assert!(c.files.get("/dl/data.bin") == Some(&f), "the download differs from the source");
        let sources = supplied.iter().filter(|(_, b)| *b > 0).count();
        let total: u64 = supplied.iter().map(|(_, b)| b).sum();
        s.report("d", format!("sources={sources} bytes={total}"));
        Ok(())
    });
    let mut killed = false;
    while !sim.step().expect("the simulation runs") {
        if kill_sharer && !killed && shared.reports.lock().unwrap().contains_key("kill") {
            sim.crash("s1");
            killed = true;
        }
        if shared.reports.lock().unwrap().contains_key("d") {
            break;
        }
    }
    shared
}

/// Writes through every tracker; the leader's host crashes mid-stream and
/// comes back; afterwards all trackers hold the same metadata, with every
/// acknowledged write, and the restarted one serves them alone.
fn tracker_failover(seed: u64) -> Shared {
    let shared = Shared::default();
    let mut sim = builder(seed, 1, 20).build();
    add_trackers(&mut sim, 3, &shared);
    let s = shared.clone();
    sim.client("w", async move {
        let mut c = ClientDriver::start(11, "w", &TRACKERS, BTreeMap::new(), None).await?;
        c.until_ok("create_user w pw").await;
        c.until_ok("login w pw").await;
        for i in 0..30 {
            if i == 10 {
                s.report("crash-leader", String::new());
            }
            if i == 20 {
                s.report("restart", String::new());
            }
            let out = c.run(&format!("create_group g{i}")).await;
            assert_eq!(out, Ok(vec![format!("group g{i} created")]), "write {i}");
        }
        s.report("w", "30 acknowledged".into());
        Ok(())
    });
    let mut crashed: Option<String> = None;
    let mut restarted = false;
    while !sim.step().expect("the simulation runs") {
        let reports = shared.reports.lock().unwrap().clone();
        if crashed.is_none() && reports.contains_key("crash-leader") {
            // The leader, as the trackers see it (any tracker if they disagree).
            let leaders = shared.leaders.lock().unwrap().clone();
            let leader = leaders.values().flatten().next().copied().unwrap_or(1 + seed % 3);
            let victim = format!("t{leader}");
            sim.crash(victim.as_str());
            crashed = Some(victim);
        }
        if let (Some(v), false) = (&crashed, restarted) {
            if reports.contains_key("restart") {
                sim.bounce(v.as_str());
                restarted = true;
            }
        }
        if reports.contains_key("w") {
            break;
        }
    }
    // Let the restarted tracker catch up, then compare.
    for _ in 0..2000 {
        let metas = shared.metas.lock().unwrap().clone();
        if metas.len() == 3 && metas.values().all(|m| m.applied() == metas[&1].applied() && m == &metas[&1]) {
            break;
        }
        sim.step().expect("the simulation runs");
    }
    shared
}

fn check_consistent(shared: &Shared, groups: usize) {
    let metas = shared.metas.lock().unwrap();
    assert_eq!(metas.len(), 3, "every tracker published its state");
    let first = &metas[&1];
    for (t, m) in metas.iter() {
        assert_eq!(m, first, "tracker {t} differs from tracker 1");
        for i in 0..groups {
            let g = shoal_core::ids::GroupId::new(format!("g{i}")).unwrap();
            assert!(m.group(&g).is_some(), "tracker {t} lost acknowledged group g{i}");
        }
    }
}

/// Runs `f` for each seed (`SIM_SEED` alone, else `SIM_SEEDS` or 4 of them);
/// prints `seed=<n> digest=<hex>`, or how to reproduce a failure.
fn for_seeds(name: &str, f: impl Fn(u64) -> Shared + std::panic::RefUnwindSafe) {
    for seed in sim::seeds(4) {
        match std::panic::catch_unwind(|| f(seed)) {
            Ok(s) => {
                let d = s.reports.lock().unwrap().get("d").cloned().unwrap_or_default();
                println!("seed={seed} digest={} {name} {d}", s.digest());
            }
            Err(e) => {
                eprintln!("{name}: reproduce with SIM_SEED={seed}");
                std::panic::resume_unwind(e);
            }
        }
    }
}

#[test]
fn multi_peer_parallel_download() {
    for_seeds("multi_peer_parallel_download", |seed| {
        let s = swarm(seed, false, 1, 5);
        let d = s.reports.lock().unwrap()["d"].clone();
        let sources: usize = d.trim_start_matches("sources=").split(' ').next().unwrap().parse().unwrap();
        assert!(sources >= 2, "the download used {sources} source(s)");
        s
    });
}

#[test]
fn sudden_peer_shutdown() {
    for_seeds("sudden_peer_shutdown", |seed| {
        let s = swarm(seed, true, 1, 5);
        assert!(s.reports.lock().unwrap().contains_key("d"), "the download finished");
        s
    });
}

#[test]
fn artificial_latency() {
    for_seeds("artificial_latency", |seed| {
        let s = swarm(seed, false, 40, 160);
        assert!(s.reports.lock().unwrap().contains_key("d"));
        s
    });
}

#[test]
fn tracker_failure_and_recovery_keeps_trackers_consistent() {
    for_seeds("tracker_failure_and_recovery", |seed| {
        let s = tracker_failover(seed);
        check_consistent(&s, 30);
        s
    });
}

#[test]
fn a_turmoil_run_replays_bit_for_bit() {
    let seed = sim::seed_from_env(1);
    assert_eq!(tracker_failover(seed).digest(), tracker_failover(seed).digest());
    assert_eq!(swarm(seed, true, 1, 5).digest(), swarm(seed, true, 1, 5).digest());
}
