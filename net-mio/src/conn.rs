//! A non-blocking TCP connection with an outgoing buffer.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};

use mio::net::TcpStream;
use mio::{Interest, Registry, Token};

/// Largest backlog of unsent bytes before a connection counts as stuck.
pub const MAX_WRITE_BACKLOG: usize = 64 * 1024 * 1024;

pub struct Conn {
    pub stream: TcpStream,
    /// Frames waiting to be written, oldest first; large ones are queued as
    /// they are, without a copy.
    out: VecDeque<Vec<u8>>,
    /// Bytes of the front frame already written.
    sent: usize,
    /// Bytes in `out`, less `sent`.
    pending: usize,
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
        Conn { stream, out: VecDeque::new(), sent: 0, pending: 0, closing: false, writable_registered: false }
    }

    /// A stream still connecting, registered for READABLE | WRITABLE.
    pub fn connecting(stream: TcpStream) -> Conn {
        Conn { stream, out: VecDeque::new(), sent: 0, pending: 0, closing: false, writable_registered: true }
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

    /// Queues a copy of `bytes`; false if the backlog is over its limit.
    pub fn queue(&mut self, bytes: &[u8]) -> bool {
        // Small messages share one buffer, so a burst of them is one write.
        match self.out.back_mut() {
            Some(last) if last.len() < 64 * 1024 => {
                last.extend_from_slice(bytes);
                self.pending += bytes.len();
                self.pending <= MAX_WRITE_BACKLOG
            }
            _ => self.queue_owned(bytes.to_vec()),
        }
    }

    /// Queues a whole frame without copying it.
    pub fn queue_owned(&mut self, frame: Vec<u8>) -> bool {
        self.pending += frame.len();
        self.out.push_back(frame);
        self.pending <= MAX_WRITE_BACKLOG
    }

    /// Bytes queued but not yet written to the socket.
    pub fn backlog(&self) -> usize {
        self.pending
    }

    pub fn has_backlog(&self) -> bool {
        self.backlog() > 0
    }

    /// Writes what the socket takes; keeps WRITABLE interest only while needed.
    pub fn flush(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
        while !self.out.is_empty() {
            let mut slices = [IoSlice::new(&[]); 16];
            let mut n = 0;
            for (i, f) in self.out.iter().take(slices.len()).enumerate() {
                slices[i] = IoSlice::new(if i == 0 { &f[self.sent..] } else { f });
                n += 1;
            }
            match self.stream.write_vectored(&slices[..n]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(mut k) => {
                    self.pending -= k;
                    while k > 0 {
                        let front = self.out.front().expect("wrote from it").len() - self.sent;
                        if k >= front {
                            k -= front;
                            self.out.pop_front();
                            self.sent = 0;
                        } else {
                            self.sent += k;
                            k = 0;
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
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
