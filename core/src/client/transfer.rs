//! The engine's peer side: running downloads and serving chunks.
//!
//! Serving: an incoming connection says `Hello`, then `Want` with a grant; the
//! engine asks its tracker whether the grant is a member's for that file and
//! only then sends its chunk map. Block requests are queued (at most
//! [`MAX_QUEUED_REQUESTS`] per connection) and turned into disk reads only while
//! the connection's unsent backlog is under [`SEND_HIGH_WATER`], so a slow
//! downloader cannot make this client buffer without bound.

use std::collections::VecDeque;
use std::net::SocketAddr;

use super::{ClientEngine, ClientOutput, Purpose, Ticket};
use crate::chunk::{FileDigest, FileMeta, Sha1Digest};
use crate::client::download::{chunk_offset, Download, DownloadOutput, PeerConnId};
use crate::client::peer::{valid_block, Bitmap, Grant, Load, PeerMessage, MAX_PEER_FRAME, MAX_QUEUED_REQUESTS};
use crate::ids::{FileName, GroupId};
use crate::proto::{Reply, Request, Role, PROTOCOL_VERSION};
use crate::rng::Rng;
use crate::shell::ShellError;
use crate::time::Millis;
use crate::wire::{encode, FrameDecoder};

/// Most peers this client serves at once.
pub const MAX_UPLOAD_CONNECTIONS: usize = 64;
/// Unsent bytes on an upload connection above which no more blocks are read.
pub const SEND_HIGH_WATER: usize = 1 << 20;
/// Most receive space offered per read into a download connection's frame
/// decoder (for a long non-block frame such as a large chunk map).
const PEER_RECV_WINDOW: usize = 256 * 1024;
/// Receive space offered for what follows a block's data: enough for the
/// next block's header (and a short message or two), so that the next
/// block's data is read into its chunk rather than copied there.
const HEAD_WINDOW: usize = 64;
/// Receive space offered per read on a serving connection (requests are small).
const SERVE_RECV_WINDOW: usize = 16 * 1024;
/// Connection ids of outgoing (download) connections have this bit set; the
/// driver numbers accepted connections below it.
pub const OUTGOING: u64 = 1 << 62;
/// How often download rates are sampled, progress saved and upload
/// connections' deadlines checked.
const TICK: Millis = Millis(500);
/// An incoming peer connection must name a file it may fetch within this time.
pub const PEER_HANDSHAKE_TIMEOUT: Millis = Millis(10_000);
/// An upload connection with nothing asked of it for this long is closed.
pub const PEER_IDLE_TIMEOUT: Millis = Millis(120_000);

/// A download of this client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DownloadId(pub u64);

/// What the driver found on disk for a download.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prepared {
    /// Where the file will get its name once its SHA1 matches.
    pub final_path: String,
    pub part_path: String,
    /// Chunks already on disk and re-verified.
    pub have: Bitmap,
}

pub(super) struct Shared {
    pub path: String,
    pub size: u64,
    pub sha1: Sha1Digest,
    pub have: Bitmap,
}

enum DlState {
    Preparing { sharers: Vec<SocketAddr>, grant: Grant },
    Running(Box<Download>),
    Finishing,
    Complete,
    Failed(String),
}

pub(super) struct DownloadEntry {
    group: GroupId,
    name: FileName,
    digest: FileDigest,
    ticket: Option<Ticket>,
    state: DlState,
    final_path: String,
    /// (time, verified bytes) at the last rate sample, and the rate then.
    mark: (Millis, u64),
    rate: u64,
    dirty: bool,
    /// Whether the tracker was told this client holds part of the file:
    /// it records partial holders, not chunks, so once is enough (a new
    /// tracker after a failover is told again).
    announced: bool,
    sources_pending: bool,
    supplied: Vec<(SocketAddr, u64)>,
    started: Millis,
    finished: Option<Millis>,
}

enum UpState {
    AwaitHello,
    AwaitWant,
    Checking(GroupId, FileName),
    Serving(GroupId, FileName),
}

pub(super) struct Upload {
    opened: Millis,
    last_seen: Millis,
    decoder: FrameDecoder,
    state: UpState,
    queue: VecDeque<(u32, u32, u32)>,
    /// Lengths of the block reads asked of the driver and not yet sent, oldest first.
    reading: VecDeque<u32>,
    /// Unsent bytes on the socket, as the driver last reported.
    backlog: usize,
}

pub(super) enum PeerLink {
    Out {
        download: DownloadId,
        decoder: FrameDecoder,
        /// The block whose data is being received straight into its chunk.
        stream: Option<BlockStream>,
    },
    In(Box<Upload>),
}

/// A block whose header has been read and whose data arrives next.
#[derive(Clone, Copy, Debug)]
pub(super) struct BlockStream {
    chunk: u32,
    /// Where the next data byte goes in the chunk.
    offset: u32,
    load: Load,
    /// Data bytes still to come.
    left: u32,
    /// The chunk no longer wants them (its fetch was cancelled meanwhile):
    /// they are read and dropped.
    discard: bool,
}

/// A snapshot of a download, for programs that embed the client (demo, bench).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DownloadStat {
    pub group: GroupId,
    pub name: FileName,
    pub size: u64,
    pub verified: u64,
    pub complete: bool,
    pub failed: Option<String>,
    /// Verified bytes per source peer.
    pub supplied: Vec<(SocketAddr, u64)>,
    pub elapsed: Millis,
}

impl ClientEngine {
    // ---- getters ----

    /// Whether a download is still running (the piped shell waits for them).
    pub fn downloads_running(&self) -> bool {
        self.downloads
            .values()
            .any(|d| matches!(d.state, DlState::Preparing { .. } | DlState::Running(_) | DlState::Finishing))
    }

    pub fn download_stats(&self, now: Millis) -> Vec<DownloadStat> {
        self.downloads
            .values()
            .map(|d| {
                let (verified, supplied) = match &d.state {
                    DlState::Running(dl) => (dl.verified_bytes(), dl.supplied().collect()),
                    DlState::Finishing | DlState::Complete => (d.digest.size, d.supplied.clone()),
                    _ => (0, d.supplied.clone()),
                };
                DownloadStat {
                    group: d.group.clone(),
                    name: d.name.clone(),
                    size: d.digest.size,
                    verified,
                    complete: matches!(d.state, DlState::Complete),
                    failed: if let DlState::Failed(e) = &d.state { Some(e.clone()) } else { None },
                    supplied,
                    elapsed: d.finished.unwrap_or(now).since(d.started),
                }
            })
            .collect()
    }

    fn load(&self) -> Load {
        let mut l = Load::default();
        for p in self.peers.values() {
            if let PeerLink::In(u) = p {
                if matches!(u.state, UpState::Serving(..)) {
                    l.uploads = l.uploads.saturating_add(1);
                    l.queued = l.queued.saturating_add(u.queue.len() as u16);
                }
            }
        }
        l
    }

    // ---- shell side ----

    pub(super) fn show_downloads(&self) -> Vec<String> {
        if self.downloads.is_empty() {
            return vec!["no downloads".into()];
        }
        self.downloads
            .values()
            .map(|d| {
                let (g, n) = (&d.group, &d.name);
                match &d.state {
                    DlState::Preparing { .. } => format!("[D] {g} {n} 0% 0 MB/s 0 peers"),
                    DlState::Running(dl) => {
                        let pct = (dl.verified_bytes() * 100).checked_div(d.digest.size).unwrap_or(100);
                        format!("[D] {g} {n} {pct}% {:.0} MB/s {} peers", d.rate as f64 / 1e6, dl.active_peers())
                    }
                    DlState::Finishing => format!("[D] {g} {n} 100% verifying"),
                    DlState::Complete => format!("[C] {g} {n}"),
                    DlState::Failed(e) => format!("[F] {g} {n} {e}"),
                }
            })
            .collect()
    }

    /// Why `download_file` for this file cannot start, if it cannot.
    pub(super) fn download_conflict(&self, group: &GroupId, name: &FileName) -> Option<String> {
        let running = self.downloads.values().any(|d| {
            &d.group == group
                && &d.name == name
                && matches!(d.state, DlState::Preparing { .. } | DlState::Running(_) | DlState::Finishing)
        });
        if running {
            return Some(format!("{name} from {group} is already being downloaded"));
        }
        if self.shares.contains_key(&(group.clone(), name.clone())) {
            return Some(format!("this client already has {name} of {group}"));
        }
        None
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn start_download(
        &mut self,
        ticket: Ticket,
        group: GroupId,
        name: FileName,
        dest: String,
        digest: FileDigest,
        sharers: Vec<SocketAddr>,
        grant: Grant,
        now: Millis,
    ) {
        let id = DownloadId(self.next_download);
        self.next_download += 1;
        self.out.push_back(ClientOutput::PrepareDownload { id, dest, name: name.clone(), digest: digest.clone() });
        self.downloads.insert(
            id,
            DownloadEntry {
                group,
                name,
                digest,
                ticket: Some(ticket),
                state: DlState::Preparing { sharers, grant },
                final_path: String::new(),
                mark: (now, 0),
                rate: 0,
                dirty: false,
                announced: false,
                sources_pending: false,
                supplied: Vec::new(),
                started: now,
                finished: None,
            },
        );
    }

    // ---- disk results ----

    pub fn handle_download_prepared(&mut self, id: DownloadId, result: Result<Prepared, String>, now: Millis) {
        let Some(e) = self.downloads.get_mut(&id) else { return };
        let DlState::Preparing { sharers, grant } = std::mem::replace(&mut e.state, DlState::Finishing) else {
            return;
        };
        let ticket = e.ticket.take();
        let p = match result {
            Ok(p) => p,
            Err(err) => {
                e.state = DlState::Failed(err.clone());
                e.finished = Some(now);
                if let Some(ticket) = ticket {
                    self.out.push_back(ClientOutput::Done { ticket, result: Err(ShellError::Local(err)) });
                }
                return;
            }
        };
        e.final_path = p.final_path.clone();
        let n = e.digest.chunks.len();
        let already = p.have.count();
        let line = if already > 0 {
            format!(
                "resuming {} into {}: {already} of {n} chunks already here, {} sources",
                e.name,
                p.final_path,
                sharers.len()
            )
        } else {
            format!(
                "downloading {} into {} ({} bytes, {n} chunks, {} sources)",
                e.name,
                p.final_path,
                e.digest.size,
                sharers.len()
            )
        };
        let key = (e.group.clone(), e.name.clone());
        let shared = Shared { path: p.part_path, size: e.digest.size, sha1: e.digest.sha1, have: p.have.clone() };
        let dl = Download::new(
            self.cfg.download.clone(),
            e.group.clone(),
            e.name.clone(),
            e.digest.clone(),
            grant,
            p.have,
            OUTGOING | (id.0 << 24),
            Rng::from_u64(self.rng.next_u64()),
            now,
        );
        e.mark = (now, dl.verified_bytes());
        e.announced = already > 0;
        e.state = DlState::Running(Box::new(dl));
        self.shares.insert(key.clone(), shared);
        if already > 0 {
            // Partial holders are listed as sources for others.
            self.announce(&key.0, &key.1, 0, now);
        }
        if let Some(ticket) = ticket {
            self.out.push_back(ClientOutput::Done { ticket, result: Ok(vec![line]) });
        }
        if let Some(DownloadEntry { state: DlState::Running(dl), .. }) = self.downloads.get_mut(&id) {
            dl.handle_sources(&sharers, now);
        }
        self.drain_download(id, now);
    }

    /// The verdict on a [`ClientOutput::WriteChunk`]: the chunk matched its
    /// SHA1 and is written (`ok`), or it did not and was not written.
    pub fn handle_chunk_checked(&mut self, id: DownloadId, chunk: u32, ok: bool, now: Millis) {
        let Some(DownloadEntry { state: DlState::Running(dl), .. }) = self.downloads.get_mut(&id) else { return };
        dl.handle_checked(chunk, ok, now);
        self.drain_download(id, now);
    }

    /// A chunk buffer from a [`ClientOutput::WriteChunk`] the driver is done
    /// with (written and hashed, or refused): the download reuses it.
    pub fn handle_chunk_buffer(&mut self, id: DownloadId, buf: Vec<u8>) {
        if let Some(DownloadEntry { state: DlState::Running(dl), .. }) = self.downloads.get_mut(&id) {
            dl.reuse_buffer(buf);
        }
    }

    /// Writing a chunk or the sidecar failed: the download cannot go on.
    pub fn handle_disk_error(&mut self, id: DownloadId, err: String, now: Millis) {
        self.fail_download(id, format!("disk error: {err}"), now);
    }

    pub fn handle_download_finished(&mut self, id: DownloadId, result: Result<(), String>, now: Millis) {
        let Some(e) = self.downloads.get_mut(&id) else { return };
        if !matches!(e.state, DlState::Finishing) {
            return;
        }
        if let Err(err) = result {
            return self.fail_download(id, err, now);
        }
        e.state = DlState::Complete;
        e.finished = Some(now);
        let secs = now.since(e.started).0 as f64 / 1000.0;
        let sources: Vec<String> = e.supplied.iter().map(|(a, b)| format!("{a}={b}")).collect();
        tracing::info!(
            "download complete: {} ({} bytes) in {secs:.2} s; bytes fetched per source: {}",
            e.name,
            e.digest.size,
            sources.join(" ")
        );
        let key = (e.group.clone(), e.name.clone());
        let meta = FileMeta { name: e.name.clone(), digest: e.digest.clone() };
        let final_path = e.final_path.clone();
        if let Some(s) = self.shares.get_mut(&key) {
            s.path = final_path;
        }
        if self.session.is_some() {
            self.send(Purpose::Reshare(id), Request::UploadFile { group: key.0, meta }, now);
        }
    }

    pub(super) fn reshared(&mut self, id: DownloadId, result: Result<Reply, ShellError>) {
        if let Err(e) = result {
            tracing::warn!(download = id.0, error = %e, "could not register the finished download as shared");
        }
    }

    fn fail_download(&mut self, id: DownloadId, reason: String, now: Millis) {
        let Some(e) = self.downloads.get_mut(&id) else { return };
        if let DlState::Running(dl) = &mut e.state {
            dl.close_all();
            e.supplied = dl.supplied().collect();
        }
        let old = std::mem::replace(&mut e.state, DlState::Failed(reason.clone()));
        e.finished = Some(now);
        let key = (e.group.clone(), e.name.clone());
        if let DlState::Running(mut dl) = old {
            while let Some(o) = dl.poll_output() {
                if let DownloadOutput::Close { peer } = o {
                    self.peers.remove(&peer);
                    self.out.push_back(ClientOutput::PeerClose { conn: peer });
                }
            }
        }
        tracing::warn!(download = id.0, %reason, "download failed");
        self.stop_serving(Some((&key.0, &key.1)), "the download failed");
        self.shares.remove(&key);
    }

    // ---- tracker answers ----

    pub(super) fn sources_answered(&mut self, id: DownloadId, result: Result<Reply, ShellError>, now: Millis) {
        let Some(e) = self.downloads.get_mut(&id) else { return };
        e.sources_pending = false;
        if let (DlState::Running(dl), Ok(Reply::Download { sharers, grant, .. })) = (&mut e.state, result) {
            dl.set_grant(grant);
            dl.handle_sources(&sharers, now);
            self.drain_download(id, now);
        }
    }

    pub(super) fn grant_checked(&mut self, conn: PeerConnId, result: Result<Reply, ShellError>, now: Millis) {
        let Some(PeerLink::In(up)) = self.peers.get_mut(&conn) else { return };
        let UpState::Checking(group, name) = &up.state else { return };
        let (group, name) = (group.clone(), name.clone());
        match result {
            Ok(Reply::GrantValid { .. }) => match self.shares.get(&(group.clone(), name.clone())) {
                Some(s) => {
                    let chunks = s.have.clone();
                    up.state = UpState::Serving(group, name);
                    let load = self.load();
                    self.peer_send(conn, &PeerMessage::Have { chunks, load });
                }
                None => self.refuse_peer(conn, "not sharing that file any more"),
            },
            Ok(_) => self.refuse_peer(conn, "access denied"),
            Err(e) => self.refuse_peer(conn, &format!("access denied: {e}")),
        }
        let _ = now;
    }

    pub(super) fn announce(&mut self, group: &GroupId, name: &FileName, chunk: u32, now: Millis) {
        if self.session.is_some() {
            let req = Request::HaveChunk { group: group.clone(), name: name.clone(), chunk };
            self.send(Purpose::Announce, req, now);
        }
    }

    // ---- peer connections ----

    pub fn handle_peer_accepted(&mut self, conn: PeerConnId, now: Millis) {
        debug_assert!(conn.0 & OUTGOING == 0, "the driver numbers accepted connections below OUTGOING");
        let incoming = self.peers.values().filter(|p| matches!(p, PeerLink::In(_))).count();
        let refusal = if self.session.is_none() {
            Some("this peer is not logged in")
        } else if incoming >= MAX_UPLOAD_CONNECTIONS {
            Some("too many connections, try later")
        } else {
            None
        };
        if let Some(reason) = refusal {
            self.out.push_back(ClientOutput::PeerTransmit {
                conn,
                bytes: encode(&PeerMessage::Refused { reason: reason.into() }),
            });
            self.out.push_back(ClientOutput::PeerClose { conn });
            return;
        }
        let up = Upload {
            opened: now,
            last_seen: now,
            decoder: FrameDecoder::new(1024),
            state: UpState::AwaitHello,
            queue: VecDeque::new(),
            reading: VecDeque::new(),
            backlog: 0,
        };
        self.peers.insert(conn, PeerLink::In(Box::new(up)));
    }

    pub fn handle_peer_connected(&mut self, conn: PeerConnId, now: Millis) {
        if let Some(PeerLink::Out { download, .. }) = self.peers.get(&conn) {
            let id = *download;
            if let Some(DownloadEntry { state: DlState::Running(dl), .. }) = self.downloads.get_mut(&id) {
                dl.handle_connected(conn, now);
            }
            self.drain_download(id, now);
        }
    }

    pub fn handle_peer_closed(&mut self, conn: PeerConnId, now: Millis) {
        if let Some(PeerLink::Out { download, .. }) = self.peers.remove(&conn) {
            if let Some(DownloadEntry { state: DlState::Running(dl), .. }) = self.downloads.get_mut(&download) {
                dl.handle_closed(conn, now);
            }
            self.drain_download(download, now);
        }
    }

    /// Unsent bytes on an upload connection after the driver's last flush.
    pub fn handle_peer_backlog(&mut self, conn: PeerConnId, backlog: usize, now: Millis) {
        if let Some(PeerLink::In(up)) = self.peers.get_mut(&conn) {
            up.backlog = backlog;
            self.pump(conn, now);
        }
    }

    /// Bytes arrived on a peer connection (a copy; the driver of real sockets
    /// reads in place with [`ClientEngine::peer_recv_bufs`] instead).
    pub fn handle_peer_bytes(&mut self, conn: PeerConnId, mut bytes: &[u8], now: Millis) {
        while !bytes.is_empty() {
            let Some((data, frames)) = self.peer_recv_bufs(conn) else { return };
            let a = data.len().min(bytes.len());
            data[..a].copy_from_slice(&bytes[..a]);
            let b = frames.len().min(bytes.len() - a);
            frames[..b].copy_from_slice(&bytes[a..a + b]);
            self.handle_peer_received(conn, a + b, now);
            bytes = &bytes[a + b..];
        }
    }

    /// Where to read the next bytes of a peer connection, in order: first
    /// into `data` (possibly empty: the rest of the block being received,
    /// straight into its chunk's buffer), then into `frames` (free space in
    /// the connection's frame decoder; never empty). A read fills `data`
    /// before any byte goes to `frames` (`readv`). So block data is copied
    /// once, by the kernel, from the socket to its chunk. `None` if the
    /// connection is not known (any more). Report what was read with
    /// [`ClientEngine::handle_peer_received`].
    pub fn peer_recv_bufs(&mut self, conn: PeerConnId) -> Option<(&mut [u8], &mut [u8])> {
        match self.peers.get_mut(&conn)? {
            PeerLink::In(up) => Some((&mut [], up.decoder.recv_buf(SERVE_RECV_WINDOW))),
            PeerLink::Out { download, decoder, stream } => {
                let dl = match self.downloads.get_mut(download) {
                    Some(DownloadEntry { state: DlState::Running(dl), .. }) => Some(dl),
                    _ => None,
                };
                let Some(s) = stream else {
                    // A long frame that is not a block is read whole; the
                    // start of anything else just far enough to see where
                    // a block's data goes.
                    let window = match decoder.partial_frame() {
                        Some((len, held))
                            if held.len() < HEAD_WINDOW
                                && held.first().is_none_or(|&t| t == crate::client::peer::BLOCK_TAG)
                                && crate::client::peer::decode_block_head(len, held).is_none() =>
                        {
                            HEAD_WINDOW
                        }
                        Some((len, held)) => (len - held.len()).clamp(HEAD_WINDOW, PEER_RECV_WINDOW),
                        None => HEAD_WINDOW,
                    };
                    return Some((&mut [], decoder.recv_buf(window)));
                };
                let space = dl.and_then(|dl| dl.recv_space(conn, s.chunk, s.offset)).filter(|_| !s.discard);
                match space {
                    Some(space) => Some((&mut space[..s.left as usize], decoder.recv_buf(HEAD_WINDOW))),
                    None => {
                        s.discard = true;
                        Some((&mut [], decoder.recv_buf((s.left as usize).min(PEER_RECV_WINDOW))))
                    }
                }
            }
        }
    }

    /// `n` bytes were read into [`ClientEngine::peer_recv_bufs`]' spaces.
    pub fn handle_peer_received(&mut self, conn: PeerConnId, n: usize, now: Millis) {
        match self.peers.get_mut(&conn) {
            None => {}
            Some(PeerLink::Out { download, decoder, stream }) => {
                let id = *download;
                let Some(DownloadEntry { state: DlState::Running(dl), .. }) = self.downloads.get_mut(&id) else {
                    return decoder.commit(n);
                };
                match stream {
                    Some(s) if s.discard => {
                        decoder.commit(n);
                        let k = n.min(s.left as usize);
                        decoder.skip(k);
                        s.left -= k as u32;
                    }
                    Some(s) => {
                        let k = n.min(s.left as usize);
                        decoder.commit(n - k);
                        s.left -= k as u32;
                        let (chunk, offset, load) = (s.chunk, s.offset, s.load);
                        s.offset += k as u32;
                        if k > 0 {
                            dl.handle_block_landed(conn, chunk, offset, load, k as u32, now);
                        }
                    }
                    None => decoder.commit(n),
                }
                if stream.is_some_and(|s| s.left == 0) {
                    *stream = None;
                }
                let mut bad = false;
                while dl.owns(conn) {
                    let body = match decoder.next_frame() {
                        Ok(Some(body)) => body,
                        Ok(None) => {
                            // A block whose data is still on its way: take the
                            // data that came with its header, then receive
                            // the rest in place.
                            if stream.is_none() {
                                *stream = start_stream(dl, conn, decoder, now);
                            }
                            break;
                        }
                        Err(e) => {
                            tracing::debug!(conn = conn.0, error = %e, "bad frame from a peer");
                            bad = true;
                            break;
                        }
                    };
                    // Blocks that arrived whole are read in place too.
                    if let Some(b) = crate::client::peer::decode_block(body) {
                        dl.handle_block(conn, b.chunk, b.offset, b.load, b.data, now);
                    } else {
                        match crate::wire::decode::<PeerMessage>(body) {
                            Ok(m) => dl.handle_message(conn, m, now),
                            Err(_) => {
                                bad = true;
                                break;
                            }
                        }
                    }
                }
                if bad && dl.owns(conn) {
                    dl.handle_closed(conn, now);
                    self.peers.remove(&conn);
                    self.out.push_back(ClientOutput::PeerClose { conn });
                }
                self.drain_download(id, now);
            }
            Some(PeerLink::In(up)) => {
                up.last_seen = now;
                up.decoder.commit(n);
                loop {
                    let Some(PeerLink::In(up)) = self.peers.get_mut(&conn) else { return };
                    match up.decoder.next_message::<PeerMessage>() {
                        Ok(Some(m)) => self.serve_message(conn, m, now),
                        Ok(None) => break,
                        Err(e) => return self.refuse_peer(conn, &format!("bad frame: {e}")),
                    }
                }
                self.pump(conn, now);
            }
        }
    }

    /// A block frame was filled from disk and queued (or reading failed).
    pub fn handle_block_sent(&mut self, conn: PeerConnId, result: Result<(), String>, now: Millis) {
        let Some(PeerLink::In(up)) = self.peers.get_mut(&conn) else { return };
        up.reading.pop_front();
        match result {
            Ok(()) => self.pump(conn, now),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read a shared file");
                self.refuse_peer(conn, "this peer cannot read the file any more");
            }
        }
    }

    fn serve_message(&mut self, conn: PeerConnId, msg: PeerMessage, now: Millis) {
        let Some(PeerLink::In(up)) = self.peers.get_mut(&conn) else { return };
        match (&up.state, msg) {
            (UpState::AwaitHello, PeerMessage::Hello { protocol_version: PROTOCOL_VERSION, role: Role::Peer }) => {
                up.state = UpState::AwaitWant;
                up.decoder.set_limit(MAX_PEER_FRAME);
                self.peer_send(conn, &PeerMessage::Hello { protocol_version: PROTOCOL_VERSION, role: Role::Peer });
            }
            (UpState::AwaitWant, PeerMessage::Want { group, name, sha1, grant }) => {
                let ok = self.shares.get(&(group.clone(), name.clone())).is_some_and(|s| s.sha1 == sha1);
                if !ok {
                    return self.refuse_peer(conn, "this peer does not share that file");
                }
                up.state = UpState::Checking(group.clone(), name.clone());
                self.send(Purpose::CheckGrant(conn), Request::CheckGrant { grant, group, name }, now);
            }
            (UpState::Serving(group, name), PeerMessage::Request { chunk, offset, len }) => {
                let key = (group.clone(), name.clone());
                let ok =
                    self.shares.get(&key).is_some_and(|s| valid_block(s.size, chunk, offset, len) && s.have.get(chunk));
                if !ok {
                    return self.refuse_peer(conn, "request for a block this peer does not have");
                }
                if up.queue.len() >= MAX_QUEUED_REQUESTS {
                    return self.refuse_peer(conn, "too many requests in flight");
                }
                up.queue.push_back((chunk, offset, len));
            }
            (UpState::Serving(..), PeerMessage::Cancel { chunk, offset, len }) => {
                up.queue.retain(|r| *r != (chunk, offset, len));
            }
            (UpState::Serving(..), PeerMessage::Have { .. } | PeerMessage::HaveOne { .. }) => {}
            _ => self.refuse_peer(conn, "unexpected message"),
        }
    }

    /// Turns queued requests into disk reads while the connection has room
    /// (and the upload rate limit, if any, allows).
    fn pump(&mut self, conn: PeerConnId, now: Millis) {
        loop {
            let Some(PeerLink::In(up)) = self.peers.get_mut(&conn) else { return };
            let UpState::Serving(group, name) = &up.state else { return };
            let reading_bytes: usize = up.reading.iter().map(|&l| l as usize).sum();
            if up.reading.len() >= 4 || up.backlog + reading_bytes >= SEND_HIGH_WATER {
                return;
            }
            let Some(&(_, _, len)) = up.queue.front() else { return };
            if let Some(bucket) = &mut self.upload_limit {
                if !bucket.take(len as u64, now) {
                    self.throttled = true;
                    return;
                }
            }
            let Some((chunk, block, len)) = up.queue.pop_front() else { return };
            let Some(s) = self.shares.get(&(group.clone(), name.clone())) else { return };
            up.reading.push_back(len);
            let path = s.path.clone();
            let header = crate::client::peer::block_header(chunk, block, self.load(), len);
            let offset = chunk_offset(chunk) + block as u64;
            self.out.push_back(ClientOutput::SendBlock { conn, path, offset, header, len });
        }
    }

    fn peer_send(&mut self, conn: PeerConnId, msg: &PeerMessage) {
        self.out.push_back(ClientOutput::PeerTransmit { conn, bytes: encode(msg) });
    }

    fn refuse_peer(&mut self, conn: PeerConnId, reason: &str) {
        if self.peers.remove(&conn).is_some() {
            self.peer_send(conn, &PeerMessage::Refused { reason: reason.into() });
            self.out.push_back(ClientOutput::PeerClose { conn });
        }
    }

    /// Ends the uploads of one shared file, or of all of them.
    pub(super) fn stop_serving(&mut self, only: Option<(&GroupId, &FileName)>, reason: &str) {
        let conns: Vec<PeerConnId> = self
            .peers
            .iter()
            .filter(|(_, p)| match p {
                PeerLink::In(up) => match (&up.state, only) {
                    (_, None) => true,
                    (UpState::Serving(g, n) | UpState::Checking(g, n), Some((og, on))) => g == og && n == on,
                    _ => false,
                },
                PeerLink::Out { .. } => false,
            })
            .map(|(c, _)| *c)
            .collect();
        for c in conns {
            self.refuse_peer(c, reason);
        }
    }

    // ---- downloads ----

    /// Moves a download's outputs into the engine's.
    pub(super) fn drain_download(&mut self, id: DownloadId, now: Millis) {
        let Some(e) = self.downloads.get_mut(&id) else { return };
        let DlState::Running(dl) = &mut e.state else { return };
        let outs: Vec<DownloadOutput> = std::iter::from_fn(|| dl.poll_output()).collect();
        let complete = dl.is_complete();
        if outs.is_empty() && !complete {
            // Most reads of block data end here.
            return;
        }
        let key = (e.group.clone(), e.name.clone());
        let mut want_sources = false;
        let mut failed = None;
        for o in outs {
            match o {
                DownloadOutput::Connect { peer, addr } => {
                    let decoder = FrameDecoder::new(MAX_PEER_FRAME);
                    self.peers.insert(peer, PeerLink::Out { download: id, decoder, stream: None });
                    self.out.push_back(ClientOutput::PeerConnect { conn: peer, addr });
                }
                DownloadOutput::Send { peer, msg } => self.peer_send(peer, &msg),
                DownloadOutput::Close { peer } => {
                    self.peers.remove(&peer);
                    self.out.push_back(ClientOutput::PeerClose { conn: peer });
                }
                DownloadOutput::Check { chunk, data } => {
                    let Some(sha1) = self.downloads.get(&id).and_then(|e| e.digest.chunks.get(chunk as usize)) else {
                        continue;
                    };
                    let sha1 = *sha1;
                    self.out.push_back(ClientOutput::WriteChunk { id, chunk, data, sha1 });
                }
                // Only now is the chunk on disk: serving it before would
                // send what the part file held before it was written.
                DownloadOutput::Verified { chunk } => {
                    if let Some(s) = self.shares.get_mut(&key) {
                        s.have.set(chunk);
                    }
                    self.tell_servers(&key, chunk);
                    if let Some(e) = self.downloads.get_mut(&id) {
                        e.dirty = true;
                        if !std::mem::replace(&mut e.announced, true) {
                            self.announce(&key.0, &key.1, chunk, now);
                        }
                    }
                }
                DownloadOutput::Banned { addr, chunk } => {
                    tracing::warn!(%addr, chunk, file = %key.1, "peer sent a corrupt chunk and is banned for this file");
                }
                DownloadOutput::WantSources => want_sources = true,
                DownloadOutput::Failed { reason } => failed = Some(reason),
            }
        }
        if let Some(reason) = failed {
            return self.fail_download(id, reason, now);
        }
        let Some(e) = self.downloads.get_mut(&id) else { return };
        if want_sources && !e.sources_pending && self.session.is_some() {
            e.sources_pending = true;
            let req = Request::DownloadFile { group: key.0.clone(), name: key.1.clone() };
            self.send(Purpose::Sources(id), req, now);
        }
        let Some(e) = self.downloads.get_mut(&id) else { return };
        if complete {
            if let DlState::Running(dl) = &e.state {
                e.supplied = dl.supplied().collect();
            }
            e.state = DlState::Finishing;
            e.dirty = false;
            let secs = now.since(e.started).0 as f64 / 1000.0;
            tracing::info!("all chunks of {} verified after {secs:.2} s; checking the whole file", e.name);
            let have = Bitmap::full(e.digest.chunks.len() as u32);
            let sidecar = crate::client::sidecar::encode(&e.digest, &have);
            let sha1 = e.digest.sha1;
            self.out.push_back(ClientOutput::SaveProgress { id, sidecar });
            self.out.push_back(ClientOutput::FinishDownload { id, sha1 });
        }
    }

    /// Tells the peers we serve this file to that we gained a chunk.
    fn tell_servers(&mut self, key: &(GroupId, FileName), chunk: u32) {
        let conns: Vec<PeerConnId> = self
            .peers
            .iter()
            .filter(|(_, p)| matches!(p, PeerLink::In(up) if matches!(&up.state, UpState::Serving(g, n) if g == &key.0 && n == &key.1)))
            .map(|(c, _)| *c)
            .collect();
        for c in conns {
            self.peer_send(c, &PeerMessage::HaveOne { chunk });
        }
    }

    pub(super) fn downloads_deadline(&self) -> Option<Millis> {
        let running = self.downloads.values().filter_map(|d| match &d.state {
            DlState::Running(dl) => Some(dl.poll_timeout().unwrap_or(self.next_tick).min(self.next_tick)),
            _ => None,
        });
        let throttle = match (&self.upload_limit, self.throttled) {
            (Some(b), true) => Some(b.ready_at(crate::client::peer::BLOCK_SIZE as u64)),
            _ => None,
        };
        let uploads = self.peers.values().any(|p| matches!(p, PeerLink::In(_))).then_some(self.next_tick);
        running.chain(throttle).chain(uploads).min()
    }

    pub(super) fn downloads_timeout(&mut self, now: Millis) {
        if self.throttled
            && self.upload_limit.as_ref().is_some_and(|b| b.ready_at(crate::client::peer::BLOCK_SIZE as u64) <= now)
        {
            self.throttled = false;
            let ups: Vec<PeerConnId> =
                self.peers.iter().filter(|(_, p)| matches!(p, PeerLink::In(_))).map(|(c, _)| *c).collect();
            for c in ups {
                self.pump(c, now);
            }
        }
        let due: Vec<DownloadId> = self
            .downloads
            .iter()
            .filter(|(_, d)| matches!(&d.state, DlState::Running(dl) if dl.poll_timeout().is_some_and(|t| t <= now)))
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            if let Some(DownloadEntry { state: DlState::Running(dl), .. }) = self.downloads.get_mut(&id) {
                dl.handle_timeout(now);
            }
            self.drain_download(id, now);
        }
        if now < self.next_tick {
            return;
        }
        self.next_tick = now.plus(TICK);
        let overdue: Vec<(PeerConnId, &str)> = self
            .peers
            .iter()
            .filter_map(|(c, p)| match p {
                PeerLink::In(up) => match up.state {
                    UpState::Serving(..) if up.queue.is_empty() && now.since(up.last_seen) >= PEER_IDLE_TIMEOUT => {
                        Some((*c, "idle for too long"))
                    }
                    UpState::AwaitHello | UpState::AwaitWant if now.since(up.opened) >= PEER_HANDSHAKE_TIMEOUT => {
                        Some((*c, "no handshake in time"))
                    }
                    _ => None,
                },
                PeerLink::Out { .. } => None,
            })
            .collect();
        for (c, why) in overdue {
            self.refuse_peer(c, why);
        }
        for (id, e) in self.downloads.iter_mut() {
            let DlState::Running(dl) = &e.state else { continue };
            let verified = dl.verified_bytes();
            let dt = now.since(e.mark.0).0;
            if dt >= 1000 {
                e.rate = verified.saturating_sub(e.mark.1) * 1000 / dt;
                e.mark = (now, verified);
            }
            if e.dirty {
                e.dirty = false;
                let sidecar = crate::client::sidecar::encode(&e.digest, dl.done());
                self.out.push_back(ClientOutput::SaveProgress { id: *id, sidecar });
            }
        }
    }
}

/// If the decoder holds the start of a block frame, header complete, whose
/// data `dl` expects next from `conn`: moves the data that came with the
/// header into the chunk and returns the stream for the rest. Otherwise
/// the frame stays in the decoder, to be handled whole.
fn start_stream(dl: &mut Download, conn: PeerConnId, decoder: &mut FrameDecoder, now: Millis) -> Option<BlockStream> {
    let (len, held) = decoder.partial_frame()?;
    let h = crate::client::peer::decode_block_head(len, held)?;
    let present = &held[h.header_len..];
    let space = dl.recv_space(conn, h.chunk, h.offset)?;
    if h.len == 0 || h.len as usize > space.len() {
        return None;
    }
    let k = present.len();
    space[..k].copy_from_slice(present);
    decoder.take_partial(h.header_len + k);
    if k > 0 {
        dl.handle_block_landed(conn, h.chunk, h.offset, h.load, k as u32, now);
    }
    let s = BlockStream {
        chunk: h.chunk,
        offset: h.offset + k as u32,
        load: h.load,
        left: h.len - k as u32,
        discard: false,
    };
    Some(s)
}
