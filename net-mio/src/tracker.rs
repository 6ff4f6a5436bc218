//! Serves a [`TrackerNode`] on a TCP listener, and links it to the other
//! trackers of its cluster.
//!
//! One thread, one mio loop: client connections and the connections other
//! trackers open to us are accepted on the listener; we open one connection to
//! every other tracker and redial it with backoff when it fails. Log records
//! the node emits are appended to the write-ahead log and fsync'ed (one fsync
//! per loop turn) before anything that follows them is sent.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use shoal_core::tracker::{ConnId, NodeId, Persist, Replicator, TrackerNode, TrackerOutput};
use shoal_core::Millis;

use crate::clock::Clock;
use crate::conn::{Conn, ReadOutcome};
use crate::wal::WalFile;

const LISTENER: Token = Token(0);
/// The sync thread finished an fsync.
const SYNCED: Token = Token((1 << 40) - 1);
/// Tokens of our links to other trackers: this base plus the tracker's id.
const PEER_BASE: usize = 1 << 40;
/// First pause before redialing a tracker; it doubles up to [`REDIAL_MAX`].
const REDIAL_MIN: Millis = Millis(100);
const REDIAL_MAX: Millis = Millis(1_000);

/// Most client connections a tracker holds at once; more are refused at accept.
pub const MAX_TRACKER_CONNECTIONS: usize = 4096;

enum LinkState {
    Down { retry_at: Millis, backoff: Millis },
    Connecting(Conn),
    Up(Conn),
}

struct Link {
    addr: SocketAddr,
    state: LinkState,
}

type LeaderHook = Box<dyn FnMut(Option<NodeId>) + Send>;

enum SyncCmd {
    /// Make everything written so far durable, then report `seq` done.
    Sync(u64),
    /// The log was rewritten: sync this file from now on.
    File(File),
}

/// The thread that fsyncs the log, so the event loop goes on reading and
/// deciding while the disk works (group commit, pipelined one deep).
struct Syncer {
    tx: mpsc::Sender<SyncCmd>,
    done: Arc<AtomicU64>,
    error: Arc<Mutex<Option<io::Error>>>,
}

impl Syncer {
    fn start(file: File, waker: Waker) -> io::Result<Syncer> {
        let (tx, rx) = mpsc::channel::<SyncCmd>();
        let done = Arc::new(AtomicU64::new(0));
        let error = Arc::new(Mutex::new(None));
        let (d, e) = (done.clone(), error.clone());
        std::thread::Builder::new().name("shoal-wal-sync".into()).spawn(move || {
            let mut file = file;
            while let Ok(cmd) = rx.recv() {
                let mut upto = 0;
                let mut cmds = vec![cmd];
                // Everything asked meanwhile is covered by one fsync.
                cmds.extend(rx.try_iter());
                for c in cmds {
                    match c {
                        SyncCmd::Sync(k) => upto = upto.max(k),
                        SyncCmd::File(f) => file = f,
                    }
                }
                if upto == 0 {
                    continue;
                }
                if let Err(err) = file.sync_data() {
                    *e.lock().expect("not poisoned") = Some(err);
                }
                d.store(upto, Ordering::Release);
                let _ = waker.wake();
            }
        })?;
        Ok(Syncer { tx, done, error })
    }
}

/// Where an output goes, to keep each destination's order.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Dest {
    Conn(u64),
    Link(NodeId),
}

fn dest(out: &TrackerOutput) -> Option<(Dest, bool)> {
    match out {
        TrackerOutput::Transmit { conn, after_sync, .. } => Some((Dest::Conn(conn.0), *after_sync)),
        TrackerOutput::Close { conn } => Some((Dest::Conn(conn.0), false)),
        TrackerOutput::PeerSend { node, after_sync, .. } => Some((Dest::Link(*node), *after_sync)),
        _ => None,
    }
}

pub struct TrackerServer<R: Replicator> {
    poll: Poll,
    listener: TcpListener,
    node: TrackerNode<R>,
    conns: HashMap<Token, Conn>,
    next_token: usize,
    clock: Clock,
    max_connections: usize,
    /// The durable log; `None` keeps everything in memory (tests, demo).
    wal: Option<WalFile>,
    links: BTreeMap<NodeId, Link>,
    on_leader: Option<LeaderHook>,
    /// Records that must be durable before the next send are waiting.
    must_sync: bool,
    syncer: Option<Syncer>,
    /// Syncs asked of the syncer so far.
    requested: u64,
    /// Outputs waiting for sync `seq`, in order.
    held: VecDeque<(u64, TrackerOutput)>,
    /// Destinations with outputs in `held` (later ones to them wait too).
    held_dests: BTreeSet<Dest>,
}

impl<R: Replicator> TrackerServer<R> {
    pub fn bind(addr: SocketAddr, node: TrackerNode<R>) -> io::Result<TrackerServer<R>> {
        let poll = Poll::new()?;
        let mut listener = TcpListener::bind(addr)?;
        poll.registry().register(&mut listener, LISTENER, Interest::READABLE)?;
        Ok(TrackerServer {
            poll,
            listener,
            node,
            conns: HashMap::new(),
            next_token: 1,
            clock: Clock::default(),
            max_connections: MAX_TRACKER_CONNECTIONS,
            wal: None,
            links: BTreeMap::new(),
            on_leader: None,
            must_sync: false,
            syncer: None,
            requested: 0,
            held: VecDeque::new(),
            held_dests: BTreeSet::new(),
        })
    }

    /// Makes every log record durable in `wal` before what depends on it is
    /// sent. A thread does the fsyncs.
    pub fn with_wal(mut self, wal: WalFile) -> io::Result<Self> {
        let waker = Waker::new(self.poll.registry(), SYNCED)?;
        self.syncer = Some(Syncer::start(wal.sync_handle()?, waker)?);
        self.wal = Some(wal);
        Ok(self)
    }

    /// Caps the connections held at once (default [`MAX_TRACKER_CONNECTIONS`]).
    pub fn with_max_connections(mut self, max: usize) -> Self {
        self.max_connections = max;
        self
    }

    /// The other trackers of the cluster, to keep a link open to each.
    pub fn with_peers(mut self, peers: impl IntoIterator<Item = (NodeId, SocketAddr)>) -> Self {
        for (node, addr) in peers {
            self.links
                .insert(node, Link { addr, state: LinkState::Down { retry_at: Millis::ZERO, backoff: REDIAL_MIN } });
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
            let now = self.clock.now();
            self.redial(now);
            let redial_at = self
                .links
                .values()
                .filter_map(|l| match l.state {
                    LinkState::Down { retry_at, .. } => Some(retry_at),
                    _ => None,
                })
                .min();
            let deadline = [self.node.poll_timeout(), redial_at].into_iter().flatten().min();
            let timeout = self.clock.until(deadline);
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let now = self.clock.now();
            if self.node.poll_timeout().is_some_and(|t| t <= now) {
                self.node.handle_timeout(now);
            }
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => self.accept(now)?,
                    SYNCED => self.release(now)?,
                    token if token.0 >= PEER_BASE => {
                        let node = (token.0 - PEER_BASE) as NodeId;
                        self.link_event(node, ev.is_readable() || ev.is_read_closed() || ev.is_error(), now, &mut buf);
                    }
                    token => {
                        let Some(conn) = self.conns.get_mut(&token) else { continue };
                        let id = ConnId(token.0 as u64);
                        let mut closed = false;
                        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                            let node = &mut self.node;
                            if let ReadOutcome::Closed = conn.read_all(&mut buf, |b| node.handle_bytes(id, b, now)) {
                                closed = true;
                            }
                        }
                        if !closed && ev.is_writable() && conn.flush(self.poll.registry(), token).is_err() {
                            closed = true;
                        }
                        if closed {
                            self.drop_conn(token, now);
                        }
                    }
                }
            }
            self.drain(now)?;
        }
    }

    fn redial(&mut self, now: Millis) {
        for (node, link) in self.links.iter_mut() {
            let LinkState::Down { retry_at, backoff } = link.state else { continue };
            if retry_at > now {
                continue;
            }
            let token = Token(PEER_BASE + *node as usize);
            let next =
                LinkState::Down { retry_at: now.plus(backoff), backoff: Millis((backoff.0 * 2).min(REDIAL_MAX.0)) };
            link.state = match TcpStream::connect(link.addr) {
                Ok(mut s) => {
                    match self.poll.registry().register(&mut s, token, Interest::READABLE | Interest::WRITABLE) {
                        Ok(()) => LinkState::Connecting(Conn::connecting(s)),
                        Err(_) => next,
                    }
                }
                Err(_) => next,
            };
        }
    }

    fn link_down(&mut self, node: NodeId, now: Millis) {
        let Some(link) = self.links.get_mut(&node) else { return };
        let was_up = matches!(link.state, LinkState::Up(_));
        let old =
            std::mem::replace(&mut link.state, LinkState::Down { retry_at: now.plus(REDIAL_MIN), backoff: REDIAL_MIN });
        if let LinkState::Connecting(mut c) | LinkState::Up(mut c) = old {
            let _ = self.poll.registry().deregister(&mut c.stream);
        }
        if was_up {
            tracing::info!(node, "link to tracker lost");
            self.node.handle_peer_down(node, now);
        }
    }

    fn link_event(&mut self, node: NodeId, readable: bool, now: Millis, buf: &mut [u8]) {
        let token = Token(PEER_BASE + node as usize);
        let Some(link) = self.links.get_mut(&node) else { return };
        match &mut link.state {
            LinkState::Connecting(c) => match (c.stream.take_error(), c.stream.peer_addr()) {
                (Ok(None), Ok(_)) => {
                    let _ = c.stream.set_nodelay(true);
                    let LinkState::Connecting(c) =
                        std::mem::replace(&mut link.state, LinkState::Down { retry_at: now, backoff: REDIAL_MIN })
                    else {
                        unreachable!("matched above")
                    };
                    link.state = LinkState::Up(c);
                    tracing::info!(node, addr = %link.addr, "linked to tracker");
                    self.node.handle_peer_up(node, now);
                    if let Some(LinkState::Up(c)) = self.links.get_mut(&node).map(|l| &mut l.state) {
                        if c.flush(self.poll.registry(), token).is_err() {
                            self.link_down(node, now);
                        }
                    }
                }
                (Err(_), _) | (Ok(Some(_)), _) => self.link_down(node, now),
                // Not connected yet (spurious wake-up).
                (Ok(None), Err(_)) => {}
            },
            LinkState::Up(c) => {
                // The other side never speaks on our link: a read is its close.
                let closed = readable && matches!(c.read_all(buf, |_| {}), ReadOutcome::Closed);
                if closed || c.flush(self.poll.registry(), token).is_err() {
                    self.link_down(node, now);
                }
            }
            LinkState::Down { .. } => {}
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
                    self.conns.insert(token, Conn::new(stream));
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

    /// Sends the node's outputs. Log records are written first; one fsync
    /// (on the sync thread) covers all of them (group commit). What need not
    /// wait for it is sent at once; the rest is held until that fsync is
    /// done, while the loop goes on. Each destination keeps its order: once
    /// something to it is held, what follows to it is held too.
    fn drain(&mut self, now: Millis) -> io::Result<()> {
        loop {
            let outs: Vec<TrackerOutput> = std::iter::from_fn(|| self.node.poll_output()).collect();
            if outs.is_empty() {
                break;
            }
            let mut rewritten = false;
            for out in &outs {
                let Some(wal) = &mut self.wal else { break };
                match out {
                    TrackerOutput::Persist(Persist::Append(record)) => {
                        wal.append(record);
                        self.must_sync = true;
                    }
                    TrackerOutput::Persist(Persist::Lazy(record)) => wal.append(record),
                    TrackerOutput::Persist(Persist::Rewrite(record)) => {
                        wal.rewrite(record).map_err(|e| {
                            io::Error::new(e.kind(), format!("cannot rewrite {}: {e}", wal.path().display()))
                        })?;
                        rewritten = true;
                    }
                    _ => {}
                }
            }
            if let Some(wal) = &mut self.wal {
                wal.write_pending()
                    .map_err(|e| io::Error::new(e.kind(), format!("cannot write {}: {e}", wal.path().display())))?;
                if rewritten {
                    // The new file holds (and synced) everything: what waited is free.
                    if let Some(s) = &self.syncer {
                        let _ = s.tx.send(SyncCmd::File(wal.sync_handle()?));
                    }
                    self.requested += 1;
                    let everything = std::mem::take(&mut self.held);
                    self.held_dests.clear();
                    self.send_all(everything.into_iter().map(|(_, o)| o).collect(), now);
                }
            }
            if std::mem::take(&mut self.must_sync) {
                if let Some(s) = &self.syncer {
                    self.requested += 1;
                    let _ = s.tx.send(SyncCmd::Sync(self.requested));
                }
            }
            let done = self.syncer.as_ref().map_or(self.requested, |s| s.done.load(Ordering::Acquire));
            let mut now_out = Vec::new();
            for out in outs {
                match dest(&out) {
                    Some((d, after_sync)) if (after_sync && done < self.requested) || self.held_dests.contains(&d) => {
                        self.held_dests.insert(d);
                        self.held.push_back((self.requested, out));
                    }
                    _ => now_out.push(out),
                }
            }
            self.send_all(now_out, now);
        }
        self.close_finished(now);
        Ok(())
    }

    /// The sync thread finished: send what waited for it.
    fn release(&mut self, now: Millis) -> io::Result<()> {
        let Some(s) = &self.syncer else { return Ok(()) };
        if let Some(e) = s.error.lock().expect("not poisoned").take() {
            let path = self.wal.as_ref().map(|w| w.path().display().to_string()).unwrap_or_default();
            return Err(io::Error::new(e.kind(), format!("cannot sync {path}: {e}")));
        }
        let done = s.done.load(Ordering::Acquire);
        let mut ready = Vec::new();
        while self.held.front().is_some_and(|(seq, _)| *seq <= done) {
            ready.push(self.held.pop_front().expect("checked").1);
        }
        if ready.is_empty() {
            return Ok(());
        }
        self.held_dests = self.held.iter().filter_map(|(_, o)| dest(o).map(|(d, _)| d)).collect();
        self.send_all(ready, now);
        self.close_finished(now);
        Ok(())
    }

    fn send_all(&mut self, outs: Vec<TrackerOutput>, now: Millis) {
        let mut touched = std::collections::BTreeSet::new();
        let mut touched_links = std::collections::BTreeSet::new();
        self.send_outputs(outs, &mut touched, &mut touched_links, now);
        self.flush_touched(&mut touched, &mut touched_links, now);
    }

    /// Connections told to close whose backlog has since drained.
    fn close_finished(&mut self, now: Millis) {
        let finished: Vec<Token> =
            self.conns.iter().filter(|(_, c)| c.closing && !c.has_backlog()).map(|(t, _)| *t).collect();
        for t in finished {
            self.drop_conn(t, now);
        }
    }

    fn send_outputs(
        &mut self,
        outs: Vec<TrackerOutput>,
        touched: &mut std::collections::BTreeSet<Token>,
        touched_links: &mut std::collections::BTreeSet<NodeId>,
        now: Millis,
    ) {
        for out in outs {
            match out {
                TrackerOutput::Persist(_) | TrackerOutput::Applied { .. } => {}
                TrackerOutput::LeaderChanged { leader } => {
                    if let Some(f) = &mut self.on_leader {
                        f(leader);
                    }
                }
                TrackerOutput::PeerSend { node, bytes, .. } => {
                    if let Some(Link { state: LinkState::Up(c), .. }) = self.links.get_mut(&node) {
                        if c.queue_owned(bytes) {
                            touched_links.insert(node);
                        } else {
                            self.link_down(node, now);
                        }
                    }
                }
                TrackerOutput::Transmit { conn, bytes, .. } => {
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
    }

    fn flush_touched(
        &mut self,
        touched: &mut std::collections::BTreeSet<Token>,
        touched_links: &mut std::collections::BTreeSet<NodeId>,
        now: Millis,
    ) {
        for node in std::mem::take(touched_links) {
            let token = Token(PEER_BASE + node as usize);
            if let Some(Link { state: LinkState::Up(c), .. }) = self.links.get_mut(&node) {
                if c.flush(self.poll.registry(), token).is_err() {
                    self.link_down(node, now);
                }
            }
        }
        for token in std::mem::take(touched) {
            let Some(c) = self.conns.get_mut(&token) else { continue };
            let ok = c.flush(self.poll.registry(), token).is_ok();
            if !ok || (c.closing && !c.has_backlog()) {
                self.drop_conn(token, now);
            }
        }
    }
}
