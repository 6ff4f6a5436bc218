//! End to end: three real tracker processes replicating by consensus.

mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use std::collections::BTreeMap;
use std::io::{Read, Write};

use shoal_core::chunk::{FileDigest, FileMeta, Sha1Digest, CHUNK_SIZE, MAX_FILE_CHUNKS, MAX_RANGES};
use shoal_core::ids::{FileName, GroupId, SessionToken, UserId};
use shoal_core::proto::{ApiError, Message, Reply, Request, RequestId, Role, PROTOCOL_VERSION};
use shoal_core::rng::Rng;
use shoal_core::wire::{encode, FrameDecoder, MAX_REPLY_FRAME};
use shoal_net_mio::tls::Identity;
use support::*;

struct Cluster {
    dir: TempDir,
    info: PathBuf,
    addrs: Vec<SocketAddr>,
    trackers: Vec<Option<Tracker>>,
    leaders: Vec<Option<u32>>,
    args: Vec<String>,
}

impl Cluster {
    fn new(tag: &str) -> Cluster {
        Cluster::new_with(tag, &[])
    }

    /// Three trackers, each started with `args` too.
    fn new_with(tag: &str, args: &[&str]) -> Cluster {
        let dir = TempDir::new(tag);
        let addrs: Vec<SocketAddr> = (0..3).map(|_| format!("127.0.0.1:{}", free_port()).parse().unwrap()).collect();
        let info = tracker_info(dir.path(), &addrs);
        let trackers = (1..=3).map(|id| Some(Tracker::start_with(&info, id, args))).collect();
        Cluster {
            dir,
            info,
            addrs,
            trackers,
            leaders: vec![None; 3],
            args: args.iter().map(|a| a.to_string()).collect(),
        }
    }

    /// A tracker_info file naming only tracker `id`: a client that talks to it alone.
    fn only(&self, id: u32) -> PathBuf {
        let sub = self.dir.path().join(format!("only-{id}"));
        std::fs::create_dir_all(&sub).unwrap();
        tracker_info(&sub, &[self.addrs[id as usize - 1]])
    }

    /// Waits (bounded) until every running tracker names the same leader.
    fn leader(&mut self) -> u32 {
        let deadline = Instant::now() + WAIT;
        loop {
            for (i, t) in self.trackers.iter_mut().enumerate() {
                if let Some(t) = t {
                    t.leader_so_far(&mut self.leaders[i]);
                }
            }
            let named: BTreeSet<Option<u32>> =
                (0..3).filter(|i| self.trackers[*i].is_some()).map(|i| self.leaders[i]).collect();
            if let [Some(l)] = named.into_iter().collect::<Vec<_>>()[..] {
                return l;
            }
            assert!(Instant::now() < deadline, "trackers never agreed on a leader: {:?}", self.leaders);
            // Polling what the trackers print, bounded by the deadline above.
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill(&mut self, id: u32) {
        if let Some(mut t) = self.trackers[id as usize - 1].take() {
            t.kill();
        }
        self.leaders[id as usize - 1] = None;
    }

    fn restart(&mut self, id: u32) {
        assert!(self.trackers[id as usize - 1].is_none());
        let args: Vec<&str> = self.args.iter().map(|a| a.as_str()).collect();
        self.trackers[id as usize - 1] = Some(Tracker::start_with(&self.info, id, &args));
    }
}

/// Every group `user` sees, through a client that talks to tracker `id` only.
fn groups_via(cl: &Cluster, id: u32, user: &str, expected: usize) -> BTreeSet<String> {
    let mut c = Client::start_with(&format!("reader-{id}"), &cl.only(id), "127.0.0.1:0", &[]);
    assert_eq!(c.answer(&format!("login {user} pw")), format!("logged in as {user}"));
    let lines = c.answers("list_groups", expected);
    lines.into_iter().map(|l| l.split_whitespace().next().unwrap().to_string()).collect()
}

/// kill -9 of the leader during a stream of writes: every write succeeds (a
/// short delay at most), none is lost, the restarted tracker catches up and
/// serves them alone; then every tracker is killed and restarted, and still
/// nothing acknowledged is lost.
#[test]
fn writes_survive_the_leader_dying_and_every_tracker_restarting() {
    let mut cl = Cluster::new("repl-kill");
    let mut w = Client::start_with("writer", &cl.info, "127.0.0.1:0", &[]);
    assert_eq!(w.answer("create_user w pw"), "user w created");
    assert_eq!(w.answer("login w pw"), "logged in as w");
    let leader = cl.leader();
    let n = 40;
    for i in 0..n {
        if i == 15 {
            cl.kill(leader);
        }
        assert_eq!(w.answer(&format!("create_group g{i}")), format!("group g{i} created"), "write {i}");
    }
    let all: BTreeSet<String> = (0..n).map(|i| format!("g{i}")).collect();
    for id in (1..=3).filter(|id| *id != leader) {
        assert_eq!(groups_via(&cl, id, "w", n), all, "tracker {id} after the leader died");
    }
    // The dead tracker comes back, catches up, and serves everything alone.
    cl.restart(leader);
    assert_eq!(groups_via(&cl, leader, "w", n), all, "the restarted tracker {leader}");
    // Every tracker dies at once and restarts from its data dir.
    for id in 1..=3 {
        cl.kill(id);
    }
    for id in 1..=3 {
        cl.restart(id);
    }
    for id in 1..=3 {
        assert_eq!(groups_via(&cl, id, "w", n), all, "tracker {id} after all restarted");
    }
    // And the cluster still takes writes.
    let mut w2 = Client::start_with("writer2", &cl.info, "127.0.0.1:0", &[]);
    assert_eq!(w2.answer("login w pw"), "logged in as w");
    assert_eq!(w2.answer("create_group after"), "group after created");
    // A tracker whose data dir is lost rejoins empty and catches up in full
    // (the other two hold every decided entry).
    cl.kill(3);
    std::fs::remove_dir_all(cl.dir.path().join("tracker-data-3")).unwrap();
    cl.restart(3);
    let mut all = all;
    all.insert("after".into());
    assert_eq!(groups_via(&cl, 3, "w", n + 1), all, "tracker 3 after losing its data dir");
}

/// With two of three trackers down: writes fail with the quorum error after a
/// bounded wait, reads still work, and a download in progress completes.
#[test]
fn two_trackers_down_refuse_writes_but_serve_reads_and_downloads() {
    let mut cl = Cluster::new("repl-minority");
    let size = 12 << 20;
    let mut content = vec![0u8; size];
    Rng::from_u64(5).fill(&mut content);
    let src = cl.dir.path().join("big.bin");
    std::fs::write(&src, &content).unwrap();
    let dl = cl.dir.path().join("dl");
    std::fs::create_dir_all(&dl).unwrap();

    // The sharer is slow (3 MB/s), so the download is still running when the trackers die.
    let mut s = Client::start_with("sharer", &cl.info, "127.0.0.1:0", &["--max-upload-rate", "3"]);
    let mut d = Client::start_with("downloader", &cl.info, "127.0.0.1:0", &[]);
    assert_eq!(s.answer("create_user s pw"), "user s created");
    assert_eq!(s.answer("login s pw"), "logged in as s");
    assert_eq!(d.answer("create_user d pw"), "user d created");
    assert_eq!(d.answer("login d pw"), "logged in as d");
    assert_eq!(s.answer("create_group g"), "group g created");
    assert_eq!(d.answer("join_group g"), "join request sent to g");
    assert_eq!(s.answer("accept_request g d"), "d is now a member of g");
    assert!(s.answer(&format!("upload_file {} g", src.display())).starts_with("shared big.bin in g"));
    // Soft state (who is alive, grants) reaches every tracker within a second.
    let started = d.answer(&format!("download_file g big.bin {}", dl.display()));
    assert!(started.starts_with("downloading big.bin"), "{started}");

    let leader = cl.leader();
    let survivor = (1..=3).find(|id| *id != leader).unwrap();
    for id in (1..=3).filter(|id| *id != survivor) {
        cl.kill(id);
    }
    // The trackers died in the middle of the download.
    let running = d.answer("show_downloads");
    assert!(running.starts_with("[D] g big.bin"), "the download was no longer running: {running}");
    assert_eq!(d.answer("create_group nope"), "error: no tracker quorum");
    assert_eq!(d.answer("list_groups"), "g owner=s members=2");
    // At the end of its input the client waits for its downloads, then exits.
    // (It exits with status 1: one of its commands, the refused write, failed.)
    let (_, rest) = d.finish_output();
    assert!(dl.join("big.bin").exists(), "the download did not finish: {rest:?}");
    assert!(std::fs::read(dl.join("big.bin")).unwrap() == content, "the download differs from the source");
}

/// A client speaking the tracker protocol itself, requests pipelined.
struct Wire {
    s: TlsStream,
    dec: FrameDecoder,
    client: u64,
    seq: u64,
    token: Option<SessionToken>,
}

impl Wire {
    fn connect(addr: SocketAddr, me: &Identity, client: u64) -> Wire {
        let (mut s, _) = tls_connect_as(addr, me);
        s.write_all(&encode(&Message::Hello { protocol_version: PROTOCOL_VERSION, role: Role::Client })).unwrap();
        Wire { s, dec: FrameDecoder::new(MAX_REPLY_FRAME), client, seq: 0, token: None }
    }

    fn send(&mut self, body: &Request) -> u64 {
        self.seq += 1;
        self.send_as(self.seq, body);
        self.seq
    }

    /// Sends `body` as request `seq` (again, after a write was not decided
    /// in time: the tracker answers the first copy's result if it was).
    fn send_as(&mut self, seq: u64, body: &Request) {
        let id = RequestId { client: self.client, seq };
        let m = Message::Request { id, settled_below: 0, session: self.token, body: body.clone() };
        self.s.write_all(&encode(&m)).unwrap();
    }

    fn recv(&mut self) -> (u64, Result<Reply, ApiError>) {
        let mut buf = vec![0u8; 1 << 16];
        loop {
            if let Some(Message::Response { id, result }) = self.dec.next_message::<Message>().unwrap() {
                return (id.seq, result);
            }
            let n = self.s.read(&mut buf).expect("an answer in time");
            assert!(n > 0, "the tracker hung up");
            self.dec.push(&buf[..n]);
        }
    }

    /// Each request's answer, in order, with at most `window` in flight.
    /// A write answered `no quorum` or `catching up` (leadership moving, as
    /// on a loaded machine) is sent again under its id, as the client does,
    /// for up to a minute.
    fn pipeline(&mut self, bodies: &[Request], window: usize) -> Vec<Result<Reply, ApiError>> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut answers = BTreeMap::new();
        let first = self.seq + 1;
        let mut sent = 0;
        while answers.len() < bodies.len() {
            while sent < bodies.len() && sent - answers.len() < window {
                self.send(&bodies[sent]);
                sent += 1;
            }
            let (seq, r) = self.recv();
            if matches!(r, Err(ApiError::NoQuorum | ApiError::CatchingUp)) && Instant::now() < deadline {
                let body = bodies[(seq - first) as usize].clone();
                self.send_as(seq, &body);
                continue;
            }
            answers.insert(seq, r);
        }
        (first..first + bodies.len() as u64).map(|s| answers.remove(&s).unwrap()).collect()
    }

    fn call(&mut self, body: Request) -> Result<Reply, ApiError> {
        self.pipeline(&[body], 1).pop().unwrap()
    }

    fn login(&mut self, user: &str) {
        let u = UserId::new(user).unwrap();
        let _ = self.call(Request::CreateUser { user: u.clone(), password: "pw".into() });
        let listen = "127.0.0.1:2".parse().unwrap();
        let r = self.call(Request::Login { user: u, password: "pw".into(), listen, plaintext_peers: false });
        let Ok(Reply::Session { token }) = r else { panic!("login failed: {r:?}") };
        self.token = Some(token);
    }
}

/// Files of `chunks` chunks each, with made-up chunk hashes.
fn big_files(count: usize, chunks: u64) -> Vec<FileMeta> {
    (0..count)
        .map(|k| {
            let chunks: Vec<Sha1Digest> =
                (0..chunks).map(|i| Sha1Digest::of(&[&[k as u8][..], &i.to_be_bytes()].concat())).collect();
            let digest = FileDigest { size: chunks.len() as u64 * CHUNK_SIZE, sha1: Sha1Digest([k as u8; 20]), chunks };
            FileMeta { name: FileName::new(format!("big{k}.bin")).unwrap(), digest }
        })
        .collect()
}

/// Chunk lists travel beside the log. Three trackers take files whose chunk
/// lists total 80 MiB (four files of 2^20 chunks, 512 GiB each), then small
/// writes past every tracker's snapshot point, staying up and answering. A
/// tracker restarted with an empty data dir catches up and serves every
/// range of the big files' chunk lists; the leader is killed during that
/// catch-up, and nothing acknowledged is lost.
///
/// The default run takes 4,000 small writes with snapshots every 1,500
/// entries; `SHOAL_FULL_SCALE=1` takes the 100,000 writes of the issue with
/// the default snapshot point.
#[test]
fn big_chunk_lists_replicate_beside_the_log_and_a_wiped_tracker_serves_them() {
    let full = std::env::var("SHOAL_FULL_SCALE").is_ok_and(|v| v == "1");
    let (writes, args): (usize, &[&str]) = if full { (100_000, &[]) } else { (4_000, &["--snapshot-every", "1500"]) };
    let mut cl = Cluster::new_with("repl-big", args);
    let me = Identity::ephemeral().unwrap();
    let leader = cl.leader();
    let mut w = Wire::connect(cl.addrs[leader as usize - 1], &me, 1);
    w.login("big");
    let g = GroupId::new("g").unwrap();
    assert_eq!(w.call(Request::CreateGroup { group: g.clone() }), Ok(Reply::Done));
    let files = big_files(4, MAX_FILE_CHUNKS);
    let start = Instant::now();
    for f in &files {
        let share = Request::UploadFile { group: g.clone(), file: f.record() };
        let Err(ApiError::MissingRanges { ranges }) = w.call(share.clone()) else { panic!("ranges not asked for") };
        assert_eq!(ranges.len() as u64, MAX_RANGES);
        let puts: Vec<Request> =
            ranges.iter().map(|&i| Request::PutRange { hashes: f.digest.range(i as u64).to_vec() }).collect();
        assert!(w.pipeline(&puts, 8).iter().all(|r| r == &Ok(Reply::Done)));
        assert_eq!(w.call(share), Ok(Reply::Done));
    }
    eprintln!("80 MiB of chunk lists shared in {:.1} s", start.elapsed().as_secs_f64());
    let start = Instant::now();
    let creates: Vec<Request> =
        (0..writes).map(|i| Request::CreateGroup { group: GroupId::new(format!("s{i}")).unwrap() }).collect();
    for r in w.pipeline(&creates, 32) {
        assert_eq!(r, Ok(Reply::Done));
    }
    eprintln!("{writes} small writes in {:.1} s", start.elapsed().as_secs_f64());
    // Every tracker is up and has it all (a read through each alone).
    let last = GroupId::new(format!("s{}", writes - 1)).unwrap();
    for id in 1..=3u32 {
        assert!(cl.trackers[id as usize - 1].as_mut().unwrap().is_running(), "tracker {id} died");
        let mut r = Wire::connect(cl.addrs[id as usize - 1], &me, 10 + id as u64);
        r.token = w.token;
        wait_until(|| r.call(Request::ListRequests { group: last.clone() }) == Ok(Reply::Requests(vec![])));
    }
    // A follower loses its data dir; while it catches up the leader dies.
    let wiped = (1..=3).find(|id| *id != leader).unwrap();
    cl.kill(wiped);
    std::fs::remove_dir_all(cl.dir.path().join(format!("tracker-data-{wiped}"))).unwrap();
    cl.restart(wiped);
    cl.kill(leader);
    let start = Instant::now();
    let mut r = Wire::connect(cl.addrs[wiped as usize - 1], &me, 20);
    wait_until(|| {
        let ok = r.call(Request::ListRequests { group: last.clone() });
        // Catching up, or its session lookups before the snapshot: ask again.
        r.token = w.token;
        ok == Ok(Reply::Requests(vec![]))
    });
    for f in &files {
        for i in 0..MAX_RANGES {
            let get = Request::GetRange { group: g.clone(), name: f.name.clone(), range: i as u32 };
            let want = Ok(Reply::Range { hashes: f.digest.range(i).to_vec() });
            wait_until(|| r.call(get.clone()) == want);
        }
    }
    eprintln!("the wiped tracker serves every range {:.1} s after its restart", start.elapsed().as_secs_f64());
    // Nothing acknowledged is gone, on the wiped tracker or the other survivor.
    let survivor = (1..=3).find(|id| *id != leader && *id != wiped).unwrap();
    for id in [wiped, survivor] {
        let mut r = Wire::connect(cl.addrs[id as usize - 1], &me, 30 + id as u64);
        r.token = w.token;
        let checks: Vec<Request> = (0..writes)
            .step_by(97)
            .chain([writes - 1])
            .map(|i| Request::ListRequests { group: GroupId::new(format!("s{i}")).unwrap() })
            .collect();
        for (k, a) in r.pipeline(&checks, 32).into_iter().enumerate() {
            assert_eq!(a, Ok(Reply::Requests(vec![])), "tracker {id}, check {k}");
        }
        let Ok(Reply::Files(listed)) = r.call(Request::ListFiles { group: g.clone() }) else { panic!("no files") };
        assert_eq!(listed.len(), files.len(), "tracker {id}");
    }
    // And the two left take writes.
    let mut w2 = Wire::connect(cl.addrs[survivor as usize - 1], &me, 40);
    w2.token = w.token;
    wait_until(|| w2.call(Request::CreateGroup { group: GroupId::new("after").unwrap() }) == Ok(Reply::Done));
}

/// Polls `f` until it holds, within the tests' bound.
fn wait_until(mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f() {
        assert!(Instant::now() < deadline, "not within 60 s");
        // Polling a tracker's answer, bounded by the deadline above.
        std::thread::sleep(Duration::from_millis(100));
    }
}
