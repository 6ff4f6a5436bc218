//! `tracker tracker_info.txt <tracker_id>`: runs one tracker of the cluster.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use shoal_core::rng::Rng;
use shoal_core::tracker::{SoloReplicator, TrackerConfig, TrackerNode};
use shoal_net_mio::tracker::TrackerServer;
use shoal_net_mio::wal::WalFile;

/// A shoal tracker: holds accounts, groups and the files they share.
#[derive(Parser)]
#[command(name = "tracker", version, about)]
struct Args {
    /// The cluster's trackers, one `IP PORT` or `IP:PORT` a line.
    tracker_info: PathBuf,
    /// Which of them this is: the 1-based line number in tracker_info.
    tracker_id: u32,
    /// Where this tracker keeps its log [default: ./shoal-tracker-<tracker_id>].
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    shoal_bins::init_logging();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), String> {
    let trackers = shoal_bins::load_tracker_info(&args.tracker_info)?;
    let me = trackers.iter().find(|t| t.id == args.tracker_id).ok_or_else(|| {
        let ids: Vec<String> = trackers.iter().map(|t| t.id.to_string()).collect();
        format!("no tracker {} in {} (ids: {})", args.tracker_id, args.tracker_info.display(), ids.join(", "))
    })?;
    let seed = shoal_net_mio::os_seed().map_err(|e| format!("no randomness from the OS: {e}"))?;
    let mut node = TrackerNode::new(TrackerConfig::default(), Rng::from_seed(seed), SoloReplicator::default());
    let dir = args.data_dir.clone().unwrap_or_else(|| PathBuf::from(format!("shoal-tracker-{}", me.id)));
    let opened = WalFile::open(&dir)?;
    for (i, r) in opened.records.iter().enumerate() {
        node.restore(r).map_err(|e| format!("{}: record {} is unreadable: {e}", opened.wal.path().display(), i + 1))?;
    }
    let (replayed, torn_bytes) = (opened.records.len(), opened.torn_bytes);
    let server = TrackerServer::bind(me.addr, node)
        .map_err(|e| format!("cannot listen on {}: {e}", me.addr))?
        .with_wal(opened.wal);
    let peers: Vec<String> =
        trackers.iter().filter(|t| t.id != me.id).map(|t| format!("{} at {}", t.id, t.addr)).collect();
    println!("tracker {} listening on {}", me.id, server.local_addr().map_err(|e| e.to_string())?);
    println!("peers: {}", if peers.is_empty() { "none".into() } else { peers.join(", ") });
    let torn = if torn_bytes > 0 { format!(" (cut a torn tail of {torn_bytes} bytes)") } else { String::new() };
    println!("data: {} ({replayed} log records replayed){torn}", dir.display());
    server.run().map_err(|e| format!("tracker stopped: {e}"))
}
