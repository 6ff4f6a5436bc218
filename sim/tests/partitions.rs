//! Silent partitions: packets between a tracker and the rest of its cluster
//! just stop (no reset, no error), for a few seconds, then flow again.
//! Checked, per seed and per cut:
//!
//! - the cut-off tracker stops naming a leader within the link deadline
//!   (plus the network's latency), so it tells its clients `no quorum` at once;
//! - the majority keeps (or elects) a leader and takes writes during the cut;
//! - once healed, within 1.5 s of virtual time, every tracker names the same
//!   leader and the cluster takes a write.
//!
//! `SIM_SEED=<n>` replays one seed; `SIM_SEEDS=<n>` runs seeds 0..n (default 24).

use shoal_core::rng::Rng;
use shoal_core::time::Millis;
use shoal_core::tracker::links::LINK_DEADLINE;
use sim::{seeds, Ep, NetConfig, World, WorldConfig};

/// How long after a heal the cluster must have one leader and take a write.
const REJOIN: Millis = Millis(1_500);

fn leaders(w: &World) -> Vec<Option<u64>> {
    (0..w.tracker_count()).map(|t| w.tracker_at(t).and_then(|n| n.leader())).collect()
}

/// Runs until `done` holds (checked every 10 ms), at most `limit`; the time it took.
fn until(w: &mut World, limit: Millis, mut done: impl FnMut(&World) -> bool) -> Option<Millis> {
    let start = w.now();
    while w.now().since(start) <= limit {
        if done(w) {
            return Some(w.now().since(start));
        }
        w.run_for(Millis(10));
    }
    None
}

/// A write through client `c`, which must succeed within `limit`.
fn write(w: &mut World, c: usize, group: &str, limit: Millis) -> Millis {
    let start = w.now();
    let t = w.command(c, &format!("create_group {group}"));
    match w.wait(c, t, limit) {
        Some(Ok(_)) => w.now().since(start),
        other => panic!("create_group {group} through c{c}: {other:?} after {} ms", w.now().since(start).0),
    }
}

/// The worst times one seed measured: (cut-off tracker named no leader,
/// write during the cut, one leader after the heal, write after the heal).
fn partitions(seed: u64) -> ([Millis; 4], String) {
    let mut rng = Rng::from_u64(seed ^ 0x9a27);
    let trackers = if rng.below(2) == 0 { 3 } else { 5 };
    let max_latency = Millis(1 + rng.below(40));
    let net = NetConfig { min_latency: Millis(1), max_latency };
    let mut w = World::build(seed, WorldConfig { trackers, clients: 2, net, ..WorldConfig::default() });
    for c in 0..2 {
        w.run(c, &format!("create_user u{c} pw")).expect("a fresh cluster takes writes");
        w.run(c, &format!("login u{c} pw")).expect("login");
    }
    let mut worst = [Millis::ZERO; 4];
    for round in 0..4 {
        let leader = until(&mut w, Millis::from_secs(5), |w| leaders(w).iter().flatten().next().is_some());
        assert!(leader.is_some(), "seed {seed}: no leader before round {round}");
        // The leader half the time, else any tracker: cut it off from the others.
        let named = leaders(&w).into_iter().flatten().next().expect("a leader") as usize - 1;
        let victim = if rng.below(2) == 0 { named } else { rng.below(trackers as u64) as usize };
        for o in (0..trackers).filter(|o| *o != victim) {
            w.cut_both_silently(Ep::Tracker(victim), Ep::Tracker(o));
        }
        let cut_at = w.now();
        let bound = LINK_DEADLINE.plus(Millis(4 * max_latency.0 + 100));
        let quiet = until(&mut w, bound, |w| w.tracker_at(victim).is_some_and(|n| n.leader().is_none()));
        let quiet = quiet.unwrap_or_else(|| {
            panic!("seed {seed} round {round}: t{victim} still names {:?} {bound} after the cut", leaders(&w))
        });
        // Writes go on through the majority (a client at the cut-off tracker
        // is told `no quorum` and moves).
        let during = write(&mut w, round % 2, &format!("during{round}"), Millis::from_secs(5));
        let cut_for = Millis(2_000 + rng.below(6_000));
        w.run_for(Millis(cut_for.0.saturating_sub(w.now().since(cut_at).0).max(1)));
        assert!(w.tracker_at(victim).is_some_and(|n| n.leader().is_none()), "seed {seed}: t{victim} is still cut off");
        w.heal();
        let healed = w.now();
        let one = until(&mut w, REJOIN, |w| {
            let l = leaders(w);
            l[0].is_some() && l.iter().all(|x| *x == l[0])
        });
        let one = one
            .unwrap_or_else(|| panic!("seed {seed} round {round}: leaders {:?} {REJOIN} after the heal", leaders(&w)));
        let left = REJOIN.0.saturating_sub(w.now().since(healed).0);
        let after = write(&mut w, (round + 1) % 2, &format!("after{round}"), Millis(left.max(1)));
        let after = w.now().since(healed).max(after);
        for (i, m) in [quiet, during, one, after].into_iter().enumerate() {
            worst[i] = worst[i].max(m);
        }
        w.run_for(Millis(rng.below(2_000)));
    }
    println!("seed={seed} digest={} trackers={trackers} worst={worst:?}", w.digest());
    (worst, w.digest())
}

#[test]
fn silent_partitions_heal_within_a_second_and_a_half() {
    let mut worst = [Millis::ZERO; 4];
    for seed in seeds(24) {
        let (w, _) = sim::run_seed(seed, partitions);
        for i in 0..4 {
            worst[i] = worst[i].max(w[i]);
        }
    }
    println!(
        "worst over the sweep: leaderless after the cut {} ms, write during the cut {} ms, one leader after the heal {} ms, write after the heal {} ms",
        worst[0].0, worst[1].0, worst[2].0, worst[3].0
    );
}

#[test]
fn a_partition_run_replays_bit_for_bit() {
    let seed = sim::seed_from_env(3);
    assert_eq!(partitions(seed).1, partitions(seed).1, "seed {seed} is not deterministic");
}
