//! Runs a [`ClientEngine`] on its own thread: the tracker connection, peer
//! connections both ways, disk reads and writes, hashing on worker threads,
//! and a channel from the shell.
//!
//! [`ClientHandle::run`] sends one shell command and blocks until it is done;
//! the shell (REPL or piped stdin) lives in the `client` binary.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::SocketAddr;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use shoal_core::client::disk::{DiskDone, DiskOp, OpenedPart};
use shoal_core::client::download::PeerConnId;
use shoal_core::client::{
    ClientConfig, ClientEngine, ClientInput, ClientOutput, DownloadId, DownloadStat, PeerEvent, Ticket, TrackerEvent,
};
use shoal_core::identity::KeyId;
use shoal_core::ids::UserId;
use shoal_core::rng::Rng;
use shoal_core::shell::{ShellCommand, ShellError};
use shoal_core::Millis;

use crate::clock::Clock;
use crate::conn::{Conn, Read, ReadOutcome};
use crate::hashers::{hash_file, Hasher};
use crate::part::{self, PartFile};
use crate::readcache::ReadCache;

const WAKER: Token = Token(0);
const TRACKER: Token = Token(1);
const LISTENER: Token = Token(2);
/// Accepted peer connections are numbered from here (outgoing ones carry
/// [`shoal_core::client::OUTGOING`]); a connection's token is its id.
const FIRST_INCOMING: u64 = 16;
/// Read buffer for sockets: large, so a block arrives in few reads.
const READ_BUF: usize = 256 * 1024;

/// What a finished command reports to the shell.
#[derive(Debug)]
pub struct CommandResult {
    pub result: Result<Vec<String>, ShellError>,
    /// Who is logged in after the command, for the prompt.
    pub user: Option<UserId>,
}

enum Inbox {
    Command(ShellCommand, Sender<CommandResult>),
    /// A disk operation's result, from a worker thread.
    Disk(DiskDone),
    /// A part file opened (its disk thread is started on the engine's).
    Opened(DownloadId, Result<(OpenedPart, PartFile), String>),
    WaitDownloads(Sender<()>),
    Stats(Sender<Vec<DownloadStat>>),
    Stop,
}

/// The shell's side of a running client.
pub struct ClientHandle {
    tx: Sender<Inbox>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
    listen: SocketAddr,
}

impl ClientHandle {
    /// Binds the peer listener at `cfg.listen` and starts the engine thread.
    pub fn start(cfg: ClientConfig) -> io::Result<ClientHandle> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let mut listener = TcpListener::bind(cfg.listen)?;
        poll.registry().register(&mut listener, LISTENER, Interest::READABLE)?;
        let listen = listener.local_addr()?;
        // A key for this run: the session it logs in is bound to it.
        let identity = crate::tls::Identity::ephemeral().map_err(|e| io::Error::other(e.to_string()))?;
        let tls_client = identity.client_config().map_err(|e| io::Error::other(e.to_string()))?;
        // Peer connections leave rustls after their handshake (records.rs).
        let tls_peer = identity.peer_client_config().map_err(|e| io::Error::other(e.to_string()))?;
        let tls_server = identity.peer_server_config().map_err(|e| io::Error::other(e.to_string()))?;
        let plaintext_peers = cfg.plaintext_peers;
        if plaintext_peers {
            tracing::warn!("peer connections are PLAINTEXT: file contents and grants cross the network unencrypted");
        }
        let engine = ClientEngine::new(ClientConfig { listen, ..cfg }, Rng::from_seed(crate::os_seed()?));
        let (tx, rx) = mpsc::channel();
        let driver = Driver {
            poll,
            engine,
            listener,
            listen_ip: listen.ip(),
            tls_client,
            tls_peer,
            tls_server,
            plaintext_peers,
            tracker: None,
            peers: HashMap::new(),
            next_incoming: FIRST_INCOMING,
            rx,
            tx: tx.clone(),
            waker: waker.clone(),
            clock: Clock::default(),
            waiting: BTreeMap::new(),
            download_waiters: Vec::new(),
            next_ticket: 1,
            readers: ReadCache::default(),
            parts: HashMap::new(),
            part_threads: Vec::new(),
            hashers: HashMap::new(),
            unflushed: Vec::new(),
        };
        let thread = std::thread::Builder::new().name("shoal-engine".into()).spawn(move || driver.run())?;
        Ok(ClientHandle { tx, waker, thread: Some(thread), listen })
    }

    /// Where this client listens for peers.
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen
    }

    fn ask<T>(&self, make: impl FnOnce(Sender<T>) -> Inbox) -> Option<T> {
        let (tx, rx) = mpsc::channel();
        if self.tx.send(make(tx)).is_err() || self.waker.wake().is_err() {
            return None;
        }
        rx.recv().ok()
    }

    /// Runs one command to completion.
    pub fn run(&self, cmd: ShellCommand) -> CommandResult {
        self.ask(|tx| Inbox::Command(cmd, tx)).unwrap_or_else(|| CommandResult {
            result: Err(ShellError::Local("the client engine stopped".into())),
            user: None,
        })
    }

    /// Blocks until no download is running.
    pub fn wait_downloads(&self) {
        let _ = self.ask(Inbox::WaitDownloads);
    }

    /// The state of every download of this client.
    pub fn download_stats(&self) -> Vec<DownloadStat> {
        self.ask(Inbox::Stats).unwrap_or_default()
    }
}

impl Drop for ClientHandle {
    fn drop(&mut self) {
        let _ = self.tx.send(Inbox::Stop);
        let _ = self.waker.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct PeerSocket {
    conn: Conn,
    connecting: bool,
    incoming: bool,
}

struct Driver {
    poll: Poll,
    engine: ClientEngine,
    listener: TcpListener,
    /// The IP peers reach us at: our tracker connections come from it.
    listen_ip: std::net::IpAddr,
    /// TLS for the connections we open (to trackers and peers) and accept
    /// (from peers), with this client's key.
    /// To trackers.
    tls_client: Arc<rustls::ClientConfig>,
    /// To peers, and from them.
    tls_peer: Arc<rustls::ClientConfig>,
    tls_server: Arc<rustls::ServerConfig>,
    /// Peer connections without TLS (`--insecure-plaintext-peers`).
    plaintext_peers: bool,
    /// The tracker connection, and whether it is still being established.
    tracker: Option<(Conn, bool)>,
    peers: HashMap<Token, PeerSocket>,
    next_incoming: u64,
    rx: Receiver<Inbox>,
    tx: Sender<Inbox>,
    waker: Arc<Waker>,
    clock: Clock,
    waiting: BTreeMap<Ticket, Sender<CommandResult>>,
    download_waiters: Vec<Sender<()>>,
    next_ticket: u64,
    readers: ReadCache,
    /// Each open download's disk thread: its operations, in order.
    parts: HashMap<DownloadId, Sender<DiskOp>>,
    /// The downloads' disk threads, joined when the client stops.
    part_threads: Vec<JoinHandle<()>>,
    /// Each open download's hashing thread.
    hashers: HashMap<DownloadId, Hasher>,
    /// Outgoing peer connections with bytes queued by this drain, flushed
    /// when it ends.
    unflushed: Vec<Token>,
}

fn token(conn: PeerConnId) -> Token {
    Token(conn.0 as usize)
}

impl Driver {
    fn run(mut self) {
        let mut events = Events::with_capacity(256);
        let mut buf = vec![0u8; READ_BUF];
        loop {
            let timeout = self.clock.until(self.engine.poll_timeout());
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::error!(error = %e, "poll failed; client engine stops");
                    return;
                }
            }
            let now = self.clock.now();
            for ev in events.iter() {
                match ev.token() {
                    WAKER => {}
                    LISTENER => self.accept_peers(now),
                    TRACKER => self.tracker_event(ev, &mut buf, now),
                    t => self.peer_event(t, ev, now),
                }
                self.drain(now);
            }
            while let Ok(msg) = self.rx.try_recv() {
                match msg {
                    Inbox::Command(cmd, reply) => {
                        let ticket = Ticket(self.next_ticket);
                        self.next_ticket += 1;
                        self.waiting.insert(ticket, reply);
                        self.engine.handle_input(ClientInput::User { ticket, cmd }, now);
                    }
                    Inbox::Disk(done) => self.engine.handle_input(ClientInput::Disk(done), now),
                    Inbox::Opened(id, result) => {
                        let result = result.and_then(|(opened, part)| self.start_part(id, part).map(|()| opened));
                        self.engine.handle_input(ClientInput::Disk(DiskDone::PartOpened { id, result }), now);
                    }
                    Inbox::WaitDownloads(tx) => self.download_waiters.push(tx),
                    Inbox::Stats(tx) => {
                        let _ = tx.send(self.engine.download_stats(now));
                    }
                    Inbox::Stop => {
                        // A finished download's disk thread may still be
                        // removing its state file; let it, so none is left.
                        self.parts.clear();
                        for h in self.part_threads.drain(..) {
                            let _ = h.join();
                        }
                        return;
                    }
                }
                self.drain(now);
            }
            if self.engine.poll_timeout().is_some_and(|t| t <= now) {
                self.engine.handle_input(ClientInput::Timeout, now);
            }
            self.drain(now);
            if !self.download_waiters.is_empty() && !self.engine.downloads_running() {
                for w in self.download_waiters.drain(..) {
                    let _ = w.send(());
                }
            }
        }
    }

    fn tracker_event(&mut self, ev: &mio::event::Event, buf: &mut [u8], now: Millis) {
        let Some((conn, connecting)) = self.tracker.as_mut() else { return };
        if *connecting {
            if !ev.is_writable() && !ev.is_error() && !ev.is_read_closed() {
                return;
            }
            match (conn.stream.take_error(), conn.stream.peer_addr()) {
                // Connected: the TLS handshake starts; the engine hears of
                // it once done, with the key the tracker proved.
                (Ok(None), Ok(_)) => *connecting = false,
                _ => {
                    self.close_tracker();
                    self.engine.handle_input(ClientInput::Tracker(TrackerEvent::Closed), now);
                    return;
                }
            }
        }
        let Some((conn, _)) = self.tracker.as_mut() else { return };
        let engine = &mut self.engine;
        let mut closed = false;
        let outcome = conn.read_all(buf, |r| match r {
            Read::Secured(Some(key)) => engine.handle_input(ClientInput::Tracker(TrackerEvent::Connected { key }), now),
            Read::Secured(None) => closed = true,
            Read::Bytes(b) if !closed => engine.handle_input(ClientInput::Tracker(TrackerEvent::Bytes(b)), now),
            Read::Bytes(_) => {}
        });
        closed |= matches!(outcome, ReadOutcome::Closed);
        if !closed && conn.flush(self.poll.registry(), TRACKER).is_err() {
            closed = true;
        }
        if closed {
            self.close_tracker();
            self.engine.handle_input(ClientInput::Tracker(TrackerEvent::Closed), now);
        }
    }

    fn peer_event(&mut self, t: Token, ev: &mio::event::Event, now: Millis) {
        let id = PeerConnId(t.0 as u64);
        let Some(p) = self.peers.get_mut(&t) else { return };
        if p.connecting {
            if !ev.is_writable() && !ev.is_error() && !ev.is_read_closed() {
                return;
            }
            match (p.conn.stream.take_error(), p.conn.stream.peer_addr()) {
                (Ok(None), Ok(_)) => {
                    p.connecting = false;
                    let _ = p.conn.stream.set_nodelay(true);
                    if self.plaintext_peers {
                        let ev = PeerEvent::Connected { key: None };
                        self.engine.handle_input(ClientInput::Peer(id, ev), now);
                        // The handshake the engine queued goes out with the drain.
                        return;
                    }
                    // The TLS handshake starts (our hello goes out below);
                    // the engine hears of the connection once it is done.
                }
                _ => return self.drop_peer(t, now),
            }
        }
        let mut closed = false;
        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
            // Block data straight into its chunk, the rest into the engine's
            // frame decoder: block data is copied once (by the kernel, or
            // out of the decrypted TLS record).
            loop {
                let Some(p) = self.peers.get_mut(&t) else { return };
                let Some((data, frames)) = self.engine.peer_recv_bufs(id) else { break };
                let r = p.conn.read_vectored_once(&mut [io::IoSliceMut::new(data), io::IoSliceMut::new(frames)]);
                // The key the other end proved comes before anything it said.
                if let Some(key) = p.conn.secured() {
                    let incoming = p.incoming;
                    if !self.peer_secured(id, incoming, key, now) {
                        return;
                    }
                }
                match r {
                    Ok(n) => self.engine.handle_peer_received(id, n, now),
                    Err(outcome) => {
                        closed = matches!(outcome, ReadOutcome::Closed);
                        break;
                    }
                }
            }
        }
        // The engine may have closed it while handling those bytes.
        let Some(p) = self.peers.get_mut(&t) else { return };
        // After a read too: TLS answers its handshake.
        if !closed {
            closed = p.conn.flush(self.poll.registry(), t).is_err();
            if !closed && p.incoming && ev.is_writable() {
                self.engine.handle_input(ClientInput::Peer(id, PeerEvent::Backlog(p.conn.backlog())), now);
            }
        }
        if closed {
            self.drop_peer(t, now);
        }
    }

    /// A peer connection's TLS handshake is done: tell the engine who the
    /// other end proved to be. False if the connection is gone (it showed no
    /// usable certificate).
    fn peer_secured(&mut self, id: PeerConnId, incoming: bool, key: Option<KeyId>, now: Millis) -> bool {
        let ev = match (incoming, key) {
            (_, None) => {
                self.drop_peer(token(id), now);
                return false;
            }
            (true, Some(key)) => PeerEvent::Secured { key },
            (false, Some(key)) => PeerEvent::Connected { key: Some(key) },
        };
        self.engine.handle_input(ClientInput::Peer(id, ev), now);
        true
    }

    fn accept_peers(&mut self, now: Millis) {
        loop {
            match self.listener.accept() {
                Ok((mut stream, _)) => {
                    let id = PeerConnId(self.next_incoming);
                    self.next_incoming += 1;
                    let t = token(id);
                    if self.poll.registry().register(&mut stream, t, Interest::READABLE).is_err() {
                        continue;
                    }
                    let _ = stream.set_nodelay(true);
                    let conn = if self.plaintext_peers {
                        Conn::new(stream)
                    } else {
                        let Ok(tls) = rustls::ServerConnection::new(self.tls_server.clone()) else { continue };
                        Conn::new(stream).with_tls_bulk(tls)
                    };
                    self.peers.insert(t, PeerSocket { conn, connecting: false, incoming: true });
                    self.engine.handle_input(ClientInput::Peer(id, PeerEvent::Accepted), now);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // WouldBlock, or out of descriptors: try again on the next event.
                Err(_) => return,
            }
        }
    }

    /// The socket is gone: tell the engine.
    fn drop_peer(&mut self, t: Token, now: Millis) {
        if let Some(mut p) = self.peers.remove(&t) {
            let _ = self.poll.registry().deregister(&mut p.conn.stream);
            self.engine.handle_input(ClientInput::Peer(PeerConnId(t.0 as u64), PeerEvent::Closed), now);
        }
    }

    fn close_tracker(&mut self) {
        if let Some((mut c, _)) = self.tracker.take() {
            let _ = self.poll.registry().deregister(&mut c.stream);
        }
    }

    fn drain(&mut self, now: Millis) {
        loop {
            self.drain_outputs(now);
            // Requests to sharers go out once the engine has said all it
            // had to: a chunk's block requests share one write (they took
            // one `sendmsg` each, four per chunk, each waking the sharer).
            let mut dropped = false;
            for t in std::mem::take(&mut self.unflushed) {
                let Some(p) = self.peers.get_mut(&t) else { continue };
                if p.conn.flush(self.poll.registry(), t).is_err() {
                    self.drop_peer(t, now);
                    dropped = true;
                }
            }
            if !dropped {
                return;
            }
        }
    }

    fn drain_outputs(&mut self, now: Millis) {
        while let Some(out) = self.engine.poll_output() {
            match out {
                ClientOutput::Connect { addr } => self.connect_tracker(addr, now),
                ClientOutput::Transmit(bytes) => {
                    if let Some((conn, _)) = self.tracker.as_mut() {
                        if !conn.queue(&bytes) || conn.flush(self.poll.registry(), TRACKER).is_err() {
                            self.close_tracker();
                            self.engine.handle_input(ClientInput::Tracker(TrackerEvent::Closed), now);
                        }
                    }
                }
                ClientOutput::Disconnect => self.close_tracker(),
                ClientOutput::Done { ticket, result } => {
                    if let Some(reply) = self.waiting.remove(&ticket) {
                        let _ = reply.send(CommandResult { result, user: self.engine.user().cloned() });
                    }
                }
                ClientOutput::PeerConnect { conn, addr } => match TcpStream::connect(addr) {
                    Ok(mut s) => {
                        let t = token(conn);
                        let registered =
                            self.poll.registry().register(&mut s, t, Interest::READABLE | Interest::WRITABLE);
                        let sock = if self.plaintext_peers {
                            Ok(Conn::connecting(s))
                        } else {
                            rustls::ClientConnection::new(self.tls_peer.clone(), crate::tls::server_name())
                                .map(|tls| Conn::connecting(s).with_tls_bulk(tls))
                        };
                        if let (Ok(()), Ok(sock)) = (registered, sock) {
                            self.peers.insert(t, PeerSocket { conn: sock, connecting: true, incoming: false });
                        } else {
                            self.engine.handle_input(ClientInput::Peer(conn, PeerEvent::Closed), now);
                        }
                    }
                    Err(_) => self.engine.handle_input(ClientInput::Peer(conn, PeerEvent::Closed), now),
                },
                ClientOutput::PeerTransmit { conn, bytes } => {
                    let t = token(conn);
                    let Some(p) = self.peers.get_mut(&t) else { continue };
                    if !p.conn.queue(&bytes) {
                        self.drop_peer(t, now);
                    } else if p.incoming {
                        // Serving: flushed at once, and the engine told the
                        // backlog it bounds its uploads by.
                        if p.conn.flush(self.poll.registry(), t).is_err() {
                            self.drop_peer(t, now);
                            continue;
                        }
                        let backlog = p.conn.backlog();
                        self.engine.handle_input(ClientInput::Peer(conn, PeerEvent::Backlog(backlog)), now);
                    } else if !p.connecting && !self.unflushed.contains(&t) {
                        self.unflushed.push(t);
                    }
                }
                ClientOutput::PeerClose { conn } => {
                    // Best effort: flush what is queued (a refusal), then close.
                    if let Some(mut p) = self.peers.remove(&token(conn)) {
                        let _ = p.conn.flush(self.poll.registry(), token(conn));
                        let _ = self.poll.registry().deregister(&mut p.conn.stream);
                    }
                }
                ClientOutput::SendBlock { conn, path, offset, header, len } => {
                    let result = self.readers.open_range(&path, offset, len as u64);
                    let t = token(conn);
                    if let Ok(file) = &result {
                        if let Some(p) = self.peers.get_mut(&t) {
                            let queued =
                                p.conn.queue_owned(header) && p.conn.queue_file(file.clone(), offset, len as usize);
                            if !queued || p.conn.flush(self.poll.registry(), t).is_err() {
                                self.drop_peer(t, now);
                                continue;
                            }
                            let backlog = p.conn.backlog();
                            self.engine.handle_input(ClientInput::Peer(conn, PeerEvent::Backlog(backlog)), now);
                        }
                    }
                    self.engine.handle_input(ClientInput::Peer(conn, PeerEvent::BlockSent(result.map(|_| ()))), now);
                }
                ClientOutput::Disk(op) => self.disk(op, now),
            }
        }
    }

    /// Sends a disk operation to the thread that does it.
    fn disk(&mut self, op: DiskOp, now: Millis) {
        match op {
            DiskOp::HashFile { job, path } => {
                self.spawn("shoal-hash", move || Inbox::Disk(DiskDone::FileHashed { job, result: hash_file(&path) }));
            }
            DiskOp::OpenPart { id, dest, name, size } => {
                self.spawn("shoal-open", move || Inbox::Opened(id, part::open(&dest, &name, size)));
            }
            DiskOp::Hash { id, job } => {
                // Handed back unrun if nothing can run it: core fails the download.
                let job = match self.hashers.get(&id) {
                    Some(h) => match h.run(job) {
                        None => return,
                        Some(job) => job,
                    },
                    None => job,
                };
                self.engine.handle_input(ClientInput::Disk(DiskDone::Hashed { id, job }), now);
            }
            op @ (DiskOp::Finish { id } | DiskOp::Close { id }) => {
                self.hashers.remove(&id);
                if let Some(tx) = self.parts.remove(&id) {
                    let _ = tx.send(op);
                } else if matches!(op, DiskOp::Finish { .. }) {
                    let result = Err("the part file's disk thread stopped".to_string());
                    self.engine.handle_input(ClientInput::Disk(DiskDone::Finished { id, result }), now);
                }
            }
            op @ (DiskOp::Read { id, .. }
            | DiskOp::Write { id, .. }
            | DiskOp::SaveState { id, .. }
            | DiskOp::Release { id, .. }) => {
                let Some(tx) = self.parts.get(&id) else {
                    return self.refuse_disk(op, now);
                };
                if let Err(mpsc::SendError(op)) = tx.send(op) {
                    self.parts.remove(&id);
                    self.refuse_disk(op, now);
                }
            }
        }
    }

    /// An operation for a download whose disk thread is gone: it fails.
    fn refuse_disk(&mut self, op: DiskOp, now: Millis) {
        let err = || Err("the part file's disk thread stopped".to_string());
        let done = match op {
            DiskOp::Read { id, chunk, buf } => DiskDone::Read { id, chunk, buf, result: err() },
            DiskOp::Write { id, chunk, data } => DiskDone::Written { id, chunk, data, result: err() },
            DiskOp::SaveState { id, .. } => DiskDone::StateSaved { id, result: err() },
            _ => return,
        };
        self.engine.handle_input(ClientInput::Disk(done), now);
    }

    /// How worker threads hand results to the engine thread.
    fn reporter(&self) -> impl Fn(DiskDone) + Send + Sync + 'static {
        let (tx, waker) = (Mutex::new(self.tx.clone()), self.waker.clone());
        move |done| {
            let _ = tx.lock().unwrap_or_else(|e| e.into_inner()).send(Inbox::Disk(done));
            let _ = waker.wake();
        }
    }

    fn start_part(&mut self, id: DownloadId, part: PartFile) -> Result<(), String> {
        let hasher = Hasher::start(id, self.reporter()).map_err(|e| format!("cannot start a hashing thread: {e}"))?;
        self.hashers.insert(id, hasher);
        let (tx, thread) = part.spawn(id, self.reporter()).map_err(|e| format!("cannot start a disk thread: {e}"))?;
        self.parts.insert(id, tx);
        self.part_threads.retain(|h| !h.is_finished());
        self.part_threads.push(thread);
        Ok(())
    }

    fn connect_tracker(&mut self, addr: SocketAddr, now: Millis) {
        self.close_tracker();
        // From the address we serve on: the tracker names us as a sharer at
        // the address it sees, with the port we listen on.
        match crate::conn::connect_from(self.listen_ip, addr) {
            Ok(mut s) => {
                if self.poll.registry().register(&mut s, TRACKER, Interest::READABLE | Interest::WRITABLE).is_ok() {
                    let _ = s.set_nodelay(true);
                    match rustls::ClientConnection::new(self.tls_client.clone(), crate::tls::server_name()) {
                        Ok(tls) => self.tracker = Some((Conn::connecting(s).with_tls(tls), true)),
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot start TLS");
                            self.engine.handle_input(ClientInput::Tracker(TrackerEvent::Closed), now);
                        }
                    }
                } else {
                    self.engine.handle_input(ClientInput::Tracker(TrackerEvent::Closed), now);
                }
            }
            Err(e) => {
                tracing::debug!(%addr, error = %e, "connect failed");
                self.engine.handle_input(ClientInput::Tracker(TrackerEvent::Closed), now);
            }
        }
    }

    /// Runs disk or hashing work off the engine thread; its result comes back
    /// through the inbox.
    fn spawn(&self, name: &str, work: impl FnOnce() -> Inbox + Send + 'static) {
        let tx = self.tx.clone();
        let waker = self.waker.clone();
        let spawned = std::thread::Builder::new().name(name.into()).spawn(move || {
            let _ = tx.send(work());
            let _ = waker.wake();
        });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start a worker thread");
        }
    }
}
