//! End to end: the real tracker and clients on loopback, every shell command,
//! its successes and its refusals.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};

use shoal_core::chunk::Sha1Digest;
use support::*;

fn cluster(tag: &str) -> (TempDir, std::path::PathBuf, Tracker) {
    let dir = TempDir::new(tag);
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let info = tracker_info(dir.path(), &[addr]);
    let tracker = Tracker::start(&info, 1);
    (dir, info, tracker)
}

#[test]
fn every_command_with_its_refusals() {
    let (dir, info, _tracker) = cluster("walk");
    let content: Vec<u8> = (0..1_000_000u32).map(|i| (i * 7 % 253) as u8).collect();
    let sha = Sha1Digest::of(&content).to_hex();
    let (da, db, dc) = (dir.path().join("a"), dir.path().join("b"), dir.path().join("c"));
    for d in [&da, &db, &dc] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(da.join("f.bin"), &content).unwrap();
    std::fs::write(db.join("f.bin"), &content).unwrap();
    std::fs::write(dc.join("f.bin"), b"something else").unwrap();
    let (fa, fb, fc) = (da.join("f.bin"), db.join("f.bin"), dc.join("f.bin"));
    let (fa, fb, fc) = (fa.display(), fb.display(), fc.display());

    let mut a = Client::start("alice", &info);
    let mut b = Client::start("bob", &info);
    let mut c = Client::start("carol", &info);

    // Accounts and sessions.
    a.expect("list_groups", &["error: not logged in"]);
    a.expect("create_user alice pw", &["user alice created"]);
    a.expect("create_user alice other", &["error: user already exists"]);
    a.expect("login alice wrong", &["error: wrong user id or password"]);
    a.expect("login nobody pw", &["error: wrong user id or password"]);
    a.expect("login alice pw", &["logged in as alice"]);
    a.expect("login alice pw", &["error: already logged in as alice; log out first"]);
    // Shell refusals.
    a.expect("login alice", &["error: usage: login <user_id> <passwd>"]);
    a.expect("frobnicate now", &["error: unknown command 'frobnicate' (type 'help' for the list)"]);
    a.expect("create_group bad/id", &["error: bad group id: an id must be 1-64 characters*"]);
    a.expect(&format!("create_group {}", "g".repeat(65)), &["error: bad group id*"]);
    a.expect(&format!("create_group {}", "x".repeat(70 * 1024)), &["error: input line longer than 65536 bytes"]);
    a.expect("stop_share g1 ../../etc/passwd", &["error: bad file name*"]);
    // Groups.
    a.expect("create_group g1", &["group g1 created"]);
    a.expect("create_group g1", &["error: group already exists"]);
    b.expect("create_user bob pw", &["user bob created"]);
    b.expect("login bob pw", &["logged in as bob"]);
    c.expect("create_user carol pw", &["user carol created"]);
    c.expect("login carol pw", &["logged in as carol"]);
    b.expect("list_groups", &["g1 owner=alice members=1"]);
    b.expect("list_my_groups", &["you belong to no group"]);
    b.expect("list_files g1", &["error: not a member of this group"]);
    b.expect(&format!("upload_file {fb} g1"), &["error: not a member of this group"]);
    b.expect("download_file g1 f.bin /tmp", &["error: not a member of this group"]);
    b.expect("join_group nosuch", &["error: no such group"]);
    b.expect("join_group g1", &["join request sent to g1"]);
    b.expect("join_group g1", &["error: a join request for this group is already pending"]);
    a.expect("join_group g1", &["error: already a member of this group"]);
    c.expect("join_group g1", &["join request sent to g1"]);
    b.expect("list_requests g1", &["error: only the group's owner may do that"]);
    b.expect("accept_request g1 carol", &["error: only the group's owner may do that"]);
    a.expect("list_requests g1", &["bob", "carol"]);
    a.expect("reject_request g1 carol", &["request of carol to join g1 rejected"]);
    a.expect("accept_request g1 bob", &["bob is now a member of g1"]);
    a.expect("accept_request g1 bob", &["error: no pending request from that user"]);
    a.expect("list_requests g1", &["no pending requests for g1"]);
    b.expect("list_my_groups", &["g1"]);
    a.expect("list_my_groups", &["g1 (owner)"]);
    a.expect("list_groups", &["g1 owner=alice members=2"]);
    // Files.
    a.expect("list_files g1", &["no files in g1"]);
    a.expect(&format!("upload_file {fa} g1"), &[&format!("shared f.bin in g1: 1000000 bytes, 2 chunks, sha1 {sha}")]);
    b.expect(&format!("upload_file {fb} g1"), &[&format!("shared f.bin in g1: 1000000 bytes, 2 chunks, sha1 {sha}")]);
    b.expect("list_files g1", &["f.bin 1000000 bytes 2 peers"]);
    c.expect("list_files g1", &["error: not a member of this group"]);
    a.expect("accept_request g1 carol", &["error: no pending request from that user"]);
    c.expect("join_group g1", &["join request sent to g1"]);
    a.expect("accept_request g1 carol", &["carol is now a member of g1"]);
    c.expect(
        &format!("upload_file {fc} g1"),
        &["error: a different file with that name is already shared in this group"],
    );
    a.expect(&format!("upload_file {}/missing.bin g1", dir.path().display()), &["error: cannot read *"]);
    a.expect(&format!("upload_file {} g1", dir.path().display()), &["error: cannot read*"]);
    b.expect("download_file g1 nosuch.bin /tmp", &["error: no such file in this group"]);
    b.expect("download_file g1 f.bin /tmp", &["error: this client already has f.bin of g1"]);
    b.expect("show_downloads", &["no downloads"]);
    a.expect("stop_share g1 f.bin", &["stopped sharing f.bin in g1"]);
    a.expect("stop_share g1 f.bin", &["error: this client does not share that file"]);
    c.expect("list_files g1", &["f.bin 1000000 bytes 1 peer"]);
    // Logout stops sharing until the next login.
    b.expect("logout", &["logged out"]);
    b.expect("list_files g1", &["error: not logged in"]);
    c.expect("list_files g1", &["f.bin 1000000 bytes 0 peers"]);
    b.expect("login bob pw", &["logged in as bob"]);
    c.expect("list_files g1", &["f.bin 1000000 bytes 1 peer"]);
    b.expect("stop_share g1 f.bin", &["stopped sharing f.bin in g1"]);
    c.expect("list_files g1", &["no files in g1"]);
    // Leaving: ownership passes to the longest-standing member, an empty group goes.
    a.expect("leave_group g1", &["left g1; bob owns it now"]);
    a.expect("list_requests g1", &["error: only the group's owner may do that"]);
    a.expect("leave_group g1", &["error: not a member of this group"]);
    b.expect("list_groups", &["g1 owner=bob members=2"]);
    c.expect("leave_group g1", &["left g1"]);
    b.expect("leave_group g1", &["left g1; it had no members left and was deleted"]);
    b.expect("list_groups", &["no groups"]);
    b.expect("help", &["create_user <user_id> <passwd>*"]);
    let _rest = b.lines(shoal_core::shell::COMMANDS.len() - 1);
    // exit logs out and ends the client; alice had failures, so status 1.
    a.expect("exit", &["bye"]);
    assert_eq!(a.finish().code(), Some(1));
    b.expect("exit", &["bye"]);
    assert_eq!(b.finish().code(), Some(1));
    // End of input logs out too; carol's run had a failure.
    assert_eq!(c.finish().code(), Some(1));
}

/// Piped stdin as scripts use it: stdout for results, stderr for errors, the
/// exit status says whether every command succeeded.
#[test]
fn piped_scripts_report_on_stdout_stderr_and_status() {
    let (_dir, info, _tracker) = cluster("piped");
    let run = |script: &str| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_client"))
            .arg("127.0.0.1:0")
            .arg(&info)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        (String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap(), out.status.code())
    };
    let (out, err, code) = run("create_user dana pw\nlogin dana pw\n\ncreate_group gd\nlist_my_groups\n");
    assert_eq!(out, "user dana created\nlogged in as dana\ngroup gd created\ngd (owner)\n");
    assert_eq!(err, "");
    assert_eq!(code, Some(0));
    let (out, err, code) = run("login dana pw\ncreate_group gd\nlist_groups\nexit\nlist_groups\n");
    assert_eq!(out, "logged in as dana\ngd owner=dana members=1\nbye\n", "nothing runs after exit");
    assert_eq!(err, "error: group already exists\n");
    assert_eq!(code, Some(1));
}

/// Random bytes, a 4 GiB length prefix, a half frame then a hang-up: the
/// tracker drops those connections and keeps serving everyone else.
#[test]
fn tracker_survives_garbage_on_its_port() {
    let (_dir, info, mut tracker) = cluster("garbage");
    let mut good = Client::start("good", &info);
    good.expect("create_user erin pw", &["user erin created"]);

    let mut x: u64 = 0x9e3779b97f4a7c15;
    let random: Vec<u8> = (0..64 * 1024)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let mut junk = TcpStream::connect(tracker.addr).unwrap();
    let _ = junk.write_all(&random);
    // Not TLS: the handshake fails and the tracker hangs up.
    junk.set_read_timeout(Some(WAIT)).unwrap();
    let mut sink = Vec::new();
    let _ = junk.read_to_end(&mut sink);
    let mut huge = tls_connect(tracker.addr);
    huge.write_all(&u32::MAX.to_be_bytes()).unwrap();
    huge.write_all(&[0u8; 1024]).unwrap();
    {
        let mut half = tls_connect(tracker.addr);
        let hello = shoal_core::wire::encode(&shoal_core::proto::Message::Hello {
            protocol_version: shoal_core::proto::PROTOCOL_VERSION,
            role: shoal_core::proto::Role::Client,
        });
        half.write_all(&hello[..hello.len() / 2]).unwrap();
    }
    // The tracker hangs up on the huge frame: reading reaches EOF (after its
    // refusal message) instead of blocking.
    let mut sink = Vec::new();
    read_until_closed(&mut huge, &mut sink);
    assert!(String::from_utf8_lossy(&sink).contains("exceeds the limit"));

    good.expect("login erin pw", &["logged in as erin"]);
    good.expect("create_group ge", &["group ge created"]);
    let mut other = Client::start("other", &info);
    other.expect("create_user finn pw", &["user finn created"]);
    assert!(tracker.is_running());
}

/// The tracker a client talks to dies (kill -9): the client moves to another
/// by itself, keeping its session, and its next write succeeds (the other
/// two are a majority of three). And a client that starts while a tracker of
/// its list is down skips it.
#[test]
fn client_fails_over_past_a_dead_tracker() {
    let dir = TempDir::new("failover");
    let addrs: Vec<SocketAddr> = (0..3).map(|_| format!("127.0.0.1:{}", free_port()).parse().unwrap()).collect();
    let info = tracker_info(dir.path(), &addrs);
    let mut trackers: Vec<Tracker> = (1..=3).map(|id| Tracker::start(&info, id)).collect();
    let mut c = Client::start("c", &info);
    c.expect("create_user u pw", &["user u created"]);
    c.expect("login u pw", &["logged in as u"]);
    // Which tracker it talks to, from its open connections.
    let pid = c.child.id();
    let at = connected_ports(pid)
        .into_iter()
        .find_map(|p| addrs.iter().position(|a| a.port() == p))
        .expect("the client holds a connection to one of the trackers");
    trackers[at].kill();
    c.expect("create_group g", &["group g created"]);
    let now_at: Vec<usize> =
        connected_ports(pid).into_iter().filter_map(|p| addrs.iter().position(|a| a.port() == p)).collect();
    assert!(!now_at.is_empty() && !now_at.contains(&at), "the client still talks to the dead tracker {at}: {now_at:?}");
    // A new client, the dead one still in its list, gets through too.
    let mut c2 = Client::start("c2", &info);
    c2.expect("login u pw", &["logged in as u"]);
    c2.expect("list_my_groups", &["g (owner)"]);
}

#[test]
fn bad_command_lines_give_one_clear_error() {
    let dir = TempDir::new("args");
    std::fs::write(dir.path().join("bad.txt"), "127.0.0.1 7001\nnot-an-address\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tracker")).arg(dir.path().join("bad.txt")).arg("1").output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("line 2: expected 'IP PORT' or 'IP:PORT'"), "{err}");
    let info = tracker_info(dir.path(), &["127.0.0.1:7001".parse().unwrap()]);
    let out = Command::new(env!("CARGO_BIN_EXE_tracker")).arg(&info).arg("9").output().unwrap();
    assert!(String::from_utf8(out.stderr).unwrap().contains("no tracker 9"));
    let out = Command::new(env!("CARGO_BIN_EXE_client")).arg("nonsense").arg(&info).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "clap reports a bad address");
    let out = Command::new(env!("CARGO_BIN_EXE_client")).arg("--version").output().unwrap();
    assert!(String::from_utf8(out.stdout).unwrap().starts_with("client "));
}

/// Every answered write survives a kill -9 of the tracker; a torn log tail is
/// cut off on restart; damage inside the log stops the tracker with a clear error.
#[test]
fn a_restarted_tracker_keeps_every_acknowledged_write() {
    let (dir, info, mut tracker) = cluster("restart");
    let src = dir.path().join("f.bin");
    std::fs::write(&src, b"durable").unwrap();
    let mut a = Client::start("ann", &info);
    let mut b = Client::start("bob", &info);
    a.expect("create_user ann pw", &["user ann created"]);
    a.expect("login ann pw", &["logged in as ann"]);
    a.expect("create_group g", &["group g created"]);
    a.expect(&format!("upload_file {} g", src.display()), &["shared f.bin in g*"]);
    b.expect("create_user bob pw", &["user bob created"]);
    b.expect("login bob pw", &["logged in as bob"]);
    b.expect("join_group g", &["join request sent to g"]);

    tracker.kill();
    // A torn append: half a record where the next one would go (the file is
    // preallocated with zeros, so that is where the valid data ends).
    let log = dir.path().join("tracker-data-1/log");
    let bytes = std::fs::read(&log).unwrap();
    let end = shoal_core::wal::recover(&bytes).unwrap().valid_len;
    let f = std::fs::OpenOptions::new().write(true).open(&log).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[40, 0, 0, 0, 1, 2, 3], end).unwrap();
    drop(f);
    let mut tracker = Tracker::start(&info, 1);
    tracker.line(); // peers
    let data = tracker.line();
    assert!(data.contains("log records replayed") && data.contains("cut a torn tail of 7 bytes"), "{data}");

    // Sessions, groups, requests and files are all there; clients reconnect by themselves.
    a.expect("list_groups", &["g owner=ann members=1"]);
    a.expect("list_requests g", &["bob"]);
    a.expect("accept_request g bob", &["bob is now a member of g"]);
    b.expect("list_files g", &["f.bin 7 bytes 1 peer"]);
    a.expect("create_user ann x", &["error: user already exists"]);

    // Damage inside the log is not silently skipped.
    tracker.kill();
    let mut bytes = std::fs::read(&log).unwrap();
    bytes[20] ^= 0xff;
    std::fs::write(&log, &bytes).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tracker"))
        .arg(&info)
        .arg("1")
        .arg("--data-dir")
        .arg(dir.path().join("tracker-data-1"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("log corrupt at byte"), "{err}");
}

/// Reads until the other end hangs up (cleanly or not), failing after [`WAIT`].
fn read_until_closed(s: &mut impl Read, sink: &mut Vec<u8>) {
    let start = std::time::Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => sink.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {
                panic!("the tracker kept the connection open for {:?}", start.elapsed())
            }
            Err(_) => return,
        }
    }
}
