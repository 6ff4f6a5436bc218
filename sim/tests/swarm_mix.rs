//! Swarms of unlike peers, in virtual time, on a network with bandwidth
//! (every client paces its upload to its own uplink):
//! - **mixed capacities**: a flash crowd in which every fourth leecher has
//!   four times the others' uplink and downlink;
//! - **arrivals over time**: leechers arrive one by one at exponential
//!   intervals (a Poisson process) and stop sharing as soon as they finish.
//!
//! Checked, for each seed: every leecher finishes (none starves) with the
//! seeder's bytes, bit for bit; the world's invariants hold throughout (no
//! chunk written or served that is not the file's, only members served);
//! and the mean download time stays within [`MAX_MEAN_RATIO`] of the fluid
//! model's. Printed: the mean and the last download time against the
//! model's.
//!
//! The fluid model (Qiu and Srikant, 2004, with every peer's upload used):
//! a flash crowd of N leechers with uplinks u_i behind a seeder of uplink
//! u_s finishes no sooner than max(F/u_s, F/d_min, N*F/(u_s + sum u_i)),
//! everyone at that time at best. With arrivals at rate lambda that leave
//! when done, the swarm holds x leechers where lambda*F = min(x*d,
//! u_s + x*u), so by Little's law each takes T = max(F/d, F/u -
//! u_s/(lambda*u)).
//!
//! `SIM_MIX_LEECHERS=<n>` sets the crowd (default 16), `SIM_MIX_CHUNKS`
//! the file's chunks (default 32), `SIM_SEEDS`/`SIM_SEED` the seeds.

use shoal_core::chunk::CHUNK_SIZE;
use shoal_core::rng::Rng;
use shoal_core::time::Millis;
use sim::{ok, one_seeder, Bandwidth, NetConfig, World, WorldConfig};

/// A slow client's uplink; downlinks are four times the uplink.
const UP: u64 = 8_000_000;

/// The mean download time is within this many times the fluid model's.
const MAX_MEAN_RATIO: f64 = 2.0;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

fn leechers() -> usize {
    env("SIM_MIX_LEECHERS", 16).clamp(2, 200) as usize
}

fn chunks() -> u64 {
    env("SIM_MIX_CHUNKS", 32).clamp(1, 256)
}

/// The seeder (client 0) and three leechers in four: `UP`; every fourth
/// leecher four times that.
fn mixed(c: usize) -> Bandwidth {
    let up = if c > 0 && c.is_multiple_of(4) { 4 * UP } else { UP };
    Bandwidth { up, down: 4 * up }
}

fn equal(_: usize) -> Bandwidth {
    Bandwidth { up: UP, down: 4 * UP }
}

struct Swarm {
    w: World,
    content: Vec<u8>,
    size: u64,
}

/// One seeder sharing a file of `chunks()` chunks with `n` leechers in one
/// group, on links from `links`.
fn swarm(seed: u64, n: usize, links: fn(usize) -> Bandwidth) -> Swarm {
    let mut rng = Rng::from_u64(seed);
    let net = NetConfig { min_latency: Millis(1), max_latency: Millis(1 + rng.below(20)) };
    let wc = WorldConfig { clients: n + 1, net, bandwidth: Some(links), cap_at_uplink: true, ..WorldConfig::default() };
    let mut w = World::build(seed, wc);
    let size = CHUNK_SIZE * chunks();
    let mut content = vec![0u8; size as usize];
    rng.fill(&mut content);
    one_seeder(&mut w, n, &content);
    Swarm { w, content, size }
}

/// Runs until every leecher of `starts` (its start time) finished: each
/// one's download time. A leecher starts at its time and, if `leave`, stops
/// sharing once done.
fn run(s: &mut Swarm, starts: &[(usize, Millis)], leave: bool, bound: Millis) -> Vec<Millis> {
    let w = &mut s.w;
    let t0 = w.now();
    let mut started = vec![None; starts.len()];
    let mut done: Vec<Option<Millis>> = vec![None; starts.len()];
    while done.iter().any(Option::is_none) {
        for (i, &(c, at)) in starts.iter().enumerate() {
            if started[i].is_none() && w.now().since(t0) >= at {
                let r = ok(w, c, &format!("download_file g data.bin /home/dl{c}/"));
                assert!(r[0].starts_with("downloading"), "c{c} did not start: {r:?}");
                started[i] = Some(w.now());
            }
            let (Some(from), None) = (started[i], done[i]) else { continue };
            let line = ok(w, c, "show_downloads").remove(0);
            assert!(!line.starts_with("[F]"), "c{c} failed: {line}");
            if line.starts_with("[C]") {
                done[i] = Some(w.now().since(from));
                if leave {
                    ok(w, c, "stop_share g data.bin");
                }
            }
        }
        assert!(w.now().since(t0) < Millis(bound.0 * 40), "a leecher starves: {done:?}");
        w.run_for(Millis(5));
    }
    for &(c, _) in starts {
        assert!(w.file(&format!("/home/dl{c}/data.bin")).as_deref() == Some(&s.content[..]), "c{c}'s copy differs");
    }
    done.into_iter().flatten().collect()
}

fn mean(t: &[Millis]) -> f64 {
    t.iter().map(|m| m.0 as f64).sum::<f64>() / t.len() as f64
}

#[test]
fn a_flash_crowd_of_mixed_capacities_finishes_near_the_fluid_bound() {
    let n = leechers();
    for seed in sim::seeds(2) {
        let (times, bound) = sim::run_seed(seed, |seed| {
            let mut s = swarm(seed, n, mixed);
            let f = s.size as f64;
            let ups: f64 = (1..=n).map(|c| mixed(c).up as f64).sum();
            let d_min = (1..=n).map(|c| mixed(c).down).min().unwrap_or(1) as f64;
            let u_s = mixed(0).up as f64;
            let bound = (f / u_s).max(f / d_min).max(n as f64 * f / (u_s + ups));
            let bound = Millis((bound * 1000.0).ceil() as u64);
            let starts: Vec<(usize, Millis)> = (1..=n).map(|c| (c, Millis::ZERO)).collect();
            (run(&mut s, &starts, false, bound), bound)
        });
        let last = times.iter().max().copied().unwrap_or_default();
        let fast: Vec<Millis> = (1..=n).zip(&times).filter(|(c, _)| c % 4 == 0).map(|(_, t)| *t).collect();
        println!(
            "seed={seed} leechers={n} mixed: bound={} ms mean={:.0} ms ({:.2}) last={} ms ({:.2}) fast ones' mean={:.0} ms",
            bound.0,
            mean(&times),
            mean(&times) / bound.0 as f64,
            last.0,
            last.0 as f64 / bound.0 as f64,
            mean(&fast)
        );
        let ratio = mean(&times) / bound.0 as f64;
        assert!(ratio <= MAX_MEAN_RATIO, "seed {seed}: mean download time {ratio:.2}x the fluid bound");
    }
}

#[test]
fn leechers_arriving_over_time_and_leaving_when_done_all_finish() {
    let n = leechers();
    // Two arrivals a second: more than the seeder alone can serve (it sends
    // a copy in F/UP), so the leechers' uploads carry the swarm.
    let lambda = 2.0;
    for seed in sim::seeds(2) {
        let (times, model) = sim::run_seed(seed, |seed| {
            let mut s = swarm(seed, n, equal);
            let mut rng = Rng::from_u64(seed ^ 0xa441);
            let mut at = 0.0f64;
            let mut starts = Vec::new();
            for c in 1..=n {
                starts.push((c, Millis(at as u64)));
                // Exponential gaps: -ln(U)/lambda, U uniform in (0, 1].
                let u = (rng.below(1 << 20) + 1) as f64 / (1u64 << 20) as f64;
                at += -u.ln() / lambda * 1000.0;
            }
            // The seeder's uplink is a leecher's.
            let (f, u, d, u_s) = (s.size as f64, UP as f64, 4.0 * UP as f64, UP as f64);
            let model = (f / d).max(f / u - u_s / (lambda * u));
            let model = Millis((model * 1000.0).ceil() as u64);
            (run(&mut s, &starts, true, model), model)
        });
        let last = times.iter().max().copied().unwrap_or_default();
        println!(
            "seed={seed} leechers={n} arrivals={lambda}/s, leaving when done: model={} ms mean={:.0} ms ({:.2}) longest={} ms",
            model.0,
            mean(&times),
            mean(&times) / model.0 as f64,
            last.0
        );
        let ratio = mean(&times) / model.0 as f64;
        assert!(ratio <= MAX_MEAN_RATIO, "seed {seed}: mean download time {ratio:.2}x the fluid model's");
    }
}
