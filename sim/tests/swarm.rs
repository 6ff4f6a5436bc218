//! Downloads in the simulated world: many peers, one of them corrupt, seeded
//! latency, two downloaders. Checked: the corrupt sharer is banned by the
//! downloaders it sent chunks to and supplies nothing; no chunk is served
//! from a part file before it holds the file's bytes (the world's
//! invariant); a finished download equals its source, bit for bit.
//! `SIM_SEED=<n>` replays one seed.

use shoal_core::chunk::CHUNK_SIZE;
use shoal_core::rng::Rng;
use shoal_core::time::Millis;
use sim::{ok, one_group, seed_from_env, NetConfig, World};

/// Clients 0..sharers share the file (client 1 from a rotten copy), the
/// last two clients download it, the second starting a little later so that
/// it also fetches from the first before that one finishes. Returns the world.
fn swarm(seed: u64) -> World {
    let mut rng = Rng::from_u64(seed);
    let sharers = 2 + rng.below(3) as usize;
    let net = NetConfig { min_latency: Millis(1), max_latency: Millis(1 + rng.below(150)) };
    let mut w = World::new(seed, sharers + 2, net);
    let size = (CHUNK_SIZE * (7 + rng.below(10)) + rng.below(CHUNK_SIZE)) as usize;
    let mut content = vec![0u8; size];
    rng.fill(&mut content);
    let (d, d2) = (sharers, sharers + 1);
    one_group(&mut w, d2 + 1);
    for c in 0..sharers {
        w.write_file(&format!("/home/u{c}/data.bin"), &content);
    }
    // The first downloader starts with two sharers, one of them rotten (so
    // it is asked for chunks: there are more than a peer's pipeline); the
    // others join a moment later.
    let share = |w: &mut World, c: usize| ok(w, c, &format!("upload_file /home/u{c}/data.bin g"));
    share(&mut w, 0);
    share(&mut w, 1);
    w.corrupt_file("/home/u1/data.bin");
    w.mkdir("/home/dl");
    w.mkdir("/home/dl2");
    let first = ok(&mut w, d, "download_file g data.bin /home/dl/");
    assert!(first[0].starts_with("downloading data.bin into /home/dl/data.bin"), "{first:?}");
    for c in 2..sharers {
        share(&mut w, c);
    }
    w.run_for(Millis(rng.below(400)));
    ok(&mut w, d2, "download_file g data.bin /home/dl2/");
    let start = w.now();
    for c in [d, d2] {
        loop {
            let line = ok(&mut w, c, "show_downloads").remove(0);
            if line.starts_with("[C]") {
                break;
            }
            assert!(!line.starts_with("[F]"), "download on c{c} failed: {line}");
            assert!(w.now().since(start) < Millis::from_secs(600), "no progress on c{c}: {line}");
            w.run_for(Millis(100));
        }
    }
    assert!(w.chunks_written >= 2 * (size as u64).div_ceil(CHUNK_SIZE));
    // The corrupt sharer was caught: banned by whoever it sent to, and
    // nothing it sent was kept.
    let corrupt = w.client_addr(1);
    let mut bans = 0;
    for c in [d, d2] {
        let s = w.download_stats(c).remove(0);
        let from_corrupt = s.supplied.iter().find(|(a, _)| *a == corrupt).map_or(0, |(_, b)| *b);
        assert_eq!(from_corrupt, 0, "c{c} kept bytes from the corrupt sharer");
        bans += s.banned.iter().filter(|a| **a == corrupt).count();
    }
    assert!(bans >= 1, "no downloader banned the corrupt sharer");
    for dir in ["/home/dl", "/home/dl2"] {
        let got = w.file(&format!("{dir}/data.bin"));
        assert!(got.as_deref() == Some(&content[..]), "the download into {dir} differs from the source");
        assert!(!w.has_file(&format!("{dir}/data.bin.part")));
    }
    w
}

#[test]
fn swarm_downloads_over_many_seeds() {
    for seed in sim::seeds(24) {
        let w = sim::run_seed(seed, swarm);
        println!("seed={seed} digest={} steps={} virtual_ms={}", w.digest(), w.steps(), w.now().0);
    }
}

#[test]
fn a_swarm_run_replays_bit_for_bit() {
    let seed = seed_from_env(11);
    assert_eq!(swarm(seed).digest(), swarm(seed).digest());
}
