//! Writes the seed corpus of the fuzz targets: `cargo run -p shoal-core --example seed_corpus -- fuzz/corpus`.
//! The files are committed; run this again when the messages change.

use std::path::Path;

use shoal_core::chunk::{FileDigest, FileMeta, Sha1Digest};
use shoal_core::ids::{FileName, GroupId, SessionToken, UserId};
use shoal_core::proto::*;
use shoal_core::wire::encode;

fn main() {
    let root = std::env::args().nth(1).unwrap_or_else(|| "fuzz/corpus".into());
    let root = Path::new(&root);
    let g = GroupId::new("g1").unwrap();
    let u = UserId::new("alice").unwrap();
    let meta = FileMeta {
        name: FileName::new("a.bin").unwrap(),
        digest: FileDigest { size: 3, sha1: Sha1Digest([1; 20]), chunks: vec![Sha1Digest([2; 20])] },
    };
    let id = RequestId { client: 42, seq: 1 };
    let s = Some(SessionToken([9; 16]));
    let msgs = vec![
        Message::Hello { protocol_version: PROTOCOL_VERSION, role: Role::Client },
        Message::Request {
            id,
            settled_below: 0,
            session: None,
            body: Request::CreateUser { user: u.clone(), password: "pw".into() },
        },
        Message::Request {
            settled_below: 0,
            id,
            session: None,
            body: Request::Login {
                user: u.clone(),
                password: "pw".into(),
                listen: "127.0.0.1:9000".parse().unwrap(),
                plaintext_peers: false,
            },
        },
        Message::Request { id, settled_below: 0, session: s, body: Request::CreateGroup { group: g.clone() } },
        Message::Request {
            id,
            settled_below: 0,
            session: s,
            body: Request::AcceptRequest { group: g.clone(), user: u.clone() },
        },
        Message::Request {
            id,
            settled_below: 0,
            session: s,
            body: Request::UploadFile { group: g.clone(), file: meta.record() },
        },
        Message::Request {
            id,
            settled_below: 0,
            session: s,
            body: Request::PutRange { hashes: meta.digest.range(0).to_vec() },
        },
        Message::Request {
            id,
            settled_below: 0,
            session: s,
            body: Request::GetRange { group: g.clone(), name: meta.name.clone(), range: 0 },
        },
        Message::Response { id, result: Ok(Reply::Range { hashes: meta.digest.range(0).to_vec() }) },
        Message::Response { id, result: Err(ApiError::MissingRanges { ranges: vec![0, 3] }) },
        Message::Tracker(shoal_core::proto::TrackerFrame::Range(shoal_core::chunk::range_bytes(meta.digest.range(0)))),
        Message::Tracker(shoal_core::proto::TrackerFrame::RangeStored(meta.digest.index().ranges[0])),
        Message::Tracker(shoal_core::proto::TrackerFrame::RangeWanted(meta.digest.index().ranges[0])),
        Message::Request { id, settled_below: 0, session: s, body: Request::ListFiles { group: g.clone() } },
        Message::Response {
            id,
            result: Ok(Reply::Download {
                index: meta.digest.index(),
                sharers: vec![],
                grant: shoal_core::client::peer::Grant([5; 16]),
            }),
        },
        Message::Response { id, result: Err(ApiError::NotMember) },
        Message::Request { id, settled_below: 0, session: s, body: Request::ListGroupsPage { after: Some(g.clone()) } },
        Message::Request {
            id,
            settled_below: 0,
            session: s,
            body: Request::Progress {
                group: g.clone(),
                name: meta.name.clone(),
                size: 1 << 20,
                done: 1 << 19,
                rate: 1_000_000,
                sources: vec![("127.0.0.1:9002".parse().unwrap(), 1 << 19)],
            },
        },
        Message::Response {
            id,
            result: Ok(Reply::GroupsPage {
                groups: vec![GroupSummary { group: g.clone(), owner: u.clone(), members: 2 }],
                more: true,
            }),
        },
    ];
    let write = |target: &str, name: &str, bytes: &[u8]| {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
    };
    let mut stream = vec![7u8];
    for (i, m) in msgs.iter().enumerate() {
        let f = encode(m);
        write("message", &format!("msg{i}"), &f[4..]);
        stream.extend_from_slice(&f);
    }
    write("frame_stream", "all", &stream);
    write("frame_stream", "huge_prefix", &[0, 0xff, 0xff, 0xff, 0xff, 1, 2]);
    // tracker_node: records of (conn, len, bytes) on a connection that said Hello.
    let mut node = Vec::new();
    for m in &msgs[1..7] {
        for piece in encode(m).chunks(200) {
            node.push(0);
            node.push(piece.len() as u8);
            node.extend_from_slice(piece);
        }
    }
    write("tracker_node", "session", &node);
    for (i, line) in
        ["login alice pw", "upload_file \"/tmp/a b\" g1", "download_file g1 a.bin /tmp/", "help"].iter().enumerate()
    {
        write("shell_command", &format!("line{i}"), line.as_bytes());
    }
    use shoal_core::client::peer::{Bitmap, Grant, Load, PeerMessage};
    let peer_msgs = [
        PeerMessage::Hello { protocol_version: PROTOCOL_VERSION, role: Role::Peer },
        PeerMessage::Want { group: g.clone(), name: meta.name.clone(), sha1: meta.digest.sha1, grant: Grant([3; 16]) },
        PeerMessage::Have { chunks: Bitmap::full(2), load: Load::default() },
        PeerMessage::HaveOne { chunk: 1 },
        PeerMessage::Request { chunk: 0, offset: 0, len: 65536 },
        PeerMessage::Cancel { chunk: 0, offset: 0, len: 65536 },
        PeerMessage::Block { chunk: 0, offset: 0, load: Load { uploads: 1, queued: 2 }, data: vec![0; 100] },
        PeerMessage::Refused { reason: "access denied".into() },
        PeerMessage::OffersOnly,
        PeerMessage::HaveAll,
        PeerMessage::Busy { chunk: 1 },
        PeerMessage::Ready,
    ];
    let mut peer_stream = Vec::new();
    for (i, m) in peer_msgs.iter().enumerate() {
        let f = encode(m);
        write("peer_message", &format!("msg{i}"), &f[4..]);
        if i != 1 {
            peer_stream.extend_from_slice(&f);
            peer_stream.push(0xfe);
        }
    }
    write("download_peer", "stream", &peer_stream);
    let d = FileDigest {
        size: 3 * shoal_core::chunk::CHUNK_SIZE,
        sha1: Sha1Digest([1; 20]),
        chunks: vec![Sha1Digest([2; 20]); 3],
    };
    let mut have = Bitmap::new(3);
    have.set(1);
    write("sidecar", "one_chunk", &shoal_core::client::sidecar::encode(&d, &have));
    let mut two_slots = shoal_core::client::sidecar::slot(&shoal_core::client::sidecar::encode(&d, &have), 6);
    have.set(2);
    two_slots.extend(shoal_core::client::sidecar::slot(&shoal_core::client::sidecar::encode(&d, &have), 7));
    write("sidecar", "two_slots", &two_slots);
    // Log records as a tracker writes them: postcard-encoded entries.
    use shoal_core::meta::{Command, Entry, PasswordHash, PasswordParams};
    let entries = [
        Entry {
            id: Some(id),
            settled_below: 0,
            cmd: Command::CreateUser {
                user: u.clone(),
                password: PasswordHash::derive("pw", [1; 16], PasswordParams::INSECURE_FAST),
            },
        },
        Entry {
            id: None,
            settled_below: 0,
            cmd: Command::OpenSession {
                user: u.clone(),
                token: SessionToken([9; 16]),
                listen: "127.0.0.1:9000".parse().unwrap(),
            },
        },
        Entry {
            id: None,
            settled_below: 0,
            cmd: Command::CreateGroup { token: SessionToken([9; 16]), group: g.clone() },
        },
        Entry {
            id: None,
            settled_below: 0,
            cmd: Command::AddFile { token: SessionToken([9; 16]), group: g.clone(), file: meta.record() },
        },
    ];
    let mut wal = Vec::new();
    for e in &entries {
        shoal_core::wal::encode_record(&postcard::to_allocvec(e).unwrap(), &mut wal).unwrap();
    }
    write("wal_log", "records", &wal);
    let torn = wal.len() - 3;
    write("wal_log", "torn", &wal[..torn]);
    write("tracker_info", "default", b"127.0.0.1 7001\n127.0.0.1:7002\n# comment\n\n[::1]:7003\n");

    // tracker_link: what tracker 2 says to tracker 1 while a 3-node cluster
    // elects a leader and decides a few entries, as length-prefixed payloads.
    use shoal_core::time::Millis;
    use shoal_core::tracker::{OmniReplicator, Replicator};
    let mut reps: Vec<OmniReplicator> =
        (1..=3).map(|me| OmniReplicator::recover(me, &[1, 2, 3], std::iter::empty()).unwrap()).collect();
    for r in reps.iter_mut() {
        for p in r.peers().to_vec() {
            r.handle_peer_up(p);
        }
    }
    let mut to_one = Vec::new();
    for step in 0..200u64 {
        let now = Millis(step * 10);
        if step % 20 == 10 {
            reps[(step as usize / 20) % 3].propose(entries[(step as usize / 20) % entries.len()].clone());
        }
        for i in 0..3 {
            reps[i].handle_timeout(now);
            while reps[i].poll_persist().is_some() {}
            while let Some((to, out, _)) = reps[i].poll_send() {
                let bytes = out.into_bytes();
                if i == 1 && to == 1 {
                    to_one.push(bytes.clone());
                }
                let _ = reps[to as usize - 1].handle_message(i as u64 + 1, &bytes);
            }
            while reps[i].poll_decided().is_some() {}
        }
    }
    let framed = |msgs: &[Vec<u8>]| {
        let mut out = Vec::new();
        for m in msgs {
            out.extend_from_slice(&(m.len() as u16).to_le_bytes());
            out.extend_from_slice(m);
        }
        out
    };
    write("tracker_link", "all", &framed(&to_one));
    // tracker_frames: whole frames on a tracker's link to us, of every kind;
    // the biggest consensus message above in parts.
    {
        use shoal_core::proto::TrackerFrame;
        let range = shoal_core::chunk::range_bytes(&[Sha1Digest([3; 20]), Sha1Digest([4; 20])]);
        let hash = Sha1Digest::of(&range);
        let big = to_one.iter().max_by_key(|m| m.len()).cloned().unwrap_or_default();
        let half = big.len() / 2;
        let frames = [
            TrackerFrame::Ping,
            TrackerFrame::Range(range),
            TrackerFrame::RangeStored(hash),
            TrackerFrame::RangeWanted(hash),
            TrackerFrame::ConsensusPart { xfer: 7, last: false, bytes: big[..half].to_vec() },
            TrackerFrame::ConsensusPart { xfer: 7, last: true, bytes: big[half..].to_vec() },
            TrackerFrame::ConsensusAck { xfer: 7, bytes: 100 },
            TrackerFrame::ConsensusOffer { xfer: 8, base: hash, base_len: half as u64, len: big.len() as u64 },
            TrackerFrame::ConsensusResume { xfer: 8, from: 64 },
            TrackerFrame::Soft(Default::default()),
            TrackerFrame::Health(shoal_core::tracker::Health {
                applied: 12,
                leader: Some(1),
                synced: true,
                clients: 3,
                sessions: 2,
                groups: 1,
                files: 4,
                reads: 9,
            }),
            TrackerFrame::Soft(SoftState {
                transfers: vec![shoal_core::tracker::Transfer {
                    listen: "127.0.0.1:9001".parse().unwrap(),
                    user: UserId::new("u").unwrap(),
                    group: GroupId::new("g").unwrap(),
                    name: FileName::new("f").unwrap(),
                    size: 1 << 20,
                    done: 1 << 19,
                    rate: 1000,
                    sources: vec![("127.0.0.1:9002".parse().unwrap(), 1 << 19)],
                    ttl_ms: 5000,
                }],
                ..Default::default()
            }),
        ];
        let mut all = Vec::new();
        for (i, f) in frames.iter().enumerate() {
            let bytes = encode(&Message::Tracker(f.clone()));
            write("tracker_frames", &format!("frame{i}"), &bytes);
            all.extend(bytes);
        }
        write("tracker_frames", "all", &all);
    }
    for (i, chunk) in to_one.chunks(8).take(6).enumerate() {
        write("tracker_link", &format!("part{i}"), &framed(chunk));
    }
    // download_stream: a sharer's answer to the requests a downloading
    // engine makes (found by running it), whole and with one byte flipped.
    let (stream, corrupt) = sharer_stream();
    write("download_stream", "answer", &[[3].as_slice(), &stream].concat());
    write("download_stream", "answer_small_reads", &[[200].as_slice(), &stream].concat());
    write("download_stream", "corrupt", &[[9].as_slice(), &corrupt].concat());
}

/// The bytes a sharer sends a downloading engine (`fuzzing::downloading_engine`):
/// handshake, chunk map, then every requested block in order; and the same
/// with one data byte flipped.
fn sharer_stream() -> (Vec<u8>, Vec<u8>) {
    use shoal_core::client::peer::{encode_block, Bitmap, Load, PeerMessage};
    use shoal_core::client::{ClientInput, ClientOutput, PeerEvent};
    use shoal_core::wire::FrameDecoder;
    let content = shoal_core::fuzzing::download_stream_content();
    let mut disk = shoal_core::fuzzing::ScratchDisk::default();
    let (mut e, conn, _) = shoal_core::fuzzing::downloading_engine(&content, &mut disk);
    let n = shoal_core::chunk::chunk_count(content.len() as u64) as u32;
    let mut stream = encode(&PeerMessage::Hello { protocol_version: PROTOCOL_VERSION, role: Role::Peer });
    stream.extend(encode(&PeerMessage::Have { chunks: Bitmap::full(n), load: Load::default() }));
    e.handle_input(ClientInput::Peer(conn, PeerEvent::Bytes(&stream)), shoal_core::time::Millis(0));
    let mut corrupt_at = 0;
    for o in std::iter::from_fn(|| e.poll_output()) {
        let ClientOutput::PeerTransmit { bytes, .. } = o else { continue };
        let mut d = FrameDecoder::new(shoal_core::client::peer::MAX_PEER_FRAME);
        d.push(&bytes);
        while let Ok(Some(PeerMessage::Request { chunk, offset, len })) = d.next_message::<PeerMessage>() {
            let at = shoal_core::client::download::chunk_offset(chunk) as usize + offset as usize;
            stream.extend(encode_block(chunk, offset, Load::default(), &content[at..at + len as usize]));
            corrupt_at = stream.len() - 1;
        }
    }
    let mut corrupt = stream.clone();
    corrupt[corrupt_at] ^= 0xff;
    (stream, corrupt)
}
