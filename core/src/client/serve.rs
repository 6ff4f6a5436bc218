//! The chunk server: peers fetching from this client.
//!
//! An incoming connection says `Hello`, then `Want` with a grant; the engine
//! asks its tracker whether the grant is a member's for that file and only
//! then sends its chunk map. Block requests are queued (at most
//! [`MAX_QUEUED_REQUESTS`] per connection) and turned into reads of the file
//! ([`ClientOutput::SendBlock`]) only while the connection's unsent backlog is
//! under [`SEND_HIGH_WATER`] and the upload rate limit allows, so a slow
//! downloader cannot make this client buffer without bound. Only chunks the
//! share's map holds are served: for a running download, those verified and
//! written.

use std::collections::VecDeque;

use super::{ClientEngine, ClientOutput, PeerLink, Purpose};
use crate::chunk::Sha1Digest;
use crate::client::download::{chunk_offset, PeerConnId};
use crate::client::peer::{valid_block, Bitmap, Load, PeerMessage, MAX_PEER_FRAME, MAX_QUEUED_REQUESTS};
use crate::identity::KeyId;
use crate::ids::{FileName, GroupId};
use crate::proto::{Reply, Request, Role, PROTOCOL_VERSION};
use crate::shell::ShellError;
use crate::time::Millis;
use crate::wire::{encode, FrameDecoder};

/// Most peers this client serves at once.
pub const MAX_UPLOAD_CONNECTIONS: usize = 64;
/// Unsent bytes on an upload connection above which no more blocks are read.
pub const SEND_HIGH_WATER: usize = 1 << 20;
/// Receive space offered per read on a serving connection (requests are small).
pub(super) const SERVE_RECV_WINDOW: usize = 16 * 1024;
/// An incoming peer connection must name a file it may fetch within this time.
pub const PEER_HANDSHAKE_TIMEOUT: Millis = Millis(10_000);
/// An upload connection with nothing asked of it for this long is closed.
pub const PEER_IDLE_TIMEOUT: Millis = Millis(120_000);
/// Connections refused at accept and waiting for their TLS handshake to
/// carry the reason, at most; past it a refused connection is just closed.
pub const MAX_REFUSING: usize = 64;
/// Block reads asked of the driver and not yet sent, per connection, at most.
const MAX_READS_IN_FLIGHT: usize = 4;

/// A file this client serves: an upload, or a download (finished or not).
pub(crate) struct Shared {
    pub path: String,
    pub size: u64,
    pub sha1: Sha1Digest,
    /// The chunks it may serve.
    pub have: Bitmap,
    /// Block bytes sent from it (handed to the driver to send).
    pub served: u64,
}

enum UpState {
    /// Refused at accept; the reason is sent once the TLS handshake is done
    /// (there is no channel for it before), or the connection is dropped at
    /// the handshake deadline.
    Refusing(&'static str),
    AwaitHello,
    AwaitWant,
    Checking(GroupId, FileName),
    Serving(GroupId, FileName),
}

pub(crate) struct Upload {
    /// The key the downloader proved (TLS); its grant must have been issued
    /// to that key.
    key: Option<KeyId>,
    opened: Millis,
    last_seen: Millis,
    pub(super) decoder: FrameDecoder,
    state: UpState,
    queue: VecDeque<(u32, u32, u32)>,
    /// Lengths of the block reads asked of the driver and not yet sent, oldest first.
    reading: VecDeque<u32>,
    /// Unsent bytes on the socket, as the driver last reported.
    backlog: usize,
}

impl ClientEngine {
    /// This client's load as it reports it to downloaders: peers served and
    /// requests queued.
    pub(super) fn load(&self) -> Load {
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

    pub(super) fn peer_accepted(&mut self, conn: PeerConnId, now: Millis) {
        debug_assert!(conn.0 & super::OUTGOING == 0, "the driver numbers accepted connections below OUTGOING");
        let (mut incoming, mut refusing) = (0, 0);
        for p in self.peers.values() {
            match p {
                PeerLink::In(up) if matches!(up.state, UpState::Refusing(_)) => refusing += 1,
                PeerLink::In(_) => incoming += 1,
                PeerLink::Out { .. } => {}
            }
        }
        let refusal = if self.session.is_none() {
            Some("this peer is not logged in")
        } else if incoming >= MAX_UPLOAD_CONNECTIONS {
            Some("too many connections, try later")
        } else {
            None
        };
        let state = match refusal {
            None => UpState::AwaitHello,
            // Over TLS the reason waits for the handshake (a few at a time).
            Some(reason) if !self.cfg.plaintext_peers && refusing < MAX_REFUSING => UpState::Refusing(reason),
            Some(reason) => {
                self.out.push_back(ClientOutput::PeerTransmit {
                    conn,
                    bytes: encode(&PeerMessage::Refused { reason: reason.into() }),
                });
                self.out.push_back(ClientOutput::PeerClose { conn });
                return;
            }
        };
        let up = Upload {
            key: None,
            opened: now,
            last_seen: now,
            decoder: FrameDecoder::new(1024),
            state,
            queue: VecDeque::new(),
            reading: VecDeque::new(),
            backlog: 0,
        };
        self.peers.insert(conn, PeerLink::In(Box::new(up)));
    }

    /// The group and file an upload connection is being served (its grant
    /// passed), for a driver or simulation checking who receives what.
    pub fn serving(&self, conn: PeerConnId) -> Option<(&GroupId, &FileName)> {
        match self.peers.get(&conn) {
            Some(PeerLink::In(up)) => match &up.state {
                UpState::Serving(g, n) => Some((g, n)),
                _ => None,
            },
            _ => None,
        }
    }

    /// An upload connection's TLS handshake is done: the downloader holds `key`.
    pub(super) fn peer_secured(&mut self, conn: PeerConnId, key: KeyId) {
        if let Some(PeerLink::In(up)) = self.peers.get_mut(&conn) {
            up.key = Some(key);
            if let UpState::Refusing(reason) = up.state {
                self.refuse_peer(conn, reason);
            }
        }
    }

    /// Bytes read into an upload connection's decoder: handle its frames.
    pub(super) fn upload_received(&mut self, conn: PeerConnId, n: usize, now: Millis) {
        let Some(PeerLink::In(up)) = self.peers.get_mut(&conn) else { return };
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
        self.serve_more(conn, now);
    }

    pub(super) fn block_sent(&mut self, conn: PeerConnId, result: Result<(), String>, now: Millis) {
        let Some(PeerLink::In(up)) = self.peers.get_mut(&conn) else { return };
        up.reading.pop_front();
        match result {
            Ok(()) => self.serve_more(conn, now),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read a shared file");
                self.refuse_peer(conn, "this peer cannot read the file any more");
            }
        }
    }

    pub(super) fn peer_backlog(&mut self, conn: PeerConnId, backlog: usize, now: Millis) {
        if let Some(PeerLink::In(up)) = self.peers.get_mut(&conn) {
            up.backlog = backlog;
            self.serve_more(conn, now);
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
                if up.key.is_none() && !self.cfg.plaintext_peers {
                    return self.refuse_peer(conn, "no key proved on this connection (TLS is required)");
                }
                let holder = up.key;
                up.state = UpState::Checking(group.clone(), name.clone());
                self.send(Purpose::CheckGrant(conn), Request::CheckGrant { grant, group, name, holder }, now);
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

    /// The tracker's answer on an incoming peer's grant.
    pub(super) fn grant_checked(&mut self, conn: PeerConnId, result: Result<Reply, ShellError>) {
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
    }

    /// Turns queued requests into block reads while the connection has room
    /// (and the upload rate limit, if any, allows).
    fn serve_more(&mut self, conn: PeerConnId, now: Millis) {
        loop {
            let Some(PeerLink::In(up)) = self.peers.get_mut(&conn) else { return };
            let UpState::Serving(group, name) = &up.state else { return };
            let reading_bytes: usize = up.reading.iter().map(|&l| l as usize).sum();
            if up.reading.len() >= MAX_READS_IN_FLIGHT || up.backlog + reading_bytes >= SEND_HIGH_WATER {
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
            let Some(s) = self.shares.get_mut(&(group.clone(), name.clone())) else { return };
            s.served += u64::from(len);
            self.served += u64::from(len);
            up.reading.push_back(len);
            let path = s.path.clone();
            let header = crate::client::peer::block_header(chunk, block, self.load(), len);
            let offset = chunk_offset(chunk) + block as u64;
            self.out.push_back(ClientOutput::SendBlock { conn, path, offset, header, len });
        }
    }

    /// The lines of `show_uploads`: `[S] <group> <file> <bytes> bytes served`
    /// a share, then `<bytes> bytes served in all` (shares stopped since
    /// included).
    pub(super) fn show_uploads(&self) -> Vec<String> {
        let mut lines: Vec<String> =
            self.shares.iter().map(|((g, n), s)| format!("[S] {g} {n} {} bytes served", s.served)).collect();
        lines.push(format!("{} bytes served in all", self.served));
        lines
    }

    pub(super) fn peer_send(&mut self, conn: PeerConnId, msg: &PeerMessage) {
        self.out.push_back(ClientOutput::PeerTransmit { conn, bytes: encode(msg) });
    }

    pub(super) fn refuse_peer(&mut self, conn: PeerConnId, reason: &str) {
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

    /// Tells the peers we serve this file to that we gained a chunk.
    pub(super) fn tell_servers(&mut self, key: &(GroupId, FileName), chunk: u32) {
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

    /// When the upload rate limit lets a throttled upload go on.
    pub(super) fn uploads_deadline(&self) -> Option<Millis> {
        match (&self.upload_limit, self.throttled) {
            (Some(b), true) => Some(b.ready_at(crate::client::peer::BLOCK_SIZE as u64)),
            _ => None,
        }
    }

    pub(super) fn uploads_timeout(&mut self, now: Millis) {
        if self.throttled
            && self.upload_limit.as_ref().is_some_and(|b| b.ready_at(crate::client::peer::BLOCK_SIZE as u64) <= now)
        {
            self.throttled = false;
            let ups: Vec<PeerConnId> =
                self.peers.iter().filter(|(_, p)| matches!(p, PeerLink::In(_))).map(|(c, _)| *c).collect();
            for c in ups {
                self.serve_more(c, now);
            }
        }
    }

    /// Closes upload connections that are idle or never finished their handshake.
    pub(super) fn uploads_tick(&mut self, now: Millis) {
        let overdue: Vec<(PeerConnId, &str)> = self
            .peers
            .iter()
            .filter_map(|(c, p)| match p {
                PeerLink::In(up) => match up.state {
                    UpState::Serving(..) if up.queue.is_empty() && now.since(up.last_seen) >= PEER_IDLE_TIMEOUT => {
                        Some((*c, "idle for too long"))
                    }
                    UpState::Refusing(_) | UpState::AwaitHello | UpState::AwaitWant
                        if now.since(up.opened) >= PEER_HANDSHAKE_TIMEOUT =>
                    {
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
    }
}

/// Receive space for an upload connection's next read.
pub(super) fn recv_window(up: &mut Upload) -> &mut [u8] {
    up.decoder.recv_buf(SERVE_RECV_WINDOW)
}
