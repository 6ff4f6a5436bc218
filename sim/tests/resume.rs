//! A downloader that dies again and again: killed, or its machine losing
//! power (writes that had not reached the disk gone, the sidecar perhaps
//! ahead of its chunks), on a disk that tears the writes in flight, fails
//! reads now and then and sometimes fills up. Each time it comes back and
//! runs the same `download_file`, which resumes from the part file.
//! A second downloader fetches from it meanwhile.
//!
//! The world checks throughout that no chunk written to a part file is not
//! the file's, that no block is served from a part file before it holds the
//! file's bytes, and that a resumed download fetches no chunk its part file
//! held verified before the crash. At the end both files equal the source and
//! no download ever failed its whole-file check.
//!
//! `SIM_SEED=<n>` replays one seed; `SIM_SEEDS=<n>` runs seeds 0..n (default 16).

use std::collections::BTreeMap;

use shoal_core::chunk::CHUNK_SIZE;
use shoal_core::rng::Rng;
use shoal_core::time::Millis;
use sim::{ok, one_group, seeds, DiskConfig, NetConfig, World, WorldConfig};

/// What a seed drove: runs that resumed, and the world's fault counts.
fn resume(seed: u64) -> (World, u64) {
    let mut rng = Rng::from_u64(seed ^ 0x2e5);
    let net = NetConfig { min_latency: Millis(1), max_latency: Millis(1 + rng.below(30)) };
    let disk = DiskConfig {
        max_latency: Millis(1 + rng.below(20)),
        read_fault_one_in: 20 + rng.below(100),
        ..DiskConfig::default()
    };
    let rate = 500_000 + rng.below(3_000_000);
    let wc = WorldConfig { trackers: 1, clients: 4, net, disk, max_upload_rate: Some(rate), ..WorldConfig::default() };
    let mut w = World::build(seed, wc);
    let size = (CHUNK_SIZE * (8 + rng.below(24)) + rng.below(CHUNK_SIZE)) as usize;
    let mut content = vec![0u8; size];
    rng.fill(&mut content);
    // Clients 0 and 1 share, 2 dies and resumes, 3 downloads from all of them.
    one_group(&mut w, 4);
    for c in 0..2 {
        let path = format!("/home/u{c}/f.bin");
        w.write_file(&path, &content);
        ok(&mut w, c, &format!("upload_file {path} g"));
    }
    w.mkdir("/dl2");
    w.mkdir("/dl3");
    let (d, d3) = (2, 3);
    let mut resumed = 0;
    let mut second_started = false;
    for round in 0..12 {
        let t = w.command(d, "download_file g f.bin /dl2/");
        match w.wait(d, t, Millis::from_secs(60)) {
            Some(Ok(lines)) if lines[0].starts_with("resuming") => resumed += 1,
            Some(Ok(_)) => {}
            // Already complete (it finished before this round), or a full disk.
            Some(Err(e)) if e.to_string().contains("already") || e.to_string().contains("disk") => {}
            other => panic!("seed {seed} round {round}: download_file: {other:?}"),
        }
        if w.has_file("/dl2/f.bin") {
            break;
        }
        if !second_started && round == 2 {
            ok(&mut w, d3, "download_file g f.bin /dl3/");
            second_started = true;
        }
        w.run_for(Millis(100 + rng.below(1_500)));
        match rng.below(6) {
            0 | 1 => w.power_loss_client(d),
            2 => {
                // The disk fills up for a while: a save fails, the download stops.
                w.set_disk_full(d, true);
                w.run_for(Millis(rng.below(800)));
                w.set_disk_full(d, false);
                w.crash_client(d);
            }
            _ => w.crash_client(d),
        }
        w.restart_client(d);
        ok(&mut w, d, "login u2 pw");
    }
    // Last run: it must complete.
    let t = w.command(d, "download_file g f.bin /dl2/");
    let _ = w.wait(d, t, Millis::from_secs(60));
    if !second_started {
        ok(&mut w, d3, "download_file g f.bin /dl3/");
    }
    let start = w.now();
    for (c, dir) in [(d, "/dl2"), (d3, "/dl3")] {
        let path = format!("{dir}/f.bin");
        while !w.has_file(&path) {
            let failed: Vec<String> = w.download_stats(c).into_iter().filter_map(|s| s.failed).collect();
            assert!(failed.iter().all(|f| !f.contains("whole-file")), "seed {seed}: c{c}: {failed:?}");
            if failed.len() == w.download_stats(c).len() && !failed.is_empty() {
                // It failed for a disk reason: once more, it resumes.
                ok(&mut w, c, &format!("download_file g f.bin {dir}/"));
            }
            assert!(w.now().since(start) < Millis::from_secs(300), "seed {seed}: c{c} never completed");
            w.run_for(Millis(200));
        }
        assert!(w.file(&path).as_deref() == Some(&content[..]), "seed {seed}: {path} differs from the source");
    }
    (w, resumed)
}

#[test]
fn a_downloader_that_keeps_dying_resumes_and_completes() {
    let mut totals: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut resumes = 0;
    for seed in seeds(16) {
        let (w, r) = sim::run_seed(seed, resume);
        resumes += r;
        for (k, v) in w.faults.iter().chain(&w.disk().counts) {
            *totals.entry(k).or_default() += v;
        }
        println!("seed={seed} digest={} resumed={r} part_serves={}", w.digest(), w.part_serves);
    }
    println!("{resumes} runs resumed; faults: {totals:?}");
    assert!(resumes > 0, "no run resumed: the scenario did not happen");
}

#[test]
fn a_resume_run_replays_bit_for_bit() {
    let seed = sim::seed_from_env(2);
    assert_eq!(resume(seed).0.digest(), resume(seed).0.digest());
}
