//! A non-blocking TCP connection with an outgoing buffer, optionally under
//! TLS ([`Conn::with_tls`]): then what is queued is plaintext, encrypted as
//! the socket takes it, and reads return plaintext.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, IoSlice, Read as _};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use mio::net::TcpStream;
use mio::{Interest, Registry, Token};
use shoal_core::identity::KeyId;

/// Largest backlog of unsent bytes before a connection counts as stuck.
pub const MAX_WRITE_BACKLOG: usize = 64 * 1024 * 1024;

pub struct Conn {
    pub stream: TcpStream,
    /// What waits to be written, oldest first: frames (large ones queued as
    /// they are, without a copy) and ranges of files.
    out: VecDeque<Out>,
    /// Bytes of the front item already written.
    sent: usize,
    /// Bytes in `out`, less `sent`.
    pending: usize,
    /// Close once `out` is flushed.
    pub closing: bool,
    writable_registered: bool,
    tls: Option<Box<rustls::Connection>>,
    /// Whether the end of the TLS handshake was reported ([`Conn::secured`]).
    secured: bool,
    /// Whether our TLS close_notify is queued.
    close_sent: bool,
    /// Under TLS: records read from the socket and not yet handed to rustls
    /// (`rx[rx_at..]`). rustls reads at most 4 KiB a call; through this, one
    /// `read` of the socket brings up to [`TLS_RX_BUF`] (16 times fewer
    /// system calls for a block stream).
    rx: Vec<u8>,
    rx_at: usize,
    /// Under TLS: file bytes read and not yet taken by rustls, reused:
    /// `scratch.data[head..]` are the file's bytes from `at` on.
    scratch: Scratch,
}

/// File bytes read ahead for encryption. rustls takes only what fits its
/// outgoing buffer, often a part of what was read; the rest waits here
/// rather than being read again.
#[derive(Default)]
struct Scratch {
    data: Vec<u8>,
    head: usize,
    /// Which file (its `Arc`'s address) and where `data[head..]` starts in it.
    file: usize,
    at: u64,
}

/// Encrypted records rustls holds for the socket, at most, per connection.
const TLS_TX_BUF: usize = 256 * 1024;

/// Socket bytes read at once under TLS.
const TLS_RX_BUF: usize = 64 * 1024;

/// One queued piece of the outgoing stream.
enum Out {
    Bytes(Vec<u8>),
    /// `len` bytes of `file` from `offset`, sent by the kernel from the page
    /// cache (`sendfile`) without passing through this process.
    File {
        file: Arc<File>,
        offset: u64,
        len: usize,
    },
}

impl Out {
    fn len(&self) -> usize {
        match self {
            Out::Bytes(b) => b.len(),
            Out::File { len, .. } => *len,
        }
    }
}

/// What [`Conn::read_all`] hands its sink, in order.
pub enum Read<'a> {
    /// The TLS handshake just completed: the key the other end proved
    /// (`None`: it showed no usable certificate). Comes before any bytes.
    Secured(Option<KeyId>),
    Bytes(&'a [u8]),
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
        Conn {
            stream,
            out: VecDeque::new(),
            sent: 0,
            pending: 0,
            closing: false,
            writable_registered: false,
            tls: None,
            secured: false,
            close_sent: false,
            rx: Vec::new(),
            rx_at: 0,
            scratch: Scratch::default(),
        }
    }

    /// A stream still connecting, registered for READABLE | WRITABLE.
    pub fn connecting(stream: TcpStream) -> Conn {
        Conn { writable_registered: true, ..Conn::new(stream) }
    }

    /// Runs the connection under TLS (`tls` fresh: its handshake starts now).
    pub fn with_tls(mut self, tls: impl Into<rustls::Connection>) -> Conn {
        let mut tls = tls.into();
        tls.set_buffer_limit(Some(TLS_TX_BUF));
        self.tls = Some(Box::new(tls));
        self
    }

    /// Once, when the TLS handshake has just completed: the key the other end
    /// proved (`None` inside if it showed no usable certificate).
    pub fn secured(&mut self) -> Option<Option<KeyId>> {
        let tls = self.tls.as_ref()?;
        if self.secured || tls.is_handshaking() {
            return None;
        }
        self.secured = true;
        Some(crate::tls::peer_key(tls.peer_certificates()))
    }

    /// Whether bytes read may be trusted to come from the other end's proven
    /// key (always false for a plain connection).
    pub fn is_secured(&self) -> bool {
        self.secured
    }

    /// Reads everything available, handing each piece to `sink` (after the
    /// end of the TLS handshake, if it ends meanwhile).
    pub fn read_all(&mut self, buf: &mut [u8], mut sink: impl FnMut(Read<'_>)) -> ReadOutcome {
        loop {
            let r = self.read_once(buf);
            if let Some(key) = self.secured() {
                sink(Read::Secured(key));
            }
            match r {
                Ok(n) => sink(Read::Bytes(&buf[..n])),
                Err(outcome) => return outcome,
            }
        }
    }

    /// One read into `buf`: the byte count, or why there is nothing (more)
    /// for now. Retries reads interrupted by a signal.
    pub fn read_once(&mut self, buf: &mut [u8]) -> Result<usize, ReadOutcome> {
        self.read_vectored_once(&mut [io::IoSliceMut::new(buf)])
    }

    /// One read filling `bufs` in order (`readv`), as [`Conn::read_once`].
    /// Under TLS, the plaintext the records read so far hold (into the first
    /// buffer with room).
    pub fn read_vectored_once(&mut self, bufs: &mut [io::IoSliceMut<'_>]) -> Result<usize, ReadOutcome> {
        if self.tls.is_some() {
            let Some(buf) = bufs.iter_mut().find(|b| !b.is_empty()) else { return Ok(0) };
            return self.tls_read(buf);
        }
        loop {
            return match self.stream.read_vectored(bufs) {
                Ok(0) => Err(ReadOutcome::Closed),
                Ok(n) => Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(ReadOutcome::Open),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => Err(ReadOutcome::Closed),
            };
        }
    }

    fn tls_read(&mut self, buf: &mut [u8]) -> Result<usize, ReadOutcome> {
        let tls = self.tls.as_mut().expect("called under TLS");
        // rustls refused more records: fine once (its plaintext buffer is
        // full, and the reader empties it), fatal if nothing can be read.
        let mut refused = false;
        // `buf` is filled from every record already read (a block's data
        // spans several 16 KiB records: one call hands them all over), and
        // the socket is read only when nothing is in hand.
        let mut filled = 0;
        loop {
            match tls.reader().read(&mut buf[filled..]) {
                Ok(0) if filled > 0 => return Ok(filled),
                Ok(0) => return Err(ReadOutcome::Closed),
                Ok(n) => {
                    filled += n;
                    refused = false;
                    if filled == buf.len() {
                        return Ok(filled);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && !refused => {}
                Err(_) if filled > 0 => return Ok(filled),
                Err(_) => return Err(ReadOutcome::Closed),
            }
            if self.rx_at == self.rx.len() {
                if filled > 0 {
                    return Ok(filled);
                }
                // Everything read so far went to rustls: read the socket.
                self.rx.resize(TLS_RX_BUF, 0);
                self.rx_at = 0;
                let got = loop {
                    match self.stream.read(&mut self.rx) {
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        r => break r,
                    }
                };
                match got {
                    Ok(n) => self.rx.truncate(n),
                    Err(e) => {
                        self.rx.clear();
                        return Err(if e.kind() == io::ErrorKind::WouldBlock {
                            ReadOutcome::Open
                        } else {
                            ReadOutcome::Closed
                        });
                    }
                }
                if self.rx.is_empty() {
                    // The other end closed (with or without close_notify).
                    return Err(ReadOutcome::Closed);
                }
            }
            let mut pending = &self.rx[self.rx_at..];
            let before = pending.len();
            match tls.read_tls(&mut pending) {
                Ok(0) => return Err(ReadOutcome::Closed),
                Ok(_) => {
                    self.rx_at += before - pending.len();
                    if let Err(e) = tls.process_new_packets() {
                        tracing::debug!(error = %e, "TLS failed");
                        // Tell the other end why (the alert is queued).
                        let _ = tls.write_tls(&mut self.stream);
                        return Err(ReadOutcome::Closed);
                    }
                }
                Err(_) => refused = true,
            }
        }
    }

    /// Queues a copy of `bytes`; false if the backlog is over its limit.
    pub fn queue(&mut self, bytes: &[u8]) -> bool {
        // Small messages share one buffer, so a burst of them is one write.
        match self.out.back_mut() {
            Some(Out::Bytes(last)) if last.len() < 64 * 1024 => {
                last.extend_from_slice(bytes);
                self.pending += bytes.len();
                self.pending <= MAX_WRITE_BACKLOG
            }
            _ => self.queue_owned(bytes.to_vec()),
        }
    }

    /// Queues a whole frame without copying it.
    pub fn queue_owned(&mut self, frame: Vec<u8>) -> bool {
        self.push(Out::Bytes(frame))
    }

    /// Queues `len` bytes of `file` from `offset`. If the file turns out
    /// shorter, [`Conn::flush`] fails: the stream has promised those bytes.
    pub fn queue_file(&mut self, file: Arc<File>, offset: u64, len: usize) -> bool {
        self.push(Out::File { file, offset, len })
    }

    fn push(&mut self, item: Out) -> bool {
        self.pending += item.len();
        if item.len() > 0 {
            self.out.push_back(item);
        }
        self.pending <= MAX_WRITE_BACKLOG
    }

    /// Bytes queued but not yet written to the socket.
    pub fn backlog(&self) -> usize {
        self.pending
    }

    pub fn has_backlog(&self) -> bool {
        self.backlog() > 0 || self.tls.as_ref().is_some_and(|t| t.wants_write())
    }

    /// Whether the socket has something to take now: TLS records, or bytes
    /// that may be encrypted (not while the handshake runs).
    fn wants_writable(&self) -> bool {
        match &self.tls {
            None => self.pending > 0,
            Some(t) => t.wants_write() || (self.pending > 0 && !t.is_handshaking()),
        }
    }

    /// Accounts `k` bytes written from the front of the queue.
    fn advance(&mut self, mut k: usize) {
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

    /// Writes the frames at the front of the queue, up to the next file range.
    fn write_bytes(&mut self) -> io::Result<usize> {
        let mut slices = [IoSlice::new(&[]); 16];
        let mut n = 0;
        for (i, item) in self.out.iter().take(slices.len()).enumerate() {
            let Out::Bytes(f) = item else { break };
            slices[i] = IoSlice::new(if i == 0 { &f[self.sent..] } else { f });
            n += 1;
        }
        // A file range follows: hold these bytes (a block's header) back so
        // they leave in one segment with the data, not as a tiny packet.
        let more = n < self.out.len();
        send_vectored(&self.stream, &slices[..n], more)
    }

    fn write_file(&mut self) -> io::Result<usize> {
        let Some(Out::File { file, offset, len }) = self.out.front() else { unreachable!("front is a file range") };
        let at = offset + self.sent as u64;
        match send_file(&self.stream, file, at, len - self.sent)? {
            0 => Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the shared file is shorter than expected")),
            k => Ok(k),
        }
    }

    /// Under TLS: encrypts what is queued and writes the records, as far as
    /// the socket takes them.
    fn flush_tls(&mut self) -> io::Result<()> {
        let mut scratch = std::mem::take(&mut self.scratch);
        let r = self.flush_tls_with(&mut scratch);
        self.scratch = scratch;
        r
    }

    fn flush_tls_with(&mut self, scratch: &mut Scratch) -> io::Result<()> {
        use std::io::Write;
        // Records are written once rustls takes no more plaintext (its
        // buffer is full) or nothing is left to encrypt: one `writev` for up
        // to TLS_TX_BUF of records, not one per 64 KiB.
        let mut full = false;
        loop {
            let tls = self.tls.as_mut().expect("called under TLS");
            if tls.wants_write() && (full || self.out.is_empty() || tls.is_handshaking()) {
                match tls.write_tls(&mut self.stream) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(_) => {
                        full = false;
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
            }
            if tls.is_handshaking() {
                if self.closing {
                    // Closed before its handshake ended: what was queued for
                    // it (a refusal) can never be sent.
                    self.out.clear();
                    self.pending = 0;
                    self.sent = 0;
                    *scratch = Scratch::default();
                }
                return Ok(());
            }
            let n = match self.out.front() {
                None => {
                    if self.closing && !self.close_sent {
                        self.close_sent = true;
                        tls.send_close_notify();
                        continue;
                    }
                    return Ok(());
                }
                Some(Out::Bytes(b)) => tls.writer().write(&b[self.sent..])?,
                Some(Out::File { file, offset, len }) => {
                    use std::os::unix::fs::FileExt;
                    let at = offset + self.sent as u64;
                    let id = Arc::as_ptr(file) as usize;
                    if scratch.head == scratch.data.len() || scratch.file != id || scratch.at != at {
                        let want = (len - self.sent).min(64 * 1024);
                        scratch.data.resize(want, 0);
                        let k = file.read_at(&mut scratch.data[..], at)?;
                        if k == 0 {
                            return Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "the shared file is shorter than expected",
                            ));
                        }
                        scratch.data.truncate(k);
                        (scratch.head, scratch.file, scratch.at) = (0, id, at);
                    }
                    let n = tls.writer().write(&scratch.data[scratch.head..])?;
                    scratch.head += n;
                    scratch.at += n as u64;
                    n
                }
            };
            if n == 0 {
                if !self.tls.as_ref().is_some_and(|t| t.wants_write()) {
                    return Ok(());
                }
                full = true;
            }
            self.advance(n);
        }
    }

    /// Writes what the socket takes; keeps WRITABLE interest only while needed.
    pub fn flush(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
        if self.tls.is_some() {
            self.flush_tls()?;
            return self.set_writable(registry, token);
        }
        while let Some(front) = self.out.front() {
            let written = match front {
                Out::Bytes(_) => self.write_bytes(),
                Out::File { .. } => self.write_file(),
            };
            match written {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(k) => self.advance(k),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        self.set_writable(registry, token)
    }

    fn set_writable(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
        let want = self.wants_writable();
        if want != self.writable_registered {
            let interest = if want { Interest::READABLE | Interest::WRITABLE } else { Interest::READABLE };
            registry.reregister(&mut self.stream, token, interest)?;
            self.writable_registered = want;
        }
        Ok(())
    }
}

/// Starts a non-blocking connect to `addr` from `local`'s IP (any port), so
/// the other side sees the address this process serves on; the kernel picks
/// the source when `local` is unspecified, of the other family, or on the
/// other side of loopback (a loopback source cannot reach another host).
pub fn connect_from(local: IpAddr, addr: SocketAddr) -> io::Result<TcpStream> {
    let bind =
        !local.is_unspecified() && local.is_ipv4() == addr.is_ipv4() && local.is_loopback() == addr.ip().is_loopback();
    if !bind {
        return TcpStream::connect(addr);
    }
    use rustix::net::{AddressFamily, SocketFlags, SocketType};
    let family = if addr.is_ipv4() { AddressFamily::INET } else { AddressFamily::INET6 };
    let fd = rustix::net::socket_with(family, SocketType::STREAM, SocketFlags::NONBLOCK | SocketFlags::CLOEXEC, None)?;
    rustix::net::bind(&fd, &SocketAddr::new(local, 0))?;
    match rustix::net::connect(&fd, &addr) {
        Ok(()) | Err(rustix::io::Errno::INPROGRESS) => {}
        Err(e) => return Err(e.into()),
    }
    Ok(TcpStream::from_std(std::net::TcpStream::from(fd)))
}

/// Writes `slices`, telling the kernel more data follows if `more` (Linux:
/// `MSG_MORE`, so a block's header and its data share a segment).
#[cfg(target_os = "linux")]
fn send_vectored(stream: &TcpStream, slices: &[IoSlice<'_>], more: bool) -> io::Result<usize> {
    use rustix::net::{sendmsg, SendAncillaryBuffer, SendFlags};
    let flags = if more { SendFlags::MORE | SendFlags::NOSIGNAL } else { SendFlags::NOSIGNAL };
    Ok(sendmsg(stream, slices, &mut SendAncillaryBuffer::default(), flags)?)
}

#[cfg(not(target_os = "linux"))]
fn send_vectored(mut stream: &TcpStream, slices: &[IoSlice<'_>], _more: bool) -> io::Result<usize> {
    use std::io::Write;
    stream.write_vectored(slices)
}

/// Sends up to `len` bytes of `file` from `offset` on `stream`: Linux's
/// `sendfile`, straight from the page cache; elsewhere a read and a write.
#[cfg(target_os = "linux")]
fn send_file(stream: &TcpStream, file: &File, offset: u64, len: usize) -> io::Result<usize> {
    let mut at = offset;
    Ok(rustix::fs::sendfile(stream, file, Some(&mut at), len)?)
}

#[cfg(not(target_os = "linux"))]
fn send_file(mut stream: &TcpStream, file: &File, offset: u64, len: usize) -> io::Result<usize> {
    use std::io::Write;
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len.min(256 * 1024)];
    let n = file.read_at(&mut buf, offset)?;
    if n == 0 {
        return Ok(0);
    }
    stream.write(&buf[..n])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::Duration;

    /// A connected pair: our non-blocking end (registered) and a blocking peer.
    fn pair() -> (Conn, std::net::TcpStream, mio::Poll) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (ours, _) = listener.accept().unwrap();
        ours.set_nonblocking(true).unwrap();
        let mut stream = TcpStream::from_std(ours);
        let poll = mio::Poll::new().unwrap();
        poll.registry().register(&mut stream, Token(1), Interest::READABLE).unwrap();
        peer.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        (Conn::new(stream), peer, poll)
    }

    fn scratch_file(name: &str, bytes: &[u8]) -> Arc<File> {
        let path = std::env::temp_dir().join(format!("shoal-conn-{}-{name}", std::process::id()));
        std::fs::File::create(&path).unwrap().write_all(bytes).unwrap();
        let f = File::open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        Arc::new(f)
    }

    /// Flushes until the queue is empty or `flush` fails; reads what arrives
    /// meanwhile so the socket never stays full.
    fn pump(
        conn: &mut Conn,
        peer: &mut std::net::TcpStream,
        poll: &mio::Poll,
        want: usize,
    ) -> (Vec<u8>, io::Result<()>) {
        let mut got = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        let result = loop {
            if let Err(e) = conn.flush(poll.registry(), Token(1)) {
                break Err(e);
            }
            if !conn.has_backlog() {
                break Ok(());
            }
            let n = peer.read(&mut buf).unwrap();
            got.extend_from_slice(&buf[..n]);
        };
        while got.len() < want && result.is_ok() {
            let n = peer.read(&mut buf).unwrap();
            assert!(n > 0, "the stream ended early");
            got.extend_from_slice(&buf[..n]);
        }
        (got, result)
    }

    #[test]
    fn frames_and_file_ranges_leave_in_order() {
        let (mut conn, mut peer, poll) = pair();
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let file = scratch_file("ranges", &data);
        let mut want = Vec::new();
        for (i, (offset, len)) in
            [(0usize, 65_536usize), (1_000_001, 700_000), (2_999_990, 10), (5, 0)].into_iter().enumerate()
        {
            let header = vec![i as u8; 3 + i];
            assert!(conn.queue(&header));
            assert!(conn.queue_file(file.clone(), offset as u64, len));
            want.extend_from_slice(&header);
            want.extend_from_slice(&data[offset..offset + len]);
        }
        assert_eq!(conn.backlog(), want.len());
        let (got, result) = pump(&mut conn, &mut peer, &poll, want.len());
        result.unwrap();
        assert_eq!(got.len(), want.len());
        assert!(got == want, "bytes differ");
    }

    #[test]
    fn a_file_shorter_than_its_range_fails_the_flush() {
        let (mut conn, mut peer, poll) = pair();
        let file = scratch_file("short", &[7u8; 1000]);
        assert!(conn.queue_owned(vec![1, 2, 3]));
        assert!(conn.queue_file(file, 500, 1000));
        let (_, result) = pump(&mut conn, &mut peer, &poll, 0);
        assert_eq!(result.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }

    /// Two ends under TLS on one poll: each proves its key, and frames and a
    /// file range cross both ways as plaintext again.
    #[test]
    fn tls_ends_prove_their_keys_and_carry_frames_and_file_ranges() {
        use crate::tls::{server_name, Identity};
        let (a_id, b_id) = (Identity::ephemeral().unwrap(), Identity::ephemeral().unwrap());
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let poll = mio::Poll::new().unwrap();
        let mut ends = Vec::new();
        for (i, s) in [server, client].into_iter().enumerate() {
            s.set_nonblocking(true).unwrap();
            let mut stream = TcpStream::from_std(s);
            poll.registry().register(&mut stream, Token(i), Interest::READABLE).unwrap();
            ends.push(Conn::new(stream));
        }
        let mut b = ends.pop().unwrap();
        let mut a = ends.pop().unwrap();
        a = a.with_tls(rustls::ServerConnection::new(a_id.server_config().unwrap()).unwrap());
        b = b.with_tls(rustls::ClientConnection::new(b_id.client_config().unwrap(), server_name()).unwrap());
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        let file = scratch_file("tls", &data);
        // Queued before the handshake: held until it is done.
        assert!(b.queue(b"hello from b"));
        assert!(b.queue_file(file.clone(), 1000, 200_000));
        assert!(a.queue(b"hello from a"));
        let (mut got_a, mut got_b) = (Vec::new(), Vec::new());
        let (mut key_a, mut key_b) = (None, None);
        let want_a = 12 + 200_000;
        let mut buf = vec![0u8; 1 << 16];
        let mut events = mio::Events::with_capacity(16);
        let mut poll = poll;
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::time::Instant::now() < deadline {
            a.flush(poll.registry(), Token(0)).unwrap();
            b.flush(poll.registry(), Token(1)).unwrap();
            for (c, got) in [(&mut a, &mut got_a), (&mut b, &mut got_b)] {
                loop {
                    match c.read_once(&mut buf) {
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                        Err(ReadOutcome::Open) => break,
                        Err(ReadOutcome::Closed) => panic!("closed"),
                    }
                }
            }
            key_a = key_a.or(a.secured());
            key_b = key_b.or(b.secured());
            if got_a.len() >= want_a && got_b.len() >= 12 {
                break;
            }
            poll.poll(&mut events, Some(Duration::from_millis(100))).unwrap();
        }
        assert_eq!(key_a, Some(Some(b_id.id())), "the server learns the client's key");
        assert_eq!(key_b, Some(Some(a_id.id())), "the client learns the server's key");
        assert_eq!(&got_a[..12], b"hello from b");
        assert!(got_a[12..] == data[1000..201_000], "the file range differs");
        assert_eq!(got_b, b"hello from a");
    }
}
