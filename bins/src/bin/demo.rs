//! `demo`: a whole shoal swarm in one process, on loopback.
//!
//! Starts the trackers of `tracker_info.txt` (replicating in memory), three clients, generates a file, shares it from two of
//! them, downloads it on the third from both at once with live progress, stops
//! one sharer abruptly halfway, checks the result's SHA1 and prints a summary.
//! Cleans up after itself.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use shoal_core::client::ClientConfig;
use shoal_core::shell::parse;
use shoal_net_mio::client::ClientHandle;

#[derive(Parser)]
#[command(name = "demo", version, about = "Runs a local shoal swarm that shares and downloads a file")]
struct Args {
    /// The cluster's trackers.
    #[arg(long, default_value = "tracker_info.txt")]
    tracker_info: PathBuf,
    /// Size of the generated file, in MiB.
    #[arg(long, default_value_t = 256)]
    size_mib: u64,
    /// Cap each sharer's upload rate (MB/s), to watch the download at leisure.
    #[arg(long)]
    sharer_rate: Option<f64>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    shoal_bins::init_logging();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn step(client: &ClientHandle, who: &str, line: &str) -> Result<Vec<String>, String> {
    let cmd = parse(line).map_err(|e| e.to_string())?;
    match client.run(cmd).result {
        Ok(lines) => {
            for l in &lines {
                println!("  {who:>5}> {line:<44} {l}");
            }
            Ok(lines)
        }
        Err(e) => Err(format!("{who}: {line}: {e}")),
    }
}

fn run(args: &Args) -> Result<(), String> {
    let trackers = shoal_bins::load_tracker_info(&args.tracker_info)?;
    // In memory, a key pair each; the clients are told the trackers' ids.
    let mut identities = Vec::new();
    for _ in &trackers {
        identities.push(shoal_net_mio::tls::Identity::ephemeral().map_err(|e| e.to_string())?);
    }
    let keys: Vec<_> = identities.iter().map(|i| i.id()).collect();
    for (t, identity) in trackers.iter().zip(identities) {
        let http = shoal_bins::spawn_tracker(&trackers, t.id, identity, &keys)?;
        println!("tracker {} listening on {}", t.id, t.addr);
        if let Some(a) = http {
            println!("  dashboard: http://{a}/ (metrics: http://{a}/metrics)");
        }
    }
    let tracker_addrs: Vec<SocketAddr> = trackers.iter().map(|t| t.addr).collect();

    let dir = std::env::temp_dir().join(format!("shoal-demo-{}", std::process::id()));
    let _cleanup = Cleanup(dir.clone());
    std::fs::create_dir_all(dir.join("downloads")).map_err(|e| e.to_string())?;
    let path = dir.join("dataset.bin");
    print!("generating a {} MiB file ... ", args.size_mib);
    let _ = std::io::stdout().flush();
    shoal_bins::write_random_file(&path, args.size_mib << 20)
        .map_err(|e| format!("writing {}: {e}", path.display()))?;
    println!("done");

    let any: SocketAddr = "127.0.0.1:0".parse().expect("valid");
    let start = |rate: Option<f64>| {
        let mut cfg = ClientConfig::new(any, tracker_addrs.clone());
        cfg.tracker_keys = keys.iter().copied().map(Some).collect();
        cfg.max_upload_rate = rate.map(|r| (r * 1e6) as u64);
        ClientHandle::start(cfg).map_err(|e| e.to_string())
    };
    let alice = start(args.sharer_rate)?;
    let bob = start(args.sharer_rate)?;
    let carol = start(None)?;
    println!("clients: alice {}, bob {}, carol {}", alice.listen_addr(), bob.listen_addr(), carol.listen_addr());
    for (c, who) in [(&alice, "alice"), (&bob, "bob"), (&carol, "carol")] {
        step(c, who, &format!("create_user {who} pw"))?;
        step(c, who, &format!("login {who} pw"))?;
    }
    step(&alice, "alice", "create_group demo")?;
    for (c, who) in [(&bob, "bob"), (&carol, "carol")] {
        step(c, who, "join_group demo")?;
        step(&alice, "alice", &format!("accept_request demo {who}"))?;
    }
    step(&alice, "alice", &format!("upload_file {} demo", path.display()))?;
    step(&bob, "bob", &format!("upload_file {} demo", path.display()))?;
    step(&carol, "carol", "list_files demo")?;

    let t = Instant::now();
    step(&carol, "carol", &format!("download_file demo dataset.bin {}", dir.join("downloads").display()))?;
    let mut bob = Some(bob);
    let mut last_print = Instant::now() - Duration::from_secs(1);
    loop {
        let stats = carol.download_stats();
        let Some(d) = stats.first() else { return Err("the download vanished".into()) };
        if let Some(e) = &d.failed {
            return Err(format!("download failed: {e}"));
        }
        let pct = (d.verified * 100).checked_div(d.size).unwrap_or(100);
        if d.complete {
            break;
        }
        if last_print.elapsed() >= Duration::from_millis(200) {
            let secs = t.elapsed().as_secs_f64().max(1e-3);
            println!("  carol  {pct:3}%  {:7.1} MB/s  from {} peers", d.verified as f64 / secs / 1e6, d.supplied.len());
            last_print = Instant::now();
        }
        if pct >= 50 && bob.is_some() {
            drop(bob.take());
            println!("  bob    stopped abruptly at {pct}% (no logout): carol carries on with alice");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let secs = t.elapsed().as_secs_f64();
    let got = dir.join("downloads/dataset.bin");
    let (a, b) = (sha1_of(&path)?, sha1_of(&got)?);
    let stats = carol.download_stats();
    let d = &stats[0];
    println!();
    println!("summary");
    println!("  file          {} MiB, sha1 {a}", args.size_mib);
    println!("  downloaded    in {secs:.2} s, {:.0} MB/s", d.size as f64 / secs / 1e6);
    for (addr, bytes) in &d.supplied {
        let who = if *addr == alice.listen_addr() { "alice" } else { "bob" };
        println!("  from {who:<8} {addr}  {:6.1} MiB", *bytes as f64 / (1 << 20) as f64);
    }
    println!("  verified      {}", if a == b { "whole-file SHA1 matches" } else { "MISMATCH" });
    if bob.is_some() {
        println!("  (the download finished before bob could be stopped; try a larger --size-mib or --sharer-rate)");
    }
    step(&alice, "alice", "exit")?;
    step(&carol, "carol", "exit")?;
    if a != b {
        return Err("the downloaded file differs".into());
    }
    println!("demo finished; removed {}", dir.display());
    Ok(())
}

fn sha1_of(path: &Path) -> Result<String, String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut h = shoal_core::chunk::FileHasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]).map_err(|e| e.to_string())?;
    }
    Ok(h.finish().map_err(|e| e.to_string())?.sha1.to_hex())
}

struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
