//! What a tracker's in-memory state costs to copy, encode and decode with N
//! one-chunk files in 3,000 groups (default 300,000). A snapshot copies it
//! (O(1): persistent maps) and the sync thread encodes it; a follower sent a
//! snapshot decodes it on its event loop.
//!
//! `cargo run --release -p shoal-core --example state_cost -- 300000`
use shoal_core::chunk::{range_hash, FileIndex, FileRecord, Sha1Digest};
use shoal_core::ids::{FileName, GroupId, SessionToken, UserId};
use shoal_core::meta::{Command, Entry, MetaState, PasswordHash, PasswordParams};
use std::time::Instant;
fn main() {
    let n: u64 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(300_000);
    let base = rss_bytes();
    let mut s = MetaState::new();
    let e = |cmd| Entry { id: None, settled_below: 0, cmd };
    let u = UserId::new("bench").unwrap();
    s.apply(&e(Command::CreateUser {
        user: u.clone(),
        password: PasswordHash::derive("pw", [0; 16], PasswordParams::INSECURE_FAST),
    }))
    .unwrap();
    let t = SessionToken([1; 16]);
    s.apply(&e(Command::OpenSession { user: u, token: t, listen: "127.0.0.1:9".parse().unwrap() })).unwrap();
    for g in 0..3000 {
        s.apply(&e(Command::CreateGroup { token: t, group: GroupId::new(format!("fg{g}")).unwrap() })).unwrap();
    }
    for i in 0..n {
        let mut sha = [0x5au8; 20];
        sha[..8].copy_from_slice(&i.to_be_bytes());
        let sha1 = Sha1Digest(sha);
        let file = FileRecord {
            name: FileName::new(format!("f{i}")).unwrap(),
            index: FileIndex { size: 1000, sha1, ranges: vec![range_hash(&[sha1])] },
        };
        s.apply(&e(Command::AddFile { token: t, group: GroupId::new(format!("fg{}", i % 3000)).unwrap(), file }))
            .unwrap();
    }
    let held = rss_bytes().saturating_sub(base);
    println!("{n} files: {} MB resident for the state, {} bytes a file", held / 1_000_000, held / n.max(1));
    let t0 = Instant::now();
    let c = s.clone();
    let clone = t0.elapsed();
    let t0 = Instant::now();
    let b = postcard::to_allocvec(&c).unwrap();
    let ser = t0.elapsed();
    let t0 = Instant::now();
    let d: MetaState = postcard::from_bytes(&b).unwrap();
    let de = t0.elapsed();
    let t0 = Instant::now();
    let eq = d == s;
    let cmp = t0.elapsed();
    println!(
        "{n} files: encoded {} MB; clone {:?}, encode {:?}, decode {:?}, compare {:?} ({eq})",
        b.len() / 1_000_000,
        clone,
        ser,
        de,
        cmp
    );
}

/// This process's resident memory (Linux; 0 elsewhere).
fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
    pages * 4096
}
