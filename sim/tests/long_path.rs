//! A download over long paths, in virtual time: four sharers 100 ms away
//! (50 ms each way, the tracker too), each sending at most 30 MB/s, and one
//! downloader. A peer's pipeline must hold a round trip of its rate (3 MB)
//! for the path to stay full; three chunks a peer, the depth before it was
//! sized from the measured rate, hold 1.5 MiB, which caps the four at 63 MB/s
//! of the 120 the sharers can send.
//!
//! Checked, for each seed: the download is bit for bit the sharers' file;
//! with the default pipelines the data moves at 0.85x the sharers' 120 MB/s
//! or better (from the first verified chunk to the last, 160 MiB in all:
//! the pipelines' growth in the first round trips included); and with the depth
//! pinned at three chunks (`queue_time` 0) the same download is slower
//! than that, so the check can fail. Printed: both rates.

use shoal_core::chunk::CHUNK_SIZE;
use shoal_core::client::download::DownloadConfig;
use shoal_core::rng::Rng;
use shoal_core::time::Millis;
use sim::{ok, one_group, Bandwidth, NetConfig, World, WorldConfig};

const SHARERS: usize = 4;
/// Each sharer's uplink.
const UP: u64 = 30_000_000;
const CHUNKS: u64 = 320;

fn links(c: usize) -> Bandwidth {
    if c < SHARERS {
        Bandwidth { up: UP, down: 0 }
    } else {
        Bandwidth::default()
    }
}

/// The data phase's rate in bytes/s: the file's bytes after the first
/// verified chunk over the time from it to the last.
fn download(seed: u64, download: Option<DownloadConfig>) -> f64 {
    let net = NetConfig { min_latency: Millis(50), max_latency: Millis(50) };
    let wc = WorldConfig { clients: SHARERS + 1, net, bandwidth: Some(links), download, ..WorldConfig::default() };
    let mut w = World::build(seed, wc);
    let size = (CHUNK_SIZE * CHUNKS) as usize;
    let mut content = vec![0u8; size];
    Rng::from_u64(seed).fill(&mut content);
    one_group(&mut w, SHARERS + 1);
    for c in 0..SHARERS {
        w.write_file(&format!("/home/u{c}/data.bin"), &content);
        ok(&mut w, c, &format!("upload_file /home/u{c}/data.bin g"));
    }
    let d = SHARERS;
    w.mkdir("/home/dl");
    let start = w.now();
    ok(&mut w, d, "download_file g data.bin /home/dl/");
    let mut first: Option<(Millis, u64)> = None;
    let mut last = None;
    loop {
        let line = ok(&mut w, d, "show_downloads").remove(0);
        assert!(!line.starts_with("[F]"), "the download failed: {line}");
        if line.starts_with("[C]") {
            break;
        }
        let verified = w.download_stats(d).first().map_or(0, |s| s.verified);
        if first.is_none() && verified > 0 {
            first = Some((w.now(), verified));
        }
        if last.is_none() && verified == size as u64 {
            last = Some(w.now());
        }
        assert!(w.now().since(start) < Millis::from_secs(120), "no end: {line}");
        w.run_for(Millis(5));
    }
    assert!(w.file("/home/dl/data.bin").as_deref() == Some(&content[..]), "the copy differs from the sharers' file");
    let (at, verified) = first.expect("a chunk was verified before the end");
    let last = last.unwrap_or(w.now());
    (size as u64 - verified) as f64 * 1000.0 / last.since(at).0.max(1) as f64
}

#[test]
fn long_paths_are_kept_full() {
    let bound = (SHARERS as u64 * UP) as f64;
    for seed in sim::seeds(2) {
        let adaptive = sim::run_seed(seed, |s| download(s, None));
        let fixed = DownloadConfig { queue_time: Millis(0), ..DownloadConfig::default() };
        let fixed = sim::run_seed(seed, |s| download(s, Some(fixed)));
        println!(
            "seed={seed} rtt=100ms sharers={SHARERS}x{} MB/s: adaptive {:.1} MB/s ({:.2} of the bound), three chunks a peer {:.1} MB/s ({:.2})",
            UP / 1_000_000,
            adaptive / 1e6,
            adaptive / bound,
            fixed / 1e6,
            fixed / bound
        );
        assert!(adaptive >= 0.85 * bound, "seed {seed}: {:.1} MB/s of {:.0}", adaptive / 1e6, bound / 1e6);
        assert!(fixed < 0.85 * bound, "seed {seed}: three chunks a peer kept up ({:.1} MB/s)", fixed / 1e6);
    }
}
