//! A non-blocking TCP connection with an outgoing buffer, optionally under
//! TLS ([`Conn::with_tls`]): then what is queued is plaintext, encrypted as
//! the socket takes it, and reads return plaintext. A bulk connection
//! ([`Conn::with_tls_bulk`], between peers) leaves rustls once its handshake
//! is done and moves its records through [`crate::records`], in place.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, IoSlice, Read as _};
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::sync::Arc;

use mio::net::TcpStream;
use mio::{Interest, Registry, Token};
use rustls::ContentType;
use shoal_core::identity::KeyId;

use crate::records::{self, Opened, Records, HEADER, MAX_PLAIN, TRAILER};

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
    /// rustls: for the whole connection, or (bulk) for its handshake.
    tls: Option<Box<rustls::Connection>>,
    /// Hand the connection over to [`Records`] once the handshake is done.
    bulk: bool,
    /// A bulk connection past its handshake.
    records: Option<Box<Records>>,
    /// The key a bulk connection's other end proved, until reported.
    proved: Option<Option<KeyId>>,
    /// Whether the end of the TLS handshake was reported ([`Conn::secured`]).
    secured: bool,
    /// Whether our TLS close_notify is queued.
    close_sent: bool,
    /// Under [`Records`]: the other end said close_notify, or sent what does
    /// not open. Reads end.
    rx_done: bool,
    /// Under TLS: bytes read from the socket and not yet taken.
    rx: RxBuf,
    /// Of a bulk handshake's record being fed to rustls, the bytes not yet
    /// fed: rustls is given whole records only, so the records after the
    /// handshake stay here for [`Records`].
    hs_left: usize,
    /// Under [`Records`]: sealed records not yet written, `tx[tx_at..tx_end]`
    /// (`tx` is allocated once, [`TLS_TX_BUF`]: file bytes are read into it,
    /// never zeroed first).
    tx: Vec<u8>,
    tx_at: usize,
    tx_end: usize,
    /// Under rustls: file bytes read and not yet taken by rustls, reused:
    /// `scratch.data[head..]` are the file's bytes from `at` on.
    scratch: Scratch,
}

/// Bytes read from the socket, `buf[at..end]`, read in large pieces (rustls
/// would read at most 4 KiB a call: 16 times the system calls for a block
/// stream). Under [`Records`], `plain` is an opened record's data not yet
/// handed over, inside `buf[..at]`.
#[derive(Default)]
struct RxBuf {
    buf: Vec<u8>,
    at: usize,
    end: usize,
    plain: Range<usize>,
}

impl RxBuf {
    fn has(&self) -> &[u8] {
        &self.buf[self.at..self.end]
    }

    /// Reads what the socket has after what is held, moving what is held to
    /// the front when little room is left (at most a part of one record:
    /// everything before it was taken). Only with `plain` empty.
    fn fill(&mut self, mut stream: &TcpStream, size: usize) -> Result<(), ReadOutcome> {
        if self.buf.len() < size {
            self.buf.resize(size, 0);
        }
        self.plain = 0..0;
        if self.at == self.end {
            (self.at, self.end) = (0, 0);
        } else if self.buf.len() - self.end < size / 4 {
            self.buf.copy_within(self.at..self.end, 0);
            (self.at, self.end) = (0, self.end - self.at);
        }
        loop {
            return match stream.read(&mut self.buf[self.end..]) {
                // The other end closed (with or without close_notify).
                Ok(0) => Err(ReadOutcome::Closed),
                Ok(n) => {
                    self.end += n;
                    Ok(())
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(ReadOutcome::Open),
                Err(_) => Err(ReadOutcome::Closed),
            };
        }
    }
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

/// Encrypted records held for the socket, at most, per connection (rustls's
/// buffer, or ours under [`Records`]): one write takes them all.
const TLS_TX_BUF: usize = 256 * 1024;

/// Socket bytes read at once under TLS: a bulk connection's, and a control
/// connection's (a tracker holds thousands of those; their messages are
/// small).
const BULK_RX_BUF: usize = 128 * 1024;
const CONTROL_RX_BUF: usize = 16 * 1024;

/// Most file ranges read by one `preadv` into the records being sealed.
const MAX_SPANS: usize = 16;

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

fn short_file() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "the shared file is shorter than expected")
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
            bulk: false,
            records: None,
            proved: None,
            secured: false,
            close_sent: false,
            rx_done: false,
            rx: RxBuf::default(),
            hs_left: 0,
            tx: Vec::new(),
            tx_at: 0,
            tx_end: 0,
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

    /// Runs the connection under TLS, and past the handshake under
    /// [`Records`]: `tls` must come from a configuration that allows its
    /// secrets out and sends no tickets ([`crate::tls::Identity::peer_server_config`],
    /// [`crate::tls::Identity::peer_client_config`]); else the connection
    /// fails once its handshake is done.
    pub fn with_tls_bulk(self, tls: impl Into<rustls::Connection>) -> Conn {
        Conn { bulk: true, ..self.with_tls(tls) }
    }

    /// Once, when the TLS handshake has just completed: the key the other end
    /// proved (`None` inside if it showed no usable certificate).
    pub fn secured(&mut self) -> Option<Option<KeyId>> {
        if self.secured {
            return None;
        }
        if let Some(key) = self.proved.take() {
            self.secured = true;
            return Some(key);
        }
        let tls = self.tls.as_ref()?;
        if tls.is_handshaking() || self.bulk {
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
        if self.tls.is_some() || self.records.is_some() {
            let Some(buf) = bufs.iter_mut().find(|b| !b.is_empty()) else { return Ok(0) };
            return if self.records.is_some() { self.records_read(buf) } else { self.tls_read(buf) };
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

    fn rx_size(&self) -> usize {
        if self.bulk {
            BULK_RX_BUF
        } else {
            CONTROL_RX_BUF
        }
    }

    fn tls_read(&mut self, buf: &mut [u8]) -> Result<usize, ReadOutcome> {
        let size = self.rx_size();
        let Some(tls) = self.tls.as_mut() else { return Err(ReadOutcome::Closed) };
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
            // What rustls may take now: all that is in hand, or for a bulk
            // handshake up to the end of the record it is at.
            let has = self.rx.has();
            let take = if !self.bulk {
                has.len()
            } else if self.hs_left > 0 {
                self.hs_left.min(has.len())
            } else if let [_, _, _, hi, lo, ..] = *has {
                self.hs_left = HEADER + usize::from(u16::from_be_bytes([hi, lo]));
                self.hs_left.min(has.len())
            } else {
                0
            };
            if take == 0 {
                if filled > 0 {
                    return Ok(filled);
                }
                self.rx.fill(&self.stream, size)?;
                continue;
            }
            let mut pending = &self.rx.has()[..take];
            match tls.read_tls(&mut pending) {
                Ok(0) => return Err(ReadOutcome::Closed),
                Ok(n) => {
                    self.rx.at += n;
                    self.hs_left = self.hs_left.saturating_sub(n);
                    if let Err(e) = tls.process_new_packets() {
                        tracing::debug!(error = %e, "TLS failed");
                        // Tell the other end why (the alert is queued).
                        let _ = tls.write_tls(&mut self.stream);
                        return Err(ReadOutcome::Closed);
                    }
                    if self.bulk && !tls.is_handshaking() {
                        self.hand_over()?;
                        return if filled > 0 { Ok(filled) } else { self.records_read(buf) };
                    }
                }
                Err(_) => refused = true,
            }
        }
    }

    /// A bulk connection's handshake just ended: its keys go to [`Records`],
    /// and rustls's last handshake records (a client's Finished) out ahead
    /// of anything sealed after.
    fn hand_over(&mut self) -> Result<(), ReadOutcome> {
        let Some(tls) = self.tls.take() else { return Err(ReadOutcome::Closed) };
        let mut tls = *tls;
        let key = crate::tls::peer_key(tls.peer_certificates());
        let Some(suite) = tls.negotiated_cipher_suite() else { return Err(ReadOutcome::Closed) };
        let mut last = Vec::new();
        while tls.wants_write() {
            if tls.write_tls(&mut last).is_err() {
                return Err(ReadOutcome::Closed);
            }
        }
        self.tx = vec![0; TLS_TX_BUF.max(last.len())];
        self.tx[..last.len()].copy_from_slice(&last);
        (self.tx_at, self.tx_end) = (0, last.len());
        let layer =
            tls.dangerous_extract_secrets().map_err(records::RecordError::Open).and_then(|s| Records::new(suite, s));
        match layer {
            Ok(layer) => {
                self.records = Some(Box::new(layer));
                self.proved = Some(key);
                Ok(())
            }
            Err(e) => {
                tracing::warn!(error = %e, "peer connection cannot leave rustls after its handshake");
                Err(ReadOutcome::Closed)
            }
        }
    }

    /// Under [`Records`]: `buf` filled from the records in hand, the socket
    /// read only when none is.
    fn records_read(&mut self, buf: &mut [u8]) -> Result<usize, ReadOutcome> {
        let size = self.rx_size();
        let mut filled = 0;
        loop {
            let rx = &mut self.rx;
            if !rx.plain.is_empty() {
                let k = rx.plain.len().min(buf.len() - filled);
                buf[filled..filled + k].copy_from_slice(&rx.buf[rx.plain.start..rx.plain.start + k]);
                rx.plain.start += k;
                filled += k;
                if filled == buf.len() {
                    return Ok(filled);
                }
                continue;
            }
            if self.rx_done {
                return if filled > 0 { Ok(filled) } else { Err(ReadOutcome::Closed) };
            }
            let Some(layer) = self.records.as_mut() else { return Err(ReadOutcome::Closed) };
            match layer.open(&mut rx.buf[rx.at..rx.end]) {
                Ok(Some((used, Opened::Data(r)))) => {
                    rx.plain = rx.at + r.start..rx.at + r.end;
                    rx.at += used;
                }
                Ok(Some((_, Opened::CloseNotify))) => self.rx_done = true,
                Ok(None) if filled > 0 => return Ok(filled),
                Ok(None) => rx.fill(&self.stream, size)?,
                Err(e) => {
                    tracing::debug!(error = %e, "peer records refused");
                    self.rx_done = true;
                }
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
        self.backlog() > 0 || self.tx_at < self.tx_end || self.tls.as_ref().is_some_and(|t| t.wants_write())
    }

    /// Whether the socket has something to take now: TLS records, or bytes
    /// that may be encrypted (not while the handshake runs).
    fn wants_writable(&self) -> bool {
        match &self.tls {
            None => self.pending > 0 || self.tx_at < self.tx_end,
            Some(t) => t.wants_write() || (self.pending > 0 && !t.is_handshaking()),
        }
    }

    /// Accounts `k` bytes written from the front of the queue.
    fn advance(&mut self, k: usize) {
        advance(&mut self.out, &mut self.sent, &mut self.pending, k);
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
            0 => Err(short_file()),
            k => Ok(k),
        }
    }

    /// Under [`Records`]: writes the sealed records, seals what is queued
    /// when they are all out, as far as the socket takes them.
    fn flush_records(&mut self) -> io::Result<()> {
        use std::io::Write;
        loop {
            if self.tx_at < self.tx_end {
                match (&self.stream).write(&self.tx[self.tx_at..self.tx_end]) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(n) => self.tx_at += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
                continue;
            }
            (self.tx_at, self.tx_end) = (0, 0);
            let Some(mut layer) = self.records.take() else { return Ok(()) };
            let mut tx = std::mem::take(&mut self.tx);
            let mut end = 0;
            let r = if !self.out.is_empty() {
                self.seal_queued(&mut layer, &mut tx, &mut end)
            } else if self.closing && !self.close_sent {
                self.close_sent = true;
                layer
                    .seal_copy(&mut tx, 0, &records::CLOSE_NOTIFY, ContentType::Alert)
                    .map(|n| end = n)
                    .map_err(io::Error::other)
            } else {
                Ok(())
            };
            self.records = Some(layer);
            self.tx = tx;
            self.tx_end = end;
            r?;
            if end == 0 {
                return Ok(());
            }
        }
    }

    /// Seals what is queued into records in `tx` (from its start, `end`
    /// bytes so far), up to [`TLS_TX_BUF`] of them. A file's bytes are read
    /// straight into the records that carry them, one `preadv` for up to
    /// [`MAX_SPANS`].
    fn seal_queued(&mut self, layer: &mut Records, tx: &mut [u8], end: &mut usize) -> io::Result<()> {
        let full = HEADER + MAX_PLAIN + TRAILER;
        while !self.out.is_empty() && *end + full <= tx.len() {
            // The record being filled: its start, its plaintext so far.
            let mut start = *end;
            let mut n = 0;
            *end += HEADER;
            while n < MAX_PLAIN {
                let room = MAX_PLAIN - n;
                match self.out.front() {
                    None => break,
                    Some(Out::Bytes(b)) => {
                        let take = room.min(b.len() - self.sent);
                        tx[*end..*end + take].copy_from_slice(&b[self.sent..self.sent + take]);
                        *end += take;
                        n += take;
                        self.advance(take);
                    }
                    Some(Out::File { file, offset, len }) => {
                        // This record's room, then whole records while the
                        // range and the buffer last: (data start, length).
                        let left = len - self.sent;
                        let at = offset + self.sent as u64;
                        let mut spans = [(0usize, 0usize); MAX_SPANS];
                        let first = room.min(left);
                        spans[0] = (*end, first);
                        let (mut stop, mut want, mut count) = (*end + first, first, 1);
                        while count < MAX_SPANS && want < left && stop + TRAILER + full <= tx.len() {
                            let l = MAX_PLAIN.min(left - want);
                            let s = stop + TRAILER + HEADER;
                            spans[count] = (s, l);
                            (stop, want, count) = (s + l, want + l, count + 1);
                        }
                        let file = file.clone();
                        let got = read_spans(&file, tx, &spans[..count], at)?;
                        if got == 0 {
                            return Err(short_file());
                        }
                        self.advance(got);
                        // Every record the read filled is sealed but the one
                        // it ended in, which gathers on.
                        let mut left_got = got;
                        for (i, &(s, l)) in spans[..count].iter().enumerate() {
                            let k = l.min(left_got);
                            left_got -= k;
                            let (rec, rec_n) = if i == 0 { (start, n + k) } else { (s - HEADER, k) };
                            if left_got == 0 {
                                *end = s + k;
                                (start, n) = (rec, rec_n);
                                break;
                            }
                            layer.seal(tx, rec, rec_n, ContentType::ApplicationData).map_err(io::Error::other)?;
                        }
                    }
                }
            }
            layer.seal(tx, start, n, ContentType::ApplicationData).map_err(io::Error::other)?;
            *end = start + HEADER + n + TRAILER;
        }
        Ok(())
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
            let Some(tls) = self.tls.as_mut() else { return Ok(()) };
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
                            return Err(short_file());
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
        if self.records.is_some() {
            self.flush_records()?;
            return self.set_writable(registry, token);
        }
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

/// Accounts `k` bytes written (or sealed) from the front of `out`.
fn advance(out: &mut VecDeque<Out>, sent: &mut usize, pending: &mut usize, mut k: usize) {
    *pending -= k;
    while k > 0 {
        let Some(front) = out.front() else { return };
        let left = front.len() - *sent;
        if k >= left {
            k -= left;
            out.pop_front();
            *sent = 0;
        } else {
            *sent += k;
            k = 0;
        }
    }
}

/// Reads `file` from `at` into `tx`'s `spans` (start, length; in order, not
/// overlapping), as one `preadv`: the bytes read, filling the spans in turn.
#[cfg(target_os = "linux")]
fn read_spans(file: &File, tx: &mut [u8], spans: &[(usize, usize)], at: u64) -> io::Result<usize> {
    let mut slices: [io::IoSliceMut<'_>; MAX_SPANS] = std::array::from_fn(|_| io::IoSliceMut::new(&mut []));
    let (mut rest, mut pos) = (tx, 0);
    for (slot, &(s, l)) in slices.iter_mut().zip(spans) {
        let (_, tail) = std::mem::take(&mut rest).split_at_mut(s - pos);
        let (span, tail) = tail.split_at_mut(l);
        *slot = io::IoSliceMut::new(span);
        (rest, pos) = (tail, s + l);
    }
    loop {
        match rustix::io::preadv(file, &mut slices[..spans.len()], at) {
            Err(rustix::io::Errno::INTR) => continue,
            r => return Ok(r?),
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn read_spans(file: &File, tx: &mut [u8], spans: &[(usize, usize)], mut at: u64) -> io::Result<usize> {
    use std::os::unix::fs::FileExt;
    let mut got = 0;
    for &(s, l) in spans {
        let k = file.read_at(&mut tx[s..s + l], at)?;
        got += k;
        at += k as u64;
        if k < l {
            break;
        }
    }
    Ok(got)
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

    /// Two ends under TLS on one poll, each under rustls throughout or
    /// (bulk) under [`Records`] after the handshake: each proves its key,
    /// and frames and file ranges cross both ways as plaintext again.
    fn tls_exchange(bulk_server: bool, bulk_client: bool) {
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
        // A bulk end's configuration lets its secrets out; the other end's
        // is the ordinary one (a bulk end meets plain rustls on the wire).
        a = if bulk_server {
            a.with_tls_bulk(rustls::ServerConnection::new(a_id.peer_server_config().unwrap()).unwrap())
        } else {
            let cfg = if bulk_client { a_id.peer_server_config() } else { a_id.server_config() };
            a.with_tls(rustls::ServerConnection::new(cfg.unwrap()).unwrap())
        };
        b = if bulk_client {
            b.with_tls_bulk(rustls::ClientConnection::new(b_id.peer_client_config().unwrap(), server_name()).unwrap())
        } else {
            b.with_tls(rustls::ClientConnection::new(b_id.client_config().unwrap(), server_name()).unwrap())
        };
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
        let file = scratch_file(&format!("tls-{bulk_server}-{bulk_client}"), &data);
        // Queued before the handshake: held until it is done. Frames and
        // ranges of lengths that end inside records, on their boundaries,
        // and span many.
        let mut want_a = Vec::new();
        let ranges = [(1000usize, 200_000usize), (7, 1), (16_384, 3 * 16_384 + 5), (123_457, 0), (200_001, 1_700_000)];
        for (i, &(offset, len)) in ranges.iter().enumerate() {
            let frame = vec![i as u8 + 1; 3 + 17 * i];
            assert!(b.queue(&frame));
            assert!(b.queue_file(file.clone(), offset as u64, len));
            want_a.extend_from_slice(&frame);
            want_a.extend_from_slice(&data[offset..offset + len]);
        }
        assert!(b.queue(b"the end"));
        want_a.extend_from_slice(b"the end");
        assert!(a.queue(b"hello from a"));
        assert!(a.queue_file(file.clone(), 5, 40_000));
        let mut want_b = b"hello from a".to_vec();
        want_b.extend_from_slice(&data[5..40_005]);
        let (mut got_a, mut got_b) = (Vec::new(), Vec::new());
        let (mut key_a, mut key_b) = (None, None);
        let mut buf = vec![0u8; 100_000];
        let mut events = mio::Events::with_capacity(16);
        let mut poll = poll;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
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
            if got_a.len() >= want_a.len() && got_b.len() >= want_b.len() {
                break;
            }
            poll.poll(&mut events, Some(Duration::from_millis(100))).unwrap();
        }
        assert_eq!(key_a, Some(Some(b_id.id())), "the server learns the client's key");
        assert_eq!(key_b, Some(Some(a_id.id())), "the client learns the server's key");
        assert_eq!(got_a.len(), want_a.len());
        assert!(got_a == want_a, "the client's frames and ranges differ");
        assert!(got_b == want_b, "the server's frames and range differ");
        assert_eq!((a.records.is_some(), b.records.is_some()), (bulk_server, bulk_client), "who left rustls");
        // A close: close_notify, then the other end reads the end.
        b.closing = true;
        b.flush(poll.registry(), Token(1)).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match a.read_once(&mut buf) {
                Ok(_) => panic!("nothing more was sent"),
                Err(ReadOutcome::Closed) => break,
                Err(ReadOutcome::Open) => {
                    assert!(std::time::Instant::now() < deadline, "the close never arrived");
                    poll.poll(&mut events, Some(Duration::from_millis(100))).unwrap();
                }
            }
        }
    }

    #[test]
    fn tls_ends_prove_their_keys_and_carry_frames_and_file_ranges() {
        tls_exchange(false, false);
    }

    #[test]
    fn bulk_ends_carry_the_same_streams_in_place() {
        tls_exchange(true, true);
    }

    /// A bulk end's records are TLS 1.3's: plain rustls reads and writes them.
    #[test]
    fn a_bulk_end_and_plain_rustls_understand_each_other() {
        tls_exchange(true, false);
        tls_exchange(false, true);
    }

    #[test]
    fn a_file_shorter_than_its_range_fails_a_bulk_flush() {
        use crate::tls::{server_name, Identity};
        let id = Identity::ephemeral().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let peer = std::thread::spawn(move || {
            let (sock, _) = listener.accept().unwrap();
            sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let server = rustls::ServerConnection::new(Identity::ephemeral().unwrap().peer_server_config().unwrap());
            let mut s = rustls::StreamOwned::new(server.unwrap(), sock);
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink);
        });
        let std_stream = std::net::TcpStream::connect(addr).unwrap();
        std_stream.set_nonblocking(true).unwrap();
        let mut stream = TcpStream::from_std(std_stream);
        let mut poll = mio::Poll::new().unwrap();
        poll.registry().register(&mut stream, Token(1), Interest::READABLE).unwrap();
        let mut c = Conn::connecting(stream)
            .with_tls_bulk(rustls::ClientConnection::new(id.peer_client_config().unwrap(), server_name()).unwrap());
        let file = scratch_file("bulk-short", &[7u8; 1000]);
        assert!(c.queue_owned(vec![1, 2, 3]));
        assert!(c.queue_file(file, 500, 1000));
        let mut events = mio::Events::with_capacity(4);
        let mut buf = [0u8; 1024];
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let err = loop {
            assert!(std::time::Instant::now() < deadline, "the flush never failed");
            if let Err(e) = c.flush(poll.registry(), Token(1)) {
                break e;
            }
            let _ = c.read_once(&mut buf);
            poll.poll(&mut events, Some(Duration::from_millis(100))).unwrap();
        };
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        drop(c);
        peer.join().unwrap();
    }
}
