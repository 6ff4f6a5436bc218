//! Runs a [`ClientEngine`] on its own thread: the tracker connection, the
//! listener for peers, file hashing, and a channel from the shell.
//!
//! [`ClientHandle::run`] sends one shell command and blocks until it is done;
//! the shell (REPL or piped stdin) lives in the `client` binary.

use std::fs::File;
use std::io::{self, Read};
use std::net::SocketAddr;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use shoal_core::chunk::{FileDigest, FileHasher};
use shoal_core::client::{ClientConfig, ClientEngine, ClientOutput, Ticket};
use shoal_core::ids::UserId;
use shoal_core::rng::Rng;
use shoal_core::shell::{ShellCommand, ShellError};

use crate::clock::Clock;
use crate::conn::{Conn, ReadOutcome};

const WAKER: Token = Token(0);
const TRACKER: Token = Token(1);
const LISTENER: Token = Token(2);

/// What a finished command reports to the shell.
#[derive(Debug)]
pub struct CommandResult {
    pub result: Result<Vec<String>, ShellError>,
    /// Who is logged in after the command, for the prompt.
    pub user: Option<UserId>,
}

enum Inbox {
    Command(ShellCommand, Sender<CommandResult>),
    Hashed(u64, Result<FileDigest, String>),
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
        let engine = ClientEngine::new(ClientConfig { listen, ..cfg }, Rng::from_seed(crate::os_seed()?));
        let (tx, rx) = mpsc::channel();
        let driver = Driver {
            poll,
            engine,
            listener,
            tracker: None,
            rx,
            tx: tx.clone(),
            waker: waker.clone(),
            clock: Clock::default(),
            waiting: Default::default(),
            next_ticket: 1,
        };
        let thread = std::thread::Builder::new().name("shoal-engine".into()).spawn(move || driver.run())?;
        Ok(ClientHandle { tx, waker, thread: Some(thread), listen })
    }

    /// Where this client listens for peers.
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen
    }

    /// Runs one command to completion.
    pub fn run(&self, cmd: ShellCommand) -> CommandResult {
        let (tx, rx) = mpsc::channel();
        let gone = || CommandResult { result: Err(ShellError::Local("the client engine stopped".into())), user: None };
        if self.tx.send(Inbox::Command(cmd, tx)).is_err() || self.waker.wake().is_err() {
            return gone();
        }
        rx.recv().unwrap_or_else(|_| gone())
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

struct Driver {
    poll: Poll,
    engine: ClientEngine,
    listener: TcpListener,
    /// The tracker connection, and whether it is still being established.
    tracker: Option<(Conn, bool)>,
    rx: Receiver<Inbox>,
    tx: Sender<Inbox>,
    waker: Arc<Waker>,
    clock: Clock,
    waiting: std::collections::BTreeMap<Ticket, Sender<CommandResult>>,
    next_ticket: u64,
}

impl Driver {
    fn run(mut self) {
        let mut events = Events::with_capacity(256);
        let mut buf = vec![0u8; 64 * 1024];
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
                    LISTENER => self.accept_peers(),
                    TRACKER => {
                        let Some((conn, connecting)) = self.tracker.as_mut() else { continue };
                        if *connecting {
                            if !ev.is_writable() && !ev.is_error() && !ev.is_read_closed() {
                                continue;
                            }
                            match (conn.stream.take_error(), conn.stream.peer_addr()) {
                                (Ok(None), Ok(_)) => {
                                    *connecting = false;
                                    self.engine.handle_tracker_connected(now);
                                }
                                _ => {
                                    self.close_tracker();
                                    self.engine.handle_tracker_closed(now);
                                    continue;
                                }
                            }
                        }
                        let (conn, _) = self.tracker.as_mut().expect("checked above");
                        let engine = &mut self.engine;
                        let mut closed = matches!(
                            conn.read_all(&mut buf, |b| engine.handle_tracker_bytes(b, now)),
                            ReadOutcome::Closed
                        );
                        if !closed && conn.flush(self.poll.registry(), TRACKER).is_err() {
                            closed = true;
                        }
                        if closed {
                            self.close_tracker();
                            self.engine.handle_tracker_closed(now);
                        }
                    }
                    _ => {}
                }
            }
            while let Ok(msg) = self.rx.try_recv() {
                match msg {
                    Inbox::Command(cmd, reply) => {
                        let ticket = Ticket(self.next_ticket);
                        self.next_ticket += 1;
                        self.waiting.insert(ticket, reply);
                        self.engine.handle_command(ticket, cmd, now);
                    }
                    Inbox::Hashed(job, result) => self.engine.handle_file_hashed(job, result, now),
                    Inbox::Stop => return,
                }
            }
            if self.engine.poll_timeout().is_some_and(|t| t <= now) {
                self.engine.handle_timeout(now);
            }
            self.drain(now);
        }
    }

    fn accept_peers(&mut self) {
        // Chunk serving is not there yet: accept and hang up, so peers get a
        // clean refusal instead of a connection that hangs.
        while let Ok((stream, _)) = self.listener.accept() {
            drop(stream);
        }
    }

    fn close_tracker(&mut self) {
        if let Some((mut c, _)) = self.tracker.take() {
            let _ = self.poll.registry().deregister(&mut c.stream);
        }
    }

    fn drain(&mut self, now: shoal_core::Millis) {
        while let Some(out) = self.engine.poll_output() {
            match out {
                ClientOutput::Connect { addr } => {
                    self.close_tracker();
                    match TcpStream::connect(addr) {
                        Ok(mut s) => {
                            let interest = Interest::READABLE | Interest::WRITABLE;
                            if self.poll.registry().register(&mut s, TRACKER, interest).is_ok() {
                                let _ = s.set_nodelay(true);
                                self.tracker = Some((Conn::new(s), true));
                            } else {
                                self.engine.handle_tracker_closed(now);
                            }
                        }
                        Err(e) => {
                            tracing::debug!(%addr, error = %e, "connect failed");
                            self.engine.handle_tracker_closed(now);
                        }
                    }
                }
                ClientOutput::Transmit(bytes) => {
                    if let Some((conn, _)) = self.tracker.as_mut() {
                        if !conn.queue(&bytes) || conn.flush(self.poll.registry(), TRACKER).is_err() {
                            self.close_tracker();
                            self.engine.handle_tracker_closed(now);
                        }
                    }
                }
                ClientOutput::Disconnect => self.close_tracker(),
                ClientOutput::HashFile { job, path } => {
                    let tx = self.tx.clone();
                    let waker = self.waker.clone();
                    let spawned = std::thread::Builder::new().name("shoal-hash".into()).spawn(move || {
                        let _ = tx.send(Inbox::Hashed(job, hash_file(&path)));
                        let _ = waker.wake();
                    });
                    if let Err(e) = spawned {
                        self.engine.handle_file_hashed(job, Err(e.to_string()), now);
                    }
                }
                ClientOutput::Done { ticket, result } => {
                    if let Some(reply) = self.waiting.remove(&ticket) {
                        let _ = reply.send(CommandResult { result, user: self.engine.user().cloned() });
                    }
                }
            }
        }
    }
}

/// Streams a file through the chunk hasher in 1 MiB reads: constant memory.
pub fn hash_file(path: &str) -> Result<FileDigest, String> {
    let mut f = File::open(path).map_err(|e| e.to_string())?;
    if !f.metadata().map_err(|e| e.to_string())?.is_file() {
        return Err("not a regular file".into());
    }
    let mut h = FileHasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => h.update(&buf[..n]).map_err(|e| e.to_string())?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.to_string()),
        }
    }
    h.finish().map_err(|e| e.to_string())
}
