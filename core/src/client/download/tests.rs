use super::*;
use crate::chunk::FileHasher;
use std::collections::BTreeSet;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Behaviour {
    Good,
    /// Flips a byte of every block it sends.
    Corrupt,
    /// Answers the handshake, then never sends a block.
    Silent,
}

struct Harness {
    content: Vec<u8>,
    peers: BTreeMap<SocketAddr, (Behaviour, Load)>,
    conns: BTreeMap<PeerConnId, SocketAddr>,
    written: BTreeMap<u32, Vec<u8>>,
    /// Verdicts not yet delivered, as from a writer thread that lags behind.
    verdicts: VecDeque<(u32, bool)>,
    verified: BTreeSet<u32>,
    banned: BTreeSet<SocketAddr>,
    closed: BTreeSet<SocketAddr>,
    failed: Option<String>,
    requests_by_addr: BTreeMap<SocketAddr, u32>,
    now: Millis,
}

fn content(len: usize) -> Vec<u8> {
    let mut r = Rng::from_u64(len as u64);
    let mut v = vec![0; len];
    r.fill(&mut v);
    v
}

fn digest_of(data: &[u8]) -> FileDigest {
    let mut h = FileHasher::new();
    h.update(data).unwrap();
    h.finish().unwrap()
}

/// The key the sharer at `a` proved to its tracker.
fn key_at(a: SocketAddr) -> KeyId {
    let mut k = [0x5a; 32];
    if let std::net::IpAddr::V4(ip) = a.ip() {
        k[..4].copy_from_slice(&ip.octets());
    }
    k[4..6].copy_from_slice(&a.port().to_be_bytes());
    KeyId(k)
}

fn sharers(addrs: &[SocketAddr]) -> Vec<SharerAddr> {
    addrs.iter().map(|&a| SharerAddr { addr: a, key: Some(key_at(a)) }).collect()
}

fn addr(i: u8) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, i], 9000))
}

impl Harness {
    fn new(len: usize, peers: &[(Behaviour, Load)]) -> Harness {
        Harness {
            content: content(len),
            peers: peers.iter().enumerate().map(|(i, b)| (addr(i as u8 + 1), *b)).collect(),
            conns: BTreeMap::new(),
            written: BTreeMap::new(),
            verdicts: VecDeque::new(),
            verified: BTreeSet::new(),
            banned: BTreeSet::new(),
            closed: BTreeSet::new(),
            failed: None,
            requests_by_addr: BTreeMap::new(),
            now: Millis(0),
        }
    }

    fn download(&self, cfg: DownloadConfig) -> Download {
        let d = digest_of(&self.content);
        let n = d.chunks.len() as u32;
        new_download(cfg, d, Bitmap::new(n), 1 << 32, 9, self.now)
    }

    /// Runs until complete or `limit` of virtual time.
    fn run(&mut self, d: &mut Download, limit: Millis) {
        let addrs: Vec<SocketAddr> = self.peers.keys().copied().collect();
        let addrs = sharers(&addrs);
        d.handle_sources(&addrs, self.now);
        let mut inbox: VecDeque<(PeerConnId, PeerMessage)> = VecDeque::new();
        // Runs until complete and every output is drained.
        while (!d.is_complete() || !inbox.is_empty() || self.pending(d)) && self.now < limit && self.failed.is_none() {
            while let Some(o) = d.poll_output() {
                match o {
                    DownloadOutput::Connect { peer, addr } => {
                        self.conns.insert(peer, addr);
                        d.handle_connected(peer, Some(key_at(addr)), self.now);
                    }
                    DownloadOutput::Close { peer } => {
                        if let Some(a) = self.conns.remove(&peer) {
                            self.closed.insert(a);
                        }
                    }
                    DownloadOutput::Send { peer, msg } => {
                        let Some(a) = self.conns.get(&peer) else { continue };
                        let (behaviour, load) = self.peers[a];
                        match msg {
                            PeerMessage::Want { .. } => {
                                let n = digest_of(&self.content).chunks.len() as u32;
                                inbox.push_back((peer, PeerMessage::Have { chunks: Bitmap::full(n), load }));
                            }
                            PeerMessage::Request { chunk, offset, len } => {
                                *self.requests_by_addr.entry(*a).or_default() += 1;
                                let start = chunk_offset(chunk) as usize + offset as usize;
                                let mut data = self.content[start..start + len as usize].to_vec();
                                match behaviour {
                                    Behaviour::Good => {}
                                    Behaviour::Corrupt => data[0] ^= 0xff,
                                    Behaviour::Silent => continue,
                                }
                                inbox.push_back((peer, PeerMessage::Block { chunk, offset, load, data }));
                            }
                            _ => {}
                        }
                    }
                    DownloadOutput::Check { chunk, data } => {
                        let ok = digest_of(&self.content).chunks[chunk as usize].matches(&data);
                        if ok {
                            assert!(self.written.insert(chunk, data).is_none(), "chunk {chunk} written twice");
                        }
                        self.verdicts.push_back((chunk, ok));
                    }
                    DownloadOutput::Verified { chunk } => {
                        assert!(self.written.contains_key(&chunk), "chunk {chunk} verified before it was written");
                        assert!(self.verified.insert(chunk), "chunk {chunk} verified twice");
                    }
                    DownloadOutput::Banned { addr, .. } => {
                        self.banned.insert(addr);
                    }
                    DownloadOutput::NotTheSharer { addr, .. } => panic!("{addr} proved its own key"),
                    DownloadOutput::WantSources => d.handle_sources(&addrs, self.now),
                    DownloadOutput::Failed { reason } => self.failed = Some(reason),
                }
            }
            // Verdicts and peer messages interleave: blocks keep arriving
            // while earlier chunks are being checked.
            if let Some((peer, msg)) = inbox.pop_front() {
                if self.conns.contains_key(&peer) {
                    d.handle_message(peer, msg, self.now);
                }
                if inbox.len().is_multiple_of(3) {
                    if let Some((chunk, ok)) = self.verdicts.pop_front() {
                        d.handle_checked(chunk, ok, self.now);
                    }
                }
                continue;
            }
            if let Some((chunk, ok)) = self.verdicts.pop_front() {
                d.handle_checked(chunk, ok, self.now);
                continue;
            }
            if d.is_complete() || self.failed.is_some() {
                continue;
            }
            self.now = d.poll_timeout().expect("an unfinished download has a deadline").max(self.now);
            d.handle_timeout(self.now);
        }
    }

    fn pending(&self, d: &Download) -> bool {
        !d.out.is_empty() || !self.verdicts.is_empty()
    }

    fn assemble(&self) -> Vec<u8> {
        self.written.values().flatten().copied().collect()
    }
}

#[test]
fn fetches_every_chunk_once_from_several_peers() {
    let mut h = Harness::new(20 * CHUNK_SIZE as usize + 1234, &[(Behaviour::Good, Load::default()); 3]);
    let mut d = h.download(DownloadConfig::default());
    h.run(&mut d, Millis::from_secs(60));
    assert!(d.is_complete());
    assert!(h.assemble() == h.content, "assembled file differs");
    let supplied: Vec<u64> = d.supplied().map(|(_, b)| b).collect();
    assert_eq!(supplied.iter().sum::<u64>(), h.content.len() as u64);
    assert!(supplied.iter().all(|&b| b > 0), "every peer supplied a share: {supplied:?}");
}

#[test]
fn a_corrupt_peer_is_banned_and_its_chunks_come_from_others() {
    let peers = [(Behaviour::Good, Load::default()), (Behaviour::Corrupt, Load::default())];
    let mut h = Harness::new(12 * CHUNK_SIZE as usize, &peers);
    let mut d = h.download(DownloadConfig::default());
    h.run(&mut d, Millis::from_secs(60));
    assert!(d.is_complete());
    assert!(h.assemble() == h.content, "nothing unverified was written");
    assert_eq!(h.banned, BTreeSet::from([addr(2)]));
    let from_corrupt = d.supplied().find(|(a, _)| *a == addr(2)).unwrap().1;
    assert_eq!(from_corrupt, 0);
}

#[test]
fn a_stalled_peer_loses_its_chunks() {
    let peers = [(Behaviour::Silent, Load::default()), (Behaviour::Good, Load::default())];
    let mut h = Harness::new(8 * CHUNK_SIZE as usize, &peers);
    let mut d = h.download(DownloadConfig::default());
    h.run(&mut d, Millis::from_secs(120));
    assert!(d.is_complete(), "the endgame takes the silent peer's chunks");
    assert!(h.assemble() == h.content, "assembled file differs");
    assert_eq!(d.supplied().find(|(a, _)| *a == addr(1)).unwrap().1, 0);

    // Alone, a silent peer is dropped after the stall timeout and its chunks freed.
    let mut h = Harness::new(4 * CHUNK_SIZE as usize, &[(Behaviour::Silent, Load::default())]);
    let mut d = h.download(DownloadConfig::default());
    let stall = DownloadConfig::default().stall_timeout;
    h.run(&mut d, stall.plus(Millis(1)));
    assert!(h.closed.contains(&addr(1)), "stalled peer was dropped");
    assert!((0..4).all(|c| d.selector.in_flight(c) == 0), "its chunks went back to the pool");
}

#[test]
fn the_least_loaded_peer_is_asked_first() {
    let busy = Load { uploads: 9, queued: 50 };
    let peers = [(Behaviour::Good, busy), (Behaviour::Good, Load::default())];
    let mut h = Harness::new(40 * CHUNK_SIZE as usize, &peers);
    let mut d = h.download(DownloadConfig::default());
    h.run(&mut d, Millis::from_secs(60));
    assert!(d.is_complete());
    let idle = h.requests_by_addr[&addr(2)];
    let loaded = h.requests_by_addr.get(&addr(1)).copied().unwrap_or(0);
    assert!(idle > loaded, "idle peer got {idle} requests, loaded one {loaded}");
}

/// A download of file "f" in group "g" with grant [1; 16]: `have` already
/// verified, peer connections numbered from `conn_base`, randomness from `seed`.
fn new_download(
    cfg: DownloadConfig,
    digest: FileDigest,
    have: Bitmap,
    conn_base: u64,
    seed: u64,
    now: Millis,
) -> Download {
    let (group, name) = (GroupId::new("g").unwrap(), FileName::new("f").unwrap());
    Download::new(cfg, group, name, digest, Grant([1; 16]), have, conn_base, Rng::from_u64(seed), now)
}

#[test]
fn resuming_fetches_only_what_is_missing() {
    let mut h = Harness::new(6 * CHUNK_SIZE as usize, &[(Behaviour::Good, Load::default())]);
    let d0 = digest_of(&h.content);
    let mut have = Bitmap::new(6);
    for c in [0, 2, 5] {
        have.set(c);
    }
    let mut d = new_download(DownloadConfig::default(), d0, have, 0, 1, Millis(0));
    h.run(&mut d, Millis::from_secs(60));
    assert!(d.is_complete());
    assert_eq!(h.written.keys().copied().collect::<Vec<_>>(), vec![1, 3, 4]);
}

#[test]
fn a_download_nobody_can_serve_fails_instead_of_waiting_forever() {
    let mut h = Harness::new(4 * CHUNK_SIZE as usize, &[(Behaviour::Silent, Load::default())]);
    let mut d = h.download(DownloadConfig::default());
    h.run(&mut d, Millis::from_secs(600));
    let reason = h.failed.expect("the download gives up");
    assert!(reason.contains("no chunk arrived for 60 s"), "{reason}");
    assert!(h.now >= Millis::from_secs(60) && h.now < Millis::from_secs(61));
    assert_eq!(d.poll_timeout(), None, "a failed download asks for no more timers");
}

#[test]
fn a_bad_chunk_bans_its_sender_even_after_it_hung_up() {
    let content = content(CHUNK_SIZE as usize / 2);
    let digest = digest_of(&content);
    let mut d = new_download(DownloadConfig::default(), digest, Bitmap::new(1), 0, 5, Millis(0));
    let outs = |d: &mut Download| std::iter::from_fn(|| d.poll_output()).collect::<Vec<_>>();
    d.handle_sources(&sharers(&[addr(1)]), Millis(0));
    let Some(DownloadOutput::Connect { peer, .. }) = outs(&mut d).into_iter().next() else { panic!("no connect") };
    d.handle_connected(peer, Some(key_at(addr(1))), Millis(1));
    d.handle_message(peer, PeerMessage::Have { chunks: Bitmap::full(1), load: Load::default() }, Millis(2));
    let mut check = None;
    for o in outs(&mut d) {
        if let DownloadOutput::Send { msg: PeerMessage::Request { chunk, offset, len }, .. } = o {
            let mut data = content[offset as usize..(offset + len) as usize].to_vec();
            data[0] ^= 1;
            d.handle_block(peer, chunk, offset, Load::default(), &data, Millis(3));
            check = outs(&mut d).into_iter().find(|o| matches!(o, DownloadOutput::Check { .. })).or(check);
        }
    }
    assert!(matches!(check, Some(DownloadOutput::Check { chunk: 0, .. })), "the whole chunk went to be checked");
    // It hangs up before the verdict comes back.
    d.handle_closed(peer, Millis(4));
    d.handle_checked(0, false, Millis(5));
    assert!(outs(&mut d).contains(&DownloadOutput::Banned { addr: addr(1), chunk: 0 }));
    assert!(!d.is_complete());
    // Banned: it is never dialled again, a new source is.
    d.handle_sources(&sharers(&[addr(1), addr(2)]), Millis(10_000));
    d.handle_timeout(Millis(10_000));
    let dialled: Vec<SocketAddr> = outs(&mut d)
        .into_iter()
        .filter_map(|o| match o {
            DownloadOutput::Connect { addr, .. } => Some(addr),
            _ => None,
        })
        .collect();
    assert_eq!(dialled, vec![addr(2)]);
    // A verdict for a chunk not being checked (late, duplicate) changes nothing.
    d.handle_checked(0, true, Millis(10_001));
    assert!(!d.is_complete());
}

#[test]
fn a_peer_that_is_not_the_named_sharer_gets_nothing() {
    let content = content(CHUNK_SIZE as usize / 2);
    let mut d = new_download(DownloadConfig::default(), digest_of(&content), Bitmap::new(1), 0, 5, Millis(0));
    let outs = |d: &mut Download| std::iter::from_fn(|| d.poll_output()).collect::<Vec<_>>();
    d.handle_sources(&sharers(&[addr(1)]), Millis(0));
    let Some(DownloadOutput::Connect { peer, .. }) = outs(&mut d).into_iter().next() else { panic!("no connect") };
    // Someone else answers at that address: another key, or none at all.
    let impostor = KeyId([0xee; 32]);
    d.handle_connected(peer, Some(impostor), Millis(1));
    let o = outs(&mut d);
    assert!(o.iter().all(|o| !matches!(o, DownloadOutput::Send { .. })), "nothing sent to it: {o:?}");
    assert!(o.contains(&DownloadOutput::NotTheSharer {
        addr: addr(1),
        expected: Some(key_at(addr(1))),
        found: Some(impostor)
    }));
    assert!(o.contains(&DownloadOutput::Close { peer }));
    // Tried again only after a pause...
    d.handle_timeout(Millis(2));
    assert!(outs(&mut d).iter().all(|o| !matches!(o, DownloadOutput::Connect { .. })));
    let (peer, at) = next_dial(&mut d);
    assert!(at >= DownloadConfig::default().reconnect_after, "redialled at {at:?}");
    d.handle_connected(peer, None, at);
    assert!(outs(&mut d).iter().all(|o| !matches!(o, DownloadOutput::Send { .. })), "no key proved: nothing sent");
    // ... and the real sharer gets the request.
    let (peer, at) = next_dial(&mut d);
    d.handle_connected(peer, Some(key_at(addr(1))), at);
    assert!(outs(&mut d).iter().any(|o| matches!(o, DownloadOutput::Send { msg: PeerMessage::Want { .. }, .. })));
}

/// Runs a download's timers until it dials: the connection and when.
fn next_dial(d: &mut Download) -> (PeerConnId, Millis) {
    for _ in 0..100 {
        let at = d.poll_timeout().expect("something is due");
        d.handle_timeout(at);
        while let Some(o) = d.poll_output() {
            if let DownloadOutput::Connect { peer, .. } = o {
                return (peer, at);
            }
        }
    }
    panic!("never dialled again")
}

#[test]
fn plaintext_and_tls_peers_are_not_mixed() {
    let content = content(CHUNK_SIZE as usize / 2);
    let outs = |d: &mut Download| std::iter::from_fn(|| d.poll_output()).collect::<Vec<_>>();
    let mixed = [SharerAddr { addr: addr(1), key: Some(key_at(addr(1))) }, SharerAddr { addr: addr(2), key: None }];
    let dialled = |plaintext_peers: bool| {
        let cfg = DownloadConfig { plaintext_peers, ..DownloadConfig::default() };
        let mut d = new_download(cfg, digest_of(&content), Bitmap::new(1), 0, 5, Millis(0));
        d.handle_sources(&mixed, Millis(0));
        let a: Vec<SocketAddr> = outs(&mut d)
            .into_iter()
            .filter_map(|o| if let DownloadOutput::Connect { addr, .. } = o { Some(addr) } else { None })
            .collect();
        // The unreachable one sets no deadline in the past (no busy loop).
        assert!(d.poll_timeout().is_some_and(|t| t > Millis(0)));
        a
    };
    assert_eq!(dialled(false), vec![addr(1)], "over TLS only a sharer with a key to check");
    assert_eq!(dialled(true), vec![addr(2)], "in plaintext only a plaintext sharer");
}

/// More sources than `max_peers`: once that many are being dialled, the
/// ones left waiting set no deadline (a past one would be due at once,
/// forever: the driver would spin).
#[test]
fn sources_beyond_max_peers_set_no_deadline_that_is_always_due() {
    let cfg = DownloadConfig { max_peers: 4, ..DownloadConfig::default() };
    let d0 = digest_of(&content(2 * CHUNK_SIZE as usize));
    let mut d = new_download(cfg, d0, Bitmap::new(2), 0, 1, Millis(0));
    let many: Vec<SocketAddr> = (1..=10).map(addr).collect();
    d.handle_sources(&sharers(&many), Millis(0));
    let dials = std::iter::from_fn(|| d.poll_output()).filter(|o| matches!(o, DownloadOutput::Connect { .. })).count();
    assert_eq!(dials, 4, "max_peers bounds the dials");
    let now = Millis(10);
    let next = d.poll_timeout().expect("a stall or refresh deadline");
    assert!(next > now, "the next deadline {next:?} is already due at {now:?}");
}

/// Downloaders given the same long list of sources dial different ones:
/// a crowd does not all connect to the first `max_peers` addresses.
#[test]
fn sources_are_dialled_in_random_order() {
    let d0 = digest_of(&content(2 * CHUNK_SIZE as usize));
    let many: Vec<SocketAddr> = (1..=64).map(addr).collect();
    let mut everyone = BTreeSet::new();
    for seed in 0..8 {
        let mut d = new_download(DownloadConfig::default(), d0.clone(), Bitmap::new(2), 0, seed, Millis(0));
        d.handle_sources(&sharers(&many), Millis(0));
        let dialled: BTreeSet<SocketAddr> = std::iter::from_fn(|| d.poll_output())
            .filter_map(|o| if let DownloadOutput::Connect { addr, .. } = o { Some(addr) } else { None })
            .collect();
        assert_eq!(dialled.len(), DownloadConfig::default().max_peers);
        assert_ne!(dialled, many[..dialled.len()].iter().copied().collect(), "seed {seed}: the first addresses");
        everyone.extend(dialled);
    }
    assert!(everyone.len() > 48, "8 downloaders reached only {} of 64 sources", everyone.len());
}

/// A peer that serves others too (its load says so) is asked for one
/// chunk at a time, the next once half of it arrived; a peer serving only
/// us gets the full pipeline.
#[test]
fn a_peer_serving_a_crowd_gets_a_short_pipeline() {
    let content = content(16 * CHUNK_SIZE as usize);
    for (uploads, first) in [(1u16, DownloadConfig::default().chunks_per_peer), (5, 1)] {
        let load = Load { uploads, queued: 0 };
        let mut d = new_download(DownloadConfig::default(), digest_of(&content), Bitmap::new(16), 0, 3, Millis(0));
        d.handle_sources(&sharers(&[addr(1)]), Millis(0));
        let (peer, at) = next_dial_now(&mut d);
        d.handle_connected(peer, Some(key_at(addr(1))), at);
        d.handle_message(peer, PeerMessage::Have { chunks: Bitmap::full(16), load }, at);
        let asked = chunks_asked(&mut d);
        assert_eq!(asked.len(), first, "{uploads} uploads: chunks asked at once");
        if uploads == 1 {
            continue;
        }
        let c = asked[0];
        let block = |i: u32| {
            let start = chunk_offset(c) as usize + (i * BLOCK_SIZE) as usize;
            content[start..start + BLOCK_SIZE as usize].to_vec()
        };
        let per_chunk = CHUNK_SIZE as u32 / BLOCK_SIZE;
        let mut next = Vec::new();
        for i in 0..per_chunk {
            d.handle_block(peer, c, i * BLOCK_SIZE, load, &block(i), at);
            next = chunks_asked(&mut d);
            if !next.is_empty() {
                assert_eq!((i + 1) * BLOCK_SIZE, CHUNK_SIZE as u32 / 2, "the next chunk is asked for at half");
                break;
            }
        }
        assert_eq!(next.len(), 1, "one more chunk once half arrived");
        assert_ne!(next[0], c);
    }
}

/// The chunks a download's new requests are for, each once.
fn chunks_asked(d: &mut Download) -> Vec<u32> {
    let mut c: Vec<u32> = std::iter::from_fn(|| d.poll_output())
        .filter_map(|o| match o {
            DownloadOutput::Send { msg: PeerMessage::Request { chunk, .. }, .. } => Some(chunk),
            _ => None,
        })
        .collect();
    c.dedup();
    c
}

/// The dial a download made at once, for tests that feed it sources.
fn next_dial_now(d: &mut Download) -> (PeerConnId, Millis) {
    while let Some(o) = d.poll_output() {
        if let DownloadOutput::Connect { peer, .. } = o {
            return (peer, Millis(0));
        }
    }
    next_dial(d)
}

/// Sources are asked for soon after the start, then less and less often:
/// a crowd that starts together learns of itself within a few round trips,
/// and a long download asks every `refresh_every`.
#[test]
fn sources_are_refreshed_soon_then_every_refresh_every() {
    let d0 = digest_of(&content(2 * CHUNK_SIZE as usize));
    let mut d = new_download(DownloadConfig::default(), d0, Bitmap::new(2), 0, 1, Millis(0));
    let mut asked = Vec::new();
    while asked.len() < 7 {
        let at = d.poll_timeout().expect("a refresh is due");
        d.handle_timeout(at);
        if std::iter::from_fn(|| d.poll_output()).any(|o| o == DownloadOutput::WantSources) {
            asked.push(at.0);
        }
    }
    assert_eq!(asked, vec![100, 300, 700, 1500, 3100, 5100, 7100]);
}

/// What a download over long paths measured in virtual time.
struct PathRun {
    /// When the last chunk was verified.
    done: Millis,
    /// Most block requests one peer held queued (arrived, not yet being
    /// sent), at any moment: more is a protocol error there.
    most_queued: usize,
    /// Most chunk buffers held at once (chunks being received).
    most_buffers: usize,
    /// Most chunks asked for and not yet verified, over all peers.
    most_ahead: usize,
    /// Deepest pipeline any peer was given.
    most_depth: usize,
}

/// Downloads `chunks` chunks from peers each `rtt` away that each send at
/// `rate` bytes/s, blocks served in the order asked (one TCP connection
/// each, no loss), in virtual time.
fn over_paths(cfg: DownloadConfig, chunks: u32, peers: u8, rtt: Millis, rate: u64) -> PathRun {
    over_mixed_paths(cfg, chunks, &vec![(rtt, rate); peers as usize], 0)
}

/// The same, with each peer's own (round trip, rate), and the verdicts on
/// chunks delayed by `verify_ms` each (a slow hasher or disk).
fn over_mixed_paths(cfg: DownloadConfig, chunks: u32, paths: &[(Millis, u64)], verify_ms: u64) -> PathRun {
    let data = content(chunks as usize * CHUNK_SIZE as usize);
    let digest = digest_of(&data);
    let addrs: Vec<SocketAddr> = (1..=paths.len() as u8).map(addr).collect();
    let path_of: BTreeMap<SocketAddr, (Millis, u64)> = addrs.iter().copied().zip(paths.iter().copied()).collect();
    let mut path: BTreeMap<PeerConnId, (Millis, u64)> = BTreeMap::new();
    // Verdicts by when they come back.
    let mut verdicts: BTreeMap<(Millis, u32), bool> = BTreeMap::new();
    let mut verifier_free = Millis(0);
    let mut d = new_download(cfg, digest.clone(), Bitmap::new(chunks), 0, 3, Millis(0));
    d.handle_sources(&sharers(&addrs), Millis(0));
    // Arrivals at the downloader by time: (peer, chunk, offset, len), or a
    // chunk map (len 0); with when the peer started sending each.
    let mut arrivals: BTreeMap<(Millis, u64), (PeerConnId, u32, u32, u32)> = BTreeMap::new();
    let mut started: BTreeMap<u64, f64> = BTreeMap::new();
    let mut free_at: BTreeMap<PeerConnId, f64> = BTreeMap::new();
    // Each request's stay in its peer's queue: from its arrival there until
    // the peer begins sending it, or the cancel arrives.
    let mut queued: BTreeMap<u64, (PeerConnId, f64, f64)> = BTreeMap::new();
    let (mut seq, mut now) = (0u64, Millis(0));
    let mut run = PathRun { done: Millis(0), most_queued: 0, most_buffers: 0, most_ahead: 0, most_depth: 0 };
    while !d.is_complete() && now < Millis::from_secs(3600) {
        while let Some(o) = d.poll_output() {
            let half = |peer: &PeerConnId| path[peer].0 .0 as f64 / 2.0;
            match o {
                DownloadOutput::Connect { peer, addr } => {
                    path.insert(peer, path_of[&addr]);
                    d.handle_connected(peer, Some(key_at(addr)), now)
                }
                DownloadOutput::Send { peer, msg: PeerMessage::Want { .. } } => {
                    seq += 1;
                    arrivals.insert((now.plus(path[&peer].0), seq), (peer, 0, 0, 0));
                }
                DownloadOutput::Send { peer, msg: PeerMessage::Request { chunk, offset, len } } => {
                    let (half, rate) = (half(&peer), path[&peer].1);
                    // Served after what was asked before it, sent whole.
                    let f = free_at.entry(peer).or_default();
                    let start = f.max(now.0 as f64 + half);
                    *f = start + len as f64 * 1000.0 / rate as f64;
                    seq += 1;
                    arrivals.insert((Millis((*f + half).ceil() as u64), seq), (peer, chunk, offset, len));
                    started.insert(seq, start);
                    queued.insert(seq, (peer, now.0 as f64 + half, start));
                }
                DownloadOutput::Send { peer, msg: PeerMessage::Cancel { chunk, offset, .. } } => {
                    // Blocks the peer has not begun sending when the cancel
                    // reaches it are never sent.
                    let at = now.0 as f64 + half(&peer);
                    let gone: Vec<(Millis, u64)> = arrivals
                        .iter()
                        .filter(|(k, a)| a.0 == peer && a.1 == chunk && a.2 >= offset && a.3 > 0 && started[&k.1] >= at)
                        .map(|(k, _)| *k)
                        .collect();
                    for k in gone {
                        arrivals.remove(&k);
                        if let Some(q) = queued.get_mut(&k.1) {
                            q.2 = at;
                        }
                    }
                }
                DownloadOutput::Check { chunk, data: got } => {
                    let ok = digest.chunks[chunk as usize].matches(&got);
                    d.reuse_buffer(got);
                    verifier_free = verifier_free.max(now).plus(Millis(verify_ms));
                    verdicts.insert((verifier_free, chunk), ok);
                }
                DownloadOutput::Failed { reason } => panic!("{reason}"),
                _ => {}
            }
        }
        let buffers: usize = d.peers.values().flat_map(|p| &p.fetches).filter(|f| !f.buf.is_empty()).count();
        run.most_buffers = run.most_buffers.max(buffers);
        let ahead = d.checking.len() + d.peers.values().map(|p| p.fetches.len()).sum::<usize>();
        run.most_ahead = run.most_ahead.max(ahead);
        run.most_depth = run.most_depth.max(d.peers.values().map(|p| p.depth).max().unwrap_or(0));
        if let Some((&(at, chunk), &ok)) = verdicts.first_key_value() {
            if at <= now || (arrivals.is_empty() && d.out.is_empty()) {
                verdicts.pop_first();
                now = now.max(at);
                d.handle_checked(chunk, ok, now);
                continue;
            }
        }
        let next = arrivals.keys().next().map(|k| k.0);
        let next = [next, verdicts.keys().next().map(|k| k.0)].into_iter().flatten().min();
        let timer = d.poll_timeout();
        match (next, timer) {
            (Some(a), t) if t.is_none_or(|t| a <= t) => {
                now = now.max(a);
                if arrivals.first_key_value().is_none_or(|(k, _)| k.0 > now) {
                    // A verdict is due first.
                    continue;
                }
                let (_, (peer, chunk, offset, len)) = arrivals.pop_first().expect("looked at");
                if len == 0 {
                    let msg = PeerMessage::Have { chunks: Bitmap::full(chunks), load: Load::default() };
                    d.handle_message(peer, msg, now);
                    continue;
                }
                let start = chunk_offset(chunk) as usize + offset as usize;
                d.handle_block(peer, chunk, offset, Load::default(), &data[start..start + len as usize], now);
            }
            (_, Some(t)) => {
                now = now.max(t);
                d.handle_timeout(now);
            }
            (_, None) => break,
        }
    }
    assert!(d.is_complete(), "the download finished");
    run.done = now;
    // The most requests queued at once at a peer: at some request's arrival.
    for &(peer, arrive, _) in queued.values() {
        let n = queued.values().filter(|q| q.0 == peer && q.1 <= arrive && arrive < q.2).count();
        run.most_queued = run.most_queued.max(n);
    }
    run
}

#[test]
fn a_long_path_is_kept_full_by_a_deeper_pipeline() {
    // 4 peers at 100 ms, each sending 20 MB/s: 80 MB/s in all, when enough
    // is asked ahead (2 MB a peer). Three chunks a peer (1.5 MiB) is at most
    // 15.7 MB/s from each.
    let (chunks, rtt, rate) = (256, Millis(100), 20_000_000);
    let fixed = DownloadConfig { queue_time: Millis(0), ..DownloadConfig::default() };
    let bytes = chunks as f64 * CHUNK_SIZE as f64;
    let mb_s = |r: &PathRun| bytes / r.done.0 as f64 / 1000.0;
    let before = over_paths(fixed, chunks, 4, rtt, rate);
    let after = over_paths(DownloadConfig::default(), chunks, 4, rtt, rate);
    // The bound: the bytes at 80 MB/s, after a round trip for the map and one
    // for the first block.
    let bound = bytes / (4.0 * rate as f64) * 1000.0 + 2.0 * rtt.0 as f64;
    assert!(mb_s(&before) < 4.0 * 15.8, "fixed depth: {:.1} MB/s", mb_s(&before));
    assert!(
        (after.done.0 as f64) < bound * 1.15,
        "adaptive: {:.1} MB/s, done at {:?} against a bound of {bound:.0} ms",
        mb_s(&after),
        after.done
    );
    // Never more asked of a peer than it queues, and a buffer only for
    // chunks arriving (one a peer) and those just finished.
    assert!(after.most_queued <= MAX_QUEUED_REQUESTS, "{} requests queued at one peer", after.most_queued);
    assert!(after.most_buffers <= 4, "{} chunk buffers at once", after.most_buffers);
}

#[test]
fn a_slow_path_gets_a_short_pipeline() {
    // 1 MB/s from one peer 20 ms away: a second of it is two chunks, so the
    // depth stays near its minimum instead of tying up 16 chunks.
    let (chunks, rtt, rate) = (24, Millis(20), 1_000_000);
    let r = over_paths(DownloadConfig::default(), chunks, 1, rtt, rate);
    let per_chunk = (CHUNK_SIZE / BLOCK_SIZE as u64) as usize;
    assert!(r.most_queued <= 4 * per_chunk, "{} requests queued", r.most_queued);
}

#[test]
fn pipeline_depth_follows_the_rate_within_its_bounds() {
    let cfg = DownloadConfig::default();
    assert_eq!(pipeline_depth(0, &cfg), cfg.chunks_per_peer);
    assert_eq!(pipeline_depth(u64::MAX, &cfg), MAX_CHUNKS_PER_PEER);
    // 8 MB/s for a second: 15 chunks ahead, plus the one arriving.
    assert_eq!(pipeline_depth(8_000_000, &cfg), 16);
    assert_eq!(pipeline_depth(2_000_000, &cfg), 4);
    let mut last = 0;
    for rate in (0..50).map(|i| i * 500_000) {
        let depth = pipeline_depth(rate, &cfg);
        assert!(depth >= last && (cfg.chunks_per_peer..=MAX_CHUNKS_PER_PEER).contains(&depth));
        last = depth;
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]

    /// Whatever the paths (round trips up to 400 ms, 0.1-100 MB/s each) and
    /// however slowly chunks are verified, a download finishes; no peer is
    /// asked for more blocks than it queues or given a pipeline deeper than
    /// [`MAX_CHUNKS_PER_PEER`]; chunks ahead stay within
    /// [`MAX_CHUNKS_AHEAD`]; and a chunk buffer is held only for chunks
    /// being received, at most one a peer at a time.
    #[test]
    fn any_paths_keep_pipelines_within_their_bounds(
        paths in proptest::collection::vec((0u64..400, 100_000u64..100_000_000), 1..8),
        chunks in 1u32..48,
        verify_ms in 0u64..20,
    ) {
        let paths: Vec<(Millis, u64)> = paths.into_iter().map(|(r, b)| (Millis(r), b)).collect();
        let r = over_mixed_paths(DownloadConfig::default(), chunks, &paths, verify_ms);
        proptest::prop_assert!(r.most_queued <= MAX_QUEUED_REQUESTS, "{} requests queued", r.most_queued);
        proptest::prop_assert!(r.most_depth <= MAX_CHUNKS_PER_PEER, "depth {}", r.most_depth);
        proptest::prop_assert!(r.most_ahead <= MAX_CHUNKS_AHEAD, "{} chunks ahead", r.most_ahead);
        proptest::prop_assert!(r.most_buffers <= paths.len(), "{} buffers for {} peers", r.most_buffers, paths.len());
    }
}

/// A peer that answers `Busy` loses that chunk (it goes to another peer)
/// and is asked nothing until it says `Ready`.
#[test]
fn a_busy_peer_is_asked_nothing_until_ready() {
    let content = content(2 * CHUNK_SIZE as usize);
    let load = Load { uploads: 5, queued: 0 };
    let mut d = new_download(DownloadConfig::default(), digest_of(&content), Bitmap::new(2), 0, 7, Millis(0));
    d.handle_sources(&sharers(&[addr(1), addr(2)]), Millis(0));
    let mut peers = BTreeMap::new();
    while let Some(o) = d.poll_output() {
        if let DownloadOutput::Connect { peer, addr } = o {
            peers.insert(addr, peer);
        }
    }
    let (p1, p2) = (peers[&addr(1)], peers[&addr(2)]);
    for (a, p) in [(addr(1), p1), (addr(2), p2)] {
        d.handle_connected(p, Some(key_at(a)), Millis(1));
        d.handle_message(p, PeerMessage::Have { chunks: Bitmap::full(2), load }, Millis(1));
    }
    let asked_of = |d: &mut Download| {
        let mut m: BTreeMap<PeerConnId, Vec<u32>> = BTreeMap::new();
        while let Some(o) = d.poll_output() {
            if let DownloadOutput::Send { peer, msg: PeerMessage::Request { chunk, offset: 0, .. } } = o {
                m.entry(peer).or_default().push(chunk);
            }
        }
        m
    };
    let first = asked_of(&mut d);
    let (c1, c2) = (first[&p1][0], first[&p2][0]);
    assert_ne!(c1, c2);
    d.handle_message(p1, PeerMessage::Busy { chunk: c1 }, Millis(2));
    assert!(asked_of(&mut d).is_empty(), "p2 is busy with its own chunk, p1 said Busy");
    // p2 sends its chunk whole: it is asked for the other one, p1 nothing.
    for i in 0..CHUNK_SIZE as u32 / BLOCK_SIZE {
        let start = chunk_offset(c2) as usize + (i * BLOCK_SIZE) as usize;
        d.handle_block(p2, c2, i * BLOCK_SIZE, load, &content[start..start + BLOCK_SIZE as usize], Millis(3));
    }
    let next = asked_of(&mut d);
    assert_eq!(next.get(&p2), Some(&vec![c1]), "{next:?}");
    assert!(!next.contains_key(&p1), "{next:?}");
    // Ready: p1 may be asked again (an endgame copy of the last chunk).
    d.handle_message(p1, PeerMessage::Ready, Millis(4));
    assert_eq!(asked_of(&mut d).get(&p1), Some(&vec![c1]));
}
