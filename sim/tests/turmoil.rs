//! turmoil scenarios over the adapter in `sim::turmoil_host`: multi-peer
//! parallel download, sudden peer shutdown, tracker failure and recovery,
//! artificial latency, consistency across trackers. Each scenario is seeded
//! (`SIM_SEED`), prints `seed=<n> digest=<hex>` over the trackers' output,
//! and a meta-test requires one seed to replay to the same digest.

use std::collections::BTreeMap;
use std::time::Duration;

use shoal_core::rng::Rng;
use sim::turmoil_host::{tracker_host, ClientDriver, Shared};

// ---- scenarios ----

fn content(seed: u64, size: usize) -> Vec<u8> {
    let mut v = vec![0u8; size];
    Rng::from_u64(seed).fill(&mut v);
    v
}

fn builder(seed: u64, min_ms: u64, max_ms: u64) -> turmoil::Builder {
    let mut b = turmoil::Builder::new();
    b.rng_seed(seed)
        .simulation_duration(Duration::from_secs(600))
        .min_message_latency(Duration::from_millis(min_ms))
        .max_message_latency(Duration::from_millis(max_ms));
    b
}

fn add_trackers(sim: &mut turmoil::Sim<'_>, n: u64, shared: &Shared) {
    for me in 1..=n {
        let s = shared.clone();
        sim.host(format!("t{me}"), move || tracker_host(me, n, s.clone()));
    }
}

const TRACKERS: [&str; 3] = ["t1", "t2", "t3"];

/// Three sharers and a downloader: the file arrives whole, from several peers
/// at once. With `kill_sharer`, one sharer's host crashes mid-download.
fn swarm(seed: u64, kill_sharer: bool, min_ms: u64, max_ms: u64) -> Shared {
    let shared = Shared::default();
    let mut sim = builder(seed, min_ms, max_ms).build();
    add_trackers(&mut sim, 3, &shared);
    let file = content(seed, 12 * 1024 * 1024 + 4321);
    for i in 0..3u64 {
        let (s, f) = (shared.clone(), file.clone());
        sim.host(format!("s{i}"), move || {
            let (s, f) = (s.clone(), f.clone());
            async move {
                let files = BTreeMap::from([("/data.bin".to_string(), f)]);
                let mut c = ClientDriver::start(100 + i, &format!("s{i}"), &TRACKERS, files, Some(1_000_000)).await?;
                c.until_ok(&format!("create_user s{i} pw")).await;
                c.until_ok(&format!("login s{i} pw")).await;
                if i == 0 {
                    c.until_ok("create_group g").await;
                    // Admit everyone who asks, for a while.
                    for _ in 0..60 {
                        if let Ok(lines) = c.run("list_requests g").await {
                            for u in lines.iter().filter(|l| !l.starts_with("no pending")) {
                                let _ = c.run(&format!("accept_request g {u}")).await;
                            }
                        }
                        c.idle(Duration::from_millis(200)).await;
                    }
                } else {
                    c.until_ok("join_group g").await;
                    c.until_ok("list_files g").await;
                }
                c.until_ok("upload_file /data.bin g").await;
                s.report(&format!("s{i}"), "sharing".into());
                c.idle(Duration::from_secs(600)).await;
                Ok(())
            }
        });
    }
    let (s, f) = (shared.clone(), file.clone());
    sim.client("d", async move {
        let mut c = ClientDriver::start(7, "d", &TRACKERS, BTreeMap::new(), None).await?;
        c.until_ok("create_user d pw").await;
        c.until_ok("login d pw").await;
        c.until_ok("join_group g").await;
        // Wait until all three share it.
        loop {
            if let Ok(l) = c.run("list_files g").await {
                if l.iter().any(|l| l.ends_with("3 peers")) {
                    break;
                }
            }
            c.idle(Duration::from_millis(300)).await;
        }
        c.until_ok("download_file g data.bin /dl/").await;
        let s1 = std::net::SocketAddr::new(turmoil::lookup("s1"), sim::turmoil_host::PEER_PORT);
        if kill_sharer {
            // Sharers upload at 1 MB/s each: once s1 has supplied a chunk,
            // and well before the file is complete, it dies.
            loop {
                let st = c.download_stats().remove(0);
                if st.supplied.iter().any(|(a, b)| *a == s1 && *b > 0) {
                    assert!(st.verified < st.size / 2, "the download was nearly done when s1 died");
                    s.report("kill", st.verified.to_string());
                    break;
                }
                c.idle(Duration::from_millis(20)).await;
            }
        }
        let supplied = c.wait_download("data.bin").await;
        assert!(c.disk.file("/dl/data.bin").as_deref() == Some(&f[..]), "the download differs from the source");
        let sources = supplied.iter().filter(|(_, b)| *b > 0).count();
        let total: u64 = supplied.iter().map(|(_, b)| b).sum();
        let from_s1 = supplied.iter().find(|(a, _)| *a == s1).map_or(0, |(_, b)| *b);
        s.report("d", format!("sources={sources} bytes={total} s1={from_s1}"));
        Ok(())
    });
    let mut killed = false;
    while !sim.step().expect("the simulation runs") {
        if kill_sharer && !killed && shared.reports.lock().unwrap().contains_key("kill") {
            // At once, in the step the downloader saw s1's first chunk.
            assert!(!shared.reports.lock().unwrap().contains_key("d"));
            sim.crash("s1");
            killed = true;
        }
        if shared.reports.lock().unwrap().contains_key("d") {
            break;
        }
    }
    assert_eq!(killed, kill_sharer);
    shared
}

/// The downloader's report: sources that supplied bytes, total bytes, bytes from s1.
fn report_of(s: &Shared) -> (usize, u64, u64) {
    let d = s.reports.lock().unwrap()["d"].clone();
    let field = |k: &str| {
        d.split(' ').find_map(|f| f.strip_prefix(k)).and_then(|v| v.parse::<u64>().ok()).expect("a field of the report")
    };
    (field("sources=") as usize, field("bytes="), field("s1="))
}

/// Writes through every tracker; the leader's host crashes mid-stream and
/// comes back; afterwards all trackers hold the same metadata, with every
/// acknowledged write, and the restarted one serves them alone.
fn tracker_failover(seed: u64) -> Shared {
    let shared = Shared::default();
    let mut sim = builder(seed, 1, 20).build();
    add_trackers(&mut sim, 3, &shared);
    let s = shared.clone();
    sim.client("w", async move {
        let mut c = ClientDriver::start(11, "w", &TRACKERS, BTreeMap::new(), None).await?;
        c.until_ok("create_user w pw").await;
        c.until_ok("login w pw").await;
        for i in 0..30 {
            if i == 10 {
                s.report("crash-leader", String::new());
            }
            if i == 20 {
                s.report("restart", String::new());
            }
            let out = c.run(&format!("create_group g{i}")).await;
            assert_eq!(out, Ok(vec![format!("group g{i} created")]), "write {i}");
        }
        s.report("w", "30 acknowledged".into());
        Ok(())
    });
    let mut crashed: Option<String> = None;
    let mut restarted = false;
    while !sim.step().expect("the simulation runs") {
        let reports = shared.reports.lock().unwrap().clone();
        if crashed.is_none() && reports.contains_key("crash-leader") {
            // The leader, as the trackers see it (any tracker if they disagree).
            let leaders = shared.leaders.lock().unwrap().clone();
            let leader = leaders.values().flatten().next().copied().unwrap_or(1 + seed % 3);
            let victim = format!("t{leader}");
            sim.crash(victim.as_str());
            crashed = Some(victim);
        }
        if let (Some(v), false) = (&crashed, restarted) {
            if reports.contains_key("restart") {
                sim.bounce(v.as_str());
                restarted = true;
            }
        }
        if reports.contains_key("w") {
            break;
        }
    }
    // Let the restarted tracker catch up, then compare.
    for _ in 0..2000 {
        let metas = shared.metas.lock().unwrap().clone();
        if metas.len() == 3 && metas.values().all(|m| m.applied() == metas[&1].applied() && m == &metas[&1]) {
            break;
        }
        sim.step().expect("the simulation runs");
    }
    shared
}

fn check_consistent(shared: &Shared, groups: usize) {
    let metas = shared.metas.lock().unwrap();
    assert_eq!(metas.len(), 3, "every tracker published its state");
    let first = &metas[&1];
    for (t, m) in metas.iter() {
        assert_eq!(m, first, "tracker {t} differs from tracker 1");
        for i in 0..groups {
            let g = shoal_core::ids::GroupId::new(format!("g{i}")).unwrap();
            assert!(m.group(&g).is_some(), "tracker {t} lost acknowledged group g{i}");
        }
    }
}

/// Runs `f` for each seed (`SIM_SEED` alone, else `SIM_SEEDS` or 4 of them);
/// prints `seed=<n> digest=<hex>`, or how to reproduce a failure.
fn for_seeds(name: &str, f: impl Fn(u64) -> Shared + std::panic::RefUnwindSafe) {
    for seed in sim::seeds(4) {
        match std::panic::catch_unwind(|| f(seed)) {
            Ok(s) => {
                let d = s.reports.lock().unwrap().get("d").cloned().unwrap_or_default();
                println!("seed={seed} digest={} {name} {d}", s.digest());
            }
            Err(e) => {
                eprintln!("{name}: reproduce with SIM_SEED={seed}");
                std::panic::resume_unwind(e);
            }
        }
    }
}

#[test]
fn multi_peer_parallel_download() {
    for_seeds("multi_peer_parallel_download", |seed| {
        let s = swarm(seed, false, 1, 5);
        let (sources, _, _) = report_of(&s);
        assert!(sources >= 2, "the download used {sources} source(s)");
        s
    });
}

/// s1 dies once it has supplied a chunk, with most of the file still to
/// come: the rest comes from the others, and the file is whole (checked by
/// the downloader against the source).
#[test]
fn sudden_peer_shutdown() {
    for_seeds("sudden_peer_shutdown", |seed| {
        let s = swarm(seed, true, 1, 5);
        let killed_at: u64 = s.reports.lock().unwrap()["kill"].parse().unwrap();
        let (sources, total, from_s1) = report_of(&s);
        assert!(from_s1 > 0 && from_s1 < total, "s1 supplied {from_s1} of {total} bytes");
        assert!(killed_at < total / 2 && sources >= 2, "killed at {killed_at} of {total} bytes, {sources} sources");
        s
    });
}

#[test]
fn artificial_latency() {
    for_seeds("artificial_latency", |seed| {
        let s = swarm(seed, false, 40, 160);
        let (sources, total, _) = report_of(&s);
        assert!(sources >= 2 && total > 12 << 20, "{sources} sources, {total} bytes");
        s
    });
}

#[test]
fn tracker_failure_and_recovery_keeps_trackers_consistent() {
    for_seeds("tracker_failure_and_recovery", |seed| {
        let s = tracker_failover(seed);
        check_consistent(&s, 30);
        s
    });
}

#[test]
fn a_turmoil_run_replays_bit_for_bit() {
    let seed = sim::seed_from_env(1);
    assert_eq!(tracker_failover(seed).digest(), tracker_failover(seed).digest());
    assert_eq!(swarm(seed, true, 1, 5).digest(), swarm(seed, true, 1, 5).digest());
}
