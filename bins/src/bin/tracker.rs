//! `tracker tracker_info.txt <tracker_id>`: runs one tracker of the cluster.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use shoal_core::rng::Rng;
use shoal_core::tracker::{NodeId, OmniReplicator, SoloReplicator, TrackerConfig, TrackerNode};
use shoal_net_mio::tls::Identity;
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
    /// This tracker's private key, made on first start: its identity. Kept
    /// beside the data dir, not in it, so a tracker whose data is lost keeps
    /// its identity and catches up [default: <data dir>.key].
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// Print this tracker's key id (making its key on first use) and exit:
    /// what to pin on its line of tracker_info.txt.
    #[arg(long)]
    show_id: bool,
    /// Decided log entries between snapshots of the metadata (etcd's
    /// --snapshot-count); each tracker compacts its own log.
    #[arg(long, value_name = "ENTRIES", default_value_t = shoal_core::tracker::omni::SNAPSHOT_EVERY,
          value_parser = clap::value_parser!(usize))]
    snapshot_every: usize,
    /// Serve `/metrics` (Prometheus text format), `/status` (JSON) and a
    /// live dashboard (`/`) over plain HTTP at this address, e.g.
    /// 127.0.0.1:8081 (port 0: any free one). Off unless given.
    #[arg(long, value_name = "ADDR")]
    http: Option<SocketAddr>,
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
    // Every log line of the event loop names its tracker (several often
    // share one terminal or log file); an error-level span is shown at
    // every log level.
    let _named = tracing::error_span!("tracker", id = me.id).entered();
    let seed = shoal_net_mio::os_seed().map_err(|e| format!("no randomness from the OS: {e}"))?;
    let dir = args.data_dir.clone().unwrap_or_else(|| PathBuf::from(format!("shoal-tracker-{}", me.id)));
    let key_file = args.key_file.clone().unwrap_or_else(|| {
        let mut name = dir.file_name().map(|n| n.to_os_string()).unwrap_or_else(|| "shoal-tracker".into());
        name.push(".key");
        dir.with_file_name(name)
    });
    let identity = Identity::load_or_create(&key_file).map_err(|e| e.to_string())?;
    let my_key = identity.id();
    if args.show_id {
        println!("{my_key}");
        return Ok(());
    }
    match me.key {
        Some(pinned) if pinned != my_key => {
            return Err(format!(
                "{} pins key {pinned} for tracker {}, but this tracker's key ({}) is {my_key}",
                args.tracker_info.display(),
                me.id,
                key_file.display()
            ))
        }
        Some(_) => {}
        None => shoal_bins::publish_key(&args.tracker_info, me.id, my_key, &key_file)?,
    }
    shoal_bins::check_data_format(&dir)?;
    let opened = WalFile::open(&dir)?;
    let ranges = shoal_net_mio::ranges::RangeStore::open(&dir)?;
    let log = opened.wal.path().display().to_string();
    let (replayed, torn_bytes) = (opened.records.len(), opened.torn_bytes);
    let records = opened.records.iter().map(|r| r.as_slice());
    let peers: Vec<_> = trackers.iter().filter(|t| t.id != me.id).collect();
    let http = args.http.map(|addr| {
        if !addr.ip().is_loopback() {
            eprintln!("warning: --http {addr}: the dashboard and metrics are plain HTTP, readable by anyone who reaches that address");
        }
        shoal_net_mio::http::HttpConfig {
            addr,
            trackers: trackers.iter().map(|t| (t.id as NodeId, t.addr)).collect(),
            log_path: Some(opened.wal.path().to_path_buf()),
            range_store_path: Some(dir.join("ranges.redb")),
        }
    });
    // Known by key: pinned in tracker_info.txt, or published beside it (read
    // again while one is missing, so trackers may start in any order).
    let cfg = TrackerConfig {
        peer_keys: peers.iter().filter_map(|t| t.key.map(|k| (t.id as NodeId, k))).collect(),
        ..TrackerConfig::default()
    };
    let key_dir = shoal_bins::key_dir(&args.tracker_info);
    let peer_list: Vec<String> = peers.iter().map(|t| format!("{} at {}", t.id, t.addr)).collect();
    let torn = if torn_bytes > 0 { format!(" (cut a torn tail of {torn_bytes} bytes)") } else { String::new() };
    let banner = |addr: SocketAddr| {
        println!("tracker {} listening on {addr}", me.id);
        println!("peers: {}", if peer_list.is_empty() { "none".into() } else { peer_list.join(", ") });
        println!("data: {} ({replayed} log records replayed){torn}", dir.display());
        println!("key id: {my_key}");
    };
    if peers.is_empty() {
        let rep = SoloReplicator::recover(records).map_err(|e| format!("{log}: unreadable record: {e}"))?;
        let node = TrackerNode::new(cfg, Rng::from_seed(seed), rep);
        let server = TrackerServer::bind(me.addr, node, &identity)
            .map_err(|e| format!("cannot listen on {}: {e}", me.addr))?
            .with_wal(opened.wal)
            .map_err(|e| format!("cannot start the log's sync thread: {e}"))?
            .with_range_store(ranges)
            .map_err(|e| format!("cannot read the range store: {e}"))?;
        banner(server.local_addr().map_err(|e| e.to_string())?);
        let server = serve_http(server, http)?;
        println!("leader: tracker {} (this one, alone)", me.id);
        return server.run().map_err(|e| format!("tracker stopped: {e}"));
    }
    let nodes: Vec<NodeId> = trackers.iter().map(|t| t.id as NodeId).collect();
    if args.snapshot_every == 0 {
        return Err("--snapshot-every must be at least 1".into());
    }
    let rep = OmniReplicator::recover(me.id as NodeId, &nodes, records)
        .map_err(|e| format!("{log}: {e}"))?
        .with_snapshot_every(args.snapshot_every);
    let log_line = format!("log: decided up to entry {}, snapshot up to {}", rep.decided_idx(), rep.compacted_idx());
    let node = TrackerNode::new(cfg, Rng::from_seed(seed), rep);
    let me_id = me.id as NodeId;
    let server = TrackerServer::bind(me.addr, node, &identity)
        .map_err(|e| format!("cannot listen on {}: {e}", me.addr))?
        .with_wal(opened.wal)
        .map_err(|e| format!("cannot start the log's sync thread: {e}"))?
        .with_range_store(ranges)
        .map_err(|e| format!("cannot read the range store: {e}"))?
        .with_partial_dir(&dir)
        .with_peers(peers.iter().map(|t| (t.id as NodeId, t.addr)))
        .with_key_dir(key_dir)
        .on_leader_change(move |leader| {
            match leader {
                Some(l) if l == me_id => println!("leader: tracker {l} (this one)"),
                Some(l) => println!("leader: tracker {l}"),
                None => println!("leader: none known"),
            }
            let _ = std::io::Write::flush(&mut std::io::stdout());
        });
    banner(server.local_addr().map_err(|e| e.to_string())?);
    println!("{log_line}");
    let server = serve_http(server, http)?;
    server.run().map_err(|e| format!("tracker stopped: {e}"))
}

/// Serves the HTTP page of `--http`, if asked, and says where.
fn serve_http<R: shoal_core::tracker::Replicator>(
    server: TrackerServer<R>,
    http: Option<shoal_net_mio::http::HttpConfig>,
) -> Result<TrackerServer<R>, String> {
    let Some(cfg) = http else { return Ok(server) };
    let server = server.with_http(cfg).map_err(|e| e.to_string())?;
    if let Some(a) = server.http_addr() {
        println!("dashboard: http://{a}/ (metrics: http://{a}/metrics, status: http://{a}/status)");
    }
    Ok(server)
}
