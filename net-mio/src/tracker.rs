//! Serves a [`TrackerNode`] on a TCP listener, and links it to the other
//! trackers of its cluster.
//!
//! Every connection runs TLS 1.3 with this tracker's key ([`Identity`]); the
//! key the other end proved goes to the node, which decides who it may be.
//!
//! One thread, one mio loop: client connections and the connections other
//! trackers open to us are accepted on the listener; we open our link to
//! another tracker when the node says so (it decides when to dial, redial and
//! hang up). Log records the node emits are appended to the write-ahead log;
//! a sync it asks for goes to a thread that fsyncs (covering every sync asked
//! meanwhile: group commit) and reports back, and the node lets out what
//! waited for it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use shoal_core::tracker::{ConnId, Job, JobDone, LogImage, NodeId, Persist, Replicator, TrackerNode, TrackerOutput};
use shoal_core::Millis;

use crate::clock::Clock;
use crate::conn::{Conn, Read, ReadOutcome};
use crate::ranges::RangeStore;
use crate::tls::{server_name, Identity};
use crate::wal::WalFile;
use shoal_core::wal::encode_record;

const LISTENER: Token = Token(0);
/// The sync thread finished an fsync.
/// The sync thread or the job thread has something for the loop.
const WOKEN: Token = Token((1 << 40) - 1);
/// Tokens of our links to other trackers: this base plus the tracker's id.
const PEER_BASE: usize = 1 << 40;

/// Most client connections a tracker holds at once; more are refused at accept.
pub const MAX_TRACKER_CONNECTIONS: usize = 4096;

/// This tracker's link to another, as the node dialled it.
struct Link {
    addr: SocketAddr,
    /// The socket, and whether it is still connecting.
    conn: Option<(Conn, bool)>,
}

type LeaderHook = Box<dyn FnMut(Option<NodeId>) + Send>;

enum SyncCmd {
    /// Log records, encoded: written in order.
    Write(Vec<u8>),
    /// Replace the log with these records (an image after compaction).
    /// Encoded here, off the event loop.
    Rewrite(Box<LogImage>),
    /// Make everything written so far (the log and the range store) durable,
    /// then report `seq` done.
    Sync(u64, RangeStore),
}

/// The thread that owns the log file: it writes, rewrites and fsyncs it, so
/// the event loop goes on reading and deciding while the disk works (group
/// commit, pipelined one deep), and a snapshot's rewrite of the whole log
/// does not stop it from answering.
struct Syncer {
    tx: mpsc::Sender<SyncCmd>,
    done: Arc<AtomicU64>,
    error: Arc<Mutex<Option<io::Error>>>,
}

impl Syncer {
    fn start(mut wal: WalFile, waker: Arc<Waker>, metrics: crate::http::Metrics) -> io::Result<Syncer> {
        let (tx, rx) = mpsc::channel::<SyncCmd>();
        let done = Arc::new(AtomicU64::new(0));
        let error = Arc::new(Mutex::new(None));
        let (d, e) = (done.clone(), error.clone());
        std::thread::Builder::new().name("shoal-wal-sync".into()).spawn(move || {
            while let Ok(cmd) = rx.recv() {
                let mut upto = 0;
                let mut cmds = vec![cmd];
                let mut store = None;
                // Everything asked meanwhile is covered by one fsync.
                cmds.extend(rx.try_iter());
                let path = wal.path().display().to_string();
                let mut result = Ok(());
                for c in cmds {
                    let r = match c {
                        SyncCmd::Write(bytes) => wal.append_encoded(&bytes).map_err(|e| (e, "write")),
                        SyncCmd::Rewrite(image) => {
                            let r = wal.rewrite_with(|put| image.for_each_record(put)).map_err(|e| (e, "rewrite"));
                            // What the compaction retired (a snapshot's worth
                            // of entries, the state before) is freed here,
                            // off the loop. (A malloc_trim after it held the
                            // allocator's locks the loop allocates under:
                            // 15-17 loop turns over 20 ms a 300,000-file
                            // fill instead of 7-11, and no lower peak RSS.)
                            drop(image);
                            r
                        }
                        SyncCmd::Sync(k, s) => {
                            upto = upto.max(k);
                            store = Some(s);
                            Ok(())
                        }
                    };
                    result = result.and(r);
                }
                if upto > 0 {
                    let started = std::time::Instant::now();
                    let synced = wal
                        .write_pending()
                        .map_err(|e| (e, "write"))
                        .and_then(|()| store.map_or(Ok(()), |s| s.sync()).map_err(|e| (e, "sync the range store of")))
                        .and_then(|()| wal.sync().map_err(|e| (e, "sync")));
                    metrics.fsyncs.inc();
                    metrics.fsync_latency.observe(started.elapsed().as_secs_f64());
                    result = result.and(synced);
                } else {
                    result = result.and(wal.write_pending().map_err(|e| (e, "write")));
                }
                if let Err((err, what)) = result {
                    let err = io::Error::new(err.kind(), format!("cannot {what} {path}: {err}"));
                    *e.lock().unwrap_or_else(|p| p.into_inner()) = Some(err);
                    let _ = waker.wake();
                    // Nothing after a failed write may be reported durable.
                    return;
                }
                if upto > 0 {
                    d.store(upto, Ordering::Release);
                    let _ = waker.wake();
                }
            }
        })?;
        Ok(Syncer { tx, done, error })
    }
}

/// The threads that run the node's jobs, so the event loop goes on
/// answering meanwhile: one for encoding and decoding consensus messages
/// the size of the metadata (in order), and some for passwords' argon2
/// ([`PASSWORD_THREADS`]), so logins never wait behind a snapshot.
/// Started with the first job; the results of all come back on one channel.
struct Jobs {
    big: mpsc::Sender<(u64, Job)>,
    passwords: mpsc::Sender<(u64, Job)>,
    done: mpsc::Receiver<(u64, JobDone)>,
}

/// Most threads hashing passwords: half the cores, so the loop and the
/// other trackers of a small machine keep theirs (each thread keeps
/// argon2's 19 MiB of scratch). On the 2-core VM one thread took as many
/// logins a second as two, and held heartbeats less.
const PASSWORD_THREADS: usize = 4;

impl Jobs {
    fn start(waker: Arc<Waker>) -> io::Result<Jobs> {
        let (done_tx, done) = mpsc::channel();
        let worker = |rx: Arc<Mutex<mpsc::Receiver<(u64, Job)>>>, done_tx: mpsc::Sender<(u64, JobDone)>| {
            let waker = waker.clone();
            move || loop {
                let next = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                let Ok((ticket, job)) = next else { return };
                if done_tx.send((ticket, job.run())).is_err() {
                    return;
                }
                let _ = waker.wake();
            }
        };
        let (big, rx) = mpsc::channel();
        let rx = Arc::new(Mutex::new(rx));
        std::thread::Builder::new().name("shoal-tracker-jobs".into()).spawn(worker(rx, done_tx.clone()))?;
        let (passwords, rx) = mpsc::channel();
        let rx = Arc::new(Mutex::new(rx));
        let threads = (std::thread::available_parallelism().map_or(1, |n| n.get()) / 2).clamp(1, PASSWORD_THREADS);
        for _ in 0..threads {
            std::thread::Builder::new()
                .name("shoal-tracker-passwords".into())
                .spawn(worker(rx.clone(), done_tx.clone()))?;
        }
        Ok(Jobs { big, passwords, done })
    }

    fn send(&self, ticket: u64, job: Job) {
        let lane = if job.is_password() { &self.passwords } else { &self.big };
        let _ = lane.send((ticket, job));
    }
}

/// How long a turn of the event loop took, and its slowest part: a turn
/// over [`SLOW_TURN`] is logged, since every link's heartbeat and every
/// client waited for it (etcd warns the same way of slow applies).
struct Turn {
    start: std::time::Instant,
    /// This thread's CPU time at the start: a slow turn that used little
    /// of it waited (for the CPU, a page, a lock), it did not compute.
    cpu: std::time::Duration,
    lap: std::time::Instant,
    slowest: (std::time::Duration, &'static str),
}

/// A turn of the event loop this long is worth a warning.
const SLOW_TURN: std::time::Duration = std::time::Duration::from_millis(200);
/// One this long is noted at `info` (`RUST_LOG=info`): past the 50 ms a
/// pause in answering should stay under, with room for noise.
const NOTED_TURN: std::time::Duration = std::time::Duration::from_millis(20);

impl Turn {
    fn start() -> Turn {
        let now = std::time::Instant::now();
        Turn { start: now, cpu: thread_cpu(), lap: now, slowest: (std::time::Duration::ZERO, "") }
    }

    fn lap(&mut self, what: &'static str) {
        let now = std::time::Instant::now();
        let took = now - self.lap;
        if took > self.slowest.0 {
            self.slowest = (took, what);
        }
        self.lap = now;
    }

    fn end(self) {
        let took = self.lap - self.start;
        if took < NOTED_TURN {
            return;
        }
        let (ms, cpu_ms) = (took.as_millis() as u64, thread_cpu().saturating_sub(self.cpu).as_millis() as u64);
        let (slowest, slowest_ms) = (self.slowest.1, self.slowest.0.as_millis() as u64);
        if took >= SLOW_TURN {
            tracing::warn!(ms, cpu_ms, slowest, slowest_ms, "the event loop was busy: links and clients waited");
        } else {
            tracing::info!(ms, cpu_ms, slowest, slowest_ms, "a long turn of the event loop");
        }
    }
}

fn thread_cpu() -> std::time::Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    std::time::Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

pub struct TrackerServer<R: Replicator> {
    poll: Poll,
    listener: TcpListener,
    node: TrackerNode<R>,
    conns: HashMap<Token, Conn>,
    next_token: usize,
    clock: Clock,
    max_connections: usize,
    /// Log records not yet handed to the sync thread, encoded.
    log_buf: Vec<u8>,
    links: BTreeMap<NodeId, Link>,
    on_leader: Option<LeaderHook>,
    syncer: Option<Syncer>,
    jobs: Option<Jobs>,
    /// Wakes the loop for the sync and job threads (mio allows one a poll).
    waker: Arc<Waker>,
    tls_server: Arc<rustls::ServerConfig>,
    tls_client: Arc<rustls::ClientConfig>,
    /// Chunk-list ranges beside the log.
    ranges: RangeStore,
    /// The partial snapshot base beside the log (none without a data dir).
    partial: Option<crate::partial::PartialStore>,
    /// Ranges read for the node, reported once its outputs are drained.
    loaded: Vec<(shoal_core::chunk::Sha1Digest, Option<Vec<u8>>)>,
    /// Where the other trackers publish their key ids (one file a tracker,
    /// named by its id), for those whose keys the node does not know yet.
    key_dir: Option<std::path::PathBuf>,
    /// What `--http` shows (the handles always exist; they cost an atomic
    /// add each when nothing reads them).
    metrics: crate::http::Metrics,
    /// The loop's side of the HTTP page, if one is served.
    observer: Option<crate::http::Observer>,
    http_addr: Option<SocketAddr>,
}

impl<R: Replicator> TrackerServer<R> {
    /// Listens at `addr`, proving `identity`'s key on every connection.
    pub fn bind(addr: SocketAddr, node: TrackerNode<R>, identity: &Identity) -> io::Result<TrackerServer<R>> {
        let tls_err = |e: crate::tls::IdentityError| io::Error::other(e.to_string());
        let tls_server = identity.server_config().map_err(tls_err)?;
        let tls_client = identity.client_config().map_err(tls_err)?;
        let poll = Poll::new()?;
        let mut listener = TcpListener::bind(addr)?;
        poll.registry().register(&mut listener, LISTENER, Interest::READABLE)?;
        let waker = Arc::new(Waker::new(poll.registry(), WOKEN)?);
        Ok(TrackerServer {
            poll,
            listener,
            node,
            conns: HashMap::new(),
            next_token: 1,
            clock: Clock::default(),
            max_connections: MAX_TRACKER_CONNECTIONS,
            log_buf: Vec::new(),
            links: BTreeMap::new(),
            on_leader: None,
            syncer: None,
            jobs: None,
            waker,
            tls_server,
            tls_client,
            key_dir: None,
            ranges: RangeStore::in_memory(),
            partial: None,
            loaded: Vec::new(),
            metrics: crate::http::Metrics::new(),
            observer: None,
            http_addr: None,
        })
    }

    /// Keeps chunk-list ranges in `store` (made durable with the log); the
    /// node learns which it holds.
    pub fn with_range_store(mut self, store: RangeStore) -> io::Result<Self> {
        let held = store.hashes()?;
        tracing::info!(ranges = held.len(), "range store opened");
        self.node.add_stored_ranges(held);
        self.ranges = store;
        Ok(self)
    }

    /// Keeps the partial snapshot base of a sync arriving in `dir` (the
    /// data dir), and hands the node the one found there.
    pub fn with_partial_dir(mut self, dir: &std::path::Path) -> Self {
        let (store, found) = crate::partial::PartialStore::open(dir);
        if let Some((base, bytes)) = found {
            self.node.restore_partial(base, bytes);
        }
        self.partial = Some(store);
        self
    }

    /// Reads the key ids of trackers the node does not know yet from `dir`
    /// (file `<id>`, holding the id as `tracker` prints it), when one of
    /// them may be calling.
    pub fn with_key_dir(mut self, dir: std::path::PathBuf) -> Self {
        self.key_dir = Some(dir);
        self.learn_keys();
        self
    }

    /// Reads the key ids still unknown; called while a connection's TLS
    /// handshake runs (once it ends, the node checks the key it proved), so
    /// a missing file costs a read per handshake, not per event.
    fn learn_keys(&mut self) {
        let Some(dir) = &self.key_dir else { return };
        let unknown: Vec<NodeId> = self.node.unknown_peer_keys().collect();
        for node in unknown {
            let Ok(text) = std::fs::read_to_string(dir.join(node.to_string())) else { continue };
            match text.trim().parse() {
                Ok(key) => {
                    tracing::info!(node, %key, "learned a tracker's key id");
                    self.node.learn_peer_key(node, key);
                }
                Err(e) => tracing::warn!(node, dir = %dir.display(), error = %e, "unreadable key id file"),
            }
        }
    }

    /// Makes every log record durable in `wal` before what depends on it is
    /// sent. A thread writes and fsyncs it.
    pub fn with_wal(mut self, wal: WalFile) -> io::Result<Self> {
        self.syncer = Some(Syncer::start(wal, self.waker.clone(), self.metrics.clone())?);
        Ok(self)
    }

    /// Serves `/metrics`, `/status` and the dashboard at `cfg.addr`
    /// ([`crate::http`]), from a thread of its own.
    pub fn with_http(mut self, cfg: crate::http::HttpConfig) -> io::Result<Self> {
        let (observer, addr) = crate::http::start(cfg, self.metrics.clone())?;
        self.observer = Some(observer);
        self.http_addr = Some(addr);
        Ok(self)
    }

    /// Where the HTTP page is served, if it is.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// Caps the connections held at once (default [`MAX_TRACKER_CONNECTIONS`]).
    pub fn with_max_connections(mut self, max: usize) -> Self {
        self.max_connections = max;
        self
    }

    /// The other trackers of the cluster, to keep a link open to each.
    pub fn with_peers(mut self, peers: impl IntoIterator<Item = (NodeId, SocketAddr)>) -> Self {
        for (node, addr) in peers {
            self.links.insert(node, Link { addr, conn: None });
        }
        self
    }

    /// Called whenever the node learns a new leader (or loses it).
    pub fn on_leader_change(mut self, f: impl FnMut(Option<NodeId>) + Send + 'static) -> Self {
        self.on_leader = Some(Box::new(f));
        self
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Runs until an unrecoverable poll or disk error.
    pub fn run(mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let timeout = self.clock.until(self.node.poll_timeout());
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let now = self.clock.now();
            let mut turn = Turn::start();
            if self.node.poll_timeout().is_some_and(|t| t <= now) {
                self.node.handle_timeout(now);
                turn.lap("timers");
            }
            for ev in events.iter() {
                let what = match ev.token() {
                    LISTENER => "accept",
                    WOKEN => "sync or job done",
                    t if t.0 >= PEER_BASE => "our link",
                    _ => "connection",
                };
                match ev.token() {
                    LISTENER => self.accept(now)?,
                    WOKEN => {
                        self.synced(now)?;
                        self.jobs_done(now);
                    }
                    token if token.0 >= PEER_BASE => {
                        let node = (token.0 - PEER_BASE) as NodeId;
                        self.link_event(node, ev, now, &mut buf);
                    }
                    token => {
                        let id = ConnId(token.0 as u64);
                        let mut closed = false;
                        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                            let handshaking = self.conns.get(&token).is_some_and(|c| !c.is_secured());
                            if handshaking && self.node.unknown_peer_keys().next().is_some() {
                                self.learn_keys();
                            }
                            let Some(conn) = self.conns.get_mut(&token) else { continue };
                            let node = &mut self.node;
                            let outcome = conn.read_all(&mut buf, |r| match r {
                                Read::Secured(Some(key)) => node.handle_secured(id, key, now),
                                Read::Secured(None) => closed = true,
                                Read::Bytes(b) if !closed => node.handle_bytes(id, b, now),
                                Read::Bytes(_) => {}
                            });
                            closed |= matches!(outcome, ReadOutcome::Closed);
                        }
                        let Some(conn) = self.conns.get_mut(&token) else { continue };
                        // Also after a read: TLS answers the handshake.
                        if !closed && conn.flush(self.poll.registry(), token).is_err() {
                            closed = true;
                        }
                        if closed {
                            self.drop_conn(token, now);
                        }
                    }
                }
                turn.lap(what);
            }
            self.drain(now)?;
            turn.lap("outputs");
            if let Some(o) = &mut self.observer {
                o.observe(&mut self.node, now);
                turn.lap("metrics");
            }
            turn.end();
        }
    }

    fn dial(&mut self, node: NodeId, now: Millis) {
        let Some(link) = self.links.get_mut(&node) else { return };
        if let Some((mut c, _)) = link.conn.take() {
            let _ = self.poll.registry().deregister(&mut c.stream);
        }
        let token = Token(PEER_BASE + node as usize);
        match TcpStream::connect(link.addr) {
            Ok(mut s) => match self.poll.registry().register(&mut s, token, Interest::READABLE | Interest::WRITABLE) {
                Ok(()) => match rustls::ClientConnection::new(self.tls_client.clone(), server_name()) {
                    Ok(tls) => link.conn = Some((Conn::connecting(s).with_tls(tls), true)),
                    Err(_) => self.node.handle_link_down(node, now),
                },
                Err(_) => self.node.handle_link_down(node, now),
            },
            Err(_) => self.node.handle_link_down(node, now),
        }
    }

    fn hang_up(&mut self, node: NodeId) {
        if let Some((mut c, _)) = self.links.get_mut(&node).and_then(|l| l.conn.take()) {
            let _ = self.poll.registry().deregister(&mut c.stream);
        }
    }

    /// Our link failed: closed here, reported to the node.
    fn link_failed(&mut self, node: NodeId, now: Millis) {
        self.hang_up(node);
        self.node.handle_link_down(node, now);
    }

    fn link_event(&mut self, node: NodeId, ev: &mio::event::Event, now: Millis, buf: &mut [u8]) {
        let token = Token(PEER_BASE + node as usize);
        let Some((c, connecting)) = self.links.get_mut(&node).and_then(|l| l.conn.as_mut()) else { return };
        if *connecting {
            match (c.stream.take_error(), c.stream.peer_addr()) {
                // Connected: the TLS handshake starts; the node hears of the
                // link once it is done, with the key the other end proved.
                (Ok(None), Ok(_)) => {
                    let _ = c.stream.set_nodelay(true);
                    *connecting = false;
                }
                (Err(_), _) | (Ok(Some(_)), _) => return self.link_failed(node, now),
                // Not connected yet (spurious wake-up).
                (Ok(None), Err(_)) => return,
            }
        }
        let Some((c, _)) = self.links.get_mut(&node).and_then(|l| l.conn.as_mut()) else { return };
        let mut failed = false;
        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
            if !c.is_secured() && self.node.unknown_peer_keys().next().is_some() {
                self.learn_keys();
            }
            let Some((c, _)) = self.links.get_mut(&node).and_then(|l| l.conn.as_mut()) else { return };
            let n = &mut self.node;
            let outcome = c.read_all(buf, |r| match r {
                Read::Secured(Some(key)) => n.handle_link_up(node, key, now),
                Read::Secured(None) => failed = true,
                Read::Bytes(b) if !failed => n.handle_link_bytes(node, b, now),
                Read::Bytes(_) => {}
            });
            failed |= matches!(outcome, ReadOutcome::Closed);
        }
        let Some((c, _)) = self.links.get_mut(&node).and_then(|l| l.conn.as_mut()) else { return };
        if failed || c.flush(self.poll.registry(), token).is_err() {
            self.link_failed(node, now);
        }
    }

    fn accept(&mut self, now: Millis) -> io::Result<()> {
        loop {
            match self.listener.accept() {
                Ok((mut stream, peer)) => {
                    if self.conns.len() >= self.max_connections {
                        tracing::warn!(%peer, "connection limit reached, refusing");
                        continue;
                    }
                    let token = Token(self.next_token);
                    self.next_token += 1;
                    self.poll.registry().register(&mut stream, token, Interest::READABLE)?;
                    let _ = stream.set_nodelay(true);
                    let tls = match rustls::ServerConnection::new(self.tls_server.clone()) {
                        Ok(t) => t,
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot start TLS");
                            continue;
                        }
                    };
                    self.conns.insert(token, Conn::new(stream).with_tls(tls));
                    self.node.handle_connected(ConnId(token.0 as u64), peer, now);
                    tracing::debug!(%peer, conn = token.0, "accepted");
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // Out of descriptors and the like: keep serving who we have.
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    return Ok(());
                }
            }
        }
    }

    fn drop_conn(&mut self, token: Token, now: Millis) {
        if let Some(mut c) = self.conns.remove(&token) {
            let _ = self.poll.registry().deregister(&mut c.stream);
            self.node.handle_closed(ConnId(token.0 as u64), now);
        }
    }

    /// Carries out the node's outputs in order: log records are written,
    /// a sync is handed to the sync thread (or, without a log, reported at
    /// once), sends go out. What must wait for a sync the node holds itself.
    fn drain(&mut self, now: Millis) -> io::Result<()> {
        loop {
            let outs: Vec<TrackerOutput> = std::iter::from_fn(|| self.node.poll_output()).collect();
            if outs.is_empty() {
                break;
            }
            let mut touched = BTreeSet::new();
            let mut touched_links = BTreeSet::new();
            for out in outs {
                match out {
                    TrackerOutput::Persist(p) => {
                        let Some(s) = &self.syncer else { continue };
                        match p {
                            // A record the log cannot hold stops this tracker
                            // before anything that depends on it is sent.
                            Persist::Append(r) | Persist::Lazy(r) => encode_record(&r, &mut self.log_buf)
                                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("cannot log: {e}")))?,
                            Persist::Rewrite(r) => {
                                if !self.log_buf.is_empty() {
                                    let _ = s.tx.send(SyncCmd::Write(std::mem::take(&mut self.log_buf)));
                                }
                                let _ = s.tx.send(SyncCmd::Rewrite(r));
                            }
                        }
                    }
                    TrackerOutput::Sync { seq } => match &self.syncer {
                        Some(s) => {
                            if !self.log_buf.is_empty() {
                                let _ = s.tx.send(SyncCmd::Write(std::mem::take(&mut self.log_buf)));
                            }
                            let _ = s.tx.send(SyncCmd::Sync(seq, self.ranges.clone()));
                        }
                        // Nothing to make durable: done at once.
                        None => self.node.handle_synced(seq, now),
                    },
                    TrackerOutput::Dial { node } => self.dial(node, now),
                    TrackerOutput::Hangup { node } => self.hang_up(node),
                    TrackerOutput::LeaderChanged { leader } => {
                        if let Some(f) = &mut self.on_leader {
                            f(leader);
                        }
                    }
                    TrackerOutput::Applied { .. } => {}
                    TrackerOutput::Work { ticket, job } => {
                        if self.jobs.is_none() {
                            self.jobs = Some(Jobs::start(self.waker.clone())?);
                        }
                        if let Some(j) = &self.jobs {
                            j.send(ticket, job);
                        }
                    }
                    // A range the store cannot take stops this tracker, as a
                    // log record would: nothing that depends on it goes out.
                    TrackerOutput::StoreRange { hash, bytes } => self.ranges.put(&hash, &bytes)?,
                    TrackerOutput::SavePartial { base, offset, bytes } => {
                        if let Some(p) = &mut self.partial {
                            if let Err(e) = p.save(base, offset, &bytes) {
                                tracing::warn!(error = %e, "cannot keep a partial snapshot");
                            }
                        }
                    }
                    TrackerOutput::DropPartial => {
                        if let Some(p) = &mut self.partial {
                            p.remove();
                        }
                    }
                    TrackerOutput::DropRange { hash } => {
                        if let Err(e) = self.ranges.remove(&hash) {
                            tracing::warn!(%hash, error = %e, "cannot drop a range");
                        }
                    }
                    TrackerOutput::LoadRange { hash } => {
                        let got = self.ranges.get(&hash).unwrap_or_else(|e| {
                            tracing::warn!(%hash, error = %e, "cannot read a range");
                            None
                        });
                        self.loaded.push((hash, got));
                    }
                    TrackerOutput::PeerSend { node, bytes } => {
                        if let Some((c, false)) = self.links.get_mut(&node).and_then(|l| l.conn.as_mut()) {
                            if c.queue_owned(bytes) {
                                touched_links.insert(node);
                            } else {
                                self.link_failed(node, now);
                            }
                        }
                    }
                    TrackerOutput::Transmit { conn, bytes } => {
                        let token = Token(conn.0 as usize);
                        let Some(c) = self.conns.get_mut(&token) else { continue };
                        if c.queue(&bytes) {
                            touched.insert(token);
                        } else {
                            self.drop_conn(token, now);
                        }
                    }
                    TrackerOutput::Close { conn } => {
                        let token = Token(conn.0 as usize);
                        if let Some(c) = self.conns.get_mut(&token) {
                            c.closing = true;
                            touched.insert(token);
                        }
                    }
                }
            }
            if let (Some(s), false) = (&self.syncer, self.log_buf.is_empty()) {
                let _ = s.tx.send(SyncCmd::Write(std::mem::take(&mut self.log_buf)));
            }
            self.flush_touched(touched, touched_links, now);
            for (hash, bytes) in std::mem::take(&mut self.loaded) {
                self.node.handle_range_loaded(hash, bytes, now);
            }
        }
        self.close_finished(now);
        Ok(())
    }

    /// The sync thread finished: tell the node, which lets out what waited.
    fn synced(&mut self, now: Millis) -> io::Result<()> {
        let Some(s) = &self.syncer else { return Ok(()) };
        if let Some(e) = s.error.lock().unwrap_or_else(|e| e.into_inner()).take() {
            return Err(e);
        }
        let done = s.done.load(Ordering::Acquire);
        self.node.handle_synced(done, now);
        Ok(())
    }

    /// The job thread finished some: the node takes their results.
    fn jobs_done(&mut self, now: Millis) {
        let Some(j) = &self.jobs else { return };
        let done: Vec<(u64, JobDone)> = j.done.try_iter().collect();
        for (ticket, d) in done {
            self.node.handle_job_done(ticket, d, now);
        }
    }

    /// Connections told to close whose backlog has since drained.
    fn close_finished(&mut self, now: Millis) {
        let finished: Vec<Token> =
            self.conns.iter().filter(|(_, c)| c.closing && !c.has_backlog()).map(|(t, _)| *t).collect();
        for t in finished {
            self.drop_conn(t, now);
        }
    }

    fn flush_touched(&mut self, touched: BTreeSet<Token>, touched_links: BTreeSet<NodeId>, now: Millis) {
        for node in touched_links {
            let token = Token(PEER_BASE + node as usize);
            if let Some((c, _)) = self.links.get_mut(&node).and_then(|l| l.conn.as_mut()) {
                if c.flush(self.poll.registry(), token).is_err() {
                    self.link_failed(node, now);
                }
            }
        }
        for token in touched {
            let Some(c) = self.conns.get_mut(&token) else { continue };
            let ok = c.flush(self.poll.registry(), token).is_ok();
            if !ok || (c.closing && !c.has_backlog()) {
                self.drop_conn(token, now);
            }
        }
    }
}
