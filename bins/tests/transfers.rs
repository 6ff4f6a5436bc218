//! End to end: real clients moving real files between each other on loopback.

mod support;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use shoal_core::chunk::{Sha1Digest, CHUNK_SIZE};
use shoal_core::client::peer::{Grant, PeerMessage};
use shoal_core::identity::KeyId;
use shoal_core::ids::{FileName, GroupId, UserId};
use shoal_core::proto::{Message, Reply, Request, RequestId, Role, PROTOCOL_VERSION};
use shoal_core::rng::Rng;
use shoal_core::wire::{decode, encode, FrameDecoder};
use shoal_net_mio::tls::Identity;
use support::*;

const MIB: usize = 1 << 20;

struct Swarm {
    dir: TempDir,
    info: PathBuf,
    _tracker: Tracker,
    content: Vec<u8>,
}

impl Swarm {
    fn new(tag: &str, size: usize) -> Swarm {
        let dir = TempDir::new(tag);
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let info = tracker_info(dir.path(), &[addr]);
        let tracker = Tracker::start(&info, 1);
        let mut content = vec![0u8; size];
        Rng::from_u64(size as u64).fill(&mut content);
        Swarm { dir, info, _tracker: tracker, content }
    }

    /// A path in the scratch directory; a trailing `/` names a directory, created.
    fn path(&self, rel: &str) -> PathBuf {
        let p = self.dir.path().join(rel);
        if rel.ends_with('/') {
            std::fs::create_dir_all(&p).unwrap();
        } else {
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        }
        p
    }

    /// A logged-in client listening on a port we know.
    fn client(&self, user: &str, extra: &[&str]) -> (Client, SocketAddr) {
        let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut c = Client::start_with(user, &self.info, &listen.to_string(), extra);
        c.expect(&format!("create_user {user} pw"), &[&format!("user {user} created")]);
        c.expect(&format!("login {user} pw"), &[&format!("logged in as {user}")]);
        (c, listen)
    }

    /// `owner` creates group g; the others join and are accepted.
    fn group(&self, owner: &mut Client, members: &mut [&mut Client]) {
        owner.expect("create_group g", &["group g created"]);
        for m in members.iter_mut() {
            m.expect("join_group g", &["join request sent to g"]);
            let name = m.name.clone();
            owner.expect(&format!("accept_request g {name}"), &[&format!("{name} is now a member of g")]);
        }
    }

    /// Writes the content at `rel` and shares it from `c`.
    fn share(&self, c: &mut Client, rel: &str) -> PathBuf {
        let p = self.path(rel);
        std::fs::write(&p, &self.content).unwrap();
        c.expect(&format!("upload_file {} g", p.display()), &["shared big.bin in g*"]);
        p
    }
}

/// Polls `show_downloads` until `done` says so; bounded in time.
fn wait_progress(c: &mut Client, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        c.send_raw(b"show_downloads\n");
        let line = c.lines(1).remove(0);
        if done(&line) {
            return line;
        }
        assert!(Instant::now() < deadline, "no progress: {line}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn percent(line: &str) -> u64 {
    line.split_whitespace().nth(3).and_then(|p| p.strip_suffix('%')).and_then(|p| p.parse().ok()).unwrap_or(0)
}

/// Waits for the download to complete, then reads what `show_downloads -v`
/// says of it: bytes per source, and the peers it banned.
fn completed(c: &mut Client) -> (Vec<(SocketAddr, u64)>, Vec<SocketAddr>) {
    wait_progress(c, |l| l.starts_with("[C]") || l.starts_with("[F]"));
    let lines = c.answers_all("show_downloads -v");
    assert!(lines[0].starts_with("[C]"), "{lines:?}");
    let mut sources = Vec::new();
    let mut banned = Vec::new();
    for l in &lines[1..] {
        if let Some(rest) = l.strip_prefix("  from ") {
            let (a, b) = rest.split_once(": ").unwrap();
            sources.push((a.parse().unwrap(), b.trim_end_matches(" bytes").parse().unwrap()));
        } else if let Some(rest) = l.strip_prefix("  banned ") {
            banned.push(rest.split_once(": ").unwrap().0.parse().unwrap());
        }
    }
    (sources, banned)
}

fn same_file(a: &Path, b: &[u8]) {
    let got = std::fs::read(a).unwrap();
    assert_eq!(got.len(), b.len(), "{} has the wrong size", a.display());
    assert!(got == b, "{} differs from the source", a.display());
}

#[test]
fn three_sharers_serve_one_downloader_bit_identical() {
    let s = Swarm::new("three", 200 * MIB + 12345);
    let (mut a, la) = s.client("ann", &[]);
    let (mut b, lb) = s.client("bob", &[]);
    let (mut c, lc) = s.client("cat", &[]);
    let (mut d, _) = s.client("dan", &[]);
    s.group(&mut a, &mut [&mut b, &mut c, &mut d]);
    s.share(&mut a, "a/big.bin");
    s.share(&mut b, "b/big.bin");
    s.share(&mut c, "c/big.bin");
    d.expect("list_files g", &[&format!("big.bin {} bytes 3 peers", s.content.len())]);
    let out = s.path("d/");
    d.expect(&format!("download_file g big.bin {}", out.display()), &["downloading big.bin into *"]);
    let (sources, _) = completed(&mut d);
    let (status, log) = d.finish_output();
    assert!(status.success(), "downloader failed: {log:?}");
    same_file(&out.join("big.bin"), &s.content);
    let total: u64 = sources.iter().map(|(_, b)| b).sum();
    assert_eq!(total, s.content.len() as u64);
    for l in [la, lb, lc] {
        let share = sources.iter().find(|(a, _)| *a == l).map(|(_, b)| *b).unwrap_or(0);
        assert!(share >= total / 10, "sharer {l} served only {share} of {total} bytes: {sources:?}");
    }
}

#[test]
fn a_sharer_killed_midway_does_not_stop_the_download() {
    let s = Swarm::new("killsharer", 96 * MIB);
    let (mut a, _) = s.client("ann", &["--max-upload-rate", "25"]);
    let (mut b, _) = s.client("bob", &["--max-upload-rate", "25"]);
    let (mut d, _) = s.client("dan", &[]);
    s.group(&mut a, &mut [&mut b, &mut d]);
    s.share(&mut a, "a/big.bin");
    s.share(&mut b, "b/big.bin");
    let out = s.path("d/got.bin");
    d.expect(&format!("download_file g big.bin {}", out.display()), &["downloading big.bin into *"]);
    let line = wait_progress(&mut d, |l| percent(l) >= 20);
    assert!(line.starts_with("[D]"), "the download must still be running when the sharer dies: {line}");
    b.kill();
    let (status, log) = d.finish_output();
    assert!(status.success(), "downloader failed: {log:?}");
    same_file(&out, &s.content);
}

#[test]
fn a_corrupt_sharer_is_banned_and_the_result_is_intact() {
    let s = Swarm::new("corrupt", 24 * MIB);
    let (mut a, _) = s.client("ann", &[]);
    let (mut b, lb) = s.client("bob", &[]);
    let (mut d, _) = s.client("dan", &[]);
    s.group(&mut a, &mut [&mut b, &mut d]);
    s.share(&mut a, "a/big.bin");
    let bad = s.share(&mut b, "b/big.bin");
    // Bob's copy rots on disk after he shared it: every chunk is damaged.
    let mut f = std::fs::OpenOptions::new().write(true).open(&bad).unwrap();
    for c in 0..s.content.len().div_ceil(CHUNK_SIZE as usize) {
        use std::os::unix::fs::FileExt;
        f.write_all_at(&[!s.content[c * CHUNK_SIZE as usize]], c as u64 * CHUNK_SIZE).unwrap();
    }
    f.flush().unwrap();
    let out = s.path("d/");
    d.expect(&format!("download_file g big.bin {}", out.display()), &["downloading big.bin into *"]);
    let (sources, banned) = completed(&mut d);
    let (status, log) = d.finish_output();
    assert!(status.success(), "downloader failed: {log:?}");
    same_file(&out.join("big.bin"), &s.content);
    assert_eq!(banned, vec![lb], "the corrupt peer is banned, and only it");
    let from_bob = sources.iter().find(|(a, _)| *a == lb).map(|(_, b)| *b).unwrap_or(0);
    assert_eq!(from_bob, 0, "no byte of a corrupt peer is kept");
}

#[test]
fn a_killed_downloader_resumes_without_refetching() {
    let s = Swarm::new("resume", 64 * MIB);
    let (mut a, _) = s.client("ann", &["--max-upload-rate", "20"]);
    let (mut d, _) = s.client("dan", &[]);
    s.group(&mut a, &mut [&mut d]);
    s.share(&mut a, "a/big.bin");
    let out = s.path("d/big.bin");
    let state = s.path("d/big.bin.part.state");
    d.expect(&format!("download_file g big.bin {}", out.display()), &["downloading big.bin into *"]);
    // The state file exists from the start; wait until progress is in it.
    wait_progress(&mut d, |l| percent(l) >= 30 && state.metadata().is_ok_and(|m| m.len() > 0));
    d.kill();
    assert!(!out.exists(), "no final file before the whole-file check");
    assert!(s.path("d/big.bin.part").exists());

    let mut d2 = Client::start_with("dan2", &s.info, "127.0.0.1:0", &[]);
    d2.expect("login dan pw", &["logged in as dan"]);
    d2.send_raw(format!("download_file g big.bin {}\n", out.display()).as_bytes());
    let first = d2.lines(1).remove(0);
    assert!(first.starts_with("resuming big.bin into "), "{first}");
    let resumed: u64 = first.split(": ").nth(1).unwrap().split_whitespace().next().unwrap().parse().unwrap();
    assert!(resumed > 0, "{first}");
    let (sources, _) = completed(&mut d2);
    let (status, log) = d2.finish_output();
    assert!(status.success(), "resumed download failed: {log:?}");
    same_file(&out, &s.content);
    let fetched: u64 = sources.iter().map(|(_, b)| b).sum();
    let size = s.content.len() as u64;
    assert!(fetched <= size - (resumed - 1) * CHUNK_SIZE, "re-fetched verified chunks: {fetched} of {size}");
    assert!(!state.exists(), "the sidecar is removed once the file is complete");
}

/// One request to a tracker over the real protocol, from a client holding
/// key `me` (a session is good only on connections proving its key).
fn tracker_call(
    addr: SocketAddr,
    me: &Identity,
    session: Option<shoal_core::ids::SessionToken>,
    body: Request,
) -> Result<Reply, shoal_core::proto::ApiError> {
    // A request id of its own: a write's result is kept per id, and a second
    // login under the same id would be answered with the first one's session.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let client = 1000 + NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (mut s, _) = tls_connect_as(addr, me);
    s.write_all(&encode(&Message::Hello { protocol_version: PROTOCOL_VERSION, role: Role::Client })).unwrap();
    s.write_all(&encode(&Message::Request { id: RequestId { client, seq: 1 }, settled_below: 0, session, body }))
        .unwrap();
    read_frames(&mut s, |m: Message| match m {
        Message::Response { result, .. } => Some(result),
        _ => None,
    })
}

/// Reads frames until `f` picks one (reads time out as `s` is set to).
fn read_frames<T: serde::de::DeserializeOwned, R>(s: &mut impl Read, mut f: impl FnMut(T) -> Option<R>) -> R {
    let mut dec = FrameDecoder::new(1 << 24);
    let mut buf = [0u8; 4096];
    loop {
        while let Some(m) = dec.next_message::<T>().unwrap() {
            if let Some(r) = f(m) {
                return r;
            }
        }
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "connection closed before the answer");
        dec.push(&buf[..n]);
    }
}

/// Opens a peer connection to `addr` with key `me` and asks for g/big.bin
/// with `grant`: the key the peer proved, and the first answer that is not
/// its `Hello` (`Have`, or a refusal).
fn want_big(addr: SocketAddr, me: &Identity, sha1: Sha1Digest, grant: Grant) -> (KeyId, PeerMessage, TlsStream) {
    let (mut p, key) = tls_connect_as(addr, me);
    p.write_all(&encode(&PeerMessage::Hello { protocol_version: PROTOCOL_VERSION, role: Role::Peer })).unwrap();
    let want =
        PeerMessage::Want { group: GroupId::new("g").unwrap(), name: FileName::new("big.bin").unwrap(), sha1, grant };
    p.write_all(&encode(&want)).unwrap();
    let answer = read_frames(&mut p, |m: PeerMessage| (!matches!(m, PeerMessage::Hello { .. })).then_some(m));
    (key, answer, p)
}

/// Asserts `answer` is a refusal starting `prefix`, and that the peer then hangs up.
fn refused(answer: PeerMessage, mut p: TlsStream, prefix: &str) {
    let PeerMessage::Refused { reason } = answer else { panic!("got {answer:?}, not a refusal") };
    assert!(reason.starts_with(prefix), "{reason}");
    let mut rest = Vec::new();
    let _ = p.read_to_end(&mut rest);
    assert!(decode::<PeerMessage>(&rest).is_err() || rest.is_empty());
}

fn login(user: &str, listen: &str) -> Request {
    Request::Login {
        user: UserId::new(user).unwrap(),
        password: "pw".into(),
        listen: listen.parse().unwrap(),
        plaintext_peers: false,
    }
}

#[test]
fn a_non_member_cannot_get_chunks_from_a_peer() {
    let s = Swarm::new("access", 2 * MIB);
    let (mut a, la) = s.client("ann", &[]);
    let (mut x, _) = s.client("xav", &[]);
    let (mut d, _) = s.client("dan", &[]);
    s.group(&mut a, &mut [&mut d]);
    s.share(&mut a, "a/big.bin");
    // xav owns another group with a file, so he can get a real grant, for that one.
    x.expect("create_group h", &["group h created"]);
    let other = s.path("x/other.bin");
    std::fs::write(&other, b"other content").unwrap();
    x.expect(&format!("upload_file {} h", other.display()), &["shared other.bin in h*"]);
    let tracker: SocketAddr = std::fs::read_to_string(&s.info).unwrap().trim().replace(' ', ":").parse().unwrap();
    let xav = Identity::ephemeral().unwrap();
    let Ok(Reply::Session { token }) = tracker_call(tracker, &xav, None, login("xav", "127.0.0.1:1")) else {
        panic!("login failed")
    };
    let big = || Request::DownloadFile { group: GroupId::new("g").unwrap(), name: FileName::new("big.bin").unwrap() };
    let denied = tracker_call(tracker, &xav, Some(token), big());
    assert_eq!(denied, Err(shoal_core::proto::ApiError::NotMember), "the tracker gives a non-member no grant");
    let Ok(Reply::Download { grant: h_grant, .. }) = tracker_call(
        tracker,
        &xav,
        Some(token),
        Request::DownloadFile { group: GroupId::new("h").unwrap(), name: FileName::new("other.bin").unwrap() },
    ) else {
        panic!("no grant for his own group")
    };
    // A member's grant, as an eavesdropper on dan's connections would copy
    // it (dan's session, from another address, with a key of its own).
    let dan = Identity::ephemeral().unwrap();
    let Ok(Reply::Session { token: dan_token }) = tracker_call(tracker, &dan, None, login("dan", "127.0.0.1:2")) else {
        panic!("dan's login failed")
    };
    let got = tracker_call(tracker, &dan, Some(dan_token), big());
    let Ok(Reply::Download { grant: dan_grant, sharers, .. }) = got else { panic!("no grant for a member: {got:?}") };
    let ann_key = sharers.iter().find(|x| x.addr == la).and_then(|x| x.key).expect("ann named, with her key");

    let sha1 = Sha1Digest::of(&s.content);
    for grant in [h_grant, Grant([7; 16]), dan_grant] {
        let (key, answer, p) = want_big(la, &xav, sha1, grant);
        assert_eq!(key, ann_key, "the peer at ann's address proves the key the tracker named");
        refused(answer, p, "access denied");
    }
    // The grant is good from the key it was issued to: the test above could fail.
    let (_, answer, _p) = want_big(la, &dan, sha1, dan_grant);
    assert!(matches!(answer, PeerMessage::Have { .. }), "dan's own grant: {answer:?}");
    // The sharer still serves members.
    let out = s.path("d/");
    d.expect(&format!("download_file g big.bin {}", out.display()), &["downloading big.bin into *"]);
    let (status, _) = d.finish_output();
    assert!(status.success());
    same_file(&out.join("big.bin"), &s.content);
}

/// Someone else answers at the address of the sharer the tracker named
/// (the sharer is gone, its lease not yet run out): the downloader sees
/// another key, sends nothing (no request, no grant), and says why.
#[test]
fn a_downloader_sends_nothing_to_a_peer_that_is_not_the_named_sharer() {
    let s = Swarm::new("impostor", 2 * MIB);
    let (mut a, la) = s.client("ann", &[]);
    let (mut d, _) = s.client("dan", &[]);
    s.group(&mut a, &mut [&mut d]);
    s.share(&mut a, "a/big.bin");
    let _ = a.child.kill();
    let _ = a.child.wait();
    // The impostor takes ann's port and proves its own key.
    let listener = std::net::TcpListener::bind(la).expect("ann's port is free again");
    let me = Identity::ephemeral().unwrap();
    let server = me.server_config().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for s in listener.incoming().take(2) {
            let Ok(sock) = s else { continue };
            sock.set_read_timeout(Some(WAIT)).unwrap();
            let conn = rustls::ServerConnection::new(server.clone()).unwrap();
            let mut tls = rustls::StreamOwned::new(conn, sock);
            // Everything the downloader says after the handshake.
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            let handshake = loop {
                if !tls.conn.is_handshaking() {
                    break true;
                }
                if tls.conn.complete_io(&mut tls.sock).is_err() {
                    break false;
                }
            };
            if handshake {
                while let Ok(n @ 1..) = tls.read(&mut buf) {
                    got.extend_from_slice(&buf[..n]);
                }
            }
            let _ = tx.send((handshake, got));
        }
    });
    let out = s.path("d/");
    d.expect(&format!("download_file g big.bin {}", out.display()), &["downloading big.bin into *"]);
    let (handshake, got) = rx.recv_timeout(WAIT).expect("the downloader dialled ann's address");
    assert!(handshake, "the downloader completed the TLS handshake (it learns the key that way)");
    assert!(got.is_empty(), "the downloader sent {} bytes to an impostor", got.len());
    let lines = d.answers_all("show_downloads -v");
    assert!(
        lines.iter().any(|l| l.starts_with(&format!("  refused {la}: not the sharer the tracker named"))),
        "{lines:?}"
    );
    assert!(!lines[0].starts_with("[C]"), "{lines:?}");
}

/// A downloader serves the chunks it verified before it finishes: a second
/// downloader that starts later fetches from it as well as from the sharer.
#[test]
fn a_downloader_reshares_verified_chunks_at_once() {
    let s = Swarm::new("reshare", 48 * MIB);
    let (mut a, _) = s.client("ann", &["--max-upload-rate", "15"]);
    let (mut b, lb) = s.client("bob", &[]);
    let (mut c, _) = s.client("cat", &[]);
    s.group(&mut a, &mut [&mut b, &mut c]);
    s.share(&mut a, "a/big.bin");
    let out_b = s.path("b/");
    b.expect(&format!("download_file g big.bin {}", out_b.display()), &["downloading big.bin into *"]);
    let at = wait_progress(&mut b, |l| percent(l) >= 30);
    assert!(at.starts_with("[D]"), "{at}");
    let out_c = s.path("c/");
    c.expect(&format!("download_file g big.bin {}", out_c.display()), &["downloading big.bin into *"]);
    let (sources, _) = completed(&mut c);
    let (status, log) = c.finish_output();
    assert!(status.success(), "second downloader failed: {log:?}");
    same_file(&out_c.join("big.bin"), &s.content);
    let from_bob = sources.iter().find(|(x, _)| *x == lb).map(|(_, n)| *n).unwrap_or(0);
    assert!(from_bob > 0, "cat fetched nothing from bob, who was still downloading: {sources:?}");
    let total: u64 = sources.iter().map(|(_, n)| n).sum();
    assert_eq!(total, s.content.len() as u64, "bytes per source add up to the file: {sources:?}");
    let (status, _) = b.finish_output();
    assert!(status.success());
    same_file(&out_b.join("big.bin"), &s.content);
}

/// After stop_share a peer refuses the file; after logout it refuses everyone.
#[test]
fn stop_share_and_logout_stop_serving() {
    let s = Swarm::new("stopserve", MIB);
    let (mut a, la) = s.client("ann", &[]);
    s.group(&mut a, &mut []);
    s.share(&mut a, "a/big.bin");
    let me = Identity::ephemeral().unwrap();
    let want = |la: SocketAddr| match want_big(la, &me, Sha1Digest::of(&s.content), Grant([1; 16])).1 {
        PeerMessage::Refused { reason } => reason,
        other => panic!("unexpected {other:?}"),
    };
    assert!(want(la).starts_with("access denied"), "a forged grant is refused while sharing");
    a.expect("stop_share g big.bin", &["stopped sharing big.bin in g"]);
    assert_eq!(want(la), "this peer does not share that file");
    a.expect("logout", &["logged out"]);
    // Logged out, it refuses as soon as the TLS handshake is done (before
    // any peer handshake).
    let (mut p, _) = tls_connect_as(la, &me);
    let reason = read_frames(&mut p, |m: PeerMessage| match m {
        PeerMessage::Refused { reason } => Some(reason),
        other => panic!("unexpected {other:?}"),
    });
    assert_eq!(reason, "this peer is not logged in");
}

/// A downloader may queue at most MAX_QUEUED_REQUESTS block requests at a peer.
#[test]
fn a_peer_refuses_a_flood_of_block_requests() {
    let s = Swarm::new("reqflood", 4 * MIB);
    let (mut a, la) = s.client("ann", &[]);
    let (mut d, _) = s.client("dan", &[]);
    s.group(&mut a, &mut [&mut d]);
    s.share(&mut a, "a/big.bin");
    let tracker: SocketAddr = std::fs::read_to_string(&s.info).unwrap().trim().replace(' ', ":").parse().unwrap();
    let dan = Identity::ephemeral().unwrap();
    let Ok(Reply::Session { token }) = tracker_call(tracker, &dan, None, login("dan", "127.0.0.1:2")) else {
        panic!("login failed")
    };
    let get = Request::DownloadFile { group: GroupId::new("g").unwrap(), name: FileName::new("big.bin").unwrap() };
    let Ok(Reply::Download { grant, index, .. }) = tracker_call(tracker, &dan, Some(token), get) else {
        panic!("no grant")
    };
    let (_, have, mut p) = want_big(la, &dan, index.sha1, grant);
    assert!(matches!(have, PeerMessage::Have { .. }), "{have:?}");
    // Far more than the queue, so it overflows however the reads split.
    let flood: Vec<u8> = (0..5 * shoal_core::client::peer::MAX_QUEUED_REQUESTS as u32)
        .flat_map(|i| encode(&PeerMessage::Request { chunk: i % 8, offset: 0, len: 65536 }))
        .collect();
    p.write_all(&flood).unwrap();
    let reason = read_frames(&mut p, |m: PeerMessage| match m {
        PeerMessage::Refused { reason } => Some(reason),
        _ => None,
    });
    assert_eq!(reason, "too many requests in flight");
}

/// A client run with `--insecure-plaintext-peers` says so loudly, and never
/// mixes with normal peers: a TLS handshake with it fails, and plaintext
/// sent to a normal peer gets nothing back but TLS's refusal. Two plaintext
/// clients still move a file (the benchmark's baseline).
#[test]
fn plaintext_peers_are_loud_and_do_not_mix_with_tls_peers() {
    let s = Swarm::new("plaintext", 2 * MIB);
    let (mut a, la) = s.client("ann", &[]);
    let plain = |user: &str| {
        let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut c = Client::start_with(user, &s.info, &listen.to_string(), &["--insecure-plaintext-peers"]);
        let warnings = c.lines(2);
        assert!(warnings[0].starts_with("warning: --insecure-plaintext-peers"), "{warnings:?}");
        assert!(warnings[1].contains("PLAINTEXT"), "{warnings:?}");
        c.expect(&format!("create_user {user} pw"), &[&format!("user {user} created")]);
        c.expect(&format!("login {user} pw"), &[&format!("logged in as {user}")]);
        (c, listen)
    };
    let (mut p, lp) = plain("pat");
    let (mut q, _) = plain("quin");
    s.group(&mut a, &mut [&mut p, &mut q]);
    s.share(&mut a, "a/big.bin");
    s.share(&mut p, "p/big.bin");

    let me = Identity::ephemeral().unwrap();
    assert!(
        shoal_net_mio::tls::connect_blocking(lp, &me, WAIT).is_err(),
        "a TLS handshake with a plaintext peer succeeded"
    );
    let mut raw = std::net::TcpStream::connect(la).unwrap();
    raw.set_read_timeout(Some(WAIT)).unwrap();
    raw.write_all(&encode(&PeerMessage::Hello { protocol_version: PROTOCOL_VERSION, role: Role::Peer })).unwrap();
    let mut back = Vec::new();
    let _ = raw.read_to_end(&mut back);
    let mut dec = FrameDecoder::new(shoal_core::client::peer::MAX_PEER_FRAME);
    dec.push(&back);
    assert!(!matches!(dec.next_message::<PeerMessage>(), Ok(Some(_))), "a TLS peer answered plaintext: {back:?}");

    let out = s.path("q/");
    q.expect(&format!("download_file g big.bin {}", out.display()), &["downloading big.bin into *"]);
    let (sources, _) = completed(&mut q);
    let served: Vec<SocketAddr> = sources.iter().filter(|(_, n)| *n > 0).map(|(a, _)| *a).collect();
    assert_eq!(served, vec![lp], "only the plaintext sharer served (ann shares over TLS)");
    same_file(&out.join("big.bin"), &s.content);
}
