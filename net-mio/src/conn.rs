//! A non-blocking TCP connection with an outgoing buffer.

use std::io::{self, Read, Write};

use mio::net::TcpStream;
use mio::{Interest, Registry, Token};

/// Largest backlog of unsent bytes before a connection counts as stuck.
pub const MAX_WRITE_BACKLOG: usize = 64 * 1024 * 1024;

pub struct Conn {
    pub stream: TcpStream,
    out: Vec<u8>,
    /// Bytes of `out` already written.
    sent: usize,
    /// Close once `out` is flushed.
    pub closing: bool,
    writable_registered: bool,
}

pub enum ReadOutcome {
    /// The socket has no more bytes for now.
    Open,
    /// The peer closed or the socket failed.
    Closed,
}

impl Conn {
    /// An accepted stream, registered for READABLE.
    pub fn new(stream: TcpStream) -> Conn {
        Conn { stream, out: Vec::new(), sent: 0, closing: false, writable_registered: false }
    }

    /// A stream still connecting, registered for READABLE | WRITABLE.
    pub fn connecting(stream: TcpStream) -> Conn {
        Conn { stream, out: Vec::new(), sent: 0, closing: false, writable_registered: true }
    }

    /// Reads everything available, handing each piece to `sink`.
    pub fn read_all(&mut self, buf: &mut [u8], mut sink: impl FnMut(&[u8])) -> ReadOutcome {
        loop {
            match self.stream.read(buf) {
                Ok(0) => return ReadOutcome::Closed,
                Ok(n) => sink(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return ReadOutcome::Open,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return ReadOutcome::Closed,
            }
        }
    }

    /// Queues bytes; false if the backlog is over its limit.
    pub fn queue(&mut self, bytes: &[u8]) -> bool {
        if self.sent > 0 && self.sent * 2 >= self.out.len() {
            self.out.drain(..self.sent);
            self.sent = 0;
        }
        self.out.extend_from_slice(bytes);
        self.backlog() <= MAX_WRITE_BACKLOG
    }

    /// Bytes queued but not yet written to the socket.
    pub fn backlog(&self) -> usize {
        self.out.len() - self.sent
    }

    pub fn has_backlog(&self) -> bool {
        self.backlog() > 0
    }

    /// Writes what the socket takes; keeps WRITABLE interest only while needed.
    pub fn flush(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
        while self.sent < self.out.len() {
            match self.stream.write(&self.out[self.sent..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        if self.sent == self.out.len() {
            self.out.clear();
            self.sent = 0;
        }
        let want = self.has_backlog();
        if want != self.writable_registered {
            let interest = if want { Interest::READABLE | Interest::WRITABLE } else { Interest::READABLE };
            registry.reregister(&mut self.stream, token, interest)?;
            self.writable_registered = want;
        }
        Ok(())
    }
}
