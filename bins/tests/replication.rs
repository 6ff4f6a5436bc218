//! End to end: three real tracker processes replicating by consensus.

mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use shoal_core::rng::Rng;
use support::*;

struct Cluster {
    dir: TempDir,
    info: PathBuf,
    addrs: Vec<SocketAddr>,
    trackers: Vec<Option<Tracker>>,
    leaders: Vec<Option<u32>>,
}

impl Cluster {
    fn new(tag: &str) -> Cluster {
        let dir = TempDir::new(tag);
        let addrs: Vec<SocketAddr> = (0..3).map(|_| format!("127.0.0.1:{}", free_port()).parse().unwrap()).collect();
        let info = tracker_info(dir.path(), &addrs);
        let trackers = (1..=3).map(|id| Some(Tracker::start(&info, id))).collect();
        Cluster { dir, info, addrs, trackers, leaders: vec![None; 3] }
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
        self.trackers[id as usize - 1] = Some(Tracker::start(&self.info, id));
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
