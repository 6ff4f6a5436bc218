//! The tracker server over real loopback sockets.

use std::io::{Read, Write};
use std::time::Duration;

use shoal_core::meta::PasswordParams;
use shoal_core::proto::{Message, Request, RequestId, Role, PROTOCOL_VERSION};
use shoal_core::rng::Rng;
use shoal_core::tracker::{SoloReplicator, TrackerConfig, TrackerNode};
use shoal_core::wire::{encode, FrameDecoder};
use shoal_net_mio::tls::{connect_blocking, Identity, TlsStream};
use shoal_net_mio::tracker::TrackerServer;

/// A TLS connection to the tracker (None if it hung up during the handshake).
fn connect(addr: std::net::SocketAddr) -> Option<TlsStream> {
    connect_blocking(addr, &Identity::ephemeral().unwrap(), Duration::from_secs(30)).ok().map(|(s, _)| s)
}

fn start(max: usize) -> std::net::SocketAddr {
    let cfg = TrackerConfig { password_params: PasswordParams::INSECURE_FAST, ..TrackerConfig::default() };
    let node = TrackerNode::new(cfg, Rng::from_u64(1), SoloReplicator::default());
    let server = TrackerServer::bind("127.0.0.1:0".parse().unwrap(), node, &Identity::ephemeral().unwrap())
        .unwrap()
        .with_max_connections(max);
    let addr = server.local_addr().unwrap();
    // The server thread ends with the test process.
    std::thread::spawn(move || server.run());
    addr
}

/// Sends a request and waits for its answer; None if the tracker hung up.
fn ask(s: &mut TlsStream) -> Option<Message> {
    let hello = encode(&Message::Hello { protocol_version: PROTOCOL_VERSION, role: Role::Client });
    let req = encode(&Message::Request {
        id: RequestId { client: 1, seq: 1 },
        settled_below: 0,
        session: None,
        body: Request::ListGroups,
    });
    if s.write_all(&hello).and_then(|_| s.write_all(&req)).is_err() {
        return None;
    }
    let mut dec = FrameDecoder::new(1 << 20);
    let mut buf = [0u8; 1024];
    loop {
        if let Ok(Some(m)) = dec.next_message::<Message>() {
            return Some(m);
        }
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return None,
            Ok(n) => dec.push(&buf[..n]),
        }
    }
}

#[test]
fn connections_over_the_limit_are_refused_and_the_rest_served() {
    let addr = start(3);
    let mut held: Vec<TlsStream> = (0..3).map(|_| connect(addr).unwrap()).collect();
    // Each of the three is served.
    for s in held.iter_mut() {
        assert!(matches!(ask(s), Some(Message::Response { .. })));
    }
    // A fourth is accepted by the kernel, then dropped by the tracker at once.
    let extra = connect(addr);
    assert!(extra.is_none_or(|mut s| ask(&mut s).is_none()), "over the limit, the tracker hangs up");
    // Closing one makes room again.
    drop(held.pop());
    let mut again = None;
    for _ in 0..100 {
        let Some(mut s) = connect(addr) else { continue };
        if let Some(m) = ask(&mut s) {
            again = Some(m);
            break;
        }
    }
    assert!(matches!(again, Some(Message::Response { .. })));
}
