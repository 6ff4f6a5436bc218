use super::*;
use crate::chunk::FileDigest;
use crate::client::disk::{DiskDone, DiskOp};
use crate::ids::{FileName, GroupId};
use crate::proto::ApiError;
use crate::wire::decode;

fn engine() -> ClientEngine {
    let trackers = vec!["127.0.0.1:1".parse().unwrap(), "127.0.0.1:2".parse().unwrap()];
    ClientEngine::new(ClientConfig::new("127.0.0.1:9".parse().unwrap(), trackers), Rng::from_u64(3))
}

fn drain(e: &mut ClientEngine) -> Vec<ClientOutput> {
    std::iter::from_fn(|| e.poll_output()).collect()
}

fn sent_requests(outs: &[ClientOutput]) -> Vec<(RequestId, Request)> {
    outs.iter()
        .filter_map(|o| match o {
            ClientOutput::Transmit(b) => match decode(&b[4..]).unwrap() {
                Message::Request { id, body, .. } => Some((id, body)),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

#[test]
fn commands_needing_a_session_fail_locally_without_one() {
    let mut e = engine();
    e.handle_input(ClientInput::User { ticket: Ticket(1), cmd: ShellCommand::ListGroups }, Millis(0));
    let outs = drain(&mut e);
    assert!(
        matches!(
            outs.as_slice(),
            [ClientOutput::Done { ticket: Ticket(1), result: Err(ShellError::Api(ApiError::NotLoggedIn)) }]
        ),
        "{outs:?}"
    );
}

#[test]
fn a_silent_tracker_is_failed_over_and_the_request_resent_with_its_id() {
    let mut e = engine();
    let cmd = ShellCommand::CreateUser { user: UserId::new("a").unwrap(), password: "p".into() };
    e.handle_input(ClientInput::User { ticket: Ticket(1), cmd }, Millis(0));
    let first = match drain(&mut e).as_slice() {
        [ClientOutput::Connect { addr }] => *addr,
        o => panic!("{o:?}"),
    };
    e.handle_input(ClientInput::Tracker(TrackerEvent::Connected { key: crate::identity::KeyId([7; 32]) }), Millis(10));
    let sent = sent_requests(&drain(&mut e));
    assert_eq!(sent.len(), 1);
    let deadline = e.poll_timeout().unwrap();
    e.handle_input(ClientInput::Timeout, deadline);
    let outs = drain(&mut e);
    let second = outs
        .iter()
        .find_map(|o| if let ClientOutput::Connect { addr } = o { Some(*addr) } else { None })
        .expect("fails over");
    assert_ne!(first, second);
    e.handle_input(ClientInput::Tracker(TrackerEvent::Connected { key: crate::identity::KeyId([7; 32]) }), deadline);
    let resent = sent_requests(&drain(&mut e));
    assert_eq!(resent, sent, "same request id after failover");
}

#[test]
fn an_unanswered_request_fails_after_the_give_up_time() {
    let mut e = engine();
    let cmd = ShellCommand::CreateUser { user: UserId::new("a").unwrap(), password: "p".into() };
    e.handle_input(ClientInput::User { ticket: Ticket(1), cmd }, Millis(0));
    let mut now = Millis(0);
    let mut done = None;
    for _ in 0..1000 {
        for o in drain(&mut e) {
            match o {
                ClientOutput::Connect { .. } => e.handle_input(ClientInput::Tracker(TrackerEvent::Closed), now),
                ClientOutput::Done { result, .. } => done = Some(result),
                _ => {}
            }
        }
        if done.is_some() {
            break;
        }
        now = e.poll_timeout().expect("a deadline while a request waits");
        e.handle_input(ClientInput::Timeout, now);
    }
    assert!(matches!(done, Some(Err(ShellError::NoTracker { .. }))));
    assert!(now <= Millis(20_000) && now >= Millis(19_000), "{now}");
}

/// Answers every request in `outs` with `reply(request)`; returns the other outputs.
fn answer_all(
    e: &mut ClientEngine,
    outs: Vec<ClientOutput>,
    reply: impl Fn(&Request) -> Result<Reply, ApiError>,
) -> Vec<ClientOutput> {
    let mut rest = Vec::new();
    for (id, req) in sent_requests(&outs) {
        let bytes = encode(&Message::Response { id, result: reply(&req) });
        e.handle_input(ClientInput::Tracker(TrackerEvent::Bytes(&bytes)), Millis(0));
    }
    for o in outs {
        if !matches!(o, ClientOutput::Transmit(_) | ClientOutput::Connect { .. }) {
            rest.push(o);
        }
    }
    rest
}

/// Logs `e` in as "me", the tracker answering with `reply`.
fn log_in(e: &mut ClientEngine, reply: impl Fn(&Request) -> Result<Reply, ApiError>) {
    let login = ShellCommand::Login { user: UserId::new("me").unwrap(), password: "pw".into() };
    e.handle_input(ClientInput::User { ticket: Ticket(1), cmd: login }, Millis(0));
    drain(e);
    e.handle_input(ClientInput::Tracker(TrackerEvent::Connected { key: crate::identity::KeyId([7; 32]) }), Millis(0));
    let outs = drain(e);
    answer_all(e, outs, reply);
    assert!(e.user().is_some());
}

/// The tracker as a serving engine's tests see it: logins succeed, and a
/// grant is valid for any downloader key made by [`downloader_key`].
fn serving_reply(req: &Request) -> Result<Reply, ApiError> {
    match req {
        Request::Login { .. } => Ok(Reply::Session { token: SessionToken([5; 16]) }),
        // The server asks about the key the downloader proved to it.
        Request::CheckGrant { holder: Some(k), .. } if k.0[1..] == [3; 31] => {
            Ok(Reply::GrantValid { user: UserId::new("dl").unwrap() })
        }
        Request::CheckGrant { .. } => Err(ApiError::BadGrant),
        _ => Ok(Reply::Done),
    }
}

/// The key downloader `i` proves to a serving engine.
fn downloader_key(i: u8) -> KeyId {
    let mut k = [3; 32];
    k[0] = i;
    KeyId(k)
}

/// A logged-in engine sharing a 4 MiB file (8 chunks) "f.bin" in group g,
/// its uploads capped at `max_upload_rate`.
fn sharing_engine(max_upload_rate: Option<u64>) -> (ClientEngine, FileDigest) {
    sharing_engine_of(max_upload_rate, 4 << 20)
}

/// [`sharing_engine`] with a file of `size` bytes.
fn sharing_engine_of(max_upload_rate: Option<u64>, size: u64) -> (ClientEngine, FileDigest) {
    let trackers = vec!["127.0.0.1:1".parse().unwrap(), "127.0.0.1:2".parse().unwrap()];
    let mut cfg = ClientConfig::new("127.0.0.1:9".parse().unwrap(), trackers);
    cfg.max_upload_rate = max_upload_rate;
    let mut e = ClientEngine::new(cfg, Rng::from_u64(3));
    log_in(&mut e, serving_reply);
    let g = GroupId::new("g").unwrap();
    e.handle_input(
        ClientInput::User {
            ticket: Ticket(2),
            cmd: ShellCommand::UploadFile { path: "/x/f.bin".into(), group: g.clone() },
        },
        Millis(0),
    );
    let job = drain(&mut e)
        .iter()
        .find_map(|o| if let ClientOutput::Disk(DiskOp::HashFile { job, .. }) = o { Some(*job) } else { None })
        .expect("the upload asks for hashing");
    let digest = FileDigest {
        size,
        sha1: crate::chunk::Sha1Digest([1; 20]),
        chunks: vec![crate::chunk::Sha1Digest([2; 20]); crate::chunk::chunk_count(size) as usize],
    };
    e.handle_input(ClientInput::Disk(DiskDone::FileHashed { job, result: Ok(digest.clone()) }), Millis(0));
    let outs = drain(&mut e);
    answer_all(&mut e, outs, serving_reply);
    (e, digest)
}

/// Downloader `i` connects as `conn`, proves its key and asks for f.bin;
/// its grant passes. What the engine sent it.
fn accept_downloader(
    e: &mut ClientEngine,
    digest: &FileDigest,
    conn: crate::client::download::PeerConnId,
    i: u8,
) -> Vec<crate::client::peer::PeerMessage> {
    peer_messages(&accept_downloader_outputs(e, digest, conn, i), conn)
}

/// As [`accept_downloader`], all the engine's outputs on the way.
fn accept_downloader_outputs(
    e: &mut ClientEngine,
    digest: &FileDigest,
    conn: crate::client::download::PeerConnId,
    i: u8,
) -> Vec<ClientOutput> {
    use crate::client::peer::{Grant, PeerMessage};
    e.handle_input(ClientInput::Peer(conn, PeerEvent::Accepted), Millis(0));
    e.handle_input(ClientInput::Peer(conn, PeerEvent::Secured { key: downloader_key(i) }), Millis(0));
    let mut hs = encode(&PeerMessage::Hello { protocol_version: PROTOCOL_VERSION, role: Role::Peer });
    let g = GroupId::new("g").unwrap();
    let want =
        PeerMessage::Want { group: g, name: FileName::new("f.bin").unwrap(), sha1: digest.sha1, grant: Grant([1; 16]) };
    hs.extend(encode(&want));
    e.handle_input(ClientInput::Peer(conn, PeerEvent::Bytes(&hs)), Millis(0));
    let outs = drain(e);
    let mut outs = answer_all(e, outs, serving_reply);
    outs.extend(drain(e));
    outs
}

/// The peer messages among `outs` sent on `conn`.
fn peer_messages(
    outs: &[ClientOutput],
    conn: crate::client::download::PeerConnId,
) -> Vec<crate::client::peer::PeerMessage> {
    outs.iter()
        .filter_map(|o| match o {
            ClientOutput::PeerTransmit { conn: c, bytes } if *c == conn => decode(&bytes[4..]).ok(),
            _ => None,
        })
        .collect()
}

/// A logged-in engine sharing a 4 MiB file in group g, with one accepted peer
/// connection that passed the grant check.
fn serving_engine() -> (ClientEngine, crate::client::download::PeerConnId) {
    use crate::client::peer::PeerMessage;
    let (mut e, digest) = sharing_engine(None);
    let conn = crate::client::download::PeerConnId(16);
    let have = accept_downloader(&mut e, &digest, conn, 3);
    assert!(
        have.iter().any(|m| matches!(m, PeerMessage::Have { .. })),
        "the grant passed, the chunk map goes out: {have:?}"
    );
    (e, conn)
}

/// A downloader that stops reading: the server reads no more than about
/// SEND_HIGH_WATER ahead of the socket, however many blocks it was asked for.
#[test]
fn a_peer_that_does_not_read_gets_at_most_the_high_water_mark() {
    use crate::client::peer::{PeerMessage, BLOCK_SIZE, MAX_QUEUED_REQUESTS};
    let (mut e, conn) = serving_engine();
    let per = crate::chunk::CHUNK_SIZE as u32 / BLOCK_SIZE;
    let reqs: Vec<u8> = (0..MAX_QUEUED_REQUESTS as u32)
        .flat_map(|i| {
            encode(&PeerMessage::Request { chunk: (i / per) % 8, offset: (i % per) * BLOCK_SIZE, len: BLOCK_SIZE })
        })
        .collect();
    e.handle_input(ClientInput::Peer(conn, PeerEvent::Bytes(&reqs)), Millis(1));
    let mut queued_bytes = 0usize;
    let mut blocks = 0;
    loop {
        let sends: Vec<ClientOutput> =
            drain(&mut e).into_iter().filter(|o| matches!(o, ClientOutput::SendBlock { .. })).collect();
        if sends.is_empty() {
            break;
        }
        for s in sends {
            let ClientOutput::SendBlock { header, len, .. } = s else { unreachable!() };
            blocks += 1;
            // The socket takes nothing: everything stays queued.
            queued_bytes += header.len() + len as usize;
            e.handle_input(ClientInput::Peer(conn, PeerEvent::BlockSent(Ok(()))), Millis(1));
            e.handle_input(ClientInput::Peer(conn, PeerEvent::Backlog(queued_bytes)), Millis(1));
        }
    }
    let cap = SEND_HIGH_WATER / BLOCK_SIZE as usize + 1;
    assert!(blocks >= 4 && blocks <= cap, "{blocks} blocks read for a peer that reads nothing (cap {cap})");
    // `show_uploads` counts every block handed out, per share and in all.
    let served = blocks as u64 * u64::from(BLOCK_SIZE);
    assert_eq!(
        e.show_uploads(),
        vec![format!("[S] g f.bin {served} bytes served"), format!("{served} bytes served in all")]
    );
    // Once the socket drains, serving resumes.
    e.handle_input(ClientInput::Peer(conn, PeerEvent::Backlog(0)), Millis(2));
    assert!(drain(&mut e).iter().any(|o| matches!(o, ClientOutput::SendBlock { .. })));
}

#[test]
fn a_peer_queueing_too_many_requests_is_refused() {
    use crate::client::peer::{PeerMessage, BLOCK_SIZE, MAX_QUEUED_REQUESTS};
    let (mut e, conn) = serving_engine();
    let per = crate::chunk::CHUNK_SIZE as u32 / BLOCK_SIZE;
    let reqs: Vec<u8> = (0..=MAX_QUEUED_REQUESTS as u32)
        .flat_map(|i| {
            encode(&PeerMessage::Request { chunk: (i / per) % 8, offset: (i % per) * BLOCK_SIZE, len: BLOCK_SIZE })
        })
        .collect();
    e.handle_input(ClientInput::Peer(conn, PeerEvent::Bytes(&reqs)), Millis(1));
    let outs = drain(&mut e);
    let refused = outs.iter().any(|o| matches!(o, ClientOutput::PeerTransmit { bytes, .. } if decode::<PeerMessage>(&bytes[4..]) == Ok(PeerMessage::Refused { reason: "too many requests in flight".into() })));
    assert!(refused, "{outs:?}");
    assert!(outs.iter().any(|o| matches!(o, ClientOutput::PeerClose { conn: c } if *c == conn)));
}

#[test]
fn a_request_after_a_quiet_spell_waits_its_full_timeout() {
    let mut e = engine();
    let create = |u: &str| ShellCommand::CreateUser { user: UserId::new(u).unwrap(), password: "p".into() };
    e.handle_input(ClientInput::User { ticket: Ticket(1), cmd: create("a") }, Millis(0));
    drain(&mut e);
    e.handle_input(ClientInput::Tracker(TrackerEvent::Connected { key: crate::identity::KeyId([7; 32]) }), Millis(10));
    let outs = drain(&mut e);
    answer_all(&mut e, outs, |_| Ok(Reply::Done));
    // Quiet for longer than the request timeout, then a new request: the
    // tracker has had no time to answer it yet, so it is not silent.
    let later = Millis(10).plus(e.cfg.request_timeout).plus(Millis(5_000));
    e.handle_input(ClientInput::User { ticket: Ticket(2), cmd: create("b") }, later);
    assert_eq!(sent_requests(&drain(&mut e)).len(), 1);
    let deadline = e.poll_timeout().expect("waiting for an answer");
    assert_eq!(deadline, later.plus(e.cfg.request_timeout));
    e.handle_input(ClientInput::Timeout, later.plus(Millis(1)));
    assert!(
        !drain(&mut e).iter().any(|o| matches!(o, ClientOutput::Disconnect)),
        "failed over a tracker that had no time to answer"
    );
    // Silent for the whole timeout after the request: now it fails over.
    e.handle_input(ClientInput::Timeout, deadline);
    assert!(drain(&mut e).iter().any(|o| matches!(o, ClientOutput::Disconnect)));
}

/// Block requests among `outs`, in order.
fn peer_requests(outs: &[ClientOutput]) -> Vec<(u32, u32, u32)> {
    use crate::client::peer::PeerMessage;
    let mut v = Vec::new();
    for o in outs {
        if let ClientOutput::PeerTransmit { bytes, .. } = o {
            let mut d = FrameDecoder::new(crate::client::peer::MAX_PEER_FRAME);
            d.push(bytes);
            while let Ok(Some(PeerMessage::Request { chunk, offset, len })) = d.next_message::<PeerMessage>() {
                v.push((chunk, offset, len));
            }
        }
    }
    v
}

/// Announcements of a partial file among `outs`.
fn announces(outs: &[ClientOutput]) -> usize {
    sent_requests(outs).iter().filter(|(_, r)| matches!(r, Request::HaveChunk { .. })).count()
}

/// Downloads `content` from one sharer whose bytes arrive in reads of random
/// sizes (`seed`), until `stop_after` chunks are written; asserts that every
/// chunk written holds the file's bytes. Returns the engine, its disk and how
/// many times it announced the file to the tracker.
fn download_in_random_reads(
    content: &[u8],
    seed: u64,
    haves: bool,
    stop_after: u32,
) -> (ClientEngine, crate::fuzzing::ScratchDisk, usize) {
    use crate::client::peer::{encode_block, Bitmap, Load, PeerMessage};
    let mut disk = crate::fuzzing::ScratchDisk::default();
    let (mut e, conn, _) = crate::fuzzing::downloading_engine(content, &mut disk);
    let n = crate::chunk::chunk_count(content.len() as u64) as u32;
    let mut wire = encode(&PeerMessage::Hello { protocol_version: PROTOCOL_VERSION, role: Role::Peer });
    wire.extend(encode(&PeerMessage::Have { chunks: Bitmap::full(n), load: Load::default() }));
    let mut rng = Rng::from_u64(seed ^ 0x5eed);
    let mut written = Bitmap::new(n);
    let mut announced = 0;
    let mut step = 0;
    loop {
        step += 1;
        assert!(step < 100_000, "no progress");
        // The sharer answers every request so far; the disk does its work.
        let outs = drain(&mut e);
        let outs = crate::fuzzing::run_disk_watched(&mut e, &mut disk, outs, Millis(0), |op| {
            if let DiskOp::Write { chunk, data, .. } = op {
                let at = crate::client::download::chunk_offset(*chunk) as usize;
                assert!(data[..] == content[at..at + data.len()], "chunk {chunk} assembled wrong");
                written.set(*chunk);
            }
        });
        announced += announces(&outs);
        let outs = answer_all(&mut e, outs, |_| Ok(Reply::Done));
        if written.count() >= stop_after {
            return (e, disk, announced);
        }
        for (chunk, offset, l) in peer_requests(&outs) {
            let at = crate::client::download::chunk_offset(chunk) as usize + offset as usize;
            wire.extend(encode_block(chunk, offset, Load::default(), &content[at..at + l as usize]));
            if haves && rng.below(3) == 0 {
                wire.extend(encode(&PeerMessage::HaveOne { chunk }));
            }
        }
        if wire.is_empty() {
            continue;
        }
        // One read: up to a random count, filling data space first.
        let (data, frames) = e.peer_recv_bufs(conn).expect("connection dropped");
        let want = 1 + rng.below(wire.len().min(70_000) as u64) as usize;
        let a = data.len().min(want);
        data[..a].copy_from_slice(&wire[..a]);
        let b = frames.len().min(want - a);
        frames[..b].copy_from_slice(&wire[a..a + b]);
        wire.drain(..a + b);
        e.handle_peer_received(conn, a + b, Millis(0));
    }
}

#[test]
fn a_partial_download_is_announced_once_and_again_with_each_heartbeat() {
    // The tracker records partial holders, not chunks: one announcement
    // when the first chunk is verified, not one per chunk.
    let content: Vec<u8> = (0..5 * crate::chunk::CHUNK_SIZE as usize).map(|i| (i % 249) as u8).collect();
    let (mut e, _, announced) = download_in_random_reads(&content, 7, false, 3);
    assert_eq!(announced, 1);
    // Once the link is quiet, each heartbeat repeats it, so a record the
    // tracker dropped with a lapsed lease comes back.
    let later = Millis(0).plus(e.cfg.heartbeat_every);
    e.handle_input(ClientInput::Timeout, later);
    let outs = drain(&mut e);
    assert!(sent_requests(&outs).iter().any(|(_, r)| matches!(r, Request::Heartbeat)));
    assert_eq!(announces(&outs), 1);
}

proptest::proptest! {
    /// A sharer's bytes arrive in reads of any size, as a socket gives them:
    /// block data lands straight in its chunk (`peer_recv_bufs`), the rest
    /// goes through the frame decoder, and every chunk handed out to be
    /// checked holds exactly the file's bytes; the download completes and
    /// announces itself to the tracker once.
    #[test]
    fn block_data_received_in_place_assembles_every_chunk(
        len in 1usize..(3 * crate::chunk::CHUNK_SIZE as usize),
        seed in proptest::prelude::any::<u64>(),
        haves in proptest::prelude::any::<bool>(),
    ) {
        let mut content = vec![0u8; len];
        Rng::from_u64(seed).fill(&mut content);
        let n = crate::chunk::chunk_count(len as u64) as u32;
        let (mut e, mut disk, announced) = download_in_random_reads(&content, seed, haves, n);
        proptest::prop_assert_eq!(announced, 1);
        // The whole-file hash completes and the file gets its name.
        let outs = drain(&mut e);
        crate::fuzzing::run_disk(&mut e, &mut disk, outs, Millis(1));
        proptest::prop_assert!(disk.files.get("/dl/f.bin").is_some_and(|f| f == &content));
    }
}

/// A tracker that proves another key than the one pinned (or than the one it
/// proved before) gets nothing, not even the password of a waiting login:
/// the engine hangs up, and tries again later.
#[test]
fn a_tracker_proving_the_wrong_key_is_sent_nothing() {
    use crate::identity::KeyId;
    for pinned in [true, false] {
        let mut cfg = ClientConfig::new("127.0.0.1:9".parse().unwrap(), vec!["127.0.0.1:1".parse().unwrap()]);
        if pinned {
            cfg.tracker_keys = vec![Some(KeyId([1; 32]))];
        }
        let mut e = ClientEngine::new(cfg, Rng::from_u64(3));
        let mut now = Millis(0);
        let connect = |e: &mut ClientEngine, key: u8, now: Millis| {
            e.handle_input(ClientInput::Tracker(TrackerEvent::Connected { key: KeyId([key; 32]) }), now);
            drain(e)
        };
        let login = ShellCommand::Login { user: UserId::new("a").unwrap(), password: "secret".into() };
        if !pinned {
            // Unpinned: the first key proved is taken, and required from then on.
            e.handle_input(
                ClientInput::User {
                    ticket: Ticket(1),
                    cmd: ShellCommand::CreateUser { user: UserId::new("a").unwrap(), password: "secret".into() },
                },
                now,
            );
            drain(&mut e);
            assert_eq!(sent_requests(&connect(&mut e, 1, now)).len(), 1);
            e.handle_input(ClientInput::Tracker(TrackerEvent::Closed), now);
            drain(&mut e);
        }
        e.handle_input(ClientInput::User { ticket: Ticket(2), cmd: login }, now);
        drain(&mut e);
        let waiting = e.poll_timeout();
        if let Some(t) = waiting {
            now = now.max(t);
            e.handle_input(ClientInput::Timeout, now);
            drain(&mut e);
        }
        let outs = connect(&mut e, 9, now);
        assert!(
            outs.iter().all(|o| !matches!(o, ClientOutput::Transmit(_))),
            "pinned {pinned}: sent to an impostor: {outs:?}"
        );
        assert!(matches!(outs.first(), Some(ClientOutput::Disconnect)), "{outs:?}");
        // The only tracker listed is someone else: the login fails at once, saying so.
        let failed = outs.iter().any(|o| {
            matches!(o, ClientOutput::Done { ticket: Ticket(2), result: Err(ShellError::TrackerKey { got, .. }) } if *got == KeyId([9; 32]))
        });
        assert!(failed, "pinned {pinned}: {outs:?}");
        // Tried again once the real tracker is back at that address.
        let login = ShellCommand::Login { user: UserId::new("a").unwrap(), password: "secret".into() };
        e.handle_input(ClientInput::User { ticket: Ticket(3), cmd: login }, now);
        for tries in 0.. {
            if matches!(drain(&mut e).last(), Some(ClientOutput::Connect { .. })) {
                break;
            }
            assert!(tries < 10, "never dialled again");
            now = e.poll_timeout().expect("a retry is due");
            e.handle_input(ClientInput::Timeout, now);
        }
        let sent = sent_requests(&connect(&mut e, 1, now));
        assert!(sent.iter().any(|(_, r)| matches!(r, Request::Login { .. })), "pinned {pinned}: {sent:?}");
    }
}

/// Block requests for all of `chunk`.
fn chunk_requests(chunk: u32) -> Vec<u8> {
    use crate::client::peer::{PeerMessage, BLOCK_SIZE};
    (0..crate::chunk::CHUNK_SIZE as u32 / BLOCK_SIZE)
        .flat_map(|i| encode(&PeerMessage::Request { chunk, offset: i * BLOCK_SIZE, len: BLOCK_SIZE }))
        .collect()
}

/// The chunks offered in `msgs`: a map's set bits, then `HaveOne`s.
fn offered(msgs: &[crate::client::peer::PeerMessage]) -> Vec<u32> {
    use crate::client::peer::PeerMessage;
    msgs.iter()
        .flat_map(|m| match m {
            PeerMessage::Have { chunks, .. } => chunks.iter_set().collect(),
            PeerMessage::HaveOne { chunk } => vec![*chunk],
            _ => vec![],
        })
        .collect()
}

/// A complete share serving a crowd super-seeds: the first downloader sees
/// the whole map (until the second comes), each later one a couple of
/// chunks at a time, no chunk offered twice (or offered after it was sent
/// whole to the first) while some went to nobody; an offer the downloader
/// got elsewhere or was sent whole is replaced by a new one.
#[test]
fn a_seeder_offers_a_crowd_distinct_chunks() {
    use crate::client::download::PeerConnId;
    use crate::client::peer::PeerMessage;
    use crate::client::serve::OPEN_OFFERS;
    // 16 chunks: more than the offers to three, so offers do not end.
    let (mut e, digest) = sharing_engine_of(None, 16 * crate::chunk::CHUNK_SIZE);
    let (a, b, c) = (PeerConnId(16), PeerConnId(17), PeerConnId(18));
    assert_eq!(offered(&accept_downloader(&mut e, &digest, a, 1)), (0..16).collect::<Vec<u32>>(), "alone: all");
    // A, which saw the whole map, is sent chunks 0 and 1 whole: the offers
    // to the others go elsewhere.
    let mut asks = chunk_requests(0);
    asks.extend(chunk_requests(1));
    e.handle_input(ClientInput::Peer(a, PeerEvent::Bytes(&asks)), Millis(1));
    for _ in 0..8 {
        drain(&mut e);
        e.handle_input(ClientInput::Peer(a, PeerEvent::BlockSent(Ok(()))), Millis(1));
    }
    let to_b = offered(&accept_downloader(&mut e, &digest, b, 2));
    let to_c = offered(&accept_downloader(&mut e, &digest, c, 3));
    assert!(to_b.iter().chain(&to_c).all(|&k| k > 1), "offered what A was sent: {to_b:?} {to_c:?}");
    assert_eq!((to_b.len(), to_c.len()), (OPEN_OFFERS as usize, OPEN_OFFERS as usize), "{to_b:?} {to_c:?}");
    let mut seen: Vec<u32> = to_b.iter().chain(&to_c).copied().collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 2 * OPEN_OFFERS as usize, "offers overlap: {to_b:?} {to_c:?}");

    // C got one of its offers from another peer: a fresh chunk is offered.
    let got = encode(&PeerMessage::HaveOne { chunk: to_c[0] });
    e.handle_input(ClientInput::Peer(c, PeerEvent::Bytes(&got)), Millis(1));
    let more = offered(&peer_messages(&drain(&mut e), c));
    assert_eq!(more.len(), 1);
    assert!(!seen.contains(&more[0]), "{more:?} was offered already");
    seen.push(more[0]);

    // B is sent one of its offers whole: another fresh one takes its place.
    e.handle_input(ClientInput::Peer(b, PeerEvent::Bytes(&chunk_requests(to_b[0]))), Millis(1));
    let mut outs = drain(&mut e);
    for _ in 0..8 {
        e.handle_input(ClientInput::Peer(b, PeerEvent::BlockSent(Ok(()))), Millis(1));
        outs.extend(drain(&mut e));
    }
    let blocks = outs.iter().filter(|o| matches!(o, ClientOutput::SendBlock { conn, .. } if *conn == b)).count();
    assert_eq!(blocks, 4, "the chunk went out");
    let more = offered(&peer_messages(&outs, b));
    assert_eq!(more.len(), 1, "{more:?}");
    assert!(!seen.contains(&more[0]), "{more:?} was offered already");
}

/// A `Cancel` of the rest of a chunk, in one message, drops every block
/// request of it still queued: none of them is sent.
#[test]
fn a_cancelled_chunk_is_not_sent() {
    use crate::client::download::PeerConnId;
    use crate::client::peer::PeerMessage;
    let (mut e, digest) = sharing_engine(None);
    let a = PeerConnId(16);
    accept_downloader(&mut e, &digest, a, 1);
    let mut asks = chunk_requests(0);
    asks.extend(chunk_requests(1));
    e.handle_input(ClientInput::Peer(a, PeerEvent::Bytes(&asks)), Millis(1));
    let mut outs = drain(&mut e);
    let cancel = encode(&PeerMessage::Cancel { chunk: 1, offset: 0, len: crate::chunk::CHUNK_SIZE as u32 });
    e.handle_input(ClientInput::Peer(a, PeerEvent::Bytes(&cancel)), Millis(1));
    outs.extend(drain(&mut e));
    let mut sent = Vec::new();
    for _ in 0..20 {
        let reads: Vec<u64> = outs
            .iter()
            .filter_map(|o| if let ClientOutput::SendBlock { offset, .. } = o { Some(*offset) } else { None })
            .collect();
        if reads.is_empty() {
            break;
        }
        outs.clear();
        for off in reads {
            sent.push(off / crate::chunk::CHUNK_SIZE);
            e.handle_input(ClientInput::Peer(a, PeerEvent::BlockSent(Ok(()))), Millis(1));
            outs.extend(drain(&mut e));
        }
    }
    assert_eq!(sent, vec![0, 0, 0, 0], "chunk 0 whole, nothing of the cancelled chunk 1");
}

/// When a crowd begins, the downloader that was sent the whole map hears
/// `OffersOnly` and from then on is offered chunks like the others (what
/// it had asked for counts as its offer, and is still sent); no chunk is
/// offered twice while some went to no one; once every chunk went out,
/// every downloader offered chunks hears `HaveAll`, and one arriving later
/// is sent the whole map.
#[test]
fn super_seeding_takes_in_the_first_downloader_and_ends_once_every_chunk_went_out() {
    use crate::client::download::PeerConnId;
    use crate::client::peer::PeerMessage;
    let (mut e, digest) = sharing_engine(None);
    let n = digest.chunks.len() as u32;
    let (a, b) = (PeerConnId(16), PeerConnId(17));
    assert_eq!(offered(&accept_downloader(&mut e, &digest, a, 1)).len(), n as usize, "alone: the whole map");
    e.handle_input(ClientInput::Peer(a, PeerEvent::Bytes(&chunk_requests(0))), Millis(1));
    let mut outs = drain(&mut e);
    outs.extend(accept_downloader_outputs(&mut e, &digest, b, 2));
    assert!(peer_messages(&outs, a).contains(&PeerMessage::OffersOnly), "{:?}", peer_messages(&outs, a));
    // Both ask for every chunk offered to them, and are sent it whole.
    let mut given: Vec<u32> = vec![0];
    let mut asked: Vec<(PeerConnId, u32)> = vec![(a, 0)];
    let mut ended = Vec::new();
    for _ in 0..100 {
        for conn in [a, b] {
            for m in peer_messages(&outs, conn) {
                match m {
                    PeerMessage::HaveOne { chunk } => {
                        assert!(!given.contains(&chunk), "chunk {chunk} offered twice: {given:?}");
                        given.push(chunk);
                        asked.push((conn, chunk));
                        e.handle_input(ClientInput::Peer(conn, PeerEvent::Bytes(&chunk_requests(chunk))), Millis(2));
                    }
                    PeerMessage::HaveAll => ended.push(conn),
                    _ => {}
                }
            }
        }
        let sent: Vec<PeerConnId> = outs
            .iter()
            .filter_map(|o| if let ClientOutput::SendBlock { conn, .. } = o { Some(*conn) } else { None })
            .collect();
        outs = drain(&mut e);
        for conn in sent {
            e.handle_input(ClientInput::Peer(conn, PeerEvent::BlockSent(Ok(()))), Millis(2));
            outs.extend(drain(&mut e));
        }
        if outs.is_empty() {
            break;
        }
    }
    given.sort();
    assert_eq!(given, (0..n).collect::<Vec<u32>>(), "every chunk went to one of them once");
    assert!(asked.iter().any(|&(c, _)| c == a) && asked.iter().any(|&(c, k)| c == a && k != 0), "A was offered chunks");
    ended.sort();
    assert_eq!(ended, vec![a, b], "both may ask for any chunk now");
    // A third comes too late for offers: the whole map.
    assert_eq!(offered(&accept_downloader(&mut e, &digest, PeerConnId(18), 3)).len(), n as usize);
}

/// Under the upload limit the upload goes out a chunk at a time, in turns:
/// the connection with a chunk part sent finishes it, then the next in
/// turn is served, not always the first; and of the chunks asked for, one
/// that fewer downloaders hold goes first.
#[test]
fn a_capped_upload_serves_whole_chunks_in_turns_rarest_first() {
    use crate::client::download::PeerConnId;
    use crate::client::peer::PeerMessage;
    let (mut e, digest) = sharing_engine(Some(1_000_000));
    let (a, b, c) = (PeerConnId(16), PeerConnId(17), PeerConnId(18));
    for (i, conn) in [a, b, c].into_iter().enumerate() {
        accept_downloader(&mut e, &digest, conn, i as u8 + 1);
    }
    // Runs the engine's clock until `blocks` went out: (connection, chunk) per block.
    let run = |e: &mut ClientEngine, now: &mut Millis, blocks: usize| {
        let mut order = Vec::new();
        let mut outs = drain(e);
        for _ in 0..1000 {
            let sent: Vec<PeerConnId> = outs
                .iter()
                .filter_map(|o| match o {
                    ClientOutput::SendBlock { conn, offset, .. } => {
                        order.push((*conn, (*offset / crate::chunk::CHUNK_SIZE) as u32));
                        Some(*conn)
                    }
                    _ => None,
                })
                .collect();
            for conn in sent {
                e.handle_input(ClientInput::Peer(conn, PeerEvent::BlockSent(Ok(()))), *now);
            }
            outs = drain(e);
            if order.len() == blocks {
                break;
            }
            if outs.is_empty() {
                let Some(t) = e.poll_timeout() else { break };
                *now = t.max(*now);
                e.handle_input(ClientInput::Timeout, *now);
                outs = drain(e);
            }
        }
        order
    };
    let mut now = Millis(1);
    // At 1 MB/s the upload has two slots: A's chunk 0 and B's chunk 2 are
    // taken on, C's chunk 3 hears `Busy` (none of it goes out) and, once
    // a slot is free, `Ready`.
    e.handle_input(ClientInput::Peer(a, PeerEvent::Bytes(&chunk_requests(0))), now);
    e.handle_input(ClientInput::Peer(b, PeerEvent::Bytes(&chunk_requests(2))), now);
    e.handle_input(ClientInput::Peer(c, PeerEvent::Bytes(&chunk_requests(3))), now);
    let outs = drain(&mut e);
    let told_c = peer_messages(&outs, c);
    assert!(told_c.contains(&PeerMessage::Busy { chunk: 3 }), "{told_c:?}");
    // Blocks already handed out (the bucket's first burst), then the rest.
    let mut order: Vec<(PeerConnId, u32)> = Vec::new();
    for o in outs {
        if let ClientOutput::SendBlock { conn, offset, .. } = o {
            order.push((conn, (offset / crate::chunk::CHUNK_SIZE) as u32));
            e.handle_input(ClientInput::Peer(conn, PeerEvent::BlockSent(Ok(()))), now);
        }
    }
    let runs_of = |order: Vec<(PeerConnId, u32)>| {
        let mut runs: Vec<(PeerConnId, u32, usize)> = Vec::new();
        for (conn, chunk) in order {
            match runs.last_mut() {
                Some((c, k, n)) if *c == conn && *k == chunk => *n += 1,
                _ => runs.push((conn, chunk, 1)),
            }
        }
        runs
    };
    order.extend(run(&mut e, &mut now, 8 - order.len()));
    assert_eq!(runs_of(order), vec![(a, 0, 4), (b, 2, 4)], "whole chunks, in turns, none of the refused one");
    e.handle_input(ClientInput::Peer(c, PeerEvent::Bytes(&chunk_requests(3))), now);
    e.handle_input(ClientInput::Peer(a, PeerEvent::Bytes(&chunk_requests(1))), now);
    let order = run(&mut e, &mut now, 8);
    assert_eq!(runs_of(order), vec![(c, 3, 4), (a, 1, 4)], "asked again after `Ready`: served");

    // B holds chunk 5 (it says so). C asks for 7 and A for 5: both slots
    // are taken, 7 being sent. B asks for 6, which none of them holds: it
    // takes the slot of 5, which waited, and A hears `Busy` for 5.
    let holds = encode(&PeerMessage::HaveOne { chunk: 5 });
    e.handle_input(ClientInput::Peer(b, PeerEvent::Bytes(&holds)), now);
    e.handle_input(ClientInput::Peer(c, PeerEvent::Bytes(&chunk_requests(7))), now);
    e.handle_input(ClientInput::Peer(a, PeerEvent::Bytes(&chunk_requests(5))), now);
    let mut outs = drain(&mut e);
    e.handle_input(ClientInput::Peer(b, PeerEvent::Bytes(&chunk_requests(6))), now);
    outs.extend(drain(&mut e));
    assert!(peer_messages(&outs, a).contains(&PeerMessage::Busy { chunk: 5 }), "{:?}", peer_messages(&outs, a));
    for o in outs {
        if let ClientOutput::SendBlock { conn, .. } = o {
            e.handle_input(ClientInput::Peer(conn, PeerEvent::BlockSent(Ok(()))), now);
        }
    }
    let order = run(&mut e, &mut now, 8);
    assert!(order.iter().all(|&(_, ch)| ch != 5), "{order:?}");
    assert!(order.iter().any(|&(conn, ch)| (conn, ch) == (b, 6)), "{order:?}");
}

/// Under the upload limit a seeder promises only what it sends in
/// OFFER_AHEAD over all its downloaders, not two chunks to each: the
/// budget goes to those with the fewest offers open, and an offer settled
/// frees it for the downloader that waits.
#[test]
fn a_capped_seeder_keeps_few_offers_open_and_passes_them_round() {
    use crate::client::download::PeerConnId;
    use crate::client::serve::OFFER_AHEAD;
    let rate = 4_000_000;
    let budget = (rate * OFFER_AHEAD.0 / 1000 / crate::chunk::CHUNK_SIZE) as usize;
    assert_eq!(budget, 3, "the test assumes three");
    let (mut e, digest) = sharing_engine(Some(rate));
    let conns: Vec<PeerConnId> = (16..21).map(PeerConnId).collect();
    let mut offers: Vec<Vec<u32>> = Vec::new();
    let mut later_to_first = Vec::new();
    for (i, &c) in conns.iter().enumerate() {
        let outs = accept_downloader_outputs(&mut e, &digest, c, i as u8 + 1);
        offers.push(offered(&peer_messages(&outs, c)));
        if i > 0 {
            later_to_first.extend(offered(&peer_messages(&outs, conns[0])));
        }
    }
    // The first saw the whole map, then (OffersOnly) was offered chunks
    // like the others: it and the second got the three offers between
    // them, the last three none yet.
    assert_eq!(offers[0].len(), 8);
    assert_eq!(later_to_first.len(), 2, "{later_to_first:?}");
    let counts: Vec<usize> = offers[1..].iter().map(Vec::len).collect();
    assert_eq!(counts, vec![1, 0, 0, 0]);
    // The first offer goes out whole: its place goes to one that has none.
    let (b, first) = (conns[1], offers[1][0]);
    e.handle_input(ClientInput::Peer(b, PeerEvent::Bytes(&chunk_requests(first))), Millis(1));
    // Its four blocks, as the rate allows.
    let (mut all, mut now, mut sent) = (Vec::new(), Millis(1), 0);
    let mut outs = drain(&mut e);
    while sent < 4 {
        let blocks = outs.iter().filter(|o| matches!(o, ClientOutput::SendBlock { conn, .. } if *conn == b)).count();
        all.append(&mut outs);
        for _ in 0..blocks {
            e.handle_input(ClientInput::Peer(b, PeerEvent::BlockSent(Ok(()))), now);
            sent += 1;
        }
        outs = drain(&mut e);
        if outs.is_empty() && sent < 4 {
            now = e.poll_timeout().expect("the rest of the chunk is due").max(now);
            e.handle_input(ClientInput::Timeout, now);
            outs = drain(&mut e);
        }
    }
    all.append(&mut outs);
    let got: Vec<usize> = conns[1..].iter().map(|&c| offered(&peer_messages(&all, c)).len()).collect();
    assert_eq!(got, vec![0, 1, 0, 0], "the freed offer goes to the first that had none");
}

/// The first downloader, sent the whole map, asks for several chunks
/// before it hears `OffersOnly` (the second came meanwhile): one is sent,
/// the others are answered `Busy` and nothing of them goes out, so the
/// first chunks go to as many downloaders as can trade them.
#[test]
fn the_first_downloader_gets_one_chunk_it_asked_for_before_offers_only() {
    use crate::client::download::PeerConnId;
    use crate::client::peer::PeerMessage;
    let (mut e, digest) = sharing_engine_of(None, 16 * crate::chunk::CHUNK_SIZE);
    let (a, b) = (PeerConnId(16), PeerConnId(17));
    assert_eq!(offered(&accept_downloader(&mut e, &digest, a, 1)).len(), 16, "alone: the whole map");
    let outs = accept_downloader_outputs(&mut e, &digest, b, 2);
    let to_a = peer_messages(&outs, a);
    assert!(to_a.contains(&PeerMessage::OffersOnly), "{to_a:?}");
    let mut promised = offered(&to_a);
    promised.extend(offered(&peer_messages(&outs, b)));
    let fresh: Vec<u32> = (0..16).filter(|c| !promised.contains(c)).take(3).collect();
    // What A asked for from the whole map, arriving now.
    let asks: Vec<u8> = fresh.iter().flat_map(|&c| chunk_requests(c)).collect();
    e.handle_input(ClientInput::Peer(a, PeerEvent::Bytes(&asks)), Millis(1));
    let mut outs = drain(&mut e);
    let (mut chunks_sent, mut told) = (Vec::new(), Vec::new());
    while !outs.is_empty() {
        told.extend(peer_messages(&outs, a));
        let sent: Vec<u64> = outs
            .iter()
            .filter_map(|o| match o {
                ClientOutput::SendBlock { conn, offset, .. } if *conn == a => Some(*offset),
                _ => None,
            })
            .collect();
        for off in sent {
            chunks_sent.push((off / crate::chunk::CHUNK_SIZE) as u32);
            e.handle_input(ClientInput::Peer(a, PeerEvent::BlockSent(Ok(()))), Millis(1));
        }
        outs = drain(&mut e);
    }
    for &k in &fresh[1..] {
        assert!(told.contains(&PeerMessage::Busy { chunk: k }), "{k} not answered Busy: {told:?}");
    }
    assert_eq!(chunks_sent, vec![fresh[0]; 4], "one chunk whole, nothing of the others");
}

/// Of the downloaders with the fewest offers open, the next offer goes to
/// one holding the fewest chunks: a first chunk makes an empty-handed
/// downloader an uploader, while one that holds many would queue it
/// behind what it already serves. Under the upload limit (three offers
/// open at most), the downloader holding five chunks waits while others
/// with fewer are offered.
#[test]
fn a_capped_seeder_offers_first_to_the_downloaders_holding_least() {
    use crate::client::download::PeerConnId;
    use crate::client::peer::{Bitmap, Load, PeerMessage};
    let (mut e, digest) = sharing_engine_of(Some(4_000_000), 32 * crate::chunk::CHUNK_SIZE);
    let conns: Vec<PeerConnId> = (16..20).map(PeerConnId).collect();
    let mut open: Vec<Vec<u32>> = vec![Vec::new(); conns.len()];
    let note = |open: &mut Vec<Vec<u32>>, outs: &[ClientOutput]| {
        for (i, &c) in conns.iter().enumerate() {
            open[i].extend(peer_messages(outs, c).iter().filter_map(|m| match m {
                PeerMessage::HaveOne { chunk } => Some(*chunk),
                _ => None,
            }));
        }
    };
    for (i, &c) in conns.iter().enumerate() {
        let outs = accept_downloader_outputs(&mut e, &digest, c, i as u8 + 1);
        note(&mut open, &outs);
    }
    // C holds five chunks nobody was offered.
    let c = conns[2];
    assert!(open[2].is_empty() && open[3].is_empty(), "the budget went to the first two: {open:?}");
    let mut five = Bitmap::new(32);
    let taken: Vec<u32> = open.concat();
    for k in (0..32).filter(|k| !taken.contains(k)).take(5) {
        five.set(k);
    }
    e.handle_input(
        ClientInput::Peer(c, PeerEvent::Bytes(&encode(&PeerMessage::Have { chunks: five, load: Load::default() }))),
        Millis(1),
    );
    note(&mut open, &drain(&mut e));
    // Offers settle one by one (their downloaders got them elsewhere):
    // each freed place goes to one holding fewer than C.
    for round in 0..3 {
        let Some(i) = (0..conns.len()).find(|&i| !open[i].is_empty() && conns[i] != c) else { break };
        let chunk = open[i].remove(0);
        e.handle_input(
            ClientInput::Peer(conns[i], PeerEvent::Bytes(&encode(&PeerMessage::HaveOne { chunk }))),
            Millis(1),
        );
        let outs = drain(&mut e);
        assert!(offered(&peer_messages(&outs, c)).is_empty(), "round {round}: offered to C, which holds five");
        note(&mut open, &outs);
    }
    assert!(!open[3].is_empty(), "D, empty-handed, was offered a chunk: {open:?}");
}

/// What a property test of super-seeding knows of one downloader.
#[derive(Default)]
struct Seen {
    offered: std::collections::BTreeSet<u32>,
    holds: std::collections::BTreeSet<u32>,
    sent: std::collections::BTreeSet<u32>,
    gone: bool,
    /// It was sent the whole map (no other downloader was served, or every
    /// chunk had gone out), or heard `HaveAll`: no offers.
    full: bool,
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

    /// Whatever downloaders join, report, fetch and leave: none is offered
    /// a chunk twice or one it holds; while a chunk it lacks went to nobody
    /// (offered or sent whole), every offer is such a fresh chunk; under
    /// the upload limit the open offers stay within the budget; only one
    /// sent the whole map hears `OffersOnly`, and `HaveAll` comes only once
    /// every chunk went out, after which that downloader is offered nothing.
    #[test]
    fn super_seeding_offers_fresh_chunks_within_budget(
        chunks in 3u64..40,
        capped in proptest::prelude::any::<bool>(),
        steps in proptest::collection::vec((0u8..4, 0usize..6, 0u32..64), 1..60),
    ) {
        use crate::client::download::PeerConnId;
        use crate::client::peer::PeerMessage;
        use crate::client::serve::{OFFER_AHEAD, OPEN_OFFERS};
        let rate = capped.then_some(8_000_000u64);
        let (mut e, digest) = sharing_engine_of(rate, chunks * crate::chunk::CHUNK_SIZE);
        let n = chunks as u32;
        let mut seen: Vec<Seen> = Vec::new();
        let mut now = Millis(1);
        // Chunks offered to or sent whole to anyone, ever.
        let mut spread = std::collections::BTreeSet::new();
        // Checks the offers in `outs`, in order, and records them.
        let check = |seen: &mut Vec<Seen>, spread: &mut std::collections::BTreeSet<u32>, outs: &[ClientOutput]| {
            for o in outs {
                let ClientOutput::PeerTransmit { conn, bytes } = o else { continue };
                let i = (conn.0 - 16) as usize;
                let chunk = match decode::<PeerMessage>(&bytes[4..]) {
                    Ok(PeerMessage::HaveOne { chunk }) => chunk,
                    Ok(PeerMessage::OffersOnly) => {
                        // Its map no longer stands: offers from now on.
                        proptest::prop_assert!(seen[i].full, "OffersOnly to d{i}, which was offered chunks");
                        seen[i].full = false;
                        seen[i].offered.clear();
                        continue;
                    }
                    Ok(PeerMessage::HaveAll) => {
                        proptest::prop_assert!((0..n).all(|c| spread.contains(&c)), "HaveAll before every chunk went out");
                        seen[i].full = true;
                        continue;
                    }
                    _ => continue,
                };
                let d = &seen[i];
                proptest::prop_assert!(!d.full, "{chunk} offered to d{i}, which may ask for any");
                proptest::prop_assert!(!d.offered.contains(&chunk), "{chunk} offered twice to d{i}");
                proptest::prop_assert!(!d.holds.contains(&chunk), "d{i} holds {chunk}");
                let fresh = (0..n).any(|c| !spread.contains(&c) && !d.holds.contains(&c) && !d.offered.contains(&c));
                proptest::prop_assert!(!fresh || !spread.contains(&chunk), "{chunk} offered again while fresh ones wait");
                seen[i].offered.insert(chunk);
                spread.insert(chunk);
            }
            if let Some(r) = rate {
                let budget = ((r * OFFER_AHEAD.0 / 1000 / crate::chunk::CHUNK_SIZE) as usize).max(OPEN_OFFERS as usize);
                let open: usize = seen
                    .iter()
                    .filter(|d| !d.gone && !d.full)
                    .map(|d| d.offered.iter().filter(|c| !d.holds.contains(c) && !d.sent.contains(c)).count())
                    .sum();
                proptest::prop_assert!(open <= budget, "{open} offers open, budget {budget}");
            }
            Ok(())
        };
        for (kind, who, chunk) in steps {
            let live: Vec<usize> = (0..seen.len()).filter(|&i| !seen[i].gone).collect();
            match kind {
                0 if seen.len() < 6 => {
                    let i = seen.len();
                    seen.push(Seen::default());
                    let conn = PeerConnId(16 + i as u64);
                    let outs = accept_downloader_outputs(&mut e, &digest, conn, i as u8 + 1);
                    for m in peer_messages(&outs, conn) {
                        if let PeerMessage::Have { chunks: map, .. } = m {
                            seen[i].offered.extend(map.iter_set());
                            seen[i].full = map.count() == n;
                        }
                    }
                    check(&mut seen, &mut spread, &outs)?;
                }
                1 if !live.is_empty() => {
                    let i = live[who % live.len()];
                    let c = chunk % n;
                    let conn = PeerConnId(16 + i as u64);
                    e.handle_input(ClientInput::Peer(conn, PeerEvent::Bytes(&encode(&PeerMessage::HaveOne { chunk: c }))), now);
                    seen[i].holds.insert(c);
                    let outs = drain(&mut e);
                    check(&mut seen, &mut spread, &outs)?;
                }
                2 if !live.is_empty() => {
                    // A downloader fetches one chunk it was offered (the
                    // first: any chunk) and it goes out whole.
                    let i = live[who % live.len()];
                    let d = &seen[i];
                    let open: Vec<u32> = d.offered.iter().copied().filter(|c| !d.sent.contains(c) && !d.holds.contains(c)).collect();
                    if open.is_empty() {
                        continue;
                    }
                    let c = open[chunk as usize % open.len()];
                    let conn = PeerConnId(16 + i as u64);
                    e.handle_input(ClientInput::Peer(conn, PeerEvent::Bytes(&chunk_requests(c))), now);
                    let mut blocks = 0;
                    for _ in 0..200 {
                        let outs = drain(&mut e);
                        let mine = outs.iter().filter(|o| matches!(o, ClientOutput::SendBlock { conn: k, .. } if *k == conn)).count();
                        blocks += mine;
                        // Settled as its last block goes out, with what that freed.
                        if blocks * crate::client::peer::BLOCK_SIZE as usize >= crate::chunk::CHUNK_SIZE as usize {
                            seen[i].sent.insert(c);
                            spread.insert(c);
                        }
                        check(&mut seen, &mut spread, &outs)?;
                        for _ in 0..mine {
                            e.handle_input(ClientInput::Peer(conn, PeerEvent::BlockSent(Ok(()))), now);
                        }
                        if blocks * crate::client::peer::BLOCK_SIZE as usize >= crate::chunk::CHUNK_SIZE as usize {
                            break;
                        }
                        if mine == 0 {
                            now = e.poll_timeout().unwrap_or(now).max(now);
                            e.handle_input(ClientInput::Timeout, now);
                        }
                    }
                    seen[i].sent.insert(c);
                    spread.insert(c);
                    check(&mut seen, &mut spread, &drain(&mut e))?;
                }
                3 if !live.is_empty() => {
                    let i = live[who % live.len()];
                    seen[i].gone = true;
                    e.handle_input(ClientInput::Peer(PeerConnId(16 + i as u64), PeerEvent::Closed), now);
                    let outs = drain(&mut e);
                    check(&mut seen, &mut spread, &outs)?;
                }
                _ => {}
            }
        }
    }
}

/// `list_groups` pages through the tracker's groups (at most
/// [`crate::proto::GROUPS_PAGE`] an answer, so a cluster of any size stays
/// under the reply limit) and prints them as one list, in order, each once.
#[test]
fn list_groups_pages_through_every_group() {
    use crate::proto::{GroupSummary, GROUPS_PAGE};
    let all: Vec<GroupSummary> = (0..2 * GROUPS_PAGE + 7)
        .map(|i| GroupSummary {
            group: crate::ids::GroupId::new(format!("g{i:06}")).unwrap(),
            owner: UserId::new("me").unwrap(),
            members: 1,
        })
        .collect();
    let pages = std::cell::Cell::new(0);
    let tracker = |req: &Request| match req {
        Request::ListGroupsPage { after } => {
            pages.set(pages.get() + 1);
            let from = after.as_ref().map_or(0, |a| all.iter().position(|g| g.group == *a).unwrap() + 1);
            let page: Vec<GroupSummary> = all[from..].iter().take(GROUPS_PAGE).cloned().collect();
            Ok(Reply::GroupsPage { more: from + page.len() < all.len(), groups: page })
        }
        _ => Ok(Reply::Session { token: crate::ids::SessionToken([1; 16]) }),
    };
    let mut e = engine();
    log_in(&mut e, tracker);
    e.handle_input(ClientInput::User { ticket: Ticket(2), cmd: ShellCommand::ListGroups }, Millis(0));
    let mut lines = None;
    for _ in 0..10 {
        let outs = drain(&mut e);
        for o in answer_all(&mut e, outs, tracker) {
            if let ClientOutput::Done { ticket: Ticket(2), result } = o {
                lines = Some(result.expect("listed"));
            }
        }
        if lines.is_some() {
            break;
        }
    }
    let lines = lines.expect("list_groups finished");
    assert_eq!(pages.get(), 3, "three pages asked");
    assert_eq!(lines.len(), all.len(), "one line a group");
    for (line, g) in lines.iter().zip(&all) {
        assert!(line.starts_with(g.group.as_str()), "{line} for {}", g.group);
    }
}
