//! Deterministic simulation of shoal over the production state machines.
//!
//! A [`World`] holds 1-5 tracker nodes and any number of client engines from
//! `shoal-core`, unchanged, and plays the network and disks between them in
//! virtual time. Every byte a node transmits is delivered after a latency
//! drawn from the world's one seeded PRNG, in order per connection; every
//! timer fires when the node's own (possibly skewed) clock reaches it; every
//! disk operation completes after its own random delay, in any order. No
//! sockets, threads or clocks are involved, so a seed determines the whole
//! run; [`World::digest`] hashes its trace so two runs can be compared bit
//! for bit.
//!
//! Modules, by what they own:
//! - [`world`]: the [`World`], its one clock and queue, and the loop that
//!   feeds the hosts their inputs and carries out their outputs;
//! - [`hosts`]: the simulated trackers and clients;
//! - [`net`]: connections, latency, order, and delivery;
//! - [`disk`]: the simulated disks ([`disk::MemDisk`] for clients,
//!   [`disk::TrackerLog`] for trackers), shared with the turmoil adapter;
//!   [`pieces`]: their files, in pieces shared between files of the same bytes;
//! - [`faults`]: what the world injects: tracker crash and restart (the
//!   durable log kept, memory lost), crashes in the middle of a step, wiped
//!   data dirs, client crashes (part files kept, writes in flight torn),
//!   cuts between any two endpoints in one or both directions, connection
//!   resets, slow peers, corrupt files, full disks, read faults, chunks that
//!   rot at rest, and clock skew;
//! - [`invariants`]: what is checked as it goes (a violation panics at once):
//!   no two trackers apply different entries at the same log index, the
//!   group rules after every decided entry, no write acknowledged before it
//!   is in the log, no chunk written to a part file unless it is the file's,
//!   no block served from a part file before it holds the file's bytes, and
//!   no chunk a resumed download's part file held verified fetched again;
//! - [`turmoil_host`]: the same state machines over turmoil's simulated TCP.

pub mod disk;
pub mod faults;
pub mod hosts;
pub mod invariants;
pub mod net;
pub mod pieces;
pub mod turmoil_host;
pub mod world;

pub use disk::{DiskConfig, MemDisk};
pub use hosts::Rep;
pub use net::{Ep, NetConfig};
pub use world::{Bandwidth, World, WorldConfig};

/// The key id an honest host at `ip` proves: the simulation plays TLS's
/// outcome, not its crypto (each host holds the key derived from its
/// address; a forged identity is a host proving another host's id, or a
/// key no one expects).
pub fn key_of(ip: std::net::IpAddr) -> shoal_core::identity::KeyId {
    shoal_core::identity::KeyId::of_public_key(ip.to_string().as_bytes())
}

/// The seed from `SIM_SEED`, or `default`.
pub fn seed_from_env(default: u64) -> u64 {
    std::env::var("SIM_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

/// Runs one seed of a sweep; if it panics, says how to replay it
/// (`reproduce with SIM_SEED=<n>`) before the panic goes on.
pub fn run_seed<T>(seed: u64, f: impl FnOnce(u64) -> T + std::panic::UnwindSafe) -> T {
    match std::panic::catch_unwind(|| f(seed)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("reproduce with SIM_SEED={seed}");
            std::panic::resume_unwind(e);
        }
    }
}

/// The seeds a sweep test runs: `SIM_SEED` alone, else `SIM_SEEDS` (a count,
/// from 0), else `0..default_count`.
pub fn seeds(default_count: u64) -> Vec<u64> {
    if std::env::var("SIM_SEED").is_ok() {
        return vec![seed_from_env(0)];
    }
    let n = std::env::var("SIM_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(default_count);
    (0..n).collect()
}

/// Runs the shell line `line` on client `c`: its output; a failure panics,
/// naming the line (for tests).
pub fn ok(w: &mut World, c: usize, line: &str) -> Vec<String> {
    w.run(c, line).unwrap_or_else(|e| panic!("`{line}` on c{c} failed: {e}"))
}

/// A swarm's start: clients `0..=leechers` in group `g` (see [`one_group`]),
/// client 0 sharing `content` as `/home/u0/data.bin`, and a directory
/// `/home/dl<c>` for each leecher `c` to download into.
pub fn one_seeder(w: &mut World, leechers: usize, content: &[u8]) {
    one_group(w, leechers + 1);
    for c in 1..=leechers {
        w.mkdir(&format!("/home/dl{c}"));
    }
    w.write_file("/home/u0/data.bin", content);
    ok(w, 0, "upload_file /home/u0/data.bin g");
}

/// Clients `0..clients` make the accounts `u<c>` (password `pw`) and log in;
/// u0 makes the group `g` and accepts every other one into it.
pub fn one_group(w: &mut World, clients: usize) {
    for c in 0..clients {
        ok(w, c, &format!("create_user u{c} pw"));
        ok(w, c, &format!("login u{c} pw"));
    }
    ok(w, 0, "create_group g");
    for c in 1..clients {
        ok(w, c, "join_group g");
        ok(w, 0, &format!("accept_request g u{c}"));
    }
}
