//! The bodies of the fuzz targets, shared by `fuzz/` (cargo-fuzz, nightly) and
//! the corpus replay test that runs on stable with every `cargo test`.
//!
//! Each function takes arbitrary bytes and must not panic, hang, or allocate
//! beyond the limits the code under test claims.

use std::collections::{BTreeMap, BTreeSet};

use crate::client::disk::{DiskDone, DiskOp, OpenedPart, PartPaths, PathKind};
use crate::client::download::PeerConnId;
use crate::client::{ClientEngine, ClientInput, ClientOutput, DownloadId, PeerEvent};
use crate::proto::{Message, Role, SharerAddr, PROTOCOL_VERSION};
use crate::rng::Rng;
use crate::time::Millis;
use crate::tracker::{ConnId, SoloReplicator, TrackerConfig, TrackerNode, TrackerOutput};
use crate::wire::{decode, encode, FrameDecoder};

/// Frame limit for fuzzing: small, so the fuzzer reaches "too large" cheaply.
const FUZZ_FRAME_LIMIT: usize = 4096;

/// The first byte picks the split size; the rest is the stream.
pub fn frame_stream(data: &[u8]) {
    let Some((&split, stream)) = data.split_first() else { return };
    let split = split as usize + 1;
    let mut dec = FrameDecoder::new(FUZZ_FRAME_LIMIT);
    for piece in stream.chunks(split) {
        dec.push(piece);
        loop {
            match dec.next_message::<Message>() {
                Ok(Some(m)) => round_trip(&m),
                Ok(None) => break,
                Err(_) => return,
            }
        }
        assert!(dec.buffered() <= FUZZ_FRAME_LIMIT + 4 + split, "decoder buffers beyond its limit");
    }
}

pub fn message(data: &[u8]) {
    if let Ok(m) = decode(data) {
        round_trip(&m);
    }
}

fn round_trip(m: &Message) {
    let bytes = encode(m);
    assert_eq!(&decode::<Message>(&bytes[4..]).expect("re-decodes"), m);
}

pub fn shell_command(data: &[u8]) {
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = crate::shell::parse(s);
    }
}

pub fn tracker_info(data: &[u8]) {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(list) = crate::config::parse_tracker_info(s) {
            assert!(!list.is_empty());
            for key in list.iter().filter_map(|t| t.key) {
                assert_eq!(key.to_string().parse::<crate::identity::KeyId>(), Ok(key));
            }
        }
        // Any word as a key id: refused with a reason, or read back the same.
        for word in s.split_whitespace().take(8) {
            if let Ok(key) = word.parse::<crate::identity::KeyId>() {
                assert_eq!(key.to_string().replace('-', ""), word.replace('-', "").to_uppercase());
            }
        }
    }
}

/// Each record: a connection byte (0-3) and a length byte, then that many
/// bytes for that connection. Connections 0 and 1 start with a valid Hello so
/// the fuzzer reaches request handling.
pub fn tracker_node(data: &[u8]) {
    let cfg = TrackerConfig { password_params: crate::meta::PasswordParams::INSECURE_FAST, ..TrackerConfig::default() };
    let mut node = TrackerNode::new(cfg, Rng::from_u64(0), SoloReplicator::default());
    let hello = encode(&Message::Hello { protocol_version: PROTOCOL_VERSION, role: Role::Client });
    for c in 0..4 {
        node.handle_connected(ConnId(c), std::net::SocketAddr::from(([10, 0, 0, c as u8], 4000)), Millis(0));
    }
    node.handle_bytes(ConnId(0), &hello, Millis(0));
    node.handle_bytes(ConnId(1), &hello, Millis(0));
    let mut rest = data;
    let mut now = 0;
    while let [conn, len, tail @ ..] = rest {
        let n = (*len as usize).min(tail.len());
        now += 1;
        node.handle_bytes(ConnId(*conn as u64 % 4), &tail[..n], Millis(now));
        while node.poll_output().is_some() {}
        rest = &tail[n..];
    }
}

/// One peer frame body: decodes or not, never panics; the in-place block
/// decoder agrees with the full one.
pub fn peer_message(data: &[u8]) {
    use crate::client::peer::{decode_block, PeerMessage};
    let full = decode::<PeerMessage>(data);
    if let Ok(m) = &full {
        let bytes = encode(m);
        assert_eq!(&decode::<PeerMessage>(&bytes[4..]).expect("re-decodes"), m);
    }
    if let Some(b) = decode_block(data) {
        match full {
            Ok(PeerMessage::Block { chunk, offset, load, data }) => {
                assert_eq!((chunk, offset, load, data.as_slice()), (b.chunk, b.offset, b.load, b.data))
            }
            other => panic!("decode_block accepted what decode gives as {other:?}"),
        }
    }
}

/// A download fed arbitrary frames from two peers, its chunks verified by a
/// [`crate::client::verify::Verifier`] whose disk work completes one input
/// later: no panic, and no chunk is ever reported verified unless the part
/// file holds the file's bytes for it.
pub fn download_peer(data: &[u8]) {
    use crate::chunk::{FileDigest, FileHasher};
    use crate::client::download::{chunk_offset, Download, DownloadConfig, DownloadOutput};
    use crate::client::peer::{decode_block, Bitmap, Grant, PeerMessage};
    use crate::client::verify::{Verifier, VerifyEvent, VerifyOp};
    use crate::ids::{FileName, GroupId};
    // Hashing the 2-chunk file is most of an input's cost: do it once.
    static FILE: std::sync::OnceLock<(Vec<u8>, FileDigest)> = std::sync::OnceLock::new();
    let (content, digest) = FILE.get_or_init(|| {
        let content = download_stream_content();
        let mut h = FileHasher::new();
        h.update(&content).expect("small");
        (content.clone(), h.finish().expect("small"))
    });
    let n = digest.chunks.len() as u32;
    let mut d = Download::new(
        DownloadConfig::default(),
        GroupId::new("g").expect("valid"),
        FileName::new("f").expect("valid"),
        digest.clone(),
        Grant([0; 16]),
        Bitmap::new(n),
        0,
        Rng::from_u64(0),
        Millis(0),
    );
    let mut v = Verifier::new(digest, &Bitmap::new(n));
    let mut part = vec![0u8; content.len()];
    let key = crate::identity::KeyId([9; 32]);
    let a = SharerAddr { addr: "127.0.0.1:1".parse().expect("valid"), key: Some(key) };
    let b = SharerAddr { addr: "127.0.0.1:2".parse().expect("valid"), key: Some(key) };
    d.handle_sources(&[a, b], Millis(0));
    let mut conns = Vec::new();
    let mut ops: Vec<VerifyOp> = Vec::new();
    let mut chain = crate::client::verify::HashChain::default();
    let mut dec = FrameDecoder::new(crate::client::peer::MAX_PEER_FRAME);
    let mut now = 1;
    let mut pieces = data.split(|&b| b == 0xfe).enumerate();
    loop {
        // The download's outputs: checks go to the verifier, and back.
        let mut moved = false;
        while let Some(o) = d.poll_output() {
            moved = true;
            match o {
                DownloadOutput::Connect { peer, .. } => conns.push(peer),
                DownloadOutput::Check { chunk, data } => v.submit(chunk, data, digest),
                DownloadOutput::Verified { chunk } => {
                    let at = chunk_offset(chunk) as usize;
                    let len = crate::chunk::chunk_len(digest.size, chunk as u64) as usize;
                    assert!(part[at..at + len] == content[at..at + len], "chunk {chunk} verified but not the file's");
                }
                _ => {}
            }
        }
        while let Some(ev) = v.poll() {
            moved = true;
            match ev {
                VerifyEvent::Op(op) => ops.push(op),
                VerifyEvent::Good(c) => d.handle_checked(c, true, Millis(now)),
                VerifyEvent::Bad(c) => d.handle_checked(c, false, Millis(now)),
                VerifyEvent::Buffer(b) => d.reuse_buffer(b),
                VerifyEvent::Rechecked | VerifyEvent::Complete => {}
                VerifyEvent::Failed(e) => panic!("verification failed: {e}"),
            }
        }
        if moved {
            continue;
        }
        let Some((i, piece)) = pieces.next() else { return };
        if i == 0 {
            for c in conns.clone() {
                d.handle_connected(c, Some(key), Millis(1));
            }
        }
        let Some(&peer) = conns.get(i % conns.len().max(1)) else { return };
        now += 100;
        // What the disk was asked for last time is done now.
        for op in std::mem::take(&mut ops) {
            match op {
                VerifyOp::Hash(mut job) => {
                    job.run(&mut chain);
                    v.handle_hashed(job, digest);
                }
                VerifyOp::Write { chunk, data } => {
                    let at = chunk_offset(chunk) as usize;
                    part[at..at + data.len()].copy_from_slice(&data);
                    v.handle_written(chunk, data, Ok(()), digest);
                }
                VerifyOp::Read { chunk, mut buf } => {
                    let at = chunk_offset(chunk) as usize;
                    let len = buf.len();
                    buf.copy_from_slice(&part[at..at + len]);
                    v.handle_read(chunk, buf, Ok(()), digest);
                }
            }
        }
        dec.push(piece);
        while let Ok(Some(body)) = dec.next_frame() {
            if let Some(blk) = decode_block(body) {
                d.handle_block(peer, blk.chunk, blk.offset, blk.load, blk.data, Millis(now));
            } else if let Ok(m) = decode::<PeerMessage>(body) {
                d.handle_message(peer, m, Millis(now));
            }
        }
        d.handle_timeout(Millis(now));
    }
}

/// A download state file, or one record of it, read back from disk.
pub fn sidecar(data: &[u8]) {
    use crate::chunk::{FileDigest, Sha1Digest};
    let digest = FileDigest {
        size: 3 * crate::chunk::CHUNK_SIZE,
        sha1: Sha1Digest([1; 20]),
        chunks: vec![Sha1Digest([2; 20]); 3],
    };
    if let Ok(b) = crate::client::sidecar::decode(data, &digest) {
        assert!(b.fits(3));
    }
    // The same bytes as a whole state file (two slots, or the first format).
    if let Ok((b, _)) = crate::client::sidecar::latest(data, &digest) {
        assert!(b.fits(3));
    }
}

/// A tracker log file read back after a crash: no panic, what recovery keeps
/// re-encodes to exactly the bytes it kept, and replaying the records into a
/// tracker node (as start-up does) never panics.
pub fn wal_log(data: &[u8]) {
    if let Ok(r) = crate::wal::recover(data) {
        let mut again = Vec::new();
        for rec in &r.records {
            crate::wal::encode_record(rec, &mut again).expect("recovered records fit the limit");
        }
        assert_eq!(&again[..], &data[..r.valid_len as usize]);
        let cfg =
            TrackerConfig { password_params: crate::meta::PasswordParams::INSECURE_FAST, ..TrackerConfig::default() };
        if let Ok(rep) = SoloReplicator::recover(r.records.iter().copied()) {
            let _ = TrackerNode::new(cfg.clone(), Rng::from_u64(0), rep);
        }
        if let Ok(rep) = crate::tracker::OmniReplicator::recover(1, &[1, 2, 3], r.records.iter().copied()) {
            let mut node = TrackerNode::new(cfg, Rng::from_u64(0), rep);
            node.handle_timeout(crate::time::Millis(1));
            while node.poll_output().is_some() {}
        }
    }
}

/// Tracker 1 of three, knowing the others' keys (`[n; 32]` for tracker n).
fn linked_tracker() -> TrackerNode<crate::tracker::OmniReplicator> {
    let peer_keys = [(2, crate::identity::KeyId([2; 32])), (3, crate::identity::KeyId([3; 32]))].into_iter().collect();
    let cfg = TrackerConfig {
        password_params: crate::meta::PasswordParams::INSECURE_FAST,
        peer_keys,
        ..TrackerConfig::default()
    };
    let rep = crate::tracker::OmniReplicator::recover(1, &[1, 2, 3], std::iter::empty()).expect("an empty log");
    TrackerNode::new(cfg, Rng::from_u64(0), rep)
}

/// A [`linked_tracker`] with tracker 2's link to it open (TLS proved its
/// key, `Hello` and `Join` said) on connection 1.
fn joined_tracker() -> (TrackerNode<crate::tracker::OmniReplicator>, ConnId) {
    use crate::proto::TrackerFrame;
    let mut node = linked_tracker();
    let conn = ConnId(1);
    let now = crate::time::Millis(1);
    node.handle_connected(conn, "10.0.0.2:5000".parse().expect("valid"), now);
    node.handle_secured(conn, crate::identity::KeyId([2; 32]), now);
    node.handle_bytes(conn, &encode(&Message::Hello { protocol_version: PROTOCOL_VERSION, role: Role::Tracker }), now);
    node.handle_bytes(conn, &encode(&Message::Tracker(TrackerFrame::Join { node: 2 })), now);
    assert_eq!(node.connections(), 1, "the link is taken");
    (node, conn)
}

/// Frames from another tracker into a replicated tracker node, as its link
/// would carry them (after `Hello` and `Join`): consensus messages and soft
/// state. The node must reject what does not decode, never panic.
pub fn tracker_link(data: &[u8]) {
    use crate::proto::TrackerFrame;
    let (mut node, conn) = joined_tracker();
    // The input is consensus payloads, each a 2-byte length then its bytes,
    // framed as the link frames them.
    let mut rest = data;
    let mut i = 0u64;
    while rest.len() >= 2 {
        let n = (u16::from_le_bytes([rest[0], rest[1]]) as usize).min(rest.len() - 2);
        let frame = encode(&Message::Tracker(TrackerFrame::Consensus(rest[2..2 + n].to_vec())));
        rest = &rest[2 + n..];
        i += 1;
        node.handle_bytes(conn, &frame, crate::time::Millis(1 + i * 10));
        node.handle_timeout(crate::time::Millis(1 + i * 10));
        while node.poll_output().is_some() {}
    }
    node.handle_bytes(conn, rest, crate::time::Millis(10_000));
    while node.poll_output().is_some() {}
}

/// Whole frames from another tracker, as its link to us carries them (after
/// `Hello` and `Join`): every tracker frame, chunk-list ranges and consensus
/// parts included, with the ranges the node stores read back as a store
/// would. The node must reject what does not decode and never panic; a range
/// it keeps is kept under its hash.
pub fn tracker_frames(data: &[u8]) {
    let (mut node, conn) = joined_tracker();
    node.handle_link_up(2, crate::identity::KeyId([2; 32]), crate::time::Millis(1));
    let mut store: BTreeMap<crate::chunk::Sha1Digest, Vec<u8>> = BTreeMap::new();
    for (i, piece) in data.chunks(4096).enumerate() {
        let t = crate::time::Millis(2 + i as u64 * 10);
        node.handle_bytes(conn, piece, t);
        node.handle_timeout(t);
        loop {
            let outs: Vec<TrackerOutput> = std::iter::from_fn(|| node.poll_output()).collect();
            if outs.is_empty() {
                break;
            }
            for o in outs {
                match o {
                    TrackerOutput::StoreRange { hash, bytes } => {
                        assert!(crate::chunk::Sha1Digest::of(&bytes) == hash, "a range kept under another hash");
                        store.insert(hash, bytes);
                    }
                    TrackerOutput::LoadRange { hash } => {
                        let got = store.get(&hash).cloned();
                        node.handle_range_loaded(hash, got, t);
                    }
                    TrackerOutput::Sync { seq } => node.handle_synced(seq, t),
                    TrackerOutput::Work { ticket, job } => node.handle_job_done(ticket, job.run(), t),
                    _ => {}
                }
            }
        }
    }
}

/// A disk in memory for core's tests and fuzz targets: runs each
/// [`DiskOp`] at once (hash jobs too) and hands back its [`DiskDone`]. It
/// computes and moves bytes; the engine decides. (The simulation's disk, with
/// latency and faults, is `sim::disk::MemDisk`.)
#[derive(Default)]
pub struct ScratchDisk {
    pub files: BTreeMap<String, Vec<u8>>,
    pub dirs: BTreeSet<String>,
    parts: BTreeMap<DownloadId, PartPaths>,
    chains: BTreeMap<DownloadId, crate::client::verify::HashChain>,
}

impl ScratchDisk {
    fn probe(&self, p: &str) -> PathKind {
        let p = p.trim_end_matches('/');
        if self.dirs.contains(p) || p.is_empty() {
            PathKind::Dir
        } else if self.files.contains_key(p) {
            PathKind::Other
        } else {
            PathKind::Missing
        }
    }

    /// Runs `op`; its result, if it has one.
    pub fn run(&mut self, op: DiskOp) -> Option<DiskDone> {
        use crate::chunk::CHUNK_SIZE;
        let at = |chunk: u32| chunk as usize * CHUNK_SIZE as usize;
        Some(match op {
            DiskOp::HashFile { job, path } => {
                let result = match self.files.get(&path) {
                    Some(d) => {
                        let mut h = crate::chunk::FileHasher::new();
                        h.update(d).and_then(|()| h.finish()).map_err(|e| e.to_string())
                    }
                    None => Err("No such file or directory".into()),
                };
                DiskDone::FileHashed { job, result }
            }
            DiskOp::OpenPart { id, dest, name, size } => {
                let result = crate::client::disk::resolve(&dest, &name, |p| self.probe(p)).map(|paths| {
                    self.files
                        .entry(paths.part.clone())
                        .or_insert_with(|| vec![0; size as usize])
                        .resize(size as usize, 0);
                    let state = self.files.entry(paths.state.clone()).or_default().clone();
                    self.parts.insert(id, paths.clone());
                    OpenedPart { paths, state }
                });
                DiskDone::PartOpened { id, result }
            }
            DiskOp::Read { id, chunk, mut buf } => {
                let part = self.parts.get(&id).and_then(|p| self.files.get(&p.part));
                let result = match part.and_then(|f| f.get(at(chunk)..at(chunk) + buf.len())) {
                    Some(bytes) => {
                        buf.copy_from_slice(bytes);
                        Ok(())
                    }
                    None => Err("short read".into()),
                };
                DiskDone::Read { id, chunk, buf, result }
            }
            DiskOp::Hash { id, mut job } => {
                job.run(self.chains.entry(id).or_default());
                DiskDone::Hashed { id, job }
            }
            DiskOp::Write { id, chunk, data } => {
                let part = self.parts.get(&id).and_then(|p| self.files.get_mut(&p.part));
                let result = match part.and_then(|f| f.get_mut(at(chunk)..at(chunk) + data.len())) {
                    Some(bytes) => {
                        bytes.copy_from_slice(&data);
                        Ok(())
                    }
                    None => Err("short write".into()),
                };
                DiskDone::Written { id, chunk, data, result }
            }
            DiskOp::SaveState { id, offset, bytes } => {
                let result = match self.parts.get(&id).and_then(|p| self.files.get_mut(&p.state)) {
                    Some(f) => {
                        crate::client::disk::write_in_memory(f, offset as usize, &bytes);
                        Ok(())
                    }
                    None => Err("no state file".into()),
                };
                DiskDone::StateSaved { id, result }
            }
            DiskOp::Finish { id } => {
                let result = match self.parts.remove(&id) {
                    Some(p) if !self.files.contains_key(&p.final_path) => {
                        let data = self.files.remove(&p.part).unwrap_or_default();
                        self.files.remove(&p.state);
                        self.files.insert(p.final_path, data);
                        Ok(())
                    }
                    Some(p) => Err(format!("{} appeared meanwhile; not replacing it", p.final_path)),
                    None => Err("no part file".into()),
                };
                DiskDone::Finished { id, result }
            }
            DiskOp::Release { .. } => return None,
            DiskOp::Close { id } => {
                self.parts.remove(&id);
                return None;
            }
        })
    }
}

/// Feeds every disk op among `outs` to `disk`, and its result to `e`, until
/// the engine asks for nothing more; returns the outputs that are not disk ops.
pub fn run_disk(
    e: &mut ClientEngine,
    disk: &mut ScratchDisk,
    outs: Vec<ClientOutput>,
    now: Millis,
) -> Vec<ClientOutput> {
    run_disk_watched(e, disk, outs, now, |_| {})
}

/// [`run_disk`], showing every op to `watch` before it runs.
pub fn run_disk_watched(
    e: &mut ClientEngine,
    disk: &mut ScratchDisk,
    outs: Vec<ClientOutput>,
    now: Millis,
    mut watch: impl FnMut(&DiskOp),
) -> Vec<ClientOutput> {
    let mut rest = Vec::new();
    let mut queue: std::collections::VecDeque<ClientOutput> = outs.into();
    while let Some(o) = queue.pop_front() {
        match o {
            ClientOutput::Disk(op) => {
                watch(&op);
                if let Some(done) = disk.run(op) {
                    e.handle_input(ClientInput::Disk(done), now);
                    queue.extend(std::iter::from_fn(|| e.poll_output()));
                }
            }
            o => rest.push(o),
        }
    }
    rest
}

/// The file [`download_stream`] downloads: two chunks and a bit, fixed.
pub fn download_stream_content() -> Vec<u8> {
    (0..(crate::chunk::CHUNK_SIZE as usize + 100)).map(|i| (i % 251) as u8).collect()
}

/// A logged-in client engine downloading `content` (file f.bin of group g)
/// from one sharer into `/dl/` of `disk`, its connection open: what the
/// sharer sends next goes through [`ClientEngine::peer_recv_bufs`]. Returns
/// the engine, the connection and the engine's outputs so far (the peer
/// handshake).
pub fn downloading_engine(content: &[u8], disk: &mut ScratchDisk) -> (ClientEngine, PeerConnId, Vec<ClientOutput>) {
    use crate::client::peer::Grant;
    use crate::client::{ClientConfig, Ticket, TrackerEvent};
    use crate::ids::{FileName, GroupId, SessionToken, UserId};
    use crate::proto::{Reply, Request};
    use crate::shell::ShellCommand;
    let mut h = crate::chunk::FileHasher::new();
    h.update(content).expect("small");
    let digest = h.finish().expect("small");
    disk.dirs.insert("/dl".into());
    let key = crate::identity::KeyId([8; 32]);
    let peer = SharerAddr { addr: "127.0.0.1:7000".parse().expect("valid"), key: Some(key) };
    let cfg = ClientConfig::new("127.0.0.1:9".parse().expect("valid"), vec!["127.0.0.1:1".parse().expect("valid")]);
    let mut e = ClientEngine::new(cfg, Rng::from_u64(3));
    let drain = |e: &mut ClientEngine| std::iter::from_fn(|| e.poll_output()).collect::<Vec<_>>();
    // Answers the requests among `outs` as the tracker would; returns the rest.
    let answer = |e: &mut ClientEngine, outs: Vec<ClientOutput>| {
        let mut rest = Vec::new();
        for o in outs {
            let ClientOutput::Transmit(bytes) = &o else {
                rest.push(o);
                continue;
            };
            if let Ok(Message::Request { id, body, .. }) = decode::<Message>(&bytes[4..]) {
                let result = match body {
                    Request::Login { .. } => Ok(Reply::Session { token: SessionToken([5; 16]) }),
                    Request::DownloadFile { .. } => {
                        Ok(Reply::Download { index: digest.index(), sharers: vec![peer], grant: Grant([1; 16]) })
                    }
                    Request::GetRange { range, .. } => Ok(Reply::Range { hashes: digest.range(range as u64).to_vec() }),
                    _ => Ok(Reply::Done),
                };
                let bytes = encode(&Message::Response { id, result });
                e.handle_input(ClientInput::Tracker(TrackerEvent::Bytes(&bytes)), Millis(0));
            }
        }
        rest
    };
    let login = ShellCommand::Login { user: UserId::new("me").expect("valid"), password: "pw".into() };
    e.handle_input(ClientInput::User { ticket: Ticket(1), cmd: login }, Millis(0));
    drain(&mut e);
    e.handle_input(ClientInput::Tracker(TrackerEvent::Connected { key: crate::identity::KeyId([7; 32]) }), Millis(0));
    let outs = drain(&mut e);
    answer(&mut e, outs);
    let cmd = ShellCommand::DownloadFile {
        group: GroupId::new("g").expect("valid"),
        name: FileName::new("f.bin").expect("valid"),
        destination: "/dl/".into(),
    };
    e.handle_input(ClientInput::User { ticket: Ticket(2), cmd }, Millis(0));
    let mut outs = drain(&mut e);
    let mut rest = Vec::new();
    // The index, then each range of the chunk list, then the download starts.
    while outs.iter().any(|o| matches!(o, ClientOutput::Transmit(_))) {
        rest.extend(answer(&mut e, outs));
        outs = drain(&mut e);
    }
    rest.extend(outs);
    let rest = run_disk(&mut e, disk, rest, Millis(0));
    let conn = rest
        .iter()
        .find_map(|o| if let ClientOutput::PeerConnect { conn, .. } = o { Some(*conn) } else { None })
        .expect("connects to the sharer");
    e.handle_input(ClientInput::Peer(conn, PeerEvent::Connected { key: Some(key) }), Millis(0));
    let handshake = drain(&mut e);
    (e, conn, handshake)
}

/// A sharer's byte stream into a downloading client engine, read the way a
/// socket gives it (through `peer_recv_bufs`, block data straight into its
/// chunk): the first byte sets the read sizes, the rest is the stream. No
/// panic, receive space stays bounded, and a chunk the engine writes to the
/// part file is the file's chunk.
pub fn download_stream(data: &[u8]) {
    static CONTENT: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    let content = CONTENT.get_or_init(download_stream_content);
    let Some((&sizes, mut stream)) = data.split_first() else { return };
    let mut disk = ScratchDisk::default();
    let (mut e, conn, _) = downloading_engine(content, &mut disk);
    let mut rng = Rng::from_u64(sizes as u64);
    let mut now = 1;
    while !stream.is_empty() {
        let Some((space, frames)) = e.peer_recv_bufs(conn) else { return };
        assert!(frames.len() <= 2 * crate::client::peer::MAX_PEER_FRAME, "receive space beyond the frame limit");
        let want = 1 + rng.below(stream.len().min(1 << 17) as u64) as usize;
        let a = space.len().min(want);
        space[..a].copy_from_slice(&stream[..a]);
        let b = frames.len().min(want - a);
        frames[..b].copy_from_slice(&stream[a..a + b]);
        stream = &stream[a + b..];
        now += 10;
        e.handle_peer_received(conn, a + b, Millis(now));
        let outs: Vec<ClientOutput> = std::iter::from_fn(|| e.poll_output()).collect();
        run_disk_watched(&mut e, &mut disk, outs, Millis(now), |op| {
            if let DiskOp::Write { chunk, data, .. } = op {
                let at = crate::client::download::chunk_offset(*chunk) as usize;
                assert!(data[..] == content[at..at + data.len()], "chunk {chunk} was written but differs");
            }
        });
    }
}
