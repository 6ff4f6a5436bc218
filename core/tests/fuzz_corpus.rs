//! Replays the fuzz corpus and every crash ever found through the fuzz target
//! bodies, on stable, with each `cargo test`: CI guards them without nightly.
//!
//! `fuzz/corpus/<target>/` holds the seeds (and what fuzzing runs added);
//! `fuzz/regressions/<target>/` holds inputs that once crashed.

use std::path::Path;

use shoal_core::fuzzing;

/// A fuzz target: its name and its body.
type Target = (&'static str, fn(&[u8]));

fn replay(target: &str, f: fn(&[u8])) -> usize {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut n = 0;
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else { continue };
        let mut paths: Vec<_> = entries.map(|e| e.unwrap().path()).collect();
        paths.sort();
        for p in paths {
            let data = std::fs::read(&p).unwrap();
            f(&data);
            n += 1;
        }
    }
    n
}

#[test]
fn every_corpus_input_passes_its_target() {
    let targets: [Target; 12] = [
        ("frame_stream", fuzzing::frame_stream),
        ("message", fuzzing::message),
        ("shell_command", fuzzing::shell_command),
        ("tracker_info", fuzzing::tracker_info),
        ("tracker_node", fuzzing::tracker_node),
        ("peer_message", fuzzing::peer_message),
        ("download_peer", fuzzing::download_peer),
        ("download_stream", fuzzing::download_stream),
        ("sidecar", fuzzing::sidecar),
        ("wal_log", fuzzing::wal_log),
        ("tracker_link", fuzzing::tracker_link),
        ("tracker_frames", fuzzing::tracker_frames),
    ];
    for (name, f) in targets {
        let n = replay(name, f);
        assert!(n > 0, "no corpus for fuzz target {name}");
    }
}
