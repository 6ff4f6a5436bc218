//! The bodies of the fuzz targets, shared by `fuzz/` (cargo-fuzz, nightly) and
//! the corpus replay test that runs on stable with every `cargo test`.
//!
//! Each function takes arbitrary bytes and must not panic, hang, or allocate
//! beyond the limits the code under test claims.

use crate::proto::{Message, Role, PROTOCOL_VERSION};
use crate::rng::Rng;
use crate::time::Millis;
use crate::tracker::{ConnId, SoloReplicator, TrackerConfig, TrackerNode};
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

/// A download fed arbitrary frames from two peers: no panic, and no chunk
/// is ever reported verified unless data that matched its SHA1 was checked.
pub fn download_peer(data: &[u8]) {
    use crate::chunk::{FileDigest, FileHasher};
    use crate::client::download::{Download, DownloadConfig, DownloadOutput};
    use crate::client::peer::{decode_block, Bitmap, Grant, PeerMessage};
    use crate::ids::{FileName, GroupId};
    // Hashing the 2-chunk file is most of an input's cost: do it once.
    static DIGEST: std::sync::OnceLock<FileDigest> = std::sync::OnceLock::new();
    let digest = DIGEST
        .get_or_init(|| {
            let content: Vec<u8> = (0..(crate::chunk::CHUNK_SIZE as usize + 100)).map(|i| (i % 251) as u8).collect();
            let mut h = FileHasher::new();
            h.update(&content).expect("small");
            h.finish().expect("small")
        })
        .clone();
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
    let a = "127.0.0.1:1".parse().expect("valid");
    let b = "127.0.0.1:2".parse().expect("valid");
    d.handle_sources(&[a, b], Millis(0));
    let mut conns = Vec::new();
    // Verdicts are delivered one input later, as a writer thread's would be,
    // so blocks and timeouts also arrive while chunks are being checked.
    let mut verdicts: Vec<(u32, bool)> = Vec::new();
    let mut matched = Bitmap::new(n);
    let check = |d: &mut Download, conns: &mut Vec<_>, verdicts: &mut Vec<(u32, bool)>, matched: &mut Bitmap| {
        while let Some(o) = d.poll_output() {
            match o {
                DownloadOutput::Connect { peer, .. } => conns.push(peer),
                DownloadOutput::Check { chunk, data } => {
                    let ok = digest.chunks[chunk as usize].matches(&data);
                    if ok {
                        matched.set(chunk);
                    }
                    verdicts.push((chunk, ok));
                }
                DownloadOutput::Verified { chunk } => assert!(matched.get(chunk), "chunk {chunk} verified unchecked"),
                _ => {}
            }
        }
    };
    check(&mut d, &mut conns, &mut verdicts, &mut matched);
    for c in conns.clone() {
        d.handle_connected(c, Millis(1));
    }
    let mut dec = FrameDecoder::new(crate::client::peer::MAX_PEER_FRAME);
    let mut now = 1;
    for (i, piece) in data.split(|&b| b == 0xfe).enumerate() {
        let Some(&peer) = conns.get(i % conns.len().max(1)) else { return };
        now += 100;
        for (chunk, ok) in std::mem::take(&mut verdicts) {
            d.handle_checked(chunk, ok, Millis(now));
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
        check(&mut d, &mut conns, &mut verdicts, &mut matched);
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
            crate::wal::encode_record(rec, &mut again);
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

/// Frames from another tracker into a replicated tracker node, as its link
/// would carry them (after `Hello` and `Join`): consensus messages and soft
/// state. The node must reject what does not decode, never panic.
pub fn tracker_link(data: &[u8]) {
    use crate::proto::TrackerFrame;
    let cfg = TrackerConfig { password_params: crate::meta::PasswordParams::INSECURE_FAST, ..TrackerConfig::default() };
    let Ok(rep) = crate::tracker::OmniReplicator::recover(1, &[1, 2, 3], std::iter::empty()) else { return };
    let mut node = TrackerNode::new(cfg, Rng::from_u64(0), rep);
    let conn = ConnId(1);
    let now = crate::time::Millis(1);
    node.handle_connected(conn, "10.0.0.2:5000".parse().expect("valid"), now);
    node.handle_bytes(conn, &encode(&Message::Hello { protocol_version: PROTOCOL_VERSION, role: Role::Tracker }), now);
    node.handle_bytes(conn, &encode(&Message::Tracker(TrackerFrame::Join { node: 2 })), now);
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

/// The file [`download_stream`] downloads: two chunks and a bit, fixed.
pub fn download_stream_content() -> Vec<u8> {
    (0..(crate::chunk::CHUNK_SIZE as usize + 100)).map(|i| (i % 251) as u8).collect()
}

/// A logged-in client engine downloading `content` (file f.bin of group g)
/// from one sharer, its connection open: what the sharer sends next goes
/// through [`crate::client::ClientEngine::peer_recv_bufs`]. Returns the engine,
/// the connection and the engine's outputs so far (the peer handshake).
pub fn downloading_engine(
    content: &[u8],
) -> (crate::client::ClientEngine, crate::client::download::PeerConnId, Vec<crate::client::ClientOutput>) {
    use crate::client::peer::{Bitmap, Grant};
    use crate::client::{ClientConfig, ClientEngine, ClientOutput, Prepared, Ticket};
    use crate::ids::{FileName, GroupId, SessionToken, UserId};
    use crate::proto::{Reply, Request};
    use crate::shell::ShellCommand;
    let mut h = crate::chunk::FileHasher::new();
    h.update(content).expect("small");
    let digest = h.finish().expect("small");
    let peer: std::net::SocketAddr = "127.0.0.1:7000".parse().expect("valid");
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
                        Ok(Reply::Download { digest: digest.clone(), sharers: vec![peer], grant: Grant([1; 16]) })
                    }
                    _ => Ok(Reply::Done),
                };
                e.handle_tracker_bytes(&encode(&Message::Response { id, result }), Millis(0));
            }
        }
        rest
    };
    let login = ShellCommand::Login { user: UserId::new("me").expect("valid"), password: "pw".into() };
    e.handle_command(Ticket(1), login, Millis(0));
    drain(&mut e);
    e.handle_tracker_connected(Millis(0));
    let outs = drain(&mut e);
    answer(&mut e, outs);
    let cmd = ShellCommand::DownloadFile {
        group: GroupId::new("g").expect("valid"),
        name: FileName::new("f.bin").expect("valid"),
        destination: "/dl/".into(),
    };
    e.handle_command(Ticket(2), cmd, Millis(0));
    let outs = drain(&mut e);
    let rest = [answer(&mut e, outs), drain(&mut e)].concat();
    let id = rest
        .iter()
        .find_map(|o| if let ClientOutput::PrepareDownload { id, .. } = o { Some(*id) } else { None })
        .expect("the download prepares its part file");
    let n = digest.chunks.len() as u32;
    let prepared =
        Prepared { final_path: "/dl/f.bin".into(), part_path: "/dl/f.bin.part".into(), have: Bitmap::new(n) };
    e.handle_download_prepared(id, Ok(prepared), Millis(0));
    let conn = drain(&mut e)
        .iter()
        .find_map(|o| if let ClientOutput::PeerConnect { conn, .. } = o { Some(*conn) } else { None })
        .expect("connects to the sharer");
    e.handle_peer_connected(conn, Millis(0));
    let handshake = drain(&mut e);
    (e, conn, handshake)
}

/// A sharer's byte stream into a downloading client engine, read the way a
/// socket gives it (through `peer_recv_bufs`, block data straight into its
/// chunk): the first byte sets the read sizes, the rest is the stream. No
/// panic, receive space stays bounded, and a chunk handed out to be checked
/// that passes its SHA1 is the file's chunk.
pub fn download_stream(data: &[u8]) {
    use crate::client::ClientOutput;
    static CONTENT: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    let content = CONTENT.get_or_init(download_stream_content);
    let Some((&sizes, mut stream)) = data.split_first() else { return };
    let (mut e, conn, _) = downloading_engine(content);
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
        for o in outs {
            if let ClientOutput::WriteChunk { id, chunk, data, sha1 } = o {
                let ok = sha1.matches(&data);
                if ok {
                    let at = crate::client::download::chunk_offset(chunk) as usize;
                    assert!(data[..] == content[at..at + data.len()], "chunk {chunk} matched its SHA1 but differs");
                }
                e.handle_chunk_checked(id, chunk, ok, Millis(now));
                e.handle_chunk_buffer(id, data);
            }
        }
    }
}
