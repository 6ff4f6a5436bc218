//! The cost of a peer connection's data path alone, for `examples/tls_path`:
//! one thread moves a file through two connected [`Conn`]s on loopback, a
//! sharer's (a 20-byte header, then a 128 KiB block read from the file, as
//! the peer protocol sends them) and a downloader's (read into a 512 KiB
//! buffer, as into a chunk), and reports the CPU time both ends took. No
//! hashing, no disk writes, no engine: what differs between plaintext
//! (`sendfile`), rustls throughout, and rustls for the handshake then
//! [`crate::records`].

use std::fs::File;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use crate::conn::{Conn, ReadOutcome};
use crate::tls::{server_name, Identity};

/// How the two ends talk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathKind {
    Plaintext,
    Rustls,
    Records,
}

/// Sends `bytes` of `file` (from its start, wrapping) through a connection
/// of `kind`: the CPU seconds this process spent, and the wall time.
pub fn run(kind: PathKind, file: &Arc<File>, file_len: u64, bytes: u64) -> io::Result<(f64, Duration)> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let client = std::net::TcpStream::connect(listener.local_addr()?)?;
    let (server, _) = listener.accept()?;
    let mut poll = Poll::new()?;
    let mut ends = Vec::new();
    for (i, s) in [server, client].into_iter().enumerate() {
        s.set_nonblocking(true)?;
        s.set_nodelay(true)?;
        let mut stream = TcpStream::from_std(s);
        poll.registry().register(&mut stream, Token(i), Interest::READABLE)?;
        ends.push(Conn::new(stream));
    }
    let (mut down, mut up) = (ends.pop().ok_or(io::ErrorKind::Other)?, ends.pop().ok_or(io::ErrorKind::Other)?);
    let tls_err = |e: crate::tls::IdentityError| io::Error::other(e.to_string());
    let (a, b) = (Identity::ephemeral().map_err(tls_err)?, Identity::ephemeral().map_err(tls_err)?);
    match kind {
        PathKind::Plaintext => {}
        PathKind::Rustls => {
            up = up.with_tls(
                rustls::ServerConnection::new(a.server_config().map_err(tls_err)?).map_err(io::Error::other)?,
            );
            let cfg = b.client_config().map_err(tls_err)?;
            down = down.with_tls(rustls::ClientConnection::new(cfg, server_name()).map_err(io::Error::other)?);
        }
        PathKind::Records => {
            let cfg = a.peer_server_config().map_err(tls_err)?;
            up = up.with_tls_bulk(rustls::ServerConnection::new(cfg).map_err(io::Error::other)?);
            let cfg = b.peer_client_config().map_err(tls_err)?;
            down = down.with_tls_bulk(rustls::ClientConnection::new(cfg, server_name()).map_err(io::Error::other)?);
        }
    }
    const BLOCK: u64 = 128 * 1024;
    let blocks = bytes / BLOCK;
    let mut queued = 0u64;
    let mut got = 0u64;
    let want = blocks * (BLOCK + 20);
    let mut buf = vec![0u8; 512 * 1024];
    let mut events = Events::with_capacity(8);
    let cpu0 = cpu_secs();
    let t0 = Instant::now();
    while got < want {
        let before = (got, up.backlog());
        // Keep about 1 MiB queued, as a serving peer does.
        while queued < blocks && up.backlog() < (1 << 20) {
            let offset = (queued * BLOCK) % (file_len - BLOCK + 1);
            up.queue(&[7u8; 20]);
            up.queue_file(file.clone(), offset, BLOCK as usize);
            queued += 1;
        }
        up.flush(poll.registry(), Token(0))?;
        down.flush(poll.registry(), Token(1))?;
        loop {
            match down.read_once(&mut buf) {
                Ok(n) => got += n as u64,
                Err(ReadOutcome::Open) => break,
                Err(ReadOutcome::Closed) => return Err(io::ErrorKind::UnexpectedEof.into()),
            }
        }
        // The sharer reads its side too (a TLS handshake answers there).
        loop {
            match up.read_once(&mut buf) {
                Ok(_) => {}
                Err(ReadOutcome::Open) => break,
                Err(ReadOutcome::Closed) => return Err(io::ErrorKind::UnexpectedEof.into()),
            }
        }
        // Wait for the sockets only when this turn moved nothing.
        if got < want && (got, up.backlog()) == before {
            poll.poll(&mut events, Some(Duration::from_millis(50)))?;
        }
    }
    Ok((cpu_secs() - cpu0, t0.elapsed()))
}

/// This process's CPU time (user and system), in seconds.
fn cpu_secs() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else { return 0.0 };
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    (ticks(11) + ticks(12)) as f64 / 100.0
}
