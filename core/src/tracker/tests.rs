use super::*;
use crate::ids::{GroupId, UserId};
use crate::wire::decode;

fn node() -> TrackerNode {
    let cfg = TrackerConfig { password_params: PasswordParams::INSECURE_FAST, ..TrackerConfig::default() };
    TrackerNode::new(cfg, Rng::from_u64(1), SoloReplicator::default())
}

fn drain(n: &mut TrackerNode) -> Vec<TrackerOutput> {
    std::iter::from_fn(|| n.poll_output()).collect()
}

fn hello() -> Vec<u8> {
    encode(&Message::Hello { protocol_version: PROTOCOL_VERSION, role: Role::Client })
}

fn req(seq: u64, session: Option<SessionToken>, body: Request) -> Vec<u8> {
    encode(&Message::Request { id: RequestId { client: 7, seq }, session, body })
}

fn answer(outs: &[TrackerOutput]) -> Result<Reply, ApiError> {
    match outs {
        [TrackerOutput::Transmit { bytes, .. }] => match decode(&bytes[4..]).unwrap() {
            Message::Response { result, .. } => result,
            m => panic!("unexpected {m:?}"),
        },
        o => panic!("expected one response, got {o:?}"),
    }
}

const C: ConnId = ConnId(1);

#[test]
fn requests_before_hello_are_refused_and_the_connection_closed() {
    let mut n = node();
    n.handle_connected(C, Millis(0));
    n.handle_bytes(C, &req(1, None, Request::ListGroups), Millis(0));
    let out = drain(&mut n);
    assert!(matches!(out.last(), Some(TrackerOutput::Close { conn: C })));
    assert_eq!(n.connections(), 0);
}

#[test]
fn garbage_and_huge_frames_close_only_that_connection() {
    let mut n = node();
    n.handle_connected(C, Millis(0));
    n.handle_connected(ConnId(2), Millis(0));
    n.handle_bytes(ConnId(2), &hello(), Millis(0));
    n.handle_bytes(C, &[0xff, 0xff, 0xff, 0xff, 1, 2, 3], Millis(0));
    assert!(matches!(drain(&mut n).last(), Some(TrackerOutput::Close { conn: C })));
    n.handle_bytes(ConnId(2), &req(1, None, Request::ListGroups), Millis(0));
    assert_eq!(answer(&drain(&mut n)), Err(ApiError::NotLoggedIn));
}

#[test]
fn a_session_works_and_its_lease_decides_liveness() {
    let mut n = node();
    n.handle_connected(C, Millis(0));
    let mut bytes = hello();
    bytes.extend(req(1, None, Request::CreateUser { user: UserId::new("al").unwrap(), password: "pw".into() }));
    n.handle_bytes(C, &bytes, Millis(0));
    assert_eq!(answer(&drain(&mut n)), Ok(Reply::Done));
    let listen = "127.0.0.1:9000".parse().unwrap();
    let wrong = Request::Login { user: UserId::new("al").unwrap(), password: "px".into(), listen };
    n.handle_bytes(C, &req(2, None, wrong), Millis(0));
    assert_eq!(answer(&drain(&mut n)), Err(ApiError::BadCredentials));
    let nobody = Request::Login { user: UserId::new("zed").unwrap(), password: "pw".into(), listen };
    n.handle_bytes(C, &req(3, None, nobody), Millis(0));
    assert_eq!(answer(&drain(&mut n)), Err(ApiError::BadCredentials), "same answer for a missing user");
    let login = Request::Login { user: UserId::new("al").unwrap(), password: "pw".into(), listen };
    n.handle_bytes(C, &req(4, None, login), Millis(0));
    let Ok(Reply::Session { token }) = answer(&drain(&mut n)) else { panic!("no session") };
    let g = GroupId::new("g").unwrap();
    n.handle_bytes(C, &req(5, Some(token), Request::CreateGroup { group: g.clone() }), Millis(0));
    assert_eq!(answer(&drain(&mut n)), Ok(Reply::Done));
    let sharer = Sharer { user: UserId::new("al").unwrap(), listen };
    assert!(n.is_live(&sharer, Millis(1000)));
    assert!(!n.is_live(&sharer, Millis(60_000)), "a silent client's lease runs out");
}
