//! `bench`: download throughput and memory of a real swarm on loopback.
//!
//! Build everything first (`cargo build --release`), then run
//! `target/release/bench`. For each size it writes a file of random bytes,
//! measures how fast one thread can SHA1 it (the hash limit: every byte a
//! downloader receives must be hashed once), then starts one tracker, four
//! clients sharing the file and one downloader (the real `tracker` and `client`
//! binaries beside this one), times the download and reads the downloader's
//! peak RSS. It prints the figures and the ratio to the hash limit. Each run
//! downloads twice: over TLS (as shoal always runs) and, as the baseline, in
//! plaintext from a second set of sharers started with
//! `--insecure-plaintext-peers`; it prints the ratio of the two.
//!
//! It also times a reference pipeline on the same file and machine, before
//! and after the download ([`pipeline_rate`]): writing new pages is what
//! varies most on a VM (memory the host has not backed yet costs several
//! times more to touch), so the ratio to the reference is the steadier figure.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use clap::Parser;
use sha1::{Digest, Sha1};
use shoal_bins::procs::{cpu_secs, free_addr, Proc};
use shoal_bins::relay::{PathSpec, Relay};
use shoal_core::chunk::CHUNK_SIZE;

#[derive(Parser)]
#[command(name = "bench", version, about = "Measures shoal's download rate and memory against the SHA1 hash limit")]
struct Args {
    /// File sizes to test, in MiB.
    #[arg(long, value_delimiter = ',', default_value = "1024")]
    sizes: Vec<u64>,
    /// How many clients share the file.
    #[arg(long, default_value_t = 4)]
    sharers: usize,
    /// Downloads per size; the summary gives the median (this machine's rate
    /// of filling new memory varies a lot between runs).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Scratch directory (default: the system's temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Which peer connections to measure, each run, in turns: `tls` (as
    /// shoal runs) and `plaintext` (`--insecure-plaintext-peers`, the
    /// baseline), each with its own sharers.
    #[arg(long, value_delimiter = ',', default_value = "tls,plaintext")]
    kinds: Vec<Kind>,
    /// Long paths: a delaying relay (`shoal_bins::relay`) of this round
    /// trip, in milliseconds, between the downloader and each sharer. A list
    /// gives each sharer its own (the last one for the rest): `1,1,1,340`.
    #[arg(long, value_name = "MS", value_delimiter = ',')]
    rtt_ms: Vec<f64>,
    /// The relay's window: bytes unacknowledged per direction, as a TCP
    /// sender's buffer allows (Linux's default `tcp_wmem` maximum is 4 MiB).
    #[arg(long, value_name = "KIB", default_value_t = 4096)]
    path_window_kib: usize,
    /// Also time aria2c fetching the file from one nginx per sharer, each
    /// over the same path, in each run (`apt-get install aria2 nginx-light`).
    #[arg(long)]
    aria2c: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Kind {
    Tls,
    Plaintext,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Tls => "TLS      ",
            Kind::Plaintext => "plaintext",
        }
    }
}

/// Single-thread SHA1 of the file as read from the page cache, in bytes/s.
fn hash_rate(path: &Path) -> Result<f64, String> {
    let t = Instant::now();
    let (_, n) = sha1_of(path)?;
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

/// For information: the rate of the writer's two hashes (each chunk's SHA1
/// and the whole file's) as one thread runs them, two streams at once
/// (`shoal-sha1x`), in bytes of file per second.
fn two_stream_rate(path: &Path) -> Result<f64, String> {
    let mut f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let t = Instant::now();
    let mut whole = shoal_sha1x::Sha1::new();
    let mut buf = vec![0u8; CHUNK_SIZE as usize];
    let mut len = 0u64;
    loop {
        let n = read_full(&mut f, &mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        let mut chunk = shoal_sha1x::Sha1::new();
        shoal_sha1x::Sha1::update2(&mut chunk, &buf[..n], &mut whole, &buf[..n]);
        std::hint::black_box(chunk.finalize());
        len += n as u64;
    }
    std::hint::black_box(whole.finalize());
    Ok(len as f64 / t.elapsed().as_secs_f64())
}

/// Reads until `buf` is full or the file ends; the bytes read.
fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// The reference: the same bytes through what a user would otherwise run,
/// `curl | tee >(openssl sha1) | dd`, done as lean as it gets in-process: a
/// server thread sends the file over loopback TCP (`std::io::copy`, which is
/// sendfile on Linux), the receiver reads 1 MiB at a time and hands each
/// buffer to a SHA1 thread and to a writer thread that appends it to a new
/// file. One SHA1 pass (a shoal download makes two: every chunk, then the
/// whole file) and no re-sharing. Returns bytes/s; `out` is left in place.
fn pipeline_rate(src: &Path, out: &Path) -> std::io::Result<f64> {
    use std::sync::mpsc::sync_channel;
    use std::sync::Arc;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let src = src.to_path_buf();
    let server = std::thread::spawn(move || -> std::io::Result<u64> {
        let (mut sock, _) = listener.accept()?;
        std::io::copy(&mut std::fs::File::open(src)?, &mut sock)
    });
    let mut sock = std::net::TcpStream::connect(addr)?;
    let t = Instant::now();
    let (htx, hrx) = sync_channel::<Arc<Vec<u8>>>(8);
    let (wtx, wrx) = sync_channel::<Arc<Vec<u8>>>(8);
    let hasher = std::thread::spawn(move || {
        let mut h = Sha1::new();
        for b in hrx {
            h.update(&b[..]);
        }
        h.finalize()
    });
    let mut file = std::fs::File::create(out)?;
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        for b in wrx {
            file.write_all(&b)?;
        }
        Ok(())
    });
    loop {
        // Into fresh capacity, which read_to_end fills without zeroing it first.
        let mut buf = Vec::with_capacity(1 << 20);
        if (&mut sock).take(1 << 20).read_to_end(&mut buf)? == 0 {
            break;
        }
        let buf = Arc::new(buf);
        if htx.send(buf.clone()).is_err() || wtx.send(buf).is_err() {
            break;
        }
    }
    drop((htx, wtx));
    let _ = hasher.join();
    writer.join().map_err(|_| std::io::Error::other("writer panicked"))??;
    let secs = t.elapsed().as_secs_f64();
    let sent = server.join().map_err(|_| std::io::Error::other("server panicked"))??;
    Ok(sent as f64 / secs)
}

/// User plus system CPU time of process `pid` so far, in seconds (Linux).
/// Waits until what the file system still owes the disk is done (`sync`):
/// deleting the last run's gigabytes queues writeback and, with a `discard`
/// mount, discards, which otherwise slow the next run's start (measured: its
/// `download_file` answered after 0.65 s instead of 5 ms). Run before each
/// timed phase, so that neither the download nor the reference pays for the
/// writeback of the gigabyte the other just wrote.
fn settle_disk() {
    let _ = Command::new("sync").status();
}

/// Bytes free for this user on the file system holding `dir`.
fn free_bytes(dir: &Path) -> u64 {
    rustix::fs::statvfs(dir).map(|s| s.f_bavail.saturating_mul(s.f_frsize)).unwrap_or(0)
}

/// SHA1 of a file, streamed 1 MiB at a time, and its length.
fn sha1_of(path: &Path) -> Result<([u8; 20], u64), String> {
    let mut f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut h = Sha1::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        match f.read(&mut buf).map_err(|e| e.to_string())? {
            0 => return Ok((h.finalize().into(), len)),
            n => {
                h.update(&buf[..n]);
                len += n as u64;
            }
        }
    }
}

/// What one timed download measured.
struct RunFigures {
    secs: f64,
    /// When the first verified bytes showed, and when the last chunk did
    /// (the whole-file check then finishes the download).
    first_data: f64,
    all_chunks: f64,
    /// CPU seconds of each of `pids`, then of the downloader.
    cpu: Vec<f64>,
}

/// Downloads the bench file into `out` with `d` and times it.
fn download_once(d: &mut Proc, out: &Path, pids: &[u32]) -> Result<RunFigures, String> {
    let dl_pid = d.child.id();
    let cpu_now = || -> Vec<f64> { pids.iter().chain([&dl_pid]).map(|&p| cpu_secs(p)).collect() };
    let cpu_before = cpu_now();
    let start = Instant::now();
    let first = d.cmd(&format!("download_file bench data.bin {}", out.display()))?;
    if !first.starts_with("downloading") {
        return Err(format!("download did not start: {first}"));
    }
    let (mut first_data, mut all_chunks) = (None, None);
    loop {
        let line = d.cmd("show_downloads")?;
        if line.starts_with("[C]") {
            break;
        }
        if first_data.is_none() && line.starts_with("[D]") && !line.contains(" 0% ") {
            first_data = Some(start.elapsed().as_secs_f64());
        }
        if all_chunks.is_none() && line.contains("100% verifying") {
            all_chunks = Some(start.elapsed().as_secs_f64());
        }
        if line.starts_with("[F]") {
            return Err(line);
        }
        if start.elapsed() > Duration::from_secs(600) {
            return Err("download took over 10 minutes".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu = cpu_now().into_iter().zip(cpu_before).map(|(a, b)| a - b).collect();
    Ok(RunFigures { secs, first_data: first_data.unwrap_or(secs), all_chunks: all_chunks.unwrap_or(secs), cpu })
}

/// What each source supplied to the downloader's one download, from
/// `show_downloads -v` (`  from <addr>: <bytes> bytes` lines after the
/// download's own), as `addr MB`.
fn served(d: &mut Proc) -> Result<Vec<String>, String> {
    d.cmd("show_downloads -v")?;
    let mut lines = Vec::new();
    // The listing's lines come at once; the first that is not a source's
    // (or none within a second) ends it.
    while let Ok(line) = d.out.recv_timeout(Duration::from_secs(1)) {
        let Some(rest) = line.strip_prefix("  from ") else { break };
        let (addr, bytes) = rest.split_once(": ").unwrap_or((rest, ""));
        let bytes: f64 = bytes.trim_end_matches(" bytes").parse().unwrap_or(0.0);
        lines.push(format!("{addr} {:.0}", bytes / 1e6));
    }
    Ok(lines)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(&args) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> Result<(), String> {
    let bindir = shoal_bins::procs::bin_dir()?;
    let base = args.dir.clone().unwrap_or_else(std::env::temp_dir).join(format!("shoal-bench-{}", std::process::id()));
    std::fs::create_dir_all(&base).map_err(|e| e.to_string())?;
    let mut kinds = args.kinds.clone();
    kinds.dedup();
    if kinds.is_empty() {
        return Err("--kinds: name at least one of tls, plaintext".into());
    }
    if args.rtt_ms.iter().any(|ms| !ms.is_finite() || *ms < 0.0 || *ms > 60_000.0) || args.path_window_kib == 0 {
        return Err("--rtt-ms takes milliseconds (0 to 60000), --path-window-kib a size above 0".into());
    }
    let spec = |ms: f64| PathSpec { rtt: Duration::from_secs_f64(ms / 1000.0), window: args.path_window_kib << 10 };
    let path: Vec<PathSpec> = args.rtt_ms.iter().map(|&ms| spec(ms)).collect();
    let result = args
        .sizes
        .iter()
        .try_for_each(|&mib| one(&bindir, &base, mib, args.sharers, args.runs.max(1), &kinds, &path, args.aria2c));
    let _ = std::fs::remove_dir_all(&base);
    result
}

/// Long paths to the sharers: each sharer is seen at its own loopback
/// address (its tracker connection comes through a relay from there), where a
/// delaying relay forwards to it, as to a host far away.
struct Paths {
    /// Each sharer's path in turn, the last for the rest.
    specs: Vec<PathSpec>,
    relays: Vec<Relay>,
}

/// The loopback address the `i`th host behind a long path is seen at.
fn far_ip(i: usize) -> Result<std::net::IpAddr, String> {
    let i = u8::try_from(10 + i).map_err(|_| "too many hosts behind long paths")?;
    Ok(std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, i)))
}

impl Paths {
    /// Puts a client listening on `listen` behind a long path: the
    /// tracker_info file it is to use (`info` lists `tracker`).
    fn behind(&mut self, dir: &Path, info: &Path, tracker: &str, listen: &str) -> Result<PathBuf, String> {
        let e = |e: std::io::Error| e.to_string();
        let listen: std::net::SocketAddr = listen.parse().map_err(|_| "bad address")?;
        let tracker: std::net::SocketAddr = tracker.parse().map_err(|_| "bad address")?;
        // Two relays a host: its tracker connection's and its peers'.
        let i = self.relays.len() / 2;
        let ip = far_ip(i)?;
        let spec = self.specs[i.min(self.specs.len() - 1)];
        let nat = Relay::start("127.0.0.1:0".parse().map_err(|_| "addr")?, tracker, Some(ip), PathSpec::direct())
            .map_err(e)?;
        let far = Relay::start(std::net::SocketAddr::new(ip, listen.port()), listen, None, spec).map_err(e)?;
        let sub = dir.join(format!("behind-{ip}"));
        std::fs::create_dir_all(&sub).map_err(e)?;
        let its = sub.join("tracker_info.txt");
        std::fs::write(&its, format!("{}\n", nat.addr)).map_err(e)?;
        // The trackers' published keys, where this client looks for them.
        let keys = shoal_bins::key_dir(&its);
        if !keys.exists() {
            std::os::unix::fs::symlink(shoal_bins::key_dir(info), keys).map_err(e)?;
        }
        self.relays.extend([nat, far]);
        Ok(its)
    }
}

/// The aria2c baseline: one nginx per sharer serving `dir`, each behind a
/// relay over the same path.
struct Mirrors {
    urls: Vec<String>,
    /// Held until the end: dropping them stops them.
    _servers: Vec<Proc>,
    _relays: Vec<Relay>,
}

impl Mirrors {
    fn start(dir: &Path, n: usize, specs: &[PathSpec]) -> Result<Mirrors, String> {
        let e = |e: std::io::Error| e.to_string();
        let nginx = which("nginx").ok_or("--aria2c: nginx not found (apt-get install aria2 nginx-light)")?;
        which("aria2c").ok_or("--aria2c: aria2c not found (apt-get install aria2 nginx-light)")?;
        let (mut servers, mut urls, mut relays) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..n {
            let prefix = dir.join(format!("nginx-{i}"));
            std::fs::create_dir_all(&prefix).map_err(e)?;
            let addr: std::net::SocketAddr = free_addr()?.parse().map_err(|_| "addr")?;
            let conf = format!(
                "worker_processes 1;\nuser root;\npid {p}/nginx.pid;\nerror_log {p}/error.log;\n\
                 events {{ worker_connections 64; }}\n\
                 http {{ access_log off; sendfile on; tcp_nopush on; types {{ }} default_type application/octet-stream;\n\
                 client_body_temp_path {p}; proxy_temp_path {p}; fastcgi_temp_path {p}; uwsgi_temp_path {p}; scgi_temp_path {p};\n\
                 server {{ listen {addr}; root {root}; }} }}\n",
                p = prefix.display(),
                root = dir.display(),
            );
            let conf_path = prefix.join("nginx.conf");
            std::fs::write(&conf_path, conf).map_err(e)?;
            let args =
                ["-p", &prefix.display().to_string(), "-c", &conf_path.display().to_string(), "-g", "daemon off;"]
                    .map(String::from);
            servers.push(Proc::spawn(&nginx, &args)?);
            wait_listening(addr)?;
            let url_addr = match specs.get(i).or(specs.last()) {
                Some(&spec) => {
                    let far = std::net::SocketAddr::new(far_ip(100 + i)?, addr.port());
                    relays.push(Relay::start(far, addr, None, spec).map_err(e)?);
                    far
                }
                None => addr,
            };
            urls.push(format!("http://{url_addr}/data.bin"));
        }
        Ok(Mirrors { urls, _servers: servers, _relays: relays })
    }

    /// aria2c fetches the file from every mirror at once into `out`,
    /// checking its SHA1: the seconds it took.
    fn fetch(&self, out: &Path, sha1: &[u8; 20]) -> Result<f64, String> {
        let hex: String = sha1.iter().map(|b| format!("{b:02x}")).collect();
        let n = self.urls.len().to_string();
        let t = Instant::now();
        let status = Command::new("aria2c")
            .args(["--no-conf", "--quiet=true", "--file-allocation=none", "--allow-overwrite=true"])
            .args(["--auto-file-renaming=false", "--max-connection-per-server=1", "--min-split-size=1M"])
            .arg(format!("--split={n}"))
            .arg(format!("--checksum=sha-1={hex}"))
            .arg("--dir")
            .arg(out)
            .args(["--out", "aria.bin"])
            .args(&self.urls)
            .status()
            .map_err(|e| format!("aria2c: {e}"))?;
        let secs = t.elapsed().as_secs_f64();
        if !status.success() {
            return Err(format!("aria2c failed: {status}"));
        }
        Ok(secs)
    }
}

/// A program on `PATH` (or in /usr/sbin, where Debian puts nginx).
fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).chain([PathBuf::from("/usr/sbin")]).map(|d| d.join(name)).find(|p| p.is_file())
}

/// Waits up to 10 s for a server to accept connections on `addr`.
fn wait_listening(addr: std::net::SocketAddr) -> Result<(), String> {
    let start = Instant::now();
    while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        if start.elapsed() > Duration::from_secs(10) {
            return Err(format!("nothing listens on {addr} after 10 s"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn one(
    bindir: &Path,
    base: &Path,
    mib: u64,
    sharers: usize,
    runs: usize,
    kinds: &[Kind],
    path: &[PathSpec],
    aria2c: bool,
) -> Result<(), String> {
    let dir = base.join(format!("{mib}"));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let file = dir.join("data.bin");
    shoal_bins::write_random_file(&file, mib << 20).map_err(|e| e.to_string())?;
    // Twice: the first read warms the page cache, like the sharers' reads will.
    let _ = hash_rate(&file);
    let limit = hash_rate(&file)?;
    let two_streams = two_stream_rate(&file)?;

    let info = dir.join("tracker_info.txt");
    let taddr = free_addr()?;
    std::fs::write(&info, format!("{taddr}\n")).map_err(|e| e.to_string())?;
    let data = dir.join("tracker-data").display().to_string();
    let tracker =
        Proc::spawn(&bindir.join("tracker"), &[info.display().to_string(), "1".into(), "--data-dir".into(), data])?;
    tracker.out.recv_timeout(Duration::from_secs(30)).map_err(|_| "tracker did not start")?;
    // Every client runs with TLS on its peer connections, or all of a second
    // set without (`--insecure-plaintext-peers`, the baseline): a downloader
    // reaches only sharers of its own kind.
    let mut paths = (!path.is_empty()).then(|| Paths { specs: path.to_vec(), relays: Vec::new() });
    let client = |kind: Kind, paths: Option<&mut Paths>| {
        let listen = free_addr()?;
        let its = match paths {
            Some(p) => p.behind(&dir, &info, &taddr, &listen)?,
            None => info.clone(),
        };
        let mut a = vec![listen, its.display().to_string()];
        if kind == Kind::Plaintext {
            a.push("--insecure-plaintext-peers".into());
        }
        Proc::spawn(&bindir.join("client"), &a)
    };

    // The group's owner is the first kind's first sharer.
    let mut owner = client(kinds[0], paths.as_mut())?;
    owner.cmd("create_user s0 pw")?;
    owner.cmd("login s0 pw")?;
    owner.cmd("create_group bench")?;
    let mut sharing: Vec<Vec<Proc>> = Vec::new();
    let mut n = 1;
    for (k, &kind) in kinds.iter().enumerate() {
        let mut list = Vec::new();
        for _ in 0..if k == 0 { sharers - 1 } else { sharers } {
            let mut p = client(kind, paths.as_mut())?;
            p.cmd(&format!("create_user s{n} pw"))?;
            p.cmd(&format!("login s{n} pw"))?;
            p.cmd("join_group bench")?;
            owner.cmd(&format!("accept_request bench s{n}"))?;
            list.push(p);
            n += 1;
        }
        sharing.push(list);
    }
    let t = Instant::now();
    owner.cmd(&format!("upload_file {} bench", file.display()))?;
    let upload_secs = t.elapsed().as_secs_f64();
    for p in sharing.iter_mut().flatten() {
        p.cmd(&format!("upload_file {} bench", file.display()))?;
    }
    // Whose CPU time each run reports, by kind: the tracker, then the sharers.
    let pids: Vec<Vec<u32>> = sharing
        .iter()
        .enumerate()
        .map(|(k, list)| {
            let owner = (k == 0).then_some(&owner);
            [&tracker].into_iter().chain(owner).chain(list.iter()).map(|p| p.child.id()).collect()
        })
        .collect();
    let (source_sha1, _) = sha1_of(&file)?;
    // Each run writes a copy per kind and two for the reference. Where
    // the disk has room they stay until the end: deleting a run's gigabytes
    // made the next run's first block allocation wait for the discards on
    // ext4 mounted with `discard` (the download's preallocation: 0.2-0.3 s
    // in half the runs; a writer that lets the kernel allocate at writeback,
    // like the reference, never waits for it): a cost of the bench's own
    // clean-up, not of downloading.
    let keep = free_bytes(&dir) > ((2 + kinds.len() as u64) * runs as u64 + 2) * (mib << 20);
    settle_disk();
    let size = (mib << 20) as f64;
    let shown: Vec<&str> = kinds.iter().map(|k| k.label().trim()).collect();
    let over = match path {
        [] => "loopback".into(),
        specs => {
            let ms: Vec<String> = specs.iter().map(|p| format!("{:.1}", p.rtt.as_secs_f64() * 1000.0)).collect();
            format!(
                "loopback, sharers behind relays of {} ms round trip and a {} KiB window",
                ms.join(", "),
                specs[0].window >> 10
            )
        }
    };
    println!("file {mib} MiB, {sharers} sharers, 1 downloader, {over}, {runs} runs, each: {}", shown.join(", "));
    let mirrors = if aria2c { Some(Mirrors::start(&dir, sharers, path)?) } else { None };
    let mut aria_rates = Vec::new();
    println!("  runs' files kept until the end: {}", if keep { "yes" } else { "no (too little disk space)" });
    println!("  SHA1 hash limit (1 thread):  {:8.0} MB/s", limit / 1e6);
    println!(
        "  chunk + whole-file SHA1 together (1 thread, 2 streams): {:.0} MB/s of file ({:.2}x the limit)",
        two_streams / 1e6,
        two_streams / limit
    );
    println!("  upload_file (hash + chunks): {:8.0} MB/s", size / upload_secs / 1e6);
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); kinds.len()];
    let mut references = Vec::new();
    let mut peak_rss = 0;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    for run in 1..=runs {
        let out = dir.join(format!("out-{run}"));
        std::fs::create_dir_all(&out).map_err(|e| e.to_string())?;
        // The reference runs before and after the downloads, each into a new
        // file kept until the run ends: neither reuses memory the other just
        // freed (on a VM that is much cheaper than memory not touched lately).
        let before =
            pipeline_rate(&file, &out.join("pipeline-1.bin")).map_err(|e| format!("reference pipeline: {e}"))?;
        settle_disk();
        // Every kind each run, in turns first, so drift favours none.
        let mut order: Vec<usize> = (0..kinds.len()).collect();
        order.rotate_left((run - 1) % kinds.len());
        for k in order {
            let kind = kinds[k];
            let plain = kind == Kind::Plaintext;
            // A fresh downloader each time, so its peak RSS is this run's.
            let mut d = client(kind, None)?;
            let who = format!("dl{run}{}", if plain { "p" } else { "t" });
            d.cmd(&format!("create_user {who} pw"))?;
            d.cmd(&format!("login {who} pw"))?;
            d.cmd("join_group bench")?;
            owner.cmd(&format!("accept_request bench {who}"))?;
            let into = out.join(if plain { "plain" } else { "tls" });
            std::fs::create_dir_all(&into).map_err(|e| e.to_string())?;
            let r = download_once(&mut d, &into, &pids[k])?;
            if sha1_of(&into.join("data.bin"))?.0 != source_sha1 {
                return Err(format!("run {run}: the downloaded file differs from the source"));
            }
            if !path.is_empty() {
                println!("  run {run} {}: MB from each sharer: {}", kind.label(), served(&mut d)?.join(", "));
            }
            let rss = d.peak_rss_kib().unwrap_or(0);
            let rate = size / r.secs;
            // How busy the machine's cores were with the swarm: below ~100%
            // the download waited on something other than CPU.
            let busy = r.cpu.iter().sum::<f64>() / (cores * r.secs) * 100.0;
            let sharers_cpu: f64 = r.cpu[1..r.cpu.len() - 1].iter().sum();
            println!(
                "  run {run} {}: download {:4.0} MB/s ({:.2} s: first data {:.2}, last chunk {:.2}); \
                 CPU s: downloader {:.2}, sharers {:.2}, tracker {:.2} ({busy:.0}% of {cores} cores); peak RSS {:.1} MiB",
                kind.label(),
                rate / 1e6,
                r.secs,
                r.first_data,
                r.all_chunks,
                r.cpu[r.cpu.len() - 1],
                sharers_cpu,
                r.cpu[0],
                rss as f64 / 1024.0,
            );
            rates[k].push(rate);
            if k == 0 {
                peak_rss = peak_rss.max(rss);
            }
            drop(d);
            settle_disk();
        }
        if let Some(m) = &mirrors {
            let into = out.join("aria2c");
            std::fs::create_dir_all(&into).map_err(|e| e.to_string())?;
            let secs = m.fetch(&into, &source_sha1)?;
            if sha1_of(&into.join("aria.bin"))?.0 != source_sha1 {
                return Err(format!("run {run}: aria2c's file differs from the source"));
            }
            println!("  run {run} aria2c from {sharers} nginx: {:4.0} MB/s ({secs:.2} s)", size / secs / 1e6);
            aria_rates.push(size / secs);
            settle_disk();
        }
        let after =
            pipeline_rate(&file, &out.join("pipeline-2.bin")).map_err(|e| format!("reference pipeline: {e}"))?;
        let reference = (before + after) / 2.0;
        println!("  run {run} reference {:4.0} MB/s ({:.0}/{:.0})", reference / 1e6, before / 1e6, after / 1e6);
        references.push(reference);
        if !keep {
            let _ = std::fs::remove_dir_all(&out);
        }
        settle_disk();
    }
    let reference = median(&mut references);
    let medians: Vec<f64> = rates.iter_mut().map(|r| median(r)).collect();
    let of = |kind: Kind| kinds.iter().position(|k| *k == kind).map(|i| medians[i]);
    if let Some(rate) = of(Kind::Tls) {
        println!("  download with TLS (median):  {:8.0} MB/s", rate / 1e6);
    }
    if let Some(plain) = of(Kind::Plaintext) {
        println!("  plaintext baseline (median): {:8.0} MB/s", plain / 1e6);
    }
    if let (Some(rate), Some(plain)) = (of(Kind::Tls), of(Kind::Plaintext)) {
        println!("  TLS / plaintext:             {:8.2}", rate / plain);
    }
    println!("  reference (median):          {:8.0} MB/s", reference / 1e6);
    if !aria_rates.is_empty() {
        let aria = median(&mut aria_rates);
        println!("  aria2c from nginx (median):  {:8.0} MB/s", aria / 1e6);
        println!("  download / aria2c:           {:8.2}", medians[0] / aria);
    }
    // The headline figures are the first kind's (TLS unless told otherwise).
    let rate = medians[0];
    println!("  download / hash limit:       {:8.2}", rate / limit);
    println!("  download / reference:        {:8.2}", rate / reference);
    println!("  downloader peak RSS (max):   {:8.1} MiB", peak_rss as f64 / 1024.0);
    println!("  every result identical:          true");
    let _ = std::fs::remove_dir_all(&dir);
    // Leaves the disk settled for what runs next (another size, another
    // invocation): measured, a 1 GiB `fallocate` right after deleting 3 GiB
    // waited 0.47 s for the discards (ext4 `discard`), and none after a sync.
    settle_disk();
    Ok(())
}
