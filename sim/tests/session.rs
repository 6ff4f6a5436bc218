//! A scripted session through one tracker node and two client engines, in
//! virtual time, over many seeds. `SIM_SEED=<n>` replays one seed.

use shoal_core::chunk::{Sha1Digest, CHUNK_SIZE};
use shoal_core::time::Millis;
use sim::{ok, seed_from_env, NetConfig, World};

fn err(w: &mut World, c: usize, line: &str) -> String {
    match w.run(c, line) {
        Ok(lines) => panic!("`{line}` on c{c} should fail, printed {lines:?}"),
        Err(e) => e.to_string(),
    }
}

/// Plays the session; returns the world for inspection.
fn session(seed: u64) -> World {
    let net = NetConfig { min_latency: Millis(1), max_latency: Millis(1 + seed % 200) };
    let mut w = World::new(seed, 2, net);
    let content: Vec<u8> = (0..(2 * CHUNK_SIZE + 17)).map(|i| (i % 251) as u8).collect();
    let sha = Sha1Digest::of(&content).to_hex();
    w.write_file("/home/a/movie.mkv", &content);
    w.write_file("/home/b/movie.mkv", &content);

    assert_eq!(err(&mut w, 0, "list_groups"), "not logged in");
    ok(&mut w, 0, "create_user alice pw");
    ok(&mut w, 1, "create_user bob pw");
    assert_eq!(err(&mut w, 1, "create_user alice x"), "user already exists");
    assert_eq!(err(&mut w, 0, "login alice nope"), "wrong user id or password");
    ok(&mut w, 0, "login alice pw");
    ok(&mut w, 1, "login bob pw");
    ok(&mut w, 0, "create_group movies");
    assert_eq!(err(&mut w, 1, "list_files movies"), "not a member of this group");
    ok(&mut w, 1, "join_group movies");
    assert_eq!(ok(&mut w, 0, "list_requests movies"), vec!["bob"]);
    ok(&mut w, 0, "accept_request movies bob");
    assert_eq!(
        ok(&mut w, 0, "upload_file /home/a/movie.mkv movies"),
        vec![format!("shared movie.mkv in movies: {} bytes, 3 chunks, sha1 {sha}", 2 * CHUNK_SIZE + 17)]
    );
    ok(&mut w, 1, "upload_file /home/b/movie.mkv movies");
    assert_eq!(ok(&mut w, 1, "list_files movies"), vec![format!("movie.mkv {} bytes 2 peers", 2 * CHUNK_SIZE + 17)]);
    // Sessions stay live through heartbeats while the clients are idle.
    w.run_for(Millis::from_secs(60));
    assert_eq!(ok(&mut w, 0, "list_files movies"), vec![format!("movie.mkv {} bytes 2 peers", 2 * CHUNK_SIZE + 17)]);
    ok(&mut w, 1, "logout");
    assert_eq!(ok(&mut w, 0, "list_files movies"), vec![format!("movie.mkv {} bytes 1 peer", 2 * CHUNK_SIZE + 17)]);
    ok(&mut w, 0, "leave_group movies");
    ok(&mut w, 1, "login bob pw");
    assert_eq!(ok(&mut w, 1, "list_my_groups"), vec!["movies (owner)"]);
    assert_eq!(ok(&mut w, 1, "list_files movies"), vec![format!("movie.mkv {} bytes 1 peer", 2 * CHUNK_SIZE + 17)]);
    ok(&mut w, 1, "stop_share movies movie.mkv");
    assert_eq!(ok(&mut w, 1, "list_files movies"), vec!["no files in movies"]);
    ok(&mut w, 1, "exit");
    w
}

#[test]
fn scripted_session_over_many_seeds() {
    for seed in sim::seeds(64) {
        let w = sim::run_seed(seed, session);
        println!("seed={seed} digest={} steps={} virtual_ms={}", w.digest(), w.steps(), w.now().0);
    }
}

#[test]
fn same_seed_same_trace() {
    let seed = seed_from_env(7);
    let a = session(seed);
    let b = session(seed);
    assert_eq!(a.digest(), b.digest(), "seed {seed} is not deterministic");
    assert_eq!(a.tracker().meta(), b.tracker().meta());
    let c = session(seed + 1);
    assert_ne!(a.digest(), c.digest(), "the digest must depend on the run");
}

/// A tracker rebuilt from its durable log holds exactly the same metadata.
#[test]
fn the_log_replays_to_the_same_state() {
    use shoal_core::meta::PasswordParams;
    use shoal_core::rng::Rng;
    use shoal_core::tracker::{SoloReplicator, TrackerConfig, TrackerNode};
    let w = session(seed_from_env(3));
    assert!(!w.tracker_log(0).is_empty());
    let cfg = TrackerConfig { password_params: PasswordParams::INSECURE_FAST, ..TrackerConfig::default() };
    let rep = SoloReplicator::recover(w.tracker_log(0).iter().map(|r| r.as_slice())).unwrap();
    let fresh = TrackerNode::new(cfg, Rng::from_u64(99), rep);
    assert_eq!(fresh.meta(), w.tracker().meta());
}
