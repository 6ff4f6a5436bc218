//! One file being downloaded: peers, chunk assignments, verification.
//!
//! [`Download`] talks to the peers that have the file over connections the
//! client engine opens for it. Free chunks go first to the least-loaded
//! peers (reported load, then fewest chunks in flight, then highest measured
//! rate), picked rarest first by the [`PieceSelector`]. Each peer has a few
//! chunks in flight, all of whose blocks are requested at once so the
//! connection stays busy: `chunks_per_peer` at first, then as many as the
//! peer delivers in `queue_time` at its recent rate (up to
//! [`MAX_CHUNKS_PER_PEER`]), so a path of long round trip stays full, as
//! libtorrent sizes its request queue from rate x `request_queue_time`. A
//! chunk's buffer is taken when its first block arrives, so a deep pipeline
//! costs requests, not memory. A chunk comes whole from one peer and is
//! handed out to be verified ([`DownloadOutput::Check`], to the engine's
//! [`crate::client::verify::Verifier`]); the verdict comes back through
//! [`Download::handle_checked`] once the chunk matched its SHA1 and is written,
//! or failed it. Only then is the chunk verified and announced; a mismatch
//! bans the peer that sent it for this download and the chunk goes back to
//! the pool. At most [`MAX_UNVERIFIED`] chunks wait for their verdict: past
//! that no new chunk is asked for, so a slow disk slows the download instead
//! of filling memory. A peer that sends nothing for `stall_timeout` while it
//! owes blocks loses its chunks. A peer that answers `Busy` (its upload
//! slots are taken) loses that chunk to the pool and is asked nothing until
//! it says `Ready`. With every peer place taken, a peer serving far more
//! downloaders than the others is traded for a source not connected yet
//! (`rebalance`), so that downloaders which started together do not all
//! stay on the first few of them.
//!
//! Driven by [`crate::client::ClientEngine`]: `handle_*` inputs, outputs drained
//! with [`Download::poll_output`], deadlines from [`Download::poll_timeout`].

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;

use crate::chunk::{chunk_len, FileDigest, CHUNK_SIZE};
use crate::client::peer::{Bitmap, Grant, Load, PeerMessage, BLOCK_SIZE, MAX_QUEUED_REQUESTS};
use crate::client::picker::PieceSelector;
use crate::identity::KeyId;
use crate::ids::{FileName, GroupId};
use crate::proto::{Role, SharerAddr, PROTOCOL_VERSION};
use crate::rng::Rng;
use crate::time::Millis;

/// A peer connection, named by the client engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeerConnId(pub u64);

#[derive(Clone, Copy, Debug)]
pub struct DownloadConfig {
    /// Chunks in flight per peer before its rate is known, and at least.
    pub chunks_per_peer: usize,
    /// A peer serving only us gets as many chunks in flight as it delivers
    /// in this time at its recent rate (at most [`MAX_CHUNKS_PER_PEER`]):
    /// longer than the round trip of any path worth using, so the pipeline
    /// grows on a long path until the path, not the asking, is the limit.
    pub queue_time: Millis,
    pub max_peers: usize,
    pub stall_timeout: Millis,
    /// Pause before reconnecting to a peer that hung up.
    pub reconnect_after: Millis,
    /// How often to ask the tracker for sources while some chunks have none.
    pub refresh_every: Millis,
    /// How many of the rarest chunks to choose among at random.
    pub rarest_window: usize,
    /// The download fails when no chunk arrived for this long (no live peer
    /// has what is missing), instead of waiting forever.
    pub give_up_after: Millis,
    /// Peer connections are plaintext (the client's
    /// `--insecure-plaintext-peers`; the engine copies its own setting
    /// here): no key is proved, so none is checked, and only peers that
    /// serve in plaintext are reached.
    pub plaintext_peers: bool,
    /// Good chunks that arrived ahead of the whole-file hash kept in memory
    /// for it ([`crate::client::verify::MAX_HELD_CHUNKS`], 32 MiB): the rest
    /// are read back and checked again when the hash reaches them. A
    /// simulation of a thousand clients in one process sets it low.
    pub hold_chunks: usize,
}

impl Default for DownloadConfig {
    fn default() -> Self {
        DownloadConfig {
            chunks_per_peer: 3,
            queue_time: Millis(1000),
            max_peers: 16,
            stall_timeout: Millis::from_secs(5),
            reconnect_after: Millis::from_secs(1),
            refresh_every: Millis::from_secs(2),
            rarest_window: 4,
            give_up_after: Millis::from_secs(60),
            plaintext_peers: false,
            hold_chunks: crate::client::verify::MAX_HELD_CHUNKS,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DownloadOutput {
    Connect {
        peer: PeerConnId,
        addr: SocketAddr,
    },
    Send {
        peer: PeerConnId,
        msg: PeerMessage,
    },
    Close {
        peer: PeerConnId,
    },
    /// A chunk arrived whole from one peer: verify it (and write it if it
    /// matches), then report the verdict with [`Download::handle_checked`].
    Check {
        chunk: u32,
        data: Vec<u8>,
    },
    /// A chunk passed its SHA1 and is written: share and announce it.
    Verified {
        chunk: u32,
    },
    /// A peer sent a chunk that failed its SHA1; it is banned for this file.
    Banned {
        addr: SocketAddr,
        chunk: u32,
    },
    /// The peer at `addr` proved a key that is not the one the tracker named
    /// for the sharer there: nothing was sent to it, and it is tried again
    /// only after a pause (the tracker may name a new key by then).
    NotTheSharer {
        addr: SocketAddr,
        expected: Option<KeyId>,
        found: Option<KeyId>,
    },
    /// Ask the tracker for the file's current sources.
    WantSources,
    /// Nothing arrived for `give_up_after`: the download cannot finish now.
    Failed {
        reason: String,
    },
}

struct Fetch {
    chunk: u32,
    /// The chunk's bytes; `buf[..received]` have arrived (blocks come in
    /// order). Empty until the first block arrives.
    buf: Vec<u8>,
    /// Bytes requested so far / received so far.
    requested: u32,
    received: u32,
}

struct Peer {
    addr: SocketAddr,
    /// `None` until its chunk map arrives.
    have: Option<Bitmap>,
    load: Load,
    fetches: Vec<Fetch>,
    last_progress: Millis,
    /// Bytes received, and since when: the measured rate.
    bytes: u64,
    since: Millis,
    /// The recent rate: bytes received since `sample_start` (`None` until
    /// the first block), and the rate of the samples so far (bytes/s).
    sample_start: Option<Millis>,
    sample_bytes: u64,
    recent_rate: u64,
    /// Chunks in flight this peer may have when it serves only us (see
    /// `DownloadConfig::queue_time`).
    depth: usize,
    /// It sent a map of less than the whole file: it is told what we hold.
    tell: bool,
    /// It answered `Busy` (its upload slots are taken): nothing is asked of
    /// it until it says `Ready`.
    busy: bool,
    /// It holds the whole file (its map was full, or it offers chunks one
    /// by one as a complete sharer does): never let go to rebalance.
    complete: bool,
}

impl Peer {
    fn rate(&self, now: Millis) -> u64 {
        let ms = now.since(self.since).0.max(1);
        self.bytes.saturating_mul(1000) / ms
    }

    /// Counts `n` bytes received: every [`RATE_SAMPLE`], or sooner once two
    /// chunks' worth arrived (but not within [`MIN_RATE_SAMPLE`]), the
    /// recent rate, and from it the depth, are updated. A faster sample is taken at once
    /// (a pipeline limited by its depth shows only so much, and grows by
    /// `queue_time` over the round trip each sample); a slower one halves
    /// the distance, so one stall does not empty a long path's pipeline.
    fn sample(&mut self, n: u32, now: Millis, cfg: &DownloadConfig) {
        let Some(start) = self.sample_start else {
            // The first block's wait is the request's round trip, not a rate.
            self.sample_start = Some(now);
            return;
        };
        self.sample_bytes += u64::from(n);
        let ms = now.since(start).0;
        let enough = self.sample_bytes >= 2 * CHUNK_SIZE && ms >= MIN_RATE_SAMPLE.0;
        if ms < RATE_SAMPLE.0 && !enough {
            return;
        }
        let rate = self.sample_bytes.saturating_mul(1000) / ms;
        self.recent_rate = if rate >= self.recent_rate { rate } else { (self.recent_rate + rate) / 2 };
        self.sample_start = Some(now);
        self.sample_bytes = 0;
        self.depth = pipeline_depth(self.recent_rate, cfg);
    }
}

/// Chunks in flight for a peer serving only us at `rate` bytes/s: what it
/// delivers in `queue_time`, plus the one being received, within
/// `chunks_per_peer..=MAX_CHUNKS_PER_PEER`.
pub fn pipeline_depth(rate: u64, cfg: &DownloadConfig) -> usize {
    let ahead = rate.saturating_mul(cfg.queue_time.0) / 1000 / CHUNK_SIZE;
    let max = MAX_CHUNKS_PER_PEER.max(cfg.chunks_per_peer);
    (ahead.min(max as u64) as usize + 1).clamp(cfg.chunks_per_peer, max)
}

#[derive(Default)]
struct Source {
    /// The key the tracker says the sharer at this address proved.
    key: Option<KeyId>,
    /// The key the peer last reached there proved instead (`Some(None)`:
    /// none), until one proves `key`.
    wrong_key: Option<Option<KeyId>>,
    conn: Option<PeerConnId>,
    banned: bool,
    retry_at: Millis,
    /// Refusals in a row: each doubles the pause before asking again.
    refusals: u32,
    /// Verified bytes it supplied.
    supplied: u64,
}

impl Source {
    /// Over TLS only a peer with a key to check; in plaintext only one
    /// serving in plaintext (the other kind cannot talk to us).
    fn reachable(&self, plaintext: bool) -> bool {
        self.key.is_none() == plaintext
    }

    /// Not connected, not banned and reachable: one to dial (at `retry_at`).
    fn dialable(&self, plaintext: bool) -> bool {
        self.conn.is_none() && !self.banned && self.reachable(plaintext)
    }
}

/// Chunks in flight per peer, at most: what a serving peer queues
/// ([`MAX_QUEUED_REQUESTS`] blocks, 8 MiB; more is a protocol error there).
/// At a 100 ms round trip that is 80 MB/s from one peer.
pub const MAX_CHUNKS_PER_PEER: usize = MAX_QUEUED_REQUESTS * BLOCK_SIZE as usize / CHUNK_SIZE as usize;

/// How often a peer's recent rate is measured, at least.
pub const RATE_SAMPLE: Millis = Millis(200);

/// The shortest time a rate is measured over (bursts of what the socket
/// held are not a rate).
pub const MIN_RATE_SAMPLE: Millis = Millis(20);

/// Chunk buffers a download keeps for reuse, at most (8 MiB).
pub const MAX_SPARE_BUFFERS: usize = 16;

/// Chunks received whole and waiting for their verdict, at most (16 MiB):
/// the verifier's queue, its hash job and the writes in flight.
pub const MAX_UNVERIFIED: usize = 32;

/// Chunks asked for and not yet verified, over all peers, at most (32 MiB
/// once they arrive): what bounds memory when chunks come faster than they
/// are hashed and written, with deep pipelines to many peers. At a 100 ms
/// round trip that is still 320 MB/s.
pub const MAX_CHUNKS_AHEAD: usize = 64;

/// The first ask for sources after the start; each next one waits twice as
/// long, up to `DownloadConfig::refresh_every`.
pub const FIRST_REFRESH: Millis = Millis(100);

/// How often a download with every peer place taken looks for peers that
/// serve far more downloaders than the others, to trade them for sources it
/// is not connected to (see `Download::rebalance`).
pub const REBALANCE_EVERY: Millis = Millis(250);

/// Peers traded at most per look.
pub const REBALANCE_SWAPS: usize = 2;

/// A peer let go for serving too many is dialled again no sooner than this.
pub const REBALANCE_BACKOFF: Millis = Millis(10_000);

/// Longest pause before asking a peer that refused us again.
pub const MAX_REFUSED_BACKOFF: Millis = Millis(30_000);

pub struct Download {
    cfg: DownloadConfig,
    pub group: GroupId,
    pub name: FileName,
    digest: FileDigest,
    grant: Grant,
    rng: Rng,
    selector: PieceSelector,
    peers: BTreeMap<PeerConnId, Peer>,
    sources: BTreeMap<SocketAddr, Source>,
    /// Chunks that arrived whole and wait for their verdict: who sent them.
    checking: BTreeMap<u32, SocketAddr>,
    /// Chunk buffers handed back after writing, for the next fetches: no
    /// allocation, zeroing or page faults per chunk.
    spare: Vec<Vec<u8>>,
    next_refresh: Millis,
    /// When `rebalance` looks next.
    next_rebalance: Millis,
    /// The pause before the refresh after it: from [`FIRST_REFRESH`],
    /// doubling up to `refresh_every`.
    refresh_gap: Millis,
    /// When the last verified chunk arrived (or the download started).
    last_chunk: Millis,
    failed: bool,
    out: VecDeque<DownloadOutput>,
    /// Ids for new connections come from the engine through this counter.
    next_conn: u64,
    conn_base: u64,
}

impl Download {
    /// `have` is what resuming found on disk; `conn_base` spaces this download's
    /// connection ids apart from others'.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: DownloadConfig,
        group: GroupId,
        name: FileName,
        digest: FileDigest,
        grant: Grant,
        have: Bitmap,
        conn_base: u64,
        rng: Rng,
        now: Millis,
    ) -> Download {
        let window = cfg.rarest_window;
        Download {
            cfg,
            group,
            name,
            digest,
            grant,
            rng,
            selector: PieceSelector::new(have, window),
            peers: BTreeMap::new(),
            sources: BTreeMap::new(),
            checking: BTreeMap::new(),
            spare: Vec::new(),
            // Soon, then less and less often: a crowd that starts
            // together learns of itself within a few round trips.
            next_refresh: now.plus(FIRST_REFRESH),
            next_rebalance: now.plus(REBALANCE_EVERY),
            refresh_gap: FIRST_REFRESH,
            last_chunk: now,
            failed: false,
            out: VecDeque::new(),
            next_conn: 0,
            conn_base,
        }
    }

    // ---- getters ----

    pub fn digest(&self) -> &FileDigest {
        &self.digest
    }

    pub fn done(&self) -> &Bitmap {
        self.selector.done()
    }

    pub fn is_complete(&self) -> bool {
        self.selector.is_complete()
    }

    /// Verified bytes so far.
    pub fn verified_bytes(&self) -> u64 {
        self.done().iter_set().map(|c| chunk_len(self.digest.size, c as u64)).sum()
    }

    /// Peers that have sent their chunk map.
    pub fn active_peers(&self) -> usize {
        self.peers.values().filter(|p| p.have.is_some()).count()
    }

    /// Sources banned for sending a chunk that failed its SHA1.
    pub fn banned(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.sources.iter().filter(|(_, s)| s.banned).map(|(a, _)| *a)
    }

    /// Sources where a peer proving another key than the sharer's answered
    /// last: the address, the key expected, the key found.
    pub fn not_the_sharer(&self) -> impl Iterator<Item = (SocketAddr, Option<KeyId>, Option<KeyId>)> + '_ {
        self.sources.iter().filter_map(|(a, s)| Some((*a, s.key, s.wrong_key?)))
    }

    /// Verified bytes per source address.
    pub fn supplied(&self) -> impl Iterator<Item = (SocketAddr, u64)> + '_ {
        self.sources.iter().map(|(a, s)| (*a, s.supplied))
    }

    pub fn owns(&self, peer: PeerConnId) -> bool {
        self.peers.contains_key(&peer)
    }

    /// A fresh grant from the tracker, for connections opened from now on.
    pub fn set_grant(&mut self, grant: Grant) {
        self.grant = grant;
    }

    // ---- inputs ----

    /// The tracker's current list of sources, each with the key its sharer
    /// proved (a new key at an address replaces the old one).
    pub fn handle_sources(&mut self, sharers: &[SharerAddr], now: Millis) {
        for a in sharers {
            let s = self.sources.entry(a.addr).or_default();
            if s.key != a.key {
                s.key = a.key;
                s.wrong_key = None;
                s.retry_at = now;
                s.refusals = 0;
            }
        }
        self.connect_more(now);
    }

    /// The connection is open; `key` is what the other end proved (`None`
    /// on a plaintext connection). Unless it is the sharer the tracker named,
    /// nothing is sent on it: it is closed, and its address tried again later.
    pub fn handle_connected(&mut self, peer: PeerConnId, key: Option<KeyId>, now: Millis) {
        let Some(p) = self.peers.get_mut(&peer) else { return };
        let expected = self.sources.get(&p.addr).and_then(|s| s.key);
        let addr = p.addr;
        if !self.cfg.plaintext_peers && (key.is_none() || key != expected) {
            if let Some(s) = self.sources.get_mut(&addr) {
                s.wrong_key = Some(key);
            }
            self.out.push_back(DownloadOutput::NotTheSharer { addr, expected, found: key });
            return self.refused(peer, now);
        }
        if let Some(s) = self.sources.get_mut(&addr) {
            s.wrong_key = None;
        }
        p.last_progress = now;
        p.since = now;
        let want = PeerMessage::Want {
            group: self.group.clone(),
            name: self.name.clone(),
            sha1: self.digest.sha1,
            grant: self.grant,
        };
        self.out.push_back(DownloadOutput::Send {
            peer,
            msg: PeerMessage::Hello { protocol_version: PROTOCOL_VERSION, role: Role::Peer },
        });
        self.out.push_back(DownloadOutput::Send { peer, msg: want });
    }

    pub fn handle_closed(&mut self, peer: PeerConnId, now: Millis) {
        let Some(p) = self.peers.remove(&peer) else { return };
        for f in &p.fetches {
            self.selector.abandon(f.chunk);
        }
        if let Some(h) = &p.have {
            self.selector.remove_peer(h);
        }
        if let Some(s) = self.sources.get_mut(&p.addr) {
            s.conn = None;
            s.retry_at = now.plus(self.cfg.reconnect_after);
        }
        self.fill(now);
    }

    pub fn handle_message(&mut self, peer: PeerConnId, msg: PeerMessage, now: Millis) {
        if !self.peers.contains_key(&peer) {
            return;
        }
        let n = self.done().len();
        match msg {
            PeerMessage::Hello { protocol_version: PROTOCOL_VERSION, role: Role::Peer } => {}
            PeerMessage::Have { chunks, load } => {
                let p = self.peers.get_mut(&peer).expect("checked");
                if let Some(s) = self.sources.get_mut(&p.addr) {
                    s.refusals = 0;
                }
                if !chunks.fits(n) || p.have.is_some() {
                    return self.drop_peer(peer, false, now);
                }
                self.selector.add_peer(&chunks);
                // What we hold, then a `HaveOne` per chunk verified, to a
                // peer that has not everything: one offering chunks one by
                // one (super-seeding) offers ones we lack, and one serving
                // a crowd serves first the chunks fewest of it hold. A
                // complete sharer that sent its whole map has no use for them.
                let partial = chunks.count() < n;
                if partial {
                    let msg = PeerMessage::Have { chunks: self.selector.done().clone(), load: Load::default() };
                    self.out.push_back(DownloadOutput::Send { peer, msg });
                }
                p.tell = partial;
                p.complete = !partial;
                p.have = Some(chunks);
                p.load = load;
                p.last_progress = now;
            }
            PeerMessage::HaveOne { chunk } if chunk < n => {
                let p = self.peers.get_mut(&peer).expect("checked");
                if let Some(h) = &mut p.have {
                    if !h.get(chunk) {
                        h.set(chunk);
                        self.selector.add_have(chunk);
                    }
                }
            }
            // A sharer's map replaced: by its offers from now on, or by all.
            PeerMessage::OffersOnly | PeerMessage::HaveAll => {
                let offers = matches!(msg, PeerMessage::OffersOnly);
                let map = if offers { Bitmap::new(n) } else { Bitmap::full(n) };
                let p = self.peers.get_mut(&peer).expect("checked");
                let Some(old) = p.have.take() else {
                    return self.drop_peer(peer, false, now);
                };
                self.selector.remove_peer(&old);
                self.selector.add_peer(&map);
                p.have = Some(map);
                p.complete = true;
                // One offering chunks offers those we lack: it hears what we hold.
                if offers && !p.tell {
                    p.tell = true;
                    let msg = PeerMessage::Have { chunks: self.selector.done().clone(), load: Load::default() };
                    self.out.push_back(DownloadOutput::Send { peer, msg });
                }
            }
            PeerMessage::Block { chunk, offset, load, data } => {
                return self.handle_block(peer, chunk, offset, load, &data, now);
            }
            // Its slots are taken: the chunk goes back to the pool (for a
            // peer that can send it sooner), and nothing more is asked of it
            // until it is `Ready`. Nothing of that chunk was sent.
            PeerMessage::Busy { chunk } => {
                let p = self.peers.get_mut(&peer).expect("checked");
                p.busy = true;
                if let Some(i) = p.fetches.iter().position(|f| f.chunk == chunk && f.received == 0) {
                    p.fetches.remove(i);
                    p.last_progress = now;
                    self.selector.abandon(chunk);
                }
            }
            PeerMessage::Ready => {
                self.peers.get_mut(&peer).expect("checked").busy = false;
            }
            PeerMessage::Refused { reason } => {
                tracing::debug!(%reason, "peer refused");
                return self.refused(peer, now);
            }
            _ => return self.drop_peer(peer, false, now),
        }
        self.fill(now);
    }

    pub fn handle_timeout(&mut self, now: Millis) {
        if self.failed || self.is_complete() {
            return;
        }
        if now.since(self.last_chunk) >= self.cfg.give_up_after {
            self.failed = true;
            let secs = self.cfg.give_up_after.0 / 1000;
            let reason = format!("no chunk arrived for {secs} s: no live peer has the missing chunks");
            self.close_all();
            self.out.push_back(DownloadOutput::Failed { reason });
            return;
        }
        let stalled: Vec<PeerConnId> = self
            .peers
            .iter()
            .filter(|(_, p)| {
                let owes = !p.fetches.is_empty() || p.have.is_none();
                owes && now.since(p.last_progress) >= self.cfg.stall_timeout
            })
            .map(|(c, _)| *c)
            .collect();
        for peer in stalled {
            tracing::debug!(addr = %self.peers[&peer].addr, "peer stalled, dropping its chunks");
            self.drop_peer(peer, false, now);
        }
        if now >= self.next_refresh {
            self.refresh_gap = Millis(self.refresh_gap.0.saturating_mul(2)).min(self.cfg.refresh_every);
            self.next_refresh = now.plus(self.refresh_gap);
            if !self.is_complete() {
                self.out.push_back(DownloadOutput::WantSources);
            }
        }
        self.rebalance(now);
        self.connect_more(now);
        self.fill(now);
    }

    pub fn poll_output(&mut self) -> Option<DownloadOutput> {
        self.out.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Millis> {
        if self.failed || self.is_complete() {
            return None;
        }
        let stall = self
            .peers
            .values()
            .filter(|p| !p.fetches.is_empty() || p.have.is_none())
            .map(|p| p.last_progress.plus(self.cfg.stall_timeout))
            .min();
        let plaintext = self.cfg.plaintext_peers;
        // A source waiting to be dialled matters only while there is room
        // for another peer: with `max_peers` connected, its (past) retry
        // time would make this deadline always due, and the driver spin.
        // (Not even looked at then: a swarm's sources are many.)
        let room = self.peers.len() < self.cfg.max_peers;
        let retry =
            if room { self.sources.values().filter(|s| s.dialable(plaintext)).map(|s| s.retry_at).min() } else { None };
        let give_up = self.last_chunk.plus(self.cfg.give_up_after);
        let rebalance = self.overloaded().next().is_some().then_some(self.next_rebalance);
        [stall, retry, rebalance, Some(self.next_refresh), Some(give_up)].into_iter().flatten().min()
    }

    /// Ends the download's connections (it finished, failed or was stopped).
    pub fn close_all(&mut self) {
        for peer in std::mem::take(&mut self.peers).into_keys() {
            self.out.push_back(DownloadOutput::Close { peer });
        }
        for s in self.sources.values_mut() {
            s.conn = None;
        }
    }

    // ---- internals ----

    fn connect_more(&mut self, now: Millis) {
        if self.is_complete() {
            return;
        }
        let plaintext = self.cfg.plaintext_peers;
        let mut ready: Vec<SocketAddr> =
            self.sources.iter().filter(|(_, s)| s.dialable(plaintext) && s.retry_at <= now).map(|(a, _)| *a).collect();
        // Dialled in random order: a crowd of downloaders given the same
        // list must not all connect to its first `max_peers` addresses,
        // leaving the others' uploads unused.
        while self.peers.len() < self.cfg.max_peers && !ready.is_empty() {
            let addr = ready.swap_remove(self.rng.below(ready.len() as u64) as usize);
            let Some(s) = self.sources.get_mut(&addr) else { continue };
            self.next_conn += 1;
            let peer = PeerConnId(self.conn_base + self.next_conn);
            s.conn = Some(peer);
            self.peers.insert(
                peer,
                Peer {
                    addr,
                    have: None,
                    load: Load::default(),
                    fetches: Vec::new(),
                    last_progress: now,
                    bytes: 0,
                    since: now,
                    sample_start: None,
                    sample_bytes: 0,
                    recent_rate: 0,
                    depth: self.cfg.chunks_per_peer,
                    tell: false,
                    busy: false,
                    complete: false,
                },
            );
            self.out.push_back(DownloadOutput::Connect { peer, addr });
        }
    }

    /// Downloaders a peer may serve before it counts as overloaded: a
    /// quarter more than the peers each downloader keeps, what each source
    /// serves on average when every downloader of a crowd dials that many.
    fn overload(&self) -> usize {
        self.cfg.max_peers + self.cfg.max_peers / 4
    }

    /// Connected peers that serve more than `overload` downloaders (as
    /// they last reported), hold only part of the file, and are not
    /// sending us a chunk now, while every peer place is taken: the ones
    /// `rebalance` may let go.
    fn overloaded(&self) -> impl Iterator<Item = (u16, PeerConnId)> + '_ {
        let full = self.peers.len() >= self.cfg.max_peers;
        let limit = self.overload();
        self.peers
            .iter()
            .filter(move |(_, p)| {
                full && p.have.is_some()
                    && !p.complete
                    && usize::from(p.load.uploads) > limit
                    && p.fetches.iter().all(|f| f.received == 0)
            })
            .map(|(c, p)| (p.load.uploads, *c))
    }

    /// Trades the most loaded of the `overloaded` peers (up to
    /// [`REBALANCE_SWAPS`]) for sources not connected yet, every
    /// [`REBALANCE_EVERY`]. Downloaders that start together dial from the
    /// lists they got, each holding only the ones that started before it,
    /// so the first few serve most of the crowd and the last few serve
    /// almost no one: their upload is lost to the swarm. A peer that serves
    /// many gives each of them little; one dialled at random from the rest
    /// likely serves fewer. The peer let go is dialled again no sooner than
    /// [`REBALANCE_BACKOFF`]. A complete sharer is never let go.
    fn rebalance(&mut self, now: Millis) {
        if now < self.next_rebalance {
            return;
        }
        self.next_rebalance = now.plus(REBALANCE_EVERY);
        let plaintext = self.cfg.plaintext_peers;
        let ready = self.sources.values().filter(|s| s.dialable(plaintext) && s.retry_at <= now).count();
        let mut over: Vec<(u16, PeerConnId)> = self.overloaded().collect();
        over.sort_unstable_by(|a, b| b.cmp(a));
        over.truncate(ready.min(REBALANCE_SWAPS));
        for (uploads, peer) in over {
            let Some(addr) = self.peers.get(&peer).map(|p| p.addr) else { continue };
            tracing::debug!(%addr, uploads, "letting go of a peer that serves many, for one that may serve fewer");
            self.drop_peer(peer, false, now);
            if let Some(s) = self.sources.get_mut(&addr) {
                s.retry_at = now.plus(REBALANCE_BACKOFF);
            }
        }
    }

    /// Drops a peer that refused us (or is not who the tracker said). Maybe
    /// for good (no access, it stopped sharing), maybe for now (our grant has
    /// not reached its tracker yet, that tracker just failed, the sharer
    /// came back with a new key): ask again later, less and less often.
    fn refused(&mut self, peer: PeerConnId, now: Millis) {
        let Some(addr) = self.peers.get(&peer).map(|p| p.addr) else { return };
        self.drop_peer(peer, false, now);
        if let Some(s) = self.sources.get_mut(&addr) {
            s.refusals = s.refusals.saturating_add(1);
            let pause = self.cfg.reconnect_after.0.saturating_mul(1 << s.refusals.min(16));
            s.retry_at = now.plus(Millis(pause.min(MAX_REFUSED_BACKOFF.0)));
        }
    }

    fn drop_peer(&mut self, peer: PeerConnId, ban: bool, now: Millis) {
        if let Some(p) = self.peers.get(&peer) {
            if ban {
                if let Some(s) = self.sources.get_mut(&p.addr) {
                    s.banned = true;
                }
            }
            self.out.push_back(DownloadOutput::Close { peer });
            self.handle_closed(peer, now);
        }
    }

    /// A block from a peer, borrowed straight from its frame. Same as
    /// `handle_message` with a `Block`.
    pub fn handle_block(&mut self, peer: PeerConnId, chunk: u32, offset: u32, load: Load, data: &[u8], now: Millis) {
        if !self.peers.contains_key(&peer) {
            return;
        }
        let copied = self.recv_space(peer, chunk, offset).map(|space| {
            let fits = !data.is_empty() && data.len() <= space.len();
            if fits {
                space[..data.len()].copy_from_slice(data);
            }
            fits
        });
        match copied {
            Some(true) => self.handle_block_landed(peer, chunk, offset, load, data.len() as u32, now),
            // A block for a chunk we cancelled (endgame) may still arrive.
            None if !self.is_fetching(peer, chunk)
                && (self.selector.done().get(chunk) || self.selector.is_checking(chunk)) =>
            {
                self.peers.get_mut(&peer).expect("checked").load = load;
                self.fill(now);
            }
            _ => self.drop_peer(peer, false, now),
        }
    }

    /// Where the data of `peer`'s block for `chunk` at `offset` goes, if
    /// that is the next thing expected from it: the rest of the chunk's
    /// buffer. A driver may receive a block's data straight into it and then
    /// report it with [`Download::handle_block_landed`] (no copy on the way).
    pub fn recv_space(&mut self, peer: PeerConnId, chunk: u32, offset: u32) -> Option<&mut [u8]> {
        let f = self.peers.get_mut(&peer)?.fetches.iter_mut().find(|f| f.chunk == chunk)?;
        if offset != f.received {
            return None;
        }
        if f.buf.is_empty() {
            let len = f.requested as usize;
            f.buf = match self.spare.pop() {
                // Old bytes in it are overwritten before they are read.
                Some(mut b) => {
                    b.resize(len, 0);
                    b
                }
                None => vec![0; len],
            };
        }
        Some(&mut f.buf[f.received as usize..f.requested as usize])
    }

    fn is_fetching(&self, peer: PeerConnId, chunk: u32) -> bool {
        self.peers.get(&peer).is_some_and(|p| p.fetches.iter().any(|f| f.chunk == chunk))
    }

    /// `n` bytes of `peer`'s block for `chunk` at `offset` are in place at
    /// the start of [`Download::recv_space`] (all of a block, or a piece of
    /// it as it arrives).
    pub fn handle_block_landed(&mut self, peer: PeerConnId, chunk: u32, offset: u32, load: Load, n: u32, now: Millis) {
        let Some(p) = self.peers.get_mut(&peer) else { return };
        let load_changed = p.load != load;
        // Past half a chunk a shared peer's pipeline takes the next one.
        let half = (CHUNK_SIZE / 2) as u32;
        let halfway = offset < half && offset + n >= half;
        match self.land(peer, chunk, offset, load, n, now) {
            None => self.drop_peer(peer, false, now),
            // A finished chunk frees a place in the peer's pipeline.
            Some(complete) if complete || load_changed || halfway => self.fill(now),
            Some(_) => {}
        }
    }

    /// Files landed block bytes: whether that completed the chunk, `None` on
    /// a protocol violation.
    fn land(&mut self, peer: PeerConnId, chunk: u32, offset: u32, load: Load, n: u32, now: Millis) -> Option<bool> {
        let size = self.digest.size;
        let p = self.peers.get_mut(&peer).expect("checked");
        p.load = load;
        let i = p.fetches.iter().position(|f| f.chunk == chunk)?;
        let f = &mut p.fetches[i];
        let end = offset as u64 + n as u64;
        // Landed bytes went through `recv_space`, which took the buffer.
        if offset != f.received || end > f.requested as u64 || n == 0 || f.buf.len() < f.requested as usize {
            return None;
        }
        f.received = end as u32;
        let whole = f.received as u64 >= chunk_len(size, chunk as u64);
        p.last_progress = now;
        p.bytes += n as u64;
        p.sample(n, now, &self.cfg);
        if !whole {
            return Some(false);
        }
        let f = p.fetches.remove(i);
        self.selector.received(chunk);
        self.checking.insert(chunk, p.addr);
        // Endgame: cancel the other copies of this chunk. Should this one
        // fail its SHA1, the chunk is free again and fetched anew.
        for (other, q) in self.peers.iter_mut() {
            if let Some(j) = q.fetches.iter().position(|g| g.chunk == chunk) {
                let g = q.fetches.remove(j);
                self.selector.abandon(chunk);
                let len = g.requested - g.received;
                if len > 0 {
                    let msg = PeerMessage::Cancel { chunk, offset: g.received, len };
                    self.out.push_back(DownloadOutput::Send { peer: *other, msg });
                }
            }
        }
        self.out.push_back(DownloadOutput::Check { chunk, data: f.buf });
        Some(true)
    }

    /// A chunk buffer handed out with [`DownloadOutput::Check`], no longer
    /// needed: later fetches reuse it (up to [`MAX_SPARE_BUFFERS`]).
    pub fn reuse_buffer(&mut self, buf: Vec<u8>) {
        if self.spare.len() < MAX_SPARE_BUFFERS && buf.capacity() <= CHUNK_SIZE as usize {
            self.spare.push(buf);
        }
    }

    /// The verdict on a chunk handed out with [`DownloadOutput::Check`]: it
    /// matched its SHA1 and is written (`ok`), or it did not and was not
    /// written, and the peer that sent it is banned for this file (its
    /// connection closed if still open) and the chunk fetched from another.
    pub fn handle_checked(&mut self, chunk: u32, ok: bool, now: Millis) {
        let Some(addr) = self.checking.remove(&chunk) else { return };
        if ok {
            self.selector.verified(chunk);
            self.last_chunk = now;
            if let Some(s) = self.sources.get_mut(&addr) {
                s.supplied += chunk_len(self.digest.size, chunk as u64);
            }
            self.out.push_back(DownloadOutput::Verified { chunk });
            for (&peer, _) in self.peers.iter().filter(|(_, p)| p.tell) {
                self.out.push_back(DownloadOutput::Send { peer, msg: PeerMessage::HaveOne { chunk } });
            }
            if self.is_complete() {
                self.close_all();
            } else {
                self.fill(now);
            }
            return;
        }
        tracing::warn!(%addr, chunk, "chunk failed its SHA1; banning the peer for this file");
        self.selector.rejected(chunk);
        self.out.push_back(DownloadOutput::Banned { addr, chunk });
        let s = self.sources.entry(addr).or_default();
        s.banned = true;
        let conn = s.conn;
        match conn {
            Some(peer) => self.drop_peer(peer, true, now),
            None => self.fill(now),
        }
    }

    /// Gives free chunks to peers with room, least loaded first.
    fn fill(&mut self, now: Millis) {
        if self.is_complete() || self.checking.len() >= MAX_UNVERIFIED {
            return;
        }
        // Peers busier than the least loaded one get a shallower pipeline.
        let lightest = self.peers.values().filter(|p| p.have.is_some()).map(|p| p.load).min().unwrap_or_default();
        // Deep pipelines only while verifying keeps up: when chunks wait to
        // be hashed and written, the path is not what limits the download,
        // and more asked ahead would only be held in memory.
        let behind = self.checking.len() >= MAX_UNVERIFIED * 3 / 4;
        let min_depth = self.cfg.chunks_per_peer;
        let capacity = |p: &Peer| {
            let full = if behind { min_depth } else { p.depth };
            if p.load.uploads > 1 {
                // A peer that serves others too (a swarm): one chunk at a
                // time, and the next asked for once half of it arrived, so
                // its queue stays short and what it gains reaches the
                // others soon, not behind everyone's deep pipelines.
                let owed: u64 = p.fetches.iter().map(|f| u64::from(f.requested - f.received)).sum();
                let more = p.fetches.is_empty() || (p.fetches.len() < 2 && owed <= CHUNK_SIZE / 2);
                p.fetches.len() + usize::from(more)
            } else if p.load > lightest {
                full.div_ceil(2)
            } else {
                full
            }
        };
        let mut order: Vec<(Load, usize, std::cmp::Reverse<u64>, PeerConnId)> = self
            .peers
            .iter()
            .filter(|(_, p)| p.have.is_some() && !p.busy && p.fetches.len() < capacity(p))
            .map(|(c, p)| (p.load, p.fetches.len(), std::cmp::Reverse(p.rate(now)), *c))
            .collect();
        order.sort();
        let mut ahead = self.checking.len() + self.peers.values().map(|p| p.fetches.len()).sum::<usize>();
        // Round-robin over the ordered peers, one chunk each per round, so
        // chunks spread over peers before any peer's pipeline fills.
        loop {
            let mut progressed = false;
            for &(_, _, _, peer) in &order {
                if ahead >= MAX_CHUNKS_AHEAD {
                    return;
                }
                let p = self.peers.get_mut(&peer).expect("listed");
                if p.fetches.len() >= capacity(p) {
                    continue;
                }
                let fetching: Vec<u32> = p.fetches.iter().map(|f| f.chunk).collect();
                let Some(chunk) = self.selector.pick(p.have.as_ref().expect("filtered"), &fetching, &mut self.rng)
                else {
                    continue;
                };
                let len = chunk_len(self.digest.size, chunk as u64) as u32;
                p.fetches.push(Fetch { chunk, buf: Vec::new(), requested: len, received: 0 });
                ahead += 1;
                if p.fetches.len() == 1 {
                    p.last_progress = now;
                }
                let mut offset = 0;
                while offset < len {
                    let l = BLOCK_SIZE.min(len - offset);
                    self.out
                        .push_back(DownloadOutput::Send { peer, msg: PeerMessage::Request { chunk, offset, len: l } });
                    offset += l;
                }
                progressed = true;
            }
            if !progressed {
                break;
            }
        }
    }
}

/// Byte offset of a chunk in the file.
pub fn chunk_offset(chunk: u32) -> u64 {
    chunk as u64 * CHUNK_SIZE
}

#[cfg(test)]
mod tests;
