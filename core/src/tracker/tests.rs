use super::*;
use crate::chunk::Sha1Digest;
use crate::ids::{GroupId, UserId};
use crate::wire::decode;

fn node() -> TrackerNode {
    let cfg = TrackerConfig { password_params: PasswordParams::INSECURE_FAST, ..TrackerConfig::default() };
    TrackerNode::new(cfg, Rng::from_u64(1), SoloReplicator::default())
}

/// The node's outputs, each sync it asks for done at once (as a disk that
/// syncs instantly would), and each password hashed at once: what waited
/// for them follows.
fn drain<R: Replicator>(n: &mut TrackerNode<R>) -> Vec<TrackerOutput> {
    let mut all = Vec::new();
    loop {
        let outs: Vec<TrackerOutput> = std::iter::from_fn(|| n.poll_output()).collect();
        if outs.is_empty() {
            return all;
        }
        for o in outs {
            match o {
                TrackerOutput::Sync { seq } => n.handle_synced(seq, n.now),
                TrackerOutput::Work { ticket, job } if job.is_password() => n.handle_job_done(ticket, job.run(), n.now),
                o => all.push(o),
            }
        }
    }
}

fn hello() -> Vec<u8> {
    encode(&Message::Hello { protocol_version: PROTOCOL_VERSION, role: Role::Client })
}

fn req(seq: u64, session: Option<SessionToken>, body: Request) -> Vec<u8> {
    encode(&Message::Request { id: RequestId { client: 7, seq }, settled_below: 0, session, body })
}

/// The one response among `outs` (log records aside, which must come first).
fn answer(outs: &[TrackerOutput]) -> Result<Reply, ApiError> {
    let record = |o: &TrackerOutput| matches!(o, TrackerOutput::Persist { .. } | TrackerOutput::StoreRange { .. });
    let persisted = outs.iter().take_while(|o| record(o)).count();
    assert!(outs[persisted..].iter().all(|o| !record(o)), "a record after a send");
    match &outs[persisted..] {
        [TrackerOutput::Transmit { bytes, .. }] => match decode(&bytes[4..]).unwrap() {
            Message::Response { result, .. } => result,
            m => panic!("unexpected {m:?}"),
        },
        o => panic!("expected one response, got {o:?}"),
    }
}

/// Opens `conn` from `remote`, its TLS handshake done: the client behind
/// it proved a key of its own (one per connection number).
fn connect<R: Replicator>(n: &mut TrackerNode<R>, conn: ConnId, remote: SocketAddr, at: Millis) {
    n.handle_connected(conn, remote, at);
    n.handle_secured(conn, client_key(conn), at);
}

fn client_key(conn: ConnId) -> KeyId {
    let mut k = [0xc1; 32];
    k[..8].copy_from_slice(&conn.0.to_be_bytes());
    KeyId(k)
}

const C: ConnId = ConnId(1);
const REMOTE: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 1, 2, 3)), 5000);

#[test]
fn requests_before_hello_are_refused_and_the_connection_closed() {
    let mut n = node();
    connect(&mut n, C, REMOTE, Millis(0));
    n.handle_bytes(C, &req(1, None, Request::ListGroups), Millis(0));
    let out = drain(&mut n);
    assert!(matches!(out.last(), Some(TrackerOutput::Close { conn: C })));
    assert_eq!(n.connections(), 0);
}

#[test]
fn garbage_and_huge_frames_close_only_that_connection() {
    let mut n = node();
    connect(&mut n, C, REMOTE, Millis(0));
    connect(&mut n, ConnId(2), REMOTE, Millis(0));
    n.handle_bytes(ConnId(2), &hello(), Millis(0));
    n.handle_bytes(C, &[0xff, 0xff, 0xff, 0xff, 1, 2, 3], Millis(0));
    assert!(matches!(drain(&mut n).last(), Some(TrackerOutput::Close { conn: C })));
    n.handle_bytes(ConnId(2), &req(1, None, Request::ListGroups), Millis(0));
    assert_eq!(answer(&drain(&mut n)), Err(ApiError::NotLoggedIn));
}

#[test]
fn a_session_works_and_its_lease_decides_liveness() {
    let mut n = node();
    connect(&mut n, C, REMOTE, Millis(0));
    let mut bytes = hello();
    bytes.extend(req(1, None, Request::CreateUser { user: UserId::new("al").unwrap(), password: "pw".into() }));
    n.handle_bytes(C, &bytes, Millis(0));
    assert_eq!(answer(&drain(&mut n)), Ok(Reply::Done));
    let listen = "127.0.0.1:9000".parse().unwrap();
    let wrong =
        Request::Login { user: UserId::new("al").unwrap(), password: "px".into(), listen, plaintext_peers: false };
    n.handle_bytes(C, &req(2, None, wrong), Millis(0));
    assert_eq!(answer(&drain(&mut n)), Err(ApiError::BadCredentials));
    let nobody =
        Request::Login { user: UserId::new("zed").unwrap(), password: "pw".into(), listen, plaintext_peers: false };
    n.handle_bytes(C, &req(3, None, nobody), Millis(0));
    assert_eq!(answer(&drain(&mut n)), Err(ApiError::BadCredentials), "same answer for a missing user");
    let login =
        Request::Login { user: UserId::new("al").unwrap(), password: "pw".into(), listen, plaintext_peers: false };
    n.handle_bytes(C, &req(4, None, login), Millis(0));
    let Ok(Reply::Session { token }) = answer(&drain(&mut n)) else { panic!("no session") };
    let g = GroupId::new("g").unwrap();
    n.handle_bytes(C, &req(5, Some(token), Request::CreateGroup { group: g.clone() }), Millis(0));
    assert_eq!(answer(&drain(&mut n)), Ok(Reply::Done));
    // Named at the address its connection comes from, with its port.
    let seen = SocketAddr::new(REMOTE.ip(), 9000);
    assert!(
        !n.is_live(&Sharer { user: UserId::new("al").unwrap(), listen }, Millis(1000)),
        "the claimed IP is not believed"
    );
    let sharer = Sharer { user: UserId::new("al").unwrap(), listen: seen };
    assert!(n.is_live(&sharer, Millis(1000)));
    assert!(!n.is_live(&sharer, Millis(60_000)), "a silent client's lease runs out");
}

/// The node's outputs, syncs done at once and password jobs held back.
fn drain_holding_passwords<R: Replicator>(n: &mut TrackerNode<R>) -> (Vec<TrackerOutput>, Vec<(u64, Job)>) {
    let (mut outs, mut jobs) = (Vec::new(), Vec::new());
    while let Some(o) = n.poll_output() {
        match o {
            TrackerOutput::Sync { seq } => n.handle_synced(seq, n.now),
            TrackerOutput::Work { ticket, job } if job.is_password() => jobs.push((ticket, job)),
            o => outs.push(o),
        }
    }
    (outs, jobs)
}

#[test]
fn passwords_are_hashed_by_jobs_while_the_tracker_answers_others() {
    let mut n = node();
    connect(&mut n, C, REMOTE, Millis(0));
    let mut bytes = hello();
    bytes.extend(req(1, None, Request::CreateUser { user: UserId::new("al").unwrap(), password: "pw".into() }));
    n.handle_bytes(C, &bytes, Millis(0));
    let (outs, jobs) = drain_holding_passwords(&mut n);
    assert!(outs.is_empty(), "no answer before the hash: {outs:?}");
    let [(ticket, job)] = <[_; 1]>::try_from(jobs).unwrap();
    assert!(!format!("{job:?}").contains("pw"), "a job never prints its password: {job:?}");
    // Meanwhile another connection is answered.
    let other = ConnId(2);
    connect(&mut n, other, REMOTE, Millis(0));
    let mut bytes = hello();
    bytes.extend(req(1, None, Request::ListGroups));
    n.handle_bytes(other, &bytes, Millis(0));
    assert_eq!(answer(&drain(&mut n)), Err(ApiError::NotLoggedIn));
    n.handle_job_done(ticket, job.run(), Millis(1));
    assert_eq!(answer(&drain(&mut n)), Ok(Reply::Done), "the account is written once hashed");
    // A login's check is a job too; a wrong one fails when it is done.
    let listen = "127.0.0.1:9000".parse().unwrap();
    let login = |pw: &str| Request::Login {
        user: UserId::new("al").unwrap(),
        password: pw.into(),
        listen,
        plaintext_peers: false,
    };
    n.handle_bytes(C, &req(2, None, login("px")), Millis(2));
    let (outs, jobs) = drain_holding_passwords(&mut n);
    assert!(outs.is_empty() && jobs.len() == 1, "{outs:?}");
    let (ticket, job) = jobs.into_iter().next().unwrap();
    n.handle_job_done(ticket, job.run(), Millis(3));
    assert_eq!(answer(&drain(&mut n)), Err(ApiError::BadCredentials));
    n.handle_bytes(C, &req(3, None, login("pw")), Millis(4));
    assert!(matches!(answer(&drain(&mut n)), Ok(Reply::Session { .. })));
}

#[test]
fn passwords_waiting_for_a_hash_are_bounded() {
    let mut n = node();
    // Each connection takes up to its write slots; many connections fill the queue.
    let per_conn = MAX_WRITES_IN_FLIGHT;
    let conns = MAX_PASSWORD_JOBS.div_ceil(per_conn) + 1;
    let mut refused = 0;
    for c in 0..conns as u64 {
        let conn = ConnId(100 + c);
        connect(&mut n, conn, REMOTE, Millis(0));
        n.handle_bytes(conn, &hello(), Millis(0));
        for i in 0..per_conn as u64 {
            let r = Request::CreateUser { user: UserId::new(format!("u{c}-{i}")).unwrap(), password: "p".into() };
            n.handle_bytes(conn, &req(i, None, r), Millis(0));
            let (outs, _) = drain_holding_passwords(&mut n);
            refused +=
                outs.iter().filter(|o| matches!(answer(std::slice::from_ref(o)), Err(ApiError::Limit(_)))).count();
        }
    }
    assert_eq!(n.passwords.len(), MAX_PASSWORD_JOBS);
    assert_eq!(refused, conns * per_conn - MAX_PASSWORD_JOBS);
}

/// Creates users `names` on a fresh connection `conn` from `remote`, then logs `who` in
/// there claiming `listen`: its answer.
fn login_from(
    n: &mut TrackerNode,
    conn: ConnId,
    remote: SocketAddr,
    seq: u64,
    who: &str,
    listen: &str,
    at: Millis,
) -> Result<Reply, ApiError> {
    connect(n, conn, remote, at);
    n.handle_bytes(conn, &hello(), at);
    let login = Request::Login {
        user: UserId::new(who).unwrap(),
        password: "pw".into(),
        listen: listen.parse().unwrap(),
        plaintext_peers: false,
    };
    n.handle_bytes(conn, &req(seq, None, login), at);
    answer(&drain(n))
}

#[test]
fn a_login_never_ends_another_users_live_session() {
    let mut n = node();
    connect(&mut n, C, REMOTE, Millis(0));
    n.handle_bytes(C, &hello(), Millis(0));
    for (i, u) in ["al", "eve"].into_iter().enumerate() {
        let create = Request::CreateUser { user: UserId::new(u).unwrap(), password: "pw".into() };
        n.handle_bytes(C, &req(1 + i as u64, None, create), Millis(0));
        assert_eq!(answer(&drain(&mut n)), Ok(Reply::Done));
    }
    let al_host: SocketAddr = "10.0.0.1:40000".parse().unwrap();
    let eve_host: SocketAddr = "10.0.0.2:40000".parse().unwrap();
    let Ok(Reply::Session { token: al }) = login_from(&mut n, ConnId(2), al_host, 10, "al", "10.0.0.1:9001", Millis(0))
    else {
        panic!("al logs in")
    };
    let at = SocketAddr::new(al_host.ip(), 9001);
    let owner = |n: &TrackerNode| n.meta().session_at(&at).map(|(t, s)| (*t, s.user.to_string()));
    // Eve claims al's address from her own host: she is named at hers.
    let Ok(Reply::Session { token: eve }) =
        login_from(&mut n, ConnId(3), eve_host, 20, "eve", "10.0.0.1:9001", Millis(10))
    else {
        panic!("eve logs in at her own address")
    };
    assert_eq!(n.meta().session_at(&SocketAddr::new(eve_host.ip(), 9001)).map(|(t, _)| *t), Some(eve));
    assert_eq!(owner(&n), Some((al, "al".into())), "al's session is untouched");
    // From al's host (another process there), she is refused while al's client is live.
    let r = login_from(&mut n, ConnId(4), SocketAddr::new(al_host.ip(), 40001), 30, "eve", "0.0.0.0:9001", Millis(20));
    assert_eq!(r, Err(ApiError::AddressInUse));
    assert_eq!(owner(&n), Some((al, "al".into())), "al's session survives the attempt");
    n.handle_bytes(ConnId(2), &req(11, Some(al), Request::ListGroups), Millis(30));
    assert!(answer(&drain(&mut n)).is_ok(), "al's session still works");
    // Al himself may log in anew there (his client restarted).
    let Ok(Reply::Session { token: al2 }) =
        login_from(&mut n, ConnId(5), al_host, 12, "al", "10.0.0.1:9001", Millis(40))
    else {
        panic!("al logs in again")
    };
    assert_eq!(owner(&n), Some((al2, "al".into())));
    // Once al's client has gone quiet past its lease, the address is free.
    let late = Millis(40 + n.cfg.session_lease.0 + 1);
    let r = login_from(&mut n, ConnId(6), al_host, 31, "eve", "10.0.0.1:9001", late);
    assert!(matches!(r, Ok(Reply::Session { .. })), "{r:?}");
    assert_eq!(owner(&n).map(|o| o.1), Some("eve".into()));
}

#[test]
fn a_session_opened_at_an_address_meanwhile_wins_over_a_stale_replacement() {
    let mut s = MetaState::default();
    let hash = PasswordHash::derive("pw", [1; 16], PasswordParams::INSECURE_FAST);
    for u in ["al", "eve"] {
        s.apply(&Entry {
            id: None,
            settled_below: 0,
            cmd: Command::CreateUser { user: UserId::new(u).unwrap(), password: hash.clone() },
        })
        .unwrap();
    }
    let at: SocketAddr = "10.0.0.1:9001".parse().unwrap();
    let open = |user: &str, t: u8, replaces: Option<u8>| Entry {
        id: None,
        settled_below: 0,
        cmd: Command::OpenSessionAt {
            user: UserId::new(user).unwrap(),
            token: SessionToken([t; 16]),
            listen: at,
            replaces: replaces.map(|r| SessionToken([r; 16])),
            key: KeyId([t; 32]),
            plaintext_peers: false,
        },
    };
    assert!(s.apply(&open("al", 1, None)).is_ok());
    // Proposed by a tracker that saw the address free: al's session came first.
    assert_eq!(s.apply(&open("eve", 2, None)), Err(ApiError::AddressInUse));
    assert_eq!(s.session_at(&at).map(|(t, _)| *t), Some(SessionToken([1; 16])));
    assert!(s.apply(&open("eve", 3, Some(1))).is_ok(), "replacing the session it saw");
    assert_eq!(s.session_at(&at).map(|(t, _)| *t), Some(SessionToken([3; 16])));
}

fn closed(outs: &[TrackerOutput], conn: ConnId) -> Option<String> {
    outs.iter().find_map(|o| match o {
        TrackerOutput::Transmit { conn: c, bytes, .. } if *c == conn => match decode(&bytes[4..]) {
            Ok(Message::Refused { reason }) => Some(reason),
            _ => None,
        },
        _ => None,
    })
}

fn sweep(n: &mut TrackerNode, at: Millis) -> Vec<TrackerOutput> {
    n.handle_timeout(at);
    drain(n)
}

#[test]
fn a_connection_that_never_says_hello_is_closed() {
    let mut n = node();
    connect(&mut n, C, REMOTE, Millis(0));
    assert!(sweep(&mut n, Millis(5_000)).is_empty());
    assert_eq!(closed(&sweep(&mut n, HELLO_TIMEOUT.plus(Millis(1_000))), C).as_deref(), Some("no Hello in time"));
    assert_eq!(n.connections(), 0);
}

#[test]
fn slow_loris_and_idle_connections_are_closed() {
    let mut n = node();
    connect(&mut n, C, REMOTE, Millis(0));
    connect(&mut n, ConnId(2), REMOTE, Millis(0));
    n.handle_bytes(C, &hello(), Millis(0));
    n.handle_bytes(ConnId(2), &hello(), Millis(0));
    // One byte of a frame every 5 s keeps C "active" but never finishes a frame.
    let frame = req(1, None, Request::ListGroups);
    let mut t = 0;
    let mut reason = None;
    for b in frame.iter().take(frame.len() - 1) {
        t += 5_000;
        n.handle_bytes(C, std::slice::from_ref(b), Millis(t));
        n.handle_bytes(ConnId(2), &req(t, None, Request::Heartbeat), Millis(t));
        let out = sweep(&mut n, Millis(t));
        if let Some(r) = closed(&out, C) {
            reason = Some(r);
            break;
        }
    }
    assert_eq!(reason.as_deref(), Some("a frame took too long to arrive"));
    assert!(n.conns.contains_key(&ConnId(2)), "a chatty client stays");
    let out = sweep(&mut n, Millis(t).plus(IDLE_TIMEOUT));
    assert_eq!(closed(&out, ConnId(2)).as_deref(), Some("idle for too long"));
}

#[test]
fn before_hello_only_small_frames_are_accepted() {
    let mut n = node();
    connect(&mut n, C, REMOTE, Millis(0));
    n.handle_bytes(C, &((HELLO_FRAME_LIMIT + 1) as u32).to_be_bytes(), Millis(0));
    assert!(closed(&drain(&mut n), C).unwrap().contains("exceeds the limit of 1024"));
}

#[test]
fn failed_logins_are_limited_per_user_and_per_address() {
    let mut n = node();
    connect(&mut n, C, REMOTE, Millis(0));
    let mut bytes = hello();
    bytes.extend(req(1, None, Request::CreateUser { user: UserId::new("al").unwrap(), password: "pw".into() }));
    n.handle_bytes(C, &bytes, Millis(0));
    drain(&mut n);
    let listen = "127.0.0.1:9000".parse().unwrap();
    let login = |user: &str, pw: &str| Request::Login {
        user: UserId::new(user).unwrap(),
        password: pw.into(),
        listen,
        plaintext_peers: false,
    };
    for i in 0..MAX_FAILED_LOGINS_PER_USER as u64 {
        n.handle_bytes(C, &req(10 + i, None, login("al", "wrong")), Millis(1_000));
        assert_eq!(answer(&drain(&mut n)), Err(ApiError::BadCredentials));
    }
    // Now even the right password waits: guessing is capped at 5 a minute.
    n.handle_bytes(C, &req(20, None, login("al", "pw")), Millis(2_000));
    assert_eq!(answer(&drain(&mut n)), Err(ApiError::TooManyAttempts { retry_after_secs: 59 }));
    n.handle_timeout(Millis(61_500));
    drain(&mut n);
    n.handle_bytes(C, &req(21, None, login("al", "pw")), Millis(61_500));
    assert!(matches!(answer(&drain(&mut n)), Ok(Reply::Session { .. })), "the window passed");
    // One address spraying many user names is capped too.
    for i in 0..MAX_FAILED_LOGINS_PER_ADDR as u64 {
        n.handle_bytes(C, &req(100 + i, None, login(&format!("u{i}"), "x")), Millis(62_000));
        drain(&mut n);
    }
    n.handle_bytes(C, &req(200, None, login("fresh", "x")), Millis(62_000));
    assert!(matches!(answer(&drain(&mut n)), Err(ApiError::TooManyAttempts { .. })));
}

/// A log that never decides: writes stay in flight.
#[derive(Default)]
struct Stuck;
impl Replicator for Stuck {
    fn propose(&mut self, _: Entry) {}
    fn poll_decided(&mut self) -> Option<Decided> {
        None
    }
    fn poll_persist(&mut self) -> Option<Persist> {
        None
    }
    fn snapshot_due(&self) -> bool {
        false
    }
    fn take_snapshot(&mut self, _: &crate::meta::MetaState) {}
    fn leader(&self) -> Option<NodeId> {
        None
    }
    fn me(&self) -> NodeId {
        1
    }
}

/// A greeted connection to a node whose log never decides.
fn stuck_node() -> TrackerNode<Stuck> {
    let cfg = TrackerConfig { password_params: PasswordParams::INSECURE_FAST, ..TrackerConfig::default() };
    let mut n = TrackerNode::new(cfg, Rng::from_u64(1), Stuck);
    connect(&mut n, C, REMOTE, Millis(0));
    n.handle_bytes(C, &hello(), Millis(0));
    n
}

#[test]
fn writes_in_flight_per_connection_are_bounded() {
    let mut n = stuck_node();
    for i in 0..MAX_WRITES_IN_FLIGHT as u64 {
        let r = Request::CreateUser { user: UserId::new(format!("u{i}")).unwrap(), password: "p".into() };
        n.handle_bytes(C, &req(i, None, r), Millis(0));
        assert!(drain(&mut n).is_empty(), "waiting for the log");
    }
    let r = Request::CreateUser { user: UserId::new("one-more").unwrap(), password: "p".into() };
    n.handle_bytes(C, &req(999, None, r), Millis(0));
    assert_eq!(answer(&drain(&mut n)), Err(ApiError::Limit("too many requests in flight".into())));
}

#[test]
fn overlong_passwords_are_refused_before_hashing() {
    let mut n = node();
    connect(&mut n, C, REMOTE, Millis(0));
    let mut bytes = hello();
    let long = "p".repeat(MAX_PASSWORD_LEN + 1);
    bytes.extend(req(1, None, Request::CreateUser { user: UserId::new("al").unwrap(), password: long }));
    n.handle_bytes(C, &bytes, Millis(0));
    assert_eq!(answer(&drain(&mut n)), Err(ApiError::PasswordTooLong));
}

#[test]
fn a_write_not_decided_in_time_is_answered_no_quorum_and_frees_its_slot() {
    let mut n = stuck_node();
    for i in 0..MAX_WRITES_IN_FLIGHT as u64 {
        let r = Request::CreateUser { user: UserId::new(format!("u{i}")).unwrap(), password: "p".into() };
        n.handle_bytes(C, &req(i, None, r), Millis(0));
    }
    assert!(drain(&mut n).is_empty());
    let deadline = n.poll_timeout().expect("a sweep is due");
    assert!(deadline <= WRITE_DEADLINE.plus(Millis(1_000)));
    n.handle_timeout(Millis(500));
    assert!(drain(&mut n).is_empty(), "not yet");
    n.handle_timeout(WRITE_DEADLINE.plus(Millis(1_000)));
    let outs = drain(&mut n);
    assert_eq!(outs.len(), MAX_WRITES_IN_FLIGHT);
    for o in &outs {
        assert_eq!(answer(std::slice::from_ref(o)), Err(ApiError::NoQuorum));
    }
    // The slots are free again.
    let r = Request::CreateUser { user: UserId::new("later").unwrap(), password: "p".into() };
    n.handle_bytes(C, &req(999, None, r), Millis(4_000));
    assert!(drain(&mut n).is_empty(), "waiting for the log again, not refused");
}

/// Tracker `n`'s key, in these tests.
fn key(n: u8) -> KeyId {
    KeyId([n; 32])
}

/// Tracker 1 of three, alone: what it dials and sends on its links.
fn linked_node() -> TrackerNode<OmniReplicator> {
    let cfg = TrackerConfig {
        password_params: PasswordParams::INSECURE_FAST,
        peer_keys: [(2, key(2)), (3, key(3))].into_iter().collect(),
        ..TrackerConfig::default()
    };
    let rep = OmniReplicator::recover(1, &[1, 2, 3], std::iter::empty()).unwrap();
    TrackerNode::new(cfg, Rng::from_u64(1), rep)
}

/// A [`linked_node`] whose link to tracker 2 is up, its dials and hello drained.
fn linked_to_2() -> TrackerNode<OmniReplicator> {
    let mut n = linked_node();
    n.handle_timeout(Millis(1));
    drain(&mut n);
    n.handle_link_up(2, key(2), Millis(5));
    drain(&mut n);
    n
}

fn dials(outs: &[TrackerOutput]) -> Vec<NodeId> {
    outs.iter().filter_map(|o| if let TrackerOutput::Dial { node } = o { Some(*node) } else { None }).collect()
}

fn hangups(outs: &[TrackerOutput]) -> Vec<NodeId> {
    outs.iter().filter_map(|o| if let TrackerOutput::Hangup { node } = o { Some(*node) } else { None }).collect()
}

fn pings_to(outs: &[TrackerOutput], to: NodeId) -> usize {
    outs.iter()
        .filter(|o| {
            matches!(o, TrackerOutput::PeerSend { node, bytes } if *node == to
            && decode::<Message>(&bytes[4..]) == Ok(Message::Tracker(TrackerFrame::Ping)))
        })
        .count()
}

#[test]
fn links_are_dialled_pinged_and_hung_up_when_silent() {
    use super::links::{DIAL_TIMEOUT, LINK_DEADLINE, LINK_HEARTBEAT, REDIAL_MIN};
    let mut n = linked_node();
    n.handle_timeout(Millis(1));
    assert_eq!(dials(&drain(&mut n)), vec![2, 3]);
    n.handle_link_up(2, key(2), Millis(5));
    let hello = drain(&mut n);
    assert!(hello.iter().any(|o| matches!(o, TrackerOutput::PeerSend { node: 2, .. })), "introduces itself");
    // Link 3 never connects: given up after the dial timeout, redialled later.
    let mut t = Millis(5);
    let mut pings = 0;
    let mut out = Vec::new();
    while t < Millis(5).plus(DIAL_TIMEOUT) {
        t = t.plus(Millis(10));
        n.handle_timeout(t);
        out = drain(&mut n);
        pings += pings_to(&out, 2);
        // Link 2 answers its pings.
        n.handle_link_bytes(2, &encode(&Message::Tracker(TrackerFrame::Pong)), t);
        drain(&mut n);
    }
    assert!(pings as u64 >= DIAL_TIMEOUT.0 / LINK_HEARTBEAT.0 - 1, "{pings} pings");
    assert_eq!(hangups(&out), vec![3], "the dial that never connected is abandoned");
    n.handle_timeout(t.plus(REDIAL_MIN));
    assert_eq!(dials(&drain(&mut n)), vec![3]);
    // Link 2 falls silent: hung up at its deadline, not before.
    let quiet = t;
    let mut hung = None;
    while hung.is_none() {
        t = t.plus(Millis(10));
        n.handle_timeout(t);
        if hangups(&drain(&mut n)).contains(&2) {
            hung = Some(t.since(quiet));
        }
    }
    let hung = hung.unwrap();
    assert!(hung >= LINK_DEADLINE && hung <= LINK_DEADLINE.plus(Millis(20)), "hung up after {hung}");
}

/// A tracker whose disk is slow (a vote waits for an fsync that does not
/// end, as while a snapshot's log is rewritten) still pings and answers on
/// its links: its peers do not take a busy disk for a dead link.
#[test]
fn a_link_stays_up_while_a_vote_waits_for_the_disk() {
    use super::links::LINK_DEADLINE;
    let mut n = linked_to_2();
    // A vote to 2 that waits for a sync the driver never reports.
    n.outbox.push(TrackerOutput::Persist(Persist::Append(vec![1])));
    n.outbox.send(TrackerOutput::PeerSend { node: 2, bytes: vec![7] }, true);
    let (mut t, mut pings) = (Millis(5), 0);
    while t < Millis(5).plus(LINK_DEADLINE).plus(LINK_DEADLINE) {
        t = t.plus(Millis(10));
        n.handle_timeout(t);
        let out: Vec<TrackerOutput> = std::iter::from_fn(|| n.poll_output()).collect();
        assert!(!hangups(&out).contains(&2), "hung up at {t} while the disk was busy");
        assert!(
            !out.iter().any(|o| matches!(o, TrackerOutput::PeerSend { node: 2, bytes } if bytes == &[7])),
            "the vote left before its sync"
        );
        let p = pings_to(&out, 2);
        pings += p;
        if p > 0 {
            n.handle_link_bytes(2, &encode(&Message::Tracker(TrackerFrame::Pong)), t);
        }
    }
    assert!(pings > 10, "{pings} pings");
}

#[test]
fn a_lone_member_of_a_cluster_names_no_leader_and_answers_writes_at_once() {
    let mut n = linked_node();
    connect(&mut n, C, REMOTE, Millis(0));
    n.handle_bytes(C, &hello(), Millis(0));
    drain(&mut n);
    let r = Request::CreateUser { user: UserId::new("al").unwrap(), password: "pw".into() };
    n.handle_bytes(C, &req(1, None, r), Millis(1));
    // Not caught up with anyone either; what matters is the answer comes now.
    let outs = drain(&mut n);
    assert!(matches!(answer(&outs), Err(ApiError::NoQuorum | ApiError::CatchingUp)), "{outs:?}");
    assert_eq!(n.leader(), None);
}

/// Trackers are known by key: a link whose other end proves another key is
/// hung up before anything is sent on it, and a connection claiming to be a
/// tracker is refused unless it proved that tracker's key.
#[test]
fn only_the_key_a_tracker_holds_makes_a_link_to_it() {
    let mut n = linked_node();
    n.handle_timeout(Millis(1));
    drain(&mut n);
    // Our link to 2 reaches someone with another key.
    n.handle_link_up(2, key(9), Millis(5));
    let out = drain(&mut n);
    assert!(!out.iter().any(|o| matches!(o, TrackerOutput::PeerSend { node: 2, .. })), "nothing sent: {out:?}");
    assert_eq!(hangups(&out), vec![2]);
    // Connections claiming to be tracker 3: without a key, with the wrong
    // one, and with its own.
    let join = {
        let mut b = encode(&Message::Hello { protocol_version: PROTOCOL_VERSION, role: Role::Tracker });
        b.extend(encode(&Message::Tracker(TrackerFrame::Join { node: 3 })));
        b
    };
    for (conn, proved, accepted) in
        [(ConnId(10), None, false), (ConnId(11), Some(key(2)), false), (ConnId(12), Some(key(3)), true)]
    {
        connect(&mut n, conn, REMOTE, Millis(6));
        if let Some(k) = proved {
            n.handle_secured(conn, k, Millis(6));
        }
        n.handle_bytes(conn, &join, Millis(6));
        let out = drain(&mut n);
        assert_eq!(closed(&out, conn).is_none(), accepted, "{proved:?}: {out:?}");
        if !accepted {
            assert_eq!(closed(&out, conn).as_deref(), Some("not a tracker of this cluster"));
        }
    }
    // Soft state from the impostors was never taken: only the real one's
    // connection is left.
    assert_eq!(n.connections(), 1);
}

/// Asks `body` of the node on `conn`, numbering requests with `seq`: the answer.
fn ask(
    n: &mut TrackerNode,
    seq: &mut u64,
    conn: ConnId,
    session: Option<SessionToken>,
    body: Request,
) -> Result<Reply, ApiError> {
    *seq += 1;
    n.handle_bytes(conn, &req(*seq, session, body), Millis(10));
    answer(&drain(n))
}

/// Al (conn 1, at 10.0.0.1), bob (2) and eve (3) logged in, each listening
/// on port 9000; al's group g with `members` of bob and eve accepted; al
/// shares f.bin in it. Their tokens.
fn group_sharing_a_file(n: &mut TrackerNode, seq: &mut u64, members: &[&str]) -> Vec<SessionToken> {
    use crate::chunk::{FileDigest, FileMeta, Sha1Digest};
    let login = |user: &str| Request::Login {
        user: UserId::new(user).unwrap(),
        password: "pw".into(),
        listen: "0.0.0.0:9000".parse().unwrap(),
        plaintext_peers: false,
    };
    let mut tokens = Vec::new();
    for (i, user) in ["al", "bob", "eve"].into_iter().enumerate() {
        let conn = ConnId(i as u64 + 1);
        connect(n, conn, format!("10.0.0.{}:5000", i + 1).parse().unwrap(), Millis(0));
        n.handle_bytes(conn, &hello(), Millis(0));
        let create = Request::CreateUser { user: UserId::new(user).unwrap(), password: "pw".into() };
        assert_eq!(ask(n, seq, conn, None, create), Ok(Reply::Done));
        let Ok(Reply::Session { token }) = ask(n, seq, conn, None, login(user)) else { panic!("{user} not in") };
        tokens.push(token);
    }
    let g = GroupId::new("g").unwrap();
    assert_eq!(ask(n, seq, ConnId(1), Some(tokens[0]), Request::CreateGroup { group: g.clone() }), Ok(Reply::Done));
    for m in members {
        let i = if *m == "bob" { 1 } else { 2 };
        let join = Request::JoinGroup { group: g.clone() };
        assert_eq!(ask(n, seq, ConnId(i as u64 + 1), Some(tokens[i]), join), Ok(Reply::Done));
        let accept = Request::AcceptRequest { group: g.clone(), user: UserId::new(*m).unwrap() };
        assert_eq!(ask(n, seq, ConnId(1), Some(tokens[0]), accept), Ok(Reply::Done));
    }
    let meta = FileMeta {
        name: FileName::new("f.bin").unwrap(),
        digest: FileDigest { size: 10, sha1: Sha1Digest([1; 20]), chunks: vec![Sha1Digest([1; 20])] },
    };
    assert_eq!(
        ask(n, seq, ConnId(1), Some(tokens[0]), Request::UploadFile { group: g, file: meta.record() }),
        Ok(Reply::Done)
    );
    tokens
}

/// Sessions and grants belong to the key that proved them: a token or a
/// grant copied to another connection is worth nothing, and downloaders
/// learn the key each sharer proved.
#[test]
fn sessions_and_grants_are_bound_to_the_key_that_proved_them() {
    use crate::client::peer::Grant;
    let mut n = node();
    let mut seq = 0;
    let tokens = group_sharing_a_file(&mut n, &mut seq, &["bob"]);
    let mut ask = |n: &mut TrackerNode, conn: ConnId, session: Option<SessionToken>, body: Request| {
        ask(n, &mut seq, conn, session, body)
    };
    let al_host: SocketAddr = "10.0.0.1:5000".parse().unwrap();
    let (al, bob, eve) = (ConnId(1), ConnId(2), ConnId(3));
    let (al_t, bob_t, eve_t) = (tokens[0], tokens[1], tokens[2]);
    let g = GroupId::new("g").unwrap();
    let name = FileName::new("f.bin").unwrap();
    let login = |user: &str| Request::Login {
        user: UserId::new(user).unwrap(),
        password: "pw".into(),
        listen: "0.0.0.0:9000".parse().unwrap(),
        plaintext_peers: false,
    };

    // Eve holds al's token, but not al's key: no session of hers.
    assert_eq!(ask(&mut n, eve, Some(al_t), Request::ListMyGroups), Err(ApiError::NotLoggedIn));
    let stop = Request::StopShare { group: g.clone(), name: name.clone() };
    assert_eq!(ask(&mut n, eve, Some(al_t), stop), Err(ApiError::NotLoggedIn));

    // Bob is sent to al's address, with the key al proved.
    let dl = Request::DownloadFile { group: g.clone(), name: name.clone() };
    let Ok(Reply::Download { sharers, grant, .. }) = ask(&mut n, bob, Some(bob_t), dl) else { panic!("no grant") };
    assert_eq!(sharers, vec![SharerAddr { addr: SocketAddr::new(al_host.ip(), 9000), key: Some(client_key(al)) }]);

    // Al, serving, checks the grant against the key its holder proved.
    let check = |holder: Option<KeyId>| Request::CheckGrant { grant, group: g.clone(), name: name.clone(), holder };
    assert_eq!(
        ask(&mut n, al, Some(al_t), check(Some(client_key(bob)))),
        Ok(Reply::GrantValid { user: UserId::new("bob").unwrap() })
    );
    assert_eq!(ask(&mut n, al, Some(al_t), check(Some(client_key(eve)))), Err(ApiError::BadGrant), "copied");
    assert_eq!(ask(&mut n, al, Some(al_t), check(None)), Err(ApiError::BadGrant), "shown in plaintext");
    let forged = Request::CheckGrant { grant: Grant([9; 16]), group: g.clone(), name, holder: Some(client_key(bob)) };
    assert_eq!(ask(&mut n, al, Some(al_t), forged), Err(ApiError::BadGrant));
    let _ = eve_t;

    // A connection that proved no key cannot log in.
    let bare = ConnId(4);
    n.handle_connected(bare, "10.0.0.4:5000".parse().unwrap(), Millis(10));
    n.handle_bytes(bare, &hello(), Millis(10));
    assert_eq!(ask(&mut n, bare, None, login("eve")), Err(ApiError::Unsecured));
}

/// A downloader is a source from its first `download_file`, before it holds
/// a chunk: the next downloader is sent to it too (with the key it proved),
/// and a downloader is never sent to itself.
#[test]
fn a_downloader_is_listed_as_a_source_from_the_start() {
    let mut n = node();
    let mut seq = 0;
    let tokens = group_sharing_a_file(&mut n, &mut seq, &["bob", "eve"]);
    let g = GroupId::new("g").unwrap();
    let dl = Request::DownloadFile { group: g, name: FileName::new("f.bin").unwrap() };
    let at = |i: u8| SharerAddr {
        addr: format!("10.0.0.{i}:9000").parse().unwrap(),
        key: Some(client_key(ConnId(i as u64))),
    };
    let sources = |r: Result<Reply, ApiError>| match r {
        Ok(Reply::Download { sharers, .. }) => sharers,
        r => panic!("{r:?}"),
    };
    assert_eq!(sources(ask(&mut n, &mut seq, ConnId(2), Some(tokens[1]), dl.clone())), vec![at(1)]);
    assert_eq!(sources(ask(&mut n, &mut seq, ConnId(3), Some(tokens[2]), dl.clone())), vec![at(1), at(2)]);
    // Asking again (a refresh) lists the others, never itself.
    assert_eq!(sources(ask(&mut n, &mut seq, ConnId(2), Some(tokens[1]), dl)), vec![at(1), at(3)]);
}

/// A range store for one node: ranges stored are kept, loads answered.
/// Returns the outputs left (without the stores and loads).
fn drain_with_store(n: &mut TrackerNode, store: &mut BTreeMap<Sha1Digest, Vec<u8>>) -> Vec<TrackerOutput> {
    let mut rest = Vec::new();
    loop {
        let outs = drain(n);
        if outs.is_empty() {
            return rest;
        }
        for o in outs {
            match o {
                TrackerOutput::StoreRange { hash, bytes } => {
                    assert_eq!(Sha1Digest::of(&bytes), hash, "a range is stored under its hash");
                    store.insert(hash, bytes);
                }
                TrackerOutput::LoadRange { hash } => {
                    let got = store.get(&hash).cloned();
                    n.handle_range_loaded(hash, got, n.now);
                }
                TrackerOutput::DropRange { hash } => {
                    store.remove(&hash);
                }
                o => rest.push(o),
            }
        }
    }
}

/// Asks `body` of the node as `(conn, token)` at `now`, numbering requests
/// with `seq`, `store` playing the range store: the answer.
fn ask_stored(
    n: &mut TrackerNode,
    store: &mut BTreeMap<Sha1Digest, Vec<u8>>,
    seq: &mut u64,
    (conn, token): (ConnId, SessionToken),
    body: Request,
    now: Millis,
) -> Result<Reply, ApiError> {
    *seq += 1;
    n.handle_bytes(conn, &req(*seq, Some(token), body), now);
    answer(&drain_with_store(n, store))
}

/// Idle past the deadline, al's and bob's connections were closed: they
/// connect again, with the same keys, so their sessions are theirs still.
fn reconnect_al_and_bob(n: &mut TrackerNode, now: Millis) {
    for c in [1u64, 2] {
        connect(n, ConnId(c), format!("10.0.0.{c}:5001").parse().unwrap(), now);
        n.handle_bytes(ConnId(c), &hello(), now);
    }
}

/// A file is shared by its index: the tracker names the ranges of its chunk
/// list it lacks, takes each (stored under its hash, durable before the
/// answer), then logs the file; members read the ranges back, others not.
#[test]
fn a_file_is_shared_once_its_chunk_list_is_stored_and_members_read_it_back() {
    use crate::chunk::{FileDigest, FileMeta, CHUNK_SIZE, RANGE_CHUNKS};
    let mut n = node();
    let mut seq = 0;
    let tokens = group_sharing_a_file(&mut n, &mut seq, &["bob"]);
    let mut store = BTreeMap::new();
    let g = GroupId::new("g").unwrap();
    let name = FileName::new("big.bin").unwrap();
    let chunks: Vec<Sha1Digest> = (0..RANGE_CHUNKS + 5).map(|i| Sha1Digest::of(&i.to_be_bytes())).collect();
    let digest = FileDigest { size: chunks.len() as u64 * CHUNK_SIZE, sha1: Sha1Digest([4; 20]), chunks };
    let meta = FileMeta { name: name.clone(), digest };
    let (al, bob, eve) = ((ConnId(1), tokens[0]), (ConnId(2), tokens[1]), (ConnId(3), tokens[2]));
    let mut call = |n: &mut TrackerNode, who, body| ask_stored(n, &mut store, &mut seq, who, body, Millis(10));
    let share = Request::UploadFile { group: g.clone(), file: meta.record() };
    let put = |i: u64| Request::PutRange { hashes: meta.digest.range(i).to_vec() };
    assert_eq!(call(&mut n, al, share.clone()), Err(ApiError::MissingRanges { ranges: vec![0, 1] }));
    assert_eq!(call(&mut n, al, put(1)), Ok(Reply::Done));
    assert_eq!(call(&mut n, al, share.clone()), Err(ApiError::MissingRanges { ranges: vec![0] }));
    assert_eq!(call(&mut n, al, put(0)), Ok(Reply::Done));
    assert_eq!(call(&mut n, al, share.clone()), Ok(Reply::Done));
    // A second sharer of the same content sends nothing again.
    let mut other = meta.clone();
    other.name = FileName::new("copy.bin").unwrap();
    assert_eq!(call(&mut n, bob, Request::UploadFile { group: g.clone(), file: other.record() }), Ok(Reply::Done));

    let get = |range: u32| Request::GetRange { group: g.clone(), name: name.clone(), range };
    for i in 0..2u32 {
        let want = meta.digest.range(i as u64).to_vec();
        assert_eq!(call(&mut n, bob, get(i)), Ok(Reply::Range { hashes: want }));
    }
    assert!(matches!(call(&mut n, bob, get(2)), Err(ApiError::InvalidFile(_))));
    assert_eq!(call(&mut n, eve, get(0)), Err(ApiError::NotMember));
    // Ranges that are no range are refused before anything is stored.
    assert!(matches!(call(&mut n, al, Request::PutRange { hashes: vec![] }), Err(ApiError::InvalidFile(_))));
    let too_many = vec![Sha1Digest([1; 20]); RANGE_CHUNKS as usize + 1];
    assert!(matches!(call(&mut n, al, Request::PutRange { hashes: too_many }), Err(ApiError::InvalidFile(_))));
    assert_eq!(store.len(), 2, "the two ranges, once each");
    // The log holds the index, not the list.
    let f = &n.meta().group(&g).unwrap().files[&name];
    assert_eq!(f.meta.index, meta.digest.index());
}

/// The largest entry a client can cause (the biggest file, the longest
/// names) fits the entry limit, so the limit is never what refuses an
/// honest upload; chunk lists stay out of the log.
#[test]
fn the_largest_entry_fits_the_entry_limit() {
    use crate::chunk::{FileIndex, FileRecord, CHUNK_SIZE, MAX_FILE_CHUNKS, MAX_RANGES};
    use crate::ids::{MAX_FILE_NAME_LEN, MAX_ID_LEN};
    let index = FileIndex {
        size: MAX_FILE_CHUNKS * CHUNK_SIZE,
        sha1: Sha1Digest([0xff; 20]),
        ranges: vec![Sha1Digest([0xff; 20]); MAX_RANGES as usize],
    };
    index.validate().unwrap();
    let file = FileRecord { name: FileName::new("n".repeat(MAX_FILE_NAME_LEN)).unwrap(), index };
    let cmd = Command::AddFile {
        token: SessionToken([0xff; 16]),
        group: GroupId::new("g".repeat(MAX_ID_LEN)).unwrap(),
        file,
    };
    let entry = Entry { id: Some(RequestId { client: u64::MAX, seq: u64::MAX }), settled_below: u64::MAX, cmd };
    let size = encode(&entry).len();
    assert!(size < MAX_ENTRY_BYTES / 16, "{size} bytes");
}

/// Ranges no file names leave the store after their grace; a file's stay
/// while it is shared and go once it is not. A user may have only so many
/// unnamed ranges at once, so an account cannot fill the trackers' disks.
#[test]
fn ranges_no_file_names_are_dropped_and_bounded_per_user() {
    use crate::chunk::{FileDigest, FileMeta, CHUNK_SIZE};
    use crate::tracker::ranges::{MAX_UNNAMED_PER_USER, UNNAMED_GRACE};
    let mut n = node();
    let mut seq = 0;
    let tokens = group_sharing_a_file(&mut n, &mut seq, &["bob"]);
    let mut store = BTreeMap::new();
    let g = GroupId::new("g").unwrap();
    let (al, bob) = ((ConnId(1), tokens[0]), (ConnId(2), tokens[1]));
    let mut now = Millis(10);
    let mut call = |n: &mut TrackerNode, store: &mut _, who, body, now| ask_stored(n, store, &mut seq, who, body, now);
    let junk = |i: usize| Request::PutRange { hashes: vec![Sha1Digest::of(&i.to_be_bytes()); 2] };
    for i in 0..MAX_UNNAMED_PER_USER {
        assert_eq!(call(&mut n, &mut store, al, junk(i), now), Ok(Reply::Done));
    }
    let over = call(&mut n, &mut store, al, junk(MAX_UNNAMED_PER_USER), now);
    assert!(matches!(&over, Err(ApiError::Limit(e)) if e.contains("wait for their files")), "{over:?}");
    // Bob has a quota of his own; al's puts of a range already held count once.
    assert_eq!(call(&mut n, &mut store, bob, junk(MAX_UNNAMED_PER_USER), now), Ok(Reply::Done));
    assert_eq!(call(&mut n, &mut store, al, junk(0), now), Ok(Reply::Done));

    // A two-chunk file, shared (by bob: al is at his limit): its range is named.
    let chunks = vec![Sha1Digest([7; 20]), Sha1Digest([8; 20])];
    let meta = FileMeta {
        name: FileName::new("two.bin").unwrap(),
        digest: FileDigest { size: 2 * CHUNK_SIZE, sha1: Sha1Digest([9; 20]), chunks },
    };
    let range = meta.digest.index().ranges[0];
    let put = Request::PutRange { hashes: meta.digest.range(0).to_vec() };
    assert!(matches!(call(&mut n, &mut store, al, put.clone(), now), Err(ApiError::Limit(_))));
    assert_eq!(call(&mut n, &mut store, bob, put, now), Ok(Reply::Done));
    let share = Request::UploadFile { group: g.clone(), file: meta.record() };
    assert_eq!(call(&mut n, &mut store, bob, share, now), Ok(Reply::Done));
    assert_eq!(store.len(), MAX_UNNAMED_PER_USER + 2);

    // Past the grace, only the named range is left, and al may put again.
    now = now.plus(UNNAMED_GRACE).plus(Millis(1_000));
    n.handle_timeout(now);
    drain_with_store(&mut n, &mut store);
    reconnect_al_and_bob(&mut n, now);
    assert_eq!(store.keys().copied().collect::<Vec<_>>(), vec![range]);
    assert!(n.holds_range(&range));
    assert_eq!(call(&mut n, &mut store, al, junk(1), now), Ok(Reply::Done));

    // Not shared any more: its range goes after the grace too.
    let stop = Request::StopShare { group: g, name: FileName::new("two.bin").unwrap() };
    assert_eq!(call(&mut n, &mut store, bob, stop, now), Ok(Reply::Done));
    now = now.plus(UNNAMED_GRACE).plus(Millis(1_000));
    n.handle_timeout(now);
    drain_with_store(&mut n, &mut store);
    assert!(store.is_empty(), "{} ranges left", store.len());
    assert!(!n.holds_range(&range));
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 24, ..Default::default() })]
    /// Whatever members share, stop sharing, put without sharing, and
    /// however time passes: every file the log lists has each range of its
    /// chunk list in the store, under its hash, and read back equal to the
    /// uploader's; the tracker's idea of what its store holds is the store.
    #[test]
    fn any_sequence_of_uploads_keeps_the_index_and_the_stored_ranges_consistent(
        ops in proptest::collection::vec((0u8..4, 0usize..3, proptest::prelude::any::<bool>()), 1..14),
    ) {
        use crate::chunk::{range_from_bytes, FileDigest, FileMeta, CHUNK_SIZE, RANGE_CHUNKS};
        use crate::tracker::ranges::UNNAMED_GRACE;
        let mut n = node();
        let mut seq = 0;
        let tokens = group_sharing_a_file(&mut n, &mut seq, &["bob"]);
        let mut store = BTreeMap::new();
        let g = GroupId::new("g").unwrap();
        let who = [(ConnId(1), tokens[0]), (ConnId(2), tokens[1])];
        let files: Vec<FileMeta> = [2u64, RANGE_CHUNKS + 1, 2 * RANGE_CHUNKS + 3]
            .iter()
            .enumerate()
            .map(|(k, &c)| {
                let chunks: Vec<Sha1Digest> = (0..c).map(|i| Sha1Digest::of(&[&[k as u8][..], &i.to_be_bytes()].concat())).collect();
                let digest = FileDigest { size: c * CHUNK_SIZE - 1, sha1: Sha1Digest([k as u8; 20]), chunks };
                FileMeta { name: FileName::new(format!("f{k}.bin")).unwrap(), digest }
            })
            .collect();
        let mut now = Millis(10);
        for (op, k, second) in ops {
            let me = who[second as usize];
            let mut call = |n: &mut TrackerNode, store: &mut _, body, now| ask_stored(n, store, &mut seq, me, body, now);
            match op {
                0 => {
                    // Share as the client does: the index, the ranges it is told are missing, the index.
                    let share = Request::UploadFile { group: g.clone(), file: files[k].record() };
                    let mut r = call(&mut n, &mut store, share.clone(), now);
                    if let Err(ApiError::MissingRanges { ranges }) = &r {
                        for &i in ranges {
                            let put = Request::PutRange { hashes: files[k].digest.range(i as u64).to_vec() };
                            proptest::prop_assert_eq!(call(&mut n, &mut store, put, now), Ok(Reply::Done));
                        }
                        r = call(&mut n, &mut store, share, now);
                    }
                    proptest::prop_assert!(matches!(r, Ok(Reply::Done) | Err(ApiError::FileNameTaken)), "{:?}", r);
                }
                1 => {
                    let stop = Request::StopShare { group: g.clone(), name: files[k].name.clone() };
                    let _ = call(&mut n, &mut store, stop, now);
                }
                2 => {
                    let put = Request::PutRange { hashes: files[k].digest.range(0).to_vec() };
                    proptest::prop_assert_eq!(call(&mut n, &mut store, put, now), Ok(Reply::Done));
                }
                _ => {
                    now = now.plus(UNNAMED_GRACE).plus(Millis(1_000));
                    n.handle_timeout(now);
                    drain_with_store(&mut n, &mut store);
                    reconnect_al_and_bob(&mut n, now);
                }
            }
            let listed = &n.meta().group(&g).unwrap().files;
            for f in &files {
                let Some(sf) = listed.get(&f.name) else { continue };
                proptest::prop_assert_eq!(&sf.meta.index, &f.digest.index());
                for (i, h) in sf.meta.index.stored_ranges() {
                    let bytes = store.get(&h);
                    proptest::prop_assert!(bytes.is_some(), "{} range {} is not stored", f.name, i);
                    let hashes = range_from_bytes(bytes.unwrap()).unwrap();
                    proptest::prop_assert!(sf.meta.index.check_range(i, &hashes).is_ok());
                    proptest::prop_assert_eq!(&hashes[..], f.digest.range(i));
                }
            }
            for h in store.keys() {
                proptest::prop_assert!(n.holds_range(h));
            }
            proptest::prop_assert_eq!(n.ranges_held(), store.len());
        }
    }
}

/// A consensus message too big for one part goes in parts, at most a window
/// of them unacknowledged: a ping goes between them, the rest follows the
/// acks, and the parts put back together are the message. Small messages
/// sent meanwhile wait behind it, in order.
#[test]
fn a_big_consensus_message_goes_in_parts_a_window_at_a_time() {
    use super::stream::{PART, WINDOW_PARTS};
    let mut n = linked_to_2();
    let big: Vec<u8> = (0..(WINDOW_PARTS + 5) * PART + 77).map(|i| (i % 251) as u8).collect();
    n.send_consensus(2, big.clone(), false);
    n.send_consensus(2, vec![1, 2, 3], false);
    let frames = |outs: &[TrackerOutput]| -> Vec<TrackerFrame> {
        outs.iter()
            .filter_map(|o| match o {
                TrackerOutput::PeerSend { node: 2, bytes } => match decode::<Message>(&bytes[4..]) {
                    Ok(Message::Tracker(f)) => Some(f),
                    _ => None,
                },
                _ => None,
            })
            .collect()
    };
    let mut got = frames(&drain(&mut n));
    assert_eq!(got.len(), WINDOW_PARTS, "a window of parts, then nothing until acks");
    // Pings still go: nothing of the message waits before them.
    n.handle_timeout(Millis(200));
    assert_eq!(frames(&drain(&mut n)).iter().filter(|f| matches!(f, TrackerFrame::Ping)).count(), 1);
    let mut whole = Vec::new();
    let mut small = None;
    while let Some(f) = got.first().cloned() {
        got.remove(0);
        match f {
            TrackerFrame::ConsensusPart { bytes, last, .. } => {
                assert!(bytes.len() <= PART);
                whole.extend_from_slice(&bytes);
                assert_eq!(last, whole.len() == big.len());
                // Peer 2 acknowledges on its link to us.
                n.handle_consensus_ack(2, bytes.len() as u32);
                got.extend(frames(&drain(&mut n)).into_iter().filter(|f| !matches!(f, TrackerFrame::Ping)));
            }
            TrackerFrame::Consensus(b) => {
                assert_eq!(whole.len(), big.len(), "the small message came after the big one");
                small = Some(b);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(whole == big, "the parts make up the message");
    assert_eq!(small, Some(vec![1, 2, 3]));
}

/// A log of a cluster of three whose messages out are scripted, and that
/// records the messages it is handed, in order.
#[derive(Default)]
struct Scripted {
    out: std::collections::VecDeque<(NodeId, replicator::Outbound)>,
    got: Vec<Vec<u8>>,
}
impl Replicator for Scripted {
    fn propose(&mut self, _: Entry) {}
    fn poll_decided(&mut self) -> Option<Decided> {
        None
    }
    fn poll_persist(&mut self) -> Option<Persist> {
        None
    }
    fn poll_send(&mut self) -> Option<(NodeId, replicator::Outbound, bool)> {
        self.out.pop_front().map(|(n, o)| (n, o, false))
    }
    fn snapshot_due(&self) -> bool {
        false
    }
    fn take_snapshot(&mut self, _: &crate::meta::MetaState) {}
    fn handle_decoded(
        &mut self,
        _: NodeId,
        msg: replicator::ConsensusMessage,
        _: Option<&crate::meta::MetaState>,
    ) -> Result<(), crate::wire::FrameError> {
        self.got.push(msg.encode());
        Ok(())
    }
    fn leader(&self) -> Option<NodeId> {
        None
    }
    fn me(&self) -> NodeId {
        1
    }
    fn peers(&self) -> &[NodeId] {
        &[2, 3]
    }
}

/// Consensus messages a cluster of three sends tracker 1, encoded.
fn consensus_messages_to_1() -> Vec<Vec<u8>> {
    let ids = [1, 2, 3];
    let mut reps: Vec<OmniReplicator> =
        ids.iter().map(|&me| OmniReplicator::recover(me, &ids, std::iter::empty()).unwrap()).collect();
    let mut to_1 = Vec::new();
    for step in 0..100u64 {
        for i in 0..3 {
            reps[i].handle_timeout(Millis(step * 10));
            while reps[i].poll_persist().is_some() {}
            while let Some((to, out, _)) = reps[i].poll_send() {
                let bytes = out.into_bytes();
                if to == 1 {
                    to_1.push(bytes.clone());
                }
                let _ = reps[to as usize - 1].handle_message(i as u64 + 1, &bytes);
            }
            while reps[i].poll_decided().is_some() {}
        }
    }
    to_1
}

/// A consensus message that came in parts is decoded by a job, off the
/// event loop; what arrives from that tracker meanwhile waits, and the
/// replicator gets everything in the order it arrived, whichever job
/// finishes first; only a leader election heartbeat goes past. A message
/// broken off when its link closes is freed.
#[test]
fn messages_decoded_off_the_loop_reach_the_log_in_order() {
    use omnipaxos::messages::sequence_paxos::{PaxosMessage as SpMessage, PaxosMsg, PrepareReq};
    // Leader election's messages are 5-15 bytes: parts of 8 split some.
    let part = 8;
    let msgs = consensus_messages_to_1();
    let big: Vec<&Vec<u8>> = msgs.iter().filter(|m| m.len() > part).take(2).collect();
    assert_eq!(big.len(), 2, "two big messages");
    let heartbeat = msgs
        .iter()
        .find(|m| m.len() <= part && replicator::ConsensusMessage::decode(m).unwrap().is_heartbeat())
        .expect("a small heartbeat");
    let ask = omnipaxos::messages::Message::<Entry>::SequencePaxos(SpMessage {
        from: 2,
        to: 1,
        msg: PaxosMsg::PrepareReq(PrepareReq { n: Default::default() }),
    });
    let small = &postcard::to_allocvec(&ask).unwrap();
    assert!(small.len() <= part, "a small message of the log");
    let cfg = TrackerConfig {
        password_params: PasswordParams::INSECURE_FAST,
        peer_keys: [(2, key(2))].into_iter().collect(),
        consensus_part: part,
        ..TrackerConfig::default()
    };
    let mut n = TrackerNode::new(cfg, Rng::from_u64(1), Scripted::default());
    let link = ConnId(12);
    connect(&mut n, link, REMOTE, Millis(1));
    n.handle_secured(link, key(2), Millis(1));
    let mut join = encode(&Message::Hello { protocol_version: PROTOCOL_VERSION, role: Role::Tracker });
    join.extend(encode(&Message::Tracker(TrackerFrame::Join { node: 2 })));
    n.handle_bytes(link, &join, Millis(1));
    let out = drain(&mut n);
    assert!(closed(&out, link).is_none(), "tracker 2's link is taken: {out:?}");
    let in_parts = |xfer: u64, m: &[u8]| -> Vec<u8> {
        let n = m.len().div_ceil(part);
        m.chunks(part)
            .enumerate()
            .flat_map(|(i, c)| {
                encode(&Message::Tracker(TrackerFrame::ConsensusPart { xfer, last: i + 1 == n, bytes: c.to_vec() }))
            })
            .collect()
    };
    let jobs = |outs: Vec<TrackerOutput>| -> Vec<(u64, Job)> {
        outs.into_iter()
            .filter_map(|o| if let TrackerOutput::Work { ticket, job } = o { Some((ticket, job)) } else { None })
            .collect()
    };
    n.handle_bytes(link, &in_parts(1, big[0]), Millis(2));
    let mut first = jobs(drain(&mut n));
    n.handle_bytes(link, &encode(&Message::Tracker(TrackerFrame::Consensus(small.clone()))), Millis(3));
    n.handle_bytes(link, &in_parts(2, big[1]), Millis(4));
    n.handle_bytes(link, &encode(&Message::Tracker(TrackerFrame::Consensus(heartbeat.clone()))), Millis(4));
    let mut second = jobs(drain(&mut n));
    assert_eq!((first.len(), second.len()), (1, 1), "one decode job for each big message");
    assert_eq!(n.replicator().got, vec![heartbeat.clone()], "only the heartbeat passes the first's decode");
    n.replicator.got.clear();
    let (t2, j2) = second.remove(0);
    assert_eq!(j2.kind(), "decode");
    n.handle_job_done(t2, j2.run(), Millis(5));
    drain(&mut n);
    assert!(n.replicator().got.is_empty(), "the second waits for the first");
    let (t1, j1) = first.remove(0);
    n.handle_job_done(t1, j1.run(), Millis(6));
    drain(&mut n);
    assert_eq!(n.replicator().got, vec![big[0].clone(), small.clone(), big[1].clone()]);
    // A job's result that no message waits for changes nothing.
    n.handle_job_done(t1, Job(JobKind::Decode(big[0].clone(), None)).run(), Millis(7));
    assert_eq!(n.replicator().got.len(), 3);
    // A message broken off by its link closing is dropped with it.
    let first_part =
        encode(&Message::Tracker(TrackerFrame::ConsensusPart { xfer: 3, last: false, bytes: big[0][..part].to_vec() }));
    n.handle_bytes(link, &first_part, Millis(8));
    assert_eq!(n.receiving_in_parts().collect::<Vec<_>>(), vec![2], "a message arriving in parts");
    n.handle_closed(link, Millis(9));
    assert_eq!(n.receiving_in_parts().count(), 0, "what it held is freed with its link");
}

/// A sync carrying a snapshot is encoded by a job, off the loop; what the
/// log sends that tracker after it waits and follows it, while pings and
/// other trackers' messages go at once. A job done after the link dropped
/// sends nothing.
#[test]
fn a_snapshot_sync_is_encoded_off_the_loop_and_keeps_its_place() {
    use replicator::{ConsensusMessage, Outbound};
    let msgs = consensus_messages_to_1();
    let m = ConsensusMessage::decode(&msgs[1]).unwrap();
    let small = msgs[0].clone();
    let cfg = TrackerConfig {
        password_params: PasswordParams::INSECURE_FAST,
        peer_keys: [(2, key(2)), (3, key(3))].into_iter().collect(),
        ..TrackerConfig::default()
    };
    let mut n = TrackerNode::new(cfg, Rng::from_u64(1), Scripted::default());
    n.handle_timeout(Millis(1));
    drain(&mut n);
    n.handle_link_up(2, key(2), Millis(2));
    n.handle_link_up(3, key(3), Millis(2));
    drain(&mut n);
    let consensus_to = |outs: &[TrackerOutput], to: NodeId| -> Vec<Vec<u8>> {
        outs.iter()
            .filter_map(|o| match o {
                TrackerOutput::PeerSend { node, bytes } if *node == to => match decode::<Message>(&bytes[4..]) {
                    Ok(Message::Tracker(TrackerFrame::Consensus(b))) => Some(b),
                    _ => None,
                },
                _ => None,
            })
            .collect()
    };
    for round in 0..2 {
        n.replicator.out.extend([
            (2, Outbound::Snapshot(Box::new(m.clone()))),
            (2, Outbound::Encoded(small.clone())),
            (3, Outbound::Encoded(small.clone())),
            (2, Outbound::Heartbeat(vec![7, 7])),
        ]);
        let at = Millis(10 + round * 100);
        n.handle_timeout(at);
        let out = drain(&mut n);
        let mut jobs: Vec<(u64, Job)> = out
            .iter()
            .filter_map(
                |o| if let TrackerOutput::Work { ticket, job } = o { Some((*ticket, job.clone())) } else { None },
            )
            .collect();
        assert_eq!(jobs.len(), 1, "{out:?}");
        assert_eq!(jobs[0].1.kind(), "encode");
        assert_eq!(consensus_to(&out, 2), vec![vec![7, 7]], "nothing to 2 passes the sync but a heartbeat");
        assert_eq!(consensus_to(&out, 3), vec![small.clone()], "3 is not held up");
        let (ticket, job) = jobs.remove(0);
        if round == 1 {
            // The link drops while the job runs: its result is dropped too.
            n.handle_link_down(2, at);
            drain(&mut n);
        }
        n.handle_job_done(ticket, job.run(), at);
        let out = drain(&mut n);
        if round == 0 {
            assert_eq!(consensus_to(&out, 2), vec![m.encode(), small.clone()], "the sync, then what waited");
        } else {
            assert!(consensus_to(&out, 2).is_empty(), "{out:?}");
        }
    }
}

/// Soft state goes between trackers in frames of at most [`SOFT_BATCH`]
/// items, each well under the frame limit even with the longest names;
/// together they carry every item once.
#[test]
fn soft_state_goes_in_bounded_frames() {
    use crate::client::peer::Grant;
    use crate::ids::{MAX_FILE_NAME_LEN, MAX_ID_LEN};
    use crate::proto::{SoftGrant, SoftState};
    let user = UserId::new("u".repeat(MAX_ID_LEN)).unwrap();
    let group = GroupId::new("g".repeat(MAX_ID_LEN)).unwrap();
    let name = FileName::new("f".repeat(MAX_FILE_NAME_LEN)).unwrap();
    let at: SocketAddr = "[2001:db8::1]:65535".parse().unwrap();
    let soft = SoftState {
        leases: (0..3_000u32).map(|i| (SessionToken([i as u8; 16]), u64::MAX - i as u64)).collect(),
        grants: (0..5_000u32)
            .map(|i| {
                let mut g = [0u8; 16];
                g[..4].copy_from_slice(&i.to_le_bytes());
                SoftGrant {
                    grant: Grant(g),
                    user: user.clone(),
                    key: Some(key(2)),
                    group: group.clone(),
                    name: name.clone(),
                    ttl_ms: u64::MAX,
                }
            })
            .collect(),
        partial: (0..1_000).map(|_| (group.clone(), name.clone(), at, user.clone())).collect(),
        transfers: (0..1_000u16)
            .map(|i| super::health::Transfer {
                listen: SocketAddr::new(at.ip(), i),
                user: user.clone(),
                group: group.clone(),
                name: name.clone(),
                size: u64::MAX,
                done: u64::MAX,
                rate: u64::MAX,
                sources: vec![(at, u64::MAX); super::health::MAX_PROGRESS_SOURCES],
                ttl_ms: u64::MAX,
            })
            .collect(),
    };
    let frames = super::soft::soft_frames(soft.clone());
    assert!(frames.len() >= 9_000usize.div_ceil(SOFT_BATCH), "{} frames", frames.len());
    let mut back = SoftState::default();
    for f in &frames {
        assert!(f.len() <= 1024 * 1024 && f.len() <= MAX_TRACKER_FRAME, "a frame of {} bytes", f.len());
        let Ok(Message::Tracker(TrackerFrame::Soft(s))) = decode::<Message>(&f[4..]) else { panic!("not soft state") };
        assert!(s.leases.len() + s.grants.len() + s.partial.len() + 4 * s.transfers.len() <= SOFT_BATCH);
        back.transfers.extend(s.transfers);
        back.leases.extend(s.leases);
        back.grants.extend(s.grants);
        back.partial.extend(s.partial);
    }
    let key_of = |g: &SoftGrant| g.grant.0;
    let (mut a, mut b) = (soft.clone(), back);
    a.leases.sort();
    b.leases.sort();
    a.grants.sort_by_key(key_of);
    b.grants.sort_by_key(key_of);
    a.transfers.sort_by_key(|t| t.listen);
    b.transfers.sort_by_key(|t| t.listen);
    assert_eq!(a, b, "every item, once");
    assert_eq!(super::soft::soft_frames(SoftState::default()).len(), 1, "nothing to say is one empty frame");
}

/// A tracker's link may carry frames up to [`MAX_TRACKER_FRAME`]; one that
/// declares more is refused before it is read.
#[test]
fn a_frame_over_the_tracker_limit_closes_the_link() {
    for (declared, refused) in [(MAX_TRACKER_FRAME, false), (MAX_TRACKER_FRAME + 1, true)] {
        let mut n = linked_node();
        let link = ConnId(12);
        connect(&mut n, link, REMOTE, Millis(1));
        n.handle_secured(link, key(2), Millis(1));
        let mut bytes = encode(&Message::Hello { protocol_version: PROTOCOL_VERSION, role: Role::Tracker });
        bytes.extend(encode(&Message::Tracker(TrackerFrame::Join { node: 2 })));
        bytes.extend((declared as u32).to_be_bytes());
        n.handle_bytes(link, &bytes, Millis(1));
        let out = drain(&mut n);
        assert_eq!(closed(&out, link).is_some(), refused, "{declared} bytes declared: {out:?}");
    }
}

/// A sync that carries a snapshot is offered, its base state named by its
/// hash. A transfer that breaks off keeps what it got of the base, and the
/// sync sent again on the next link (here built later: more entries on top,
/// as when the cluster commits meanwhile) resumes from there; the message
/// handed over is the one sent, its entries applied. What was kept of one
/// base is never used for another, nor kept for long; what is kept beside
/// the log resumes a receiver that restarted; a base that does not match
/// its hash is refused; a sync of one part is not offered.
#[test]
fn a_snapshot_sync_that_broke_off_resumes_where_it_stopped() {
    use replicator::{ConsensusMessage, Outbound};
    let part = 4096;
    let cfg = || TrackerConfig {
        password_params: PasswordParams::INSECURE_FAST,
        peer_keys: [(2, key(2)), (3, key(3))].into_iter().collect(),
        consensus_part: part,
        ..TrackerConfig::default()
    };
    // The sender, with its link to tracker 2 up; the receiver plays
    // tracker 2's part: it takes 2's link, and answers on its own.
    let mut s = TrackerNode::new(cfg(), Rng::from_u64(1), Scripted::default());
    let mut r = TrackerNode::new(cfg(), Rng::from_u64(2), Scripted::default());
    let link_up = |s: &mut TrackerNode<Scripted>, r: &mut TrackerNode<Scripted>, link: ConnId, at: Millis| {
        // Each redials at its timeout (the backoff is long past: `at` goes
        // up 10 s a step), and the dial succeeds.
        s.handle_timeout(at);
        drain(s);
        s.handle_link_up(2, key(2), at);
        drain(s);
        r.handle_timeout(at);
        drain(r);
        r.handle_link_up(2, key(2), at);
        connect(r, link, REMOTE, at);
        r.handle_secured(link, key(2), at);
        let mut join = encode(&Message::Hello { protocol_version: PROTOCOL_VERSION, role: Role::Tracker });
        join.extend(encode(&Message::Tracker(TrackerFrame::Join { node: 2 })));
        r.handle_bytes(link, &join, at);
        let out = drain(r);
        assert!(closed(&out, link).is_none(), "the link is taken: {out:?}");
    };
    let link_down = |s: &mut TrackerNode<Scripted>, r: &mut TrackerNode<Scripted>, link: ConnId, at: Millis| {
        s.handle_link_down(2, at);
        drain(s);
        r.handle_closed(link, at);
        r.handle_link_down(2, at);
        drain(r);
    };
    // Offers `m`, and carries the sender's frames to the receiver and its
    // answers back, until `cut` parts went (the link breaks) or none is
    // left; returns the part bytes carried.
    // What the receiver keeps beside its log (`SavePartial`).
    let saved = std::cell::RefCell::new(Vec::<u8>::new());
    let send = |s: &mut TrackerNode<Scripted>,
                r: &mut TrackerNode<Scripted>,
                link: ConnId,
                m: &ConsensusMessage,
                at: Millis,
                cut: Option<usize>| {
        s.replicator.out.push_back((2, Outbound::Snapshot(Box::new(m.clone()))));
        s.handle_timeout(at);
        let mut pending = drain(s);
        let (mut parts, mut carried) = (0, 0);
        while !pending.is_empty() {
            for o in std::mem::take(&mut pending) {
                match o {
                    TrackerOutput::Work { ticket, job } => {
                        s.handle_job_done(ticket, job.run(), at);
                        pending.extend(drain(s));
                    }
                    TrackerOutput::PeerSend { node: 2, bytes } => {
                        if let Ok(Message::Tracker(TrackerFrame::ConsensusPart { bytes: b, .. })) =
                            decode::<Message>(&bytes[4..])
                        {
                            if cut == Some(parts) {
                                return carried;
                            }
                            parts += 1;
                            carried += b.len();
                        }
                        r.handle_bytes(link, &bytes, at);
                        for back in drain(r) {
                            match back {
                                TrackerOutput::PeerSend { node: 2, bytes } => match decode::<Message>(&bytes[4..]) {
                                    Ok(Message::Tracker(TrackerFrame::ConsensusAck { bytes, .. })) => {
                                        s.handle_consensus_ack(2, bytes)
                                    }
                                    Ok(Message::Tracker(TrackerFrame::ConsensusResume { xfer, from })) => {
                                        s.handle_consensus_resume(2, xfer, from)
                                    }
                                    other => panic!("unexpected answer {other:?}"),
                                },
                                TrackerOutput::Work { ticket, job } => {
                                    assert_eq!(job.kind(), "decode");
                                    r.handle_job_done(ticket, job.run(), at);
                                    drain(r);
                                }
                                TrackerOutput::Close { conn } => panic!("the receiver closed {conn:?}"),
                                TrackerOutput::SavePartial { offset, bytes, .. } => {
                                    let mut kept = saved.borrow_mut();
                                    assert!(offset as usize <= kept.len(), "saved in order");
                                    kept.truncate(offset as usize);
                                    kept.extend(bytes);
                                }
                                TrackerOutput::DropPartial => saved.borrow_mut().clear(),
                                _ => {}
                            }
                        }
                        pending.extend(drain(s));
                    }
                    _ => {}
                }
            }
        }
        carried
    };
    let (first, _) = ConsensusMessage::test_sync(0..2_000, 2_000..2_010);
    let (later, later_folded) = ConsensusMessage::test_sync(0..2_000, 2_000..2_060);
    let (other, other_folded) = ConsensusMessage::test_sync(0..2_001, 2_001..2_010);
    let (whole, base) = later.clone().encode_with_base(part);
    let base = base.expect("a complete snapshot has a base");
    assert!(base.len > 20 * part && whole.len() > base.len, "the base spans many parts: {base:?}");

    let t = |k: u64| Millis(k * 10_000);
    link_up(&mut s, &mut r, ConnId(10), t(1));
    let got = send(&mut s, &mut r, ConnId(10), &first, t(1), Some(12));
    assert_eq!(got, 12 * part);
    assert!(r.replicator().got.is_empty(), "the first transfer broke off");
    link_down(&mut s, &mut r, ConnId(10), t(1));
    assert_eq!(r.receiving_in_parts().count(), 0);

    link_up(&mut s, &mut r, ConnId(11), t(2));
    let sent = send(&mut s, &mut r, ConnId(11), &later, t(2), None);
    assert_eq!(r.resumed_bytes(), got as u64, "the second resumed after what the first carried");
    assert_eq!(sent, whole.len() - got, "only the rest was sent");
    assert_eq!(r.replicator().got, vec![later_folded.encode()], "the message sent, its entries applied");

    // Broken off again, then a sync on another base: it starts at 0.
    link_down(&mut s, &mut r, ConnId(11), t(2));
    link_up(&mut s, &mut r, ConnId(12), t(3));
    send(&mut s, &mut r, ConnId(12), &first, t(3), Some(5));
    link_down(&mut s, &mut r, ConnId(12), t(3));
    link_up(&mut s, &mut r, ConnId(13), t(4));
    let (other_whole, _) = other.clone().encode_with_base(part);
    let sent = send(&mut s, &mut r, ConnId(13), &other, t(4), None);
    assert_eq!(sent, other_whole.len(), "nothing kept of another base is used");
    assert_eq!(r.resumed_bytes(), got as u64);
    assert_eq!(r.replicator().got.last(), Some(&other_folded.encode()));

    // A partial base is freed once no sync resumed it in time.
    link_down(&mut s, &mut r, ConnId(13), t(4));
    link_up(&mut s, &mut r, ConnId(14), t(5));
    send(&mut s, &mut r, ConnId(14), &first, t(5), Some(5));
    link_down(&mut s, &mut r, ConnId(14), t(5));
    let late = t(6).plus(super::stream::KEEP_PARTIAL);
    r.handle_timeout(late);
    drain(&mut r);
    link_up(&mut s, &mut r, ConnId(15), late);
    send(&mut s, &mut r, ConnId(15), &first, late, None);
    assert_eq!(r.resumed_bytes(), got as u64, "nothing was kept past its time");
    assert_eq!(r.replicator().got.len(), 3, "and the sync came whole");

    // A receiver that crashes mid-stream resumes after what it kept beside
    // its log; once the sync is whole, that is removed.
    link_down(&mut s, &mut r, ConnId(15), late);
    let later_on = late.plus(t(1));
    link_up(&mut s, &mut r, ConnId(16), later_on);
    send(&mut s, &mut r, ConnId(16), &first, later_on, Some(7));
    assert_eq!(saved.borrow().len(), 7 * part, "each part of the base is kept as it comes");
    assert_eq!(&saved.borrow()[..], &whole[..7 * part]);
    let mut r = TrackerNode::new(cfg(), Rng::from_u64(3), Scripted::default());
    r.restore_partial(base.digest, saved.borrow().clone());
    s.handle_link_down(2, later_on);
    drain(&mut s);
    let restarted = later_on.plus(t(1));
    link_up(&mut s, &mut r, ConnId(17), restarted);
    let sent = send(&mut s, &mut r, ConnId(17), &later, restarted, None);
    assert_eq!((r.resumed_bytes(), sent), (7 * part as u64, whole.len() - 7 * part), "resumed after a restart");
    assert_eq!(r.replicator().got, vec![later_folded.encode()]);
    assert!(saved.borrow().is_empty(), "what was kept is removed once the sync is whole");

    // A sync of one part goes whole: an offer would only cost a round trip.
    let (small, _) = ConsensusMessage::test_sync(0..3, 3..4);
    assert_eq!(small.clone().encode_with_base(part), (small.encode(), None));

    // The decoding job checks the base against its hash.
    let mut bad = whole.clone();
    bad[base.len / 2] ^= 1;
    assert!(ConsensusMessage::decode_with_base(&bad, Some(base)).is_err(), "a tampered base is refused");
    assert!(ConsensusMessage::decode_with_base(&whole[..base.len - 1], Some(base)).is_err());
    assert!(ConsensusMessage::decode_with_base(&whole, Some(base)).is_ok());
}

/// Downloads' progress reports: kept for members only, within bounds, with
/// the address the tracker sees (not one the client names), gossiped to
/// the other trackers, and forgotten once not renewed; the counters see
/// the writes, reads, grants and refusals.
#[test]
fn progress_reports_are_kept_for_members_bounded_and_expire() {
    use super::health::{MAX_PROGRESS_SOURCES, TRANSFER_TTL};
    let mut n = node();
    let mut seq = 0;
    let tokens = group_sharing_a_file(&mut n, &mut seq, &["bob"]);
    let g = GroupId::new("g").unwrap();
    let name = FileName::new("f.bin").unwrap();
    let src: SocketAddr = "10.0.0.1:9000".parse().unwrap();
    let report = |done: u64, sources: usize| Request::Progress {
        group: g.clone(),
        name: name.clone(),
        size: 10,
        done,
        rate: 5,
        sources: vec![(src, done); sources],
    };
    // Eve is no member: her report is refused, and nothing is shown.
    assert_eq!(ask(&mut n, &mut seq, ConnId(3), Some(tokens[2]), report(5, 1)), Err(ApiError::NotMember));
    assert!(n.transfers(Millis(10)).is_empty());
    assert!(matches!(ask(&mut n, &mut seq, ConnId(2), Some(tokens[1]), report(11, 1)), Err(ApiError::InvalidFile(_))));
    assert!(matches!(
        ask(&mut n, &mut seq, ConnId(2), Some(tokens[1]), report(5, MAX_PROGRESS_SOURCES + 1)),
        Err(ApiError::Limit(_))
    ));
    assert_eq!(ask(&mut n, &mut seq, ConnId(2), Some(tokens[1]), report(5, 1)), Ok(Reply::Done));
    let shown = n.transfers(Millis(10));
    assert_eq!(shown.len(), 1);
    let t = &shown[0];
    assert_eq!((t.user.as_str(), t.listen), ("bob", "10.0.0.2:9000".parse().unwrap()));
    assert_eq!((t.done, t.size, t.sources.clone()), (5, 10, vec![(src, 5)]));
    // A newer report replaces it; one not renewed is forgotten.
    assert_eq!(ask(&mut n, &mut seq, ConnId(2), Some(tokens[1]), report(8, 1)), Ok(Reply::Done));
    assert_eq!(n.transfers(Millis(10))[0].done, 8);
    let later = Millis(10 + TRANSFER_TTL.0);
    assert!(n.transfers(later).is_empty());
    sweep(&mut n, later);
    assert!(n.transfers.is_empty(), "swept");

    // Gossiped, another tracker keeps it within the same bounds.
    let mut other = node();
    use crate::proto::SoftState;
    let soft = |sources: usize| SoftState {
        transfers: vec![super::health::Transfer { sources: vec![(src, 1); sources], ..t.clone() }],
        ..Default::default()
    };
    other.merge_soft(soft(MAX_PROGRESS_SOURCES + 1), Millis(0));
    assert!(other.transfers(Millis(0)).is_empty());
    other.merge_soft(soft(1), Millis(0));
    assert_eq!(other.transfers(Millis(0)).len(), 1);

    let c = n.counters().clone();
    assert!(c.writes >= 9, "accounts, sessions, the group, the join and the file: {c:?}");
    assert!(c.reads >= 4, "{c:?}");
    assert_eq!(c.refusals.get("not_member"), Some(&1));
    assert_eq!(c.refusals.get("invalid_file"), Some(&1));
    assert_eq!(c.refusals.get("limit"), Some(&1));
    assert_eq!(n.take_write_latencies().len() as u64, c.writes, "every decided write's latency, once");
    assert!(n.take_write_latencies().is_empty());
    let dl = Request::DownloadFile { group: g, name };
    assert!(ask(&mut n, &mut seq, ConnId(2), Some(tokens[1]), dl).is_ok());
    assert_eq!(n.counters().grants, 1);
}
