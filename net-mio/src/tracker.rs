//! Serves a [`TrackerNode`] on a TCP listener.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;

use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token};
use shoal_core::tracker::{ConnId, Replicator, TrackerNode, TrackerOutput};

use crate::clock::Clock;
use crate::conn::{Conn, ReadOutcome};
use crate::wal::WalFile;

const LISTENER: Token = Token(0);

/// Most client connections a tracker holds at once; more are refused at accept.
pub const MAX_TRACKER_CONNECTIONS: usize = 4096;

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
        })
    }

    /// Makes every decided write durable in `wal` before it is answered.
    pub fn with_wal(mut self, wal: WalFile) -> Self {
        self.wal = Some(wal);
        self
    }

    /// Caps the connections held at once (default [`MAX_TRACKER_CONNECTIONS`]).
    pub fn with_max_connections(mut self, max: usize) -> Self {
        self.max_connections = max;
        self
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Runs until an unrecoverable poll error.
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
            if self.node.poll_timeout().is_some_and(|t| t <= now) {
                self.node.handle_timeout(now);
            }
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => self.accept(now)?,
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

    fn accept(&mut self, now: shoal_core::Millis) -> io::Result<()> {
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

    fn drop_conn(&mut self, token: Token, now: shoal_core::Millis) {
        if let Some(mut c) = self.conns.remove(&token) {
            let _ = self.poll.registry().deregister(&mut c.stream);
            self.node.handle_closed(ConnId(token.0 as u64), now);
        }
    }

    /// Sends the node's outputs. Log records are made durable (one fsync for
    /// all of them) before anything that follows them goes out.
    fn drain(&mut self, now: shoal_core::Millis) -> io::Result<()> {
        while let Some(out) = self.node.poll_output() {
            let (token, bytes) = match &out {
                TrackerOutput::Persist { record } => {
                    if let Some(wal) = &mut self.wal {
                        wal.append(record);
                    }
                    continue;
                }
                TrackerOutput::Transmit { conn, bytes } => (Token(conn.0 as usize), Some(bytes)),
                TrackerOutput::Close { conn } => (Token(conn.0 as usize), None),
            };
            if let Some(wal) = &mut self.wal {
                wal.sync()
                    .map_err(|e| io::Error::new(e.kind(), format!("cannot write {}: {e}", wal.path().display())))?;
            }
            let Some(c) = self.conns.get_mut(&token) else { continue };
            let ok = match bytes {
                Some(b) => c.queue(b) && c.flush(self.poll.registry(), token).is_ok(),
                None => {
                    c.closing = true;
                    true
                }
            };
            let done = c.closing && !c.has_backlog();
            if !ok || done {
                self.drop_conn(token, now);
            }
        }
        if let Some(wal) = &mut self.wal {
            wal.sync()?;
        }
        // Connections told to close whose backlog has since drained.
        let finished: Vec<Token> =
            self.conns.iter().filter(|(_, c)| c.closing && !c.has_backlog()).map(|(t, _)| *t).collect();
        for t in finished {
            self.drop_conn(t, now);
        }
        Ok(())
    }
}
