//! `demo`: a whole shoal cluster in one process, on loopback.
//!
//! Starts the first tracker of `tracker_info.txt` (replication across all of
//! them comes with consensus), two clients, generates a file, shares it in a
//! group and shows the group's view of it. Cleans up after itself.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use shoal_core::client::ClientConfig;
use shoal_core::rng::Rng;
use shoal_core::shell::parse;
use shoal_core::tracker::{SoloReplicator, TrackerConfig, TrackerNode};
use shoal_net_mio::client::ClientHandle;
use shoal_net_mio::tracker::TrackerServer;

#[derive(Parser)]
#[command(name = "demo", version, about = "Runs a local shoal cluster that shares a file")]
struct Args {
    /// The cluster's trackers.
    #[arg(long, default_value = "tracker_info.txt")]
    tracker_info: PathBuf,
    /// Size of the generated file, in MiB.
    #[arg(long, default_value_t = 256)]
    size_mib: u64,
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
    let r = client.run(cmd);
    match r.result {
        Ok(lines) => {
            for l in &lines {
                println!("  [{who}] {line:<40} -> {l}");
            }
            Ok(lines)
        }
        Err(e) => Err(format!("[{who}] {line}: {e}")),
    }
}

fn run(args: &Args) -> Result<(), String> {
    let trackers = shoal_bins::load_tracker_info(&args.tracker_info)?;
    let first = &trackers[0];
    let seed = shoal_net_mio::os_seed().map_err(|e| e.to_string())?;
    let node = TrackerNode::new(TrackerConfig::default(), Rng::from_seed(seed), SoloReplicator::default());
    let server = TrackerServer::bind(first.addr, node).map_err(|e| format!("cannot listen on {}: {e}", first.addr))?;
    println!("tracker {} on {}", first.id, first.addr);
    std::thread::spawn(move || server.run());

    let dir = std::env::temp_dir().join(format!("shoal-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let cleanup = Cleanup(dir.clone());
    let path = dir.join("dataset.bin");
    print!("generating a {} MiB file ... ", args.size_mib);
    let _ = std::io::stdout().flush();
    write_file(&path, args.size_mib << 20).map_err(|e| format!("writing {}: {e}", path.display()))?;
    println!("done");

    let any: SocketAddr = "127.0.0.1:0".parse().expect("valid");
    let start = |_: ()| ClientHandle::start(ClientConfig::new(any, vec![first.addr])).map_err(|e| e.to_string());
    let (alice, bob) = (start(())?, start(())?);
    println!("clients at {} and {}", alice.listen_addr(), bob.listen_addr());
    step(&alice, "alice", "create_user alice pw")?;
    step(&bob, "bob", "create_user bob pw")?;
    step(&alice, "alice", "login alice pw")?;
    step(&bob, "bob", "login bob pw")?;
    step(&alice, "alice", "create_group demo")?;
    step(&bob, "bob", "join_group demo")?;
    step(&alice, "alice", "accept_request demo bob")?;
    let t = Instant::now();
    step(&alice, "alice", &format!("upload_file {} demo", path.display()))?;
    let secs = t.elapsed().as_secs_f64();
    println!("  hashed {} MiB in {secs:.2} s ({:.0} MB/s)", args.size_mib, (args.size_mib << 20) as f64 / secs / 1e6);
    step(&bob, "bob", "list_files demo")?;
    let dest = dir.join("download");
    if let Err(e) = step(&bob, "bob", &format!("download_file demo dataset.bin {}", dest.display())) {
        println!("  {e}");
    }
    step(&alice, "alice", "exit")?;
    step(&bob, "bob", "exit")?;
    drop(cleanup);
    println!("demo finished");
    Ok(())
}

/// Pseudo-random content, written in 1 MiB blocks.
fn write_file(path: &std::path::Path, size: u64) -> std::io::Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut rng = Rng::from_u64(size);
    let mut block = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        rng.fill(&mut block);
        let n = left.min(block.len() as u64) as usize;
        f.write_all(&block[..n])?;
        left -= n as u64;
    }
    f.flush()
}

struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
