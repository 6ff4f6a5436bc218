//! Who may be whom, against the real binaries: trackers are known by key, and
//! a client sends nothing to a tracker that does not prove the key it expects.
//! Each attack gets a clear refusal, and the cluster keeps serving.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::thread::JoinHandle;

use shoal_core::proto::{Message, Role, SoftState, TrackerFrame, PROTOCOL_VERSION};
use shoal_core::wire::{encode, FrameDecoder};
use shoal_net_mio::tls::Identity;
use support::*;

/// A TLS server with a key of its own at `listener`, standing in for a real
/// node: it completes the handshake with whoever calls and counts the
/// plaintext bytes each sends before hanging up. Stops after `calls`.
fn impostor(listener: TcpListener, calls: usize) -> JoinHandle<Vec<usize>> {
    let cfg = Identity::ephemeral().unwrap().server_config().unwrap();
    std::thread::spawn(move || {
        let mut got = Vec::new();
        for _ in 0..calls {
            let Ok((sock, _)) = listener.accept() else { break };
            sock.set_read_timeout(Some(WAIT)).unwrap();
            let conn = rustls::ServerConnection::new(Arc::clone(&cfg)).unwrap();
            let mut s = rustls::StreamOwned::new(conn, sock);
            let mut n = 0;
            let mut buf = [0u8; 4096];
            loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(k) => n += k,
                }
            }
            got.push(n);
        }
        got
    })
}

/// The first `Refused` reason on `s`, if it says one before closing.
fn refusal(s: &mut impl Read) -> Option<String> {
    let mut dec = FrameDecoder::new(1 << 20);
    let mut buf = [0u8; 4096];
    loop {
        while let Ok(Some(m)) = dec.next_message::<Message>() {
            if let Message::Refused { reason } = m {
                return Some(reason);
            }
        }
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return None,
            Ok(n) => dec.push(&buf[..n]),
        }
    }
}

#[test]
fn a_process_with_its_own_key_cannot_pose_as_tracker_2() {
    let dir = TempDir::new("pose");
    let addrs: Vec<SocketAddr> = (0..3).map(|_| format!("127.0.0.1:{}", free_port()).parse().unwrap()).collect();
    let info = tracker_info(dir.path(), &addrs);
    let mut trackers: Vec<Tracker> = (1..=3).map(|id| Tracker::start(&info, id)).collect();
    let mut c = Client::start("c", &info);
    c.expect("create_user u pw", &["user u created"]);
    c.expect("login u pw", &["logged in as u"]);
    c.expect("create_group g1", &["group g1 created"]);

    // It calls tracker 1 as tracker 2 and sends what a tracker would: the
    // link is refused, with a reason, before its soft state is read.
    let mut s = tls_connect(addrs[0]);
    s.write_all(&encode(&Message::Hello { protocol_version: PROTOCOL_VERSION, role: Role::Tracker })).unwrap();
    s.write_all(&encode(&Message::Tracker(TrackerFrame::Join { node: 2 }))).unwrap();
    let _ = s.write_all(&encode(&Message::Tracker(TrackerFrame::Soft(SoftState::default()))));
    assert_eq!(refusal(&mut s).as_deref(), Some("not a tracker of this cluster"));

    // Tracker 2 dies and it takes its address: the others' links reach it,
    // prove it is someone else, and hang up without a byte.
    trackers[1].kill();
    let fake = impostor(TcpListener::bind(addrs[1]).unwrap(), 2);
    let sent = fake.join().unwrap();
    assert_eq!(sent, vec![0, 0], "bytes sent to the impostor on each link");

    // The two real trackers are a majority and go on taking writes.
    c.expect("create_group g2", &["group g2 created"]);
    assert!(trackers[0].is_running() && trackers[2].is_running());

    // Its own tracker binary, with another key, cannot start as tracker 2.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tracker"))
        .arg(&info)
        .arg("2")
        .arg("--data-dir")
        .arg(dir.path().join("evil-2"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another tracker 2 exists"), "{err}");
}

#[test]
fn a_client_sends_nothing_to_a_tracker_with_another_key() {
    let dir = TempDir::new("mitm");
    let real: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let info = tracker_info(dir.path(), &[real]);
    let mut tracker = Tracker::start(&info, 1);
    let key = tracker.wait_for("key id: ").trim_start_matches("key id: ").to_string();

    // A man in the middle answers at another address; the client's
    // tracker_info names that address with the real tracker's key.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mitm = listener.local_addr().unwrap();
    let fake = impostor(listener, 1);
    let sub = dir.path().join("client");
    std::fs::create_dir_all(&sub).unwrap();
    let pinned = sub.join("tracker_info.txt");
    std::fs::write(&pinned, format!("{} {} {key}\n", mitm.ip(), mitm.port())).unwrap();
    let mut c = Client::start("c", &pinned);
    let said = c.answer("login u secret");
    assert!(said.starts_with(&format!("error: tracker {mitm} proved key ")), "{said}");
    assert!(said.ends_with(&format!(", not {key} (the key tracker_info pins): sent it nothing")), "{said}");
    assert_eq!(fake.join().unwrap(), vec![0], "plaintext the impostor received");
    drop(c);

    // The same client pointed at the real tracker (pinned) works.
    std::fs::write(&pinned, format!("{} {} {key}\n", real.ip(), real.port())).unwrap();
    let mut c = Client::start("c2", &pinned);
    c.expect("create_user u secret", &["user u created"]);
    c.expect("login u secret", &["logged in as u"]);
    assert!(tracker.is_running());
}
