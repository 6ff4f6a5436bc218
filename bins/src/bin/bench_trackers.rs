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
//!   tracker it talks to); prints reads per second and p50/p99.
//!
//! Also measures, in the same run, how many fsyncs per second the data dir's
//! disk does (one 4 KiB write + fdatasync in a loop): the floor under any
//! durable write rate that does not batch.

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

    fn answer(&mut self, id: RequestId) -> Result<Result<Reply, ApiError>, String> {
        let mut buf = [0u8; 64 * 1024];
        loop {
            match self.decoder.next_message::<Message>() {
                Ok(Some(Message::Response { id: rid, result })) if rid == id => return Ok(result),
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
        let mut trackers = Vec::new();
        for id in 1..=3 {
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
            let out = child.stdout.take().expect("piped");
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
            trackers.push(Tracker(child));
            rx.recv_timeout(Duration::from_secs(30)).map_err(|_| format!("tracker {id} did not start"))?;
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
        let (_, lat, elapsed) =
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
        drop(trackers);
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    result
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
