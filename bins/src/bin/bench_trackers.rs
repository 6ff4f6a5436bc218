//! `bench-trackers`: metadata throughput and latency of a 3-tracker cluster.
//!
//! Build everything first (`cargo build --release`), then run
//! `target/release/bench-trackers`. It starts three real `tracker` processes
//! on loopback, each with its own data dir (fsync on: every write is durable
//! on a majority before it is answered), logs in `--clients` sessions spread
//! over the three trackers, then:
//!
//! - writes: every client keeps one `create_group` in flight for `--secs`
//!   (followers forward to the leader); prints decided writes per second and
//!   p50/p99/max latency;
//! - reads: every client keeps one `list_files` in flight (answered by the
//!   tracker it talks to); prints reads per second and p50/p99;
//! - logins: every client logs in again and again (argon2id, then a write),
//!   while a prober asks each tracker for a heartbeat every millisecond;
//!   prints logins per second, p50/p99, and each tracker's longest wait
//!   for a heartbeat's answer meanwhile.
//!
//! Also measures, in the same run, how many fsyncs per second the data dir's
//! disk does (one 4 KiB write + fdatasync in a loop): the floor under any
//! durable write rate that does not batch.
//!
//! With `--fill-tib T --fill-files N`, the cluster first takes the metadata
//! of T TiB of content (files of 512 GiB, their chunk lists put range by
//! range: 40 MiB of hashes per TiB) and N one-chunk files in `--fill-groups`
//! groups, while a prober asks each tracker for a heartbeat every millisecond
//! (the longest wait is the longest pause in answering, snapshots included);
//! the phases then run with that state present. After them tracker 3 is
//! wiped and restarted, and the time until its data dir holds as much as
//! tracker 1's gives the catch-up rate. Each tracker's peak RSS is printed.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use clap::Parser;
use shoal_core::ids::{GroupId, UserId};
use shoal_core::proto::{ApiError, Message, Reply, Request, RequestId, Role, PROTOCOL_VERSION};
use shoal_core::wire::{encode, FrameDecoder};

#[derive(Parser)]
#[command(name = "bench-trackers", version, about = "Measures a 3-tracker cluster's write and read rates")]
struct Args {
    /// Concurrent clients (sessions), each with one request in flight.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Seconds each phase runs.
    #[arg(long, default_value_t = 5)]
    secs: u64,
    /// Scratch directory for the trackers' data dirs (default: the system's temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Fill first with the metadata of this many TiB of content, in 512 GiB files.
    #[arg(long, default_value_t = 0)]
    fill_tib: u64,
    /// Fill first with this many one-chunk files...
    #[arg(long, default_value_t = 0)]
    fill_files: u64,
    /// ... spread over this many groups.
    #[arg(long, default_value_t = 10_000)]
    fill_groups: u64,
}

struct Tracker(Child);

impl Drop for Tracker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16, String> {
    Ok(TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map_err(|e| e.to_string())?.port())
}

/// One session on one tracker, speaking the wire protocol directly (over
/// TLS, as clients do).
struct Conn {
    stream: shoal_net_mio::tls::TlsStream,
    decoder: FrameDecoder,
    client: u64,
    seq: u64,
    session: Option<shoal_core::ids::SessionToken>,
}

impl Conn {
    fn open(addr: SocketAddr, client: u64) -> Result<Conn, String> {
        let me = shoal_net_mio::tls::Identity::ephemeral().map_err(|e| e.to_string())?;
        let (mut stream, _) = shoal_net_mio::tls::connect_blocking(addr, &me, Duration::from_secs(30))
            .map_err(|e| format!("{addr}: {e}"))?;
        stream.sock.set_nodelay(true).map_err(|e| e.to_string())?;
        stream
            .write_all(&encode(&Message::Hello { protocol_version: PROTOCOL_VERSION, role: Role::Client }))
            .map_err(|e| e.to_string())?;
        Ok(Conn {
            stream,
            decoder: FrameDecoder::new(shoal_core::wire::MAX_REPLY_FRAME),
            client,
            seq: 0,
            session: None,
        })
    }

    /// Sends a request and waits for its answer. A tracker that cannot
    /// decide yet (a cluster just started, before its links are up and a
    /// leader elected) is asked again with the same request id, as a client
    /// does, for up to [`QUORUM_WAIT`]: a write decided meanwhile is applied
    /// once.
    fn call(&mut self, body: Request) -> Result<Reply, String> {
        self.seq += 1;
        let id = RequestId { client: self.client, seq: self.seq };
        // One request at a time: every earlier one has its answer.
        let msg = encode(&Message::Request { id, settled_below: self.seq, session: self.session, body });
        let deadline = Instant::now() + QUORUM_WAIT;
        loop {
            self.stream.write_all(&msg).map_err(|e| e.to_string())?;
            match self.answer(id)? {
                Err(ApiError::NoQuorum | ApiError::CatchingUp) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                r => return r.map_err(|e| e.to_string()),
            }
        }
    }

    /// Sends every request with up to `window` in flight (answered in any
    /// order); each must succeed. One a tracker cannot decide yet is sent
    /// again with its id, as a client does, for up to [`QUORUM_WAIT`].
    fn pipeline(&mut self, bodies: impl Iterator<Item = Request>, window: usize) -> Result<u64, String> {
        let mut in_flight: std::collections::BTreeMap<u64, (Vec<u8>, Instant)> = Default::default();
        let mut done = 0;
        let mut bodies = bodies.peekable();
        while bodies.peek().is_some() || !in_flight.is_empty() {
            while in_flight.len() < window {
                let Some(body) = bodies.next() else { break };
                self.seq += 1;
                let id = RequestId { client: self.client, seq: self.seq };
                let settled = in_flight.keys().next().copied().unwrap_or(self.seq);
                let msg = encode(&Message::Request { id, settled_below: settled, session: self.session, body });
                self.stream.write_all(&msg).map_err(|e| e.to_string())?;
                in_flight.insert(self.seq, (msg, Instant::now()));
            }
            let (id, result) = self.next_response()?;
            let Some((msg, first)) = in_flight.remove(&id.seq) else { continue };
            match result {
                Err(ApiError::NoQuorum | ApiError::CatchingUp) if first.elapsed() < QUORUM_WAIT => {
                    self.stream.write_all(&msg).map_err(|e| e.to_string())?;
                    in_flight.insert(id.seq, (msg, first));
                }
                r => {
                    r.map_err(|e| format!("request {}: {e}", id.seq))?;
                    done += 1;
                }
            }
        }
        Ok(done)
    }

    fn next_response(&mut self) -> Result<(RequestId, Result<Reply, ApiError>), String> {
        let mut buf = [0u8; 64 * 1024];
        loop {
            match self.decoder.next_message::<Message>() {
                Ok(Some(Message::Response { id, result })) => return Ok((id, result)),
                Ok(Some(Message::Refused { reason })) => return Err(format!("tracker refused: {reason}")),
                Ok(Some(_)) => continue,
                Ok(None) => {}
                Err(e) => return Err(e.to_string()),
            }
            let n = self.stream.read(&mut buf).map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("tracker hung up".into());
            }
            self.decoder.push(&buf[..n]);
        }
    }

    fn answer(&mut self, id: RequestId) -> Result<Result<Reply, ApiError>, String> {
        loop {
            let (rid, result) = self.next_response()?;
            if rid == id {
                return Ok(result);
            }
        }
    }
}

/// How long a request is retried while its tracker answers that it cannot
/// decide (the client's `quorum_wait` is 5 s; a cold cluster also dials its
/// links first).
const QUORUM_WAIT: Duration = Duration::from_secs(10);

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Runs `op` on every connection in a closed loop for `secs`; returns (ops, latencies).
fn phase(
    conns: Vec<Conn>,
    secs: u64,
    op: impl Fn(usize, u64) -> Request + Send + Sync + 'static,
) -> Result<(Vec<Conn>, Vec<Duration>, Duration), String> {
    let op = Arc::new(op);
    let barrier = Arc::new(Barrier::new(conns.len() + 1));
    let handles: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            let (op, barrier) = (op.clone(), barrier.clone());
            std::thread::spawn(move || -> Result<(Conn, Vec<Duration>), String> {
                barrier.wait();
                let start = Instant::now();
                let mut lat = Vec::new();
                let mut k = 0;
                while start.elapsed() < Duration::from_secs(secs) {
                    let t = Instant::now();
                    c.call(op(i, k))?;
                    lat.push(t.elapsed());
                    k += 1;
                }
                Ok((c, lat))
            })
        })
        .collect();
    barrier.wait();
    let t0 = Instant::now();
    let mut conns = Vec::new();
    let mut all = Vec::new();
    for h in handles {
        let (c, lat) = h.join().map_err(|_| "a client thread panicked".to_string())??;
        conns.push(c);
        all.extend(lat);
    }
    let elapsed = t0.elapsed();
    all.sort();
    Ok((conns, all, elapsed))
}

/// fdatasyncs per second of a 4 KiB append in `dir`, for one second.
fn fsync_rate(dir: &Path) -> Result<f64, String> {
    let p = dir.join("fsync-probe");
    let mut f = std::fs::File::create(&p).map_err(|e| e.to_string())?;
    let block = [7u8; 4096];
    let t = Instant::now();
    let mut n = 0u64;
    while t.elapsed() < Duration::from_secs(1) {
        f.write_all(&block).map_err(|e| e.to_string())?;
        f.sync_data().map_err(|e| e.to_string())?;
        n += 1;
    }
    let _ = std::fs::remove_file(&p);
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

fn run(args: &Args) -> Result<(), String> {
    let bin_dir = shoal_bins::procs::bin_dir()?;
    let tracker_bin = bin_dir.join("tracker");
    let scratch = args
        .dir
        .clone()
        .unwrap_or_else(std::env::temp_dir)
        .join(format!("shoal-bench-trackers-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).map_err(|e| e.to_string())?;
    let result = (|| {
        let fsyncs = fsync_rate(&scratch)?;
        println!("disk: {fsyncs:.0} fsyncs/s (4 KiB append + fdatasync, one thread)");
        let addrs: Vec<SocketAddr> =
            (0..3).map(|_| free_port().map(|p| SocketAddr::from(([127, 0, 0, 1], p)))).collect::<Result<_, _>>()?;
        let info = scratch.join("tracker_info.txt");
        let text: String = addrs.iter().map(|a| format!("{} {}\n", a.ip(), a.port())).collect();
        std::fs::write(&info, text).map_err(|e| e.to_string())?;
        let start = |id: usize| -> Result<Tracker, String> {
            let mut child = Command::new(&tracker_bin)
                .arg(&info)
                .arg(id.to_string())
                .arg("--data-dir")
                .arg(scratch.join(format!("data-{id}")))
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .map_err(|e| {
                    format!("cannot start {}: {e} (run `cargo build --release` first)", tracker_bin.display())
                })?;
            let out = child.stdout.take().ok_or("no stdout")?;
            let leader_log = std::env::var("BENCH_SHOW_LEADERS").is_ok();
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    if leader_log && line.starts_with("leader") {
                        eprintln!("tracker {id}: {line}");
                    }
                    if line.contains("listening on") {
                        let _ = tx.send(());
                    }
                }
            });
            let t = Tracker(child);
            rx.recv_timeout(Duration::from_secs(30)).map_err(|_| format!("tracker {id} did not start"))?;
            Ok(t)
        };
        let mut trackers = Vec::new();
        for id in 1..=3 {
            trackers.push(start(id)?);
        }
        // Log in the sessions, spread over the trackers (retrying while the cluster elects).
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut setup = loop {
            let mut c = Conn::open(addrs[0], u64::MAX)?;
            match c.call(Request::CreateUser { user: UserId::new("bench").expect("valid"), password: "pw".into() }) {
                Ok(_) => break c,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => return Err(format!("the cluster never took a write: {e}")),
            }
        };
        let listen = SocketAddr::from(([127, 0, 0, 1], 19_999));
        match setup.call(Request::Login {
            user: UserId::new("bench").expect("valid"),
            password: "pw".into(),
            listen,
            plaintext_peers: false,
        })? {
            Reply::Session { token } => setup.session = Some(token),
            r => return Err(format!("login: unexpected {r:?}")),
        }
        setup.call(Request::CreateGroup { group: GroupId::new("r").expect("valid") })?;
        // Filled before the clients log in: a fill can outlast a tracker's
        // idle timeout (120 s), and those connections would sit idle through it.
        let filled = args.fill_tib > 0 || args.fill_files > 0;
        if filled {
            fill(args, &addrs)?;
        }
        let mut conns = Vec::new();
        for i in 0..args.clients {
            let mut c = Conn::open(addrs[i % 3], i as u64 + 1)?;
            let listen = SocketAddr::from(([127, 0, 0, 1], 20_000 + i as u16));
            match c.call(Request::Login {
                user: UserId::new("bench").expect("valid"),
                password: "pw".into(),
                listen,
                plaintext_peers: false,
            })? {
                Reply::Session { token } => c.session = Some(token),
                r => return Err(format!("login: unexpected {r:?}")),
            }
            conns.push(c);
        }
        println!("cluster: 3 trackers, {} clients logged in (one request in flight each)", args.clients);

        let (conns, lat, elapsed) = phase(conns, args.secs, |i, k| Request::CreateGroup {
            group: GroupId::new(format!("b{i}x{k}")).expect("valid"),
        })?;
        let rate = lat.len() as f64 / elapsed.as_secs_f64();
        println!(
            "writes: {} decided in {:.1} s = {rate:.0}/s; latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; {:.1}x etcd's 6,200/s",
            lat.len(),
            elapsed.as_secs_f64(),
            percentile(&lat, 0.5).as_secs_f64() * 1e3,
            percentile(&lat, 0.99).as_secs_f64() * 1e3,
            lat.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
            rate / 6200.0
        );
        let (conns, lat, elapsed) =
            phase(conns, args.secs, |_, _| Request::ListFiles { group: GroupId::new("r").expect("valid") })?;
        let rate = lat.len() as f64 / elapsed.as_secs_f64();
        println!(
            "reads: {} in {:.1} s = {rate:.0}/s; latency p50 {:.2} ms, p99 {:.2} ms; {:.1}x etcd's 10,000/s",
            lat.len(),
            elapsed.as_secs_f64(),
            percentile(&lat, 0.5).as_secs_f64() * 1e3,
            percentile(&lat, 0.99).as_secs_f64() * 1e3,
            rate / 10_000.0
        );
        // Logins: argon2id each (19 MiB, 2 passes), then a write. Last,
        // since each replaces its client's session.
        let probers = Probers::start(&addrs, 910_000)?;
        let (_, lat, elapsed) = phase(conns, args.secs, |i, _| Request::Login {
            user: UserId::new("bench").expect("valid"),
            password: "pw".into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 20_000 + i as u16)),
            plaintext_peers: false,
        })?;
        let waits: Vec<String> = probers.finish()?.iter().map(|w| format!("{:.1}", w.as_secs_f64() * 1e3)).collect();
        println!(
            "logins: {} in {:.1} s = {:.0}/s; latency p50 {:.1} ms, p99 {:.1} ms; longest heartbeat wait meanwhile {} ms",
            lat.len(),
            elapsed.as_secs_f64(),
            lat.len() as f64 / elapsed.as_secs_f64(),
            percentile(&lat, 0.5).as_secs_f64() * 1e3,
            percentile(&lat, 0.99).as_secs_f64() * 1e3,
            waits.join(" / ")
        );
        for (i, t) in trackers.iter().enumerate() {
            println!("tracker {}: peak RSS {} MiB", i + 1, peak_rss_kib(t.0.id()) / 1024);
        }
        if filled {
            // Tracker 3 loses its data dir and catches up from the others.
            drop(trackers.pop());
            let wiped = scratch.join("data-3");
            std::fs::remove_dir_all(&wiped).map_err(|e| e.to_string())?;
            let full = dir_bytes(&scratch.join("data-1"));
            let t0 = Instant::now();
            trackers.push(start(3)?);
            let deadline = t0 + Duration::from_secs(600);
            while dir_bytes(&wiped) < full * 9 / 10 {
                if Instant::now() > deadline {
                    return Err(format!(
                        "tracker 3 did not catch up in 10 min ({} of {full} bytes)",
                        dir_bytes(&wiped)
                    ));
                }
                // Polling a directory's size, bounded by the deadline above.
                std::thread::sleep(Duration::from_millis(100));
            }
            let secs = t0.elapsed().as_secs_f64();
            println!(
                "catch-up: a wiped tracker 3 holds {:.0} MiB (90% of tracker 1's data dir) after {secs:.1} s = {:.0} MB/s",
                dir_bytes(&wiped) as f64 / 1048576.0,
                dir_bytes(&wiped) as f64 / secs / 1e6
            );
            println!("tracker 3 after catching up: peak RSS {} MiB", peak_rss_kib(trackers[2].0.id()) / 1024);
        }
        drop(trackers);
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

/// A process's peak resident set (VmHWM), in KiB (0 if unknown).
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Bytes of the files in `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else { return 0 };
    rd.flatten().filter_map(|e| e.metadata().ok()).filter(|m| m.is_file()).map(|m| m.len()).sum()
}

/// A logged-in session on tracker `addr`.
fn session(addr: SocketAddr, client: u64) -> Result<Conn, String> {
    let mut c = Conn::open(addr, client)?;
    let listen = SocketAddr::from(([127, 0, 0, 1], 30_000 + (client % 30_000) as u16));
    let login = Request::Login {
        user: UserId::new("bench").expect("valid"),
        password: "pw".into(),
        listen,
        plaintext_peers: false,
    };
    match c.call(login)? {
        Reply::Session { token } => c.session = Some(token),
        r => return Err(format!("login: unexpected {r:?}")),
    }
    Ok(c)
}

/// The chunk hashes of fill file `k`: distinct, cheap, not content's.
fn fill_chunks(k: u64, chunks: u64) -> Vec<shoal_core::chunk::Sha1Digest> {
    (0..chunks)
        .map(|i| {
            let mut h = [0xa5u8; 20];
            h[..8].copy_from_slice(&k.to_be_bytes());
            h[8..16].copy_from_slice(&i.to_be_bytes());
            shoal_core::chunk::Sha1Digest(h)
        })
        .collect()
}

/// Fills the cluster (see the module docs), printing how long it took and
/// the longest pause in answering a heartbeat at each tracker meanwhile.
fn fill(args: &Args, addrs: &[SocketAddr]) -> Result<(), String> {
    use shoal_core::chunk::{FileDigest, FileIndex, FileMeta, FileRecord, Sha1Digest, CHUNK_SIZE, MAX_FILE_CHUNKS};
    use shoal_core::ids::FileName;
    let probers = Probers::start(addrs, 900_000)?;
    let g = GroupId::new("fill").expect("valid");
    session(addrs[0], 800_000)?.call(Request::CreateGroup { group: g.clone() })?;
    // Big files, range by range: six sessions, two a tracker.
    let t0 = Instant::now();
    let files = args.fill_tib * 2;
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let workers: Vec<_> = (0..6u64)
        .map(|w| {
            let (next, g, addr) = (next.clone(), g.clone(), addrs[w as usize % 3]);
            std::thread::spawn(move || -> Result<(), String> {
                let mut c = session(addr, 700_000 + w)?;
                loop {
                    let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if k >= files {
                        return Ok(());
                    }
                    let chunks = fill_chunks(k, MAX_FILE_CHUNKS);
                    let digest =
                        FileDigest { size: MAX_FILE_CHUNKS * CHUNK_SIZE, sha1: Sha1Digest([k as u8; 20]), chunks };
                    let meta = FileMeta { name: FileName::new(format!("big{k}")).expect("valid"), digest };
                    let count = meta.digest.index().ranges.len() as u64;
                    let puts = (0..count).map(|i| Request::PutRange { hashes: meta.digest.range(i).to_vec() });
                    c.pipeline(puts, 8)?;
                    c.call(Request::UploadFile { group: g.clone(), file: meta.record() })?;
                }
            })
        })
        .collect();
    for h in workers {
        h.join().map_err(|_| "a fill thread panicked".to_string())??;
    }
    if files > 0 {
        let secs = t0.elapsed().as_secs_f64();
        let mib = files as f64 * 20.0;
        println!(
            "fill: {} TiB in {files} files of 512 GiB: {mib:.0} MiB of chunk hashes in {secs:.1} s = {:.0} MB/s",
            args.fill_tib,
            mib * 1.048576 / secs
        );
    }
    // Small files, in groups.
    let t0 = Instant::now();
    let mut c = session(addrs[0], 800_001)?;
    let groups = args.fill_groups.max(1);
    if args.fill_files > 0 {
        c.pipeline(
            (0..groups).map(|i| Request::CreateGroup { group: GroupId::new(format!("fg{i}")).expect("valid") }),
            32,
        )?;
    }
    let per = args.fill_files.div_ceil(6);
    let workers: Vec<_> = (0..6u64)
        .map(|w| {
            let addr = addrs[w as usize % 3];
            let n = args.fill_files;
            std::thread::spawn(move || -> Result<(), String> {
                let mut c = session(addr, 710_000 + w)?;
                let files = (w * per..((w + 1) * per).min(n)).map(|i| {
                    let mut sha = [0x5au8; 20];
                    sha[..8].copy_from_slice(&i.to_be_bytes());
                    let sha1 = Sha1Digest(sha);
                    let index = FileIndex { size: 1000, sha1, ranges: vec![shoal_core::chunk::range_hash(&[sha1])] };
                    let file = FileRecord { name: FileName::new(format!("f{i}")).expect("valid"), index };
                    Request::UploadFile { group: GroupId::new(format!("fg{}", i % groups)).expect("valid"), file }
                });
                c.pipeline(files, 32)?;
                Ok(())
            })
        })
        .collect();
    for h in workers {
        h.join().map_err(|_| "a fill thread panicked".to_string())??;
    }
    if args.fill_files > 0 {
        let secs = t0.elapsed().as_secs_f64();
        println!(
            "fill: {} one-chunk files in {groups} groups in {secs:.1} s = {:.0}/s",
            args.fill_files,
            args.fill_files as f64 / secs
        );
    }
    for (i, worst) in probers.finish()?.into_iter().enumerate() {
        println!(
            "tracker {}: longest wait for a heartbeat's answer while filling {:.1} ms",
            i + 1,
            worst.as_secs_f64() * 1e3
        );
    }
    Ok(())
}

/// One session a tracker asking for a heartbeat every millisecond: the
/// longest wait for an answer is the longest pause in answering.
struct Probers {
    stop: Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<Result<Duration, String>>>,
}

impl Probers {
    fn start(addrs: &[SocketAddr], client_base: u64) -> Result<Probers, String> {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let threads = addrs
            .iter()
            .enumerate()
            .map(|(i, &a)| {
                let stop = stop.clone();
                let mut c = session(a, client_base + i as u64)?;
                Ok(std::thread::spawn(move || -> Result<Duration, String> {
                    let mut worst = Duration::ZERO;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let t = Instant::now();
                        c.call(Request::Heartbeat)?;
                        worst = worst.max(t.elapsed());
                        // One probe a millisecond: the bench's own pacing.
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Ok(worst)
                }))
            })
            .collect::<Result<_, String>>()?;
        Ok(Probers { stop, threads })
    }

    /// Each tracker's longest wait.
    fn finish(self) -> Result<Vec<Duration>, String> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.threads.into_iter().map(|p| p.join().map_err(|_| "a prober panicked".to_string())?).collect()
    }
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    shoal_bins::init_logging();
    match run(&args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
