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
//!
//! For a crowd: a complete share serving a second downloader of a file
//! super-seeds (`Offers`: an empty map, then chunks offered a few at a
//! time, the least offered and least held first; under the rate limit only
//! [`OFFER_AHEAD`] of sending is promised at once), each offer to a
//! downloader with the fewest open and, of those, holding the fewest
//! chunks. The first downloader, sent the whole map, hears `OffersOnly` and
//! is offered chunks like the others from then on (of what it asked for
//! before it heard that, one chunk is sent and the rest hears `Busy`, so
//! the first chunks go to distinct downloaders); once every chunk went out once, each hears
//! `HaveAll` and may ask for any, and later downloaders get the whole map.
//! Downloaders report what they hold (`Have`, `HaveOne`), counted per
//! share. Under the rate limit the upload goes out a chunk at a time in
//! turns (`uploads_timeout`), a chunk fewer downloaders hold first, and
//! only [`UPLOAD_AHEAD`] of it is taken on at once (upload slots): a
//! request for another chunk hears `Busy` (its downloader asks a peer that
//! can send it sooner) and `Ready` once a slot is free, and a chunk fewer
//! downloaders hold takes the slot of a common one that waits. A chunk one
//! peer gained then spreads from every peer that got it, as in a tree,
//! instead of queueing at its first holder for the whole crowd.

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
/// A complete share serving a crowd offers each later downloader this many
/// chunks it may start at a time: what a downloader fetches at once from a
/// peer that serves others too. More would leave many chunks promised and
/// not yet sent, and the next offers would be second copies.
pub const OPEN_OFFERS: u32 = 2;
/// Under the upload limit, a share's open offers over all its downloaders
/// are what it sends in this time (see `offer_budget`). Measured in the
/// simulated flash crowd of 48 (seeds 0-5): 250 ms left the upload waiting
/// on offers not yet asked for (1.21-1.29x the bound), 400 ms gave
/// 1.20-1.23x, 600 and 1,000 ms no better.
pub const OFFER_AHEAD: Millis = Millis(400);
/// Under the upload limit, the chunks taken on at once over all downloaders
/// are what this client sends in this time (see `upload_slots`): a
/// downloader asking for more hears `Busy` and asks elsewhere.
pub const UPLOAD_AHEAD: Millis = Millis(130);
/// Upload slots at least, however low the upload limit.
pub const MIN_UPLOAD_SLOTS: usize = 2;
/// Chunks looked at, from a random place, to choose the next offer: the
/// least offered among them (a bound for files of a million chunks).
const OFFER_SCAN: u32 = 4096;

/// A file this client serves: an upload, or a download (finished or not).
pub(crate) struct Shared {
    pub path: String,
    pub size: u64,
    pub sha1: Sha1Digest,
    /// The chunks it may serve.
    pub have: Bitmap,
    /// Block bytes sent from it (handed to the driver to send).
    pub served: u64,
    /// How many downloaders each chunk was offered to (see [`Offers`]);
    /// empty until the first offer.
    offered: Vec<u32>,
    /// How many of the downloaders served now say they hold each chunk;
    /// empty until the first says so.
    held: Vec<u32>,
    /// Offers made so far: which downloader was offered a chunk last.
    offer_seq: u64,
    /// Chunks offered (or sent whole) at least once.
    first_copies: u32,
}

impl Shared {
    pub fn new(path: String, size: u64, sha1: Sha1Digest, have: Bitmap) -> Shared {
        Shared {
            path,
            size,
            sha1,
            have,
            served: 0,
            offered: Vec::new(),
            held: Vec::new(),
            offer_seq: 0,
            first_copies: 0,
        }
    }

    fn held(&self, chunk: u32) -> u32 {
        self.held.get(chunk as usize).copied().unwrap_or(0)
    }

    fn offered(&self, chunk: u32) -> u32 {
        self.offered.get(chunk as usize).copied().unwrap_or(0)
    }

    fn count_held(&mut self, chunk: u32, up: bool) {
        let n = self.have.len();
        count(&mut self.held, n, chunk, up);
    }

    fn count_offered(&mut self, chunk: u32) {
        let n = self.have.len();
        if self.offered(chunk) == 0 && chunk < n {
            self.first_copies += 1;
        }
        count(&mut self.offered, n, chunk, true);
    }

    /// Every chunk went out (or was promised) once: super-seeding is over.
    fn all_offered(&self) -> bool {
        self.first_copies >= self.have.len()
    }
}

/// One up or down in a per-chunk count of a file of `n` chunks, sized at
/// its first use.
fn count(counts: &mut Vec<u32>, n: u32, chunk: u32, up: bool) {
    if counts.len() != n as usize {
        *counts = vec![0; n as usize];
    }
    if let Some(h) = counts.get_mut(chunk as usize) {
        *h = if up { h.saturating_add(1) } else { h.saturating_sub(1) };
    }
}

/// A complete share's offers to one downloader of a crowd, as a seeder that
/// spreads its upload (super-seeding, BEP 16): instead of its whole map, the
/// downloader is told of [`OPEN_OFFERS`] chunks at a time, those offered to
/// the fewest downloaders so far among the ones it lacks; each chunk sent to
/// it whole, or that it reports holding (from another peer), is replaced by
/// another offer. The seeder's scarce upload then goes out as distinct chunks that
/// the leechers trade among themselves, not as the same first chunks to all.
pub(crate) struct Offers {
    /// Offered to this downloader.
    told: Bitmap,
    /// Offered and since started here or held by the downloader.
    settled: Bitmap,
    /// Offered and not settled.
    open: u32,
    /// The share's `offer_seq` at this downloader's last offer.
    last: u64,
    /// Every chunk was offered to someone, and this downloader was told it
    /// may ask for any (`HaveAll`): no more offers.
    all: bool,
}

impl Offers {
    /// Nothing offered yet, of a file of `n` chunks.
    fn new(n: u32) -> Offers {
        Offers { told: Bitmap::new(n), settled: Bitmap::new(n), open: 0, last: 0, all: false }
    }
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
    /// Serving from a complete share to one of several downloaders: what
    /// it was offered (otherwise it was sent the whole map).
    offers: Option<Offers>,
    /// What the downloader says it holds (its `Have`, then `HaveOne`s),
    /// once serving: counted in the share's `held`.
    has: Option<Bitmap>,
    /// Chunks whose requests were taken on and some of which still wait in
    /// `queue`: the upload slots this connection holds (see `uploads_full`).
    accepted: Vec<u32>,
    /// It was answered `Busy` and has not yet heard `Ready`.
    busy: bool,
    /// The chunk last answered `Busy`: the rest of its block requests
    /// (sent with the first) are dropped without a word.
    refused: Option<u32>,
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
            offers: None,
            has: None,
            accepted: Vec::new(),
            busy: false,
            refused: None,
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
                if offset > 0 && up.refused == Some(chunk) {
                    // The rest of a chunk answered `Busy`.
                    return;
                }
                // A chunk's first block decides for the chunk: taken on
                // while an upload slot is free (or it was offered to this
                // downloader: promised), else answered `Busy`.
                if offset == 0 && !up.accepted.contains(&chunk) {
                    let promised = up.offers.as_ref().is_some_and(|o| !o.all && o.told.get(chunk));
                    // Offered chunks only, once `OffersOnly` is sent: what
                    // it asked for before hearing it beyond one chunk waits,
                    // so the first chunks go to as many downloaders as can
                    // trade them (the first downloader asked for several).
                    let raced = !promised && up.offers.as_ref().is_some_and(|o| !o.all) && !up.accepted.is_empty();
                    if raced {
                        return self.answer_busy(conn, chunk);
                    }
                    if !promised && self.uploads_full() {
                        // A chunk rarer among the downloaders served than
                        // one taken on and not started takes its slot.
                        let held = self.shares.get(&key).map_or(0, |s| s.held(chunk));
                        self.preempt_for(conn, held);
                        if self.uploads_full() {
                            return self.answer_busy(conn, chunk);
                        }
                    }
                    let Some(PeerLink::In(up)) = self.peers.get_mut(&conn) else { return };
                    up.accepted.push(chunk);
                    if up.refused == Some(chunk) {
                        up.refused = None;
                    }
                }
                let Some(PeerLink::In(up)) = self.peers.get_mut(&conn) else { return };
                if offset > 0 && !up.accepted.contains(&chunk) {
                    // The rest of a chunk whose first blocks went out already.
                    up.accepted.push(chunk);
                }
                up.queue.push_back((chunk, offset, len));
            }
            // Every queued block request within the cancelled range goes
            // (a downloader cancels the rest of a chunk in one message).
            (UpState::Serving(..), PeerMessage::Cancel { chunk, offset, len }) => {
                let end = u64::from(offset) + u64::from(len);
                up.queue.retain(|&(c, o, l)| !(c == chunk && o >= offset && u64::from(o) + u64::from(l) <= end));
                self.release_slot(conn, chunk);
            }
            // What the downloader holds: counted, so that offers and turns
            // favour chunks few of them hold, and offers it no longer
            // needs settle.
            (UpState::Serving(..), PeerMessage::Have { chunks, .. }) => {
                let fits = up.has.as_ref().is_some_and(|h| chunks.fits(h.len()));
                if !fits {
                    return self.refuse_peer(conn, "chunk map of the wrong size");
                }
                for c in chunks.iter_set() {
                    self.holds(conn, c);
                }
            }
            (UpState::Serving(..), PeerMessage::HaveOne { chunk }) => self.holds(conn, chunk),
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
                    let n = s.have.len();
                    let complete = s.have.count() == n;
                    up.state = UpState::Serving(group.clone(), name.clone());
                    up.has = Some(Bitmap::new(n));
                    // The other downloaders of this file served, and whether
                    // each is offered chunks: a crowd if there are any.
                    let others: Vec<(PeerConnId, bool)> = self
                        .peers
                        .iter()
                        .filter_map(|(c, p)| match p {
                            PeerLink::In(u) if *c != conn => match &u.state {
                                UpState::Serving(g, f) if *g == group && *f == name => Some((*c, u.offers.is_some())),
                                _ => None,
                            },
                            _ => None,
                        })
                        .collect();
                    if complete && !others.is_empty() && n > OPEN_OFFERS && !s.all_offered() {
                        if let Some(PeerLink::In(up)) = self.peers.get_mut(&conn) {
                            up.offers = Some(Offers::new(n));
                        }
                        let load = self.load();
                        self.peer_send(conn, &PeerMessage::Have { chunks: Bitmap::new(n), load });
                        let key = (group, name);
                        // The crowd begins: the downloader sent the whole map
                        // is from now on offered chunks like the others, or
                        // it would ask for chunks already given to them.
                        for (c, _) in others.into_iter().filter(|(_, offered)| !offered) {
                            self.offers_only(c, &key);
                        }
                        self.top_up_offers(&key);
                    } else {
                        let chunks = s.have.clone();
                        let load = self.load();
                        self.peer_send(conn, &PeerMessage::Have { chunks, load });
                    }
                }
                None => self.refuse_peer(conn, "not sharing that file any more"),
            },
            Ok(_) => self.refuse_peer(conn, "access denied"),
            Err(e) => self.refuse_peer(conn, &format!("access denied: {e}")),
        }
    }

    /// Every chunk of a share went out once: its downloaders being offered
    /// chunks may from now on ask for any (`HaveAll`), so that its upload
    /// keeps going where they ask (the turns still favour the chunks fewest
    /// of them hold) instead of waiting on second offers they may already
    /// be fetching elsewhere.
    fn end_offers(&mut self, key: &(GroupId, FileName)) {
        let mut told = Vec::new();
        for (c, p) in self.peers.iter_mut() {
            let PeerLink::In(up) = p else { continue };
            let (UpState::Serving(g, n), Some(o)) = (&up.state, &mut up.offers) else { continue };
            if (g, n) != (&key.0, &key.1) || o.all {
                continue;
            }
            o.all = true;
            o.open = 0;
            o.last = u64::MAX;
            told.push(*c);
        }
        for c in told {
            self.peer_send(c, &PeerMessage::HaveAll);
        }
    }

    /// Turns the downloader on `conn`, sent a complete share's whole map,
    /// into one offered chunks (`OffersOnly`): the chunks it asked for
    /// already count as offered to it, and are still served.
    fn offers_only(&mut self, conn: PeerConnId, key: &(GroupId, FileName)) {
        let Some(PeerLink::In(up)) = self.peers.get_mut(&conn) else { return };
        let Some(s) = self.shares.get_mut(key) else { return };
        let n = s.have.len();
        let mut o = Offers::new(n);
        for &(chunk, _, _) in &up.queue {
            if chunk < n && !o.told.get(chunk) {
                o.told.set(chunk);
                o.open += 1;
                s.count_offered(chunk);
            }
        }
        up.offers = Some(o);
        self.peer_send(conn, &PeerMessage::OffersOnly);
    }

    /// The downloader on `conn` says it holds `chunk`.
    fn holds(&mut self, conn: PeerConnId, chunk: u32) {
        let Some(PeerLink::In(up)) = self.peers.get_mut(&conn) else { return };
        let (UpState::Serving(g, n), Some(has)) = (&up.state, &mut up.has) else { return };
        if chunk >= has.len() || has.get(chunk) {
            return;
        }
        has.set(chunk);
        if let Some(s) = self.shares.get_mut(&(g.clone(), n.clone())) {
            s.count_held(chunk, true);
        }
        self.offer_settled(conn, chunk);
    }

    /// An upload connection is gone (removed from `peers`): what its
    /// downloader held is no longer counted, and its open offers go to others.
    pub(super) fn upload_gone(&mut self, link: PeerLink) {
        let PeerLink::In(up) = link else { return };
        if !up.accepted.is_empty() {
            self.wake_busy();
        }
        let (UpState::Serving(g, n), Some(has)) = (&up.state, &up.has) else { return };
        let key = (g.clone(), n.clone());
        if let Some(s) = self.shares.get_mut(&key) {
            for c in has.iter_set() {
                s.count_held(c, false);
            }
        }
        self.top_up_offers(&key);
    }

    /// How many offers a share may have open over all its downloaders:
    /// under the upload limit, what it sends in [`OFFER_AHEAD`] (at least
    /// [`OPEN_OFFERS`]); without one, [`OPEN_OFFERS`] each. More would
    /// promise chunks long before they go out, and once every chunk is
    /// promised the next offers would be second copies while first ones
    /// still wait.
    fn offer_budget(&self, downloaders: u32) -> u32 {
        match &self.upload_limit {
            Some(b) => {
                let chunks = b.rate().saturating_mul(OFFER_AHEAD.0) / 1000 / crate::chunk::CHUNK_SIZE;
                u32::try_from(chunks).unwrap_or(u32::MAX).max(OPEN_OFFERS)
            }
            None => downloaders.saturating_mul(OPEN_OFFERS),
        }
    }

    /// `chunk` went out whole on `conn`, or the downloader holds it: an
    /// offer of it is settled, and another takes its place.
    fn offer_settled(&mut self, conn: PeerConnId, chunk: u32) {
        let Some(PeerLink::In(up)) = self.peers.get_mut(&conn) else { return };
        let Some(o) = &mut up.offers else { return };
        if chunk >= o.told.len() || o.all {
            return;
        }
        if o.told.get(chunk) && !o.settled.get(chunk) {
            o.settled.set(chunk);
            o.open = o.open.saturating_sub(1);
            let UpState::Serving(g, n) = &up.state else { return };
            let key = (g.clone(), n.clone());
            self.top_up_offers(&key);
        }
    }

    /// Makes offers for a share while it has budget ([`Self::offer_budget`]):
    /// each to the downloader with the fewest open offers (under
    /// [`OPEN_OFFERS`]), of those the one holding the fewest chunks (a
    /// first chunk makes an empty-handed downloader an uploader; another
    /// for one that has some would wait behind those on its upload), then
    /// the one offered to longest ago; each of
    /// up to [`OFFER_SCAN`] chunks it lacks and was not offered, looked at
    /// from a random place, the least offered so far, and of those the one
    /// the fewest downloaders hold.
    fn top_up_offers(&mut self, key: &(GroupId, FileName)) {
        if self.shares.get(key).is_some_and(Shared::all_offered) {
            return self.end_offers(key);
        }
        loop {
            // Over the downloaders of this share being offered chunks.
            let (mut downloaders, mut open) = (0, 0);
            let mut next: Option<((u32, u32, u64), PeerConnId)> = None;
            for (c, p) in &self.peers {
                let PeerLink::In(up) = p else { continue };
                let (UpState::Serving(g, n), Some(o)) = (&up.state, &up.offers) else { continue };
                if g != &key.0 || n != &key.1 {
                    continue;
                }
                downloaders += 1;
                open += o.open;
                if o.open >= OPEN_OFFERS || o.last == u64::MAX {
                    continue;
                }
                let k = (o.open, up.has.as_ref().map_or(0, Bitmap::count), o.last);
                if next.is_none_or(|(best, _)| k < best) {
                    next = Some((k, *c));
                }
            }
            if open >= self.offer_budget(downloaders) {
                return;
            }
            let Some((_, conn)) = next else { return };
            let Some(s) = self.shares.get_mut(key) else { return };
            let Some(PeerLink::In(up)) = self.peers.get_mut(&conn) else { return };
            let (Some(o), Some(has)) = (&mut up.offers, &up.has) else { return };
            let n = o.told.len();
            let start = self.rng.below(u64::from(n)) as u32;
            let mut best: Option<((u32, u32), u32)> = None;
            let mut looked = 0;
            for c in (start..n).chain(0..start) {
                if o.told.get(c) || has.get(c) || !s.have.get(c) {
                    continue;
                }
                let key = (s.offered(c), s.held(c));
                if best.is_none_or(|(k, _)| key < k) {
                    best = Some((key, c));
                }
                looked += 1;
                if key == (0, 0) || looked >= OFFER_SCAN {
                    break;
                }
            }
            let Some((_, c)) = best else {
                // Nothing left to offer it: out of the rotation for good.
                o.last = u64::MAX;
                continue;
            };
            s.count_offered(c);
            s.offer_seq += 1;
            o.last = s.offer_seq;
            o.open += 1;
            o.told.set(c);
            self.peer_send(conn, &PeerMessage::HaveOne { chunk: c });
        }
    }

    /// Turns queued requests into block reads while the connection has room
    /// (and the upload rate limit, if any, allows).
    fn serve_more(&mut self, conn: PeerConnId, now: Millis) {
        // While the limit holds uploads back, `uploads_timeout` gives the
        // upload out in turns: nobody jumps the queue as its blocks go.
        if self.throttled {
            return;
        }
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
            let offered_here = up.offers.as_ref().is_some_and(|o| o.told.get(chunk));
            let path = s.path.clone();
            let last = u64::from(block + len) >= crate::chunk::chunk_len(s.size, u64::from(chunk));
            if last && !offered_here {
                // Sent whole outside the offers (to the first downloader of
                // a crowd, which was sent the whole map, or asked before it
                // heard `OffersOnly`): counted as an offer, so the offers to
                // the others go to other chunks.
                s.count_offered(chunk);
            }
            // The turn stays here until this chunk is out, then passes on.
            self.upload_turn = if last { (PeerConnId(conn.0 + 1), false) } else { (conn, true) };
            let header = crate::client::peer::block_header(chunk, block, self.load(), len);
            let offset = chunk_offset(chunk) + block as u64;
            self.out.push_back(ClientOutput::SendBlock { conn, path, offset, header, len });
            if last {
                // An offer is settled once the whole chunk went out, so what
                // was offered stays what was sent (or is being sent).
                self.offer_settled(conn, chunk);
            }
            // Frees the chunk's slot if that was its last queued block.
            self.release_slot(conn, chunk);
        }
    }

    /// The upload slots this client has: under the upload limit, the chunks
    /// it sends in [`UPLOAD_AHEAD`] (at least [`MIN_UPLOAD_SLOTS`]); without
    /// one, no bound (the sockets' backlogs hold the queue back).
    fn upload_slots(&self) -> Option<usize> {
        let b = self.upload_limit.as_ref()?;
        let chunks = b.rate().saturating_mul(UPLOAD_AHEAD.0) / 1000 / crate::chunk::CHUNK_SIZE;
        Some(usize::try_from(chunks).unwrap_or(usize::MAX).max(MIN_UPLOAD_SLOTS))
    }

    /// Every upload slot is taken: a request for another chunk is answered
    /// `Busy`, so that its downloader asks a peer that can send it sooner
    /// instead of waiting here behind the others (BitTorrent's choking;
    /// the fast extension's reject, BEP 6). A chunk one peer gained then
    /// spreads from each peer that got it, as in a tree, and is not queued
    /// at the first holder for every downloader that heard of it.
    fn uploads_full(&self) -> bool {
        let Some(slots) = self.upload_slots() else { return false };
        let taken: usize = self
            .peers
            .values()
            .map(|p| match p {
                PeerLink::In(up) => up.accepted.len(),
                PeerLink::Out { .. } => 0,
            })
            .sum();
        taken >= slots
    }

    /// Frees an upload slot for `requester`'s chunk that `held` of the
    /// downloaders served hold: one taken on, not started and not
    /// promised, of a downloader holding two slots more than the requester
    /// (so one downloader does not take every slot while another waits),
    /// else the one the most downloaders hold, if more than `held` do. Its
    /// requests are dropped and its downloader hears `Busy` for it, as if
    /// it had asked now. What the crowd has fewest copies of goes out
    /// first: a chunk this peer just gained is passed on at once, not
    /// after the common ones before it.
    fn preempt_for(&mut self, requester: PeerConnId, held: u32) {
        let mine = match self.peers.get(&requester) {
            Some(PeerLink::In(up)) => up.accepted.len(),
            _ => 0,
        };
        let mut victim: Option<((bool, u32), PeerConnId, u32)> = None;
        for (c, p) in &self.peers {
            let PeerLink::In(up) = p else { continue };
            let UpState::Serving(g, n) = &up.state else { continue };
            let Some(s) = self.shares.get(&(g.clone(), n.clone())) else { continue };
            let hogs = up.accepted.len() > mine + 1;
            for &chunk in &up.accepted {
                let started = !up.queue.iter().any(|&(q, o, _)| q == chunk && o == 0);
                let promised = up.offers.as_ref().is_some_and(|o| !o.all && o.told.get(chunk));
                let key = (hogs, s.held(chunk));
                let eligible = hogs || key.1 > held;
                if !started && !promised && eligible && victim.is_none_or(|(k, _, _)| key > k) {
                    victim = Some((key, *c, chunk));
                }
            }
        }
        let Some((_, conn, chunk)) = victim else { return };
        let Some(PeerLink::In(up)) = self.peers.get_mut(&conn) else { return };
        up.queue.retain(|r| r.0 != chunk);
        up.accepted.retain(|&c| c != chunk);
        self.answer_busy(conn, chunk);
    }

    /// Answers `Busy` for `chunk` on `conn`: its downloader hears `Ready`
    /// when a slot frees, and the rest of the chunk's requests are dropped.
    fn answer_busy(&mut self, conn: PeerConnId, chunk: u32) {
        let Some(PeerLink::In(up)) = self.peers.get_mut(&conn) else { return };
        up.busy = true;
        up.refused = Some(chunk);
        self.peer_send(conn, &PeerMessage::Busy { chunk });
    }

    /// `chunk`'s requests on `conn` are all out or cancelled: its slot is
    /// free, and downloaders answered `Busy` hear `Ready`.
    fn release_slot(&mut self, conn: PeerConnId, chunk: u32) {
        let Some(PeerLink::In(up)) = self.peers.get_mut(&conn) else { return };
        if up.queue.iter().any(|r| r.0 == chunk) {
            return;
        }
        let Some(i) = up.accepted.iter().position(|&c| c == chunk) else { return };
        up.accepted.swap_remove(i);
        self.wake_busy();
    }

    /// Tells every downloader answered `Busy` that a slot is free (`Ready`):
    /// they may ask again, and the first to ask takes it.
    fn wake_busy(&mut self) {
        if self.uploads_full() {
            return;
        }
        let mut woken = Vec::new();
        for (c, p) in self.peers.iter_mut() {
            if let PeerLink::In(up) = p {
                if up.busy {
                    up.busy = false;
                    woken.push(*c);
                }
            }
        }
        for c in woken {
            self.peer_send(c, &PeerMessage::Ready);
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
        if let Some(link) = self.peers.remove(&conn) {
            self.upload_gone(link);
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
            // In turns, a chunk each: from the connection whose turn it is
            // (one with a chunk part sent finishes it first), round the
            // others, until the limit holds again. Not always from the
            // first: that one would take all and the others stall. And a
            // chunk each, not a block each: chunks go out whole one after
            // the other and can be shared on at once, instead of all
            // arriving late together.
            let (turn, mid) = self.upload_turn;
            let mut ups: Vec<(u32, usize, PeerConnId)> = self
                .peers
                .range(turn..)
                .chain(self.peers.range(..turn))
                .filter_map(|(c, p)| match p {
                    PeerLink::In(up) => Some((c, up)),
                    PeerLink::Out { .. } => None,
                })
                .enumerate()
                .map(|(i, (c, up))| {
                    // The rarest among the downloaders served goes first.
                    let held = match (&up.state, up.queue.front()) {
                        _ if mid && *c == turn => 0,
                        (UpState::Serving(g, n), Some(&(chunk, _, _))) => {
                            self.shares.get(&(g.clone(), n.clone())).map_or(0, |s| s.held(chunk))
                        }
                        _ => u32::MAX,
                    };
                    (held, i, *c)
                })
                .collect();
            ups.sort_unstable();
            let ups: Vec<PeerConnId> = ups.into_iter().map(|(_, _, c)| c).collect();
            for c in ups {
                self.serve_more(c, now);
                if self.throttled {
                    break;
                }
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
