//! Shared start-up code of the `tracker` and `client` programs: logging and
//! reading `tracker_info.txt`. Thin by design; logic lives in `shoal-core`.

use std::io::{self, BufRead, Read};
use std::path::{Path, PathBuf};

use shoal_core::identity::KeyId;

use shoal_core::config::{parse_tracker_info, TrackerEntry, MAX_TRACKER_INFO_LEN};

pub mod procs;
pub mod relay;

/// Logs go to stderr, quiet (warnings only) unless `RUST_LOG` says otherwise.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    // Colours only on a terminal: a log file or a pipe gets plain text.
    let ansi = io::IsTerminal::is_terminal(&io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(io::stderr).with_target(false).with_ansi(ansi).init();
}

/// Reads and parses `tracker_info.txt`, with a one-line error naming the file.
pub fn load_tracker_info(path: &Path) -> Result<Vec<TrackerEntry>, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut text = String::new();
    file.take(MAX_TRACKER_INFO_LEN as u64 + 1)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    parse_tracker_info(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// The layout of a tracker's data dir this build reads and writes: 2 keeps
/// chunk lists in the range store beside the log (`ranges.redb`), where
/// format 1 (no `format` file) kept them inside the log's entries.
pub const DATA_FORMAT: u32 = 2;

/// Checks that `dir` holds a tracker's data in [`DATA_FORMAT`] (marking a new
/// dir so), with a one-line error for one written by another version, which
/// this build must not read as its own.
pub fn check_data_format(dir: &Path) -> Result<(), String> {
    let marker = dir.join("format");
    let line = format!("shoal tracker data, format {DATA_FORMAT}\n");
    match std::fs::read_to_string(&marker) {
        Ok(text) if text == line => return Ok(()),
        Ok(text) => {
            return Err(format!(
                "{}: this data dir says {:?}, and this tracker reads only format {DATA_FORMAT}",
                marker.display(),
                text.trim()
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot read {}: {e}", marker.display())),
    }
    let log = dir.join("log");
    let used = match std::fs::read(&log) {
        Ok(bytes) => bytes.iter().any(|&b| b != 0),
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => return Err(format!("cannot read {}: {e}", log.display())),
    };
    if used {
        return Err(format!(
            "{} was written by an earlier shoal (data format 1, chunk lists inside the log); this tracker reads \
             format {DATA_FORMAT}: start it on an empty data dir (it catches up from the others)",
            log.display()
        ));
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let write = || -> io::Result<()> {
        let f = std::fs::File::create(&marker)?;
        io::Write::write_all(&mut &f, line.as_bytes())?;
        f.sync_all()?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(|e| format!("cannot write {}: {e}", marker.display()))
}

/// Where trackers whose line in `tracker_info` pins no key publish their
/// key ids, one file a tracker named by its id: `tracker_info.keys/` beside
/// `tracker_info.txt`. On one host that is all the set-up a cluster needs;
/// across hosts, pin the ids in `tracker_info.txt` instead (README, "Trust").
pub fn key_dir(tracker_info: &Path) -> PathBuf {
    tracker_info.with_extension("keys")
}

/// The key id tracker `id` published beside `tracker_info`, if any.
pub fn published_key(tracker_info: &Path, id: u32) -> Option<Result<KeyId, String>> {
    let path = key_dir(tracker_info).join(id.to_string());
    let text = std::fs::read_to_string(&path).ok()?;
    Some(text.trim().parse().map_err(|e| format!("{}: {e}", path.display())))
}

/// Publishes this tracker's key id beside `tracker_info`. Refuses if another
/// key is published there for the same id: two trackers claim that line.
pub fn publish_key(tracker_info: &Path, id: u32, key: KeyId, key_file: &Path) -> Result<(), String> {
    let dir = key_dir(tracker_info);
    let path = dir.join(id.to_string());
    match published_key(tracker_info, id) {
        Some(Ok(k)) if k == key => return Ok(()),
        Some(Ok(k)) => {
            return Err(format!(
                "{} names key {k} for tracker {id}, but this tracker's key ({}) is {key}: another tracker {id} exists. \
                 If this is the real one (its data dir was replaced), delete that file",
                path.display(),
                key_file.display()
            ))
        }
        _ => {}
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let tmp = dir.join(format!(".{id}.tmp"));
    std::fs::write(&tmp, format!("{key}\n")).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, &path).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// The key each tracker must prove, in `trackers`' order: the one its line
/// pins, or the one it published beside `tracker_info`.
pub fn tracker_keys(tracker_info: &Path, trackers: &[TrackerEntry]) -> Vec<Option<KeyId>> {
    trackers.iter().map(|t| t.key.or_else(|| published_key(tracker_info, t.id).and_then(Result::ok))).collect()
}

/// Writes `size` bytes of seeded pseudo-random content, in 1 MiB blocks
/// (demo and bench data: incompressible, reproducible).
pub fn write_random_file(path: &Path, size: u64) -> io::Result<()> {
    use std::io::Write;
    let mut f = io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    let mut rng = shoal_core::rng::Rng::from_u64(size);
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

/// A line of input, or why it was refused.
pub enum Line {
    Text(String),
    TooLong,
    NotUtf8,
}

/// Reads one line of at most `max` bytes (without its newline). A longer line
/// is consumed and reported as [`Line::TooLong`] without buffering it whole.
pub fn read_line_bounded(r: &mut impl BufRead, max: usize) -> io::Result<Option<Line>> {
    let mut buf = Vec::new();
    let mut too_long = false;
    let mut saw_any = false;
    loop {
        let avail = r.fill_buf()?;
        if avail.is_empty() {
            if !saw_any {
                return Ok(None);
            }
            break;
        }
        saw_any = true;
        let (part, found) = match avail.iter().position(|&b| b == b'\n') {
            Some(i) => (&avail[..i], Some(i)),
            None => (avail, None),
        };
        if !too_long {
            if buf.len() + part.len() > max {
                too_long = true;
                buf = Vec::new();
            } else {
                buf.extend_from_slice(part);
            }
        }
        let used = found.map_or(avail.len(), |i| i + 1);
        r.consume(used);
        if found.is_some() {
            break;
        }
    }
    if too_long {
        return Ok(Some(Line::TooLong));
    }
    if buf.last() == Some(&b'\r') {
        buf.pop();
    }
    Ok(Some(String::from_utf8(buf).map_or(Line::NotUtf8, Line::Text)))
}

/// Runs tracker `id` of `trackers` on a thread of this process, in memory
/// (no data dir), proving `identity`; `keys` are the trackers' key ids by
/// position in `trackers`: the demo's cluster. Returns once it listens,
/// with where its dashboard is served (trackers of a cluster serve one).
pub fn spawn_tracker(
    trackers: &[shoal_core::config::TrackerEntry],
    id: u32,
    identity: shoal_net_mio::tls::Identity,
    keys: &[KeyId],
) -> Result<Option<std::net::SocketAddr>, String> {
    use shoal_core::tracker::{NodeId, OmniReplicator, SoloReplicator, TrackerConfig, TrackerNode};
    use shoal_net_mio::tracker::TrackerServer;
    let peer_keys = trackers.iter().zip(keys).filter(|(t, _)| t.id != id).map(|(t, k)| (t.id as NodeId, *k)).collect();
    let cfg = TrackerConfig { peer_keys, ..TrackerConfig::default() };
    let me = trackers.iter().find(|t| t.id == id).ok_or_else(|| format!("no tracker {id}"))?.clone();
    let peers: Vec<(NodeId, std::net::SocketAddr)> =
        trackers.iter().filter(|t| t.id != id).map(|t| (t.id as NodeId, t.addr)).collect();
    let nodes: Vec<NodeId> = trackers.iter().map(|t| t.id as NodeId).collect();
    let all: Vec<(NodeId, std::net::SocketAddr)> = trackers.iter().map(|t| (t.id as NodeId, t.addr)).collect();
    let seed = shoal_net_mio::os_seed().map_err(|e| e.to_string())?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name(format!("tracker-{id}"))
        .spawn(move || {
            let rng = shoal_core::rng::Rng::from_seed(seed);
            let bind_err = |e: io::Error| format!("cannot listen on {}: {e}", me.addr);
            let result = if peers.is_empty() {
                let node = TrackerNode::new(cfg, rng, SoloReplicator::default());
                TrackerServer::bind(me.addr, node, &identity).map_err(bind_err).map(|s| {
                    let _ = tx.send(Ok(None));
                    s.run()
                })
            } else {
                let rep = match OmniReplicator::recover(me.id as NodeId, &nodes, std::iter::empty()) {
                    Ok(r) => r,
                    Err(e) => return drop(tx.send(Err(e.to_string()))),
                };
                let node = TrackerNode::new(cfg, rng, rep);
                // Each tracker's dashboard and metrics on a free loopback port.
                let http = shoal_net_mio::http::HttpConfig {
                    addr: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
                    trackers: all,
                    log_path: None,
                    range_store_path: None,
                };
                TrackerServer::bind(me.addr, node, &identity).map_err(bind_err).and_then(|s| {
                    let s = s.with_peers(peers).with_http(http).map_err(|e| e.to_string())?;
                    let _ = tx.send(Ok(s.http_addr()));
                    Ok(s.run())
                })
            };
            if let Err(e) = result {
                let _ = tx.send(Err(e));
            }
        })
        .map_err(|e| e.to_string())?;
    rx.recv().map_err(|_| format!("tracker {id} stopped at start"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(input: &[u8], max: usize) -> Vec<String> {
        let mut r = io::BufReader::with_capacity(4, input);
        let mut out = Vec::new();
        while let Some(l) = read_line_bounded(&mut r, max).unwrap() {
            out.push(match l {
                Line::Text(s) => s,
                Line::TooLong => "<long>".into(),
                Line::NotUtf8 => "<bin>".into(),
            });
        }
        out
    }

    #[test]
    fn bounded_lines() {
        assert_eq!(lines(b"ab\r\ncdefgh\n\nxy", 4), vec!["ab", "<long>", "", "xy"]);
        assert_eq!(lines(b"\xff\n", 4), vec!["<bin>"]);
        assert!(lines(b"", 4).is_empty());
    }

    /// A new data dir is marked with this build's format; one written in
    /// format 1 (a log with records, no marker) or marked with another
    /// format is refused with a line saying so, and left as it was.
    #[test]
    fn data_dirs_of_another_format_are_refused() {
        let root = std::env::temp_dir().join(format!("shoal-format-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let fresh = root.join("fresh");
        check_data_format(&fresh).unwrap();
        check_data_format(&fresh).unwrap();
        assert!(std::fs::read_to_string(fresh.join("format")).unwrap().contains("format 2"));

        let old = root.join("old");
        std::fs::create_dir_all(&old).unwrap();
        std::fs::write(old.join("log"), b"\x01\x00\x00").unwrap();
        let e = check_data_format(&old).unwrap_err();
        assert!(e.contains("format 1"), "{e}");
        assert!(!old.join("format").exists());

        // A log of zeros only (preallocated, nothing written) is a new dir.
        let empty = root.join("empty");
        std::fs::create_dir_all(&empty).unwrap();
        std::fs::write(empty.join("log"), [0u8; 64]).unwrap();
        check_data_format(&empty).unwrap();

        let other = root.join("other");
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(other.join("format"), "shoal tracker data, format 9\n").unwrap();
        assert!(check_data_format(&other).unwrap_err().contains("format 9"));
        let _ = std::fs::remove_dir_all(&root);
    }
}
