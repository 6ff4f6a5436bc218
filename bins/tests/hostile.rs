//! Hostile input against the real binaries: floods, half-open connections,
//! guessed tokens, path tricks. Each gets a clear refusal, and the target
//! keeps serving everyone else with bounded memory.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use shoal_core::client::peer::PeerMessage;
use shoal_core::ids::SessionToken;
use shoal_core::proto::{ApiError, Message, Request, RequestId, Role, PROTOCOL_VERSION};
use shoal_core::rng::Rng;
use shoal_core::wire::{encode, FrameDecoder};
use support::*;

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines().find(|l| l.starts_with("VmRSS:")).unwrap().split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Reads until the peer hangs up (true) or `limit` passes (false).
fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
    s.set_read_timeout(Some(limit)).unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(_) => return start.elapsed() < limit,
        }
    }
}

/// The first message `refused` picks out (reads time out as `s` is set to).
fn first_refusal<T: serde::de::DeserializeOwned>(
    s: &mut impl Read,
    mut refused: impl FnMut(T) -> Option<String>,
) -> Option<String> {
    let mut dec = FrameDecoder::new(1 << 20);
    let mut buf = [0u8; 4096];
    loop {
        while let Ok(Some(m)) = dec.next_message::<T>() {
            if let Some(r) = refused(m) {
                return Some(r);
            }
        }
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return None,
            Ok(n) => dec.push(&buf[..n]),
        }
    }
}

#[test]
fn floods_and_half_open_connections_are_shed_while_others_are_served() {
    let dir = TempDir::new("flood");
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let info = tracker_info(dir.path(), &[addr]);
    let mut tracker = Tracker::start(&info, 1);
    let peer_listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut sharer = Client::start_with("sharer", &info, &peer_listen.to_string(), &[]);
    sharer.expect("create_user sam pw", &["user sam created"]);
    sharer.expect("login sam pw", &["logged in as sam"]);

    // 300 connections to the tracker that never say Hello, some of them
    // holding most of a pre-Hello frame; 70 to the sharer's peer port.
    let mut flood = Vec::new();
    for i in 0..300 {
        let mut s = TcpStream::connect(addr).unwrap();
        if i % 2 == 0 {
            s.write_all(&1000u32.to_be_bytes()).unwrap();
            s.write_all(&[7u8; 999]).unwrap();
        }
        flood.push(s);
    }
    // One never starts TLS; the others finish their TLS handshake and say nothing.
    let mut peer_raw = TcpStream::connect(peer_listen).unwrap();
    let flooder = shoal_net_mio::tls::Identity::ephemeral().unwrap();
    let mut peer_flood: Vec<TlsStream> = (0..69).map(|_| tls_connect_as(peer_listen, &flooder).0).collect();

    // Everyone else is still served, at once.
    let mut c = Client::start("other", &info);
    c.expect("create_user olga pw", &["user olga created"]);
    c.expect("login olga pw", &["logged in as olga"]);
    c.expect("list_groups", &["no groups"]);

    // The peer refuses connections over its limit with a reason (inside TLS).
    let refusals = peer_flood
        .iter_mut()
        .skip(shoal_core::client::MAX_UPLOAD_CONNECTIONS - 1)
        .filter_map(|s| {
            first_refusal(s, |m: PeerMessage| if let PeerMessage::Refused { reason } = m { Some(reason) } else { None })
        })
        .collect::<Vec<_>>();
    assert_eq!(refusals.len(), 70 - shoal_core::client::MAX_UPLOAD_CONNECTIONS);
    assert!(refusals.iter().all(|r| r == "too many connections, try later"), "{refusals:?}");

    // Half-open connections are closed once the handshake deadline passes.
    let limit = Duration::from_secs(20);
    assert!(closed_within(&mut flood[0], limit), "a tracker connection without Hello stays open");
    assert!(closed_within(&mut flood[1], limit));
    assert!(closed_within(&mut peer_raw, limit), "a peer connection without a TLS handshake stays open");
    assert!(closed_within(peer_flood[0].get_mut(), limit), "a peer connection without a handshake stays open");
    let rss = rss_kib(tracker.child.id());
    assert!(rss < 64 * 1024, "tracker RSS {rss} KiB after the flood");
    assert!(tracker.is_running());
    c.expect("list_my_groups", &["you belong to no group"]);
}

#[test]
fn guessed_session_tokens_get_nothing() {
    let dir = TempDir::new("tokens");
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let info = tracker_info(dir.path(), &[addr]);
    let _tracker = Tracker::start(&info, 1);
    let mut c = Client::start("victim", &info);
    c.expect("create_user vic pw", &["user vic created"]);
    c.expect("login vic pw", &["logged in as vic"]);
    c.expect("create_group secret", &["group secret created"]);

    let mut s = tls_connect(addr);
    s.write_all(&encode(&Message::Hello { protocol_version: PROTOCOL_VERSION, role: Role::Client })).unwrap();
    let mut rng = Rng::from_u64(42);
    let n = 200;
    for seq in 0..n {
        let mut t = [0u8; 16];
        rng.fill(&mut t);
        let body = Request::ListRequests { group: shoal_core::ids::GroupId::new("secret").unwrap() };
        s.write_all(&encode(&Message::Request {
            settled_below: 0,
            id: RequestId { client: 1, seq },
            session: Some(SessionToken(t)),
            body,
        }))
        .unwrap();
    }
    let mut answers = 0;
    let got = first_refusal(&mut s, |m: Message| match m {
        Message::Response { result: Err(ApiError::NotLoggedIn), .. } => {
            answers += 1;
            (answers == n).then(|| "all refused".to_string())
        }
        Message::Response { result, .. } => Some(format!("a guessed token got {result:?}")),
        _ => None,
    });
    assert_eq!(got.as_deref(), Some("all refused"));
    c.expect("list_requests secret", &["no pending requests for secret"]);
}

#[test]
fn a_download_never_writes_through_a_symlink_or_over_a_file() {
    let dir = TempDir::new("paths");
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let info = tracker_info(dir.path(), &[addr]);
    let _tracker = Tracker::start(&info, 1);
    let src = dir.path().join("src/f.bin");
    std::fs::create_dir_all(src.parent().unwrap()).unwrap();
    std::fs::write(&src, b"payload").unwrap();
    let mut a = Client::start("a", &info);
    a.expect("create_user ann pw", &["user ann created"]);
    a.expect("login ann pw", &["logged in as ann"]);
    a.expect("create_group g", &["group g created"]);
    a.expect(&format!("upload_file {} g", src.display()), &["shared f.bin in g*"]);
    let mut b = Client::start("b", &info);
    b.expect("create_user bob pw", &["user bob created"]);
    b.expect("login bob pw", &["logged in as bob"]);
    b.expect("join_group g", &["join request sent to g"]);
    a.expect("accept_request g bob", &["bob is now a member of g"]);

    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let victim = dir.path().join("victim.txt");
    std::fs::write(&victim, b"do not touch").unwrap();
    std::os::unix::fs::symlink(&victim, out.join("f.bin.part")).unwrap();
    let link = format!("error: {} is a symbolic link; not writing through it", out.join("f.bin.part").display());
    b.expect(&format!("download_file g f.bin {}", out.display()), &[&link]);
    std::fs::remove_file(out.join("f.bin.part")).unwrap();
    std::fs::write(out.join("f.bin"), b"mine").unwrap();
    let exists = format!("error: {} already exists", out.join("f.bin").display());
    b.expect(&format!("download_file g f.bin {}", out.display()), &[&exists]);
    b.expect(&format!("download_file g f.bin {}/nodir/", out.display()), &["error: no such directory*"]);
    b.expect("download_file g ../f.bin /tmp", &["error: bad file name*"]);
    assert_eq!(std::fs::read(&victim).unwrap(), b"do not touch");
    assert_eq!(std::fs::read(out.join("f.bin")).unwrap(), b"mine");
}

/// Sends `body` as request `seq` on `s` and returns the tracker's answer.
fn ask(s: &mut TlsStream, seq: u64, body: Request) -> Result<shoal_core::proto::Reply, ApiError> {
    let req = Message::Request { settled_below: 0, id: RequestId { client: 99, seq }, session: None, body };
    s.write_all(&encode(&req)).unwrap();
    let mut answer = None;
    first_refusal(s, |m: Message| match m {
        Message::Response { result, .. } => {
            answer = Some(result);
            Some(String::new())
        }
        _ => None,
    });
    answer.expect("the tracker answered")
}

#[test]
fn a_login_claiming_another_clients_address_leaves_its_session_and_files() {
    let dir = TempDir::new("claim");
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let info = tracker_info(dir.path(), &[addr]);
    let _tracker = Tracker::start(&info, 1);
    let victim_at: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut v = Client::start_with("victim", &info, &victim_at.to_string(), &[]);
    let file = dir.path().join("f.bin");
    std::fs::write(&file, vec![3u8; 700_000]).unwrap();
    v.expect("create_user vic pw", &["user vic created"]);
    v.expect("login vic pw", &["logged in as vic"]);
    v.expect("create_group g", &["group g created"]);
    v.expect(&format!("upload_file {} g", file.display()), &["shared f.bin in g*"]);
    v.expect("list_files g", &["f.bin 700000 bytes 1 peer"]);

    // Eve, with an account of her own, logs in claiming the victim's
    // address: from the victim's host (this one), and naming another IP.
    let mut s = tls_connect(addr);
    s.write_all(&encode(&Message::Hello { protocol_version: PROTOCOL_VERSION, role: Role::Client })).unwrap();
    let eve = shoal_core::ids::UserId::new("eve").unwrap();
    let create = Request::CreateUser { user: eve.clone(), password: "pw".into() };
    assert!(ask(&mut s, 1, create).is_ok());
    let login = |listen: SocketAddr| Request::Login {
        user: eve.clone(),
        password: "pw".into(),
        listen,
        plaintext_peers: false,
    };
    assert_eq!(ask(&mut s, 2, login(victim_at)), Err(ApiError::AddressInUse));
    let elsewhere = SocketAddr::new([10, 9, 9, 9].into(), victim_at.port());
    assert_eq!(ask(&mut s, 3, login(elsewhere)), Err(ApiError::AddressInUse), "the IP claimed is not believed");

    // The victim's session, and the file it shares, are untouched.
    v.expect("list_files g", &["f.bin 700000 bytes 1 peer"]);
    v.expect("list_my_groups", &["g (owner)"]);
}
