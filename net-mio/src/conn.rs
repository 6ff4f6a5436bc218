//! A non-blocking TCP connection with an outgoing buffer.

use std::collections::VecDeque;
use std::io::{self, Read, Write};

use mio::net::TcpStream;
use mio::{Interest, Registry, Token};

/// Largest backlog of unsent bytes before a connection counts as stuck.
pub const MAX_WRITE_BACKLOG: usize = 64 * 1024 * 1024;

pub struct Conn {
    pub stream: TcpStream,
    out: VecDeque<u8>,
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
    pub fn new(stream: TcpStream) -> Conn {
        Conn { stream, out: VecDeque::new(), closing: false, writable_registered: false }
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
        self.out.extend(bytes);
        self.out.len() <= MAX_WRITE_BACKLOG
    }

    pub fn has_backlog(&self) -> bool {
        !self.out.is_empty()
    }

    /// Writes what the socket takes; keeps WRITABLE interest only while needed.
    pub fn flush(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
        while !self.out.is_empty() {
            let (a, _) = self.out.as_slices();
            match self.stream.write(a) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        let want = !self.out.is_empty();
        if want != self.writable_registered {
            let interest = if want { Interest::READABLE | Interest::WRITABLE } else { Interest::READABLE };
            registry.reregister(&mut self.stream, token, interest)?;
            self.writable_registered = want;
        }
        Ok(())
    }
}
